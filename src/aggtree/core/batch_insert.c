/*
 * core/batch_insert.c - agg_tree_insert_sorted: a sorted run of keys inserted in one
 * ordered walk (check, plan, reserve, apply; two threads for large runs).
 *
 * 13. Batch insert and delete of a sorted run
 * -------------------------------------------
 * agg_tree_insert_sorted(keys[0..n)) does in one ordered walk what n
 * inserts would do, touching each affected leaf once.  Four steps:
 *
 *  a. ORDER.  keys[i - 1] < keys[i] for all i, else AGG_INVALID (nothing
 *     read yet).  An empty tree is bulk-built instead (section 9).
 *  b. CHECK (reads only).  route: a walk that only moves forward (a
 *     "finger": the path plus, per level, a reference to the separator
 *     bounding the path node; never a copy, since a GENERAL separator may
 *     be replaced and free its tail) routes the keys through the internal
 *     nodes - one compare per key while it stays in the same leaf, and
 *     when it leaves, a climb only as high as needed.  The result is the
 *     list of groups (leaf, first key, count) and the sequence of path
 *     nodes left behind (events).  search (GENERAL keys, or a tree that
 *     is one leaf; FAST keys: step d, see "Fused search" below): each
 *     group is searched in its leaf (FAST: one branch-free binary search
 *     of the whole leaf per key - a conditional move per halving, the
 *     same number of steps for every key, and no key's search waits for
 *     the one before, so the CPU overlaps them; GENERAL: a forward scan
 *     from the previous key's position), giving every key's position
 *     among the leaf's items and the first key already present
 *     (AGG_DUPLICATE); the leaves are prefetched a few groups ahead so
 *     that their cache misses overlap.  The FAST search replaced a
 *     forward scan of 8 compares at a time, whose loop exits mispredicted
 *     once per key: insert_sorted of 3,000 keys into a cache-resident
 *     30,000-item tree went from ~45 to ~41 ns/key on one thread, of
 *     100,000 into 1,000,000 from ~56 to ~52 (delete_sorted, whose check
 *     searches the same way: ~59 -> ~54 cache-resident).
 *     plan: each leaf parent's LEAF OPS are planned from the counts alone
 *     (below; a leaf's count is read from its parent's entry, so the plan
 *     reads no leaf).  Then every event turns
 *     into "this node gets g new children, so becomes ceil((count + g) /
 *     cap) nodes", which gives the exact number of new leaves and internal
 *     nodes, new root levels included.
 *  c. RESERVE those nodes, the tail copies (GENERAL) and the buffers.  A
 *     failure frees them: AGG_NOMEM with the tree never touched.
 *  d. APPLY: replay the ops and events in order (no key is compared
 *     again).  Nothing can fail but the fused search.
 *
 * Two threads.  A batch of >= 16,384 keys (BATCH_THREAD_MIN) runs the
 * route + search + plan of step b and the leaf ops of step d on two
 * threads (pthreads; AGG_NO_THREADS builds without them; AGGTREE_THREADS=1
 * in the environment, or AGG_TEST_BATCH_THREAD_MODE 1, forces one).
 * The keys are cut at a leaf parent boundary: the first key past the leaf
 * parent of the middle key (found by one descent and a binary search of
 * the keys; a depth-2 tree has one leaf parent and is not cut).  Each half
 * has its own finger, groups, events and ops; the first half leaves its
 * final path open and plans its last leaf parent itself, and the join
 * adds the events that close that path up to the node the halves share,
 * then appends the second half renumbered.  The arrays are sized before
 * the threads start from bounds (groups <= keys and <= leaves; events <=
 * internal nodes, each being left once; ops <= 2 per group, an absorbing
 * op at most per group; leaves and internal nodes bounded by nbytes), so
 * no thread allocates and nothing can fail inside one.  Each half reports
 * its first present key and the first half's wins: the first in key
 * order.  Pieces: the apply pass cuts the events into up to 16 pieces
 * (APPLY_PIECES), each ending after the leaf parent at which the ops
 * reach the next 1/16 share; the two threads take pieces in order from a
 * shared counter, each with its own carry buffers, and leave in each leaf
 * parent's event the count and exact sum of its new keys and (in new_leaf_entry,
 * at indexes the plan assigned) the entries of its new leaves;
 * everything above the leaf parents (section "Internal nodes" below) then
 * runs on one thread, in order - ~250 nodes for 100,000 keys into
 * 1,000,000.  Pieces, not halves, because the caller waits at the end
 * only for the piece the helper holds: a helper whose core is taken away
 * (another process, or the hypervisor running another guest) no longer
 * holds up half of the work, and a fixed cut left one thread idle when
 * the halves cost differently.  Measured (100,000 keys into 1,000,000,
 * median of 60-100 batches, insert then delete): on a quiet machine
 * 29.4-29.7 ns/key against 30.1-30.4 for halves; with core 1 taken away
 * 3 ms in every 6 (a SCHED_FIFO busy loop pinned to it, the way a busy
 * host takes a virtual CPU away) 50-56 against 56-61, one thread 50-53.
 * The check pass stays cut in two: cut into 16 parts it measured ~5%
 * slower on a quiet machine (joining copies 15/16 of the groups and ops
 * instead of half) and no better with core 1 taken away.  Both passes go
 * through one runner (run_parts).  The threads write disjoint memory:
 * different leaf parents, their leaves, their ops and events (a leaf's
 * next->prev may be another piece's leaf, a field that piece never
 * touches).  GENERAL batches apply on one thread: a separator replaced
 * there may free a tail, and t->nbytes is shared.
 *
 * Leaf ops.  The "stream" of a leaf is the carry from its left neighbour
 * (below), then its items merged with its new keys: T items.
 *    T <= cap        all stay (the common case: merged in place from the
 *                    top, each run of items moving up by the number of new
 *                    keys below it: O(leaf + k), no compares);
 *    else X = T - cap items are in excess, the leaf keeps cap, and
 *      X >= min      they go to ceil(X / cap) new leaves after it, shared
 *                    evenly (each >= min), or packed full if this is the
 *                    tree's last leaf (the append pattern);
 *      next leaf has new keys too: they are carried into it (X < min: the
 *                    carry buffer is small), the front of its stream;
 *      left neighbour has room: the X smallest go to its end (a spill);
 *      untouched right neighbour has room: carried into it (it gets an op
 *                    of its own that only absorbs);
 *      the tree's last leaf: a new last leaf with X items (I4 exemption);
 *      otherwise     leaf and one new leaf share T evenly (both >= min).
 * Everything moves within one parent, so only its separators change
 * (carried-into and spilled-from leaves get their first key as separator;
 * separators below a new minimum stay valid, I2 only needs sep <= min).
 * Leaves end full where carries pass, so a dense batch packs its leaves
 * full; measured (cap 64): 27.5 bytes/item after 100,000 random keys into
 * 1,000,000 (29.15 before), 30.6 after doubling a tree with one batch.
 * Each stream is written backward, the excess first (to new leaves or the
 * carry buffer), then the kept part in place: a destination is never below
 * its source in the same leaf, so nothing is overwritten before it is
 * read.  A spill takes its items forward first and then closes the gap.
 *
 * Internal nodes.  New nodes wait in a per-level pending list until the
 * walk leaves their parent; then they enter it in one backward pass, or,
 * if it overflows, parent and pending entries are cut into packed nodes
 * (evenly; full with the rest in the last if it is the last node of its
 * level, keeping >= 2 there) whose entries join the pending list one level
 * up; a root with pending siblings gets new levels on top.
 *
 * Counts and sums.  Per leaf op: the parent's entry gets the new count
 * and its sum changes by + carry in + new values - spill - what left
 * (carry out or new leaves, whose sums node_summary computes anyway), each
 * an exact double-double when possible (section 8: then O(1), else the
 * entry is recomputed).  Every path node above accumulates the exact sum
 * of the new values below it and updates its own entry once, when the
 * walk leaves it - not once per key.
 *
 * Cost.  O(n) routing + O(leaf) per touched leaf + O(cap) per touched
 * parent.  A batch of 100,000 random keys into 1,000,000 touches every
 * leaf, so its floor is rewriting every leaf (with the fused search, the
 * one read of it is the one the rewrite needs anyway; before it, the
 * check read every leaf once more): ~1.8 ms on one core of the
 * development VM (bench/c/bench_floor.c does just that memory work on
 * scattered leaf-sized blocks).  With the fused search (below), later
 * batches of 100,000 random keys into a packed 1,000,000 measured ~53-60
 * ns per key on one thread and ~32-48 on two, the first batch no slower
 * (the table of the runs before and after: bench/README.md, "Core design
 * measurements").
 * The two-thread figures need the second core idle: a busy one (another
 * process, or numpy's OpenBLAS threads spinning after a BLAS call - set
 * OPENBLAS_NUM_THREADS=1) gives nothing or worse.  The first batch into a
 * packed tree splits every leaf parent and allocates every new leaf from
 * fresh pages.  Command: `BENCH_BATCH_ONLY=1 BENCH_BATCH_PACKED=1
 * bench_core 1000000 64` (add AGGTREE_THREADS=1 for one thread; without
 * BENCH_BATCH_PACKED the tree comes from random single inserts, leaves
 * ~70% full, and most leaf ops fit in place).  The
 * search and the leaf ops are bound by the latency of leaf-sized reads
 * from L3 (the tree, ~25 MB, fits the 32 MB L3 but not the TLB: the same
 * run with glibc.malloc.hugetlb=1 in GLIBC_TUNABLES is ~10% faster);
 * prefetching more lines or further ahead did not help.  Single inserts
 * for comparison: ~290 ns each in random order, ~125 in sorted order
 * (bench_core, node size 64).  A full rebuild (read out, merge,
 * bulk-build) was measured 2-4x slower than the incremental path even for
 * a batch 10x the tree (it rewrites everything and allocates every node),
 * so there is no separate rebuild path.
 *
 * Fused search (FAST keys, depth >= 2).  The search reads every touched
 * leaf, and the apply reads and rewrites it again; between the two the
 * whole batch's leaves have passed through the cache (~25 MB for 100,000
 * keys into 1,000,000), so the apply met them cold a second time.  Since
 * the plan needs only counts, the search moves into the apply pass: each
 * leaf op first searches its own leaf (still untouched: earlier ops write
 * only leaves to its left, new leaves and the carry buffer), then runs on
 * the lines the search just brought in.  All-or-nothing is kept by an
 * exact undo.  Before its first op, each leaf parent is copied whole
 * (one internal node, ~3 KB at cap 64: its entries' counts, sums and
 * separators are all the leaf ops change in it - never its child list).
 * If a search finds a present key, its piece stops there and no thread
 * takes another piece (pieces taken before it - all those before it in
 * key order - run to their end or their own first one, and the first in
 * key order wins); every leaf parent any piece touched is put back: the
 * stream of its children - each child's items, then the items of the new
 * leaves its op linked after it, with a carry still in the buffer in
 * front of the leaf it was meant for - is the old stream plus the new
 * keys its ops inserted, in order; taking those out and cutting the rest
 * by the copy's counts refills every child exactly as it was, the new
 * leaves are unlinked (insert_free gives them back), and the copy is written
 * back.
 * Nothing above the leaf parents has changed yet.  The result is the tree
 * before the call, node for node and bit for bit (the tests compare
 * AGG_TEST_SHAPE_HASH, not just the items).  The price: the copies and
 * the undo buffer (one leaf parent's items) are allocated with the
 * reservation, so a batch holding a present key may now report AGG_NOMEM
 * before it would have reported AGG_DUPLICATE.  Measured (bench_core as
 * below, later batches, best): one thread ~72-80 -> ~45-60 ns/key, two
 * threads ~41-46 (55-75 the day this was done) -> ~32-45.
 *
 * Copy-on-write, measured and rejected.  Merging each run of touched
 * leaves under a parent into freshly allocated leaves (reading every old
 * leaf once, detecting duplicates during the merge, leaving the tree
 * untouched until a commit that swaps the new leaves in and frees the old)
 * would drop the check pass's separate read.  Implemented and measured on
 * the same runs: ~116-126 ns/item on one thread (merge ~90, route ~8,
 * commit ~15, reserve ~6) and no better on two, against ~85 for the
 * in-place passes: the fresh leaves double the working set (old and new
 * tree, ~52 MB) beyond L3, and merely copying 15,625 leaf-sized blocks to
 * cold memory costs ~50 ns per batch key on this VM whatever the thread
 * count (non-temporal stores: ~83), more than the in-place check and
 * apply together save.  Its first batch into a packed tree also pays a
 * page fault per new page (~265 ns/item).
 *
 */
