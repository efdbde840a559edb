"""node's cluster-hub (the original clusterhub ports) as a round-trip peer.

The first case that needs it runs ``npm install cluster-hub@0.1.2`` in a
temp dir of its own, kept for the rest of the run (removed at exit) and
shared by every placement; ``node/echo_round_trip.js`` (a master answering
``echo`` and one worker making ``requestMaster`` round trips) is copied
beside it.  The case's host (``clusterhub.bench.host``) starts that node
master, pins the node master and its worker by pid, every thread, to the
placement's CPUs (the serving side's for the master, the other side's for the
worker, again before each batch), and relays each batch: a line "N" to the
master, which asks the worker to time N round trips, and a JSON line back.
Without ``node`` or ``npm``, or when the install fails, the case is
``Unavailable`` (its test skips with the reason).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, ContextManager, Optional

from clusterhub.bench.host import UNPINNED, Batch, Sample, Unavailable, pin_client, pin_server, serve
from clusterhub.bench.messaging import rt_counted

PACKAGE = "cluster-hub@0.1.2"
SCRIPT = Path(__file__).resolve().parent / "node" / "echo_round_trip.js"

_install: dict[str, str] = {}  # "dir": where it is installed, or "error": why it is not


def missing_tools() -> Optional[str]:
    """Why node's peer cannot run here at all (no ``node`` or ``npm``), or None."""
    absent = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    return f"{' and '.join(absent)} not found on PATH (node's cluster-hub peer)" if absent else None


def installed() -> str:
    """The directory where cluster-hub is installed, installing it on the
    first call of the run; ``Unavailable`` with the reason otherwise."""
    if "error" in _install:
        raise Unavailable(_install["error"])
    if "dir" in _install:
        return _install["dir"]
    why = missing_tools()
    if why is not None:
        _install["error"] = why
        raise Unavailable(why)
    workdir = tempfile.mkdtemp(prefix="clusterhub-bench-node-")
    atexit.register(shutil.rmtree, workdir, True)
    Path(workdir, "package.json").write_text('{"name": "clusterhub-bench-node", "private": true}\n')
    # (npm's own cache first; a registry that does not answer fails in
    # seconds, not after npm's default retries of minutes)
    command = ["npm", "install", "--prefer-offline", "--no-audit", "--no-fund", "--no-update-notifier",
               "--loglevel=error", "--fetch-retries=1", "--fetch-retry-mintimeout=2000",
               "--fetch-retry-maxtimeout=5000", "--fetch-timeout=15000", PACKAGE]
    try:
        subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=60, check=True)
    except subprocess.CalledProcessError as e:
        lines = [ln.removeprefix("npm error").strip() for ln in (e.stderr or e.stdout or "").splitlines()]
        what = " | ".join(ln for ln in lines if ln)[:300]
        _install["error"] = f"`npm install {PACKAGE}` failed (exit {e.returncode}): {what}"
    except (OSError, subprocess.TimeoutExpired) as e:
        _install["error"] = f"`npm install {PACKAGE}` failed: {e}"
    if "error" in _install:
        raise Unavailable(_install["error"])
    shutil.copy(SCRIPT, workdir)
    _install["dir"] = workdir
    return workdir


def _node_host(conn: Any, workdir: str, placement: str) -> None:
    # The node master starts on the host's CPU (the serving side's); its
    # worker is then moved to the other side's.
    proc = subprocess.Popen(["node", SCRIPT.name], cwd=workdir, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def answer() -> dict[str, Any]:
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"node's cluster-hub master exited (code {proc.wait()}); see its stderr")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"node's cluster-hub: {reply['error']}")
        return reply

    try:
        pids = answer()

        def batch(n: int) -> Sample:
            if not isinstance(n, int):
                raise TypeError(f"node's peer times loops of n round trips only, not {n!r}")
            pin_server(placement, pids["master"])  # (again: threads node started since)
            pin_client(placement, pids["worker"])
            stdin.write(f"{n}\n")
            stdin.flush()
            return {"t": answer()["t"], "n": n}

        serve(conn, batch)
    finally:
        with contextlib.suppress(OSError):
            stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rt_node(placement: str = UNPINNED) -> ContextManager[Batch]:
    """The round-trip case of node's cluster-hub (``requestMaster`` from a worker)."""
    return rt_counted(_node_host, installed(), placement=placement)

