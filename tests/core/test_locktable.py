"""C-level tests of the lock table (csrc/locktable.c) through the compiled core.

Deaths are real: children made with os.fork() are SIGKILLed (by the parent, by
themselves, or at a numbered crash point inside the C bookkeeping), and the
table must then report recovery and stay consistent and usable.  Processes are
sequenced with pipes, never with sleeps.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
import threading
import time
import traceback
from typing import Any, Callable, Iterator

import pytest

from clusterhub._bindings import ffi, lib

from conftest import fork_child

SEC = 1_000_000_000
NEW = lib.CH_LT_NEW
NEW_RECOVERED = lib.CH_LT_NEW_RECOVERED
RECOVERED = lib.CH_LT_RECOVERED
NCRASH = lib.ch_lt_crashpoint_count()


# ---- helpers ----------------------------------------------------------------


class Table:
    """A lock table handle owned by one test (closed, or checked idle, at teardown)."""

    def __init__(self, nslots: int) -> None:
        pp = ffi.new("ch_table **")
        assert lib.ch_lt_create(nslots, pp) == 0
        self.t = pp[0]

    def resolve(self, key: bytes) -> tuple[int, int, int]:
        slot = ffi.new("uint32_t *")
        gen = ffi.new("uint64_t *")
        r = lib.ch_lt_resolve_nogil(self.t, key, len(key), slot, gen)
        return r, slot[0], gen[0]

    def find(self, key: bytes) -> tuple[int, int, int]:
        slot = ffi.new("uint32_t *")
        gen = ffi.new("uint64_t *")
        r = lib.ch_lt_find(self.t, key, len(key), slot, gen)
        return r, slot[0], gen[0]

    def acquire(self, key: bytes, timeout: float = 5.0) -> tuple[int, int]:
        """(result, slot): resolve + timedlock, re-resolving on -ESTALE."""
        deadline = lib.ch_monotonic_ns() + int(timeout * SEC)
        while True:
            r, slot, gen = self.resolve(key)
            if r == 0:
                r = lib.ch_lt_timedlock_nogil(self.t, slot, gen, deadline)
            if r != -errno.ESTALE:
                return r, slot

    def unlock(self, slot: int) -> int:
        return lib.ch_lt_unlock(self.t, slot)

    def release(self, key: bytes) -> int:
        r, slot, _ = self.find(key)
        return r if r else self.unlock(slot)

    def is_locked(self, key: bytes) -> int:
        r, slot, gen = self.find(key)
        return r if r else lib.ch_lt_is_locked(self.t, slot, gen)

    def check(self) -> int:
        return lib.ch_lt_check(self.t)

    def busy(self) -> int:
        return lib.ch_lt_busy(self.t)

    def close(self) -> int:
        return lib.ch_lt_close(self.t)


@pytest.fixture
def make_table() -> Iterator[Callable[[int], Table]]:
    tables: list[Table] = []

    def make(nslots: int) -> Table:
        tables.append(Table(nslots))
        return tables[-1]

    yield make
    for t in tables:
        assert t.close() == 0


def fork(fn: Callable[[], Any], *tables: Table) -> int:
    """Run fn() in a fork child that exits with its return value (0 if None)."""
    pid = fork_child()
    if pid == 0:
        code = 70
        try:
            for t in tables:
                lib.ch_lt_after_fork_child(t.t)
            code = fn() or 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def status(pid: int) -> int:
    """The child's exit code as multiprocessing reports it (-9 for SIGKILL)."""
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def wait_futex_sleep(pid: int, timeout: float = 10.0) -> None:
    """Return once `pid` is blocked in a futex wait (observed in /proc, not slept for)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with open(f"/proc/{pid}/wchan") as f:
            if "futex" in f.read():
                return
        time.sleep(0.0005)
    raise AssertionError(f"process {pid} never blocked on a futex")


class Pipe:
    """One-byte messages from a child to the parent (or back)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def send(self, b: bytes = b".") -> None:
        os.write(self.w, b)

    def recv(self) -> bytes:
        return os.read(self.r, 1)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


