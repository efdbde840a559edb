"""The Hub: the one object users touch, tying workers, messages, requests and
locks together.  The same object is the master side in the master and, after
``fork()``, the worker side in the child."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import random
import select
import signal
import threading
import time
import traceback
import warnings
import weakref
from concurrent.futures import InvalidStateError
from numbers import Real
from typing import Any, Callable, NamedTuple, Optional, ParamSpec, TypeVar, Union, overload

from . import _bindings, process, protocol, sched
from ._bindings import PeerGone
from .channel import Channel
from .dispatch import Dispatcher, _NoHandler
from .errors import (
    HubClosedError,
    HubError,
    MasterDied,
    MessageTooLarge,
    NoHandlerError,
    NotMasterError,
    NoWorkersError,
    PeerDied,
    RemoteError,
    SendTimeout,
    WorkerDied,
)
from .locks import Lock, Locks
from .process import ExitWatcher, Worker, exit_process, reap, run_target
from .process import flush_stdio as _flush_stdio
from .requests import Callback, Future, Pending, add_callback, resolve, run_callbacks

log = logging.getLogger("clusterhub")

# A message handler: handler(data, sender), sender None when from the master.
Handler = Callable[[Any, Optional[Worker]], Any]
H = TypeVar("H", bound=Handler)
P = ParamSpec("P")
E = TypeVar("E", bound=Callable[[Worker], Any])  # an on_exit callback
WorkerRef = Union[Worker, int]

DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
DEFAULT_MAX_QUEUE = 8 * 1024 * 1024
DEFAULT_LOCK_SLOTS = 1024

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
# A channel's registration is level-triggered and EPOLLEXCLUSIVE (see
# Channel.lep): no epoll_ctl per message or per request.
_EXCLUSIVE = select.EPOLLEXCLUSIVE
_INPUT = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_GONE = select.EPOLLHUP | select.EPOLLERR
_PROTOCOL_ERRORS = (_bindings.MALFORMED, _bindings.TOOBIG)
_unpack_envelope = protocol.HEADER.unpack_from
_ENVELOPE = protocol.HEADER.size
_MSG, _REQ, _RES, _ERR, _BCAST = protocol.MSG, protocol.REQ, protocol.RES, protocol.ERR, protocol.BCAST
_EOF = _bindings.EOF
_unpack, _buffer = _bindings.ffi.unpack, _bindings.ffi.buffer
_decode_messages = _bindings.decode_messages
_known_names = protocol.known_names
_FUTURE_DONE = frozenset(("FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED"))

# How long close() lets a running handler finish before abandoning it.
_HANDLER_GRACE = 1.0

# Every hub of this process, so a fork by other code can neutralise them.
_hubs: "weakref.WeakSet[Hub]" = weakref.WeakSet()
_hub_serial = itertools.count(1)  # (with the master's pid: a hub's key)
_forking: Optional["Hub"] = None  # the hub whose fork() is in progress
# One hub fork at a time in this process: _forking is global, and a fork by
# one thread must not inherit the fresh socketpair of another thread's fork.
_fork_lock = threading.Lock()


class HeldLock(NamedTuple):
    """One entry of ``Hub.held_locks()``."""

    key: bytes
    pid: int
    worker_id: Optional[int]


def _after_fork_in_child() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()  # held by the forking thread, maybe: a worker may fork too
    sched.forget()
    for hub in list(_hubs):
        if hub is not _forking:
            hub._abandon()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _resolve_worker(key: Any, wid: int) -> Optional[Worker]:
    """An unpickled Worker reference: this process's Worker for ``wid`` in
    the hub with ``key`` (see Worker.__reduce__)."""
    for hub in list(_hubs):
        if hub._key == key and not hub._closed:
            if not hub._is_master:
                return hub._peer(wid)
            w = hub._known.get(wid)
            if w is None and 1 <= wid < hub._next_id:
                w = Worker(wid, hub_key=key)  # long gone: a handle that says so
                w.set_exited(None)
            return w
    return None


process.resolve_worker = _resolve_worker


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
    :param batch_dispatcher: run the hub's dispatcher threads (one per
        process) under Linux's ``SCHED_BATCH`` policy when they would run
        under the ordinary one, so that a message's arrival does not preempt
        its sender (a requester then waits for its reply before the reply
        comes, which saves a thread hand-off per request).  False keeps the
        creating thread's policy: handlers then preempt CPU-bound threads as
        soon as a message arrives.
    """

    def __init__(
        self,
        *,
        serializer: Union[str, protocol.Serializer] = "pickle",
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        lock_slots: int = DEFAULT_LOCK_SLOTS,
        exit_on_master_death: bool = True,
        batch_dispatcher: bool = True,
    ) -> None:
        _check_int("max_message_size", max_message_size, 1, _bindings.FRAME_MAX_LIMIT)
        _check_int("max_queue", max_queue, 0, None)
        _check_int("lock_slots", lock_slots, 1, None)
        self._dumps, self._loads = protocol.serializer_functions(serializer)
        self._max_message_size = max_message_size
        self._max_queue = max_queue
        if not isinstance(exit_on_master_death, bool):
            raise TypeError("exit_on_master_death must be True or False")
        self._exit_on_master_death = exit_on_master_death
        if not isinstance(batch_dispatcher, bool):
            raise TypeError("batch_dispatcher must be True or False")
        self._pid = os.getpid()
        self._is_master = True
        self._worker_id: Optional[int] = None
        self._closed = False
        self._state_lock = threading.Lock()
        # Shared by the master and its workers: Worker pickles name it.
        self._key = (self._pid, next(_hub_serial))
        self._workers: dict[int, Worker] = {}  # live (the kernel has not reported an exit)
        self._unsettled: dict[int, Worker] = {}  # forked, on_exit callbacks not yet run
        # Every Worker handed out, while referenced: a pickled one comes back as itself.
        self._known: "weakref.WeakValueDictionary[int, Worker]" = weakref.WeakValueDictionary()
        self._next_id = 1
        self._exit_callbacks: list[Callable[[Worker], Any]] = []
        self._master: Optional[Channel] = None
        self._master_gone = threading.Event()  # worker: the dispatcher saw the master go
        self._peer_stubs: dict[int, Worker] = {}
        self._pending = Pending()
        self._future_hook = self._wait_future  # bound once: made per request otherwise
        self._locks = Locks(lock_slots)
        self._dispatcher = Dispatcher(f"master-{self._pid}", batch_dispatcher)
        self._dispatcher.start()
        self._exits = ExitWatcher(f"clusterhub-master-{self._pid}-exits", self._on_worker_exit)
        _hubs.add(self)

    def __repr__(self) -> str:
        role = "master" if self._is_master else f"worker {self._worker_id}"
        state = " closed" if self._closed else ""
        return f"<clusterhub.Hub {role} pid={self._pid}{state}>"

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
        return self._is_master

    @property
    def is_worker(self) -> bool:
        return not self._is_master

    @property
    def worker_id(self) -> Optional[int]:
        """This worker's id; None in the master."""
        return self._worker_id

    @property
    def workers(self) -> dict[int, Worker]:
        """Live workers by id (master only; a snapshot)."""
        self._check_master("workers")
        return dict(self._workers)

    # ---- processes ------------------------------------------------------

    def fork(self, target: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> Worker:
        """Start a worker process running ``target(*args, **kwargs)``.

        In the child this same hub becomes the worker side; when ``target``
        returns the worker exits with 0 (``SystemExit(n)``: n; an uncaught
        exception: its traceback on stderr and 1), after everything it sent
        has been written to the master.

        The master has threads of the hub's own, and Python 3.12+ warns that
        forking a multi-threaded process may deadlock the child; this call
        silences that warning because, for the hub, it is safe: nothing those
        threads hold is used in the child.  There the dispatcher (its thread,
        epoll, inbox, timers and locks) is made anew, the other workers'
        channels and pidfds are closed without touching their buffers, the C
        send queues take their mutex around the fork (``pthread_atfork``),
        the lock table re-reads the child's identity, and concurrent hub forks
        are serialized.  Threads of your own are another matter: a lock one of
        them holds at the fork stays held in the child.
        """
        global _forking
        self._check_master("fork")
        if not callable(target):
            raise TypeError(f"target must be callable, not {type(target).__name__}")
        _flush_stdio()  # or the child inherits, and prints again, unflushed output
        # (The exit watcher's lock: a child closes the pidfds it sees.)
        with _fork_lock, self._state_lock, self._exits.lock:
            mfd, wfd = _bindings.socketpair()
            wid = self._next_id
            self._next_id += 1
            _forking = self
            batched = sched.is_batched()  # (forking from a handler: see sched.py)
            try:
                with warnings.catch_warnings():
                    # 3.12+ warns about fork() with threads; ours hold no lock the child needs.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    pid = os.fork()
            finally:
                _forking = None
            if pid == 0:
                try:
                    if batched:
                        sched.reset()
                    self._run_worker(wid, mfd, wfd, target, args, kwargs)  # never returns...
                finally:
                    os._exit(1)  # ...even if a second Ctrl-C hits its exit path
            os.close(wfd)
            w = Worker(wid, pid, self._wait_event, self._key)
            w.channel = Channel(mfd, w, self._max_message_size, self._max_queue)
            _bindings.start_writer()  # (a first burst need not wait for its creation)
            self._workers[wid] = w
            self._unsettled[wid] = w
            self._known[wid] = w
            self._exits.watch(w, os.pidfd_open(pid))
        self._dispatcher.call_soon(lambda: self._watch_worker(w))
        return w

    def _run_worker(
        self, wid: int, mfd: int, wfd: int, target: Callable[..., Any],
        args: tuple[Any, ...], kwargs: dict[str, Any],
    ) -> None:
        code = 1
        try:
            self._become_worker(wid, mfd, wfd)
            code = run_target(target, args, kwargs)
            self._flush_master()
        except KeyboardInterrupt:
            code = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
        finally:
            exit_process(code)

    def _become_worker(self, wid: int, mfd: int, wfd: int) -> None:
        master_pid = self._pid  # still the parent's
        os.close(mfd)
        for w in self._workers.values():
            if w.channel is not None:
                w.channel.abandon()  # or a sibling would keep the master's end open
        self._exits.abandon()
        self._workers = {}
        self._unsettled = {}
        self._known = weakref.WeakValueDictionary()
        self._exit_callbacks = []
        self._is_master = False
        self._worker_id = wid
        self._pid = os.getpid()
        self._state_lock = threading.Lock()
        self._pending = Pending()
        self._locks.after_fork_child(wid)
        ch = Channel(wfd, None, self._max_message_size, self._max_queue)
        _bindings.start_writer()
        self._master = ch
        self._master_gone = threading.Event()
        d = self._dispatcher
        d.reinit_after_fork(f"worker-{wid}")
        d.set_callback(ch.fd, functools.partial(self._on_channel, ch))
        self._arm(ch)
        d.start()
        if self._exit_on_master_death:
            self._watch_master(master_pid)

    def _watch_master(self, master_pid: int) -> None:
        """exit_on_master_death must hold while a handler keeps the dispatcher
        busy: a thread waits for the master to exit and, unless the dispatcher
        dealt with it within a grace period (it reads the replies already
        sent), fails the pending requests and exits itself.  It waits on the
        master's pidfd, not on the socket: a socket wakes every poller on
        every incoming frame."""
        try:
            pidfd: Optional[int] = os.pidfd_open(master_pid)
        except ProcessLookupError:
            pidfd = None  # gone already

        def watch() -> None:
            if pidfd is not None:
                select.select([pidfd], [], [])
            if self._master_gone.wait(0.5) or self._closed:
                return
            self._pending.fail_all(lambda: MasterDied("the master has died"))
            exit_process(1)

        threading.Thread(target=watch, name=f"clusterhub-worker-{self._worker_id}-watch",
                         daemon=True).start()

    def _flush_master(self) -> None:
        """Block until everything sent to the master is written (or it died)."""
        ch = self._master
        if ch is None or ch.closed:
            return
        try:
            ch.wait_room(0)
        except PeerGone:
            pass

    def _abandon(self) -> None:
        """In a child forked by other code: this hub is inert there."""
        self._closed = True
        for w in self._workers.values():
            if w.channel is not None:
                w.channel.abandon()
        self._exits.abandon()
        if self._master is not None:
            self._master.abandon()
        self._dispatcher.abandon()
        self._locks.abandon()

    def on_exit(self, callback: E) -> E:
        """Call ``callback(worker)`` after each worker exits (its ``exitcode``
        set), in order with the messages it sent before.  Master only; usable
        as a decorator."""
        self._check_master("on_exit")
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._exit_callbacks.append(callback)
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
        d = self._dispatcher
        me = threading.get_ident()
        exits_only = me == d.ident or me == d.handler_ident
        deadline = None if timeout is None else time.monotonic() + timeout
        for w in list(self._unsettled.values()):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not (w.join(left) if exits_only else w.settled.wait(left)):
                return False
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the hub in this process and release its resources.

        In the master, remaining workers get SIGTERM, then SIGKILL after
        ``timeout`` seconds.  Idempotent.  Raises LockError (and stays open)
        while a thread of this process holds or waits on one of its locks.
        """
        if self._closed:
            return
        _check_timeout(timeout)  # before anything is stopped
        self._locks.retire()  # LockError while a thread holds or waits; else no new lock use
        interrupted: Optional[BaseException] = None
        workers = list(self._workers.values())
        try:
            if self._is_master:
                for w in workers:
                    w.terminate()
                deadline = time.monotonic() + timeout
                for w in workers:
                    if not w.join(max(0.0, deadline - time.monotonic())):
                        w.kill()
                for w in workers:
                    w.join(5.0)
            else:
                self._flush_master()
        except KeyboardInterrupt as e:  # a second Ctrl-C: finish at once
            interrupted = e
            for w in workers:
                w.kill()
        self._closed = True
        self._exits.stop()  # (quick: it runs no user code)
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
        for w in workers:
            if w.channel is not None:
                w.channel.close()
        for w in list(self._unsettled.values()):
            w.settled.set()  # (a thread waiting in join() gives up on the handlers)
        if self._master is not None:
            self._master.close()
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
            _check_timeout(timeout)
        if self._is_master:
            protocol.encode_name(name)
            self._dispatcher.post((name, data, None, None))
            return
        # (The one-way hot path: inline.)
        try:
            nb = _known_names[name]
        except (KeyError, TypeError):
            nb = protocol.encode_name(name)  # (checks it)
        body = self._dumps(data)
        ch = self._master
        if ch is None:
            raise MasterDied("the master has died")
        if timeout is not None:
            post = functools.partial(ch.post_msg, _MSG, 0, 0, nb, len(nb), body, len(body))
            self._post_timed(ch, post, len(nb) + len(body), timeout)
            return
        queued = ch.post_msg(_MSG, 0, 0, nb, len(nb), body, len(body))
        if queued < 0 or queued > ch.max_queue:
            self._post_backlog(ch, queued, len(nb) + len(body))

    def send_to_worker(
        self, worker: WorkerRef, name: str, data: Any = None, *, timeout: Optional[float] = None
    ) -> None:
        """Send a message to one worker (master only)."""
        self._check_master("send_to_worker")
        if timeout is not None:
            _check_timeout(timeout)
        w = self._worker(worker)
        nb = protocol.encode_name(name)
        body = self._dumps(data)
        ch = w.channel
        if timeout is None:
            self._post_msg(ch, protocol.MSG, 0, nb, body)
            return
        assert ch is not None  # (_worker checked)
        post = functools.partial(ch.post_msg, protocol.MSG, 0, 0, nb, len(nb), body, len(body))
        self._post_timed(ch, post, len(nb) + len(body), timeout, w)

    def send_to_workers(self, name: str, data: Any = None, *, timeout: Optional[float] = None) -> None:
        """Broadcast: from the master to every live worker; from a worker to
        every other live worker (relayed by the master, whose own handlers
        are not called; receivers see the originating worker as sender).

        With ``timeout``, a worker whose queue stays full that long does not
        get the message: SendTimeout then names them in ``unreached``.
        """
        self._check()
        if timeout is not None:
            _check_timeout(timeout)
        if not self._is_master:
            nb = protocol.encode_name(name)
            body = self._dumps(data)
            ch = self._master_channel()
            assert ch is not None  # (checked)
            if timeout is None:
                self._post_msg(ch, protocol.BCAST, self._worker_id or 0, nb, body)
            else:
                post = functools.partial(ch.post_msg, protocol.BCAST, self._worker_id or 0, 0,
                                         nb, len(nb), body, len(body))
                self._post_timed(ch, post, len(nb) + len(body), timeout)
            return
        payload = self._encode(protocol.MSG, 0, name, data)
        n = len(payload)
        full: list[Worker] = []  # (with a timeout: waited for after the others got it)
        for w in list(self._workers.values()):
            ch = w.channel
            if ch is None:
                continue
            if timeout is not None and ch.pending() > ch.max_queue:
                full.append(w)
                continue
            queued = ch.post(payload, n, ch.max_len)
            if queued < 0 or (timeout is None and queued > ch.max_queue):
                try:
                    self._post_backlog(ch, queued, n - _bindings.MSG_HEADER)
                except WorkerDied:
                    pass  # it is exiting; on_exit will report it
        if not full:
            return
        assert timeout is not None
        deadline = time.monotonic() + timeout
        unreached = []
        for w in full:
            ch = w.channel
            assert ch is not None
            try:
                post = functools.partial(ch.post, payload, n, ch.max_len)
                if not self._post_by(ch, post, n - _bindings.MSG_HEADER, deadline):
                    unreached.append(w)
            except WorkerDied:
                pass
        if unreached:
            ids = ", ".join(str(w.id) for w in unreached)
            raise SendTimeout(
                f"broadcast not sent to worker(s) {ids}: their queue stayed full for {timeout} s",
                unreached,
            )

    def send_to_random_worker(
        self, name: str, data: Any = None, *, timeout: Optional[float] = None
    ) -> Optional[Worker]:
        """Send to one live worker chosen at random; that worker, or None when
        there is none (master only)."""
        self._check_master("send_to_random_worker")
        if timeout is not None:
            _check_timeout(timeout)
        payload = self._encode(protocol.MSG, 0, name, data)
        candidates = list(self._workers.values())
        random.shuffle(candidates)
        for w in candidates:
            try:
                if timeout is None:
                    self._post(w.channel, payload)
                else:
                    ch = w.channel
                    assert ch is not None
                    post = functools.partial(ch.post, payload, len(payload), ch.max_len)
                    self._post_timed(ch, post, len(payload) - _bindings.MSG_HEADER, timeout, w)
                return w
            except WorkerDied:
                continue
        return None

    # ---- requests -------------------------------------------------------

    def request_master(
        self, name: str, data: Any = None, *,
        timeout: Optional[float] = None, callback: Optional[Callback] = None,
    ) -> Future[Any]:
        """Ask the master's handlers; a Future of the first handler's result."""
        if self._closed:
            self._check()
        if self._is_master:
            return self._request_local(name, data, timeout, callback)
        return self._request(self._master, name, self._dumps(data), timeout, callback)

    # (The request hot path, worker -> master -> worker, is request_master,
    # _request, and the result() hook _wait_future: a Python call costs.)

    def request_worker(
        self, worker: WorkerRef, name: str, data: Any = None, *,
        timeout: Optional[float] = None, callback: Optional[Callback] = None,
    ) -> Future[Any]:
        """Ask one worker's handlers (master only)."""
        self._check_master("request_worker")
        w = self._worker(worker)
        return self._request(w.channel, name, self._dumps(data), timeout, callback)

    def request_random_worker(
        self, name: str, data: Any = None, *,
        timeout: Optional[float] = None, callback: Optional[Callback] = None,
    ) -> Future[Any]:
        """Ask one live worker chosen at random; with none the Future fails
        with NoWorkersError (master only)."""
        self._check_master("request_random_worker")
        body = self._dumps(data)
        live = [w for w in self._workers.values() if w.channel and not w.channel.closed]
        if not live:
            return self._failed(NoWorkersError("no live worker"), callback)
        return self._request(random.choice(live).channel, name, body, timeout, callback)

    def request_workers(
        self, name: str, data: Any = None, *,
        timeout: Optional[float] = None, callback: Optional[Callback] = None,
    ) -> Future[dict[int, Any]]:
        """Ask every live worker; a Future of ``{worker id: result or the
        exception its request ended with}`` (master only)."""
        self._check_master("request_workers")
        body = self._dumps(data)
        protocol.encode_name(name)
        _check_timeout(timeout)
        live = sorted(self._workers.values(), key=lambda w: w.id)
        agg: Future[dict[int, Any]] = self._new_future()
        if callback is not None:
            _check_callback(callback)
            add_callback(agg, callback)
        results: dict[int, Any] = {}
        left = [len(live)]
        lock = threading.Lock()
        subs: list[Future[Any]] = []

        def collect(wid: int, f: Future[Any]) -> None:
            if f.cancelled():
                return
            err = f.exception()
            with lock:
                results[wid] = err if err is not None else f.result()
                left[0] -= 1
                done = left[0] == 0
            if done:
                resolve(agg, True, {w.id: results[w.id] for w in live})

        for w in live:
            try:
                sub = self._request(w.channel, name, body, timeout, None)
            except WorkerDied as e:
                sub = self._failed(e, None)
            subs.append(sub)
            sub.add_done_callback(functools.partial(collect, w.id))
        if not live:
            resolve(agg, True, {})
        agg.add_done_callback(lambda f: [s.cancel() for s in subs] if f.cancelled() else None)
        return agg

    def _new_future(self) -> Future[Any]:
        return Future(self._future_hook)

    def _failed(self, exc: BaseException, callback: Optional[Callback]) -> Future[Any]:
        fut = self._new_future()
        if callback is not None:
            _check_callback(callback)
            add_callback(fut, callback)
        fut.set_exception(exc)
        return fut

    def _request(
        self, ch: Optional[Channel], name: str, body: bytes,
        timeout: Optional[float], callback: Optional[Callback],
    ) -> Future[Any]:
        if timeout is None and callback is None:  # (the common case, inline)
            try:
                nb = _known_names[name]
            except (KeyError, TypeError):
                nb = protocol.encode_name(name)  # (checks it)
            fut: Future[Any] = Future(self._future_hook, ch)
            rid = self._pending.add(fut)
        else:
            nb, fut, rid = self._pending_request(ch, name, timeout, callback)
        if ch is None:  # a worker whose master is gone
            self._pending.fail(rid, MasterDied("the master has died"))
            return fut
        left = ch.send_request(protocol.REQ, self._worker_id or 0, rid, nb, len(nb), body, len(body))
        if left:
            try:
                self._sent_part(ch, left, True, len(nb) + len(body))
            except PeerDied as e:
                self._pending.fail(rid, e)
            except BaseException:
                self._pending.discard(rid)
                raise
        return fut

    def _request_local(
        self, name: str, data: Any, timeout: Optional[float], callback: Optional[Callback]
    ) -> Future[Any]:
        _nb, fut, rid = self._pending_request(None, name, timeout, callback, local=True)

        def reply(ok: bool, value: Any) -> None:
            self._pending.complete(None, rid, ok, value if ok else _as_remote_error(value))

        self._dispatcher.post((name, data, None, reply))
        return fut

    def _pending_request(
        self, ch: Optional[Channel], name: str, timeout: Optional[float],
        callback: Optional[Callback], local: bool = False,
    ) -> tuple[bytes, Future[Any], int]:
        """Check a request's arguments, then register its future (with its
        callback and timeout): (wire name, future, request id)."""
        nb = protocol.encode_name(name)
        if timeout is not None:
            _check_timeout(timeout)
        if callback is not None:
            _check_callback(callback)
        fut: Future[Any] = Future(self._future_hook, ch)
        if local:
            fut._local = True
        rid = self._pending.add(fut)
        if callback is not None:
            add_callback(fut, callback)
        if timeout is not None:
            self._arm_timeout(fut, rid, timeout)
        return nb, fut, rid

    def _arm_timeout(self, fut: Future[Any], rid: int, timeout: float) -> None:
        timer = self._dispatcher.call_later(
            timeout,
            lambda: self._pending.fail(rid, TimeoutError(f"no reply within {timeout} s")),
        )
        fut.add_done_callback(lambda _f: timer.cancel())

    def _wait_future(self, fut: Future[Any], timeout: Optional[float]) -> Optional[float]:
        """Future.result()'s hook, before it waits: returns the timeout left.

        On the dispatcher thread, serve the sockets while waiting.  Elsewhere,
        when nobody reads the reply's channel, read it here (no hand-off from
        the dispatcher thread).  Refuse a wait that could never end.
        """
        d = self._dispatcher
        me = threading.get_ident()
        if fut._local and me == d.handler_ident:
            raise HubError(
                "waiting here for a request to this process's own handlers would "
                "never end: they run on this very thread (use a callback or await)"
            )
        if me == d.ident:
            # Its reply may be read by a requester leading the channel: be woken then.
            fut.add_done_callback(lambda _f: d.wake())
            d.pump_until(fut.done, timeout)
            return 0 if timeout is not None else None
        ch = fut._channel
        if ch is None or ch.closed:
            return timeout
        # Lead: read ``ch`` in this thread until ``fut`` is done (leader/follower).
        reader = ch.reader
        if not reader.acquire(False):
            return timeout  # someone reads it already: they complete fut
        deadline = None if timeout is None else time.monotonic() + timeout
        done: list[Future[Any]] = []
        more = False
        try:
            if ch.closed or ch.dying or ch.blockers:
                return timeout  # held back: the dispatcher reads it once released
            ch.leader = me
            poll = ch.lep.poll
            fd = ch.fd
            # Frames buffered in rx (left by the reader before us, whose
            # revisit finds us holding the channel): no poll announces them.
            more = ch.rx.eof() != _EOF
            while fut._state not in _FUTURE_DONE and not (ch.closed or ch.dying or ch.blockers):
                if more:
                    ready = [(fd, 0)]
                elif deadline is None:
                    ready = poll(-1, 2)  # (the socket and the wake fd)
                else:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    ready = poll(left, 2)
                more = False
                for rfd, _ev in ready:
                    if rfd == fd:
                        more = self._read(ch, 1, done)
                    else:
                        os.eventfd_read(rfd)
                if done and fut._state not in _FUTURE_DONE:
                    # Others' replies: their callbacks run on the dispatcher.
                    d.call_soon(functools.partial(run_callbacks, done))
                    done = []
                if d.inbox:
                    # Messages for the handlers: the dispatcher may have gone
                    # back to sleep on an inbox it found empty (comparing
                    # lengths misses a drain racing with our appends).
                    d.wake()
        finally:
            ch.leader = None
            if ch.closed:
                ch.release_reader()
            else:
                reader.release()
            # The dispatcher may have stopped watching the channel while we
            # held it (checked after letting go: see _on_channel).
            if ch.disarmed or ch.arming.locked():
                with ch.arming:
                    ch.disarmed = False
                    self._arm_locked(ch)
            if more:  # left buffered: the dispatcher takes them
                d.call_next(lambda: self._on_channel(ch, _IN))
            for f in done:  # even when interrupted (Ctrl-C): these futures ended
                if f._done_callbacks:
                    f._invoke_callbacks()
        if deadline is None:
            return None
        return max(0.0, deadline - time.monotonic())

    def _wait_event(self, ev: threading.Event, timeout: Optional[float]) -> bool:
        if self._dispatcher.on_thread:
            self._dispatcher.pump_until(ev.is_set, timeout)
            return ev.is_set()
        return ev.wait(timeout)

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

    # ---- locks ----------------------------------------------------------

    def lock(self, key: Union[str, bytes], timeout: Optional[float] = None) -> Lock:
        """A handle on the global lock named ``key`` (see :class:`Lock`)."""
        self._check()
        return self._locks.lock(key, timeout)

    def held_locks(self) -> list[HeldLock]:
        """Every key held right now, with its holder's pid and worker id."""
        self._check()
        return [HeldLock(*t) for t in self._locks.held()]

    # ---- sending --------------------------------------------------------

    def _encode(self, kind: int, origin: int, name: str, data: Any) -> bytes:
        nb = protocol.encode_name(name)
        return protocol.encode(kind, origin, 0, nb, self._dumps(data))

    def _send_msg(
        self, ch: Optional[Channel], kind: int, origin: int, rid: int, nb: bytes, body: bytes,
        wait: bool = True,
    ) -> None:
        """Like ``_send``, for a message built in C from its parts."""
        if ch is None:
            raise MasterDied("the master has died")
        left = ch.send_msg(kind, origin, rid, nb, len(nb), body, len(body))
        if left:
            self._sent_part(ch, left, wait, len(nb) + len(body))

    # One-way messages are posted: coalesced in bursts by the C writer thread,
    # which then owns the queued bytes (so the dispatcher does not watch
    # for room on their behalf); a sender only waits while over max_queue.

    def _post_msg(
        self, ch: Optional[Channel], kind: int, origin: int, nb: bytes, body: bytes
    ) -> None:
        if ch is None:
            raise MasterDied("the master has died")
        queued = ch.post_msg(kind, origin, 0, nb, len(nb), body, len(body))
        if queued < 0 or queued > ch.max_queue:
            self._post_backlog(ch, queued, len(nb) + len(body))

    def _post(self, ch: Optional[Channel], payload: bytes) -> None:
        if ch is None:
            raise MasterDied("the master has died")
        queued = ch.post(payload, len(payload), ch.max_len)
        if queued < 0 or queued > ch.max_queue:
            self._post_backlog(ch, queued, len(payload) - _bindings.MSG_HEADER)

    def _post_timed(
        self, ch: Channel, post: Callable[[], int], size: int, timeout: float,
        worker: Optional[Worker] = None,
    ) -> None:
        """Queue a frame with ``post()`` (see ``_post_by``), or raise
        SendTimeout if the queue to ``ch`` stays full for ``timeout`` s."""
        if not self._post_by(ch, post, size, time.monotonic() + timeout):
            peer = "the master" if worker is None else f"worker {worker.id}"
            raise SendTimeout(f"the queue to {peer} stayed full for {timeout} s: not sent",
                              [] if worker is None else [worker])

    def _post_by(self, ch: Channel, post: Callable[[], int], size: int, deadline: float) -> bool:
        """Wait until the queue to ``ch`` is at most max_queue, then queue a
        frame with ``post()`` (a ``ch.post*`` call: bytes queued, or an error
        code).  False, with nothing queued, when ``deadline`` came first."""
        try:
            if ch.pending() > ch.max_queue and not self._wait_room(ch, deadline):
                return False
            queued = post()
            if queued < 0:
                raise ch.send_error(queued, _bindings.MSG_HEADER + size)
        except PeerGone:
            raise self._died(ch) from None
        return True

    def _post_backlog(self, ch: Channel, queued: int, size: int) -> None:
        try:
            if queued < 0:
                raise ch.send_error(queued, _bindings.MSG_HEADER + size)
            self._wait_room(ch)
        except PeerGone:
            raise self._died(ch) from None

    def _sent_part(self, ch: Channel, left: int, wait: bool, size: int) -> None:
        """After a ``send_msg`` that did not write everything: raise its
        error, or deal with the bytes it left queued."""
        try:
            if left < 0:
                raise ch.send_error(left, _bindings.MSG_HEADER + size)
            self._backlog(ch, left, wait)
        except PeerGone:
            raise self._died(ch) from None

    def _master_channel(self, check: bool = True) -> Optional[Channel]:
        ch = self._master
        if ch is None or ch.closed:
            if check:
                raise MasterDied("the master has died")
            return None
        return ch

    def _worker(self, worker: WorkerRef) -> Worker:
        if isinstance(worker, Worker):
            if worker.hub_key != self._key or not 1 <= worker.id < self._next_id:
                raise ValueError(f"{worker!r} is not a worker of this hub")
            w = self._workers.get(worker.id)  # (the live one, if a copy came by pickle)
            if w is None:
                raise WorkerDied(f"worker {worker.id} has exited")
        elif isinstance(worker, int) and not isinstance(worker, bool):
            w = self._workers.get(worker)
            if w is None:
                if 1 <= worker < self._next_id:
                    raise WorkerDied(f"worker {worker} has exited")
                raise ValueError(f"no worker {worker} in this hub")
        else:
            raise TypeError(f"worker must be a Worker or an int id, not {type(worker).__name__}")
        if w.channel is None or w.channel.closed:
            raise WorkerDied(f"worker {w.id} has exited")
        return w

    def _send(self, ch: Optional[Channel], payload: bytes, wait: bool = True) -> None:
        """Send a frame, blocking while the queue to the peer is over max_queue."""
        if ch is None:
            raise MasterDied("the master has died")
        try:
            left = ch.send(payload, ch.max_len)
            if left:
                self._backlog(ch, left, wait)
        except PeerGone:
            raise self._died(ch) from None

    def _backlog(self, ch: Channel, left: int, wait: bool) -> None:
        if wait and left > ch.max_queue:
            self._wait_room(ch)
        if ch.unowned():
            self._dispatcher.call_soon(lambda: self._watch_write(ch))

    def _wait_room(self, ch: Channel, deadline: Optional[float] = None) -> bool:
        """Block until at most max_queue bytes are queued to ``ch``; False
        when the ``time.monotonic()`` deadline came first."""
        d = self._dispatcher
        if d.on_thread:  # keep reading meanwhile, or two full peers deadlock
            # Watched for room even if the writer thread owns the bytes: its
            # progress wakes no epoll; an EPOLLOUT here does.
            ch.room_waiters += 1
            self._arm(ch)
            try:
                d.pump_until(lambda: ch.closed or ch.pending() <= ch.max_queue,
                             None if deadline is None else max(0.0, deadline - time.monotonic()))
            finally:
                ch.room_waiters -= 1
                self._arm(ch)
            if ch.closed:
                raise PeerGone(0)
            return ch.pending() <= ch.max_queue
        return ch.wait_room(ch.max_queue, deadline)

    def _died(self, ch: Channel) -> PeerDied:
        if ch.peer is None:
            return MasterDied("the master has died")
        return WorkerDied(f"worker {ch.peer.id} has exited")

    # ---- receiving (dispatcher thread) ----------------------------------

    def _watch_worker(self, w: Worker) -> None:
        ch = w.channel
        if self._closed or ch is None or ch.closed:  # (a requester may have read its EOF already)
            return
        self._dispatcher.set_callback(ch.fd, functools.partial(self._on_channel, ch))
        self._arm(ch)

    def _arm(self, ch: Channel) -> None:
        """Bring the dispatcher's registration of ``ch`` up to date: reading
        unless its input is held back or a leader took it over (``disarmed``),
        writing while bytes are queued.  A syscall only when that changes."""
        with ch.arming:
            self._arm_locked(ch)

    def _arm_locked(self, ch: Channel) -> None:
        if ch.closed:
            return
        want = 0 if ch.disarmed or ch.blockers else _IN
        if ch.unowned() or (ch.room_waiters and ch.pending()):
            want |= _OUT
        if want != ch.mask:
            # EPOLLEXCLUSIVE registrations cannot be modified: drop and add
            # (which also keeps the leader's registration first in the queue).
            ep = self._dispatcher.epoll
            try:
                if ch.mask:
                    ep.unregister(ch.fd)
                if want:
                    ep.register(ch.fd, want | _EXCLUSIVE)
            except (OSError, ValueError):
                pass  # lost (unregistered and closed) meanwhile
            ch.mask = want

    def _watch_write(self, ch: Channel) -> None:
        if not ch.closed and ch.unowned():
            self._arm(ch)

    def _on_channel(self, ch: Channel, ev: int) -> None:
        if ch.closed:
            return
        if ev & _OUT:
            try:
                ch.flush()
            except PeerGone:
                self._channel_lost(ch, _bindings.EOF)
                return
            if ch.held_back and ch.pending() <= ch.max_queue:
                self._release_held(ch)
        if not ev & _INPUT or (ch.blockers and not ev & _GONE):
            self._arm(ch)  # (held back: read anyway once the peer is gone)
        elif ch.reader.acquire(False):
            done: list[Future[Any]] = []
            try:
                more = self._read(ch, 1, done)
            finally:
                if ch.blockers or ch.mask != _IN or ch.unowned():
                    self._arm(ch)  # (else nothing to change)
                if ch.closed:
                    ch.release_reader()  # (it closes the fds)
                else:
                    ch.reader.release()
            if more:  # buffered frames no socket event will announce
                self._dispatcher.call_next(lambda: self._on_channel(ch, _IN))
            if done:
                run_callbacks(done)
        else:
            # A requester leads the channel and reads what came.  Level-
            # triggered, this event would come back until it has: stop
            # watching meanwhile; the leader restores it as it lets go.
            with ch.arming:
                if ch.reader.locked():  # (else it let go: the next poll tells)
                    ch.disarmed = True
                    self._arm_locked(ch)

    def _read(self, ch: Channel, rounds: int, done: list[Future[Any]]) -> bool:
        """Read and route up to ``rounds`` batches of frames from ``ch``.

        The reader holds ``ch.reader``: the requests it completes are added to
        ``done`` and their callbacks run after it let go of the channel, so a
        callback may wait for another reply on it (and never runs while the
        batch's frames are in use).

        Returns True when it stopped with bytes still buffered in ``ch.rx``
        (more complete frames, or an error that comes after them): no socket
        event will announce those, so the caller must read again.

        This is the receive hot path: frames are decoded in place, without
        a view or a call per frame for replies; the plain messages of a
        burst are decoded by one C call (``decode_messages``), and this
        loop takes the frames that call leaves (requests, replies,
        broadcasts, errors), which makes it the reference for both.
        """
        ctx = ch.read_ctx
        if ctx is None:  # (made once: a call's set-up costs as much as a reply)
            rx = ch.rx
            inbox = self._dispatcher.inbox
            ctx = ch.read_ctx = (
                ch.fd, rx.fill, rx.table, rx.data, rx.eof, self._loads, self._pending,
                inbox.append, self._is_master, ch.peer, self._reply, rx.addr, inbox.extend,
                ch.peer if self._is_master else None,  # (a message's sender)
            )
        (fd, fill, table, rx_data, eof, loads, pending, inbox_append, is_master, peer,
         reply_to, rx_addr, inbox_extend, msg_sender) = ctx
        partial = functools.partial
        for _ in range(rounds):
            if ch.closed:
                return False
            n = fill(fd)
            if n <= 0:
                if n:
                    self._channel_lost(ch, n)
                return False
            offs = _unpack(table, 2 * n)
            buf = memoryview(_buffer(rx_data(), offs[-2] + offs[-1]))
            i = 0
            last = 2 * n
            while i < last:
                if n > 1:  # a burst: its plain messages in C, from frame i on
                    items: list[Any] = []
                    i = 2 * _decode_messages(rx_addr, i >> 1, n, loads, msg_sender, items)
                    if items:
                        inbox_extend(items)
                    if i == last:
                        break
                start = offs[i]
                end = start + offs[i + 1]
                i += 2
                if end - start < _ENVELOPE:
                    return self._malformed(ch, "frame shorter than the envelope")
                kind, origin, rid, nlen = _unpack_envelope(buf, start)
                data_at = start + _ENVELOPE + nlen
                if data_at > end:
                    return self._malformed(ch, "name longer than the frame")
                if kind == _RES:
                    fut = pending.get(rid)
                    if fut is None or fut._channel is not ch:
                        log.debug("dropping a reply to request %d nobody waits for", rid)
                        continue
                    pending.pop(rid, None)  # now: its callbacks may run later
                    try:
                        value = loads(buf[data_at:end])
                    except Exception as e:
                        resolve(fut, False, HubError(f"cannot decode the reply: {e!r}"), done)
                        continue
                    try:
                        fut._finish(value, None)
                    except InvalidStateError:  # ended meanwhile (cancelled)
                        continue
                    done.append(fut)
                elif kind == _ERR:
                    pending.complete(ch, rid, False, _remote_error(buf[data_at:end]), done)
                elif _MSG <= kind <= _BCAST:
                    try:
                        name = str(buf[start + _ENVELOPE : data_at], "utf-8")
                    except UnicodeDecodeError:
                        return self._malformed(ch, "name is not UTF-8")
                    if is_master:
                        if kind == _BCAST:
                            if peer is None or origin != peer.id:
                                return self._malformed(ch, "broadcast with a forged origin")
                            self._relay(ch, bytes(buf[start:end]))
                            continue
                        sender = peer
                    elif origin == 0 or kind != _BCAST:
                        sender = None
                    else:
                        sender = self._peer(origin)
                    try:
                        data = loads(buf[data_at:end])
                    except Exception as e:
                        log.error("cannot decode the data of %r: %r", name, e)
                        if kind == _REQ:
                            self._reply(ch, rid, False, e, False)
                        continue
                    reply = partial(reply_to, ch, rid) if kind == _REQ else None
                    inbox_append((name, data, sender, reply))
                else:
                    return self._malformed(ch, f"unknown kind {kind}")
        return not ch.closed and eof() != _EOF

    def _malformed(self, ch: Channel, what: str) -> bool:
        log.debug("malformed envelope: %s", what)
        self._channel_lost(ch, _bindings.MALFORMED)
        return False

    def _peer(self, wid: int) -> Worker:
        w = self._peer_stubs.get(wid)
        if w is None:
            w = self._peer_stubs[wid] = Worker(wid, hub_key=self._key)
        return w

    def _relay(self, origin: Channel, payload: bytes) -> None:
        """Pass a worker's broadcast on.  The relay cannot block (it runs
        where frames are read): a target over max_queue instead holds back
        the origin's input until it drained, so the origin's sender blocks."""
        for w in list(self._workers.values()):
            ch = w.channel
            if ch is origin or ch is None or ch.closed:
                continue
            try:
                self._send(ch, payload, wait=False)
            except PeerDied:
                continue
            if ch.pending() > ch.max_queue:
                ch.held_back.add(origin)
                origin.blockers.add(ch)

    def _release_held(self, ch: Channel) -> None:
        """``ch`` drained (or closed): read the origins it held back again."""
        for origin in list(ch.held_back):
            ch.held_back.discard(origin)
            origin.blockers.discard(ch)
            if not origin.blockers and not origin.closed:
                # Frames may wait in its buffer, which no event announces.
                self._dispatcher.call_next(functools.partial(self._on_channel, origin, _IN))

    def _reply(self, ch: Channel, rid: int, ok: bool, value: Any, wait: bool = True) -> None:
        """Answer request ``rid`` that came on ``ch`` (bound with functools.partial
        as an inbox item's ``reply(ok, value)``)."""
        if ok:
            try:
                kind, body = protocol.RES, self._dumps(value)
            except Exception as e:
                ok, value = False, e
        if not ok:
            kind, body = protocol.ERR, _error_body(value)
        try:
            left = ch.send_msg(kind, 0, rid, b"", 0, body, len(body))
            if left:
                self._sent_part(ch, left, wait, len(body))
        except PeerDied:
            log.debug("reply to request %d dropped: the peer is gone", rid)
        except MessageTooLarge as e:
            self._send_msg(ch, protocol.ERR, 0, rid, b"", _error_body(e), False)

    def _channel_lost(self, ch: Channel, code: int) -> None:
        if ch.closed:
            return
        w = ch.peer
        if w is not None and code in _PROTOCOL_ERRORS:
            # Killed before its channel closes, or it would see that and exit
            # by itself first.  (Other codes, e.g. a reset or EOF inside a
            # frame, only mean the worker is gone or going.)
            log.error("worker %d broke its channel (%s): killing it", w.id, _describe(code))
            w.kill()
        ch.dying = True
        ch.poke()
        self._dispatcher.unregister(ch.fd)
        ch.close()
        self._release_held(ch)
        for target in list(ch.blockers):
            target.held_back.discard(ch)
        if w is not None:
            self._pending.fail_peer(ch, lambda: WorkerDied(f"worker {w.id} has exited"))
            return
        if code in _PROTOCOL_ERRORS:
            log.error("the master broke its channel (%s): treating it as dead", _describe(code))
        self._master_gone.set()
        self._pending.fail_all(lambda: MasterDied("the master has died"))
        if self._exit_on_master_death:
            exit_process(1)

    def _on_worker_exit(self, w: Worker) -> None:
        """On the exit watcher's thread, as soon as the kernel reports the
        exit: reap, and reflect it (``workers``, ``join``, ``exitcode``); the
        dispatcher then handles what the worker sent (``_settle``)."""
        code = reap(w.pid) if w.pid is not None else None
        with self._state_lock:
            self._workers.pop(w.id, None)
        w.set_exited(code)
        self._dispatcher.call_soon(lambda: self._settle(w))

    def _settle(self, w: Worker) -> None:
        """On the dispatcher, after ``w`` exited: read and route everything it
        sent, fail what waits on it, then queue its on_exit callbacks behind
        its messages."""
        ch = w.channel
        if ch is not None and not ch.closed:
            ch.dying = True
            ch.poke()  # a requester reading this channel lets go of it
            done: list[Future[Any]] = []
            ch.reader.acquire()
            try:
                self._read(ch, 1 << 30, done)  # everything it sent is handled first
            finally:
                ch.release_reader()
            self._channel_lost(ch, _bindings.EOF)
            run_callbacks(done)
        self._dispatcher.inbox.append((None, self._run_exit_callbacks, w, None))

    def _run_exit_callbacks(self, w: Worker) -> None:
        for cb in list(self._exit_callbacks):
            try:
                cb(w)
            except Exception:
                log.exception("on_exit callback %r failed", cb)
        self._unsettled.pop(w.id, None)
        w.settled.set()

    # ---- checks ---------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise HubClosedError("this hub is closed (or was inherited through a fork)")

    def _check_master(self, what: str) -> None:
        self._check()
        if not self._is_master:
            raise NotMasterError(f"{what} is for the master only")


def _check_int(name: str, value: Any, lo: int, hi: Optional[int]) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be between {lo} and {hi}" if hi else f"{name} must be >= {lo}")


def _check_timeout(timeout: Optional[float]) -> None:
    if timeout is None:
        return
    if not isinstance(timeout, Real) or isinstance(timeout, bool):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if timeout < 0 or timeout != timeout:
        raise ValueError("timeout must be >= 0")


def _check_callback(callback: Any) -> None:
    if not callable(callback):
        raise TypeError("callback must be callable as callback(error, result)")


def _type_name(e: BaseException) -> str:
    t = type(e)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _error_body(e: BaseException) -> bytes:
    if isinstance(e, _NoHandler):
        return protocol.encode_error("NoHandlerError", f"no handler for {e.args[0]!r}", "", True)
    if isinstance(e, RemoteError):
        return protocol.encode_error(e.type_name, e.message, e.remote_traceback, isinstance(e, NoHandlerError))
    te = traceback.TracebackException(type(e), e, e.__traceback__)
    _drop_own_frames(te, set())
    return protocol.encode_error(_type_name(e), str(e), "".join(te.format()), False)


_OWN_FILES = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _drop_own_frames(te: traceback.TracebackException, seen: set[int]) -> None:
    """Leave out clusterhub's own frames (the dispatcher calling the handler,
    the worker's entry point): a remote traceback shows the user's code."""
    seen.add(id(te))
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if not f.filename.startswith(_OWN_FILES)]
    )
    for chained in (te.__cause__, te.__context__):
        if chained is not None and id(chained) not in seen:
            _drop_own_frames(chained, seen)


def _remote_error(body: memoryview) -> RemoteError:
    try:
        t, m, tb, no_handler = protocol.decode_error(body)
    except Exception as e:
        return RemoteError("HubError", f"undecodable error reply: {e!r}")
    return (NoHandlerError if no_handler else RemoteError)(t, m, tb)


def _as_remote_error(e: BaseException) -> RemoteError:
    """A local handler's exception, shaped as if it came from a peer."""
    return _remote_error(memoryview(_error_body(e)))


def _describe(code: int) -> str:
    return {
        _bindings.MALFORMED: "malformed frame",
        _bindings.TOOBIG: "frame over max_message_size",
        _bindings.TRUNCATED: "closed inside a frame",
    }.get(code, os.strerror(-code) if code < 0 else str(code))
