/*
 * fuzz_frame.c - libFuzzer harness for the frame parser (ch_rx_feed /
 * ch_rx_read / ch_rx_eof in csrc/frame.c) and the envelope parser
 * (ch_msg_parse in csrc/envelope.h) over every frame it hands out.
 *
 * Build and run (csrc/checks.sh does this with a time limit):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *         -Icsrc csrc/fuzz/fuzz_frame.c csrc/frame.c -o fuzz_frame
 *   cp -r csrc/fuzz/corpus/frame /tmp/corpus && ./fuzz_frame /tmp/corpus
 *
 * Input layout (PREFIX bytes of parameters, then the byte stream itself):
 *   in[0]      bits 0-1  how max_len is chosen (see pick_max_len)
 *              bit  2    also push the stream through a real socketpair
 *              bits 3-7  which declared length max_len is taken around
 *   in[1]      signed offset added to that declared length (max_len +- 128),
 *              or the small max_len itself
 *   in[2..5]   seed of the split sizes
 *   in[6]      when its low two bits are 3, the stream is the rest of the
 *              input repeated 1 + (in[6] >> 2) times (up to 64: streams and
 *              frames beyond the 256 KiB default buffer, so the buffer's
 *              sliding, growing and shrinking are reached from small inputs)
 *
 * The stream is parsed by a reference model written from frame.h (not from
 * frame.c) and by the library in several ways: all at once, in random
 * splits, one byte at a time (short streams), and through a socketpair.
 * Each way must hand out exactly the model's frames (same bytes, same
 * order, lengths <= max_len, at most CH_RX_MAX_FRAMES per call, payloads
 * inside the library's buffer: ASan checks every byte compared) and reach
 * the model's final verdict (EOF, TRUNCATED, MALFORMED or TOOBIG).  Each
 * payload handed out is also read as a message envelope, in the library's
 * buffer, by ch_msg_parse and by a model written from envelope.h's layout:
 * same verdict, same fields, and ch_msg_put gives back the same bytes.
 */
#define _GNU_SOURCE
#include "envelope.h"
#include "frame.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define PREFIX 7
/* Keep allocations modest: libFuzzer's malloc limit is the RSS limit (2 GiB). */
#define FUZZ_MAX_LEN (4u << 20)
/* Longest stream also sent through a socketpair (each run costs syscalls). */
#define SOCKET_MAX_STREAM (64u << 10)

#define FAIL(...)                                                   \
    do {                                                            \
        fprintf(stderr, "fuzz_frame: invariant broken: " __VA_ARGS__); \
        fprintf(stderr, "\n");                                      \
        abort();                                                    \
    } while (0)

/* One frame as the model sees it: payload offset in the stream and length. */
typedef struct {
    size_t off;
    uint32_t len;
} mframe;

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/*
 * The reference parser, from the wire format in frame.h: fills fr (if not
 * NULL) with the complete frames and returns the final verdict.
 */
static int model(const uint8_t *s, size_t n, size_t max_len, mframe *fr, size_t *nfr)
{
    size_t pos = 0, k = 0;
    int verdict;
    for (;;) {
        if (n - pos < CH_FRAME_HEADER) {
            verdict = pos == n ? CH_ERR_EOF : CH_ERR_TRUNCATED;
            break;
        }
        const uint8_t *h = s + pos;
        if (h[0] != 0x43 || h[1] != 0x48 || h[2] != 0 || h[3] != 0) {
            verdict = CH_ERR_MALFORMED;
            break;
        }
        uint32_t len = le32(h + 4);
        if (len > max_len) {
            verdict = CH_ERR_TOOBIG;
            break;
        }
        if (n - pos - CH_FRAME_HEADER < len) {
            verdict = CH_ERR_TRUNCATED;
            break;
        }
        if (fr) {
            fr[k].off = pos + CH_FRAME_HEADER;
            fr[k].len = len;
        }
        k++;
        pos += CH_FRAME_HEADER + len;
    }
    *nfr = k;
    return verdict;
}

