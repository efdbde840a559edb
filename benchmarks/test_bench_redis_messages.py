"""Messages over Redis: clusterhub's Redis engine against hand-written redis-py
peers, on the same redis-server in the same run, interleaved; medians.

The figures (lower is better), each a job of its own group:

- ``redis-round-trip``: a worker (``hub.fork``) of a master
  ``Hub(address="redis+unix://...", authkey=b"k")`` loops
  ``hub.request_master("echo", i).result()``; each round trip is timed alone
  in the requesting process, a batch is 500 of them and its figure their
  median (``p99_s``, ``max_s`` beside).  Peers, the same echo (pickled both
  ways) between two processes:

  - ``redis-streams``: the requester XADDs to a request stream, the responder
    waits in ``XREAD BLOCK`` and XADDs the reply to a reply stream the
    requester waits on in ``XREAD BLOCK``; each side XDELs the entry it
    consumed, pipelined with its next XADD (so the streams stay empty without
    a round trip of its own);
  - ``redis-pubsub``: the responder SUBSCRIBEs a request channel, the
    requester its reply channel; each PUBLISHes to the other's.

- ``redis-one-way``: a worker's ``hub.send_to_master("m", i)`` loop, counted
  by a master handler: s per message from the sender's stamp before the first
  send to the master's stamp in the handler of the last (CLOCK_MONOTONIC, one
  clock for every process); ``msgs_per_s`` beside.  Peer ``redis-pubsub``: a
  PUBLISH loop to one subscriber process that unpickles and counts.
- ``redis-broadcast-8``: the master's ``hub.send_to_workers("b", i)`` loop to
  8 workers, each counting in a handler and then telling the master
  (``send_to_master("done", stamp)``): s per broadcast from the master's stamp
  before the first to the latest worker's stamp at its last;
  ``broadcasts_per_s`` beside.  Peer ``redis-pubsub``: a PUBLISH loop to a
  channel 8 subscriber processes count on (each signals its stamp over its
  control pipe).
- ``test_redis_memory_flat`` (not a job; skipped unless
  ``CLUSTERHUB_MEMORY_SECONDS`` is set, or ``CLUSTERHUB_LONG=1`` for the
  default 60 s): steady traffic for that long (a worker looping requests,
  another one-way sends, the master broadcasting to both) while the pytest
  process samples the server's ``INFO memory`` and the hub's keys every
  ``seconds / 12`` (at least 1 s): used_memory must not grow by more than
  1 MiB from the sample after the warm-up (the first at or past ``seconds /
  6``) to the last, and no ``{ch:<name>}:inbox:*`` list may keep growing.

Every hub and peer is on the run's one redis-server (``_redis.server()``, on
a Unix socket, no persistence), started on first use and stopped at the end
of the module, as for the Redis lock benchmarks.  Unpinned only.  Samples
also carry ``cpu_per_op_s`` (CPU of the case's processes per operation) and
``server_cpu_per_op_s`` (redis-server's).

Through the ``measure`` fixture (``conftest.py``): with ``--benchmark-disable``
(the default) each test runs one small batch of its own case, a smoke test of
a few seconds; enabled, every case of a group is measured interleaved, the
summary prints the medians and the targets' verdicts (the ratios there are of
the time figures: clusterhub/peer), and after it this module prints every
round trip pooled (p50, p99, max; the warm-up batches left out), the rates
with clusterhub's rate / the peer's, and the memory run's samples.  Without
redis-py or ``redis-server``, every case skips with the reason.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import statistics
import threading
import time
from typing import Any, Callable, ContextManager, Iterator, Optional

import pytest

from clusterhub import Hub
from clusterhub.bench.host import (
    UNPINNED,
    Batch,
    Countdown,
    Host,
    Sample,
    Unavailable,
    ask,
    expect,
    group_pids,
    hosted,
    now_ns,
    process_cpu_ns,
    reap,
    report,
    run_forked,
    serve,
    stop,
)
from clusterhub.bench.jobs import Job, Target

from ._redis import MISSING, module_run, pooled_lines, redis, server, stats, unique

AUTHKEY = b"k"  # (an authkey: pickle, every entry behind an HMAC)
CASES = ("clusterhub", "redis-streams", "redis-pubsub")
RECEIVERS = 8  # workers / subscribers of the broadcast
TIMEOUT = 30.0  # s: the longest any process waits for another (or for the server)
BLOCK_MS = 1000  # a peer responder's blocking read, after which it checks that its host is still there
MIB = 1024 * 1024
RATES = ("msgs_per_s", "broadcasts_per_s")  # a throughput sample's rate

# group -> case -> every round-trip latency (s) of its batches, the warm-up batch left out
_pooled: dict[str, dict[str, list[float]]] = {}
# group -> case -> the rate (/s) of each of its batches, the warm-up batch left out
_rates: dict[str, dict[str, list[float]]] = {}
# what the memory run found (the summary prints it)
_memory: dict[str, Any] = {}


def _why_missing() -> Optional[str]:
    """Why no case can run here (redis-py or redis-server missing), else None."""
    return MISSING.get("clusterhub")


def _address(path: str, what: str) -> str:
    return f"redis+unix://{path}?db=0&name={unique(f'bench-{what}')}"


def _client(path: str) -> Any:
    """A peer's connection: redis-py's defaults, but with a socket timeout as
    clusterhub's own connections have (so that no read can hang; past the
    longest blocking command's own timeout)."""
    return redis.Redis(unix_socket_path=path, socket_timeout=TIMEOUT + 5)


