"""C-level tests of the framing layer (csrc/frame.c) through the compiled core.

They go through ``clusterhub._bindings`` (``Tx``, ``Rx``, ``socketpair``) and,
where the wrapper has no call for it, the raw ``ffi``/``lib``.  Expected frames
are encoded here by hand from the wire format documented in csrc/frame.h (an
independent oracle, deliberately not frame.c's encoder): a bug in the encoder
and the same bug in the decoder cannot cancel out.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import select
import signal
import socket
import struct
import termios
import time
from itertools import cycle
from typing import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterhub._bindings import (
    EOF,
    FRAME_MAX_LIMIT,
    MALFORMED,
    TOOBIG,
    TRUNCATED,
    PeerGone,
    Rx,
    Tx,
    lib,
    socketpair,
)
from clusterhub.errors import MessageTooLarge

from conftest import fork_child

# Wire format from frame.h: magic 0x4843 LE, 2 reserved zero bytes, length LE.
HEADER = struct.Struct("<HHI")
MAGIC = 0x4843
MAX_FRAMES = lib.CH_RX_MAX_FRAMES
KiB = 1024
MiB = 1024 * KiB

assert HEADER.size == lib.CH_FRAME_HEADER

# Hypothesis: the examples are cheap to draw (sizes and a seed, not bytes) but
# can be big to run; no per-example deadline, a bounded number of examples.
HYP = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- helpers -----------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, 0, len(payload)) + payload


def payloads(sizes: list[int], seed: int) -> list[bytes]:
    rnd = random.Random(seed)
    return [rnd.randbytes(n) for n in sizes]


def unread(fd: int) -> int:
    """Bytes waiting to be read on ``fd``."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


def collect(frames: list[memoryview], out: list[bytes], max_len: int) -> None:
    """Copy the handed-out frames (views die at the next call)."""
    assert 1 <= len(frames) <= MAX_FRAMES
    for v in frames:
        assert len(v) <= max_len
        out.append(bytes(v))


def drain(rx: Rx, fd: int, out: list[bytes], max_len: int) -> int:
    """Read until the socket would block (0) or a code/errno (returned)."""
    while True:
        r = rx.read(fd)
        if isinstance(r, int):
            assert r < 0
            return r
        if not r:
            return 0
        collect(r, out, max_len)


def feed_split(rx: Rx, data: bytes, chunks: Iterator[int], out: list[bytes], max_len: int) -> int:
    """Feed ``data`` in the chunk sizes ``chunks`` gives, then take the frames
    still buffered; returns the first negative code, or 0."""
    off = 0
    while off < len(data):
        piece = data[off : off + next(chunks)]
        r, used = rx.feed(piece)
        assert 0 <= used <= len(piece)
        if isinstance(r, int):
            assert r < 0
            return r
        if r:
            collect(r, out, max_len)
        else:
            assert used > 0, f"no progress at {off}/{len(data)}"
        off += used
    while True:
        r, used = rx.feed(b"")
        assert used == 0
        if isinstance(r, int):
            assert r < 0
            return r
        if not r:
            return 0
        collect(r, out, max_len)


@pytest.fixture
def pair() -> Iterator[list[int]]:
    """A framing socketpair [writer, reader]; ends a test closed are set to -1."""
    fds = list(socketpair())
    yield fds
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def close_writer(fds: list[int]) -> None:
    os.close(fds[0])
    fds[0] = -1


def shutdown_writer(fd: int) -> None:
    """shutdown(SHUT_WR) on a raw descriptor (through a duplicate socket object)."""
    with socket.socket(fileno=os.dup(fd)) as s:
        s.shutdown(socket.SHUT_WR)


def wait_exit(pid: int, timeout: float = 20.0) -> int:
    """The exit code of child ``pid`` (negative signal number if killed), waited on its pidfd."""
    pfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pfd], [], [], timeout)
    finally:
        os.close(pfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"child {pid} did not exit within {timeout} s")
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


