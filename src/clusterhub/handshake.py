"""The handshake of a process that connects to a master by address (issue 17,
part 1): both sides, over a connected ``AF_UNIX`` stream socket.

:func:`master_handshake` runs on a socket the master accepted,
:func:`worker_handshake` on one the connecting process made (see
``address.connect``).  Both block, each within a deadline, and return plain
results (:class:`Accepted`, :class:`Joined`); they never build a hub.

The conversation (each message: ``b"CHH1"``, a 4-byte big-endian length of
at most :data:`MAX_MESSAGE`, then a JSON object)::

    master                                        worker
      check the peer: uid (its own or allowed_uids),     check the peer: uid (the expected
      PID namespace                                     one, by default its own), PID namespace
      hello {versions, serializer, pid, start,
             auth, challenge Cm}            ──▶
                                                check versions, serializer,
                                                authkey presence; pid is the peer's
                                         ◀──    hello {versions, serializer, pid, start,
                                                       auth, challenge Cw,
                                                       response HMAC(key, "worker", Cm, Cw)}
      check the same and the response;
      the peer's pidfd; assign the id
      welcome {worker id, fd names,
               response HMAC(key, "master", Cw, Cm)}
               + the fds (SCM_RIGHTS)       ──▶
                                                check the response; the master's pidfd
                                         ◀──    ready
    either side, instead of its next message:  refuse {reason}

A side that refuses sends ``refuse`` with its reason and raises
:class:`HandshakeError`; the other side raises it too, with ``by_peer``
set and the same reason, so both report, for instance, a version mismatch
naming both sides' values.  The challenge runs in both directions (as
``multiprocessing.connection`` does), with the role in the MAC so that a
response can never be reflected back at its sender; responses are compared
with ``hmac.compare_digest``.  No message is read past its length: when a
handshake returns, the socket holds only what the peer sent after it.

Fds: each side reads with ``MSG_CMSG_CLOEXEC``; descriptors that come with
any message but ``welcome`` are closed at once, and so are those of a
``welcome`` that is refused.

Errors: :class:`HandshakeError` (a ``ConnectError``, so a ``HubError`` and
a ``ConnectionError``) and :class:`HandshakeTimeout` (also a
``TimeoutError``).  They are defined here for now (see issue 17).
"""

from __future__ import annotations

import errno
import hmac
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Mapping, Optional

from .checks import check_timeout
from .errors import HandshakeError, HandshakeTimeout
from .handshake_io import (
    _NONCE,
    MAX_FDS,
    MAX_MESSAGE,
    PeerCred,
    _clip,
    _close_all,
    _Conn,
    _exited,
    _mac,
    _pidfd_pid,
    _pidns_problem,
    _starttime,
    peer_cred,
)

__all__ = [
    "Accepted",
    "HandshakeError",
    "HandshakeTimeout",
    "Joined",
    "PeerCred",
    "MAX_FDS",
    "MAX_MESSAGE",
    "MASTER_TIMEOUT",
    "READY_TIMEOUT",
    "WIRE_VERSION",
    "WORKER_ID_MAX",
    "WORKER_TIMEOUT",
    "master_handshake",
    "peer_cred",
    "send_ready",
    "worker_handshake",
]

# The version of what flows on the socket once the handshake is done (the
# framing and the message envelope).  Both sides must agree; bump it with
# any change to either.  (To move next to the envelope, in protocol.py.)
WIRE_VERSION = 1

MASTER_TIMEOUT = 2.0  # the master's deadline for a peer's hello (a peer that says nothing)
WORKER_TIMEOUT = 5.0  # the connecting side's deadline for the whole handshake
READY_TIMEOUT = 30.0  # the master's deadline for "ready" after its welcome
WORKER_ID_MAX = 2**32 - 1  # a message's origin field is 32 bits
_NAME_MAX = 200  # a serializer's name, a version
_FD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")

# SO_PEERPIDFD (Linux 6.5): 77 where the generic socket option numbers apply;
# Python has the name from 3.13 only.  None: use pidfd_open (see _peer_pidfd).
_SO_PEERPIDFD: Optional[int] = getattr(socket, "SO_PEERPIDFD", None)
if _SO_PEERPIDFD is None and os.uname().machine in (
    "x86_64", "i386", "i486", "i586", "i686", "aarch64", "arm64", "armv7l", "armv6l",
    "riscv64", "s390x", "ppc64le", "ppc64", "loongarch64",
):
    _SO_PEERPIDFD = 77


