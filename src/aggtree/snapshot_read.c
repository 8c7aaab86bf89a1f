/*
 * snapshot_read.c - one numeric section of a snapshot file read straight
 * into the leaves of a new tree: what Aggregate.load(path) does with the
 * large sections of a snapshot (the Python side, _snapshot.pxi and
 * snapshot.py's read_path_streamed, reads the rest and falls back to the
 * whole-file reader on any doubt).
 *
 * Why.  A load that reads the file into a buffer and then builds the tree
 * from the buffer writes every byte into fresh memory twice (the buffer,
 * then the leaves) and reads it three times more (checksum, item checks,
 * the build's copy).  Fresh memory is what a load's time is mostly made of
 * (core/alloc.c, section 10): a 240 MB buffer alone costs what
 * numpy.fromfile of the file costs.  Here the section goes through a
 * small buffer that stays in the core's cache:
 *
 *   for each chunk of whole leaves (~256 KiB of keys, then of values):
 *     pread the chunk into the buffer         (page cache -> cache)
 *     crc32 of the chunk, continuing          (snapshot.c, cache-hot)
 *     the item checks of the kind             (snapshot.c, cache-hot)
 *     agg_build_put_keys / _put_values        (cache -> the leaves; the
 *                                              order check, and the leaf
 *                                              summaries into level 1)
 *
 * so every byte is written to fresh memory once, as numpy.fromfile writes
 * it.  Leaves [0, L/2) and [L/2, L) are two halves, each on its own
 * thread (the keys of its half, then the values), for sections of at least
 * 4 MiB; the halves' checksums are combined into the section's.
 *
 * The result says only "valid" or not: the caller reports errors by
 * reading the file again the ordinary way (whose checks give the message
 * and the byte offset), so nothing here formats a message, and a section
 * that fails any check leaves the tree empty (agg_build_abort).
 */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE 1        /* pread */
#endif
#include "snapshot.h"
#include "aggtree.h"
#include "core/threading.h"

#include <errno.h>
#include <stdlib.h>
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define HAVE_PREAD 1
#endif

/* Bytes of keys per chunk (whole leaves; at least one leaf). */
#define READ_CHUNK ((uint64_t)256 << 10)
/* Sections from which the two halves run on two threads. */
#define READ_PAR_MIN ((uint64_t)4 << 20)

/* One half of a section. */
typedef struct read_half {
    int fd;
    uint64_t koff, voff;         /* file offsets of the section's keys and values */
    agg_build *b;
    int kind;
    uint64_t l0, l1;             /* its leaves */
    uint64_t per_chunk;          /* leaves per chunk */
    size_t buf_bytes;
    uint32_t crc_k, crc_v;       /* out: crc32 of its keys, of its values */
    int status;                  /* out: AGG_SNAP_READ_* */
} read_half;

/* n bytes at offset off of fd into p; 0 on an error or end of file (and
 * always without pread: the caller then reads the file the ordinary way). */
static int pread_full(int fd, uint8_t *p, size_t n, uint64_t off)
{
#ifdef HAVE_PREAD
    while (n) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return 0;
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return 1;
#else
    (void)fd, (void)p, (void)n, (void)off;
    return 0;
#endif
}

/* The keys (part 0) or values (part 1) of a half's leaves, chunk by chunk;
 * the crc32 of those bytes, or status set. */
