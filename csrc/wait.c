/* wait.c - spin-then-block waits (contract and rationale in wait.h). */
#define _GNU_SOURCE
#include "wait.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

/* The budget is this much above twice the recent average wait: room for the
 * spread of reply times. */
#define SPIN_SLACK_NS 10000

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

void ch_spin_init(ch_spin *s, int64_t cap_ns, int32_t peer_pid, int32_t peer_tid)
{
    memset(s, 0, sizeof *s);
    s->cap_ns = cap_ns > 0 ? cap_ns : 0;
    s->peer_pid = peer_pid;
    s->peer_tid = peer_tid;
    s->rest_next = 16;
    s->checked_ns = INT64_MIN;
    s->parked_cpu = -1;
}

void ch_spin_peer(ch_spin *s, int32_t peer_pid)
{
    if (s->peer_pid != peer_pid) {
        s->peer_pid = peer_pid;
        s->peer_tid = 0;
        s->checked_ns = INT64_MIN; /* look at its affinity at the next wait */
        s->parked_cpu = -1;
    }
}

/* The CPU the peer's answering thread last ran on (field 39 of its
 * /proc/<pid>/task/<tid>/stat), or -1. */
static int peer_cpu(const ch_spin *s)
{
    char path[64], buf[1024];
    if (s->peer_pid <= 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%d/task/%d/stat", (int)s->peer_pid,
             (int)(s->peer_tid > 0 ? s->peer_tid : s->peer_pid));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* (the command name may hold spaces) */
    if (!p)
        return -1;
    /* Field 3 (the state) follows ") "; the CPU is field 39. */
    for (int field = 2; field < 39; field++) {
        p = strchr(p + 1, ' ');
        if (!p)
            return -1;
    }
    return atoi(p + 1);
}

/* Whether spinning here would only keep the peer from running: this thread
 * may run on one CPU only, and so may the peer, the same one.  (With a
 * single CPU online every thread is in that case.) */
static int peer_shares_our_only_cpu(int32_t peer_pid)
{
    cpu_set_t ours, theirs;
    if (sched_getaffinity(0, sizeof ours, &ours) != 0)
        return 0;
    if (CPU_COUNT(&ours) != 1)
        return 0;
    if (peer_pid <= 0)
        return sysconf(_SC_NPROCESSORS_ONLN) == 1;
    if (sched_getaffinity(peer_pid, sizeof theirs, &theirs) != 0)
        return 0; /* gone, or not ours to look at: spin as usual */
    return CPU_EQUAL(&ours, &theirs);
}

int64_t ch_spin_budget(ch_spin *s)
{
    if (s->cap_ns <= 0)
        return 0;
    if (s->rest) {
        s->rest--;
        return 0;
    }
    int64_t now = now_ns();
    if (s->checked_ns == INT64_MIN || now - s->checked_ns >= CH_SPIN_RECHECK_NS) {
        s->checked_ns = now;
        s->same_cpu = peer_shares_our_only_cpu(s->peer_pid);
    }
    if (s->same_cpu)
        return 0;
    if (s->parked_cpu >= 0) {
        if (sched_getcpu() == s->parked_cpu && now - s->parked_ns < CH_SPIN_RECHECK_NS)
            return 0;
        s->parked_cpu = -1; /* we moved, or a while passed: try again */
    }
    int64_t b = 2 * s->avg_ns + SPIN_SLACK_NS;
    return b < s->cap_ns ? b : s->cap_ns;
}

