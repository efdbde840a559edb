"""Requests on every transport: both ways with results, request_workers and a
random worker, RemoteError and NoHandlerError, timeouts, WorkerDied when the
asked worker dies, handlers that ask back, and many requests at once."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import clusterhub
from clusterhub import (
    MessageTooLarge,
    NoHandlerError,
    NoWorkersError,
    RemoteError,
    WorkerDied,
)

from .cluster import ready

pytestmark = pytest.mark.timeout(60)

_OWN_DIR = os.path.dirname(clusterhub.__file__)


# ---- the basic directions ------------------------------------------------------------


def test_request_master_from_a_worker_and_from_the_master(cluster, reports):
    """request_master answers with the first handler's return value, from a
    worker and in the master itself."""
    hub = cluster.hub
    second = []
    hub.on("sum", lambda data, sender: data["a"] + data["b"])
    hub.on("sum", lambda data, sender: second.append(data) or "its value is ignored")

    def work(hub):
        reports.put(hub.request_master("sum", {"a": 1, "b": 2}).result(10), len(hub._pending))

    w = cluster.start(work)
    assert reports.get() == (3, 0)
    assert hub.request_master("sum", {"a": 5, "b": 6}).result(10) == 11
    assert len(second) == 2  # every handler of the name runs, in order
    cluster.join(w)
    assert len(hub._pending) == 0


def test_request_worker_by_worker_and_id(cluster):
    """request_worker asks one worker's handlers, addressed by Worker or id."""
    hub = cluster.hub
    ws = cluster.serve({"mult": lambda hub, data, sender: (data * 2, sender)})
    w = ws[0]
    assert hub.request_worker(w, "mult", 21).result(10) == (42, None)
    assert hub.request_worker(w.id, "mult", "ab").result(10) == ("abab", None)
    cluster.end(ws)
    assert len(hub._pending) == 0


def test_request_workers_collects_results_and_errors(cluster, event):
    """request_workers gives {id: result or exception}: a value, RemoteError
    for a raising handler, WorkerDied for a worker exiting mid-request and
    TimeoutError for a slow one; the future itself succeeds."""
    hub = cluster.hub
    slow_go = event()

    def answer(role, data, sender):
        if role == "value":
            return "value"
        if role == "raise":
            raise KeyError("no such thing")
        if role == "exit":
            os._exit(5)
        slow_go.wait(20)
        return "late"

    ws = [cluster.serve({"q": lambda hub, data, sender, role=role: answer(role, data, sender)})[0]
          for role in ("value", "raise", "exit", "slow")]
    got = []
    fut = hub.request_workers("q", timeout=1.0, callback=lambda e, r: got.append((e, r)))
    res = fut.result(15)
    assert fut.exception() is None
    assert sorted(res) == sorted(w.id for w in ws)
    assert res[ws[0].id] == "value"
    assert isinstance(res[ws[1].id], RemoteError) and res[ws[1].id].type_name == "KeyError"
    assert isinstance(res[ws[2].id], WorkerDied)
    assert isinstance(res[ws[3].id], TimeoutError)
    assert got == [(None, res)]
    slow_go.set()
    cluster.join(ws[2], 5, timeout=10)
    cluster.end(ws)
    assert len(hub._pending) == 0


def test_request_random_worker(cluster):
    """request_random_worker asks one live worker; with none, the future fails
    with NoWorkersError (and the callback gets it)."""
    hub = cluster.hub
    got = []
    f = hub.request_random_worker("who", callback=lambda e, r: got.append(type(e)))
    assert isinstance(f.exception(5), NoWorkersError)
    assert got == [NoWorkersError]
    ws = cluster.serve({"who": lambda hub, data, sender: hub.worker_id}, n=2)
    answers = {hub.request_random_worker("who").result(10) for _ in range(30)}
    assert answers <= {w.id for w in ws} and answers
    cluster.end(ws)
    assert len(hub._pending) == 0


# ---- remote errors, no handler -------------------------------------------------------------


class CustomFailure(Exception):
    pass


def test_remote_error_describes_the_exception(cluster):
    """A raising handler fails the request with RemoteError carrying the
    type name, the message and the remote traceback."""
    hub = cluster.hub

    def failing_handler(data, sender):
        raise CustomFailure(f"bad input {data}")

    ws = cluster.serve({"fail": lambda hub, data, sender: failing_handler(data, sender)})
    hub.on("fail", failing_handler)
    for fut in (hub.request_worker(ws[0], "fail", 7), hub.request_master("fail", 7)):
        err = fut.exception(10)
        assert type(err) is RemoteError
        assert err.type_name.endswith("CustomFailure")
        assert "bad input 7" in str(err)
        assert str(err).startswith(err.type_name)
        assert "failing_handler" in err.remote_traceback
        assert "Traceback" in err.remote_traceback
        with pytest.raises(RemoteError):
            fut.result()
    cluster.end(ws)
    assert len(hub._pending) == 0


