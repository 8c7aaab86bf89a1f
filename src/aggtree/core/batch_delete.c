/*
 * core/batch_delete.c - agg_tree_delete_sorted: a sorted run of keys deleted in one
 * ordered walk (check, compaction, path repair; two threads for large runs).
 *
 * 13. Batch insert and delete of a sorted run (continued from batch_insert.c)
 * ---------------------------------------------------------------------------
 * agg_tree_delete_sorted.  The same check (route + search, with a small
 * ring of groups so that the leaves are prefetched) reports the first
 * absent key before anything changes; from BATCH_THREAD_MIN keys it is cut
 * in two at the middle key and run on two threads (dels_check_split: it
 * only reads, so any cut will do; the parts are claimed from a counter
 * as in run_parts, and the first part's absent key wins).  Then per
 * leaf: its keys are removed in one compaction pass (dels_compact).  If it
 * keeps its minimum fill, only the parent's entry is updated, the path
 * above accumulating as for inserts; a leaf that falls below it first
 * brings every entry on the path up to date, and then the path is
 * repaired bottom-up as agg_tree_delete does for one key, for all the
 * leaf's keys at once (dels_repair_path: a child below min is merged with
 * a sibling or evened out against it, which leaves both >= min whatever
 * the deficit; an untouched entry drops by the leaf's count and sum),
 * after which the walk restarts from the root.  (It used to call
 * agg_tree_delete key by key for such a leaf: deleting a contiguous range
 * of 100,000 keys from a bulk-built 1,000,000, where every leaf empties,
 * took ~104 ns/key; it now takes ~32, as much as every third key of a
 * range does.)  A root that is a leaf and would be emptied goes key by
 * key (agg_tree_delete frees it).
 * Two threads (FAST keys, depth >= 3, from BATCH_THREAD_MIN keys):
 * the compaction pass is cut into up to 16 pieces at leaf parent
 * boundaries (DEL_PIECES), taken in turn by the caller and a helper
 * (dels_apply_pieces).  A piece compacts its leaves and updates their
 * entries in their leaf parents, which no other piece touches; it
 * records, per leaf parent, the count and exact sum its leaves lost, and
 * per leaf left below its minimum fill the index of one of its keys.
 * Then, on the caller: each leaf parent's change goes up its path (a
 * descent by the recorded key: the structure has not changed yet), and
 * each underfull leaf is repaired by a descent with its key and a
 * bottom-up walk that repairs every node below min on the way (merges
 * only ever make a node on the walk's own path underfull, and a merge
 * with a not yet repaired neighbour is found again by that neighbour's
 * walk, since its key routes into the merged node), refreshing the
 * inexact entries above a repair (a repair keeps a node's total but not
 * the bits of its inexact summary); a root left with one child is
 * replaced by it, an empty root leaf freed.  The records are one optional
 * allocation: without it the one-thread pass runs.
 * Measured (the insert/delete driver of "Two threads": 100,000 random keys
 * out of 1,000,000, best of 40, ns/key): before, ~78-83 on either thread
 * count (one thread ~73-80 now); check on two threads ~59-61; check and
 * compaction on two threads ~37-39.  A batch of random keys rarely
 * empties a leaf: 0.45% of the groups in that run.
 * It allocates at most the temporaries above, used to prefetch and to
 * cut the work (without them it runs slower), so like agg_tree_delete it
 * cannot fail.
 */
#include "internal.h"

/* One leaf's share of a batch delete's check. */
typedef struct dgroup {
    node *leaf;                  /* the leaf */
    uint64_t start;              /* first key */
    uint64_t k;                  /* how many */
} dgroup;

/* Every key of the group is in its leaf?  *missing = the first that is
 * not. */
