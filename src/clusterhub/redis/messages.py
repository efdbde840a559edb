"""Messages over Redis: every process has an inbox on the server, which
its dispatcher reads.

An inbox is a list (``P:inbox:<process id>``, see scripts.py) of entries:
the envelope of protocol.py (kind, origin, request id, name, data), the
origin being the sender's process id, behind an HMAC-SHA256 of it when the
hub has an ``authkey`` (checked before anything is deserialized).  A sender
appends with one script call (SEND, or BROADCAST: the fan-out happens on the
server, in one step); the order of one sender's entries is the list's.  The
script refuses a process whose lease is gone (``PeerDied`` at the sender),
and while the inbox holds more than the sender's ``max_queue`` bytes it
registers the sender to be told of room instead, so memory on the server
stays bounded by what readers keep up with.

The reader takes entries off as it reads them (one blocking pop per
wake-up, a batch on Redis 7), so an inbox holds only what is not read yet.
On Redis 7 it also subscribes to its inbox's channel on that connection
(RESP3), and a sender publishes there while the inbox is empty: such an
entry comes without a pop to issue again (see scripts.py).  Replies
complete request futures, messages and requests go to the
dispatcher's inbox, where handlers run as for a local hub.  Who reads: see
"reading" in :class:`Mail`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import select
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

import redis

from .. import protocol
from ..checks import check_callback, check_timeout
from ..dispatch import Dispatcher
from ..errors import HubError, MessageTooLarge, PeerDied, SendTimeout
from ..process import Worker
from ..remote import error_body, remote_error, reply_body
from ..requests import Callback, Done, Future, Pending, complete_all
from . import scripts, wire
from .link import AHEAD_MAX, Link, _pack, translate

log = logging.getLogger("clusterhub")

CTL = 0x40  # a control entry (not a C envelope kind): "exit" (the master's own), "signal"
TAKE_MAX = 256  # entries taken per turn
SETTLE_AT = 64 * 1024  # bytes taken before the reader counts them out of its inbox's count
AHEAD_BYTES = 256 * 1024  # the most a thread sends ahead to one inbox: see Mail._ahead
_ENV = protocol.HEADER.size
_unpack_envelope = protocol.HEADER.unpack_from
_MAC = 32  # HMAC-SHA256
_ONESHOT_IN = select.EPOLLIN | select.EPOLLONESHOT
_REPLY_KINDS = (protocol.RES, protocol.ERR)
_HANDLED_KINDS = (protocol.MSG, protocol.REQ, protocol.BCAST)


class _Pushed(list):  # type: ignore[type-arg]
    """What the server published to us, as redis-py's parser hands it back
    (see Mail._make_conn)."""


_PUSH_TYPES = (_Pushed,) if wire.PUSH is None else (_Pushed, wire.PUSH)


class Peer:
    """A process as the requests sent to it see it (their ``_channel``):
    ``leader`` and ``poke`` are those of the inbox their replies come to."""

    __slots__ = ("proc_id", "closed", "_mail")

    def __init__(self, proc_id: int, mail: "Mail") -> None:
        self.proc_id = proc_id
        self.closed = False
        self._mail = mail

    @property
    def leader(self) -> Optional[int]:
        return self._mail.leader

    def poke(self) -> None:
        self._mail._poke()


class Outbox:
    """Sends made from a thread that runs an asyncio loop (a request's, a
    reply's), done in order on a thread of their own: a server round trip,
    or a server that does not answer, must not stall the loop.  A plain
    send that thread makes while some of its own are pending waits for
    them (``drain``), so that one thread's messages keep their order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: deque[tuple[int, Callable[[], None]]] = deque()
        self._cond = threading.Condition()
        self._pending: dict[int, int] = {}  # thread -> its sends queued or running
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    def put(self, fn: Callable[[], None]) -> None:
        me = threading.get_ident()
        with self._cond:
            self._queue.append((me, fn))
            self._pending[me] = self._pending.get(me, 0) + 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self, deadline: Optional[float] = None) -> bool:
        """Wait until the calling thread's deferred sends went (False when
        ``deadline`` came first)."""
        me = threading.get_ident()
        if not self._pending.get(me):
            return True
        with self._cond:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return self._cond.wait_for(lambda: not self._pending.get(me), left)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                who, fn = self._queue.popleft()
            try:
                fn()
            except Exception:
                log.exception("clusterhub: a deferred send failed")
            finally:
                with self._cond:
                    n = self._pending[who] - 1
                    if n:
                        self._pending[who] = n
                    else:
                        del self._pending[who]
                    self._cond.notify_all()

    def stop(self, timeout: float) -> None:
        """Finish what is queued (up to ``timeout``), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)


def _signer(authkey: bytes) -> Callable[["bytes | memoryview"], bytes]:
    """HMAC-SHA256 with ``authkey``, keyed once: ``hmac.digest(key, msg,
    "sha256")`` looks the digest up in OpenSSL on every call (2.7 us here,
    against 0.8 for a copy of a keyed one)."""
    base = hmac.new(authkey, digestmod="sha256")

    def sign(data: "bytes | memoryview") -> bytes:
        h = base.copy()
        h.update(data)
        return h.digest()

    return sign


def _on_a_loop() -> bool:
    """The calling thread runs an asyncio loop (asked without the exception
    ``get_running_loop`` raises when not: this is on every request's path)."""
    return asyncio.events._get_running_loop() is not None


class Mail:
    """One process's messages over its hub's Redis link: sending, and
    reading its inbox.  ``route_sender(kind, origin)`` gives a
    message's ``sender``; ``on_control(name, origin, body)`` takes control
    entries."""

    def __init__(self, link: Link, dispatcher: Dispatcher, pending: Pending, dumps: Any, loads: Any,
                 authkey: Optional[bytes], max_len: int, max_queue: int,
                 route_sender: Callable[[int, int], Any], on_control: Callable[[str, int, memoryview], None]) -> None:
        self.link = link
        self.dispatcher = dispatcher
        self.pending = pending
        self.dumps = dumps
        self.loads = loads
        self._sign = None if authkey is None else _signer(authkey)
        self.max_len = max_len
        self.max_queue = max_queue
        self.route_sender = route_sender
        self.on_control = on_control
        self.peers: dict[int, Peer] = {}
        self.master_id = 0  # (a worker) the master its last send reached
        self._stop = threading.Event()
        self.outbox = Outbox(f"clusterhub-outbox-{link.proc_id}")
        self._rooms = threading.local()  # per thread: see _room, _slack
        self._sha_send = link._script_sha[scripts.SEND]
        self._sha_broadcast = link._script_sha[scripts.BROADCAST]
        # Reading (see below): the inbox's connection and its state.
        self.reader = threading.Lock()
        self._leader: Optional[int] = None  # (the thread reading for its reply)
        self._conn: Any = None
        self._fd = -1
        self._wire: Optional[wire.Wire] = None  # (our own reads of it, with hiredis: see _next)
        self._inbox = b""  # (our id is known once the link joined: see start)
        self._asked = self._settling = self._batch = self._nudged = False
        self._subscribed = False  # (to the inbox's channel, on this connection)
        self._paused = False  # (not watched until an attached loop ran the handlers of what came: _read_ready)
        self._fresh = True  # (connected anew: the next count-out recounts the inbox)
        self._carry = 0  # bytes taken by blocking pops or published to us, not yet counted out
        self._settle_sent = 0  # (of those, what the count-out on its way counts)
        self._channel = b""
        self._asked_at = 0.0  # (monotonic) when the outstanding pop was sent
        self._slice = 1.0  # (s) a blocking pop's: a lease, at least a second (see start)
        self._connecting = False
        self._connect_lock = threading.Lock()
        self._pumping = 0  # (the dispatcher waits for a reply in a handler)
        self._want_ask = False  # (a pop is wanted: see _let_go)
        self._warned = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        pending._remote_hook = self.wait_reply

    # ---- entries ----------------------------------------------------------------------

    def entry(self, kind: int, rid: int, nb: bytes, body: bytes) -> bytes:
        """An entry from this process (MessageTooLarge over max_message_size)."""
        frame = protocol.encode(kind, self.link.proc_id, rid, nb, body)
        if len(frame) > self.max_len:
            raise MessageTooLarge(f"message of {len(frame)} bytes is over max_message_size ({self.max_len})")
        if self._sign is not None:
            return self._sign(frame) + frame
        return frame

    def peer(self, proc_id: int) -> Peer:
        p = self.peers.get(proc_id)
        if p is None:
            p = self.peers[proc_id] = Peer(proc_id, self)
        return p

    # ---- sending ----------------------------------------------------------------------

    def send(self, target: "int | str", entry: bytes, dead: Callable[[], PeerDied],
             deadline: Optional[float] = None, bounded: bool = True, timeout: Optional[float] = None,
             expect: Optional[int] = None, ahead: bool = False) -> int:
        """Put ``entry`` in the inbox of process ``target`` ('M': the
        master's); the id it went to.  While that inbox is over max_queue
        (``bounded``) wait for room, until ``deadline`` (SendTimeout, nothing
        sent); ``dead()`` is raised when the process is not alive.  With
        'M' and ``expect``, nothing is sent when the master is another
        process: its id is returned (the caller tells by the id).

        ``ahead`` (a plain message to a process this one knows alive): it
        may go ahead of the server's answer (see :meth:`_ahead`); should
        the receiver's lease have run out meanwhile, the message is dropped
        as it would be in its inbox."""
        if not self.outbox.drain(deadline):
            raise SendTimeout(f"this thread's earlier requests and replies were not sent within {timeout} s")
        if ahead and bounded and expect is None and self._ahead(entry, target):
            return self.master_id if target == "M" else int(target)
        link = self.link
        mq = self.max_queue if bounded else -1
        args = [link.prefix, target, mq, self._room(), entry]
        if expect is not None:
            args.append(expect)
        while True:
            got = link.script(scripts.SEND, [], args)
            status, tid = got[0], got[1]
            if status >= 1:
                if target == "M":
                    self.master_id = tid
                if status == 1 and bounded:
                    self._set_slack(target, got[2])
                return int(tid)
            if status < 0:
                raise dead()
            self._wait_room(deadline, timeout)

    def broadcast(self, entry: bytes, deadline: Optional[float], timeout: Optional[float]) -> list[int]:
        """To every live worker but this process; the ids it did not reach
        by ``deadline`` (None: it waits for room as long as it takes).

        A broadcast that cannot take any inbox past max_queue goes ahead,
        without waiting for the server's answer (see :meth:`_ahead`)."""
        link = self.link
        targets: list[int] = []
        if not self.outbox.drain(deadline):
            raise SendTimeout(f"this thread's earlier requests and replies were not sent within {timeout} s")
        if self._ahead(entry, None):
            return []
        while True:
            top, full = link.script(scripts.BROADCAST, [],
                                    [link.prefix, link.proc_id, self.max_queue, self._room(), entry, *targets])
            if not full:
                if not targets:
                    self._set_slack(None, top)
                return []
            try:
                self._wait_room(deadline, timeout)
            except SendTimeout:
                return [int(t) for t in full]
            targets = full

    # Sending ahead.  A thread's slack (``_slack()``): ``all``, the room the
    # fullest inbox had at its last broadcast answered, and ``to[target]``,
    # the room of that inbox at its last message to it answered; each at
    # most AHEAD_BYTES, less what went ahead since.  A message goes ahead
    # when it fits in its receiver's; a broadcast when it fits in ``all``
    # and in every receiver's the thread has; each takes what it sends
    # from every slack it may have gone to.  So a thread's sends ahead take
    # no inbox past max_queue, and several threads' by at most AHEAD_BYTES
    # each.

    def _ahead(self, entry: bytes, target: "int | str | None") -> bool:
        """Send a message to ``target`` (None: a broadcast) ahead, with no
        bound (the script never refuses it), when it fits in the thread's
        slack; whether it went.

        What this saves: a round trip per message, and the wake-ups of
        waiting for it, which on a busy host cost the sender and the server
        more than the message itself (measured in the broadcast benchmark:
        about half the CPU time per broadcast over all processes)."""
        n = len(entry)
        t = self._slack()
        link = self.link
        if n > self._fits(t, target) or link.ahead() >= AHEAD_MAX:
            t.all = 0
            t.to.clear()
            for command, reply in link.settle():
                if command[1] == self._sha_broadcast:
                    self._set_slack(None, reply[0])
                elif reply[0] == 1:
                    self._set_slack(command[4], reply[2])
                elif reply[0] < 0:
                    log.debug("clusterhub: a message sent ahead to process %s was dropped: it is gone", reply[1])
            if n > self._fits(t, target):
                return False
        if target is None:
            sent = link.send_ahead("EVALSHA", self._sha_broadcast, 0, link.prefix, link.proc_id, -1,
                                   self._room(), entry)
        else:
            sent = link.send_ahead("EVALSHA", self._sha_send, 0, link.prefix, target, -1, self._room(), entry)
        if not sent:
            return False
        t.all -= n
        if target is None:
            for k in t.to:
                t.to[k] -= n
        else:
            t.to[target] -= n
        return True

    @staticmethod
    def _fits(t: Any, target: "int | str | None") -> int:
        """The most a message to ``target`` (None: a broadcast) may send ahead now."""
        if target is not None:
            return int(t.to.get(target, 0))
        return min(t.all, *t.to.values()) if t.to else int(t.all)

    def _slack(self) -> Any:
        """The calling thread's slack (made at its first use; a forked
        child has a Mail of its own, see RedisHub._run_child)."""
        t = self._rooms
        if not hasattr(t, "to"):
            t.all, t.to = 0, {}
        return t

    def _set_slack(self, target: "int | str | None", queued: int) -> None:
        """A slack from what the server said: the bytes now counted in
        ``target``'s inbox (None: the fullest a broadcast went to)."""
        t = self._slack()
        room = min(AHEAD_BYTES, self.max_queue - int(queued))
        if target is None:
            t.all = room
        else:
            t.to[target] = room

    def _room(self) -> bytes:
        """The calling thread's list for word of room (made once per thread:
        every send passes it)."""
        try:
            return self._rooms.key  # type: ignore[no-any-return]
        except AttributeError:
            key = self._rooms.key = self.link.prefix + b"room:%d:%d" % (self.link.proc_id, threading.get_ident())
            return key

    def _wait_room(self, deadline: Optional[float], timeout: Optional[float]) -> None:
        """Block until a reader says there is room (or a slice passed: the
        caller tries again, which also tells whether the reader died)."""
        wait = self.link.lease
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SendTimeout(f"the receiver's queue stayed full for {timeout} s")
            wait = min(wait, left)
        self.link.lock_call("BRPOP", self._room(), max(0.001, round(wait, 3)), spin=False)

    def request(self, target: "int | str", peer: Peer, name: str, body: bytes, timeout: Optional[float],
                callback: Optional[Callback], dead: Callable[[], PeerDied]) -> Future[Any]:
        """Send a request to ``target`` (whose replies come from ``peer``)."""
        nb = protocol.encode_name(name)
        check_timeout(timeout)
        if callback is not None:
            check_callback(callback)
        fut, rid = self.pending.open(self.wait_reply, peer, timeout, callback)
        try:
            entry = self.entry(protocol.REQ, rid, nb, body)
        except BaseException:
            self.pending.discard(rid)
            raise

        def send() -> None:
            # A request to the master names the master it expects: one that
            # changed gets nothing until the request's replies are matched
            # to it (a reply read before that would be dropped).
            expect = fut._channel.proc_id if target == "M" else None
            while True:
                try:
                    tid = self.send(target, entry, dead, expect=expect)
                except HubError as e:  # (PeerDied, or the server failed)
                    self.pending.fail(rid, e)
                    return
                if tid == expect or expect is None:
                    return
                fut._channel = self.peer(tid)
                expect = tid

        if _on_a_loop():
            try:
                self.link.settle()  # (the outbox's connection is another: what went ahead on ours goes first)
            except BaseException:
                self.pending.discard(rid)
                raise
            self.outbox.put(send)
            return fut
        try:
            send()
        except BaseException:
            self.pending.discard(rid)
            raise
        return fut

    def reply(self, origin: int, rid: int, ok: bool, value: Any) -> None:
        """Answer request ``rid`` of process ``origin`` (an inbox item's
        ``reply``); dropped when it has gone."""
        if _on_a_loop():
            try:
                self.link.settle()  # (as for a request)
            except HubError as e:
                log.warning("clusterhub: before the reply to request %d of process %d: %s", rid, origin, e)
            self.outbox.put(functools.partial(self._reply, origin, rid, ok, value))
        else:
            self._reply(origin, rid, ok, value)

    def _reply(self, origin: int, rid: int, ok: bool, value: Any) -> None:
        kind, body = reply_body(self.dumps, ok, value)
        try:
            try:
                entry = self.entry(kind, rid, b"", body)
            except MessageTooLarge as e:
                entry = self.entry(protocol.ERR, rid, b"", error_body(e))
            self.send(origin, entry, lambda: PeerDied("gone"), bounded=False)
        except PeerDied:
            log.debug("reply to request %d dropped: process %d is gone", rid, origin)
        except HubError as e:
            log.warning("clusterhub: the reply to request %d of process %d is lost: %s", rid, origin, e)

    # ---- reading ----------------------------------------------------------------------
    #
    # One connection reads the inbox, with one blocking pop outstanding on it
    # at a time, and whoever holds ``reader`` reads it: the dispatcher, when
    # the socket is readable (its epoll, one-shot: re-armed when the reader
    # lets go), or a thread waiting for a reply, which then reads its reply
    # itself (no hand-off from another thread: a wake-up across threads
    # costs as much as the server's work here) and routes what else came.

    def start(self) -> None:
        """Start reading (from the dispatcher's epoll; the dispatcher runs)."""
        self._stop.clear()
        self._inbox = self.link.key(b"inbox:%d" % self.link.proc_id)
        self._batch = self.link.version >= (7, 0)  # (BLMPOP, and entries published to us)
        self._channel = self.link.key(b"push:%d" % self.link.proc_id)
        self._slice = max(1, round(self.link.lease, 3))
        self.outbox.name = f"clusterhub-outbox-{self.link.proc_id}"
        self._connect()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the deferred sends; stop reading."""
        self.outbox.stop(timeout)
        self._stop.set()
        self._poke()
        with self.reader:
            self._drop()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _connect(self) -> None:
        """Connect the inbox's connection and watch it, on a thread of its
        own (connecting may block up to the connect timeout): while the
        server cannot be reached, again every half lease (at most a second)."""
        if self._stop.is_set():
            return
        with self._connect_lock:  # (not ``reader``: _failed calls this holding it)
            if self._connecting:
                return
            self._connecting = True
        threading.Thread(target=self._connect_loop, name=f"clusterhub-inbox-{self.link.proc_id}",
                         daemon=True).start()

    def _connect_loop(self) -> None:
        link = self.link
        try:
            while not self._stop.is_set():
                try:
                    conn = self._make_conn()
                    conn.connect()
                except redis.RedisError as e:
                    if not self._warned:
                        log.warning("clusterhub: process %d cannot read its inbox: %s", link.proc_id,
                                    translate(e, link.url))
                        self._warned = True
                    self._stop.wait(min(1.0, link.lease / 2))
                    continue
                # (Let go through _let_go, which re-arms the socket: the pop
                # may answer at once, and the dispatcher, finding ``reader``
                # held, leaves the one-shot event to whoever holds it.)
                self.reader.acquire()
                try:
                    if self._stop.is_set():
                        conn.disconnect()
                        return
                    self._conn = conn
                    self._fd = conn._sock.fileno()
                    self._fresh = True
                    if self._batch and wire.hiredis is not None:
                        self._wire = wire.Wire(conn._sock, None)
                    try:
                        self._ask()
                    except (redis.RedisError, OSError) as e:
                        self._drop()
                        log.debug("clusterhub: the inbox's first read failed: %s", e)
                        failed = True
                    else:
                        failed = False
                        self.dispatcher.register(self._fd, _ONESHOT_IN, self._on_readable)
                finally:
                    self._let_go()
                if failed:
                    self._stop.wait(min(1.0, link.lease / 2))
                    continue
                if self._warned:
                    log.warning("clusterhub: process %d reads its inbox again", link.proc_id)
                    self._warned = False
                return
        finally:
            self._connecting = False

    def _make_conn(self) -> Any:
        """A connection for the inbox: on Redis 7 a RESP3 one, whose parser
        (when not hiredis's: see _next) hands what the server publishes to
        us back as a :class:`_Pushed`, not taken for a reply."""
        pool = self.link.pool
        if not self._batch:
            return pool.make_connection()
        conn = pool.connection_class(**{**pool.connection_kwargs, "protocol": 3})
        conn._parser.pubsub_push_handler_func = _Pushed
        return conn

    def _next(self, conn: Any, again: bool) -> Any:
        """(Holding ``reader``) the next reply or published message that has
        come on the inbox's connection, whole (wire.NONE: none yet); an
        error reply as its exception, returned.  With hiredis we read the
        socket ourselves (see wire.py): this runs per entry."""
        if self._wire is not None:
            return self._wire.next(again)
        if not conn.can_read(0):
            return wire.NONE
        try:
            got = conn.read_response(push_request=True)
        except redis.ResponseError as e:
            return e
        if type(got) is list and len(got) == 3 and got[0] in (b"message", b"subscribe"):
            return _Pushed(got)  # (a parser that does not mark them: told by their shape)
        return got

    def _drop(self) -> None:
        """(Holding ``reader``) forget the connection (it failed, or we stop)."""
        conn, self._conn = self._conn, None
        self._wire = None
        if self._fd >= 0:
            self.dispatcher.unregister(self._fd)
            self._fd = -1
        self._asked = self._settling = self._subscribed = self._paused = False
        self._carry = self._settle_sent = 0
        self._nudged = True  # (count out first when connected again: a nudge may have been lost with it)
        if conn is not None:
            conn.disconnect()

    def _failed(self, e: BaseException) -> None:
        """(Holding ``reader``) the connection failed: drop it, and connect
        again."""
        self._drop()
        if not self._stop.is_set():
            if not self._warned:
                log.warning("clusterhub: process %d cannot read its inbox: %s", self.link.proc_id,
                            translate(e, self.link.url) if isinstance(e, redis.RedisError) else e)
                self._warned = True
            self._connect()

    def check_stalled(self) -> None:
        """(The renewer, every tenth of a lease) a blocking pop that has not
        answered long after its slice ended means a connection lost without
        a word (a host gone, a dropped route): connect anew.  ("Long": as
        long as any call of ours waits on a socket, a lease and 5 s more: a
        connection dropped while its answer is on the way loses what that
        pop took.)"""
        asked_at = self._asked_at
        if not self._asked or time.monotonic() - asked_at < self._slice + self.link.lease + 5.0:
            return
        if not self.reader.acquire(False):
            return
        done: list[Done] = []
        try:
            if self._asked and self._asked_at == asked_at:
                # (A reply waiting is not lost, only unread, after a pause, say
                # SIGSTOP: read it here, since a parser may have taken it off
                # the socket already, where no epoll sees it any more.)
                if not self._read_ready(done, True):
                    self._failed(ConnectionError("its blocking read did not answer after its slice"))
        except (redis.RedisError, OSError) as e:
            self._failed(e)
        finally:
            self._let_go()
        if done:
            complete_all(done)

    def _arm(self) -> None:
        if self._fd >= 0 and not self._paused:
            try:
                self.dispatcher.epoll.modify(self._fd, _ONESHOT_IN)
            except OSError:
                pass

    def _ask(self) -> None:
        """(Holding ``reader``) make sure a blocking pop is outstanding.

        Redis 7 pops a batch in one blocking call (BLMPOP), beside the
        inbox's channel, subscribed to once per connection; the bytes taken
        are counted out of the inbox's byte count (TAKE, with nothing to
        take) once they add up to SETTLE_AT, and when the reader comes to a
        nudge (an empty entry: a sender waits for room, see scripts.py).
        Older servers: TAKE (a batch, counted out), then BRPOP."""
        if self._asked or self._conn is None:
            return
        link = self.link
        batch = self._batch
        settle = not batch or self._nudged or self._fresh or self._carry >= SETTLE_AT
        out = b""
        if settle:
            restart = "2" if self._fresh else "1" if batch else "0"
            out = _pack(("EVALSHA", link._script_sha[scripts.TAKE], 0, link.prefix, link.proc_id, self._carry,
                         0 if batch else TAKE_MAX, 2 * link.lease_ms, restart))
            self._settle_sent = self._carry
        slice_s = self._slice
        if batch:
            if not self._subscribed:  # (after the count-out: see TAKE's restart '2')
                out += _pack(("SUBSCRIBE", self._channel))
                self._subscribed = True
            out += _pack(("BLMPOP", slice_s, 1, self._inbox, "RIGHT", "COUNT", TAKE_MAX))
        else:
            out += _pack(("BRPOP", self._inbox, slice_s))
        self._asked_at = time.monotonic()
        self._conn.send_packed_command([out], check_health=False)
        self._asked, self._settling = True, settle
        if settle:
            self._nudged = False

    def _read_ready(self, done: list[Done], eager: bool) -> bool:
        """(Holding ``reader``) read and route every reply that has come;
        whether anything was read.  The requests it completes go to
        ``done``, for the caller to complete once it let go of ``reader``
        (their callbacks may wait for replies).

        The next pop is asked for at once when ``eager`` (a thread waits for
        a reply) or nothing came for the handlers; else once the handlers
        of what came have run (an item behind them): the server then works
        on their replies first, and a process whose handlers lag leaves what
        waits in its inbox on the server, where max_queue bounds it."""
        conn = self._conn
        read = False
        pushed: list[bytes] = []  # (published entries: routed together, in order before a pop's)
        posted = later = False  # (handlers got published entries; the next pop waits for handlers)
        try:
            while conn is not None and (self._asked or self._subscribed):
                got = self._next(conn, read)
                if got is wire.NONE:
                    break
                read = True
                if type(got) in _PUSH_TYPES:
                    if got[0] == b"message":  # (not the subscription's confirmation)
                        pushed.append(got[2])
                        self._carry += len(got[2])
                    continue
                if pushed:
                    posted = self.route(pushed, done) or posted
                    pushed = []
                later = self._came(got, done, eager) or later
        finally:
            if pushed:
                posted = self.route(pushed, done) or posted
            if posted and not eager and self.dispatcher.loop is not None:
                # (Handlers on an attached loop: the socket is watched again
                # once they ran, as a pop is asked for again, so that a loop
                # that lags leaves what comes on the server, where max_queue
                # bounds it.)
                self._paused = later = True
            if later and not self._stop.is_set():
                self.dispatcher.post((None, self._ask_later, None, None))
        if self._carry >= SETTLE_AT and self._asked and not self._settling:
            self._count_out()
        return read

    def _came(self, got: Any, done: list[Done], eager: bool) -> bool:
        """(Holding ``reader``) the reply to the count-out or to the pop we
        asked for: see _read_ready.  Whether the next pop waits until the
        handlers of what came have run (else it is asked for now)."""
        if self._settling:
            self._settling = False
            if isinstance(got, redis.ResponseError):  # (the connection is fine: count out next time)
                self._nudged = True
                if isinstance(got, redis.exceptions.NoScriptError):
                    self.link.client.script_load(scripts.TAKE)
                else:
                    log.warning("clusterhub: counting out the inbox of process %d failed: %s",
                                self.link.proc_id, got)
            else:
                self._carry -= self._settle_sent
                self._fresh = False
                if got:
                    self.route(got, done)
            return False
        if isinstance(got, BaseException):
            raise got
        self._asked = False
        if got is None and self._carry:  # (idle: count out what was taken)
            self._nudged = True
        items = [] if got is None else got[1] if self._batch else [got[1]]
        if items:
            self._carry += sum(map(len, items))
            if b"" in items:  # (a nudge: a sender waits for room)
                self._nudged = True
        posted = False
        try:
            if items:
                posted = self.route(items, done)
        finally:
            if not self._stop.is_set() and (eager or not posted):
                self._ask()
        return posted and not eager

    def _count_out(self) -> None:
        """(Holding ``reader``) count out what came while the pop waits
        (published entries): over the link, not the inbox's connection,
        where the blocking pop is outstanding."""
        n = self._carry
        link = self.link
        try:
            link.script(scripts.TAKE, [], [link.prefix, link.proc_id, n, 0, 2 * link.lease_ms, "1"])
        except HubError as e:
            log.debug("clusterhub: counting out the inbox of process %d failed: %s", link.proc_id, e)
            return
        self._carry -= n

    def _ask_later(self, _sender: Any) -> None:
        """(An inbox item, after the handlers of a batch) ask for the next,
        and watch the socket again: now if ``reader`` is free, else its
        holder does as it lets go."""
        self._paused = False
        self._want_ask = True
        if self.reader.acquire(False):
            self._let_go()

    def _let_go(self) -> None:
        """Let go of ``reader`` (and watch the socket again), asking for the
        next pop first if one is wanted and none is out.  (Wanted once more
        after letting go: taken again, so that a want set meanwhile by a
        thread that found ``reader`` held is never lost.)"""
        while True:
            try:
                if self._want_ask:
                    self._want_ask = False
                    if not self._asked and not self._stop.is_set():
                        self._ask()
            except (redis.RedisError, OSError) as e:
                self._failed(e)
            finally:
                self.reader.release()
                self._arm()
            if not self._want_ask or not self.reader.acquire(False):
                return

    def _on_readable(self, _ev: int) -> None:
        """(The dispatcher's epoll) the inbox's socket is readable."""
        if not self.reader.acquire(False):
            return  # (a waiting requester reads it; it re-arms when it lets go)
        done: list[Done] = []
        try:
            self._read_ready(done, self._pumping > 0)
        except (redis.RedisError, OSError) as e:
            self._failed(e)
        except Exception:
            log.exception("clusterhub: reading the inbox of process %d failed", self.link.proc_id)
        finally:
            self._let_go()
        if done:
            complete_all(done)

    @property
    def leader(self) -> Optional[int]:
        return self._leader

    def _poke(self) -> None:
        """Wake a requester reading the inbox (its request ended otherwise)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def wait_reply(self, fut: Future[Any], timeout: Optional[float]) -> Optional[float]:
        """``Future.result()``'s hook: read the inbox ourselves until ``fut``
        is done (or ``timeout``), unless someone else reads it (then the
        base class waits, and the reader completes it).  On the dispatcher
        thread, serve it (a handler waiting for its request)."""
        if threading.get_ident() == self.dispatcher.ident:
            # (A handler waits: what comes is read at once, and the next
            # pop asked for, the handler's own item behind it cannot.)
            self._pumping += 1
            try:
                self._ask_later(None)
                return self.pending._wait_local(fut, timeout)
            finally:
                self._pumping -= 1
        while True:  # (again after completing others' replies it read)
            timeout, again = self._lead(fut, timeout)
            if not again:
                return timeout

    def _lead(self, fut: Future[Any], timeout: Optional[float]) -> tuple[Optional[float], bool]:
        """One turn of :meth:`wait_reply` off the dispatcher: (the timeout
        left, whether to lead again: it completed others' replies, ours
        pending)."""
        if fut.done() or not self.reader.acquire(False):
            return timeout, False
        deadline = None if timeout is None else time.monotonic() + timeout
        done: list[Done] = []
        self._leader = threading.get_ident()
        try:
            p = select.poll()
            conn = self._conn
            if conn is None or conn._sock is None:
                return timeout, False
            p.register(conn._sock, select.POLLIN)
            p.register(self._wake_r, select.POLLIN)
            while not fut.done() and not self._stop.is_set():
                try:
                    if not self._asked:
                        self._ask()
                    if self._read_ready(done, True):
                        if done:  # (ours among them, maybe: complete them, then look)
                            break
                        continue
                    if self._conn is not conn:
                        break
                    ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000) + 1)
                    if deadline is not None and ms <= 1 and time.monotonic() >= deadline:
                        break
                    for fd, _ev in p.poll(ms):
                        if fd == self._wake_r:
                            with contextlib.suppress(BlockingIOError):
                                os.read(self._wake_r, 64)
                except (redis.RedisError, OSError) as e:
                    self._failed(e)
                    break
        finally:
            self._leader = None
            self._let_go()
            if done:
                complete_all(done)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        return left, bool(done) and not fut.done() and (left is None or left > 0)

    def route(self, entries: list[bytes], done: list[Done]) -> bool:
        """Route what came: replies to the pending table (completed through
        ``done``: see _read_ready), messages and requests to the dispatcher,
        control entries to ``on_control``; whether the dispatcher got any."""
        posted = False
        items: list[Any] = []
        loads, pending = self.loads, self.pending
        for raw in entries:
            if not raw:
                continue  # (stop()'s wake-up)
            buf = memoryview(raw)
            if self._sign is not None:
                if len(raw) < _MAC or not hmac.compare_digest(self._sign(buf[_MAC:]), raw[:_MAC]):
                    log.error("clusterhub: an entry in the inbox of process %d failed its HMAC check: dropped",
                              self.link.proc_id)
                    continue
                buf = buf[_MAC:]
            if len(buf) < _ENV:
                log.error("clusterhub: a malformed entry (shorter than the envelope): dropped")
                continue
            kind, origin, rid, nlen = _unpack_envelope(buf, 0)
            at = _ENV + nlen
            if kind in _REPLY_KINDS:
                peer = self.peers.get(origin)
                if kind == protocol.RES:
                    try:
                        ok, value = True, loads(buf[at:])
                    except Exception as e:
                        ok, value = False, HubError(f"cannot decode the reply: {e!r}")
                else:
                    ok, value = False, remote_error(buf[at:])
                pending.complete(peer, rid, ok, value, done)
                continue
            try:
                name = str(buf[_ENV:at], "utf-8")
            except UnicodeDecodeError:
                log.error("clusterhub: a malformed entry (its name is not UTF-8): dropped")
                continue
            if kind == CTL:
                if items:  # (what came before it is handled before it)
                    self._post(items)
                    items = []
                    posted = True
                try:
                    self.on_control(name, origin, buf[at:])
                except Exception:
                    log.exception("clusterhub: control entry %r failed", name)
                continue
            if kind not in _HANDLED_KINDS:
                log.error("clusterhub: an entry of unknown kind %d: dropped", kind)
                continue
            try:
                data = loads(buf[at:])
            except Exception as e:
                log.error("cannot decode the data of %r: %r", name, e)
                if kind == protocol.REQ:
                    self.reply(origin, rid, False, e)
                continue
            reply = functools.partial(self.reply, origin, rid) if kind == protocol.REQ else None
            try:
                sender = self.route_sender(kind, origin)
            except Exception as e:  # (looking it up on the server failed: a stand-in)
                log.debug("clusterhub: the sender of %r: %s", name, e)
                sender = Worker(origin)
            items.append((name, data, sender, reply))
        if items:
            self._post(items)
            posted = True
        return posted

    def _post(self, items: list[Any]) -> None:
        self.dispatcher.inbox.extend(items[:-1])
        self.dispatcher.post(items[-1])

    def control(self, target: int, name: str, body: bytes) -> None:
        """Put a control entry in ``target``'s inbox (unbounded; PeerDied
        when it is gone)."""
        entry = self.entry(CTL, 0, protocol.encode_name(name), body)
        self.send(target, entry, lambda: PeerDied(f"process {target} is gone"), bounded=False)

    def abandon(self) -> None:
        """In a fork child: the outbox thread is not there, the connection
        is the parent's (closed here without a word to the server: redis-py
        shuts a socket down only in the process that connected it)."""
        self._stop.set()
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()
        self.outbox = Outbox(self.outbox.name)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
