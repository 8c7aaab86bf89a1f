/*
 * core/build.c - the bulk build: a tree made bottom-up from items already in
 * order (agg_tree_build, from_arrays, snapshot loads), and its staged form
 * (agg_build_*), which lets a reader write the items straight into the
 * leaves (snapshot.c reads a snapshot file into them without a buffer).
 *
 * 9. Bulk build
 * -------------
 * agg_tree_build computes the level sizes, allocates every node of every
 * level into one array of pointers (all[], level by level, in key order),
 * then fills: leaves 7/8 full (below), internal levels packed full, the last node
 * of each level (on the rightmost path, exempt from min by I4) taking the
 * rest, at least 2 (pack_span, the rule batch inserts use for the tree's
 * last nodes too).  O(n), ~29 bytes per FAST item at cap 64.  Loading a
 * snapshot is this build, so a loaded tree has the same shape.
 *
 * The fill is cut into parts by level-1 node: a part fills the leaves of
 * its level-1 nodes (keys and values copied in blocks, the chain links
 * read from all[]), then those nodes' entries, so each leaf's summary is
 * computed while the leaf is still in cache.  Parts write disjoint nodes;
 * a FAST build of >= BATCH_THREAD_MIN items runs them on the caller and
 * one helper (threads.c), which halves its CPU time: at 10^7 items the
 * copy, the order check, the 10^7 compensated additions of the leaf sums
 * and the page faults of ~250 MB of fresh nodes are all per leaf.  The
 * nodes are allocated untouched (pool blocks), so their page faults fall
 * on the thread that fills them.  The levels above 1 (1/64 of the nodes
 * at cap 64) are built after, on the caller.
 *
 * Failure.  A GENERAL build checks strict order (AGG_DUPLICATE /
 * AGG_INVALID with the index of the offending key) before allocating; its
 * fill copies tails, which may fail (AGG_NOMEM; one part, on the caller:
 * allocation is single-threaded).  A FAST build checks order inside the
 * fill, each part its own items and the one before its first; the first
 * bad index in part order wins (run_parts).  Either way every node is
 * freed and the tree stays empty.  A FAST build whose allocation fails
 * checks the order before it reports AGG_NOMEM, so an order error is
 * reported first in both modes.
 *
 * Staged build (FAST trees).  agg_build_begin plans the levels and
 * allocates every node untouched, as above; the caller then hands in the
 * items leaf range by leaf range, in any order and from any thread (ranges
 * disjoint): agg_build_put_keys copies a range's keys into its leaves,
 * links them, checks their order inside the range and writes each leaf's
 * child pointer and separator into its level-1 parent;
 * agg_build_put_values copies the values and writes each leaf's summary
 * (count, compensated sum: node_summary's bits) into the parent entry,
 * while the values are still in cache.  agg_build_finish checks what no
 * put could see (every leaf filled; the order across the edges of the
 * ranges, one comparison per edge, recorded in a byte per leaf), writes
 * the level-1 headers, builds the levels above (1/cap of the nodes) and
 * hands the tree its root; on any failure it frees every node and the tree
 * stays empty (agg_build_abort likewise).  agg_tree_build's FAST fill is
 * this, one level-1 node's leaves per put: the summary of a leaf is taken
 * while it is in cache either way.
 *
 * Fill of the leaves: cap - cap / 8 items (56 of 64), BUILD_SLACK_DIV.
 * A packed tree's first batch of writes overflows every leaf it touches
 * (10^5 random keys into 10^6 items touch nearly all 15,600 leaves), so
 * it splits them all and takes ~24 MB of fresh leaves, where the later
 * batches find room in the half-full leaves the splits left.  The
 * splitting itself costs little (the batch rewrites every touched leaf
 * either way, section 13); the fresh memory is what costs: with every
 * page of the process already mapped (glibc's mmap and trim thresholds
 * out of reach) the first batch into a packed tree cost what the later
 * ones did.  Huge pages for node chunks and scratch (section 10) cut the
 * page faults, not the kernel's zeroing: the first batch still measured
 * 1.15-2.06x the later ones (medians 1.53 and 1.64 of 4 runs, two
 * threads, 2026-12-07).  With 8 free slots per leaf most touched leaves
 * (6.4 new keys each on average) take their keys in place: first / later
 * 0.98 (median of 6 runs; from a load, 0.93).  The price: 28.8 bytes per
 * FAST item instead of 25.2 (the budget is 32), and 14% more fresh memory
 * for a load or from_arrays to fill, which the vectorised leaf sums
 * (vals_sum4_vec) more than paid back: a 10^7 load 46 ms against 47 packed
 * without them (bench/README.md).  AGG_TEST_BUILD_SLACK sets another
 * slack for tests, which build both shapes.  Runs: bench/first_batch.py.
 */
