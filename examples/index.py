"""Messages master -> master, worker -> master and master -> worker.

Port of cluster-hub's examples/index.js.  Run: python examples/index.py
"""

import threading
from typing import Any

import clusterhub

hub = clusterhub.Hub()


@hub.on("master-to-master")
def from_myself(data: Any, sender: clusterhub.Worker | None) -> None:
    print(f"master: got {data!r} from {'itself' if sender is None else sender}", flush=True)


@hub.on("worker-to-master")
def from_worker(data: Any, sender: clusterhub.Worker | None) -> None:
    assert sender is not None  # only workers send this message
    print(f"master: got {data!r} from worker {sender.id}", flush=True)
    hub.send_to_worker(sender, "master-to-worker", "hello, worker")


def worker() -> None:
    answered = threading.Event()

    @hub.on("master-to-worker")
    def from_master(data: Any, sender: clusterhub.Worker | None) -> None:
        print(f"worker {hub.worker_id}: got {data!r} from the master", flush=True)
        answered.set()

    hub.send_to_master("worker-to-master", "hello, master")
    answered.wait(10)


if __name__ == "__main__":
    with hub:
        hub.send_to_master("master-to-master", "hello, me")
        hub.fork(worker).join()
