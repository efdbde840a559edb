"""Locks over Redis (issue #20): clusterhub's Redis engine against redis-py's
``Lock`` and python-redis-lock, on the same redis-server in the same run,
interleaved; medians and p99.

The figures (lower is better), each a job of its own group:

- ``redis-lock-uncontended``: one process, ``with <lock>: pass`` by name
  (``hub.lock("k")``, ``r.lock(name)``, ``redis_lock.Lock(r, name)``), each
  acquire+release timed alone; a batch is 500 of them (short batches, many
  rounds: a burst of load elsewhere on the machine hits a few batches of each
  case, which the median leaves out).
- ``redis-lock-handoff``: the holder releases while a waiter (another
  process) is blocked in its acquire: from the holder's stamp just before
  ``release()`` to the waiter's just after its ``acquire()`` returns
  (CLOCK_MONOTONIC, one clock for every process).  The host checks that the
  waiter is asleep in its acquire (its main thread sleeping, then 5 ms more)
  and, for redis-py's polling waiter, releases at a random phase of its
  0.1-s poll (uniform in [0, 0.1 s) more), as a release in real life would; a
  sample whose release came before the waiter began its acquire is dropped
  (``early``).
- ``redis-lock-contended-4``: 4 processes loop acquire / increment a shared
  counter / release for the same 1-s window: s per acquisition over the span
  (1 / acquisitions/s), with ``acq_per_s``, owner switches/s, the smallest
  share, and the time each ``acquire()`` took (``wait_p50_s``, ``wait_p99_s``).
  The counter is checked against the acquisitions (mutual exclusion).
- ``redis-lock-dead-holder``: a holder process is SIGKILLed while another
  blocks in its acquire: from just before ``os.kill`` to the waiter holding
  the lock, with lease = TTL = 1 s for all (clusterhub ``lease=1.0``, redis-py
  ``timeout=1``, python-redis-lock ``expire=1``); the kit's recovery case
  (``clusterhub.bench.locking.recovery``) over these locks.

clusterhub's side is a master ``Hub(address="redis+unix://...", lease=1.0)``
in the case's host, and, for the figures across processes, processes that
joined it with ``clusterhub.connect``; every lock is on the one redis-server
of the run (``_redis.server()``, on a Unix socket, no persistence), started
on first use and stopped at the end.  The uncontended and contended samples
also carry ``cpu_per_op_s`` (CPU of the case's processes per operation) and
``server_cpu_per_op_s`` (redis-server's).

Through the ``measure`` fixture (``conftest.py``): with ``--benchmark-disable``
(the default) each test runs one small batch of its own case, a smoke test of
a few seconds; enabled, every case of a group is measured interleaved, and
the summary prints the medians of the batches and the targets' verdicts;
after it, this module prints every sample pooled (the warm-up batches left
out): p50, p99, max per case, and the p99 ratios.  Without redis-py,
python-redis-lock or ``redis-server``, the cases that need them skip with
the reason.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import multiprocessing as mp
import os
import random
import statistics
import time
from typing import Any, Callable, ContextManager, Iterator, Optional

import pytest

from clusterhub import Hub
from clusterhub.bench.host import (
    UNPINNED,
    Batch,
    Host,
    Sample,
    Unavailable,
    ask,
    expect,
    group_pids,
    hosted,
    now_ns,
    process_cpu_ns,
    report,
    serve,
    sleep_until,
    stop,
)
from clusterhub.bench.jobs import Job, Target
from clusterhub.bench.locking import LockKind, recovery

from ._redis import (
    CASES,
    KINDS,
    MISSING,
    RedisKind,
    module_run,
    pooled_lines,
    quantile,
    redis,
    redis_lock,
    server,
    stats,
    unique,
)

LEASE = 1.0  # s: clusterhub's lease, and the dead-holder figure's TTL for the peers
PROCS = 4  # contending processes
SETTLE = 0.005  # s a waiter is left blocked before the release, once its main thread sleeps

# group -> case -> every latency (s) of its batches, the warm-up batch left out
_pooled: dict[str, dict[str, list[float]]] = {}


# ---- every case: hosted, the server's CPU and the pooled latencies ----------------


def observed(group: str, case: str, make: Callable[[], ContextManager[Host]]) -> Callable[..., Any]:
    """A case of ``group``: the host ``make()`` starts (after the run's server
    is up), each batch's sample completed with the CPU per operation of the
    case's processes and of the server (when it counts operations, ``n``), and
    its latencies (``lat``, else its figure) pooled for the summary, except the
    first batch's (the warm-up of ``measure_job``)."""

    @contextlib.contextmanager
    def case_cm(placement: str = UNPINNED, **params: Any) -> Iterator[Batch]:
        if placement != UNPINNED:
            raise Unavailable("the Redis lock benchmarks run unpinned only")
        srv = server()
        batches = 0
        with make() as host:

            def batch(size: Any) -> Sample:
                nonlocal batches
                pids = group_pids(host.pid)
                c0, s0 = sum(map(process_cpu_ns, pids)), srv.cpu_ns()
                sample = host(size)
                c1, s1 = sum(map(process_cpu_ns, pids)), srv.cpu_ns()
                lat = sample.pop("lat", None) or [sample["t"]]
                if sample.get("n"):
                    sample["cpu_per_op_s"] = (c1 - c0) / 1e9 / sample["n"]
                    sample["server_cpu_per_op_s"] = (s1 - s0) / 1e9 / sample["n"]
                batches += 1
                if batches > 1:
                    _pooled.setdefault(group, {}).setdefault(case, []).extend(lat)
                return sample

            yield batch

    return case_cm


