"""Single-operation benchmarks on float keys: aggtree against its baselines.

One test function per operation, parametrised by size ``n`` (conftest) and
implementation; ``benchmark.group`` is ``"<operation> n=<size>"``, so each
pytest-benchmark table compares the implementations on the same items and the
same batch of random queries.  Every test checks its batch's results against
the numpy oracle of ``conftest.FloatData`` (in the smoke run too).

The node-size sweep (``test_sweep_*``) runs aggtree alone at the largest size
for node sizes 8..512; ``report.py`` picks the best one from it.

See conftest.py for the implementations, the data and the timing method.
"""

from __future__ import annotations

import bisect
from operator import itemgetter

import numpy as np
import pytest

from benchkit import (  # bench/conftest.py
    BATCH, PAGE_SIZE, SLOW_N, SWEEP_NODE_SIZES, WIDE_BATCH, SqliteTable, deep_sizeof, skl_nbytes,
)

AGG = ("aggtree", "reference")
READ_IMPLS = ["aggtree", "reference", "sortedcontainers", "bisect", "numpy", "sqlite"]
WRITE_IMPLS = ["aggtree", "reference", "sortedcontainers", "sqlite"]

ss = np.searchsorted


# ---------------------------------------------------------------------------
# count with two bounds
# ---------------------------------------------------------------------------


def count_fn(impl, s, qs):
    if impl in AGG:
        count = s.count
        return lambda: [count(lower=lo, upper=hi) for lo, hi in qs]
    if impl == "sortedcontainers":
        bl, br = s.bisect_key_left, s.bisect_key_right
        return lambda: [br(hi) - bl(lo) for lo, hi in qs]
    if impl == "bisect":
        bl, br, k = bisect.bisect_left, bisect.bisect_right, s.k
        return lambda: [br(k, hi) - bl(k, lo) for lo, hi in qs]
    if impl == "numpy":
        sk = s.sk
        return lambda: [int(ss(sk, hi, "right") - ss(sk, lo, "left")) for lo, hi in qs]
    if impl == "sqlite":
        ex, sql = s.con.execute, SqliteTable.COUNT
        return lambda: [ex(sql, q).fetchone()[0] for q in qs]
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", READ_IMPLS)
def test_count(benchmark, kit, n, impl):
    d = kit.floats(n)
    qs = d.ranges(BATCH, "count")
    fn = count_fn(impl, kit.build(impl, "float", n), qs)
    got = kit.measure(benchmark, "count", impl, n, fn, ops=len(qs),
                      slow=impl == "sqlite" and n >= SLOW_N, rounds=1)
    lo, hi = zip(*qs)
    assert got == d.count_of(lo, hi).tolist()


# ---------------------------------------------------------------------------
# sum over a wide range (~80% of the items)
# ---------------------------------------------------------------------------


