/* frame.c - see frame.h for the wire format and every function's contract. */
#define _GNU_SOURCE
#include "frame.h"
/* For ch_tx_send_msg/post_msg only: the rest of this file frames opaque payloads. */
#include "envelope.h"

#include <fcntl.h>
#include <sys/prctl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* A receive buffer starts (and, after a large frame, shrinks back to) this. */
#define RX_DEFAULT_CAP (256u * 1024u)

/* Circular doubly linked list with a sentinel head: O(1) removal on close. */
struct node {
    struct node *prev, *next;
};

/* Bytes [head, tail) of p (cap bytes allocated) are waiting to be written. */
struct seg {
    uint8_t *p;
    size_t cap, head, tail;
};

/*
 * Lock order: REG.mu, then a tx's mu, then the writer's W.mu; never another
 * order (the writer releases W.mu before it takes a tx's mu), and never two
 * txs' mutexes but in the fork handlers (which hold REG.mu).
 *
 * The bytes of a tx go out in this order: fl's, then q's.  Appends go to q.
 * fl holds what the writer thread took out of q to write without the mutex
 * (see writer_serve) and, after a partial write, the rest of it; when empty
 * it is a spare buffer, swapped with q at the writer's next take.
 */
struct ch_tx {
    pthread_mutex_t mu;   /* guards the fields up to `node` */
    pthread_cond_t idle;  /* broadcast when `writing` returns to 0 */
    struct seg fl;        /* first: bytes the writer took (see above) */
    struct seg q;         /* then: bytes queued since */
    int writing;          /* the writer is in sendmsg on fl, without mu (fl is its own) */
    int closed;           /* ch_tx_close: every send fails with EPIPE */
    int err;              /* error a background write met (sticky), or 0 */
    int owned;            /* on the writer's schedule (or being written by it) */
    int fd;               /* the socket of the posts (set under both mutexes) */
    uint64_t last_direct; /* CLOCK_MONOTONIC ns of the last direct write */
    /* Under W.mu: */
    struct node node; /* on W.run or W.stall when linked */
    int stalled;      /* on W.stall, waiting for POLLOUT */
    int zombie;       /* ch_tx_free ran while the writer had it: the writer frees it */
    size_t pidx;      /* its entry in W.pfd while stalled; 0 = not polled */
    struct node all;  /* on REG.all, under REG.mu */
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

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void node_init(struct node *n)
{
    n->prev = n->next = n;
}

static int node_linked(const struct node *n)
{
    return n->next != n;
}

static void node_unlink(struct node *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    node_init(n);
}

static void node_push(struct node *head, struct node *n)
{
    n->prev = head->prev;
    n->next = head;
    head->prev->next = n;
    head->prev = n;
}

#define TX_OF(p, field) ((ch_tx *)((char *)(p) - offsetof(ch_tx, field)))

/* Every tx, so that fork() can wait until none is in use (see atfork_prepare). */
static struct {
    pthread_mutex_t mu;
    struct node all;
} REG = {PTHREAD_MUTEX_INITIALIZER, {&REG.all, &REG.all}};

/* The process-wide writer thread and its schedule, all under W.mu. */
static struct {
    pthread_mutex_t mu;
    struct node run;    /* txs with frames for the writer to write */
    struct node stall;  /* txs the writer waits on for POLLOUT */
    ch_tx *cur;         /* the tx the writer took off `run` and is writing */
    int efd;            /* eventfd that wakes the writer, -1 before it starts */
    int running;
    int asleep;         /* in (or about to enter) poll(): wake it through efd */
    int waker_cpu;      /* the CPU the last wake-up came from (atomic: read without mu) */
    pthread_t thread;
    struct pollfd *pfd; /* the writer's poll set (its own, used outside mu) */
    size_t pcap;
    ch_writer_stats st;
} W = {
    .mu = PTHREAD_MUTEX_INITIALIZER,
    .run = {&W.run, &W.run},
    .stall = {&W.stall, &W.stall},
    .efd = -1,
};

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void register_atfork(void);

int ch_tx_new(ch_tx **out)
{
    pthread_once(&atfork_once, register_atfork);
    ch_tx *tx = calloc(1, sizeof *tx);
    if (!tx)
        return -ENOMEM;
    int r = pthread_mutex_init(&tx->mu, NULL);
    if (r) {
        free(tx);
        return -r;
    }
    r = pthread_cond_init(&tx->idle, NULL);
    if (r) {
        pthread_mutex_destroy(&tx->mu);
        free(tx);
        return -r;
    }
    node_init(&tx->node);
    tx->fd = -1;
    pthread_mutex_lock(&REG.mu);
    node_push(&REG.all, &tx->all);
    pthread_mutex_unlock(&REG.mu);
    *out = tx;
    return 0;
}

static size_t seg_len(const struct seg *s)
{
    return s->tail - s->head;
}

/* Mark n bytes written (from the front). */
static void seg_eat(struct seg *s, size_t n)
{
    s->head += n;
    if (s->head == s->tail)
        s->head = s->tail = 0;
}

/* Every byte not yet written, in flight or not. */
static size_t tx_queued(const ch_tx *tx)
{
    return seg_len(&tx->fl) + seg_len(&tx->q);
}

/* Drop every byte queued and the buffers.  Not while tx->writing. */
static void tx_drop(ch_tx *tx)
{
    free(tx->fl.p);
    free(tx->q.p);
    tx->fl = tx->q = (struct seg){0};
}

static void tx_release(ch_tx *tx)
{
    pthread_cond_destroy(&tx->idle);
    pthread_mutex_destroy(&tx->mu);
    tx_drop(tx);
    free(tx);
}

/* Unregister and release tx.  No lock held. */
static void tx_destroy(ch_tx *tx)
{
    pthread_mutex_lock(&REG.mu);
    node_unlink(&tx->all);
    pthread_mutex_unlock(&REG.mu);
    tx_release(tx);
}

void ch_tx_free(ch_tx *tx)
{
    if (!tx)
        return;
    ch_tx_close(tx); /* off the writer's lists; only W.cur may still point to it */
    pthread_mutex_lock(&W.mu);
    int busy = W.cur == tx;
    tx->zombie = busy;
    pthread_mutex_unlock(&W.mu);
    if (!busy)
        tx_destroy(tx);
}

/* The mutex is not part of the value: locking it in a const getter is fine. */
static pthread_mutex_t *tx_mu(const ch_tx *tx)
{
    return (pthread_mutex_t *)&tx->mu;
}

size_t ch_tx_pending(const ch_tx *tx)
{
    pthread_mutex_lock(tx_mu(tx));
    size_t n = tx_queued(tx);
    pthread_mutex_unlock(tx_mu(tx));
    return n;
}

size_t ch_tx_unowned(const ch_tx *tx)
{
    pthread_mutex_lock(tx_mu(tx));
    size_t n = tx->owned ? 0 : tx_queued(tx);
    pthread_mutex_unlock(tx_mu(tx));
    return n;
}

/* Make room for `need` more bytes at the tail of q (which may move it: only
 * fl may be pointed into without the mutex). */
static int tx_reserve(ch_tx *tx, size_t need)
{
    struct seg *q = &tx->q;
    if (q->head == q->tail)
        q->head = q->tail = 0;
    if (q->cap - q->tail >= need)
        return 0;
    if (q->head > 0) { /* slide the unsent bytes to the front first */
        memmove(q->p, q->p + q->head, q->tail - q->head);
        q->tail -= q->head;
        q->head = 0;
        if (q->cap - q->tail >= need)
            return 0;
    }
    size_t want = q->cap ? q->cap : 4096;
    while (want - q->tail < need) {
        if (want > SIZE_MAX / 2)
            return -ENOMEM;
        want *= 2;
    }
    uint8_t *nb = realloc(q->p, want);
    if (!nb)
        return -ENOMEM;
    q->p = nb;
    q->cap = want;
    return 0;
}

/* Queue the pieces whole or not at all: the writer must never see half a frame. */
static int tx_append(ch_tx *tx, const struct iovec *iov, int cnt)
{
    size_t total = 0;
    for (int i = 0; i < cnt; i++)
        total += iov[i].iov_len;
    int r = tx_reserve(tx, total);
    if (r < 0)
        return r;
    for (int i = 0; i < cnt; i++) {
        if (iov[i].iov_len)
            memcpy(tx->q.p + tx->q.tail, iov[i].iov_base, iov[i].iov_len);
        tx->q.tail += iov[i].iov_len;
    }
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

/*
 * Write the queue (fl, then q, in one gathered sendmsg) until it is empty or
 * the socket is full.  Under tx->mu and not while tx->writing (the writer's
 * bytes would interleave with ours).  Returns the bytes still queued or -errno.
 */
static int64_t tx_write(ch_tx *tx, int fd)
{
    while (tx_queued(tx) > 0) {
        struct iovec iov[2];
        int cnt = 0;
        if (seg_len(&tx->fl))
            iov[cnt++] = (struct iovec){tx->fl.p + tx->fl.head, seg_len(&tx->fl)};
        if (seg_len(&tx->q))
            iov[cnt++] = (struct iovec){tx->q.p + tx->q.head, seg_len(&tx->q)};
        ssize_t n = send_iov(fd, iov, cnt);
        if (n < 0)
            return n;
        if (n == 0)
            break;
        size_t first = (size_t)n < seg_len(&tx->fl) ? (size_t)n : seg_len(&tx->fl);
        seg_eat(&tx->fl, first);
        seg_eat(&tx->q, (size_t)n - first);
    }
    return (int64_t)tx_queued(tx);
}

/* 0 when tx may be used, else what every call returns. */
static int tx_error(const ch_tx *tx)
{
    return tx->closed ? -EPIPE : tx->err;
}

int64_t ch_tx_flush(ch_tx *tx, int fd)
{
    pthread_mutex_lock(&tx->mu);
    int64_t r = tx_error(tx);
    if (r == 0) /* (while the writer writes, the rest is its job too) */
        r = tx->writing ? (int64_t)tx_queued(tx) : tx_write(tx, fd);
    pthread_mutex_unlock(&tx->mu);
    return r;
}

int64_t ch_tx_push(ch_tx *tx, const uint8_t *payload, size_t len, size_t max_len)
{
    uint8_t h[CH_FRAME_HEADER];
    put_header(h, (uint32_t)len);
    struct iovec iov[2] = {{h, sizeof h}, {(void *)payload, len}};
    pthread_mutex_lock(&tx->mu);
    int64_t r = tx_error(tx);
    if (r == 0 && (len > max_len || len > CH_FRAME_MAX_LIMIT))
        r = -EMSGSIZE;
    if (r == 0)
        r = tx_append(tx, iov, 2);
    if (r == 0)
        r = (int64_t)tx_queued(tx);
    pthread_mutex_unlock(&tx->mu);
    return r;
}

/*
 * Send one frame made of the pieces in iov (the first one starting with the
 * frame header), in order behind anything queued: one gathered sendmsg when
 * the queue is empty, the unwritten rest copied into the queue.  While the
 * writer thread is in sendmsg on tx, the frame is only queued: the writer,
 * which owns tx then, writes it next.
 */
static int64_t tx_sendv(ch_tx *tx, int fd, struct iovec *iov, int cnt)
{
    if (tx->writing || tx_queued(tx) > 0) { /* keep order: queue behind what is waiting */
        int r = tx_append(tx, iov, cnt);
        if (r < 0)
            return r;
        return tx->writing ? (int64_t)tx_queued(tx) : tx_write(tx, fd);
    }
    tx->last_direct = mono_ns();
    for (;;) {
        ssize_t n = send_iov(fd, iov, cnt);
        if (n < 0)
            return n;
        if (n == 0)
            break;
        while (cnt > 0 && (size_t)n >= iov->iov_len) { /* drop the pieces written */
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt == 0)
            return 0;
        iov->iov_base = (uint8_t *)iov->iov_base + n;
        iov->iov_len -= (size_t)n;
    }
    /* The socket is full: keep the unwritten rest of this frame. */
    int r = tx_append(tx, iov, cnt);
    return r < 0 ? r : (int64_t)tx_queued(tx);
}

/* ---- the writer thread ------------------------------------------------- */

static void writer_wake(int efd)
{
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(efd, &one, sizeof one);
    while (n < 0 && errno == EINTR);
    /* (EAGAIN would mean the counter is full: the writer is awake anyway) */
}

/* Under W.mu: the eventfd to write (after unlocking) if the writer sleeps, else -1. */
static int writer_need_wake(void)
{
    if (!W.asleep)
        return -1;
    W.asleep = 0; /* one wake-up per sleep, however many posters */
    W.st.wakeups++;
    __atomic_store_n(&W.waker_cpu, sched_getcpu(), __ATOMIC_RELAXED);
    return W.efd;
}

/*
 * Write tx's queue with one sendmsg (W.mu held on entry and on return; tx
 * taken off the lists and W.cur == tx), then put tx back on the schedule if
 * bytes remain: on W.stall when the socket took nothing, else on W.run (what
 * was queued meanwhile, or the rest of a partial write, goes out on the next
 * turn, after the other txs' turns).
 *
 * The sendmsg runs without tx->mu, so that posters are not held up by it
 * (a sendmsg that wakes the reader takes microseconds).  Under the mutex the
 * writer takes the bytes out of q into fl, its own while `writing` is set:
 * posters append to q meanwhile (tx_reserve may move q's buffer, never fl's),
 * direct writers queue behind (their bytes would interleave with the
 * writer's), and ch_tx_close waits for `writing` to clear before it returns.
 * A partial write leaves its rest in fl, ahead of q.
 */
static void writer_serve(ch_tx *tx)
{
    pthread_mutex_unlock(&W.mu);
    pthread_mutex_lock(&tx->mu);
    ssize_t n = 0;
    int wrote = 0;
    if (!tx_error(tx) && tx_queued(tx) > 0) {
        if (seg_len(&tx->fl) == 0) { /* take q; the empty fl becomes q */
            struct seg t = tx->fl;
            tx->fl = tx->q;
            tx->q = t;
        }
        struct iovec iov = {tx->fl.p + tx->fl.head, seg_len(&tx->fl)};
        int fd = tx->fd;
        tx->writing = 1;
        pthread_mutex_unlock(&tx->mu);
        n = send_iov(fd, &iov, 1);
        pthread_mutex_lock(&tx->mu);
        tx->writing = 0;
        pthread_cond_broadcast(&tx->idle); /* (a ch_tx_close may wait for it) */
        wrote = 1;
        if (n > 0) {
            seg_eat(&tx->fl, (size_t)n);
        } else if (n < 0) { /* the peer is gone (or the fd is bad): nobody will read these */
            tx->err = (int)n;
            tx_drop(tx);
        }
    }
    pthread_mutex_lock(&W.mu);
    W.cur = NULL;
    W.st.writes += (uint64_t)wrote;
    if (tx_error(tx) || tx_queued(tx) == 0) {
        tx->owned = 0;
    } else if (n == 0) { /* the socket is full */
        tx->stalled = 1;
        node_push(&W.stall, &tx->node);
    } else {
        node_push(&W.run, &tx->node);
    }
    pthread_mutex_unlock(&tx->mu);
    if (tx->zombie) {
        pthread_mutex_unlock(&W.mu);
        tx_destroy(tx);
        pthread_mutex_lock(&W.mu);
    }
}

/*
 * Sleep in poll() until a poster writes the eventfd or a stalled socket takes
 * bytes again, then move the writable txs to W.run (W.mu held on entry and on
 * return).  No timeout: an idle writer costs nothing.
 */
static void writer_sleep(void)
{
    size_t n = 1;
    for (struct node *p = W.stall.next; p != &W.stall; p = p->next)
        n++;
    if (n > W.pcap) {
        struct pollfd *np = realloc(W.pfd, n * sizeof *np);
        if (np) {
            W.pfd = np;
            W.pcap = n;
        }
    }
    /* Out of memory, the txs that do not fit are retried every millisecond. */
    int timeout = -1;
    size_t i = 1;
    W.pfd[0] = (struct pollfd){.fd = W.efd, .events = POLLIN};
    for (struct node *p = W.stall.next; p != &W.stall; p = p->next) {
        ch_tx *tx = TX_OF(p, node);
        tx->pidx = i < W.pcap ? i : 0;
        if (tx->pidx)
            W.pfd[i++] = (struct pollfd){.fd = tx->fd, .events = POLLOUT};
        else
            timeout = 1;
    }
    W.asleep = 1;
    W.st.sleeps++;
    pthread_mutex_unlock(&W.mu);
    /* (A tx closed from here on may have its fd number polled once, after its
     * close woke us: poll has no effect on a descriptor, and the stale result
     * is ignored below since the tx is no longer on W.stall.) */
    int r = poll(W.pfd, i, timeout);
    if (r < 0 && errno != EINTR)
        poll(NULL, 0, 1); /* (ENOMEM) retry soon rather than spin */
    /* Woken by a poster running on another CPU: let its burst grow for a
     * moment (bounded, CH_TX_COALESCE_NS), so that one sendmsg and one wake-up
     * of the reader carry many frames.  (On the poster's own CPU the poster
     * runs meanwhile anyway, and a timer would only add switches.) */
    if (r > 0 && W.pfd[0].revents &&
        sched_getcpu() != __atomic_load_n(&W.waker_cpu, __ATOMIC_RELAXED)) {
        struct timespec ts = {0, CH_TX_COALESCE_NS};
        nanosleep(&ts, NULL);
    }
    pthread_mutex_lock(&W.mu);
    W.asleep = 0;
    if (r > 0 && W.pfd[0].revents) {
        uint64_t v;
        ssize_t got = read(W.efd, &v, sizeof v);
        (void)got; /* EAGAIN: a spurious wake-up, nothing to clear */
    }
    for (struct node *p = W.stall.next, *next; p != &W.stall; p = next) {
        next = p->next;
        ch_tx *tx = TX_OF(p, node);
        if (r < 0 || tx->pidx == 0 || W.pfd[tx->pidx].revents) {
            node_unlink(p);
            tx->stalled = 0;
            node_push(&W.run, p);
        }
    }
}

static void *writer_main(void *arg)
{
    (void)arg;
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    pthread_mutex_lock(&W.mu);
    for (;;) {
        while (node_linked(&W.run)) {
            ch_tx *tx = TX_OF(W.run.next, node);
            node_unlink(&tx->node);
            W.cur = tx;
            writer_serve(tx);
        }
        writer_sleep();
    }
    return NULL;
}

/*
 * fork() keeps only the forking thread.  So that the child finds every tx and
 * the writer's schedule in a consistent state, with no lock held by a thread
 * that is not there, the fork waits until no tx is in use: it takes every
 * tx's mutex (each is held for microseconds at a time, and a Python thread
 * may hold one without the GIL) and W.mu.  The child then forgets the
 * parent's writer (its own starts on demand) and unlocks it all.
 */
static void atfork_prepare(void)
{
    pthread_mutex_lock(&REG.mu);
    for (struct node *p = REG.all.next; p != &REG.all; p = p->next)
        pthread_mutex_lock(&TX_OF(p, all)->mu);
    pthread_mutex_lock(&W.mu);
}

static void unlock_all(void)
{
    pthread_mutex_unlock(&W.mu);
    for (struct node *p = REG.all.next; p != &REG.all; p = p->next)
        pthread_mutex_unlock(&TX_OF(p, all)->mu);
}

static void atfork_parent(void)
{
    unlock_all();
    pthread_mutex_unlock(&REG.mu);
}

static void forget(ch_tx *tx)
{
    node_unlink(&tx->node);
    tx->stalled = 0;
    tx->owned = 0;
}

static void atfork_child(void)
{
    while (node_linked(&W.run))
        forget(TX_OF(W.run.next, node));
    while (node_linked(&W.stall))
        forget(TX_OF(W.stall.next, node));
    ch_tx *zombie = NULL;
    if (W.cur) { /* taken off W.run by the parent's writer, which waited for its mutex */
        /* (or was in sendmsg on it, `writing`: the bytes it took stay queued
         * in fl, ahead of q, the rest of the parent's stream) */
        W.cur->writing = 0;
        W.cur->owned = 0;
        if (W.cur->zombie)
            zombie = W.cur;
        W.cur = NULL;
    }
    if (W.efd >= 0)
        close(W.efd); /* shared with the parent: its wake-ups are not for us */
    W.efd = -1;
    W.running = 0;
    W.asleep = 0;
    free(W.pfd);
    W.pfd = NULL;
    W.pcap = 0;
    memset(&W.st, 0, sizeof W.st);
    /* A parent's thread waiting in ch_tx_close (for that sendmsg) is not here:
     * start every tx's condition variable afresh, without its waiters. */
    for (struct node *p = REG.all.next; p != &REG.all; p = p->next)
        pthread_cond_init(&TX_OF(p, all)->idle, NULL);
    unlock_all(); /* (locked by atfork_prepare, in this very thread) */
    if (zombie) { /* ch_tx_free left it to the parent's writer */
        node_unlink(&zombie->all);
        tx_release(zombie);
    }
    pthread_mutex_unlock(&REG.mu);
}

static void register_atfork(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* Under W.mu.  Returns 0 or -errno. */
static int writer_start(void)
{
    if (!W.pfd) {
        W.pfd = malloc(16 * sizeof *W.pfd);
        if (!W.pfd)
            return -ENOMEM;
        W.pcap = 16;
    }
    if (W.efd < 0) {
        W.efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (W.efd < 0)
            return -errno;
    }
    /* All signals blocked in the writer: process signals go to the Python
     * threads (whose handlers must run there) and never interrupt its poll. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (sched_getscheduler(0) == SCHED_BATCH) {
        /* Created by a dispatcher thread (see clusterhub/sched.py): a batch
         * writer woken on a busy poster's CPU would wait for the poster's
         * time slice to end.  Set at creation: no window under batch. */
        struct sched_param sp = {0};
        pthread_attr_setinheritsched(&attr, PTHREAD_EXPLICIT_SCHED);
        pthread_attr_setschedpolicy(&attr, SCHED_OTHER);
        pthread_attr_setschedparam(&attr, &sp);
    }
    int r = pthread_create(&W.thread, &attr, writer_main, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (r)
        return -r;
    pthread_setname_np(W.thread, "ch-writer");
    W.running = 1;
    return 0;
}

/* Put tx (not on the writer's schedule) on it.  Under tx->mu; *wake as writer_need_wake. */
static int writer_schedule(ch_tx *tx, int fd, int *wake)
{
    pthread_mutex_lock(&W.mu);
    int r = W.running ? 0 : writer_start();
    if (r == 0) {
        tx->fd = fd;
        node_push(&W.run, &tx->node);
        *wake = writer_need_wake();
    }
    pthread_mutex_unlock(&W.mu);
    return r;
}

int ch_tx_writer_start(void)
{
    pthread_mutex_lock(&W.mu);
    int r = W.running ? 0 : writer_start();
    pthread_mutex_unlock(&W.mu);
    return r;
}

void ch_tx_writer_stats(ch_writer_stats *out)
{
    pthread_mutex_lock(&W.mu);
    *out = W.st;
    out->running = W.running;
    out->cpu_ns = 0;
    clockid_t cid;
    struct timespec ts;
    if (W.running && pthread_getcpuclockid(W.thread, &cid) == 0 && clock_gettime(cid, &ts) == 0)
        out->cpu_ns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    pthread_mutex_unlock(&W.mu);
}

/* ---- sending and posting ---------------------------------------------- */

/* See ch_tx_post for the policy.  Under tx->mu; *wake as writer_need_wake. */
static int64_t tx_post(ch_tx *tx, int fd, struct iovec *iov, int cnt, int *wake)
{
    if (tx_queued(tx) == 0 && !tx->owned && mono_ns() - tx->last_direct > CH_TX_POST_WINDOW_NS) {
        int64_t d = tx_sendv(tx, fd, iov, cnt);
        if (d <= 0) /* all written, or an error */
            return d;
        /* The socket was full: the rest goes to the writer too (it waits for
         * POLLOUT), or nobody would write it before the next send. */
    } else {
        int r = tx_append(tx, iov, cnt);
        if (r < 0)
            return r;
    }
    if (!tx->owned) { /* (so the writer is not writing: owned covers writing) */
        if (writer_schedule(tx, fd, wake) < 0) /* no writer thread: do as ch_tx_send */
            return tx_write(tx, fd);
        tx->owned = 1;
    }
    return (int64_t)tx_queued(tx);
}

/* Send or post the frame in iov, unless tx is unusable or `bad` (a validation error). */
static int64_t tx_submit(ch_tx *tx, int fd, int bad, struct iovec *iov, int cnt, int post)
{
    int wake = -1;
    pthread_mutex_lock(&tx->mu);
    int64_t r = tx_error(tx);
    if (r == 0)
        r = bad;
    if (r == 0)
        r = post ? tx_post(tx, fd, iov, cnt, &wake) : tx_sendv(tx, fd, iov, cnt);
    pthread_mutex_unlock(&tx->mu);
    if (wake >= 0) /* after unlocking: the writer wants tx->mu first thing */
        writer_wake(wake);
    return r;
}

static int64_t tx_frame(ch_tx *tx, int fd, const uint8_t *payload, size_t len, size_t max_len,
                        int post)
{
    int bad = len > max_len || len > CH_FRAME_MAX_LIMIT ? -EMSGSIZE : 0;
    uint8_t h[CH_FRAME_HEADER];
    put_header(h, (uint32_t)len);
    struct iovec iov[2] = {{h, sizeof h}, {(void *)payload, len}};
    return tx_submit(tx, fd, bad, iov, 2, post);
}

static int64_t tx_msg(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                      uint64_t rid, const uint8_t *name, size_t name_len, const uint8_t *body,
                      size_t body_len, int post)
{
    size_t len = CH_MSG_HEADER + name_len + body_len;
    int bad = 0;
    if (name_len > CH_MSG_NAME_MAX || kind > CH_MSG_KIND_MAX)
        bad = -EINVAL;
    else if (len > max_len || len > CH_FRAME_MAX_LIMIT || body_len > CH_FRAME_MAX_LIMIT)
        bad = -EMSGSIZE;
    uint8_t h[CH_FRAME_HEADER + CH_MSG_HEADER];
    put_header(h, (uint32_t)len);
    ch_msg_put(h + CH_FRAME_HEADER, kind, origin, rid, name_len);
    struct iovec iov[3] = {{h, sizeof h}, {(void *)name, name_len}, {(void *)body, body_len}};
    return tx_submit(tx, fd, bad, iov, 3, post);
}

int64_t ch_tx_send(ch_tx *tx, int fd, const uint8_t *payload, size_t len, size_t max_len)
{
    return tx_frame(tx, fd, payload, len, max_len, 0);
}

int64_t ch_tx_post(ch_tx *tx, int fd, const uint8_t *payload, size_t len, size_t max_len)
{
    return tx_frame(tx, fd, payload, len, max_len, 1);
}

size_t ch_tx_post_each(ch_tx *const *txs, const int *fds, size_t n, const ch_tx *skip,
                       const uint8_t *payload, size_t len, size_t max_len, int64_t limit,
                       int64_t *out)
{
    size_t attention = 0;
    for (size_t i = 0; i < n; i++) {
        out[i] = txs[i] == skip ? 0 : tx_frame(txs[i], fds[i], payload, len, max_len, 1);
        if (out[i] < 0 || out[i] > limit)
            attention++;
    }
    return attention;
}

int64_t ch_tx_send_msg(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                       uint64_t rid, const uint8_t *name, size_t name_len,
                       const uint8_t *body, size_t body_len)
{
    return tx_msg(tx, fd, max_len, kind, origin, rid, name, name_len, body, body_len, 0);
}

int64_t ch_tx_post_msg(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                       uint64_t rid, const uint8_t *name, size_t name_len,
                       const uint8_t *body, size_t body_len)
{
    return tx_msg(tx, fd, max_len, kind, origin, rid, name, name_len, body, body_len, 1);
}

void ch_tx_close(ch_tx *tx)
{
    int wake = -1;
    pthread_mutex_lock(&tx->mu);
    tx->closed = 1; /* nothing is queued from here on */
    /* The writer may be in sendmsg on the fd (without tx->mu): the caller
     * closes the fd once we return, so wait for it (microseconds). */
    while (tx->writing)
        pthread_cond_wait(&tx->idle, &tx->mu);
    tx->owned = 0;
    tx_drop(tx);
    pthread_mutex_lock(&W.mu);
    if (node_linked(&tx->node)) {
        /* A sleeping writer polls a stalled tx's socket, and poll holds a
         * reference to it: the peer would not see the caller's close(fd) until
         * the writer wakes up.  Wake it so that it drops the socket now. */
        if (tx->stalled)
            wake = writer_need_wake();
        node_unlink(&tx->node);
        tx->stalled = 0;
    }
    pthread_mutex_unlock(&W.mu);
    pthread_mutex_unlock(&tx->mu);
    if (wake >= 0)
        writer_wake(wake);
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

int ch_rx_buffered(ch_rx *rx)
{
    return rx_scan(rx);
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
