"""Shared fixtures and helpers of the whole suite (tests/ and its folders).

tests/ is not a package: pytest's default import mode ("prepend") imports
this file as the module ``conftest``, with tests/ put on ``sys.path``, and
the folders (``api``, ``conformance``, ``core``, ``robustness``) are packages
whose first folder without ``__init__.py`` is tests/ again.  So every test
module, at the top or in a folder, imports these helpers with ``from conftest
import ...``; a folder needs no conftest.py of its own for that (one that
defines fixtures is ``<folder>.conftest``, no clash).

Every cross-process wait goes through a pipe, an event or a pidfd with a
bound: a test never sleeps to let something happen; where a test must poll
kernel state that has no wake-up of its own (a thread blocked in the futex
call, a dead thread's /proc entry), it does so with a bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import pickle
import queue
import select
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import clusterhub
from clusterhub import LockError

# The tests' plain children (not hub workers) fork through the benchmark kit's
# helpers, where the docstring of ``fork_child`` says why a fork of the test
# process is safe (and why Python 3.12+'s multi-threaded fork warning is
# silenced): ``fork_child()`` is ``os.fork()``; ``run_forked(fn)`` forks a
# child that runs ``fn`` and exits 0, or 1 with a traceback (never returning
# into pytest).
from clusterhub.bench.host import fork_child as fork_child
from clusterhub.bench.host import run_forked as run_forked

ROOT = Path(__file__).resolve().parent.parent  # the repository (docs/, examples/, README.md)

MP = multiprocessing.get_context("fork")

PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The versions of the real servers tests/integration starts (when installed)."""
    import importlib.metadata
    import shutil
    import subprocess

    found = []
    for dist in ("gunicorn", "uvicorn", "hypercorn", "celery", "kombu", "billiard", "filelock", "redis"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    for prog, flag in (("redis-server", "--version"), ("wrk", "--version")):
        if shutil.which(prog):
            out = subprocess.run([prog, flag], capture_output=True, text=True).stdout or ""
            found.append(" ".join(out.split()[:3]) or prog)
    return [f"servers: {', '.join(found) or 'none installed (the integration extra)'}"]


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.005) -> Any:
    """Poll ``cond`` until truthy, for state that sends no event (an outside
    server's, a lease's); fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A real ``redis-server`` (Debian's package) of the tests: its own
    directory, a free TCP port (``bind``, default 127.0.0.1) and a Unix
    socket, no persistence (``--save '' --appendonly no``; ``extra`` adds
    options).  ``kill()`` SIGKILLs it (its data is gone), ``restart()``
    starts it again on the same port and socket.  ``daemon``: daemonized, so
    that it is no child of the test process (``make_hub`` checks that no
    child outlives a test); stopped by pid either way.  Waiting for it to
    answer polls PING with a bound (an outside server sends us no event)."""

    def __init__(self, workdir: Path, password: str | None = None, extra: tuple[str, ...] = (),
                 bind: str = "127.0.0.1", daemon: bool = False) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.sock = str(self.dir / "redis.sock")
        self.password = password
        self.bind = bind
        self.extra = extra
        self.daemon = daemon
        self.proc: Any = None  # (a subprocess.Popen, when not a daemon)
        self._pid = 0
        self.starts = 0
        self.start()

    # ---- addresses ------------------------------------------------------------------

    def _auth(self) -> str:
        return f":{self.password}@" if self.password else ""

    def url(self, name: str = "t", host: str = "127.0.0.1") -> str:
        return f"redis://{self._auth()}{host}:{self.port}/0?name={name}"

    def unix_url(self, name: str = "t") -> str:
        return f"redis+unix://{self._auth()}{self.sock}?db=0&name={name}"

    def client(self, **kw: Any) -> Any:
        """A plain redis-py client of this server (to look at its keys)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kw)

    # ---- life ---------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        import subprocess

        import redis

        argv = ["redis-server", "--port", str(self.port), "--bind", *self.bind.split(),
                "--unixsocket", self.sock, "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), *self.extra]
        if self.password:
            argv += ["--requirepass", self.password]
        self.starts += 1
        logfile = self.dir / f"redis-{self.starts}.log"
        pidfile = self.dir / "redis.pid"
        if self.daemon:
            pidfile.unlink(missing_ok=True)
            subprocess.run([*argv, "--daemonize", "yes", "--pidfile", str(pidfile), "--logfile", str(logfile)],
                           check=True, timeout=timeout)
        else:
            with open(logfile, "wb") as log:
                self.proc = subprocess.Popen([*argv, "--daemonize", "no"], stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            self._pid = self.proc.pid
        deadline = time.monotonic() + timeout
        c = self.client(socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log()[-2000:]}")
                try:
                    if c.ping():
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING within {timeout} s: {self.log()[-2000:]}")
                time.sleep(0.01)
        finally:
            c.close()
        if self.daemon:
            self._pid = int(pidfile.read_text())

    def log(self) -> str:
        return (self.dir / f"redis-{self.starts}.log").read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self._pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (SIGKILL: without persistence its data is gone) and
        wait until it is gone (reaped, when it is our child)."""
        if not self._pid or pid_gone(self._pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, sig)
        if self.proc is not None:
            self.proc.wait(10)
        else:
            assert wait_pid_gone(self._pid, 10), f"redis-server {self._pid} still runs"

    def restart(self) -> None:
        """Kill if running, then start again on the same port and socket."""
        self.kill()
        self.start()

    def stop(self) -> None:
        try:
            self.kill(signal.SIGTERM)
        except Exception:
            self.kill()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_redis(server: bool = True) -> None:
    """Skip without redis-py, or without redis-server when ``server`` (fail
    instead under CLUSTERHUB_REDIS=1, as CI sets it)."""
    import importlib
    import shutil

    why = None
    if server and shutil.which("redis-server") is None:
        why = "redis-server is not installed (Debian: apt-get install redis-server)"
    else:
        try:
            importlib.import_module("redis")
        except ImportError as e:
            why = f"the redis package is not installed (pip install '.[test]'): {e}"
    if why is None:
        return
    if os.environ.get("CLUSTERHUB_REDIS") == "1":
        pytest.fail(f"{why}; required here (CLUSTERHUB_REDIS=1)")
    pytest.skip(why)


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session (tests that do not restart it)."""
    require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis"), daemon=True)
    yield server
    server.stop()


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


_ready_names = iter(range(1 << 62))


def fork_ready(hub: clusterhub.Hub, setup: Callable[[], Any] | None = None,
               until: Any = None, wait: float | None = 30.0) -> clusterhub.Worker:
    """Fork a worker that runs ``setup()`` (registering its handlers, say),
    tells the master it is ready, then waits ``wait`` s (None: for ever) or
    until ``until`` (an event) is set; return it once it is ready."""
    name = f"ready-{next(_ready_names)}"
    ready = threading.Event()
    hub.on(name, lambda data, sender: ready.set())

    def work() -> None:
        if setup is not None:
            setup()
        hub.send_to_master(name)
        (until if until is not None else threading.Event()).wait(wait)

    w = hub.fork(work)
    assert ready.wait(10), "the worker did not start"
    return w


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
    leaked = {repr(h): len(h._pending) for h in hubs if not h._closed and len(getattr(h, "_pending", ()))}
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


def collector(hub: clusterhub.Hub, name: str, n: int) -> tuple[list[tuple[Any, Any]], threading.Event]:
    """Register a handler collecting ``n`` (data, sender) pairs; returns
    (list, event set once n arrived)."""
    got: list[tuple[Any, Any]] = []
    done = threading.Event()

    def handler(data: Any, sender: Any) -> None:
        got.append((data, sender))
        if len(got) >= n:
            done.set()

    hub.on(name, handler)
    return got, done


# ---- locks ---------------------------------------------------------------------

_FUTEX_NR = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)


def wait_blocked(pid: int, tid: int | None = None, timeout: float = 5.0) -> None:
    """Wait until thread ``tid`` (default: the main thread) of ``pid`` sits in
    the futex system call, i.e. is blocked waiting for a lock."""
    if _FUTEX_NR is None:
        pytest.skip("futex system call number unknown on this architecture")
    path = f"/proc/{pid}/task/{tid or pid}/syscall"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                nr = f.read().split(maxsplit=1)[0]
        except (OSError, IndexError):
            nr = ""
        if nr == str(_FUTEX_NR):
            return
        assert time.monotonic() < deadline, f"{path} not blocked in futex within {timeout} s"
        time.sleep(0.002)


def wait_task_gone(tid: int, timeout: float = 5.0) -> None:
    """Wait until thread ``tid`` of this process is gone from /proc (the kernel
    has then walked its robust list; Thread.join returns slightly earlier)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/self/task/{tid}"):
        assert time.monotonic() < deadline, f"thread {tid} still exists after {timeout} s"
        time.sleep(0.001)


