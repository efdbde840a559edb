"""Messages over Redis, where they differ from a local hub or where only a
server can fail: inboxes bounded and removed with their lease, deaths seen
by lease (SIGKILL, SIGSTOP, the master), entries authenticated before they
are deserialized, the serializer's default, fork() through the server,
asyncio, and a server restart mid-traffic.  (The semantics shared with the
local hub run in the conformance suite, transport "redis".)

Sleeping past a lease is what some of these tests are about; everything
else is sequenced with pipes and events, or polls the server with a bound.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import clusterhub
from clusterhub import HubError, MasterDied, SendTimeout, WorkerDied
from clusterhub.redis.hub import connect_redis

from .conftest import LEASE, MP, Procs, RedisServer, Reports, close_quietly, connect, wait_until
from conftest import wait_pid_gone

pytestmark = pytest.mark.timeout(60)

MARGIN = 0.5  # s past a lease within which a death must have been noticed
KEY = b"k"


def joined(master: clusterhub.Hub, reports: Reports) -> clusterhub.Worker:
    """The worker that reported ("joined", id) first, as the master lists it."""
    tag, wid = reports.get(timeout=15)
    assert tag == "joined"
    return wait_until(lambda: master.workers.get(wid), 5, f"worker {wid} listed")


def inbox_keys(server: RedisServer, name: str, wid: int) -> list[bytes]:
    r = server.client()
    try:
        return [k for k in (f"{{ch:{name}}}:inbox:{wid}".encode(), f"{{ch:{name}}}:queued:{wid}".encode())
                if r.exists(k)]
    finally:
        r.close()


# ---- fork() through the server ---------------------------------------------------------


def test_fork_on_a_redis_hub(redis_server: RedisServer) -> None:
    """A forked worker joins through the server at once (the master can
    send to it before it has run a line), answers and asks, exits with its
    code; the master's on_exit runs after every message it sent."""
    master = clusterhub.Hub(address=redis_server.url("fork"), lease=LEASE, authkey=b"s")
    try:
        got: list[int] = []
        seen_at_exit: list[int] = []
        master.on("n", lambda n, sender: got.append(n))
        master.on("add", lambda d, sender: d[0] + d[1])
        master.on_exit(lambda w: seen_at_exit.append(len(got)))
        ready = threading.Event()
        master.on("ready", lambda d, s: ready.set())
        go = MP.Event()

        def child() -> None:
            master.on("twice", lambda d, sender: 2 * d)
            master.send_to_master("ready")
            assert go.wait(20)
            assert master.request_master("add", (2, 3)).result(10) == 5
            for i in range(500):
                master.send_to_master("n", i)
            raise SystemExit(3)

        master.on("twice", lambda d, sender: 2 * d)  # (inherited: answers from the first instant)
        w = master.fork(child)
        assert master.request_worker(w, "twice", 21).result(10) == 42
        assert ready.wait(10)
        assert getattr(w, "host", None) and w.pid != os.getpid()
        go.set()
        assert w.join(20)
        assert w.exitcode == 3
        assert master.join(10)
        assert got == list(range(500)) and seen_at_exit == [500]
    finally:
        master.close()


def test_what_waits_in_an_inbox_when_reading_starts_is_read(redis_server: RedisServer) -> None:
    """A message already in a worker's inbox when it starts reading: the
    first pop answers at once, maybe while the thread that connected the
    inbox still holds it, and the dispatcher's one-shot event for it was
    then lost for good (a new master stayed deaf to a request sent at once).
    Repeated, beside a thread that keeps the GIL busy (the connecting
    thread then gets it back late, after the pop's answer came)."""
    url = redis_server.url("w")
    master = clusterhub.Hub(address=url, lease=LEASE)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=busy)
    spinner.start()
    try:
        for i in range(20):
            hub = connect_redis(url, timeout=10)
            try:
                got = threading.Event()
                hub.on("m", lambda d, s: got.set())
                wid = hub.worker_id
                wait_until(lambda: wid in master.workers, 5, f"worker {wid} listed")
                master.send_to_worker(wid, "m", i)
                hub._start_reading()
                assert got.wait(5), f"round {i}: the message that waited was never read"
            finally:
                close_quietly(hub)
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(interval)
        master.close()


