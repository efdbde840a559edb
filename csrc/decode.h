/* decode.h - decode_messages, the receive fast path for bursts of messages.
 *
 * Like lockhandle.c, this unit is written against the CPython C API (the
 * stable ABI at the 3.10 level) and is compiled only into the cffi module
 * clusterhub._core, never into the pure-C drivers or fuzzers.
 *
 * Why: a burst of one-way messages costs the receiver about a microsecond
 * per message in Python (envelope, name, a view per body, the inbox item),
 * and the receiver is what bounds one-way throughput.  This does the plain
 * messages of a batch in one C call; everything else (requests, replies,
 * broadcasts, anything malformed or undecodable) stays in Python's
 * Router.read (router.py), which is the reference: the result is the same
 * either way.
 *
 *   decode_messages(rx, i, n, loads, sender, out) -> int
 *
 *   rx      the ch_rx's address (an int: ffi.cast("uintptr_t", p)), just
 *           filled by ch_rx_read, which returned n frames.
 *   i       the first frame to look at (0 <= i <= n <= CH_RX_MAX_FRAMES).
 *   loads   called as loads(memoryview) for each body.  The view is
 *           read-only over rx's buffer and valid only during the call (as
 *           the views Router.read hands to loads).
 *   sender  the sender object put into each item (borrowed; each item
 *           holds a reference of its own).
 *   out     a list: one (name, data, sender, None) tuple is appended per
 *           frame decoded, name a str decoded from strict UTF-8.
 *
 * Decodes frames i, i+1, ... while each is a plain message (CH_KIND_MSG of
 * envelope.h) whose envelope and name are well-formed and whose body loads
 * without raising; returns the index of the first frame it did not decode
 * (n when all were).
 * Exceptions from loads or from decoding are cleared: Python redoes that
 * frame and reports them.  Raises (returns NULL) only for bad arguments or
 * no memory; the items appended before stay in `out`.
 *
 * Thread safety: holds the GIL throughout; the caller holds the channel's
 * reader lock (nobody else fills rx meanwhile).  Never blocks, except in
 * what loads does.
 */
#ifndef CH_DECODE_H
#define CH_DECODE_H

/* Set decode_messages as an attribute of the module named `module` (which
 * must be in sys.modules: clusterhub._core, called from clusterhub._bindings
 * at import).  Takes the GIL itself.  0, or -1 after printing the Python
 * exception as unraisable. */
int ch_decode_register(const char *module);

#endif
