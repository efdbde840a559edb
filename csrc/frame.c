/* frame.c - see frame.h for the wire format and every function's contract. */
#define _GNU_SOURCE
#include "frame.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* A receive buffer starts (and, after a large frame, shrinks back to) this. */
#define RX_DEFAULT_CAP (256u * 1024u)

struct ch_tx {
    uint8_t *buf;
    size_t cap;
    size_t head; /* first byte not yet written to the socket */
    size_t tail; /* end of queued bytes */
    int closed;  /* ch_tx_close: every send fails with EPIPE */
};

struct ch_rx {
    uint8_t *buf;
    size_t cap;
    size_t max_len;
    size_t start; /* first byte not handed out yet */
    size_t end;   /* end of received bytes */
    uint32_t frames[2 * CH_RX_MAX_FRAMES];
};

static void put_header(uint8_t h[CH_FRAME_HEADER], uint32_t len)
{
    h[0] = CH_FRAME_MAGIC & 0xff;
    h[1] = CH_FRAME_MAGIC >> 8;
    h[2] = 0;
    h[3] = 0;
    h[4] = len & 0xff;
    h[5] = (len >> 8) & 0xff;
    h[6] = (len >> 16) & 0xff;
    h[7] = len >> 24;
}

int ch_socketpair(int fds[2])
{
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, fds) < 0)
        return -errno;
    return 0;
}

/* ---- send side ------------------------------------------------------- */

int ch_tx_new(ch_tx **out)
{
    ch_tx *tx = calloc(1, sizeof *tx);
    if (!tx)
        return -ENOMEM;
    *out = tx;
    return 0;
}

void ch_tx_free(ch_tx *tx)
{
    if (!tx)
        return;
    free(tx->buf);
    free(tx);
}

size_t ch_tx_pending(const ch_tx *tx)
{
    return tx->tail - tx->head;
}

/* Make room for `need` more bytes at the tail. */
static int tx_reserve(ch_tx *tx, size_t need)
{
    if (tx->head == tx->tail)
        tx->head = tx->tail = 0;
    if (tx->cap - tx->tail >= need)
        return 0;
    if (tx->head > 0) { /* slide the unsent bytes to the front first */
        memmove(tx->buf, tx->buf + tx->head, tx->tail - tx->head);
        tx->tail -= tx->head;
        tx->head = 0;
        if (tx->cap - tx->tail >= need)
            return 0;
    }
    size_t want = tx->cap ? tx->cap : 4096;
    while (want - tx->tail < need) {
        if (want > SIZE_MAX / 2)
            return -ENOMEM;
        want *= 2;
    }
    uint8_t *nb = realloc(tx->buf, want);
    if (!nb)
        return -ENOMEM;
    tx->buf = nb;
    tx->cap = want;
    return 0;
}

static int tx_append(ch_tx *tx, const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    int r = tx_reserve(tx, alen + blen);
    if (r < 0)
        return r;
    if (alen)
        memcpy(tx->buf + tx->tail, a, alen);
    if (blen)
        memcpy(tx->buf + tx->tail + alen, b, blen);
    tx->tail += alen + blen;
    return 0;
}

/* One sendmsg of iov, EINTR retried.  Returns bytes written, 0 on EAGAIN, or -errno. */
static ssize_t send_iov(int fd, struct iovec *iov, int iovcnt)
{
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = iovcnt};
    for (;;) {
        ssize_t n = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n >= 0)
            return n;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return -errno;
    }
}

int64_t ch_tx_flush(ch_tx *tx, int fd)
{
    if (tx->closed)
        return -EPIPE;
    while (tx->head < tx->tail) {
        struct iovec iov = {tx->buf + tx->head, tx->tail - tx->head};
        ssize_t n = send_iov(fd, &iov, 1);
        if (n < 0)
            return n;
        if (n == 0)
            break;
        tx->head += (size_t)n;
    }
    if (tx->head == tx->tail)
        tx->head = tx->tail = 0;
    return (int64_t)(tx->tail - tx->head);
}

