"""``clusterhub.connect()``: a process the hub did not fork joins a running
master by its address, and gets its worker-side hub."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Optional, Union

from . import protocol
from ._bindings import LockTable
from .address import connect as connect_socket
from .address import parse_address
from .checks import check_spin, check_timeout
from .forks import hubs as hub_registry
from .handshake import send_ready, worker_handshake
from .hub import DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_QUEUE, DEFAULT_SPIN, Hub
from .locks import Locks
from .redis.url import is_redis
from .workers import Processes

# This process's connected hubs by address (a fork child starts afresh: the
# pid is part of the key, and the parent's hubs are inert there).
_hubs: dict[tuple[int, str], tuple[Hub, Processes]] = {}
_lock = threading.Lock()


def connect(
    address: str,
    *,
    setup: Optional[Callable[[Hub], Any]] = None,
    timeout: Optional[float] = 5.0,
    authkey: Optional[bytes] = None,
    serializer: Union[str, protocol.Serializer, None] = None,
    exit_on_master_death: bool = False,
    spin: float = DEFAULT_SPIN,
    lease: Optional[float] = None,
) -> Hub:
    """Join the master listening at ``address`` (``Hub(address=...)``): this
    process's worker-side hub.

    Called again in the same process with the same address, it returns the
    same hub (a ``ProcessPoolExecutor`` initializer can connect and each
    task call it again), unless its master has died meanwhile: then it
    connects anew, to whatever master listens there now.

    ``setup(hub)`` runs before the master learns of this worker, so the
    handlers it registers see every message; it cannot send yet.
    ``spin``: as ``Hub(spin=...)``.  A ``redis://`` address joins the
    hub of that name on the Redis server (``lease``: as ``Hub(lease=...)``;
    default: the master's).  ``serializer``: None for pickle, which must
    match the master's, as ``authkey`` must (the check runs both ways).  Nothing listening, a
    refused handshake or ``timeout`` raise :class:`HubError` subclasses
    (``ConnectError``, ``HandshakeError``, ``ConnectTimeout``).
    """
    timeout = check_timeout(timeout)
    spin = check_spin(spin)
    if setup is not None and not callable(setup):
        raise TypeError("setup must be callable as setup(hub)")
    if is_redis(address):
        return _connect_redis(address, timeout, authkey, lease, setup, serializer, exit_on_master_death, spin)
    if lease is not None:
        raise ValueError("lease= is for a hub on a Redis server (a 'redis://...' address)")
    addr = parse_address(address)
    spec = "pickle" if serializer is None else serializer
    protocol.serializer_functions(spec)  # (checks it)
    key = (os.getpid(), addr.text)
    with _lock:
        known = _hubs.get(key)
        if known is not None and not known[0]._closed and not known[1].master_gone.is_set():
            return known[0]
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = connect_socket(addr, timeout)
        try:
            joined = worker_handshake(sock, serializer=protocol.serializer_name(spec), authkey=authkey,
                                      require_fds=["locks"], timeout=_left(deadline), ready=False)
        except BaseException:
            sock.close()
            raise
        hub = None
        try:
            hub, procs = _worker_side(joined.fds["locks"], joined.worker_id, spec, exit_on_master_death,
                                      spin)
            if setup is not None:
                setup(hub)
            send_ready(sock, joined, timeout=_left(deadline))
            sock.setblocking(False)
            pidfd, joined.master_pidfd = joined.master_pidfd, -1  # (now the master watcher's)
            procs.join_master(sock.detach(), pidfd if pidfd >= 0 else None, joined.master_pid)
        except BaseException:
            sock.close()
            if hub is not None:
                hub.close()
            raise
        finally:
            joined.close()  # (the fds it still owns: the lock table keeps its own copy)
        _hubs[key] = (hub, procs)
        return hub


def _worker_side(locks_fd: int, worker_id: int, serializer: Union[str, protocol.Serializer],
                 exit_on_master_death: bool, spin: float) -> tuple[Hub, Processes]:
    """The worker-side hub of a process that connects, before its channel to
    the master exists: the master's lock table mapped from ``locks_fd``."""
    hub = Hub.__new__(Hub)
    procs = hub._build(serializer, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_MAX_QUEUE,
                       Locks(1, LockTable.attach(locks_fd)), exit_on_master_death, True,
                       f"worker-{worker_id}", spin)
    procs.is_master = False
    procs.connected = True
    procs.worker_id = worker_id
    hub._dispatcher.start()
    hub_registry.add(hub)
    return hub, procs


def _connect_redis(address: str, timeout: Optional[float], authkey: Optional[bytes], lease: Optional[float],
                   setup: Optional[Callable[[Hub], Any]], serializer: Union[str, protocol.Serializer, None],
                   exit_on_master_death: bool, spin: float) -> Hub:
    """``connect()`` of a Redis address: the inbox is read once ``setup``
    registered its handlers."""
    from .redis.hub import RedisHub, connect_redis
    from .redis.url import parse

    key = (os.getpid(), parse(address).text)
    with _lock:
        known = _hubs.get(key)
        if known is not None and not known[0]._closed:
            return known[0]
        hub: RedisHub = connect_redis(address, timeout=timeout, authkey=authkey, lease=lease,
                                      serializer=serializer, exit_on_master_death=exit_on_master_death,
                                      spin=spin)
        try:
            if setup is not None:
                setup(hub)
            hub._start_reading()
        except BaseException:
            hub.close()
            raise
        _hubs[key] = (hub, None)  # type: ignore[assignment]
        return hub


def _left(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())
