"""``Hub(spin=...)``: requesters and the master's dispatcher spin briefly
before they block (csrc/wait.h), never while idle, and not at all with
``spin=0``.  Spin counts are read from the C policy state; wake-ups from
the kernel's per-thread context-switch counters."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

import clusterhub

from conftest import Reports, join_ok

pytestmark = pytest.mark.timeout(60)


def _echo(data: Any, sender: Any) -> Any:
    return data


def _switches(pid: int) -> int:
    """Context switches of every thread of ``pid`` so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                total += sum(int(line.split()[-1]) for line in f if "ctxt_switches" in line)
        except FileNotFoundError:
            pass  # (a thread that ended meanwhile)
    return total


def _round_trips(hub: clusterhub.Hub, reports: Reports, n: int) -> tuple[int, int]:
    """A worker makes n requests; its channel's (spins, hits)."""

    def worker() -> None:
        for i in range(n):
            assert hub.request_master("echo", i).result(timeout=10) == i
        stats = hub._procs.master.spin.stats()
        reports.put(stats["spins"], stats["hits"])

    w = hub.fork(worker)
    out = reports.get()
    join_ok(w)
    return out


def test_spin_zero_never_spins(make_hub: Any, reports: Reports) -> None:
    hub = make_hub(spin=0)
    hub.on("echo", _echo)
    assert _round_trips(hub, reports, 200) == (0, 0)
    assert hub._dispatcher._spin.stats()["spins"] == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_requests_spin_by_default_where_it_can_pay(make_hub: Any, reports: Reports) -> None:
    """Requester and master on different CPUs: both spin (the first wait of
    each always does; whether the data came while spinning is timing)."""
    cpus = sorted(os.sched_getaffinity(0))
    hub = make_hub()
    hub.on("echo", _echo)

    def worker() -> None:
        os.sched_setaffinity(0, {cpus[1]})
        for i in range(200):
            assert hub.request_master("echo", i).result(timeout=10) == i
        reports.put(hub._procs.master.spin.stats()["spins"])

    w = hub.fork(worker)
    assert reports.get()[0] > 0
    join_ok(w)
    assert hub._dispatcher._spin.stats()["spins"] > 0


def test_an_idle_hub_does_not_spin_or_wake(make_hub: Any, reports: Reports) -> None:
    """After a burst of requests, a master and its idle workers spin no more
    and are not woken (no thread of theirs runs) over a quiet window."""
    hub = make_hub()
    hub.on("echo", _echo)
    go = [os.pipe() for _ in range(4)]

    def worker(i: int) -> None:
        for k in range(100):
            hub.request_master("echo", k).result(timeout=10)
        reports.put(i)
        os.read(go[i][0], 1)  # idle until told to exit

    ws = [hub.fork(worker, i) for i in range(4)]
    assert sorted(reports.get()[0] for _ in range(4)) == [0, 1, 2, 3]
    time.sleep(0.2)  # the last spins (at most 50 µs each) are long over
    spins = hub._dispatcher._spin.stats()["spins"]
    before = [_switches(w.pid) for w in ws], _switches_of_hub_threads(hub)
    time.sleep(0.5)  # the quiet window: nothing may run meanwhile
    after = [_switches(w.pid) for w in ws], _switches_of_hub_threads(hub)
    assert hub._dispatcher._spin.stats()["spins"] == spins
    assert after == before
    for _r, wfd in go:
        os.write(wfd, b"x")
    for w in ws:
        join_ok(w)
    for r, wfd in go:
        os.close(r)
        os.close(wfd)


def _switches_of_hub_threads(hub: clusterhub.Hub) -> int:
    """The master's dispatcher thread's context switches (this test's own
    thread sleeps and wakes, so the whole process would not do)."""
    tid = hub._dispatcher._thread.native_id
    with open(f"/proc/self/task/{tid}/status") as f:
        return sum(int(line.split()[-1]) for line in f if "ctxt_switches" in line)


def test_connect_takes_spin(make_hub: Any) -> None:
    hub = make_hub(address=f"@clusterhub-test-spin-{os.getpid()}")
    with pytest.raises(TypeError, match="spin must be a number of seconds"):
        clusterhub.connect(hub.address, spin="fast")
    with pytest.raises(ValueError, match="spin must be between"):
        clusterhub.connect(hub.address, spin=1.0)
