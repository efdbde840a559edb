"""The benchmark kit behind ``python -m clusterhub bench`` and ``benchmarks/``.

``bench`` compares clusterhub with the standard-library tools a user would
pick instead, in one run, interleaved (A B A B ...), and prints medians and
clusterhub/peer ratios against the targets (each job's ``targets``) in well
under a minute (``--json`` for a machine-readable copy).

The measuring kit is shared with ``benchmarks/`` (pytest-benchmark, plus the
third-party peers: pyzmq, node's cluster-hub, filelock, fasteners, posix_ipc,
sysv_ipc), so the quick command and the full suite time the very same code:

- A *case* (``Case``) is a context manager factory: it sets a contender up
  (processes, sockets, locks), yields a *batch* function ``batch(size) ->
  sample`` and tears everything down.  A sample is a dict whose ``"t"`` is the
  figure, lower is better (seconds per operation, a p99, CPU seconds per
  second...), plus extras (``acq_per_s``, ``p50_ns``...).
- Most cases run in a forked *host* process (``hosted``), in its own process
  group, and answer ``batch`` commands over a pipe.  Cross-process figures
  are timed inside the processes (a timed loop in the requester, or
  CLOCK_MONOTONIC stamps compared across processes); forks, joins and the
  control pipes are never inside a timed span.
- A case runs in a *placement* (``host.PLACEMENTS``): ``unpinned``;
  ``one-cpu``, every process and thread of the case on one CPU; ``two-cpus``,
  the serving side (the master, an echo server) on one CPU and the other side
  (the requester, the sender, the receiving workers) on another.  Processes
  are pinned with ``os.sched_setaffinity`` on every thread; threads and
  processes started later inherit it.
- A round trip's sample carries ``cpu_per_rt_s``: the CPU time of all the
  case's processes (both sides, all threads) per round trip (``cpu_counted``),
  so a waiter that spins shows what it costs.
- A *job* (``Job``) is one comparison: its cases, the batch size, the rounds,
  the placements and the targets (a target may hold in some placements
  only).  ``measure_job`` sets every case up at once, runs a warm-up batch of
  each, then rounds of one batch per case in rotating order; a case that
  cannot run here (``Unavailable``) is left out with the reason.

The modules, by concern (import names from them; this package itself
imports none, so that the tests can use ``host`` alone):

- ``host``: host processes, their control pipe, placements, the fork helpers
  (shared with the tests), the cross-process clock, the CPU time of a case's
  processes, busy loops on every CPU;
- ``jobs``: ``Job`` and ``Target``, measuring, summaries, ratios, the report;
- ``messaging``: round trip, its p99 beside a busy loop on every CPU, one-way,
  broadcast, with their stdlib peers;
- ``aio``: the round trip from a worker's asyncio loop (hub attached or not),
  against an asyncio streams echo;
- ``fanin``: requests/s of a master serving 4 or 16 workers at once, against
  a ``multiprocessing.connection.wait`` server;
- ``locking``: uncontended, p99 beside a busy thread, contended, recovery;
- ``idle``: an idle master and workers (CPU, wake-ups, PSS);
- ``connecting``: the time ``clusterhub.connect()`` takes;
- ``cli``: the quick plan and ``bench(args)``.
"""
