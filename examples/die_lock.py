"""Workers that exit while holding a lock do not take it with them.

Port of cluster-hub's examples/die_lock.js: two workers each lock "foo" and
exit without unlocking; the next one still gets it, and is told the previous
holder died (``recovered``).  Run: python examples/die_lock.py
"""

import os
import signal

import clusterhub

hub = clusterhub.Hub()


def worker(how: str) -> None:
    lk = hub.lock("foo")
    lk.acquire()
    print(f"worker {hub.worker_id}: got foo (recovered={lk.recovered}), {how} without unlocking", flush=True)
    if how == "exits":
        os._exit(0)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    with hub:
        for how in ("exits", "is killed"):
            w = hub.fork(worker, how)
            w.join(10)
            print(f"master: worker {w.id} ended with exit code {w.exitcode}", flush=True)
        with hub.lock("foo") as foo:
            print(f"master: got foo (recovered={foo.recovered})", flush=True)
