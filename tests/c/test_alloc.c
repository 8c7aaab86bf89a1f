/*
 * test_alloc.c - allocation-failure test of the aggtree C core.
 *
 * For every write that can allocate (agg_tree_new, insert of a new key -
 * including the inserts that split a whole path and grow a new root, the
 * append / prepend patterns, GENERAL tail copies - and agg_tree_build) the
 * operation is retried with test_fail_after(n) for n = 0, 1, 2, ...
 * until it succeeds.  Every failing attempt must return AGG_NOMEM and leave
 * the tree exactly as it was: same items (keys as bytes, values as bits),
 * same nbytes and depth, and agg_tree_check passing.  Writes that must
 * never allocate (delete, value overwrite, duplicate insert, clear) run
 * with every allocation failing and must succeed.  Leaks are left to
 * ASan / valgrind.
 *
 *   test_alloc [seed [iterations]]     (or AGGTREE_SEED / AGGTREE_ITERS)
 */
#include "test_util.h"

static void same_as_model(const agg_tree *t, const model *m, const char *what)
{
    uint64_t i;
    REQUIRE(agg_tree_len(t) == m->n, "%s: len %llu, model %llu", what,
            (unsigned long long)agg_tree_len(t), (unsigned long long)m->n);
    for (i = 0; i < m->n; i++) {
        agg_key k;
        double v;
        keybuf kb;
        REQUIRE(agg_tree_select(t, i, &k, &v) == AGG_OK, "%s: select", what);
        REQUIRE(agg_key_cmp(m->mode, k, mkey(m, &m->a[i], &kb)) == 0, "%s: key %llu", what,
                (unsigned long long)i);
        REQUIRE(memcmp(&v, &m->a[i].v, sizeof v) == 0, "%s: value %llu", what, (unsigned long long)i);
    }
}

/* Insert x with injected failures until it goes through. */
static void insert_until_ok(agg_tree *t, model *m, const mitem *x, double v, int overwrite)
{
    keybuf kb;
    snap before;
    long n, made;
    int found, existed;
    size_t pos = model_lower(m, x, &found);
    agg_status st;
    snap_take(t, &before);
    for (n = 0;; n++) {
        agg_key k = mkey(m, x, &kb);
        test_fail_after(n);
        st = agg_tree_insert(t, k, v, overwrite, &existed, NULL);
        made = test_fail_after(-1);
        memset(&kb, 0x5A, sizeof kb);
        if (st != AGG_NOMEM)
            break;
        REQUIRE(!found, "insert of a present key returned AGG_NOMEM");
        REQUIRE(made == n, "failing insert made %ld allocations with %ld allowed", made, n);
        snap_same(t, &before, "tree after a failed insert");
        check_tree(t, "failed insert");
        REQUIRE(n < 200, "insert keeps failing");
    }
    if (found) {
        REQUIRE(n == 0, "insert of a present key allocated");
        REQUIRE(st == (overwrite ? AGG_OK : AGG_DUPLICATE) && existed == 1, "present key: status %d", (int)st);
        if (overwrite)
            m->a[pos].v = v;
    } else {
        mitem y = *x;
        REQUIRE(st == AGG_OK && existed == 0, "insert: status %d", (int)st);
        REQUIRE(made <= n, "insert made %ld allocations with %ld allowed", made, n);
        y.v = v;
        model_insert_at(m, pos, &y);
    }
    check_tree(t, "insert");
    snap_free(&before);
}

