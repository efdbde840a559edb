"""One process's link to the Redis server: its client, its lease (renewed
by a thread of its own), and what it holds.

The lease is a key with a TTL (``lease`` seconds) that this process renews
every ``lease / 10``; while it exists the process is alive for everyone
else, and so are the locks it holds (they have no TTL of their own).  When a
renewal finds the lease gone (the process was paused longer than the lease,
or the link was cut that long) or the server's ``run_id`` changed (a
restart), every lock this process held is ``lost``: someone else may have
it now.  The process then takes a new lease under the same id and goes on;
an acquire that finds the lease gone first does the same (the script takes
nothing under a lease nobody renews).  A release or a waiter's giving up
whose reply never came (the link failed) is retried by the renewer until one
does: a key must not stay held, or be handed to a waiter that left, for as
long as this process lives.

Client settings: no retries inside redis-py (a script retried after an
unknown outcome could release twice; our callers decide), and a socket
timeout above the longest blocking slice, so that a blocked wait is never
cut short by the client, while a cut link is still noticed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import os
import select
import socket
import threading
import time
import weakref
from typing import Any, AsyncGenerator, Callable, NoReturn, Optional, TypeVar

try:
    import redis
except ImportError as e:  # (a local hub does not need it)
    raise ImportError(f"a Redis address needs redis-py: pip install 'clusterhub[redis]' ({e})") from e
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from .._bindings import Spin, lib
from ..address import peer_pid
from ..errors import AddressInUse, ConnectError, ConnectTimeout, HubError
from . import scripts, wire
from .url import RedisURL

log = logging.getLogger("clusterhub")
T = TypeVar("T")
spin_readable = lib.ch_spin_readable_nogil

DEFAULT_LEASE = 5.0
# How long an acquisition that gave up with a command unanswered stays
# refused: an ACQUIRE sent before the link failed can still reach the server
# after the giving up (TCP retransmits a dropped socket's data for up to
# about 15 minutes), and must not queue or take the key for nobody.
TOMBSTONE_MS = 20 * 60 * 1000
# How long the hub's own keys (ids, lease setting, fencing counter) outlive
# its last process when that one leaves cleanly (scripts.VACATE).
VACATED_KEEP_MS = 60 * 1000
# Commands a thread may send ahead on its own connection before it reads
# their replies (see :meth:`Link.send_ahead`).
AHEAD_MAX = 64


def host() -> str:
    """This machine's name, as the others see this process's (read each
    time: a forked child may be in another UTS namespace)."""
    return socket.gethostname()


def _readable(sock: socket.socket) -> bool:
    """Something (or the end) waits on ``sock``; does not block."""
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(0))


def _finish_ahead(conn: Any, timeout: float = 2.0) -> None:
    """Before closing a connection whose replies to commands sent ahead
    are unread: say we are done writing, and read (dropping it) until the
    server closes its end, which it does once it ran everything before.
    Closing a TCP socket with unread data resets it, and a reset drops
    what is still queued to send.  (Its owner thread is not in a call: the
    hub is closing, or the interpreter is exiting.)"""
    conn.clusterhub_ahead.clear()
    sock = getattr(conn, "_sock", None)
    if sock is None or conn.pid != os.getpid():  # (a forked child's copy of the socket is its parent's too)
        return
    try:
        sock.settimeout(timeout)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(65536):
            pass
    except OSError:
        pass


_links: "weakref.WeakSet[Link]" = weakref.WeakSet()


@atexit.register
def _finish_all_ahead() -> None:
    """(At exit, for hubs not closed) what threads sent ahead reaches the
    server before the process closes its sockets."""
    for link in list(_links):
        for conn in list(link._own_conns):
            if getattr(conn, "clusterhub_ahead", None):
                _finish_ahead(conn)


def translate(e: BaseException, url: RedisURL) -> HubError:
    """A redis-py error as ours (the password is never in the text)."""
    if isinstance(e, redis.AuthenticationError):  # (a ConnectionError: first)
        return ConnectError(f"the Redis server at {url.text} refused our credentials: {e}")
    if isinstance(e, redis.TimeoutError):
        return ConnectTimeout(f"the Redis server at {url.text} did not answer in time: {e}")
    if isinstance(e, redis.ConnectionError):
        return ConnectError(f"the Redis server at {url.text} is unreachable: {e}")
    return HubError(f"the Redis server at {url.text} failed: {e}")


async def _closed_with_loop(client: Any) -> AsyncGenerator[None, None]:
    """An async generator that closes ``client`` when its loop shuts down
    its async generators (each loop's client would otherwise keep its
    connection, and the loop itself, for as long as the hub lives)."""
    try:
        yield
    finally:
        await client.aclose()


MIN_VERSION = (6, 0, 6)  # LPOS


def version_of(version: str) -> tuple[int, ...]:
    """INFO's ``redis_version`` as numbers; () when it cannot be read."""
    try:
        return tuple(int(x) for x in version.split(".")[:3])
    except ValueError:
        return ()