#include "internal.h"

/* Free slots the bulk build leaves in each leaf (section 9): < 0 the
 * default rule (build_leaf_fill), else that many (AGG_TEST_BUILD_SLACK,
 * so that tests can still build packed-full trees). */
static AGG_ATOMIC(long) g_build_slack = -1;

/* AGG_TEST_BUILD_SLACK (aggtree_test.h): sets the slack, returns the old one. */
AGG_INTERN long build_slack_set(long slack)
{
    long old = atomic_load_relaxed(&g_build_slack);
    atomic_store_relaxed(&g_build_slack, slack < 0 ? -1 : slack);
    return old;
}

/* Items the bulk build puts in each leaf of a tree of capacity cap: cap
 * less the slack (AGG_TEST_BUILD_SLACK, else cap / BUILD_SLACK_DIV, else
 * none: section 9), at least min + 1 (the one before the last leaf may
 * hold one less: pack_span). */
AGG_INTERN uint32_t build_leaf_fill(uint32_t cap)
{
    long slack = atomic_load_relaxed(&g_build_slack);
    uint32_t f;
    if (slack < 0)
        slack = BUILD_SLACK_DIV > 0 ? cap / (BUILD_SLACK_DIV > 0 ? BUILD_SLACK_DIV : 1) : 0;
    f = (uint64_t)slack >= cap ? 0 : cap - (uint32_t)slack;
    return f < cap / 2 + 1 ? cap / 2 + 1 : f;
}

/* Smallest key of subtree n. */
AGG_INTERN agg_key node_min_key(const agg_tree *t, node *n)
{
    while (!n->leaf)
        n = inner_child(t, n)[0];
    return node_keys(n)[0];
}

/* A build in progress (agg_build in aggtree.h): the nodes level by level,
 * level l's sizes[l] nodes being all[off[l] .. off[l] + sizes[l]), in key
 * order. */
struct agg_build {
    agg_tree *t;
    uint64_t n;                  /* items */
    uint64_t sizes[MAX_DEPTH];   /* nodes per level (0: leaves) */
    uint64_t off[MAX_DEPTH];     /* level l's first node in all[] */
    uint32_t levels;
    uint32_t lf;                 /* items per leaf (build_leaf_fill) */
    node **all;                  /* every node */
    uint8_t *done;               /* FAST: per leaf, DONE_* (staged build) */
    /* agg_tree_build's fill */
    const agg_key *keys;
    const double *values;        /* NULL: every value 0.0 */
    int np;                      /* parts of the fill */
};

/* done[li]: what the puts did for leaf li. */
#define DONE_KEYS 1              /* its keys, links and parent slot */
#define DONE_VALS 2              /* its values and summary */
#define DONE_EDGE 4              /* its first key was compared with the key before it */

/* Free every node of a failed build.  GENERAL: first the tail references
 * each node holds - a leaf its count items, a level-1 node its count - 1
 * separators (a failure can only come from a leaf's tail copy, so no node
 * above level 1 is built yet); every GENERAL node's count is set to 0 when
 * it is allocated, so a node not filled yet holds none.  Frees the plan's
 * arrays too. */
