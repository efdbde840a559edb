"""One end of a framed socketpair: send queue, receive buffer and state.

A channel never blocks by itself.  ``send`` writes what the socket takes and
queues the rest; whoever must wait for room (``wait_room``) polls for POLLOUT.

Receiving is done by one thread at a time: the holder of ``reader``.  That is
usually the dispatcher; a thread waiting for a reply on this channel takes it
when it is free and reads its reply itself (leader/follower), which saves a
thread hand-off per request, spinning briefly before it sleeps when that
pays (``Channel.wait``, csrc/wait.h); an asyncio loop whose coroutines await
replies takes it the same way (loopread.py).  ``poke()`` wakes such a leader
early (its request ended some other way, or the peer is gone).
"""

from __future__ import annotations

import errno
import functools
import os
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import _bindings
from ._bindings import PeerGone, Rx, Spin, Tx, take_reply
from .errors import MasterDied, PeerDied, SendTimeout, WorkerDied
from .requests import Done, Future, complete_all

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .loopread import LoopLead
    from .process import Worker
    from .router import Router

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
# A channel's registration is level-triggered and EPOLLEXCLUSIVE (see
# Channel.lep): no epoll_ctl per message or per request.
_EXCLUSIVE = select.EPOLLEXCLUSIVE
_EOF = _bindings.EOF
_EINTR = -errno.EINTR
_MISS = object()  # (take_reply: not the batch it takes)
_get_ident = threading.get_ident


