/*
 * test_batch.c - randomized test of the aggtree C core's batch operations
 * against a model (a sorted array of items): agg_tree_insert_sorted,
 * agg_tree_delete_sorted, agg_keys_sort and agg_tree_build_unsorted, for
 * both key modes and node sizes 4, 5, 7, 16, 64.
 *
 * Batches come in several shapes, chosen to reach every leaf plan of the
 * batch insert (section 13, core/batch_insert.c): random keys over the whole key
 * range, keys packed into one gap between two items (a huge group in one
 * leaf), appends after the last item and prepends before the first, one
 * key next to each of many items (every leaf touched), and batches larger
 * than the tree.  Single inserts and deletes run in between so that the
 * trees take every shape (sparse, full after a build, short rightmost
 * nodes).  After every operation agg_tree_check runs and the whole tree is
 * compared with the model; error returns (unsorted batch, present or
 * absent key) must leave the tree exactly as it was.  Allocation failures
 * are injected into batch inserts, sorts and builds: every failing attempt
 * must return AGG_NOMEM and leave the tree unchanged (items, nbytes,
 * depth), and batch deletes must not allocate at all.
 *
 *   test_batch [seed [iterations]]     (or AGGTREE_SEED / AGGTREE_ITERS)
 */
#include "test_util.h"

/* --------------------------------------------------------- comparisons -- */

/* Whole content equal to the model, plus a few sums. */
static void compare_all(const agg_tree *t, const model *m, const char *what)
{
    uint64_t n = m->n, i;
    compare_items(t, m, what);
    for (i = 0; i < 3 && n; i++) {   /* range sums against the exact sum */
        uint64_t lo = rnd_below(n + 1), hi = rnd_below(n + 1), j;
        double s, exact, tol;
        xsum x;
        if (lo > hi) {
            uint64_t tmp = lo;
            lo = hi;
            hi = tmp;
        }
        if (i == 0) {
            lo = 0;
            hi = n;
        }
        s = agg_tree_sum(t, lo, hi);
        xsum_init(&x);
        for (j = lo; j < hi; j++)
            xsum_add(&x, m->a[j].v);
        exact = xsum_value(&x);
        if (x.all_int) {
            REQUIRE(s == exact, "%s: sum(%llu, %llu) = %.17g, exactly %.17g", what,
                    (unsigned long long)lo, (unsigned long long)hi, s, exact);
        } else {
            tol = 0x1p-52 * fabs(exact) + 1e-24 * x.abs;
            REQUIRE(fabs(s - exact) <= tol, "%s: sum(%llu, %llu) = %.17g, exact %.17g", what,
                    (unsigned long long)lo, (unsigned long long)hi, s, exact);
        }
    }
}

/* ------------------------------------------------------------- values -- */

/* 0 small integers, 1 decimals, 2 wide magnitudes (inexact sums). */
static double rnd_value(int vm)
{
    if (vm == 0)
        return (double)((int64_t)rnd_below(2001) - 1000);
    if (vm == 1)
        return (double)((int64_t)rnd_below(2000000) - 1000000) / 100.0;
    {
        double sign = rnd_chance(0.5) ? -1.0 : 1.0;
        if (rnd_chance(0.02))
            return sign * 1e300;
        return sign * pow(10.0, (double)rnd_below(61) - 30.0) * (0.5 + rnd_unit());
    }
}

/* ------------------------------------------------------------ batches -- */

/* Sort items and drop repeats; returns the new count. */
static size_t sort_unique(agg_keymode mode, mitem *a, size_t n)
{
    size_t i, w = 0;
    qsort(a, n, sizeof *a, mode == AGG_KEYS_FAST ? mitem_cmp_fast : mitem_cmp_general);
    for (i = 0; i < n; i++) {
        int c = w ? (mode == AGG_KEYS_FAST ? mitem_cmp_fast : mitem_cmp_general)(&a[w - 1], &a[i]) : 1;
        if (c != 0)
            a[w++] = a[i];
    }
    return w;
}

/* A FAST key strictly between model items a and b (either may be NULL =
 * unbounded), or 0 if the gap is empty. */
static int fast_between(const mitem *a, const mitem *b, mitem *x)
{
    memset(x, 0, sizeof *x);
    if (!a && !b) {
        x->fk.head = rnd();
        x->fk.rest = rnd();
        return 1;
    }
    if (!a) {
        if (b->fk.head == 0 && b->fk.rest == 0)
            return 0;
        x->fk = b->fk;
        if (x->fk.rest > 0)
            x->fk.rest -= 1 + rnd_below(x->fk.rest < 4 ? 1 : 3);
        else {
            x->fk.head--;
            x->fk.rest = rnd();
        }
        return 1;
    }
    if (!b || a->fk.head < b->fk.head) {
        x->fk.head = a->fk.head;
        if (a->fk.rest == ~UINT64_C(0)) {
            if (!b && a->fk.head == ~UINT64_C(0))
                return 0;
            if (b && a->fk.head + 1 == b->fk.head && b->fk.rest == 0)
                return 0;
            x->fk.head++;
            x->fk.rest = b && x->fk.head == b->fk.head ? rnd_below(b->fk.rest) : rnd_below(1000);
            return 1;
        }
        x->fk.rest = a->fk.rest + 1 + rnd_below(3);
        if (x->fk.rest < a->fk.rest)
            x->fk.rest = ~UINT64_C(0);
        if (b && x->fk.head == b->fk.head && x->fk.rest >= b->fk.rest)
            return 0;
        return 1;
    }
    if (b->fk.rest - a->fk.rest < 2)
        return 0;
    x->fk.head = a->fk.head;
    x->fk.rest = a->fk.rest + 1 + rnd_below(b->fk.rest - a->fk.rest - 1);
    return 1;
}

/* A GENERAL key strictly between a and b: a's encoding with a suffix
 * (before its 01 terminator nothing sorts between, so extend a's body). */
static int general_between(const model *m, const mitem *a, const mitem *b, mitem *x)
{
    int tries;
    for (tries = 0; tries < 20; tries++) {
        if (a && rnd_chance(0.7) && a->len + 2 <= KEY_MAX) {
            static const uint8_t body[] = {0x00, 0x02, 0x7f, 0xff};
            uint32_t extra = 1 + (uint32_t)rnd_below(3), k;
            *x = *a;
            x->len--;                       /* drop the terminator */
            for (k = 0; k < extra && x->len < KEY_MAX - 1; k++)
                x->e[x->len++] = body[1 + rnd_below(3)];
            x->e[x->len++] = 0x01;
        } else {
            rnd_key(m->mode, x, 100000);
        }
        if ((!a || mcmp(m, a, x) < 0) && (!b || mcmp(m, x, b) < 0))
            return 1;
    }
    return 0;
}

/* A new key between model items a and b (NULL: unbounded). */
static int key_between(const model *m, const mitem *a, const mitem *b, mitem *x)
{
    return m->mode == AGG_KEYS_FAST ? fast_between(a, b, x) : general_between(m, a, b, x);
}

enum { PAT_RANDOM, PAT_GAP, PAT_APPEND, PAT_PREPEND, PAT_EVERY, PAT_BIG, PAT_COUNT };

/* Fill out[] with up to want new keys (not in the model, strictly
 * increasing) in the given pattern; returns how many. */
