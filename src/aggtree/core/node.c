/*
 * core/node.c - leaf and internal-node primitives: moving items and entries,
 * splitting, merging and rebalancing nodes, and node_summary, the
 * entry a parent keeps for a child (sections 2 and 8 in internal.h).
 */
#include "internal.h"

/* Summary of a node as its parent's entry would hold it: item count and
 * the deterministic compensated sum of its values (leaf) or of its entries
 * hi[0], lo[0], hi[1], ... (internal), canonicalised.  Returns the exact
 * flag: 1 iff all child entries read were exact and no addition rounded,
 * so that hi + lo is exactly the subtree's sum (I6). */
AGG_INTERN int node_summary(const agg_tree *t, node *c, uint64_t *cnt, double *hi,
                        double *lo)
{
    double h = 0.0, l = 0.0;
    uint32_t i = 0, n = c->count;
    int ex = 1;
    if (c->leaf) {
        *cnt = n;
        return vals_sum(leaf_vals(t, c), n, 1, hi, lo);
    } else {
        const uint64_t *cn = inner_cnt(t, c);
        const double *ch = inner_hi(t, c), *cl = inner_lo(t, c);
        const uint8_t *ce = inner_ex(t, c);
        uint64_t s = 0;
        for (; i < n && ex; i++) {
            int a, b;
            s += cn[i];
            a = dd_step(&h, &l, ch[i]);     /* always both steps: no && */
            b = dd_step(&h, &l, cl[i]);
            ex = ce[i] & a & b;
        }
        for (; i < n; i++) {
            s += cn[i];
            dd_step_fast(&h, &l, ch[i]);
            dd_step_fast(&h, &l, cl[i]);
        }
        *cnt = s;
    }
    ex = dd_finish(&h, &l, ex);
    *hi = h;
    *lo = l;
    return ex;
}

/* A new empty leaf, or NULL. */
AGG_INTERN node *leaf_new(agg_tree *t)
{
    node *n = (node *)mem_alloc(t, t->leaf_bytes);
    if (n) {
        n->count = 0;
        n->leaf = 1;
        n->prev = n->next = NULL;
    }
    return n;
}

/* Insert (k, v) at pos of a leaf with room. */
AGG_INTERN void leaf_insert_at(const agg_tree *t, node *n, uint32_t pos, agg_key k,
                           double v)
{
    agg_key *keys = node_keys(n);
    double *vals = leaf_vals(t, n);
    uint32_t c = n->count;
    memmove(keys + pos + 1, keys + pos, (size_t)(c - pos) * sizeof *keys);
    memmove(vals + pos + 1, vals + pos, (size_t)(c - pos) * sizeof *vals);
    keys[pos] = k;
    vals[pos] = v;
    n->count = c + 1;
}

/* Remove the item at pos (its tail reference is the caller's business). */
AGG_INTERN void leaf_remove_at(const agg_tree *t, node *n, uint32_t pos)
{
    agg_key *keys = node_keys(n);
    double *vals = leaf_vals(t, n);
    uint32_t c = n->count;
    memmove(keys + pos, keys + pos + 1, (size_t)(c - pos - 1) * sizeof *keys);
    memmove(vals + pos, vals + pos + 1, (size_t)(c - pos - 1) * sizeof *vals);
    n->count = c - 1;
}

/* Move the last k items of src to the front of dst, its right neighbour
 * (dst must have room for them). */
AGG_INTERN void leaf_move_tail(const agg_tree *t, node *src, node *dst, uint32_t k)
{
    agg_key *sk = node_keys(src), *dk = node_keys(dst);
    double *sv = leaf_vals(t, src), *dv = leaf_vals(t, dst);
    uint32_t from = src->count - k;
    memmove(dk + k, dk, (size_t)dst->count * sizeof *dk);
    memmove(dv + k, dv, (size_t)dst->count * sizeof *dv);
    memcpy(dk, sk + from, (size_t)k * sizeof *dk);
    memcpy(dv, sv + from, (size_t)k * sizeof *dv);
    src->count -= k;
    dst->count += k;
}

