/* locktable.c - shared-memory table of named robust locks (see locktable.h).
 *
 * Concurrency rules of the shared region:
 *  - The table mutex guards the index: bucket heads, each slot's `hash` and
 *    `next`, and the clock hand.
 *  - A slot's mapping (`gen`, `keylen`, `key`) changes only in a thread that
 *    holds the table mutex AND the slot's mutex.  So a thread holding a slot's
 *    mutex sees a stable `gen`: it validates its cached gen after acquiring.
 *  - Holder fields, `recovered_pending` and `referenced` are written by the
 *    slot's holder; others read them as racy snapshots (relaxed atomics).
 *  - A process may die at any instruction.  Slots recover through their
 *    robust mutex; the index is rebuilt from the slots whenever the table
 *    mutex comes back EOWNERDEAD.  Invariant outside the table mutex: a slot
 *    is linked in exactly one chain iff keylen != 0, and a key is in at most
 *    one slot.
 */
#define _GNU_SOURCE
#include "locktable.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef __GLIBC__
#error "locktable.c reads glibc's pthread_mutex_t futex word (__data.__lock)"
#endif

#define LT_MAGIC UINT64_C(0x3154424c42554843) /* "CHUBLBT1" */
#define LT_LAYOUT 2u
#define NIL UINT32_MAX
#define CACHELINE 64

#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

struct lt_header {
    uint64_t magic;
    uint32_t layout;
    uint32_t mutex_size; /* sizeof(pthread_mutex_t) of the creator */
    uint32_t slot_size;
    uint32_t nslots;
    uint32_t nbuckets; /* power of two >= nslots */
    uint32_t hand;     /* clock hand for claiming slots */
    uint32_t ntombs;   /* tombstones in use (0: skip the search) */
    uint32_t tomb_next; /* ring position of the next tombstone */
    uint64_t slots_off;
    uint64_t total_size;
    pthread_mutex_t mutex; /* the table mutex */
    uint32_t buckets[];    /* chain heads (slot index or NIL) */
};

struct lt_slot {
    /* First cache line: all that an uncontended acquire/release touches. */
    pthread_mutex_t m;
    uint64_t gen;              /* bumped whenever the slot changes key */
    int32_t holder_pid;        /* diagnostics; valid while holder_tid is */
    int32_t holder_wid;        /* the owner TID in the futex word */
    int32_t holder_tid;
    uint8_t recovered_pending; /* the key's last holder died: tell the next */
    uint8_t referenced;        /* CLOCK second-chance bit, set on acquire */
    uint8_t pad_[2];
    /* Mapping and index. */
    int32_t waiters; /* hint: threads blocked in timedlock (a dead waiter
                        leaves it too high: it only deprioritises eviction) */
    uint32_t hash;
    uint32_t keylen; /* 0 = empty; written last so half a key never matches */
    uint32_t next;   /* bucket chain */
    uint8_t key[CH_LT_KEY_MAX];
} __attribute__((aligned(CACHELINE)));

/* A key whose holder died and whose slot was then given to another key (the
 * table was full): its next acquirer must still be told "recovered".  Ring of
 * nslots entries after the slots, guarded by the table mutex; keylen is
 * written last, so a half-written tombstone is just ignored. */
struct lt_tomb {
    uint32_t keylen; /* 0 = free */
    uint32_t hash;
    uint8_t key[CH_LT_KEY_MAX];
};

struct ch_table {
    struct lt_header *h;
    struct lt_slot *slots;
    struct lt_tomb *tombs;
    size_t maplen;
    uint32_t nslots, mask; /* validated private copies: never trust the map */
    int fd;
    uint32_t id; /* in g_tables; 0 once closed or disabled */
    int32_t worker_id;
    atomic_int inflight; /* timedlock/resolve calls in progress */
};

/* ---- process / thread state ------------------------------------------------- */

static pid_t g_pid;              /* getpid() is a system call: cache it */
/* Open tables by id (1..CH_LT_MAX_TABLES), for refs.  Writes under g_reg_mu;
 * reads are atomic loads (the hot path never blocks on the mutex). */
static ch_table *g_tables[CH_LT_MAX_TABLES + 1];
static pthread_mutex_t g_reg_mu = PTHREAD_MUTEX_INITIALIZER;
static __thread uint32_t tl_held; /* robust mutexes this thread holds */
static atomic_int g_crashpoint;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void atfork_child(void)
{
    g_pid = getpid();
    tl_held = 0; /* the parent's thread held those, not us */
}

