"""The dispatcher threads' scheduling policy (SCHED_BATCH, see clusterhub/sched.py).

Policies are read from the kernel (sched_getscheduler on the thread's id),
never from our own bookkeeping.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest

import clusterhub

from conftest import Reports, run_forked, waitpid_bounded

pytestmark = pytest.mark.timeout(60)


def _policy(tid: int) -> int:
    return os.sched_getscheduler(tid)


def _writer_policy() -> int:
    """The policy of this process's C writer thread (comm 'ch-writer')."""
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            if f.read().strip() == "ch-writer":
                return _policy(int(tid))
    raise AssertionError("no writer thread")


def test_dispatchers_run_batch_and_the_rest_does_not(hub: clusterhub.Hub, reports: Reports) -> None:
    """Master's and worker's dispatcher threads are SCHED_BATCH; the worker's
    main thread and the writer threads keep the ordinary policy."""
    hub.on("policy", lambda d, s: _policy(threading.get_native_id()))

    def worker() -> None:
        d = hub._dispatcher
        reports.put(
            _policy(d._thread.native_id), _policy(0), _writer_policy(),
            hub.request_master("policy").result(timeout=10),
        )

    w = hub.fork(worker)
    assert reports.get() == (os.SCHED_BATCH, os.SCHED_OTHER, os.SCHED_OTHER, os.SCHED_BATCH)
    assert _policy(hub._dispatcher._thread.native_id) == os.SCHED_BATCH
    assert _policy(0) == os.SCHED_OTHER  # the test's own thread: untouched
    assert _writer_policy() == os.SCHED_OTHER
    assert w.join(10)


def test_batch_dispatcher_false_keeps_the_policy(make_hub: Any, reports: Reports) -> None:
    hub = make_hub(batch_dispatcher=False)

    def worker() -> None:
        reports.put(_policy(hub._dispatcher._thread.native_id))

    hub.fork(worker)
    assert reports.get() == (os.SCHED_OTHER,)
    assert _policy(hub._dispatcher._thread.native_id) == os.SCHED_OTHER


def test_what_a_handler_starts_runs_under_the_ordinary_policy(reports: Reports) -> None:
    """A worker forked from a handler, the timer thread and the private event
    loop's thread (both first started by a handler here), and the C writer
    thread first started by a handler: none inherits SCHED_BATCH."""

    def master() -> None:  # a fresh process: no writer, timer or loop thread yet
        hub = clusterhub.Hub()
        done = threading.Event()
        out: dict[str, Any] = {}
        workers: list[clusterhub.Worker] = []

        async def in_loop(d: Any, s: Any) -> None:
            out["loop"] = _policy(0)

        def start(d: Any, s: Any) -> None:
            out["handler"] = _policy(0)
            workers.append(hub.fork(lambda: reports.put("worker", _policy(0))))
            out["writer"] = _writer_policy()
            hub.request_master("nobody", timeout=30).add_done_callback(lambda f: None)
            out["timers"] = _policy(hub._dispatcher._timer_thread.native_id)
            done.set()

        hub.on("start", start)
        hub.on("async", in_loop)
        hub.send_to_master("start")
        assert done.wait(10)
        hub.request_master("async").result(timeout=10)
        reports.put("master", out)
        assert workers[0].join(10)  # (close() would end it, maybe before it reported)
        hub.close()

    pid = run_forked(master)
    got = dict(reports.get_n(2))
    assert got["worker"] == os.SCHED_OTHER
    assert got["master"] == {
        "handler": os.SCHED_BATCH, "writer": os.SCHED_OTHER,
        "timers": os.SCHED_OTHER, "loop": os.SCHED_OTHER,
    }
    assert waitpid_bounded(pid, 10) == 0


def test_other_policies_are_left_alone(reports: Reports) -> None:
    """A hub made by a SCHED_IDLE thread keeps SCHED_IDLE for its dispatcher
    (batch_dispatcher only ever replaces the ordinary policy)."""

    def master() -> None:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        hub = clusterhub.Hub()
        reports.put(_policy(hub._dispatcher._thread.native_id))
        hub.close()

    pid = run_forked(master)
    assert reports.get() == (os.SCHED_IDLE,)
    assert waitpid_bounded(pid, 10) == 0


def test_an_attached_loop_is_not_touched(make_hub: Any) -> None:
    """Handlers on an attached asyncio loop run on the loop's thread, whose
    policy the hub never changes."""
    hub = make_hub()
    seen: list[int] = []

    async def main() -> None:
        hub.attach()
        hub.on("p", lambda d, s: seen.append(_policy(0)) or 1)
        assert await hub.request_master("p", timeout=10) == 1

    asyncio.run(main())
    assert seen == [os.SCHED_OTHER]
