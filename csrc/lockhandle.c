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

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

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
    *s_timeout_kw, *s_blocking_kw, *s_discard;
static PyObject *s_zero;      /* the timeout of a non-blocking acquire */
static PyObject *s_minus_one; /* threading's "no timeout" */

/* ---- thread tokens ------------------------------------------------------------- */

/* A token is an object of this type, which has no state but a weak-reference
 * list.  The type object itself is the key of the token in each thread-state
 * dict: no other code can use that key. */
typedef struct {
    PyObject_HEAD
    PyObject *weaklist;
} Token;

static PyTypeObject *token_type;

static void token_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    if (((Token *)op)->weaklist)
        PyObject_ClearWeakRefs(op); /* runs the callbacks: each leaves its _rec */
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(op);
    Py_DECREF(tp);
}

static PyMemberDef token_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(Token, weaklist), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot token_slots[] = {
    {Py_tp_doc, (void *)"A thread's identity for lock handles (see csrc/lockhandle.h)."},
    {Py_tp_dealloc, (void *)token_dealloc},
    {Py_tp_members, token_members},
    {0, NULL},
};

static PyType_Spec token_spec = {
    .name = "clusterhub._core.ThreadToken",
    .basicsize = sizeof(Token),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = token_slots,
};

/* The calling thread's token (borrowed: its thread-state dict holds it).  With
 * `make`, one is made if the thread has none yet; without, NULL with no
 * exception means it has none.  NULL with an exception on failure. */
static PyObject *thread_token(int make)
{
    PyObject *d = PyThreadState_GetDict(); /* borrowed; made on first use */
    if (!d) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "no thread state dict");
        return NULL;
    }
    PyObject *tok = PyDict_GetItemWithError(d, (PyObject *)token_type); /* borrowed */
    if (tok || PyErr_Occurred() || !make)
        return tok;
    tok = PyObject_CallNoArgs((PyObject *)token_type);
    if (!tok)
        return NULL;
    int rc = PyDict_SetItem(d, (PyObject *)token_type, tok);
    Py_DECREF(tok); /* the dict keeps it */
    return rc < 0 ? NULL : tok;
}

/* os.register_at_fork(after_in_child=...): the forking thread's token is
 * dropped, so that the child's only thread has acquired nothing.  (The other
 * threads' states are gone in the child, and their tokens with them.) */
static PyObject *drop_thread_token(PyObject *Py_UNUSED(mod), PyObject *Py_UNUSED(ignored))
{
    PyObject *d = PyThreadState_GetDict();
    if (d && PyDict_GetItemWithError(d, (PyObject *)token_type) &&
        PyDict_DelItem(d, (PyObject *)token_type) < 0) /* the token dies: see token_dealloc */
        return NULL;
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef drop_thread_token_def = {
    "_drop_thread_token", drop_thread_token, METH_NOARGS,
    "After fork, in the child: forget the forking thread's lock-handle token."};

/* ---- the handle's record of recoveries -------------------------------------------- */

/* Whether the calling thread's token is in rec: 1, 0, or -1 with an exception. */
static int rec_has(PyObject *rec)
{
    if (PySet_Size(rec) == 0)
        return 0;
    PyObject *tok = thread_token(0);
    if (!tok)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *probe = PyWeakref_NewRef(tok, NULL); /* equal to an entry on the same token */
    if (!probe)
        return -1;
    int r = PySet_Contains(rec, probe);
    Py_DECREF(probe);
    return r;
}

/* Put the calling thread's token in rec (recovered) or take it out: 0, or -1
 * with an exception. */
static int rec_set(PyObject *rec, int recovered)
{
    if (!recovered && PySet_Size(rec) == 0)
        return 0;
    PyObject *tok = thread_token(recovered);
    if (!tok)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *ref;
    int r;
    if (recovered) {
        /* The entry's callback takes it out of rec when the token dies. */
        PyObject *discard = PyObject_GetAttr(rec, s_discard);
        if (!discard)
            return -1;
        ref = PyWeakref_NewRef(tok, discard);
        Py_DECREF(discard);
        if (!ref)
            return -1;
        r = PySet_Add(rec, ref); /* no change if the token is in already */
    } else {
        ref = PyWeakref_NewRef(tok, NULL);
        if (!ref)
            return -1;
        r = PySet_Discard(rec, ref) < 0 ? -1 : 0;
    }
    Py_DECREF(ref);
    return r;
}

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
    LockBase *self = (LockBase *)op;
    /* The entries' callbacks refer to the set: empty it first, so that the
     * last reference to it is ours. */
    if (self->rec)
        PySet_Clear(self->rec);
    Py_CLEAR(self->rec);
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
 * recover it.  On an error the lock is let go again, so that the exception
 * leaves nothing held. */
static int took(LockBase *self)
{
    if (!self->rec || PySet_Size(self->rec) == 0) /* the usual case: nobody recovered */
        return 0;
    if (rec_set(self->rec, 0) == 0)
        return 0;
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
 * TypeError/ValueError.  None, -1 and valid exact ints and floats are handled
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
        ok = d >= 0 || d == -1.0; /* false for NaN */
        forever = d > CH_LOCK_FOREVER_S || d == -1.0;
    } else if (PyLong_CheckExact(t)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(t, &overflow);
        ok = overflow > 0 || (overflow == 0 && v >= -1);
        forever = overflow > 0 || v > CH_LOCK_FOREVER_S || v == -1;
    }
    if (!ok)
        return PyObject_CallMethodObjArgs(self, s_check_timeout, t, NULL);
    t = forever ? Py_None : t;
    Py_INCREF(t);
    return t;
}

