"""Allocation failures seen from Python: every write either succeeds or
raises MemoryError and leaves the aggregate exactly as it was.

The C core routes every allocation through one injector
(``agg_test_control``, exposed as ``aggtree._core._debug_fail_after``):
after ``n`` more successful allocations every allocation fails until the
injector is reset with a negative ``n``.  For each kind of write the tests
below retry the same call with ``n = 0, 1, 2, ...`` until it succeeds; every
failing attempt must raise ``MemoryError``, leave the whole content (types
included, see ``conftest.snapshot``), ``len``, ``namespaces()`` and
``nbytes`` unchanged, and keep ``check()`` passing.  The last attempt must
then give the same result as the same call without injection.  The injector
is always reset in a ``finally``.

A randomized test then injects failures at random points of a random
sequence of writes and compares with the pure-Python reference (a write that
raised MemoryError must not have happened at all).

Set ``AGGTREE_RELIABILITY_STATS=/some/file`` to append the figures of a run
(faults injected, calls made) as one JSON line to that file (used for
``docs/RELIABILITY.md``).
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import random
import time

import numpy as np
import pytest

from aggtree import DuplicateItemError, MissingItemError, reference
from aggtree._core import Aggregate, _debug_fail_after, _tree_info
from conftest import snapshot

from _reliability import CI, SANITIZED, stats_reporter  # noqa: E402

STATS = {"faults_injected": 0, "failing_calls_checked": 0, "writes_retried": 0, "random_ops": 0}


_report_stats = stats_reporter("test_alloc_failure", STATS)


@pytest.fixture(autouse=True)
def _injector_reset():
    """No test may leave the injector armed, whatever happens."""
    _debug_fail_after(-1)
    yield
    _debug_fail_after(-1)


# ---------------------------------------------------------------------------
# The retry loop
# ---------------------------------------------------------------------------


def state(agg):
    """Everything observable that a failed call must not change."""
    return snapshot(agg), sorted(map(repr, agg.namespaces())), agg.nbytes


def retry_until_success(agg, call, *, limit=100_000, same_nbytes=True):
    """Run ``call()`` under ``_debug_fail_after(n)`` for n = 0, 1, 2, ...
    until it succeeds; check every failure.  Returns (result, failures).

    ``agg`` is the aggregate the call writes to (None when the call builds
    a new object, e.g. from_arrays or unpickling)."""
    before = state(agg) if agg is not None else None
    failures = 0
    for n in range(limit):
        _debug_fail_after(n)
        try:
            result = call()
        except MemoryError:
            _debug_fail_after(-1)
            failures += 1
            STATS["faults_injected"] += 1
            STATS["failing_calls_checked"] += 1
            if agg is not None:
                agg.check()
                now = state(agg)
                if same_nbytes:
                    assert now == before, f"attempt {n}: content changed after MemoryError"
                else:
                    assert now[:2] == before[:2], f"attempt {n}: content changed after MemoryError"
            continue
        finally:
            _debug_fail_after(-1)
        STATS["writes_retried"] += 1
        if agg is not None:
            agg.check()
        return result, failures
    raise AssertionError(f"no success after {limit} attempts")


def make_fast(n, node_size=4, namespace=None, start=0.0, kind=float):
    agg = Aggregate(node_size=node_size)
    for j in range(n):
        agg.insert(kind(start + j), j, float(j), namespace=namespace)
    agg.check()
    return agg


def make_general(n, node_size=4, namespace=None):
    agg = Aggregate(node_size=node_size)
    for j in range(n):
        # Long keys: the encoding has a tail that the tree allocates.
        agg.insert(f"key-{j:05d}-" + "x" * 20, ("id", j), float(j), namespace=namespace)
    agg.check()
    return agg


def items_until_root_split(build_one, insert_next, node_size=4, max_items=5000):
    """The number of items after which ``insert_next`` grows the tree by a
    level (a root split), found on a scratch aggregate."""
    scratch = Aggregate(node_size=node_size)
    for n in range(max_items):
        if n:
            depth = _tree_info(scratch)[1]
            probe = copy.copy(scratch)
            insert_next(probe, n)
            if _tree_info(probe)[1] > depth and n >= 2 * node_size:
                return n
        build_one(scratch, n)
    raise AssertionError("no root split found")


def expected_after(agg, call_on):
    """The state after the same call without injection (on a copy)."""
    twin = copy.copy(agg)
    result = call_on(twin)
    twin.check()
    return result, snapshot(twin)


def check_write(agg, call_on, *, min_failures=1, same_nbytes=True):
    """Retry ``call_on(agg)`` under injection; compare with an uninjected twin."""
    want_result, want_state = expected_after(agg, call_on)
    result, failures = retry_until_success(agg, lambda: call_on(agg), same_nbytes=same_nbytes)
    assert failures >= min_failures, f"expected the call to allocate (failures={failures})"
    assert result == want_result
    assert snapshot(agg) == want_state
    return failures


# ---------------------------------------------------------------------------
# Single writes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("node_size", [4, 64])
def test_insert_fast_float(node_size):
    agg = make_fast(3 * node_size, node_size)
    for key in (0.5, 100.0, -5.0, 7.25):
        check_write(agg, lambda a, key=key: a.insert(key, 99, 1.5), min_failures=0)


def test_insert_fast_int_kind():
    agg = make_fast(20, kind=int)
    assert _tree_info(agg)[0] == "int"
    check_write(agg, lambda a: a.insert(5, 77, 2.0), min_failures=0)
    assert _tree_info(agg)[0] == "int"


@pytest.mark.parametrize("kind", ["float", "int"])
def test_insert_fast_root_split(kind):
    conv = float if kind == "float" else int
    n = items_until_root_split(
        lambda a, j: a.insert(conv(j), j, 1.0),
        lambda a, j: a.insert(conv(j), j, 1.0),
    )
    agg = make_fast(n, kind=conv)
    for j in range(n):  # make_fast uses value j; re-set to 1.0 like the probe
        agg.upsert(conv(j), j, 1.0)
    depth = _tree_info(agg)[1]
    failures = check_write(agg, lambda a: a.insert(conv(n), n, 1.0))
    assert _tree_info(agg)[1] == depth + 1, "the insert was meant to split the root"
    assert failures >= 2  # a leaf split, an inner split and a new root all allocate


def test_insert_general_root_split():
    def key(j):
        return (f"k-{j:05d}" + "y" * 30, j)

    n = items_until_root_split(
        lambda a, j: a.insert(*key(j), 1.0),
        lambda a, j: a.insert(*key(j), 1.0),
    )
    agg = Aggregate(node_size=4)
    for j in range(n):
        agg.insert(*key(j), 1.0)
    depth = _tree_info(agg)[1]
    assert _tree_info(agg)[0] == "general"
    check_write(agg, lambda a: a.insert(*key(n), 1.0), min_failures=2)
    assert _tree_info(agg)[1] == depth + 1


@pytest.mark.parametrize(
    "key, ident",
    [
        ("a short key", 1),
        ("a long key " * 20, "a long id " * 20),
        (("tuple", (1, 2.5, b"\x00\xff"), None), -(2**70)),
        (b"\x00" * 300, 2**64),
        (True, 1.5),
        (None, None),
    ],
)
def test_insert_general(key, ident):
    agg = make_general(40)
    check_write(agg, lambda a: a.insert(key, ident, 3.0), min_failures=1)


@pytest.mark.parametrize("maker", [make_fast, make_general])
def test_insert_new_namespace(maker):
    agg = maker(30)
    before = agg.namespaces()
    check_write(agg, lambda a: a.insert(1.0, 1, 1.0, namespace=("new", 1)))
    assert set(map(repr, agg.namespaces())) == set(map(repr, before + [("new", 1)]))


def test_insert_into_empty_aggregate():
    agg = Aggregate(node_size=4)
    check_write(agg, lambda a: a.insert(1.0, 1, 1.0))
    agg = Aggregate(node_size=4)
    check_write(agg, lambda a: a.insert("k" * 40, "i" * 40, 1.0, namespace="g"))


def test_upsert():
    agg = make_fast(40)
    # a new item: allocates
    check_write(agg, lambda a: a.upsert(1000.0, 1, 5.0), min_failures=0)
    # an existing item: only its value changes (need not allocate, must not fail half-way)
    check_write(agg, lambda a: a.upsert(3.0, 3, -5.0), min_failures=0)
    g = make_general(40)
    check_write(g, lambda a: a.upsert("zz" * 40, ("id", 1), 5.0), min_failures=1)
    check_write(g, lambda a: a.upsert(f"key-{3:05d}-" + "x" * 20, ("id", 3), 9.0), min_failures=0)
    # upsert of a str key into a float namespace converts it
    check_write(agg, lambda a: a.upsert("str key", 1, 1.0), min_failures=1, same_nbytes=False)


def test_fast_to_general_conversion():
    """A str key into a float namespace rebuilds the tree as GENERAL: every
    allocation of the rebuild and of the insert can fail."""
    agg = make_fast(200, node_size=4)
    agg.insert(1.0, 1, 1.0, namespace="other")
    assert _tree_info(agg)[0] == "float"
    # The conversion may have completed before a later allocation failed:
    # the tree is then GENERAL with the same items, so nbytes may differ.
    failures = check_write(agg, lambda a: a.insert("a str key", 5, 2.0), min_failures=10, same_nbytes=False)
    assert _tree_info(agg)[0] == "general"
    assert failures > 200 // 4  # one failure per allocation of the rebuild at least
    # The same through insert_many and replace.
    agg = make_fast(100, node_size=4)
    check_write(agg, lambda a: a.insert_many([1.5, "s"], [1, 2], [1.0, 2.0]), min_failures=10, same_nbytes=False)
    agg = make_fast(100, node_size=4)
    check_write(agg, lambda a: a.replace(5.0, 5, "moved", 1.0), min_failures=10, same_nbytes=False)
    agg = make_fast(100, node_size=4, kind=int)
    check_write(agg, lambda a: a.insert(0.5, 1, 1.0), min_failures=0, same_nbytes=False)


@pytest.mark.parametrize("maker", [make_fast, make_general])
def test_replace_across_namespaces(maker):
    agg = maker(40)
    agg.insert(1.0, 1, 1.0, namespace="target")
    it = agg.at(7)
    # into an existing namespace
    # (a general item into the float namespace "target" converts it first)
    check_write(
        agg,
        lambda a: a.replace(it.key, it.id, 12345.5, 2.0, new_namespace="target"),
        min_failures=0,
        same_nbytes=maker is make_fast,
    )
    # into a new namespace, with a long general key (tail allocation)
    it = agg.at(3)
    check_write(
        agg,
        lambda a: a.replace(it.key, it.id, "new key " * 10, 2.0, new_namespace=("fresh",)),
        min_failures=1,
        same_nbytes=maker is make_general,
    )
    # moving the last item of a namespace out of it (the old one vanishes)
    agg.insert(1.0, 1, 1.0, namespace="solo")
    check_write(agg, lambda a: a.replace(1.0, 1, "x" * 50, 3.0, namespace="solo", new_namespace="third"))
    assert "solo" not in agg.namespaces()
    # within a namespace
    it = agg.at(0)
    check_write(agg, lambda a: a.replace(it.key, it.id, it.key, 42.0), min_failures=0)


def test_replace_or_insert():
    agg = make_general(40)
    it = agg.at(10)
    assert check_write(
        agg, lambda a: a.replace_or_insert(it.key, it.id, "elsewhere" * 10, 1.0, new_namespace=7), min_failures=1
    )
    # the old item does not exist: a plain upsert into the new place
    check_write(agg, lambda a: a.replace_or_insert("absent", 1, "zz" * 30, 1.0, new_namespace=8), min_failures=1)
    fast = make_fast(40)
    check_write(fast, lambda a: a.replace_or_insert(3.0, 3, 1e9, 1.0), min_failures=0)
    check_write(fast, lambda a: a.replace_or_insert(3.5, 3, 2e9, 1.0, new_namespace="n"), min_failures=1)


@pytest.mark.parametrize("node_size", [4, 64])
def test_insert_many_fast(node_size):
    agg = make_fast(50, node_size)
    keys = np.arange(100, 400, dtype=np.float64) + 0.5
    ids = np.arange(300)
    check_write(agg, lambda a: a.insert_many(keys, ids, np.ones(300)), min_failures=1)
    # into a new namespace (bulk build)
    check_write(agg, lambda a: a.insert_many(keys, ids, namespace="bulk"), min_failures=1)
    # int keys
    check_write(agg, lambda a: a.insert_many(np.arange(64), np.arange(64), namespace="ints"), min_failures=1)


def test_insert_many_general():
    agg = make_general(30)
    keys = [f"many-{j}" * 5 for j in range(60)]
    ids = [(j, "x") for j in range(60)]
    check_write(agg, lambda a: a.insert_many(keys, ids), min_failures=2)
    check_write(agg, lambda a: a.insert_many(keys, ids, namespace=("g", 2)), min_failures=2)


def test_from_arrays():
    keys = np.random.default_rng(1).permutation(500).astype(np.float64)
    ids = np.arange(500)
    nss = ids % 3
    want = snapshot(Aggregate.from_arrays(keys, ids, namespaces=nss, node_size=4))
    result, failures = retry_until_success(
        None, lambda: Aggregate.from_arrays(keys, ids, ids * 1.0, namespaces=nss, node_size=4)
    )
    result.check()
    assert failures >= 3
    assert snapshot(result)[0] == want[0]
    gkeys = [("k", j) for j in range(200)]
    gids = [str(j) * 3 for j in range(200)]
    result, failures = retry_until_success(
        None, lambda: Aggregate.from_arrays(gkeys, gids, namespaces=["a", "b"] * 100, node_size=4)
    )
    result.check()
    assert failures >= 3 and len(result) == 200


def test_pickle_round_trip():
    agg = make_general(80)
    agg.insert_many(np.arange(100.0), np.arange(100), namespace=1)
    agg.insert_many(np.arange(50), np.arange(50), namespace="ints")
    want = snapshot(agg)
    blob = pickle.dumps(agg)
    result, failures = retry_until_success(None, lambda: pickle.loads(blob))
    result.check()
    assert failures >= 10
    assert snapshot(result) == want
    # dumping reads only; it works with an exhausted allocator
    result, failures = retry_until_success(agg, lambda: pickle.dumps(agg))
    assert pickle.loads(result) is not None
    # copy.copy is the same path
    result, failures = retry_until_success(agg, lambda: copy.copy(agg))
    assert snapshot(result) == want


def test_deletes_never_allocate():
    """Deletes (and clears) are documented never to allocate: they succeed
    with the allocator exhausted, and merges leave a valid tree."""
    for maker in (make_fast, make_general):
        agg = maker(300)
        ref = copy.copy(agg)
        rng = random.Random(5)
        items = list(agg.iter())
        rng.shuffle(items)
        _debug_fail_after(0)
        try:
            for it in items[:150]:
                agg.delete(it.key, it.id)
            assert agg.delete_if_exists(items[150].key, items[150].id)
            agg.delete_many([it.key for it in items[151:200]], [it.id for it in items[151:200]])
            agg.clear("absent")
        finally:
            _debug_fail_after(-1)
        agg.check()
        for it in items[:200]:
            ref.delete(it.key, it.id)
        assert snapshot(agg) == snapshot(ref)


def test_reads_with_exhausted_allocator():
    """Reads never change anything; with every allocation failing they still
    answer (or raise MemoryError) and the content stays the same."""
    agg = make_fast(200)
    agg.insert_many([f"s{j}" for j in range(50)], list(range(50)), namespace="g")
    before = state(agg)
    calls = [
        lambda: agg.count(lower=10.0, upper=50.0),
        lambda: agg.sum(),
        lambda: agg.at(-3),
        lambda: agg.index_of(17.0),
        lambda: agg.min(namespace="g"),
        lambda: agg.paginate(page_size=7, namespace="g"),
        lambda: list(agg.iter(namespace="g")),
        lambda: agg.count_many(np.arange(10.0), np.arange(10.0) + 5),
        lambda: agg.sum_many([0.0, 5.0], [100.0, 6.0]),
        lambda: agg.to_arrays(lower=5.0),
        lambda: agg.at_many([0, 1, -1], namespace="g"),
        lambda: agg.index_of_many(np.array([1.0, 2.0])),
    ]
    for call in calls:
        want = call()
        _debug_fail_after(0)
        try:
            got = call()
        except MemoryError:
            got = want
            STATS["faults_injected"] += 1
        finally:
            _debug_fail_after(-1)
        assert repr(got) == repr(want)
        assert state(agg) == before
    agg.check()


# ---------------------------------------------------------------------------
# Random failures in random sequences, against the reference
# ---------------------------------------------------------------------------

KEYS = [0.0, 1.0, 2.5, -3.0, 4, 5, 2**60, "a", "bb" * 20, b"x", ("t", 1), None, True]
IDS = [0, 1, 2, 3, "i", ("x", 2)]
NAMESPACES = [None, "n", 1, ("t",)]


def random_write(rng):
    key = rng.choice(KEYS)
    ident = rng.choice(IDS)
    ns = rng.choice(NAMESPACES)
    value = float(rng.randint(-5, 5))
    op = rng.randrange(9)
    if op == 0:
        return "insert", lambda a: a.insert(key, ident, value, namespace=ns)
    if op == 1:
        return "upsert", lambda a: a.upsert(key, ident, value, namespace=ns)
    if op == 2:
        return "delete", lambda a: a.delete(key, ident, namespace=ns)
    if op == 3:
        new_key, new_ns = rng.choice(KEYS), rng.choice(NAMESPACES)
        return "replace", lambda a: a.replace(key, ident, new_key, value, namespace=ns, new_namespace=new_ns)
    if op == 4:
        new_key, new_ns = rng.choice(KEYS), rng.choice(NAMESPACES)
        return "replace_or_insert", lambda a: a.replace_or_insert(
            key, ident, new_key, value, namespace=ns, new_namespace=new_ns
        )
    if op == 5:
        n = rng.randint(1, 12)
        if rng.random() < 0.5:
            base = rng.randrange(1000)
            keys = [float(base + j) for j in range(n)]
            ids = [rng.randrange(3) for _ in range(n)]
        else:
            keys = [rng.choice(KEYS) for _ in range(n)]
            ids = [rng.choice(IDS) for _ in range(n)]
        return "insert_many", lambda a: a.insert_many(keys, ids, namespace=ns)
    if op == 6:
        return "delete_if_exists", lambda a: a.delete_if_exists(key, ident, namespace=ns)
    if op == 7:
        n = rng.randint(1, 20)
        keys = [float(rng.randrange(100)) for _ in range(n)]
        ids = list(range(n))
        many_ns = rng.choice(NAMESPACES)
        return "insert_many_fast", lambda a: a.insert_many(keys, ids, namespace=many_ns)
    return "clear", lambda a: a.clear(ns)


def outcome(call, agg):
    try:
        return True, call(agg)
    except Exception as exc:  # noqa: BLE001 - compared by type
        return False, exc


def test_random_failures_against_reference():
    rng = random.Random(int(os.environ.get("AGGTREE_SEED", "20240601")))
    budget = 1.0 if SANITIZED else (6.0 if CI else 2.0)
    native = Aggregate(node_size=4)
    ref = reference.Aggregate()
    deadline = time.monotonic() + budget
    steps = 0
    while time.monotonic() < deadline:
        steps += 1
        name, call = random_write(rng)
        n = rng.choice([0, 0, 1, 2, 3, rng.randrange(50), -1])
        _debug_fail_after(n)
        try:
            ok_n, res_n = outcome(call, native)
        finally:
            _debug_fail_after(-1)
        if not ok_n and isinstance(res_n, MemoryError):
            STATS["faults_injected"] += 1
        else:
            ok_r, res_r = outcome(call, ref)
            assert (ok_n, type(res_n) if not ok_n else None) == (ok_r, type(res_r) if not ok_r else None), (
                steps, name, res_n, res_r)
            if ok_n:
                assert res_n == res_r, (steps, name)
        native.check()
        if steps % 10 == 0 or not ok_n:
            assert snapshot(native) == snapshot(ref), (steps, name)
    STATS["random_ops"] += steps
    assert steps > 50
    assert snapshot(native) == snapshot(ref)
    # the exceptions used above exist (keeps the import honest)
    assert issubclass(DuplicateItemError, KeyError) and issubclass(MissingItemError, KeyError)
    assert not math.isnan(native.sum())