static void build_unwind(agg_build *b)
{
    agg_tree *t = b->t;
    uint64_t i, total = b->off[b->levels - 1] + b->sizes[b->levels - 1];
    uint64_t refs_end = b->levels > 1 ? b->off[1] + b->sizes[1] : b->sizes[0];
    for (i = 0; i < total; i++) {
        node *x = b->all[i];
        uint32_t k;
        if (!x)
            break;               /* (allocation stopped here) */
        if (t->mode == AGG_KEYS_GENERAL && i < refs_end)
            for (k = i < b->sizes[0] ? 0 : 1; k < x->count; k++)
                tail_release(t, node_keys(x)[k]);
        mem_free(t, x, i < b->sizes[0] ? t->leaf_bytes : t->inner_bytes);
    }
    free(b->all);
    free(b->done);
    b->all = NULL;
    b->done = NULL;
}

/* Plan a build of n >= 1 items into t: level sizes, then every node
 * allocated, untouched (a FAST fill's threads fault its pages in: section
 * 10).  AGG_NOMEM with nothing left allocated. */
static agg_status build_plan(agg_build *b, agg_tree *t, uint64_t n)
{
    uint64_t i, total;
    uint32_t cap = t->cap;
    int fast = t->mode == AGG_KEYS_FAST;
    memset(b, 0, sizeof *b);
    b->t = t;
    b->n = n;
    b->lf = build_leaf_fill(cap);
    b->sizes[0] = (n + b->lf - 1) / b->lf;
    b->levels = 1;
    while (b->sizes[b->levels - 1] > 1) {
        b->sizes[b->levels] = (b->sizes[b->levels - 1] + cap - 1) / cap;
        b->off[b->levels] = b->off[b->levels - 1] + b->sizes[b->levels - 1];
        b->levels++;
    }
    total = b->off[b->levels - 1] + b->sizes[b->levels - 1];
    b->all = (node **)scratch_alloc((size_t)total * sizeof *b->all);
    if (fast && b->all && (b->done = (uint8_t *)scratch_alloc((size_t)b->sizes[0])))
        memset(b->done, 0, (size_t)b->sizes[0]);
    if (!b->all || (fast && !b->done)) {
        free(b->all);
        free(b->done);
        return AGG_NOMEM;
    }
    for (i = 0; i < total; i++) {
        b->all[i] = (node *)mem_alloc(t, i < b->sizes[0] ? t->leaf_bytes : t->inner_bytes);
        if (!b->all[i]) {
            build_unwind(b);
            return AGG_NOMEM;
        }
        if (!fast)
            b->all[i]->count = 0;          /* (for build_unwind) */
    }
    return AGG_OK;
}

/* Leaf li's first item and item count. */
static inline void leaf_span(const agg_build *b, uint64_t li, uint64_t *base, uint32_t *sz)
{
    pack_span(b->n, b->sizes[0], li, 1, b->lf, base, sz);
}

/* Leaf li's parent (a level-1 node) and its slot there: the inverse of
 * pack_span(sizes[0], sizes[1], j, 1, cap), whose only irregular case is a
 * level ending [.., cap - 1, 2]. */
static inline node *leaf_parent(const agg_build *b, uint64_t li, uint32_t *slot)
{
    uint64_t s0 = b->sizes[0], s1 = b->sizes[1], cap = b->t->cap, j = li / cap;
    uint32_t k = (uint32_t)(li % cap);
    if (s1 > 1 && s0 - (s1 - 1) * cap == 1 && li + 2 >= s0) {
        j = s1 - 1;
        k = (uint32_t)(li + 2 - s0);
    }
    *slot = k;
    return b->all[b->off[1] + j];
}

/* Last key of leaf li (its keys are in place). */
static inline agg_key leaf_last(const agg_build *b, uint64_t li)
{
    node *x = b->all[li];
    return node_keys(x)[x->count - 1];
}

/* ---------------------------------------------------------------- staged -- */