def sum_fn(impl, s, d, qs):
    if impl in AGG:
        total = s.sum
        return lambda: [total(lower=lo, upper=hi) for lo, hi in qs]
    if impl == "sortedcontainers":
        bl, br, g = s.bisect_key_left, s.bisect_key_right, itemgetter(2)
        return lambda: [sum(map(g, s[bl(lo):br(hi)])) for lo, hi in qs]
    if impl == "bisect":
        bl, br, k, v = bisect.bisect_left, bisect.bisect_right, s.k, s.v
        return lambda: [sum(v[bl(k, lo):br(k, hi)]) for lo, hi in qs]
    if impl == "numpy":
        sk, cum = d.sk, d.cum
        return lambda: [float(cum[ss(sk, hi, "right")] - cum[ss(sk, lo, "left")]) for lo, hi in qs]
    if impl == "sqlite":
        ex, sql = s.con.execute, SqliteTable.SUM
        return lambda: [ex(sql, q).fetchone()[0] for q in qs]
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", READ_IMPLS)
def test_sum(benchmark, kit, n, impl):
    kit.skip_slow_reference(impl, n)
    d = kit.floats(n)
    qs = d.wide_ranges(WIDE_BATCH, "sum")
    fn = sum_fn(impl, kit.build(impl, "float", n), d, qs)
    slow = impl in ("reference", "sortedcontainers", "bisect", "sqlite") and n >= SLOW_N
    got = kit.measure(benchmark, "sum", impl, n, fn, ops=len(qs), slow=slow, rounds=2)
    lo, hi = zip(*qs)
    np.testing.assert_allclose(got, d.sum_of(lo, hi), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------
# insert / delete one at a time
# ---------------------------------------------------------------------------


def _write_ops(impl, s):
    """(insert_batch, delete_batch) for a list of (key, id, value) tuples."""
    if impl in AGG:
        ins, dele = s.insert, s.delete

        def insert_batch(batch):
            for k, i, v in batch:
                ins(k, i, v)

        def delete_batch(batch):
            for k, i, _ in batch:
                dele(k, i)

        return insert_batch, delete_batch
    if impl == "sortedcontainers":
        add, rem = s.add, s.remove

        def insert_batch(batch):
            for t in batch:
                add(t)

        def delete_batch(batch):
            for t in batch:
                rem(t)

        return insert_batch, delete_batch
    if impl == "sqlite":
        ex = s.con.execute

        def insert_batch(batch):
            for t in batch:
                ex(SqliteTable.INSERT, t)

        def delete_batch(batch):
            for k, i, _ in batch:
                ex(SqliteTable.DELETE, (k, i))

        return insert_batch, delete_batch
    raise AssertionError(impl)


def _write_test(benchmark, kit, n, impl, op, node_size=None, group_op=None):
    d = kit.floats(n)
    s = kit.build(impl, "float", n, node_size)
    insert_batch, delete_batch = _write_ops(impl, s)

    def batch(r):
        k, i, v = d.new_items(BATCH, op, r)
        return list(zip(k.tolist(), i.tolist(), v.tolist()))

    if op == "insert":
        def setup(r):
            return (batch(r),)
        target, teardown = insert_batch, delete_batch
        expect = n + BATCH
    else:
        def setup(r):
            b = batch(r)
            insert_batch(b)
            return (b,)
        target, teardown = delete_batch, (lambda b: None)
        expect = n

    def verify(_result, b):
        assert len(s) == expect
        if impl == "aggtree" and kit.mode.smoke:
            s.check()

    info = {} if node_size is None else {"node_size": node_size}
    kit.measure_writes(benchmark, group_op or op, impl, n, setup=setup, target=target,
                       teardown=teardown, verify=verify, ops=BATCH,
                       rounds=kit.mode.write_rounds, **info)
    assert len(s) == n


@pytest.mark.parametrize("impl", WRITE_IMPLS)
def test_insert(benchmark, kit, n, impl):
    kit.skip_slow_reference(impl, n)
    _write_test(benchmark, kit, n, impl, "insert")


@pytest.mark.parametrize("impl", WRITE_IMPLS)
def test_delete(benchmark, kit, n, impl):
    kit.skip_slow_reference(impl, n)
    _write_test(benchmark, kit, n, impl, "delete")


# ---------------------------------------------------------------------------
# at (select by position) and index_of (rank)
# ---------------------------------------------------------------------------

SELECT_IMPLS = ["aggtree", "reference", "sortedcontainers", "bisect", "numpy"]


def at_fn(impl, s, d, offs):
    if impl in AGG:
        at = s.at
        return lambda: [at(o) for o in offs]
    if impl == "sortedcontainers":
        return lambda: [s[o] for o in offs]
    if impl == "bisect":
        k, i, v = s.k, s.i, s.v
        return lambda: [(k[o], i[o], v[o]) for o in offs]
    if impl == "numpy":
        sk, sid, sv = d.sk, d.sid, d.sv
        return lambda: [(sk[o], sid[o], sv[o]) for o in offs]
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", SELECT_IMPLS)
def test_at(benchmark, kit, n, impl):
    d = kit.floats(n)
    offs = d.offsets(BATCH, "at")
    fn = at_fn(impl, kit.build(impl, "float", n), d, offs)
    got = kit.measure(benchmark, "at", impl, n, fn, ops=len(offs))
    assert [float(t[0]) for t in got] == d.sk[offs].tolist()
    assert [int(t[1]) for t in got] == d.sid[offs].tolist()


def index_of_fn(impl, s, d, keys):
    if impl in AGG:
        index_of = s.index_of
        return lambda: [index_of(k) for k in keys]
    if impl == "sortedcontainers":
        bl = s.bisect_key_left
        return lambda: [bl(k) for k in keys]
    if impl == "bisect":
        bl, kl = bisect.bisect_left, s.k
        return lambda: [bl(kl, k) for k in keys]
    if impl == "numpy":
        sk = d.sk
        return lambda: [int(ss(sk, k)) for k in keys]
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", SELECT_IMPLS)
def test_index_of(benchmark, kit, n, impl):
    d = kit.floats(n)
    keys = d.present_keys(BATCH, "index_of")
    fn = index_of_fn(impl, kit.build(impl, "float", n), d, keys)
    got = kit.measure(benchmark, "index_of", impl, n, fn, ops=len(keys))
    assert got == ss(d.sk, keys).tolist()


# ---------------------------------------------------------------------------
# min / max of a range
# ---------------------------------------------------------------------------


def minmax_fn(impl, s, d, qs):
    if impl in AGG:
        mn, mx = s.min, s.max
        return lambda: [(mn(lower=lo, upper=hi), mx(lower=lo, upper=hi)) for lo, hi in qs]
    if impl == "sortedcontainers":
        bl, br = s.bisect_key_left, s.bisect_key_right

        def run():
            out = []
            for lo, hi in qs:
                i, j = bl(lo), br(hi)
                out.append((s[i], s[j - 1]) if i < j else (None, None))
            return out
        return run
    if impl == "bisect":
        bl, br, k, ids, v = bisect.bisect_left, bisect.bisect_right, s.k, s.i, s.v

        def run():
            out = []
            for lo, hi in qs:
                i, j = bl(k, lo), br(k, hi)
                out.append(((k[i], ids[i], v[i]), (k[j - 1], ids[j - 1], v[j - 1]))
                           if i < j else (None, None))
            return out
        return run
    if impl == "numpy":
        sk, sid, sv = d.sk, d.sid, d.sv

        def run():
            out = []
            for lo, hi in qs:
                i, j = ss(sk, lo, "left"), ss(sk, hi, "right")
                out.append(((sk[i], sid[i], sv[i]), (sk[j - 1], sid[j - 1], sv[j - 1]))
                           if i < j else (None, None))
            return out
        return run
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", SELECT_IMPLS)
def test_min_max(benchmark, kit, n, impl):
    d = kit.floats(n)
    qs = d.ranges(BATCH // 2, "min_max")
    fn = minmax_fn(impl, kit.build(impl, "float", n), d, qs)
    got = kit.measure(benchmark, "min_max", impl, n, fn, ops=2 * len(qs))
    lo, hi = zip(*qs)
    i, j = ss(d.sk, lo, "left"), ss(d.sk, hi, "right")
    want = [(d.sk[a], d.sk[b - 1]) if a < b else (None, None) for a, b in zip(i, j)]
    assert [(p[0] and float(p[0][0]), p[1] and float(p[1][0])) for p in got] == want


# ---------------------------------------------------------------------------
# paginate: two consecutive pages of 100 from a random lower bound
# ---------------------------------------------------------------------------

PAGE_IMPLS = ["aggtree", "reference", "sortedcontainers", "bisect", "numpy", "sqlite"]


def page_fn(impl, s, d, starts):
    P = PAGE_SIZE
    if impl in AGG:
        paginate = s.paginate

        def run():
            out = []
            for lo in starts:
                p1 = paginate(lower=lo, page_size=P)
                p2 = paginate(lower=lo, cursor=p1.cursor, page_size=P)
                out.append(p1.items + p2.items)
            return out
        return run
    if impl == "sortedcontainers":
        bl, br = s.bisect_key_left, s.bisect_key_right

        def run():
            out = []
            for lo in starts:
                i = bl(lo)
                p1 = s[i:i + P]
                j = br(p1[-1][0])
                out.append(p1 + s[j:j + P])
            return out
        return run
    if impl == "bisect":
        bl, br, k, ids, v = bisect.bisect_left, bisect.bisect_right, s.k, s.i, s.v

        def run():
            out = []
            for lo in starts:
                i = bl(k, lo)
                p1 = list(zip(k[i:i + P], ids[i:i + P], v[i:i + P]))
                j = br(k, p1[-1][0])
                out.append(p1 + list(zip(k[j:j + P], ids[j:j + P], v[j:j + P])))
            return out
        return run
    if impl == "numpy":
        sk, sid, sv = d.sk, d.sid, d.sv

        def run():
            out = []
            for lo in starts:
                i = int(ss(sk, lo, "left"))
                p1 = list(zip(sk[i:i + P].tolist(), sid[i:i + P].tolist(), sv[i:i + P].tolist()))
                j = int(ss(sk, p1[-1][0], "right"))
                out.append(p1 + list(zip(sk[j:j + P].tolist(), sid[j:j + P].tolist(),
                                         sv[j:j + P].tolist())))
            return out
        return run
    if impl == "sqlite":
        ex = s.con.execute

        def run():
            out = []
            for lo in starts:
                p1 = ex(SqliteTable.PAGE_FIRST, (lo, P)).fetchall()
                out.append(p1 + ex(SqliteTable.PAGE_NEXT, (p1[-1][0], P)).fetchall())
            return out
        return run
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", PAGE_IMPLS)
def test_paginate(benchmark, kit, n, impl):
    d = kit.floats(n)
    last = float(d.sk[n - 2 * PAGE_SIZE - 1])  # room for two full pages after any start
    starts = (np.random.default_rng(n).random(WIDE_BATCH) * last).tolist()
    fn = page_fn(impl, kit.build(impl, "float", n), d, starts)
    got = kit.measure(benchmark, "paginate", impl, n, fn, ops=2 * len(starts),
                      page_size=PAGE_SIZE)
    first = ss(d.sk, starts, "left")
    for items, i in zip(got, first):
        assert [t[0] for t in items] == d.sk[i:i + 2 * PAGE_SIZE].tolist()


# ---------------------------------------------------------------------------
# memory per item
# ---------------------------------------------------------------------------

MEM_IMPLS = ["aggtree", "reference", "sortedcontainers", "bisect", "numpy", "sqlite"]


def nbytes_of(impl, s, d):
    if impl in AGG:
        return s.nbytes
    if impl == "sortedcontainers":
        return skl_nbytes(s)
    if impl == "bisect":
        return deep_sizeof([s.k, s.i, s.v])
    if impl == "numpy":
        return d.sk.nbytes + d.sid.nbytes + d.sv.nbytes + d.cum.nbytes
    if impl == "sqlite":
        return s.nbytes()
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", MEM_IMPLS)
def test_memory(benchmark, kit, n, impl):
    kit.skip_slow_reference(impl, n)
    d = kit.floats(n)
    # A fresh structure: the cached one has been through the insert/delete
    # benchmarks' churn (which leaves aggtree's leaves split and refilled).
    s = kit._build(impl, "float", n, None)
    nbytes = kit.measure(benchmark, "memory", impl, n, lambda: nbytes_of(impl, s, d), ops=1,
                         slow=True, rounds=1)
    benchmark.extra_info["nbytes"] = nbytes
    benchmark.extra_info["bytes_per_item"] = nbytes / n
    assert len(s) == n
    assert 8 <= nbytes / n < 4096


# ---------------------------------------------------------------------------
# node-size sweep (aggtree only, largest size)
# ---------------------------------------------------------------------------


@pytest.mark.largest
@pytest.mark.parametrize("node_size", SWEEP_NODE_SIZES)
def test_sweep_count(benchmark, kit, n, node_size):
    d = kit.floats(n)
    qs = d.ranges(BATCH, "count")
    fn = count_fn("aggtree", kit.build("aggtree", "float", n, node_size), qs)
    got = kit.measure(benchmark, "sweep_count", "aggtree", n, fn, ops=len(qs),
                      node_size=node_size)
    lo, hi = zip(*qs)
    assert got == d.count_of(lo, hi).tolist()


@pytest.mark.largest
@pytest.mark.parametrize("node_size", SWEEP_NODE_SIZES)
def test_sweep_at(benchmark, kit, n, node_size):
    d = kit.floats(n)
    offs = d.offsets(BATCH, "at")
    fn = at_fn("aggtree", kit.build("aggtree", "float", n, node_size), d, offs)
    got = kit.measure(benchmark, "sweep_at", "aggtree", n, fn, ops=len(offs),
                      node_size=node_size)
    assert [t[0] for t in got] == d.sk[offs].tolist()


@pytest.mark.largest
@pytest.mark.parametrize("node_size", SWEEP_NODE_SIZES)
def test_sweep_insert(benchmark, kit, n, node_size):
    _write_test(benchmark, kit, n, "aggtree", "insert", node_size=node_size,
                group_op="sweep_insert")


@pytest.mark.largest
@pytest.mark.parametrize("node_size", SWEEP_NODE_SIZES)
def test_sweep_memory(benchmark, kit, n, node_size):
    s = kit.build("aggtree", "float", n, node_size)
    assert s.node_size == node_size
    nbytes = kit.measure(benchmark, "sweep_memory", "aggtree", n, lambda: s.nbytes, ops=1,
                         node_size=node_size)
    benchmark.extra_info["nbytes"] = nbytes
    benchmark.extra_info["bytes_per_item"] = nbytes / n
    assert 8 <= nbytes / n < 4096
