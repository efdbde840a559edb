"""Addresses a hub listens on and processes connect to (issue 17, part 1).

An address is ``"@name"``, a socket in Linux's abstract namespace (no file;
it vanishes with the last descriptor of the listening socket), or anything
else, a filesystem path.  ``scheme://...`` addresses are not local sockets:
``redis://`` (and ``rediss://``) belong to the Redis transport and are refused
here with a message that says so.

- :func:`parse_address` checks an address and returns an :class:`Address`.
- :func:`listen` makes a :class:`Listener`: an ``AF_UNIX`` ``SOCK_STREAM``
  socket, close-on-exec and non-blocking, closed in every process forked
  from this one (``os.register_at_fork``).  For a path, the socket file is
  owner-only (``0600``) before anyone can connect to it, a companion lock
  file ``PATH.lock`` is ``flock``-ed for the listener's whole life, and a
  socket file left by a dead master is replaced only under that lock; at
  close the socket file is removed (the lock file stays: removing a lock
  file lets two processes lock two different files).
- :func:`connect` connects to an address with a timeout.

Nothing here blocks except :func:`connect` (bounded by its timeout) and the
short probe of an existing socket file in :func:`listen` (a non-blocking
``connect``).

The errors of this module are defined here for now (see the integrator's
notes in issue 17): :class:`AddressInUse`, :class:`ConnectError`,
:class:`ConnectTimeout`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import stat
import struct
import weakref
from dataclasses import dataclass
from typing import Optional, Union

from .checks import check_timeout
from .errors import AddressInUse, ConnectError, ConnectTimeout, HubError

__all__ = [
    "Address",
    "AddressInUse",
    "ConnectError",
    "ConnectTimeout",
    "Listener",
    "connect",
    "listen",
    "parse_address",
    "scheme_of",
    "SUN_PATH_MAX",
]

# sockaddr_un.sun_path is 108 bytes on Linux.  A path keeps one for the
# terminating NUL (what every libc and Python expect); an abstract name
# takes the leading NUL, so both have 107 bytes of their own.
SUN_PATH_MAX = 107

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# ---- addresses ---------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """A parsed address.

    ``text``: as given (what ``hub.address`` reads back); ``abstract``: an
    ``@name``; ``path``: for a filesystem address, the absolute path (made
    absolute when parsed, so a later ``chdir`` changes nothing), else None;
    ``sockaddr``: what ``bind``/``connect`` take.
    """

    text: str
    abstract: bool
    path: Optional[str]
    sockaddr: bytes

    def __str__(self) -> str:
        return self.text

    @property
    def lock_path(self) -> Optional[str]:
        """The companion lock file of a path address (None for an abstract one)."""
        return None if self.path is None else self.path + ".lock"


AddressLike = Union[str, "os.PathLike[str]", Address]


def scheme_of(address: object) -> Optional[str]:
    """The lower-cased scheme of a ``scheme://...`` string (``"redis"``), or
    None for anything else.  Never raises."""
    if isinstance(address, str):
        m = _SCHEME.match(address)
        if m:
            return m.group(1).lower()
    return None


def parse_address(address: AddressLike) -> Address:
    """Check ``address`` and return it as an :class:`Address`.

    ``"@name"``: the abstract socket ``\\0name`` (``name``: 1 to 107 bytes of
    UTF-8, no NUL).  Anything else is a filesystem path (a ``str`` or
    ``os.PathLike``; at most 107 bytes once made absolute, no NUL).  An
    :class:`Address` is returned as is.

    Raises TypeError (not a str or path), ValueError (empty, too long, a NUL,
    or a ``scheme://`` address: ``redis://`` is the Redis transport's).
    Pure: touches no file.
    """
    if isinstance(address, Address):
        return address
    if not isinstance(address, str):
        if isinstance(address, os.PathLike):
            address = os.fspath(address)
        if not isinstance(address, str):
            raise TypeError(f"address must be a str or a path, not {type(address).__name__}")
    text = address
    if not text:
        raise ValueError("address must not be empty: use '@name' (abstract socket) or a filesystem path")
    if "\0" in text:
        raise ValueError(f"address {text!r} contains a NUL character")
    scheme = scheme_of(text)
    if scheme in ("redis", "rediss"):
        raise ValueError(
            f"{text!r} is a Redis server's address, for the Redis transport; "
            "this transport listens on '@name' (abstract socket) or a filesystem path"
        )
    if scheme is not None:
        raise ValueError(
            f"{text!r}: unsupported scheme {scheme!r}; a local hub's address is '@name' "
            "(abstract socket) or a filesystem path (write './' before a path that looks like a URL)"
        )
    if text.startswith("@"):
        try:
            name = text[1:].encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"abstract address {text!r} is not valid UTF-8") from e
        if not name:
            raise ValueError("abstract address '@' has no name: use '@name'")
        if len(name) > SUN_PATH_MAX:
            raise ValueError(
                f"abstract address {text[:20]!r}... is too long: {len(name)} bytes after '@', "
                f"at most {SUN_PATH_MAX}"
            )
        return Address(text, True, None, b"\0" + name)
    path = os.path.abspath(text)
    raw = os.fsencode(path)
    if len(raw) > SUN_PATH_MAX:
        raise ValueError(
            f"socket path {path!r} is too long: {len(raw)} bytes, at most {SUN_PATH_MAX} "
            "(a limit of AF_UNIX sockets; use a shorter path or an '@name' address)"
        )
    return Address(text, False, path, raw)


# ---- listening ---------------------------------------------------------------------

# Open listeners of this process: a forked child closes its copies at once.
_listeners: "weakref.WeakSet[Listener]" = weakref.WeakSet()


def _abandon_all_in_child() -> None:
    for lst in list(_listeners):
        lst.abandon()


os.register_at_fork(after_in_child=_abandon_all_in_child)


class Listener:
    """A listening socket for a hub's address (made by :func:`listen`).

    ``sock`` is non-blocking and close-on-exec; register :meth:`fileno` with
    an epoll and call :meth:`accept` when it is readable.  For a path
    address, the listener also holds the ``flock`` on ``PATH.lock`` until
    :meth:`close`.

    In a process forked from the one that listens, every listener is
    abandoned at once (its descriptors closed, nothing removed): a forked
    worker never keeps the address alive after its master is gone.

    Not thread-safe against itself: close it from the thread that accepts,
    or after that thread stopped.
    """

    def __init__(self, address: Address, sock: socket.socket, lock_fd: int,
                 ident: Optional[tuple[int, int]]) -> None:
        self.address = address
        self.sock = sock
        self._lock_fd = lock_fd  # -1 for an abstract address
        self._ident = ident  # (st_dev, st_ino) of the socket file we made
        self._pid = os.getpid()
        self.closed = False
        _listeners.add(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.sock.fileno()}"
        return f"<Listener {self.address.text!r} {state}>"

    def fileno(self) -> int:
        """The listening socket's descriptor (owned by the listener)."""
        return self.sock.fileno()

    def accept(self) -> Optional[socket.socket]:
        """Take one pending connection without blocking: a connected socket,
        blocking and close-on-exec, owned by the caller; None when none is
        pending.  Raises OSError for anything else (EMFILE, ENFILE: the
        connection stays pending, so back off before trying again)."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except ConnectionAbortedError:
                continue  # the peer gave up meanwhile: the next one
            conn.setblocking(True)
            return conn

    def close(self) -> None:
        """Stop listening: remove the socket file (a path address, if it is
        still the one we made), close the socket, then release the lock
        file.  Idempotent; in a forked child it only abandons."""
        if self.closed:
            return
        if os.getpid() != self._pid:
            self.abandon()
            return
        self.closed = True
        _listeners.discard(self)
        try:
            if self.address.path is not None and self._ident is not None:
                try:
                    st = os.lstat(self.address.path)
                    if (st.st_dev, st.st_ino) == self._ident:
                        os.unlink(self.address.path)  # (under our lock: no master replaced it)
                except FileNotFoundError:
                    pass
        finally:
            self.sock.close()
            if self._lock_fd >= 0:
                fd, self._lock_fd = self._lock_fd, -1
                try:
                    os.ftruncate(fd, 0)  # (no stale pid for the next reader)
                except OSError:
                    pass
                os.close(fd)  # releases the flock

    def abandon(self) -> None:
        """Close this process's descriptors and remove nothing (a forked
        child's copies: the master keeps listening).  Idempotent."""
        if self.closed:
            return
        self.closed = True
        _listeners.discard(self)
        self.sock.close()  # (close, never shutdown: that would stop the master's socket)
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)  # the flock stays with the master's descriptor

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _new_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)


