/* reply.c - the Reply type (contract in reply.h). */
#include <pyconfig.h>
/* The stable ABI at the 3.10 level, as lockhandle.c (which says why). */
#if !defined(Py_DEBUG) && !defined(Py_TRACE_REFS) && !defined(Py_REF_DEBUG) && \
    !defined(Py_GIL_DISABLED)
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>
#include <structmember.h> /* T_ULONGLONG, READONLY (not in Python.h before 3.12) */

#include <stdint.h>

#include "envelope.h"
#include "frame.h"
#include "reply.h"

enum { CTX_TX, CTX_TX_ADDR, CTX_FD, CTX_MAX_LEN, CTX_DUMPS, CTX_SLOW, CTX_AFTER, CTX_DISPATCHER,
       CTX_PEER_PID, CTX_SIZE };

typedef struct {
    PyObject_HEAD
    PyObject *ctx; /* the channel's context tuple (reply.h) */
    unsigned long long rid;
} Reply;

static PyTypeObject *reply_type;
static PyObject *s_answered; /* interned "answered" */

static PyObject *reply_make(PyTypeObject *type, PyObject *ctx, unsigned long long rid)
{
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Reply *self = (Reply *)alloc(type, 0);
    if (!self)
        return NULL;
    Py_INCREF(ctx);
    self->ctx = ctx;
    self->rid = rid;
    return (PyObject *)self;
}

static PyObject *reply_tp_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    PyObject *ctx;
    unsigned long long rid;
    if (kw && PyDict_Size(kw)) {
        PyErr_SetString(PyExc_TypeError, "Reply takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OK:Reply", &ctx, &rid))
        return NULL;
    if (!PyTuple_Check(ctx) || PyTuple_Size(ctx) != CTX_SIZE) {
        PyErr_SetString(PyExc_TypeError, "Reply: ctx must be a tuple of 9 (see csrc/reply.h)");
        return NULL;
    }
    return reply_make(type, ctx, rid);
}

static int reply_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((Reply *)self)->ctx);
    return 0;
}

static int reply_clear(PyObject *self)
{
    Py_CLEAR(((Reply *)self)->ctx);
    return 0;
}

static void reply_dealloc(PyObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    reply_clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static PyObject *call_fallback(PyObject *fn, unsigned long long rid, PyObject *a, PyObject *b)
{
    PyObject *r = PyLong_FromUnsignedLongLong(rid);
    if (!r)
        return NULL;
    PyObject *out = PyObject_CallFunctionObjArgs(fn, r, a, b, NULL);
    Py_DECREF(r);
    return out;
}

static PyObject *reply_call(PyObject *obj, PyObject *args, PyObject *kw)
{
    Reply *self = (Reply *)obj;
    PyObject *ok, *value;
    if ((kw && PyDict_Size(kw)) || !PyArg_UnpackTuple(args, "reply", 2, 2, &ok, &value)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "reply(ok, value) takes no keyword arguments");
        return NULL;
    }
    PyObject *ctx = self->ctx;
    if (!ctx) {
        PyErr_SetString(PyExc_ValueError, "reply: cleared");
        return NULL;
    }
    if (ok != Py_True)
        return call_fallback(PyTuple_GetItem(ctx, CTX_SLOW), self->rid, ok, value);
    PyObject *body = PyObject_CallFunctionObjArgs(PyTuple_GetItem(ctx, CTX_DUMPS), value, NULL);
    if (!body || !PyBytes_Check(body)) {
        Py_XDECREF(body);
        PyErr_Clear(); /* the slow path meets it again and answers with the error */
        return call_fallback(PyTuple_GetItem(ctx, CTX_SLOW), self->rid, ok, value);
    }
    char *p;
    Py_ssize_t n;
    ch_tx *tx = PyLong_AsVoidPtr(PyTuple_GetItem(ctx, CTX_TX_ADDR));
    long fd = PyLong_AsLong(PyTuple_GetItem(ctx, CTX_FD));
    size_t max_len = PyLong_AsSize_t(PyTuple_GetItem(ctx, CTX_MAX_LEN));
    if (PyErr_Occurred() || PyBytes_AsStringAndSize(body, &p, &n) < 0) {
        Py_DECREF(body);
        return NULL;
    }
    int64_t left = ch_tx_send_msg(tx, (int)fd, max_len, CH_KIND_RES, 0, self->rid,
                                  (const uint8_t *)"", 0, (const uint8_t *)p, (size_t)n);
    Py_DECREF(body);
    if (left == 0) {
        if (PyObject_SetAttr(PyTuple_GetItem(ctx, CTX_DISPATCHER), s_answered,
                             PyTuple_GetItem(ctx, CTX_PEER_PID)) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *l = PyLong_FromLongLong(left), *size = PyLong_FromSsize_t(n);
    PyObject *out = l && size ? call_fallback(PyTuple_GetItem(ctx, CTX_AFTER), self->rid, l, size)
                              : NULL;
    Py_XDECREF(l);
    Py_XDECREF(size);
    return out;
}

static PyMemberDef reply_members[] = {
    {"rid", T_ULONGLONG, offsetof(Reply, rid), READONLY, "the request id it answers"},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot reply_slots[] = {
    {Py_tp_doc, (void *)"reply(ok, value): answer one request (see csrc/reply.h)."},
    {Py_tp_new, (void *)reply_tp_new},
    {Py_tp_dealloc, (void *)reply_dealloc},
    {Py_tp_traverse, (void *)reply_traverse},
    {Py_tp_clear, (void *)reply_clear},
    {Py_tp_call, (void *)reply_call},
    {Py_tp_members, reply_members},
    {0, NULL},
};

static PyType_Spec reply_spec = {
    "clusterhub._core.Reply", sizeof(Reply), 0, Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    reply_slots,
};

void *ch_reply_new(void *ctx, uint64_t rid)
{
    return reply_make(reply_type, (PyObject *)ctx, rid);
}

int ch_reply_register(const char *module)
{
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -1;
    PyObject *m = PyImport_AddModule(module); /* borrowed */
    if (m && !s_answered)
        s_answered = PyUnicode_InternFromString("answered");
    if (m && s_answered && !reply_type)
        reply_type = (PyTypeObject *)PyType_FromSpec(&reply_spec);
    if (reply_type && PyObject_SetAttrString(m, "Reply", (PyObject *)reply_type) == 0)
        rc = 0;
    if (rc < 0)
        PyErr_WriteUnraisable(NULL);
    PyGILState_Release(g);
    return rc;
}
