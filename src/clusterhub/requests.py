"""Request futures and the table of requests waiting for a reply.

Every request ends exactly once: with a result, a remote error, a timeout, a
cancellation or the death of the peer.  A reply is matched by request id *and*
by the peer that was asked; replies nobody waits for any more are dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Generator, Optional, TypeVar

from . import protocol
from .checks import check_callback, check_timeout
from .errors import HubError, MasterDied, PeerDied
from .remote import as_remote_error

if TYPE_CHECKING:
    from .transport import Endpoint

log = logging.getLogger("clusterhub")

Callback = Callable[[Optional[BaseException], Any], None]
T = TypeVar("T")
_new_lock = threading.Lock




_base_init = concurrent.futures.Future.__init__
_new_future = object.__new__
_known_names = protocol.known_names


class Future(concurrent.futures.Future[T]):
    """A ``concurrent.futures.Future`` that can also be awaited directly.

    ``result()`` and ``exception()`` first run a hook: a requester whose
    reply comes on a channel nobody reads reads it itself (no hand-off from
    the dispatcher thread); on the hub's own dispatching thread the hook keeps
    the channels served while it waits (a handler may wait for a request it
    made); a wait that could never be served raises at once.

    It uses the base class through its public methods only, and only when
    needed: the base's constructor (which makes a ``threading.Condition``)
    runs when a thread must block, a callback is added, the future is
    cancelled, or other code touches its internals (``concurrent.futures.wait``
    does).  Until then the outcome is kept here, which saves about 5 µs per
    request round trip (measured): most replies are read by the very thread
    that waits for them, and nothing else ever looks.

    Awaited, it completes an asyncio future of the awaiting loop directly
    (``_to_loop``: at once when completed on that loop's thread, else
    through ``call_soon_threadsafe``), without the base class; and a reply
    on a channel nobody reads is read by the awaiting loop itself (the
    Pending table's loop hook, see loopread.py).
    """

    # Hook run by result()/exception() before waiting; returns the timeout left.
    _waiter: Callable[["Future[Any]", Optional[float]], Optional[float]] | None = None
    _local = False  # answered by this process's own handlers
    _channel: Any = None  # the channel its reply comes on
    _rid = 0  # its id in the Pending table
    _pending: Optional["Pending"] = None  # the table it waits in
    _based = False  # the base class is set up (from then on it keeps the state)
    _outcome: Optional[tuple[bool, Any]] = None  # before that: (ok, result or exception)
    _aloop: Any = None  # the loop awaiting it, and its future there (see __await__)
    _afut: Any = None

    def __init__(self, waiter: Any = None, channel: Any = None) -> None:
        self._guard = _new_lock()  # (orders completion against setting up the base)
        if waiter is not None:
            self._waiter = waiter
            self._channel = channel

    def _base(self) -> None:
        """Set up the base class (once), handing it the outcome if there is one."""
        with self._guard:
            if self._based:
                return
            _base_init(self)
            self._based = True
            outcome = self._outcome
            awaited = self._afut is not None
        if awaited:  # (from now on the base completes it: forward from there)
            super().add_done_callback(self._forward_base)
        if outcome is not None:
            try:
                if outcome[0]:
                    super().set_result(outcome[1])
                else:
                    super().set_exception(outcome[1])
            except concurrent.futures.InvalidStateError:
                pass

    def __getattr__(self, name: str) -> Any:
        # Only for names not found: the base's internals, before they exist.
        if name.startswith("__") or self._based:
            raise AttributeError(name)
        self._base()
        return object.__getattribute__(self, name)

    def __await__(self) -> Generator[Any, None, T]:
        if not self.done():
            loop = asyncio.get_running_loop()
            afut = loop.create_future()
            with self._guard:
                based = self._based
                if not based:
                    if self._afut is not None:  # (awaited twice: the base forwards to both)
                        based = True
                    else:
                        self._aloop, self._afut = loop, afut
                        outcome = self._outcome
            if based:
                self.add_done_callback(functools.partial(_forward_from, loop, afut))
            elif outcome is not None:  # (completed meanwhile)
                _to_loop(loop, afut, *outcome)
            lead = None if self._pending is None or self._local else self._pending.loop_hook
            release = lead(self, loop) if lead is not None else None
            try:
                yield from afut
            except asyncio.CancelledError:
                if afut.cancelled():  # (the awaiting task was cancelled)
                    self.cancel()
                raise
            finally:
                if release is not None:
                    release()
        return self.result()

    __iter__ = __await__

    def complete_here(self, ok: bool, value: Any) -> bool:
        """Complete it if nothing else could run: True when done so; False
        when the base class is set up (a callback, a blocked thread may be
        there), which the caller then does with ``resolve`` outside its locks."""
        with self._guard:
            if self._based:
                return False
            if self._outcome is None:
                self._outcome = (ok, value)
                if self._afut is not None:
                    _to_loop(self._aloop, self._afut, ok, value)
            return True

    def _forward_base(self, f: concurrent.futures.Future[Any]) -> None:
        _forward_from(self._aloop, self._afut, f)

    def done(self) -> bool:
        return super().done() if self._based else self._outcome is not None

    def cancelled(self) -> bool:
        return self._based and super().cancelled()

    def running(self) -> bool:
        return self._based and super().running()

    def cancel(self) -> bool:
        self._base()
        if not super().cancel():
            return False
        if self._pending is not None:
            self._pending.ended(self)
        return True

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        self._base()
        super().add_done_callback(fn)

    def set_running_or_notify_cancel(self) -> bool:
        self._base()
        return super().set_running_or_notify_cancel()

    def set_result(self, result: Any) -> None:
        self._set(True, result)

    def set_exception(self, exception: Optional[BaseException]) -> None:
        self._set(False, exception)

    def _set(self, ok: bool, value: Any) -> None:
        with self._guard:
            based = self._based
            if not based and self._outcome is None:
                self._outcome = (ok, value)
                if self._afut is not None:
                    _to_loop(self._aloop, self._afut, ok, value)
                return
        if not based:  # (raised outside the guard: repr sets up the base)
            raise concurrent.futures.InvalidStateError(f"already done: {self!r}")
        if ok:
            super().set_result(value)
        else:
            super().set_exception(value)

    def _settled(self, timeout: Optional[float]) -> tuple[Optional[tuple[bool, Any]], Optional[float]]:
        """Run the hook if still pending; (the outcome kept here, or None
        when the base class has it; the timeout left)."""
        if not self._based:
            if self._outcome is None and self._waiter is not None:
                timeout = self._waiter(self, timeout)
            outcome = self._outcome
            if outcome is not None and not self._based:
                return outcome, timeout
            self._base()  # (to block, or it was set up meanwhile)
        elif self._waiter is not None and not super().done():
            timeout = self._waiter(self, timeout)
        return None, timeout

    def result(self, timeout: float | None = None) -> T:
        if self._based:
            outcome, timeout = self._settled(timeout)
        else:  # (_settled inlined: the request hot path)
            if self._outcome is None and self._waiter is not None:
                timeout = self._waiter(self, timeout)
            outcome = self._outcome
            if outcome is None or self._based:
                self._base()  # (to block, or it was set up meanwhile)
                outcome = None
        if outcome is None:
            return super().result(timeout)
        if outcome[0]:
            return outcome[1]  # type: ignore[no-any-return]
        exc = outcome[1]
        try:
            raise exc
        finally:
            exc = None  # break the reference cycle through the traceback

    def exception(self, timeout: float | None = None) -> BaseException | None:
        outcome, timeout = self._settled(timeout)
        if outcome is None:
            return super().exception(timeout)
        return None if outcome[0] else outcome[1]


def _settle(afut: "asyncio.Future[Any]", ok: bool, value: Any) -> None:
    if not afut.done():  # (cancelled meanwhile, or forwarded twice)
        if ok:
            afut.set_result(value)
        else:
            afut.set_exception(value)


def _to_loop(loop: asyncio.AbstractEventLoop, afut: "asyncio.Future[Any]", ok: bool, value: Any) -> None:
    """Complete ``afut`` of ``loop``: at once on that loop's thread (which
    only schedules its callbacks), else through the loop's thread-safe call."""
    if _running_loop() is loop:
        _settle(afut, ok, value)
    else:
        try:
            loop.call_soon_threadsafe(_settle, afut, ok, value)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits any more


