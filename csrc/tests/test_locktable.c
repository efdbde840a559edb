/* test_locktable.c - pure-C driver for the lock table: deaths for real.
 * Build and run: make -C csrc/tests test_locktable (or `asan`). */
#define _GNU_SOURCE
#include "locktable.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int g_failed_checks;

#define CHECK(c)                                                                   \
    do {                                                                           \
        if (!(c)) {                                                                \
            fprintf(stderr, "  %s:%d: CHECK failed: %s\n", __func__, __LINE__, #c); \
            g_failed_checks++;                                                     \
        }                                                                          \
    } while (0)

#define CHECK_EQ(a, b)                                                             \
    do {                                                                           \
        long long a_ = (long long)(a), b_ = (long long)(b);                        \
        if (a_ != b_) {                                                            \
            fprintf(stderr, "  %s:%d: %s == %lld, expected %s == %lld\n", __func__, \
                    __LINE__, #a, a_, #b, b_);                                     \
            g_failed_checks++;                                                     \
        }                                                                          \
    } while (0)

#define SEC 1000000000LL

static ch_table *new_table(uint32_t n)
{
    ch_table *t = NULL;
    int r = ch_lt_create(n, &t);
    if (r) {
        fprintf(stderr, "ch_lt_create(%u): %s\n", n, strerror(-r));
        exit(2);
    }
    return t;
}

/* Resolve + lock, re-resolving while the slot goes stale.  Returns 0,
 * CH_LT_RECOVERED, CH_LT_NEW or a negative errno; *slot set when >= 0. */
static int acquire(ch_table *t, const char *key, int64_t timeout_ns, uint32_t *slot)
{
    int64_t deadline = ch_monotonic_ns() + timeout_ns;
    for (;;) {
        uint32_t s;
        uint64_t g;
        int r = ch_lt_resolve(t, (const uint8_t *)key, strlen(key), &s, &g);
        if (r == 0)
            r = ch_lt_timedlock(t, s, g, deadline);
        if (r == -ESTALE)
            continue;
        if (r >= 0 && slot)
            *slot = s;
        return r;
    }
}

/* Wait for a child; returns its raw status. */
static int reap(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    return st;
}

static int exited0(int st)
{
    if (WIFEXITED(st) && WEXITSTATUS(st) == 0)
        return 1;
    fprintf(stderr, "  child status 0x%x, expected exit 0\n", st);
    return 0;
}

#define KILLED(st) (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL)
#define EXITED0(st) exited0(st)

static void xwrite(int fd, char c)
{
    while (write(fd, &c, 1) < 0 && errno == EINTR)
        ;
}

static char xread(int fd)
{
    char c = 0;
    ssize_t n;
    while ((n = read(fd, &c, 1)) < 0 && errno == EINTR)
        ;
    return n == 1 ? c : 0;
}

static int expect_killed(pid_t pid)
{
    int st = reap(pid);
    if (!KILLED(st)) {
        fprintf(stderr, "  child status 0x%x, expected SIGKILL\n", st);
        return 0;
    }
    return 1;
}

/* Poll until `pid` sleeps in a futex wait (the observable "blocked in lock"). */
static int wait_futex_sleep(pid_t pid)
{
    char path[64], buf[128];
    snprintf(path, sizeof path, "/proc/%d/wchan", (int)pid);
    for (int i = 0; i < 100000; i++) {
        FILE *f = fopen(path, "r");
        if (!f)
            return -1;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        if (strstr(buf, "futex"))
            return 0;
        usleep(100);
    }
    return -1;
}

/* ---- tests ----------------------------------------------------------------- */

static void test_basic(void)
{
    ch_table *t = new_table(8);
    uint32_t s, s2;
    uint64_t g, g2;
    CHECK_EQ(ch_lt_nslots(t), 8);
    CHECK(ch_lt_fd(t) >= 0);
    CHECK_EQ(ch_lt_resolve(t, (const uint8_t *)"", 0, &s, &g), -EINVAL);
    uint8_t big[256] = {0};
    CHECK_EQ(ch_lt_resolve(t, big, 256, &s, &g), -EINVAL);
    CHECK_EQ(ch_lt_resolve(t, big, 255, &s, &g), CH_LT_NEW); /* zero bytes are fine */
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    CHECK_EQ(ch_lt_find(t, (const uint8_t *)"a", 1, &s, &g), -ENOENT);
    CHECK_EQ(ch_lt_resolve(t, (const uint8_t *)"a", 1, &s, &g), CH_LT_NEW);
    CHECK_EQ(ch_lt_is_locked(t, s, g), 1);
    CHECK_EQ(ch_lt_busy(t), 1);
    CHECK_EQ(ch_lt_close(t), -EBUSY);
    CHECK_EQ(ch_lt_trylock(t, s, g), -EDEADLK);
    CHECK_EQ(ch_lt_timedlock(t, s, g, ch_monotonic_ns() + SEC), -EDEADLK);
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    CHECK_EQ(ch_lt_unlock(t, s), -EPERM);
    CHECK_EQ(ch_lt_busy(t), 0);
    CHECK_EQ(ch_lt_is_locked(t, s, g), 0);
    CHECK_EQ(ch_lt_resolve(t, (const uint8_t *)"a", 1, &s2, &g2), 0);
    CHECK(s2 == s && g2 == g);
    CHECK_EQ(ch_lt_find(t, (const uint8_t *)"a", 1, &s2, &g2), 0);
    CHECK(s2 == s && g2 == g);
    CHECK_EQ(ch_lt_trylock(t, s, g), 0);
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    CHECK_EQ(ch_lt_trylock(t, 8, g), -EINVAL);
    CHECK_EQ(ch_lt_unlock(t, 8), -EINVAL);
    CHECK_EQ(ch_lt_is_locked(t, 8, g), -EINVAL);
    CHECK_EQ(ch_lt_trylock(t, s, g + 1), -ESTALE);
    CHECK_EQ(ch_lt_is_locked(t, s, g + 1), -ESTALE);
    ch_lt_info info;
    CHECK_EQ(ch_lt_slot_info(t, 8, &info), -EINVAL);
    CHECK_EQ(ch_lt_slot_info(t, s, &info), 0);
    ch_lt_set_worker_id(t, 7);
    CHECK_EQ(ch_lt_trylock(t, s, g), 0);
    CHECK_EQ(ch_lt_slot_info(t, s, &info), 1);
    CHECK_EQ(info.pid, getpid());
    CHECK_EQ(info.worker_id, 7);
    CHECK(info.keylen == 1 && info.key[0] == 'a');
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    CHECK_EQ(ch_lt_check(t), 0);
    CHECK_EQ(ch_lt_close(t), 0);
    ch_table *x;
    CHECK_EQ(ch_lt_create(0, &x), -EINVAL);
    CHECK_EQ(ch_lt_create(CH_LT_SLOTS_MAX + 1, &x), -EINVAL);
    CHECK_EQ(ch_lt_crashpoint_count(), 14);
}

static void test_attach(void)
{
    ch_table *t = new_table(4), *a = NULL;
    CHECK_EQ(ch_lt_attach(ch_lt_fd(t), &a), 0);
    if (!a)
        return;
    CHECK(ch_lt_fd(a) != ch_lt_fd(t));
    CHECK_EQ(ch_lt_nslots(a), 4);
    uint32_t s, s2;
    uint64_t g, g2;
    CHECK_EQ(ch_lt_resolve(t, (const uint8_t *)"k", 1, &s, &g), CH_LT_NEW);
    CHECK_EQ(ch_lt_find(a, (const uint8_t *)"k", 1, &s2, &g2), 0);
    CHECK(s == s2 && g == g2);
    CHECK_EQ(ch_lt_trylock(a, s, g), -EDEADLK); /* same thread, other mapping */
    CHECK_EQ(ch_lt_is_locked(a, s, g), 1);
    CHECK_EQ(ch_lt_unlock(a, s), 0);
    CHECK_EQ(ch_lt_close(a), 0);
    CHECK_EQ(ch_lt_close(t), 0);

    int fd = memfd_create("junk", MFD_CLOEXEC);
    CHECK_EQ(ch_lt_attach(fd, &a), -EINVAL); /* empty */
    CHECK(ftruncate(fd, 1 << 16) == 0);
    CHECK_EQ(ch_lt_attach(fd, &a), -EPROTO); /* zeros: bad magic */
    close(fd);
    /* A real table truncated below its slot array. */
    t = new_table(64);
    struct stat st;
    CHECK(fstat(ch_lt_fd(t), &st) == 0);
    CHECK(ftruncate(ch_lt_fd(t), 4096) == 0);
    CHECK_EQ(ch_lt_attach(ch_lt_fd(t), &a), -EINVAL);
    CHECK(ftruncate(ch_lt_fd(t), st.st_size) == 0); /* (zeros: unlocked mutexes) */
    CHECK_EQ(ch_lt_close(t), 0);
}

/* A child takes the lock and dies of SIGKILL (by itself or by the parent):
 * the next acquire recovers, then normal rounds. */
static void test_recovery(void)
{
    ch_table *t = new_table(4);
    for (int round = 0; round < 6; round++) {
        int p[2], q[2];
        CHECK(pipe(p) == 0 && pipe(q) == 0);
        pid_t pid = fork();
        if (pid == 0) {
            ch_lt_after_fork_child(t);
            ch_lt_set_worker_id(t, round + 1);
            if (acquire(t, "rec", 5 * SEC, NULL) < 0)
                _exit(3);
            if (round % 2)
                raise(SIGKILL);
            xwrite(p[1], 'h');
            xread(q[0]); /* parent kills us meanwhile */
            _exit(4);
        }
        if (round % 2 == 0) {
            CHECK_EQ(xread(p[0]), 'h');
            uint32_t s;
            uint64_t g;
            ch_lt_info info;
            CHECK_EQ(ch_lt_find(t, (const uint8_t *)"rec", 3, &s, &g), 0);
            CHECK_EQ(ch_lt_is_locked(t, s, g), 1);
            CHECK_EQ(ch_lt_slot_info(t, s, &info), 1);
            CHECK_EQ(info.pid, pid);
            CHECK_EQ(info.worker_id, round + 1);
            CHECK_EQ(ch_lt_trylock(t, s, g), -EBUSY);
            CHECK_EQ(ch_lt_unlock(t, s), -EPERM); /* foreign unlock */
            kill(pid, SIGKILL);
        }
        int st = reap(pid);
        CHECK(KILLED(st));
        close(p[0]), close(p[1]), close(q[0]), close(q[1]);
        uint32_t s;
        uint64_t g;
        CHECK_EQ(ch_lt_find(t, (const uint8_t *)"rec", 3, &s, &g), 0);
        CHECK_EQ(ch_lt_is_locked(t, s, g), 0); /* a dead holder does not hold */
        ch_lt_info info;
        CHECK_EQ(ch_lt_slot_info(t, s, &info), 0);
        CHECK_EQ(acquire(t, "rec", SEC, &s), CH_LT_RECOVERED);
        CHECK_EQ(ch_lt_unlock(t, s), 0);
        for (int k = 0; k < 3; k++) {
            CHECK_EQ(acquire(t, "rec", SEC, &s), 0);
            CHECK_EQ(ch_lt_unlock(t, s), 0);
        }
        pid = fork(); /* and a normal round in another process */
        if (pid == 0) {
            ch_lt_after_fork_child(t);
            int r = acquire(t, "rec", SEC, &s);
            _exit(r == 0 && ch_lt_unlock(t, s) == 0 ? 0 : 5);
        }
        CHECK(EXITED0(reap(pid)));
    }
    CHECK_EQ(ch_lt_check(t), 0);
    CHECK_EQ(ch_lt_close(t), 0);
}

/* A process killed while waiting affects no one. */
static void test_killed_waiter(void)
{
    ch_table *t = new_table(4);
    uint32_t s;
    CHECK_EQ(acquire(t, "w", SEC, &s), CH_LT_NEW);
    int p[2];
    CHECK(pipe(p) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        ch_lt_after_fork_child(t);
        xwrite(p[1], 'r');
        int r = acquire(t, "w", 30 * SEC, NULL);
        fprintf(stderr, "  waiter: acquire returned %d\n", r);
        _exit(3);
    }
    CHECK_EQ(xread(p[0]), 'r');
    CHECK_EQ(wait_futex_sleep(pid), 0);
    kill(pid, SIGKILL);
    CHECK(expect_killed(pid));
    close(p[0]), close(p[1]);
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    pid = fork();
    if (pid == 0) {
        ch_lt_after_fork_child(t);
        int r = acquire(t, "w", SEC, &s);
        _exit(r == 0 && ch_lt_unlock(t, s) == 0 ? 0 : 5);
    }
    CHECK(EXITED0(reap(pid)));
    CHECK_EQ(acquire(t, "w", SEC, &s), 0);
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    CHECK_EQ(ch_lt_close(t), 0);
}

/* A fork child does not own its parent's locks. */
static void test_fork_ownership(void)
{
    ch_table *t = new_table(4);
    uint32_t s;
    uint64_t g;
    CHECK_EQ(acquire(t, "f", SEC, &s), CH_LT_NEW);
    CHECK_EQ(ch_lt_find(t, (const uint8_t *)"f", 1, &s, &g), 0);
    pid_t pid = fork();
    if (pid == 0) {
        ch_lt_after_fork_child(t);
        int ok = ch_lt_busy(t) == 0 && ch_lt_trylock(t, s, g) == -EBUSY &&
                 ch_lt_unlock(t, s) == -EPERM && ch_lt_is_locked(t, s, g) == 1 &&
                 ch_lt_timedlock(t, s, g, ch_monotonic_ns() + SEC / 20) == -ETIMEDOUT &&
                 ch_lt_busy(t) == 0 && ch_lt_close(t) == 0;
        _exit(ok ? 0 : 5);
    }
    CHECK(EXITED0(reap(pid)));
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    CHECK_EQ(ch_lt_close(t), 0);
}

static void *ask_held(void *ref)
{
    return (void *)(intptr_t)ch_lt_held_by_caller_ref(*(uint64_t *)ref);
}

/* ch_lt_held_by_caller_ref answers for the calling thread, without taking the lock. */
static void test_held_by_caller(void)
{
    ch_table *t = new_table(4);
    uint32_t s;
    uint64_t g;
    CHECK_EQ(ch_lt_resolve(t, (const uint8_t *)"h", 1, &s, &g), CH_LT_NEW);
    uint64_t ref = ch_lt_ref(t, s, g);
    CHECK_EQ(ch_lt_held_by_caller_ref(ref), 1);
    pthread_t th;
    void *ret;
    CHECK(pthread_create(&th, NULL, ask_held, &ref) == 0);
    CHECK(pthread_join(th, &ret) == 0);
    CHECK_EQ((intptr_t)ret, 0); /* held, but by another thread */
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    CHECK_EQ(ch_lt_held_by_caller_ref(ref), 0);
    CHECK_EQ(ch_lt_held_by_caller_ref(ch_lt_ref(t, s, g + 1)), -ESTALE);
    CHECK_EQ(ch_lt_held_by_caller_ref(ch_lt_ref(t, 4, g)), -EINVAL);
    CHECK_EQ(ch_lt_close(t), 0);
    CHECK_EQ(ch_lt_held_by_caller_ref(ref), -EBADF);
}

static void *hold_and_exit(void *arg)
{
    uint32_t s;
    return (void *)(intptr_t)acquire(arg, "tx", SEC, &s);
}

/* A thread that exits holding a lock loses it: the next acquirer recovers. */
static void test_thread_exit(void)
{
    ch_table *t = new_table(4);
    pthread_t th;
    void *ret;
    CHECK(pthread_create(&th, NULL, hold_and_exit, t) == 0);
    CHECK(pthread_join(th, &ret) == 0);
    CHECK_EQ((intptr_t)ret, CH_LT_NEW);
    CHECK_EQ(ch_lt_busy(t), 0); /* the dead thread's hold does not count */
    uint32_t s;
    CHECK_EQ(acquire(t, "tx", SEC, &s), CH_LT_RECOVERED);
    CHECK_EQ(ch_lt_busy(t), 1);
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    CHECK_EQ(ch_lt_close(t), 0);
}

static void test_timeout(void)
{
    ch_table *t = new_table(4);
    int p[2], q[2];
    CHECK(pipe(p) == 0 && pipe(q) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        ch_lt_after_fork_child(t);
        uint32_t s;
        if (acquire(t, "to", SEC, &s) < 0)
            _exit(3);
        xwrite(p[1], 'h');
        xread(q[0]);
        _exit(ch_lt_unlock(t, s) == 0 ? 0 : 4);
    }
    CHECK_EQ(xread(p[0]), 'h');
    uint32_t s;
    uint64_t g;
    CHECK_EQ(ch_lt_find(t, (const uint8_t *)"to", 2, &s, &g), 0);
    int64_t t0 = ch_monotonic_ns();
    CHECK_EQ(ch_lt_timedlock(t, s, g, t0 + SEC / 5), -ETIMEDOUT);
    int64_t dt = ch_monotonic_ns() - t0;
    CHECK(dt >= SEC / 5 && dt < SEC);
    CHECK_EQ(ch_lt_timedlock(t, s, g, 0), -ETIMEDOUT); /* past deadline: one try */
    CHECK_EQ(ch_lt_timedlock(t, s, g, -5), -ETIMEDOUT);
    CHECK_EQ(ch_lt_busy(t), 0);
    xwrite(q[1], 'x');
    CHECK(EXITED0(reap(pid)));
    CHECK_EQ(ch_lt_timedlock(t, s, g, ch_monotonic_ns() + SEC), 0);
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    close(p[0]), close(p[1]), close(q[0]), close(q[1]);
    CHECK_EQ(ch_lt_close(t), 0);
}

static void test_full_and_stale(void)
{
    ch_table *t = new_table(4);
    char key[16];
    uint32_t s[4], s0, sx;
    uint64_t g0, gx;
    CHECK_EQ(acquire(t, "old", SEC, &s0), CH_LT_NEW);
    CHECK_EQ(ch_lt_find(t, (const uint8_t *)"old", 3, &s0, &g0), 0);
    CHECK_EQ(ch_lt_unlock(t, s0), 0);
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "full%d", i);
        CHECK_EQ(acquire(t, key, SEC, &s[i]), CH_LT_NEW);
    }
    CHECK_EQ(ch_lt_resolve(t, (const uint8_t *)"more", 4, &sx, &gx), -ENOSPC);
    CHECK_EQ(ch_lt_find(t, (const uint8_t *)"old", 3, &sx, &gx), -ENOENT); /* evicted */
    /* s0 now stands for a key this thread holds: stale, not a relock. */
    CHECK_EQ(ch_lt_trylock(t, s0, g0), -ESTALE);
    CHECK_EQ(ch_lt_timedlock(t, s0, g0, ch_monotonic_ns() + SEC), -ESTALE);
    CHECK_EQ(ch_lt_is_locked(t, s0, g0), -ESTALE);
    CHECK_EQ(ch_lt_resolve(t, (const uint8_t *)"full2", 5, &sx, &gx), 0); /* present: fine */
    for (int i = 0; i < 4; i++)
        CHECK_EQ(ch_lt_unlock(t, s[i]), 0);
    CHECK_EQ(ch_lt_trylock(t, s0, g0), -ESTALE); /* unheld now: acquire, see, release */
    CHECK_EQ(ch_lt_busy(t), 0);
    CHECK_EQ(ch_lt_check(t), 0);
    CHECK_EQ(ch_lt_close(t), 0);
}