def check_version(version: str, url: RedisURL) -> None:
    """ConnectError when the server (INFO's ``redis_version``) is older
    than the scripts need; a version we cannot read is let through."""
    got = version_of(version)
    if got and got < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise ConnectError(f"the Redis server at {url.text} is version {version}; clusterhub needs {need} or later")


def text(b: Any) -> str:
    """A reply's bytes as text."""
    return b.decode() if isinstance(b, bytes) else str(b)


class _Script:
    """A Lua script called with EVALSHA directly (redis-py's ``Script`` call
    costs about 4 µs of Python more, paid twice by every ``with``); loaded
    again (EVAL) when the server does not know it (NOSCRIPT: it did not run)."""

    def __init__(self, client: Any, text: str) -> None:
        self._client = client
        self._script = client.register_script(text)
        self._sha = self._script.sha

    def __call__(self, keys: list[Any], args: list[Any]) -> Any:
        try:
            return self._client.execute_command("EVALSHA", self._sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self._script(keys=keys, args=args)


def _pack(command: tuple[Any, ...]) -> bytes:
    """A command in RESP (bytes, str or numbers), as redis-py packs it but
    in half the time: it is on every lock call's path."""
    out = [b"*%d\r\n" % len(command)]
    for arg in command:
        if arg.__class__ is not bytes:
            arg = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class Holding:
    """One acquisition of a key by this process: what the handle reports and
    what the renewer marks ``lost``."""

    __slots__ = ("key", "acq", "token", "recovered", "lost")

    def __init__(self, key: bytes, acq: bytes, token: int, recovered: bool) -> None:
        self.key = key
        self.acq = acq
        self.token = token
        self.recovered = recovered
        self.lost = False


class Link:
    """The server connection of one process of a Redis hub."""

    def __init__(self, url: RedisURL, lease: Optional[float], *, master: bool,
                 connect_timeout: Optional[float] = 5.0) -> None:
        # lease None (a worker not told): the master's, read when joining.
        # connect_timeout None: a lease and then some (never the kernel's
        # minutes of SYN retries, which would stall the renewer).
        self.url = url
        self._set_lease(DEFAULT_LEASE if lease is None else lease)
        if connect_timeout is None:
            connect_timeout = self.lease + 5.0
        # When our lease runs out at the latest, by our clock: the time a
        # renewal that succeeded was sent, plus the lease.  Past it, what we
        # hold counts as lost even before the server can say so.
        self.valid_until = 0.0
        self._lease_given = lease is not None
        self.prefix = f"{{ch:{url.name}}}:".encode()
        self.is_master = master
        self.deposed = False  # (a master whose name another master took while its lease was out)
        self.client = redis.Redis(**url.kwargs, socket_timeout=self.lease + 5.0, socket_connect_timeout=connect_timeout,
                                  retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.pool = self.client.connection_pool
        self._renew = _Script(self.client, scripts.RENEW)
        self._vacate = _Script(self.client, scripts.VACATE)
        self._script_sha = {text: self.client.register_script(text).sha
                            for text in (scripts.ACQUIRE, scripts.RELEASE, scripts.GIVE_UP,
                                         scripts.SEND, scripts.BROADCAST, scripts.TAKE)}
        # The lock calls go over a connection of the calling thread's own
        # (no pool to lock, no per-call bookkeeping: about half the client's
        # CPU of a pooled call); see :meth:`lock_call`.
        self._own = threading.local()
        self._own_conns: "weakref.WeakSet[Any]" = weakref.WeakSet()
        _links.add(self)
        # The cap (s) of a spin before reading a reply that comes soon (the
        # hub's ``spin``; 0: off): see :meth:`lock_call`.
        self.spin = 0.0
        self.held: dict[bytes, Holding] = {}  # acq -> holding, of every thread and task here
        self.held_lock = threading.Lock()
        # Releases and give-ups whose reply never came (the link failed):
        # the renewer retries them, or a key would stay held (or be handed to
        # a waiter that left) for as long as we live.  (Both act by
        # acquisition id: retrying is harmless.)  (script, its arguments)
        self.unfinished: list[tuple[str, dict[str, Any]]] = []
        self._renew_lock = threading.Lock()  # renew() from the renewer and from an acquire
        self._acq_ids = itertools.count(1)
        self._stop = threading.Event()
        self.proc_id = 0
        self.worker_id: Optional[int] = None
        self.run_id = ""
        self.version: tuple[int, ...] = ()  # the server's, as of joining
        self._warned = False
        self._thread: Optional[threading.Thread] = None
        self._aio: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # loop -> client
        self.connect_timeout = connect_timeout
        # Told by the renewer the id of the live master (0: none), for a
        # worker to notice its master's death (see messages.py).
        self.on_master: Optional[Callable[[int], None]] = None
        self.on_tick: Optional[Callable[[], None]] = None  # (after each renewal: see messages.py)

    def aio(self, loop: Any) -> Any:
        """This loop's asyncio client (same settings), and its scripts
        (called on the loop).  The client is closed when the loop shuts down
        its async generators (as ``asyncio.run`` does); that of a loop closed
        without doing so is dropped at the next new loop's first call."""
        got = self._aio.get(loop)
        if got is None:
            for old in [lp for lp in self._aio if lp.is_closed()]:
                del self._aio[old]
            c = redis.asyncio.Redis(**self.url.kwargs, socket_timeout=self.lease + 5.0,
                                    socket_connect_timeout=self.connect_timeout,
                                    retry=redis.asyncio.retry.Retry(NoBackoff(), 0))
            closer = _closed_with_loop(c)
            got = self._aio[loop] = (c, c.register_script(scripts.ACQUIRE), c.register_script(scripts.GIVE_UP),
                                     c.register_script(scripts.RELEASE), closer)
            asyncio.ensure_future(closer.asend(None), loop=loop)  # (started: the loop knows it now)
        return got

    def _set_lease(self, lease: float) -> None:
        self.lease = lease
        self.lease_ms = max(1, int(lease * 1000))

    # ---- keys -------------------------------------------------------------------------

    def key(self, *parts: bytes) -> bytes:
        return self.prefix + b":".join(parts)

    def lease_key(self, proc_id: int) -> bytes:
        return self.prefix + b"proc:" + str(proc_id).encode()

    # ---- calls ------------------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """``fn(*args, **kw)`` with redis-py's errors as ours."""
        try:
            return fn(*args, **kw)
        except redis.RedisError as e:
            raise translate(e, self.url) from e

    def _conn(self) -> tuple[Any, Optional[list[Any]]]:
        """The calling thread's own connection (made in this process: a
        forked child does not use its parent's) and its entry ``[pid, conn,
        in a call, Spin or None, Wire or None, commands sent ahead]`` (see
        :meth:`send_ahead`); entry None: a call made while the thread's
        connection is in the middle of one (a signal handler, a finalizer
        run by the garbage collector) gets a connection of its own for the
        call."""
        got = getattr(self._own, "c", None)
        if got is None or got[0] != os.getpid():
            conn: Any = self.pool.make_connection()
            ahead: list[Any] = []
            conn.clusterhub_ahead = ahead  # (also on the connection: see disconnect)
            self._own_conns.add(conn)
            got = self._own.c = [os.getpid(), conn, False, None, None, ahead]
        if got[2]:
            return self.pool.make_connection(), None
        return got[1], got

    def _spin_for(self, own: list[Any], sock: socket.socket) -> Spin:
        """The thread's spin policy, made at its first use (the server as
        its peer when it is on this host's Unix socket: when both can only
        run on one CPU, spinning only delays the server)."""
        pid = peer_pid(sock) if sock.family == socket.AF_UNIX else None
        sp = own[3] = Spin(self.spin, pid or 0)
        return sp

    def lock_call(self, *command: Any, then: Optional[tuple[Any, ...]] = None, spin: bool = True) -> Any:
        """One command over the thread's own connection (an EVALSHA of a
        script not loaded yet is loaded and sent again), with redis-py's
        errors as ours; with ``then``, a second command sent right behind it
        (one round trip), and the pair of replies.  Anything that leaves a
        reply unread (an error, a timeout, Ctrl-C) drops the connection: the
        next call connects anew, and the server forgets a blocked command of
        ours at once.

        ``spin`` (a command the server answers at once, not a blocking
        one): wait for the reply spinning first, up to the hub's ``spin``
        (adaptive, csrc/wait.h): on this machine a reply that is read as it
        comes, rather than by a thread woken for it, cuts a local server's
        round trip to a third.

        With hiredis, the thread's connection is read and written by our
        own calls once connected (see wire.py): a spinning PING took 29-30
        us here, against 35-40 us through redis-py's send and parser."""
        conn, own = self._conn()
        if own is not None:
            own[2] = True
        try:
            if own is not None and own[5]:
                self._settle(conn, own)
            w = own[4] if own is not None else None
            sock = getattr(conn, "_sock", None)
            if sock is not None and (w.readable() if w is not None and w.sock is sock else _readable(sock)):
                conn.disconnect()  # (between calls a socket has nothing to read: the server closed it)
            for attempt in (1, 2):
                if own is not None and wire.hiredis is not None:
                    if conn._sock is None:
                        conn.connect()
                    if w is None or w.sock is not conn._sock:
                        w = own[4] = wire.Wire(conn._sock, conn.socket_timeout)
                packed = _pack(command) if then is None else _pack(command) + _pack(then)
                if w is not None:
                    w.send(packed)
                else:
                    conn.send_packed_command([packed], check_health=False)
                if spin and own is not None and self.spin:
                    spin_readable(conn._sock.fileno(), (own[3] or self._spin_for(own, conn._sock)).p)
                try:
                    first = conn.read_response() if w is None else w.read()
                except redis.exceptions.NoScriptError:
                    if attempt == 2:
                        raise
                    if then is not None:
                        conn.disconnect()  # (the command behind would block: the server drops it with us)
                    self._load(command[1])
                    continue
                if then is None:
                    return first
                return first, conn.read_response() if w is None else w.read()
        except BaseException as e:
            self._drop(conn, own, e)
        finally:
            if own is not None:
                own[2] = False
            else:
                conn.disconnect()

    def _load(self, sha: str) -> None:
        """Load the script of ``sha`` (the server had lost it)."""
        self.call(self.client.script_load, next(t for t, h in self._script_sha.items() if h == sha))

    def _drop(self, conn: Any, own: Optional[list[Any]], e: BaseException) -> NoReturn:
        """(In the ``except`` of a call on ``conn``, perhaps leaving a reply
        unread) drop the connection (the next call connects anew, and the
        server forgets a blocked command of ours) and what went ahead on
        it; raise ``e``, redis-py's errors as ours."""
        conn.disconnect()
        if own is not None:
            own[5].clear()
        if isinstance(e, redis.RedisError):
            raise translate(e, self.url) from e
        raise e

    def send_ahead(self, *command: Any) -> bool:
        """Send one command over the thread's own connection without
        waiting for its reply (False, nothing sent: that connection is in
        the middle of a call, as in a signal handler).  Its reply is read
        by :meth:`settle`, which the thread's next call over the connection
        does first, or by this method once AHEAD_MAX are unread.  The
        server runs one connection's commands in the order sent.  A failed
        write drops the connection (what went ahead unread with it: the
        server ran it or not) and raises."""
        conn, own = self._conn()
        if own is None:
            conn.disconnect()
            return False
        if len(own[5]) >= AHEAD_MAX:
            self.settle()
        own[2] = True  # (spelled out, not a context manager: this runs per message)
        try:
            w = own[4]
            sock = getattr(conn, "_sock", None)
            if sock is not None and not own[5] and (w.readable() if w is not None and w.sock is sock
                                                    else _readable(sock)):
                conn.disconnect()  # (nothing unread, yet readable: the server closed it)
            if wire.hiredis is not None:
                if conn._sock is None:
                    conn.connect()
                if w is None or w.sock is not conn._sock:
                    w = own[4] = wire.Wire(conn._sock, conn.socket_timeout)
                w.send(_pack(command))
            else:
                conn.send_packed_command([_pack(command)], check_health=False)
            own[5].append(command)
        except BaseException as e:
            self._drop(conn, own, e)
        finally:
            own[2] = False
        return True

    def ahead(self) -> int:
        """How many commands the calling thread sent ahead whose replies
        are not read yet."""
        got = getattr(self._own, "c", None)
        return len(got[5]) if got is not None and got[0] == os.getpid() else 0

    def settle(self) -> list[tuple[tuple[Any, ...], Any]]:
        """Read the replies of the calling thread's commands sent ahead
        (blocking until the last has come): (command, reply) of each that
        succeeded, in the order they ran.  Raises the first that failed,
        once all are read."""
        got = getattr(self._own, "c", None)
        if got is None or got[0] != os.getpid() or not got[5] or got[2]:
            return []
        got[2] = True
        try:
            return self._settle(got[1], got)
        except BaseException as e:
            self._drop(got[1], got, e)
        finally:
            got[2] = False

    def _settle(self, conn: Any, own: list[Any]) -> list[tuple[tuple[Any, ...], Any]]:
        """(The thread's connection, in a call) read the replies of what
        went ahead, in order.  A script the server did not have (flushed)
        is loaded and its calls are made again, in their order, after the
        rest was read (so behind any later one that did run)."""
        ahead: list[Any] = own[5]
        w = own[4] if own[4] is not None and own[4].sock is conn._sock else None
        again: list[Any] = []
        failed: Optional[redis.RedisError] = None
        done: list[tuple[tuple[Any, ...], Any]] = []
        for command in ahead:
            try:
                done.append((command, conn.read_response() if w is None else w.read()))
            except redis.exceptions.NoScriptError:
                again.append(command)
            except redis.ResponseError as e:
                failed = failed or e
        ahead.clear()
        for sha in dict.fromkeys(command[1] for command in again):
            self._load(sha)
        for command in again:
            packed = _pack(command)
            if w is not None:
                w.send(packed)
            else:
                conn.send_packed_command([packed], check_health=False)
            try:
                done.append((command, conn.read_response() if w is None else w.read()))
            except redis.ResponseError as e:
                failed = failed or e
        if failed is not None:
            log.warning("clusterhub: a command sent ahead failed: %s", failed)
            raise failed
        return done

    def script(self, text: str, keys: list[Any], args: list[Any], then: Optional[tuple[Any, ...]] = None) -> Any:
        """A lock script over the thread's own connection (``then``, a
        blocking command: see :meth:`lock_call`)."""
        return self.lock_call("EVALSHA", self._script_sha[text], len(keys), *keys, *args, then=then,
                              spin=then is None)

    # ---- joining ----------------------------------------------------------------------

    def join(self, proc_id: int = 0) -> None:
        """Take an id (``proc_id``: the one a forking master took for us)
        and a lease (and, for the master, the name)."""
        c = self.client
        server = self.call(c.info, "server")
        check_version(str(server.get("redis_version", "")), self.url)
        self.version = version_of(str(server.get("redis_version", "")))
        self.run_id = server["run_id"]
        if not self.is_master and not self._lease_given:
            ms = self.call(c.get, self.key(b"lease"))
            if ms:
                self._set_lease(int(ms) / 1000)
                # (the socket timeout stays above the longest blocking slice, a lease)
                self.pool.connection_kwargs["socket_timeout"] = self.lease + 5.0
                self.pool.disconnect()
        self.proc_id = proc_id or int(self.call(c.incr, self.key(b"ids")))
        if not self.is_master:
            self.worker_id = self.proc_id
        # The master takes the name before it writes anything else: a second
        # master leaves the hub's lease setting and its members alone.
        if self.is_master and not self.call(c.set, self.key(b"master"), self.proc_id, nx=True, px=self.lease_ms):
            other = self.call(c.get, self.key(b"master"))
            info = self.call(c.get, self.lease_key(int(other))) if other else None
            who = " (pid {} on {})".format(*text(info).split()[:2]) if info else ""
            raise AddressInUse(f"{self.url.text}: a master is already running for this name{who}")
        if self.is_master:
            self.call(c.set, self.key(b"lease"), self.lease_ms)
        self._register()
        if not self.is_master:
            self.call(self.client.rpush, self.key(b"events"), f"joined {self.proc_id} {os.getpid()} {host()}")
        self._thread = threading.Thread(target=self._renewer, name=f"clusterhub-lease-{self.proc_id}", daemon=True)
        self._thread.start()

    def _register(self) -> None:
        wid = "-" if self.worker_id is None else str(self.worker_id)
        info = f"{os.getpid()} {host()} {wid}"
        sent = time.monotonic()
        self.call(self.client.set, self.lease_key(self.proc_id), info, px=self.lease_ms)
        self.valid_until = sent + self.lease
        self.call(self.client.hset, self.key(b"procs"), str(self.proc_id), info)

    # ---- the lease --------------------------------------------------------------------

    def _renewer(self) -> None:
        every = self.lease / 10
        while not self._stop.wait(every):
            try:
                self.renew()
                self.retry_unfinished()
                if self.on_tick is not None:
                    self.on_tick()
                if self._warned:
                    log.warning("clusterhub: the Redis server at %s answers again", self.url.text)
                    self._warned = False
            except HubError as e:
                if not self._warned:
                    log.warning("clusterhub: cannot renew the lease of process %d: %s", self.proc_id, e)
                    self._warned = True
            except Exception:  # never let the renewer die silently
                log.exception("clusterhub: lease renewal of process %d failed", self.proc_id)

    def renew(self) -> None:
        """Renew the lease; when it was gone or the server restarted, mark
        every held lock lost and take a new lease."""
        with self._renew_lock:
            self._renew_locked()

    def _renew_locked(self) -> None:
        lk = self.lease_key(self.proc_id)
        named = self.is_master and not self.deposed
        sent = time.monotonic()
        me = str(self.proc_id).encode()
        ok, master = self.call(self._renew, keys=[lk, self.key(b"master"), self.key(b"inbox:" + me),
                                                  self.key(b"queued:" + me), self.key(b"blocked:" + me),
                                                  *self._hub_keys()],
                               args=[self.lease_ms, self.proc_id, int(named), self.prefix + b"proc:"])
        run_id = self.call(self.client.info, "server")["run_id"]
        if self.on_master is not None:
            self.on_master(int(master))
        if ok and run_id == self.run_id:
            self.valid_until = sent + self.lease
            if ok == 2:  # (the lease was renewed: what we hold is still ours)
                self._retake_name()
            return
        why = "the server restarted" if run_id != self.run_id else "our lease ran out"
        self.run_id = run_id
        n = self.lose_all()
        log.warning("clusterhub: process %d: %s; %d held lock(s) lost", self.proc_id, why, n)
        self._register()
        if not self.is_master:  # (a master that saw us gone lists us again)
            self.call(self.client.rpush, self.key(b"events"), f"rejoined {self.proc_id} {os.getpid()} {host()}")
        if named:
            self._retake_name()

    def _retake_name(self) -> None:
        """The master's name lapsed: take it again, unless another master
        has it now (then stop renewing it, saying so once)."""
        if not self.call(self.client.set, self.key(b"master"), self.proc_id, nx=True, px=self.lease_ms):
            self.deposed = True
            log.warning("clusterhub: process %d: another master runs for %s now (this one's lease ran out); "
                        "this one's locks work on, but it no longer renews the name", self.proc_id, self.url.text)

    def retry_unfinished(self) -> None:
        for entry in list(self.unfinished):
            self.script(entry[0], **entry[1])
            self.finished(entry)

    def finished(self, entry: tuple[str, dict[str, Any]]) -> None:
        """``entry`` of :attr:`unfinished` had its reply."""
        with contextlib.suppress(ValueError):
            self.unfinished.remove(entry)

    def until_answered(self, text: str, args: dict[str, Any]) -> Any:
        """A release or a giving up, which the renewer finishes when anything
        stops it before its reply came (the link, Ctrl-C).  (Registered only
        then: a retry racing a release still on its way would make that
        release's own reply say "not ours", and the holding read lost.)"""
        try:
            return self.script(text, **args)
        except BaseException:
            self.unfinished.append((text, args))
            raise

    def lose_all(self) -> int:
        with self.held_lock:
            for h in self.held.values():
                h.lost = True
            return len(self.held)

    # ---- locks ------------------------------------------------------------------------

    def new_acq(self) -> bytes:
        return f"{self.proc_id}:{os.getpid()}:{next(self._acq_ids)}".encode()

    def acquire_args(self, key: bytes, acq: bytes, queue: bool = True, slice_ms: int = 0) -> dict[str, Any]:
        return {"keys": [self.lock_key(key), self.key(b"fence"), self.queue_key(key)],
                "args": [self.proc_id, acq, self.prefix + b"proc:", int(queue), self.wake_key(acq), slice_ms,
                         self.gone_key(acq)]}

    def try_acquire(self, key: bytes, acq: bytes, queue: bool = True) -> tuple[Optional[Holding], int]:
        """One attempt: (the holding, 0) when taken; (None, ms left of the
        holder's lease) when a live process holds it (queued when ``queue``:
        see :meth:`wait_handed`); (None, -1) when our own lease was gone (the
        caller renews it, see :meth:`renew`, and tries again)."""
        return self.acquired(key, acq, self.script(scripts.ACQUIRE, **self.acquire_args(key, acq, queue)))

    def acquire_or_wait(self, key: bytes, acq: bytes, seconds: float) -> tuple[Optional[Holding], int, bool]:
        """An attempt with a wait of up to ``seconds`` right behind it, in
        one round trip: (the holding, 0, _) when taken or handed to us in
        that time; else (None, ms left of the holder's lease or -1, as
        :meth:`try_acquire`, whether that is still current).  The wait is
        skipped when the holder's lease ends sooner (the caller goes on in
        slices of what is left): only then is the figure current."""
        slice_ms = max(1, int(seconds * 1000))
        r, got = self.script(scripts.ACQUIRE, **self.acquire_args(key, acq, True, slice_ms),
                             then=("BLPOP", self.wake_key(acq), slice_ms / 1000))
        h, left_ms = self.acquired(key, acq, r)
        if h is not None or got is None:
            return h, left_ms, False
        if got[1] == b"x":
            return None, left_ms, True
        return self.handed(key, acq, got), 0, False

    def acquired(self, key: bytes, acq: bytes, r: Any) -> tuple[Optional[Holding], int]:
        """The outcome of the acquire script (see :meth:`try_acquire`)."""
        if r[0] == -1:
            return None, -1
        if r[0] == 1:
            return self.holding(key, acq, int(r[1]), bool(r[2])), 0
        return None, int(r[1])

    def holding(self, key: bytes, acq: bytes, token: int, recovered: bool) -> Holding:
        h = Holding(key, acq, token, recovered)
        with self.held_lock:
            self.held[acq] = h
        return h

    def handed(self, key: bytes, acq: bytes, got: Any) -> Optional[Holding]:
        """The holding a ``BLPOP`` on our wake-up key returned (None: it timed out)."""
        return None if got is None else self.holding(key, acq, int(got[1]), False)

    def forget(self, h: Holding) -> None:
        """``h`` is no longer held here (released, or about to be)."""
        with self.held_lock:
            self.held.pop(h.acq, None)

    def release_args(self, h: Holding) -> dict[str, Any]:
        self.forget(h)
        return {"keys": [self.lock_key(h.key), self.key(b"fence"), self.queue_key(h.key)],
                "args": [h.acq, self.prefix + b"proc:", self.prefix + b"wake:", 2 * self.lease_ms]}

    def release(self, h: Holding) -> bool:
        """Release (handing the key to the first live waiter); False when it
        was not ours any more (lost).  When no reply came (the link failed,
        Ctrl-C), the renewer tries again until one does."""
        return self.released(h, self.until_answered(scripts.RELEASE, self.release_args(h)))

    @staticmethod
    def released(h: Holding, ok: Any) -> bool:
        if not ok:
            h.lost = True
        return bool(ok)

    def give_up_args(self, key: bytes, acq: bytes, unanswered: bool = False) -> dict[str, Any]:
        return {"keys": [self.lock_key(key), self.key(b"fence"), self.queue_key(key)],
                "args": [acq, self.prefix + b"proc:", self.prefix + b"wake:", 2 * self.lease_ms,
                         TOMBSTONE_MS if unanswered else 0, self.gone_key(acq)]}

    def give_up(self, key: bytes, acq: bytes, unanswered: bool = False) -> None:
        """An acquire that ends without the key: out of the queue, and what
        was handed to it (or taken for it, the reply lost) goes to the next.
        ``unanswered``: a command of it may still be on its way (it ended by
        an exception); it is refused when it comes.  When no reply came, the
        renewer tries again until one does."""
        self.until_answered(scripts.GIVE_UP, self.give_up_args(key, acq, unanswered))

    def lock_key(self, key: bytes) -> bytes:
        return self.prefix + b"lock:" + key

    def queue_key(self, key: bytes) -> bytes:
        return self.prefix + b"queue:" + key

    def wake_key(self, acq: bytes) -> bytes:
        return self.prefix + b"wake:" + acq

    def gone_key(self, acq: bytes) -> bytes:
        return self.prefix + b"gone:" + acq

    def wait_handed(self, key: bytes, acq: bytes, seconds: float) -> Optional[Holding]:
        """Block until a release hands us the key (the holding) or ``seconds`` (None)."""
        got = self.lock_call("BLPOP", self.wake_key(acq), max(0.001, round(seconds, 3)), spin=False)
        return self.handed(key, acq, got)

    def locked(self, key: bytes) -> bool:
        owner = self.call(self.client.hget, self.lock_key(key), "owner")
        return owner is not None and self.call(self.client.pttl, self.lease_key(int(owner))) > 0

    def held_locks(self) -> list[tuple[bytes, int, Optional[int], str]]:
        """(key, pid, worker id, host) of every key held by a live process."""
        c = self.client
        out = []
        pat = self.prefix.replace(b"[", b"\\[").replace(b"]", b"\\]") + b"lock:*"
        skip = len(self.prefix) + len(b"lock:")
        for name in self.call(lambda: list(c.scan_iter(match=pat, count=500))):
            owner = self.call(c.hget, name, "owner")
            info = self.call(c.get, self.lease_key(int(owner))) if owner else None
            if info:
                pid, host, wid = text(info).split(" ")
                out.append((name[skip:], int(pid), None if wid == "-" else int(wid), host))
        return out

    # ---- the end ----------------------------------------------------------------------

    def proc_keys(self, proc_id: int) -> list[bytes]:
        """A process's lease and its inbox's keys (scripts.py)."""
        return [self.lease_key(proc_id),
                *(self.key(b"%s:%d" % (k, proc_id)) for k in (b"inbox", b"queued", b"blocked", b"nudge"))]

    def _hub_keys(self) -> list[bytes]:
        """The keys of the hub itself (not of one process): worker ids,
        the lease setting, the fencing counter."""
        return [self.key(b"ids"), self.key(b"lease"), self.key(b"fence")]

    def leave(self) -> None:
        """Stop renewing, finish pending releases, give up the lease (and
        the name); the "left" event wakes the master's watcher."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        try:
            self.retry_unfinished()
            c = self.client
            # The event first: a watcher that finds the lease gone reads the
            # events before it calls that an exit (a clean one, with code 0).
            c.rpush(self.key(b"events"), f"left {self.proc_id}")
            c.pexpire(self.key(b"events"), 10 * self.lease_ms)
            # (Our inbox and its count go with the lease: no one reads them now.)
            c.delete(*self.proc_keys(self.proc_id))
            if self.is_master:  # (a worker's entry: the master's to remove, once it saw it go)
                c.hdel(self.key(b"procs"), str(self.proc_id))
            if self.is_master and c.get(self.key(b"master")) == str(self.proc_id).encode():
                c.delete(self.key(b"master"))
            if self.call(self._vacate, keys=[self.key(b"procs"), *self._hub_keys()],
                         args=[self.prefix + b"proc:", VACATED_KEEP_MS]):
                log.debug("clusterhub: process %d left %s empty", self.proc_id, self.url.text)
        except (redis.RedisError, HubError) as e:
            log.warning("clusterhub: leaving %s: %s (the lease runs out by itself)", self.url.text, e)

    def disconnect(self) -> None:
        """Close every connection, once the server has run what any thread
        sent ahead on its own (see :func:`_finish_ahead`)."""
        self.pool.disconnect()
        for conn in list(self._own_conns):
            if getattr(conn, "clusterhub_ahead", None):
                _finish_ahead(conn)
            conn.disconnect()

    def abandon(self) -> None:
        """In a child forked by other code: touch nothing of the parent's."""
        self._stop.set()
        self.pool.reset()
