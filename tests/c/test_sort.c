/*
 * test_sort.c - agg_keys_sort against qsort on random and adversarial key
 * shapes, at sizes crossing every threshold of the sort (insertion sort,
 * pair sort of a whole range, split into buckets, second thread), with
 * values (each must stay with its key) and with values = NULL, with one
 * and with two threads (AGGTREE_THREADS=1 forces one), plus failing
 * scratch allocations (AGG_NOMEM, input untouched), and fork() while
 * another thread runs two-thread sorts (the child's own two-thread sorts
 * must neither deadlock nor fail).
 *
 *   test_sort [seed [max_n]]     (or AGGTREE_SEED; max_n default 300000)
 */
#define _POSIX_C_SOURCE 200112L  /* setenv */
#include "test_util.h"

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#define TEST_FORK 1
#else
#define TEST_FORK 0
#endif

static int cmp_key(const void *a, const void *b)
{
    return agg_key_cmp(AGG_KEYS_FAST, *(const agg_key *)a, *(const agg_key *)b);
}

enum {
    SH_RANDOM,   /* image of a random double in [0, 1), rest a shuffled id */
    SH_SORTED,   /* the same, already sorted */
    SH_REVERSE,  /* the same, reverse sorted */
    SH_EQHEAD,   /* all heads equal: rest (shuffled ids) decides */
    SH_FEW,      /* few distinct heads (doubles), shuffled ids */
    SH_LOWBITS,  /* heads differing only in their low 10 bits, shuffled ids */
    SH_RAND128,  /* head and rest fully random */
    SH_DUPS,     /* a handful of distinct (head, rest) pairs */
    SH_TIES,     /* random heads in few values, rest fully random (long prefix ties) */
    SH_SPREAD,   /* heads differing only in bit 63 and bit 0, rest in bits 63 and 0 */
    SH_ORGAN,    /* sorted then reverse sorted halves ("organ pipe") */
    SH_SIGNED,   /* doubles of both signs and wide magnitude, random rest */
    NSHAPES
};

static const char *const shape_name[NSHAPES] = {
    "random", "sorted", "reverse", "eqhead", "few", "lowbits", "rand128",
    "dups", "ties", "spread", "organ", "signed"};

static void make_keys(agg_key *k, uint64_t n, int shape)
{
    uint64_t i;
    for (i = 0; i < n; i++) {
        switch (shape) {
        case SH_EQHEAD:
            k[i].head = agg_f64_to_key(0.25);
            k[i].rest = agg_i64_to_key((int64_t)i);
            break;
        case SH_FEW:
            k[i].head = agg_f64_to_key((double)rnd_below(7) / 7.0);
            k[i].rest = agg_i64_to_key((int64_t)i);
            break;
        case SH_LOWBITS:
            k[i].head = agg_f64_to_key(0.75) + rnd_below(1024);
            k[i].rest = agg_i64_to_key((int64_t)i);
            break;
        case SH_RAND128:
            k[i].head = rnd();
            k[i].rest = rnd();
            break;
        case SH_DUPS:
            k[i].head = rnd_below(3) << 20;
            k[i].rest = rnd_below(2) << 50;
            break;
        case SH_TIES:
            k[i].head = rnd_below(5) * UINT64_C(0x0123456789ABCDEF);
            k[i].rest = rnd();
            break;
        case SH_SPREAD:
            k[i].head = (rnd_below(2) << 63) | rnd_below(2);
            k[i].rest = (rnd_below(2) << 63) | rnd_below(2);
            break;
        case SH_SIGNED:
            k[i].head = agg_f64_to_key((rnd_unit() - 0.5) * pow(2.0, (double)rnd_below(80) - 40.0));
            k[i].rest = rnd();
            break;
        default:
            k[i].head = agg_f64_to_key(rnd_unit());
            k[i].rest = agg_i64_to_key((int64_t)i);
            break;
        }
    }
    if (shape == SH_RANDOM || shape == SH_EQHEAD || shape == SH_FEW || shape == SH_LOWBITS ||
        shape == SH_SORTED || shape == SH_REVERSE || shape == SH_ORGAN)
        for (i = n; i > 1; i--) {   /* shuffle the ids */
            uint64_t j = rnd_below(i), t = k[i - 1].rest;
            k[i - 1].rest = k[j].rest;
            k[j].rest = t;
        }
    if (shape == SH_SORTED || shape == SH_REVERSE || shape == SH_ORGAN) {
        uint64_t lo = shape == SH_ORGAN ? n / 2 : 0;
        qsort(k, n, sizeof *k, cmp_key);
        if (shape != SH_SORTED)
            for (i = 0; i < (n - lo) / 2; i++) {
                agg_key t = k[lo + i];
                k[lo + i] = k[n - 1 - i];
                k[n - 1 - i] = t;
            }
    }
}