/* Many distinct keys through a small table, some held across the churn. */
static void test_many_keys(void)
{
    ch_table *t = new_table(8);
    char key[32];
    uint32_t s, hs[3];
    for (int i = 0; i < 3; i++) {
        snprintf(key, sizeof key, "held%d", i);
        CHECK_EQ(acquire(t, key, SEC, &hs[i]), CH_LT_NEW);
    }
    int bad = 0;
    for (int i = 0; i < 12000; i++) {
        snprintf(key, sizeof key, "key-%d", i);
        int r = acquire(t, key, SEC, &s);
        if (r != CH_LT_NEW || ch_lt_unlock(t, s) != 0)
            bad++;
        if (i % 3 == 0) { /* a recent key is usually still mapped: found again */
            r = acquire(t, key, SEC, &s);
            if (r < 0 || r == CH_LT_RECOVERED || ch_lt_unlock(t, s) != 0)
                bad++;
        }
    }
    CHECK_EQ(bad, 0);
    for (int i = 0; i < 3; i++) {
        CHECK_EQ(ch_lt_unlock(t, hs[i]), 0);
        snprintf(key, sizeof key, "held%d", i);
        CHECK_EQ(acquire(t, key, SEC, &s), 0); /* never evicted while held */
        CHECK_EQ(ch_lt_unlock(t, s), 0);
    }
    CHECK_EQ(ch_lt_check(t), 0);
    CHECK_EQ(ch_lt_close(t), 0);
}