static uint32_t read_part(read_half *h, uint8_t *buf, int part)
{
    uint64_t a, z, i0, i1, width = part ? 8 : 16;
    uint32_t crc = 0;
    int what;
    for (a = h->l0; a < h->l1; a = z) {
        z = a + h->per_chunk < h->l1 ? a + h->per_chunk : h->l1;
        i0 = agg_build_leaf_start(h->b, a);
        i1 = agg_build_leaf_start(h->b, z);
        if (!pread_full(h->fd, buf, (size_t)(width * (i1 - i0)),
                        (part ? h->voff : h->koff) + width * i0)) {
            h->status = AGG_SNAP_READ_SHORT;
            return 0;
        }
        crc = agg_snapshot_crc32(crc, buf, (size_t)(width * (i1 - i0)));
        if (part) {
            if (agg_snapshot_check_items(NULL, (const double *)buf, i1 - i0, h->kind, &what) >= 0) {
                h->status = AGG_SNAP_READ_BAD;
                return 0;
            }
            agg_build_put_values(h->b, a, z, (const double *)buf);
        } else if (agg_snapshot_check_items((const uint64_t *)buf, NULL, i1 - i0, h->kind,
                                            &what) >= 0 ||
                   agg_build_put_keys(h->b, a, z, (const agg_key *)buf) != UINT64_MAX) {
            h->status = AGG_SNAP_READ_BAD;
            return 0;
        }
    }
    return crc;
}

static void *read_half_job(void *arg)
{
    read_half *h = (read_half *)arg;
    uint8_t *buf = (uint8_t *)malloc(h->buf_bytes);
    h->status = AGG_SNAP_READ_OK;
    if (!buf) {
        h->status = AGG_SNAP_READ_NOMEM;
        return NULL;
    }
    h->crc_k = read_part(h, buf, 0);
    if (h->status == AGG_SNAP_READ_OK)
        h->crc_v = read_part(h, buf, 1);
    free(buf);
    return NULL;
}

/* See snapshot.h. */
int agg_snapshot_read_numeric(int fd, uint64_t off, uint64_t n, int kind, agg_tree *t,
                              uint32_t *crc)
{
    agg_build *b;
    read_half h[2];
    uint64_t leaves, per_leaf, mid;
    agg_status st = agg_build_begin(t, n, &b);
    int parts = 1, i;
    if (st != AGG_OK)
        return st == AGG_NOMEM ? AGG_SNAP_READ_NOMEM : AGG_SNAP_READ_BAD;
    leaves = agg_build_leaves(b);
    per_leaf = leaves > 1 ? agg_build_leaf_start(b, 1) : n;   /* (no leaf holds more) */
    h[0].fd = fd;
    h[0].koff = off;
    h[0].voff = off + 16 * n;
    h[0].b = b;
    h[0].kind = kind;
    h[0].l0 = 0;
    h[0].l1 = leaves;
    h[0].per_chunk = READ_CHUNK / (16 * per_leaf) ? READ_CHUNK / (16 * per_leaf) : 1;
    h[0].buf_bytes = (size_t)(16 * per_leaf * h[0].per_chunk);
    h[0].crc_k = h[0].crc_v = 0;
    h[1] = h[0];
    (void)agg_snapshot_crc32_fast();               /* (its CPU check, before the threads) */
    if (24 * n >= READ_PAR_MIN && leaves > 1 && threads_allowed()) {
        h[0].l1 = h[1].l0 = leaves / 2;
        if (run_two(read_half_job, &h[0], &h[1]))
            parts = 2;
        else
            h[0].l1 = leaves;                      /* (no helper: all here) */
    }
    if (parts == 1)
        read_half_job(&h[0]);
    for (i = 0; i < parts; i++)
        if (h[i].status != AGG_SNAP_READ_OK) {
            agg_build_abort(b);
            return h[i].status;
        }
    mid = agg_build_leaf_start(b, h[1].l0);
    if (agg_build_finish(b, NULL) != AGG_OK)        /* (frees b) */
        return AGG_SNAP_READ_BAD;
    if (parts == 2) {
        h[0].crc_k = agg_snapshot_crc32_combine(h[0].crc_k, h[1].crc_k, 16 * (n - mid));
        h[0].crc_v = agg_snapshot_crc32_combine(h[0].crc_v, h[1].crc_v, 8 * (n - mid));
    }
    *crc = agg_snapshot_crc32_combine(h[0].crc_k, h[0].crc_v, 8 * n);
    return AGG_SNAP_READ_OK;
}
