"""Global locks in asyncio: ``async with hub.lock(key)`` never blocks the
loop, the owner is the task, and cancellation, timeouts and recovery behave as
with threads.

Processes are sequenced with pipes (``reports``) and events; tasks with asyncio
events; a test sleeps only where time is its subject (a ticker, a timeout).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any, Awaitable, Callable

import pytest

import clusterhub
from clusterhub import HubClosedError, LockError, LockTimeout

from conftest import join_ok, mine, wait_blocked

pytestmark = pytest.mark.timeout(30)


def run(coro_fn: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    """Run a coroutine on a new loop, bounded."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


def hold_in_worker(hub: clusterhub.Hub, reports: Any, release: Any, key: str) -> clusterhub.Worker:
    """A worker that holds ``key`` until ``release`` is set, then reports "released"."""

    def hold() -> None:
        with hub.lock(key):
            reports.put("held")
            release.wait(20)
        reports.put("released")

    w = hub.fork(hold)
    assert reports.get() == ("held",)
    return w


async def helper_blocked(timeout: float = 5.0) -> None:
    """Wait until a thread of this process that waits for a lock on behalf of
    a task is blocked in the futex call."""
    deadline = time.monotonic() + timeout
    while True:
        for t in threading.enumerate():
            if t is not threading.main_thread() and t.native_id and t.name == "clusterhub-lock":
                wait_blocked(os.getpid(), t.native_id)
                return
        assert time.monotonic() < deadline, "no thread waits for the lock"
        await asyncio.sleep(0.002)


def test_async_with_keeps_the_loop_running(hub, reports, event):
    """While another process holds the key, a task in ``async with`` waits
    without blocking the loop (a ticker keeps ticking) and gets the lock once
    it is released; right after the block nothing is held."""
    release = event()
    w = hold_in_worker(hub, reports, release, "a")
    ticks = 0
    acquired_at = -1

    async def main() -> None:
        nonlocal acquired_at
        five = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)  # the subject is time: the loop keeps turning
                ticks += 1
                if ticks == 5:
                    five.set()

        async def locker() -> None:
            nonlocal acquired_at
            async with hub.lock("a") as held:
                acquired_at = ticks
                assert not held.recovered
                assert mine(hub) == [b"a"]
            assert hub.held_locks() == []

        t = asyncio.create_task(ticker())
        lt = asyncio.create_task(locker())
        await five.wait()
        assert not lt.done()
        release.set()
        await lt
        t.cancel()

    run(main)
    assert acquired_at >= 5
    join_ok(w)


def test_tasks_of_one_loop_exclude_each_other(hub, reports, event):
    """Tasks of one loop on one key take turns (a second task waits for the
    first, without LockError), also while another process contends for it."""
    stop = event()

    def contend() -> None:
        lk = hub.lock("t")
        reports.put("ready")
        while not stop.is_set():
            with lk:
                time.sleep(0.0005)  # hold a moment so the tasks meet contention

    w = hub.fork(contend)
    assert reports.get() == ("ready",)

    async def main() -> list[str]:
        lk = hub.lock("t")
        inside = 0
        order: list[str] = []
        first_in, first_go = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with lk:
                order.append("first in")
                first_in.set()
                await first_go.wait()
                order.append("first out")

        async def second() -> None:
            async with hub.lock("t", timeout=10):
                order.append("second in")

        f = asyncio.create_task(first())
        await first_in.wait()
        s = asyncio.create_task(second())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not s.done()  # it waits for the first task
        first_go.set()
        await asyncio.gather(f, s)

        async def many(i: int) -> None:
            nonlocal inside
            for _ in range(30):
                async with hub.lock("t", timeout=10):
                    inside += 1
                    assert inside == 1
                    await asyncio.sleep(0)
                    inside -= 1

        await asyncio.gather(*(many(i) for i in range(5)))
        return order

    assert run(main) == ["first in", "first out", "second in"]
    stop.set()
    join_ok(w)
    assert hub.held_locks() == []


