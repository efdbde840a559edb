"""Global locks across processes on every transport: mutual exclusion, lock
timeouts while another process holds the key, a dead holder's lock recovered
once, a killed waiter harming no one, and held_locks()/locked() seeing every
process's holds.

Processes are sequenced with pipes (the ``reports`` fixture), events and the
locks themselves; a test sleeps only where time is its subject (a timeout),
and polls only kernel state that has no wake-up of its own (a process blocked
in the futex call), always with a bound.
"""

from __future__ import annotations

import faulthandler
import mmap
import os
import resource
import signal
import threading
import time
from typing import Any, Callable

import pytest

from clusterhub import LockTimeout

from conftest import in_thread, mine

pytestmark = pytest.mark.timeout(30)


def assert_false(v: bool) -> None:
    assert v is False


def assert_true(v: bool) -> None:
    assert v is True


# ---- mutual exclusion ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_counter_exact_across_processes_and_threads(cluster):
    """A non-atomic read-yield-write increment under ``with hub.lock("c")`` by 3
    processes x 2 threads loses no update."""
    hub = cluster.hub
    n = 250
    mem = mmap.mmap(-1, 8)  # MAP_SHARED: the workers see the same page

    def bump(hub) -> None:
        lk = hub.lock("c")
        for _ in range(n):
            with lk:
                v = int.from_bytes(mem[:8], "little")
                time.sleep(0)  # let the other thread and processes run mid-update
                mem[:8] = (v + 1).to_bytes(8, "little")

    def work(hub) -> None:
        threads = [threading.Thread(target=bump, args=(hub,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    workers = [cluster.start(work) for _ in range(3)]
    for w in workers:
        cluster.join(w, timeout=45)
    assert int.from_bytes(mem[:8], "little") == 3 * 2 * n
    assert hub.held_locks() == []


# ---- deaths ------------------------------------------------------------------------


def _die(how: str) -> None:
    if how == "sigkill":
        threading.Event().wait()  # the master kills us
    elif how == "os_exit":
        os._exit(3)
    elif how == "exception":
        raise RuntimeError("worker died holding a lock (expected by the test)")
    elif how == "sigsegv":
        faulthandler.disable()  # pytest enables it: no traceback dump, just die
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)


_EXIT = {"sigkill": -signal.SIGKILL, "os_exit": 3, "exception": 1, "sigsegv": -signal.SIGSEGV}


@pytest.mark.parametrize("how", sorted(_EXIT))
def test_holder_death_is_recovered_once(cluster, reports, how):
    """A worker that dies holding a lock (SIGKILL, os._exit, an uncaught
    exception, SIGSEGV) loses it: the next acquirer gets it with recovered
    True, the one after (another process) with False, for several rounds."""
    hub = cluster.hub
    lk = hub.lock("dead", timeout=10)

    def hold_and_die(hub) -> None:
        assert hub.lock("dead").acquire(timeout=10)
        reports.put("held", os.getpid())
        _die(how)

    def acquire_once(hub) -> None:
        with hub.lock("dead", timeout=10) as held:
            reports.put("next", held.recovered)

    for _ in range(2):
        w = cluster.start(hold_and_die)
        assert reports.get() == ("held", w.pid)
        if how == "sigkill":
            cluster.kill(w)
        cluster.join(w, _EXIT[how])
        with lk as held:
            assert held.recovered
            assert mine(hub) == [b"dead"]
        cluster.join(cluster.start(acquire_once))
        assert reports.get() == ("next", False)
        with lk:
            assert not lk.recovered
    assert hub.held_locks() == []


def test_killed_waiter_harms_no_one(cluster, reports):
    """A process SIGKILLed while blocked waiting for a lock affects no one: when
    the holder releases, another waiter gets it, not recovered."""
    hub = cluster.hub
    lk = hub.lock("w")
    assert lk.acquire(timeout=0)

    def wait_forever(hub) -> None:
        reports.put("waiting")
        hub.lock("w").acquire(timeout=None)
        reports.put("acquired?!")

    def wait_and_report(hub) -> None:
        reports.put("waiting")
        with hub.lock("w", timeout=10) as held:
            reports.put("got", held.recovered)

    a = cluster.start(wait_forever)
    b = cluster.start(wait_and_report)
    assert reports.get_n(2) == [("waiting",), ("waiting",)]
    cluster.wait_blocked(a.pid)
    cluster.wait_blocked(b.pid)
    cluster.kill(a)
    cluster.join(a, -signal.SIGKILL)
    lk.release()
    assert reports.get() == ("got", False)
    cluster.join(b)
    with lk:
        assert not lk.recovered
    assert hub.held_locks() == []


# ---- timeouts ----------------------------------------------------------------------


def test_timeouts(cluster, reports, event):
    """While another process holds the key: ``with`` on a handle with a timeout
    raises LockTimeout (a TimeoutError), acquire(timeout=t) returns False after
    about t, the handle's timeout is the default of both, and
    acquire(timeout=None) waits without limit."""
    hub = cluster.hub
    assert issubclass(LockTimeout, TimeoutError)
    release = event()

    def hold(hub) -> None:
        with hub.lock("t"):
            reports.put("held")
            release.wait(20)
            time.sleep(0.5)  # the subject is time: release well after the 0.2 s default

    w = cluster.start(hold)
    assert reports.get() == ("held",)
    lk = hub.lock("t", timeout=0.2)

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.monotonic()
        fn()
        return time.monotonic() - t0

    def with_lk() -> None:
        with pytest.raises(LockTimeout):
            with lk:
                pytest.fail("acquired a lock another process holds")

    def with_fresh() -> None:
        with pytest.raises(TimeoutError):
            with hub.lock("t", timeout=0.2):
                pytest.fail("acquired a lock another process holds")

    assert 0.2 <= timed(with_lk) < 1.0
    assert 0.2 <= timed(with_fresh) < 1.0
    assert 0.2 <= timed(lambda: assert_false(lk.acquire())) < 1.0  # the handle's default
    assert 0.3 <= timed(lambda: assert_false(lk.acquire(timeout=0.3))) < 1.0
    assert timed(lambda: assert_false(hub.lock("t").acquire(timeout=0))) < 0.2
    assert not lk.recovered
    release.set()
    assert timed(lambda: assert_true(lk.acquire(timeout=None))) >= 0.4
    lk.release()
    cluster.join(w)


# ---- held_locks() and locked() -----------------------------------------------------


def test_held_locks_lists_master_and_worker_holders(cluster, reports, event):
    """held_locks() gives one (key bytes, pid, worker_id) named tuple per held
    key, worker_id None for the master; empty when nothing is held."""
    hub = cluster.hub
    assert hub.held_locks() == []
    release = event()

    def hold(hub) -> None:
        with hub.lock(b"by-worker"):
            reports.put("held", [tuple(h) for h in hub.held_locks()])
            release.wait(20)

    with hub.lock("by-master"):
        w = cluster.start(hold)
        tag, seen_by_worker = reports.get()
        held = sorted(hub.held_locks())
        expected = sorted([(b"by-master", os.getpid(), None), (b"by-worker", w.pid, w.id)])
        assert [tuple(h) for h in held] == expected
        assert sorted(seen_by_worker) == expected
        h = held[0]
        assert (h.key, h.pid, h.worker_id) == (b"by-master", os.getpid(), None)
        assert isinstance(h, tuple) and h._fields == ("key", "pid", "worker_id")
    release.set()
    cluster.join(w)
    assert hub.held_locks() == []


def test_locked_is_a_snapshot_that_never_takes_the_lock(cluster, reports, event):
    """locked() is True while any process holds the key and False after; with
    a dead holder it is False and leaves the recovery to the next acquirer."""
    hub = cluster.hub
    lk = hub.lock("snap")
    assert not lk.locked()  # never used
    with lk:
        assert lk.locked()
        assert in_thread(lk.locked)
    assert not lk.locked()
    release = event()

    def hold(hub, then: str) -> None:
        assert hub.lock("snap").acquire(timeout=5)
        reports.put("held")
        if then == "release":
            release.wait(20)
            hub.lock("snap").release()
        else:
            threading.Event().wait()

    w = cluster.start(hold, "release")
    assert reports.get() == ("held",)
    assert lk.locked() and hub.lock("snap", timeout=3).locked()
    release.set()
    cluster.join(w)
    assert not lk.locked()

    w = cluster.start(hold, "die")
    assert reports.get() == ("held",)
    assert lk.locked()
    cluster.kill(w)
    cluster.join(w, -signal.SIGKILL)
    for _ in range(3):
        assert not lk.locked()
    assert hub.held_locks() == []
    with hub.lock("snap", timeout=5) as held:
        assert held.recovered
