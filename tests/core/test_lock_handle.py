"""``LockBase``, the C base type of lock handles (csrc/lockhandle.c): its
``acquire``/``release``/``__enter__``/``__exit__`` fast paths, their argument
checks against the Python ones, its fields, reference counts and garbage
collection, reached through ``hub.lock()`` handles.

Processes and threads are sequenced with pipes (the ``reports`` fixture),
events and the locks themselves; a test sleeps only where time is its subject.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import weakref

import pytest

import clusterhub
from clusterhub import HubClosedError, LockError

from conftest import Holder, in_thread, join_ok, resolved, wait_blocked

pytestmark = pytest.mark.timeout(30)


# ---- the C fast paths (LockBase, csrc/lockhandle.c) ------------------------------
# acquire, release, __enter__ and __exit__ are C methods of the handle's base
# type; they call the Python slow paths only when the trylock/unlock through
# the cached ref does not simply succeed.  These tests aim at those C paths:
# handles already resolved (so the first trylock takes the lock at once).


class _Seconds(float):
    """A float subclass: checked by the Python code, not the C shortcut."""


_TIMEOUTS_OK = [None, 0, 0.0, 2, 0.25, 10**9, 1e9, 10**9 + 1, 1e300, float("inf"), 10**40,
                _Seconds(0.5), -1, -1.0, _Seconds(-1.0)]
_TIMEOUTS_BAD = [-2, -0.5, -(10**40), float("-inf"), float("nan"), True, False, "1", b"1",
                 [1], 1j, _Seconds(-1.5)]


def test_c_acquire_timeout_check_matches_python(hub):
    """acquire(timeout) on a resolved, free handle accepts exactly what the
    Python check accepts (-1 too: no limit), raises the same exception type
    otherwise (before the trylock: the lock stays free), by keyword, and
    positionally unless it is a bool (then it is blocking), also after
    blocking=True."""
    from clusterhub.locks import Lock

    check = Lock._check_timeout
    lk = resolved(hub, "c-timeouts")
    for t in _TIMEOUTS_OK:
        check(t)
        for call in (lambda: lk.acquire(t), lambda: lk.acquire(timeout=t),
                     lambda: lk.acquire(True, t), lambda: lk.acquire(blocking=True, timeout=t)):
            assert call() is True, t
            assert lk.locked()
            lk.release()
    for t in _TIMEOUTS_BAD:
        with pytest.raises((TypeError, ValueError)) as expected:
            check(t)
        calls = [lambda: lk.acquire(timeout=t), lambda: lk.acquire(True, t),
                 lambda: lk.acquire(blocking=True, timeout=t)]
        if not isinstance(t, bool):
            calls.append(lambda: lk.acquire(t))
        for call in calls:
            with pytest.raises(expected.type):
                call()
            assert not lk.locked(), t
    assert hub.held_locks() == []


def test_c_acquire_argument_errors_take_nothing(hub):
    """Wrong arguments to acquire() raise TypeError and leave the lock free."""
    lk = resolved(hub, "c-args")
    for call in (
        lambda: lk.acquire(1, 2),
        lambda: lk.acquire(1, timeout=1),
        lambda: lk.acquire(timeot=1),
        lambda: lk.acquire(timeout=1, other=2),
        lambda: lk.acquire(**{"timeout": 1, "x": 2}),
        lambda: lk.release(1),  # type: ignore[call-arg]
        lambda: lk.__enter__(1),  # type: ignore[call-arg]
    ):
        with pytest.raises(TypeError):
            call()
        assert not lk.locked()
    assert lk.acquire(**{"timeout": 0}) is True  # a keyword from a dict: same as timeout=0
    with pytest.raises(TypeError):  # not two of them, and the lock stays held
        lk.__exit__(None, None)  # type: ignore[call-arg]
    assert lk.locked()
    lk.release()
    assert hub.held_locks() == []


def test_c_timeout_default_and_huge_timeouts(hub, reports, event):
    """acquire() without a timeout waits the handle's timeout (from C, through
    the slow path); a timeout beyond 1e9 s means no limit, not an overflow."""
    release = event()

    def hold() -> None:
        with hub.lock("c-default"):
            reports.put("held")
            release.wait(20)

    lk = resolved(hub, "c-default", timeout=0.1)
    w = hub.fork(hold)
    assert reports.get() == ("held",)
    t0 = time.monotonic()
    assert lk.acquire() is False  # the handle's 0.1 s
    assert lk.acquire(timeout=0) is False
    assert 0.1 <= time.monotonic() - t0 < 1.0
    waiter = Holder(lk, timeout=10**40)  # no limit (an int beyond 64 bits)
    assert waiter.started.wait(5)
    wait_blocked(os.getpid(), waiter.tid)
    assert waiter.acquired.empty()
    release.set()
    assert waiter.result() == (True, False)
    waiter.finish()
    join_ok(w)
    assert hub.held_locks() == []


def test_c_with_propagates_and_releases(hub):
    """__exit__ returns None for any exception (never swallows it), releases,
    and an exception from the release itself (not held) is LockError."""
    lk = resolved(hub, "c-with")
    for exc in (ZeroDivisionError, KeyboardInterrupt, SystemExit):
        with pytest.raises(exc):
            with lk:
                raise exc()
        assert not lk.locked()
    assert lk.__enter__() is lk
    assert lk.__exit__(ValueError, ValueError("x"), None) is None
    assert not lk.locked()
    with pytest.raises(LockError):  # __exit__ by a thread that does not hold it
        lk.__exit__(None, None, None)
    other = Holder(lk)
    assert other.result() == (True, False)
    try:
        with pytest.raises(LockError):  # held by another thread, which keeps it
            lk.__exit__(None, None, None)
        with pytest.raises(LockError):
            lk.release()
        assert lk.locked()
    finally:
        other.finish()
    assert hub.held_locks() == []


def test_c_acquire_recovered_after_sigkill(hub, reports):
    """acquire() (not only ``with``) reports recovered after the holder's
    SIGKILL; the next fast-path acquire by the same thread clears it."""
    lk = resolved(hub, "c-kill")

    def hold() -> None:
        assert hub.lock("c-kill").acquire(timeout=5)
        reports.put("held")
        threading.Event().wait()

    for acquire in (lk.acquire, lambda: lk.acquire(timeout=5), lk.__enter__):
        w = hub.fork(hold)
        assert reports.get() == ("held",)
        w.kill()
        join_ok(w, -signal.SIGKILL)
        assert acquire()
        assert lk.recovered
        lk.release()
        assert lk.recovered  # until this thread's next acquire
        assert lk.acquire() is True  # trylock takes it at once: C clears the flag
        assert not lk.recovered
        lk.release()
        with lk:
            assert not lk.recovered
    assert hub.held_locks() == []


def test_c_paths_on_a_closed_hub_raise_hub_closed(make_hub):
    """Every calling form of the C methods raises HubClosedError once the hub
    is closed (a bad timeout: still TypeError/ValueError, checked first)."""
    hub = make_hub()
    lk = resolved(hub, "c-closed", timeout=1)
    fresh = hub.lock("c-closed-fresh")
    hub.close()
    for h in (lk, fresh):
        for call in (h.acquire, lambda: h.acquire(0), lambda: h.acquire(timeout=None),
                     lambda: h.acquire(timeout=2.5), lambda: h.acquire(False),
                     lambda: h.acquire(True), lambda: h.acquire(blocking=True, timeout=-1),
                     h.__enter__, h.release, lambda: h.__exit__(None, None, None)):
            with pytest.raises(HubClosedError):
                call()
        with pytest.raises(ValueError):
            h.acquire(timeout=-2)
        with pytest.raises(ValueError):
            h.acquire(False, 1)
        with pytest.raises(TypeError):
            h.acquire(timeout="1")


def test_c_fields_and_type(hub):
    """The handle's C fields: _ref (an int, writable: the slow path
    re-resolves), _rec (a set, read-only) and _thread_recovered (the calling
    thread's own, kept in _rec as a weak reference to its token)."""
    from clusterhub._bindings import LockBase

    lk = resolved(hub, "c-fields")
    assert isinstance(lk, LockBase) and type(lk) is clusterhub.Lock
    assert type(lk).acquire is LockBase.acquire  # the C method, not overridden
    assert not hasattr(lk, "__dict__")
    ref = lk._ref
    assert isinstance(ref, int) and ref > 0
    lk._ref = hub._locks.table.ref()  # "resolve first": the next acquire re-resolves
    with lk:
        assert lk._ref == ref
    assert isinstance(lk._rec, set) and lk._rec is lk._rec
    with pytest.raises(AttributeError):
        lk._rec = set()  # type: ignore[misc]
    with pytest.raises(TypeError):
        del lk._ref
    assert lk._thread_recovered is False and len(lk._rec) == 0
    lk._thread_recovered = True
    lk._thread_recovered = 1  # any truth value; still one entry for this thread
    assert lk._thread_recovered is True and len(lk._rec) == 1
    assert in_thread(lambda: lk._thread_recovered) is False  # another thread's own
    assert len(lk._rec) == 1  # reading made it no entry
    (entry,) = lk._rec
    assert isinstance(entry, weakref.ref) and type(entry()).__name__ == "ThreadToken"
    lk._thread_recovered = False
    assert lk._thread_recovered is False and len(lk._rec) == 0
    with pytest.raises(AttributeError):
        del lk._thread_recovered


def test_c_paths_leak_no_references(hub):
    """Reference counts of the handle and of timeout objects are unchanged by
    many fast and slow calls, in every calling form, with a recovered
    thread's entry in _rec or not (a leak in the C methods would show)."""
    lk = resolved(hub, "c-refs")
    t = 1234.5  # a float object of our own: its refcount is ours to watch
    m1 = float(-1)  # the same for threading's "no timeout"

    def counts() -> tuple[int, ...]:
        return tuple(sys.getrefcount(o) for o in (lk, t, m1))  # bools: other threads use them

    def calls() -> None:
        with lk:
            pass
        lk.acquire(t)
        lk.release()
        lk.acquire(timeout=t)
        with pytest.raises(LockError):
            lk.acquire(t)  # EDEADLK: through the Python slow path
        with pytest.raises(LockError):
            lk.acquire(False)
        lk.release()
        with pytest.raises(LockError):
            lk.release()
        for form in (lambda: lk.acquire(False), lambda: lk.acquire(True),
                     lambda: lk.acquire(True, t), lambda: lk.acquire(blocking=False, timeout=m1),
                     lambda: lk.acquire(blocking=True, timeout=m1), lambda: lk.acquire(m1)):
            assert form() is True
            lk.release()
        for bad in (lambda: lk.acquire(False, t), lambda: lk.acquire(t, blocking=True),
                    lambda: lk.acquire(t, t), lambda: lk.acquire(True, blocking=True)):
            with pytest.raises((TypeError, ValueError)):
                bad()
        assert lk._thread_recovered is False
        lk._thread_recovered = False

    calls()  # warm up (an exception's traceback may hold a reference for a while)
    before = counts()
    for _ in range(300):
        calls()
    assert counts() == before
    in_thread(lambda: setattr(lk, "_thread_recovered", True))  # an entry of a thread now gone
    lk._thread_recovered = True  # and one of this thread: the fast paths take it out
    assert len(lk._rec) == 1
    before = counts()
    for _ in range(300):
        lk._thread_recovered = True
        calls()
    assert counts() == before


def test_c_rec_cycle_is_collected(hub):
    """A reference cycle through the C-held _rec set is found by the garbage
    collector (the type supports GC), and the handle freed with it."""
    import gc

    class Marker:
        pass

    lk = hub.lock("c-gc", timeout=1)  # not cached (timeout given): only we refer to it
    m = Marker()
    m.lock = lk  # type: ignore[attr-defined]
    lk._rec.add(m)  # type: ignore[arg-type]  # lk -> _rec -> m -> lk
    dead = weakref.ref(m)
    del lk, m
    gc.collect()
    assert dead() is None
