"""HTTP load: gunicorn with 4 ``sync`` workers where every request takes a
global lock and increments a counter, under a real load generator, with the
lock from clusterhub, from filelock, and from redis-py (``Lock`` on a local
redis-server this benchmark starts and stops); and, as the reference, the same
app with no lock (``no-lock``: it loses increments), what the HTTP stack serves
when the lock costs nothing, which bounds every ratio.

The app and gunicorn's configuration are in ``benchmarks/http/``
(``counter_app.py``, ``gunicorn_conf.py``): the same app for all, only the
lock differs.  Each case serves its own gunicorn (its own temp dir with the
counter file; for Redis its own ``redis-server --port 0 --unixsocket ...``);
a batch is one ``wrk -t2 -c16 -d<N>s --latency`` run (a Python client instead
when ``wrk`` is not on the PATH: one thread per connection), after which the
counter must have grown by the requests the load generator completed (plus at
most one in flight per connection), with no non-2xx answer.

The figure is s per request (1 / requests/s); ``req_per_s`` and ``p99_s``
(wrk's 99th percentile latency) are in each sample.  Through the ``measure``
fixture (``conftest.py``): with ``--benchmark-disable`` (the default) each test
serves its case alone for one 1-s batch (a smoke test); enabled, all are
served at once and measured interleaved (a warm-up batch each, then rounds of
one 3-s batch per case in rotating order), and the summary prints the medians
and the targets' verdicts.

gunicorn, filelock and redis-py come with the ``integration`` and ``bench``
extras, ``redis-server`` and ``wrk`` from the system (Debian: ``apt install
redis-server wrk``).  Without one, the cases that need it skip with the
reason, or fail when ``CLUSTERHUB_INTEGRATION=1`` (CI) is set; without ``wrk``
the Python client is used instead.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from clusterhub.bench.host import UNPINNED, Batch, Sample, Unavailable
from clusterhub.bench.jobs import Job, Target

from . import _redis
from ._peers import optional

APP_DIR = Path(__file__).resolve().parent / "http"
WORKERS = 4  # gunicorn_conf.py's
THREADS, CONNECTIONS = 2, 16  # wrk -t2 -c16
REQUIRED = os.environ.get("CLUSTERHUB_INTEGRATION") == "1"
STARTUP_TIMEOUT = 30.0
# "no-lock": the reference (see above)
CASES = ("clusterhub", "filelock", "redis", "no-lock")

gunicorn = optional("gunicorn")
filelock = optional("filelock")
redis = optional("redis")


def _missing() -> dict[str, str]:
    """case -> why it cannot run here."""
    hint = "pip install '.[integration,bench]'"
    why: dict[str, str] = {}
    if gunicorn is None:
        why.update(dict.fromkeys(CASES, f"gunicorn is not installed ({hint})"))
    if filelock is None:
        why.setdefault("filelock", f"filelock is not installed ({hint})")
    if redis is None:
        why.setdefault("redis", f"redis-py is not installed ({hint})")
    elif shutil.which("redis-server") is None:
        why.setdefault("redis", "redis-server is not on the PATH (Debian: apt install redis-server)")
    return why


MISSING = _missing()


def _wait_until(cond: Callable[[], Any], timeout: float, what: str, alive: Callable[[], Optional[str]]) -> None:
    """Poll ``cond`` (an outside server's state) until truthy; ``alive()``
    returns why the server is gone, or None."""
    deadline = time.monotonic() + timeout
    while not cond():
        gone = alive()
        if gone is not None:
            raise RuntimeError(f"{what}: {gone}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout} s")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process by its pid, SIGKILL its session after ``timeout``
    (or any straggler of the session)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # started with its own session: its id is the pid


def _exited(proc: subprocess.Popen[bytes], log: Path) -> Callable[[], Optional[str]]:
    def why() -> Optional[str]:
        if proc.poll() is None:
            return None
        return f"exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}"

    return why


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status
    finally:
        conn.close()


@contextlib.contextmanager
def _gunicorn(kind: str, tmp: Path, extra_env: dict[str, str]) -> Iterator[int]:
    """gunicorn serving ``counter_app:app`` with the lock ``kind``, up with
    all its workers; yields its port.  Stopped with SIGTERM (a graceful stop:
    ``on_exit`` closes the hub); its log must show no error."""
    port = _free_port()
    log = tmp / "gunicorn.log"
    env = {**os.environ, **extra_env, "CLUSTERHUB_BENCH_LOCK": kind, "CLUSTERHUB_BENCH_DIR": str(tmp),
           "CLUSTERHUB_BENCH_BIND": f"127.0.0.1:{port}"}
    argv = [sys.executable, "-m", "gunicorn", "-c", str(APP_DIR / "gunicorn_conf.py"), "counter_app:app"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=APP_DIR, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until(lambda: len(list(tmp.glob("ready-*"))) >= WORKERS, STARTUP_TIMEOUT,
                    f"gunicorn ({kind}): {WORKERS} workers", _exited(proc, log))

        def answers() -> bool:
            with contextlib.suppress(OSError):
                return _get(port) == 200
            return False

        _wait_until(answers, STARTUP_TIMEOUT, f"gunicorn ({kind}) on port {port}", _exited(proc, log))
        yield port
    finally:
        _stop(proc)
    text = log.read_text(errors="replace")
    if proc.returncode != 0 or "Traceback" in text or "[ERROR]" in text:
        raise RuntimeError(f"gunicorn ({kind}) exited with {proc.returncode}:\n{text[-4000:]}")


class Counter:
    """The app's counter file, read from outside."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_bytes(b"%20d" % 0)

    def read(self) -> int:
        return int(self.path.read_bytes())

    def settled(self) -> int:
        """The value once it stopped moving (requests still in flight when the
        load generator stopped are finished by then)."""
        last, deadline = self.read(), time.monotonic() + STARTUP_TIMEOUT
        while True:
            time.sleep(0.1)
            now = self.read()
            if now == last:
                return now
            if time.monotonic() > deadline:
                raise RuntimeError(f"the counter still moves {STARTUP_TIMEOUT} s after the load stopped")
            last = now


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _wrk_time(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, latency percentiles, completed requests and errors from
    ``wrk --latency``'s output."""

    def find(pattern: str) -> Optional[re.Match[str]]:
        return re.search(pattern, out, re.MULTILINE)

    rate = find(r"^Requests/sec:\s+([\d.]+)")
    done = find(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),")
    if rate is None or done is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    pct = {p: _wrk_time(v, u) for p, v, u in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$",
                                                           out, re.MULTILINE)}
    if "99" not in pct:
        raise RuntimeError(f"no 99% latency in wrk's output (--latency):\n{out}")
    sock = find(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
    non2xx = find(r"Non-2xx or 3xx responses: (\d+)")
    return {
        "req_per_s": float(rate.group(1)),
        "requests": int(done.group(1)),
        "duration_s": _wrk_time(done.group(2), done.group(3)),
        "p50_s": pct.get("50"),
        "p99_s": pct["99"],
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def _wrk(port: int, seconds: int) -> dict[str, Any]:
    threads = min(THREADS, CONNECTIONS)  # (wrk wants at least one connection per thread)
    argv = ["wrk", f"-t{threads}", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {run.returncode}:\n{run.stdout}{run.stderr}")
    return {**parse_wrk(run.stdout), "client": "wrk"}


def _python_client(port: int, seconds: int) -> dict[str, Any]:
    """The fallback without wrk: one thread per connection, each a new
    connection per request (gunicorn's sync workers close them anyway)."""
    latencies: list[list[float]] = [[] for _ in range(CONNECTIONS)]
    errors = [0] * CONNECTIONS
    start = time.perf_counter()
    deadline = start + seconds

    def client(i: int) -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                ok = _get(port) == 200
            except OSError:
                ok = False
            if ok:
                latencies[i].append(time.perf_counter() - t0)
            else:
                errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    all_lat = sorted(x for lat in latencies for x in lat)
    if not all_lat:
        raise RuntimeError("the Python client completed no request")
    n = len(all_lat)
    return {
        "req_per_s": n / elapsed, "requests": n, "duration_s": elapsed,
        "p50_s": all_lat[n // 2], "p99_s": all_lat[math.ceil(0.99 * n) - 1],
        "socket_errors": 0, "non_2xx": sum(errors), "client": f"python ({CONNECTIONS} threads)",
    }


def load(port: int, seconds: int) -> dict[str, Any]:
    """One load run: wrk when it is on the PATH, else the Python client."""
    return _wrk(port, seconds) if shutil.which("wrk") else _python_client(port, seconds)


def served(kind: str) -> Callable[..., Any]:
    """The case of lock ``kind``: its server up, each batch (seconds) one load run."""

    @contextlib.contextmanager
    def case(placement: str = UNPINNED) -> Iterator[Batch]:
        if placement != UNPINNED:
            raise Unavailable("the HTTP load runs unpinned only")
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="clusterhub-bench-http-")))
            counter = Counter(tmp / "counter")
            env = {"CLUSTERHUB_BENCH_ADDRESS": f"@clusterhub-bench-http-{uuid.uuid4().hex[:12]}"}
            if kind == "redis":
                env["CLUSTERHUB_BENCH_REDIS"] = _redis.server().path  # (the run's server: benchmarks/_redis.py)
            port = stack.enter_context(_gunicorn(kind, tmp, env))

            def batch(seconds: int) -> Sample:
                before = counter.settled()
                r = load(port, seconds)
                counted = counter.settled() - before
                # served but not counted by the load generator: in flight when it stopped, or given up on
                extra = counted - r["requests"]
                locked = kind != "no-lock"  # (without a lock, increments get lost)
                if r["non_2xx"] or (locked and not 0 <= extra <= CONNECTIONS + r["socket_errors"]):
                    raise RuntimeError(
                        f"{kind}: the counter grew by {counted} for {r['requests']} completed requests "
                        f"({r['non_2xx']} not 2xx, {r['socket_errors']} socket errors)"
                    )
                return {"t": 1 / r["req_per_s"], **r, "counted": counted}

            yield batch

    return case


HTTP = Job(
    "http-counter",
    f"s per request (1 / requests/s): gunicorn {WORKERS} sync workers, each request locks and increments "
    f"a file counter; wrk -t{THREADS} -c{CONNECTIONS}",
    {kind: served(kind) for kind in CASES if kind not in MISSING},
    size=3, rounds=5, smoke=1,
    show=("req_per_s", "p99_s"),
    targets=(
        Target("clusterhub", "filelock", 1 / 5, ">= 5 x filelock's requests/s"),
        Target("clusterhub", "redis", 1 / 2, ">= 2 x the Redis lock's requests/s"),
        Target("clusterhub", "filelock", 1.0, "p99 <= filelock's", key="p99_s"),
        Target("clusterhub", "redis", 1.0, "p99 <= the Redis lock's", key="p99_s"),
    ),
)


@pytest.mark.benchmark(group="http-counter")
@pytest.mark.parametrize("case", CASES)
def test_http_counter(measure: Any, case: str) -> None:
    """gunicorn, 4 sync workers, every request `with lock:` counter += 1, under wrk."""
    if case in MISSING:
        if REQUIRED:
            pytest.fail(f"{MISSING[case]} (required: CLUSTERHUB_INTEGRATION=1)")
        pytest.skip(MISSING[case])
    summary = measure(HTTP, case)
    assert summary["requests"] > 0
    print(f"{case}: {summary['req_per_s']:,.0f} requests/s, p99 {summary['p99_s'] * 1e3:.2f} ms "
          f"({summary['client']}, {summary['rounds']} batch(es))")
