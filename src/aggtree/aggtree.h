/*
 * aggtree.h - public C API of the aggtree core: a counted B+tree of items
 * (key, value) kept in key order, answering count, sum, rank and select in
 * O(log n).  Plain C99, no Python.h: the Cython layer (_core.pyx) encodes
 * Python keys into the fixed 16-byte `agg_key` below before calling in, so
 * every comparison here is a couple of integer compares (plus a memcmp for
 * general keys whose 8-byte heads tie) and can never fail or call back.
 *
 * One tree = one namespace.  The Python layer keeps a dict namespace -> tree.
 *
 * KEYS
 * ----
 * An item's key is the *pair* (sort key, id) of the Python API, already
 * encoded; it is unique in a tree.  Two key modes exist, fixed per tree at
 * creation (the Python layer converts a tree from FAST to GENERAL by reading
 * it out and bulk-building a new one when an item arrives that FAST cannot
 * hold):
 *
 *   AGG_KEYS_FAST     head = order-preserving bits of a double sort key
 *                     rest = order-preserving bits of an int64 id
 *                     (x ^ 0x8000000000000000); compare (head, rest) as two
 *                     unsigned 64-bit integers.
 *
 *   AGG_KEYS_GENERAL  the key is a byte string E (memcmp order) defined by
 *                     keycodec.pxi.  head = first 8 bytes of E, big-endian,
 *                     zero-padded when E is shorter; rest = (uintptr_t) a
 *                     pointer to an agg_tail holding E[8:], or 0 when
 *                     len(E) <= 8.  Compare heads as unsigned integers; on a
 *                     tie compare the tails bytewise (memcmp over the common
 *                     length, then the shorter tail first; a missing tail is
 *                     the empty tail).  The codec guarantees that this equals
 *                     memcmp order on the E's that are ever compared (no tag
 *                     byte is 0x00, so zero padding never ties two distinct
 *                     strings).
 *
 * Tails in the tree are reference counted: an item owns one reference and
 * every internal-node separator that copies the key owns one more.  So
 * separators never allocate, and a delete never allocates.  Tails passed IN
 * by the caller (search keys, keys to insert) are only borrowed: the tree
 * makes its own copy when it stores a new item, and the caller keeps
 * ownership of what it passed (a caller-built tail may have refs == 0).
 *
 * POSITIONS
 * ---------
 * Items are numbered 0..n-1 in key order.  A search key plus a side names a
 * gap between items: agg_tree_rank(t, k, 0) is the number of items < k
 * (the gap before k), agg_tree_rank(t, k, 1) the number of items <= k (the
 * gap after k).  The Python layer maps every bound form (inclusive,
 * exclusive, with or without id, eq, prefix) onto such gaps, so a range is a
 * half-open index interval [lo, hi) and every read is a walk by index.
 *
 * STATUS
 * ------
 * Every function that can fail returns agg_status; on any status other than
 * AGG_OK the tree is exactly as it was before the call (all allocation is
 * done before the first mutation).  "Not found" is AGG_MISSING, never folded
 * into an error.
 *
 * THREADS
 * -------
 * No internal locking.  Any number of concurrent readers are safe; a writer
 * needs exclusive access (the Python layer provides it).  The allocation
 * failure injector is global and meant for single-threaded tests.
 */
#ifndef AGGTREE_H
#define AGGTREE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum agg_status {
    AGG_OK = 0,
    AGG_NOMEM = 1,      /* an allocation failed; nothing changed */
    AGG_DUPLICATE = 2,  /* insert: the key is already present */
    AGG_MISSING = 3,    /* delete / get: the key is absent */
    AGG_RANGE = 4,      /* select / read: index out of range */
    AGG_INVALID = 5,    /* bad argument: node size, unsorted bulk input */
    AGG_CORRUPT = 6     /* agg_tree_check found a broken invariant */
} agg_status;

typedef enum agg_keymode {
    AGG_KEYS_FAST = 0,
    AGG_KEYS_GENERAL = 1
} agg_keymode;