static void init_once(void)
{
    g_pid = getpid();
    pthread_atfork(NULL, NULL, atfork_child);
}

__attribute__((noinline, cold)) static void crash_now(void)
{
    raise(SIGKILL);
    for (;;)
        pause();
}

/* The barrier makes every store before the point really happen first. */
#define CRASHPOINT(n)                                                              \
    do {                                                                           \
        __asm__ volatile("" ::: "memory");                                         \
        if (__builtin_expect(atomic_load_explicit(&g_crashpoint, memory_order_relaxed) \
                                 == (n), 0))                                       \
            crash_now();                                                           \
    } while (0)

#define NCRASHPOINTS 14

void ch_lt_set_crashpoint(int n) { atomic_store(&g_crashpoint, n > 0 ? n : 0); }
int ch_lt_crashpoint_count(void) { return NCRASHPOINTS; }

int64_t ch_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- helpers -------------------------------------------------------------------- */

static int registry_add(ch_table *t);

/* The futex word of a glibc mutex: owner TID | FUTEX_OWNER_DIED | FUTEX_WAITERS. */
static inline uint32_t futex_word(const pthread_mutex_t *m)
{
    return (uint32_t)__atomic_load_n(&m->__data.__lock, __ATOMIC_ACQUIRE);
}

static inline bool held_by_live(uint32_t w)
{
    return (w & FUTEX_TID_MASK) != 0 && !(w & FUTEX_OWNER_DIED);
}

static inline uint64_t gen_of(const struct lt_slot *s)
{
    return __atomic_load_n(&s->gen, __ATOMIC_ACQUIRE);
}

/* Refs carry only the low 32 bits of a generation: a stale ref could match
 * again only after exactly 2^32 reassignments of its slot. */
static inline bool gen_is(const struct lt_slot *s, uint64_t gen)
{
    return (uint32_t)gen_of(s) == (uint32_t)gen;
}

static uint32_t hash_key(const uint8_t *key, size_t len)
{
    uint64_t h = UINT64_C(0xcbf29ce484222325); /* FNV-1a */
    for (size_t i = 0; i < len; i++)
        h = (h ^ key[i]) * UINT64_C(0x100000001b3);
    return (uint32_t)(h ^ (h >> 32));
}

static int init_robust_mutex(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    int r = pthread_mutexattr_init(&a);
    if (r)
        return -r;
    if ((r = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)))
        goto fail;
    if ((r = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)))
        goto fail;
    /* EDEADLK on relock and EPERM on a foreign unlock instead of UB. */
    if ((r = pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK)))
        goto fail;
    r = pthread_mutex_init(m, &a);
fail:
    pthread_mutexattr_destroy(&a);
    return -r;
}

/* Geometry for nslots: bucket count, slot array offset, total size. */
static int geometry(uint32_t nslots, uint32_t *nbuckets, uint64_t *slots_off, uint64_t *total)
{
    if (nslots < 1 || nslots > CH_LT_SLOTS_MAX)
        return -EINVAL;
    uint32_t nb = 1;
    while (nb < nslots)
        nb <<= 1;
    uint64_t hdr = offsetof(struct lt_header, buckets) + (uint64_t)nb * sizeof(uint32_t);
    *nbuckets = nb;
    *slots_off = (hdr + CACHELINE - 1) & ~(uint64_t)(CACHELINE - 1);
    *total = *slots_off + (uint64_t)nslots * (sizeof(struct lt_slot) + sizeof(struct lt_tomb));
    return 0;
}

static void set_region(ch_table *t, void *p, size_t len)
{
    t->h = p;
    t->maplen = len;
    t->nslots = t->h->nslots;
    t->mask = t->h->nbuckets - 1;
    t->slots = (struct lt_slot *)((char *)p + t->h->slots_off);
    t->tombs = (struct lt_tomb *)(t->slots + t->nslots);
}