/* The rarer calling forms of acquire (any keyword, two positional arguments,
 * a bool): sets *blocking (-1 not given, 0, 1) and *timeout (borrowed; NULL
 * when not given).  0, or -1 with TypeError. */
static int parse_acquire(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                         int *blocking, PyObject **timeout)
{
    *blocking = -1;
    *timeout = NULL;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "acquire() takes at most 2 arguments (%zd given)", nargs);
        return -1;
    }
    if (nargs == 2 && !PyBool_Check(args[0])) {
        /* A first argument alone may be a timeout: beside one, it cannot. */
        PyErr_Format(PyExc_TypeError,
                     "acquire(): blocking must be True or False when a timeout follows, not %R",
                     args[0]);
        return -1;
    }
    if (nargs >= 1) {
        if (PyBool_Check(args[0]))
            *blocking = args[0] == Py_True;
        else
            *timeout = args[0];
    }
    if (nargs == 2)
        *timeout = args[1];
    Py_ssize_t nkw = kwnames ? PyTuple_Size(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GetItem(kwnames, i); /* borrowed */
        PyObject *value = args[nargs + i];
        if (!name)
            return -1;
        if (name == s_timeout_kw || PyUnicode_CompareWithASCIIString(name, "timeout") == 0) {
            if (*timeout) {
                PyErr_SetString(PyExc_TypeError,
                                "acquire() got multiple values for argument 'timeout'");
                return -1;
            }
            *timeout = value;
        } else if (name == s_blocking_kw ||
                   PyUnicode_CompareWithASCIIString(name, "blocking") == 0) {
            if (*blocking >= 0 || nargs >= 1) { /* a first argument is in blocking's place */
                PyErr_SetString(PyExc_TypeError,
                                "acquire() got multiple values for argument 'blocking'");
                return -1;
            }
            int b = PyObject_IsTrue(value);
            if (b < 0)
                return -1;
            *blocking = b;
        } else {
            PyErr_Format(PyExc_TypeError, "acquire() got an unexpected keyword argument '%U'",
                         name);
            return -1;
        }
    }
    return 0;
}

