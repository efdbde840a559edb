/* decode.h - decode_messages, the receive fast path for messages and
 * requests, and take_reply, the requester's for its reply.
 *
 * Like lockhandle.c, this unit is written against the CPython C API (the
 * stable ABI at the 3.10 level) and is compiled only into the cffi module
 * clusterhub._core, never into the pure-C drivers or fuzzers.
 *
 * Why: decoding a frame in Python (envelope, name, a view per body, the
 * inbox item) costs the receiver about a microsecond, which bounds one-way
 * throughput and is a good part of a request's cost to the process that
 * answers it.  This decodes the messages and requests of a batch in one C
 * call; everything else (replies, broadcasts, anything malformed or
 * undecodable) stays in Python's Router.read (router.py), which is the
 * reference: the result is the same either way.
 *
 *   decode_messages(rx, i, n, loads, sender, out, reply) -> int
 *
 *   rx      the ch_rx's address (an int: ffi.cast("uintptr_t", p)), just
 *           filled by ch_rx_read, which returned n frames.
 *   i       the first frame to look at (0 <= i <= n <= CH_RX_MAX_FRAMES).
 *   loads   called as loads(memoryview) for each body.  The view is
 *           read-only over rx's buffer and valid only during the call (as
 *           the views Router.read hands to loads).
 *   sender  the sender object put into each item (borrowed; each item
 *           holds a reference of its own).
 *   out     a list: one (name, data, sender, answer) tuple is appended per
 *           frame decoded, name a str decoded from strict UTF-8, answer
 *           None for a message and Reply(reply, rid) for a request (see
 *           reply.h).
 *   reply   None (requests are not decoded: they stop the decoder) or the
 *           channel's reply context, a tuple (reply.h).
 *
 * Decodes frames i, i+1, ... while each is a message (CH_KIND_MSG of
 * envelope.h), or a request (CH_KIND_REQ) when `reply` is given, whose
 * envelope and name are well-formed and whose body loads without raising;
 * returns the index of the first frame it did not decode (n when all were).
 * Exceptions from loads or from decoding are cleared: Python redoes that
 * frame and reports them.  Raises (returns NULL) for bad arguments, no
 * memory, or a `reply` that is not a tuple; the items appended before stay in
 * `out`.
 *
 * Thread safety: holds the GIL throughout; the caller holds the channel's
 * reader lock (nobody else fills rx meanwhile).  Never blocks, except in
 * what loads does.
 */
/*
 *   take_reply(rx, n, rid, loads, miss) -> value or miss
 *
 * Why: a requester that read its own reply (see channel.wait_reply) would
 * otherwise route the batch through Router.read, a dozen Python lines for
 * one frame.  When the batch is exactly that reply, this loads it at once.
 *
 *   rx, loads  as for decode_messages; n what ch_rx_read returned.
 *   rid        the request id waited for.
 *   miss       returned (a new reference) whenever the batch is anything
 *              else: n != 1, a frame that is not a well-formed CH_KIND_RES
 *              for rid, or a body that does not load (its exception is
 *              cleared): the caller then routes the batch with Router.read,
 *              which reports what went wrong.
 * Returns the loaded value, or NULL (an exception) for bad arguments or no
 * memory.  Thread safety and blocking as decode_messages.
 */
/*
 *   reply_rid(rx, n) -> int
 *
 * The request id of the batch when it is exactly one reply (a well-formed
 * CH_KIND_RES frame), else 0 (ids start at 1): a reader that serves several
 * requesters (an asyncio loop, see loopread.py) looks up whose it is, then
 * loads it with take_reply.  Raises for bad arguments only.
 */
#ifndef CH_DECODE_H
#define CH_DECODE_H

/* Set decode_messages, take_reply and reply_rid as attributes of the module named `module` (which
 * must be in sys.modules: clusterhub._core, called from clusterhub._bindings
 * at import).  Takes the GIL itself.  0, or -1 after printing the Python
 * exception as unraisable. */
int ch_decode_register(const char *module);

#endif
