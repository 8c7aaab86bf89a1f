/*
 * core/tree.c - the tree API one item at a time: life cycle, insert, delete, the
 * reads (get, rank, select, read, sum), and pack_span, the packing rule of
 * the bulk build (build.c) and of batch inserts.
 *
 * 6. Insert
 * ---------
 *  a. Descend recording path[] and idx[] (and which path nodes are
 *     rightmost).  Lower-bound in the leaf.  An equal key means DUPLICATE,
 *     or with overwrite a value change: a value change touches no
 *     structure and never allocates.
 *  b. PLAN.  If the leaf has room: a plain insert.  If it is full:
 *      - append pattern (rightmost leaf, key after its last): quick balance,
 *        a new right leaf with the new item alone;
 *      - else, if a sibling under the same parent has room (the emptier of
 *        the two): redistribute the two leaves' items plus the new one
 *        evenly between them, no new node (B*-style overflow);
 *      - else both siblings are full: a 2-to-3 split, the leaf, one full
 *        sibling and a new leaf between them share 2*cap+1 items evenly
 *        (each ~2/3 full);
 *      - a full root leaf splits 1-to-2 (quick balance if appending).
 *     Measured (cap 64, 1e6 random-order inserts, bytes/item): plain 1-to-2
 *     splitting 36.65; overflow into a sibling + 1-to-2 splits 29.46;
 *     overflow + 2-to-3 splits (this file) 29.15.  (Cap 16: 43.19, 35.64,
 *     35.01.)  Overflow is what meets the budget; 2-to-3 adds a little and
 *     costs nothing extra once the redistribution routine exists.
 *     Redistribution happens only between children of one parent, so only
 *     that parent's separators change.
 *     A split adds one entry to the parent; a full parent splits (1-to-2
 *     evenly, or quick balance if the entry is appended to a rightmost
 *     node); and so on up; a full root splits and a new root is made.  The
 *     plan knows exactly how many nodes: one leaf if the leaf level splits,
 *     one per consecutive full ancestor, one for a new root.
 *  c. RESERVE everything before touching the tree: the tail copy and those
 *     nodes.  If any allocation fails, free what was reserved and return
 *     AGG_NOMEM: the tree was never modified.  After this point nothing can
 *     fail.
 *  d. APPLY, bottom-up.  Leaf redistribution is one routine
 *     (leaves_rebalance_insert) that moves items across the boundaries of 2
 *     or 3 consecutive leaves to target counts and drops the new item where
 *     it belongs.  Separators of leaves whose first key changed are reset to
 *     that first key.  After an overflow into a sibling the two entries
 *     change by the exact sum of the few items that crossed (section 8),
 *     not by recomputing both leaves; after a split the entries concerned
 *     are recomputed and the new node's entry is inserted into the parent,
 *     splitting it if full, the pushed-up separator going to the
 *     grandparent, and so on.  Each path entry whose child did not change
 *     shape gets cnt + 1 and its sum + value.
 *
 * 7. Delete
 * ---------
 * Descend, lower-bound, AGG_MISSING if absent.  Remove the item, release
 * its tail reference (separators copying it keep theirs).  Bottom-up along
 * the path: if the child has fallen below min it is repaired with a sibling
 * under the same parent (the left one, or the right one for child 0): if
 * both fit in one node they merge (the right into the left; for internal
 * nodes the parent's separator between them moves down into the merged
 * node), otherwise they share their entries evenly (for internal nodes the
 * separators rotate through the parent).  Repaired entries are recomputed;
 * an untouched path entry gets cnt - 1 and its sum - value.  A root left
 * with one child is replaced by it; an empty root leaf is freed (depth 0,
 * nbytes 0).  Nothing here allocates, so delete cannot fail.
 *
 * (Section 9, the bulk build, is in build.c; pack_span, its packing rule,
 * shared with batch inserts, is here.)
 */
#include "internal.h"

/* ====================================================================== */
/*  Life cycle                                                          */
/* ====================================================================== */

/* See aggtree.h.  Computes the node layout (array offsets and sizes) for
 * this capacity once; the tree header is allocated through the failure
 * injector but not counted in nbytes. */