/* Keep the recovery of slot v's key, whose slot is being taken (table mutex held). */
static void bury(ch_table *t, uint32_t v)
{
    struct lt_header *h = t->h;
    const struct lt_slot *s = &t->slots[v];
    uint32_t kl = s->keylen;
    if (kl == 0 || kl > CH_LT_KEY_MAX)
        return;
    uint32_t i = h->tomb_next < t->nslots ? h->tomb_next : 0;
    struct lt_tomb *tb = &t->tombs[i];
    if (tb->keylen == 0)
        h->ntombs++; /* else the oldest tombstone is overwritten */
    __atomic_store_n(&tb->keylen, 0, __ATOMIC_RELEASE);
    memcpy(tb->key, s->key, kl);
    tb->hash = s->hash;
    __atomic_store_n(&tb->keylen, kl, __ATOMIC_RELEASE);
    h->tomb_next = i + 1 < t->nslots ? i + 1 : 0;
}

/* Whether `key` has a tombstone; removes it (table mutex held). */
static bool unbury(ch_table *t, const uint8_t *key, uint32_t keylen, uint32_t hash)
{
    if (t->h->ntombs == 0)
        return false;
    for (uint32_t i = 0; i < t->nslots; i++) {
        struct lt_tomb *tb = &t->tombs[i];
        if (tb->keylen == keylen && tb->hash == hash && !memcmp(tb->key, key, keylen)) {
            tb->keylen = 0;
            t->h->ntombs--;
            return true;
        }
    }
    return false;
}

/* ---- index (table mutex held) ------------------------------------------------ */

/* Rebuild the chains from the slots: a thread died holding the table mutex,
 * anywhere in an insert.  Idempotent, so dying in here is fine too. */
static void table_repair(ch_table *t)
{
    struct lt_header *h = t->h;
    if (h->hand >= t->nslots)
        h->hand = 0;
    h->ntombs = 0; /* recount: a bury may have been cut short */
    for (uint32_t i = 0; i < t->nslots; i++)
        h->ntombs += t->tombs[i].keylen != 0;
    for (uint32_t b = 0; b <= t->mask; b++)
        h->buckets[b] = NIL;
    for (uint32_t i = 0; i < t->nslots; i++) {
        if (i == t->nslots / 2)
            CRASHPOINT(13);
        struct lt_slot *s = &t->slots[i];
        uint32_t kl = s->keylen;
        s->next = NIL;
        if (kl == 0 || kl > CH_LT_KEY_MAX)
            continue; /* empty (or never written: keylen comes last) */
        s->hash = hash_key(s->key, kl);
        uint32_t *head = &h->buckets[s->hash & t->mask];
        s->next = *head;
        *head = i;
    }
}

static int table_lock(ch_table *t)
{
    int r = pthread_mutex_lock(&t->h->mutex);
    if (r == EOWNERDEAD) {
        table_repair(t);
        r = pthread_mutex_consistent(&t->h->mutex);
    }
    return -r;
}

static void table_unlock(ch_table *t) { pthread_mutex_unlock(&t->h->mutex); }

/* Chain walks are bounded by nslots so that a corrupt index cannot hang us. */
static uint32_t lookup(ch_table *t, const uint8_t *key, uint32_t keylen, uint32_t hash)
{
    uint32_t i = t->h->buckets[hash & t->mask];
    for (uint32_t steps = 0; i < t->nslots && steps < t->nslots; steps++) {
        const struct lt_slot *s = &t->slots[i];
        if (s->hash == hash && s->keylen == keylen && memcmp(s->key, key, keylen) == 0)
            return i;
        i = s->next;
    }
    return NIL;
}

static void unlink_slot(ch_table *t, uint32_t v)
{
    uint32_t *pp = &t->h->buckets[t->slots[v].hash & t->mask];
    for (uint32_t steps = 0; *pp < t->nslots && steps < t->nslots; steps++) {
        if (*pp == v) {
            *pp = t->slots[v].next;
            break;
        }
        pp = &t->slots[*pp].next;
    }
    t->slots[v].next = NIL;
}

/* Claim a slot for a new key with the CLOCK algorithm; returns its index with
 * its mutex held by the caller, or NIL when every slot is held.
 * Laps 1-2: empty slots, or unheld ones with no pending recovery, no waiter
 * and not used since the hand last passed.  Lap 3 (last resort, so capacity is
 * never lost for good): any slot whose futex has no live owner, including a
 * dead holder's (its key and pending recovery are forgotten). */