struct limit_arg {
    ch_table *t;
    int r;
};

static void *lock_extra(void *arg)
{
    struct limit_arg *a = arg;
    uint32_t s;
    a->r = acquire(a->t, "extra", SEC, &s);
    if (a->r >= 0 && ch_lt_unlock(a->t, s) != 0)
        a->r = -1000;
    return NULL;
}

static void test_thread_limit(void)
{
    ch_table *t = new_table(CH_LT_THREAD_MAX_HELD + 16);
    static uint32_t held[CH_LT_THREAD_MAX_HELD];
    char key[32];
    uint32_t s;
    uint64_t g;
    CHECK_EQ(acquire(t, "extra", SEC, &s), CH_LT_NEW);
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    int bad = 0;
    for (int i = 0; i < CH_LT_THREAD_MAX_HELD; i++) {
        snprintf(key, sizeof key, "lim%d", i);
        if (acquire(t, key, SEC, &held[i]) != CH_LT_NEW)
            bad++;
    }
    CHECK_EQ(bad, 0);
    CHECK_EQ(ch_lt_resolve(t, (const uint8_t *)"one-more", 8, &s, &g), -ENOLCK);
    CHECK_EQ(ch_lt_resolve(t, (const uint8_t *)"extra", 5, &s, &g), 0); /* no insert needed */
    CHECK_EQ(ch_lt_trylock(t, s, g), -ENOLCK);
    CHECK_EQ(ch_lt_timedlock(t, s, g, ch_monotonic_ns() + SEC), -ENOLCK);
    CHECK_EQ(ch_lt_busy(t), CH_LT_THREAD_MAX_HELD);
    struct limit_arg a = {t, -1};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, lock_extra, &a) == 0);
    CHECK(pthread_join(th, NULL) == 0);
    CHECK_EQ(a.r, 0); /* the limit is per thread */
    CHECK_EQ(ch_lt_unlock(t, held[0]), 0);
    CHECK_EQ(ch_lt_trylock(t, s, g), 0);
    CHECK_EQ(ch_lt_unlock(t, s), 0);
    for (int i = 1; i < CH_LT_THREAD_MAX_HELD; i++)
        if (ch_lt_unlock(t, held[i]) != 0)
            bad++;
    CHECK_EQ(bad, 0);
    CHECK_EQ(ch_lt_close(t), 0);
}