agg_status agg_tree_new(agg_tree **out, uint32_t node_size, agg_keymode mode)
{
    agg_tree *t;
    size_t cap = node_size, off;
    if (node_size < AGG_NODE_SIZE_MIN || node_size > AGG_NODE_SIZE_MAX ||
        (mode != AGG_KEYS_FAST && mode != AGG_KEYS_GENERAL))
        return AGG_INVALID;
    t = (agg_tree *)raw_alloc(sizeof *t);
    if (!t)
        return AGG_NOMEM;
    memset(t, 0, sizeof *t);
    t->mode = mode;
    t->cap = node_size;
    t->min = node_size / 2;
    t->off_vals = sizeof(node) + cap * sizeof(agg_key);
    t->leaf_bytes = t->off_vals + cap * sizeof(double);
    off = sizeof(node) + cap * sizeof(agg_key);
    t->off_child = off;
    off += cap * sizeof(node *);
    t->off_cnt = off;
    off += cap * sizeof(uint64_t);
    t->off_hi = off;
    off += cap * sizeof(double);
    t->off_lo = off;
    off += cap * sizeof(double);
    t->off_exact = off;
    off += cap;
    t->inner_bytes = (off + 7) & ~(size_t)7;
    *out = t;
    return AGG_OK;
}

/* See aggtree.h.  Frees every node and tail; never allocates. */
void agg_tree_clear(agg_tree *t)
{
    if (!t)
        return;
    /* every node lives in a pool chunk: a FAST tree (no tails) is freed
     * chunk by chunk without visiting its nodes */
    if (t->root && t->mode == AGG_KEYS_GENERAL)
        node_free_rec(t, t->root);
    else
        t->nbytes = 0;
    t->root = NULL;
    t->len = 0;
    t->depth = 0;
    pool_release(&t->pools[0]);
    pool_release(&t->pools[1]);
}

/* See aggtree.h.  The tree header itself is not counted in nbytes. */
void agg_tree_free(agg_tree *t)
{
    if (!t)
        return;
    agg_tree_clear(t);
    free(t);
}

/* O(1) accessors; see aggtree.h. */
uint64_t agg_tree_len(const agg_tree *t) { return t->len; }
agg_keymode agg_tree_mode(const agg_tree *t) { return t->mode; }
uint32_t agg_tree_node_size(const agg_tree *t) { return t->cap; }
uint32_t agg_tree_depth(const agg_tree *t) { return t->depth; }
size_t agg_tree_nbytes(const agg_tree *t) { return t->nbytes; }

/* ====================================================================== */
/*  Insert (section 6)                                                  */
/* ====================================================================== */

/* What the leaf level of an insert does (section 6b). */
enum { INS_PLAIN, INS_SHIFT, INS_SPLIT };

/* See aggtree.h and section 6.  On AGG_DUPLICATE *existed is 1 and
 * *old_value the present value, as for an overwrite.  Any status other
 * than AGG_OK leaves the tree untouched. */
