import threading
from typing import Any

import clusterhub

hub = clusterhub.Hub()            # in the master, before any worker starts
ready = threading.Semaphore(0)    # (in the master) a worker said "ready"
finish = threading.Event()        # (in a worker) the master said "finish"

@hub.on("sum")                    # registered before fork(): every worker inherits it
def total(data: Any, sender: clusterhub.Worker | None) -> Any:
    return data["a"] + data["b"]  # the return value answers a request

hub.on("ready", lambda data, sender: ready.release())
hub.on("finish", lambda data, sender: finish.set())

def work(n: int) -> None:
    # in the worker, the same `hub` object is the worker side
    answer = hub.request_master("sum", {"a": n, "b": 1}).result()
    print(f"worker {hub.worker_id}: {n} + 1 = {answer}", flush=True)
    with hub.lock("invoices") as held:      # global: all processes, all threads
        if held.recovered:                  # the previous holder died holding it
            print("repairing after a crash")
    hub.send_to_master("ready")
    finish.wait()                 # keep answering requests until the master is done

if __name__ == "__main__":
    with hub:                               # close(): stops workers, frees resources
        workers = []
        for n in range(3):
            workers.append(hub.fork(work, n))
            ready.acquire()                 # one at a time: the output's order is fixed
        print(hub.request_workers("sum", {"a": 2, "b": 2}).result())  # {1: 4, 2: 4, 3: 4}
        hub.send_to_workers("finish")
        hub.join()                          # wait until every worker has exited
        print("exit codes:", [w.exitcode for w in workers])
