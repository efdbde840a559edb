"""This process's hubs, and what a fork made by other code does to them: in
the child every hub is inert (HubClosedError), but the one whose own
``fork()`` is in progress, which becomes the worker side there."""

from __future__ import annotations

import itertools
import os
import weakref
from typing import Any, Optional

from . import sched

hubs: "weakref.WeakSet[Any]" = weakref.WeakSet()  # every open Hub of this process
serial = itertools.count(1)  # (with the master's pid: a hub's key)
_forking: Optional[Any] = None  # the hub whose fork() is in progress


def forking(hub: Optional[Any]) -> None:
    """Mark ``hub`` as forking (None: done)."""
    global _forking
    _forking = hub


def _after_fork_in_child() -> None:
    sched.forget()
    for hub in list(hubs):
        if hub is not _forking:
            hub._abandon()


os.register_at_fork(after_in_child=_after_fork_in_child)