/* See aggtree.h. */
agg_status agg_build_begin(agg_tree *t, uint64_t n, agg_build **out)
{
    agg_build *b;
    agg_status st;
    *out = NULL;
    if (t->root || t->mode != AGG_KEYS_FAST || n == 0)
        return AGG_INVALID;
    b = (agg_build *)raw_alloc(sizeof *b);
    if (!b)
        return AGG_NOMEM;
    st = build_plan(b, t, n);
    if (st != AGG_OK) {
        free(b);
        return st;
    }
    *out = b;
    return AGG_OK;
}

/* See aggtree.h. */
uint64_t agg_build_leaves(const agg_build *b) { return b->sizes[0]; }

/* See aggtree.h. */
uint64_t agg_build_leaf_start(const agg_build *b, uint64_t leaf)
{
    uint64_t base;
    uint32_t sz;
    if (leaf >= b->sizes[0])
        return b->n;
    leaf_span(b, leaf, &base, &sz);
    return base;
}

/* See aggtree.h and section 9. */
uint64_t agg_build_put_keys(agg_build *b, uint64_t l0, uint64_t l1, const agg_key *keys)
{
    agg_tree *t = b->t;
    uint64_t li, base, base0 = agg_build_leaf_start(b, l0), at;
    uint32_t sz, k;
    for (li = l0; li < l1; li++) {
        node *x = b->all[li];
        const agg_key *src;
        leaf_span(b, li, &base, &sz);
        src = keys + (base - base0);
        x->leaf = 1;
        x->count = sz;
        x->prev = li > 0 ? b->all[li - 1] : NULL;
        x->next = li + 1 < b->sizes[0] ? b->all[li + 1] : NULL;
        memcpy(node_keys(x), src, (size_t)sz * sizeof *src);
        for (at = li > l0 ? 0 : 1; at < sz; at++)
            if (AGG_UNLIKELY(!key_lt_fast(src[(int64_t)at - 1], src[at])))
                return base + at;
        if (b->levels > 1) {
            node *p = leaf_parent(b, li, &k);
            inner_child(t, p)[k] = x;
            node_keys(p)[k] = k > 0 ? src[0] : (agg_key){0, 0};
        }
        b->done[li] |= (uint8_t)(DONE_KEYS | (li > l0 ? DONE_EDGE : 0));
    }
    return UINT64_MAX;
}

/* vals_sum of four leaves of sz values each at once, lane j summing
 * v[j][0..sz): the same operations in the same order per lane, so the
 * same bits as four vals_sum calls (IEEE additions are the same in a
 * vector register; no contraction: there is no multiplication).  The
 * exact phase and the fast phase of vals_sum give the same (hi, lo); the
 * exact flag is whether no step rounded lo's addition (f != 0), which
 * stays set once it is, as vals_sum's switch to the fast phase does.  Four
 * independent chains in one register: the leaf summaries of a build
 * (10^7 compensated additions at 10^7 items) take a third of the time. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__aarch64__))
#define HAVE_VALS_SUM4 1
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4i __attribute__((vector_size(32)));
#if defined(__x86_64__)
__attribute__((target("avx")))
#endif
static void vals_sum4_vec(double *const v[4], uint32_t sz, double *hi, double *lo, int *ex)
{
    v4d h = {0, 0, 0, 0}, l = {0, 0, 0, 0};
    v4i inexact = {0, 0, 0, 0};
    uint32_t i, j;
    for (i = 0; i < sz; i++) {
        v4d x = {v[0][i], v[1][i], v[2][i], v[3][i]};
        v4d s = h + x, bv = s - h, av = s - bv, e = (h - av) + (x - bv);
        v4d t = l + e, bw = t - l, aw = t - bw, f = (l - aw) + (e - bw);
        inexact |= (f != 0.0);
        h = s;
        l = t;
    }
    for (j = 0; j < 4; j++) {
        double a = h[j], b = l[j];
        ex[j] = dd_finish(&a, &b, !inexact[j]);
        hi[j] = a;
        lo[j] = b;
    }
}
#endif

/* Whether vals_sum4_vec may run here (x86-64: the CPU has AVX). */
static int vals_sum4_ok(void)
{
#if defined(HAVE_VALS_SUM4) && defined(__x86_64__)
    return __builtin_cpu_supports("avx");
#elif defined(HAVE_VALS_SUM4)
    return 1;
#else
    return 0;
#endif
}

