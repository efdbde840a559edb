"""Requests: every request ends exactly once (result, remote error, no
handler, timeout, cancellation, peer death) and leaves no pending entry
behind; handlers may answer later (a future, a coroutine) or wait on requests
of their own; forged and duplicate replies are dropped."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pickle
import signal
import threading
import time

import pytest

import clusterhub
from clusterhub import (
    HubError,
    NoHandlerError,
    NoWorkersError,
    RemoteError,
    WorkerDied,
    protocol,
)

from conftest import MP, join_ok

pytestmark = pytest.mark.timeout(60)


def _serve(hub, handlers, n=1):
    """Fork ``n`` workers that register ``handlers`` (name -> fn) and wait
    until the master says "end"; returns them once all are ready."""
    ready = threading.Semaphore(0)
    hub.on("ready", lambda data, sender: ready.release())

    def work():
        end = threading.Event()
        for name, fn in handlers.items():
            hub.on(name, fn)
        hub.on("end", lambda data, sender: end.set())
        hub.send_to_master("ready")
        assert end.wait(50)

    ws = [hub.fork(work) for _ in range(n)]
    for _ in ws:
        assert ready.acquire(timeout=10)
    return ws


def _end(hub, ws):
    for w in ws:
        if w.is_alive():
            try:
                hub.send_to_worker(w, "end")
            except WorkerDied:
                pass
    for w in ws:
        assert w.join(15)


# ---- the basic directions ------------------------------------------------------------


def test_request_master_from_a_worker_and_from_the_master(hub, reports):
    """request_master answers with the first handler's return value, from a
    worker and in the master itself."""
    second = []
    hub.on("sum", lambda data, sender: data["a"] + data["b"])
    hub.on("sum", lambda data, sender: second.append(data) or "its value is ignored")

    def work():
        reports.put(hub.request_master("sum", {"a": 1, "b": 2}).result(10), len(hub._pending))

    w = hub.fork(work)
    assert reports.get() == (3, 0)
    assert hub.request_master("sum", {"a": 5, "b": 6}).result(10) == 11
    assert len(second) == 2  # every handler of the name runs, in order
    join_ok(w)
    assert len(hub._pending) == 0


def test_request_worker_by_worker_and_id(hub):
    """request_worker asks one worker's handlers, addressed by Worker or id."""
    ws = _serve(hub, {"mult": lambda data, sender: (data * 2, sender)})
    w = ws[0]
    assert hub.request_worker(w, "mult", 21).result(10) == (42, None)
    assert hub.request_worker(w.id, "mult", "ab").result(10) == ("abab", None)
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_request_workers_collects_results_and_errors(hub, event):
    """request_workers gives {id: result or exception}: a value, RemoteError
    for a raising handler, WorkerDied for a worker exiting mid-request and
    TimeoutError for a slow one; the future itself succeeds."""
    slow_go = event()

    def answer(data, sender):
        wid = hub.worker_id
        if wid == 1:
            return "value"
        if wid == 2:
            raise KeyError("no such thing")
        if wid == 3:
            os._exit(5)
        slow_go.wait(20)
        return "late"

    ws = _serve(hub, {"q": answer}, n=4)
    got = []
    fut = hub.request_workers("q", timeout=1.0, callback=lambda e, r: got.append((e, r)))
    res = fut.result(15)
    assert fut.exception() is None
    assert sorted(res) == [1, 2, 3, 4]
    assert res[1] == "value"
    assert isinstance(res[2], RemoteError) and res[2].type_name == "KeyError"
    assert isinstance(res[3], WorkerDied)
    assert isinstance(res[4], TimeoutError)
    assert got == [(None, res)]
    slow_go.set()
    ws[2].join(10)
    assert ws[2].exitcode == 5
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_request_workers_with_no_worker(hub):
    """request_workers with no live worker succeeds with an empty dict."""
    assert hub.request_workers("q").result(5) == {}


