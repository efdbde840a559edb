"""Workers' exits and the master's death on every transport: hub.workers,
Worker.join, hub.join and on_exit see every exit (after the messages the
worker sent), and a worker learns of its master's death (MasterDied, then an
exit with exit_on_master_death)."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time

import pytest

import clusterhub
from clusterhub import MasterDied

from .cluster import ready
from conftest import kill_and_reap, subreaper, waitpid_bounded

pytestmark = pytest.mark.timeout(60)


def _wait(hub, ev):
    """A worker that returns once ``ev`` is set."""
    ev.wait()


def _nothing(hub):
    """A worker that returns at once."""


def _forever(hub):
    """A worker that runs until it is killed (on nothing shared with other
    processes: a process killed while it waits on a multiprocessing Event
    leaves that Event's set() blocked)."""
    threading.Event().wait()


# ---- exits: hub.workers, join, on_exit -------------------------------------------


def test_workers_lists_live_workers_only(cluster, event):
    """hub.workers maps ids to the live Worker objects and drops exited ones."""
    hub = cluster.hub
    go = event()
    a = cluster.start(_wait, go)
    b = cluster.start(_nothing)
    cluster.join(b)
    assert hub.workers == {a.id: a}
    assert hub.workers[a.id] is a
    go.set()
    cluster.join(a)
    assert hub.workers == {}


def test_hub_join(cluster, event):
    """hub.join(timeout) is False while a worker runs and True once all exited."""
    hub = cluster.hub
    go = event()
    ws = [cluster.start(_wait, go) for _ in range(2)]
    t0 = time.monotonic()
    assert hub.join(0.3) is False
    assert 0.25 <= time.monotonic() - t0 < 5
    go.set()
    assert hub.join(15) is True
    for w in ws:
        cluster.join(w)
    assert hub.join(0) is True


def test_killed_worker_is_seen_by_join_on_exit_and_workers(cluster, event):
    """A worker killed while it runs is reported to on_exit (not alive), leaves
    hub.workers, and Worker.join and hub.join return True."""
    hub = cluster.hub
    go = event()
    seen = []
    exited = threading.Event()

    @hub.on_exit
    def cb(w):
        seen.append((w.id, w.is_alive()))
        exited.set()

    a = cluster.start(_wait, go)
    b = cluster.start(_forever)
    cluster.kill(b)
    assert exited.wait(10)
    assert seen == [(b.id, False)]
    cluster.join(b, -signal.SIGKILL)
    assert not b.is_alive() and hub.workers == {a.id: a}
    go.set()
    assert hub.join(15) is True
    cluster.join(a)
    assert sorted(seen) == sorted([(a.id, False), (b.id, False)])


def test_exit_is_seen_while_a_handler_runs(cluster, event):
    """While a master handler runs, a worker's exit shows at once in
    Worker.join/is_alive and hub.workers (as send_to_worker says)."""
    hub = cluster.hub
    started, release = threading.Event(), threading.Event()

    @hub.on("block")
    def block(data, sender):
        started.set()
        release.wait(30)

    def send_block(hub):
        hub.send_to_master("block")

    go = event()
    a = cluster.start(_wait, go)
    b = cluster.start(send_block)
    try:
        assert started.wait(10)
        cluster.join(b)  # the handler b started is still running
        assert not b.is_alive() and b.id not in hub.workers and a.id in hub.workers
        with pytest.raises(clusterhub.WorkerDied):
            hub.send_to_worker(b, "x")
        go.set()
        cluster.join(a)
        assert hub.workers == {}
        assert hub.join(0) is False  # a's and b's exits are not handled yet: the handler runs
    finally:
        release.set()
    assert hub.join(10) is True


def test_join_waits_until_exited_workers_messages_are_handled(cluster):
    """hub.join() returns True only once every message the exited workers
    sent has been handled (fork, send results, join, read: nothing missing)."""
    hub = cluster.hub
    got = []

    @hub.on("result")
    def result(data, sender):
        time.sleep(0.0005)  # a handler that takes a little time, as real ones do
        got.append((sender.id, data))

    def work(hub):
        for i in range(200):
            hub.send_to_master("result", i)

    ws = [cluster.start(work) for _ in range(2)]
    assert hub.join(30) is True
    assert len(got) == 400
    for w in ws:
        assert [d for wid, d in got if wid == w.id] == list(range(200))
        cluster.join(w)


def test_join_waits_for_on_exit_callbacks(cluster):
    """When hub.join() returns True, the on_exit callback of every exited
    worker has run."""
    hub = cluster.hub
    seen = []
    hub.on_exit(lambda w: (time.sleep(0.05), seen.append(w.id)))
    ws = [cluster.start(_nothing) for _ in range(3)]
    assert hub.join(30) is True
    assert sorted(seen) == [w.id for w in ws]


# ---- master death ------------------------------------------------------------


def _run_master(cluster, reports, exit_on_master_death, go=None):
    """The body of a master process the test will SIGKILL: a worker with a
    request to it pending ("waiter"), and with exit_on_master_death a worker
    whose dispatcher is busy in a handler ("busy")."""
    h = cluster.hub
    never = concurrent.futures.Future()  # a handler answering "never"
    h.on("never", lambda data, sender: never)

    def waiter(hub):
        def cb(err, result):
            reports.put("callback", os.getpid(), type(err).__name__)

        hub.request_master("never", callback=cb)
        reports.put("ready", os.getpid(), "waiter")
        if go is None:
            threading.Event().wait()  # the master's death must end this process
            return
        go.wait()  # master died, we kept running: check the hub then exit 0
        try:
            hub.send_to_master("x")
            sent = "no error"
        except MasterDied:
            sent = "MasterDied"
        f = hub.request_master("x")
        reports.put("after", sent, type(f.exception(5)).__name__, len(hub._pending))

    def busy(hub):
        blocked = threading.Event()

        def block(data, sender):
            reports.put("ready", os.getpid(), "busy")
            blocked.wait()  # the dispatcher is busy: no one reads the socket

        hub.on("block", block)
        ready(hub)
        threading.Event().wait()

    cluster.start(waiter)
    if exit_on_master_death:
        h.send_to_worker(cluster.start(busy, ready=True), "block")


def test_master_death_ends_workers(cluster, reports):
    """With exit_on_master_death=True, a worker whose master is SIGKILLed
    fails its pending requests with MasterDied, then exits with code 1 within
    about a second, even when its dispatcher is busy in a handler."""
    with subreaper():
        master = cluster.spawn_master(_run_master, reports, True, exit_on_master_death=True)
        try:
            started = {r[2]: r[1] for r in reports.get_n(2)}
            pids = [started["waiter"], started["busy"]]
        finally:
            os.kill(master, signal.SIGKILL)
            assert waitpid_bounded(master, 10) == -signal.SIGKILL
        try:
            t0 = time.monotonic()
            codes = [waitpid_bounded(pid, 10) for pid in pids]
            took = time.monotonic() - t0
        finally:
            kill_and_reap(pids)
        assert codes == [1, 1]
        assert took < 2.5, f"workers took {took:.2f} s to notice the master's death"
    assert reports.get() == ("callback", pids[0], "MasterDied")


def test_master_death_without_exit(cluster, reports, event):
    """With exit_on_master_death=False the worker keeps running: its pending
    request fails with MasterDied, send_to_master raises it, and a new
    request returns a future failed with it."""
    go = event()
    with subreaper():
        master = cluster.spawn_master(_run_master, reports, False, go, exit_on_master_death=False)
        try:
            (_, pid, _) = reports.get()
        finally:
            os.kill(master, signal.SIGKILL)
            assert waitpid_bounded(master, 10) == -signal.SIGKILL
        try:
            assert reports.get() == ("callback", pid, "MasterDied")
            go.set()
            assert reports.get() == ("after", "MasterDied", "MasterDied", 0)
            assert waitpid_bounded(pid, 10) == 0
        finally:
            kill_and_reap([pid])


def _run_master_of_a_blocked_waiter(cluster, reports):
    """The body of a master process the test will SIGKILL: a worker blocked
    in result() on a request the master never answers."""
    never = concurrent.futures.Future()
    cluster.hub.on("never", lambda data, sender: never)

    def waiter(hub):
        f = hub.request_master("never")
        reports.put("ready", os.getpid())
        t0 = time.monotonic()
        err = f.exception(30)
        reports.put("woken", type(err).__name__, time.monotonic() - t0 < 10, len(hub._pending))

    cluster.start(waiter)


def test_master_death_wakes_a_worker_waiting_on_a_result(cluster, reports):
    """A worker thread blocked in result() on a request to its master is woken
    by the master's death with MasterDied, promptly, leaving nothing pending."""
    with subreaper():
        master = cluster.spawn_master(_run_master_of_a_blocked_waiter, reports, exit_on_master_death=False)
        try:
            (_, pid) = reports.get()
        finally:
            os.kill(master, signal.SIGKILL)
            assert waitpid_bounded(master, 10) == -signal.SIGKILL
        try:
            assert reports.get(15) == ("woken", "MasterDied", True, 0)
            assert waitpid_bounded(pid, 10) == 0
        finally:
            kill_and_reap([pid])
