/*
 * envelope.h - the message envelope: the header at the start of every frame
 * payload clusterhub sends (frame.h frames it; this says what is inside).
 *
 * The one definition of the envelope.  frame.c (ch_tx_send_msg/post_msg,
 * which build it in C) and decode.c (decode_messages) use the helpers below;
 * Python reads the same constants through the cffi cdef (cdef_envelope.h),
 * and clusterhub.protocol builds its struct format from the field offsets
 * and sizes (checking them at import), so nothing restates these numbers.
 *
 * Layout, all integers little-endian, no padding:
 *
 *   offset  size  field
 *   0       1     kind         one of CH_KIND_* (u8)
 *   1       4     origin       the sender's worker id, 0 for the master (u32)
 *   5       8     request id   pairs a request with its reply, 0 otherwise (u64)
 *   13      2     name length  bytes of name that follow (u16)
 *   15            name         name-length bytes (UTF-8: the receiver checks)
 *                 body         the rest of the payload (the user's serializer)
 *
 * Header-only (static inline helpers), no allocation, no state: any
 * thread.  The helpers check bounds only where they say so.
 */
#ifndef CLUSTERHUB_ENVELOPE_H
#define CLUSTERHUB_ENVELOPE_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

/* Kinds (the envelope's first byte). */
#define CH_KIND_MSG 1   /* plain one-way message */
#define CH_KIND_REQ 2   /* request, answered by CH_KIND_RES or CH_KIND_ERR with its id */
#define CH_KIND_RES 3   /* successful reply */
#define CH_KIND_ERR 4   /* failed reply */
#define CH_KIND_BCAST 5 /* a worker's broadcast, relayed by the master to the others */

/* Field offsets (CH_MSG_*_AT) and sizes in bytes (CH_MSG_*_SIZE). */
#define CH_MSG_KIND_AT 0
#define CH_MSG_KIND_SIZE 1
#define CH_MSG_ORIGIN_AT 1
#define CH_MSG_ORIGIN_SIZE 4
#define CH_MSG_RID_AT 5
#define CH_MSG_RID_SIZE 8
#define CH_MSG_NAMELEN_AT 13
#define CH_MSG_NAMELEN_SIZE 2
/* The envelope's size: the name starts here. */
#define CH_MSG_HEADER 15
/* The largest kind and the longest name the fields can state. */
#define CH_MSG_KIND_MAX 0xff
#define CH_MSG_NAME_MAX 0xffff

_Static_assert(CH_MSG_KIND_AT == 0, "envelope: kind first");
_Static_assert(CH_MSG_ORIGIN_AT == CH_MSG_KIND_AT + CH_MSG_KIND_SIZE, "envelope: packed");
_Static_assert(CH_MSG_RID_AT == CH_MSG_ORIGIN_AT + CH_MSG_ORIGIN_SIZE, "envelope: packed");
_Static_assert(CH_MSG_NAMELEN_AT == CH_MSG_RID_AT + CH_MSG_RID_SIZE, "envelope: packed");
_Static_assert(CH_MSG_HEADER == CH_MSG_NAMELEN_AT + CH_MSG_NAMELEN_SIZE, "envelope: packed");
_Static_assert(CH_MSG_KIND_MAX == (1 << (8 * CH_MSG_KIND_SIZE)) - 1, "envelope: kind");
_Static_assert(CH_MSG_NAME_MAX == (1 << (8 * CH_MSG_NAMELEN_SIZE)) - 1, "envelope: name length");
_Static_assert(CH_KIND_MSG > 0 && CH_KIND_BCAST <= CH_MSG_KIND_MAX, "envelope: kinds");

/*
 * Write the envelope of (kind, origin, rid, name_len) into e[0 .. CH_MSG_HEADER).
 * Stores the low byte of kind and the low 16 bits of name_len: the caller
 * checks kind <= CH_MSG_KIND_MAX and name_len <= CH_MSG_NAME_MAX first
 * (ch_tx_send_msg answers -EINVAL otherwise).
 */
static inline void ch_msg_put(uint8_t *e, unsigned kind, uint32_t origin, uint64_t rid,
                              size_t name_len)
{
    e[CH_MSG_KIND_AT] = (uint8_t)kind;
    for (int i = 0; i < CH_MSG_ORIGIN_SIZE; i++)
        e[CH_MSG_ORIGIN_AT + i] = (uint8_t)(origin >> (8 * i));
    for (int i = 0; i < CH_MSG_RID_SIZE; i++)
        e[CH_MSG_RID_AT + i] = (uint8_t)(rid >> (8 * i));
    e[CH_MSG_NAMELEN_AT] = (uint8_t)name_len;
    e[CH_MSG_NAMELEN_AT + 1] = (uint8_t)(name_len >> 8);
}

/* Field readers over a payload p of at least CH_MSG_HEADER bytes (unchecked:
 * see ch_msg_parse for a checked read). */
static inline unsigned ch_msg_kind(const uint8_t *p)
{
    return p[CH_MSG_KIND_AT];
}

static inline uint32_t ch_msg_origin(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 0; i < CH_MSG_ORIGIN_SIZE; i++)
        v |= (uint32_t)p[CH_MSG_ORIGIN_AT + i] << (8 * i);
    return v;
}

static inline uint64_t ch_msg_rid(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < CH_MSG_RID_SIZE; i++)
        v |= (uint64_t)p[CH_MSG_RID_AT + i] << (8 * i);
    return v;
}

static inline size_t ch_msg_name_len(const uint8_t *p)
{
    return (size_t)p[CH_MSG_NAMELEN_AT] | (size_t)p[CH_MSG_NAMELEN_AT + 1] << 8;
}

/* A payload's envelope, decoded (name and body point into the payload). */
typedef struct {
    unsigned kind;
    uint32_t origin;
    uint64_t rid;
    const uint8_t *name;
    size_t name_len;
    const uint8_t *body;
    size_t body_len;
} ch_msg;

/*
 * Decode the envelope of the payload p (len bytes; p is not kept).  Returns 0
 * and fills *out when the payload holds a whole envelope and the name it
 * declares (the body may be empty); returns -EPROTO, *out unspecified,
 * when len < CH_MSG_HEADER or the name runs past the end.  Checks neither
 * the kind nor the name's UTF-8 (that is the caller's: an unknown kind is
 * well-formed here).
 */
static inline int ch_msg_parse(const uint8_t *p, size_t len, ch_msg *out)
{
    if (len < CH_MSG_HEADER)
        return -EPROTO;
    size_t nlen = ch_msg_name_len(p);
    if (nlen > len - CH_MSG_HEADER)
        return -EPROTO;
    out->kind = ch_msg_kind(p);
    out->origin = ch_msg_origin(p);
    out->rid = ch_msg_rid(p);
    out->name = p + CH_MSG_HEADER;
    out->name_len = nlen;
    out->body = p + CH_MSG_HEADER + nlen;
    out->body_len = len - CH_MSG_HEADER - nlen;
    return 0;
}

#endif