def test_request_random_worker(hub):
    """request_random_worker asks one live worker; with none, the future fails
    with NoWorkersError (and the callback gets it)."""
    got = []
    f = hub.request_random_worker("who", callback=lambda e, r: got.append(type(e)))
    assert isinstance(f.exception(5), NoWorkersError)
    assert got == [NoWorkersError]
    ws = _serve(hub, {"who": lambda data, sender: hub.worker_id}, n=2)
    answers = {hub.request_random_worker("who").result(10) for _ in range(30)}
    assert answers <= {1, 2} and answers
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_callback_node_style(hub):
    """callback(error, result) gets (None, result) on success and
    (exception, None) on failure."""
    hub.on("ok", lambda data, sender: data + 1)
    hub.on("bad", lambda data, sender: 1 / 0)
    got = []
    done = threading.Event()

    def cb(err, result):
        got.append((type(err).__name__ if err else None, result))
        if len(got) == 2:
            done.set()

    hub.request_master("ok", 1, callback=cb)
    hub.request_master("bad", callback=cb)
    assert done.wait(10)
    assert got == [(None, 2), ("RemoteError", None)]
    assert len(hub._pending) == 0


def test_await_a_request_directly(hub):
    """A request's future can be awaited in a coroutine without any setup."""
    ws = _serve(hub, {"echo": lambda data, sender: data})
    hub.on("local", lambda data, sender: "master")

    async def main():
        a = await hub.request_worker(ws[0], "echo", "hi")
        b = await hub.request_master("local")
        try:
            await hub.request_worker(ws[0], "missing")
        except NoHandlerError as e:
            c = type(e).__name__
        return a, b, c

    assert asyncio.run(main()) == ("hi", "master", "NoHandlerError")
    _end(hub, ws)
    assert len(hub._pending) == 0


# ---- handler results ---------------------------------------------------------------------


def test_handler_returning_a_future_or_awaitable(hub, reports):
    """A handler may return a concurrent Future or an awaitable (coroutine)
    that answers the request later."""
    pending_fut = concurrent.futures.Future()

    def later(data, sender):
        return pending_fut

    async def coro(data, sender):
        await asyncio.sleep(0.01)
        return data * 3

    hub.on("later", later)
    hub.on("coro", coro)

    def work():
        f = hub.request_master("later")
        reports.put("asked")
        reports.put(f.result(10), hub.request_master("coro", 5).result(10))

    w = hub.fork(work)
    assert reports.get() == ("asked",)
    hub.request_master("sync").exception(5)
    pending_fut.set_result("answered later")
    assert reports.get() == ("answered later", 15)
    join_ok(w)
    # In a worker too, an async handler answers.
    ws = _serve(hub, {"wcoro": coro})
    assert hub.request_worker(ws[0], "wcoro", 2).result(10) == 6
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_handler_future_failing_gives_remote_error(hub):
    """A returned future or coroutine that fails answers with RemoteError."""
    f = concurrent.futures.Future()
    hub.on("f", lambda data, sender: f)

    async def bad(data, sender):
        raise LookupError("async failure")

    hub.on("c", bad)
    r = hub.request_master("f")
    f.set_exception(ValueError("future failure"))
    e1 = r.exception(10)
    e2 = hub.request_master("c").exception(10)
    assert isinstance(e1, RemoteError) and e1.type_name == "ValueError"
    assert isinstance(e2, RemoteError) and e2.type_name == "LookupError"
    assert str(e2) == "LookupError: async failure"
    assert len(hub._pending) == 0


class CustomFailure(Exception):
    pass


def test_remote_error_describes_the_exception(hub):
    """A raising handler fails the request with RemoteError carrying the
    type name, the message and the remote traceback."""

    def failing_handler(data, sender):
        raise CustomFailure(f"bad input {data}")

    ws = _serve(hub, {"fail": failing_handler})
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
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_no_handler_fails_promptly(hub, reports):
    """A request nobody handles fails at once with NoHandlerError (a
    RemoteError), in the master, in a worker and towards a worker."""
    ws = _serve(hub, {})

    def work():
        t0 = time.monotonic()
        e = hub.request_master("nobody").exception(10)
        reports.put(type(e).__name__, isinstance(e, RemoteError), time.monotonic() - t0)

    w = hub.fork(work)
    name, is_remote, took = reports.get()
    assert (name, is_remote) == ("NoHandlerError", True) and took < 5
    for fut in (hub.request_master("nobody"), hub.request_worker(ws[0], "nobody")):
        t0 = time.monotonic()
        assert isinstance(fut.exception(10), NoHandlerError)
        assert time.monotonic() - t0 < 5
    join_ok(w)
    _end(hub, ws)
    assert len(hub._pending) == 0


