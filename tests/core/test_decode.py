"""decode_messages and take_reply (csrc/decode.c), the C decoders of
messages and requests, and of a requester's reply.

Their contracts (csrc/decode.h) are checked against a model written here
from the envelope format, on frames fed into a real receive buffer; and end
to end, a burst mixing every kind of frame (and bodies that fail to load)
is handled as Router.read alone would.
"""

from __future__ import annotations

import logging
import os
import pickle
import struct
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clusterhub
from clusterhub import protocol
from clusterhub._bindings import Reply, Rx, decode_messages, reply_rid, take_reply

from conftest import Reports, join_ok

pytestmark = pytest.mark.timeout(60)

FRAME = struct.Struct("<HHI")  # frame.h: magic, reserved, length
MAGIC = 0x4843


class Boom(Exception):
    pass


def loads(b: Any) -> Any:
    """pickle.loads, except that a body starting with b"!" raises (a stand-in
    for any body that does not load)."""
    if bytes(b[:1]) == b"!":
        raise Boom(bytes(b))
    return pickle.loads(b)


def envelope(kind: int, name: bytes, body: bytes, origin: int = 7, rid: int = 9) -> bytes:
    return protocol.HEADER.pack(kind, origin, rid, len(name)) + name + body


def feed(payloads: list[bytes]) -> tuple[Rx, int]:
    rx = Rx(1 << 20)
    wire = b"".join(FRAME.pack(MAGIC, 0, len(p)) + p for p in payloads)
    n, used = rx.feed(wire)
    assert used == len(wire) and isinstance(n, list) and len(n) == len(payloads)
    return rx, len(n)


def model(payloads: list[bytes], i: int, sender: Any, reply: Any = None) -> tuple[list[tuple[Any, ...]], int]:
    """What decode.h promises: the items of the messages (and, with a
    reply factory, requests) from i on, and the first frame not decoded."""
    out = []
    kinds = (protocol.MSG,) if reply is None else (protocol.MSG, protocol.REQ)
    for j in range(i, len(payloads)):
        p = payloads[j]
        if len(p) < protocol.HEADER.size or p[0] not in kinds:
            return out, j
        nlen = struct.unpack_from("<H", p, 13)[0]
        if protocol.HEADER.size + nlen > len(p):
            return out, j
        try:
            name = p[15 : 15 + nlen].decode("utf-8")
            data = loads(memoryview(p[15 + nlen :]))
        except Exception:  # a bad name, Boom, or any other load failure: left to Python
            return out, j
        rid = struct.unpack_from("<Q", p, 5)[0]
        out.append((name, data, sender, None if p[0] == protocol.MSG else rid))
    return out, len(payloads)


names = st.sampled_from([b"m", b"m", b"other", "é".encode(), b"\xff\xfe", b""])
bodies = st.one_of(
    st.integers().map(pickle.dumps),
    st.text(max_size=20).map(pickle.dumps),
    st.just(b"!bad"),
    st.binary(max_size=8),  # mostly not a pickle at all
)
frames = st.one_of(
    st.builds(envelope, st.just(protocol.MSG), names, bodies),
    st.builds(envelope, st.sampled_from([protocol.REQ, protocol.RES, protocol.BCAST, 0, 9]), names, bodies),
    st.binary(max_size=16),  # shorter than an envelope, or any bytes
    st.builds(lambda n: protocol.HEADER.pack(protocol.MSG, 0, 0, n) + b"x", st.integers(2, 0xFFFF)),
)


# (csrc/checks.sh runs many more under the sanitizers)
EXAMPLES = int(os.environ.get("CH_DECODE_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, min_size=1, max_size=40), st.data(), st.booleans())
def test_matches_the_model(payloads: list[bytes], data: st.DataObject, requests: bool) -> None:
    rx, n = feed(payloads)
    i = data.draw(st.integers(0, n))
    sender = object()
    ctx = CTX if requests else None
    out: list[Any] = []
    stop = decode_messages(rx.addr, i, n, loads, sender, out, ctx)
    want, want_stop = model(payloads, i, sender, ctx)
    assert stop == want_stop
    assert len(out) == len(want)
    for got, exp in zip(out, want):
        assert got[0] == exp[0] and type(got[0]) is str
        assert got[1] == exp[1]
        assert got[2] is sender
        if exp[3] is None:
            assert got[3] is None
        else:  # a request's Reply, for its id
            assert type(got[3]) is Reply and got[3].rid == exp[3]


def test_same_name_is_one_object_and_refcounts_balance() -> None:
    payloads = [envelope(protocol.MSG, b"tick", pickle.dumps(k)) for k in range(100)]
    rx, n = feed(payloads)
    sender = object()
    before = sys.getrefcount(sender)
    out: list[Any] = []
    assert decode_messages(rx.addr, 0, n, pickle.loads, sender, out, None) == n
    assert [x[1] for x in out] == list(range(100))
    assert len({id(x[0]) for x in out}) == 1
    assert sys.getrefcount(sender) == before + 100
    del out
    assert sys.getrefcount(sender) == before


MISS = object()

# A reply context (csrc/reply.h) that is never called here: decode_messages
# only puts it in each request's Reply.
CTX = (None, 0, -1, 0, None, None, None, None, 0)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames, min_size=1, max_size=3), st.integers(0, 12))
def test_take_reply_matches_the_model(payloads: list[bytes], rid: int) -> None:
    """The loaded body when the batch is exactly one well-formed reply to
    rid whose body loads; else the miss object, no exception pending."""
    rx, n = feed(payloads)
    got = take_reply(rx.addr, n, rid, loads, MISS)
    p = payloads[0]
    want: Any = MISS
    if n == 1 and len(p) >= protocol.HEADER.size and p[0] == protocol.RES:
        kind, origin, prid, nlen = protocol.HEADER.unpack_from(p)
        if prid == rid and protocol.HEADER.size + nlen <= len(p):
            try:
                want = loads(memoryview(p[protocol.HEADER.size + nlen :]))
            except Exception:
                want = MISS
    assert got is MISS if want is MISS else got == want


