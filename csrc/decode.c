/* decode.c - see decode.h. */
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000
#endif
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "decode.h"
#include "envelope.h"
#include "frame.h"
#include "reply.h"

#ifndef PyBUF_READ /* (in the limited API's headers from 3.11; the value is ABI) */
#define PyBUF_READ 0x100
#endif

static PyObject *decode_messages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "decode_messages takes 7 arguments");
        return NULL;
    }
    const ch_rx *rx;
    Py_ssize_t i, n;
    PyObject *loads = args[3], *sender = args[4], *out = args[5], *reply = args[6];
    if ((!(rx = PyLong_AsVoidPtr(args[0])) && PyErr_Occurred()) ||
        ((i = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred()) ||
        ((n = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred()))
        return NULL;
    if (!rx || i < 0 || n < i || n > CH_RX_MAX_FRAMES || !PyList_Check(out) ||
        (reply != Py_None && !PyTuple_Check(reply))) {
        PyErr_SetString(PyExc_ValueError, "decode_messages: bad arguments");
        return NULL;
    }
    const uint8_t *data = ch_rx_data(rx);
    const uint32_t *table = ch_rx_frames(rx);
    /* A burst usually repeats one name: keep the last one decoded. */
    const uint8_t *last_raw = NULL;
    size_t last_len = 0;
    PyObject *last_name = NULL;
    for (; i < n; i++) {
        ch_msg m; /* (its origin and request id mean nothing here) */
        if (ch_msg_parse(data + table[2 * i], table[2 * i + 1], &m) < 0 ||
            !(m.kind == CH_KIND_MSG || (m.kind == CH_KIND_REQ && reply != Py_None)))
            break;
        const uint8_t *name_raw = m.name;
        size_t nlen = m.name_len;
        PyObject *name;
        if (last_name && nlen == last_len && memcmp(name_raw, last_raw, nlen) == 0) {
            Py_INCREF(last_name);
            name = last_name;
        } else {
            name = PyUnicode_DecodeUTF8((const char *)name_raw, (Py_ssize_t)nlen, NULL);
            if (!name) {
                PyErr_Clear(); /* Python reports it as malformed */
                break;
            }
            Py_XDECREF(last_name);
            Py_INCREF(name);
            last_name = name;
            last_raw = name_raw;
            last_len = nlen;
        }
        PyObject *view = PyMemoryView_FromMemory((char *)m.body, (Py_ssize_t)m.body_len, PyBUF_READ);
        if (!view) {
            Py_DECREF(name);
            goto fail;
        }
        PyObject *value = PyObject_CallFunctionObjArgs(loads, view, NULL);
        Py_DECREF(view);
        if (!value) {
            PyErr_Clear(); /* Python redoes it and logs the error */
            Py_DECREF(name);
            break;
        }
        PyObject *answer = Py_None;
        Py_INCREF(answer);
        if (m.kind == CH_KIND_REQ) {
            Py_DECREF(answer);
            answer = ch_reply_new(reply, m.rid);
            if (!answer) {
                Py_DECREF(name);
                Py_DECREF(value);
                goto fail;
            }
        }
        PyObject *item = PyTuple_Pack(4, name, value, sender, answer);
        Py_DECREF(name);
        Py_DECREF(value);
        Py_DECREF(answer);
        if (!item)
            goto fail;
        int r = PyList_Append(out, item);
        Py_DECREF(item);
        if (r < 0)
            goto fail;
    }
    Py_XDECREF(last_name);
    return PyLong_FromSsize_t(i);
fail:
    Py_XDECREF(last_name);
    return NULL;
}

/* The batch's lone reply: args[0] the rx (an int), args[1] the frame count.
 * 1 with *m filled when the batch is exactly one well-formed CH_KIND_RES
 * frame, 0 when it is anything else, -1 with an exception for bad
 * arguments (`fn` names the caller in the message). */
static int lone_reply(PyObject *const *args, const char *fn, ch_msg *m)
{
    const ch_rx *rx;
    Py_ssize_t n;
    if ((!(rx = PyLong_AsVoidPtr(args[0])) && PyErr_Occurred()) ||
        ((n = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred()))
        return -1;
    if (!rx) {
        PyErr_Format(PyExc_ValueError, "%s: bad arguments", fn);
        return -1;
    }
    const uint32_t *table = ch_rx_frames(rx);
    return n == 1 && ch_msg_parse(ch_rx_data(rx) + table[0], table[1], m) == 0 &&
           m->kind == CH_KIND_RES;
}

static PyObject *take_reply(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "take_reply takes 5 arguments");
        return NULL;
    }
    PyObject *loads = args[3], *miss = args[4];
    unsigned long long rid = PyLong_AsUnsignedLongLong(args[2]);
    if (rid == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    ch_msg m;
    int r = lone_reply(args, "take_reply", &m);
    if (r < 0)
        return NULL;
    if (r == 0 || m.rid != rid)
        goto missed;
    PyObject *view = PyMemoryView_FromMemory((char *)m.body, (Py_ssize_t)m.body_len, PyBUF_READ);
    if (!view)
        return NULL;
    PyObject *value = PyObject_CallFunctionObjArgs(loads, view, NULL);
    Py_DECREF(view);
    if (value)
        return value;
    PyErr_Clear(); /* Python redoes it and reports the error */
missed:
    Py_INCREF(miss);
    return miss;
}

static PyObject *reply_rid(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "reply_rid takes 2 arguments");
        return NULL;
    }
    ch_msg m;
    int r = lone_reply(args, "reply_rid", &m);
    if (r < 0)
        return NULL;
    return r ? PyLong_FromUnsignedLongLong(m.rid) : PyLong_FromLong(0);
}

static PyMethodDef decode_def = {
    "decode_messages", (PyCFunction)(void (*)(void))decode_messages, METH_FASTCALL,
    "decode_messages(rx, i, n, loads, sender, out, reply) -> int (see csrc/decode.h)",
};

static PyMethodDef reply_rid_def = {
    "reply_rid", (PyCFunction)(void (*)(void))reply_rid, METH_FASTCALL,
    "reply_rid(rx, n) -> int (see csrc/decode.h)",
};

static PyMethodDef take_reply_def = {
    "take_reply", (PyCFunction)(void (*)(void))take_reply, METH_FASTCALL,
    "take_reply(rx, n, rid, loads, miss) -> value or miss (see csrc/decode.h)",
};

int ch_decode_register(const char *module)
{
    /* As ch_lockbase_register: the function reaches Python as an attribute. */
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -1;
    PyObject *m = PyImport_AddModule(module); /* borrowed */
    PyObject *fn = m ? PyCFunction_NewEx(&decode_def, NULL, NULL) : NULL;
    PyObject *take = m ? PyCFunction_NewEx(&take_reply_def, NULL, NULL) : NULL;
    PyObject *rid = m ? PyCFunction_NewEx(&reply_rid_def, NULL, NULL) : NULL;
    if (fn && take && rid && PyObject_SetAttrString(m, "decode_messages", fn) == 0 &&
        PyObject_SetAttrString(m, "take_reply", take) == 0 &&
        PyObject_SetAttrString(m, "reply_rid", rid) == 0)
        rc = 0;
    Py_XDECREF(fn);
    Py_XDECREF(take);
    Py_XDECREF(rid);
    if (rc < 0)
        PyErr_WriteUnraisable(NULL);
    PyGILState_Release(g);
    return rc;
}
