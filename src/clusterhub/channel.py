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
import threading
from typing import Any

from ._bindings import PeerGone, Rx, Tx


class Channel:
    """A framed, non-blocking socket endpoint to one peer process."""

    __slots__ = (
        "fd", "peer", "max_len", "max_queue", "rx", "_tx", "_lock", "closed",
        "reader", "leader", "dying", "_wake",
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

    def wake_fd(self) -> int:
        """The eventfd that ``poke`` writes to (made on first use)."""
        if self._wake is None:
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return self._wake

    def poke(self) -> None:
        """Wake the thread leading this channel, if any."""
        if self._wake is not None and self.leader is not None:
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

    def send_many(self, payloads: list[bytes]) -> int:
        """Queue several frames and write them with as few syscalls as possible."""
        with self._lock:
            if self.closed:
                raise PeerGone(0)
            for p in payloads:
                self._tx.push(p, self.max_len)
            return self._tx.flush(self.fd)

    def flush(self) -> int:
        """Write what the socket takes of the queue; return the bytes left."""
        with self._lock:
            if self.closed:
                raise PeerGone(0)
            return self._tx.flush(self.fd)

    def pending(self) -> int:
        return self._tx.pending()

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
        """Close the socket; queued bytes are dropped.  Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass
            self._tx.close()
        if self._wake is not None:
            os.close(self._wake)
            self._wake = None
        # rx belongs to the reader: a leader may still be finishing a read.
        if self.reader.acquire(blocking=False):
            self.rx.close()
            self.reader.release()

    def abandon(self) -> None:
        """In a fork child: close our copy of the fd, without touching buffers
        another thread of the parent may have been using at the fork.  A
        channel already closed there may have its fd number reused: skip it."""
        if self.closed:
            return
        self.closed = True
        for fd in (self.fd, self._wake):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
