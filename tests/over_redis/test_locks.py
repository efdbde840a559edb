"""Global locks over a real redis-server, between real processes: plain fork
children of the test that join the hub by address (the test's own hubs are
inert in them).

Processes are sequenced with pipes (``reports``) and events; the server's
state (a client blocked in BLPOP, a lease) is polled with a bound, as it
sends no event.  Times across processes compare ``time.monotonic()``, which
is one clock for the whole machine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import clusterhub
from clusterhub import HubError, LockError, LockTimeout

from .conftest import (
    LEASE,
    MP,
    Procs,
    RedisServer,
    Reports,
    blocked_clients,
    blpop_calls,
    connect,
    wait_blocked_clients,
    wait_until,
)
from conftest import in_thread

pytestmark = pytest.mark.timeout(60)


def strictly_increasing(xs: list[int]) -> bool:
    return all(a < b for a, b in zip(xs, xs[1:]))


# ---- the basics ----------------------------------------------------------------------


def test_uncontended_rows_tokens_and_the_unix_socket(redis_server: RedisServer, master: clusterhub.Hub,
                                                      procs: Procs, reports: Reports) -> None:
    """An uncontended acquire: a token, not recovered, not lost; the row of
    held_locks() with its host; tokens increase, also for a worker joined
    through the Unix socket (same hub, same counter)."""
    assert master.is_master and master.address == redis_server.url("t")
    lk = master.lock("k")
    assert lk.fencing_token is None and not lk.lost and not lk.recovered
    tokens = []
    for _ in range(3):
        with lk as held:
            assert held is lk
            assert isinstance(held.fencing_token, int)
            assert not held.recovered and not held.lost
            tokens.append(held.fencing_token)
            rows = master.held_locks()
            assert [(r.key, r.pid, r.worker_id, r.host) for r in rows] == [(b"k", os.getpid(), None,
                                                                              socket.gethostname())]
            assert tuple(rows[0]) == (b"k", os.getpid(), None)  # (still the three-field tuple)
            assert lk.locked()
        assert not lk.locked()
    assert master.held_locks() == []

    release = MP.Event()
    url = redis_server.unix_url("t")

    def worker() -> None:
        hub = connect(url)
        assert hub.is_worker and not hub.is_master and hub.worker_id is not None
        with hub.lock(b"k") as held:
            reports.put("held", held.fencing_token, hub.worker_id)
            release.wait(20)
        hub.close()

    pid = procs.start(worker)
    _, token, wid = reports.get()
    rows = master.held_locks()
    assert [(r.key, r.pid, r.worker_id, r.host) for r in rows] == [(b"k", pid, wid, socket.gethostname())]
    assert lk.locked()
    assert lk.acquire(timeout=0.05) is False
    release.set()
    procs.join(pid)
    with lk as held:
        tokens += [token, held.fencing_token]
    assert strictly_increasing(tokens), tokens


def test_mutual_exclusion_across_processes_and_threads(redis_server: RedisServer, master: clusterhub.Hub,
                                                       procs: Procs, tmp_path: Path) -> None:
    """4 processes x 3 threads increment a counter in shared memory without
    atomicity, under the lock: no increment is lost, no two holders ever
    overlap, and the fencing tokens, logged in the order of the holdings,
    increase strictly."""
    n_procs, n_threads, n_iter = 4, 3, 25
    shared = MP.RawArray("q", 4)  # counter, inside, overlaps, holdings that had to wait
    log = tmp_path / "tokens"
    start = MP.Event()
    url = redis_server.url("t")

    def worker() -> None:
        hub = connect(url)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

        def work() -> None:
            lk = hub.lock("counter")
            for _ in range(n_iter):
                with lk as held:
                    if shared[1]:
                        shared[2] += 1
                    shared[1] = 1
                    v = shared[0]
                    time.sleep(0.0002)  # (widen the window an overlap would need)
                    shared[0] = v + 1
                    os.write(fd, b"%d\n" % held.fencing_token)
                    shared[1] = 0

        assert start.wait(20)
        threads = [threading.Thread(target=work) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(50)
            assert not t.is_alive()
        os.close(fd)
        hub.close()

    pids = [procs.start(worker) for _ in range(n_procs)]
    calls = blpop_calls(redis_server)
    start.set()
    for pid in pids:
        procs.join(pid, timeout=50)
    total = n_procs * n_threads * n_iter
    waits = blpop_calls(redis_server) - calls
    print("BLPOP calls", waits)
    assert waits > 30  # (contended: many waits, woken by releases; the watcher makes a few)
    assert shared[2] == 0, f"{shared[2]} overlapping holdings"
    assert shared[0] == total
    tokens = [int(x) for x in log.read_text().split()]
    assert len(tokens) == total
    assert strictly_increasing(tokens)
    assert master.held_locks() == []
    with master.lock("counter") as held:
        assert held.fencing_token > tokens[-1] and not held.recovered


def test_acquire_timeouts(redis_server: RedisServer, master: clusterhub.Hub, procs: Procs,
                          reports: Reports) -> None:
    """While another process holds the key: acquire(timeout=) returns False
    after about that long, and the handle's own timeout applies to acquire()
    and to with (LockTimeout, a TimeoutError) and async with; the forms of
    threading's acquire(blocking, timeout)."""
    release = MP.Event()
    url = redis_server.url("t")

    def holder() -> None:
        hub = connect(url)
        with hub.lock("k"):
            reports.put("held")
            release.wait(30)
            reports.put("releasing", time.monotonic())
        hub.close()

    pid = procs.start(holder)
    assert reports.get() == ("held",)
    lk = master.lock("k")

    def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
        t0 = time.monotonic()
        return fn(*args, **kw), time.monotonic() - t0

    ok, took = timed(lk.acquire, timeout=0.3)
    assert ok is False and 0.3 <= took < 0.6
    assert lk.fencing_token is None and not lk.recovered and not lk.lost
    ok, took = timed(lk.acquire, 0.2)  # a number alone is a timeout
    assert ok is False and 0.2 <= took < 0.5
    ok, took = timed(lk.acquire, False)
    assert ok is False and took < 0.1
    ok, took = timed(lk.acquire, blocking=False)
    assert ok is False and took < 0.1
    ok, took = timed(lk.acquire, True, 0.1)
    assert ok is False and 0.1 <= took < 0.4
    # short timeouts end on time too (Redis checks a BLPOP's timeout only
    # on its 100 ms tick: the last part of a wait is slept on our own clock)
    for t in (0.01, 0.05, 0.3):
        ok, took = timed(lk.acquire, timeout=t)
        assert ok is False and t <= took < t + 0.06, f"acquire(timeout={t}) took {took:.3f} s"

    async def short(t: float) -> float:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout):
            await master.lock("k").acquire_async(t)
        return time.monotonic() - t0

    for t in (0.01, 0.05, 0.3):
        took = asyncio.run(short(t))
        assert t <= took < t + 0.06, f"acquire_async({t}) took {took:.3f} s"
    with pytest.raises(ValueError):
        lk.acquire(False, 1.0)
    with pytest.raises(ValueError):
        lk.acquire(timeout=-2)

    lt = master.lock("k", timeout=0.2)
    ok, took = timed(lt.acquire)  # the handle's timeout
    assert ok is False and 0.2 <= took < 0.5
    t0 = time.monotonic()
    with pytest.raises(LockTimeout) as e:
        with lt:
            pytest.fail("acquired a held lock")
    assert isinstance(e.value, TimeoutError) and isinstance(e.value, HubError)
    assert 0.2 <= time.monotonic() - t0 < 0.5

    async def enter() -> None:
        async with lt:
            pytest.fail("acquired a held lock")

    t0 = time.monotonic()
    with pytest.raises(LockTimeout):
        asyncio.run(enter())
    assert 0.2 <= time.monotonic() - t0 < 0.5

    # Contended, then released: the waiter gets it at once.
    threading.Timer(0.2, release.set).start()
    ok, took = timed(lk.acquire, timeout=10)
    _, t_rel = reports.get()
    assert ok is True and time.monotonic() - t_rel < 0.1 + 0.05
    assert not lk.recovered
    lk.release()
    procs.join(pid)


