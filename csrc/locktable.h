/* locktable.h - a shared-memory table of named, crash-robust locks.
 *
 * The table lives in one memfd mapped MAP_SHARED by every process of a hub.
 * Each slot holds a robust, process-shared, error-checking pthread mutex and
 * the key it currently stands for.  Keys are mapped to slots on demand and a
 * slot whose lock nobody holds may be handed to another key, so any number of
 * distinct keys can be used over the table's life with a fixed number of
 * slots.
 *
 * Protocol for callers (validate-after-acquire):
 *   ch_lt_resolve(key) -> (slot, gen), or CH_LT_NEW with the lock already held;
 *   ch_lt_trylock / ch_lt_timedlock(slot, gen) -> -ESTALE means the slot was
 *   given to another key since the resolve: nothing is held, resolve again.
 * A cached (slot, gen) therefore pins nothing.
 *
 * Conventions: functions return 0 or a negative errno unless stated.  Lock
 * ownership belongs to the calling *thread* (not the process); a thread or
 * process that dies holding a lock loses it at once and the next acquirer is
 * told CH_LT_RECOVERED.  Every function except ch_lt_close may be called from
 * any thread, concurrently, on the same handle.  Only ch_lt_timedlock blocks
 * (until its deadline); ch_lt_resolve, ch_lt_find and ch_lt_slot_info wait
 * briefly for the table mutex, which is only ever held for short bookkeeping.
 */
#ifndef CLUSTERHUB_LOCKTABLE_H
#define CLUSTERHUB_LOCKTABLE_H

#include <stddef.h>
#include <stdint.h>

#define CH_LT_KEY_MAX 255          /* key length is 1..255 bytes */
#define CH_LT_THREAD_MAX_HELD 1024 /* per thread, over all tables: the kernel
                                      walks at most 2048 robust mutexes of a
                                      dying thread */
#define CH_LT_SLOTS_MAX (1u << 20) /* ch_lt_create: -EINVAL beyond */
#define CH_LT_RECOVERED 1          /* acquired; previous holder died holding it */
#define CH_LT_NEW 2                /* ch_lt_resolve inserted the key; the calling
                                      thread now holds its lock */
#define CH_LT_NEW_RECOVERED 3      /* as CH_LT_NEW, and the key's last holder died
                                      holding it (its slot had been reused) */

typedef struct ch_table ch_table; /* per-process handle (malloc'ed), opaque */

/* One held lock, for diagnostics (ch_lt_slot_info). */
typedef struct {
    int32_t pid;       /* holder's process id */
    int32_t worker_id; /* as set by ch_lt_set_worker_id; -1 = master */
    uint32_t keylen;
    uint8_t key[255]; /* CH_LT_KEY_MAX; not NUL-terminated */
} ch_lt_info;

/* ---- life cycle ------------------------------------------------------------ */

/* Create a table of `nslots` slots (1..CH_LT_SLOTS_MAX, else -EINVAL) in a new
 * memfd (MFD_CLOEXEC).  On success *out is a handle owned by the caller
 * (release with ch_lt_close).  Errors: -EINVAL, -ENOMEM, or the errno of
 * memfd_create/ftruncate/mmap/pthread_mutex_init.  Nothing leaks on failure.
 * Processes forked afterwards inherit the mapping and the handle. */
int ch_lt_create(uint32_t nslots, ch_table **out);

/* Map an existing table from its memfd `fd` (e.g. passed to a process not
 * forked from the creator).  The header is validated: magic, layout version
 * and sizeof(pthread_mutex_t) -> -EPROTO on mismatch; slot/bucket counts vs
 * the file size -> -EINVAL.  `fd` is dup'ed (close-on-exec): the caller keeps
 * ownership of its own descriptor.  On success *out is a new handle. */
int ch_lt_attach(int fd, ch_table **out);

/* The table's memfd, owned by `t` (closed by ch_lt_close); never fails. */
int ch_lt_fd(const ch_table *t);

/* Number of slots of the table. */
uint32_t ch_lt_nslots(const ch_table *t);

/* Unmap the table and free the handle.  Returns -EBUSY and does nothing while
 * ch_lt_busy(t) > 0: unmapping a mutex that a thread of this process holds or
 * waits on would break the kernel's robust-list walk at that thread's death,
 * and with it the recovery of every lock the thread holds.  The caller must
 * ensure no other thread is inside, or about to enter, a call on `t` (busy
 * only sees calls that have started).  Not for use on a handle after fork in
 * the child before ch_lt_after_fork_child. */
int ch_lt_close(ch_table *t);

/* Call in a fork child (which has one thread) for every table handle it
 * inherited, before using it: locks held and waits in progress belonged to the
 * parent's threads.  Resets the handle's in-flight counter and the calling
 * thread's held counter, refreshes the cached pid.  (A pthread_atfork child
 * handler also resets the thread counters and pid; this call is still
 * required for the per-handle counter.) */
void ch_lt_after_fork_child(ch_table *t);