/* max_len chosen from the parameters: small, around a declared length, or large. */
static size_t pick_max_len(const uint8_t *in, const uint8_t *s, size_t n)
{
    size_t m;
    switch (in[0] & 3) {
    case 0: /* small */
        m = 1 + in[1];
        break;
    case 1:
    case 2: { /* around the declared length of the k-th header that parses */
        size_t want = (in[0] >> 3) % (in[0] & 2 ? 32 : 1), pos = 0, k = 0;
        uint32_t declared = 0;
        while (n - pos >= CH_FRAME_HEADER) {
            declared = le32(s + pos + 4);
            if (k++ == want)
                break;
            if (n - pos - CH_FRAME_HEADER < declared)
                break;
            pos += CH_FRAME_HEADER + declared;
        }
        int64_t v = (int64_t)declared + (int8_t)in[1];
        m = v < 1 ? 1 : (size_t)v;
        break;
    }
    default: /* large */
        m = FUZZ_MAX_LEN;
        break;
    }
    return m > FUZZ_MAX_LEN ? FUZZ_MAX_LEN : m;
}

static uint64_t g_rng;

static size_t next_split(size_t left)
{
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    uint64_t r = g_rng * 0x2545F4914F6CDD1DULL;
    static const size_t caps[] = {1, 2, 8, 9, 16, 64, 4096, 65536};
    size_t c = 1 + (size_t)((r >> 8) % caps[r & 7]);
    return c < left ? c : left;
}

/* The envelope of payload p (len bytes) by ch_msg_parse against the layout
 * of envelope.h read by hand. */
static void check_envelope(const uint8_t *p, size_t len)
{
    ch_msg m;
    int r = ch_msg_parse(p, len, &m);
    size_t nlen = len >= 15 ? (size_t)p[13] | (size_t)p[14] << 8 : 0;
    if (len < 15 || 15 + nlen > len) {
        if (r != -EPROTO)
            FAIL("envelope of %zu bytes (name %zu): parse %d, model -EPROTO", len, nlen, r);
        return;
    }
    if (r != 0)
        FAIL("envelope of %zu bytes (name %zu): parse %d, model 0", len, nlen, r);
    uint64_t rid = 0;
    for (int i = 7; i >= 0; i--)
        rid = rid << 8 | p[5 + i];
    if (m.kind != p[0] || m.origin != le32(p + 1) || m.rid != rid)
        FAIL("envelope fields differ");
    if (m.name != p + 15 || m.name_len != nlen || m.body != p + 15 + nlen ||
        m.body_len != len - 15 - nlen)
        FAIL("envelope name/body differ");
    uint8_t e[CH_MSG_HEADER];
    ch_msg_put(e, m.kind, m.origin, m.rid, m.name_len);
    if (memcmp(e, p, CH_MSG_HEADER) != 0)
        FAIL("ch_msg_put does not give back the envelope");
}

/* Check the n frames just handed out against the model's frames from *k on. */
static void check_frames(ch_rx *rx, int n, const uint8_t *s, const mframe *fr, size_t nfr,
                         size_t *k, size_t max_len)
{
    if (n < 0 || n > CH_RX_MAX_FRAMES)
        FAIL("frame count %d", n);
    const uint8_t *data = ch_rx_data(rx);
    const uint32_t *f = ch_rx_frames(rx);
    for (int i = 0; i < n; i++, (*k)++) {
        uint32_t off = f[2 * i], len = f[2 * i + 1];
        if (len > max_len)
            FAIL("frame length %u > max_len %zu", len, max_len);
        if (*k >= nfr)
            FAIL("more frames than the model's %zu", nfr);
        if (len != fr[*k].len)
            FAIL("frame %zu length %u, model %u", *k, len, fr[*k].len);
        if (len && memcmp(data + off, s + fr[*k].off, len) != 0)
            FAIL("frame %zu content differs", *k);
        check_envelope(data + off, len);
    }
}

/*
 * Parse through ch_rx_feed in pieces (split: 0 = one piece, 1 = random sizes,
 * 2 = one byte at a time).  Returns the verdict; *k gets the frame count.
 */
