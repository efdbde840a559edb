"""The lock cases: uncontended, tail latency beside a busy thread, contended
by 2 and 4 processes, and recovery after the holder's SIGKILL, each
clusterhub's and its standard-library peers'.

Single-process cases time a loop in a host (``in_host``, ``with_loop``); the
cross-process ones share a lock through a ``LockKind`` (how a kind of lock is
made, opened in each process and torn down), made into cases by
``contended`` and ``recovery``; ``benchmarks/`` adds the third-party kinds
the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import mmap
import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any, Callable, ContextManager, Iterator, NamedTuple, Optional

from .. import Hub, connect
from .host import (
    UNPINNED,
    Batch,
    Case,
    Sample,
    ask,
    expect,
    hosted,
    now_ns,
    pause_forever,
    reap,
    report,
    run_forked,
    serve,
    sleep_until,
    stop,
    temp_path,
)
from .jobs import Job, Target

_fork = mp.get_context("fork")


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
    return lambda placement=UNPINNED: hosted(host, setup, placement=placement)


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
def _uc_connected() -> Iterator[Callable[[int], float]]:
    # `with lk:` in a process that joined its master by address (the same
    # table, mapped from the memfd the master sent): should match the above.
    address = f"@clusterhub-bench-lock-{os.getpid()}"
    r, w = os.pipe()

    def master() -> None:
        with Hub(address=address):
            os.write(w, b"!")
            pause_forever()

    pid = run_forked(master)
    os.close(w)
    try:
        if os.read(r, 1) != b"!":
            raise RuntimeError("the benchmark's master did not start")
        hub = connect(address)
        try:
            yield with_loop(hub.lock("k"))
        finally:
            hub.close()
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        reap(pid)


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
        "clusterhub-connected": in_host(_uc_connected),
        "mp-lock": in_host(_uc_mp_lock),
        "flock": in_host(_uc_flock),
    },
    size=0.02, rounds=21, smoke=0.001,
    targets=(
        Target("clusterhub", "mp-lock", 1.25, "`with lk:` <= 1.25 x `with multiprocessing.Lock()`"),
        Target("clusterhub-by-name", "flock", 1.0, "`with hub.lock(name):` <= 1 x bare fcntl.flock pair"),
        Target("clusterhub-connected", "clusterhub", 1.2,
               "`with lk:` in a connected process within the spread of the master's (<= 1.2 x)"),
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
        pid = run_forked(fn, *args)
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
        sleep_until(start)
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
    return lambda placement=UNPINNED, procs=2: hosted(_contended_host, kind(), procs, placement=placement)


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
        pause_forever()  # until SIGKILL


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
    return lambda placement=UNPINNED: hosted(_recovery_host, kind(), placement=placement)


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
