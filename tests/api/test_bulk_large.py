"""Large batches: the two-thread paths of insert_many / delete_many.

The C core runs the check and the leaf rewrite of a batch on two threads
from 16,384 keys (and the sort from 65,536), and cuts a batch delete's
compaction into pieces when the tree has at least three levels
(``core/batch_insert.c`` section 13).  The other Python tests use small batches, so
this file is where the extension - including the AddressSanitizer build that
CI runs the suite against - goes through those paths: batches of 20,000 to
70,000 items into trees of up to 200,000 at node sizes 16 and 64, on two
threads and (``AGGTREE_THREADS=1``, read at every call) on one.  Every
result is compared with a numpy model; failing batches must leave the
aggregate exactly as it was.
"""

from __future__ import annotations

import numpy as np
import pytest

from aggtree import DuplicateItemError, MissingItemError
from conftest import load_impl

N = 200_000


def _model_arrays(keys, ids, values):
    """The model: (key, id)-sorted arrays."""
    order = np.lexsort((ids, keys))
    return keys[order], ids[order], values[order]


def _assert_same(agg, keys, ids, values):
    agg.check()
    k, i, v = agg.to_arrays()
    mk, mi, mv = _model_arrays(keys, ids, values)
    assert len(agg) == len(mk)
    np.testing.assert_array_equal(k, mk)
    np.testing.assert_array_equal(i, mi)
    np.testing.assert_array_equal(v, mv)
    # sums over a few ranges, against the model's
    rng = np.random.default_rng(len(mk))
    lo = np.sort(rng.random(50))
    hi = lo + rng.random(50) * 0.2
    got = agg.sum_many(lo, hi)
    cum = np.concatenate(([0.0], np.cumsum(mv)))
    a = np.searchsorted(mk, lo, "left")
    b = np.searchsorted(mk, hi, "right")
    np.testing.assert_allclose(got, cum[b] - cum[a], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(agg.count_many(lo, hi), b - a)


def _snapshot(agg):
    k, i, v = agg.to_arrays()
    return k.copy(), i.copy(), v.copy(), agg.nbytes


def _same_snapshot(a, b):
    assert a[3] == b[3]
    for x, y in zip(a[:3], b[:3]):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(params=["two", "one"])
def threads(request, monkeypatch):
    """Both thread settings of the core (the variable is read per call)."""
    if request.param == "one":
        monkeypatch.setenv("AGGTREE_THREADS", "1")
    else:
        monkeypatch.delenv("AGGTREE_THREADS", raising=False)
    return request.param


@pytest.mark.parametrize("node_size", [16, 64])
def test_large_insert_and_delete_batches(threads, node_size):
    Agg = load_impl("native")
    rng = np.random.default_rng(node_size)
    keys = rng.random(N)
    ids = np.arange(N, dtype=np.int64)
    values = rng.integers(-1000, 1000, N).astype(np.float64) / 8
    agg = Agg.from_arrays(keys, ids, values, node_size=node_size)
    _assert_same(agg, keys, ids, values)

    # a batch insert of 40,000 new items (random order)
    m = 40_000
    nk = rng.random(m)
    ni = np.arange(N, N + m, dtype=np.int64)
    nv = rng.integers(-1000, 1000, m).astype(np.float64) / 8
    agg.insert_many(nk, ni, nv)
    keys, ids, values = (np.concatenate((keys, nk)), np.concatenate((ids, ni)),
                         np.concatenate((values, nv)))
    _assert_same(agg, keys, ids, values)

    # a batch holding one present item, early, in the middle or last in
    # key order: nothing changes, node for node (nbytes included)
    before = _snapshot(agg)
    for where in (0.05, 0.5, 0.999):
        bk = rng.random(30_000)
        bi = np.arange(10 * N, 10 * N + 30_000, dtype=np.int64)
        j = int(np.argsort(bk)[int(where * (len(bk) - 1))])
        p = int(rng.integers(0, N))
        bk[j], bi[j] = keys[p], ids[p]
        with pytest.raises(DuplicateItemError):
            agg.insert_many(bk, bi, np.ones(len(bk)))
        _same_snapshot(_snapshot(agg), before)
    agg.check()

    # a batch delete of 30,000 random present items
    pick = rng.choice(len(keys), 30_000, replace=False)
    agg.delete_many(keys[pick], ids[pick])
    keep = np.ones(len(keys), bool)
    keep[pick] = False
    keys, ids, values = keys[keep], ids[keep], values[keep]
    _assert_same(agg, keys, ids, values)

    # a batch delete with one absent item, early or late: nothing changes
    before = _snapshot(agg)
    for where in (0.05, 0.95):
        pick = rng.choice(len(keys), 20_000, replace=False)
        dk, di = keys[pick].copy(), ids[pick].copy()
        j = int(np.argsort(dk)[int(where * (len(dk) - 1))])
        di[j] = -1                   # no item has id -1
        with pytest.raises(MissingItemError):
            agg.delete_many(dk, di)
        _same_snapshot(_snapshot(agg), before)

    # a contiguous range of 70,000 (every leaf under it empties, so the
    # repairs merge and even out leaves and their parents)
    order = np.lexsort((ids, keys))
    a = len(order) // 4
    rng_pick = order[a:a + 70_000]
    agg.delete_many(keys[rng_pick], ids[rng_pick])
    keep = np.ones(len(keys), bool)
    keep[rng_pick] = False
    keys, ids, values = keys[keep], ids[keep], values[keep]
    _assert_same(agg, keys, ids, values)

    # everything else, in one batch: the tree is empty afterwards
    agg.delete_many(keys, ids)
    assert len(agg) == 0
    assert agg.nbytes == 0
    agg.check()


@pytest.mark.parametrize("slack", [0, 3, 8])
def test_batches_into_bulk_builds_of_any_fill(threads, slack):
    """Bulk builds that leave `slack` free slots per leaf (the core's test
    hook; 0 = packed full, 8 = the default rule) hold the same items, cost the
    memory their fill says, and take large batches like any tree."""
    from aggtree._core import Aggregate, _debug_build_slack, _tree_info

    rng = np.random.default_rng(16 + slack)
    n, m = 100_000, 20_000
    keys, ids, vals = rng.random(n), np.arange(n, dtype=np.int64), rng.random(n)
    old = _debug_build_slack(slack)
    try:
        agg = Aggregate.from_arrays(keys, ids, vals, node_size=64)
        loaded = Aggregate.loads(agg.dumps())
    finally:
        _debug_build_slack(old)
    assert old == -1
    # leaves of 64 - slack items: 24 + 24 * 64 bytes each, plus ~1 byte per item above
    per_item = _tree_info(agg)[3] / n
    assert (24 + 24 * 64) / (64 - slack) < per_item < (24 + 24 * 64) / (64 - slack) + 1.5
    assert _tree_info(loaded)[3] == _tree_info(agg)[3]
    for a in (agg, loaded):
        a.check()
        k2, i2, v2 = rng.random(m), np.arange(n, n + m, dtype=np.int64), rng.random(m)
        a.insert_many(k2, i2, v2)
        a.check()
        mk, mi, mv = _model_arrays(np.concatenate([keys, k2]), np.concatenate([ids, i2]),
                                   np.concatenate([vals, v2]))
        gk, gi, gv = a.to_arrays()
        assert np.array_equal(gk, mk) and np.array_equal(gi, mi) and np.array_equal(gv, mv)


def test_batches_over_a_mebibyte_of_scratch_match_numpy():
    """A batch of 60,000 items needs 1.44 MB of keys and values, which the
    Python layer lays on huge pages (_numpy.pxi, _scratch: from 1 MiB, an
    aligned slice of a larger array): from_arrays, insert_many and
    delete_many through that path give exactly the numpy model's items."""
    Agg = load_impl("native")
    rng = np.random.default_rng(11)
    n, m = 100_000, 60_000
    keys, ids = rng.random(n + m), np.arange(n + m, dtype=np.int64)
    values = rng.integers(-1000, 1000, n + m).astype(np.float64) / 8
    agg = Agg.from_arrays(keys[:n], ids[:n], values[:n])
    agg.insert_many(keys[n:], ids[n:], values[n:])
    _assert_same(agg, keys, ids, values)
    gone = rng.permutation(n + m)[:m]
    agg.delete_many(keys[gone], ids[gone])
    keep = np.setdiff1d(np.arange(n + m), gone)
    _assert_same(agg, keys[keep], ids[keep], values[keep])
    big = Agg.from_arrays(keys, ids, values)            # 160,000 items: 3.84 MB of scratch
    _assert_same(big, keys, ids, values)
    big.check()
