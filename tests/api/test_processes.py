"""Processes with forked workers: fork() and the exit codes of forked
workers, Worker handles, on_exit, close(), hubs left inert in children forked
by other code, several hubs, the idle cost, and Ctrl-C.  What every transport
must do with exits (hub.workers, join, on_exit) and with the master's death
is in tests/conformance/test_processes.py."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import clusterhub
from clusterhub import HubClosedError

from conftest import (
    REAPED_ELSEWHERE,
    children_of,
    fork_ready,
    ignore_sigterm,
    join_ok,
    kill_and_reap,
    run_forked,
    subreaper,
    waitpid_bounded,
)

pytestmark = pytest.mark.timeout(60)


# ---- identity and exit codes ---------------------------------------------


def test_identity_in_master_and_worker(hub, reports):
    """After fork the same hub is the worker side in the child (is_worker,
    worker_id == w.id) and stays the master side in the parent."""

    def work():
        reports.put(hub.is_master, hub.is_worker, hub.worker_id, os.getpid())

    w = hub.fork(work)
    assert (hub.is_master, hub.is_worker, hub.worker_id) == (True, False, None)
    assert isinstance(w, clusterhub.Worker)
    assert reports.get() == (False, True, w.id, w.pid)
    join_ok(w)


def test_worker_ids_start_at_1_and_are_never_reused(hub):
    """Worker ids count from 1 and stay unique for the hub's life, even after
    earlier workers exited."""
    first = [hub.fork(lambda: None) for _ in range(3)]
    assert [w.id for w in first] == [1, 2, 3]
    for w in first:
        join_ok(w)
    later = hub.fork(lambda: None)
    assert later.id == 4
    assert len({w.pid for w in first + [later]}) == 4
    join_ok(later)


def _raise_system_exit(code):
    raise SystemExit(code)


@pytest.mark.parametrize(
    "target, code",
    [
        (lambda: None, 0),
        (lambda: _raise_system_exit(3), 3),
        (lambda: _raise_system_exit(None), 0),
        (lambda: sys.exit(0), 0),
        (lambda: _raise_system_exit(256 + 5), 5),
        (lambda: os.kill(os.getpid(), signal.SIGKILL), -signal.SIGKILL),
    ],
    ids=["return", "SystemExit(3)", "SystemExit(None)", "sys.exit(0)", "SystemExit(261)", "SIGKILL"],
)
def test_exit_codes(hub, target, code):
    """A returning target exits 0, SystemExit(n) exits n, death by signal N
    gives exitcode -N."""
    w = hub.fork(target)
    join_ok(w, code)


def test_uncaught_exception_exits_1_with_traceback(hub, tmp_path):
    """An uncaught exception in the target prints its traceback to the
    worker's stderr and exits with code 1."""
    err = tmp_path / "stderr"

    def work():
        sys.stderr = open(err, "w")

        def deep_inside():
            raise RuntimeError("boom in the worker")

        deep_inside()

    w = hub.fork(work)
    join_ok(w, 1)
    text = err.read_text()
    assert "Traceback (most recent call last)" in text
    assert "deep_inside" in text
    assert "RuntimeError: boom in the worker" in text


def _end_with(how):
    if how == "return":
        return
    if how == "SystemExit":
        raise SystemExit(7)
    raise ValueError("ending with an exception")


@pytest.mark.parametrize("how, code", [("return", 0), ("SystemExit", 7), ("exception", 1)])
def test_messages_sent_before_exit_are_all_delivered(hub, tmp_path, how, code):
    """Every message a worker sent just before returning, SystemExit or an
    uncaught exception is handled by the master, and on_exit runs after them
    with the exit code set."""
    n = 10_000
    got = []
    at_exit = []
    exited = threading.Event()
    hub.on("n", lambda data, sender: got.append(data))

    @hub.on_exit
    def _exit(w):
        at_exit.append((w.id, w.exitcode, w.is_alive(), len(got)))
        exited.set()

    def work():
        sys.stderr = open(tmp_path / "stderr", "w")
        for i in range(n):
            hub.send_to_master("n", i)
        _end_with(how)

    w = hub.fork(work)
    assert exited.wait(30)
    join_ok(w, code)
    assert got == list(range(n))
    assert at_exit == [(w.id, code, False, n)]


def test_big_messages_sent_before_exit_are_all_delivered(make_hub):
    """A worker whose last messages are still queued in its process (more
    than the socket buffer holds) flushes them all before exiting."""
    hub = make_hub()
    payload = b"x" * 200_000
    got = []
    hub.on("big", lambda data, sender: got.append(len(data)))

    def work():
        for _ in range(40):  # 8 MB: far more than a socket buffer
            hub.send_to_master("big", payload)

    w = hub.fork(work)
    join_ok(w, 0, timeout=30)
    hub.request_master("sync").exception(10)  # on_exit ordering aside, handlers ran
    assert got == [200_000] * 40


