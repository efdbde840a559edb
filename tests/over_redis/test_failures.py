"""Failures over Redis: a holder SIGKILLed or SIGSTOPped past its lease,
Ctrl-C in a blocked acquire, a waiter that gives up when the key was handed
to it or while it is queued,
the server killed and restarted.

Sleeping past a lease is what some of these tests are about; everything else
is sequenced with pipes and events, or polls the server's state with a bound.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

import pytest

import clusterhub
from clusterhub import ConnectError, HubError, LockError

from .conftest import (
    LEASE,
    MP,
    Procs,
    RedisServer,
    Reports,
    connect,
    wait_blocked_clients,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

MARGIN = 0.5  # s past a lease within which a death must have been noticed


def wait_joined(master: clusterhub.Hub, wid: int) -> clusterhub.Worker:
    return wait_until(lambda: master.workers.get(wid), 5, f"worker {wid} in hub.workers")


# ---- dead and paused holders ------------------------------------------------------------


def test_holder_sigkilled(redis_server: RedisServer, master: clusterhub.Hub, procs: Procs,
                          reports: Reports) -> None:
    """A holder SIGKILLed: a waiting process gets the key within the lease
    plus a margin, recovered, with a higher token; the master's on_exit
    fires for it and hub.workers drops it within the same bound; join()."""
    exited: list[tuple[int, float]] = []
    noticed = threading.Event()

    @master.on_exit
    def _(w: clusterhub.Worker) -> None:
        exited.append((w.id, time.monotonic()))
        noticed.set()

    url = redis_server.url("t")

    def holder() -> None:
        hub = connect(url)
        lk = hub.lock("k")
        assert lk.acquire()
        reports.put("held", hub.worker_id, lk.fencing_token)
        threading.Event().wait(60)

    def waiter() -> None:
        hub = connect(url)
        lk = hub.lock("k")
        reports.put("waiting", hub.worker_id)
        ok = lk.acquire(timeout=20)
        reports.put("got", ok, time.monotonic(), lk.recovered, lk.fencing_token)
        lk.release()
        hub.close()

    h = procs.start(holder)
    _, hid, token = reports.get()
    w = wait_joined(master, hid)
    assert w.pid == h and w.host == socket.gethostname() and w.is_alive()
    assert [(r.key, r.pid, r.worker_id) for r in master.held_locks()] == [(b"k", h, hid)]
    procs.start(waiter)
    _, wid = reports.get()
    wait_joined(master, wid)
    wait_blocked_clients(redis_server, 2)  # the waiter, and the master's watcher

    t_kill = time.monotonic()
    os.kill(h, signal.SIGKILL)
    procs.join(h, -signal.SIGKILL)
    _, ok, t_got, recovered, new_token = reports.get(timeout=LEASE + 5)
    assert ok and recovered and new_token > token
    assert t_got - t_kill < LEASE + MARGIN, f"recovered {t_got - t_kill:.3f} s after the kill"
    assert noticed.wait(LEASE + 5)
    assert master.join(timeout=5)  # (the waiter left cleanly: at once)
    # (Two workers' exits come in no set order: the waiter, handed the key as
    # the holder's lease ran out, may leave before the watcher looks at leases.)
    assert sorted(x[0] for x in exited) == sorted([hid, wid])
    t_holder = next(t for i, t in exited if i == hid)
    assert t_holder - t_kill < LEASE + MARGIN, f"the holder's exit seen {t_holder - t_kill:.3f} s after the kill"
    assert hid not in master.workers and not w.is_alive()


def test_holder_paused_past_its_lease(redis_server: RedisServer, master: clusterhub.Hub, procs: Procs,
                                      reports: Reports) -> None:
    """A holder SIGSTOPped past its lease: another process acquires with a
    higher token (recovered); after SIGCONT the paused one sees ``lost`` on
    both its keys (also the one nobody took meanwhile), its release() raises
    LockError for both, and it works again (a new acquire, not lost).  The
    master reports it exited meanwhile, and lists it again once it is back."""
    resumed = MP.Event()
    url = redis_server.url("t")

    def holder() -> None:
        hub = connect(url)
        lk, other = hub.lock("k"), hub.lock("untouched")
        assert lk.acquire() and other.acquire()
        reports.put("held", lk.fencing_token, hub.worker_id)
        assert resumed.wait(30)
        t0 = time.monotonic()
        while not (lk.lost and other.lost) and time.monotonic() - t0 < 5:
            time.sleep(0.005)  # (``lost`` is set by the renewer, which has no event to wait on)
        errors = []
        for h in (lk, other):
            try:
                h.release()
                errors.append(None)
            except LockError as e:
                errors.append(type(e).__name__)
        reports.put("after", lk.lost, other.lost, round(time.monotonic() - t0, 3), errors, other.locked())
        ok = lk.acquire(timeout=10)
        reports.put("again", ok, lk.fencing_token, lk.lost, lk.recovered)
        lk.release()
        hub.close()

    pid = procs.start(holder)
    _, token, wid = reports.get()
    wait_until(lambda: wid in master.workers, 5, "the master to list the worker")
    lk = master.lock("k")
    t_stop = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    assert lk.acquire(timeout=LEASE + 5)
    assert time.monotonic() - t_stop < LEASE + MARGIN
    assert lk.recovered and lk.fencing_token > token and not lk.lost
    # the paused process's other key stays unreleased while it is paused...
    time.sleep(max(0.0, t_stop + LEASE + 0.2 - time.monotonic()))  # (past its lease: the subject)
    assert not master.lock("untouched").locked()  # ...but nobody's: its holder's lease is gone
    wait_until(lambda: wid not in master.workers, 5, "the master to see the paused worker's lease run out")
    os.kill(pid, signal.SIGCONT)
    resumed.set()
    _, lost, other_lost, took, errors, other_locked = reports.get(timeout=10)
    assert lost and other_lost and took < 1.0
    assert errors == ["LockError", "LockError"]
    assert not other_locked
    assert [(r.key, r.pid) for r in master.held_locks()] == [(b"k", os.getpid())]
    # back with a new lease: the master lists it again
    wait_until(lambda: wid in master.workers and master.workers[wid].pid == pid, 5, "the worker listed again")
    mine = lk.fencing_token
    lk.release()
    _, ok, again, again_lost, again_recovered = reports.get(timeout=10)
    assert ok and again > mine and not again_lost and not again_recovered
    procs.join(pid)


# ---- Ctrl-C, and waiters that give up ---------------------------------------------------


def test_ctrl_c_interrupts_a_blocked_acquire(redis_server: RedisServer, procs: Procs, reports: Reports,
                                             worker_hubs: Any) -> None:
    """SIGINT to a process blocked in acquire(): KeyboardInterrupt at once,
    nothing held, out of the key's queue; the process can acquire again, and
    the holder's release goes straight to the next waiter."""
    url = redis_server.url("ctrlc")
    hub = worker_hubs(url, lease=LEASE)
    lk = hub.lock("k")
    assert lk.acquire()
    again = MP.Event()

    def waiter() -> None:
        h = connect(url, lease=LEASE)
        w = h.lock("k")
        reports.put("waiting")
        try:
            w.acquire(timeout=30)
            reports.put("acquired?!")
        except KeyboardInterrupt:
            reports.put("interrupted", time.monotonic(), [r.pid for r in h.held_locks()])
        assert again.wait(20)
        ok = w.acquire(timeout=10)
        reports.put("again", ok, time.monotonic())
        w.release()
        h.close()

    pid = procs.start(waiter)
    assert reports.get() == ("waiting",)
    wait_blocked_clients(redis_server, 1)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGINT)
    what, t_int, holders = reports.get()
    assert what == "interrupted" and holders == [os.getpid()]
    assert t_int - t0 < 0.2, f"Ctrl-C took {t_int - t0:.3f} s"
    assert [r.pid for r in hub.held_locks()] == [os.getpid()]
    r = redis_server.client()
    queue = b"{ch:ctrlc}:queue:k"
    assert r.llen(queue) == 0  # (the interrupted waiter left it)
    again.set()
    wait_blocked_clients(redis_server, 1)
    t_rel = time.monotonic()
    lk.release()
    _, ok, t_got = reports.get()
    assert ok and t_got - t_rel < 0.1
    procs.join(pid)
    # nothing is left of the key (a wake-up list is emptied by its BLPOP)
    assert r.keys(b"{ch:ctrlc}:lock:*") == r.keys(b"{ch:ctrlc}:queue:*") == r.keys(b"{ch:ctrlc}:wake:*") == []
    r.close()


