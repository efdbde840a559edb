"""The exception tree: everything derives from :class:`HubError`, and where a
builtin fits, from that builtin too."""

from __future__ import annotations

from typing import Any

__all__ = [
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
    "LockError",
    "LockTimeout",
    "LockTableFull",
    "AddressInUse",
    "ConnectError",
    "ConnectTimeout",
    "HandshakeError",
    "HandshakeTimeout",
]


class HubError(Exception):
    """Root of every clusterhub error."""


class RemoteTraceback(Exception):
    """The traceback of a peer's exception, chained as a :class:`RemoteError`'s
    ``__cause__`` so that an uncaught remote error prints it (as
    ``concurrent.futures`` does for a worker process's exception)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


class RemoteError(HubError):
    """A request's handler raised in the peer process.

    ``type_name`` is the name of the original exception's type (qualified by
    its module unless it is a builtin), ``str(error)`` is one line, the type
    and the message, and ``remote_traceback`` the formatted traceback as the
    peer saw it (without clusterhub's own frames).  The traceback is chained
    as ``__cause__`` (a :class:`RemoteTraceback`), so it is printed when the
    error goes uncaught.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(type_name, message)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        if remote_traceback:
            self.__cause__ = RemoteTraceback(remote_traceback)

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __reduce__(self) -> Any:
        return (type(self), (self.type_name, self.message, self.remote_traceback))


class NoHandlerError(RemoteError):
    """The receiver has no handler for the request's name."""


class PeerDied(HubError):
    """The process at the other end of a channel died (or the channel closed)."""


class WorkerDied(PeerDied):
    """The worker a message or request was addressed to has exited."""


class MasterDied(PeerDied):
    """This worker's master has died."""


class MessageTooLarge(HubError, ValueError):
    """A frame would exceed ``Hub(max_message_size=...)``; nothing was sent."""


class NotMasterError(HubError):
    """A master-only call was made in a worker."""


class NoWorkersError(HubError):
    """A request for a random worker was made while no worker is alive."""


class SendTimeout(HubError, TimeoutError):
    """A ``send_to_*(..., timeout=t)`` found the queue to a peer full for
    ``t`` seconds: nothing of the message went to that peer.

    ``unreached`` lists the workers a broadcast did not reach (the others got
    it); it is empty when the peer was the master.
    """

    def __init__(self, message: str, unreached: Any = ()) -> None:
        super().__init__(message)
        self.unreached = list(unreached)

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.unreached))


class HubClosedError(HubError):
    """The hub was closed in this process (or belongs to another process)."""


class LockError(HubError, RuntimeError):
    """A lock was misused: re-acquired by its holder, released by a non-holder,
    too many held by one thread, or a hub closed while its locks are in use.
    Also a ``RuntimeError``, what ``threading`` raises for the same mistakes."""


class LockTimeout(LockError, TimeoutError):
    """``with hub.lock(key, timeout=t)`` did not acquire the lock in time."""


class LockTableFull(LockError):
    """More keys are held or waited on at once than the lock table can hold."""


class AddressInUse(HubError):
    """Another process listens on the address (a live master, or a process
    that is not one), or the path is taken by something that is not a socket.
    ``address`` is the address as given."""

    def __init__(self, message: str, address: str = "") -> None:
        super().__init__(message)
        self.address = address


class ConnectError(HubError, ConnectionError):
    """Connecting to a hub failed: nothing listens there, the socket file is
    not accessible, or (subclasses) the connection timed out or the handshake
    was refused.  The OSError behind it, if any, is its ``__cause__``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class ConnectTimeout(ConnectError, TimeoutError):
    """The listener did not take the connection within the timeout (its
    backlog stayed full)."""


class HandshakeError(ConnectError):
    """The handshake failed or was refused.  ``by_peer``: the other side
    refused, and the message carries its reason (``"refused by the master:
    ..."``); otherwise this side found the problem (and told the peer, when
    it could)."""

    def __init__(self, message: str, by_peer: bool = False) -> None:
        super().__init__(message)
        self.by_peer = by_peer


class HandshakeTimeout(HandshakeError, TimeoutError):
    """The peer did not send (or take) a handshake message within the deadline."""


# Shown as ``clusterhub.X`` (tracebacks, type names sent to peers, pickles),
# not under this private module's path.
for _name in __all__ + ["RemoteTraceback"]:
    globals()[_name].__module__ = "clusterhub"
del _name
