/*
 * test_scale.c - exact reads of the aggtree C core on large trees.
 *
 * The other C tests compare whole trees after small operations; this one
 * builds trees of >= 10^5 FAST keys (many duplicate sort keys, so runs of
 * equal heads span many leaves) at node sizes 64 (the default) and 16, in
 * bulk (agg_tree_build) and by single inserts in random order, and compares
 * thousands of random reads exactly with a sorted-array model:
 * agg_tree_rank (both sides), agg_tree_rank2 (both sides, either order of
 * the two keys), agg_tree_rank_many, agg_tree_select, agg_tree_sum over
 * random ranges and agg_tree_read (both directions).  Then again after a
 * batch agg_tree_insert_sorted and a batch agg_tree_delete_sorted of 20,000
 * keys each (>= 16,384: the two-thread paths of section 13, core/batch_*.c)
 * and after a few thousand single inserts and deletes.
 *
 * Sums are exact: values are integers below 2^52 times 2^-40, so every
 * subtree's exact sum fits the core's double-double and agg_tree_sum must
 * return the correctly rounded exact sum (section 8, core/internal.h), computed
 * here from 128-bit integer prefix sums (and cross-checked against the
 * Shewchuk sum of test_util.h on a few ranges).
 *
 *   test_scale [seed [items]]          (or AGGTREE_SEED / AGGTREE_ITERS)
 */
#include "test_util.h"

#define BATCH 20000                /* > 16,384: two-thread batch paths */
#define VSCALE 0x1p-40

typedef struct smodel {
    agg_key *k;                    /* keys, strictly increasing */
    int64_t *vi;                   /* value numerators: value = vi * 2^-40 */
    __int128 *cum;                 /* cum[i] = vi[0] + ... + vi[i - 1] */
    uint64_t n, cap;
} smodel;

static int kcmp(agg_key a, agg_key b)
{
    if (a.head != b.head)
        return a.head < b.head ? -1 : 1;
    if (a.rest != b.rest)
        return a.rest < b.rest ? -1 : 1;
    return 0;
}

static double val(int64_t vi) { return (double)vi * VSCALE; }

static int64_t rnd_vi(void)
{
    return (int64_t)(rnd() % (UINT64_C(1) << 53)) - (INT64_C(1) << 52);
}

/* A random sort key with heavy duplication: ~3000 values, plus one run
 * holding ~5% of all items. */
static uint64_t rnd_head(void)
{
    if (rnd_chance(0.05))
        return agg_f64_to_key(0.5);
    return agg_f64_to_key((double)((int64_t)rnd_below(3000) - 1500) * 0.25);
}

static agg_key rnd_item_key(void)
{
    agg_key k;
    k.head = rnd_head();
    k.rest = rnd();
    return k;
}

typedef struct kv {
    agg_key k;
    int64_t vi;
} kv;

static int kv_cmp(const void *a, const void *b)
{
    return kcmp(((const kv *)a)->k, ((const kv *)b)->k);
}

static void model_reserve(smodel *m, uint64_t n)
{
    if (n <= m->cap)
        return;
    m->cap = n + n / 2;
    m->k = realloc(m->k, m->cap * sizeof *m->k);
    m->vi = realloc(m->vi, m->cap * sizeof *m->vi);
    m->cum = realloc(m->cum, (m->cap + 1) * sizeof *m->cum);
    REQUIRE(m->k && m->vi && m->cum, "out of memory");
}

static void model_sums(smodel *m)
{
    uint64_t i;
    m->cum[0] = 0;
    for (i = 0; i < m->n; i++)
        m->cum[i + 1] = m->cum[i] + m->vi[i];
}

