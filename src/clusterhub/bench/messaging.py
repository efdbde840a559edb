"""The message cases: request round trip, one-way messages, broadcast to 8
workers, each clusterhub's and its standard-library peers'.

The peers are transport classes (``PipeEcho``, ``PipeOneWay``,
``PipeLoopBroadcast`` describe the protocols) made into cases by ``rt_peer``,
``ow_peer`` and ``bc_peer``; ``benchmarks/`` adds pyzmq's the same way.  Every
job here is measured unpinned and pinned to one CPU.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.managers import BaseManager
from typing import Any, Callable, ContextManager

from .. import Hub, connect
from .host import Batch, Case, Countdown, Sample, ask, expect, hosted, now_ns, reap, report, run_forked, serve, stop
from .jobs import Job, Target

_fork = mp.get_context("fork")


# ---- 1. request round trip --------------------------------------------------------
# The requester times n round trips in a loop; the figure is s per round trip.


def _echo(data: Any, sender: Any) -> Any:
    return data


def _echo_value(x: Any) -> Any:
    return x


def _timed_calls(call: Callable[[int], Any], n: int) -> Sample:
    t0 = time.perf_counter()
    for i in range(n):
        call(i)
    return {"t": (time.perf_counter() - t0) / n}


def _relay(conn: Any, inner: Any) -> None:
    """Host side: pass each batch on to the process that measures it."""
    expect(inner)
    serve(conn, lambda size: ask(inner, size))


def _rt_clusterhub_host(conn: Any, connected: bool) -> None:
    # The host is the master, answering "echo"; a worker makes the requests:
    # forked by the hub, or (connected) a plain child that joins by address
    # (the same transport: the two should agree).
    address = f"@clusterhub-bench-{os.getpid()}" if connected else None
    hub = Hub(address=address)
    hub.on("echo", _echo)
    inner, theirs = mp.Pipe()

    def requester() -> None:
        asker = hub
        if address is not None:
            hub._abandon()  # (inert in this child: it joins by address instead)
            asker = connect(address)
        serve(theirs, lambda n: _timed_calls(lambda i: asker.request_master("echo", i).result(), n))

    pid = run_forked(requester) if connected else None
    if pid is None:
        hub.fork(requester)
    theirs.close()
    try:
        _relay(conn, inner)
    finally:
        stop(inner)
        hub.close()
        if pid is not None:  # (a hub's own worker is reaped by the hub)
            reap(pid)


def rt_clusterhub(pinned: bool = False) -> ContextManager[Batch]:
    return hosted(_rt_clusterhub_host, False, pinned=pinned)


def rt_connected(pinned: bool = False) -> ContextManager[Batch]:
    return hosted(_rt_clusterhub_host, True, pinned=pinned)


class PipeEcho:
    """Round-trip transport protocol (peers): ``prepare()`` in the requester
    before the echo process forks, ``serve()`` in the echo process (forked only
    when the class defines it), ``client() -> call(x)`` in the requester,
    ``close()``.  This one: a multiprocessing.Pipe, pickled both ways, to a
    process echoing what it receives."""

    def prepare(self) -> None:
        self.a, self.b = mp.Pipe()

    def serve(self) -> None:
        b = self.b
        with contextlib.suppress(EOFError):
            while True:
                b.send(b.recv())

    def client(self) -> Callable[[Any], Any]:
        a = self.a

        def call(x: Any) -> Any:
            a.send(x)
            return a.recv()

        return call

    def close(self) -> None:
        self.a.close()


class _EchoManager(BaseManager):
    pass


class _Echo:
    def echo(self, x: Any) -> Any:
        return x


_EchoManager.register("Echo", _Echo)


class ManagerEcho:
    """A call on a multiprocessing.Manager proxy (the manager's server process echoes)."""

    def prepare(self) -> None:
        self.manager = _EchoManager(ctx=_fork)

    def client(self) -> Callable[[Any], Any]:
        self.manager.start()
        echo: Callable[[Any], Any] = self.manager.Echo().echo  # type: ignore[attr-defined]
        return echo

    def close(self) -> None:
        self.manager.shutdown()


class PoolEcho:
    """ProcessPoolExecutor(1).submit(echo, x).result()."""

    def prepare(self) -> None:
        self.pool = ProcessPoolExecutor(1, mp_context=_fork)

    def client(self) -> Callable[[Any], Any]:
        pool = self.pool
        pool.submit(_echo_value, 0).result()  # start its process now
        return lambda x: pool.submit(_echo_value, x).result()

    def close(self) -> None:
        self.pool.shutdown()


def _rt_peer_host(conn: Any, transport: Any) -> None:
    transport.prepare()
    pid = run_forked(transport.serve) if hasattr(transport, "serve") else None
    try:
        call = transport.client()
        serve(conn, lambda n: _timed_calls(call, n))
    finally:
        transport.close()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            reap(pid)


def rt_peer(transport: type) -> Case:
    """A round-trip case over a peer transport class (see PipeEcho)."""
    return lambda pinned=False: hosted(_rt_peer_host, transport(), pinned=pinned)


ROUND_TRIP = Job(
    "round-trip", "s per request round trip, worker -> master -> worker",
    {
        "clusterhub": rt_clusterhub,
        "clusterhub-connected": rt_connected,
        "pipe": rt_peer(PipeEcho),
        "manager": rt_peer(ManagerEcho),
        "process-pool": rt_peer(PoolEcho),
    },
    size=1000, rounds=11, smoke=20, pinnable=True,
    targets=(
        Target("clusterhub", "pipe", 1.5, "<= 1.5 x multiprocessing.Pipe pickled echo"),
        Target("clusterhub-connected", "clusterhub", 1.2,
               "a connected worker within the spread of a forked one (<= 1.2 x)"),
    ),
)


# ---- 2. one-way messages, worker -> master -----------------------------------------
# The sender stamps t0 before its first send; the receiver stamps t1 when it has
# handled the last; the figure is (t1 - t0) / n, s per message.


def _ow_clusterhub_host(conn: Any) -> None:
    # The host is the master, counting in its handler; a worker sends.
    hub = Hub()
    count = Countdown()
    hub.on("m", count.hit)
    inner, theirs = mp.Pipe()

    def sender() -> None:
        def batch(n: int) -> int:
            t0 = now_ns()
            for i in range(n):
                hub.send_to_master("m", i)
            return t0

        serve(theirs, batch)

    hub.fork(sender)
    theirs.close()

    def batch(n: int) -> Sample:
        count.arm(n)
        t0 = ask(inner, n)
        return {"t": (count.wait() - t0) / n / 1e9}

    try:
        expect(inner)
        serve(conn, batch)
    finally:
        stop(inner)
        hub.close()


def ow_clusterhub(pinned: bool = False) -> ContextManager[Batch]:
    return hosted(_ow_clusterhub_host, pinned=pinned)


class PipeOneWay:
    """One-way transport protocol (peers): ``prepare()`` in the receiver before
    the sender forks, ``sender() -> send(x)`` in the sender, ``receiver() ->
    recv()`` in the receiver, ``close()``.  This one: multiprocessing.Pipe."""

    def prepare(self) -> None:
        self.r, self.w = mp.Pipe()

    def sender(self) -> Callable[[Any], None]:
        return self.w.send

    def receiver(self) -> Callable[[], Any]:
        return self.r.recv

    def close(self) -> None:
        self.r.close()


class QueueOneWay:
    """multiprocessing.Queue (a feeder thread writes to a pipe)."""

    def prepare(self) -> None:
        self.q: Any = _fork.Queue()

    def sender(self) -> Callable[[Any], None]:
        put: Callable[[Any], None] = self.q.put
        return put

    def receiver(self) -> Callable[[], Any]:
        get: Callable[[], Any] = self.q.get
        return get

    def close(self) -> None:
        self.q.close()


class SimpleQueueOneWay(QueueOneWay):
    """multiprocessing.SimpleQueue (pickles and writes under a lock)."""

    def prepare(self) -> None:
        self.q = _fork.SimpleQueue()


def _ow_peer_host(conn: Any, transport: Any) -> None:
    transport.prepare()
    inner, theirs = mp.Pipe()

    def sender() -> None:
        send = transport.sender()

        def batch(n: int) -> int:
            t0 = now_ns()
            for i in range(n):
                send(i)
            return t0

        serve(theirs, batch)

    pid = run_forked(sender)
    theirs.close()

    def batch(n: int) -> Sample:
        inner.send(n)
        for _ in range(n):
            recv()
        t1 = now_ns()
        return {"t": (t1 - expect(inner)) / n / 1e9}

    try:
        recv = transport.receiver()
        expect(inner)
        serve(conn, batch)
    finally:
        stop(inner)
        transport.close()
        reap(pid)


def ow_peer(transport: type) -> Case:
    """A one-way case over a peer transport class (see PipeOneWay)."""
    return lambda pinned=False: hosted(_ow_peer_host, transport(), pinned=pinned)


ONE_WAY = Job(
    "one-way", "s per small message, worker -> master, all handled",
    {
        "clusterhub": ow_clusterhub,
        "pipe": ow_peer(PipeOneWay),
        "queue": ow_peer(QueueOneWay),
        "simple-queue": ow_peer(SimpleQueueOneWay),
    },
    size=20000, rounds=9, smoke=200, pinnable=True,
    targets=(Target("clusterhub", "pipe", 1 / 3, ">= 3 x multiprocessing.Pipe.send msgs/s"),),
)


# ---- 3. broadcast to 8 workers -------------------------------------------------------
# The master stamps t0 before the first broadcast; each receiver stamps when it
# has handled the last; the figure is (latest stamp - t0) / n, s per broadcast.


def _bc_hub_receiver(theirs: Any, count: Countdown) -> None:
    def batch(n: int) -> int:
        count.arm(n)
        report(theirs, "armed")
        return count.wait()

    serve(theirs, batch)


def _bc_batch(links: list[Any], send: Callable[[Any], None]) -> Batch:
    def batch(n: int) -> Sample:
        for link in links:
            ask(link, n)  # armed
        t0 = now_ns()
        for i in range(n):
            send(i)
        t1 = max(expect(link) for link in links)
        return {"t": (t1 - t0) / n / 1e9}

    return batch


def _bc_clusterhub_host(conn: Any, receivers: int) -> None:
    hub = Hub()
    count = Countdown()
    hub.on("b", count.hit)  # inherited by the workers; not called in the master
    links: list[Any] = []
    try:
        for _ in range(receivers):
            inner, theirs = mp.Pipe()
            hub.fork(_bc_hub_receiver, theirs, count)
            theirs.close()
            links.append(inner)
        for link in links:
            expect(link)
        serve(conn, _bc_batch(links, lambda x: hub.send_to_workers("b", x)))
    finally:
        for link in links:
            stop(link)
        hub.close()


def bc_clusterhub(pinned: bool = False, receivers: int = 8) -> ContextManager[Batch]:
    return hosted(_bc_clusterhub_host, receivers, pinned=pinned)


class PipeLoopBroadcast:
    """Broadcast transport protocol (peers): ``prepare(k)`` in the master before
    the k receivers fork, ``receiver(i) -> recv()`` in receiver i, ``sender() ->
    send(x)`` in the master once they are forked, ``close()``.  This one: a loop
    of multiprocessing.Pipe.send over k pipes."""

    def prepare(self, k: int) -> None:
        self.pipes = [mp.Pipe() for _ in range(k)]

    def receiver(self, i: int) -> Callable[[], Any]:
        return self.pipes[i][1].recv

    def sender(self) -> Callable[[Any], None]:
        ends = [a for a, _ in self.pipes]

        def send(x: Any) -> None:
            for a in ends:
                a.send(x)

        return send

    def close(self) -> None:
        for a, b in self.pipes:
            a.close()
            b.close()


def _bc_peer_receiver(theirs: Any, transport: Any, i: int) -> None:
    recv = transport.receiver(i)

    def batch(n: int) -> int:
        report(theirs, "armed")
        for _ in range(n):
            recv()
        return now_ns()

    serve(theirs, batch)


def _bc_peer_host(conn: Any, transport: Any, receivers: int) -> None:
    transport.prepare(receivers)
    links, pids = [], []
    try:
        for i in range(receivers):
            inner, theirs = mp.Pipe()
            pids.append(run_forked(_bc_peer_receiver, theirs, transport, i))
            theirs.close()
            links.append(inner)
        send = transport.sender()
        for link in links:
            expect(link)
        serve(conn, _bc_batch(links, send))
    finally:
        for link in links:
            stop(link)
        transport.close()
        for pid in pids:
            reap(pid)


def bc_peer(transport: type) -> Case:
    """A broadcast case over a peer transport class (see PipeLoopBroadcast)."""
    return lambda pinned=False, receivers=8: hosted(
        _bc_peer_host, transport(), receivers, pinned=pinned
    )


BROADCAST = Job(
    "broadcast-8", "s per broadcast to 8 workers, all deliveries handled",
    {"clusterhub": bc_clusterhub, "pipe-loop": bc_peer(PipeLoopBroadcast)},
    size=2000, rounds=9, smoke=20, pinnable=True, params={"receivers": 8},
    targets=(Target("clusterhub", "pipe-loop", 1 / 2, ">= 2 x a loop of Pipe.send to 8 pipes"),),
)