/* Move the first k items of src to the end of dst, its left neighbour. */
AGG_INTERN void leaf_move_head(const agg_tree *t, node *src, node *dst, uint32_t k)
{
    agg_key *sk = node_keys(src), *dk = node_keys(dst);
    double *sv = leaf_vals(t, src), *dv = leaf_vals(t, dst);
    memcpy(dk + dst->count, sk, (size_t)k * sizeof *dk);
    memcpy(dv + dst->count, sv, (size_t)k * sizeof *dv);
    memmove(sk, sk + k, (size_t)(src->count - k) * sizeof *sk);
    memmove(sv, sv + k, (size_t)(src->count - k) * sizeof *sv);
    src->count -= k;
    dst->count += k;
}

/* Link leaf m into the chain right after leaf a. */
AGG_INTERN void leaf_link_after(agg_tree *t, node *a, node *m)
{
    (void)t;
    m->prev = a;
    m->next = a->next;
    if (a->next)
        a->next->prev = m;
    a->next = m;
}

/* Redistribute the items of m (2 or 3) consecutive sibling leaves g[0..m),
 * plus a new item (k, v) at position q of their concatenation, so that
 * leaf i ends up with tg[i] items (sum tg == items + 1, each <= cap).  A
 * fresh empty leaf may stand at g[1].  Items cross one boundary at a time,
 * left to right: with m == 3 the middle leaf is the empty new one, so the
 * left boundary only ever pushes into it and the right one only pulls from
 * g[2] into it - no leaf overflows on the way.  Returns the index of the
 * leaf that received the new item; *mv (may be NULL) describes what
 * crossed the first boundary. */
AGG_INTERN uint32_t leaves_rebalance_insert(const agg_tree *t, node **g, uint32_t m,
                                        const uint32_t *tg, uint32_t q, agg_key k,
                                        double v, moved *mv)
{
    uint32_t j = 0, pre = 0, b, ot[3], done = 0, want = 0;
    if (mv) {                   /* nothing crossed (m == 1, or equal counts) */
        mv->dir = 0;
        mv->exact = 1;
        mv->hi = mv->lo = 0.0;
    }
    while (q >= pre + tg[j]) {  /* leaf receiving the new item */
        pre += tg[j];
        j++;
    }
    for (b = 0; b < m; b++)
        ot[b] = tg[b] - (b == j);  /* targets for the old items */
    for (b = 0; b + 1 < m; b++) {
        uint32_t have = done + g[b]->count;  /* items in g[0..b] */
        want += ot[b];
        if (have > want) {
            if (b == 0 && mv) {
                mv->dir = 1;
                mv->exact = vals_sum(leaf_vals(t, g[0]) + g[0]->count - (have - want),
                                     have - want, 1, &mv->hi, &mv->lo);
            }
            leaf_move_tail(t, g[b], g[b + 1], have - want);
        } else if (have < want) {
            if (b == 0 && mv) {
                mv->dir = -1;
                mv->exact = vals_sum(leaf_vals(t, g[1]), want - have, 1, &mv->hi, &mv->lo);
            }
            leaf_move_head(t, g[b + 1], g[b], want - have);
        }
        done = want;
    }
    leaf_insert_at(t, g[j], q - pre, k, v);
    return j;
}

/* A new empty internal node (sep[0] zeroed), or NULL. */
AGG_INTERN node *inner_new(agg_tree *t)
{
    node *n = (node *)mem_alloc(t, t->inner_bytes);
    if (n) {
        n->count = 0;
        n->leaf = 0;
        n->prev = n->next = NULL;
        node_keys(n)[0].head = 0;
        node_keys(n)[0].rest = 0;
    }
    return n;
}

/* Move entries [from, from + k) of n to [to, to + k) (ranges may overlap). */
AGG_INTERN void inner_shift(const agg_tree *t, node *n, uint32_t from, uint32_t to,
                        uint32_t k)
{
    if (k == 0 || from == to)
        return;
    memmove(node_keys(n) + to, node_keys(n) + from, (size_t)k * sizeof(agg_key));
    memmove(inner_child(t, n) + to, inner_child(t, n) + from, (size_t)k * sizeof(node *));
    memmove(inner_cnt(t, n) + to, inner_cnt(t, n) + from, (size_t)k * sizeof(uint64_t));
    memmove(inner_hi(t, n) + to, inner_hi(t, n) + from, (size_t)k * sizeof(double));
    memmove(inner_lo(t, n) + to, inner_lo(t, n) + from, (size_t)k * sizeof(double));
    memmove(inner_ex(t, n) + to, inner_ex(t, n) + from, (size_t)k);
}