def test_task_reentry_raises(hub):
    """A task entering ``async with`` on a key it already holds raises
    LockError and keeps holding it; so does a task of a loop whose thread holds
    the key through the thread API."""

    async def main() -> None:
        lk = hub.lock("re")
        async with lk:
            with pytest.raises(LockError):
                async with hub.lock(b"re", timeout=1):
                    pass
            assert mine(hub) == [b"re"]
        assert hub.held_locks() == []

        async def other() -> bool:
            async with lk:
                return True

        assert await other()
        with hub.lock("re"):
            with pytest.raises(LockError):
                await other()
            assert mine(hub) == [b"re"]

    run(main)
    assert hub.held_locks() == []


def test_cancelled_waiter_leaves_nothing_held(make_hub, reports, event):
    """Cancelling a task that waits for a key another process holds leaves this
    process holding and waiting on nothing: after the holder releases, another
    process acquires at once, and close() succeeds."""
    hub = make_hub()
    release = event()
    w = hold_in_worker(hub, reports, release, "c")

    async def main() -> None:
        task = asyncio.create_task(hub.lock("c").acquire_async())
        await helper_blocked()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [(h.key, h.pid) for h in hub.held_locks()] == [(b"c", w.pid)]

    run(main)
    release.set()
    assert reports.get() == ("released",)

    def take() -> None:
        reports.put(hub.lock("c").acquire(timeout=0))

    join_ok(hub.fork(take))
    assert reports.get() == (True,)
    join_ok(w)
    assert hub.held_locks() == []
    hub.close()  # would raise LockError if a thread still waited for "c"


def test_cancelled_waiter_does_not_keep_waiting(make_hub, reports, event):
    """Once a cancelled task's ``await`` has ended, no thread of this process
    waits for the key any more: close() succeeds while another process still
    holds it."""
    hub = make_hub()
    release = event()
    hold_in_worker(hub, reports, release, "c2")

    async def main() -> None:
        task = asyncio.create_task(hub.lock("c2").acquire_async())
        await helper_blocked()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main)
    hub.close(timeout=2.0)  # LockError if a helper thread still waited


def test_cancelled_task_passes_its_turn_on(hub):
    """A task cancelled just after the previous owner handed it the key does
    not strand the tasks queued behind it."""

    async def main() -> None:
        lk = hub.lock("turn")
        a_in, a_go = asyncio.Event(), asyncio.Event()
        got: list[str] = []

        async def b() -> None:
            async with lk:
                got.append("b")

        async def c() -> None:
            async with hub.lock("turn", timeout=5):
                got.append("c")

        async def a() -> None:
            async with lk:
                a_in.set()
                await a_go.wait()
            bt.cancel()  # b has been handed the key but has not run yet

        at = asyncio.create_task(a())
        await a_in.wait()
        bt = asyncio.create_task(b())
        ct = asyncio.create_task(c())
        for _ in range(5):
            await asyncio.sleep(0)  # b and c queue behind a
        a_go.set()
        await at
        with pytest.raises(asyncio.CancelledError):
            await bt
        await ct
        assert got == ["c"]

    run(main)
    assert hub.held_locks() == []


def test_async_timeout(hub, reports, event):
    """``async with hub.lock(k, timeout=t)`` raises LockTimeout after about t,
    whether another process or another task of the loop holds the key."""
    release = event()
    w = hold_in_worker(hub, reports, release, "to")

    async def main() -> None:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout):
            async with hub.lock("to", timeout=0.2):
                pytest.fail("acquired a key another process holds")
        assert 0.2 <= time.monotonic() - t0 < 1.0
        assert [h.pid for h in hub.held_locks()] == [w.pid]
        release.set()
        assert reports.get() == ("released",)

        inside, leave = asyncio.Event(), asyncio.Event()

        async def owner() -> None:
            async with hub.lock("to"):
                inside.set()
                await leave.wait()

        o = asyncio.create_task(owner())
        await inside.wait()
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            async with hub.lock("to", timeout=0.2):
                pytest.fail("acquired a key another task holds")
        assert 0.2 <= time.monotonic() - t0 < 1.0
        leave.set()
        await o
        async with hub.lock("to", timeout=0.2):
            pass

    run(main)
    join_ok(w)
    assert hub.held_locks() == []


