"""Addresses, listeners and the connect handshake (issue 17, part 1):
``clusterhub.address`` and ``clusterhub.handshake``, with real sockets and
real processes.

The master side runs in the test process; a connecting process is a forked
child (:class:`Child`) that reports through a pipe and waits on a gate the
test opens.  Malformed input is written by hand (the frame format is
restated here, as the handshake's docstring gives it) on real sockets.
Every wait is bounded; nothing sleeps to let something happen.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import pickle
import select
import shutil
import signal
import socket
import stat
import struct
import tempfile
import time
import warnings
from typing import Any, Callable, Iterator

import pytest

import clusterhub
from clusterhub import address as A
from clusterhub import handshake as H

NOBODY = 65534
CLONE_NEWPID = 0x20000000

_names = iter(range(1_000_000))


def abstract() -> str:
    """A fresh abstract address for this test process."""
    return f"@clusterhub-test-{os.getpid()}-{next(_names)}"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def frame(body: bytes, magic: bytes = b"CHH1") -> bytes:
    """A handshake message as the protocol frames it."""
    return struct.pack(">4sI", magic, len(body)) + body


def jframe(obj: Any) -> bytes:
    return frame(json.dumps(obj).encode())


def read_frames(sock: socket.socket, timeout: float = 10.0) -> list[Any]:
    """Every handshake message the peer sent until it closed (JSON decoded)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    out = []
    while data:
        magic, n = struct.unpack_from(">4sI", data)
        assert magic == b"CHH1" and n <= H.MAX_MESSAGE
        out.append(json.loads(data[8 : 8 + n]))
        data = data[8 + n :]
    return out


# ---- forked children ------------------------------------------------------------


class Ctl:
    """A child's side: ``put`` a report, ``wait`` at the gate."""

    def __init__(self, rep: int, gate: int) -> None:
        self.rep = rep
        self.gate = gate

    def put(self, *item: Any) -> None:
        data = pickle.dumps(item)
        data = struct.pack("<I", len(data)) + data
        while data:
            data = data[os.write(self.rep, data) :]

    def wait(self, timeout: float = 60.0) -> None:
        p = select.poll()
        p.register(self.gate, select.POLLIN)
        if not p.poll(timeout * 1000):
            raise TimeoutError("the test never opened the gate")
        os.read(self.gate, 1)