static int dgroup_present(const agg_tree *t, const agg_key *keys, const dgroup *g,
                          uint64_t *missing)
{
    const agg_key *lk = node_keys(g->leaf);
    uint32_t lo = 0, cnt = g->leaf->count;
    uint64_t i;
    if (t->mode == AGG_KEYS_FAST) {
        /* as search_group: independent branch-free searches */
        for (i = g->start; i < g->start + g->k; i++) {
            uint32_t p = fast_count(lk, cnt, keys[i], 0, 1);
            if (p >= cnt || lk[p].head != keys[i].head || lk[p].rest != keys[i].rest) {
                *missing = i;
                return 0;
            }
        }
        return 1;
    }
    for (i = g->start; i < g->start + g->k; i++) {
        agg_key k = key_normalize(t, keys[i]);
        uint32_t p = lo + general_count_lt(lk + lo, cnt - lo, k);
        if (p >= cnt || key_cmp(t, lk[p], k) != 0) {
            *missing = i;
            return 0;
        }
        lo = p + 1;
    }
    return 1;
}

#define DEL_RING 4               /* groups in flight in the delete check */

/* Check of a batch delete (reads only): route the keys to their leaves
 * and search each group DEL_RING groups later, its leaf prefetched
 * meanwhile; leaves and gfirst (both NULL, or room for n each) receive
 * the groups' leaves and first key indexes.  AGG_OK or AGG_MISSING (first
 * absent key). */
static agg_status dels_check(const agg_tree *t, const agg_key *keys, uint64_t n,
                             uint64_t *bad_index, node **leaves, uint64_t *gfirst,
                             uint64_t *ngroups)
{
    finger f;
    dgroup ring[DEL_RING];
    uint64_t made = 0, done = 0, i, gs = 0, miss = 0;
    int D = (int)t->depth;
    if (!t->root) {
        if (bad_index)
            *bad_index = 0;
        return AGG_MISSING;
    }
    f.path[0] = t->root;
    f.hn[0] = NULL;
    f.hs[0] = 0;
    finger_descend(t, &f, 0, key_normalize(t, keys[0]), 0);
    for (i = 1; i <= n; i++) {
        agg_key k;
        int d;
        if (i < n) {
            k = key_normalize(t, keys[i]);
            if (D == 1 || !f.hn[D - 1] || key_lt(t, k, node_keys(f.hn[D - 1])[f.hs[D - 1]]))
                continue;
        }
        if (made - done == DEL_RING) {
            if (!dgroup_present(t, keys, &ring[done % DEL_RING], &miss))
                goto missing;
            done++;
        }
        ring[made % DEL_RING].leaf = f.path[D - 1];
        ring[made % DEL_RING].start = gs;
        ring[made % DEL_RING].k = i - gs;
        leaf_prefetch_all(t, f.path[D - 1], 0);
        if (leaves) {
            leaves[made] = f.path[D - 1];
            gfirst[made] = gs;
        }
        made++;
        if (i == n)
            break;
        d = finger_level(t, &f, D - 2, k);
        finger_descend(t, &f, d, k, 1);
        gs = i;
    }
    for (; done < made; done++)
        if (!dgroup_present(t, keys, &ring[done % DEL_RING], &miss))
            goto missing;
    *ngroups = made;
    return AGG_OK;
missing:
    if (bad_index)
        *bad_index = miss;
    return AGG_MISSING;
}

/* The delete check cut in two at the middle key (any cut will do: it only
 * reads), for two threads: each part routes and searches its own keys and
 * writes its own groups' leaves (part 1 from leaves + cut on, moved down
 * after both are done). */
typedef struct dcheck {
    const agg_tree *t;
    const agg_key *keys;
    uint64_t n, cut;
    node **leaves;
    uint64_t *gfirst;
    uint64_t ng[2], bad[2];
    agg_status st[2];
} dcheck;

static uint64_t dcheck_part(void *ctx, int p, int w)
{
    dcheck *c = (dcheck *)ctx;
    uint64_t lo = p ? c->cut : 0, hi = p ? c->n : c->cut;
    (void)w;
    c->st[p] = dels_check(c->t, c->keys + lo, hi - lo, &c->bad[p],
                          c->leaves ? c->leaves + lo : NULL,
                          c->leaves ? c->gfirst + lo : NULL, &c->ng[p]);
    return UINT64_MAX;
}