#include "internal.h"

/* What one leaf does in a batch insert (planned by the check pass,
 * executed by the apply pass).  Stream of the leaf = the carry received
 * from its left neighbour, then its own items merged with its new keys.
 * The smallest `spill` stream items go to the end of the left neighbour,
 * the next `keep` stay, the rest go to `nnew` new leaves after it (xnew
 * items) or, as a carry of `cout` items, to the front of leaf j + 1. */
typedef struct leaf_op {
    node *leaf;                  /* the leaf: child j of its parent */
    node *parent;                /* its parent (NULL: the leaf is the root) */
    uint64_t start;              /* index of its first new key */
    uint64_t k;                  /* new keys (0: it only absorbs a carry) */
    uint64_t nnew;               /* new leaves after it */
    uint64_t xnew;               /* items in them */
    uint32_t j;                  /* its index in the parent (0 at the root) */
    uint32_t keep;               /* its final item count */
    uint32_t spill;              /* items moved to the left neighbour */
    uint32_t cout;               /* items carried into the right neighbour */
    uint8_t full;                /* new leaves packed full (rightmost) */
    uint64_t nl0;                /* its first new leaf in the reserve (and in new_leaf_entry) */
    ddsum gsum;                  /* apply: exact sum of its new values */
} leaf_op;

/* The new keys of one leaf, found by the check pass. */
typedef struct key_group {
    node *leaf;                  /* the leaf */
    uint64_t start;              /* first key */
    uint64_t k;                  /* how many */
    uint32_t j;                  /* the leaf's index in its parent */
    uint32_t L;                  /* its item count (from the parent's entry) */
} key_group;

/* Check pass: the route phase left path node x at level lev after the
 * first `gend` groups. */
typedef struct path_event {
    node *x;                     /* the node */
    node *parent;                /* its parent (NULL for the root) */
    uint64_t gend;               /* groups created before */
    uint64_t opend;              /* plan: leaf ops planned before it is finalized */
    uint64_t grown;              /* plan, leaf parents: new leaves under it */
    uint64_t nl0;                /* apply, leaf parents: its new leaves' entries
                                    in new_leaf_entry */
    uint64_t dk;                 /* apply, leaf parents: new keys under it */
    ddsum dsum;                  /* apply, leaf parents: their values' sum */
    uint32_t pj;                 /* its index in the parent */
    int32_t lev;                 /* its level */
    uint8_t rm;                  /* it is the last node of its level */
} path_event;

/* A new node waiting to enter its parent: after the child that had index
 * `pos` before the batch. */
typedef struct pending_entry {
    entry e;                     /* its entry (the separator's reference included) */
    uint32_t pos;                /* original index of the child it follows */
} pending_entry;

/* Nodes reserved (allocated) before the apply pass, handed out in order
 * (not the allocator's node_pool). */
typedef struct node_reserve {
    node **a;                    /* the nodes */
    uint64_t n;                  /* how many */
    uint64_t used;               /* handed out */
} node_reserve;

/* The route, search and plan of a contiguous part of the keys (one, or
 * two on two threads): arrays sized before it starts, so it never
 * allocates. */
typedef struct part {
    key_group *grp;              /* per touched leaf, in key order */
    uint64_t ngrp;
    uint64_t capgrp;
    path_event *ev;              /* path nodes left by the route, in order */
    uint64_t nev;
    uint64_t capev;
    leaf_op *ops;                /* per leaf to rewrite, in key order */
    uint64_t nops;
    uint64_t capops;
    uint64_t new_leaves;         /* new leaves its ops take */
    uint64_t tail_grown;         /* of which under its last leaf parent (not last part) */
    finger f;                    /* the route's finger */
} part;

