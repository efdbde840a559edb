"""A worker exits without answering a request: the master's callback gets
WorkerDied instead of waiting forever.

Port of cluster-hub's examples/die_request.js.  Run: python examples/die_request.py
"""

import os
import threading
from typing import Any

import clusterhub

hub = clusterhub.Hub()


@hub.on("question")
def question(data: Any, sender: clusterhub.Worker | None) -> None:
    print(f"worker {hub.worker_id}: got {data!r}, exiting without an answer", flush=True)
    os._exit(0)


def worker() -> None:
    threading.Event().wait(30)  # the handler above ends this process


if __name__ == "__main__":
    with hub:
        w = hub.fork(worker)
        done = threading.Event()

        def answered(error: BaseException | None, result: Any) -> None:
            print(f"master: request ended with {type(error).__name__}: {error}", flush=True)
            done.set()

        hub.request_worker(w, "question", "what is 6 * 7?", callback=answered)
        done.wait(10)
        w.join(10)
        print(f"master: worker {w.id} exit code {w.exitcode}", flush=True)