def _handed_then(action: Callable[[], None]) -> Callable[[clusterhub.Hub], None]:
    """Make ``hub``'s waits run ``action`` right after BLPOP returned the
    key handed to it (before acquire() returns)."""

    def patch(hub: clusterhub.Hub) -> None:
        link = hub._link  # type: ignore[attr-defined]
        real = link.handed

        def handed(key: bytes, acq: bytes, got: Any) -> Any:
            h = real(key, acq, got)
            if h is not None:
                action()
            return h

        link.handed = handed

    return patch


@pytest.mark.parametrize("how", ["ctrl-c-when-handed", "cancelled-when-handed", "ctrl-c-while-queued",
                                 "timeout-while-queued"])
def test_a_waiter_that_gives_up_passes_the_key_on(how: str, redis_server: RedisServer, procs: Procs,
                                                  reports: Reports, worker_hubs: Any) -> None:
    """Two waiting processes, A queued first (so the release hands the key
    to A), then B.  A gives up: right after the key was handed to it, by
    Ctrl-C (a real SIGINT) or (asyncio) its task cancelled; or before the
    release, by Ctrl-C or its timeout.  B must get the key at once after the
    release: with a 3 s lease a key handed to a waiter that is gone, or
    queued for one, would cost B seconds (or for ever: A's process lives)."""
    url = redis_server.url("pass")
    lease = 3.0
    holder = worker_hubs(url, lease=lease)
    lk = holder.lock("k")
    assert lk.acquire()
    handed = how.endswith("-when-handed")

    def sigint_self() -> None:
        reports.put("handed")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # (KeyboardInterrupt ends this at once)

    def waiter_a() -> None:
        h = connect(url, lease=lease)
        w = h.lock("k")
        if how == "cancelled-when-handed":

            async def main() -> None:
                client = h._link.aio(asyncio.get_running_loop())[0]  # type: ignore[attr-defined]
                real = client.blpop

                async def blpop(*a: Any, **kw: Any) -> Any:
                    got = await real(*a, **kw)
                    if got is not None:
                        reports.put("handed")
                        asyncio.current_task().cancel()  # type: ignore[union-attr]
                        await asyncio.sleep(5)
                    return got

                client.blpop = blpop
                reports.put("waiting")
                try:
                    await w.acquire_async(timeout=30)
                    reports.put("acquired?!")
                except asyncio.CancelledError:
                    reports.put("gave up", "cancelled")

            asyncio.run(main())
        else:
            if handed:
                _handed_then(sigint_self)(h)
            reports.put("waiting")
            try:
                ok = w.acquire(timeout=1.0 if how == "timeout-while-queued" else 30)
                reports.put("gave up", f"acquire returned {ok}")
            except KeyboardInterrupt:
                reports.put("gave up", "interrupted")
        h.close()

    def waiter_b() -> None:
        h = connect(url, lease=lease)
        w = h.lock("k")
        reports.put("waiting")
        ok = w.acquire(timeout=30)
        reports.put("got", ok, time.monotonic())
        w.release()
        h.close()

    a = procs.start(waiter_a)
    assert reports.get() == ("waiting",)
    wait_blocked_clients(redis_server, 1)
    b = procs.start(waiter_b)
    assert reports.get() == ("waiting",)
    wait_blocked_clients(redis_server, 2)
    r = redis_server.client()
    assert len(r.lrange(b"{ch:pass}:queue:k", 0, -1)) == 2

    if handed:
        t_rel = time.monotonic()
        lk.release()
        assert reports.get() == ("handed",)  # the release handed A the key
        # (A passes the key on before it reports: either report may come first)
        got = {x[0]: x[1:] for x in reports.get_n(2, timeout=10)}
        assert got["gave up"] == ("cancelled" if how.startswith("cancelled") else "interrupted",)
        ok, t_got = got["got"]
    else:
        if how == "ctrl-c-while-queued":
            os.kill(a, signal.SIGINT)
        assert reports.get(timeout=10) == ("gave up", "interrupted" if how.startswith("ctrl-c")
                                           else "acquire returned False")
        assert len(r.lrange(b"{ch:pass}:queue:k", 0, -1)) == 1  # only B waits
        t_rel = time.monotonic()
        lk.release()
        _, ok, t_got = reports.get(timeout=10)
    assert ok and t_got - t_rel < 0.1, f"B got the key {t_got - t_rel:.3f} s after the release ({how})"
    procs.join(a)
    procs.join(b)
    r.close()


