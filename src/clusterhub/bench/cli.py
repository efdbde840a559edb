"""``python -m clusterhub bench``: the quick plan over the kit's jobs, printed
as a table (or JSON), in under a minute.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Optional

from .aio import ASYNCIO_ROUND_TRIP
from .connecting import CONNECT
from .fanin import FAN_IN_4, FAN_IN_16
from .host import ONE_CPU, TWO_CPUS, UNPINNED, describe_placements
from .idle import IDLE
from .jobs import Job, compare, conditions, format_group, measure_job, summarize
from .locking import CONTENDED_2, CONTENDED_4, P99_BUSY, RECOVERY, UNCONTENDED
from .messaging import BROADCAST, ONE_WAY, ROUND_TRIP, RT_P99_BUSY

JOBS = (ROUND_TRIP, RT_P99_BUSY, ASYNCIO_ROUND_TRIP, FAN_IN_4, FAN_IN_16, ONE_WAY, BROADCAST,
        UNCONTENDED, P99_BUSY, CONTENDED_2, CONTENDED_4, RECOVERY, IDLE, CONNECT)


# (job, placement, size, rounds): smaller than the full suite, under a minute in all.
QUICK_PLAN: tuple[tuple[Job, Optional[str], Any, int], ...] = (
    (ROUND_TRIP, UNPINNED, 300, 5),
    (ROUND_TRIP, ONE_CPU, 300, 5),
    (ROUND_TRIP, TWO_CPUS, 300, 5),
    (RT_P99_BUSY, None, (1000, 0.5), 3),
    (ASYNCIO_ROUND_TRIP, UNPINNED, 300, 5),
    (ASYNCIO_ROUND_TRIP, ONE_CPU, 300, 5),
    (ASYNCIO_ROUND_TRIP, TWO_CPUS, 300, 5),
    (FAN_IN_4, None, 0.1, 3),
    (FAN_IN_16, None, 0.1, 3),
    (ONE_WAY, UNPINNED, 5000, 5),
    (ONE_WAY, ONE_CPU, 5000, 5),
    (ONE_WAY, TWO_CPUS, 5000, 5),
    (BROADCAST, UNPINNED, 500, 5),
    (BROADCAST, ONE_CPU, 500, 5),
    (BROADCAST, TWO_CPUS, 500, 5),
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
        f"{cond['cpus']} CPUs ({cond['cpu_model']}), load {', '.join(f'{x:.2f}' for x in cond['loadavg'])}",
        describe_placements(),
    ]
    t_start = time.monotonic()
    for job, placement, size, rounds in plan:
        group = job.group(placement)
        print(f"measuring {group} ...", file=sys.stderr, flush=True)
        unavailable: dict[str, str] = {}
        samples = measure_job(job, placement, size=size, rounds=rounds, unavailable=unavailable)
        summaries = {case: summarize(s) for case, s in samples.items()}
        out["groups"][group] = {"figure": job.figure, "size": size, "placement": placement,
                                "cases": summaries, "unavailable": unavailable,
                                **compare(job, summaries, placement)}
        lines += [""] + format_group(job, placement, summaries, unavailable)
    lines += ["", f"({time.monotonic() - t_start:.0f} s; the full comparison with pyzmq, node's cluster-hub, "
                  "filelock, fasteners, posix_ipc and sysv_ipc: see benchmarks/README.md)"]
    if args.json == "-":
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
