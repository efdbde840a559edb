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
 * every complete frame one read brought.  Neither is internally locked: each
 * is owned by one thread at a time (the Python layer serialises access).
 * Neither ever blocks: sockets must be non-blocking (ch_socketpair makes
 * them so) and "would block" is reported, never waited for.
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
/* The message envelope that starts every payload clusterhub sends (see
 * ch_tx_send_msg): kind u8, origin u32, request id u64, name length u16,
 * all little-endian, then the name and the body. */
#define CH_MSG_HEADER 15
#define CH_MSG_NAME_MAX 0xffff
/* ch_rx_read hands out at most this many frames per call. */
#define CH_RX_MAX_FRAMES 1024

/* ch_rx_read's distinct end-of-stream and protocol results. */
#define CH_ERR_EOF (-ESHUTDOWN)       /* peer closed cleanly between frames */
#define CH_ERR_TRUNCATED (-ENODATA)   /* peer closed in the middle of a frame */
#define CH_ERR_MALFORMED (-EPROTO)    /* bad magic or reserved bits */
#define CH_ERR_TOOBIG (-EMSGSIZE)     /* declared length above the maximum */

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
/* Release a send queue and any bytes still queued in it.  NULL is a no-op. */
void ch_tx_free(ch_tx *tx);

/*
 * Frame `payload` (len bytes, copied or written before return: the caller keeps
 * ownership) and send it on `fd`.  When nothing is queued the header and payload
 * go out in one gathered sendmsg(MSG_NOSIGNAL); whatever the socket did not take
 * is copied into the queue.  When bytes are already queued the frame is
 * appended and the whole queue is flushed with one sendmsg.
 * Returns the number of bytes still queued (0 = all written, > 0 = the socket
 * is full: wait for POLLOUT, then ch_tx_flush), or -EMSGSIZE when len exceeds
 * `max_len` (nothing queued, the queue stays usable), -ENOMEM, or the socket's
 * error: -EPIPE / -ECONNRESET when the peer is gone (the process does not get
 * SIGPIPE, whatever its SIGPIPE disposition).  EINTR is retried; EAGAIN is not
 * an error.  Never blocks.
 */
int64_t ch_tx_send(ch_tx *tx, int fd, const uint8_t *payload, size_t len, size_t max_len);

/*
 * Like ch_tx_send, for a payload made of a message envelope (CH_MSG_HEADER
 * bytes built here from kind, origin and rid), the name and the body: the
 * three go out in one gathered sendmsg without being copied together first.
 * Also returns -EINVAL for kind > 255 or name_len > CH_MSG_NAME_MAX, and
 * -EMSGSIZE when the whole payload exceeds max_len.
 */
int64_t ch_tx_send_msg(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                       uint64_t rid, const uint8_t *name, size_t name_len,
                       const uint8_t *body, size_t body_len);

/*
 * Mark the queue closed and drop what it holds: every later send, push or
 * flush returns -EPIPE without touching its fd (whose number may have been
 * reused).  The object stays valid until ch_tx_free.  Idempotent.
 */
void ch_tx_close(ch_tx *tx);

/*
 * Append a frame to the queue without any syscall (for batching several frames
 * into the next flush).  Returns the bytes now queued, -EMSGSIZE, or -ENOMEM.
 */
int64_t ch_tx_push(ch_tx *tx, const uint8_t *payload, size_t len, size_t max_len);

/*
 * Write as much of the queue as the socket takes, with one sendmsg per
 * contiguous run.  Returns the bytes still queued (0 = empty) or -EPIPE /
 * -ECONNRESET / other socket errors.  Never blocks.
 */
int64_t ch_tx_flush(ch_tx *tx, int fd);

/* Bytes queued and not yet written. */
size_t ch_tx_pending(const ch_tx *tx);

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