/* Carry between consecutive leaf ops of one apply thread. */
typedef struct carry {
    agg_key *ck[2];              /* carry buffers (cap items each) */
    double *cv[2];
    int cur;                     /* the buffer holding the carry in */
    uint32_t cn;                 /* carry in: items */
    ddsum csum;                  /* carry in: their sum */
} carry;

/* The apply pass of a two-thread batch is cut into at most this many
 * pieces, the check pass into two (section 13, "Two threads"). */
#define APPLY_PIECES 16

/* State of one agg_tree_insert_sorted. */
typedef struct insert_batch {
    agg_tree *t;
    const agg_key *keys;         /* the caller's keys */
    agg_key *own;                /* GENERAL: the tree's copies (tails owned), else NULL */
    const agg_key *sk;           /* the keys to store: own or keys */
    const double *vals;          /* values, NULL = all 0.0 */
    uint64_t n;                  /* number of keys */
    uint32_t *pos;               /* per key: items of its leaf < it, before the batch */
    part pt[2];                  /* check: the parts; pt[0] ends up holding all */
    int nparts;                  /* check part p is keys [ccut[p], ccut[p + 1]) */
    uint64_t ccut[3];
    key_group *grp;              /* = pt[0]'s arrays once the parts are joined */
    uint64_t ngrp;
    path_event *ev;
    uint64_t nev;
    leaf_op *ops;
    uint64_t nops;
    uint64_t grow[MAX_DEPTH];    /* plan: new children of the current node per level */
    uint64_t maxpend[MAX_DEPTH]; /* most new nodes at level d under one parent */
    uint64_t maxsplit;           /* longest entry list of a splitting node */
    uint64_t rootgrow;           /* new siblings of the root */
    uint64_t new_leaves;         /* nodes the apply pass will take */
    uint64_t new_inner;
    node_reserve leaves;         /* apply pass: reserved nodes */
    node_reserve inner;
    pending_entry *pending[MAX_DEPTH]; /* new nodes at level d waiting for their parent */
    uint64_t npending[MAX_DEPTH];
    entry *tmp;                  /* entry list of a splitting node */
    uint64_t ntmp;
    pending_entry *new_leaf_entry; /* per new leaf: its entry for the parent */
    carry cs[2];                 /* carry state of the (up to two) apply workers */
    uint64_t dcnt[MAX_DEPTH];    /* new items under the path node per level */
    ddsum dsum[MAX_DEPTH];       /* their values' sum */
    /* fused search (FAST, depth >= 2: see "Fused search" in section 13) */
    int fused;                   /* groups are searched by the apply pass */
    char *snap;                  /* per event: a copy of its leaf parent before its ops */
    agg_key *uk;                 /* undo: a leaf parent's items */
    double *uv;
    /* apply pieces (FAST, two threads: see "Pieces" in section 13) */
    int npieces;                 /* piece p is events [piece_cut[p], piece_cut[p + 1]) */
    uint64_t piece_cut[APPLY_PIECES + 1];
    int ran[APPLY_PIECES];       /* piece p ran (to its end or its halt) */
    int piece_worker[APPLY_PIECES]; /* ... with the carry state of worker piece_worker[p] */
    uint64_t halt_event[APPLY_PIECES]; /* piece p stopped at this event (or its end) */
    uint64_t halt_op[APPLY_PIECES]; /* ... before this op */
} insert_batch;

/* The i-th key of the run as the tree compares it. */
AGG_INLINE agg_key batch_key(const insert_batch *b, uint64_t i)
{
    return key_normalize(b->t, b->keys[i]);
}

/* Append a leaf op (the array is sized for the worst case: one op per
 * group plus one absorbing op per group). */
AGG_INLINE void ops_push(part *pt, const leaf_op *op)
{
    pt->ops[pt->nops++] = *op;
}

/* Plan the leaves of parent P (NULL: the root is a leaf) from its groups
 * g[0..ng) (section 13: fit, carry right, spill left, absorb into an
 * untouched right neighbour, or new leaves) into pt's ops.  Returns the
 * number of new leaves under P. */
static uint64_t plan_leaf_ops(insert_batch *b, part *pt, node *P, int rm_parent,
                              const key_group *grp, uint64_t ng)
{
    const agg_tree *t = b->t;
    uint32_t cap = t->cap, min = t->min, c = 0, prev_keep = 0;
    int64_t prev_j = -1;
    int prev_emit = 0;
    uint64_t total = 0, r;
    for (r = 0; r < ng; r++) {
        const key_group *g = &grp[r];
        uint32_t j = g->j;
        uint64_t T = (uint64_t)c + g->L + g->k;
        int last = !P || j + 1 == P->count;
        leaf_op op;
        memset(&op, 0, sizeof op);
        op.leaf = g->leaf;
        op.parent = P;
        op.start = g->start;
        op.k = g->k;
        op.j = j;
        if (T <= cap) {
            op.keep = (uint32_t)T;
            c = 0;
        } else {
            uint64_t X = T - cap;
            int rm = rm_parent && last;
            int next = r + 1 < ng && grp[r + 1].j == j + 1;
            op.keep = cap;
            c = 0;
            if (X >= min) {         /* new leaves after it */
                op.xnew = X;
                op.nnew = pack_count(X, cap);
                op.full = (uint8_t)rm;
            } else if (next) {      /* carry into the next touched leaf */
                op.cout = (uint32_t)X;
                c = (uint32_t)X;
            } else {
                uint32_t room = 0;
                if (P && j > 0) {
                    if (prev_j == (int64_t)j - 1)
                        room = prev_emit ? 0 : cap - prev_keep;
                    else
                        room = cap - (uint32_t)inner_cnt(t, P)[j - 1];
                }
                if (room >= X) {    /* spill into the left neighbour */
                    op.spill = (uint32_t)X;
                } else if (!last && inner_cnt(t, P)[j + 1] + X <= cap) {
                    leaf_op ab;         /* the untouched right neighbour absorbs it */
                    node *nb = inner_child(t, P)[j + 1];
                    op.cout = (uint32_t)X;
                    op.nl0 = pt->new_leaves + total;
                    ops_push(pt, &op);
                    memset(&ab, 0, sizeof ab);
                    ab.leaf = nb;
                    ab.parent = P;
                    ab.start = g->start + g->k;
                    ab.j = j + 1;
                    ab.keep = (uint32_t)inner_cnt(t, P)[j + 1] + (uint32_t)X;
                    ab.nl0 = pt->new_leaves + total;
                    ops_push(pt, &ab);
                    prev_j = j + 1;
                    prev_keep = ab.keep;
                    prev_emit = 0;
                    continue;
                } else if (rm) {    /* the tree's last leaf: a short new last leaf */
                    op.nnew = 1;
                    op.xnew = X;
                    op.full = 1;
                } else {            /* share with one new leaf, both >= min */
                    op.keep = (uint32_t)(T - T / 2);
                    op.nnew = 1;
                    op.xnew = T / 2;
                }
            }
        }
        op.nl0 = pt->new_leaves + total;
        ops_push(pt, &op);
        total += op.nnew;
        prev_j = j;
        prev_keep = op.keep;
        prev_emit = op.nnew > 0;
    }
    pt->new_leaves += total;
    return total;
}

/* Route phase: record that path node `lev` is left after the groups so
 * far. */
static void route_event(part *pt, int lev)
{
    path_event *e = &pt->ev[pt->nev++];
    e->x = pt->f.path[lev];
    e->parent = lev > 0 ? pt->f.path[lev - 1] : NULL;
    e->pj = lev > 0 ? pt->f.idx[lev - 1] : 0;
    e->gend = pt->ngrp;
    e->opend = pt->nops;
    e->grown = 0;
    e->lev = lev;
    e->rm = (uint8_t)(pt->f.hn[lev] == NULL);
}

/* Route phase: keys [start, i) go to the finger's leaf.  Its item count
 * comes from its parent's entry (the parent is in cache, the leaf not). */
AGG_INLINE void route_group(const agg_tree *t, part *pt, int D, uint64_t start, uint64_t i)
{
    key_group *g = &pt->grp[pt->ngrp++];
    g->leaf = pt->f.path[D - 1];
    g->start = start;
    g->k = i - start;
    g->j = D >= 2 ? pt->f.idx[D - 2] : 0;
    g->L = D >= 2 ? (uint32_t)inner_cnt(t, pt->f.path[D - 2])[g->j] : g->leaf->count;
}

