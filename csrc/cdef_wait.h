/* What cffi sees of wait.h (contracts are there).  The waits themselves are
 * declared to cffi as their *_nogil wrappers (cdef_nogil.h). */
#define CH_SPIN_RECHECK_NS 100000000
#define CH_SPIN_MAX_MISSES 4
#define CH_SPIN_MAX_REST 4096

typedef struct ch_spin {
    int64_t cap_ns;
    int64_t avg_ns;
    int64_t checked_ns;
    int64_t parked_ns;
    int32_t peer_pid;
    int32_t peer_tid;
    int32_t same_cpu;
    int32_t parked_cpu;
    uint32_t misses;
    uint32_t rest;
    uint32_t rest_next;
    uint32_t pad;
    uint64_t spins, hits;
} ch_spin;

void ch_spin_init(ch_spin *s, int64_t cap_ns, int32_t peer_pid, int32_t peer_tid);
void ch_spin_peer(ch_spin *s, int32_t peer_pid);
int64_t ch_spin_budget(ch_spin *s);
void ch_spin_record(ch_spin *s, int spun, int hit, int64_t waited_ns);
