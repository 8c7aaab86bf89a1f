/*
 * aggtree.c - the C core of aggtree: a counted B+tree of (key, value) items
 * kept in key order, answering count, sum, rank and select in O(log n).
 *
 * ==========================================================================
 *  DESIGN
 * ==========================================================================
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
 * sequential inserts or a bulk build.
 *
 * 3. Keys
 * -------
 * An agg_key is (head, rest).  FAST: both are order-preserving 64-bit
 * images, compared as one unsigned 128-bit integer (branch-free: the hot
 * search loops compile to cmov chains).  GENERAL: head is the first 8
 * bytes of the encoding, rest a pointer to an agg_tail holding the others;
 * compare heads, and only on a tie the tails (memcmp, shorter first).  The
 * mode is stored in the tree and every search routine exists twice, one
 * per mode, chosen by one predictable branch per node visit.  Within a node
 * the FAST search is a branch-free binary search (lower or upper bound)
 * that stops at <= 8 candidates and counts those with independent
 * compares; the GENERAL one runs the same branch-free search on the heads
 * alone and compares tails (memcmp) only within the run of keys whose head
 * ties with the searched one - usually empty, so a GENERAL search costs
 * about what a FAST one does (it was an ordinary binary search on the
 * three-way compare, ~2x slower on short strings).  On
 * entry to a node the part of it the operation will read is prefetched -
 * the key region always, the values of a leaf for get / insert / delete,
 * the counts for rank / select - so the cache misses of one node overlap
 * instead of forming a chain of dependent misses (this halves get and rank
 * times on a tree larger than the cache).
 *
 * GENERAL tails are reference counted.  The item owns one reference; a
 * separator that copies the item's key owns one more.  So building a
 * separator never allocates, and a separator can outlive its item (delete
 * leaves separators alone) without dangling.  Tails passed in are borrowed:
 * insert allocates the tree's own copy (refs = 1) once it knows the key is
 * new.  A tail of length 0 is the same key as no tail, so it is dropped on
 * entry (rest = 0) and never stored.
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
 * 9. Bulk build
 * -------------
 * agg_tree_build checks strict order first (AGG_DUPLICATE / AGG_INVALID
 * with the index of the offending key) before allocating anything; then
 * allocates every node of every level and every tail copy; if any fails
 * it frees all of them and the tree stays empty.  Only then it fills:
 * leaves packed full, internal levels likewise, in each level the last two
 * nodes sharing the remainder when the last one would fall below min.
 * O(n), ~25 bytes per FAST item at cap 64.
 *
 * 10. Allocation
 * --------------
 * Every malloc/free goes through mem_alloc/mem_free: they keep t->nbytes
 * (the requested sizes) and honour the global failure injector
 * agg_debug_fail_after(n) (a countdown of successful allocations; atomic,
 * so threads working on different trees do not race on it).
 *
 * Nodes come from the tree's two pools (leaves, internal nodes): blocks
 * carved in order from chunks of 1, 2, 4, ... blocks, up to ~2 MB each;
 * a freed node goes on its pool's free list and is the next one handed
 * out; the chunks go back to malloc when the tree is cleared or freed (a
 * FAST tree without visiting its nodes).  Why: a batch insert splits most
 * leaves it touches and then walks the leaf level in key order.  From
 * malloc, in a process whose heap holds the freed nodes of other trees
 * (a benchmark suite, a service that rebuilds its aggregates), the new
 * leaves land in those holes all over the heap, and the walk loses its
 * locality: 10^5 random keys into 10^6 cost 61-64 ns per key instead of
 * 41-48 after 10^6 leaf-sized blocks were freed across 1.5 GB (Python,
 * two threads).  From the pools they are as close together as in a fresh
 * process (41-43).  The cost: a tree keeps the nodes it freed for its own
 * later use (nbytes counts only the live ones), and a small tree's last
 * chunk may be up to half empty.  ASan builds poison free blocks by hand
 * (POOL_POISON), so a use after free inside a chunk is still reported.  Writes
 * allocate only in their reserve step (insert, build, new, insert_sorted)
 * or never (delete, clear, value overwrite), which is what makes "on
 * failure nothing changed" hold.  Temporary memory of the batch
 * operations and the sort (raw_alloc: honours the injector, not counted
 * in nbytes) is taken before the first mutation too; delete_sorted's only
 * temporary array is optional (it runs without it).  insert_sorted's
 * second thread (section 13) never allocates: its arrays are sized first.
 *
 * 11. The checker
 * ---------------
 * agg_tree_check walks everything and verifies I1..I9.  Exact sums are
 * verified with an exact fixed-point accumulator (2304 bits in 32-bit
 * digits) summing the subtree's values, inexact ones by recomputing
 * node_summary() and comparing bits.  Tail reference counts are verified
 * without allocating (the header promises AGG_OK or AGG_CORRUPT only): once
 * the separators are known to satisfy I2, every separator equal to a key
 * lies on that key's search path, at most one per node, so the references
 * to a tail are counted by one descent per reference.  The first failure is
 * reported with the level, the node's position within its level, the entry
 * and the rule.
 *
 * 12. Deviations from the first design, and why
 * ---------------------------------------------
 *  - Rightmost-path fill exemption (I4): needed by the quick balance.
 *  - 2-to-3 leaf splits when both siblings are full (a small gain over
 *    1-to-2, measured in section 6).
 *  - exact[] per internal entry (1 byte/entry, ~0.02 bytes/item at cap 64)
 *    and the exact/inexact sum scheme of section 8 instead of recomputing
 *    every path entry: same no-drift property, O(1) per level.
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
 * in the environment, or agg_debug_insert_sorted_mode(1), forces one).
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
 * parent's event the count and exact sum of its new keys and (in lpend,
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
 * through one runner (run_pieces).  The threads write disjoint memory:
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
 * development VM (tests/c/bench_floor.c does just that memory work on
 * scattered leaf-sized blocks).  Measured there (cap 64, a bulk-built -
 * packed - tree of 1,000,000 random FAST keys, batches of 100,000 new
 * random keys inserted then deleted again, wall-clock ns per batch key),
 * before the fused search:
 *
 *                           one thread        two threads   (before: one
 *   first batch (packed)       ~135               ~95         thread, ~127)
 *   later batches, best      ~72-80             ~41-46           ~75-86
 *   later batches, mean      ~81-88             ~47-55           ~83-96
 *
 * (one thread: check ~44 = route ~8 + search ~31 + plan ~5, leaf ops
 * ~34, the rest ~1; two threads: check ~21, leaf ops ~18, the rest ~2).
 * With it (another day, the machine slower: the old code measured ~55-75
 * on both thread counts that day), later batches, best of 7: one thread
 * ~53-60, two threads ~32-48, and the first batch no slower than the
 * later ones.
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
 * leaves are unlinked (the pool frees them), and the copy is written
 * back.
 * Nothing above the leaf parents has changed yet.  The result is the tree
 * before the call, node for node and bit for bit (the tests compare
 * agg_debug_shape_hash, not just the items).  The price: the copies and
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
 * agg_tree_delete_sorted.  The same check (route + search, with a small
 * ring of groups so that the leaves are prefetched) reports the first
 * absent key before anything changes; from BATCH_THREAD_MIN keys it is cut
 * in two at the middle key and run on two threads (dels_check_split: it
 * only reads, so any cut will do; the parts are claimed from a counter
 * as in run_pieces, and the first part's absent key wins).  Then per
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
 *
 * 14. Sorting keys
 * ----------------
 * agg_keys_sort orders (key, value) pairs by FAST order for bulk loads
 * (insert_many sorts batches of ~10^5, from_arrays 10^6).  np.lexsort((ids,
 * keys)) takes ~250 ms for 1,000,000 pairs here, qsort of the keys alone
 * ~145 ms.  Everything works on a prefix of the composite 128-bit key
 * (head << 64 | rest): the bits that differ between some two keys are
 * found (OR ^ AND of all keys), and the prefix is head's varying span
 * (its highest to its lowest varying bit), then rest's, cut to 64 bits.
 * Bits outside the spans are the same in every key, so prefix order is
 * key order up to ties, and keys with equal prefixes differ only below
 * the cut (ids 0..n-1 leave most of rest constant, doubles in [0, 1) the
 * sign and top exponent bits: their prefix is exponent, mantissa, top of
 * the id).  Radix digits are taken from (prefix - smallest prefix) of the
 * range at hand, so that a range from 0x0ff.. to 0x100.. (varying in its
 * top bit) is not put nearly all in two buckets.
 *
 *   n <= 16: insertion sort.
 *   keys already in order: nothing to do; in reverse (non-increasing)
 *     order: reversed in place (neither needs scratch; both checks stop at
 *     the first key out of their order, after a few keys for most input).
 *   n <= 16384 (ksort_local): 8-byte pairs prefix << log2(n) | index
 *     (the prefix cut to 64 - log2(n) bits) are MSD radix sorted, digits
 *     of log2(m) + 1 bits (about half a pair per bucket); buckets of more
 *     than 8 pairs are sorted recursively, the rest by one insertion pass
 *     over the range, which moves a pair only inside its bucket (the
 *     digit orders the buckets).  Then the records are gathered by index;
 *     runs of equal (cut) prefixes are sorted again the same way, each on
 *     its own varying bits.
 *   larger (the split): histograms of the first 12 prefix bits (one per
 *     chunk of the input); runs of digit values grouped into buckets that
 *     close at max(384, 2n / 1023) records, or before a digit value that
 *     would take them past twice that (at most 1024 buckets, so at most
 *     2048 write streams; the grouping evens out skewed bits such as the
 *     exponents of doubles, and a heavy value - few distinct heads - gets
 *     a bucket of its own); the records are scattered into the scratch
 *     arrays; then each bucket is sorted back into the caller's arrays
 *     (ksort_direct): one scatter by the top log2(m) + 1 bits of (prefix -
 *     smallest prefix) and one insertion pass comparing the prefixes (and
 *     the keys, where the prefix was cut).  Radix buckets of more than 32
 *     go to ksort_local; a split bucket of more than 16384 records (one
 *     heavy digit value) to the former MSD radix sort of the records
 *     (ksort_msd, ping-pong between the arrays and the scratch, digits only
 *     where that bucket's keys vary), whose leaves are ksort_direct and
 *     ksort_local.  The records cross memory twice; the second time one
 *     bucket (~10-50 KB) at a time, in cache.
 *   two threads, from 65536 records: the caller starts a detached helper
 *     and hands it the split; the input chunks (n / 2^14 of them, 4 to
 *     16) to scan for varying bits, then (after the caller has made the
 *     prefix) to count, then (after its plan) to scatter, then the buckets
 *     to sort are taken one at a time from atomic counters by whichever
 *     thread asks; waits spin briefly, then yield.  The caller never
 *     waits for the helper to start (start-up took 0.05-3 ms here while
 *     the other core was busy): a late helper finds less or nothing left;
 *     the caller waits at most for a piece the helper holds.  The
 *     hand-over goes through one mutex-protected slot (one two-thread sort
 *     at a time per process: a concurrent caller sorts on its own), so a
 *     helper never touches a split whose caller has returned, and it owns
 *     no memory.  Everything is allocated before the helper starts (the
 *     failure injector stays deterministic).
 *     AGGTREE_THREADS=1 in the environment forces one thread; builds
 *     without pthreads or C11 atomics (or with AGG_NO_THREADS) have one.
 *
 * Scratch, one allocation before anything moves (AGG_NOMEM leaves the
 * input untouched): n * 24 bytes (16 without values; up to 16384 keys
 * n * 24 either way) plus ~2 MB per thread of counters and work area and
 * 0.4 MB for the split.  Wall-clock ns per key, best of 25 (bench_sort:
 * random = images of random doubles in [0, 1) with shuffled ids; the
 * other shapes in its header), values / values NULL:
 *
 *               ------------ 10^5 keys -------  ------------ 10^6 keys -------
 *   shape   former    1 thread  2 threads former    1 thread  2 threads
 *   random  13.6/12.5 12.1/10.4  7.2/ 6.3 22.0/17.5 18.9/15.0  9.6/ 7.5
 *   sorted   8.0/ 7.4  0.6/ 0.6  0.5/ 0.6 10.1/ 8.4  0.7/ 0.7  0.7/ 0.6
 *   reverse 11.1/ 8.8  1.1/ 0.8  1.1/ 0.8 11.9/10.4  1.5/ 1.1  1.4/ 1.0
 *   eqhead  18.8/17.6  9.5/ 8.0  6.0/ 5.1 23.0/17.9 22.0/15.9 11.2/ 7.6
 *   few     16.2/14.4 15.6/13.7  8.9/ 8.1 25.5/20.3 26.1/20.6 13.4/11.2
 *   lowbits 17.9/15.4 13.0/11.5  7.9/ 7.0 28.6/21.9 19.8/16.0 10.1/ 8.4
 *   rand128 17.0/15.2 12.5/11.0  7.6/ 6.7 26.1/20.5 19.6/16.0  9.9/ 8.0
 *   almost   9.7/ 8.9 10.3/ 8.9  7.1/ 6.7 12.0/10.4 13.3/11.2  6.9/ 6.5
 *
 * The machine (2 cores, 2 MB L2 each, 32 MB L3) was shared with other
 * jobs: the two-thread figures need the other core free (medians were
 * within ~5% of the best then; with it busy they drift towards the
 * one-thread ones, and a run taken while it was busy gave 11-13 at 10^5).
 * At 10^6 one thread is bound by memory (the records cross it twice,
 * ~170 bytes a key with the scans); at 10^5 by the scatters and the
 * insertion passes.  bench_core (CPU time of the calling thread, so the
 * helper's share is not counted): keys_sort of 10^5 16.6 -> 15.0 (one
 * thread) / 10.2 ns (two), agg_keys_sort of 10^6 21.7 -> 19.0 / 10.0 ms.
 *   cmake -S . -B build -G Ninja -DAGGTREE_TESTS=ON && cmake --build build
 *   BENCH_REPS=25 build/bench_sort                  (two threads)
 *   AGGTREE_THREADS=1 BENCH_REPS=25 build/bench_sort
 * tests/c/test_sort.c checks the sort against qsort on these shapes and
 * more, at sizes across every threshold above, one and two threads.
 */
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
static long agg_exchange_plain(volatile long *p, long v)
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

/* A second thread for large batch inserts (section 13) and key sorts
 * (section 14).  AGG_THREADS is 0 in builds without pthreads or C11
 * atomics, or with -DAGG_NO_THREADS; at run time AGGTREE_THREADS=1 in the
 * environment keeps everything on the calling thread. */
#if !defined(AGG_NO_THREADS) && !defined(__STDC_NO_ATOMICS__) && \
    (defined(__unix__) || defined(__APPLE__))
#include <pthread.h>
#include <sched.h>
#define AGG_THREADS 1
#else
#define AGG_THREADS 0
#endif

/* 0 if AGGTREE_THREADS=1 in the environment (or the build has no threads). */
static int threads_allowed(void)
{
    const char *e = AGG_THREADS ? getenv("AGGTREE_THREADS") : NULL;
    return AGG_THREADS && !(e && atoi(e) == 1);
}

#ifdef __FAST_MATH__
#error "aggtree.c needs exact IEEE additions (TwoSum); do not build it with -ffast-math"
#endif

#if defined(__GNUC__) || defined(__clang__)
#define AGG_LIKELY(x) __builtin_expect(!!(x), 1)
#define AGG_UNLIKELY(x) __builtin_expect(!!(x), 0)
#define AGG_PREFETCH(p) __builtin_prefetch(p)
#define AGG_INLINE static inline __attribute__((always_inline))
#define AGG_NOINLINE static __attribute__((noinline))
#else
#define AGG_LIKELY(x) (x)
#define AGG_UNLIKELY(x) (x)
#define AGG_PREFETCH(p) ((void)(p))
#define AGG_INLINE static inline
#define AGG_NOINLINE static
#endif

/* Deepest tree possible: every level at least doubles (internal nodes keep
 * >= 2 children), so 2^64 items need at most 65 levels. */