static size_t make_batch(const model *m, int pat, size_t want, uint64_t spread, mitem *out,
                         uint64_t *seq)
{
    size_t n = 0, i, tries = 0;
    if (pat == PAT_GAP && m->n) {           /* all in one gap */
        size_t g = rnd_below(m->n + 1);
        const mitem *a = g ? &m->a[g - 1] : NULL, *b = g < m->n ? &m->a[g] : NULL;
        while (n < want && tries++ < 4 * want + 20) {
            mitem x;
            const mitem *lo = a;
            if (n && rnd_chance(0.5))
                lo = &out[rnd_below(n)];   /* nest: keys close to each other */
            if (key_between(m, lo, b, &x))
                out[n++] = x;
        }
        n = sort_unique(m->mode, out, n);
    } else if ((pat == PAT_APPEND || pat == PAT_PREPEND) && m->mode == AGG_KEYS_GENERAL) {
        for (i = 0; i < want; i++)
            seq_key(m->mode, (*seq)++, pat == PAT_PREPEND, &out[n++]);
        n = sort_unique(m->mode, out, n);
    } else if (pat == PAT_APPEND || pat == PAT_PREPEND) {
        mitem x;
        const mitem *edge = m->n ? &m->a[pat == PAT_APPEND ? m->n - 1 : 0] : NULL;
        double base = edge ? agg_key_to_f64(edge->fk.head) : 0.0;
        if (!(base > -1e300 && base < 1e300))
            base = 0.0;
        for (i = 0; i < want; i++) {
            double d = pat == PAT_APPEND ? base + 1.0 + (double)i : base - 1.0 - (double)i;
            memset(&x, 0, sizeof x);
            x.fk.head = agg_f64_to_key(d);
            x.fk.rest = agg_i64_to_key((int64_t)rnd_below(3));
            out[n++] = x;
        }
        n = sort_unique(m->mode, out, n);
    } else if (pat == PAT_EVERY && m->n) {  /* next to many items */
        size_t step = 1 + rnd_below(3), g;
        for (g = rnd_below(step); g <= m->n && n < want; g += step) {
            mitem x;
            if (key_between(m, g ? &m->a[g - 1] : NULL, g < m->n ? &m->a[g] : NULL, &x))
                out[n++] = x;
        }
        n = sort_unique(m->mode, out, n);
    } else {                                /* random over the key range */
        while (n < want && tries++ < 4 * want + 20) {
            rnd_key(m->mode, &out[n], spread);
            n++;
        }
        n = sort_unique(m->mode, out, n);
    }
    /* drop what the model has */
    {
        size_t w = 0;
        for (i = 0; i < n; i++) {
            int found;
            model_lower(m, &out[i], &found);
            if (!found)
                out[w++] = out[i];
        }
        n = w;
    }
    return n;
}

/* Merge the sorted new items b[0..nb) into the model. */
static void model_merge(model *m, const mitem *b, size_t nb)
{
    size_t cap = m->n + nb + 1, i = 0, j = 0, w = 0;
    mitem *na = (mitem *)malloc(cap * sizeof *na);
    REQUIRE(na != NULL, "out of memory");
    while (i < m->n || j < nb) {
        if (j >= nb || (i < m->n && mcmp(m, &m->a[i], &b[j]) < 0))
            na[w++] = m->a[i++];
        else
            na[w++] = b[j++];
    }
    free(m->a);
    m->a = na;
    m->n = w;
    m->cap = cap;
}

/* Remove the sorted items b[0..nb) (all present) from the model. */
static void model_remove_sorted(model *m, const mitem *b, size_t nb)
{
    size_t i, j = 0, w = 0;
    for (i = 0; i < m->n; i++) {
        if (j < nb && mcmp(m, &m->a[i], &b[j]) == 0)
            j++;
        else
            m->a[w++] = m->a[i];
    }
    REQUIRE(j == nb, "model: %zu of %zu removed", j, nb);
    m->n = w;
}

/* Keys (borrowing kb's tails) and values of a batch. */
static void batch_keys(const model *m, const mitem *b, size_t n, agg_key *k, keybuf *kb,
                       double *v)
{
    size_t i;
    for (i = 0; i < n; i++) {
        k[i] = mkey(m, &b[i], &kb[i]);
        if (v)
            v[i] = b[i].v;
        /* GENERAL 8-byte keys: sometimes an explicit empty tail */
        if (m->mode == AGG_KEYS_GENERAL && b[i].len == 8 && rnd_chance(0.5)) {
            kb_tail(&kb[i])->refs = 0;
            kb_tail(&kb[i])->len = 0;
            k[i].rest = (uint64_t)(uintptr_t)kb_tail(&kb[i]);
        }
    }
}

/* --------------------------------------------------------------- ops -- */

typedef struct bufs {
    mitem *items;
    agg_key *keys;
    keybuf *kb;
    double *vals;
    size_t cap;
} bufs;

static void bufs_need(bufs *b, size_t n)
{
    if (n <= b->cap)
        return;
    b->cap = n * 2;
    free(b->items);
    free(b->keys);
    free(b->kb);
    free(b->vals);
    b->items = (mitem *)malloc(b->cap * sizeof *b->items);
    b->keys = (agg_key *)malloc(b->cap * sizeof *b->keys);
    b->kb = (keybuf *)malloc(b->cap * sizeof *b->kb);
    b->vals = (double *)malloc(b->cap * sizeof *b->vals);
    REQUIRE(b->items && b->keys && b->kb && b->vals, "out of memory");
}

static void bufs_free(bufs *b)
{
    free(b->items);
    free(b->keys);
    free(b->kb);
    free(b->vals);
}

/* Insert a batch: first the error cases (tree unchanged), then with
 * injected allocation failures (sometimes), then for real. */
