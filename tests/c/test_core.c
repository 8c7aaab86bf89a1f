/*
 * test_core.c - randomized test of the aggtree C core against a model (a
 * sorted array of items), for both key modes and node sizes 4, 5, 7, 16,
 * 64.  Every operation of the API is exercised with random arguments (keys
 * present and absent, colliding, sharing 8-byte prefixes; indexes in and
 * out of range; empty and inverted ranges), its result compared with the
 * model, and agg_tree_check run after every single operation.
 *
 *   test_core [seed [iterations]]     (or AGGTREE_SEED / AGGTREE_ITERS)
 *
 * The seed is printed first; a failure prints the seed, the phase and the
 * iteration and exits 1.  `iterations` is the total over all (mode, node
 * size) configurations.
 */
#include "test_util.h"

/* --------------------------------------------------------- comparisons -- */


/* ------------------------------------------------------------- values -- */

/* A value for value mode vm: 0 small integers, 1 large integers, 2
 * decimals, 3 wide magnitudes (1e-30 .. 1e30, both signs). */
static double rnd_value(int vm)
{
    switch (vm) {
    case 0:
        return (double)((int64_t)rnd_below(2001) - 1000);
    case 1:
        return (double)((int64_t)rnd_below(UINT64_C(1) << 41) - ((int64_t)1 << 40));
    case 2:
        if (rnd_chance(0.05))
            return ldexp((double)rnd_below(1000), -40);
        return (double)((int64_t)rnd_below(2000000) - 1000000) / 100.0;
    default: {
        static const double odd[] = {5e-324, 2.5e-310, 2.2250738585072014e-308, 1e300, 0.0};
        double sign = rnd_chance(0.5) ? -1.0 : 1.0, mag;
        if (rnd_chance(0.03))   /* subnormals, the smallest normal, huge */
            return sign * odd[rnd_below(sizeof odd / sizeof odd[0])];
        mag = pow(10.0, (double)rnd_below(61) - 30.0);
        return sign * mag * (0.5 + rnd_unit());
    }
    }
}

/* --------------------------------------------------------------- ops -- */

/* Check sum(lo, hi) against the exact sum of the model. */
static void check_sum(const agg_tree *t, const model *m, uint64_t lo, uint64_t hi)
{
    double got = agg_tree_sum(t, lo, hi), exact, tol;
    uint64_t end = hi < m->n ? hi : m->n, i;
    xsum s;
    if (lo >= end) {
        REQUIRE(got == 0.0 && !signbit(got), "sum(%llu, %llu) of an empty range is %.17g, not 0.0",
                (unsigned long long)lo, (unsigned long long)hi, got);
        return;
    }
    xsum_init(&s);
    for (i = lo; i < end; i++)
        xsum_add(&s, m->a[i].v);
    exact = xsum_value(&s);
    if (s.all_int) {
        REQUIRE(got == exact, "sum(%llu, %llu) of integers is %.17g, exactly %.17g",
                (unsigned long long)lo, (unsigned long long)hi, got, exact);
        return;
    }
    /* one rounding of the result, plus double-double error relative to
     * the sum of magnitudes */
    tol = 0x1p-52 * fabs(exact) + 1e-24 * s.abs;
    REQUIRE(fabs(got - exact) <= tol, "sum(%llu, %llu) = %.17g, exact %.17g (|error| %.3g > tol %.3g)",
            (unsigned long long)lo, (unsigned long long)hi, got, exact, fabs(got - exact), tol);
}

/* Model rank of item x: items < x (after == 0) or <= x. */
static uint64_t model_rank(const model *m, const mitem *x, int after)
{
    int found;
    size_t r = model_lower(m, x, &found);
    return r + (after && found);
}

/* A search key: 60% an existing item, else random. */
static void pick_key(const model *m, mitem *x, uint64_t spread)
{
    if (m->n && rnd_chance(0.6))
        *x = m->a[rnd_below(m->n)];
    else
        rnd_key(m->mode, x, spread);
}

/* GENERAL: the same key with its 8-byte encoding given an explicit empty
 * tail (must behave exactly like no tail). */
