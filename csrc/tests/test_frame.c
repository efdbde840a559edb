/*
 * test_frame.c - pure-C driver for the framing layer (csrc/frame.{h,c}).
 *
 * Build and run (csrc/checks.sh does this under ASan+UBSan):
 *   cc -std=gnu11 -Wall -Wextra -Icsrc csrc/tests/test_frame.c csrc/frame.c -o test_frame
 *   ./test_frame [test-name ...]
 * Environment: CH_TEST_SEED=<n> replays one random seed (the seed in use is
 * printed first).  Prints "N passed, M failed" and exits non-zero on failure.
 * Under ThreadSanitizer (clang -fsanitize=thread), run with
 * TSAN_OPTIONS=die_after_fork=0: test_post_fork starts threads in its child.
 *
 * The frames are encoded here by hand from the wire format in frame.h, not
 * with frame.c's own encoder, so both directions are checked against the
 * documented format; so are message envelopes, from envelope.h (whose
 * helpers test_envelope_helpers checks against that hand encoding).
 */
#define _GNU_SOURCE
#include "envelope.h"
#include "frame.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <malloc.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- sanitizer-aware heap accounting ---------------------------------- */

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CH_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CH_ASAN 1
#endif
#endif

/* (ASan and TSan have their own allocator, which mallinfo2 does not see) */
#ifdef CH_ASAN
size_t __sanitizer_get_current_allocated_bytes(void);
static size_t heap_in_use(void)
{
    return __sanitizer_get_current_allocated_bytes();
}
#else
static size_t heap_in_use(void)
{
    struct mallinfo2 m = mallinfo2();
    return m.uordblks + m.hblkhd;
}
#endif

/* ---- tiny test harness ------------------------------------------------- */

static const char *g_test;
static int g_fail;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (!(cond)) {                                                                   \
            fprintf(stderr, "%s:%d: [%s] CHECK failed: %s\n", __FILE__, __LINE__, g_test, \
                    #cond);                                                              \
            g_fail++;                                                                    \
        }                                                                                \
    } while (0)

#define CHECK_EQ(a, b)                                                                    \
    do {                                                                                  \
        long long a_ = (long long)(a), b_ = (long long)(b);                               \
        if (a_ != b_) {                                                                   \
            fprintf(stderr, "%s:%d: [%s] CHECK_EQ failed: %s == %lld, %s == %lld\n",     \
                    __FILE__, __LINE__, g_test, #a, a_, #b, b_);                          \
            g_fail++;                                                                     \
        }                                                                                 \
    } while (0)

/* Stop the current test at the first failure of a precondition. */
#define REQUIRE(cond)           \
    do {                        \
        int f_ = g_fail;        \
        CHECK(cond);            \
        if (g_fail != f_)       \
            goto out;           \
    } while (0)

/* ---- random numbers (xorshift64*) -------------------------------------- */

static uint64_t g_rng;

static uint64_t rnd(void)
{
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1DULL;
}

/* Uniform in [0, n); 0 when n == 0. */
static size_t rnd_below(size_t n)
{
    return n ? (size_t)(rnd() % n) : 0;
}

/* A payload size in [0, max], biased towards small and boundary values. */
static size_t rnd_size(size_t max)
{
    switch (rnd_below(6)) {
    case 0: return rnd_below(max < 16 ? max + 1 : 17);
    case 1: return rnd_below(max < 4096 ? max + 1 : 4097);
    case 2: return rnd_below(max < 65536 ? max + 1 : 65537);
    case 3: return max - rnd_below(max < 8 ? max + 1 : 9);
    default: return rnd_below(max + 1);
    }
}

/* A chunk size for splitting a byte stream: mostly small, sometimes big. */
static size_t rnd_chunk(size_t left)
{
    static const size_t caps[] = {1, 3, 8, 9, 100, 4096, 70000, 300000};
    size_t cap = caps[rnd_below(sizeof caps / sizeof caps[0])];
    size_t c = 1 + rnd_below(cap);
    return c < left ? c : left;
}

/* ---- frames as test data ------------------------------------------------ */

typedef struct {
    uint8_t *p;
    size_t len;
} blob;

typedef struct {
    blob *v;
    size_t n, cap;
} blobs;

static void blobs_add(blobs *b, const uint8_t *p, size_t len)
{
    if (b->n == b->cap) {
        b->cap = b->cap ? 2 * b->cap : 16;
        b->v = realloc(b->v, b->cap * sizeof *b->v);
        if (!b->v)
            abort();
    }
    uint8_t *c = malloc(len ? len : 1);
    if (!c)
        abort();
    if (len)
        memcpy(c, p, len);
    b->v[b->n].p = c;
    b->v[b->n].len = len;
    b->n++;
}

static void blobs_free(blobs *b)
{
    for (size_t i = 0; i < b->n; i++)
        free(b->v[i].p);
    free(b->v);
    memset(b, 0, sizeof *b);
}

/* A frame of `len` random bytes. */
static void blobs_add_random(blobs *b, size_t len)
{
    uint8_t *p = malloc(len ? len : 1);
    if (!p)
        abort();
    for (size_t i = 0; i < len; i++)
        p[i] = (uint8_t)rnd();
    blobs_add(b, p, len);
    free(p);
}

/* Compare two frame lists; reports the first difference. */
static int blobs_equal(const blobs *want, const blobs *got)
{
    if (want->n != got->n) {
        fprintf(stderr, "[%s] frame count: want %zu, got %zu\n", g_test, want->n, got->n);
        return 0;
    }
    for (size_t i = 0; i < want->n; i++) {
        if (want->v[i].len != got->v[i].len) {
            fprintf(stderr, "[%s] frame %zu length: want %zu, got %zu\n", g_test, i,
                    want->v[i].len, got->v[i].len);
            return 0;
        }
        if (want->v[i].len && memcmp(want->v[i].p, got->v[i].p, want->v[i].len) != 0) {
            fprintf(stderr, "[%s] frame %zu content differs\n", g_test, i);
            return 0;
        }
    }
    return 1;
}

/* Write one header as frame.h documents it: magic LE, reserved 0, length LE. */
static void put_hdr(uint8_t *h, uint32_t len)
{
    h[0] = 0x43; /* 'C' : 0x4843 little-endian */
    h[1] = 0x48; /* 'H' */
    h[2] = 0;
    h[3] = 0;
    h[4] = (uint8_t)len;
    h[5] = (uint8_t)(len >> 8);
    h[6] = (uint8_t)(len >> 16);
    h[7] = (uint8_t)(len >> 24);
}

/* Encode all frames of b into one malloc'd stream; *total gets its size. */
static uint8_t *encode(const blobs *b, size_t *total)
{
    size_t t = 0;
    for (size_t i = 0; i < b->n; i++)
        t += CH_FRAME_HEADER + b->v[i].len;
    uint8_t *s = malloc(t ? t : 1), *w = s;
    if (!s)
        abort();
    for (size_t i = 0; i < b->n; i++) {
        put_hdr(w, (uint32_t)b->v[i].len);
        w += CH_FRAME_HEADER;
        if (b->v[i].len)
            memcpy(w, b->v[i].p, b->v[i].len);
        w += b->v[i].len;
    }
    *total = t;
    return s;
}

/* Copy the n frames the last read/feed handed out, checking their lengths. */
static void collect(ch_rx *rx, int n, size_t max_len, blobs *got)
{
    CHECK(n >= 0 && n <= CH_RX_MAX_FRAMES);
    const uint8_t *data = ch_rx_data(rx);
    const uint32_t *fr = ch_rx_frames(rx);
    for (int i = 0; i < n; i++) {
        CHECK(fr[2 * i + 1] <= max_len);
        blobs_add(got, data + fr[2 * i], fr[2 * i + 1]);
    }
}

/* Read until the socket would block (returns 0) or a code/error (returned). */
static int drain(ch_rx *rx, int fd, size_t max_len, blobs *got)
{
    for (;;) {
        int n = ch_rx_read(rx, fd);
        if (n <= 0)
            return n;
        collect(rx, n, max_len, got);
    }
}

/* Feed `len` bytes in random chunks; returns the first negative code or 0. */
static int feed_split(ch_rx *rx, const uint8_t *s, size_t len, size_t max_len, blobs *got,
                      int one_byte)
{
    size_t off = 0;
    while (off < len) {
        size_t chunk = one_byte ? 1 : rnd_chunk(len - off), used = 99;
        int n = ch_rx_feed(rx, s + off, chunk, &used);
        if (n < 0)
            return n;
        CHECK(used <= chunk);
        collect(rx, n, max_len, got);
        if (n == 0 && used == 0) {
            fprintf(stderr, "[%s] ch_rx_feed made no progress at %zu/%zu\n", g_test, off, len);
            g_fail++;
            return 0;
        }
        off += used;
    }
    for (;;) { /* frames still buffered beyond CH_RX_MAX_FRAMES */
        size_t used = 99;
        int n = ch_rx_feed(rx, NULL, 0, &used);
        CHECK_EQ(used, 0);
        if (n <= 0)
            return n;
        collect(rx, n, max_len, got);
    }
}

static int new_pair(int fds[2])
{
    int r = ch_socketpair(fds);
    CHECK_EQ(r, 0);
    return r;
}

/* Close what new_pair (or a test) left open: entries of -1 are skipped. */
static void close_pair(const int fds[2])
{
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* Bytes waiting to be read on fd. */
static int unread(int fd)
{
    int n = -1;
    if (ioctl(fd, FIONREAD, &n) < 0)
        return -1;
    return n;
}

/* Write all of s (blocking via poll) to a non-blocking fd. */
static int write_all(int fd, const uint8_t *s, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, s + off, len - off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                return -errno;
            struct pollfd p = {fd, POLLOUT, 0};
            poll(&p, 1, 1000);
            continue;
        }
        off += (size_t)w;
    }
    return 0;
}

/* ---- round trips ----------------------------------------------------------- */

/* Random frames (0 .. 300 KiB, and sizes near a small max_len) fed in random splits. */
static void test_feed_roundtrip_random_splits(void)
{
    for (int round = 0; round < 120; round++) {
        int small = round % 3 == 0;
        size_t max_len = small ? 1 + rnd_below(64) : 300 * 1024 + rnd_below(4);
        blobs want = {0}, got = {0};
        ch_rx *rx = NULL;
        size_t nframes = rnd_below(small ? 200 : 12);
        for (size_t i = 0; i < nframes; i++)
            blobs_add_random(&want, rnd_size(max_len));
        size_t total;
        uint8_t *s = encode(&want, &total);
        REQUIRE(ch_rx_new(max_len, &rx) == 0);
        int r = feed_split(rx, s, total, max_len, &got, 0);
        CHECK_EQ(r, 0);
        CHECK_EQ(ch_rx_eof(rx), CH_ERR_EOF);
        CHECK(blobs_equal(&want, &got));
    out:
        ch_rx_free(rx);
        free(s);
        blobs_free(&want);
        blobs_free(&got);
        if (g_fail)
            return;
    }
}

/* Every frame survives one-byte-at-a-time delivery, through ch_rx_feed and a socket. */
static void test_one_byte_at_a_time(void)
{
    blobs want = {0}, got = {0}, got2 = {0};
    ch_rx *rx = NULL, *rx2 = NULL;
    int fds[2] = {-1, -1};
    size_t sizes[] = {0, 1, 7, 8, 9, 300, 0, 5000};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        blobs_add_random(&want, sizes[i]);
    size_t total;
    uint8_t *s = encode(&want, &total);
    REQUIRE(ch_rx_new(5000, &rx) == 0);
    CHECK_EQ(feed_split(rx, s, total, 5000, &got, 1), 0);
    CHECK_EQ(ch_rx_eof(rx), CH_ERR_EOF);
    CHECK(blobs_equal(&want, &got));

    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(5000, &rx2) == 0);
    for (size_t i = 0; i < total; i++) {
        REQUIRE(write(fds[0], s + i, 1) == 1);
        int n = ch_rx_read(rx2, fds[1]);
        CHECK(n == 0 || n == 1);
        collect(rx2, n > 0 ? n : 0, 5000, &got2);
        CHECK_EQ(ch_rx_read(rx2, fds[1]), 0); /* nothing more: would block */
    }
    close(fds[0]);
    fds[0] = -1;
    CHECK_EQ(drain(rx2, fds[1], 5000, &got2), CH_ERR_EOF);
    CHECK(blobs_equal(&want, &got2));
out:
    close_pair(fds);
    ch_rx_free(rx);
    ch_rx_free(rx2);
    free(s);
    blobs_free(&want);
    blobs_free(&got);
    blobs_free(&got2);
}

/* Random frames written with write(2) in random chunk sizes arrive intact and in order. */
static void test_socket_roundtrip_raw_writes(void)
{
    for (int round = 0; round < 60; round++) {
        int small = round % 3 == 0;
        size_t max_len = small ? 1 + rnd_below(64) : 300 * 1024;
        blobs want = {0}, got = {0};
        ch_rx *rx = NULL;
        int fds[2] = {-1, -1};
        size_t nframes = rnd_below(small ? 200 : 10);
        for (size_t i = 0; i < nframes; i++)
            blobs_add_random(&want, rnd_size(max_len));
        size_t total;
        uint8_t *s = encode(&want, &total);
        REQUIRE(new_pair(fds) == 0);
        REQUIRE(ch_rx_new(max_len, &rx) == 0);
        size_t off = 0;
        long spins = 0;
        while (off < total) {
            ssize_t w = write(fds[0], s + off, rnd_chunk(total - off));
            if (w < 0)
                REQUIRE(errno == EAGAIN);
            else
                off += (size_t)w;
            if (w < 0 || rnd_below(3) == 0) /* let bytes pile up sometimes */
                CHECK_EQ(drain(rx, fds[1], max_len, &got), 0);
            REQUIRE(++spins < 10000000);
        }
        close(fds[0]);
        fds[0] = -1;
        CHECK_EQ(drain(rx, fds[1], max_len, &got), CH_ERR_EOF);
        CHECK(blobs_equal(&want, &got));
    out:
        close_pair(fds);
        ch_rx_free(rx);
        free(s);
        blobs_free(&want);
        blobs_free(&got);
        if (g_fail)
            return;
    }
}