# ---- every case: hosted, the CPU per operation, pooled figures ----------------------


def observed(group: str, case: str, make: Callable[[str], ContextManager[Host]]) -> Callable[..., Any]:
    """A case of ``group``: the host ``make(socket path)`` starts (after the
    run's server is up), each batch's sample completed with the CPU per
    operation (its ``n``) of the case's processes and of the server, and its
    latencies (``lat``) or rate (one of ``RATES``) kept for the pooled summary, except
    the first batch's (the warm-up of ``measure_job``)."""

    @contextlib.contextmanager
    def case_cm(placement: str = UNPINNED, **params: Any) -> Iterator[Batch]:
        if placement != UNPINNED:
            raise Unavailable("the Redis message benchmarks run unpinned only")
        srv = server()
        batches = 0
        with make(srv.path) as host:

            def batch(size: Any) -> Sample:
                nonlocal batches
                pids = group_pids(host.pid)
                c0, s0 = sum(map(process_cpu_ns, pids)), srv.cpu_ns()
                sample = host(size)
                c1, s1 = sum(map(process_cpu_ns, pids)), srv.cpu_ns()
                lat = sample.pop("lat", None)
                sample["cpu_per_op_s"] = (c1 - c0) / 1e9 / sample["n"]
                sample["server_cpu_per_op_s"] = (s1 - s0) / 1e9 / sample["n"]
                batches += 1
                if batches > 1:
                    if lat:
                        _pooled.setdefault(group, {}).setdefault(case, []).extend(lat)
                    for key in RATES:
                        if key in sample:
                            _rates.setdefault(group, {}).setdefault(case, []).append(sample[key])
                return sample

            yield batch

    return case_cm


def _job(name: str, figure: str, cases: dict[str, Callable[[str], ContextManager[Host]]], **kw: Any) -> Job:
    present = {} if _why_missing() else cases
    return Job(name, figure, {c: observed(name, c, make) for c, make in present.items()}, **kw)


def _case_params(cases: tuple[str, ...]) -> list[Any]:
    why = _why_missing()
    return [c if why is None else pytest.param(c, marks=pytest.mark.skip(reason=why)) for c in cases]


# ---- the peers' reading -------------------------------------------------------------


def _subscribe(p: Any, channel: str) -> None:
    """SUBSCRIBE, and wait for the server's confirmation (so that a PUBLISH
    sent after this returns reaches us)."""
    p.subscribe(channel)
    msg = p.get_message(timeout=TIMEOUT)
    if msg is None or msg["type"] != "subscribe":
        raise RuntimeError(f"no confirmation of SUBSCRIBE {channel} within {TIMEOUT} s: {msg!r}")


def _next_message(p: Any, timeout: float = TIMEOUT) -> Optional[bytes]:
    """The data of the next message on a subscribed ``PubSub`` (None after
    ``timeout`` s without one)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = p.get_message(timeout=max(0.0, deadline - time.monotonic()))
        if msg is None:
            return None
        if msg["type"] == "message":
            data: bytes = msg["data"]
            return data


def _must(data: Optional[bytes], what: str) -> bytes:
    if data is None:
        raise TimeoutError(f"no {what} within {TIMEOUT} s")
    return data


def _orphaned(parent: int) -> bool:
    """True when this process's host is gone (a peer responder then leaves)."""
    return os.getppid() != parent


