"""Requests with replies: "sum" is answered by the master (asked by the master
and by a worker), "mult" by the worker (asked by the master).

Port of cluster-hub's examples/requests.js.  Run: python examples/requests.py
"""

import threading
from typing import Any

import clusterhub

hub = clusterhub.Hub()


@hub.on("sum")
def total(data: Any, sender: clusterhub.Worker | None) -> Any:
    return data["a"] + data["b"]


def worker() -> None:
    done = threading.Event()

    @hub.on("mult")
    def mult(data: Any, sender: clusterhub.Worker | None) -> Any:
        return data["a"] * data["b"]

    hub.on("done", lambda data, sender: done.set())
    s = hub.request_master("sum", {"a": 1, "b": 2}).result(timeout=10)
    print(f"worker {hub.worker_id}: 1 + 2 = {s} (answered by the master)", flush=True)
    hub.send_to_master("ready")
    done.wait(10)


if __name__ == "__main__":
    with hub:
        ready = threading.Event()
        hub.on("ready", lambda data, sender: ready.set())
        print(f"master: 3 + 4 = {hub.request_master('sum', {'a': 3, 'b': 4}).result()}", flush=True)
        w = hub.fork(worker)
        ready.wait(10)
        # node style: callback(error, result)
        got = threading.Event()

        def on_mult(error: BaseException | None, result: Any) -> None:
            print(f"master: 5 * 6 = {result} (answered by worker {w.id}, error={error})", flush=True)
            got.set()

        hub.request_worker(w, "mult", {"a": 5, "b": 6}, callback=on_mult)
        got.wait(10)
        hub.send_to_worker(w, "done")
        w.join(10)
