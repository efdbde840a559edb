"""Our own reads of a Redis connection (clusterhub/redis/wire.py), over a
real socketpair with RESP written here by hand: replies split across reads,
several in one read, pushes told from replies, and the short-read rule
(``next(again=True)`` does not read again after a read that left the socket
empty).  Needs hiredis 3 (the ``bench`` extra brings it); skipped without.
"""

from __future__ import annotations

import socket
import threading
from typing import Iterator

import pytest

pytest.importorskip("redis")
from clusterhub.redis import wire  # noqa: E402

if wire.hiredis is None:
    pytest.skip("hiredis >= 3 is not installed (pip install '.[bench]')", allow_module_level=True)

import redis  # noqa: E402

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def pair() -> Iterator[tuple[wire.Wire, socket.socket]]:
    ours, server = socket.socketpair()
    ours.setblocking(False)
    yield wire.Wire(ours, 1.0), server
    ours.close()
    server.close()


def test_a_reply_split_across_reads(pair: tuple[wire.Wire, socket.socket]) -> None:
    w, server = pair
    assert w.next() is wire.NONE  # (nothing yet: no block)
    server.sendall(b"$5\r\nhel")
    assert w.next() is wire.NONE
    server.sendall(b"lo\r\n")
    assert w.next() == b"hello"


def test_after_a_short_read_again_does_not_read(pair: tuple[wire.Wire, socket.socket]) -> None:
    """Two replies in one read come one by one without reading; then, the
    read having taken less than the buffer, next(again=True) says NONE even
    with more on the socket (its caller waits for the socket to be
    readable, and it is), and the next plain next() reads it."""
    w, server = pair
    server.sendall(b":1\r\n:2\r\n")
    assert w.next() == 1
    assert w.next(again=True) == 2
    server.sendall(b":3\r\n")
    assert w.next(again=True) is wire.NONE
    assert w.readable()
    assert w.next() == 3
    assert w.next(again=True) is wire.NONE


def test_a_partial_reply_after_a_short_read_waits_for_the_socket(pair: tuple[wire.Wire, socket.socket]) -> None:
    w, server = pair
    server.sendall(b":1\r\n$3\r\nab")
    assert w.next() == 1
    assert w.next(again=True) is wire.NONE  # (the rest is not there yet)
    server.sendall(b"c\r\n")
    assert w.next(again=True) == b"abc"  # (a read that came short is spent once: this one reads)


def test_a_reply_larger_than_the_buffer(pair: tuple[wire.Wire, socket.socket]) -> None:
    """A full buffer is not a short read: the rest is read at once, again
    or not."""
    w, server = pair
    body = bytes(range(256)) * 1024  # (256 KiB: four reads of the 64 KiB buffer)
    server.setblocking(True)
    server.sendall(b":0\r\n")
    assert w.next() == 0
    t = threading.Thread(target=server.sendall, args=(b"$%d\r\n%s\r\n" % (len(body), body),))
    t.start()
    try:
        assert w.read() == body
    finally:
        t.join(5)


def test_pushes_and_errors(pair: tuple[wire.Wire, socket.socket]) -> None:
    w, server = pair
    server.sendall(b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n-NOSCRIPT no such script\r\n-ERR bad\r\n")
    push = w.next()
    assert isinstance(push, wire.PUSH) and list(push) == [b"message", b"ch", b"x"]
    assert isinstance(w.next(again=True), redis.exceptions.NoScriptError)
    err = w.next(again=True)
    assert isinstance(err, redis.ResponseError) and str(err) == "ERR bad"
    with pytest.raises(redis.ResponseError):
        server.sendall(b"-ERR again\r\n")
        w.read()


def test_a_closed_connection(pair: tuple[wire.Wire, socket.socket]) -> None:
    w, server = pair
    server.sendall(b":1\r\n")
    server.close()
    assert w.next() == 1
    with pytest.raises(redis.ConnectionError, match="closed"):
        w.next()