def _holder_pid(lock_fd: int) -> Optional[int]:
    try:
        data = os.pread(lock_fd, 32, 0)
        return int(data.strip() or b"-")
    except (OSError, ValueError):
        return None


def peer_pid(sock: socket.socket) -> Optional[int]:
    """The pid of the process at the other end of a Unix socket (SO_PEERCRED), or None."""
    try:
        pid, _, _ = struct.unpack("iII", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         struct.calcsize("iII")))
        return pid or None
    except OSError:
        return None


def _lock_path(addr: Address) -> int:
    """Open and flock ``PATH.lock``; the descriptor (the lock lives with it)."""
    lock_path = addr.lock_path
    assert lock_path is not None
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise HubError(f"cannot open the lock file {lock_path!r} of address {addr.text!r}: "
                       f"{e.strerror}") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise HubError(f"the lock file {lock_path!r} of address {addr.text!r} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            who = f"pid {pid}" if pid else "another process"
            raise AddressInUse(
                f"address in use: {addr.text!r} (a clusterhub master, {who}, holds {lock_path!r})",
                addr.text,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _clear_stale(addr: Address) -> None:
    """Under the path's lock: remove a socket file nobody listens on; refuse
    anything else that is there."""
    path = addr.path
    assert path is not None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressInUse(f"address in use: {addr.text!r} exists and is not a socket (not replacing it)",
                           addr.text)
    probe = _new_socket()
    try:
        probe.setblocking(False)
        try:
            probe.connect(addr.sockaddr)
        except ConnectionRefusedError:
            # Nobody listens: left by a dead master (we hold the lock, so no
            # master is alive on it).  Remove it only if it is still that file.
            st2 = os.lstat(path)
            if (st2.st_dev, st2.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(path)
            return
        except FileNotFoundError:
            return  # gone meanwhile
        except BlockingIOError:
            pass  # its backlog is full: alive
        except PermissionError as e:
            raise AddressInUse(
                f"address in use: {addr.text!r} is a socket this process may not connect to "
                "(another user's?); not replacing it", addr.text) from e
        pid = peer_pid(probe)
        who = f" (pid {pid})" if pid else ""
        raise AddressInUse(
            f"address in use: {addr.text!r}: a process that is not a clusterhub master{who} listens there",
            addr.text,
        )
    finally:
        probe.close()


def listen(address: AddressLike, *, backlog: int = 128) -> Listener:
    """Listen on ``address`` (see :func:`parse_address`) and return the
    :class:`Listener`, which the caller owns (``close()``).

    A path: ``PATH.lock`` is created (``0600``, never followed if a
    symlink) and ``flock``-ed without waiting; a socket file at ``PATH``
    that nobody listens on is removed (only under that lock); the socket is
    bound with mode ``0600`` (set on the socket before ``bind``, checked
    after, and in any case before ``listen``: no process can connect before
    the mode is owner-only).  An abstract name: bound as is.

    Raises :class:`AddressInUse` when a master holds the lock, a process
    that is not a master listens on the path or the abstract name, or the
    path is not a socket; ValueError/TypeError for a bad address; HubError
    for a lock file that cannot be opened; OSError for other failures
    (permissions of the directory, ...).  Does not block.
    """
    addr = parse_address(address)
    lock_fd = -1
    sock: Optional[socket.socket] = None
    try:
        if addr.path is not None:
            lock_fd = _lock_path(addr)
            _clear_stale(addr)
        sock = _new_socket()
        ident: Optional[tuple[int, int]] = None
        if addr.path is not None:
            os.fchmod(sock.fileno(), 0o600)  # Linux: bind creates the file with this mode
        try:
            sock.bind(addr.sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                what = ("another process listens on it" if addr.abstract
                        else "a file appeared there meanwhile (not a clusterhub master's)")
                raise AddressInUse(f"address in use: {addr.text!r} ({what})", addr.text) from None
            raise
        if addr.path is not None:
            st = os.lstat(addr.path)
            if stat.S_IMODE(st.st_mode) & 0o077:
                os.chmod(addr.path, 0o600)  # (not listening yet: nobody could connect)
            ident = (st.st_dev, st.st_ino)
        sock.listen(backlog)
        sock.setblocking(False)
        return Listener(addr, sock, lock_fd, ident)
    except BaseException:
        if sock is not None:
            sock.close()
        if lock_fd >= 0:
            os.close(lock_fd)
        raise


# ---- connecting --------------------------------------------------------------------


def _set_sndtimeo(sock: socket.socket, seconds: float) -> None:
    sec = int(seconds)
    usec = int((seconds - sec) * 1e6)
    if sec == 0 and usec == 0 and seconds > 0:
        usec = 1  # (0 would mean no limit)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", sec, usec))


def connect(address: AddressLike, timeout: Optional[float] = 5.0) -> socket.socket:
    """Connect to ``address``; the connected socket (blocking, close-on-exec,
    owned by the caller), before any handshake.

    An ``AF_UNIX`` connect waits only while the listener's backlog is full:
    ``timeout`` (seconds; None: no limit; 0: do not wait) bounds that wait.

    Raises :class:`ConnectTimeout` (the backlog stayed full), and
    :class:`ConnectError` when nothing listens (its ``__cause__`` is the
    ``FileNotFoundError`` of a missing socket file or the
    ``ConnectionRefusedError`` of a stale one or of an unbound abstract
    name) or the socket file may not be connected to (``PermissionError``);
    ValueError/TypeError for a bad address or timeout.
    """
    addr = parse_address(address)
    t = check_timeout(timeout)
    sock = _new_socket()
    try:
        if t == 0:
            sock.setblocking(False)
        elif t is not None:
            _set_sndtimeo(sock, t)  # bounds a blocking AF_UNIX connect (then EAGAIN)
        try:
            sock.connect(addr.sockaddr)
        except (BlockingIOError, InterruptedError) as e:
            raise ConnectTimeout(
                f"connecting to {addr.text!r} timed out after {t} s (the listener's backlog stayed full)"
            ) from e
        except FileNotFoundError as e:
            raise ConnectError(f"nothing listens at {addr.text!r}: no such socket file") from e
        except ConnectionRefusedError as e:
            what = ("nothing listens on this abstract name" if addr.abstract
                    else "connection refused (a socket file left by a dead master?)")
            raise ConnectError(f"nothing listens at {addr.text!r}: {what}") from e
        except PermissionError as e:
            raise ConnectError(
                f"may not connect to {addr.text!r}: permission denied (the socket file is owner-only)"
            ) from e
        except OSError as e:
            raise ConnectError(f"cannot connect to {addr.text!r}: {e.strerror or e}") from e
        if t is not None and t > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))  # no limit
        sock.setblocking(True)
        return sock
    except BaseException:
        sock.close()
        raise