/* One sort of n keys of a shape, checked against qsort. */
static void check_one(uint64_t n, int shape, int with_values, int threads)
{
    agg_key *k0 = (agg_key *)malloc((n + 1) * sizeof *k0);
    agg_key *k = (agg_key *)malloc((n + 1) * sizeof *k);
    agg_key *want = (agg_key *)malloc((n + 1) * sizeof *want);
    double *v = (double *)malloc((n + 1) * sizeof *v);
    unsigned char *seen = (unsigned char *)calloc(n + 1, 1);
    uint64_t i;
    agg_status st;
    REQUIRE(k0 && k && want && v && seen, "out of memory");
    make_keys(k0, n, shape);
    memcpy(k, k0, n * sizeof *k);
    memcpy(want, k0, n * sizeof *want);
    for (i = 0; i < n; i++)
        v[i] = (double)i;           /* the value names the key's first place */
    qsort(want, n, sizeof *want, cmp_key);
    st = agg_keys_sort(k, with_values ? v : NULL, n);
    REQUIRE(st == AGG_OK, "%s n=%llu values=%d threads=%d: status %d", shape_name[shape],
            (unsigned long long)n, with_values, threads, (int)st);
    for (i = 0; i < n; i++)
        REQUIRE(k[i].head == want[i].head && k[i].rest == want[i].rest,
                "%s n=%llu values=%d threads=%d: key %llu is %016llx:%016llx, want %016llx:%016llx",
                shape_name[shape], (unsigned long long)n, with_values, threads,
                (unsigned long long)i, (unsigned long long)k[i].head,
                (unsigned long long)k[i].rest, (unsigned long long)want[i].head,
                (unsigned long long)want[i].rest);
    if (with_values) {
        for (i = 0; i < n; i++) {
            double x = v[i];
            uint64_t from;
            REQUIRE(x >= 0 && x < (double)n && x == (double)(uint64_t)x,
                    "%s n=%llu: value %llu is %g, no original value", shape_name[shape],
                    (unsigned long long)n, (unsigned long long)i, x);
            from = (uint64_t)x;
            REQUIRE(!seen[from], "%s n=%llu: value %llu appears twice", shape_name[shape],
                    (unsigned long long)n, (unsigned long long)from);
            seen[from] = 1;
            REQUIRE(k0[from].head == k[i].head && k0[from].rest == k[i].rest,
                    "%s n=%llu threads=%d: value at %llu separated from its key",
                    shape_name[shape], (unsigned long long)n, threads, (unsigned long long)i);
        }
    } else {
        for (i = 0; i < n; i++)
            REQUIRE(v[i] == (double)i, "sort without values touched them");
    }
    free(k0);
    free(k);
    free(want);
    free(v);
    free(seen);
}

/* Failing scratch allocations: AGG_NOMEM and the input untouched, or
 * AGG_OK where nothing needs scratch (n tiny, all keys equal). */
static void check_nomem(uint64_t n, int shape, int with_values, long after)
{
    agg_key *k0 = (agg_key *)malloc((n + 1) * sizeof *k0);
    agg_key *k = (agg_key *)malloc((n + 1) * sizeof *k);
    double *v = (double *)malloc((n + 1) * sizeof *v), *v0 = (double *)malloc((n + 1) * sizeof *v0);
    uint64_t i;
    agg_status st;
    REQUIRE(k0 && k && v && v0, "out of memory");
    make_keys(k0, n, shape);
    memcpy(k, k0, n * sizeof *k);
    for (i = 0; i < n; i++)
        v[i] = v0[i] = (double)i;
    test_fail_after(after);
    st = agg_keys_sort(k, with_values ? v : NULL, n);
    test_fail_after(-1);
    if (st == AGG_NOMEM) {
        REQUIRE(memcmp(k, k0, n * sizeof *k) == 0 && memcmp(v, v0, n * sizeof *v) == 0,
                "%s n=%llu: failed sort changed its input", shape_name[shape],
                (unsigned long long)n);
    } else {
        REQUIRE(st == AGG_OK, "%s n=%llu: status %d with failing malloc", shape_name[shape],
                (unsigned long long)n, (int)st);
        REQUIRE(n <= 16 || after > 0 || shape == SH_DUPS || shape == SH_SPREAD,
                "%s n=%llu: sort succeeded although its allocation failed", shape_name[shape],
                (unsigned long long)n);
        for (i = 1; i < n; i++)
            REQUIRE(cmp_key(&k[i - 1], &k[i]) <= 0, "sort with failing malloc: not sorted");
    }
    free(k0);
    free(k);
    free(v);
    free(v0);
}

#if TEST_FORK
static int g_stop;               /* set by the main thread (atomic builtins) */

/* Two-thread sorts of 200,000 pseudo-random keys until g_stop (its own
 * generator: rnd() belongs to the main thread). */
