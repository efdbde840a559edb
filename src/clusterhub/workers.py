"""The process layer of a local hub: who the processes are and how they are
joined.

It owns the workers (ids, handles, channels, the exit watcher's pidfds),
forks them, turns a forked child into a worker, watches the master from a
worker, and learns of each worker's exit: as soon as the kernel reports it
(``workers``, ``Worker.join``, ``exitcode``), then, on the dispatcher, after
everything the worker sent was routed, its ``on_exit`` callbacks.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import select
import signal
import socket
import threading
import time
import traceback
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from . import _bindings, process, sched
from ._bindings import PeerGone
from .address import Listener, listen
from .channel import Channel
from .dispatch import Dispatcher
from .errors import HubError, MasterDied, SendTimeout, WorkerDied
from .handshake import master_handshake
from .locks import Locks
from .process import ExitWatcher, Worker, exit_process, flush_stdio, reap, run_target
from .requests import Pending

if TYPE_CHECKING:
    from .router import Router

log = logging.getLogger("clusterhub")

WorkerRef = Union[Worker, int]

_MAX_HANDSHAKES = 64  # connections being admitted at once (more are dropped)
# After a connected worker's channel closed: how long its process has to be
# seen exiting (with its exit status) before it is reported as having left.
_LEFT_GRACE = 0.05

# One hub fork at a time in this process: a fork by one thread must not
# inherit the fresh socketpair of another thread's fork.
_fork_lock = threading.Lock()


def _new_fork_lock() -> None:
    global _fork_lock
    _fork_lock = threading.Lock()  # held by the forking thread, maybe: a worker may fork too


os.register_at_fork(after_in_child=_new_fork_lock)


# The process layers of this process's open hubs (Worker pickles name one by key).
_layers: "weakref.WeakSet[Processes]" = weakref.WeakSet()


def _resolve_worker(key: Any, wid: int) -> Optional[Worker]:
    """An unpickled Worker reference: this process's Worker for ``wid`` in
    the hub with ``key`` (see Worker.__reduce__)."""
    for layer in list(_layers):
        if layer.key == key and not layer.closed:
            return layer.resolve(wid)
    return None


process.resolve_worker = _resolve_worker


class Processes:
    """The master and its forked workers, as this process sees them."""

    def __init__(
        self, key: Any, dispatcher: Dispatcher, pending: Pending, locks: Locks,
        max_len: int, max_queue: int, exit_on_master_death: bool, spin: float,
    ) -> None:
        self.key = key  # shared by the master and its workers: Worker pickles name it
        self.dispatcher = dispatcher
        self.pending = pending
        self.locks = locks
        self.router: "Router"  # set by the hub (the router needs us first)
        self.max_len = max_len
        self.max_queue = max_queue
        self.exit_on_master_death = exit_on_master_death
        self.spin = spin  # (seconds: see Hub)
        self.pid = os.getpid()
        self.is_master = True
        self.worker_id: Optional[int] = None
        self.closed = False
        self.state_lock = threading.Lock()
        self.workers: dict[int, Worker] = {}  # live (the kernel has not reported an exit)
        self._fan: Optional[tuple[list[Worker], _bindings.Fanout]] = None  # (see fanout)
        self.unsettled: dict[int, Worker] = {}  # forked, on_exit callbacks not yet run
        # Every Worker handed out, while referenced: a pickled one comes back as itself.
        self.known: "weakref.WeakValueDictionary[int, Worker]" = weakref.WeakValueDictionary()
        self.next_id = 1
        self.exit_callbacks: list[Callable[[Worker], Any]] = []
        self.master: Optional[Channel] = None  # a worker's channel to its master
        self.master_gone = threading.Event()  # (a worker: the dispatcher saw the master go)
        self.exits = ExitWatcher(f"clusterhub-master-{self.pid}-exits", self._exited)
        self.listener: Optional[Listener] = None  # the master's, with an address
        self._admit_args: dict[str, Any] = {}  # (what the handshake checks)
        self._admitting = threading.BoundedSemaphore(_MAX_HANDSHAKES)
        self.connected = False  # a process that joined its master by address
        _layers.add(self)

    # ---- the master: forking ------------------------------------------------

    def fork(self, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             forking: Callable[[bool], None]) -> Worker:
        """Fork a worker running ``target``; ``forking(True/False)`` brackets
        the fork (see forks.py).

        Why forking with the hub's threads running is safe: nothing they hold
        is used in the child.  There the dispatcher (its thread, epoll, inbox,
        timers and locks) is made anew, the other workers' channels and
        pidfds are closed without touching their buffers, the C send queues
        take their mutex around the fork (``pthread_atfork``), the lock table
        re-reads the child's identity, and hub forks are serialized here.
        """
        flush_stdio()  # or the child inherits, and prints again, unflushed output
        # (The exit watcher's lock: a child closes the pidfds it sees.)
        with _fork_lock, self.state_lock, self.exits.lock:
            mfd, wfd = _bindings.socketpair()
            wid = self.next_id
            self.next_id += 1
            forking(True)
            batched = sched.is_batched()  # (forking from a handler: see sched.py)
            try:
                with warnings.catch_warnings():
                    # 3.12+ warns about fork() with threads; ours hold no lock the child needs.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    pid = os.fork()
            finally:
                forking(False)
            if pid == 0:
                try:
                    if batched:
                        sched.reset()
                    self._run_worker(wid, mfd, wfd, target, args, kwargs)  # never returns...
                finally:
                    os._exit(1)  # ...even if a second Ctrl-C hits its exit path
            os.close(wfd)
            w = Worker(wid, pid, self.wait_event, self.key)
            w.channel = self._channel(mfd, w, pid)
            self.workers[wid] = w
            self._fan = None
            self.unsettled[wid] = w
            self.known[wid] = w
            self.exits.watch(w, os.pidfd_open(pid))
        self.dispatcher.call_soon(w.channel.watch)
        return w

    def _channel(self, fd: int, peer: Optional[Worker], peer_pid: int, peer_tid: int = 0) -> Channel:
        ch = Channel(fd, peer, self.max_len, self.max_queue, self.dispatcher, self.router,
                     self.spin, peer_pid, peer_tid)
        _bindings.start_writer()  # (a first burst need not wait for its creation)
        return ch

    # ---- the master: processes that connect by address ----------------------------

    def listen(self, address: str, serializer: str, authkey: Optional[bytes],
               allowed_uids: Any) -> str:
        """Accept processes that connect to ``address`` (see address.py); the
        address as processes name it."""
        self.listener = listen(address)
        self._admit_args = {"serializer": serializer, "authkey": authkey,
                            "allowed_uids": tuple(allowed_uids or ())}
        self.dispatcher.register(self.listener.fileno(), select.EPOLLIN, self._on_listener)
        return self.listener.address.text

    def _on_listener(self, _ev: int) -> None:
        """On the dispatcher: take every pending connection; each handshake
        runs on a thread of its own (it blocks, within its deadlines)."""
        listener = self.listener
        while listener is not None and not self.closed:
            try:
                conn = listener.accept()
            except OSError as e:  # (EMFILE...: the connection stays pending)
                log.error("clusterhub: cannot accept a connection on %s: %s", listener.address.text, e)
                return
            if conn is None:
                return
            if not self._admitting.acquire(blocking=False):
                log.warning("clusterhub: too many handshakes at once: a connection dropped")
                conn.close()
                continue
            threading.Thread(target=self._admit, args=(conn,), daemon=True,
                             name=f"clusterhub-master-{self.pid}-handshake").start()

    def _admit(self, conn: socket.socket) -> None:
        """A connected process's handshake, then it is a worker like any other."""
        try:
            try:
                acc = master_handshake(conn, assign_id=self._assign_id,
                                       fds={"locks": self.locks.table.fileno()}, **self._admit_args)
            except HubError as e:
                log.info("clusterhub: connection refused: %s", e)
                conn.close()
                return
            with self.state_lock:
                if self.closed:
                    acc.close()
                    conn.close()
                    return
                conn.setblocking(False)
                w = Worker(acc.worker_id, acc.pid, self.wait_event, self.key)
                w.connected = True
                w.pidfd = os.dup(acc.pidfd)  # (ours for signals; the watcher owns acc's)
                w.channel = self._channel(conn.detach(), w, acc.pid)
                self.workers[w.id] = w
                self._fan = None
                self.unsettled[w.id] = w
                self.known[w.id] = w
                self.exits.watch(w, acc.pidfd)
            log.info("clusterhub: worker %d (pid %d) connected", w.id, w.pid)
            self.dispatcher.call_soon(w.channel.watch)
        finally:
            self._admitting.release()

    def worker_left(self, w: Worker) -> None:
        """A connected worker's channel closed (on the dispatcher).  Its
        process may be exiting (its pidfd then tells, with its status) or go
        on: it left the hub, and may even connect again as a new worker.
        Which one is decided a moment later, off the dispatcher."""
        self.dispatcher.call_later(_LEFT_GRACE, lambda: self._left(w))

    def _left(self, w: Worker) -> None:
        pidfd = w.pidfd
        if pidfd is not None and select.select([pidfd], [], [], 0)[0]:
            return  # it exited: the exit watcher reports it, with its code
        if self.exits.unwatch(w):
            self._exited(w)

    def _assign_id(self) -> int:
        with self.state_lock:
            wid = self.next_id
            self.next_id += 1
            return wid

    # ---- a process that joins its master by address --------------------------------

    def join_master(self, fd: int, master_pidfd: Optional[int], master_pid: int) -> None:
        """Read and write the master's channel, a handshaken socket ``fd``
        (see connect.py; worker_id and connected are set already)."""
        self.locks.table.set_worker_id(self.worker_id)
        self.master = ch = self._channel(fd, None, master_pid)
        ch.watch()
        if self.exit_on_master_death:
            self._watch_master(master_pidfd)

    # ---- the child: becoming a worker ------------------------------------------

    def _run_worker(
        self, wid: int, mfd: int, wfd: int, target: Callable[..., Any],
        args: tuple[Any, ...], kwargs: dict[str, Any],
    ) -> None:
        code = 1
        try:
            self._become_worker(wid, mfd, wfd)
            code = run_target(target, args, kwargs)
            self.flush_master()
        except KeyboardInterrupt:
            code = -signal.SIGINT
        except BaseException:
            traceback.print_exc()
        finally:
            exit_process(code)

    def _become_worker(self, wid: int, mfd: int, wfd: int) -> None:
        master_pid = self.pid  # still the parent's
        master_tid = self.dispatcher.native_id  # (the master's thread that answers)
        os.close(mfd)
        for w in self.workers.values():
            if w.channel is not None:
                w.channel.abandon()  # or a sibling would keep the master's end open
        self.exits.abandon()
        self.workers = {}
        self._fan = None
        self.unsettled = {}
        self.known = weakref.WeakValueDictionary()
        self.exit_callbacks = []
        if self.listener is not None:
            self.listener.abandon()  # (closed in every child already: see address.py)
            self.listener = None
        self.is_master = False
        self.worker_id = wid
        self.pid = os.getpid()
        self.state_lock = threading.Lock()
        self.pending.reset()
        self.locks.after_fork_child(wid)
        d = self.dispatcher
        d.reinit_after_fork(f"worker-{wid}")
        self.master = ch = self._channel(wfd, None, master_pid, master_tid)
        self.master_gone = threading.Event()
        ch.watch()
        d.start()
        if self.exit_on_master_death:
            try:
                pidfd: Optional[int] = os.pidfd_open(master_pid)
            except ProcessLookupError:
                pidfd = None  # gone already
            self._watch_master(pidfd)

    def _watch_master(self, pidfd: Optional[int]) -> None:
        """exit_on_master_death must hold while a handler keeps the dispatcher
        busy: a thread waits for the master to exit and, unless the dispatcher
        dealt with it within a grace period (it reads the replies already
        sent), fails the pending requests and exits itself.  It waits on the
        master's pidfd, not on the socket: a socket wakes every poller on
        every incoming frame.  (``pidfd``: None when the master is gone already.)"""

        def watch() -> None:
            if pidfd is not None:
                select.select([pidfd], [], [])
            if self.master_gone.wait(0.5) or self.closed:
                return
            self.pending.fail_all(lambda: MasterDied("the master has died"))
            exit_process(1)

        threading.Thread(target=watch, name=f"clusterhub-worker-{self.worker_id}-watch",
                         daemon=True).start()

    def master_lost(self) -> None:
        """A worker's channel to its master is gone (the router saw it)."""
        self.master_gone.set()
        self.master_unreachable()
        self.pending.fail_all(lambda: MasterDied("the master has died"))
        if self.exit_on_master_death:
            exit_process(1)

    def master_unreachable(self) -> None:
        """The master is gone (seen by the router, or by a sender first).  A
        connected process's lock table is then no longer the one the others
        use (no split brain): its lock calls raise MasterDied from now on."""
        if self.connected and self.locks.ptr is not None:
            self.locks.orphan(MasterDied("the master has died: its lock table is gone"))

    def detached(self) -> None:
        channels = [w.channel for w in list(self.workers.values())] + [self.master]
        for ch in channels:
            lead = None if ch is None else ch.loop_lead
            if lead is not None:
                lead.abandon()

    def master_channel(self) -> Channel:
        """A worker's channel to its master; MasterDied once it is gone."""
        ch = self.master
        if ch is None or ch.closed:
            raise MasterDied("the master has died")
        return ch

    def flush_master(self) -> None:
        """Block until everything sent to the master is written (or it died)."""
        ch = self.master
        if ch is None or ch.closed:
            return
        try:
            ch.wait_room(limit=0)
        except PeerGone:
            pass

    # ---- workers' exits --------------------------------------------------------

    def _exited(self, w: Worker, code: Optional[int] = None) -> None:
        """On the exit watcher's thread, as soon as the kernel reports the
        exit: reap, and reflect it (``workers``, ``join``, ``exitcode``); the
        dispatcher then handles what the worker sent (``_settle``)."""
        if w.connected:  # never reaped here (its parent will): code read with WNOWAIT, if ours
            pidfd, w.pidfd = w.pidfd, None
            if pidfd is not None:
                os.close(pidfd)
        else:
            code = reap(w.pid) if w.pid is not None else None
        with self.state_lock:
            self.workers.pop(w.id, None)
            self._fan = None
        w.set_exited(code)
        self.dispatcher.call_soon(lambda: self._settle(w))

    def _settle(self, w: Worker) -> None:
        """On the dispatcher: route all ``w`` sent, then queue its on_exit
        callbacks behind its messages."""
        self.router.drain_exited(w)
        self.dispatcher.inbox.append((None, self._run_exit_callbacks, w, None))

    def _run_exit_callbacks(self, w: Worker) -> None:
        for cb in list(self.exit_callbacks):
            try:
                cb(w)
            except Exception:
                log.exception("on_exit callback %r failed", cb)
        self.unsettled.pop(w.id, None)
        w.settled.set()

    def wait_event(self, ev: threading.Event, timeout: Optional[float]) -> bool:
        """Worker.join's wait: on the dispatcher thread, serve the sockets meanwhile."""
        if self.dispatcher.on_thread:
            self.dispatcher.pump_until(ev.is_set, timeout)
            return ev.is_set()
        return ev.wait(timeout)

    def join(self, timeout: Optional[float]) -> bool:
        """Wait until every worker exited and was settled (see Hub.join)."""
        d = self.dispatcher
        me = threading.get_ident()
        exits_only = me == d.ident or me == d.handler_ident
        deadline = None if timeout is None else time.monotonic() + timeout
        for w in list(self.unsettled.values()):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not (w.join(left) if exits_only else w.settled.wait(left)):
                return False
        return True

    # ---- messages to several workers (the master) ------------------------------------

    def broadcast(self, payload: bytes, timeout: Optional[float]) -> None:
        """Post a whole message frame to every live worker.  With ``timeout``,
        the workers whose queue is full get it last, as they make room, until
        ``timeout``: SendTimeout then names those it did not reach."""
        n = len(payload)
        if timeout is None:
            ws, fan = self.fanout()
            got = fan.post(payload, self.max_len, self.max_queue)
            if got is not None:  # (a queue over max_queue, or a post that failed)
                for w, queued in zip(ws, got):
                    if queued < 0 or queued > self.max_queue:
                        try:
                            w.channel.post_backlog(queued, n - _bindings.MSG_HEADER)  # type: ignore[union-attr]
                        except WorkerDied:
                            pass  # it is exiting; on_exit will report it
            return
        full: list[Worker] = []
        for w in list(self.workers.values()):
            ch = w.channel
            if ch is None:
                continue
            if timeout is not None and ch.pending() > ch.max_queue:
                full.append(w)
                continue
            queued = ch.post(payload, n, ch.max_len)
            if queued < 0 or (timeout is None and queued > ch.max_queue):
                try:
                    ch.post_backlog(queued, n - _bindings.MSG_HEADER)
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
                if not ch.post_by(post, n - _bindings.MSG_HEADER, deadline):
                    unreached.append(w)
            except WorkerDied:
                pass
        if unreached:
            ids = ", ".join(str(w.id) for w in unreached)
            raise SendTimeout(
                f"broadcast not sent to worker(s) {ids}: their queue stayed full for {timeout} s",
                unreached,
            )

    def fanout(self) -> tuple[list[Worker], _bindings.Fanout]:
        """The live workers with a channel, and their queues for one C
        call to post a broadcast (or a relayed one) to.  Made again after ``workers`` changed:
        each change sets ``_fan`` to None under ``state_lock``, which this
        holds while it makes one (so a change made meanwhile is never
        overwritten by a list made before it)."""
        fan = self._fan
        if fan is None:
            with self.state_lock:
                ws = [w for w in self.workers.values() if w.channel is not None]
                fan = (ws, _bindings.Fanout([(w.channel.tx, w.channel.fd) for w in ws]))  # type: ignore[union-attr]
                self._fan = fan
        return fan

    def send_random(self, payload: bytes, timeout: Optional[float]) -> Optional[Worker]:
        """Post a whole message frame to one live worker chosen at random; it, or None."""
        candidates = list(self.workers.values())
        random.shuffle(candidates)
        for w in candidates:
            ch = w.channel
            if ch is None:
                continue
            try:
                if timeout is None:
                    ch.post_frame(payload)
                else:
                    post = functools.partial(ch.post, payload, len(payload), ch.max_len)
                    ch.post_timed(post, len(payload) - _bindings.MSG_HEADER, timeout, w)
                return w
            except WorkerDied:
                continue
        return None

    # ---- references ---------------------------------------------------------------

    def worker(self, worker: WorkerRef) -> Worker:
        """The live worker a Worker or id stands for: ValueError if it never
        was one of ours, WorkerDied once it exited."""
        if isinstance(worker, Worker):
            if worker.hub_key != self.key or not 1 <= worker.id < self.next_id:
                raise ValueError(f"{worker!r} is not a worker of this hub")
            w = self.workers.get(worker.id)  # (the live one, if a copy came by pickle)
            if w is None:
                raise WorkerDied(f"worker {worker.id} has exited")
        elif isinstance(worker, int) and not isinstance(worker, bool):
            w = self.workers.get(worker)
            if w is None:
                if 1 <= worker < self.next_id:
                    raise WorkerDied(f"worker {worker} has exited")
                raise ValueError(f"no worker {worker} in this hub")
        else:
            raise TypeError(f"worker must be a Worker or an int id, not {type(worker).__name__}")
        if w.channel is None or w.channel.closed:
            raise WorkerDied(f"worker {w.id} has exited")
        return w

    def resolve(self, wid: int) -> Optional[Worker]:
        """An unpickled Worker reference: this process's Worker for ``wid``."""
        if not self.is_master:
            return self.router.peer(wid)
        w = self.known.get(wid)
        if w is None and 1 <= wid < self.next_id:
            w = Worker(wid, hub_key=self.key)  # long gone: a handle that says so
            w.set_exited(None)
        return w

    # ---- the end -------------------------------------------------------------------

    def stop_workers(self, timeout: float) -> Optional[BaseException]:
        """SIGTERM the live workers (the master) or flush to the master (a
        worker); SIGKILL those left after ``timeout``.  A KeyboardInterrupt
        meanwhile kills them at once and is returned, to raise later."""
        workers = [w for w in self.workers.values() if not w.connected]  # (those see MasterDied)
        try:
            if self.is_master:
                for w in workers:
                    w.terminate()
                deadline = time.monotonic() + timeout
                for w in workers:
                    if not w.join(max(0.0, deadline - time.monotonic())):
                        w.kill()
                for w in workers:
                    w.join(5.0)
            else:
                self.flush_master()
        except KeyboardInterrupt as e:  # a second Ctrl-C: finish at once
            for w in workers:
                w.kill()
            return e
        return None

    def stop_watching(self) -> None:
        """Stop learning of exits (close, after stop_workers)."""
        self.exits.stop()  # (quick: it runs no user code)

    def close(self) -> None:
        """Close the channels (after stop_watching and the dispatcher's stop)."""
        self.closed = True
        if self.listener is not None:
            self.dispatcher.unregister(self.listener.fileno())
            self.listener.close()
        for w in list(self.known.values()):
            if w.channel is not None:
                w.channel.close()
        for w in list(self.unsettled.values()):
            w.settled.set()  # (a thread waiting in join() gives up on the handlers)
        if self.master is not None:
            self.master.close()

    def abandon(self) -> None:
        """In a child forked by other code: close our copies, touch nothing else."""
        self.closed = True
        for w in self.workers.values():
            if w.channel is not None:
                w.channel.abandon()
        self.exits.abandon()
        if self.listener is not None:
            self.listener.abandon()
        if self.master is not None:
            self.master.abandon()
