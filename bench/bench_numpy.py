"""Bulk (numpy) benchmarks: vectorised queries, bulk build, bulk insert.

``count_many`` / ``sum_many``
    ``bulk`` random ranges (10^6 in a full run) over n items, against the two
    ``np.searchsorted`` calls (plus a prefix-sum gather for sums) on a static
    sorted copy of the keys -- the read-only lower bound -- and against the
    per-query Python loops a user of ``bisect`` or sortedcontainers would write.
``from_arrays``
    n unsorted items (keys, ids, values arrays) against ``np.lexsort`` of the
    same keys and ids (the sort a user would do anyway), building a
    SortedKeyList, the reference, and loading an indexed SQLite table.
``insert_many``
    n // 10 new random items into n (10^5 into 10^6 in a full run), against
    the same items inserted one by one through ``insert`` from Python lists,
    ``SortedKeyList.update`` and the reference.
``delete_many``
    the reverse: n // 10 random items (inserted untimed before each round)
    deleted from n + n // 10, against the one-by-one ``delete`` loop,
    ``SortedKeyList.remove`` per item and the reference.

See conftest.py for the data, the baselines and the timing method.
"""

from __future__ import annotations

import bisect

import numpy as np
import pytest

from benchkit import SLOW_N, Agg, RefAgg, SqliteTable, make_skl, rng_for  # bench/conftest.py

ss = np.searchsorted


def _bulk_ranges(d, m, purpose):
    """m random ranges (lo <= hi, uniform in [0, 1)) as two float64 arrays."""
    q = np.sort(rng_for(purpose, m, d.n).random((m, 2)), axis=1)
    return np.ascontiguousarray(q[:, 0]), np.ascontiguousarray(q[:, 1])


# ---------------------------------------------------------------------------
# count_many / sum_many
# ---------------------------------------------------------------------------

COUNT_MANY_IMPLS = ["aggtree", "numpy", "bisect", "sortedcontainers", "reference"]
SUM_MANY_IMPLS = ["aggtree", "numpy", "bisect", "reference"]  # sortedcontainers: no prefix sums


def many_fn(op, impl, s, d, lows, highs):
    if impl in ("aggtree", "reference"):
        f = s.count_many if op == "count_many" else s.sum_many
        return lambda: f(lows, highs)
    if impl == "numpy":
        sk, cum = d.sk, d.cum
        if op == "count_many":
            return lambda: ss(sk, highs, "right") - ss(sk, lows, "left")
        return lambda: cum[ss(sk, highs, "right")] - cum[ss(sk, lows, "left")]
    lo_l, hi_l = lows.tolist(), highs.tolist()
    if impl == "bisect":
        bl, br, k = bisect.bisect_left, bisect.bisect_right, s.k
        if op == "count_many":
            return lambda: [br(k, hi) - bl(k, lo) for lo, hi in zip(lo_l, hi_l)]
        cum = d.cum.tolist()
        return lambda: [cum[br(k, hi)] - cum[bl(k, lo)] for lo, hi in zip(lo_l, hi_l)]
    if impl == "sortedcontainers":
        bl, br = s.bisect_key_left, s.bisect_key_right
        return lambda: [br(hi) - bl(lo) for lo, hi in zip(lo_l, hi_l)]
    raise AssertionError(impl)