class Channel:
    """A framed, non-blocking socket endpoint to one peer process."""

    __slots__ = (
        "fd", "peer", "max_len", "max_queue", "rx", "tx", "_lock", "closed",
        "reader", "leader", "dying", "wake_fd", "_fds_open", "blockers", "held_back",
        "mask", "arming", "disarmed", "lep", "send", "send_msg", "send_request", "post", "post_msg",
        "pending", "unowned", "room_waiters", "read_ctx", "dispatcher", "router",
        "peer_pid", "spin", "wait", "lead_ctx", "loop_lead",
    )

    def __init__(self, fd: int, peer: Any, max_len: int, max_queue: int,
                 dispatcher: "Dispatcher", router: "Router", spin: float, peer_pid: int,
                 peer_tid: int = 0) -> None:
        self.fd = fd
        self.dispatcher = dispatcher  # whose epoll watches this channel
        self.router = router  # who reads it and routes what came
        self.peer = peer  # the Worker at the other end, or None for the master
        self.max_len = max_len
        self.max_queue = max_queue
        self.rx = Rx(max_len)
        self.tx = Tx()
        self._lock = threading.Lock()
        self.closed = False
        self.reader = threading.Lock()  # whoever holds it owns rx
        self.leader: int | None = None  # thread id of a requester reading here
        self.loop_lead: Optional["LoopLead"] = None  # an asyncio loop reading here (loopread.py)
        self.dying = False  # the peer is known dead: leaders step down
        # What a leader waits on: the socket, registered here before the
        # dispatcher registers it and both EPOLLEXCLUSIVE, so that data
        # arriving wakes the leader alone when one waits, and the dispatcher
        # otherwise (the kernel wakes the first exclusive waiter in the
        # socket's queue whose epoll has a thread waiting).  Plus the eventfd
        # that ``poke`` writes to.
        self.lep = select.epoll()
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.lep.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self.lep.register(self.wake_fd, select.EPOLLIN)
        self._fds_open = True  # fd, wake_fd and lep (closed by the reader: see close)
        # Relay backpressure (master side): while a channel this worker's
        # broadcasts go to is over max_queue, its input is not read.
        self.blockers: set[Channel] = set()  # channels holding our input back
        self.held_back: set[Channel] = set()  # channels whose input we hold back
        self.mask = 0  # the dispatcher's epoll registration, 0: none (see arm)
        self.arming = threading.Lock()  # held while mask and registration change
        self.disarmed = False  # the dispatcher dropped it for a leader (see arm)
        self.room_waiters = 0  # the dispatcher waits for room here (see wait_room)
        self.read_ctx: Any = None  # what Router.read needs, gathered once
        # The send queue needs no Python lock (its C calls lock it and refuse
        # use once it is closed), so sending is one call of a bound C function.
        self.send = functools.partial(self.tx.send, fd)  # (payload, max_len)
        self.send_msg = self.tx.message_sender(fd, max_len)
        self.send_request = self.tx.message_sender(fd, max_len, release_gil=True)
        self.post = self.tx.frame_poster(fd)
        self.post_msg = self.tx.message_poster(fd, max_len)
        self.pending = self.tx.pending  # bytes queued, not yet written (0 once closed)
        self.unowned = self.tx.unowned  # those the C writer thread does not write
        # A leader waits for its reply with wait(deadline_ns) (see wait_reply):
        # it spins briefly before it blocks when that pays (csrc/wait.h).
        self.peer_pid = peer_pid
        self.spin = Spin(spin, peer_pid, peer_tid)  # (peer_tid: its thread that answers, if known)
        self.wait = self.rx.waiter(fd, self.lep.fileno(), self.wake_fd, self.spin)
        pending = router.pending
        self.lead_ctx = (dispatcher, self.reader, router.read, pending.get, pending.pop,
                         self.wait, self.rx.addr, router.loads)  # (what wait_reply needs)

    def poke(self) -> None:
        """Wake the thread leading this channel, if any."""
        if self.leader is not None:
            with self._lock:  # not once release_reader closed it (its number may be reused)
                if self._fds_open:
                    try:
                        os.eventfd_write(self.wake_fd, 1)
                    except OSError:
                        pass

    # send(payload) (set in __init__) sends one frame and returns the bytes
    # left queued.  It raises PeerGone if the channel is closed or the peer
    # has gone, and MessageTooLarge (nothing queued) for an oversized payload.
    # send_msg and send_request (see Tx.message_sender) return those errors
    # as codes.  post and post_msg (see Tx.frame_poster and message_poster)
    # are their counterparts for one-way messages, which may be coalesced.

    def send_error(self, code: int, size: int) -> Exception:
        """The exception for a negative ``send_msg`` result."""
        return Tx.error(code, size, self.max_len)

    def flush(self) -> int:
        """Write what the socket takes of the queue; return the bytes left."""
        return self.tx.flush(self.fd)

    def close(self) -> None:
        """Close the socket; queued bytes are dropped.  Idempotent.

        The fds and rx belong to the holder of ``reader`` (a leader polls the
        socket and the wake fd): if it is busy, it closes them as it lets go
        (``release_reader``), so their numbers are never reused under it.
        """
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.tx.close()
            try:  # wake whoever polls the socket (a sender waiting for room)
                _shutdown(self.fd)
            except OSError:
                pass
        if self.reader.acquire(False):
            self.release_reader()
        elif self.loop_lead is not None:
            self.loop_lead.abandon()
        else:
            self.poke()  # the leader sees the channel closed and lets go

    def release_reader(self) -> None:
        """Let go of ``reader``, closing what ``close`` left to its holder."""
        if self.closed:
            with self._lock:
                was_open = self._fds_open
                self._fds_open = False
            if was_open:
                self._close_fds()
                self.rx.close()
        self.reader.release()

    def _close_fds(self) -> None:
        self.lep.close()
        for fd in (self.fd, self.wake_fd):
            try:
                os.close(fd)
            except OSError:
                pass

    def abandon(self) -> None:
        """In a fork child: close our copy of the fds, without touching buffers
        another thread of the parent may have been using at the fork.  Fds
        already closed there may have their numbers reused: skip them."""
        self.closed = True
        if not self._fds_open:
            return
        self._fds_open = False
        self._close_fds()

    # ---- the dispatcher's registration ------------------------------------

    def watch(self) -> None:
        """Let the dispatcher read this channel (its events go to the router)."""
        if self.closed:  # (a requester may have read its EOF already)
            return
        self.dispatcher.set_callback(self.fd, functools.partial(self.router.on_channel, self))
        self.arm()

    def arm(self) -> None:
        """Bring the dispatcher's registration up to date: reading unless the
        input is held back or a leader took it over (``disarmed``), writing
        while bytes are queued.  A syscall only when that changes."""
        with self.arming:
            self.arm_locked()

    def arm_locked(self) -> None:
        if self.closed:
            return
        want = 0 if self.disarmed or self.blockers else _IN
        if self.unowned() or (self.room_waiters and self.pending()):
            want |= _OUT
        if want != self.mask:
            # EPOLLEXCLUSIVE registrations cannot be modified: drop and add
            # (which also keeps the leader's registration first in the queue).
            ep = self.dispatcher.epoll
            try:
                if self.mask:
                    ep.unregister(self.fd)
                if want:
                    ep.register(self.fd, want | _EXCLUSIVE)
            except (OSError, ValueError):
                pass  # lost (unregistered and closed) meanwhile
            self.mask = want

    def _watch_write(self) -> None:
        if not self.closed and self.unowned():
            self.arm()

    # ---- sending, with back-pressure ----------------------------------------
    # Requests and replies are sent at once (send_frame, send_parts, and
    # send_request plus sent_part).  One-way messages are posted (post_frame,
    # post_parts): coalesced in bursts by the C writer thread, which then owns
    # the queued bytes (so the dispatcher does not watch for room on their
    # behalf).  A sender waits while more than max_queue bytes are queued;
    # with a timeout it waits before queueing (post_timed), so that a timeout
    # leaves nothing of the message queued.

    def died(self) -> PeerDied:
        """The error for a send to a peer that is gone."""
        if self.peer is None:
            self.router.procs.master_unreachable()  # (before the dispatcher may have seen it)
            return MasterDied("the master has died")
        return WorkerDied(f"worker {self.peer.id} has exited")

    def send_frame(self, payload: bytes, wait: bool = True) -> None:
        """Send a whole frame; block while the queue is over max_queue (unless not ``wait``)."""
        try:
            left = self.send(payload, self.max_len)
            if left:
                self._backlog(left, wait)
        except PeerGone:
            raise self.died() from None

    def send_parts(self, kind: int, origin: int, rid: int, nb: bytes, body: bytes, wait: bool = True) -> None:
        """Like ``send_frame``, for a message built in C from its parts."""
        left = self.send_msg(kind, origin, rid, nb, len(nb), body, len(body))
        if left:
            self.sent_part(left, wait, len(nb) + len(body))

    def sent_part(self, left: int, wait: bool, size: int) -> None:
        """After a ``send_msg``/``send_request`` that did not write everything:
        raise its error, or deal with the bytes it left queued."""
        try:
            if left < 0:
                raise self.send_error(left, _bindings.MSG_HEADER + size)
            self._backlog(left, wait)
        except PeerGone:
            raise self.died() from None

    def _backlog(self, left: int, wait: bool) -> None:
        if wait and left > self.max_queue:
            self.wait_room()
        if self.unowned():
            self.dispatcher.call_soon(self._watch_write)

    def post_parts(self, kind: int, origin: int, nb: bytes, body: bytes) -> None:
        """Post a one-way message built in C from its parts."""
        queued = self.post_msg(kind, origin, 0, nb, len(nb), body, len(body))
        if queued < 0 or queued > self.max_queue:
            self.post_backlog(queued, len(nb) + len(body))

    def post_frame(self, payload: bytes) -> None:
        """Post a whole one-way frame."""
        queued = self.post(payload, len(payload), self.max_len)
        if queued < 0 or queued > self.max_queue:
            self.post_backlog(queued, len(payload) - _bindings.MSG_HEADER)

    def post_backlog(self, queued: int, size: int) -> None:
        """After a post that queued ``queued`` bytes (or failed with that code)."""
        try:
            if queued < 0:
                raise self.send_error(queued, _bindings.MSG_HEADER + size)
            self.wait_room()
        except PeerGone:
            raise self.died() from None

    def post_timed(self, post: Callable[[], int], size: int, timeout: float,
                   worker: Optional["Worker"] = None) -> None:
        """Queue a frame with ``post()`` (see ``post_by``), or raise
        SendTimeout if the queue stays full for ``timeout`` s."""
        if not self.post_by(post, size, time.monotonic() + timeout):
            peer = "the master" if worker is None else f"worker {worker.id}"
            raise SendTimeout(f"the queue to {peer} stayed full for {timeout} s: not sent",
                              [] if worker is None else [worker])

    def post_by(self, post: Callable[[], int], size: int, deadline: float) -> bool:
        """Wait until at most max_queue bytes are queued, then queue a frame
        with ``post()`` (a ``post*`` call: bytes queued, or an error code).
        False, with nothing queued, when ``deadline`` came first."""
        try:
            if self.pending() > self.max_queue and not self.wait_room(deadline):
                return False
            queued = post()
            if queued < 0:
                raise self.send_error(queued, _bindings.MSG_HEADER + size)
        except PeerGone:
            raise self.died() from None
        return True

    def wait_room(self, deadline: float | None = None, limit: int | None = None) -> bool:
        """Block until at most ``limit`` (default max_queue) bytes are queued;
        False when the ``time.monotonic()`` deadline came first.  Raises PeerGone when the
        peer goes away meanwhile.  On the dispatcher thread the sockets are
        served meanwhile (or two full peers would deadlock)."""
        bound = self.max_queue if limit is None else limit
        d = self.dispatcher
        if d.on_thread:
            # Watched for room even if the writer thread owns the bytes: its
            # progress wakes no epoll; an EPOLLOUT here does.
            self.room_waiters += 1
            self.arm()
            try:
                d.pump_until(lambda: self.closed or self.pending() <= bound,
                             None if deadline is None else max(0.0, deadline - time.monotonic()))
            finally:
                self.room_waiters -= 1
                self.arm()
            if self.closed:
                raise PeerGone(0)
            return self.pending() <= bound
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while self.flush() > bound:
            if deadline is None:
                poller.poll()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000.0)
        return True