static void op_insert_sorted(agg_tree **tp, model *m, bufs *B, int pat, size_t want,
                             uint64_t spread, int vm, uint64_t *seq, int inject)
{
    agg_tree *t = *tp;
    size_t n, i;
    uint64_t bad = 777;
    agg_status st;
    int null_values = rnd_chance(0.05);
    snap before;
    bufs_need(B, want + m->n + 10);
    n = make_batch(m, pat, want, spread, B->items, seq);
    for (i = 0; i < n; i++)
        B->items[i].v = null_values ? 0.0 : rnd_value(vm);
    batch_keys(m, B->items, n, B->keys, B->kb, B->vals);
    snap_take(t, &before);

    if (n >= 2 && rnd_chance(0.3)) {       /* out of order: AGG_INVALID */
        size_t j = 1 + rnd_below(n - 1);
        agg_key save = B->keys[j];
        int eq = rnd_chance(0.5);
        B->keys[j] = eq ? B->keys[j - 1] : B->keys[j];
        if (!eq) {
            B->keys[j] = B->keys[j - 1];
            B->keys[j - 1] = save;
        }
        bad = 777;
        st = agg_tree_insert_sorted(t, B->keys, B->vals, n, &bad);
        REQUIRE(st == AGG_INVALID && bad == j, "unsorted batch (%s at %zu): status %d bad %llu",
                eq ? "equal" : "swapped", j, (int)st, (unsigned long long)bad);
        if (!eq)
            B->keys[j - 1] = B->keys[j];
        B->keys[j] = save;
        snap_same(t, &before, "after an unsorted batch");
        check_tree(t, "unsorted batch");
    }
    if (m->n && rnd_chance(0.3)) {          /* a present key: AGG_DUPLICATE */
        mitem *all = (mitem *)malloc((n + 3) * sizeof *all);
        agg_key *k2 = (agg_key *)malloc((n + 3) * sizeof *k2);
        keybuf *kb2 = (keybuf *)malloc((n + 3) * sizeof *kb2);
        size_t n2 = n, first = (size_t)-1, c;
        REQUIRE(all && k2 && kb2, "out of memory");
        memcpy(all, B->items, n * sizeof *all);
        for (c = 1 + rnd_below(2); c > 0; c--)
            all[n2++] = m->a[rnd_below(m->n)];
        n2 = sort_unique(m->mode, all, n2);
        for (i = 0; i < n2; i++) {
            int found;
            model_lower(m, &all[i], &found);
            if (found && first == (size_t)-1)
                first = i;
        }
        batch_keys(m, all, n2, k2, kb2, NULL);
        bad = 777;
        st = agg_tree_insert_sorted(t, k2, NULL, n2, &bad);
        REQUIRE(st == AGG_DUPLICATE && bad == first, "batch with a present key at %zu: status %d bad %llu",
                first, (int)st, (unsigned long long)bad);
        snap_same(t, &before, "after a batch with a present key");
        check_tree(t, "batch with a present key");
        free(all);
        free(k2);
        free(kb2);
    }
    if (inject && n) {                      /* allocation failures */
        long f, step = 1, made;
        for (f = 0;; f += step) {
            test_fail_after(f);
            st = agg_tree_insert_sorted(t, B->keys, B->vals, n, &bad);
            made = test_fail_after(-1);
            if (st != AGG_NOMEM)
                break;
            REQUIRE(made == f, "failing batch made %ld allocations with %ld allowed", made, f);
            snap_same(t, &before, "after a failed batch insert");
            check_tree(t, "failed batch insert");
            if (f > 40)
                step = 1 + f / 6;
        }
        REQUIRE(st == AGG_OK, "batch insert with %ld allocations allowed: status %d", f, (int)st);
    } else {
        st = agg_tree_insert_sorted(t, B->keys, null_values ? NULL : B->vals, n, &bad);
        REQUIRE(st == AGG_OK, "batch insert of %zu (pattern %d): status %d", n, pat, (int)st);
    }
    memset(B->kb, 0xA5, n * sizeof *B->kb);   /* the tree must own its tails */
    check_tree(t, "batch insert");
    model_merge(m, B->items, n);
    compare_all(t, m, "after a batch insert");
    snap_free(&before);
    *tp = t;
}

/* Delete a batch of present keys (with error cases first). */
static void op_delete_sorted(agg_tree *t, model *m, bufs *B, int shape)
{
    size_t n = 0, i, want;
    uint64_t bad = 777;
    agg_status st;
    long made;
    int starve;
    snap before;
    if (shape < 0)
        shape = (int)rnd_below(4);
    if (!m->n)
        return;
    bufs_need(B, m->n + 10);
    if (shape == 0) {                       /* a random subset */
        double p = rnd_unit();
        for (i = 0; i < m->n; i++)
            if (rnd_chance(p))
                B->items[n++] = m->a[i];
    } else if (shape == 1) {                /* a contiguous range */
        size_t a = rnd_below(m->n), len = 1 + rnd_below(m->n - a);
        for (i = a; i < a + len; i++)
            B->items[n++] = m->a[i];
    } else if (shape == 2) {                /* a few */
        want = 1 + rnd_below(5);
        for (i = 0; i < want; i++)
            B->items[n++] = m->a[rnd_below(m->n)];
        n = sort_unique(m->mode, B->items, n);
    } else {                                /* all but a few, or all */
        for (i = 0; i < m->n; i++)
            if (!rnd_chance(0.02))
                B->items[n++] = m->a[i];
    }
    if (!n)
        return;
    batch_keys(m, B->items, n, B->keys, B->kb, NULL);
    snap_take(t, &before);
    if (n >= 2 && rnd_chance(0.3)) {
        size_t j = 1 + rnd_below(n - 1);
        agg_key save = B->keys[j];
        B->keys[j] = B->keys[j - 1];
        st = agg_tree_delete_sorted(t, B->keys, n, &bad);
        REQUIRE(st == AGG_INVALID && bad == j, "unsorted delete batch: status %d bad %llu", (int)st,
                (unsigned long long)bad);
        B->keys[j] = save;
        snap_same(t, &before, "after an unsorted delete batch");
    }
    if (rnd_chance(0.3)) {                  /* an absent key */
        mitem x;
        size_t pos = rnd_below(n + 1);
        const mitem *lo = pos ? &B->items[pos - 1] : NULL, *hi = pos < n ? &B->items[pos] : NULL;
        int found;
        if (key_between(m, lo, hi, &x)) {
            model_lower(m, &x, &found);
            if (!found) {
                agg_key *k2 = (agg_key *)malloc((n + 1) * sizeof *k2);
                keybuf xb;
                REQUIRE(k2 != NULL, "out of memory");
                memcpy(k2, B->keys, pos * sizeof *k2);
                k2[pos] = mkey(m, &x, &xb);
                memcpy(k2 + pos + 1, B->keys + pos, (n - pos) * sizeof *k2);
                st = agg_tree_delete_sorted(t, k2, n + 1, &bad);
                REQUIRE(st == AGG_MISSING && bad == pos, "delete batch with an absent key at %zu: status %d bad %llu",
                        pos, (int)st, (unsigned long long)bad);
                free(k2);
                snap_same(t, &before, "after a delete batch with an absent key");
            }
        }
    }
    /* half the time with every allocation failing: it must not need
     * memory (its temporaries - the prefetch list, the two-thread pass's
     * records - are optional); else it may take them (at most two) */
    starve = rnd_chance(0.5);
    test_fail_after(starve ? 0 : -1);
    st = agg_tree_delete_sorted(t, B->keys, n, &bad);
    made = test_fail_after(-1);
    REQUIRE(st == AGG_OK, "delete batch of %zu: status %d", n, (int)st);
    REQUIRE(made <= (starve ? 0 : 2), "delete batch allocated %ld times", made);
    check_tree(t, "batch delete");
    model_remove_sorted(m, B->items, n);
    compare_all(t, m, "after a batch delete");
    if (m->n == 0)
        REQUIRE(agg_tree_nbytes(t) == 0 && agg_tree_depth(t) == 0, "emptied tree keeps nbytes %zu",
                agg_tree_nbytes(t));
    snap_free(&before);
}

/* Rebuild the tree from the model: a third of the time with the bulk
 * build's own rule (cap / 8 free slots per leaf, section 9), a third
 * packed full (the state where every batch key overflows its leaf), else
 * with 1..cap/4 free slots per leaf (AGG_TEST_BUILD_SLACK). */
static agg_tree *op_build(agg_tree *t, const model *m, bufs *B)
{
    agg_tree *nt;
    long r = (long)rnd_below(3);
    long slack = r == 0 ? -1 : r == 1 ? 0 : 1 + (long)rnd_below(agg_tree_node_size(t) / 4);
    REQUIRE(agg_tree_new(&nt, agg_tree_node_size(t), agg_tree_mode(t)) == AGG_OK, "new");
    bufs_need(B, m->n + 10);
    batch_keys(m, m->a, m->n, B->keys, B->kb, B->vals);
    test_build_slack(slack);
    REQUIRE(agg_tree_build(nt, B->keys, B->vals, m->n, NULL) == AGG_OK, "build");
    test_build_slack(-1);
    check_tree(nt, "build");
    agg_tree_free(t);
    return nt;
}

