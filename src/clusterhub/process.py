"""Worker processes: the ``Worker`` handle, running a target in the child, and
learning how a worker ended.

The master learns of a worker's exit from its pidfd (which, unlike the socket,
cannot be held open by a grandchild), on a thread of its own
(:class:`ExitWatcher`), so that an exit is seen as soon as the kernel reports
it whatever the handlers are doing; it reaps the worker with ``waitpid`` and
reports the exit code as ``multiprocessing`` does (negative signal number
when killed).
"""

from __future__ import annotations

import logging
import os
import select
import signal
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .channel import Channel

log = logging.getLogger("clusterhub")


class Worker:
    """A worker process of a hub.

    In the master: a live handle with ``pid``, ``is_alive()``, ``join()``,
    ``exitcode``, ``kill()`` and ``terminate()``.  In a worker, a ``Worker``
    standing for another worker (a broadcast's sender) guarantees only ``id``.
    """

    __slots__ = ("id", "pid", "_exited", "_exitcode", "_waiter", "channel", "settled", "hub_key",
                 "pidfd", "connected", "__weakref__")

    def __init__(
        self,
        id: int,
        pid: int | None = None,
        waiter: Callable[[threading.Event, float | None], bool] | None = None,
        hub_key: Any = None,
    ) -> None:
        self.id = id
        self.pid = pid
        self._exited = threading.Event()
        self._exitcode: int | None = None
        self._waiter = waiter
        self.channel: Channel | None = None
        # Set once the master has handled all this worker sent and run the
        # on_exit callbacks (what Hub.join waits for).
        self.settled = threading.Event()
        self.hub_key = hub_key  # which hub it belongs to (see __reduce__)
        # True for a process that connected by address (the hub did not fork
        # it, and never reaps it); pidfd: its pidfd, for signals that cannot
        # reach a reused pid.
        self.connected = False
        self.pidfd: int | None = None

    def __reduce__(self) -> Any:
        # A reference, not a copy: unpickled by a process of the same hub it
        # is that process's Worker for this id (see resolve_worker).
        return (_unpickle_worker, (self.hub_key, self.id))

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
        pidfd = self.pidfd
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(self.pid, sig)
        except (ProcessLookupError, OSError):
            pass  # (gone; or the pidfd closed as it exited)

    def set_exited(self, code: int | None) -> None:
        self._exitcode = code
        self._exited.set()


def _no_hub(key: Any, wid: int) -> Optional[Worker]:
    return None


# Set by the hub module: (hub key, worker id) -> that hub's Worker in this
# process, or None when no hub of this process has that key.
resolve_worker: Callable[[Any, int], Optional[Worker]] = _no_hub


def _unpickle_worker(hub_key: Any, wid: int) -> Worker:
    w = resolve_worker(hub_key, wid)
    return w if w is not None else Worker(wid, hub_key=hub_key)


class ExitWatcher:
    """A thread that waits on the pidfds of a hub's workers and calls
    ``on_exit(worker, code)`` (on that thread) when one exits; ``code`` is its
    exit status read without reaping (WNOWAIT), None when it is not a child
    of this process.

    It owns the pidfds: ``watch`` takes one, and the thread closes it after
    the call.  It sleeps in ``epoll_wait`` (no polling), and runs only while
    there are workers to watch.  ``lock`` is
    held by whoever must see the set of pidfds unchanged (a fork, whose child
    closes its copies with ``abandon``).
    """

    def __init__(self, name: str, on_exit: Callable[[Worker, Optional[int]], None]) -> None:
        self.name = name
        self._on_exit = on_exit
        self.lock = threading.RLock()
        self._fds: dict[int, Worker] = {}
        self._epoll: Optional[select.epoll] = None
        self._wake = -1
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    def watch(self, w: Worker, pidfd: int) -> None:
        """Report ``w``'s exit; takes ownership of ``pidfd`` (any thread)."""
        with self.lock:
            if self._epoll is None:
                self._epoll = select.epoll()
                self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self._epoll.register(self._wake, select.EPOLLIN)
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._fds[pidfd] = w
            self._epoll.register(pidfd, select.EPOLLIN)

    def unwatch(self, w: Worker) -> bool:
        """Stop watching ``w`` and close its pidfd; False when its exit was
        taken (or is being reported) already."""
        with self.lock:
            for fd, watched in self._fds.items():
                if watched is w:
                    del self._fds[fd]
                    if self._epoll is not None:
                        self._epoll.unregister(fd)
                        if not self._fds:  # (the thread ends once it has nothing to watch)
                            os.eventfd_write(self._wake, 1)
                    os.close(fd)
                    return True
        return False

    def _run(self) -> None:
        ep = self._epoll
        assert ep is not None
        while not self._stopping:
            try:
                events = ep.poll(-1, 16)
            except InterruptedError:
                continue
            for fd, _ev in events:
                if fd == self._wake:  # stop(), or unwatch() took the last one
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                    continue
                w = self._fds.get(fd)
                if w is None:
                    continue
                code = None  # (known without reaping only for a child of ours)
                try:
                    info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                    if info is None:
                        continue  # (not yet: a pidfd is readable once the process exited)
                    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
                except ChildProcessError:
                    pass  # not our child, or reaped by someone else: it did exit
                with self.lock:
                    if self._fds.get(fd) is not w:
                        continue  # (unwatched meanwhile: its leaving is reported there)
                    del self._fds[fd]
                    ep.unregister(fd)
                    os.close(fd)
                try:
                    self._on_exit(w, code)
                except Exception:  # a bug of ours: say so, keep watching the others
                    log.critical("clusterhub: handling the exit of worker %d failed", w.id,
                                 exc_info=True)
            with self.lock:
                if not self._fds and not self._stopping:  # none left: watch() starts anew
                    self._thread = None
                    self._close()
                    return

    def stop(self) -> None:
        """End the thread and close every fd (idempotent; never from the thread)."""
        with self.lock:
            self._stopping = True
            t = self._thread
            if self._epoll is None:
                return
            os.eventfd_write(self._wake, 1)
        if t is not None and t is not threading.current_thread():
            t.join()  # (it runs no user code: each exit is handled at once)
        self._close()

    def abandon(self) -> None:
        """In a fork child: the thread is not there; close our copies."""
        self.lock = threading.RLock()  # (maybe held at the fork: by the forking thread)
        self._stopping = True
        self._close()

    def _close(self) -> None:
        with self.lock:
            fds, self._fds = self._fds, {}
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:  # (in a fork child, the parent may have been closing it)
                    pass
            ep, self._epoll = self._epoll, None
            wake, self._wake = self._wake, -1
            if ep is not None:
                # (A fork child may see this half done by the parent's
                # thread, which the fork did not wait for: forgive EBADF.)
                ep.close()
                try:
                    os.close(wake)
                except OSError:
                    pass


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
