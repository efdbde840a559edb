"""Plain messages with forked workers: handlers (on/off/once, inherited
through fork), the master's messages to itself, bursts, a handler's
exception, the data serializers, bounded queues and send timeouts, and Worker
handles sent as data.  What every transport must do with plain messages (both
ways, order, broadcasts) is in tests/conformance/test_messages.py."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import time

import pytest

import clusterhub
from clusterhub import WorkerDied

from conftest import MP, collector, join_ok

MP_VALUE = MP.Value

pytestmark = pytest.mark.timeout(60)


# ---- on / off / once ---------------------------------------------------------


def test_on_off_once_in_the_master(hub):
    """on (decorator and plain) adds handlers run in registration order, off
    removes one or all, once runs a single time."""
    calls = []

    @hub.on("m")
    def first(data, sender):
        calls.append(("first", data))

    def second(data, sender):
        calls.append(("second", data))

    assert hub.on("m", second) is second
    hub.once("m", lambda data, sender: calls.append(("once", data)))

    @hub.once("m")
    def once_decorated(data, sender):
        calls.append(("once-dec", data))

    sync = lambda: hub.request_master("sync").exception(10)  # noqa: E731 - all before it ran
    hub.send_to_master("m", 1)
    hub.send_to_master("m", 2)
    sync()
    hub.off("m", first)
    hub.send_to_master("m", 3)
    sync()
    hub.off("m")
    hub.send_to_master("m", 4)
    sync()
    assert calls == [
        ("first", 1), ("second", 1), ("once", 1), ("once-dec", 1),
        ("first", 2), ("second", 2),
        ("second", 3),
    ]


def test_once_and_off_in_a_worker(hub, reports):
    """A worker's own on/once/off behave as in the master."""

    def work():
        calls = []
        done = threading.Event()
        hub.once("m", lambda data, sender: calls.append(("once", data)))
        hub.on("m", lambda data, sender: calls.append(("on", data)))
        hub.on("end", lambda data, sender: done.set())
        hub.send_to_master("ready")
        assert done.wait(10)
        reports.put(calls)

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(work)
    assert ready.wait(10)
    for i in range(3):
        hub.send_to_worker(w, "m", i)
    hub.send_to_worker(w, "end")
    assert reports.get() == ([("once", 0), ("on", 0), ("on", 1), ("on", 2)],)
    join_ok(w)


# ---- ordering and the master's own messages ----------------------------------------


def test_burst_read_in_one_go_is_handled_in_full(hub, reports):
    """A burst of thousands of small messages that the master reads in one
    go (it was busy meanwhile) is handled in full, including the request at
    its end: nothing stays stranded in the receive buffer."""
    got = []
    gate = threading.Event()
    busy = threading.Event()
    hub.on("block", lambda data, sender: (busy.set(), gate.wait(20)))
    hub.on("m", lambda data, sender: got.append(data))
    hub.on("count", lambda data, sender: len(got))
    n = 5000

    def work():
        for i in range(n):
            hub.send_to_master("m", i)
        reports.put("sent")
        reports.put(hub.request_master("count").result(10))

    hub.send_to_master("block")
    assert busy.wait(10)
    w = hub.fork(work)
    assert reports.get() == ("sent",)
    hub.request_master("sync")  # queued behind "block": the frames pile up meanwhile
    gate.set()
    assert reports.get(15) == (n,)
    assert got == list(range(n))
    join_ok(w)


def test_master_self_messages_in_call_order_without_pickling(hub):
    """In the master, send_to_master and request_master reach its own handlers
    through the dispatcher, in call order, with the very objects (no pickling)."""
    unpicklable = threading.Lock()
    order = []
    hub.on("msg", lambda data, sender: order.append(("msg", data)))
    hub.on("req", lambda data, sender: (order.append(("req", data)), data)[1])
    hub.send_to_master("msg", unpicklable)
    f1 = hub.request_master("req", unpicklable)
    hub.send_to_master("msg", 2)
    f2 = hub.request_master("req", 3)
    assert f1.result(10) is unpicklable
    assert f2.result(10) == 3
    assert [kind for kind, _ in order] == ["msg", "req", "msg", "req"]
    assert order[0][1] is unpicklable and order[1][1] is unpicklable
    assert len(hub._pending) == 0


def test_master_self_handlers_run_on_the_dispatcher_thread(hub):
    """The master's own messages are dispatched in the background, not inside
    the send_to_master call."""
    where = []
    done = threading.Event()
    hub.on("m", lambda data, sender: (where.append(threading.get_ident()), done.set()))
    hub.send_to_master("m")
    assert done.wait(10)
    assert where[0] != threading.get_ident()


