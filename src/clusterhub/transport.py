"""The seam between the public API and a transport.

``hub.Hub`` checks arguments, serializes, and calls a :class:`Transport`
(who the processes are, and the way to each of them) and its
:class:`Endpoint` objects (one peer each, as a sender sees it).  The hub's
other parts do not depend on the transport: the dispatcher (handlers, the
inbox), the pending table (request futures, timeouts) and the serializer.

The local transport is ``workers.Processes`` with ``channel.Channel``
endpoints over socketpairs, read by ``router.Router``, and the lock table of
``locks.Locks``.  Another transport (sockets of processes that connect by
address; a Redis server) implements the two protocols below and, in return
for what it receives:

- puts messages and requests on the dispatcher's inbox as items
  ``(name, data, sender, reply)`` (``reply(ok, value)`` answers a request;
  None for a plain message), in arrival order per sender;
- completes request futures through the pending table
  (``Pending.complete``), and fails them when their peer is lost
  (``Pending.fail_peer``; in a worker, ``fail_all`` with MasterDied);
- reports a worker's exit on its ``Worker`` (``set_exited`` as soon as it is
  known, then ``settled`` once everything it sent was handled and the
  ``on_exit`` callbacks ran: what ``join`` waits for);
- gives the hub a lock table with the same ``Lock`` handle semantics.

Nothing here is shaped like file descriptors: an endpoint takes messages
and says how much is queued towards its peer; how it moves them is its own.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from .process import Worker


class Endpoint(Protocol):
    """One peer, as a sender of this process sees it."""

    max_len: int  # largest frame
    max_queue: int  # bytes queued towards the peer before a sender waits
    closed: bool

    def pending(self) -> int:
        """Bytes queued towards the peer, not yet sent."""
        ...

    def post_msg(self, kind: int, origin: int, rid: int, nb: bytes, nlen: int,
                 body: bytes, blen: int) -> int:
        """Queue a one-way message (may be coalesced with others): the bytes
        now queued, or a negative error code for ``post_backlog``."""
        ...

    def post(self, payload: bytes, n: int, max_len: int) -> int:
        """Queue a whole encoded message frame; as ``post_msg``."""
        ...

    def post_parts(self, kind: int, origin: int, nb: bytes, body: bytes) -> None:
        """Queue a one-way message and wait while over max_queue."""
        ...

    def post_frame(self, payload: bytes) -> None:
        """Queue a whole encoded frame and wait while over max_queue."""
        ...

    def post_backlog(self, queued: int, size: int) -> None:
        """After a post: raise its error, or wait while over max_queue
        (PeerDied if the peer goes meanwhile)."""
        ...

    def post_timed(self, post: Callable[[], int], size: int, timeout: float,
                   worker: Optional[Worker] = None) -> None:
        """Wait for room up to ``timeout``, then ``post()``; SendTimeout
        (nothing queued) if the queue stayed full."""
        ...

    def post_by(self, post: Callable[[], int], size: int, deadline: float) -> bool:
        """As ``post_timed`` with a ``time.monotonic()`` deadline; False
        instead of raising."""
        ...

    def send_request(self, kind: int, origin: int, rid: int, nb: bytes, nlen: int,
                     body: bytes, blen: int) -> int:
        """Send a request at once (never coalesced): bytes left queued, or a
        negative error code for ``sent_part``."""
        ...

    def sent_part(self, left: int, wait: bool, size: int) -> None:
        """After ``send_request``: raise its error, or deal with what is left
        queued (waiting while over max_queue when ``wait``)."""
        ...


class Transport(Protocol):
    """The processes of one hub, as this process sees them."""

    key: Any  # names the hub in Worker pickles (shared by all its processes)
    pid: int
    is_master: bool
    worker_id: Optional[int]
    workers: dict[int, Worker]  # live workers by id (the master)
    exit_callbacks: list[Callable[[Worker], Any]]

    @property
    def master(self) -> Optional[Endpoint]:
        """A worker's endpoint to its master; None in the master."""
        ...

    def fork(self, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             forking: Callable[[bool], None]) -> Worker:
        """Start a worker running ``target``; in the child this transport
        becomes the worker side."""
        ...

    def worker(self, worker: "Worker | int") -> Worker:
        """The live worker a Worker or id stands for (ValueError, WorkerDied)."""
        ...

    def master_channel(self) -> Endpoint:
        """A worker's endpoint to its master; MasterDied once it is gone."""
        ...

    def broadcast(self, payload: bytes, timeout: Optional[float]) -> None:
        """From the master: a whole message frame to every live worker."""
        ...

    def send_random(self, payload: bytes, timeout: Optional[float]) -> Optional[Worker]:
        """From the master: a whole message frame to one live worker; it, or None."""
        ...

    def join(self, timeout: Optional[float]) -> bool:
        """Wait until every worker exited and was settled."""
        ...

    def resolve(self, wid: int) -> Optional[Worker]:
        """This process's Worker for an unpickled reference."""
        ...

    def stop_workers(self, timeout: float) -> Optional[BaseException]:
        """Closing: stop the workers this process started (or flush to the
        master); a KeyboardInterrupt that cut it short is returned."""
        ...

    def detached(self) -> None:
        """The hub detached from its asyncio loop: a loop reading an
        endpoint for its coroutines (loopread.py) lets go."""
        ...

    def stop_watching(self) -> None:
        """Closing: learn of no more exits."""
        ...

    def close(self) -> None:
        """Closing, after the dispatcher stopped: release the endpoints."""
        ...

    def abandon(self) -> None:
        """In a child forked by other code: release our copies, touch nothing else."""
        ...
