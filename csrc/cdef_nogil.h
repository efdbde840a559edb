/* What cffi sees of nogil.h (contracts are there): the calls that may wait,
 * which release the GIL themselves.  After cdef_frame.h, cdef_locktable.h and
 * cdef_wait.h (it uses their types). */
int ch_lt_timedlock_nogil(ch_table *t, uint32_t slot, uint64_t gen, int64_t deadline_ns);
int ch_lt_resolve_nogil(ch_table *t, const uint8_t *key, size_t keylen, uint32_t *slot,
                        uint64_t *gen);
int ch_lt_timedlock_ref_nogil(uint64_t ref, int64_t deadline_ns);
int64_t ch_tx_send_msg_nogil(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                             uint64_t rid, const uint8_t *name, size_t name_len,
                             const uint8_t *body, size_t body_len);
int ch_rx_wait_nogil(ch_rx *rx, int fd, int ep_fd, int wake_fd, ch_spin *s,
                     int64_t deadline_ns);
int ch_spin_readable_nogil(int fd, ch_spin *s);
