"""``python -m clusterhub bench``: the quick plan over the kit's jobs, printed
as a table (or JSON), in under a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional

from .connecting import CONNECT
from .idle import IDLE
from .jobs import Job, compare, conditions, format_group, measure_job, summarize
from .locking import CONTENDED_2, CONTENDED_4, P99_BUSY, RECOVERY, UNCONTENDED
from .messaging import BROADCAST, ONE_WAY, ROUND_TRIP

JOBS = (ROUND_TRIP, ONE_WAY, BROADCAST, UNCONTENDED, P99_BUSY, CONTENDED_2, CONTENDED_4,
        RECOVERY, IDLE, CONNECT)


# (job, pinned, size, rounds): smaller than the full suite, under a minute in all.
QUICK_PLAN: tuple[tuple[Job, Optional[bool], Any, int], ...] = (
    (ROUND_TRIP, False, 300, 5),
    (ROUND_TRIP, True, 300, 5),
    (ONE_WAY, False, 5000, 5),
    (ONE_WAY, True, 5000, 5),
    (BROADCAST, False, 500, 5),
    (BROADCAST, True, 500, 5),
    (UNCONTENDED, None, 0.01, 9),
    (P99_BUSY, None, 10000, 5),
    (CONTENDED_2, None, 0.2, 5),
    (CONTENDED_4, None, 0.2, 3),
    (RECOVERY, None, 0.1, 7),
    (IDLE, None, 1.0, 1),
)


def bench(args: argparse.Namespace) -> int:
    """Measure the quick plan and print (or write) the comparison."""
    plan = [p for p in QUICK_PLAN if not args.only or any(o in p[0].group(p[1]) for o in args.only)]
    if not plan:
        print(f"no job matches {args.only}; jobs: {', '.join(j.name for j in JOBS)}", file=sys.stderr)
        return 2
    cond = conditions()
    out: dict[str, Any] = {"conditions": cond, "groups": {}}
    lines = [
        f"clusterhub {cond['clusterhub']} vs stdlib peers: medians of interleaved batches, "
        f"ratios clusterhub/peer (< 1: clusterhub faster)",
        f"{cond['cpus']} CPUs ({cond['cpu_model']}), load {', '.join(f'{x:.2f}' for x in cond['loadavg'])}; "
        f"'pinned' = every process on CPU 0",
    ]
    t_start = time.monotonic()
    for job, pinned, size, rounds in plan:
        group = job.group(pinned)
        print(f"measuring {group} ...", file=sys.stderr, flush=True)
        samples = measure_job(job, pinned, size=size, rounds=rounds)
        summaries = {case: summarize(s) for case, s in samples.items()}
        out["groups"][group] = {"figure": job.figure, "size": size, "cases": summaries,
                                **compare(job, summaries)}
        lines += [""] + format_group(job, group, summaries)
    lines += ["", f"({time.monotonic() - t_start:.0f} s; the full comparison with pyzmq, filelock, "
                  "fasteners, posix_ipc and sysv_ipc: see benchmarks/README.md)"]
    if args.json == "-":
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
