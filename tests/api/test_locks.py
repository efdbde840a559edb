"""Global locks through the public API with forked workers: ``hub.lock()``
handles shared by threads (a holding thread's exit, misuse raising LockError,
a full table, many keys through a small table), timeout arguments, Ctrl-C in
a blocked acquire, what a fork inherits, ``recovered`` per thread, the
threading.Lock ``acquire`` forms, and their interaction with ``close()``.
What every transport must do with locks across processes (mutual exclusion,
timeouts, a dead holder's recovery, held_locks and locked) is in
tests/conformance/test_locks.py; the C fast paths of the handles are in
tests/core/test_lock_handle.py.

Processes and threads are sequenced with pipes (the ``reports`` fixture), events
and the locks themselves; a test sleeps only where time is its subject (a
timeout), and polls only kernel state that has no wake-up of its own (a thread
blocked in the futex call, a dead thread's /proc entry), always with a bound.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import re
import signal
import threading
import time
from typing import Any, Callable

import pytest

import clusterhub
from clusterhub import HubClosedError, LockError, LockTableFull, LockTimeout

from conftest import (
    Holder,
    hold_in_worker,
    in_thread,
    join_ok,
    leave_dead_holder,
    mine,
    release_all,
    resolved,
    run_forked,
    wait_blocked,
    wait_task_gone,
    waitpid_bounded,
)

pytestmark = pytest.mark.timeout(30)


# ---- mutual exclusion ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_shared_handles_many_keys_tiny_table(make_hub):
    """Threads sharing the cached by-name handles of more keys than the table
    has slots (constant eviction and re-resolution) keep every key exclusive and
    never see a spurious LockError."""
    hub = make_hub(lock_slots=2)  # 2 to 4 slots for 6 keys
    keys = [f"k{i}" for i in range(6)]
    counts = {k: 0 for k in keys}
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            for i in range(1500):
                k = keys[(i * 7 + seed) % len(keys)]
                with hub.lock(k):
                    v = counts[k]
                    time.sleep(0)
                    counts[k] = v + 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert not errors, errors
    assert sum(counts.values()) == 4 * 1500
    assert hub.held_locks() == []


# ---- a holding thread's exit ------------------------------------------------------


@pytest.mark.parametrize("waiting", [False, True], ids=["after", "blocked"])
def test_thread_exit_while_holding_is_recovered(hub, waiting):
    """A thread that exits while holding loses the lock: the next acquirer in
    another thread (already blocked, or coming later) gets recovered True, the
    one after gets False."""
    lk = hub.lock("thread-exit")
    ready, leave = threading.Event(), threading.Event()
    tid: list[int] = []

    def hold_and_exit() -> None:
        tid.append(threading.get_native_id())
        assert lk.acquire(timeout=5)
        ready.set()
        leave.wait(10)

    t = threading.Thread(target=hold_and_exit)
    t.start()
    assert ready.wait(5)
    if waiting:
        nxt = Holder(lk)
        assert nxt.started.wait(5)
        wait_blocked(os.getpid(), nxt.tid)
        leave.set()
        assert nxt.result() == (True, True)
        nxt.finish()
    else:
        leave.set()
        t.join(5)
        wait_task_gone(tid[0])
        assert not lk.locked()  # a dead thread's lock is not held
        assert hub.held_locks() == []

        def take() -> bool:
            with lk:
                return lk.recovered

        assert in_thread(take) is True
    t.join(5)

    def take_again() -> bool:
        with lk:
            return lk.recovered

    assert in_thread(take_again) is False
    assert hub.held_locks() == []


# ---- timeouts ----------------------------------------------------------------------


def assert_false(v: bool) -> None:
    assert v is False


def test_timeout_arguments_are_validated(hub):
    """Bad timeouts raise TypeError/ValueError before anything is acquired."""
    with pytest.raises(ValueError):
        hub.lock("v", timeout=-1)
    with pytest.raises(TypeError):
        hub.lock("v", timeout="1")  # type: ignore[arg-type]
    lk = hub.lock("v")
    with pytest.raises(ValueError):
        lk.acquire(timeout=-0.5)
    with pytest.raises(TypeError):
        lk.acquire(timeout="soon")  # type: ignore[arg-type]
    assert not lk.locked()
    assert hub.held_locks() == []


def test_bad_timeout_on_a_recovered_lock_leaves_it_recoverable(hub, reports):
    """An acquire() with an invalid timeout (or a timeout beside blocking=False)
    raises without taking the lock, even when the lock waits for recovery from
    a dead holder."""

    def hold_and_die() -> None:
        assert hub.lock("bad-t").acquire(timeout=5)
        reports.put("held")
        os._exit(0)

    lk = hub.lock("bad-t")
    with lk:  # the handle knows the key's slot: its next acquire tries it at once
        pass
    join_ok(hub.fork(hold_and_die))
    assert reports.get() == ("held",)
    for bad in (lambda: lk.acquire(timeout=-2), lambda: lk.acquire(False, 1),
                lambda: lk.acquire(blocking=False, timeout=None)):
        with pytest.raises(ValueError):
            bad()
    assert hub.held_locks() == []
    with hub.lock("bad-t", timeout=5) as held:
        assert held.recovered


# ---- Ctrl-C ------------------------------------------------------------------------


def test_ctrl_c_interrupts_a_blocked_acquire(hub, reports, event):
    """SIGINT to a process blocked in acquire raises KeyboardInterrupt there
    within about 0.1 s (measured < 0.3 s) and leaves the lock not held by it."""
    lk = hub.lock("int")
    assert lk.acquire(timeout=0)
    go = event()

    def blocked() -> None:
        try:
            reports.put("waiting")
            hub.lock("int").acquire(timeout=None)
            reports.put("acquired?!")
        except KeyboardInterrupt:
            reports.put("interrupted", time.monotonic(), mine(hub))
        go.wait(10)
        reports.put("after", mine(hub))

    w = hub.fork(blocked)
    assert reports.get() == ("waiting",)
    wait_blocked(w.pid)
    t0 = time.monotonic()
    os.kill(w.pid, signal.SIGINT)
    tag, t1, held = reports.get()
    assert tag == "interrupted"
    assert t1 - t0 < 0.3
    assert held == []
    assert lk.locked()  # still ours
    lk.release()
    assert not lk.locked()
    assert lk.acquire(timeout=0)  # nobody else holds it
    lk.release()
    go.set()
    assert reports.get() == ("after", [])
    join_ok(w)
    assert hub.held_locks() == []


def test_ctrl_c_racing_a_release_leaves_nothing_held(hub, reports, event):
    """SIGINT that arrives while an acquire is blocked, just before the holder
    releases (so the wait ends holding the lock with the interrupt pending),
    still leaves the interrupted process holding nothing."""
    lk = hub.lock("race")
    for _ in range(3):
        assert lk.acquire(timeout=0)
        go = event()

        def blocked() -> None:
            try:
                reports.put("waiting")
                with hub.lock("race"):
                    reports.put("body")  # the interrupt may land here instead
                    go.wait(10)
            except KeyboardInterrupt:
                pass
            reports.put("after", mine(hub))
            go.wait(10)

        w = hub.fork(blocked)
        assert reports.get() == ("waiting",)
        wait_blocked(w.pid)
        os.kill(w.pid, signal.SIGINT)
        lk.release()
        item = reports.get()
        if item == ("body",):
            item = reports.get()
        assert item == ("after", [])
        assert lk.acquire(timeout=5)
        lk.release()
        go.set()
        join_ok(w)
    assert hub.held_locks() == []


def test_exception_in_with_body_releases(hub):
    """An exception in a ``with`` block releases the lock (no recovery for the
    next acquirer) and propagates."""
    lk = hub.lock("body")
    with pytest.raises(ZeroDivisionError):
        with lk as held:
            assert held is lk
            _ = 1 / 0
    assert not lk.locked()
    assert in_thread(lambda: lk.acquire(timeout=0) and (lk.recovered, lk.release())[0]) is False


# ---- misuse ------------------------------------------------------------------------


def test_reacquire_by_holder_raises(hub):
    """Acquiring a lock the thread already holds raises LockError at once
    (through the same or another handle, even without a timeout)."""
    lk = hub.lock("re")
    with lk:
        t0 = time.monotonic()
        with pytest.raises(LockError):
            lk.acquire()
        with pytest.raises(LockError):
            lk.acquire(timeout=None)
        with pytest.raises(LockError):
            with hub.lock("re", timeout=5):
                pass
        with pytest.raises(LockError):
            hub.lock(b"re").acquire()
        assert time.monotonic() - t0 < 1.0
        assert mine(hub) == [b"re"]
    assert hub.held_locks() == []


def test_release_not_held_raises(hub):
    """Releasing a lock this thread does not hold raises LockError: never
    acquired, already released, or held by another thread (which keeps it)."""
    lk = hub.lock("rel")
    with pytest.raises(LockError):
        lk.release()
    with lk:
        pass
    with pytest.raises(LockError):
        lk.release()
    other = Holder(lk)
    assert other.result() == (True, False)
    with pytest.raises(LockError):
        lk.release()
    with pytest.raises(LockError):
        hub.lock("rel", timeout=1).release()
    assert lk.locked()
    assert [(h.key, h.pid) for h in hub.held_locks()] == [(b"rel", os.getpid())]
    other.finish()
    assert not lk.locked()


def test_release_through_a_stale_handle_does_not_release_another_key(make_hub):
    """Releasing a key not held, through a handle whose slot has since been
    given to another key this thread holds, raises LockError and releases
    nothing."""
    hub = make_hub(lock_slots=1)  # at most 2 slots
    a = hub.lock("a", timeout=1)
    with a:
        pass
    for k in ("b", "c"):  # evict "a"
        with hub.lock(k):
            pass
    b, c = hub.lock("b"), hub.lock("c")
    assert b.acquire(timeout=0) and c.acquire(timeout=0)
    try:
        with pytest.raises(LockError):
            a.release()
        assert mine(hub) == [b"b", b"c"]
    finally:
        release_all([b, c])
    assert hub.held_locks() == []


def test_keys_of_255_bytes_and_a_str_as_its_utf8(hub):
    """Keys of 255 bytes (UTF-8 for str) can be held; a str and its UTF-8
    bytes name the same lock.  (Keys refused: test_bad_input.py.)"""
    for ok in ("x" * 255, b"y" * 255, "é" * 127):
        with hub.lock(ok) as held:
            assert held.locked()
            assert mine(hub) == [ok.encode() if isinstance(ok, str) else ok]
    with hub.lock("clé"):
        with pytest.raises(LockError):  # the same lock: held by this thread
            hub.lock("clé".encode()).acquire(timeout=0)
        assert in_thread(lambda: hub.lock(b"cl\xc3\xa9").acquire(timeout=0)) is False
        assert hub.lock(b"cl\xc3\xa9").locked()
        assert mine(hub) == [b"cl\xc3\xa9"]
    assert hub.held_locks() == []


def test_at_most_1024_held_per_thread(make_hub):
    """One thread holds at most 1024 locks: the 1025th acquire raises LockError
    (not LockTableFull, not a hang); another thread may still take it; all of
    them can be released."""
    hub = make_hub(lock_slots=1100)
    handles = [hub.lock(f"h{i}") for i in range(1024)]
    try:
        _hold_1024(hub, handles)
    finally:
        release_all(handles)
    assert hub.held_locks() == []


def _hold_1024(hub: clusterhub.Hub, handles: list[clusterhub.Lock]) -> None:
    for lk in handles:
        assert lk.acquire(timeout=0)
    extra = hub.lock("h1024")
    for attempt in (lambda: extra.acquire(timeout=0), lambda: extra.acquire(), extra.__enter__):
        with pytest.raises(LockError) as info:
            attempt()
        assert not isinstance(info.value, LockTableFull)
    assert in_thread(lambda: extra.acquire(timeout=0) and (extra.release() or True))
    with pytest.raises(LockError):  # the key is in the table now: the limit still holds
        hub.lock("h1024").acquire(timeout=None)
    assert len(hub.held_locks()) == 1024
    handles[0].release()
    assert extra.acquire(timeout=0)  # room for one again
    extra.release()
    for lk in handles[1:]:
        lk.release()


def test_table_full_raises_and_never_hangs(make_hub):
    """With Hub(lock_slots=4), between 4 and 8 distinct keys can be held at
    once; acquiring one more raises LockTableFull promptly (even without a
    timeout), waiting on a held key still works, and capacity returns after
    the holders release."""
    hub = make_hub(lock_slots=4)
    holders: list[Holder] = []
    try:
        while True:
            h = Holder(hub.lock(f"full-{len(holders)}"), timeout=None)
            t0 = time.monotonic()
            r = h.result()
            assert time.monotonic() - t0 < 2.0
            if isinstance(r, BaseException):
                assert isinstance(r, LockTableFull), r
                h.thread.join(5)
                break
            assert r == (True, False)
            holders.append(h)
            assert len(holders) <= 8
        assert 4 <= len(holders) <= 8
        assert len(hub.held_locks()) == len(holders)
        with pytest.raises(LockTableFull):
            hub.lock("one-more").acquire(timeout=0)
        # A key already in the table needs no new slot: that acquire just times out.
        assert hub.lock("full-0").acquire(timeout=0.05) is False
    finally:
        for h in holders:
            h.finish()
    assert hub.held_locks() == []
    for i in range(8):
        with hub.lock(f"again-{i}", timeout=1):
            pass


def test_close_refused_while_held_or_waited_on(make_hub, reports, event):
    """close() raises LockError and leaves the hub open and usable while a
    thread of this process holds one of its locks, or waits for one."""
    hub = make_hub()
    lk = hub.lock("busy")
    holder = Holder(lk)
    assert holder.result() == (True, False)
    with pytest.raises(LockError):
        hub.close()
    assert mine(hub) == [b"busy"]
    with hub.lock("other", timeout=1):  # still usable
        pass
    holder.finish()

    release = event()

    def hold() -> None:
        with hub.lock("busy"):
            reports.put("held")
            release.wait(20)

    w = hub.fork(hold)
    assert reports.get() == ("held",)
    waiter = Holder(lk, timeout=20)
    assert waiter.started.wait(5)
    wait_blocked(os.getpid(), waiter.tid)
    with pytest.raises(LockError):
        hub.close()
    assert w.is_alive()  # the refused close() did not stop the workers
    release.set()
    assert waiter.result() == (True, False)
    waiter.finish()
    join_ok(w)
    hub.close()


def test_kept_handle_after_close_raises(make_hub):
    """After close() a kept handle raises HubClosedError from every call and
    never reaches the lock table of a hub made later in the process."""
    hub = make_hub()
    lk = hub.lock("kept")
    unresolved = hub.lock("never-used", timeout=1)
    with lk:
        pass
    hub.close()
    for h in (lk, unresolved):
        with pytest.raises(HubClosedError):
            h.acquire()
        with pytest.raises(HubClosedError):
            h.acquire(timeout=0)
        with pytest.raises(HubClosedError):
            h.release()
        with pytest.raises(HubClosedError):
            h.locked()
        with pytest.raises(HubClosedError):
            with h:
                pass
    with pytest.raises(HubClosedError):
        hub.lock("kept")
    with pytest.raises(HubClosedError):
        hub.held_locks()

    later = make_hub()
    for k in ("kept", "x", "y"):  # occupy the slots the old handle pointed at
        with later.lock(k):
            pass
    with later.lock("kept"):
        with pytest.raises(HubClosedError):
            lk.acquire(timeout=0)
        with pytest.raises(HubClosedError):
            lk.release()
        assert mine(later) == [b"kept"]
    with pytest.raises(HubClosedError):
        lk.acquire(timeout=0)
    assert later.held_locks() == []


# ---- many keys ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_many_distinct_keys_through_a_small_table(make_hub, reports):
    """20,000 distinct keys over the hub's life pass through a table of
    lock_slots=8, quickly, while a worker churns keys of its own."""
    hub = make_hub(lock_slots=8)

    def churn() -> None:
        for i in range(5000):
            with hub.lock(f"w-{i}", timeout=10):
                pass
        reports.put("done")

    w = hub.fork(churn)
    t0 = time.monotonic()
    pinned = hub.lock("pinned")
    for i in range(20_000):
        if i % 1000 == 0:  # sometimes hold two at once
            pinned.acquire(timeout=10)
        with hub.lock(f"key-{i}", timeout=10):
            pass
        if i % 1000 == 1:
            pinned.release()
    assert time.monotonic() - t0 < 15.0
    assert reports.get(30) == ("done",)
    join_ok(w)
    assert hub.held_locks() == []


# ---- fork, and recovered per thread -------------------------------------------------


def test_worker_forked_while_master_holds_does_not_hold(hub, reports):
    """A worker forked while the master holds a lock does not hold it: its
    acquire times out, its release raises LockError, and the master keeps it."""
    lk = hub.lock("forked")
    with lk:

        def work() -> None:
            lk2 = hub.lock("forked")
            t0 = time.monotonic()
            got = lk.acquire(timeout=0.2)
            waited = time.monotonic() - t0
            try:
                lk.release()
                released = "released?!"
            except LockError:
                released = "LockError"
            reports.put(got, waited >= 0.2, released, lk2.locked(), mine(hub))

        w = hub.fork(work)
        assert reports.get() == (False, True, "LockError", True, [])
        join_ok(w)
        assert lk.locked()
        assert mine(hub) == [b"forked"]
    assert hub.held_locks() == []


def test_recovered_is_per_thread(hub, reports):
    """A handle shared between threads reports recovered for each thread's own
    latest acquire."""
    lk = hub.lock("per-thread")

    def hold_and_die() -> None:
        assert hub.lock("per-thread").acquire(timeout=5)
        reports.put("held")
        os._exit(0)

    join_ok(hub.fork(hold_and_die))
    assert reports.get() == ("held",)
    a_done, b_done = threading.Event(), threading.Event()

    def a() -> tuple[bool, bool]:
        with lk:
            first = lk.recovered
        a_done.set()
        assert b_done.wait(10)
        return first, lk.recovered  # unchanged by b's later acquire

    def b() -> tuple[bool, bool]:
        assert a_done.wait(10)
        with lk:
            got = lk.recovered
        b_done.set()
        return got, lk.recovered

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        fa, fb = ex.submit(a), ex.submit(b)
        assert fa.result(10) == (True, True)
        assert fb.result(10) == (False, False)
    assert not lk.recovered  # this thread never acquired


_FAILED_ACQUIRES: dict[str, Callable[[clusterhub.Lock], None]] = {
    "timeout": lambda lk: assert_false(lk.acquire(timeout=0.05)),
    "no-wait": lambda lk: assert_false(lk.acquire(timeout=0)),
    "default": lambda lk: assert_false(lk.acquire()),  # the handle's 0.05 s
    "with": lambda lk: pytest.raises(LockTimeout, lk.__enter__),
}


@pytest.mark.parametrize("fail", sorted(_FAILED_ACQUIRES))
def test_recovered_is_false_after_a_failed_acquire(hub, reports, event, fail):
    """A thread whose latest acquire recovered reads recovered False once its
    next acquire through the handle fails (timeout, no-wait miss, the
    handle's default timeout, ``with`` raising LockTimeout)."""
    lk = hub.lock("rec-fail", timeout=0.05)
    leave_dead_holder(hub, reports, "rec-fail")
    assert lk.acquire(timeout=5) and lk.recovered
    lk.release()
    assert lk.recovered  # until this thread's next acquire
    release = event()
    w = hold_in_worker(hub, reports, release, "rec-fail")
    _FAILED_ACQUIRES[fail](lk)
    assert not lk.recovered
    release.set()
    join_ok(w)
    assert hub.held_locks() == []


def test_recovered_is_not_inherited_through_a_reused_thread_ident(hub, reports):
    """A thread that gets the ident of an exited thread whose latest acquire
    recovered has acquired nothing: it reads recovered False; and the exited
    thread's entry is gone from the handle."""
    lk = hub.lock("rec-ident")
    leave_dead_holder(hub, reports, "rec-ident")

    def recover() -> int:
        with lk:
            assert lk.recovered
        assert lk.recovered  # this thread's latest acquire recovered; now it exits
        return threading.get_ident()

    first = in_thread(recover)
    seen: list[tuple[bool, bool]] = []
    for _ in range(200):  # glibc hands the next thread the exited one's stack, and ident
        seen.append(in_thread(lambda: (threading.get_ident() == first, lk.recovered)))
        if seen[-1][0]:
            break
    else:
        pytest.skip("no thread reused the exited thread's ident")
    assert [rec for _, rec in seen] == [False] * len(seen)
    assert not lk.recovered  # nor the test's thread, which never acquired
    assert len(lk._rec) == 0  # the exited thread's entry went with it


def test_recovered_is_false_in_a_forked_child(hub, reports):
    """The forking thread's recovered does not carry into a fork child: a
    worker (or a plain forked child) of a thread whose latest acquire
    recovered reads False, the forking thread still True."""
    lk = hub.lock("rec-fork")
    leave_dead_holder(hub, reports, "rec-fork")
    with lk:
        assert lk.recovered
    assert lk.recovered

    def child() -> None:
        reports.put("child", lk.recovered, hub.lock("rec-fork").recovered)

    join_ok(hub.fork(child))
    assert reports.get() == ("child", False, False)
    pid = run_forked(lambda: reports.put("plain", lk.recovered))
    assert waitpid_bounded(pid, 10) == 0
    assert reports.get() == ("plain", False)
    assert lk.recovered  # the parent's thread keeps its own
    assert hub.held_locks() == []


# ---- threading.Lock's acquire(blocking, timeout) forms ------------------------------


def test_threading_acquire_forms_on_a_free_lock(hub):
    """Every threading.Lock.acquire form takes a free lock at once and returns
    True (blocking as bool or keyword, timeout -1 or None for no limit)."""
    lk = hub.lock("forms-free", timeout=0.2)
    forms: list[Callable[[], Any]] = [
        lambda: lk.acquire(False), lambda: lk.acquire(True), lambda: lk.acquire(blocking=False),
        lambda: lk.acquire(blocking=True), lambda: lk.acquire(blocking=0),
        lambda: lk.acquire(True, 2.0), lambda: lk.acquire(True, -1), lambda: lk.acquire(False, -1),
        lambda: lk.acquire(True, None), lambda: lk.acquire(True, timeout=2),
        lambda: lk.acquire(blocking=True, timeout=-1), lambda: lk.acquire(blocking=False, timeout=-1.0),
        lambda: lk.acquire(timeout=-1), lambda: lk.acquire(-1), lambda: lk.acquire(timeout=None),
        lambda: lk.acquire(-1.0), lambda: lk.acquire(True, 10**40),
    ]
    for i, form in enumerate(forms):
        assert form() is True, i
        assert lk.locked() and mine(hub) == [b"forms-free"]
        lk.release()
    assert hub.held_locks() == []


class Caller:
    """A thread that makes one call and reports (result, seconds taken)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.out: "queue.Queue[Any]" = queue.Queue()
        self.tid = 0
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fn,))
        self.thread.start()
        assert self.started.wait(5)

    def _run(self, fn: Callable[[], Any]) -> None:
        self.tid = threading.get_native_id()
        self.started.set()
        t0 = time.monotonic()
        try:
            self.out.put((fn(), time.monotonic() - t0))
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.out.put((e, time.monotonic() - t0))

    def result(self, timeout: float = 10.0) -> tuple[Any, float]:
        r = self.out.get(timeout=timeout)
        self.thread.join(5)
        return r


def test_threading_acquire_forms_while_held(hub, reports, event):
    """While another process holds the key: acquire(False) and
    acquire(blocking=False) miss at once, acquire(True) waits the handle's
    default timeout, acquire(True, t) and acquire(blocking=True, timeout=t)
    wait t, and timeout=-1 waits without limit (past the default) until the
    holder releases."""
    release = event()
    w = hold_in_worker(hub, reports, release, "forms-held")
    lk = hub.lock("forms-held", timeout=0.2)

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.monotonic()
        assert fn() is False
        return time.monotonic() - t0

    for miss in (lambda: lk.acquire(False), lambda: lk.acquire(blocking=False),
                 lambda: lk.acquire(False, -1), lambda: lk.acquire(blocking=0)):
        assert timed(miss) < 0.15
    assert 0.2 <= timed(lambda: lk.acquire(True)) < 1.0
    assert 0.2 <= timed(lambda: lk.acquire(blocking=True)) < 1.0
    assert 0.3 <= timed(lambda: lk.acquire(True, 0.3)) < 1.0
    assert 0.3 <= timed(lambda: lk.acquire(blocking=True, timeout=0.3)) < 1.0
    for forever in (lambda: lk.acquire(blocking=True, timeout=-1), lambda: lk.acquire(timeout=-1),
                    lambda: lk.acquire(True, None)):
        c = Caller(lambda f=forever: (f(), lk.release())[0])
        wait_blocked(os.getpid(), c.tid)
        time.sleep(0.4)  # the subject is time: twice the handle's 0.2 s default
        assert c.out.empty(), "a wait without limit gave up"
        release.set()
        ok, waited = c.result()
        assert ok is True and waited >= 0.4
        join_ok(w)
        release = event()
        w = hold_in_worker(hub, reports, release, "forms-held")
    release.set()
    join_ok(w)
    assert hub.held_locks() == []


_NONBLOCKING = "a non-blocking call takes no timeout"
_NEGATIVE = "timeout must be >= 0, or -1 for no limit"
_NOT_BOOL = "blocking must be True or False when a timeout follows"
_TWICE = "got multiple values for argument"
_NOT_NUMBER = "timeout must be a number of seconds or None"
_FORM_ERRORS: list[tuple[str, Callable[[clusterhub.Lock], Any], type, str]] = [
    ("False, 1", lambda lk: lk.acquire(False, 1), ValueError, _NONBLOCKING),
    ("False, 0", lambda lk: lk.acquire(False, 0), ValueError, _NONBLOCKING),
    ("False, None", lambda lk: lk.acquire(False, None), ValueError, _NONBLOCKING),
    ("blocking=False, timeout=1", lambda lk: lk.acquire(blocking=False, timeout=1), ValueError, _NONBLOCKING),
    ("blocking=False, timeout=0", lambda lk: lk.acquire(blocking=False, timeout=0), ValueError, _NONBLOCKING),
    ("False, timeout=2.5", lambda lk: lk.acquire(False, timeout=2.5), ValueError, _NONBLOCKING),
    ("timeout=-2", lambda lk: lk.acquire(timeout=-2), ValueError, _NEGATIVE),
    ("timeout=-100", lambda lk: lk.acquire(timeout=-100), ValueError, _NEGATIVE),
    ("True, -0.5", lambda lk: lk.acquire(True, -0.5), ValueError, _NEGATIVE),
    ("-1.5", lambda lk: lk.acquire(-1.5), ValueError, _NEGATIVE),
    ("True, nan", lambda lk: lk.acquire(True, float("nan")), ValueError, _NEGATIVE),
    ("False, -2", lambda lk: lk.acquire(False, -2), ValueError, _NEGATIVE),
    ("1, 2", lambda lk: lk.acquire(1, 2), TypeError, _NOT_BOOL),
    ("0, -1", lambda lk: lk.acquire(0, -1), TypeError, _NOT_BOOL),
    ("2.0, blocking=True", lambda lk: lk.acquire(2.0, blocking=True), TypeError, _TWICE),
    ("True, blocking=True", lambda lk: lk.acquire(True, blocking=True), TypeError, _TWICE),
    ("2.0, timeout=1", lambda lk: lk.acquire(2.0, timeout=1), TypeError, _TWICE),
    ("True, 1, timeout=1", lambda lk: lk.acquire(True, 1, timeout=1), TypeError, _TWICE),
    ("True, 1, 2", lambda lk: lk.acquire(True, 1, 2), TypeError, "takes at most 2 arguments"),
    ("timeout=True", lambda lk: lk.acquire(timeout=True), TypeError, _NOT_NUMBER + ", not bool"),
    ("True, True", lambda lk: lk.acquire(True, True), TypeError, _NOT_NUMBER + ", not bool"),
    ("True, '1'", lambda lk: lk.acquire(True, "1"), TypeError, _NOT_NUMBER + ", not str"),
    ("blocking=True, timeout='x'", lambda lk: lk.acquire(blocking=True, timeout="x"), TypeError, _NOT_NUMBER),
    ("blocking=False, timeout='x'", lambda lk: lk.acquire(blocking=False, timeout="x"), TypeError, _NOT_NUMBER),
    ("blockin=True", lambda lk: lk.acquire(blockin=True), TypeError, "unexpected keyword argument 'blockin'"),
]


def test_threading_acquire_form_errors_take_nothing(hub, reports):
    """blocking=False with a timeout other than -1, and a negative timeout
    other than -1, raise ValueError; a non-bool blocking beside a timeout,
    an argument given twice or a bad type raise TypeError (each with the
    message docs/bad-input.md gives); all before the lock is tried, so a dead
    holder's recovery is left to the next acquirer."""
    lk = resolved(hub, "form-errors")
    leave_dead_holder(hub, reports, "form-errors")
    for name, call, exc, gist in _FORM_ERRORS:
        with pytest.raises(exc, match=re.escape(gist)):
            call(lk)
        assert hub.held_locks() == [], name
    assert lk.acquire(True) is True and lk.recovered
    lk.release()
    assert hub.held_locks() == []


def test_nonblocking_miss_clears_recovered(hub, reports, event):
    """acquire(False) that misses is a failed acquire: the thread's recovered
    turns False."""
    lk = hub.lock("rec-miss")
    leave_dead_holder(hub, reports, "rec-miss")
    with lk:
        assert lk.recovered
    release = event()
    w = hold_in_worker(hub, reports, release, "rec-miss")
    assert lk.acquire(False) is False
    assert not lk.recovered
    release.set()
    join_ok(w)
