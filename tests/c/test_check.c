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

int main(int argc, char **argv)
{
    uint64_t iters = 400, it;
    test_args(argc, argv, &iters, "test_check");
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
