/*
 * wait.h - spin-then-block waits for a frame that is expected soon.
 *
 * Why: on the VMs this runs on, waking a thread that sleeps on another CPU
 * costs tens of microseconds (the CPU halts when idle and must be woken),
 * several times what a request round trip costs in CPU.  A waiter that
 * expects its data within microseconds (a requester its reply, a master
 * that just answered its next request) spins briefly on a non-blocking
 * read first: when the data comes meanwhile, no wake-up is paid.
 *
 * The spin is bounded by a budget kept per waiter (ch_spin): derived from
 * the times the waits took recently, never above a cap (the hub's `spin`
 * setting; 0 turns spinning off), and zero while spinning does not pay:
 *   - when the peer can only run on the CPU this thread would spin on (both
 *     pinned there): spinning would only delay the peer, so it is off;
 *     re-checked every CH_SPIN_RECHECK_NS;
 *   - when a spin ran out and the peer's thread last ran on the CPU we
 *     spun on (the scheduler tends to wake a task on its waker's CPU, where
 *     a spinning waker keeps it from running), spinning is off while this
 *     thread stays on that CPU, for up to CH_SPIN_RECHECK_NS (the peer's
 *     CPU is read from /proc, on such misses only);
 *   - after CH_SPIN_MAX_MISSES spins in a row ran out before the data came,
 *     spinning rests for a number of waits that doubles with each such
 *     streak (up to CH_SPIN_MAX_REST), and is tried again after.
 * An idle waiter spins at most once, right after its previous wait ended:
 * nothing here ever polls.
 *
 * Pure C (no Python), like frame.c; the GIL-releasing wrappers the cffi
 * module calls are in nogil.h.
 */
#ifndef CH_WAIT_H
#define CH_WAIT_H

#include <stdint.h>

#include "frame.h"

/* How often the CPU affinity of this thread and of the peer is looked at
 * again (nanoseconds): 100 ms. */
#define CH_SPIN_RECHECK_NS 100000000
/* Spins in a row that ran out before spinning rests. */
#define CH_SPIN_MAX_MISSES 4
/* The longest rest, in waits. */
#define CH_SPIN_MAX_REST 4096

/* One waiter's spin policy.  Plain data: allocate it (zeroed) anywhere and
 * set it up with ch_spin_init.  Not shared: one thread at a time uses it
 * (the holder of the channel's reader role, or the dispatcher thread). */
typedef struct ch_spin {
    int64_t cap_ns;      /* the configured maximum; 0: never spin */
    int64_t avg_ns;      /* moving average of recent wait times */
    int64_t checked_ns;  /* when the affinities were last looked at */
    int64_t parked_ns;   /* when parked_cpu was set */
    int32_t peer_pid;    /* the process at the other end (0: unknown) */
    int32_t peer_tid;    /* its thread that answers (0: the process's main thread) */
    int32_t same_cpu;    /* the peer can only run where we would spin */
    int32_t parked_cpu;  /* -1, or our CPU when a spin ran out with the peer on it */
    uint32_t misses;     /* spins in a row that ran out */
    uint32_t rest;       /* waits left without spinning */
    uint32_t rest_next;  /* the length of the next rest */
    uint32_t pad;
    uint64_t spins, hits; /* counters, for tests and benchmarks */
} ch_spin;

/* Set up `s` for a waiter whose peer is process `peer_pid` (0 when unknown:
 * no affinity check against it), answered by its thread `peer_tid` (0: the
 * process's main thread), spinning at most `cap_ns` (<= 0: never).  Never
 * fails; any thread. */
void ch_spin_init(ch_spin *s, int64_t cap_ns, int32_t peer_pid, int32_t peer_tid);

/* Change the peer (a dispatcher serving several: the one it answered last;
 * its main thread).  Cheap when unchanged. */
void ch_spin_peer(ch_spin *s, int32_t peer_pid);

/* The spin budget for the next wait, in nanoseconds (0: block at once).
 * May call sched_getaffinity (every CH_SPIN_RECHECK_NS) and sched_getcpu.
 * Updates the rest counter: call it once per wait. */
int64_t ch_spin_budget(ch_spin *s);

/* Record how a wait went: `spun` whether it spun, `hit` whether the data
 * came while spinning, `waited_ns` from the start of the wait until the
 * data was there (or until the wait ended otherwise: then call with hit 0
 * and waited_ns 0 to leave the average alone).  A spin that ran out reads
 * the peer thread's last CPU from /proc (microseconds). */
void ch_spin_record(ch_spin *s, int spun, int hit, int64_t waited_ns);

/*
 * Wait for complete frames on the non-blocking socket `fd` and read them
 * into `rx`, as ch_rx_read does (its results and contract, frame.h), but
 * waiting: first spinning for up to ch_spin_budget(s) with non-blocking
 * reads, then blocking in epoll_wait on `ep_fd`, an epoll instance in which
 * the caller registered `fd` for EPOLLIN (EPOLLEXCLUSIVE and first, so that
 * data arriving wakes this waiter rather than others on the socket) and,
 * optionally, `wake_fd` (an eventfd that ends the wait; -1: none), each
 * with its own number as the event's data.
 *
 * Returns what ch_rx_read returned once it returned non-zero (frames, or an
 * end-of-stream / protocol / recv error), or:
 *   0        `wake_fd` became readable (it is drained here: the caller
 *            re-checks why it waits) or `deadline_ns` (CLOCK_MONOTONIC;
 *            < 0: none; waits end up to a millisecond late) passed;
 *   -EINTR   a signal interrupted the blocking wait (the caller runs its
 *            handlers and decides whether to wait again);
 *   -errno   epoll_wait failed otherwise.
 * Blocks.  The caller owns `rx` for the call (ch_rx is not thread-safe) and
 * `s`; the fds must stay open for the whole call.
 */
int ch_rx_wait(ch_rx *rx, int fd, int ep_fd, int wake_fd, ch_spin *s, int64_t deadline_ns);

/*
 * Spin until `fd` (any pollable fd: an epoll instance, for a dispatcher)
 * is readable, for up to ch_spin_budget(s); do not block.  Returns 1 when
 * it became readable, 0 when the budget ran out (or was 0).  Records the
 * wait in `s` when it spun.  Never blocks beyond the budget; any thread
 * that owns `s`.
 */
int ch_spin_readable(int fd, ch_spin *s);

/* ch_spin_readable with the budget given (what ch_spin_budget(s) returned
 * for this wait): the GIL-releasing wrapper asks for the budget first, and
 * releases the GIL only to spin. */
int ch_spin_readable_for(int fd, ch_spin *s, int64_t budget);

#endif
