/*
 * bench_core.c - micro-benchmark of the aggtree C core (not a test).
 *
 *   bench_core [n [node_size ...]]        default: 1000000 items, 16 32 64 128 256
 *   (env BENCH_REPS: repetitions, default 3; the best of them is shown)
 *
 * For each node size: n FAST items (random doubles as sort keys, distinct
 * ids) inserted in random order, then timed per operation: insert, get,
 * rank (random existing keys, random order), rank_many (the same keys
 * sorted), select, sum over random index ranges, delete (all, random
 * order); bytes per item (agg_tree_nbytes / n) after the random inserts,
 * after sequential (appending) inserts and after agg_tree_build.  Times are
 * thread CPU time in ns per operation, the best of BENCH_REPS full runs.
 */
#define _POSIX_C_SOURCE 199309L  /* clock_gettime */
#include "aggtree.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t g_rng = 0x12345678;

static uint64_t rnd(void)
{
    uint64_t z = (g_rng += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* CPU time of this thread: the machine may be shared, and time spent
 * descheduled is not the tree's. */
static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void shuffle(agg_key *a, uint64_t n)
{
    uint64_t i;
    for (i = n; i > 1; i--) {
        uint64_t j = rnd() % i;
        agg_key t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

static int cmp_key(const void *a, const void *b)
{
    return agg_key_cmp(AGG_KEYS_FAST, *(const agg_key *)a, *(const agg_key *)b);
}

static volatile uint64_t g_sink;

static void die(const char *what)
{
    fprintf(stderr, "bench_core: %s\n", what);
    exit(1);
}

int main(int argc, char **argv)
{
    static const uint32_t default_sizes[] = {16, 32, 64, 128, 256};
    uint64_t n = argc > 1 ? strtoull(argv[1], NULL, 0) : 1000000, i;
    const uint32_t *sizes = default_sizes;
    uint32_t *given = NULL;
    int nsizes = 5, si, reps = getenv("BENCH_REPS") ? atoi(getenv("BENCH_REPS")) : 3;
    agg_key *keys = (agg_key *)malloc(n * sizeof *keys);
    agg_key *sorted = (agg_key *)malloc(n * sizeof *sorted);
    agg_key *q = (agg_key *)malloc(n * sizeof *q);
    double *vals = (double *)malloc(n * sizeof *vals);
    uint64_t *out = (uint64_t *)malloc(n * sizeof *out);
    if (!keys || !sorted || !q || !vals || !out)
        die("out of memory");
    if (argc > 2) {
        nsizes = argc - 2;
        given = (uint32_t *)malloc((size_t)nsizes * sizeof *given);
        for (si = 0; si < nsizes; si++)
            given[si] = (uint32_t)strtoul(argv[2 + si], NULL, 0);
        sizes = given;
    }
    for (i = 0; i < n; i++) {
        double d = (double)(rnd() >> 11) * 0x1.0p-53 * 1e6;
        keys[i].head = agg_f64_to_key(d);
        keys[i].rest = agg_i64_to_key((int64_t)i);
        vals[i] = (double)(rnd() % 1000) * 0.25;
    }
    memcpy(sorted, keys, n * sizeof *keys);
    qsort(sorted, n, sizeof *sorted, cmp_key);

    printf("n = %llu FAST items; CPU ns per operation (best of %d); bytes per item = agg_tree_nbytes / n\n",
           (unsigned long long)n, reps);
    printf("%5s %8s %8s %8s %9s %8s %8s %8s | %9s %9s %9s\n", "node", "insert", "get", "rank",
           "rank_many", "select", "sum", "delete", "B/it rand", "B/it seq", "B/it build");
    for (si = 0; si < nsizes; si++) {
        agg_tree *t;
        double t0, t_ins = 1e99, t_get = 1e99, t_rank = 1e99, t_rmany = 1e99, t_sel = 1e99;
        double t_sum = 1e99, t_del = 1e99, b_rand = 0, b_seq = 0, b_build = 0, x;
        uint64_t acc = 0;
        double dacc = 0;
        int rep;
#define BEST(var, expr) do { x = (expr); if (x < var) var = x; } while (0)
        for (rep = 0; rep < reps; rep++) {
        if (agg_tree_new(&t, sizes[si], AGG_KEYS_FAST) != AGG_OK)
            die("agg_tree_new");

        /* random-order inserts */
        t0 = now();
        for (i = 0; i < n; i++)
            if (agg_tree_insert(t, keys[i], vals[i], 0, NULL, NULL) != AGG_OK)
                die("insert");
        BEST(t_ins, (now() - t0) / (double)n * 1e9);
        b_rand = (double)agg_tree_nbytes(t) / (double)n;

        /* reads, on keys in a fresh random order */
        memcpy(q, keys, n * sizeof *q);
        shuffle(q, n);
        t0 = now();
        for (i = 0; i < n; i++)
            acc += (uint64_t)agg_tree_get(t, q[i], NULL);
        BEST(t_get, (now() - t0) / (double)n * 1e9);
        t0 = now();
        for (i = 0; i < n; i++)
            acc += agg_tree_rank(t, q[i], (int)(i & 1));
        BEST(t_rank, (now() - t0) / (double)n * 1e9);
        t0 = now();
        agg_tree_rank_many(t, sorted, n, 0, out);
        BEST(t_rmany, (now() - t0) / (double)n * 1e9);
        for (i = 0; i < n; i += 9973)
            if (out[i] != i)
                die("rank_many mismatch");
        t0 = now();
        for (i = 0; i < n; i++) {
            agg_key k;
            double v;
            agg_tree_select(t, rnd() % n, &k, &v);
            acc += k.rest;
        }
        BEST(t_sel, (now() - t0) / (double)n * 1e9);
        t0 = now();
        for (i = 0; i < n; i++) {
            uint64_t a = rnd() % n, b = rnd() % n;
            dacc += agg_tree_sum(t, a < b ? a : b, a < b ? b : a);
        }
        BEST(t_sum, (now() - t0) / (double)n * 1e9);

        /* deletes, random order */
        t0 = now();
        for (i = 0; i < n; i++)
            if (agg_tree_delete(t, q[i], NULL) != AGG_OK)
                die("delete");
        BEST(t_del, (now() - t0) / (double)n * 1e9);
        if (agg_tree_nbytes(t) != 0)
            die("nbytes after deleting everything");

        /* sequential inserts */
        for (i = 0; i < n; i++)
            agg_tree_insert(t, sorted[i], 1.0, 0, NULL, NULL);
        b_seq = (double)agg_tree_nbytes(t) / (double)n;
        agg_tree_clear(t);

        /* bulk build */
        if (agg_tree_build(t, sorted, vals, n, NULL) != AGG_OK)
            die("build");
        b_build = (double)agg_tree_nbytes(t) / (double)n;
        agg_tree_free(t);
        }

        g_sink = acc + (uint64_t)dacc;
        printf("%5u %8.1f %8.1f %8.1f %9.1f %8.1f %8.1f %8.1f | %9.2f %9.2f %9.2f\n", sizes[si], t_ins,
               t_get, t_rank, t_rmany, t_sel, t_sum, t_del, b_rand, b_seq, b_build);
        fflush(stdout);
    }
    free(keys);
    free(sorted);
    free(q);
    free(vals);
    free(out);
    free(given);
    return 0;
}