/* Copy entries [si, si + k) of src to [di, di + k) of dst (distinct nodes). */
static void inner_copy(const agg_tree *t, node *dst, uint32_t di, node *src,
                       uint32_t si, uint32_t k)
{
    if (k == 0)
        return;
    memcpy(node_keys(dst) + di, node_keys(src) + si, (size_t)k * sizeof(agg_key));
    memcpy(inner_child(t, dst) + di, inner_child(t, src) + si, (size_t)k * sizeof(node *));
    memcpy(inner_cnt(t, dst) + di, inner_cnt(t, src) + si, (size_t)k * sizeof(uint64_t));
    memcpy(inner_hi(t, dst) + di, inner_hi(t, src) + si, (size_t)k * sizeof(double));
    memcpy(inner_lo(t, dst) + di, inner_lo(t, src) + si, (size_t)k * sizeof(double));
    memcpy(inner_ex(t, dst) + di, inner_ex(t, src) + si, (size_t)k);
}

/* Write entry e at position pos of n. */
AGG_INTERN void inner_put(const agg_tree *t, node *n, uint32_t pos, const entry *e)
{
    node_keys(n)[pos] = e->sep;
    inner_child(t, n)[pos] = e->child;
    inner_cnt(t, n)[pos] = e->cnt;
    inner_hi(t, n)[pos] = e->hi;
    inner_lo(t, n)[pos] = e->lo;
    inner_ex(t, n)[pos] = e->exact;
}

/* Insert entry e at pos of n (n has room).  pos 0 writes e's separator into
 * the unused sep[0]: only inner_split_insert does that, and takes it out. */
AGG_INTERN void inner_insert_entry(const agg_tree *t, node *n, uint32_t pos,
                               const entry *e)
{
    inner_shift(t, n, pos, pos + 1, n->count - pos);
    inner_put(t, n, pos, e);
    n->count++;
}

/* Remove entry pos >= 1 of n (its separator's ownership is the caller's). */
AGG_INTERN void inner_remove_entry(const agg_tree *t, node *n, uint32_t pos)
{
    inner_shift(t, n, pos + 1, pos, n->count - pos - 1);
    n->count--;
}

/* Recompute entry j of p (count and sum) from its child. */
AGG_INTERN void inner_refresh(const agg_tree *t, node *p, uint32_t j)
{
    node *c = inner_child(t, p)[j];
    inner_ex(t, p)[j] = (uint8_t)node_summary(t, c, &inner_cnt(t, p)[j],
                                              &inner_hi(t, p)[j], &inner_lo(t, p)[j]);
}

/* Entry for node c with separator sep (whose reference the entry takes
 * over). */
AGG_INTERN entry entry_make(const agg_tree *t, node *c, agg_key sep)
{
    entry e;
    e.sep = sep;
    e.child = c;
    e.exact = (uint8_t)node_summary(t, c, &e.cnt, &e.hi, &e.lo);
    return e;
}

/* Entry j of p after its child gained (dcnt = +1) or lost (-1) one item or
 * changed a value (dcnt = 0), without changing shape: the sum changes by
 * xs[0] + ... + xs[nx-1].  Exact entries are updated in O(1) if the result
 * stays exact; otherwise the entry is recomputed from the child. */
AGG_INTERN void inner_bump(const agg_tree *t, node *p, uint32_t j, int dcnt,
                       const double *xs, int nx)
{
    uint8_t *ex = inner_ex(t, p);
    double *hi = inner_hi(t, p), *lo = inner_lo(t, p);
    inner_cnt(t, p)[j] += (uint64_t)(int64_t)dcnt;
    if (ex[j]) {
        double h = hi[j], l = lo[j];
        int k, ok = 1;
        for (k = 0; k < nx && ok; k++)
            ok = dd_add_exact(&h, &l, xs[k]);
        if (ok) {
            hi[j] = h;
            lo[j] = l;
            return;
        }
    }
    inner_refresh(t, p, j);
}