# ---- the server killed and restarted ----------------------------------------------------


def test_server_killed_and_restarted(redis_server: RedisServer, master: clusterhub.Hub, procs: Procs,
                                     reports: Reports, caplog: pytest.LogCaptureFixture) -> None:
    """While the server is down, calls raise ConnectError (a HubError); once
    it is back they work: every lock held before is lost (release raises
    LockError), tokens keep increasing (the counter is re-seeded from the
    server's clock), a key taken right after the restart is exclusive, and
    the live worker is not reported dead."""
    url = redis_server.url("t")
    checked, go, leave = MP.Event(), MP.Event(), MP.Event()
    exited: list[int] = []
    master.on_exit(lambda w: exited.append(w.id))

    def worker() -> None:
        hub = connect(url, lease=10.0)  # (renewed every 1 s: the master must give it time after a restart)
        lk = hub.lock("w")
        assert lk.acquire()
        reports.put("held", hub.worker_id, lk.fencing_token)
        assert checked.wait(30)
        t0 = time.monotonic()
        while not lk.lost and time.monotonic() - t0 < 5:
            time.sleep(0.005)  # (set by the renewer: no event to wait on)
        try:
            lk.release()
            err = None
        except LockError as e:
            err = type(e).__name__
        reports.put("after", lk.lost, err)
        assert go.wait(30)
        z = hub.lock("z")
        ok = z.acquire(timeout=0.5)  # the master took "z" right after the restart
        reports.put("z", ok)
        assert leave.wait(30)
        hub.close()

    pid = procs.start(worker)
    _, wid, wtoken = reports.get()
    wait_joined(master, wid)
    lm = master.lock("m")
    assert lm.acquire()
    mtoken = lm.fencing_token

    redis_server.kill()
    for call in (lambda: master.lock("x").acquire(timeout=1), master.held_locks, lambda: master.lock("x").locked()):
        with pytest.raises(ConnectError) as e:
            call()
        assert isinstance(e.value, HubError)
    redis_server.restart()
    t_back = time.monotonic()

    t0 = time.monotonic()
    with master.lock("z") as z:  # right away (before the renewer noticed the restart, often)
        # (the server lost its scripts too: loading them again is all it costs)
        assert time.monotonic() - t0 < 0.3, f"the first acquire after the restart took {time.monotonic() - t0:.3f} s"
        assert z.fencing_token > max(wtoken, mtoken) and not z.recovered
        go_after = time.monotonic()
        checked.set()
        _, lost, err = reports.get(timeout=10)
        assert lost and err == "LockError"
        go.set()
        assert reports.get(timeout=10) == ("z", False), "the worker took a key the master held"
        assert time.monotonic() - go_after < 5
    wait_until(lambda: lm.lost, 5, "the master's lock lost")
    with pytest.raises(LockError):
        lm.release()
    with lm as held:
        assert held.fencing_token > z.fencing_token and not held.lost
    time.sleep(max(0.0, t_back + 2 * LEASE - time.monotonic()))  # (past the leases the restart took: the subject)
    assert exited == [] and wid in master.workers  # (alive all along)
    leave.set()
    procs.join(pid)
    assert master.join(timeout=5) and exited == [wid]
    warnings = [r.getMessage() for r in caplog.records if r.name == "clusterhub"]
    assert any("restarted" in m for m in warnings), warnings