static uint32_t claim_slot(ch_table *t, bool *bury_old)
{
    uint32_t n = t->nslots;
    for (uint64_t step = 0; step < 3 * (uint64_t)n; step++) {
        bool last_resort = step >= 2 * (uint64_t)n;
        uint32_t i = t->h->hand;
        t->h->hand = i + 1 < n ? i + 1 : 0;
        struct lt_slot *s = &t->slots[i];
        uint32_t w = futex_word(&s->m);
        if (w & FUTEX_TID_MASK)
            continue;
        bool empty = s->keylen == 0;
        if (!last_resort && !empty) {
            if (w != 0 || LOAD(&s->recovered_pending) || LOAD(&s->waiters) > 0)
                continue;
            if (LOAD(&s->referenced)) {
                STORE(&s->referenced, 0);
                continue;
            }
        }
        int r = pthread_mutex_trylock(&s->m);
        if (r == EOWNERDEAD) {
            /* Its holder died since we looked.  Keep the recovery for the
             * key's next acquirer unless the key goes away anyway. */
            pthread_mutex_consistent(&s->m);
            if (!last_resort && !empty) {
                STORE(&s->recovered_pending, 1);
                pthread_mutex_unlock(&s->m);
                continue;
            }
        } else if (r != 0) {
            continue;
        }
        /* A dead holder's key loses its slot: remember it is to be recovered. */
        *bury_old = !empty && (r == EOWNERDEAD || LOAD(&s->recovered_pending));
        return i;
    }
    return NIL;
}

/* Give claimed slot v (both mutexes held) to `key`.  Every step may be the
 * last one of a killed process: table_repair makes any prefix consistent. */
static void install(ch_table *t, uint32_t v, const uint8_t *key, uint32_t keylen, uint32_t hash)
{
    struct lt_slot *s = &t->slots[v];
    CRASHPOINT(1);
    if (s->keylen != 0)
        unlink_slot(t, v);
    CRASHPOINT(2);
    /* Bump gen before the key changes: any cached (slot, gen) goes stale. */
    __atomic_fetch_add(&s->gen, 1, __ATOMIC_RELEASE);
    CRASHPOINT(3);
    __atomic_store_n(&s->keylen, 0, __ATOMIC_RELEASE);
    STORE(&s->recovered_pending, 0); /* belonged to the old key */
    CRASHPOINT(4);
    memcpy(s->key, key, keylen / 2);
    CRASHPOINT(5);
    memcpy(s->key + keylen / 2, key + keylen / 2, keylen - keylen / 2);
    s->hash = hash;
    CRASHPOINT(6);
    __atomic_store_n(&s->keylen, keylen, __ATOMIC_RELEASE);
    CRASHPOINT(7);
    uint32_t *head = &t->h->buckets[hash & t->mask];
    s->next = *head;
    *head = v;
    CRASHPOINT(8);
}

/* ---- acquire / release -------------------------------------------------------- */

static inline void note_acquired(ch_table *t, struct lt_slot *s)
{
    STORE(&s->holder_pid, g_pid);
    STORE(&s->holder_wid, LOAD(&t->worker_id));
    /* Our TID is in the futex word we now own: no gettid() needed.  Written
     * last (release): a reader that sees it matching sees pid/wid too. */
    __atomic_store_n(&s->holder_tid, (int32_t)(futex_word(&s->m) & FUTEX_TID_MASK),
                     __ATOMIC_RELEASE);
    STORE(&s->referenced, 1);
    tl_held++;
}

/* Turn a pthread lock result on slot i into the API result. */
static int finish_acquire(ch_table *t, uint32_t i, uint64_t gen, int r)
{
    struct lt_slot *s = &t->slots[i];
    switch (r) {
    case 0:
        break;
    case EOWNERDEAD:
        /* The slot's own bookkeeping is only the holder fields, rewritten
         * below; the mapping is repaired under the table mutex. */
        pthread_mutex_consistent(&s->m);
        CRASHPOINT(11);
        break;
    case ETIMEDOUT:
        return gen_is(s, gen) ? -ETIMEDOUT : -ESTALE;
    case EDEADLK: /* we hold the slot, so gen is stable; maybe for another key */
        return gen_is(s, gen) ? -EDEADLK : -ESTALE;
    default:
        return -r; /* EBUSY, EINVAL, ENOTRECOVERABLE */
    }
    if (!gen_is(s, gen)) {
        if (r == EOWNERDEAD) {
            STORE(&s->recovered_pending, 1); /* for the slot's current key */
            CRASHPOINT(14);
        }
        pthread_mutex_unlock(&s->m);
        return -ESTALE;
    }
    CRASHPOINT(10);
    bool recovered = r == EOWNERDEAD;
    if (LOAD(&s->recovered_pending)) {
        STORE(&s->recovered_pending, 0);
        recovered = true;
    }
    note_acquired(t, s);
    return recovered ? CH_LT_RECOVERED : 0;
}