def test_plain_message_without_handler_is_dropped(hub, caplog):
    """A plain message nobody handles is dropped (logged at debug level) and
    the receiver keeps working."""
    caplog.set_level(logging.DEBUG, logger="clusterhub")
    got, done = collector(hub, "known", 1)
    w = hub.fork(lambda: (hub.send_to_master("unknown", 1), hub.send_to_master("known", 2)))
    assert done.wait(10)
    assert [d for d, _ in got] == [2]
    assert any("unknown" in r.getMessage() and r.levelno == logging.DEBUG for r in caplog.records)
    join_ok(w)


def test_a_message_named_error_is_not_special(hub, reports):
    """A message named "error" is an ordinary message in both directions."""
    got, done = collector(hub, "error", 1)

    def work():
        ev = threading.Event()
        hub.on("error", lambda data, sender: (reports.put("worker", data), ev.set()))
        hub.send_to_master("error", "to master")
        assert ev.wait(10)

    w = hub.fork(work)
    assert done.wait(10)
    hub.send_to_worker(w, "error", "to worker")
    assert reports.get() == ("worker", "to worker")
    assert got[0][0] == "to master"
    join_ok(w)


def test_handler_exception_is_logged_and_dispatch_goes_on(hub, caplog, reports):
    """An exception in a plain-message handler is logged, the other handlers
    of the message still run, and later messages are handled (master and
    worker alike)."""
    after = []
    done = threading.Event()

    def bad(data, sender):
        raise RuntimeError("handler failure in the master")

    hub.on("m", bad)
    hub.on("m", lambda data, sender: (after.append(data), done.set() if data == 2 else None))
    hub.send_to_master("m", 1)
    hub.send_to_master("m", 2)
    assert done.wait(10)
    assert after == [1, 2]
    records = [r for r in caplog.records if r.name == "clusterhub" and r.exc_info]
    assert len(records) == 2
    assert all("handler failure in the master" in str(r.exc_info[1]) for r in records)

    def work():
        def wbad(data, sender):
            raise RuntimeError("handler failure in the worker")

        hub.on("w", wbad)
        hub.on("ping", lambda data, sender: "pong")
        hub.send_to_master("ready")
        threading.Event().wait(30)

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(work)
    assert ready.wait(10)
    hub.send_to_worker(w, "w")
    assert hub.request_worker(w, "ping").result(10) == "pong"
    w.terminate()
    join_ok(w, -15)


# ---- inherited handlers ---------------------------------------------------------------


def test_handlers_registered_before_fork_are_inherited(hub, reports):
    """A handler registered before fork() sees a message sent right after
    fork(), before the worker's target could have done anything."""
    hub.on("early", lambda data, sender: reports.put("early", data, hub.worker_id))
    w = hub.fork(lambda: threading.Event().wait(30))
    hub.send_to_worker(w, "early", 42)
    assert reports.get() == ("early", 42, w.id)
    w.kill()
    join_ok(w, -9)


def test_worker_changes_do_not_affect_the_master(hub, reports):
    """A worker removing an inherited handler leaves the master's in place."""
    got, done = collector(hub, "x", 1)

    def work():
        hub.off("x")
        hub.send_to_master("x", 1)

    w = hub.fork(work)
    assert done.wait(10)
    join_ok(w)


def test_broadcasts_follow_the_workers_as_they_come_and_go(hub, reports):
    """A broadcast goes to the workers live at the time (one C call posts it
    to all: workers.Processes.fanout): a worker forked after earlier
    broadcasts gets the later ones, and after a worker exited the others
    still get every broadcast."""
    hub.on("b", lambda data, sender: reports.put("b", hub.worker_id, data))

    def got(n):
        return sorted(reports.get()[1:] for _ in range(n))

    first = hub.fork(lambda: threading.Event().wait(30))
    hub.send_to_workers("b", 1)
    assert got(1) == [(first.id, 1)]
    second = hub.fork(lambda: threading.Event().wait(30))
    hub.send_to_workers("b", 2)
    assert got(2) == [(first.id, 2), (second.id, 2)]
    first.kill()
    join_ok(first, -9)
    hub.send_to_workers("b", 3)
    assert got(1) == [(second.id, 3)]
    third = hub.fork(lambda: threading.Event().wait(30))
    hub.send_to_workers("b", 4)
    assert got(2) == [(second.id, 4), (third.id, 4)]
    for w in (second, third):
        w.kill()
        join_ok(w, -9)


