"""Celery's prefork pool wired to clusterhub (examples/celery_tasks.py), with
the real ``celery worker`` started as a user starts it and driven by real
tasks sent from this process through the example's broker (kombu's
``filesystem://`` transport, results in ``file://``: no broker server).

The hub is made in the worker's main process (``worker_init``), every pool
child connects (``worker_process_init``), and the hub is closed at
``worker_shutdown``.  Which processes are the pool's children is read from
/proc (the kernel's view), and compared with the hub's own list of workers,
asked by a task through ``request_master``.

(The example writes the broker's message files atomically: with kombu's own
``filesystem://`` writes, the worker sometimes read a message file still
empty and stopped with "Unrecoverable error: JSONDecodeError", about one run
of this file in twenty; kombu issue #1551.)
"""

from __future__ import annotations

import importlib
import os
import signal
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import pytest

import clusterhub

from .conftest import EXAMPLES, PYTHON, Server, env_for, require, wait_until

RESULT_TIMEOUT = 30.0  # seconds for any one task's result
POLL = 0.02  # seconds between looks at the result backend's folder


@pytest.fixture
def tasks(monkeypatch: pytest.MonkeyPatch, address: str, tmp_path: Path) -> ModuleType:
    """The example module, imported here as the worker imports it (its app
    object in this process is not used: see ``client``)."""
    require("celery")
    require("kombu")
    require("billiard")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("CLUSTERHUB_ADDRESS", address)
    monkeypatch.setenv("EXAMPLE_DIR", str(tmp_path / "data"))
    return importlib.import_module("celery_tasks")


@pytest.fixture
def client(tasks: ModuleType, tmp_path: Path) -> Iterator[Any]:
    """A Celery app of this process on this test's broker and result folders
    (the module is imported once per session: its own ``app`` points at the
    first test's folders)."""
    app = tasks.make_app(tmp_path / "data")
    yield app
    app.close()


def worker_argv(concurrency: int) -> list[str]:
    return [PYTHON, "-m", "celery", "-A", "celery_tasks", "worker", "--pool=prefork", f"--concurrency={concurrency}",
            "--loglevel=INFO", "--hostname", f"it-{uuid.uuid4().hex[:8]}@%h"]


def start_worker(servers: Callable[..., Server], address: str, data: Path, concurrency: int) -> Server:
    """``celery -A celery_tasks worker --pool=prefork`` as in the example's
    docstring; returns once Celery says it is ready."""
    server = servers(worker_argv(concurrency), env=env_for(address, data), name="celery")

    def ready() -> bool:
        if server.proc.poll() is not None:
            pytest.fail(f"celery exited with {server.proc.returncode}:\n{server.output()[-4000:]}")
        return " ready." in server.output()

    wait_until(ready, 30, "the celery worker to be ready", interval=0.05)
    return server


def live_children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (zombies excluded), from /proc."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # (gone meanwhile)
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state != "Z":
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def run(client: Any, name: str) -> Any:
    return client.send_task(f"celery_tasks.{name}").get(timeout=RESULT_TIMEOUT, interval=POLL)


def all_connected(client: Any, server: Server, concurrency: int, other_than: frozenset[int] = frozenset()) -> set[int]:
    """Until the hub's workers are exactly the pool's children, ``concurrency``
    of them (and not the set ``other_than``): their pids."""

    def check() -> set[int]:
        pool = live_children(server.pid)
        pid, worker_id, listed = run(client, "hub_workers")  # (asked by a child, answered by the master)
        assert pid in pool and [worker_id, pid] in listed
        if len(pool) == concurrency and {p for _, p in listed} == pool != other_than:
            return pool
        return set()

    return wait_until(check, 20, f"the {concurrency} pool children to be the hub's workers", interval=0.1)


