"""gunicorn wiring: the hub lives in the arbiter, every worker connects.

    gunicorn -c gunicorn_conf.py wsgi_app:app                # sync workers
    gunicorn -c gunicorn_conf.py --threads 4 wsgi_app:app    # gthread
    gunicorn -c gunicorn_conf.py -k uvicorn.workers.UvicornWorker asgi_app:app

gunicorn runs this file again on every HUP, so the hub is not a global of
this module: it hangs on the arbiter (``server``), which lives on.
"""

from __future__ import annotations

import os
from typing import Any

import web_hub

import clusterhub

bind = os.environ.get("EXAMPLE_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("EXAMPLE_WORKERS", "4"))
max_requests = int(os.environ.get("EXAMPLE_MAX_REQUESTS", "0"))  # recycle workers (0: never)
user = os.environ.get("EXAMPLE_USER") or None  # run workers as this user (gunicorn started as root)


def on_starting(server: Any) -> None:
    # Once, in the arbiter, before it forks any worker.  allowed_uids lets
    # workers that dropped privileges to ``user`` connect.
    server.hub = clusterhub.Hub(address=web_hub.ADDRESS, allowed_uids=[server.cfg.uid])
    web_hub.setup_master(server.hub)
    server.log.info("clusterhub: hub at %s", server.hub.address)


def post_worker_init(worker: Any) -> None:
    # In each worker, after it dropped privileges and before it serves.
    hub = web_hub.worker_hub()
    worker.log.info("clusterhub: worker %d connected (pid %d)", hub.worker_id, os.getpid())


def child_exit(server: Any, worker: Any) -> None:
    # gunicorn reaped the worker itself: the hub never does (it only watches).
    server.log.info("clusterhub: child_exit pid %d", worker.pid)


def on_exit(server: Any) -> None:
    server.hub.close()
