"""Request futures and the table of requests waiting for a reply.

Every request ends exactly once: with a result, a remote error, a timeout, a
cancellation or the death of the peer.  A reply is matched by request id *and*
by the peer that was asked; replies nobody waits for any more are dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from typing import Any, Callable, Generator, Optional

log = logging.getLogger("clusterhub")

Callback = Callable[[Optional[BaseException], Any], None]


class Future(concurrent.futures.Future):  # type: ignore[type-arg]
    """A ``concurrent.futures.Future`` that can also be awaited directly.

    ``result()`` and ``exception()`` called from the hub's own dispatching
    thread keep the hub's channels served while they wait (a handler may wait
    for a request it made); a wait that could never be served raises at once.
    """

    # Hook run by result()/exception() before waiting; returns the timeout left.
    _waiter: Callable[["Future", Optional[float]], Optional[float]] | None = None
    _local = False  # answered by this process's own handlers
    _channel: Any = None  # the channel its reply comes on

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self).__await__()

    __iter__ = __await__

    def result(self, timeout: float | None = None) -> Any:
        if self._waiter is not None and not self.done():
            timeout = self._waiter(self, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._waiter is not None and not self.done():
            timeout = self._waiter(self, timeout)
        return super().exception(timeout)


def resolve(fut: concurrent.futures.Future, ok: bool, value: Any) -> None:  # type: ignore[type-arg]
    """Complete ``fut`` unless it already ended (cancelled, timed out)."""
    try:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
    except concurrent.futures.InvalidStateError:
        pass


def add_callback(fut: concurrent.futures.Future, callback: Callback) -> None:  # type: ignore[type-arg]
    """Call ``callback(error, result)`` when ``fut`` ends, node style."""

    def done(f: concurrent.futures.Future) -> None:  # type: ignore[type-arg]
        if f.cancelled():
            callback(concurrent.futures.CancelledError(), None)
        elif f.exception() is not None:
            callback(f.exception(), None)
        else:
            callback(None, f.result())

    fut.add_done_callback(done)


class Pending:
    """Requests sent and not yet answered, by request id."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._by_id: dict[int, tuple[Any, Future]] = {}

    @property
    def lock(self) -> threading.Lock:
        return self._lock

    def add(self, peer: Any, fut: Future) -> int:
        """Register a request to ``peer`` (a channel, or None for local)."""
        with self._lock:
            rid = next(self._ids)
            self._by_id[rid] = (peer, fut)

        def done(_f: Future) -> None:
            with self._lock:
                self._by_id.pop(rid, None)
            # A thread reading this channel for its reply may be waiting on
            # this very future: wake it, unless it is the one completing it.
            if peer is not None and peer.leader not in (None, threading.get_ident()):
                peer.poke()

        fut.add_done_callback(done)
        return rid

    def discard(self, rid: int) -> None:
        with self._lock:
            self._by_id.pop(rid, None)

    def complete(self, peer: Any, rid: int, ok: bool, value: Any) -> None:
        """Deliver a reply from ``peer``; dropped when unknown or from another peer."""
        with self._lock:
            entry = self._by_id.get(rid)
            if entry is None or entry[0] is not peer:
                entry = None
            else:
                del self._by_id[rid]
        if entry is None:
            log.debug("dropping a reply to request %d nobody waits for", rid)
            return
        resolve(entry[1], ok, value)

    def fail(self, rid: int, exc: BaseException) -> None:
        with self._lock:
            entry = self._by_id.pop(rid, None)
        if entry is not None:
            resolve(entry[1], False, exc)

    def fail_peer(self, peer: Any, make_exc: Callable[[], BaseException]) -> None:
        """Fail every request waiting on ``peer``."""
        with self._lock:
            rids = [rid for rid, (p, _f) in self._by_id.items() if p is peer]
            entries = [self._by_id.pop(rid) for rid in rids]
        for _p, fut in entries:
            resolve(fut, False, make_exc())

    def fail_all(self, make_exc: Callable[[], BaseException]) -> None:
        with self._lock:
            entries = list(self._by_id.values())
            self._by_id.clear()
        for _p, fut in entries:
            resolve(fut, False, make_exc())

    def clear(self) -> None:
        """Forget everything (in a fork child: those were the parent's)."""
        self._by_id = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_id)
