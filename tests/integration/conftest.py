"""The real servers (gunicorn, uvicorn, hypercorn, Celery) started by the
tests, as a user starts them, with the examples' code.

These need the ``integration`` extra (``pip install ".[integration]"``).
Without it each test skips with the reason, unless ``CLUSTERHUB_INTEGRATION=1``
is set (CI sets it), where a missing server fails the test instead: CI must
never pass by skipping them.
"""

from __future__ import annotations

import http.client
import importlib
import importlib.metadata
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional

import pytest

import conftest
from conftest import ROOT, free_port  # noqa: F401  (free_port: for the tests here)

EXAMPLES = ROOT / "examples"
REQUIRED = os.environ.get("CLUSTERHUB_INTEGRATION") == "1"


def require(module: str, dist: Optional[str] = None) -> ModuleType:
    """Import ``module`` or skip (fail under CLUSTERHUB_INTEGRATION=1); prints
    the distribution's version, so CI's log names what was tested."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if REQUIRED:
            pytest.fail(f"{module} is required here (CLUSTERHUB_INTEGRATION=1): {e}")
        pytest.skip(f"{module} is not installed (pip install '.[integration]')")
    name = dist or module.split(".")[0]
    print(f"{name} {importlib.metadata.version(name)}")
    return mod


@pytest.fixture
def address() -> str:
    """A fresh abstract address for one test's hub."""
    return f"@clusterhub-it-{uuid.uuid4().hex[:12]}"


def wait_until(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """conftest.wait_until, polling less often: the conditions here ask a
    server over HTTP (and every request counts towards gunicorn's max_requests)."""
    return conftest.wait_until(cond, timeout, what, interval)


class Server:
    """A server process started like a user starts it (its own session, so
    that stopping it stops its children too), its output in a log file."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful) then SIGKILL the whole session; its exit status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        try:  # stragglers of the session (a child that outlived its parent)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._out.close()
        return int(self.proc.returncode)


def env_for(address: str, workdir: Path, **extra: str) -> dict[str, str]:
    """The environment the examples read: the hub's address, a directory for
    their files, and the examples folder on the module path."""
    env = dict(os.environ)
    env.update(CLUSTERHUB_ADDRESS=address, EXAMPLE_DIR=str(workdir),
               PYTHONPATH=os.pathsep.join([str(EXAMPLES), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start servers (``servers(argv, env=..., name=...)``); all stopped at the
    end, their logs printed when the test failed."""
    started: list[Server] = []

    def start(argv: list[str], *, env: dict[str, str], name: str = "server", cwd: Path = EXAMPLES) -> Server:
        s = Server(argv, cwd, env, tmp_path / f"{name}-{len(started)}.log")
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
        print(f"---- {s.log.name} ----\n{s.output()[-6000:]}")


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def wait_http(port: int, server: Server, timeout: float = 30.0) -> None:
    """Until the server answers ``GET /ping`` (failing at once if it exited)."""

    def up() -> bool:
        if server.proc.poll() is not None:
            pytest.fail(f"the server exited with {server.proc.returncode}:\n{server.output()[-4000:]}")
        try:
            return http_get(port, "/ping", timeout=2)[0] == 200
        except OSError:
            return False

    wait_until(up, timeout, f"the server on port {port}", interval=0.1)


PYTHON = sys.executable
