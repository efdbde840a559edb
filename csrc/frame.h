/*
 * frame.h - length-prefixed framing over AF_UNIX stream socketpairs.
 *
 * Wire format of one frame: an 8-byte header, then `len` payload bytes.
 *   bytes 0-1  magic 0x4843 ("CH"), little-endian
 *   bytes 2-3  reserved, must be 0 (a non-zero value is a malformed header)
 *   bytes 4-7  payload length, little-endian, at most the receiver's maximum
 *
 * A ch_tx queues outgoing frames for one socket and writes them with as few
 * sendmsg() calls as possible; a ch_rx buffers incoming bytes and hands out
 * every complete frame one read brought.
 *
 * Payloads are opaque bytes to this layer, except in ch_tx_send_msg and
 * ch_tx_post_msg, which build a payload that starts with the message
 * envelope of envelope.h (frame.c includes it for them; their callers
 * include it for CH_MSG_HEADER and CH_MSG_NAME_MAX).
 *
 * A ch_tx is internally locked (a pthread mutex per tx): threads may call the
 * ch_tx_* functions (all but ch_tx_free) concurrently, and must, since the
 * process-wide writer thread (see ch_tx_post) works on posted txs alongside
 * the callers.  The mutex is only ever held for copying bytes and for the
 * non-blocking sendmsg calls of direct writes (the writer thread makes its
 * own without it, so posting goes on while it writes), so a call may wait for
 * it briefly (microseconds for ordinary frames), never on a peer.  A ch_rx is not
 * locked: it is owned by one thread at a time (the Python layer serialises
 * access).  Neither ever blocks on a socket: sockets must be non-blocking
 * (ch_socketpair makes them so) and "would block" is reported, never waited
 * for.
 *
 * Every function returns 0 (or a documented non-negative count) on success
 * and a negative errno on failure.
 */
#ifndef CLUSTERHUB_FRAME_H
#define CLUSTERHUB_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <errno.h>

#define CH_FRAME_HEADER 8
#define CH_FRAME_MAGIC 0x4843u
/* Hard ceiling of any frame; a receiver's own maximum may only be lower. */
#define CH_FRAME_MAX_LIMIT 0x7fffffffu
/* ch_rx_read hands out at most this many frames per call. */
#define CH_RX_MAX_FRAMES 1024

/* ch_rx_read's distinct end-of-stream and protocol results. */
#define CH_ERR_EOF (-ESHUTDOWN)       /* peer closed cleanly between frames */
#define CH_ERR_TRUNCATED (-ENODATA)   /* peer closed in the middle of a frame */
#define CH_ERR_MALFORMED (-EPROTO)    /* bad magic or reserved bits */
#define CH_ERR_TOOBIG (-EMSGSIZE)     /* declared length above the maximum */

/* ch_tx_post writes directly only when the previous direct write on that tx
 * is older than this (CLOCK_MONOTONIC nanoseconds): 50 us. */
#define CH_TX_POST_WINDOW_NS 50000
/* The writer thread, woken by a post from another CPU, waits this long
 * (nanoseconds, 20 us) before it writes, so that a sendmsg carries more of
 * the burst (see ch_tx_post). */
#define CH_TX_COALESCE_NS 20000

typedef struct ch_tx ch_tx;
typedef struct ch_rx ch_rx;

/*
 * Create a connected AF_UNIX SOCK_STREAM pair, both ends SOCK_CLOEXEC and
 * O_NONBLOCK.  Writes the two descriptors to fds[0], fds[1]; the caller owns
 * them.  Returns 0 or -errno (EMFILE, ENFILE, ...).  Any thread.
 */
int ch_socketpair(int fds[2]);

/*
 * Allocate an empty send queue.  *out is owned by the caller and released with
 * ch_tx_free.  Returns 0 or -ENOMEM.
 */
int ch_tx_new(ch_tx **out);
/*
 * Release a send queue and any bytes still queued in it (it is closed first,
 * see ch_tx_close, so nothing more is written).  NULL is a no-op.  Safe
 * while the writer thread has the tx scheduled: if the writer is working on it
 * at that moment, the writer releases the memory when it is done.  No other
 * thread may use tx during or after the call.
 */