def test_lock_errors(redis_server: RedisServer, master: clusterhub.Hub, procs: Procs, reports: Reports) -> None:
    """LockError (a RuntimeError) for a same-thread re-acquire and a release
    without holding; close() refused while this process holds or waits for
    a lock; bad keys."""
    lk = master.lock("k")
    with pytest.raises(LockError) as e:
        lk.release()
    assert isinstance(e.value, RuntimeError)
    assert lk.acquire(timeout=1)
    with pytest.raises(LockError):
        lk.acquire(timeout=1)
    with pytest.raises(LockError):
        master.lock("k", timeout=1.0).acquire()  # another handle on the same key
    with pytest.raises(LockError):
        in_thread(lk.release)  # another thread does not hold it
    assert in_thread(lambda: lk.acquire(timeout=0.1)) is False  # nor can it take it
    with pytest.raises(LockError):
        master.close()
    assert not master._closed and lk.locked()
    lk.release()
    with pytest.raises(LockError):
        lk.release()

    # close() while a thread waits (the key held by another process)
    release = MP.Event()
    url = redis_server.url("t")

    def holder() -> None:
        hub = connect(url)
        with hub.lock("w"):
            reports.put("held")
            release.wait(30)
        hub.close()

    pid = procs.start(holder)
    assert reports.get() == ("held",)
    got: list[bool] = []

    def wait() -> None:
        lw = master.lock("w")
        got.append(lw.acquire(timeout=10))
        lw.release()

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_until(lambda: blocked_clients(redis_server) >= 2, 5, "the waiter blocked")  # (and the watcher)
    with pytest.raises(LockError):
        master.close()
    release.set()
    waiter.join(10)
    assert got == [True]
    procs.join(pid)

    async def twice() -> None:
        async with lk:
            with pytest.raises(LockError):
                async with lk:
                    pass

    asyncio.run(twice())
    for bad, exc in ((3, TypeError), (None, TypeError), ("", ValueError), (b"x" * 256, ValueError)):
        with pytest.raises(exc):
            master.lock(bad)  # type: ignore[arg-type]
    assert master.lock("é" * 127).acquire(timeout=1)  # 254 bytes
    master.lock("é" * 127).release()