/* Items < k (after == 0) or <= k (after != 0). */
static uint64_t m_rank(const smodel *m, agg_key k, int after)
{
    uint64_t lo = 0, hi = m->n;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int c = kcmp(m->k[mid], k);
        if (c < 0 || (after && c == 0))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The correctly rounded exact sum of items lo..hi-1. */
static double m_sum(const smodel *m, uint64_t lo, uint64_t hi)
{
    if (hi <= lo)
        return 0.0;
    return (double)(m->cum[hi] - m->cum[lo]) * VSCALE;
}

/* Merge the sorted, absent items add[0..na) into the model. */
static void model_merge(smodel *m, const kv *add, uint64_t na)
{
    uint64_t i = m->n, j = na, o = m->n + na;
    model_reserve(m, m->n + na);
    while (j > 0) {
        if (i > 0 && kcmp(m->k[i - 1], add[j - 1].k) > 0) {
            o--, i--;
            m->k[o] = m->k[i];
            m->vi[o] = m->vi[i];
        } else {
            o--, j--;
            m->k[o] = add[j].k;
            m->vi[o] = add[j].vi;
        }
    }
    m->n += na;
    model_sums(m);
}

/* Remove the items whose flag is set. */
static void model_compact(smodel *m, const uint8_t *gone)
{
    uint64_t i, o = 0;
    for (i = 0; i < m->n; i++)
        if (!gone[i]) {
            m->k[o] = m->k[i];
            m->vi[o] = m->vi[i];
            o++;
        }
    m->n = o;
    model_sums(m);
}

/* A query key: an item's key, its sort key with the smallest / largest id,
 * a neighbour id, a neighbouring or random sort key, or an extreme. */
static agg_key rnd_query(const smodel *m)
{
    agg_key k = m->n ? m->k[rnd_below(m->n)] : rnd_item_key();
    switch (rnd_below(9)) {
    case 0:
    case 1:
        break;
    case 2:
        k.rest = 0;
        break;
    case 3:
        k.rest = UINT64_MAX;
        break;
    case 4:
        k.rest += rnd_chance(0.5) ? 1 : (uint64_t)-1;
        break;
    case 5:
        k.head += rnd_chance(0.5) ? 1 : (uint64_t)-1;
        break;
    case 6:
        k = rnd_item_key();
        break;
    case 7:
        k.head = agg_f64_to_key(rnd_unit() * 900.0 - 450.0);
        break;
    default:
        k.head = rnd_chance(0.5) ? 0 : UINT64_MAX;
        k.rest = rnd();
        break;
    }
    return k;
}

static void compare_reads(const agg_tree *t, const smodel *m, uint64_t q, const char *stage)
{
    uint64_t n = m->n, i, j;
    agg_key *qk = malloc(q * sizeof *qk), kk;
    uint64_t *out = malloc(q * sizeof *out);
    agg_key *rk = malloc(600 * sizeof *rk);
    double *rv = malloc(600 * sizeof *rv), v;
    REQUIRE(qk && out && rk && rv, "out of memory");
    g_phase = stage;
    g_iter = 0;
    check_tree(t, stage);
    REQUIRE(agg_tree_len(t) == n, "len %llu, model %llu", (unsigned long long)agg_tree_len(t),
            (unsigned long long)n);
    for (g_iter = 0; g_iter < q; g_iter++) {   /* rank, both sides */
        agg_key k = rnd_query(m);
        int after = (int)(g_iter & 1);
        uint64_t got = agg_tree_rank(t, k, after), want = m_rank(m, k, after);
        REQUIRE(got == want, "rank(%016llx:%016llx, %d) = %llu, model %llu",
                (unsigned long long)k.head, (unsigned long long)k.rest, after,
                (unsigned long long)got, (unsigned long long)want);
        qk[g_iter] = k;
    }
    for (i = 0; i < 2; i++) {                  /* rank_many */
        agg_tree_rank_many(t, qk, q, (int)i, out);
        for (g_iter = 0; g_iter < q; g_iter++)
            REQUIRE(out[g_iter] == m_rank(m, qk[g_iter], (int)i), "rank_many[%llu] after=%d",
                    (unsigned long long)g_iter, (int)i);
    }
    for (g_iter = 0; g_iter < q; g_iter++) {   /* rank2, any order, any sides */
        agg_key k1 = rnd_query(m), k2 = rnd_query(m);
        int a1 = (int)rnd_below(2), a2 = (int)rnd_below(2);
        uint64_t r1 = 0, r2 = 0, w1, w2;
        if (g_iter % 3 == 0)
            k2 = k1;                           /* the same path twice */
        else if (g_iter % 3 == 1) {            /* a range within one run */
            k2 = k1;
            k2.rest = rnd();
        }
        w1 = m_rank(m, k1, a1);
        w2 = m_rank(m, k2, a2);
        agg_tree_rank2(t, k1, a1, k2, a2, &r1, &r2);
        REQUIRE(r1 == w1 && r2 == w2,
                "rank2(%016llx:%016llx/%d, %016llx:%016llx/%d) = (%llu, %llu), model (%llu, %llu)",
                (unsigned long long)k1.head, (unsigned long long)k1.rest, a1,
                (unsigned long long)k2.head, (unsigned long long)k2.rest, a2,
                (unsigned long long)r1, (unsigned long long)r2, (unsigned long long)w1,
                (unsigned long long)w2);
    }
    for (g_iter = 0; g_iter < q; g_iter++) {   /* select */
        uint64_t idx = rnd_below(n);
        agg_status st = agg_tree_select(t, idx, &kk, &v);
        REQUIRE(st == AGG_OK && kcmp(kk, m->k[idx]) == 0 && same_bits(v, val(m->vi[idx])),
                "select(%llu): status %d", (unsigned long long)idx, (int)st);
    }
    REQUIRE(agg_tree_select(t, n, &kk, &v) == AGG_RANGE, "select(n) not AGG_RANGE");
    for (g_iter = 0; g_iter < q; g_iter++) {   /* sums over random ranges */
        uint64_t lo, hi;
        double got, want;
        switch (g_iter % 4) {
        case 0:                                /* between two query keys */
            agg_tree_rank2(t, rnd_query(m), 0, rnd_query(m), 1, &lo, &hi);
            break;
        case 1:                                /* short */
            lo = rnd_below(n + 1);
            hi = lo + rnd_below(200);
            if (hi > n)
                hi = n;
            break;
        case 2:                                /* a prefix or a suffix */
            lo = rnd_chance(0.5) ? 0 : rnd_below(n + 1);
            hi = lo ? n : rnd_below(n + 1);
            break;
        default:
            lo = rnd_below(n + 1);
            hi = rnd_below(n + 1);
            break;
        }
        got = agg_tree_sum(t, lo, hi);
        want = m_sum(m, lo, hi);
        REQUIRE(same_bits(got, want), "sum(%llu, %llu) = %a, exact %a", (unsigned long long)lo,
                (unsigned long long)hi, got, want);
        if (g_iter < 8 && hi > lo) {           /* the model's rounding is fsum's */
            xsum x;
            xsum_init(&x);
            for (j = lo; j < hi; j++)
                xsum_add(&x, val(m->vi[j]));
            REQUIRE(same_bits(xsum_value(&x), want), "model sum %a, xsum %a", want,
                    xsum_value(&x));
        }
    }
    for (g_iter = 0; g_iter < q / 8 + 1; g_iter++) {   /* read, both ways */
        uint64_t idx = rnd_below(n + 2), max = rnd_below(600), got, want;
        int desc = (int)(g_iter & 1);
        got = agg_tree_read(t, idx, max, desc, rk, rv);
        want = idx >= n ? 0 : (desc ? (idx + 1 < max ? idx + 1 : max) : (n - idx < max ? n - idx : max));
        REQUIRE(got == want, "read(%llu, %llu, %d) returned %llu, model %llu",
                (unsigned long long)idx, (unsigned long long)max, desc, (unsigned long long)got,
                (unsigned long long)want);
        for (j = 0; j < got; j++) {
            uint64_t p = desc ? idx - j : idx + j;
            REQUIRE(kcmp(rk[j], m->k[p]) == 0 && same_bits(rv[j], val(m->vi[p])),
                    "read(%llu, %llu, %d): item %llu", (unsigned long long)idx,
                    (unsigned long long)max, desc, (unsigned long long)j);
        }
    }
    free(qk);
    free(out);
    free(rk);
    free(rv);
}

/* n distinct random items, sorted. */
static kv *rnd_items(uint64_t n, uint64_t *got)
{
    kv *a = malloc((n ? n : 1) * sizeof *a);
    uint64_t i, o = 0;
    REQUIRE(a != NULL, "out of memory");
    for (i = 0; i < n; i++) {
        a[i].k = rnd_item_key();
        a[i].vi = rnd_vi();
    }
    qsort(a, n, sizeof *a, kv_cmp);
    for (i = 0; i < n; i++)
        if (o == 0 || kcmp(a[o - 1].k, a[i].k) != 0)
            a[o++] = a[i];
    *got = o;
    return a;
}

static void run(uint32_t node_size, int bulk, uint64_t n, uint64_t q)
{
    char stage[96];
    smodel m = {0};
    agg_tree *t = NULL;
    uint64_t na, i, bad = 0;
    kv *items = rnd_items(n, &na);
    agg_key *keys = malloc((na > BATCH ? na : BATCH) * sizeof *keys);
    double *vals = malloc((na > BATCH ? na : BATCH) * sizeof *vals);
    uint8_t *gone;
    REQUIRE(keys && vals, "out of memory");
    REQUIRE(agg_tree_new(&t, node_size, AGG_KEYS_FAST) == AGG_OK, "agg_tree_new");
    model_merge(&m, items, na);
    if (bulk) {
        for (i = 0; i < na; i++) {
            keys[i] = items[i].k;
            vals[i] = val(items[i].vi);
        }
        REQUIRE(agg_tree_build(t, keys, vals, na, &bad) == AGG_OK, "agg_tree_build");
    } else {
        for (i = na; i > 1; i--) {             /* random order */
            uint64_t j = rnd_below(i);
            kv tmp = items[i - 1];
            items[i - 1] = items[j];
            items[j] = tmp;
        }
        for (i = 0; i < na; i++)
            REQUIRE(agg_tree_insert(t, items[i].k, val(items[i].vi), 0, NULL, NULL) == AGG_OK,
                    "insert %llu", (unsigned long long)i);
    }
    free(items);
    snprintf(stage, sizeof stage, "node %u %s: built", node_size, bulk ? "bulk" : "inserts");
    compare_reads(t, &m, q, stage);

    /* a batch insert of BATCH new items (duplicates of present ones dropped) */
    items = rnd_items(BATCH + BATCH / 10, &na);
    {
        uint64_t o = 0;
        for (i = 0; i < na && o < BATCH; i++) {
            uint64_t r = m_rank(&m, items[i].k, 0);
            if (r < m.n && kcmp(m.k[r], items[i].k) == 0)
                continue;
            items[o++] = items[i];
        }
        na = o;
    }
    REQUIRE(na > 16384, "batch too small");
    for (i = 0; i < na; i++) {
        keys[i] = items[i].k;
        vals[i] = val(items[i].vi);
    }
    REQUIRE(agg_tree_insert_sorted(t, keys, vals, na, &bad) == AGG_OK, "insert_sorted");
    model_merge(&m, items, na);
    free(items);
    snprintf(stage, sizeof stage, "node %u %s: insert_sorted", node_size, bulk ? "bulk" : "inserts");
    compare_reads(t, &m, q, stage);

    /* a batch delete of BATCH random present items */
    gone = calloc(m.n, 1);
    REQUIRE(gone != NULL, "out of memory");
    for (na = 0; na < BATCH;) {
        uint64_t p = rnd_below(m.n);
        if (!gone[p]) {
            gone[p] = 1;
            na++;
        }
    }
    for (i = 0, na = 0; i < m.n; i++)
        if (gone[i])
            keys[na++] = m.k[i];
    REQUIRE(agg_tree_delete_sorted(t, keys, na, &bad) == AGG_OK, "delete_sorted");
    model_compact(&m, gone);
    free(gone);
    snprintf(stage, sizeof stage, "node %u %s: delete_sorted", node_size, bulk ? "bulk" : "inserts");
    compare_reads(t, &m, q, stage);

    /* single inserts and deletes */
    {
        uint64_t ops = TEST_SANITIZED ? 1500 : 4000, nadd = 0;
        kv *add = malloc(ops * sizeof *add);
        gone = calloc(m.n, 1);
        REQUIRE(add && gone, "out of memory");
        for (i = 0; i < ops; i++) {
            if (i & 1) {
                uint64_t p = rnd_below(m.n);
                double old = 0;
                if (gone[p])
                    continue;
                gone[p] = 1;
                REQUIRE(agg_tree_delete(t, m.k[p], &old) == AGG_OK && same_bits(old, val(m.vi[p])),
                        "delete");
            } else {
                kv x;
                x.k = rnd_item_key();
                x.vi = rnd_vi();
                if (agg_tree_insert(t, x.k, val(x.vi), 0, NULL, NULL) != AGG_OK)
                    continue;                  /* (present: vanishingly rare) */
                add[nadd++] = x;
            }
        }
        model_compact(&m, gone);
        qsort(add, nadd, sizeof *add, kv_cmp);
        model_merge(&m, add, nadd);
        free(add);
        free(gone);
    }
    snprintf(stage, sizeof stage, "node %u %s: single writes", node_size, bulk ? "bulk" : "inserts");
    compare_reads(t, &m, q, stage);
    printf("  %-44s ok (%llu items, depth %u)\n", stage, (unsigned long long)m.n,
           agg_tree_depth(t));
    fflush(stdout);
    agg_tree_free(t);
    free(keys);
    free(vals);
    free(m.k);
    free(m.vi);
    free(m.cum);
}

int main(int argc, char **argv)
{
    static const uint32_t sizes[] = {64, 16};
    uint64_t n = TEST_SANITIZED ? 100000 : 150000, q;
    size_t si;
    int bulk;
    test_args(argc, argv, &n, "test_scale");
    if (n < 1000)
        n = 1000;
    q = TEST_SANITIZED ? 1500 : 4000;
    for (si = 0; si < sizeof sizes / sizeof sizes[0]; si++)
        for (bulk = 1; bulk >= 0; bulk--)
            run(sizes[si], bulk, n, q);
    printf("test_scale: ok\n");
    return 0;
}
