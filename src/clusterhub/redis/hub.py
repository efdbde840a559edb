"""``RedisHub``: the ``Hub`` that ``Hub(address="redis://...")`` and
``connect("redis://...")`` make.

The processes of the hub (who is alive, by lease), its global locks
(locks.py) and its messages (messages.py), with the public API's semantics
of ``hub.Hub``.  The master watches the others' leases on a thread of its
own: it blocks on the hub's event list (joins and clean exits are pushed
there) for at most the time until the earliest lease among the workers would
run out, so a death is seen within the lease plus a few milliseconds, and an
idle hub wakes at most once per lease.  A worker learns of its master's death
from its own lease renewals (every tenth of a lease).

A worker's exit reaches the master's ``on_exit`` callbacks through the
master's own inbox, behind everything the worker sent: handlers see its
messages first, as with a local hub.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import warnings
from typing import Any, Callable, Optional, Union

from .. import forks, protocol
from ..checks import check_bool, check_int, check_spin, check_timeout
from ..dispatch import Dispatcher
from ..errors import HubClosedError, HubError, MasterDied, NotMasterError, NoWorkersError, SendTimeout, WorkerDied
from ..hub import _HANDLER_GRACE, DEFAULT_LOCK_SLOTS, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_QUEUE, DEFAULT_SPIN, E, Hub
from ..locks import HeldLock
from ..process import ExitWatcher, Worker, exit_process, flush_stdio, reap, run_target
from ..requests import Callback, Future, Pending, gather
from ..workers import WorkerRef
from .link import DEFAULT_LEASE, Link, host, text
from .locks import RedisLock, RedisLocks
from .messages import Mail
from .url import RedisURL, parse

log = logging.getLogger("clusterhub")
_fork_lock = threading.Lock()


def _master_died() -> MasterDied:
    return MasterDied("the master has died")


def _deadline(timeout: Optional[float]) -> Optional[float]:
    t = check_timeout(timeout)
    return None if t is None else time.monotonic() + t


def serializer_for(serializer: Any, authkey: Optional[bytes]) -> Any:
    """``serializer=None``: pickle when the hub has an authkey (every entry
    is authenticated before it is unpickled), JSON without one (anyone who
    can write to the server could inject an entry)."""
    if serializer is None:
        return "pickle" if authkey is not None else "json"
    return serializer


class RemoteWorker(Worker):
    """A worker of a Redis hub, maybe on another host (``host``): a worker
    elsewhere is signalled through the server (it signals itself)."""

    host: str
    forked = False  # (started by this master's fork(): its pidfd reports its exit)
    signal_through: Optional[Callable[[int, int], None]] = None  # (worker id, signal)

    def _signal(self, sig: int) -> None:
        if self.host == host() or self.signal_through is None:
            super()._signal(sig)
        elif self.is_alive():
            try:
                self.signal_through(self.id, sig)
            except HubError as e:
                log.warning("clusterhub: cannot signal worker %d through the server: %s", self.id, e)


def check_lease(lease: float) -> float:
    if isinstance(lease, bool) or not isinstance(lease, (int, float)):
        raise TypeError(f"lease must be a number of seconds, not {type(lease).__name__}")
    if not 0.1 <= lease <= 3600:
        raise ValueError(f"lease must be between 0.1 and 3600 seconds, not {lease}")
    return float(lease)


class RedisHub(Hub):
    """A hub whose processes meet on a Redis server (see the module doc)."""

    def __init__(
        self,
        *,
        serializer: Any = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_queue: int = DEFAULT_MAX_QUEUE,
        lock_slots: int = DEFAULT_LOCK_SLOTS,
        exit_on_master_death: bool = True,
        batch_dispatcher: bool = True,
        spin: float = DEFAULT_SPIN,
        address: str,
        authkey: Optional[bytes] = None,
        allowed_uids: Optional[Any] = None,
        lease: Optional[float] = None,
    ) -> None:
        # Hub's own parameters, checked as Hub checks them (lock_slots has
        # nothing to act on over Redis).
        check_int("lock_slots", lock_slots, 1, None)
        spin = check_spin(spin)
        if allowed_uids is not None:
            raise ValueError("allowed_uids is for a local hub: over Redis, the server's own authentication "
                             "decides who may connect")
        self._setup(parse(address), check_lease(DEFAULT_LEASE if lease is None else lease), authkey, master=True,
                    timeout=5.0, serializer=serializer, max_message_size=max_message_size, max_queue=max_queue,
                    exit_on_master_death=exit_on_master_death, batch_dispatcher=batch_dispatcher, spin=spin)
        self._start_reading()

    def _setup(self, url: RedisURL, lease: Optional[float], authkey: Optional[bytes], *, master: bool,
               timeout: Optional[float], serializer: Any = None, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
               max_queue: int = DEFAULT_MAX_QUEUE, exit_on_master_death: bool = True,
               batch_dispatcher: bool = True, spin: float = DEFAULT_SPIN) -> None:
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
        self._dumps, self._loads = protocol.serializer_functions(serializer_for(serializer, authkey))
        check_int("max_message_size", max_message_size, 1, None)
        check_int("max_queue", max_queue, 0, None)
        check_bool("exit_on_master_death", exit_on_master_death)
        check_bool("batch_dispatcher", batch_dispatcher)
        self._closed = False
        self._url = url
        self._address = url.text
        self._authkey = authkey
        self._max_len = max_message_size
        self._max_queue = max_queue
        self._exit_on_master_death = exit_on_master_death
        self._link = Link(url, lease, master=master, connect_timeout=timeout)
        self._link.spin = spin
        self._rlocks = RedisLocks(self._link)
        self._workers: dict[int, RemoteWorker] = {}
        self._gone: set[int] = set()  # ids seen leaving (a late "joined" event changes nothing)
        self._stubs: dict[int, Worker] = {}  # (a worker: other workers, as broadcast senders)
        self._settling = 0  # exits whose on_exit callbacks have not run yet
        self._run_id = ""  # the server's, as the watcher last saw it
        self._grace_until = 0.0  # (monotonic) after a server restart: the workers take new leases meanwhile
        self._longest = 0.0  # the longest lease seen left to a worker (s)
        self._left: dict[int, RemoteWorker] = {}  # exited, on_exit callbacks not yet scheduled
        self._former: dict[int, RemoteWorker] = {}  # exited (the latest few thousand)
        self._exit_callbacks: list[Callable[[Worker], Any]] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self._exits = ExitWatcher(f"clusterhub-exits-{url.name}", self._child_exited)  # (forked workers)
        self._dispatcher = Dispatcher(f"{'master' if master else 'worker'}-{os.getpid()}", batch_dispatcher)
        self._pending = Pending(self._dispatcher, None)  # type: ignore[arg-type]
        self._mail = self._new_mail()
        self._known_master = 0  # (a worker) the live master its renewer last saw
        try:
            self._link.join()
            if not master:
                m = self._link.call(self._link.client.get, self._link.key(b"master"))
                self._mail.master_id = self._known_master = int(m) if m else 0
                self._link.on_master = self._master_seen
        except BaseException:  # (no hub: nothing of it stays open)
            self._mail.abandon()
            self._dispatcher.abandon()
            self._link.disconnect()
            raise
        self._link.on_tick = self._mail.check_stalled
        forks.hubs.add(self)
        if master:
            self._watcher = threading.Thread(target=self._watch, name=f"clusterhub-members-{url.name}", daemon=True)
            self._watcher.start()

    def _new_mail(self) -> Mail:
        return Mail(self._link, self._dispatcher, self._pending, self._dumps, self._loads, self._authkey,
                    self._max_len, self._max_queue, self._sender, self._control)

    def _start_reading(self) -> None:
        """Start dispatching and reading the inbox (a connecting worker:
        after its setup registered its handlers)."""
        self._dispatcher.start()
        self._mail.start()

    def __repr__(self) -> str:
        role = "master" if self.is_master else f"worker {self.worker_id}"
        state = " closed" if self._closed else ""
        return f"<clusterhub.Hub {role} pid={os.getpid()} {self._url.text}{state}>"

    # ---- identity --------------------------------------------------------------------

    @property
    def is_master(self) -> bool:
        return self._link.is_master

    @property
    def is_worker(self) -> bool:
        return not self._link.is_master

    @property
    def worker_id(self) -> Optional[int]:
        return self._link.worker_id

    @property
    def workers(self) -> dict[int, Worker]:
        self._check_master("workers")
        with self._changed:
            return dict(self._workers)

    def _check(self) -> None:
        if self._closed:
            raise HubClosedError("this hub is closed (or was inherited through a fork)")

    def _check_master(self, what: str) -> None:
        self._check()
        if not self.is_master:
            raise NotMasterError(f"{what} is for the master only")

    def _worker(self, worker: WorkerRef) -> RemoteWorker:
        """The live worker a Worker or id stands for."""
        if isinstance(worker, Worker):
            if worker.hub_key != self._hub_key:
                raise ValueError(f"{worker!r} is not a worker of this hub")
            wid = worker.id
        elif isinstance(worker, int) and not isinstance(worker, bool):
            wid = worker
        else:
            raise TypeError(f"worker must be a Worker or an int id, not {type(worker).__name__}")
        with self._changed:
            w = self._workers.get(wid)
            if w is None:
                if wid in self._gone:
                    raise WorkerDied(f"worker {wid} has exited")
                raise ValueError(f"no worker {wid} in this hub")
        return w

    # ---- locks -----------------------------------------------------------------------

    def lock(self, key: Union[str, bytes], timeout: Optional[float] = None) -> RedisLock:  # type: ignore[override]
        """A handle on the global lock named ``key`` (see :class:`RedisLock`)."""
        self._check()
        return self._rlocks.lock(key, timeout)

    def held_locks(self) -> list[HeldLock]:
        self._check()
        rows = []
        for key, pid, wid, where in self._rlocks.held():
            row = HeldLock(key, pid, wid)
            row.host = where
            rows.append(row)
        return rows

    # ---- messages --------------------------------------------------------------------

    def send_to_master(self, name: str, data: Any = None, *, timeout: Optional[float] = None) -> None:
        self._check()
        deadline = _deadline(timeout)
        if self.is_master:
            protocol.encode_name(name)
            self._dispatcher.post((name, data, None, None))
            return
        entry = self._mail.entry(protocol.MSG, 0, protocol.encode_name(name), self._dumps(data))
        self._mail.send("M", entry, _master_died, deadline, timeout=timeout, ahead=self._known_master != 0)

    def send_to_worker(self, worker: WorkerRef, name: str, data: Any = None, *,
                       timeout: Optional[float] = None) -> None:
        self._check_master("send_to_worker")
        deadline = _deadline(timeout)
        w = self._worker(worker)
        entry = self._mail.entry(protocol.MSG, 0, protocol.encode_name(name), self._dumps(data))
        self._mail.send(w.id, entry, self._died(w.id), deadline, timeout=timeout, ahead=True)

    def send_to_workers(self, name: str, data: Any = None, *, timeout: Optional[float] = None) -> None:
        self._check()
        deadline = _deadline(timeout)
        kind = protocol.MSG if self.is_master else protocol.BCAST
        entry = self._mail.entry(kind, 0, protocol.encode_name(name), self._dumps(data))
        unreached = self._mail.broadcast(entry, deadline, timeout)
        if unreached:
            with self._changed:
                ws = [self._workers.get(i) or Worker(i, hub_key=self._hub_key) for i in unreached]
            raise SendTimeout(f"the queues of {len(ws)} worker(s) stayed full for {timeout} s", ws)

    def send_to_random_worker(self, name: str, data: Any = None, *,
                              timeout: Optional[float] = None) -> Optional[Worker]:
        self._check_master("send_to_random_worker")
        deadline = _deadline(timeout)
        entry = self._mail.entry(protocol.MSG, 0, protocol.encode_name(name), self._dumps(data))
        with self._changed:
            live = list(self._workers.values())
        random.shuffle(live)
        for w in live:
            try:
                self._mail.send(w.id, entry, self._died(w.id), deadline, timeout=timeout)
                return w
            except WorkerDied:
                continue
        return None

    def request_master(self, name: str, data: Any = None, *, timeout: Optional[float] = None,
                       callback: Optional[Callback] = None) -> Future[Any]:
        self._check()
        if self.is_master:
            return self._pending.local(name, data, timeout, callback)
        mail = self._mail
        return mail.request("M", mail.peer(mail.master_id), name, self._dumps(data), timeout, callback,
                            _master_died)

    def request_worker(self, worker: WorkerRef, name: str, data: Any = None, *,
                       timeout: Optional[float] = None, callback: Optional[Callback] = None) -> Future[Any]:
        self._check_master("request_worker")
        w = self._worker(worker)
        return self._mail.request(w.id, self._mail.peer(w.id), name, self._dumps(data), timeout, callback,
                                  self._died(w.id))

    def request_random_worker(self, name: str, data: Any = None, *, timeout: Optional[float] = None,
                              callback: Optional[Callback] = None) -> Future[Any]:
        self._check_master("request_random_worker")
        body = self._dumps(data)
        with self._changed:
            live = list(self._workers.values())
        if not live:
            return self._pending.failed(NoWorkersError("no live worker"), callback)
        w = random.choice(live)
        return self._mail.request(w.id, self._mail.peer(w.id), name, body, timeout, callback, self._died(w.id))

    def request_workers(self, name: str, data: Any = None, *, timeout: Optional[float] = None,
                        callback: Optional[Callback] = None) -> Future[dict[int, Any]]:
        self._check_master("request_workers")
        body = self._dumps(data)
        protocol.encode_name(name)
        check_timeout(timeout)
        agg = self._pending.failed(None, callback)  # (checks the callback)
        with self._changed:
            live = sorted(self._workers.values(), key=lambda w: w.id)
        parts = [(w.id, self._mail.request(w.id, self._mail.peer(w.id), name, body, timeout, None,
                                           self._died(w.id))) for w in live]
        return gather(parts, agg)

    def _died(self, wid: int) -> Callable[[], WorkerDied]:
        return lambda: WorkerDied(f"worker {wid} has exited")

    @property
    def _hub_key(self) -> Any:
        return ("redis", self._url.text)

    def _sender(self, kind: int, origin: int) -> Optional[Worker]:
        """A message's ``sender``: in the master the worker ``origin``; in a
        worker None (the master), or a stand-in for the broadcasting worker."""
        if self.is_master:
            with self._changed:
                w = self._workers.get(origin) or self._former.get(origin)
            if w is None:  # (its first message came before its "joined" event)
                info = self._link.call(self._link.client.hget, self._link.key(b"procs"), str(origin))
                if info:
                    pid, where, _ = text(info).split(" ")
                    self._joined(origin, int(pid), where)
                with self._changed:
                    w = self._workers.get(origin) or self._former.get(origin)
            return w if w is not None else Worker(origin, hub_key=self._hub_key)
        if kind != protocol.BCAST:
            return None
        stub = self._stubs.get(origin)
        if stub is None:
            stub = self._stubs[origin] = Worker(origin, hub_key=self._hub_key)
        return stub

    def _control(self, name: str, origin: int, body: memoryview) -> None:
        """A control entry: "exit" (the watcher's, in the master: after
        everything the worker sent), "signal" (from the master)."""
        if name == "exit" and origin == self._link.proc_id:
            wid = int(bytes(body))
            with self._changed:
                w = self._left.pop(wid, None)
            if w is not None:
                self._dispatcher.post((None, self._settle, w, None))
        elif name == "signal" and not self.is_master and origin == self._mail.master_id:
            os.kill(os.getpid(), int(bytes(body)))
        else:
            log.warning("clusterhub: a control entry %r from process %d: ignored", name, origin)

    def _signal_through(self, wid: int, sig: int) -> None:
        self._mail.control(wid, "signal", str(int(sig)).encode())

    def _master_seen(self, mid: int) -> None:
        """(A worker's renewer) the live master's id, 0 for none: when the
        one it saw before is gone, what waits on it fails."""
        old = self._known_master
        if mid == old:
            return
        self._known_master = mid
        if old:
            self._pending.fail_peer(self._mail.peer(old), _master_died)
            if self._exit_on_master_death:
                log.error("clusterhub: worker %s: the master has died; exiting", self.worker_id)
                exit_process(1)
        if mid:
            self._mail.master_id = mid

    _forked = False  # (a worker this hub's master forked)

    # ---- asyncio ---------------------------------------------------------------------

    # (attach: Hub's)

    def detach(self) -> None:
        self._check()
        self._dispatcher.detach()

    # ---- processes -------------------------------------------------------------------

    def fork(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Worker:
        """Start a worker process running ``target(*args, **kwargs)``; it
        joins the hub through the server (see ``Hub.fork``)."""
        self._check_master("fork")
        if not callable(target):
            raise TypeError(f"target must be callable, not {type(target).__name__}")
        link = self._link
        wid = int(link.call(link.client.incr, link.key(b"ids")))
        flush_stdio()
        # (_changed held across the fork: the watcher lists the new worker
        # only as the forked one made below, whatever events the child sends)
        with _fork_lock, self._exits.lock, self._changed:
            forks.forking(self)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    pid = os.fork()
            finally:
                forks.forking(None)
            if pid == 0:
                try:
                    self._run_child(wid, target, args, kwargs)
                finally:
                    os._exit(1)
            here = host()
            w = RemoteWorker(wid, pid, hub_key=self._hub_key)
            w.host, w.forked, w.signal_through = here, True, self._signal_through
            self._workers[wid] = w
            self._exits.watch(w, os.pidfd_open(pid))
        # The worker's lease and membership now, so that it can be sent to at
        # once (the child takes them over when it joins).
        info = f"{pid} {here} {wid}"
        try:
            pipe = link.client.pipeline(transaction=False)
            pipe.set(link.lease_key(wid), info, px=link.lease_ms)
            pipe.hset(link.key(b"procs"), str(wid), info)
            link.call(pipe.execute)
        except HubError:
            w.kill()  # (its exit is reported as any other)
            raise
        return w

    def _run_child(self, wid: int, target: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> None:
        """In a forked child: this hub becomes worker ``wid``'s, runs
        ``target`` and exits (never returns)."""
        global _fork_lock
        _fork_lock = threading.Lock()  # (held by the parent's forking thread, which is us)
        old = self._link
        old.abandon()
        self._mail.abandon()
        self._rlocks.abandon()
        self._exits.abandon()
        self._stop = threading.Event()
        self._watcher = None
        self._workers, self._gone, self._left, self._former, self._stubs = {}, set(), {}, {}, {}
        self._exit_callbacks = []
        self._changed = threading.Condition()
        self._forked = True
        self._link = Link(old.url, old.lease, master=False, connect_timeout=old.connect_timeout)
        self._link.spin = old.spin
        self._rlocks = RedisLocks(self._link)
        self._dispatcher.reinit_after_fork(f"worker-{os.getpid()}")
        self._pending = Pending(self._dispatcher, None)  # type: ignore[arg-type]
        self._mail = self._new_mail()
        code = 1
        try:
            self._link.join(wid)
            self._mail.master_id = self._known_master = old.proc_id
            self._link.on_master = self._master_seen
            self._link.on_tick = self._mail.check_stalled
            self._start_reading()
            code = run_target(target, args, kwargs)
        finally:
            try:
                self.close()
            except BaseException:
                log.exception("clusterhub: worker %d: closing its hub failed", wid)
            exit_process(code)

    def _child_exited(self, w: Worker, code: Optional[int]) -> None:
        """(The exit watcher) a forked worker exited."""
        if w.pid is not None:
            got = reap(w.pid)
            code = got if code is None else code
        self._exited(w.id, code)

    def on_exit(self, callback: E) -> E:
        self._check_master("on_exit")
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._exit_callbacks.append(callback)
        return callback

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until every worker has exited (its lease ended, or it left)
        and the ``on_exit`` callbacks of those exits have run; True when all
        did.  Called from a handler or an ``on_exit`` callback, it waits for
        the exits only."""
        self._check_master("join")
        d = self._dispatcher
        inside = threading.get_ident() in (d.ident, d.handler_ident, getattr(self._watcher, "ident", None))
        with self._changed:
            return self._changed.wait_for(lambda: not self._workers and (inside or not self._settling),
                                          check_timeout(timeout))

    def _watch(self) -> None:
        link = self._link
        c = link.client
        events = link.key(b"events")
        warned = False
        try:  # the workers that joined before this master
            for k, v in link.call(c.hgetall, link.key(b"procs")).items():
                if int(k) != link.proc_id:
                    pid, host, _ = text(v).split(" ")
                    self._joined(int(k), int(pid), host)
        except HubError as e:
            log.warning("clusterhub: reading the workers of %s: %s", link.url.text, e)
        wait = 0.0
        while not self._stop.is_set():
            try:
                got = link.call(c.blpop, [events], timeout=max(0.001, round(wait, 3)))
                if got is not None:
                    self._event(text(got[1]).split(" "))
                    self._take_events()
                wait = self._check_leases()
                if warned:
                    log.warning("clusterhub: the Redis server at %s answers again", link.url.text)
                    warned = False
            except HubError as e:
                if not warned:
                    log.warning("clusterhub: watching the workers of %s: %s", link.url.text, e)
                    warned = True
                self._stop.wait(min(1.0, link.lease / 2))
            except Exception:
                log.exception("clusterhub: the worker watcher of %s failed", link.url.text)
                self._stop.wait(min(1.0, link.lease / 2))

    def _take_events(self) -> None:
        """Handle the events waiting in the hub's list."""
        link = self._link
        pipe = link.client.pipeline()  # (LPOP with a count is Redis 6.2; we accept 6.0.6)
        pipe.lrange(link.key(b"events"), 0, 999)
        pipe.ltrim(link.key(b"events"), 1000, -1)
        for ev in link.call(pipe.execute)[0]:
            self._event(text(ev).split(" "))

    def _event(self, ev: list[str]) -> None:
        if ev[0] == "joined" and len(ev) == 4:
            self._joined(int(ev[1]), int(ev[2]), ev[3])
        elif ev[0] == "rejoined" and len(ev) == 4:
            self._rejoined(int(ev[1]), int(ev[2]), ev[3])
        elif ev[0] == "left" and len(ev) == 2:
            with self._changed:
                w = self._workers.get(int(ev[1]))
            if w is None or not w.forked:  # (a forked one's exit, with its code, comes from its pidfd)
                self._exited(int(ev[1]), 0)  # (it left cleanly: exitcode 0, where a lost lease gives None)

    def _rejoined(self, wid: int, pid: int, host: str) -> None:
        """A worker whose lease ran out (paused, or cut off) took a new one:
        if it was reported exited, it is listed again (a new ``Worker`` for
        the same id; the old one keeps its exit)."""
        with self._changed:
            if wid in self._workers:
                return
        if self._link.call(self._link.client.pttl, self._link.lease_key(wid)) <= 0:
            return  # (gone again: a stale event)
        with self._changed:
            self._gone.discard(wid)
        self._joined(wid, pid, host)

    def _joined(self, wid: int, pid: int, host: str) -> None:
        with self._changed:
            if wid in self._workers or wid in self._gone:
                return
            w = RemoteWorker(wid, pid, hub_key=self._hub_key)
            w.host = host
            w.connected = True
            w.signal_through = self._signal_through
            self._workers[wid] = w

    def _check_leases(self) -> float:
        """Workers whose lease is gone have exited; how long until the
        earliest remaining lease would run out (at most a lease)."""
        link = self._link
        with self._changed:  # (a forked worker's exit comes from its pidfd, with its code)
            wids = [wid for wid, w in self._workers.items() if not w.forked]
        pipe = link.client.pipeline(transaction=False)
        pipe.info("server")
        for wid in wids:
            pipe.pttl(link.lease_key(wid))
        info, *ttls = link.call(pipe.execute)
        now = time.monotonic()
        if info["run_id"] != self._run_id:
            if self._run_id:
                # The server restarted and lost every lease: a live worker
                # takes a new one at its next renewal, within a tenth of its
                # lease (which may be longer than ours).
                self._grace_until = now + link.lease + self._longest / 10
            self._run_id = info["run_id"]
        self._longest = max([self._longest, *(t / 1000 for t in ttls)])
        if now < self._grace_until:
            return max(0.001, self._grace_until - now)
        if any(ttl <= 0 for ttl in ttls):
            self._take_events()  # (a clean leave's event comes before its lease goes)
        for wid, ttl in zip(wids, ttls):
            if ttl <= 0:
                self._exited(wid)
        live = [t / 1000 + 0.003 for t in ttls if t > 0]
        return float(min([link.lease, *live]))

    def _exited(self, wid: int, code: Optional[int] = None) -> None:
        """Worker ``wid`` exited: its requests fail now; its ``on_exit``
        callbacks run on the dispatcher behind what it sent (a control entry
        through our own inbox, which is behind its entries)."""
        with self._changed:
            left = self._workers.pop(wid, None)
            self._gone.add(wid)
            if left is None:
                return
            self._settling += 1  # (join() waits for its on_exit callbacks too)
            self._left[wid] = left
            self._former[wid] = left  # (a message of it may still be read: its sender)
            if len(self._former) > 4096:
                del self._former[next(iter(self._former))]
        link = self._link
        try:
            pipe = link.client.pipeline(transaction=False)
            if left.forked:  # (reaped here, so surely gone: its lease and inbox go now, not at their TTL)
                pipe.delete(*link.proc_keys(wid))
            pipe.hdel(link.key(b"procs"), str(wid))
            link.call(pipe.execute)
        except HubError as e:
            log.debug("clusterhub: forgetting worker %d on the server: %s", wid, e)
        left.set_exited(code)
        self._pending.fail_peer(self._mail.peer(wid), self._died(wid))
        try:
            self._mail.control(link.proc_id, "exit", str(wid).encode())
        except HubError:
            with self._changed:  # (the server is away: settle it here)
                gone = self._left.pop(wid, None)
            if gone is not None:
                self._dispatcher.post((None, self._settle, gone, None))

    def _settle(self, w: Worker) -> None:
        """(On the dispatcher) run the on_exit callbacks of ``w``'s exit."""
        try:
            for cb in list(self._exit_callbacks):
                try:
                    cb(w)
                except Exception:
                    log.exception("clusterhub: on_exit callback %r failed", cb)
            w.settled.set()
        finally:
            with self._changed:
                self._settling -= 1
                self._changed.notify_all()

    # ---- the end ---------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Leave the hub: give up the lease (and the name, for the master).
        In the master, workers it forked get SIGTERM, then SIGKILL after
        ``timeout`` seconds.  Raises LockError (and stays open) while a
        thread or task of this process holds one of its locks.  Idempotent."""
        if self._closed:
            return
        check_timeout(timeout)
        self._rlocks.retire()
        try:
            self._link.settle()  # (what this thread sent ahead: run before what follows)
        except HubError as e:
            log.warning("clusterhub: closing %r: %s", self, e)
        self._stop_forked(timeout)
        self._mail.outbox.stop(timeout)  # (what it sent goes before its leaving: on_exit comes after)
        self._closed = True
        self._stop.set()
        self._exits.stop()
        try:
            self._link.leave()  # (its "left" event wakes the watcher: stop it before disconnecting)
            if self._watcher is not None:
                self._watcher.join(timeout)
            self._mail.stop(timeout)
            if not self._dispatcher.stop(_HANDLER_GRACE):
                log.warning("%r closed while a handler was still running %.1f s later: abandoned",
                            self, _HANDLER_GRACE)
            self._pending.fail_all(lambda: HubClosedError("the hub was closed"))
        finally:
            self._link.disconnect()
        forks.hubs.discard(self)

    def _stop_forked(self, timeout: float) -> None:
        with self._changed:
            forked = [w for w in self._workers.values() if w.forked]
        for w in forked:
            w.terminate()
        deadline = time.monotonic() + timeout
        for w in forked:
            if not w.join(max(0.0, deadline - time.monotonic())):
                w.kill()
                w.join(1.0)

    def _abandon(self) -> None:
        self._closed = True
        self._stop.set()
        self._link.abandon()
        self._rlocks.abandon()
        self._mail.abandon()
        self._exits.abandon()
        self._dispatcher.abandon()


def connect_redis(address: str, *, timeout: Optional[float], lease: Optional[float] = None,
                  authkey: Optional[bytes] = None, serializer: Any = None,
                  exit_on_master_death: bool = False, spin: float = DEFAULT_SPIN) -> RedisHub:
    """A worker-side Redis hub (what ``clusterhub.connect`` makes for a
    Redis address); ``lease`` None: the master's.  It reads its inbox once
    ``_start_reading()`` is called (after the caller's setup)."""
    hub = object.__new__(RedisHub)
    hub._setup(parse(address), None if lease is None else check_lease(lease), authkey, master=False,
               timeout=timeout, serializer=serializer, exit_on_master_death=exit_on_master_death, spin=spin)
    return hub