# ---- deaths ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["sigkill", "sigstop"])
def test_a_dead_or_paused_worker_fails_pending_requests(how: str, redis_server: RedisServer,
                                                        master: clusterhub.Hub, procs: Procs,
                                                        reports: Reports) -> None:
    """A worker with a request pending, SIGKILLed or SIGSTOPped past its
    lease: the request fails with WorkerDied within the lease plus a margin,
    on_exit runs, sending to it raises WorkerDied, and its inbox is gone
    from the server with its lease."""
    url = redis_server.url("t")
    exited = threading.Event()
    master.on_exit(lambda w: exited.set())

    def worker() -> None:
        hub = connect(url)
        hub.on("hang", lambda d, s: threading.Event().wait())
        reports.put("joined", hub.worker_id)
        threading.Event().wait()

    pid = procs.start(worker)
    w = joined(master, reports)
    fut = master.request_worker(w, "hang")
    os.kill(pid, signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
    t0 = time.monotonic()
    if how == "sigkill":
        assert wait_pid_gone(pid, 5)
        master.send_to_worker(w, "x", "left in its inbox")  # (its lease still runs)
        assert len(inbox_keys(redis_server, "t", w.id)) == 2
    with pytest.raises(WorkerDied):
        fut.result(LEASE + 5)
    assert time.monotonic() - t0 < LEASE + MARGIN
    assert exited.wait(5) and not w.is_alive() and w.exitcode is None
    with pytest.raises(WorkerDied):
        master.send_to_worker(w, "x")
    assert inbox_keys(redis_server, "t", w.id) == []


def test_master_death_and_a_new_master(redis_server: RedisServer, procs: Procs, reports: Reports) -> None:
    """The master SIGKILLed with a worker's request pending: it fails with
    MasterDied within the lease plus a margin (a new request too, while no
    master lives).  A new master takes the name once the lease ran out; the
    worker's requests reach it, and worker ids continue."""
    url = redis_server.url("m")

    def old_master() -> None:
        hub = clusterhub.Hub(address=url, lease=LEASE)
        hub.on("hang", lambda d, s: threading.Event().wait())
        reports.put("master")
        threading.Event().wait()

    pid = procs.start(old_master)
    assert reports.get(timeout=15) == ("master",)
    worker = connect(url)
    try:
        first_id = worker.worker_id
        fut = worker.request_master("hang")
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(MasterDied):
            fut.result(LEASE + 5)
        assert time.monotonic() - t0 < LEASE + MARGIN
        with pytest.raises(MasterDied):
            worker.request_master("hang").result(5)
        new = clusterhub.Hub(address=url, lease=LEASE)
        try:
            new.on("who", lambda d, s: ("new", s.id))
            assert worker.request_master("who").result(5) == ["new", first_id]  # (JSON: no authkey)

            def other() -> None:
                hub = connect(url)
                reports.put("joined", hub.worker_id)
                hub.close()

            procs.join(procs.start(other))
            _, other_id = reports.get(timeout=10)
            assert first_id is not None and other_id > first_id
        finally:
            new.close()
    finally:
        close_quietly(worker)


# ---- published entries and the inbox, one order ----------------------------------------


@pytest.mark.parametrize("parser", ["hiredis", "redis-py", "before Redis 7"])
def test_published_and_listed_entries_keep_one_order(redis_server: RedisServer, parser: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """While a worker's inbox is empty its entries are published to it; while
    it is not subscribed (its connection was cut) they are listed, and they
    stay listed until the list is read out.  One sender's messages and
    broadcasts, sent on across a cut while the worker lags, still come in
    the order sent; replies come; and once it is idle, every byte it got was
    counted out (its count is gone).  Both ways of reading the connection:
    ours (hiredis, for the inbox and the lock calls alike) and redis-py's
    parser; and the way of a server older than
    7.0 (no BLMPOP: a script takes a batch, BRPOP waits; nothing published),
    taken here by a hub that reads the version as 6.2."""
    from clusterhub.redis import link, wire

    if parser == "hiredis" and wire.hiredis is None:
        pytest.skip("hiredis (3.0 or later) is not installed")
    if parser == "redis-py":
        monkeypatch.setattr(wire, "hiredis", None)  # (inherited by the forked worker)
    if parser == "before Redis 7":
        monkeypatch.setattr(link, "version_of", lambda text: (6, 2, 0))
    name = f"order-{parser.replace(' ', '-')}"
    N, LAG_AT = 1500, 100
    r = redis_server.client()
    r.config_resetstat()
    master = clusterhub.Hub(address=redis_server.url(name), lease=LEASE, authkey=KEY)
    try:
        result: list[Any] = []
        lagging, done = threading.Event(), threading.Event()
        master.on("lagging", lambda d, s: lagging.set())
        master.on("seen", lambda d, s: (result.append(d), done.set()))
        master.on("twice", lambda d, s: 2 * d)
        # (The worker's handlers, registered before fork: inherited, and in
        # place before anything comes.)
        seen: list[int] = []
        finished = threading.Event()

        def got(d: Any, sender: Any) -> None:
            n = d if isinstance(d, int) else d[0]
            seen.append(n)
            if n == LAG_AT:
                master.send_to_master("lagging")
                time.sleep(0.05)  # (meanwhile its connection is cut: what comes is listed)
            if n == N - 1:
                asked = [master.request_master("twice", i).result(10) for i in range(20)]
                master.send_to_master("seen", (seen, asked))
                finished.set()

        master.on("n", got)
        master.on("half", lambda d, s: d // 2)

        def child() -> None:
            assert finished.wait(30)

        w = master.fork(child)
        assert master.request_worker(w, "half", 10).result(10) == 5
        for i in range(N):
            if i == LAG_AT + 1:
                assert lagging.wait(10)
                cut = [c["id"] for c in r.client_list()  # (the inboxes' connections)
                       if c.get("sub") == "1" or c.get("cmd") in ("brpop", "blmpop")]
                assert cut
                for cid in cut:
                    r.client_kill_filter(_id=cid)
            if i % 100 == 7:  # (over 64 KiB: listed, never published, and what follows with it)
                master.send_to_worker(w, "n", (i, b"x" * 70_000))
            elif i % 3:
                master.send_to_worker(w, "n", i)
            else:
                master.send_to_workers("n", i)
        assert done.wait(30)
        seen_there, asked = result[0]
        assert seen_there == list(range(N))
        assert asked == [2 * i for i in range(20)]
        wait_until(lambda: not r.exists(f"{{ch:{name}}}:queued:{w.id}"), 10, "the worker's count out to 0")
        stats = r.info("commandstats")  # (the way taken)
        if parser == "before Redis 7":
            assert "cmdstat_brpop" in stats and "cmdstat_subscribe" not in stats
        else:
            assert "cmdstat_subscribe" in stats and "cmdstat_blmpop" in stats
    finally:
        r.close()
        close_quietly(master)


# ---- bounds and memory -------------------------------------------------------------------


def test_a_reader_that_does_not_read_bounds_its_inbox(redis_server: RedisServer, procs: Procs,
                                                      reports: Reports) -> None:
    """A worker that does not read (SIGSTOPped): the master's sends fill its
    inbox on the server (or, published while it is empty, the reader's
    connection) to max_queue, then block; with timeout= they raise
    SendTimeout (nothing sent), and no more than max_queue plus one message
    waits.  Once the worker reads again the blocked sender goes
    on, and every message arrives, in order.  A sender blocked on a reader
    that dies gets WorkerDied."""
    url = redis_server.url("slow")
    mq, size = 64 * 1024, 10_000
    master = clusterhub.Hub(address=url, lease=LEASE, max_queue=mq, authkey=b"s")
    r = redis_server.client()
    pad = b"x" * size

    def fill(w: clusterhub.Worker) -> int:
        """Send until SendTimeout; how many went."""
        with pytest.raises(SendTimeout):
            for i in range(1000):
                master.send_to_worker(w, "n", (i, pad), timeout=0.3)
        # (The count is of what the inbox holds and of what was published to
        # the stopped reader while the inbox was empty: that waits in its
        # socket or in the server's output buffer for it.)
        counted = int(r.get(f"{{ch:slow}}:queued:{w.id}") or 0)
        held = sum(len(e) for e in r.lrange(f"{{ch:slow}}:inbox:{w.id}", 0, -1))
        assert mq < counted <= mq + size + 200 and held <= counted, (counted, held)
        return i

    def worker() -> None:
        hub = clusterhub.connect(url, timeout=10, authkey=b"s")
        seen: list[int] = []
        done = threading.Event()
        hub.on("n", lambda d, s: (seen.append(d[0]), d[0] == -1 and done.set()))
        reports.put("joined", hub.worker_id)
        assert done.wait(30)
        reports.put("seen", seen)
        hub.close()

    try:
        pid = procs.start(worker)
        w = joined(master, reports)
        os.kill(pid, signal.SIGSTOP)
        sent = fill(w)
        blocked_done = threading.Event()

        def blocked_send() -> None:
            master.send_to_worker(w, "n", (sent, pad))  # (the one that timed out, again: it waits)
            master.send_to_worker(w, "n", (-1, b""))
            blocked_done.set()

        t = threading.Thread(target=blocked_send)
        t.start()
        assert not blocked_done.wait(0.3)  # (still full: it waits)
        os.kill(pid, signal.SIGCONT)
        assert blocked_done.wait(20)
        t.join(5)
        assert reports.get(timeout=20) == ("seen", [*range(sent + 1), -1])
        procs.join(pid)

        # A reader that dies while a sender waits for room: WorkerDied.
        pid = procs.start(worker)
        w = joined(master, reports)
        os.kill(pid, signal.SIGSTOP)
        fill(w)
        result: list[BaseException] = []

        def waiting_send() -> None:
            try:
                master.send_to_worker(w, "n", (0, pad))
            except BaseException as e:
                result.append(e)

        t = threading.Thread(target=waiting_send)
        t.start()
        os.kill(pid, signal.SIGKILL)
        t.join(2 * LEASE + 5)
        assert not t.is_alive() and isinstance(result[0], WorkerDied), result
    finally:
        master.close()


def test_broadcasts_sent_ahead_keep_the_bound_and_the_order(redis_server: RedisServer, procs: Procs,
                                                            reports: Reports) -> None:
    """Broadcasts go ahead of the server's answers (messages.Mail._ahead)
    only while they cannot take an inbox past max_queue: to a stopped
    worker, a loop of them fills its inbox to max_queue plus at most one
    entry and then times out naming it, as broadcasts waited for do.  Once
    it reads again, every broadcast that went arrives once, in order, and
    then a send the same thread made after them.  Also when the server lost
    the broadcast script while some were on their way (SCRIPT FLUSH): those
    are sent again, in order."""
    url = redis_server.url("ahead")
    mq, size = 64 * 1024, 1000
    master = clusterhub.Hub(address=url, lease=LEASE, max_queue=mq, authkey=b"s")
    r = redis_server.client()

    def worker() -> None:
        hub = clusterhub.connect(url, timeout=10, authkey=b"s")
        seen: list[int] = []
        done = threading.Event()
        hub.on("b", lambda d, s: seen.append(d[0]))
        hub.on("end", lambda d, s: done.set())
        reports.put("joined", hub.worker_id)
        assert done.wait(30)
        reports.put("seen", seen)
        hub.close()

    try:
        pid = procs.start(worker)
        w = joined(master, reports)
        os.kill(pid, signal.SIGSTOP)
        sent = 0
        try:
            with pytest.raises(SendTimeout) as e:
                for sent in range(1000):  # noqa: B007 (how many went: below)
                    master.send_to_workers("b", (sent, b"x" * size), timeout=0.3)
            assert e.value.unreached == [w]
            counted = int(r.get(f"{{ch:ahead}}:queued:{w.id}") or 0)
            assert mq < counted <= mq + size + 200, counted
        finally:
            os.kill(pid, signal.SIGCONT)
        master.send_to_worker(w, "end")
        assert reports.get(timeout=20) == ("seen", list(range(sent)))
        procs.join(pid)

        pid = procs.start(worker)
        w = joined(master, reports)
        for i in range(20):
            master.send_to_workers("b", (i, b""))
        r.script_flush()
        for i in range(20, 60):
            master.send_to_workers("b", (i, b""))
        master.send_to_worker(w, "end")
        assert reports.get(timeout=20) == ("seen", list(range(60)))
        procs.join(pid)
    finally:
        r.close()
        master.close()


def test_broadcasts_sent_ahead_keep_each_threads_order(redis_server: RedisServer, procs: Procs,
                                                      reports: Reports) -> None:
    """Four threads broadcast at once, mostly ahead of the server's
    answers, each then sends one message to the worker: the worker gets
    every broadcast once, each thread's in its order, and each thread's
    message after that thread's broadcasts."""
    url = redis_server.url("threads")
    n, k = 600, 4
    master = clusterhub.Hub(address=url, lease=LEASE, authkey=b"s")
    try:
        def worker() -> None:
            hub = clusterhub.connect(url, timeout=10, authkey=b"s")
            seen: dict[int, list[int]] = {t: [] for t in range(k)}
            ends: dict[int, int] = {}
            done = threading.Event()

            def on_end(t: int, s: Any) -> None:
                ends[t] = len(seen[t])
                if len(ends) == k:
                    done.set()

            hub.on("b", lambda d, s: seen[d[0]].append(d[1]))
            hub.on("end", on_end)
            reports.put("joined", hub.worker_id)
            done.wait(30)
            reports.put("seen", all(seen[t] == list(range(n)) for t in range(k)), ends)
            hub.close()

        pid = procs.start(worker)
        w = joined(master, reports)

        def sender(t: int) -> None:
            for i in range(n):
                master.send_to_workers("b", (t, i))
            master.send_to_worker(w, "end", t)

        threads = [threading.Thread(target=sender, args=(t,)) for t in range(k)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert reports.get(timeout=30) == ("seen", True, {t: n for t in range(k)})
        procs.join(pid)
    finally:
        master.close()


def test_messages_sent_ahead_keep_their_order_with_requests(redis_server: RedisServer, procs: Procs,
                                                            reports: Reports) -> None:
    """A worker's one-way messages go ahead of the server's answers; its
    requests, made in between, wait for theirs: the master sees all of
    them in the order the worker made them, and the requests answered."""
    url = redis_server.url("oneway")
    master = clusterhub.Hub(address=url, lease=LEASE, authkey=b"s")
    try:
        seen: list[int] = []
        done = threading.Event()
        master.on("n", lambda d, s: (seen.append(d), d == 998 and done.set()))
        master.on("echo", lambda d, s: (seen.append(d), d)[1])

        def worker() -> None:
            hub = clusterhub.connect(url, timeout=10, authkey=b"s")
            for i in range(1000):
                if i % 50 == 49:
                    assert hub.request_master("echo", i).result(10) == i
                else:
                    hub.send_to_master("n", i)
            hub.close()

        pid = procs.start(worker)
        assert done.wait(30)
        procs.join(pid)
        assert seen == list(range(1000))
    finally:
        master.close()


def test_broadcasts_sent_ahead_reach_the_server_when_the_process_exits(redis_server: RedisServer, procs: Procs,
                                                                      reports: Reports) -> None:
    """A process that broadcasts and then exits without closing its hub
    (over TCP, where closing a socket with unread replies resets it):
    every broadcast arrives, the last one included."""
    import subprocess

    url = redis_server.url("exit")
    n = 2000
    master = clusterhub.Hub(address=url, lease=LEASE, authkey=b"s")
    try:
        def receiver() -> None:
            hub = clusterhub.connect(url, timeout=10, authkey=b"s")
            seen: list[int] = []
            done = threading.Event()
            hub.on("b", lambda d, s: (seen.append(d), d == n - 1 and done.set()))
            reports.put("joined", hub.worker_id)
            done.wait(20)
            reports.put("seen", len(seen), seen == list(range(n)))
            hub.close()

        pid = procs.start(receiver)
        joined(master, reports)
        code = ("import clusterhub\n"
                f"hub = clusterhub.connect({url!r}, timeout=10, authkey=b's')\n"
                f"for i in range({n}):\n"
                "    hub.send_to_workers('b', i, timeout=10)\n")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
        assert reports.get(timeout=30) == ("seen", n, True)
        procs.join(pid)
    finally:
        master.close()


@pytest.mark.parametrize("where", ["dispatcher", "attached loop"])
def test_a_handler_that_lags_leaves_what_waits_on_the_server(where: str, redis_server: RedisServer, procs: Procs,
                                                              reports: Reports) -> None:
    """A worker whose handler is stuck reads no more of its inbox: the
    master's sends fill it to max_queue on the server and then time out
    (SendTimeout), instead of piling up in the worker's process; once the
    handler returns, everything arrives, in order.  Also where handlers run
    on an attached asyncio loop, which the dispatcher thread reads for."""
    url = redis_server.url("lag")
    mq, size = 64 * 1024, 10_000
    master = clusterhub.Hub(address=url, lease=LEASE, max_queue=mq, authkey=b"s")
    try:
        go = MP.Event()

        def worker() -> None:
            hub = clusterhub.connect(url, timeout=10, authkey=b"s")
            seen: list[int] = []
            done = threading.Event()

            def on_n(d: Any, s: Any) -> None:
                assert go.wait(30)  # (stuck until the test says)
                seen.append(d[0])
                if d[0] == -1:
                    done.set()

            hub.on("n", on_n)
            if where == "attached loop":
                async def main() -> None:
                    hub.attach()  # (the loop's thread is blocked by the stuck handler)
                    reports.put("joined", hub.worker_id)
                    assert await asyncio.get_running_loop().run_in_executor(None, done.wait, 30)

                asyncio.run(main())
            else:
                reports.put("joined", hub.worker_id)
                assert done.wait(30)
            reports.put("seen", seen)
            hub.close()

        pid = procs.start(worker)
        w = joined(master, reports)
        sent = 0
        with pytest.raises(SendTimeout):
            for sent in range(1000):  # noqa: B007 (how many went: below)
                master.send_to_worker(w, "n", (sent, b"x" * size), timeout=0.3)
        assert sent < 20, f"{sent} messages of {size} bytes went to a worker whose handler was stuck"
        go.set()
        master.send_to_worker(w, "n", (-1, b""), timeout=10)
        assert reports.get(timeout=20) == ("seen", [*range(sent), -1])
        procs.join(pid)
    finally:
        master.close()


def test_entries_are_removed_as_they_are_read(redis_server: RedisServer, procs: Procs, reports: Reports) -> None:
    """After requests, broadcasts and one-way messages, nothing waits in any
    inbox, and no byte count is left over."""
    url = redis_server.url("flat")
    master = clusterhub.Hub(address=url, lease=LEASE)
    try:
        master.on("echo", lambda d, s: d)
        count = threading.Event()
        got: list[Any] = []
        master.on("one", lambda d, s: (got.append(d), len(got) == 600 and count.set()))

        def worker() -> None:
            hub = connect(url)
            bc = threading.Event()
            seen: list[int] = []
            hub.on("bc", lambda d, s: (seen.append(d), len(seen) == 200 and bc.set()))
            reports.put("joined", hub.worker_id)
            for i in range(300):
                assert hub.request_master("echo", i).result(10) == i
                hub.send_to_master("one", i)
            assert bc.wait(20)
            reports.put("done")
            hub.close()

        pids = [procs.start(worker) for _ in range(2)]
        ws = [joined(master, reports) for _ in pids]
        for i in range(200):
            master.send_to_workers("bc", i)
        assert [reports.get(timeout=30) for _ in pids] == [("done",), ("done",)]
        assert count.wait(10)
        for pid in pids:
            procs.join(pid)
        r = redis_server.client()
        inboxes = [k for k in r.keys(b"{ch:flat}:*") if b":inbox:" in k]
        assert all(r.llen(k) == 0 for k in inboxes), inboxes
        # (A reader counts what it took out of the byte count now and then,
        # and once it found nothing for a lease; the exits' entries came last.)
        wait_until(lambda: not [k for k in r.keys(b"{ch:flat}:*") if b":queued:" in k], 2 * LEASE + MARGIN,
                   "no byte count left")
        assert master.join(10) and [w.exitcode for w in ws] == [0, 0]  # (they left cleanly)
    finally:
        master.close()


# ---- authentication and serializers ------------------------------------------------------


class _Marker:
    """Unpickling it makes a directory: proof that a forged entry ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.path,))


def test_a_forged_entry_is_dropped_before_it_is_unpickled(redis_server: RedisServer, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """With an authkey, an entry written into the master's inbox by anyone
    without the key (a forged or missing HMAC) is dropped and logged; its
    pickle never runs; the hub goes on serving."""
    url = redis_server.url("auth")
    master = clusterhub.Hub(address=url, lease=LEASE, authkey=b"secret")
    worker = clusterhub.connect(url, timeout=10, authkey=b"secret")
    try:
        seen = threading.Event()
        master.on("x", lambda d, s: seen.set())
        master.on("echo", lambda d, s: d)
        marker = tmp_path / "ran"
        from clusterhub import protocol

        frame = protocol.encode(protocol.MSG, worker.worker_id or 0, 0, b"x", pickle.dumps(_Marker(str(marker))))
        r = redis_server.client()
        inbox = f"{{ch:auth}}:inbox:{master._link.proc_id}"  # type: ignore[attr-defined]
        with caplog.at_level(logging.ERROR, logger="clusterhub"):
            r.lpush(inbox, b"\0" * 32 + frame)  # a wrong HMAC
            r.lpush(inbox, frame)  # none at all
            assert worker.request_master("echo", (1, 2)).result(10) == (1, 2)  # (pickle: a tuple stays one)
        assert not marker.exists() and not seen.is_set()
        assert sum("HMAC" in m for m in caplog.messages) == 2, caplog.messages
        wrong = connect_redis(url, timeout=10, authkey=b"wrong")  # (connect() would return `worker`)
        wrong._start_reading()
        try:
            with caplog.at_level(logging.ERROR, logger="clusterhub"):
                wrong.send_to_master("x", 1)
                assert worker.request_master("echo", 2).result(10) == 2
            assert not seen.is_set()
        finally:
            wrong.close()
    finally:
        worker.close()
        master.close()


def test_serializer_default_is_json_without_an_authkey(redis_server: RedisServer) -> None:
    """Without an authkey the data is JSON (a tuple arrives as a list; an
    object JSON refuses raises at the sender, nothing sent); serializer=
    chooses explicitly."""
    url = redis_server.url("json")
    master = clusterhub.Hub(address=url, lease=LEASE)
    worker = connect(url)
    try:
        master.on("echo", lambda d, s: d)
        assert worker.request_master("echo", (1, "a")).result(10) == [1, "a"]
        with pytest.raises(TypeError):
            worker.send_to_master("echo", {1, 2})
        assert worker.request_master("echo", {"ok": True}).result(10) == {"ok": True}
    finally:
        worker.close()
        master.close()
    url = redis_server.url("explicit")
    master = clusterhub.Hub(address=url, lease=LEASE, serializer="pickle")
    worker = clusterhub.connect(url, timeout=10, serializer="pickle")
    try:
        master.on("echo", lambda d, s: d)
        assert worker.request_master("echo", (1, "a")).result(10) == (1, "a")
    finally:
        worker.close()
        master.close()


# ---- asyncio ------------------------------------------------------------------------------


def test_asyncio_requests_and_async_handlers(redis_server: RedisServer, procs: Procs, reports: Reports) -> None:
    """A worker awaits requests on its loop while a ticker keeps running
    (the loop is never blocked for long); the master answers with an
    ``async def`` handler on its attached loop."""
    url = redis_server.url("aio")

    def worker() -> None:
        async def main() -> None:
            hub = connect(url)
            hub.attach()
            gaps: list[float] = []
            stop = False

            async def ticker() -> None:
                last = time.monotonic()
                while not stop:
                    await asyncio.sleep(0.005)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            tick = asyncio.create_task(ticker())
            results = [await hub.request_master("double", i) for i in range(100)]
            slow = hub.request_master("slow", 0)
            await asyncio.sleep(0.2)  # (the ticker runs while the reply is pending)
            results.append(await slow)
            stop = True
            await tick
            reports.put("results", results, max(gaps))
            hub.close()

        asyncio.run(main())

    async def master_main() -> None:
        hub = clusterhub.Hub(address=url, lease=LEASE)
        hub.attach()

        @hub.on("double")
        async def double(d: int, sender: Any) -> int:
            await asyncio.sleep(0)
            return 2 * d

        @hub.on("slow")
        async def slow(d: int, sender: Any) -> str:
            await asyncio.sleep(0.3)
            return "slow"

        pid = procs.start(worker)
        loop = asyncio.get_running_loop()
        tag, results, gap = await loop.run_in_executor(None, lambda: reports.get(timeout=30))
        assert results == [2 * i for i in range(100)] + ["slow"]
        assert gap < 0.15, gap
        await loop.run_in_executor(None, procs.join, pid)
        hub.close()

    asyncio.run(master_main())


def test_callbacks_may_wait_for_another_request(redis_server: RedisServer, procs: Procs,
                                                reports: Reports) -> None:
    """A request's callback (run where its reply was read: the dispatcher,
    or a thread reading for its own reply) may itself wait for another
    request's result: it is not run while the inbox is being read."""
    url = redis_server.url("cb")
    master = clusterhub.Hub(address=url, lease=LEASE)
    try:
        master.on("x", lambda d, s: d)
        master.on("slow", lambda d, s: time.sleep(0.2) or d)

        def worker() -> None:
            hub = connect(url)
            got: list[Any] = []
            done = threading.Event()

            def callback(err: Any, result: Any) -> None:
                got.append(hub.request_master("x", result + 1).result(timeout=5))
                done.set()

            hub.request_master("x", 1, callback=callback)  # (read by the dispatcher)
            assert done.wait(10)
            done.clear()
            hub.request_master("slow", 10, callback=callback)
            assert hub.request_master("slow", 20).result(10) == 20  # (this thread reads both replies)
            assert done.wait(10)
            reports.put("got", got)
            hub.close()

        procs.join(procs.start(worker))
        assert reports.get(timeout=5) == ("got", [2, 11])
    finally:
        master.close()


def test_on_exit_comes_after_the_requests_a_loop_left_to_send(redis_server: RedisServer, procs: Procs,
                                                                reports: Reports) -> None:
    """A worker's requests made on its asyncio loop are sent by a thread of
    the hub's; closing the hub sends them first, so the master handles all
    of them before its on_exit runs."""
    url = redis_server.url("loopexit")
    master = clusterhub.Hub(address=url, lease=LEASE)
    try:
        handled: list[int] = []
        at_exit: list[int] = []
        master.on("n", lambda d, s: handled.append(d))
        master.on_exit(lambda w: at_exit.append(len(handled)))

        def worker() -> None:
            async def main() -> None:
                hub = connect(url)
                for i in range(300):
                    hub.request_master("n", i)  # (not awaited: still queued when close() comes)
                hub.close()

            asyncio.run(main())

        procs.join(procs.start(worker))
        assert master.join(10)
        assert at_exit == [300] and handled == list(range(300))
    finally:
        master.close()


# ---- the server restarted mid-traffic ------------------------------------------------------


def test_server_restart_mid_traffic(redis_server: RedisServer, procs: Procs, reports: Reports) -> None:
    """A worker sends numbered messages while the server is killed and
    started again (no persistence): sends raise HubError while it is down;
    the master receives no message twice and none out of order, and
    messages flow again once the leases are back."""
    url = redis_server.url("restart")
    master = clusterhub.Hub(address=url, lease=LEASE)
    try:
        got: list[int] = []
        after = threading.Event()
        restarted_at = [0]

        def on_n(n: int, s: Any) -> None:
            got.append(n)
            if restarted_at[0] and n > restarted_at[0] + 50:
                after.set()

        master.on("n", on_n)
        stop = MP.Event()

        def worker() -> None:
            hub = connect(url, lease=LEASE)
            reports.put("joined", hub.worker_id)
            n, errors, last_err = 0, 0, None
            while not stop.is_set():
                try:
                    hub.send_to_master("n", n)
                except (HubError, WorkerDied, MasterDied) as e:
                    errors += 1
                    last_err = type(e).__name__
                    stop.wait(0.02)
                n += 1
            reports.put("sent", n, errors, last_err)
            hub.close()

        pid = procs.start(worker)
        joined(master, reports)
        wait_until(lambda: len(got) > 100, 10, "traffic")
        redis_server.restart()
        restarted_at[0] = got[-1] if got else 0
        assert after.wait(LEASE * 3 + 10), "messages did not flow again after the restart"
        stop.set()
        _, n, errors, last_err = reports.get(timeout=20)
        procs.join(pid)
        assert errors > 0 and last_err in ("ConnectError", "MasterDied", "HubError"), (errors, last_err)
        assert got == sorted(set(got)), "a message came twice or out of order"
        assert got[-1] > restarted_at[0]
    finally:
        close_quietly(master)


# ---- a connection lost without a word --------------------------------------------------


class BlackHoleProxy:
    """A TCP proxy (threads of the test process) in front of the server:
    ``swallow()`` makes every connection open now a black hole (what is sent
    on it is neither forwarded nor answered, and it stays open: a server
    host gone without a reset, a route dropped), while new ones work."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.gen = 0
        self.ls = socket.socket()
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(64)
        self.port = self.ls.getsockname()[1]
        self.socks: list[socket.socket] = [self.ls]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.server.port))
            self.socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b, self.gen), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, gen: int) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    return
                if gen == self.gen:
                    b.sendall(data)
        except OSError:
            pass

    def swallow(self) -> None:
        self.gen += 1

    def close(self) -> None:
        for s in self.socks:
            s.close()


def test_an_inbox_connection_lost_without_a_word_is_made_anew(redis_server: RedisServer, procs: Procs,
                                                                reports: Reports) -> None:
    """Every connection of a worker becomes a black hole: its renewal times
    out and it connects anew, but its inbox's blocking read would wait
    forever; it is dropped once it stays unanswered past its slice, and the
    worker reads its inbox again (a message sent after that arrives)."""
    proxy = BlackHoleProxy(redis_server)
    lease = 0.5
    master = clusterhub.Hub(address=redis_server.url("hole"), lease=lease)
    try:
        got = MP.Event()

        def worker() -> None:
            hub = clusterhub.connect(f"redis://127.0.0.1:{proxy.port}/0?name=hole", timeout=10)
            hub.on("m", lambda d, s: got.set())
            hub.on("ping", lambda d, s: "pong")
            reports.put("joined", hub.worker_id)
            threading.Event().wait()

        procs.start(worker)
        w = joined(master, reports)
        assert master.request_worker(w, "ping").result(10) == "pong"  # (its inbox is read, through the proxy)
        proxy.swallow()
        t0 = time.monotonic()
        while not got.is_set() and time.monotonic() - t0 < 30:
            try:
                for w in master.workers.values():
                    master.send_to_worker(w, "m", None, timeout=0.5)
            except (WorkerDied, SendTimeout):
                pass
            got.wait(0.5)  # (the worker comes back by itself: nothing to wait on here but its message)
        assert got.is_set(), "the worker never read its inbox again"
        print(f"the worker read its inbox again {time.monotonic() - t0:.1f} s after its connections went dead")
    finally:
        master.close()
        proxy.close()