# ---- 1. request round trip ------------------------------------------------------------


def _requester(call: Callable[[int], Any]) -> Callable[[int], Sample]:
    """The requester's batch: ``n`` round trips, each timed alone and checked."""

    def batch(n: int) -> Sample:
        clock = time.perf_counter_ns
        lat = []
        for i in range(n):
            t0 = clock()
            got = call(i)
            lat.append(clock() - t0)
            if got != i:
                raise AssertionError(f"round trip {i} answered {got!r}")
        secs = [x / 1e9 for x in lat]
        return {**stats(secs), "mean_s": sum(secs) / n, "n": n, "lat": secs}

    return batch


def _echo(data: Any, sender: Any) -> Any:
    return data


def _rt_worker(theirs: Any, hub: Any) -> None:
    serve(theirs, _requester(lambda i: hub.request_master("echo", i).result(TIMEOUT)))


def _rt_clusterhub_host(conn: Any, path: str) -> None:
    # The host is the master, answering "echo"; its worker makes the requests
    # and times them (the host relays each batch to it).
    hub = Hub(address=_address(path, "rt"), authkey=AUTHKEY)
    try:
        hub.on("echo", _echo)
        inner, theirs = mp.Pipe()
        hub.fork(_rt_worker, theirs, hub)
        theirs.close()
        try:
            expect(inner, TIMEOUT)
            serve(conn, lambda n: ask(inner, n, TIMEOUT))
        finally:
            stop(inner)
    finally:
        hub.close()


class StreamsEcho:
    """Request/reply over two streams (see the module doc).  Transport
    protocol as the kit's ``PipeEcho``: ``prepare`` in the host, ``serve`` in
    the forked responder (it reports on ``ready`` once it can answer),
    ``client() -> call(x)`` in the host (the requester), ``close``."""

    def prepare(self, path: str) -> None:
        self.path = path
        base = unique("bench:rt:streams")
        self.req, self.rep = f"{base}:req", f"{base}:rep"

    def serve(self, ready: Any) -> None:
        r = _client(self.path)
        report(ready, None)
        parent, last = os.getppid(), b"0-0"
        while True:
            got = r.xread({self.req: last}, count=1, block=BLOCK_MS)
            if not got:
                if _orphaned(parent):
                    return
                continue
            eid, fields = got[0][1][0]
            last = eid
            pipe = r.pipeline(transaction=False)
            pipe.xadd(self.rep, {b"d": pickle.dumps(pickle.loads(fields[b"d"]))})
            pipe.xdel(self.req, eid)
            pipe.execute()

    def client(self) -> Callable[[Any], Any]:
        r, req, rep = _client(self.path), self.req, self.rep
        last: Optional[bytes] = None  # the reply consumed last, deleted with the next request

        def call(x: Any) -> Any:
            nonlocal last
            payload = {b"d": pickle.dumps(x)}
            if last is None:
                r.xadd(req, payload)
            else:
                pipe = r.pipeline(transaction=False)
                pipe.xdel(rep, last)
                pipe.xadd(req, payload)
                pipe.execute()
            got = r.xread({rep: last or b"0-0"}, count=1, block=int(TIMEOUT * 1000))
            if not got:
                raise TimeoutError(f"no reply on {rep} within {TIMEOUT} s")
            eid, fields = got[0][1][0]
            last = eid
            return pickle.loads(fields[b"d"])

        return call

    def close(self) -> None:
        with contextlib.suppress(Exception), _client(self.path) as r:
            r.delete(self.req, self.rep)


class PubSubEcho:
    """Request/reply over PUBLISH: the responder SUBSCRIBEs the request
    channel, the requester its reply channel."""

    def prepare(self, path: str) -> None:
        self.path = path
        base = unique("bench:rt:pubsub")
        self.req, self.rep = f"{base}:req", f"{base}:rep"

    def serve(self, ready: Any) -> None:
        r = _client(self.path)
        p = r.pubsub()
        _subscribe(p, self.req)
        report(ready, None)
        parent = os.getppid()
        while True:
            data = _next_message(p, BLOCK_MS / 1000)
            if data is None:
                if _orphaned(parent):
                    return
                continue
            r.publish(self.rep, pickle.dumps(pickle.loads(data)))

    def client(self) -> Callable[[Any], Any]:
        r, req = _client(self.path), self.req
        p = r.pubsub()
        _subscribe(p, self.rep)

        def call(x: Any) -> Any:
            if r.publish(req, pickle.dumps(x)) != 1:
                raise RuntimeError(f"nobody subscribed to {req}")
            return pickle.loads(_must(_next_message(p), "reply"))

        return call

    def close(self) -> None:
        pass