/* Frames sent with ch_tx_send/ch_tx_flush arrive intact and in order, whatever the reader's pace. */
static void test_socket_roundtrip_tx(void)
{
    for (int round = 0; round < 40; round++) {
        size_t max_len = round % 2 ? 1 + rnd_below(64) : 400 * 1024;
        blobs want = {0}, got = {0};
        ch_rx *rx = NULL;
        ch_tx *tx = NULL;
        int fds[2] = {-1, -1};
        REQUIRE(new_pair(fds) == 0);
        REQUIRE(ch_rx_new(max_len, &rx) == 0);
        REQUIRE(ch_tx_new(&tx) == 0);
        size_t nframes = rnd_below(round % 2 ? 300 : 16);
        for (size_t i = 0; i < nframes; i++) {
            blobs_add_random(&want, rnd_size(max_len));
            int64_t q = ch_tx_send(tx, fds[0], want.v[i].p, want.v[i].len, max_len);
            REQUIRE(q >= 0);
            CHECK_EQ(q, ch_tx_pending(tx));
            if (rnd_below(2))
                CHECK_EQ(drain(rx, fds[1], max_len, &got), 0);
        }
        long spins = 0;
        while (ch_tx_pending(tx)) {
            CHECK_EQ(drain(rx, fds[1], max_len, &got), 0);
            int64_t q = ch_tx_flush(tx, fds[0]);
            REQUIRE(q >= 0);
            CHECK_EQ(q, ch_tx_pending(tx));
            REQUIRE(++spins < 1000000);
        }
        close(fds[0]);
        fds[0] = -1;
        CHECK_EQ(drain(rx, fds[1], max_len, &got), CH_ERR_EOF);
        CHECK(blobs_equal(&want, &got));
    out:
        close_pair(fds);
        ch_rx_free(rx);
        ch_tx_free(tx);
        blobs_free(&want);
        blobs_free(&got);
        if (g_fail)
            return;
    }
}

/* A writer process using random chunk sizes and a reader polling with ch_rx_read agree on every frame. */
static void test_socket_roundtrip_two_processes(void)
{
    const size_t max_len = 256 * 1024;
    blobs want = {0}, got = {0};
    ch_rx *rx = NULL;
    int fds[2] = {-1, -1};
    pid_t pid = -1;
    for (int i = 0; i < 300; i++)
        blobs_add_random(&want, rnd_size(i % 10 ? 2000 : max_len));
    size_t total;
    uint8_t *s = encode(&want, &total);
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(max_len, &rx) == 0);
    uint64_t child_seed = rnd();
    pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        close(fds[1]);
        g_rng = child_seed | 1;
        size_t off = 0;
        while (off < total) {
            ssize_t w = write(fds[0], s + off, rnd_chunk(total - off));
            if (w > 0) {
                off += (size_t)w;
            } else if (w < 0 && errno == EAGAIN) {
                struct pollfd p = {fds[0], POLLOUT, 0};
                poll(&p, 1, 1000);
            } else if (w < 0 && errno != EINTR) {
                _exit(3);
            }
        }
        _exit(0);
    }
    close(fds[0]);
    fds[0] = -1;
    int r;
    for (;;) {
        r = drain(rx, fds[1], max_len, &got);
        if (r != 0)
            break;
        struct pollfd p = {fds[1], POLLIN, 0};
        REQUIRE(poll(&p, 1, 20000) == 1);
    }
    CHECK_EQ(r, CH_ERR_EOF);
    CHECK(blobs_equal(&want, &got));
out:
    if (pid > 0) {
        int st = 0;
        waitpid(pid, &st, 0);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    close_pair(fds);
    ch_rx_free(rx);
    free(s);
    blobs_free(&want);
    blobs_free(&got);
}

/* A frame larger than the default buffer (and larger than the socket buffer) round-trips, then small ones still do. */
static void test_large_frame_then_small(void)
{
    const size_t max_len = 3 * 1024 * 1024;
    blobs want = {0}, got = {0}, got2 = {0};
    ch_rx *rx = NULL, *rx2 = NULL;
    ch_tx *tx = NULL;
    int fds[2] = {-1, -1};
    blobs_add_random(&want, max_len);
    for (int i = 0; i < 20; i++)
        blobs_add_random(&want, rnd_size(100));
    blobs_add_random(&want, 1024 * 1024 + 3);
    blobs_add_random(&want, 5);
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(max_len, &rx) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    for (size_t i = 0; i < want.n; i++)
        REQUIRE(ch_tx_push(tx, want.v[i].p, want.v[i].len, max_len) >= 0);
    long spins = 0;
    for (;;) {
        int64_t q = ch_tx_flush(tx, fds[0]);
        REQUIRE(q >= 0);
        CHECK_EQ(drain(rx, fds[1], max_len, &got), 0);
        if (q == 0)
            break;
        REQUIRE(++spins < 1000000);
    }
    CHECK_EQ(drain(rx, fds[1], max_len, &got), 0);
    CHECK(blobs_equal(&want, &got));

    size_t total;
    uint8_t *s = encode(&want, &total);
    REQUIRE(ch_rx_new(max_len, &rx2) == 0);
    CHECK_EQ(feed_split(rx2, s, total, max_len, &got2, 0), 0);
    CHECK_EQ(ch_rx_eof(rx2), CH_ERR_EOF);
    CHECK(blobs_equal(&want, &got2));
    free(s);
out:
    close_pair(fds);
    ch_rx_free(rx);
    ch_rx_free(rx2);
    ch_tx_free(tx);
    blobs_free(&want);
    blobs_free(&got);
    blobs_free(&got2);
}

/* ch_rx_read returns 0 only when the socket would block: never after a recv that left a frame incomplete with more to read. */
static void test_read_zero_means_would_block(void)
{
    ch_rx *rx = NULL;
    int fds[2] = {-1, -1};
    uint8_t *s = NULL;
    /* (a) header and part of the payload, then the writer closes: the first
     * call already sees the end (TRUNCATED), it does not return 0 */
    uint8_t h[CH_FRAME_HEADER + 5];
    put_hdr(h, 10);
    memset(h + CH_FRAME_HEADER, 'p', 5);
    for (size_t cut = 1; cut <= sizeof h; cut++) {
        REQUIRE(new_pair(fds) == 0);
        REQUIRE(ch_rx_new(64, &rx) == 0);
        REQUIRE(write(fds[0], h, cut) == (ssize_t)cut);
        close(fds[0]);
        fds[0] = -1;
        CHECK_EQ(ch_rx_read(rx, fds[1]), CH_ERR_TRUNCATED);
        close(fds[1]);
        fds[1] = -1;
        ch_rx_free(rx);
        rx = NULL;
    }
    /* (b) a frame larger than the default receive buffer, all of it in the
     * socket: handed out by the first call (needs a socket buffer that holds
     * it: SO_SNDBUFFORCE as root, else SO_SNDBUF up to wmem_max) */
    const size_t len = 300 * 1024;
    blobs want = {0}, got = {0};
    blobs_add_random(&want, len);
    size_t total;
    s = encode(&want, &total);
    REQUIRE(new_pair(fds) == 0);
    int sz = 4 << 20;
    if (setsockopt(fds[0], SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof sz) != 0)
        setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
    size_t off = 0;
    while (off < total) {
        ssize_t w = write(fds[0], s + off, total - off);
        if (w < 0)
            break;
        off += (size_t)w;
    }
    REQUIRE(ch_rx_new(len, &rx) == 0);
    int n = ch_rx_read(rx, fds[1]);
    if (off == total) {
        CHECK_EQ(n, 1);
    } else {
        printf("     (b) skipped: the socket buffered only %zu of %zu bytes\n", off, total);
        CHECK(n == 0 ? unread(fds[1]) == 0 : n == 1);
    }
    collect(rx, n > 0 ? n : 0, len, &got);
    if (n > 0)
        CHECK(blobs_equal(&want, &got));
    blobs_free(&want);
    blobs_free(&got);
out:
    close_pair(fds);
    ch_rx_free(rx);
    free(s);
}

/* ---- batching ---------------------------------------------------------------- */

/* 1000 frames that arrive in one recv are all handed out by one ch_rx_read call. */
static void test_thousand_frames_one_read(void)
{
    blobs want = {0}, got = {0};
    ch_rx *rx = NULL;
    ch_tx *tx = NULL;
    int fds[2] = {-1, -1};
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(64, &rx) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    size_t queued = 0;
    for (int i = 0; i < 1000; i++) {
        blobs_add_random(&want, rnd_below(41));
        queued += CH_FRAME_HEADER + want.v[i].len;
        CHECK_EQ(ch_tx_push(tx, want.v[i].p, want.v[i].len, 64), queued);
    }
    CHECK_EQ(ch_tx_pending(tx), queued);
    CHECK_EQ(ch_tx_flush(tx, fds[0]), 0); /* one flush takes them all */
    CHECK_EQ(unread(fds[1]), queued);
    int n = ch_rx_read(rx, fds[1]);
    CHECK_EQ(n, 1000);
    collect(rx, n > 0 ? n : 0, 64, &got);
    CHECK_EQ(ch_rx_read(rx, fds[1]), 0);
    CHECK(blobs_equal(&want, &got));
out:
    close_pair(fds);
    ch_rx_free(rx);
    ch_tx_free(tx);
    blobs_free(&want);
    blobs_free(&got);
}

/* More than CH_RX_MAX_FRAMES complete frames come out in capped batches without another recv. */
static void test_frames_cap_per_call(void)
{
    const int total_frames = 2 * CH_RX_MAX_FRAMES + 452;
    blobs want = {0}, got = {0}, got2 = {0};
    ch_rx *rx = NULL, *rx2 = NULL;
    int fds[2] = {-1, -1};
    for (int i = 0; i < total_frames; i++)
        blobs_add_random(&want, rnd_below(21));
    size_t total;
    uint8_t *s = encode(&want, &total);
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(64, &rx) == 0);
    REQUIRE(write_all(fds[0], s, total) == 0);
    CHECK_EQ(unread(fds[1]), total);
    int n = ch_rx_read(rx, fds[1]);
    CHECK_EQ(n, CH_RX_MAX_FRAMES);
    collect(rx, n > 0 ? n : 0, 64, &got);
    CHECK_EQ(unread(fds[1]), 0); /* one recv took everything */
    n = ch_rx_read(rx, fds[1]);
    CHECK_EQ(n, CH_RX_MAX_FRAMES);
    collect(rx, n > 0 ? n : 0, 64, &got);
    n = ch_rx_read(rx, fds[1]);
    CHECK_EQ(n, 452);
    collect(rx, n > 0 ? n : 0, 64, &got);
    CHECK_EQ(ch_rx_read(rx, fds[1]), 0);
    CHECK(blobs_equal(&want, &got));

    /* the same through ch_rx_feed: one call takes all bytes, frames come capped */
    REQUIRE(ch_rx_new(64, &rx2) == 0);
    size_t used = 0;
    n = ch_rx_feed(rx2, s, total, &used);
    CHECK_EQ(n, CH_RX_MAX_FRAMES);
    CHECK_EQ(used, total);
    collect(rx2, n > 0 ? n : 0, 64, &got2);
    while ((n = ch_rx_feed(rx2, NULL, 0, &used)) > 0)
        collect(rx2, n, 64, &got2);
    CHECK_EQ(n, 0);
    CHECK(blobs_equal(&want, &got2));
out:
    close_pair(fds);
    ch_rx_free(rx);
    ch_rx_free(rx2);
    free(s);
    blobs_free(&want);
    blobs_free(&got);
    blobs_free(&got2);
}

/* ch_tx_push queues frames without writing; one flush then sends the whole batch. */
static void test_push_batch_then_flush(void)
{
    blobs want = {0}, got = {0};
    ch_rx *rx = NULL;
    ch_tx *tx = NULL;
    int fds[2] = {-1, -1};
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(4096, &rx) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    size_t queued = 0;
    for (int i = 0; i < 50; i++) {
        blobs_add_random(&want, rnd_size(4096));
        queued += CH_FRAME_HEADER + want.v[i].len;
        CHECK_EQ(ch_tx_push(tx, want.v[i].p, want.v[i].len, 4096), queued);
        CHECK_EQ(unread(fds[1]), 0); /* push never writes */
    }
    CHECK_EQ(ch_tx_flush(tx, fds[0]), 0);
    CHECK_EQ(ch_tx_pending(tx), 0);
    CHECK_EQ(unread(fds[1]), queued);
    CHECK_EQ(drain(rx, fds[1], 4096, &got), 0);
    CHECK(blobs_equal(&want, &got));
    CHECK_EQ(ch_tx_flush(tx, fds[0]), 0); /* flushing an empty queue is a no-op */
out:
    close_pair(fds);
    ch_rx_free(rx);
    ch_tx_free(tx);
    blobs_free(&want);
    blobs_free(&got);
}

/* ---- partial writes ----------------------------------------------------------- */