def test_a_key_taken_right_after_a_restart_is_exclusive(redis_server: RedisServer, procs: Procs, reports: Reports,
                                                       worker_hubs: Any) -> None:
    """Right after a restart, before the renewers (every 0.5 s: lease 5 s)
    took new leases: a key taken then is not free for another process, as it
    would be if taken under a lease the server no longer has."""
    url = redis_server.url("fresh")
    hub = worker_hubs(url, lease=5.0)
    go = MP.Event()

    def other() -> None:
        h = connect(url, lease=5.0)
        reports.put("ready")
        assert go.wait(30)
        w = h.lock("z")
        ok = w.acquire(timeout=0.2)
        reports.put("z", ok, w.recovered)
        if ok:
            w.release()
        h.close()

    pid = procs.start(other)
    assert reports.get() == ("ready",)
    redis_server.restart()
    with hub.lock("z") as z:
        assert not z.recovered and not z.lost
        go.set()
        assert reports.get(timeout=10) == ("z", False, False), "another process took a held key"
    procs.join(pid)


def test_release_during_an_outage_completes_later(redis_servers: Callable[..., RedisServer], procs: Procs,
                                                  reports: Reports, worker_hubs: Any) -> None:
    """With a persistent server: a release whose reply never came (the
    server was down) is finished by the renewer once the server is back, so
    the key is free for the others (not held for as long as we live)."""
    server = redis_servers(extra=("--appendonly", "yes", "--appendfsync", "always"))
    url = server.url("aof")
    hub = worker_hubs(url, lease=LEASE)
    lk = hub.lock("p")
    assert lk.acquire()
    server.kill()
    with pytest.raises(ConnectError):
        lk.release()
    server.restart()
    assert server.client().get(b"{ch:aof}:fence") is not None  # (the data persisted)

    def taker() -> None:
        h = connect(url, lease=LEASE)
        w = h.lock("p")
        t0 = time.monotonic()
        ok = w.acquire(timeout=5 * LEASE)
        reports.put("got", ok, time.monotonic() - t0, w.recovered)
        w.release()
        h.close()

    pid = procs.start(taker)
    _, ok, took, recovered = reports.get(timeout=15)
    assert ok and not recovered and took < LEASE
    procs.join(pid)
    assert lk.acquire(timeout=5)
    lk.release()