static void *sorter(void *arg)
{
    uint64_t n = 200000, i, x = g_seed;
    agg_key *k = (agg_key *)malloc(n * sizeof *k);
    (void)arg;
    if (!k)
        return NULL;
    while (!__atomic_load_n(&g_stop, __ATOMIC_RELAXED)) {
        for (i = 0; i < n; i++) {
            x = x * UINT64_C(6364136223846793005) + UINT64_C(1442695040888963407);
            k[i].head = x ^ (x >> 29);
            k[i].rest = i;
        }
        if (agg_keys_sort(k, NULL, n) != AGG_OK)
            break;
    }
    free(k);
    return NULL;
}

/* fork() from this thread while another sorts; every child sorts on two
 * threads itself (under an alarm: a deadlock fails the test) and checks. */
static void check_fork(int forks)
{
    pthread_t th;
    int f;
    uint64_t n = 100000, i;
    __atomic_store_n(&g_stop, 0, __ATOMIC_RELAXED);
    if (pthread_create(&th, NULL, sorter, NULL) != 0)
        test_fail("pthread_create");
    for (f = 0; f < forks; f++) {
        int status = 0;
        pid_t pid;
        struct timespec nap;
        nap.tv_sec = 0;
        nap.tv_nsec = 1000000L + (long)(rnd() % 3000000u);
        nanosleep(&nap, NULL);      /* fork at a random point of the other thread's sorts */
        pid = fork();
        if (pid < 0)
            test_fail("fork");
        if (pid == 0) {
            agg_key *k = (agg_key *)malloc(n * sizeof *k);
            alarm(20);
            if (!k)
                _exit(3);
            for (i = 0; i < n; i++) {
                k[i].head = (i * UINT64_C(0x9E3779B97F4A7C15)) >> 1;
                k[i].rest = i;
            }
            if (agg_keys_sort(k, NULL, n) != AGG_OK)
                _exit(4);
            for (i = 1; i < n; i++)
                if (cmp_key(&k[i - 1], &k[i]) > 0)
                    _exit(5);
            _exit(0);
        }
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
            test_fail("forked child: status %d (a signal: deadlocked or crashed)", status);
    }
    __atomic_store_n(&g_stop, 1, __ATOMIC_RELAXED);
    pthread_join(th, NULL);
}
#endif

int main(int argc, char **argv)
{
    /* 16/17: insertion sort; 8-9, 33, ~500: pair buckets; 16384/16385:
     * whole-range pair sort / split; 65535/65536: second thread; more:
     * many split buckets (2047 most) and larger buckets */
    static const uint64_t sizes[] = {0,     1,     2,     3,     8,     9,      15,     16,
                                     17,    33,    100,   385,   1000,  4097,   16383,  16384,
                                     16385, 20000, 65535, 65536, 65537, 100000, 300000, 1000000};
    uint64_t max_n = 300000;
    int si, sh, wv, th, iters = 0;
    g_seed = argc > 1 ? strtoull(argv[1], NULL, 0)
                      : (getenv("AGGTREE_SEED") ? strtoull(getenv("AGGTREE_SEED"), NULL, 0)
                                                : (uint64_t)time(NULL));
    if (argc > 2)
        max_n = strtoull(argv[2], NULL, 0);
    if (TEST_SANITIZED && max_n > 100000)
        max_n = 100000;
    g_rng = g_seed;
    g_phase = "sort";
    for (si = 0; si < (int)(sizeof sizes / sizeof sizes[0]); si++) {
        uint64_t n = sizes[si];
        if (n > max_n)
            continue;
        for (sh = 0; sh < NSHAPES; sh++)
            for (wv = 0; wv < 2; wv++)
                for (th = 1; th <= 2; th++) {
                    if (th == 2 && n < 65536)
                        continue;   /* one thread below that anyway */
                    setenv("AGGTREE_THREADS", th == 1 ? "1" : "2", 1);
                    g_iter = (uint64_t)iters++;
                    check_one(n, sh, wv, th);
                }
    }
    unsetenv("AGGTREE_THREADS");
    g_phase = "nomem";
    for (si = 0; si < (int)(sizeof sizes / sizeof sizes[0]); si++) {
        uint64_t n = sizes[si];
        if (n > 100000 || n > max_n)
            continue;
        for (sh = 0; sh < NSHAPES; sh += 3)
            for (wv = 0; wv < 2; wv++) {
                g_iter = (uint64_t)iters++;
                check_nomem(n, sh, wv, 0);
                check_nomem(n, sh, wv, 1);  /* one allocation only: enough */
            }
    }
#if TEST_FORK
    g_phase = "fork";
    check_fork(TEST_SANITIZED ? 5 : 20);
#endif
    printf("test_sort: %d sorts checked (seed %llu)\n", iters, (unsigned long long)g_seed);
    return 0;
}
