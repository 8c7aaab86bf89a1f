/*
 * test_check.c - does agg_tree_check notice damage?  This program reaches
 * the node internals through the core's private header (core/internal.h;
 * it links the core's units compiled one by one), builds healthy trees,
 * breaks one invariant at a time (I1..I9, section 4 of core/internal.h),
 * requires AGG_CORRUPT with a message, repairs the damage and requires
 * AGG_OK again.
 *
 *   test_check [seed [iterations]]
 */
#include "core/internal.h"

#include "test_util.h"

static agg_tree *g_t;

/* Exact sum of the values under n. */
static void subtree_sum(node *n, xacc *x)
{
    uint32_t i;
    if (n->leaf) {
        xacc_zero(x);
        for (i = 0; i < n->count; i++)
            xacc_add(x, leaf_vals(g_t, n)[i]);
        return;
    }
    xacc_zero(x);
    for (i = 0; i < n->count; i++) {
        xacc sub;
        subtree_sum(inner_child(g_t, n)[i], &sub);
        xacc_merge(x, &sub);
    }
}

static void expect_corrupt(const char *what)
{
    char msg[512];
    agg_status st = agg_tree_check(g_t, msg, sizeof msg);
    REQUIRE(st == AGG_CORRUPT, "damage not detected: %s (status %d)", what, (int)st);
    REQUIRE(msg[0] != 0, "no message for: %s", what);
}

static void expect_ok(const char *what)
{
    check_tree(g_t, what);
}

/* A random leaf and a random internal node (NULL if none) of g_t. */
static node *random_node(int want_leaf)
{
    node *n = g_t->root;
    if (!n || (!want_leaf && n->leaf))
        return NULL;
    while (!n->leaf) {
        node *c = inner_child(g_t, n)[rnd_below(n->count)];
        if (!want_leaf && (c->leaf || rnd_chance(0.3)))
            return n;
        n = c;
    }
    return n;
}

static void damage_once(void)
{
    node *lf = random_node(1), *in = random_node(0);
    agg_key *k = node_keys(lf);
    double *v = leaf_vals(g_t, lf);
    agg_key save;
    uint32_t i;

    if (lf->count >= 2) {                                    /* I1 */
        i = (uint32_t)rnd_below(lf->count - 1);
        save = k[i];
        k[i] = k[i + 1];
        expect_corrupt("equal neighbour keys in a leaf");
        k[i] = save;
        expect_ok("repaired leaf order");
    }
    if (lf->next) {                                          /* I1 across leaves */
        save = k[lf->count - 1];
        k[lf->count - 1] = node_keys(lf->next)[0];
        expect_corrupt("leaf's last key equal to the next leaf's first");
        k[lf->count - 1] = save;
        expect_ok("repaired");
    }
    if (in) {
        agg_key *sep = node_keys(in);
        node **ch = inner_child(g_t, in);
        uint64_t *cn = inner_cnt(g_t, in);
        double *hi = inner_hi(g_t, in), *lo = inner_lo(g_t, in);
        uint8_t *ex = inner_ex(g_t, in);
        double dsave;
        i = (uint32_t)rnd_below(in->count);
        if (i > 0 && g_t->mode == AGG_KEYS_FAST) {           /* I2 */
            save = sep[i];
            sep[i] = node_min_key(g_t, ch[i]);
            sep[i].rest++;
            expect_corrupt("separator above the right child's min");
            sep[i] = node_min_key(g_t, ch[i - 1]);
            expect_corrupt("separator not above the left child's max");
            {   /* the boundary: equal to the left child's max (mutant M19) */
                node *m = ch[i - 1];
                while (!m->leaf)
                    m = inner_child(g_t, m)[m->count - 1];
                sep[i] = node_keys(m)[m->count - 1];
                expect_corrupt("separator equal to the left child's max");
            }
            sep[i] = save;
            expect_ok("repaired separator");
        }
        save = sep[0];
        sep[0].head = 1;
        expect_corrupt("sep[0] not zero");
        sep[0] = save;
        cn[i]++;                                             /* I5 */
        expect_corrupt("cnt off by one");
        cn[i]--;
        dsave = lo[i];                                       /* I6 */
        lo[i] = nextafter(lo[i], INFINITY);
        expect_corrupt("sum low part off by one ulp");
        lo[i] = dsave;
        dsave = hi[i];
        hi[i] = nextafter(hi[i], INFINITY);
        expect_corrupt("sum high part off by one ulp");
        hi[i] = dsave;
        {   /* a flipped exact flag is damage unless the flipped state
             * happens to satisfy I6 too - then the check must pass */
            uint64_t c;
            double h, l;
            int was = ex[i], e = node_summary(g_t, ch[i], &c, &h, &l);
            xacc x;
            char msg[256];
            ex[i] = (uint8_t)!was;
            if (agg_tree_check(g_t, msg, sizeof msg) == AGG_OK) {
                if (was) {
                    REQUIRE(!e && memcmp(&h, &hi[i], 8) == 0 && memcmp(&l, &lo[i], 8) == 0,
                            "exact flag cleared on an entry that is not the child's inexact summary");
                } else {
                    subtree_sum(ch[i], &x);
                    xacc_add(&x, -hi[i]);
                    xacc_add(&x, -lo[i]);
                    REQUIRE(xacc_is_zero(&x), "exact flag set on an entry that is not the exact sum");
                }
            }
            ex[i] = 2;
            expect_corrupt("exact flag 2");
            ex[i] = (uint8_t)was;
        }
        inner_refresh(g_t, in, i);  /* restore a valid state either way */
        expect_ok("repaired sums");
        in->next = lf;                                       /* I7 */
        expect_corrupt("internal node with a chain pointer");
        in->next = NULL;
    }
    {                                                        /* I7 */
        node *save_n = lf->next, *save_p = lf->prev;
        lf->next = NULL;
        if (save_n) {
            expect_corrupt("leaf chain cut");
        }
        lf->next = save_n;
        lf->prev = lf;
        expect_corrupt("prev pointing to itself");
        lf->prev = save_p;
        expect_ok("repaired chain");
    }
    if (lf != g_t->root && lf->count > 1 && lf->next) {      /* I4 via count */
        uint32_t c = lf->count;
        lf->count = 0;
        expect_corrupt("empty non-root leaf");
        lf->count = c;
    }
    {                                                        /* values vs sums */
        i = (uint32_t)rnd_below(lf->count);
        if (g_t->depth > 1) {
            double dsave = v[i];
            v[i] = dsave + 1e35;   /* beyond every sum this test makes */
            expect_corrupt("value changed behind the sums");
            v[i] = dsave;
        }
    }
    if (g_t->mode == AGG_KEYS_GENERAL) {                     /* I8 */
        for (i = 0; i < lf->count; i++)
            if (k[i].rest) {
                key_tail(k[i])->refs++;
                expect_corrupt("tail refs too high");
                key_tail(k[i])->refs -= 2;
                expect_corrupt("tail refs too low");
                key_tail(k[i])->refs++;
                break;
            }
    }
    g_t->len++;                                              /* I5 total */
    expect_corrupt("len off by one");
    g_t->len--;
    g_t->nbytes++;                                           /* I9 */
    expect_corrupt("nbytes off by one");
    g_t->nbytes--;
    g_t->depth++;                                            /* I3 */
    expect_corrupt("depth off by one");
    g_t->depth--;
    expect_ok("all repaired");
}

