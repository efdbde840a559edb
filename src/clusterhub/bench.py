"""The benchmark kit behind ``python -m clusterhub bench`` and ``benchmarks/``.

``bench`` compares clusterhub with the standard-library tools a user would
pick instead, in one run, interleaved (A B A B ...), and prints medians and
clusterhub/peer ratios against the targets of PERFORMANCE.md in well under a
minute (``--json`` for a machine-readable copy).

The measuring kit below is shared with ``benchmarks/`` (pytest-benchmark, plus
the third-party peers: pyzmq, filelock, fasteners, posix_ipc, sysv_ipc), so the
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
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import json
import math
import mmap
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.managers import BaseManager
from typing import Any, Callable, ContextManager, Iterator, Mapping, NamedTuple, Optional

from . import Hub, __version__

_fork = mp.get_context("fork")

Sample = dict[str, Any]
Batch = Callable[[Any], Sample]
Case = Callable[..., ContextManager[Batch]]  # case(pinned=False, **job.params)

# ---- processes and pipes -----------------------------------------------------


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: one clock for the whole system, so stamps taken
    in different processes compare."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def pin_to_one_cpu(cpu: int = 0) -> None:
    """Pin every thread of this process to ``cpu``; threads and processes
    started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            pass


class ChildError(RuntimeError):
    """A child process failed; the message is its traceback."""


def report(conn: Any, value: Any) -> None:
    """Child side: send a result to the parent."""
    conn.send(("ok", value))


def expect(conn: Any, timeout: float = 60.0) -> Any:
    """Parent side: the child's next result; ChildError with its traceback if it failed."""
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer from a child process within {timeout} s")
    try:
        status, value = conn.recv()
    except EOFError:
        raise ChildError("a child process exited without answering (see its stderr)") from None
    if status == "error":
        raise ChildError(value)
    return value


def ask(conn: Any, command: Any, timeout: float = 60.0) -> Any:
    conn.send(command)
    return expect(conn, timeout)


def stop(conn: Any) -> None:
    """Tell a child's ``serve`` loop to return, and close our end."""
    with contextlib.suppress(OSError):
        conn.send(None)
    conn.close()


def serve(conn: Any, batch: Callable[[Any], Any], ready: Any = None) -> None:
    """Child side: report ``ready``, then answer each command with
    ``batch(command)`` until None or EOF.  An exception is reported to the
    parent (as ChildError) and re-raised."""
    try:
        report(conn, ready)
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            if command is None:
                return
            report(conn, batch(command))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise


def fork_child(fn: Callable[..., Any], *args: Any) -> int:
    """Fork a child running ``fn(*args)``; it exits 0 when fn returns, 1 when
    it raises (traceback on stderr).  Returns its pid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float = 10.0) -> Optional[int]:
    """Wait for a child to exit (SIGKILL after ``timeout``); its exit code."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            timeout, deadline = 0, math.inf
        time.sleep(0.002)


class Host:
    """The parent's handle on a host process: ``host(size)`` runs one batch."""

    def __init__(self, conn: Any, ready: Any) -> None:
        self.conn = conn
        self.ready = ready  # what the host reported when set up

    def __call__(self, size: Any) -> Sample:
        sample: Sample = ask(self.conn, size)
        return sample


@contextlib.contextmanager
def hosted(host: Callable[..., None], *args: Any, pinned: bool = False) -> Iterator[Host]:
    """Fork a host process running ``host(conn, *args)``, which sets up and
    then ``serve``s batches on ``conn``.  It gets its own process group (so
    nothing it started outlives the case) and, with ``pinned``, CPU 0 for
    itself and everything it starts."""
    ours, theirs = mp.Pipe()

    def main() -> None:
        ours.close()
        os.setpgid(0, 0)
        if pinned:
            pin_to_one_cpu()
        try:
            host(theirs, *args)
        except BaseException:  # a failed setup: tell the parent why
            with contextlib.suppress(OSError):
                theirs.send(("error", traceback.format_exc()))
            raise

    pid = fork_child(main)
    theirs.close()
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also here: no window where killpg would miss it
    try:
        yield Host(ours, expect(ours))
    finally:
        stop(ours)
        reap(pid, 15.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # stragglers of the group


@contextlib.contextmanager
def temp_path(suffix: str = "") -> Iterator[str]:
    """A fresh file name in the temp dir, removed afterwards."""
    fd, path = tempfile.mkstemp(prefix="clusterhub-bench-", suffix=suffix)
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _sleep_until(t_ns: int) -> None:
    left = t_ns - now_ns()
    if left > 0:
        time.sleep(left / 1e9)


def _pause() -> None:
    while True:
        signal.pause()


class Countdown:
    """Counts handled messages; stamps the time the last expected one was handled."""

    def __init__(self) -> None:
        self.left = 0
        self.t1 = 0
        self.done = threading.Event()

    def arm(self, n: int) -> None:
        self.done = threading.Event()
        self.left = n

    def hit(self, data: Any = None, sender: Any = None) -> None:
        self.left -= 1
        if self.left == 0:
            self.t1 = now_ns()
            self.done.set()

    def wait(self, timeout: float = 60.0) -> int:
        if not self.done.wait(timeout):
            raise TimeoutError(f"{self.left} messages still unhandled after {timeout} s")
        return self.t1


# ---- jobs: measuring, summarising, comparing ----------------------------------


class Target(NamedTuple):
    """A promise of PERFORMANCE.md: ``case``'s figure <= ``bound`` x ``peer``'s
    (or <= ``bound`` itself when ``peer`` is None)."""

    case: str
    peer: Optional[str]
    bound: float
    text: str


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.2f} µs"
    return f"{s * 1e9:.0f} ns"


