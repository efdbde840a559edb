/*
 * fuzz_keys.c - libFuzzer harness for the lock table's key handling
 * (ch_lt_resolve / ch_lt_find / ch_lt_trylock / ch_lt_unlock / ch_lt_is_locked
 * / ch_lt_slot_info in csrc/locktable.c), single-threaded on a small table.
 *
 * Build and run (csrc/checks.sh does this with a time limit):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *         -Icsrc csrc/fuzz/fuzz_keys.c csrc/locktable.c -pthread -o fuzz_keys
 *   cp -r csrc/fuzz/corpus/keys /tmp/corpus && ./fuzz_keys /tmp/corpus
 *
 * Input: in[0] picks the table size (1 .. 16 slots); then a sequence of
 * operations, each an op byte and its arguments (see next_key / the switch
 * below).  Keys have any length 0 .. 256 (0 and 256 must be -EINVAL, 1 and
 * 255 fine) and arbitrary bytes, NULs included; each key is passed in a
 * malloc'ed buffer of exactly its length, so ASan catches any read past it.
 *
 * One thread is the only user, so the outcome of every call is known from
 * what this thread holds (model below): a held key keeps its slot; a key not
 * held may be evicted by any insert; an insert fails with -ENOSPC exactly
 * when every slot is held.  ch_lt_check runs after every operation, and the
 * table must close cleanly once everything is unlocked.
 */
#define _GNU_SOURCE
#include "locktable.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_SLOTS 16
#define HISTORY 8

#define FAIL(...)                                                      \
    do {                                                               \
        fprintf(stderr, "fuzz_keys: invariant broken: " __VA_ARGS__); \
        fprintf(stderr, "\n");                                         \
        abort();                                                       \
    } while (0)