int ch_lt_trylock(ch_table *t, uint32_t slot, uint64_t gen)
{
    if (slot >= t->nslots)
        return -EINVAL;
    if (tl_held >= CH_LT_THREAD_MAX_HELD)
        return -ENOLCK;
    return finish_acquire(t, slot, gen, pthread_mutex_trylock(&t->slots[slot].m));
}

int ch_lt_timedlock(ch_table *t, uint32_t slot, uint64_t gen, int64_t deadline_ns)
{
    if (slot >= t->nslots)
        return -EINVAL;
    if (tl_held >= CH_LT_THREAD_MAX_HELD)
        return -ENOLCK;
    struct lt_slot *s = &t->slots[slot];
    atomic_fetch_add(&t->inflight, 1);
    int r = pthread_mutex_trylock(&s->m);
    if (r == EBUSY) {
        if (!gen_is(s, gen)) { /* gens only grow: don't wait for another key */
            atomic_fetch_sub(&t->inflight, 1);
            return -ESTALE;
        }
        if (deadline_ns < 0)
            deadline_ns = 0;
        struct timespec ts = {.tv_sec = deadline_ns / 1000000000,
                              .tv_nsec = deadline_ns % 1000000000};
        __atomic_fetch_add(&s->waiters, 1, __ATOMIC_RELAXED);
        r = pthread_mutex_clocklock(&s->m, CLOCK_MONOTONIC, &ts);
        __atomic_fetch_sub(&s->waiters, 1, __ATOMIC_RELAXED);
    }
    r = finish_acquire(t, slot, gen, r);
    atomic_fetch_sub(&t->inflight, 1);
    return r;
}

int ch_lt_unlock(ch_table *t, uint32_t slot)
{
    if (slot >= t->nslots)
        return -EINVAL;
    /* Holder fields stay: they are only believed while the futex owner TID
     * matches holder_tid, so the next holder's bookkeeping is never undone. */
    CRASHPOINT(12);
    int r = pthread_mutex_unlock(&t->slots[slot].m);
    if (r)
        return -r; /* EPERM: not ours */
    tl_held--;
    return 0;
}

int ch_lt_resolve(ch_table *t, const uint8_t *key, size_t keylen, uint32_t *slot, uint64_t *gen)
{
    if (keylen < 1 || keylen > CH_LT_KEY_MAX)
        return -EINVAL;
    uint32_t hash = hash_key(key, keylen);
    atomic_fetch_add(&t->inflight, 1);
    int r = table_lock(t);
    if (r)
        goto out;
    uint32_t i = lookup(t, key, (uint32_t)keylen, hash);
    if (i != NIL) {
        *slot = i;
        *gen = gen_of(&t->slots[i]);
        table_unlock(t);
        goto out;
    }
    bool bury_old = false;
    if (tl_held >= CH_LT_THREAD_MAX_HELD) {
        r = -ENOLCK;
    } else if ((i = claim_slot(t, &bury_old)) == NIL) {
        r = -ENOSPC;
    } else {
        if (bury_old)
            bury(t, i);
        bool recovered = unbury(t, key, (uint32_t)keylen, hash);
        install(t, i, key, (uint32_t)keylen, hash);
        note_acquired(t, &t->slots[i]);
        *slot = i;
        *gen = gen_of(&t->slots[i]);
        r = recovered ? CH_LT_NEW_RECOVERED : CH_LT_NEW;
    }
    table_unlock(t);
    if (r >= CH_LT_NEW)
        CRASHPOINT(9);
out:
    atomic_fetch_sub(&t->inflight, 1);
    return r;
}

/* ---- read-only queries -------------------------------------------------------- */