def _many_test(benchmark, kit, n, impl, op):
    if impl == "reference" and not kit.mode.smoke and n > 10**4:
        pytest.skip("reference: one Python call per range; run at 10^3 and 10^4 only")
    d = kit.floats(n)
    lows, highs = _bulk_ranges(d, kit.mode.bulk, op)
    fn = many_fn(op, impl, kit.build(impl, "float", n), d, lows, highs)
    slow = impl in ("bisect", "sortedcontainers", "reference")
    got = kit.measure(benchmark, op, impl, n, fn, ops=len(lows), slow=slow, rounds=2)
    if op == "count_many":
        np.testing.assert_array_equal(np.asarray(got), d.count_of(lows, highs))
    else:
        np.testing.assert_allclose(np.asarray(got), d.sum_of(lows, highs), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", COUNT_MANY_IMPLS)
def test_count_many(benchmark, kit, n, impl):
    _many_test(benchmark, kit, n, impl, "count_many")


@pytest.mark.parametrize("impl", SUM_MANY_IMPLS)
def test_sum_many(benchmark, kit, n, impl):
    _many_test(benchmark, kit, n, impl, "sum_many")


# ---------------------------------------------------------------------------
# from_arrays: bulk build from unsorted arrays
# ---------------------------------------------------------------------------

BUILD_IMPLS = ["aggtree", "numpy", "sortedcontainers", "reference", "sqlite"]


def build_fn(impl, d):
    keys, ids, values = d.keys, d.ids, d.values
    if impl == "aggtree":
        return lambda: Agg.from_arrays(keys, ids, values)
    if impl == "reference":
        return lambda: RefAgg.from_arrays(keys, ids, values)
    if impl == "numpy":
        return lambda: np.lexsort((ids, keys))
    if impl == "sortedcontainers":
        return lambda: make_skl(zip(keys.tolist(), ids.tolist(), values.tolist()))
    if impl == "sqlite":
        return lambda: SqliteTable(keys.tolist(), ids.tolist(), values.tolist())
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", BUILD_IMPLS)
def test_from_arrays(benchmark, kit, n, impl):
    kit.skip_slow_reference(impl, n)
    d = kit.floats(n)
    slow = impl in ("sortedcontainers", "reference", "sqlite") and n >= SLOW_N
    got = kit.measure(benchmark, "from_arrays", impl, n, build_fn(impl, d), ops=n,
                      slow=slow, rounds=2)
    if impl == "numpy":
        np.testing.assert_array_equal(d.keys[got], d.sk)
        np.testing.assert_array_equal(d.ids[got], d.sid)
        return
    assert len(got) == n
    if impl in ("aggtree", "reference"):
        k, i, v = got.to_arrays()
        np.testing.assert_array_equal(np.asarray(k, dtype=np.float64), d.sk)
        np.testing.assert_array_equal(np.asarray(i, dtype=np.int64), d.sid)
        np.testing.assert_array_equal(np.asarray(v, dtype=np.float64), d.sv)
        if kit.mode.smoke:
            got.check()
    elif impl == "sortedcontainers":
        assert [t[0] for t in got] == d.sk.tolist()


# ---------------------------------------------------------------------------
# insert_many: n // 10 new items into n
# ---------------------------------------------------------------------------

INSERT_MANY_IMPLS = ["aggtree", "aggtree-loop", "sortedcontainers", "reference"]


@pytest.mark.parametrize("impl", INSERT_MANY_IMPLS)
def test_insert_many(benchmark, kit, n, impl):
    kit.skip_slow_reference(impl, n)
    d = kit.floats(n)
    m = max(1, n // 10)
    base = "aggtree" if impl == "aggtree-loop" else impl
    s = kit.build(base, "float", n)

    if impl in ("aggtree", "reference"):
        def setup(r):
            return d.new_items(m, "insert_many", r)

        def target(k, i, v):
            s.insert_many(k, i, v)

        def teardown(k, i, v):
            s.delete_many(k, i)
    elif impl == "aggtree-loop":
        def setup(r):
            k, i, v = d.new_items(m, "insert_many", r)
            return k.tolist(), i.tolist(), v.tolist()

        ins = s.insert

        def target(k, i, v):
            for key, id_, value in zip(k, i, v):
                ins(key, id_, value)

        def teardown(k, i, v):
            s.delete_many(k, i)
    elif impl == "sortedcontainers":
        def setup(r):
            k, i, v = d.new_items(m, "insert_many", r)
            return (list(zip(k.tolist(), i.tolist(), v.tolist())),)

        def target(items):
            s.update(items)

        def teardown(items):
            for t in items:
                s.remove(t)
    else:
        raise AssertionError(impl)

    def verify(_result, *args):
        assert len(s) == n + m
        if impl != "sortedcontainers":
            k = args[0]
            got = s.count_many(np.asarray(k, dtype=np.float64), np.asarray(k, dtype=np.float64))
            assert (np.asarray(got) >= 1).all()
            if kit.mode.smoke:
                s.check()

    rounds = kit.mode.bulk_rounds if impl != "sortedcontainers" or n < SLOW_N else 2
    kit.measure_writes(benchmark, "insert_many", impl, n, setup=setup, target=target,
                       teardown=teardown, verify=verify, ops=m, rounds=rounds, batch=m)
    assert len(s) == n


# ---------------------------------------------------------------------------
# delete_many: n // 10 items out of n + n // 10
# ---------------------------------------------------------------------------

DELETE_MANY_IMPLS = ["aggtree", "aggtree-loop", "sortedcontainers", "reference"]


@pytest.mark.parametrize("impl", DELETE_MANY_IMPLS)
def test_delete_many(benchmark, kit, n, impl):
    kit.skip_slow_reference(impl, n)
    d = kit.floats(n)
    m = max(1, n // 10)
    base = "aggtree" if impl == "aggtree-loop" else impl
    s = kit.build(base, "float", n)

    def _extra():                   # the items of this round still in s
        return len(s) > n

    if impl in ("aggtree", "reference"):
        def setup(r):
            k, i, v = d.new_items(m, "delete_many", r)
            s.insert_many(k, i, v)
            return k, i

        def target(k, i):
            s.delete_many(k, i)

        def teardown(k, i):
            if _extra():
                s.delete_many(k, i)
    elif impl == "aggtree-loop":
        def setup(r):
            k, i, v = d.new_items(m, "delete_many", r)
            s.insert_many(k, i, v)
            return k.tolist(), i.tolist()

        dele = s.delete

        def target(k, i):
            for key, id_ in zip(k, i):
                dele(key, id_)

        def teardown(k, i):
            if _extra():            # a round that failed part-way
                for key, id_ in zip(k, i):
                    s.delete_if_exists(key, id_)
    elif impl == "sortedcontainers":
        def setup(r):
            k, i, v = d.new_items(m, "delete_many", r)
            items = list(zip(k.tolist(), i.tolist(), v.tolist()))
            s.update(items)
            return (items,)

        def target(items):
            rm = s.remove
            for t in items:
                rm(t)

        def teardown(items):
            if _extra():
                for t in items:
                    if t in s:
                        s.remove(t)
    else:
        raise AssertionError(impl)

    def verify(_result, *args):
        assert len(s) == n
        if impl != "sortedcontainers":
            k = np.asarray(args[0], dtype=np.float64)
            got = s.count_many(k, k)
            assert int(np.asarray(got).sum()) == int(np.asarray(d.count_of(k, k)).sum())
            if kit.mode.smoke:
                s.check()

    rounds = kit.mode.bulk_rounds if impl != "sortedcontainers" or n < SLOW_N else 2
    kit.measure_writes(benchmark, "delete_many", impl, n, setup=setup, target=target,
                       teardown=teardown, verify=verify, ops=m, rounds=rounds, batch=m)
    assert len(s) == n