/* Out-of-line part of a GENERAL key: bytes E[8:] of the encoding.  `len`
 * packs the number of bytes stored (low 24 bits, so a tail holds less than
 * 16 MiB) and, above AGG_TAIL_META_SHIFT, how many of the LAST stored bytes
 * are metadata that comparisons ignore (the codec's type signature: items
 * that differ only there are the same item). */
typedef struct agg_tail {
    uint32_t refs;      /* references held by the tree (0 for caller-owned) */
    uint32_t len;       /* stored bytes | (metadata bytes << 24) */
    uint8_t bytes[];    /* E[8:] */
} agg_tail;

#define AGG_TAIL_META_SHIFT 24
#define AGG_TAIL_LEN_MASK 0x00FFFFFFu
#define AGG_TAIL_MAX_LEN 0x00FFFFFFu

/* An encoded item key; see KEYS above. 16 bytes, passed by value. */
typedef struct agg_key {
    uint64_t head;      /* FAST: sortable double; GENERAL: E[0:8] big-endian */
    uint64_t rest;      /* FAST: sortable int64 id; GENERAL: agg_tail* or 0 */
} agg_key;

typedef struct agg_tree agg_tree;

/* Smallest and largest node_size accepted (entries per node, both kinds). */
#define AGG_NODE_SIZE_MIN 4
#define AGG_NODE_SIZE_MAX 4096

/* ---------------------------------------------------------------- keys -- */

/* Order-preserving 64-bit image of a double (caller rejects NaN and maps
 * -0.0 to 0.0 first) and of an int64; and their inverses. */
uint64_t agg_f64_to_key(double x);
double agg_key_to_f64(uint64_t k);
uint64_t agg_i64_to_key(int64_t x);
int64_t agg_key_to_i64(uint64_t k);

/* out[i] = the FAST key (agg_f64_to_key(keys[i] + 0.0), agg_i64_to_key(ids[i]))
 * for i < n: the whole array in one call (the caller rejects NaN first). */
void agg_fast_keys(const double *keys, const int64_t *ids, agg_key *out, uint64_t n);

/* Ask for transparent huge pages for the whole 2 MiB pages inside the
 * fresh, not yet written buffer p[0:n) (a large output or scratch array of
 * the caller's: dumps' bytes, the Python layer's key arrays): writing it
 * then costs a page fault per 2 MiB instead of per 4 KiB, most of the cost
 * of writing new memory (core/alloc.c, section 10).  A hint, as the core's
 * own node chunks take it: nothing changes where the kernel says no, and
 * nothing happens in builds without AGGTREE_HUGEPAGES or off Linux. */
void agg_advise_huge_pages(void *p, size_t n);

/* Three-way compare of two keys under `mode`: <0, 0, >0. */
int agg_key_cmp(agg_keymode mode, agg_key a, agg_key b);

/* Build a GENERAL key from a full encoding E of `len` bytes.  When len > 8
 * the tail is written into `tail_buf`, which must hold
 * sizeof(agg_tail) + len - 8 bytes (the key borrows it; refs is set to 0).
 * Never allocates. */
agg_key agg_key_from_bytes(const uint8_t *e, size_t len, agg_tail *tail_buf);

/* agg_key_from_bytes, where the last `meta` bytes of E (at most 255, and
 * all inside the tail: len - meta >= 8) are metadata that comparisons
 * ignore.  len - 8 must be <= AGG_TAIL_MAX_LEN. */
agg_key agg_key_from_item_bytes(const uint8_t *e, size_t len, size_t meta,
                                agg_tail *tail_buf);

/* Write the bytes of a GENERAL key into `out` (capacity `cap`): the 8 head
 * bytes (big-endian, so an encoding shorter than 8 comes back zero-padded)
 * followed by the tail.  Returns 8 + tail length, which may exceed cap: then
 * only cap bytes are written.  The codec's encodings are self-delimiting, so
 * the decoder never needs to know where the padding starts. */
size_t agg_key_to_bytes(agg_key k, uint8_t *out, size_t cap);

