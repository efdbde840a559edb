"""gunicorn, started for real with examples/gunicorn_conf.py: the hub in the
arbiter, every worker connected, for the sync, gthread and UvicornWorker
worker classes; worker recycling, a worker SIGKILLed holding the lock, HUP
reloads and a privilege drop (``user=``)."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from pathlib import Path
from typing import Callable

import pytest

from .conftest import EXAMPLES, PYTHON, Server, env_for, free_port, require, wait_http, wait_until
from .web import (
    check_broadcast,
    check_counter,
    check_once,
    check_recovered,
    die_holding,
    get_ok,
    live,
    master_workers,
    stop_cleanly,
)
from conftest import children_of

pytestmark = pytest.mark.timeout(180)

KINDS = {
    "sync": ["wsgi_app:app"],
    "gthread": ["--threads", "4", "wsgi_app:app"],
    "uvicorn": ["-k", "uvicorn.workers.UvicornWorker", "asgi_app:app"],
}


def start(servers: Callable[..., Server], address: str, data: Path, args: list[str], **env: str) -> tuple[Server, int]:
    port = free_port()
    server = servers([PYTHON, "-m", "gunicorn", "-c", "gunicorn_conf.py", *args],
                     env=env_for(address, data, EXAMPLE_BIND=f"127.0.0.1:{port}", **env), name="gunicorn")
    wait_http(port, server)
    return server, port


def workers_of(server: Server) -> set[int]:
    return {pid for pid, state in children_of(server.pid) if state != "Z"}


def wait_all_connected(server: Server, port: int, n: int = 4) -> set[int]:
    """Until the arbiter has ``n`` live workers and the hub knows exactly those."""
    def settled() -> set[int] | None:
        pids = workers_of(server)
        return pids if len(pids) == n and master_workers(port) == pids else None

    return wait_until(settled, 30, f"{n} workers, all connected")  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", KINDS)
def test_worker_class(kind: str, servers: Callable[..., Server], address: str, tmp_path: Path) -> None:
    require("gunicorn")
    if kind == "uvicorn":
        require("uvicorn")
    server, port = start(servers, address, tmp_path, KINDS[kind])
    pids = wait_all_connected(server, port)
    check_counter(port, tmp_path)
    check_broadcast(port, tmp_path, pids, "user:42")
    check_once(port, tmp_path, "nightly-report")

    die_holding(port)
    check_recovered(port, tmp_path)
    out = server.output()
    dead = pids - live(pids)
    assert len(dead) == 1, (pids, out[-3000:])
    # gunicorn reaped its worker itself (the hub only watches), and replaced it.
    (pid,) = dead
    wait_until(lambda: f"child_exit pid {pid}" in server.output(), 10, "gunicorn's child_exit")
    new = wait_all_connected(server, port)
    assert len(new - pids) == 1
    check_counter(port, tmp_path, n=40)
    stop_cleanly(server)
    assert server.output().count("clusterhub: hub at") == 1


def test_max_requests_recycles_workers(servers: Callable[..., Server], address: str, tmp_path: Path) -> None:
    require("gunicorn")
    server, port = start(servers, address, tmp_path, KINDS["sync"], EXAMPLE_MAX_REQUESTS="25")
    first = wait_all_connected(server, port)
    check_counter(port, tmp_path, n=300, threads=8)
    now = wait_all_connected(server, port)
    assert not first & now, "every worker served over 25 requests, so all were replaced"
    assert get_ok(port, "/held") == ""  # (each request counts: workers keep being replaced meanwhile)
    stop_cleanly(server)
    assert server.output().count("Autorestarting worker") >= 4


def test_hup_reload_keeps_the_hub(servers: Callable[..., Server], address: str, tmp_path: Path) -> None:
    require("gunicorn")
    server, port = start(servers, address, tmp_path, KINDS["sync"])
    old = wait_all_connected(server, port)
    check_counter(port, tmp_path, n=40)
    server.signal(signal.SIGHUP)
    wait_until(lambda: not live(old), 30, "the old workers to leave after HUP")
    new = wait_all_connected(server, port)
    check_counter(port, tmp_path, n=40)
    check_once(port, tmp_path, "after-hup")
    check_broadcast(port, tmp_path, new, "after-hup")
    stop_cleanly(server)
    out = server.output()
    assert "Hang up" in out or "Handling signal: hup" in out.lower(), out[-2000:]
    assert out.count("clusterhub: hub at") == 1  # the config ran again, the hub lived on


def _readable_by(uid: int, gid: int, paths: list[str]) -> str:
    """'' when ``uid`` can import clusterhub and the examples, else why not."""
    try:
        probe = subprocess.run([PYTHON, "-c", "import clusterhub, web_hub"], cwd=EXAMPLES, capture_output=True,
                               text=True, env=env_for("@unused", Path(paths[0])), user=uid, group=gid, extra_groups=[])
    except PermissionError as e:
        return str(e)
    return "" if probe.returncode == 0 else probe.stderr.strip().splitlines()[-1]


def test_user_drops_privileges(servers: Callable[..., Server], address: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    require("gunicorn")
    if os.geteuid() != 0:
        pytest.skip("not root: gunicorn's user= needs root")
    nobody = pwd.getpwnam("nobody")
    data = Path(os.environ.get("TMPDIR", "/tmp")) / f"clusterhub-it-{os.getpid()}-{address[1:]}"
    data.mkdir(mode=0o777)
    data.chmod(0o777)
    try:
        why = _readable_by(nobody.pw_uid, nobody.pw_gid, [str(data)])
        if why:
            pytest.skip(f"nobody cannot import clusterhub or the examples from here: {why}")
        server, port = start(servers, address, data, KINDS["sync"], EXAMPLE_USER="nobody")
        pids = wait_all_connected(server, port)
        for pid in pids:
            with open(f"/proc/{pid}/status") as f:
                uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
            assert set(map(int, uids)) == {nobody.pw_uid}
        check_counter(port, data, n=80)
        die_holding(port)
        check_recovered(port, data)
        stop_cleanly(server)
    finally:
        subprocess.run(["rm", "-rf", str(data)], check=False)
