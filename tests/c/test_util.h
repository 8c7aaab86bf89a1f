/*
 * test_util.h - shared helpers of the aggtree C tests (test_core.c,
 * test_batch.c, test_alloc.c): a seeded PRNG, failure reporting, random
 * keys for both key modes, a sorted-array model of the tree and its
 * comparison with a tree, an exact summation (Shewchuk partials, as
 * math.fsum) and whole-tree snapshots.
 *
 * Header-only (static functions) so each test program is one translation
 * unit plus the core library.
 */
#ifndef AGGTREE_TEST_UTIL_H
#define AGGTREE_TEST_UTIL_H

#include "aggtree.h"
#include "aggtree_test.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__SANITIZE_ADDRESS__)
#define TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_SANITIZED 1
#endif
#endif
#ifndef TEST_SANITIZED
#define TEST_SANITIZED 0
#endif

/* ------------------------------------------------------------ context -- */

/* The core's test hooks (aggtree_test.h), typed. */
static inline long test_fail_after(long n)
{
    return agg_test_control(AGG_TEST_FAIL_AFTER, n);
}
static inline long test_batch_thread_mode(long mode)
{
    return agg_test_control(AGG_TEST_BATCH_THREAD_MODE, mode);
}
static inline long test_build_slack(long slack)
{
    return agg_test_control(AGG_TEST_BUILD_SLACK, slack);
}
static inline uint64_t test_shape_hash(const agg_tree *t)
{
    uint64_t h = 0;
    agg_test_control(AGG_TEST_SHAPE_HASH, t, &h);
    return h;
}

static uint64_t g_seed;            /* the run's seed, printed on failure */
static const char *g_phase = "";   /* what is being tested (for messages) */
static uint64_t g_iter;            /* iteration within the phase */

/* Print a failure with the seed and context, then exit(1). */
static inline void test_fail(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "FAIL [seed %llu, %s, iteration %llu]: ",
            (unsigned long long)g_seed, g_phase, (unsigned long long)g_iter);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

#define REQUIRE(cond, ...)            \
    do {                              \
        if (!(cond))                  \
            test_fail(__VA_ARGS__);   \
    } while (0)

/* Run agg_tree_check and fail with its message. */
static inline void check_tree(const agg_tree *t, const char *after)
{
    char msg[512];
    agg_status st = agg_tree_check(t, msg, sizeof msg);
    if (st != AGG_OK)
        test_fail("agg_tree_check after %s: status %d: %s", after, (int)st, msg);
}

/* ---------------------------------------------------------------- rng -- */

static uint64_t g_rng;