# ---- Worker handles, on_exit, forks ---------------------------------------


def test_worker_handle_lifecycle(hub, event):
    """is_alive/exitcode/join(timeout) track a running worker; terminate()
    ends it with -SIGTERM, kill() of an exited worker does nothing."""
    go = event()
    w = hub.fork(go.wait)
    assert w.pid > 0 and w.pid != os.getpid()
    assert w.is_alive()
    assert w.exitcode is None
    t0 = time.monotonic()
    assert w.join(0.2) is False
    assert time.monotonic() - t0 >= 0.15
    w.terminate()
    assert w.join(10)
    assert not w.is_alive()
    assert w.exitcode == -signal.SIGTERM
    w.kill()  # already exited: no error, no signal to a reused pid
    w.terminate()


def test_kill(hub, event):
    """kill() ends a worker with -SIGKILL."""
    w = hub.fork(event().wait)
    w.kill()
    join_ok(w, -signal.SIGKILL)


def test_on_exit_reports_every_exit(hub):
    """on_exit (usable as a decorator) gets each exited Worker with its
    exitcode set and is_alive() False."""
    seen = []
    done = threading.Event()

    @hub.on_exit
    def cb(w):
        seen.append((w.id, w.exitcode, w.is_alive()))
        if len(seen) == 3:
            done.set()

    a = hub.fork(lambda: None)
    b = hub.fork(lambda: _raise_system_exit(4))
    c = hub.fork(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert done.wait(20)
    assert sorted(seen) == [(a.id, 0, False), (b.id, 4, False), (c.id, -9, False)]


def test_killed_worker_with_unread_messages_is_no_error(hub, caplog, event):
    """A worker killed while messages to it are unread (its socket resets)
    is reported through on_exit with -SIGKILL and logs no error."""
    go = event()
    exited = threading.Event()
    codes = []
    hub.on_exit(lambda w: (codes.append(w.exitcode), exited.set()))
    w = fork_ready(hub, lambda: hub.on("block", lambda data, sender: go.wait(30)), go, 30)
    hub.send_to_worker(w, "block")
    for i in range(100):
        hub.send_to_worker(w, "unread", i)
    hub.request_worker(w, "never-answered")
    w.kill()
    assert exited.wait(10)
    assert codes == [-signal.SIGKILL]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(hub._pending) == 0


def test_concurrent_forks_from_threads(make_hub, reports):
    """Threads forking workers of two hubs at once each get a working worker
    bound to the right hub, which finds the other hub inert."""
    hubs = [make_hub(), make_hub()]
    for i, h in enumerate(hubs):
        h.on("which", lambda data, sender, i=i: i)

    def work(h, other):
        reports.put(hubs.index(h), h.request_master("which").result(10), _inert(other)[0])

    def forker(i):
        for _ in range(5):
            hubs[i].fork(work, hubs[i], hubs[1 - i])

    threads = [threading.Thread(target=forker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    got = sorted(reports.get_n(10, timeout=20))
    assert got == [(0, 0, "closed")] * 5 + [(1, 1, "closed")] * 5
    for h in hubs:
        assert h.join(15)


def test_worker_may_run_a_hub_of_its_own(hub, reports):
    """A worker can create its own Hub and fork sub-workers with it (the
    parent's hub stays its worker side)."""

    def sub_master():
        inner = clusterhub.Hub()
        inner.on("depth", lambda data, sender: 2)
        sub = inner.fork(lambda: reports.put("sub", inner.request_master("depth").result(10),
                                              _inert(hub)[0]))
        ok = sub.join(10) and sub.exitcode == 0
        inner.close()
        reports.put("worker", ok, hub.request_master("depth").result(10))

    hub.on("depth", lambda data, sender: 1)
    w = hub.fork(sub_master)
    got = dict((r[0], r[1:]) for r in reports.get_n(2, timeout=20))
    assert got == {"sub": (2, "closed"), "worker": (True, 1)}
    join_ok(w)


# ---- inert hubs after fork -----------------------------------------------


def _inert(h):
    """What the test reports about a hub that must be inert here."""
    out = []
    for call in (
        lambda: h.send_to_master("x"),
        lambda: h.request_master("x"),
        lambda: h.on("x", print),
        lambda: h.send_to_workers("x"),
        lambda: h.lock("k"),
    ):
        try:
            call()
            out.append("no error")
        except HubClosedError:
            out.append("closed")
        except Exception as e:  # pragma: no cover - reported to the test
            out.append(repr(e))
    out.append((h.is_master, h.is_worker, h.worker_id))
    return out


def test_other_hubs_of_the_master_are_inert_in_a_worker(make_hub, reports):
    """In a worker of hub A, another hub B of the master raises HubClosedError
    on use, while A works."""
    a, b = make_hub(), make_hub()
    a.on("ping", lambda data, sender: "pong")

    def work():
        reports.put(_inert(b), a.request_master("ping").result(10))

    w = a.fork(work)
    inert, pong = reports.get()
    assert inert == ["closed"] * 5 + [(True, False, None)]
    assert pong == "pong"
    join_ok(w)
    b.on("ping", lambda data, sender: "b-pong")
    assert b.request_master("ping").result(5) == "b-pong"  # b still works in the master


def test_plain_fork_in_a_worker_leaves_hubs_inert(hub, reports):
    """A child forked by other code inside a worker finds the hub inert, and
    the worker's own hub keeps working after that child exited."""
    hub.on("ping", lambda data, sender: "pong")

    def work():
        pid = run_forked(lambda: reports.put("grandchild", _inert(hub)))
        _, status = os.waitpid(pid, 0)
        reports.put("worker", os.waitstatus_to_exitcode(status), hub.request_master("ping").result(10))

    w = hub.fork(work)
    got = dict((r[0], r[1:]) for r in reports.get_n(2))
    assert got["grandchild"] == (["closed"] * 5 + [(False, True, w.id)],)
    assert got["worker"] == (0, "pong")
    join_ok(w)


def test_plain_fork_in_the_master_leaves_hubs_inert(hub, reports, event):
    """A child forked by other code in the master finds every hub inert, and
    the master's hub keeps serving its workers after that child exited."""
    go = event()

    def work():
        hub.on("ping", lambda data, sender: "pong")
        hub.send_to_master("ready")
        go.wait()

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(work)
    assert ready.wait(10)
    pid = run_forked(lambda: reports.put(_inert(hub)))
    assert waitpid_bounded(pid, 10) == 0
    assert reports.get() == (["closed"] * 5 + [(True, False, None)],)
    assert hub.request_worker(w, "ping").result(10) == "pong"
    go.set()
    join_ok(w)


def test_several_independent_hubs(make_hub, reports, event):
    """Two hubs in one process have their own workers and handlers; messages
    of one never reach the other's handlers."""
    a, b = make_hub(), make_hub()
    a.on("who", lambda data, sender: "a")
    b.on("who", lambda data, sender: "b")
    go = event()

    def work(h, other):
        reports.put(h.worker_id, h.request_master("who").result(10), _inert(other)[0])
        go.wait()

    wa = a.fork(work, a, b)
    wb = b.fork(work, b, a)
    got = sorted(reports.get_n(2))
    assert got == [(1, "a", "closed"), (1, "b", "closed")]
    assert a.workers.keys() == {wa.id} and b.workers.keys() == {wb.id}
    assert a.workers[1] is wa and b.workers[1] is wb
    go.set()
    join_ok(wa)
    join_ok(wb)


def test_new_hub_after_close(make_hub, reports):
    """A Hub made after another was closed works normally."""
    first = make_hub()
    first.fork(lambda: None)
    first.close()
    second = make_hub()
    second.on("ping", lambda data, sender: "pong")
    w = second.fork(lambda: reports.put(second.request_master("ping").result(10)))
    assert reports.get() == ("pong",)
    join_ok(w)
    assert w.id == 1


# ---- close -----------------------------------------------------------------


def test_close_terminates_then_kills(hub, event, reports):
    """close(timeout) SIGTERMs the remaining workers and SIGKILLs the ones
    still alive after the timeout."""

    def stubborn():
        ignore_sigterm()
        reports.put("ready")
        event_never.wait()

    event_never = event()
    polite = hub.fork(event_never.wait)
    hard = hub.fork(stubborn)
    reports.get()
    t0 = time.monotonic()
    hub.close(timeout=0.5)
    took = time.monotonic() - t0
    assert 0.45 <= took < 5
    assert polite.exitcode == -signal.SIGTERM
    assert hard.exitcode == -signal.SIGKILL
    assert children_of(os.getpid()) == []


def test_close_is_idempotent_and_identity_stays_readable(hub, event):
    """close() twice is fine; is_master/is_worker/worker_id stay readable and
    every other call raises HubClosedError."""
    w = hub.fork(event().wait)
    with hub:
        pass
    hub.close()
    assert (hub.is_master, hub.is_worker, hub.worker_id) == (True, False, None)
    assert not w.is_alive()
    for call in (
        lambda: hub.workers,
        lambda: hub.fork(print),
        lambda: hub.send_to_master("x"),
        lambda: hub.send_to_worker(w, "x"),
        lambda: hub.request_master("x"),
        lambda: hub.on("x", print),
        lambda: hub.join(),
        lambda: hub.attach(),
        lambda: hub.__enter__(),
    ):
        with pytest.raises(HubClosedError):
            call()


def test_close_from_a_handler_and_a_callback(make_hub, event):
    """close() may be called from a handler or a request callback (on the
    hub's own thread): it stops the workers and returns."""
    for where in ("handler", "callback"):
        hub = make_hub()
        go = event()
        closed = threading.Event()
        w = hub.fork(go.wait)

        def close_it(*_args):
            hub.close(timeout=1)
            closed.set()

        hub.on("ping", lambda data, sender: "pong")
        if where == "handler":
            hub.on("close", close_it)
            hub.send_to_master("close")
        else:
            ww = hub.fork(lambda: (hub.on("ping", lambda data, sender: "pong"),
                                   hub.send_to_master("ready"), go.wait()))
            ready = threading.Event()
            hub.on("ready", lambda data, sender: ready.set())
            assert ready.wait(10)
            hub.request_worker(ww, "ping", callback=close_it)
        assert closed.wait(15), where
        assert not w.is_alive() and w.exitcode == -signal.SIGTERM


def test_close_wakes_waiting_threads(hub, event):
    """Threads blocked on requests when the hub closes get an error at once
    instead of waiting forever."""
    go = event()
    gate = threading.Event()
    hub.on("slow", lambda data, sender: gate.wait(20))
    w = fork_ready(hub, lambda: hub.on("slow", lambda data, sender: go.wait(20)), go, 20)
    errors = []

    def wait_on(fut):
        try:
            fut.result()
        except BaseException as e:
            errors.append(type(e).__name__)

    threads = [threading.Thread(target=wait_on, args=(f,)) for f in (
        hub.request_worker(w, "slow"), hub.request_master("other"), hub.request_master("slow"))]
    for t in threads:
        t.start()
    closer = threading.Thread(target=hub.close, kwargs={"timeout": 1})
    closer.start()
    gate.set()
    closer.join(15)
    for t in threads:
        t.join(10)
    assert not closer.is_alive() and not any(t.is_alive() for t in threads)
    assert len(errors) == 3 or "NoHandlerError" in errors
    assert set(errors) <= {"WorkerDied", "HubClosedError", "NoHandlerError"}


def test_close_in_a_worker(hub, reports):
    """A worker may close its side of the hub and keep running; the master
    is not disturbed."""
    got = []
    hub.on("n", lambda data, sender: got.append(data))

    def work():
        hub.send_to_master("n", 1)
        hub.close()
        hub.close()
        try:
            hub.send_to_master("n", 2)
        except HubClosedError:
            reports.put("closed", hub.is_worker, hub.worker_id)

    w = hub.fork(work)
    assert reports.get() == ("closed", True, w.id)
    join_ok(w)
    assert hub.join(10)  # Worker.join sees the exit; hub.join, also its messages handled
    assert got == [1]


# ---- cost of an idle hub, Ctrl-C -------------------------------------------------


def _cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_hub_uses_no_cpu(hub, event):
    """An idle master with two idle workers burns (almost) no CPU: the hub
    waits in epoll instead of polling."""
    ready_count = []
    got_ready = threading.Event()
    go = event()

    def on_ready(data, sender):
        ready_count.append(sender.id)
        if len(ready_count) == 2:
            got_ready.set()

    hub.on("ready", on_ready)

    def work():
        hub.send_to_master("ready")
        go.wait()

    ws = [hub.fork(work) for _ in range(2)]
    assert got_ready.wait(10)
    hub.request_master("settle").exception(5)
    before = os.times()
    workers_before = [_cpu_seconds(w.pid) for w in ws]
    t0 = time.monotonic()
    time.sleep(1.0)  # the measurement window, not a synchronisation
    wall = time.monotonic() - t0
    after = os.times()
    used = (after.user - before.user) + (after.system - before.system)
    workers_used = [_cpu_seconds(w.pid) - b for w, b in zip(ws, workers_before)]
    assert used / wall < 0.05, f"idle master used {used / wall:.1%} CPU"
    assert max(workers_used) / wall < 0.05, f"idle workers used {workers_used} s"
    go.set()
    for w in ws:
        join_ok(w)


CTRL_C_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import clusterhub

    hub = clusterhub.Hub()
    ready = threading.Semaphore(0)
    hub.on("ready", lambda data, sender: ready.release())

    def sleeper():
        hub.send_to_master("ready")
        time.sleep(60)

    def spinner():
        hub.send_to_master("ready")
        while True:
            sum(range(1000))

    ws = [hub.fork(sleeper), hub.fork(spinner)]
    for _ in ws:
        assert ready.acquire(timeout=10)
    print(" ".join(str(w.pid) for w in ws), flush=True)
    hub.join()
    """
)


def test_ctrl_c_stops_master_and_workers(tmp_path):
    """SIGINT to the process group stops the master and its workers with at
    most one KeyboardInterrupt traceback (the master's), leaving no process."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    with subreaper():
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        try:
            line = proc.stdout.readline()
            pids = [int(p) for p in line.split()]
            assert len(pids) == 2, (line, proc.stderr.read() if proc.poll() is not None else "")
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=15)
            codes = [waitpid_bounded(pid, 10) for pid in pids]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            kill_and_reap(pids)
    assert proc.returncode != 0
    assert None not in codes, f"workers left running: {pids}"
    # Reaped by their master, or by us after it died: either way gone.
    assert all(c in (-signal.SIGINT, 1, REAPED_ELSEWHERE) for c in codes), codes
    assert err.count("Traceback (most recent call last)") <= 1, err
    assert err.count("KeyboardInterrupt") <= 1, err


# ---- join from a handler, close with a handler that never returns --------


def test_join_from_a_handler_waits_for_exits_only(hub, reports):
    """Called from a handler, hub.join() cannot wait for the handlers (they
    run on that thread): it returns True once the workers exited."""
    done = threading.Event()
    out = []

    @hub.on("join")
    def join_here(data, sender):
        out.append(hub.join(20))
        done.set()

    hub.fork(lambda: hub.send_to_master("join"))
    assert done.wait(30)
    assert out == [True]


def test_close_abandons_a_handler_that_never_returns(make_hub, caplog):
    """close(timeout) returns within about timeout + 1 s while a handler
    never returns; the handler is abandoned with a logged warning, and no
    other handler runs after it."""
    hub = make_hub()
    started, release = threading.Event(), threading.Event()
    after = []

    @hub.on("stuck")
    def stuck(data, sender):
        started.set()
        release.wait(60)

    hub.on("after", lambda data, sender: after.append(data))
    hub.send_to_master("stuck")
    hub.send_to_master("after", 1)
    assert started.wait(10)
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="clusterhub"):
            hub.close(timeout=1.0)
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0 + 1.0 + 1.5, elapsed  # timeout + the handler's grace + slack
        assert any("abandoned" in r.getMessage() for r in caplog.records)
        with pytest.raises(HubClosedError):
            hub.send_to_master("after", 2)
    finally:
        release.set()
    assert after == []


CTRL_C_BUSY_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    import clusterhub

    hub = clusterhub.Hub()
    ready = threading.Semaphore(0)
    hub.on("ready", lambda data, sender: ready.release())

    @hub.on("work")
    def work(data, sender):  # a long handler, running when Ctrl-C comes
        print(" ".join(str(w.pid) for w in ws), flush=True)
        time.sleep(20)

    def sleeper():
        hub.send_to_master("ready")
        time.sleep(60)

    with hub:
        ws = [hub.fork(sleeper), hub.fork(sleeper)]
        for _ in ws:
            assert ready.acquire(timeout=10)
        hub.send_to_master("work")
        hub.join()
    """
)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_with_a_busy_handler(tmp_path, presses):
    """Ctrl-C (SIGINT to the process group, once or twice) while a master
    handler runs for 20 s stops the master and its workers within about a
    second, with at most one traceback and no process left."""
    script = tmp_path / "ctrl_c_busy.py"
    script.write_text(CTRL_C_BUSY_SCRIPT)
    with subreaper():
        proc = subprocess.Popen(
            [sys.executable, str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        pids: list[int] = []
        try:
            line = proc.stdout.readline()  # printed by the handler, once it runs
            pids = [int(p) for p in line.split()]
            assert len(pids) == 2, (line, proc.stderr.read() if proc.poll() is not None else "")
            os.killpg(proc.pid, signal.SIGINT)
            if presses == 2:
                try:
                    proc.wait(0.3)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=8)  # the handler alone would take 20 s
            codes = [waitpid_bounded(pid, 10) for pid in pids]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            kill_and_reap(pids)
    assert proc.returncode != 0
    assert None not in codes, f"workers left running: {pids}"
    assert err.count("Traceback (most recent call last)") <= 1, err
