"""Reply (csrc/reply.c), the C callable that answers one request: over a
real socketpair and send queue, the frame it writes, and when it hands over
to the Python fallbacks (an error to answer, a body that does not
serialize, bytes left queued, a closed queue), as csrc/reply.h says.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import pytest

from clusterhub import protocol
from clusterhub._bindings import Reply, Rx, Tx, socketpair

pytestmark = pytest.mark.timeout(60)


class Dispatcher:
    answered = 0


class Setup:
    def __init__(self, dumps: Any = pickle.dumps, max_len: int = 1 << 20) -> None:
        self.a, self.b = socketpair()
        self.tx = Tx()
        self.dispatcher = Dispatcher()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.ctx = (self.tx, self.tx.addr, self.a, max_len, dumps,
                    lambda *args: self.calls.append(("slow", args)) or "slow",
                    lambda *args: self.calls.append(("after", args)) or "after",
                    self.dispatcher, 4242)

    def frames(self) -> list[bytes]:
        rx = Rx(1 << 22)
        got = rx.read(self.b)
        assert isinstance(got, list)
        return [bytes(v) for v in got]

    def close(self) -> None:
        self.tx.close()
        os.close(self.a)
        os.close(self.b)


@pytest.fixture
def setup() -> Any:
    s = Setup()
    yield s
    s.close()


def test_a_result_goes_out_as_one_reply_frame(setup: Setup) -> None:
    reply = Reply(setup.ctx, 99)
    assert reply.rid == 99
    assert reply(True, {"x": [1, 2]}) is None
    (frame,) = setup.frames()
    kind, origin, rid, nlen = protocol.HEADER.unpack_from(frame)
    assert (kind, origin, rid, nlen) == (protocol.RES, 0, 99, 0)
    assert pickle.loads(frame[protocol.HEADER.size:]) == {"x": [1, 2]}
    assert setup.dispatcher.answered == 4242
    assert setup.calls == []


def test_an_error_takes_the_python_path(setup: Setup) -> None:
    e = ValueError("no")
    assert Reply(setup.ctx, 5)(False, e) == "slow"
    assert setup.calls == [("slow", (5, False, e))]
    assert setup.dispatcher.answered == 0


@pytest.mark.parametrize("dumps", [lambda v: 1 / 0, lambda v: "not bytes"], ids=["raises", "str"])
def test_a_body_that_does_not_serialize_takes_the_python_path(dumps: Any) -> None:
    s = Setup(dumps=dumps)
    try:
        assert Reply(s.ctx, 6)(True, 123) == "slow"
        assert s.calls == [("slow", (6, True, 123))]
    finally:
        s.close()


def test_bytes_left_queued_are_handed_over(setup: Setup) -> None:
    big = b"x" * 900_000  # more than the socket takes at once (and < max_len)
    assert Reply(setup.ctx, 7)(True, big) == "after"
    ((what, (rid, left, size)),) = setup.calls
    assert (what, rid) == ("after", 7)
    assert 0 < left and size == len(pickle.dumps(big))


def test_a_closed_queue_is_handed_over_as_an_error(setup: Setup) -> None:
    setup.tx.close()
    assert Reply(setup.ctx, 8)(True, 1) == "after"
    ((what, (rid, left, _size)),) = setup.calls
    assert (what, rid) == ("after", 8) and left < 0


def test_too_large_is_handed_over_as_an_error() -> None:
    s = Setup(max_len=16)
    try:
        assert Reply(s.ctx, 9)(True, b"y" * 100) == "after"
        ((what, (rid, left, _size)),) = s.calls
        assert (what, rid) == ("after", 9) and left < 0
    finally:
        s.close()


def test_bad_arguments() -> None:
    with pytest.raises(TypeError):
        Reply((1, 2), 1)  # not a context
    with pytest.raises(TypeError):
        Reply(("x",) * 9, "1")  # type: ignore[arg-type]
    s = Setup()
    try:
        with pytest.raises(TypeError):
            Reply(s.ctx, 1)(True)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            Reply(s.ctx, 1)(True, 1, wait=False)  # type: ignore[call-arg]
    finally:
        s.close()