static inline uint64_t rnd(void)   /* splitmix64 */
{
    uint64_t z = (g_rng += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

static inline uint64_t rnd_below(uint64_t n) { return n ? rnd() % n : 0; }
static inline double rnd_unit(void) { return (double)(rnd() >> 11) * 0x1.0p-53; }
static inline int rnd_chance(double p) { return rnd_unit() < p; }

/* Seed from argv[1] / AGGTREE_SEED / the clock; iterations from argv[2] /
 * AGGTREE_ITERS / the default. */
static inline void test_args(int argc, char **argv, uint64_t *iters, const char *name)
{
    const char *s = argc > 1 ? argv[1] : getenv("AGGTREE_SEED");
    const char *it = argc > 2 ? argv[2] : getenv("AGGTREE_ITERS");
    if (s && *s)
        g_seed = strtoull(s, NULL, 0);
    else {
        FILE *f = fopen("/dev/urandom", "rb");
        if (!f || fread(&g_seed, sizeof g_seed, 1, f) != 1)
            g_seed = (uint64_t)time(NULL);
        if (f)
            fclose(f);
        g_seed %= 1000000000000ULL;
    }
    if (it && *it)
        *iters = strtoull(it, NULL, 0);
    g_rng = g_seed;
    printf("%s: seed %llu, iterations %llu%s\n", name, (unsigned long long)g_seed,
           (unsigned long long)*iters, TEST_SANITIZED ? " (sanitized build)" : "");
    printf("  (rerun with: %s %llu %llu)\n", argv[0], (unsigned long long)g_seed,
           (unsigned long long)*iters);
    fflush(stdout);
}

/* -------------------------------------------------------------- model -- */

#define KEY_MAX 24                 /* longest GENERAL encoding the tests make */

/* One item of the model: the key in both forms, the value. */
typedef struct mitem {
    agg_key fk;                    /* FAST: the key; GENERAL: unused */
    uint8_t e[KEY_MAX];            /* GENERAL: the encoding */
    uint32_t len;                  /* GENERAL: its length */
    double v;                      /* value */
} mitem;

/* Sorted array of items (the reference the tree is compared with). */
typedef struct model {
    agg_keymode mode;              /* key mode of the tree it models */
    mitem *a;                      /* items in key order */
    size_t n;                      /* how many */
    size_t cap;                    /* allocated */
} model;

/* Storage for an agg_key built from a GENERAL mitem (tail buffer). */
typedef struct keybuf {
    uint64_t w[(sizeof(agg_tail) + KEY_MAX + 7) / 8];  /* aligned storage */
} keybuf;

/* The agg_tail living in kb. */
static inline agg_tail *kb_tail(keybuf *kb)
{
    return (agg_tail *)(void *)kb->w;
}

/* The agg_key of item x (GENERAL keys borrow kb's tail buffer). */
static inline agg_key mkey(const model *m, const mitem *x, keybuf *kb)
{
    if (m->mode == AGG_KEYS_FAST)
        return x->fk;
    return agg_key_from_bytes(x->e, x->len, kb_tail(kb));
}

/* Order of two model keys, computed independently of the core:
 * (head, rest) for FAST, memcmp of the encodings for GENERAL. */
static inline int mcmp(const model *m, const mitem *a, const mitem *b)
{
    if (m->mode == AGG_KEYS_FAST) {
        if (a->fk.head != b->fk.head)
            return a->fk.head < b->fk.head ? -1 : 1;
        if (a->fk.rest != b->fk.rest)
            return a->fk.rest < b->fk.rest ? -1 : 1;
        return 0;
    } else {
        uint32_t l = a->len < b->len ? a->len : b->len;
        int c = memcmp(a->e, b->e, l);
        if (c)
            return c < 0 ? -1 : 1;
        return (a->len > b->len) - (a->len < b->len);
    }
}

/* Number of items < x (lower bound); *found = an equal item exists. */
static inline size_t model_lower(const model *m, const mitem *x, int *found)
{
    size_t lo = 0, hi = m->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (mcmp(m, &m->a[mid], x) < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (found)
        *found = lo < m->n && mcmp(m, &m->a[lo], x) == 0;
    return lo;
}

static inline void model_insert_at(model *m, size_t pos, const mitem *x)
{
    if (m->n == m->cap) {
        m->cap = m->cap ? 2 * m->cap : 256;
        m->a = (mitem *)realloc(m->a, m->cap * sizeof *m->a);
        if (!m->a)
            test_fail("out of memory in the model");
    }
    memmove(m->a + pos + 1, m->a + pos, (m->n - pos) * sizeof *m->a);
    m->a[pos] = *x;
    m->n++;
}

static inline void model_remove_at(model *m, size_t pos)
{
    memmove(m->a + pos, m->a + pos + 1, (m->n - pos - 1) * sizeof *m->a);
    m->n--;
}

/* ---------------------------------------------------- model vs tree -- */

static inline int same_bits(double a, double b)
{
    return memcmp(&a, &b, sizeof a) == 0;
}

/* Does the tree's key k name model item x? */
static inline int key_matches(agg_keymode mode, agg_key k, const mitem *x)
{
    if (mode == AGG_KEYS_FAST)
        return k.head == x->fk.head && k.rest == x->fk.rest;
    {
        uint8_t buf[8 + KEY_MAX + 8];
        size_t n = agg_key_to_bytes(k, buf, sizeof buf), want = x->len < 8 ? 8 : x->len, i;
        if (n != want || memcmp(buf, x->e, x->len) != 0)
            return 0;
        for (i = x->len; i < 8; i++)
            if (buf[i])
                return 0;
        return 1;
    }
}

/* The tree holds exactly the model's items: same keys, bitwise same values. */
static inline void compare_items(const agg_tree *t, const model *m, const char *what)
{
    uint64_t n = m->n, i, got;
    agg_key *k = (agg_key *)malloc((n ? n : 1) * sizeof *k);
    double *v = (double *)malloc((n ? n : 1) * sizeof *v);
    REQUIRE(k && v, "out of memory");
    REQUIRE(agg_tree_len(t) == n, "%s: len %llu, model %llu", what,
            (unsigned long long)agg_tree_len(t), (unsigned long long)n);
    got = agg_tree_read(t, 0, n + 5, 0, k, v);
    REQUIRE(got == n, "%s: read %llu of %llu", what, (unsigned long long)got,
            (unsigned long long)n);
    for (i = 0; i < n; i++) {
        REQUIRE(key_matches(m->mode, k[i], &m->a[i]), "%s: key %llu differs", what,
                (unsigned long long)i);
        REQUIRE(same_bits(v[i], m->a[i].v), "%s: value %llu is %.17g, model %.17g", what,
                (unsigned long long)i, v[i], m->a[i].v);
    }
    free(k);
    free(v);
}

/* qsort comparators of model items, FAST and GENERAL order. */
static inline int mitem_cmp_fast(const void *a, const void *b)
{
    const mitem *x = (const mitem *)a, *y = (const mitem *)b;
    if (x->fk.head != y->fk.head)
        return x->fk.head < y->fk.head ? -1 : 1;
    return (x->fk.rest > y->fk.rest) - (x->fk.rest < y->fk.rest);
}

static inline int mitem_cmp_general(const void *a, const void *b)
{
    const mitem *x = (const mitem *)a, *y = (const mitem *)b;
    uint32_t l = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->e, y->e, l);
    if (c)
        return c;
    return (x->len > y->len) - (x->len < y->len);
}

/* ---------------------------------------------------------- random keys -- */

/* A random double from a small grid (collisions likely), now and then an
 * extreme one.  Never -0.0 (the caller maps it to 0.0). */
static inline double rnd_sortkey(uint64_t universe)
{
    static const double special[] = {0.0, 1e300, -1e300, 5e-324, -5e-324,
                                     1.7976931348623157e308, -1.7976931348623157e308,
                                     2.2250738585072014e-308, 1.0, -1.0};
    if (rnd_chance(0.02))
        return special[rnd_below(sizeof special / sizeof special[0])];
    return ((double)rnd_below(universe) - (double)universe / 2) * 0.25;
}

/* Random GENERAL encoding: one of a few prefixes (so 8-byte heads often
 * tie and tails decide), a body over {00, 02, 7f, ff}, a 01 terminator.
 * 01 never occurs elsewhere, so no encoding is a prefix of another (the
 * codec's guarantee that zero padding never makes two keys tie). */
static inline void rnd_encoding(mitem *x, uint32_t maxbody)
{
    static const uint8_t body[] = {0x00, 0x02, 0x7f, 0xff};
    static const uint8_t p8[8] = {0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02};
    static const uint8_t p7[7] = {0x02, 0x02, 0x02, 0x02, 0x02, 0x02, 0x02};
    static const uint8_t p10[10] = {0x7f, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    uint32_t n = 0, k, blen;
    switch (rnd_below(5)) {
    case 0: break;
    case 1: memcpy(x->e, p8, 8); n = 8; break;
    case 2: memcpy(x->e, p7, 7); n = 7; break;
    case 3: memcpy(x->e, p10, 10); n = 10; break;
    default: x->e[0] = 0xff; n = 1; break;
    }
    blen = (uint32_t)rnd_below(maxbody + 1);
    for (k = 0; k < blen && n < KEY_MAX - 1; k++)
        x->e[n++] = body[rnd_below(4)];
    x->e[n++] = 0x01;
    x->len = n;
}

/* A random key for mode; `spread` controls the universe size. */
static inline void rnd_key(agg_keymode mode, mitem *x, uint64_t spread)
{
    memset(x, 0, sizeof *x);
    if (mode == AGG_KEYS_FAST) {
        x->fk.head = agg_f64_to_key(rnd_sortkey(spread));
        x->fk.rest = agg_i64_to_key((int64_t)rnd_below(5) - 2);
    } else {
        uint32_t maxbody = spread < 50 ? 1 : spread < 500 ? 3 : spread < 5000 ? 5 : 8;
        rnd_encoding(x, maxbody);
    }
}

/* The counter-th key of a monotone sequence (increasing with counter, or
 * decreasing with descending != 0), to drive the append and prepend
 * patterns.  Prefix-free like rnd_encoding. */
static inline void seq_key(agg_keymode mode, uint64_t counter, int descending, mitem *x)
{
    static const uint8_t digit[4] = {0x00, 0x02, 0x7f, 0xff};
    memset(x, 0, sizeof *x);
    if (descending)
        counter = (UINT64_C(1) << 20) - 1 - (counter & ((UINT64_C(1) << 20) - 1));
    if (mode == AGG_KEYS_FAST) {
        x->fk.head = agg_f64_to_key(1e6 + (double)counter);
        x->fk.rest = agg_i64_to_key(0);
    } else {
        int k;
        uint32_t n = 0;
        x->e[n++] = 0xff;
        x->e[n++] = 0xff;
        x->e[n++] = 0xfe;
        for (k = 9; k >= 0; k--)
            x->e[n++] = digit[(counter >> (2 * k)) & 3];
        x->e[n++] = 0x01;
        x->len = n;
    }
}

/* ------------------------------------------------------- exact summing -- */

/* Exact sum of doubles as non-overlapping partials (Shewchuk / fsum). */
typedef struct xsum {
    double p[64];                  /* partials, increasing magnitude */
    int n;                         /* how many */
    double abs;                    /* sum of |x| (plain), for tolerances */
    int all_int;                   /* every term an integer with |x| < 2^53 */
} xsum;

static inline void xsum_init(xsum *s)
{
    s->n = 0;
    s->abs = 0.0;
    s->all_int = 1;
}

static inline void xsum_add(xsum *s, double x)
{
    int i, j = 0;
    s->abs += fabs(x);
    if (!(x == floor(x) && fabs(x) < 9007199254740992.0))
        s->all_int = 0;
    for (i = 0; i < s->n; i++) {
        double y = s->p[i], hi = x + y;
        double lo = fabs(x) < fabs(y) ? x - (hi - y) : y - (hi - x);
        if (lo != 0.0)
            s->p[j++] = lo;
        x = hi;
    }
    s->p[j++] = x;
    s->n = j;
    if (s->n > 60)
        test_fail("xsum overflow");
}

/* Correctly rounded value of the partials (as math.fsum). */
static inline double xsum_value(const xsum *s)
{
    int n = s->n;
    double hi = 0.0, lo = 0.0;
    if (n == 0)
        return 0.0;
    hi = s->p[--n];
    while (n > 0) {
        double x = hi, y = s->p[--n];
        hi = x + y;
        lo = y - (hi - x);
        if (lo != 0.0)
            break;
    }
    if (n > 0 && ((lo < 0 && s->p[n - 1] < 0) || (lo > 0 && s->p[n - 1] > 0))) {
        double y = lo * 2, x = hi + y;
        if (y == x - hi)
            hi = x;
    }
    return hi;
}

/* ----------------------------------------------------------- snapshots -- */

/* Whole content of a tree, for bitwise comparisons. */
typedef struct snap {
    uint64_t n;                    /* items */
    uint8_t *keys;                 /* n * (8 + KEY_MAX) bytes: encoded keys */
    uint32_t *klen;                /* their lengths */
    uint64_t *vbits;               /* value bits */
    size_t nbytes;                 /* agg_tree_nbytes */
    uint32_t depth;                /* agg_tree_depth */
    uint64_t shape;                /* test_shape_hash: the nodes, not just the items */
} snap;

#define SNAP_KEY (8 + KEY_MAX)

static inline void snap_take(const agg_tree *t, snap *s)
{
    uint64_t n = agg_tree_len(t), i, got;
    agg_key *k = (agg_key *)malloc((n ? n : 1) * sizeof *k);
    double *v = (double *)malloc((n ? n : 1) * sizeof *v);
    s->n = n;
    s->keys = (uint8_t *)calloc(n ? n : 1, SNAP_KEY);
    s->klen = (uint32_t *)malloc((n ? n : 1) * sizeof *s->klen);
    s->vbits = (uint64_t *)malloc((n ? n : 1) * sizeof *s->vbits);
    if (!k || !v || !s->keys || !s->klen || !s->vbits)
        test_fail("out of memory taking a snapshot");
    got = agg_tree_read(t, 0, n, 0, k, v);
    if (got != n)
        test_fail("snapshot: read %llu of %llu", (unsigned long long)got,
                  (unsigned long long)n);
    for (i = 0; i < n; i++) {
        if (agg_tree_mode(t) == AGG_KEYS_FAST) {
            memcpy(s->keys + i * SNAP_KEY, &k[i], sizeof k[i]);
            s->klen[i] = sizeof k[i];
        } else {
            s->klen[i] = (uint32_t)agg_key_to_bytes(k[i], s->keys + i * SNAP_KEY, SNAP_KEY);
        }
        memcpy(&s->vbits[i], &v[i], sizeof v[i]);
    }
    s->nbytes = agg_tree_nbytes(t);
    s->depth = agg_tree_depth(t);
    s->shape = test_shape_hash(t);
    free(k);
    free(v);
}

static inline void snap_free(snap *s)
{
    free(s->keys);
    free(s->klen);
    free(s->vbits);
}

/* Fail unless tree t still holds exactly snapshot s. */
static inline void snap_same(const agg_tree *t, const snap *s, const char *what)
{
    snap now;
    uint64_t i;
    snap_take(t, &now);
    REQUIRE(now.n == s->n, "%s: %llu items, expected %llu", what,
            (unsigned long long)now.n, (unsigned long long)s->n);
    REQUIRE(now.nbytes == s->nbytes, "%s: nbytes %zu, expected %zu", what, now.nbytes, s->nbytes);
    REQUIRE(now.depth == s->depth, "%s: depth %u, expected %u", what, now.depth, s->depth);
    for (i = 0; i < s->n; i++) {
        REQUIRE(now.klen[i] == s->klen[i] &&
                    memcmp(now.keys + i * SNAP_KEY, s->keys + i * SNAP_KEY, s->klen[i]) == 0,
                "%s: key %llu differs", what, (unsigned long long)i);
        REQUIRE(now.vbits[i] == s->vbits[i], "%s: value %llu differs", what,
                (unsigned long long)i);
    }
    REQUIRE(now.shape == s->shape, "%s: same items but not the same nodes (shape hash)", what);
    snap_free(&now);
}

#endif /* AGGTREE_TEST_UTIL_H */