def _rt_peer_host(conn: Any, transport: Any, path: str) -> None:
    # The host is the requester; the responder is forked from it and says when
    # it is ready (subscribed, connected).
    transport.prepare(path)
    ours, theirs = mp.Pipe()
    pid = run_forked(transport.serve, theirs)
    theirs.close()
    try:
        expect(ours, TIMEOUT)
        serve(conn, _requester(transport.client()))
    finally:
        ours.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        reap(pid)
        transport.close()


def _rt_peer(transport: type) -> Callable[[str], ContextManager[Host]]:
    return lambda path: hosted(_rt_peer_host, transport(), path)


ROUND_TRIP = _job(
    "redis-round-trip", "s per request round trip between two processes over Redis (median of 500 each timed alone)",
    {"clusterhub": lambda path: hosted(_rt_clusterhub_host, path),
     "redis-streams": _rt_peer(StreamsEcho), "redis-pubsub": _rt_peer(PubSubEcho)},
    size=500, rounds=15, smoke=20, show=("p99_s", "cpu_per_op_s", "server_cpu_per_op_s"),
    targets=(Target("clusterhub", "redis-streams", 1.0, "<= 1.0 x a hand-written Streams request/reply"),),
)


# ---- 2. one-way messages, worker -> master, all handled ---------------------------------


def _one_way_sample(n: int, t0: int, t1: int) -> Sample:
    return {"t": (t1 - t0) / n / 1e9, "msgs_per_s": n * 1e9 / (t1 - t0), "n": n}


def _ow_sender(theirs: Any, hub: Any) -> None:
    def batch(n: int) -> int:
        t0 = now_ns()
        for i in range(n):
            hub.send_to_master("m", i)
        return t0

    serve(theirs, batch)


def _ow_clusterhub_host(conn: Any, path: str) -> None:
    # The host is the master, counting in its handler; a worker sends.
    hub = Hub(address=_address(path, "ow"), authkey=AUTHKEY)
    try:
        count = Countdown()
        hub.on("m", count.hit)
        inner, theirs = mp.Pipe()
        hub.fork(_ow_sender, theirs, hub)
        theirs.close()

        def batch(n: int) -> Sample:
            count.arm(n)
            t0 = ask(inner, n, TIMEOUT)
            return _one_way_sample(n, t0, count.wait(TIMEOUT))

        try:
            expect(inner, TIMEOUT)
            serve(conn, batch)
        finally:
            stop(inner)
    finally:
        hub.close()


def _ow_peer_sender(theirs: Any, path: str, channel: str) -> None:
    r = _client(path)

    def batch(n: int) -> int:
        publish = r.publish
        t0 = now_ns()
        for i in range(n):
            if publish(channel, pickle.dumps(i)) != 1:
                raise RuntimeError(f"nobody subscribed to {channel}")
        return t0

    serve(theirs, batch)


def _ow_peer_host(conn: Any, path: str) -> None:
    # The host is the subscriber (subscribed before the sender forks), counting
    # what it receives; a forked process PUBLISHes.
    channel = unique("bench:ow")
    r = _client(path)
    p = r.pubsub()
    _subscribe(p, channel)
    inner, theirs = mp.Pipe()
    pid = run_forked(_ow_peer_sender, theirs, path, channel)
    theirs.close()

    def batch(n: int) -> Sample:
        inner.send(n)
        for _ in range(n):
            pickle.loads(_must(_next_message(p), "message"))
        t1 = now_ns()
        return _one_way_sample(n, expect(inner, TIMEOUT), t1)

    try:
        expect(inner, TIMEOUT)
        serve(conn, batch)
    finally:
        stop(inner)
        reap(pid)
        p.close()
        r.close()


