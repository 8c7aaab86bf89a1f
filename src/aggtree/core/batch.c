/*
 * core/batch.c - what the two batch operations of section 13 share: the
 * ordering check, scratch memory, exact sums of value runs, entry updates,
 * the forward-moving finger and the thread switch (their thread runner is
 * threads.c; the packing rule, pack_span, is in tree.c, shared
 * with the bulk build).
 */
#include "internal.h"

/* Temporary memory of a batch operation: through the failure injector,
 * not counted in nbytes. */
AGG_INTERN void *scratch_alloc(size_t size)
{
    return raw_alloc(size ? size : 1);
}

/* Exact sum of v[0..n) (v NULL: n zeros) as a ddsum. */
AGG_INTERN ddsum vals_ddsum(const double *v, uint64_t n)
{
    ddsum s;
    dds_zero(&s);
    if (v && n)
        s.exact = vals_sum(v, n, 0, &s.hi, &s.lo);
    return s;
}

/* Entry j of internal node p now summarises a child holding cnt items
 * whose sum changed by d: O(1) if the entry and d are exact and the
 * result stays exact, else recomputed from the child (section 8). */
AGG_INTERN void entry_apply(const agg_tree *t, node *p, uint32_t j, uint64_t cnt, const ddsum *d)
{
    double *hi = inner_hi(t, p), *lo = inner_lo(t, p);
    inner_cnt(t, p)[j] = cnt;
    if (inner_ex(t, p)[j] && d->exact) {
        double h = hi[j], l = lo[j];
        if (d->hi == 0.0 && d->lo == 0.0)
            return;
        if (dd_add_exact(&h, &l, d->hi) && dd_add_exact(&h, &l, d->lo)) {
            hi[j] = h;
            lo[j] = l;
            return;
        }
    }
    inner_refresh(t, p, j);
}

/* Re-descend from level d to the leaf for k.  resume: k is known to be >=
 * separator idx[d] + 1 of path[d], so the search starts there. */
AGG_INTERN void finger_descend(const agg_tree *t, finger *f, int d, agg_key k, int resume)
{
    int last = (int)t->depth - 1;
    for (; d < last; d++) {
        node *x = f->path[d];
        const agg_key *sep = node_keys(x);
        uint32_t s = resume ? f->idx[d] + 1 : 0, i;
        if (resume && (s + 1 >= x->count || key_lt(t, k, sep[s + 1])))
            i = s;                  /* the next child: the common case */
        else
            i = s + keys_count_le(t, sep + s + 1, x->count - 1 - s, k);
        resume = 0;
        f->idx[d] = i;
        f->path[d + 1] = inner_child(t, x)[i];
        if (i + 1 < x->count) {
            f->hn[d + 1] = x;
            f->hs[d + 1] = i + 1;
        } else {
            f->hn[d + 1] = f->hn[d];
            f->hs[d + 1] = f->hs[d];
        }
    }
}

/* The thread mode of the batch operations (AGG_TEST_BATCH_THREAD_MODE in
 * aggtree_test.h): 0 by default. */
AGG_INTERN AGG_ATOMIC(long) g_batch_mode = 0;

/* Set the thread mode; returns the previous one. */
AGG_INTERN long batch_thread_mode(long mode)
{
    return atomic_exchange_relaxed(&g_batch_mode, mode);
}

/* 1: cut the batch in two halves and use a second thread - forced by
 * the debug mode, else for large batches unless AGGTREE_THREADS=1 in the
 * environment; 2 (debug mode 3): the same halves, both on this thread;
 * 0: one part. */
AGG_INTERN int batch_threads(uint64_t n, long mode)
{
    if (mode == 2 || mode == 3)
        return mode == 2 ? 1 : 2;
    if (mode != 0 || n < BATCH_THREAD_MIN)
        return 0;
    return threads_allowed();
}

/* 1 if keys[0..n) strictly increase (the batch operations' precondition);
 * else 0 with *bad_index = the first i with keys[i - 1] >= keys[i]. */
AGG_INTERN int keys_increasing(const agg_tree *t, const agg_key *keys, uint64_t n,
                           uint64_t *bad_index)
{
    uint64_t i;
    for (i = 1; i < n; i++) {
        if (!key_lt(t, key_normalize(t, keys[i - 1]), key_normalize(t, keys[i]))) {
            if (bad_index)
                *bad_index = i;
            return 0;
        }
    }
    return 1;
}