int ch_lt_find(ch_table *t, const uint8_t *key, size_t keylen, uint32_t *slot, uint64_t *gen)
{
    if (keylen < 1 || keylen > CH_LT_KEY_MAX)
        return -EINVAL;
    uint32_t hash = hash_key(key, keylen);
    int r = table_lock(t);
    if (r)
        return r;
    uint32_t i = lookup(t, key, (uint32_t)keylen, hash);
    if (i == NIL) {
        r = -ENOENT;
    } else {
        *slot = i;
        *gen = gen_of(&t->slots[i]);
    }
    table_unlock(t);
    return r;
}

int ch_lt_is_locked(ch_table *t, uint32_t slot, uint64_t gen)
{
    if (slot >= t->nslots)
        return -EINVAL;
    const struct lt_slot *s = &t->slots[slot];
    if (!gen_is(s, gen))
        return -ESTALE;
    int held = held_by_live(futex_word(&s->m));
    return gen_is(s, gen) ? held : -ESTALE;
}

int ch_lt_slot_info(ch_table *t, uint32_t slot, ch_lt_info *out)
{
    if (slot >= t->nslots)
        return -EINVAL;
    int r = table_lock(t); /* keys change only under it */
    if (r)
        return r;
    const struct lt_slot *s = &t->slots[slot];
    uint32_t w = futex_word(&s->m);
    uint32_t kl = s->keylen;
    if (!held_by_live(w) || kl == 0 || kl > CH_LT_KEY_MAX) {
        table_unlock(t);
        return 0;
    }
    /* A holder that has just taken the lock may not have written its fields
     * yet (it needs no table mutex for that): give it a moment. */
    int32_t tid = (int32_t)(w & FUTEX_TID_MASK);
    bool known = false;
    for (int k = 0; k < 100 && !(known = __atomic_load_n(&s->holder_tid, __ATOMIC_ACQUIRE) == tid);
         k++)
        sched_yield();
    out->pid = known ? LOAD(&s->holder_pid) : 0;
    out->worker_id = known ? LOAD(&s->holder_wid) : -1;
    out->keylen = kl;
    memcpy(out->key, s->key, kl);
    table_unlock(t);
    return 1;
}

int ch_lt_check(ch_table *t)
{
    uint8_t *seen = calloc(t->nslots, 1);
    if (!seen)
        return -ENOMEM;
    int r = table_lock(t);
    if (r) {
        free(seen);
        return r;
    }
    uint32_t linked = 0, mapped = 0;
    for (uint32_t b = 0; b <= t->mask && !r; b++) {
        uint32_t i = t->h->buckets[b];
        while (i != NIL && !r) {
            const struct lt_slot *s = &t->slots[i < t->nslots ? i : 0];
            if (i >= t->nslots || seen[i] || s->keylen == 0 || s->keylen > CH_LT_KEY_MAX ||
                (s->hash & t->mask) != b || s->hash != hash_key(s->key, s->keylen)) {
                r = -EUCLEAN;
            } else {
                seen[i] = 1;
                linked++;
                i = s->next;
            }
        }
    }
    for (uint32_t i = 0; i < t->nslots && !r; i++) {
        const struct lt_slot *s = &t->slots[i];
        if (s->keylen == 0)
            continue;
        mapped++;
        /* A duplicate key would make lookup return another slot. */
        if (lookup(t, s->key, s->keylen, s->hash) != i)
            r = -EUCLEAN;
    }
    if (!r && linked != mapped)
        r = -EUCLEAN;
    table_unlock(t);
    free(seen);
    return r;
}

/* ---- life cycle ------------------------------------------------------------------ */

