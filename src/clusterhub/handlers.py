"""The handler registry: ``on``/``off``/``once``.

Lists are copied on write, so the dispatcher reads a consistent tuple of
handlers without taking a lock and calls them outside any lock.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence

Handler = Callable[[Any, Any], Any]


class _Once:
    """Wraps a ``once`` handler; the registry drops it before it runs."""

    __slots__ = ("fn", "fired")

    def __init__(self, fn: Handler) -> None:
        self.fn = fn
        self.fired = False


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_name: dict[str, tuple[Any, ...]] = {}
        self.with_once: set[str] = set()  # names with a ``once`` entry: use take()
        self.get = self._by_name.get  # handlers of a name not in with_once

    def add(self, name: str, handler: Handler, once: bool = False) -> None:
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        entry: Any = _Once(handler) if once else handler
        with self._lock:
            if once:
                self.with_once.add(name)
            self._by_name[name] = self._by_name.get(name, ()) + (entry,)

    def remove(self, name: str, handler: Optional[Handler] = None) -> None:
        """Remove one handler (every registration of it), or all of ``name``."""
        with self._lock:
            if handler is None:
                self._by_name.pop(name, None)
                return
            kept = tuple(
                h for h in self._by_name.get(name, ())
                if h is not handler and not (isinstance(h, _Once) and h.fn is handler)
            )
            if kept:
                self._by_name[name] = kept
            else:
                self._by_name.pop(name, None)

    def take(self, name: str) -> Sequence[Handler]:
        """The handlers to run for one message of ``name``, in registration
        order; ``once`` handlers are removed here, before they run."""
        if name not in self.with_once:  # (a stale yes only costs the slow path)
            return self._by_name.get(name, ())
        out: list[Handler] = []
        with self._lock:
            for h in self._by_name.get(name, ()):
                if isinstance(h, _Once):
                    if h.fired:
                        continue
                    h.fired = True
                    out.append(h.fn)
                else:
                    out.append(h)
            kept = tuple(h for h in self._by_name.get(name, ())
                         if not (isinstance(h, _Once) and h.fired))
            if kept:
                self._by_name[name] = kept
            else:
                self._by_name.pop(name, None)
            if not any(isinstance(h, _Once) for h in kept):
                self.with_once.discard(name)
        return out

    def reset_lock(self) -> None:
        """In a fork child: the parent's lock may have been held at the fork."""
        self._lock = threading.Lock()
