"""The Hub: the one object users touch.  It checks arguments and delegates:
to the process layer (workers.py) for workers, to channels (channel.py) for
sending, to the pending table (requests.py) for replies, to the dispatcher
(dispatch.py) for handlers, and to the lock table (locks.py) for locks.  The
same object is the master side in the master and, after ``fork()``, the
worker side in the child."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
from typing import Any, Callable, Iterable, Optional, ParamSpec, TypeVar, Union, overload

from . import _bindings, forks, loopread, protocol
from .channel import wait_reply
from .checks import check_bool, check_callback, check_int, check_spin, check_timeout, check_uid
from .dispatch import Dispatcher
from .errors import (
    HubClosedError,
    MasterDied,
    NotMasterError,
    NoWorkersError,
    WorkerDied,
)
from .forks import hubs as _hubs
from .locks import HeldLock, Lock, Locks
from .process import Worker
from .redis.url import is_redis
from .requests import Callback, Future, Pending, gather
from .router import Router
from .transport import Endpoint, Transport
from .workers import Processes, WorkerRef

log = logging.getLogger("clusterhub")

# A message handler: handler(data, sender), sender None when from the master.
Handler = Callable[[Any, Optional[Worker]], Any]
H = TypeVar("H", bound=Handler)
P = ParamSpec("P")
E = TypeVar("E", bound=Callable[[Worker], Any])  # an on_exit callback

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_QUEUE = 8 * 1024 * 1024
DEFAULT_LOCK_SLOTS = 1024
# How long a thread expecting a frame soon spins before it blocks, at most (s).
DEFAULT_SPIN = 50e-6

# How long close() lets a running handler finish before abandoning it.
_HANDLER_GRACE = 1.0

_MSG, _BCAST = protocol.MSG, protocol.BCAST
_known_names = protocol.known_names

class Hub:
    """Messages and global locks between a master process and its workers.

    Create it in the master before starting workers with :meth:`fork`.

    :param serializer: ``"pickle"`` (default; peers are trusted: pickle runs
        their bytes), ``"json"``, or an object with ``dumps``/``loads``.
    :param max_message_size: largest frame in bytes (default 64 MiB); larger
        sends raise :class:`MessageTooLarge`.
    :param max_queue: bytes queued towards one peer before a sender blocks
        (default 8 MiB).
    :param lock_slots: the lock table holds at least this many keys held or
        waited on at once (and at most twice as many).
    :param exit_on_master_death: a worker whose master dies exits with code 1.
    :param address: also accept processes the hub did not fork, which join
        with :func:`clusterhub.connect` (``"@name"``: a Linux abstract socket;
        anything else: a filesystem path, made owner-only).  ``authkey``
        (bytes): they must prove they know it (and the master proves it to
        them); ``allowed_uids``: users besides this one that may connect.
    :param spin: how long, at most, a thread that expects a frame within
        microseconds (a requester its reply, the dispatcher a worker's next
        request right after answering one) spins on the socket before it
        sleeps, in seconds (default 50 µs; 0: never).  Waking a sleeping
        thread on another CPU costs tens of microseconds on many machines;
        the spin is adapted to the recent reply times, and skipped where it
        cannot pay (the peer pinned to our only CPU, or spins that kept
        running out).  Forked workers inherit it.
    :param lease: for a hub on a Redis server (``address="redis://host:port/db?name=N"``)
        only: how long, in seconds, a process that stopped renewing its lease
        still counts as alive (default 5): a dead worker, or a dead holder's
        lock, is noticed after that long.  See the README's "Beyond one machine".
    :param batch_dispatcher: run the hub's dispatcher threads (one per
        process) under Linux's ``SCHED_BATCH`` policy when they would run
        under the ordinary one, so that a message's arrival does not preempt
        its sender (a requester then waits for its reply before the reply
        comes, which saves a thread hand-off per request).  False keeps the
        creating thread's policy: handlers then preempt CPU-bound threads as
        soon as a message arrives.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "Hub":
        # A Redis address makes the Redis engine's hub (a subclass).
        if cls is Hub and is_redis(kwargs.get("address")):
            from .redis.hub import RedisHub

            return object.__new__(RedisHub)
        return object.__new__(cls)

    def __init__(
        self,
        *,
        serializer: Union[str, protocol.Serializer] = "pickle",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        lock_slots: int = DEFAULT_LOCK_SLOTS,
        exit_on_master_death: bool = True,
        batch_dispatcher: bool = True,
        spin: float = DEFAULT_SPIN,
        address: Optional[str] = None,
        authkey: Optional[bytes] = None,
        allowed_uids: Optional[Iterable[int]] = None,
        lease: Optional[float] = None,
    ) -> None:
        if lease is not None:
            raise ValueError("lease= is for a hub on a Redis server (address='redis://...'); "
                             "a local hub notices a death at once")
        check_int("max_message_size", max_message_size, 1, _bindings.FRAME_MAX_LIMIT)
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
        uids = None if allowed_uids is None else [check_uid(u) for u in allowed_uids]
        check_int("max_queue", max_queue, 0, None)
        check_int("lock_slots", lock_slots, 1, None)
        procs = self._build(serializer, max_message_size, max_queue, Locks(lock_slots),
                            exit_on_master_death, batch_dispatcher, f"master-{os.getpid()}", spin)
        self._dispatcher.start()
        _hubs.add(self)
        if address is not None:
            try:
                self._address = procs.listen(address, protocol.serializer_name(serializer), authkey, uids)
            except BaseException:
                self.close()
                raise

    _address: Optional[str]

    def _build(
        self, serializer: Union[str, protocol.Serializer], max_message_size: int, max_queue: int,
        locks: Locks, exit_on_master_death: bool, batch_dispatcher: bool, name: str,
        spin: float,
    ) -> Processes:
        """Make the hub's parts (the dispatcher not started yet): the local
        transport's process layer, returned."""
        self._dumps, self._loads = protocol.serializer_functions(serializer)
        check_bool("exit_on_master_death", exit_on_master_death)
        check_bool("batch_dispatcher", batch_dispatcher)
        spin = check_spin(spin)
        self._closed = False
        self._locks = locks
        self._dispatcher = Dispatcher(name, batch_dispatcher, spin)
        self._pending = Pending(self._dispatcher, wait_reply)
        self._pending.loop_hook = loopread.lead  # (an await reads its channel on its loop)
        # The transport (see transport.py): here the local one, socketpairs to forked workers.
        procs = Processes((os.getpid(), next(forks.serial)), self._dispatcher, self._pending,
                          self._locks, max_message_size, max_queue, exit_on_master_death, spin)
        procs.router = Router(procs, self._dispatcher, self._pending, self._dumps, self._loads)
        self._procs: Transport = procs
        self._address = None
        return procs

    def __repr__(self) -> str:
        role = "master" if self.is_master else f"worker {self.worker_id}"
        state = " closed" if self._closed else ""
        return f"<clusterhub.Hub {role} pid={self._procs.pid}{state}>"

    def __enter__(self) -> "Hub":
        self._check()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            self.close()
        except KeyboardInterrupt:
            # A second Ctrl-C while closing after the first: close() finished
            # anyway; one traceback (the first's) is enough.
            if not isinstance(exc, KeyboardInterrupt):
                raise

    # ---- identity -------------------------------------------------------

    @property
    def is_master(self) -> bool:
        return self._procs.is_master

    @property
    def is_worker(self) -> bool:
        return not self._procs.is_master

    @property
    def worker_id(self) -> Optional[int]:
        """This worker's id; None in the master."""
        return self._procs.worker_id

    @property
    def workers(self) -> dict[int, Worker]:
        """Live workers by id (master only; a snapshot)."""
        self._check_master("workers")
        return dict(self._procs.workers)

    @property
    def address(self) -> Optional[str]:
        """The address processes connect to (see :func:`clusterhub.connect`), or None."""
        return self._address

    @property
    def _master(self) -> Optional[Endpoint]:
        """A worker's channel to its master (None in the master)."""
        return self._procs.master

    # ---- processes ------------------------------------------------------

    def fork(self, target: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> Worker:
        """Start a worker process running ``target(*args, **kwargs)``.

        In the child this same hub becomes the worker side; when ``target``
        returns the worker exits with 0 (``SystemExit(n)``: n; an uncaught
        exception: its traceback on stderr and 1), after everything it sent
        has been written to the master.

        Python 3.12+ warns that forking a multi-threaded process may deadlock
        the child; for the hub's own threads it is safe, so this call silences
        that warning: nothing they hold is used in the child (see
        ``Processes.fork``).  Threads of your own are another matter: a lock
        one of them holds at the fork stays held in the child.
        """
        self._check_master("fork")
        if not callable(target):
            raise TypeError(f"target must be callable, not {type(target).__name__}")
        return self._procs.fork(target, args, kwargs, lambda on: forks.forking(self if on else None))

    def _abandon(self) -> None:
        """In a child forked by other code: this hub is inert there."""
        self._closed = True
        self._procs.abandon()
        self._dispatcher.abandon()
        self._locks.abandon()

    def on_exit(self, callback: E) -> E:
        """Call ``callback(worker)`` after each worker exits (its ``exitcode``
        set), in order with the messages it sent before.  Master only; usable
        as a decorator."""
        self._check_master("on_exit")
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._procs.exit_callbacks.append(callback)
        return callback

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for every worker to exit; True when all did.

        When it returns True, everything those workers sent (messages and
        requests) has been handled by this process's handlers, and the
        ``on_exit`` callbacks of their exits have run.  Called from a handler
        (or from the thread of the loop the hub is attached to), it cannot
        wait for the handlers, which run on that very thread: it then waits
        for the workers' exits only.
        """
        self._check_master("join")
        return self._procs.join(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the hub in this process and release its resources.

        In the master, remaining workers get SIGTERM, then SIGKILL after
        ``timeout`` seconds.  A handler still running then is given about a
        second more, then abandoned (logged).  Idempotent.  Raises LockError
        (and stays open) while a thread of this process holds or waits on one
        of its locks.
        """
        if self._closed:
            return
        check_timeout(timeout)  # before anything is stopped
        self._locks.retire()  # LockError while a thread holds or waits; else no new lock use
        procs = self._procs
        interrupted = procs.stop_workers(timeout)
        self._closed = True
        procs.stop_watching()
        try:
            finished = self._dispatcher.stop(_HANDLER_GRACE)
        except KeyboardInterrupt as e:  # (it cleaned up before letting it through)
            interrupted, finished = e, True
        if not finished:
            log.warning(
                "%r closed while a handler was still running %.1f s later: abandoned "
                "(it may go on, but no other handler will run)", self, _HANDLER_GRACE,
            )
        self._pending.fail_all(lambda: HubClosedError("the hub was closed"))
        procs.close()
        self._locks.close()
        _hubs.discard(self)
        if interrupted is not None:
            raise interrupted

    # ---- handlers -------------------------------------------------------

    @overload
    def on(self, name: str, handler: None = None) -> Callable[[H], H]: ...
    @overload
    def on(self, name: str, handler: H) -> H: ...

    def on(self, name: str, handler: Optional[H] = None) -> Any:
        """Register ``handler(data, sender)`` for messages named ``name``
        (usable as ``@hub.on(name)``).  Its return value answers a request."""
        self._check()
        protocol.encode_name(name)
        if handler is None:
            return lambda fn: self.on(name, fn)
        self._dispatcher.registry.add(name, handler)
        return handler

    @overload
    def once(self, name: str, handler: None = None) -> Callable[[H], H]: ...
    @overload
    def once(self, name: str, handler: H) -> H: ...

    def once(self, name: str, handler: Optional[H] = None) -> Any:
        """Like :meth:`on`, for one message only."""
        self._check()
        protocol.encode_name(name)
        if handler is None:
            return lambda fn: self.once(name, fn)
        self._dispatcher.registry.add(name, handler, once=True)
        return handler

    def off(self, name: str, handler: Optional[Handler] = None) -> None:
        """Remove ``handler`` for ``name``, or every handler of ``name``."""
        self._check()
        protocol.encode_name(name)
        if handler is not None and not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        self._dispatcher.registry.remove(name, handler)

    # ---- plain messages -------------------------------------------------

    # Every send_to_* takes timeout=: while the queue to a peer is over
    # max_queue a sender blocks, at most that long (SendTimeout, a
    # TimeoutError: nothing of the message went to that peer).

    def send_to_master(self, name: str, data: Any = None, *, timeout: Optional[float] = None) -> None:
        """Send a message to the master's handlers (in the master: to its own
        handlers, in call order, without serializing)."""
        if self._closed:
            self._check()
        if timeout is not None:
            check_timeout(timeout)
        procs = self._procs
        if procs.is_master:
            protocol.encode_name(name)
            self._dispatcher.post((name, data, None, None))
            return
        # (The one-way hot path: inline.)
        try:
            nb = _known_names[name]
        except (KeyError, TypeError):
            nb = protocol.encode_name(name)  # (checks it)
        body = self._dumps(data)
        ch = procs.master
        if ch is None:
            raise MasterDied("the master has died")
        if timeout is not None:
            post = functools.partial(ch.post_msg, _MSG, 0, 0, nb, len(nb), body, len(body))
            ch.post_timed(post, len(nb) + len(body), timeout)
            return
        queued = ch.post_msg(_MSG, 0, 0, nb, len(nb), body, len(body))
        if queued < 0 or queued > ch.max_queue:
            ch.post_backlog(queued, len(nb) + len(body))

    def send_to_worker(
        self, worker: WorkerRef, name: str, data: Any = None, *, timeout: Optional[float] = None
    ) -> None:
        """Send a message to one worker (master only)."""
        self._check_master("send_to_worker")
        if timeout is not None:
            check_timeout(timeout)
        w = self._procs.worker(worker)
        nb = protocol.encode_name(name)
        body = self._dumps(data)
        ch = w.channel
        assert ch is not None  # (checked by worker())
        if timeout is None:
            ch.post_parts(_MSG, 0, nb, body)
        else:
            post = functools.partial(ch.post_msg, _MSG, 0, 0, nb, len(nb), body, len(body))
            ch.post_timed(post, len(nb) + len(body), timeout, w)

    def send_to_workers(self, name: str, data: Any = None, *, timeout: Optional[float] = None) -> None:
        """Broadcast: from the master to every live worker; from a worker to
        every other live worker (relayed by the master, whose own handlers
        are not called; receivers see the originating worker as sender).

        With ``timeout``, a worker whose queue stays full that long does not
        get the message: SendTimeout then names them in ``unreached``.
        """
        self._check()
        if timeout is not None:
            check_timeout(timeout)
        procs = self._procs
        if not procs.is_master:
            nb = protocol.encode_name(name)
            body = self._dumps(data)
            ch = procs.master_channel()
            origin = procs.worker_id or 0
            if timeout is None:
                ch.post_parts(_BCAST, origin, nb, body)
            else:
                post = functools.partial(ch.post_msg, _BCAST, origin, 0, nb, len(nb), body, len(body))
                ch.post_timed(post, len(nb) + len(body), timeout)
            return
        self._procs.broadcast(self._encode(name, data), timeout)

    def send_to_random_worker(
        self, name: str, data: Any = None, *, timeout: Optional[float] = None
    ) -> Optional[Worker]:
        """Send to one live worker chosen at random; that worker, or None when
        there is none (master only)."""
        self._check_master("send_to_random_worker")
        if timeout is not None:
            check_timeout(timeout)
        return self._procs.send_random(self._encode(name, data), timeout)

    def _encode(self, name: str, data: Any) -> bytes:
        """A whole message frame from the master (broadcasts, random picks)."""
        nb = protocol.encode_name(name)
        return protocol.encode(_MSG, 0, 0, nb, self._dumps(data))

    # ---- requests -------------------------------------------------------
    # (The request hot path, worker -> master -> worker, is request_master,
    # Pending.send, and the result() hook channel.wait_reply: a Python call costs.)

    def request_master(
        self, name: str, data: Any = None, *,
        timeout: Optional[float] = None, callback: Optional[Callback] = None,
    ) -> Future[Any]:
        """Ask the master's handlers; a Future of the first handler's result."""
        if self._closed:
            self._check()
        procs = self._procs
        if procs.is_master:
            return self._pending.local(name, data, timeout, callback)
        return self._pending.send(procs.master, procs.worker_id or 0, name, self._dumps(data), timeout, callback)

    def request_worker(
        self, worker: WorkerRef, name: str, data: Any = None, *,
        timeout: Optional[float] = None, callback: Optional[Callback] = None,
    ) -> Future[Any]:
        """Ask one worker's handlers (master only)."""
        self._check_master("request_worker")
        w = self._procs.worker(worker)
        return self._pending.send(w.channel, 0, name, self._dumps(data), timeout, callback)

    def request_random_worker(
        self, name: str, data: Any = None, *,
        timeout: Optional[float] = None, callback: Optional[Callback] = None,
    ) -> Future[Any]:
        """Ask one live worker chosen at random; with none the Future fails
        with NoWorkersError (master only)."""
        self._check_master("request_random_worker")
        body = self._dumps(data)
        live = [w for w in self._procs.workers.values() if w.channel and not w.channel.closed]
        if not live:
            return self._pending.failed(NoWorkersError("no live worker"), callback)
        return self._pending.send(random.choice(live).channel, 0, name, body, timeout, callback)

    def request_workers(
        self, name: str, data: Any = None, *,
        timeout: Optional[float] = None, callback: Optional[Callback] = None,
    ) -> Future[dict[int, Any]]:
        """Ask every live worker; a Future of ``{worker id: result or the
        exception its request ended with}`` (master only)."""
        self._check_master("request_workers")
        body = self._dumps(data)
        protocol.encode_name(name)
        check_timeout(timeout)
        if callback is not None:
            check_callback(callback)
        parts: list[tuple[int, Future[Any]]] = []
        for w in sorted(self._procs.workers.values(), key=lambda w: w.id):
            try:
                sub = self._pending.send(w.channel, 0, name, body, timeout, None)
            except WorkerDied as e:
                sub = self._pending.failed(e, None)
            parts.append((w.id, sub))
        return gather(parts, self._pending.failed(None, callback))

    # ---- asyncio --------------------------------------------------------

    def attach(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        """Dispatch incoming messages on ``loop`` (default: the running loop);
        ``async def`` handlers are awaited there."""
        self._check()
        if loop is None:
            loop = asyncio.get_running_loop()
        elif not isinstance(loop, asyncio.AbstractEventLoop):
            raise TypeError(f"loop must be an asyncio event loop, not {type(loop).__name__}")
        self._dispatcher.attach(loop)

    def detach(self) -> None:
        """Dispatch on the hub's own thread again."""
        self._check()
        self._dispatcher.detach()
        self._procs.detached()

    # ---- locks ----------------------------------------------------------

    def lock(self, key: Union[str, bytes], timeout: Optional[float] = None) -> Lock:
        """A handle on the global lock named ``key`` (see :class:`Lock`)."""
        self._check()
        return self._locks.lock(key, timeout)

    def held_locks(self) -> list[HeldLock]:
        """Every key held right now, with its holder's pid and worker id."""
        self._check()
        return [HeldLock(*t) for t in self._locks.held()]

    # ---- checks ---------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise HubClosedError("this hub is closed (or was inherited through a fork)")

    def _check_master(self, what: str) -> None:
        self._check()
        if not self._procs.is_master:
            raise NotMasterError(f"{what} is for the master only")