/* Search phase for one group: each key's position in the leaf; the first
 * key already present is reported (groups are searched in key order). */
static uint64_t search_group(insert_batch *b, key_group *gr)
{
    const agg_tree *t = b->t;
    node *lf = gr->leaf;
    const agg_key *lk = node_keys(lf);
    uint32_t lo = 0, cnt = lf->count;
    uint64_t i, end = gr->start + gr->k;
    if (t->mode == AGG_KEYS_FAST) {
        /* a branch-free binary search of the whole leaf per key: the loop
         * runs the same ceil(log2(cnt)) times for every key of the group
         * (no mispredicted exits), and the keys' searches do not depend
         * on each other, so the CPU overlaps them; then the equality
         * checks, in key order */
        for (i = gr->start; i < end; i++)
            b->pos[i] = fast_count(lk, cnt, b->keys[i], 0, 1);
        for (i = gr->start; i < end; i++) {
            uint32_t p = b->pos[i];
            if (p < cnt && lk[p].head == b->keys[i].head && lk[p].rest == b->keys[i].rest)
                return i;
        }
    } else {
        for (i = gr->start; i < end; i++) {
            agg_key k = batch_key(b, i);
            uint32_t p = lo + general_count_lt(lk + lo, cnt - lo, k);
            if (p < cnt && key_cmp_general(lk[p], k) == 0) {
                return i;
            }
            b->pos[i] = p;
            lo = p;
        }
    }
    return UINT64_MAX;
}

/* Plan: path node ev->x gets gr new children; count the nodes it becomes
 * (new internal nodes, new root levels) and the buffer sizes. */
static void plan_event(insert_batch *b, path_event *ev, uint64_t gr)
{
    uint64_t sz = ev->x->count + gr, cnt = pack_count(sz, b->t->cap);
    b->grow[ev->lev] = 0;
    if (gr > b->maxpend[ev->lev + 1])
        b->maxpend[ev->lev + 1] = gr;
    if (cnt > 1) {
        b->new_inner += cnt - 1;
        if (sz > b->maxsplit)
            b->maxsplit = sz;
    }
    if (ev->lev > 0)
        b->grow[ev->lev - 1] += cnt - 1;
    else
        b->rootgrow = cnt - 1;
}

/* Plan: new root levels above a root that got b->rootgrow siblings. */
static void plan_root(insert_batch *b)
{
    if (b->rootgrow > b->maxpend[0])
        b->maxpend[0] = b->rootgrow;
    if (b->rootgrow) {
        uint64_t cnt = b->rootgrow + 1;
        while (cnt > 1) {
            cnt = pack_count(cnt, b->t->cap);
            b->new_inner += cnt;
        }
    }
}

/* Check pass (reads only, section 13), for the keys [lo, hi) of part p
 * (the whole batch, or one of two halves cut at a leaf parent boundary
 * that two threads take in turn):
 *  route   the keys are routed to their leaves through the internal nodes
 *          alone (one compare per key while it stays in a leaf), giving
 *          the groups (leaf, first key, count) and the sequence of path
 *          nodes the walk leaves (events; the last part closes every
 *          level, the first leaves its final path open);
 *  search  every group is searched in its leaf, prefetched PF_DIST groups
 *          ahead: the first key already present is reported, the others
 *          get their positions;
 *  plan    each leaf parent's leaf ops, from the counts alone.
 * Returns the first new key already present, or UINT64_MAX.  Writes only
 * pt, its groups' keys' pos[] and its ops: parts share nothing they
 * write, and nothing here allocates. */
static uint64_t check_part(void *ctx, int p, int w)
{
    insert_batch *b = (insert_batch *)ctx;
    const agg_tree *t = b->t;
    part *pt = &b->pt[p];
    uint64_t lo = b->ccut[p], hi = b->ccut[p + 1];
    finger *f = &pt->f;
    int D = (int)t->depth, lev;
    uint64_t i, gs = lo, g, e, gi = 0;
    (void)w;
    /* route */
    f->path[0] = t->root;
    f->hn[0] = NULL;
    f->hs[0] = 0;
    finger_descend(t, f, 0, batch_key(b, lo), 0);
    if (D == 1) {
        route_group(t, pt, D, lo, hi);
    } else {
        node *hn = f->hn[D - 1];
        uint32_t hs = f->hs[D - 1];
        for (i = lo + 1; i < hi; i++) {
            agg_key k = batch_key(b, i);
            int d;
            if (!hn || key_lt(t, k, node_keys(hn)[hs]))
                continue;           /* same leaf */
            route_group(t, pt, D, gs, i);
            d = finger_level(t, f, D - 2, k);
            for (lev = D - 2; lev > d; lev--)
                route_event(pt, lev);
            finger_descend(t, f, d, k, 1);
            hn = f->hn[D - 1];
            hs = f->hs[D - 1];
            gs = i;
        }
        route_group(t, pt, D, gs, hi);
        if (hi == b->n)
            for (lev = D - 2; lev >= 0; lev--)
                route_event(pt, lev);
    }
    /* search (fused: by the apply pass instead) */
    for (g = 0; !b->fused && g < pt->ngrp; g++) {
        uint64_t dup;
        if (g + PF_DIST < pt->ngrp)
            leaf_prefetch_all(t, pt->grp[g + PF_DIST].leaf, 0);
        if ((dup = search_group(b, &pt->grp[g])) != UINT64_MAX)
            return dup;
    }
    /* plan, parent by parent */
    if (D == 1) {
        b->rootgrow = plan_leaf_ops(b, pt, NULL, 1, pt->grp, pt->ngrp);
        return UINT64_MAX;
    }
    for (e = 0; e < pt->nev; e++) {
        path_event *ev = &pt->ev[e];
        if (ev->lev == D - 2) {
            ev->grown = plan_leaf_ops(b, pt, ev->x, ev->rm, pt->grp + gi, ev->gend - gi);
            gi = ev->gend;
        }
        ev->opend = pt->nops;
    }
    if (hi < b->n)                  /* the open last leaf parent */
        pt->tail_grown = plan_leaf_ops(b, pt, f->path[D - 2], f->hn[D - 2] == NULL,
                                       pt->grp + gi, pt->ngrp - gi);
    return UINT64_MAX;
}

/* Where to cut the batch for two threads: the first key past the leaf
 * parent of the middle key (so that no leaf parent has keys in both
 * parts), or 0 for no cut. */
static uint64_t check_split(const insert_batch *b)
{
    const agg_tree *t = b->t;
    int D = (int)t->depth;
    uint64_t lo = b->n / 2, hi = b->n;
    finger f;
    agg_key bound;
    if (D < 3 || b->n < 2)
        return 0;
    f.path[0] = t->root;
    f.hn[0] = NULL;
    f.hs[0] = 0;
    finger_descend(t, &f, 0, batch_key(b, lo), 0);
    if (!f.hn[D - 2])
        return 0;                   /* the middle key is in the last leaf parent */
    bound = node_keys(f.hn[D - 2])[f.hs[D - 2]];
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (key_lt(t, batch_key(b, mid), bound))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < b->n ? lo : 0;
}

/* Size the arrays of part pt for nk keys (into pt[0], room for both parts
 * when `all`): groups <= keys and <= leaves, events <= internal nodes
 * (each is left once) and <= groups * levels, ops <= 2 per group.  0 on
 * allocation failure. */
static int part_alloc(insert_batch *b, part *pt, uint64_t nk)
{
    const agg_tree *t = b->t;
    uint64_t D = t->depth, leaves = t->nbytes / t->leaf_bytes + 1;
    uint64_t inner = t->nbytes / t->inner_bytes + 1, g, e;
    g = (nk < leaves ? nk : leaves) + 1;
    e = g * D < 2 * inner ? g * D : 2 * inner;
    e += 2 * D + 2;
    pt->capgrp = g;
    pt->capev = e;
    pt->capops = 2 * g;
    pt->grp = (key_group *)scratch_alloc((size_t)g * sizeof(key_group));
    pt->ev = (path_event *)scratch_alloc((size_t)e * sizeof(path_event));
    pt->ops = (leaf_op *)scratch_alloc((size_t)(2 * g) * sizeof(leaf_op));
    return pt->grp && pt->ev && pt->ops;
}

