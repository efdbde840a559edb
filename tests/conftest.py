"""Shared fixtures and helpers for tests that fork real workers.

Every cross-process wait goes through a pipe, an event or a pidfd with a
bound: a test never sleeps to let something happen.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import select
import signal
import struct
import time
from typing import Any, Callable, Iterator

import pytest

import clusterhub

# The tests' plain children (not hub workers) fork through the benchmark kit's
# helpers, where the docstring of ``fork_child`` says why a fork of the test
# process is safe (and why Python 3.12+'s multi-threaded fork warning is
# silenced): ``fork_child()`` is ``os.fork()``; ``run_forked(fn)`` forks a
# child that runs ``fn`` and exits 0, or 1 with a traceback (never returning
# into pytest).
from clusterhub.bench.host import fork_child as fork_child
from clusterhub.bench.host import run_forked as run_forked

MP = multiprocessing.get_context("fork")

PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


class Reports:
    """A pipe any process of the test (master, worker, grandchild) can write
    small pickled reports into; the test process reads them with a bound.

    Reports of at most PIPE_BUF bytes are written atomically, so several
    writers never interleave.
    """

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self._buf = b""

    def put(self, *item: Any) -> None:
        data = pickle.dumps(item)
        frame = struct.pack("<I", len(data)) + data
        assert len(frame) <= select.PIPE_BUF, "report too large to be atomic"
        os.write(self.w, frame)

    def get(self, timeout: float = 10.0) -> tuple[Any, ...]:
        """The next report; TimeoutError when none came within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buf) >= 4:
                (n,) = struct.unpack_from("<I", self._buf)
                if len(self._buf) >= 4 + n:
                    item = pickle.loads(self._buf[4 : 4 + n])
                    self._buf = self._buf[4 + n :]
                    return item
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no report within {timeout} s")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                self._buf += os.read(self.r, 65536)

    def get_n(self, n: int, timeout: float = 10.0) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + timeout
        return [self.get(max(0.0, deadline - time.monotonic())) for _ in range(n)]

    def empty(self) -> bool:
        """True when no report is waiting right now."""
        if len(self._buf) >= 4:
            return False
        ready, _, _ = select.select([self.r], [], [], 0)
        return not ready

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def reports() -> Iterator[Reports]:
    r = Reports()
    yield r
    r.close()


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is ``pid``, zombies included."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append((int(entry), fields[0]))
    return out


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait (on a pidfd, no polling) until ``pid`` has exited; False on timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready) or pid_gone(pid)
    finally:
        os.close(fd)


def exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


REAPED_ELSEWHERE = "reaped elsewhere"


def waitpid_bounded(pid: int, timeout: float) -> Any:
    """Reap a child within ``timeout`` (on its pidfd): its exit code, None if
    it still runs, REAPED_ELSEWHERE if it exited as another process's child."""
    if not wait_pid_gone(pid, timeout):
        return None
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return REAPED_ELSEWHERE
    return exit_code(status)


def kill_and_reap(pids: list[int]) -> None:
    """Cleanup after a failed test: SIGKILL and reap whatever still runs."""
    for pid in pids:
        if not pid_gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        waitpid_bounded(pid, 5)


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Make this process the reaper of its orphaned descendants meanwhile, so
    a test can collect the exit codes of workers whose master it killed."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("prctl(PR_SET_CHILD_SUBREAPER) is not available")
    try:
        yield
    finally:
        _libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def join_ok(w: clusterhub.Worker, code: int = 0, timeout: float = 15.0) -> None:
    """Wait for a worker and check its exit code (a failed assertion in the
    worker exits with 1 and prints its traceback on stderr)."""
    assert w.join(timeout), f"{w!r} did not exit within {timeout} s"
    assert w.exitcode == code, f"{w!r}: expected exit code {code}"


@pytest.fixture
def make_hub(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., clusterhub.Hub]]:
    """A factory of hubs that are closed after the test; the test fails if a
    worker outlives close(), a request entry leaked, or a dispatcher crashed."""
    hubs: list[clusterhub.Hub] = []
    me = os.getpid()

    def make(**kwargs: Any) -> clusterhub.Hub:
        h = clusterhub.Hub(**kwargs)
        hubs.append(h)
        return h

    yield make
    if os.getpid() != me:  # a forked child came back into pytest: a bug
        os._exit(99)
    leaked = {repr(h): len(h._pending) for h in hubs if not h._closed and len(h._pending)}
    for h in hubs:
        h.close(timeout=2.0)
    left = children_of(me)
    crashed = [r for r in caplog.records if r.levelno >= logging.CRITICAL]
    assert not left, f"processes left behind after close(): {left}"
    assert not leaked, f"pending request entries leaked: {leaked}"
    assert not crashed, f"dispatcher crashed: {[r.getMessage() for r in crashed]}"


@pytest.fixture
def hub(make_hub: Callable[..., clusterhub.Hub]) -> clusterhub.Hub:
    return make_hub()


@pytest.fixture
def event() -> Callable[[], Any]:
    """A factory of events shared across fork (multiprocessing, fork context)."""
    return MP.Event


def ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