static void op_single(agg_tree *t, model *m, uint64_t spread, int vm, int grow)
{
    mitem x;
    keybuf kb;
    int found;
    size_t pos;
    if (grow || !m->n) {
        rnd_key(m->mode, &x, spread);
        pos = model_lower(m, &x, &found);
        if (found)
            return;
        x.v = rnd_value(vm);
        REQUIRE(agg_tree_insert(t, mkey(m, &x, &kb), x.v, 0, NULL, NULL) == AGG_OK, "insert");
        model_insert_at(m, pos, &x);
    } else {
        pos = rnd_below(m->n);
        REQUIRE(agg_tree_delete(t, mkey(m, &m->a[pos], &kb), NULL) == AGG_OK, "delete");
        model_remove_at(m, pos);
    }
}

/* ------------------------------------------------------- random runs -- */

static void run_batch(agg_keymode mode, uint32_t ns, uint64_t iters)
{
    static const uint64_t spreads[] = {150, 2000, 100000};
    static char phase[64];
    agg_tree *t;
    model m;
    bufs B;
    uint64_t it, spread = 2000, seq = 0;
    int vm = 0;
    size_t limit = ns <= 5 ? 1500 : 6000;
    snprintf(phase, sizeof phase, "batch %s node_size %u", mode == AGG_KEYS_FAST ? "FAST" : "GENERAL", ns);
    g_phase = phase;
    memset(&m, 0, sizeof m);
    memset(&B, 0, sizeof B);
    m.mode = mode;
    REQUIRE(agg_tree_new(&t, ns, mode) == AGG_OK, "new");
    for (it = 0; it < iters; it++) {
        uint64_t r = rnd_below(100);
        g_iter = it;
        if (it % 50 == 0) {
            spread = spreads[rnd_below(3)];
            vm = (int)rnd_below(3);
        }
        if (r < 45) {
            int pat = (int)rnd_below(PAT_COUNT);
            size_t want;
            switch (rnd_below(4)) {
            case 0: want = 1 + rnd_below(3); break;
            case 1: want = 1 + rnd_below(40); break;
            case 2: want = 1 + rnd_below(400); break;
            default: want = 1 + rnd_below(m.n + 50); break;
            }
            if (pat == PAT_BIG)
                want = 2 * m.n + rnd_below(300);
            if (m.n + want > limit)
                want = m.n < limit ? limit - m.n : 0;
            if (!want)
                op_delete_sorted(t, &m, &B, -1);
            else
                op_insert_sorted(&t, &m, &B, pat, want, spread, vm, &seq, rnd_chance(0.15));
        } else if (r < 70) {
            op_delete_sorted(t, &m, &B, -1);
        } else if (r < 95) {
            uint64_t k, cnt = 1 + rnd_below(30);
            int grow = m.n < limit / 3 ? rnd_chance(0.7) : rnd_chance(0.3);
            for (k = 0; k < cnt; k++)
                op_single(t, &m, spread, vm, grow);
            check_tree(t, "single ops");
        } else {
            t = op_build(t, &m, &B);
        }
    }
    compare_all(t, &m, "end of run");
    agg_tree_free(t);
    free(m.a);
    bufs_free(&B);
}

/* ------------------------------------------------------ larger trees -- */

/* Bigger trees (several levels at node size 16 / 64), dense and sparse
 * batches, and a batch larger than the tree: the splits of internal
 * nodes, new root levels and long carries. */
static void run_large(agg_keymode mode, uint32_t ns, uint64_t items, int rounds)
{
    static char phase[64];
    agg_tree *t;
    model m;
    bufs B;
    uint64_t seq = 0;
    int r;
    snprintf(phase, sizeof phase, "large %s node_size %u", mode == AGG_KEYS_FAST ? "FAST" : "GENERAL", ns);
    g_phase = phase;
    memset(&m, 0, sizeof m);
    memset(&B, 0, sizeof B);
    m.mode = mode;
    REQUIRE(agg_tree_new(&t, ns, mode) == AGG_OK, "new");
    op_insert_sorted(&t, &m, &B, PAT_RANDOM, items / 4, 1000000000, 0, &seq, 0);
    for (r = 0; r < rounds; r++) {
        int pat = r % PAT_COUNT;
        size_t want = pat == PAT_BIG ? (size_t)m.n + 100 : (size_t)(items / 10 + rnd_below(items / 10));
        g_iter = (uint64_t)r;
        if (m.n > items) {
            op_delete_sorted(t, &m, &B, (int)rnd_below(2));
            continue;
        }
        op_insert_sorted(&t, &m, &B, pat, want, 1000000000, r % 3, &seq, 0);
        if (r % 4 == 3)
            t = op_build(t, &m, &B);
    }
    while (m.n)
        op_delete_sorted(t, &m, &B, 3);
    agg_tree_free(t);
    free(m.a);
    bufs_free(&B);
}

/* ---------------------------------------------------------- the sort -- */

static int cmp_pair(const void *a, const void *b)
{
    const agg_key *x = (const agg_key *)a, *y = (const agg_key *)b;
    if (x->head != y->head)
        return x->head < y->head ? -1 : 1;
    return (x->rest > y->rest) - (x->rest < y->rest);
}

typedef struct kv {
    agg_key k;
    double v;
} kv;

static int cmp_kv(const void *a, const void *b)
{
    const kv *x = (const kv *)a, *y = (const kv *)b;
    int c = cmp_pair(&x->k, &y->k);
    if (c)
        return c;
    return memcmp(&x->v, &y->v, sizeof x->v);
}

/* Keys drawn from distribution d. */
static agg_key sort_key(int d, uint64_t i, uint64_t n)
{
    agg_key k;
    switch (d) {
    case 0:                                 /* doubles in [0, 1), ids 0..n */
        k.head = agg_f64_to_key(rnd_unit());
        k.rest = agg_i64_to_key((int64_t)i);
        break;
    case 1:                                 /* few keys, many ids (long ties) */
        k.head = agg_f64_to_key((double)rnd_below(5));
        k.rest = agg_i64_to_key((int64_t)rnd_below(n + 1) - (int64_t)(n / 2));
        break;
    case 2:                                 /* everything random */
        k.head = rnd();
        k.rest = rnd();
        break;
    case 3:                                 /* equal heads, bits only low in rest */
        k.head = 42;
        k.rest = rnd_below(64);
        break;
    case 4:                                 /* duplicates of a few pairs */
        k.head = rnd_below(3);
        k.rest = rnd_below(3) << 40;
        break;
    case 5:                                 /* wide-range doubles, both signs */
        k.head = agg_f64_to_key((rnd_unit() - 0.5) * pow(2.0, (double)rnd_below(200) - 100.0));
        k.rest = agg_i64_to_key((int64_t)rnd());
        break;
    default:                                /* all equal */
        k.head = 7;
        k.rest = 7;
        break;
    }
    return k;
}

