"""Lock handles of a Redis hub: the same surface as the local ``Lock``
(``with``, ``async with``, ``acquire``/``release``, ``recovered``,
``locked()``, ``threading.Condition``), plus ``fencing_token`` and ``lost``.

A contended acquire queues on the key and blocks outside Lua, in ``BLPOP``
on its own wake-up list, for at most the holder's remaining lease (plus
2 ms): a release hands it the key at once (first come, first served), and a
holder that died is noticed when its lease runs out, without polling in
between.  A waiter that gives up (timeout, cancel, Ctrl-C, an error) leaves
the queue, and passes on the key if it was handed over meanwhile.

The owner of a holding is the thread, or for ``async with`` the task.  Over
Redis a thread that exits holding a lock keeps it until its process's lease
ends (the local engine frees it at once).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import Any, Optional, Union

from ..errors import HubClosedError, HubError, LockError, LockTimeout
from ..locks import _check_acquire_timeout, _check_timeout, encode_key
from . import scripts
from .link import Holding, Link, translate

Key = Union[str, bytes]
_CACHE_MAX = 4096
_MARGIN = 0.002  # s past the holder's lease before trying again
_OMITTED: Any = object()
# A wait shorter than this (ms: the holder's lease near its end, which a
# live holder would have renewed, or the caller's deadline near) is slept on
# our own clock rather than in BLPOP, whose timeout Redis only checks on its
# 100 ms tick: a dead holder's key would pass on, or acquire(timeout=0.01)
# return, up to 100 ms late.  A key handed to us meanwhile is ours at the
# next try.
_NEAR_END_MS = 150
# A BLPOP that would end at the caller's deadline ends this much (s) before
# it instead (it may end up to a tick late); the rest is slept.
_TICK = 0.1
# The wait sent with the first attempt, as a share of the lease: a live
# holder renews every lease/10, so its lease has more left than that (the
# wait is skipped otherwise; a dead holder is then noticed in exact slices).
_FIRST_SLICE = 0.8


class RedisLocks:
    """This process's locks of a Redis hub."""

    def __init__(self, link: Link) -> None:
        self.link: Optional[Link] = link
        self.owned: dict[tuple[Any, bytes], Holding] = {}  # (thread ident or task, key) -> holding
        self._handles: dict[Key, RedisLock] = {}
        self._lock = threading.Lock()
        self.waiting = 0  # acquires in progress (threads and tasks)

    def lock(self, key: Key, timeout: Optional[float]) -> "RedisLock":
        h = self._handles.get(key) if isinstance(key, (str, bytes)) else None
        if h is not None and h._timeout == timeout and key.__class__ is h._key_type:
            return h
        h = RedisLock(self, encode_key(key), _check_timeout(timeout), key.__class__)
        if timeout is None:
            if len(self._handles) >= _CACHE_MAX:
                self._handles.clear()
            self._handles[key] = h
        return h

    def check(self) -> Link:
        if self.link is None:
            raise HubClosedError("this hub is closed")
        return self.link

    def held(self) -> list[tuple[bytes, int, Optional[int], str]]:
        return self.check().held_locks()

    def retire(self) -> None:
        """Refuse all further use; LockError while something here holds a lock."""
        if self.link is None:
            return
        with self._lock:
            if self.owned or self.waiting:
                raise LockError("cannot close the hub while a thread or task of this process holds or waits for "
                                "one of its locks")
            self.link = None

    def abandon(self) -> None:
        self.link = None

    def close(self) -> None:
        self.retire()
        self._handles.clear()


