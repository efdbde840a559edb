"""Jobs, and what is made of their samples: measuring, summaries, targets, report.

A *job* (``Job``) is one comparison: its cases (clusterhub's and the peers'),
the batch size, the rounds, the placements it is measured in (one *group*
per placement, e.g. ``round-trip two-cpus``) and the targets.
``measure_job`` sets every case up at once, runs a warm-up batch of each,
then rounds of one batch per case in rotating order (A B A B ..., since these
machines are shared and noisy); ``summarize`` takes each case's medians,
``compare`` the clusterhub/peer ratios and the targets' verdicts, and
``format_group`` prints them.
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
from .host import UNPINNED, Batch, Case, Sample, Unavailable


class Target(NamedTuple):
    """A promise about a job's figures: ``case``'s figure <= ``bound`` x
    ``peer``'s (or <= ``bound`` itself when ``peer`` is None); ``text`` says it
    in words.  ``key`` is the sample's entry compared (the figure ``"t"``, or
    an extra such as ``"master_wakeups_per_s"``); ``placements``, when given,
    limits the target to those groups of a placed job.  Each job lists its
    own; the README's Performance table shows them all with the last full run."""

    case: str
    peer: Optional[str]
    bound: float
    text: str
    placements: tuple[str, ...] = ()  # () = in every placement
    key: str = "t"


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
    placements: tuple[str, ...] = ()  # a group per placement (host.PLACEMENTS); () = one group, unpinned
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    targets: tuple[Target, ...] = ()
    show: tuple[str, ...] = ()  # extras worth printing next to the figure
    fmt: Callable[[float], str] = fmt_time

    def extended(self, cases: Mapping[str, Case], targets: tuple[Target, ...] = ()) -> "Job":
        """This job with more peers (and targets about them)."""
        return dataclasses.replace(
            self, cases={**self.cases, **cases}, targets=self.targets + targets
        )

    def group(self, placement: Optional[str]) -> str:
        if not self.placements or placement is None:
            return self.name
        return f"{self.name} {placement}"

    def make(self, case: str, placement: Optional[str]) -> ContextManager[Batch]:
        return self.cases[case](placement=placement or UNPINNED, **self.params)


def measure_job(
    job: Job, placement: Optional[str] = None, *, size: Any = None, rounds: Optional[int] = None,
    cases: Optional[list[str]] = None, warmup: int = 1, unavailable: Optional[dict[str, str]] = None,
) -> dict[str, list[Sample]]:
    """Set every case up, run ``warmup`` batches of each, then ``rounds``
    rounds of one batch per case, interleaved in rotating order.  A case that
    raises ``Unavailable`` while being set up is left out (the reason goes
    into ``unavailable``, case -> why)."""
    size = job.size if size is None else size
    rounds = job.rounds if rounds is None else rounds
    names = list(job.cases) if cases is None else cases
    with contextlib.ExitStack() as stack:
        batches = {}
        for name in names:
            try:
                batches[name] = stack.enter_context(job.make(name, placement))
            except Unavailable as e:
                if unavailable is not None:
                    unavailable[name] = str(e)
        names = list(batches)
        samples: dict[str, list[Sample]] = {name: [] for name in names}
        for _ in range(warmup):
            for name in names:
                batches[name](size)
        for r in range(rounds if names else 0):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append(batches[name](size))
    return samples


def measure_once(job: Job, case: str, placement: Optional[str] = None) -> list[Sample]:
    """One small batch of one case: the smoke test (``Unavailable`` when the
    case cannot run here)."""
    with job.make(case, placement) as batch:
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


def targets_for(job: Job, placement: Optional[str]) -> tuple[Target, ...]:
    """The job's targets that apply to the group of ``placement``."""
    where = placement or UNPINNED
    return tuple(tg for tg in job.targets if not tg.placements or where in tg.placements)


