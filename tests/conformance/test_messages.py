"""Plain messages on every transport: both ways with the sender a handler is
given, per-sender order, broadcasts from the master and from a worker, a
random worker, and data crossing intact."""

from __future__ import annotations

import threading

import pytest

import clusterhub

from .cluster import ready
from conftest import collector

pytestmark = pytest.mark.timeout(60)


class Point:
    """A user class crossing processes by pickle."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)


# ---- senders -----------------------------------------------------------------------


def test_sender_is_the_worker_in_the_master(cluster):
    """In the master, a worker's message comes with that Worker as sender."""
    hub = cluster.hub
    got, done = collector(hub, "hello", 2)

    def say(hub, what):
        hub.send_to_master("hello", what)

    a = cluster.start(say, "from a")
    b = cluster.start(say, "from b")
    assert done.wait(10)
    assert sorted((d, s.id) for d, s in got) == [("from a", a.id), ("from b", b.id)]
    assert {id(s) for _, s in got} == {id(a), id(b)}  # the very Worker objects
    cluster.join(a)
    cluster.join(b)


def test_sender_is_none_from_the_master(cluster, reports):
    """In a worker, a message from the master comes with sender None, and in
    the master its own send_to_master also has sender None."""
    hub = cluster.hub
    got, done = collector(hub, "self", 1)

    def work(hub):
        ev = threading.Event()
        box = []
        hub.on("hi", lambda data, sender: (box.append(sender), ev.set()))
        ready(hub)
        assert ev.wait(10)
        reports.put(box[0])

    w = cluster.start(work, ready=True)
    hub.send_to_worker(w, "hi")
    assert reports.get() == (None,)
    hub.send_to_master("self", 1)
    assert done.wait(10)
    assert got == [(1, None)]
    cluster.join(w)


# ---- ordering --------------------------------------------------------------------


def test_per_sender_order_and_one_handler_at_a_time(cluster):
    """Messages of each sender are handled in send order, and the master runs
    one handler at a time even with several workers sending at once."""
    hub = cluster.hub
    n = 2000
    seen: dict[int, list[int]] = {}
    running = [0]
    overlap = []
    done = threading.Event()

    def handler(data, sender):
        running[0] += 1
        if running[0] > 1:
            overlap.append(data)
        seen.setdefault(sender.id, []).append(data)
        running[0] -= 1
        if sum(len(v) for v in seen.values()) == 3 * n:
            done.set()

    hub.on("seq", handler)

    def work(hub):
        for i in range(n):
            hub.send_to_master("seq", i)

    ws = [cluster.start(work) for _ in range(3)]
    assert done.wait(30)
    assert not overlap
    assert {k: v for k, v in seen.items()} == {w.id: list(range(n)) for w in ws}
    for w in ws:
        cluster.join(w)


def test_master_to_worker_order(cluster, reports):
    """Messages from the master reach a worker in send order."""
    hub = cluster.hub
    n = 3000

    def work(hub):
        got = []
        done = threading.Event()

        def h(data, sender):
            got.append(data)
            if len(got) == n:
                done.set()

        hub.on("seq", h)
        ready(hub)
        assert done.wait(20)
        reports.put(got == list(range(n)))

    w = cluster.start(work, ready=True)
    for i in range(n):
        hub.send_to_worker(w.id if i % 2 else w, "seq", i)  # by Worker and by id
    assert reports.get(20) == (True,)
    cluster.join(w)


# ---- send_to_workers, random ------------------------------------------------------------


def test_broadcast_from_the_master(cluster, reports):
    """send_to_workers from the master reaches every live worker (sender None)
    and not the master's own handlers."""
    hub = cluster.hub
    master_calls = []
    hub.on("b", lambda data, sender: master_calls.append(data))

    def work(hub):
        ev = threading.Event()
        hub.on("b", lambda data, sender: (reports.put(hub.worker_id, data, sender), ev.set()))
        ready(hub)
        assert ev.wait(10)

    ws = [cluster.start(work) for _ in range(3)]
    cluster.wait_ready(*ws)
    hub.send_to_workers("b", "all")
    got = sorted(reports.get_n(3))
    assert got == [(w.id, "all", None) for w in ws]
    hub.request_master("sync").exception(10)
    assert master_calls == []
    for w in ws:
        cluster.join(w)


