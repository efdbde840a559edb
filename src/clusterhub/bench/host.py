"""Host processes and their control pipe: what every case of the kit runs on.

A case's contender is set up in a forked *host* process (``hosted``), in its
own process group, pinned to CPU 0 when asked (every thread, and every
process it starts, inherits that).  The parent drives it over a pipe: the
host ``serve``s ``batch`` commands, the parent ``ask``s and ``expect``s, and a
failure in a child comes back as ``ChildError`` with its traceback.  Also
here: the fork helpers the tests share (``fork_child``, ``run_forked``), the
system-wide clock whose stamps compare across processes (``now_ns``), and
small pieces the cases share (``Countdown``, ``temp_path``).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import os
import signal
import tempfile
import threading
import time
import traceback
import warnings
from typing import Any, Callable, ContextManager, Iterator, Optional

Sample = dict[str, Any]  # "t": the figure, lower is better; plus extras
Batch = Callable[[Any], Sample]  # batch(size) -> sample
Case = Callable[..., ContextManager[Batch]]  # case(pinned=False, **job.params)


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: one clock for the whole system, so stamps taken
    in different processes compare."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def pin_to_one_cpu(cpu: int = 0) -> None:
    """Pin every thread of this process to ``cpu``; threads and processes
    started later inherit it."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            pass


class ChildError(RuntimeError):
    """A child process failed; the message is its traceback."""


def report(conn: Any, value: Any) -> None:
    """Child side: send a result to the parent."""
    conn.send(("ok", value))


def expect(conn: Any, timeout: float = 60.0) -> Any:
    """Parent side: the child's next result; ChildError with its traceback if it failed."""
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer from a child process within {timeout} s")
    try:
        status, value = conn.recv()
    except EOFError:
        raise ChildError("a child process exited without answering (see its stderr)") from None
    if status == "error":
        raise ChildError(value)
    return value


def ask(conn: Any, command: Any, timeout: float = 60.0) -> Any:
    conn.send(command)
    return expect(conn, timeout)


def stop(conn: Any) -> None:
    """Tell a child's ``serve`` loop to return, and close our end."""
    with contextlib.suppress(OSError):
        conn.send(None)
    conn.close()


def serve(conn: Any, batch: Callable[[Any], Any], ready: Any = None) -> None:
    """Child side: report ``ready``, then answer each command with
    ``batch(command)`` until None or EOF.  An exception is reported to the
    parent (as ChildError) and re-raised."""
    try:
        report(conn, ready)
        while True:
            try:
                command = conn.recv()
            except EOFError:
                return
            if command is None:
                return
            report(conn, batch(command))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise


def fork_child() -> int:
    """``os.fork()`` for plain children (not hub workers), without Python
    3.12+'s warning that forking a multi-threaded process may deadlock the
    child.  The kit's hosts fork with it, and so do the tests (their
    ``conftest`` imports it from here).

    It is safe here: the other threads of the forking process (the test
    process, a host, the ``bench`` command) are clusterhub's (dispatchers,
    exit watchers, timers, the C writer) and pytest-timeout's.  What a child
    uses of theirs is made fork-safe by the library itself: its hubs are
    inert in a plain fork child (``os.register_at_fork``), the C send queues
    take their mutexes around a fork (``pthread_atfork``), and the lock table
    re-reads the child's identity; CPython re-creates its own locks (GIL,
    imports, logging).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"This process .* is multi-threaded", DeprecationWarning)
        return os.fork()


def run_forked(fn: Callable[..., Any], *args: Any) -> int:
    """Fork a plain child (``fork_child``) that runs ``fn(*args)`` and exits:
    0 if it returned, 1 with a traceback on stderr if it raised.  It never
    returns into the caller's code (pytest, the bench loop).  Returns its pid."""
    pid = fork_child()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def reap(pid: int, timeout: float = 10.0) -> Optional[int]:
    """Wait for a child to exit (SIGKILL after ``timeout``); its exit code."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            timeout, deadline = 0, math.inf
        time.sleep(0.002)


class Host:
    """The parent's handle on a host process: ``host(size)`` runs one batch."""

    def __init__(self, conn: Any, ready: Any) -> None:
        self.conn = conn
        self.ready = ready  # what the host reported when set up

    def __call__(self, size: Any) -> Sample:
        sample: Sample = ask(self.conn, size)
        return sample


@contextlib.contextmanager
def hosted(host: Callable[..., None], *args: Any, pinned: bool = False) -> Iterator[Host]:
    """Fork a host process running ``host(conn, *args)``, which sets up and
    then ``serve``s batches on ``conn``.  It gets its own process group (so
    nothing it started outlives the case) and, with ``pinned``, CPU 0 for
    itself and everything it starts."""
    ours, theirs = mp.Pipe()

    def main() -> None:
        ours.close()
        os.setpgid(0, 0)
        if pinned:
            pin_to_one_cpu()
        try:
            host(theirs, *args)
        except BaseException:  # a failed setup: tell the parent why
            with contextlib.suppress(OSError):
                theirs.send(("error", traceback.format_exc()))
            raise

    pid = run_forked(main)
    theirs.close()
    with contextlib.suppress(OSError):
        os.setpgid(pid, pid)  # also here: no window where killpg would miss it
    try:
        yield Host(ours, expect(ours))
    finally:
        stop(ours)
        reap(pid, 15.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # stragglers of the group


@contextlib.contextmanager
def temp_path(suffix: str = "") -> Iterator[str]:
    """A fresh file name in the temp dir, removed afterwards."""
    fd, path = tempfile.mkstemp(prefix="clusterhub-bench-", suffix=suffix)
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def sleep_until(t_ns: int) -> None:
    """Sleep until ``now_ns()`` reaches ``t_ns``."""
    left = t_ns - now_ns()
    if left > 0:
        time.sleep(left / 1e9)


def pause_forever() -> None:
    """Sleep in ``signal.pause()`` until a signal kills the process."""
    while True:
        signal.pause()


class Countdown:
    """Counts handled messages; stamps the time the last expected one was handled."""

    def __init__(self) -> None:
        self.left = 0
        self.t1 = 0
        self.done = threading.Event()

    def arm(self, n: int) -> None:
        self.done = threading.Event()
        self.left = n

    def hit(self, data: Any = None, sender: Any = None) -> None:
        self.left -= 1
        if self.left == 0:
            self.t1 = now_ns()
            self.done.set()

    def wait(self, timeout: float = 60.0) -> int:
        if not self.done.wait(timeout):
            raise TimeoutError(f"{self.left} messages still unhandled after {timeout} s")
        return self.t1
