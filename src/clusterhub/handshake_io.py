"""The handshake's plumbing: the peer's credentials as the kernel names them
(uid, pid, PID namespace, pidfds), and its messages on the socket (a magic,
a length, JSON; descriptors over SCM_RIGHTS), each within a deadline.
The conversation itself is in handshake.py."""

from __future__ import annotations

import array
import hashlib
import hmac
import json
import os
import select
import socket
import struct
import time
from typing import Any, Collection, Iterable, NamedTuple, NoReturn, Optional

from .errors import HandshakeError, HandshakeTimeout

MAGIC = b"CHH1"  # "clusterhub handshake", format 1
_HEAD = struct.Struct(">4sI")
MAX_MESSAGE = 4096  # bytes of JSON in one handshake message
MAX_FDS = 16  # descriptors in a welcome
_NONCE = 32
_MAC_DOMAIN = b"clusterhub-handshake-1"
_REASON_MAX = 1000
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
_UCRED = struct.Struct("iII")


class PeerCred(NamedTuple):
    """The kernel's credentials of a socket's peer (``SO_PEERCRED``): those
    of the process that connected (or, for the connecting side, that called
    ``listen``), as they were then.  ``pid`` is 0 for a process in a PID
    namespace this one cannot see."""

    pid: int
    uid: int
    gid: int


# ---- the peer, as the kernel names it ------------------------------------------------