/* dels_check of keys[0..n) in two parts, on a helper thread too if
 * threads == 1 (2: both parts on this thread, a test mode).  The first
 * absent key in key order is reported, as by one dels_check. */
static agg_status dels_check_split(const agg_tree *t, const agg_key *keys, uint64_t n,
                                   uint64_t *bad_index, node **leaves, uint64_t *gfirst,
                                   uint64_t *ngroups, int threads)
{
    dcheck c;
    uint64_t g;
    int p;
    c.t = t;
    c.keys = keys;
    c.n = n;
    c.cut = n / 2;
    c.leaves = leaves;
    c.gfirst = gfirst;
    run_parts(&c, dcheck_part, 2, threads);
    for (p = 0; p < 2; p++)
        if (c.st[p] != AGG_OK) {
            if (bad_index)
                *bad_index = c.bad[p] + (p ? c.cut : 0);
            return c.st[p];
        }
    if (leaves) {
        memmove(leaves + c.ng[0], leaves + c.cut, c.ng[1] * sizeof *leaves);
        for (g = 0; g < c.ng[1]; g++)
            gfirst[c.ng[0] + g] = gfirst[c.cut + g] + c.cut;
    }
    *ngroups = c.ng[0] + c.ng[1];
    return AGG_OK;
}

/* Apply the accumulated change of path node `lev` to its entry in its
 * parent and pass it up. */
static void dels_flush(agg_tree *t, finger *f, uint64_t *dcnt, ddsum *dsum, int lev)
{
    if (lev > 0) {
        node *p = f->path[lev - 1];
        uint32_t j = f->idx[lev - 1];
        if (dcnt[lev])
            entry_apply(t, p, j, inner_cnt(t, p)[j] - dcnt[lev], &dsum[lev]);
        dcnt[lev - 1] += dcnt[lev];
        dds_add(&dsum[lev - 1], dsum[lev].hi, dsum[lev].lo, dsum[lev].exact, 0);
    }
    dcnt[lev] = 0;
    dds_zero(&dsum[lev]);
}

/* dels_compact's work for FAST keys, without touching the tree (no tails,
 * no t->len: safe on a second thread; the caller accounts for the
 * length). */
static uint32_t dels_compact_fast(const agg_tree *t, node *lf, const agg_key *keys,
                                  uint64_t i, uint64_t j, ddsum *neg)
{
    agg_key *lk = node_keys(lf);
    double *lv = leaf_vals(t, lf);
    uint32_t cnt = lf->count, r, w;
    uint64_t q = i;
    ddsum gone;
    dds_zero(&gone);
    r = fast_count(lk, cnt, keys[i], 0, 1);
    for (w = r; r < cnt; r++) {
        if (q < j && lk[r].head == keys[q].head && lk[r].rest == keys[q].rest) {
            dds_add(&gone, lv[r], 0.0, 1, 0);
            q++;
        } else {
            lk[w] = lk[r];
            lv[w] = lv[r];
            w++;
        }
    }
    lf->count = w;
    *neg = gone;
    neg->hi = -gone.hi;
    neg->lo = -gone.lo;
    return w;
}

/* Remove the keys [i, j) of a delete batch (all present, the first being
 * k = keys[i] normalized) from leaf lf in one compaction pass, releasing
 * their tails; t->len drops by j - i.  *neg = minus the exact sum of the
 * values removed.  Returns the leaf's new count. */
