"""Worker processes: the ``Worker`` handle, running a target in the child, and
learning how a worker ended.

The master learns of a worker's exit from its pidfd (which, unlike the socket,
cannot be held open by a grandchild), reaps it with ``waitpid`` and reports the
exit code as ``multiprocessing`` does (negative signal number when killed).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .channel import Channel

log = logging.getLogger("clusterhub")


class Worker:
    """A worker process of a hub.

    In the master: a live handle with ``pid``, ``is_alive()``, ``join()``,
    ``exitcode``, ``kill()`` and ``terminate()``.  In a worker, a ``Worker``
    standing for another worker (a broadcast's sender) guarantees only ``id``.
    """

    __slots__ = ("id", "pid", "_exited", "_exitcode", "_waiter", "channel", "pidfd", "__weakref__")

    def __init__(
        self,
        id: int,
        pid: int | None = None,
        waiter: Callable[[threading.Event, float | None], bool] | None = None,
    ) -> None:
        self.id = id
        self.pid = pid
        self._exited = threading.Event()
        self._exitcode: int | None = None
        self._waiter = waiter
        self.channel: Channel | None = None
        self.pidfd: int | None = None

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else f"exitcode={self._exitcode}"
        return f"<Worker id={self.id} pid={self.pid} {state}>"

    def is_alive(self) -> bool:
        """True until the master has seen this worker exit."""
        return self.pid is not None and not self._exited.is_set()

    @property
    def exitcode(self) -> int | None:
        """The exit code; ``-N`` when killed by signal N; None while alive."""
        return self._exitcode

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the worker has exited; True if it has."""
        if self._waiter is None:
            return self._exited.wait(timeout)
        return self._waiter(self._exited, timeout)

    def kill(self) -> None:
        """Send SIGKILL (nothing if it already exited)."""
        self._signal(signal.SIGKILL)

    def terminate(self) -> None:
        """Send SIGTERM (nothing if it already exited)."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        if self.pid is None or self._exited.is_set():
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def set_exited(self, code: int | None) -> None:
        self._exitcode = code
        self._exited.set()


def reap(pid: int) -> int | None:
    """Collect an exited child's status; its exit code, or None if someone
    else reaped it first."""
    try:
        _pid, status = os.waitpid(pid, 0)
    except ChildProcessError:
        log.warning("worker pid %d was reaped by someone else: exit code unknown", pid)
        return None
    return os.waitstatus_to_exitcode(status)


def run_target(target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Run a worker's target; the exit code it asks for.

    Returning gives 0, ``SystemExit(n)`` gives n, an uncaught exception prints
    its traceback and gives 1.  Ctrl-C (KeyboardInterrupt) gives -SIGINT
    without a traceback: the terminal already shows the interrupt once.
    """
    try:
        target(*args, **kwargs)
        return 0
    except SystemExit as e:
        code = e.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code & 0xFF
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        return 1


def flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def exit_process(code: int) -> None:
    """Leave a worker without running the master's atexit handlers (it is a
    fork of the master): flush stdio, then ``_exit`` or die of the signal."""
    flush_stdio()
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [-code])
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 1)