static agg_key key_with_empty_tail(const model *m, const mitem *x, keybuf *kb)
{
    agg_key k = mkey(m, x, kb);
    if (m->mode == AGG_KEYS_GENERAL && x->len == 8 && rnd_chance(0.5)) {
        kb_tail(kb)->refs = 0;
        kb_tail(kb)->len = 0;
        k.rest = (uint64_t)(uintptr_t)kb_tail(kb);
    }
    return k;
}

static void op_insert(agg_tree *t, model *m, const mitem *x, double v, int overwrite)
{
    keybuf kb;
    int existed = -1, found;
    double old = -12345.0;
    agg_key k = key_with_empty_tail(m, x, &kb);
    size_t pos = model_lower(m, x, &found);
    agg_status st = agg_tree_insert(t, k, v, overwrite, &existed, &old);
    memset(&kb, 0xA5, sizeof kb);  /* the tree must have copied the tail */
    if (found) {
        REQUIRE(st == (overwrite ? AGG_OK : AGG_DUPLICATE), "insert of a present key: status %d", (int)st);
        REQUIRE(existed == 1, "insert of a present key: existed %d", existed);
        REQUIRE(same_bits(old, m->a[pos].v), "insert of a present key: old value %.17g, model %.17g",
                old, m->a[pos].v);
        if (overwrite)
            m->a[pos].v = v;
    } else {
        mitem y = *x;
        REQUIRE(st == AGG_OK, "insert of a new key: status %d", (int)st);
        REQUIRE(existed == 0, "insert of a new key: existed %d", existed);
        y.v = v;
        model_insert_at(m, pos, &y);
    }
}

static void op_delete(agg_tree *t, model *m, const mitem *x)
{
    keybuf kb;
    int found;
    double old = -12345.0;
    size_t pos = model_lower(m, x, &found);
    agg_status st = agg_tree_delete(t, key_with_empty_tail(m, x, &kb), &old);
    if (found) {
        REQUIRE(st == AGG_OK, "delete of a present key: status %d", (int)st);
        REQUIRE(same_bits(old, m->a[pos].v), "delete: old value %.17g, model %.17g", old, m->a[pos].v);
        model_remove_at(m, pos);
    } else {
        REQUIRE(st == AGG_MISSING, "delete of an absent key: status %d", (int)st);
    }
}

static void op_get(const agg_tree *t, const model *m, const mitem *x)
{
    keybuf kb;
    int found, r;
    double v = -12345.0;
    size_t pos = model_lower(m, x, &found);
    r = agg_tree_get(t, key_with_empty_tail(m, x, &kb), &v);
    REQUIRE(r == found, "get: %d, model %d", r, found);
    if (found)
        REQUIRE(same_bits(v, m->a[pos].v), "get: value %.17g, model %.17g", v, m->a[pos].v);
    REQUIRE(agg_tree_get(t, mkey(m, x, &kb), NULL) == found, "get with NULL value");
}

static void op_rank(const agg_tree *t, const model *m, const mitem *x)
{
    keybuf kb;
    int after;
    for (after = 0; after <= 1; after++) {
        uint64_t r = agg_tree_rank(t, key_with_empty_tail(m, x, &kb), after);
        uint64_t w = model_rank(m, x, after);
        REQUIRE(r == w, "rank(after=%d) = %llu, model %llu", after, (unsigned long long)r,
                (unsigned long long)w);
    }
}

static void op_select(const agg_tree *t, const model *m)
{
    uint64_t i = rnd_below(m->n + 3);
    agg_key k;
    double v;
    agg_status st = agg_tree_select(t, i, &k, &v);
    if (i >= m->n) {
        REQUIRE(st == AGG_RANGE, "select(%llu) of %llu: status %d", (unsigned long long)i,
                (unsigned long long)m->n, (int)st);
        return;
    }
    REQUIRE(st == AGG_OK, "select: status %d", (int)st);
    REQUIRE(key_matches(m->mode, k, &m->a[i]), "select(%llu): wrong key", (unsigned long long)i);
    REQUIRE(same_bits(v, m->a[i].v), "select(%llu): value %.17g, model %.17g", (unsigned long long)i,
            v, m->a[i].v);
    REQUIRE(agg_tree_select(t, i, NULL, NULL) == AGG_OK, "select with NULL outputs");
}