# ---- timeouts, cancellation ---------------------------------------------------------------


def test_timeout_then_late_answer_dropped(hub, event):
    """timeout= fails a request with the builtin TimeoutError when no answer
    came in time; the late answer is dropped and the channel keeps working."""
    go = event()

    def slow(data, sender):
        go.wait(20)
        return "late"

    ws = _serve(hub, {"slow": slow, "fast": lambda data, sender: "fast"})
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
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_timeout_of_a_local_request(hub):
    """A master's request to its own slow handler times out too."""
    gate = threading.Event()
    hub.on("slow", lambda data, sender: gate.wait(10))
    f = hub.request_master("slow", timeout=0.2)
    assert isinstance(f.exception(10), TimeoutError)
    gate.set()
    assert hub.request_master("slow").result(10) is True
    assert len(hub._pending) == 0


def test_timeout_fires_while_the_dispatcher_is_busy(hub, event):
    """A request's timeout fires on time even while a handler keeps the
    hub's dispatching thread busy, for callbacks and awaiters alike."""
    go = event()
    gate = threading.Event()
    busy = threading.Event()
    hub.on("block", lambda data, sender: (busy.set(), gate.wait(20)))
    ws = _serve(hub, {"slow": lambda data, sender: go.wait(20)})
    hub.send_to_master("block")
    assert busy.wait(10)
    got = []
    fired = threading.Event()
    t0 = time.monotonic()
    hub.request_worker(ws[0], "slow", timeout=0.3,
                       callback=lambda e, r: (got.append(type(e)), fired.set()))
    assert fired.wait(10)
    assert time.monotonic() - t0 < 3
    assert got == [TimeoutError]
    gate.set()
    go.set()
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_future_cancel_ends_the_request(hub, event):
    """future.cancel() ends a pending request; the late reply is dropped."""
    go = event()

    def slow(data, sender):
        go.wait(20)
        return "late"

    ws = _serve(hub, {"slow": slow, "fast": lambda data, sender: "fast"})
    got = []
    f = hub.request_worker(ws[0], "slow", callback=lambda e, r: got.append(type(e).__name__))
    assert f.cancel()
    assert f.cancelled()
    assert len(hub._pending) == 0
    assert got == ["CancelledError"]
    go.set()
    assert hub.request_worker(ws[0], "fast").result(10) == "fast"
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_cancelling_the_awaiting_task_ends_the_request(hub, event):
    """Cancelling an asyncio task awaiting a request cancels the request."""
    go = event()

    def slow(data, sender):
        go.wait(20)
        return "late"

    ws = _serve(hub, {"slow": slow, "fast": lambda data, sender: "fast"})
    box = []

    async def main():
        f = hub.request_worker(ws[0], "slow")
        box.append(f)
        task = asyncio.ensure_future(f)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The cancellation reaches the request from the loop's callbacks.
        for _ in range(100):
            if f.cancelled():
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert box[0].cancelled()
    assert len(hub._pending) == 0
    go.set()
    assert hub.request_worker(ws[0], "fast").result(10) == "fast"
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_cancel_request_workers(hub, event):
    """Cancelling request_workers' future cancels every per-worker request."""
    go = event()
    ws = _serve(hub, {"slow": lambda data, sender: go.wait(20)}, n=2)
    f = hub.request_workers("slow")
    assert f.cancel()
    assert len(hub._pending) == 0
    go.set()
    _end(hub, ws)


# ---- peer death ----------------------------------------------------------------------------