@pytest.mark.parametrize("waiting", [False, True], ids=["free", "blocked"])
def test_async_recovery_after_holder_sigkill(hub, reports, waiting):
    """After a holder is SIGKILLed, the next ``async with`` (already waiting,
    or coming later) sees recovered True inside the block; the next sees False."""

    def hold() -> None:
        assert hub.lock("rec").acquire(timeout=5)
        reports.put("held")
        threading.Event().wait()

    w = hub.fork(hold)
    assert reports.get() == ("held",)

    async def main() -> None:
        lk = hub.lock("rec")

        async def first() -> bool:
            async with hub.lock("rec", timeout=10) as held:
                return held.recovered

        if waiting:
            t = asyncio.create_task(first())
            await helper_blocked()
            w.kill()
            assert await t is True
        else:
            w.kill()
            assert w.join(10)
            assert await first() is True
        async with lk as held:
            assert held.recovered is False

    run(main)
    join_ok(w, -signal.SIGKILL)
    assert hub.held_locks() == []


def test_recovered_is_per_task(hub, reports):
    """Under ``async with`` recovered is the task's own: a task whose latest
    acquire recovered keeps reading True after another task of the loop
    acquired without recovering (which reads False), and a task that has not
    acquired reads False."""

    def hold_and_exit() -> None:
        assert hub.lock("rec-task").acquire(timeout=5)
        reports.put("held")
        os._exit(0)

    join_ok(hub.fork(hold_and_exit))
    assert reports.get() == ("held",)

    async def main() -> list[Any]:
        lk = hub.lock("rec-task")
        a_done, b_done = asyncio.Event(), asyncio.Event()

        async def a() -> tuple[bool, bool]:
            async with lk:
                first = lk.recovered
            a_done.set()
            await b_done.wait()
            return first, lk.recovered  # unchanged by b's later acquire

        async def b() -> tuple[bool, bool]:
            await a_done.wait()
            async with lk:
                got = lk.recovered
            b_done.set()
            return got, lk.recovered

        async def c() -> bool:
            await b_done.wait()
            return lk.recovered  # never acquired

        return list(await asyncio.gather(a(), b(), c()))

    assert run(main) == [(True, True), (False, False), False]
    assert hub.lock("rec-task").recovered is False  # nor did this thread, outside the loop
    assert hub.held_locks() == []


def test_contended_async_release_is_immediate(hub, reports, event):
    """Many contended ``async with`` blocks against another process release
    without error (the OS mutex is released by the thread that took it) and
    leave nothing held the moment each block ends."""
    stop = event()

    def contend() -> None:
        lk = hub.lock("busy")
        reports.put("ready")
        while not stop.is_set():
            with lk:
                time.sleep(0.001)

    w = hub.fork(contend)
    assert reports.get() == ("ready",)

    async def main() -> int:
        lk = hub.lock("busy", timeout=10)
        for _ in range(100):
            async with lk:
                assert mine(hub) == [b"busy"]
            assert mine(hub) == []
        return 100

    assert run(main) == 100
    stop.set()
    join_ok(w)
    assert hub.held_locks() == []


def test_async_with_on_a_closed_hub_raises(make_hub):
    """``async with`` on a handle kept from a closed hub raises HubClosedError."""
    hub = make_hub()
    lk = hub.lock("gone")

    async def use() -> None:
        async with lk:
            pass

    run(use)
    hub.close()
    with pytest.raises(HubClosedError):
        run(use)