/* Exact counter across processes while the counter's key keeps being evicted
 * from a tiny table by churn keys (exercising -ESTALE under contention). */
static void test_counter(void)
{
    enum { NPROC = 4, ITERS = 3000 };
    ch_table *t = new_table(NPROC);
    volatile long *counter =
        mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(counter != MAP_FAILED);
    *counter = 0;
    pid_t pids[NPROC];
    for (int p = 0; p < NPROC; p++) {
        if ((pids[p] = fork()) == 0) {
            ch_lt_after_fork_child(t);
            char key[16];
            uint32_t s;
            for (int i = 0; i < ITERS; i++) {
                if (acquire(t, "counter", 10 * SEC, &s) < 0)
                    _exit(3);
                long v = *counter;
                if (i % 7 == 0)
                    sched_yield();
                *counter = v + 1;
                if (ch_lt_unlock(t, s))
                    _exit(4);
                snprintf(key, sizeof key, "churn%d", (i * 7 + p) % 13);
                if (acquire(t, key, 10 * SEC, &s) < 0 || ch_lt_unlock(t, s))
                    _exit(5);
            }
            _exit(0);
        }
    }
    int ok = 0;
    for (int p = 0; p < NPROC; p++)
        ok += EXITED0(reap(pids[p]));
    CHECK_EQ(ok, NPROC);
    CHECK_EQ(*counter, (long)NPROC * ITERS);
    CHECK_EQ(ch_lt_check(t), 0);
    munmap((void *)counter, 4096);
    CHECK_EQ(ch_lt_close(t), 0);
}

