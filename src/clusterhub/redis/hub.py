"""``RedisHub``: the ``Hub`` that ``Hub(address="redis://...")`` and
``connect("redis://...")`` make.

Part 1 of the Redis engine: global locks, and the processes of the hub (who
is alive, by lease).  The master watches the others' leases on a thread of
its own: it blocks on the hub's event list (joins and clean exits are pushed
there) for at most the time until the earliest lease among the workers would
run out, so a death is seen within the lease plus a few milliseconds, and an
idle hub wakes at most once per lease.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, NoReturn, Optional, Union

from .. import forks, protocol
from ..checks import check_bool, check_int, check_spin, check_timeout
from ..errors import HubClosedError, HubError, NotMasterError
from ..hub import DEFAULT_LOCK_SLOTS, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_QUEUE, DEFAULT_SPIN, E, Hub
from ..locks import HeldLock
from ..process import Worker
from .link import DEFAULT_LEASE, HOST, Link, text
from .locks import RedisLock, RedisLocks
from .url import RedisURL, parse

log = logging.getLogger("clusterhub")

_PART2 = "messages over Redis are not implemented yet (issue 21); this Redis hub has locks and processes"


class RemoteWorker(Worker):
    """A worker of a Redis hub, maybe on another host (``host``)."""

    host: str

    def _signal(self, sig: int) -> None:
        if self.host != HOST:
            raise HubError(f"worker {self.id} runs on {self.host}: signalling it through the server comes with "
                           "messages over Redis (issue 21)")
        super()._signal(sig)


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
        serializer: Any = "pickle",
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
        # Hub's own parameters, checked as Hub checks them; those of messages
        # have nothing to act on until part 2, lock_slots none over Redis.
        protocol.serializer_functions(serializer)
        check_int("max_message_size", max_message_size, 1, None)
        check_int("max_queue", max_queue, 0, None)
        check_int("lock_slots", lock_slots, 1, None)
        check_bool("exit_on_master_death", exit_on_master_death)
        check_bool("batch_dispatcher", batch_dispatcher)
        check_spin(spin)
        if allowed_uids is not None:
            raise ValueError("allowed_uids is for a local hub: over Redis, the server's own authentication "
                             "decides who may connect")
        self._setup(parse(address), check_lease(DEFAULT_LEASE if lease is None else lease), authkey, master=True,
                    timeout=5.0)

    def _setup(self, url: RedisURL, lease: Optional[float], authkey: Optional[bytes], *, master: bool,
               timeout: Optional[float]) -> None:
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
        self._closed = False
        self._url = url
        self._address = url.text
        self._link = Link(url, lease, master=master, connect_timeout=timeout)
        self._rlocks = RedisLocks(self._link)
        self._workers: dict[int, RemoteWorker] = {}
        self._gone: set[int] = set()  # ids seen leaving (a late "joined" event changes nothing)
        self._settling = 0  # exits whose on_exit callbacks are running
        self._run_id = ""  # the server's, as the watcher last saw it
        self._grace_until = 0.0  # (monotonic) after a server restart: the workers take new leases meanwhile
        self._longest = 0.0  # the longest lease seen left to a worker (s)
        self._exit_callbacks: list[Callable[[Worker], Any]] = []
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._watcher: Optional[threading.Thread] = None
        self._link.join()
        forks.hubs.add(self)
        if master:
            self._watcher = threading.Thread(target=self._watch, name=f"clusterhub-members-{url.name}", daemon=True)
            self._watcher.start()

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

    # ---- locks -----------------------------------------------------------------------

    def lock(self, key: Union[str, bytes], timeout: Optional[float] = None) -> RedisLock:  # type: ignore[override]
        """A handle on the global lock named ``key`` (see :class:`RedisLock`)."""
        self._check()
        return self._rlocks.lock(key, timeout)

    def held_locks(self) -> list[HeldLock]:
        self._check()
        rows = []
        for key, pid, wid, host in self._rlocks.held():
            row = HeldLock(key, pid, wid)
            row.host = host
            rows.append(row)
        return rows

    # ---- processes -------------------------------------------------------------------

    def on_exit(self, callback: E) -> E:
        self._check_master("on_exit")
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._exit_callbacks.append(callback)
        return callback

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait until every worker has exited (its lease ended, or it left)
        and the ``on_exit`` callbacks of those exits have run; True when all
        did.  Called from an ``on_exit`` callback, it waits for the exits only."""
        self._check_master("join")
        inside = threading.current_thread() is self._watcher  # (where the callbacks run)
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
                    more = link.call(c.lpop, events, 1000) or []
                    for ev in [got[1], *more]:
                        self._event(text(ev).split(" "))
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

    def _event(self, ev: list[str]) -> None:
        if ev[0] == "joined" and len(ev) == 4:
            self._joined(int(ev[1]), int(ev[2]), ev[3])
        elif ev[0] == "rejoined" and len(ev) == 4:
            self._rejoined(int(ev[1]), int(ev[2]), ev[3])
        elif ev[0] == "left" and len(ev) == 2:
            self._exited(int(ev[1]))

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
            w = RemoteWorker(wid, pid, hub_key=("redis", self._url.text))
            w.host = host
            w.connected = True
            self._workers[wid] = w

    def _check_leases(self) -> float:
        """Workers whose lease is gone have exited; how long until the
        earliest remaining lease would run out (at most a lease)."""
        link = self._link
        with self._changed:
            wids = list(self._workers)
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
        for wid, ttl in zip(wids, ttls):
            if ttl <= 0:
                self._exited(wid)
        live = [t / 1000 + 0.003 for t in ttls if t > 0]
        return float(min([link.lease, *live]))

    def _exited(self, wid: int) -> None:
        with self._changed:
            left = self._workers.pop(wid, None)
            self._gone.add(wid)
            if left is None:
                return
            self._settling += 1  # (join() waits for its on_exit callbacks too)
        try:
            left.set_exited(None)
            try:
                self._link.call(self._link.client.hdel, self._link.key(b"procs"), str(wid))
            except HubError:
                pass  # (the next master's scan finds its lease gone)
            for cb in list(self._exit_callbacks):
                try:
                    cb(left)
                except Exception:
                    log.exception("clusterhub: on_exit callback %r failed", cb)
            left.settled.set()
        finally:
            with self._changed:
                self._settling -= 1
                self._changed.notify_all()

    # ---- the end ---------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Leave the hub: give up the lease (and the name, for the master).
        Raises LockError (and stays open) while a thread or task of this
        process holds one of its locks.  Idempotent."""
        if self._closed:
            return
        check_timeout(timeout)
        self._rlocks.retire()
        self._closed = True
        self._stop.set()
        try:
            self._link.leave()  # (its "left" event wakes the watcher: stop it before disconnecting)
            if self._watcher is not None:
                self._watcher.join(timeout)
        finally:
            self._link.disconnect()
        forks.hubs.discard(self)

    def _abandon(self) -> None:
        self._closed = True
        self._stop.set()
        self._link.abandon()
        self._rlocks.abandon()

    # ---- messages: part 2 ----------------------------------------------------------------

    def _no_messages(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._check()
        raise HubError(_PART2)

    fork = on = once = off = send_to_master = send_to_worker = send_to_workers = _no_messages
    send_to_random_worker = request_master = request_worker = request_random_worker = _no_messages
    request_workers = attach = detach = _no_messages


def connect_redis(address: str, *, timeout: Optional[float], lease: Optional[float] = None,
                  authkey: Optional[bytes] = None) -> RedisHub:
    """A worker-side Redis hub (what ``clusterhub.connect`` makes for a
    Redis address); ``lease`` None: the master's."""
    hub = object.__new__(RedisHub)
    hub._setup(parse(address), None if lease is None else check_lease(lease), authkey, master=False,
               timeout=timeout)
    return hub