/* Join part 1 to part 0: the events closing part 0's open path (up to the
 * node it shares with part 1's first key), then part 1's groups, events
 * and ops, renumbered. */
static void parts_join(insert_batch *b)
{
    const agg_tree *t = b->t;
    part *p0 = &b->pt[0], *p1 = &b->pt[1];
    int D = (int)t->depth, lev;
    int d = finger_level(t, &p0->f, D - 2, batch_key(b, b->ccut[1]));
    uint64_t i;
    for (lev = D - 2; lev > d; lev--) {
        route_event(p0, lev);
        if (lev == D - 2)
            p0->ev[p0->nev - 1].grown = p0->tail_grown;
    }
    for (i = 0; i < p1->nev; i++) {
        path_event *ev = &p0->ev[p0->nev++];
        *ev = p1->ev[i];
        ev->gend += p0->ngrp;
        ev->opend += p0->nops;
    }
    memcpy(p0->grp + p0->ngrp, p1->grp, (size_t)p1->ngrp * sizeof(key_group));
    p0->ngrp += p1->ngrp;
    for (i = 0; i < p1->nops; i++) {
        leaf_op *op = &p0->ops[p0->nops++];
        *op = p1->ops[i];
        op->nl0 += p0->new_leaves;
    }
    p0->new_leaves += p1->new_leaves;
}

/* Check and plan: the parts (two threads for a large batch), then, in the
 * route's order, every path node's new children give the number of nodes
 * it becomes: new leaves and internal nodes, new root levels. */
static agg_status insert_check(insert_batch *b, uint64_t *bad_index, int threads)
{
    int D = (int)b->t->depth;
    uint64_t e, dup;
    part *p0 = &b->pt[0];
    uint64_t split = threads ? check_split(b) : 0;
    b->nparts = 0;
    b->ccut[0] = 0;
    if (split)
        b->ccut[++b->nparts] = split;
    b->ccut[++b->nparts] = b->n;
    if (!part_alloc(b, p0, b->n) ||
        (split && !part_alloc(b, &b->pt[1], b->n - split)))
        return AGG_NOMEM;
    dup = run_parts(b, check_part, b->nparts, threads);
    if (dup != UINT64_MAX) {
        if (bad_index)
            *bad_index = dup;
        return AGG_DUPLICATE;
    }
    if (split)
        parts_join(b);
    b->grp = p0->grp;
    b->ngrp = p0->ngrp;
    b->ev = p0->ev;
    b->nev = p0->nev;
    b->ops = p0->ops;
    b->nops = p0->nops;
    b->new_leaves = p0->new_leaves;
    for (e = 0; e < b->nev; e++) {
        path_event *ev = &b->ev[e];
        plan_event(b, ev, ev->lev == D - 2 ? ev->grown : b->grow[ev->lev]);
    }
    plan_root(b);
    return AGG_OK;
}

/* Size and first rank (within the op's xnew items) of new leaf i: packed
 * full with the rest in the last one (the tree's last leaf may hold
 * fewer than min), or shared evenly. */
AGG_INLINE void newleaf_span(const leaf_op *op, uint32_t cap, uint64_t i, uint64_t *base,
                             uint32_t *size)
{
    if (op->full) {
        *base = i * cap;
        *size = i + 1 < op->nnew ? cap : (uint32_t)(op->xnew - (op->nnew - 1) * cap);
    } else {
        uint64_t f = op->xnew / op->nnew, r = op->xnew % op->nnew;
        *base = i * f + (i < r ? i : r);
        *size = (uint32_t)(f + (i < r));
    }
}

/* Copy n items (values NULL: zeros); the ranges may overlap. */
AGG_INLINE void items_move(agg_key *dk, double *dv, const agg_key *sk, const double *sv,
                           uint64_t n)
{
    memmove(dk, sk, (size_t)n * sizeof *dk);
    if (sv)
        memmove(dv, sv, (size_t)n * sizeof *dv);
    else {
        uint64_t i;
        for (i = 0; i < n; i++)
            dv[i] = 0.0;
    }
}

/* Where the top of a leaf's stream goes: the op's new leaves (filled from
 * the last one down) or the carry buffer. */
typedef struct topw {
    agg_key *k;                  /* current destination */
    double *v;
    uint64_t base;               /* top rank of its slot 0 */
    uint64_t i;                  /* current new leaf */
    node **nl;                   /* the op's new leaves, NULL for the carry buffer */
    const leaf_op *op;
} topw;

/* Write cnt items at top ranks [r, r + cnt); writes come in decreasing
 * rank order. */
static void topw_put(const agg_tree *t, topw *w, uint64_t r, const agg_key *sk,
                     const double *sv, uint64_t cnt)
{
    while (cnt) {
        uint64_t lo, m;
        if (r + cnt <= w->base) {
            uint32_t size;
            w->i--;
            newleaf_span(w->op, t->cap, w->i, &w->base, &size);
            w->k = node_keys(w->nl[w->i]);
            w->v = leaf_vals(t, w->nl[w->i]);
            continue;
        }
        lo = r > w->base ? r : w->base;
        m = r + cnt - lo;
        items_move(w->k + (lo - w->base), w->v + (lo - w->base), sk + (lo - r),
                   sv ? sv + (lo - r) : NULL, m);
        cnt -= m;
    }
}

/* Write cnt stream items at ranks [r, r + cnt): below `keep` into the
 * leaf itself (in place: the destination never lies below the source),
 * the rest to the top destination. */
AGG_INLINE void stream_put(const agg_tree *t, topw *w, agg_key *lk, double *lv, uint32_t keep,
                           uint64_t r, const agg_key *sk, const double *sv, uint64_t cnt)
{
    if (r + cnt > keep) {
        uint64_t lo = r > keep ? r : keep;
        topw_put(t, w, lo - keep, sk + (lo - r), sv ? sv + (lo - r) : NULL, r + cnt - lo);
        cnt = lo - r;
    }
    if (cnt == 1) {
        lk[r] = sk[0];
        lv[r] = sv ? sv[0] : 0.0;
    } else if (cnt && lk + r != sk) {
        items_move(lk + r, lv + r, sk, sv, cnt);
    }
}

/* Queue a new node's entry for its parent. */
AGG_INLINE void pending_push(insert_batch *b, int lev, const entry *e, uint32_t pos)
{
    pending_entry *p = &b->pending[lev][b->npending[lev]++];
    p->e = *e;
    p->pos = pos;
}

/* Apply pass: execute one leaf op (parent P, NULL when the root is a
 * leaf).  Nothing here can fail. */
