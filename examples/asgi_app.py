"""An ASGI app with the same endpoints as wsgi_app.py, written with
``await``: its requests and locks never block the event loop.  Served by
uvicorn or hypercorn with several workers (uvicorn_main.py,
hypercorn_main.py) or by gunicorn's UvicornWorker (gunicorn_conf.py).

Each worker connects at start-up (the ASGI lifespan) and attaches the hub to
its loop, so that the broadcast handler runs there too.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

import web_hub

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def handle(path: str, query: dict[str, str]) -> str:
    hub = web_hub.worker_hub()
    if path == "/incr":
        n, recovered = await web_hub.increment_async()
        return f"{n} {recovered}"
    if path == "/invalidate":
        key = query["key"]
        web_hub.forget(key)
        hub.send_to_workers("invalidate", key)
        return "ok"
    if path == "/once":
        job = query["job"]
        if await hub.request_master("claim", job, timeout=10):
            web_hub.run_job(job)
            return "ran"
        return "skipped"
    if path == "/workers":
        return " ".join(map(str, await hub.request_master("workers", timeout=10)))
    if path == "/held":
        return " ".join(f"{h.key.decode()}:{h.pid}" for h in hub.held_locks())
    if path == "/pid":
        return str(os.getpid())
    if path == "/die-holding":
        web_hub.die_holding()
    if path == "/ping":
        return "ok"
    raise KeyError(path)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                web_hub.worker_hub().attach()  # connect (blocks briefly, once) and dispatch on this loop
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    try:
        body, status = await handle(scope["path"], query), 200
    except KeyError as e:
        body, status = f"not found: {e}", 404
    data = body.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
