"""Joining by address: the time ``clusterhub.connect()`` takes (accept, the
handshake, the lock table's memfd), as a median and p99, over many connect
and leave cycles, with the master's fds and memory after each batch (they
must stay flat)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from typing import Any

from .. import Hub, connect
from .host import UNPINNED, ask, expect, hosted, reap, run_forked, serve, stop
from .jobs import Job


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))


def _cycles(address: str, n: int) -> dict[str, Any]:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        hub = connect(address)
        lat.append(time.perf_counter_ns() - t0)
        hub.close()
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return {"t": p50 / 1e9, "p50_us": p50 / 1e3, "p99_us": p99 / 1e3, "cycles": n}


def _connect_host(conn: Any) -> None:
    # The host is the master; a plain child (not forked by the hub) connects
    # and leaves, again and again.
    address = f"@clusterhub-bench-connect-{os.getpid()}"
    hub = Hub(address=address)
    inner, theirs = mp.Pipe()

    def connector() -> None:
        hub._abandon()  # (inert in this child: it joins by address instead)
        serve(theirs, lambda n: _cycles(address, n))

    pid = run_forked(connector)
    theirs.close()
    try:
        expect(inner)

        def batch(n: int) -> dict[str, Any]:
            sample: dict[str, Any] = ask(inner, n)
            # (Each worker that left is reported a moment later: see
            # Processes.worker_left.  join() returns once all were.)
            settled = hub.join(10)
            sample.update(master_fds=len(os.listdir("/proc/self/fd")), master_rss_kib=_rss_kib(),
                          workers_left=len(hub.workers), settled=settled)
            return sample

        serve(conn, batch)
    finally:
        stop(inner)
        hub.close()
        reap(pid)


def _connect_case(placement: str = UNPINNED) -> Any:
    return hosted(_connect_host, placement=placement)


CONNECT = Job(
    "connect", "s per clusterhub.connect() (accept, handshake, lock table memfd), median of a batch",
    {"clusterhub": _connect_case},
    size=200, rounds=5, smoke=5,
    show=("p50_us", "p99_us", "master_fds", "master_rss_kib", "workers_left"),
)