agg_status agg_tree_insert(agg_tree *t, agg_key key, double value,
                           int overwrite, int *existed, double *old_value)
{
    node *path[MAX_DEPTH];       /* internal nodes from the root down */
    uint32_t idx[MAX_DEPTH];     /* child index taken at path[d] */
    uint8_t rmost[MAX_DEPTH];    /* path[d] is the last node of its level */
    node *res[MAX_DEPTH + 2];    /* reserved nodes: [0] leaf if any, then internal */
    uint32_t nres = 0, used = 0, depth, pos, cap = t->cap, i;
    node *n, *grp[3] = {NULL, NULL, NULL};
    uint32_t tg[3] = {0, 0, 0}, m = 0, q = 0, b = 0, need_inner = 0;
    int kind = INS_PLAIN, rm = 1, d, child_done, have_pend;
    agg_key stored;
    entry pend;
    uint32_t ppos = 0, cnt0, cnt1, recv;
    moved mv;

    if (existed)
        *existed = 0;
    key = key_normalize(t, key);

    if (!t->root) {
        node *leaf;
        if (!tail_copy(t, key, &stored))
            return AGG_NOMEM;
        leaf = leaf_new(t);
        if (!leaf) {
            tail_release(t, stored);
            return AGG_NOMEM;
        }
        leaf_insert_at(t, leaf, 0, stored, value);
        t->root = leaf;
        t->depth = 1;
        t->len = 1;
        return AGG_OK;
    }

    /* a. descend */
    depth = t->depth;
    n = t->root;
    d = 0;
    while (!n->leaf) {
        keys_prefetch(node_keys(n) + 1, n->count - 1);
        i = inner_find(t, n, key);
        path[d] = n;
        idx[d] = i;
        rmost[d] = (uint8_t)rm;
        rm = rm && i + 1 == n->count;
        n = inner_child(t, n)[i];
        d++;
    }
    keys_prefetch(node_keys(n), n->count);
    vals_prefetch(t, n);
    pos = leaf_count_lt(t, n, key);

    if (pos < n->count && key_cmp(t, node_keys(n)[pos], key) == 0) {
        double *vp = &leaf_vals(t, n)[pos], old = *vp, xs[2];
        if (existed)
            *existed = 1;
        if (old_value)
            *old_value = old;
        if (!overwrite)
            return AGG_DUPLICATE;
        if (memcmp(&old, &value, sizeof old) == 0)
            return AGG_OK;
        *vp = value;
        xs[0] = value;
        xs[1] = -old;
        for (d = (int)depth - 2; d >= 0; d--)
            inner_bump(t, path[d], idx[d], 0, xs, 2);
        return AGG_OK;
    }

    /* b. plan */
    if (n->count == cap) {
        if (depth == 1) {
            kind = INS_SPLIT;
            m = 2;
            grp[0] = n;
            q = pos;
            if (pos == cap) {
                tg[0] = cap;
                tg[1] = 1;
            } else {
                tg[0] = (cap + 2) / 2;
                tg[1] = (cap + 1) / 2;
            }
        } else {
            node *p = path[depth - 2];
            node **ch = inner_child(t, p);
            i = idx[depth - 2];
            if (rm && pos == cap) {
                kind = INS_SPLIT;       /* quick balance: append */
                m = 2;
                grp[0] = n;
                b = i;
                q = pos;
                tg[0] = cap;
                tg[1] = 1;
            } else {
                node *ls = i > 0 ? ch[i - 1] : NULL;
                node *rs = i + 1 < p->count ? ch[i + 1] : NULL;
                uint32_t lc = ls ? ls->count : cap, rc = rs ? rs->count : cap, tot;
                if (lc < cap && lc <= rc) {
                    kind = INS_SHIFT;
                    m = 2;
                    grp[0] = ls;
                    grp[1] = n;
                    b = i - 1;
                    q = lc + pos;
                    tot = lc + cap + 1;
                    tg[0] = (tot + 1) / 2;
                    tg[1] = tot - tg[0];
                } else if (rc < cap) {
                    kind = INS_SHIFT;
                    m = 2;
                    grp[0] = n;
                    grp[1] = rs;
                    b = i;
                    q = pos;
                    tot = cap + 1 + rc;
                    tg[0] = (tot + 1) / 2;
                    tg[1] = tot - tg[0];
                } else {
                    kind = INS_SPLIT;   /* 2-to-3 with a full sibling */
                    m = 3;
                    tot = 2 * cap + 1;
                    if (rs) {
                        grp[0] = n;
                        grp[2] = rs;
                        b = i;
                        q = pos;
                    } else {
                        grp[0] = ls;
                        grp[2] = n;
                        b = i - 1;
                        q = cap + pos;
                    }
                    tg[0] = tot / 3;
                    tg[1] = (tot - tg[0]) / 2;
                    tg[2] = tot - tg[0] - tg[1];
                }
            }
        }
        if (kind == INS_SPLIT) {
            if (depth == 1) {
                need_inner = 1;
            } else {
                for (d = (int)depth - 2; d >= 0; d--) {
                    if (path[d]->count < cap)
                        break;
                    need_inner++;
                    if (d == 0)
                        need_inner++;
                }
            }
        }
    }

    /* c. reserve */
    if (!tail_copy(t, key, &stored))
        return AGG_NOMEM;
    if (kind == INS_SPLIT) {
        if (!(res[nres] = leaf_new(t)))
            goto nomem;
        nres++;
        for (i = 0; i < need_inner; i++) {
            if (!(res[nres] = inner_new(t)))
                goto nomem;
            nres++;
        }
    }

    /* d. apply */
    t->len++;
    if (kind == INS_PLAIN) {
        leaf_insert_at(t, n, pos, stored, value);
        for (d = (int)depth - 2; d >= 0; d--)
            inner_bump1(t, path[d], idx[d], 1, value);
        return AGG_OK;
    }
    if (kind == INS_SPLIT) {
        grp[1] = res[used++];
        leaf_link_after(t, grp[0], grp[1]);
        cnt0 = cnt1 = 0;
    } else {
        cnt0 = grp[0]->count;
        cnt1 = grp[1]->count;
    }
    recv = leaves_rebalance_insert(t, grp, m, tg, q, stored, value, &mv);

    if (depth == 1) {           /* the root leaf split: new root */
        node *r = res[used++];
        agg_key up = node_keys(grp[1])[0];
        entry e0, e1;
        tail_ref(t, up);
        e0 = entry_make(t, grp[0], node_keys(r)[0]);
        e1 = entry_make(t, grp[1], up);
        inner_put(t, r, 0, &e0);
        inner_put(t, r, 1, &e1);
        r->count = 2;
        t->root = r;
        t->depth = 2;
        return AGG_OK;
    }

    {
        node *p = path[depth - 2];
        have_pend = 0;
        if (kind == INS_SHIFT) {
            /* the two entries change by the moved values' sum (and the new
             * value): O(moved) instead of recomputing both leaves */
            inner_set_sep(t, p, b + 1, node_keys(grp[1])[0]);
            if (mv.exact) {
                double x0[3], x1[3];
                int n0 = 0, n1 = 0;
                if (mv.dir) {
                    x0[n0++] = -mv.dir * mv.hi;
                    x0[n0++] = -mv.dir * mv.lo;
                    x1[n1++] = mv.dir * mv.hi;
                    x1[n1++] = mv.dir * mv.lo;
                }
                if (recv == 0)
                    x0[n0++] = value;
                else
                    x1[n1++] = value;
                inner_bump(t, p, b, (int)grp[0]->count - (int)cnt0, x0, n0);
                inner_bump(t, p, b + 1, (int)grp[1]->count - (int)cnt1, x1, n1);
            } else {
                inner_refresh(t, p, b);
                inner_refresh(t, p, b + 1);
            }
        } else {
            agg_key s = node_keys(grp[1])[0];
            if (m == 3) {
                inner_set_sep(t, p, b + 1, node_keys(grp[2])[0]);
                inner_refresh(t, p, b + 1);
            }
            inner_refresh(t, p, b);
            tail_ref(t, s);
            pend = entry_make(t, grp[1], s);
            ppos = b + 1;
            have_pend = 1;
        }
    }
    child_done = 1;
    for (d = (int)depth - 2; d >= 0; d--) {
        node *p = path[d], *r;
        agg_key up;
        uint32_t a;
        if (!child_done)
            inner_bump1(t, p, idx[d], 1, value);
        child_done = 0;
        if (!have_pend)
            continue;
        if (p->count < cap) {
            inner_insert_entry(t, p, ppos, &pend);
            have_pend = 0;
            continue;
        }
        r = res[used++];
        a = (rmost[d] && ppos == cap) ? cap - 1 : (cap + 2) / 2;
        inner_split_insert(t, p, r, ppos, &pend, a, &up);
        if (d == 0) {           /* the root split: new root */
            node *nr = res[used++];
            entry e0 = entry_make(t, p, node_keys(nr)[0]);
            entry e1 = entry_make(t, r, up);
            inner_put(t, nr, 0, &e0);
            inner_put(t, nr, 1, &e1);
            nr->count = 2;
            t->root = nr;
            t->depth++;
            have_pend = 0;
            break;
        }
        inner_refresh(t, path[d - 1], idx[d - 1]);
        pend = entry_make(t, r, up);
        ppos = idx[d - 1] + 1;
        child_done = 1;
    }
    /* the plan is exact; free anything unused all the same */
    while (used < nres) {
        node *x = res[used++];
        mem_free(t, x, x->leaf ? t->leaf_bytes : t->inner_bytes);
    }
    return AGG_OK;

nomem:
    while (nres > 0) {
        node *x = res[--nres];
        mem_free(t, x, x->leaf ? t->leaf_bytes : t->inner_bytes);
    }
    tail_release(t, stored);
    return AGG_NOMEM;
}