static PyObject *lb_acquire(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    LockBase *self = (LockBase *)op;
    PyObject *timeout = NULL; /* omitted: the handle's default */
    int blocking = -1;
    /* acquire(), acquire(t), acquire(True): no parsing beyond these tests. */
    if (kwnames || nargs > 1 || (nargs == 1 && args[0] == Py_False)) {
        if (parse_acquire(args, nargs, kwnames, &blocking, &timeout) < 0)
            return NULL;
    } else if (nargs == 1 && args[0] != Py_True) {
        timeout = args[0];
    }
    /* Before the trylock: a bad value must not leave the lock held. */
    if (timeout) {
        PyObject *given = timeout;
        if (!(timeout = check_timeout(op, given))) /* TypeError/ValueError first */
            return NULL;
        if (blocking == 0) { /* threading: only its default, -1, goes with blocking=False */
            Py_DECREF(timeout);
            timeout = NULL;
            int m = given != Py_None ? PyObject_RichCompareBool(given, s_minus_one, Py_EQ) : 0;
            if (m <= 0) {
                if (m == 0)
                    PyErr_SetString(PyExc_ValueError,
                                    "acquire(): a non-blocking call takes no timeout");
                return NULL;
            }
        }
    }
    if (blocking == 0) { /* try once: a miss returns False at once */
        timeout = s_zero;
        Py_INCREF(timeout);
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

/* ---- reading the table ------------------------------------------------------- */

static PyObject *lb_held_here(PyObject *Py_UNUSED(cls), PyObject *arg)
{
    unsigned long long ref = PyLong_AsUnsignedLongLong(arg);
    if (ref == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(ch_lt_held_by_caller_ref(ref)); /* (the GIL serialises it with close) */
}

/* ---- the calling thread's "recovered" ------------------------------------------- */

static PyObject *lb_get_thread_recovered(PyObject *op, void *Py_UNUSED(closure))
{
    LockBase *self = (LockBase *)op;
    int r = self->rec ? rec_has(self->rec) : 0;
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static int lb_set_thread_recovered(PyObject *op, PyObject *value, void *Py_UNUSED(closure))
{
    LockBase *self = (LockBase *)op;
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "_thread_recovered cannot be deleted");
        return -1;
    }
    int v = PyObject_IsTrue(value);
    if (v < 0)
        return -1;
    return self->rec ? rec_set(self->rec, v) : 0;
}

/* ---- the type -------------------------------------------------------------------- */

static PyMethodDef lb_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lb_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire($self, blocking_or_timeout=..., /, timeout=..., *, blocking=True)\n--\n\n"
     "Acquire; wait up to ``timeout`` seconds (None or -1: no limit; omitted:\n"
     "the handle's default).  threading.Lock's forms too: a bool first argument\n"
     "or ``blocking=`` is blocking (False: do not wait, and take no timeout);\n"
     "any other first argument alone is the timeout.  True when acquired,\n"
     "False when not in time."},
    {"release", lb_release, METH_NOARGS,
     "release($self, /)\n--\n\nRelease; LockError if the calling thread does not hold it."},
    {"__enter__", lb_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)(void (*)(void))lb_exit, METH_FASTCALL, NULL},
    {"_held_here", lb_held_here, METH_O | METH_STATIC,
     "_held_here(ref, /)\n--\n\n"
     "1 if a live thread of this process holds the lock of ref, 0 if not, or a\n"
     "negative errno (see csrc/lockhandle.h).  Never takes the lock."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef lb_members[] = {
    {"_ref", T_ULONGLONG, offsetof(LockBase, ref), 0, "the handle's lock-table ref"},
    {"_rec", T_OBJECT_EX, offsetof(LockBase, rec), READONLY,
     "weak references to the tokens of the threads whose latest acquire recovered"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef lb_getset[] = {
    {"_thread_recovered", lb_get_thread_recovered, lb_set_thread_recovered,
     "whether the calling thread's latest acquire through this handle recovered", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot lb_slots[] = {
    {Py_tp_doc, (void *)"The C fast paths of clusterhub.Lock (see csrc/lockhandle.h)."},
    {Py_tp_new, (void *)lb_new},
    {Py_tp_dealloc, (void *)lb_dealloc},
    {Py_tp_traverse, (void *)lb_traverse},
    {Py_tp_clear, (void *)lb_clear},
    {Py_tp_methods, lb_methods},
    {Py_tp_members, lb_members},
    {Py_tp_getset, lb_getset},
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

/* os.register_at_fork(after_in_child=<drop_thread_token>). */
static int register_fork_hook(void)
{
    PyObject *os = NULL, *reg = NULL, *fn = NULL, *args = NULL, *kw = NULL, *res = NULL;
    int rc = -1;
    if (!(os = PyImport_ImportModule("os")) || !(reg = PyObject_GetAttrString(os, "register_at_fork")))
        goto done;
    if (!(fn = PyCFunction_NewEx(&drop_thread_token_def, NULL, NULL)) || !(args = PyTuple_New(0)))
        goto done;
    if (!(kw = PyDict_New()) || PyDict_SetItemString(kw, "after_in_child", fn) < 0)
        goto done;
    if ((res = PyObject_Call(reg, args, kw)))
        rc = 0;
done:
    Py_XDECREF(res);
    Py_XDECREF(kw);
    Py_XDECREF(args);
    Py_XDECREF(fn);
    Py_XDECREF(reg);
    Py_XDECREF(os);
    return rc;
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
        intern(&s_timeout_attr, "_timeout") < 0 || intern(&s_timeout_kw, "timeout") < 0 ||
        intern(&s_blocking_kw, "blocking") < 0 || intern(&s_discard, "discard") < 0)
        goto done;
    if ((!s_zero && !(s_zero = PyLong_FromLong(0))) ||
        (!s_minus_one && !(s_minus_one = PyLong_FromLong(-1))))
        goto done;
    if (!token_type) {
        token_type = (PyTypeObject *)PyType_FromSpec(&token_spec);
        if (!token_type || register_fork_hook() < 0) {
            Py_CLEAR(token_type); /* no token without the hook that keeps it out of children */
            goto done;
        }
    }
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