def _shutdown(fd: int) -> None:
    """shutdown(SHUT_RDWR) on a socket fd we keep owning."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()


def wait_reply(fut: "Future[Any]", timeout: float | None) -> float | None:
    """``Future.result()``'s hook for a request sent on a channel, run before
    it waits; returns the timeout left.

    On the dispatcher thread, serve the sockets while waiting.  Elsewhere,
    when nobody reads the reply's channel, read it in this thread until the
    reply came (leader/follower: no hand-off from the dispatcher thread);
    when this thread's own asyncio loop leads it (a handler run by that loop
    waits), read it here too; when another thread's idle loop leads it, ask
    it to let go.  This is the request hot path: one function, bound locals.
    """
    ch: Channel = fut._channel
    d, reader, read, waiting, pending_pop, wait, rx_addr, loads = ch.lead_ctx
    me = _get_ident()
    if me == d.ident:
        # Its reply may be read by a requester leading the channel: be woken then.
        fut.add_done_callback(lambda _f: d.wake())
        d.pump_until(fut.done, timeout)
        return 0 if timeout is not None else None
    owned = False  # this thread's loop leads the channel (see loopread.py)
    if ch.closed or not reader.acquire(False):
        lead = ch.loop_lead
        if ch.closed or lead is None or lead.released:
            return timeout  # (someone reads it already: they complete fut)
        if lead.thread != me:
            if lead.waiting == 0:
                lead.abandon()  # an idle loop lets go: the dispatcher reads our reply
            return timeout
        # A handler run by that very loop waits: the loop cannot read until
        # it returns, so read here, as the loop would.
        owned = True
    # While ``fut`` waits in the pending table its reply has not come (it
    # leaves the table as the reply is read, or when it ends otherwise).
    rid = fut._rid
    deadline = None if timeout is None else time.monotonic() + timeout
    done: list[Done] = []
    more = False
    try:
        if ch.closed or ch.dying or ch.blockers:
            return timeout  # held back: the dispatcher reads it once released
        ch.leader = me
        deadline_ns = -1 if deadline is None else int(deadline * 1e9)
        while waiting(rid) is fut and not (ch.closed or ch.dying or ch.blockers):
            # Frames (or the channel's end), spinning first when that pays;
            # 0 when poked or at the deadline; -EINTR: a signal (its handler
            # runs here, as this loop goes on).
            n = wait(deadline_ns)
            if n == 1:
                # Usually the batch is just our reply: loaded in one C call.
                value = take_reply(rx_addr, 1, rid, loads, _MISS)
                if value is not _MISS:
                    # (rx holds at most part of a next frame: the socket
                    # announces the rest to whoever reads next.)
                    if pending_pop(rid, None) is fut and not fut.complete_here(True, value):
                        done.append((fut, True, value))
                    break
            elif n == 0 or n == _EINTR:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                continue
            more = read(ch, 1, done, n)
            if done and waiting(rid) is fut:
                # Others' replies whose completion may run code (callbacks,
                # or a blocked thread to wake): on the dispatcher, since a
                # callback may wait for a reply on this very channel.
                d.call_soon(functools.partial(complete_all, done))
                done = []
            if d.inbox:
                # Messages for the handlers: the dispatcher may have gone
                # back to sleep on an inbox it found empty (comparing
                # lengths misses a drain racing with our appends).
                d.wake()
    finally:
        if owned:
            if more and ch.loop_lead is not None:  # (the loop reads them)
                ch.loop_lead.loop.call_soon(ch.loop_lead.on_readable)
            more = False
        else:
            ch.leader = None
            if ch.closed:
                ch.release_reader()
            else:
                reader.release()
            # The dispatcher may have stopped watching the channel while we
            # held it (checked after letting go: see Router.on_channel).
            if ch.disarmed or ch.arming.locked():
                with ch.arming:
                    ch.disarmed = False
                    ch.arm_locked()
        if more:  # left buffered: the dispatcher takes them
            d.call_next(lambda: ch.router.on_channel(ch, _IN))
        if done:
            complete_all(done)  # even when interrupted (Ctrl-C): these replies came
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())
