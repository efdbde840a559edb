"""The asyncio round trip: a worker's coroutine awaiting
``hub.request_master("echo", x)`` in a loop, with the hub attached to the
worker's loop (``hub.attach()``: its channel read and its replies completed on
the loop) and not attached (replies arrive on the hub's own thread and reach
the loop through its thread-safe wake-up), against what an asyncio user
writes instead: an echo over asyncio streams on a unix socket, a 4-byte
length then a pickle each way, served by ``asyncio.start_unix_server`` in
another process (the client does ``writer.write`` then ``await
reader.readexactly``).

As for the other round trips, the requester times n round trips and the
figure is s per round trip; ``cpu_per_rt_s`` is the CPU time of both
processes (all threads) per round trip; and the job is measured in the three
placements (the master or the echo server on one CPU, the asyncio requester
on the other for ``two-cpus``).  Unpinned, the scheduler decides whether the
two processes share a CPU (tens of µs per round trip on these VMs) or not
(over a hundred), which the pinned placements fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import struct
import time
from typing import Any, Awaitable, Callable, ContextManager

from .. import Hub
from .host import PLACEMENTS, UNPINNED, Batch, Sample, aserve, ask, expect, pin_client, reap, run_forked, serve, stop
from .jobs import Job, Target
from .messaging import rt_counted

_HEAD = struct.Struct("!I")


def _echo(data: Any, sender: Any) -> Any:
    return data


def _timed_awaits(call: Callable[[int], Awaitable[Any]]) -> Callable[[int], Awaitable[Sample]]:
    async def batch(n: int) -> Sample:
        t0 = time.perf_counter()
        for i in range(n):
            await call(i)
        return {"t": (time.perf_counter() - t0) / n, "n": n}

    return batch


def _aio_clusterhub_host(conn: Any, attached: bool, placement: str) -> None:
    # The host is the master, answering "echo" on the hub's own thread; a
    # worker runs an asyncio loop whose coroutine makes the requests.
    hub = Hub()
    hub.on("echo", _echo)
    inner, theirs = mp.Pipe()

    def requester() -> None:
        pin_client(placement)

        async def main() -> None:
            if attached:
                hub.attach()
            await aserve(theirs, _timed_awaits(lambda i: hub.request_master("echo", i)))

        asyncio.run(main())

    hub.fork(requester)
    theirs.close()
    try:
        expect(inner)
        serve(conn, lambda n: ask(inner, n))
    finally:
        stop(inner)
        hub.close()


async def _streams_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (size,) = _HEAD.unpack(await reader.readexactly(4))
            data = pickle.dumps(pickle.loads(await reader.readexactly(size)))
            writer.write(_HEAD.pack(len(data)) + data)
    except asyncio.IncompleteReadError:
        pass
    finally:
        writer.close()


def _streams_server(address: str, ready: int) -> None:
    async def main() -> None:
        server = await asyncio.start_unix_server(_streams_echo, address)
        os.write(ready, b"!")
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _aio_streams_host(conn: Any, placement: str) -> None:
    # The host is the requester (an asyncio loop); the echo server is forked
    # first, on the serving side's CPU, before the host moves to the other's.
    address = f"\0clusterhub-bench-aio-{os.getpid()}"  # an abstract unix socket
    r, w = os.pipe()
    pid = run_forked(_streams_server, address, w)
    os.close(w)
    try:
        if os.read(r, 1) != b"!":
            raise RuntimeError("the asyncio echo server did not start")
        pin_client(placement)

        async def main() -> None:
            reader, writer = await asyncio.open_unix_connection(address)

            async def call(x: Any) -> Any:
                data = pickle.dumps(x)
                writer.write(_HEAD.pack(len(data)) + data)
                (size,) = _HEAD.unpack(await reader.readexactly(4))
                return pickle.loads(await reader.readexactly(size))

            try:
                await aserve(conn, _timed_awaits(call))
            finally:
                writer.close()

        asyncio.run(main())
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        reap(pid)


def aio_clusterhub(attached: bool) -> Callable[..., ContextManager[Batch]]:
    return lambda placement=UNPINNED: rt_counted(_aio_clusterhub_host, attached, placement=placement)


def aio_streams(placement: str = UNPINNED) -> ContextManager[Batch]:
    return rt_counted(_aio_streams_host, placement=placement)


ASYNCIO_ROUND_TRIP = Job(
    "asyncio-round-trip", "s per `await hub.request_master()` round trip from a worker's asyncio loop",
    {
        "clusterhub-attached": aio_clusterhub(True),
        "clusterhub-not-attached": aio_clusterhub(False),
        "asyncio-streams": aio_streams,
    },
    size=1000, rounds=11, smoke=20, placements=PLACEMENTS, show=("cpu_per_rt_s",),
    targets=(
        Target("clusterhub-attached", "asyncio-streams", 1.0,
               "attached: <= 1.0 x an asyncio streams pickle echo"),
        Target("clusterhub-not-attached", "asyncio-streams", 1.2,
               "not attached: <= 1.2 x an asyncio streams pickle echo"),
    ),
)
