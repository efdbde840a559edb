"""``python -m clusterhub demo``: a short tour that explains itself."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Optional

from .errors import WorkerDied
from .hub import Hub
from .process import Worker


def _say(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    hub = Hub()
    acks: list[str] = []
    acked = threading.Semaphore(0)

    # Handlers registered before fork() exist in every worker from its first instant.
    @hub.on("whoami")
    def whoami(data: Any, sender: Optional[Worker]) -> str:
        return f"worker {hub.worker_id} (pid {os.getpid()})"

    @hub.on("square")
    def square(n: int, sender: Optional[Worker]) -> int:
        return n * n

    @hub.on("tick")
    def tick(data: Any, sender: Optional[Worker]) -> None:
        hub.send_to_master("ack", f"worker {hub.worker_id} got {data!r}")

    @hub.on("ack")
    def ack(text: str, sender: Optional[Worker]) -> None:
        acks.append(text)
        acked.release()

    @hub.on("slow question")
    def never_answers(data: Any, sender: Optional[Worker]) -> None:
        os._exit(3)  # dies with the request pending

    def worker() -> None:
        n = hub.worker_id or 0
        answer = hub.request_master("square", n).result(timeout=10)
        hub.send_to_master("ack", f"worker {n} asked the master for {n}² and got {answer}")
        threading.Event().wait(60)  # serve requests until the master closes the hub

    def holder() -> None:
        lk = hub.lock("ledger")
        lk.acquire()
        hub.send_to_master("ack", f"worker {hub.worker_id} holds 'ledger' and will be killed")
        threading.Event().wait(60)

    with hub:
        _say("clusterhub demo: a master and its workers, messages and crash-robust locks\n")
        workers = [hub.fork(worker) for _ in range(3)]
        _say(f"1. forked {len(workers)} workers: ids {[w.id for w in workers]}")
        for _ in workers:
            acked.acquire(timeout=10)
        _say("2. each worker made a request to the master and got its answer:")
        for line in sorted(acks):
            _say(f"     {line}")
        acks.clear()

        _say("3. the master asks every worker at once (request_workers):")
        for wid, who in hub.request_workers("whoami", timeout=10).result().items():
            _say(f"     {wid}: {who}")

        _say("4. the master broadcasts 'tick' to every worker; each acknowledges:")
        hub.send_to_workers("tick", "tick")
        for _ in workers:
            acked.acquire(timeout=10)
        for line in sorted(acks):
            _say(f"     {line}")
        acks.clear()

        _say("5. a worker dies while a request to it is pending:")
        try:
            hub.request_worker(workers[0], "slow question", timeout=10).result()
        except WorkerDied as e:
            _say(f"     the request failed at once with WorkerDied: {e}")
        workers[0].join(10)
        _say(f"     worker {workers[0].id} exit code: {workers[0].exitcode}")

        _say("6. a worker holding a global lock is killed with SIGKILL:")
        h = hub.fork(holder)
        acked.acquire(timeout=10)
        _say(f"     {acks.pop()}")
        _say(f"     held locks: {hub.held_locks()}")
        ledger = hub.lock("ledger")
        os.kill(h.pid or 0, signal.SIGKILL)
        t0 = time.perf_counter()
        with ledger:
            waited = (time.perf_counter() - t0) * 1e6
            _say(f"     the master got 'ledger' {waited:.0f} µs later, recovered={ledger.recovered}")
        h.join(10)
        _say(f"     the holder's exit code: {h.exitcode} (killed by signal {-(h.exitcode or 0)})")

    _say("\ndone: the hub is closed and every worker has exited.")
    return 0
