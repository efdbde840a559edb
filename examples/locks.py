"""A global lock shared by the master and a worker.

Port of cluster-hub's examples/locks.js: the master holds "foo" for a second;
the worker waits for "foo", then takes "bar" while holding it, then "foo"
again.  Run: python examples/locks.py

Locks are not first-come-first-served: the steps are sequenced explicitly.
"""

import threading
import time

import clusterhub

hub = clusterhub.Hub()


def worker() -> None:
    hub.send_to_master("waiting")
    with hub.lock("foo"):
        print(f"worker {hub.worker_id}: got foo", flush=True)
        with hub.lock("bar"):
            print(f"worker {hub.worker_id}: got bar while holding foo", flush=True)
        print(f"worker {hub.worker_id}: released bar", flush=True)
    print(f"worker {hub.worker_id}: released foo", flush=True)
    with hub.lock("foo"):
        print(f"worker {hub.worker_id}: got foo again", flush=True)


if __name__ == "__main__":
    with hub:
        waiting = threading.Event()
        hub.on("waiting", lambda data, sender: waiting.set())
        foo = hub.lock("foo")
        with foo:
            print("master: holding foo for a second", flush=True)
            w = hub.fork(worker)
            waiting.wait(10)
            time.sleep(1)  # the demonstration: the worker waits meanwhile
            print("master: releasing foo", flush=True)
        w.join(10)
        print(f"master: worker exited with {w.exitcode}; foo is locked: {foo.locked()}", flush=True)
