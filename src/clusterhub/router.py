"""The read path of one process's channels: the router reads a channel and
routes its frames: replies to the pending table, messages and requests to
the dispatcher's inbox, a worker's broadcasts to the other workers (in the
master), and the loss of the peer to the process layer.

``read`` is the receive hot path (see its docstring): a frame costs no
Python call of its own, so keep its bound locals and inline routing.
"""

from __future__ import annotations

import functools
import logging
import os
import select
from typing import TYPE_CHECKING, Any

from . import _bindings, protocol
from ._bindings import PeerGone
from .dispatch import Dispatcher
from .errors import HubError, MessageTooLarge, PeerDied, WorkerDied
from .process import Worker
from .remote import error_body, remote_error, reply_body
from .requests import Done, Pending, complete_all

if TYPE_CHECKING:
    from .channel import Channel
    from .workers import Processes

log = logging.getLogger("clusterhub")

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_INPUT = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_GONE = select.EPOLLHUP | select.EPOLLERR
_PROTOCOL_ERRORS = (_bindings.MALFORMED, _bindings.TOOBIG)
_unpack_envelope = protocol.HEADER.unpack_from
_ENVELOPE = protocol.HEADER.size
_MSG, _REQ, _RES, _ERR, _BCAST = protocol.MSG, protocol.REQ, protocol.RES, protocol.ERR, protocol.BCAST
_EOF = _bindings.EOF
_unpack, _buffer = _bindings.unpack, _bindings.buffer
_decode_messages = _bindings.decode_messages