/* ====================================================================== */
/*  Delete (section 7)                                                  */
/* ====================================================================== */

/* Child i of p has fallen below min: merge it with a sibling under p (the
 * left one, or the right one for child 0) if both fit in one node, else
 * share their entries evenly.  Recomputes the entries concerned. */
AGG_INTERN void node_repair(agg_tree *t, node *p, uint32_t i)
{
    uint32_t j = i > 0 ? i : 1;
    node **ch = inner_child(t, p);
    node *l = ch[j - 1], *r = ch[j];
    uint32_t total = l->count + r->count;
    if (total <= t->cap) {
        if (l->leaf) {
            leaf_move_head(t, r, l, r->count);
            l->next = r->next;
            if (r->next)
                r->next->prev = l;
            tail_release(t, node_keys(p)[j]);
            inner_remove_entry(t, p, j);
            mem_free(t, r, t->leaf_bytes);
        } else {
            inner_merge(t, p, j);
        }
        inner_refresh(t, p, j - 1);
    } else {
        uint32_t tl = (total + 1) / 2;
        if (l->leaf) {
            if (l->count > tl)
                leaf_move_tail(t, l, r, l->count - tl);
            else
                leaf_move_head(t, r, l, tl - l->count);
            inner_set_sep(t, p, j, node_keys(r)[0]);
        } else if (l->count > tl) {
            inner_move_right(t, p, j, l->count - tl);
        } else {
            inner_move_left(t, p, j, tl - l->count);
        }
        inner_refresh(t, p, j - 1);
        inner_refresh(t, p, j);
    }
}