int ch_lt_create(uint32_t nslots, ch_table **out)
{
    uint32_t nb;
    uint64_t off, total;
    int r = geometry(nslots, &nb, &off, &total);
    if (r)
        return r;
    pthread_once(&g_once, init_once);
    ch_table *t = calloc(1, sizeof *t);
    if (!t)
        return -ENOMEM;
    void *p = MAP_FAILED;
    t->fd = memfd_create("clusterhub-locks", MFD_CLOEXEC);
    if (t->fd < 0)
        goto fail_errno;
    do
        r = ftruncate(t->fd, (off_t)total);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        goto fail_errno;
    p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED, t->fd, 0);
    if (p == MAP_FAILED)
        goto fail_errno;
    struct lt_header *h = p; /* the memfd is zero-filled */
    h->layout = LT_LAYOUT;
    h->mutex_size = sizeof(pthread_mutex_t);
    h->slot_size = sizeof(struct lt_slot);
    h->nslots = nslots;
    h->nbuckets = nb;
    h->slots_off = off;
    h->total_size = total;
    if ((r = init_robust_mutex(&h->mutex)))
        goto fail;
    for (uint32_t b = 0; b < nb; b++)
        h->buckets[b] = NIL;
    set_region(t, p, total);
    /* Generations start at a random point: once an id is reused after all,
     * a ref kept from the old table still fails the generation check. */
    uint32_t gen0;
    if (getrandom(&gen0, sizeof gen0, GRND_NONBLOCK) != sizeof gen0)
        gen0 = (uint32_t)ch_monotonic_ns() ^ (uint32_t)getpid() << 16;
    for (uint32_t i = 0; i < nslots; i++) {
        struct lt_slot *s = &t->slots[i];
        if ((r = init_robust_mutex(&s->m)))
            goto fail;
        s->gen = gen0;
        s->next = NIL;
    }
    h->magic = LT_MAGIC;
    t->worker_id = -1;
    if ((r = registry_add(t)))
        goto fail;
    *out = t;
    return 0;
fail_errno:
    r = -errno;
fail:
    if (p != MAP_FAILED)
        munmap(p, total);
    if (t->fd >= 0)
        close(t->fd);
    free(t);
    return r;
}

int ch_lt_attach(int fd, ch_table **out)
{
    pthread_once(&g_once, init_once);
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -errno;
    if (st.st_size < (off_t)sizeof(struct lt_header))
        return -EINVAL;
    size_t len = (size_t)st.st_size;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    const struct lt_header *h = p;
    uint32_t nb;
    uint64_t off, total;
    int r = 0;
    ch_table *t = NULL;
    if (h->magic != LT_MAGIC || h->layout != LT_LAYOUT ||
        h->mutex_size != sizeof(pthread_mutex_t) || h->slot_size != sizeof(struct lt_slot)) {
        r = -EPROTO;
        goto fail;
    }
    if (geometry(h->nslots, &nb, &off, &total) || nb != h->nbuckets || off != h->slots_off ||
        total != h->total_size || total > len) {
        r = -EINVAL;
        goto fail;
    }
    if (!(t = calloc(1, sizeof *t))) {
        r = -ENOMEM;
        goto fail;
    }
    if ((t->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0)) < 0) {
        r = -errno;
        goto fail;
    }
    set_region(t, p, len);
    t->worker_id = -1;
    if ((r = registry_add(t))) {
        close(t->fd);
        goto fail;
    }
    *out = t;
    return 0;
fail:
    free(t);
    munmap(p, len);
    return r;
}

int ch_lt_fd(const ch_table *t) { return t->fd; }

uint32_t ch_lt_nslots(const ch_table *t) { return t->nslots; }

void ch_lt_set_worker_id(ch_table *t, int32_t worker_id) { STORE(&t->worker_id, worker_id); }

int ch_lt_busy(const ch_table *t)
{
    int n = atomic_load(&((ch_table *)t)->inflight);
    for (uint32_t i = 0; i < t->nslots; i++) {
        const struct lt_slot *s = &t->slots[i];
        uint32_t w = futex_word(&s->m);
        /* Held by a live thread whose bookkeeping says it is one of ours.  A
         * thread that died holding has no TID in the word any more. */
        if (held_by_live(w) &&
            __atomic_load_n(&s->holder_tid, __ATOMIC_ACQUIRE) == (int32_t)(w & FUTEX_TID_MASK) &&
            LOAD(&s->holder_pid) == g_pid)
            n++;
    }
    return n;
}

void ch_lt_after_fork_child(ch_table *t)
{
    atomic_store(&t->inflight, 0);
    tl_held = 0;
    g_pid = getpid();
}

int ch_lt_close(ch_table *t)
{
    /* Under the registry mutex, so a blocking ref call cannot find the table
     * between our busy check and the unmap (see ch_lt_enter). */
    pthread_mutex_lock(&g_reg_mu);
    if (ch_lt_busy(t) > 0) {
        pthread_mutex_unlock(&g_reg_mu);
        return -EBUSY;
    }
    if (t->id)
        g_tables[t->id] = NULL;
    t->id = 0;
    pthread_mutex_unlock(&g_reg_mu);
    munmap(t->h, t->maplen);
    close(t->fd); /* never retried: the fd is gone even on EINTR */
    free(t);
    return 0;
}