# ---- tests ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_basic_errors(make_table: Callable[[int], Table]) -> None:
    """Bad keys and slots give -EINVAL, a relock -EDEADLK, an unlock of an unheld lock -EPERM."""
    t = make_table(4)
    assert t.resolve(b"")[0] == -errno.EINVAL
    assert t.resolve(b"x" * (lib.CH_LT_KEY_MAX + 1))[0] == -errno.EINVAL
    r, slot, gen = t.resolve(b"x" * lib.CH_LT_KEY_MAX)
    assert r == NEW
    assert lib.ch_lt_trylock(t.t, slot, gen) == -errno.EDEADLK
    assert lib.ch_lt_timedlock_nogil(t.t, slot, gen, lib.ch_monotonic_ns() + SEC) == -errno.EDEADLK
    assert t.busy() == 1
    assert t.close() == -errno.EBUSY
    assert t.unlock(slot) == 0
    assert t.unlock(slot) == -errno.EPERM
    assert lib.ch_lt_trylock(t.t, 4, gen) == -errno.EINVAL
    assert lib.ch_lt_trylock(t.t, slot, gen + 1) == -errno.ESTALE
    assert t.busy() == 0
    with pytest.raises(OverflowError):
        lib.ch_lt_trylock(t.t, -1, gen)
    assert t.check() == 0


@pytest.mark.timeout(60)
def test_recovery_rounds(make_table: Callable[[int], Table]) -> None:
    """A holder SIGKILLed (by itself or by the parent) makes the next acquire RECOVERED, and later rounds are normal."""
    t = make_table(4)
    for rnd in range(6):
        p, q = Pipe(), Pipe()

        def child() -> int:
            lib.ch_lt_set_worker_id(t.t, rnd + 1)
            if t.acquire(b"rec")[0] < 0:
                return 3
            if rnd % 2:
                die()
            p.send()
            q.recv()  # killed while waiting here
            return 4

        pid = fork(child, t)
        if rnd % 2 == 0:
            assert p.recv() == b"."
            assert t.is_locked(b"rec") == 1
            info = ffi.new("ch_lt_info *")
            _, slot, gen = t.find(b"rec")
            assert lib.ch_lt_slot_info(t.t, slot, info) == 1
            assert (info.pid, info.worker_id) == (pid, rnd + 1)
            assert ffi.buffer(info.key, info.keylen)[:] == b"rec"
            assert lib.ch_lt_trylock(t.t, slot, gen) == -errno.EBUSY
            assert t.unlock(slot) == -errno.EPERM  # not ours to release
            os.kill(pid, signal.SIGKILL)
        assert status(pid) == -signal.SIGKILL
        p.close()
        q.close()
        assert t.is_locked(b"rec") == 0  # a dead holder holds nothing
        r, slot = t.acquire(b"rec")
        assert r == RECOVERED
        assert t.unlock(slot) == 0
        for _ in range(3):
            r, slot = t.acquire(b"rec")
            assert r == 0
            assert t.unlock(slot) == 0

        def normal() -> int:
            r, s = t.acquire(b"rec")
            return 0 if r == 0 and t.unlock(s) == 0 else 5

        assert status(fork(normal, t)) == 0
    assert t.check() == 0


@pytest.mark.timeout(60)
def test_locked_snapshot_keeps_recovery(make_table: Callable[[int], Table]) -> None:
    """Inspecting a dead holder's lock (is_locked, slot_info) leaves the recovery to the next acquirer."""
    t = make_table(4)

    def child() -> None:
        if t.acquire(b"snap")[0] >= 0:
            die()

    assert status(fork(child, t)) == -signal.SIGKILL
    _, slot, _ = t.find(b"snap")
    info = ffi.new("ch_lt_info *")
    for _ in range(3):
        assert t.is_locked(b"snap") == 0
        assert lib.ch_lt_slot_info(t.t, slot, info) == 0
    assert t.acquire(b"snap") == (RECOVERED, slot)
    assert t.unlock(slot) == 0


