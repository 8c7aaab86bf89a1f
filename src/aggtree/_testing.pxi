# _testing.pxi - test-only helpers of aggtree._core (included last by _core.pyx).
#
# Nothing here is public API: the tests import these names from
# aggtree._core to inject allocation failures and to look inside a
# namespace's tree.  Every use of the C core's test hooks (aggtree_test.h:
# one entry point, agg_test_control) is in this file and nowhere else.

cdef extern from "aggtree_test.h":
    enum: AGG_TEST_FAIL_AFTER
    enum: AGG_TEST_BUILD_SLACK
    long agg_test_control(int op, ...)


def _debug_fail_after(long n):
    """Make every allocation after the next ``n`` fail (n < 0: stop).

    Returns the number of allocations made since the previous call.  For
    the failure-injection tests only; not thread-safe."""
    return agg_test_control(AGG_TEST_FAIL_AFTER, n)


def _debug_build_slack(long slack):
    """Make bulk builds (from_arrays, load) leave ``slack`` free slots per
    leaf (0: packed full; < 0: the default rule).  Returns the previous
    setting (-1: the default).  For tests and benchmarks only."""
    return agg_test_control(AGG_TEST_BUILD_SLACK, slack)


def _tree_busy(Aggregate agg, namespace=None):
    """Whether a bulk write is changing `namespace`'s tree without the GIL
    right now (without waiting for it), for tests."""
    cdef _Tree tree = agg._tree(namespace)
    return tree is not None and tree.busy != 0


def _tree_info(Aggregate agg, namespace=None):
    """(kind, depth, len, nbytes) of one namespace's tree, for tests."""
    cdef _Tree tree = agg._tree(namespace)
    if tree is None:
        return None
    return ({K_FLOAT: "float", K_INT: "int", K_GENERAL: "general", K_NONE: "none"}[tree.kind],
            agg_tree_depth(_tt(tree)), agg_tree_len(_tt(tree)), agg_tree_nbytes(_tt(tree)))