/* After a delete: a root left with one child is replaced by it (depth - 1);
 * an empty root leaf is freed (depth 0).  Frees, never allocates. */
AGG_INTERN void root_collapse(agg_tree *t)
{
    node *n = t->root;
    if (!n)
        return;
    if (!n->leaf && n->count == 1) {
        t->root = inner_child(t, n)[0];
        mem_free(t, n, t->inner_bytes);
        t->depth--;
    } else if (n->leaf && n->count == 0) {
        mem_free(t, n, t->leaf_bytes);
        t->root = NULL;
        t->depth = 0;
    }
}

/* See aggtree.h and section 7.  Never allocates. */
agg_status agg_tree_delete(agg_tree *t, agg_key key, double *old_value)
{
    node *path[MAX_DEPTH];
    uint32_t idx[MAX_DEPTH], pos, i;
    node *n;
    int d;
    double v, negv;
    agg_key k;

    key = key_normalize(t, key);
    if (!t->root)
        return AGG_MISSING;
    n = t->root;
    d = 0;
    while (!n->leaf) {
        keys_prefetch(node_keys(n) + 1, n->count - 1);
        i = inner_find(t, n, key);
        path[d] = n;
        idx[d] = i;
        n = inner_child(t, n)[i];
        d++;
    }
    keys_prefetch(node_keys(n), n->count);
    vals_prefetch(t, n);
    pos = leaf_count_lt(t, n, key);
    if (pos >= n->count || key_cmp(t, node_keys(n)[pos], key) != 0)
        return AGG_MISSING;

    k = node_keys(n)[pos];
    v = leaf_vals(t, n)[pos];
    if (old_value)
        *old_value = v;
    leaf_remove_at(t, n, pos);
    tail_release(t, k);
    t->len--;

    negv = -v;
    for (d = (int)t->depth - 2; d >= 0; d--) {
        node *p = path[d];
        node *c = inner_child(t, p)[idx[d]];
        if (c->count >= t->min)
            inner_bump1(t, p, idx[d], -1, negv);
        else
            node_repair(t, p, idx[d]);
    }
    root_collapse(t);
    return AGG_OK;
}

/* ====================================================================== */
/*  Reads (section 5)                                                   */
/* ====================================================================== */

int agg_tree_get(const agg_tree *t, agg_key key, double *value)
{
    node *n = t->root;
    uint32_t pos;
    if (!n)
        return 0;
    key = key_normalize(t, key);
    while (!n->leaf) {
        keys_prefetch(node_keys(n) + 1, n->count - 1);
        n = inner_child(t, n)[inner_find(t, n, key)];
    }
    keys_prefetch(node_keys(n), n->count);
    vals_prefetch(t, n);
    pos = leaf_count_lt(t, n, key);
    if (pos >= n->count || key_cmp(t, node_keys(n)[pos], key) != 0)
        return 0;
    if (value)
        *value = leaf_vals(t, n)[pos];
    return 1;
}

/* Sum of cnt[0..i) of an internal node holding `total` items: summed from
 * whichever end is nearer. */
