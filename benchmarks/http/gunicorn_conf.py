"""gunicorn's configuration for the HTTP load benchmark
(``benchmarks/test_bench_http.py``; the app is ``counter_app.py``).

Four ``sync`` workers on ``CLUSTERHUB_BENCH_BIND``, no access log.  With
``CLUSTERHUB_BENCH_LOCK=clusterhub``, the arbiter (the master) creates the hub
at ``CLUSTERHUB_BENCH_ADDRESS`` before it forks any worker and closes it when
it exits; each worker joins it by address once it has started.  Every worker
then leaves a ``ready-<pid>`` file in ``CLUSTERHUB_BENCH_DIR``.
"""

from __future__ import annotations

import os
from typing import Any

bind = os.environ["CLUSTERHUB_BENCH_BIND"]
workers = 4
worker_class = "sync"
accesslog = None
loglevel = "warning"

_KIND = os.environ["CLUSTERHUB_BENCH_LOCK"]
_DIR = os.environ["CLUSTERHUB_BENCH_DIR"]


def on_starting(server: Any) -> None:
    if _KIND == "clusterhub":
        import clusterhub

        server.clusterhub = clusterhub.Hub(address=os.environ["CLUSTERHUB_BENCH_ADDRESS"])


def on_exit(server: Any) -> None:
    hub = getattr(server, "clusterhub", None)
    if hub is not None:
        hub.close()


def post_worker_init(worker: Any) -> None:
    if _KIND == "clusterhub":
        import clusterhub

        clusterhub.connect(os.environ["CLUSTERHUB_BENCH_ADDRESS"])
    open(os.path.join(_DIR, f"ready-{os.getpid()}"), "w").close()