def mine(hub: clusterhub.Hub) -> list[bytes]:
    """Keys that this process holds now, according to held_locks()."""
    return sorted(h.key for h in hub.held_locks() if h.pid == os.getpid())


def release_all(handles: list[clusterhub.Lock]) -> None:
    """Release whichever of ``handles`` this thread still holds (test cleanup,
    so that one failure does not leave the thread holding locks for the next
    test)."""
    for lk in handles:
        try:
            lk.release()
        except (LockError, OSError):
            pass


def in_thread(fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run ``fn`` in a new thread, wait for it and return its result (or raise
    its exception here)."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            out.append((False, e))

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"thread did not finish within {timeout} s"
    ok, value = out[0]
    if not ok:
        raise value
    return value


class Holder:
    """A thread that acquires a lock, reports, and holds it until told to release."""

    def __init__(self, lk: clusterhub.Lock, timeout: float | None = 10.0) -> None:
        self.lk = lk
        self.acquired: "queue.Queue[Any]" = queue.Queue()
        self.release = threading.Event()
        self.started = threading.Event()  # tid is set
        self.tid = 0
        self.thread = threading.Thread(target=self._run, args=(timeout,))
        self.thread.start()

    def _run(self, timeout: float | None) -> None:
        self.tid = threading.get_native_id()
        self.started.set()
        try:
            ok = self.lk.acquire(timeout=timeout)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            self.acquired.put(e)
            return
        self.acquired.put((ok, self.lk.recovered))
        if ok:
            self.release.wait(20)
            self.lk.release()

    def result(self, timeout: float = 10.0) -> Any:
        return self.acquired.get(timeout=timeout)

    def finish(self) -> None:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def leave_dead_holder(hub: clusterhub.Hub, reports: Any, key: str) -> None:
    """Have a worker take ``key`` and exit holding it: the next acquirer recovers it."""

    def hold_and_exit() -> None:
        assert hub.lock(key).acquire(timeout=5)
        reports.put("held", key)
        os._exit(0)

    join_ok(hub.fork(hold_and_exit))
    assert reports.get() == ("held", key)


def hold_in_worker(hub: clusterhub.Hub, reports: Any, release: Any, key: str) -> clusterhub.Worker:
    """A worker that holds ``key`` until ``release`` is set."""

    def hold() -> None:
        with hub.lock(key):
            reports.put("holding", key)
            release.wait(20)

    w = hub.fork(hold)
    assert reports.get() == ("holding", key)
    return w


def resolved(hub: clusterhub.Hub, key: str, timeout: float | None = None) -> clusterhub.Lock:
    """A handle whose next trylock goes straight to the key's slot."""
    lk = hub.lock(key, timeout=timeout)
    with lk:
        pass
    return lk
