"""The dispatcher threads' scheduling policy (Linux ``SCHED_BATCH``).

A dispatcher thread sleeps in epoll until a peer writes to it.  Under the
default policy, that wake-up preempts the writer on its CPU at once.  For a
request, the writer is a requester about to wait for its reply: preempted
between its send and its wait, its reply then arrives before it waits, so
the reply wakes its process's dispatcher thread instead (a second thread
woken, often on the other CPU, and a GIL hand-off).  A ``SCHED_BATCH``
thread does not preempt on wake-up: the requester reaches its wait first and
is the one woken.  Nothing else changes: an idle CPU still runs the
dispatcher at once, and the time slice still ends a busy thread's turn.

Threads and processes inherit their creator's policy, so whatever clusterhub
starts from a dispatcher thread (a worker forked from a handler, the timer
and event-loop threads) goes back to the ordinary policy with ``reset``.
The C writer thread does the same for itself (``csrc/frame.c``).  A thread
under any other policy than the ordinary one (real-time, idle, batch
already) is left as it is.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

log = logging.getLogger("clusterhub")

_OTHER = os.SCHED_OTHER
_BATCH = os.SCHED_BATCH
_PARAM = os.sched_param(0)

# Native ids of the threads this module made SCHED_BATCH (only those are
# ever switched back, and only their descendants inherit it from us).
_batched: set[int] = set()


def batch(tid: int) -> None:
    """Make thread ``tid`` SCHED_BATCH if it runs under the ordinary policy."""
    try:
        if os.sched_getscheduler(tid) != _OTHER:
            return
        os.sched_setscheduler(tid, _BATCH, _PARAM)
    except OSError as e:  # (a sandbox may refuse it: nothing breaks)
        log.debug("dispatcher thread left under its policy: %r", e)
        return
    _batched.add(tid)


def is_batched() -> bool:
    """True on a thread that ``batch`` changed: what it starts must ``reset``."""
    return threading.get_native_id() in _batched


def reset(tid: int = 0) -> None:
    """Put thread ``tid`` (0: the calling one) back from SCHED_BATCH to the
    ordinary policy: for a thread (or a forked process's first thread) whose
    creator ``is_batched``."""
    try:
        if os.sched_getscheduler(tid) == _BATCH:
            os.sched_setscheduler(tid, _OTHER, _PARAM)
    except OSError as e:
        log.debug("cannot restore the scheduling policy: %r", e)


def forget(tid: Optional[int] = None) -> None:
    """Drop thread ``tid`` (a dispatcher that stopped, whose id the kernel
    may give to another thread), or all (in a fork child: the parent's
    threads are not ours)."""
    if tid is None:
        _batched.clear()
    else:
        _batched.discard(tid)