def stop_cleanly(server: Server, address: str, pool: set[int]) -> str:
    """SIGTERM to the main process, as a process manager stops it (Celery's
    warm shutdown: the pool's children exit, then ``worker_shutdown`` closes
    the hub): exit status 0, the children gone, the hub's address free.
    Returns the log."""
    server.signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0, server.output()[-4000:]
    out = server.output()
    assert f"clusterhub: hub at {address} closed" in out
    assert not any(alive(pid) for pid in pool)
    with pytest.raises(clusterhub.ConnectError):  # nothing listens there any more
        clusterhub.connect(address, timeout=2)
    return out


def test_concurrent_increments_are_exact(servers: Callable[..., Server], address: str, tmp_path: Path,
                                         client: Any) -> None:
    data, n, concurrency = tmp_path / "data", 150, 3
    server = start_worker(servers, address, data, concurrency)

    sent = [client.send_task("celery_tasks.incr") for _ in range(n)]  # all queued before any result is read
    results = [r.get(timeout=RESULT_TIMEOUT, interval=POLL) for r in sent]

    assert sorted(value for value, _ in results) == list(range(1, n + 1))  # no lost update, no duplicate
    assert not any(recovered for _, recovered in results)
    assert (data / "counter").read_text() == str(n)
    pool = all_connected(client, server, concurrency)

    # A second worker given the same address does not start (it would be a
    # second hub with its own locks): its worker_init stops it.
    second = servers(worker_argv(2), env=env_for(address, tmp_path / "data2"), name="celery-second")
    assert second.proc.wait(30) == 1, second.output()[-4000:]
    assert f"clusterhub: cannot listen at {address}: address in use" in second.output()
    assert run(client, "incr") == [n + 1, False]  # (the first one is still serving)

    out = stop_cleanly(server, address, pool)
    assert "Traceback" not in out, out[-4000:]


def test_child_killed_holding_the_lock(servers: Callable[..., Server], address: str, tmp_path: Path,
                                       client: Any) -> None:
    from billiard.exceptions import WorkerLostError

    data = tmp_path / "data"
    server = start_worker(servers, address, data, 2)
    before = all_connected(client, server, 2)
    assert run(client, "incr") == [1, False]

    # The child takes the lock and SIGKILLs itself: Celery fails the task once
    # worker_lost_wait has passed (its result could still have been on its way).
    with pytest.raises(WorkerLostError, match="SIGKILL"):
        client.send_task("celery_tasks.die_holding").get(timeout=RESULT_TIMEOUT, interval=POLL)
    assert "exited with 'signal 9 (SIGKILL)'" in server.output()

    # Celery forked a replacement, which connected; the survivor is still there.
    after = all_connected(client, server, 2, other_than=frozenset(before))
    assert len(after & before) == 1

    # The next holder is told; the counter is exact (the dead task never wrote).
    assert run(client, "incr") == [2, True]
    assert run(client, "incr") == [3, False]
    assert (data / "counter").read_text() == "3"
    stop_cleanly(server, address, after)  # (its log holds Celery's traceback of the WorkerLostError)


def test_sigterm_shuts_down_cleanly(servers: Callable[..., Server], address: str, tmp_path: Path,
                                    client: Any) -> None:
    # Stopped while busy (a deploy): the tasks that ran are exactly counted; the
    # others are left in the queue for the next worker (Celery restores them).
    data = tmp_path / "data"
    server = start_worker(servers, address, data, 2)
    pool = all_connected(client, server, 2)
    sent = [client.send_task("celery_tasks.incr") for _ in range(100)]
    sent[0].get(timeout=RESULT_TIMEOUT, interval=POLL)

    out = stop_cleanly(server, address, pool)
    assert "Traceback" not in out, out[-4000:]
    assert "exited with" not in out, out[-4000:]  # (billiard logs a child that did not exit 0)
    done = [r.result for r in sent if r.state == "SUCCESS"]
    assert sorted(value for value, _ in done) == list(range(1, len(done) + 1))
    assert (data / "counter").read_text() == str(len(done))
    print(f"{len(done)} of {len(sent)} tasks ran before the shutdown; queued: {len(os.listdir(data / 'queue'))}")