sizes_any = st.lists(
    st.one_of(st.integers(0, 16), st.integers(0, 4 * KiB), st.integers(0, 300 * KiB)),
    max_size=8,
)
chunk_sizes = st.lists(
    st.one_of(st.integers(1, 9), st.integers(1, 4 * KiB), st.integers(1, 300 * KiB)),
    min_size=1,
    max_size=40,
)


# ---- round trips -------------------------------------------------------------


@HYP
@given(sizes=sizes_any, seed=st.integers(0, 2**32), chunks=chunk_sizes)
def test_feed_roundtrip_random_splits(sizes: list[int], seed: int, chunks: list[int]) -> None:
    """Frames of 0 .. 300 KiB fed through Rx.feed in arbitrary splits come out identical and in order, then EOF."""
    want = payloads(sizes, seed)
    rx = Rx(300 * KiB)
    got: list[bytes] = []
    assert feed_split(rx, b"".join(map(frame, want)), cycle(chunks), got, 300 * KiB) == 0
    assert got == want
    assert rx.eof() == EOF


@HYP
@given(data=st.data(), max_len=st.integers(1, 64), seed=st.integers(0, 2**32), chunks=chunk_sizes)
def test_feed_roundtrip_near_small_max_len(
    data: st.DataObject, max_len: int, seed: int, chunks: list[int]
) -> None:
    """Frames of max_len - 8 .. max_len bytes round-trip, and one byte more is TOOBIG after them."""
    sizes = data.draw(st.lists(st.integers(max(0, max_len - 8), max_len), max_size=30))
    want = payloads(sizes, seed)
    rx = Rx(max_len)
    stream = b"".join(map(frame, want)) + frame(b"x" * (max_len + 1))
    got: list[bytes] = []
    assert feed_split(rx, stream, cycle(chunks), got, max_len) == TOOBIG
    assert got == want


@pytest.mark.timeout(60)
@HYP
@given(sizes=sizes_any, seed=st.integers(0, 2**32), chunks=chunk_sizes, pace=st.lists(st.booleans(), min_size=1))
def test_socket_roundtrip_raw_writes(
    sizes: list[int], seed: int, chunks: list[int], pace: list[bool]
) -> None:
    """Frames written with os.write on the raw fd in arbitrary chunk sizes arrive intact and in order through Rx.read, then EOF."""
    want = payloads(sizes, seed)
    stream = b"".join(map(frame, want))
    a, b = socketpair()
    try:
        rx = Rx(300 * KiB)
        got: list[bytes] = []
        off, sizes_it, read_now = 0, cycle(chunks), cycle(pace)
        while off < len(stream):
            try:
                off += os.write(a, stream[off : off + next(sizes_it)])
                full = False
            except BlockingIOError:
                full = True
            if full or next(read_now):  # otherwise let bytes pile up
                assert drain(rx, b, got, 300 * KiB) == 0
        os.close(a)
        a = -1
        assert drain(rx, b, got, 300 * KiB) == EOF
        assert got == want
    finally:
        for fd in (a, b):
            if fd >= 0:
                os.close(fd)


@pytest.mark.timeout(60)
@HYP
@given(sizes=sizes_any, seed=st.integers(0, 2**32), pace=st.lists(st.booleans(), min_size=1))
def test_socket_roundtrip_tx_send(sizes: list[int], seed: int, pace: list[bool]) -> None:
    """Frames sent with Tx.send (flushing whatever got queued) arrive intact and in order, whatever the reader's pace."""
    want = payloads(sizes, seed)
    a, b = socketpair()
    try:
        tx, rx = Tx(), Rx(300 * KiB)
        got: list[bytes] = []
        read_now = cycle(pace)
        for p in want:
            queued = tx.send(a, p, 300 * KiB)
            assert queued == tx.pending()
            if next(read_now):
                assert drain(rx, b, got, 300 * KiB) == 0
        for _ in range(100000):
            if not tx.pending():
                break
            assert drain(rx, b, got, 300 * KiB) == 0
            assert tx.flush(a) == tx.pending()
        assert tx.pending() == 0
        os.close(a)
        a = -1
        assert drain(rx, b, got, 300 * KiB) == EOF
        assert got == want
    finally:
        for fd in (a, b):
            if fd >= 0:
                os.close(fd)


