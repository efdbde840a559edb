"""Messaging: request round trip, one-way messages, broadcast to 8 workers.

clusterhub and the stdlib peers come from the kit
(``clusterhub.bench.messaging``); pyzmq's are added here when it is installed
(the ``bench`` extra; without it, its cases skip, see ``_peers``).  Each is
measured unpinned and pinned to one CPU.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from typing import TYPE_CHECKING, Any, Callable

import pytest

from clusterhub.bench.messaging import BROADCAST, ONE_WAY, ROUND_TRIP, bc_peer, ow_peer, rt_peer

from ._peers import case_params, optional, with_peers

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


ROUND_TRIP_ALL = with_peers(ROUND_TRIP, {"zmq-dealer-router": ("zmq", rt_peer(ZmqEcho))})
ONE_WAY_ALL = with_peers(ONE_WAY, {"zmq-push-pull": ("zmq", ow_peer(ZmqPushPull))})
BROADCAST_ALL = with_peers(BROADCAST, {"zmq-pub-sub": ("zmq", bc_peer(ZmqPubSub))})


@pytest.mark.benchmark(group="round-trip")
@pytest.mark.parametrize("case", case_params(ROUND_TRIP_ALL))
def test_round_trip(measure: Any, case: str, pinned: bool) -> None:
    """A worker's request_master("echo", x).result() loop, timed in the worker, against the same echo over each peer."""
    measure(ROUND_TRIP_ALL, case, pinned)


@pytest.mark.benchmark(group="one-way")
@pytest.mark.parametrize("case", case_params(ONE_WAY_ALL))
def test_one_way(measure: Any, case: str, pinned: bool) -> None:
    """Small messages from a worker to the master, from the first send to the last one handled."""
    measure(ONE_WAY_ALL, case, pinned)


@pytest.mark.benchmark(group="broadcast-8")
@pytest.mark.parametrize("case", case_params(BROADCAST_ALL))
def test_broadcast(measure: Any, case: str, pinned: bool) -> None:
    """Broadcasts from the master to 8 workers, until every worker has handled the last."""
    measure(BROADCAST_ALL, case, pinned)