static uint32_t dels_compact(agg_tree *t, node *lf, const agg_key *keys, uint64_t i,
                             uint64_t j, agg_key k, ddsum *neg)
{
    agg_key *lk = node_keys(lf);
    double *lv = leaf_vals(t, lf);
    uint32_t cnt = lf->count, r, w;
    uint64_t q = i;
    ddsum gone;
    if (t->mode == AGG_KEYS_FAST) {
        t->len -= j - i;
        return dels_compact_fast(t, lf, keys, i, j, neg);
    }
    dds_zero(&gone);
    r = leaf_count_lt(t, lf, k);
    for (w = r; r < cnt; r++) {
        if (q < j && key_cmp(t, lk[r], key_normalize(t, keys[q])) == 0) {
            dds_add(&gone, lv[r], 0.0, 1, 0);
            tail_release(t, lk[r]);
            q++;
        } else {
            lk[w] = lk[r];
            lv[w] = lv[r];
            w++;
        }
    }
    lf->count = w;
    t->len -= j - i;
    *neg = gone;
    neg->hi = -gone.hi;
    neg->lo = -gone.lo;
    return w;
}

/* After dels_compact took kk items (sum -neg) out of the leaf at the end
 * of finger f's path, every entry above it being up to date otherwise:
 * bottom-up, a child still at or above min gets its entry's count - kk
 * and sum + neg; a child below min (the leaf, or a node that lost a child
 * to a merge below) is repaired against a sibling (node_repair: merged if
 * both fit in one node, else evened out, each then >= min whatever the
 * deficit); a root left with one child is replaced by it.  The same walk
 * as agg_tree_delete's, for kk items at once (kk = 0, neg = 0 after the
 * two-thread pass has already updated every entry: then an untouched
 * exact entry stays as it is and an inexact one is recomputed, which a
 * repair below may have made necessary).  Frees only children of path
 * nodes, so the path above stays valid while it runs. */
static void dels_repair_path(agg_tree *t, finger *f, int D, uint64_t kk, const ddsum *neg)
{
    int d;
    for (d = D - 2; d >= 0; d--) {
        node *p = f->path[d];
        uint32_t ci = f->idx[d];
        if (inner_child(t, p)[ci]->count >= t->min)
            entry_apply(t, p, ci, inner_cnt(t, p)[ci] - kk, neg);
        else
            node_repair(t, p, ci);
    }
    root_collapse(t);
}

/* The compaction pass of a FAST delete batch in pieces for two threads
 * (section 13): pieces end at leaf parent boundaries, so each writes only
 * its own leaves and leaf parents' entries.  A piece records, per leaf
 * parent it leaves, the count and exact sum its leaves lost (applied to
 * the levels above afterwards, on one thread), and, per leaf left below
 * its minimum fill, the index of one of the leaf's keys (repaired
 * afterwards, on one thread, by a descent with that key: the structure is
 * unchanged until then). */
#define DEL_PIECES 16

typedef struct parent_loss {
    uint64_t key;                /* index of a batch key under the leaf parent */
    uint64_t cnt;                /* items its leaves lost */
    ddsum sum;                   /* minus their values' sum */
} parent_loss;

typedef struct delete_pieces {
    agg_tree *t;
    const agg_key *keys;
    node **leaves;               /* groups' leaves, for prefetching (NULL: none) */
    const uint64_t *gfirst;      /* groups' first key indexes */
    uint64_t ng;
    uint64_t cut[DEL_PIECES + 1];
    parent_loss *lp[DEL_PIECES]; /* each piece's leaf parent records ... */
    uint64_t nlp[DEL_PIECES];
    uint64_t *rep[DEL_PIECES];   /* ... and repair keys */
    uint64_t nrep[DEL_PIECES];
    uint64_t gone[DEL_PIECES];   /* items removed */
} delete_pieces;

/* First key index in [from, n) past the leaf parent of keys[from] (n if
 * that is the last leaf parent). */