def test_worker_death_fails_its_pending_requests(hub, reports):
    """A worker dying with requests pending fails them with WorkerDied (a
    PeerDied), and nothing is left pending."""

    def die(data, sender):
        reports.put("dying")
        os.kill(os.getpid(), signal.SIGKILL)

    ws = _serve(hub, {"die": die, "hang": lambda data, sender: threading.Event().wait()})
    f1 = hub.request_worker(ws[0], "hang")
    f2 = hub.request_worker(ws[0], "die")  # queued behind "hang": never answered
    w = ws[0]
    w.kill()
    for f in (f1, f2):
        err = f.exception(10)
        assert isinstance(err, WorkerDied) and isinstance(err, clusterhub.PeerDied)
    join_ok(w, -9)
    assert len(hub._pending) == 0
    with pytest.raises(WorkerDied):
        hub.request_worker(w, "x")
    with pytest.raises(WorkerDied):
        hub.request_worker(w.id, "x")


def test_worker_exit_during_its_handler(hub):
    """A worker that exits inside the handler of a request fails it with
    WorkerDied, reported on on_exit too."""
    exits = []
    hub.on_exit(lambda w: exits.append(w.exitcode))
    ws = _serve(hub, {"exit": lambda data, sender: os._exit(3)})
    err = hub.request_worker(ws[0], "exit").exception(10)
    assert isinstance(err, WorkerDied)
    join_ok(ws[0], 3)
    hub.request_master("sync").exception(5)
    assert exits == [3]
    assert len(hub._pending) == 0


def test_reply_to_a_worker_that_exited_is_dropped(hub, caplog):
    """A worker that exits before its request is answered (the master's reply
    meets a closed socket) never disturbs the master."""
    later = concurrent.futures.Future()
    asked = threading.Event()
    hub.on("slow", lambda data, sender: (asked.set(), later)[1])
    w = hub.fork(lambda: (hub.request_master("slow"), os._exit(0)))
    assert asked.wait(10)
    join_ok(w)
    later.set_result("too late")  # the reply meets the closed channel
    assert hub.request_master("nothing").exception(10) is not None  # still serving
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    join_ok(w)


# ---- handlers that wait ---------------------------------------------------------------------


def test_handler_waiting_on_its_own_request(hub, reports):
    """A handler may make a request and wait for it: replies keep arriving
    while it waits, and messages that arrive meanwhile run after it returns."""
    order = []

    def master_ask(data, sender):
        # In the master, while handling the worker's request, ask it back.
        return hub.request_worker(sender, "inner", data).result(10) + 1

    hub.on("outer", master_ask)
    hub.on("slow-reply", lambda data, sender: (hub.send_to_worker(sender, "late-msg"), "ok")[1])

    def work():
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
        hub.send_to_master("ready")
        end = threading.Event()
        hub.on("end", lambda data, sender: end.set())
        assert end.wait(20)
        reports.put(got, order)

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(work)
    assert ready.wait(10)
    assert hub.request_worker(w, "waits").result(10) == "done"
    hub.send_to_worker(w, "end")
    got, order = reports.get()
    assert got == 41
    assert order == ["start", ("end", "ok"), "late-msg"]
    join_ok(w)
    assert len(hub._pending) == 0


def test_waiting_on_own_handlers_raises_at_once(hub):
    """A master handler waiting on a request to the master's own handlers
    raises at once instead of deadlocking; the inner request still ends."""
    seen = []

    def outer(data, sender):
        t0 = time.monotonic()
        inner = hub.request_master("inner")
        try:
            inner.result(5)
            seen.append("no error")
        except HubError as e:
            seen.append((type(e).__name__, time.monotonic() - t0 < 1))
        return inner

    hub.on("outer", outer)
    hub.on("inner", lambda data, sender: "inner answer")
    assert hub.request_master("outer").result(10) == "inner answer"
    assert seen == [("HubError", True)]
    assert len(hub._pending) == 0


def test_callback_that_waits_on_another_request(hub, reports):
    """A request callback (run by the hub's reading thread) may itself wait
    for another request's result without deadlocking or garbling frames."""
    hub.on("a", lambda data, sender: (hub.send_to_worker(sender, "m", 1), "A")[1])
    hub.on("b", lambda data, sender: "B")

    def work():
        got = []
        done = threading.Event()
        msgs = []
        hub.on("m", lambda data, sender: msgs.append(data))

        def cb(err, result):
            got.append((result, hub.request_master("b").result(5)))
            done.set()

        hub.request_master("a", callback=cb)
        assert done.wait(10)
        hub.request_master("b").result(5)
        reports.put(got, msgs)

    w = hub.fork(work)
    assert reports.get() == ([("A", "B")], [1])
    join_ok(w)