class RedisLock:
    """A handle on one global lock of a Redis hub (see the module's doc)."""

    def __init__(self, locks: RedisLocks, key: bytes, timeout: Optional[float], key_type: type) -> None:
        self.key = key
        self._locks = locks
        self._timeout = timeout
        self._key_type = key_type
        self._latest = threading.local()  # .h: this thread's latest holding (or None after a failed acquire)
        self._alatest: "weakref.WeakKeyDictionary[asyncio.Task[Any], Optional[Holding]]" = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<clusterhub.Lock {self.key!r} (redis)>"

    # ---- what the latest acquire of the calling thread or task says --------------------

    def _latest_holding(self) -> Optional[Holding]:
        try:
            task = asyncio.current_task()
        except RuntimeError:
            task = None
        if task is not None and task in self._alatest:
            return self._alatest[task]
        return getattr(self._latest, "h", None)

    @property
    def recovered(self) -> bool:
        """Whether the calling thread's (or task's) latest acquire took the
        lock from a holder whose lease ran out while it held it."""
        h = self._latest_holding()
        return h is not None and h.recovered

    @property
    def fencing_token(self) -> Optional[int]:
        """The latest acquire's fencing token: larger than every token given
        for this key before (None before any acquire, or after a failed one)."""
        h = self._latest_holding()
        return None if h is None else h.token

    @property
    def lost(self) -> bool:
        """Whether the latest acquire's holding was lost: this process's
        lease ran out while it held the lock (known from our own clock when
        renewals have not succeeded for a lease, even while the server is
        unreachable), or the server lost its data."""
        h = self._latest_holding()
        if h is None:
            return False
        if h.lost:
            return True
        # Still held, but our lease may have run out while the server could
        # not tell us (a cut link): by our own clock it is lost then.
        link = self._locks.link
        return link is not None and h.acq in link.held and time.monotonic() > link.valid_until

    def locked(self) -> bool:
        """Whether a live process holds the lock now (a snapshot)."""
        return self._locks.check().locked(self.key)

    # ---- threads ------------------------------------------------------------------------

    def acquire(self, blocking_or_timeout: Any = _OMITTED, timeout: Any = _OMITTED, *,
                blocking: Any = _OMITTED) -> bool:
        """Acquire for the calling thread; False when not in time.  LockError
        when it holds the lock already.  The forms of the local handle:
        ``acquire()`` (the handle's timeout), ``acquire(t)``,
        ``acquire(timeout=t)``, and threading's ``acquire(blocking, timeout)``."""
        t = _parse_acquire(blocking_or_timeout, timeout, blocking, self._timeout)
        owner = threading.get_ident()
        link = self._begin(owner)
        h = None
        try:
            h = self._acquire(link, t)
            self._latest.h = h
            if h is None:
                return False
            self._own(owner, h)
            return True
        except BaseException:
            # (Ctrl-C after the key came but before it was recorded as this
            # thread's: nobody could release it)
            if h is not None and self._locks.owned.get((owner, self.key)) is not h:
                link.forget(h)
                _give_up(link, self.key, h.acq)
            raise
        finally:
            self._end()

    def release(self) -> None:
        """Release what the calling thread holds; LockError when it holds
        nothing here, or when the holding was lost (someone else may have it)."""
        self._release(threading.get_ident())

    def __enter__(self) -> "RedisLock":
        if not self.acquire():
            raise LockTimeout(f"lock {self.key!r} not acquired within {self._timeout} s")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # threading.Condition(lk)
    def _is_owned(self) -> bool:
        return (threading.get_ident(), self.key) in self._locks.owned

    def _release_save(self) -> None:
        self.release()

    def _acquire_restore(self, state: None) -> None:
        self.acquire(timeout=None)

    def _begin(self, owner: Any) -> Link:
        """The link, for an acquire that then ends with :meth:`_end`."""
        locks = self._locks
        with locks._lock:
            link = locks.check()
            if (owner, self.key) in locks.owned:
                raise LockError(f"lock {self.key!r} is already held by this {_whom(owner)}")
            locks.waiting += 1
        return link

    def _end(self) -> None:
        with self._locks._lock:
            self._locks.waiting -= 1

    def _own(self, owner: Any, h: Holding) -> None:
        self._locks.owned[(owner, self.key)] = h

    def _acquire(self, link: Link, timeout: Optional[float]) -> Optional[Holding]:
        acq = link.new_acq()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if timeout is not None and timeout * 1000 < _NEAR_END_MS:
                fresh = False  # a try, or a short wait (see _NEAR_END_MS): no wait sent with the attempt
            else:  # the first attempt and a wait in one round trip
                first = _FIRST_SLICE * link.lease
                if timeout is not None and timeout < first:
                    first = timeout - _TICK  # (see _TICK)
                h, left_ms, fresh = link.acquire_or_wait(self.key, acq, first)
                if h is not None:
                    return h
            while True:
                if not fresh:
                    h, left_ms = link.try_acquire(self.key, acq, queue=timeout != 0)
                    if h is not None:
                        return h
                fresh = False
                if left_ms < 0:  # our lease was gone: renew it (what we held is lost), try again
                    link.renew()
                    continue
                wait = min(left_ms / 1000 + _MARGIN, link.lease)  # (the socket timeout is above a lease)
                if deadline is not None:
                    rem = deadline - time.monotonic()
                    if rem <= 0:
                        if timeout != 0:  # (a try was not queued)
                            link.give_up(self.key, acq)
                        return None
                    wait = min(wait, rem)
                if wait * 1000 < _NEAR_END_MS:
                    time.sleep(wait)
                    continue
                if deadline is not None and wait == rem:
                    wait -= _TICK  # (see _TICK)
                h = link.wait_handed(self.key, acq, wait)
                if h is not None:
                    return h
        except BaseException:
            _give_up(link, self.key, acq)
            raise

    def _release(self, owner: Any) -> None:
        link = self._locks.link
        h = self._locks.owned.pop((owner, self.key), None)
        if h is None:
            raise LockError(f"lock {self.key!r} is not held by this {_whom(owner)}")
        if link is None:
            raise HubClosedError("this hub is closed")
        expired = time.monotonic() > link.valid_until  # (before the call: see Link.valid_until)
        if not link.release(h) or h.lost or expired:
            h.lost = True
            raise _lost(self.key)

    # ---- asyncio -----------------------------------------------------------------------

    async def __aenter__(self) -> "RedisLock":
        await self.acquire_async(self._timeout)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.release_async_wait()

    async def acquire_async(self, timeout: Optional[float] = None) -> None:
        """Acquire for the current task without blocking the loop (LockTimeout
        when not in time; LockError when the task holds it already)."""
        task = asyncio.current_task()
        timeout = _check_timeout(timeout)
        link = self._begin(task)
        try:
            await self._acquire_async(link, task, timeout)
        finally:
            self._end()

    async def _acquire_async(self, link: Link, task: Any, timeout: Optional[float]) -> None:
        client, acquire, give_up, _ = link.aio(asyncio.get_running_loop())[:4]
        acq = link.new_acq()
        deadline = None if timeout is None else time.monotonic() + timeout
        if task is not None:
            self._alatest[task] = None
        try:
            while True:
                h, left_ms = link.acquired(self.key, acq, await acquire(**link.acquire_args(self.key, acq)))
                if h is not None:
                    break
                if left_ms < 0:  # our lease was gone: renew it (what we held is lost), try again
                    await asyncio.get_running_loop().run_in_executor(None, link.renew)
                    continue
                wait = min(left_ms / 1000 + _MARGIN, link.lease)  # (the socket timeout is above a lease)
                if deadline is not None:
                    rem = deadline - time.monotonic()
                    if rem <= 0:
                        await give_up(**link.give_up_args(self.key, acq))
                        raise LockTimeout(f"lock {self.key!r} not acquired within {timeout} s")
                    wait = min(wait, rem)
                if wait * 1000 < _NEAR_END_MS:
                    await asyncio.sleep(wait)
                else:
                    if deadline is not None and wait == rem:
                        wait -= _TICK  # (see _TICK)
                    h = link.handed(self.key, acq, await _blpop(client, link.wake_key(acq), wait))
                    if h is not None:
                        break
        except LockTimeout:
            raise
        except BaseException as e:
            _give_up_soon(link, give_up, self.key, acq)
            if isinstance(e, Exception) and not isinstance(e, HubError):
                raise translate(e, link.url) from e
            raise
        if task is not None:
            self._alatest[task] = h
        self._own(task, h)

    def release_async(self) -> None:
        """Release what the current task holds (blocks the loop for one round
        trip; ``async with`` does not)."""
        self._release(asyncio.current_task())

    async def release_async_wait(self) -> None:
        task = asyncio.current_task()
        link = self._locks.link
        h = self._locks.owned.pop((task, self.key), None)
        if h is None:
            raise LockError(f"lock {self.key!r} is not held by this task")
        if link is None:
            raise HubClosedError("this hub is closed")
        _, _, _, release = link.aio(asyncio.get_running_loop())[:4]
        expired = time.monotonic() > link.valid_until
        args = link.release_args(h)
        try:
            ok = await release(**args)
        except BaseException as e:  # (cancelled too: whether it ran is unknown; see Link.until_answered)
            link.unfinished.append((scripts.RELEASE, args))
            if isinstance(e, Exception):
                raise translate(e, link.url) from e
            raise
        if not link.released(h, ok) or h.lost or expired:
            h.lost = True
            raise _lost(self.key)


