"""The exception tree, and errors at the call site: wrong worker references,
master-only calls in a worker, calls after close, bad arguments, and peers
that write garbage into their channel."""

from __future__ import annotations

import logging
import os
import signal
import struct
import threading

import pytest

import clusterhub
from clusterhub import (
    HubClosedError,
    HubError,
    MasterDied,
    MessageTooLarge,
    NoHandlerError,
    NotMasterError,
    PeerDied,
    RemoteError,
    WorkerDied,
    protocol,
)

from conftest import fork_ready, join_ok

pytestmark = pytest.mark.timeout(60)

FRAME_MAGIC = 0x4843  # csrc/frame.h: the first two bytes of every frame


def _frame(payload: bytes) -> bytes:
    return struct.pack("<HHI", FRAME_MAGIC, 0, len(payload)) + payload


def test_exception_tree():
    """Every error derives from HubError, and from the fitting builtin."""
    for name in clusterhub.errors.__all__:
        assert issubclass(getattr(clusterhub, name), HubError), name
    assert issubclass(MessageTooLarge, ValueError)
    assert issubclass(clusterhub.LockTimeout, TimeoutError)
    assert issubclass(NoHandlerError, RemoteError)
    assert issubclass(WorkerDied, PeerDied) and issubclass(MasterDied, PeerDied)


# ---- worker references -----------------------------------------------------------------


def test_unknown_worker_raises_value_error(make_hub, event):
    """An id or Worker that never belonged to this hub raises ValueError; a
    wrong type raises TypeError."""
    hub, other = make_hub(), make_hub()
    go = event()
    w = hub.fork(go.wait)
    foreign = other.fork(go.wait)
    for bad in (0, 2, 99, -1, foreign):
        with pytest.raises(ValueError):
            hub.send_to_worker(bad, "x")
        with pytest.raises(ValueError):
            hub.request_worker(bad, "x")
    for bad in ("1", 1.0, None, True):
        with pytest.raises(TypeError):
            hub.send_to_worker(bad, "x")
    assert len(hub._pending) == 0
    go.set()
    join_ok(w)
    join_ok(foreign)


def test_exited_worker_raises_worker_died(hub):
    """A Worker or id whose worker has exited raises WorkerDied at the call
    site for sends and requests; a broadcast with no worker left is no error,
    and the master keeps working."""
    w = hub.fork(lambda: None)
    join_ok(w)
    for ref in (w, w.id):
        with pytest.raises(WorkerDied):
            hub.send_to_worker(ref, "x")
        with pytest.raises(WorkerDied):
            hub.request_worker(ref, "x")
    hub.send_to_workers("x")  # nobody left: nothing to do, no error
    assert hub.request_master("nothing").exception(10) is not None
    assert len(hub._pending) == 0


def test_master_only_calls_in_a_worker(hub, reports):
    """Master-only calls made in a worker raise NotMasterError."""

    def work():
        calls = {
            "fork": lambda: hub.fork(print),
            "workers": lambda: hub.workers,
            "join": lambda: hub.join(0),
            "send_to_worker": lambda: hub.send_to_worker(1, "x"),
            "send_to_random_worker": lambda: hub.send_to_random_worker("x"),
            "request_worker": lambda: hub.request_worker(1, "x"),
            "request_workers": lambda: hub.request_workers("x"),
            "request_random_worker": lambda: hub.request_random_worker("x"),
            "on_exit": lambda: hub.on_exit(print),
        }
        out = {}
        for name, call in calls.items():
            try:
                call()
                out[name] = "no error"
            except NotMasterError:
                out[name] = "NotMasterError"
            except Exception as e:
                out[name] = repr(e)
        reports.put(out, len(hub._pending))

    w = hub.fork(work)
    out, pending = reports.get()
    assert set(out.values()) == {"NotMasterError"}, out
    assert pending == 0
    join_ok(w)