/* One crash run: prepare dead holders (a dead table mutex included), then a
 * child with crash point n runs a workload that passes every point; after its
 * death both tables must be consistent and fully usable. */
static void crash_run(int n)
{
    ch_table *A = new_table(4), *B = new_table(1);
    char key[32];
    uint32_t s, bs;
    uint64_t bg;
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "k%d", i);
        CHECK(acquire(A, key, SEC, &s) >= 0 && ch_lt_unlock(A, s) == 0);
    }
    pid_t pid = fork();
    if (pid == 0) { /* dies holding "victim" */
        ch_lt_after_fork_child(A);
        if (acquire(A, "victim", SEC, &s) >= 0)
            raise(SIGKILL);
        _exit(3);
    }
    CHECK(expect_killed(pid));
    pid = fork();
    if (pid == 0) { /* dies inside an insert, holding the table mutex */
        ch_lt_after_fork_child(A);
        ch_lt_set_crashpoint(8);
        acquire(A, "tdead", SEC, &s);
        _exit(3);
    }
    CHECK(expect_killed(pid));
    /* B: our (bs, bg) for "s1" goes stale and its slot's new holder dies. */
    CHECK_EQ(acquire(B, "s1", SEC, &bs), CH_LT_NEW);
    CHECK_EQ(ch_lt_find(B, (const uint8_t *)"s1", 2, &bs, &bg), 0);
    CHECK_EQ(ch_lt_unlock(B, bs), 0);
    pid = fork();
    if (pid == 0) {
        ch_lt_after_fork_child(B);
        if (acquire(B, "s2", SEC, &s) >= 0)
            raise(SIGKILL);
        _exit(3);
    }
    CHECK(expect_killed(pid));

    pid = fork();
    if (pid == 0) {
        ch_lt_after_fork_child(A);
        ch_lt_after_fork_child(B);
        ch_lt_set_crashpoint(n);
        if (ch_lt_trylock(B, bs, bg) != -ESTALE) /* 14 */
            _exit(4);
        if (acquire(A, "victim", SEC, &s) != CH_LT_RECOVERED) /* 13, 11, 10 */
            _exit(5);
        if (ch_lt_unlock(A, s)) /* 12 */
            _exit(6);
        if (acquire(A, "knew", SEC, &s) != CH_LT_NEW) /* 1..9 */
            _exit(7);
        _exit(0);
    }
    if (!expect_killed(pid)) {
        fprintf(stderr, "  crash point %d not reached\n", n);
        g_failed_checks++;
    }
    CHECK_EQ(ch_lt_check(A), 0);
    CHECK_EQ(ch_lt_check(B), 0);
    const char *keys[] = {"k0", "k1", "k2", "k3", "victim", "tdead", "knew"};
    for (int i = 0; i < 7; i++) {
        int r = acquire(A, keys[i], SEC, &s);
        CHECK(r >= 0);
        if (r >= 0)
            CHECK_EQ(ch_lt_unlock(A, s), 0);
    }
    /* Every slot is reclaimable: hold 4 fresh keys, the 5th finds no room. */
    uint32_t h[4];
    for (int i = 0; i < 4; i++) {
        snprintf(key, sizeof key, "fresh%d", i);
        CHECK_EQ(acquire(A, key, SEC, &h[i]), CH_LT_NEW);
    }
    CHECK_EQ(acquire(A, "fresh4", SEC, &s), -ENOSPC);
    for (int i = 0; i < 4; i++)
        CHECK_EQ(ch_lt_unlock(A, h[i]), 0);
    CHECK_EQ(ch_lt_check(A), 0);
    for (int i = 0; i < 2; i++) {
        int r = acquire(B, i ? "s2" : "s1", SEC, &s);
        CHECK(r >= 0);
        if (r >= 0)
            CHECK_EQ(ch_lt_unlock(B, s), 0);
    }
    CHECK_EQ(ch_lt_check(B), 0);
    CHECK_EQ(ch_lt_close(A), 0);
    CHECK_EQ(ch_lt_close(B), 0);
}

