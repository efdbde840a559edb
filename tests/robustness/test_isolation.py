"""Isolation: the lock table and the sockets are reachable only by the hub's
own processes.  Every descriptor the hub opens is close-on-exec, a program a
worker executes inherits none of them, the table is an anonymous memfd (no
name in /dev/shm), and the README states pickle's trust model."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from typing import Any, Callable

import pytest

import clusterhub

from conftest import ROOT, Reports, join_ok

pytestmark = pytest.mark.timeout(60)

O_CLOEXEC = 0o2000000
MEMFD_NAME = "memfd:clusterhub-locks"
README = ROOT / "README.md"

# The child lists what it inherited: (fd, target) for each open descriptor.
LIST_FDS = (
    "import os\n"
    "for fd in sorted(int(x) for x in os.listdir('/proc/self/fd')):\n"
    "    try:\n"
    "        print(fd, os.readlink(f'/proc/self/fd/{fd}'))\n"
    "    except OSError:\n"
    "        pass\n"
)


def open_fds() -> dict[int, str]:
    """fd -> readlink target for every descriptor of this process."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the descriptor listdir itself used
    return out


def fd_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError(f"no flags line in /proc/self/fdinfo/{fd}")


def kind(target: str) -> str:
    """A descriptor's kind from its /proc target: socket, memfd, eventfd, epoll, pidfd..."""
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("/" + MEMFD_NAME) or target.startswith(MEMFD_NAME):
        return "memfd"
    m = re.match(r"anon_inode:\[?(\w+)\]?", target)
    if m:
        return {"eventpoll": "epoll"}.get(m.group(1), m.group(1))
    return target


def not_cloexec(fds: dict[int, str]) -> dict[int, str]:
    """The descriptors among ``fds`` (still open) that an exec would keep."""
    bad = {}
    for fd, target in fds.items():
        try:
            flags = fd_flags(fd)
        except FileNotFoundError:
            continue  # closed meanwhile
        if not flags & O_CLOEXEC:
            bad[fd] = target
    return bad


def exercise(hub: clusterhub.Hub, w: clusterhub.Worker) -> None:
    """Use every part of the hub that opens descriptors lazily: a reply read
    by the requesting thread itself (the channel's wake eventfd), an awaitable
    answer (the private event loop), a lock (the table), a timed request."""
    assert hub.request_worker(w, "echo", 1).result(timeout=10) == 1
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(hub.request_worker(w, "echo", 2).result(10)))
    t.start()
    t.join(15)
    assert result == [2]
    assert hub.request_master("later", 3).result(timeout=10) == 3
    assert hub.request_worker(w, "echo", 4, timeout=5).result(timeout=10) == 4
    with hub.lock("isolation"):
        pass


def _register(hub: clusterhub.Hub) -> None:
    hub.on("echo", lambda data, sender: data)

    async def later(data: Any) -> Any:
        await asyncio.sleep(0)
        return data

    hub.on("later", lambda data, sender: later(data))


def test_every_hub_fd_is_close_on_exec_in_the_master(make_hub: Callable[..., clusterhub.Hub]) -> None:
    """Every descriptor a hub opens in the master (sockets, memfd, eventfds, epoll, pidfds) carries O_CLOEXEC."""
    before = open_fds()
    hub = make_hub()
    _register(hub)
    w = hub.fork(threading.Event().wait)
    try:
        exercise(hub, w)
        new = {fd: t for fd, t in open_fds().items() if before.get(fd) != t}
        kinds = {kind(t) for t in new.values()}
        assert {"socket", "memfd", "eventfd", "epoll", "pidfd"} <= kinds, new
        assert not_cloexec(new) == {}, f"inheritable hub descriptors: {not_cloexec(new)}"
    finally:
        w.kill()
    assert w.join(10)