def _public_calls(hub, w):
    return {
        "fork": lambda: hub.fork(print),
        "workers": lambda: hub.workers,
        "join": lambda: hub.join(0),
        "on_exit": lambda: hub.on_exit(print),
        "on": lambda: hub.on("x", print),
        "once": lambda: hub.once("x", print),
        "off": lambda: hub.off("x"),
        "send_to_master": lambda: hub.send_to_master("x"),
        "send_to_worker": lambda: hub.send_to_worker(w, "x"),
        "send_to_workers": lambda: hub.send_to_workers("x"),
        "send_to_random_worker": lambda: hub.send_to_random_worker("x"),
        "request_master": lambda: hub.request_master("x"),
        "request_worker": lambda: hub.request_worker(w, "x"),
        "request_workers": lambda: hub.request_workers("x"),
        "request_random_worker": lambda: hub.request_random_worker("x"),
        "attach": lambda: hub.attach(),
        "detach": lambda: hub.detach(),
        "lock": lambda: hub.lock("k"),
        "held_locks": lambda: hub.held_locks(),
        "enter": lambda: hub.__enter__(),
    }


def test_calls_after_close_raise_hub_closed(hub, reports):
    """After close(), every call but close() and the identity properties
    raises HubClosedError, in the master and in a worker."""

    def work():
        hub.close()
        out = {}
        for name, call in _public_calls(hub, 1).items():
            try:
                call()
                out[name] = "no error"
            except HubClosedError:
                out[name] = "closed"
            except Exception as e:
                out[name] = repr(e)
        hub.close()
        reports.put(out, hub.is_master, hub.is_worker, hub.worker_id)

    w = hub.fork(work)
    out, *identity = reports.get()
    assert set(out.values()) == {"closed"}, out
    assert identity == [False, True, w.id]
    join_ok(w)
    hub.close()
    hub.close()
    for call in _public_calls(hub, w).values():
        with pytest.raises(HubClosedError):
            call()
    assert (hub.is_master, hub.is_worker, hub.worker_id) == (True, False, None)


def test_pending_requests_fail_when_the_hub_closes(hub, event):
    """close() ends the requests still pending with HubClosedError."""
    go = event()
    w = fork_ready(hub, lambda: hub.on("slow", lambda data, sender: go.wait(20)), go, 20)
    f = hub.request_worker(w, "slow")
    hub.close(timeout=1)
    assert isinstance(f.exception(5), (HubClosedError, WorkerDied))
    assert len(hub._pending) == 0


# ---- bad arguments -----------------------------------------------------------------------


def test_bad_arguments(make_hub):
    """Bad arguments raise precise TypeError/ValueError before anything is sent."""
    for kwargs, exc in (
        ({"serializer": "xml"}, ValueError),
        ({"serializer": object()}, TypeError),
        ({"max_message_size": 0}, ValueError),
        ({"max_message_size": "1"}, TypeError),
        ({"max_queue": -1}, ValueError),
    ):
        with pytest.raises(exc):
            clusterhub.Hub(**kwargs)
    hub = make_hub()
    with pytest.raises(TypeError):
        hub.fork(42)
    with pytest.raises(ValueError):
        hub.request_master("x", timeout=-1)
    with pytest.raises(TypeError):
        hub.request_master("x", timeout="1")
    with pytest.raises(TypeError):
        hub.request_master("x", callback=42)
    with pytest.raises(TypeError):
        hub.send_to_master(42)
    with pytest.raises(ValueError):
        hub.request_workers("")
    with pytest.raises(TypeError):
        hub.on_exit(42)
    assert len(hub._pending) == 0


# ---- garbage on the wire ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xde\xad\xbe\xef" * 64,  # not a frame at all
        struct.pack("<HHI", FRAME_MAGIC, 0, 0xFFFFFFF0),  # a frame over max_message_size
        _frame(b"\x09" + b"\x00" * 14),  # a frame with an unknown envelope kind
        _frame(struct.pack("<BIQH", protocol.MSG, 0, 0, 10) + b"abc"),  # name past the end
        _frame(struct.pack("<BIQH", protocol.BCAST, 99, 0, 1) + b"x"),  # forged broadcast origin
    ],
    ids=["bytes", "oversized", "bad-kind", "truncated-name", "forged-origin"],
)
def test_worker_writing_garbage_is_killed(hub, caplog, reports, garbage):
    """A worker writing a malformed or oversized frame into its channel is
    logged as an error, killed and reported through on_exit, while the
    master keeps serving the other workers."""
    exits = []
    exited = threading.Event()
    hub.on_exit(lambda w: (exits.append((w.id, w.exitcode)), exited.set()))
    hub.on("ping", lambda data, sender: "pong")

    def bad():
        hub.send_to_master("before", 1)
        os.write(hub._master.fd, garbage)
        threading.Event().wait(30)

    g = fork_ready(hub, lambda: hub.on("ask", lambda data, sender: hub.request_master("ping").result(10)))
    b = hub.fork(bad)
    assert exited.wait(10)
    assert exits == [(b.id, -signal.SIGKILL)]
    assert any(r.levelno == logging.ERROR and f"worker {b.id}" in r.getMessage()
               for r in caplog.records)
    assert hub.request_worker(g, "ask").result(10) == "pong"
    assert set(hub.workers) == {g.id}
    g.kill()
    join_ok(g, -9)
    assert len(hub._pending) == 0


