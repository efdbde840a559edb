"""A WSGI app whose workers share one counter under a global lock, one
cache kept coherent by broadcasts, and "run once" jobs: run it with
gunicorn and gunicorn_conf.py (see there).

GET /incr, /invalidate?key=K, /once?job=J, /workers, /held, /pid,
/die-holding (a worker killed while it holds the lock), /ping.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable
from urllib.parse import parse_qs

import web_hub

StartResponse = Callable[[str, list[tuple[str, str]]], object]


def handle(path: str, query: dict[str, str]) -> str:
    hub = web_hub.worker_hub()
    if path == "/incr":
        n, recovered = web_hub.increment()
        return f"{n} {recovered}"
    if path == "/invalidate":
        key = query["key"]
        web_hub.forget(key)  # here, and in every other worker:
        hub.send_to_workers("invalidate", key)
        return "ok"
    if path == "/once":
        job = query["job"]
        if hub.request_master("claim", job).result(timeout=10):
            web_hub.run_job(job)
            return "ran"
        return "skipped"
    if path == "/workers":
        return " ".join(map(str, hub.request_master("workers").result(timeout=10)))
    if path == "/held":
        return " ".join(f"{h.key.decode()}:{h.pid}" for h in hub.held_locks())
    if path == "/pid":
        return str(os.getpid())
    if path == "/die-holding":
        web_hub.die_holding()
    if path == "/ping":
        return "ok"
    raise KeyError(path)


def app(environ: dict[str, object], start_response: StartResponse) -> Iterable[bytes]:
    query = {k: v[0] for k, v in parse_qs(str(environ.get("QUERY_STRING", ""))).items()}
    try:
        body, status = handle(str(environ["PATH_INFO"]), query), "200 OK"
    except KeyError as e:
        body, status = f"not found: {e}", "404 Not Found"
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