static void test_sort(uint64_t iters)
{
    static const uint64_t sizes[] = {0, 1, 2, 3, 31, 32, 33, 64, 100, 1000, 2049, 5000, 70000};
    uint64_t it;
    g_phase = "sort";
    for (it = 0; it < iters; it++) {
        uint64_t n = sizes[rnd_below(sizeof sizes / sizeof sizes[0])], i;
        int d = (int)rnd_below(7), with_values = rnd_chance(0.8);
        agg_key *k = (agg_key *)malloc((n + 1) * sizeof *k), *k0 = (agg_key *)malloc((n + 1) * sizeof *k0);
        double *v = (double *)malloc((n + 1) * sizeof *v), *v0 = (double *)malloc((n + 1) * sizeof *v0);
        kv *want = (kv *)malloc((n + 1) * sizeof *want), *got = (kv *)malloc((n + 1) * sizeof *got);
        agg_status st;
        g_iter = it;
        REQUIRE(k && k0 && v && v0 && want && got, "out of memory");
        for (i = 0; i < n; i++) {
            k[i] = sort_key(d, i, n);
            v[i] = (double)rnd_below(1000000);
            want[i].k = k[i];
            want[i].v = v[i];
        }
        memcpy(k0, k, n * sizeof *k);
        memcpy(v0, v, n * sizeof *v);
        if (n > 32 && rnd_chance(0.2)) {    /* scratch allocation fails */
            test_fail_after(0);
            st = agg_keys_sort(k, with_values ? v : NULL, n);
            test_fail_after(-1);
            REQUIRE(st == AGG_NOMEM || d == 6 || d == 4, "sort with failing malloc: status %d", (int)st);
            if (st == AGG_NOMEM)
                REQUIRE(memcmp(k, k0, n * sizeof *k) == 0 && memcmp(v, v0, n * sizeof *v) == 0,
                        "failed sort changed its input");
        }
        memcpy(k, k0, n * sizeof *k);
        st = agg_keys_sort(k, with_values ? v : NULL, n);
        REQUIRE(st == AGG_OK, "sort of %llu: status %d", (unsigned long long)n, (int)st);
        qsort(want, n, sizeof *want, cmp_kv);
        for (i = 0; i < n; i++) {
            REQUIRE(k[i].head == want[i].k.head && k[i].rest == want[i].k.rest,
                    "sort (distribution %d, n %llu): key %llu wrong", d, (unsigned long long)n,
                    (unsigned long long)i);
            got[i].k = k[i];
            got[i].v = with_values ? v[i] : v0[i];
        }
        if (with_values) {                  /* pairs kept together */
            qsort(got, n, sizeof *got, cmp_kv);
            for (i = 0; i < n; i++)
                REQUIRE(same_bits(got[i].v, want[i].v), "sort: value %llu separated from its key",
                        (unsigned long long)i);
        } else {
            REQUIRE(memcmp(v, v0, n * sizeof *v) == 0, "sort without values touched them");
        }
        free(k);
        free(k0);
        free(v);
        free(v0);
        free(want);
        free(got);
    }
}

/* agg_tree_build_unsorted: shuffled model items build the model's tree;
 * a repeated key is reported at its sorted index; wrong trees refused. */
static void test_build_unsorted(uint64_t iters)
{
    uint64_t it;
    g_phase = "build_unsorted";
    for (it = 0; it < iters; it++) {
        uint64_t n = rnd_below(it % 5 == 0 ? 20000 : 500), i, bad = 777;
        uint32_t ns = (uint32_t)(4 + rnd_below(61));
        agg_key *k = (agg_key *)malloc((n + 2) * sizeof *k);
        double *v = (double *)malloc((n + 2) * sizeof *v);
        agg_tree *t, *g;
        model m;
        agg_status st;
        long f;
        g_iter = it;
        memset(&m, 0, sizeof m);
        m.mode = AGG_KEYS_FAST;
        REQUIRE(k && v, "out of memory");
        for (i = 0; i < n; i++) {
            mitem x;
            int found;
            size_t pos;
            memset(&x, 0, sizeof x);
            x.fk = sort_key(rnd_chance(0.5) ? 0 : 5, i, n);
            x.v = (double)rnd_below(100);
            pos = model_lower(&m, &x, &found);
            if (!found)
                model_insert_at(&m, pos, &x);
        }
        n = m.n;
        for (i = 0; i < n; i++) {
            k[i] = m.a[i].fk;
            v[i] = m.a[i].v;
        }
        for (i = n; i > 1; i--) {           /* shuffle */
            uint64_t j = rnd_below(i);
            agg_key tk = k[i - 1];
            double tv = v[i - 1];
            k[i - 1] = k[j];
            v[i - 1] = v[j];
            k[j] = tk;
            v[j] = tv;
        }
        REQUIRE(agg_tree_new(&t, ns, AGG_KEYS_FAST) == AGG_OK, "new");
        for (f = 0; n > 32; f++) {          /* allocation failures: tree stays empty */
            test_fail_after(f);
            st = agg_tree_build_unsorted(t, k, v, n, &bad);
            test_fail_after(-1);
            if (st != AGG_NOMEM)
                break;
            REQUIRE(agg_tree_len(t) == 0 && agg_tree_nbytes(t) == 0, "failed build left items");
            check_tree(t, "failed build_unsorted");
            if (f > 3)
                f += f / 2;
        }
        if (n <= 32)
            st = agg_tree_build_unsorted(t, k, v, n, &bad);
        REQUIRE(st == AGG_OK, "build_unsorted of %llu: status %d", (unsigned long long)n, (int)st);
        check_tree(t, "build_unsorted");
        compare_all(t, &m, "after build_unsorted");
        REQUIRE(agg_tree_build_unsorted(t, k, v, n, &bad) == (n ? AGG_INVALID : AGG_OK),
                "build_unsorted into a non-empty tree");
        agg_tree_free(t);
        if (n >= 2) {                       /* a repeated key */
            uint64_t a = rnd_below(n), b = rnd_below(n);
            agg_key dupk;
            if (a == b)
                b = (a + 1) % n;
            k[b] = k[a];
            dupk = k[a];
            REQUIRE(agg_tree_new(&t, ns, AGG_KEYS_FAST) == AGG_OK, "new");
            st = agg_tree_build_unsorted(t, k, v, n, &bad);
            REQUIRE(st == AGG_DUPLICATE && bad >= 1 && bad < n && k[bad].head == dupk.head &&
                        k[bad].rest == dupk.rest && k[bad - 1].head == dupk.head &&
                        k[bad - 1].rest == dupk.rest,
                    "build_unsorted with a repeated key: status %d bad %llu", (int)st,
                    (unsigned long long)bad);
            REQUIRE(agg_tree_len(t) == 0 && agg_tree_nbytes(t) == 0, "failed build left items");
            agg_tree_free(t);
        }
        REQUIRE(agg_tree_new(&g, ns, AGG_KEYS_GENERAL) == AGG_OK, "new");
        REQUIRE(agg_tree_build_unsorted(g, k, v, n, &bad) == AGG_INVALID, "build_unsorted into GENERAL");
        agg_tree_free(g);
        free(k);
        free(v);
        free(m.a);
    }
}

/* ---------------------------------------------------------- unit tests -- */