@pytest.mark.timeout(30)
def test_one_byte_at_a_time(pair: list[int]) -> None:
    """Frames delivered one byte per feed, and one byte per socket write, still come out whole."""
    want = payloads([0, 1, 7, 8, 9, 300, 0, 5000], 1)
    stream = b"".join(map(frame, want))
    got: list[bytes] = []
    assert feed_split(Rx(5000), stream, cycle([1]), got, 5000) == 0
    assert got == want

    w, r = pair
    rx = Rx(5000)
    got = []
    for i in range(len(stream)):
        assert os.write(w, stream[i : i + 1]) == 1
        frames = rx.read(r)
        assert isinstance(frames, list) and len(frames) <= 1
        if frames:
            collect(frames, got, 5000)
        assert rx.read(r) == []
    close_writer(pair)
    assert drain(rx, r, got, 5000) == EOF
    assert got == want


@pytest.mark.timeout(30)
def test_two_processes(pair: list[int]) -> None:
    """A forked writer using Tx.send/flush and a polling reader using Rx.read agree on 300 frames."""
    want = payloads([(i * 7919) % (2 * KiB) if i % 10 else 200 * KiB for i in range(300)], 2)
    w, r = pair
    pid = fork_child()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            tx = Tx()
            poller = select.poll()
            poller.register(w, select.POLLOUT)
            for p in want:
                tx.send(w, p, 300 * KiB)
                while tx.pending() > 64 * KiB:  # bounded queue, as a channel keeps it
                    poller.poll(1000)
                    tx.flush(w)
            while tx.flush(w):
                poller.poll(1000)
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    close_writer(pair)
    rx = Rx(300 * KiB)
    got: list[bytes] = []
    while (res := drain(rx, r, got, 300 * KiB)) == 0:
        ready, _, _ = select.select([r], [], [], 20)
        assert ready, "the writer stalled"
    assert res == EOF
    assert wait_exit(pid) == 0
    assert got == want


@pytest.mark.timeout(30)
def test_large_frame_then_small(pair: list[int]) -> None:
    """A frame far larger than the socket buffer round-trips through partial writes, and small frames after it still do."""
    want = payloads([3 * MiB] + [i % 100 for i in range(20)] + [MiB + 3, 5], 3)
    w, r = pair
    tx, rx = Tx(), Rx(3 * MiB)
    for p in want:
        tx.push(p, 3 * MiB)
    got: list[bytes] = []
    for _ in range(100000):
        left = tx.flush(w)
        assert drain(rx, r, got, 3 * MiB) == 0
        if not left:
            break
    assert tx.pending() == 0
    assert got == want


# ---- read semantics ------------------------------------------------------------


@pytest.mark.timeout(30)
def test_read_empty_list_means_would_block(pair: list[int]) -> None:
    """Rx.read returns [] only when the socket would block: a partial frame with the writer still open gives [] and nothing unread."""
    w, r = pair
    rx = Rx(64)
    data = frame(b"0123456789")
    os.write(w, data[:12])
    assert rx.read(r) == []
    assert unread(r) == 0
    os.write(w, data[12:])
    frames = rx.read(r)
    assert isinstance(frames, list) and [bytes(v) for v in frames] == [b"0123456789"]
    assert rx.read(r) == []


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cut", [1, 3, 7, 8, 9, 12])
def test_first_read_sees_eof_after_partial_frame(pair: list[int], cut: int) -> None:
    """Part of a frame followed by the writer closing is TRUNCATED on the first read, never [] (which would mean "would block")."""
    w, r = pair
    rx = Rx(64)
    os.write(w, frame(b"0123456789")[:cut])
    close_writer(pair)
    assert rx.read(r) == TRUNCATED


# ---- batching ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_thousand_frames_one_read(pair: list[int]) -> None:
    """1000 frames pushed, flushed once and arriving in one recv are all handed out by a single Rx.read."""
    w, r = pair
    want = payloads([i % 41 for i in range(1000)], 4)
    tx, rx = Tx(), Rx(64)
    queued = 0
    for p in want:
        queued += HEADER.size + len(p)
        assert tx.push(p, 64) == queued
    assert tx.flush(w) == 0
    assert unread(r) == queued
    frames = rx.read(r)
    assert isinstance(frames, list) and len(frames) == 1000
    assert [bytes(v) for v in frames] == want
    assert rx.read(r) == []