static int parse_feed(const uint8_t *s, size_t n, size_t max_len, int split, const mframe *fr,
                      size_t nfr, size_t *k)
{
    ch_rx *rx;
    if (ch_rx_new(max_len, &rx) != 0)
        FAIL("ch_rx_new(%zu)", max_len);
    size_t off = 0;
    int verdict = 0;
    *k = 0;
    while (off < n) {
        size_t piece = split == 0 ? n - off : split == 2 ? 1 : next_split(n - off), used = 0;
        int r = ch_rx_feed(rx, s + off, piece, &used);
        if (used > piece)
            FAIL("used %zu > offered %zu", used, piece);
        if (r < 0) {
            verdict = r;
            break;
        }
        check_frames(rx, r, s, fr, nfr, k, max_len);
        if (r == 0 && used == 0)
            FAIL("no progress at %zu/%zu", off, n);
        off += used;
    }
    while (verdict == 0) { /* frames beyond the per-call cap, then the verdict */
        size_t used = 1;
        int r = ch_rx_feed(rx, NULL, 0, &used);
        if (used != 0)
            FAIL("used %zu of nothing", used);
        if (r < 0)
            verdict = r;
        else if (r == 0)
            verdict = ch_rx_eof(rx);
        else
            check_frames(rx, r, s, fr, nfr, k, max_len);
    }
    if (verdict == CH_ERR_MALFORMED || verdict == CH_ERR_TOOBIG) { /* sticky */
        size_t used = 1;
        uint8_t z = 0;
        if (ch_rx_feed(rx, &z, 1, &used) != verdict || used != 0)
            FAIL("protocol error %d not sticky", verdict);
    }
    ch_rx_free(rx);
    return verdict;
}

/* Parse through a real socketpair, writing in random pieces, then closing. */
static int parse_socket(const uint8_t *s, size_t n, size_t max_len, const mframe *fr, size_t nfr,
                        size_t *k)
{
    int fds[2];
    ch_rx *rx;
    if (ch_socketpair(fds) != 0)
        FAIL("ch_socketpair: %s", strerror(errno));
    if (ch_rx_new(max_len, &rx) != 0)
        FAIL("ch_rx_new(%zu)", max_len);
    size_t off = 0;
    int verdict = 0, writer_open = 1;
    *k = 0;
    while (verdict == 0) {
        if (off < n) {
            ssize_t w = write(fds[0], s + off, next_split(n - off));
            if (w > 0)
                off += (size_t)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR)
                FAIL("write: %s", strerror(errno));
        }
        if (off == n && writer_open) {
            close(fds[0]);
            writer_open = 0;
        }
        for (;;) {
            int r = ch_rx_read(rx, fds[1]);
            if (r < 0) {
                verdict = r;
                break;
            }
            if (r == 0) {
                if (!writer_open)
                    FAIL("would block after the writer closed");
                break;
            }
            check_frames(rx, r, s, fr, nfr, k, max_len);
        }
    }
    if (writer_open)
        close(fds[0]);
    close(fds[1]);
    ch_rx_free(rx);
    return verdict;
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size)
{
    if (size < PREFIX)
        return 0;
    const uint8_t *s = in + PREFIX;
    size_t n = size - PREFIX;
    uint8_t *rep = NULL;
    if ((in[6] & 3) == 3 && n > 0) {
        size_t times = 1 + (in[6] >> 2);
        rep = malloc(n * times);
        if (!rep)
            abort();
        for (size_t i = 0; i < times; i++)
            memcpy(rep + i * n, s, n);
        s = rep;
        n *= times;
    }
    size_t max_len = pick_max_len(in, s, n);
    uint64_t seed = le32(in + 2);

    size_t nfr;
    model(s, n, max_len, NULL, &nfr);
    mframe *fr = malloc((nfr ? nfr : 1) * sizeof *fr);
    if (!fr)
        abort();
    int want = model(s, n, max_len, fr, &nfr);

    size_t k;
    int v = parse_feed(s, n, max_len, 0, fr, nfr, &k);
    if (v != want || k != nfr)
        FAIL("one piece: verdict %d frames %zu, model %d %zu", v, k, want, nfr);
    g_rng = seed * 0x9E3779B97F4A7C15ULL | 1;
    v = parse_feed(s, n, max_len, 1, fr, nfr, &k);
    if (v != want || k != nfr)
        FAIL("random splits: verdict %d frames %zu, model %d %zu", v, k, want, nfr);
    if (n <= 512) {
        v = parse_feed(s, n, max_len, 2, fr, nfr, &k);
        if (v != want || k != nfr)
            FAIL("byte by byte: verdict %d frames %zu, model %d %zu", v, k, want, nfr);
    }
    if ((in[0] & 4) && n <= SOCKET_MAX_STREAM) {
        g_rng = seed * 0xD1B54A32D192ED03ULL | 1;
        v = parse_socket(s, n, max_len, fr, nfr, &k);
        if (v != want || k != nfr)
            FAIL("socketpair: verdict %d frames %zu, model %d %zu", v, k, want, nfr);
    }
    free(fr);
    free(rep);
    return 0;
}
