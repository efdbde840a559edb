/* What cffi sees of locktable.h (contracts are in locktable.h).
 * The blocking calls (ch_lt_resolve, ch_lt_timedlock, ch_lt_timedlock_ref)
 * are not here: cffi sees only their *_nogil wrappers (cdef_nogil.h), which
 * release the GIL around them. */
#define CH_LT_KEY_MAX 255
#define CH_LT_THREAD_MAX_HELD 1024
#define CH_LT_SLOTS_MAX ...
#define CH_LT_RECOVERED 1
#define CH_LT_NEW 2
#define CH_LT_NEW_RECOVERED 3
#define CH_LT_MAX_TABLES 255
#define CH_LT_SLOT_NONE 16777215

typedef struct ch_table ch_table;
typedef struct {
    int32_t pid;
    int32_t worker_id;
    uint32_t keylen;
    uint8_t key[255];
} ch_lt_info;

int ch_lt_create(uint32_t nslots, ch_table **out);
int ch_lt_attach(int fd, ch_table **out);
int ch_lt_fd(const ch_table *t);
uint32_t ch_lt_nslots(const ch_table *t);
int ch_lt_close(ch_table *t);
void ch_lt_after_fork_child(ch_table *t);
void ch_lt_set_worker_id(ch_table *t, int32_t worker_id);
int ch_lt_busy(const ch_table *t);

int ch_lt_trylock(ch_table *t, uint32_t slot, uint64_t gen);
int ch_lt_unlock(ch_table *t, uint32_t slot);
int ch_lt_find(ch_table *t, const uint8_t *key, size_t keylen, uint32_t *slot, uint64_t *gen);
int ch_lt_is_locked(ch_table *t, uint32_t slot, uint64_t gen);
int ch_lt_slot_info(ch_table *t, uint32_t slot, ch_lt_info *out);
int ch_lt_check(ch_table *t);
int64_t ch_monotonic_ns(void);

/* Test-only crash injection, shipped on purpose: locktable.h says why. */
void ch_lt_set_crashpoint(int n);
int ch_lt_crashpoint_count(void);

uint64_t ch_lt_ref(const ch_table *t, uint32_t slot, uint64_t gen);
int ch_lt_trylock_ref(uint64_t ref);
int ch_lt_unlock_ref(uint64_t ref);
int ch_lt_retire(ch_table *t);
void ch_lt_disable(ch_table *t);
