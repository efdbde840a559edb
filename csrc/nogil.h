/*
 * nogil.h - the calls of clusterhub._core that may wait, which release the
 * GIL themselves.
 *
 * Like lockhandle.c and decode.c, nogil.c is written against the CPython C
 * API (the stable ABI at the 3.10 level) and is compiled only into the cffi
 * module, never into the pure-C drivers or fuzzers.
 *
 * Why: cffi releases the GIL around every C call.  For the module's calls
 * that never block (trylock, unlock, framing on non-blocking sockets) that
 * release costs more than the call itself and, with a busy Python thread in
 * the process, adds the interpreter's switch interval (milliseconds) to the
 * tail latency.  So the module keeps the GIL across every cffi call (core.h
 * turns cffi's release into plain braces), and the few calls that may wait
 * are declared to cffi (cdef_nogil.h) only under the *_nogil names below,
 * whose definitions release the GIL around the real function.  The waiting
 * functions themselves (ch_lt_resolve, ch_lt_timedlock, ch_lt_timedlock_ref)
 * are not declared to cffi at all; ch_tx_send_msg, which never waits, is
 * declared under both names.
 *
 * Each wrapper returns exactly what the function it wraps returns (see
 * frame.h and locktable.h for the contracts) plus what is said below.  The
 * caller must hold the GIL (every cffi call does); it is released for the
 * wrapped call only and held again on return.
 */
#ifndef CH_NOGIL_H
#define CH_NOGIL_H

#include <stddef.h>
#include <stdint.h>

#include "frame.h"
#include "locktable.h"
#include "wait.h"

/* ch_lt_timedlock with the GIL released.  t must stay mapped for the whole
 * call: the caller serialises it with ch_lt_close itself (tests only; the
 * library locks through ch_lt_timedlock_ref_nogil). */
int ch_lt_timedlock_nogil(ch_table *t, uint32_t slot, uint64_t gen, int64_t deadline_ns);

/* ch_lt_resolve with the GIL released, counted as a call in progress
 * (ch_lt_enter/ch_lt_leave on t) so that a ch_lt_close in another thread
 * cannot unmap t under it: -EBADF when t is already closed or disabled. */
int ch_lt_resolve_nogil(ch_table *t, const uint8_t *key, size_t keylen, uint32_t *slot,
                        uint64_t *gen);

/* ch_lt_timedlock_ref with the GIL released, between ch_lt_enter(ref) and
 * ch_lt_leave: -EBADF when the ref's table is closed or disabled. */
int ch_lt_timedlock_ref_nogil(uint64_t ref, int64_t deadline_ns);

/* ch_tx_send_msg with the GIL released.  It never waits (but for the tx
 * mutex, microseconds): a request is sent this way so that, when the peer
 * answers before the requester waits (it is often scheduled at once, on
 * this very CPU), the dispatcher thread woken by the reply can take it
 * without waiting for the GIL held by a requester descheduled inside
 * sendmsg. */
int64_t ch_tx_send_msg_nogil(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                             uint64_t rid, const uint8_t *name, size_t name_len,
                             const uint8_t *body, size_t body_len);

/* ch_rx_wait with the GIL released (it spins, then blocks).  The caller
 * owns rx and s for the call, as ch_rx_wait says. */
int ch_rx_wait_nogil(ch_rx *rx, int fd, int ep_fd, int wake_fd, ch_spin *s,
                     int64_t deadline_ns);

/* ch_spin_readable with the GIL released while it spins: a spin must let
 * the process's other threads run.  Without a budget it returns 0 at once,
 * the GIL kept. */
int ch_spin_readable_nogil(int fd, ch_spin *s);

#endif