static void op_read(const agg_tree *t, const model *m)
{
    agg_key k[80];
    double v[80];
    uint64_t idx = rnd_below(m->n + 2), max = rnd_below(80), got, want, j;
    int desc = (int)rnd_below(2);
    got = agg_tree_read(t, idx, max, desc, k, v);
    if (idx >= m->n)
        want = 0;
    else if (desc)
        want = idx + 1 < max ? idx + 1 : max;
    else
        want = m->n - idx < max ? m->n - idx : max;
    REQUIRE(got == want, "read(%llu, %llu, desc=%d) gave %llu, want %llu", (unsigned long long)idx,
            (unsigned long long)max, desc, (unsigned long long)got, (unsigned long long)want);
    for (j = 0; j < got; j++) {
        uint64_t mi = desc ? idx - j : idx + j;
        REQUIRE(key_matches(m->mode, k[j], &m->a[mi]), "read: key %llu wrong", (unsigned long long)j);
        REQUIRE(same_bits(v[j], m->a[mi].v), "read: value %llu wrong", (unsigned long long)j);
    }
    /* NULL outputs count the same */
    REQUIRE(agg_tree_read(t, idx, max, desc, NULL, NULL) == want, "read with NULL outputs");
}

static void op_rank_many(const agg_tree *t, const model *m, uint64_t spread)
{
    enum { N = 300 };
    static mitem q[N];
    static keybuf kb[N];
    static agg_key k[N];
    static uint64_t out[N];
    uint64_t n = 1 + rnd_below(N), i;
    int after = (int)rnd_below(2);
    for (i = 0; i < n; i++)
        pick_key(m, &q[i], spread);
    if (rnd_chance(0.6))
        qsort(q, n, sizeof q[0], m->mode == AGG_KEYS_FAST ? mitem_cmp_fast : mitem_cmp_general);
    for (i = 0; i < n; i++)
        k[i] = mkey(m, &q[i], &kb[i]);
    agg_tree_rank_many(t, k, n, after, out);
    for (i = 0; i < n; i++)
        REQUIRE(out[i] == model_rank(m, &q[i], after), "rank_many[%llu] (after=%d) = %llu, model %llu",
                (unsigned long long)i, after, (unsigned long long)out[i],
                (unsigned long long)model_rank(m, &q[i], after));
}

/* Rebuild the tree from the model with agg_tree_build (also exercising
 * its error paths); returns the new tree, the old one is freed. */