# ---- results -----------------------------------------------------------------------


@dataclass
class Accepted:
    """What :func:`master_handshake` learnt of a new worker.

    ``pidfd`` (close-on-exec) is owned by the caller: poll it for the
    worker's exit; :meth:`close` closes it.  ``pidfd_source`` says how it was
    obtained (``"SO_PEERPIDFD"`` or ``"pidfd_open"``).  ``serializer``,
    ``wire`` and ``version`` are the values both sides agreed on.
    """

    worker_id: int
    pid: int
    uid: int
    gid: int
    pidfd: int
    pidfd_source: str
    serializer: str
    wire: int
    version: str

    def close(self) -> None:
        """Close the pidfd (idempotent)."""
        fd, self.pidfd = self.pidfd, -1
        if fd >= 0:
            os.close(fd)


@dataclass
class Joined:
    """What :func:`worker_handshake` got from the master.

    ``fds`` maps the names the master gave (``"locks"``: the lock table's
    memfd) to descriptors of this process, close-on-exec and owned by the
    caller, as is ``master_pidfd`` (poll it for the master's exit).
    :meth:`close` closes them all.  ``ready`` is False until "ready" was
    sent (see ``worker_handshake(ready=...)``).
    """

    worker_id: int
    master_pid: int
    master_uid: int
    master_pidfd: int
    pidfd_source: str
    serializer: str
    wire: int
    version: str
    fds: dict[str, int] = field(default_factory=dict)
    ready: bool = False

    def close(self) -> None:
        """Close the received descriptors and the master's pidfd (idempotent)."""
        fds, self.fds = self.fds, {}
        _close_all(fds.values())
        fd, self.master_pidfd = self.master_pidfd, -1
        if fd >= 0:
            os.close(fd)


def _hello(role: str, wire: int, version: str, serializer: str, challenge: Optional[bytes],
           response: Optional[bytes] = None) -> dict[str, Any]:
    pid = os.getpid()
    return {
        "type": "hello", "hub": "clusterhub", "role": role, "wire": wire, "version": version,
        "serializer": serializer, "pid": pid, "start": _starttime(pid), "auth": challenge is not None,
        "challenge": None if challenge is None else challenge.hex(),
        "response": None if response is None else response.hex(),
    }


def _mismatch(master: tuple[int, str, str], worker: tuple[int, str, str]) -> Optional[str]:
    """The refusal naming both sides' values, or None if they agree."""
    labels = ("wire protocol version", "clusterhub version", "serializer")
    diffs = [f"{label}: master {_clip(m)}, worker {_clip(w)}" for label, m, w in zip(labels, master, worker)
             if m != w]
    return "the two sides do not match: " + "; ".join(diffs) if diffs else None


def _peer_pidfd(conn: _Conn, pid: int, start: Optional[int]) -> tuple[int, str]:
    """A pidfd (close-on-exec, the caller's) of the socket's peer ``pid``.

    With ``SO_PEERPIDFD`` the kernel gives the pidfd of the very process
    that connected (or listened), with no race; its pid is checked against
    the credentials'.  Without it, ``pidfd_open(pid)`` is checked after the
    fact: the process is still alive (so ``/proc/pid`` was that process
    when read) and its start time is the one the peer sent in its hello.
    The residual race: the peer died and ``pid`` was reused, within the same
    clock tick as the peer's own start, by a process that is then alive.
    """
    if _SO_PEERPIDFD is not None:
        try:
            fd = conn.sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
        except OSError as e:
            if e.errno in (errno.ESRCH, errno.EINVAL, errno.ENODATA):
                conn.refuse(f"the {conn.peer} exited during the handshake")
            if e.errno != errno.ENOPROTOOPT:
                raise
        else:
            got = _pidfd_pid(fd)
            if got is not None and got != pid:
                os.close(fd)
                if got <= 0:
                    conn.refuse(f"the {conn.peer} exited during the handshake")
                conn.refuse(f"the {conn.peer}'s pidfd names pid {got}, its credentials pid {pid}")
            return fd, "SO_PEERPIDFD"
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        conn.refuse(f"the {conn.peer} exited during the handshake")
    try:
        now = _starttime(pid)
        if _exited(fd):
            conn.refuse(f"the {conn.peer} exited during the handshake")
        if start is not None and now is not None and now != start:
            conn.refuse(f"pid {pid} is no longer the {conn.peer} (it exited and the pid was reused)")
    except BaseException:
        os.close(fd)
        raise
    return fd, "pidfd_open"


