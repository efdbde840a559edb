"""A "second host": a worker in a network namespace of its own (``ip netns``)
that reaches the server over TCP through a veth pair, whose link the test
cuts past the lease and then restores.

Needs ``ip`` (iproute2) and the right to make namespaces and links
(CAP_SYS_ADMIN and CAP_NET_ADMIN, i.e. root in the container); without them
the test skips, saying which step failed and why.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Callable, Iterator

import pytest

import clusterhub
from clusterhub import LockError

from .conftest import LEASE, MP, Procs, RedisServer, Reports, close_quietly, wait_until
from conftest import waitpid_bounded

pytestmark = pytest.mark.timeout(60)

CLONE_NEWNET = 0x40000000
MARGIN = 0.5


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


class Net:
    """A namespace with a veth pair to it: the host end ``host_if``
    (``host_ip``) here, the other end (``peer_ip``) in namespace ``ns``."""

    def __init__(self) -> None:
        n = os.getpid() % 100000
        self.ns = f"chns{n}"
        self.host_if, self.peer_if = f"chh{n}", f"chp{n}"
        sub = 16 + os.getpid() % 200
        self.host_ip, self.peer_ip = f"10.213.{sub}.1", f"10.213.{sub}.2"

    def create(self) -> None:
        ip("netns", "add", self.ns)
        ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        ip("link", "set", self.peer_if, "netns", self.ns)
        ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        ip("link", "set", self.host_if, "up")
        ip("-n", self.ns, "addr", "add", f"{self.peer_ip}/30", "dev", self.peer_if)
        ip("-n", self.ns, "link", "set", self.peer_if, "up")
        ip("-n", self.ns, "link", "set", "lo", "up")

    def cut(self) -> None:
        ip("link", "set", self.host_if, "down")

    def restore(self) -> None:
        ip("link", "set", self.host_if, "up")

    def destroy(self) -> None:
        ip("link", "del", self.host_if, check=False)
        ip("netns", "del", self.ns, check=False)

    def enter(self) -> None:
        """Move the calling thread (a fork child's only one, before it
        starts any other) into the namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)


@pytest.fixture
def net() -> Iterator[Net]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed (Debian: apt-get install iproute2)")
    n = Net()
    try:
        n.create()
    except (RuntimeError, OSError) as e:
        n.destroy()
        pytest.skip(f"cannot make a network namespace with a veth pair here: {e}")
    yield n
    n.destroy()


def test_a_worker_on_a_second_host_cut_off_past_its_lease(redis_servers: Callable[..., RedisServer], net: Net,
                                                           procs: Procs, reports: Reports) -> None:
    """The worker in the namespace holds a key; the link is cut for longer
    than the lease: the master recovers the key (higher token) and sees the
    worker exit.  Once the link is back the worker finds its lock lost, its
    release raises LockError, and it works again."""
    server = redis_servers(bind=f"127.0.0.1 {net.host_ip}", extra=("--protected-mode", "no"))
    master = clusterhub.Hub(address=server.url("net"), lease=LEASE)
    try:
        exited: list[tuple[int, float]] = []
        noticed = threading.Event()
        master.on_exit(lambda w: (exited.append((w.id, time.monotonic())), noticed.set()))
        restored = MP.Event()
        url = server.url("net", host=net.host_ip)

        def remote() -> None:
            net.enter()
            hub = clusterhub.connect(url, timeout=10)
            lk = hub.lock("k")
            assert lk.acquire(timeout=10)
            reports.put("held", hub.worker_id, lk.fencing_token)
            assert restored.wait(30)
            t0 = time.monotonic()
            while not lk.lost and time.monotonic() - t0 < 20:
                time.sleep(0.01)  # (set by the renewer once the server answers again: no event to wait on)
            try:
                lk.release()
                err = None
            except LockError as e:
                err = type(e).__name__
            reports.put("after", lk.lost, round(time.monotonic() - t0, 2), err)
            ok = lk.acquire(timeout=20)
            reports.put("again", ok, lk.fencing_token, lk.lost)
            lk.release()
            hub.close()

        pid = procs.start(remote)
        _, wid, token = reports.get(timeout=15)
        rows = master.held_locks()
        assert [(r.key, r.pid, r.worker_id) for r in rows] == [(b"k", pid, wid)]
        assert wid in master.workers

        lk = master.lock("k")
        net.cut()
        t_cut = time.monotonic()
        try:
            assert lk.acquire(timeout=LEASE + 5)
            assert time.monotonic() - t_cut < LEASE + MARGIN
            assert lk.recovered and lk.fencing_token > token
            assert noticed.wait(5) and exited[0][0] == wid and exited[0][1] - t_cut < LEASE + MARGIN
            time.sleep(max(0.0, t_cut + 2 * LEASE - time.monotonic()))  # (cut for two leases: the subject)
        finally:
            net.restore()
        restored.set()
        _, lost, took, err = reports.get(timeout=30)
        assert lost and err == "LockError", (lost, took, err)
        mine = lk.fencing_token
        lk.release()
        _, ok, again, again_lost = reports.get(timeout=30)
        assert ok and again > mine and not again_lost
        procs.join(pid, timeout=15)
    finally:
        close_quietly(master)
    print(f"the cut-off worker saw its lock lost {took} s after the link came back")



