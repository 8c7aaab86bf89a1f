/*
 * core/internal.h - what the translation units of the aggtree core share
 * (private: not part of the API in aggtree.h): build switches, the node and
 * tree structures, node accessors, the key order and the in-node searches,
 * prefetching, the exact double-double arithmetic, and the prototypes of
 * the functions one unit defines for another (AGG_INTERN).
 *
 * The core is built as one amalgamation (core/amalgamation.c #includes
 * every unit, so that the compiler inlines across them as it did when the
 * core was one file) or, with -DAGGTREE_UNITY=OFF, unit by unit; under the
 * amalgamation AGG_INTERN is `static`, otherwise hidden extern.
 *
 * ==========================================================================
 *  DESIGN
 * ==========================================================================
 * The design is told in numbered sections, each at the top of the unit
 * holding its code: 1, 2, 4, 5, 8 and 12 here; 3 keys.c; 6, 7 tree.c; 9 build.c; 10
 * alloc.c; 11 check.c; 13 batch_insert.c (insert) and batch_delete.c
 * (delete), with what both share in batch.c and their thread runner in
 * threads.c; 14 sort.c.  The test hooks (aggtree_test.h) are in
 * test_control.c.  Dated measurements behind the choices are in
 * bench/README.md ("Core design measurements").
 *
 * 1. What the tree is
 * -------------------
 * A B+tree: every item lives in a leaf, leaves are chained left to right,
 * and internal nodes hold only routing separators plus, for every child, a
 * summary of the child's subtree: how many items it holds (`cnt`) and the
 * sum of their values (`hi` + `lo`, a double-double).  The counts
 * make rank and select O(log n) walks; the sums make a range sum a walk
 * down the two boundary paths that adds whole-child sums in between.
 *
 * One tree has one node capacity, `cap` = node_size (4..4096), chosen at
 * creation and used for both kinds of node: a leaf holds at most cap items,
 * an internal node at most cap children.  `min` = cap / 2.
 *
 * 2. Node layout
 * --------------
 * Every node is ONE allocation: a 24-byte header followed by
 * struct-of-arrays sized by the tree's capacity.  The array offsets depend
 * only on cap, so they are computed once per tree (agg_tree.off_*).
 *
 *   leaf (24 + 24*cap bytes):
 *   +-------+------+------+------+---------------------------+-------------+
 *   | count | leaf | prev | next | agg_key keys[cap]         | double      |
 *   | u32   | u32  | ptr  | ptr  | (head, rest) 16 B each    | vals[cap]   |
 *   +-------+------+------+------+---------------------------+-------------+
 *             = 1     leaf chain    keys[0] < keys[1] < ... < keys[count-1]
 *
 *   internal (24 + 49*cap bytes, rounded up to 8):
 *   +--------+---------------+-------------+-----------+----------+----------+-----------+
 *   | header | agg_key       | node *      | uint64_t  | double   | double   | uint8_t   |
 *   | leaf=0 | sep[cap]      | child[cap]  | cnt[cap]  | hi[cap]  | lo[cap]  | exact[cap]|
 *   +--------+---------------+-------------+-----------+----------+----------+-----------+
 *
 *            sep[1]        sep[2]              sep[count-1]
 *              |             |                     |
 *   child[0]   v  child[1]   v  child[2]   ...     v  child[count-1]
 *   (keys < sep[1]) (sep[1] <= keys < sep[2])        (sep[count-1] <= keys)
 *
 * sep[0] is unused and always zeroed.  cnt[i], hi[i] + lo[i] and exact[i]
 * summarise child i.  The 24 bytes per leaf slot are what the project's
 * memory budget (<= 32 bytes per item, agg_tree_nbytes / len, FAST keys)
 * is made of; the rest is leaf headers and internal nodes (49 bytes per
 * child, so ~1 byte per item at cap 64).  Measured at cap 64, 1e6 items:
 * 29.15 bytes/item after random-order inserts (section 6), 25.2 after
 * sequential inserts, 28.8 after a bulk build (leaves 7/8 full, section 9).
 *
 * 4. Invariants (verified, every one of them, by agg_tree_check)
 * ---------------------------------------------------------------
 *  I1  Keys strictly increase within a leaf and along the leaf chain.
 *  I2  In an internal node, for 1 <= i < count:
 *        max(subtree of child i-1) < sep[i] <= min(subtree of child i);
 *      sep[0] is {0, 0}.
 *  I3  All leaves are at depth t->depth - 1 (root = depth 0).
 *  I4  Fill: count <= cap everywhere.  The root: a leaf holds >= 1 item, an
 *      internal root >= 2 children.  A node on the rightmost path (the last
 *      node of its level) holds >= 1 item if a leaf, >= 2 children if
 *      internal.  Every other node holds >= min = cap / 2.
 *  I5  cnt[i] == number of items under child i; the sum of all == t->len.
 *  I6  Sums, per entry (section 8): if exact[i] == 1 then hi[i] + lo[i] is
 *      EXACTLY the real sum of the values under child i, and (hi, lo) is
 *      its canonical double-double form (hi = round(sum), lo = sum - hi).
 *      If exact[i] == 0 then (hi[i], lo[i]) is bitwise what
 *      node_summary() computes from child i's own values (leaf) or
 *      entries (internal) - and that computation also reports inexact.
 *  I7  Leaf chain: first->prev == NULL, last->next == NULL, and following
 *      next from the leftmost leaf visits every leaf in key order, with
 *      x->next->prev == x; internal nodes have prev == next == NULL.
 *  I8  Tail reference counts equal the number of references (items plus
 *      separators) found in the tree; no stored tail has length 0.
 *  I9  t->nbytes == sum over live nodes of their size + sum over distinct
 *      tails of sizeof(agg_tail) + len.  An empty tree has no nodes, depth
 *      0 and nbytes 0.
 *
 *  Why I4 exempts the rightmost path: the append pattern (section 6)
 *  splits a full rightmost node so that the left part STAYS FULL and the
 *  new right node gets one item (leaves) or two children (internal nodes).
 *  Sequential loads then pack every node full, as SQLite's "quick balance"
 *  does.  That is incompatible with "every non-root node >= cap/2"; the
 *  rightmost node of each level is the only place the pattern creates, so
 *  only it is exempt.  An internal rightmost node keeps >= 2 children so
 *  that its last child always has a sibling under the same parent to
 *  merge with or borrow from.  Delete repairs any path node below min,
 *  exempt or not, so the exemption never spreads.
 *
 * 5. Walking the tree
 * -------------------
 * Descending to key k: at an internal node take child i = the number of
 * separators sep[1..count-1] that are <= k (an upper bound).  By I2 every
 * item < k lies in children 0..i or is not in the tree, and every item of
 * children > i is > k.  Both rank sides use the same child:
 *   rank(k, after=0) = items < k  = sum cnt[0..i) + lower_bound in the leaf
 *   rank(k, after=1) = items <= k = sum cnt[0..i) + upper_bound in the leaf
 * since the items of children before i are < sep[i] <= k (so counted by
 * both) and the items of children after i are >= sep[i+1] > k (counted by
 * neither).  A search key equal to a separator goes right, where an item
 * equal to it would be.
 *
 * select(index) walks down subtracting cnt[] until the index falls inside a
 * child; every count scan runs from the nearer end of the node, using the
 * node's total from its parent entry (rank sums cnt[] of the children left
 * of the path, or subtracts those right of it from the total).
 * read(index, max) selects the start and then follows the leaf
 * chain, next or prev.  sum(lo, hi) descends while [lo, hi) lies in one
 * child; where it splits, it adds the middle children whole and follows the
 * left boundary (a suffix of a subtree: add the children to the right
 * whole) and the right boundary (a prefix) down to the leaves, where single
 * values are added.  Whole children are taken whole as soon as the boundary
 * falls on their edge.  Everything is accumulated in double-double and
 * rounded once.  rank_many remembers the leaf of the previous answer and
 * its base rank: when the next key falls in that leaf or the next one (two
 * comparisons say so), the descent is skipped, which makes sorted batches
 * nearly linear; any order stays correct.
 *
 * 8. Counts and sums
 * ------------------
 * Counts are integers: cnt[i] +/- 1 along the path, recomputed (sum of the
 * child's cnt[] or its item count) for every entry whose child changed
 * shape.
 *
 * Sums must not drift: a stored sum has to be a function of the items
 * present, not of the history (insert 1e20 then delete it, and a plain
 * running sum has lost every small value under it).  The baseline -
 * recompute every path entry from its child with compensated summation -
 * satisfies that but costs O(cap) additions per level, and touches the
 * whole of every path node: measured at cap 64, 326 ns per insert with
 * the tree in cache (86 ns with the scheme below) and ~790 ns at 1e6 items
 * (~240 ns).  This file instead keeps each entry in one of two states,
 * flagged by exact[i]:
 *
 *   exact    hi + lo equals the true sum S of the subtree exactly, stored
 *            canonically (hi = fl(S), lo = S - hi).  S is a function of
 *            the items alone.  Adding or removing a value v is O(1):
 *            dd_add_exact() computes S + v with error-free transformations
 *            (TwoSum) and reports whether the result is again exactly a
 *            double-double; if so it is stored, still exact.
 *   inexact  (hi, lo) is node_summary() of the child: a deterministic
 *            compensated (TwoSum cascade, i.e. double-double) sum of the
 *            child's values or of its entries, in order.  It is a function
 *            of the child's current contents; it is recomputed, never
 *            updated incrementally.
 *
 * Moving items between two sibling leaves (insert's overflow) is the same
 * kind of update: the exact sum m of the moved values is computed (O(items
 * moved)); if m and both updated entries stay exact, the entries change by
 * -m and +m; otherwise both are recomputed.
 *
 * When an exact update would round, or the entry is inexact, or the child
 * changed shape, the entry is recomputed by node_summary(), which itself
 * reports exact when every child entry it read was exact and none of its
 * own additions rounded.  So no stored sum ever carries error from an
 * earlier state: it is exact, or a fresh double-double sum of exact-or-
 * fresh parts, with the error bound of a depth-level double-double sum
 * (relative to the sum of |values|, ~depth * cap * 2^-104).
 *
 * For ordinary data (integers, decimals, measurements whose magnitudes span
 * less than ~50 binary orders within a subtree) every sum is exactly
 * representable in 106 bits, every entry stays exact and every update is
 * O(1) per level.  Data spanning wider (1e-30 next to 1e30) makes the
 * affected entries inexact and their updates O(cap), the baseline cost,
 * and only there.  Integers below 2^53 always sum exactly (their sums fit
 * in 106 bits); sum() of a range adds exact or compensated parts in
 * double-double and rounds once, so it is within a few ulps of math.fsum
 * except under cancellation beyond double-double (relative to sum |v|).
 * An empty range is 0.0 without any arithmetic.
 *
 * TwoSum needs IEEE round-to-nearest double additions that the compiler
 * does not reassociate: building with -ffast-math is refused below.
 *
 * 12. Deviations from the first design, and why
 * ---------------------------------------------
 *  - Rightmost-path fill exemption (I4): needed by the quick balance.
 *  - 2-to-3 leaf splits when both siblings are full (a small gain over
 *    1-to-2, measured in section 6).
 *  - exact[] per internal entry (1 byte/entry, ~0.02 bytes/item at cap 64)
 *    and the exact/inexact sum scheme of section 8 instead of recomputing
 *    every path entry: same no-drift property, O(1) per level.
 */
