"""Unit tests of the contract in docs/API.md, run against both implementations.

Expected values are written by hand (or by a brute-force model over plain
Python tuples in the property tests at the end), never by asking the
reference implementation, so that these tests can fail for the reference too.
"""

from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggtree import Bound, DuplicateItemError, Item, MissingItemError, Page

INF = math.inf

# Six items with values that are powers of two, so every sum names its subset
# exactly.  Positions in (key, id) order:
#   0: (1, "a", 1)  1: (2, "a", 2)  2: (2, "b", 4)  3: (2, "c", 8)
#   4: (3, "a", 16) 5: (4, "b", 32)
D = [
    (2, "b", 4.0),
    (1, "a", 1.0),
    (4, "b", 32.0),
    (2, "c", 8.0),
    (3, "a", 16.0),
    (2, "a", 2.0),
]
D_SORTED = sorted(D)


def items_at(*positions):
    return [Item(*D_SORTED[p]) for p in positions]


def typed(v):
    """v with its types visible (1, 1.0 and True differ; -0.0 and 0.0 differ)."""
    if isinstance(v, tuple):
        return (type(v).__name__, tuple(typed(e) for e in v))
    if isinstance(v, float):
        return ("float", v.hex())
    return (type(v).__name__, v)


def walk(agg, **kw):
    """All items of a range by pagination, checking page invariants."""
    out = []
    cursor = None
    for _ in range(len(agg) + 2):
        page = agg.paginate(cursor=cursor, **kw)
        assert isinstance(page, Page)
        out.extend(page.items)
        if page.items:
            assert isinstance(page.cursor, str)
        else:
            assert page.cursor == cursor
            assert page.is_done
        if page.is_done:
            return out
        cursor = page.cursor
    raise AssertionError(f"pagination did not finish: {out[:20]}...")


# ---------------------------------------------------------------------------
# Construction, empty aggregates
# ---------------------------------------------------------------------------


def test_node_size_accepted(impl):
    for n in (4, 5, 64, 4096):
        agg = impl(node_size=n)
        agg.check()
        assert len(agg) == 0
    impl().check()
    impl(16).check()


@pytest.mark.parametrize("n", [3, 0, -1, 4097, 10**30])
def test_node_size_out_of_range(impl, n):
    with pytest.raises(ValueError, match="node_size"):
        impl(node_size=n)


@pytest.mark.parametrize("n", [4.0, "64", None, [64]])
def test_node_size_not_int(impl, n):
    with pytest.raises(TypeError, match="node_size"):
        impl(node_size=n)


def test_empty(make):
    agg = make()
    assert len(agg) == 0
    assert agg.namespaces() == []
    assert agg.count() == 0
    assert agg.sum() == 0.0 and isinstance(agg.sum(), float)
    assert agg.min() is None and agg.max() is None
    assert agg.random(rng=random.Random(0)) is None
    assert agg.index_of(5) == 0 and agg.index_of(5, order="desc") == 0
    with pytest.raises(IndexError):
        agg.at(0)
    with pytest.raises(IndexError):
        agg.at(-1)
    assert agg.paginate() == Page([], None, True)
    assert list(agg.iter()) == []
    keys, ids, values = agg.to_arrays()
    assert len(keys) == len(ids) == len(values) == 0
    assert agg.count_batch([{}]) == [0]
    assert agg.sum_batch([{}]) == [0.0]
    agg.check()


# ---------------------------------------------------------------------------
# Basic writes and reads
# ---------------------------------------------------------------------------


def test_insert_keeps_key_id_order(make):
    agg = make(D)
    assert len(agg) == 6
    assert list(agg.iter()) == items_at(0, 1, 2, 3, 4, 5)
    assert list(agg.iter(order="desc")) == items_at(5, 4, 3, 2, 1, 0)
    assert [agg.at(i) for i in range(6)] == items_at(0, 1, 2, 3, 4, 5)
    assert [agg.at(-i) for i in range(1, 7)] == items_at(5, 4, 3, 2, 1, 0)
    assert agg.count() == 6
    assert agg.sum() == 63.0
    assert agg.min() == Item(1, "a", 1.0)
    assert agg.max() == Item(4, "b", 32.0)
    item = agg.at(0)
    assert isinstance(item, Item) and item == (1, "a", 1.0)
    assert type(item.value) is float


def test_value_default_and_conversion(make):
    agg = make()
    agg.insert(1, "a")
    agg.insert(2, "b", 3)  # int value -> float
    agg.insert(3, "c", True)
    agg.insert(4, "d", np.float32(0.5))
    agg.insert(5, "e", -0.0)
    values = [it.value for it in agg.iter()]
    assert values == [0.0, 3.0, 1.0, 0.5, 0.0]
    assert all(type(v) is float for v in values)
    assert agg.sum() == 4.5


def test_insert_duplicate_and_delete_missing(make):
    agg = make(D)
    with pytest.raises(DuplicateItemError):
        agg.insert(2, "b", 99.0)
    with pytest.raises(DuplicateItemError):
        agg.insert(2.0, "b")
    with pytest.raises(KeyError):  # DuplicateItemError is a KeyError
        agg.insert(2, "b")
    with pytest.raises(MissingItemError):
        agg.delete(2, "z")
    with pytest.raises(MissingItemError):
        agg.delete(5, "a")
    with pytest.raises(MissingItemError):
        agg.delete(2, "b", namespace="elsewhere")
    assert list(agg.iter()) == items_at(0, 1, 2, 3, 4, 5)
    agg.delete(2.0, "b")  # equal key
    assert list(agg.iter()) == items_at(0, 1, 3, 4, 5)
    with pytest.raises(MissingItemError):
        agg.delete(2, "b")
    agg.check()


def test_delete_everything_in_every_order(make):
    for perm in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 5, 0, 3, 1, 4]):
        agg = make(D)
        remaining = list(range(6))
        for p in perm:
            key, id_, _ = D_SORTED[p]
            agg.delete(key, id_)
            remaining.remove(p)
            agg.check()
            assert list(agg.iter()) == items_at(*remaining)
            assert agg.sum() == sum(D_SORTED[q][2] for q in remaining)
        assert len(agg) == 0 and agg.namespaces() == []


