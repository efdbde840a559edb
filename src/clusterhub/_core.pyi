# Stub for the cffi-compiled module built from csrc/ by csrc/build_core.py.
# Its functions are declared in csrc/cdef_*.h; only _bindings.py imports it.
from typing import Any, TypeVar, overload

ffi: Any
lib: Any

_L = TypeVar("_L", bound=LockBase)

class LockBase:
    """The C base type of clusterhub.Lock (csrc/lockhandle.c), set on this
    module by ``lib.ch_lockbase_register`` (see _bindings.py)."""

    _ref: int  # the handle's lock-table ref
    @property
    def _rec(self) -> set[Any]: ...  # weak refs to the tokens of threads whose latest acquire recovered
    _thread_recovered: bool  # the calling thread's own (read, or record)
    @overload
    def acquire(self, blocking_or_timeout: float | None = ..., /) -> bool: ...
    @overload
    def acquire(self, /, *, timeout: float | None = ...) -> bool: ...
    @overload
    def acquire(self, blocking: bool, /, timeout: float | None = ...) -> bool: ...
    @overload
    def acquire(self, /, *, blocking: object, timeout: float | None = ...) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self: _L) -> _L: ...
    def __exit__(self, exc_type: Any, exc: Any, tb: Any, /) -> None: ...
    @staticmethod
    def _held_here(ref: int, /) -> int: ...  # 1, 0 or a negative errno (lockhandle.h)

def decode_messages(
    rx: int, i: int, n: int, loads: Any, sender: Any, out: list[Any], reply: Any, /
) -> int:
    """The messages (and, with ``reply``, requests) of a received batch from
    frame ``i`` on, as inbox items appended to ``out``; the first frame not
    decoded (csrc/decode.h).
    Set on this module by ``lib.ch_decode_register`` (see _bindings.py)."""

class Reply:
    """reply(ok, value): answer one request (csrc/reply.h)."""

    rid: int
    def __init__(self, ctx: tuple[Any, ...], rid: int, /) -> None: ...
    def __call__(self, ok: bool, value: Any, /) -> Any: ...

def reply_rid(rx: int, n: int, /) -> int:
    """The request id of the batch of ``n`` frames in ``rx`` when it is
    exactly one reply, else 0 (csrc/decode.h)."""

def take_reply(rx: int, n: int, rid: int, loads: Any, miss: Any, /) -> Any:
    """The loaded reply to request ``rid`` when the batch of ``n`` frames in
    ``rx`` is exactly that reply, else ``miss`` (csrc/decode.h)."""
