"""Messaging: request round trip, one-way messages, broadcast to 8 workers,
the round trip's p99 with a busy loop on every CPU, the asyncio round trip,
and fan-in (4 and 16 workers requesting at once).

clusterhub and the stdlib peers come from the kit (``clusterhub.bench.messaging``,
``.aio``, ``.fanin``); pyzmq's are added here when it is installed (the
``bench`` extra; without it, its cases skip, see ``_peers``), and node's
cluster-hub when ``node`` and ``npm`` are (``_node``).  Round trip, asyncio
round trip, one-way and broadcast are measured in the three placements
(unpinned, one-cpu, two-cpus).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from typing import TYPE_CHECKING, Any, Callable

import pytest

from clusterhub.bench.aio import ASYNCIO_ROUND_TRIP
from clusterhub.bench.fanin import FAN_IN_4, FAN_IN_16
from clusterhub.bench.host import ONE_CPU, TWO_CPUS, UNPINNED
from clusterhub.bench.jobs import Target
from clusterhub.bench.messaging import BROADCAST, ONE_WAY, ROUND_TRIP, RT_P99_BUSY, bc_peer, ow_peer, rt_peer

from ._node import missing_tools, rt_node
from ._peers import case_params, optional, require, with_peers

if TYPE_CHECKING:
    import zmq
else:
    zmq = optional("zmq", "pyzmq")


class _Zmq:
    """An ipc:// endpoint and this process's own context (zmq contexts do not
    survive fork, so each side makes its own after forking)."""

    ctx = None

    def prepare(self, *_: Any) -> None:
        self.path = os.path.join(tempfile.gettempdir(), f"clusterhub-bench-{os.getpid()}-{id(self)}.ipc")
        self.endpoint = "ipc://" + self.path

    def socket(self, kind: int, **options: int) -> zmq.Socket[Any]:
        self.ctx = zmq.Context()
        s = self.ctx.socket(kind)
        for name, value in options.items():
            s.setsockopt(getattr(zmq, name), value)
        return s

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.destroy(linger=0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class ZmqEcho(_Zmq):
    """A DEALER requester and a ROUTER echo process, pickled both ways."""

    def serve(self) -> None:
        s = self.socket(zmq.ROUTER)
        s.bind(self.endpoint)
        while True:
            ident, payload = s.recv_multipart()
            s.send_multipart([ident, pickle.dumps(pickle.loads(payload))])

    def client(self) -> Callable[[Any], Any]:
        s = self.socket(zmq.DEALER)
        s.connect(self.endpoint)

        def call(x: Any) -> Any:
            s.send_pyobj(x)
            return s.recv_pyobj()

        return call


class ZmqPushPull(_Zmq):
    """PUSH in the worker, PULL (bound) in the master."""

    def sender(self) -> Callable[[Any], Any]:
        s = self.socket(zmq.PUSH)
        s.connect(self.endpoint)
        return s.send_pyobj

    def receiver(self) -> Callable[[], Any]:
        s = self.socket(zmq.PULL)
        s.bind(self.endpoint)
        return s.recv_pyobj


class ZmqPubSub(_Zmq):
    """PUB in the master, a SUB per worker, no high-water mark (PUB would drop).
    The master's socket is an XPUB only to see the subscriptions arrive before
    it starts; it sends as a PUB does."""

    def prepare(self, k: int) -> None:
        super().prepare()
        self.k = k

    def receiver(self, i: int) -> Callable[[], Any]:
        s = self.socket(zmq.SUB, RCVHWM=0)
        s.connect(self.endpoint)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        return s.recv_pyobj

    def sender(self) -> Callable[[Any], Any]:
        s = self.socket(zmq.XPUB, SNDHWM=0, XPUB_VERBOSE=1, RCVTIMEO=30_000)
        s.bind(self.endpoint)
        for _ in range(self.k):
            s.recv()  # one subscription per SUB
        return s.send_pyobj


require("node", missing_tools())

ROUND_TRIP_ALL = with_peers(
    ROUND_TRIP,
    {"zmq-dealer-router": ("zmq", rt_peer(ZmqEcho)), "node-cluster-hub": ("node", rt_node)},
    targets=(
        Target("clusterhub", "node-cluster-hub", 1 / 5, ">= 5 x faster than node's cluster-hub",
               placements=(UNPINNED, TWO_CPUS)),
        Target("clusterhub", "node-cluster-hub", 1 / 2, ">= 2 x faster than node's cluster-hub",
               placements=(ONE_CPU,)),
    ),
)
ONE_WAY_ALL = with_peers(ONE_WAY, {"zmq-push-pull": ("zmq", ow_peer(ZmqPushPull))})
BROADCAST_ALL = with_peers(
    BROADCAST, {"zmq-pub-sub": ("zmq", bc_peer(ZmqPubSub))},
    targets=(Target("clusterhub", "zmq-pub-sub", 1.0, "<= 1.0 x pyzmq PUB/SUB's time"),),
)


@pytest.mark.benchmark(group="round-trip")
@pytest.mark.parametrize("case", case_params(ROUND_TRIP_ALL))
def test_round_trip(measure: Any, case: str, placement: str) -> None:
    """A worker's request_master("echo", x).result() loop, timed in the worker, against the same echo over each peer;
    cpu_per_rt_s: both sides' CPU time per round trip."""
    measure(ROUND_TRIP_ALL, case, placement)


@pytest.mark.benchmark(group="one-way")
@pytest.mark.parametrize("case", case_params(ONE_WAY_ALL))
def test_one_way(measure: Any, case: str, placement: str) -> None:
    """Small messages from a worker to the master, from the first send to the last one handled."""
    measure(ONE_WAY_ALL, case, placement)


@pytest.mark.benchmark(group="broadcast-8")
@pytest.mark.parametrize("case", case_params(BROADCAST_ALL))
def test_broadcast(measure: Any, case: str, placement: str) -> None:
    """Broadcasts from the master to 8 workers, until every worker has handled the last."""
    measure(BROADCAST_ALL, case, placement)


@pytest.mark.benchmark(group="round-trip-p99-busy")
@pytest.mark.parametrize("case", RT_P99_BUSY.cases)
def test_round_trip_p99_busy(measure: Any, case: str) -> None:
    """Each round trip timed alone while a busy Python process spins on every CPU: the p99 (p50 and max beside)."""
    measure(RT_P99_BUSY, case)


@pytest.mark.benchmark(group="asyncio-round-trip")
@pytest.mark.parametrize("case", ASYNCIO_ROUND_TRIP.cases)
def test_asyncio_round_trip(measure: Any, case: str, placement: str) -> None:
    """`await hub.request_master("echo", x)` in a worker's asyncio loop, the hub attached to it or not, against an
    asyncio streams pickle echo."""
    measure(ASYNCIO_ROUND_TRIP, case, placement)


@pytest.mark.parametrize(
    "job", [pytest.param(job, marks=pytest.mark.benchmark(group=job.name), id=str(job.params["workers"]))
            for job in (FAN_IN_4, FAN_IN_16)]
)
@pytest.mark.parametrize("case", FAN_IN_4.cases)
def test_fan_in(measure: Any, case: str, job: Any) -> None:
    """Workers looping request_master("echo", x).result() for the same window: s per request, requests/s."""
    measure(job, case)