#ifndef AGGTREE_CORE_INTERNAL_H
#define AGGTREE_CORE_INTERNAL_H

#include "aggtree.h"

#include "aggtree.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__STDC_NO_ATOMICS__)
#define AGG_ATOMIC(T) volatile T
#define atomic_load_relaxed(p) (*(p))
#define atomic_store_relaxed(p, v) (*(p) = (v))
#define atomic_add_relaxed(p, v) (*(p) += (v))
#define atomic_exchange_relaxed(p, v) agg_exchange_plain((p), (v))
static inline long agg_exchange_plain(volatile long *p, long v)
{
    long old = *p;
    *p = v;
    return old;
}
#else
#include <stdatomic.h>
#define AGG_ATOMIC(T) _Atomic T
#define atomic_load_relaxed(p) atomic_load_explicit((p), memory_order_relaxed)
#define atomic_store_relaxed(p, v) \
    atomic_store_explicit((p), (v), memory_order_relaxed)
#define atomic_add_relaxed(p, v) \
    atomic_fetch_add_explicit((p), (v), memory_order_relaxed)
#define atomic_exchange_relaxed(p, v) \
    atomic_exchange_explicit((p), (v), memory_order_relaxed)
#endif

#include "threading.h"     /* AGG_THREADS, threads_allowed() */