def _forward_from(loop: asyncio.AbstractEventLoop, afut: "asyncio.Future[Any]",
                  f: concurrent.futures.Future[Any]) -> None:
    """A done callback: pass ``f``'s outcome (or cancellation) on to ``afut``."""
    if f.cancelled():
        if _running_loop() is loop:
            afut.cancel()
        else:
            try:
                loop.call_soon_threadsafe(afut.cancel)
            except RuntimeError:
                pass
        return
    exc = f.exception()
    _to_loop(loop, afut, exc is None, f.result() if exc is None else exc)


_running_loop = asyncio._get_running_loop  # (public as asyncio.get_running_loop, minus the raise)


# A completion held back (see resolve): the future, whether it succeeded, and
# its result or exception.
Done = tuple[Future[Any], bool, Any]


def resolve(
    fut: concurrent.futures.Future[Any], ok: bool, value: Any,
    defer: Optional[list[Done]] = None,
) -> None:
    """Complete ``fut`` unless it already ended (cancelled, timed out).

    With ``defer``, a completion that may run code (done callbacks, a thread
    to wake: see ``Future.complete_here``) is appended there for the caller to
    make (``complete_all``) once it holds nothing that code could need, such
    as a channel's reader lock; one that runs nothing is made at once.
    """
    if defer is not None:
        if not (isinstance(fut, Future) and fut.complete_here(ok, value)):
            defer.append((fut, ok, value))  # type: ignore[arg-type]
        return
    try:
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
    except concurrent.futures.InvalidStateError:
        pass  # ended meanwhile (cancelled)