static void unit_edges(void)
{
    agg_tree *t;
    agg_key k[3];
    double v[3] = {1.0, 2.0, 3.0};
    uint64_t bad = 777;
    g_phase = "unit edges";
    REQUIRE(agg_tree_new(&t, 4, AGG_KEYS_FAST) == AGG_OK, "new");
    REQUIRE(agg_tree_insert_sorted(t, k, v, 0, &bad) == AGG_OK && agg_tree_len(t) == 0, "empty batch");
    REQUIRE(agg_tree_delete_sorted(t, k, 0, &bad) == AGG_OK, "empty delete batch");
    k[0].head = 1;
    k[0].rest = 0;
    k[1].head = 1;
    k[1].rest = 5;
    k[2].head = 2;
    k[2].rest = 0;
    REQUIRE(agg_tree_delete_sorted(t, k, 3, &bad) == AGG_MISSING && bad == 0, "delete from empty");
    REQUIRE(agg_tree_insert_sorted(t, k, v, 3, &bad) == AGG_OK && agg_tree_len(t) == 3, "into empty");
    check_tree(t, "into empty");
    REQUIRE(agg_tree_insert_sorted(t, k + 1, v, 1, &bad) == AGG_DUPLICATE && bad == 0, "present");
    REQUIRE(agg_tree_sum(t, 0, 3) == 6.0, "sum");
    REQUIRE(agg_tree_delete_sorted(t, k, 3, &bad) == AGG_OK && agg_tree_len(t) == 0 &&
                agg_tree_nbytes(t) == 0 && agg_tree_depth(t) == 0,
            "delete all");
    check_tree(t, "deleted all");
    agg_tree_free(t);
}

/* Two-thread batch inserts (test_batch_thread_mode(md): 2 on two
 * threads, 3 the same parts on one) into deep trees: the check is cut at
 * a leaf-parent boundary near the batch's middle, the apply pass into up
 * to 16 pieces.  Present keys at the first or last position, on either
 * side of the middle, or in several pieces (the first in key order is
 * reported) leave the tree as it was, node for node; then the batch goes
 * in, packed (built) trees and sparse ones, with and without values, and
 * for GENERAL keys. */
static void unit_split(long md)
{
    static const uint32_t sizes[] = {4, 7, 16};
    const uint64_t N = 3000;
    size_t si;
    int gen;
    g_phase = "unit split";
    test_batch_thread_mode(md);
    for (gen = 0; gen < 2; gen++)
        for (si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
            agg_keymode mode = gen ? AGG_KEYS_GENERAL : AGG_KEYS_FAST;
            agg_key *tk = (agg_key *)malloc(N * sizeof *tk), *bk = (agg_key *)malloc(N * sizeof *bk);
            agg_tail *tt = (agg_tail *)malloc(2 * N * (sizeof(agg_tail) + 16));
            double *tv = (double *)malloc(N * sizeof *tv), *bv = (double *)malloc(N * sizeof *bv);
            uint64_t i, bad, nb = N - 1;
            int c, round;
            agg_tree *t;
            REQUIRE(tk && bk && tt && tv && bv, "out of memory");
            /* tree keys 2i, batch keys 2i + 1 (GENERAL: a shared head and
             * the number in a 9-byte tail, so every compare reaches the
             * tails) */
            for (i = 0; i < 2 * N; i++) {
                agg_key k;
                k.head = gen ? 77 : 2 * (i / 2) + (i & 1);
                k.rest = 0;
                if (gen) {
                    agg_tail *tl = (agg_tail *)((char *)tt + i * (sizeof(agg_tail) + 16));
                    uint64_t x = 2 * (i / 2) + (i & 1);
                    int b;
                    tl->refs = 0;
                    tl->len = 9;
                    tl->bytes[0] = 1;
                    for (b = 0; b < 8; b++)
                        tl->bytes[1 + b] = (uint8_t)(x >> (56 - 8 * b));
                    k.rest = (uint64_t)(uintptr_t)tl;
                }
                if (i & 1) {
                    if (i / 2 < nb) {
                        bk[i / 2] = k;
                        bv[i / 2] = (double)(i % 7);
                    }
                } else {
                    tk[i / 2] = k;
                    tv[i / 2] = 1.0;
                }
            }
            for (round = 0; round < 2; round++) {
                REQUIRE(agg_tree_new(&t, sizes[si], mode) == AGG_OK, "new");
                if (round == 0) {           /* packed: a bulk build */
                    REQUIRE(agg_tree_build(t, tk, tv, N, &bad) == AGG_OK, "build");
                } else {                    /* sparse: one by one, in random order */
                    for (i = 0; i < N; i++) {
                        uint64_t j = i + rnd_below(N - i);
                        agg_key k = tk[j];
                        double v = tv[j];
                        tk[j] = tk[i];
                        tv[j] = tv[i];
                        tk[i] = k;
                        tv[i] = v;
                        REQUIRE(agg_tree_insert(t, k, v, 0, NULL, NULL) == AGG_OK, "insert");
                    }
                }
                check_tree(t, "split: before");
                for (c = 0; c < 7; c++) {
                    /* present keys (tree key j sits between batch keys j - 1
                     * and j) at x * N / 64 (64: the last): at the start,
                     * the end, a quarter and three quarters, three
                     * quarters, the middle, and several spread over the
                     * apply pieces (up to 16, section 13) */
                    static const int where[7][4] = {{0, -1, -1, -1},  {64, -1, -1, -1},
                                                    {16, 48, -1, -1}, {48, -1, -1, -1},
                                                    {32, -1, -1, -1}, {12, 28, 44, 60},
                                                    {1, 33, 63, -1}};
                    agg_key *b2 = (agg_key *)malloc((nb + 4) * sizeof *b2);
                    uint64_t pos[4], n2 = 0, first = UINT64_MAX, q = 0, w, np = 0;
                    size_t before = agg_tree_nbytes(t);
                    uint64_t shape = test_shape_hash(t);
                    REQUIRE(b2, "out of memory");
                    for (w = 0; w < 4; w++) {   /* ascending in the table */
                        int x = where[c][w];
                        if (x >= 0)
                            pos[np++] = x == 64 ? N - 1 : (uint64_t)x * N / 64;
                    }
                    /* batch keys in order, tree keys 2 pos[w] inserted */
                    for (i = 0; i <= nb; i++) {
                        while (q < np && pos[q] == i) {
                            agg_key k;
                            k.head = gen ? 77 : 2 * i;
                            k.rest = gen ? (uint64_t)(uintptr_t)((char *)tt + 2 * i * (sizeof(agg_tail) + 16))
                                         : 0;
                            if (first == UINT64_MAX)
                                first = n2;
                            b2[n2++] = k;
                            q++;
                        }
                        if (i < nb)
                            b2[n2++] = bk[i];
                    }
                    bad = 777;
                    REQUIRE(agg_tree_insert_sorted(t, b2, NULL, n2, &bad) == AGG_DUPLICATE &&
                                bad == first,
                            "split dup case %d: bad %llu want %llu", c, (unsigned long long)bad,
                            (unsigned long long)first);
                    REQUIRE(agg_tree_len(t) == N && agg_tree_nbytes(t) == before &&
                                test_shape_hash(t) == shape,
                            "dup case %d changed the tree", c);
                    check_tree(t, "split: after a duplicate");
                    free(b2);
                }
                REQUIRE(agg_tree_insert_sorted(t, bk, round ? NULL : bv, nb, &bad) == AGG_OK &&
                            agg_tree_len(t) == N + nb,
                        "split insert");
                check_tree(t, "split: inserted");
                for (i = 0; i + 1 < N + nb; i += 97) {
                    agg_key k;
                    double v;
                    REQUIRE(agg_tree_select(t, i, &k, &v) == AGG_OK, "select");
                    REQUIRE(i % 2 ? v == (round ? 0.0 : (double)((i) % 7)) : v == 1.0,
                            "split: value at %llu", (unsigned long long)i);
                }
                agg_tree_free(t);
            }
            free(tk);
            free(bk);
            free(tt);
            free(tv);
            free(bv);
        }
    test_batch_thread_mode(0);
}