def _our_version(version: Optional[str]) -> str:
    if version is None:
        from . import __version__

        return __version__
    if not isinstance(version, str):
        raise TypeError(f"version must be a str, not {type(version).__name__}")
    if len(version) > _NAME_MAX:
        raise ValueError(f"version longer than {_NAME_MAX} characters")
    return version


def _check_common(serializer: str, authkey: Optional[bytes], wire: int) -> None:
    if not isinstance(serializer, str) or not serializer:
        raise TypeError("serializer must be a non-empty str (the serializer's name)")
    if len(serializer) > _NAME_MAX:
        raise ValueError(f"serializer name longer than {_NAME_MAX} characters")
    if authkey is not None:
        if not isinstance(authkey, bytes):
            raise TypeError(f"authkey must be bytes, not {type(authkey).__name__}")
        if not authkey:
            raise ValueError("authkey must not be empty")
    if not isinstance(wire, int) or isinstance(wire, bool):
        raise TypeError("wire must be an int")


# ---- the master's side -------------------------------------------------------------


def master_handshake(
    sock: socket.socket,
    *,
    assign_id: Callable[[], int],
    serializer: str,
    fds: Optional[Mapping[str, int]] = None,
    authkey: Optional[bytes] = None,
    allowed_uids: Iterable[int] = (),
    wire: int = WIRE_VERSION,
    version: Optional[str] = None,
    timeout: Optional[float] = MASTER_TIMEOUT,
    ready_timeout: Optional[float] = READY_TIMEOUT,
) -> Accepted:
    """Run the master's side of the handshake on an accepted socket.

    Blocks the calling thread (run it off the dispatcher: an acceptor
    thread, one per connection in progress).  ``timeout`` (default
    :data:`MASTER_TIMEOUT`, 2 s) bounds everything up to and including the
    welcome (so a peer that says nothing is dropped that soon);
    ``ready_timeout`` then bounds the wait for the worker's "ready" (which
    it may send only after its own setup; see :func:`worker_handshake`).
    None: no limit.

    Checks, in order: the peer's uid (``SO_PEERCRED``) is this process's
    effective uid or in ``allowed_uids``; it is in this PID namespace; its
    hello's wire version ``wire``, clusterhub version ``version`` (default
    ``clusterhub.__version__``) and ``serializer`` name equal ours; with
    ``authkey``, its challenge response (and it must not have a key if we
    have none); the pid it claims is the one that connected.  Then it takes
    the peer's pidfd (see ``_peer_pidfd``), calls ``assign_id()`` (only
    now: a refused peer costs no id), and sends the welcome with ``fds``
    (name → descriptor, at most :data:`MAX_FDS`; names ``[a-z][a-z0-9_]*``;
    the caller keeps its descriptors: the peer gets copies).

    Returns :class:`Accepted` (its ``pidfd`` is the caller's).  The socket
    stays the caller's in every case, in blocking mode, with nothing read
    past the handshake; on failure close it.  Raises
    :class:`HandshakeError` (refused by either side, malformed input, EOF),
    :class:`HandshakeTimeout`, OSError for an unexpected socket error, and
    TypeError/ValueError for bad arguments (before anything is sent).  On
    any failure nothing is left open but the socket.
    """
    version = _our_version(version)
    _check_common(serializer, authkey, wire)
    fdmap = dict(fds or {})
    if len(fdmap) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} fds can be handed over, not {len(fdmap)}")
    for name, fd in fdmap.items():
        if not isinstance(name, str) or not _FD_NAME.match(name):
            raise ValueError(f"bad fd name {name!r}: [a-z][a-z0-9_]*, at most 32 characters")
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise ValueError(f"fd {name!r} is not a descriptor: {fd!r}")
    uids = {os.geteuid(), *allowed_uids}
    t = check_timeout(timeout)
    rt = check_timeout(ready_timeout)

    try:
        cred = peer_cred(sock)
        conn = _Conn(sock, f"connecting process (pid {cred.pid})", t)
        if cred.uid not in uids:
            conn.refuse(f"uid {cred.uid} may not connect to this hub (only its own uid and allowed_uids)")
        problem = _pidns_problem(cred.pid, conn.peer)
        if problem:
            conn.refuse(problem)

        challenge = os.urandom(_NONCE) if authkey is not None else None
        conn.send(_hello("master", wire, version, serializer, challenge), "hello")
        msg, got = conn.recv("hello")
        _close_all(got)
        h = conn.hello(msg, "worker")
        problem = _mismatch((wire, version, serializer), (h.wire, h.version, h.serializer))
        if problem:
            conn.refuse(problem)
        if authkey is None:
            if h.auth:
                conn.refuse("the connecting process has an authkey and this hub none: give both the same authkey")
        else:
            assert challenge is not None
            if not h.auth:
                conn.refuse("this hub requires an authkey; the connecting process gave none")
            if h.challenge is None or h.response is None:
                conn.refuse(f"the {conn.peer} sent no challenge or no response")
            if not hmac.compare_digest(h.response, _mac(authkey, b"worker", challenge, h.challenge)):
                conn.refuse(f"authentication failed: the {conn.peer} does not know this hub's authkey")
        if h.pid != cred.pid:
            conn.refuse(f"the connection was made by pid {cred.pid}, but the peer says it is pid {h.pid}")

        pidfd, source = _peer_pidfd(conn, cred.pid, h.start)
        try:
            wid = assign_id()
            if not isinstance(wid, int) or isinstance(wid, bool) or not 1 <= wid <= WORKER_ID_MAX:
                raise ValueError(f"assign_id() returned {wid!r}, not an int from 1 to {WORKER_ID_MAX}")
            response = None
            if authkey is not None:
                assert challenge is not None and h.challenge is not None
                response = _mac(authkey, b"master", h.challenge, challenge).hex()
            welcome = {"type": "welcome", "worker_id": wid, "fds": list(fdmap), "response": response}
            conn.send(welcome, "welcome", fdmap.values())
            conn.set_timeout(rt)
            msg, got = conn.recv("ready message")
            _close_all(got)
            conn.expect(msg, "ready")
        except BaseException:
            os.close(pidfd)
            raise
        return Accepted(wid, cred.pid, cred.uid, cred.gid, pidfd, source, serializer, wire, version)
    finally:
        sock.settimeout(None)  # (blocking again, whatever happened)


