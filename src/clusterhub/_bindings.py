"""The one module that imports the compiled core (``clusterhub._core``).

It turns C results (0 or a negative errno) into Python values and exceptions
and wraps the C objects (send queue, receive buffer, lock table) in small
classes that own them.  Sizes and limits come from the C side: nothing here
restates a C number.

Two hot paths bypass Python wrappers: lock handles derive from ``LockBase``
(C methods acquire/release/__enter__/__exit__, see the end of this file),
and channels call the raw C send, post and read functions handed out by
:class:`Tx` and :class:`Rx` with their first arguments bound.
"""

from __future__ import annotations

import errno as _errno
import functools
import os
from typing import Any, Callable, Optional

from . import errors
from ._core import ffi, lib

__all__ = ["ffi", "lib"]

# ---- limits, from C ----------------------------------------------------------

FRAME_HEADER: int = lib.CH_FRAME_HEADER
FRAME_MAX_LIMIT: int = lib.CH_FRAME_MAX_LIMIT
KEY_MAX: int = lib.CH_LT_KEY_MAX
THREAD_MAX_HELD: int = lib.CH_LT_THREAD_MAX_HELD
RECOVERED: int = lib.CH_LT_RECOVERED
NEW: int = lib.CH_LT_NEW
NEW_RECOVERED: int = lib.CH_LT_NEW_RECOVERED

EOF: int = lib.CH_ERR_EOF
TRUNCATED: int = lib.CH_ERR_TRUNCATED
MALFORMED: int = lib.CH_ERR_MALFORMED
TOOBIG: int = lib.CH_ERR_TOOBIG

# The message envelope (csrc/envelope.h; protocol.py builds its struct from these).
KIND_MSG: int = lib.CH_KIND_MSG
KIND_REQ: int = lib.CH_KIND_REQ
KIND_RES: int = lib.CH_KIND_RES
KIND_ERR: int = lib.CH_KIND_ERR
KIND_BCAST: int = lib.CH_KIND_BCAST
MSG_HEADER: int = lib.CH_MSG_HEADER  # the envelope's size: the name starts here
MSG_KIND_MAX: int = lib.CH_MSG_KIND_MAX
MSG_NAME_MAX: int = lib.CH_MSG_NAME_MAX
# (offset, size) of kind, origin, request id and name length, in wire order.
MSG_FIELDS: tuple[tuple[int, int], ...] = (
    (lib.CH_MSG_KIND_AT, lib.CH_MSG_KIND_SIZE),
    (lib.CH_MSG_ORIGIN_AT, lib.CH_MSG_ORIGIN_SIZE),
    (lib.CH_MSG_RID_AT, lib.CH_MSG_RID_SIZE),
    (lib.CH_MSG_NAMELEN_AT, lib.CH_MSG_NAMELEN_SIZE),
)

# Raw C functions for the lock hot path (see module docstring).  They take a
# "ref" (one int naming table, slot and key generation; see LockTable.ref), so
# that cffi calls them with a single argument, the cheapest call it makes.
lt_trylock: Callable[[int], int] = lib.ch_lt_trylock_ref
lt_timedlock: Callable[[int, int], int] = lib.ch_lt_timedlock_ref_nogil
lt_unlock: Callable[[int], int] = lib.ch_lt_unlock_ref
monotonic_ns: Callable[[], int] = lib.ch_monotonic_ns


def os_error(r: int, what: str = "") -> OSError:
    """The OSError for a negative errno ``r`` returned by the core."""
    e = -r
    msg = os.strerror(e)
    return OSError(e, f"{what}: {msg}" if what else msg)


def check(r: int, what: str = "") -> int:
    """Return ``r`` when it is not negative; raise the matching OSError."""
    if r < 0:
        raise os_error(r, what)
    return r


# ---- framing -----------------------------------------------------------------


def socketpair() -> tuple[int, int]:
    """A connected, close-on-exec, non-blocking AF_UNIX stream pair."""
    fds = ffi.new("int[2]")
    check(lib.ch_socketpair(fds), "socketpair")
    return fds[0], fds[1]


# For the receive hot path (router.Router.read), which reads an Rx's frame
# table and buffer in place: unpack(table, n) -> the n ints (offset, length
# pairs); buffer(address, size) -> the bytes there, without a copy.
unpack = _unpack = ffi.unpack
buffer = ffi.buffer