/* agg_tree_build of a large FAST input with one or two keys out of order
 * (section 9: the fill checks order part by part, on two threads from
 * BATCH_THREAD_MIN items): the first bad index wins, whichever part or
 * thread met it, equal neighbours are AGG_DUPLICATE and a smaller key
 * AGG_INVALID, and the tree is left empty with nbytes 0.  Positions are
 * drawn anywhere, and also at the first item of a leaf (the check across
 * leaves and across parts), at 1 and at n - 1.  Then the same keys in
 * order build a tree that check() passes. */
static void test_build_order(uint64_t iters)
{
    uint64_t it;
    g_phase = "build order errors";
    for (it = 0; it < iters; it++) {
        uint64_t n = 20000 + rnd_below(30000), i, bad = 0, p1, p2;
        uint32_t ns = rnd_chance(0.5) ? 4 : 64, lf = ns - ns / 8;   /* (the default fill) */
        agg_key *k = (agg_key *)malloc(n * sizeof *k);
        double *v = (double *)malloc(n * sizeof *v);
        agg_tree *t;
        agg_status st, want;
        int dup = rnd_chance(0.5);
        g_iter = it;
        REQUIRE(k && v, "out of memory");
        for (i = 0; i < n; i++) {
            k[i].head = 1000 + 3 * i;
            k[i].rest = rnd_below(3);
            v[i] = (double)rnd_below(1000) / 8.0;
        }
        switch (it % 4) {
        case 0: p1 = 1; break;
        case 1: p1 = n - 1; break;
        case 2: p1 = (1 + rnd_below((n - 1) / lf)) * lf; break;   /* a leaf's first */
        default: p1 = 1 + rnd_below(n - 1); break;
        }
        if (p1 >= n)
            p1 = n - 1;
        p2 = p1 + 1 + rnd_below(n - p1);                    /* a later error, or none (n) */
        want = dup ? AGG_DUPLICATE : AGG_INVALID;
        k[p1] = k[p1 - 1];
        if (!dup)
            k[p1].head -= 1;
        if (p2 < n)
            k[p2].head = 0;
        REQUIRE(agg_tree_new(&t, ns, AGG_KEYS_FAST) == AGG_OK, "new");
        st = agg_tree_build(t, k, v, n, &bad);
        REQUIRE(st == want && bad == p1, "build n %llu: status %d bad %llu, expected %d at %llu",
                (unsigned long long)n, (int)st, (unsigned long long)bad, (int)want,
                (unsigned long long)p1);
        REQUIRE(agg_tree_len(t) == 0 && agg_tree_nbytes(t) == 0, "failed build left len %llu nbytes %zu",
                (unsigned long long)agg_tree_len(t), agg_tree_nbytes(t));
        for (i = 0; i < n; i++) {
            k[i].head = 1000 + 3 * i;
            k[i].rest = 0;
        }
        REQUIRE(agg_tree_build(t, k, v, n, &bad) == AGG_OK, "build after a failed one");
        REQUIRE(agg_tree_len(t) == n, "built len");
        check_tree(t, "build after a failed one");
        agg_tree_free(t);
        free(k);
        free(v);
    }
}

/* Cut leaves [0, L) into random ranges of 1..max leaves: cut[0] = 0 <
 * cut[1] < ... < cut[nr] = L; returns nr. */
static size_t random_cuts(uint64_t L, uint64_t max, uint64_t *cut)
{
    size_t nr = 0;
    cut[0] = 0;
    while (cut[nr] < L) {
        uint64_t step = 1 + rnd_below(max);
        cut[nr + 1] = cut[nr] + step < L ? cut[nr] + step : L;
        nr++;
    }
    return nr;
}

/* Shuffle the order in which ranges 0..nr-1 are put. */
static void random_order(size_t nr, size_t *ord)
{
    size_t i;
    for (i = 0; i < nr; i++)
        ord[i] = i;
    for (i = nr; i > 1; i--) {
        size_t j = (size_t)rnd_below(i), x = ord[i - 1];
        ord[i - 1] = ord[j];
        ord[j] = x;
    }
}

/* The staged build (agg_build_*): ranges of leaves put in random order
 * give the very tree agg_tree_build gives; an order error inside a range
 * is reported by the put, across two ranges by finish; a leaf never
 * filled, abort and allocation failures leave the tree empty. */