/* See aggtree.h and section 9. */
void agg_build_put_values(agg_build *b, uint64_t l0, uint64_t l1, const double *values)
{
    agg_tree *t = b->t;
    uint64_t li, base, base0 = agg_build_leaf_start(b, l0);
    uint32_t sz, k;
    int vec = b->levels > 1 && values && vals_sum4_ok();
    for (li = l0; li < l1;) {
        double *nv[4], hi[4], lo[4];
        int ex[4];
        uint32_t m = 1, j;
        leaf_span(b, li, &base, &sz);
        /* four leaves of the same size at once where there are four */
        if (vec && li + 4 <= l1 && li + 4 <= b->sizes[0] - 2)
            m = 4;                  /* (only the last two leaves differ: pack_span) */
        for (j = 0; j < m; j++) {
            nv[j] = leaf_vals(t, b->all[li + j]);
            if (values)
                memcpy(nv[j], values + (base - base0) + (uint64_t)j * sz, (size_t)sz * sizeof(double));
            else
                memset(nv[j], 0, (size_t)sz * sizeof(double));
        }
#ifdef HAVE_VALS_SUM4
        if (m == 4)
            vals_sum4_vec(nv, sz, hi, lo, ex);
        else
#endif
        if (b->levels > 1)
            ex[0] = vals_sum(nv[0], sz, 1, &hi[0], &lo[0]);
        for (j = 0; j < m; j++) {
            if (b->levels > 1) {
                node *p = leaf_parent(b, li + j, &k);
                inner_ex(t, p)[k] = (uint8_t)ex[j];
                inner_cnt(t, p)[k] = sz;
                inner_hi(t, p)[k] = hi[j];
                inner_lo(t, p)[k] = lo[j];
            }
            b->done[li + j] |= DONE_VALS;
        }
        li += m;
    }
}

/* Internal node j of level l: its entries, one per child (their summaries
 * computed from the children; for level 1 of a GENERAL build, right after
 * its leaves were filled, while they are in cache). */
static void build_inner(agg_build *b, uint32_t l, uint64_t j)
{
    agg_tree *t = b->t;
    node *x = b->all[b->off[l] + j];
    uint64_t base;
    uint32_t k, sz;
    pack_span(b->sizes[l - 1], b->sizes[l], j, 1, t->cap, &base, &sz);
    x->leaf = 0;
    x->prev = x->next = NULL;
    for (k = 0; k < sz; k++) {
        node *c = b->all[b->off[l - 1] + base + k];
        agg_key s = {0, 0};
        entry e;
        if (k > 0) {
            s = l == 1 ? node_keys(c)[0] : node_min_key(t, c);
            tail_ref(t, s);
        }
        e = entry_make(t, c, s);
        inner_put(t, x, k, &e);
    }
    x->count = sz;
}

/* Levels 2 and up, then the tree takes the nodes: nothing can fail. */
static void build_top(agg_build *b)
{
    agg_tree *t = b->t;
    uint64_t i, total = b->off[b->levels - 1] + b->sizes[b->levels - 1];
    uint32_t l;
    for (l = 2; l < b->levels; l++)
        for (i = 0; i < b->sizes[l]; i++)
            build_inner(b, l, i);
    t->root = b->all[total - 1];
    t->depth = b->levels;
    t->len = b->n;
    free(b->all);
    free(b->done);
    b->all = NULL;
    b->done = NULL;
}

/* The finish of a FAST build (staged, or agg_tree_build's): UINT64_MAX and
 * the tree built, or the plan unwound and the first item out of order
 * (b->n: a leaf was never filled). */