# ---- forged and duplicate replies --------------------------------------------------------------


def _forge(hub, rids):
    """In a worker: send replies for ``rids`` that nobody asked this worker."""
    for rid in rids:
        hub._master.send_frame(protocol.encode(protocol.RES, 0, rid, b"", pickle.dumps("forged")))
        hub._master.send_frame(protocol.encode(
            protocol.ERR, 0, rid, b"", protocol.encode_error("X", "forged", "", False)))


def test_duplicate_and_unknown_replies_are_dropped(hub):
    """Replies to requests nobody waits for (a duplicate of an answered one,
    an unknown id) are dropped without harm to the channel or the worker."""
    forged = threading.Event()
    hub.on("forged", lambda data, sender: forged.set())

    def forge(data, sender):
        _forge(hub, data)
        hub.send_to_master("forged")  # arrives after the forged replies

    ws = _serve(hub, {"q": lambda data, sender: "genuine", "forge": forge,
                      "ping": lambda data, sender: "pong"})
    assert hub.request_worker(ws[0], "q").result(10) == "genuine"  # request id 1
    hub.send_to_worker(ws[0], "forge", [1, 10**9])
    assert forged.wait(10)
    assert hub.request_worker(ws[0], "ping").result(10) == "pong"
    assert ws[0].is_alive()
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_reply_for_another_workers_request_is_dropped(hub, event):
    """A worker cannot answer a request made to another worker: replies are
    matched by request id and by the peer that was asked."""
    go = event()

    def q(data, sender):
        if hub.worker_id == 1:
            go.wait(20)
            return "honest"
        _forge(hub, [1])  # worker 1's request
        return "forger"

    ws = _serve(hub, {"q": q}, n=2)
    f1 = hub.request_worker(ws[0], "q")  # request id 1
    assert hub.request_worker(ws[1], "q").result(10) == "forger"
    assert not f1.done()
    go.set()
    assert f1.result(10) == "honest"
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_many_concurrent_requests_from_threads(hub):
    """Requests made from several threads at once all get their own answers."""
    ws = _serve(hub, {"echo": lambda data, sender: data}, n=2)
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
    _end(hub, ws)
    assert len(hub._pending) == 0


def test_requests_both_ways_under_load(hub):
    """Workers and master threads all requesting each other at once (readers
    handing channels over all the time) never leave a request unanswered."""
    n_workers, seconds, bound = 8, 4.0, 15.0
    stop = MP.Event()  # workers: stop once the master threads are done
    master_stop = threading.Event()
    hub.on("add", lambda data, sender: data + 1)
    hub.on("tick", lambda data, sender: None)

    def work():
        hub.on("double", lambda data, sender: data * 2)
        hub.send_to_master("ready")
        i = 0
        while not stop.is_set():
            assert hub.request_master("add", i).result(timeout=bound) == i + 1
            hub.send_to_master("tick", i)
            i += 1

    ready = threading.Semaphore(0)
    hub.on("ready", lambda data, sender: ready.release())
    ws = [hub.fork(work) for _ in range(n_workers)]
    for _ in ws:
        assert ready.acquire(timeout=10)
    errors = []
    counts = [0, 0]

    def master(k):
        try:
            i = 0
            while not master_stop.is_set():
                if i % 5:
                    w = ws[i % n_workers]
                    assert hub.request_worker(w, "double", i).result(timeout=bound) == 2 * i
                else:
                    res = hub.request_workers("double", 3, timeout=bound).result(timeout=bound)
                    assert set(res.values()) == {6}, res
                counts[k] += 1
                i += 1
        except BaseException as e:  # reported below
            errors.append(repr(e))
            master_stop.set()

    threads = [threading.Thread(target=master, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    master_stop.wait(seconds)  # the length of the run, not a synchronisation
    master_stop.set()
    for t in threads:
        t.join(bound + 5)
    stop.set()
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert min(counts) > 10
    for w in ws:
        join_ok(w, timeout=bound + 5)
    assert len(hub._pending) == 0