#define MAX_DEPTH 72

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
typedef struct pool_chunk {
    struct pool_chunk *next;
    size_t bytes;                /* the chunk's size, header included */
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

/* ====================================================================== */
/*  Allocation                                                            */
/* ====================================================================== */

/* Failure injector: < 0 off; else the number of allocations still allowed
 * to succeed.  alloc_count: successful allocations since the last
 * agg_debug_fail_after call. */
static AGG_ATOMIC(long) g_fail_countdown = -1;
static AGG_ATOMIC(long) g_alloc_count = 0;

/* 1 if the injector fails this allocation; else it is counted down. */
AGG_INLINE int injected_failure(void)
{
    long c = atomic_load_relaxed(&g_fail_countdown);
    if (AGG_UNLIKELY(c >= 0)) {
        if (c == 0)
            return 1;
        atomic_store_relaxed(&g_fail_countdown, c - 1);
    }
    return 0;
}

/* malloc honouring the injector.  NULL on (real or injected) failure. */
static void *raw_alloc(size_t size)
{
    void *p;
    if (injected_failure())
        return NULL;
    p = malloc(size);
    if (p)
        atomic_add_relaxed(&g_alloc_count, 1);
    return p;
}

/* Node pools (section 10).  ASan builds mark free blocks unaddressable
 * themselves, so a use after free inside a chunk is still reported. */
#if defined(__SANITIZE_ADDRESS__)
#define AGG_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define AGG_ASAN 1
#endif
#endif
#ifdef AGG_ASAN
#include <sanitizer/asan_interface.h>
#define POOL_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define POOL_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POOL_POISON(p, n) ((void)(p), (void)(n))
#define POOL_UNPOISON(p, n) ((void)(p), (void)(n))
#endif
#define POOL_HEADER 64                    /* room for the pool_chunk header (blocks stay 16-byte aligned) */
#define POOL_CHUNK_MAX ((size_t)1 << 21)  /* a chunk grows to at most ~2 MB of blocks */

/* The pool of t's blocks of `size` bytes, or NULL (tails of other sizes). */
AGG_INLINE node_pool *pool_of(agg_tree *t, size_t size)
{
    return size == t->leaf_bytes ? &t->pools[0] : size == t->inner_bytes ? &t->pools[1] : NULL;
}

/* A block of `size` bytes from pool pl: a freed one, else the newest
 * chunk's next, else from a new chunk twice the size of the last (1
 * block first, so a small tree holds no more than malloc would give it).
 * Honours the injector like raw_alloc; NULL on failure. */
static void *pool_alloc(node_pool *pl, size_t size)
{
    char *p;
    if (injected_failure())
        return NULL;
    if (pl->free) {
        p = (char *)pl->free;
        POOL_UNPOISON(p, size);
        pl->free = *(void **)p;
    } else {
        if (pl->bump == pl->end) {
            size_t n = pl->blocks ? pl->blocks : 1;
            pool_chunk *c = (pool_chunk *)malloc(POOL_HEADER + n * size);
            if (!c)
                return NULL;
            c->next = pl->chunks;
            c->bytes = POOL_HEADER + n * size;
            pl->chunks = c;
            pl->bump = (char *)c + POOL_HEADER;
            pl->end = pl->bump + n * size;
            POOL_POISON(pl->bump, n * size);
            pl->blocks = 2 * n * size <= POOL_CHUNK_MAX ? 2 * n : n;
        }
        p = pl->bump;
        pl->bump += size;
        POOL_UNPOISON(p, size);
    }
    atomic_add_relaxed(&g_alloc_count, 1);
    return p;
}

/* Give every chunk of pl back to malloc (its blocks are all free or
 * abandoned with the tree's nodes). */
static void pool_release(node_pool *pl)
{
    pool_chunk *c = pl->chunks;
    while (c) {
        pool_chunk *nx = c->next;
        POOL_UNPOISON(c, c->bytes);
        free(c);
        c = nx;
    }
    memset(pl, 0, sizeof *pl);
}

/* Allocate `size` bytes for tree t, counted in t->nbytes: nodes from the
 * tree's pools, tails from malloc. */
static void *mem_alloc(agg_tree *t, size_t size)
{
    node_pool *pl = pool_of(t, size);
    void *p = pl ? pool_alloc(pl, size) : raw_alloc(size);
    if (p)
        t->nbytes += size;
    return p;
}

/* Free a block of `size` bytes obtained from mem_alloc(t, size). */
static void mem_free(agg_tree *t, void *p, size_t size)
{
    node_pool *pl;
    if (!p)
        return;
    t->nbytes -= size;
    if ((pl = pool_of(t, size)) != NULL) {
        *(void **)p = pl->free;
        pl->free = p;
        POOL_POISON(p, size);
    } else {
        free(p);
    }
}

/* See aggtree.h.  Resets the allocation counter and arms (n >= 0) or
 * disarms (n < 0) the countdown. */
long agg_debug_fail_after(long n)
{
    long made = atomic_exchange_relaxed(&g_alloc_count, 0);
    atomic_store_relaxed(&g_fail_countdown, n < 0 ? -1 : n);
    return made;
}

/* ====================================================================== */
/*  Keys                                                                  */
/* ====================================================================== */

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

/* See aggtree.h. */
uint64_t agg_f64_to_key(double x)
{
    return f64_image(x);
}

/* See aggtree.h.  (The loop vectorises; per key it is a fraction of a
 * nanosecond, against ~2 ns for two calls per key from the bindings.) */
void agg_fast_keys(const double *keys, const int64_t *ids, agg_key *out, uint64_t n)
{
    uint64_t i;
    for (i = 0; i < n; i++) {
        out[i].head = f64_image(keys[i] + 0.0);   /* -0.0 -> 0.0 */
        out[i].rest = i64_image(ids[i]);
    }
}

/* Inverse of agg_f64_to_key. */
double agg_key_to_f64(uint64_t k)
{
    uint64_t b = (k >> 63) ? (k & ~(UINT64_C(1) << 63)) : ~k;
    double x;
    memcpy(&x, &b, sizeof x);
    return x;
}

/* See aggtree.h. */
uint64_t agg_i64_to_key(int64_t x)
{
    return i64_image(x);
}

/* Inverse of agg_i64_to_key. */
int64_t agg_key_to_i64(uint64_t k)
{
    uint64_t u = k ^ (UINT64_C(1) << 63);
    int64_t x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* A tail's `len` packs two numbers (see AGG_TAIL_META_SHIFT in aggtree.h):
 * the bytes stored, and how many of the last ones are metadata that no
 * comparison looks at (the codec's type signature). */
#define TAIL_LEN(tl) ((tl)->len & AGG_TAIL_LEN_MASK)
#define TAIL_CMP_LEN(tl) (TAIL_LEN(tl) - ((tl)->len >> AGG_TAIL_META_SHIFT))

/* Bytewise compare of two GENERAL tails (0 = the empty tail), over their
 * compared bytes only. */
static int tail_cmp(uint64_t a, uint64_t b)
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

/* See aggtree.h. */
int agg_key_cmp(agg_keymode mode, agg_key a, agg_key b)
{
    return mode == AGG_KEYS_FAST ? key_cmp_fast(a, b) : key_cmp_general(a, b);
}

/* Three-way compare under the tree's mode. */
AGG_INLINE int key_cmp(const agg_tree *t, agg_key a, agg_key b)
{
    return t->mode == AGG_KEYS_FAST ? key_cmp_fast(a, b) : key_cmp_general(a, b);
}

/* See aggtree.h: head = e[0..8) big-endian, zero-padded; the rest into
 * tail_buf (refs 0) when len > 8.  Never allocates. */
agg_key agg_key_from_bytes(const uint8_t *e, size_t len, agg_tail *tail_buf)
{
    agg_key k;
    size_t i, h = len < 8 ? len : 8;
    k.head = 0;
    for (i = 0; i < h; i++)
        k.head |= (uint64_t)e[i] << (56 - 8 * i);
    k.rest = 0;
    if (len > 8) {
        tail_buf->refs = 0;
        tail_buf->len = (uint32_t)(len - 8);
        memcpy(tail_buf->bytes, e + 8, len - 8);
        k.rest = (uint64_t)(uintptr_t)tail_buf;
    }
    return k;
}

/* See aggtree.h. */
agg_key agg_key_from_item_bytes(const uint8_t *e, size_t len, size_t meta,
                                agg_tail *tail_buf)
{
    agg_key k = agg_key_from_bytes(e, len, tail_buf);
    if (k.rest && meta)
        tail_buf->len |= (uint32_t)meta << AGG_TAIL_META_SHIFT;
    return k;
}

/* See aggtree.h: 8 head bytes then the tail, at most cap written; returns
 * the full length. */
size_t agg_key_to_bytes(agg_key k, uint8_t *out, size_t cap)
{
    const agg_tail *tl = (const agg_tail *)(uintptr_t)k.rest;
    size_t tlen = tl ? TAIL_LEN(tl) : 0, i;
    for (i = 0; i < 8 && i < cap; i++)
        out[i] = (uint8_t)(k.head >> (56 - 8 * i));
    if (tlen && cap > 8)
        memcpy(out + 8, tl->bytes, tlen < cap - 8 ? tlen : cap - 8);
    return 8 + tlen;
}

/* Searches within one node.  Each returns the number of a[0..n) that are
 * < k (count_lt, i.e. lower bound) or <= k (count_le, upper bound). The
 * FAST ones are branch-free binary searches: the range [base, base + n]
 * always holds the answer; each step halves n with a conditional move;
 * the last <= 8 candidates are counted with independent compares rather
 * than three more dependent steps. */
/* FAST lower bound: number of a[0..n) < k. */
AGG_INLINE uint32_t fast_count_lt(const agg_key *a, uint32_t n, agg_key k)
{
    const agg_key *base = a;
    uint32_t i, c = 0;
    while (n > 8) {
        uint32_t half = n >> 1;
        base = key_lt_fast(base[half], k) ? base + half : base;
        n -= half;
    }
    for (i = 0; i < n; i++)     /* <= 8 independent compares */
        c += (uint32_t)key_lt_fast(base[i], k);
    return (uint32_t)(base - a) + c;
}

/* FAST upper bound: number of a[0..n) <= k. */
AGG_INLINE uint32_t fast_count_le(const agg_key *a, uint32_t n, agg_key k)
{
    const agg_key *base = a;
    uint32_t i, c = 0;
    while (n > 8) {
        uint32_t half = n >> 1;
        base = key_le_fast(base[half], k) ? base + half : base;
        n -= half;
    }
    for (i = 0; i < n; i++)
        c += (uint32_t)key_le_fast(base[i], k);
    return (uint32_t)(base - a) + c;
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
static uint32_t general_count_lt(const agg_key *a, uint32_t n, agg_key k)
{
    return general_count(a, n, k, 0);
}

/* GENERAL upper bound: number of a[0..n) <= k. */
static uint32_t general_count_le(const agg_key *a, uint32_t n, agg_key k)
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

/* ====================================================================== */
/*  Tails (GENERAL keys)                                                  */
/* ====================================================================== */

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

/* The key to store for a new item: GENERAL keys with a tail get the tree's
 * own copy (refs = 1).  0 on allocation failure (nothing allocated). */
static int tail_copy(agg_tree *t, agg_key k, agg_key *out)
{
    *out = k;
    if (t->mode == AGG_KEYS_GENERAL && k.rest) {
        const agg_tail *src = key_tail(k);
        agg_tail *cp = (agg_tail *)mem_alloc(t, tail_bytes(TAIL_LEN(src)));
        if (!cp)
            return 0;
        cp->refs = 1;
        cp->len = src->len;
        memcpy(cp->bytes, src->bytes, TAIL_LEN(src));
        out->rest = (uint64_t)(uintptr_t)cp;
    }
    return 1;
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

/* ====================================================================== */
/*  Sums: error-free double-double arithmetic                             */
/* ====================================================================== */

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

/* Summary of a node as its parent's entry would hold it: item count and
 * the deterministic compensated sum of its values (leaf) or of its entries
 * hi[0], lo[0], hi[1], ... (internal), canonicalised.  Returns the exact
 * flag: 1 iff all child entries read were exact and no addition rounded,
 * so that hi + lo is exactly the subtree's sum (I6). */
static int node_summary(const agg_tree *t, node *c, uint64_t *cnt, double *hi,
                        double *lo)
{
    double h = 0.0, l = 0.0;
    uint32_t i = 0, n = c->count;
    int ex = 1;
    if (c->leaf) {
        const double *v = leaf_vals(t, c);
        for (; i < n && ex; i++)
            ex = dd_step(&h, &l, v[i]);
        for (; i < n; i++)
            dd_step_fast(&h, &l, v[i]);
        *cnt = n;
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

/* ====================================================================== */
/*  Leaves                                                                */
/* ====================================================================== */

/* A new empty leaf, or NULL. */
static node *leaf_new(agg_tree *t)
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
static void leaf_insert_at(const agg_tree *t, node *n, uint32_t pos, agg_key k,
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
static void leaf_remove_at(const agg_tree *t, node *n, uint32_t pos)
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
static void leaf_move_tail(const agg_tree *t, node *src, node *dst, uint32_t k)
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
static void leaf_move_head(const agg_tree *t, node *src, node *dst, uint32_t k)
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
static void leaf_link_after(agg_tree *t, node *a, node *m)
{
    (void)t;
    m->prev = a;
    m->next = a->next;
    if (a->next)
        a->next->prev = m;
    a->next = m;
}

/* What crossed the first boundary in leaves_rebalance_insert. */
typedef struct moved {
    int dir;                     /* +1: g[0] -> g[1], -1: g[1] -> g[0], 0: nothing */
    int exact;                   /* hi + lo is exactly the moved values' sum */
    double hi;                   /* their sum, canonical double-double */
    double lo;
} moved;

/* Compensated sum of v[0..n) as node_summary computes it; returns the
 * exact flag. */
static int vals_sum(const double *v, uint32_t n, double *hi, double *lo)
{
    double h = 0.0, l = 0.0;
    uint32_t i = 0;
    int ex = 1;
    for (; i < n && ex; i++)
        ex = dd_step(&h, &l, v[i]);
    for (; i < n; i++)
        dd_step_fast(&h, &l, v[i]);
    ex = dd_finish(&h, &l, ex);
    *hi = h;
    *lo = l;
    return ex;
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
static uint32_t leaves_rebalance_insert(const agg_tree *t, node **g, uint32_t m,
                                        const uint32_t *tg, uint32_t q, agg_key k,
                                        double v, moved *mv)
{
    uint32_t j = 0, pre = 0, b, ot[3], done = 0, want = 0;
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
                                     have - want, &mv->hi, &mv->lo);
            }
            leaf_move_tail(t, g[b], g[b + 1], have - want);
        } else if (have < want) {
            if (b == 0 && mv) {
                mv->dir = -1;
                mv->exact = vals_sum(leaf_vals(t, g[1]), want - have, &mv->hi, &mv->lo);
            }
            leaf_move_head(t, g[b + 1], g[b], want - have);
        } else if (b == 0 && mv) {
            mv->dir = 0;
            mv->exact = 1;
            mv->hi = mv->lo = 0.0;
        }
        done = want;
    }
    leaf_insert_at(t, g[j], q - pre, k, v);
    return j;
}

/* ====================================================================== */
/*  Internal nodes                                                        */
/* ====================================================================== */

/* A new empty internal node (sep[0] zeroed), or NULL. */
static node *inner_new(agg_tree *t)
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
static void inner_shift(const agg_tree *t, node *n, uint32_t from, uint32_t to,
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
static void inner_put(const agg_tree *t, node *n, uint32_t pos, const entry *e)
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
static void inner_insert_entry(const agg_tree *t, node *n, uint32_t pos,
                               const entry *e)
{
    inner_shift(t, n, pos, pos + 1, n->count - pos);
    inner_put(t, n, pos, e);
    n->count++;
}

/* Remove entry pos >= 1 of n (its separator's ownership is the caller's). */
static void inner_remove_entry(const agg_tree *t, node *n, uint32_t pos)
{
    inner_shift(t, n, pos + 1, pos, n->count - pos - 1);
    n->count--;
}

/* Recompute entry j of p (count and sum) from its child. */
static void inner_refresh(const agg_tree *t, node *p, uint32_t j)
{
    node *c = inner_child(t, p)[j];
    inner_ex(t, p)[j] = (uint8_t)node_summary(t, c, &inner_cnt(t, p)[j],
                                              &inner_hi(t, p)[j], &inner_lo(t, p)[j]);
}

/* Entry for node c with separator sep (whose reference the entry takes
 * over). */
static entry entry_make(const agg_tree *t, node *c, agg_key sep)
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
static void inner_bump(const agg_tree *t, node *p, uint32_t j, int dcnt,
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

/* Replace separator j of p by key k (a stored key): reference the new
 * tail before releasing the old one. */
static void inner_set_sep(agg_tree *t, node *p, uint32_t j, agg_key k)
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
static void inner_split_insert(const agg_tree *t, node *n, node *r, uint32_t pos,
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
static void inner_merge(agg_tree *t, node *p, uint32_t j)
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
static void inner_move_right(const agg_tree *t, node *p, uint32_t j, uint32_t k)
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
static void inner_move_left(const agg_tree *t, node *p, uint32_t j, uint32_t k)
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
static void node_free_rec(agg_tree *t, node *n)
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

/* ====================================================================== */
/*  Life cycle                                                            */
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
/*  Insert                                                                */
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
/*  Delete                                                                */
/* ====================================================================== */

/* Child i of p has fallen below min: merge it with a sibling under p (the
 * left one, or the right one for child 0) if both fit in one node, else
 * share their entries evenly.  Recomputes the entries concerned. */
static void node_repair(agg_tree *t, node *p, uint32_t i)
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
    n = t->root;
    if (!n->leaf && n->count == 1) {
        t->root = inner_child(t, n)[0];
        mem_free(t, n, t->inner_bytes);
        t->depth--;
    } else if (n->leaf && n->count == 0) {
        mem_free(t, n, t->leaf_bytes);
        t->root = NULL;
        t->depth = 0;
    }
    return AGG_OK;
}

/* ====================================================================== */
/*  Reads                                                                 */
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
/*  Bulk build                                                            */
/* ====================================================================== */

/* Size of node i of the `nodes` nodes packing `total` entries of a level:
 * full, except that when the last one would fall below min the last two
 * share what is left after the full ones. */
static uint32_t pack_size(uint64_t total, uint64_t nodes, uint64_t i,
                          uint32_t cap, uint32_t min)
{
    uint64_t r, share;
    if (nodes == 1)
        return (uint32_t)total;
    r = total - (nodes - 1) * (uint64_t)cap;
    if (r >= min)
        return i + 1 < nodes ? cap : (uint32_t)r;
    share = cap + r;
    if (i + 2 < nodes)
        return cap;
    return i + 2 == nodes ? (uint32_t)(share - share / 2) : (uint32_t)(share / 2);
}

/* Smallest key of subtree n. */
static agg_key node_min_key(const agg_tree *t, node *n)
{
    while (!n->leaf)
        n = inner_child(t, n)[0];
    return node_keys(n)[0];
}

/* Free the level chains of a failed build: nodes linked by next from
 * heads[0..levels), leaves holding `filled` tails. */
static void build_unwind(agg_tree *t, node **heads, uint32_t levels)
{
    uint32_t l;
    for (l = 0; l < levels; l++) {
        node *n = heads[l];
        while (n) {
            node *nx = n->next;
            if (l == 0) {
                uint32_t i;
                if (t->mode == AGG_KEYS_GENERAL)
                    for (i = 0; i < n->count; i++)
                        tail_release(t, node_keys(n)[i]);
                mem_free(t, n, t->leaf_bytes);
            } else {
                mem_free(t, n, t->inner_bytes);
            }
            n = nx;
        }
    }
}

/* See aggtree.h and section 9. */
agg_status agg_tree_build(agg_tree *t, const agg_key *keys,
                          const double *values, uint64_t n,
                          uint64_t *bad_index)
{
    uint64_t sizes[MAX_DEPTH], i, at;
    node *heads[MAX_DEPTH] = {NULL};
    uint32_t levels = 0, l, cap = t->cap;
    node *prev, *x;

    if (t->root)
        return AGG_INVALID;
    if (n == 0)
        return AGG_OK;
    /* 1. order, before anything is allocated */
    for (i = 1; i < n; i++) {
        int c = key_cmp(t, key_normalize(t, keys[i - 1]), key_normalize(t, keys[i]));
        if (c >= 0) {
            if (bad_index)
                *bad_index = i;
            return c == 0 ? AGG_DUPLICATE : AGG_INVALID;
        }
    }
    /* 2. level sizes */
    sizes[0] = (n + cap - 1) / cap;
    levels = 1;
    while (sizes[levels - 1] > 1) {
        sizes[levels] = (sizes[levels - 1] + cap - 1) / cap;
        levels++;
    }
    /* 3. allocate every node, chained per level */
    for (l = 0; l < levels; l++)
        heads[l] = NULL;
    for (l = 0; l < levels; l++) {
        prev = NULL;
        for (i = 0; i < sizes[l]; i++) {
            x = l == 0 ? leaf_new(t) : inner_new(t);
            if (!x) {
                build_unwind(t, heads, levels);
                return AGG_NOMEM;
            }
            if (prev) {
                prev->next = x;
                if (l == 0)
                    x->prev = prev;
            } else {
                heads[l] = x;
            }
            prev = x;
        }
    }
    /* 4. fill the leaves, copying tails (the only allocations left) */
    at = 0;
    i = 0;
    for (x = heads[0]; x; x = x->next, i++) {
        uint32_t k, sz = pack_size(n, sizes[0], i, cap, t->min);
        agg_key *nk = node_keys(x);
        double *nv = leaf_vals(t, x);
        for (k = 0; k < sz; k++, at++) {
            if (!tail_copy(t, key_normalize(t, keys[at]), &nk[k])) {
                x->count = k;
                build_unwind(t, heads, levels);
                return AGG_NOMEM;
            }
            nv[k] = values ? values[at] : 0.0;
            x->count = k + 1;
        }
    }
    /* 5. internal levels: nothing can fail from here on */
    for (l = 1; l < levels; l++) {
        node *c = heads[l - 1];
        i = 0;
        for (x = heads[l]; x; x = x->next, i++) {
            uint32_t k, sz = pack_size(sizes[l - 1], sizes[l], i, cap, t->min);
            for (k = 0; k < sz; k++, c = c->next) {
                agg_key s = {0, 0};
                entry e;
                if (k > 0) {
                    s = node_min_key(t, c);
                    tail_ref(t, s);
                }
                e = entry_make(t, c, s);
                inner_put(t, x, k, &e);
            }
            x->count = sz;
        }
    }
    for (l = 1; l < levels; l++) {  /* internal nodes have no chain */
        x = heads[l];
        while (x) {
            node *nx = x->next;
            x->next = NULL;
            x = nx;
        }
    }
    t->root = heads[levels - 1];
    t->depth = levels;
    t->len = n;
    return AGG_OK;
}

/* ====================================================================== */
/*  Batch insert of a sorted run (section 13)                             */
/* ====================================================================== */

/* a < b under the tree's mode. */
AGG_INLINE int key_lt(const agg_tree *t, agg_key a, agg_key b)
{
    return t->mode == AGG_KEYS_FAST ? key_lt_fast(a, b) : key_cmp_general(a, b) < 0;
}

/* Number of a[0..n) < k under the tree's mode. */
AGG_INLINE uint32_t keys_count_lt(const agg_tree *t, const agg_key *a, uint32_t n, agg_key k)
{
    return t->mode == AGG_KEYS_FAST ? fast_count_lt(a, n, k) : general_count_lt(a, n, k);
}

/* Number of a[0..n) <= k under the tree's mode. */
AGG_INLINE uint32_t keys_count_le(const agg_tree *t, const agg_key *a, uint32_t n, agg_key k)
{
    return t->mode == AGG_KEYS_FAST ? fast_count_le(a, n, k) : general_count_le(a, n, k);
}

/* Temporary memory of a batch operation: through the failure injector,
 * not counted in nbytes. */
static void *scratch_alloc(size_t size)
{
    return raw_alloc(size ? size : 1);
}

/* A double-double being accumulated exactly: `exact` stays 1 while
 * hi + lo is exactly the sum of what was added (canonical form). */
typedef struct ddsum {
    double hi;                   /* rounded sum */
    double lo;                   /* its error */
    int exact;                   /* hi + lo is exactly the sum */
} ddsum;

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

/* Exact sum of v[0..n) (v NULL: n zeros) as a ddsum. */
static ddsum vals_ddsum(const double *v, uint64_t n)
{
    ddsum s;
    dds_zero(&s);
    if (v && n) {
        double h = 0.0, l = 0.0;
        uint64_t i = 0;
        int ex = 1;
        for (; i < n && ex; i++)
            ex = dd_step(&h, &l, v[i]);
        if (ex)
            ex = dd_finish(&h, &l, ex);
        s.hi = h;
        s.lo = l;
        s.exact = ex;
    }
    return s;
}

/* Entry j of internal node p now summarises a child holding cnt items
 * whose sum changed by d: O(1) if the entry and d are exact and the
 * result stays exact, else recomputed from the child (section 8). */
static void entry_apply(const agg_tree *t, node *p, uint32_t j, uint64_t cnt, const ddsum *d)
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

/* Number of nodes a level list of E entries (or items) is cut into when
 * it no longer fits in one node. */
AGG_INLINE uint64_t pack_count(uint64_t e, uint32_t cap)
{
    return e <= cap ? 1 : (e + cap - 1) / cap;
}

/* Size and first position of node i of the s nodes sharing e entries:
 * `full` (the last node of its level) packs cap each and the last takes
 * the rest (at least 2: an internal node on the rightmost path needs 2
 * children); otherwise the entries are shared evenly (each >= min). */
static void pack_span(uint64_t e, uint64_t s, uint64_t i, int full, uint32_t cap,
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

/* A path through the tree that moves forward with increasing keys.  Upper
 * bounds are kept as references to separator slots, never as copies: a
 * GENERAL separator that gets replaced may free its tail. */
typedef struct finger {
    node *path[MAX_DEPTH];       /* path[d]: node at level d (0 = root, depth - 1 = leaf) */
    uint32_t idx[MAX_DEPTH];     /* path[d + 1] is child idx[d] of path[d] */
    node *hn[MAX_DEPTH];         /* keys of path[d] are < separator hs[d] of hn[d]; NULL: unbounded */
    uint32_t hs[MAX_DEPTH];
} finger;

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

/* Re-descend from level d to the leaf for k.  resume: k is known to be >=
 * separator idx[d] + 1 of path[d], so the search starts there. */
static void finger_descend(const agg_tree *t, finger *f, int d, agg_key k, int resume)
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

/* What one leaf does in a batch insert (planned by the check pass,
 * executed by the apply pass).  Stream of the leaf = the carry received
 * from its left neighbour, then its own items merged with its new keys.
 * The smallest `spill` stream items go to the end of the left neighbour,
 * the next `keep` stay, the rest go to `nnew` new leaves after it (xnew
 * items) or, as a carry of `cout` items, to the front of leaf j + 1. */
typedef struct lop {
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
    uint64_t nl0;                /* its first new leaf in the pool (and in lpend) */
    ddsum gsum;                  /* apply: exact sum of its new values */
} lop;

/* The new keys of one leaf, found by the check pass. */
typedef struct bgroup {
    node *leaf;                  /* the leaf */
    uint64_t start;              /* first key */
    uint64_t k;                  /* how many */
    uint32_t j;                  /* the leaf's index in its parent */
    uint32_t L;                  /* its item count (from the parent's entry) */
} bgroup;

/* Check pass: the route phase left path node x at level lev after the
 * first `gend` groups. */
typedef struct bevent {
    node *x;                     /* the node */
    node *parent;                /* its parent (NULL for the root) */
    uint64_t gend;               /* groups created before */
    uint64_t opend;              /* plan: leaf ops planned before it is finalized */
    uint64_t grown;              /* plan, leaf parents: new leaves under it */
    uint64_t nl0;                /* apply, leaf parents: its new leaves' entries in lpend */
    uint64_t dk;                 /* apply, leaf parents: new keys under it */
    ddsum dsum;                  /* apply, leaf parents: their values' sum */
    uint32_t pj;                 /* its index in the parent */
    int32_t lev;                 /* its level */
    uint8_t rm;                  /* it is the last node of its level */
} bevent;

/* A new node waiting to enter its parent: after the child that had index
 * `pos` before the batch. */
typedef struct pend {
    entry e;                     /* its entry (the separator's reference included) */
    uint32_t pos;                /* original index of the child it follows */
} pend;

/* Pre-allocated nodes. */
typedef struct pool {
    node **a;                    /* the nodes */
    uint64_t n;                  /* how many */
    uint64_t used;               /* handed out */
} pool;

/* The route, search and plan of a contiguous part of the keys (one, or
 * two on two threads): arrays sized before it starts, so it never
 * allocates. */
typedef struct part {
    bgroup *grp;                 /* per touched leaf, in key order */
    uint64_t ngrp;
    uint64_t capgrp;
    bevent *ev;                  /* path nodes left by the route, in order */
    uint64_t nev;
    uint64_t capev;
    lop *ops;                    /* per leaf to rewrite, in key order */
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
typedef struct bins {
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
    bgroup *grp;                 /* = pt[0]'s arrays once the parts are joined */
    uint64_t ngrp;
    bevent *ev;
    uint64_t nev;
    lop *ops;
    uint64_t nops;
    uint64_t grow[MAX_DEPTH];    /* plan: new children of the current node per level */
    uint64_t maxpend[MAX_DEPTH]; /* most new nodes at level d under one parent */
    uint64_t maxsplit;           /* longest entry list of a splitting node */
    uint64_t rootgrow;           /* new siblings of the root */
    uint64_t new_leaves;         /* nodes the apply pass will take */
    uint64_t new_inner;
    pool leaves;                 /* apply pass: reserved nodes */
    pool inner;
    pend *pending[MAX_DEPTH];    /* new nodes at level d waiting for their parent */
    uint64_t npending[MAX_DEPTH];
    entry *tmp;                  /* entry list of a splitting node */
    uint64_t ntmp;
    pend *lpend;                 /* per new leaf: its entry for the parent */
    carry cs[2];                 /* carry state of the (up to two) apply workers */
    uint64_t dcnt[MAX_DEPTH];    /* new items under the path node per level */
    ddsum dsum[MAX_DEPTH];       /* their values' sum */
    /* fused search (FAST, depth >= 2: see "Fused search" in section 13) */
    int fused;                   /* groups are searched by the apply pass */
    char *snap;                  /* per event: a copy of its leaf parent before its ops */
    agg_key *uk;                 /* undo: a leaf parent's items */
    double *uv;
    /* apply pieces (FAST, two threads: see "Pieces" in section 13) */
    int npieces;                 /* piece p is events [pcut[p], pcut[p + 1]) */
    uint64_t pcut[APPLY_PIECES + 1];
    int ran[APPLY_PIECES];       /* piece p ran (to its end or its halt) */
    int pw[APPLY_PIECES];        /* ... with the carry state of worker pw[p] */
    uint64_t halt_e[APPLY_PIECES]; /* piece p stopped at this event (or its end) */
    uint64_t halt_r[APPLY_PIECES]; /* ... before this op */
    /* the pass being run in pieces (run_pieces) */
    int nrun;                    /* its pieces */
    AGG_ATOMIC(long) next_piece; /* the next piece to take */
    AGG_ATOMIC(long) stop;       /* a piece found a present key: take no more */
} bins;

/* The i-th key of the run as the tree compares it. */
AGG_INLINE agg_key bins_key(const bins *b, uint64_t i)
{
    return key_normalize(b->t, b->keys[i]);
}

/* Append a leaf op (the array is sized for the worst case: one op per
 * group plus one absorbing op per group). */
AGG_INLINE void ops_push(part *pt, const lop *op)
{
    pt->ops[pt->nops++] = *op;
}

/* Plan the leaves of parent P (NULL: the root is a leaf) from its groups
 * g[0..ng) (section 13: fit, carry right, spill left, absorb into an
 * untouched right neighbour, or new leaves) into pt's ops.  Returns the
 * number of new leaves under P. */
static uint64_t plan_leaf_ops(bins *b, part *pt, node *P, int rm_parent, const bgroup *grp,
                              uint64_t ng)
{
    const agg_tree *t = b->t;
    uint32_t cap = t->cap, min = t->min, c = 0, prev_keep = 0;
    int64_t prev_j = -1;
    int prev_emit = 0;
    uint64_t total = 0, r;
    for (r = 0; r < ng; r++) {
        const bgroup *g = &grp[r];
        uint32_t j = g->j;
        uint64_t T = (uint64_t)c + g->L + g->k;
        int last = !P || j + 1 == P->count;
        lop op;
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
                    lop ab;         /* the untouched right neighbour absorbs it */
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
    bevent *e = &pt->ev[pt->nev++];
    e->x = pt->f.path[lev];
    e->parent = lev > 0 ? pt->f.path[lev - 1] : NULL;
    e->pj = lev > 0 ? pt->f.idx[lev - 1] : 0;
    e->gend = pt->ngrp;
    e->opend = pt->nops;
    e->grown = 0;
    e->lev = lev;
    e->rm = (uint8_t)(pt->f.hn[lev] == NULL);
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

/* Route phase: keys [start, i) go to the finger's leaf.  Its item count
 * comes from its parent's entry (the parent is in cache, the leaf not). */
AGG_INLINE void route_group(const agg_tree *t, part *pt, int D, uint64_t start, uint64_t i)
{
    bgroup *g = &pt->grp[pt->ngrp++];
    g->leaf = pt->f.path[D - 1];
    g->start = start;
    g->k = i - start;
    g->j = D >= 2 ? pt->f.idx[D - 2] : 0;
    g->L = D >= 2 ? (uint32_t)inner_cnt(t, pt->f.path[D - 2])[g->j] : g->leaf->count;
}

/* Piece p of a batch pass, run by worker w (0: the calling thread, 1: the
 * helper); returns the first key it found present (UINT64_MAX: none). */
typedef uint64_t (*piece_fn)(bins *b, int p, int w);

/* Worker w of run_pieces: takes pieces in order from the shared counter
 * until none is left or a piece has reported a key, and returns the key
 * it found.  A piece before the one that reported was taken earlier, so
 * it runs to its end or to its own first key: the first present key in
 * key order is always among those reported. */
static uint64_t pieces_worker(bins *b, piece_fn fn, int w)
{
    for (;;) {
        long p;
        uint64_t dup;
        if (atomic_load_relaxed(&b->stop))
            return UINT64_MAX;
        p = atomic_add_relaxed(&b->next_piece, 1);
        if (p >= b->nrun)
            return UINT64_MAX;
        if ((dup = fn(b, (int)p, w)) != UINT64_MAX) {
            atomic_store_relaxed(&b->stop, 1);
            return dup;
        }
    }
}

#if AGG_THREADS
typedef struct pieces_job {
    bins *b;
    piece_fn fn;
    uint64_t res;
} pieces_job;

static void *pieces_helper(void *arg)
{
    pieces_job *j = (pieces_job *)arg;
    j->res = pieces_worker(j->b, j->fn, 1);
    return NULL;
}
#endif

/* Run pieces 0..np-1 of a pass: on the calling thread, and with
 * `threads` == 1 on a helper thread too (one that starts late finds fewer
 * pieces or none: with two pieces, the caller takes the second itself if
 * the helper has not started when the first is done; at the end the
 * caller waits at most for the piece the helper holds).  Returns the
 * first present key in key order, or UINT64_MAX. */
static uint64_t run_pieces(bins *b, piece_fn fn, int np, int threads)
{
    b->nrun = np;
    atomic_store_relaxed(&b->next_piece, 0);
    atomic_store_relaxed(&b->stop, 0);
#if AGG_THREADS
    if (threads == 1 && np > 1) {
        pthread_t th;
        pieces_job job;
        job.b = b;
        job.fn = fn;
        job.res = UINT64_MAX;
        if (pthread_create(&th, NULL, pieces_helper, &job) == 0) {
            uint64_t r0 = pieces_worker(b, fn, 0);
            pthread_join(th, NULL);
            return r0 < job.res ? r0 : job.res;
        }
    }
#else
    (void)threads;
#endif
    return pieces_worker(b, fn, 0);
}

/* Index of the first of lk[0..cnt) not below k (FAST order), branch-free:
 * every step halves the range with a conditional move. */
AGG_INLINE uint32_t leaf_lower_bound_fast(const agg_key *lk, uint32_t cnt, agg_key k)
{
    const agg_key *base = lk;
    uint32_t len = cnt;
    if (cnt == 0)
        return 0;
    while (len > 1) {
        uint32_t half = len >> 1;
        base = key_lt_fast(base[half], k) ? base + half : base;
        len -= half;
    }
    return (uint32_t)(base - lk) + (uint32_t)key_lt_fast(*base, k);
}

/* Search phase for one group: each key's position in the leaf; the first
 * key already present is reported (groups are searched in key order). */
static uint64_t search_group(bins *b, bgroup *gr)
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
            b->pos[i] = leaf_lower_bound_fast(lk, cnt, b->keys[i]);
        for (i = gr->start; i < end; i++) {
            uint32_t p = b->pos[i];
            if (p < cnt && lk[p].head == b->keys[i].head && lk[p].rest == b->keys[i].rest)
                return i;
        }
    } else {
        for (i = gr->start; i < end; i++) {
            agg_key k = bins_key(b, i);
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
static void plan_event(bins *b, bevent *ev, uint64_t gr)
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
static void plan_root(bins *b)
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
static uint64_t check_part(bins *b, int p, int w)
{
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
    finger_descend(t, f, 0, bins_key(b, lo), 0);
    if (D == 1) {
        route_group(t, pt, D, lo, hi);
    } else {
        node *hn = f->hn[D - 1];
        uint32_t hs = f->hs[D - 1];
        for (i = lo + 1; i < hi; i++) {
            agg_key k = bins_key(b, i);
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
        bevent *ev = &pt->ev[e];
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
static uint64_t check_split(const bins *b)
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
    finger_descend(t, &f, 0, bins_key(b, lo), 0);
    if (!f.hn[D - 2])
        return 0;                   /* the middle key is in the last leaf parent */
    bound = node_keys(f.hn[D - 2])[f.hs[D - 2]];
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (key_lt(t, bins_key(b, mid), bound))
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
static int part_alloc(bins *b, part *pt, uint64_t nk)
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
    pt->grp = (bgroup *)scratch_alloc((size_t)g * sizeof(bgroup));
    pt->ev = (bevent *)scratch_alloc((size_t)e * sizeof(bevent));
    pt->ops = (lop *)scratch_alloc((size_t)(2 * g) * sizeof(lop));
    return pt->grp && pt->ev && pt->ops;
}

/* Join part 1 to part 0: the events closing part 0's open path (up to the
 * node it shares with part 1's first key), then part 1's groups, events
 * and ops, renumbered. */
static void parts_join(bins *b)
{
    const agg_tree *t = b->t;
    part *p0 = &b->pt[0], *p1 = &b->pt[1];
    int D = (int)t->depth, lev;
    int d = finger_level(t, &p0->f, D - 2, bins_key(b, b->ccut[1]));
    uint64_t i;
    for (lev = D - 2; lev > d; lev--) {
        route_event(p0, lev);
        if (lev == D - 2)
            p0->ev[p0->nev - 1].grown = p0->tail_grown;
    }
    for (i = 0; i < p1->nev; i++) {
        bevent *ev = &p0->ev[p0->nev++];
        *ev = p1->ev[i];
        ev->gend += p0->ngrp;
        ev->opend += p0->nops;
    }
    memcpy(p0->grp + p0->ngrp, p1->grp, (size_t)p1->ngrp * sizeof(bgroup));
    p0->ngrp += p1->ngrp;
    for (i = 0; i < p1->nops; i++) {
        lop *op = &p0->ops[p0->nops++];
        *op = p1->ops[i];
        op->nl0 += p0->new_leaves;
    }
    p0->new_leaves += p1->new_leaves;
}

/* Check and plan: the parts (two threads for a large batch), then, in the
 * route's order, every path node's new children give the number of nodes
 * it becomes: new leaves and internal nodes, new root levels. */
static agg_status bins_check(bins *b, uint64_t *bad_index, int threads)
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
    dup = run_pieces(b, check_part, b->nparts, threads);
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
        bevent *ev = &b->ev[e];
        plan_event(b, ev, ev->lev == D - 2 ? ev->grown : b->grow[ev->lev]);
    }
    plan_root(b);
    return AGG_OK;
}

/* Size and first rank (within the op's xnew items) of new leaf i: packed
 * full with the rest in the last one (the tree's last leaf may hold
 * fewer than min), or shared evenly. */
AGG_INLINE void newleaf_span(const lop *op, uint32_t cap, uint64_t i, uint64_t *base,
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
    const lop *op;
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
AGG_INLINE void pend_push(bins *b, int lev, const entry *e, uint32_t pos)
{
    pend *p = &b->pending[lev][b->npending[lev]++];
    p->e = *e;
    p->pos = pos;
}

/* Apply pass: execute one leaf op (parent P, NULL when the root is a
 * leaf).  Nothing here can fail. */
static void exec_leaf_op(bins *b, carry *cs, lop *op, node *P)
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
            b->lpend[op->nl0 + i].e = e;
            b->lpend[op->nl0 + i].pos = op->j;
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
static void apply_finalize(bins *b, const bevent *ev)
{
    agg_tree *t = b->t;
    int lev = ev->lev;
    node *x = ev->x, *parent = ev->parent;
    uint32_t pj = ev->pj, cap = t->cap;
    pend *pl = b->pending[lev + 1];
    uint64_t np = b->npending[lev + 1], e;
    if (lev == (int)t->depth - 2) {     /* the leaf ops left its new leaves in lpend */
        pl = b->lpend + ev->nl0;
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
                const pend *pe = &pl[pi - 1];
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
                pend_push(b, lev, &ne, pj);
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
static void grow_root(bins *b)
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

/* Apply pass, leaf level, piece p (events [pcut[p], pcut[p + 1])) run by
 * worker w (its carry state): the leaf ops of the piece's leaf parents;
 * each leaf parent's event gets the count and sum of its new keys.
 * Writes only these parents, their leaves, their events, their ops and
 * their new leaves' entries: pieces cut at a leaf parent share nothing
 * they write (FAST keys: no tail reference counts). */
static uint64_t apply_piece(bins *b, int p, int w)
{
    const agg_tree *t = b->t;
    int D = (int)t->depth;
    uint64_t e0 = b->pcut[p], e1 = b->pcut[p + 1];
    carry *cs = &b->cs[w];
    uint64_t e, r = e0 > 0 ? b->ev[e0 - 1].opend : 0;
    cs->cur = 0;
    cs->cn = 0;
    dds_zero(&cs->csum);
    b->ran[p] = 1;
    b->pw[p] = w;
    for (e = e0; e < e1; e++) {
        bevent *ev = &b->ev[e];
        uint64_t end = ev->opend;
        if (ev->lev != D - 2)
            continue;
        ev->nl0 = r < end ? b->ops[r].nl0 : 0;
        ev->dk = 0;
        dds_zero(&ev->dsum);
        if (b->fused)
            memcpy(b->snap + e * t->inner_bytes, ev->x, t->inner_bytes);
        for (; r < end; r++) {
            lop *op = &b->ops[r];
            if (r + PF_DIST < b->nops)
                leaf_prefetch_all(t, b->ops[r + PF_DIST].leaf, 1);
            if (b->fused && op->k) {
                /* the leaf is still as it was: earlier ops write only
                 * leaves to its left, new leaves and the carry buffer */
                bgroup g;
                uint64_t dup;
                g.leaf = op->leaf;
                g.start = op->start;
                g.k = op->k;
                g.j = op->j;
                g.L = 0;
                if ((dup = search_group(b, &g)) != UINT64_MAX) {
                    b->halt_e[p] = e;
                    b->halt_r[p] = r;
                    return dup;
                }
            }
            exec_leaf_op(b, cs, op, op->parent);
            ev->dk += op->k;
            dds_add(&ev->dsum, op->gsum.hi, op->gsum.lo, op->gsum.exact, 0);
        }
    }
    b->halt_e[p] = e1;
    b->halt_r[p] = r;
    return UINT64_MAX;
}

/* Cut the apply pass into pieces: after the leaf parent's event at which
 * the ops reach each 1/APPLY_PIECES share (for two threads, FAST keys),
 * else one piece. */
static void apply_cut(bins *b, int threads)
{
    int np = 0, k;
    b->pcut[0] = 0;
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
            if (lo + 1 < b->nev && lo + 1 > b->pcut[np])
                b->pcut[++np] = lo + 1;
        }
    b->pcut[++np] = b->nev;
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
 * every leaf exactly; the new leaves are unlinked (the pool frees them);
 * the parent is copied back whole. */
static void undo_parent(bins *b, bevent *ev, uint64_t e, uint64_t ra, uint64_t rb,
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
            const lop *op = &b->ops[r];
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
static void undo_piece(bins *b, int p)
{
    int D = (int)b->t->depth;
    uint64_t e0 = b->pcut[p], e1 = b->pcut[p + 1];
    uint64_t e, r = e0 > 0 ? b->ev[e0 - 1].opend : 0;
    if (!b->ran[p])
        return;
    for (e = e0; e < e1 && e <= b->halt_e[p]; e++) {
        bevent *ev = &b->ev[e];
        if (ev->lev != D - 2)
            continue;
        if (e == b->halt_e[p])
            undo_parent(b, ev, e, r, b->halt_r[p], &b->cs[b->pw[p]]);
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
static uint64_t bins_apply(bins *b, int threads)
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
            lop *op = &b->ops[r];
            exec_leaf_op(b, cs, op, NULL);
        }
        for (r = 0; r < b->new_leaves; r++)
            pend_push(b, 0, &b->lpend[r].e, 0);
    } else {
        apply_cut(b, threads);
        dup = run_pieces(b, apply_piece, b->npieces, threads);
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
static void bins_free(bins *b, int unreserve)
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
    free(b->lpend);
    free(b->snap);
    free(b->uk);
    free(b->uv);
    free(b->cs[0].ck[0]);
    free(b->cs[0].cv[0]);
}

/* Reserve everything the plan needs: nodes, tail copies, buffers.  0 if
 * an allocation failed (the caller unwinds with bins_free(b, 1)). */
static int bins_reserve(bins *b)
{
    agg_tree *t = b->t;
    uint64_t i;
    int d;
    /* the pool arrays first, so that unwinding knows what exists */
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
            !(b->pending[d] = (pend *)scratch_alloc((size_t)b->maxpend[d] * sizeof(pend))))
            return 0;
    b->ntmp = b->maxsplit > b->rootgrow + 1 ? b->maxsplit : b->rootgrow + 1;
    if (!(b->tmp = (entry *)scratch_alloc((size_t)b->ntmp * sizeof(entry))))
        return 0;
    if (!(b->lpend = (pend *)scratch_alloc((size_t)b->new_leaves * sizeof(pend))))
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
            if (!tail_copy(t, bins_key(b, i), &b->own[i])) {
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


/* Debug switch, see aggtree.h. */
static AGG_ATOMIC(long) g_batch_mode = 0;

long agg_debug_insert_sorted_mode(long mode)
{
    return atomic_exchange_relaxed(&g_batch_mode, mode);
}

/* Batches of at least this many keys use two threads (section 13). */
#define BATCH_THREAD_MIN 16384

/* 1: cut the batch in two halves and use a second thread - forced by
 * the debug mode, else for large batches unless AGGTREE_THREADS=1 in the
 * environment; 2 (debug mode 3): the same halves, both on this thread;
 * 0: one part. */
static int batch_threads(uint64_t n, long mode)
{
    if (mode == 2 || mode == 3)
        return mode == 2 ? 1 : 2;
    if (mode != 0 || n < BATCH_THREAD_MIN)
        return 0;
    return threads_allowed();
}

/* 1 if keys[0..n) strictly increase (the batch operations' precondition);
 * else 0 with *bad_index = the first i with keys[i - 1] >= keys[i]. */
static int keys_increasing(const agg_tree *t, const agg_key *keys, uint64_t n,
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

/* See aggtree.h and section 13. */
agg_status agg_tree_insert_sorted(agg_tree *t, const agg_key *keys, const double *values,
                                  uint64_t n, uint64_t *bad_index)
{
    bins b;
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
        bins_free(&b, 1);
        return AGG_NOMEM;
    }
    st = bins_check(&b, bad_index, threads);
    if (st != AGG_OK) {
        bins_free(&b, 1);
        return st;
    }
    /* 3. reserve */
    if (!bins_reserve(&b)) {
        bins_free(&b, 1);
        return AGG_NOMEM;
    }
    /* 4. apply: fails only on a present key found by the fused search,
     * and then has put everything back */
    dup = bins_apply(&b, threads);
    if (dup != UINT64_MAX) {
        if (bad_index)
            *bad_index = dup;
        bins_free(&b, 1);
        return AGG_DUPLICATE;
    }
    bins_free(&b, 0);
    return AGG_OK;
}

/* ====================================================================== */
/*  Batch delete of a sorted run (section 13)                             */
/* ====================================================================== */

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
            uint32_t p = leaf_lower_bound_fast(lk, cnt, keys[i]);
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

/* Parts 0..np-1 of a batch delete pass, claimed from a counter by the
 * calling thread and, with threads == 1, a helper thread (one that starts
 * late finds fewer parts or none; the caller waits at most for the part
 * the helper holds).  Parts write disjoint memory.  (The batch insert's
 * run_pieces is the same with a stop flag and a result.) */
typedef void (*dpart_fn)(void *ctx, int p);

typedef struct dparts {
    void *ctx;
    dpart_fn fn;
    int np;
    AGG_ATOMIC(long) next;
} dparts;

static void dparts_worker(dparts *j)
{
    long p;
    while ((p = atomic_add_relaxed(&j->next, 1)) < j->np)
        j->fn(j->ctx, (int)p);
}

#if AGG_THREADS
static void *dparts_helper(void *arg)
{
    dparts_worker((dparts *)arg);
    return NULL;
}
#endif

static void run_dparts(void *ctx, dpart_fn fn, int np, int threads)
{
    dparts j;
    j.ctx = ctx;
    j.fn = fn;
    j.np = np;
    atomic_store_relaxed(&j.next, 0);
#if AGG_THREADS
    if (threads == 1 && np > 1) {
        pthread_t th;
        if (pthread_create(&th, NULL, dparts_helper, &j) == 0) {
            dparts_worker(&j);
            pthread_join(th, NULL);
            return;
        }
    }
#else
    (void)threads;
#endif
    dparts_worker(&j);
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

static void dcheck_part(void *ctx, int p)
{
    dcheck *c = (dcheck *)ctx;
    uint64_t lo = p ? c->cut : 0, hi = p ? c->n : c->cut;
    c->st[p] = dels_check(c->t, c->keys + lo, hi - lo, &c->bad[p],
                          c->leaves ? c->leaves + lo : NULL,
                          c->leaves ? c->gfirst + lo : NULL, &c->ng[p]);
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
    run_dparts(&c, dcheck_part, 2, threads);
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
    r = leaf_lower_bound_fast(lk, cnt, keys[i]);
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
    node *n;
    for (d = D - 2; d >= 0; d--) {
        node *p = f->path[d];
        uint32_t ci = f->idx[d];
        if (inner_child(t, p)[ci]->count >= t->min)
            entry_apply(t, p, ci, inner_cnt(t, p)[ci] - kk, neg);
        else
            node_repair(t, p, ci);
    }
    n = t->root;
    if (!n->leaf && n->count == 1) {
        t->root = inner_child(t, n)[0];
        mem_free(t, n, t->inner_bytes);
        t->depth--;
    }
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

typedef struct dlp {
    uint64_t key;                /* index of a batch key under the leaf parent */
    uint64_t cnt;                /* items its leaves lost */
    ddsum sum;                   /* minus their values' sum */
} dlp;

typedef struct dpieces {
    agg_tree *t;
    const agg_key *keys;
    node **leaves;               /* groups' leaves, for prefetching (NULL: none) */
    const uint64_t *gfirst;      /* groups' first key indexes */
    uint64_t ng;
    uint64_t cut[DEL_PIECES + 1];
    dlp *lp[DEL_PIECES];         /* each piece's leaf parent records ... */
    uint64_t nlp[DEL_PIECES];
    uint64_t *rep[DEL_PIECES];   /* ... and repair keys */
    uint64_t nrep[DEL_PIECES];
    uint64_t gone[DEL_PIECES];   /* items removed */
} dpieces;

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
static void dels_piece(void *ctx, int p)
{
    dpieces *c = (dpieces *)ctx;
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
                dlp *r = &c->lp[p][c->nlp[p]++];
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
        dlp *r = &c->lp[p][c->nlp[p]++];
        r->key = lpkey;
        r->cnt = lpcnt;
        r->sum = lpsum;
    }
}

/* The compaction pass of a FAST batch (every key present, depth >= 3) in
 * pieces, on a helper thread too if threads == 1; then, on this thread,
 * the levels above the leaf parents and the repairs.  0 if the batch is
 * not worth cutting or the records' memory is not there (the caller then
 * runs the one-thread pass; nothing has changed). */
static int dels_apply_pieces(agg_tree *t, const agg_key *keys, uint64_t n, node **leaves,
                             const uint64_t *gfirst, uint64_t ng, int threads)
{
    dpieces c;
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
    mem = (char *)raw_alloc(lpsz * sizeof(dlp) + repsz * sizeof(uint64_t));
    if (!mem)
        return 0;
    {
        dlp *lp = (dlp *)(void *)mem;
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
    run_dparts(&c, dels_piece, np, threads);
    /* the levels above the leaf parents: each record's change, on the
     * path down to its leaf parent (the structure has not changed yet) */
    for (p = 0; p < np; p++) {
        t->len -= c.gone[p];
        for (q = 0; q < c.nlp[p]; q++) {
            const dlp *r = &c.lp[p][q];
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
    if (t->root->leaf && t->root->count == 0) {
        mem_free(t, t->root, t->leaf_bytes);
        t->root = NULL;
        t->depth = 0;
    }
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

/* ====================================================================== */
/*  Sorting keys (section 14)                                             */
/* ====================================================================== */

/* Sort state (one per thread).  The records (24 bytes: key and value)
 * go from the caller's arrays (a) to scratch arrays (b) of the same size
 * (the split) and back, each bucket sorted on the way (ksort_direct); an
 * input of at most SORT_LOCAL records is sorted in place as 8-byte pairs
 * (prefix << b | index) in the work area w, then gathered by index
 * (ksort_local).  See section 14. */
typedef struct ksort {
    agg_key *ka, *kb;            /* records: caller's, scratch (NULL: none) */
    double *va, *vb;             /* values (NULL: none) */
    uint64_t *w;                 /* pairs or prefixes: 3 * min(n, SORT_LOCAL) words */
    uint32_t *pcnt;              /* pair levels: SORT_NCNT counters each */
    uint64_t *cnt;               /* record levels, likewise (NULL: none) */
    uint64_t vhead, vrest;       /* bits that differ between some two keys */
} ksort;

#define SORT_WMAX 12             /* widest digit */
#define SORT_WTOP 11             /* widest digit while out of cache */
#define SORT_PER (-1)            /* log2 of the keys aimed at per radix bucket */
#define SORT_INCACHE (1u << 17)  /* keys that fit in a cache level */
#define SORT_LOCAL (1u << 14)    /* larger inputs are split; larger buckets split again */
#define SORT_SMALL 16            /* insertion sort of records at or below this */
#define SORT_PSMALL 8            /* radix buckets of pairs left to the insertion pass */
#define SORT_DSMALL 32           /* radix buckets of records left to the insertion pass */
#define SORT_MAXDEPTH 34         /* record levels: each scatters >= 4 bits of 128, plus the last */
#define SORT_PMAXDEPTH 18        /* pair levels: >= 4 bits of 64 each, plus the last */
#define SORT_NCNT ((1u << SORT_WMAX) + 1)
#define SORT_DBITS 12            /* widest first digit of the split */
#define SORT_BUCKET 384          /* records aimed at per bucket of the split */
#define SORT_NBMAX 1024          /* most buckets of the split (write streams) */
#define SORT_THREADS_MIN (1u << 16) /* two threads from this many records */

/* FAST order: (head, rest) unsigned. */
AGG_INLINE int ksort_lt(agg_key a, agg_key b)
{
    return key_lt_fast(a, b);
}

/* Insertion sort of n keys (and values) in place. */
static void ksort_small(agg_key *k, double *v, uint64_t n)
{
    uint64_t i, j;
    if (v) {
        for (i = 1; i < n; i++) {
            agg_key x = k[i];
            double y = v[i];
            for (j = i; j > 0 && ksort_lt(x, k[j - 1]); j--) {
                k[j] = k[j - 1];
                v[j] = v[j - 1];
            }
            k[j] = x;
            v[j] = y;
        }
    } else {
        for (i = 1; i < n; i++) {
            agg_key x = k[i];
            for (j = i; j > 0 && ksort_lt(x, k[j - 1]); j--)
                k[j] = k[j - 1];
            k[j] = x;
        }
    }
}

/* Leading zero bits of x != 0. */
AGG_INLINE int agg_clz64(uint64_t x)
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_clzll(x);
#else
    int n = 0;
    while (!(x & (UINT64_C(1) << 63))) {
        x <<= 1;
        n++;
    }
    return n;
#endif
}

/* Trailing zero bits of x != 0. */
AGG_INLINE int agg_ctz64(uint64_t x)
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(x);
#else
    int n = 0;
    while (!(x & 1)) {
        x >>= 1;
        n++;
    }
    return n;
#endif
}

/* The digit width for a range of n keys or pairs. */
AGG_INLINE uint32_t ksort_width(uint64_t n)
{
    uint32_t w = (uint32_t)(63 - agg_clz64(n)) - SORT_PER;
    w = w < 4 ? 4 : w > SORT_WMAX ? SORT_WMAX : w;
    if (n > SORT_INCACHE && w > SORT_WTOP)
        w = SORT_WTOP;
    return w;
}

/* MSD radix sort of the n pairs at p0 (or at p1, with in1) on bits lo..hi
 * (the bits below lo are the index); the result ends at p0.  Buckets of
 * more than SORT_PSMALL pairs are sorted recursively; the small ones are
 * finished by one insertion pass over the whole range, which moves every
 * pair only inside its own bucket (all bits above the digit are equal in
 * the range, the digit orders the buckets) and so costs at most
 * SORT_PSMALL steps a pair.  cnt: this level's counters, then the deeper
 * levels'; with have_cnt they already hold the histogram of the w-bit
 * digit ending at bit hi. */
static void ksort_pairs(uint64_t *p0, uint64_t *p1, uint32_t *cnt, uint32_t n, int hi, int lo,
                        int in1, uint32_t w, int have_cnt)
{
    uint64_t *x = in1 ? p1 : p0, *y = in1 ? p0 : p1;
    uint32_t mask, nb, d, i, j, sum, big = 0;
    int shift;
    for (;;) {
        if (hi < lo || n <= SORT_PSMALL) {
            if (in1)
                memcpy(p0, p1, (size_t)n * sizeof *p0);
            if (hi >= lo)           /* else all bits used: index order stands */
                goto finish;
            return;
        }
        if (!have_cnt)
            w = ksort_width(n);
        shift = hi - (int)w + 1;
        if (shift < lo) {
            shift = lo;
            w = (uint32_t)(hi - lo + 1);
        }
        mask = (1u << w) - 1;
        nb = mask + 1;
        if (!have_cnt) {
            memset(cnt, 0, (size_t)nb * sizeof *cnt);
            for (i = 0; i < n; i++)
                cnt[(x[i] >> shift) & mask]++;
        }
        have_cnt = 0;
        for (d = 0; d < nb; d++)
            if (cnt[d])
                break;
        if (cnt[d] != n)
            break;
        hi = shift - 1;             /* one bucket holds all: next digit */
    }
    /* scatter into the other buffer (then back to p0), sort each large
     * bucket there */
    sum = 0;
    for (d = 0; d < nb; d++) {
        uint32_t c = cnt[d];
        cnt[d] = sum;
        sum += c;
        big |= c > SORT_PSMALL;
    }
    for (i = 0; i < n; i++) {
        uint64_t p = x[i];
        y[cnt[(p >> shift) & mask]++] = p;
    }
    if (!in1)
        memcpy(p0, p1, (size_t)n * sizeof *p0);
    if (big) {                      /* cnt[d] is now the end of bucket d */
        uint32_t start = 0;
        for (d = 0; d < nb; d++) {
            uint32_t end = cnt[d];
            if (end - start > SORT_PSMALL)
                ksort_pairs(p0 + start, p1 + start, cnt + SORT_NCNT, end - start, shift - 1, lo,
                            0, 0, 0);
            start = end;
        }
    }
    if (shift == lo)                /* the last digit: ties keep index order */
        return;
finish:                             /* finish the small buckets */
    for (i = 1; i < n; i++) {
        uint64_t p = p0[i];
        if (p < p0[i - 1]) {
            j = i;
            do {
                p0[j] = p0[j - 1];
                j--;
            } while (j > 0 && p < p0[j - 1]);
            p0[j] = p;
        }
    }
}

/* How a key maps to its prefix: ((((head << ah) >> bh) & mh) << ch) |
 * (((rest << ar) >> br) & mr): the varying span of head (its highest to
 * its lowest varying bit), then that of rest, cut to the top eff bits.
 * Bits outside the spans are the same in every key, so dropping them
 * keeps the order. */
typedef struct kprefix {
    int ah, bh, ch, ar, br;
    uint64_t mh, mr;
} kprefix;

AGG_INLINE uint64_t ksort_prefix(const kprefix *f, agg_key k)
{
    return ((((k.head << f->ah) >> f->bh) & f->mh) << f->ch) |
           (((k.rest << f->ar) >> f->br) & f->mr);
}

/* Set f up for keys with varying bits vh, vr (not both 0), keeping at
 * most maxbits (1..64) bits; returns eff, the prefix's width, and sets
 * *total to the width of both spans (the prefix is exact if eff == total). */
static int ksort_prefix_setup(kprefix *f, uint64_t vh, uint64_t vr, int maxbits, int *total)
{
    int hi_h = 0, hi_r = 0, lh = 0, lr = 0, eff;
    if (vh) {
        hi_h = 63 - agg_clz64(vh);
        lh = hi_h - agg_ctz64(vh) + 1;
    }
    if (vr) {
        hi_r = 63 - agg_clz64(vr);
        lr = hi_r - agg_ctz64(vr) + 1;
    }
    *total = lh + lr;
    eff = *total < maxbits ? *total : maxbits;
    memset(f, 0, sizeof *f);
    if (lh >= eff) {                /* all head */
        f->ah = 63 - hi_h;
        f->bh = 64 - eff;
        f->mh = ~UINT64_C(0);
    } else {                        /* all of head's span, then the top of rest's */
        int rb = eff - lh;
        if (lh) {
            f->ah = 63 - hi_h;
            f->bh = 64 - lh;
            f->mh = ~UINT64_C(0);
            f->ch = rb;
        }
        f->ar = 63 - hi_r;
        f->br = 64 - rb;
        f->mr = ~UINT64_C(0);
    }
    return eff;
}

/* OR and AND of the heads and of the rests of k[0..n): m = {OR heads, AND
 * heads, OR rests, AND rests}; a bit varies between two of the keys where
 * OR ^ AND has it (m[0] ^ m[1] for heads, m[2] ^ m[3] for rests). */
static void keys_or_and(const agg_key *k, uint64_t n, uint64_t m[4])
{
    uint64_t hor = 0, hand = ~UINT64_C(0), ror = 0, rand_ = ~UINT64_C(0), i;
    for (i = 0; i < n; i++) {
        hor |= k[i].head;
        hand &= k[i].head;
        ror |= k[i].rest;
        rand_ &= k[i].rest;
    }
    m[0] = hor;
    m[1] = hand;
    m[2] = ror;
    m[3] = rand_;
}

/* Sort the n records xk/xv (SORT_SMALL < n <= SORT_LOCAL, or n of the
 * work area) into dk/dv, which are either the same arrays or disjoint
 * ones; xv and dv are both NULL or both not.  known: keys_or_and of
 * these keys if the caller has it, else NULL.  Uses s->w and s->pcnt. */
static void ksort_local(const ksort *s, agg_key *xk, double *xv, agg_key *dk, double *dv,
                        uint64_t n, const uint64_t *known)
{
    uint64_t own[4], vh, vr, i, imask;
    const uint64_t *mk = known;
    uint32_t *cnt = s->pcnt;
    uint64_t *p0 = s->w, run = 0;
    int b, eff, total, top;
    uint32_t w, mask;
    kprefix f;
    if (!mk) {
        keys_or_and(xk, n, own);
        mk = own;
    }
    vh = mk[0] ^ mk[1];
    vr = mk[2] ^ mk[3];
    if (!vh && !vr) {               /* all keys equal */
        if (dk != xk) {
            memcpy(dk, xk, (size_t)n * sizeof *dk);
            if (xv)
                memcpy(dv, xv, (size_t)n * sizeof *dv);
        }
        return;
    }
    b = 64 - agg_clz64(n - 1);      /* index bits */
    eff = ksort_prefix_setup(&f, vh, vr, 64 - b, &total);
    /* build the pairs; then subtract the smallest prefix, so that the
     * top digit spans the prefixes' range, not just their varying bits
     * (keys from 0x0ff0.. to 0x100f.. vary in the top bit, but would
     * share it but for a few) */
    {
        uint64_t lo = ~UINT64_C(0), hi = 0, base;
        int bits;
        for (i = 0; i < n; i++) {
            uint64_t q = ksort_prefix(&f, xk[i]);
            lo = q < lo ? q : lo;
            hi = q > hi ? q : hi;
            p0[i] = q << b | i;
        }
        bits = 64 - agg_clz64(hi - lo);     /* hi > lo: the keys differ in the prefix */
        base = lo << b;
        w = ksort_width(n);
        if ((int)w > bits)
            w = (uint32_t)bits;
        top = b + bits - (int)w;
        mask = (1u << w) - 1;
        memset(cnt, 0, (size_t)(mask + 1) * sizeof *cnt);
        for (i = 0; i < n; i++) {
            uint64_t p = p0[i] - base;
            p0[i] = p;
            cnt[(p >> top) & mask]++;
        }
        ksort_pairs(p0, p0 + n, cnt, (uint32_t)n, b + bits - 1, b, 0, w, 1);
    }
    /* gather by index (in place: through the work area after the pairs);
     * note whether two neighbours share a prefix */
    imask = (UINT64_C(1) << b) - 1;
    {
        agg_key *g = dk == xk ? (agg_key *)(void *)(p0 + n) : dk;
        g[0] = xk[p0[0] & imask];
        for (i = 1; i < n; i++) {
            g[i] = xk[p0[i] & imask];
            run |= ((p0[i] ^ p0[i - 1]) >> b) == 0;
        }
        if (g != dk)
            memcpy(dk, g, (size_t)n * sizeof *dk);
    }
    if (xv) {
        double *g = dv == xv ? (double *)(void *)(p0 + n) : dv;
        for (i = 0; i < n; i++)
            g[i] = xv[p0[i] & imask];
        if (g != dv)
            memcpy(dv, g, (size_t)n * sizeof *dv);
    }
    if (!run || eff == total)
        return;                     /* equal prefixes: equal keys */
    /* runs of equal prefixes differ below them: sort each in place, on its
     * own varying bits (fewer than here: the prefix's are gone) */
    {
        uint64_t start = 0, cur = ksort_prefix(&f, dk[0]), nx = 0, m;
        for (i = 1; i <= n; i++) {
            if (i < n && (nx = ksort_prefix(&f, dk[i])) == cur)
                continue;
            m = i - start;
            if (m > SORT_SMALL)
                ksort_local(s, dk + start, dv ? dv + start : NULL, dk + start,
                            dv ? dv + start : NULL, m, NULL);
            else if (m > 1)
                ksort_small(dk + start, dv ? dv + start : NULL, m);
            start = i;
            cur = nx;
        }
    }
}

/* The prefix of a whole split (NULL: none, each range finds its own). */
typedef struct kglobal {
    kprefix f;
    int eff, total;
} kglobal;

/* Sort the n records xk/xv (SORT_SMALL < n <= SORT_LOCAL) into the
 * disjoint arrays dk/dv (xv, dv: both NULL or both not): one scatter of
 * the records by the top digit of (prefix - smallest prefix), the prefix
 * being g's (the split's) or found here from the range's varying bits,
 * then buckets of more than SORT_DSMALL records sorted in place by
 * ksort_local, and one insertion pass over the whole range for the small
 * ones (keys move only inside their bucket: at most SORT_DSMALL steps).
 * The insertion pass compares the prefixes, then the keys if the prefixes
 * are equal but not exact.  Uses s->w (prefixes) and the last level of
 * s->pcnt. */
static void ksort_direct(const ksort *s, const kglobal *g, agg_key *xk, double *xv,
                         agg_key *dk, double *dv, uint64_t n)
{
    uint64_t i, *q = s->w, *qd = s->w + n, lo = ~UINT64_C(0), hi = 0;
    uint32_t *cnt = s->pcnt + (size_t)(SORT_PMAXDEPTH - 1) * SORT_NCNT, w, d, nb, sum, big = 0;
    int eff, total, bits, shift;
    kprefix f;
    if (g) {
        f = g->f;
        eff = g->eff;
        total = g->total;
    } else {
        uint64_t mk[4], vh, vr;
        keys_or_and(xk, n, mk);
        vh = mk[0] ^ mk[1];
        vr = mk[2] ^ mk[3];
        if (!vh && !vr) {           /* all keys equal */
            memcpy(dk, xk, (size_t)n * sizeof *dk);
            if (xv)
                memcpy(dv, xv, (size_t)n * sizeof *dv);
            return;
        }
        eff = ksort_prefix_setup(&f, vh, vr, 64, &total);
    }
    for (i = 0; i < n; i++) {
        uint64_t p = ksort_prefix(&f, xk[i]);
        lo = p < lo ? p : lo;
        hi = p > hi ? p : hi;
        q[i] = p;
    }
    bits = hi > lo ? 64 - agg_clz64(hi - lo) : 0;
    w = ksort_width(n);
    if (g && (int)w > bits) {       /* g's prefix hardly tells these keys apart */
        ksort_direct(s, NULL, xk, xv, dk, dv, n);
        return;
    }
    if ((int)w > bits)
        w = (uint32_t)bits;
    shift = bits - (int)w;
    nb = 1u << w;
    memset(cnt, 0, (size_t)nb * sizeof *cnt);
    for (i = 0; i < n; i++)
        cnt[(q[i] - lo) >> shift]++;
    sum = 0;
    for (d = 0; d < nb; d++) {
        uint32_t c = cnt[d];
        cnt[d] = sum;
        sum += c;
        big |= c > SORT_DSMALL;
    }
    if (xv) {
        for (i = 0; i < n; i++) {
            uint32_t at = cnt[(q[i] - lo) >> shift]++;
            dk[at] = xk[i];
            dv[at] = xv[i];
            qd[at] = q[i];
        }
    } else {
        for (i = 0; i < n; i++) {
            uint32_t at = cnt[(q[i] - lo) >> shift]++;
            dk[at] = xk[i];
            qd[at] = q[i];
        }
    }
    if (shift == 0 && eff == total)
        return;                     /* the digit was the whole key */
    if (big) {                      /* cnt[d] is now the end of bucket d */
        uint32_t start = 0;
        for (d = 0; d < nb; d++) {
            uint32_t end = cnt[d];
            if (end - start > SORT_DSMALL)
                ksort_local(s, dk + start, dv ? dv + start : NULL, dk + start,
                            dv ? dv + start : NULL, end - start, NULL);
            start = end;
        }
        for (i = 0; i < n; i++)     /* ksort_local used their room */
            qd[i] = ksort_prefix(&f, dk[i]);
    }
    {                               /* insertion by prefix (and key) */
        int exact = eff == total;
        for (i = 1; i < n; i++) {
            uint64_t x = qd[i];
            if (x < qd[i - 1] || (!exact && x == qd[i - 1] && ksort_lt(dk[i], dk[i - 1]))) {
                agg_key kx = dk[i];
                double vx = dv ? dv[i] : 0;
                uint64_t j = i;
                do {
                    qd[j] = qd[j - 1];
                    dk[j] = dk[j - 1];
                    if (dv)
                        dv[j] = dv[j - 1];
                    j--;
                } while (j > 0 && (x < qd[j - 1] ||
                                   (!exact && x == qd[j - 1] && ksort_lt(kx, dk[j - 1]))));
                qd[j] = x;
                dk[j] = kx;
                if (dv)
                    dv[j] = vx;
            }
        }
    }
}

/* Highest varying bit of the composite 128-bit key (head << 64 | rest)
 * at or below bit p, or -1. */
static int ksort_next_bit(const ksort *s, int p)
{
    if (p >= 64) {
        uint64_t m = s->vhead & (p >= 127 ? ~UINT64_C(0) : ((UINT64_C(1) << (p - 63)) - 1));
        if (m)
            return 64 + 63 - agg_clz64(m);
        p = 63;
    }
    if (p < 0)
        return -1;
    {
        uint64_t m = s->vrest & (p >= 63 ? ~UINT64_C(0) : ((UINT64_C(1) << (p + 1)) - 1));
        return m ? 63 - agg_clz64(m) : -1;
    }
}

/* The w-bit digit of k whose lowest bit is composite bit `shift`. */
AGG_INLINE uint32_t ksort_digit(agg_key k, int shift, uint32_t mask)
{
    if (shift >= 64)
        return (uint32_t)(k.head >> (shift - 64)) & mask;
    if (shift == 0)
        return (uint32_t)k.rest & mask;
    return (uint32_t)((k.rest >> shift) | (k.head << (64 - shift))) & mask;
}

/* MSD radix sort of the records [off, off + n), currently in buffer b
 * (in_b) or a, on the bits at and below composite bit p; the result ends
 * in a.  Ranges of at most SORT_LOCAL records go to ksort_direct (from b)
 * or ksort_local (in a). */
static void ksort_msd(ksort *s, uint64_t off, uint64_t n, int p, int depth, int in_b)
{
    agg_key *xk = in_b ? s->kb : s->ka, *yk = in_b ? s->ka : s->kb;
    double *xv = in_b ? s->vb : s->va, *yv = in_b ? s->va : s->vb;
    uint64_t *cnt = s->cnt + (size_t)depth * SORT_NCNT, i, sum;
    uint32_t w, mask, nb, d;
    int shift;
    for (;;) {
        p = ksort_next_bit(s, p);
        if (p < 0 || n <= SORT_SMALL) {
            ksort_small(xk + off, xv ? xv + off : NULL, n);
            if (in_b) {
                memcpy(s->ka + off, xk + off, (size_t)n * sizeof *xk);
                if (xv)
                    memcpy(s->va + off, xv + off, (size_t)n * sizeof *xv);
            }
            return;
        }
        if (n <= SORT_LOCAL) {
            if (in_b)
                ksort_direct(s, NULL, xk + off, xv ? xv + off : NULL, s->ka + off,
                             s->va ? s->va + off : NULL, n);
            else
                ksort_local(s, xk + off, xv ? xv + off : NULL, xk + off, xv ? xv + off : NULL, n,
                            NULL);
            return;
        }
        /* at most 2^SORT_WTOP buckets while the data is larger than the
         * caches (many write streams thrash the TLB) */
        w = ksort_width(n);
        shift = p - (int)w + 1;
        if (shift < 0) {
            shift = 0;
            w = (uint32_t)p + 1;
        }
        mask = (1u << w) - 1;
        nb = mask + 1;
        memset(cnt, 0, (size_t)nb * sizeof *cnt);
        for (i = 0; i < n; i++)
            cnt[ksort_digit(xk[off + i], shift, mask)]++;
        for (d = 0; d < nb; d++)
            if (cnt[d])
                break;
        if (cnt[d] != n)
            break;
        p = shift - 1;              /* one bucket holds all: next digit */
    }
    /* scatter into the other buffer, then sort each bucket there */
    sum = off;
    for (d = 0; d < nb; d++) {
        uint64_t c = cnt[d];
        cnt[d] = sum;
        sum += c;
    }
    if (xv) {
        for (i = off; i < off + n; i++) {
            uint64_t at = cnt[ksort_digit(xk[i], shift, mask)]++;
            yk[at] = xk[i];
            yv[at] = xv[i];
        }
    } else {
        for (i = off; i < off + n; i++)
            yk[cnt[ksort_digit(xk[i], shift, mask)]++] = xk[i];
    }
    /* cnt[d] is now the end of bucket d */
    {
        uint64_t start = off;
        for (d = 0; d < nb; d++) {
            uint64_t end = cnt[d];
            if (end > start)
                ksort_msd(s, start, end - start, shift - 1, depth + 1, !in_b);
            start = end;
        }
    }
}


/* A range of the split: sort the n records at offset off of b into a
 * (g: the split's prefix). */
static void ksort_bucket(ksort *s, const kglobal *g, uint64_t off, uint64_t n)
{
    if (n <= SORT_SMALL) {
        memcpy(s->ka + off, s->kb + off, (size_t)n * sizeof *s->ka);
        if (s->va)
            memcpy(s->va + off, s->vb + off, (size_t)n * sizeof *s->va);
        ksort_small(s->ka + off, s->va ? s->va + off : NULL, n);
    } else if (n <= SORT_LOCAL) {
        ksort_direct(s, g, s->kb + off, s->vb ? s->vb + off : NULL, s->ka + off,
                     s->va ? s->va + off : NULL, n);
    } else {                        /* a heavy digit value: MSD on its own varying bits */
        ksort t = *s;
        uint64_t mk[4];
        keys_or_and(s->kb + off, n, mk);
        t.vhead = mk[0] ^ mk[1];
        t.vrest = mk[2] ^ mk[3];
        ksort_msd(&t, off, n, 127, 0, 1);
    }
}

#define KSORT_CHUNKS 16          /* most pieces of the input (n / 2^14, at least 4) */

/* The split.  The records a -> b by the first dbits bits of their
 * prefix, grouped into at most SORT_NBMAX buckets of about SORT_BUCKET
 * records or more (a run of digit values per bucket: the histogram
 * evens out skewed bits such as the exponents of doubles); then every
 * bucket is sorted from b into a.  The caller's thread makes the
 * histograms (one per chunk of the input) and the plan; the chunks to
 * scatter and then the buckets to sort are handed out one at a time to
 * whichever thread asks, the caller's and a helper's.  The caller never
 * waits for the helper to start: if it comes late, the caller has done
 * more of the work (all of it, if the helper never comes), and waits at
 * most for a chunk or a bucket the helper has taken. */
typedef struct ksplit {
    ksort *s[2];                 /* state of the caller, of the helper */
    int sh, dbits;
    uint64_t n, target;
    kglobal g;                   /* the prefix (64 bits at most) */
    uint32_t *hist;              /* KSORT_CHUNKS x 2^dbits counters */
    uint16_t *tab;               /* digit value -> bucket */
    uint64_t *start;             /* bucket k: [start[k], start[k + 1]) */
    uint64_t *pos;               /* KSORT_CHUNKS x SORT_NBMAX: next place of chunk j in bucket k */
    uint64_t chunk[KSORT_CHUNKS + 1];
    uint64_t mask[KSORT_CHUNKS][4]; /* per chunk: OR, AND of heads, of rests */
    int nch;                     /* pieces of the input */
    int equal;                   /* all keys are equal: nothing to do */
    uint32_t nbk;                /* buckets */
#if AGG_THREADS
    atomic_int next_mask, masks_done, masked, next_hist, hists_done, planned;
    atomic_int next_chunk, chunks_done;
    atomic_uint next_bucket, buckets_done;
#else
    int next_mask, masks_done, masked, next_hist, hists_done, planned;
    int next_chunk, chunks_done;
    unsigned next_bucket, buckets_done;
#endif
} ksplit;

#if AGG_THREADS
typedef atomic_int ks_count;
#else
typedef int ks_count;
#endif

#if AGG_THREADS
#define KS_TAKE(p) atomic_fetch_add_explicit((p), 1, memory_order_relaxed)
#define KS_DONE(p) atomic_fetch_add_explicit((p), 1, memory_order_release)
#define KS_SEEN(p) atomic_load_explicit((p), memory_order_acquire)
#else
#define KS_TAKE(p) ((*(p))++)
#define KS_DONE(p) ((*(p))++)
#define KS_SEEN(p) (*(p))
#endif

/* Buckets from the summed histograms, and each chunk's first place in
 * each bucket (chunk j's records of a bucket before chunk j + 1's:
 * stable). */
static void ksplit_plan(ksplit *c)
{
    uint32_t nd = 1u << c->dbits, d, nbk = 0, j;
    uint64_t acc = 0, sum = 0, *start = c->start;
    /* a bucket closes once it holds target records, or before a digit
     * value that would take it past 2 * target (a heavy value is best
     * alone: its keys share the prefix bits above the digit); every early
     * close is followed by a bucket of >= target, so there are at most
     * 2n / target + 1 <= SORT_NBMAX */
    start[0] = 0;
    for (d = 0; d < nd; d++) {
        uint64_t h = 0;
        for (j = 0; j < (uint32_t)c->nch; j++)
            h += c->hist[(size_t)j * nd + d];
        if (acc && acc + h > 2 * c->target) {
            start[++nbk] = sum;
            acc = 0;
        }
        c->tab[d] = (uint16_t)nbk;
        acc += h;
        sum += h;
        if (acc >= c->target) {
            start[++nbk] = sum;
            acc = 0;
        }
    }
    if (acc)
        start[++nbk] = c->n;
    c->nbk = nbk;
    memcpy(c->pos, start, (size_t)nbk * sizeof *start);
    for (j = 1; j < (uint32_t)c->nch; j++) {
        uint64_t *p = c->pos + (size_t)j * SORT_NBMAX;
        const uint32_t *h = c->hist + (size_t)(j - 1) * nd;
        memcpy(p, p - SORT_NBMAX, (size_t)nbk * sizeof *p);
        for (d = 0; d < nd; d++)
            p[c->tab[d]] += h[d];
    }
}

/* Wait until *p reaches v (the other thread is finishing its piece). */
#if AGG_THREADS
#define KS_WAIT(p, v)                                       \
    do {                                                    \
        int spin_ = 0;                                      \
        while (KS_SEEN(p) < (v))                            \
            if (++spin_ > 4000) /* long: give way */        \
                sched_yield();                              \
    } while (0)
#else
#define KS_WAIT(p, v) ((void)0)
#endif

/* The end of a phase whose chunks either thread takes: the caller (t ==
 * 0) waits until all c->nch are `done`, runs `lead` (the one-thread step
 * before the next phase) and then marks `open`; the helper waits for
 * that. */
static void ksplit_phase_end(ksplit *c, int t, ks_count *done, void (*lead)(ksplit *),
                             ks_count *open)
{
    (void)done;
    if (t == 0) {
        KS_WAIT(done, c->nch);
        lead(c);
        KS_DONE(open);
    } else {
        KS_WAIT(open, 1);
    }
}

/* The caller's part between the varying bits and the histograms: the
 * prefix and the first digit's width. */
static void ksplit_prefix(ksplit *c)
{
    uint64_t hor = 0, hand = ~UINT64_C(0), ror = 0, rand_ = ~UINT64_C(0);
    int j;
    for (j = 0; j < c->nch; j++) {
        hor |= c->mask[j][0];
        hand &= c->mask[j][1];
        ror |= c->mask[j][2];
        rand_ &= c->mask[j][3];
    }
    c->s[0]->vhead = hor ^ hand;
    c->s[0]->vrest = ror ^ rand_;
    if (c->s[1]) {
        c->s[1]->vhead = c->s[0]->vhead;
        c->s[1]->vrest = c->s[0]->vrest;
    }
    if (!c->s[0]->vhead && !c->s[0]->vrest) {
        c->equal = 1;
        return;
    }
    c->dbits = 63 - agg_clz64(c->n) - 2;
    if (c->dbits > SORT_DBITS)
        c->dbits = SORT_DBITS;
    c->g.eff = ksort_prefix_setup(&c->g.f, c->s[0]->vhead, c->s[0]->vrest, 64, &c->g.total);
    if (c->dbits > c->g.eff)
        c->dbits = c->g.eff;
    c->sh = c->g.eff - c->dbits;
}

/* Take pieces of work as long as there are any (thread t: 0 the caller,
 * 1 the helper): chunks of the input to find the varying bits of, then
 * (once the caller has made the prefix) chunks to count, then (once it
 * has made the plan) chunks to scatter, then buckets to sort.  Each phase
 * starts when every piece of the one before is done; the caller also
 * waits until every bucket is sorted before it returns. */
static void ksplit_work(ksplit *c, int t)
{
    ksort *s = c->s[t];
    const kprefix *f = &c->g.f;
    agg_key *ka = s->ka, *kb = s->kb;
    double *va = s->va, *vb = s->vb;
    int sh, j;
    unsigned k;
    uint32_t nd;
    while ((j = KS_TAKE(&c->next_mask)) < c->nch) {
        keys_or_and(ka + c->chunk[j], c->chunk[j + 1] - c->chunk[j], c->mask[j]);
        KS_DONE(&c->masks_done);
    }
    ksplit_phase_end(c, t, &c->masks_done, ksplit_prefix, &c->masked);
    if (c->equal)
        return;
    sh = c->sh;
    nd = 1u << c->dbits;
    while ((j = KS_TAKE(&c->next_hist)) < c->nch) {
        uint32_t *h = c->hist + (size_t)j * nd;
        uint64_t i;
        memset(h, 0, (size_t)nd * sizeof *h);
        for (i = c->chunk[j]; i < c->chunk[j + 1]; i++)
            h[ksort_prefix(f, ka[i]) >> sh]++;
        KS_DONE(&c->hists_done);
    }
    ksplit_phase_end(c, t, &c->hists_done, ksplit_plan, &c->planned);
    while ((j = KS_TAKE(&c->next_chunk)) < c->nch) {
        uint64_t *pos = c->pos + (size_t)j * SORT_NBMAX, i;
        if (va) {
            for (i = c->chunk[j]; i < c->chunk[j + 1]; i++) {
                uint64_t at = pos[c->tab[ksort_prefix(f, ka[i]) >> sh]]++;
                kb[at] = ka[i];
                vb[at] = va[i];
            }
        } else {
            for (i = c->chunk[j]; i < c->chunk[j + 1]; i++)
                kb[pos[c->tab[ksort_prefix(f, ka[i]) >> sh]]++] = ka[i];
        }
        KS_DONE(&c->chunks_done);
    }
    KS_WAIT(&c->chunks_done, c->nch);
    while ((k = KS_TAKE(&c->next_bucket)) < c->nbk) {
        if (c->start[k + 1] > c->start[k])
            ksort_bucket(s, &c->g, c->start[k], c->start[k + 1] - c->start[k]);
        KS_DONE(&c->buckets_done);
    }
    if (t == 0)
        KS_WAIT(&c->buckets_done, c->nbk);
}

#if AGG_THREADS
/* The job a helper may take: one split at a time in the process (another
 * caller meanwhile sorts on its own).  Every hand-over goes through the
 * mutex, so that a helper never touches a split whose caller has left. */
static pthread_mutex_t g_ksort_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_ksort_cv = PTHREAD_COND_INITIALIZER;
static ksplit *g_ksort_job;      /* open: waiting for a helper */
static int g_ksort_busy;         /* the slot is in use (job open or taken) */
static int g_ksort_helping;      /* a helper works on the taken job */
static pthread_once_t g_ksort_once = PTHREAD_ONCE_INIT;

/* fork() while a two-thread sort runs in another thread: the child has
 * neither that sort nor its helper, so it starts with a free slot (and the
 * lock is held across the fork, so it is never copied half-taken). */
static void ksort_fork_prepare(void)
{
    pthread_mutex_lock(&g_ksort_mu);
}

static void ksort_fork_parent(void)
{
    pthread_mutex_unlock(&g_ksort_mu);
}

static void ksort_fork_child(void)
{
    g_ksort_job = NULL;
    g_ksort_busy = 0;
    g_ksort_helping = 0;
    pthread_mutex_unlock(&g_ksort_mu);
    pthread_cond_init(&g_ksort_cv, NULL);
}

static void ksort_register_fork(void)
{
    pthread_atfork(ksort_fork_prepare, ksort_fork_parent, ksort_fork_child);
}

static void *ksplit_helper(void *arg)
{
    ksplit *c;
    (void)arg;
    pthread_mutex_lock(&g_ksort_mu);
    while (!g_ksort_job && g_ksort_busy && !g_ksort_helping)
        pthread_cond_wait(&g_ksort_cv, &g_ksort_mu);    /* the plan is being made */
    c = g_ksort_job;                /* NULL: closed (done without us) or taken */
    g_ksort_job = NULL;
    if (c)
        g_ksort_helping = 1;
    pthread_mutex_unlock(&g_ksort_mu);
    if (!c)
        return NULL;
    ksplit_work(c, 1);
    pthread_mutex_lock(&g_ksort_mu);
    g_ksort_helping = 0;
    pthread_cond_broadcast(&g_ksort_cv);
    pthread_mutex_unlock(&g_ksort_mu);
    return NULL;
}
#endif

/* Run the split (s1: a helper's state, or NULL for one thread); mem: the
 * split's memory (KSPLIT_BYTES). */
static void ksort_split(ksort *s0, ksort *s1, uint64_t n, char *mem)
{
    ksplit c;
    uint32_t j;
#if AGG_THREADS
    int helper = 0;
#endif
    memset(&c, 0, sizeof c);
    c.s[0] = s0;
    c.s[1] = s1;
    c.n = n;
    c.target = 2 * n / (SORT_NBMAX - 1) + 1;
    if (c.target < SORT_BUCKET)
        c.target = SORT_BUCKET;
    c.start = (uint64_t *)(void *)mem;
    c.pos = c.start + SORT_NBMAX + 1;
    c.hist = (uint32_t *)(void *)(c.pos + (size_t)KSORT_CHUNKS * SORT_NBMAX);
    c.tab = (uint16_t *)(void *)(c.hist + (size_t)KSORT_CHUNKS * ((size_t)1 << SORT_DBITS));
    c.nch = n >> 14 > KSORT_CHUNKS ? KSORT_CHUNKS : n >> 14 < 4 ? 4 : (int)(n >> 14);
    for (j = 0; j <= (uint32_t)c.nch; j++)
        c.chunk[j] = n / (uint32_t)c.nch * j;
    c.chunk[c.nch] = n;
#if AGG_THREADS
    atomic_init(&c.next_mask, 0);
    atomic_init(&c.masks_done, 0);
    atomic_init(&c.masked, 0);
    atomic_init(&c.next_hist, 0);
    atomic_init(&c.hists_done, 0);
    atomic_init(&c.planned, 0);
    atomic_init(&c.next_chunk, 0);
    atomic_init(&c.chunks_done, 0);
    atomic_init(&c.next_bucket, 0);
    atomic_init(&c.buckets_done, 0);
    if (s1) {                       /* start a helper and open the job to it */
        pthread_t th;
        pthread_attr_t at;
        pthread_once(&g_ksort_once, ksort_register_fork);
        pthread_mutex_lock(&g_ksort_mu);
        if (!g_ksort_busy && pthread_attr_init(&at) == 0) {
            if (pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED) == 0 &&
                pthread_create(&th, &at, ksplit_helper, NULL) == 0) {
                g_ksort_busy = 1;
                g_ksort_job = &c;
                helper = 1;
            }
            pthread_attr_destroy(&at);
        }
        pthread_mutex_unlock(&g_ksort_mu);
    }
#else
    (void)s1;
#endif
    ksplit_work(&c, 0);
#if AGG_THREADS
    if (helper) {                   /* close it; wait for a helper still inside */
        pthread_mutex_lock(&g_ksort_mu);
        if (g_ksort_job == &c)
            g_ksort_job = NULL;
        while (g_ksort_helping)
            pthread_cond_wait(&g_ksort_cv, &g_ksort_mu);
        g_ksort_busy = 0;
        pthread_cond_broadcast(&g_ksort_cv);    /* helpers still waiting: leave */
        pthread_mutex_unlock(&g_ksort_mu);
    }
#endif
}

/* Bytes of the split's memory. */
#define KSPLIT_BYTES \
    ((size_t)(SORT_NBMAX + 1 + KSORT_CHUNKS * SORT_NBMAX) * sizeof(uint64_t) + \
     ((size_t)1 << SORT_DBITS) * (KSORT_CHUNKS * sizeof(uint32_t) + sizeof(uint16_t)))

/* See aggtree.h. */
agg_status agg_keys_sort(agg_key *keys, double *values, uint64_t n)
{
    ksort s[2];
    /* all bits "vary" unless measured below (the split measures its own) */
    uint64_t mk[4] = {0, ~UINT64_C(0), 0, ~UINT64_C(0)}, i, cap;
    size_t rbytes = 0, vbytes = 0, wbytes, pbytes, cbytes = 0, sbytes = 0, per, total;
    int nt = 1, t;
    char *mem, *m;
    if (n <= SORT_SMALL) {
        ksort_small(keys, values, n);
        return AGG_OK;
    }
    /* already in order, or in reverse order: no scratch (random input
     * leaves these loops after a few keys) */
    for (i = 1; i < n && !ksort_lt(keys[i], keys[i - 1]); i++)
        ;
    if (i == n)
        return AGG_OK;
    for (i = 1; i < n && !ksort_lt(keys[i - 1], keys[i]); i++)
        ;
    if (i == n) {                   /* non-increasing: reversed, non-decreasing */
        for (i = 0; i < n / 2; i++) {
            agg_key t = keys[i];
            keys[i] = keys[n - 1 - i];
            keys[n - 1 - i] = t;
            if (values) {
                double x = values[i];
                values[i] = values[n - 1 - i];
                values[n - 1 - i] = x;
            }
        }
        return AGG_OK;
    }
    if (n <= SORT_LOCAL || n > UINT32_MAX) {   /* (the split finds them itself) */
        keys_or_and(keys, n, mk);
        if (!(mk[0] ^ mk[1]) && !(mk[2] ^ mk[3]))
            return AGG_OK;          /* all keys equal */
    }
    /* everything is allocated here, before any key moves (and before the
     * second thread starts) */
    cap = n < SORT_LOCAL ? n : SORT_LOCAL;
    wbytes = (size_t)cap * 3 * sizeof(uint64_t);
    pbytes = (size_t)SORT_PMAXDEPTH * SORT_NCNT * sizeof(uint32_t);
    pbytes = (pbytes + 63) & ~(size_t)63;
    if (n > SORT_LOCAL) {
        rbytes = (size_t)n * sizeof(agg_key);
        vbytes = values ? (size_t)n * sizeof(double) : 0;
        cbytes = (size_t)SORT_MAXDEPTH * SORT_NCNT * sizeof(uint64_t);
        sbytes = KSPLIT_BYTES;
        if (n >= SORT_THREADS_MIN && n <= UINT32_MAX && threads_allowed())
            nt = 2;
    }
    per = wbytes + pbytes + cbytes;
    total = rbytes + vbytes + (size_t)nt * per + sbytes;
    mem = (char *)raw_alloc(total);
    if (!mem)
        return AGG_NOMEM;
    for (t = 0; t < nt; t++) {
        m = mem + rbytes + vbytes + (size_t)t * per;
        s[t].ka = keys;
        s[t].va = values;
        s[t].kb = rbytes ? (agg_key *)(void *)mem : NULL;
        s[t].vb = vbytes ? (double *)(void *)(mem + rbytes) : NULL;
        s[t].vhead = mk[0] ^ mk[1];
        s[t].vrest = mk[2] ^ mk[3];
        s[t].pcnt = (uint32_t *)(void *)m;
        s[t].cnt = cbytes ? (uint64_t *)(void *)(m + pbytes) : NULL;
        s[t].w = (uint64_t *)(void *)(m + pbytes + cbytes);
    }
    if (n <= SORT_LOCAL)
        ksort_local(&s[0], keys, values, keys, values, n, mk);   /* masks measured above */
    else if (n > UINT32_MAX)        /* the split's counters are 32-bit */
        ksort_msd(&s[0], 0, n, 127, 0, 0);
    else
        ksort_split(&s[0], nt > 1 ? &s[1] : NULL, n, mem + rbytes + vbytes + (size_t)nt * per);
    free(mem);
    return AGG_OK;
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

/* ====================================================================== */
/*  Checker                                                               */
/* ====================================================================== */

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

/* a = 0. */
static void xacc_zero(xacc *a)
{
    memset(a, 0, sizeof *a);
    a->lo = XACC_DIGITS;
    a->hi = -1;
}

/* Carry so that |digit| < 2^32 everywhere; shrink [lo, hi]. */
static void xacc_norm(xacc *a)
{
    int i;
    a->adds = 0;
    if (a->lo > a->hi)
        return;
    for (i = a->lo; i < XACC_DIGITS - 1; i++) {
        int64_t carry = a->d[i] / ((int64_t)1 << 32);   /* truncates */
        a->d[i] -= carry * ((int64_t)1 << 32);
        a->d[i + 1] += carry;
        if (carry && i + 1 > a->hi)
            a->hi = i + 1;
        if (i >= a->hi)
            break;
    }
    while (a->lo <= a->hi && a->d[a->lo] == 0)
        a->lo++;
    while (a->hi >= a->lo && a->d[a->hi] == 0)
        a->hi--;
    if (a->lo > a->hi) {
        a->lo = XACC_DIGITS;
        a->hi = -1;
    }
}

/* a += x, exactly. */
static void xacc_add(xacc *a, double x)
{
    uint64_t bits, m, lo, hi;
    uint32_t e, pos, limb, sh;
    int64_t s;
    if (!(x - x == 0.0)) {
        a->nonfinite = 1;
        return;
    }
    memcpy(&bits, &x, sizeof bits);
    s = (bits >> 63) ? -1 : 1;
    e = (uint32_t)((bits >> 52) & 0x7ff);
    m = bits & ((UINT64_C(1) << 52) - 1);
    if (e) {
        m |= UINT64_C(1) << 52;
        pos = e - 1;
    } else {
        pos = 0;
    }
    if (m == 0)
        return;
    limb = pos / 32;
    sh = pos % 32;
    lo = (m & 0xffffffffu) << sh;
    hi = (m >> 32) << sh;
    a->d[limb] += s * (int64_t)(lo & 0xffffffffu);
    a->d[limb + 1] += s * (int64_t)((lo >> 32) + (hi & 0xffffffffu));
    a->d[limb + 2] += s * (int64_t)(hi >> 32);
    if ((int)limb < a->lo)
        a->lo = (int)limb;
    if ((int)limb + 2 > a->hi)
        a->hi = (int)limb + 2;
    if (++a->adds >= (1u << 28))
        xacc_norm(a);
}

/* a += b. */
static void xacc_merge(xacc *a, xacc *b)
{
    int i;
    xacc_norm(b);
    a->nonfinite |= b->nonfinite;
    if (b->lo > b->hi)
        return;
    xacc_norm(a);
    for (i = b->lo; i <= b->hi; i++)
        a->d[i] += b->d[i];
    if (b->lo < a->lo)
        a->lo = b->lo;
    if (b->hi > a->hi)
        a->hi = b->hi;
    xacc_norm(a);
}

/* 1 iff the accumulated value is exactly 0. */
static int xacc_is_zero(xacc *a)
{
    xacc_norm(a);
    return a->lo > a->hi;
}

/* State of one agg_tree_check walk. */
typedef struct chk {
    const agg_tree *t;           /* the tree */
    char *msg;                   /* where the failure message goes */
    size_t msg_len;              /* its capacity */
    node *prev_leaf;             /* last leaf visited, in key order */
    agg_key last_key;            /* last item key visited */
    int have_last;               /* last_key is set */
    uint64_t level_pos[MAX_DEPTH]; /* nodes visited so far per level */
    uint64_t items;              /* items seen */
    size_t bytes;                /* node bytes seen */
    size_t tail_bytes;           /* bytes of the distinct tails (second pass) */
} chk;

/* Record the failure (printf-style) and return 0. */
static int chk_fail(chk *c, const char *fmt, ...)
{
    va_list ap;
    if (c->msg && c->msg_len) {
        va_start(ap, fmt);
        vsnprintf(c->msg, c->msg_len, fmt, ap);
        va_end(ap);
    }
    return 0;
}

/* Verify the subtree n at `level` (0 = root), I1..I8 locally; on success
 * return 1 and its item count, exact value sum, and min / max keys. */
static int chk_node(chk *c, node *n, uint32_t level, int rightmost,
                    uint64_t *count, xacc *sum, agg_key *kmin, agg_key *kmax)
{
    const agg_tree *t = c->t;
    uint64_t at = c->level_pos[level]++;
    uint32_t lowfill, i;
    int is_root = level == 0;
    if (level >= t->depth)
        return chk_fail(c, "level %u node %llu: below the leaf level (depth %u)",
                        level, (unsigned long long)at, t->depth);
    if (!!n->leaf != (level == t->depth - 1))
        return chk_fail(c, "level %u node %llu: %s at the wrong level (depth %u)",
                        level, (unsigned long long)at, n->leaf ? "leaf" : "internal node",
                        t->depth);
    if (n->leaf)
        lowfill = (is_root || rightmost) ? 1 : t->min;
    else
        lowfill = (is_root || rightmost) ? 2 : t->min;
    if (n->count > t->cap || n->count < lowfill)
        return chk_fail(c, "level %u node %llu: %s holds %u, allowed %u..%u%s",
                        level, (unsigned long long)at, n->leaf ? "leaf" : "internal node",
                        n->count, lowfill, t->cap,
                        is_root ? " (root)" : rightmost ? " (rightmost)" : "");

    if (n->leaf) {
        agg_key *keys = node_keys(n);
        const double *vals = leaf_vals(t, n);
        c->bytes += t->leaf_bytes;
        if (n->prev != c->prev_leaf)
            return chk_fail(c, "level %u leaf %llu: prev pointer does not point to the previous leaf",
                            level, (unsigned long long)at);
        if (c->prev_leaf && c->prev_leaf->next != n)
            return chk_fail(c, "level %u leaf %llu: the previous leaf's next does not point here",
                            level, (unsigned long long)at);
        if (!c->prev_leaf && n->prev)
            return chk_fail(c, "level %u leaf %llu: first leaf has a prev",
                            level, (unsigned long long)at);
        c->prev_leaf = n;
        xacc_zero(sum);
        for (i = 0; i < n->count; i++) {
            if (c->have_last && key_cmp(t, c->last_key, keys[i]) >= 0)
                return chk_fail(c, "level %u leaf %llu item %u: key not greater than the previous item's",
                                level, (unsigned long long)at, i);
            if (t->mode == AGG_KEYS_GENERAL && keys[i].rest) {
                const agg_tail *tl = key_tail(keys[i]);
                if (TAIL_LEN(tl) == 0 || tl->refs == 0 ||
                    (tl->len >> AGG_TAIL_META_SHIFT) > TAIL_LEN(tl))
                    return chk_fail(c, "level %u leaf %llu item %u: stored tail has len %u refs %u",
                                    level, (unsigned long long)at, i, tl->len, tl->refs);
            }
            c->last_key = keys[i];
            c->have_last = 1;
            xacc_add(sum, vals[i]);
        }
        *count = n->count;
        *kmin = keys[0];
        *kmax = keys[n->count - 1];
        return 1;
    } else {
        agg_key *sep = node_keys(n);
        node **ch = inner_child(t, n);
        const uint64_t *cn = inner_cnt(t, n);
        const double *hi = inner_hi(t, n), *lo = inner_lo(t, n);
        const uint8_t *ex = inner_ex(t, n);
        uint64_t total = 0;
        xacc sub;
        c->bytes += t->inner_bytes;
        if (n->prev || n->next)
            return chk_fail(c, "level %u node %llu: internal node has leaf-chain pointers",
                            level, (unsigned long long)at);
        if (sep[0].head || sep[0].rest)
            return chk_fail(c, "level %u node %llu: sep[0] is not zero",
                            level, (unsigned long long)at);
        xacc_zero(sum);
        for (i = 0; i < n->count; i++) {
            uint64_t cc;
            agg_key cmin, cmax, prev_max = {0, 0};
            uint64_t ccnt;
            double h, l;
            int e;
            if (i > 0) {
                prev_max = *kmax;
                if (t->mode == AGG_KEYS_GENERAL && sep[i].rest &&
                    (TAIL_LEN(key_tail(sep[i])) == 0 || key_tail(sep[i])->refs == 0))
                    return chk_fail(c, "level %u node %llu sep %u: tail has len 0 or refs 0",
                                    level, (unsigned long long)at, i);
            }
            if (!ch[i])
                return chk_fail(c, "level %u node %llu: child %u is NULL",
                                level, (unsigned long long)at, i);
            if (!chk_node(c, ch[i], level + 1, rightmost && i + 1 == n->count,
                          &cc, &sub, &cmin, &cmax))
                return 0;
            if (i > 0) {
                if (!(key_cmp(t, prev_max, sep[i]) < 0))
                    return chk_fail(c, "level %u node %llu sep %u: not greater than the max key of child %u",
                                    level, (unsigned long long)at, i, i - 1);
                if (!(key_cmp(t, sep[i], cmin) <= 0))
                    return chk_fail(c, "level %u node %llu sep %u: greater than the min key of child %u",
                                    level, (unsigned long long)at, i, i);
            } else {
                *kmin = cmin;
            }
            *kmax = cmax;
            if (cn[i] != cc)
                return chk_fail(c, "level %u node %llu entry %u: cnt %llu but the child holds %llu items",
                                level, (unsigned long long)at, i,
                                (unsigned long long)cn[i], (unsigned long long)cc);
            total += cc;
            if (ex[i] > 1)
                return chk_fail(c, "level %u node %llu entry %u: exact flag is %u",
                                level, (unsigned long long)at, i, ex[i]);
            if (ex[i]) {
                xacc diff = sub;
                double s2, e2;
                if (sub.nonfinite || !(hi[i] - hi[i] == 0.0) || !(lo[i] - lo[i] == 0.0))
                    return chk_fail(c, "level %u node %llu entry %u: flagged exact but not finite",
                                    level, (unsigned long long)at, i);
                two_sum(hi[i], lo[i], &s2, &e2);
                if (s2 != hi[i] || e2 != lo[i])
                    return chk_fail(c, "level %u node %llu entry %u: exact sum (%.17g, %.17g) not canonical",
                                    level, (unsigned long long)at, i, hi[i], lo[i]);
                xacc_add(&diff, -hi[i]);
                xacc_add(&diff, -lo[i]);
                if (!xacc_is_zero(&diff))
                    return chk_fail(c, "level %u node %llu entry %u: flagged exact but %.17g + %.17g is not the sum of the child's values",
                                    level, (unsigned long long)at, i, hi[i], lo[i]);
            } else {
                e = node_summary(t, ch[i], &ccnt, &h, &l);
                if (e || memcmp(&h, &hi[i], sizeof h) != 0 || memcmp(&l, &lo[i], sizeof l) != 0)
                    return chk_fail(c, "level %u node %llu entry %u: inexact sum (%.17g, %.17g) but the child sums to (%.17g, %.17g)%s",
                                    level, (unsigned long long)at, i, hi[i], lo[i], h, l,
                                    e ? " exactly" : "");
            }
            xacc_merge(sum, &sub);
        }
        *count = total;
        return 1;
    }
}

/* Count the references to the tail of stored key k: walk k's search path
 * (by I2 every separator equal to k lies on it, at most one per node, as
 * sep[i] of the child taken) and count separators and the item whose rest
 * is that very tail.  *item: the item holds it; *first: the shallowest
 * node whose separator holds it (NULL if none). */
static uint64_t chk_tail_refs(const agg_tree *t, agg_key k, int *item, node **first)
{
    node *n = t->root;
    uint64_t refs = 0;
    uint32_t pos;
    *item = 0;
    *first = NULL;
    while (!n->leaf) {
        uint32_t i = inner_find(t, n, k);
        if (i > 0 && node_keys(n)[i].rest == k.rest) {
            refs++;
            if (!*first)
                *first = n;
        }
        n = inner_child(t, n)[i];
    }
    pos = leaf_count_lt(t, n, k);
    if (pos < n->count && node_keys(n)[pos].rest == k.rest) {
        refs++;
        *item = 1;
    }
    return refs;
}

/* Second pass (GENERAL, after the structure passed): every tail's refs
 * equals its references (I8); add each distinct tail's bytes once, at its
 * item if it has one, else at its shallowest separator.  No allocation. */
static int chk_tails(chk *c, node *n, uint32_t level)
{
    const agg_tree *t = c->t;
    agg_key *keys = node_keys(n);
    uint32_t i;
    for (i = n->leaf ? 0 : 1; i < n->count; i++) {
        agg_tail *tl;
        node *first;
        int item;
        uint64_t refs;
        if (!keys[i].rest)
            continue;
        tl = key_tail(keys[i]);
        refs = chk_tail_refs(t, keys[i], &item, &first);
        if (refs != tl->refs)
            return chk_fail(c, "level %u %s %u: tail (len %u) has refs %u but %llu references",
                            level, n->leaf ? "leaf item" : "separator", i, tl->len, tl->refs,
                            (unsigned long long)refs);
        if (n->leaf || (!item && first == n))
            c->tail_bytes += tail_bytes(TAIL_LEN(tl));
    }
    if (!n->leaf)
        for (i = 0; i < n->count; i++)
            if (!chk_tails(c, inner_child(t, n)[i], level + 1))
                return 0;
    return 1;
}

/* See aggtree.h and section 11.  AGG_OK or AGG_CORRUPT (also for a NULL
 * tree); never allocates. */
agg_status agg_tree_check(const agg_tree *t, char *msg, size_t msg_len)
{
    chk c;
    uint64_t count = 0;
    xacc sum;
    agg_key kmin, kmax;
    int ok = 1;
    memset(&c, 0, sizeof c);
    c.msg = msg;
    c.msg_len = msg_len;
    if (msg && msg_len)
        msg[0] = 0;
    if (!t) {
        chk_fail(&c, "NULL tree");
        return AGG_CORRUPT;
    }
    c.t = t;
    c.msg = msg;
    c.msg_len = msg_len;
    if (!t->root) {
        if (t->depth != 0 || t->len != 0 || t->nbytes != 0) {
            chk_fail(&c, "empty tree with depth %u, len %llu, nbytes %zu",
                     t->depth, (unsigned long long)t->len, t->nbytes);
            return AGG_CORRUPT;
        }
        return AGG_OK;
    }
    if (t->depth == 0 || t->depth > MAX_DEPTH) {
        chk_fail(&c, "depth %u with a root", t->depth);
        return AGG_CORRUPT;
    }
    ok = chk_node(&c, t->root, 0, 1, &count, &sum, &kmin, &kmax);
    if (ok && c.prev_leaf && c.prev_leaf->next) {
        chk_fail(&c, "last leaf has a next pointer");
        ok = 0;
    }
    if (ok && count != t->len) {
        chk_fail(&c, "tree holds %llu items, len says %llu",
                 (unsigned long long)count, (unsigned long long)t->len);
        ok = 0;
    }
    if (ok && t->mode == AGG_KEYS_GENERAL)
        ok = chk_tails(&c, t->root, 0);
    if (ok && c.bytes + c.tail_bytes != t->nbytes) {
        chk_fail(&c, "nbytes is %zu, the structure holds %zu (nodes %zu + tails %zu)",
                 t->nbytes, c.bytes + c.tail_bytes, c.bytes, c.tail_bytes);
        ok = 0;
    }
    return ok ? AGG_OK : AGG_CORRUPT;
}

/* ====================================================================== */
/*  Shape hash (test hook)                                                */
/* ====================================================================== */

/* FNV-1a over n bytes, continuing from h. */
static uint64_t hash_bytes(uint64_t h, const void *p, size_t n)
{
    const uint8_t *s = (const uint8_t *)p;
    while (n--)
        h = (h ^ *s++) * 0x100000001b3ull;
    return h;
}

/* A key's bits: FAST keys as they are, GENERAL ones as head and tail. */
static uint64_t hash_key(const agg_tree *t, uint64_t h, agg_key k)
{
    h = hash_bytes(h, &k.head, sizeof k.head);
    if (t->mode == AGG_KEYS_FAST)
        return hash_bytes(h, &k.rest, sizeof k.rest);
    if (k.rest) {
        const agg_tail *tl = key_tail(k);
        h = hash_bytes(h, &tl->len, sizeof tl->len);
        h = hash_bytes(h, tl->bytes, TAIL_LEN(tl));
    }
    return h;
}

static uint64_t hash_node(const agg_tree *t, uint64_t h, node *n)
{
    uint32_t i;
    h = hash_bytes(h, &n->count, sizeof n->count);
    if (n->leaf) {
        for (i = 0; i < n->count; i++) {
            h = hash_key(t, h, node_keys(n)[i]);
            h = hash_bytes(h, &leaf_vals(t, n)[i], sizeof(double));
        }
        return h;
    }
    for (i = 0; i < n->count; i++) {
        if (i > 0)
            h = hash_key(t, h, node_keys(n)[i]);
        h = hash_bytes(h, &inner_cnt(t, n)[i], sizeof(uint64_t));
        h = hash_bytes(h, &inner_hi(t, n)[i], sizeof(double));
        h = hash_bytes(h, &inner_lo(t, n)[i], sizeof(double));
        h = hash_bytes(h, &inner_ex(t, n)[i], 1);
        h = hash_node(t, h, inner_child(t, n)[i]);
    }
    return h;
}

/* See aggtree.h. */
uint64_t agg_debug_shape_hash(const agg_tree *t)
{
    uint64_t h = 0xcbf29ce484222325ull;
    h = hash_bytes(h, &t->depth, sizeof t->depth);
    return t->root ? hash_node(t, h, t->root) : h;
}
