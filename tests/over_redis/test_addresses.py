"""Redis addresses: parsing errors, lease= rules, a second master on a name,
and the password kept out of repr, hub.address, logs and error texts."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import clusterhub
from clusterhub import AddressInUse, ConnectError, HubError

from .conftest import LEASE, MP, Procs, RedisServer, Reports, close_quietly, connect, require_redis, wait_until

pytestmark = pytest.mark.timeout(60)

PASSWORD = "pw-S3cret-9f27"


@pytest.mark.parametrize("address, says", [
    ("redis://", "needs a host"),
    ("redis:///0?name=x", "needs a host"),
    ("redis://h:port/0?name=x", "bad port"),
    ("redis://h:99999/0?name=x", "bad port"),
    ("redis://h/0?name=two words", "name="),
    ("redis://h/0?name=", "name="),
    ("redis://h/0?name=" + "n" * 65, "name="),
    ("redis://h/0?name=x&colour=red", "unknown parameter"),
    ("redis://h/zero?name=x", "must be a number"),
    ("redis://h/1?db=2&name=x", "database once"),
    ("redis+unix://host/tmp/r.sock?name=x", "socket path"),
    ("redis+unix://?name=x", "socket path"),
])
def test_bad_addresses(address: str, says: str) -> None:
    require_redis(server=False)  # (the Redis engine's module imports redis-py)
    for make in (lambda: clusterhub.Hub(address=address), lambda: clusterhub.connect(address, timeout=1)):
        with pytest.raises(ValueError, match=says):
            make()


def test_lease_rules(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError, match="Redis"):
        clusterhub.Hub(lease=1.0)
    with pytest.raises(ValueError, match="Redis"):
        clusterhub.connect("@clusterhub-no-such-hub", timeout=1, lease=1.0)
    for bad, exc in ((0, ValueError), (0.05, ValueError), (-1, ValueError), (4000, ValueError), ("1", TypeError),
                     (True, TypeError)):
        with pytest.raises(exc):
            clusterhub.Hub(address=redis_server.url("rules"), lease=bad)
        with pytest.raises(exc):
            clusterhub.connect(redis_server.url("rules"), timeout=1, lease=bad)
    hub = clusterhub.Hub(address=redis_server.url("rules"), lease=None)  # the default
    try:
        assert hub._link.lease == clusterhub.redis.link.DEFAULT_LEASE  # type: ignore[attr-defined]
    finally:
        hub.close()


def test_second_master_on_a_name(redis_server: RedisServer, master: clusterhub.Hub, procs: Procs,
                                 reports: Reports) -> None:
    """A second master for the same name: AddressInUse naming the first,
    which it leaves alone (its lease setting, its workers); the name is free
    again once the first closes."""
    seen: list[int] = []
    master.on_exit(lambda w: seen.append(w.id))
    url = redis_server.url("t")
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):  # (a refused hub leaves nothing open: each used to leave 4 fds)
        with pytest.raises(AddressInUse) as e:
            clusterhub.Hub(address=url, lease=7.0)
    assert isinstance(e.value, HubError) and "already" in str(e.value)
    del e
    # (a few more: the master's own connections, made in the background, may come meanwhile)
    assert len(os.listdir("/proc/self/fd")) <= fds + 5
    assert redis_server.client().get(b"{ch:t}:lease") == b"%d" % int(LEASE * 1000)

    def worker() -> None:
        hub = connect(url)
        reports.put("lease", hub._link.lease)  # type: ignore[attr-defined]
        hub.close()

    pid = procs.start(worker)
    assert reports.get() == ("lease", LEASE)  # (the master's, not the refused one's)
    procs.join(pid)
    time.sleep(2 * LEASE)  # (a phantom worker would have "exited" by now)
    assert master.workers == {} and len(seen) == 1
    master.close()
    second = clusterhub.Hub(address=url, lease=LEASE)
    second.close()


def test_the_password_stays_out_of_texts(redis_servers: Callable[..., RedisServer], procs: Procs,
                                         reports: Reports, caplog: pytest.LogCaptureFixture) -> None:
    """With a password-protected server: never in repr(hub), hub.address,
    log records (all levels, redis-py's too) or exception texts, through
    a restart that makes every renewal and the watcher fail and log."""
    caplog.set_level(logging.DEBUG)
    server = redis_servers(password=PASSWORD)
    url = server.url("pw")
    assert PASSWORD in url
    hub = clusterhub.Hub(address=url, lease=LEASE)
    texts: list[str] = [repr(hub), str(hub.address), repr(hub.lock("k")), str(hub._link.client)]  # type: ignore[attr-defined]
    assert hub.address == f"redis://127.0.0.1:{server.port}/0?name=pw"
    worker = connect(server.unix_url("pw"))
    texts += [repr(worker), str(worker.address)]
    with hub.lock("k") as held:
        texts.append(repr(held))
        texts += [repr(r) for r in hub.held_locks()]

    def errors(call: Callable[[], Any]) -> None:
        with pytest.raises(HubError) as e:
            call()
        chain: BaseException | None = e.value
        while chain is not None:
            texts.extend([str(chain), repr(chain)])
            chain = chain.__cause__ or chain.__context__

    # wrong password, no password
    errors(lambda: clusterhub.connect(url.replace(PASSWORD, "wrong-one"), timeout=5))
    errors(lambda: clusterhub.connect(url.replace(f":{PASSWORD}@", ""), timeout=5))
    with pytest.raises(ConnectError, match="credentials"):
        clusterhub.connect(url.replace(PASSWORD, "wrong-one"), timeout=5)

    # the server gone: every renewal and the watcher fail (and log), calls raise
    server.kill()
    errors(lambda: hub.lock("k").acquire(timeout=1))
    errors(hub.held_locks)
    errors(lambda: worker.lock("k").locked())
    wait_until(lambda: any("renew" in r.getMessage() for r in caplog.records), 5, "a failed renewal logged")
    server.restart()
    wait_until(lambda: any("answers again" in r.getMessage() for r in caplog.records), 5, "the server back")
    with hub.lock("k"):
        pass
    close_quietly(worker)
    close_quietly(hub)
    texts += [r.getMessage() for r in caplog.records]
    texts += [str(r.exc_info[1]) for r in caplog.records if r.exc_info]
    assert len(caplog.records) > 3
    leaked = [t for t in texts if PASSWORD in t]
    assert not leaked, leaked
    assert not any(PASSWORD in t for t in caplog.text.splitlines())


def test_unix_socket_and_tcp_are_one_hub(redis_server: RedisServer, master: clusterhub.Hub, procs: Procs,
                                         reports: Reports) -> None:
    """A worker through the Unix socket is a worker of the TCP master."""
    url = redis_server.unix_url("t")
    done = MP.Event()

    def worker() -> None:
        hub = connect(url)
        reports.put("joined", hub.worker_id, hub.address)
        assert done.wait(20)
        hub.close()

    pid = procs.start(worker)
    _, wid, address = reports.get()
    assert address == f"redis+unix://{redis_server.sock}?db=0&name=t"
    w = wait_until(lambda: master.workers.get(wid), 5, "the worker joined")
    assert w.pid == pid
    done.set()
    procs.join(pid)
    assert master.join(timeout=5)


def test_connect_runs_setup(redis_server: RedisServer) -> None:
    """connect(setup=...) calls setup(hub) with the new hub; a setup that
    raises leaves no hub behind (its lease is given up at once)."""
    url = redis_server.url("setup")
    seen = []
    hub = clusterhub.connect(url, timeout=10, setup=seen.append)
    assert seen == [hub] and hub.is_worker
    hub.close()

    def bad(h: clusterhub.Hub) -> None:
        raise RuntimeError("setup failed")

    with pytest.raises(RuntimeError, match="setup failed"):
        clusterhub.connect(url, timeout=10, setup=bad)
    leases = [k for k in redis_server.client().keys(b"{ch:setup}:proc:*")]
    assert leases == []


def test_hub_parameters_are_checked(redis_server: RedisServer) -> None:
    """A Redis hub takes Hub's parameters and checks them as Hub does: an
    unknown keyword is a TypeError (never silently ignored), allowed_uids
    (a local hub's) a ValueError; nothing is written to the server."""
    url = redis_server.url("params")
    with pytest.raises(TypeError, match="unexpected keyword"):
        clusterhub.Hub(address=url, leas=2.0)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="allowed_uids is for a local hub"):
        clusterhub.Hub(address=url, allowed_uids=[0])
    with pytest.raises(TypeError, match="spin must be a number"):
        clusterhub.Hub(address=url, spin="50us")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown serializer"):
        clusterhub.Hub(address=url, serializer="xml")
    assert redis_server.client().keys(b"{ch:params}:*") == []
    with clusterhub.Hub(address=url, serializer="json", lock_slots=8, max_queue=0) as hub:
        assert hub.is_master


def test_spin_is_the_hubs_setting(redis_server: RedisServer) -> None:
    """``spin`` governs the spin before a script's reply is read over
    Redis, as it does a local hub's waits: 0 never spins; the default does,
    with the server as the spin's peer on this host's Unix socket (over TCP
    its pid is not known for sure: none)."""
    for url, spin, peer in ((redis_server.unix_url("spin"), 0, 0),
                            (redis_server.unix_url("spin"), 50e-6, redis_server.pid),
                            (redis_server.url("spin"), 50e-6, 0)):
        with clusterhub.Hub(address=url, lease=LEASE, spin=spin) as hub:
            lk = hub.lock("k")
            for _ in range(20):
                with lk:
                    pass
            policy = hub._link._own.c[3]  # (the calling thread's Spin, made at its first spin)
            if spin == 0:
                assert policy is None
            else:
                assert policy.stats()["spins"] > 0
                assert policy.p.peer_pid == peer


@given(st.sampled_from(["EVALSHA", "BLPOP"]),
       st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=20), st.integers(),
                          st.floats(allow_nan=False, allow_infinity=False)), max_size=12))
def test_lock_calls_pack_commands_as_redis_py_does(name: str, args: list[Any]) -> None:
    """The lock calls' own RESP packing (on their hot path) gives redis-py's
    bytes for every argument type they use."""
    redis = pytest.importorskip("redis")
    from clusterhub.redis.link import _pack

    conn = redis.Connection()  # (not connected: packing only)
    assert _pack((name, *args)) == b"".join(conn.pack_command(name, *args))


def test_a_server_too_old_for_the_scripts_is_refused() -> None:
    """The version check that join() makes on INFO's redis_version."""
    pytest.importorskip("redis")
    from clusterhub.redis.link import check_version
    from clusterhub.redis.url import parse

    url = parse("redis://127.0.0.1:1/0?name=v")
    for fine in ("6.0.6", "6.2.14", "7.0.15", "10.0.0", "unknown"):
        check_version(fine, url)
    with pytest.raises(ConnectError, match=r"version 6\.0\.5; clusterhub needs 6\.0\.6 or later"):
        check_version("6.0.5", url)
