"""Fan-in: a master serving requests from many workers at once (4 and 16),
each worker looping ``hub.request_master("echo", x).result()`` for the same
window, against a hand-written server over ``multiprocessing`` Pipes (one per
client) that loops on ``multiprocessing.connection.wait`` and answers each
ready client's pickled request, its clients looping ``send`` / ``recv``.

Every client starts at the same stamp and stops at the first answer after the
window's end; the figure is the span (start to the last client's last answer)
over the requests answered in all, s per request (lower is better), with
``req_per_s`` (its inverse) and each client's share beside it.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
from typing import Any, Callable, ContextManager

from .. import Hub
from .host import (
    UNPINNED,
    Batch,
    Sample,
    expect,
    hosted,
    now_ns,
    pin_client,
    reap,
    run_forked,
    serve,
    sleep_until,
    stop,
)
from .jobs import Job, Target


def _echo(data: Any, sender: Any) -> Any:
    return data


def _client(conn: Any, call: Callable[[int], Any]) -> None:
    def batch(window: tuple[int, int]) -> tuple[int, int]:
        start, end = window
        sleep_until(start)
        n = 0
        while True:
            call(n)
            n += 1
            t = now_ns()
            if t >= end:
                return n, t

    serve(conn, batch)


def _window_batch(links: list[Any]) -> Batch:
    def batch(seconds: float) -> Sample:
        start = now_ns() + 30_000_000  # every client is asleep until then
        for link in links:
            link.send((start, start + int(seconds * 1e9)))
        done = [expect(link) for link in links]
        total = sum(n for n, _ in done)
        span = (max(t for _, t in done) - start) / 1e9
        shares = [n / total for n, _ in done]
        return {"t": span / total, "req_per_s": total / span, "requests": total, "min_share": min(shares)}

    return batch


def _serve_clients(conn: Any, workers: int, start: Callable[[Any], object]) -> None:
    """Start ``workers`` clients (``start(their_end)`` each), wait until all
    are ready, then time windows for the parent until it stops; the clients
    are told to stop in any case."""
    links: list[Any] = []
    try:
        for _ in range(workers):
            inner, theirs = mp.Pipe()
            start(theirs)
            theirs.close()
            links.append(inner)
        for link in links:
            expect(link)
        serve(conn, _window_batch(links))
    finally:
        for link in links:
            stop(link)


def _fanin_clusterhub_host(conn: Any, workers: int, placement: str) -> None:
    # The host is the master, answering "echo"; its workers make the requests.
    hub = Hub()
    hub.on("echo", _echo)

    def client(theirs: Any) -> None:
        pin_client(placement)
        _client(theirs, lambda i: hub.request_master("echo", i).result())

    try:
        _serve_clients(conn, workers, lambda theirs: hub.fork(client, theirs))
    finally:
        hub.close()


def _pipe_server(ends: list[Any]) -> None:
    live = list(ends)
    while live:
        ready: list[Any] = mpc.wait(live)
        for c in ready:
            try:
                c.send(c.recv())
            except EOFError:
                live.remove(c)


def _fanin_pipes_host(conn: Any, workers: int, placement: str) -> None:
    # The host only starts and times: the server is a process of its own, on
    # the serving side's CPU, and so is each client.
    pipes = [mp.Pipe() for _ in range(workers)]
    server = run_forked(_pipe_server, [b for _, b in pipes])
    pids: list[int] = []

    def client(theirs: Any, end: Any) -> None:
        pin_client(placement)

        def call(x: Any) -> Any:
            end.send(x)
            return end.recv()

        _client(theirs, call)

    ends = iter(a for a, _ in pipes)
    try:
        _serve_clients(conn, workers, lambda theirs: pids.append(run_forked(client, theirs, next(ends))))
    finally:
        for pid in pids:
            reap(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGKILL)
        reap(server)


def fanin_clusterhub(placement: str = UNPINNED, workers: int = 4) -> ContextManager[Batch]:
    return hosted(_fanin_clusterhub_host, workers, placement, placement=placement)


def fanin_pipes(placement: str = UNPINNED, workers: int = 4) -> ContextManager[Batch]:
    return hosted(_fanin_pipes_host, workers, placement, placement=placement)


def _fanin_job(workers: int) -> Job:
    return Job(
        f"fan-in-{workers}", f"s per request, {workers} workers requesting at once (1 / total requests/s)",
        {"clusterhub": fanin_clusterhub, "pipe-wait-server": fanin_pipes},
        size=0.3, rounds=7, smoke=0.02, params={"workers": workers},
        show=("req_per_s", "min_share"),
        targets=(Target("clusterhub", "pipe-wait-server", 1 / 1.5,
                        ">= 1.5 x the requests/s of a multiprocessing.connection.wait server"),),
    )


FAN_IN_4 = _fanin_job(4)
FAN_IN_16 = _fanin_job(16)
