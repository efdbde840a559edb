"""The message cases: request round trip, one-way messages, broadcast to 8
workers, each clusterhub's and its standard-library peers', and the round
trip's tail latency with a busy loop on every CPU.

The peers are transport classes (``PipeEcho``, ``PipeOneWay``,
``PipeLoopBroadcast`` describe the protocols) made into cases by ``rt_peer``,
``ow_peer`` and ``bc_peer``; ``benchmarks/`` adds pyzmq's and node's
cluster-hub the same way.  Every job here but the tail latency is measured in
the three placements (``host.PLACEMENTS``): unpinned, every process on one
CPU, and the serving side (the master, the echo server) on one CPU with the
other side (the requester, the sender, the receiving workers) on another.
A round trip's sample also has ``cpu_per_rt_s``: the CPU time of both sides
(all their processes and threads) per round trip, so a waiter that spins
shows what it costs.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.managers import BaseManager
from typing import Any, Callable, ContextManager, Iterator

from .. import Hub, connect
from .host import (
    PLACEMENTS,
    TWO_CPUS,
    UNPINNED,
    Batch,
    Case,
    Countdown,
    Sample,
    ask,
    busy_cpus,
    cpu_counted,
    expect,
    hosted,
    now_ns,
    pin_client,
    reap,
    report,
    run_forked,
    serve,
    stop,
)
from .jobs import Job, Target

_fork = mp.get_context("fork")


# ---- 1. request round trip --------------------------------------------------------
# The requester times n round trips in a loop; the figure is s per round trip.
# Asked ("latencies", n) instead, it times each round trip (the tail job).


def _echo(data: Any, sender: Any) -> Any:
    return data


def _echo_value(x: Any) -> Any:
    return x


def _timed_calls(call: Callable[[int], Any], n: int) -> Sample:
    t0 = time.perf_counter()
    for i in range(n):
        call(i)
    return {"t": (time.perf_counter() - t0) / n, "n": n}


def latency_sample(lat: list[int]) -> Sample:
    """p50/p99/max of per-operation latencies in ns; the figure is the p99 (s)."""
    lat.sort()
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    return {"t": p99 / 1e9, "p50_us": p50 / 1e3, "p99_us": p99 / 1e3, "max_us": lat[-1] / 1e3, "n": len(lat)}


def _latencies(call: Callable[[int], Any], n: int, limit: float) -> Sample:
    """Each of up to ``n`` round trips timed alone, for at most ``limit`` s."""
    clock = time.perf_counter_ns
    lat: list[int] = []
    append = lat.append
    deadline = clock() + int(limit * 1e9)
    for i in range(n):
        t0 = clock()
        call(i)
        t1 = clock()
        append(t1 - t0)
        if t1 > deadline:
            break
    return latency_sample(lat)


def requester(call: Callable[[int], Any]) -> Callable[[Any], Sample]:
    """The requester's batch: ``n`` -> a timed loop of n round trips;
    ``("latencies", n, limit)`` -> each round trip timed alone."""

    def batch(command: Any) -> Sample:
        if isinstance(command, tuple):
            _, n, limit = command
            return _latencies(call, n, limit)
        return _timed_calls(call, command)

    return batch


def _relay(conn: Any, inner: Any) -> None:
    """Host side: pass each batch on to the process that measures it."""
    expect(inner)
    serve(conn, lambda size: ask(inner, size))


def _rt_clusterhub_host(conn: Any, connected: bool, placement: str) -> None:
    # The host is the master, answering "echo"; a worker makes the requests:
    # forked by the hub, or (connected) a plain child that joins by address
    # (the same transport: the two should agree).
    address = f"@clusterhub-bench-{os.getpid()}" if connected else None
    hub = Hub(address=address)
    hub.on("echo", _echo)
    inner, theirs = mp.Pipe()

    def requesting() -> None:
        pin_client(placement)
        asker = hub
        if address is not None:
            hub._abandon()  # (inert in this child: it joins by address instead)
            asker = connect(address)
        serve(theirs, requester(lambda i: asker.request_master("echo", i).result()))

    pid = run_forked(requesting) if connected else None
    if pid is None:
        hub.fork(requesting)
    theirs.close()
    try:
        _relay(conn, inner)
    finally:
        stop(inner)
        hub.close()
        if pid is not None:  # (a hub's own worker is reaped by the hub)
            reap(pid)


def rt_counted(host: Callable[..., None], *args: Any, placement: str = UNPINNED) -> ContextManager[Batch]:
    """A round-trip case: ``host(conn, *args, placement)`` hosted in
    ``placement``, its samples with ``cpu_per_rt_s``."""
    return cpu_counted(hosted(host, *args, placement, placement=placement), "cpu_per_rt_s")


def rt_clusterhub(placement: str = UNPINNED) -> ContextManager[Batch]:
    return rt_counted(_rt_clusterhub_host, False, placement=placement)


def rt_connected(placement: str = UNPINNED) -> ContextManager[Batch]:
    return rt_counted(_rt_clusterhub_host, True, placement=placement)


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


def _rt_peer_host(conn: Any, transport: Any, placement: str) -> None:
    # The host is the requester; whatever answers (the echo process, the
    # manager's server, the pool's process) starts from it, on the serving
    # side's CPU, before the host moves to the other side's.
    transport.prepare()
    pid = run_forked(transport.serve) if hasattr(transport, "serve") else None
    try:
        call = transport.client()
        pin_client(placement)
        serve(conn, requester(call))
    finally:
        transport.close()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            reap(pid)


def rt_peer(transport: type) -> Case:
    """A round-trip case over a peer transport class (see PipeEcho)."""
    return lambda placement=UNPINNED: rt_counted(_rt_peer_host, transport(), placement=placement)


ROUND_TRIP = Job(
    "round-trip", "s per request round trip, worker -> master -> worker",
    {
        "clusterhub": rt_clusterhub,
        "clusterhub-connected": rt_connected,
        "pipe": rt_peer(PipeEcho),
        "manager": rt_peer(ManagerEcho),
        "process-pool": rt_peer(PoolEcho),
    },
    size=1000, rounds=11, smoke=20, placements=PLACEMENTS, show=("cpu_per_rt_s",),
    targets=(
        Target("clusterhub", "pipe", 1.0, "<= 1.0 x multiprocessing.Pipe pickled echo"),
        Target("clusterhub", "pipe", 0.5, "<= 0.5 x the Pipe echo with the sides on two CPUs",
               placements=(TWO_CPUS,)),
        Target("clusterhub-connected", "clusterhub", 1.2,
               "a connected worker within the spread of a forked one (<= 1.2 x)"),
    ),
)


# ---- 1b. round-trip tail latency with a busy loop on every CPU --------------------
# The round-trip cases above, unpinned, each batch run while a busy Python
# process spins on every CPU (started by the parent around the batch, each
# pinned to its CPU: unpinned, the load balancer may stack them and leave a
# CPU free); the requester times each round trip alone and the figure is the
# p99.


def busy_round_trip(case: Case) -> Case:
    """``case``'s round trips, timed one by one beside a busy loop on every CPU:
    a batch of size ``(n, limit)`` is up to n round trips in at most limit s."""

    @contextlib.contextmanager
    def busy(placement: str = UNPINNED) -> Iterator[Batch]:
        with case(placement) as inner:

            def batch(size: tuple[int, float]) -> Sample:
                n, limit = size
                with busy_cpus() as spinners:
                    sample = inner(("latencies", n, limit))
                sample["busy_processes"] = spinners
                return sample

            yield batch

    return busy


RT_P99_BUSY = Job(
    "round-trip-p99-busy", "p99 of one request round trip (s) with a busy process on every CPU",
    {"clusterhub": busy_round_trip(rt_clusterhub), "pipe": busy_round_trip(rt_peer(PipeEcho))},
    size=(3000, 1.0), rounds=7, smoke=(50, 0.5), show=("p50_us", "p99_us", "max_us"),
    targets=(Target("clusterhub", "pipe", 1.0, "p99 <= 1.0 x the multiprocessing.Pipe echo's p99"),),
)


# ---- 2. one-way messages, worker -> master -----------------------------------------
# The sender stamps t0 before its first send; the receiver stamps t1 when it has
# handled the last; the figure is (t1 - t0) / n, s per message.


def _ow_clusterhub_host(conn: Any, placement: str) -> None:
    # The host is the master, counting in its handler; a worker sends.
    hub = Hub()
    count = Countdown()
    hub.on("m", count.hit)
    inner, theirs = mp.Pipe()

    def sender() -> None:
        pin_client(placement)

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


def ow_clusterhub(placement: str = UNPINNED) -> ContextManager[Batch]:
    return hosted(_ow_clusterhub_host, placement, placement=placement)


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


def _ow_peer_host(conn: Any, transport: Any, placement: str) -> None:
    transport.prepare()
    inner, theirs = mp.Pipe()

    def sender() -> None:
        pin_client(placement)
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
    return lambda placement=UNPINNED: hosted(_ow_peer_host, transport(), placement, placement=placement)


ONE_WAY = Job(
    "one-way", "s per small message, worker -> master, all handled",
    {
        "clusterhub": ow_clusterhub,
        "pipe": ow_peer(PipeOneWay),
        "queue": ow_peer(QueueOneWay),
        "simple-queue": ow_peer(SimpleQueueOneWay),
    },
    size=20000, rounds=9, smoke=200, placements=PLACEMENTS,
    targets=(Target("clusterhub", "pipe", 1 / 3, ">= 3 x multiprocessing.Pipe.send msgs/s"),),
)


# ---- 3. broadcast to 8 workers -------------------------------------------------------
# The master stamps t0 before the first broadcast; each receiver stamps when it
# has handled the last; the figure is (latest stamp - t0) / n, s per broadcast.


def _bc_hub_receiver(theirs: Any, count: Countdown, placement: str) -> None:
    pin_client(placement)

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


def _bc_clusterhub_host(conn: Any, receivers: int, placement: str) -> None:
    hub = Hub()
    count = Countdown()
    hub.on("b", count.hit)  # inherited by the workers; not called in the master
    links: list[Any] = []
    try:
        for _ in range(receivers):
            inner, theirs = mp.Pipe()
            hub.fork(_bc_hub_receiver, theirs, count, placement)
            theirs.close()
            links.append(inner)
        for link in links:
            expect(link)
        serve(conn, _bc_batch(links, lambda x: hub.send_to_workers("b", x)))
    finally:
        for link in links:
            stop(link)
        hub.close()


def bc_clusterhub(placement: str = UNPINNED, receivers: int = 8) -> ContextManager[Batch]:
    return hosted(_bc_clusterhub_host, receivers, placement, placement=placement)


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


def _bc_peer_receiver(theirs: Any, transport: Any, i: int, placement: str) -> None:
    pin_client(placement)
    recv = transport.receiver(i)

    def batch(n: int) -> int:
        report(theirs, "armed")
        for _ in range(n):
            recv()
        return now_ns()

    serve(theirs, batch)


def _bc_peer_host(conn: Any, transport: Any, receivers: int, placement: str) -> None:
    transport.prepare(receivers)
    links, pids = [], []
    try:
        for i in range(receivers):
            inner, theirs = mp.Pipe()
            pids.append(run_forked(_bc_peer_receiver, theirs, transport, i, placement))
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
    return lambda placement=UNPINNED, receivers=8: hosted(
        _bc_peer_host, transport(), receivers, placement, placement=placement
    )


BROADCAST = Job(
    "broadcast-8", "s per broadcast to 8 workers, all deliveries handled",
    {"clusterhub": bc_clusterhub, "pipe-loop": bc_peer(PipeLoopBroadcast)},
    size=2000, rounds=9, smoke=20, placements=PLACEMENTS, params={"receivers": 8},
    targets=(Target("clusterhub", "pipe-loop", 1 / 2, ">= 2 x a loop of Pipe.send to 8 pipes"),),
)
