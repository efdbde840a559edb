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

#ifndef PyBUF_READ /* (in the limited API's headers from 3.11; the value is ABI) */
#define PyBUF_READ 0x100
#endif

static PyObject *decode_messages(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "decode_messages takes 6 arguments");
        return NULL;
    }
    const ch_rx *rx;
    Py_ssize_t i, n;
    PyObject *loads = args[3], *sender = args[4], *out = args[5];
    if ((!(rx = PyLong_AsVoidPtr(args[0])) && PyErr_Occurred()) ||
        ((i = PyLong_AsSsize_t(args[1])) == -1 && PyErr_Occurred()) ||
        ((n = PyLong_AsSsize_t(args[2])) == -1 && PyErr_Occurred()))
        return NULL;
    if (!rx || i < 0 || n < i || n > CH_RX_MAX_FRAMES || !PyList_Check(out)) {
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
        if (ch_msg_parse(data + table[2 * i], table[2 * i + 1], &m) < 0 || m.kind != CH_KIND_MSG)
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
        PyObject *item = PyTuple_Pack(4, name, value, sender, Py_None);
        Py_DECREF(name);
        Py_DECREF(value);
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

static PyMethodDef decode_def = {
    "decode_messages", (PyCFunction)(void (*)(void))decode_messages, METH_FASTCALL,
    "decode_messages(rx, i, n, loads, sender, out) -> int (see csrc/decode.h)",
};

int ch_decode_register(const char *module)
{
    /* As ch_lockbase_register: the function reaches Python as an attribute. */
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -1;
    PyObject *m = PyImport_AddModule(module); /* borrowed */
    PyObject *fn = m ? PyCFunction_NewEx(&decode_def, NULL, NULL) : NULL;
    if (fn && PyObject_SetAttrString(m, "decode_messages", fn) == 0)
        rc = 0;
    Py_XDECREF(fn);
    if (rc < 0)
        PyErr_WriteUnraisable(NULL);
    PyGILState_Release(g);
    return rc;
}