static void exec_leaf_op(insert_batch *b, carry *cs, leaf_op *op, node *P)
{
    agg_tree *t = b->t;
    node *lf = op->leaf;
    agg_key *lk = node_keys(lf);
    double *lv = leaf_vals(t, lf);
    uint32_t L = lf->count, keep = op->keep, li = 0, ci = 0, c = cs->cn, cc, p;
    uint64_t k = op->k, gi = 0, g, g0, i;
    const agg_key *G = b->sk + op->start;
    const double *GV = b->vals ? b->vals + op->start : NULL;
    const uint32_t *pos = b->pos + op->start;
    agg_key *Ck = cs->ck[cs->cur];
    double *Cv = cs->cv[cs->cur];
    node **nl = NULL;
    ddsum delta, gsum, ssum, csum_next;
    topw w;

    if (!c && !op->spill && !op->nnew && !op->cout) {
        /* the common case: the new keys fit; merge in place from the top,
         * each run of leaf items moving up by the new keys below it */
        uint32_t Lend = L;
        for (g = k; g-- > 0;) {
            uint32_t q = pos[g], m = Lend - q;
            agg_key *dk = lk + q + g + 1;
            double *dv = lv + q + g + 1;
            while (m--) {
                dk[m] = lk[q + m];
                dv[m] = lv[q + m];
            }
            lk[q + g] = G[g];
            lv[q + g] = GV ? GV[g] : 0.0;
            Lend = q;
        }
        lf->count = keep;
        gsum = vals_ddsum(GV, k);
        op->gsum = gsum;
        cs->cn = 0;
        if (P)
            entry_apply(t, P, op->j, keep, &gsum);
        return;
    }
    dds_zero(&delta);
    dds_zero(&ssum);
    dds_zero(&csum_next);
    if (c)
        dds_add(&delta, cs->csum.hi, cs->csum.lo, cs->csum.exact, 0);
    gsum = vals_ddsum(GV, k);
    dds_add(&delta, gsum.hi, gsum.lo, gsum.exact, 0);

    /* 1. the smallest `spill` stream items go to the end of the left leaf */
    if (op->spill) {
        node *left = lf->prev;
        agg_key *ak = node_keys(left) + left->count;
        double *av = leaf_vals(t, left) + left->count;
        uint32_t s = op->spill, x = 0;
        /* (the plan never spills from a leaf that received a carry - its
         * left neighbour is full then - but the stream order is kept) */
        for (; x < s && ci < c; x++, ci++) {
            ak[x] = Ck[ci];
            av[x] = Cv[ci];
        }
        for (; x < s; x++) {
            if (gi < k && pos[gi] <= li) {
                ak[x] = G[gi];
                av[x] = GV ? GV[gi] : 0.0;
                gi++;
            } else {
                ak[x] = lk[li];
                av[x] = lv[li];
                li++;
            }
        }
        left->count += s;
        ssum = vals_ddsum(av, s);
        dds_add(&delta, ssum.hi, ssum.lo, ssum.exact, 1);
        if (li) {
            memmove(lk, lk + li, (size_t)(L - li) * sizeof *lk);
            memmove(lv, lv + li, (size_t)(L - li) * sizeof *lv);
            L -= li;
        }
        if (P) {
            entry_apply(t, P, op->j - 1, inner_cnt(t, P)[op->j - 1] + s, &ssum);
        }
    }

    /* 2. the top destination */
    memset(&w, 0, sizeof w);
    w.op = op;
    if (op->nnew) {
        uint32_t size;
        nl = b->leaves.a + op->nl0;
        w.nl = nl;
        w.i = op->nnew - 1;
        newleaf_span(op, t->cap, w.i, &w.base, &size);
        w.k = node_keys(nl[w.i]);
        w.v = leaf_vals(t, nl[w.i]);
    } else {
        w.k = cs->ck[cs->cur ^ 1];
        w.v = cs->cv[cs->cur ^ 1];
    }

    /* 3. backward merge of carry, leaf items and new keys: runs of new
     * keys between two leaf items move as one block */
    cc = c - ci;
    g = k;
    while (g > gi) {
        p = pos[g - 1] - li;
        g0 = g - 1;
        while (g0 > gi && pos[g0 - 1] == pos[g - 1])
            g0--;
        {
            uint64_t rk = (uint64_t)cc + p + (g0 - gi);   /* rank of G[g0] */
            if (L > p)
                stream_put(t, &w, lk, lv, keep, rk + (g - g0), lk + p, lv + p, L - p);
            stream_put(t, &w, lk, lv, keep, rk, G + g0, GV ? GV + g0 : NULL, g - g0);
        }
        L = p;
        g = g0;
    }
    if (L && (cc || L > keep))
        stream_put(t, &w, lk, lv, keep, cc, lk, lv, L);
    if (cc)
        stream_put(t, &w, lk, lv, keep, 0, Ck + ci, Cv + ci, cc);
    lf->count = keep;

    /* 4. new leaves: chain, entries for the parent, their sums leave */
    if (op->nnew) {
        node *prev = lf;
        for (i = 0; i < op->nnew; i++) {
            uint64_t base;
            uint32_t size;
            entry e;
            agg_key s;
            newleaf_span(op, t->cap, i, &base, &size);
            nl[i]->count = size;
            leaf_link_after(t, prev, nl[i]);
            prev = nl[i];
            s = node_keys(nl[i])[0];
            tail_ref(t, s);
            e = entry_make(t, nl[i], s);
            dds_add(&delta, e.hi, e.lo, e.exact, 1);
            b->new_leaf_entry[op->nl0 + i].e = e;
            b->new_leaf_entry[op->nl0 + i].pos = op->j;
        }
    }
    if (op->cout) {
        csum_next = vals_ddsum(cs->cv[cs->cur ^ 1], op->cout);
        dds_add(&delta, csum_next.hi, csum_next.lo, csum_next.exact, 1);
        cs->cur ^= 1;
    }
    cs->cn = op->cout;
    cs->csum = csum_next;
    op->gsum = gsum;

    /* 5. the parent's entries */
    if (P) {
        entry_apply(t, P, op->j, keep, &delta);
        if ((c || op->spill) && op->j > 0)
            inner_set_sep(t, P, op->j, lk[0]);
    }
}

/* Apply pass: the path node at level lev is left.  Its new children enter
 * it (in place if they fit, else it is cut into packed nodes whose
 * entries wait for its parent); its entry in the parent is updated. */
static void apply_finalize(insert_batch *b, const path_event *ev)
{
    agg_tree *t = b->t;
    int lev = ev->lev;
    node *x = ev->x, *parent = ev->parent;
    uint32_t pj = ev->pj, cap = t->cap;
    pending_entry *pl = b->pending[lev + 1];
    uint64_t np = b->npending[lev + 1], e;
    if (lev == (int)t->depth - 2) {     /* the leaf ops left its new leaves in new_leaf_entry */
        pl = b->new_leaf_entry + ev->nl0;
        np = ev->grown;
        b->dcnt[lev] = ev->dk;
        b->dsum[lev] = ev->dsum;
    }
    e = x->count + np;
    if (e <= cap) {
        if (np) {                   /* insert the new entries, last first */
            uint32_t i = x->count, w = (uint32_t)e;
            uint64_t pi = np;
            while (pi > 0) {
                const pending_entry *pe = &pl[pi - 1];
                uint32_t m = i - (pe->pos + 1);
                inner_shift(t, x, pe->pos + 1, w - m, m);
                w -= m;
                i = pe->pos + 1;
                inner_put(t, x, --w, &pe->e);
                pi--;
            }
            x->count = (uint32_t)e;
        }
        if (parent)
            entry_apply(t, parent, pj, inner_cnt(t, parent)[pj] + b->dcnt[lev], &b->dsum[lev]);
    } else {
        entry *tmp = b->tmp;
        uint64_t w = 0, pi = 0, s, q;
        uint32_t i;
        int full = ev->rm;
        for (i = 0; i < x->count; i++) {
            entry *te = &tmp[w++];
            te->sep = node_keys(x)[i];
            te->child = inner_child(t, x)[i];
            te->cnt = inner_cnt(t, x)[i];
            te->hi = inner_hi(t, x)[i];
            te->lo = inner_lo(t, x)[i];
            te->exact = inner_ex(t, x)[i];
            while (pi < np && pl[pi].pos == i)
                tmp[w++] = pl[pi++].e;
        }
        s = pack_count(e, cap);
        for (q = 0; q < s; q++) {
            uint64_t base;
            uint32_t size, m;
            node *nd = q == 0 ? x : b->inner.a[b->inner.used++];
            pack_span(e, s, q, full, cap, &base, &size);
            for (m = 0; m < size; m++)
                inner_put(t, nd, m, &tmp[base + m]);
            nd->count = size;
            if (q > 0) {
                agg_key up = node_keys(nd)[0];
                entry ne;
                node_keys(nd)[0].head = 0;
                node_keys(nd)[0].rest = 0;
                ne = entry_make(t, nd, up);
                pending_push(b, lev, &ne, pj);
            }
        }
        if (parent)
            inner_refresh(t, parent, pj);
    }
    b->npending[lev + 1] = 0;
    if (lev > 0) {
        b->dcnt[lev - 1] += b->dcnt[lev];
        dds_add(&b->dsum[lev - 1], b->dsum[lev].hi, b->dsum[lev].lo, b->dsum[lev].exact, 0);
    }
    b->dcnt[lev] = 0;
    dds_zero(&b->dsum[lev]);
}

/* Apply pass: the root got new siblings; stack new levels on top (packed
 * full, as the last node of a level). */