#ifdef __FAST_MATH__
#error "the aggtree core needs exact IEEE additions (TwoSum); do not build it with -ffast-math"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define AGG_LIKELY(x) __builtin_expect(!!(x), 1)
#define AGG_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define AGG_PREFETCH(p) __builtin_prefetch(p)
#define AGG_INLINE static inline __attribute__((always_inline))
#define AGG_UNUSED __attribute__((unused))
#else
#define AGG_LIKELY(x) (x)
#define AGG_UNLIKELY(x) (x)
#define AGG_PREFETCH(p) ((void)(p))
#define AGG_INLINE static inline
#define AGG_UNUSED
#endif

/* Deepest tree possible: every level at least doubles (internal nodes keep
 * >= 2 children), so 2^64 items need at most 65 levels. */
#define MAX_DEPTH 72

/* Functions and data one unit defines for another: internal linkage in the
 * amalgamation (so the compiler sees every caller), hidden otherwise. */
#ifdef AGG_AMALGAMATION
#define AGG_INTERN static
#define AGG_INTERN_DATA static
#elif defined(__GNUC__) || defined(__clang__)
#define AGG_INTERN __attribute__((visibility("hidden")))
#define AGG_INTERN_DATA extern __attribute__((visibility("hidden")))
#else
#define AGG_INTERN
#define AGG_INTERN_DATA extern
#endif

/* ====================================================================== */
/*  Structures                                                            */
/* ====================================================================== */

/* Header shared by both node kinds; the arrays follow (see section 2). */
typedef struct node {
    uint32_t count;              /* items (leaf) or children (internal) in use */
    uint32_t leaf;               /* 1 for a leaf, 0 for an internal node */
    struct node *prev;           /* leaf chain: left neighbour or NULL; NULL in internal nodes */
    struct node *next;           /* leaf chain: right neighbour or NULL; NULL in internal nodes */
} node;

/* A pool of equal-sized blocks carved from chunks its tree owns (section
 * 10).  The chunk list threads through a header at each chunk's start. */
typedef struct pool_chunk {      /* (allocated apart from its memory: alloc.c) */
    struct pool_chunk *next;
    void *mem;                   /* the chunk's blocks */
    size_t bytes;                /* the chunk's size */
} pool_chunk;

typedef struct node_pool {
    void *free;                  /* freed blocks, linked through their first word */
    char *bump, *end;            /* the newest chunk's blocks never handed out */
    pool_chunk *chunks;          /* every chunk, newest first */
    size_t blocks;               /* blocks in the next chunk (doubles to POOL_CHUNK_MAX) */
} node_pool;

struct agg_tree {
    node *root;                  /* NULL when empty */
    uint64_t len;                /* number of items */
    size_t nbytes;               /* bytes in live node and tail allocations */
    agg_keymode mode;            /* FAST or GENERAL, fixed at creation */
    uint32_t cap;                /* node_size: max items per leaf, children per internal node */
    uint32_t min;                /* cap / 2: min fill of non-root, non-rightmost nodes */
    uint32_t depth;              /* levels: 0 empty, 1 = the root is a leaf */
    size_t off_vals;             /* leaf: offset of double vals[cap] */
    size_t off_child;            /* internal: offset of node *child[cap] */
    size_t off_cnt;              /* internal: offset of uint64_t cnt[cap] */
    size_t off_hi;               /* internal: offset of double hi[cap] (sum, high part) */
    size_t off_lo;               /* internal: offset of double lo[cap] (sum, low part) */
    size_t off_exact;            /* internal: offset of uint8_t exact[cap] */
    size_t leaf_bytes;           /* size of one leaf allocation */
    size_t inner_bytes;          /* size of one internal node allocation */
    node_pool pools[2];          /* blocks of leaf_bytes [0] and inner_bytes [1] (section 10) */
};

