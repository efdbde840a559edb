"""Exceptions across processes: a handler's exception becomes an error
reply's body, and an error reply becomes a :class:`RemoteError` (its type's
name, message and traceback, without clusterhub's own frames)."""

from __future__ import annotations

import os
import traceback
from typing import Any

from . import protocol
from .errors import NoHandlerError, RemoteError


class NoHandler(Exception):
    """Internal marker: no handler for a request's name (becomes NoHandlerError)."""


def type_name(e: BaseException) -> str:
    """The exception's type as a peer shows it: a builtin's bare name, else
    qualified by its module (clusterhub's own errors say ``clusterhub.X``)."""
    t = type(e)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def error_body(e: BaseException) -> bytes:
    """The body of the error reply that answers a request with ``e``."""
    if isinstance(e, NoHandler):
        return protocol.encode_error("NoHandlerError", f"no handler for {e.args[0]!r}", "", True)
    if isinstance(e, RemoteError):
        return protocol.encode_error(e.type_name, e.message, e.remote_traceback, isinstance(e, NoHandlerError))
    te = traceback.TracebackException(type(e), e, e.__traceback__)
    _drop_own_frames(te, set())
    return protocol.encode_error(type_name(e), str(e), "".join(te.format()), False)


_OWN_FILES = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _drop_own_frames(te: traceback.TracebackException, seen: set[int]) -> None:
    """Leave out clusterhub's own frames (the dispatcher calling the handler,
    the worker's entry point): a remote traceback shows the user's code."""
    seen.add(id(te))
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if not f.filename.startswith(_OWN_FILES)]
    )
    for chained in (te.__cause__, te.__context__):
        if chained is not None and id(chained) not in seen:
            _drop_own_frames(chained, seen)


def reply_body(dumps: Any, ok: bool, value: Any) -> tuple[int, bytes]:
    """The kind and body of the reply that answers a request with ``value``
    (a result when ``ok``, else an exception); a result the serializer
    refuses answers it with that error."""
    if ok:
        try:
            return protocol.RES, dumps(value)
        except Exception as e:
            value = e
    return protocol.ERR, error_body(value)


def remote_error(body: memoryview) -> RemoteError:
    """The RemoteError (or NoHandlerError) an error reply's body stands for."""
    try:
        t, m, tb, no_handler = protocol.decode_error(body)
    except Exception as e:
        return RemoteError("HubError", f"undecodable error reply: {e!r}")
    return (NoHandlerError if no_handler else RemoteError)(t, m, tb)


def as_remote_error(e: BaseException) -> RemoteError:
    """A local handler's exception, shaped as if it came from a peer."""
    return remote_error(memoryview(error_body(e)))
