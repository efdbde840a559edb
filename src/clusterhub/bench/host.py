"""Host processes and their control pipe: what every case of the kit runs on.

A case's contender is set up in a forked *host* process (``hosted``), in its
own process group, placed on the CPUs its *placement* says (``PLACEMENTS``:
``unpinned``; ``one-cpu``, every process and thread of the case on the first
CPU; ``two-cpus``, the serving side on the first CPU and the other side on the
second, see ``placement_cpus``).  The parent drives it over a pipe: the host
``serve``s ``batch`` commands (``aserve`` from an asyncio loop), the parent
``ask``s and ``expect``s, and a failure in a child comes back as
``ChildError`` with its traceback.  Also here: the fork helpers the tests
share (``fork_child``, ``run_forked``), the system-wide clock whose stamps
compare across processes (``now_ns``), the CPU time of a case's processes
(``cpu_counted``), busy loops on every CPU (``busy_cpus``), and small pieces
the cases share (``Countdown``, ``temp_path``, ``Unavailable``).
"""

from __future__ import annotations

import asyncio
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
from typing import Any, Awaitable, Callable, ContextManager, Iterator, Optional

Sample = dict[str, Any]  # "t": the figure, lower is better; plus extras
Batch = Callable[[Any], Sample]  # batch(size) -> sample
Case = Callable[..., ContextManager[Batch]]  # case(placement="unpinned", **job.params)

UNPINNED, ONE_CPU, TWO_CPUS = "unpinned", "one-cpu", "two-cpus"
PLACEMENTS = (UNPINNED, ONE_CPU, TWO_CPUS)

# The CPUs this process may run on, read once when the kit is imported (in the
# parent, before any host pins itself: the hosts inherit the value).
_CPUS = sorted(os.sched_getaffinity(0))


class Unavailable(RuntimeError):
    """A case cannot run here (a missing tool, one CPU for ``two-cpus``): the
    job leaves it out and says why; pytest skips its test with the reason."""


def placement_cpus(placement: str) -> tuple[Optional[int], Optional[int]]:
    """(CPU of the serving side, CPU of the other side) for a placement.

    The serving side is what answers or receives: the master, an echo
    server, a broadcasting master; the other side is the requester, the
    sender, the workers receiving a broadcast, the clients.  ``unpinned``:
    (None, None); ``one-cpu``: both on the first allowed CPU; ``two-cpus``:
    the first and the second allowed CPUs (``Unavailable`` with one CPU)."""
    if placement == UNPINNED:
        return None, None
    if placement == ONE_CPU:
        return _CPUS[0], _CPUS[0]
    if placement == TWO_CPUS:
        if len(_CPUS) < 2:
            raise Unavailable(f"the two-cpus placement needs two CPUs; this process may use {_CPUS}")
        return _CPUS[0], _CPUS[1]
    raise ValueError(f"unknown placement {placement!r}; known: {', '.join(PLACEMENTS)}")


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: one clock for the whole system, so stamps taken
    in different processes compare."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def describe_placements() -> str:
    """The placements in words, with this machine's CPUs."""
    two = f"CPU {_CPUS[1]}" if len(_CPUS) > 1 else "(a second CPU: none here)"
    return (f"placements: unpinned; one-cpu = every process of a case on CPU {_CPUS[0]}; two-cpus = "
            f"the serving side (master, echo server) on CPU {_CPUS[0]}, the other side on {two}")


def pin_to_one_cpu(cpu: int = 0, pid: Optional[int] = None) -> None:
    """Pin every thread of this process (or of process ``pid``) to ``cpu``;
    threads and processes started later inherit it."""
    for tid in os.listdir(f"/proc/{pid or 'self'}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
        except ProcessLookupError:
            pass


def pin_server(placement: str, pid: Optional[int] = None) -> None:
    """Put this process (or ``pid``), every thread, on the serving side's CPU
    of ``placement`` (nothing when unpinned).  ``hosted`` does it for the host."""
    cpu = placement_cpus(placement)[0]
    if cpu is not None:
        pin_to_one_cpu(cpu, pid)


def pin_client(placement: str, pid: Optional[int] = None) -> None:
    """Put this process (or ``pid``), every thread, on the other side's CPU of
    ``placement``: the requester, sender or receiving worker calls it first
    thing (a process forked by the host starts on the host's CPU)."""
    cpu = placement_cpus(placement)[1]
    if cpu is not None:
        pin_to_one_cpu(cpu, pid)


def process_cpu_ns(pid: int) -> int:
    """CPU time of process ``pid``, all its threads (the exited ones too), in
    ns: its CLOCK_PROCESS_CPUTIME_ID read from outside (Linux's CPU clock id
    of another process, as clock_getcpuclockid(3) makes it); 0 once it is gone."""
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2)  # MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
    except OSError:
        return 0


