"""``python -m clusterhub serve ADDRESS``: a master with no program of its
own, for processes that other process managers start (they join with
``clusterhub.connect(ADDRESS)``): a lock and message hub that runs until
SIGTERM or SIGINT."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import threading
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
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    with Hub(address=address, authkey=authkey.encode() if authkey else None,
             exit_on_master_death=False) as hub:
        hub.on_exit(lambda w: log.info("worker %d (pid %s) left", w.id, w.pid))
        if setup is not None:
            setup(hub)
        log.info("serving at %s (pid %d)", hub.address, os.getpid())
        print(f"serving at {hub.address}", flush=True)
        stop.wait()
        log.info("stopping")
    return 0