def test_close_quietly_while_server_down(redis_server: RedisServer, worker_hubs: Any) -> None:
    """close() with the server gone returns (the lease runs out by itself)."""
    hub = worker_hubs(redis_server.url("down"), lease=LEASE)
    redis_server.kill()
    t0 = time.monotonic()
    hub.close()
    assert time.monotonic() - t0 < 2


def test_a_master_paused_past_its_lease_and_replaced(redis_server: RedisServer, procs: Procs, reports: Reports,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A master paused past its lease loses the name to a new master; when
    it resumes, its own locks still work (a new holding is not lost at its
    next renewal), and it says so once rather than at every renewal."""
    url = redis_server.url("twice")
    resumed = MP.Event()

    def old_master() -> None:
        import logging

        records: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                records.append(record.getMessage())

        logging.getLogger("clusterhub").addHandler(Keep())
        hub = clusterhub.Hub(address=url, lease=LEASE)
        reports.put("master")
        assert resumed.wait(30)
        lk = hub.lock("k")
        assert lk.acquire(timeout=10)
        time.sleep(5 * LEASE / 10)  # (five renewals: the subject)
        reports.put("after", lk.lost, hub.is_master, len(records))
        lk.release()
        hub.close()

    pid = procs.start(old_master)
    assert reports.get() == ("master",)
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    new = wait_until(lambda: _try_master(url), LEASE + 5, "the name free again")
    assert time.monotonic() - t0 < LEASE + MARGIN
    try:
        os.kill(pid, signal.SIGCONT)
        resumed.set()
        _, lost, is_master, n_logged = reports.get(timeout=10)
        assert not lost
        assert n_logged <= 3
        procs.join(pid)
    finally:
        new.close()


def _try_master(url: str) -> Any:
    try:
        return clusterhub.Hub(address=url, lease=LEASE)
    except clusterhub.AddressInUse:
        return None


def test_lost_by_our_own_clock_while_the_server_cannot_answer(redis_server: RedisServer) -> None:
    """A holder cut off from the server (here: the server is stopped) longer
    than its lease reads ``lost`` before the server can tell it so, and its
    release then raises LockError, even though nobody took the key."""
    lease = 0.5
    hub = clusterhub.Hub(address=redis_server.url("own-clock"), lease=lease)
    lk = hub.lock("k")
    assert lk.acquire(timeout=5)
    assert not lk.lost
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        time.sleep(lease * 1.6)  # (time is the subject: the lease runs out unrenewed)
        assert lk.lost
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    with pytest.raises(LockError, match="lost"):
        lk.release()
    assert lk.lost
    hub.close()


def _in_syscall(pid: int, numbers: tuple[int, ...]) -> bool:
    """Whether the process's main thread is blocked in one of these system
    calls (``/proc/<pid>/syscall``, x86_64 numbers)."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return False
    return first.isdigit() and int(first) in numbers


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads x86_64 system call numbers")
def test_ctrl_c_during_a_release_does_not_keep_the_key(redis_server: RedisServer, procs: Procs,
                                                       reports: Reports) -> None:
    """A holder interrupted (a real SIGINT) while its release waits for the
    server's reply (here: the server is stopped) lives on: its renewer
    finishes the release once the server answers, and the waiting process
    gets the key within a few renewals, not recovered (the holder's lease
    never ran out)."""
    url = redis_server.url("relint")
    go, done = MP.Event(), MP.Event()

    def holder() -> None:
        hub = connect(url, lease=3.0)  # (renewed every 0.3 s)
        lk = hub.lock("k")
        assert lk.acquire()
        reports.put("held")
        assert go.wait(20)
        try:
            lk.release()
            reports.put("released?!")
        except KeyboardInterrupt:
            reports.put("interrupted")
        assert done.wait(20)
        hub.close()

    def waiter() -> None:
        hub = connect(url, lease=3.0)
        lk = hub.lock("k")
        reports.put("waiting")
        ok = lk.acquire(timeout=20)
        reports.put("got", ok, time.monotonic(), lk.recovered)
        if ok:
            lk.release()
        hub.close()

    h = procs.start(holder)
    assert reports.get() == ("held",)
    procs.start(waiter)
    assert reports.get() == ("waiting",)
    wait_blocked_clients(redis_server, 1)
    os.kill(redis_server.pid, signal.SIGSTOP)
    try:
        go.set()
        # the holder's main thread waits for the release's reply (poll, or recvfrom)
        wait_until(lambda: _in_syscall(h, (7, 45)), 5, "the holder waiting for its release's reply")
        os.kill(h, signal.SIGINT)
        assert reports.get(timeout=10) == ("interrupted",)
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    t_back = time.monotonic()
    _, ok, t_got, recovered = reports.get(timeout=10)
    assert ok and not recovered
    assert t_got - t_back < 1.5, f"the waiter got the key {t_got - t_back:.2f} s after the server came back"
    done.set()
    procs.join(h)