/* ---- refs: the hot path ----------------------------------------------------------- */

static int registry_add(ch_table *t)
{
    /* Ids are handed out round-robin, so a closed table's id is reused as
     * late as possible: refs kept from it keep answering -EBADF. */
    static uint32_t last_id;
    pthread_mutex_lock(&g_reg_mu);
    for (uint32_t k = 1; k <= CH_LT_MAX_TABLES; k++) {
        uint32_t i = (last_id + k - 1) % CH_LT_MAX_TABLES + 1;
        if (!g_tables[i]) {
            t->id = last_id = i;
            __atomic_store_n(&g_tables[i], t, __ATOMIC_RELEASE);
            pthread_mutex_unlock(&g_reg_mu);
            return 0;
        }
    }
    pthread_mutex_unlock(&g_reg_mu);
    return -EMFILE;
}

#define REF_TABLE(ref) ((uint32_t)((ref) >> 56))
#define REF_SLOT(ref) ((uint32_t)((ref) >> 32) & CH_LT_SLOT_NONE)

static inline ch_table *table_of(uint64_t ref)
{
    return __atomic_load_n(&g_tables[REF_TABLE(ref)], __ATOMIC_ACQUIRE);
}

uint64_t ch_lt_ref(const ch_table *t, uint32_t slot, uint64_t gen)
{
    if (slot > CH_LT_SLOT_NONE)
        slot = CH_LT_SLOT_NONE;
    return (uint64_t)t->id << 56 | (uint64_t)slot << 32 | (uint32_t)gen;
}

int ch_lt_trylock_ref(uint64_t ref)
{
    ch_table *t = table_of(ref);
    return t ? ch_lt_trylock(t, REF_SLOT(ref), ref) : -EBADF;
}

int ch_lt_unlock_ref(uint64_t ref)
{
    ch_table *t = table_of(ref);
    if (!t)
        return -EBADF;
    uint32_t slot = REF_SLOT(ref);
    /* A holder sees a stable gen: on a mismatch the slot now stands for
     * another key, perhaps one this thread holds, which is not ours to release. */
    if (slot < t->nslots && !gen_is(&t->slots[slot], ref))
        return -ESTALE;
    return ch_lt_unlock(t, slot);
}

int ch_lt_held_by_caller_ref(uint64_t ref)
{
    ch_table *t = table_of(ref);
    if (!t)
        return -EBADF;
    uint32_t slot = REF_SLOT(ref);
    if (slot >= t->nslots)
        return -EINVAL;
    const struct lt_slot *s = &t->slots[slot];
    if (!gen_is(s, ref))
        return -ESTALE;
    uint32_t w = futex_word(&s->m);
    int mine = held_by_live(w) && (pid_t)(w & FUTEX_TID_MASK) == gettid();
    /* Read again: a slot handed to another key meanwhile says nothing of ours. */
    return gen_is(s, ref) ? mine : -ESTALE;
}

ch_table *ch_lt_enter(uint64_t ref)
{
    pthread_mutex_lock(&g_reg_mu);
    ch_table *t = table_of(ref);
    if (t)
        atomic_fetch_add(&t->inflight, 1);
    pthread_mutex_unlock(&g_reg_mu);
    return t;
}

void ch_lt_leave(ch_table *t)
{
    atomic_fetch_sub(&t->inflight, 1);
}

int ch_lt_timedlock_ref(ch_table *t, uint64_t ref, int64_t deadline_ns)
{
    return ch_lt_timedlock(t, REF_SLOT(ref), ref, deadline_ns);
}

int ch_lt_retire(ch_table *t)
{
    pthread_mutex_lock(&g_reg_mu); /* as ch_lt_enter: no blocking call slips in */
    int busy = ch_lt_busy(t);
    if (!busy && t->id) {
        g_tables[t->id] = NULL;
        t->id = 0;
    }
    pthread_mutex_unlock(&g_reg_mu);
    return busy ? -EBUSY : 0;
}

void ch_lt_disable(ch_table *t)
{
    pthread_mutex_lock(&g_reg_mu);
    if (t->id)
        g_tables[t->id] = NULL;
    t->id = 0;
    pthread_mutex_unlock(&g_reg_mu);
}