/* When the socket fills, ch_tx_send queues the rest; flushing while the peer reads delivers every byte in order. */
static void test_partial_writes_then_flush(void)
{
    const size_t max_len = 200 * 1024;
    blobs want = {0}, got = {0};
    ch_rx *rx = NULL;
    ch_tx *tx = NULL;
    int fds[2] = {-1, -1};
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(max_len, &rx) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    int64_t q = 0;
    int i = 0;
    while (q == 0) { /* fill the socket */
        REQUIRE(i < 10000);
        blobs_add_random(&want, rnd_size(max_len));
        q = ch_tx_send(tx, fds[0], want.v[i].p, want.v[i].len, max_len);
        REQUIRE(q >= 0);
        i++;
    }
    CHECK(q > 0);
    CHECK_EQ(ch_tx_pending(tx), q);
    for (int k = 0; k < 8; k++, i++) { /* these queue behind the rest, in order */
        blobs_add_random(&want, rnd_size(max_len));
        q = ch_tx_send(tx, fds[0], want.v[i].p, want.v[i].len, max_len);
        CHECK(q > 0);
        CHECK_EQ(ch_tx_pending(tx), q);
    }
    long spins = 0;
    while (q > 0) {
        CHECK_EQ(drain(rx, fds[1], max_len, &got), 0);
        int64_t q2 = ch_tx_flush(tx, fds[0]);
        REQUIRE(q2 >= 0);
        CHECK(q2 <= q || q2 == 0);
        q = q2;
        CHECK_EQ(ch_tx_pending(tx), q);
        REQUIRE(++spins < 1000000);
    }
    CHECK_EQ(drain(rx, fds[1], max_len, &got), 0);
    CHECK(blobs_equal(&want, &got));
out:
    close_pair(fds);
    ch_rx_free(rx);
    ch_tx_free(tx);
    blobs_free(&want);
    blobs_free(&got);
}

/* A socket already full makes ch_tx_send queue the whole frame, header included. */
static void test_send_on_full_socket_queues_whole_frame(void)
{
    blobs want = {0}, got = {0};
    ch_rx *rx = NULL;
    ch_tx *tx = NULL;
    int fds[2] = {-1, -1};
    uint8_t *filler = NULL;
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(1 << 20, &rx) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    /* fill with one big frame written by hand, then a few bytes more */
    blobs_add_random(&want, 1 << 20);
    size_t total;
    filler = encode(&want, &total);
    size_t off = 0;
    for (;;) {
        ssize_t w = write(fds[0], filler + off, total - off);
        if (w < 0) {
            REQUIRE(errno == EAGAIN);
            break;
        }
        off += (size_t)w;
        REQUIRE(off < total);
    }
    blobs_add_random(&want, 10);
    int64_t q = ch_tx_send(tx, fds[0], want.v[1].p, 10, 100);
    CHECK_EQ(q, CH_FRAME_HEADER + 10);
    long spins = 0;
    while (off < total || q > 0) {
        CHECK_EQ(drain(rx, fds[1], 1 << 20, &got), 0);
        if (off < total) {
            ssize_t w = write(fds[0], filler + off, total - off);
            if (w > 0)
                off += (size_t)w;
        } else {
            q = ch_tx_flush(tx, fds[0]);
            REQUIRE(q >= 0);
        }
        REQUIRE(++spins < 1000000);
    }
    CHECK_EQ(drain(rx, fds[1], 1 << 20, &got), 0);
    CHECK(blobs_equal(&want, &got));
out:
    close_pair(fds);
    ch_rx_free(rx);
    ch_tx_free(tx);
    free(filler);
    blobs_free(&want);
    blobs_free(&got);
}

/* ---- limits ------------------------------------------------------------------- */

/* A payload over max_len gives -EMSGSIZE from send and push, queues nothing, and the queue stays usable. */
static void test_msgsize_rejected_queue_usable(void)
{
    blobs want = {0}, got = {0};
    ch_rx *rx = NULL;
    ch_tx *tx = NULL;
    int fds[2] = {-1, -1};
    uint8_t big[101];
    memset(big, 0xab, sizeof big);
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(100, &rx) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    CHECK_EQ(ch_tx_send(tx, fds[0], big, 101, 100), -EMSGSIZE);
    CHECK_EQ(ch_tx_pending(tx), 0);
    CHECK_EQ(unread(fds[1]), 0);
    CHECK_EQ(ch_tx_push(tx, big, 101, 100), -EMSGSIZE);
    CHECK_EQ(ch_tx_pending(tx), 0);
    /* beyond the hard ceiling even when the caller's max_len allows it (payload never read) */
    CHECK_EQ(ch_tx_push(tx, big, (size_t)CH_FRAME_MAX_LIMIT + 1, SIZE_MAX), -EMSGSIZE);
    CHECK_EQ(ch_tx_send(tx, fds[0], big, (size_t)CH_FRAME_MAX_LIMIT + 1, SIZE_MAX), -EMSGSIZE);
    CHECK_EQ(ch_tx_pending(tx), 0);
    /* with bytes queued, the rejection leaves the queue as it was */
    blobs_add_random(&want, 100);
    CHECK_EQ(ch_tx_push(tx, want.v[0].p, 100, 100), CH_FRAME_HEADER + 100);
    CHECK_EQ(ch_tx_send(tx, fds[0], big, 101, 100), -EMSGSIZE);
    CHECK_EQ(ch_tx_push(tx, big, 101, 100), -EMSGSIZE);
    CHECK_EQ(ch_tx_pending(tx), CH_FRAME_HEADER + 100);
    blobs_add_random(&want, 0);
    CHECK_EQ(ch_tx_send(tx, fds[0], want.v[1].p, 0, 100), 0); /* flushes both */
    blobs_add_random(&want, 100);
    CHECK_EQ(ch_tx_send(tx, fds[0], want.v[2].p, 100, 100), 0); /* exactly max_len is fine */
    CHECK_EQ(drain(rx, fds[1], 100, &got), 0);
    CHECK(blobs_equal(&want, &got));
out:
    close_pair(fds);
    ch_rx_free(rx);
    ch_tx_free(tx);
    blobs_free(&want);
    blobs_free(&got);
}

/* ch_rx_new accepts 1 .. CH_FRAME_MAX_LIMIT only; the free functions accept NULL. */
static void test_rx_new_bounds(void)
{
    ch_rx *rx = NULL;
    CHECK_EQ(ch_rx_new(0, &rx), -EINVAL);
    CHECK_EQ(ch_rx_new((size_t)CH_FRAME_MAX_LIMIT + 1, &rx), -EINVAL);
    CHECK_EQ(ch_rx_new(SIZE_MAX, &rx), -EINVAL);
    CHECK_EQ(ch_rx_new(CH_FRAME_MAX_LIMIT, &rx), 0);
    ch_rx_free(rx);
    rx = NULL;
    CHECK_EQ(ch_rx_new(1, &rx), 0);
    ch_rx_free(rx);
    ch_rx_free(NULL);
    ch_tx_free(NULL);
}

/* A header declaring more than max_len is TOOBIG as soon as the header is in, before anything is allocated for it. */
static void test_toobig_before_allocation(void)
{
    ch_rx *rx = NULL, *ctl = NULL;
    int fds[2] = {-1, -1};
    uint8_t h[CH_FRAME_HEADER], pay[1000];
    memset(pay, 7, sizeof pay);
    const uint32_t declared[] = {0x80000000u, 0xffffffffu, CH_FRAME_MAX_LIMIT, (1u << 20) + 1};
    for (size_t k = 0; k < sizeof declared / sizeof declared[0]; k++) {
        put_hdr(h, declared[k]);
        REQUIRE(ch_rx_new(1 << 20, &rx) == 0);
        size_t before = heap_in_use(), used = 0;
        CHECK_EQ(ch_rx_feed(rx, h, sizeof h, &used), CH_ERR_TOOBIG);
        CHECK_EQ(used, sizeof h);
        CHECK_EQ(ch_rx_feed(rx, pay, sizeof pay, &used), CH_ERR_TOOBIG);
        CHECK_EQ(used, 0); /* the payload is not taken */
        size_t after = heap_in_use();
        CHECK(after < before + (1u << 20)); /* only the default buffer, if anything */
        ch_rx_free(rx);
        rx = NULL;
    }
    /* positive control: a legal large header does make the buffer grow */
    REQUIRE(ch_rx_new(64u << 20, &ctl) == 0);
    {
        put_hdr(h, 32u << 20);
        size_t before = heap_in_use(), used = 0;
        CHECK_EQ(ch_rx_feed(ctl, h, sizeof h, &used), 0);
        CHECK_EQ(ch_rx_feed(ctl, pay, 1, &used), 0);
        CHECK(heap_in_use() >= before + (32u << 20));
        CHECK_EQ(ch_rx_eof(ctl), CH_ERR_TRUNCATED);
    }

    /* through a socket: TOOBIG without receiving the payload behind the header */
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(1 << 20, &rx) == 0);
    put_hdr(h, 0x80000000u);
    REQUIRE(write(fds[0], h, sizeof h) == (ssize_t)sizeof h);
    CHECK_EQ(ch_rx_read(rx, fds[1]), CH_ERR_TOOBIG);
    REQUIRE(write(fds[0], pay, sizeof pay) == (ssize_t)sizeof pay);
    CHECK_EQ(ch_rx_read(rx, fds[1]), CH_ERR_TOOBIG);
    CHECK_EQ(unread(fds[1]), sizeof pay);
out:
    close_pair(fds);
    ch_rx_free(rx);
    ch_rx_free(ctl);
}

/* A frame of exactly max_len is accepted and max_len + 1 is TOOBIG, after the frames before it. */
static void test_max_len_boundary(void)
{
    for (size_t max_len = 1; max_len < 40; max_len++) {
        blobs want = {0}, got = {0};
        ch_rx *rx = NULL;
        blobs_add_random(&want, max_len);
        blobs_add_random(&want, 0);
        blobs_add_random(&want, max_len - 1);
        size_t total;
        uint8_t *s = encode(&want, &total);
        uint8_t *s2 = malloc(total + CH_FRAME_HEADER + max_len + 1);
        if (!s2)
            abort();
        memcpy(s2, s, total);
        put_hdr(s2 + total, (uint32_t)max_len + 1);
        memset(s2 + total + CH_FRAME_HEADER, 1, max_len + 1);
        REQUIRE(ch_rx_new(max_len, &rx) == 0);
        CHECK_EQ(feed_split(rx, s2, total + CH_FRAME_HEADER + max_len + 1, max_len, &got, 0),
                 CH_ERR_TOOBIG);
        CHECK(blobs_equal(&want, &got));
        size_t used;
        CHECK_EQ(ch_rx_feed(rx, NULL, 0, &used), CH_ERR_TOOBIG); /* and it stays so */
    out:
        ch_rx_free(rx);
        free(s);
        free(s2);
        blobs_free(&want);
        blobs_free(&got);
        if (g_fail)
            return;
    }
}

/* ---- malformed headers ------------------------------------------------------- */

/* Any corruption of the magic or the reserved bytes is MALFORMED, reported after the good frames before it. */
static void test_malformed_header(void)
{
    for (int byte = 0; byte < 4; byte++) {
        for (int bit = 0; bit < 8; bit++) {
            blobs want = {0}, got = {0};
            ch_rx *rx = NULL;
            blobs_add_random(&want, 5);
            blobs_add_random(&want, 0);
            size_t total;
            uint8_t *s = encode(&want, &total);
            uint8_t *s2 = malloc(total + CH_FRAME_HEADER + 3);
            if (!s2)
                abort();
            memcpy(s2, s, total);
            put_hdr(s2 + total, 3);
            s2[total + byte] ^= (uint8_t)(1u << bit);
            memset(s2 + total + CH_FRAME_HEADER, 0, 3);
            REQUIRE(ch_rx_new(64, &rx) == 0);
            CHECK_EQ(feed_split(rx, s2, total + CH_FRAME_HEADER + 3, 64, &got, 0),
                     CH_ERR_MALFORMED);
            CHECK(blobs_equal(&want, &got));
            size_t used;
            CHECK_EQ(ch_rx_feed(rx, s2, 1, &used), CH_ERR_MALFORMED); /* sticky */
            CHECK_EQ(used, 0);
        out:
            ch_rx_free(rx);
            free(s);
            free(s2);
            blobs_free(&want);
            blobs_free(&got);
            if (g_fail)
                return;
        }
    }
}

/* Good frames and a malformed header in one recv: frames first, MALFORMED on the next call. */
static void test_malformed_after_frames_socket(void)
{
    blobs want = {0}, got = {0};
    ch_rx *rx = NULL;
    int fds[2] = {-1, -1};
    for (int i = 0; i < 3; i++)
        blobs_add_random(&want, 10 + i);
    size_t total;
    uint8_t *s = encode(&want, &total);
    uint8_t bad[CH_FRAME_HEADER] = {'X', 'X', 0, 0, 0, 0, 0, 0};
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(64, &rx) == 0);
    REQUIRE(write_all(fds[0], s, total) == 0);
    REQUIRE(write_all(fds[0], bad, sizeof bad) == 0);
    int n = ch_rx_read(rx, fds[1]);
    CHECK_EQ(n, 3);
    collect(rx, n > 0 ? n : 0, 64, &got);
    CHECK(blobs_equal(&want, &got));
    CHECK_EQ(ch_rx_read(rx, fds[1]), CH_ERR_MALFORMED);
    CHECK_EQ(ch_rx_read(rx, fds[1]), CH_ERR_MALFORMED);
out:
    close_pair(fds);
    ch_rx_free(rx);
    free(s);
    blobs_free(&want);
    blobs_free(&got);
}

/* ---- end of stream ------------------------------------------------------------ */

