/*
 * core.h - the preamble of the cffi module clusterhub._core.
 *
 * build_core.py's set_source includes this file, and only that generated
 * source (cffi's wrapper of every function the cdef_*.h files declare) may
 * include it: it changes how that one translation unit treats the GIL.  It
 * is included after cffi's own headers (Python.h among them).
 *
 * It brings in every header whose declarations the cdef_*.h files repeat
 * (cffi checks them against these), and it keeps the GIL across every cffi
 * call of the module: cffi wraps each call in Py_BEGIN_ALLOW_THREADS /
 * Py_END_ALLOW_THREADS, which are redefined below as plain braces.  The
 * calls that may wait are declared to cffi only as the *_nogil wrappers of
 * nogil.h, which release the GIL themselves (nogil.h says why).
 */
#ifndef CH_CORE_H
#define CH_CORE_H

#include "decode.h"
#include "envelope.h"
#include "frame.h"
#include "lockhandle.h"
#include "locktable.h"
#include "nogil.h"
#include "reply.h"
#include "wait.h"

#undef Py_BEGIN_ALLOW_THREADS
#undef Py_END_ALLOW_THREADS
#define Py_BEGIN_ALLOW_THREADS {
#define Py_END_ALLOW_THREADS }

#endif
