"""The idle case: the CPU an idle master with 4 idle workers uses, their
wake-ups (context switches, from ``/proc/<pid>/task/*/status``: of the
master, and of the busiest worker), and the memory (PSS) a worker costs over
a bare forked child, against the same master with bare forked children.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import statistics
import time
from typing import Any, Iterator

from .. import Hub
from .host import UNPINNED, Batch, Sample, hosted, pause_forever, reap, run_forked, serve
from .jobs import Job, Target, fmt_cpu

# A master and 4 idle workers; from outside, the CPU they use over `size`
# seconds (utime+stime, and the per-thread schedstat run time in ns), their
# wake-ups (all together, the master's, the busiest worker's), and the PSS of a
# worker against a bare child forked by the same master.


def _idle_host(conn: Any, with_hub: bool, workers: int) -> None:
    info: dict[str, Any] = {"master": os.getpid()}
    hub = Hub() if with_hub else None
    pids = []
    try:
        if hub is not None:
            info["workers"] = [hub.fork(pause_forever).pid for _ in range(workers)]
            pids.append(run_forked(pause_forever))
            info["bare"] = pids[-1]
        else:
            pids = [run_forked(pause_forever) for _ in range(workers)]
            info["workers"] = pids
        serve(conn, lambda _: None, ready=info)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            reap(pid)
        if hub is not None:
            hub.close()


def _proc_usage(pids: list[int]) -> tuple[float, int, int]:
    """(utime+stime s, on-CPU ns of every thread, context switches) of ``pids``."""
    ticks = run_ns = switches = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    run_ns += int(f.read().split()[0])
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    switches += sum(int(ln.split()[1]) for ln in f if "ctxt_switches" in ln)
    return ticks / os.sysconf("SC_CLK_TCK"), run_ns, switches


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("Pss:"))


@contextlib.contextmanager
def _idle(with_hub: bool, placement: str = UNPINNED, workers: int = 4) -> Iterator[Batch]:
    with hosted(_idle_host, with_hub, workers, placement=placement) as host:
        info = host.ready
        pids = [info["master"], *info["workers"]]

        def batch(seconds: float) -> Sample:
            before = [_proc_usage([pid]) for pid in pids]
            time.sleep(seconds)
            after = [_proc_usage([pid]) for pid in pids]
            s0, r0, w0 = (sum(col) for col in zip(*before))
            s1, r1, w1 = (sum(col) for col in zip(*after))
            wakeups = [(a[2] - b[2]) / seconds for a, b in zip(after, before)]
            out = {"t": (r1 - r0) / 1e9 / seconds, "cpu_percent_ticks": 100 * (s1 - s0) / seconds,
                   "wakeups_per_s": (w1 - w0) / seconds, "master_wakeups_per_s": wakeups[0],
                   "worker_wakeups_per_s": max(wakeups[1:])}
            if "bare" in info:
                worker = statistics.median(pss_kib(p) for p in info["workers"])
                bare = pss_kib(info["bare"])
                out.update(worker_pss_kib=worker, bare_child_pss_kib=bare, pss_delta_kib=worker - bare)
            return out

        yield batch


IDLE = Job(
    "idle", "CPU s per s used by an idle master + 4 idle workers",
    {"clusterhub": functools.partial(_idle, True), "bare-fork": functools.partial(_idle, False)},
    size=2.0, rounds=3, smoke=0.1, params={"workers": 4},
    show=("cpu_percent_ticks", "master_wakeups_per_s", "worker_wakeups_per_s", "worker_pss_kib",
          "bare_child_pss_kib", "pss_delta_kib"),
    fmt=fmt_cpu,
    targets=(
        Target("clusterhub", None, 0.001, "~0 % CPU (<= 0.1 %)"),
        Target("clusterhub", None, 0.5, "master: ~0 wake-ups/s (<= 0.5/s)", key="master_wakeups_per_s"),
        Target("clusterhub", None, 0.5, "each worker: ~0 wake-ups/s (<= 0.5/s)", key="worker_wakeups_per_s"),
    ),
)