def peer_cred(sock: socket.socket) -> PeerCred:
    """``SO_PEERCRED`` of a connected ``AF_UNIX`` socket.  Raises OSError."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def _pidns_problem(pid: int, peer: str) -> Optional[str]:
    """Why the process ``pid`` (the peer) is not in our PID namespace, or
    None (same namespace, or not readable: another user's process, no /proc)."""
    if pid <= 0:
        return f"the {peer} is in a PID namespace this process cannot see (its pid reads as 0)"
    try:
        mine = os.stat("/proc/self/ns/pid")
        theirs = os.stat(f"/proc/{pid}/ns/pid")
    except OSError:
        return None
    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
        return (f"the {peer} (pid {pid}) is in another PID namespace (lock owners are thread ids, "
                "which would be confused across namespaces)")
    return None


def _starttime(pid: int) -> Optional[int]:
    """The process's start time (clock ticks since boot, /proc/PID/stat
    field 22), or None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pidfd_pid(fd: int) -> Optional[int]:
    """The pid a pidfd names (its fdinfo), or None if it cannot be read."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
            for line in f:
                if line.startswith(b"Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _exited(pidfd: int) -> bool:
    p = select.poll()  # (not select: descriptors may be above 1023)
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---- messages ----------------------------------------------------------------------


def _mac(key: bytes, role: bytes, verifier_challenge: bytes, prover_challenge: bytes) -> bytes:
    msg = b"%s %s %s %s" % (_MAC_DOMAIN, role, verifier_challenge, prover_challenge)
    return hmac.new(key, msg, hashlib.sha256).digest()


def _clip(value: Any, n: int = 100) -> str:
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


class _Hello(NamedTuple):
    wire: int
    version: str
    serializer: str
    pid: int
    start: Optional[int]
    auth: bool
    challenge: Optional[bytes]
    response: Optional[bytes]


class _Conn:
    """One side of a handshake in progress: framing, deadline, refusals."""

    def __init__(self, sock: socket.socket, peer: str, timeout: Optional[float]) -> None:
        self.sock = sock
        self.peer = peer  # "master (pid N)", "connecting process (pid N)"
        self.set_timeout(timeout)

    def set_timeout(self, timeout: Optional[float]) -> None:
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def _arm(self, what: str, sending: bool) -> None:
        if self.deadline is None:
            self.sock.settimeout(None)
            return
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._timed_out(what, sending)
        self.sock.settimeout(left)

    def _timed_out(self, what: str, sending: bool) -> NoReturn:
        if sending:
            self.refuse(f"the {self.peer} did not take the {what} within {self.timeout} s", timeout=True)
        self.refuse(f"no {what} from the {self.peer} within {self.timeout} s", timeout=True)

    def refuse(self, reason: str, timeout: bool = False) -> NoReturn:
        """Tell the peer why (best effort, never blocking) and raise."""
        reason = reason[:_REASON_MAX]
        body = json.dumps({"type": "refuse", "reason": reason}).encode("ascii")
        while len(body) > MAX_MESSAGE:  # (non-ASCII is escaped: up to 12 bytes a character)
            body = json.dumps({"type": "refuse", "reason": reason[: len(reason) // 2]}).encode("ascii")
            reason = reason[: len(reason) // 2]
        try:
            self.sock.send(_HEAD.pack(MAGIC, len(body)) + body, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass
        raise (HandshakeTimeout if timeout else HandshakeError)(reason)

    def send(self, msg: dict[str, Any], what: str, fds: Collection[int] = ()) -> None:
        body = json.dumps(msg, separators=(",", ":")).encode("ascii")
        assert len(body) <= MAX_MESSAGE, "a handshake message of ours is too large"
        data = _HEAD.pack(MAGIC, len(body)) + body
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        try:
            self._arm(what, True)
            n = self.sock.sendmsg([data], anc, socket.MSG_NOSIGNAL)
            while n < len(data):  # (the rest alone: the fds went with the first byte)
                self._arm(what, True)
                n += self.sock.send(data[n:], socket.MSG_NOSIGNAL)
        except TimeoutError:
            self._timed_out(what, True)
        except (BrokenPipeError, ConnectionResetError) as e:
            self._raise_queued_refusal()
            raise HandshakeError(f"the {self.peer} closed the connection before the {what}") from e

    def _raise_queued_refusal(self) -> None:
        """After a failed send: the peer may have refused and closed before
        reading what we sent; its reason is then waiting here."""
        self.set_timeout(0.05)
        try:
            msg, fds = self.recv("refusal")
            _close_all(fds)
        except HandshakeError as e:
            if e.by_peer:
                raise
        except OSError:
            pass

    def recv(self, what: str) -> tuple[dict[str, Any], list[int]]:
        """The next message and the descriptors that came with it (owned by
        the caller); a refusal is raised as HandshakeError(by_peer=True)."""
        fds: list[int] = []
        try:
            magic = self._exact(4, fds, what)
            if magic != MAGIC:
                if magic[:3] == MAGIC[:3]:
                    self.refuse(f"the {self.peer} speaks handshake format {_clip(magic[3:])}, "
                                f"this process format {_clip(MAGIC[3:])}")
                self.refuse(f"the {self.peer} does not speak the clusterhub handshake "
                            f"(it sent {_clip(magic)} where the {what} should start)")
            (n,) = struct.unpack(">I", self._exact(4, fds, what))
            if n > MAX_MESSAGE:
                self.refuse(f"the {self.peer} sent a handshake message of {n} bytes "
                            f"(at most {MAX_MESSAGE})")
            body = self._exact(n, fds, what)
            try:
                msg = json.loads(body.decode("utf-8"))
            except (ValueError, RecursionError):
                msg = None
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                self.refuse(f"the {self.peer} sent a malformed handshake message: {_clip(body)}")
        except BaseException:
            _close_all(fds)
            raise
        if msg["type"] == "refuse":
            _close_all(fds)
            reason = msg.get("reason")
            text = reason[:_REASON_MAX] if isinstance(reason, str) else _clip(reason)
            raise HandshakeError(f"refused by the {self.peer}: {text}", by_peer=True)
        return msg, fds

    def _exact(self, n: int, fds: list[int], what: str) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            self._arm(what, False)
            try:
                data, anc, flags, _ = self.sock.recvmsg(n - len(buf), _ANC_SPACE, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                self._timed_out(what, False)
            except ConnectionResetError as e:
                raise HandshakeError(f"the {self.peer} reset the connection before its {what}") from e
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(raw[: len(raw) - len(raw) % a.itemsize])
                    fds.extend(a)
            if flags & socket.MSG_CTRUNC:
                self.refuse(f"the {self.peer} sent more than {MAX_FDS} file descriptors")
            if not data:
                raise HandshakeError(f"the {self.peer} closed the connection before its {what}"
                                     + (" (midway)" if buf else ""))
            buf += data
        return bytes(buf)

    def expect(self, msg: dict[str, Any], kind: str) -> None:
        if msg["type"] != kind:
            self.refuse(f"the {self.peer} sent {_clip(msg['type'])} where a {kind} should come")

    def get(self, msg: dict[str, Any], key: str, typ: type, optional: bool = False) -> Any:
        v = msg.get(key)
        if v is None and optional:
            return None
        if type(v) is not typ:  # (exact: a bool is not an int)
            self.refuse(f"the {self.peer} sent a malformed {msg['type']}: "
                        f"{key!r} is {_clip(v)} (expected {typ.__name__})")
        return v

    def nonce(self, msg: dict[str, Any], key: str) -> Optional[bytes]:
        v = self.get(msg, key, str, optional=True)
        if v is None:
            return None
        try:
            raw = bytes.fromhex(v)
        except ValueError:
            raw = b""
        if len(raw) != _NONCE:
            self.refuse(f"the {self.peer} sent a malformed {msg['type']}: bad {key!r}")
        return raw

    def hello(self, msg: dict[str, Any], role: str) -> _Hello:
        self.expect(msg, "hello")
        if msg.get("hub") != "clusterhub" or msg.get("role") != role:
            self.refuse(f"the {self.peer} is not a clusterhub {role} "
                        f"(hub={_clip(msg.get('hub'))}, role={_clip(msg.get('role'))})")
        challenge = self.nonce(msg, "challenge")
        response = self.nonce(msg, "response")
        auth = self.get(msg, "auth", bool)
        return _Hello(
            wire=self.get(msg, "wire", int),
            version=self.get(msg, "version", str),
            serializer=self.get(msg, "serializer", str),
            pid=self.get(msg, "pid", int),
            start=self.get(msg, "start", int, optional=True),
            auth=auth,
            challenge=challenge,
            response=response,
        )
