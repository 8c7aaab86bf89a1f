/*
 * bench_floor.c - the memory floor of a batch insert on this machine (not a
 * test, and it does not use the aggtree core).
 *
 *   bench_floor [leaves [items]]     default: 15625 leaves, 100000 items
 *
 * A batch of 100,000 random keys into a 1,000,000-item tree (node size 64:
 * 15,625 leaves of 1,560 bytes) touches every leaf.  However it is
 * organised, an all-or-nothing batch insert that first checks every key
 * (section 13, core/batch_insert.c) reads the keys of every leaf once (check) and
 * then moves most of every leaf's keys and values up to make room (apply).
 * This program does exactly that much memory work and nothing else, on
 * blocks of a leaf's size allocated one by one and visited in an order
 * unrelated to their addresses (as a tree's leaves are after churn), with
 * the same software prefetching as the core (4 blocks ahead):
 *
 *   read   read the 1 KiB key region of every block (sum its words);
 *   move   memmove the keys and values of every block up by a few slots.
 *
 * It prints both as ns per batch item (total time / items), the best of 5
 * runs: the floor of each of the core's two passes.  Compare with
 * `BENCH_BATCH_ONLY=1 bench_core 1000000 64` (insert_sorted, ns per item).
 */
#define _POSIX_C_SOURCE 199309L  /* clock_gettime */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { LEAF = 1560, KEYS_AT = 24, KEYS = 1024, VALS_AT = KEYS_AT + KEYS, VALS = 512 };

#include "bench_util.h"

int main(int argc, char **argv)
{
    long leaves = argc > 1 ? atol(argv[1]) : 15625, items = argc > 2 ? atol(argv[2]) : 100000;
    char **lv;
    double best_read = 1e30, best_move = 1e30;
    uint64_t acc = 0;
    long i;
    int r, q;
    if (leaves < 1 || items < 1) {
        fprintf(stderr, "usage: bench_floor [leaves [items]]\n");
        return 2;
    }
    lv = (char **)malloc((size_t)leaves * sizeof *lv);
    if (!lv)
        return 1;
    for (i = 0; i < leaves; i++) {
        lv[i] = (char *)malloc(LEAF);
        if (!lv[i])
            return 1;
        memset(lv[i], (int)(i & 0xFF), LEAF);
    }
    for (i = leaves - 1; i > 0; i--) {   /* visiting order != address order */
        long j = (long)(rnd() % (uint64_t)(i + 1));
        char *t = lv[i];
        lv[i] = lv[j];
        lv[j] = t;
    }
    for (r = 0; r < 5; r++) {
        double t0 = wall_now(), t1, t2;
        for (i = 0; i < leaves; i++) {
            const uint64_t *p = (const uint64_t *)(void *)lv[i];   /* header, keys */
            long k;
            if (i + 4 < leaves)
                for (q = 0; q < (KEYS_AT + KEYS) / 64 + 1; q++)
                    __builtin_prefetch(lv[i + 4] + 64 * q);
            for (k = KEYS_AT / 8; k < (KEYS_AT + KEYS) / 8; k += 2)
                acc += p[k];   /* every line of the keys */
        }
        t1 = wall_now();
        for (i = 0; i < leaves; i++) {
            if (i + 4 < leaves)
                for (q = 0; q < LEAF / 64 + 1; q++)
                    __builtin_prefetch(lv[i + 4] + 64 * q, 1);
            /* the first new key lands ~1/8 into the leaf: 7/8 of it moves up 6 slots */
            memmove(lv[i] + KEYS_AT + 16 * 14, lv[i] + KEYS_AT + 16 * 8, KEYS - 16 * 14);
            memmove(lv[i] + VALS_AT + 8 * 14, lv[i] + VALS_AT + 8 * 8, VALS - 8 * 14);
        }
        t2 = wall_now();
        if (t1 - t0 < best_read)
            best_read = t1 - t0;
        if (t2 - t1 < best_move)
            best_move = t2 - t1;
    }
    printf("%ld leaves of %d bytes, per batch item of %ld: read keys %.1f ns, move %.1f ns"
           " (checksum %llu)\n", leaves, (int)LEAF, items, best_read / (double)items * 1e9,
           best_move / (double)items * 1e9, (unsigned long long)(acc & 1));
    for (i = 0; i < leaves; i++)
        free(lv[i]);
    free(lv);
    return 0;
}