def complete_all(done: list[Done]) -> None:
    """Make the completions ``resolve(..., defer=done)`` held back."""
    for fut, ok, value in done:
        resolve(fut, ok, value)


def add_callback(fut: concurrent.futures.Future[Any], callback: Callback) -> None:
    """Call ``callback(error, result)`` when ``fut`` ends, node style."""

    def done(f: concurrent.futures.Future[Any]) -> None:
        if f.cancelled():
            callback(concurrent.futures.CancelledError(), None)
        elif f.exception() is not None:
            callback(f.exception(), None)
        else:
            callback(None, f.result())

    fut.add_done_callback(done)


class Pending:
    """Requests sent and not yet answered, by request id.

    Entries are futures carrying their id and peer; single dict operations
    (atomic under the GIL) keep it consistent without a lock of its own.
    Every way a request ends takes it out: a reply (``complete``), a failure
    (``fail``, ``fail_peer``, ``fail_all``) or ``Future.cancel``.
    """

    def __init__(self, dispatcher: Any, remote_hook: Callable[[Future[Any], Optional[float]], Optional[float]]) -> None:
        self._dispatcher = dispatcher  # its timers (timeouts) and thread (a wait there pumps)
        self._remote_hook = remote_hook  # result()'s hook for a reply on a channel
        self._local_hook = self._wait_local  # (bound once: made per request otherwise)
        # Run as loop_hook(fut, loop) by an await on a channel request: the
        # loop may read the reply itself; returns what to call once it came.
        self.loop_hook: Optional[Callable[[Future[Any], asyncio.AbstractEventLoop],
                                          Optional[Callable[[], None]]]] = None
        self._ids = itertools.count(1)
        self._by_id: dict[int, Future[Any]] = {}
        self.get = self._by_id.get
        self.pop = self._by_id.pop

    def add(self, fut: Future[Any]) -> int:
        """Register a request (its ``_channel`` set: the peer asked, or None
        for this process's own handlers); returns its id."""
        rid = fut._rid = next(self._ids)
        fut._pending = self
        self._by_id[rid] = fut
        return rid

    def open(
        self, hook: Any, channel: Any, timeout: Optional[float], callback: Optional[Callback],
    ) -> tuple[Future[Any], int]:
        """A new request's future, registered (with its callback, and a
        timer failing it with TimeoutError after ``timeout`` s): (future, id).
        ``hook``, ``channel``: see Future."""
        fut: Future[Any] = Future(hook, channel)
        rid = self.add(fut)
        if callback is not None:
            add_callback(fut, callback)
        if timeout is not None:
            timer = self._dispatcher.call_later(
                timeout, lambda: self.fail(rid, TimeoutError(f"no reply within {timeout} s"))
            )
            fut.add_done_callback(lambda _f: timer.cancel())
        return fut, rid

    # ---- requests: sent on a channel, to this process's handlers, or failed at once

    def send(
        self, ch: "Optional[Endpoint]", origin: int, name: str, body: bytes,
        timeout: Optional[float], callback: Optional[Callback],
    ) -> Future[Any]:
        """Send a request on channel ``ch`` (None: a worker whose master is
        gone) from worker ``origin`` (0: the master); its future."""
        if timeout is None and callback is None:  # (the common case, inline)
            try:
                nb = _known_names[name]
            except (KeyError, TypeError):
                nb = protocol.encode_name(name)  # (checks it)
            # (Future(self._remote_hook, ch) and add(), inlined)
            fut: Future[Any] = _new_future(Future)
            fut._guard = _new_lock()
            fut._waiter = self._remote_hook
            fut._channel = ch
            rid = fut._rid = next(self._ids)
            fut._pending = self
            self._by_id[rid] = fut
        else:
            nb = protocol.encode_name(name)
            check_timeout(timeout)
            if callback is not None:
                check_callback(callback)
            fut, rid = self.open(self._remote_hook, ch, timeout, callback)
        if ch is None:
            self.fail(rid, MasterDied("the master has died"))
            return fut
        left = ch.send_request(protocol.REQ, origin, rid, nb, len(nb), body, len(body))
        if left:
            try:
                ch.sent_part(left, True, len(nb) + len(body))
            except PeerDied as e:
                self.fail(rid, e)
            except BaseException:
                self.discard(rid)
                raise
        return fut

    def local(
        self, name: str, data: Any, timeout: Optional[float], callback: Optional[Callback]
    ) -> Future[Any]:
        """A request to this process's own handlers (the master's
        request_master): posted to the dispatcher, not serialized."""
        protocol.encode_name(name)
        check_timeout(timeout)
        if callback is not None:
            check_callback(callback)
        fut, rid = self.open(self._local_hook, None, timeout, callback)
        fut._local = True

        def reply(ok: bool, value: Any) -> None:
            self.complete(None, rid, ok, value if ok else as_remote_error(value))

        self._dispatcher.post((name, data, None, reply))
        return fut

    def failed(self, exc: Optional[BaseException], callback: Optional[Callback]) -> Future[Any]:
        """A future that is not a request: failed with ``exc`` at once, or
        (``exc`` None) pending, for the caller to complete."""
        fut: Future[Any] = Future(self._local_hook)
        if callback is not None:
            check_callback(callback)
            add_callback(fut, callback)
        if exc is not None:
            fut.set_exception(exc)
        return fut

    def _wait_local(self, fut: Future[Any], timeout: Optional[float]) -> Optional[float]:
        """``Future.result()``'s hook for a future completed in this process:
        refuse a wait that could never end; on the dispatcher thread, serve
        the sockets meanwhile.  Returns the timeout left."""
        d = self._dispatcher
        me = threading.get_ident()
        if fut._local and me == d.handler_ident:
            raise HubError(
                "waiting here for a request to this process's own handlers would "
                "never end: they run on this very thread (use a callback or await)"
            )
        if me == d.ident:
            fut.add_done_callback(lambda _f: d.wake())
            d.pump_until(fut.done, timeout)
            return 0 if timeout is not None else None
        return timeout

    # ---- bookkeeping --------------------------------------------------------

    def ended(self, fut: Future[Any]) -> None:
        """``fut`` ended other than by its reply (cancelled): forget it, and
        wake a thread that may be reading its channel for it."""
        self._by_id.pop(fut._rid, None)
        _wake_leader(fut)

    def reset(self) -> None:
        """Forget every request (in a fork child: they are the parent's)."""
        self._by_id.clear()

    def discard(self, rid: int) -> None:
        self._by_id.pop(rid, None)

    def complete(
        self, peer: Any, rid: int, ok: bool, value: Any, defer: Optional[list[Done]] = None
    ) -> None:
        """Deliver a reply from ``peer``; dropped when unknown or from another
        peer.  ``defer``: see ``resolve``."""
        fut = self._by_id.get(rid)
        if fut is None or fut._channel is not peer:
            log.debug("dropping a reply to request %d nobody waits for", rid)
            return
        self._by_id.pop(rid, None)  # now: its callbacks may run later
        resolve(fut, ok, value, defer)

    # Failing a request: out of the table first (its callbacks, run by
    # resolve, may look), then completed, then its leader woken (which must
    # find it done).

    def fail(self, rid: int, exc: BaseException) -> None:
        fut = self._by_id.pop(rid, None)
        if fut is not None:
            resolve(fut, False, exc)
            _wake_leader(fut)

    def fail_peer(self, peer: Any, make_exc: Callable[[], BaseException]) -> None:
        """Fail every request waiting on ``peer``."""
        for fut in [f for f in self._by_id.values() if f._channel is peer]:
            self.fail(fut._rid, make_exc())

    def fail_all(self, make_exc: Callable[[], BaseException]) -> None:
        for rid in list(self._by_id):
            self.fail(rid, make_exc())

    def __len__(self) -> int:
        return len(self._by_id)


def _wake_leader(fut: Future[Any]) -> None:
    """Wake a thread reading ``fut``'s channel for it, unless that is us."""
    peer = fut._channel
    if peer is not None and peer.leader is not None and peer.leader != threading.get_ident():
        peer.poke()


def gather(
    parts: list[tuple[int, Future[Any]]], agg: Future[dict[int, Any]]
) -> Future[dict[int, Any]]:
    """Complete ``agg`` with ``{id: result or the exception it ended with}``
    once every part ended (request_workers); cancelling ``agg`` cancels the
    parts."""
    results: dict[int, Any] = {}
    left = [len(parts)]
    lock = threading.Lock()

    def collect(key: int, f: Future[Any]) -> None:
        if f.cancelled():
            return
        err = f.exception()
        with lock:
            results[key] = err if err is not None else f.result()
            left[0] -= 1
            done = left[0] == 0
        if done:
            resolve(agg, True, {k: results[k] for k, _f in parts})

    for key, f in parts:
        f.add_done_callback(functools.partial(collect, key))
    if not parts:
        resolve(agg, True, {})
    agg.add_done_callback(lambda a: [f.cancel() for _k, f in parts] if a.cancelled() else None)
    return agg