# ---- a worker exiting meanwhile -------------------------------------------------------


def test_sending_while_a_worker_exits_never_crashes(hub):
    """A master sending in a loop to a worker that exits meanwhile gets only
    successes and then WorkerDied, never another error."""
    w = hub.fork(lambda: None)
    outcomes = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            hub.send_to_worker(w, "x", b"y" * 100)
            outcomes.add("ok")
        except WorkerDied:
            outcomes.add("died")
            break
    assert "died" in outcomes
    join_ok(w)


# ---- data: serializers, size, queue -----------------------------------------------------------


def test_json_serializer(make_hub, reports):
    """serializer="json" sends JSON (a tuple arrives as a list) and refuses
    non-JSON data at the call site with TypeError, nothing sent."""
    hub = make_hub(serializer="json")
    got, done = collector(hub, "j", 2)

    def work():
        hub.send_to_master("j", {"t": (1, 2)})
        try:
            hub.send_to_master("j", {1, 2})
        except TypeError:
            reports.put("TypeError")
        hub.send_to_master("j", "after")

    w = hub.fork(work)
    assert reports.get() == ("TypeError",)
    assert done.wait(10)
    assert [d for d, _ in got] == [{"t": [1, 2]}, "after"]
    join_ok(w)
    with pytest.raises(TypeError):
        hub.request_workers("j", object())


class Tagged:
    """A custom serializer: pickle behind a tag, refusing the value "refuse"."""

    def dumps(self, obj):
        if obj == "refuse":
            raise ValueError("refused by the custom serializer")
        return b"TAG" + pickle.dumps(obj)

    def loads(self, data):
        assert data[:3] == b"TAG"
        return ("decoded", pickle.loads(data[3:]))


def test_custom_serializer(make_hub, reports):
    """serializer= takes an object with dumps/loads, used in both directions;
    its own error is raised at the call site and the channel stays usable."""
    hub = make_hub(serializer=Tagged())
    hub.on("echo", lambda data, sender: data)

    def work():
        r = hub.request_master("echo", 5).result(10)
        try:
            hub.send_to_master("x", "refuse")
            err = None
        except ValueError as e:
            err = str(e)
        reports.put(r, err, hub.request_master("echo", 6).result(10))

    w = hub.fork(work)
    # worker -> master: loads gives ("decoded", 5); the reply is dumped and
    # loaded again in the worker.
    assert reports.get() == (
        ("decoded", ("decoded", 5)),
        "refused by the custom serializer",
        ("decoded", ("decoded", 6)),
    )
    join_ok(w)


@pytest.mark.parametrize("how", ["send_to_worker", "send_to_workers"])
def test_a_message_larger_than_the_socket_arrives_when_the_reader_resumes(hub, reports, how):
    """A one-way message (or broadcast) larger than the socket holds, sent
    while the worker does not read (SIGSTOP) and nothing else is queued to
    it: once the worker reads again it arrives whole, with nothing else sent
    after it (the C writer thread writes the rest; it used to stay queued
    until the next message to that worker)."""
    hub.on("big", lambda data, sender: reports.put("big", len(data)))
    w = hub.fork(lambda: threading.Event().wait(30))
    hub.send_to_worker(w, "big", b"")
    assert reports.get() == ("big", 0)
    os.kill(w.pid, signal.SIGSTOP)
    try:
        time.sleep(0.01)  # (the channel idle: the message is written directly, as much as fits)
        if how == "send_to_worker":
            hub.send_to_worker(w, "big", b"x" * 3_000_000)
        else:
            hub.send_to_workers("big", b"x" * 3_000_000)
    finally:
        os.kill(w.pid, signal.SIGCONT)
    assert reports.get(timeout=10) == ("big", 3_000_000)
    w.kill()
    join_ok(w, -9)