/* Replace separator j of p by key k (a stored key): reference the new
 * tail before releasing the old one. */
AGG_INTERN void inner_set_sep(agg_tree *t, node *p, uint32_t j, agg_key k)
{
    agg_key old = node_keys(p)[j];
    tail_ref(t, k);
    node_keys(p)[j] = k;
    tail_release(t, old);
}

/* The full node n (count == cap) gains entry e at position pos (1..cap):
 * n keeps the first a of the cap + 1 entries, the empty node r gets the
 * rest.  The separator that now divides n from r (the virtual sep[a]) is
 * returned in *up, its reference moving with it; r->sep[0] is re-zeroed. */
AGG_INTERN void inner_split_insert(const agg_tree *t, node *n, node *r, uint32_t pos,
                               const entry *e, uint32_t a, agg_key *up)
{
    uint32_t cap = t->cap;
    if (pos < a) {
        inner_copy(t, r, 0, n, a - 1, cap - a + 1);
        r->count = cap - a + 1;
        n->count = a - 1;
        inner_insert_entry(t, n, pos, e);
    } else {
        inner_copy(t, r, 0, n, a, cap - a);
        r->count = cap - a;
        n->count = a;
        inner_insert_entry(t, r, pos - a, e);
    }
    *up = node_keys(r)[0];
    node_keys(r)[0].head = 0;
    node_keys(r)[0].rest = 0;
}

/* Merge internal child j of p into child j - 1; p's separator j moves down
 * between them.  Frees child j and removes entry j. */
AGG_INTERN void inner_merge(agg_tree *t, node *p, uint32_t j)
{
    node *l = inner_child(t, p)[j - 1], *r = inner_child(t, p)[j];
    node_keys(r)[0] = node_keys(p)[j];
    inner_copy(t, l, l->count, r, 0, r->count);
    l->count += r->count;
    inner_remove_entry(t, p, j);
    mem_free(t, r, t->inner_bytes);
}

/* Move the last k entries of internal child j - 1 of p to the front of
 * child j, rotating separators through p's separator j. */
AGG_INTERN void inner_move_right(const agg_tree *t, node *p, uint32_t j, uint32_t k)
{
    node *l = inner_child(t, p)[j - 1], *r = inner_child(t, p)[j];
    node_keys(r)[0] = node_keys(p)[j];
    inner_shift(t, r, 0, k, r->count);
    inner_copy(t, r, 0, l, l->count - k, k);
    node_keys(p)[j] = node_keys(r)[0];
    node_keys(r)[0].head = 0;
    node_keys(r)[0].rest = 0;
    l->count -= k;
    r->count += k;
}

/* Move the first k entries of internal child j of p to the end of child
 * j - 1, rotating separators through p's separator j. */
AGG_INTERN void inner_move_left(const agg_tree *t, node *p, uint32_t j, uint32_t k)
{
    node *l = inner_child(t, p)[j - 1], *r = inner_child(t, p)[j];
    node_keys(r)[0] = node_keys(p)[j];
    inner_copy(t, l, l->count, r, 0, k);
    node_keys(p)[j] = node_keys(r)[k];
    inner_shift(t, r, k, 0, r->count - k);
    node_keys(r)[0].head = 0;
    node_keys(r)[0].rest = 0;
    l->count += k;
    r->count -= k;
}

/* Free a subtree: its nodes, and its references to tails. */
AGG_INTERN void node_free_rec(agg_tree *t, node *n)
{
    uint32_t i;
    if (n->leaf) {
        agg_key *keys = node_keys(n);
        if (t->mode == AGG_KEYS_GENERAL)
            for (i = 0; i < n->count; i++)
                tail_release(t, keys[i]);
        mem_free(t, n, t->leaf_bytes);
        return;
    }
    for (i = 0; i < n->count; i++) {
        if (i > 0)
            tail_release(t, node_keys(n)[i]);
        node_free_rec(t, inner_child(t, n)[i]);
    }
    mem_free(t, n, t->inner_bytes);
}