/* One internal-node entry in transit (a new child on its way up). */
typedef struct entry {
    agg_key sep;                 /* separator: min key of the child (owns a tail ref) */
    node *child;                 /* the child */
    uint64_t cnt;                /* items under the child */
    double hi;                   /* sum of the child's values, high part */
    double lo;                   /* low part */
    uint8_t exact;               /* 1 if hi + lo is exactly that sum (I6) */
} entry;

/* What crossed the first boundary in leaves_rebalance_insert. */
typedef struct moved {
    int dir;                     /* +1: g[0] -> g[1], -1: g[1] -> g[0], 0: nothing */
    int exact;                   /* hi + lo is exactly the moved values' sum */
    double hi;                   /* their sum, canonical double-double */
    double lo;
} moved;

/* A double-double being accumulated exactly: `exact` stays 1 while
 * hi + lo is exactly the sum of what was added (canonical form). */
typedef struct ddsum {
    double hi;                   /* rounded sum */
    double lo;                   /* its error */
    int exact;                   /* hi + lo is exactly the sum */
} ddsum;

/* A path through the tree that moves forward with increasing keys.  Upper
 * bounds are kept as references to separator slots, never as copies: a
 * GENERAL separator that gets replaced may free its tail. */
typedef struct finger {
    node *path[MAX_DEPTH];       /* path[d]: node at level d (0 = root, depth - 1 = leaf) */
    uint32_t idx[MAX_DEPTH];     /* path[d + 1] is child idx[d] of path[d] */
    node *hn[MAX_DEPTH];         /* keys of path[d] are < separator hs[d] of hn[d]; NULL: unbounded */
    uint32_t hs[MAX_DEPTH];
} finger;

/* ====================================================================== */
/*  Shared functions (defined in the unit named)                          */
/* ====================================================================== */

/* alloc.c */
AGG_INTERN long alloc_fail_after(long n);
AGG_INTERN void *raw_alloc(size_t size);
AGG_INTERN void pool_release(node_pool *pl);
AGG_INTERN void *mem_alloc(agg_tree *t, size_t size);
AGG_INTERN void mem_free(agg_tree *t, void *p, size_t size);

/* keys.c */
AGG_INTERN int tail_copy(agg_tree *t, agg_key k, agg_key *out);

/* node.c */
AGG_INTERN int node_summary(const agg_tree *t, node *c, uint64_t *cnt, double *hi,
                            double *lo);
AGG_INTERN node *leaf_new(agg_tree *t);
AGG_INTERN void leaf_insert_at(const agg_tree *t, node *n, uint32_t pos, agg_key k,
                               double v);
AGG_INTERN void leaf_remove_at(const agg_tree *t, node *n, uint32_t pos);
AGG_INTERN void leaf_move_tail(const agg_tree *t, node *src, node *dst, uint32_t k);
AGG_INTERN void leaf_move_head(const agg_tree *t, node *src, node *dst, uint32_t k);
AGG_INTERN void leaf_link_after(agg_tree *t, node *a, node *m);
AGG_INTERN uint32_t leaves_rebalance_insert(const agg_tree *t, node **g, uint32_t m,
                                            const uint32_t *tg, uint32_t q, agg_key k,
                                            double v, moved *mv);
AGG_INTERN node *inner_new(agg_tree *t);
AGG_INTERN void inner_shift(const agg_tree *t, node *n, uint32_t from, uint32_t to,
                            uint32_t k);
AGG_INTERN void inner_put(const agg_tree *t, node *n, uint32_t pos, const entry *e);
AGG_INTERN void inner_insert_entry(const agg_tree *t, node *n, uint32_t pos,
                                   const entry *e);
AGG_INTERN void inner_remove_entry(const agg_tree *t, node *n, uint32_t pos);
AGG_INTERN void inner_refresh(const agg_tree *t, node *p, uint32_t j);
AGG_INTERN entry entry_make(const agg_tree *t, node *c, agg_key sep);
AGG_INTERN void inner_bump(const agg_tree *t, node *p, uint32_t j, int dcnt,
                           const double *xs, int nx);
AGG_INTERN void inner_set_sep(agg_tree *t, node *p, uint32_t j, agg_key k);
AGG_INTERN void inner_split_insert(const agg_tree *t, node *n, node *r, uint32_t pos,
                                   const entry *e, uint32_t a, agg_key *up);
AGG_INTERN void inner_merge(agg_tree *t, node *p, uint32_t j);
AGG_INTERN void inner_move_right(const agg_tree *t, node *p, uint32_t j, uint32_t k);
AGG_INTERN void inner_move_left(const agg_tree *t, node *p, uint32_t j, uint32_t k);
AGG_INTERN void node_free_rec(agg_tree *t, node *n);

/* build.c.  BUILD_SLACK_DIV: if > 0 (8, the default), the bulk build leaves
 * cap / BUILD_SLACK_DIV slots of every leaf free; 0: leaves packed
 * full (section 9 says why). */
#ifndef BUILD_SLACK_DIV
#define BUILD_SLACK_DIV 8
#endif
/* tree.c */
AGG_INTERN void pack_span(uint64_t e, uint64_t s, uint64_t i, int full, uint32_t cap,
                          uint64_t *base, uint32_t *size);
AGG_INTERN void root_collapse(agg_tree *t);
AGG_INTERN void node_repair(agg_tree *t, node *p, uint32_t i);

/* build.c */
AGG_INTERN long build_slack_set(long slack);
AGG_INTERN uint32_t build_leaf_fill(uint32_t cap);
AGG_INTERN agg_key node_min_key(const agg_tree *t, node *n);