void ch_tx_free(ch_tx *tx);

/*
 * Frame `payload` (len bytes, copied or written before return: the caller keeps
 * ownership) and send it on `fd`.  When nothing is queued the header and payload
 * go out in one gathered sendmsg(MSG_NOSIGNAL); whatever the socket did not take
 * is copied into the queue.  When bytes are already queued the frame is
 * appended and the whole queue is flushed (see ch_tx_flush).  While the
 * writer thread is in a sendmsg on tx (microseconds; see ch_tx_post), the
 * frame is appended without a syscall, behind the writer's bytes, and left to
 * the writer, which owns the queue then (ch_tx_unowned is 0).
 * Returns the number of bytes still queued (0 = all written, > 0 = the socket
 * is full: wait for POLLOUT, then ch_tx_flush, unless ch_tx_unowned says the
 * writer thread writes them), or -EMSGSIZE when len exceeds
 * `max_len` (nothing queued, the queue stays usable), -ENOMEM, or the socket's
 * error: -EPIPE / -ECONNRESET when the peer is gone (the process does not get
 * SIGPIPE, whatever its SIGPIPE disposition), or -EPIPE when tx is closed,
 * or the error a background write of the writer thread met (see ch_tx_post).
 * EINTR is retried; EAGAIN is not an error.  Never blocks.
 */
int64_t ch_tx_send(ch_tx *tx, int fd, const uint8_t *payload, size_t len, size_t max_len);

/*
 * Like ch_tx_send, for a payload made of a message envelope (envelope.h:
 * CH_MSG_HEADER bytes built here from kind, origin, rid and name_len), the
 * name and the body: the three go out in one gathered sendmsg without being
 * copied together first.  Also returns -EINVAL for kind > 255 or name_len >
 * CH_MSG_NAME_MAX, and -EMSGSIZE when the whole payload exceeds max_len.
 */
int64_t ch_tx_send_msg(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                       uint64_t rid, const uint8_t *name, size_t name_len,
                       const uint8_t *body, size_t body_len);

/*
 * Mark the queue closed and drop what it holds: every later send, post, push
 * or flush returns -EPIPE without touching its fd (whose number may have been
 * reused).  Waits for the writer thread to finish a sendmsg in progress on tx
 * (microseconds: it makes them without the tx mutex, and close waits on a
 * condition variable for the one in flight) and takes tx off its schedule:
 * once this returns, the writer never writes to that fd again, so the caller
 * may close it right away.  The object stays valid until ch_tx_free.
 * Idempotent.
 */
void ch_tx_close(ch_tx *tx);

/*
 * Append a frame to the queue without any syscall (for batching several frames
 * into the next flush; while the writer thread owns the queue, see
 * ch_tx_unowned, it writes them too).  Returns the bytes now queued,
 * -EMSGSIZE, -ENOMEM, or the error of a closed tx (see ch_tx_post).
 */
int64_t ch_tx_push(ch_tx *tx, const uint8_t *payload, size_t len, size_t max_len);

/*
 * Write as much of the queue as the socket takes, with gathered sendmsg calls
 * (harmless while the writer thread owns the queue: bytes go out in queue
 * order; while the writer is in a sendmsg on tx, flush writes nothing and
 * leaves the queue to it, since their bytes would interleave on the stream).
 * Returns the bytes still queued (0 = empty) or -EPIPE / -ECONNRESET / other
 * socket errors, or the error of a closed tx (see ch_tx_post).  Never blocks.
 */
int64_t ch_tx_flush(ch_tx *tx, int fd);