/* Closing the writer between frames is EOF, mid-header or mid-payload is TRUNCATED, each after the complete frames. */
static void test_eof_variants_socket(void)
{
    /* cut = bytes of the last frame (header 8 + payload 20) that are sent */
    const size_t cuts[] = {0, 1, 3, 7, 8, 9, 27, 28};
    for (size_t c = 0; c < sizeof cuts / sizeof cuts[0]; c++) {
        for (int how = 0; how < 2; how++) { /* close(), shutdown(SHUT_WR) */
            blobs want = {0}, got = {0};
            ch_rx *rx = NULL;
            int fds[2] = {-1, -1};
            blobs_add_random(&want, 4);
            blobs_add_random(&want, 0);
            blobs_add_random(&want, 20);
            size_t total;
            uint8_t *s = encode(&want, &total);
            size_t send = total - 28 + cuts[c];
            int complete = cuts[c] == 28;
            if (!complete)
                want.n--, free(want.v[want.n].p);
            REQUIRE(new_pair(fds) == 0);
            REQUIRE(ch_rx_new(64, &rx) == 0);
            REQUIRE(write_all(fds[0], s, send) == 0);
            if (how == 0) {
                close(fds[0]);
                fds[0] = -1;
            } else {
                REQUIRE(shutdown(fds[0], SHUT_WR) == 0);
            }
            int want_code = cuts[c] == 0 || complete ? CH_ERR_EOF : CH_ERR_TRUNCATED;
            CHECK_EQ(drain(rx, fds[1], 64, &got), want_code);
            CHECK(blobs_equal(&want, &got));
            CHECK_EQ(ch_rx_read(rx, fds[1]), want_code); /* and again */
        out:
            close_pair(fds);
            ch_rx_free(rx);
            free(s);
            blobs_free(&want);
            blobs_free(&got);
            if (g_fail)
                return;
        }
    }
}

/* A peer that closes without sending anything gives EOF; an empty frame then close gives the frame, then EOF. */
static void test_eof_immediate_and_empty_frame(void)
{
    ch_rx *rx = NULL;
    int fds[2] = {-1, -1};
    uint8_t h[CH_FRAME_HEADER];
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(16, &rx) == 0);
    CHECK_EQ(ch_rx_read(rx, fds[1]), 0); /* nothing yet: would block */
    close(fds[0]);
    fds[0] = -1;
    CHECK_EQ(ch_rx_read(rx, fds[1]), CH_ERR_EOF);
    close(fds[1]);
    fds[1] = -1;
    ch_rx_free(rx);
    rx = NULL;

    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_rx_new(16, &rx) == 0);
    put_hdr(h, 0);
    REQUIRE(write(fds[0], h, sizeof h) == (ssize_t)sizeof h);
    close(fds[0]);
    fds[0] = -1;
    CHECK_EQ(ch_rx_read(rx, fds[1]), 1);
    CHECK_EQ(ch_rx_frames(rx)[1], 0);
    CHECK_EQ(ch_rx_read(rx, fds[1]), CH_ERR_EOF);
out:
    close_pair(fds);
    ch_rx_free(rx);
}

/* ch_rx_eof says EOF at a frame boundary and TRUNCATED for any partial header or payload fed. */
static void test_eof_verdict_feed(void)
{
    blobs want = {0}, got = {0};
    ch_rx *rx = NULL;
    blobs_add_random(&want, 30);
    size_t total;
    uint8_t *s = encode(&want, &total);
    for (size_t cut = 0; cut <= total; cut++) {
        REQUIRE(ch_rx_new(64, &rx) == 0);
        CHECK_EQ(ch_rx_eof(rx), CH_ERR_EOF);
        CHECK_EQ(feed_split(rx, s, cut, 64, &got, 0), 0);
        CHECK_EQ(ch_rx_eof(rx), cut == 0 || cut == total ? CH_ERR_EOF : CH_ERR_TRUNCATED);
        ch_rx_free(rx);
        rx = NULL;
    }
    CHECK_EQ(got.n, 1);
out:
    ch_rx_free(rx);
    free(s);
    blobs_free(&want);
    blobs_free(&got);
}

/* ---- peer gone ------------------------------------------------------------------ */

/* Child process body: returns 0 when every send to a closed peer gave -EPIPE/-ECONNRESET. */
static int epipe_child(int fd, int peer_to_close)
{
    ch_tx *tx = NULL;
    uint8_t pay[64] = {1, 2, 3};
    int bad = 0;
    signal(SIGPIPE, SIG_DFL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGPIPE);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    if (peer_to_close >= 0)
        close(peer_to_close);
    if (ch_tx_new(&tx) != 0)
        return 1;
    int64_t r = ch_tx_send(tx, fd, pay, sizeof pay, 100);
    if (r != -EPIPE && r != -ECONNRESET)
        bad |= 2;
    /* again: push then flush */
    ch_tx_free(tx);
    if (ch_tx_new(&tx) != 0)
        return 1;
    if (ch_tx_push(tx, pay, sizeof pay, 100) <= 0)
        bad |= 4;
    r = ch_tx_flush(tx, fd);
    if (r != -EPIPE && r != -ECONNRESET)
        bad |= 8;
    ch_tx_free(tx);
    return bad;
}

/* With SIGPIPE at its default action, sending to a closed peer returns EPIPE and the process lives. */
static void test_epipe_sigpipe_default(void)
{
    for (int variant = 0; variant < 2; variant++) {
        int fds[2] = {-1, -1};
        REQUIRE(new_pair(fds) == 0);
        pid_t pid = fork();
        REQUIRE(pid >= 0);
        if (pid == 0) {
            /* variant 0: the child's own pair, peer closed by the child; 1: the peer is
             * closed by another process (the parent) */
            int code;
            if (variant == 0) {
                int own[2];
                close(fds[0]);
                close(fds[1]);
                if (ch_socketpair(own) != 0)
                    _exit(21);
                code = epipe_child(own[0], own[1]);
            } else {
                close(fds[1]);
                char c;
                struct pollfd p = {fds[0], POLLIN, 0};
                poll(&p, 1, 20000); /* the parent closing its end wakes us (EOF) */
                if (read(fds[0], &c, 1) != 0)
                    _exit(20);
                code = epipe_child(fds[0], -1);
            }
            _exit(code == 0 ? 42 : 10 + code);
        }
        close(fds[0]);
        close(fds[1]);
        int st = 0;
        REQUIRE(waitpid(pid, &st, 0) == pid);
        if (WIFSIGNALED(st))
            fprintf(stderr, "[%s] child killed by signal %d\n", g_test, WTERMSIG(st));
        CHECK(WIFEXITED(st));
        CHECK_EQ(WIFEXITED(st) ? WEXITSTATUS(st) : -1, 42);
    out:;
    }
}

/* A writer with bytes queued on a full socket gets EPIPE from flush when the reader goes away. */
static void test_epipe_with_queued_bytes(void)
{
    int fds[2] = {-1, -1};
    ch_tx *tx = NULL;
    uint8_t *pay = calloc(1, 128 * 1024);
    void (*old)(int) = signal(SIGPIPE, SIG_DFL);
    REQUIRE(pay != NULL);
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    int64_t q = 0;
    for (int i = 0; q == 0; i++) {
        REQUIRE(i < 1000);
        q = ch_tx_send(tx, fds[0], pay, 128 * 1024, 128 * 1024);
        REQUIRE(q >= 0);
    }
    close(fds[1]);
    fds[1] = -1;
    int64_t r = ch_tx_flush(tx, fds[0]);
    CHECK(r == -EPIPE || r == -ECONNRESET);
    r = ch_tx_send(tx, fds[0], pay, 10, 100);
    CHECK(r == -EPIPE || r == -ECONNRESET);
out:
    signal(SIGPIPE, old);
    close_pair(fds);
    ch_tx_free(tx);
    free(pay);
}

/* ch_socketpair gives close-on-exec, non-blocking, connected stream descriptors. */
static void test_socketpair_flags(void)
{
    int fds[2] = {-1, -1};
    REQUIRE(new_pair(fds) == 0);
    for (int i = 0; i < 2; i++) {
        CHECK(fcntl(fds[i], F_GETFD) & FD_CLOEXEC);
        CHECK(fcntl(fds[i], F_GETFL) & O_NONBLOCK);
        int type = 0;
        socklen_t sl = sizeof type;
        CHECK(getsockopt(fds[i], SOL_SOCKET, SO_TYPE, &type, &sl) == 0 && type == SOCK_STREAM);
    }
out:
    close_pair(fds);
}