/* batch.c */
AGG_INTERN void *scratch_alloc(size_t size);
AGG_INTERN ddsum vals_ddsum(const double *v, uint64_t n);
AGG_INTERN void entry_apply(const agg_tree *t, node *p, uint32_t j, uint64_t cnt, const ddsum *d);
AGG_INTERN void finger_descend(const agg_tree *t, finger *f, int d, agg_key k, int resume);
AGG_INTERN int batch_threads(uint64_t n, long mode);
AGG_INTERN int keys_increasing(const agg_tree *t, const agg_key *keys, uint64_t n,
                               uint64_t *bad_index);
AGG_INTERN_DATA AGG_ATOMIC(long) g_batch_mode;
AGG_INTERN long batch_thread_mode(long mode);

/* Exact fixed-point accumulator: digit i (32 bits' worth, kept in an int64
 * so carries can wait) has weight 2^(32 i - 1074); 72 digits cover every
 * finite double and sums of up to 2^64 of them.  Normalisation truncates
 * (digits may differ in sign, |digit| < 2^32), which is not a canonical
 * form but makes "value == 0" equivalent to "every digit == 0" - the only
 * question the checker asks - and keeps the touched range [lo, hi] small
 * for sums of either sign. */
#define XACC_DIGITS 72
typedef struct xacc {
    int64_t d[XACC_DIGITS];      /* digits; zero outside [lo, hi] */
    int lo;                      /* lowest possibly nonzero digit */
    int hi;                      /* highest possibly nonzero digit (lo > hi: none) */
    uint32_t adds;               /* additions since the last normalisation */
    int nonfinite;               /* an infinity or NaN was added */
} xacc;

/* check.c (the exact accumulator, also used by tests/c/test_check.c) */
AGG_INTERN void xacc_zero(xacc *a);
AGG_INTERN void xacc_add(xacc *a, double x);
AGG_INTERN void xacc_merge(xacc *a, xacc *b);
AGG_INTERN int xacc_is_zero(xacc *a);

/* threads.c: part p of a pass cut into parts, run by worker w (0: the
 * calling thread, 1: the helper); returns UINT64_MAX, or a result that
 * stops the pass. */
typedef uint64_t (*part_fn)(void *ctx, int p, int w);
/* Run parts 0..np-1 of a pass on the calling thread and, with threads ==
 * 1, on a helper thread too (threads == 2: every part on the caller, a
 * test mode).  Returns the smallest result, or UINT64_MAX. */
AGG_INTERN uint64_t run_parts(void *ctx, part_fn fn, int np, int threads);

/* test_control.c */
AGG_INTERN uint64_t shape_hash(const agg_tree *t);

/* ====================================================================== */
/*  Inline helpers: key order, in-node search, prefetch, tails, sums      */
/* ====================================================================== */

/* Node array accessors.  Keys (leaf) and separators (internal) sit right
 * after the header; everything else at the per-tree offsets. */
AGG_INLINE agg_key *node_keys(node *n)
{
    return (agg_key *)(void *)((char *)n + sizeof(node));
}
/* Leaf n's values, vals[0..cap). */
AGG_INLINE double *leaf_vals(const agg_tree *t, node *n)
{
    return (double *)(void *)((char *)n + t->off_vals);
}
/* Internal node n's children, child[0..cap). */
AGG_INLINE node **inner_child(const agg_tree *t, node *n)
{
    return (node **)(void *)((char *)n + t->off_child);
}
/* Internal node n's per-child item counts. */
AGG_INLINE uint64_t *inner_cnt(const agg_tree *t, node *n)
{
    return (uint64_t *)(void *)((char *)n + t->off_cnt);
}
/* Internal node n's per-child sums, high parts. */
AGG_INLINE double *inner_hi(const agg_tree *t, node *n)
{
    return (double *)(void *)((char *)n + t->off_hi);
}
/* Internal node n's per-child sums, low parts. */
AGG_INLINE double *inner_lo(const agg_tree *t, node *n)
{
    return (double *)(void *)((char *)n + t->off_lo);
}
/* Internal node n's per-child exact flags (I6). */
AGG_INLINE uint8_t *inner_ex(const agg_tree *t, node *n)
{
    return (uint8_t *)n + t->off_exact;
}

/* Order-preserving image of a double: negative -> ~bits, else set the
 * sign bit.  Inline for agg_fast_keys' loop, which the calls would keep
 * from vectorising (2.5 ns/key against 1.2). */
AGG_INLINE uint64_t f64_image(double x)
{
    uint64_t b;
    memcpy(&b, &x, sizeof b);
    return (b >> 63) ? ~b : (b | (UINT64_C(1) << 63));
}

/* Order-preserving image of an int64: flip the sign bit. */
AGG_INLINE uint64_t i64_image(int64_t x)
{
    return (uint64_t)x ^ (UINT64_C(1) << 63);
}

/* A tail's `len` packs two numbers (see AGG_TAIL_META_SHIFT in aggtree.h):
 * the bytes stored, and how many of the last ones are metadata that no
 * comparison looks at (the codec's type signature). */
#define TAIL_LEN(tl) ((tl)->len & AGG_TAIL_LEN_MASK)
#define TAIL_CMP_LEN(tl) (TAIL_LEN(tl) - ((tl)->len >> AGG_TAIL_META_SHIFT))

/* Bytewise compare of two GENERAL tails (0 = the empty tail), over their
 * compared bytes only. */
AGG_UNUSED static int tail_cmp(uint64_t a, uint64_t b)
{
    const agg_tail *ta = (const agg_tail *)(uintptr_t)a;
    const agg_tail *tb = (const agg_tail *)(uintptr_t)b;
    uint32_t la, lb, m;
    if (a == b)
        return 0;
    la = ta ? TAIL_CMP_LEN(ta) : 0;
    lb = tb ? TAIL_CMP_LEN(tb) : 0;
    m = la < lb ? la : lb;
    if (m) {
        int c = memcmp(ta->bytes, tb->bytes, m);
        if (c)
            return c < 0 ? -1 : 1;
    }
    return (la > lb) - (la < lb);
}

