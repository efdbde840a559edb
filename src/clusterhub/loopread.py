"""A channel read by an asyncio loop while its coroutines await replies on it.

This is the asyncio counterpart of the leader in ``channel.wait_reply``: a
coroutine awaiting a request's future (``Future.__await__``) on a channel
that nobody reads takes the channel for its loop: the loop watches the
socket with ``add_reader`` and reads it in its own callback, replies
complete the awaiting coroutines' futures directly on the loop's thread,
and the dispatcher thread stops watching meanwhile.  No thread hand-off per
request: that is what made an ``await`` cost several times a synchronous
``result()``.

The dispatcher does not watch the channel during a lead.  The lead lasts
while coroutines of the loop await replies on the channel, and after the
last await until the task that made it ends (one loop turn, outside a
task): a task awaiting request after request keeps it, with no
registration change or extra loop turn per request; the loop may stop
once the task ended, and the dispatcher must read the channel then.  A
frame that comes for nobody awaiting ends it too, and so do a synchronous
request from another thread (an idle loop lets go for it), ``detach()``,
the channel's end and, as a last resort, the loop's collection.  Messages
and requests read by the loop go to the dispatcher's inbox as usual.

A synchronous ``result()`` on the loop's own thread (a handler run on an
attached loop) while its loop leads the channel reads the channel itself
(see ``wait_reply``): the loop is blocked in it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import select
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import _bindings
from ._bindings import reply_rid, take_reply
from .requests import Done, complete_all

if TYPE_CHECKING:
    from .channel import Channel
    from .requests import Future

_IN = select.EPOLLIN
_EOF = _bindings.EOF
_MISS = object()  # (take_reply: not the reply it takes)


class LoopLead:
    """``loop`` reads ``ch`` (it holds the channel's reader lock)."""

    __slots__ = ("ch", "_loop", "thread", "waiting", "released", "_release_due", "_tasks",
                 "__weakref__")

    def __init__(self, ch: "Channel", loop: asyncio.AbstractEventLoop) -> None:
        self.ch = ch
        # (weak: a loop that is gone lets go of the channel, see start)
        self._loop = weakref.ref(loop)
        self.thread = threading.get_ident()  # the loop's (we are on it)
        self.waiting = 0  # coroutines of the loop awaiting a reply on ch
        self.released = False
        self._release_due = False
        self._tasks: set[asyncio.Task[Any]] = set()  # (their end lets go, see done_waiting)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        assert loop is not None, "a released lead's loop"  # (gone: released by the finalizer)
        return loop

    def start(self) -> None:
        ch, loop = self.ch, self.loop
        ch.loop_lead = self
        ch.leader = self.thread  # (so that poke() wakes us: see on_poke)
        self.waiting = 1
        with ch.arming:  # the dispatcher stops watching its input
            ch.disarmed = True
            ch.arm_locked()
        weakref.finalize(loop, _loop_gone, weakref.ref(self))
        loop.add_reader(ch.fd, self.on_readable)
        loop.add_reader(ch.wake_fd, self.on_poke)
        if ch.rx.eof() != _EOF:  # frames left buffered: no event announces them
            loop.call_soon(self.on_readable)

    def on_readable(self) -> None:
        if self.released:
            return
        ch = self.ch
        done: list[Done] = []
        more = False
        if not (ch.closed or ch.dying):
            n = ch.rx.fill(ch.fd)
            if n == 1 and self._took_reply():
                return
            more = ch.router.read(ch, 1, done, n)
        if ch.closed or ch.dying or ch.blockers or self.waiting == 0:
            self.release()  # (the dispatcher takes over: it knows what to do)
        elif more:
            self.loop.call_soon(self.on_readable)
        if ch.dispatcher.inbox:
            ch.dispatcher.wake()  # messages for the handlers (see wait_reply)
        if done:
            complete_all(done)

    def _took_reply(self) -> bool:
        """The batch just read is one frame: if it is the reply a coroutine
        of this loop awaits, complete it (one C call to find whose, one to
        load it; the usual case).  False: route the batch as usual."""
        ch = self.ch
        addr = ch.rx.addr
        rid = reply_rid(addr, 1)
        pending = ch.router.pending
        fut = pending.get(rid) if rid else None
        if fut is None or fut._channel is not ch:
            return False
        value = take_reply(addr, 1, rid, ch.router.loads, _MISS)
        if value is _MISS:
            return False  # (Router.read reports why)
        pending.pop(rid, None)
        if not fut.complete_here(True, value):
            complete_all([(fut, True, value)])
        if self.waiting == 0:
            self.release()
        return True

    def on_poke(self) -> None:
        try:
            os.eventfd_read(self.ch.wake_fd)
        except (BlockingIOError, OSError):
            pass
        if self.ch.closed or self.ch.dying:
            self.release()

    def done_waiting(self) -> None:
        """A coroutine's await ended (on the loop's thread)."""
        self.waiting -= 1
        if self.waiting or self.released or self._release_due:
            return
        task = asyncio.current_task()
        if task is None:  # (a coroutine driven by hand)
            self._release_due = True
            self.loop.call_soon(self._release_if_idle)
        elif task not in self._tasks:
            # Kept while the task lives and no await is pending (a task that
            # awaits request after request costs no extra loop turn); let go
            # when it ends, as the loop may stop then.
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: "asyncio.Task[Any]") -> None:
        self._tasks.discard(task)
        self._release_if_idle()

    def _release_if_idle(self) -> None:
        self._release_due = False
        if self.waiting == 0 and not self.released:
            self.release()

    def release(self, unregister: bool = True) -> None:
        """Let go of the channel (on the loop's thread, or anywhere once the
        loop is closed, with ``unregister`` False)."""
        if self.released:
            return
        self.released = True
        ch = self.ch
        if unregister:
            self.loop.remove_reader(ch.fd)
            self.loop.remove_reader(ch.wake_fd)
        ch.loop_lead = None
        ch.leader = None
        more = not ch.closed and ch.rx.eof() != _EOF
        if ch.closed:
            ch.release_reader()
        else:
            ch.reader.release()
        with ch.arming:
            ch.disarmed = False
            ch.arm_locked()
        if more:  # left buffered: the dispatcher takes them
            ch.dispatcher.call_next(functools.partial(ch.router.on_channel, ch, _IN))

    def abandon(self) -> None:
        """Let go from any thread (the channel closes, the hub detaches): on
        the loop, or here when it is closed or gone."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            self.release(unregister=False)
            return
        if threading.get_ident() == self.thread and loop.is_running():
            self.release()
            return
        try:
            loop.call_soon_threadsafe(self.release)
        except RuntimeError:  # closed meanwhile
            self.release(unregister=False)


def _loop_gone(ref: "weakref.ReferenceType[LoopLead]") -> None:
    lead = ref()
    if lead is not None and not lead.released:
        lead.release(unregister=False)


def lead(fut: "Future[Any]", loop: asyncio.AbstractEventLoop) -> Optional[Callable[[], None]]:
    """``Pending.loop_hook``: as a coroutine of ``loop`` starts awaiting
    ``fut``, lead its channel on the loop if nobody reads it.  Returns what
    to call when the await ends (None: somebody else reads the reply)."""
    ch: Optional["Channel"] = fut._channel
    if ch is None:
        return None
    current = ch.loop_lead
    if current is not None:
        if current.released or current._loop() is not loop:
            return None  # another loop's: it completes fut (see Future._to_loop)
        current.waiting += 1
        return current.done_waiting
    if ch.closed or ch.dying or ch.blockers or not ch.reader.acquire(False):
        return None  # (someone reads it already: they complete fut)
    lead = LoopLead(ch, loop)
    try:
        lead.start()
    except BaseException:
        lead.release(unregister=False)
        raise
    return lead.done_waiting
