/*
 * snapshot.h - C helpers of aggtree snapshots (snapshot.c): the crc32 of
 * the trailer.  No Python.h.
 */
#ifndef AGGTREE_SNAPSHOT_H
#define AGGTREE_SNAPSHOT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* zlib's crc32(crc, p, n): the same value as Python's zlib.crc32(data, crc),
 * folded with PCLMULQDQ where the CPU has it (else byte by byte: slow; ask
 * agg_snapshot_crc32_fast() first and use zlib then).  Thread-safe after the
 * first call of agg_snapshot_crc32_fast(). */
uint32_t agg_snapshot_crc32(uint32_t crc, const uint8_t *p, size_t n);

/* 1 when agg_snapshot_crc32 has its fast path on this CPU, else 0. */
int agg_snapshot_crc32_fast(void);

#ifdef __cplusplus
}
#endif
#endif /* AGGTREE_SNAPSHOT_H */
