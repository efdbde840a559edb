"""Requests with forked workers: every request ends exactly once (result,
remote error, timeout, cancellation, peer death) and leaves no pending entry
behind; handlers may answer later (a future, a coroutine) or wait on requests
of their own; forged and duplicate replies are dropped.  What every transport
must do with requests (both ways, request_workers, RemoteError,
NoHandlerError, timeouts, WorkerDied) is in tests/conformance/test_requests.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pickle
import threading
import time

import pytest

from clusterhub import (
    HubError,
    NoHandlerError,
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


# ---- the master's own requests, callbacks, awaiting --------------------------------------


def test_request_workers_with_no_worker(hub):
    """request_workers with no live worker succeeds with an empty dict."""
    assert hub.request_workers("q").result(5) == {}


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


# ---- timeouts, cancellation ---------------------------------------------------------------


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