/* Three-way GENERAL compare: heads, then tails. */
AGG_INLINE int key_cmp_general(agg_key a, agg_key b)
{
    if (a.head != b.head)
        return a.head < b.head ? -1 : 1;
    if (a.rest == b.rest)
        return 0;
    return tail_cmp(a.rest, b.rest);
}

/* Three-way FAST compare: (head, rest) as one 128-bit unsigned integer. */
AGG_INLINE int key_cmp_fast(agg_key a, agg_key b)
{
    int h = (a.head > b.head) - (a.head < b.head);
    int r = (a.rest > b.rest) - (a.rest < b.rest);
    return h ? h : r;
}

/* FAST a < b and a <= b, branch-free: one 128-bit compare where the
 * compiler has __int128, else the equivalent boolean formula. */
#if defined(__SIZEOF_INT128__)
__extension__ typedef unsigned __int128 agg_u128;  /* GCC / Clang extension */
/* FAST a < b. */
AGG_INLINE int key_lt_fast(agg_key a, agg_key b)
{
    agg_u128 x = ((agg_u128)a.head << 64) | a.rest;
    agg_u128 y = ((agg_u128)b.head << 64) | b.rest;
    return x < y;
}
/* FAST a <= b. */
AGG_INLINE int key_le_fast(agg_key a, agg_key b)
{
    agg_u128 x = ((agg_u128)a.head << 64) | a.rest;
    agg_u128 y = ((agg_u128)b.head << 64) | b.rest;
    return x <= y;
}
#else
/* FAST a < b. */
AGG_INLINE int key_lt_fast(agg_key a, agg_key b)
{
    return (a.head < b.head) | ((a.head == b.head) & (a.rest < b.rest));
}
/* FAST a <= b. */
AGG_INLINE int key_le_fast(agg_key a, agg_key b)
{
    return (a.head < b.head) | ((a.head == b.head) & (a.rest <= b.rest));
}
#endif

/* Three-way compare under the tree's mode. */
AGG_INLINE int key_cmp(const agg_tree *t, agg_key a, agg_key b)
{
    return t->mode == AGG_KEYS_FAST ? key_cmp_fast(a, b) : key_cmp_general(a, b);
}

/* Searches within one node.  Each returns the number of a[0..n) that are
 * < k (count_lt, i.e. lower bound) or <= k (count_le, upper bound). The
 * FAST ones are branch-free binary searches: the range [base, base + n]
 * always holds the answer; each step halves n with a conditional move;
 * the last <= 8 candidates are counted with independent compares rather
 * than three more dependent steps. */
/* FAST bound: number of a[0..n) < k (le == 0: lower bound) or <= k
 * (le == 1: upper bound).  Halves down to `tail` candidates, then counts
 * them with independent compares: 8 for single searches (three dependent
 * steps fewer); 1 for the batch passes, which run many searches at once
 * and overlap them anyway (a conditional move per halving, the same
 * number of steps for every key). */
AGG_INLINE uint32_t fast_count(const agg_key *a, uint32_t n, agg_key k, int le, uint32_t tail)
{
    const agg_key *base = a;
    uint32_t i, c = 0;
    if (tail <= 1) {
        if (n == 0)
            return 0;
        tail = 1;
    }
    while (n > tail) {
        uint32_t half = n >> 1;
        base = (le ? key_le_fast(base[half], k) : key_lt_fast(base[half], k)) ? base + half : base;
        n -= half;
    }
    if (tail == 1)
        return (uint32_t)(base - a) + (uint32_t)(le ? key_le_fast(*base, k) : key_lt_fast(*base, k));
    for (i = 0; i < n; i++)     /* <= tail independent compares */
        c += (uint32_t)(le ? key_le_fast(base[i], k) : key_lt_fast(base[i], k));
    return (uint32_t)(base - a) + c;
}

/* FAST lower bound: number of a[0..n) < k. */
AGG_INLINE uint32_t fast_count_lt(const agg_key *a, uint32_t n, agg_key k)
{
    return fast_count(a, n, k, 0, 8);
}

/* FAST upper bound: number of a[0..n) <= k. */
AGG_INLINE uint32_t fast_count_le(const agg_key *a, uint32_t n, agg_key k)
{
    return fast_count(a, n, k, 1, 8);
}

/* Number of a[0..n) whose head is < h (lt) or <= h (le): the FAST
 * branch-free search on the heads alone. */
AGG_INLINE uint32_t heads_count(const agg_key *a, uint32_t n, uint64_t h, int le)
{
    const agg_key *base = a;
    uint32_t i, c = 0;
    while (n > 8) {
        uint32_t half = n >> 1;
        uint64_t x = base[half].head;
        base = (le ? x <= h : x < h) ? base + half : base;
        n -= half;
    }
    for (i = 0; i < n; i++)
        c += (uint32_t)(le ? base[i].head <= h : base[i].head < h);
    return (uint32_t)(base - a) + c;
}

/* GENERAL lower (le = 0: items < k) or upper (le = 1: items <= k) bound.
 * Heads first, branch-free like FAST keys: keys are ordered by head, so
 * when no key's head equals k's (the usual case for short strings) the
 * first head above k's is the answer.  On a tie (keys sharing their first
 * 8 bytes, e.g. tuples with a common first element) an ordinary binary
 * search with the full compare finishes from the first tied key. */
