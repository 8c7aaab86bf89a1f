/*
 * snapshot.h - C helpers of aggtree snapshots: the crc32 of the trailer
 * (two threads for large buffers) and the checks of numeric sections
 * (snapshot.c), and a numeric section read from a file straight into a
 * tree (snapshot_read.c).  No Python.h.
 */
#ifndef AGGTREE_SNAPSHOT_H
#define AGGTREE_SNAPSHOT_H

#include <stddef.h>
#include <stdint.h>

#include "aggtree.h"

#ifdef __cplusplus
extern "C" {
#endif

/* zlib's crc32(crc, p, n): the same value as Python's zlib.crc32(data, crc),
 * folded with PCLMULQDQ where the CPU has it (else byte by byte: slow; ask
 * agg_snapshot_crc32_fast() first and use zlib then); from 4 MiB in two
 * halves on two threads.  Thread-safe after the first call of
 * agg_snapshot_crc32_fast(). */
uint32_t agg_snapshot_crc32(uint32_t crc, const uint8_t *p, size_t n);

/* 1 when agg_snapshot_crc32 has its fast path on this CPU, else 0. */
int agg_snapshot_crc32_fast(void);

/* The crc32 of A B from crc1 = crc32(A), crc2 = crc32(B) and len2 = |B|
 * (zlib's crc32_combine).  O(log len2). */
uint32_t agg_snapshot_crc32_combine(uint32_t crc1, uint32_t crc2, uint64_t len2);

/* Snapshot kinds of a numeric section (docs/SNAPSHOT.md). */
enum { AGG_SNAP_KIND_FLOAT = 0, AGG_SNAP_KIND_INT = 1, AGG_SNAP_KIND_NONE = 3 };

/* The checks of a numeric section's n items, keys[2 j] the key image of
 * item j (keys[2 j + 1] its id image, any value) and vals[j] its value:
 * every value finite, every key image one the kind can hold (NONE: that of
 * 0.0; FLOAT: a non-NaN double but -0.0; INT: an integral double within
 * +-2^53).  Returns the first bad item and sets *what (1: its value,
 * 2: its key), or -1.  keys NULL: the values only; vals NULL: the keys
 * only.  Two threads for large sections. */
int64_t agg_snapshot_check_items(const uint64_t *keys, const double *vals, uint64_t n,
                                 int kind, int *what);

/* Results of agg_snapshot_read_numeric. */
enum {
    AGG_SNAP_READ_OK = 0,
    AGG_SNAP_READ_BAD = 1,       /* an item fails a check, or t was not an empty FAST tree */
    AGG_SNAP_READ_SHORT = 2,     /* the file could not be read in full */
    AGG_SNAP_READ_NOMEM = 3      /* an allocation failed */
};

/* Read the numeric section of n >= 1 items of the given kind at byte
 * offset off of file fd (16 n bytes of keys, then 8 n of values: the
 * layout of docs/SNAPSHOT.md) into the empty FAST tree t, checking every
 * item as agg_snapshot_check_items does and their strict order; *crc is
 * then the crc32 of the section's 24 n bytes (from 0, as zlib.crc32 of
 * them).  Anything but AGG_SNAP_READ_OK leaves t empty and *crc
 * untouched.  Reads with pread (fd's position is not used or moved); two
 * threads for large sections (not with AGGTREE_THREADS=1). */
int agg_snapshot_read_numeric(int fd, uint64_t off, uint64_t n, int kind, agg_tree *t,
                              uint32_t *crc);

#ifdef __cplusplus
}
#endif
#endif /* AGGTREE_SNAPSHOT_H */