def test_reply_rid() -> None:
    rx, n = feed([envelope(protocol.RES, b"", pickle.dumps(1), rid=77)])
    assert reply_rid(rx.addr, n) == 77
    rx, n = feed([envelope(protocol.REQ, b"x", pickle.dumps(1), rid=77)])
    assert reply_rid(rx.addr, n) == 0
    rx, n = feed([envelope(protocol.RES, b"", b"", rid=5)] * 2)
    assert reply_rid(rx.addr, n) == 0  # (not a lone reply)
    with pytest.raises(ValueError):
        reply_rid(0, 1)


def test_take_reply_bad_arguments() -> None:
    with pytest.raises(ValueError):
        take_reply(0, 1, 1, pickle.loads, MISS)
    with pytest.raises(TypeError):
        take_reply(1, 1, 1, pickle.loads)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "args, exc",
    [
        ((0, 0, 0, pickle.loads, None, [], None), ValueError),  # no rx
        (("x", 0, 0, pickle.loads, None, [], None), TypeError),
        ((1, -1, 0, pickle.loads, None, [], None), ValueError),
        ((1, 2, 1, pickle.loads, None, [], None), ValueError),  # i past n
        ((1, 0, 0, pickle.loads, None, (), None), ValueError),  # out not a list
        ((1, 0, 0, pickle.loads, None, [], 3), ValueError),  # reply context not a tuple
        ((1, 0, 0, pickle.loads, None, []), TypeError),  # arity
    ],
)
def test_bad_arguments_raise(args: tuple[Any, ...], exc: type) -> None:
    with pytest.raises(exc):
        decode_messages(*args)


def test_loads_errors_are_left_to_python_and_cleared() -> None:
    """A body that does not load stops the decoder there with no exception
    pending; the frames before it are decoded."""
    payloads = [envelope(protocol.MSG, b"m", pickle.dumps(1)), envelope(protocol.MSG, b"m", b"!x")]
    rx, n = feed(payloads)
    out: list[Any] = []
    assert decode_messages(rx.addr, 0, n, loads, None, out, None) == 1
    assert out == [("m", 1, None, None)]


class _Bad:
    def __reduce__(self) -> Any:
        return (_explode, ())


def _explode() -> None:
    raise RuntimeError("cannot be rebuilt")


def test_a_burst_of_every_kind_end_to_end(hub: clusterhub.Hub, reports: Reports, caplog: Any) -> None:
    """A worker's burst mixes messages, requests, broadcasts and a message
    whose data cannot be rebuilt in the master: every good one is handled
    once, in order, with the right sender; the bad one is logged."""
    caplog.set_level(logging.ERROR, logger="clusterhub")
    seen: list[Any] = []
    hub.on("m", lambda d, s: seen.append(("m", d, s.id)))
    hub.on("r", lambda d, s: seen.append(("r", d, s.id)) or d * 2)

    def worker() -> None:
        futs = []
        for k in range(300):
            if k % 50 == 7:
                hub.send_to_master("m", _Bad())
            elif k % 10 == 3:
                futs.append(hub.request_master("r", k))
            elif k % 25 == 11:
                hub.send_to_workers("b", k)  # relayed: no other worker, no handler here
            else:
                hub.send_to_master("m", k)
        reports.put([f.result(timeout=20) for f in futs])

    w = hub.fork(worker)
    (answers,) = reports.get(30)
    join_ok(w)
    expect = [k for k in range(300) if not (k % 50 == 7 or k % 25 == 11)]
    assert [x[1] for x in seen] == expect
    assert all(x[2] == w.id for x in seen)
    assert [x[0] for x in seen] == ["r" if k % 10 == 3 else "m" for k in expect]
    assert answers == [2 * k for k in expect if k % 10 == 3]
    assert sum("cannot decode the data of 'm'" in r.getMessage() for r in caplog.records) == 6