AGG_INLINE uint64_t cnt_prefix(const agg_tree *t, node *n, uint32_t i, uint64_t total)
{
    const uint64_t *c = inner_cnt(t, n);
    uint64_t s = 0;
    uint32_t j;
    if (2 * i <= n->count) {
        for (j = 0; j < i; j++)
            s += c[j];
        return s;
    }
    for (j = i; j < n->count; j++)
        s += c[j];
    return total - s;
}

/* Descend to the leaf where key belongs; *base = items in earlier leaves. */
AGG_INLINE node *leaf_for_key(const agg_tree *t, agg_key key, uint64_t *base)
{
    node *n = t->root;
    uint64_t r = 0, total = t->len;
    while (!n->leaf) {
        uint32_t i;
        keys_prefetch(node_keys(n) + 1, n->count - 1);
        cnt_prefetch(t, n);
        i = inner_find(t, n, key);
        r += cnt_prefix(t, n, i, total);
        total = inner_cnt(t, n)[i];
        n = inner_child(t, n)[i];
    }
    keys_prefetch(node_keys(n), n->count);
    *base = r;
    return n;
}

/* See aggtree.h and section 5. */
uint64_t agg_tree_rank(const agg_tree *t, agg_key key, int after)
{
    uint64_t base;
    node *n;
    if (!t->root)
        return 0;
    key = key_normalize(t, key);
    n = leaf_for_key(t, key, &base);
    return base + (after ? leaf_count_le(t, n, key) : leaf_count_lt(t, n, key));
}

/* See aggtree.h.  The two descents run in lockstep: at every level both
 * nodes' arrays are prefetched before either is searched, and both child
 * headers before the next level, so the cache misses of the two paths
 * overlap instead of adding up (a range count's two ranks cost little more
 * than one on a tree that does not fit in cache).  Paths have equal length
 * since every leaf is at the same depth. */
void agg_tree_rank2(const agg_tree *t, agg_key k1, int after1, agg_key k2,
                    int after2, uint64_t *r1, uint64_t *r2)
{
    node *a, *b;
    uint64_t ra = 0, rb = 0, ta, tb;
    if (!t->root) {
        *r1 = *r2 = 0;
        return;
    }
    k1 = key_normalize(t, k1);
    k2 = key_normalize(t, k2);
    a = b = t->root;
    ta = tb = t->len;
    while (!a->leaf) {
        uint32_t i, j;
        keys_prefetch(node_keys(a) + 1, a->count - 1);
        cnt_prefetch(t, a);
        if (b != a) {
            keys_prefetch(node_keys(b) + 1, b->count - 1);
            cnt_prefetch(t, b);
        }
        i = inner_find(t, a, k1);
        j = inner_find(t, b, k2);
        ra += cnt_prefix(t, a, i, ta);
        rb += cnt_prefix(t, b, j, tb);
        ta = inner_cnt(t, a)[i];
        tb = inner_cnt(t, b)[j];
        a = inner_child(t, a)[i];
        b = inner_child(t, b)[j];
        __builtin_prefetch(a);
        __builtin_prefetch(b);
    }
    keys_prefetch(node_keys(a), a->count);
    if (b != a)
        keys_prefetch(node_keys(b), b->count);
    *r1 = ra + (after1 ? leaf_count_le(t, a, k1) : leaf_count_lt(t, a, k1));
    *r2 = rb + (after2 ? leaf_count_le(t, b, k2) : leaf_count_lt(t, b, k2));
}

/* key lies in leaf n's key interval [n's first key, next leaf's first key)
 * (unbounded at the ends of the chain); then the answer for key is the
 * leaf's base rank plus a search in the leaf. */
AGG_INLINE int leaf_covers(const agg_tree *t, node *n, agg_key key)
{
    return (!n->prev || key_cmp(t, node_keys(n)[0], key) <= 0) &&
           (!n->next || key_cmp(t, key, node_keys(n->next)[0]) < 0);
}

/* See aggtree.h.  Reuses the previous answer's leaf when the next key
 * falls in it or the next leaf (section 5); correct for any order.  Reads
 * only: safe to run concurrently with other readers. */
