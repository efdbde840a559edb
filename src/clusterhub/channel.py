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

import os
import select
import socket
import threading
from typing import Any

from ._bindings import PeerGone, Rx, Tx


class Channel:
    """A framed, non-blocking socket endpoint to one peer process."""

    __slots__ = (
        "fd", "peer", "max_len", "max_queue", "rx", "_tx", "_lock", "closed",
        "reader", "leader", "dying", "_wake", "_fds_open", "blockers", "held_back",
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
        self._wake: int | None = None  # eventfd a leader also polls
        self._fds_open = True  # fd and _wake (closed by the reader: see close)
        # Relay backpressure (master side): while a channel this worker's
        # broadcasts go to is over max_queue, its input is not read.
        self.blockers: set[Channel] = set()  # channels holding our input back
        self.held_back: set[Channel] = set()  # channels whose input we hold back

    def wake_fd(self) -> int:
        """The eventfd that ``poke`` writes to (made on first use)."""
        if self._wake is None:
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return self._wake

    def poke(self) -> None:
        """Wake the thread leading this channel, if any."""
        if self._wake is not None and self.leader is not None:
            with self._lock:  # not once release_reader closed it (its number may be reused)
                if self._fds_open and self._wake is not None:
                    try:
                        os.eventfd_write(self._wake, 1)
                    except OSError:
                        pass

    @property
    def lock(self) -> threading.Lock:
        """Held around every use of the send queue (and across fork)."""
        return self._lock

    def send(self, payload: bytes) -> int:
        """Send one frame; return the bytes left queued.

        Raises PeerGone if the channel is closed or the peer has gone, and
        MessageTooLarge (nothing queued) for an oversized payload.
        """
        with self._lock:
            if self.closed:
                raise PeerGone(0)
            return self._tx.send(self.fd, payload, self.max_len)

    def flush(self) -> int:
        """Write what the socket takes of the queue; return the bytes left."""
        with self._lock:
            if self.closed:
                raise PeerGone(0)
            return self._tx.flush(self.fd)

    def pending(self) -> int:
        """Bytes queued, not yet written (0 once closed)."""
        with self._lock:  # close() may free the queue under another thread's call
            return 0 if self.closed else self._tx.pending()

    def wait_room(self, limit: int) -> None:
        """Block until at most ``limit`` bytes are queued.

        Raises PeerGone when the peer goes away meanwhile (POLLHUP/POLLERR wake
        the poll).  For threads other than the dispatcher, which must keep
        reading while it waits.
        """
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while self.flush() > limit:
            poller.poll()

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
        if self.reader.acquire(blocking=False):
            self.release_reader()
        else:
            self.poke()  # the leader sees the channel closed and lets go

    def release_reader(self) -> None:
        """Let go of ``reader``, closing what ``close`` left to its holder."""
        if self.closed:
            with self._lock:
                fds = (self.fd, self._wake) if self._fds_open else ()
                self._fds_open = False
            for fd in fds:
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            if fds:
                self.rx.close()
        self.reader.release()

    def abandon(self) -> None:
        """In a fork child: close our copy of the fds, without touching buffers
        another thread of the parent may have been using at the fork.  Fds
        already closed there may have their numbers reused: skip them."""
        self.closed = True
        if not self._fds_open:
            return
        self._fds_open = False
        for fd in (self.fd, self._wake):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _shutdown(fd: int) -> None:
    """shutdown(SHUT_RDWR) on a socket fd we keep owning."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.detach()