def fmt_cpu(x: float) -> str:
    return f"{x * 100:.3f} % CPU"


@dataclasses.dataclass(frozen=True)
class Job:
    """One comparison: clusterhub's case(s) and their peers."""

    name: str
    figure: str  # what a sample's "t" is
    cases: Mapping[str, Case]
    size: Any  # what each batch gets (messages, seconds, ...), full runs
    rounds: int
    smoke: Any  # the size of a one-batch smoke run
    pinnable: bool = False  # measured unpinned and pinned to one CPU
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    targets: tuple[Target, ...] = ()
    show: tuple[str, ...] = ()  # extras worth printing next to the figure
    fmt: Callable[[float], str] = fmt_time

    def extended(self, cases: Mapping[str, Case], targets: tuple[Target, ...] = ()) -> "Job":
        """This job with more peers (and targets about them)."""
        return dataclasses.replace(
            self, cases={**self.cases, **cases}, targets=self.targets + targets
        )

    def group(self, pinned: Optional[bool]) -> str:
        if not self.pinnable or pinned is None:
            return self.name
        return f"{self.name} {'pinned' if pinned else 'unpinned'}"

    def make(self, case: str, pinned: Optional[bool]) -> ContextManager[Batch]:
        return self.cases[case](pinned=bool(pinned), **self.params)


def measure_job(
    job: Job, pinned: Optional[bool] = None, *, size: Any = None, rounds: Optional[int] = None,
    cases: Optional[list[str]] = None, warmup: int = 1,
) -> dict[str, list[Sample]]:
    """Set every case up, run ``warmup`` batches of each, then ``rounds``
    rounds of one batch per case, interleaved in rotating order."""
    size = job.size if size is None else size
    rounds = job.rounds if rounds is None else rounds
    names = list(job.cases) if cases is None else cases
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        batches = {name: stack.enter_context(job.make(name, pinned)) for name in names}
        for _ in range(warmup):
            for name in names:
                batches[name](size)
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append(batches[name](size))
    return samples


def measure_once(job: Job, case: str, pinned: Optional[bool] = None) -> list[Sample]:
    """One small batch of one case: the smoke test."""
    with job.make(case, pinned) as batch:
        return [batch(job.smoke)]


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Medians of a case's samples (element-wise for lists; all() for flags)."""
    out: dict[str, Any] = {"rounds": len(samples)}
    for key in dict.fromkeys(k for s in samples for k in s):
        values = [s[key] for s in samples if s.get(key) is not None]
        if not values:
            out[key] = None
            continue
        v0 = values[0]
        if isinstance(v0, bool):
            out[key] = all(values)
        elif isinstance(v0, (int, float)):
            out[key] = statistics.median(values)
        elif isinstance(v0, list):
            out[key] = [statistics.median(col) for col in zip(*values)]
        else:
            out[key] = values[-1]
    return out


def is_ours(case: str) -> bool:
    return case.startswith("clusterhub")


def _usable(summary: dict[str, Any]) -> bool:
    """A peer that never got the lock back has no figure to compare with."""
    return summary.get("recovers", True) is not False