/* ---- posting and the writer thread ------------------------------------------------ */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void sleep_us(long us)
{
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* xorshift64* on caller-owned state, for threads (g_rng is the main thread's). */
static uint64_t xs(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545F4914F6CDD1DULL;
}

/*
 * A sendmsg hook.  This definition overrides the C library's for frame.c
 * (linked into this executable), so a test can make the writer thread's
 * sendmsg calls on one socket slow and partial, and watch for direct writes
 * that would interleave with them.  While off, or on another fd, it is a
 * plain sendmsg.
 */
static struct {
    int on;                 /* (atomic) active, on socket fd */
    int fd;
    long wsleep_min_us;     /* the writer sleeps this long (random in [min, max]) in each call */
    long wsleep_max_us;
    int cap;                /* write a random part of what each call offers, now and then */
    int busy;               /* (atomic) the writer thread is inside sendmsg on fd */
    int gate;               /* (atomic) while set, the writer waits in there (busy) before its sleep */
    /* (atomic) counters: */
    long wcalls;            /* the writer's calls */
    long wpartial;          /* ... that wrote less than offered */
    long overlap;           /* ... with a poster's call completed while in them */
    long overlap_partial;   /* ... both */
    long mutated;           /* the writer's bytes changed while it wrote them (a race) */
    long clash;             /* another thread's sendmsg on fd while the writer was in one */
} H;

/* (atomic) ch_tx calls completed by the posters of the multi-thread tests */
static uint64_t g_calls_done;

static __thread int t_is_writer = -1;
static __thread uint64_t t_rng;

static uint32_t iov_sum(const struct iovec *iov, size_t cnt)
{
    uint32_t h = 2166136261u; /* FNV-1a: reads every byte (ASan and TSan see the reads) */
    for (size_t i = 0; i < cnt; i++)
        for (size_t k = 0; k < iov[i].iov_len; k++)
            h = (h ^ ((const uint8_t *)iov[i].iov_base)[k]) * 16777619u;
    return h;
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags)
{
    if (!__atomic_load_n(&H.on, __ATOMIC_ACQUIRE) || fd != H.fd)
        return syscall(SYS_sendmsg, fd, msg, flags);
    if (t_is_writer < 0) { /* (frame.c names its writer before the writer does anything) */
        char name[16] = "";
        prctl(PR_GET_NAME, name);
        t_is_writer = strcmp(name, "ch-writer") == 0;
        t_rng = (uint64_t)(uintptr_t)&t_rng ^ (uint64_t)now_ns() ^ 0x9E3779B97F4A7C15ULL;
        t_rng |= 1;
    }
    /* Offer a random part of the bytes now and then (a forced partial write). */
    struct iovec iov[8];
    struct msghdr m = *msg;
    size_t offered = 0;
    for (size_t i = 0; i < msg->msg_iovlen; i++)
        offered += msg->msg_iov[i].iov_len;
    if (H.cap && msg->msg_iovlen <= 8 && offered > 1 && xs(&t_rng) % 2) {
        size_t want = 1 + xs(&t_rng) % (offered - 1), left = want;
        m.msg_iov = iov;
        m.msg_iovlen = 0;
        for (size_t i = 0; i < msg->msg_iovlen && left > 0; i++) {
            iov[i] = msg->msg_iov[i];
            if (iov[i].iov_len > left)
                iov[i].iov_len = left;
            left -= iov[i].iov_len;
            m.msg_iovlen++;
        }
    }
    if (!t_is_writer) {
        if (__atomic_load_n(&H.busy, __ATOMIC_ACQUIRE))
            __atomic_add_fetch(&H.clash, 1, __ATOMIC_RELAXED);
        return syscall(SYS_sendmsg, fd, &m, flags);
    }
    __atomic_store_n(&H.busy, 1, __ATOMIC_RELEASE);
    while (__atomic_load_n(&H.gate, __ATOMIC_ACQUIRE))
        sleep_us(50);
    uint64_t calls0 = __atomic_load_n(&g_calls_done, __ATOMIC_RELAXED);
    uint32_t sum0 = iov_sum(msg->msg_iov, msg->msg_iovlen);
    long span = H.wsleep_max_us - H.wsleep_min_us;
    sleep_us(H.wsleep_min_us + (span > 0 ? (long)(xs(&t_rng) % (uint64_t)(span + 1)) : 0));
    ssize_t n = syscall(SYS_sendmsg, fd, &m, flags);
    int e = errno;
    if (iov_sum(msg->msg_iov, msg->msg_iovlen) != sum0)
        __atomic_add_fetch(&H.mutated, 1, __ATOMIC_RELAXED);
    int partial = n >= 0 && (size_t)n < offered;
    int overlap = __atomic_load_n(&g_calls_done, __ATOMIC_RELAXED) != calls0;
    __atomic_add_fetch(&H.wcalls, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&H.wpartial, partial, __ATOMIC_RELAXED);
    __atomic_add_fetch(&H.overlap, overlap, __ATOMIC_RELAXED);
    __atomic_add_fetch(&H.overlap_partial, overlap && partial, __ATOMIC_RELAXED);
    __atomic_store_n(&H.busy, 0, __ATOMIC_RELEASE);
    errno = e;
    return n;
}

/* Watch socket fd: the writer sleeps [min_us, max_us] in each sendmsg; cap: partial writes. */
static void hook_on(int fd, long min_us, long max_us, int cap)
{
    H.fd = fd;
    H.wsleep_min_us = min_us;
    H.wsleep_max_us = max_us;
    H.cap = cap;
    __atomic_store_n(&H.wcalls, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&H.wpartial, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&H.overlap, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&H.overlap_partial, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&H.mutated, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&H.clash, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&H.on, 1, __ATOMIC_RELEASE);
}

/* Stop watching (once no writer call on the fd can be in progress: after
 * ch_tx_close; or with the gate open, which this opens). */
static void hook_off(void)
{
    __atomic_store_n(&H.gate, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&H.on, 0, __ATOMIC_RELEASE);
}

static ch_writer_stats wstats(void)
{
    ch_writer_stats st;
    ch_tx_writer_stats(&st);
    return st;
}

/*
 * Wait until at most `limit` bytes are queued on tx, as the Python layer does:
 * flush what the writer thread does not own when the socket takes bytes, and
 * leave the rest to the writer.  Returns 0, -ETIMEDOUT or the send error.
 */
static int settle(ch_tx *tx, int fd, size_t limit, int timeout_ms)
{
    int64_t deadline = now_ns() + (int64_t)timeout_ms * 1000000;
    while (ch_tx_pending(tx) > limit) {
        if (now_ns() > deadline)
            return -ETIMEDOUT;
        if (ch_tx_unowned(tx) > 0) {
            struct pollfd p = {fd, POLLOUT, 0};
            poll(&p, 1, 10);
            int64_t r = ch_tx_flush(tx, fd);
            if (r < 0)
                return (int)r;
        } else {
            sleep_us(200);
        }
    }
    return 0;
}

/* Frame i of a numbered stream: 4-byte sequence number, then len - 4 pattern bytes. */
static size_t seq_frame(uint8_t *p, uint32_t i, size_t len);
static int seq_frame_ok(const uint8_t *p, size_t len, uint32_t i);

/* A thread that reads frames with ch_rx_read until end of stream or error. */
typedef struct {
    int fd;
    size_t max_len;
    int seq_only;  /* check seq_frame numbers as they come instead of keeping frames */
    blobs got;     /* the frames (unless seq_only) */
    uint32_t nseq; /* seq_only: frames received in order; bad_seq: one was not */
    int bad_seq;
    int end;       /* the ch_rx_read result that ended it (CH_ERR_EOF expected) */
    int max_batch; /* most frames one ch_rx_read handed out */
    pthread_t th;
} reader;

static void *reader_main(void *arg)
{
    reader *r = arg;
    ch_rx *rx = NULL;
    r->end = ch_rx_new(r->max_len, &rx);
    if (r->end < 0)
        return NULL;
    int64_t deadline = now_ns() + 100 * 1000000000LL;
    for (;;) {
        int n = ch_rx_read(rx, r->fd);
        if (n < 0) {
            r->end = n;
            break;
        }
        if (n == 0) {
            if (now_ns() > deadline) {
                r->end = -ETIMEDOUT;
                break;
            }
            struct pollfd p = {r->fd, POLLIN, 0};
            poll(&p, 1, 100);
            continue;
        }
        if (n > r->max_batch)
            r->max_batch = n;
        const uint8_t *d = ch_rx_data(rx);
        const uint32_t *fr = ch_rx_frames(rx);
        for (int i = 0; i < n; i++) {
            if (!r->seq_only)
                blobs_add(&r->got, d + fr[2 * i], fr[2 * i + 1]);
            else if (seq_frame_ok(d + fr[2 * i], fr[2 * i + 1], r->nseq))
                r->nseq++;
            else
                r->bad_seq = 1;
        }
    }
    ch_rx_free(rx);
    return NULL;
}

static int reader_start(reader *r, int fd, size_t max_len, int seq_only)
{
    memset(r, 0, sizeof *r);
    r->fd = fd;
    r->max_len = max_len;
    r->seq_only = seq_only;
    return pthread_create(&r->th, NULL, reader_main, r);
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* A message envelope as envelope.h documents it (its layout, by hand, not
 * its helpers); returns CH_MSG_HEADER. */
static size_t put_env(uint8_t *e, unsigned kind, uint32_t origin, uint64_t rid, size_t name_len)
{
    e[0] = (uint8_t)kind;
    put_le32(e + 1, origin);
    for (int i = 0; i < 8; i++)
        e[5 + i] = (uint8_t)(rid >> (8 * i));
    e[13] = (uint8_t)name_len;
    e[14] = (uint8_t)(name_len >> 8);
    return CH_MSG_HEADER;
}

static size_t seq_frame(uint8_t *p, uint32_t i, size_t len)
{
    put_le32(p, i);
    for (size_t k = 4; k < len; k++)
        p[k] = (uint8_t)(i * 7 + k);
    return len;
}

static int seq_frame_ok(const uint8_t *p, size_t len, uint32_t i)
{
    int ok = len >= 4 && le32(p) == i;
    for (size_t k = 4; ok && k < len; k++)
        ok = p[k] == (uint8_t)(i * 7 + k);
    return ok;
}

/* The frames of got are seq_frame 0, 1, 2, ... n-1 (lengths not checked). */
static int seq_ok(const blobs *got, size_t n)
{
    if (got->n != n) {
        fprintf(stderr, "[%s] got %zu frames, want %zu\n", g_test, got->n, n);
        return 0;
    }
    for (size_t i = 0; i < n; i++) {
        const blob *b = &got->v[i];
        if (!seq_frame_ok(b->p, b->len, (uint32_t)i)) {
            fprintf(stderr, "[%s] frame %zu is wrong (len %zu)\n", g_test, i, b->len);
            return 0;
        }
    }
    return 1;
}

/* A lone post is written before it returns; a post behind queued bytes is left to the writer thread. */
static void test_post_policy(void)
{
    reader rd = {0};
    int fds[2] = {-1, -1}, started = 0;
    ch_tx *tx = NULL;
    uint8_t f[64];
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    /* validation, nothing queued */
    CHECK_EQ(ch_tx_post(tx, fds[0], f, 65, 64), -EMSGSIZE);
    CHECK_EQ(ch_tx_post_msg(tx, fds[0], 64, 256, 0, 0, f, 0, f, 0), -EINVAL);
    CHECK_EQ(ch_tx_post_msg(tx, fds[0], SIZE_MAX, 1, 0, 0, f, CH_MSG_NAME_MAX + 1, f, 0), -EINVAL);
    CHECK_EQ(ch_tx_post_msg(tx, fds[0], 20, 1, 0, 0, f, 3, f, 3), -EMSGSIZE);
    CHECK_EQ(ch_tx_pending(tx), 0);
    /* direct: written before the call returns, 50 us and more apart */
    CHECK_EQ(ch_tx_post(tx, fds[0], f, seq_frame(f, 0, 20), 64), 0);
    CHECK_EQ(unread(fds[1]), CH_FRAME_HEADER + 20);
    sleep_us(2000);
    CHECK_EQ(ch_tx_post(tx, fds[0], f, seq_frame(f, 1, 30), 64), 0);
    CHECK_EQ(unread(fds[1]), 2 * CH_FRAME_HEADER + 50);
    /* a send counts as a direct write too: a post right after it is queued,
     * unless this thread was descheduled for 50 us in between */
    CHECK_EQ(ch_tx_send(tx, fds[0], f, seq_frame(f, 2, 4), 64), 0);
    int64_t q = ch_tx_post(tx, fds[0], f, seq_frame(f, 3, 4), 64);
    CHECK(q == 0 || q == CH_FRAME_HEADER + 4);
    if (q == 0)
        printf("     (post after send went direct: descheduled for over 50 us)\n");
    REQUIRE(settle(tx, fds[0], 0, 10000) == 0);
    /* behind queued bytes: queued, and the writer owns the queue (nobody flushes) */
    CHECK_EQ(ch_tx_push(tx, f, seq_frame(f, 4, 10), 64), CH_FRAME_HEADER + 10);
    CHECK_EQ(ch_tx_unowned(tx), CH_FRAME_HEADER + 10);
    q = ch_tx_post_msg(tx, fds[0], 64, 7, 5, 0x1122334455667788ULL, (const uint8_t *)"nm", 2,
                       (const uint8_t *)"body", 4);
    CHECK_EQ(q, 2 * CH_FRAME_HEADER + 10 + CH_MSG_HEADER + 6);
    CHECK_EQ(ch_tx_unowned(tx), 0);
    CHECK(wstats().running);
    int64_t deadline = now_ns() + 10 * 1000000000LL;
    while (ch_tx_pending(tx) > 0 && now_ns() < deadline)
        sleep_us(100);
    CHECK_EQ(ch_tx_pending(tx), 0);
    CHECK_EQ(ch_tx_unowned(tx), 0);
    ch_tx_close(tx);
    close(fds[0]);
    fds[0] = -1;
    REQUIRE(reader_start(&rd, fds[1], 64, 0) == 0);
    started = 1;
    pthread_join(rd.th, NULL);
    started = 0;
    CHECK_EQ(rd.end, CH_ERR_EOF);
    REQUIRE(rd.got.n == 6);
    blobs first = {rd.got.v, 5, 5};
    CHECK(seq_ok(&first, 5));
    uint8_t want[CH_MSG_HEADER + 6];
    put_env(want, 7, 5, 0x1122334455667788ULL, 2);
    memcpy(want + CH_MSG_HEADER, "nmbody", 6);
    CHECK(rd.got.v[5].len == sizeof want && memcmp(rd.got.v[5].p, want, sizeof want) == 0);
    CHECK_EQ(ch_tx_post(tx, fds[1], f, 1, 64), -EPIPE); /* closed: the fd is not touched */
out:
    if (started)
        pthread_join(rd.th, NULL);
    close_pair(fds);
    ch_tx_free(tx);
    blobs_free(&rd.got);
}

/* A direct post (the tx idle) of a frame larger than the socket takes, the
 * peer not reading: the writer thread owns the rest and writes it once the
 * peer reads, with no flush by the caller (before, nobody wrote it until the
 * next send or post on that tx). */
static void test_post_direct_rest_goes_to_the_writer(void)
{
    reader rd = {0};
    int fds[2] = {-1, -1}, started = 0;
    ch_tx *tx = NULL;
    size_t len = 4u << 20;
    uint8_t *f = malloc(len);
    REQUIRE(f != NULL);
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    sleep_us(200); /* (past CH_TX_POST_WINDOW_NS since the tx was made) */
    int64_t q = ch_tx_post(tx, fds[0], f, seq_frame(f, 0, len), len);
    CHECK(q > 0);                    /* the socket took part of it */
    CHECK_EQ(ch_tx_unowned(tx), 0);  /* the rest is the writer's */
    REQUIRE(reader_start(&rd, fds[1], len, 0) == 0);
    started = 1;
    int64_t deadline = now_ns() + 10 * 1000000000LL;
    while (ch_tx_pending(tx) > 0 && now_ns() < deadline)
        sleep_us(200);
    CHECK_EQ(ch_tx_pending(tx), 0);
    ch_tx_close(tx);
    close(fds[0]);
    fds[0] = -1;
    pthread_join(rd.th, NULL);
    started = 0;
    CHECK_EQ(rd.end, CH_ERR_EOF);
    CHECK(rd.got.n == 1 && rd.got.v[0].len == len && seq_frame_ok(rd.got.v[0].p, len, 0));
out:
    if (started)
        pthread_join(rd.th, NULL);
    close_pair(fds);
    ch_tx_free(tx);
    blobs_free(&rd.got);
    free(f);
}

/* ch_tx_post_each: each tx gets the frame as ch_tx_post would give it, the
 * results in order, and the count of those negative or above the limit. */
static void test_post_each(void)
{
    int fds[3][2] = {{-1, -1}, {-1, -1}, {-1, -1}};
    ch_tx *txs[4] = {NULL, NULL, NULL, NULL};
    int wfds[4];
    int64_t out[4];
    uint8_t f[64];
    for (int i = 0; i < 3; i++) {
        REQUIRE(new_pair(fds[i]) == 0);
        wfds[i] = fds[i][0];
    }
    for (int i = 0; i < 4; i++)
        REQUIRE(ch_tx_new(&txs[i]) == 0);
    ch_tx_close(txs[3]); /* a worker that went: -EPIPE, its fd not touched */
    wfds[3] = -1;
    size_t len = seq_frame(f, 0, 20);
    CHECK_EQ(ch_tx_post_each(txs, wfds, 0, NULL, f, len, 64, 0, out), 0);
    CHECK_EQ(ch_tx_post_each(txs, wfds, 4, NULL, f, len, 64, 1000, out), 1);
    for (int i = 0; i < 3; i++)
        CHECK(out[i] >= 0 && out[i] <= (int64_t)(CH_FRAME_HEADER + len));
    CHECK_EQ(out[3], -EPIPE);
    /* a limit every result is above: all need attention */
    CHECK_EQ(ch_tx_post_each(txs, wfds, 4, NULL, f, seq_frame(f, 1, 20), 64, -1, out), 4);
    /* too large for max_len: refused on each, nothing queued */
    CHECK_EQ(ch_tx_post_each(txs, wfds, 3, NULL, f, 40, 32, 1000, out), 3);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(out[i], -EMSGSIZE);
    /* one left out (a relay skips its origin): 0 there, nothing sent to it */
    CHECK_EQ(ch_tx_post_each(txs, wfds, 3, txs[1], f, seq_frame(f, 2, 20), 64, 1000, out), 0);
    CHECK_EQ(out[1], 0);
    for (int i = 0; i < 3; i++) {
        REQUIRE(settle(txs[i], wfds[i], 0, 10000) == 0);
        CHECK_EQ(unread(fds[i][1]), (i == 1 ? 2 : 3) * (int)(CH_FRAME_HEADER + 20));
    }
out:
    for (int i = 0; i < 4; i++)
        if (txs[i] != NULL) {
            ch_tx_close(txs[i]);
            ch_tx_free(txs[i]);
        }
    for (int i = 0; i < 3; i++)
        close_pair(fds[i]);
}

/* envelope.h: the documented layout, ch_msg_put as the hand encoding, and
 * ch_msg_parse's bounds (a whole envelope, the declared name inside). */
static void test_envelope_helpers(void)
{
    /* the wire format (a protocol constant: changing it breaks peers) */
    CHECK_EQ(CH_MSG_HEADER, 15);
    CHECK_EQ(CH_MSG_NAME_MAX, 0xffff);
    CHECK_EQ(CH_MSG_KIND_MAX, 0xff);
    CHECK(CH_KIND_MSG == 1 && CH_KIND_REQ == 2 && CH_KIND_RES == 3 && CH_KIND_ERR == 4 &&
          CH_KIND_BCAST == 5);
    uint8_t want[CH_MSG_HEADER + 64], got[CH_MSG_HEADER + 64];
    for (int it = 0; it < 2000; it++) {
        unsigned kind = (unsigned)rnd_below(256);
        uint32_t origin = (uint32_t)rnd();
        uint64_t rid = rnd();
        size_t nlen = it < 4 ? (size_t[]){0, 1, 255, CH_MSG_NAME_MAX}[it] : rnd_below(65536);
        size_t hl = put_env(want, kind, origin, rid, nlen);
        memset(got, 0xa5, sizeof got);
        ch_msg_put(got, kind, origin, rid, nlen);
        CHECK(hl == CH_MSG_HEADER && memcmp(got, want, CH_MSG_HEADER) == 0);
        CHECK_EQ(got[CH_MSG_HEADER], 0xa5); /* nothing written past the envelope */
        CHECK_EQ(ch_msg_kind(want), kind);
        CHECK_EQ(ch_msg_origin(want), origin);
        CHECK(ch_msg_rid(want) == rid);
        CHECK_EQ(ch_msg_name_len(want), nlen);
    }
    /* parse: every length of a buffer whose envelope declares a 3-byte name */
    uint8_t p[CH_MSG_HEADER + 8];
    put_env(p, CH_KIND_REQ, 7, 0x0102030405060708ULL, 3);
    memcpy(p + CH_MSG_HEADER, "abcXYZ", 6);
    for (size_t len = 0; len <= CH_MSG_HEADER + 6; len++) {
        ch_msg m = {0};
        int r = ch_msg_parse(p, len, &m);
        if (len < CH_MSG_HEADER + 3) {
            CHECK_EQ(r, -EPROTO);
            continue;
        }
        CHECK_EQ(r, 0);
        CHECK(m.kind == CH_KIND_REQ && m.origin == 7 && m.rid == 0x0102030405060708ULL);
        CHECK(m.name == p + CH_MSG_HEADER && m.name_len == 3);
        CHECK(m.body == p + CH_MSG_HEADER + 3 && m.body_len == len - CH_MSG_HEADER - 3);
    }
    /* the largest name: accepted only when all of it is there */
    size_t big = CH_MSG_HEADER + CH_MSG_NAME_MAX + 1;
    uint8_t *b = malloc(big);
    REQUIRE(b);
    memset(b, 'n', big);
    put_env(b, 200, 0, 0, CH_MSG_NAME_MAX);
    ch_msg m = {0};
    CHECK_EQ(ch_msg_parse(b, big - 2, &m), -EPROTO);
    CHECK_EQ(ch_msg_parse(b, big, &m), 0);
    CHECK(m.kind == 200 && m.name_len == CH_MSG_NAME_MAX);
    CHECK(m.body == b + big - 1 && m.body_len == 1);
    free(b);
out:;
}

/* ---- many threads ---- */

#define MT_MAX_LEN (200 * 1024)

typedef struct {
    ch_tx *tx;
    int fd;
    unsigned id;
    uint32_t n;
    uint64_t rng;
    int64_t err;
    pthread_t th;
    size_t big; /* largest body of the 1% large messages; 0: MT_MAX_LEN - 64 */
    int mostly_posts; /* 70% posts, 10% each send, send_msg, push + flush; else 25% each of 4 */
    size_t limit;     /* wait while more is queued (see settle); 0: 1 MiB */
} poster;


static uint64_t mt_rid(unsigned id, uint32_t seq)
{
    return (uint64_t)seq * 0x9E3779B97F4A7C15ULL ^ id;
}

/* Thread id's messages 0..n-1, each through one of send_msg, post_msg, send, post
 * (and push + flush, see mostly_posts). */
static void *poster_main(void *arg)
{
    poster *p = arg;
    uint8_t *buf = malloc(MT_MAX_LEN);
    if (!buf)
        abort();
    const uint8_t name[2] = {'t', (uint8_t)('0' + p->id)};
    for (uint32_t seq = 0; seq < p->n; seq++) {
        uint64_t r = xs(&p->rng);
        size_t blen = r % 100 == 0 ? xs(&p->rng) % (p->big ? p->big : MT_MAX_LEN - 64)
                      : r % 10 == 0 ? xs(&p->rng) % 4096
                                    : xs(&p->rng) % 200;
        uint8_t *body = buf + CH_MSG_HEADER + 2;
        for (size_t i = 0; i < blen; i++)
            body[i] = (uint8_t)(p->id * 131 + seq * 7 + i);
        int64_t q;
        static const unsigned mostly_posts[10] = {0, 2, 4, 1, 1, 1, 3, 3, 3, 3};
        unsigned mode = p->mostly_posts ? mostly_posts[(r >> 20) % 10] : (unsigned)((r >> 20) % 4);
        switch (mode) {
        case 0:
            q = ch_tx_send_msg(p->tx, p->fd, MT_MAX_LEN, p->id, seq, mt_rid(p->id, seq), name, 2,
                               body, blen);
            break;
        case 1:
            q = ch_tx_post_msg(p->tx, p->fd, MT_MAX_LEN, p->id, seq, mt_rid(p->id, seq), name, 2,
                               body, blen);
            break;
        default:
            put_env(buf, p->id, seq, mt_rid(p->id, seq), 2);
            memcpy(buf + CH_MSG_HEADER, name, 2);
            if (mode == 4) {
                q = ch_tx_push(p->tx, buf, CH_MSG_HEADER + 2 + blen, MT_MAX_LEN);
                if (q >= 0)
                    q = ch_tx_flush(p->tx, p->fd);
                break;
            }
            q = (mode == 2 ? ch_tx_send : ch_tx_post)(p->tx, p->fd, buf, CH_MSG_HEADER + 2 + blen,
                                                      MT_MAX_LEN);
        }
        __atomic_add_fetch(&g_calls_done, 1, __ATOMIC_RELAXED);
        size_t limit = p->limit ? p->limit : 1u << 20;
        if (q >= 0 && (size_t)q > limit)
            q = settle(p->tx, p->fd, limit / 4, 60000);
        if (q < 0) {
            p->err = q;
            break;
        }
        if ((r >> 40) % 64 == 0) /* let the 50 us window lapse now and then */
            sleep_us((long)((r >> 50) % 200));
    }
    free(buf);
    return NULL;
}

/* Each frame is the message poster `kind` numbered `origin`; returns 0 or why not. */
static const char *mt_check(const blob *b, unsigned nth, uint32_t *next)
{
    if (b->len < CH_MSG_HEADER + 2)
        return "short";
    const uint8_t *p = b->p;
    unsigned id = p[0];
    uint32_t seq = le32(p + 1);
    if (id >= nth)
        return "kind";
    if (seq != next[id])
        return "order";
    uint64_t rid = 0;
    for (int i = 0; i < 8; i++)
        rid |= (uint64_t)p[5 + i] << (8 * i);
    if (rid != mt_rid(id, seq) || p[13] != 2 || p[14] != 0 || p[15] != 't' || p[16] != '0' + id)
        return "envelope";
    for (size_t i = 0; i < b->len - CH_MSG_HEADER - 2; i++)
        if (p[CH_MSG_HEADER + 2 + i] != (uint8_t)(id * 131 + seq * 7 + i))
            return "body";
    next[id]++;
    return NULL;
}

/* Frames from 2 and 4 threads mixing posts and direct sends arrive exactly once, each thread's in order. */
static void test_post_threads_order(void)
{
    for (unsigned nth = 2; nth <= 4; nth += 2) {
        int fds[2] = {-1, -1};
        ch_tx *tx = NULL;
        reader rd = {0};
        poster ps[4];
        unsigned started = 0, rd_started = 0;
        const uint32_t n = 2500;
        REQUIRE(new_pair(fds) == 0);
        REQUIRE(ch_tx_new(&tx) == 0);
        REQUIRE(reader_start(&rd, fds[1], MT_MAX_LEN, 0) == 0);
        rd_started = 1;
        ch_writer_stats s0 = wstats();
        for (; started < nth; started++) {
            ps[started] = (poster){.tx = tx, .fd = fds[0], .id = started, .n = n, .rng = rnd() | 1};
            REQUIRE(pthread_create(&ps[started].th, NULL, poster_main, &ps[started]) == 0);
        }
        for (unsigned i = 0; i < nth; i++)
            pthread_join(ps[i].th, NULL);
        started = 0;
        for (unsigned i = 0; i < nth; i++)
            CHECK_EQ(ps[i].err, 0);
        CHECK_EQ(settle(tx, fds[0], 0, 60000), 0);
        ch_writer_stats s1 = wstats();
        ch_tx_close(tx);
        close(fds[0]);
        fds[0] = -1;
        pthread_join(rd.th, NULL);
        rd_started = 0;
        CHECK_EQ(rd.end, CH_ERR_EOF);
        uint32_t next[4] = {0};
        for (size_t i = 0; i < rd.got.n; i++) {
            const char *why = mt_check(&rd.got.v[i], nth, next);
            if (why) {
                fprintf(stderr, "[%s] %u threads: frame %zu: bad %s\n", g_test, nth, i, why);
                g_fail++;
                break;
            }
        }
        CHECK_EQ(rd.got.n, (size_t)n * nth);
        for (unsigned i = 0; i < nth; i++)
            CHECK_EQ(next[i], n);
        printf("     %u threads, %u frames: the writer made %" PRIu64 " sendmsg calls after %" PRIu64
               " wake-ups\n",
               nth, n * nth, s1.writes - s0.writes, s1.wakeups - s0.wakeups);
    out:
        for (unsigned i = 0; i < started; i++)
            pthread_join(ps[i].th, NULL);
        if (fds[0] >= 0) {
            ch_tx_close(tx);
            close(fds[0]);
        }
        if (rd_started)
            pthread_join(rd.th, NULL);
        if (fds[1] >= 0)
            close(fds[1]);
        ch_tx_free(tx);
        blobs_free(&rd.got);
        if (g_fail)
            return;
    }
}

/* 10,000 small posts in a burst arrive complete and in order with far fewer sendmsg calls than frames. */
static void test_post_burst_coalesces(void)
{
    const uint32_t n = 10000;
    int fds[2] = {-1, -1}, rd_started = 0;
    ch_tx *tx = NULL;
    reader rd = {0};
    uint8_t f[32];
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    REQUIRE(reader_start(&rd, fds[1], 64, 0) == 0);
    rd_started = 1;
    ch_writer_stats s0 = wstats();
    uint32_t direct = 0;
    for (uint32_t i = 0; i < n; i++) {
        int64_t q = ch_tx_post(tx, fds[0], f, seq_frame(f, i, 4 + i % 29), 64);
        REQUIRE(q >= 0);
        direct += q == 0; /* (a queued frame leaves at least its own bytes queued) */
        if ((size_t)q > (1u << 20))
            REQUIRE(settle(tx, fds[0], 0, 60000) == 0);
    }
    REQUIRE(settle(tx, fds[0], 0, 60000) == 0);
    ch_writer_stats s1 = wstats();
    uint64_t writes = s1.writes - s0.writes, wakeups = s1.wakeups - s0.wakeups;
    printf("     %u posts: %u written directly, %" PRIu64 " sendmsg calls by the writer after %" PRIu64
           " wake-ups\n",
           n, direct, writes, wakeups);
    CHECK(direct + writes <= n / 5); /* on average at least 5 frames per sendmsg */
    CHECK(wakeups <= n / 5);         /* not one per post */

    /* idle: no wake-ups, no work */
    sleep_us(20000);
    s0 = wstats();
    sleep_us(200000);
    s1 = wstats();
    CHECK_EQ(s1.sleeps, s0.sleeps);
    CHECK_EQ(s1.wakeups, s0.wakeups);
    CHECK(s1.cpu_ns - s0.cpu_ns < 1000000);

    ch_tx_close(tx);
    close(fds[0]);
    fds[0] = -1;
    pthread_join(rd.th, NULL);
    rd_started = 0;
    CHECK_EQ(rd.end, CH_ERR_EOF);
    CHECK(seq_ok(&rd.got, n));
    printf("     most frames one recv brought: %d\n", rd.max_batch);
    CHECK(rd.max_batch > 8);
out:
    if (fds[0] >= 0) {
        ch_tx_close(tx);
        close(fds[0]);
    }
    if (rd_started)
        pthread_join(rd.th, NULL);
    if (fds[1] >= 0)
        close(fds[1]);
    ch_tx_free(tx);
    blobs_free(&rd.got);
}

/*
 * Post 64 KiB frames on a socket nobody reads until the writer thread owns a
 * queue of more than `want` bytes (beyond the socket's buffer).  Returns the
 * number of frames posted, or -1.
 */
static int fill_stalled(ch_tx *tx, int fd, size_t want, uint8_t *f)
{
    const size_t len = 64 * 1024;
    for (uint32_t i = 0; i < 1000; i++) {
        if (ch_tx_post(tx, fd, f, seq_frame(f, i, len), len) < 0)
            return -1;
        if (ch_tx_pending(tx) > want && ch_tx_unowned(tx) == 0)
            return (int)i + 1;
    }
    return -1;
}

/* A writer waiting on a full socket sleeps (no CPU, no loop) and drains the queue once the reader reads. */
static void test_post_stalled_socket(void)
{
    int fds[2] = {-1, -1};
    ch_tx *tx = NULL;
    ch_rx *rx = NULL;
    blobs got = {0};
    uint8_t *f = malloc(64 * 1024);
    REQUIRE(f != NULL);
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    REQUIRE(ch_rx_new(64 * 1024, &rx) == 0);
    int nf = fill_stalled(tx, fds[0], 2u << 20, f);
    REQUIRE(nf > 0);
    sleep_us(20000); /* let it reach its poll() */
    size_t in_socket = (size_t)unread(fds[1]);
    CHECK(in_socket > 0);
    ch_writer_stats s0 = wstats();
    size_t pending = ch_tx_pending(tx);
    sleep_us(300000);
    ch_writer_stats s1 = wstats();
    printf("     stalled 300 ms with %zu bytes queued: writer cpu %" PRId64 " us, %" PRIu64
           " sleeps, %" PRIu64 " sendmsg calls\n",
           pending, (s1.cpu_ns - s0.cpu_ns) / 1000, s1.sleeps - s0.sleeps, s1.writes - s0.writes);
    CHECK(s1.cpu_ns - s0.cpu_ns < 5000000); /* a busy loop would use ~300 ms */
    CHECK(s1.sleeps - s0.sleeps <= 1);
    CHECK(s1.writes - s0.writes <= 2);
    CHECK_EQ(ch_tx_pending(tx), pending);
    CHECK_EQ(ch_tx_unowned(tx), 0);
    CHECK_EQ((size_t)unread(fds[1]), in_socket);
    /* now read: the writer alone writes the rest */
    int64_t deadline = now_ns() + 30 * 1000000000LL;
    while (got.n < (size_t)nf && now_ns() < deadline) {
        CHECK_EQ(drain(rx, fds[1], 64 * 1024, &got), 0);
        struct pollfd p = {fds[1], POLLIN, 0};
        poll(&p, 1, 100);
    }
    CHECK(seq_ok(&got, (size_t)nf));
    CHECK_EQ(ch_tx_pending(tx), 0);
out:
    close_pair(fds);
    ch_tx_free(tx);
    ch_rx_free(rx);
    blobs_free(&got);
    free(f);
}

/* When the writer meets a closed peer, the error sticks to the tx: later posts, sends, pushes and flushes return it. */
static void test_post_peer_closed(void)
{
    int fds[2] = {-1, -1};
    ch_tx *tx = NULL;
    uint8_t f[100] = {0};
    void (*old)(int) = signal(SIGPIPE, SIG_DFL);
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    CHECK_EQ(ch_tx_post(tx, fds[0], f, 10, 100), 0);
    close(fds[1]);
    fds[1] = -1;
    /* queued behind a pushed frame: the writer thread writes it and fails */
    CHECK(ch_tx_push(tx, f, 10, 100) > 0);
    CHECK(ch_tx_post_msg(tx, fds[0], 100, 1, 2, 3, f, 1, f, 1) > 0);
    int64_t deadline = now_ns() + 10 * 1000000000LL;
    while (ch_tx_pending(tx) > 0 && now_ns() < deadline)
        sleep_us(100);
    CHECK_EQ(ch_tx_pending(tx), 0); /* dropped */
    int64_t e = ch_tx_post(tx, fds[0], f, 10, 100);
    CHECK(e == -EPIPE || e == -ECONNRESET);
    CHECK_EQ(ch_tx_post(tx, fds[0], f, 10, 100), e);
    CHECK_EQ(ch_tx_post_msg(tx, fds[0], 100, 1, 2, 3, f, 1, f, 1), e);
    CHECK_EQ(ch_tx_send(tx, fds[0], f, 10, 100), e);
    CHECK_EQ(ch_tx_push(tx, f, 10, 100), e);
    CHECK_EQ(ch_tx_flush(tx, fds[0]), e);
    CHECK_EQ(ch_tx_pending(tx), 0);
    ch_tx_close(tx);
    CHECK_EQ(ch_tx_post(tx, fds[0], f, 10, 100), -EPIPE);
    /* a lone post to a closed peer fails directly */
    ch_tx_free(tx);
    tx = NULL;
    REQUIRE(ch_tx_new(&tx) == 0);
    e = ch_tx_post(tx, fds[0], f, 10, 100);
    CHECK(e == -EPIPE || e == -ECONNRESET);
out:
    signal(SIGPIPE, old);
    close_pair(fds);
    ch_tx_free(tx);
}

/*
 * ch_tx_close of a tx the writer thread holds data for returns at once, and
 * the writer never writes to that fd again, even when its number is reused.
 */
static void test_post_close_while_queued(void)
{
    int fds[2] = {-1, -1}, nfds[2] = {-1, -1};
    ch_tx *tx = NULL;
    uint8_t *f = malloc(64 * 1024);
    REQUIRE(f != NULL);
    /* (a) a stalled queue */
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    REQUIRE(fill_stalled(tx, fds[0], 1u << 20, f) > 0);
    sleep_us(20000); /* the writer sleeps in poll() on fds[0] */
    ch_writer_stats s0 = wstats();
    int64_t t0 = now_ns();
    ch_tx_close(tx);
    int64_t took = now_ns() - t0;
    CHECK(took < 100000000);
    CHECK_EQ(ch_tx_pending(tx), 0);
    close(fds[0]);
    int old0 = fds[0], old1 = fds[1];
    fds[0] = -1;
    /* the peer sees the end promptly: the writer no longer holds the socket in its poll() */
    ch_rx *rx = NULL;
    blobs got = {0};
    REQUIRE(ch_rx_new(64 * 1024, &rx) == 0);
    int r = 0;
    int64_t deadline = now_ns() + 5 * 1000000000LL;
    while ((r = drain(rx, fds[1], 64 * 1024, &got)) == 0 && now_ns() < deadline) {
        struct pollfd p = {fds[1], POLLIN, 0};
        poll(&p, 1, 100);
    }
    CHECK(r == CH_ERR_EOF || r == CH_ERR_TRUNCATED); /* (the writer may have cut a frame) */
    ch_rx_free(rx);
    CHECK(got.n > 0 && seq_ok(&got, got.n));
    blobs_free(&got);
    close(fds[1]);
    fds[1] = -1;
    REQUIRE(new_pair(nfds) == 0);
    if (!(nfds[0] == old0 || nfds[0] == old1 || nfds[1] == old0 || nfds[1] == old1))
        printf("     (a) fd numbers not reused\n");
    sleep_us(50000);
    CHECK_EQ(unread(nfds[0]), 0);
    CHECK_EQ(unread(nfds[1]), 0);
    CHECK_EQ(wstats().writes, s0.writes);
    close(nfds[0]);
    close(nfds[1]);
    nfds[0] = nfds[1] = -1;
    ch_tx_free(tx);
    tx = NULL;

    /* (b) close (or free) while the writer is probably writing, again and again */
    int reused = 0;
    for (int it = 0; it < 300; it++) {
        REQUIRE(new_pair(fds) == 0);
        REQUIRE(ch_tx_new(&tx) == 0);
        CHECK(ch_tx_push(tx, f, seq_frame(f, 0, 60000), 64 * 1024) > 0);
        CHECK(ch_tx_post(tx, fds[0], f, seq_frame(f, 1, 100), 64 * 1024) > 0);
        for (uint64_t spin = rnd_below(20000); spin > 0; spin--)
            __asm__ volatile("" ::: "memory");
        if (it % 3 == 0) {
            ch_tx_free(tx); /* closes it too */
            tx = NULL;
        } else {
            ch_tx_close(tx);
        }
        old0 = fds[0];
        old1 = fds[1];
        close(fds[0]);
        close(fds[1]);
        fds[0] = fds[1] = -1;
        REQUIRE(new_pair(nfds) == 0);
        reused += nfds[0] == old0 || nfds[0] == old1;
        sleep_us(200);
        CHECK_EQ(unread(nfds[0]), 0);
        CHECK_EQ(unread(nfds[1]), 0);
        close(nfds[0]);
        close(nfds[1]);
        nfds[0] = nfds[1] = -1;
        ch_tx_free(tx);
        tx = NULL;
        if (g_fail)
            break;
    }
    CHECK(reused > 0);
out:
    close_pair(fds);
    close_pair(nfds);
    ch_tx_free(tx);
    free(f);
}

/* A thread reading slowly: recv of 1..700 bytes at a time, short naps, frames kept. */
typedef struct {
    int fd;
    size_t max_len;
    blobs got;
    int end; /* CH_ERR_EOF expected */
    uint64_t rng;
    pthread_t th;
} slow_reader;

static void *slow_reader_main(void *arg)
{
    slow_reader *r = arg;
    ch_rx *rx = NULL;
    uint8_t chunk[700];
    r->end = ch_rx_new(r->max_len, &rx);
    if (r->end < 0)
        return NULL;
    int64_t deadline = now_ns() + 100 * 1000000000LL;
    for (;;) {
        ssize_t got = recv(r->fd, chunk, 1 + xs(&r->rng) % sizeof chunk, MSG_DONTWAIT);
        if (got == 0) {
            r->end = ch_rx_eof(rx);
            break;
        }
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN || now_ns() > deadline) {
                r->end = errno == EAGAIN ? -ETIMEDOUT : -errno;
                break;
            }
            struct pollfd p = {r->fd, POLLIN, 0};
            poll(&p, 1, 100);
            continue;
        }
        for (size_t off = 0; off < (size_t)got;) {
            size_t used;
            int n = ch_rx_feed(rx, chunk + off, (size_t)got - off, &used);
            if (n < 0) {
                r->end = n;
                goto out;
            }
            collect(rx, n, r->max_len, &r->got);
            off += used;
        }
        for (int n; (n = ch_rx_feed(rx, NULL, 0, &(size_t){0})) > 0;)
            collect(rx, n, r->max_len, &r->got); /* (more than CH_RX_MAX_FRAMES buffered) */
        if (xs(&r->rng) % 16 == 0)
            sleep_us((long)(xs(&r->rng) % 100));
    }
out:
    ch_rx_free(rx);
    return NULL;
}

/*
 * Posts appended while the writer thread is inside a (slow, often partial)
 * sendmsg: 4 threads post, send, push and flush on one tx whose socket has a
 * small buffer and a slow reader, while every sendmsg of the writer sleeps up
 * to 150 us and writes a random part of what it is given.  Every frame
 * arrives once, intact, each thread's in order; no direct write happens while
 * the writer is in sendmsg; the bytes it writes never change under it.
 */
static void test_post_append_during_partial_write(void)
{
    enum { NTH = 4 };
    const uint32_t n = 4000;
    int fds[2] = {-1, -1};
    ch_tx *tx = NULL;
    slow_reader rd = {0};
    poster ps[NTH];
    unsigned started = 0, rd_started = 0;
    REQUIRE(new_pair(fds) == 0);
    int small = 8192;
    CHECK(setsockopt(fds[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    REQUIRE(ch_tx_writer_start() == 0);
    rd.fd = fds[1];
    rd.max_len = MT_MAX_LEN;
    rd.rng = rnd() | 1;
    REQUIRE(pthread_create(&rd.th, NULL, slow_reader_main, &rd) == 0);
    rd_started = 1;
    hook_on(fds[0], 0, 150, 1);
    ch_writer_stats s0 = wstats();
    for (; started < NTH; started++) {
        ps[started] = (poster){.tx = tx, .fd = fds[0], .id = started, .n = n, .rng = rnd() | 1,
                               .big = 16 * 1024, .mostly_posts = 1, .limit = 32 * 1024};
        REQUIRE(pthread_create(&ps[started].th, NULL, poster_main, &ps[started]) == 0);
    }
    for (unsigned i = 0; i < NTH; i++)
        pthread_join(ps[i].th, NULL);
    started = 0;
    for (unsigned i = 0; i < NTH; i++)
        CHECK_EQ(ps[i].err, 0);
    CHECK_EQ(settle(tx, fds[0], 0, 60000), 0);
    ch_writer_stats s1 = wstats();
    ch_tx_close(tx);
    hook_off();
    close(fds[0]);
    fds[0] = -1;
    pthread_join(rd.th, NULL);
    rd_started = 0;
    CHECK_EQ(rd.end, CH_ERR_EOF);
    uint32_t next[NTH] = {0};
    for (size_t i = 0; i < rd.got.n; i++) {
        const char *why = mt_check(&rd.got.v[i], NTH, next);
        if (why) {
            fprintf(stderr, "[%s] frame %zu: bad %s\n", g_test, i, why);
            g_fail++;
            break;
        }
    }
    CHECK_EQ(rd.got.n, (size_t)n * NTH);
    for (unsigned i = 0; i < NTH; i++)
        CHECK_EQ(next[i], n);
    long wcalls = __atomic_load_n(&H.wcalls, __ATOMIC_RELAXED);
    long overlap = __atomic_load_n(&H.overlap, __ATOMIC_RELAXED);
    long overlap_partial = __atomic_load_n(&H.overlap_partial, __ATOMIC_RELAXED);
    printf("     %u frames: the writer made %ld sendmsg calls (%ld partial), %ld with posters' "
           "calls completed meanwhile (%ld of them partial); %" PRIu64 " wake-ups\n",
           n * NTH, wcalls, __atomic_load_n(&H.wpartial, __ATOMIC_RELAXED), overlap,
           overlap_partial, s1.wakeups - s0.wakeups);
    CHECK(overlap_partial > 0);
    CHECK_EQ(__atomic_load_n(&H.clash, __ATOMIC_RELAXED), 0);
    CHECK_EQ(__atomic_load_n(&H.mutated, __ATOMIC_RELAXED), 0);
    CHECK_EQ((long)(s1.writes - s0.writes), wcalls);
out:
    for (unsigned i = 0; i < started; i++)
        pthread_join(ps[i].th, NULL);
    if (fds[0] >= 0) {
        ch_tx_close(tx);
        close(fds[0]);
    }
    hook_off();
    if (rd_started)
        pthread_join(rd.th, NULL);
    if (fds[1] >= 0)
        close(fds[1]);
    ch_tx_free(tx);
    blobs_free(&rd.got);
}

/*
 * ch_tx_close (and ch_tx_free) while the writer thread is inside a sendmsg on
 * the tx returns only once that sendmsg has returned; the writer then leaves
 * the fd alone, and a send right away sees the closed tx.
 */
static void test_close_waits_for_writer_sendmsg(void)
{
    int fds[2] = {-1, -1};
    ch_tx *tx = NULL;
    uint8_t f[256];
    long waited_us = 0, slowest_us = 0;
    REQUIRE(ch_tx_writer_start() == 0);
    for (int it = 0; it < 20; it++) {
        REQUIRE(new_pair(fds) == 0);
        REQUIRE(ch_tx_new(&tx) == 0);
        hook_on(fds[0], 3000, 3000, 0);
        /* The writer stays in its sendmsg until we have seen it there (however
         * long this thread is descheduled), then 3000 us more. */
        __atomic_store_n(&H.gate, 1, __ATOMIC_RELEASE);
        CHECK(ch_tx_push(tx, f, seq_frame(f, 0, sizeof f), sizeof f) > 0);
        CHECK(ch_tx_post(tx, fds[0], f, seq_frame(f, 1, sizeof f), sizeof f) > 0);
        int64_t deadline = now_ns() + 5 * 1000000000LL;
        while (!__atomic_load_n(&H.busy, __ATOMIC_ACQUIRE) && now_ns() < deadline)
            sleep_us(20);
        REQUIRE(__atomic_load_n(&H.busy, __ATOMIC_ACQUIRE));
        /* posts and sends meanwhile are queued behind, not written */
        CHECK(ch_tx_post(tx, fds[0], f, seq_frame(f, 2, 10), sizeof f) > 0);
        CHECK(ch_tx_send(tx, fds[0], f, seq_frame(f, 3, 10), sizeof f) > 0);
        CHECK(ch_tx_flush(tx, fds[0]) > 0);
        CHECK_EQ(ch_tx_unowned(tx), 0);
        CHECK_EQ(ch_tx_pending(tx), 4 * CH_FRAME_HEADER + 2 * sizeof f + 20);
        CHECK_EQ(__atomic_load_n(&H.clash, __ATOMIC_RELAXED), 0);
        __atomic_store_n(&H.gate, 0, __ATOMIC_RELEASE);
        int64_t t0 = now_ns();
        if (it % 2) {
            ch_tx_free(tx); /* closes it first */
            tx = NULL;
        } else {
            ch_tx_close(tx);
        }
        long us = (long)((now_ns() - t0) / 1000);
        CHECK_EQ(__atomic_load_n(&H.busy, __ATOMIC_ACQUIRE), 0); /* the sendmsg ended first */
        waited_us += us;
        slowest_us = us > slowest_us ? us : slowest_us;
        long wcalls = __atomic_load_n(&H.wcalls, __ATOMIC_RELAXED);
        if (tx) {
            CHECK_EQ(ch_tx_send(tx, fds[0], f, 4, sizeof f), -EPIPE);
            CHECK_EQ(ch_tx_pending(tx), 0);
        }
        sleep_us(5000);
        CHECK_EQ(__atomic_load_n(&H.wcalls, __ATOMIC_RELAXED), wcalls); /* fd left alone */
        hook_off();
        close(fds[0]);
        close(fds[1]);
        fds[0] = fds[1] = -1;
        ch_tx_free(tx);
        tx = NULL;
        if (g_fail)
            break;
    }
    printf("     close waited %ld us on average for a 3000 us sendmsg (at most %ld us)\n",
           waited_us / 20, slowest_us);
out:
    hook_off();
    close_pair(fds);
    ch_tx_free(tx);
}

/* A parent thread that sends and posts on its own tx without pause until told to stop. */
typedef struct {
    ch_tx *tx;
    int fd;
    int stop; /* (atomic) */
    uint32_t sent;
    int64_t err;
    pthread_t th;
} hammer;

static void *hammer_main(void *arg)
{
    hammer *h = arg;
    uint8_t f[64];
    while (!__atomic_load_n(&h->stop, __ATOMIC_RELAXED)) {
        size_t len = seq_frame(f, h->sent, 4 + h->sent % 60);
        int64_t q = (h->sent % 3 ? ch_tx_post : ch_tx_send)(h->tx, h->fd, f, len, sizeof f);
        if (q >= 0 && (size_t)q > (256u << 10))
            q = settle(h->tx, h->fd, 0, 60000);
        if (q < 0) {
            h->err = q;
            break;
        }
        h->sent++;
    }
    return NULL;
}

/* Child body: a new tx posts a burst through the child's own writer thread. */
static int fork_child(ch_tx *inherited, ch_tx *hammered)
{
    alarm(60); /* (alarms are not inherited) */
    /* the parent's writer and its hammer thread were using these at the fork */
    ch_tx_close(inherited);
    ch_tx_free(inherited);
    ch_tx_close(hammered);
    ch_tx_free(hammered);
    ch_writer_stats s = wstats();
    if (s.running || s.writes || s.wakeups)
        return 1;
    int fds[2];
    ch_tx *tx = NULL;
    reader rd;
    uint8_t f[64];
    if (ch_socketpair(fds) != 0 || ch_tx_new(&tx) != 0 || reader_start(&rd, fds[1], 64, 0) != 0)
        return 2;
    for (uint32_t i = 0; i < 3000; i++)
        if (ch_tx_post(tx, fds[0], f, seq_frame(f, i, 4 + i % 40), 64) < 0)
            return 3;
    if (settle(tx, fds[0], 0, 30000) != 0)
        return 4;
    s = wstats();
    ch_tx_close(tx);
    close(fds[0]);
    pthread_join(rd.th, NULL);
    if (rd.end != CH_ERR_EOF || !seq_ok(&rd.got, 3000))
        return 5;
    if (!s.running || s.writes == 0)
        return 6;
    ch_tx_free(tx);
    blobs_free(&rd.got);
    close(fds[1]);
    return 0;
}

/*
 * After fork, with the parent's writer busy and another parent thread inside
 * ch_tx calls, the child can close and free the inherited txs, and a new tx
 * of the child posts through a new writer thread; the parent's streams are
 * intact.
 */
static void test_post_fork(void)
{
    int fds[2] = {-1, -1}, hfds[2] = {-1, -1}, rd_started = 0, hrd_started = 0, h_started = 0;
    ch_tx *tx = NULL;
    reader rd = {0}, hrd = {0};
    hammer h = {0};
    uint8_t f[300];
    uint32_t seq = 0;
    REQUIRE(new_pair(fds) == 0);
    REQUIRE(new_pair(hfds) == 0);
    REQUIRE(ch_tx_new(&tx) == 0);
    REQUIRE(ch_tx_new(&h.tx) == 0);
    h.fd = hfds[0];
    /* The parent's threads must not allocate when it forks: the ASan of clang
     * 14 does not lock its allocator around fork(), so a child could inherit
     * one of its locks held (glibc's malloc has no such problem; and frame.c
     * allocates only under a tx mutex, which fork waits for). */
    REQUIRE(reader_start(&rd, fds[1], sizeof f, 1) == 0);
    rd_started = 1;
    REQUIRE(reader_start(&hrd, hfds[1], 64, 1) == 0);
    hrd_started = 1;
    REQUIRE(pthread_create(&h.th, NULL, hammer_main, &h) == 0);
    h_started = 1;
    for (int k = 0; k < 6; k++) {
        /* keep the writer busy with this tx at the fork */
        for (int i = 0; i < 2000; i++, seq++) {
            int64_t q = ch_tx_post(tx, fds[0], f, seq_frame(f, seq, 4 + seq % 290), sizeof f);
            REQUIRE(q >= 0);
            if ((size_t)q > (1u << 20))
                REQUIRE(settle(tx, fds[0], 0, 60000) == 0);
        }
        fflush(stdout);
        pid_t pid = fork();
        REQUIRE(pid >= 0);
        if (pid == 0) {
            int code = fork_child(tx, h.tx);
            _exit(code == 0 ? 42 : 10 + code);
        }
        int st = 0;
        REQUIRE(waitpid(pid, &st, 0) == pid);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 42)
            fprintf(stderr, "[%s] child %d: %s %d\n", g_test, k,
                    WIFEXITED(st) ? "exit" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 42);
    }
    REQUIRE(settle(tx, fds[0], 0, 60000) == 0);
    ch_tx_close(tx);
    close(fds[0]);
    fds[0] = -1;
    pthread_join(rd.th, NULL);
    rd_started = 0;
    CHECK_EQ(rd.end, CH_ERR_EOF);
    CHECK(!rd.bad_seq);
    CHECK_EQ(rd.nseq, seq);
    __atomic_store_n(&h.stop, 1, __ATOMIC_RELAXED);
    pthread_join(h.th, NULL);
    h_started = 0;
    CHECK_EQ(h.err, 0);
    REQUIRE(settle(h.tx, hfds[0], 0, 60000) == 0);
    ch_tx_close(h.tx);
    close(hfds[0]);
    hfds[0] = -1;
    pthread_join(hrd.th, NULL);
    hrd_started = 0;
    CHECK_EQ(hrd.end, CH_ERR_EOF);
    CHECK(!hrd.bad_seq);
    CHECK_EQ(hrd.nseq, h.sent);
    CHECK(h.sent > 0);
out:
    if (h_started) {
        __atomic_store_n(&h.stop, 1, __ATOMIC_RELAXED);
        pthread_join(h.th, NULL);
    }
    if (fds[0] >= 0) {
        ch_tx_close(tx);
        close(fds[0]);
    }
    if (hfds[0] >= 0) {
        ch_tx_close(h.tx);
        close(hfds[0]);
    }
    if (rd_started)
        pthread_join(rd.th, NULL);
    if (hrd_started)
        pthread_join(hrd.th, NULL);
    if (fds[1] >= 0)
        close(fds[1]);
    if (hfds[1] >= 0)
        close(hfds[1]);
    ch_tx_free(tx);
    ch_tx_free(h.tx);
}

/* ---- main ----------------------------------------------------------------------- */

struct test {
    const char *name;
    void (*fn)(void);
};

#define T(f) {#f, f}
static const struct test tests[] = {
    T(test_feed_roundtrip_random_splits),
    T(test_one_byte_at_a_time),
    T(test_socket_roundtrip_raw_writes),
    T(test_socket_roundtrip_tx),
    T(test_socket_roundtrip_two_processes),
    T(test_large_frame_then_small),
    T(test_read_zero_means_would_block),
    T(test_thousand_frames_one_read),
    T(test_frames_cap_per_call),
    T(test_push_batch_then_flush),
    T(test_partial_writes_then_flush),
    T(test_send_on_full_socket_queues_whole_frame),
    T(test_msgsize_rejected_queue_usable),
    T(test_rx_new_bounds),
    T(test_toobig_before_allocation),
    T(test_max_len_boundary),
    T(test_malformed_header),
    T(test_malformed_after_frames_socket),
    T(test_eof_variants_socket),
    T(test_eof_immediate_and_empty_frame),
    T(test_eof_verdict_feed),
    T(test_epipe_sigpipe_default),
    T(test_epipe_with_queued_bytes),
    T(test_socketpair_flags),
    T(test_envelope_helpers),
    T(test_post_policy),
    T(test_post_each),
    T(test_post_direct_rest_goes_to_the_writer),
    T(test_post_threads_order),
    T(test_post_burst_coalesces),
    T(test_post_stalled_socket),
    T(test_post_peer_closed),
    T(test_post_close_while_queued),
    T(test_post_append_during_partial_write),
    T(test_close_waits_for_writer_sendmsg),
    T(test_post_fork),
};

int main(int argc, char **argv)
{
    const char *env = getenv("CH_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 0) : (uint64_t)getpid() ^ (uint64_t)time(NULL);
    printf("test_frame: CH_TEST_SEED=%" PRIu64 "\n", seed);
    fflush(stdout);
    /* CH_TEST_SKIP: names of tests to leave out (csrc/checks.sh leaves
     * test_post_fork out of the sanitized run: see there). */
    const char *skip = getenv("CH_TEST_SKIP");
    int passed = 0, failed = 0;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        if (skip && strstr(skip, tests[i].name)) {
            printf("skip %s (CH_TEST_SKIP)\n", tests[i].name);
            continue;
        }
        if (argc > 1) {
            int want = 0;
            for (int a = 1; a < argc; a++)
                want |= strcmp(argv[a], tests[i].name) == 0;
            if (!want)
                continue;
        }
        g_test = tests[i].name;
        g_fail = 0;
        g_rng = (seed + i) * 0x9E3779B97F4A7C15ULL | 1;
        alarm(120); /* a hang is a failure too: SIGALRM kills the driver */
        tests[i].fn();
        alarm(0);
        if (g_fail) {
            failed++;
            printf("FAIL %s\n", tests[i].name);
        } else {
            passed++;
            printf("ok   %s\n", tests[i].name);
        }
        fflush(stdout);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
