/* lockhandle.h - LockBase, the C base type of clusterhub.Lock handles.
 *
 * Unlike frame.c and locktable.c this unit is written against the CPython C
 * API (the stable ABI at the 3.10 level) and is compiled only into the cffi
 * module clusterhub._core, never into the pure-C drivers or fuzzers.
 *
 * Why: a `with lk:` or `lk.acquire()` / `lk.release()` that runs a Python
 * method calling one cffi function costs more in the two Python-level calls
 * than in the lock itself.  LockBase gives the handle C methods for the fast
 * paths (acquire, release, __enter__, __exit__), so the uncontended case is
 * one C call each way, as with multiprocessing.Lock.  Everything else stays
 * in the Python subclass (locks.Lock), which LockBase calls back.
 *
 * ---- "recovered", per thread -------------------------------------------------
 *
 * A handle answers, for the calling thread, whether that thread's latest
 * acquire through it recovered the lock from a dead holder.  Threads are told
 * apart by a *thread token*: an object made for a thread the first time it
 * needs one and kept in its thread-state dict (PyThreadState_GetDict), so it
 * lives exactly as long as the thread's Python state.  A token is never
 * shared and, while anything refers to it, never reused: unlike a thread
 * ident (threading.get_ident), which the next thread may get again.  In a
 * fork child the forking thread's token is dropped (an os.register_at_fork
 * hook installed by ch_lockbase_register), so the child's thread starts with
 * none: it has acquired nothing through any handle.
 *
 * The handle keeps the set _rec of weak references to the tokens of the
 * threads whose latest acquire recovered.  An entry leaves when its thread
 * acquires again without recovering, fails an acquire, or ends (the
 * reference's callback removes it), so the set is empty except right after
 * a recovery, and the fast paths pay one size check for it.
 *
 *   _ref        (uint64, read/write) the handle's ch_lt_ref; 0 until set
 *               (no table has id 0, so 0 answers -EBADF).
 *   _rec        (read-only) the set above.  Only this file changes it.
 *   _thread_recovered
 *               (bool, read/write) read: whether the calling thread's token
 *               is in _rec (false for a thread without a token; never makes
 *               one).  Write true: add it (making the token if needed); write
 *               false: remove it.  The Python slow paths write it after each
 *               acquire they finish, true or false, and false after a failed
 *               one.  May raise MemoryError.
 *
 * ---- the fast paths ----------------------------------------------------------
 *
 *   __enter__() ch_lt_trylock_ref(_ref); on 0, remove the calling thread from
 *               _rec (only when _rec is not empty) and return self; else
 *               return self._enter_slow(r).
 *   acquire(blocking_or_timeout=<omitted>, timeout=<omitted>, *, blocking=...)
 *               threading.Lock.acquire's forms beside the handle's own:
 *               - a first positional argument that is a bool is `blocking`;
 *                 any other, alone, is the timeout (as before the threading
 *                 forms); with a second positional argument (the timeout)
 *                 the first must be a bool, else TypeError;
 *               - keyword `blocking` takes any truth value (as threading);
 *                 keyword `timeout` is the timeout; an argument given twice
 *                 (e.g. acquire(2.0, timeout=1), acquire(True, blocking=True),
 *                 acquire(2.0, blocking=True)) is a TypeError;
 *               - blocking false: no timeout may be given but -1 (threading's
 *                 default), else ValueError; waits not at all (timeout 0);
 *               - otherwise the timeout: omitted -> the handle's default
 *                 (self._timeout); None or -1 (an exact int or float) -> no
 *                 limit; an exact int or float >= 0 -> that many seconds
 *                 (over CH_LOCK_FOREVER_S: no limit); anything else goes
 *                 through self._check_timeout(timeout), which returns the
 *                 timeout to use or raises TypeError/ValueError.
 *               Every argument error is raised before the trylock.  On 0: as
 *               __enter__, returns True; else returns
 *               self._acquire_slow(r, timeout) with the timeout above.
 *               acquire(), acquire(t) and acquire(True) parse nothing beyond
 *               a pointer or exact-type check.
 *   release(), __exit__(t, v, tb)
 *               ch_lt_unlock_ref(_ref); on 0 return None; else call
 *               self._release_slow(r) (which raises, or returns after
 *               releasing) and return None.  __exit__ never swallows the
 *               exception of the with block.
 *
 * ---- reading the table ---------------------------------------------------------
 *
 *   _held_here(ref, /) -> int
 *               (a static method) 1 when the lock of ref's slot, still
 *               standing for ref's key, is held by the calling thread, 0
 *               when it is not (free, held by another thread or process, or
 *               its holder died), -EBADF the table is closed, -ESTALE/-EINVAL
 *               the ref does not name the key's slot now: what
 *               ch_lt_held_by_caller_ref answers.  It reads the futex word
 *               only: it never takes the lock, so it never takes a dead
 *               holder's recovery.  The handle's _is_owned (for
 *               threading.Condition) is built on it.
 *
 * The methods keep the GIL (they never block: a wait happens in the
 * subclass's _acquire_slow) and so never race a close() of the table, which
 * also runs under the GIL.  An exception raised by the C code itself after
 * its trylock took the lock (no memory for _rec's update) releases it first.
 */
#ifndef CH_LOCKHANDLE_H
#define CH_LOCKHANDLE_H

/* Timeouts above this many seconds mean "no limit" (locks.py reads it). */
#define CH_LOCK_FOREVER_S 1000000000

/* Create the type (once) and set it as attribute "LockBase" of the module
 * named `module` (which must be in sys.modules: clusterhub._core, called
 * from clusterhub._bindings at import).  The first call also registers the
 * fork-child hook that drops the forking thread's token (see above).  Takes
 * the GIL itself.  0, or -1 after printing the Python exception as
 * unraisable. */
int ch_lockbase_register(const char *module);

#endif