static agg_tree *op_build(agg_tree *t, const model *m)
{
    agg_tree *nt;
    agg_key *k = (agg_key *)malloc((m->n + 1) * sizeof *k);
    double *v = (double *)malloc((m->n + 1) * sizeof *v);
    keybuf *kb = (keybuf *)malloc((m->n + 1) * sizeof *kb);
    uint64_t i, bad = 12345;
    agg_status st;
    int null_values = m->n > 0 && rnd_chance(0.1);
    REQUIRE(k && v && kb, "out of memory");
    for (i = 0; i < m->n; i++) {
        k[i] = mkey(m, &m->a[i], &kb[i]);
        v[i] = m->a[i].v;
    }
    REQUIRE(agg_tree_new(&nt, agg_tree_node_size(t), agg_tree_mode(t)) == AGG_OK, "new");
    if (m->n >= 2) {
        /* a duplicate, then an inversion: errors, tree left empty */
        uint64_t j = 1 + rnd_below(m->n - 1);
        agg_key save = k[j];
        k[j] = k[j - 1];
        st = agg_tree_build(nt, k, v, m->n, &bad);
        REQUIRE(st == AGG_DUPLICATE && bad == j, "build with a duplicate at %llu: status %d bad %llu",
                (unsigned long long)j, (int)st, (unsigned long long)bad);
        k[j] = save;
        check_tree(nt, "failed build (duplicate)");
        REQUIRE(agg_tree_len(nt) == 0 && agg_tree_nbytes(nt) == 0, "failed build left something");
        save = k[j - 1];
        k[j - 1] = k[j];
        k[j] = save;
        st = agg_tree_build(nt, k, v, m->n, &bad);
        REQUIRE(st == AGG_INVALID && bad == j, "build out of order at %llu: status %d bad %llu",
                (unsigned long long)j, (int)st, (unsigned long long)bad);
        k[j] = k[j - 1];
        k[j - 1] = save;
        check_tree(nt, "failed build (order)");
        REQUIRE(agg_tree_len(nt) == 0 && agg_tree_nbytes(nt) == 0, "failed build left something");
    }
    st = agg_tree_build(nt, k, null_values ? NULL : v, m->n, &bad);
    REQUIRE(st == AGG_OK, "build of %llu items: status %d", (unsigned long long)m->n, (int)st);
    memset(kb, 0xA5, (m->n + 1) * sizeof *kb);  /* the tree must own its tails */
    check_tree(nt, "build");
    if (null_values) {
        for (i = 0; i < m->n; i++) {
            agg_key kk;
            double vv = 1.0;
            REQUIRE(agg_tree_select(nt, i, &kk, &vv) == AGG_OK && vv == 0.0, "build with NULL values");
        }
        agg_tree_free(nt);
        REQUIRE(agg_tree_new(&nt, agg_tree_node_size(t), agg_tree_mode(t)) == AGG_OK, "new");
        for (i = 0; i < m->n; i++)
            k[i] = mkey(m, &m->a[i], &kb[i]);
        REQUIRE(agg_tree_build(nt, k, v, m->n, NULL) == AGG_OK, "build");
        memset(kb, 0xA5, (m->n + 1) * sizeof *kb);
        check_tree(nt, "build");
    }
    compare_items(nt, m, "after build");
    if (m->n) {
        REQUIRE(agg_tree_build(nt, k, v, 1, &bad) == AGG_INVALID, "build into a non-empty tree");
        check_tree(nt, "build into a non-empty tree");
    }
    free(k);
    free(v);
    free(kb);
    agg_tree_free(t);
    return nt;
}

/* ------------------------------------------------------- random runs -- */

static void run_random(agg_keymode mode, uint32_t ns, uint64_t iters)
{
    static const uint64_t targets[] = {0, 3, 40, 400, 2500};
    static const uint64_t spreads[] = {16, 150, 2000, 100000};
    agg_tree *t;
    model m;
    uint64_t target = 40, spread = 150, it, appended = 0;
    int vm = 0;
    static char phase[64];
    snprintf(phase, sizeof phase, "random %s node_size %u", mode == AGG_KEYS_FAST ? "FAST" : "GENERAL", ns);
    g_phase = phase;
    memset(&m, 0, sizeof m);
    m.mode = mode;
    REQUIRE(agg_tree_new(&t, ns, mode) == AGG_OK, "new");
    REQUIRE(agg_tree_node_size(t) == ns && agg_tree_mode(t) == mode, "accessors");
    check_tree(t, "new");
    for (it = 0; it < iters; it++) {
        mitem x;
        uint64_t r;
        g_iter = it;
        if (it % 700 == 0) {
            target = targets[rnd_below(5)];
            if (ns <= 5 && target > 1500)
                target = 1500;
            spread = spreads[rnd_below(4)];
            vm = (int)rnd_below(4);
        }
        r = rnd_below(1000);
        if (r < 450) {                               /* insert / delete */
            int grow = m.n < target ? rnd_chance(0.75) : rnd_chance(0.3);
            if (grow) {
                if (rnd_chance(0.1)) {
                    seq_key(mode, appended++, rnd_chance(0.3), &x);
                } else {
                    pick_key(&m, &x, spread);
                    if (m.n && rnd_chance(0.5))
                        rnd_key(mode, &x, spread);
                }
                op_insert(t, &m, &x, rnd_value(vm), rnd_chance(0.5));
            } else {
                pick_key(&m, &x, spread);
                if (m.n && rnd_chance(0.3))
                    x = m.a[rnd_chance(0.5) ? 0 : m.n - 1];
                op_delete(t, &m, &x);
            }
            check_tree(t, "insert/delete");
        } else if (r < 560) {
            pick_key(&m, &x, spread);
            op_get(t, &m, &x);
        } else if (r < 680) {
            pick_key(&m, &x, spread);
            op_rank(t, &m, &x);
        } else if (r < 760) {
            op_select(t, &m);
        } else if (r < 880) {
            uint64_t lo = rnd_below(m.n + 2), hi = rnd_below(m.n + 2);
            if (rnd_chance(0.3))
                lo = 0;
            if (rnd_chance(0.3))
                hi = m.n;
            check_sum(t, &m, lo, hi);
            check_sum(t, &m, hi, lo);
            check_sum(t, &m, 0, m.n);
        } else if (r < 960) {
            op_read(t, &m);
        } else if (r < 985) {
            op_rank_many(t, &m, spread);
        } else if (r < 993) {
            compare_items(t, &m, "full comparison");
        } else if (r < 998) {
            t = op_build(t, &m);
        } else {
            if (rnd_chance(0.2)) {
                agg_tree_clear(t);
                m.n = 0;
                REQUIRE(agg_tree_len(t) == 0 && agg_tree_nbytes(t) == 0 && agg_tree_depth(t) == 0,
                        "clear left len %llu nbytes %zu depth %u",
                        (unsigned long long)agg_tree_len(t), agg_tree_nbytes(t), agg_tree_depth(t));
            }
        }
        check_tree(t, "operation");
        if (m.n == 0)
            REQUIRE(agg_tree_nbytes(t) == 0 && agg_tree_depth(t) == 0,
                    "empty tree keeps nbytes %zu depth %u", agg_tree_nbytes(t), agg_tree_depth(t));
    }
    compare_items(t, &m, "end of run");
    /* drain: delete everything in random order */
    while (m.n) {
        mitem x = m.a[rnd_below(m.n)];
        op_delete(t, &m, &x);
        check_tree(t, "drain");
    }
    REQUIRE(agg_tree_nbytes(t) == 0 && agg_tree_depth(t) == 0 && agg_tree_len(t) == 0,
            "drained tree keeps nbytes %zu", agg_tree_nbytes(t));
    agg_tree_free(t);
    free(m.a);
}

