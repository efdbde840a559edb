"""Messages over Redis: every process has an inbox on the server, and a
thread that reads it.

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

The reader takes entries off as it reads them (TAKE, pipelined with the
BRPOP that waits for the next: one round trip per wake-up), so an inbox
holds only what is not read yet; replies complete request futures on the
reader's thread, messages and requests go to the dispatcher's inbox, where
handlers run as for a local hub.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

import redis

from .. import protocol
from ..checks import check_callback, check_timeout
from ..dispatch import Dispatcher
from ..errors import HubError, MessageTooLarge, PeerDied, SendTimeout
from ..remote import error_body, remote_error
from ..requests import Callback, Future, Pending
from . import scripts
from .link import Link, _pack, translate

log = logging.getLogger("clusterhub")

CTL = 0x40  # a control entry (not a C envelope kind): "exit" (the master's own), "signal"
TAKE_MAX = 256  # entries taken per turn
_ENV = protocol.HEADER.size
_unpack_envelope = protocol.HEADER.unpack_from
_MAC = 32  # HMAC-SHA256


class Peer:
    """A process as the requests sent to it see it (their ``_channel``)."""

    __slots__ = ("proc_id", "leader", "closed")

    def __init__(self, proc_id: int) -> None:
        self.proc_id = proc_id
        self.leader = None  # (no thread reads a channel for it: the reader thread completes)
        self.closed = False

    def poke(self) -> None:
        pass


class Outbox:
    """Sends made from a thread that runs an asyncio loop (a request's, a
    reply's), done in order on a thread of their own: a server round trip,
    or a server that does not answer, must not stall the loop.  A plain
    send made while some are pending waits for them (``drain``), so that
    one thread's messages keep their order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._busy = 0  # queued or running
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    def put(self, fn: Callable[[], None]) -> None:
        with self._cond:
            self._queue.append(fn)
            self._busy += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self) -> None:
        if self._busy and threading.current_thread() is not self._thread:
            with self._cond:
                self._cond.wait_for(lambda: not self._busy)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                fn = self._queue.popleft()
            try:
                fn()
            except Exception:
                log.exception("clusterhub: a deferred send failed")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._cond.notify_all()

    def stop(self, timeout: float) -> None:
        """Finish what is queued (up to ``timeout``), then end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)


def _on_a_loop() -> bool:
    """The calling thread runs an asyncio loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Mail:
    """One process's messages over its hub's Redis link: sending, and the
    reader thread of its inbox.  ``route_sender(kind, origin)`` gives a
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
        self.authkey = authkey
        self.max_len = max_len
        self.max_queue = max_queue
        self.route_sender = route_sender
        self.on_control = on_control
        self.peers: dict[int, Peer] = {}
        self.master_id = 0  # (a worker) the master its last send reached
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.outbox = Outbox(f"clusterhub-outbox-{link.proc_id}")

    # ---- entries ----------------------------------------------------------------------

    def entry(self, kind: int, rid: int, nb: bytes, body: bytes) -> bytes:
        """An entry from this process (MessageTooLarge over max_message_size)."""
        frame = protocol.encode(kind, self.link.proc_id, rid, nb, body)
        if len(frame) > self.max_len:
            raise MessageTooLarge(f"message of {len(frame)} bytes is over max_message_size ({self.max_len})")
        if self.authkey is not None:
            return hmac.digest(self.authkey, frame, "sha256") + frame
        return frame

    def peer(self, proc_id: int) -> Peer:
        p = self.peers.get(proc_id)
        if p is None:
            p = self.peers[proc_id] = Peer(proc_id)
        return p

    # ---- sending ----------------------------------------------------------------------

    def send(self, target: "int | str", entry: bytes, dead: Callable[[], PeerDied],
             deadline: Optional[float] = None, bounded: bool = True, timeout: Optional[float] = None) -> int:
        """Put ``entry`` in the inbox of process ``target`` ('M': the
        master's); the id it went to.  While that inbox is over max_queue
        (``bounded``) wait for room, until ``deadline`` (SendTimeout, nothing
        sent); ``dead()`` is raised when the process is not alive."""
        link = self.link
        mq = self.max_queue if bounded else -1
        self.outbox.drain()
        while True:
            status, tid = link.script(scripts.SEND, [], [link.prefix, target, mq, self._room(), entry])
            if status == 1:
                if target == "M":
                    self.master_id = tid
                return int(tid)
            if status < 0:
                raise dead()
            self._wait_room(deadline, timeout)

    def broadcast(self, entry: bytes, deadline: Optional[float], timeout: Optional[float]) -> list[int]:
        """To every live worker but this process; the ids it did not reach
        by ``deadline`` (None: it waits for room as long as it takes)."""
        link = self.link
        targets: list[int] = []
        self.outbox.drain()
        while True:
            full = link.script(scripts.BROADCAST, [],
                               [link.prefix, link.proc_id, self.max_queue, self._room(), entry, *targets])
            if not full:
                return []
            try:
                self._wait_room(deadline, timeout)
            except SendTimeout:
                return [int(t) for t in full]
            targets = full

    def _room(self) -> bytes:
        return self.link.prefix + b"room:%d:%d" % (self.link.proc_id, threading.get_ident())

    def _wait_room(self, deadline: Optional[float], timeout: Optional[float]) -> None:
        """Block until a reader says there is room (or a slice passed: the
        caller tries again, which also tells whether the reader died)."""
        wait = self.link.lease
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SendTimeout(f"the receiver's queue stayed full for {timeout} s")
            wait = min(wait, left)
        self.link.lock_call("BRPOP", self._room(), max(0.001, round(wait, 3)))

    def request(self, target: "int | str", peer: Peer, name: str, body: bytes, timeout: Optional[float],
                callback: Optional[Callback], dead: Callable[[], PeerDied]) -> Future[Any]:
        """Send a request to ``target`` (whose replies come from ``peer``)."""
        nb = protocol.encode_name(name)
        check_timeout(timeout)
        if callback is not None:
            check_callback(callback)
        fut, rid = self.pending.open(self.pending._local_hook, peer, timeout, callback)
        try:
            entry = self.entry(protocol.REQ, rid, nb, body)
        except BaseException:
            self.pending.discard(rid)
            raise

        def send() -> None:
            try:
                tid = self.send(target, entry, dead)
            except HubError as e:  # (PeerDied, or the server failed)
                self.pending.fail(rid, e)
                return
            if tid != peer.proc_id:  # (the master changed: its replies come from the new one)
                fut._channel = self.peer(tid)

        if _on_a_loop():
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
            self.outbox.put(functools.partial(self._reply, origin, rid, ok, value))
        else:
            self._reply(origin, rid, ok, value)

    def _reply(self, origin: int, rid: int, ok: bool, value: Any) -> None:
        if ok:
            try:
                kind, body = protocol.RES, self.dumps(value)
            except Exception as e:
                ok, value = False, e
        if not ok:
            kind, body = protocol.ERR, error_body(value)
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

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._read, name=f"clusterhub-inbox-{self.link.proc_id}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the deferred sends, stop the reader (an empty entry wakes
        it from its BRPOP)."""
        self.outbox.stop(timeout)
        self._stop.set()
        t = self._thread
        if t is None or t is threading.current_thread():
            return
        try:
            self.link.client.lpush(self.inbox_key(), b"")
        except redis.RedisError:
            pass  # (its slice ends by itself)
        t.join(timeout)

    def inbox_key(self, proc_id: Optional[int] = None) -> bytes:
        return self.link.key(b"inbox:%d" % (self.link.proc_id if proc_id is None else proc_id))

    def _read(self) -> None:
        link = self.link
        sha = link._script_sha[scripts.TAKE]
        conn = None
        carry = 0  # bytes the last BRPOP took, not yet counted out
        warned = False
        while not self._stop.is_set():
            try:
                if conn is None:
                    conn = link.pool.make_connection()
                take = _pack(("EVALSHA", sha, 0, link.prefix, link.proc_id, carry, TAKE_MAX,
                              2 * link.lease_ms))
                wait = _pack(("BRPOP", self.inbox_key(), max(1, round(link.lease, 3))))
                conn.send_packed_command([take + wait], check_health=False)  # type: ignore[no-untyped-call]
                try:
                    items = conn.read_response()
                    carry = 0
                except redis.exceptions.NoScriptError:
                    items = []
                    link.client.script_load(scripts.TAKE)
                if items:
                    self.route(items)
                got = conn.read_response()
                if got is not None:
                    carry += len(got[1])
                    self.route([got[1]])
                if warned:
                    log.warning("clusterhub: process %d reads its inbox again", link.proc_id)
                    warned = False
            except redis.RedisError as e:
                if conn is not None:
                    conn.disconnect()  # type: ignore[no-untyped-call]
                    conn = None
                carry = 0
                if self._stop.is_set():
                    break
                if not warned:
                    log.warning("clusterhub: process %d cannot read its inbox: %s", link.proc_id,
                                translate(e, link.url))
                    warned = True
                self._stop.wait(min(1.0, link.lease / 2))
            except Exception:
                log.exception("clusterhub: the inbox reader of process %d failed", link.proc_id)
                self._stop.wait(min(1.0, link.lease / 2))
        if conn is not None:
            conn.disconnect()  # type: ignore[no-untyped-call]

    def route(self, entries: list[bytes]) -> None:
        """Route what came: replies to the pending table, messages and
        requests to the dispatcher, control entries to ``on_control``."""
        items: list[Any] = []
        loads, pending = self.loads, self.pending
        for raw in entries:
            if not raw:
                continue  # (stop()'s wake-up)
            buf = memoryview(raw)
            if self.authkey is not None:
                if len(raw) < _MAC or not hmac.compare_digest(hmac.digest(self.authkey, buf[_MAC:], "sha256"),
                                                              raw[:_MAC]):
                    log.error("clusterhub: an entry in the inbox of process %d failed its HMAC check: dropped",
                              self.link.proc_id)
                    continue
                buf = buf[_MAC:]
            if len(buf) < _ENV:
                log.error("clusterhub: a malformed entry (shorter than the envelope): dropped")
                continue
            kind, origin, rid, nlen = _unpack_envelope(buf, 0)
            at = _ENV + nlen
            if kind == protocol.RES or kind == protocol.ERR:
                peer = self.peers.get(origin)
                if kind == protocol.RES:
                    try:
                        ok, value = True, loads(buf[at:])
                    except Exception as e:
                        ok, value = False, HubError(f"cannot decode the reply: {e!r}")
                else:
                    ok, value = False, remote_error(buf[at:])
                pending.complete(peer, rid, ok, value)
                continue
            try:
                name = str(buf[_ENV:at], "utf-8")
            except UnicodeDecodeError:
                log.error("clusterhub: a malformed entry (its name is not UTF-8): dropped")
                continue
            if kind == CTL:
                try:
                    self.on_control(name, origin, buf[at:])
                except Exception:
                    log.exception("clusterhub: control entry %r failed", name)
                continue
            if kind not in (protocol.MSG, protocol.REQ, protocol.BCAST):
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
            items.append((name, data, self.route_sender(kind, origin), reply))
        if items:
            self.dispatcher.inbox.extend(items[:-1])
            self.dispatcher.post(items[-1])

    def control(self, target: int, name: str, body: bytes) -> None:
        """Put a control entry in ``target``'s inbox (unbounded; PeerDied
        when it is gone)."""
        entry = self.entry(CTL, 0, protocol.encode_name(name), body)
        self.send(target, entry, lambda: PeerDied(f"process {target} is gone"), bounded=False)

    def abandon(self) -> None:
        """In a fork child: the reader and outbox threads are not there."""
        self._stop.set()
        self._thread = None
        self.outbox = Outbox(self.outbox.name)
