"""asyncio: attach()/detach() move handler dispatch onto an event loop and
back, async def handlers run there (in the master and in a worker), request
futures are awaitable with or without attach, and the hub never blocks the
loop."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from clusterhub import HubError, RemoteError

from conftest import join_ok

pytestmark = pytest.mark.timeout(60)


async def _wait_for(ev: threading.Event, timeout: float = 10.0) -> bool:
    """Wait for a threading.Event from a coroutine without blocking the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, ev.wait, timeout)


def test_attach_dispatches_on_the_loop(hub, reports):
    """After attach(), handlers (plain and async) run on the loop's thread,
    for worker messages and the master's own; detach() moves them back."""
    where = []
    arrived = threading.Event()

    def plain(data, sender):
        where.append(("plain", data, threading.get_ident()))
        if len(where) == 3:
            arrived.set()

    async def coro(data, sender):
        await asyncio.sleep(0)
        where.append(("async", data, threading.get_ident()))
        if len(where) == 3:
            arrived.set()

    hub.on("plain", plain)
    hub.on("async", coro)

    async def main():
        hub.attach()
        me = threading.get_ident()
        w = hub.fork(lambda: (hub.send_to_master("plain", 1), hub.send_to_master("async", 2)))
        hub.send_to_master("plain", 3)
        assert await _wait_for(arrived)
        hub.detach()
        return me, w

    loop_thread, w = asyncio.run(main())
    assert sorted(d for _, d, _ in where) == [1, 2, 3]
    assert {t for _, _, t in where} == {loop_thread}
    join_ok(w)
    after = threading.Event()
    hub.on("plain2", lambda data, sender: (where.append(threading.get_ident()), after.set()))
    hub.send_to_master("plain2")
    assert after.wait(10)
    assert where[-1] != loop_thread and where[-1] != threading.get_ident()


def test_async_handlers_start_in_arrival_order_and_interleave(hub):
    """Async handlers start in arrival order and may interleave at awaits;
    a request to one is answered with its return value."""
    log = []
    n = 20

    async def handler(data, sender):
        log.append(("start", data))
        await asyncio.sleep(0.001 * ((n - data) % 5))
        log.append(("end", data))
        return data * 2

    hub.on("h", handler)

    async def main():
        hub.attach()
        for i in range(n):
            hub.send_to_master("h", i)
        r = await hub.request_master("h", 100)
        while sum(1 for k, _ in log if k == "end") < n + 1:
            await asyncio.sleep(0.01)
        hub.detach()
        return r

    assert asyncio.run(asyncio.wait_for(main(), 20)) == 200
    starts = [d for k, d in log if k == "start"]
    assert starts == list(range(n)) + [100]
    ends = [d for k, d in log if k == "end"]
    assert sorted(ends) == sorted(starts)
    assert ends != starts  # they interleaved at their awaits


def test_async_handler_in_a_worker(hub, reports):
    """A worker running an asyncio loop can attach its hub: the master's
    requests are answered by its async handlers on that loop."""

    def work():
        async def main():
            hub.attach()
            loop_ident = threading.get_ident()
            done = asyncio.Event()

            async def double(data, sender):
                await asyncio.sleep(0.01)
                return (data * 2, threading.get_ident() == loop_ident)

            async def fail(data, sender):
                await asyncio.sleep(0)
                raise ValueError("async failure in a worker")

            hub.on("double", double)
            hub.on("fail", fail)
            hub.on("end", lambda data, sender: done.set())
            hub.send_to_master("ready")
            await asyncio.wait_for(done.wait(), 20)
            hub.detach()

        asyncio.run(main())
        reports.put("clean exit")

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(work)
    assert ready.wait(10)
    assert hub.request_worker(w, "double", 21).result(10) == (42, True)
    err = hub.request_worker(w, "fail").exception(10)
    assert isinstance(err, RemoteError) and err.type_name == "ValueError"
    assert "async failure in a worker" in str(err)
    hub.send_to_worker(w, "end")
    assert reports.get() == ("clean exit",)
    join_ok(w)
    assert len(hub._pending) == 0


def test_requests_are_awaitable_without_attach(hub, reports):
    """Without attach(), coroutines in master and worker await requests; the
    handlers run on the hub's own thread."""
    hub.on("where", lambda data, sender: threading.get_ident())

    def work():
        async def main():
            return await hub.request_master("where")

        reports.put(asyncio.run(main()) is not None)

    w = hub.fork(work)
    assert reports.get() == (True,)
    join_ok(w)

    async def main():
        return await hub.request_master("where"), threading.get_ident()

    handler_thread, loop_thread = asyncio.run(main())
    assert handler_thread != loop_thread


@pytest.mark.parametrize("attached", [False, True], ids=["plain", "attached"])
def test_nothing_blocks_the_loop(hub, event, attached):
    """A coroutine keeps ticking while another awaits a slow request (with and
    without attach), so the hub never blocks the event loop."""
    go = event()

    def work():
        hub.on("slow", lambda data, sender: go.wait(20) and "slow answer")
        hub.send_to_master("ready")
        threading.Event().wait(30)

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(work)
    assert ready.wait(10)

    async def main():
        if attached:
            hub.attach()
        ticks = 0
        stop = False

        async def ticker():
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0.01)

        t = asyncio.ensure_future(ticker())
        fut = hub.request_worker(w, "slow")
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, go.set)
        t0 = time.monotonic()
        answer = await fut
        took = time.monotonic() - t0
        stop = True
        await t
        if attached:
            hub.detach()
        return answer, ticks, took

    answer, ticks, took = asyncio.run(asyncio.wait_for(main(), 20))
    assert answer == "slow answer"
    assert took >= 0.4
    assert ticks >= 10, f"the loop ticked only {ticks} times in {took:.2f} s"
    w.kill()
    join_ok(w, -9)


def test_local_wait_on_the_loop_raises_at_once(hub):
    """With the hub attached, result() on the loop thread for a request to
    the process's own handlers raises at once (they would run on that very
    loop), while awaiting it works."""

    async def main():
        hub.attach()
        hub.on("x", lambda data, sender: "x")
        t0 = time.monotonic()
        f = hub.request_master("x")
        with pytest.raises(HubError):
            f.result(5)
        assert time.monotonic() - t0 < 1
        r = await f
        hub.detach()
        return r

    assert asyncio.run(asyncio.wait_for(main(), 20)) == "x"
    assert len(hub._pending) == 0


def test_closed_loop_falls_back_to_the_hub_thread(hub):
    """A hub left attached to a loop that has since closed keeps dispatching,
    on its own thread."""

    async def main():
        hub.attach()

    asyncio.run(main())
    got = threading.Event()
    hub.on("m", lambda data, sender: got.set())
    hub.send_to_master("m")
    assert got.wait(10)
    assert hub.request_master("echo-missing").exception(10) is not None


def test_loop_closed_with_a_delivery_pending(hub):
    """Messages queued for an attached loop that closes before running them
    are not lost: the hub's own thread takes over."""
    loop = asyncio.new_event_loop()
    hub.attach(loop)  # not running: deliveries wait on the loop
    got = []
    done = threading.Event()
    hub.on("m", lambda data, sender: (got.append(data), done.set() if data == 2 else None))
    hub.send_to_master("m", 1)
    loop.close()  # the scheduled delivery is dropped with the loop
    hub.send_to_master("m", 2)
    assert done.wait(10)
    assert got == [1, 2]