void agg_tree_rank_many(const agg_tree *t, const agg_key *keys, uint64_t n,
                        int after, uint64_t *out)
{
    node *leaf = NULL;
    uint64_t base = 0, i;
    if (!t->root) {
        for (i = 0; i < n; i++)
            out[i] = 0;
        return;
    }
    for (i = 0; i < n; i++) {
        agg_key k = key_normalize(t, keys[i]);
        if (leaf && leaf_covers(t, leaf, k)) {
            /* same leaf as before */
        } else if (leaf && leaf->next && leaf_covers(t, leaf->next, k)) {
            base += leaf->count;
            leaf = leaf->next;
        } else {
            leaf = leaf_for_key(t, k, &base);
        }
        out[i] = base + (after ? leaf_count_le(t, leaf, k) : leaf_count_lt(t, leaf, k));
    }
}

/* The leaf holding item `index` (< len) and the item's position in it.
 * Each node's counts are scanned from the nearer end. */
static node *leaf_at(const agg_tree *t, uint64_t index, uint32_t *pos)
{
    node *n = t->root;
    uint64_t total = t->len;
    while (!n->leaf) {
        const uint64_t *c = inner_cnt(t, n);
        uint32_t j;
        cnt_prefetch(t, n);
        if (2 * index < total) {
            j = 0;
            while (index >= c[j]) {
                index -= c[j];
                j++;
            }
        } else {
            uint64_t after = total - index;   /* items at or after index, >= 1 */
            j = n->count - 1;
            while (after > c[j]) {
                after -= c[j];
                j--;
            }
            index = c[j] - after;
        }
        total = c[j];
        n = inner_child(t, n)[j];
    }
    *pos = (uint32_t)index;
    return n;
}

/* See aggtree.h.  The key's tail is borrowed from the tree. */
agg_status agg_tree_select(const agg_tree *t, uint64_t index, agg_key *key,
                           double *value)
{
    node *n;
    uint32_t pos;
    if (index >= t->len)
        return AGG_RANGE;
    n = leaf_at(t, index, &pos);
    if (key)
        *key = node_keys(n)[pos];
    if (value)
        *value = leaf_vals(t, n)[pos];
    return AGG_OK;
}

/* See aggtree.h.  One select, then the leaf chain. */
uint64_t agg_tree_read(const agg_tree *t, uint64_t index, uint64_t max,
                       int descending, agg_key *keys, double *values)
{
    node *n;
    uint32_t pos;
    uint64_t want, got = 0;
    if (index >= t->len || max == 0)
        return 0;
    want = descending ? index + 1 : t->len - index;
    if (want > max)
        want = max;
    n = leaf_at(t, index, &pos);
    if (!descending) {
        while (got < want) {
            uint64_t k = n->count - pos;
            if (k > want - got)
                k = want - got;
            if (keys)
                memcpy(keys + got, node_keys(n) + pos, (size_t)k * sizeof *keys);
            if (values)
                memcpy(values + got, leaf_vals(t, n) + pos, (size_t)k * sizeof *values);
            got += k;
            n = n->next;
            pos = 0;
        }
    } else {
        while (got < want) {
            const agg_key *nk = node_keys(n);
            const double *nv = leaf_vals(t, n);
            int64_t j = pos;
            for (; j >= 0 && got < want; j--, got++) {
                if (keys)
                    keys[got] = nk[j];
                if (values)
                    values[got] = nv[j];
            }
            n = n->prev;
            if (n)
                pos = n->count - 1;
        }
    }
    return got;
}

/* Double-double accumulator of sum(). */
typedef struct ddacc {
    double hi;                   /* running rounded sum */
    double lo;                   /* accumulated rounding errors */
} ddacc;

/* a += x (TwoSum into hi, its error into lo). */
AGG_INLINE void acc_add(ddacc *a, double x)
{
    dd_step_fast(&a->hi, &a->lo, x);
}

/* Add entry j of internal node n (a whole child) to the accumulator.  The
 * low part goes straight into a->lo: it is below half an ulp of the high
 * part, so rounding it there costs ~u^2 relative, the double-double error
 * class of the whole sum (and integer sums stay exact). */
AGG_INLINE void acc_entry(const agg_tree *t, node *n, uint32_t j, ddacc *a)
{
    acc_add(a, inner_hi(t, n)[j]);
    a->lo += inner_lo(t, n)[j];
}

/* Add values [from, to) of leaf n. */
static void acc_leaf(const agg_tree *t, node *n, uint32_t from, uint32_t to,
                     ddacc *a)
{
    const double *v = leaf_vals(t, n);
    uint32_t i;
    for (i = from; i < to; i++)
        acc_add(a, v[i]);
}

