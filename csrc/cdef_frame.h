/* What cffi sees of frame.h (contracts are in frame.h; the envelope that
 * ch_tx_send_msg builds is in cdef_envelope.h). */
#define CH_FRAME_HEADER 8
#define CH_FRAME_MAX_LIMIT 2147483647
#define CH_RX_MAX_FRAMES 1024
#define CH_TX_POST_WINDOW_NS 50000
#define CH_TX_COALESCE_NS 20000
#define CH_ERR_EOF ...
#define CH_ERR_TRUNCATED ...
#define CH_ERR_MALFORMED ...
#define CH_ERR_TOOBIG ...

typedef struct ch_tx ch_tx;
typedef struct ch_rx ch_rx;

int ch_socketpair(int fds[2]);
int ch_tx_new(ch_tx **out);
void ch_tx_free(ch_tx *tx);
int64_t ch_tx_send(ch_tx *tx, int fd, const uint8_t *payload, size_t len, size_t max_len);
int64_t ch_tx_send_msg(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                       uint64_t rid, const uint8_t *name, size_t name_len,
                       const uint8_t *body, size_t body_len);
void ch_tx_close(ch_tx *tx);
int64_t ch_tx_push(ch_tx *tx, const uint8_t *payload, size_t len, size_t max_len);
int64_t ch_tx_flush(ch_tx *tx, int fd);
int64_t ch_tx_post(ch_tx *tx, int fd, const uint8_t *payload, size_t len, size_t max_len);
int64_t ch_tx_post_msg(ch_tx *tx, int fd, size_t max_len, unsigned kind, uint32_t origin,
                       uint64_t rid, const uint8_t *name, size_t name_len,
                       const uint8_t *body, size_t body_len);
size_t ch_tx_post_each(ch_tx *const *txs, const int *fds, size_t n, const ch_tx *skip,
                       const uint8_t *payload, size_t len, size_t max_len, int64_t limit,
                       int64_t *out);
size_t ch_tx_pending(const ch_tx *tx);
size_t ch_tx_unowned(const ch_tx *tx);
typedef struct {
    uint64_t wakeups;
    uint64_t sleeps;
    uint64_t writes;
    int64_t cpu_ns;
    int running;
} ch_writer_stats;
int ch_tx_writer_start(void);
void ch_tx_writer_stats(ch_writer_stats *out);
int ch_rx_new(size_t max_len, ch_rx **out);
void ch_rx_free(ch_rx *rx);
int ch_rx_read(ch_rx *rx, int fd);
int ch_rx_buffered(ch_rx *rx);
int ch_rx_feed(ch_rx *rx, const uint8_t *data, size_t len, size_t *used);
int ch_rx_eof(const ch_rx *rx);
const uint8_t *ch_rx_data(const ch_rx *rx);
const uint32_t *ch_rx_frames(const ch_rx *rx);
