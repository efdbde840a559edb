"""The conformance suite's harness: a master hub and a way to start workers,
the same calls whatever the transport.

A test takes the ``cluster`` fixture (tests/conformance/conftest.py), which
is parameterised by transport; today there is one, ``"forked"`` (workers
forked by ``hub.fork`` over socketpairs), ``"connected"`` (fork children
that join by address) and ``"redis"`` (fork children that join a master on a
real redis-server; see ``OverRedis`` for the modules it runs).  What a test may
rely on:

- ``cluster.hub`` is the master hub, in the test process (made by
  ``make_hub``: closed after the test, which fails if a worker outlived it, a
  request entry leaked or a dispatcher crashed).
- ``cluster.start(fn, *args)`` runs ``fn(hub, *args)`` in a new worker
  process, where ``hub`` is the worker's side of the hub, and returns the
  master's ``Worker`` for it.  Worker code uses that argument, never the
  master's hub (not through a closure either: a worker that connects by
  address has a hub of its own), and registers the handlers it needs itself:
  nothing registered on the master's hub is there.  A worker the master will
  send to calls ``ready(hub)`` once its handlers are registered, and the
  master waits for that (``start(..., ready=True)`` or ``wait_ready``);
  until then a message to it may find no handler.
- The worker process is forked from the test process whatever the transport
  (a connected worker is a forked child that connects), so worker code may
  use what fork shares with the test: the ``reports`` pipe, ``event()``s,
  anonymous shared memory, and closures over the test's other values.
- ``Worker`` handles give ``id``, ``pid``, ``is_alive()`` and ``join()``;
  the exit code and killing go through the cluster, which started the
  process: ``cluster.join(w, code)`` (the code the process exited with; a
  failed assertion in worker code exits 1) and ``cluster.kill(w)``.
- ``cluster.serve(handlers, n)`` starts ``n`` workers that register
  ``handlers`` (name -> ``fn(hub, data, sender)``), announce readiness and
  run until ``cluster.end(workers)``.
- ``cluster.spawn_master(body, *args, **hub_kwargs)`` runs ``body(sub, *args)``
  in a new process, with ``sub`` a cluster of the same transport whose master
  hub (made with ``hub_kwargs``) is in that process, which then waits to be
  killed: how a test kills a master (with ``subreaper()`` around it, to reap
  the workers it leaves).

A transport adds a subclass of :class:`Cluster` (``master_hub``, ``_start``,
``kill``, ``exit_code``) and its name to ``TRANSPORTS``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import os
import signal
import threading
import time
from typing import Any, Callable, ClassVar, Optional

import clusterhub
from clusterhub import WorkerDied
from clusterhub.process import exit_process, run_target

from conftest import kill_and_reap, run_forked, wait_blocked, waitpid_bounded

READY = "conformance:ready"  # worker -> master: my handlers are registered
END = "conformance:end"  # master -> a served worker: return


def ready(hub: clusterhub.Hub) -> None:
    """In a worker: tell the master that this worker's handlers are registered."""
    hub.send_to_master(READY)


def _serve(hub: clusterhub.Hub, handlers: dict[str, Callable[..., Any]]) -> None:
    end = threading.Event()
    for name, fn in handlers.items():
        hub.on(name, functools.partial(fn, hub))
    hub.on(END, lambda data, sender: end.set())
    ready(hub)
    assert end.wait(50)


