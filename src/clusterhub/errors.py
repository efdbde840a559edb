"""The exception tree: everything derives from :class:`HubError`, and where a
builtin fits, from that builtin too."""

from __future__ import annotations

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
    "HubClosedError",
    "LockError",
    "LockTimeout",
    "LockTableFull",
]


class HubError(Exception):
    """Root of every clusterhub error."""


class RemoteError(HubError):
    """A request's handler raised in the peer process.

    ``type_name`` is the qualified name of the original exception's type,
    ``str(error)`` its message and ``remote_traceback`` the formatted traceback
    as it was printed in the peer.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(type_name, message, remote_traceback)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}" if self.message else self.type_name


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


class HubClosedError(HubError):
    """The hub was closed in this process (or belongs to another process)."""


class LockError(HubError):
    """A lock was misused: re-acquired by its holder, released by a non-holder,
    too many held by one thread, or a hub closed while its locks are in use."""


class LockTimeout(LockError, TimeoutError):
    """``with hub.lock(key, timeout=t)`` did not acquire the lock in time."""


class LockTableFull(LockError):
    """More keys are held or waited on at once than the lock table can hold."""
