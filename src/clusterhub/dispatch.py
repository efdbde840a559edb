"""The dispatcher: one background thread per hub and process.

It waits in epoll on the hub's sockets and a wake-up eventfd
(no polling: an idle hub costs no CPU), runs timers (request timeouts), and
runs handlers one at a time in arrival order.  Incoming frames are routed by
the hub's callbacks: replies complete futures at once; messages and requests
go to the inbox, which is drained by this thread, or on the asyncio loop the
hub is attached to.

A handler that waits for a future (a request it made) on this thread keeps
the sockets served by polling from inside the wait (``pump``); messages that
arrive meanwhile wait in the inbox until the handler returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import inspect
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from . import sched
from ._bindings import Spin
from .handlers import Registry
from .remote import NoHandler

log = logging.getLogger("clusterhub")

Reply = Callable[[bool, Any], None]
# An inbox item: (name, data, sender, reply).  name None: data is a callable
# to run as data(sender) (worker exit callbacks, in order with messages).
Item = tuple[Optional[str], Any, Any, Optional[Reply]]


_MAX_EVENTS = 64  # per epoll_wait (more just wait for the next turn)


class Timer:
    __slots__ = ("when", "fn", "_owner")

    def __init__(self, when: float, fn: Callable[[], None] | None, owner: "Dispatcher") -> None:
        self.when = when
        self.fn = fn
        self._owner = owner

    def cancel(self) -> None:
        if self.fn is not None:
            self.fn = None
            self._owner.cancelled_timers += 1  # approximate: only a hint to compact


class Dispatcher:
    def __init__(self, name: str, batch: bool = True, spin: float = 0.0) -> None:
        self.name = name
        self.batch = batch  # run the thread under SCHED_BATCH (see sched.py)
        self.spin_cap = spin  # (seconds: see Hub)
        self.registry = Registry()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._private_loop: asyncio.AbstractEventLoop | None = None
        self._private_thread: threading.Thread | None = None
        self._setup()

    def _setup(self) -> None:
        # Raw epoll: registrations may be changed from any thread (a requester
        # disarms its channel while it reads its own reply); the callback map
        # is only ever changed by single, GIL-atomic dict operations.
        self.epoll = select.epoll()  # (Hub registers its channels here itself)
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.register(self._wake_fd, select.EPOLLIN, self._on_wake)
        self._ops: deque[Callable[[], None]] = deque()
        self.inbox: deque[Item] = deque()
        # Right after answering a worker's request, its next one is likely
        # within microseconds: the thread spins on the epoll before it sleeps
        # (see _main and csrc/wait.h).  answered: that worker's pid, 0: none.
        self.answered = 0
        self._spin = Spin(self.spin_cap)
        self._spin_ready = self._spin.spinner(self.epoll.fileno())
        self._timers: list[tuple[float, int, Timer]] = []
        self._tcond = threading.Condition(threading.Lock())
        self._tseq = itertools.count()
        self._timer_thread: threading.Thread | None = None
        self.cancelled_timers = 0
        self._thread: threading.Thread | None = None
        self.ident: int | None = None  # the dispatcher thread
        self.handler_ident: int | None = None  # where handlers run (thread or loop)
        self._loop_scheduled = False
        self._drain_lock = threading.Lock()  # one drainer at a time (thread or loop)
        self._stopping = False
        # stop() may abandon a thread stuck in a handler; whichever of the two
        # comes last closes the fds (under _fd_lock).
        self._fd_lock = threading.Lock()
        self._thread_done = False
        self._abandoned = False

    # ---- life cycle -----------------------------------------------------

    def start(self) -> None:
        t = threading.Thread(target=self._main, name=f"clusterhub-{self.name}", daemon=True)
        self._thread = t
        t.start()
        if self.batch:
            sched.batch(_tid(t))  # (here, not in the thread: done when start() returns)

    def stop(self, grace: float | None = None) -> bool:
        """Stop the thread and close its fds; messages not yet handled are dropped.

        Waits up to ``grace`` seconds (None: no limit) for a handler still
        running (not when called from a handler).  Returns False when one
        did not return in time: the thread is then abandoned; it runs no
        further handler and closes the fds itself if the handler returns.
        """
        self._stopping = True
        self.inbox.clear()  # (a handler still running is followed by no other)
        self.wake()
        with self._tcond:
            self._tcond.notify()  # the timer thread ends too
        t = self._thread
        finished = True
        interrupted: BaseException | None = None
        if t is not None and t.ident != threading.get_ident():
            try:
                t.join(grace)
            except KeyboardInterrupt as e:  # (Ctrl-C while closing: clean up first)
                interrupted = e
            finished = not t.is_alive()
        if t is not None and t.native_id is not None:
            sched.forget(t.native_id)
        with self._fd_lock:
            if finished or self._thread_done:
                self._close_fds()
            else:
                self._abandoned = True
        loop, self._private_loop = self._private_loop, None
        if loop is not None:  # its thread closes it once stopped (see _get_private_loop)
            loop.call_soon_threadsafe(loop.stop)
            t = self._private_thread
            if t is not None and t.ident != threading.get_ident():
                if interrupted is None:
                    t.join(5.0 if grace is None else grace)
                finished = finished and not t.is_alive()
        if interrupted is not None:
            raise interrupted
        return finished

    def _close_fds(self) -> None:
        if self._wake_fd >= 0:
            self.epoll.close()
            os.close(self._wake_fd)
            self._wake_fd = -1

    def reinit_after_fork(self, name: str) -> None:
        """In a fork child: the thread is gone and the epoll instance is
        shared with the parent, so drop our copies and start afresh."""
        self.epoll.close()  # only our descriptor: the parent's epoll lives on
        try:
            os.close(self._wake_fd)
        except OSError:
            pass
        self.name = name
        self.registry.reset_lock()
        self.loop = None
        self._private_loop = None
        self._setup()

    def abandon(self) -> None:
        """In a child forked by other code: close our fds, run nothing."""
        self._stopping = True
        self.epoll.close()
        try:
            os.close(self._wake_fd)
        except OSError:
            pass

    @property
    def native_id(self) -> int:
        """The thread's kernel id (0 before it started)."""
        t = self._thread
        return 0 if t is None or t.native_id is None else t.native_id

    @property
    def on_thread(self) -> bool:
        return threading.get_ident() == self.ident

    def wake(self) -> None:
        if threading.get_ident() != self.ident:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass  # closed: stopping

    def _on_wake(self, _mask: int) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the dispatcher thread (selector changes live there)."""
        if threading.get_ident() == self.ident:
            fn()
        else:
            self._ops.append(fn)
            self.wake()

    def call_next(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the dispatcher thread at its next turn, never inline
        (the caller may hold what ``fn`` needs; handlers get their turn
        between two such calls)."""
        self._ops.append(fn)
        self.wake()  # off the thread; on it, the loop does not block while ops wait

    # epoll registrations: any thread may call these
    def register(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        self._callbacks[fd] = callback
        self.epoll.register(fd, events)

    def set_callback(self, fd: int, callback: Callable[[int], None]) -> None:
        """The callback for ``fd``, which the caller registers in ``epoll`` itself."""
        self._callbacks[fd] = callback

    def unregister(self, fd: int) -> None:
        self._callbacks.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass

    # ---- timers ---------------------------------------------------------

    # Timers have a thread of their own (started on first use): a handler
    # keeping the dispatcher thread busy must not hold back request timeouts.

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` on the timer thread after ``delay`` seconds."""
        when = time.monotonic() + delay
        timer = Timer(when, fn, self)
        with self._tcond:
            timers = self._timers
            if self.cancelled_timers >= 64 and 2 * self.cancelled_timers >= len(timers):
                # Mostly cancelled (answered requests): drop them, or long
                # timeouts would keep every answered request's timer alive.
                timers[:] = [t for t in timers if t[2].fn is not None]
                heapq.heapify(timers)
                self.cancelled_timers = 0
            heapq.heappush(timers, (when, next(self._tseq), timer))
            if self._timer_thread is None:
                t = self._timer_thread = threading.Thread(
                    target=self._run_timers, name=f"clusterhub-{self.name}-timers", daemon=True
                )
                t.start()
                if sched.is_batched():  # (started by a handler)
                    sched.reset(_tid(t))
            elif self._timers[0][2] is timer:
                self._tcond.notify()
        return timer

    def _run_timers(self) -> None:
        timers, cond = self._timers, self._tcond
        while True:
            with cond:
                while True:
                    if self._stopping:
                        return
                    while timers and timers[0][2].fn is None:
                        heapq.heappop(timers)  # cancelled
                    left = timers[0][0] - time.monotonic() if timers else None
                    if left is not None and left <= 0:
                        timer = heapq.heappop(timers)[2]
                        break
                    # (capped: a huge or infinite timeout overflows the wait)
                    cond.wait(None if left is None else min(left, 86400.0))
            fn, timer.fn = timer.fn, None
            if fn is not None:
                try:
                    fn()
                except Exception:
                    log.exception("clusterhub timer callback failed")

    def _timeout(self) -> float | None:
        return 0 if self._ops else None

    # ---- the loop -------------------------------------------------------

    def _main(self) -> None:
        self.ident = threading.get_ident()
        if self.loop is None:
            self.handler_ident = self.ident
        inbox, ops, poll = self.inbox, self._ops, self.poll
        spin_peer, spin_ready = self._spin.set_peer, self._spin_ready
        peer = 0
        try:
            while not self._stopping:
                if self.answered:
                    if self.answered != peer:
                        peer = self.answered
                        spin_peer(peer)
                    self.answered = 0
                    spin_ready()
                poll(0 if ops else None)
                if inbox:
                    if self.loop is None:
                        self.drain()
                    else:
                        self._schedule_on_loop()
        except Exception:  # a bug of ours: say so loudly rather than hang silently
            if not self._stopping:
                log.critical("clusterhub dispatcher %s crashed", self.name, exc_info=True)
                raise
        finally:
            with self._fd_lock:
                self._thread_done = True
                if self._abandoned:  # stop() gave up waiting for us: ours to close
                    self._close_fds()

    def poll(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` for events and handle them (no handlers run)."""
        ops = self._ops
        if ops:
            for _ in range(len(ops)):  # not those they add: see call_next
                ops.popleft()()
        try:
            # (maxevents bounded: by default CPython allocates room for 1023
            # events on every call, a cost per wake-up.)
            events = self.epoll.poll(-1 if timeout is None else timeout, _MAX_EVENTS)
        except InterruptedError:
            events = []
        callbacks = self._callbacks
        for fd, ev in events:
            cb = callbacks.get(fd)
            if cb is not None:
                cb(ev)
        if ops:
            for _ in range(len(ops)):
                ops.popleft()()

    def pump_until(self, done: Callable[[], bool], timeout: float | None) -> None:
        """On the dispatcher thread: serve the sockets until ``done()`` or timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            wait = self._timeout()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                wait = left if wait is None else min(wait, left)
            self.poll(wait)

    # ---- handlers -------------------------------------------------------

    def post(self, item: Item) -> None:
        """Queue an item from any thread (local messages, exit callbacks)."""
        self.inbox.append(item)
        if self.loop is not None:
            self._schedule_on_loop()
        else:
            self.wake()

    def _schedule_on_loop(self) -> None:
        loop = self.loop
        if loop is None:
            return
        # Closed under us, perhaps with a delivery scheduled that will never
        # run (so _loop_scheduled may be stale): the thread takes over.
        if not loop.is_closed():
            if self._loop_scheduled:
                return
            self._loop_scheduled = True
            try:
                loop.call_soon_threadsafe(self._drain_on_loop)
                return
            except RuntimeError:  # closed meanwhile
                pass
        self._loop_scheduled = False
        self.loop = None
        self.handler_ident = self.ident
        self.wake_self()  # wake() is a no-op on the dispatcher thread, which may be here

    def _drain_on_loop(self) -> None:
        self._loop_scheduled = False
        if self.loop is None:  # detached meanwhile: the thread takes over
            self.wake()
            return
        self.handler_ident = threading.get_ident()
        self.drain()

    def drain(self) -> None:
        if not self._drain_lock.acquire(False):
            return  # the other drainer (thread or loop) is at it; it re-delivers
        try:
            inbox, registry = self.inbox, self.registry
            once, lookup = registry.with_once, registry.get
            while inbox:
                name, data, sender, reply = inbox.popleft()
                if name is None:
                    try:
                        data(sender)
                    except Exception:
                        log.exception("clusterhub callback failed")
                    continue
                # (run_handlers, inline: this is the per-message hot path)
                handlers = registry.take(name) if name in once else lookup(name, ())
                if not handlers:
                    self._unhandled(name, reply)
                for h in handlers:
                    try:
                        r = h(data, sender)
                    except Exception as e:
                        self._raised(e, h, name, reply)
                    else:
                        if reply is not None:
                            if r is None or r.__class__ in _PLAIN:
                                reply(True, r)
                            else:
                                self.answer(r, reply)
                        elif r is not None and inspect.isawaitable(r):
                            self.run_awaitable(r, None)
                    reply = None  # the first handler answers a request
        finally:
            self._drain_lock.release()
        if self.inbox:  # arrived as we let go, or attached/detached meanwhile
            if self.loop is not None:
                self._schedule_on_loop()
            else:
                self.wake_self()

    def wake_self(self) -> None:
        try:
            os.eventfd_write(self._wake_fd, 1)
        except OSError:
            pass

    # ---- asyncio ----------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run handlers on ``loop`` from now on."""
        self.loop = loop
        try:
            if asyncio.get_running_loop() is loop:
                self.handler_ident = threading.get_ident()
        except RuntimeError:
            pass
        if self.inbox:
            self._schedule_on_loop()

    def detach(self) -> None:
        """Run handlers on the dispatcher thread again."""
        self.loop = None
        self.handler_ident = self.ident
        self.wake_self()

    @staticmethod
    def _unhandled(name: str, reply: Reply | None) -> None:
        if reply is not None:
            reply(False, NoHandler(name))
        else:
            log.debug("no handler for message %r: dropped", name)

    @staticmethod
    def _raised(e: Exception, h: Any, name: str, reply: Reply | None) -> None:
        if reply is not None:
            reply(False, e)
        else:
            log.exception("handler %r for %r raised", h, name)

    def answer(self, r: Any, reply: Reply) -> None:
        """Answer a request with a handler's return value, now or when it ends."""
        if r is None or r.__class__ in _PLAIN:
            reply(True, r)
        elif isinstance(r, concurrent.futures.Future):
            r.add_done_callback(lambda f: _reply_from_future(f, reply))
        elif inspect.isawaitable(r):
            self.run_awaitable(r, reply)
        else:
            reply(True, r)

    def run_awaitable(self, aw: Any, reply: Reply | None) -> None:
        """Start ``aw`` on the attached loop (or a private one) in call order."""
        loop = self.loop or self._get_private_loop()

        async def run() -> Any:
            return await aw

        def start() -> None:
            task = loop.create_task(run())
            task.add_done_callback(lambda t: _reply_from_future(t, reply))

        if self.loop is not None and threading.get_ident() == self.handler_ident:
            start()
        else:
            loop.call_soon_threadsafe(start)

    def _get_private_loop(self) -> asyncio.AbstractEventLoop:
        if self._private_loop is None:
            loop = asyncio.new_event_loop()

            def run() -> None:
                try:
                    loop.run_forever()
                finally:
                    loop.close()  # (else a ResourceWarning when it is collected)

            t = threading.Thread(target=run, name=f"clusterhub-{self.name}-aio", daemon=True)
            t.start()
            if sched.is_batched():
                sched.reset(_tid(t))
            self._private_loop, self._private_thread = loop, t
        return self._private_loop


def _tid(t: threading.Thread) -> int:
    """A started thread's kernel id."""
    assert t.native_id is not None
    return t.native_id


# Return values that are certainly not futures nor awaitables (skips the
# costlier checks for the common answers).
_PLAIN = frozenset((int, float, str, bytes, bool, list, dict, tuple, set))


def _reply_from_future(f: Any, reply: Reply | None) -> None:
    if f.cancelled():
        err: BaseException | None = concurrent.futures.CancelledError()
    else:
        err = f.exception()
    if reply is None:
        if err is not None and not isinstance(err, concurrent.futures.CancelledError):
            log.error("async handler failed", exc_info=err)
        return
    if err is not None:
        reply(False, err)
    else:
        reply(True, f.result())
