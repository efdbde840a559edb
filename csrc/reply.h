/*
 * reply.h - Reply, the C callable that answers one request.
 *
 * Like decode.c, this unit is written against the CPython C API (the stable
 * ABI at the 3.10 level) and is compiled only into the cffi module
 * clusterhub._core.
 *
 * Why: answering a request in Python (Router.reply: serialize, send, check)
 * is a Python frame and a dozen lines per request in the process that
 * answers, which is where a request's round trip spends most of its CPU
 * after the two context switches.  A Reply does the common case in C:
 *
 *   reply = Reply(ctx, rid)        (made by decode_messages, see decode.h)
 *   reply(ok, value) -> None or what the Python fallbacks return
 *
 *   ctx  a tuple (tx, tx_addr, fd, max_len, dumps, slow, after, dispatcher,
 *        peer_pid), one per channel (Router.reply_context):
 *          tx          the channel's send queue object (kept alive here);
 *          tx_addr     its ch_tx's address (an int);
 *          fd, max_len as for ch_tx_send_msg;
 *          dumps       the serializer: dumps(value) -> bytes;
 *          slow        slow(rid, ok, value): the whole Python path;
 *          after       after(rid, left, size): the Python path for what
 *                      ch_tx_send_msg left queued (left > 0) or its error
 *                      (left < 0) for a body of size bytes;
 *          dispatcher  an object whose `answered` attribute is set to
 *                      peer_pid after a reply went out whole.
 *   With ok True and dumps(value) giving bytes, the reply (CH_KIND_RES,
 *   origin 0, request id rid, no name) is sent with ch_tx_send_msg; when
 *   it went out whole, dispatcher.answered = peer_pid and the call returns
 *   None; else after(rid, left, len(body)) is returned.  Anything else
 *   (ok False, dumps raising or not giving bytes: its exception is cleared,
 *   the slow path meets it again) returns slow(rid, ok, value).
 *   Exceptions from slow and after propagate.
 *
 * Thread safety: any thread holding the GIL (ch_tx_send_msg locks the
 * queue).  Never blocks but in what the fallbacks do.
 */
#ifndef CH_REPLY_H
#define CH_REPLY_H

#include <stdint.h>

/* A new Reply for request `rid` with context `ctx` (a tuple as above; not
 * checked here: Reply() from Python checks it), or NULL with an exception.
 * Requires ch_reply_register to have run.  Holds the GIL. */
void *ch_reply_new(void *ctx, uint64_t rid);

/* Create the Reply type and set it as an attribute of the module named
 * `module` (in sys.modules).  Takes the GIL itself.  0, or -1 after
 * printing the Python exception as unraisable. */
int ch_reply_register(const char *module);

#endif