# ---- waiting -------------------------------------------------------------------------


def test_handoff_chain_is_prompt(redis_server: RedisServer, procs: Procs, reports: Reports,
                                 worker_hubs: Any) -> None:
    """Three waiting processes: each release hands the key to the next in
    the order they came, at once (well under 100 ms) although the lease is
    3 s, the longest a waiter sleeps between looks at a holder it was not
    woken for; each waiter's BLPOP returns once, with the key."""
    url = redis_server.url("chain")
    hub = worker_hubs(url, lease=3.0)
    lk = hub.lock("h")
    assert lk.acquire()

    def waiter() -> None:
        h = connect(url, lease=3.0)
        w = h.lock("h")
        reports.put("waiting")
        assert w.acquire(timeout=20)
        t_got = time.monotonic()
        time.sleep(0.02)
        t_rel = time.monotonic()
        w.release()
        reports.put("held", t_got, t_rel, os.getpid())
        h.close()

    calls = blpop_calls(redis_server)
    pids = []
    for n in range(1, 4):
        pids.append(procs.start(waiter))
        assert reports.get() == ("waiting",)
        wait_blocked_clients(redis_server, n)
    t_rel = time.monotonic()
    lk.release()
    held = sorted(reports.get_n(3, timeout=10), key=lambda r: r[1])
    for _, t_got, t_next, _ in held:
        assert t_got - t_rel < 0.1, f"handed over after {t_got - t_rel:.3f} s"
        t_rel = t_next
    assert [pid for *_, pid in held] == pids  # first come, first served
    for pid in pids:
        procs.join(pid)
    assert blpop_calls(redis_server) - calls == 3


def test_long_wait_is_woken_by_the_release_without_polling(redis_server: RedisServer, procs: Procs,
                                                            reports: Reports) -> None:
    """A 7 s blocked wait (lease 1 s) succeeds; in the meantime the waiter
    wakes about once per lease (its BLPOP slices end when the holder's lease
    would), never more; the release hands over at once."""
    url = redis_server.url("long")
    go = MP.Event()

    def holder() -> None:
        hub = connect(url, lease=1.0)
        lk = hub.lock("k")
        with lk:
            reports.put("held")
            assert go.wait(10)
            time.sleep(7.0)  # (holding for 7 s is the subject)
            reports.put("releasing", time.monotonic())
        hub.close()

    def waiter() -> None:
        hub = connect(url, lease=1.0)
        lk = hub.lock("k")
        t0 = time.monotonic()
        reports.put("waiting")
        ok = lk.acquire()  # no limit
        reports.put("got", ok, time.monotonic(), time.monotonic() - t0, lk.recovered)
        lk.release()
        hub.close()

    h = procs.start(holder)
    assert reports.get() == ("held",)
    calls0 = blpop_calls(redis_server)  # (no master here: only the waiter blocks)
    w = procs.start(waiter)
    assert reports.get() == ("waiting",)
    go.set()
    _, t_rel = reports.get(timeout=15)
    _, ok, t_got, waited, recovered = reports.get(timeout=5)
    assert ok and not recovered
    assert waited > 6.5
    assert t_got - t_rel < 0.1, f"woken {t_got - t_rel:.3f} s after the release"
    calls = blpop_calls(redis_server) - calls0
    assert 5 <= calls <= 10, f"{calls} BLPOP calls in a 7 s wait with a 1 s lease"
    procs.join(h)
    procs.join(w)