@pytest.mark.timeout(30)
def test_frames_beyond_cap_come_in_capped_batches(pair: list[int]) -> None:
    """More than CH_RX_MAX_FRAMES complete frames come out in batches of at most that many, all from one recv."""
    w, r = pair
    n = 2 * MAX_FRAMES + 452
    want = payloads([i % 21 for i in range(n)], 5)
    stream = b"".join(map(frame, want))
    assert os.write(w, stream) == len(stream)
    rx = Rx(64)
    got: list[bytes] = []
    batches = []
    while True:
        frames = rx.read(r)
        assert isinstance(frames, list)
        if not frames:
            break
        assert unread(r) == 0  # the first recv took everything
        batches.append(len(frames))
        collect(frames, got, 64)
    assert batches == [MAX_FRAMES, MAX_FRAMES, 452]
    assert got == want

    rx2 = Rx(64)
    frames, used = rx2.feed(stream)
    assert isinstance(frames, list) and len(frames) == MAX_FRAMES and used == len(stream)


@pytest.mark.timeout(30)
def test_push_batch_then_one_flush(pair: list[int]) -> None:
    """Tx.push writes nothing and reports the bytes queued; one flush then sends the whole batch."""
    w, r = pair
    want = payloads([(i * 131) % 4096 for i in range(50)], 6)
    tx, rx = Tx(), Rx(4096)
    queued = 0
    for p in want:
        queued += HEADER.size + len(p)
        assert tx.push(p, 4096) == queued
        assert unread(r) == 0
    assert tx.pending() == queued
    assert tx.flush(w) == 0
    assert unread(r) == queued
    got: list[bytes] = []
    assert drain(rx, r, got, 4096) == 0
    assert got == want
    assert tx.flush(w) == 0


# ---- partial writes ------------------------------------------------------------


@pytest.mark.timeout(30)
def test_partial_writes_then_flush(pair: list[int]) -> None:
    """Once the socket is full Tx.send queues the rest; reading and flushing until 0 delivers every byte in order."""
    w, r = pair
    rnd = random.Random(7)
    tx, rx = Tx(), Rx(200 * KiB)
    want: list[bytes] = []
    queued = 0
    while queued == 0:  # fill the socket
        assert len(want) < 10000
        want.append(rnd.randbytes(rnd.randrange(200 * KiB)))
        queued = tx.send(w, want[-1], 200 * KiB)
    assert queued > 0 and tx.pending() == queued
    for _ in range(8):  # these queue behind, in order
        want.append(rnd.randbytes(rnd.randrange(200 * KiB)))
        queued = tx.send(w, want[-1], 200 * KiB)
        assert queued > 0 and tx.pending() == queued
    got: list[bytes] = []
    for _ in range(100000):
        assert drain(rx, r, got, 200 * KiB) == 0
        queued = tx.flush(w)
        assert queued == tx.pending()
        if queued == 0:
            break
    assert queued == 0
    assert drain(rx, r, got, 200 * KiB) == 0
    assert got == want


@pytest.mark.timeout(30)
def test_message_too_large_leaves_queue_usable(pair: list[int]) -> None:
    """A payload over max_len raises MessageTooLarge from send and push, queues nothing, and the queue keeps working."""
    w, r = pair
    tx, rx = Tx(), Rx(100)
    with pytest.raises(MessageTooLarge):
        tx.send(w, b"x" * 101, 100)
    with pytest.raises(MessageTooLarge):
        tx.push(b"x" * 101, 100)
    assert tx.pending() == 0 and unread(r) == 0
    assert issubclass(MessageTooLarge, ValueError)
    want = [b"a" * 100]
    assert tx.push(want[0], 100) == HEADER.size + 100
    with pytest.raises(MessageTooLarge):
        tx.send(w, b"y" * 101, 100)
    assert tx.pending() == HEADER.size + 100  # unchanged, nothing sent
    assert unread(r) == 0
    want += [b"", b"b" * 100]
    assert tx.send(w, want[1], 100) == 0  # flushes the queued frame first
    assert tx.send(w, want[2], 100) == 0
    got: list[bytes] = []
    assert drain(rx, r, got, 100) == 0
    assert got == want