/* Add the first h items of subtree n, 0 < h < items(n). */
static void sum_prefix(const agg_tree *t, node *n, uint64_t h, ddacc *a)
{
    while (!n->leaf) {
        const uint64_t *c = inner_cnt(t, n);
        uint32_t j = 0;
        while (h >= c[j]) {
            acc_entry(t, n, j, a);
            h -= c[j];
            j++;
        }
        if (h == 0)
            return;
        n = inner_child(t, n)[j];
    }
    acc_leaf(t, n, 0, (uint32_t)h, a);
}

/* Add the items of subtree n from the l-th on, 0 < l < items(n). */
static void sum_suffix(const agg_tree *t, node *n, uint64_t l, ddacc *a)
{
    while (!n->leaf) {
        const uint64_t *c = inner_cnt(t, n);
        uint32_t j = 0, k;
        while (l >= c[j]) {
            l -= c[j];
            j++;
        }
        for (k = j + 1; k < n->count; k++)
            acc_entry(t, n, k, a);
        if (l == 0) {
            acc_entry(t, n, j, a);
            return;
        }
        n = inner_child(t, n)[j];
    }
    acc_leaf(t, n, (uint32_t)l, n->count, a);
}

/* See aggtree.h and section 5: walk the two boundary paths adding whole
 * children in between; hi is clamped to len; lo >= hi gives 0.0 with no
 * arithmetic at all. */
double agg_tree_sum(const agg_tree *t, uint64_t lo, uint64_t hi)
{
    ddacc a = {0.0, 0.0};
    node *n = t->root;
    if (hi > t->len)
        hi = t->len;
    if (lo >= hi || !n)
        return 0.0;
    while (!n->leaf) {
        const uint64_t *c = inner_cnt(t, n);
        uint32_t j = 0;
        while (lo >= c[j]) {
            lo -= c[j];
            hi -= c[j];
            j++;
        }
        if (hi <= c[j]) {       /* [lo, hi) inside child j */
            if (lo == 0 && hi == c[j]) {
                acc_entry(t, n, j, &a);
                return a.hi + a.lo;
            }
            n = inner_child(t, n)[j];
            continue;
        }
        /* the range splits here: left boundary child j ... */
        if (lo == 0)
            acc_entry(t, n, j, &a);
        else
            sum_suffix(t, inner_child(t, n)[j], lo, &a);
        hi -= c[j];
        j++;
        /* ... whole children, then the right boundary */
        while (hi > 0) {
            if (hi >= c[j]) {
                acc_entry(t, n, j, &a);
                hi -= c[j];
                j++;
            } else {
                sum_prefix(t, inner_child(t, n)[j], hi, &a);
                break;
            }
        }
        return a.hi + a.lo;
    }
    acc_leaf(t, n, (uint32_t)lo, (uint32_t)hi, &a);
    return a.hi + a.lo;
}

/* ====================================================================== */
/*  Packing rule (sections 9 and 13)                                    */
/* ====================================================================== */

/* The packing rule of a level cut into nodes (the bulk build, and batch
 * inserts where a node overflows): size and first position of node i of
 * the s nodes sharing e entries.  `full` (the nodes end their level, as in
 * a bulk build): cap each, the last taking the rest, at least 2 (an
 * internal node on the rightmost path needs 2 children: [.., cap - 1, 2]);
 * otherwise the entries are shared evenly (each >= min). */
AGG_INTERN void pack_span(uint64_t e, uint64_t s, uint64_t i, int full, uint32_t cap,
                          uint64_t *base, uint32_t *size)
{
    if (s == 1) {
        *base = 0;
        *size = (uint32_t)e;
    } else if (full) {
        uint64_t last = e - (s - 1) * cap;
        *base = i * cap;
        *size = cap;
        if (last == 1) {            /* [.., cap - 1, 2] */
            if (i + 2 == s)
                *size = cap - 1;
            else if (i + 1 == s) {
                *base = i * cap - 1;
                *size = 2;
            }
        } else if (i + 1 == s) {
            *size = (uint32_t)last;
        }
    } else {
        uint64_t f = e / s, r = e % s;
        *base = i * f + (i < r ? i : r);
        *size = (uint32_t)(f + (i < r));
    }
}