/* Record `worker_id` (-1 = master) as the holder's worker id in locks this
 * process acquires through `t` from now on (diagnostics only). */
void ch_lt_set_worker_id(ch_table *t, int32_t worker_id);

/* Holds + waits by threads of this process on `t` right now: slots whose lock
 * a live thread of this process holds, plus ch_lt_timedlock/ch_lt_resolve
 * calls in progress.  O(nslots): it scans the slots (a thread that died
 * holding a lock no longer counts). */
int ch_lt_busy(const ch_table *t);

/* ---- locking --------------------------------------------------------------- */

/* Find the slot that maps `key` (keylen 1..CH_LT_KEY_MAX) under the table
 * mutex.  Found: returns 0 with *slot and *gen set and nothing locked.  Absent:
 * claims a slot for it (a free slot, or one whose lock nobody holds, whose
 * old key is then forgotten) and returns CH_LT_NEW with the calling thread
 * holding that slot's lock (counts as an acquire; *slot and *gen set), or
 * CH_LT_NEW_RECOVERED when the key's last holder had died holding it and its
 * slot was taken meanwhile (a full table reuses a dead holder's slot only as
 * a last resort, and keeps the key as a tombstone so its recovery is still
 * reported; the ring holds nslots tombstones, the oldest is dropped first).
 * Errors: -EINVAL bad keylen, -ENOSPC no slot can be claimed (every one is
 * held), -ENOLCK the calling thread already holds CH_LT_THREAD_MAX_HELD locks
 * (only when an insert is needed).  Blocks only for the table mutex. */
int ch_lt_resolve(ch_table *t, const uint8_t *key, size_t keylen, uint32_t *slot, uint64_t *gen);

/* Try to take the lock of `slot` for the key that resolved to (slot, gen).
 * Never blocks, no system call on the uncontended path.
 * 0 acquired; CH_LT_RECOVERED acquired and the previous holder of the key died
 * holding it; -EBUSY held by another thread; -EDEADLK held by this thread;
 * -ESTALE the slot no longer stands for the caller's key (nothing held:
 * resolve again); -ENOLCK thread limit reached; -EINVAL bad slot;
 * -ENOTRECOVERABLE should never happen (a mutex left inconsistent). */
int ch_lt_trylock(ch_table *t, uint32_t slot, uint64_t gen);

/* Like ch_lt_trylock but waits until `deadline_ns` (CLOCK_MONOTONIC, as from
 * ch_monotonic_ns; a past deadline still makes one attempt), then returns
 * -ETIMEDOUT with nothing held — or -ESTALE when meanwhile the slot was given
 * to another key.  Blocks: call it without the GIL. */
int ch_lt_timedlock(ch_table *t, uint32_t slot, uint64_t gen, int64_t deadline_ns);

/* Release the lock of `slot`.  0; -EPERM the calling thread does not hold it;
 * -EINVAL bad slot.  Never blocks. */
int ch_lt_unlock(ch_table *t, uint32_t slot);

/* Look `key` up without claiming anything: 0 with *slot and *gen set, -ENOENT
 * absent, -EINVAL bad keylen.  Takes the table mutex, never a slot's. */
int ch_lt_find(ch_table *t, const uint8_t *key, size_t keylen, uint32_t *slot, uint64_t *gen);

/* Snapshot of whether the lock of (slot, gen) is held: 1 by a live thread,
 * 0 not (a dead holder's lock is not held), -ESTALE slot reassigned, -EINVAL
 * bad slot.  Reads the futex word only: it never takes the lock (a trylock
 * would take the recovery meant for the next acquirer). */
int ch_lt_is_locked(ch_table *t, uint32_t slot, uint64_t gen);

/* Diagnostics: 1 = the lock of `slot` is held by a live thread right now and
 * *out holds its key, holder pid and worker id; 0 = not held; -EINVAL bad
 * slot.  Takes the table mutex (so the key is stable), never a slot's.
 * pid is 0 (worker_id -1) if the holder has taken the lock but not yet
 * recorded itself and does not within ~100 yields (practically never). */
int ch_lt_slot_info(ch_table *t, uint32_t slot, ch_lt_info *out);

/* Check the table's invariants (for tests): every key in at most one slot,
 * every mapped slot reachable from its hash bucket and only from it, no
 * cycles.  0 or -EUCLEAN.  Takes the table mutex. */
int ch_lt_check(ch_table *t);

/* CLOCK_MONOTONIC in nanoseconds. */
int64_t ch_monotonic_ns(void);