/*
 * Send a frame, or hand it to the process-wide writer thread so that a burst
 * of frames goes out in few sendmsg calls.  Same framing, arguments and
 * validation as ch_tx_send / ch_tx_send_msg; `fd` must be the same socket on
 * every call for one tx.  The payload is copied or written before return.
 *
 * When the queue is empty, the writer is not responsible for tx, and the last
 * direct write on tx (by a send or a post) is more than CH_TX_POST_WINDOW_NS
 * old, the frame is sent right away exactly as ch_tx_send would (a lone
 * message pays no hand-over latency), and what the socket does not take then
 * is left to the writer thread as below.  Otherwise it is appended to the queue
 * without a syscall and the writer thread becomes responsible for the queue:
 * it writes everything queued on tx, in order, and when the socket is full it
 * waits for POLLOUT itself.  Waking the writer costs one eventfd write, and
 * only when it is asleep, so a burst costs at most one wake-up.  Frames batch
 * up while the writer is being woken or is busy: it takes what is queued on
 * tx, makes its sendmsg without the tx mutex (posts, on tx too, go on
 * meanwhile: their frames go out after the ones being written) and then
 * takes what came meanwhile.  It waits on purpose only in one case: when a
 * wake-up came from a poster running on another CPU than the writer's, it
 * pauses CH_TX_COALESCE_NS (20 us) before it writes, so that one sendmsg
 * (and one wake-up of the reader) carries more of the burst; this delays
 * the frames it then writes by that much (the first frame of a burst, written
 * directly, is not delayed).  Never when it runs on the
 * poster's own CPU (the poster runs meanwhile anyway, and a timer would only
 * add context switches).  The writer thread ("ch-writer", all signals
 * blocked, never calls into Python) is started on the first post that needs
 * it; if it cannot be started, the frame is written like ch_tx_send would.
 *
 * Returns the bytes now queued on tx (>= 0, including bytes the writer has yet
 * to write: compare it with your own limit on queued bytes), or a negative
 * errno: -EPIPE when tx is closed; the error an earlier background write met
 * (-EPIPE, -ECONNRESET, ...: the writer drops the queue and keeps that error,
 * which every later send, post, push and flush returns); the socket's error of
 * a direct write; -EMSGSIZE or -EINVAL (ch_tx_post_msg: kind > 255 or
 * name_len > CH_MSG_NAME_MAX), nothing queued; -ENOMEM, nothing queued.
 * Never blocks (except on the tx mutex, see above).  Any thread.
 */
int64_t ch_tx_post(ch_tx *tx, int fd, const uint8_t *payload, size_t len, size_t max_len);
int64_t ch_tx_post_msg(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                       uint64_t rid, const uint8_t *name, size_t name_len,
                       const uint8_t *body, size_t body_len);

/*
 * A broadcast: ch_tx_post(txs[i], fds[i], payload, len, max_len) for each i
 * in 0..n-1, in that order, but for txs[i] == skip (NULL: none; a relayed
 * broadcast leaves out the tx of the worker it came from), each result
 * (bytes queued on that tx, or a negative errno as ch_tx_post returns it;
 * 0 for the skipped one) written to out[i].  One call where a loop of posts
 * from Python cost about 0.5 us per tx.  Returns how many results need the
 * caller's attention: negative, or above `limit` (the caller's bound on
 * queued bytes).  The arrays are the caller's, read or written only during
 * the call; every txs[i] must stay valid meanwhile (a closed one is fine:
 * -EPIPE).  Never blocks (except on each tx's mutex, see ch_tx_post).  Any
 * thread.
 */
size_t ch_tx_post_each(ch_tx *const *txs, const int *fds, size_t n, const ch_tx *skip,
                       const uint8_t *payload, size_t len, size_t max_len, int64_t limit,
                       int64_t *out);

/* Bytes queued and not yet written (by anyone), including those the writer
 * thread is writing at the moment (until its sendmsg returns). */
size_t ch_tx_pending(const ch_tx *tx);

/*
 * Bytes queued that the writer thread is not responsible for: 0 while the
 * writer has tx scheduled or is waiting for POLLOUT on it, else
 * ch_tx_pending(tx) (bytes a send left on a full socket: the caller must wait
 * for POLLOUT and ch_tx_flush them itself).
 */
size_t ch_tx_unowned(const ch_tx *tx);

/*
 * Start this process's writer thread now rather than on the first post that
 * needs it (thread creation then delays that burst by milliseconds).
 * Returns 0 (also when already running) or -errno from eventfd/pthread_create
 * (posts then fall back to direct writes).  Any thread; takes the writer's
 * lock briefly; never blocks otherwise.  The thread runs under SCHED_OTHER
 * when the thread that creates it (here or on demand) is SCHED_BATCH, as
 * clusterhub's dispatcher threads are: a batch writer would not run on the
 * poster's CPU before the poster's time slice ends.
 */