def _job(name: str, figure: str, cases: dict[str, Callable[[], ContextManager[Host]]], **kw: Any) -> Job:
    return Job(name, figure, {c: observed(name, c, make) for c, make in cases.items() if c not in MISSING}, **kw)


def _case_params() -> list[Any]:
    return [c if c not in MISSING else pytest.param(c, marks=pytest.mark.skip(reason=MISSING[c])) for c in CASES]


# ---- 1. uncontended: acquire+release in one process ------------------------------


@contextlib.contextmanager
def _uc_clusterhub() -> Iterator[Callable[[], Any]]:
    with Hub(address=f"redis+unix://{server().path}?name={unique('bench-uc')}", lease=LEASE) as hub:
        yield lambda: hub.lock("k")


@contextlib.contextmanager
def _uc_redis_py() -> Iterator[Callable[[], Any]]:
    r, name = redis.Redis(unix_socket_path=server().path), unique("bench:uc:redis-py")
    yield lambda: r.lock(name)
    r.close()


@contextlib.contextmanager
def _uc_redis_lock() -> Iterator[Callable[[], Any]]:
    r, name = redis.Redis(unix_socket_path=server().path), unique("bench:uc:redis-lock")
    yield lambda: redis_lock.Lock(r, name)
    r.close()


def _uncontended_host(conn: Any, setup: Callable[[], ContextManager[Callable[[], Any]]]) -> None:
    with setup() as lock:

        def batch(n: int) -> Sample:
            clock = time.perf_counter_ns
            lat = []
            for _ in range(n):
                t0 = clock()
                with lock():
                    pass
                lat.append(clock() - t0)
            secs = [x / 1e9 for x in lat]
            return {**stats(secs), "mean_s": sum(secs) / n, "n": n, "lat": secs}

        serve(conn, batch)


def _in_host(setup: Callable[[], ContextManager[Callable[[], Any]]]) -> Callable[[], ContextManager[Host]]:
    return lambda: hosted(_uncontended_host, setup)


UNCONTENDED = _job(
    "redis-lock-uncontended", "s per acquire+release by name, one process (median of 500 each timed alone)",
    {"clusterhub": _in_host(_uc_clusterhub), "redis-py": _in_host(_uc_redis_py),
     "python-redis-lock": _in_host(_uc_redis_lock)},
    size=500, rounds=31, smoke=50, show=("p99_s", "cpu_per_op_s", "server_cpu_per_op_s"),
    targets=(Target("clusterhub", "redis-py", 1.1, "acquire+release <= 1.1 x redis-py Lock's"),),
)


# ---- 2. hand-off to a blocked waiter -----------------------------------------------


def _handoff_holder(conn: Any, kind: LockKind) -> None:
    h = kind.open()

    def command(what: str) -> Optional[int]:
        if what == "acquire":
            h.acquire()
            return None
        t0 = now_ns()
        h.release()
        return t0

    serve(conn, command)