int64_t ch_tx_push(ch_tx *tx, const uint8_t *payload, size_t len, size_t max_len)
{
    if (tx->closed)
        return -EPIPE;
    if (len > max_len || len > CH_FRAME_MAX_LIMIT)
        return -EMSGSIZE;
    uint8_t h[CH_FRAME_HEADER];
    put_header(h, (uint32_t)len);
    int r = tx_append(tx, h, sizeof h, payload, len);
    if (r < 0)
        return r;
    return (int64_t)(tx->tail - tx->head);
}

/*
 * Send one frame made of the pieces in iov (the first one starting with the
 * frame header), in order behind anything queued: one gathered sendmsg when
 * the queue is empty, the unwritten rest copied into the queue.
 */
static int64_t tx_sendv(ch_tx *tx, int fd, struct iovec *iov, int cnt, size_t total)
{
    if (tx->head != tx->tail) { /* keep order: queue behind what is waiting */
        for (int i = 0; i < cnt; i++) {
            int r = tx_append(tx, iov[i].iov_base, iov[i].iov_len, NULL, 0);
            if (r < 0)
                return r; /* (ENOMEM: the frame is partly queued; the channel is lost anyway) */
        }
        return ch_tx_flush(tx, fd);
    }
    size_t done = 0;
    while (done < total) {
        ssize_t n = send_iov(fd, iov, cnt);
        if (n < 0)
            return n;
        if (n == 0)
            break;
        done += (size_t)n;
        while (cnt > 0 && (size_t)n >= iov->iov_len) { /* drop the pieces written */
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    /* The socket is full: keep the unwritten rest of this frame. */
    for (int i = 0; i < cnt; i++) {
        int r = tx_append(tx, iov[i].iov_base, iov[i].iov_len, NULL, 0);
        if (r < 0)
            return r;
    }
    return (int64_t)(tx->tail - tx->head);
}

int64_t ch_tx_send(ch_tx *tx, int fd, const uint8_t *payload, size_t len, size_t max_len)
{
    if (tx->closed)
        return -EPIPE;
    if (len > max_len || len > CH_FRAME_MAX_LIMIT)
        return -EMSGSIZE;
    uint8_t h[CH_FRAME_HEADER];
    put_header(h, (uint32_t)len);
    struct iovec iov[2] = {{h, sizeof h}, {(void *)payload, len}};
    return tx_sendv(tx, fd, iov, 2, sizeof h + len);
}

int64_t ch_tx_send_msg(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                       uint64_t rid, const uint8_t *name, size_t name_len,
                       const uint8_t *body, size_t body_len)
{
    if (tx->closed)
        return -EPIPE;
    if (name_len > CH_MSG_NAME_MAX || kind > 0xff)
        return -EINVAL;
    size_t len = CH_MSG_HEADER + name_len + body_len;
    if (len > max_len || len > CH_FRAME_MAX_LIMIT || body_len > CH_FRAME_MAX_LIMIT)
        return -EMSGSIZE;
    uint8_t h[CH_FRAME_HEADER + CH_MSG_HEADER];
    put_header(h, (uint32_t)len);
    uint8_t *e = h + CH_FRAME_HEADER;
    e[0] = (uint8_t)kind;
    for (int i = 0; i < 4; i++)
        e[1 + i] = (uint8_t)(origin >> (8 * i));
    for (int i = 0; i < 8; i++)
        e[5 + i] = (uint8_t)(rid >> (8 * i));
    e[13] = name_len & 0xff;
    e[14] = (uint8_t)(name_len >> 8);
    struct iovec iov[3] = {{h, sizeof h}, {(void *)name, name_len}, {(void *)body, body_len}};
    return tx_sendv(tx, fd, iov, 3, sizeof h + name_len + body_len);
}

void ch_tx_close(ch_tx *tx)
{
    tx->closed = 1;
    free(tx->buf);
    tx->buf = NULL;
    tx->cap = tx->head = tx->tail = 0;
}

/* ---- receive side ---------------------------------------------------- */

int ch_rx_new(size_t max_len, ch_rx **out)
{
    if (max_len < 1 || max_len > CH_FRAME_MAX_LIMIT)
        return -EINVAL;
    ch_rx *rx = calloc(1, sizeof *rx);
    if (!rx)
        return -ENOMEM;
    rx->max_len = max_len;
    *out = rx;
    return 0;
}

void ch_rx_free(ch_rx *rx)
{
    if (!rx)
        return;
    free(rx->buf);
    free(rx);
}

const uint8_t *ch_rx_data(const ch_rx *rx)
{
    return rx->buf;
}

const uint32_t *ch_rx_frames(const ch_rx *rx)
{
    return rx->frames;
}

static uint32_t get_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Check the header at p (CH_FRAME_HEADER bytes); store the payload length. */
static int check_header(const ch_rx *rx, const uint8_t *p, size_t *len)
{
    if ((p[0] | (unsigned)p[1] << 8) != CH_FRAME_MAGIC || p[2] || p[3])
        return CH_ERR_MALFORMED;
    uint32_t n = get_u32(p + 4);
    if (n > rx->max_len)
        return CH_ERR_TOOBIG;
    *len = n;
    return 0;
}

/*
 * Index the complete frames from rx->start, at most CH_RX_MAX_FRAMES, and
 * advance rx->start past them.  Returns how many, or a header error when the
 * first unindexed frame is bad and no good frame precedes it.
 */
static int rx_scan(ch_rx *rx)
{
    int n = 0;
    size_t pos = rx->start;
    while (n < CH_RX_MAX_FRAMES && rx->end - pos >= CH_FRAME_HEADER) {
        size_t len;
        int r = check_header(rx, rx->buf + pos, &len);
        if (r < 0) {
            if (n == 0)
                return r;
            break;
        }
        if (rx->end - pos - CH_FRAME_HEADER < len)
            break;
        rx->frames[2 * n] = (uint32_t)(pos + CH_FRAME_HEADER);
        rx->frames[2 * n + 1] = (uint32_t)len;
        n++;
        pos += CH_FRAME_HEADER + len;
    }
    rx->start = pos;
    return n;
}

/*
 * Make room to receive: slide unconsumed bytes to the front and make the
 * buffer large enough for the frame being received (its header, if buffered,
 * has been validated by rx_scan, so its length is within max_len).
 */
static int rx_reserve(ch_rx *rx)
{
    size_t have = rx->end - rx->start;
    size_t need = RX_DEFAULT_CAP;
    if (have >= CH_FRAME_HEADER) {
        size_t len = get_u32(rx->buf + rx->start + 4);
        if (CH_FRAME_HEADER + len > need)
            need = CH_FRAME_HEADER + len;
    }
    if (rx->start > 0) {
        memmove(rx->buf, rx->buf + rx->start, have);
        rx->start = 0;
        rx->end = have;
    }
    /* Give back the memory of a past large frame once it is consumed. */
    if (rx->cap > need && rx->cap > 4 * RX_DEFAULT_CAP) {
        uint8_t *nb = realloc(rx->buf, need);
        if (nb) {
            rx->buf = nb;
            rx->cap = need;
        }
    }
    if (rx->cap < need) {
        uint8_t *nb = realloc(rx->buf, need);
        if (!nb)
            return -ENOMEM;
        rx->buf = nb;
        rx->cap = need;
    }
    return 0;
}

int ch_rx_read(ch_rx *rx, int fd)
{
    /* Until a frame is complete: 0 must mean "would block" (see frame.h), so a
     * recv that leaves the frame incomplete is followed by another. */
    for (;;) {
        int n = rx_scan(rx);
        if (n != 0)
            return n;
        int r = rx_reserve(rx);
        if (r < 0)
            return r;
        ssize_t got;
        do
            got = recv(fd, rx->buf + rx->end, rx->cap - rx->end, MSG_DONTWAIT);
        while (got < 0 && errno == EINTR);
        if (got < 0)
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
        if (got == 0)
            return ch_rx_eof(rx);
        rx->end += (size_t)got;
    }
}

int ch_rx_feed(ch_rx *rx, const uint8_t *data, size_t len, size_t *used)
{
    *used = 0;
    int n = rx_scan(rx);
    if (n != 0 || len == 0)
        return n;
    int r = rx_reserve(rx);
    if (r < 0)
        return r;
    size_t take = rx->cap - rx->end < len ? rx->cap - rx->end : len;
    memcpy(rx->buf + rx->end, data, take);
    rx->end += take;
    *used = take;
    return rx_scan(rx);
}

int ch_rx_eof(const ch_rx *rx)
{
    return rx->end == rx->start ? CH_ERR_EOF : CH_ERR_TRUNCATED;
}