class Child:
    """A forked child running ``fn(ctl, *args)``; it exits 0 when that
    returns, 1 after reporting ``("raised", type, message)``."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        rep_r, rep_w = os.pipe()
        gate_r, gate_w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # (3.12+: a fork with threads)
            pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(rep_r)
                os.close(gate_w)
                ctl = Ctl(rep_w, gate_r)
                try:
                    fn(ctl, *args)
                    code = 0
                except BaseException as e:
                    ctl.put("raised", type(e).__name__, str(e))
            finally:
                os._exit(code)
        os.close(rep_w)
        os.close(gate_r)
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.rep = rep_r
        self.gate = gate_w
        self.buf = b""
        self.code: int | None = None

    def get(self, timeout: float = 30.0) -> tuple[Any, ...]:
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                (n,) = struct.unpack_from("<I", self.buf)
                if len(self.buf) >= 4 + n:
                    item: tuple[Any, ...] = pickle.loads(self.buf[4 : 4 + n])
                    self.buf = self.buf[4 + n :]
                    return item
            left = deadline - time.monotonic()
            p = select.poll()
            p.register(self.rep, select.POLLIN)
            if left <= 0 or not p.poll(left * 1000):
                raise TimeoutError(f"child {self.pid} reported nothing within {timeout} s")
            chunk = os.read(self.rep, 65536)
            if not chunk:
                raise EOFError(f"child {self.pid} exited without reporting")
            self.buf += chunk

    def release(self) -> None:
        os.write(self.gate, b"x")

    def exited(self, timeout: float = 0.0) -> bool:
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return bool(p.poll(timeout * 1000))

    def join(self, timeout: float = 30.0) -> int:
        assert self.exited(timeout), f"child {self.pid} still running after {timeout} s"
        return self.reap()

    def reap(self) -> int:
        if self.code is None:
            _, status = os.waitpid(self.pid, 0)
            self.code = os.waitstatus_to_exitcode(status)
            for fd in (self.pidfd, self.rep, self.gate):
                os.close(fd)
        return self.code


@pytest.fixture
def fork() -> Iterator[Callable[..., Child]]:
    """``fork(fn, *args)`` starts a Child; leftovers are killed at the end."""
    children: list[Child] = []

    def start(fn: Callable[..., Any], *args: Any) -> Child:
        c = Child(fn, *args)
        children.append(c)
        return c

    yield start
    for c in children:
        if c.code is None:
            try:
                os.kill(c.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            c.reap()


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory for socket paths (sun_path holds 107 bytes)."""
    d = tempfile.mkdtemp(prefix="chs-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def accept(listener: A.Listener, timeout: float = 30.0) -> socket.socket:
    p = select.poll()
    p.register(listener.fileno(), select.POLLIN)
    assert p.poll(timeout * 1000), f"no connection within {timeout} s"
    conn = listener.accept()
    assert conn is not None
    return conn


def serve(listener: A.Listener, **kw: Any) -> Any:
    """Accept one connection and run the master's handshake: the Accepted
    (pidfd closed) or the HandshakeError; and how long the handshake took."""
    conn = accept(listener)
    kw.setdefault("assign_id", lambda: 7)
    kw.setdefault("serializer", "pickle")
    t0 = time.monotonic()
    try:
        acc = H.master_handshake(conn, **kw)
        acc.close()
        return acc, time.monotonic() - t0
    except H.HandshakeError as e:
        return e, time.monotonic() - t0
    finally:
        conn.close()


def join_hub(ctl: Ctl, addr: str, kw: dict[str, Any]) -> None:
    """Child: connect and run the worker's handshake; report the outcome."""
    sock = A.connect(addr, 10)
    try:
        kw.setdefault("serializer", "pickle")
        j = H.worker_handshake(sock, **kw)
    except H.HandshakeError as e:
        ctl.put("error", type(e).__name__, str(e), e.by_peer)
        return
    finally:
        sock.close()
    ctl.put("joined", j.worker_id, sorted(j.fds), j.master_pid, j.pidfd_source)
    j.close()


# ---- addresses ------------------------------------------------------------------


def test_parse_abstract_path_and_pathlike(sockdir: str) -> None:
    a = A.parse_address("@app")
    assert (a.abstract, a.path, a.sockaddr, a.lock_path) == (True, None, b"\0app", None)
    assert A.parse_address("@" + "x" * 107).sockaddr == b"\0" + b"x" * 107
    old = os.getcwd()
    os.chdir(sockdir)
    try:
        p = A.parse_address("hub.sock")
    finally:
        os.chdir(old)
    assert p.text == "hub.sock" and p.path == os.path.join(sockdir, "hub.sock") and not p.abstract
    assert p.lock_path == p.path + ".lock"
    import pathlib

    q = A.parse_address(pathlib.Path(sockdir) / "x.sock")
    assert q.path == os.path.join(sockdir, "x.sock")
    assert A.parse_address(q) is q


@pytest.mark.parametrize(
    "bad, kind, words",
    [
        ("", ValueError, "empty"),
        ("@", ValueError, "no name"),
        ("@" + "x" * 108, ValueError, "too long"),
        ("/" + "x" * 120, ValueError, "too long"),
        ("/tmp/a\0b", ValueError, "NUL"),
        ("redis://localhost:6379/0", ValueError, "Redis transport"),
        ("rediss://h", ValueError, "Redis transport"),
        ("tcp://h:1", ValueError, "unsupported scheme 'tcp'"),
        (5, TypeError, "not int"),
        (b"/tmp/x", TypeError, "not bytes"),
    ],
)
def test_parse_rejects(bad: Any, kind: type, words: str) -> None:
    with pytest.raises(kind) as ei:
        A.parse_address(bad)
    assert words in str(ei.value)
    assert A.scheme_of("redis://x") == "redis" and A.scheme_of("/a/b") is None


def test_path_listener_is_private_and_removed_at_close(sockdir: str) -> None:
    path = os.path.join(sockdir, "hub.sock")
    old = os.umask(0)  # (the mode does not depend on the umask)
    try:
        lst = A.listen(path)
    finally:
        os.umask(old)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.lstat(path + ".lock").st_mode) == 0o600
    assert fcntl.fcntl(lst.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert os.get_blocking(lst.fileno()) is False
    assert lst.accept() is None  # nothing pending: no wait
    c = A.connect(path, 5)
    conn = accept(lst)
    assert conn.getblocking() and fcntl.fcntl(conn.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert fcntl.fcntl(c.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    conn.close()
    c.close()
    lst.close()
    lst.close()  # idempotent
    assert not os.path.exists(path)
    assert os.path.exists(path + ".lock")  # (removing it would let two masters lock two files)
    with pytest.raises(A.ConnectError) as ei:
        A.connect(path, 5)
    assert isinstance(ei.value.__cause__, FileNotFoundError)


def test_abstract_address_in_use() -> None:
    addr = abstract()
    with A.listen(addr):
        with pytest.raises(A.AddressInUse) as ei:
            A.listen(addr)
        assert "address in use" in str(ei.value) and addr in str(ei.value)
        assert isinstance(ei.value, clusterhub.HubError) and ei.value.address == addr
    A.listen(addr).close()  # free again once closed


def _listen_and_hold(ctl: Ctl, addr: str) -> None:
    lst = A.listen(addr)
    ctl.put("listening")
    ctl.wait()
    lst.close()


def test_path_in_use_by_a_live_master(fork: Callable[..., Child], sockdir: str) -> None:
    path = os.path.join(sockdir, "hub.sock")
    c = fork(_listen_and_hold, path)
    assert c.get() == ("listening",)
    with pytest.raises(A.AddressInUse) as ei:
        A.listen(path)
    assert f"address in use: {path!r}" in str(ei.value) and f"pid {c.pid}" in str(ei.value)
    s = A.connect(path, 5)  # the master's socket is untouched
    assert H.peer_cred(s).pid == c.pid
    s.close()
    c.release()
    assert c.join() == 0
    assert not os.path.exists(path)


def test_path_squatted_by_something_else(sockdir: str) -> None:
    path = os.path.join(sockdir, "hub.sock")
    squat = socket.socket(socket.AF_UNIX)
    squat.bind(path)
    squat.listen()
    with pytest.raises(A.AddressInUse) as ei:
        A.listen(path)
    assert "not a clusterhub master" in str(ei.value) and f"pid {os.getpid()}" in str(ei.value)
    assert os.path.exists(path)  # left alone
    squat.close()
    os.unlink(path)
    with open(path, "w") as f:
        f.write("data")
    with pytest.raises(A.AddressInUse, match="not a socket"):
        A.listen(path)
    with open(path) as f:
        assert f.read() == "data"


def _listen_and_die(ctl: Ctl, addr: str) -> None:
    A.listen(addr)
    ctl.put("listening")
    ctl.wait()  # (killed here)


def test_stale_socket_file_is_replaced(fork: Callable[..., Child], sockdir: str) -> None:
    path = os.path.join(sockdir, "hub.sock")
    c = fork(_listen_and_die, path)
    assert c.get() == ("listening",)
    os.kill(c.pid, signal.SIGKILL)
    assert c.join() == -signal.SIGKILL
    assert stat.S_ISSOCK(os.lstat(path).st_mode)  # the dead master's file
    with pytest.raises(A.ConnectError) as ei:
        A.connect(path, 5)
    assert isinstance(ei.value.__cause__, ConnectionRefusedError) and "dead master" in str(ei.value)
    with A.listen(path) as lst:
        s = A.connect(path, 5)
        accept(lst).close()
        s.close()
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def _race(ctl: Ctl, addr: str) -> None:
    ctl.wait()
    try:
        lst = A.listen(addr)
    except A.AddressInUse as e:
        ctl.put("in use", str(e))
        return
    ctl.put("won", os.getpid())
    ctl.wait()
    lst.close()


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-file"])
def test_two_masters_racing_for_a_path(fork: Callable[..., Child], sockdir: str, stale: bool) -> None:
    path = os.path.join(sockdir, "hub.sock")
    for _ in range(8):
        if stale:
            s = socket.socket(socket.AF_UNIX)
            s.bind(path)
            s.close()  # (the file stays: nobody listens on it)
        a, b = fork(_race, path), fork(_race, path)
        a.release()
        b.release()
        results = {a.pid: a.get(), b.pid: b.get()}
        won = [pid for pid, r in results.items() if r[0] == "won"]
        assert len(won) == 1, results
        (loser,) = [r for r in results.values() if r[0] != "won"]
        assert "address in use" in loser[1]
        s = A.connect(path, 5)
        assert H.peer_cred(s).pid == won[0]
        s.close()
        winner = a if won[0] == a.pid else b
        winner.release()
        assert a.join() == 0 and b.join() == 0
        assert not os.path.exists(path)


def _report_listener_state(ctl: Ctl, lst: A.Listener) -> None:
    ctl.put(lst.closed)
    ctl.wait()


@pytest.mark.parametrize("kind", ["abstract", "path"])
def test_a_forked_child_does_not_keep_the_address(fork: Callable[..., Child], sockdir: str, kind: str) -> None:
    addr = abstract() if kind == "abstract" else os.path.join(sockdir, "hub.sock")
    lst = A.listen(addr)
    c = fork(_report_listener_state, lst)
    assert c.get() == (True,)  # closed in the child at fork
    lst.close()
    A.listen(addr).close()  # the live child holds neither the name nor the lock
    c.release()
    assert c.join() == 0


def test_connect_to_nothing(sockdir: str) -> None:
    with pytest.raises(A.ConnectError) as ei:
        A.connect(os.path.join(sockdir, "none.sock"), 5)
    e = ei.value
    assert isinstance(e, clusterhub.HubError) and isinstance(e, ConnectionError)
    assert isinstance(e.__cause__, FileNotFoundError) and "nothing listens" in str(e)
    with pytest.raises(A.ConnectError) as ei:
        A.connect(abstract(), 5)
    assert isinstance(ei.value.__cause__, ConnectionRefusedError)


def test_connect_timeout() -> None:
    addr = abstract()
    full = socket.socket(socket.AF_UNIX)
    full.bind(A.parse_address(addr).sockaddr)
    full.listen(0)  # one pending connection fills it; nobody accepts
    first = A.connect(addr, 5)
    t0 = time.monotonic()
    with pytest.raises(A.ConnectTimeout) as ei:
        A.connect(addr, 0.3)
    elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 5, elapsed
    assert isinstance(ei.value, TimeoutError) and isinstance(ei.value, A.ConnectError)
    with pytest.raises(A.ConnectTimeout):
        A.connect(addr, 0)  # no wait at all
    first.close()
    full.close()


# ---- the handshake: success -------------------------------------------------------


def _join_and_use(ctl: Ctl, addr: str, kw: dict[str, Any]) -> None:
    sock = A.connect(addr, 10)
    j = H.worker_handshake(sock, serializer="pickle", require_fds=["locks"], **kw)
    fd = j.fds["locks"]
    data = os.pread(fd, 64, 0).rstrip(b"\0")
    os.pwrite(fd, b"worker was here", 100)  # (shared: the master reads it)
    sock.sendall(b"after the handshake")  # nothing of it may be swallowed
    with open(f"/proc/self/fdinfo/{j.master_pidfd}") as f:
        master_pid = int([ln for ln in f if ln.startswith("Pid:")][0].split()[1])
    ctl.put(
        j.worker_id, sorted(j.fds), data, j.master_pid, master_pid, j.master_uid,
        j.pidfd_source, (j.serializer, j.wire, j.version), j.ready,
        all(fcntl.fcntl(f, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for f in [*j.fds.values(), j.master_pidfd]),
        sock.recv(64),
    )
    ctl.wait()
    j.close()
    sock.close()


@pytest.mark.parametrize("auth", [None, b"secret"], ids=["no-authkey", "authkey"])
@pytest.mark.parametrize("peerpidfd", [True, False], ids=["SO_PEERPIDFD", "pidfd_open"])
def test_success(fork: Callable[..., Child], monkeypatch: pytest.MonkeyPatch,
                 auth: bytes | None, peerpidfd: bool) -> None:
    if not peerpidfd:
        monkeypatch.setattr(H, "_SO_PEERPIDFD", None)  # (inherited by the child)
    elif H._SO_PEERPIDFD is None:
        pytest.skip("SO_PEERPIDFD is not known on this architecture")
    addr = abstract()
    lst = A.listen(addr)
    c = fork(_join_and_use, addr, {"authkey": auth})
    memfd = os.memfd_create("test-locks", os.MFD_CLOEXEC)
    os.pwrite(memfd, b"the lock table", 0)
    extra = os.memfd_create("test-extra", os.MFD_CLOEXEC)
    conn = accept(lst)
    acc = H.master_handshake(conn, assign_id=lambda: 42, serializer="pickle",
                             fds={"locks": memfd, "extra": extra}, authkey=auth)
    try:
        assert (acc.worker_id, acc.pid, acc.uid, acc.gid) == (42, c.pid, os.geteuid(), os.getegid())
        assert acc.pidfd_source == ("SO_PEERPIDFD" if peerpidfd else "pidfd_open")
        assert (acc.serializer, acc.wire, acc.version) == ("pickle", H.WIRE_VERSION, clusterhub.__version__)
        assert fcntl.fcntl(acc.pidfd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        conn.sendall(b"hello worker")
        r = c.get()
        assert r == (
            42, ["extra", "locks"], b"the lock table", os.getpid(), os.getpid(), os.geteuid(),
            acc.pidfd_source, ("pickle", H.WIRE_VERSION, clusterhub.__version__), True, True,
            b"hello worker",
        )
        assert os.pread(memfd, 15, 100) == b"worker was here"
        conn.settimeout(10)
        assert conn.recv(64) == b"after the handshake"
        # The pidfd names the worker: not readable while it lives, readable once it exits.
        p = select.poll()
        p.register(acc.pidfd, select.POLLIN)
        assert p.poll(0) == []
        c.release()
        assert p.poll(30_000), "the worker's pidfd did not report its exit"
        assert c.join() == 0
    finally:
        acc.close()
        acc.close()  # idempotent
        conn.close()
        lst.close()
        os.close(memfd)
        os.close(extra)


def _attach_lock_table(ctl: Ctl, addr: str) -> None:
    from clusterhub._bindings import ffi, lib

    sock = A.connect(addr, 10)
    j = H.worker_handshake(sock, serializer="pickle", require_fds=["locks"])
    pp = ffi.new("ch_table **")
    r = lib.ch_lt_attach(j.fds["locks"], pp)
    slot, gen = ffi.new("uint32_t *"), ffi.new("uint64_t *")
    found = lib.ch_lt_find(pp[0], b"invoices", 8, slot, gen) if r == 0 else r
    held = lib.ch_lt_is_locked(pp[0], slot[0], gen[0]) if found == 0 else found
    ctl.put(r, lib.ch_lt_nslots(pp[0]) if r == 0 else None, found, held)
    j.close()
    sock.close()


def test_the_lock_table_memfd_attaches(fork: Callable[..., Child]) -> None:
    """The real use: the worker maps the master's lock table from the fd and
    sees the lock the master holds."""
    from clusterhub import _bindings

    addr = abstract()
    lst = A.listen(addr)
    c = fork(_attach_lock_table, addr)  # (forked before the table exists: it comes only by the socket)
    table = _bindings.LockTable(64)
    code, ref = table.resolve(b"invoices")
    assert code == _bindings.NEW  # held by this thread
    try:
        acc, _ = serve(lst, fds={"locks": table.fileno()})
        assert isinstance(acc, H.Accepted), acc
        assert c.get() == (0, table.nslots, 0, 1)
        assert c.join() == 0
    finally:
        _bindings.lt_unlock(ref)
        table.close()
        lst.close()


def _join_ready_later(ctl: Ctl, addr: str) -> None:
    sock = A.connect(addr, 10)
    j = H.worker_handshake(sock, serializer="pickle", ready=False)
    ctl.put("welcomed", j.worker_id, j.ready)
    ctl.wait()  # (the caller's setup would run here)
    try:
        H.send_ready(sock, j)
        ctl.put("ready", j.ready)
    except H.HandshakeError as e:
        ctl.put("error", str(e), e.by_peer)
    j.close()
    sock.close()


def test_ready_after_setup(fork: Callable[..., Child]) -> None:
    addr = abstract()
    with A.listen(addr) as lst:
        c = fork(_join_ready_later, addr)
        conn = accept(lst)
        import threading

        out: list[Any] = []
        t = threading.Thread(target=lambda: out.append(
            H.master_handshake(conn, assign_id=lambda: 3, serializer="pickle", ready_timeout=30)))
        t.start()
        assert c.get() == ("welcomed", 3, False)
        assert t.is_alive()  # the master waits for "ready"
        c.release()
        assert c.get() == ("ready", True)
        t.join(30)
        assert out and out[0].worker_id == 3
        out[0].close()
        conn.close()
        assert c.join() == 0


def test_no_ready_in_time(fork: Callable[..., Child]) -> None:
    addr = abstract()
    with A.listen(addr) as lst:
        c = fork(_join_ready_later, addr)
        conn = accept(lst)
        before = fd_count()
        t0 = time.monotonic()
        with pytest.raises(H.HandshakeTimeout) as ei:
            H.master_handshake(conn, assign_id=lambda: 3, serializer="pickle", ready_timeout=0.3)
        assert time.monotonic() - t0 < 10
        assert "no ready message" in str(ei.value)
        assert fd_count() == before  # the worker's pidfd was closed
        assert c.get() == ("welcomed", 3, False)
        conn.close()
        c.release()
        kind, text, by_peer = c.get()
        assert kind == "error" and by_peer and "refused by the master" in text and "no ready message" in text
        assert c.join() == 0


# ---- the handshake: refusals ------------------------------------------------------


def test_wrong_authkey(fork: Callable[..., Child]) -> None:
    addr = abstract()
    with A.listen(addr) as lst:
        c = fork(join_hub, addr, {"authkey": b"wrong"})
        err, _ = serve(lst, authkey=b"right")
        assert isinstance(err, H.HandshakeError) and not err.by_peer
        assert "authentication failed" in str(err)
        kind, name, text, by_peer = c.get()
        assert (kind, name, by_peer) == ("error", "HandshakeError", True)
        assert text.startswith("refused by the master") and "authentication failed" in text
        assert c.join() == 0


@pytest.mark.parametrize("master_key, worker_key, words", [
    (b"k", None, "the master requires an authkey; the connecting process gave none"),
    (None, b"k", "the connecting process has an authkey and the master none"),
])
def test_authkey_on_one_side_only(fork: Callable[..., Child], master_key: bytes | None,
                                  worker_key: bytes | None, words: str) -> None:
    addr = abstract()
    with A.listen(addr) as lst:
        c = fork(join_hub, addr, {"authkey": worker_key})
        err, _ = serve(lst, authkey=master_key)
        assert isinstance(err, H.HandshakeError) and err.by_peer and words in str(err)
        kind, _, text, by_peer = c.get()
        assert kind == "error" and not by_peer and words in text
        assert c.join() == 0


def _hello_as(role: str, pid: Any = None, **fields: Any) -> dict[str, Any]:
    msg = {"type": "hello", "hub": "clusterhub", "role": role, "wire": H.WIRE_VERSION,
           "version": clusterhub.__version__, "serializer": "pickle", "pid": pid or os.getpid(),
           "start": None, "auth": False, "challenge": None, "response": None}
    msg.update(fields)
    return msg


def test_a_master_that_does_not_know_the_key() -> None:
    """A process squatting the address cannot feed the worker: without the
    key its welcome's response is wrong, the worker refuses, and the fds that
    came with it are closed."""
    worker, rogue = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    junk = os.memfd_create("junk")
    rogue.sendall(jframe(_hello_as("master", auth=True, challenge=os.urandom(32).hex())))
    rogue.sendmsg([jframe({"type": "welcome", "worker_id": 1, "fds": ["locks"],
                           "response": os.urandom(32).hex()})],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", junk))])
    os.close(junk)
    before = fd_count()
    with pytest.raises(H.HandshakeError) as ei:
        H.worker_handshake(worker, serializer="pickle", authkey=b"secret", timeout=5)
    assert "does not know this process's authkey" in str(ei.value) and not ei.value.by_peer
    assert fd_count() == before  # the memfd that came with the welcome was closed
    worker.close()
    hello, refusal = read_frames(rogue)
    assert hello["role"] == "worker" and hello["auth"] is True and len(hello["response"]) == 64
    assert refusal["type"] == "refuse" and "does not know" in refusal["reason"]
    rogue.close()


@pytest.mark.parametrize("names, require, words", [
    (["locks"], ["locks"], "named 1 file descriptors and sent 0"),
    ([], ["locks"], "did not hand over 'locks'"),
])
def test_a_welcome_without_the_fds(names: list[str], require: list[str], words: str) -> None:
    worker, rogue = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    rogue.sendall(jframe(_hello_as("master")))
    rogue.sendall(jframe({"type": "welcome", "worker_id": 1, "fds": names, "response": None}))
    with pytest.raises(H.HandshakeError, match=words):
        H.worker_handshake(worker, serializer="pickle", require_fds=require, timeout=5)
    worker.close()
    assert [m["type"] for m in read_frames(rogue)] == ["hello", "refuse"]
    rogue.close()


@pytest.mark.parametrize("field, master_value", [
    ("version", "99.0"), ("serializer", "json"), ("wire", H.WIRE_VERSION + 1),
])
def test_version_or_serializer_mismatch(fork: Callable[..., Child], field: str, master_value: Any) -> None:
    ours = {"version": clusterhub.__version__, "serializer": "pickle", "wire": H.WIRE_VERSION}[field]
    addr = abstract()
    with A.listen(addr) as lst:
        c = fork(join_hub, addr, {})
        err, _ = serve(lst, **{field: master_value})
        assert isinstance(err, H.HandshakeError) and err.by_peer
        kind, _, text, _ = c.get()
        assert kind == "error"
        for msg in (str(err), text):  # both sides name both values
            assert f"master {master_value!r}, worker {ours!r}" in msg, msg
        assert c.join() == 0


def _say_nothing_then_read(ctl: Ctl, addr: str) -> None:
    sock = A.connect(addr, 10)
    ctl.put("connected")
    ctl.wait()
    frames = read_frames(sock)
    ctl.put([m["type"] for m in frames], frames[-1].get("reason"))
    sock.close()


def test_a_peer_that_says_nothing_is_dropped(fork: Callable[..., Child]) -> None:
    addr = abstract()
    with A.listen(addr) as lst:
        c = fork(_say_nothing_then_read, addr)
        assert c.get() == ("connected",)
        err, took = serve(lst, timeout=0.5)
        assert isinstance(err, H.HandshakeTimeout) and isinstance(err, TimeoutError)
        assert "no hello from the connecting process" in str(err)
        assert 0.4 <= took < 5, took  # returns at the deadline, not later
        c.release()
        types, reason = c.get()
        assert types == ["hello", "refuse"] and "within 0.5 s" in reason
        assert c.join() == 0


def test_a_master_that_says_nothing() -> None:
    addr = abstract()
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(A.parse_address(addr).sockaddr)
    mute.listen()  # never accepts, never speaks
    sock = A.connect(addr, 5)
    t0 = time.monotonic()
    with pytest.raises(H.HandshakeTimeout, match="no hello from the master"):
        H.worker_handshake(sock, serializer="pickle", timeout=0.5)
    assert 0.4 <= time.monotonic() - t0 < 5
    sock.close()
    mute.close()


def _send_raw(ctl: Ctl, addr: str, data: bytes) -> None:
    sock = A.connect(addr, 10)
    try:
        sock.sendall(data)
    except OSError:
        pass
    frames = read_frames(sock)
    ctl.put([m["type"] for m in frames], frames[-1].get("reason") if frames else None)
    sock.close()


GARBAGE = {
    "http": (b"GET / HTTP/1.1\r\nHost: hub\r\n\r\n", "does not speak the clusterhub handshake"),
    "other-format": (frame(b"{}", magic=b"CHH9"), "speaks handshake format b'9'"),
    "oversized": (struct.pack(">4sI", b"CHH1", 1 << 30) + b"x" * 100, "of 1073741824 bytes (at most 4096)"),
    "not-json": (frame(b"{not json"), "malformed handshake message"),
    "not-an-object": (frame(b"[1, 2]"), "malformed handshake message"),
    "deep": (frame(b"[" * 2000 + b"]" * 2000), "malformed handshake message"),
    "wrong-kind": (jframe({"type": "welcome"}), "sent 'welcome' where a hello should come"),
    "not-a-hub": (jframe({"type": "hello", "hub": "other"}), "is not a clusterhub worker"),
    "bad-field": (jframe(_hello_as("worker", pid="1")), "'pid' is '1' (expected int)"),
    "bad-nonce": (jframe(_hello_as("worker", challenge="zz")), "bad 'challenge'"),
}


@pytest.mark.parametrize("case", list(GARBAGE))
def test_garbage_to_the_master(fork: Callable[..., Child], case: str) -> None:
    data, words = GARBAGE[case]
    addr = abstract()
    with A.listen(addr) as lst:
        c = fork(_send_raw, addr, data)
        err, took = serve(lst, timeout=10)
        assert isinstance(err, H.HandshakeError) and not isinstance(err, H.HandshakeTimeout), err
        assert words in str(err), str(err)
        assert took < 5, took  # at once, not at the deadline
        types, reason = c.get()
        assert types == ["hello", "refuse"] and words in reason  # told why
        assert c.join() == 0


@pytest.mark.parametrize("case", ["http", "oversized", "not-json", "wrong-kind"])
def test_garbage_to_the_worker(case: str) -> None:
    data, words = GARBAGE[case]
    worker, rogue = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    rogue.sendall(data)
    t0 = time.monotonic()
    with pytest.raises(H.HandshakeError) as ei:
        H.worker_handshake(worker, serializer="pickle", timeout=10)
    assert time.monotonic() - t0 < 5 and not isinstance(ei.value, H.HandshakeTimeout)
    assert words in str(ei.value)
    worker.close()
    rogue.close()


def test_a_peer_that_lies_about_its_pid() -> None:
    """The pid the master watches is the kernel's, not the one claimed."""
    master, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.sendall(jframe(_hello_as("worker", pid=1)))
    with pytest.raises(H.HandshakeError, match=f"made by pid {os.getpid()}, but the peer says it is pid 1"):
        H.master_handshake(master, assign_id=lambda: 1, serializer="pickle")
    master.close()
    assert [m["type"] for m in read_frames(peer)] == ["hello", "refuse"]
    peer.close()


@pytest.mark.parametrize("wid", [0, H.WORKER_ID_MAX + 1, "1"])
def test_assign_id_must_give_a_worker_id(wid: Any) -> None:
    master, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.sendall(jframe(_hello_as("worker")))
    before = fd_count()
    with pytest.raises(ValueError, match="assign_id"):
        H.master_handshake(master, assign_id=lambda: wid, serializer="pickle")
    assert fd_count() == before  # (the peer's pidfd was closed)
    master.close()
    peer.close()


def test_a_refusal_always_fits_a_message() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(H.HandshakeError):
        H._Conn(a, "peer", 1.0).refuse("\u00e9" * 5000)  # (JSON escapes it: 6 bytes each)
    a.close()
    (refusal,) = read_frames(b)
    assert refusal["type"] == "refuse" and set(refusal["reason"]) == {"\u00e9"}
    b.close()


def test_bad_arguments_send_nothing() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    too_many = {f"fd{i}": 0 for i in range(H.MAX_FDS + 1)}
    cases: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"fds": too_many}, ValueError), ({"fds": {"Bad-Name": 0}}, ValueError),
        ({"fds": {"locks": -1}}, ValueError), ({"authkey": "text"}, TypeError),
        ({"authkey": b""}, ValueError), ({"serializer": ""}, TypeError), ({"serializer": "s" * 201}, ValueError),
        ({"version": "v" * 201}, ValueError), ({"timeout": -1}, ValueError),
    ]
    for kw, kind in cases:
        args: dict[str, Any] = {"assign_id": lambda: 1, "serializer": "pickle", **kw}
        with pytest.raises(kind):
            H.master_handshake(a, **args)
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(1)  # nothing was sent
    a.close()
    b.close()


def test_error_classes() -> None:
    for cls in (A.ConnectError, A.ConnectTimeout, H.HandshakeError, H.HandshakeTimeout):
        assert issubclass(cls, clusterhub.HubError) and issubclass(cls, ConnectionError)
    assert issubclass(H.HandshakeTimeout, TimeoutError) and issubclass(A.ConnectTimeout, TimeoutError)
    assert issubclass(A.AddressInUse, clusterhub.HubError)
    e = H.HandshakeError("refused by the master: x", by_peer=True)
    assert str(e) == "refused by the master: x" and e.errno is None
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is H.HandshakeError and str(e2) == str(e) and e2.by_peer


# ---- other users, other PID namespaces ----------------------------------------------


def _join_as_nobody(ctl: Ctl, addr: str, kw: dict[str, Any]) -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    try:
        join_hub(ctl, addr, kw)
    except A.ConnectError as e:
        ctl.put("connect", str(e), type(e.__cause__).__name__)


def _need_root(why: str = "to setuid a forked child to nobody (65534)") -> None:
    if os.geteuid() != 0:
        pytest.skip(f"not root: needs root {why}")  # (-ra prints the reason)


def test_another_uid_is_refused(fork: Callable[..., Child]) -> None:
    _need_root()
    addr = abstract()  # (a path's 0600 file would stop it before the handshake: see below)
    with A.listen(addr) as lst:
        c = fork(_join_as_nobody, addr, {"expect_uid": 0})
        err, _ = serve(lst)
        assert isinstance(err, H.HandshakeError) and not err.by_peer
        assert f"uid {NOBODY} may not connect" in str(err)
        kind, _, text, by_peer = c.get()
        assert kind == "error" and by_peer and f"uid {NOBODY} may not connect" in text
        assert c.join() == 0


def test_another_uid_in_allowed_uids(fork: Callable[..., Child]) -> None:
    """(Also: by default the connecting side trusts a root master, as a
    worker of gunicorn with ``user=`` needs.)"""
    _need_root()
    addr = abstract()
    with A.listen(addr) as lst:
        c = fork(_join_as_nobody, addr, {})
        acc, _ = serve(lst, allowed_uids=[NOBODY])
        assert isinstance(acc, H.Accepted) and acc.uid == NOBODY and acc.pid == c.pid
        assert c.get()[0] == "joined"
        assert c.join() == 0


def test_another_uid_and_a_path_address(fork: Callable[..., Child], sockdir: str) -> None:
    _need_root()
    os.chmod(sockdir, 0o755)
    path = os.path.join(sockdir, "hub.sock")
    with A.listen(path):
        c = fork(_join_as_nobody, path, {"expect_uid": 0})
        kind, text, cause = c.get()
        assert (kind, cause) == ("connect", "PermissionError") and "permission denied" in text
        assert c.join() == 0


def _serve_as_nobody(ctl: Ctl, addr: str) -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    with A.listen(addr) as lst:
        ctl.put("listening")
        err, _ = serve(lst)
        ctl.put(type(err).__name__, str(err))


def test_by_default_the_worker_trusts_only_its_uid_and_root(fork: Callable[..., Child]) -> None:
    _need_root()
    addr = abstract()
    c = fork(_serve_as_nobody, addr)
    assert c.get() == ("listening",)
    sock = A.connect(addr, 10)
    with sock, pytest.raises(H.HandshakeError, match=f"the master runs as uid {NOBODY}; .* expects uid its own or root"):
        H.worker_handshake(sock, serializer="pickle")
    assert c.get()[0] == "HandshakeError"  # (it refuses root too: not in its allowed_uids)
    assert c.join() == 0


def test_the_worker_checks_the_masters_uid(fork: Callable[..., Child]) -> None:
    addr = abstract()
    with A.listen(addr) as lst:
        c = fork(join_hub, addr, {"expect_uid": os.geteuid() + 12345})
        err, _ = serve(lst)
        assert isinstance(err, H.HandshakeError) and err.by_peer
        assert f"the master runs as uid {os.geteuid()}" in str(err)
        kind, _, text, by_peer = c.get()
        assert kind == "error" and not by_peer and "expects uid" in text
        assert c.join() == 0


def _join_from_new_pidns(ctl: Ctl, addr: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        ctl.put("skip", os.strerror(ctypes.get_errno()))
        return
    pid = os.fork()  # the first process of the new namespace
    if pid == 0:
        try:
            ctl.put("pid", os.getpid())
            join_hub(ctl, addr, {})
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def test_another_pid_namespace_is_refused(fork: Callable[..., Child]) -> None:
    _need_root("to unshare(CLONE_NEWPID)")
    addr = abstract()
    with A.listen(addr) as lst:
        c = fork(_join_from_new_pidns, addr)
        first = c.get()
        if first[0] == "skip":
            pytest.skip(f"unshare(CLONE_NEWPID) failed: {first[1]}")
        assert first == ("pid", 1)
        err, _ = serve(lst)
        # (Both sides refuse: the master may see the worker's refusal first.)
        assert isinstance(err, H.HandshakeError) and "PID namespace" in str(err), err
        kind, _, text, _ = c.get()
        assert kind == "error" and "PID namespace" in text
        assert c.join() == 0


# ---- a storm -------------------------------------------------------------------------


def _storm(ctl: Ctl, addr: str, n: int) -> None:
    before = fd_count()
    joined = 0
    for i in range(n):
        sock = A.connect(addr, 30)
        try:
            if i % 3 == 0:
                H.worker_handshake(sock, serializer="pickle", timeout=30).close()
                joined += 1
            elif i % 3 == 2:
                try:
                    sock.sendall(b"\x00garbage" * 4)
                except OSError:
                    pass
            # (i % 3 == 1: hang up at once)
        finally:
            sock.close()
    ctl.put(joined, before, fd_count())


def test_a_storm_of_connections_leaves_fds_flat(fork: Callable[..., Child]) -> None:
    n = 300
    addr = abstract()
    with A.listen(addr) as lst:
        before = fd_count()
        c = fork(_storm, addr, n)
        ids = iter(range(1, n + 1))
        ok = failed = 0
        for _ in range(n):
            r, _ = serve(lst, assign_id=lambda: next(ids), timeout=10)
            if isinstance(r, H.Accepted):
                ok += 1
            else:
                assert not isinstance(r, H.HandshakeTimeout), r
                failed += 1
        joined, child_before, child_after = c.get(60)
        assert (ok, failed) == (joined, n - joined) == (n // 3, n - n // 3)
        assert child_after == child_before
        assert c.join() == 0
        assert fd_count() == before
