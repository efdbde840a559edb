"""Jobs, and what is made of their samples: measuring, summaries, targets, report.

A *job* (``Job``) is one comparison: its cases (clusterhub's and the peers'),
the batch size, the rounds and the targets.  ``measure_job`` sets every case
up at once, runs a warm-up batch of each, then rounds of one batch per case
in rotating order (A B A B ..., since these machines are shared and noisy);
``summarize`` takes each case's medians, ``compare`` the clusterhub/peer
ratios and the targets' verdicts, and ``format_group`` prints them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, ContextManager, Mapping, NamedTuple, Optional

from .. import __version__
from .host import Batch, Case, Sample


class Target(NamedTuple):
    """A promise about a job's figures: ``case``'s figure <= ``bound`` x
    ``peer``'s (or <= ``bound`` itself when ``peer`` is None); ``text`` says it
    in words.  Each job lists its own; the README's Performance table shows
    them all with the last full run."""

    case: str
    peer: Optional[str]
    bound: float
    text: str


def fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.2f} µs"
    return f"{s * 1e9:.0f} ns"


def fmt_cpu(x: float) -> str:
    return f"{x * 100:.3f} % CPU"


@dataclasses.dataclass(frozen=True)
class Job:
    """One comparison: clusterhub's case(s) and their peers."""

    name: str
    figure: str  # what a sample's "t" is
    cases: Mapping[str, Case]
    size: Any  # what each batch gets (messages, seconds, ...), full runs
    rounds: int
    smoke: Any  # the size of a one-batch smoke run
    pinnable: bool = False  # measured unpinned and pinned to one CPU
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    targets: tuple[Target, ...] = ()
    show: tuple[str, ...] = ()  # extras worth printing next to the figure
    fmt: Callable[[float], str] = fmt_time

    def extended(self, cases: Mapping[str, Case], targets: tuple[Target, ...] = ()) -> "Job":
        """This job with more peers (and targets about them)."""
        return dataclasses.replace(
            self, cases={**self.cases, **cases}, targets=self.targets + targets
        )

    def group(self, pinned: Optional[bool]) -> str:
        if not self.pinnable or pinned is None:
            return self.name
        return f"{self.name} {'pinned' if pinned else 'unpinned'}"

    def make(self, case: str, pinned: Optional[bool]) -> ContextManager[Batch]:
        return self.cases[case](pinned=bool(pinned), **self.params)


def measure_job(
    job: Job, pinned: Optional[bool] = None, *, size: Any = None, rounds: Optional[int] = None,
    cases: Optional[list[str]] = None, warmup: int = 1,
) -> dict[str, list[Sample]]:
    """Set every case up, run ``warmup`` batches of each, then ``rounds``
    rounds of one batch per case, interleaved in rotating order."""
    size = job.size if size is None else size
    rounds = job.rounds if rounds is None else rounds
    names = list(job.cases) if cases is None else cases
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    with contextlib.ExitStack() as stack:
        batches = {name: stack.enter_context(job.make(name, pinned)) for name in names}
        for _ in range(warmup):
            for name in names:
                batches[name](size)
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append(batches[name](size))
    return samples


def measure_once(job: Job, case: str, pinned: Optional[bool] = None) -> list[Sample]:
    """One small batch of one case: the smoke test."""
    with job.make(case, pinned) as batch:
        return [batch(job.smoke)]


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Medians of a case's samples (element-wise for lists; all() for flags)."""
    out: dict[str, Any] = {"rounds": len(samples)}
    for key in dict.fromkeys(k for s in samples for k in s):
        values = [s[key] for s in samples if s.get(key) is not None]
        if not values:
            out[key] = None
            continue
        v0 = values[0]
        if isinstance(v0, bool):
            out[key] = all(values)
        elif isinstance(v0, (int, float)):
            out[key] = statistics.median(values)
        elif isinstance(v0, list):
            out[key] = [statistics.median(col) for col in zip(*values)]
        else:
            out[key] = values[-1]
    return out


def is_ours(case: str) -> bool:
    return case.startswith("clusterhub")


def _usable(summary: dict[str, Any]) -> bool:
    """A peer that never got the lock back has no figure to compare with."""
    return summary.get("recovers", True) is not False


def compare(job: Job, summaries: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """clusterhub/peer ratios of the median figures, and the targets' verdicts."""
    ratios = {
        f"{ours}/{peer}": summaries[ours]["t"] / summaries[peer]["t"]
        for ours in summaries if is_ours(ours)
        for peer in summaries if not is_ours(peer) and _usable(summaries[peer])
        if summaries[peer]["t"] > 0
    }
    verdicts = []
    for tg in job.targets:
        if tg.case not in summaries or (tg.peer is not None and tg.peer not in summaries):
            continue
        value = summaries[tg.case]["t"]
        if tg.peer is not None:
            peer_t = summaries[tg.peer]["t"]  # (a peer, or another clusterhub case)
            value = value / peer_t if peer_t > 0 else math.inf
        verdicts.append({**tg._asdict(), "value": value, "met": value <= tg.bound})
    return {"ratios": ratios, "targets": verdicts}


def format_group(job: Job, group: str, summaries: Mapping[str, dict[str, Any]]) -> list[str]:
    """A few lines: each case's median, its ratios, and the targets' verdicts."""
    cmp = compare(job, summaries)
    rounds = max(s["rounds"] for s in summaries.values())
    lines = [f"{group}: {job.figure} (median of {rounds} interleaved batches)"]
    ours = [c for c in summaries if is_ours(c)]
    for case, s in summaries.items():
        extras = "  ".join(_fmt_extra(k, s[k]) for k in job.show if k in s)
        line = f"  {case:<20} {job.fmt(s['t']):>14}"
        if not _usable(s):
            line += "  never recovers (the waiter timed out)"
        elif not is_ours(case) and ours:
            line += "  " + "  ".join(f"{o}/{case} {cmp['ratios'][f'{o}/{case}']:.2f}" for o in ours
                                     if f"{o}/{case}" in cmp["ratios"])
        lines.append(line + (f"  [{extras}]" if extras else ""))
    for v in cmp["targets"]:
        what = f"{v['case']}/{v['peer']} = {v['value']:.2f}" if v["peer"] else \
            f"{v['case']} = {job.fmt(v['value'])}"
        lines.append(f"  target {v['text']}: {what} -> {'met' if v['met'] else 'MISSED'}")
    return lines


def _fmt_extra(key: str, value: Any) -> str:
    if isinstance(value, list):
        return f"{key}=" + "/".join(f"{v:.2f}" for v in value)
    if isinstance(value, float):
        return f"{key}={value:,.4g}" if abs(value) < 1000 else f"{key}={value:,.0f}"
    return f"{key}={value}"


def conditions() -> dict[str, Any]:
    """What the numbers were measured under."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        model = "?"
    return {
        "clusterhub": __version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