/* ---------------------------------------------------------- life cycle -- */

/* Create an empty tree.  AGG_INVALID if node_size is outside
 * [AGG_NODE_SIZE_MIN, AGG_NODE_SIZE_MAX]; AGG_NOMEM. */
agg_status agg_tree_new(agg_tree **out, uint32_t node_size, agg_keymode mode);

/* Free the tree, its nodes and its tails.  NULL is allowed. */
void agg_tree_free(agg_tree *t);

uint64_t agg_tree_len(const agg_tree *t);
agg_keymode agg_tree_mode(const agg_tree *t);
uint32_t agg_tree_node_size(const agg_tree *t);
uint32_t agg_tree_depth(const agg_tree *t);   /* 0 when empty, 1 = root is a leaf */

/* Bytes allocated by the tree: live nodes and tails (not the agg_tree
 * header).  O(1): maintained as a counter.  Nodes come from pools the tree
 * owns (core/alloc.c, section 10): the nodes it has freed stay with it for
 * reuse, not counted here, until agg_tree_clear or agg_tree_free. */
size_t agg_tree_nbytes(const agg_tree *t);

/* -------------------------------------------------------------- writes -- */

/* Insert `key` with `value`.  If the key exists: with overwrite == 0 return
 * AGG_DUPLICATE (nothing changes); with overwrite != 0 set its value.
 * *existed (may be NULL) tells which happened; *old_value (may be NULL)
 * receives the previous value when it existed.  O(B log n). */
agg_status agg_tree_insert(agg_tree *t, agg_key key, double value,
                           int overwrite, int *existed, double *old_value);

/* Delete `key`.  AGG_MISSING if absent.  *old_value (may be NULL) receives
 * its value.  Never allocates, so never AGG_NOMEM. */
agg_status agg_tree_delete(agg_tree *t, agg_key key, double *old_value);

/* Delete n items whose keys are strictly increasing, all or nothing: the
 * batch form of agg_tree_delete for the vectorised API.  Checked before
 * anything changes: AGG_INVALID if keys[i] <= keys[i - 1] (equal
 * neighbours included; *bad_index = the first such i), AGG_MISSING if a
 * key is absent (*bad_index = the smallest such i); the tree is then
 * untouched.  *bad_index (may be NULL) is written only with those two.
 * Never returns AGG_NOMEM: its only allocation is an optional temporary
 * array (n pointers, used to prefetch) without which it runs slower.
 * Removes the keys of each leaf in one pass and updates each touched
 * parent entry once per leaf (a leaf that falls below the minimum fill is
 * then merged with or evened out against a sibling, as a single delete
 * does).  The check runs on two threads for large batches, as
 * agg_tree_insert_sorted's does.  O(n + touched leaves * node_size)
 * (section 13, core/batch_insert.c). */
agg_status agg_tree_delete_sorted(agg_tree *t, const agg_key *keys, uint64_t n,
                                  uint64_t *bad_index);

/* Remove every item (the tree stays usable, empty) and give all its
 * memory back, pools included. */
void agg_tree_clear(agg_tree *t);

/* Bulk-build into an EMPTY tree from n keys in strictly increasing order
 * with their values (NULL values = all 0.0).  Leaves hold node_size -
 * node_size / 8 items (room for a first batch of writes, section 9),
 * internal nodes node_size children; the last node of a
 * level of several taking the rest, never fewer than 2 (then the one
 * before it holds one less).  Tails are copied.  AGG_INVALID if the tree is
 * not empty; AGG_DUPLICATE if two neighbours are equal (and *bad_index, if
 * not NULL, is the index of the second), AGG_INVALID if out of order (same
 * *bad_index); AGG_NOMEM (an order error is reported first, whichever
 * was met first).  On failure the tree stays empty.  O(n); a large FAST
 * build fills its leaves on two threads (section 9, core/build.c;
 * AGGTREE_THREADS=1 in the environment prevents it). */
agg_status agg_tree_build(agg_tree *t, const agg_key *keys,
                          const double *values, uint64_t n,
                          uint64_t *bad_index);

