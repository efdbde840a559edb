"""Spin-then-block waits (csrc/wait.c): ch_rx_wait over real socketpairs,
eventfds and epoll instances, and the spin policy of ch_spin (its budget,
the rest after spins that ran out, the CPU-affinity rule), through the
compiled module as the library calls them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import struct
import threading
import time
from typing import Any, Iterator, Optional

import pytest

from clusterhub._bindings import Rx, Spin, ffi, lib, socketpair

from conftest import fork_child, in_thread

pytestmark = pytest.mark.timeout(60)

FRAME = struct.Struct("<HHI")  # frame.h: magic, reserved, length
MAGIC = 0x4843
US = 1000


def frame(payload: bytes) -> bytes:
    return FRAME.pack(MAGIC, 0, len(payload)) + payload


class Waiter:
    """One end of a socketpair read with ch_rx_wait, as a channel's leader
    does: the socket (EPOLLEXCLUSIVE) and a wake eventfd in an epoll."""

    def __init__(self, cap_s: float, peer_pid: int = 0) -> None:
        self.fd, self.other = socketpair()
        self.rx = Rx(1 << 16)
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.ep = select.epoll()
        self.ep.register(self.fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
        self.ep.register(self.wake, select.EPOLLIN)
        self.spin = Spin(cap_s, peer_pid)
        self.wait = self.rx.waiter(self.fd, self.ep.fileno(), self.wake, self.spin)

    def frames(self, n: int) -> list[bytes]:
        table = self.rx.table
        data = self.rx.data()
        return [bytes(ffi.buffer(data + table[2 * i], table[2 * i + 1])) for i in range(n)]

    def close(self) -> None:
        self.ep.close()
        for fd in (self.fd, self.other, self.wake):
            os.close(fd)


@pytest.fixture
def waiter() -> Any:
    w = Waiter(50e-6)
    yield w
    w.close()


def deadline_in(s: float) -> int:
    return time.monotonic_ns() + int(s * 1e9)


def test_buffered_frames_are_returned_at_once(waiter: Waiter) -> None:
    os.write(waiter.other, frame(b"a") + frame(b"bc"))
    assert waiter.wait(-1) == 2
    assert waiter.frames(2) == [b"a", b"bc"]


def test_a_frame_sent_while_blocked_is_read() -> None:
    w = Waiter(0.0)  # never spins: the frame comes through epoll_wait
    try:
        t = threading.Timer(0.05, lambda: os.write(w.other, frame(b"late")))
        t.start()
        assert w.wait(deadline_in(10)) == 1
        assert w.frames(1) == [b"late"]
        t.join()
        assert w.spin.stats()["spins"] == 0
    finally:
        w.close()


def test_a_frame_sent_while_spinning_is_a_hit() -> None:
    """A peer that answers at once answers within the spin (1 ms here),
    unless the machine is too loaded to run it meanwhile: a few batches."""
    w = Waiter(0.001)  # (the cap allowed: 1 ms)
    for _ in range(64):  # as if recent waits took 1 ms: the budget is the cap
        lib.ch_spin_record(w.spin.p, 0, 0, 1_000_000)
    os.set_blocking(w.other, True)

    def peer(n: int) -> None:
        for _ in range(n):
            assert os.read(w.other, 1) == b"q"
            os.write(w.other, frame(b"r"))

    try:
        for _batch in range(10):
            t = threading.Thread(target=peer, args=(100,))
            t.start()
            for _ in range(100):
                os.write(w.fd, b"q")
                assert w.wait(deadline_in(10)) == 1
            t.join()
            stats = w.spin.stats()
            assert stats["spins"] > 0
            if stats["hits"] > 0:
                break
        assert stats["hits"] > 0, stats
    finally:
        w.close()


def test_wake_fd_ends_the_wait_and_is_drained(waiter: Waiter) -> None:
    t = threading.Timer(0.05, lambda: os.eventfd_write(waiter.wake, 1))
    t.start()
    assert waiter.wait(deadline_in(10)) == 0
    t.join()
    with pytest.raises(BlockingIOError):
        os.eventfd_read(waiter.wake)  # drained by the wait


def test_deadline_ends_the_wait(waiter: Waiter) -> None:
    t0 = time.monotonic()
    assert waiter.wait(deadline_in(0.05)) == 0
    took = time.monotonic() - t0
    assert 0.05 <= took < 2.0
    assert waiter.wait(time.monotonic_ns() - 1) == 0  # passed already


def test_end_of_stream_and_protocol_errors_come_through(waiter: Waiter) -> None:
    os.write(waiter.other, b"\x00" * 8)  # bad magic
    assert waiter.wait(-1) == lib.CH_ERR_MALFORMED
    w = Waiter(50e-6)
    try:
        os.close(w.other)
        w.other = os.open("/dev/null", os.O_RDONLY)  # (closed again by close())
        assert w.wait(-1) == lib.CH_ERR_EOF
    finally:
        w.close()


def test_a_signal_interrupts_the_blocking_wait(waiter: Waiter) -> None:
    got: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
    try:
        t = threading.Timer(0.05, lambda: os.kill(os.getpid(), signal.SIGUSR1))
        t.start()
        r = waiter.wait(deadline_in(10))
        t.join()
        assert r == -errno.EINTR
        assert got == [1]  # the handler ran as the call returned
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_other_threads_run_while_one_waits(waiter: Waiter) -> None:
    # The GIL is released during both the spin and the block.
    done = threading.Event()
    t = threading.Thread(target=lambda: (waiter.wait(deadline_in(10)), done.set()))
    t.start()
    n = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.05:
        n += 1
    assert n > 1000
    os.write(waiter.other, frame(b"x"))
    assert done.wait(10)
    t.join()


# ---- the policy ---------------------------------------------------------------


def budget(s: Spin) -> int:
    return int(lib.ch_spin_budget(s.p))


def test_no_cap_no_spin() -> None:
    s = Spin(0.0)
    assert budget(s) == 0
    lib.ch_spin_record(s.p, 0, 0, 1000 * US)
    assert budget(s) == 0


def test_budget_follows_recent_waits_up_to_the_cap() -> None:
    s = Spin(50e-6)
    b0 = budget(s)
    assert 0 < b0 <= 50 * US
    for _ in range(64):
        lib.ch_spin_record(s.p, 1, 1, 2 * US)  # quick replies
    small = budget(s)
    for _ in range(64):
        lib.ch_spin_record(s.p, 1, 1, 40 * US)  # slower ones
    assert small < budget(s) == 50 * US


def test_spins_that_keep_running_out_rest_then_try_again() -> None:
    s = Spin(50e-6)
    for _ in range(lib.CH_SPIN_MAX_MISSES):
        assert budget(s) > 0
        lib.ch_spin_record(s.p, 1, 0, 0)
    rest = [budget(s) for _ in range(16)]
    assert rest == [0] * 16
    assert budget(s) > 0  # tried again
    # Another streak rests twice as long.
    for _ in range(lib.CH_SPIN_MAX_MISSES):
        lib.ch_spin_record(s.p, 1, 0, 0)
        budget(s)
    assert [budget(s) for _ in range(31)] == [0] * 31
    # A hit resets the rest's length.
    while budget(s) == 0:
        pass
    lib.ch_spin_record(s.p, 1, 1, 5 * US)
    assert s.p.rest_next == 16


@contextlib.contextmanager
def _peer(cpu: int, then: Optional[set[int]] = None) -> Iterator[int]:
    """A child process that runs on ``cpu`` (then, when given, may run on
    ``then`` but stays where it is) and blocks until the block ends: its pid."""
    ready_r, ready_w = os.pipe()
    release_r, release_w = os.pipe()
    pid = fork_child()
    if pid == 0:
        try:
            os.sched_setaffinity(0, {cpu})
            if then is not None:
                os.sched_setaffinity(0, then)
            os.write(ready_w, b"x")
            os.read(release_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"x"
        yield pid
    finally:
        os.write(release_w, b"x")
        assert os.waitpid(pid, 0)[1] == 0
        for fd in (ready_r, ready_w, release_r, release_w):
            os.close(fd)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_no_spin_where_the_peer_can_only_run_on_our_only_cpu() -> None:
    cpu = min(os.sched_getaffinity(0))
    other = max(os.sched_getaffinity(0))
    for peer_cpu, spins in ((cpu, False), (other, True)):
        with _peer(peer_cpu) as pid:

            def check() -> int:
                os.sched_setaffinity(0, {cpu})  # this thread only
                return budget(Spin(50e-6, pid))

            result = in_thread(check)
        assert (result > 0) == spins, (peer_cpu, result)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_miss_with_the_peer_on_our_cpu_parks_the_spin_there() -> None:
    """A spin that ran out while the peer last ran on our CPU stops spinning
    while this thread stays on that CPU (the peer could not run meanwhile);
    moved to another CPU, it spins again.  A miss with the peer elsewhere
    only counts towards a rest."""
    cpus = sorted(os.sched_getaffinity(0))
    # (free to run anywhere, else the affinity rule alone stops the spin)
    with _peer(cpus[0], then=set(cpus)) as pid:

        def check() -> list[Any]:
            with open(f"/proc/{pid}/stat") as f:  # where the peer last ran (field 39)
                here = int(f.read().rpartition(")")[2].split()[36])
            there = next(c for c in cpus if c != here)
            os.sched_setaffinity(0, {here})
            s = Spin(50e-6, pid)
            out: list[Any] = [budget(s)]
            lib.ch_spin_record(s.p, 1, 0, 0)  # ran out, the peer on our CPU
            out += [budget(s), s.p.misses]
            os.sched_setaffinity(0, {there})
            out.append(budget(s))  # moved: spins again
            lib.ch_spin_record(s.p, 1, 0, 0)  # ran out, the peer elsewhere
            out += [budget(s) > 0, s.p.misses]
            return out

        out = in_thread(check)
    assert out[0] > 0
    assert out[1] == 0 and out[2] == 0  # parked, not counted as a miss
    assert out[3] > 0
    assert out[4] is True and out[5] == 1
