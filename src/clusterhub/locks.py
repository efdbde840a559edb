"""Global named locks on the shared-memory lock table.

A :class:`Lock` handle caches the (slot, generation) its key resolved to, so
``with lk:`` is one C call to acquire and one to release, both keeping the GIL:
its acquire, release, __enter__ and __exit__ are C methods of its base type
``LockBase`` (csrc/lockhandle.c), which call the ``_*_slow`` methods below only
when the trylock or unlock did not simply succeed.
Only a contended acquire waits, in C with the GIL released, in slices of
about 0.1 s so that Ctrl-C is seen between slices.  When the slot has been
handed to another key meanwhile, C says "stale" and the handle resolves again.

Locks are not first-come-first-served: a releasing process may take the lock
again before a waiter wakes.

In asyncio, the owner is the task.  A task that finds the lock free takes it
on the loop's thread; one that must wait lets a helper thread wait, hold and
later release the lock (a pthread mutex belongs to the thread that locked it),
so the loop never blocks.

``recovered`` is per thread (kept in C, by a token per thread: see
csrc/lockhandle.h) and, for ``async with``, per task (a weak mapping of the
handle's tasks, here).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import weakref
from typing import Any, Callable, NamedTuple, Optional, Union

from . import _bindings
from ._bindings import LockBase, LockTable, lock_error
from .checks import check_timeout
from .errors import HubClosedError, LockError, LockTimeout

_trylock = _bindings.lt_trylock
_timedlock = _bindings.lt_timedlock
_unlock = _bindings.lt_unlock
_now_ns = _bindings.monotonic_ns

_RECOVERED = _bindings.RECOVERED
_NEW = _bindings.NEW
_NEW_RECOVERED = _bindings.NEW_RECOVERED
_EBUSY = -errno.EBUSY
_EPERM = -errno.EPERM
_ESTALE = -errno.ESTALE
_EINVAL = -errno.EINVAL
_ETIMEDOUT = -errno.ETIMEDOUT
_EBADF = -errno.EBADF
_EDEADLK = -errno.EDEADLK
_SLICE_NS = 100_000_000  # wake this often while blocked, to see signals
_CACHE_MAX = 4096  # by-name handles kept for `with hub.lock(name)`
_log = logging.getLogger("clusterhub")

Key = Union[str, bytes]


def encode_key(key: Key) -> bytes:
    """The key's bytes; TypeError/ValueError for a bad key."""
    if isinstance(key, str):
        kb = key.encode()
    elif isinstance(key, bytes):
        kb = key
    else:
        raise TypeError(f"lock key must be str or bytes, not {type(key).__name__}")
    if not 1 <= len(kb) <= _bindings.KEY_MAX:
        raise ValueError(f"lock key must be 1 to {_bindings.KEY_MAX} bytes, not {len(kb)}")
    return kb


def _inserted(code: int) -> int:
    """The acquire result of a resolve that inserted the key (and took it)."""
    return _RECOVERED if code == _NEW_RECOVERED else 0


def _check_timeout(timeout: Optional[float]) -> Optional[float]:
    """checks.check_timeout's rule; beyond _FOREVER it means no limit."""
    t = check_timeout(timeout)
    return None if t is None or t > _FOREVER else t


def _check_acquire_timeout(timeout: Optional[float]) -> Optional[float]:
    """As :func:`_check_timeout`, and -1 means no limit (threading's default)."""
    if timeout == -1 and not isinstance(timeout, bool) and isinstance(timeout, (int, float)):
        return None
    try:
        return _check_timeout(timeout)
    except ValueError:
        raise ValueError("timeout must be >= 0, or -1 for no limit") from None


_FOREVER = float(_bindings.LOCK_FOREVER_S)  # s (31 years): longer means no limit (also in C)


class _HeldLockFields(NamedTuple):
    key: bytes
    pid: int
    worker_id: Optional[int]


class HeldLock(_HeldLockFields):
    """One entry of ``Hub.held_locks()``: ``(key, pid, worker_id)``, and
    ``host``, the holder's host name (beside the tuple's three fields)."""

    host: str = socket.gethostname()  # (a Redis hub's rows set their own)