def compare(job: Job, summaries: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """clusterhub/peer ratios of the median figures, and the targets' verdicts."""
    ratios = {
        f"{ours}/{peer}": summaries[ours]["t"] / summaries[peer]["t"]
        for ours in summaries if is_ours(ours)
        for peer in summaries if not is_ours(peer) and _usable(summaries[peer])
        if summaries[peer]["t"] > 0
    }
    verdicts = []
    for tg in job.targets:
        if tg.case not in summaries or (tg.peer is not None and tg.peer not in summaries):
            continue
        value = summaries[tg.case]["t"]
        if tg.peer is not None:
            value = ratios.get(f"{tg.case}/{tg.peer}", math.inf)
        verdicts.append({**tg._asdict(), "value": value, "met": value <= tg.bound})
    return {"ratios": ratios, "targets": verdicts}


def format_group(job: Job, group: str, summaries: Mapping[str, dict[str, Any]]) -> list[str]:
    """A few lines: each case's median, its ratios, and the targets' verdicts."""
    cmp = compare(job, summaries)
    rounds = max(s["rounds"] for s in summaries.values())
    lines = [f"{group}: {job.figure} (median of {rounds} interleaved batches)"]
    ours = [c for c in summaries if is_ours(c)]
    for case, s in summaries.items():
        extras = "  ".join(_fmt_extra(k, s[k]) for k in job.show if k in s)
        line = f"  {case:<20} {job.fmt(s['t']):>14}"
        if not _usable(s):
            line += "  never recovers (the waiter timed out)"
        elif not is_ours(case) and ours:
            line += "  " + "  ".join(f"{o}/{case} {cmp['ratios'][f'{o}/{case}']:.2f}" for o in ours
                                     if f"{o}/{case}" in cmp["ratios"])
        lines.append(line + (f"  [{extras}]" if extras else ""))
    for v in cmp["targets"]:
        what = f"{v['case']}/{v['peer']} = {v['value']:.2f}" if v["peer"] else \
            f"{v['case']} = {job.fmt(v['value'])}"
        lines.append(f"  target {v['text']}: {what} -> {'met' if v['met'] else 'MISSED'}")
    return lines


def _fmt_extra(key: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{key}=" + "/".join(f"{v:.2f}" for v in value)
    if isinstance(value, float):
        return f"{key}={value:,.4g}" if abs(value) < 1000 else f"{key}={value:,.0f}"
    return f"{key}={value}"


def conditions() -> dict[str, Any]:
    """What the numbers were measured under."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        model = "?"
    return {
        "clusterhub": __version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# ---- 1. request round trip --------------------------------------------------------
# The requester times n round trips in a loop; the figure is s per round trip.


def _echo(data: Any, sender: Any) -> Any:
    return data


def _echo_value(x: Any) -> Any:
    return x


def _timed_calls(call: Callable[[int], Any], n: int) -> Sample:
    t0 = time.perf_counter()
    for i in range(n):
        call(i)
    return {"t": (time.perf_counter() - t0) / n}


def _relay(conn: Any, inner: Any) -> None:
    """Host side: pass each batch on to the process that measures it."""
    expect(inner)
    serve(conn, lambda size: ask(inner, size))


def _rt_clusterhub_host(conn: Any) -> None:
    # The host is the master, answering "echo"; a worker makes the requests.
    hub = Hub()
    hub.on("echo", _echo)
    inner, theirs = mp.Pipe()

    def requester() -> None:
        serve(theirs, lambda n: _timed_calls(lambda i: hub.request_master("echo", i).result(), n))

    hub.fork(requester)
    theirs.close()
    try:
        _relay(conn, inner)
    finally:
        stop(inner)
        hub.close()


def rt_clusterhub(pinned: bool = False) -> ContextManager[Batch]:
    return hosted(_rt_clusterhub_host, pinned=pinned)


class PipeEcho:
    """Round-trip transport protocol (peers): ``prepare()`` in the requester
    before the echo process forks, ``serve()`` in the echo process (forked only
    when the class defines it), ``client() -> call(x)`` in the requester,
    ``close()``.  This one: a multiprocessing.Pipe, pickled both ways, to a
    process echoing what it receives."""

    def prepare(self) -> None:
        self.a, self.b = mp.Pipe()

    def serve(self) -> None:
        b = self.b
        with contextlib.suppress(EOFError):
            while True:
                b.send(b.recv())

    def client(self) -> Callable[[Any], Any]:
        a = self.a

        def call(x: Any) -> Any:
            a.send(x)
            return a.recv()

        return call

    def close(self) -> None:
        self.a.close()


class _EchoManager(BaseManager):
    pass


class _Echo:
    def echo(self, x: Any) -> Any:
        return x


_EchoManager.register("Echo", _Echo)


class ManagerEcho:
    """A call on a multiprocessing.Manager proxy (the manager's server process echoes)."""

    def prepare(self) -> None:
        self.manager = _EchoManager(ctx=_fork)

    def client(self) -> Callable[[Any], Any]:
        self.manager.start()
        echo: Callable[[Any], Any] = self.manager.Echo().echo  # type: ignore[attr-defined]
        return echo

    def close(self) -> None:
        self.manager.shutdown()


class PoolEcho:
    """ProcessPoolExecutor(1).submit(echo, x).result()."""

    def prepare(self) -> None:
        self.pool = ProcessPoolExecutor(1, mp_context=_fork)

    def client(self) -> Callable[[Any], Any]:
        pool = self.pool
        pool.submit(_echo_value, 0).result()  # start its process now
        return lambda x: pool.submit(_echo_value, x).result()

    def close(self) -> None:
        self.pool.shutdown()


def _rt_peer_host(conn: Any, transport: Any) -> None:
    transport.prepare()
    pid = fork_child(transport.serve) if hasattr(transport, "serve") else None
    try:
        call = transport.client()
        serve(conn, lambda n: _timed_calls(call, n))
    finally:
        transport.close()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            reap(pid)


def rt_peer(transport: type) -> Case:
    """A round-trip case over a peer transport class (see PipeEcho)."""
    return lambda pinned=False: hosted(_rt_peer_host, transport(), pinned=pinned)


ROUND_TRIP = Job(
    "round-trip", "s per request round trip, worker -> master -> worker",
    {
        "clusterhub": rt_clusterhub,
        "pipe": rt_peer(PipeEcho),
        "manager": rt_peer(ManagerEcho),
        "process-pool": rt_peer(PoolEcho),
    },
    size=1000, rounds=11, smoke=20, pinnable=True,
    targets=(Target("clusterhub", "pipe", 1.5, "<= 1.5 x multiprocessing.Pipe pickled echo"),),
)


# ---- 2. one-way messages, worker -> master -----------------------------------------
# The sender stamps t0 before its first send; the receiver stamps t1 when it has
# handled the last; the figure is (t1 - t0) / n, s per message.


def _ow_clusterhub_host(conn: Any) -> None:
    # The host is the master, counting in its handler; a worker sends.
    hub = Hub()
    count = Countdown()
    hub.on("m", count.hit)
    inner, theirs = mp.Pipe()

    def sender() -> None:
        def batch(n: int) -> int:
            t0 = now_ns()
            for i in range(n):
                hub.send_to_master("m", i)
            return t0

        serve(theirs, batch)

    hub.fork(sender)
    theirs.close()

    def batch(n: int) -> Sample:
        count.arm(n)
        t0 = ask(inner, n)
        return {"t": (count.wait() - t0) / n / 1e9}

    try:
        expect(inner)
        serve(conn, batch)
    finally:
        stop(inner)
        hub.close()


def ow_clusterhub(pinned: bool = False) -> ContextManager[Batch]:
    return hosted(_ow_clusterhub_host, pinned=pinned)


class PipeOneWay:
    """One-way transport protocol (peers): ``prepare()`` in the receiver before
    the sender forks, ``sender() -> send(x)`` in the sender, ``receiver() ->
    recv()`` in the receiver, ``close()``.  This one: multiprocessing.Pipe."""

    def prepare(self) -> None:
        self.r, self.w = mp.Pipe()

    def sender(self) -> Callable[[Any], None]:
        return self.w.send

    def receiver(self) -> Callable[[], Any]:
        return self.r.recv

    def close(self) -> None:
        self.r.close()


class QueueOneWay:
    """multiprocessing.Queue (a feeder thread writes to a pipe)."""

    def prepare(self) -> None:
        self.q: Any = _fork.Queue()

    def sender(self) -> Callable[[Any], None]:
        put: Callable[[Any], None] = self.q.put
        return put

    def receiver(self) -> Callable[[], Any]:
        get: Callable[[], Any] = self.q.get
        return get

    def close(self) -> None:
        self.q.close()


class SimpleQueueOneWay(QueueOneWay):
    """multiprocessing.SimpleQueue (pickles and writes under a lock)."""

    def prepare(self) -> None:
        self.q = _fork.SimpleQueue()


def _ow_peer_host(conn: Any, transport: Any) -> None:
    transport.prepare()
    inner, theirs = mp.Pipe()

    def sender() -> None:
        send = transport.sender()

        def batch(n: int) -> int:
            t0 = now_ns()
            for i in range(n):
                send(i)
            return t0

        serve(theirs, batch)

    pid = fork_child(sender)
    theirs.close()

    def batch(n: int) -> Sample:
        inner.send(n)
        for _ in range(n):
            recv()
        t1 = now_ns()
        return {"t": (t1 - expect(inner)) / n / 1e9}

    try:
        recv = transport.receiver()
        expect(inner)
        serve(conn, batch)
    finally:
        stop(inner)
        transport.close()
        reap(pid)


def ow_peer(transport: type) -> Case:
    """A one-way case over a peer transport class (see PipeOneWay)."""
    return lambda pinned=False: hosted(_ow_peer_host, transport(), pinned=pinned)


ONE_WAY = Job(
    "one-way", "s per small message, worker -> master, all handled",
    {
        "clusterhub": ow_clusterhub,
        "pipe": ow_peer(PipeOneWay),
        "queue": ow_peer(QueueOneWay),
        "simple-queue": ow_peer(SimpleQueueOneWay),
    },
    size=20000, rounds=9, smoke=200, pinnable=True,
    targets=(Target("clusterhub", "pipe", 1 / 3, ">= 3 x multiprocessing.Pipe.send msgs/s"),),
)


# ---- 3. broadcast to 8 workers -------------------------------------------------------
# The master stamps t0 before the first broadcast; each receiver stamps when it
# has handled the last; the figure is (latest stamp - t0) / n, s per broadcast.


def _bc_hub_receiver(theirs: Any, count: Countdown) -> None:
    def batch(n: int) -> int:
        count.arm(n)
        report(theirs, "armed")
        return count.wait()

    serve(theirs, batch)


def _bc_batch(links: list[Any], send: Callable[[Any], None]) -> Batch:
    def batch(n: int) -> Sample:
        for link in links:
            ask(link, n)  # armed
        t0 = now_ns()
        for i in range(n):
            send(i)
        t1 = max(expect(link) for link in links)
        return {"t": (t1 - t0) / n / 1e9}

    return batch


def _bc_clusterhub_host(conn: Any, receivers: int) -> None:
    hub = Hub()
    count = Countdown()
    hub.on("b", count.hit)  # inherited by the workers; not called in the master
    links: list[Any] = []
    try:
        for _ in range(receivers):
            inner, theirs = mp.Pipe()
            hub.fork(_bc_hub_receiver, theirs, count)
            theirs.close()
            links.append(inner)
        for link in links:
            expect(link)
        serve(conn, _bc_batch(links, lambda x: hub.send_to_workers("b", x)))
    finally:
        for link in links:
            stop(link)
        hub.close()


def bc_clusterhub(pinned: bool = False, receivers: int = 8) -> ContextManager[Batch]:
    return hosted(_bc_clusterhub_host, receivers, pinned=pinned)


class PipeLoopBroadcast:
    """Broadcast transport protocol (peers): ``prepare(k)`` in the master before
    the k receivers fork, ``receiver(i) -> recv()`` in receiver i, ``sender() ->
    send(x)`` in the master once they are forked, ``close()``.  This one: a loop
    of multiprocessing.Pipe.send over k pipes."""

    def prepare(self, k: int) -> None:
        self.pipes = [mp.Pipe() for _ in range(k)]

    def receiver(self, i: int) -> Callable[[], Any]:
        return self.pipes[i][1].recv

    def sender(self) -> Callable[[Any], None]:
        ends = [a for a, _ in self.pipes]

        def send(x: Any) -> None:
            for a in ends:
                a.send(x)

        return send

    def close(self) -> None:
        for a, b in self.pipes:
            a.close()
            b.close()


def _bc_peer_receiver(theirs: Any, transport: Any, i: int) -> None:
    recv = transport.receiver(i)

    def batch(n: int) -> int:
        report(theirs, "armed")
        for _ in range(n):
            recv()
        return now_ns()

    serve(theirs, batch)


def _bc_peer_host(conn: Any, transport: Any, receivers: int) -> None:
    transport.prepare(receivers)
    links, pids = [], []
    try:
        for i in range(receivers):
            inner, theirs = mp.Pipe()
            pids.append(fork_child(_bc_peer_receiver, theirs, transport, i))
            theirs.close()
            links.append(inner)
        send = transport.sender()
        for link in links:
            expect(link)
        serve(conn, _bc_batch(links, send))
    finally:
        for link in links:
            stop(link)
        transport.close()
        for pid in pids:
            reap(pid)


def bc_peer(transport: type) -> Case:
    """A broadcast case over a peer transport class (see PipeLoopBroadcast)."""
    return lambda pinned=False, receivers=8: hosted(
        _bc_peer_host, transport(), receivers, pinned=pinned
    )


BROADCAST = Job(
    "broadcast-8", "s per broadcast to 8 workers, all deliveries handled",
    {"clusterhub": bc_clusterhub, "pipe-loop": bc_peer(PipeLoopBroadcast)},
    size=2000, rounds=9, smoke=20, pinnable=True, params={"receivers": 8},
    targets=(Target("clusterhub", "pipe-loop", 1 / 2, ">= 2 x a loop of Pipe.send to 8 pipes"),),
)


# ---- 4. uncontended lock -------------------------------------------------------------
# In the host: a timed loop of acquire+release, sized to last about `size` s.


def with_loop(cm: Any) -> Callable[[int], float]:
    """``n`` times ``with cm: pass``; the seconds it took."""

    def loop(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            with cm:
                pass
        return time.perf_counter() - t0

    return loop


def _calibrated(loop: Callable[[int], float]) -> Batch:
    """A batch of about ``seconds`` of ``loop``: n from the previous batch's speed."""
    per_op = [0.0]

    def batch(seconds: float) -> Sample:
        n = 64 if not per_op[0] else max(16, int(seconds / per_op[0]))
        dt = loop(n)
        per_op[0] = dt / n
        return {"t": dt / n, "n": n}

    return batch


def _loop_host(conn: Any, setup: Callable[[], ContextManager[Callable[[int], float]]]) -> None:
    with setup() as loop:
        serve(conn, _calibrated(loop))


def in_host(setup: Callable[[], ContextManager[Any]], host: Callable[..., None] = _loop_host) -> Case:
    """A case timing, in its own host process, what ``setup()`` yields."""
    return lambda pinned=False: hosted(host, setup, pinned=pinned)


@contextlib.contextmanager
def _uc_clusterhub() -> Iterator[Callable[[int], float]]:
    with Hub() as hub:
        yield with_loop(hub.lock("k"))


@contextlib.contextmanager
def _uc_clusterhub_by_name() -> Iterator[Callable[[int], float]]:
    with Hub() as hub:

        def loop(n: int) -> float:
            t0 = time.perf_counter()
            for _ in range(n):
                with hub.lock("k"):
                    pass
            return time.perf_counter() - t0

        yield loop


@contextlib.contextmanager
def _uc_mp_lock() -> Iterator[Callable[[int], float]]:
    yield with_loop(_fork.Lock())


@contextlib.contextmanager
def _uc_flock() -> Iterator[Callable[[int], float]]:
    with temp_path() as path:
        fd = os.open(path, os.O_RDWR)

        def loop(n: int) -> float:
            flock, ex, un = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN
            t0 = time.perf_counter()
            for _ in range(n):
                flock(fd, ex)
                flock(fd, un)
            return time.perf_counter() - t0

        try:
            yield loop
        finally:
            os.close(fd)


UNCONTENDED = Job(
    "lock-uncontended", "s per acquire+release, one process",
    {
        "clusterhub": in_host(_uc_clusterhub),
        "clusterhub-by-name": in_host(_uc_clusterhub_by_name),
        "mp-lock": in_host(_uc_mp_lock),
        "flock": in_host(_uc_flock),
    },
    size=0.02, rounds=21, smoke=0.001,
    targets=(
        Target("clusterhub", "mp-lock", 1.25, "`with lk:` <= 1.25 x `with multiprocessing.Lock()`"),
        Target("clusterhub-by-name", "flock", 1.0, "`with hub.lock(name):` <= 1 x bare fcntl.flock pair"),
    ),
)


# ---- 5. `with lk:` latency with one busy Python thread in the process ---------------


def _latencies_with_busy_thread(cm: Any, n: int, limit: float = 2.0) -> Sample:
    """Per-iteration latency of ``with cm: pass`` while another thread spins on
    pure Python arithmetic; at most ``limit`` seconds."""
    spinning = threading.Event()
    stopping = False

    def spin() -> None:
        x = 0
        spinning.set()
        while not stopping:
            x = (x * 31 + 7) % 1000003

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    spinning.wait()
    clock = time.perf_counter_ns
    lat: list[int] = []
    append = lat.append
    deadline = clock() + int(limit * 1e9)
    try:
        for _ in range(n):
            t0 = clock()
            with cm:
                pass
            t1 = clock()
            append(t1 - t0)
            if t1 > deadline:
                break
    finally:
        stopping = True
        t.join()
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return {"t": p99 / 1e9, "p50_ns": p50, "p99_ns": p99, "max_ns": lat[-1], "iterations": len(lat)}


def _busy_host(conn: Any, setup: Callable[[], ContextManager[Any]]) -> None:
    with setup() as cm:
        serve(conn, lambda n: _latencies_with_busy_thread(cm, int(n)))


@contextlib.contextmanager
def _hub_lock() -> Iterator[Any]:
    with Hub() as hub:
        yield hub.lock("k")


@contextlib.contextmanager
def _mp_lock() -> Iterator[Any]:
    yield _fork.Lock()


P99_BUSY = Job(
    "lock-p99-busy-thread", "p99 of `with lock: pass` (s) with a busy Python thread",
    {"clusterhub": in_host(_hub_lock, _busy_host), "mp-lock": in_host(_mp_lock, _busy_host)},
    size=20000, rounds=9, smoke=200, show=("p50_ns", "p99_ns", "max_ns"),
    targets=(Target("clusterhub", "mp-lock", 2.0, "p99 <= 2 x multiprocessing.Lock's p99"),),
)


# ---- 6 and 7. locks across processes: kinds -------------------------------------


class Handle(NamedTuple):
    """One process's use of a lock."""

    acquire: Callable[[], Any]
    release: Callable[[], Any]
    acquire_within: Callable[[float], bool]  # False: not acquired in time
    recovered: Callable[[], Optional[bool]]  # clusterhub's flag; None elsewhere


class LockKind:
    """How one kind of lock is made and shared: ``setup()`` in the host,
    ``fork(fn, *args)`` starts a process that uses it, ``open()`` in that
    process, ``teardown()`` in the host (reaps what ``fork`` started and
    closes what ``setup`` put on ``self.stack``)."""

    def setup(self) -> None:
        self._pids: list[int] = []
        self.stack = contextlib.ExitStack()

    def fork(self, fn: Callable[..., Any], *args: Any) -> int:
        pid = fork_child(fn, *args)
        self._pids.append(pid)
        return pid

    def open(self) -> Handle:
        raise NotImplementedError

    def join(self, pid: int) -> None:
        """Wait until a process ``fork`` started has exited and is reaped."""
        reap(pid)
        self._pids.remove(pid)

    def teardown(self) -> None:
        for pid in self._pids:
            reap(pid)
        self.stack.close()


class ClusterhubKind(LockKind):
    """hub.lock("k") in workers of one hub."""

    def setup(self) -> None:
        self.hub = Hub()
        self._workers: dict[int, Any] = {}

    def fork(self, fn: Callable[..., Any], *args: Any) -> int:
        w = self.hub.fork(fn, *args)
        self._workers[w.pid] = w  # type: ignore[index]
        return w.pid  # type: ignore[return-value]

    def join(self, pid: int) -> None:
        if not self._workers.pop(pid).join(10):
            raise TimeoutError(f"worker {pid} still not gone 10 s after SIGKILL")

    def open(self) -> Handle:
        lk = self.hub.lock("k")
        return Handle(lk.acquire, lk.release, lambda t: lk.acquire(timeout=t), lambda: lk.recovered)

    def teardown(self) -> None:
        self.hub.close()


class MpLockKind(LockKind):
    """A multiprocessing.Lock inherited through fork."""

    def setup(self) -> None:
        super().setup()
        self.lock = _fork.Lock()

    def open(self) -> Handle:
        lock = self.lock
        return Handle(lock.acquire, lock.release, lambda t: lock.acquire(timeout=t), lambda: None)


class FlockKind(LockKind):
    """fcntl.flock(LOCK_EX)/flock(LOCK_UN) on a file each process opens itself."""

    def setup(self) -> None:
        super().setup()
        self.path = self.stack.enter_context(temp_path(".lock"))

    def open(self) -> Handle:
        fd = os.open(self.path, os.O_RDWR)
        acquire = functools.partial(fcntl.flock, fd, fcntl.LOCK_EX)

        def acquire_within(timeout: float) -> bool:
            acquire()  # the kernel always releases a dead holder's flock
            return True

        return Handle(acquire, functools.partial(fcntl.flock, fd, fcntl.LOCK_UN),
                      acquire_within, lambda: None)


# ---- 6. contended lock -------------------------------------------------------
# `procs` processes loop acquire / count in shared memory / release during the
# same window; shared memory holds [acquisitions, last holder pid, owner switches].


def _contender(conn: Any, kind: LockKind, shm: mmap.mmap) -> None:
    h = kind.open()
    acquire, release = h.acquire, h.release
    c = memoryview(shm).cast("q")
    me = os.getpid()

    def batch(window: tuple[int, int]) -> tuple[int, int]:
        start, end = window
        _sleep_until(start)
        n = 0
        while True:
            for _ in range(64):
                acquire()
                c[0] += 1
                if c[1] != me:
                    c[1] = me
                    c[2] += 1
                release()
            n += 64
            t = now_ns()
            if t >= end:
                return n, t

    serve(conn, batch)


def _contended_host(conn: Any, kind: LockKind, procs: int) -> None:
    kind.setup()
    shm = mmap.mmap(-1, mmap.PAGESIZE)
    c = memoryview(shm).cast("q")
    links: list[Any] = []

    def batch(seconds: float) -> Sample:
        c[0] = c[1] = c[2] = 0
        start = now_ns() + 20_000_000
        for link in links:
            link.send((start, start + int(seconds * 1e9)))
        done = [expect(link) for link in links]
        total = sum(n for n, _ in done)
        if c[0] != total:
            raise AssertionError(f"mutual exclusion broken: {c[0]} increments for {total} acquisitions")
        span = (max(t for _, t in done) - start) / 1e9
        shares = [n / total for n, _ in done]
        return {"t": span / total, "acq_per_s": total / span, "switches_per_s": c[2] / span,
                "shares": shares, "min_share": min(shares)}

    try:
        for _ in range(procs):
            inner, theirs = mp.Pipe()
            kind.fork(_contender, theirs, kind, shm)
            theirs.close()
            links.append(inner)
        for link in links:
            expect(link)
        serve(conn, batch)
    finally:
        for link in links:
            stop(link)
        kind.teardown()


def contended(kind: type) -> Case:
    return lambda pinned=False, procs=2: hosted(_contended_host, kind(), procs, pinned=pinned)


def _contended_job(procs: int) -> Job:
    return Job(
        f"lock-contended-{procs}", f"s per acquisition, {procs} processes contending",
        {"clusterhub": contended(ClusterhubKind), "mp-lock": contended(MpLockKind),
         "flock": contended(FlockKind)},
        size=0.3, rounds=7, smoke=0.02, params={"procs": procs},
        show=("acq_per_s", "switches_per_s", "min_share"),
        targets=(Target("clusterhub", "mp-lock", 1 / 0.8,
                        ">= 0.8 x multiprocessing.Lock acquisitions/s"),),
    )


CONTENDED_2 = _contended_job(2)
CONTENDED_4 = _contended_job(4)


# ---- 7. recovery after the holder's SIGKILL -------------------------------------
# A fresh holder takes the lock, the case's one long-lived waiter blocks on it,
# the host stamps t0 and SIGKILLs the holder; the waiter stamps t1 once it holds
# the lock.  (A waiter forked for each round would spend hundreds of µs in
# copy-on-write faults between its wake-up and t1.)  The batch's size is how
# long to wait at most, for the peers that never recover.


def _holder(conn: Any, kind: LockKind, bound: float) -> None:
    ok = kind.open().acquire_within(bound)
    report(conn, os.getpid() if ok else None)  # None: a dead holder still has it
    if ok:
        _pause()  # until SIGKILL


def _waiter(conn: Any, kind: LockKind) -> None:
    h = kind.open()

    def batch(bound: float) -> tuple[Optional[int], Optional[bool]]:
        report(conn, "waiting")
        ok = h.acquire_within(bound)
        t1 = now_ns()
        flag = h.recovered()
        if ok:
            h.release()
        return (t1 if ok else None), flag

    serve(conn, batch)


def _wait_until_asleep(pid: int, timeout: float = 2.0) -> None:
    """Until the main thread of ``pid`` sleeps (blocked in the acquire)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] in ("S", "D"):
                break
        time.sleep(0.001)
    time.sleep(0.01)  # and surely inside the wait, not on its way in


def _recovery_host(conn: Any, kind: LockKind) -> None:
    kind.setup()
    w_in, w_out = mp.Pipe()
    waiter = kind.fork(_waiter, w_out, kind)
    w_out.close()

    def batch(bound: float) -> Sample:
        h_in, h_out = mp.Pipe()
        holder = kind.fork(_holder, h_out, kind, bound)
        h_out.close()
        if expect(h_in, bound + 30) is None:
            kind.join(holder)
            return {"t": bound, "recovers": False}
        ask(w_in, bound)  # waiting
        _wait_until_asleep(waiter)
        t0 = now_ns()
        os.kill(holder, signal.SIGKILL)
        t1, flag = expect(w_in, bound + 30)
        kind.join(holder)  # gone before the next round starts
        if t1 is None:
            return {"t": bound, "recovers": False}
        return {"t": (t1 - t0) / 1e9, "recovers": True, "flag": flag}

    try:
        expect(w_in)
        serve(conn, batch)
    finally:
        stop(w_in)
        kind.teardown()


def recovery(kind: type) -> Case:
    return lambda pinned=False: hosted(_recovery_host, kind(), pinned=pinned)


RECOVERY = Job(
    "recovery", "s from the holder's SIGKILL to the waiter holding the lock",
    {"clusterhub": recovery(ClusterhubKind), "flock": recovery(FlockKind),
     "mp-lock": recovery(MpLockKind)},
    size=0.2, rounds=21, smoke=0.05, show=("flag",),
    targets=(
        Target("clusterhub", None, 1e-3, "< 1 ms median"),
        Target("clusterhub", "flock", 1.0, "no slower than fcntl.flock's kernel release"),
    ),
)


# ---- 8. idle ---------------------------------------------------------------------------
# A master and 4 idle workers; from outside, the CPU they use over `size`
# seconds (utime+stime, and the per-thread schedstat run time in ns), their
# wake-ups, and the PSS of a worker against a bare child forked by the same master.


def _idle_host(conn: Any, with_hub: bool, workers: int) -> None:
    info: dict[str, Any] = {"master": os.getpid()}
    hub = Hub() if with_hub else None
    pids = []
    try:
        if hub is not None:
            info["workers"] = [hub.fork(_pause).pid for _ in range(workers)]
            pids.append(fork_child(_pause))
            info["bare"] = pids[-1]
        else:
            pids = [fork_child(_pause) for _ in range(workers)]
            info["workers"] = pids
        serve(conn, lambda _: None, ready=info)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            reap(pid)
        if hub is not None:
            hub.close()


def _proc_usage(pids: list[int]) -> tuple[float, int, int]:
    """(utime+stime s, on-CPU ns of every thread, context switches) of ``pids``."""
    ticks = run_ns = switches = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    run_ns += int(f.read().split()[0])
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    switches += sum(int(ln.split()[1]) for ln in f if "ctxt_switches" in ln)
    return ticks / os.sysconf("SC_CLK_TCK"), run_ns, switches


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))


@contextlib.contextmanager
def _idle(with_hub: bool, pinned: bool = False, workers: int = 4) -> Iterator[Batch]:
    with hosted(_idle_host, with_hub, workers, pinned=pinned) as host:
        info = host.ready
        pids = [info["master"], *info["workers"]]

        def batch(seconds: float) -> Sample:
            s0, r0, w0 = _proc_usage(pids)
            time.sleep(seconds)
            s1, r1, w1 = _proc_usage(pids)
            out = {"t": (r1 - r0) / 1e9 / seconds, "cpu_percent_ticks": 100 * (s1 - s0) / seconds,
                   "wakeups_per_s": (w1 - w0) / seconds}
            if "bare" in info:
                worker = statistics.median(pss_kib(p) for p in info["workers"])
                bare = pss_kib(info["bare"])
                out.update(worker_pss_kib=worker, bare_child_pss_kib=bare, pss_delta_kib=worker - bare)
            return out

        yield batch


IDLE = Job(
    "idle", "CPU s per s used by an idle master + 4 idle workers",
    {"clusterhub": functools.partial(_idle, True), "bare-fork": functools.partial(_idle, False)},
    size=2.0, rounds=3, smoke=0.1, params={"workers": 4},
    show=("cpu_percent_ticks", "wakeups_per_s", "worker_pss_kib", "bare_child_pss_kib", "pss_delta_kib"),
    fmt=fmt_cpu,
    targets=(Target("clusterhub", None, 0.001, "~0 % CPU (<= 0.1 %)"),),
)

JOBS = (ROUND_TRIP, ONE_WAY, BROADCAST, UNCONTENDED, P99_BUSY, CONTENDED_2, CONTENDED_4,
        RECOVERY, IDLE)


# ---- the command line ------------------------------------------------------------

# (job, pinned, size, rounds): smaller than the full suite, under a minute in all.
QUICK_PLAN: tuple[tuple[Job, Optional[bool], Any, int], ...] = (
    (ROUND_TRIP, False, 300, 5),
    (ROUND_TRIP, True, 300, 5),
    (ONE_WAY, False, 5000, 5),
    (ONE_WAY, True, 5000, 5),
    (BROADCAST, False, 500, 5),
    (BROADCAST, True, 500, 5),
    (UNCONTENDED, None, 0.01, 9),
    (P99_BUSY, None, 10000, 5),
    (CONTENDED_2, None, 0.2, 5),
    (CONTENDED_4, None, 0.2, 3),
    (RECOVERY, None, 0.1, 7),
    (IDLE, None, 1.0, 1),
)


def bench(args: argparse.Namespace) -> int:
    """Measure the quick plan and print (or write) the comparison."""
    plan = [p for p in QUICK_PLAN if not args.only or any(o in p[0].group(p[1]) for o in args.only)]
    if not plan:
        print(f"no job matches {args.only}; jobs: {', '.join(j.name for j in JOBS)}", file=sys.stderr)
        return 2
    cond = conditions()
    out: dict[str, Any] = {"conditions": cond, "groups": {}}
    lines = [
        f"clusterhub {cond['clusterhub']} vs stdlib peers: medians of interleaved batches, "
        f"ratios clusterhub/peer (< 1: clusterhub faster)",
        f"{cond['cpus']} CPUs ({cond['cpu_model']}), load {', '.join(f'{x:.2f}' for x in cond['loadavg'])}; "
        f"'pinned' = every process on CPU 0",
    ]
    t_start = time.monotonic()
    for job, pinned, size, rounds in plan:
        group = job.group(pinned)
        print(f"measuring {group} ...", file=sys.stderr, flush=True)
        samples = measure_job(job, pinned, size=size, rounds=rounds)
        summaries = {case: summarize(s) for case, s in samples.items()}
        out["groups"][group] = {"figure": job.figure, "size": size, "cases": summaries,
                                **compare(job, summaries)}
        lines += [""] + format_group(job, group, summaries)
    lines += ["", f"({time.monotonic() - t_start:.0f} s; the full comparison with pyzmq, filelock, "
                  "fasteners, posix_ipc and sysv_ipc: see benchmarks/README.md)"]
    if args.json == "-":
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