def test_a_waiter_that_gives_up_while_cut_off_is_not_handed_the_key(redis_servers: Callable[..., RedisServer],
                                                                    net: Net, procs: Procs,
                                                                    reports: Reports) -> None:
    """The worker in the namespace waits for a key the master holds, and is
    interrupted (Ctrl-C) while its link is cut, for less than its lease: it
    cannot leave the key's queue then.  Once the link is back, the release
    that hands it the key must not leave the key with it (its process lives
    on, renewing its lease): its renewer finishes the giving up, and the
    next waiter gets the key within a few renewals, not recovered."""
    server = redis_servers(bind=f"127.0.0.1 {net.host_ip}", extra=("--protected-mode", "no"))
    master = clusterhub.Hub(address=server.url("giveup"), lease=LEASE)
    r = server.client()
    queue = b"{ch:giveup}:queue:k"
    try:
        done = MP.Event()
        url = server.url("giveup", host=net.host_ip)
        remote_lease = 8.0  # (longer than the cut and TCP's retransmissions after it)

        def remote() -> None:
            net.enter()
            hub = clusterhub.connect(url, timeout=2, lease=remote_lease)
            lk = hub.lock("k")
            reports.put("waiting")
            try:
                lk.acquire(timeout=30)
                reports.put("acquired?!")
            except KeyboardInterrupt:
                reports.put("gave up")
            assert done.wait(30)
            hub.close()

        lk = master.lock("k")
        assert lk.acquire()
        pid = procs.start(remote)
        assert reports.get(timeout=15) == ("waiting",)
        wait_until(lambda: r.llen(queue) == 1, 5, "the remote waiter queued")
        net.cut()
        try:
            os.kill(pid, signal.SIGINT)
            assert reports.get(timeout=15) == ("gave up",)
            assert r.llen(queue) == 1  # (it could not leave the queue)
        finally:
            net.restore()
        got: list[tuple[bool, float, bool]] = []

        def local_waiter() -> None:
            w = master.lock("k")
            ok = w.acquire(timeout=20)
            got.append((ok, time.monotonic(), w.recovered))
            if ok:
                w.release()

        t = threading.Thread(target=local_waiter)
        t.start()
        wait_until(lambda: r.llen(queue) == 2, 5, "the local waiter queued behind")
        t_rel = time.monotonic()
        lk.release()  # (hands the key to the remote's acquisition first)
        t.join(20)
        assert got and got[0][0] and not got[0][2], got
        took = got[0][1] - t_rel
        assert took < remote_lease / 2, f"the next waiter got the key {took:.2f} s after the release"
        done.set()
        procs.join(pid, timeout=15)
    finally:
        r.close()
        close_quietly(master)
    print(f"the key left with the waiter that gave up went on {took:.2f} s after the release")


CLONE_NEWUTS = 0x04000000


def other_host_name(name: str) -> None:
    """Give the calling process (a fork child) a UTS namespace of its own,
    named ``name``: a host of its own as ``socket.gethostname()`` sees it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUTS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
    b = name.encode()
    if libc.sethostname(b, len(b)) != 0:
        raise OSError(ctypes.get_errno(), "sethostname")


def test_messages_with_a_worker_on_a_second_host(redis_servers: Callable[..., RedisServer], net: Net,
                                                  procs: Procs, reports: Reports) -> None:
    """A worker in the namespace, under a host name of its own, exchanges
    requests and broadcasts with the master over TCP; the master lists it
    with that host and its pid there, and ``terminate()`` reaches it
    through the server (it signals itself): it dies of SIGTERM, and the
    master sees it exit within the lease plus a margin."""
    server = redis_servers(bind=f"127.0.0.1 {net.host_ip}", extra=("--protected-mode", "no"))
    master = clusterhub.Hub(address=server.url("msgs"), lease=LEASE, authkey=b"k")
    try:
        exited = threading.Event()
        master.on_exit(lambda w: exited.set())
        master.on("add", lambda d, s: d[0] + d[1])
        url = server.url("msgs", host=net.host_ip)

        def remote() -> None:
            net.enter()
            other_host_name("second-host")
            hub = clusterhub.connect(url, timeout=10, authkey=b"k")
            got = threading.Event()
            hub.on("bc", lambda d, s: got.set())
            hub.on("pid", lambda d, s: os.getpid())
            assert hub.request_master("add", (2, 3)).result(10) == 5
            reports.put("joined", hub.worker_id)
            assert got.wait(10)
            reports.put("broadcast")
            threading.Event().wait()

        pid = procs.start(remote)
        _, wid = reports.get(timeout=15)
        w = wait_until(lambda: master.workers.get(wid), 5, "the remote worker listed")
        assert w.host == "second-host" and w.pid == pid  # (one pid namespace here)
        master.send_to_workers("bc", None)
        assert reports.get(timeout=10) == ("broadcast",)
        assert master.request_worker(w, "pid").result(10) == pid
        w.terminate()
        t0 = time.monotonic()
        got = waitpid_bounded(pid, 10)
        assert got == -signal.SIGTERM, got
        assert exited.wait(LEASE + 5) and time.monotonic() - t0 < LEASE + MARGIN
    finally:
        close_quietly(master)
