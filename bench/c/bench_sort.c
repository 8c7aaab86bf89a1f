/*
 * bench_sort.c - wall-clock benchmark of agg_keys_sort (not a test).
 *
 *   bench_sort [n ...]          default: 100000 1000000
 *   env BENCH_REPS (default 7): repetitions, best and median shown
 *   env BENCH_SHAPE=name: only that key shape
 *   env AGGTREE_THREADS=1: force the single-thread sort
 *
 * Key shapes (rest is a shuffled id 0..n-1 unless said otherwise):
 *   random   head = image of a random double in [0, 1) (as bench_core)
 *   sorted   the random keys already sorted
 *   reverse  the random keys in reverse order
 *   eqhead   all heads equal: the order is decided by rest
 *   few      16 distinct heads
 *   lowbits  heads differing only in their low 12 bits
 *   rand128  head and rest both fully random
 *   almost   the sorted keys with 1% of them swapped with random others
 * each with values and with values = NULL.  Wall-clock ns per key.
 */
#define _POSIX_C_SOURCE 199309L  /* clock_gettime */
#include "aggtree.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"

static int cmp_key(const void *a, const void *b)
{
    return agg_key_cmp(AGG_KEYS_FAST, *(const agg_key *)a, *(const agg_key *)b);
}

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static const char *const shapes[] = {"random", "sorted", "reverse", "eqhead",
                                     "few", "lowbits", "rand128", "almost"};
#define NSHAPES 8

static void make(agg_key *k, double *v, uint64_t n, int shape)
{
    uint64_t i;
    for (i = 0; i < n; i++) {
        double d = (double)(rnd() >> 11) * 0x1.0p-53;
        switch (shape) {
        case 3: k[i].head = agg_f64_to_key(0.5); break;
        case 4: k[i].head = agg_f64_to_key((double)(rnd() % 16) / 16.0); break;
        case 5: k[i].head = agg_f64_to_key(0.5) + (rnd() & 0xFFF); break;
        case 6: k[i].head = rnd(); break;
        default: k[i].head = agg_f64_to_key(d); break;
        }
        k[i].rest = shape == 6 ? rnd() : agg_i64_to_key((int64_t)i);
        v[i] = (double)(rnd() % 1000) * 0.25;
    }
    if (shape != 6)
        for (i = n; i > 1; i--) {
            uint64_t j = rnd() % i, t = k[i - 1].rest;
            k[i - 1].rest = k[j].rest;
            k[j].rest = t;
        }
    if (shape == 1 || shape == 2 || shape == 7) {
        qsort(k, n, sizeof *k, cmp_key);
        if (shape == 7)
            for (i = 0; i < n / 100; i++) {
                uint64_t a = rnd() % n, b = rnd() % n;
                agg_key t = k[a];
                k[a] = k[b];
                k[b] = t;
            }
        if (shape == 2)
            for (i = 0; i < n / 2; i++) {
                agg_key t = k[i];
                k[i] = k[n - 1 - i];
                k[n - 1 - i] = t;
            }
    }
}

int main(int argc, char **argv)
{
    static const uint64_t def[] = {100000, 1000000};
    int reps = getenv("BENCH_REPS") ? atoi(getenv("BENCH_REPS")) : 7, a, sh, wv, r;
    int na = argc > 1 ? argc - 1 : 2;
    if (reps < 1 || reps > 100)
        reps = 7;
    for (a = 0; a < na; a++) {
        uint64_t n = argc > 1 ? strtoull(argv[a + 1], NULL, 0) : def[a], i;
        agg_key *k0 = malloc(n * sizeof *k0), *k = malloc(n * sizeof *k);
        double *v0 = malloc(n * sizeof *v0), *v = malloc(n * sizeof *v);
        if (!k0 || !k || !v0 || !v)
            return 1;
        printf("n = %llu, wall ns per key, best / median of %d\n", (unsigned long long)n, reps);
        printf("%-8s | %15s | %15s\n", "shape", "with values", "values NULL");
        for (sh = 0; sh < NSHAPES; sh++) {
            double best[2], med[2];
            if (getenv("BENCH_SHAPE") && strcmp(getenv("BENCH_SHAPE"), shapes[sh]))
                continue;
            for (wv = 0; wv < 2; wv++) {
                double t[100];
                for (r = 0; r < reps; r++) {
                    double t0;
                    make(k0, v0, n, sh);
                    memcpy(k, k0, n * sizeof *k);
                    memcpy(v, v0, n * sizeof *v);
                    t0 = wall_now();
                    if (agg_keys_sort(k, wv ? NULL : v, n) != AGG_OK)
                        return 1;
                    t[r] = (wall_now() - t0) / (double)n * 1e9;
                    for (i = 1; i < n; i++)
                        if (agg_key_cmp(AGG_KEYS_FAST, k[i - 1], k[i]) > 0) {
                            printf("NOT SORTED (%s)\n", shapes[sh]);
                            return 1;
                        }
                }
                qsort(t, (size_t)reps, sizeof *t, cmp_dbl);
                best[wv] = t[0];
                med[wv] = reps % 2 ? t[reps / 2] : 0.5 * (t[reps / 2 - 1] + t[reps / 2]);
            }
            printf("%-8s | %6.2f / %6.2f | %6.2f / %6.2f\n", shapes[sh], best[0], med[0], best[1],
                   med[1]);
            fflush(stdout);
        }
        free(k0);
        free(k);
        free(v0);
        free(v);
    }
    return 0;
}