class PeerGone(Exception):
    """Internal: the socket's peer closed or reset (mapped to PeerDied above)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


_PEER_GONE = {-_errno.EPIPE, -_errno.ECONNRESET, -_errno.ENOTCONN, EOF, TRUNCATED}


class Fanout:
    """Several (Tx, fd) pairs that one C call posts a frame to
    (``ch_tx_post_each``): a broadcast's fan-out without a Python call per
    receiver.  Keeps its Tx objects, so their queues stay allocated."""

    __slots__ = ("n", "_keep", "_txs", "_fds")

    def __init__(self, pairs: "list[tuple[Tx, int]]") -> None:
        self.n = len(pairs)
        self._keep = [tx for tx, _ in pairs]
        self._txs = ffi.new("ch_tx *[]", [tx._p for tx in self._keep] or 1)
        self._fds = ffi.new("int[]", [fd for _, fd in pairs] or 1)

    def post(self, payload: bytes, max_len: int, limit: int, skip: Optional["Tx"] = None) -> Optional[list[int]]:
        """Post ``payload`` (a whole frame's) to each but ``skip``, in
        order; None when every post queued at most ``limit`` bytes, else
        every result (as ``Tx.frame_poster``'s call returns it; 0 for
        ``skip``), in the pairs' order."""
        out = ffi.new("int64_t[]", self.n or 1)
        if not lib.ch_tx_post_each(self._txs, self._fds, self.n, ffi.NULL if skip is None else skip._p,
                                   payload, len(payload), max_len, limit, out):
            return None
        return list(out)[: self.n]


class Tx:
    """A frame send queue (``ch_tx``) for one non-blocking socket.

    Every call runs in C under the GIL, so threads need no lock of their own
    around it; once closed, calls fail with PeerGone without touching the fd.
    """

    __slots__ = ("_p", "_send", "_send_msg", "_flush", "pending", "unowned", "addr")

    def __init__(self) -> None:
        pp = ffi.new("ch_tx **")
        check(lib.ch_tx_new(pp), "ch_tx_new")
        self._p = ffi.gc(pp[0], lib.ch_tx_free)  # freed only when unreachable
        self.addr = int(ffi.cast("uintptr_t", self._p))  # for C's Reply (kept alive with us)
        self._send = lib.ch_tx_send
        self._send_msg = lib.ch_tx_send_msg
        self._flush = lib.ch_tx_flush
        # Bytes queued and not yet written: one C call.
        self.pending: Callable[[], int] = functools.partial(lib.ch_tx_pending, self._p)
        # Those of them that the C writer thread does not take care of.
        self.unowned: Callable[[], int] = functools.partial(lib.ch_tx_unowned, self._p)

    def send(self, fd: int, payload: bytes, max_len: int) -> int:
        """Frame and send ``payload``; return the bytes left queued.

        Raises MessageTooLarge, PeerGone (peer closed) or OSError.
        """
        r: int = self._send(self._p, fd, payload, len(payload), max_len)
        if r < 0:
            raise self.error(r, len(payload), max_len)
        return r

    def message_sender(self, fd: int, max_len: int, release_gil: bool = False) -> Callable[..., int]:
        """The raw C call that sends one message on ``fd`` (envelope, name
        and body gathered, see ``protocol``): ``f(kind, origin, rid, name,
        len(name), body, len(body))`` returns the bytes left queued, or a
        negative code that :meth:`error` turns into the exception to raise.
        (The send hot path: no Python frame of ours around the C call.)"""
        send = lib.ch_tx_send_msg_nogil if release_gil else self._send_msg
        return functools.partial(send, self._p, fd, max_len)

    def message_poster(self, fd: int, max_len: int) -> Callable[..., int]:
        """Like :meth:`message_sender`, for ``ch_tx_post_msg``: a message in
        a burst is queued for the process's C writer thread, which writes
        the burst with few syscalls (a lone message is written at once)."""
        return functools.partial(lib.ch_tx_post_msg, self._p, fd, max_len)

    def frame_poster(self, fd: int) -> Callable[[bytes, int, int], int]:
        """The raw C call that posts a prebuilt frame on ``fd`` (see
        :meth:`message_poster`): ``f(payload, len(payload), max_len)``."""
        return functools.partial(lib.ch_tx_post, self._p, fd)

    def push(self, payload: bytes, max_len: int) -> int:
        """Queue a frame without writing; return the bytes queued."""
        r: int = lib.ch_tx_push(self._p, payload, len(payload), max_len)
        if r < 0:
            raise self.error(r, len(payload), max_len)
        return r

    def flush(self, fd: int) -> int:
        """Write what the socket takes; return the bytes still queued."""
        r: int = self._flush(self._p, fd)
        if r < 0:
            raise self.error(r, 0, 0)
        return r

    def close(self) -> None:
        """Drop what is queued; later calls raise PeerGone.  Idempotent."""
        lib.ch_tx_close(self._p)

    @staticmethod
    def error(r: int, size: int, max_len: int) -> Exception:
        """The exception for a negative send result (``size``: the payload's)."""
        if r == TOOBIG:
            return errors.MessageTooLarge(
                f"message of {size} bytes exceeds max_message_size={max_len}"
            )
        if r in _PEER_GONE:
            return PeerGone(r)
        return os_error(r, "send")


def start_writer() -> None:
    """Start the process's C writer thread (see ``ch_tx_writer_start``) now,
    so that the first burst of posts does not wait for its creation.  If it
    cannot start, posts are written directly: nothing to raise."""
    lib.ch_tx_writer_start()


def writer_stats() -> dict[str, int]:
    """The C writer thread's counters in this process (see ``ch_tx_writer_stats``)."""
    st = ffi.new("ch_writer_stats *")
    lib.ch_tx_writer_stats(st)
    return {k: getattr(st, k) for k in ("wakeups", "sleeps", "writes", "cpu_ns", "running")}


class Spin:
    """One waiter's spin-then-block policy (``ch_spin``, csrc/wait.h): how
    long it spins before it blocks, adapted to how long its waits took."""

    __slots__ = ("p", "set_peer")

    def __init__(self, cap_s: float, peer_pid: int = 0, peer_tid: int = 0) -> None:
        self.p = ffi.new("ch_spin *")
        lib.ch_spin_init(self.p, int(cap_s * 1e9), peer_pid, peer_tid)
        # set_peer(pid): as peer(pid), one C call (the dispatcher's loop).
        self.set_peer: Callable[[int], None] = functools.partial(lib.ch_spin_peer, self.p)

    def spinner(self, fd: int) -> Callable[[], int]:
        """``spin() -> 1`` when ``fd`` became readable while spinning, 0 when
        the budget ran out or was 0 (never blocks longer; the GIL released)."""
        return functools.partial(lib.ch_spin_readable_nogil, fd, self.p)

    def peer(self, pid: int) -> None:
        """The process at the other end (its CPU affinity matters, see wait.h)."""
        lib.ch_spin_peer(self.p, pid)

    def stats(self) -> dict[str, int]:
        """Spins so far, and those that saw their data come (tests, benchmarks)."""
        return {"spins": self.p.spins, "hits": self.p.hits, "avg_ns": self.p.avg_ns}


class Rx:
    """A receive buffer (``ch_rx``) that hands out complete frames in batches."""

    __slots__ = ("_p", "_read", "_frames", "eof", "fill", "table", "data", "addr")

    def __init__(self, max_len: int) -> None:
        pp = ffi.new("ch_rx **")
        check(lib.ch_rx_new(max_len, pp), "ch_rx_new")
        self._p = ffi.gc(pp[0], lib.ch_rx_free)
        self._read = lib.ch_rx_read
        self._frames = lib.ch_rx_frames(self._p)  # a fixed array inside the ch_rx
        # EOF if nothing partial is buffered, else TRUNCATED: one C call.
        self.eof: Callable[[], int] = functools.partial(lib.ch_rx_eof, self._p)
        # The receive hot path (Router.read), without a Python frame of ours:
        # n = fill(fd) reads like ``read`` but returns the count (or code);
        # frame i is then at table[2i], table[2i + 1] bytes long, in the
        # buffer at data() (both valid until the next fill).
        self.fill: Callable[[int], int] = functools.partial(lib.ch_rx_read, self._p)
        self.table = self._frames
        self.data: Callable[[], Any] = functools.partial(lib.ch_rx_data, self._p)
        self.addr = int(ffi.cast("uintptr_t", self._p))  # for decode_messages

    def waiter(self, fd: int, ep_fd: int, wake_fd: int, spin: "Spin") -> Callable[[int], int]:
        """``wait(deadline_ns) -> n``: ``fill(fd)``, but waiting for frames
        (spinning first, see Spin; then blocking on the epoll ``ep_fd``,
        which watches ``fd`` and ``wake_fd``; the GIL released), until
        ``wake_fd`` is readable or the CLOCK_MONOTONIC ``deadline_ns`` (-1:
        none): then 0; -EINTR after a signal (csrc/wait.h)."""
        return functools.partial(lib.ch_rx_wait_nogil, self._p, fd, ep_fd, wake_fd, spin.p)

    def read(self, fd: int) -> list[memoryview] | int:
        """Read what ``fd`` has and return the complete frames as memoryviews.

        The views are valid until the next call.  An empty list means the socket
        would block.  At end of stream or on a protocol error returns the C
        code (EOF, TRUNCATED, MALFORMED, TOOBIG) or a negative errno instead.
        """
        n = self._read(self._p, fd)
        if n <= 0:
            return [] if n == 0 else n
        return self._views(n)

    def feed(self, data: bytes) -> tuple[list[memoryview] | int, int]:
        """Take bytes from memory (tests, fuzzing): (frames or code, bytes used)."""
        used = ffi.new("size_t *")
        n = lib.ch_rx_feed(self._p, data, len(data), used)
        if n <= 0:
            return ([] if n == 0 else n), used[0]
        return self._views(n), used[0]

    def _views(self, n: int) -> list[memoryview]:
        offs = _unpack(self._frames, 2 * n)
        end = offs[-2] + offs[-1]
        buf = memoryview(ffi.buffer(lib.ch_rx_data(self._p), end))
        return [buf[offs[i] : offs[i] + offs[i + 1]] for i in range(0, 2 * n, 2)]

    def close(self) -> None:
        p, self._p = self._p, ffi.NULL
        if p:
            ffi.release(p)


# ---- lock table --------------------------------------------------------------


class LockTable:
    """This process's mapping of a shared lock table (``ch_table``).

    ``ptr`` is the raw table pointer for the hot-path functions above.
    """

    __slots__ = ("ptr", "nslots", "__weakref__")

    def __init__(self, nslots: int) -> None:
        if nslots > lib.CH_LT_SLOTS_MAX:
            raise ValueError(f"lock_slots too large (at most {lib.CH_LT_SLOTS_MAX // 2})")
        self._open(lambda pp: lib.ch_lt_create(nslots, pp))

    def _open(self, make: Any) -> None:
        """Set ``ptr`` to the table ``make(ch_table **)`` creates or maps."""
        pp = ffi.new("ch_table **")
        r = make(pp)
        if r == -_errno.EMFILE:
            raise errors.HubError(
                f"too many hubs open in this process (at most {lib.CH_LT_MAX_TABLES})"
            )
        check(r, "lock table")
        self.ptr: Any = pp[0]
        self.nslots: int = lib.ch_lt_nslots(self.ptr)

    @classmethod
    def attach(cls, fd: int) -> "LockTable":
        """Map the table held by memfd ``fd`` (made by another process and
        passed over a socket).  ``fd`` stays the caller's: the table keeps
        its own duplicate."""
        self = cls.__new__(cls)
        self._open(lambda pp: lib.ch_lt_attach(fd, pp))
        return self

    def ref(self, slot: int = lib.CH_LT_SLOT_NONE, gen: int = 0) -> int:
        """The hot-path ref of (slot, gen); by default one that means "resolve first"."""
        return int(lib.ch_lt_ref(self.ptr, slot, gen))

    def retire(self) -> bool:
        """Refuse every later lock call, unless a thread of this process holds
        or waits on a lock (then False, and nothing changes)."""
        return bool(lib.ch_lt_retire(self.ptr) == 0)

    def disable(self) -> None:
        """Refs to this table fail from now on (the mapping stays)."""
        if self.ptr != ffi.NULL:
            lib.ch_lt_disable(self.ptr)

    def fileno(self) -> int:
        """The memfd holding the table (owned by the table)."""
        return int(lib.ch_lt_fd(self.ptr))

    def set_worker_id(self, worker_id: int | None) -> None:
        lib.ch_lt_set_worker_id(self.ptr, -1 if worker_id is None else worker_id)

    def after_fork_child(self) -> None:
        lib.ch_lt_after_fork_child(self.ptr)

    def busy(self) -> int:
        """Holds and waits by threads of this process right now."""
        return int(lib.ch_lt_busy(self.ptr))

    def resolve(self, key: bytes) -> tuple[int, int]:
        """(code, ref): code 0 = found, NEW = inserted and now held (NEW_RECOVERED:
        and its last holder died holding it).

        Raises LockTableFull or LockError (thread limit).
        """
        slot = ffi.new("uint32_t *")
        gen = ffi.new("uint64_t *")
        r = lib.ch_lt_resolve_nogil(self.ptr, key, len(key), slot, gen)
        if r < 0:
            raise lock_error(r, key)
        return r, lib.ch_lt_ref(self.ptr, slot[0], gen[0])

    def find(self, key: bytes) -> tuple[int, int] | None:
        """(slot, gen) of the slot that maps ``key`` now, or None."""
        slot = ffi.new("uint32_t *")
        gen = ffi.new("uint64_t *")
        r = lib.ch_lt_find(self.ptr, key, len(key), slot, gen)
        if r == -_errno.ENOENT:
            return None
        check(r, "find")
        return slot[0], gen[0]

    def is_locked(self, slot: int, gen: int) -> bool | None:
        """Held by a live thread (snapshot); None when the slot was reused."""
        r = lib.ch_lt_is_locked(self.ptr, slot, gen)
        if r == -_errno.ESTALE:
            return None
        return bool(check(r, "is_locked"))

    def held(self) -> list[tuple[bytes, int, int | None]]:
        """(key, pid, worker id or None) for every slot held right now."""
        info = ffi.new("ch_lt_info *")
        out = []
        for i in range(self.nslots):
            if lib.ch_lt_slot_info(self.ptr, i, info) == 1:
                wid = info.worker_id
                out.append(
                    (ffi.buffer(info.key, info.keylen)[:], info.pid, None if wid < 0 else wid)
                )
        return out

    def close(self) -> None:
        """Unmap; raises LockError if a thread of this process holds or waits."""
        if self.ptr == ffi.NULL:
            return
        r = lib.ch_lt_close(self.ptr)
        if r == -_errno.EBUSY:
            raise errors.LockError(
                "a thread of this process holds or waits on a lock of this hub"
            )
        check(r, "close lock table")
        self.ptr = ffi.NULL


def lock_error(r: int, key: bytes | None = None) -> Exception:
    """The exception for a lock function's negative result."""
    k = f" {key!r}" if key is not None else ""
    if r == -_errno.EDEADLK:
        return errors.LockError(f"lock{k} is already held by this thread")
    if r == -_errno.EPERM:
        return errors.LockError(f"lock{k} is not held by this thread")
    if r == -_errno.ENOLCK:
        return errors.LockError(
            f"this thread already holds {THREAD_MAX_HELD} locks (the most one thread may hold)"
        )
    if r == -_errno.EBADF:
        return errors.HubClosedError("this hub is closed")
    if r == -_errno.ENOSPC:
        return errors.LockTableFull(
            "the lock table is full: raise Hub(lock_slots=...) or hold fewer keys at once"
        )
    return os_error(r, f"lock{k}")


# ---- lock handles ----------------------------------------------------------------
# LockBase (csrc/lockhandle.c) is the C base type of locks.Lock: acquire,
# release, __enter__ and __exit__ as C methods, so that the uncontended case
# costs one C call each way and no Python frame.  cffi cannot return a Python
# object, so the C side sets the type as an attribute of the compiled module.

from . import _core  # noqa: E402

if lib.ch_lockbase_register(_core.__name__.encode()) != 0:
    raise ImportError(f"{_core.__name__}: could not create LockBase (see the error above)")
from ._core import LockBase as LockBase  # noqa: E402  (set by the call above)

LOCK_FOREVER_S: int = lib.CH_LOCK_FOREVER_S  # longer timeouts mean no limit

# decode_messages (csrc/decode.c): the messages and requests of a received
# batch, decoded in one C call (Router.read), and take_reply, a requester's
# reply (channel.wait_reply); set the same way.
if lib.ch_decode_register(_core.__name__.encode()) != 0:
    raise ImportError(f"{_core.__name__}: could not set decode_messages (see the error above)")
from ._core import decode_messages as decode_messages  # noqa: E402
from ._core import reply_rid as reply_rid  # noqa: E402

# Reply (csrc/reply.c): the C callable that answers one request (made by
# decode_messages from a channel's reply context, see Router.reply_context).
if lib.ch_reply_register(_core.__name__.encode()) != 0:
    raise ImportError(f"{_core.__name__}: could not create Reply (see the error above)")
from ._core import Reply as Reply  # noqa: E402
from ._core import take_reply as take_reply  # noqa: E402