class Locks:
    """This process's view of a hub's lock table."""

    def __init__(self, lock_slots: int, table: Optional[LockTable] = None) -> None:
        # (table: one attached from the master, for a process that connected)
        self.table = LockTable(2 * lock_slots) if table is None else table
        self.ptr: Any = self.table.ptr  # None once closed: handles then raise
        self._gone: Optional[Exception] = None  # what lock calls raise once unusable
        self._handles: dict[Key, Lock] = {}
        self.aio: dict[tuple[asyncio.AbstractEventLoop, bytes], _AioState] = {}

    def lock(self, key: Key, timeout: Optional[float]) -> "Lock":
        try:
            h = self._handles.get(key)
        except TypeError:  # unhashable: encode_key says what a key must be
            h = None
        if h is not None and h._timeout == timeout and key.__class__ is h._key_type:
            return h
        h = Lock(self, encode_key(key), _check_timeout(timeout), key.__class__)
        if timeout is None:
            if len(self._handles) >= _CACHE_MAX:
                self._handles.clear()
            self._handles[key] = h
        return h

    def held(self) -> list[tuple[bytes, int, Optional[int]]]:
        self._check()
        return self.table.held()

    def _check(self) -> Any:
        if self.ptr is None:
            raise self.gone()
        return self.ptr

    def gone(self) -> Exception:
        """What a lock call raises once the table is unusable here."""
        return self._gone or HubClosedError("this hub is closed")

    def orphan(self, error: Exception) -> None:
        """The table is no longer the one the others use (a connected
        process whose master died): every later lock call raises ``error``.
        The mapping stays: a thread of ours may still hold a lock in it."""
        self._gone = error
        self.table.disable()
        self.ptr = None
    def retire(self) -> None:
        """Refuse all further lock use (HubClosedError), in one step with
        checking that no thread of this process holds or waits on a lock;
        if one does, raise LockError and change nothing."""
        if self.ptr is None:
            return
        if not self.table.retire():
            raise LockError(
                "cannot close the hub while a thread of this process holds or waits "
                "on one of its locks (unmapping the table would break lock recovery)"
            )
        self.ptr = None

    def after_fork_child(self, worker_id: int) -> None:
        self.table.after_fork_child()
        self.table.set_worker_id(worker_id)
        self.aio = {}

    def abandon(self) -> None:
        """Inert in a child forked by other code: keep the mapping, refuse use."""
        self.table.disable()
        self.ptr = None

    def close(self) -> None:
        """Retire (see above), then unmap the table.  Idempotent."""
        self.retire()
        self.table.close()
        self._handles.clear()


