"""The message envelope inside a frame, and the data serializers.

A frame's payload is a 15-byte header, the message name (UTF-8) and the
serialized data::

    kind u8 | origin u32 | request id u64 | name length u16 | name | data

(little-endian).  ``csrc/envelope.h`` defines it, for the C core and for this
module: the kinds, sizes and field layout below come from it through
``_bindings``, and :data:`HEADER` is built from the C field sizes (and checked
against them) at import.

Only the data goes through the user's serializer, so JSON or a custom
serializer never has to represent our bookkeeping, and the master can relay a
worker's broadcast without decoding its data.  Error replies carry
``[type name, message, traceback, no-handler flag]`` as JSON whatever the
serializer.

Messages are mostly built in C (``ch_tx_send_msg``/``ch_tx_post_msg``) and
decoded in place by ``Router.read`` (messages and requests by C's
``decode_messages``); :func:`encode` builds the one payload a broadcast
sends to every worker.
"""

from __future__ import annotations

import json
import pickle
import struct
from typing import Any, Callable, Protocol

from . import _bindings

MSG: int = _bindings.KIND_MSG  # plain message
REQ: int = _bindings.KIND_REQ  # request, answered by RES or ERR with the same id
RES: int = _bindings.KIND_RES  # successful reply
ERR: int = _bindings.KIND_ERR  # failed reply
BCAST: int = _bindings.KIND_BCAST  # a worker's broadcast, relayed by the master to the other workers

_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}  # unsigned, by size


def _header(fields: tuple[tuple[int, int], ...], size: int) -> struct.Struct:
    """The struct of the envelope's fields ((offset, size) in wire order,
    unsigned little-endian, packed), checked to end at ``size``."""
    fmt, at = "<", 0
    for off, n in fields:
        if off != at or n not in _CODES:
            raise ImportError(f"envelope field at {off} of {n} bytes: not packed or not an integer")
        fmt += _CODES[n]
        at += n
    st = struct.Struct(fmt)
    if st.size != size:
        raise ImportError(f"envelope fields take {st.size} bytes, not {size}")
    return st


# kind, origin, request id, name length: "<BIQH" (the C sizes decide).
HEADER = _header(_bindings.MSG_FIELDS, _bindings.MSG_HEADER)
NAME_MAX: int = _bindings.MSG_NAME_MAX

_pack = HEADER.pack


class Serializer(Protocol):
    """What ``Hub(serializer=...)`` accepts besides ``"pickle"`` and ``"json"``."""

    def dumps(self, obj: Any, /) -> bytes: ...

    def loads(self, data: bytes, /) -> Any: ...


Dumps = Callable[[Any], bytes]
Loads = Callable[[Any], Any]


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _json_loads(data: Any) -> Any:
    return json.loads(bytes(data))


def serializer_functions(spec: str | Serializer) -> tuple[Dumps, Loads]:
    """(dumps, loads) for ``Hub(serializer=spec)``."""
    if spec == "pickle":
        # pickle's default protocol, called as is: a wrapper to ask for
        # another costs a Python call per message.  loads takes a memoryview.
        return pickle.dumps, pickle.loads
    if spec == "json":
        return _json_dumps, _json_loads
    if isinstance(spec, str):
        raise ValueError(f"unknown serializer {spec!r}: use 'pickle', 'json' or an object")
    dumps, loads = getattr(spec, "dumps", None), getattr(spec, "loads", None)
    if not callable(dumps) or not callable(loads):
        raise TypeError("serializer must be 'pickle', 'json' or have dumps() and loads()")

    def checked_dumps(obj: Any) -> bytes:
        out = dumps(obj)
        if not isinstance(out, (bytes, bytearray)):
            raise TypeError(f"serializer.dumps returned {type(out).__name__}, not bytes")
        return bytes(out)

    return checked_dumps, lambda data: loads(bytes(data))


def serializer_name(spec: str | Serializer) -> str:
    """The serializer's name as a handshake compares it ("pickle", "json",
    or the object's type, qualified by its module)."""
    if isinstance(spec, str):
        return spec
    return f"{type(spec).__module__}.{type(spec).__qualname__}"


known_names: dict[str, bytes] = {}  # names seen, checked and encoded (bounded)


def encode_name(name: str) -> bytes:
    """The wire form of a message name; TypeError/ValueError for a bad one."""
    try:
        return known_names[name]
    except (KeyError, TypeError):  # (unhashable: not a str, said below)
        pass
    if not isinstance(name, str):
        raise TypeError(f"message name must be str, not {type(name).__name__}")
    b = name.encode()
    if not b or len(b) > NAME_MAX:
        raise ValueError(f"message name must be 1 to {NAME_MAX} bytes of UTF-8")
    if len(known_names) < 4096:
        known_names[name] = b
    return b


def encode(kind: int, origin: int, rid: int, name: bytes, body: bytes) -> bytes:
    return b"".join((_pack(kind, origin, rid, len(name)), name, body))


def encode_error(type_name: str, message: str, tb: str, no_handler: bool) -> bytes:
    return json.dumps([type_name, message, tb, no_handler]).encode()


def decode_error(body: memoryview) -> tuple[str, str, str, bool]:
    t, m, tb, nh = json.loads(bytes(body))
    return str(t), str(m), str(tb), bool(nh)