def test_remote_error_is_one_line_and_keeps_its_traceback(cluster):
    """A RemoteError's repr and str are one line (type and message); its
    remote traceback shows the handler's frames but none of clusterhub's own,
    and is chained as __cause__ so an uncaught error prints it."""
    hub = cluster.hub

    @hub.on("fail")
    def failing_handler(data, sender):
        raise KeyError("no such invoice")

    def work(hub):
        try:
            hub.request_master("fail").result(10)
        except RemoteError as e:
            hub.send_to_master("seen", (repr(e), str(e), e.type_name, e.remote_traceback,
                                        type(e.__cause__).__name__))

    got = []
    done = threading.Event()
    hub.on("seen", lambda data, sender: (got.append(data), done.set()))
    w = cluster.start(work)
    assert done.wait(20)
    cluster.join(w)
    r, s, type_name, tb, cause = got[0]
    assert r == "RemoteError(\"KeyError: 'no such invoice'\")"
    assert s == "KeyError: 'no such invoice'" and "\n" not in r + s
    assert type_name == "KeyError"
    assert "failing_handler" in tb and "Traceback" in tb
    assert _OWN_DIR not in tb, tb
    assert cause == "RemoteTraceback"


def test_remote_error_from_a_worker_names_public_types(cluster, event):
    """A clusterhub error raised by a worker's handler crosses as
    clusterhub.X (not clusterhub.errors.X), without clusterhub's frames."""
    hub = cluster.hub
    go = event()

    def work(hub):
        @hub.on("big")
        def big(data, sender):
            raise MessageTooLarge("over the limit")

        ready(hub)
        go.wait()

    w = cluster.start(work, ready=True)
    with pytest.raises(RemoteError) as info:
        hub.request_worker(w, "big").result(10)
    err = info.value
    assert err.type_name == "clusterhub.MessageTooLarge"
    assert "clusterhub.errors" not in err.remote_traceback
    assert _OWN_DIR not in err.remote_traceback
    go.set()
    cluster.join(w)


def test_no_handler_fails_promptly(cluster, reports):
    """A request nobody handles fails at once with NoHandlerError (a
    RemoteError), in the master, in a worker and towards a worker."""
    hub = cluster.hub
    ws = cluster.serve({})

    def work(hub):
        t0 = time.monotonic()
        e = hub.request_master("nobody").exception(10)
        reports.put(type(e).__name__, isinstance(e, RemoteError), time.monotonic() - t0)

    w = cluster.start(work)
    name, is_remote, took = reports.get()
    assert (name, is_remote) == ("NoHandlerError", True) and took < 5
    for fut in (hub.request_master("nobody"), hub.request_worker(ws[0], "nobody")):
        t0 = time.monotonic()
        assert isinstance(fut.exception(10), NoHandlerError)
        assert time.monotonic() - t0 < 5
    cluster.join(w)
    cluster.end(ws)
    assert len(hub._pending) == 0


# ---- timeouts -------------------------------------------------------------------------------


def test_timeout_then_late_answer_dropped(cluster, event):
    """timeout= fails a request with the builtin TimeoutError when no answer
    came in time; the late answer is dropped and the channel keeps working."""
    hub = cluster.hub
    go = event()

    def slow(hub, data, sender):
        go.wait(20)
        return "late"

    ws = cluster.serve({"slow": slow, "fast": lambda hub, data, sender: "fast"})
    t0 = time.monotonic()
    f = hub.request_worker(ws[0], "slow", timeout=0.3)
    with pytest.raises(TimeoutError):
        f.result(10)
    assert 0.25 <= time.monotonic() - t0 < 5
    assert type(f.exception()) is TimeoutError or isinstance(f.exception(), TimeoutError)
    assert len(hub._pending) == 0
    go.set()
    assert hub.request_worker(ws[0], "fast").result(10) == "fast"  # after the late reply
    assert f.exception() is not None
    cluster.end(ws)
    assert len(hub._pending) == 0