class Router:
    """Reads the channels of one process's hub and routes what arrives."""

    def __init__(self, procs: "Processes", dispatcher: Dispatcher, pending: Pending,
                 dumps: Any, loads: Any) -> None:
        self.procs = procs
        self.dispatcher = dispatcher
        self.pending = pending
        self.dumps = dumps
        self.loads = loads
        self.peer_stubs: dict[int, Worker] = {}  # (a worker: other workers, as broadcast senders)

    def on_channel(self, ch: Channel, ev: int) -> None:
        if ch.closed:
            return
        if ev & _OUT:
            try:
                ch.flush()
            except PeerGone:
                self.channel_lost(ch, _bindings.EOF)
                return
            if ch.held_back and ch.pending() <= ch.max_queue:
                self.release_held(ch)
        if not ev & _INPUT or (ch.blockers and not ev & _GONE):
            ch.arm()  # (held back: read anyway once the peer is gone)
        elif ch.reader.acquire(False):
            done: list[Done] = []
            try:
                more = self.read(ch, 1, done)
            finally:
                # (A reply sent while reading arms for room itself: Channel._backlog.)
                if ch.blockers or ch.mask != _IN:
                    ch.arm()  # (else nothing to change)
                if ch.closed:
                    ch.release_reader()  # (it closes the fds)
                else:
                    ch.reader.release()
            if more:  # buffered frames no socket event will announce
                self.dispatcher.call_next(lambda: self.on_channel(ch, _IN))
            if done:
                complete_all(done)
        else:
            # A requester leads the channel and reads what came.  Level-
            # triggered, this event would come back until it has: stop
            # watching meanwhile; the leader restores it as it lets go.
            with ch.arming:
                if ch.reader.locked():  # (else it let go: the next poll tells)
                    ch.disarmed = True
                    ch.arm_locked()

    def read(self, ch: Channel, rounds: int, done: list[Done], filled: int = 0) -> bool:
        """Read and route up to ``rounds`` batches of frames from ``ch``;
        the first is already in ``ch.rx`` when ``filled`` (what the fill
        returned: see Channel.wait) is not 0.

        The reader holds ``ch.reader``: the requests it completes are added to
        ``done`` and their callbacks run after it let go of the channel, so a
        callback may wait for another reply on it (and never runs while the
        batch's frames are in use).

        Returns True when it stopped with bytes still buffered in ``ch.rx``
        (more complete frames, or an error that comes after them): no socket
        event will announce those, so the caller must read again.

        This is the receive hot path: frames are decoded in place, without
        a view or a call per frame for replies; messages and requests are
        decoded by C (``decode_messages``, one call for a run of them), and
        this loop takes the frames that call leaves (replies, broadcasts,
        errors, and what it could not decode), which makes it the reference
        for both.
        """
        ctx = ch.read_ctx
        if ctx is None:  # (made once: a call's set-up costs as much as a reply)
            ctx = ch.read_ctx = self._read_context(ch)
        # (what every batch needs; the rest only for frames C leaves, below)
        fd, fill, eof, loads, rx_addr, inbox_extend, msg_sender, reply_for, route_ctx = ctx
        for _ in range(rounds):
            if ch.closed:
                return False
            if filled:
                n, filled = filled, 0
            else:
                n = fill(fd)
            if n <= 0:
                if n:
                    self.channel_lost(ch, n)
                return False
            offs: Any = None  # (the frame table, when this loop needs it)
            i = 0
            last = 2 * n
            while i < last:
                # Messages and requests in C, from frame i on (the rest here).
                items: list[Any] = []
                i = 2 * _decode_messages(rx_addr, i >> 1, n, loads, msg_sender, items, reply_for)
                if items:
                    inbox_extend(items)
                if i == last:
                    break
                if offs is None:
                    table, rx_data, pending, inbox_append, is_master, peer, reply_to = route_ctx
                    partial = functools.partial
                    offs = _unpack(table, last)
                    buf = memoryview(_buffer(rx_data(), offs[-2] + offs[-1]))
                start = offs[i]
                end = start + offs[i + 1]
                i += 2
                if end - start < _ENVELOPE:
                    return self.malformed(ch, "frame shorter than the envelope")
                kind, origin, rid, nlen = _unpack_envelope(buf, start)
                data_at = start + _ENVELOPE + nlen
                if data_at > end:
                    return self.malformed(ch, "name longer than the frame")
                if kind == _RES:
                    fut = pending.get(rid)
                    if fut is None or fut._channel is not ch:
                        log.debug("dropping a reply to request %d nobody waits for", rid)
                        continue
                    pending.pop(rid, None)
                    try:
                        ok, value = True, loads(buf[data_at:end])
                    except Exception as e:
                        ok, value = False, HubError(f"cannot decode the reply: {e!r}")
                    if not fut.complete_here(ok, value):  # (else: later, see complete_all)
                        done.append((fut, ok, value))
                elif kind == _ERR:
                    pending.complete(ch, rid, False, remote_error(buf[data_at:end]), done)
                elif _MSG <= kind <= _BCAST:
                    try:
                        name = str(buf[start + _ENVELOPE : data_at], "utf-8")
                    except UnicodeDecodeError:
                        return self.malformed(ch, "name is not UTF-8")
                    if is_master:
                        if kind == _BCAST:
                            if peer is None or origin != peer.id:
                                return self.malformed(ch, "broadcast with a forged origin")
                            self.relay(ch, bytes(buf[start:end]))
                            continue
                        sender = peer
                    elif origin == 0 or kind != _BCAST:
                        sender = None
                    else:
                        sender = self.peer(origin)
                    try:
                        data = loads(buf[data_at:end])
                    except Exception as e:
                        log.error("cannot decode the data of %r: %r", name, e)
                        if kind == _REQ:
                            self.reply(ch, rid, False, e, False)
                        continue
                    reply = partial(reply_to, ch, rid) if kind == _REQ else None
                    inbox_append((name, data, sender, reply))
                else:
                    return self.malformed(ch, f"unknown kind {kind}")
        return not ch.closed and eof() != _EOF

    def _read_context(self, ch: Channel) -> tuple[Any, ...]:
        """What ``read`` needs of ``ch``, bound once (see read)."""
        rx, inbox, is_master = ch.rx, self.dispatcher.inbox, self.procs.is_master
        return (
            ch.fd, rx.fill, rx.eof, self.loads, rx.addr, inbox.extend,
            ch.peer if is_master else None,  # (a message's sender)
            self.reply_context(ch),  # (how C answers a request: see csrc/reply.h)
            (rx.table, rx.data, self.pending, inbox.append, is_master, ch.peer, self.reply),
        )

    def malformed(self, ch: Channel, what: str) -> bool:
        log.debug("malformed envelope: %s", what)
        self.channel_lost(ch, _bindings.MALFORMED)
        return False

    def peer(self, wid: int) -> Worker:
        w = self.peer_stubs.get(wid)
        if w is None:
            w = self.peer_stubs[wid] = Worker(wid, hub_key=self.procs.key)
        return w

    def relay(self, origin: Channel, payload: bytes) -> None:
        """Pass a worker's broadcast on.  The relay cannot block (it runs
        where frames are read): a target over max_queue instead holds back
        the origin's input until it drained, so the origin's sender blocks."""
        procs = self.procs
        ws, fan = procs.fanout()  # (one C call posts it to all but the origin)
        got = fan.post(payload, procs.max_len, procs.max_queue, origin.tx)
        if got is None:
            return
        for w, queued in zip(ws, got):
            ch = w.channel
            if ch is not None and queued > ch.max_queue:  # (< 0: it is gone; the origin's is 0)
                ch.held_back.add(origin)
                origin.blockers.add(ch)

    def release_held(self, ch: Channel) -> None:
        """``ch`` drained (or closed): read the origins it held back again."""
        for origin in list(ch.held_back):
            ch.held_back.discard(origin)
            origin.blockers.discard(ch)
            if not origin.blockers and not origin.closed:
                # Frames may wait in its buffer, which no event announces.
                self.dispatcher.call_next(functools.partial(self.on_channel, origin, _IN))

    def reply(self, ch: Channel, rid: int, ok: bool, value: Any, wait: bool = True) -> None:
        """Answer request ``rid`` that came on ``ch`` (bound with functools.partial
        as an inbox item's ``reply(ok, value)``; the usual path is C's Reply,
        which falls back to this, see reply_context)."""
        kind, body = reply_body(self.dumps, ok, value)
        self.reply_sent(ch, rid, ch.send_msg(kind, 0, rid, b"", 0, body, len(body)), len(body), wait)

    def reply_sent(self, ch: Channel, rid: int, left: int, size: int, wait: bool = True) -> None:
        """After sending the reply to ``rid`` (a body of ``size`` bytes): deal
        with what is left queued (``left`` > 0) or the error (< 0)."""
        try:
            if left:
                ch.sent_part(left, wait, size)
            self.dispatcher.answered = ch.peer_pid
        except PeerDied:
            log.debug("reply to request %d dropped: the peer is gone", rid)
        except MessageTooLarge as e:
            ch.send_parts(protocol.ERR, 0, rid, b"", error_body(e), False)

    def reply_context(self, ch: Channel) -> tuple[Any, ...]:
        """What C's Reply needs to answer requests that came on ``ch``
        (csrc/reply.h): the send queue, the serializer, the Python paths."""
        tx = ch.tx
        return (tx, tx.addr, ch.fd, ch.max_len, self.dumps, functools.partial(self.reply, ch),
                functools.partial(self.reply_sent, ch), self.dispatcher, ch.peer_pid)

    def channel_lost(self, ch: Channel, code: int) -> None:
        if ch.closed:
            return
        w = ch.peer
        if w is not None and code in _PROTOCOL_ERRORS:
            # Killed before its channel closes, or it would see that and exit
            # by itself first.  (Other codes, e.g. a reset or EOF inside a
            # frame, only mean the worker is gone or going.)
            log.error("worker %d broke its channel (%s): killing it", w.id, describe(code))
            w.kill()
        ch.dying = True
        ch.poke()
        self.dispatcher.unregister(ch.fd)
        ch.close()
        self.release_held(ch)
        for target in list(ch.blockers):
            target.held_back.discard(ch)
        if w is not None:
            self.pending.fail_peer(ch, lambda: WorkerDied(f"worker {w.id} has exited"))
            if w.connected:  # (it left: its process may go on, and connect again)
                self.procs.worker_left(w)
            return
        if code in _PROTOCOL_ERRORS:
            log.error("the master broke its channel (%s): treating it as dead", describe(code))
        self.procs.master_lost()

    def drain_exited(self, w: Worker) -> None:
        """On the dispatcher, after ``w`` exited: read and route everything it
        sent (its messages reach the inbox before anything queued after this
        call), then fail what waits on it."""
        ch = w.channel
        if ch is not None and not ch.closed:
            ch.dying = True
            ch.poke()  # a requester reading this channel lets go of it
            done: list[Done] = []
            ch.reader.acquire()
            try:
                self.read(ch, 1 << 30, done)  # everything it sent is handled first
            finally:
                ch.release_reader()
            self.channel_lost(ch, _bindings.EOF)
            complete_all(done)



def describe(code: int) -> str:
    """A channel's error code in words."""
    return {
        _bindings.MALFORMED: "malformed frame",
        _bindings.TOOBIG: "frame over max_message_size",
        _bindings.TRUNCATED: "closed inside a frame",
    }.get(code, os.strerror(-code) if code < 0 else str(code))