int ch_tx_writer_start(void);

/*
 * The writer thread's counters since this process started it (a forked child
 * starts from zero), for tests and monitoring.  Fills *out under the writer's
 * lock; cpu_ns is the writer thread's CPU time (0 when it is not running).
 * Any thread; never blocks but on that lock (held for microseconds).
 */
typedef struct {
    uint64_t wakeups; /* eventfd writes that woke it (by posts and closes) */
    uint64_t sleeps;  /* times it went to sleep in poll() */
    uint64_t writes;  /* sendmsg calls it made */
    int64_t cpu_ns;
    int running;
} ch_writer_stats;
void ch_tx_writer_stats(ch_writer_stats *out);

/*
 * fork(): pthread_atfork handlers (registered by the first ch_tx_new) make
 * fork() wait until no ch_tx_* call is in progress in any thread (each holds a
 * tx mutex for microseconds), so a child finds every tx consistent and
 * unlocked (a tx whose bytes the parent's writer thread was writing keeps
 * them queued in the child).  The writer thread does not exist in a child:
 * the child starts its own on demand, so txs created in the child can post.
 * Txs inherited from the parent share their sockets with it and must not be
 * written in the child; ch_tx_close and ch_tx_free on them are safe.
 */

/*
 * Allocate a receive buffer for frames of at most max_len payload bytes
 * (1 .. CH_FRAME_MAX_LIMIT).  Owned by the caller; release with ch_rx_free.
 * Returns 0, -EINVAL or -ENOMEM.
 */
int ch_rx_new(size_t max_len, ch_rx **out);
/* Release a receive buffer.  NULL is a no-op. */
void ch_rx_free(ch_rx *rx);

/*
 * Discard the frames handed out by the previous call, then, if fewer than one
 * complete frame is buffered, read what `fd` has (recv until a frame is
 * complete, the socket would block or the peer closed; EINTR retried) and
 * return the number n of complete frames now available (1 .. CH_RX_MAX_FRAMES),
 * 0 when none is complete and the socket would block, or:
 *   CH_ERR_EOF        the peer closed with no partial frame pending,
 *   CH_ERR_TRUNCATED  the peer closed inside a frame,
 *   CH_ERR_MALFORMED  a header with bad magic or reserved bits,
 *   CH_ERR_TOOBIG     a header declaring more than max_len bytes (checked
 *                     before any allocation),
 *   -ENOMEM, -ECONNRESET or another recv error.
 * Frames already complete are handed out before an end-of-stream or protocol
 * error is reported: errors come from the call after the last good frame.
 * Frame i's payload is ch_rx_data(rx) + ch_rx_frames(rx)[2*i], of length
 * ch_rx_frames(rx)[2*i + 1]; both pointers stay valid until the next
 * ch_rx_read or ch_rx_feed on rx.  Never blocks.
 */
int ch_rx_read(ch_rx *rx, int fd);

/*
 * Like ch_rx_read, but without reading: hands out the complete frames already
 * buffered (0 when there is none), or a protocol error (CH_ERR_MALFORMED,
 * CH_ERR_TOOBIG) for a bad header at the front.  Never blocks, no syscall.
 */
int ch_rx_buffered(ch_rx *rx);

/*
 * Like ch_rx_read, but takes the bytes from memory instead of a socket (for
 * tests and fuzzing): appends up to len bytes of `data` (the caller keeps
 * ownership) and returns the frames now complete.  *used receives how many bytes
 * were taken; call again with the rest when *used < len.  Never returns
 * CH_ERR_EOF or CH_ERR_TRUNCATED (call ch_rx_eof for that).
 */
int ch_rx_feed(ch_rx *rx, const uint8_t *data, size_t len, size_t *used);

/*
 * The end-of-stream verdict for bytes fed so far: CH_ERR_EOF when no partial
 * frame is buffered, CH_ERR_TRUNCATED otherwise.
 */
int ch_rx_eof(const ch_rx *rx);

/* The buffer and frame table of the last ch_rx_read/ch_rx_feed (see above). */
const uint8_t *ch_rx_data(const ch_rx *rx);
const uint32_t *ch_rx_frames(const ch_rx *rx);

#endif