def group_pids(pgid: int) -> list[int]:
    """The processes of process group ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[2]) == pgid:
                        pids.append(int(entry))
    return pids


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


async def aserve(conn: Any, batch: Callable[[Any], Awaitable[Any]], ready: Any = None) -> None:
    """``serve`` from a running asyncio loop: the loop waits for each command
    (a reader on the pipe), and ``await batch(command)`` answers it."""
    loop = asyncio.get_running_loop()

    def wake(readable: asyncio.Future[None]) -> None:
        if not readable.done():
            readable.set_result(None)

    try:
        report(conn, ready)
        while True:
            readable = loop.create_future()
            loop.add_reader(conn.fileno(), wake, readable)
            try:
                await readable
            finally:
                loop.remove_reader(conn.fileno())
            try:
                command = conn.recv()
            except EOFError:
                return
            if command is None:
                return
            report(conn, await batch(command))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise


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

    def __init__(self, conn: Any, ready: Any, pid: int) -> None:
        self.conn = conn
        self.ready = ready  # what the host reported when set up
        self.pid = pid  # also the case's process group

    def __call__(self, size: Any) -> Sample:
        sample: Sample = ask(self.conn, size)
        return sample


@contextlib.contextmanager
def hosted(host: Callable[..., None], *args: Any, placement: str = UNPINNED) -> Iterator[Host]:
    """Fork a host process running ``host(conn, *args)``, which sets up and
    then ``serve``s batches on ``conn``.  It gets its own process group (so
    nothing it started outlives the case) and the serving side's CPU of
    ``placement`` (``pin_server``) for itself and everything it starts; the
    host puts the other side on its CPU (``pin_client``), as only it knows
    which processes that is."""
    placement_cpus(placement)  # Unavailable here, in the parent
    ours, theirs = mp.Pipe()

    def main() -> None:
        ours.close()
        os.setpgid(0, 0)
        pin_server(placement)
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
        yield Host(ours, expect(ours), pid)
    finally:
        stop(ours)
        reap(pid, 15.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # stragglers of the group


@contextlib.contextmanager
def cpu_counted(host: ContextManager[Host], key: str = "cpu_per_op_s") -> Iterator[Batch]:
    """A hosted case whose samples gain ``key``: the CPU time of every process
    of the case (its process group, all threads) over the batch, divided by
    the operations the sample says it timed (its ``"n"``).  Read from outside
    just before and after the batch command, so it also counts the command's
    round trip over the control pipe: a few µs per batch."""
    with host as h:

        def batch(size: Any) -> Sample:
            pids = group_pids(h.pid)
            c0 = sum(map(process_cpu_ns, pids))
            sample = h(size)
            c1 = sum(map(process_cpu_ns, pids))
            sample[key] = (c1 - c0) / 1e9 / sample["n"]
            return sample

        yield batch


def _spin(ready: int, cpu: int) -> None:
    pin_to_one_cpu(cpu)
    os.write(ready, b"!")
    x = 0
    while True:
        x = (x * 31 + 7) % 1000003


@contextlib.contextmanager
def busy_cpus() -> Iterator[int]:
    """A busy Python process spinning on each CPU this process may use (each
    pinned to its CPU), running until the block ends; yields how many."""
    r, w = os.pipe()
    pids = []
    try:
        for cpu in _CPUS:
            pids.append(run_forked(_spin, w, cpu))
        for _ in pids:
            os.read(r, 1)
        time.sleep(0.01)  # past their start: all of them spinning
        yield len(pids)
    finally:
        os.close(r)
        os.close(w)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reap(pid)


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