static uint64_t dels_lp_end(const agg_tree *t, const agg_key *keys, uint64_t from, uint64_t n)
{
    int D = (int)t->depth;
    uint64_t lo = from, hi = n;
    finger f;
    agg_key bound;
    f.path[0] = t->root;
    f.hn[0] = NULL;
    f.hs[0] = 0;
    finger_descend(t, &f, 0, keys[from], 0);
    if (!f.hn[D - 2])
        return n;
    bound = node_keys(f.hn[D - 2])[f.hs[D - 2]];
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (key_lt_fast(keys[mid], bound))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Piece p: compact every leaf of its keys (dels_compact), update its entry
 * in the leaf parent, record leaf parents and underfull leaves. */
static uint64_t dels_piece(void *ctx, int p, int w)
{
    delete_pieces *c = (delete_pieces *)ctx;
    agg_tree *t = c->t;
    const agg_key *keys = c->keys;
    int D = (int)t->depth;
    uint64_t i, j, lo = c->cut[p], hi = c->cut[p + 1], g, lpcnt = 0, lpkey = lo;
    ddsum lpsum;
    finger f;
    dds_zero(&lpsum);
    c->nlp[p] = c->nrep[p] = c->gone[p] = 0;
    g = 0;
    if (c->leaves) {                /* the first group of the piece */
        uint64_t a = 0, b = c->ng;
        while (a < b) {
            uint64_t mid = a + (b - a) / 2;
            if (c->gfirst[mid] < lo)
                a = mid + 1;
            else
                b = mid;
        }
        g = a;
    }
    f.path[0] = t->root;
    f.hn[0] = NULL;
    f.hs[0] = 0;
    finger_descend(t, &f, 0, keys[lo], 0);
    for (i = lo; i < hi; i = j) {
        node *lf;
        uint32_t w, lower;
        ddsum neg;
        if (i > lo) {
            int d = finger_level(t, &f, D - 1, keys[i]);
            if (d < D - 2) {        /* leaving the leaf parent */
                parent_loss *r = &c->lp[p][c->nlp[p]++];
                r->key = lpkey;
                r->cnt = lpcnt;
                r->sum = lpsum;
                lpcnt = 0;
                dds_zero(&lpsum);
                lpkey = i;
            }
            if (d < D - 1)
                finger_descend(t, &f, d, keys[i], 1);
        }
        lf = f.path[D - 1];
        if (c->leaves && g + PF_DIST < c->ng)
            leaf_prefetch_all(t, c->leaves[g + PF_DIST], 1);
        g++;
        for (j = i + 1; j < hi; j++)
            if (!(!f.hn[D - 1] || key_lt_fast(keys[j], node_keys(f.hn[D - 1])[f.hs[D - 1]])))
                break;
        lower = !f.hn[D - 1] ? 1 : t->min;
        w = dels_compact_fast(t, lf, keys, i, j, &neg);
        entry_apply(t, f.path[D - 2], f.idx[D - 2], w, &neg);
        lpcnt += j - i;
        dds_add(&lpsum, neg.hi, neg.lo, neg.exact, 0);
        c->gone[p] += j - i;
        if (w < lower)
            c->rep[p][c->nrep[p]++] = i;
    }
    {
        parent_loss *r = &c->lp[p][c->nlp[p]++];
        r->key = lpkey;
        r->cnt = lpcnt;
        r->sum = lpsum;
    }
    (void)w;
    return UINT64_MAX;
}

/* The compaction pass of a FAST batch (every key present, depth >= 3) in
 * pieces, on a helper thread too if threads == 1; then, on this thread,
 * the levels above the leaf parents and the repairs.  0 if the batch is
 * not worth cutting or the records' memory is not there (the caller then
 * runs the one-thread pass; nothing has changed). */
static int dels_apply_pieces(agg_tree *t, const agg_key *keys, uint64_t n, node **leaves,
                             const uint64_t *gfirst, uint64_t ng, int threads)
{
    delete_pieces c;
    uint64_t leavesb = t->nbytes / t->leaf_bytes + 1, lpb = leavesb / t->min + 2;
    uint64_t q, reptotal = 0, k;
    int p, np = 0;
    ddsum none;
    char *mem;
    size_t lpsz, repsz;
    c.cut[0] = 0;
    for (k = 1; k < DEL_PIECES; k++) {
        uint64_t at = n * k / DEL_PIECES, e;
        if (at <= c.cut[np])
            continue;
        e = dels_lp_end(t, keys, at, n);
        if (e < n && e > c.cut[np])
            c.cut[++np] = e;
    }
    c.cut[++np] = n;
    if (np < 2)
        return 0;
    /* per piece: leaf parent records <= its keys and <= leaf parents
     * (non-last ones hold >= min leaves); repair keys <= its keys and
     * <= leaves */
    lpsz = repsz = 0;
    for (p = 0; p < np; p++) {
        uint64_t nk = c.cut[p + 1] - c.cut[p];
        lpsz += (size_t)(nk < lpb ? nk : lpb);
        repsz += (size_t)(nk < leavesb ? nk : leavesb);
    }
    mem = (char *)raw_alloc(lpsz * sizeof(parent_loss) + repsz * sizeof(uint64_t));
    if (!mem)
        return 0;
    {
        parent_loss *lp = (parent_loss *)(void *)mem;
        uint64_t *rp = (uint64_t *)(void *)(lp + lpsz);
        for (p = 0; p < np; p++) {
            uint64_t nk = c.cut[p + 1] - c.cut[p];
            c.lp[p] = lp;
            c.rep[p] = rp;
            lp += nk < lpb ? nk : lpb;
            rp += nk < leavesb ? nk : leavesb;
        }
    }
    c.t = t;
    c.keys = keys;
    c.leaves = leaves;
    c.gfirst = gfirst;
    c.ng = ng;
    run_parts(&c, dels_piece, np, threads);
    /* the levels above the leaf parents: each record's change, on the
     * path down to its leaf parent (the structure has not changed yet) */
    for (p = 0; p < np; p++) {
        t->len -= c.gone[p];
        for (q = 0; q < c.nlp[p]; q++) {
            const parent_loss *r = &c.lp[p][q];
            finger f;
            int d;
            f.path[0] = t->root;
            f.hn[0] = NULL;
            f.hs[0] = 0;
            finger_descend(t, &f, 0, keys[r->key], 0);
            for (d = (int)t->depth - 3; d >= 0; d--)
                entry_apply(t, f.path[d], f.idx[d], inner_cnt(t, f.path[d])[f.idx[d]] - r->cnt,
                            &r->sum);
        }
        reptotal += c.nrep[p];
    }
    /* the repairs, in key order: each walks the path of one underfull
     * leaf bottom-up (dels_repair_path with nothing more taken out: the
     * entries are up to date; an inexact one above a repair is refreshed,
     * since a repair keeps a node's total but not the bits of its inexact
     * summary, I6) */
    dds_zero(&none);
    for (p = 0; p < np && reptotal; p++)
        for (q = 0; q < c.nrep[p] && t->depth >= 2; q++) {
            finger f;
            f.path[0] = t->root;
            f.hn[0] = NULL;
            f.hs[0] = 0;
            finger_descend(t, &f, 0, keys[c.rep[p][q]], 0);
            dels_repair_path(t, &f, (int)t->depth, 0, &none);
        }
    root_collapse(t);
    free(mem);
    return 1;
}

/* See aggtree.h and section 13. */
agg_status agg_tree_delete_sorted(agg_tree *t, const agg_key *keys, uint64_t n,
                                  uint64_t *bad_index)
{
    finger f;
    uint64_t dcnt[MAX_DEPTH], i, j, g = 0, ng = 0;
    ddsum dsum[MAX_DEPTH];
    int D, lev, valid = 0, threads;
    agg_status st;
    node **leaves;
    uint64_t *gfirst;
    if (n == 0)
        return AGG_OK;
    if (!keys_increasing(t, keys, n, bad_index))
        return AGG_INVALID;
    /* the groups' leaves, for prefetching in the second pass: optional
     * (without the memory the pass only runs slower) */
    leaves = (node **)raw_alloc((size_t)n * (sizeof(node *) + sizeof(uint64_t)));
    gfirst = leaves ? (uint64_t *)(void *)(leaves + n) : NULL;
    threads = batch_threads(n, atomic_load_relaxed(&g_batch_mode));
    if (threads && n >= 2 && t->root)
        st = dels_check_split(t, keys, n, bad_index, leaves, gfirst, &ng, threads);
    else
        st = dels_check(t, keys, n, bad_index, leaves, gfirst, &ng);
    if (st != AGG_OK) {
        free(leaves);
        return st;
    }
    /* every key is present: from here on nothing can fail */
    if (threads && t->mode == AGG_KEYS_FAST && t->depth >= 3 &&
        dels_apply_pieces(t, keys, n, leaves, gfirst, ng, threads)) {
        free(leaves);
        return AGG_OK;
    }
    D = (int)t->depth;
    for (lev = 0; lev < MAX_DEPTH; lev++) {
        dcnt[lev] = 0;
        dds_zero(&dsum[lev]);
    }
    for (i = 0; i < n; i = j) {
        agg_key k = key_normalize(t, keys[i]);
        node *lf;
        uint32_t lower, w, cnt;
        uint64_t kk;
        if (!valid) {
            D = (int)t->depth;
            f.path[0] = t->root;
            f.hn[0] = NULL;
            f.hs[0] = 0;
            finger_descend(t, &f, 0, k, 0);
            valid = 1;
        } else if (i > 0) {
            int d = finger_level(t, &f, D - 1, k);
            if (d < D - 1) {
                for (lev = D - 2; lev > d; lev--)
                    dels_flush(t, &f, dcnt, dsum, lev);
                finger_descend(t, &f, d, k, 1);
            }
        }
        lf = f.path[D - 1];
        if (leaves && g + PF_DIST < ng)   /* stale after a merge: only a hint */
            leaf_prefetch_all(t, leaves[g + PF_DIST], 1);
        g++;
        for (j = i + 1; j < n; j++)
            if (!(D == 1 || !f.hn[D - 1] ||
                  key_lt(t, key_normalize(t, keys[j]), node_keys(f.hn[D - 1])[f.hs[D - 1]])))
                break;
        kk = j - i;
        cnt = lf->count;
        lower = (D == 1 || !f.hn[D - 1]) ? 1 : t->min;
        if (cnt >= kk + lower) {
            /* one compaction pass; the parent's entry once per leaf */
            ddsum neg;
            w = dels_compact(t, lf, keys, i, j, k, &neg);
            if (D >= 2) {
                entry_apply(t, f.path[D - 2], f.idx[D - 2], w, &neg);
                dcnt[D - 2] += kk;
                dds_add(&dsum[D - 2], neg.hi, neg.lo, neg.exact, 0);
            }
        } else if (D >= 2) {
            /* the leaf would underflow: bring every entry up to date,
             * compact it anyway, then repair the path bottom-up as
             * agg_tree_delete does for one key (a child below min is
             * merged with or evened out against a sibling); the path
             * is walked afresh afterwards */
            ddsum neg;
            for (lev = D - 2; lev >= 0; lev--)
                dels_flush(t, &f, dcnt, dsum, lev);
            dels_compact(t, lf, keys, i, j, k, &neg);
            dels_repair_path(t, &f, D, kk, &neg);
            valid = 0;
        } else {
            /* a root leaf emptied: agg_tree_delete frees it */
            uint64_t q;
            for (q = i; q < j; q++)
                agg_tree_delete(t, keys[q], NULL);
            valid = 0;
            if (!t->root)
                break;
        }
    }
    if (valid)
        for (lev = D - 2; lev >= 0; lev--)
            dels_flush(t, &f, dcnt, dsum, lev);
    free(leaves);
    return AGG_OK;
}