def _handoff_waiter(conn: Any, kind: LockKind) -> None:
    h = kind.open()

    def command(_: Any) -> tuple[int, int]:
        report(conn, "going")
        ts = now_ns()
        h.acquire()
        t1 = now_ns()
        h.release()
        return ts, t1

    serve(conn, command)


def _asleep(pid: int, timeout: float = 2.0) -> None:
    """Until the main thread of ``pid`` sleeps (blocked in its acquire), then SETTLE more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] in ("S", "D"):
                break
        time.sleep(0.0005)
    time.sleep(SETTLE)


def _handoff_host(conn: Any, kind: RedisKind) -> None:
    kind.setup()
    links = []
    try:
        for role in (_handoff_holder, _handoff_waiter):
            ours, theirs = mp.Pipe()
            pid = kind.fork(role, theirs, kind)
            theirs.close()
            links.append((ours, pid))
        (holder, _), (waiter, waiter_pid) = links
        expect(holder)
        expect(waiter)

        def batch(n: int) -> Sample:
            lat, early = [], 0
            for _ in range(n):
                ask(holder, "acquire")
                if ask(waiter, "acquire") != "going":
                    raise RuntimeError("the waiter did not start its acquire")
                _asleep(waiter_pid)
                if kind.poll:
                    time.sleep(random.uniform(0, kind.poll))  # a random phase of the waiter's poll
                t0 = ask(holder, "release")
                ts, t1 = expect(waiter)
                if ts >= t0:
                    early += 1  # released before the waiter even began: not a hand-off
                else:
                    lat.append((t1 - t0) / 1e9)
            if not lat:
                raise RuntimeError(f"no hand-off measured: every one of {n} releases came before the acquire")
            return {**stats(lat), "handoffs": len(lat), "early": early, "lat": lat}

        serve(conn, batch)
    finally:
        for link, _ in links:
            stop(link)
        kind.teardown()


def _handoff(kind: type[RedisKind]) -> Callable[[], ContextManager[Host]]:
    return lambda: hosted(_handoff_host, kind())


HANDOFF = _job(
    "redis-lock-handoff", "s from the holder's release() to the blocked waiter holding the lock",
    {case: _handoff(kind) for case, kind in KINDS.items()},
    size=40, rounds=7, smoke=4, show=("p99_s", "max_s", "early"),
    targets=(Target("clusterhub", None, 2e-3, "hand-off <= 2 ms median"),),
)


# ---- 3. contended: 4 processes -------------------------------------------------------
# shared memory holds [acquisitions, last holder pid, owner switches]


def _contender(conn: Any, kind: LockKind, shm: mmap.mmap) -> None:
    h = kind.open()
    acquire, release = h.acquire, h.release
    c = memoryview(shm).cast("q")
    me = os.getpid()
    clock = time.perf_counter_ns

    def batch(window: tuple[int, int]) -> tuple[int, int, list[int]]:
        start, end = window
        sleep_until(start)
        n = 0
        waits: list[int] = []
        append = waits.append
        while True:
            for _ in range(16):
                t0 = clock()
                acquire()
                append(clock() - t0)
                c[0] += 1
                if c[1] != me:
                    c[1] = me
                    c[2] += 1
                release()
            n += 16
            t = now_ns()
            if t >= end:
                return n, t, waits

    serve(conn, batch)


def _contended_host(conn: Any, kind: RedisKind) -> None:
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
        total = sum(n for n, _, _ in done)
        if c[0] != total:
            raise AssertionError(f"mutual exclusion broken: {c[0]} increments for {total} acquisitions")
        span = (max(t for _, t, _ in done) - start) / 1e9
        shares = [n / total for n, _, _ in done]
        waits = sorted(w / 1e9 for _, _, ws in done for w in ws)
        return {"t": span / total, "acq_per_s": total / span, "switches_per_s": c[2] / span,
                "min_share": min(shares), "shares": shares, "n": total,
                "wait_p50_s": statistics.median(waits), "wait_p99_s": quantile(waits, 0.99), "lat": waits}

    try:
        for _ in range(PROCS):
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


def _contended(kind: type[RedisKind]) -> Callable[[], ContextManager[Host]]:
    return lambda: hosted(_contended_host, kind())


CONTENDED = _job(
    f"redis-lock-contended-{PROCS}", f"s per acquisition, {PROCS} processes contending (1 / acquisitions/s)",
    {case: _contended(kind) for case, kind in KINDS.items()},
    size=1.0, rounds=7, smoke=0.05,
    show=("acq_per_s", "switches_per_s", "min_share", "wait_p99_s", "cpu_per_op_s", "server_cpu_per_op_s"),
    targets=(Target("clusterhub", "python-redis-lock", 1 / 2, ">= 2 x python-redis-lock's acquisitions/s"),),
)


# ---- 4. dead holder -> next holder (lease = TTL = 1 s) ---------------------------------


def _dead_holder(kind: type[RedisKind]) -> Callable[[], ContextManager[Host]]:
    return lambda: recovery(functools.partial(kind, ttl=LEASE))()


DEAD_HOLDER = _job(
    "redis-lock-dead-holder", f"s from the holder's SIGKILL to the waiter holding the lock (lease = TTL = {LEASE} s)",
    {case: _dead_holder(kind) for case, kind in KINDS.items()},
    size=5.0, rounds=15, smoke=5.0, show=("flag",),  # size: the longest wait for the lock
    targets=(Target("clusterhub", None, 1.1 * LEASE, f"<= lease + 10 % ({1.1 * LEASE:.2f} s)"),),
)


# ---- the tests ---------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _redis_run(request: pytest.FixtureRequest) -> Iterator[None]:
    """The pooled summary after the conftest's; the server stopped after the module."""
    yield from module_run(request.config, _SUMMARY, "redis-locks-pooled-summary")


