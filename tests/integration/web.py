"""Checks the web servers' tests share: real HTTP requests to the example
apps (examples/wsgi_app.py, examples/asgi_app.py), and what must follow."""

from __future__ import annotations

import http.client
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .conftest import Server, http_get, wait_until
from conftest import pid_gone


def get_ok(port: int, path: str) -> str:
    status, body = http_get(port, path)
    assert status == 200, (path, status, body)
    return body


def master_workers(port: int) -> set[int]:
    """The pids of the workers the hub's master knows (asked through a worker)."""
    return {int(p) for p in get_ok(port, "/workers").split()}


def check_counter(port: int, data: Path, n: int = 320, threads: int = 32) -> None:
    """``n`` concurrent increments under the global lock: every value once,
    the counter exact."""
    before = int((data / "counter").read_text()) if (data / "counter").exists() else 0
    with ThreadPoolExecutor(threads) as pool:
        values = list(pool.map(lambda _: int(get_ok(port, "/incr").split()[0]), range(n)))
    assert sorted(values) == list(range(before + 1, before + n + 1))
    assert int((data / "counter").read_text()) == before + n


def check_broadcast(port: int, data: Path, workers: set[int], key: str) -> None:
    """An invalidation sent through one worker reaches every worker."""
    assert get_ok(port, f"/invalidate?key={key}") == "ok"

    def heard() -> set[int]:
        log = data / "invalidated.log"
        lines = log.read_text().split("\n") if log.exists() else []
        return {int(line.split()[0]) for line in lines if line.endswith(f" {key}")}

    wait_until(lambda: heard() == workers, 10, f"every worker {sorted(workers)} to hear {key!r}")


def check_once(port: int, data: Path, job: str, n: int = 40) -> None:
    """``n`` concurrent "run once" calls: exactly one ran the job."""
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda _: get_ok(port, f"/once?job={job}"), range(n)))
    assert outcomes.count("ran") == 1 and outcomes.count("skipped") == n - 1
    assert [line.split()[1] for line in (data / "jobs.log").read_text().split("\n") if line].count(job) == 1


def die_holding(port: int) -> None:
    """A worker takes the lock and is SIGKILLed while it holds it (the
    request gets no answer)."""
    try:
        status, _ = http_get(port, "/die-holding")
    except (http.client.HTTPException, ConnectionError, socket.timeout):
        return
    assert status >= 500, status  # (a server in front may answer for the dead worker)


def check_recovered(port: int, data: Path) -> None:
    """After a holder died: the next increment recovers the lock, the counter
    stays exact, and nothing holds the lock afterwards."""
    before = int((data / "counter").read_text())
    n, recovered = get_ok(port, "/incr").split()
    assert (int(n), recovered) == (before + 1, "True")
    assert get_ok(port, "/incr").split() == [str(before + 2), "False"]
    assert get_ok(port, "/held") == ""


def live(pids: set[int]) -> set[int]:
    return {p for p in pids if not pid_gone(p)}


def stop_cleanly(server: Server) -> None:
    """SIGTERM: the server exits with 0 and logged no traceback."""
    assert server.stop() == 0, server.output()[-3000:]
    assert "Traceback" not in server.output(), server.output()[-3000:]