class Cluster:
    """A master hub of one transport and the workers a test starts on it."""

    transport: ClassVar[str]

    def __init__(self, hub: clusterhub.Hub) -> None:
        self.hub = hub
        self._lock = threading.Lock()
        self._ready: dict[int, threading.Event] = {}
        hub.on(READY, lambda data, sender: self._ready_event(sender.id).set())

    # ---- what a transport implements ----------------------------------------

    @classmethod
    def master_hub(cls, make: Callable[..., clusterhub.Hub], **hub_kwargs: Any) -> clusterhub.Hub:
        """The master's hub of this transport, made by ``make`` (``make_hub``
        in the test process, ``clusterhub.Hub`` in a spawned master)."""
        raise NotImplementedError

    def _start(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> clusterhub.Worker:
        """Start a worker process running ``fn(worker_hub, *args)``; the master's Worker."""
        raise NotImplementedError

    def kill(self, w: clusterhub.Worker) -> None:
        """SIGKILL the worker's process (nothing if it has exited)."""
        raise NotImplementedError

    def exit_code(self, w: clusterhub.Worker) -> Optional[int]:
        """The exit code of an exited worker's process (``-N`` for signal N)."""
        raise NotImplementedError

    # ---- the same for every transport ---------------------------------------------

    def _ready_event(self, wid: int) -> threading.Event:
        with self._lock:
            return self._ready.setdefault(wid, threading.Event())

    def start(self, fn: Callable[..., Any], *args: Any, ready: bool = False) -> clusterhub.Worker:
        """Run ``fn(hub, *args)`` in a new worker; with ``ready``, return once
        it called ``ready(hub)``."""
        w = self._start(fn, args)
        if ready:
            self.wait_ready(w)
        return w

    def wait_ready(self, *workers: clusterhub.Worker, timeout: float = 10.0) -> None:
        """Wait until each of ``workers`` called ``ready(hub)``."""
        for w in workers:
            assert self._ready_event(w.id).wait(timeout), f"{w!r} was not ready within {timeout} s"

    def serve(self, handlers: Optional[dict[str, Callable[..., Any]]] = None, n: int = 1) -> list[clusterhub.Worker]:
        """``n`` workers that register ``handlers`` (name -> ``fn(hub, data,
        sender)``) and run until ``end``; returned once all are ready."""
        ws = [self.start(_serve, dict(handlers or {})) for _ in range(n)]
        self.wait_ready(*ws)
        return ws

    def end(self, ws: list[clusterhub.Worker]) -> None:
        """Tell the served workers still alive to return; wait until all exited."""
        for w in ws:
            if w.is_alive():
                with contextlib.suppress(WorkerDied):
                    self.hub.send_to_worker(w, END)
        for w in ws:
            assert w.join(15)

    def join(self, w: clusterhub.Worker, code: int = 0, timeout: float = 15.0) -> None:
        """Wait until the worker exited, and check its process's exit code."""
        assert w.join(timeout), f"{w!r} did not exit within {timeout} s"
        assert self.exit_code(w) == code, f"{w!r}: expected exit code {code}"

    def teardown(self) -> None:
        """After the test (the master hub is closed after this, by make_hub)."""

    def wait_blocked(self, pid: int) -> None:
        """Until the main thread of ``pid`` is blocked waiting for a lock."""
        wait_blocked(pid)

    def spawn_master(self, body: Callable[..., Any], *args: Any, **hub_kwargs: Any) -> int:
        """Run ``body(cluster, *args)`` in a new process with a master hub of its
        own (``Hub(**hub_kwargs)``); the process then waits to be killed.  Its pid."""
        cls = type(self)

        def run() -> None:
            body(cls(cls.master_hub(clusterhub.Hub, **hub_kwargs)), *args)
            threading.Event().wait()

        return run_forked(run)


def _forget_inherited_handlers(hub: clusterhub.Hub) -> None:
    """In a forked worker: remove the handlers it inherited from the master,
    so that a test relying on them fails here as it would with a worker that
    connects by address."""
    registry = getattr(getattr(hub, "_dispatcher", None), "registry", None)
    names = getattr(registry, "_by_name", None)
    assert isinstance(names, dict), "tests/conformance/cluster.py: the hub's handler registry moved"
    for name in list(names):
        hub.off(name)


class Forked(Cluster):
    """Workers forked by ``hub.fork``, over socketpairs."""

    transport = "forked"

    @classmethod
    def master_hub(cls, make: Callable[..., clusterhub.Hub], **hub_kwargs: Any) -> clusterhub.Hub:
        return make(**hub_kwargs)

    def _start(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> clusterhub.Worker:
        hub = self.hub

        def worker() -> None:
            _forget_inherited_handlers(hub)
            fn(hub, *args)

        return hub.fork(worker)

    def kill(self, w: clusterhub.Worker) -> None:
        w.kill()

    def exit_code(self, w: clusterhub.Worker) -> Optional[int]:
        return w.exitcode


_addresses = itertools.count(1)
JOINED = "conformance:joined"  # a connected worker -> master: I am here


class Connected(Cluster):
    """Processes the hub did not fork (plain fork children of the test
    process), which join the master by address with ``clusterhub.connect``."""

    transport = "connected"

    def __init__(self, hub: clusterhub.Hub) -> None:
        super().__init__(hub)
        self._joined: dict[int, "concurrent.futures.Future[clusterhub.Worker]"] = {}
        self._pids: list[int] = []
        hub.on(JOINED, self._on_joined)

    def _on_joined(self, pid: int, sender: clusterhub.Worker) -> None:
        with self._lock:
            fut = self._joined.setdefault(pid, concurrent.futures.Future())
        fut.set_result(sender)

    @classmethod
    def master_hub(cls, make: Callable[..., clusterhub.Hub], **hub_kwargs: Any) -> clusterhub.Hub:
        return make(address=f"@clusterhub-conformance-{os.getpid()}-{next(_addresses)}", **hub_kwargs)

    def _start(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> clusterhub.Worker:
        address = self.hub.address
        assert address is not None
        exit_on_death = self.hub._procs.exit_on_master_death

        def worker() -> None:
            for hub in list(clusterhub.hub._hubs):  # (inert here: this child joins by address)
                hub._abandon()
            # (as a forked worker of this master would: connect's own default is False)
            hub = clusterhub.connect(address, timeout=10, exit_on_master_death=exit_on_death)
            hub.send_to_master(JOINED, os.getpid())
            code = run_target(fn, (hub, *args), {})
            hub._procs.flush_master()  # (what it sent is delivered before it exits)
            exit_process(code)

        pid = run_forked(worker)
        self._pids.append(pid)
        with self._lock:
            fut = self._joined.setdefault(pid, concurrent.futures.Future())
        return fut.result(timeout=15)

    def kill(self, w: clusterhub.Worker) -> None:
        w.kill()

    def exit_code(self, w: clusterhub.Worker) -> Optional[int]:
        assert w.pid is not None
        code = waitpid_bounded(w.pid, 10)
        self._pids.remove(w.pid)
        return code

    def teardown(self) -> None:
        self.hub.close(timeout=2.0)  # (its workers then see MasterDied and exit)
        for pid in self._pids:
            if waitpid_bounded(pid, 10) is None:
                kill_and_reap([pid])


class OverRedis(Cluster):
    """Plain fork children of the test process that join a master on a real
    redis-server (``clusterhub.connect("redis://...")``), with an authkey
    (so entries are authenticated, and the serializer is pickle as for the
    other transports).  ``SUPPORTS`` names the test modules that run.
    Deaths are seen when a lease runs out (``LEASE``, short here)."""

    transport = "redis"
    SUPPORTS = ("test_locks", "test_messages", "test_requests", "test_processes")
    LEASE = 0.5
    AUTHKEY = b"conformance"
    server_url: ClassVar[Callable[[str], str]]  # set by the fixture: name -> address

    def __init__(self, hub: clusterhub.Hub) -> None:
        super().__init__(hub)
        self._pids: list[int] = []
        self._joined: dict[int, "concurrent.futures.Future[clusterhub.Worker]"] = {}
        hub.on(JOINED, self._on_joined)

    _on_joined = Connected._on_joined

    @classmethod
    def master_hub(cls, make: Callable[..., clusterhub.Hub], **hub_kwargs: Any) -> clusterhub.Hub:
        name = f"conformance-{os.getpid()}-{next(_addresses)}"
        hub_kwargs.setdefault("authkey", cls.AUTHKEY)
        return make(address=cls.server_url(name), lease=cls.LEASE, **hub_kwargs)

    def _start(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> clusterhub.Worker:
        address = self.hub.address
        assert address is not None
        authkey = self.hub._authkey
        exit_on_death = self.hub._exit_on_master_death

        def worker() -> None:
            for hub in list(clusterhub.hub._hubs):  # (inert here: this child joins by address)
                hub._abandon()
            # (as a forked worker of this master would: connect's own default is False)
            hub = clusterhub.connect(address, timeout=10, authkey=authkey, exit_on_master_death=exit_on_death)
            hub.send_to_master(JOINED, os.getpid())
            code = run_target(fn, (hub, *args), {})
            with contextlib.suppress(clusterhub.LockError):  # (still holding: its lease runs out instead)
                hub.close()
            exit_process(code)

        pid = run_forked(worker)
        self._pids.append(pid)
        with self._lock:
            fut = self._joined.setdefault(pid, concurrent.futures.Future())
        return fut.result(timeout=15)

    def kill(self, w: clusterhub.Worker) -> None:
        assert w.pid is not None
        os.kill(w.pid, signal.SIGKILL)

    def exit_code(self, w: clusterhub.Worker) -> Optional[int]:
        assert w.pid is not None
        code = waitpid_bounded(w.pid, 10)
        self._pids.remove(w.pid)
        return code

    def wait_blocked(self, pid: int) -> None:
        """Until the process's main thread sits in a blocking socket wait
        (its BLPOP, or the script call before it)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                with open(f"/proc/{pid}/syscall") as f:
                    nr = f.read().split(maxsplit=1)[0]
            except (OSError, IndexError):
                nr = ""
            if nr in _SOCKET_WAITS:
                return
            assert time.monotonic() < deadline, f"pid {pid} not blocked on its socket within 5 s"
            time.sleep(0.002)

    def teardown(self) -> None:
        self.hub.close(timeout=2.0)
        for pid in self._pids:
            if waitpid_bounded(pid, 10) is None:
                kill_and_reap([pid])


# poll, ppoll, recvfrom, read (x86_64 / aarch64 numbers; what a blocked socket read shows)
_SOCKET_WAITS = {"x86_64": {"7", "271", "45", "0"}, "aarch64": {"73", "207", "63"}}.get(os.uname().machine, set())

TRANSPORTS: dict[str, type[Cluster]] = {"forked": Forked, "connected": Connected, "redis": OverRedis}