# ---- asyncio -------------------------------------------------------------------------


def test_asyncio_does_not_block_the_loop(redis_server: RedisServer, master: clusterhub.Hub, procs: Procs,
                                          reports: Reports) -> None:
    """Tasks wait for a key another process holds while a ticker keeps
    ticking; then they take it in turn (exclusion between tasks, the owner
    is the task, each with its own fencing token)."""
    release = MP.Event()
    url = redis_server.url("t")

    def holder() -> None:
        hub = connect(url)
        with hub.lock("a"):
            reports.put("held")
            release.wait(30)
        hub.close()

    pid = procs.start(holder)
    assert reports.get() == ("held",)
    lk = master.lock("a")

    async def main() -> tuple[list[float], list[int], int]:
        ticks: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.005)

        inside = 0
        overlaps = 0
        tokens: list[int] = []

        async def task() -> None:
            nonlocal inside, overlaps
            async with lk as held:
                overlaps += inside
                inside += 1
                token = held.fencing_token
                tokens.append(token)
                assert not held.recovered and not held.lost
                await asyncio.sleep(0.01)
                assert held.fencing_token == token  # (the task's own)
                inside -= 1

        t = asyncio.create_task(ticker())
        tasks = [asyncio.create_task(task()) for _ in range(4)]
        await asyncio.sleep(0.5)
        assert not any(x.done() for x in tasks)
        asyncio.get_running_loop().call_soon(release.set)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        stop.set()
        await t
        return ticks, tokens, overlaps

    ticks, tokens, overlaps = asyncio.run(main())
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 50 and max(gaps) < 0.1, f"the loop stalled {max(gaps):.3f} s"
    assert overlaps == 0
    assert len(tokens) == 4 and strictly_increasing(tokens)
    procs.join(pid)


def test_asyncio_cancel_a_waiting_task(redis_server: RedisServer, procs: Procs, reports: Reports,
                                       worker_hubs: Any) -> None:
    """Cancelling a task blocked waiting for a key: CancelledError at once,
    nothing held or waiting afterwards, and the holder's release goes to the
    next waiter at once."""
    url = redis_server.url("cancel")
    release = MP.Event()

    def holder() -> None:
        hub = connect(url, lease=3.0)
        with hub.lock("c"):
            reports.put("held")
            release.wait(30)
            reports.put("releasing", time.monotonic())
        hub.close()

    pid = procs.start(holder)
    assert reports.get() == ("held",)
    hub = worker_hubs(url, lease=3.0)
    lk = hub.lock("c")

    async def main() -> None:
        waiting = asyncio.create_task(lk.acquire_async(timeout=20))
        await asyncio.get_running_loop().run_in_executor(None, wait_blocked_clients, redis_server, 1)
        t0 = time.monotonic()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert time.monotonic() - t0 < 0.1
        assert [r.pid for r in hub.held_locks()] == [pid]
        assert blocked_clients(redis_server) == 0
        # then a task waits again and gets it at once on release
        async def take() -> tuple[float, bool]:
            async with lk:
                return time.monotonic(), lk.recovered

        again = asyncio.create_task(take())
        await asyncio.get_running_loop().run_in_executor(None, wait_blocked_clients, redis_server, 1)
        release.set()
        t_got, recovered = await asyncio.wait_for(again, 10)
        _, t_rel = await asyncio.get_running_loop().run_in_executor(None, reports.get)
        assert t_got - t_rel < 0.1 and not recovered

    asyncio.run(main())
    procs.join(pid)


