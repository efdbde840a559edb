"""The Redis engine's tests: a real ``redis-server`` per test (``RedisServer``,
in tests/conftest.py: its own directory, port and Unix socket, no
persistence), and the processes of a hub on it (forked from the test, each
connecting itself).

Without ``redis-server`` on PATH or the ``redis`` Python package the tests
skip with the reason, unless ``CLUSTERHUB_REDIS=1`` is set (CI sets it): then
a missing one fails them, so CI never passes by skipping.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

import clusterhub

from conftest import (
    MP,
    RedisServer,
    Reports,
    kill_and_reap,
    pid_gone,
    require_redis,
    run_forked,
    wait_until,
    waitpid_bounded,
)

LEASE = 1.0  # the tests' default lease (s): death noticed within about this


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """A factory of servers (``redis_servers(password=..., extra=(...), bind=...)``),
    all stopped at the end."""
    require_redis()
    started: list[RedisServer] = []

    def make(**kw: Any) -> RedisServer:
        s = RedisServer(tmp_path / f"redis{len(started)}", **kw)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture
def redis_server(redis_servers: Callable[..., RedisServer]) -> RedisServer:
    return redis_servers()


# ---- processes of a hub --------------------------------------------------------------


class Procs:
    """Plain children forked from the test (each connects to the hub itself:
    the test's own hubs are inert in them), SIGCONT'ed, killed and reaped at
    the end whatever happened."""

    def __init__(self) -> None:
        self.pids: list[int] = []
        self.me = os.getpid()

    def start(self, fn: Callable[..., Any], *args: Any) -> int:
        pid = run_forked(fn, *args)
        self.pids.append(pid)
        return pid

    def join(self, pid: int, code: int = 0, timeout: float = 15.0) -> None:
        got = waitpid_bounded(pid, timeout)
        assert got is not None, f"child {pid} did not exit within {timeout} s"
        assert got == code, f"child {pid} exited with {got} (expected {code}); its traceback is on stderr"

    def cleanup(self) -> None:
        for pid in self.pids:
            if not pid_gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        kill_and_reap(self.pids)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    if os.getpid() != p.me:  # a forked child came back into pytest: a bug
        os._exit(99)
    p.cleanup()


@pytest.fixture
def master(redis_server: RedisServer) -> Iterator[clusterhub.Hub]:
    """The master of hub "t" on the test's server, lease LEASE."""
    hub = clusterhub.Hub(address=redis_server.url("t"), lease=LEASE)
    yield hub
    close_quietly(hub)


@pytest.fixture
def worker_hubs() -> Iterator[Callable[..., clusterhub.Hub]]:
    """``worker_hubs(url, lease=...)``: a worker-side hub in the test process
    (for tests without a master, whose only blocking clients are the lock
    waiters), closed at the end."""
    made: list[clusterhub.Hub] = []

    def make(url: str, lease: Optional[float] = None) -> clusterhub.Hub:
        hub = connect(url, lease)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        close_quietly(hub)


def connect(url: str, lease: Optional[float] = None) -> clusterhub.Hub:
    return clusterhub.connect(url, timeout=10, lease=lease)


def close_quietly(hub: clusterhub.Hub) -> None:
    with contextlib.suppress(clusterhub.HubError):
        hub.close(timeout=2.0)


def blocked_clients(server: RedisServer) -> int:
    """How many clients of the server are blocked in BLPOP (lock waits: an
    inbox reader waits in BRPOP)."""
    c = server.client()
    try:
        return sum(1 for cl in c.client_list() if "b" in cl["flags"] and cl["cmd"] == "blpop")
    finally:
        c.close()


def wait_blocked_clients(server: RedisServer, n: int, timeout: float = 5.0) -> None:
    wait_until(lambda: blocked_clients(server) == n, timeout, f"{n} client(s) blocked in BLPOP")


def blpop_calls(server: RedisServer) -> int:
    """BLPOP calls the server has completed (INFO commandstats)."""
    c = server.client()
    try:
        return int(c.info("commandstats").get("cmdstat_blpop", {}).get("calls", 0))
    finally:
        c.close()


__all__ = ["LEASE", "MP", "Procs", "RedisServer", "Reports", "blocked_clients", "blpop_calls", "close_quietly",
           "connect", "wait_blocked_clients", "wait_until"]
