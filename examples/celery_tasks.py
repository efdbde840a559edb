"""Celery wiring: the hub lives in the worker's main process, every pool child connects.

    cd examples && CLUSTERHUB_ADDRESS=@celery-example celery -A celery_tasks worker --pool=prefork --concurrency=2

and, from another shell in examples/ with the same environment:

    python -c "import celery_tasks as t; print(t.incr.delay().get(timeout=10))"

No broker server is needed: the broker is kombu's ``filesystem://`` transport and
the results go to ``file://``, both in folders under ``EXAMPLE_DIR`` (default: a
folder in the temporary directory).  ``CLUSTERHUB_ADDRESS`` is where the hub
listens (default ``@celery-example``).  Tasks: ``incr`` (a counter in a file,
read-modify-write under the global lock "counter"), ``die_holding`` (a pool child
killed while it holds that lock) and ``hub_workers`` (the master's list of
connected workers, asked by a child).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_shutdown
from kombu.transport import filesystem
from kombu.utils.json import dumps

import clusterhub

ADDRESS = os.environ.get("CLUSTERHUB_ADDRESS", "@celery-example")
DATA = Path(os.environ.get("EXAMPLE_DIR") or Path(tempfile.gettempdir()) / "clusterhub-celery-example")
# With an asynchronous broker (Redis, RabbitMQ) a pool child must report for work within
# worker_proc_alive_timeout (4 s by default) or Celery kills it, and it connects before it
# reports: connect() gives up before that, with its error in the log.  (With filesystem://
# Celery runs billiard's blocking pool instead, which has no such limit.)
CONNECT_TIMEOUT = 3.0
log = logging.getLogger("celery_tasks")


# (The ignores name "unused-ignore" too: without kombu installed, mypy sees Any
# here and has nothing to ignore but the subclassing of Any.)
class _Channel(filesystem.Channel):  # type: ignore[misc,unused-ignore]
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override,unused-ignore]
        # kombu writes a message file in place, and a worker that lists the folder
        # meanwhile may read it empty and stop (kombu issue #1551): write it under
        # a name the worker skips, then rename it (atomic).
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"  # (kombu's name)
        tmp = os.path.join(self.data_folder_out, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(dumps(payload))  # type: ignore[no-untyped-call,unused-ignore]
        os.replace(tmp, os.path.join(self.data_folder_out, name))


class AtomicFilesystemTransport(filesystem.Transport):  # type: ignore[misc,unused-ignore]
    """kombu's ``filesystem://`` transport, its messages written atomically."""

    Channel = _Channel


def make_app(data: Path) -> Celery:
    """A Celery app whose broker and results are folders under ``data``."""
    queue, results = data / "queue", data / "results"
    for folder in (queue, data / "control", results):
        folder.mkdir(parents=True, exist_ok=True)
    app = Celery("celery_tasks")
    app.conf.update(
        broker_url="filesystem://",
        broker_transport=f"{__name__}:AtomicFilesystemTransport",  # (see above)
        broker_transport_options={
            "data_folder_in": str(queue),  # producers and workers share one folder
            "data_folder_out": str(queue),
            "control_folder": str(data / "control"),
            "polling_interval": 0.05,  # seconds between looks at the folder (default 1)
        },
        broker_connection_retry_on_startup=True,
        result_backend=f"file://{results}",
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        # A task whose child died is failed (WorkerLostError) after this many
        # seconds (default 10): the child may have sent its result just before.
        worker_lost_wait=2.0,
    )
    return app


app = make_app(DATA)


def setup_master(hub: clusterhub.Hub) -> None:
    """The master's handlers: "workers" lists the connected workers."""

    def workers(_data: object, _sender: object) -> list[tuple[int, Optional[int]]]:
        return sorted((w.id, w.pid) for w in hub.workers.values())

    hub.on("workers", workers)


# The wiring (the README's Celery recipe shows this block, from "def start_hub" to "worker_shutdown").
# worker_init's and worker_shutdown's sender is Celery's WorkController: the hub hangs on it.
def start_hub(sender: Any, **_: Any) -> None:  # worker_init: in the main process, before the pool forks
    try:
        sender.clusterhub = clusterhub.Hub(address=ADDRESS)
    except clusterhub.HubError as e:  # e.g. address in use (Celery would only log an Exception)
        raise SystemExit(f"clusterhub: cannot listen at {ADDRESS}: {e}") from e
    setup_master(sender.clusterhub)

def connect_child(**_: Any) -> None:  # worker_process_init: in each pool child, replacements too
    clusterhub.connect(ADDRESS, timeout=CONNECT_TIMEOUT)  # (a failure is logged; tasks get it from hub())

def close_hub(sender: Any, **_: Any) -> None:  # worker_shutdown: in the main process, after the pool
    sender.clusterhub.close()
    log.info("clusterhub: hub at %s closed", ADDRESS)

worker_init.connect(start_hub)
worker_process_init.connect(connect_child)
worker_shutdown.connect(close_hub)


def hub() -> clusterhub.Hub:
    """This child's hub (connected by ``connect_child``; the same hub again)."""
    return clusterhub.connect(ADDRESS, timeout=CONNECT_TIMEOUT)


def _incr() -> tuple[int, bool]:
    """The counter +1 under the global lock: (its new value, whether the
    previous holder died holding the lock)."""
    lk = hub().lock("counter")
    with lk:
        path = DATA / "counter"
        value = (int(path.read_text() or 0) if path.exists() else 0) + 1
        path.write_text(str(value))
        return value, lk.recovered


def _die_holding() -> None:
    """Take the lock and die holding it: a pool child killed mid-task."""
    hub().lock("counter").acquire()
    os.kill(os.getpid(), signal.SIGKILL)


def _hub_workers() -> tuple[int, Optional[int], list[tuple[int, Optional[int]]]]:
    """(this child's pid, its worker id, the master's [worker id, pid] list)."""
    h = hub()
    return os.getpid(), h.worker_id, h.request_master("workers").result(timeout=5)


# (Registered with calls, not decorators: Celery has no type information.)
incr = app.task(name="celery_tasks.incr")(_incr)
# acks_late=False (the default, said here on purpose): the message is acknowledged
# before the task runs, so a task that kills its child is not delivered again (with
# task_acks_late and task_reject_on_worker_lost it would kill child after child).
die_holding = app.task(name="celery_tasks.die_holding", acks_late=False)(_die_holding)
hub_workers = app.task(name="celery_tasks.hub_workers")(_hub_workers)
