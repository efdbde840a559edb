"""Processes the hub did not fork join it by address: what is particular to
them (the conformance suite covers what they share with forked workers):
errors when connecting, authkey, idempotent connect(), no reaping, close()
and the master's death as a connected process sees them, a process started
by exec, and ProcessPoolExecutor's initializer."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import clusterhub
from clusterhub import ConnectError, HandshakeError, HubError, MasterDied

from conftest import Reports, kill_and_reap, run_forked, waitpid_bounded

pytestmark = pytest.mark.timeout(60)

_n = itertools.count(1)


def _address() -> str:
    return f"@clusterhub-test-connect-{os.getpid()}-{next(_n)}"


def _abandon_inherited() -> None:
    """In a plain fork child of the test process: its copies of the test's
    hubs are inert (as they are after any fork not made by hub.fork)."""
    for hub in list(clusterhub.hub._hubs):
        hub._abandon()


def test_connect_to_nothing_raises_connect_error():
    """connect() to an address nobody listens on raises ConnectError (a
    HubError and a ConnectionError) at once."""
    with pytest.raises(ConnectError) as info:
        clusterhub.connect(_address(), timeout=2)
    assert isinstance(info.value, HubError) and isinstance(info.value, ConnectionError)


def test_a_second_master_on_a_busy_address_fails(make_hub):
    """Hub(address=) on an address a live master listens on raises
    AddressInUse; the first master keeps it."""
    addr = _address()
    first = make_hub(address=addr)
    with pytest.raises(clusterhub.AddressInUse):
        clusterhub.Hub(address=addr)
    assert first.address == addr


def test_wrong_or_missing_authkey_is_refused(make_hub, reports: Reports):
    """With an authkey, a process that does not know it is refused
    (HandshakeError) and never becomes a worker."""
    hub = make_hub(address=_address(), authkey=b"secret")

    def child() -> None:
        _abandon_inherited()
        for key in (b"wrong", None):
            try:
                clusterhub.connect(hub.address, authkey=key, timeout=5)
                reports.put("joined", key)
            except HandshakeError as e:
                reports.put("refused", type(e).__name__)
        h = clusterhub.connect(hub.address, authkey=b"secret", timeout=5)
        reports.put("joined", h.worker_id)
        h.close()

    pid = run_forked(child)
    try:
        assert reports.get_n(3, 20) == [("refused", "HandshakeError"), ("refused", "HandshakeError"),
                                         ("joined", 1)]
        assert waitpid_bounded(pid, 10) == 0
    finally:
        kill_and_reap([pid])


def test_connect_is_idempotent_and_exit_codes_are_not_reaped(make_hub, reports: Reports):
    """connect() again in the same process returns the same hub; the master
    never reaps a connected process: it reads the exit code without reaping
    where the kernel allows (here the process is the master's own child),
    and the process's parent still reaps it with its real exit code."""
    hub = make_hub(address=_address())
    exits = []
    done = threading.Event()
    hub.on_exit(lambda w: (exits.append((w.id, w.exitcode, w.connected)), done.set()))

    def child() -> None:
        _abandon_inherited()
        h = clusterhub.connect(hub.address, timeout=5)
        reports.put(h is clusterhub.connect(hub.address), h.worker_id, h.is_worker)
        h._procs.flush_master()
        os._exit(7)

    pid = run_forked(child)
    try:
        assert reports.get(20) == (True, 1, True)
        assert done.wait(20)
        assert exits == [(1, 7, True)]
        assert waitpid_bounded(pid, 10) == 7
    finally:
        kill_and_reap([pid])


def test_close_leaves_connected_processes_running_with_master_died(make_hub, reports: Reports):
    """close() does not signal a connected process: it sees MasterDied on
    its sends and requests, and its lock calls raise MasterDied (its lock
    table is no longer the one others use)."""
    hub = make_hub(address=_address())
    hub.on("ping", lambda data, sender: "pong")
    go = multiprocessing.get_context("fork").Event()

    def child() -> None:
        _abandon_inherited()
        h = clusterhub.connect(hub.address, timeout=5)
        reports.put("ready", h.request_master("ping").result(10))
        go.wait(30)
        out = []
        for call in (lambda: h.send_to_master("x"), lambda: h.request_master("ping").result(5),
                     lambda: h.lock("k").acquire()):
            try:
                call()
                out.append("ok")
            except MasterDied:
                out.append("MasterDied")
        reports.put("after", out)

    pid = run_forked(child)
    try:
        assert reports.get(20) == ("ready", "pong")
        hub.close(timeout=1)
        go.set()
        assert reports.get(20) == ("after", ["MasterDied", "MasterDied", "MasterDied"])
        assert waitpid_bounded(pid, 10) == 0
    finally:
        kill_and_reap([pid])


EXEC_WORKER = textwrap.dedent(
    """
    import sys, clusterhub
    hub = clusterhub.connect(sys.argv[1], timeout=10)
    with hub.lock("shared") as held:
        print("locked", hub.worker_id, held.recovered, flush=True)
        sys.stdin.readline()  # hold it until the test says so
    print(hub.request_master("add", (2, 3)).result(10), flush=True)
    """
)


def test_a_process_started_by_exec_shares_the_locks(make_hub, tmp_path):
    """A Python process started by exec (not a fork of the master) joins by
    address, holds a global lock the master then cannot take, and makes
    requests."""
    hub = make_hub(address=_address())
    hub.on("add", lambda data, sender: data[0] + data[1])
    script = tmp_path / "worker.py"
    script.write_text(EXEC_WORKER)
    proc = subprocess.Popen([sys.executable, str(script), hub.address], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().split() == ["locked", "1", "False"]
        assert hub.lock("shared").acquire(timeout=0.2) is False  # the other process holds it
        assert [row.pid for row in hub.held_locks()] == [proc.pid]
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "5"
        assert proc.wait(20) == 0
        assert hub.lock("shared").acquire(timeout=5)
        hub.lock("shared").release()
        assert hub.join(20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


POOL_SCRIPT = textwrap.dedent(
    """
    import concurrent.futures, multiprocessing, os, sys
    import clusterhub

    def task(n):
        hub = clusterhub.connect(sys.argv[2])  # (the initializer connected: the same hub)
        with hub.lock("pool"):
            return hub.worker_id, hub.request_master("square", n).result(10)

    if __name__ == "__main__":
        address = sys.argv[2]
        with clusterhub.Hub(address=address) as hub:
            hub.on("square", lambda data, sender: data * data)
            ctx = multiprocessing.get_context(sys.argv[1])
            with concurrent.futures.ProcessPoolExecutor(
                2, mp_context=ctx, initializer=clusterhub.connect, initargs=(address,)
            ) as pool:
                results = list(pool.map(task, range(6)))
            print([r[1] for r in results], all(r[0] >= 1 for r in results), hub.join(20))
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_process_pool_executor_initializer(tmp_path, method):
    """ProcessPoolExecutor workers (fork, spawn, forkserver) connect in the
    initializer, and each task gets the same hub by calling connect again.
    (In a fresh interpreter: spawn and forkserver leave helper processes.)"""
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), method, _address()], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "[0, 1, 4, 9, 16, 25] True True", proc.stderr


def test_a_fork_of_a_connected_process_is_not_connected(make_hub, reports: Reports):
    """A child forked (by other code) from a connected process cannot use
    its parent's hub (HubClosedError); connect() there makes its own."""
    hub = make_hub(address=_address())

    def child() -> None:
        _abandon_inherited()
        h = clusterhub.connect(hub.address, timeout=5)

        def grandchild() -> None:
            try:
                h.send_to_master("x")
                reports.put("inherited works")
            except clusterhub.HubClosedError:
                reports.put("inert", clusterhub.connect(hub.address, timeout=5).worker_id)

        reports.put("grandchild", waitpid_bounded(run_forked(grandchild), 20))

    pid = run_forked(child)
    try:
        assert reports.get_n(2, 30) == [("inert", 2), ("grandchild", 0)]
        assert waitpid_bounded(pid, 10) == 0
    finally:
        kill_and_reap([pid])


def test_kill_and_terminate_reach_a_connected_process(make_hub, reports: Reports):
    """Worker.kill() reaches a connected process (through its pidfd) and its
    exit is reported."""
    hub = make_hub(address=_address())
    up: list[clusterhub.Worker] = []
    arrived = threading.Event()
    hub.on("up", lambda data, sender: (up.append(sender), arrived.set()))

    def child() -> None:
        _abandon_inherited()
        clusterhub.connect(hub.address, timeout=5).send_to_master("up")
        threading.Event().wait()

    pid = run_forked(child)
    try:
        assert arrived.wait(20)  # (a message comes after the master added the worker)
        (w,) = hub.workers.values()
        assert up == [w]
        assert w.connected and w.pid == pid
        w.kill()
        assert w.join(20) and w.exitcode == -signal.SIGKILL  # (read without reaping)
        assert waitpid_bounded(pid, 10) == -signal.SIGKILL
    finally:
        kill_and_reap([pid])


HANDLERS = """
def register(hub):
    hub.on("add", lambda data, sender: data[0] + data[1])
"""


def test_serve_runs_a_master_for_processes_that_connect(tmp_path, reports: Reports):
    """`python -m clusterhub serve ADDRESS --handlers module:function` serves
    requests and locks to processes that connect, and exits 0 on SIGTERM."""
    (tmp_path / "myhandlers.py").write_text(HANDLERS)
    addr = _address()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "clusterhub", "serve", addr, "--handlers",
                             "myhandlers:register"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    pid = 0
    try:
        assert proc.stdout.readline().strip() == f"serving at {addr}"

        def child() -> None:
            _abandon_inherited()
            h = clusterhub.connect(addr, timeout=5)
            with h.lock("served"):
                reports.put(h.request_master("add", (20, 22)).result(10))

        pid = run_forked(child)
        assert reports.get(20) == (42,)
        assert waitpid_bounded(pid, 10) == 0
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "worker 1" in err  # its exit was logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if pid:
            kill_and_reap([pid])


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_storm_of_connections_leaves_the_master_flat(make_hub, reports: Reports):
    """Hundreds of processes' worth of connects (joined and left, refused,
    hung up at once) leave the master serving, with as many fds as before
    and every joined worker seen by on_exit."""
    hub = make_hub(address=_address(), authkey=b"k")
    hub.on("ping", lambda data, sender: "pong")
    left = []
    hub.on_exit(lambda w: left.append(w.id))

    def warm_up() -> None:  # (the first channel starts the process-wide C writer: its fd stays)
        _abandon_inherited()
        clusterhub.connect(hub.address, authkey=b"k", timeout=10).close()

    assert waitpid_bounded(run_forked(warm_up), 20) == 0
    assert hub.join(20)
    before = _fd_count()

    def child(n: int) -> None:
        _abandon_inherited()
        import socket as socket_module

        joined = refused = 0
        for i in range(n):
            if i % 3 == 0:
                h = clusterhub.connect(hub.address, authkey=b"k", timeout=10)
                assert h.request_master("ping").result(10) == "pong"
                h.close()
                joined += 1
            elif i % 3 == 1:
                try:
                    clusterhub.connect(hub.address, authkey=b"wrong", timeout=10)
                except HandshakeError:
                    refused += 1
            else:
                s = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
                s.connect("\0" + hub.address[1:])
                s.close()
        reports.put(joined, refused)

    pid = run_forked(lambda: child(300))
    try:
        assert reports.get(120) == (100, 100)
        assert waitpid_bounded(pid, 20) == 0
        assert hub.join(30)
        assert sorted(left) == list(range(1, 102))  # (the warm-up's, then 100)
        assert hub.request_workers("ping").result(10) == {}
        deadline = time.monotonic() + 10
        # (A resource, not an event to await: the exit watcher closes its
        # epoll on its own thread once no worker is left.)
        while _fd_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _fd_count() <= before
    finally:
        kill_and_reap([pid])


def _master_at(address: str, reports: Reports, answer: str) -> None:
    hub = clusterhub.Hub(address=address)
    hub.on("who", lambda data, sender: answer)
    reports.put("listening", answer)
    threading.Event().wait()


def test_connect_after_the_master_died_reaches_the_new_one(reports: Reports):
    """A connected process whose master died gets MasterDied; connect() with
    the same address then joins whatever master listens there now, and its
    locks are the new table's."""
    addr = _address()
    old = run_forked(lambda: _master_at(addr, reports, "old"))
    new = 0
    try:
        assert reports.get(20) == ("listening", "old")
        got = []

        def child() -> None:
            _abandon_inherited()
            h = clusterhub.connect(addr, timeout=5)
            reports.put("asked", h.request_master("who").result(10))
            go.wait(30)
            try:
                h.request_master("who").result(10)
            except MasterDied:
                got.append("MasterDied")
            h2 = clusterhub.connect(addr, timeout=10)
            reports.put("again", h2 is not h, h2.request_master("who").result(10), got)

        go = multiprocessing.get_context("fork").Event()
        pid = run_forked(child)
        assert reports.get(20) == ("asked", "old")
        os.kill(old, signal.SIGKILL)
        assert waitpid_bounded(old, 10) == -signal.SIGKILL
        new = run_forked(lambda: _master_at(addr, reports, "new"))
        assert reports.get(20) == ("listening", "new")
        go.set()
        assert reports.get(30) == ("again", True, "new", ["MasterDied"])
        assert waitpid_bounded(pid, 10) == 0
    finally:
        kill_and_reap([p for p in (old, new) if p])


def test_a_process_that_closes_its_hub_leaves_and_may_join_again(make_hub, reports: Reports):
    """A connected process that closes its hub (and goes on) is reported as
    gone (on_exit, hub.workers); connecting again makes it a new worker."""
    hub = make_hub(address=_address())
    left = []
    gone = threading.Semaphore(0)
    hub.on_exit(lambda w: (left.append(w.id), gone.release()))
    hub.on("who", lambda data, sender: sender.id)
    go, end = multiprocessing.get_context("fork").Event(), multiprocessing.get_context("fork").Event()

    def child() -> None:
        _abandon_inherited()
        h = clusterhub.connect(hub.address, timeout=5)
        first = h.request_master("who").result(10)
        h.close()
        go.wait(30)
        h2 = clusterhub.connect(hub.address, timeout=5)
        reports.put(first, h2.request_master("who").result(10))
        end.wait(30)

    pid = run_forked(child)
    try:
        assert gone.acquire(timeout=20)  # the first hub closed: worker 1 left
        assert left == [1] and hub.workers == {}
        go.set()
        assert reports.get(20) == (1, 2)
        assert list(hub.workers) == [2]
        end.set()
        assert waitpid_bounded(pid, 10) == 0
    finally:
        kill_and_reap([pid])