AGG_INLINE uint32_t general_count(const agg_key *a, uint32_t n, agg_key k, int le)
{
    uint32_t lo = heads_count(a, n, k.head, 0), hi = n;
    if (lo == n || a[lo].head != k.head)
        return lo;
    while (lo < hi) {
        uint32_t mid = lo + ((hi - lo) >> 1);
        int c = key_cmp_general(a[mid], k);
        if (le ? c <= 0 : c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* GENERAL lower bound: number of a[0..n) < k. */
AGG_UNUSED static uint32_t general_count_lt(const agg_key *a, uint32_t n, agg_key k)
{
    return general_count(a, n, k, 0);
}

/* GENERAL upper bound: number of a[0..n) <= k. */
AGG_UNUSED static uint32_t general_count_le(const agg_key *a, uint32_t n, agg_key k)
{
    return general_count(a, n, k, 1);
}

/* Prefetch the first n keys of a node (its search region). */
AGG_INLINE void keys_prefetch(const agg_key *a, uint32_t n)
{
    const char *p = (const char *)a, *end = (const char *)(a + n);
    for (; p < end; p += 64)
        AGG_PREFETCH(p);
}

/* Prefetch the values of leaf n (before a search whose result will be
 * used to read or move them). */
AGG_INLINE void vals_prefetch(const agg_tree *t, node *n)
{
    const char *p = (const char *)leaf_vals(t, n), *end = p + n->count * sizeof(double);
    for (; p < end; p += 64)
        AGG_PREFETCH(p);
}

/* Prefetch the counts of internal node n (rank and select scan them). */
AGG_INLINE void cnt_prefetch(const agg_tree *t, node *n)
{
    const char *p = (const char *)inner_cnt(t, n), *end = p + n->count * sizeof(uint64_t);
    for (; p < end; p += 64)
        AGG_PREFETCH(p);
}

/* Lower / upper bound in a leaf: items < k, items <= k. */
AGG_INLINE uint32_t leaf_count_lt(const agg_tree *t, node *n, agg_key k)
{
    return t->mode == AGG_KEYS_FAST ? fast_count_lt(node_keys(n), n->count, k)
                                    : general_count_lt(node_keys(n), n->count, k);
}
/* Items of leaf n that are <= k. */
AGG_INLINE uint32_t leaf_count_le(const agg_tree *t, node *n, agg_key k)
{
    return t->mode == AGG_KEYS_FAST ? fast_count_le(node_keys(n), n->count, k)
                                    : general_count_le(node_keys(n), n->count, k);
}

/* Index of the child of internal node n to descend into for key k: the
 * number of separators sep[1..count-1] that are <= k (section 5). */
AGG_INLINE uint32_t inner_find(const agg_tree *t, node *n, agg_key k)
{
    const agg_key *sep = node_keys(n) + 1;
    return t->mode == AGG_KEYS_FAST ? fast_count_le(sep, n->count - 1, k)
                                    : general_count_le(sep, n->count - 1, k);
}

AGG_INLINE agg_tail *key_tail(agg_key k)
{
    return (agg_tail *)(uintptr_t)k.rest;
}

/* Allocation size of a tail holding len bytes. */
AGG_INLINE size_t tail_bytes(uint32_t len)
{
    return sizeof(agg_tail) + (size_t)len;
}

/* A caller's key in canonical form: a GENERAL empty tail becomes no tail. */
AGG_INLINE agg_key key_normalize(const agg_tree *t, agg_key k)
{
    if (t->mode == AGG_KEYS_GENERAL && k.rest && TAIL_LEN(key_tail(k)) == 0)
        k.rest = 0;
    return k;
}

/* Take one more reference to a stored key's tail (for a separator). */
AGG_INLINE void tail_ref(const agg_tree *t, agg_key k)
{
    if (t->mode == AGG_KEYS_GENERAL && k.rest)
        key_tail(k)->refs++;
}

/* Drop one reference to a stored key's tail; free it at zero. */
AGG_INLINE void tail_release(agg_tree *t, agg_key k)
{
    if (t->mode == AGG_KEYS_GENERAL && k.rest) {
        agg_tail *tl = key_tail(k);
        if (--tl->refs == 0)
            mem_free(t, tl, tail_bytes(TAIL_LEN(tl)));
    }
}

/* Knuth's TwoSum: s = fl(a + b) and e such that a + b == s + e exactly
 * (for finite, non-overflowing a + b; otherwise e is NaN). */
AGG_INLINE void two_sum(double a, double b, double *s, double *e)
{
    double x = a + b;
    double bv = x - a;
    double av = x - bv;
    *e = (a - av) + (b - bv);
    *s = x;
}

/* (hi, lo) += x with the error of hi + x carried into lo.  Returns 1 if
 * the new hi + lo is exactly the old hi + lo + x (lo's addition did not
 * round), 0 otherwise; the new (hi, lo) is the same either way. */
AGG_INLINE int dd_step(double *hi, double *lo, double x)
{
    double s, e, t, f;
    two_sum(*hi, x, &s, &e);
    two_sum(*lo, e, &t, &f);
    *hi = s;
    *lo = t;
    return f == 0.0;
}

/* dd_step without the exactness test (same result). */
AGG_INLINE void dd_step_fast(double *hi, double *lo, double x)
{
    double s, e;
    two_sum(*hi, x, &s, &e);
    *hi = s;
    *lo += e;
}

/* Canonicalise an accumulated (hi, lo); returns `exact` and'ed with the
 * result being finite. */
AGG_INLINE int dd_finish(double *hi, double *lo, int exact)
{
    double s, e;
    two_sum(*hi, *lo, &s, &e);
    *hi = s;
    *lo = e;
    return exact && (s - s == 0.0) && (e - e == 0.0);
}

/* Compensated (double-double) sum of v[0..n), as node_summary sums a
 * leaf: exact steps while every addition is exact, then fast ones; returns
 * the exact flag (I6).  full == 0: stop at the first inexact step (the
 * caller only wants an exact sum; hi and lo are then meaningless). */
static inline int vals_sum(const double *v, uint64_t n, int full, double *hi, double *lo)
{
    double h = 0.0, l = 0.0;
    uint64_t i = 0;
    int ex = 1;
    for (; i < n && ex; i++)
        ex = dd_step(&h, &l, v[i]);
    if (!ex && !full)
        return 0;
    for (; i < n; i++)
        dd_step_fast(&h, &l, v[i]);
    ex = dd_finish(&h, &l, ex);
    *hi = h;
    *lo = l;
    return ex;
}

/* Exact update of a canonical exact double-double (hi, lo) by x: if the
 * real hi + lo + x is again (detectably) a double-double, store it in
 * canonical form and return 1; otherwise return 0 and leave (hi, lo). */
AGG_INLINE int dd_add_exact(double *hi, double *lo, double x)
{
    double s, e, t, f, h, l;
    two_sum(*hi, x, &s, &e);    /* hi + x == s + e */
    two_sum(*lo, e, &t, &f);    /* lo + e == t + f */
    two_sum(s, t, &h, &l);      /* s + t == h + l, h = fl(sum) */
    if (!(f == 0.0) || !(h - h == 0.0))
        return 0;               /* lo + e rounded, or overflow / NaN */
    *hi = h;
    *lo = l;
    return 1;
}

/* inner_bump for a single value x: the path update of insert and delete. */
AGG_INLINE void inner_bump1(const agg_tree *t, node *p, uint32_t j, int dcnt, double x)
{
    uint8_t *ex = inner_ex(t, p);
    double *hi = inner_hi(t, p), *lo = inner_lo(t, p);
    inner_cnt(t, p)[j] += (uint64_t)(int64_t)dcnt;
    if (AGG_LIKELY(ex[j]) && dd_add_exact(&hi[j], &lo[j], x))
        return;
    inner_refresh(t, p, j);
}

/* a < b under the tree's mode. */
AGG_INLINE int key_lt(const agg_tree *t, agg_key a, agg_key b)
{
    return t->mode == AGG_KEYS_FAST ? key_lt_fast(a, b) : key_cmp_general(a, b) < 0;
}

/* Number of a[0..n) <= k under the tree's mode. */
AGG_INLINE uint32_t keys_count_le(const agg_tree *t, const agg_key *a, uint32_t n, agg_key k)
{
    return t->mode == AGG_KEYS_FAST ? fast_count_le(a, n, k) : general_count_le(a, n, k);
}

AGG_INLINE void dds_zero(ddsum *s)
{
    s->hi = s->lo = 0.0;
    s->exact = 1;
}

/* s += sign * (h + l), where (h, l) is exact iff ex: stays exact if the
 * result is again exactly a double-double, else s becomes inexact. */
AGG_INLINE void dds_add(ddsum *s, double h, double l, int ex, int neg)
{
    double a, b;
    if (!s->exact)
        return;
    if (!ex) {
        s->exact = 0;
        return;
    }
    if (h == 0.0 && l == 0.0)
        return;
    if (neg) {
        h = -h;
        l = -l;
    }
    a = s->hi;
    b = s->lo;
    if (dd_add_exact(&a, &b, h) && dd_add_exact(&a, &b, l)) {
        s->hi = a;
        s->lo = b;
    } else {
        s->exact = 0;
    }
}

/* Number of nodes a level list of E entries (or items) is cut into when
 * it no longer fits in one node. */
AGG_INLINE uint64_t pack_count(uint64_t e, uint32_t cap)
{
    return e <= cap ? 1 : (e + cap - 1) / cap;
}

/* Deepest level whose path node holds keys up to k (keys only increase,
 * so lower bounds never need checking). */
AGG_INLINE int finger_level(const agg_tree *t, const finger *f, int from, agg_key k)
{
    int d;
    for (d = from; d > 0; d--)
        if (!f->hn[d] || key_lt(t, k, node_keys(f->hn[d])[f->hs[d]]))
            return d;
    return 0;
}

/* Software prefetching of the batch passes (section 13): a leaf is
 * prefetched PF_DIST groups (or ops) before it is used, so that the cache
 * misses of several leaves overlap instead of forming a chain; at most
 * PF_LINES cache lines of it (all of a node_size-64 leaf), since a full
 * miss queue stalls the prefetching instructions themselves.  Measured
 * with bench_core, 100,000 keys into 1,000,000: distances 2..8 are within
 * noise of each other, prefetching one line per leaf instead of the whole
 * leaf is ~40% slower. */
#define PF_DIST 4
#define PF_LINES 25

/* Prefetch a leaf without reading it (its header may not have arrived):
 * the header and keys, and with `values` the values too. */
AGG_INLINE void leaf_prefetch_all(const agg_tree *t, node *n, int values)
{
    const char *p = (const char *)n, *end = p + (values ? t->leaf_bytes : t->off_vals);
    int lines = PF_LINES;
    for (; p < end && lines-- > 0; p += 64)
        AGG_PREFETCH(p);
}

/* Batches of at least this many keys use two threads (section 13). */
#define BATCH_THREAD_MIN 16384

#endif /* AGGTREE_CORE_INTERNAL_H */