@pytest.mark.timeout(60)
def test_killed_waiter(make_table: Callable[[int], Table]) -> None:
    """A process killed while waiting for a lock affects no one."""
    t = make_table(4)
    r, slot = t.acquire(b"w")
    assert r == NEW
    p = Pipe()

    def waiter() -> int:
        p.send()
        t.acquire(b"w", timeout=60)
        return 3

    pid = fork(waiter, t)
    assert p.recv() == b"."
    wait_futex_sleep(pid)
    os.kill(pid, signal.SIGKILL)
    assert status(pid) == -signal.SIGKILL
    p.close()
    assert t.unlock(slot) == 0

    def normal() -> int:
        r, s = t.acquire(b"w")
        return 0 if r == 0 and t.unlock(s) == 0 else 5

    assert status(fork(normal, t)) == 0
    assert t.acquire(b"w") == (0, slot)
    assert t.unlock(slot) == 0


@pytest.mark.timeout(30)
def test_fork_child_does_not_own(make_table: Callable[[int], Table]) -> None:
    """A child forked while its parent holds a lock does not hold it and sees no busy handle."""
    t = make_table(4)
    r, slot = t.acquire(b"f")
    assert r == NEW
    _, _, gen = t.find(b"f")

    def child() -> int:
        ok = (
            t.busy() == 0
            and lib.ch_lt_trylock(t.t, slot, gen) == -errno.EBUSY
            and t.unlock(slot) == -errno.EPERM
            and t.close() == 0
        )
        return 0 if ok else 5

    assert status(fork(child, t)) == 0
    assert t.unlock(slot) == 0


@pytest.mark.timeout(30)
def test_thread_exit_recovered(make_table: Callable[[int], Table]) -> None:
    """A thread that exits holding a lock loses it: the next acquire is RECOVERED and close works."""
    t = make_table(4)
    res: list[int] = []
    th = threading.Thread(target=lambda: res.append(t.acquire(b"tx")[0]))
    th.start()
    th.join()
    assert res == [NEW]
    # join() returns before the OS thread is gone (and the kernel has released
    # its robust mutexes): wait for the task to disappear.
    while os.path.exists(f"/proc/self/task/{th.native_id}"):
        time.sleep(0.0005)
    assert t.busy() == 0
    r, slot = t.acquire(b"tx")
    assert r == RECOVERED
    assert t.busy() == 1
    assert t.unlock(slot) == 0