static uint64_t build_finish_fast(agg_build *b)
{
    uint64_t li, j, base;
    uint32_t sz;
    for (li = 0; li < b->sizes[0]; li++) {
        uint8_t d = b->done[li];
        if ((d & (DONE_KEYS | DONE_VALS)) != (DONE_KEYS | DONE_VALS)) {
            build_unwind(b);
            return b->n;
        }
        if (li > 0 && !(d & DONE_EDGE) &&
            AGG_UNLIKELY(!key_lt_fast(leaf_last(b, li - 1), node_keys(b->all[li])[0]))) {
            build_unwind(b);
            leaf_span(b, li, &base, &sz);
            return base;
        }
    }
    if (b->levels > 1)
        for (j = 0; j < b->sizes[1]; j++) {
            node *x = b->all[b->off[1] + j];
            pack_span(b->sizes[0], b->sizes[1], j, 1, b->t->cap, &base, &sz);
            x->leaf = 0;
            x->prev = x->next = NULL;
            x->count = sz;
        }
    build_top(b);
    return UINT64_MAX;
}

/* See aggtree.h. */
agg_status agg_build_finish(agg_build *b, uint64_t *bad_index)
{
    uint64_t r = build_finish_fast(b), n = b->n;
    free(b);
    if (r == UINT64_MAX)
        return AGG_OK;
    if (r == n)
        return AGG_INVALID;
    if (bad_index)
        *bad_index = r;
    return AGG_INVALID;
}

/* See aggtree.h. */
void agg_build_abort(agg_build *b)
{
    if (b) {
        build_unwind(b);
        free(b);
    }
}

/* ------------------------------------------------------- agg_tree_build -- */

/* Part p of a FAST fill (a run_parts part_fn): the level-1 nodes
 * [p * s1 / np, (p + 1) * s1 / np), each one's leaves in one put (a tree
 * of one leaf: that leaf).  The first leaf of each put is compared with
 * the key before it here (finish would too, but this keeps the first bad
 * index in part order).  Parts touch disjoint nodes and read only the
 * caller's arrays, so the two threads share nothing. */
static uint64_t build_part_fast(void *ctx, int p, int w)
{
    agg_build *b = (agg_build *)ctx;
    uint64_t s1 = b->levels > 1 ? b->sizes[1] : 1, j, j1, r, l0, l1, i0;
    uint32_t sz;
    (void)w;
    j1 = (uint64_t)(p + 1) * s1 / (uint64_t)b->np;
    for (j = (uint64_t)p * s1 / (uint64_t)b->np; j < j1; j++) {
        if (b->levels > 1)
            pack_span(b->sizes[0], s1, j, 1, b->t->cap, &l0, &sz);
        else
            l0 = 0, sz = 1;
        l1 = l0 + sz;
        i0 = agg_build_leaf_start(b, l0);
        if (i0 > 0 && !key_lt_fast(b->keys[i0 - 1], b->keys[i0]))
            return i0;
        if ((r = agg_build_put_keys(b, l0, l1, b->keys + i0)) != UINT64_MAX)
            return r;
        agg_build_put_values(b, l0, l1, b->values ? b->values + i0 : NULL);
    }
    return UINT64_MAX;
}

/* Fill leaf li of a GENERAL build: its items (tail copies), its chain
 * links.  UINT64_MAX, or BUILD_NOMEM (a tail copy failed). */