ONE_WAY = _job(
    "redis-one-way", "s per small message, worker -> master over Redis, all handled (1 / msgs/s)",
    {"clusterhub": lambda path: hosted(_ow_clusterhub_host, path),
     "redis-pubsub": lambda path: hosted(_ow_peer_host, path)},
    size=4000, rounds=11, smoke=100, show=("msgs_per_s", "cpu_per_op_s", "server_cpu_per_op_s"),
    targets=(Target("clusterhub", "redis-pubsub", 1.0, ">= 1 x PUBLISH to one subscriber's msgs/s"),),
)


# ---- 3. broadcast to 8 workers, all handled ------------------------------------------------


class _Stamps:
    """The "done" messages of a broadcast batch: one stamp per receiver."""

    def __init__(self) -> None:
        self.arm(0)

    def arm(self, k: int) -> None:
        self.got: list[int] = []
        self.want = k
        self.done = threading.Event()

    def hit(self, data: Any, sender: Any) -> None:
        self.got.append(data)
        if len(self.got) == self.want:
            self.done.set()

    def wait(self, timeout: float) -> list[int]:
        if not self.done.wait(timeout):
            raise TimeoutError(f"{len(self.got)} of {self.want} 'done' messages after {timeout} s")
        return self.got


def _broadcast_sample(m: int, t0: int, t1: int) -> Sample:
    return {"t": (t1 - t0) / m / 1e9, "broadcasts_per_s": m * 1e9 / (t1 - t0), "n": m}


def _bc_worker(theirs: Any, hub: Any, count: Countdown) -> None:
    def batch(m: int) -> int:
        count.arm(m)
        report(theirs, "armed")
        t1 = count.wait(TIMEOUT)
        hub.send_to_master("done", t1)
        return t1

    serve(theirs, batch)


def _bc_clusterhub_host(conn: Any, path: str, receivers: int) -> None:
    hub = Hub(address=_address(path, "bc"), authkey=AUTHKEY)
    links: list[Any] = []
    try:
        count, stamps = Countdown(), _Stamps()
        hub.on("b", count.hit)  # (inherited by the workers; never called in the master)
        hub.on("done", stamps.hit)
        for _ in range(receivers):
            inner, theirs = mp.Pipe()
            hub.fork(_bc_worker, theirs, hub, count)
            theirs.close()
            links.append(inner)
        for link in links:
            expect(link, TIMEOUT)

        def batch(m: int) -> Sample:
            stamps.arm(len(links))
            for link in links:
                if ask(link, m, TIMEOUT) != "armed":
                    raise RuntimeError("a worker did not arm")
            t0 = now_ns()
            for i in range(m):
                hub.send_to_workers("b", i)
            got = stamps.wait(TIMEOUT)
            told = [expect(link, TIMEOUT) for link in links]
            if sorted(got) != sorted(told):
                raise AssertionError(f"the 'done' stamps {sorted(got)} are not the workers' {sorted(told)}")
            return _broadcast_sample(m, t0, max(got))

        serve(conn, batch)
    finally:
        for link in links:
            stop(link)
        hub.close()


def _bc_peer_receiver(theirs: Any, path: str, channel: str) -> None:
    r = _client(path)
    p = r.pubsub()
    _subscribe(p, channel)

    def batch(m: int) -> int:
        report(theirs, "armed")
        for _ in range(m):
            pickle.loads(_must(_next_message(p), "broadcast"))
        return now_ns()

    serve(theirs, batch)


def _bc_peer_host(conn: Any, path: str, receivers: int) -> None:
    channel = unique("bench:bc")
    r = _client(path)
    links: list[Any] = []
    pids: list[int] = []
    try:
        for _ in range(receivers):
            inner, theirs = mp.Pipe()
            pids.append(run_forked(_bc_peer_receiver, theirs, path, channel))
            theirs.close()
            links.append(inner)
        for link in links:
            expect(link, TIMEOUT)  # subscribed

        def batch(m: int) -> Sample:
            for link in links:
                if ask(link, m, TIMEOUT) != "armed":
                    raise RuntimeError("a subscriber did not arm")
            publish = r.publish
            t0 = now_ns()
            for i in range(m):
                if publish(channel, pickle.dumps(i)) != receivers:
                    raise RuntimeError(f"fewer than {receivers} subscribers on {channel}")
            return _broadcast_sample(m, t0, max(expect(link, TIMEOUT) for link in links))

        serve(conn, batch)
    finally:
        for link in links:
            stop(link)
        for pid in pids:
            reap(pid)
        r.close()