def test_many_items_small_nodes(make):
    # Enough items for several levels at node_size 4; deletes in a scattered order.
    agg = make()
    n = 500
    keys = [(i * 7919) % n for i in range(n)]
    for k in keys:
        agg.insert(k // 3, k, float(k))
    agg.check()
    assert agg.count() == n
    assert agg.sum() == float(n * (n - 1) // 2)
    assert [it.id for it in agg.iter()] == sorted(range(n), key=lambda k: (k // 3, k))
    assert agg.at(250) == Item(250 // 3, 250, 250.0)
    assert agg.index_of(100) == 300
    assert agg.count(lower=100, upper=Bound(110, inclusive=False)) == 30
    for k in keys[::2]:
        agg.delete(k // 3, k)
    agg.check()
    left = sorted(keys[1::2], key=lambda k: (k // 3, k))
    assert [it.id for it in agg.iter()] == left
    assert agg.sum() == float(sum(left))
    for k in keys[1::2]:
        agg.delete(k // 3, k)
    agg.check()
    assert len(agg) == 0 and agg.namespaces() == []


# ---------------------------------------------------------------------------
# Every bounds form against D (expected positions written by hand)
# ---------------------------------------------------------------------------

RANGE_CASES = [
    ("unbounded", {}, [0, 1, 2, 3, 4, 5]),
    ("lower-None", {"lower": None, "upper": None}, [0, 1, 2, 3, 4, 5]),
    ("lower-bare", {"lower": 2}, [1, 2, 3, 4, 5]),
    ("lower-incl", {"lower": Bound(2)}, [1, 2, 3, 4, 5]),
    ("lower-excl", {"lower": Bound(2, inclusive=False)}, [4, 5]),
    ("upper-bare", {"upper": 2}, [0, 1, 2, 3]),
    ("upper-excl", {"upper": Bound(2, inclusive=False)}, [0]),
    ("lower-incl-id", {"lower": Bound(2, id="b")}, [2, 3, 4, 5]),
    ("lower-excl-id", {"lower": Bound(2, inclusive=False, id="b")}, [3, 4, 5]),
    ("upper-incl-id", {"upper": Bound(2, id="b")}, [0, 1, 2]),
    ("upper-excl-id", {"upper": Bound(2, inclusive=False, id="b")}, [0, 1]),
    ("lower-absent-id", {"lower": Bound(2, id="bb")}, [3, 4, 5]),
    ("lower-excl-absent-id", {"lower": Bound(2, inclusive=False, id="bb")}, [3, 4, 5]),
    ("upper-absent-id", {"upper": Bound(2, id="bb")}, [0, 1, 2]),
    ("lower-id-before-all", {"lower": Bound(2, id=0)}, [1, 2, 3, 4, 5]),
    ("upper-id-after-all", {"upper": Bound(2, id=(1,))}, [0, 1, 2, 3]),
    ("one-item-by-ids", {"lower": Bound(2, id="b"), "upper": Bound(2, id="b")}, [2]),
    ("empty-excl-lower-id", {"lower": Bound(2, False, "b"), "upper": Bound(2, id="b")}, []),
    ("empty-excl-upper-id", {"lower": Bound(2, id="b"), "upper": Bound(2, False, "b")}, []),
    ("dup-key-both-ends", {"lower": 2, "upper": 2}, [1, 2, 3]),
    ("dup-key-both-excl", {"lower": Bound(2, False), "upper": Bound(2, False)}, []),
    ("between-keys", {"lower": 1.5, "upper": 3.5}, [1, 2, 3, 4]),
    ("float-equal-int", {"lower": 2.0, "upper": Bound(4.0, False)}, [1, 2, 3, 4]),
    ("inverted", {"lower": 3, "upper": 1}, []),
    ("inverted-ids", {"lower": Bound(2, id="c"), "upper": Bound(2, id="a")}, []),
    ("above-all", {"lower": Bound(4, inclusive=False)}, []),
    ("below-all", {"upper": Bound(1, inclusive=False)}, []),
    ("infinities", {"lower": -INF, "upper": INF}, [0, 1, 2, 3, 4, 5]),
    ("huge-ints", {"lower": -(10**400), "upper": 10**400}, [0, 1, 2, 3, 4, 5]),
    ("str-above-numbers", {"lower": ""}, []),
    ("str-upper", {"upper": "a"}, [0, 1, 2, 3, 4, 5]),
    ("bound-None-lower", {"lower": Bound(None)}, [0, 1, 2, 3, 4, 5]),
    ("bound-None-upper", {"upper": Bound(None)}, []),
    ("bound-None-excl-lower", {"lower": Bound(None, inclusive=False)}, [0, 1, 2, 3, 4, 5]),
    ("eq", {"eq": 2}, [1, 2, 3]),
    ("eq-float", {"eq": 2.0}, [1, 2, 3]),
    ("eq-True-is-1", {"eq": True}, [0]),
    ("eq-absent", {"eq": 5}, []),
    ("eq-None", {"eq": None}, []),
    ("eq-str", {"eq": "2"}, []),
    ("prefix-empty", {"prefix": ()}, [0, 1, 2, 3, 4, 5]),
    ("prefix-empty-list", {"prefix": []}, [0, 1, 2, 3, 4, 5]),
    ("prefix-no-tuple-keys", {"prefix": (2,)}, []),
]


@pytest.mark.parametrize("kw,expected", [c[1:] for c in RANGE_CASES], ids=[c[0] for c in RANGE_CASES])
def test_range_forms(make, kw, expected):
    agg = make(D)
    want = items_at(*expected)
    n = len(want)
    assert agg.count(**kw) == n
    total = agg.sum(**kw)
    assert type(total) is float
    assert total == sum(it.value for it in want)  # powers of two: exact
    assert list(agg.iter(**kw)) == want
    assert list(agg.iter(order="desc", **kw)) == want[::-1]
    assert [agg.at(i, **kw) for i in range(n)] == want
    assert [agg.at(-i, **kw) for i in range(1, n + 1)] == want[::-1]
    for bad in (n, -n - 1, 10**30, -(10**30)):
        with pytest.raises(IndexError):
            agg.at(bad, **kw)
    assert agg.min(**kw) == (want[0] if want else None)
    assert agg.max(**kw) == (want[-1] if want else None)
    for size in (1, 2, 100):
        assert walk(agg, page_size=size, **kw) == want
        assert walk(agg, page_size=size, order="desc", **kw) == want[::-1]
    keys, ids, values = agg.to_arrays(**kw)
    assert list(keys) == [it.key for it in want]
    assert list(ids) == [it.id for it in want]
    assert values.dtype == np.float64 and list(values) == [it.value for it in want]
    assert agg.count_batch([kw]) == [n]
    assert agg.sum_batch([kw]) == [total]
    if n:
        assert agg.at_batch([dict(kw, offset=-1)]) == [want[-1]]
    # The same range in a namespace that does not exist is empty.
    assert agg.count(namespace="nope", **kw) == 0
    assert agg.sum(namespace="nope", **kw) == 0.0
    assert agg.min(namespace="nope", **kw) is None
    with pytest.raises(IndexError):
        agg.at(0, namespace="nope", **kw)
    agg.check()


# Keys of every kind for prefix queries.  Sorted order:
#   0 None  1 5  2 "a"  3 b"a"  4 ()  5 ("a",)/"x"  6 ("a",)/"y"  7 ("a", 1)
#   8 ("a", 1, "z")  9 ("a", 2)  10 ("b",)  11 (("a",),)
P_SORTED = [
    (None, "x"),
    (5, "x"),
    ("a", "x"),
    (b"a", "x"),
    ((), "x"),
    (("a",), "x"),
    (("a",), "y"),
    (("a", 1), "x"),
    (("a", 1, "z"), "x"),
    (("a", 2), "x"),
    (("b",), "x"),
    ((("a",),), "x"),
]

PREFIX_CASES = [
    ((), list(range(12))),
    ([], list(range(12))),
    (("a",), [5, 6, 7, 8, 9]),
    (["a"], [5, 6, 7, 8, 9]),
    (("a", 1), [7, 8]),
    (("a", 1.0), [7, 8]),
    (("a", True), [7, 8]),
    (["a", 1], [7, 8]),
    (("a", 1, "z"), [8]),
    (("a", 1, "z", "q"), []),
    (("a", 3), []),
    (("b",), [10]),
    (("c",), []),
    ((None,), []),
    ((("a",),), [11]),
    ([["a"]], [11]),
    ((("a", 1),), []),
]


@pytest.mark.parametrize("prefix,expected", PREFIX_CASES, ids=[repr(c[0]) for c in PREFIX_CASES])
def test_prefix(make, prefix, expected):
    agg = make()
    for key, id_ in reversed(P_SORTED):
        agg.insert(key, id_, 1.0)
    assert list(agg.iter()) == [Item(k, i, 1.0) for k, i in P_SORTED]
    want = [Item(*P_SORTED[p], 1.0) for p in expected]
    assert agg.count(prefix=prefix) == len(want)
    assert agg.sum(prefix=prefix) == float(len(want))
    assert list(agg.iter(prefix=prefix)) == want
    assert agg.min(prefix=prefix) == (want[0] if want else None)
    assert agg.max(prefix=prefix) == (want[-1] if want else None)
    assert walk(agg, prefix=prefix, page_size=2) == want
    assert walk(agg, prefix=prefix, page_size=2, order="desc") == want[::-1]
    if want:
        assert agg.at(-1, prefix=prefix) == want[-1]
        # index_of inside a prefix range: ("a", 1) sits before ("a", 1, "z").
        assert agg.index_of(want[0].key, id=want[0].id, prefix=prefix) == 0
        assert agg.index_of(want[-1].key, id=want[-1].id, order="desc", prefix=prefix) == 0


def test_mutually_exclusive_forms_are_checked_for_any_value(make):
    agg = make(D)
    # eq=None is the key None, not "unset": it still conflicts with lower.
    with pytest.raises(ValueError):
        agg.count(eq=None, lower=1)
    with pytest.raises(ValueError):
        agg.count(eq=2, prefix=())
    with pytest.raises(ValueError):
        agg.count(prefix=(), upper=3)
    # prefix=None and lower=None are "unset".
    assert agg.count(prefix=None, lower=None, eq=2) == 3


# ---------------------------------------------------------------------------
# index_of
# ---------------------------------------------------------------------------

INDEX_CASES = [
    # (bounds, key, id, asc, desc) -- counted by hand on D.
    ({}, 2, None, 1, 2),
    ({}, 2, "a", 1, 4),
    ({}, 2, "b", 2, 3),
    ({}, 2, "bb", 3, 3),
    ({}, 2, "c", 3, 2),
    ({}, 2.0, "c", 3, 2),
    ({}, 2, 0, 1, 5),  # a numeric id sorts before every str id
    ({}, 2.5, None, 4, 2),
    ({}, 0, None, 0, 6),
    ({}, 1, None, 0, 5),
    ({}, True, None, 0, 5),
    ({}, 4, None, 5, 0),
    ({}, 10, None, 6, 0),
    ({}, -INF, None, 0, 6),
    ({}, INF, None, 6, 0),
    ({}, None, None, 0, 6),
    ({}, "x", None, 6, 0),
    ({}, (), None, 6, 0),
    # range [1..4] = (2,a) (2,b) (2,c) (3,a)
    ({"lower": 2, "upper": 3}, 1, None, 0, 4),
    ({"lower": 2, "upper": 3}, 2, None, 0, 1),
    ({"lower": 2, "upper": 3}, 2, "a", 0, 3),
    ({"lower": 2, "upper": 3}, 2, "c", 2, 1),
    ({"lower": 2, "upper": 3}, 3, None, 3, 0),
    ({"lower": 2, "upper": 3}, 3.5, None, 4, 0),
    ({"lower": 2, "upper": 3}, 10, None, 4, 0),
    ({"lower": 2, "upper": 3}, -10, None, 0, 4),
    # range [2..3] = (2,b) (2,c), bounds with ids and exclusive on both sides
    ({"lower": Bound(2, False, "a"), "upper": Bound(3, False)}, 2, None, 0, 0),
    ({"lower": Bound(2, False, "a"), "upper": Bound(3, False)}, 2, "a", 0, 2),
    ({"lower": Bound(2, False, "a"), "upper": Bound(3, False)}, 2, "b", 0, 1),
    ({"lower": Bound(2, False, "a"), "upper": Bound(3, False)}, 2, "c", 1, 0),
    ({"lower": Bound(2, False, "a"), "upper": Bound(3, False)}, 2.5, None, 2, 0),
    ({"lower": Bound(2, False, "a"), "upper": Bound(3, False)}, 1, None, 0, 2),
    ({"eq": 2}, 2, "b", 1, 1),
    ({"eq": 2}, 3, None, 3, 0),
    ({"eq": 9}, 3, None, 0, 0),
    ({"lower": 3, "upper": 1}, 2, None, 0, 0),  # inverted range
    ({"prefix": ()}, 2, "b", 2, 3),
    ({"prefix": ("a",)}, 2, "b", 0, 0),
]


@pytest.mark.parametrize("kw,key,id_,asc,desc", INDEX_CASES)
def test_index_of(make, kw, key, id_, asc, desc):
    agg = make(D)
    assert agg.index_of(key, id=id_, **kw) == asc
    assert agg.index_of(key, id=id_, order="asc", **kw) == asc
    assert agg.index_of(key, id=id_, order="desc", **kw) == desc
    assert agg.index_of(key, id=id_, namespace="nope", **kw) == 0
    assert agg.index_of(key, id=id_, order="desc", namespace="nope", **kw) == 0


def test_index_of_inverts_at(make):
    agg = make(D)
    for pos, item in enumerate(D_SORTED):
        assert agg.index_of(item[0], id=item[1]) == pos
        assert agg.index_of(item[0], id=item[1], order="desc") == 5 - pos
        assert agg.at(agg.index_of(item[0], id=item[1])) == item


# ---------------------------------------------------------------------------
# at, min, max, random
# ---------------------------------------------------------------------------


def test_at_offsets(make):
    agg = make(D)
    assert agg.at(0) == D_SORTED[0]
    assert agg.at(5) == D_SORTED[5]
    assert agg.at(-1) == D_SORTED[5]
    assert agg.at(-6) == D_SORTED[0]
    assert agg.at(True) == D_SORTED[1]  # operator.index(True) == 1
    assert agg.at(np.int64(2)) == D_SORTED[2]
    assert agg.at(-1, lower=2, upper=2) == D_SORTED[3]
    assert agg.at(1, lower=Bound(1, inclusive=False)) == D_SORTED[2]
    for bad in (6, -7, 10**30, -(10**30), 2**63, -(2**63), 2**64):
        with pytest.raises(IndexError):
            agg.at(bad)
    with pytest.raises(IndexError):
        agg.at(0, eq=7)
    with pytest.raises(IndexError):
        agg.at(0, namespace="missing")


def test_min_max(make):
    agg = make(D)
    assert agg.min() == D_SORTED[0] and agg.max() == D_SORTED[5]
    assert agg.min(eq=2) == D_SORTED[1] and agg.max(eq=2) == D_SORTED[3]
    assert agg.min(lower=Bound(2, id="b")) == D_SORTED[2]
    assert agg.max(upper=Bound(2, False, id="c")) == D_SORTED[2]
    assert agg.min(lower=9) is None and agg.max(upper=0) is None
    assert agg.min(namespace=1) is None and agg.max(namespace=1) is None


class CountingRng:
    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.calls = []

    def randrange(self, n):
        self.calls.append(n)
        return self.rng.randrange(n)


def test_random_uses_rng_exactly_once(make):
    agg = make(D)
    for kw, positions in [({}, range(6)), ({"eq": 2}, [1, 2, 3]), ({"lower": Bound(3)}, [4, 5])]:
        for seed in range(20):
            rng = CountingRng(seed)
            got = agg.random(rng=rng, **kw)
            assert rng.calls == [len(positions)]
            expected_pos = list(positions)[random.Random(seed).randrange(len(positions))]
            assert got == D_SORTED[expected_pos]
    rng = CountingRng(0)
    assert agg.random(rng=rng, eq=7) is None
    assert agg.random(rng=rng, namespace="missing") is None
    assert rng.calls == []


def test_random_default_rng_is_the_random_module(make):
    agg = make(D)
    random.seed(1234)
    got = [agg.random() for _ in range(10)]
    random.seed(1234)
    assert got == [D_SORTED[random.randrange(6)] for _ in range(10)]


def test_random_is_roughly_uniform(make):
    agg = make(D)
    rng = random.Random(42)
    counts = {}
    for _ in range(600):
        it = agg.random(rng=rng, lower=2)
        counts[it] = counts.get(it, 0) + 1
    assert set(counts) == set(items_at(1, 2, 3, 4, 5))
    assert all(60 <= c <= 180 for c in counts.values())


# ---------------------------------------------------------------------------
# Pagination and iteration under mutation
# ---------------------------------------------------------------------------


def test_paginate_pages_and_is_done(make):
    agg = make(D)
    p1 = agg.paginate(page_size=2)
    assert p1.items == items_at(0, 1) and not p1.is_done
    p2 = agg.paginate(cursor=p1.cursor, page_size=2)
    assert p2.items == items_at(2, 3) and not p2.is_done
    p3 = agg.paginate(cursor=p2.cursor, page_size=2)
    assert p3.items == items_at(4, 5) and p3.is_done  # exact: no empty extra page
    # Asking again after the end: empty, done, cursor unchanged.
    p4 = agg.paginate(cursor=p3.cursor, page_size=2)
    assert p4 == Page([], p3.cursor, True)
    # Exactly one page.
    assert agg.paginate(page_size=6) == Page(items_at(0, 1, 2, 3, 4, 5), agg.paginate(page_size=6).cursor, True)
    assert agg.paginate(page_size=10**30).is_done
    # Descending.
    d1 = agg.paginate(order="desc", page_size=4)
    assert d1.items == items_at(5, 4, 3, 2) and not d1.is_done
    d2 = agg.paginate(order="desc", cursor=d1.cursor, page_size=4)
    assert d2.items == items_at(1, 0) and d2.is_done
    # A cursor names an item, not a direction: continue p1's cursor downwards.
    assert agg.paginate(order="desc", cursor=p1.cursor).items == items_at(0)
    # Within a range.
    r1 = agg.paginate(eq=2, page_size=2)
    assert r1.items == items_at(1, 2) and not r1.is_done
    r2 = agg.paginate(eq=2, page_size=2, cursor=r1.cursor)
    assert r2.items == items_at(3) and r2.is_done
    # Missing namespace, empty range.
    assert agg.paginate(namespace="x") == Page([], None, True)
    assert agg.paginate(namespace="x", cursor=p1.cursor) == Page([], p1.cursor, True)
    assert agg.paginate(lower=9, cursor=p1.cursor) == Page([], p1.cursor, True)


def test_paginate_cursor_of_deleted_item(make):
    agg = make(D)
    p1 = agg.paginate(page_size=3)
    assert p1.items == items_at(0, 1, 2)
    agg.delete(2, "b")  # the cursor's own item
    p2 = agg.paginate(cursor=p1.cursor, page_size=3)
    assert p2.items == items_at(3, 4, 5) and p2.is_done
    d = agg.paginate(cursor=p1.cursor, order="desc")
    assert d.items == items_at(1, 0) and d.is_done
    # The cursor even survives the namespace vanishing and coming back.
    agg.clear()
    assert agg.paginate(cursor=p1.cursor) == Page([], p1.cursor, True)
    agg.insert(2, "bb", 1.0)
    agg.insert(2, "a", 1.0)
    assert agg.paginate(cursor=p1.cursor).items == [Item(2, "bb", 1.0)]


def test_paginate_and_iter_after_key_or_id_none(make):
    # Regression (native): a cursor naming an item whose key or id is None
    # must resume strictly after (before) that item.
    items = [(None, None, 1.0), (None, 0, 2.0), (None, 1, 4.0), (0, None, 8.0), (1, "x", 16.0)]
    agg = make(reversed(items))
    want = [Item(*t) for t in items]
    for size in (1, 2, 3):
        assert walk(agg, page_size=size) == want
        assert walk(agg, page_size=size, order="desc") == want[::-1]
        assert walk(agg, page_size=size, eq=None) == want[:3]
        assert walk(agg, page_size=size, order="desc", upper=Bound(None)) == want[2::-1]
    p = agg.paginate(page_size=1)
    assert p.items == want[:1] and not p.is_done
    p = agg.paginate(page_size=1, cursor=p.cursor)
    assert p.items == want[1:2] and not p.is_done
    p = agg.paginate(page_size=2, cursor=p.cursor)
    assert p.items == want[2:4] and not p.is_done
    it = agg.iter()
    assert [next(it), next(it)] == want[:2]
    agg.delete(None, 0)
    assert list(it) == want[2:]
    it = agg.iter(order="desc")
    assert [next(it) for _ in range(3)] == [want[4], want[3], want[2]]
    agg.delete(None, 1)
    assert list(it) == want[:1]


def _model_range(model, lo, hi):
    return sorted(x for x in model if lo <= x[0] < hi)


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("seed", range(8))
def test_paginate_while_mutating(make, seed, order):
    """Each page equals the next page_size items of a plain model of what is
    present now, strictly after the cursor; is_done is exact; so nothing
    present throughout is skipped or repeated."""
    rng = random.Random(seed)
    lo_key, hi_key = 5, 25  # range: lower=Bound(5), upper=Bound(25, inclusive=False)
    model = {}
    agg = make()
    for _ in range(40):
        k, i = rng.randrange(30), rng.choice("abcd")
        if (k, i) not in model:
            model[(k, i)] = float(k)
            agg.insert(k, i, float(k))
    kw = {"lower": Bound(lo_key), "upper": Bound(hi_key, inclusive=False), "order": order}
    asc = order == "asc"
    present_throughout = set(_model_range(model, lo_key, hi_key))
    seen = []
    cursor = None
    last = None
    for _ in range(200):
        size = rng.randint(1, 4)
        page = agg.paginate(cursor=cursor, page_size=size, **kw)
        in_range = _model_range(model, lo_key, hi_key)
        if not asc:
            in_range.reverse()
        if last is not None:
            in_range = [x for x in in_range if (x > last if asc else x < last)]
        assert [(it.key, it.id) for it in page.items] == in_range[:size]
        assert all(it.value == float(it.key) for it in page.items)
        assert page.is_done == (len(in_range) <= size)
        if not page.items:
            assert page.cursor == cursor
        else:
            cursor = page.cursor
            last = (page.items[-1].key, page.items[-1].id)
        seen.extend((it.key, it.id) for it in page.items)
        if page.is_done:
            break
        # Mutate between pages: delete the cursor's item, items ahead and
        # behind, and insert items ahead and behind.
        for _ in range(rng.randint(0, 3)):
            r = rng.random()
            if r < 0.3 and last in model:
                victim = last
            elif r < 0.6 and model:
                victim = rng.choice(sorted(model))
            else:
                victim = None
            if victim is not None:
                agg.delete(*victim)
                del model[victim]
                present_throughout.discard(victim)
            else:
                k, i = rng.randrange(30), rng.choice("abcde")
                if (k, i) not in model:
                    agg.insert(k, i, float(k))
                    model[(k, i)] = float(k)
        agg.check()
    else:
        pytest.fail("pagination did not finish")
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen, reverse=not asc)
    assert present_throughout <= set(seen)


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("seed", range(4))
def test_iter_while_mutating(make, seed, order):
    rng = random.Random(seed)
    model = set()
    agg = make()
    for _ in range(30):
        k, i = rng.randrange(20), rng.randrange(3)
        if (k, i) not in model:
            model.add((k, i))
            agg.insert(k, i)
    asc = order == "asc"
    present_throughout = set(model)
    seen = []
    it = agg.iter(order=order)
    while True:
        ahead = sorted(x for x in model if not seen or (x > seen[-1] if asc else x < seen[-1]))
        if not asc:
            ahead.reverse()
        nxt = next(it, None)
        if nxt is None:
            assert ahead == []
            break
        assert (nxt.key, nxt.id) == ahead[0]
        seen.append((nxt.key, nxt.id))
        for _ in range(rng.randint(0, 2)):
            if rng.random() < 0.5 and model:
                victim = rng.choice(sorted(model))
                agg.delete(*victim)
                model.discard(victim)
                present_throughout.discard(victim)
            else:
                k, i = rng.randrange(20), rng.randrange(4)
                if (k, i) not in model:
                    agg.insert(k, i)
                    model.add((k, i))
    assert present_throughout <= set(seen)
    assert len(seen) == len(set(seen))


def test_iter_with_bounds_and_namespace_vanishing(make):
    agg = make(D)
    agg.insert(1, "x", namespace="n")
    agg.insert(2, "x", namespace="n")
    assert list(agg.iter(namespace="n")) == [Item(1, "x", 0.0), Item(2, "x", 0.0)]
    assert list(agg.iter(lower=Bound(2, False, "a"), upper=Bound(3))) == items_at(2, 3, 4)
    it = agg.iter(namespace="n")
    assert next(it) == Item(1, "x", 0.0)
    agg.clear(namespace="n")
    assert list(it) == []


# ---------------------------------------------------------------------------
# Idempotent and moving writes
# ---------------------------------------------------------------------------


def test_upsert(make):
    agg = make()
    assert agg.upsert(1, "a", 1.0) is True
    assert agg.upsert(1, "a", 2.0) is False
    assert agg.upsert(1.0, "a", 3.0) is False  # equal key: overwrites
    assert list(agg.iter()) == [Item(1, "a", 3.0)]
    assert type(agg.at(0).key) is int  # the stored key keeps its type
    assert agg.upsert(1, "b") is True
    assert agg.sum() == 3.0 and len(agg) == 2
    assert agg.upsert(1, "a", 5.0, namespace="n") is True
    assert agg.sum(namespace="n") == 5.0 and agg.sum() == 3.0
    agg.check()


def test_delete_if_exists(make):
    agg = make(D)
    assert agg.delete_if_exists(2, "b") is True
    assert agg.delete_if_exists(2, "b") is False
    assert agg.delete_if_exists(2, "b", namespace="n") is False
    assert agg.delete_if_exists(True, "a") is True  # key 1
    assert list(agg.iter()) == items_at(1, 3, 4, 5)
    assert agg.namespaces() == [None]
    for key, id_, _ in D:
        agg.delete_if_exists(key, id_)
    assert agg.namespaces() == [] and len(agg) == 0
    agg.check()


def test_replace_within_namespace(make):
    agg = make(D)
    agg.replace(2, "b", 10, 100.0)
    assert list(agg.iter()) == items_at(0, 1, 3, 4, 5) + [Item(10, "b", 100.0)]
    with pytest.raises(MissingItemError):
        agg.replace(2, "b", 11)
    with pytest.raises(DuplicateItemError):
        agg.replace(2, "a", 3, 0.0)  # (3, "a") exists
    # Onto itself: only the value changes.
    agg.replace(2, "a", 2, 7.0)
    agg.replace(2, "c", 2.0, 9.0)
    assert agg.at(1) == Item(2, "a", 7.0)
    assert agg.at(2) == Item(2, "c", 9.0) and type(agg.at(2).key) is int
    # Default value is 0.0.
    agg.replace(3, "a", 3.5)
    assert agg.at(3) == Item(3.5, "a", 0.0)
    assert len(agg) == 6
    agg.check()


def test_replace_across_namespaces(make):
    agg = make(D)
    agg.insert(1, "a", 5.0, namespace="other")
    agg.replace(2, "b", 2, 4.0, new_namespace="new")
    assert agg.namespaces() is not None
    assert set(agg.namespaces()) == {None, "other", "new"}
    assert list(agg.iter(namespace="new")) == [Item(2, "b", 4.0)]
    assert agg.count() == 5
    # Target exists in the other namespace.
    with pytest.raises(DuplicateItemError):
        agg.replace(1, "a", 1, namespace=None, new_namespace="other")
    # Moving the last item out of a namespace removes the namespace.
    agg.replace(2, "b", 3, 1.0, namespace="new", new_namespace="other")
    assert set(agg.namespaces()) == {None, "other"}
    assert list(agg.iter(namespace="other")) == [Item(1, "a", 5.0), Item(3, "b", 1.0)]
    # Namespaces follow dict semantics: 1 == 1.0 == True.
    agg.replace(3, "b", 3, 2.0, namespace="other", new_namespace=1)
    agg.replace(3, "b", 4, 2.0, namespace=1.0, new_namespace=True)
    assert list(agg.iter(namespace=1)) == [Item(4, "b", 2.0)]
    assert len(agg) == 7
    agg.check()


def test_replace_or_insert(make):
    agg = make(D)
    assert agg.replace_or_insert(9, "z", 9, 1.0) is False  # absent: inserted
    assert agg.at(-1) == Item(9, "z", 1.0)
    assert agg.replace_or_insert(9, "z", 10, 2.0) is True  # moved
    assert agg.at(-1) == Item(10, "z", 2.0) and agg.count(eq=9) == 0
    assert agg.replace_or_insert(10, "z", 10, 3.0) is True  # onto itself
    assert agg.at(-1) == Item(10, "z", 3.0) and len(agg) == 7
    # The target exists and is another item: it is overwritten, the old one deleted.
    assert agg.replace_or_insert(2, "a", 3, 50.0) is True
    assert agg.count(eq=2) == 2
    assert list(agg.iter(eq=3)) == [Item(3, "a", 50.0)]
    assert len(agg) == 6
    # Across namespaces, creating and removing them.
    assert agg.replace_or_insert(10, "z", 1, 4.0, new_namespace="n") is True
    assert list(agg.iter(namespace="n")) == [Item(1, "z", 4.0)]
    assert agg.replace_or_insert(1, "z", 1, 5.0, namespace="n", new_namespace="m") is True
    assert set(agg.namespaces()) == {None, "m"}
    assert agg.replace_or_insert(7, "q", 7, namespace="absent", new_namespace="m") is False
    assert list(agg.iter(namespace="m")) == [Item(1, "z", 5.0), Item(7, "q", 0.0)]
    assert "absent" not in agg.namespaces()
    agg.check()


def test_clear_and_clear_all(make):
    agg = make(D)
    agg.insert(1, 1, 1.0, namespace="a")
    agg.insert(2, 2, 2.0, namespace="b")
    agg.clear()
    assert set(agg.namespaces()) == {"a", "b"} and len(agg) == 2
    assert agg.count() == 0
    agg.clear(namespace="missing")
    agg.clear("a")  # positional is allowed for clear
    assert agg.namespaces() == ["b"] and len(agg) == 1
    agg.insert(5, 5, namespace="a")
    agg.clear_all()
    assert agg.namespaces() == [] and len(agg) == 0 and agg.count(namespace="b") == 0
    agg.insert(1, 1)
    assert len(agg) == 1
    agg.check()


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------


def test_insert_many_delete_many(make):
    agg = make()
    keys, ids, values = zip(*D)
    agg.insert_many(list(keys), list(ids), list(values))
    assert list(agg.iter()) == items_at(0, 1, 2, 3, 4, 5)
    agg.insert_many(np.array([7.0, 8.0]), np.array(["x", "y"]), namespace="n")
    assert list(agg.iter(namespace="n")) == [Item(7.0, "x", 0.0), Item(8.0, "y", 0.0)]
    assert type(agg.at(0, namespace="n").key) is float and type(agg.at(0, namespace="n").id) is str
    agg.insert_many((k for k in [5, 6]), iter(["a", "a"]), np.array([1, 2], dtype=np.int32))
    assert agg.sum(lower=5) == 3.0
    agg.insert_many([], [])
    agg.insert_many([], [], namespace="empty")
    assert "empty" not in agg.namespaces()
    agg.delete_many([2, 2.0, 5], ["a", "c", "a"])
    assert list(agg.iter(upper=5)) == items_at(0, 2, 4, 5)
    agg.delete_many(np.array([7.0, 8.0]), ["x", "y"], namespace="n")
    assert "n" not in agg.namespaces()
    agg.delete_many([], [])
    agg.check()


def test_batch_reads_in_input_order(make):
    agg = make(D)
    agg.insert_many([1, 2, 3], ["a", "b", "c"], [10.0, 20.0, 30.0], namespace="n")
    queries = [
        {"namespace": "n"},
        {},
        {"eq": 2},
        {"namespace": "n", "lower": 2},
        {"namespace": "missing"},
        {"lower": Bound(2, id="b"), "upper": Bound(3, inclusive=False)},
        {"prefix": ()},
    ]
    assert agg.count_batch(queries) == [3, 6, 3, 2, 0, 2, 6]
    assert agg.sum_batch(queries) == [60.0, 63.0, 14.0, 50.0, 0.0, 12.0, 63.0]
    assert agg.count_batch([]) == [] and agg.sum_batch([]) == [] and agg.at_batch([]) == []
    at_queries = [
        {"offset": -1, "namespace": "n"},
        {"offset": 0},
        {"offset": 1, "eq": 2},
        {"offset": 0, "namespace": "n", "lower": Bound(1, inclusive=False)},
    ]
    assert agg.at_batch(at_queries) == [
        Item(3, "c", 30.0),
        D_SORTED[0],
        D_SORTED[2],
        Item(2, "b", 20.0),
    ]
    with pytest.raises(IndexError):
        agg.at_batch([{"offset": 0}, {"offset": 6}])


# ---------------------------------------------------------------------------
# Vectorised methods
# ---------------------------------------------------------------------------


def test_count_many_sum_many(make):
    agg = make(D)
    lowers = np.array([1, 2, 2, 3, 9, 4])
    uppers = np.array([4, 2, 3, 1, 10, 4])
    c = agg.count_many(lowers, uppers)
    assert c.dtype == np.int64 and c.tolist() == [6, 3, 4, 0, 0, 1]
    s = agg.sum_many(lowers, uppers)
    assert s.dtype == np.float64 and s.tolist() == [63.0, 14.0, 30.0, 0.0, 0.0, 32.0]
    c = agg.count_many(lowers, uppers, lower_inclusive=False)
    assert c.tolist() == [5, 0, 1, 0, 0, 0]
    c = agg.count_many(lowers, uppers, upper_inclusive=False)
    assert c.tolist() == [5, 0, 3, 0, 0, 0]
    s = agg.sum_many([1.5], [2.5], lower_inclusive=False, upper_inclusive=False)
    assert s.tolist() == [14.0]
    assert agg.count_many([1], [4], namespace="missing").tolist() == [0]
    assert agg.sum_many([1], [4], namespace="missing").tolist() == [0.0]
    empty = agg.count_many([], [])
    assert empty.dtype == np.int64 and len(empty) == 0
    assert len(agg.sum_many(np.array([]), np.array([]))) == 0


def test_count_many_numpy_elements_are_keys_like_any_other(make):
    """A numeric array's elements are numbers; a numpy scalar that is not a
    Python number, inside a list, is an unsupported key as it is for count()
    (the native slow path used to unwrap it silently)."""
    agg = make(D)
    for ns in (None, "missing"):
        assert agg.count_many(np.array([1, 2], dtype=np.float32), [4, 4], namespace=ns).tolist() == (
            [6, 5] if ns is None else [0, 0])
        with pytest.raises(TypeError, match="float32"):
            agg.count_many([0, 0, np.float32(1.5)], np.array([0.0, 0.0, 0.0]), namespace=ns)
        with pytest.raises(TypeError, match="float32"):
            agg.count(lower=np.float32(1.5), namespace=ns)
    general = make([("a", 1, 0.0), ("b", 2, 0.0)])
    assert general.count_many(np.array([1, 2], dtype=np.int64), ["a", "z"]).tolist() == [1, 2]


def test_at_many_index_of_many_to_arrays(make):
    agg = make(D)
    keys, ids, values = agg.at_many(np.array([0, -1, 2, 2]))
    assert list(keys) == [1, 4, 2, 2] and list(ids) == ["a", "b", "b", "b"]
    assert values.dtype == np.float64 and values.tolist() == [1.0, 32.0, 4.0, 4.0]
    keys, ids, values = agg.at_many([0, -1], eq=2)
    assert list(zip(keys, ids, values)) == [(2, "a", 2.0), (2, "c", 8.0)]
    with pytest.raises(IndexError):
        agg.at_many([0, 6])
    with pytest.raises(IndexError):
        agg.at_many([0], namespace="missing")
    keys, ids, values = agg.at_many([])
    assert len(keys) == len(ids) == len(values) == 0
    r = agg.index_of_many(np.array([0, 1, 2, 2.5, 4, 10]))
    assert r.dtype == np.int64 and r.tolist() == [0, 0, 1, 4, 5, 6]
    r = agg.index_of_many([0, 1, 2, 2.5, 4, 10], order="desc")
    assert r.tolist() == [6, 5, 2, 2, 0, 0]
    r = agg.index_of_many([1, 2, 3, 4], lower=2, upper=3)
    assert r.tolist() == [0, 0, 3, 4]
    r = agg.index_of_many([1, 2, 3, 4], order="desc", lower=2, upper=3)
    assert r.tolist() == [4, 1, 0, 0]
    assert agg.index_of_many([1, 2], namespace="missing").tolist() == [0, 0]
    keys, ids, values = agg.to_arrays(lower=Bound(2, id="b"), upper=3)
    assert list(zip(keys, ids, values)) == [(2, "b", 4.0), (2, "c", 8.0), (3, "a", 16.0)]
    keys, ids, values = agg.to_arrays(namespace="missing")
    assert len(keys) == 0 and values.dtype == np.float64


def test_to_arrays_preserves_key_types(make):
    agg = make()
    agg.insert((1, "x"), b"id", 1.0)
    agg.insert([2, "y"], None, 2.0)
    agg.insert(None, 1.5, 3.0)
    keys, ids, values = agg.to_arrays()
    assert [typed(k) for k in keys] == [typed(None), typed((1, "x")), typed((2, "y"))]
    assert [typed(i) for i in ids] == [typed(1.5), typed(b"id"), typed(None)]
    assert values.tolist() == [3.0, 1.0, 2.0]


def test_from_arrays(impl):
    agg = impl.from_arrays(
        np.array([3, 1, 2, 2]), ["c", "a", "b", "a"], np.array([3.0, 1.0, 2.5, 2.0])
    )
    agg.check()
    assert list(agg.iter()) == [Item(1, "a", 1.0), Item(2, "a", 2.0), Item(2, "b", 2.5), Item(3, "c", 3.0)]
    assert agg.namespaces() == [None]
    agg = impl.from_arrays([1, 1, 2], [0, 0, 0], namespaces=["x", "y", "x"], node_size=4)
    agg.check()
    assert set(agg.namespaces()) == {"x", "y"}
    assert list(agg.iter(namespace="x")) == [Item(1, 0, 0.0), Item(2, 0, 0.0)]
    assert list(agg.iter(namespace="y")) == [Item(1, 0, 0.0)]
    agg = impl.from_arrays([], [])
    assert len(agg) == 0 and agg.namespaces() == []
    agg.check()
    # A large bulk build agrees with item-by-item reads.
    n = 3000
    keys = np.arange(n)[::-1] % 97
    agg = impl.from_arrays(keys, np.arange(n), np.ones(n), node_size=4)
    agg.check()
    assert agg.count() == n and agg.sum() == float(n)
    assert agg.count(eq=5) == len([k for k in keys.tolist() if k == 5])
    assert agg.at(0) == (0, int(np.flatnonzero(keys == 0).min()), 1.0)


# ---------------------------------------------------------------------------
# Keys: types, order, numeric edge cases
# ---------------------------------------------------------------------------


def test_cross_type_order(make):
    ordered = [
        None,
        -INF,
        -(10**30),
        -1,
        False,
        0.5,
        True,
        2**53,
        2**53 + 1,
        2.0**53 + 2,
        10**30,
        INF,
        "",
        "a",
        "ab",
        "b",
        "\uffff",
        "\U0001f600",  # code point order (UTF-16 would put it before U+FFFF)
        b"",
        b"\x00",
        b"\x00\x00",
        b"\xff",
        (),
        (None,),
        (None, None),
        (1,),
        (1, 2),
        (2,),
        ("a",),
        (b"",),
        ((),),
        (((),),),
    ]
    agg = make()
    shuffled = list(enumerate(ordered))
    random.Random(7).shuffle(shuffled)
    for n, key in shuffled:
        agg.insert(key, n, float(n))
    agg.check()
    got = list(agg.iter())
    assert [typed(it.key) for it in got] == [typed(k) for k in ordered]
    assert [it.id for it in got] == list(range(len(ordered)))
    for n, key in enumerate(ordered):
        assert agg.index_of(key) == n
        assert agg.count(lower=Bound(key, inclusive=False)) == len(ordered) - n - 1
        assert agg.count(eq=key) == 1


def test_ids_mixed_types_order(make):
    agg = make()
    ids = [None, -1, 0.5, "a", b"a", (1,)]
    for i in reversed(ids):
        agg.insert("k", i)
    assert [typed(it.id) for it in agg.iter()] == [typed(i) for i in ids]
    assert agg.count(lower=Bound("k", id=0.5), upper=Bound("k", id=b"a")) == 3


def test_numeric_equal_keys_are_one_key_and_keep_their_type(make):
    agg = make()
    agg.insert(1, "a", 1.0)
    agg.insert(1.0, "b", 2.0)
    agg.insert(True, "c", 4.0)
    for key in (1, 1.0, True):
        with pytest.raises(DuplicateItemError):
            agg.insert(key, "a")
        with pytest.raises(DuplicateItemError):
            agg.insert(key, "b")
    assert [typed(it.key) for it in agg.iter()] == [typed(1), typed(1.0), typed(True)]
    for key in (1, 1.0, True, Bound(1.0)):
        assert agg.count(eq=key if not isinstance(key, Bound) else 1) == 3
        assert agg.count(lower=key) == 3
    assert agg.sum(eq=True) == 7.0
    assert agg.count(lower=Bound(True, inclusive=False)) == 0
    assert agg.index_of(1.0, id="b") == 1
    # ids too: 0, 0.0 and False are one id.
    agg.insert(5, 0)
    with pytest.raises(DuplicateItemError):
        agg.insert(5, 0.0)
    with pytest.raises(DuplicateItemError):
        agg.insert(5, False)
    agg.delete(5, False)
    assert agg.count(eq=5) == 0
    agg.delete(1.0, "a")
    agg.delete(True, "b")
    assert list(agg.iter()) == [Item(True, "c", 4.0)]
    assert type(agg.at(0).key) is bool
    agg.check()


def test_negative_zero_and_infinities(make):
    agg = make()
    agg.insert(-0.0, "a")
    with pytest.raises(DuplicateItemError):
        agg.insert(0.0, "a")
    with pytest.raises(DuplicateItemError):
        agg.insert(0, "a")
    assert agg.count(eq=0) == 1 and agg.count(eq=-0.0) == 1
    # -0.0 and 0.0 are one key, which reads back as 0.0 (as a float).
    assert typed(agg.at(0).key) == typed(0.0)
    agg.insert(0.0, "b")
    agg.insert(0, "c")
    agg.insert((-0.0, [-0.0]), -0.0)
    assert [typed(it.key) for it in agg.iter(upper=0)] == [typed(0.0), typed(0.0), typed(0)]
    assert typed(tuple(agg.max())) == typed(((0.0, (0.0,)), 0.0, 0.0))
    agg.delete((0, [0]), 0)
    agg.delete(0, "c")
    agg.insert(INF, "a")
    agg.insert(-INF, "a")
    agg.insert(10**400, "a")
    agg.insert(-(10**400), "a")
    agg.insert(1.7976931348623157e308, "a")
    assert [typed(it.key) for it in agg.iter()] == [typed(k) for k in [
        -INF, -(10**400), 0.0, 0.0, 1.7976931348623157e308, 10**400, INF
    ]]
    assert agg.count(lower=Bound(-INF, inclusive=False), upper=Bound(INF, inclusive=False)) == 5
    assert agg.count(eq=INF) == 1 and agg.count(eq=-INF) == 1
    assert agg.index_of(INF) == 6 and agg.index_of(INF, order="desc") == 0
    assert agg.count(lower=1.7976931348623157e308) == 3
    assert agg.count(lower=Bound(10**400, inclusive=False)) == 1
    agg.check()


def test_big_ints_beyond_float_precision(make):
    agg = make()
    for k in (2**53 + 1, 2**53, 2**63 - 1, 2**63, 2**64 + 1, -(2**63), -(2**63) - 1):
        agg.insert(k, "i")
    with pytest.raises(DuplicateItemError):
        agg.insert(2.0**53, "i")
    with pytest.raises(DuplicateItemError):
        agg.insert(2.0**63, "i")
    agg.insert(2.0**53 + 2, "i")
    agg.insert(float(2**64), "i")
    got = [it.key for it in agg.iter()]
    assert got == [-(2**63) - 1, -(2**63), 2**53, 2**53 + 1, 2.0**53 + 2, 2**63 - 1, 2**63, float(2**64), 2**64 + 1]
    assert [type(k) for k in got].count(float) == 2
    assert agg.count(lower=Bound(2**53, inclusive=False), upper=Bound(2.0**53 + 2, inclusive=False)) == 1
    assert agg.count(eq=2**64) == 1 and agg.at(0, eq=2**64).key == float(2**64)


def test_ints_of_any_size(make):
    # The contract says "int (any size)": far beyond DBL_MAX too.
    huge = 10**1000
    agg = make([(huge, "a", 1.0), (-huge, "b", 2.0), (INF, "c", 4.0), (-INF, "d", 8.0), (10**400, "e", 16.0)])
    assert [it.key for it in agg.iter()] == [-INF, -huge, 10**400, huge, INF]
    assert agg.count(lower=huge) == 2 and agg.count(upper=Bound(huge, inclusive=False)) == 3
    assert agg.count(lower=huge + 1) == 1 and agg.count(eq=huge) == 1
    assert agg.index_of(2**5000) == 4 and agg.index_of(-(2**5000), order="desc") == 4
    agg.delete(huge, "a")
    assert agg.sum() == 30.0
    agg.check()


def test_huge_int_bounds_on_float_keys(make):
    # Regression (native): float keys with int ids take the fixed-width fast
    # path; bounds that are ints beyond DBL_MAX must still be placed exactly.
    agg = make([(-INF, 0, 1.0), (-1.5, 1, 2.0), (1e308, 2, 4.0), (INF, 3, 8.0)])
    assert agg.count(lower=10**400) == 1
    assert agg.count(upper=10**400) == 3
    assert agg.count(lower=-(10**400)) == 3
    assert agg.count(upper=-(10**400)) == 1
    assert agg.count(lower=Bound(10**400, inclusive=False), upper=Bound(INF, inclusive=False)) == 0
    assert agg.count(lower=2**1024) == 1 and agg.count(upper=-(2**1024)) == 1
    assert agg.count(lower=int(1e308)) == 2 and agg.count(lower=int(1e308) + 1) == 1
    assert agg.count(upper=Bound(int(1e308), inclusive=False)) == 2
    assert agg.index_of(10**400) == 3 and agg.index_of(10**400, order="desc") == 1
    assert agg.sum(lower=-(10**400), upper=10**400) == 6.0
    # Int keys within 2**53 (the other fast path) against ints just outside.
    agg = make([(0, 0, 1.0), (2**53, 1, 2.0), (-(2**53), 2, 4.0)])
    assert agg.count(lower=2**53 + 1) == 0 and agg.count(upper=2**53 + 1) == 3
    assert agg.count(lower=Bound(2**53 - 1, inclusive=False)) == 1
    assert agg.count(upper=-(2**53) - 1) == 0 and agg.count(lower=-(2**53) - 1) == 3
    assert agg.count(lower=0.5, upper=Bound(2**53, inclusive=False)) == 0
    assert agg.count(eq=2**53 + 1) == 0 and agg.count(eq=2.0**53) == 1


def test_lists_become_tuples(make):
    agg = make()
    agg.insert([1, [2, "x"]], ["id"], 1.0)
    with pytest.raises(DuplicateItemError):
        agg.insert((1, (2, "x")), ("id",))
    item = agg.at(0)
    assert typed(item.key) == typed((1, (2, "x"))) and typed(item.id) == typed(("id",))
    assert agg.count(eq=[1, [2, "x"]]) == 1 and agg.count(eq=(1, (2, "x"))) == 1
    assert agg.count(prefix=[1]) == 1
    agg.delete((1, [2, "x"]), ["id"])
    assert len(agg) == 0


def test_deep_keys_and_unicode(make):
    agg = make()
    deep = "leaf"
    for _ in range(32):  # 32 nested tuples is the maximum depth
        deep = (deep,)
    agg.insert(deep, 1)
    agg.insert("\x00", "\x00")
    agg.insert("é", "ü\U0010ffff")
    agg.insert(b"\x00\xff", b"")
    assert agg.at(-1).key == deep
    assert agg.count(eq=deep) == 1
    assert agg.count(prefix=deep[:0]) == 4
    assert [it.key for it in agg.iter(upper=Bound("é"))] == ["\x00", "é"]
    agg.check()


# ---------------------------------------------------------------------------
# Sums
# ---------------------------------------------------------------------------


def test_sums_match_fsum(make):
    rng = random.Random(3)
    agg = make()
    values = {}
    for k in range(300):
        v = rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-8, 8)
        agg.insert(k, 0, v)
        values[k] = v
    for _ in range(60):
        a, b = sorted(rng.sample(range(-5, 305), 2))
        expect = math.fsum(v for k, v in values.items() if a <= k <= b)
        got = agg.sum(lower=a, upper=b)
        assert math.isclose(got, expect, rel_tol=1e-12, abs_tol=1e-300)
    assert agg.sum(lower=400) == 0.0
    assert agg.sum(lower=5, upper=4) == 0.0


def test_sums_exact_for_integers_and_do_not_drift(make):
    agg = make()
    agg.insert(0, "big", 1e16)
    for k in range(1, 101):
        agg.insert(k, "small", 1.0)
    agg.insert(101, "neg", -1e16)
    assert agg.sum() == 100.0  # fsum-exact despite cancellation
    assert agg.sum(lower=1, upper=100) == 100.0
    assert agg.sum(upper=50) == 1e16 + 50
    agg.delete(0, "big")
    agg.delete(101, "neg")
    assert agg.sum() == 100.0
    for k in range(1, 101, 2):
        agg.upsert(k, "small", 2**40)
    assert agg.sum() == 50 * 2**40 + 50
    for k in range(1, 101):
        agg.delete(k, "small")
    assert agg.sum() == 0.0
    # Sums depend only on what is present, not on the history.
    agg.insert(1, "x", 0.1)
    for _ in range(200):
        agg.insert(2, "y", 1e300)
        agg.delete(2, "y")
    assert agg.sum() == 0.1


# ---------------------------------------------------------------------------
# Namespaces, len, repr, nbytes, pickling
# ---------------------------------------------------------------------------


def test_namespaces_are_independent(make):
    agg = make(D)
    agg.insert(2, "b", 100.0, namespace="n")  # same (key, id) as in None: fine
    agg.insert(2, "b", 1.0, namespace=("user", 7))
    agg.insert(2, "b", 1.0, namespace=frozenset({1}))
    assert len(agg) == 9
    assert agg.count() == 6 and agg.count(namespace="n") == 1
    assert agg.sum(namespace="n") == 100.0
    assert set(agg.namespaces()) == {None, "n", ("user", 7), frozenset({1})}
    agg.insert(5, "x", namespace=1)
    agg.insert(6, "x", namespace=1.0)
    agg.insert(7, "x", namespace=True)
    assert agg.count(namespace=1) == 3 and agg.count(namespace=True) == 3
    assert len([ns for ns in agg.namespaces() if ns == 1]) == 1
    for k in (5, 6, 7):
        agg.delete(k, "x", namespace=1.0)
    assert 1 not in agg.namespaces()
    agg.delete(2, "b", namespace="n")
    assert "n" not in agg.namespaces() and agg.count(namespace="n") == 0
    assert len(agg) == 8
    agg.check()


def test_len_and_repr(make):
    agg = make(D)
    agg.insert(1, "z", namespace="n")
    assert len(agg) == 7
    r = repr(agg)
    assert isinstance(r, str) and "Aggregate" in r and "7" in r
    agg.clear_all()
    assert len(agg) == 0 and "Aggregate" in repr(agg)


def test_nbytes(make):
    agg = make()
    empty = agg.nbytes
    assert isinstance(empty, int) and empty >= 0
    agg.insert_many(list(range(2000)), list(range(2000)), namespace="n")
    full = agg.nbytes
    assert full > empty
    agg.clear_all()
    assert agg.nbytes < full


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_round_trip(make, protocol):
    agg = make(D)
    agg.insert(1.0, True, 0.25, namespace=("ns", 1))
    agg.insert(True, b"x", -0.5, namespace=("ns", 1))
    agg.insert(-0.0, (1, "a"), 1e300, namespace="z")
    agg.insert(10**40, None, 0.0, namespace="z")
    agg.insert(("t", b"b", None), "\U0001f600", 3.0, namespace="z")
    for key in range(200):
        agg.insert(key, "bulk", float(key), namespace="big")
    clone = pickle.loads(pickle.dumps(agg, protocol=protocol))
    assert type(clone) is type(agg)
    clone.check()
    assert len(clone) == len(agg)
    assert set(clone.namespaces()) == set(agg.namespaces())
    for ns in agg.namespaces():
        assert [(typed(a.key), typed(a.id), a.value) for a in clone.iter(namespace=ns)] == [
            (typed(a.key), typed(a.id), a.value) for a in agg.iter(namespace=ns)
        ]
        assert clone.sum(namespace=ns) == agg.sum(namespace=ns)
    # Independent copies.
    clone.insert(99, "new")
    clone.delete(2, "b")
    assert agg.count() == 6 and clone.count() == 6
    assert agg.count(eq=99) == 0
    # Empty round trip.
    empty = pickle.loads(pickle.dumps(make(), protocol=protocol))
    empty.check()
    assert len(empty) == 0
    # Cursors stay valid across a round trip of the same implementation.
    page = agg.paginate(page_size=2)
    assert clone.paginate(cursor=page.cursor, page_size=2).items == items_at(3, 4)


# ---------------------------------------------------------------------------
# Property tests against a brute-force model over plain int tuples
# ---------------------------------------------------------------------------

small_items = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 4), st.integers(-1000, 1000)),
    max_size=60,
    unique_by=lambda t: (t[0], t[1]),
)
bound_st = st.one_of(
    st.none(),
    st.tuples(st.integers(-1, 13), st.booleans(), st.one_of(st.none(), st.integers(-1, 5))),
)


def _lower_ok(x, b):
    if b is None:
        return True
    k, inc, i = b
    ref = x[0] if i is None else x[:2]
    pivot = k if i is None else (k, i)
    return ref >= pivot if inc else ref > pivot


def _upper_ok(x, b):
    if b is None:
        return True
    k, inc, i = b
    ref = x[0] if i is None else x[:2]
    pivot = k if i is None else (k, i)
    return ref <= pivot if inc else ref < pivot


def _as_bound(b):
    return None if b is None else Bound(b[0], inclusive=b[1], id=b[2])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    items=small_items,
    lower=bound_st,
    upper=bound_st,
    probe=st.tuples(st.integers(-1, 13), st.one_of(st.none(), st.integers(-1, 5))),
    data=st.data(),
)
def test_reads_against_brute_force(make, items, lower, upper, probe, data):
    agg = make()
    if items:
        keys, ids, values = zip(*items)
        agg.insert_many(list(keys), list(ids), list(values))
    model = sorted((k, i, float(v)) for k, i, v in items)
    rng = [x for x in model if _lower_ok(x, lower) and _upper_ok(x, upper)]
    kw = {"lower": _as_bound(lower), "upper": _as_bound(upper)}
    assert agg.count(**kw) == len(rng)
    assert agg.sum(**kw) == sum(x[2] for x in rng)
    assert list(agg.iter(**kw)) == rng
    assert agg.min(**kw) == (rng[0] if rng else None)
    assert agg.max(**kw) == (rng[-1] if rng else None)
    if rng:
        off = data.draw(st.integers(-len(rng), len(rng) - 1))
        assert agg.at(off, **kw) == rng[off]
    pk, pid = probe
    if pid is None:
        asc = sum(1 for x in rng if x[0] < pk)
        desc = sum(1 for x in rng if x[0] > pk)
    else:
        asc = sum(1 for x in rng if x[:2] < (pk, pid))
        desc = sum(1 for x in rng if x[:2] > (pk, pid))
    assert agg.index_of(pk, id=pid, **kw) == asc
    assert agg.index_of(pk, id=pid, order="desc", **kw) == desc
    assert agg.count(eq=pk) == sum(1 for x in model if x[0] == pk)
    size = data.draw(st.integers(1, 7))
    assert walk(agg, page_size=size, **kw) == rng
    assert walk(agg, page_size=size, order="desc", **kw) == rng[::-1]
