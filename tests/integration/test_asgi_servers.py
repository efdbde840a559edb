"""uvicorn and hypercorn with several (spawned) workers, started for real:
the hub in the launching script (examples/uvicorn_main.py), or beside the
server (``python -m clusterhub serve`` and the ``hypercorn`` command); the
async app (examples/asgi_app.py) awaits requests and ``async with`` locks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from .conftest import PYTHON, Server, env_for, free_port, require, wait_http, wait_until
from .web import (
    check_broadcast,
    check_counter,
    check_once,
    check_recovered,
    die_holding,
    live,
    master_workers,
    stop_cleanly,
)

pytestmark = pytest.mark.timeout(180)


def wait_connected(port: int, n: int) -> set[int]:
    def connected() -> set[int] | None:
        pids = master_workers(port)
        return pids if len(pids) == n else None

    return wait_until(connected, 30, f"{n} workers connected")  # type: ignore[no-any-return]


def exercise(port: int, data: Path, n_workers: int) -> set[int]:
    pids = wait_connected(port, n_workers)
    check_counter(port, data)
    check_broadcast(port, data, pids, "user:7")
    check_once(port, data, "rebuild-index")
    return pids


def test_uvicorn_workers(servers: Callable[..., Server], address: str, tmp_path: Path) -> None:
    require("uvicorn")
    port = free_port()
    server = servers([PYTHON, "uvicorn_main.py"], name="uvicorn",
                     env=env_for(address, tmp_path, EXAMPLE_PORT=str(port), EXAMPLE_WORKERS="2"))
    wait_http(port, server)
    pids = exercise(port, tmp_path, 2)
    die_holding(port)
    check_recovered(port, tmp_path)  # (uvicorn replaces the dead worker, which connects)
    assert len(live(pids)) == 1
    wait_connected(port, 2)
    stop_cleanly(server)


def test_hypercorn_workers(servers: Callable[..., Server], address: str, tmp_path: Path) -> None:
    require("hypercorn")
    port = free_port()
    server = servers([PYTHON, "hypercorn_main.py"], name="hypercorn",
                     env=env_for(address, tmp_path, EXAMPLE_PORT=str(port), EXAMPLE_WORKERS="2"))
    wait_http(port, server)
    exercise(port, tmp_path, 2)
    stop_cleanly(server)


def test_hypercorn_beside_clusterhub_serve(servers: Callable[..., Server], address: str, tmp_path: Path) -> None:
    """hypercorn stops altogether when a worker dies (its own policy): the hub
    beside it lives on, and the restarted server's workers recover the lock
    the dead worker held."""
    require("hypercorn")
    env = env_for(address, tmp_path)
    hub = servers([PYTHON, "-m", "clusterhub", "serve", address, "--handlers", "web_hub:setup_master"], env=env,
                  name="serve")
    wait_until(lambda: "serving at" in hub.output(), 20, "clusterhub serve")
    port = free_port()
    argv = [PYTHON, "-m", "hypercorn", "--workers", "2", "--bind", f"127.0.0.1:{port}", "asgi_app:app"]
    server = servers(argv, env=env, name="hypercorn")
    wait_http(port, server)
    exercise(port, tmp_path, 2)
    die_holding(port)
    server.proc.wait(30)
    server = servers(argv, env=env, name="hypercorn")
    wait_http(port, server)
    check_recovered(port, tmp_path)
    wait_connected(port, 2)
    stop_cleanly(server)
    stop_cleanly(hub)