static void test_build_staged(uint64_t iters)
{
    uint64_t it;
    g_phase = "staged build";
    for (it = 0; it < iters; it++) {
        static const uint32_t caps[] = {4, 5, 7, 64};
        uint64_t n = 1 + rnd_below(it % 3 == 0 ? 40 : 20000), i, bad = 0, L, p = 0, r;
        uint32_t ns = caps[rnd_below(4)];
        agg_key *k = (agg_key *)malloc(n * sizeof *k);
        double *v = (double *)malloc(n * sizeof *v);
        uint64_t *cut = NULL, *vcut = NULL;
        size_t *ord = NULL, *vord = NULL, nr, nv, q;
        agg_tree *t, *ref;
        agg_build *b;
        agg_status st;
        int mode = (int)(it % 5);       /* 0, 1: fine; 2: bad order; 3: a leaf left; 4: abort */
        long slack = rnd_chance(0.3) ? (long)rnd_below(ns / 2) : -1, old;
        g_iter = it;
        REQUIRE(k && v, "out of memory");
        for (i = 0; i < n; i++) {
            k[i].head = 1000 + 3 * i;
            k[i].rest = rnd_below(3);
            /* exact sums; sums that turn inexact anywhere in a leaf; and
             * sums that overflow (the vectorised leaf sums must give the
             * scalar node_summary's bits, which check_tree compares) */
            switch ((it / 5) % 3) {
            case 0: v[i] = (double)rnd_below(1000) / 8.0 - 60.0; break;
            case 1: v[i] = ldexp((double)rnd_below(1u << 30) - (double)(1u << 29),
                                 (int)rnd_below(160) - 110); break;
            default: v[i] = rnd_chance(0.01) ? (rnd_chance(0.5) ? 1.7e308 : -1.7e308)
                                             : (double)rnd_below(1000) / 8.0; break;
            }
        }
        old = agg_test_control(AGG_TEST_BUILD_SLACK, slack);
        REQUIRE(agg_tree_new(&ref, ns, AGG_KEYS_FAST) == AGG_OK, "new");
        REQUIRE(agg_tree_build(ref, k, v, n, NULL) == AGG_OK, "reference build");
        if (mode == 2 && n > 1) {
            p = 1 + rnd_below(n - 1);
            k[p] = k[p - 1];
            if (rnd_chance(0.5))
                k[p].head -= 1;
        }
        REQUIRE(agg_tree_new(&t, ns, AGG_KEYS_FAST) == AGG_OK, "new");
        REQUIRE(agg_build_begin(t, n, &b) == AGG_OK, "begin");
        L = agg_build_leaves(b);
        REQUIRE(agg_build_leaf_start(b, 0) == 0 && agg_build_leaf_start(b, L) == n,
                "leaf starts 0 and n");
        cut = (uint64_t *)malloc((L + 1) * sizeof *cut);
        vcut = (uint64_t *)malloc((L + 1) * sizeof *vcut);
        ord = (size_t *)malloc(L * sizeof *ord);
        vord = (size_t *)malloc(L * sizeof *vord);
        REQUIRE(cut && vcut && ord && vord, "out of memory");
        nr = random_cuts(L, 1 + rnd_below(40), cut);
        nv = random_cuts(L, 1 + rnd_below(40), vcut);
        random_order(nr, ord);
        random_order(nv, vord);
        r = UINT64_MAX;
        for (q = 0; q < nr; q++) {
            uint64_t a = cut[ord[q]], z = cut[ord[q] + 1], got;
            uint64_t i0 = agg_build_leaf_start(b, a);
            got = agg_build_put_keys(b, a, z, k + i0);
            if (got != UINT64_MAX) {
                REQUIRE(mode == 2 && got == p && got > i0 && got < agg_build_leaf_start(b, z),
                        "put_keys reported %llu (error at %llu, range from item %llu)",
                        (unsigned long long)got, (unsigned long long)p, (unsigned long long)i0);
                r = got;
                break;
            }
        }
        if (r != UINT64_MAX) {
            agg_build_abort(b);
        } else {
            for (q = 0; q < nv; q++) {
                uint64_t a = vcut[vord[q]], z = vcut[vord[q] + 1];
                if (mode == 3 && q == nv / 2)
                    continue;                           /* a range left unfilled */
                agg_build_put_values(b, a, z, v + agg_build_leaf_start(b, a));
            }
            if (mode == 4) {
                agg_build_abort(b);
            } else {
                st = agg_build_finish(b, &bad);
                if (mode == 3) {
                    REQUIRE(st == AGG_INVALID, "finish with a leaf unfilled: %d", (int)st);
                } else if (mode == 2 && n > 1) {
                    REQUIRE(st == AGG_INVALID && bad == p, "finish: %d at %llu, error at %llu",
                            (int)st, (unsigned long long)bad, (unsigned long long)p);
                } else {
                    REQUIRE(st == AGG_OK, "finish: %d", (int)st);
                    check_tree(t, "staged build");
                    REQUIRE(agg_tree_len(t) == n && agg_tree_nbytes(t) == agg_tree_nbytes(ref) &&
                                test_shape_hash(t) == test_shape_hash(ref),
                            "staged build differs from agg_tree_build (n %llu, cap %u)",
                            (unsigned long long)n, ns);
                }
            }
        }
        if (mode >= 3 || (mode == 2 && n > 1)) {
            REQUIRE(agg_tree_len(t) == 0 && agg_tree_nbytes(t) == 0 && agg_tree_depth(t) == 0,
                    "a failed staged build left len %llu nbytes %zu",
                    (unsigned long long)agg_tree_len(t), agg_tree_nbytes(t));
        }
        agg_test_control(AGG_TEST_BUILD_SLACK, old);
        agg_tree_free(t);
        agg_tree_free(ref);
        free(cut);
        free(vcut);
        free(ord);
        free(vord);
        free(k);
        free(v);
    }
    /* misuse, and allocation failures at every point of begin */
    {
        agg_tree *t;
        agg_build *b = NULL;
        agg_key key = {5, 5};
        long f;
        REQUIRE(agg_tree_new(&t, 4, AGG_KEYS_FAST) == AGG_OK, "new");
        REQUIRE(agg_build_begin(t, 0, &b) == AGG_INVALID && !b, "begin of 0 items");
        REQUIRE(agg_tree_insert(t, key, 1.0, 0, NULL, NULL) == AGG_OK, "insert");
        REQUIRE(agg_build_begin(t, 10, &b) == AGG_INVALID && !b, "begin into a non-empty tree");
        agg_tree_free(t);
        REQUIRE(agg_tree_new(&t, 4, AGG_KEYS_GENERAL) == AGG_OK, "new");
        REQUIRE(agg_build_begin(t, 10, &b) == AGG_INVALID && !b, "begin into a GENERAL tree");
        agg_tree_free(t);
        REQUIRE(agg_tree_new(&t, 4, AGG_KEYS_FAST) == AGG_OK, "new");
        for (f = 0;; f++) {
            test_fail_after(f);
            {
                agg_status st = agg_build_begin(t, 500, &b);
                test_fail_after(-1);
                if (st == AGG_OK) {
                    agg_build_abort(b);
                    break;
                }
                REQUIRE(st == AGG_NOMEM && !b && agg_tree_nbytes(t) == 0,
                        "begin failing after %ld allocations: %d", f, (int)st);
            }
        }
        REQUIRE(f > 3, "begin made only %ld allocations", f);
        agg_tree_free(t);
    }
}

int main(int argc, char **argv)
{
    static const uint32_t sizes[] = {4, 5, 7, 16, 64};
    uint64_t iters = TEST_SANITIZED ? 4000 : 15000, per;
    long md;
    int mi;
    size_t si;
    test_args(argc, argv, &iters, "test_batch");
    unit_edges();
    unit_split(2);
    unit_split(3);
    printf("  %-40s ok\n", "two-thread cut");
    test_sort(iters / 20 + 20);
    printf("  %-40s ok\n", "sort");
    test_build_unsorted(iters / 200 + 10);
    printf("  %-40s ok\n", "build_unsorted");
    test_build_staged(TEST_SANITIZED ? 150 : 600);
    printf("  %-40s ok\n", g_phase);
    for (md = 0; md <= 3; md++) {         /* the automatic choice, 1, 2 threads, halves on one */
        test_batch_thread_mode(md);
        test_build_order(TEST_SANITIZED ? 8 : 24);
        printf("  %-40s ok (path %ld)\n", g_phase, md);
    }
    test_batch_thread_mode(0);
    per = iters / 10 + 1;
    /* batch inserts on one thread, on two, and cut in two halves run on
     * one thread (AGG_TEST_BATCH_THREAD_MODE) */
    for (md = 1; md <= 3; md++) {
        test_batch_thread_mode(md);
        for (mi = 0; mi < 2; mi++)
            for (si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
                run_batch(mi ? AGG_KEYS_GENERAL : AGG_KEYS_FAST, sizes[si], per);
                printf("  %-40s ok (path %ld)\n", g_phase, md);
                fflush(stdout);
            }
    }
    /* large batches: the automatic choice, and two threads */
    for (md = 0; md <= 2; md += 2) {
        test_batch_thread_mode(md);
        for (mi = 0; mi < 2; mi++) {
            run_large(mi ? AGG_KEYS_GENERAL : AGG_KEYS_FAST, 16, TEST_SANITIZED ? 20000 : 60000, 12);
            printf("  %-40s ok (path %ld)\n", g_phase, md);
            run_large(mi ? AGG_KEYS_GENERAL : AGG_KEYS_FAST, 64, TEST_SANITIZED ? 30000 : 150000, 12);
            printf("  %-40s ok (path %ld)\n", g_phase, md);
            fflush(stdout);
        }
    }
    test_batch_thread_mode(0);
    printf("test_batch: all passed\n");
    return 0;
}