@pytest.mark.benchmark(group=UNCONTENDED.name)
@pytest.mark.parametrize("case", _case_params())
def test_redis_uncontended(measure: Any, case: str) -> None:
    """`with lock: pass` by name, one process, each acquire+release timed alone."""
    measure(UNCONTENDED, case)


@pytest.mark.benchmark(group=HANDOFF.name)
@pytest.mark.parametrize("case", _case_params())
def test_redis_handoff(measure: Any, case: str) -> None:
    """The holder's release() to the blocked waiter (another process) holding the lock."""
    summary = measure(HANDOFF, case)
    assert summary["handoffs"] > 0


@pytest.mark.benchmark(group=CONTENDED.name)
@pytest.mark.parametrize("case", _case_params())
def test_redis_contended(measure: Any, case: str) -> None:
    """4 processes looping acquire/increment/release for a fixed window: acquisitions/s (mutual exclusion checked)."""
    summary = measure(CONTENDED, case)
    assert summary["acq_per_s"] > 0


@pytest.mark.benchmark(group=DEAD_HOLDER.name)
@pytest.mark.parametrize("case", _case_params())
def test_redis_dead_holder(measure: Any, case: str) -> None:
    """A holder SIGKILLed while another process waits: the kill to the next holder, lease = TTL = 1 s."""
    summary = measure(DEAD_HOLDER, case)
    assert summary["recovers"], f"{case}: the waiter never got the lock after the holder's death"
    if case == "clusterhub":
        assert summary["flag"], "clusterhub's waiter took a dead holder's lock without `recovered` set"


# ---- the pooled summary -----------------------------------------------------------------


class _PooledSummary:
    """A plugin (registered by ``_redis_run``) printing every sample pooled,
    after the conftest's summary of the batches' medians."""

    conditions = ""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> Iterator[None]:
        yield
        if not _pooled:
            return
        tr = terminalreporter
        tr.write_sep("=", "Redis locks: every sample pooled (warm-up batches left out)")
        if self.conditions:
            tr.write_line(self.conditions + f"; clusterhub lease {LEASE} s")
        for job in (UNCONTENDED, HANDOFF, CONTENDED, DEAD_HOLDER):
            cases = _pooled.get(job.name)
            if not cases:
                continue
            what = "time in acquire()" if job is CONTENDED else job.figure
            tr.write_line("")
            tr.write_line(f"{job.name}: {what}")
            for line in pooled_lines(cases):
                tr.write_line(line)


_SUMMARY = _PooledSummary()