def compare(job: Job, summaries: Mapping[str, dict[str, Any]], placement: Optional[str] = None) -> dict[str, Any]:
    """clusterhub/peer ratios of the median figures, and the verdicts of the
    targets that apply to ``placement``'s group."""
    ratios = {
        f"{ours}/{peer}": summaries[ours]["t"] / summaries[peer]["t"]
        for ours in summaries if is_ours(ours)
        for peer in summaries if not is_ours(peer) and _usable(summaries[peer])
        if summaries[peer]["t"] > 0
    }
    verdicts = []
    for tg in targets_for(job, placement):
        if tg.case not in summaries or (tg.peer is not None and tg.peer not in summaries):
            continue
        value = summaries[tg.case].get(tg.key)
        if value is None:
            continue
        if tg.peer is not None:
            peer_v = summaries[tg.peer].get(tg.key) or 0  # (a peer, or another clusterhub case)
            value = value / peer_v if peer_v > 0 else math.inf
        verdicts.append({**tg._asdict(), "value": value, "met": value <= tg.bound})
    return {"ratios": ratios, "targets": verdicts}


def format_group(
    job: Job, placement: Optional[str], summaries: Mapping[str, dict[str, Any]],
    unavailable: Optional[Mapping[str, str]] = None,
) -> list[str]:
    """A few lines: each case's median, its ratios, and the targets' verdicts
    (and the cases left out, with the reason)."""
    group = job.group(placement)
    if not summaries:
        lines = [f"{group}: {job.figure}: nothing measured"]
        return lines + [f"  {case:<20} left out: {why}" for case, why in (unavailable or {}).items()]
    cmp = compare(job, summaries, placement)
    rounds = max(s["rounds"] for s in summaries.values())
    lines = [f"{group}: {job.figure} (median of {rounds} interleaved batches)"]
    ours = [c for c in summaries if is_ours(c)]
    width = max(20, *map(len, summaries))
    for case, s in summaries.items():
        extras = "  ".join(_fmt_extra(k, s[k]) for k in job.show if k in s)
        line = f"  {case:<{width}} {job.fmt(s['t']):>14}"
        if not _usable(s):
            line += "  never recovers (the waiter timed out)"
        elif not is_ours(case) and ours:
            line += "  " + "  ".join(f"{o}/{case} {cmp['ratios'][f'{o}/{case}']:.2f}" for o in ours
                                     if f"{o}/{case}" in cmp["ratios"])
        lines.append(line + (f"  [{extras}]" if extras else ""))
    for case, why in (unavailable or {}).items():
        lines.append(f"  {case:<{width}} left out: {why}")
    for v in cmp["targets"]:
        key = "" if v["key"] == "t" else f" {v['key']}"
        if v["peer"]:
            what = f"{v['case']}/{v['peer']}{key} = {v['value']:.2f}"
        elif key:
            what = f"{v['case']}{key} = {v['value']:.3g}"
        else:
            what = f"{v['case']} = {job.fmt(v['value'])}"
        lines.append(f"  target {v['text']}: {what} -> {'met' if v['met'] else 'MISSED'}")
    return lines


def _fmt_extra(key: str, value: Any) -> str:
    if isinstance(value, float) and key.endswith("_s") and not key.endswith("per_s"):
        return f"{key}={fmt_time(value)}"  # a duration in seconds
    if isinstance(value, list):
        return f"{key}=" + "/".join(f"{v:.2f}" for v in value)
    if isinstance(value, float):
        return f"{key}={value:,.4g}" if abs(value) < 1000 else f"{key}={value:,.0f}"
    return f"{key}={value}"


def cpu_ticks() -> tuple[int, int]:
    """(all CPU time, the part the hypervisor stole), in ticks since boot,
    from /proc/stat ((0, 0) where it cannot be read): on a shared VM a run
    with much stolen time says little."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields), fields[7] if len(fields) > 7 else 0


def stolen_since(start: tuple[int, int]) -> Optional[float]:
    """The share of CPU time stolen since ``start`` (cpu_ticks()); None
    when unknown."""
    total, steal = cpu_ticks()
    return (steal - start[1]) / (total - start[0]) if total > start[0] else None


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