static void grow_root(insert_batch *b)
{
    agg_tree *t = b->t;
    entry *r = b->tmp;
    uint64_t m = b->npending[0] + 1, i;
    agg_key zero = {0, 0};
    r[0] = entry_make(t, t->root, zero);
    for (i = 1; i < m; i++)
        r[i] = b->pending[0][i - 1].e;
    b->npending[0] = 0;
    while (m > 1) {
        uint64_t s = pack_count(m, t->cap), q;
        for (q = 0; q < s; q++) {
            uint64_t base;
            uint32_t size, j;
            node *nd = b->inner.a[b->inner.used++];
            agg_key up;
            pack_span(m, s, q, 1, t->cap, &base, &size);
            for (j = 0; j < size; j++)
                inner_put(t, nd, j, &r[base + j]);
            nd->count = size;
            up = node_keys(nd)[0];
            node_keys(nd)[0].head = 0;
            node_keys(nd)[0].rest = 0;
            r[q] = entry_make(t, nd, up);   /* q <= base: already consumed */
        }
        m = s;
        t->depth++;
    }
    t->root = r[0].child;
}

/* Apply pass, leaf level, piece p (events [piece_cut[p], piece_cut[p + 1])) run by
 * worker w (its carry state): the leaf ops of the piece's leaf parents;
 * each leaf parent's event gets the count and sum of its new keys.
 * Writes only these parents, their leaves, their events, their ops and
 * their new leaves' entries: pieces cut at a leaf parent share nothing
 * they write (FAST keys: no tail reference counts). */
static uint64_t apply_piece(void *ctx, int p, int w)
{
    insert_batch *b = (insert_batch *)ctx;
    const agg_tree *t = b->t;
    int D = (int)t->depth;
    uint64_t e0 = b->piece_cut[p], e1 = b->piece_cut[p + 1];
    carry *cs = &b->cs[w];
    uint64_t e, r = e0 > 0 ? b->ev[e0 - 1].opend : 0;
    cs->cur = 0;
    cs->cn = 0;
    dds_zero(&cs->csum);
    b->ran[p] = 1;
    b->piece_worker[p] = w;
    for (e = e0; e < e1; e++) {
        path_event *ev = &b->ev[e];
        uint64_t end = ev->opend;
        if (ev->lev != D - 2)
            continue;
        ev->nl0 = r < end ? b->ops[r].nl0 : 0;
        ev->dk = 0;
        dds_zero(&ev->dsum);
        if (b->fused)
            memcpy(b->snap + e * t->inner_bytes, ev->x, t->inner_bytes);
        for (; r < end; r++) {
            leaf_op *op = &b->ops[r];
            if (r + PF_DIST < b->nops)
                leaf_prefetch_all(t, b->ops[r + PF_DIST].leaf, 1);
            if (b->fused && op->k) {
                /* the leaf is still as it was: earlier ops write only
                 * leaves to its left, new leaves and the carry buffer */
                key_group g;
                uint64_t dup;
                g.leaf = op->leaf;
                g.start = op->start;
                g.k = op->k;
                g.j = op->j;
                g.L = 0;
                if ((dup = search_group(b, &g)) != UINT64_MAX) {
                    b->halt_event[p] = e;
                    b->halt_op[p] = r;
                    return dup;
                }
            }
            exec_leaf_op(b, cs, op, op->parent);
            ev->dk += op->k;
            dds_add(&ev->dsum, op->gsum.hi, op->gsum.lo, op->gsum.exact, 0);
        }
    }
    b->halt_event[p] = e1;
    b->halt_op[p] = r;
    return UINT64_MAX;
}

/* Cut the apply pass into pieces: after the leaf parent's event at which
 * the ops reach each 1/APPLY_PIECES share (for two threads, FAST keys),
 * else one piece. */
