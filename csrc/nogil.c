/* nogil.c - the *_nogil wrappers of clusterhub._core (contract in nogil.h). */

#include <pyconfig.h>
/* The stable ABI at the 3.10 level, as lockhandle.c (which says why). */
#if !defined(Py_DEBUG) && !defined(Py_TRACE_REFS) && !defined(Py_REF_DEBUG) && \
    !defined(Py_GIL_DISABLED)
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>

#include <errno.h>

#include "nogil.h"

int ch_lt_timedlock_nogil(ch_table *t, uint32_t slot, uint64_t gen, int64_t deadline_ns)
{
    PyThreadState *ts = PyEval_SaveThread();
    int r = ch_lt_timedlock(t, slot, gen, deadline_ns);
    PyEval_RestoreThread(ts);
    return r;
}

int ch_lt_resolve_nogil(ch_table *t, const uint8_t *key, size_t keylen, uint32_t *slot,
                        uint64_t *gen)
{
    if (!ch_lt_enter(ch_lt_ref(t, CH_LT_SLOT_NONE, 0)))
        return -EBADF;
    PyThreadState *ts = PyEval_SaveThread();
    int r = ch_lt_resolve(t, key, keylen, slot, gen);
    PyEval_RestoreThread(ts);
    ch_lt_leave(t);
    return r;
}

int ch_lt_timedlock_ref_nogil(uint64_t ref, int64_t deadline_ns)
{
    ch_table *t = ch_lt_enter(ref);
    if (!t)
        return -EBADF;
    PyThreadState *ts = PyEval_SaveThread();
    int r = ch_lt_timedlock_ref(t, ref, deadline_ns);
    PyEval_RestoreThread(ts);
    ch_lt_leave(t);
    return r;
}

int64_t ch_tx_send_msg_nogil(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                             uint64_t rid, const uint8_t *name, size_t name_len,
                             const uint8_t *body, size_t body_len)
{
    PyThreadState *ts = PyEval_SaveThread();
    int64_t r = ch_tx_send_msg(tx, fd, max_len, kind, origin, rid, name, name_len, body, body_len);
    PyEval_RestoreThread(ts);
    return r;
}

int ch_rx_wait_nogil(ch_rx *rx, int fd, int ep_fd, int wake_fd, ch_spin *s,
                     int64_t deadline_ns)
{
    PyThreadState *ts = PyEval_SaveThread();
    int r = ch_rx_wait(rx, fd, ep_fd, wake_fd, s, deadline_ns);
    PyEval_RestoreThread(ts);
    return r;
}

int ch_spin_readable_nogil(int fd, ch_spin *s)
{
    int64_t budget = ch_spin_budget(s);
    if (budget <= 0)
        return 0; /* (no spin: no GIL round trip either) */
    PyThreadState *ts = PyEval_SaveThread();
    int r = ch_spin_readable_for(fd, s, budget);
    PyEval_RestoreThread(ts);
    return r;
}
