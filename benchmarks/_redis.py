"""Redis for the Redis lock benchmarks (``test_bench_redis_locks.py``): one
``redis-server`` for the whole run, and the three locks over it as the kit's
``LockKind``s (made in a case's host, opened in each process that uses them).

- ``server()``: the run's redis-server, started on first use (by the pytest
  process, before any case forks its host, so every case talks to the same
  server), on a Unix socket in a temp dir of its own, without persistence
  (``--save '' --appendonly no``), no TCP port; ``stop_server()`` stops it by
  its pid (SIGTERM, SIGKILL after a while) and removes the dir.
- ``ClusterhubRedisKind``: a master ``Hub(address="redis+unix://...", lease=...)``
  in the host; each process that opens it joins with ``clusterhub.connect``
  and uses ``hub.lock("k")``.
- ``RedisPyKind``: redis-py's ``Lock`` (``r.lock(name)``, defaults; ``timeout=``
  the TTL when given): SET NX, a waiter polls every ``sleep`` = 0.1 s.
- ``RedisLockKind``: python-redis-lock (``redis_lock.Lock(r, name)``, defaults;
  ``expire=`` when given): SET NX, a waiter blocks in BLPOP on a signal list
  that each release pushes to.

``MISSING`` says, per case, why it cannot run here (redis-py,
python-redis-lock or redis-server missing); those cases skip with the reason.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

from clusterhub import Hub, connect
from clusterhub.bench.host import process_cpu_ns
from clusterhub.bench.locking import Handle, LockKind

from ._peers import optional

redis = optional("redis", "redis-py")
redis_lock = optional("redis_lock", "python-redis-lock")

if redis is not None:
    # The engine, loaded once here (a Redis hub imports it on first use): every
    # case's processes, forked later, run this same code, even when its files
    # change during the run.  ENGINE: a digest of the sources as loaded.
    import clusterhub.redis.hub

    _engine_dir = Path(clusterhub.redis.hub.__file__).parent
    ENGINE = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_engine_dir.glob("*.py")))).hexdigest()[:12]
else:
    ENGINE = "-"

CASES = ("clusterhub", "redis-py", "python-redis-lock")
STARTUP_TIMEOUT = 20.0
HINT = "pip install redis python-redis-lock"


def _missing() -> dict[str, str]:
    """case -> why it cannot run here."""
    why: dict[str, str] = {}
    if redis is None:
        why.update(dict.fromkeys(CASES, f"redis-py is not installed ({HINT})"))
    elif shutil.which("redis-server") is None:
        why.update(dict.fromkeys(CASES, "redis-server is not on the PATH (Debian: apt install redis-server)"))
    if redis_lock is None:
        why.setdefault("python-redis-lock", f"python-redis-lock is not installed ({HINT})")
    return why


MISSING = _missing()


class Server:
    """A redis-server of our own on a Unix socket (see the module doc)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="clusterhub-bench-redis-"))
        self.path = str(self.dir / "redis.sock")
        self.log = self.dir / "redis.log"
        argv = ["redis-server", "--port", "0", "--unixsocket", self.path, "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.log)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        try:
            self.info = self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')[-4000:]}")
            with contextlib.suppress(redis.ConnectionError, FileNotFoundError):
                with self.client() as c:
                    info: dict[str, Any] = c.info("server")
                    return info
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not answering on {self.path} after {STARTUP_TIMEOUT} s")
            time.sleep(0.02)

    def client(self, **kw: Any) -> Any:
        return redis.Redis(unix_socket_path=self.path, **kw)

    def cpu_ns(self) -> int:
        """The server's CPU time so far (every thread), ns."""
        return process_cpu_ns(self.pid)

    def describe(self) -> str:
        return (f"redis-server {self.info.get('redis_version', '?')} (pid {self.pid}, unix socket, hz "
                f"{self.info.get('hz', '?')}, no persistence); redis-py {redis.__version__} "
                f"{'with hiredis' if _hiredis() else 'without hiredis'}"
                + (f", python-redis-lock {redis_lock.__version__}" if redis_lock is not None else "")
                + f"; clusterhub/redis sources sha256 {ENGINE}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _hiredis() -> bool:
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return False
    return bool(HIREDIS_AVAILABLE)


_server: Optional[Server] = None
_owner = os.getpid()


def server() -> Server:
    """The run's server, started on first use."""
    global _server
    if _server is None:
        _server = Server()
    return _server


def running() -> Optional[Server]:
    return _server


def stop_server() -> None:
    global _server
    if _server is not None and os.getpid() == _owner:
        _server.stop()
        _server = None


atexit.register(stop_server)  # (forked children leave with os._exit: only the pytest process gets here)


def module_run(config: Any, summary: Any, name: str) -> Iterator[None]:
    """A Redis benchmark module's run (the body of its module fixture):
    ``summary`` (a plugin with ``conditions``) registered to print after the
    conftest's summary; the server stopped after the module."""
    pm = config.pluginmanager
    if not pm.is_registered(summary):
        pm.register(summary, name)
    yield
    srv = running()
    if srv is not None:
        summary.conditions = srv.describe()
    stop_server()


def quantile(sorted_xs: list[float], q: float) -> float:
    return sorted_xs[min(len(sorted_xs) - 1, max(0, math.ceil(q * len(sorted_xs)) - 1))]


def stats(xs: list[float]) -> dict[str, float]:
    """median, p99 and max of ``xs`` (s)."""
    s = sorted(xs)
    return {"t": statistics.median(s), "p99_s": quantile(s, 0.99), "max_s": s[-1]}


def pooled_lines(cases: dict[str, list[float]]) -> list[str]:
    """One summary line per case of pooled samples: p50, p99, max, and
    clusterhub's ratios to it."""
    from clusterhub.bench.jobs import fmt_time

    table = {c: {**stats(xs), "n": len(xs)} for c, xs in cases.items()}
    ours = table.get("clusterhub")
    lines = []
    for c, s in table.items():
        line = (f"  {c:<20} n={s['n']:<7} p50 {fmt_time(s['t']):>10}  p99 {fmt_time(s['p99_s']):>10}  "
                f"max {fmt_time(s['max_s']):>10}")
        if ours is not None and c != "clusterhub":
            line += f"  clusterhub/{c}: p50 {ours['t'] / s['t']:.2f}, p99 {ours['p99_s'] / s['p99_s']:.2f}"
        lines.append(line)
    return lines


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# ---- the three locks ---------------------------------------------------------------


class RedisKind(LockKind):
    """A lock over the run's server; ``ttl``: the dead-holder figure's TTL
    (clusterhub's lease), None for the peers' defaults.  ``poll``: how often
    a blocked waiter looks again (0: it is woken by the release)."""

    poll = 0.0

    def __init__(self, ttl: Optional[float] = None) -> None:
        self.ttl = ttl

    def setup(self) -> None:
        super().setup()
        self.path = server().path
        self.name = unique(f"bench:{type(self).__name__}")


class ClusterhubRedisKind(RedisKind):
    """``hub.lock("k")``: a master in the host, each user a connected process."""

    def __init__(self, ttl: Optional[float] = None, lease: float = 1.0) -> None:
        super().__init__(ttl)
        self.lease = lease if ttl is None else ttl

    def setup(self) -> None:
        super().setup()
        self.address = f"redis+unix://{self.path}?name={unique('bench').replace(':', '-')}"
        self.hub = self.stack.enter_context(Hub(address=self.address, lease=self.lease))

    def open(self) -> Handle:
        hub = connect(self.address)  # (the master's hub is inert in a forked child)
        lk = hub.lock("k")
        return Handle(lk.acquire, lk.release, lambda t: lk.acquire(timeout=t), lambda: lk.recovered)


class RedisPyKind(RedisKind):
    """redis-py's ``Lock``: ``r.lock(name)`` (``timeout=ttl`` when given)."""

    poll = 0.1  # redis.lock.Lock's default sleep between attempts

    def open(self) -> Handle:
        lk = redis.Redis(unix_socket_path=self.path).lock(self.name, timeout=self.ttl)
        return Handle(lk.acquire, lk.release, lambda t: lk.acquire(blocking_timeout=t), lambda: None)


class RedisLockKind(RedisKind):
    """python-redis-lock: ``redis_lock.Lock(r, name)`` (``expire=ttl`` when given)."""

    def open(self) -> Handle:
        lk = redis_lock.Lock(redis.Redis(unix_socket_path=self.path), self.name,
                             expire=None if self.ttl is None else int(self.ttl))

        def acquire_within(timeout: float) -> bool:
            # redis_lock truncates timeout= to whole seconds and refuses one above
            # expire=: block as by default (a dead holder's key expires anyway)
            return bool(lk.acquire())

        return Handle(lk.acquire, lk.release, acquire_within, lambda: None)


KINDS: dict[str, type[RedisKind]] = {
    "clusterhub": ClusterhubRedisKind, "redis-py": RedisPyKind, "python-redis-lock": RedisLockKind,
}