/* ---------------------------------------------------------- unit tests -- */

static void unit_keys(void)
{
    static const double d[] = {-1.7976931348623157e308, -1e300, -1.5, -1.0, -5e-324, 0.0,
                               5e-324, 2.2250738585072014e-308, 1.0, 1.5, 1e300,
                               1.7976931348623157e308};
    static const int64_t ids[] = {INT64_MIN, -1000000000000LL, -1, 0, 1, 42, INT64_MAX};
    size_t i;
    g_phase = "unit keys";
    for (i = 0; i < sizeof d / sizeof d[0]; i++) {
        REQUIRE(same_bits(agg_key_to_f64(agg_f64_to_key(d[i])), d[i]), "f64 round trip %g", d[i]);
        if (i)
            REQUIRE(agg_f64_to_key(d[i - 1]) < agg_f64_to_key(d[i]), "f64 order %g < %g", d[i - 1], d[i]);
    }
    for (i = 0; i < sizeof ids / sizeof ids[0]; i++) {
        REQUIRE(agg_key_to_i64(agg_i64_to_key(ids[i])) == ids[i], "i64 round trip");
        if (i)
            REQUIRE(agg_i64_to_key(ids[i - 1]) < agg_i64_to_key(ids[i]), "i64 order");
    }
    for (i = 0; i < 20000; i++) {
        double a = (rnd_unit() - 0.5) * pow(2.0, (double)rnd_below(200) - 100.0);
        double b = (rnd_unit() - 0.5) * pow(2.0, (double)rnd_below(200) - 100.0);
        int64_t x = (int64_t)rnd(), y = (int64_t)rnd();
        agg_key ka = {agg_f64_to_key(a), agg_i64_to_key(x)}, kb = {agg_f64_to_key(b), agg_i64_to_key(y)};
        int want = a < b ? -1 : a > b ? 1 : x < y ? -1 : x > y ? 1 : 0;
        int got = agg_key_cmp(AGG_KEYS_FAST, ka, kb);
        REQUIRE((got > 0) - (got < 0) == want, "FAST cmp");
        REQUIRE(same_bits(agg_key_to_f64(ka.head), a) && agg_key_to_i64(ka.rest) == x, "round trips");
    }
    /* GENERAL: compare == memcmp of prefix-free encodings; bytes round trip */
    for (i = 0; i < 20000; i++) {
        mitem a, b;
        keybuf ba, bb;
        uint8_t out[64];
        model gm;
        agg_key ka, kb;
        int got, want;
        size_t n;
        gm.mode = AGG_KEYS_GENERAL;
        rnd_key(AGG_KEYS_GENERAL, &a, 100000);
        rnd_key(AGG_KEYS_GENERAL, &b, rnd_chance(0.5) ? 20 : 100000);
        ka = mkey(&gm, &a, &ba);
        kb = mkey(&gm, &b, &bb);
        got = agg_key_cmp(AGG_KEYS_GENERAL, ka, kb);
        want = mcmp(&gm, &a, &b);
        REQUIRE((got > 0) - (got < 0) == want, "GENERAL cmp");
        REQUIRE(agg_key_cmp(AGG_KEYS_GENERAL, ka, ka) == 0, "GENERAL cmp self");
        n = agg_key_to_bytes(ka, out, sizeof out);
        REQUIRE(key_matches(AGG_KEYS_GENERAL, ka, &a), "to_bytes");
        REQUIRE(n == (a.len < 8 ? 8 : a.len), "to_bytes length");
        /* truncated output: only cap bytes written */
        memset(out, 0xEE, sizeof out);
        n = agg_key_to_bytes(ka, out, 5);
        REQUIRE(n == (a.len < 8 ? 8 : a.len) && out[5] == 0xEE, "to_bytes cap");
        n = agg_key_to_bytes(ka, out, 10);
        REQUIRE(out[10] == 0xEE, "to_bytes cap 10");
    }
    {   /* exactly 8 bytes: no tail; empty tail == no tail */
        uint8_t e[8] = {1, 2, 3, 4, 5, 6, 7, 8};
        keybuf b1, b2;
        agg_key k1 = agg_key_from_bytes(e, 8, kb_tail(&b1)), k2 = k1;
        REQUIRE(k1.rest == 0 && k1.head == UINT64_C(0x0102030405060708), "8-byte key");
        kb_tail(&b2)->len = 0;
        kb_tail(&b2)->refs = 0;
        k2.rest = (uint64_t)(uintptr_t)kb_tail(&b2);
        REQUIRE(agg_key_cmp(AGG_KEYS_GENERAL, k1, k2) == 0, "empty tail equals no tail");
        k1 = agg_key_from_bytes(e, 3, kb_tail(&b1));
        REQUIRE(k1.head == UINT64_C(0x0102030000000000) && k1.rest == 0, "short key zero-padded");
    }
}