#define BUILD_NOMEM (UINT64_MAX - 1)
static uint64_t build_leaf_general(agg_build *b, uint64_t li)
{
    agg_tree *t = b->t;
    node *x = b->all[li];
    uint64_t base;
    uint32_t k, sz;
    agg_key *nk = node_keys(x);
    double *nv = leaf_vals(t, x);
    leaf_span(b, li, &base, &sz);
    x->leaf = 1;
    x->prev = li > 0 ? b->all[li - 1] : NULL;
    x->next = li + 1 < b->sizes[0] ? b->all[li + 1] : NULL;
    if (b->values)
        memcpy(nv, b->values + base, (size_t)sz * sizeof *nv);
    else
        memset(nv, 0, (size_t)sz * sizeof *nv);
    x->count = 0;
    for (k = 0; k < sz; k++) {
        if (!tail_copy(t, key_normalize(t, b->keys[base + k]), &nk[k]))
            return BUILD_NOMEM;
        x->count = k + 1;
    }
    return UINT64_MAX;
}

/* The fill of a GENERAL build, on the caller: each level-1 node's leaves,
 * then the node (a tree of one leaf: that leaf). */
static uint64_t build_fill_general(agg_build *b)
{
    uint64_t j, li, base;
    uint32_t sz;
    if (b->levels == 1)
        return build_leaf_general(b, 0);
    for (j = 0; j < b->sizes[1]; j++) {
        pack_span(b->sizes[0], b->sizes[1], j, 1, b->t->cap, &base, &sz);
        for (li = base; li < base + sz; li++)
            if (build_leaf_general(b, li) != UINT64_MAX)
                return BUILD_NOMEM;
        build_inner(b, 1, j);
    }
    return UINT64_MAX;
}

/* Parts per thread of a FAST fill: enough that a helper starting late
 * finds work left (threads.c). */
#define BUILD_PARTS_PER_THREAD 8

/* See aggtree.h and section 9. */
agg_status agg_tree_build(agg_tree *t, const agg_key *keys,
                          const double *values, uint64_t n,
                          uint64_t *bad_index)
{
    agg_build b;
    uint64_t r;
    int threads = 0, fast = t->mode == AGG_KEYS_FAST;

    if (t->root)
        return AGG_INVALID;
    if (n == 0)
        return AGG_OK;
    /* (GENERAL: the order first; a FAST build checks while it fills) */
    if (!fast && !keys_increasing(t, keys, n, &r))
        goto out_of_order;
    if (build_plan(&b, t, n) != AGG_OK) {
        /* an order error is reported first, as if checked before allocating */
        if (fast && !keys_increasing(t, keys, n, &r))
            goto out_of_order;
        return AGG_NOMEM;
    }
    b.keys = keys;
    b.values = values;
    if (!fast) {
        if (build_fill_general(&b) != UINT64_MAX) {
            build_unwind(&b);
            return AGG_NOMEM;
        }
        build_top(&b);
        return AGG_OK;
    }
    /* leaves and level 1 in parts; two threads for a large build */
    b.np = 1;
    if (b.levels > 1) {
        threads = batch_threads(n, atomic_load_relaxed(&g_batch_mode));
        if (threads)
            b.np = (int)(b.sizes[1] < 2 * BUILD_PARTS_PER_THREAD ? b.sizes[1]
                                                                : 2 * BUILD_PARTS_PER_THREAD);
    }
    r = run_parts(&b, build_part_fast, b.np, threads);
    if (r != UINT64_MAX) {
        build_unwind(&b);
        goto out_of_order;
    }
    r = build_finish_fast(&b);             /* (every edge was checked: cannot fail) */
    if (r != UINT64_MAX)
        goto out_of_order;
    return AGG_OK;

out_of_order:
    if (bad_index)
        *bad_index = r;
    return key_cmp(t, key_normalize(t, keys[r - 1]), key_normalize(t, keys[r])) == 0
               ? AGG_DUPLICATE : AGG_INVALID;
}

/* See aggtree.h. */
agg_status agg_tree_build_unsorted(agg_tree *t, agg_key *keys, double *values, uint64_t n,
                                   uint64_t *bad_index)
{
    agg_status st;
    if (t->mode != AGG_KEYS_FAST || t->root)
        return AGG_INVALID;
    st = agg_keys_sort(keys, values, n);
    if (st != AGG_OK)
        return st;
    return agg_tree_build(t, keys, values, n, bad_index);
}