BROADCAST = _job(
    f"redis-broadcast-{RECEIVERS}", f"s per broadcast to {RECEIVERS} processes over Redis, all handled (1 / rate)",
    {"clusterhub": lambda path: hosted(_bc_clusterhub_host, path, RECEIVERS),
     "redis-pubsub": lambda path: hosted(_bc_peer_host, path, RECEIVERS)},
    size=1000, rounds=11, smoke=20, show=("broadcasts_per_s", "cpu_per_op_s", "server_cpu_per_op_s"),
    targets=(Target("clusterhub", "redis-pubsub", 1.0,
                    f">= 1 x a PUBLISH loop to {RECEIVERS} subscribers' broadcasts/s"),),
)


# ---- 4. the server's memory under steady traffic ----------------------------------------

LONG = os.environ.get("CLUSTERHUB_LONG") == "1"
MEMORY_SECONDS = float(os.environ.get("CLUSTERHUB_MEMORY_SECONDS") or 60)
MEMORY_RUN = bool(os.environ.get("CLUSTERHUB_MEMORY_SECONDS")) or LONG
MEMORY_GROWTH = 1 * MIB  # the most used_memory may grow after the warm-up
INBOX_GROWTH = 1000  # entries: an inbox longer by more, at every sample after the warm-up, keeps growing


class _Counter:
    """Counts handled messages; ``wait_for(k)`` until it has counted ``k``."""

    def __init__(self) -> None:
        self.n = 0
        self.changed = threading.Condition()

    def hit(self, data: Any = None, sender: Any = None) -> None:
        with self.changed:
            self.n += 1
            self.changed.notify_all()

    def wait_for(self, k: int, timeout: float) -> int:
        with self.changed:
            self.changed.wait_for(lambda: self.n >= k, timeout)
            return self.n


def _mem_worker(theirs: Any, hub: Any, ticks: _Counter, role: str) -> None:
    def batch(end: int) -> dict[str, int]:
        report(theirs, "going")
        n = 0
        while True:
            for _ in range(64):
                if role == "request":
                    if hub.request_master("echo", n).result(TIMEOUT) != n:
                        raise AssertionError("a wrong answer")
                else:
                    hub.send_to_master("m", n)
                n += 1
            if now_ns() >= end:
                return {role: n, "ticks": ticks.n}

    serve(theirs, batch)


def _memory_host(conn: Any, address: str) -> None:
    # The master answers "echo" and counts "m"; one worker loops requests,
    # another one-way sends, and the master broadcasts "tick" to both, each
    # as fast as it goes, until the end the parent gives.
    hub = Hub(address=address, authkey=AUTHKEY)
    links: list[Any] = []
    try:
        handled, ticks = _Counter(), _Counter()
        hub.on("echo", _echo)
        hub.on("m", handled.hit)
        hub.on("tick", ticks.hit)  # (the workers')
        for role in ("request", "send"):
            inner, theirs = mp.Pipe()
            hub.fork(_mem_worker, theirs, hub, ticks, role)
            theirs.close()
            links.append(inner)
        for link in links:
            expect(link, TIMEOUT)

        def batch(end: int) -> dict[str, Any]:
            for link in links:
                link.send(end)
            for link in links:
                if expect(link, TIMEOUT) != "going":
                    raise RuntimeError("a worker did not start")
            sent = 0
            while now_ns() < end:
                for _ in range(16):
                    hub.send_to_workers("tick", sent)
                    sent += 1
            wait = (end - now_ns()) / 1e9 + TIMEOUT
            done = [expect(link, max(TIMEOUT, wait)) for link in links]
            out = {"broadcasts": sent, **{k: v for d in done for k, v in d.items() if k != "ticks"},
                   "ticks": [d["ticks"] for d in done]}
            out["handled"] = handled.wait_for(out["send"], TIMEOUT)  # (the master's dispatcher catching up)
            return out

        serve(conn, batch, ready=[os.getpid(), *(w.pid for w in hub.workers.values())])
    finally:
        for link in links:
            stop(link)
        hub.close()


