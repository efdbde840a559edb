"""The benchmark kit behind ``python -m clusterhub bench`` and ``benchmarks/``.

``bench`` compares clusterhub with the standard-library tools a user would
pick instead, in one run, interleaved (A B A B ...), and prints medians and
clusterhub/peer ratios against the targets (each job's ``targets``) in well
under a minute (``--json`` for a machine-readable copy).

The measuring kit is shared with ``benchmarks/`` (pytest-benchmark, plus the
third-party peers: pyzmq, filelock, fasteners, posix_ipc, sysv_ipc), so the
quick command and the full suite time the very same code:

- A *case* (``Case``) is a context manager factory: it sets a contender up
  (processes, sockets, locks), yields a *batch* function ``batch(size) ->
  sample`` and tears everything down.  A sample is a dict whose ``"t"`` is the
  figure, lower is better (seconds per operation, a p99, CPU seconds per
  second...), plus extras (``acq_per_s``, ``p50_ns``...).
- Most cases run in a forked *host* process (``hosted``), in its own process
  group, pinned to CPU 0 when asked (every thread, and every process it starts,
  inherits that), and answer ``batch`` commands over a pipe.  Cross-process
  figures are timed inside the processes (a timed loop in the requester, or
  CLOCK_MONOTONIC stamps compared across processes); forks, joins and the
  control pipes are never inside a timed span.
- A *job* (``Job``) is one comparison: its cases, the batch size, the rounds
  and the targets.  ``measure_job`` sets every case up at once, runs a warm-up
  batch of each, then rounds of one batch per case in rotating order.

The modules, by concern (import names from them; this package itself
imports none, so that the tests can use ``host`` alone):

- ``host``: host processes, their control pipe, the fork helpers (shared with
  the tests), the cross-process clock;
- ``jobs``: ``Job`` and ``Target``, measuring, summaries, ratios, the report;
- ``messaging``: round trip, one-way, broadcast, with their stdlib peers;
- ``locking``: uncontended, p99 beside a busy thread, contended, recovery;
- ``idle``: an idle master and workers (CPU, wake-ups, PSS);
- ``cli``: the quick plan and ``bench(args)``.
"""
