"""Chaos: workers SIGKILLed at random moments (and inside the lock table's own
bookkeeping, through the C core's test-only crash points) while they update a
shared-memory counter under global locks and exchange requests, messages and
broadcasts with the master; and the mirror case, the master SIGKILLed under
busy workers.

Every invariant is checked all along and counted:

- mutual exclusion: each key guards an "inside" word in shared memory, set on
  entry and cleared on exit; an acquirer finding it set must have been told
  ``recovered`` (it then repairs it), anything else is a violation;
- the counter guarded by the "hot" key equals the sum of the per-writer
  increments (a lost update would show);
- every request ends (a result or WorkerDied) within a bound, none hangs;
- messages between live peers are neither lost nor reordered (sequence
  numbers per sender; a gap is only possible at the sender's death, which
  ends its stream);
- the master never crashes; afterwards ``held_locks()`` is empty, the table's
  invariants hold, its full capacity is back (no slot leaked to a dead
  process), and the master's fds and threads are back to their baseline.

The figures are printed (``pytest -s``) and recorded with ``record_property``.
The CI run storms for about 45 s; ``CLUSTERHUB_LONG=1`` adds a 10-minute one.
"""

from __future__ import annotations

import concurrent.futures
import faulthandler
import mmap
import os
import queue
import random
import signal
import sys
import threading
import time
from typing import Any, Callable

import pytest

import clusterhub
from clusterhub import LockTableFull, LockTimeout, WorkerDied, _bindings
from clusterhub._bindings import lib

from conftest import (
    Reports,
    children_of,
    kill_and_reap,
    pid_gone,
    run_forked,
    subreaper,
    waitpid_bounded,
)

LONG = os.environ.get("CLUSTERHUB_LONG") == "1"
NCRASH = lib.ch_lt_crashpoint_count()
SELF_KILL = NCRASH + 1  # "crash point" of a worker that kills itself inside a section

NWORKERS = 8
LOCK_SLOTS = 32  # 64 slots: at most 8 x 3 + 2 threads use a key at once
POOL = 96  # more pool keys than slots: keys are evicted and re-inserted all along
KEYS = ["hot"] + [f"pool-{i}" for i in range(POOL)]
HOT = 0
REQ_BOUND = 20.0  # a request (or a lock wait) longer than this counts as a hang

# ---- shared memory layout (int64 words) ---------------------------------------

G_COUNTER, G_STOP = 0, 1
INSIDE0 = 8  # one "inside" word per key
ROW0 = INSIDE0 + len(KEYS)
# Per-writer statistics: a row per (slot, thread) so that every word has a
# single writer (slot NWORKERS is the master).  Thread 0 = worker main, 1 = its
# pool thread, 2 = its dispatcher (handlers).
(
    S_DONE,  # increments of the hot counter
    S_SECTIONS,  # lock sections completed
    S_RECOVERED,  # acquires told `recovered`
    S_REPAIRS,  # inside word found set with `recovered`: repaired
    S_MUTEX_VIOL,  # inside word found set without `recovered`, or changed under us
    S_ORDER_VIOL,  # message lost or reordered
    S_REQ_OK,  # requests answered correctly
    S_REQ_BAD,  # wrong answer, hang, or unexpected error
    S_TABLE_FULL,  # LockTableFull (the table is sized so it never is)
    S_MSGS,  # messages sent (worker -> master) and received (broadcasts)
    S_CHECKS,  # invariant checks made
    S_ARMED,  # crash point armed by the current incarnation (thread 0 only)
    S_FRESH,  # fresh keys used
) = range(13)
NSTAT = 16
ROWS_PER_SLOT = 3
NROWS = (NWORKERS + 1) * ROWS_PER_SLOT
WORDS = ROW0 + NROWS * NSTAT


def row_of(slot: int, thread: int) -> int:
    return ROW0 + (slot * ROWS_PER_SLOT + thread) * NSTAT


class Shared:
    """An anonymous MAP_SHARED mapping made before any fork: int64 words."""

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, WORDS * 8)
        self.a = memoryview(self.mm).cast("q")

    def total(self, stat: int) -> int:
        return sum(self.a[ROW0 + r * NSTAT + stat] for r in range(NROWS))

    def close(self) -> None:
        self.a.release()
        self.mm.close()