class Lock(LockBase):
    """A handle on one global lock, usable from any thread and in asyncio.

    ``with lk:`` / ``async with lk:`` acquire and release it; ``acquire()``
    returns whether it was acquired in time (and takes threading.Lock's
    ``acquire(blocking, timeout)`` forms too).  ``recovered`` says whether the
    calling thread's (or task's) latest acquire through this handle took the
    lock from a holder that died holding it.  ``threading.Condition(lk)``
    works within a process.
    """

    # LockBase (C) holds ``_ref``, the ref the key resolved to, and the
    # calling thread's ``_thread_recovered``, and implements acquire(),
    # release(), __enter__ and __exit__: trylock or unlock through ``_ref``,
    # then, unless that simply succeeded, ``_enter_slow``, ``_acquire_slow`` or
    # ``_release_slow`` (csrc/lockhandle.h).  ``_arec``: None, or a weak
    # mapping from each task that acquired through ``acquire_async`` to
    # whether its latest such acquire recovered.
    __slots__ = ("key", "_locks", "_timeout", "_key_type", "_arec")

    def __init__(self, locks: Locks, key: bytes, timeout: Optional[float], key_type: type) -> None:
        self.key = key
        self._locks = locks
        self._ref = locks.table.ref()  # C answers -EINVAL until first resolved
        self._timeout = timeout
        self._key_type = key_type
        self._arec: Optional[weakref.WeakKeyDictionary[asyncio.Task[Any], bool]] = None

    # Over Redis (see redis/locks.py) these tell the latest acquire's fencing
    # token and whether its holding was lost; locally there is neither.
    fencing_token: Optional[int] = None
    lost: bool = False

    def __repr__(self) -> str:
        return f"<clusterhub.Lock {self.key!r}>"

    @property
    def recovered(self) -> bool:
        """Whether the latest acquire through this handle by the calling
        thread recovered the lock from a dead holder; in a task that has
        acquired through ``async with`` / ``acquire_async``, the task's latest
        such acquire.  False before any acquire, and after a failed one."""
        arec = self._arec
        if arec:
            try:
                task = asyncio.current_task()
            except RuntimeError:  # no running loop in this thread
                task = None
            if task is not None:
                got = arec.get(task)
                if got is not None:
                    return got
        return self._thread_recovered

    def locked(self) -> bool:
        """Whether anyone holds the lock now (a snapshot; never takes it)."""
        locks = self._locks
        locks._check()
        ref = locks.table.find(self.key)
        return ref is not None and bool(locks.table.is_locked(*ref))

    # ---- threading.Condition ----------------------------------------------
    # Condition(lk) takes these three instead of its defaults, which probe
    # ownership with acquire(False) (a LockError for the holder, and a trylock
    # that could take a dead holder's recovery) and re-acquire after a wait
    # with acquire() (the handle's default timeout, which may give up).

    def _is_owned(self) -> bool:
        """Whether the calling thread holds the lock, read from the table:
        never takes it, nor a dead holder's recovery."""
        locks = self._locks
        locks._check()
        r = self._held_here(self._ref)
        if r == _ESTALE or r == _EINVAL:  # the handle does not know the key's slot now
            found = locks.table.find(self.key)
            if found is None:  # not in the table: nobody holds it
                return False
            r = self._held_here(locks.table.ref(*found))
            if r == _ESTALE:  # given to another key meanwhile: it was not held
                return False
        if r < 0:
            raise locks.gone() if r == _EBADF else lock_error(r, self.key)
        return r == 1

    def _release_save(self) -> None:
        """Condition.wait: let go before waiting."""
        self.release()

    def _acquire_restore(self, state: None) -> None:
        """Condition.wait: take it again after waiting, without limit."""
        self.acquire(timeout=None)

    # ---- threads ----------------------------------------------------------
    # acquire, release, __enter__, __exit__: in LockBase (C), see above.

    # For LockBase.acquire(timeout): the check of what it does not check itself
    # (it takes None, -1 and valid exact ints and floats); raises before the trylock.
    _check_timeout = staticmethod(_check_acquire_timeout)

    def _enter_slow(self, r: int) -> "Lock":
        """Finish ``__enter__`` when its trylock gave ``r`` (not 0)."""
        if not self._acquire_slow(r, self._timeout):
            raise LockTimeout(f"lock {self.key!r} not acquired within {self._timeout} s")
        return self

    def _release_slow(self, r: int) -> None:
        """Finish a release whose unlock through the cached ref failed."""
        locks = self._locks
        if locks.ptr is None or r == _EBADF:
            raise locks.gone()
        if r != _EPERM and r != _ESTALE and r != _EINVAL:
            raise lock_error(r, self.key)
        # The handle may be shared: another thread may have re-resolved it
        # since this one acquired.  While we hold the key its slot cannot
        # change, so the key's current slot is the one to release.
        if self._unlock_current():
            return
        raise LockError(f"lock {self.key!r} is not held by this thread")

    def _unlock_current(self) -> bool:
        """Unlock the key's current slot if this thread holds it."""
        if self._locks.ptr is None:  # closed: it held nothing (close checks)
            return False
        found = self._locks.table.find(self.key)
        return found is not None and _unlock(self._locks.table.ref(*found)) == 0

    def _acquire_slow(
        self, r: int, timeout: Optional[float], abort: Optional[threading.Event] = None,
        on_taken: Optional[Callable[[int], None]] = None,
    ) -> bool:
        """Finish an acquire that did not succeed at the first trylock: True
        once held, False when not in time.

        Its outcome is the calling thread's latest acquire (``recovered``);
        with ``on_taken`` (a helper thread acquiring for a task), the code
        it took the lock with (0 or RECOVERED) goes there instead.  ``abort``
        (set by another thread) ends the wait, as a timeout would, at the
        next slice.  (One function, no inner call: on the contended path a
        Python call lengthens the wait and, after it, the time held.)
        """
        locks = self._locks
        locks._check()
        deadline = None if timeout is None else _now_ns() + int(timeout * 1e9)
        # If an exception escapes while this thread holds the key, this call
        # took it (to be let go) unless it was held before: EDEADLK, or ENOLCK
        # (checked first, so it hides EDEADLK).
        ours = r >= 0 or r == _EBUSY or r == _ESTALE or r == _EINVAL
        try:
            while True:
                if r >= 0:
                    if on_taken is None:
                        self._thread_recovered = r == _RECOVERED
                    else:
                        on_taken(r)
                    return True
                if r == _ESTALE or r == _EINVAL:
                    code, ref = locks.table.resolve(self.key)
                    self._ref = ref
                    r = _inserted(code) if code >= _NEW else _trylock(ref)
                elif r == _EBUSY or r == _ETIMEDOUT:
                    now = _now_ns()
                    if (deadline is not None and now >= deadline) or (abort is not None and abort.is_set()):
                        if on_taken is None:
                            self._thread_recovered = False
                        return False
                    end = now + _SLICE_NS
                    if deadline is not None and deadline < end:
                        end = deadline
                    r = _timedlock(self._ref, end)
                else:
                    break  # an error, raised below: EDEADLK means held before
        except BaseException:
            # Typically KeyboardInterrupt, which CPython raises right after a C
            # call returns, before its result is stored: a lock just taken is
            # then known only to the table, so ask it, not our variables.
            if ours:
                self._unlock_current()
                if on_taken is None:
                    self._thread_recovered = False
            raise
        if r != _EDEADLK and on_taken is None:  # (the holder's latest acquire stands)
            self._thread_recovered = False
        raise lock_error(r, self.key)

    # ---- asyncio ----------------------------------------------------------

    async def __aenter__(self) -> "Lock":
        await self.acquire_async(self._timeout)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        holder = self._release_task()
        if holder is not None:  # so that the key is free when the block ends
            await holder.finished()

    async def acquire_async(self, timeout: Optional[float] = None) -> None:
        """Acquire for the current task without blocking the loop.

        Raises LockTimeout when not acquired within ``timeout`` seconds and
        LockError when the current task already holds it.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        locks = self._locks
        locks._check()
        timeout = _check_timeout(timeout)
        deadline = None if timeout is None else loop.time() + timeout
        k = (loop, self.key)
        st = locks.aio.get(k)
        if st is not None and st.owner is task:
            raise LockError(f"lock {self.key!r} is already held by this task")
        arec = self._arec
        if task is not None:  # this acquire is now the task's latest: not recovered, yet
            if arec is None:
                arec = self._arec = weakref.WeakKeyDictionary()
            arec[task] = False
        while st is not None and st.owner is not None:  # another task of this loop has it
            fut: asyncio.Future[None] = loop.create_future()
            st.waiters.append(fut)
            timer = None
            if deadline is not None:
                timer = loop.call_at(deadline, _expire, fut, self.key, timeout)
            try:
                await fut
            except BaseException:
                if fut in st.waiters:
                    st.waiters.remove(fut)
                elif fut.done() and not fut.cancelled() and fut.exception() is None:
                    _wake_next(locks, st, k)  # handed the key, but leaving: pass it on
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            st = locks.aio.get(k)
        if st is None:
            st = locks.aio[k] = _AioState()
        st.owner = task  # tasks of this loop now queue behind us
        try:
            r = _trylock(self._ref)
            while r == _ESTALE or r == _EINVAL:
                code, self._ref = locks.table.resolve(self.key)
                r = _inserted(code) if code >= _NEW else _trylock(self._ref)
            if r >= 0:
                st.loop_held = True  # the loop's thread holds the mutex
            elif r == _EBUSY:
                holder = _Holder(self, loop, deadline)
                st.holder = holder
                r = await holder.acquired(timeout)
            else:
                raise lock_error(r, self.key)
            if r == _RECOVERED and arec is not None and task is not None:
                arec[task] = True
        except BaseException:
            self._aio_done(st, k)
            raise

    def release_async(self) -> None:
        """Release what :meth:`acquire_async` took for the current task (a
        helper thread may let go of the OS lock a moment later)."""
        self._release_task()

    def _release_task(self) -> Optional["_Holder"]:
        loop = asyncio.get_running_loop()
        k = (loop, self.key)
        st = self._locks.aio.get(k)
        if st is None or st.owner is not asyncio.current_task():
            raise LockError(f"lock {self.key!r} is not held by this task")
        return self._aio_done(st, k)

    def _aio_done(self, st: "_AioState", k: tuple[Any, bytes]) -> Optional["_Holder"]:
        """Let go of the OS lock (if held) and hand over to the next task;
        the helper thread that still has to unlock, if any."""
        holder, st.holder = st.holder, None
        if holder is not None:
            holder.release()
        try:
            if st.loop_held:
                st.loop_held = False
                r = _unlock(self._ref)
                if r:
                    self._release_slow(r)
        finally:
            st.owner = None
            _wake_next(self._locks, st, k)
        return holder


def _wake_next(locks: Locks, st: "_AioState", k: tuple[Any, bytes]) -> None:
    """Hand the key to the first task still waiting; forget an idle state."""
    while st.waiters:
        fut = st.waiters.pop(0)
        if not fut.done():
            fut.set_result(None)
            return
    if st.owner is None and locks.aio.get(k) is st:
        del locks.aio[k]


def _expire(fut: "asyncio.Future[None]", key: bytes, timeout: Optional[float]) -> None:
    if not fut.done():
        fut.set_exception(LockTimeout(f"lock {key!r} not acquired within {timeout} s"))


def _remaining(loop: asyncio.AbstractEventLoop, deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - loop.time())


class _AioState:
    """The tasks of one loop around one key: who owns it, who waits."""

    __slots__ = ("owner", "waiters", "holder", "loop_held")

    def __init__(self) -> None:
        self.loop_held = False
        self.owner: Optional[asyncio.Task[Any]] = None
        self.waiters: list[asyncio.Future[None]] = []
        self.holder: Optional[_Holder] = None


class _Holder:
    """A thread that waits for, holds, and releases a lock for a task."""

    def __init__(self, lock: Lock, loop: asyncio.AbstractEventLoop, deadline: Optional[float]) -> None:
        self._lock = lock
        self._loop = loop
        self._got: asyncio.Future[None] = loop.create_future()  # the wait ended
        self._done: asyncio.Future[None] = loop.create_future()  # the thread holds nothing
        self._release = threading.Event()  # before the lock is got: give up waiting
        self._timeout = _remaining(loop, deadline)
        self.result: Union[int, None, BaseException] = 0  # RECOVERED or 0; None: not in time
        threading.Thread(target=self._run, name="clusterhub-lock", daemon=True).start()

    async def acquired(self, timeout: Optional[float]) -> int:
        try:
            await asyncio.shield(self._got)
        except asyncio.CancelledError:
            # Stop the thread (within a slice) and wait for it, so that a
            # cancelled task leaves nothing held and nothing waiting.
            self.release()
            await self.finished()
            raise
        if self.result is None:
            raise LockTimeout(f"lock {self._lock.key!r} not acquired within {timeout} s")
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result

    async def finished(self) -> None:
        """Wait until the thread has let go of the lock, even if cancelled meanwhile."""
        cancelled = False
        while not self._done.done():
            try:
                await asyncio.shield(self._done)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def release(self) -> None:
        self._release.set()

    def _signal(self, fut: "asyncio.Future[None]") -> bool:
        try:
            self._loop.call_soon_threadsafe(_set_done, fut)
            return True
        except RuntimeError:  # loop closed: nobody will release for us
            return False

    def _run(self) -> None:
        lock = self._lock
        ok = False
        try:
            # The task's acquire is not this thread's: its code goes to `got`.
            got: list[int] = []
            ok = lock._acquire_slow(-errno.EBUSY, self._timeout, self._release, got.append)
            self.result = got[0] if ok else None
        except BaseException as e:
            self.result = e
        try:
            if not self._signal(self._got):
                self._release.set()
            if ok:
                self._release.wait()
                r = _unlock(lock._ref)
                if r and not lock._unlock_current():  # the handle was re-resolved meanwhile
                    _log.error("lock %r: helper thread could not release it (%d)", lock.key, r)
        finally:
            self._signal(self._done)


def _set_done(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)
