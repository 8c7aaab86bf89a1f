/*
 * aggtree_test.h - test control of the aggtree core: the hooks the tests
 * use to steer and observe the core (allocation-failure injection, the
 * thread mode of the batch operations, a hash of a tree's exact shape),
 * behind one entry point, in the manner of SQLite's sqlite3_test_control.
 * Not part of the API contract in aggtree.h: for tests and benchmarks only.
 */
#ifndef AGGTREE_TEST_H
#define AGGTREE_TEST_H

#include "aggtree.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The operations of agg_test_control, with the arguments each takes after
 * `op` (pass exactly these types: they are read as variadic arguments). */
enum {
    /* (long n) global: after n more successful allocations every
     * allocation fails (returns NULL) until reset; n < 0 disables
     * injection (the default).  Returns the number of allocations made
     * since the previous AGG_TEST_FAIL_AFTER.  Atomic, so threads working
     * on different trees do not race on it. */
    AGG_TEST_FAIL_AFTER = 1,

    /* (long mode) global: how the batch operations agg_tree_insert_sorted
     * and agg_tree_delete_sorted use threads (section 13, core/batch.c).
     * 0 (the default): two threads for large batches (unless the
     * environment has AGGTREE_THREADS=1); 1: always one thread; 2: two
     * threads whenever the batch can be cut in two (FAST keys for the
     * insert's apply pass and the delete's compaction); 3: cut as for 2
     * but every part on the calling thread.  Returns the previous mode.
     * The result of every operation is the same in every mode. */
    AGG_TEST_BATCH_THREAD_MODE = 2,

    /* (const agg_tree *t, uint64_t *out) writes into *out a hash of t's
     * shape and content - every node's count, and per internal node its
     * separators, children's counts and sums (bits, exact flags), per leaf
     * its keys and value bits - in depth-first order.  Two trees with equal
     * hashes are, for all practical purposes, built of the same nodes
     * holding the same things: the tests use it to show that a failed
     * operation left the tree exactly as it was, not merely holding the
     * same items.  FAST keys' bits; GENERAL separators and keys by their
     * head and tail bytes.  O(size of the tree).  Returns 0. */
    AGG_TEST_SHAPE_HASH = 3,
    /* (long slack) global: the bulk build (agg_tree_build) leaves `slack`
     * free slots in every leaf (0: packed full, the state where every
     * batch key overflows its leaf), within [0, cap / 2 - 1]; slack < 0
     * restores the default rule (section 9, core/build.c).  Returns the
     * previous setting (-1: the default). */
    AGG_TEST_BUILD_SLACK = 4
};

/* Perform test-control operation `op` (above) with its arguments.  An
 * unknown op returns -1 and changes nothing. */
long agg_test_control(int op, ...);

#ifdef __cplusplus
}
#endif
#endif /* AGGTREE_TEST_H */