static void apply_cut(insert_batch *b, int threads)
{
    int np = 0, k;
    b->piece_cut[0] = 0;
    if (threads && b->t->mode == AGG_KEYS_FAST)
        for (k = 1; k < APPLY_PIECES; k++) {
            uint64_t target = b->nops * (uint64_t)k / APPLY_PIECES, lo = 0, hi = b->nev;
            while (lo < hi) {       /* the first event whose ops reach it */
                uint64_t mid = lo + (hi - lo) / 2;
                if (b->ev[mid].opend < target)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            if (lo + 1 < b->nev && lo + 1 > b->piece_cut[np])
                b->piece_cut[++np] = lo + 1;
        }
    b->piece_cut[++np] = b->nev;
    b->npieces = np;
    for (k = 0; k < np; k++)
        b->ran[k] = 0;
}

/* Fused search found a present key: put leaf parent ev (event e) back as
 * its snapshot shows it, after its ops [ra, rb) ran (cs: the carry state,
 * holding items for op rb's leaf if the part stopped there).  Its
 * children are the same nodes (leaf ops never change a parent's child
 * list), and their stream - their items in order, each followed by the
 * new leaves its op made, the pending carry before the leaf it was meant
 * for - is the old stream plus the new keys of ops [ra, rb).  Taking
 * those out and cutting the rest by the snapshot's counts gives back
 * every leaf exactly; the new leaves are unlinked (insert_free gives them back);
 * the parent is copied back whole. */
static void undo_parent(insert_batch *b, path_event *ev, uint64_t e, uint64_t ra, uint64_t rb,
                        const carry *cs)
{
    agg_tree *t = b->t;
    node *S = (node *)(b->snap + e * t->inner_bytes);
    node **ch = inner_child(t, S);
    const uint64_t *scnt = inner_cnt(t, S);
    node *pending = cs && cs->cn ? b->ops[rb].leaf : NULL;
    agg_key *K = b->uk;
    double *V = b->uv;
    uint64_t n = 0, w = 0, x, r = ra, q, ki, kend;
    uint32_t i;
    for (i = 0; i < S->count; i++) {
        node *c = ch[i];
        if (c == pending) {
            memcpy(K + n, cs->ck[cs->cur], cs->cn * sizeof *K);
            memcpy(V + n, cs->cv[cs->cur], cs->cn * sizeof *V);
            n += cs->cn;
        }
        memcpy(K + n, node_keys(c), c->count * sizeof *K);
        memcpy(V + n, leaf_vals(t, c), c->count * sizeof *V);
        n += c->count;
        while (r < rb && b->ops[r].j < i)
            r++;
        if (r < rb && b->ops[r].j == i) {
            const leaf_op *op = &b->ops[r];
            for (q = 0; q < op->nnew; q++) {
                node *m = b->leaves.a[op->nl0 + q];
                memcpy(K + n, node_keys(m), m->count * sizeof *K);
                memcpy(V + n, leaf_vals(t, m), m->count * sizeof *V);
                n += m->count;
            }
            if (op->nnew) {         /* unlink them */
                node *after = b->leaves.a[op->nl0 + op->nnew - 1]->next;
                c->next = after;
                if (after)
                    after->prev = c;
            }
        }
    }
    /* take the new keys out (both in key order) */
    r = ra;
    ki = kend = 0;
    for (x = 0; x < n; x++) {
        while (ki == kend && r < rb) {
            ki = b->ops[r].start;
            kend = ki + b->ops[r].k;
            r++;
        }
        if (ki < kend && K[x].head == b->sk[ki].head && K[x].rest == b->sk[ki].rest) {
            ki++;
            continue;
        }
        K[w] = K[x];
        V[w] = V[x];
        w++;
    }
    for (i = 0, x = 0; i < S->count; i++) {
        node *c = ch[i];
        c->count = (uint32_t)scnt[i];
        memcpy(node_keys(c), K + x, c->count * sizeof *K);
        memcpy(leaf_vals(t, c), V + x, c->count * sizeof *V);
        x += c->count;
    }
    memcpy(ev->x, S, t->inner_bytes);
}

/* Fused search found a present key: undo what apply piece p did. */
static void undo_piece(insert_batch *b, int p)
{
    int D = (int)b->t->depth;
    uint64_t e0 = b->piece_cut[p], e1 = b->piece_cut[p + 1];
    uint64_t e, r = e0 > 0 ? b->ev[e0 - 1].opend : 0;
    if (!b->ran[p])
        return;
    for (e = e0; e < e1 && e <= b->halt_event[p]; e++) {
        path_event *ev = &b->ev[e];
        if (ev->lev != D - 2)
            continue;
        if (e == b->halt_event[p])
            undo_parent(b, ev, e, r, b->halt_op[p], &b->cs[b->piece_worker[p]]);
        else
            undo_parent(b, ev, e, r, ev->opend, NULL);
        r = ev->opend;
    }
}

/* Apply pass: the leaf ops (for a large FAST batch on two threads, cut at
 * a leaf parent near the middle), then, in the check pass's order, the
 * path nodes are finalized (new children enter, overfull nodes split,
 * entries above are updated); new root levels.  Returns UINT64_MAX, or
 * (fused search) the first new key found present, after putting every
 * leaf parent back as it was. */
static uint64_t insert_apply(insert_batch *b, int threads)
{
    agg_tree *t = b->t;
    int D = (int)t->depth, lev, p;
    uint64_t e, r, dup;
    for (lev = 0; lev < D; lev++) {
        b->dcnt[lev] = 0;
        dds_zero(&b->dsum[lev]);
        b->npending[lev] = 0;
    }
    if (D == 1) {                   /* the root leaf's ops; its new leaves become its siblings */
        carry *cs = &b->cs[0];
        cs->cur = 0;
        cs->cn = 0;
        dds_zero(&cs->csum);
        for (r = 0; r < b->nops; r++) {
            leaf_op *op = &b->ops[r];
            exec_leaf_op(b, cs, op, NULL);
        }
        for (r = 0; r < b->new_leaves; r++)
            pending_push(b, 0, &b->new_leaf_entry[r].e, 0);
    } else {
        apply_cut(b, threads);
        dup = run_parts(b, apply_piece, b->npieces, threads);
        if (dup != UINT64_MAX) {
            for (p = 0; p < b->npieces; p++)
                undo_piece(b, p);
            return dup;
        }
    }
    b->leaves.used = b->leaves.n;
    for (e = 0; e < b->nev; e++)
        apply_finalize(b, &b->ev[e]);
    if (b->npending[0])
        grow_root(b);
    t->len += b->n;
    return UINT64_MAX;
}

/* Free everything a batch insert holds; with `unreserve` also the
 * reserved nodes not handed out and the tail copies (failure paths). */
static void insert_free(insert_batch *b, int unreserve)
{
    agg_tree *t = b->t;
    int d;
    if (unreserve) {
        uint64_t i;
        for (i = b->leaves.used; i < b->leaves.n; i++)
            mem_free(t, b->leaves.a[i], t->leaf_bytes);
        for (i = b->inner.used; i < b->inner.n; i++)
            mem_free(t, b->inner.a[i], t->inner_bytes);
        if (b->own)
            for (i = 0; i < b->n; i++)
                tail_release(t, b->own[i]);
    }
    free(b->leaves.a);
    free(b->inner.a);
    free(b->own);
    free(b->pos);
    for (d = 0; d < 2; d++) {
        free(b->pt[d].ops);
        free(b->pt[d].grp);
        free(b->pt[d].ev);
    }
    for (d = 0; d < MAX_DEPTH; d++)
        free(b->pending[d]);
    free(b->tmp);
    free(b->new_leaf_entry);
    free(b->snap);
    free(b->uk);
    free(b->uv);
    free(b->cs[0].ck[0]);
    free(b->cs[0].cv[0]);
}

/* Reserve everything the plan needs: nodes, tail copies, buffers.  0 if
 * an allocation failed (the caller unwinds with insert_free(b, 1)). */
static int insert_reserve(insert_batch *b)
{
    agg_tree *t = b->t;
    uint64_t i;
    int d;
    /* the reserve arrays first, so that unwinding knows what exists */
    b->leaves.a = (node **)scratch_alloc((size_t)b->new_leaves * sizeof(node *));
    b->inner.a = (node **)scratch_alloc((size_t)b->new_inner * sizeof(node *));
    if (!b->leaves.a || !b->inner.a)
        return 0;
    for (i = 0; i < b->new_leaves; i++) {
        if (!(b->leaves.a[i] = leaf_new(t)))
            return 0;
        b->leaves.n++;
    }
    for (i = 0; i < b->new_inner; i++) {
        if (!(b->inner.a[i] = inner_new(t)))
            return 0;
        b->inner.n++;
    }
    for (d = 0; d < (int)t->depth; d++)
        if (b->maxpend[d] &&
            !(b->pending[d] = (pending_entry *)scratch_alloc((size_t)b->maxpend[d] *
                                                             sizeof(pending_entry))))
            return 0;
    b->ntmp = b->maxsplit > b->rootgrow + 1 ? b->maxsplit : b->rootgrow + 1;
    if (!(b->tmp = (entry *)scratch_alloc((size_t)b->ntmp * sizeof(entry))))
        return 0;
    if (!(b->new_leaf_entry = (pending_entry *)scratch_alloc((size_t)b->new_leaves *
                                                             sizeof(pending_entry))))
        return 0;
    b->cs[0].ck[0] = (agg_key *)scratch_alloc(4 * (size_t)t->cap * sizeof(agg_key));
    b->cs[0].cv[0] = (double *)scratch_alloc(4 * (size_t)t->cap * sizeof(double));
    if (!b->cs[0].ck[0] || !b->cs[0].cv[0])
        return 0;
    for (d = 0; d < 4; d++) {
        b->cs[d / 2].ck[d % 2] = b->cs[0].ck[0] + (size_t)d * t->cap;
        b->cs[d / 2].cv[d % 2] = b->cs[0].cv[0] + (size_t)d * t->cap;
    }
    if (b->fused) {
        /* leaf parent snapshots; the undo buffer holds one leaf parent's
         * items and new keys */
        uint64_t e, r = 0, k, maxk = 0, u;
        for (e = 0; e < b->nev; e++) {
            if (b->ev[e].lev != (int)t->depth - 2)
                continue;
            for (k = 0; r < b->ev[e].opend; r++)
                k += b->ops[r].k;
            if (k > maxk)
                maxk = k;
        }
        u = (uint64_t)t->cap * t->cap + maxk;
        b->snap = (char *)scratch_alloc((size_t)b->nev * t->inner_bytes);
        b->uk = (agg_key *)scratch_alloc((size_t)u * sizeof(agg_key));
        b->uv = (double *)scratch_alloc((size_t)u * sizeof(double));
        if (!b->snap || !b->uk || !b->uv)
            return 0;
    }
    if (t->mode == AGG_KEYS_GENERAL) {
        b->own = (agg_key *)scratch_alloc((size_t)b->n * sizeof(agg_key));
        if (!b->own)
            return 0;
        for (i = 0; i < b->n; i++) {
            if (!tail_copy(t, batch_key(b, i), &b->own[i])) {
                uint64_t j;
                for (j = 0; j < i; j++)
                    tail_release(t, b->own[j]);
                free(b->own);
                b->own = NULL;
                return 0;
            }
        }
        b->sk = b->own;
    }
    return 1;
}

/* See aggtree.h and section 13. */
agg_status agg_tree_insert_sorted(agg_tree *t, const agg_key *keys, const double *values,
                                  uint64_t n, uint64_t *bad_index)
{
    insert_batch b;
    agg_status st;
    long mode;
    int threads;
    uint64_t dup;
    if (n == 0)
        return AGG_OK;
    /* 1. order, before anything else */
    if (!keys_increasing(t, keys, n, bad_index))
        return AGG_INVALID;
    if (!t->root)
        return agg_tree_build(t, keys, values, n, bad_index);
    memset(&b, 0, sizeof b);
    b.t = t;
    b.keys = keys;
    b.sk = keys;
    b.vals = values;
    b.n = n;
    mode = atomic_load_relaxed(&g_batch_mode);
    threads = batch_threads(n, mode);
    b.fused = t->mode == AGG_KEYS_FAST && t->depth >= 2;
    /* 2. check and plan (reads only) */
    b.pos = (uint32_t *)scratch_alloc((size_t)n * sizeof(uint32_t));
    if (!b.pos) {
        insert_free(&b, 1);
        return AGG_NOMEM;
    }
    st = insert_check(&b, bad_index, threads);
    if (st != AGG_OK) {
        insert_free(&b, 1);
        return st;
    }
    /* 3. reserve */
    if (!insert_reserve(&b)) {
        insert_free(&b, 1);
        return AGG_NOMEM;
    }
    /* 4. apply: fails only on a present key found by the fused search,
     * and then has put everything back */
    dup = insert_apply(&b, threads);
    if (dup != UINT64_MAX) {
        if (bad_index)
            *bad_index = dup;
        insert_free(&b, 1);
        return AGG_DUPLICATE;
    }
    insert_free(&b, 0);
    return AGG_OK;
}