/* Build the model into a fresh tree with injected failures. */
static void build_until_ok(const agg_tree *like, const model *m)
{
    agg_tree *nt;
    agg_key *k = (agg_key *)malloc((m->n + 1) * sizeof *k);
    double *v = (double *)malloc((m->n + 1) * sizeof *v);
    keybuf *kb = (keybuf *)malloc((m->n + 1) * sizeof *kb);
    uint64_t i;
    long n;
    agg_status st;
    REQUIRE(k && v && kb, "out of memory");
    for (i = 0; i < m->n; i++) {
        k[i] = mkey(m, &m->a[i], &kb[i]);
        v[i] = m->a[i].v;
    }
    REQUIRE(agg_tree_new(&nt, agg_tree_node_size(like), agg_tree_mode(like)) == AGG_OK, "new");
    for (n = 0;; n++) {
        test_fail_after(n);
        st = agg_tree_build(nt, k, v, m->n, NULL);
        test_fail_after(-1);
        if (st != AGG_NOMEM)
            break;
        REQUIRE(agg_tree_len(nt) == 0 && agg_tree_nbytes(nt) == 0 && agg_tree_depth(nt) == 0,
                "failed build left len %llu nbytes %zu", (unsigned long long)agg_tree_len(nt),
                agg_tree_nbytes(nt));
        check_tree(nt, "failed build");
        REQUIRE(n < 1000000, "build keeps failing");
    }
    REQUIRE(st == AGG_OK, "build: status %d", (int)st);
    check_tree(nt, "build");
    same_as_model(nt, m, "after build");
    agg_tree_free(nt);
    free(k);
    free(v);
    free(kb);
}

static void run_alloc(agg_keymode mode, uint32_t ns, uint64_t iters)
{
    agg_tree *t = NULL;
    model m;
    uint64_t it, seq = 0;
    static char phase[64];
    int desc = 0;
    snprintf(phase, sizeof phase, "alloc %s node_size %u", mode == AGG_KEYS_FAST ? "FAST" : "GENERAL", ns);
    g_phase = phase;
    memset(&m, 0, sizeof m);
    m.mode = mode;

    test_fail_after(0);
    REQUIRE(agg_tree_new(&t, ns, mode) == AGG_NOMEM, "agg_tree_new with failing malloc");
    test_fail_after(-1);
    REQUIRE(agg_tree_new(&t, ns, mode) == AGG_OK, "new");

    for (it = 0; it < iters; it++) {
        uint64_t r = rnd_below(100);
        mitem x;
        g_iter = it;
        if (it % 500 == 0)
            desc = rnd_chance(0.5);
        if (r < 45) {                           /* random insert */
            if (m.n && rnd_chance(0.1))
                x = m.a[rnd_below(m.n)];
            else
                rnd_key(mode, &x, 100000);
            insert_until_ok(t, &m, &x, (double)rnd_below(1000), rnd_chance(0.5));
        } else if (r < 70) {                    /* append / prepend runs */
            seq_key(mode, seq++, desc, &x);
            insert_until_ok(t, &m, &x, rnd_unit(), 0);
        } else if (r < 97) {                    /* delete: never allocates */
            keybuf kb;
            int found;
            size_t pos;
            agg_status st;
            if (m.n && rnd_chance(0.9))
                x = m.a[rnd_below(m.n)];
            else
                rnd_key(mode, &x, 100000);
            pos = model_lower(&m, &x, &found);
            test_fail_after(0);
            st = agg_tree_delete(t, mkey(&m, &x, &kb), NULL);
            REQUIRE(test_fail_after(-1) == 0, "delete allocated");
            REQUIRE(st == (found ? AGG_OK : AGG_MISSING), "delete: status %d", (int)st);
            if (found)
                model_remove_at(&m, pos);
            check_tree(t, "delete");
        } else if (r < 99) {
            if (rnd_chance(0.3))
                build_until_ok(t, &m);
        } else if (rnd_chance(0.05)) {
            test_fail_after(0);
            agg_tree_clear(t);
            test_fail_after(-1);
            m.n = 0;
            check_tree(t, "clear");
        }
        if (it % 97 == 0)
            same_as_model(t, &m, "periodic comparison");
    }
    same_as_model(t, &m, "end");
    build_until_ok(t, &m);
    agg_tree_free(t);
    free(m.a);
}

int main(int argc, char **argv)
{
    static const uint32_t sizes[] = {4, 5, 16};
    uint64_t iters = TEST_SANITIZED ? 20000 : 60000, per;
    int mi;
    size_t si;
    test_args(argc, argv, &iters, "test_alloc");
    per = iters / 6 + 1;
    for (mi = 0; mi < 2; mi++)
        for (si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
            run_alloc(mi ? AGG_KEYS_GENERAL : AGG_KEYS_FAST, sizes[si], per);
            printf("  %-40s ok\n", g_phase);
            fflush(stdout);
        }
    printf("test_alloc: all passed\n");
    return 0;
}