def test_max_queue_blocks_the_sender_then_worker_died(make_hub, reports):
    """A sender to a worker that does not read blocks once max_queue bytes are
    queued (memory stays bounded), and raises WorkerDied when that worker is
    killed meanwhile."""
    max_queue = 64 * 1024
    hub = make_hub(max_queue=max_queue)
    chunk = b"z" * 4096

    def work():
        stuck = threading.Event()
        hub.on("block", lambda data, sender: (reports.put("blocked"), stuck.wait()))
        hub.send_to_master("ready")
        stuck.wait()

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(work)
    assert ready.wait(10)
    hub.send_to_worker(w, "block")
    assert reports.get() == ("blocked",)

    sent = [0]
    outcome = []

    def sender():
        try:
            for _ in range(10_000):  # 40 MB if nothing held it back
                hub.send_to_worker(w, "data", chunk)
                sent[0] += 1
            outcome.append("finished")
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=sender)
    t.start()
    # The sender stops making progress once the socket buffer and max_queue
    # are full; give it ample time to show it would not stop.
    stalled_at = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        before = sent[0]
        t.join(0.3)
        if sent[0] == before:
            stalled_at = before
            break
    assert t.is_alive() and stalled_at is not None, "the sender never blocked"
    assert stalled_at < 2000
    assert w.channel.pending() <= max_queue + len(chunk) + 64
    w.kill()
    t.join(10)
    assert not t.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], WorkerDied), outcome
    join_ok(w, -9)


def test_relayed_broadcasts_are_bounded_too(make_hub, reports, event):
    """A worker broadcasting to a sibling that does not read is held back
    (its sends block) instead of growing the master's queue to that sibling
    without bound; it goes on once the sibling is gone."""
    max_queue = 64 * 1024
    hub = make_hub(max_queue=max_queue)
    chunk = b"b" * 4096
    total = 5_000  # 20 MB if nothing held it back
    progress = MP_VALUE("i", 0)
    stuck = event()

    def work():
        hub.on("bcast", lambda data, sender: None)
        hub.on("block", lambda data, sender: (reports.put("blocked"), stuck.wait(30)))
        hub.on("go", lambda data, sender: go.set())
        go = threading.Event()
        hub.send_to_master("ready")
        if hub.worker_id == 1:
            assert go.wait(10)
            for i in range(total):
                hub.send_to_workers("bcast", chunk)
                progress.value = i + 1
            reports.put("sent all")
        else:
            stuck.wait(30)

    ready = threading.Semaphore(0)
    hub.on("ready", lambda data, sender: ready.release())
    a = hub.fork(work)
    b = hub.fork(work)
    for _ in range(2):
        assert ready.acquire(timeout=10)
    hub.send_to_worker(b, "block")
    assert reports.get() == ("blocked",)
    hub.send_to_worker(a, "go")
    deadline = time.monotonic() + 15
    last = -1
    while time.monotonic() < deadline:
        now = progress.value
        if now == last:
            break
        last = now
        time.sleep(0.3)  # sampling the sender's progress, not synchronising
    assert last < total, "the broadcaster was never held back"
    # The frames of the batch the master was reading when the queue filled
    # are still relayed (a read takes at most a few hundred KiB).
    assert b.channel.pending() <= max_queue + 512 * 1024, b.channel.pending()
    b.kill()
    assert reports.get(30) == ("sent all",)
    join_ok(a)
    join_ok(b, -9)


# ---- Worker references sent as data -----------------------------------------


def test_worker_pickles_as_a_reference(hub, event):
    """A Worker sent as data arrives as the receiver's Worker for that id: a
    handler returning ``sender`` gives the worker a Worker with its own id,
    and a broadcast's sender sent back to the master is the master's Worker."""
    go = event()
    back = []
    came_back = threading.Event()
    hub.on("whoami", lambda data, sender: sender)

    @hub.on("bcast")
    def bcast(data, sender):  # runs in the other worker
        hub.send_to_master("sender_was", sender)

    @hub.on("sender_was")
    def sender_was(data, sender):
        back.append((data, sender))
        came_back.set()

    def first():
        me = hub.request_master("whoami").result(10)
        hub.send_to_master("me", (type(me).__name__, me.id == hub.worker_id))
        hub.send_to_workers("bcast")
        go.wait()

    mine = []
    hub.on("me", lambda data, sender: mine.append(data))
    b = hub.fork(go.wait)
    a = hub.fork(first)
    assert came_back.wait(20)
    (data, sender), = back
    assert data is a and sender is b
    go.set()
    join_ok(a)
    join_ok(b)
    assert mine == [("Worker", True)]
    # Exited, it still comes back as the same handle (exit code kept).
    assert pickle.loads(pickle.dumps(a)) is a and a.exitcode == 0
    with pytest.raises(WorkerDied):
        hub.send_to_worker(pickle.loads(pickle.dumps(a)), "x")