def test_broadcast_from_a_worker(cluster, reports):
    """A worker's send_to_workers reaches every other worker with the origin
    as sender (.id), not the origin itself and not the master's handlers."""
    hub = cluster.hub
    master_calls = []
    hub.on("b", lambda data, sender: master_calls.append(data))
    hub.on("probe-me", lambda data, sender: hub.send_to_worker(sender, "probe"))

    def work(hub, origin):
        got = []
        probed = threading.Event()
        end = threading.Event()
        hub.on("b", lambda data, sender: got.append((data, sender.id, type(sender).__name__)))
        hub.on("probe", lambda data, sender: probed.set())
        hub.on("end", lambda data, sender: end.set())
        go = threading.Event()
        hub.on("go", lambda data, sender: go.set())
        ready(hub)
        assert go.wait(10)  # every worker is live
        if origin:
            hub.send_to_workers("b", "from 1")
        hub.request_master("probe-me").exception(10)
        assert probed.wait(10)
        reports.put(hub.worker_id, "probed", list(got))
        assert end.wait(10)
        reports.put(hub.worker_id, "end", got)

    ws = [cluster.start(work, i == 0) for i in range(3)]
    cluster.wait_ready(*ws)
    one, two, three = (w.id for w in ws)
    hub.send_to_workers("go")
    first = {r[0]: r[2] for r in reports.get_n(3)}
    assert first[one] == []  # never back to the origin
    hub.send_to_workers("end")
    final = {r[0]: r[2] for r in reports.get_n(3)}
    assert final == {one: [], two: [("from 1", one, "Worker")], three: [("from 1", one, "Worker")]}
    assert master_calls == []
    for w in ws:
        cluster.join(w)


def test_send_to_random_worker(cluster, reports):
    """send_to_random_worker returns the Worker it chose, which gets the
    message; with no worker it returns None."""
    hub = cluster.hub
    assert hub.send_to_random_worker("r", 1) is None

    def work(hub):
        ev = threading.Event()
        hub.on("r", lambda data, sender: (reports.put(hub.worker_id, data), ev.set()))
        hub.on("end", lambda data, sender: ev.set())
        ready(hub)
        assert ev.wait(10)

    ws = [cluster.start(work) for _ in range(2)]
    cluster.wait_ready(*ws)
    chosen = hub.send_to_random_worker("r", "pick")
    assert isinstance(chosen, clusterhub.Worker) and chosen in ws
    assert reports.get() == (chosen.id, "pick")
    for w in ws:
        if w is not chosen:
            hub.send_to_worker(w, "end")
    for w in ws:
        cluster.join(w)
    assert hub.send_to_random_worker("r", 2) is None


# ---- data -------------------------------------------------------------------------------


def test_pickle_is_the_default(cluster, reports):
    """Any picklable object (a user class, nested containers, bytes) crosses
    intact both ways with the default serializer."""
    hub = cluster.hub
    value = {"p": Point(1, 2), "t": (1, 2), "b": b"\x00\xff", "s": {1, 2}}
    hub.on("echo", lambda data, sender: data)

    def work(hub):
        reports.put(hub.request_master("echo", value).result(10) == value)

    w = cluster.start(work)
    assert reports.get() == (True,)
    cluster.join(w)


def test_big_messages_both_ways(cluster, reports):
    """Messages of several MiB (a socket buffer many times over) cross intact
    from a worker to the master and back, as requests, replies and plain
    messages."""
    hub = cluster.hub
    big = bytes(range(256)) * (12 * 4096)  # 12 MiB
    got, done = collector(hub, "big", 1)
    hub.on("echo", lambda data, sender: data)

    def work(hub):
        finish = threading.Event()
        hub.on("echo", lambda data, sender: data)
        hub.on("finish", lambda data, sender: finish.set())
        ready(hub)
        hub.send_to_master("big", big)
        reports.put(hub.request_master("echo", big).result(30) == big)
        finish.wait(30)  # (or the master's request may find it gone)

    w = cluster.start(work, ready=True)
    assert hub.request_worker(w, "echo", big).result(30) == big
    hub.send_to_worker(w, "finish")
    assert reports.get(30) == (True,)
    assert done.wait(30)
    assert got[0][0] == big and got[0][1] is w
    cluster.join(w)
