/* lockhandle.c - LockBase, the C base type of clusterhub.Lock (contract in
 * lockhandle.h). */

#include <pyconfig.h>
/* cffi builds the rest of clusterhub._core for the stable ABI (abi3) unless
 * the interpreter is a debug or free-threaded build; so does this unit, at
 * the level of the oldest Python supported (3.10): it has METH_FASTCALL,
 * PyType_GetSlot on any type, and a stable Py_INCREF/Py_DECREF. */
#if !defined(Py_DEBUG) && !defined(Py_TRACE_REFS) && !defined(Py_REF_DEBUG) && \
    !defined(Py_GIL_DISABLED)
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>
#include <structmember.h> /* PyMemberDef's T_* and READONLY (not in Python.h before 3.12) */

#include <stddef.h>
#include <stdint.h>

#include "lockhandle.h"
#include "locktable.h"

typedef struct {
    PyObject_HEAD
    unsigned long long ref; /* T_ULONGLONG's type; a uint64_t ch_lt_ref */
    PyObject *rec;          /* the _rec set; NULL only once tp_clear ran */
} LockBase;

_Static_assert(sizeof(unsigned long long) == sizeof(uint64_t), "a ref is 64 bits");

/* Interned method and attribute names, made once by ch_lockbase_register. */
static PyObject *s_enter_slow, *s_acquire_slow, *s_release_slow, *s_check_timeout, *s_timeout_attr,
    *s_timeout_kw;

/* ---- object lifetime: a GC type, subclassable (Python subclasses add slots) ---- */

static PyObject *lb_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    /* The arguments are the subclass __init__'s, which sets _ref. */
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    LockBase *self = (LockBase *)alloc(type, 0); /* zeroed: ref 0, rec NULL */
    if (!self)
        return NULL;
    self->rec = PySet_New(NULL);
    if (!self->rec) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int lb_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(((LockBase *)op)->rec);
    /* An instance of a heap type holds a reference to its type; a Python
     * subclass's traverse leaves that visit to its heap-type base (us). */
    Py_VISIT((PyObject *)Py_TYPE(op));
    return 0;
}

static int lb_clear(PyObject *op)
{
    Py_CLEAR(((LockBase *)op)->rec);
    return 0;
}

static void lb_dealloc(PyObject *op)
{
    /* For a Python subclass, subtype_dealloc has cleared its slots and calls
     * this; the type's reference is then ours to drop (the base is a heap
     * type), after freeing through the subclass's tp_free. */
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    lb_clear(op);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(op);
    Py_DECREF(tp);
}

/* ---- fast paths ---------------------------------------------------------------- */

/* After a trylock that took the lock: this thread's latest acquire did not
 * recover it (the Python code's `self._rec.discard(get_ident())`).  On an
 * error the lock is let go again, so that the exception leaves nothing held. */
static int took(LockBase *self)
{
    if (!self->rec || PySet_Size(self->rec) == 0) /* the usual case: nobody recovered */
        return 0;
    PyObject *me = PyLong_FromUnsignedLong(PyThread_get_thread_ident());
    if (me && PySet_Discard(self->rec, me) >= 0) {
        Py_DECREF(me);
        return 0;
    }
    Py_XDECREF(me);
    ch_lt_unlock_ref(self->ref);
    return -1;
}

/* self.<name>(r[, arg]) for a C result r: the subclass's slow path. */
static PyObject *call_slow(PyObject *self, PyObject *name, int r, PyObject *arg)
{
    PyObject *code = PyLong_FromLong(r);
    if (!code)
        return NULL;
    PyObject *res = PyObject_CallMethodObjArgs(self, name, code, arg, NULL); /* arg NULL: 1 arg */
    Py_DECREF(code);
    return res;
}

static PyObject *lb_enter(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    LockBase *self = (LockBase *)op;
    int r = ch_lt_trylock_ref(self->ref);
    if (r != 0)
        return call_slow(op, s_enter_slow, r, NULL);
    if (took(self) < 0)
        return NULL;
    Py_INCREF(op);
    return op;
}

/* release() and __exit__: unlock, or let the subclass finish (or raise). */
static PyObject *release(PyObject *op)
{
    int r = ch_lt_unlock_ref(((LockBase *)op)->ref);
    if (r != 0) {
        PyObject *res = call_slow(op, s_release_slow, r, NULL);
        if (!res)
            return NULL;
        Py_DECREF(res);
    }
    Py_RETURN_NONE;
}

static PyObject *lb_release(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    return release(op);
}

static PyObject *lb_exit(PyObject *op, PyObject *const *Py_UNUSED(args), Py_ssize_t nargs)
{
    /* METH_FASTCALL: the with statement's call (3 arguments) packs no tuple. */
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "__exit__() takes exactly 3 arguments (%zd given)", nargs);
        return NULL;
    }
    return release(op); /* None: the block's exception, if any, propagates */
}

/* The timeout acquire(timeout) waits with (new reference), or NULL with
 * TypeError/ValueError.  None and valid exact ints and floats are handled
 * here; anything else (bad values, bools, subclasses) by the Python
 * _check_timeout, which is the reference. */
