"""cffi builder for ``clusterhub._core`` (out-of-line API mode).

Not shipped in wheels; setup.py names it in ``cffi_modules``.

cffi releases the GIL around every C call.  For our calls that never block
(trylock, unlock, framing on non-blocking sockets) that release costs more than
the call itself and, with a busy Python thread in the process, adds the
interpreter's switch interval (milliseconds) to the tail latency.  So the
preamble turns cffi's release into plain braces for the whole module, and the
few calls that may block are declared to cffi under a ``*_nogil`` name whose
wrapper below releases the GIL explicitly around the real function.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
UNITS = ("frame", "locktable")  # each has <unit>.c, <unit>.h and cdef_<unit>.h
HEADERS = ("envelope",)  # header-only (static inline): <name>.h and cdef_<name>.h

PREAMBLE = r"""
#include "envelope.h"
#include "frame.h"
#include "locktable.h"

/* Keep the GIL across every cffi call of this module ... */
#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }

/* ... except these, which may wait: they release it themselves, after
 * counting the call in progress (ch_lt_enter) so that a close() in another
 * thread cannot unmap the table under them. */
static int ch_lt_timedlock_nogil(ch_table *t, uint32_t slot, uint64_t gen, int64_t deadline_ns)
{
    PyThreadState *ts = PyEval_SaveThread();
    int r = ch_lt_timedlock(t, slot, gen, deadline_ns);
    PyEval_RestoreThread(ts);
    return r;
}

static int ch_lt_resolve_nogil(ch_table *t, const uint8_t *key, size_t keylen,
                               uint32_t *slot, uint64_t *gen)
{
    if (!ch_lt_enter(ch_lt_ref(t, CH_LT_SLOT_NONE, 0)))
        return -EBADF;
    PyThreadState *ts = PyEval_SaveThread();
    int r = ch_lt_resolve(t, key, keylen, slot, gen);
    PyEval_RestoreThread(ts);
    ch_lt_leave(t);
    return r;
}

/* A request is sent with the GIL released: if the peer answers before the
 * requester waits (it is often scheduled at once, on this very CPU), the
 * dispatcher thread woken by the reply can take it without waiting for the
 * GIL held by a requester descheduled inside sendmsg. */
static int64_t ch_tx_send_msg_nogil(ch_tx *tx, int fd, size_t max_len, unsigned kind,
                                    uint32_t origin, uint64_t rid, const uint8_t *name,
                                    size_t name_len, const uint8_t *body, size_t body_len)
{
    PyThreadState *ts = PyEval_SaveThread();
    int64_t r = ch_tx_send_msg(tx, fd, max_len, kind, origin, rid, name, name_len, body, body_len);
    PyEval_RestoreThread(ts);
    return r;
}

static int ch_lt_timedlock_ref_nogil(uint64_t ref, int64_t deadline_ns)
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
"""

ffi = FFI()
# Declarations of the preamble's own functions.
PREAMBLE_CDEF = """
int64_t ch_tx_send_msg_nogil(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                             uint64_t rid, const uint8_t *name, size_t name_len,
                             const uint8_t *body, size_t body_len);
"""
# LockBase, the C base type of locks.Lock (csrc/lockhandle.h says why).  It is
# written against the CPython API, so it is not one of UNITS (which also build
# without Python, for the C drivers and fuzzers); cffi only calls the function
# that registers the type.
PREAMBLE += '\n#include "lockhandle.h"\n'
PREAMBLE_CDEF += """
#define CH_LOCK_FOREVER_S 1000000000
int ch_lockbase_register(const char *module);
"""
# decode_messages, the receive fast path for bursts (csrc/decode.h), the same way.
PREAMBLE += '\n#include "decode.h"\n'
PREAMBLE_CDEF += """
int ch_decode_register(const char *module);
"""
ffi.cdef("\n".join((HERE / f"cdef_{u}.h").read_text() for u in UNITS + HEADERS) + PREAMBLE_CDEF)
# cffi builds the module for the stable ABI (setuptools' py_limited_api=True,
# its default except on debug and free-threaded interpreters): one
# _core.abi3.so, which setup.py tags cp310-abi3 (lockhandle.c and decode.c keep
# to the limited API of 3.10; cffi's own code to an older one).
ffi.set_source(
    "clusterhub._core",
    PREAMBLE,
    # Relative paths: setuptools wants them relative to the project root.
    sources=[f"csrc/{u}.c" for u in UNITS] + ["csrc/lockhandle.c", "csrc/decode.c"],
    include_dirs=["csrc"],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-O2"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffi.compile(verbose=True)