def test_rx_max_len_bounds() -> None:
    """An Rx accepts max_len 1 .. CH_FRAME_MAX_LIMIT and rejects the rest with EINVAL."""
    for bad in (0, FRAME_MAX_LIMIT + 1):
        with pytest.raises(OSError) as ei:
            Rx(bad)
        assert ei.value.errno == errno.EINVAL
    Rx(1).close()
    Rx(FRAME_MAX_LIMIT).close()


# ---- oversized and malformed headers -------------------------------------------


def vm_size() -> int:
    """This process's virtual memory size in bytes (an untouched malloc still counts)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("declared", [2 * 1024 * MiB, 2**32 - 1, FRAME_MAX_LIMIT, MiB + 1])
def test_toobig_before_allocation(declared: int) -> None:
    """A header declaring more than max_len (2 GiB against 1 MiB) is TOOBIG at once, the payload is not taken and no memory is reserved for it."""
    rx = Rx(MiB)
    before = vm_size()
    t0 = time.monotonic()
    r, used = rx.feed(HEADER.pack(MAGIC, 0, declared))
    assert r == TOOBIG and used == HEADER.size
    r, used = rx.feed(b"p" * 1000)
    assert r == TOOBIG and used == 0  # the payload is not read
    assert time.monotonic() - t0 < 1.0
    assert vm_size() - before < 16 * MiB


def test_vm_size_sees_a_large_buffer() -> None:
    """Control for the test above: a legal 64 MiB header does grow the process by that much once it is buffered."""
    rx = Rx(128 * MiB)
    before = vm_size()
    r, _ = rx.feed(HEADER.pack(MAGIC, 0, 64 * MiB))
    assert r == []
    r, _ = rx.feed(b"p")
    assert r == []
    assert vm_size() - before >= 64 * MiB
    assert rx.eof() == TRUNCATED
    rx.close()


@pytest.mark.timeout(30)
def test_toobig_on_socket_leaves_payload_unread(pair: list[int]) -> None:
    """Through a socket, a 2 GiB header is TOOBIG and the payload written after it stays in the socket."""
    w, r = pair
    rx = Rx(MiB)
    os.write(w, frame(b"ok") + HEADER.pack(MAGIC, 0, 2 * 1024 * MiB))
    frames = rx.read(r)
    assert isinstance(frames, list) and [bytes(v) for v in frames] == [b"ok"]
    assert rx.read(r) == TOOBIG
    os.write(w, b"p" * 1000)
    assert rx.read(r) == TOOBIG
    assert unread(r) == 1000


@pytest.mark.parametrize("byte", [0, 1, 2, 3])
@pytest.mark.parametrize("bit", range(8))
def test_malformed_header_after_good_frames(byte: int, bit: int) -> None:
    """Flipping any bit of the magic or reserved bytes is MALFORMED, reported after the good frames before it, and it sticks."""
    want = [b"hello", b""]
    bad = bytearray(frame(b"abc"))
    bad[byte] ^= 1 << bit
    stream = b"".join(map(frame, want)) + bytes(bad)
    rx = Rx(64)
    got: list[bytes] = []
    assert feed_split(rx, stream, cycle([5, 1, 11]), got, 64) == MALFORMED
    assert got == want
    assert rx.feed(b"more") == (MALFORMED, 0)


@pytest.mark.timeout(30)
def test_malformed_on_socket_after_frames(pair: list[int]) -> None:
    """Good frames and a bad header arriving in one recv: the frames come first, MALFORMED on the next read, and again after."""
    w, r = pair
    want = [b"x" * 10, b"y" * 11, b"z" * 12]
    os.write(w, b"".join(map(frame, want)) + b"XX\0\0\0\0\0\0")
    rx = Rx(64)
    frames = rx.read(r)
    assert isinstance(frames, list) and [bytes(v) for v in frames] == want
    assert rx.read(r) == MALFORMED
    assert rx.read(r) == MALFORMED


# ---- end of stream --------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["close", "shutdown"])
@pytest.mark.parametrize(
    "cut, code",
    [(0, EOF), (1, TRUNCATED), (7, TRUNCATED), (8, TRUNCATED), (9, TRUNCATED), (27, TRUNCATED), (28, EOF)],
    ids=["between", "header1", "header7", "header-only", "payload1", "payload19", "whole"],
)
def test_eof_variants(pair: list[int], how: str, cut: int, code: int) -> None:
    """The writer going away between frames is EOF, inside a header or a payload TRUNCATED, each after the complete frames."""
    w, r = pair
    want = [b"abcd", b""]
    last = b"L" * 20
    os.write(w, b"".join(map(frame, want)) + frame(last)[:cut])
    if cut == 28:
        want.append(last)
    if how == "close":
        close_writer(pair)
    else:
        shutdown_writer(w)
    rx = Rx(64)
    got: list[bytes] = []
    assert drain(rx, r, got, 64) == code
    assert got == want
    assert rx.read(r) == code  # and it stays so


@pytest.mark.timeout(30)
def test_eof_with_nothing_sent(pair: list[int]) -> None:
    """A peer that closes without sending anything gives [] while open, then EOF."""
    rx = Rx(16)
    assert rx.read(pair[1]) == []
    close_writer(pair)
    assert rx.read(pair[1]) == EOF


@pytest.mark.parametrize("cut", range(0, 39))
def test_eof_verdict_of_fed_bytes(cut: int) -> None:
    """Rx.eof says EOF at a frame boundary and TRUNCATED for any partial header or payload fed."""
    stream = frame(b"q" * 30)
    rx = Rx(64)
    got: list[bytes] = []
    assert feed_split(rx, stream[:cut], cycle([3]), got, 64) == 0
    assert rx.eof() == (EOF if cut in (0, len(stream)) else TRUNCATED)
    assert got == ([b"q" * 30] if cut == len(stream) else [])


# ---- peer gone -----------------------------------------------------------------


def _sigpipe_child(body: Callable[[], int]) -> int:
    """Fork a child with SIGPIPE at its default action that runs ``body`` and exits with its code."""
    pid = fork_child()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGPIPE])
            code = body()
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return wait_exit(pid)


@pytest.mark.timeout(30)
def test_send_to_closed_peer_with_sigpipe_default() -> None:
    """With SIGPIPE at its default action, Tx.send/flush to a closed peer raise PeerGone(EPIPE) and the process lives on."""

    def body() -> int:
        a, b = socketpair()
        os.close(b)
        tx = Tx()
        try:
            tx.send(a, b"hello", 100)
            return 2
        except PeerGone as e:
            if e.code != -errno.EPIPE:
                return 3
        tx2 = Tx()
        tx2.push(b"queued", 100)
        try:
            tx2.flush(a)
            return 4
        except PeerGone as e:
            if e.code != -errno.EPIPE:
                return 5
        return 42

    assert _sigpipe_child(body) == 42


@pytest.mark.timeout(30)
def test_peer_closed_by_other_process_while_queued(pair: list[int]) -> None:
    """A child with SIGPIPE at default and bytes queued on a full socket gets PeerGone from flush when the reading process closes, and exits normally."""
    w, r = pair
    ready_r, ready_w = os.pipe()

    def body() -> int:
        os.close(r)
        os.close(ready_r)
        tx = Tx()
        while tx.send(w, b"\0" * (128 * KiB), 128 * KiB) == 0:
            pass
        os.write(ready_w, b".")  # socket full, bytes queued
        # wait for the reader to go away: poll reports POLLHUP/POLLERR on w
        p = select.poll()
        p.register(w, select.POLLOUT)
        p.poll(20000)
        try:
            tx.flush(w)
            return 2
        except PeerGone as e:
            if e.code not in (-errno.EPIPE, -errno.ECONNRESET):
                return 3
        try:
            tx.send(w, b"more", 128 * KiB)
            return 4
        except PeerGone:
            return 42

    pid = fork_child()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            code = body()
        finally:
            os._exit(code)
    os.close(ready_w)
    ready, _, _ = select.select([ready_r], [], [], 20)
    assert ready and os.read(ready_r, 1) == b"."
    os.close(ready_r)
    close_writer(pair)  # our copy of the writer
    os.close(r)
    pair[1] = -1
    assert wait_exit(pid) == 42


@pytest.mark.timeout(30)
def test_socketpair_flags() -> None:
    """socketpair() gives non-blocking, close-on-exec descriptors."""
    a, b = socketpair()
    try:
        for fd in (a, b):
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(a)
        os.close(b)


# ---- messages built in C ------------------------------------------------------


def test_envelope_is_the_documented_wire_format() -> None:
    """csrc/envelope.h, as cffi and protocol see it, is the documented
    envelope: kind u8, origin u32, request id u64, name length u16,
    little-endian and packed (a protocol constant: peers depend on it)."""
    from clusterhub import _bindings, protocol

    assert (protocol.MSG, protocol.REQ, protocol.RES, protocol.ERR, protocol.BCAST) == (1, 2, 3, 4, 5)
    assert _bindings.MSG_FIELDS == ((0, 1), (1, 4), (5, 8), (13, 2))
    assert protocol.HEADER.format == "<BIQH"
    assert protocol.HEADER.size == _bindings.MSG_HEADER == lib.CH_MSG_HEADER == 15
    assert protocol.NAME_MAX == lib.CH_MSG_NAME_MAX == 0xFFFF
    assert lib.CH_MSG_KIND_MAX == 0xFF


def test_envelope_struct_checks_the_c_layout() -> None:
    """protocol builds its struct from the C field sizes and refuses (at
    import) a layout it cannot represent or that disagrees with the size."""
    from clusterhub import protocol

    assert protocol._header(((0, 1), (1, 4), (5, 8), (13, 2)), 15).format == "<BIQH"
    assert protocol._header(((0, 2), (2, 8)), 10).format == "<HQ"
    with pytest.raises(ImportError, match="not packed"):
        protocol._header(((0, 1), (2, 4)), 6)  # a gap
    with pytest.raises(ImportError, match="not an integer"):
        protocol._header(((0, 3),), 3)
    with pytest.raises(ImportError, match="take 15 bytes, not 16"):
        protocol._header(((0, 1), (1, 4), (5, 8), (13, 2)), 16)


@given(
    kind=st.integers(1, 255),
    origin=st.integers(0, 2**32 - 1),
    rid=st.integers(0, 2**64 - 1),
    name=st.binary(max_size=40),
    body=st.binary(max_size=300),
    post=st.booleans(),
)
@HYP
def test_message_from_c_equals_the_python_envelope(
    kind: int, origin: int, rid: int, name: bytes, body: bytes, post: bool
) -> None:
    """ch_tx_send_msg and ch_tx_post_msg put on the wire exactly the frame of
    protocol.encode (the envelope Router.read decodes), and raise nothing for
    what protocol accepts."""
    from clusterhub import protocol

    assert protocol.HEADER.size == lib.CH_MSG_HEADER
    w, r = socketpair()
    tx, rx = Tx(), Rx(64 * KiB)
    try:
        maker = tx.message_poster if post else tx.message_sender
        send = maker(w, 64 * KiB)
        assert send(kind, origin, rid, name, len(name), body, len(body)) >= 0
        assert tx.flush(w) == 0 or wait_flushed(tx, w)
        frames = rx.read(r)
        assert isinstance(frames, list) and len(frames) == 1
        assert bytes(frames[0]) == protocol.encode(kind, origin, rid, name, body)
    finally:
        tx.close()
        os.close(w)
        os.close(r)


def wait_flushed(tx: Tx, fd: int, timeout: float = 5.0) -> bool:
    """True once the writer thread (or we) wrote all of tx's queue."""
    deadline = time.monotonic() + timeout
    while tx.pending():
        if time.monotonic() > deadline:
            return False
        tx.flush(fd)
        select.select([], [fd], [], 0.01)
    return True
