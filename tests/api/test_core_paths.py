"""Core paths that the rest of the suite reached without checking: tests added for the mutation check.

Each test here exists because a planted bug (tests/mutation/mutants.py) passed
the other tests; the mutant it catches is named in its docstring.  They target
the parts of the C core's summaries that ordinary data never exercises:

- sums whose entries are not plain doubles: values of 2^60 cancelling each
  other next to small integers make every internal entry a double-double with
  a nonzero low part (the range sum must still be exact, and check() must
  accept every entry after inserts that move items between leaves);
- entries of mixed exactness in one node (a few leaves hold 1e200 next to
  1e-200, whose sums are not double-doubles), moved around by splits;
- the error a large two-thread batch delete reports: it must name the absent
  item, also when it lies in the second half of the batch.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggtree import MissingItemError
from conftest import load_impl

BIG = 2.0 ** 60


def _cancelling_values(rng, n):
    """Values +-2^60 and small integers; every range sum is an exact integer
    whenever the big values in it cancel, and nonzero low parts are everywhere."""
    small = rng.integers(-3, 4, n).astype(np.float64)
    big = np.where(rng.random(n) < 0.5, BIG, -BIG)
    return np.where(rng.random(n) < 0.3, big, small)


def _exact_range_sums(keys_sorted, vals_sorted, lo, hi):
    """Exact sums of vals over [lo, hi] (inclusive key bounds) via Python ints
    (every value is an integer below 2^61)."""
    out = []
    iv = [int(v) for v in vals_sorted]
    cum = [0]
    for v in iv:
        cum.append(cum[-1] + v)
    a = np.searchsorted(keys_sorted, lo, "left")
    b = np.searchsorted(keys_sorted, hi, "right")
    for x, y in zip(a, b):
        out.append(cum[y] - cum[x])
    return out


@pytest.mark.parametrize("node_size", [4, 16])
def test_sum_of_entries_with_low_parts_is_exact(node_size):
    """Range sums add whole children's (hi, lo) entries: the low parts count.

    Catches M15 (sum drops the entries' low parts): with values of +-2^60 next
    to small integers each entry's low part is nonzero, and the range sums
    below are exact integers far below 2^53 only if every low part is added.
    """
    Agg = load_impl("native")
    rng = np.random.default_rng(7)
    n = 6000
    keys = rng.permutation(n).astype(np.float64)
    ids = np.zeros(n, dtype=np.int64)
    vals = _cancelling_values(rng, n)
    agg = Agg.from_arrays(keys, ids, vals, node_size=node_size)
    agg.check()
    order = np.argsort(keys)
    ks, vs = keys[order], vals[order]
    lo = rng.integers(0, n, 400).astype(np.float64)
    hi = lo + rng.integers(0, n // 2, 400)
    want = _exact_range_sums(ks, vs, lo, hi)
    got = agg.sum_many(lo, hi)
    for g, w in zip(got, want):
        assert g == float(w)          # float(w) is the correctly rounded sum
    for x, y, w in list(zip(lo, hi, want))[:50]:
        assert agg.sum(lower=float(x), upper=float(y)) == float(w)


@pytest.mark.parametrize("node_size", [4, 8])
def test_inserts_that_move_items_keep_exact_entries(node_size):
    """Single inserts into full leaves move items into a sibling (overflow) or
    split 2-to-3; the parent entries change by the moved values' exact sum.

    Catches M06 (the moved values' low part dropped from the entries): with
    cancelling +-2^60 values the moved sums have low parts, and check()
    verifies every entry flagged exact against an exact accumulator.
    """
    Agg = load_impl("native")
    rng = np.random.default_rng(node_size)
    n = 3000
    keys = rng.permutation(n).astype(np.float64) * 2.0     # even keys first
    vals = _cancelling_values(rng, n)
    agg = Agg.from_arrays(keys, np.zeros(n, dtype=np.int64), vals, node_size=node_size)
    model = dict(zip(keys.tolist(), vals.tolist()))
    new = rng.permutation(n).astype(np.float64) * 2.0 + 1.0  # odd keys: between
    newv = _cancelling_values(rng, n)
    for i, (k, v) in enumerate(zip(new.tolist(), newv.tolist())):
        agg.insert(k, 0, v)
        model[k] = v
        if i % 250 == 0:
            agg.check()
    agg.check()
    ks = np.array(sorted(model))
    vs = np.array([model[k] for k in ks])
    lo = rng.integers(0, 2 * n, 200).astype(np.float64)
    hi = lo + rng.integers(0, n, 200)
    want = _exact_range_sums(ks, vs, lo, hi)
    assert [float(w) for w in want] == agg.sum_many(lo, hi).tolist()


@pytest.mark.parametrize("node_size", [4, 8])
def test_mixed_exact_and_inexact_entries_survive_splits(node_size):
    """Internal nodes whose entries differ in exactness, shifted by splits.

    Catches M04 (inner_shift moves every entry array but the exact flags):
    a few leaves hold 1e200 next to 1e-200 (a sum no double-double holds, so
    their entries are inexact) among ordinary ones; inserting entries into
    those internal nodes shifts the flags with the entries, and check()
    verifies an exact-flagged entry exactly and an inexact one bit for bit.
    """
    Agg = load_impl("native")
    rng = np.random.default_rng(100 + node_size)
    n = 4000
    keys = np.arange(n, dtype=np.float64) * 4.0
    vals = rng.integers(-50, 50, n).astype(np.float64)
    wide = rng.choice(n - 1, n // 40, replace=False)
    vals[wide] = 1e200
    vals[wide + 1] = 1e-200
    agg = Agg.from_arrays(keys, np.zeros(n, dtype=np.int64), vals, node_size=node_size)
    agg.check()
    for i, k in enumerate(rng.permutation(n).tolist()):
        agg.insert(float(k) * 4.0 + 1.0 + (i % 3), 1, float(i % 7))
        if i % 200 == 0:
            agg.check()
    agg.check()
    # and deletes, whose repairs merge and even out those nodes
    for i, k in enumerate(rng.permutation(n)[: n // 2].tolist()):
        agg.delete(float(k) * 4.0, 0)
        if i % 200 == 0:
            agg.check()
    agg.check()


def _model_counts(keys_sorted, lo, hi, lo_inc, hi_inc):
    a = np.searchsorted(keys_sorted, lo, "left" if lo_inc else "right")
    b = np.searchsorted(keys_sorted, hi, "right" if hi_inc else "left")
    return np.maximum(b - a, 0)


def test_single_writes_and_reads_in_large_subtrees():
    """Single inserts and deletes into subtrees of tens of thousands of items,
    then exact counts, ranks and sums against a numpy model.

    Catches M07 (plain insert adds 1 to the sums of subtrees over 4096
    items: check() verifies every entry) and the rank bugs that only large
    nodes show: M10 (a count prefix taken from the far end of a node holding
    over 4096 items is one short) and M11 (rank2's second path takes the
    first path's node total).  Node size 8 on 10^5 items: five levels, the
    root's children hold ~25,000 items each.
    """
    Agg = load_impl("native")
    rng = np.random.default_rng(2024)
    n = 100_000
    keys = rng.integers(0, 4 * n, n).astype(np.float64)     # duplicate keys, distinct ids
    ids = np.arange(n, dtype=np.int64)
    vals = rng.integers(-100, 100, n).astype(np.float64)
    agg = Agg.from_arrays(keys, ids, vals, node_size=8)
    m = 3000
    nk = rng.integers(0, 4 * n, m).astype(np.float64)
    ni = np.arange(n, n + m, dtype=np.int64)
    nv = rng.integers(-100, 100, m).astype(np.float64)
    for k, i, v in zip(nk.tolist(), ni.tolist(), nv.tolist()):
        agg.insert(k, i, v)
    keys, ids, vals = np.concatenate((keys, nk)), np.concatenate((ids, ni)), np.concatenate((vals, nv))
    gone = rng.choice(len(keys), m, replace=False)
    for p in gone.tolist():
        agg.delete(float(keys[p]), int(ids[p]))
    keep = np.ones(len(keys), bool)
    keep[gone] = False
    keys, ids, vals = keys[keep], ids[keep], vals[keep]
    agg.check()

    order = np.lexsort((ids, keys))
    ks, vs = keys[order], vals[order]
    assert len(agg) == len(ks)
    q = 3000
    lo = rng.integers(-10, 4 * n + 10, q).astype(np.float64)
    hi = lo + rng.integers(0, 4 * n, q)
    cum = np.concatenate(([0.0], np.cumsum(vs)))
    for lo_inc in (True, False):
        for hi_inc in (True, False):
            want = _model_counts(ks, lo, hi, lo_inc, hi_inc)
            got = agg.count_many(lo, hi, lower_inclusive=lo_inc, upper_inclusive=hi_inc)
            np.testing.assert_array_equal(got, want)
    a = np.searchsorted(ks, lo, "left")
    b = np.maximum(np.searchsorted(ks, hi, "right"), a)
    np.testing.assert_array_equal(agg.sum_many(lo, hi), cum[b] - cum[a])
    np.testing.assert_array_equal(agg.index_of_many(lo), a)
    for x, y in list(zip(lo.tolist(), hi.tolist()))[:300]:
        w = int(_model_counts(ks, np.array([x]), np.array([y]), True, True)[0])
        assert agg.count(lower=x, upper=y) == w
    offs = rng.integers(0, len(ks), 300)
    for o in offs.tolist():
        assert agg.at(o).key == ks[o]


@pytest.mark.parametrize("where", [0.1, 0.75, 0.99])
def test_large_delete_batch_names_the_absent_item(where, monkeypatch):
    """A two-thread batch delete with one absent item raises MissingItemError
    naming that item (the check runs in two halves; the second half's index
    must be offset by the cut), and changes nothing.

    Catches M26 (the second half's bad index reported relative to the half:
    the error named a present item).
    """
    monkeypatch.delenv("AGGTREE_THREADS", raising=False)
    Agg = load_impl("native")
    rng = np.random.default_rng(int(where * 100))
    n = 120_000
    keys = rng.random(n)
    ids = np.arange(n, dtype=np.int64)
    agg = Agg.from_arrays(keys, ids, np.ones(n), node_size=16)
    pick = rng.choice(n, 40_000, replace=False)
    dk, di = keys[pick].copy(), ids[pick].copy()
    j = int(np.argsort(dk)[int(where * (len(dk) - 1))])
    di[j] = -5                       # no item has id -5
    with pytest.raises(MissingItemError) as exc:
        agg.delete_many(dk, di)
    msg = str(exc.value)
    assert f"key={float(dk[j])!r}" in msg and "id=-5" in msg, msg
    assert len(agg) == n
    agg.check()


@pytest.mark.parametrize("node_size", [8, 16])
def test_concentrated_batch_into_half_full_nodes(node_size, monkeypatch):
    """A batch insert that puts thousands of items under one path node whose
    parent has room: the path node's gain is passed up as a count delta (no
    recomputation), and check() verifies every count.

    Catches M22 (a path node that gained more than 4096 items passed one
    fewer up): after a batch delete of half the items the nodes have room,
    so the gains reach the entries above through that delta.
    """
    monkeypatch.delenv("AGGTREE_THREADS", raising=False)
    Agg = load_impl("native")
    rng = np.random.default_rng(300 + node_size)
    n = 120_000
    keys = np.arange(n, dtype=np.float64)
    ids = np.zeros(n, dtype=np.int64)
    agg = Agg.from_arrays(keys, ids, np.ones(n), node_size=node_size)
    gone = rng.choice(n, n // 2, replace=False)
    agg.delete_many(keys[gone], ids[gone])
    agg.check()
    total = n - n // 2
    for start in (1000.0, 60_000.0, 110_000.0):
        m = 9000
        nk = start + (np.arange(m, dtype=np.float64) + 0.5) / m * 40.0   # 9000 keys in 40 slots
        ni = np.arange(m, dtype=np.int64) + int(start)
        agg.insert_many(nk, ni, np.ones(m))
        total += m
        agg.check()
        assert len(agg) == total
        assert agg.count() == total
        assert agg.count(lower=start, upper=start + 40.0) == m + int(
            np.count_nonzero(np.isin(np.arange(int(start), int(start) + 41), keys[np.setdiff1d(np.arange(n), gone)])))