/* The staged form of agg_tree_build for FAST trees (section 9): the caller
 * writes the items into the leaves itself, range of leaves by range of
 * leaves, so that a reader can fill them without an intermediate array.
 *
 *   agg_build_begin(t, n, &b)   plans a build of n >= 1 items into the empty
 *       FAST tree t and allocates every node (AGG_INVALID: t not empty,
 *       not FAST, or n == 0; AGG_NOMEM).  t stays empty until finish.
 *   agg_build_leaves(b)         how many leaves; agg_build_leaf_start(b, l)
 *       the index of leaf l's first item (l >= leaves: n).
 *   agg_build_put_keys(b, l0, l1, keys)   keys[] are the items of leaves
 *       [l0, l1): keys of items leaf_start(l0) .. leaf_start(l1) - 1.
 *       Returns UINT64_MAX, or the index of the first item not greater than
 *       the one before it within the range (the build must then be
 *       aborted).
 *   agg_build_put_values(b, l0, l1, values)  the same for their values
 *       (NULL: all 0.0).  Values are not checked (NaN and infinities are
 *       the caller's business, as for agg_tree_build).
 *   agg_build_finish(b, &bad)   AGG_OK: t holds the n items, shaped as
 *       agg_tree_build shapes them.  AGG_INVALID: a leaf was not filled
 *       (*bad untouched) or two items across the edge of two put ranges
 *       are out of order (*bad = the index of the second); t stays empty.
 *       Frees b either way.
 *   agg_build_abort(b)          frees b and every node; t stays empty.
 *
 * Puts of disjoint leaf ranges may run concurrently on different threads;
 * begin, finish and abort may not overlap any other call on b. */
typedef struct agg_build agg_build;
agg_status agg_build_begin(agg_tree *t, uint64_t n, agg_build **out);
uint64_t agg_build_leaves(const agg_build *b);
uint64_t agg_build_leaf_start(const agg_build *b, uint64_t leaf);
uint64_t agg_build_put_keys(agg_build *b, uint64_t l0, uint64_t l1, const agg_key *keys);
void agg_build_put_values(agg_build *b, uint64_t l0, uint64_t l1, const double *values);
agg_status agg_build_finish(agg_build *b, uint64_t *bad_index);
void agg_build_abort(agg_build *b);

/* Insert n new items whose keys are strictly increasing, all or nothing:
 * the batch form of agg_tree_insert (overwrite == 0) for the vectorised
 * API.  Checked before anything changes, in this order:
 *   AGG_INVALID    keys[i] <= keys[i - 1] for some i (equal neighbours
 *                  included; the caller tells the two apart by comparing
 *                  keys[i - 1] and keys[i]); *bad_index = the first such i;
 *   AGG_DUPLICATE  keys[i] is already in the tree; *bad_index = the
 *                  smallest such i;
 *   AGG_NOMEM      an allocation failed (possibly before the duplicate
 *                  check finished).
 * On any of them the tree is exactly as before (same items, nbytes,
 * depth, and the same nodes: AGG_TEST_SHAPE_HASH in aggtree_test.h); *bad_index (may be NULL) is written only with INVALID and
 * DUPLICATE.  values NULL = all 0.0.  GENERAL tails are copied, as by
 * insert.  Into an empty tree this is agg_tree_build.  Walks the touched
 * leaves once in key order, merging each leaf's new items in one pass:
 * O(n + touched leaves * node_size) plus O(log) per touched parent
 * (section 13, core/batch_insert.c). */
agg_status agg_tree_insert_sorted(agg_tree *t, const agg_key *keys,
                                  const double *values, uint64_t n,
                                  uint64_t *bad_index);