def _rss_kib(pid: int) -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _memory_sample(r: Any, prefix: bytes, t0: float, pids: list[int]) -> dict[str, Any]:
    """used_memory, the hub's keys by family, each inbox's length, the bytes
    queued, and the RSS of the case's processes."""
    used = int(r.info("memory")["used_memory"])
    families: collections.Counter[str] = collections.Counter()
    inboxes: dict[str, int] = {}
    queued = 0
    for key in r.scan_iter(match=prefix + b"*", count=1000):
        rest = key[len(prefix):].decode()
        families[rest.split(":", 1)[0]] += 1
        if rest.startswith("inbox:"):
            inboxes[rest] = int(r.llen(key))
        elif rest.startswith("queued:"):
            queued += int(r.get(key) or 0)
    return {"t_s": round(time.monotonic() - t0, 2), "used_memory": used, "keys": dict(sorted(families.items())),
            "inboxes": dict(sorted(inboxes.items())), "queued_bytes": queued,
            "rss_kib": [_rss_kib(pid) for pid in pids]}


def _growing(samples: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The inboxes longer at every sample than at the one before, by more
    than INBOX_GROWTH in all (their lengths)."""
    grew = {}
    for key in {k for s in samples for k in s["inboxes"]}:
        lens = [s["inboxes"].get(key, 0) for s in samples]
        if len(lens) > 1 and all(b > a for a, b in zip(lens, lens[1:])) and lens[-1] - lens[0] > INBOX_GROWTH:
            grew[key] = lens
    return grew


def _memory_run(seconds: float) -> dict[str, Any]:
    srv = server()
    name = unique("bench-mem")
    prefix = b"{ch:" + name.encode() + b"}:"
    interval = max(1.0, seconds / 12)
    warm_after = max(interval, seconds / 6)
    r = srv.client(socket_timeout=TIMEOUT)
    try:
        before = int(r.info("memory")["used_memory"])
        with hosted(_memory_host, f"redis+unix://{srv.path}?db=0&name={name}") as host:
            pids = list(host.ready)
            idle = _memory_sample(r, prefix, time.monotonic(), pids)
            t0 = time.monotonic()
            end = now_ns() + int(seconds * 1e9)
            host.conn.send(end)  # the traffic, until end; the host answers with its counts after it
            samples = []
            while True:
                samples.append(_memory_sample(r, prefix, t0, pids))
                left = (end - now_ns()) / 1e9
                if left <= 0.05:
                    break
                time.sleep(min(interval, left))  # (the sampling's pace, not a synchronization)
            counts = expect(host.conn, TIMEOUT * 2)
            drained = _memory_sample(r, prefix, t0, pids)
        closed = _memory_sample(r, prefix, t0, [])  # (what the hub left on the server)
        after = closed["used_memory"]
    finally:
        r.close()
    warm = next((s for s in samples if s["t_s"] >= warm_after), samples[-1])
    steady = samples[samples.index(warm):]
    return {"seconds": seconds, "interval_s": interval, "warm_after_s": warm_after, "used_before_hub": before,
            "idle": idle, "samples": samples, "warm": warm, "last": samples[-1], "drained": drained,
            "closed": closed, "used_after_close": after, "growth": samples[-1]["used_memory"] - warm["used_memory"],
            "growing_inboxes": _growing(steady), "counts": counts}


# ---- the tests ------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _redis_run(request: pytest.FixtureRequest) -> Iterator[None]:
    """The pooled summary after the conftest's; the server stopped after the module."""
    yield from module_run(request.config, _SUMMARY, "redis-messages-pooled-summary")


@pytest.mark.benchmark(group=ROUND_TRIP.name)
@pytest.mark.parametrize("case", _case_params(CASES))
def test_redis_round_trip(measure: Any, case: str) -> None:
    """A worker's request_master("echo", i).result(), each timed alone, against Streams and PUBLISH request/reply."""
    summary = measure(ROUND_TRIP, case)
    assert summary["t"] > 0


@pytest.mark.benchmark(group=ONE_WAY.name)
@pytest.mark.parametrize("case", _case_params(("clusterhub", "redis-pubsub")))
def test_redis_one_way(measure: Any, case: str) -> None:
    """send_to_master from a worker, counted by a master handler, against PUBLISH to one subscriber."""
    summary = measure(ONE_WAY, case)
    assert summary["msgs_per_s"] > 0


@pytest.mark.benchmark(group=BROADCAST.name)
@pytest.mark.parametrize("case", _case_params(("clusterhub", "redis-pubsub")))
def test_redis_broadcast(measure: Any, case: str) -> None:
    """send_to_workers to 8 workers until each handled the last, against a PUBLISH loop to 8 subscribers."""
    summary = measure(BROADCAST, case)
    assert summary["broadcasts_per_s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(_why_missing() is not None, reason=_why_missing() or "")
@pytest.mark.skipif(not MEMORY_RUN, reason="long memory run: set CLUSTERHUB_MEMORY_SECONDS=<s> "
                                           "(or CLUSTERHUB_LONG=1 for 60 s)")
@pytest.mark.timeout(MEMORY_SECONDS + 3 * TIMEOUT + 30)
@pytest.mark.benchmark(group="redis-memory")
def test_redis_memory_flat(benchmark: Any) -> None:
    """Steady requests, one-way sends and broadcasts for CLUSTERHUB_MEMORY_SECONDS: the server's used_memory
    flat after the warm-up (<= 1 MiB growth), no inbox list growing.  The benchmark's figure is the run's length."""
    got: dict[str, Any] = {}

    def run() -> None:
        got.update(_memory_run(MEMORY_SECONDS))

    benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    _memory.update(got)
    benchmark.extra_info.update(
        seconds=got["seconds"], growth_bytes=got["growth"], bound_bytes=MEMORY_GROWTH,
        used_memory=[(s["t_s"], s["used_memory"]) for s in got["samples"]],
        warm_at_s=got["warm"]["t_s"], drained=got["drained"], counts=got["counts"],
        growing_inboxes=got["growing_inboxes"],
    )
    counts = got["counts"]
    assert counts["handled"] == counts["send"], f"the master handled {counts['handled']} of {counts['send']} sends"
    assert not got["growing_inboxes"], f"inbox lists kept growing: {got['growing_inboxes']}"
    assert got["growth"] <= MEMORY_GROWTH, (
        f"used_memory grew by {got['growth']} bytes from {got['warm']['t_s']} s to {got['last']['t_s']} s "
        f"(bound {MEMORY_GROWTH}): {[(s['t_s'], s['used_memory']) for s in got['samples']]}"
    )


# ---- the pooled summary -----------------------------------------------------------------------


class _PooledSummary:
    """A plugin (registered by ``_redis_run``) printing every round trip
    pooled, the rates and the memory run, after the conftest's summary."""

    conditions = ""

    @pytest.hookimpl(hookwrapper=True)
    def pytest_terminal_summary(self, terminalreporter: Any) -> Iterator[None]:
        yield
        if not (_pooled or _rates or _memory):
            return
        tr = terminalreporter
        tr.write_sep("=", "Redis messages: every sample pooled (warm-up batches left out)")
        if self.conditions:
            tr.write_line(self.conditions + "; clusterhub authkey set (pickle + HMAC)")
        for group, cases in _pooled.items():
            tr.write_line("")
            tr.write_line(f"{group}: each round trip timed alone")
            for line in pooled_lines(cases):
                tr.write_line(line)
        for group, cases in _rates.items():
            tr.write_line("")
            tr.write_line(f"{group}: rate, median of the batches (higher is better)")
            med = {c: statistics.median(xs) for c, xs in cases.items()}
            for c, v in med.items():
                line = f"  {c:<20} {v:>12,.0f} /s"
                if "clusterhub" in med and c != "clusterhub":
                    line += f"  clusterhub rate / {c} rate = {med['clusterhub'] / v:.2f}"
                tr.write_line(line)
        if _memory:
            m = _memory
            tr.write_line("")
            tr.write_line(f"redis-memory: {m['seconds']:.0f} s of steady traffic, a sample every "
                          f"{m['interval_s']:.1f} s (warm-up until {m['warm_after_s']:.1f} s); "
                          f"used_memory {m['used_before_hub']:,} B before the hub")
            for s in [m["idle"], *m["samples"], m["drained"]]:
                tag = "idle" if s is m["idle"] else "drained" if s is m["drained"] else f"{s['t_s']:>6.1f} s"
                tr.write_line(f"  {tag:>8}  used_memory {s['used_memory']:>12,} B  queued {s['queued_bytes']:>9,} B  "
                              f"inboxes {s['inboxes']}  keys {s['keys']}  rss KiB {s['rss_kib']}")
            tr.write_line(f"  growth after the warm-up {m['growth']:+,} B (bound {MEMORY_GROWTH:,}); "
                          f"after the hub closed {m['used_after_close'] - m['used_before_hub']:+,} B "
                          f"(its keys left: {m['closed']['keys']}); "
                          f"growing inboxes {m['growing_inboxes'] or 'none'}; counts {m['counts']}")


_SUMMARY = _PooledSummary()