def test_master_writing_garbage_kills_the_worker(hub, tmp_path):
    """A worker receiving a malformed frame from its master treats it as the
    master's death: it exits with code 1 (exit_on_master_death)."""
    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())

    def work():
        import sys

        sys.stderr = open(tmp_path / "stderr", "w")
        logging.getLogger("clusterhub").addHandler(logging.StreamHandler(sys.stderr))
        hub.send_to_master("ready")
        threading.Event().wait(30)

    w = hub.fork(work)
    assert ready.wait(10)
    os.write(w.channel.fd, b"\x00" * 64)
    join_ok(w, 1)
    assert "master broke its channel" in (tmp_path / "stderr").read_text()


def test_undecodable_request_data_answers_with_an_error(hub):
    """A request whose data the receiver cannot decode fails with RemoteError
    instead of hanging, and the channel stays usable."""

    class Unloadable:
        def __reduce__(self):
            return (_refuse, ())

    w = fork_ready(hub, lambda: hub.on("echo", lambda data, sender: data))
    err = hub.request_worker(w, "echo", Unloadable()).exception(10)
    assert isinstance(err, RemoteError)
    assert "cannot be loaded" in str(err)
    assert hub.request_worker(w, "echo", 5).result(10) == 5
    w.kill()
    join_ok(w, -9)
    assert len(hub._pending) == 0


def _refuse():
    raise RuntimeError("cannot be loaded")


def test_undecodable_reply_fails_the_request(hub):
    """A reply the requester cannot decode fails that request (HubError) and
    leaves the channel usable."""

    def work():
        hub.on("bad", lambda data, sender: _LoadsBadly())
        hub.on("echo", lambda data, sender: data)
        hub.send_to_master("ready")
        threading.Event().wait(30)

    ready = threading.Event()
    hub.on("ready", lambda data, sender: ready.set())
    w = hub.fork(work)
    assert ready.wait(10)
    err = hub.request_worker(w, "bad").exception(10)
    assert isinstance(err, HubError)
    assert hub.request_worker(w, "echo", 7).result(10) == 7
    w.kill()
    join_ok(w, -9)
    assert len(hub._pending) == 0


class _LoadsBadly:
    def __reduce__(self):
        return (_refuse, ())


# ---- errors as users see them ----------------------------------------------------------


def test_lock_error_is_a_runtime_error_and_types_show_public_paths():
    """LockError is also a RuntimeError (what threading raises); every error
    type shows as clusterhub.X, not under a private module."""
    assert issubclass(clusterhub.LockError, RuntimeError)
    assert issubclass(clusterhub.LockTimeout, RuntimeError)
    for name in clusterhub.errors.__all__:
        assert getattr(clusterhub, name).__module__ == "clusterhub", name
    assert issubclass(clusterhub.SendTimeout, TimeoutError)


UNCAUGHT_SCRIPT = """
import clusterhub
hub = clusterhub.Hub()

@hub.on("fail")
def failing_handler(data, sender):
    raise ValueError("bad invoice " + data)

def work():
    hub.request_master("fail", "42").result(10)

with hub:
    w = hub.fork(work)
    w.join(20)
"""


def test_uncaught_remote_error_prints_the_remote_traceback(tmp_path):
    """An uncaught RemoteError prints the peer's traceback (as
    concurrent.futures shows a worker's), then the one-line error."""
    import subprocess
    import sys

    script = tmp_path / "uncaught.py"
    script.write_text(UNCAUGHT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    err = proc.stderr
    assert "failing_handler" in err and "ValueError: bad invoice 42" in err, err
    assert "clusterhub.RemoteTraceback" in err, err
    assert err.rstrip().endswith("clusterhub.RemoteError: ValueError: bad invoice 42"), err
