"""One end of a framed socketpair: send queue, receive buffer and state.

A channel never blocks by itself.  ``send`` writes what the socket takes and
queues the rest; whoever must wait for room (``wait_room``) polls for POLLOUT.

Receiving is done by one thread at a time: the holder of ``reader``.  That is
usually the dispatcher; a thread waiting for a reply on this channel takes it
when it is free and reads its reply itself (leader/follower), which saves a
thread hand-off per request.  ``poke()`` wakes such a leader early (its
request ended some other way, or the peer is gone).
"""

from __future__ import annotations

import functools
import os
import select
import socket
import threading
import time
from typing import Any

from ._bindings import Rx, Tx


class Channel:
    """A framed, non-blocking socket endpoint to one peer process."""

    __slots__ = (
        "fd", "peer", "max_len", "max_queue", "rx", "_tx", "_lock", "closed",
        "reader", "leader", "dying", "_wake", "_fds_open", "blockers", "held_back",
        "mask", "arming", "disarmed", "lep", "send", "send_msg", "send_request", "post", "post_msg",
        "pending", "unowned", "room_waiters", "read_ctx",
    )

    def __init__(self, fd: int, peer: Any, max_len: int, max_queue: int) -> None:
        self.fd = fd
        self.peer = peer  # the Worker at the other end, or None for the master
        self.max_len = max_len
        self.max_queue = max_queue
        self.rx = Rx(max_len)
        self._tx = Tx()
        self._lock = threading.Lock()
        self.closed = False
        self.reader = threading.Lock()  # whoever holds it owns rx
        self.leader: int | None = None  # thread id of a requester reading here
        self.dying = False  # the peer is known dead: leaders step down
        # What a leader waits on: the socket, registered here before the
        # dispatcher registers it and both EPOLLEXCLUSIVE, so that data
        # arriving wakes the leader alone when one waits, and the dispatcher
        # otherwise (the kernel wakes the first exclusive waiter in the
        # socket's queue whose epoll has a thread waiting).  Plus the eventfd
        # that ``poke`` writes to.
        self.lep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.lep.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self.lep.register(self._wake, select.EPOLLIN)
        self._fds_open = True  # fd, _wake and lep (closed by the reader: see close)
        # Relay backpressure (master side): while a channel this worker's
        # broadcasts go to is over max_queue, its input is not read.
        self.blockers: set[Channel] = set()  # channels holding our input back
        self.held_back: set[Channel] = set()  # channels whose input we hold back
        self.mask = 0  # the dispatcher's epoll registration, 0: none (see Hub._arm)
        self.arming = threading.Lock()  # held while mask and registration change
        self.disarmed = False  # the dispatcher dropped it for a leader (see Hub._arm)
        self.room_waiters = 0  # dispatcher waits for room here (see Hub._wait_room)
        self.read_ctx: Any = None  # what Hub._read needs, gathered once
        # The send queue needs no Python lock (its C calls lock it and refuse
        # use once it is closed), so sending is one call of a bound C function.
        self.send = functools.partial(self._tx.send, fd)  # (payload, max_len)
        self.send_msg = self._tx.message_sender(fd, max_len)
        self.send_request = self._tx.message_sender(fd, max_len, release_gil=True)
        self.post = self._tx.frame_poster(fd)
        self.post_msg = self._tx.message_poster(fd, max_len)
        self.pending = self._tx.pending  # bytes queued, not yet written (0 once closed)
        self.unowned = self._tx.unowned  # those the C writer thread does not write

    def poke(self) -> None:
        """Wake the thread leading this channel, if any."""
        if self.leader is not None:
            with self._lock:  # not once release_reader closed it (its number may be reused)
                if self._fds_open:
                    try:
                        os.eventfd_write(self._wake, 1)
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
        return self._tx.flush(self.fd)

    def wait_room(self, limit: int, deadline: float | None = None) -> bool:
        """Block until at most ``limit`` bytes are queued; False when the
        ``time.monotonic()`` deadline came first.

        Raises PeerGone when the peer goes away meanwhile (POLLHUP/POLLERR wake
        the poll).  For threads other than the dispatcher, which must keep
        reading while it waits.
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while self.flush() > limit:
            if deadline is None:
                poller.poll()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000.0)
        return True

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
            self._tx.close()
            try:  # wake whoever polls the socket (a sender waiting for room)
                _shutdown(self.fd)
            except OSError:
                pass
        if self.reader.acquire(False):
            self.release_reader()
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
        for fd in (self.fd, self._wake):
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


def _shutdown(fd: int) -> None:
    """shutdown(SHUT_RDWR) on a socket fd we keep owning."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()