static void test_crashpoints(void)
{
    for (int n = 1; n <= ch_lt_crashpoint_count(); n++)
        crash_run(n);
}

/* A process killed by the parent at a random instant inside a busy loop of
 * inserts and locks leaves a usable table (unplanned points). */
static void test_random_kills(void)
{
    ch_table *t = new_table(8);
    for (int round = 0; round < 40; round++) {
        int p[2];
        CHECK(pipe(p) == 0);
        pid_t pid = fork();
        if (pid == 0) {
            ch_lt_after_fork_child(t);
            char key[32];
            uint32_t s;
            xwrite(p[1], 'g');
            for (unsigned i = 0;; i++) {
                snprintf(key, sizeof key, "r%u", (i * 2654435761u) % 40);
                if (acquire(t, key, SEC, &s) >= 0)
                    ch_lt_unlock(t, s);
            }
        }
        CHECK_EQ(xread(p[0]), 'g');
        usleep(200 + (round * 397) % 3000); /* a random instant, not synchronisation */
        kill(pid, SIGKILL);
        CHECK(expect_killed(pid));
        close(p[0]), close(p[1]);
        CHECK_EQ(ch_lt_check(t), 0);
    }
    uint32_t h[8], s;
    char key[16];
    for (int i = 0; i < 8; i++) {
        snprintf(key, sizeof key, "z%d", i);
        CHECK_EQ(acquire(t, key, SEC, &h[i]), CH_LT_NEW);
    }
    CHECK_EQ(acquire(t, "z8", SEC, &s), -ENOSPC);
    for (int i = 0; i < 8; i++)
        CHECK_EQ(ch_lt_unlock(t, h[i]), 0);
    CHECK_EQ(ch_lt_close(t), 0);
}