# ---- the connecting side -----------------------------------------------------------


def worker_handshake(
    sock: socket.socket,
    *,
    serializer: str,
    authkey: Optional[bytes] = None,
    expect_uid: Optional[int] = None,
    require_fds: Collection[str] = (),
    wire: int = WIRE_VERSION,
    version: Optional[str] = None,
    timeout: Optional[float] = WORKER_TIMEOUT,
    ready: bool = True,
) -> Joined:
    """Run the connecting side of the handshake on a connected socket.

    Blocks the calling thread for at most ``timeout`` seconds (default
    :data:`WORKER_TIMEOUT`; None: no limit) in all.

    Checks, in order: the listener's uid (``SO_PEERCRED``) is
    ``expect_uid`` (default: this process's effective uid, or root); it is in this
    PID namespace; the master's hello: its pid is the listener's, its wire
    version, clusterhub version (``version``, default
    ``clusterhub.__version__``) and ``serializer`` name equal ours, and it
    uses an authkey exactly when we do.  With ``authkey`` it answers the
    master's challenge and checks the master's answer to its own before
    using anything of the welcome; then that the fds named in
    ``require_fds`` came.  It takes the master's pidfd (see
    ``_peer_pidfd``) and, with ``ready`` (default), tells the master it is
    ready.  With ``ready=False`` the caller does that with
    :func:`send_ready` when its own setup is done (the master counts the
    worker as joined only then, within its ``ready_timeout``).

    Returns :class:`Joined`, whose descriptors are the caller's.  The socket
    stays the caller's in every case, in blocking mode, with nothing read
    past the welcome; on failure close it.  Raises :class:`HandshakeError`
    (``by_peer`` when the master refused, with its reason),
    :class:`HandshakeTimeout`, OSError for an unexpected socket error,
    TypeError/ValueError for bad arguments.  On failure every descriptor
    received is closed.
    """
    version = _our_version(version)
    _check_common(serializer, authkey, wire)
    t = check_timeout(timeout)
    try:
        cred = peer_cred(sock)
        conn = _Conn(sock, f"master (pid {cred.pid})", t)
        # By default our own uid, or root: a server that drops privileges
        # (gunicorn's user=) keeps its master as root, and root could do
        # anything to us anyway, so trusting it opens nothing.
        expected = {os.geteuid(), 0} if expect_uid is None else {expect_uid}
        if cred.uid not in expected:
            whose = "its own or root" if expect_uid is None else str(expect_uid)
            conn.refuse(f"the master runs as uid {cred.uid}; the connecting process expects uid {whose}")
        problem = _pidns_problem(cred.pid, "master")
        if problem:
            conn.refuse(problem)

        msg, got = conn.recv("hello")
        _close_all(got)
        h = conn.hello(msg, "master")
        if h.pid != cred.pid:
            conn.refuse(f"the listening socket is pid {cred.pid}'s, but the master says it is pid {h.pid}")
        problem = _mismatch((h.wire, h.version, h.serializer), (wire, version, serializer))
        if problem:
            conn.refuse(problem)
        challenge = response = None
        if h.auth and authkey is None:
            conn.refuse("the master requires an authkey; the connecting process gave none")
        if authkey is not None:
            if not h.auth:
                conn.refuse("the connecting process has an authkey and the master none: "
                            "give both the same authkey")
            if h.challenge is None:
                conn.refuse(f"the {conn.peer} sent no challenge")
            challenge = os.urandom(_NONCE)
            response = _mac(authkey, b"worker", h.challenge, challenge)
        conn.send(_hello("worker", wire, version, serializer, challenge, response), "hello")

        msg, fds = conn.recv("welcome")
        pidfd = -1
        try:
            conn.expect(msg, "welcome")
            if authkey is not None:
                assert challenge is not None and h.challenge is not None
                theirs = conn.nonce(msg, "response")
                if theirs is None or not hmac.compare_digest(theirs, _mac(authkey, b"master", challenge, h.challenge)):
                    conn.refuse(f"authentication failed: the {conn.peer} does not know this process's authkey "
                                "(a process squatting the address?)")
            wid = conn.get(msg, "worker_id", int)
            names = conn.get(msg, "fds", list)
            names_ok = all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
            if not 1 <= wid <= WORKER_ID_MAX or not names_ok:
                conn.refuse(f"the {conn.peer} sent a malformed welcome: {_clip(msg)}")
            if len(names) != len(fds):
                conn.refuse(f"the {conn.peer} named {len(names)} file descriptors and sent {len(fds)}")
            fdmap = dict(zip(names, fds))
            missing = [n for n in require_fds if n not in fdmap]
            if missing:
                conn.refuse(f"the {conn.peer} did not hand over {', '.join(map(repr, missing))}")
            pidfd, source = _peer_pidfd(conn, cred.pid, h.start)
            joined = Joined(wid, cred.pid, cred.uid, pidfd, source, serializer, wire, version, fdmap)
            if ready:
                conn.send({"type": "ready"}, "ready message")
                joined.ready = True
        except BaseException:
            _close_all(fds)
            if pidfd >= 0:
                os.close(pidfd)
            raise
        return joined
    finally:
        sock.settimeout(None)  # (blocking again, whatever happened)


def send_ready(sock: socket.socket, joined: Joined, timeout: Optional[float] = WORKER_TIMEOUT) -> None:
    """Tell the master this worker is ready (after ``worker_handshake(...,
    ready=False)`` and the caller's setup).  Blocks at most ``timeout``.
    Raises :class:`HandshakeError` if the master is gone (it gave up after
    its ``ready_timeout``, or refused: then with its reason) or the
    worker is already ready; :class:`HandshakeTimeout`.  ``joined`` stays
    the caller's either way."""
    if joined.ready:
        raise HandshakeError("this worker already told the master it is ready")
    conn = _Conn(sock, f"master (pid {joined.master_pid})", check_timeout(timeout))
    try:
        conn.send({"type": "ready"}, "ready message")
    finally:
        sock.settimeout(None)
    joined.ready = True
