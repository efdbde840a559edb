"""pytest-benchmark glue for the clusterhub benchmarks (see README.md).

The measuring itself is the kit of ``clusterhub.bench`` (the same code as
``python -m clusterhub bench``; jobs, measuring and the report in
``clusterhub.bench.jobs``): every case of a job runs in forked processes and
is timed inside them.  Here:

- With benchmarks enabled, the first test of a group measures *all* the cases
  of its group at once, interleaved (A B A B ...: these 2-CPU machines are
  shared and noisy, so a figure is only compared with peers measured in the
  same run, alternating), and every test of the group then hands its own
  case's samples to pytest-benchmark through a clock that replays them
  (``_ReplayClock``): the table shows the figures measured inside the
  processes, one round per interleaved batch.  The clock is the test's timer
  through pytest-benchmark's public ``timer`` option of the ``benchmark``
  marker, which ``pytest_collection_modifyitems`` adds to every test that
  uses ``measure``.
- With ``--benchmark-disable`` (the default in pyproject.toml) each test runs
  one small batch of its own case: a smoke test.
- The messaging tests run in each placement (the ``placement`` fixture:
  ``unpinned``, ``one-cpu``, ``two-cpus``, see ``clusterhub.bench.host``); a
  case that cannot run here (``Unavailable``: node missing, one CPU for
  ``two-cpus``) skips with the reason, and the rest of its group is measured.
- At the end, ``pytest_terminal_summary`` prints clusterhub/peer ratios per
  group against the targets; the same ratios are in each test's
  ``extra_info`` (and so in ``--benchmark-json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from clusterhub.bench.host import PLACEMENTS, Unavailable, describe_placements
from clusterhub.bench.jobs import (
    Job,
    compare,
    conditions,
    cpu_ticks,
    format_group,
    measure_job,
    measure_once,
    stolen_since,
    summarize,
)

HERE = Path(__file__).resolve().parent

# group -> case -> samples, measured once per group (benchmarks enabled)
_measured: dict[str, dict[str, list[dict[str, Any]]]] = {}
# group -> case -> why it was left out (Unavailable)
_unavailable: dict[str, dict[str, str]] = {}
# group -> (job, placement, case -> summary): what the terminal summary prints
_reported: dict[str, tuple[Job, Optional[str], dict[str, dict[str, Any]]]] = {}
_START_TICKS = cpu_ticks()  # (the run's stolen CPU time: see pytest_terminal_summary)


@pytest.fixture(params=PLACEMENTS)
def placement(request: pytest.FixtureRequest) -> str:
    """Run a messaging benchmark in each placement: unpinned, every process
    on one CPU, the two sides on two CPUs."""
    return str(request.param)


class _ReplayClock:
    """A timer for pytest-benchmark that advances by recorded figures: each
    call of ``step`` (the benchmarked function) lasts exactly the next one.

    pytest-benchmark's pedantic mode reads its timer just before and just
    after each call of the function it measures, so a round lasts exactly
    one figure; ``replay`` checks that it did (two reads per round) rather
    than let a change in pytest-benchmark put other durations in the table.
    """

    __name__ = "replayed in-process measurements"  # shown as the timer in the JSON

    def __init__(self) -> None:
        self._values: Iterator[float] = iter(())
        self._now = 0.0
        self._reads = 0

    def __call__(self) -> float:
        # 0 at a round's start, its figure at its end: exact durations, no drift
        self._reads += 1
        now, self._now = self._now, 0.0
        return now

    def step(self) -> None:
        self._now = next(self._values, 0.0)  # (0 for an extra call, e.g. --benchmark-cprofile's)

    def replay(self, benchmark: Any, values: list[float]) -> None:
        """One ``benchmark.pedantic`` whose rounds are ``values``."""
        self._values, self._reads = iter(values), 0
        benchmark.pedantic(self.step, rounds=len(values), iterations=1, warmup_rounds=0)
        if not benchmark.disabled and self._reads != 2 * len(values):
            raise RuntimeError(
                f"pytest-benchmark read the replay clock {self._reads} times for {len(values)} rounds "
                "(2 per round expected): it no longer times pedantic rounds with the marker's timer"
            )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give each test that uses ``measure`` its own replay clock as the timer
    of its ``benchmark`` marker (pytest-benchmark reads only the closest one,
    so the new marker carries the others' options, e.g. the group)."""
    for item in items:
        if "measure" not in getattr(item, "fixturenames", ()) or HERE not in item.path.resolve().parents:
            continue
        options: dict[str, Any] = {}
        for marker in reversed(list(item.iter_markers("benchmark"))):  # the closest wins
            options.update(marker.kwargs)
        item.add_marker(pytest.mark.benchmark(**options, timer=_ReplayClock()), append=False)


@pytest.fixture
def measure(benchmark: Any, request: pytest.FixtureRequest) -> Any:
    """``measure(job, case, placement=None)``: benchmark one case of a job
    (see the module docstring); returns the case's summary."""
    marker = request.node.get_closest_marker("benchmark")
    clock = marker.kwargs["timer"] if marker is not None else None
    if not isinstance(clock, _ReplayClock):
        raise RuntimeError("a test using `measure` lost the replay clock of its benchmark marker")

    def run(job: Job, case: str, placement: Optional[str] = None) -> dict[str, Any]:
        if benchmark.group != job.name:
            raise ValueError(f"mark the test @pytest.mark.benchmark(group={job.name!r})")
        group = job.group(placement)
        benchmark.group = group  # plus the placement for the messaging jobs
        if benchmark.disabled:
            try:
                samples = measure_once(job, case, placement)
            except Unavailable as e:
                pytest.skip(str(e))
            clock.replay(benchmark, [s["t"] for s in samples])
            return summarize(samples)
        if group not in _measured:
            _unavailable[group] = {}
            _measured[group] = measure_job(job, placement, unavailable=_unavailable[group])
        if case in _unavailable[group]:
            pytest.skip(_unavailable[group][case])
        summaries = {c: summarize(s) for c, s in _measured[group].items()}
        _reported[group] = (job, placement, summaries)
        cmp = compare(job, summaries, placement)
        benchmark.extra_info.update(
            figure=job.figure, batch_size=job.size, interleaved_with=sorted(set(summaries) - {case}),
            placement=placement, summary=summaries[case], ratios=cmp["ratios"],
            targets=[t for t in cmp["targets"] if case in (t["case"], t["peer"])],
        )
        clock.replay(benchmark, [s["t"] for s in _measured[group][case]])
        return summaries[case]

    return run


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _reported:
        return
    tr = terminalreporter
    cond = conditions()
    tr.write_sep("=", "clusterhub / peer (same-run interleaved medians; < 1: clusterhub faster)")
    stolen = stolen_since(_START_TICKS)
    steal = "" if stolen is None else f", {stolen:.0%} of the CPU time stolen by the hypervisor during the run"
    tr.write_line(f"{cond['cpus']} CPUs ({cond['cpu_model']}), load now "
                  f"{', '.join(f'{x:.2f}' for x in cond['loadavg'])}{steal}; {describe_placements()}")
    for group, (job, placement, summaries) in _reported.items():
        tr.write_line("")
        for line in format_group(job, placement, summaries, _unavailable.get(group)):
            tr.write_line(line)
