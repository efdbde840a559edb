"""An awaiting coroutine's loop reads the channel its reply comes on
(clusterhub/loopread.py): replies reach many concurrent awaits, messages
keep flowing while the loop leads, the lead ends with the awaiting task
(or for another thread's synchronous request, or at detach), a handler on
the leading loop may still wait synchronously, and cancellation and the
master's death end awaits.

Everything runs in real worker processes; what a worker saw comes back
through ``reports``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import threading
from typing import Any

import pytest

import clusterhub
from clusterhub import MasterDied

from conftest import Reports, fork_child, join_ok

pytestmark = pytest.mark.timeout(60)


def _echo(data: Any, sender: Any) -> Any:
    return data


def _lead(hub: clusterhub.Hub) -> Any:
    return hub._procs.master.loop_lead


def _held_replies(hub: clusterhub.Hub) -> None:
    """The master answers "slow" only when it gets "go" (its handlers stay
    free meanwhile: "slow" returns a future)."""
    held: list[concurrent.futures.Future[Any]] = []

    def slow(data: Any, sender: Any) -> Any:
        f: concurrent.futures.Future[Any] = concurrent.futures.Future()
        f.data = data  # type: ignore[attr-defined]
        held.append(f)
        return f

    def go(data: Any, sender: Any) -> None:
        for f in held:
            f.set_result(f.data)  # type: ignore[attr-defined]

    hub.on("slow", slow)
    hub.on("go", go)


@pytest.mark.parametrize("attached", [True, False], ids=["attached", "not-attached"])
def test_concurrent_awaits_from_many_tasks(hub: clusterhub.Hub, reports: Reports, attached: bool) -> None:
    """50 tasks with 10 requests each in flight at once: every reply reaches
    its own await, read by the loop (no thread hand-off)."""
    hub.on("echo", _echo)

    def worker() -> None:
        async def task(k: int) -> list[Any]:
            return [await hub.request_master("echo", (k, i)) for i in range(10)]

        async def main() -> Any:
            if attached:
                hub.attach()
            got = await asyncio.gather(*(task(k) for k in range(50)))
            return got == [[(k, i) for i in range(10)] for k in range(50)]

        reports.put(asyncio.run(main()))

    w = hub.fork(worker)
    assert reports.get() == (True,)
    join_ok(w)


def test_the_lead_ends_with_the_awaiting_task(hub: clusterhub.Hub, reports: Reports) -> None:
    _held_replies(hub)
    hub.on("echo", _echo)

    def worker() -> None:
        async def main() -> Any:
            task = asyncio.ensure_future(hub.request_master("slow", 1))
            await asyncio.sleep(0)  # (the task awaits: the loop leads)
            during = _lead(hub) is not None
            hub.send_to_master("go")
            assert await task == 1
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            after = _lead(hub) is None
            # The dispatcher reads again: a synchronous request from another thread.
            r = await asyncio.get_running_loop().run_in_executor(
                None, lambda: hub.request_master("echo", 2).result(timeout=10))
            return during, after, r

        reports.put(*asyncio.run(main()))

    w = hub.fork(worker)
    assert reports.get() == (True, True, 2)
    join_ok(w)


def test_messages_arrive_while_the_loop_leads(hub: clusterhub.Hub, reports: Reports) -> None:
    """While a coroutine awaits a slow reply (the loop leads the channel), a
    message from the master is read by the loop and handled, on the loop
    when attached."""
    _held_replies(hub)

    def worker() -> None:
        got = threading.Event()
        seen: list[Any] = []
        hub.on("note", lambda data, sender: (seen.append((data, threading.get_ident())), got.set()))

        async def main() -> Any:
            hub.attach()
            fut = hub.request_master("slow", 5)
            task = asyncio.ensure_future(fut)
            await asyncio.sleep(0)
            leading = _lead(hub) is not None
            hub.send_to_master("ready")
            while not got.is_set():
                await asyncio.sleep(0.01)
            hub.send_to_master("go")
            r = await task
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return leading, seen == [("hi", threading.get_ident())], r, _lead(hub) is None

        reports.put(*asyncio.run(main()))

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(worker)
    assert ready.wait(10)
    hub.send_to_worker(w, "note", "hi")
    assert reports.get() == (True, True, 5, True)
    join_ok(w)


def test_a_handler_on_the_leading_loop_may_wait_synchronously(hub: clusterhub.Hub, reports: Reports) -> None:
    """A plain handler run by the attached loop, which leads the channel,
    blocks in result() for a request on that very channel: it reads the
    reply itself (the loop cannot) instead of hanging."""
    hub.on("echo", _echo)

    def worker() -> None:
        done = threading.Event()
        out: list[Any] = []

        def ask(data: Any, sender: Any) -> None:
            out.append(hub.request_master("echo", data).result(timeout=10))
            done.set()

        hub.on("ask", ask)

        async def main() -> Any:
            hub.attach()
            assert await hub.request_master("echo", 0) == 0  # (the loop leads now)
            hub.send_to_master("ready")
            while not done.is_set():
                await asyncio.sleep(0.01)
            return out

        reports.put(asyncio.run(main()))

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(worker)
    assert ready.wait(10)
    hub.send_to_worker(w, "ask", 42)
    assert reports.get() == ([42],)
    join_ok(w)


def test_the_channel_is_read_again_after_the_loop_ends(hub: clusterhub.Hub, reports: Reports) -> None:
    """After asyncio.run() of an attached hub's awaits, the dispatcher reads
    the channel again: messages reach the (thread) handlers and synchronous
    requests work."""
    hub.on("echo", _echo)

    def worker() -> None:
        got = threading.Event()
        hub.on("note", lambda data, sender: got.set())

        async def main() -> None:
            hub.attach()
            assert await hub.request_master("echo", 1) == 1

        asyncio.run(main())
        released = _lead(hub) is None
        r = hub.request_master("echo", 2).result(timeout=10)
        hub.send_to_master("ready")
        reports.put(released, r, got.wait(10))

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(worker)
    assert ready.wait(10)
    hub.send_to_worker(w, "note", None)
    assert reports.get() == (True, 2, True)
    join_ok(w)


def test_detach_lets_go(hub: clusterhub.Hub, reports: Reports) -> None:
    _held_replies(hub)

    def worker() -> None:
        async def main() -> Any:
            hub.attach()
            task = asyncio.ensure_future(hub.request_master("slow", 1))
            await asyncio.sleep(0)
            before = _lead(hub) is not None
            hub.detach()
            await asyncio.sleep(0)
            after = _lead(hub) is None
            hub.send_to_master("go")
            return before, after, await task  # (now read by the dispatcher)

        reports.put(*asyncio.run(main()))

    w = hub.fork(worker)
    assert reports.get() == (True, True, 1)
    join_ok(w)


def test_cancelling_the_awaiting_task_cancels_the_request(hub: clusterhub.Hub, reports: Reports) -> None:
    _held_replies(hub)
    hub.on("echo", _echo)

    def worker() -> None:
        async def main() -> Any:
            fut = hub.request_master("slow")
            task = asyncio.ensure_future(fut)
            await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            hub.send_to_master("go")
            # The loop goes on reading: a later request is answered.
            return fut.cancelled(), await hub.request_master("echo", 7)

        reports.put(*asyncio.run(main()))

    w = hub.fork(worker)
    assert reports.get() == (True, 7)
    join_ok(w)


@pytest.mark.parametrize("attached", [True, False], ids=["attached", "not-attached"])
def test_master_death_fails_the_await(reports: Reports, attached: bool) -> None:
    """The master is SIGKILLed while a worker's loop awaits its reply: the
    await raises MasterDied (the worker outlives it: exit_on_master_death
    off)."""
    r, wfd = os.pipe()
    pid = fork_child()
    if pid == 0:  # the master, in a process of its own
        try:
            hub = clusterhub.Hub(exit_on_master_death=False)
            hub.on("hang", lambda data, sender: threading.Event().wait())

            def worker() -> None:
                async def main() -> str:
                    if attached:
                        hub.attach()
                    fut = hub.request_master("hang")
                    os.write(wfd, b"asked")
                    try:
                        await asyncio.wait_for(fut, 20)
                    except MasterDied:
                        return "MasterDied"
                    return "no error"

                reports.put(asyncio.run(main()))

            hub.fork(worker)
            threading.Event().wait()
        finally:
            os._exit(1)
    try:
        assert os.read(r, 5) == b"asked"
        os.kill(pid, signal.SIGKILL)
        assert reports.get() == ("MasterDied",)
    finally:
        os.waitpid(pid, 0)
        os.close(r)
        os.close(wfd)


def test_an_idle_lead_lasts_until_its_task_ends_and_yields_to_a_thread(
        hub: clusterhub.Hub, reports: Reports) -> None:
    """After its awaits, a task that goes on keeps the channel (no extra
    loop turn per request); a synchronous request from another thread makes
    the idle loop hand it back; a task that ends lets go."""
    _held_replies(hub)
    hub.on("echo", _echo)

    def worker() -> None:
        async def main() -> Any:
            fut = hub.request_master("slow", 1)
            # (its reply is released once this task awaits it: the loop leads)
            asyncio.get_running_loop().call_soon(hub.send_to_master, "go")
            assert await fut == 1
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            kept = _lead(hub) is not None
            r = await asyncio.get_running_loop().run_in_executor(
                None, lambda: hub.request_master("echo", 2).result(timeout=10))
            handed_back = _lead(hub) is None

            async def one() -> Any:
                return await hub.request_master("echo", 3)

            r3 = await asyncio.ensure_future(one())
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            return kept, r, handed_back, r3, _lead(hub) is None

        reports.put(*asyncio.run(main()))

    w = hub.fork(worker)
    assert reports.get() == (True, 2, True, 3, True)
    join_ok(w)