static PyObject *check_timeout(PyObject *self, PyObject *t)
{
    if (t == Py_None) {
        Py_INCREF(t);
        return t;
    }
    int ok = 0, forever = 0;
    if (PyFloat_CheckExact(t)) {
        double d = PyFloat_AsDouble(t);
        ok = d >= 0; /* false for NaN */
        forever = d > CH_LOCK_FOREVER_S;
    } else if (PyLong_CheckExact(t)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(t, &overflow);
        ok = overflow > 0 || (overflow == 0 && v >= 0);
        forever = overflow > 0 || v > CH_LOCK_FOREVER_S;
    }
    if (!ok)
        return PyObject_CallMethodObjArgs(self, s_check_timeout, t, NULL);
    t = forever ? Py_None : t;
    Py_INCREF(t);
    return t;
}

static PyObject *lb_acquire(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    LockBase *self = (LockBase *)op;
    PyObject *timeout = NULL; /* omitted: the handle's default */
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "acquire() takes at most 1 argument (%zd given)", nargs);
        return NULL;
    }
    if (nargs == 1)
        timeout = args[0];
    Py_ssize_t nkw = kwnames ? PyTuple_Size(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GetItem(kwnames, i); /* borrowed */
        if (!name)
            return NULL;
        if (name != s_timeout_kw && PyUnicode_CompareWithASCIIString(name, "timeout") != 0) {
            PyErr_Format(PyExc_TypeError, "acquire() got an unexpected keyword argument '%U'", name);
            return NULL;
        }
        if (timeout) {
            PyErr_SetString(PyExc_TypeError, "acquire() got multiple values for argument 'timeout'");
            return NULL;
        }
        timeout = args[nargs + i];
    }
    if (timeout) { /* before the trylock: a bad value must not leave the lock held */
        timeout = check_timeout(op, timeout);
        if (!timeout)
            return NULL;
    }
    int r = ch_lt_trylock_ref(self->ref);
    if (r == 0) {
        Py_XDECREF(timeout);
        if (took(self) < 0)
            return NULL;
        Py_RETURN_TRUE;
    }
    if (!timeout) { /* nothing is held (or, EDEADLK, was held before): may fail */
        timeout = PyObject_GetAttr(op, s_timeout_attr);
        if (!timeout)
            return NULL;
    }
    PyObject *res = call_slow(op, s_acquire_slow, r, timeout);
    Py_DECREF(timeout);
    return res;
}

/* ---- the type -------------------------------------------------------------------- */

static PyMethodDef lb_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lb_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire($self, /, timeout=...)\n--\n\n"
     "Acquire; wait up to ``timeout`` seconds (None: no limit; omitted: the\n"
     "handle's default).  True when acquired, False on timeout."},
    {"release", lb_release, METH_NOARGS,
     "release($self, /)\n--\n\nRelease; LockError if the calling thread does not hold it."},
    {"__enter__", lb_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))lb_exit, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef lb_members[] = {
    {"_ref", T_ULONGLONG, offsetof(LockBase, ref), 0, "the handle's lock-table ref"},
    {"_rec", T_OBJECT_EX, offsetof(LockBase, rec), READONLY,
     "idents of the threads whose latest acquire recovered the lock"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot lb_slots[] = {
    {Py_tp_doc, (void *)"The C fast paths of clusterhub.Lock (see csrc/lockhandle.h)."},
    {Py_tp_new, (void *)lb_new},
    {Py_tp_dealloc, (void *)lb_dealloc},
    {Py_tp_traverse, (void *)lb_traverse},
    {Py_tp_clear, (void *)lb_clear},
    {Py_tp_methods, lb_methods},
    {Py_tp_members, lb_members},
    {0, NULL},
};

static PyType_Spec lb_spec = {
    .name = "clusterhub._core.LockBase",
    .basicsize = sizeof(LockBase),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .slots = lb_slots,
};

static int intern(PyObject **p, const char *s)
{
    if (!*p)
        *p = PyUnicode_InternFromString(s); /* kept for the life of the process */
    return *p ? 0 : -1;
}

int ch_lockbase_register(const char *module)
{
    /* cffi cannot return a PyObject*, so the type reaches Python as an
     * attribute of the module.  The GIL is held already (every call of this
     * cffi module keeps it, see build_core.py); Ensure makes that explicit. */
    static PyObject *type; /* created once: a second call only sets the attribute */
    PyGILState_STATE g = PyGILState_Ensure();
    PyObject *m;
    int rc = -1;
    if (intern(&s_enter_slow, "_enter_slow") < 0 || intern(&s_acquire_slow, "_acquire_slow") < 0 ||
        intern(&s_release_slow, "_release_slow") < 0 ||
        intern(&s_check_timeout, "_check_timeout") < 0 ||
        intern(&s_timeout_attr, "_timeout") < 0 || intern(&s_timeout_kw, "timeout") < 0)
        goto done;
    if (!type && !(type = PyType_FromSpec(&lb_spec)))
        goto done;
    m = PyImport_AddModule(module); /* borrowed */
    if (m && PyObject_SetAttrString(m, "LockBase", type) == 0)
        rc = 0;
done:
    if (rc < 0)
        PyErr_WriteUnraisable(NULL); /* a cffi call must not return with an exception set */
    PyGILState_Release(g);
    return rc;
}