#define EXPECT(call, cond)                                                        \
    do {                                                                          \
        int r_ = (call);                                                          \
        if (!(cond))                                                              \
            FAIL("%s returned %d (line %d, op %zu)", #call, r_, __LINE__, g_op); \
    } while (0)

typedef struct {
    uint8_t b[CH_LT_KEY_MAX + 1];
    size_t len;
} key;

/* The model: the keys this thread holds, with their slots. */
typedef struct {
    key k;
    uint32_t slot;
} held;

static held g_held[MAX_SLOTS];
static size_t g_nheld, g_op;
static key g_hist[HISTORY];
static size_t g_nhist;

static const uint8_t *g_in;
static size_t g_left;

static uint8_t next_byte(void)
{
    if (!g_left)
        return 0;
    g_left--;
    return *g_in++;
}

/* A key from the input: a length selector, then that many bytes (padded). */
static void next_key(key *k)
{
    uint8_t sel = next_byte();
    if (sel <= 200)
        k->len = sel % 24;
    else if (sel == 201)
        k->len = 0;
    else if (sel == 202)
        k->len = CH_LT_KEY_MAX + 1; /* 256: one too long */
    else if (sel == 203)
        k->len = CH_LT_KEY_MAX;
    else
        k->len = (size_t)(sel - 204) * 5; /* 0 .. 255 */
    for (size_t i = 0; i < k->len; i++)
        k->b[i] = g_left ? next_byte() : (uint8_t)('k' + i);
    if (g_nhist < HISTORY)
        g_hist[g_nhist++] = *k;
    else
        g_hist[g_op % HISTORY] = *k;
}

/* A key used before (or a new one if none was). */
static void old_key(key *k)
{
    uint8_t i = next_byte();
    if (!g_nhist) {
        next_key(k);
        return;
    }
    *k = g_hist[i % g_nhist];
}

static int valid(const key *k)
{
    return k->len >= 1 && k->len <= CH_LT_KEY_MAX;
}

static held *find_held(const key *k)
{
    for (size_t i = 0; i < g_nheld; i++)
        if (g_held[i].k.len == k->len && memcmp(g_held[i].k.b, k->b, k->len) == 0)
            return &g_held[i];
    return NULL;
}

static held *held_slot(uint32_t slot)
{
    for (size_t i = 0; i < g_nheld; i++)
        if (g_held[i].slot == slot)
            return &g_held[i];
    return NULL;
}

static void add_held(const key *k, uint32_t slot)
{
    if (g_nheld >= MAX_SLOTS || held_slot(slot))
        FAIL("slot %u handed out twice", slot);
    g_held[g_nheld].k = *k;
    g_held[g_nheld].slot = slot;
    g_nheld++;
}

static void drop_held(held *h)
{
    *h = g_held[--g_nheld];
}

/* The key in an exactly sized heap buffer (so ASan sees any overread). */
static uint8_t *exact(const key *k)
{
    uint8_t *p = malloc(k->len ? k->len : 1);
    if (!p)
        abort();
    memcpy(p, k->b, k->len);
    return p;
}

static int resolve(ch_table *t, const key *k, uint32_t *slot, uint64_t *gen)
{
    uint8_t *p = exact(k);
    int r = ch_lt_resolve(t, p, k->len, slot, gen);
    free(p);
    return r;
}

static int find(ch_table *t, const key *k, uint32_t *slot, uint64_t *gen)
{
    uint8_t *p = exact(k);
    int r = ch_lt_find(t, p, k->len, slot, gen);
    free(p);
    return r;
}

static void op_resolve(ch_table *t, uint32_t nslots, const key *k)
{
    uint32_t slot = 0xdead;
    uint64_t gen = 0;
    int r = resolve(t, k, &slot, &gen);
    if (!valid(k)) {
        if (r != -EINVAL)
            FAIL("resolve of a %zu-byte key: %d, want -EINVAL", k->len, r);
        return;
    }
    held *h = find_held(k);
    if (h) {
        if (r != 0 || slot != h->slot)
            FAIL("resolve of a held key: %d slot %u, want 0 slot %u", r, slot, h->slot);
        EXPECT(ch_lt_trylock(t, slot, gen), r_ == -EDEADLK);
        return;
    }
    if (g_nheld == nslots) {
        if (r != -ENOSPC)
            FAIL("resolve with every slot held: %d, want -ENOSPC", r);
        return;
    }
    if (r == CH_LT_NEW) {
        if (slot >= nslots)
            FAIL("new slot %u of %u", slot, nslots);
        add_held(k, slot);
    } else if (r == 0) {
        if (slot >= nslots || held_slot(slot))
            FAIL("resolve found slot %u, held or out of range", slot);
        EXPECT(ch_lt_is_locked(t, slot, gen), r_ == 0);
        EXPECT(ch_lt_trylock(t, slot, gen), r_ == 0);
        add_held(k, slot);
    } else {
        FAIL("resolve with %zu of %u slots held: %d", g_nheld, nslots, r);
    }
    EXPECT(ch_lt_is_locked(t, slot, gen), r_ == 1);
}

static void op_find(ch_table *t, uint32_t nslots, const key *k)
{
    uint32_t slot = 0xdead;
    uint64_t gen = 0;
    int r = find(t, k, &slot, &gen);
    if (!valid(k)) {
        if (r != -EINVAL)
            FAIL("find of a %zu-byte key: %d, want -EINVAL", k->len, r);
        return;
    }
    held *h = find_held(k);
    if (h) {
        if (r != 0 || slot != h->slot)
            FAIL("find of a held key: %d slot %u, want 0 slot %u", r, slot, h->slot);
        EXPECT(ch_lt_is_locked(t, slot, gen), r_ == 1);
        return;
    }
    if (r == -ENOENT)
        return;
    if (r != 0 || slot >= nslots || held_slot(slot))
        FAIL("find of a key not held: %d slot %u", r, slot);
    EXPECT(ch_lt_is_locked(t, slot, gen), r_ == 0);
}

static void op_unlock_key(ch_table *t, const key *k)
{
    held *h = find_held(k);
    if (h) {
        EXPECT(ch_lt_unlock(t, h->slot), r_ == 0);
        EXPECT(ch_lt_unlock(t, h->slot), r_ == -EPERM);
        drop_held(h);
        return;
    }
    uint32_t slot;
    uint64_t gen;
    if (valid(k) && find(t, k, &slot, &gen) == 0)
        EXPECT(ch_lt_unlock(t, slot), r_ == -EPERM);
}

static void op_slot(ch_table *t, uint32_t nslots, uint8_t arg)
{
    uint32_t slot = arg % (nslots + 2);
    if (arg & 0x80)
        slot = arg & 1 ? UINT32_MAX : CH_LT_SLOT_NONE;
    held *h = slot < nslots ? held_slot(slot) : NULL;
    ch_lt_info info;
    int r = ch_lt_slot_info(t, slot, &info);
    if (slot >= nslots) {
        if (r != -EINVAL)
            FAIL("slot_info(%u) of %u slots: %d", slot, nslots, r);
        EXPECT(ch_lt_unlock(t, slot), r_ == -EINVAL);
        EXPECT(ch_lt_trylock(t, slot, 0), r_ == -EINVAL);
        EXPECT(ch_lt_is_locked(t, slot, 0), r_ == -EINVAL);
        return;
    }
    if (h) {
        if (r != 1 || info.keylen != h->k.len || memcmp(info.key, h->k.b, h->k.len) != 0)
            FAIL("slot_info(%u) of a held slot: %d keylen %u", slot, r, info.keylen);
        if (arg & 0x40) { /* release it through the slot */
            EXPECT(ch_lt_unlock(t, slot), r_ == 0);
            drop_held(h);
        }
    } else {
        if (r != 0)
            FAIL("slot_info(%u) of a slot not held: %d", slot, r);
        EXPECT(ch_lt_unlock(t, slot), r_ == -EPERM);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *in, size_t size)
{
    if (size < 1)
        return 0;
    uint32_t nslots = 1 + in[0] % MAX_SLOTS;
    g_in = in + 1;
    g_left = size - 1;
    g_nheld = g_nhist = g_op = 0;
    ch_table *t;
    int r = ch_lt_create(nslots, &t);
    if (r != 0)
        FAIL("ch_lt_create(%u): %d", nslots, r);
    key k;
    while (g_left && g_op < 4096) {
        uint8_t op = next_byte();
        switch (op % 8) {
        case 0: next_key(&k); op_resolve(t, nslots, &k); break;
        case 1: old_key(&k); op_resolve(t, nslots, &k); break;
        case 2: next_key(&k); op_find(t, nslots, &k); break;
        case 3: old_key(&k); op_find(t, nslots, &k); break;
        case 4: old_key(&k); op_unlock_key(t, &k); break;
        case 5: next_key(&k); op_unlock_key(t, &k); break;
        case 6: op_slot(t, nslots, next_byte()); break;
        case 7: { /* every held key still maps to its slot */
            for (size_t i = 0; i < g_nheld; i++)
                op_find(t, nslots, &g_held[i].k);
            EXPECT(ch_lt_busy(t), r_ == (int)g_nheld);
            break;
        }
        }
        EXPECT(ch_lt_check(t), r_ == 0);
        g_op++;
    }
    while (g_nheld) {
        EXPECT(ch_lt_unlock(t, g_held[g_nheld - 1].slot), r_ == 0);
        g_nheld--;
    }
    EXPECT(ch_lt_busy(t), r_ == 0);
    EXPECT(ch_lt_check(t), r_ == 0);
    EXPECT(ch_lt_close(t), r_ == 0);
    return 0;
}