/* ---- main ---------------------------------------------------------------------- */

static const struct {
    const char *name;
    void (*fn)(void);
} tests[] = {
    {"basic", test_basic},
    {"attach", test_attach},
    {"recovery", test_recovery},
    {"killed_waiter", test_killed_waiter},
    {"fork_ownership", test_fork_ownership},
    {"thread_exit", test_thread_exit},
    {"held_by_caller", test_held_by_caller},
    {"timeout", test_timeout},
    {"full_and_stale", test_full_and_stale},
    {"many_keys", test_many_keys},
    {"thread_limit", test_thread_limit},
    {"counter", test_counter},
    {"crashpoints", test_crashpoints},
    {"random_kills", test_random_kills},
};

int main(int argc, char **argv)
{
    int passed = 0, failed = 0;
    for (size_t i = 0; i < sizeof tests / sizeof tests[0]; i++) {
        if (argc > 1 && !strstr(tests[i].name, argv[1]))
            continue;
        int before = g_failed_checks;
        int64_t t0 = ch_monotonic_ns();
        tests[i].fn();
        int ok = g_failed_checks == before;
        printf("%-16s %s (%.0f ms)\n", tests[i].name, ok ? "ok" : "FAILED",
               (ch_monotonic_ns() - t0) / 1e6);
        fflush(stdout);
        ok ? passed++ : failed++;
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
