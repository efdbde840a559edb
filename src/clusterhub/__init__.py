"""clusterhub: messages and crash-robust global locks between a master
process and its forked workers (Linux).

    hub = clusterhub.Hub()
    w = hub.fork(target, *args)
    hub.request_worker(w, "sum", {"a": 1, "b": 2}).result()
    with hub.lock("invoices") as held:
        ...
"""

from .connect import connect
from .errors import (
    AddressInUse,
    ConnectError,
    ConnectTimeout,
    HandshakeError,
    HandshakeTimeout,
    HubClosedError,
    HubError,
    LockError,
    LockTableFull,
    LockTimeout,
    MasterDied,
    MessageTooLarge,
    NoHandlerError,
    NotMasterError,
    NoWorkersError,
    PeerDied,
    RemoteError,
    SendTimeout,
    WorkerDied,
)
from .hub import Hub
from .locks import HeldLock, Lock
from .process import Worker
from .requests import Future

__version__ = "0.1.0"

__all__ = [
    "Hub",
    "connect",
    "Worker",
    "Lock",
    "Future",
    "HeldLock",
    "HubError",
    "RemoteError",
    "NoHandlerError",
    "PeerDied",
    "WorkerDied",
    "MasterDied",
    "MessageTooLarge",
    "NotMasterError",
    "NoWorkersError",
    "SendTimeout",
    "HubClosedError",
    "AddressInUse",
    "ConnectError",
    "ConnectTimeout",
    "HandshakeError",
    "HandshakeTimeout",
    "LockError",
    "LockTimeout",
    "LockTableFull",
]
