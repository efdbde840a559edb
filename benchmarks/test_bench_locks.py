"""Locks: uncontended, tail latency beside a busy thread, contended by 2 and 4
processes, and recovery after the holder's SIGKILL.

clusterhub and the stdlib peers come from the kit (``clusterhub.bench.locking``);
filelock, fasteners, posix_ipc and sysv_ipc are added here when installed (the
``bench`` extra; without one, its cases skip, see ``_peers``).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

from clusterhub.bench.host import temp_path
from clusterhub.bench.jobs import Target
from clusterhub.bench.locking import (
    CONTENDED_2,
    CONTENDED_4,
    P99_BUSY,
    RECOVERY,
    UNCONTENDED,
    Handle,
    LockKind,
    contended,
    in_host,
    recovery,
    with_loop,
)

from ._peers import case_params, optional, with_peers

if TYPE_CHECKING:
    import fasteners
    import filelock
    import posix_ipc
    import sysv_ipc
else:
    fasteners = optional("fasteners")
    filelock = optional("filelock")
    posix_ipc = optional("posix_ipc")
    sysv_ipc = optional("sysv_ipc")

Loop = Iterator[Callable[[int], float]]


@contextlib.contextmanager
def _filelock() -> Loop:
    with temp_path(".lock") as path:
        yield with_loop(filelock.FileLock(path))


@contextlib.contextmanager
def _fasteners() -> Loop:
    with temp_path(".lock") as path:
        yield with_loop(fasteners.InterProcessLock(path))


@contextlib.contextmanager
def _posix_semaphore() -> Iterator[posix_ipc.Semaphore]:
    sem = posix_ipc.Semaphore(f"/clusterhub-bench-{os.getpid()}", posix_ipc.O_CREX, initial_value=1)
    try:
        yield sem
    finally:
        sem.unlink()
        sem.close()


@contextlib.contextmanager
def _sysv_semaphore() -> Iterator[sysv_ipc.Semaphore]:
    sem = sysv_ipc.Semaphore(None, sysv_ipc.IPC_CREX, initial_value=1)
    sem.undo = True  # the kernel gives a dead holder's unit back
    try:
        yield sem
    finally:
        sem.remove()


@contextlib.contextmanager
def _posix_ipc() -> Loop:
    with _posix_semaphore() as sem:
        yield with_loop(sem)


@contextlib.contextmanager
def _sysv_ipc() -> Loop:
    with _sysv_semaphore() as sem:
        yield with_loop(sem)


class PosixKind(LockKind):
    """A named POSIX semaphore each process opens by name."""

    def setup(self) -> None:
        super().setup()
        self.name = self.stack.enter_context(_posix_semaphore()).name

    def open(self) -> Handle:
        sem = posix_ipc.Semaphore(self.name)
        return Handle(sem.acquire, sem.release, _bounded(sem.acquire, posix_ipc.BusyError), lambda: None)


class SysvKind(LockKind):
    """A System V semaphore with SEM_UNDO, each process attaching by key."""

    def setup(self) -> None:
        super().setup()
        self.key = self.stack.enter_context(_sysv_semaphore()).key

    def open(self) -> Handle:
        sem = sysv_ipc.Semaphore(self.key)
        sem.undo = True
        return Handle(sem.acquire, sem.release, _bounded(sem.acquire, sysv_ipc.BusyError), lambda: None)


def _bounded(acquire: Callable[[float], Any], busy: type[BaseException]) -> Callable[[float], bool]:
    def acquire_within(timeout: float) -> bool:
        try:
            acquire(timeout)
        except busy:
            return False
        return True

    return acquire_within


UNCONTENDED_ALL = with_peers(
    UNCONTENDED,
    {
        "filelock": ("filelock", in_host(_filelock)),
        "fasteners": ("fasteners", in_host(_fasteners)),
        "posix-ipc": ("posix_ipc", in_host(_posix_ipc)),
        "sysv-ipc-undo": ("sysv_ipc", in_host(_sysv_ipc)),
    },
    targets=(
        Target("clusterhub-by-name", "filelock", 1 / 20, "`with hub.lock(name):` >= 20 x faster than filelock"),
        Target("clusterhub-by-name", "fasteners", 1 / 20, "`with hub.lock(name):` >= 20 x faster than fasteners"),
    ),
)
_MULTI = {"posix-ipc": ("posix_ipc", contended(PosixKind)), "sysv-ipc-undo": ("sysv_ipc", contended(SysvKind))}
CONTENDED = {job.params["procs"]: with_peers(job, _MULTI) for job in (CONTENDED_2, CONTENDED_4)}
RECOVERY_ALL = with_peers(RECOVERY, {"sysv-ipc-undo": ("sysv_ipc", recovery(SysvKind))})


@pytest.mark.benchmark(group="lock-uncontended")
@pytest.mark.parametrize("case", case_params(UNCONTENDED_ALL))
def test_uncontended(measure: Any, case: str) -> None:
    """Acquire+release with nobody else around, per call, against every peer."""
    measure(UNCONTENDED_ALL, case)


@pytest.mark.benchmark(group="lock-p99-busy-thread")
@pytest.mark.parametrize("case", P99_BUSY.cases)
def test_p99_with_busy_thread(measure: Any, case: str) -> None:
    """The p99 of one `with lock: pass` while another Python thread of the process spins."""
    measure(P99_BUSY, case)


@pytest.mark.parametrize(
    "procs", [pytest.param(p, marks=pytest.mark.benchmark(group=f"lock-contended-{p}")) for p in CONTENDED]
)
@pytest.mark.parametrize("case", case_params(CONTENDED[2]))
def test_contended(measure: Any, case: str, procs: int) -> None:
    """Processes looping acquire/increment/release for a fixed time: acquisitions/s, owner switches/s, shares."""
    measure(CONTENDED[procs], case)


@pytest.mark.benchmark(group="recovery")
@pytest.mark.parametrize("case", case_params(RECOVERY_ALL))
def test_recovery(measure: Any, case: str) -> None:
    """From just before SIGKILL of the holder to the blocked waiter holding the lock."""
    measure(RECOVERY_ALL, case)