@pytest.mark.timeout(30)
def test_timeout_honoured(make_table: Callable[[int], Table]) -> None:
    """timedlock gives up at its deadline with nothing held."""
    t = make_table(4)
    p, q = Pipe(), Pipe()

    def holder() -> int:
        r, s = t.acquire(b"to")
        if r < 0:
            return 3
        p.send()
        q.recv()
        return 0 if t.unlock(s) == 0 else 4

    pid = fork(holder, t)
    assert p.recv() == b"."
    _, slot, gen = t.find(b"to")
    t0 = lib.ch_monotonic_ns()
    assert lib.ch_lt_timedlock_nogil(t.t, slot, gen, t0 + SEC // 5) == -errno.ETIMEDOUT
    dt = lib.ch_monotonic_ns() - t0
    assert SEC // 5 <= dt < SEC
    assert t.busy() == 0
    q.send()
    assert status(pid) == 0
    assert t.acquire(b"to") == (0, slot)
    assert t.unlock(slot) == 0
    p.close()
    q.close()


@pytest.mark.timeout(30)
def test_sigint_interrupts_timedlock_slices(make_table: Callable[[int], Table]) -> None:
    """SIGINT interrupts a Python loop of 0.1 s timedlock slices within 0.2 s and leaves nothing held."""
    t = make_table(4)
    p, q = Pipe(), Pipe()

    def holder() -> int:
        r, s = t.acquire(b"int")
        if r < 0:
            return 3
        p.send()
        q.recv()
        return 0 if t.unlock(s) == 0 else 4

    pid = fork(holder, t)
    assert p.recv() == b"."
    sent: list[float] = []
    started = threading.Event()

    def interrupter() -> None:
        started.wait()
        time.sleep(0.25)  # let a few slices pass: the stimulus, not synchronisation
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    th = threading.Thread(target=interrupter)
    th.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            started.set()
            while True:
                r, slot, gen = t.resolve(b"int")
                assert r == 0
                r = lib.ch_lt_timedlock_nogil(t.t, slot, gen, lib.ch_monotonic_ns() + SEC // 10)
                assert r == -errno.ETIMEDOUT
        caught = time.monotonic()
    finally:
        signal.signal(signal.SIGINT, old)
        th.join()
    assert caught - sent[0] < 0.2
    assert t.busy() == 0
    assert t.is_locked(b"int") == 1  # still the child's
    q.send()
    assert status(pid) == 0
    p.close()
    q.close()


@pytest.mark.timeout(60)
def test_many_keys_small_table(make_table: Callable[[int], Table]) -> None:
    """10,000 distinct keys pass through a table of 8 slots; held keys are never evicted."""
    t = make_table(8)
    held = []
    for i in range(3):
        r, s = t.acquire(b"held%d" % i)
        assert r == NEW
        held.append(s)
    for i in range(10_000):
        key = b"key-%d" % i
        r, s = t.acquire(key)
        assert r == NEW
        assert t.unlock(s) == 0
        if i % 3 == 0:
            r, s = t.acquire(key)
            assert r in (0, NEW)
            assert t.unlock(s) == 0
    assert t.find(b"key-0")[0] == -errno.ENOENT
    for i, s in enumerate(held):
        assert t.unlock(s) == 0
        assert t.acquire(b"held%d" % i) == (0, s)
        assert t.unlock(s) == 0
    assert t.check() == 0


@pytest.mark.timeout(30)
def test_table_full(make_table: Callable[[int], Table]) -> None:
    """With every slot held a new key gets -ENOSPC at once, and a known key still resolves."""
    t = make_table(4)
    slots = []
    for i in range(4):
        r, s = t.acquire(b"full%d" % i)
        assert r == NEW
        slots.append(s)
    t0 = time.monotonic()
    assert t.resolve(b"more")[0] == -errno.ENOSPC
    assert time.monotonic() - t0 < 1
    assert t.resolve(b"full1")[0] == 0
    for s in slots:
        assert t.unlock(s) == 0
    r, s = t.acquire(b"more")
    assert r == NEW
    assert t.unlock(s) == 0


@pytest.mark.timeout(60)
def test_thread_limit(make_table: Callable[[int], Table]) -> None:
    """One thread holds at most CH_LT_THREAD_MAX_HELD locks; another thread is unaffected."""
    limit = lib.CH_LT_THREAD_MAX_HELD
    t = make_table(limit + 16)
    r, s = t.acquire(b"extra")
    assert r == NEW and t.unlock(s) == 0
    held = []
    for i in range(limit):
        r, s = t.acquire(b"lim%d" % i)
        assert r == NEW
        held.append(s)
    assert t.resolve(b"one-more")[0] == -errno.ENOLCK
    r, slot, gen = t.resolve(b"extra")
    assert r == 0
    assert lib.ch_lt_trylock(t.t, slot, gen) == -errno.ENOLCK
    res: list[int] = []

    def other() -> None:
        r, s = t.acquire(b"extra")
        res.append(r)
        res.append(t.unlock(s))

    th = threading.Thread(target=other)
    th.start()
    th.join()
    assert res == [0, 0]
    for s in held:
        assert t.unlock(s) == 0
    assert t.busy() == 0


@pytest.mark.timeout(120)
def test_counter_across_processes(make_table: Callable[[int], Table]) -> None:
    """An unprotected read-modify-write under the lock is exact across processes, even as churn keeps evicting the key."""
    nproc, iters = 4, 1500
    t = make_table(nproc)
    shm = mmap.mmap(-1, 8)  # MAP_SHARED: the children's writes are ours
    shm[:8] = struct.pack("q", 0)

    def worker(n: int) -> int:
        for i in range(iters):
            r, s = t.acquire(b"counter", timeout=30)
            if r < 0:
                return 3
            v = struct.unpack("q", shm[:8])[0]
            if i % 7 == 0:
                os.sched_yield()
            shm[:8] = struct.pack("q", v + 1)
            if t.unlock(s):
                return 4
            r, s = t.acquire(b"churn%d" % ((i * 7 + n) % 13), timeout=30)
            if r < 0 or t.unlock(s):
                return 5
        return 0

    pids = [fork(lambda n=n: worker(n), t) for n in range(nproc)]
    assert [status(pid) for pid in pids] == [0] * nproc
    assert struct.unpack("q", shm[:8])[0] == nproc * iters
    assert t.check() == 0
    shm.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("point", range(1, NCRASH + 1))
def test_killed_at_crashpoint(make_table: Callable[[int], Table], point: int) -> None:
    """A process killed at any bookkeeping point leaves both tables consistent, every key lockable and every slot reclaimable."""
    a, b = make_table(4), make_table(1)
    for i in range(4):
        r, s = a.acquire(b"k%d" % i)
        assert r == NEW and a.unlock(s) == 0

    def die_holding(t: Table, key: bytes) -> None:
        if t.acquire(key)[0] >= 0:
            die()

    def die_in_insert() -> None:
        lib.ch_lt_set_crashpoint(8)  # holding the table mutex
        a.acquire(b"tdead")

    assert status(fork(lambda: die_holding(a, b"victim"), a)) == -signal.SIGKILL
    assert status(fork(die_in_insert, a)) == -signal.SIGKILL
    # In b, our cached (slot, gen) for b"s1" goes stale and the slot's new holder dies.
    r, bslot = b.acquire(b"s1")
    assert r == NEW and b.unlock(bslot) == 0
    _, bslot, bgen = b.find(b"s1")
    assert status(fork(lambda: die_holding(b, b"s2"), b)) == -signal.SIGKILL

    def workload() -> int:
        lib.ch_lt_set_crashpoint(point)
        if lib.ch_lt_trylock(b.t, bslot, bgen) != -errno.ESTALE:  # 14
            return 4
        r, s = a.acquire(b"victim")  # 13 (table repair), 11, 10
        if r != RECOVERED:
            return 5
        if a.unlock(s):  # 12
            return 6
        if a.acquire(b"knew")[0] != NEW:  # 1..9
            return 7
        return 0

    assert status(fork(workload, a, b)) == -signal.SIGKILL, f"crash point {point} not reached"
    assert a.check() == 0 and b.check() == 0
    for key in (b"k0", b"k1", b"k2", b"k3", b"victim", b"tdead", b"knew"):
        r, s = a.acquire(key)
        assert r in (0, RECOVERED, NEW, NEW_RECOVERED), (key, r)
        assert a.unlock(s) == 0
    fresh = []
    for i in range(4):
        r, s = a.acquire(b"fresh%d" % i)
        assert r == NEW
        fresh.append(s)
    assert sorted(fresh) == [0, 1, 2, 3]
    assert a.acquire(b"fresh4")[0] == -errno.ENOSPC
    for s in fresh:
        assert a.unlock(s) == 0
    for key in (b"s1", b"s2"):
        r, s = b.acquire(key)
        assert r in (0, RECOVERED, NEW, NEW_RECOVERED), (key, r)
        assert b.unlock(s) == 0
    assert a.check() == 0 and b.check() == 0


@pytest.mark.timeout(30)
def test_attach_validates_header(make_table: Callable[[int], Table]) -> None:
    """ch_lt_attach maps a real table (sharing its locks) and refuses other files."""
    t = make_table(4)
    pp = ffi.new("ch_table **")
    assert lib.ch_lt_attach(lib.ch_lt_fd(t.t), pp) == 0
    other = pp[0]
    assert lib.ch_lt_fd(other) != lib.ch_lt_fd(t.t)
    r, slot = t.acquire(b"att")
    assert r == NEW
    assert lib.ch_lt_is_locked(other, slot, t.find(b"att")[2]) == 1
    assert lib.ch_lt_unlock(other, slot) == 0  # same thread, same mutex
    assert lib.ch_lt_close(other) == 0
    fd = os.memfd_create("junk", os.MFD_CLOEXEC)
    try:
        assert lib.ch_lt_attach(fd, pp) == -errno.EINVAL  # empty
        os.ftruncate(fd, 1 << 16)
        assert lib.ch_lt_attach(fd, pp) == -errno.EPROTO  # no magic
    finally:
        os.close(fd)