/* ---- crash injection (TEST ONLY) --------------------------------------------
 * ch_lt_set_crashpoint(n), n > 0: this process raise(SIGKILL)s itself when it
 * reaches point n (0 = off; process-wide).  The points:
 *   1  insert: victim slot locked, table mutex held, nothing changed yet
 *   2  insert: victim unlinked from its old bucket chain
 *   3  insert: victim's generation bumped
 *   4  insert: victim marked empty (keylen = 0)
 *   5  insert: half of the new key's bytes written
 *   6  insert: new key and hash written, keylen not yet set
 *   7  insert: keylen set, slot not yet linked into its bucket
 *   8  insert: linked; table mutex and slot lock still held
 *   9  resolve: table mutex released, new slot held, before return
 *   10 acquire: slot lock taken, before the holder bookkeeping
 *   11 acquire: EOWNERDEAD on a slot, made consistent, before bookkeeping
 *   12 unlock: bookkeeping done, slot lock not yet released
 *   13 table repair: EOWNERDEAD on the table mutex, bucket heads cleared,
 *      chains half rebuilt
 *   14 stale acquire: EOWNERDEAD with a generation mismatch, made
 *      consistent and flagged, slot lock not yet released
 * A process killed inside an insert (points 1-9) may make the next acquirer
 * of the key being inserted, or of the key being evicted, see
 * CH_LT_RECOVERED although no caller held it: recovery errs on the safe side.
 *
 * Compiled into the shipped module on purpose, and declared to cffi
 * (cdef_locktable.h): the suite run against an installed wheel (CI's, or an
 * unpacked sdist's) kills processes at these points through the module
 * under test (tests/test_core_locks.py, tests/test_chaos.py), so recovery is
 * tested in the binary that ships, not in a test build that differs from it.
 * No Python module of the library calls them (_bindings wraps none), and a
 * disarmed point costs one relaxed load and a predicted branch (the lock
 * hot path passes two: not measurable in a trylock/unlock loop, ~24 ns).
 */
void ch_lt_set_crashpoint(int n);
int ch_lt_crashpoint_count(void); /* the number of points above (14) */

/* ---- the hot path, by reference --------------------------------------------------
 *
 * A ref names (table, slot, low 32 bits of the key's generation) in one
 * uint64: table id (8 bits) | slot (24 bits) | generation (32 bits).  The
 * Python hot path then passes a single argument per call, and a closed table
 * is detected here instead of touching unmapped memory: tables are found
 * through a process-wide registry that ch_lt_close and ch_lt_disable clear.
 * At most CH_LT_MAX_TABLES tables are open in a process at once
 * (ch_lt_create/ch_lt_attach: -EMFILE beyond). */
#define CH_LT_MAX_TABLES 255
#define CH_LT_SLOT_NONE 0xFFFFFF

/* The ref of (slot, gen) in t.  A slot above CH_LT_SLOT_NONE, or equal to it,
 * gives a ref that ch_lt_trylock_ref answers with -EINVAL ("resolve first").
 * Never fails, never blocks. */
uint64_t ch_lt_ref(const ch_table *t, uint32_t slot, uint64_t gen);

/* ch_lt_trylock / ch_lt_unlock through a ref: same results, plus -EBADF when
 * the ref's table is closed or disabled in this process, and for unlock
 * -ESTALE when the slot no longer stands for the ref's key (nothing released:
 * the slot's lock may be this thread's, but for another key).  A closed
 * table's id is reused last, and each table starts its generations at a
 * random point, so refs kept from it do not reach another table's slots.
 * Never block.  Must
 * not race ch_lt_close of the same table from another thread (the Python
 * layer keeps the GIL across both, which serialises them). */
int ch_lt_trylock_ref(uint64_t ref);
int ch_lt_unlock_ref(uint64_t ref);

/* Whether the calling thread holds the ref's lock: 1 or 0, read from the
 * futex word's owner TID (never a trylock, so a dead holder's recovery is
 * left to the next acquirer); -EBADF (table closed or disabled), -EINVAL
 * (slot out of range), -ESTALE (the slot stands for another key now).
 * Never blocks; same serialisation as ch_lt_trylock_ref. */
int ch_lt_held_by_caller_ref(uint64_t ref);

/* For a blocking call made without the caller's own serialisation (the GIL
 * is released around it): ch_lt_enter counts a call in progress on the ref's
 * table, under the registry mutex that ch_lt_close also takes, so the table
 * cannot be unmapped until the matching ch_lt_leave.  Returns the table, or
 * NULL when it is closed or disabled. */
ch_table *ch_lt_enter(uint64_t ref);
void ch_lt_leave(ch_table *t);

/* ch_lt_timedlock on the slot and generation of `ref`, for a table obtained
 * from ch_lt_enter(ref).  Blocks until the deadline, like ch_lt_timedlock. */
int ch_lt_timedlock_ref(ch_table *t, uint64_t ref, int64_t deadline_ns);

/* The first step of closing: if no thread of this process holds or waits on
 * one of t's locks (ch_lt_busy(t) == 0), forget t in the registry, so every
 * later ref call gives -EBADF, and return 0; otherwise change nothing and
 * return -EBUSY.  Atomic with respect to the GIL-holding ref calls and to
 * ch_lt_enter, so no lock can be taken between the check and the retirement.
 * ch_lt_close(t) then unmaps.  Never blocks (but for the registry mutex). */
int ch_lt_retire(ch_table *t);

/* Forget t in the registry without unmapping it: refs to it then give
 * -EBADF.  For a hub made inert in a child forked by foreign code. */
void ch_lt_disable(ch_table *t);

#endif