def _parse_acquire(first: Any, timeout: Any, blocking: Any, default: Optional[float]) -> Optional[float]:
    """The timeout an ``acquire(...)`` call means (see csrc/lockhandle.h,
    the local handle's rules): None for no limit, 0 for a try."""
    if first is not _OMITTED:
        if isinstance(first, bool):
            if blocking is not _OMITTED:
                raise TypeError("acquire() got blocking twice")
            blocking = first
        elif timeout is not _OMITTED:
            raise TypeError("acquire(blocking, timeout): blocking must be a bool")
        else:
            timeout = first
    if blocking is not _OMITTED and not blocking:
        if timeout is not _OMITTED and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        return 0.0
    if timeout is _OMITTED:
        return default
    return _check_acquire_timeout(timeout)


def _lost(key: bytes) -> LockError:
    # (raised also when the server still had it as ours: the release went
    # through, but what it protected may have been changed meanwhile)
    return LockError(f"lock {key!r} was lost (this process's lease ran out, or the server lost it): another "
                     "process may have held it meanwhile")


def _whom(owner: Any) -> str:
    return "thread" if isinstance(owner, int) else "task"


async def _blpop(client: Any, key: bytes, seconds: float) -> Any:
    """``BLPOP key`` in a task of its own, so that cancelling the waiting task
    takes effect at once: redis-py sends with ``asyncio.wait_for``, which on
    Python 3.11 swallows a cancellation that arrives just as the send
    completed, and the BLPOP would then block for its whole slice (the
    waiter leaves the queue either way; a BLPOP left behind finds nothing:
    GIVE_UP empties its list)."""
    t = asyncio.ensure_future(client.blpop([key], timeout=max(0.001, round(seconds, 3))))
    try:
        return await asyncio.shield(t)
    except asyncio.CancelledError:
        t.cancel()
        # (redis-py drops the connection, and with it the blocked BLPOP, in
        # a few turns of the loop; not longer than this when it swallowed
        # that cancellation too)
        await asyncio.wait({t}, timeout=_DROP_WAIT)
        raise


_DROP_WAIT = 0.05  # s
_giving_up: "set[asyncio.Task[None]]" = set()  # (a task the loop only holds weakly)


def _give_up_soon(link: Link, give_up: Any, key: bytes, acq: bytes) -> None:
    """:func:`_give_up` for a task, without blocking its loop: a task of its
    own sends it; the renewer finishes it if that does not (a link down, the
    loop closing)."""
    args = link.give_up_args(key, acq, unanswered=True)
    entry = (scripts.GIVE_UP, args)
    link.unfinished.append(entry)

    async def send() -> None:
        try:
            await give_up(**args)
        except Exception:
            return
        link.finished(entry)

    t = asyncio.get_running_loop().create_task(send())
    _giving_up.add(t)
    t.add_done_callback(_giving_up.discard)


def _give_up(link: Link, key: bytes, acq: bytes) -> None:
    """An acquire ended by an exception: leave the queue, and if the server
    handed or gave us the key before the reply was lost, pass it on.  When
    the server cannot answer now, the renewer tries again until it does."""
    try:
        link.give_up(key, acq, unanswered=True)
    except HubError:
        pass
