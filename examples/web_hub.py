"""What the web examples share: the hub's address, the master's handlers and
each worker's connection (used by wsgi_app.py and asgi_app.py, and by the
servers' wiring in gunicorn_conf.py, uvicorn_main.py and hypercorn_main.py).

- ``CLUSTERHUB_ADDRESS``: where the master listens (default ``@web-example``).
- ``EXAMPLE_DIR``: where the examples keep their counter and logs (default: a
  folder in the temporary directory).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from pathlib import Path

import clusterhub

ADDRESS = os.environ.get("CLUSTERHUB_ADDRESS", "@web-example")
DATA = Path(os.environ.get("EXAMPLE_DIR") or Path(tempfile.gettempdir()) / "clusterhub-web-example")
DATA.mkdir(parents=True, exist_ok=True)
log = logging.getLogger("web_hub")


def setup_master(hub: clusterhub.Hub) -> None:
    """The master's side: hand out "run once" jobs, list the workers."""
    claimed: set[str] = set()
    claims = threading.Lock()

    @hub.on("claim")
    def claim(job: str, _sender: object) -> bool:
        # The first worker to ask runs the job; everyone else skips it.
        with claims:
            if job in claimed:
                return False
            claimed.add(job)
            return True

    @hub.on("workers")
    def workers(_data: object, _sender: object) -> list[int]:
        return sorted(w.pid for w in hub.workers.values() if w.pid is not None)


def setup_worker(hub: clusterhub.Hub) -> None:
    """A worker's side (``connect(..., setup=setup_worker)``): drop what
    another worker invalidated."""

    @hub.on("invalidate")
    def invalidate(key: str, sender: object) -> None:
        forget(key)


cache: dict[str, str] = {}  # this worker's cache, kept coherent by "invalidate" broadcasts


def forget(key: str) -> None:
    cache.pop(key, None)
    with open(DATA / "invalidated.log", "a") as f:  # (so that the tests can see who heard it)
        f.write(f"{os.getpid()} {key}\n")


def worker_hub() -> clusterhub.Hub:
    """This worker's hub: connects on the first call, the same hub afterwards."""
    return clusterhub.connect(ADDRESS, setup=setup_worker, timeout=10)


def increment() -> tuple[int, bool]:
    """The counter +1 under the global lock: (its new value, whether the
    previous holder died holding the lock)."""
    lk = worker_hub().lock("counter")
    with lk:
        return bump(), lk.recovered


async def increment_async() -> tuple[int, bool]:
    """:func:`increment` for a coroutine: the event loop is never blocked
    while waiting for the lock."""
    lk = worker_hub().lock("counter")
    async with lk:
        return bump(), lk.recovered


def bump() -> int:
    path = DATA / "counter"
    n = int(path.read_text() or 0) + 1 if path.exists() else 1
    path.write_text(str(n))
    return n


def run_job(job: str) -> None:
    with open(DATA / "jobs.log", "a") as f:
        f.write(f"{os.getpid()} {job}\n")


def die_holding() -> None:
    """Take the lock and die holding it (SIGKILL): the next holder recovers it."""
    worker_hub().lock("counter").acquire()
    os.kill(os.getpid(), 9)