/* Expected size of node i of the s nodes a bulk build cuts e entries into
 * at fill f (section 9): f each, the last taking the rest, but never 1:
 * then the one before it gives one up ([.., f - 1, 2]). */
static uint64_t expect_span(uint64_t e, uint64_t s, uint64_t i, uint64_t f)
{
    uint64_t last = e - (s - 1) * f;
    if (s == 1)
        return e;
    if (i + 1 == s)
        return last == 1 ? 2 : last;
    if (i + 2 == s && last == 1)
        return f - 1;
    return f;
}

/* The exact shape of agg_tree_build's trees: leaves packed full (cap
 * items; cap - cap / BUILD_SLACK_DIV if that is set; cap - s under
 * AGG_TEST_BUILD_SLACK s, at least cap / 2 + 1), internal levels packed
 * full, the last node of each level taking the rest (section 9,
 * core/tree.c); checked level by level against the rule computed here, and
 * the tree is valid.  At cap 64 the memory bar holds (<= 32 bytes per FAST
 * item). */
static void test_build_shape(void)
{
    static const uint32_t caps[] = {4, 5, 7, 8, 9, 16, 17, 64, 100};
    static const uint64_t sizes[] = {1, 2, 3, 4, 5, 7, 8, 9, 56, 57, 63, 64, 65, 113, 4000, 4097};
    size_t ci, si;
    int mode;
    g_phase = "build shape";
    for (mode = 0; mode < 3; mode++) {   /* default rule, slack 0, slack 3 */
        REQUIRE(test_build_slack(mode == 0 ? -1 : mode == 1 ? 0 : 3) == (mode == 2 ? 0 : -1),
                "AGG_TEST_BUILD_SLACK returns the previous setting");
        for (ci = 0; ci < sizeof caps / sizeof caps[0]; ci++) {
            for (si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
                uint32_t cap = caps[ci];
                uint64_t n = sizes[si], f = cap, j, e, s, l;
                agg_key *k = (agg_key *)malloc(n * sizeof *k);
                REQUIRE(k, "out of memory");
                if (!mode && BUILD_SLACK_DIV > 0)     /* the default rule */
                    f = cap - cap / (BUILD_SLACK_DIV > 0 ? BUILD_SLACK_DIV : 1);
                if (mode == 2)                          /* 3 free slots asked for */
                    f = cap - 3;
                if (f < cap / 2 + 1)
                    f = cap / 2 + 1;
                for (j = 0; j < n; j++)
                {
                    k[j].head = agg_f64_to_key((double)j);
                    k[j].rest = 0;
                }
                REQUIRE(agg_tree_new(&g_t, cap, AGG_KEYS_FAST) == AGG_OK, "new");
                REQUIRE(agg_tree_build(g_t, k, NULL, n, NULL) == AGG_OK, "build");
                expect_ok("bulk-built tree");
                /* the nodes of each level, top-down, then checked from the
                 * leaves up: e entries in s nodes */
                {
                    node **lv[MAX_DEPTH];
                    uint64_t cnt[MAX_DEPTH], d, i;
                    uint32_t depth = g_t->depth;
                    lv[0] = (node **)malloc(sizeof(node *));
                    REQUIRE(lv[0], "out of memory");
                    lv[0][0] = g_t->root;
                    cnt[0] = 1;
                    for (d = 1; d < depth; d++) {
                        uint64_t w = 0;
                        for (i = 0; i < cnt[d - 1]; i++)
                            w += lv[d - 1][i]->count;
                        lv[d] = (node **)malloc(w * sizeof(node *));
                        REQUIRE(lv[d], "out of memory");
                        cnt[d] = 0;
                        for (i = 0; i < cnt[d - 1]; i++) {
                            uint32_t c;
                            for (c = 0; c < lv[d - 1][i]->count; c++)
                                lv[d][cnt[d]++] = inner_child(g_t, lv[d - 1][i])[c];
                        }
                    }
                    e = n;
                    s = (e + f - 1) / f;
                    for (l = 0; l < depth; l++) {
                        d = depth - 1 - l;
                        REQUIRE(cnt[d] == s, "cap %u n %llu level %llu: %llu nodes, expected %llu",
                                cap, (unsigned long long)n, (unsigned long long)l,
                                (unsigned long long)cnt[d], (unsigned long long)s);
                        for (i = 0; i < s; i++) {
                            uint64_t want = expect_span(e, s, i, l ? cap : f);
                            REQUIRE(lv[d][i]->count == want,
                                    "cap %u n %llu level %llu node %llu: %u entries, expected %llu",
                                    cap, (unsigned long long)n, (unsigned long long)l,
                                    (unsigned long long)i, lv[d][i]->count, (unsigned long long)want);
                        }
                        e = s;
                        s = (e + cap - 1) / cap;
                    }
                    for (d = 0; d < depth; d++)
                        free(lv[d]);
                }
                REQUIRE(e == 1, "cap %u n %llu: the top level has %llu nodes", cap,
                        (unsigned long long)n, (unsigned long long)e);
                if (cap == 64 && n >= 4000)
                    REQUIRE(agg_tree_nbytes(g_t) <= 32 * n, "cap 64: %.2f bytes per item",
                            (double)agg_tree_nbytes(g_t) / (double)n);
                agg_tree_free(g_t);
                free(k);
            }
        }
    }
    REQUIRE(test_build_slack(-1) == 3, "slack back to the default");
}

int main(int argc, char **argv)
{
    uint64_t iters = 400, it;
    test_args(argc, argv, &iters, "test_check");
    test_build_shape();
    g_phase = "check";
    for (it = 0; it < iters; it++) {
        agg_keymode mode = (agg_keymode)(it & 1);
        uint32_t ns = (uint32_t)(4 + rnd_below(13));
        uint64_t n = 2 + rnd_below(3000), j;
        model m;
        g_iter = it;
        memset(&m, 0, sizeof m);
        m.mode = mode;
        REQUIRE(agg_tree_new(&g_t, ns, mode) == AGG_OK, "new");
        for (j = 0; j < n; j++) {
            mitem x;
            keybuf kb;
            double val = rnd_chance(0.3) ? pow(10.0, (double)rnd_below(61) - 30.0) : (double)rnd_below(100);
            rnd_key(mode, &x, 100000);
            agg_tree_insert(g_t, mkey(&m, &x, &kb), val, 0, NULL, NULL);
        }
        expect_ok("fresh tree");
        if (agg_tree_depth(g_t) >= 2)
            damage_once();
        agg_tree_free(g_t);
    }
    printf("test_check: all passed\n");
    return 0;
}