def test_unpickled_worker_of_an_unknown_hub_is_a_plain_reference(make_hub):
    """A Worker unpickled where its hub does not exist is a reference that
    keeps its id, and another hub refuses it with ValueError."""
    hub, other = make_hub(), make_hub()
    w = hub.fork(lambda: None)
    join_ok(w)
    data = pickle.dumps(w)
    hub.close()
    ref = pickle.loads(data)
    assert ref is not w and ref.id == w.id and not ref.is_alive()
    with pytest.raises(ValueError):
        other.send_to_worker(ref, "x")


# ---- send timeouts -----------------------------------------------------------

_seen: list = []  # in a worker: the sequence numbers its "msg" handler got


def _count_handlers(hub):
    @hub.on("msg")
    def msg(data, sender):
        _seen.append(data[0])

    @hub.on("report")
    def report(data, sender):
        hub.send_to_master("seen", list(_seen))


def _fill(hub, w, blob):
    """Send to a stopped worker until the queue is full; the sequence
    number that timed out and the exception."""
    for i in range(10_000):
        t0 = time.monotonic()
        try:
            hub.send_to_worker(w, "msg", (i, blob), timeout=0.2)
        except clusterhub.SendTimeout as e:
            assert time.monotonic() - t0 >= 0.19
            return i, e
    raise AssertionError("the queue to a stopped worker never filled")


def test_send_timeout_when_the_worker_does_not_read(make_hub, event):
    """send_to_worker(timeout=t) to a worker that does not read raises
    SendTimeout (a TimeoutError) once the queue stayed full for t, and
    nothing of that message reaches the worker; the channel stays usable."""
    hub = make_hub(max_queue=64 * 1024)
    _count_handlers(hub)
    seen = []
    got = threading.Event()
    hub.on("seen", lambda data, sender: (seen.append(data), got.set()))
    go = event()
    w = hub.fork(go.wait)
    os.kill(w.pid, signal.SIGSTOP)
    try:
        n, err = _fill(hub, w, b"x" * 32768)
    finally:
        os.kill(w.pid, signal.SIGCONT)
    assert isinstance(err, TimeoutError) and err.unreached == [w]
    hub.send_to_worker(w, "msg", (n + 1, b""), timeout=10)
    hub.send_to_worker(w, "report")
    assert got.wait(20)
    assert seen[0] == list(range(n)) + [n + 1]
    go.set()
    join_ok(w)


def test_broadcast_timeout_names_the_workers_not_reached(make_hub, event):
    """send_to_workers(timeout=t) with one worker not reading raises
    SendTimeout naming that worker; the others got the message, it did not."""
    hub = make_hub(max_queue=64 * 1024)
    _count_handlers(hub)
    seen = {}
    got = threading.Semaphore(0)
    hub.on("seen", lambda data, sender: (seen.__setitem__(sender.id, data), got.release()))
    go = event()
    stuck, fine = hub.fork(go.wait), hub.fork(go.wait)
    os.kill(stuck.pid, signal.SIGSTOP)
    try:
        n, _ = _fill(hub, stuck, b"x" * 32768)
        with pytest.raises(clusterhub.SendTimeout) as info:
            hub.send_to_workers("msg", (-1, b""), timeout=0.2)
    finally:
        os.kill(stuck.pid, signal.SIGCONT)
    assert info.value.unreached == [stuck]
    assert str(stuck.id) in str(info.value)
    hub.send_to_workers("report")
    assert got.acquire(timeout=20) and got.acquire(timeout=20)
    assert seen[fine.id] == [-1]
    assert seen[stuck.id] == list(range(n))
    go.set()
    join_ok(stuck)
    join_ok(fine)


def test_send_timeouts_are_checked(hub, event):
    """Every send_to_* takes timeout=: a number of seconds >= 0 or None; a
    worker's sends with a timeout go through when there is room."""
    go = event()
    ok = threading.Event()
    hub.on("ok", lambda data, sender: ok.set())

    def work():
        hub.send_to_master("x", 1, timeout=5)
        hub.send_to_workers("x", 1, timeout=5)
        hub.send_to_master("ok", timeout=0)
        go.wait()

    w = hub.fork(work)
    assert ok.wait(20)
    for bad, exc in ((-1, ValueError), ("1", TypeError), (True, TypeError), (float("nan"), ValueError)):
        with pytest.raises(exc):
            hub.send_to_worker(w, "x", timeout=bad)
        with pytest.raises(exc):
            hub.send_to_workers("x", timeout=bad)
        with pytest.raises(exc):
            hub.send_to_master("x", timeout=bad)
        with pytest.raises(exc):
            hub.send_to_random_worker("x", timeout=bad)
    assert hub.send_to_random_worker("x", timeout=1) is w
    go.set()
    join_ok(w)