def test_request_master_times_out_in_a_worker(cluster, reports):
    """A worker's request to the master fails with TimeoutError when no
    answer came in time; the master's late answer is dropped and the worker's
    next request is answered, leaving nothing pending."""
    hub = cluster.hub
    gate = threading.Event()
    hub.on("slow", lambda data, sender: (gate.wait(20), "late")[1])
    hub.on("fast", lambda data, sender: "fast")

    def work(hub):
        t0 = time.monotonic()
        err = hub.request_master("slow", timeout=0.3).exception(10)
        reports.put(type(err).__name__, 0.25 <= time.monotonic() - t0 < 5)
        # Answered after the late answer to "slow", which the worker drops.
        reports.put(hub.request_master("fast").result(10), len(hub._pending))

    w = cluster.start(work)
    assert reports.get() == ("TimeoutError", True)
    gate.set()
    assert reports.get(20) == ("fast", 0)
    cluster.join(w)
    assert len(hub._pending) == 0


# ---- peer death ----------------------------------------------------------------------------


def test_worker_death_fails_its_pending_requests(cluster, reports):
    """A worker dying with requests pending fails them with WorkerDied (a
    PeerDied), and nothing is left pending."""
    hub = cluster.hub

    def die(hub, data, sender):
        reports.put("dying")
        os.kill(os.getpid(), signal.SIGKILL)

    ws = cluster.serve({"die": die, "hang": lambda hub, data, sender: threading.Event().wait()})
    f1 = hub.request_worker(ws[0], "hang")
    f2 = hub.request_worker(ws[0], "die")  # queued behind "hang": never answered
    w = ws[0]
    cluster.kill(w)
    for f in (f1, f2):
        err = f.exception(10)
        assert isinstance(err, WorkerDied) and isinstance(err, clusterhub.PeerDied)
    cluster.join(w, -signal.SIGKILL)
    assert len(hub._pending) == 0
    with pytest.raises(WorkerDied):
        hub.request_worker(w, "x")
    with pytest.raises(WorkerDied):
        hub.request_worker(w.id, "x")


# ---- handlers that ask back, many at once -------------------------------------------------


def test_handler_waiting_on_its_own_request(cluster, reports):
    """A handler may make a request and wait for it: replies keep arriving
    while it waits, and messages that arrive meanwhile run after it returns."""
    hub = cluster.hub

    def master_ask(data, sender):
        # In the master, while handling the worker's request, ask it back.
        return hub.request_worker(sender, "inner", data).result(10) + 1

    hub.on("outer", master_ask)
    hub.on("slow-reply", lambda data, sender: (hub.send_to_worker(sender, "late-msg"), "ok")[1])

    def work(hub):
        order = []

        def inner(data, sender):
            return data * 10

        def waits(data, sender):
            order.append("start")
            r = hub.request_master("slow-reply").result(10)
            order.append(("end", r))
            return "done"

        hub.on("inner", inner)
        hub.on("waits", waits)
        hub.on("late-msg", lambda data, sender: order.append("late-msg"))
        got = hub.request_master("outer", 4).result(10)
        end = threading.Event()
        hub.on("end", lambda data, sender: end.set())  # (before ready: "end" may come at once after)
        ready(hub)
        assert end.wait(20)
        reports.put(got, order)

    w = cluster.start(work, ready=True)
    assert hub.request_worker(w, "waits").result(10) == "done"
    hub.send_to_worker(w, "end")
    got, order = reports.get()
    assert got == 41
    assert order == ["start", ("end", "ok"), "late-msg"]
    cluster.join(w)
    assert len(hub._pending) == 0


def test_many_concurrent_requests_from_threads(cluster):
    """Requests made from several threads at once all get their own answers."""
    hub = cluster.hub
    ws = cluster.serve({"echo": lambda hub, data, sender: data}, n=2)
    errors = []

    def client(k):
        try:
            for i in range(200):
                w = ws[i % 2]
                assert hub.request_worker(w, "echo", (k, i)).result(10) == (k, i)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    cluster.end(ws)
    assert len(hub._pending) == 0


def test_many_concurrent_requests_from_a_workers_threads(cluster, reports):
    """Requests made to the master from several threads of a worker at once
    all get their own answers, and leave nothing pending in the worker."""
    hub = cluster.hub
    hub.on("echo", lambda data, sender: data)

    def work(hub):
        errors = []

        def client(k):
            try:
                for i in range(200):
                    assert hub.request_master("echo", (k, i)).result(10) == (k, i)
            except BaseException as e:  # reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        reports.put(sum(t.is_alive() for t in threads), errors, len(hub._pending))

    w = cluster.start(work)
    assert reports.get(40) == (0, [], 0)
    cluster.join(w)
    assert len(hub._pending) == 0