def dump_state(hub: clusterhub.Hub, what: str) -> None:
    """On a hang: say what hung and where every thread of this process is."""
    ch = hub._master if hub.is_worker else None
    state = "" if ch is None else (
        f" (master channel: closed={ch.closed} leader={ch.leader} "
        f"reader held={ch.reader.locked()} queued={ch.pending()})"
    )
    print(f"[chaos] pid {os.getpid()}: {what}{state}", file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def settle(what: Callable[[], int], target: int, timeout: float) -> int:
    """Poll ``what()`` (no wake-up exists for "an fd was closed") until it
    equals ``target`` or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        v = what()
        if v == target or time.monotonic() >= deadline:
            return v
        time.sleep(0.01)


def table_capacity(hub: clusterhub.Hub, tag: str) -> int:
    """Hold as many fresh keys at once as the table takes (one thread); the
    count (LockTableFull ends it), everything released again."""
    held = []
    try:
        for i in range(2 * LOCK_SLOTS + 1):
            lk = hub.lock(f"capacity-{tag}-{i}")
            try:
                assert lk.acquire(timeout=5)
            except LockTableFull:
                break
            held.append(lk)
        return len(held)
    finally:
        for lk in held:
            lk.release()


# ---- the storm -------------------------------------------------------------------


def run_storm(hub: clusterhub.Hub, seconds: float, record: Callable[[str, Any], None]) -> None:
    sh = Shared()
    a = sh.a
    ctx = {"slot": -1}  # set in the master just before each fork: the child's slot

    # -- a lock section, the same in the master and the workers --------------

    def section(key: int, row: int, rnd: random.Random, die: bool = False) -> None:
        lk = hub.lock(KEYS[key], timeout=REQ_BOUND)
        try:
            lk.__enter__()
        except LockTimeout:
            a[row + S_REQ_BAD] += 1
            dump_state(hub, f"lock {KEYS[key]} hung")
            return
        except LockTableFull:
            a[row + S_TABLE_FULL] += 1
            return
        try:
            token = os.getpid() * 4 + (row - ROW0) // NSTAT % ROWS_PER_SLOT + 1
            inside = INSIDE0 + key
            recovered = lk.recovered
            if recovered:
                a[row + S_RECOVERED] += 1
            if a[inside] != 0:
                if recovered:
                    a[row + S_REPAIRS] += 1
                    if key == HOT:  # the dead holder may have counted or not
                        a[G_COUNTER] = sh.total(S_DONE)
                else:
                    a[row + S_MUTEX_VIOL] += 1
                    print(f"[chaos] {KEYS[key]}: inside set by {a[inside]} (not recovered)",
                          file=sys.stderr)
            a[inside] = token
            if die:  # killed inside: the next holder must repair (see SELF_KILL)
                os.kill(os.getpid(), signal.SIGKILL)
            if key == HOT:
                a[G_COUNTER] += 1
                a[row + S_DONE] += 1
            else:
                for _ in range(rnd.randrange(200)):
                    pass
            if a[inside] != token:
                a[row + S_MUTEX_VIOL] += 1
                print(f"[chaos] {KEYS[key]}: inside changed under the holder", file=sys.stderr)
            a[inside] = 0
            a[row + S_CHECKS] += 2
            a[row + S_SECTIONS] += 1
        finally:
            lk.__exit__(None, None, None)

    # -- handlers, registered before fork (inherited) ---------------------------

    seen: dict[Any, int] = {}  # per process: last sequence number per stream

    def check_seq(stream: Any, n: int, row: int, strict_start: bool) -> None:
        last = seen.get(stream)
        ok = (n == last + 1) if last is not None else (n == 1 or not strict_start)
        seen[stream] = n
        a[row + S_CHECKS] += 1
        if not ok:
            a[row + S_ORDER_VIOL] += 1
            print(f"[chaos] pid {os.getpid()}: stream {stream}: got {n} after {last}",
                  file=sys.stderr)

    def disp_row() -> int:
        slot = ctx["slot"] if hub.is_worker else NWORKERS
        return row_of(slot, 2)

    @hub.on("add")
    def add(data: Any, sender: Any) -> Any:
        return data[0] + data[1]

    @hub.on("work")
    def work(data: Any, sender: Any) -> Any:
        if data % 4 == 0:  # some answers are given under the hot lock
            section(HOT, disp_row(), random.Random(data))
        return 2 * data

    @hub.on("seq")  # worker -> master, numbered per worker
    def on_seq(data: Any, sender: Any) -> None:
        wid, n = data
        row = disp_row()
        if sender is None or sender.id != wid:
            a[row + S_ORDER_VIOL] += 1
        check_seq(("seq", wid), n, row, True)

    @hub.on("mseq")  # master -> this worker, numbered per worker
    def on_mseq(data: Any, sender: Any) -> None:
        row = disp_row()
        a[row + S_MSGS] += 1
        check_seq("mseq", data, row, True)

    @hub.on("mb")  # master broadcast: a new worker joins the stream anywhere
    def on_mb(data: Any, sender: Any) -> None:
        row = disp_row()
        a[row + S_MSGS] += 1
        check_seq("mb", data, row, False)

    @hub.on("wb")  # worker broadcast relayed by the master, numbered per origin
    def on_wb(data: Any, sender: Any) -> None:
        wid, n = data
        row = disp_row()
        a[row + S_MSGS] += 1
        if sender is None or sender.id != wid:
            a[row + S_ORDER_VIOL] += 1
        check_seq(("wb", wid), n, row, False)

    # -- the worker --------------------------------------------------------------

    def worker(slot: int) -> None:
        rnd = random.Random()
        row0, row1 = row_of(slot, 0), row_of(slot, 1)
        a[row0 + S_ARMED] = 0
        # Some incarnations arm a crash point just before a fresh-key lock.
        arm_at = rnd.randrange(1, 200) if rnd.random() < 0.4 else -1
        point = rnd.randint(1, NCRASH)
        # Some die inside a hot section, so that every storm has repairs to
        # make: random kills land there too, but too rarely to count on.
        die_at = rnd.randrange(1, 200) if rnd.random() < 0.1 else -1

        def pool_loop() -> None:
            prnd = random.Random()
            while not a[G_STOP]:
                section(1 + prnd.randrange(POOL), row1, prnd)

        t = threading.Thread(target=pool_loop, daemon=True)
        t.start()
        wid = hub.worker_id
        seq = bseq = ops = 0
        while not a[G_STOP]:
            ops += 1
            r = rnd.random()
            if r < 0.30:
                if ops >= die_at > 0:
                    a[row0 + S_ARMED] = SELF_KILL
                section(HOT, row0, rnd, die=ops >= die_at > 0)
            elif r < 0.45:
                if ops >= arm_at > 0:
                    a[row0 + S_ARMED] = point
                    lib.ch_lt_set_crashpoint(point)
                    arm_at = -1
                lk = hub.lock(f"fresh-{os.getpid()}-{ops}", timeout=REQ_BOUND)
                try:
                    with lk:
                        a[row0 + S_FRESH] += 1
                except LockTableFull:
                    a[row0 + S_TABLE_FULL] += 1
                except LockTimeout:
                    a[row0 + S_REQ_BAD] += 1
            elif r < 0.70:
                x, y = rnd.randrange(1000), rnd.randrange(1000)
                try:
                    got = hub.request_master("add", (x, y)).result(timeout=REQ_BOUND)
                    ok = got == x + y
                except concurrent.futures.TimeoutError:
                    ok = False
                    dump_state(hub, f"worker {wid}: request_master hung")
                a[row0 + (S_REQ_OK if ok else S_REQ_BAD)] += 1
                a[row0 + S_CHECKS] += 1
            elif r < 0.95:
                seq += 1
                hub.send_to_master("seq", (wid, seq))
                a[row0 + S_MSGS] += 1
            else:
                bseq += 1
                hub.send_to_workers("wb", (wid, bseq))
                a[row0 + S_MSGS] += 1
        t.join(REQ_BOUND + 5)

    # -- the master's threads ---------------------------------------------------------

    stop = threading.Event()
    killed: set[int] = set()
    counts = {"req_sent": 0, "req_ok": 0, "req_died": 0, "req_bad": 0, "sent": 0}
    errors: list[str] = []

    def killer() -> None:
        rnd = random.Random()
        while not stop.wait(rnd.uniform(0.02, 0.35)):  # a random moment, not a sync
            ws = list(hub.workers.values())
            if ws:
                w = rnd.choice(ws)
                killed.add(w.pid)
                w.kill()

    def check_answer(x: int, fut: Any) -> None:
        try:
            got = fut.result(timeout=REQ_BOUND)
        except WorkerDied:
            counts["req_died"] += 1
            return
        except concurrent.futures.TimeoutError:
            counts["req_bad"] += 1
            errors.append(f"request to a worker hung for {REQ_BOUND} s")
            dump_state(hub, "request to a worker hung")
            return
        except Exception as e:  # noqa: BLE001 - any other ending is a failure
            counts["req_bad"] += 1
            errors.append(f"request ended with {e!r}")
            return
        if got == 2 * x:
            counts["req_ok"] += 1
        else:
            counts["req_bad"] += 1
            errors.append(f"wrong answer {got!r} for {x}")

    def requester() -> None:
        rnd = random.Random()
        mseq: dict[int, int] = {}
        mb = 0
        try:
            while not stop.is_set():
                ws = list(hub.workers.values())
                if not ws:
                    time.sleep(0.001)  # every worker is being replaced: nothing to ask
                    continue
                r = rnd.random()
                if r < 0.4:
                    futs = []
                    for _ in range(4):
                        w, x = rnd.choice(ws), rnd.randrange(1 << 20)
                        counts["req_sent"] += 1
                        try:
                            futs.append((x, hub.request_worker(w, "work", x)))
                        except WorkerDied:
                            counts["req_died"] += 1
                    for x, f in futs:
                        check_answer(x, f)
                elif r < 0.5:
                    x = rnd.randrange(1 << 20)
                    try:
                        res = hub.request_workers("work", x).result(timeout=REQ_BOUND)
                    except concurrent.futures.TimeoutError:
                        counts["req_bad"] += 1
                        errors.append("request_workers hung")
                        continue
                    for v in res.values():
                        counts["req_sent"] += 1
                        f: concurrent.futures.Future = concurrent.futures.Future()
                        (f.set_exception if isinstance(v, BaseException) else f.set_result)(v)
                        check_answer(x, f)
                elif r < 0.55:
                    x = rnd.randrange(1000)
                    counts["req_sent"] += 1
                    got = hub.request_master("add", (x, 1)).result(timeout=REQ_BOUND)
                    counts["req_ok" if got == x + 1 else "req_bad"] += 1
                elif r < 0.9:
                    w = rnd.choice(ws)
                    n = mseq.get(w.id, 0) + 1
                    try:
                        hub.send_to_worker(w, "mseq", n)
                        mseq[w.id] = n
                        counts["sent"] += 1
                    except WorkerDied:
                        pass
                else:
                    mb += 1
                    hub.send_to_workers("mb", mb)
                    counts["sent"] += 1
        except BaseException as e:  # the master must not fail: say how it did
            errors.append(f"master requester crashed: {e!r}")
            raise

    def master_locker() -> None:
        rnd = random.Random()
        row = row_of(NWORKERS, 0)
        try:
            while not stop.is_set():
                section(HOT if rnd.random() < 0.5 else 1 + rnd.randrange(POOL), row, rnd)
        except BaseException as e:
            errors.append(f"master locker crashed: {e!r}")
            raise

    # -- baseline, storm, stop -------------------------------------------------------

    exits: "queue.Queue[clusterhub.Worker]" = queue.Queue()
    hub.on_exit(exits.put)
    nslots = hub._locks.table.nslots
    cap_before = table_capacity(hub, "before")
    # The lazily made parts (the hub's timer thread, the process's C writer
    # thread and its eventfd) come into being before the baseline.
    assert hub.request_master("add", (1, 2), timeout=REQ_BOUND).result(timeout=REQ_BOUND) == 3
    _bindings.start_writer()  # (else the first fork starts it)
    fds0, threads0 = fd_count(), thread_count()

    slot_of: dict[int, int] = {}
    forks = 0

    def spawn(slot: int) -> None:
        nonlocal forks
        ctx["slot"] = slot
        w = hub.fork(worker, slot)
        ctx["slot"] = -1
        slot_of[w.id] = slot
        forks += 1

    exit_codes: dict[str, int] = {}
    crash_deaths: dict[int, int] = {}
    bad_exits: list[str] = []

    def account(w: clusterhub.Worker, storming: bool) -> None:
        slot = slot_of[w.id]
        code = w.exitcode
        armed = a[row_of(slot, 0) + S_ARMED]
        if code == -signal.SIGKILL and w.pid in killed:
            kind = "killed"
        elif code == -signal.SIGKILL and armed:
            kind = "crashpoint"
            crash_deaths[armed] = crash_deaths.get(armed, 0) + 1
        elif code == 0 and not storming:
            kind = "stopped"
        else:
            kind = "unexpected"
            bad_exits.append(f"worker {w.id} (slot {slot}) exited with {code}")
        exit_codes[kind] = exit_codes.get(kind, 0) + 1

    t0 = time.monotonic()
    for slot in range(NWORKERS):
        spawn(slot)
    threads = [threading.Thread(target=fn, name=f"chaos-{fn.__name__}")
               for fn in (killer, requester, master_locker)]
    for t in threads:
        t.start()
    end = t0 + seconds
    try:
        while True:  # the supervisor: replace every worker that dies
            left = end - time.monotonic()
            if left <= 0:
                break
            try:
                w = exits.get(timeout=left)
            except queue.Empty:
                break
            account(w, True)
            spawn(slot_of[w.id])
    finally:
        stop.set()
        a[G_STOP] = 1
        for t in threads:
            t.join(REQ_BOUND + 10)
        stuck = [t.name for t in threads if t.is_alive()]
        all_exited = hub.join(timeout=REQ_BOUND + 10)
    storm = time.monotonic() - t0
    left_over = list(hub.workers.values())
    if not all_exited:  # reap them here, or every later test sees zombie children
        kill_and_reap([w.pid for w in left_over])
    assert not stuck, f"master threads did not stop: {stuck}"
    assert all_exited, f"workers did not stop (or their exit was never seen): {left_over}"
    accounted = sum(exit_codes.values())
    while accounted < forks:  # on_exit runs after join() saw the exit: bounded wait
        account(exits.get(timeout=10), False)
        accounted += 1

    # -- after the storm ---------------------------------------------------------------

    held = hub.held_locks()
    table_ok = lib.ch_lt_check(hub._locks.table.ptr)
    cap_after = table_capacity(hub, "after")
    fds1 = settle(fd_count, fds0, 10)
    threads1 = settle(thread_count, threads0, 10)
    counter, done = a[G_COUNTER], sh.total(S_DONE)

    stats = {
        "storm_seconds": round(storm, 1),
        "workers_forked": forks,
        "kills_survived": exit_codes.get("killed", 0) + exit_codes.get("crashpoint", 0),
        "killed_by_killer": exit_codes.get("killed", 0),
        "killed_at_crashpoint": exit_codes.get("crashpoint", 0),
        "crashpoints_hit": dict(sorted(crash_deaths.items())),
        "exits": exit_codes,
        "lock_sections": sh.total(S_SECTIONS),
        "hot_increments": done,
        "fresh_keys": sh.total(S_FRESH),
        "recovered_acquires": sh.total(S_RECOVERED),
        "repairs": sh.total(S_REPAIRS),
        "worker_requests_ok": sh.total(S_REQ_OK),
        "master_requests": counts["req_sent"],
        "master_requests_ok": counts["req_ok"],
        "master_requests_worker_died": counts["req_died"],
        "messages": sh.total(S_MSGS) + counts["sent"],
        "invariant_checks": sh.total(S_CHECKS),
        "mutex_violations": sh.total(S_MUTEX_VIOL),
        "order_violations": sh.total(S_ORDER_VIOL),
        "bad_requests": sh.total(S_REQ_BAD) + counts["req_bad"],
        "table_full": sh.total(S_TABLE_FULL),
        "table_slots": nslots,
        "capacity_before": cap_before,
        "capacity_after": cap_after,
        "fds_before": fds0,
        "fds_after": fds1,
        "threads_before": threads0,
        "threads_after": threads1,
    }
    print("\n[chaos] " + "\n[chaos] ".join(f"{k}: {v}" for k, v in stats.items()))
    for k, v in stats.items():
        record(k, v)
    sh.close()

    assert not errors, errors[:10]
    assert not bad_exits, bad_exits[:10]
    assert stats["mutex_violations"] == 0
    assert stats["order_violations"] == 0
    assert stats["bad_requests"] == 0
    assert stats["table_full"] == 0
    assert counter == done, f"hot counter {counter} != {done} increments: an update was lost"
    assert counts["req_sent"] == counts["req_ok"] + counts["req_died"], counts
    assert held == [], held
    assert table_ok == 0, "lock table invariants broken"
    assert cap_before == nslots and cap_after == nslots, (cap_before, cap_after, nslots)
    assert fds1 == fds0, f"fds {fds0} -> {fds1}"
    assert threads1 == threads0, f"threads {threads0} -> {threads1}"
    assert stats["killed_by_killer"] >= seconds, "the killer barely killed anyone"
    assert stats["recovered_acquires"] > 0 and stats["repairs"] > 0
    assert stats["master_requests_worker_died"] > 0  # kills did land on pending requests
    assert stats["lock_sections"] > 1000 and stats["worker_requests_ok"] > 100


@pytest.mark.timeout(150)
def test_chaos_storm(make_hub: Callable[..., clusterhub.Hub], record_property: Any) -> None:
    """Under ~45 s of random SIGKILLs (some inside the lock table's bookkeeping) with workers replaced as they die, mutual exclusion, requests, message order, the master and its resources all stay intact."""
    run_storm(make_hub(lock_slots=LOCK_SLOTS), 45.0, record_property)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="long chaos run: set CLUSTERHUB_LONG=1")
@pytest.mark.timeout(720)
def test_chaos_storm_long(make_hub: Callable[..., clusterhub.Hub], record_property: Any) -> None:
    """The same storm for ten minutes keeps every invariant and returns every resource."""
    run_storm(make_hub(lock_slots=LOCK_SLOTS), 600.0, record_property)


# ---- what the storm found, pinned down -----------------------------------------------


@pytest.mark.timeout(30)
def test_dead_holders_recovery_survives_slot_reuse(make_hub: Callable[..., clusterhub.Hub]) -> None:
    """A key whose holder was SIGKILLed is reported recovered to its next acquirer even when its slot was handed to another key meanwhile."""
    hub = make_hub(lock_slots=1)  # 2 slots

    def die_holding() -> None:
        hub.lock("v1").acquire()
        hub.lock("v2").acquire()
        os.kill(os.getpid(), signal.SIGKILL)

    w = hub.fork(die_holding)
    assert w.join(10) and w.exitcode == -signal.SIGKILL
    assert hub.held_locks() == []
    # No live process holds anything: a new key must fit (capacity >= lock_slots),
    # taking the slot of a dead holder's key.
    with hub.lock("other", timeout=5) as lk:
        assert not lk.recovered
    got = {}
    for key in ("v1", "v2"):
        with hub.lock(key, timeout=5) as lk:
            got[key] = lk.recovered
    assert got == {"v1": True, "v2": True}, f"recovery lost with the slot: {got}"


@pytest.mark.timeout(60)
def test_request_to_a_worker_dying_meanwhile_ends_with_worker_died(
    make_hub: Callable[..., clusterhub.Hub],
) -> None:
    """A thread reading its own reply when the worker dies gets WorkerDied, never an OSError from the channel's closed descriptors."""
    hub = make_hub()
    hub.on("die", lambda data, sender: os.kill(os.getpid(), signal.SIGKILL))
    outcomes: dict[str, int] = {}
    for _ in range(100):
        w = hub.fork(threading.Event().wait)
        f = hub.request_worker(w, "die")
        try:
            f.result(timeout=10)
            kind = "result"
        except WorkerDied:
            kind = "WorkerDied"
        except Exception as e:  # noqa: BLE001 - the failure this test is about
            kind = repr(e)
        outcomes[kind] = outcomes.get(kind, 0) + 1
        if not w.join(10):  # its exit was never seen: reap it, or later tests see a zombie
            kill_and_reap([w.pid])
            outcomes["exit never seen"] = outcomes.get("exit never seen", 0) + 1
    assert outcomes == {"WorkerDied": 100}, outcomes


@pytest.mark.timeout(60)
def test_worker_exit_seen_when_its_channel_closed_first(make_hub: Callable[..., clusterhub.Hub]) -> None:
    """A worker that dies before the dispatcher started watching it, its channel's EOF already read by a requester, is still reaped and reported to on_exit."""
    hub = make_hub()
    busy, release = threading.Event(), threading.Event()
    hub.on("block", lambda data, sender: (busy.set(), release.wait(10)))
    hub.on("die", lambda data, sender: os.kill(os.getpid(), signal.SIGKILL))
    seen = threading.Event()
    codes: list[Any] = []
    hub.on_exit(lambda w: (codes.append(w.exitcode), seen.set()))
    hub.send_to_master("block")
    assert busy.wait(10)  # the dispatcher runs a handler: fork's "watch it" waits its turn
    try:
        w = hub.fork(threading.Event().wait)
        with pytest.raises(WorkerDied):  # this thread reads the channel, and its EOF
            hub.request_worker(w, "die").result(timeout=10)
    finally:
        release.set()
    exited = w.join(10)
    if not exited:  # reap it here, or every later test sees a zombie child
        kill_and_reap([w.pid])
    assert exited, "the master never noticed the worker's exit (left a zombie)"
    assert seen.wait(10) and codes == [-signal.SIGKILL]


# ---- the mirror case: the master dies ------------------------------------------------


def _busy_master(reports: Reports) -> None:
    """An intermediate master with NWORKERS busy workers; the test kills it."""
    h = clusterhub.Hub(lock_slots=LOCK_SLOTS)
    h.on("add", lambda data, sender: data[0] + data[1])
    h.on("work", lambda data, sender: 2 * data)

    def worker(n: int) -> None:
        rnd = random.Random()
        for i in range(1, 1 << 62):
            with h.lock("hot" if rnd.random() < 0.5 else f"pool-{rnd.randrange(POOL)}"):
                pass
            try:
                h.request_master("add", (i, n)).result(timeout=REQ_BOUND)
            except clusterhub.MasterDied:
                pass  # the master is gone: the hub is about to end this process
            h.send_to_master("seq", i)
            if i == 50:
                reports.put("busy", os.getpid())

    for n in range(NWORKERS):
        h.fork(worker, n)
    rnd = random.Random()
    while True:
        ws = list(h.workers.values())
        if ws:
            try:
                h.request_worker(rnd.choice(ws), "work", 1).result(timeout=REQ_BOUND)
            except WorkerDied:
                pass
        with h.lock("hot"):
            pass


@pytest.mark.timeout(60)
def test_master_sigkilled_under_load_ends_every_worker(record_property: Any) -> None:
    """When a busy master is SIGKILLed, every one of its busy workers notices and exits with code 1 within a few seconds, none left running."""
    reports = Reports()
    me = os.getpid()
    try:
        with subreaper():
            master = run_forked(lambda: _busy_master(reports))
            pids: list[int] = []
            try:
                pids = [r[1] for r in reports.get_n(NWORKERS, timeout=30)]
                # every worker is in full swing; kill at a random moment of it
                threading.Event().wait(random.uniform(0.0, 0.5))
            finally:
                t0 = time.monotonic()
                os.kill(master, signal.SIGKILL)
                assert waitpid_bounded(master, 10) == -signal.SIGKILL
            try:
                gone_at = {}
                for pid in pids:  # each worker's exit, timed from the kill
                    codes_pid = waitpid_bounded(pid, max(0.0, t0 + 5 - time.monotonic()))
                    gone_at[pid] = (codes_pid, time.monotonic() - t0)
                codes = {pid: c for pid, (c, _) in gone_at.items()}
                took = max(t for _, t in gone_at.values())
            finally:
                kill_and_reap(pids)
        alive = [pid for pid in pids if not pid_gone(pid)]
        print(f"\n[chaos] master killed: {len(pids)} workers all gone {took:.2f} s after the kill, "
              f"exit codes {sorted(set(codes.values()), key=str)}")
        record_property("workers", len(pids))
        record_property("all_gone_seconds", round(took, 2))
        assert not alive
        assert set(codes.values()) == {1}, codes
        assert took < 4.0, f"workers took {took:.2f} s to notice the master's death"
        assert children_of(me) == []
    finally:
        reports.close()