def test_every_hub_fd_is_close_on_exec_in_a_worker(
    make_hub: Callable[..., clusterhub.Hub], reports: Reports
) -> None:
    """Every descriptor a worker's hub holds (its socket, the memfd, its own epoll and eventfds) carries O_CLOEXEC."""
    hub = make_hub()
    _register(hub)

    def work() -> None:
        # This worker's own descriptors: what it inherited plus what its hub made.
        assert hub.request_master("echo", 1).result(timeout=10) == 1
        assert hub.request_master("later", 2).result(timeout=10) == 2
        with hub.lock("isolation"):
            pass
        fds = open_fds()
        hub_fds = {fd: t for fd, t in fds.items()
                   if kind(t) in ("socket", "memfd", "eventfd", "epoll", "pidfd")}
        reports.put("fds", sorted({kind(t) for t in hub_fds.values()}), not_cloexec(hub_fds),
                    hub._master.fd in hub_fds, hub._locks.table.fileno() in hub_fds)

    w = hub.fork(work)
    _, kinds, bad, has_socket, has_memfd = reports.get(timeout=20)
    join_ok(w)
    assert {"socket", "memfd", "eventfd", "epoll"} <= set(kinds), kinds
    assert has_socket and has_memfd
    assert bad == {}, f"inheritable descriptors in the worker: {bad}"


def test_program_execed_by_a_worker_inherits_no_hub_fd(
    make_hub: Callable[..., clusterhub.Hub], reports: Reports
) -> None:
    """A program a worker runs (subprocess with close_fds=False, so only O_CLOEXEC protects) sees none of the hub's sockets nor its lock table."""
    hub = make_hub()
    _register(hub)
    w0 = hub.fork(threading.Event().wait)  # a sibling: its channel's master end is open too

    def work() -> None:
        assert hub.request_master("echo", 1).result(timeout=10) == 1
        hub_targets = {t for t in open_fds().values()
                       if t.startswith("socket:") or MEMFD_NAME in t}
        out = subprocess.run([sys.executable, "-c", LIST_FDS], close_fds=False,
                             capture_output=True, text=True, timeout=30, check=True).stdout
        child = [line.split(" ", 1)[1] for line in out.splitlines()]
        reports.put("exec", sorted(hub_targets), child, hub._master.fd)

    w = hub.fork(work)
    _, hub_targets, child, master_fd = reports.get(timeout=40)
    join_ok(w)
    w0.kill()
    assert any(MEMFD_NAME in t for t in hub_targets)
    assert any(t.startswith("socket:") for t in hub_targets)
    leaked = [t for t in child if t in hub_targets or MEMFD_NAME in t]
    assert leaked == [], f"the exec'd program inherited {leaked} (worker socket fd {master_fd})"


def test_lock_table_is_an_anonymous_memfd(make_hub: Callable[..., clusterhub.Hub]) -> None:
    """The lock table is mapped from an unnamed memfd ("memfd:clusterhub-locks (deleted)" in /proc/self/maps) and puts nothing in /dev/shm."""
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    with open("/proc/self/maps") as f:  # other tests of this process may map /dev/shm (multiprocessing)
        shm_maps_before = {line.split()[-1] for line in f if "/dev/shm/" in line}
    hub = make_hub()
    with hub.lock("isolation"):
        pass
    fd = hub._locks.table.fileno()
    target = os.readlink(f"/proc/self/fd/{fd}")
    with open("/proc/self/maps") as f:
        maps = [line.rstrip("\n") for line in f]
    ours = [m for m in maps if MEMFD_NAME in m]
    shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert target == f"/{MEMFD_NAME} (deleted)", target
    assert ours and all(m.endswith(f"/{MEMFD_NAME} (deleted)") for m in ours), ours
    assert not {m.split()[-1] for m in maps if "/dev/shm/" in m} - shm_maps_before
    assert shm_after - shm_before == set()
    assert fd_flags(fd) & O_CLOEXEC


def test_readme_states_pickle_trusts_its_peers() -> None:
    """README.md warns that pickle trusts its peers, next to the serializer="json" alternative."""
    text = README.read_text()
    i = text.find("pickle trusts its peers")
    assert i >= 0, 'README.md lacks the "pickle trusts its peers" note'
    nearby = text[max(0, i - 600) : i + 600]
    assert 'serializer="json"' in nearby, "the note does not point at serializer=\"json\""
    assert "runs code" in nearby or "run code" in nearby
