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
 *
 * Then the batch operations, per node size (BENCH_BATCH: batch size,
 * default n / 10): into a tree of n items made by random-order inserts
 * (with BENCH_BATCH_PACKED: bulk-built, every node full, and the first
 * batch's time printed too), a batch of new random keys is sorted with
 * agg_keys_sort (from a shuffled array) and inserted with
 * agg_tree_insert_sorted (both timed in wall-clock, as are the sorts
 * below: they may use a second thread; AGGTREE_THREADS=1 keeps them on
 * one), then removed with
 * agg_tree_delete_sorted, BENCH_BREPS times (default 7) with fresh keys,
 * best and median shown; compared with loops of agg_tree_insert /
 * agg_tree_delete over the same keys in sorted and in random order.  Last,
 * agg_keys_sort of n pairs (random doubles in [0, 1), ids 0..n-1 shuffled)
 * against qsort, agg_tree_build of n sorted keys (then, from that tree,
 * agg_tree_delete_sorted of a contiguous tenth of the keys and of every
 * third key of the next three tenths) and agg_tree_build_unsorted (sort +
 * build) of n shuffled ones.  With
 * BENCH_BATCH_ONLY set only the batch part runs.
 */
#define _POSIX_C_SOURCE 199309L  /* clock_gettime */
#include "aggtree.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"

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

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of r doubles (sorts them). */
static double median(double *x, int r)
{
    qsort(x, (size_t)r, sizeof *x, cmp_dbl);
    return r % 2 ? x[r / 2] : 0.5 * (x[r / 2 - 1] + x[r / 2]);
}

/* n random FAST keys: doubles in [0, 1) and ids first_id + a shuffled
 * permutation of 0..n-1. */
static void random_keys(agg_key *k, double *v, uint64_t n, int64_t first_id)
{
    uint64_t i;
    for (i = 0; i < n; i++) {
        k[i].head = agg_f64_to_key((double)(rnd() >> 11) * 0x1.0p-53);
        k[i].rest = agg_i64_to_key(first_id + (int64_t)i);
        if (v)
            v[i] = (double)(rnd() % 1000) * 0.25;
    }
    for (i = n; i > 1; i--) {       /* shuffle the ids */
        uint64_t j = rnd() % i, t = k[i - 1].rest;
        k[i - 1].rest = k[j].rest;
        k[j].rest = t;
    }
}

#define BREPS_MAX 64

/* The batch benchmarks (see the header). */
static void bench_batch(uint64_t n, const uint32_t *sizes, int nsizes)
{
    uint64_t m = getenv("BENCH_BATCH") ? strtoull(getenv("BENCH_BATCH"), NULL, 0) : n / 10, i;
    int packed = getenv("BENCH_BATCH_PACKED") != NULL;
    int reps = getenv("BENCH_BREPS") ? atoi(getenv("BENCH_BREPS")) : 7, si, r;
    agg_key *base = (agg_key *)malloc(n * sizeof *base), *b = (agg_key *)malloc(m * sizeof *b);
    agg_key *bs = (agg_key *)malloc(m * sizeof *bs), *big = (agg_key *)malloc(n * sizeof *big);
    double *bv = (double *)malloc(n * sizeof *bv), *bvs = (double *)malloc(m * sizeof *bvs);
    double *bigv = (double *)malloc(n * sizeof *bigv);
    double t_sort[BREPS_MAX], t_ins[BREPS_MAX], t_del[BREPS_MAX], t_loop_s[BREPS_MAX];
    double t_loop_r[BREPS_MAX], t_dloop[BREPS_MAX], t0, x;
    if (!base || !b || !bs || !big || !bv || !bvs || !bigv)
        die("out of memory");
    if (reps > BREPS_MAX)
        reps = BREPS_MAX;
    if (reps < 1)
        reps = 1;
    printf("\nbatch of %llu new random keys into a tree of %llu (%s); "
           "CPU ns per item (insert_sorted: wall-clock, %s), best / median of %d\n",
           (unsigned long long)m, (unsigned long long)n,
           packed ? "bulk-built, packed" : "random-order inserts", getenv("AGGTREE_THREADS") && atoi(getenv("AGGTREE_THREADS")) == 1 ? "one thread"
                                                                             : "up to two threads",
           reps);
    printf("%5s | %12s %14s %14s | %14s %14s | %14s %14s | %9s\n", "node", "keys_sort",
           "insert_sorted", "sort+ins", "insert loop s", "insert loop r", "delete_sorted",
           "delete loop", "B/it after");
    for (si = 0; si < nsizes; si++) {
        agg_tree *t;
        double b_after = 0, best_sum = 1e99, bi, bd;
        if (agg_tree_new(&t, sizes[si], AGG_KEYS_FAST) != AGG_OK)
            die("agg_tree_new");
        random_keys(base, NULL, n, 0);
        if (packed) {               /* a bulk build: every node full */
            uint64_t bad;
            for (i = 0; i < n; i++)
                bigv[i] = 1.0;
            if (agg_keys_sort(base, bigv, n) != AGG_OK ||
                agg_tree_build(t, base, bigv, n, &bad) != AGG_OK)
                die("build");
        } else {
            for (i = 0; i < n; i++)
                if (agg_tree_insert(t, base[i], 1.0, 0, NULL, NULL) != AGG_OK)
                    die("insert");
        }
        for (r = 0; r < reps; r++) {
            uint64_t bad = 0;
            random_keys(b, bv, m, (int64_t)n + (int64_t)r * (int64_t)m);
            memcpy(bs, b, m * sizeof *b);
            memcpy(bvs, bv, m * sizeof *bv);
            /* the batch: sort, insert, delete */
            t0 = wall_now();
            if (agg_keys_sort(bs, bvs, m) != AGG_OK)
                die("agg_keys_sort");
            t_sort[r] = (wall_now() - t0) / (double)m * 1e9;
            t0 = wall_now();
            if (agg_tree_insert_sorted(t, bs, bvs, m, &bad) != AGG_OK)
                die("agg_tree_insert_sorted");
            t_ins[r] = (wall_now() - t0) / (double)m * 1e9;
            if (t_sort[r] + t_ins[r] < best_sum) {
                best_sum = t_sort[r] + t_ins[r];
                b_after = (double)agg_tree_nbytes(t) / (double)(n + m);
            }
            t0 = cpu_now();
            if (agg_tree_delete_sorted(t, bs, m, &bad) != AGG_OK)
                die("agg_tree_delete_sorted");
            t_del[r] = (cpu_now() - t0) / (double)m * 1e9;
            /* the same keys one by one: sorted order, then random order */
            t0 = cpu_now();
            for (i = 0; i < m; i++)
                if (agg_tree_insert(t, bs[i], bvs[i], 0, NULL, NULL) != AGG_OK)
                    die("insert");
            t_loop_s[r] = (cpu_now() - t0) / (double)m * 1e9;
            for (i = 0; i < m; i++)
                agg_tree_delete(t, bs[i], NULL);
            t0 = cpu_now();
            for (i = 0; i < m; i++)
                if (agg_tree_insert(t, b[i], bv[i], 0, NULL, NULL) != AGG_OK)
                    die("insert");
            t_loop_r[r] = (cpu_now() - t0) / (double)m * 1e9;
            t0 = cpu_now();
            for (i = 0; i < m; i++)
                if (agg_tree_delete(t, b[i], NULL) != AGG_OK)
                    die("delete");
            t_dloop[r] = (cpu_now() - t0) / (double)m * 1e9;
            if (agg_tree_len(t) != n)
                die("batch round trip changed the tree");
        }
        {
            double s_best = 1e99, i_best = 1e99, d_best = 1e99, ls = 1e99, lr = 1e99, dl = 1e99;
            double si_all[BREPS_MAX];
            for (r = 0; r < reps; r++) {
                s_best = t_sort[r] < s_best ? t_sort[r] : s_best;
                i_best = t_ins[r] < i_best ? t_ins[r] : i_best;
                d_best = t_del[r] < d_best ? t_del[r] : d_best;
                ls = t_loop_s[r] < ls ? t_loop_s[r] : ls;
                lr = t_loop_r[r] < lr ? t_loop_r[r] : lr;
                dl = t_dloop[r] < dl ? t_dloop[r] : dl;
                si_all[r] = t_sort[r] + t_ins[r];
            }
            bi = median(si_all, reps);
            bd = median(t_del, reps);
            printf("%5u | %5.1f /%5.1f %6.1f /%6.1f %6.1f /%6.1f | %6.1f /%6.1f %6.1f /%6.1f | "
                   "%6.1f /%6.1f %6.1f /%6.1f | %9.2f\n",
                   sizes[si], s_best, median(t_sort, reps), i_best, median(t_ins, reps), best_sum,
                   bi, ls, median(t_loop_s, reps), lr, median(t_loop_r, reps), d_best, bd, dl,
                   median(t_dloop, reps), b_after);
            if (packed)
                printf("      first insert_sorted, into the packed tree: %.1f ns/item\n", t_ins[0]);
        }
        agg_tree_free(t);
        fflush(stdout);
    }
    /* sorting and building n items */
    {
        double ts = 1e99, tq = 1e99, tb = 1e99, tu = 1e99, tr = 1e99, t3 = 1e99;
        agg_key *cp = (agg_key *)malloc(n * sizeof *cp);
        double *cv = (double *)malloc(n * sizeof *cv);
        if (!cp || !cv)
            die("out of memory");
        for (r = 0; r < (reps < 5 ? reps : 5); r++) {
            agg_tree *t;
            uint64_t bad;
            random_keys(big, bigv, n, 0);
            memcpy(cp, big, n * sizeof *cp);
            memcpy(cv, bigv, n * sizeof *cv);
            t0 = wall_now();
            if (agg_keys_sort(cp, cv, n) != AGG_OK)
                die("agg_keys_sort");
            x = (wall_now() - t0) * 1e3;
            ts = x < ts ? x : ts;
            t0 = cpu_now();
            if (agg_tree_new(&t, 64, AGG_KEYS_FAST) != AGG_OK || agg_tree_build(t, cp, cv, n, &bad) != AGG_OK)
                die("build");
            x = (cpu_now() - t0) * 1e3;
            tb = x < tb ? x : tb;
            /* delete a contiguous range of n / 10 keys (every leaf under
             * it empties), then every third key of the next 3n / 10 */
            if (n >= 20) {
                uint64_t m10 = n / 10, a = n / 5;
                t0 = cpu_now();
                if (agg_tree_delete_sorted(t, cp + a, m10, &bad) != AGG_OK)
                    die("range delete_sorted");
                x = (cpu_now() - t0) / (double)m10 * 1e9;
                tr = x < tr ? x : tr;
                for (i = 0; i < m10; i++)
                    cp[a + 2 * m10 + i] = cp[a + 2 * m10 + 3 * i];
                t0 = cpu_now();
                if (agg_tree_delete_sorted(t, cp + a + 2 * m10, m10, &bad) != AGG_OK)
                    die("strided delete_sorted");
                x = (cpu_now() - t0) / (double)m10 * 1e9;
                t3 = x < t3 ? x : t3;
            }
            agg_tree_free(t);
            memcpy(cp, big, n * sizeof *cp);
            t0 = cpu_now();
            qsort(cp, n, sizeof *cp, cmp_key);
            x = (cpu_now() - t0) * 1e3;
            tq = x < tq ? x : tq;
            memcpy(cp, big, n * sizeof *cp);
            memcpy(cv, bigv, n * sizeof *cv);
            t0 = wall_now();
            if (agg_tree_new(&t, 64, AGG_KEYS_FAST) != AGG_OK ||
                agg_tree_build_unsorted(t, cp, cv, n, &bad) != AGG_OK)
                die("build_unsorted");
            x = (wall_now() - t0) * 1e3;
            tu = x < tu ? x : tu;
            agg_tree_free(t);
        }
        printf("\n%llu pairs (doubles in [0, 1), shuffled ids 0..n-1), node size 64, ms, best of %d:\n"
               "  agg_keys_sort %.1f (wall)   (qsort of the keys alone %.1f, CPU)\n"
               "  agg_tree_build of sorted keys %.1f (CPU)   agg_tree_build_unsorted %.1f (wall)\n",
               (unsigned long long)n, reps < 5 ? reps : 5, ts, tq, tb, tu);
        printf("  agg_tree_delete_sorted from that tree, ns/key (CPU): a contiguous n / 10 %.1f, "
               "every third key of the next 3n / 10 %.1f\n", tr, t3);
        free(cp);
        free(cv);
    }
    free(base);
    free(b);
    free(bs);
    free(big);
    free(bv);
    free(bvs);
    free(bigv);
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
    for (si = 0; si < nsizes && !getenv("BENCH_BATCH_ONLY"); si++) {
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
        t0 = cpu_now();
        for (i = 0; i < n; i++)
            if (agg_tree_insert(t, keys[i], vals[i], 0, NULL, NULL) != AGG_OK)
                die("insert");
        BEST(t_ins, (cpu_now() - t0) / (double)n * 1e9);
        b_rand = (double)agg_tree_nbytes(t) / (double)n;

        /* reads, on keys in a fresh random order */
        memcpy(q, keys, n * sizeof *q);
        shuffle(q, n);
        t0 = cpu_now();
        for (i = 0; i < n; i++)
            acc += (uint64_t)agg_tree_get(t, q[i], NULL);
        BEST(t_get, (cpu_now() - t0) / (double)n * 1e9);
        t0 = cpu_now();
        for (i = 0; i < n; i++)
            acc += agg_tree_rank(t, q[i], (int)(i & 1));
        BEST(t_rank, (cpu_now() - t0) / (double)n * 1e9);
        t0 = cpu_now();
        agg_tree_rank_many(t, sorted, n, 0, out);
        BEST(t_rmany, (cpu_now() - t0) / (double)n * 1e9);
        for (i = 0; i < n; i += 9973)
            if (out[i] != i)
                die("rank_many mismatch");
        t0 = cpu_now();
        for (i = 0; i < n; i++) {
            agg_key k;
            double v;
            agg_tree_select(t, rnd() % n, &k, &v);
            acc += k.rest;
        }
        BEST(t_sel, (cpu_now() - t0) / (double)n * 1e9);
        t0 = cpu_now();
        for (i = 0; i < n; i++) {
            uint64_t a = rnd() % n, b = rnd() % n;
            dacc += agg_tree_sum(t, a < b ? a : b, a < b ? b : a);
        }
        BEST(t_sum, (cpu_now() - t0) / (double)n * 1e9);

        /* deletes, random order */
        t0 = cpu_now();
        for (i = 0; i < n; i++)
            if (agg_tree_delete(t, q[i], NULL) != AGG_OK)
                die("delete");
        BEST(t_del, (cpu_now() - t0) / (double)n * 1e9);
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
    bench_batch(n, sizes, nsizes);
    free(keys);
    free(sorted);
    free(q);
    free(vals);
    free(out);
    free(given);
    return 0;
}
