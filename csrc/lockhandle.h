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
 * in the Python subclass (locks.Lock), which LockBase calls back:
 *
 *   _ref        (uint64, read/write) the handle's ch_lt_ref; 0 until set
 *               (no table has id 0, so 0 answers -EBADF).
 *   _rec        (read-only) a set, created with the object: the idents
 *               (threading.get_ident()) of the threads whose latest acquire
 *               through this handle recovered the lock from a dead holder.
 *   __enter__() ch_lt_trylock_ref(_ref); on 0, drop this thread from _rec
 *               and return self; else return self._enter_slow(r).
 *   acquire(timeout=<omitted>)
 *               timeout: None, or an exact int/float >= 0 (over
 *               CH_LOCK_FOREVER_S: None); anything else goes through
 *               self._check_timeout(timeout), which raises TypeError or
 *               ValueError, before the trylock.  On 0: as __enter__, returns
 *               True; else returns self._acquire_slow(r, timeout), with
 *               self._timeout when timeout was omitted.
 *   release(), __exit__(t, v, tb)
 *               ch_lt_unlock_ref(_ref); on 0 return None; else call
 *               self._release_slow(r) (which raises, or returns after
 *               releasing) and return None.  __exit__ never swallows the
 *               exception of the with block.
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
 * from clusterhub._bindings at import).  Takes the GIL itself.  0, or -1
 * after printing the Python exception as unraisable. */
int ch_lockbase_register(const char *module);

#endif