def test_close_is_quiet_and_final(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """close() of a master and of a worker logs nothing (the watcher is
    stopped before the connections go), is idempotent, and later calls raise
    HubClosedError; the name and the lease are given up at once."""
    master = clusterhub.Hub(address=redis_server.url("quiet"), lease=LEASE)
    worker = connect(redis_server.url("quiet"))
    lk = master.lock("k")
    with lk:
        pass
    worker.close()
    master.close()
    master.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    for call in (lambda: lk.acquire(timeout=0), master.held_locks, lambda: master.lock("k"), lambda: master.workers):
        with pytest.raises(clusterhub.HubClosedError):
            call()
    r = redis_server.client()
    assert r.get(b"{ch:quiet}:master") is None and r.keys(b"{ch:quiet}:proc:*") == []
    clusterhub.Hub(address=redis_server.url("quiet"), lease=LEASE).close()  # (the name is free at once)


def test_the_last_process_to_leave_leaves_no_lasting_key(redis_server: RedisServer) -> None:
    """The hub's own keys (worker ids, the lease setting, the fencing
    counter) last while any of its processes lives, whichever leaves first;
    when the last one leaves, every key of the hub left on the server has a
    TTL (theirs a minute): a forked worker that close() ended by
    SIGTERM leaves nothing either, its lease and inbox gone with its exit.
    A hub started again meanwhile continues its worker ids and fencing
    tokens, and its keys last again."""
    url = redis_server.url("gone")
    r = redis_server.client()
    hub_keys = [b"{ch:gone}:ids", b"{ch:gone}:lease", b"{ch:gone}:fence"]
    master = clusterhub.Hub(address=url, lease=10 * LEASE)  # (a lease that would outlast the test)
    worker = connect(url)
    with master.lock("k") as held:
        token = held.fencing_token
    first_id = worker.worker_id
    forked = master.fork(threading.Event().wait)
    assert master.request_worker(forked.id, "nothing").exception(10) is not None  # (it reads its inbox)
    master.close()  # (first: the connected worker lives on)
    assert forked.exitcode == -15
    assert r.keys(f"{{ch:gone}}:*:{forked.id}".encode()) == []
    assert [r.pttl(k) for k in hub_keys] == [-1, -1, -1]
    worker.close()
    left = {k: r.pttl(k) for k in r.keys(b"{ch:gone}:*")}
    assert all(ms > 0 for ms in left.values()) and all(0 < left[k] <= 60_000 for k in hub_keys), left

    master = clusterhub.Hub(address=url, lease=LEASE)
    try:
        worker = connect(url)
        with master.lock("k") as held:
            assert token is not None and held.fencing_token is not None and held.fencing_token > token
        assert first_id is not None and worker.worker_id is not None and worker.worker_id > first_id
        wait_until(lambda: [r.pttl(k) for k in hub_keys] == [-1, -1, -1], 2 * LEASE, "the hub's keys to last again")
        worker.close()
    finally:
        master.close()


def test_asyncio_each_loop_closes_its_connection(redis_server: RedisServer, worker_hubs: Any) -> None:
    """A program that runs asyncio.run() again and again (each loop gets
    its own client) does not pile up connections to the server."""
    hub = worker_hubs(redis_server.url("loops"), lease=LEASE)
    lk = hub.lock("k")

    async def once() -> None:
        async with lk:
            pass

    asyncio.run(once())
    r = redis_server.client()
    before = r.info("clients")["connected_clients"]
    for _ in range(10):
        asyncio.run(once())
    assert r.info("clients")["connected_clients"] <= before
    r.close()


def test_an_acquire_arriving_after_its_giving_up_takes_nothing(redis_server: RedisServer,
                                                              master: clusterhub.Hub) -> None:
    """An acquisition that gave up by an exception (a command of it may
    still be on its way: a cut link's socket retransmits for minutes) is
    refused when that command arrives: it neither queues nor takes the key
    for nobody.  One that gave up in order (a timeout) leaves no such mark."""
    link = master._link  # type: ignore[attr-defined]
    r = redis_server.client()
    try:
        held = master.lock("busy")
        assert held.acquire()
        for key, busy in ((b"free", False), (b"busy", True)):
            acq = link.new_acq()
            link.give_up(key, acq, unanswered=True)
            assert r.pttl(link.prefix + b"gone:" + acq) > 60_000
            assert link.try_acquire(key, acq) == (None, 0)
            assert link.acquire_or_wait(key, acq, 0.05)[0] is None
            assert r.llen(link.queue_key(key)) == 0
            assert r.hget(link.lock_key(key), "acq") == (held_acq(link, key) if busy else None)
        acq = link.new_acq()
        link.give_up(b"free", acq)
        assert r.exists(link.prefix + b"gone:" + acq) == 0
        held.release()
    finally:
        r.close()


def held_acq(link: Any, key: bytes) -> Any:
    (h,) = [h for h in link.held.values() if h.key == key]
    return h.acq
