"""The WSGI app of the HTTP load benchmark (``benchmarks/test_bench_http.py``).

Every request takes one global lock, reads a counter from a small file, adds
one, writes it back, and answers 200 with the new value.  Only the lock
differs between the runs, chosen by ``CLUSTERHUB_BENCH_LOCK``:

- ``clusterhub``: ``hub.lock("counter")``, the hub this worker joined by
  address in ``post_worker_init`` (``gunicorn_conf.py``);
- ``filelock``: ``filelock.FileLock(path)``, its defaults (it polls every
  50 ms while the lock is taken);
- ``redis``: ``redis.Redis(unix_socket_path=...).lock("counter", timeout=10)``,
  its defaults but a 10 s TTL (none by default: a worker killed while holding
  it would block every other one for ever); it polls every 0.1 s while taken;
- ``no-lock``: none at all (increments get lost under load): the reference,
  what the same app serves when the lock costs nothing.

Each request makes its lock object, as application code would
(``with hub.lock("counter"):``); the client, hub and counter file are opened
once per worker, at its first request (after the fork).

The environment: ``CLUSTERHUB_BENCH_LOCK``, ``CLUSTERHUB_BENCH_DIR`` (the
run's temp dir: ``counter``, ``counter.lock``), ``CLUSTERHUB_BENCH_ADDRESS``
(the hub's address, clusterhub) and ``CLUSTERHUB_BENCH_REDIS`` (redis-server's
Unix socket, redis).
"""

from __future__ import annotations

import os
from typing import Any, Callable, ContextManager, Iterable, Optional

KIND = os.environ["CLUSTERHUB_BENCH_LOCK"]
DIR = os.environ["CLUSTERHUB_BENCH_DIR"]
COUNTER = os.path.join(DIR, "counter")
WIDTH = 20  # the counter: a fixed-width decimal at offset 0

_make_lock: Optional[Callable[[], ContextManager[Any]]] = None
_fd = -1


def _lock_factory() -> Callable[[], ContextManager[Any]]:
    if KIND == "clusterhub":
        import clusterhub

        hub = clusterhub.connect(os.environ["CLUSTERHUB_BENCH_ADDRESS"])  # the worker's hub, already joined
        return lambda: hub.lock("counter")
    if KIND == "filelock":
        import filelock

        path = os.path.join(DIR, "counter.lock")
        return lambda: filelock.FileLock(path)
    if KIND == "redis":
        import redis

        client = redis.Redis(unix_socket_path=os.environ["CLUSTERHUB_BENCH_REDIS"])
        return lambda: client.lock("counter", timeout=10)
    if KIND == "no-lock":
        import contextlib

        return contextlib.nullcontext
    raise ValueError(f"CLUSTERHUB_BENCH_LOCK={KIND!r}: clusterhub, filelock, redis or no-lock")


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    global _make_lock, _fd
    if _make_lock is None:
        _make_lock = _lock_factory()
        _fd = os.open(COUNTER, os.O_RDWR)
    with _make_lock():
        n = int(os.pread(_fd, WIDTH, 0)) + 1
        os.pwrite(_fd, b"%*d" % (WIDTH, n), 0)
    body = b"%d\n" % n
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
