"""Broadcasts: from the master to every worker, and from one worker to the
others (relayed by the master, which keeps the original sender).

The original's broadcast.js was a copy of index.js; this one broadcasts.
Run: python examples/broadcast.py
"""

import threading
from typing import Any

import clusterhub

hub = clusterhub.Hub()
acks: list[str] = []
all_acked = threading.Event()
expected = 0


# Registered before fork(): every worker has it from its first instant.
@hub.on("news")
def news(data: Any, sender: clusterhub.Worker | None) -> None:
    origin = "the master" if sender is None else f"worker {sender.id}"
    hub.send_to_master("ack", f"worker {hub.worker_id} heard {data!r} from {origin}")


@hub.on("shout")
def shout(data: Any, sender: clusterhub.Worker | None) -> None:
    hub.send_to_workers("news", f"hi from worker {hub.worker_id}")


@hub.on("ack")
def ack(data: Any, sender: clusterhub.Worker | None) -> None:
    acks.append(data)
    if len(acks) == expected:
        all_acked.set()


def worker() -> None:
    done = threading.Event()
    hub.on("bye", lambda data, sender: done.set())
    hub.send_to_master("listening")
    done.wait(30)


def expect(n: int) -> None:
    global expected
    expected = n


def collect() -> None:
    all_acked.wait(10)
    for line in sorted(acks):
        print(line, flush=True)
    acks.clear()
    all_acked.clear()


if __name__ == "__main__":
    with hub:
        listening = threading.Semaphore(0)
        hub.on("listening", lambda data, sender: listening.release())
        workers = [hub.fork(worker) for _ in range(3)]
        for _ in workers:
            listening.acquire(timeout=10)

        print("master broadcasts:", flush=True)
        expect(3)
        hub.send_to_workers("news", "hi from the master")
        collect()

        print("worker 1 broadcasts:", flush=True)
        expect(2)  # the other two workers; not worker 1, not the master
        hub.send_to_worker(1, "shout")
        collect()

        hub.send_to_workers("bye")
        hub.join(10)
