"""``python -m clusterhub serve ADDRESS``: a master with no program of its
own, for processes that other process managers start (they join with
``clusterhub.connect(ADDRESS)``): a lock and message hub that runs until
SIGTERM or SIGINT."""

from __future__ import annotations

import importlib
import logging
import os
import select
import signal
from typing import Any, Callable, Optional

from .hub import Hub

log = logging.getLogger("clusterhub")


def load_handlers(spec: str) -> Callable[[Hub], Any]:
    """``module:function`` -> that function (it is called as ``function(hub)``)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--handlers takes module:function, not {spec!r}")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"{spec} is not callable")
    return fn  # type: ignore[no-any-return]


def serve(address: str, handlers: Optional[str] = None) -> int:
    """Run a master at ``address`` until SIGTERM or SIGINT; the exit code.
    ``CLUSTERHUB_AUTHKEY`` in the environment, if set, is the authkey."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s clusterhub: %(message)s")
    setup = load_handlers(handlers) if handlers else None
    authkey = os.environ.get("CLUSTERHUB_AUTHKEY")
    # The signal may be delivered to any thread (the hub has its own), and a
    # main thread blocked on a lock would not run the handler: the C-level
    # handler writes to a wakeup fd instead, which the main thread waits on.
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: None)
    # (A mask inherited from whoever started us must not hide them either.)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        with Hub(address=address, authkey=authkey.encode() if authkey else None,
                 exit_on_master_death=False) as hub:
            hub.on_exit(lambda wk: log.info("worker %d (pid %s) left", wk.id, wk.pid))
            if setup is not None:
                setup(hub)
            log.info("serving at %s (pid %d)", hub.address, os.getpid())
            print(f"serving at {hub.address}", flush=True)
            select.select([r], [], [])
            log.info("stopping (signal %d)", os.read(r, 1)[0])
    finally:
        signal.set_wakeup_fd(-1)
        os.close(r)
        os.close(w)
    return 0