void ch_spin_record(ch_spin *s, int spun, int hit, int64_t waited_ns)
{
    if (waited_ns > 0) {
        /* Capped so that one long wait (an idle peer) does not keep the
         * budget at its cap for long. */
        int64_t w = waited_ns < 4 * s->cap_ns ? waited_ns : 4 * s->cap_ns;
        s->avg_ns += (w - s->avg_ns) / 8;
    }
    if (!spun)
        return;
    s->spins++;
    if (hit) {
        s->hits++;
        s->misses = 0;
        s->rest_next = 16;
        return;
    }
    int cpu = sched_getcpu();
    if (cpu >= 0 && peer_cpu(s) == cpu) {
        /* It could not run while we spun: spin no more from this CPU. */
        s->parked_cpu = cpu;
        s->parked_ns = now_ns();
        return;
    }
    if (++s->misses >= CH_SPIN_MAX_MISSES) {
        s->misses = 0;
        s->rest = s->rest_next;
        if (s->rest_next < CH_SPIN_MAX_REST)
            s->rest_next *= 2;
    }
}

static int64_t ns_to_deadline(int64_t deadline_ns, int64_t now)
{
    return deadline_ns < 0 ? -1 : (deadline_ns > now ? deadline_ns - now : 0);
}

int ch_rx_wait(ch_rx *rx, int fd, int ep_fd, int wake_fd, ch_spin *s, int64_t deadline_ns)
{
    /* Frames left buffered by the previous read come first.  No recv yet:
     * without a spin, epoll_wait tells whether the socket has data (a recv
     * that would block costs a syscall for nothing). */
    int n = ch_rx_buffered(rx);
    if (n != 0)
        return n;
    int64_t start = now_ns();
    int64_t budget = ch_spin_budget(s);
    if (deadline_ns >= 0 && start + budget > deadline_ns)
        budget = deadline_ns > start ? deadline_ns - start : 0;
    if (budget > 0) {
        int64_t until = start + budget, t;
        do {
            n = ch_rx_read(rx, fd);
            t = now_ns();
            if (n != 0) {
                ch_spin_record(s, 1, 1, t - start);
                return n;
            }
            cpu_relax();
        } while (t < until);
    }
    for (;;) {
        int64_t left = ns_to_deadline(deadline_ns, now_ns());
        if (left == 0) {
            ch_spin_record(s, budget > 0, 0, 0);
            return 0;
        }
        /* epoll_wait counts in milliseconds: round up, or a wait ending
         * within a millisecond of its deadline would spin on zero timeouts. */
        int ms = left < 0 ? -1 : left >= (int64_t)INT32_MAX * 1000000 ? INT32_MAX
                                 : (int)((left + 999999) / 1000000);
        struct epoll_event ev[2];
        int r = epoll_wait(ep_fd, ev, 2, ms);
        if (r < 0) {
            ch_spin_record(s, budget > 0, 0, 0);
            return -errno; /* -EINTR included: the caller runs the handlers */
        }
        int woken = 0, readable = 0;
        for (int i = 0; i < r; i++) {
            if (ev[i].data.fd == fd)
                readable = 1;
            else
                woken = 1;
        }
        if (woken && wake_fd >= 0) {
            uint64_t v;
            ssize_t got = read(wake_fd, &v, sizeof v);
            (void)got; /* drained, or drained by another reader: either way woken */
        }
        if (readable) {
            n = ch_rx_read(rx, fd);
            if (n != 0) {
                ch_spin_record(s, budget > 0, 0, now_ns() - start);
                return n;
            }
        }
        if (woken) {
            ch_spin_record(s, budget > 0, 0, 0);
            return 0;
        }
    }
}

int ch_spin_readable(int fd, ch_spin *s)
{
    return ch_spin_readable_for(fd, s, ch_spin_budget(s));
}

int ch_spin_readable_for(int fd, ch_spin *s, int64_t budget)
{
    if (budget <= 0)
        return 0;
    struct pollfd pf = {.fd = fd, .events = POLLIN};
    int64_t start = now_ns(), until = start + budget, t;
    do {
        cpu_relax();
        if (poll(&pf, 1, 0) > 0) {
            t = now_ns();
            ch_spin_record(s, 1, 1, t - start);
            return 1;
        }
        t = now_ns();
    } while (t < until);
    /* Ran out: it came later than the budget (or not at all), as a wait of
     * twice the budget counts in the average. */
    ch_spin_record(s, 1, 0, 2 * budget);
    return 0;
}