static void unit_edges(void)
{
    agg_tree *t = NULL;
    agg_key k = {1, 2}, out;
    double v;
    uint64_t r[3], bad = 7;
    g_phase = "unit edges";
    REQUIRE(agg_tree_new(&t, 3, AGG_KEYS_FAST) == AGG_INVALID, "node size 3");
    REQUIRE(agg_tree_new(&t, 4097, AGG_KEYS_FAST) == AGG_INVALID, "node size 4097");
    REQUIRE(agg_tree_new(&t, 4096, AGG_KEYS_FAST) == AGG_OK, "node size 4096");
    agg_tree_free(t);
    agg_tree_free(NULL);
    REQUIRE(agg_tree_new(&t, 4, AGG_KEYS_FAST) == AGG_OK, "node size 4");
    REQUIRE(agg_tree_len(t) == 0 && agg_tree_depth(t) == 0 && agg_tree_nbytes(t) == 0, "empty");
    REQUIRE(agg_tree_get(t, k, &v) == 0, "get on empty");
    REQUIRE(agg_tree_rank(t, k, 0) == 0 && agg_tree_rank(t, k, 1) == 0, "rank on empty");
    REQUIRE(agg_tree_select(t, 0, &out, &v) == AGG_RANGE, "select on empty");
    REQUIRE(agg_tree_sum(t, 0, 10) == 0.0, "sum on empty");
    REQUIRE(agg_tree_read(t, 0, 10, 0, &out, &v) == 0, "read on empty");
    REQUIRE(agg_tree_delete(t, k, &v) == AGG_MISSING, "delete on empty");
    agg_tree_rank_many(t, &k, 1, 0, r);
    REQUIRE(r[0] == 0, "rank_many on empty");
    REQUIRE(agg_tree_build(t, &k, NULL, 0, &bad) == AGG_OK && agg_tree_len(t) == 0, "build of 0");
    check_tree(t, "empty");
    agg_tree_clear(t);
    check_tree(t, "clear of empty");
    /* drift: a huge value inserted and removed leaves small ones exact */
    {
        int i;
        for (i = 0; i < 200; i++) {
            agg_key ki = {agg_f64_to_key((double)i), agg_i64_to_key(0)};
            REQUIRE(agg_tree_insert(t, ki, 0.1, 0, NULL, NULL) == AGG_OK, "insert");
        }
        for (i = 0; i < 50; i++) {
            agg_key kb = {agg_f64_to_key(1000.0 + i), agg_i64_to_key(0)};
            REQUIRE(agg_tree_insert(t, kb, i % 2 ? 1e300 : -3e299, 0, NULL, NULL) == AGG_OK, "insert");
            check_tree(t, "big insert");
        }
        for (i = 0; i < 50; i++) {
            agg_key kb = {agg_f64_to_key(1000.0 + i), agg_i64_to_key(0)};
            REQUIRE(agg_tree_delete(t, kb, NULL) == AGG_OK, "delete");
            check_tree(t, "big delete");
        }
        v = agg_tree_sum(t, 0, 200);
        {
            xsum s;
            xsum_init(&s);
            for (i = 0; i < 200; i++)
                xsum_add(&s, 0.1);
            REQUIRE(v == xsum_value(&s), "no drift: sum %.17g, exact %.17g", v, xsum_value(&s));
        }
        /* overwrite with the same value, and with different ones */
        for (i = 0; i < 200; i++) {
            agg_key ki = {agg_f64_to_key((double)i), agg_i64_to_key(0)};
            int ex = 0;
            double old = 0;
            REQUIRE(agg_tree_insert(t, ki, i % 3 ? 0.1 : 1e-300, 1, &ex, &old) == AGG_OK && ex == 1 && old == 0.1,
                    "overwrite");
            check_tree(t, "overwrite");
        }
    }
    agg_tree_free(t);

    /* sums that overflow: no false alarms, and recovery once the huge
     * values are gone */
    REQUIRE(agg_tree_new(&t, 4, AGG_KEYS_FAST) == AGG_OK, "new");
    {
        int i;
        for (i = 0; i < 40; i++) {
            agg_key ki = {agg_f64_to_key((double)i), agg_i64_to_key(0)};
            double val = (i % 4 == 1) ? 1.7e308 : (i % 4 == 3) ? -1.7e308 : (double)i;
            REQUIRE(agg_tree_insert(t, ki, val, 0, NULL, NULL) == AGG_OK, "insert");
            check_tree(t, "overflowing insert");
        }
        v = agg_tree_sum(t, 0, 40);   /* inf - inf somewhere: not finite, no crash */
        (void)v;
        v = agg_tree_sum(t, 1, 2);
        REQUIRE(v == 1.7e308, "single huge value: %.17g", v);
        for (i = 0; i < 40; i++) {
            agg_key ki = {agg_f64_to_key((double)i), agg_i64_to_key(0)};
            if (i % 2 == 1) {
                REQUIRE(agg_tree_delete(t, ki, NULL) == AGG_OK, "delete");
                check_tree(t, "overflow delete");
            }
        }
        v = agg_tree_sum(t, 0, 20);
        REQUIRE(v == 380.0, "after removing the huge values: %.17g", v);
    }
    agg_tree_free(t);
}

int main(int argc, char **argv)
{
    static const uint32_t sizes[] = {4, 5, 7, 16, 64};
    uint64_t iters = TEST_SANITIZED ? 150000 : 1000000, per;
    int mi;
    size_t si;
    test_args(argc, argv, &iters, "test_core");
    unit_keys();
    unit_edges();
    per = iters / 10 + 1;
    for (mi = 0; mi < 2; mi++)
        for (si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
            run_random(mi ? AGG_KEYS_GENERAL : AGG_KEYS_FAST, sizes[si], per);
            printf("  %-40s ok\n", g_phase);
            fflush(stdout);
        }
    printf("test_core: all passed\n");
    return 0;
}
