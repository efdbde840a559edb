"""Our own reads and writes on a redis-py connection's socket, parsed by
hiredis, for the paths that run per entry or per lock call: redis-py's
sockets have a timeout, so CPython polls before every ``send`` and
``recv``, and its readiness check (``can_read``) costs three system calls.
A :class:`Wire` takes over a connection once redis-py has connected it (the
handshake is redis-py's); it is used only where hiredis 3 or later is
installed, and redis-py's parser serves otherwise.
"""

from __future__ import annotations

import importlib
import os
import select
import socket
from typing import Any, Optional

import redis

hiredis: Any  # (None when it is not installed, or older than 3.0, which does not mark pushes)
try:
    hiredis = importlib.import_module("hiredis")
    PUSH: Optional[type] = hiredis.PushNotification
except (ImportError, AttributeError):
    hiredis = PUSH = None

NONE = object()  # (no whole reply has come yet)


def reply_error(text: str) -> redis.ResponseError:
    """An error reply, as redis-py would have raised it."""
    if text.startswith("NOSCRIPT"):
        return redis.exceptions.NoScriptError(text)
    return redis.ResponseError(text)


class Wire:
    """One connected socket's replies, read and parsed here.  Not thread
    safe: its connection's owner (a thread, or whoever holds the inbox's
    ``reader``) uses it.  OS errors come as redis-py's ConnectionError (a
    timeout as its TimeoutError)."""

    __slots__ = ("sock", "fd", "timeout", "_reader", "_poll", "_buf", "_short")

    def __init__(self, sock: socket.socket, timeout: Optional[float]) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.timeout = timeout  # (s: the longest wait in read(); None: none)
        self._reader = hiredis.Reader(protocolError=redis.exceptions.InvalidResponse, replyError=reply_error)
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)
        self._buf = bytearray(64 * 1024)
        self._short = False  # (the last read took less than the buffer: see next)

    def readable(self) -> bool:
        """Something (or the end) waits on the socket; does not block."""
        return bool(self._poll.poll(0))

    def send(self, data: bytes) -> None:
        """Write all of ``data`` (blocks while the socket is full, up to the
        timeout)."""
        try:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            if n < len(data):
                self.sock.sendall(memoryview(data)[n:])
        except TimeoutError as e:
            raise redis.TimeoutError(f"Timeout writing to socket: {e}") from e
        except OSError as e:
            raise redis.ConnectionError(f"Error while writing to socket: {e}") from e

    def next(self, again: bool = False) -> Any:
        """The next whole reply that has come (NONE: none yet), without
        blocking; an error reply as its exception, returned.

        A read that takes less than the buffer has emptied the socket: when
        no whole reply is left after it, NONE comes without another read.
        Every caller waits for the socket to be readable after NONE, so
        with ``again`` (the caller read a reply just before) NONE comes
        without reading at all when the last read was such a short one:
        one system call less per wake-up of a reader that keeps up."""
        reader = self._reader
        got = reader.gets()
        if got is not False:
            return got
        if again and self._short:
            self._short = False
            return NONE
        buf = self._buf
        while True:
            try:
                n = os.readv(self.fd, [buf])
            except BlockingIOError:
                self._short = False
                return NONE
            except OSError as e:
                raise redis.ConnectionError(f"Error while reading from socket: {e}") from e
            if not n:
                raise redis.ConnectionError("Connection closed by server.")
            reader.feed(buf, 0, n)
            got = reader.gets()
            self._short = n < len(buf)
            if got is not False:
                return got
            if self._short:
                self._short = False
                return NONE

    def read(self) -> Any:
        """The next reply, waited for up to the timeout; an error reply is
        raised."""
        got = self.next()
        while got is NONE:
            ms = -1 if self.timeout is None else int(self.timeout * 1000) + 1
            if not self._poll.poll(ms):
                raise redis.TimeoutError("Timeout reading from socket")
            got = self.next()
        if isinstance(got, redis.ResponseError):
            raise got
        return got
