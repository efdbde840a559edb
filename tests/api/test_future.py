"""clusterhub.Future as a concurrent.futures.Future: whether or not its base
class has been set up yet (it is set up lazily), every public method and the
module functions that look inside futures (wait, as_completed) behave as the
standard library's."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading

import pytest

from clusterhub import Future

pytestmark = pytest.mark.timeout(30)


def test_completed_before_anyone_looks():
    """A future completed before any other use gives its result, its done
    state and its repr without blocking; a second completion is refused."""
    f: Future[int] = Future()
    assert not f.done() and not f.cancelled() and not f.running()
    f.set_result(3)
    assert f.done() and f.result() == 3 and f.exception() is None
    assert "finished" in repr(f)
    with pytest.raises(cf.InvalidStateError):
        f.set_result(4)
    with pytest.raises(cf.InvalidStateError):
        f.set_exception(ValueError())


def test_exception_before_anyone_looks():
    """An exception set early is raised by result() and returned by exception()."""
    f: Future[int] = Future()
    err = KeyError("k")
    f.set_exception(err)
    with pytest.raises(KeyError):
        f.result()
    assert f.exception() is err


def test_a_blocked_thread_is_woken():
    """A thread blocked in result() (the base class set up for it) is woken by
    a completion from another thread."""
    f: Future[int] = Future()
    threading.Timer(0.05, f.set_result, (7,)).start()
    assert f.result(timeout=10) == 7


def test_wait_and_as_completed_look_inside():
    """concurrent.futures.wait and as_completed work on it, before and after
    it completes."""
    early: Future[int] = Future()
    early.set_result(1)
    late: Future[int] = Future()
    threading.Timer(0.05, late.set_result, (2,)).start()
    done, not_done = cf.wait([early, late], timeout=10)
    assert done == {early, late} and not not_done
    assert sorted(f.result() for f in cf.as_completed([early, late], timeout=10)) == [1, 2]


def test_callbacks_and_cancel():
    """Done callbacks run once, at completion or at once when added after;
    cancel() works on a pending future and not on a done one."""
    seen = []
    f: Future[int] = Future()
    f.add_done_callback(lambda fut: seen.append(fut.result()))
    f.set_result(5)
    f.add_done_callback(lambda fut: seen.append(-fut.result()))
    assert seen == [5, -5]
    g: Future[int] = Future()
    assert g.cancel() and g.cancelled() and g.done()
    with pytest.raises(cf.CancelledError):
        g.result()
    assert not f.cancel()


def test_await():
    """It can be awaited, completed early or later."""

    async def main() -> list[int]:
        early: Future[int] = Future()
        early.set_result(1)
        late: Future[int] = Future()
        asyncio.get_running_loop().call_later(0.05, late.set_result, 2)
        return [await early, await late]

    assert asyncio.run(main()) == [1, 2]