/* Sort n (key, value) pairs in place by FAST key order: head, then rest,
 * as unsigned 64-bit integers (values may be NULL: keys only).  Meant for
 * FAST keys: GENERAL keys (rest is a pointer) come out in no useful
 * order.  Pairs with equal keys end up adjacent, in no defined order.
 * An MSD radix sort over the bits that differ between keys (skipping bit
 * ranges all keys share), with about n * 24 bytes of scratch (up to
 * 384 KB more for small inputs without values) plus fixed tables of
 * about 0.4 MB and 2 MB per thread; large inputs may use a second
 * thread (core/sort.c, section 14; AGGTREE_THREADS=1 in the environment
 * prevents it).  AGG_NOMEM if the allocation fails (keys and values are
 * then untouched).  Never touches a tree. */
agg_status agg_keys_sort(agg_key *keys, double *values, uint64_t n);

/* agg_keys_sort then agg_tree_build, for bulk loads from unsorted arrays:
 * keys[] and values[] (may be NULL) are left sorted, so *bad_index (the
 * second of two equal keys, with AGG_DUPLICATE) indexes the sorted
 * arrays.  FAST trees only: AGG_INVALID for a GENERAL tree or a non-empty
 * one (arrays untouched).  AGG_NOMEM from the sort or the build; on any
 * failure the tree stays empty. */
agg_status agg_tree_build_unsorted(agg_tree *t, agg_key *keys, double *values,
                                   uint64_t n, uint64_t *bad_index);

/* --------------------------------------------------------------- reads -- */

/* 1 and *value (may be NULL) if the key is present, else 0.  O(log n). */
int agg_tree_get(const agg_tree *t, agg_key key, double *value);

/* Number of items < key (after == 0) or <= key (after != 0). O(log n). */
uint64_t agg_tree_rank(const agg_tree *t, agg_key key, int after);

/* Both agg_tree_rank(t, k1, after1) and agg_tree_rank(t, k2, after2) in one
 * call, walking the two paths in lockstep so their cache misses overlap (the
 * two ends of a range).  O(log n). */
void agg_tree_rank2(const agg_tree *t, agg_key k1, int after1, agg_key k2,
                    int after2, uint64_t *r1, uint64_t *r2);

/* Item at `index` (0-based).  The returned key's tail is borrowed from the
 * tree and valid until the next write.  AGG_RANGE if index >= len. */
agg_status agg_tree_select(const agg_tree *t, uint64_t index,
                           agg_key *key, double *value);

/* Sum of the values of items lo..hi-1 (empty or inverted range: 0.0).
 * Walks the two boundary paths and adds whole-subtree sums in between,
 * accumulating in double-double, then rounds once.  O(B log n). */
double agg_tree_sum(const agg_tree *t, uint64_t lo, uint64_t hi);

/* Copy up to `max` items starting at `index` into keys[] / values[] (either
 * may be NULL): ascending (index, index+1, ...) or, with descending != 0,
 * (index, index-1, ...).  Returns the number copied (0 if index is out of
 * range).  Tails are borrowed as in agg_tree_select.  O(log n + max). */
uint64_t agg_tree_read(const agg_tree *t, uint64_t index, uint64_t max,
                       int descending, agg_key *keys, double *values);

/* Batch forms for the vectorised API: out[i] = agg_tree_rank(t, keys[i],
 * after).  Pure loops over C data, safe to run without the GIL. */
void agg_tree_rank_many(const agg_tree *t, const agg_key *keys, uint64_t n,
                        int after, uint64_t *out);

/* -------------------------------------------------------------- checks -- */

/* Walk the whole tree and verify every invariant listed in core/internal.h
 * (ordering within and across nodes, fill bounds, uniform depth, per-child
 * counts and sums equal to what they summarise, separator bounds, leaf chain
 * complete and consistent in both directions, tail reference counts, the
 * item count and nbytes).  AGG_OK, or AGG_CORRUPT with a one-line
 * description written into msg (NUL-terminated, truncated to msg_len). */
agg_status agg_tree_check(const agg_tree *t, char *msg, size_t msg_len);

/* Test hooks (allocation-failure injection, the batch thread mode, the
 * shape hash): aggtree_test.h, agg_test_control. */

#ifdef __cplusplus
}
#endif
#endif /* AGGTREE_H */
