"""Leaks: memory stays flat over a long loop of mixed operations.

The loop runs rounds of mixed operations on one native aggregate: writes of
every kind (scalar and batched, across namespaces, FAST and GENERAL keys,
conversions), reads of every kind, pickling, and calls that fail (duplicates,
missing items, bad types, NaN, unhashable namespaces, garbage cursors, bad
arrays, injected allocation failures).  Every round ends with the aggregate
back in the same base state, so a correct implementation holds the same
memory at the end of every round.  Measured every few rounds:

* Python allocations: ``sys.getallocatedblocks()`` (the counter CPython's own
  reference-leak hunting uses; cheap, so over many rounds) and
  ``tracemalloc`` (traced bytes; slow, so over fewer rounds);
* C allocations: the trees' own accounting (``nbytes``) and RSS from
  ``/proc/self/statm`` (RSS skipped under AddressSanitizer, whose quarantine
  holds freed memory);

The median over the last third of the samples must not exceed the median
over the second third by more than a small margin (each margin is well below
what a leak of one small object per round adds up to; bounded caches of the
interpreter and numpy are filled before measuring).  Reference counts of the
key, id and namespace objects used by the loop are the same before and
after, and dropping namespaces (deleting every item, ``clear``,
``delete_many``, moving the last item away) frees their native memory
(``nbytes`` back to 0) and makes them vanish.

The loop is time-bounded: ~3 s by default, longer with ``CI`` /
``HYPOTHESIS_PROFILE=ci``, shorter when ``AGGTREE_SANITIZED=1``.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import pickle
import random
import statistics
import sys
import time
import tracemalloc

import numpy as np
import pytest

from aggtree import Bound, DuplicateItemError, MissingItemError
from aggtree._core import Aggregate, _debug_fail_after

from _reliability import CI, SANITIZED, stats_reporter  # noqa: E402
BUDGET = 1.5 if SANITIZED else (8.0 if CI else 3.0)

STATS = {"leak_rounds": 0, "leak_ops": 0, "leak_failing_calls": 0, "leak_faults_injected": 0}


_report_stats = stats_reporter("test_leaks", STATS)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# Objects whose reference counts are watched.  Built at run time so that they
# are not shared constants of the module (which the compiler may intern).
def fresh_objects():
    tag = str(random.random())
    return {
        "str_key": "leak-key-" + tag,
        "tuple_key": ("leak", tag, 1),
        "bytes_key": ("leak-bytes-" + tag).encode(),
        "big_key": 10**30 + int(float(tag) * 1e6),
        "float_key": 1.5 + float(tag),
        "str_id": "leak-id-" + tag,
        "tuple_id": ("id", tag),
        "ns_str": "leak-ns-" + tag,
        "ns_tuple": ("leak-ns", tag),
        "ns_int": 10**20 + int(float(tag) * 1e6),
        "value": 2.5 + float(tag),
    }


class Failing:
    """Counts the failing calls of a round."""

    def __init__(self):
        self.count = 0

    def __call__(self, exc_types, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except exc_types:
            self.count += 1
        else:  # pragma: no cover - would be a contract violation
            raise AssertionError(f"{fn.__name__}{args} {kwargs} did not raise {exc_types}")


def _deep(depth):
    v = 1
    for _ in range(depth):
        v = (v,)
    return v


DEEP = _deep(40)


def base_state(agg, o):
    agg.insert_many(np.arange(200.0), np.arange(200), np.ones(200))
    agg.insert_many([f"g{j}" for j in range(100)], list(range(100)), namespace=o["ns_str"])
    agg.insert(o["tuple_key"], o["tuple_id"], 1.0, namespace=o["ns_tuple"])
    agg.insert(o["float_key"], 7, o["value"], namespace=o["ns_int"])


def one_round(agg, o, rng, fail):
    """Mixed operations; the aggregate ends in the base state again."""
    ops = 0
    sk, tk, bk, gk, fk = o["str_key"], o["tuple_key"], o["bytes_key"], o["big_key"], o["float_key"]
    sid, tid = o["str_id"], o["tuple_id"]
    ns_s, ns_t, ns_i = o["ns_str"], o["ns_tuple"], o["ns_int"]
    # -- writes that succeed and are undone -------------------------------
    agg.insert(sk, sid, 1.0, namespace=ns_s)
    agg.insert(tk, sid, 2.0, namespace=ns_s)
    agg.insert(bk, tid, 3.0, namespace=ns_t)
    agg.insert(gk, 5, 4.0, namespace=ns_i)          # converts ns_i to GENERAL
    agg.insert(fk, 1000, 1.0)
    assert agg.upsert(sk, sid, 5.0, namespace=ns_s) is False
    agg.replace(sk, sid, bk, 6.0, namespace=ns_s, new_namespace="tmp-ns")
    agg.replace_or_insert(bk, sid, sk, 7.0, namespace="tmp-ns", new_namespace=ns_s)
    keys = np.arange(500.0, 600.0) + rng.random()
    agg.insert_many(keys, np.arange(100))
    agg.insert_many(keys, np.arange(100), namespace="bulk-ns")
    agg.insert_many([sk, tk, bk], [1, 2, 3], namespace="gen-many")
    ops += 11
    # -- reads ------------------------------------------------------------
    assert agg.count(lower=Bound(500.0), upper=600.0) == 100
    agg.sum(namespace=ns_s)
    agg.at(-1, namespace=ns_s)
    agg.index_of(sk, id=sid, namespace=ns_s)
    agg.min(namespace=ns_t), agg.max(namespace=ns_i)
    agg.random(rng=rng, namespace=ns_s)
    page = agg.paginate(page_size=7, namespace=ns_s)
    page = agg.paginate(cursor=page.cursor, page_size=7, namespace=ns_s, order="desc")
    list(agg.iter(namespace=ns_t))
    agg.count_many(np.arange(0.0, 100.0), np.arange(50.0, 150.0))
    agg.sum_many([0.0, 10.0], [100.0, 20.0])
    agg.index_of_many(np.array([1.0, 2.0, 3.0]))
    agg.at_many([0, -1], namespace=ns_s)
    agg.to_arrays(namespace=ns_s)
    agg.to_arrays(lower=100.0)
    agg.count_batch([{"namespace": ns_s}, {"namespace": ns_t, "prefix": ("leak",)}])
    agg.sum_batch([{"eq": fk}])
    agg.at_batch([{"offset": 0, "namespace": ns_i}])
    if rng.random() < 0.25:
        # __reduce__ and the rebuild (what unpickling calls); pickle.loads
        # itself keeps a small rotating set of objects that would blur the
        # Python-memory measurements.
        pickle.dumps(agg)
        copy.copy(agg)
    len(agg), repr(agg), agg.namespaces(), agg.nbytes
    ops += 22
    # -- failing calls ----------------------------------------------------
    fail(DuplicateItemError, agg.insert, sk, sid, namespace=ns_s)
    fail(DuplicateItemError, agg.insert_many, [sk, sk], [sid, sid], namespace="x")
    fail(DuplicateItemError, agg.insert_many, keys[:3], np.arange(3))
    fail(DuplicateItemError, agg.replace, sk, sid, tk, namespace=ns_s, new_namespace=ns_s)
    fail(MissingItemError, agg.delete, "absent", sid, namespace=ns_s)
    fail(MissingItemError, agg.delete_many, [sk, "absent"], [sid, sid], namespace=ns_s)
    fail(MissingItemError, agg.delete_many, np.array([1.0, 1e9]), np.array([1, 1]))
    fail(MissingItemError, agg.replace, "absent", sid, sk, namespace=ns_t)
    fail(TypeError, agg.insert, {sk: 1}, sid)
    fail(TypeError, agg.insert, sk, [sid, {}], namespace=ns_s)
    fail(TypeError, agg.insert, sk, sid, namespace=[ns_s])
    fail(TypeError, agg.insert, sk, sid, "not a number")
    fail(ValueError, agg.insert, math.nan, sid)
    fail(ValueError, agg.insert, (sk, math.nan), sid)
    fail(ValueError, agg.insert, sk, "nan-value", math.nan)
    fail(ValueError, agg.insert_many, [1.0, math.nan], [1, 2])
    fail(ValueError, agg.insert_many, [1.0, 2.0], [1])
    fail(ValueError, agg.count, lower=math.nan)
    fail(TypeError, agg.count, namespace={})
    fail(ValueError, agg.paginate, cursor="garbage!" + sk, namespace=ns_s)
    fail(ValueError, agg.paginate, cursor=page.cursor[:-3] + "AAA", namespace=ns_s)
    fail((ValueError, TypeError), agg.paginate, page_size=-1)
    fail(IndexError, agg.at, 10**6, namespace=ns_s)
    fail(TypeError, agg.at, "x")
    fail(ValueError, agg.count, eq=sk, prefix=(1,))
    fail(TypeError, agg.count_batch, [{"bogus": 1}])
    fail((ValueError, TypeError), agg.count_many, np.zeros((2, 2)), np.zeros(3))
    fail(ValueError, Aggregate.from_arrays, [1.0, math.nan], [1, 2])
    fail(DuplicateItemError, Aggregate.from_arrays, [sk, sk], [1, 1])
    fail(ValueError, agg.insert, DEEP, 1)
    ops += 30
    # -- injected allocation failures --------------------------------------
    for n in (0, 1, 2):
        _debug_fail_after(n)
        try:
            agg.insert_many(keys + 1000.0, np.arange(100), namespace="oom-ns")
        except MemoryError:
            fail.count += 1
            STATS["leak_faults_injected"] += 1
        else:
            agg.delete_many(keys + 1000.0, np.arange(100), namespace="oom-ns")
        finally:
            _debug_fail_after(-1)
        _debug_fail_after(n)
        try:
            agg.insert("oom " * 20, sid, 1.0, namespace=ns_s)
        except MemoryError:
            fail.count += 1
            STATS["leak_faults_injected"] += 1
        else:
            agg.delete("oom " * 20, sid, namespace=ns_s)
        finally:
            _debug_fail_after(-1)
        ops += 2
    # -- back to the base state ----------------------------------------------
    agg.delete(sk, sid, namespace=ns_s)
    agg.delete(tk, sid, namespace=ns_s)
    agg.delete_if_exists(bk, tid, namespace=ns_t)
    agg.delete(gk, 5, namespace=ns_i)
    agg.delete(fk, 1000)
    agg.delete_many(keys, np.arange(100))
    agg.clear("bulk-ns")
    agg.delete_many([sk, tk, bk], [1, 2, 3], namespace="gen-many")
    ops += 8
    return ops


def warm_caches(agg):
    """Interpreter and numpy keep small bounded caches that fill up over the
    first few thousand calls of some paths (seen with tracemalloc: unpickling,
    numpy's broadcasting error path).  Fill them before measuring."""
    small = Aggregate()
    small.insert(1.0, 1)
    blob = pickle.dumps(small)
    a, b = np.zeros((2, 2)), np.zeros(3)
    for _ in range(6000):
        pickle.loads(blob)
        try:
            agg.count_many(a, b)
        except ValueError:
            pass


def growth(samples):
    """Median of the last third minus median of the second third."""
    third = len(samples) // 3
    assert third >= 3, f"too few samples ({len(samples)})"
    return statistics.median(samples[2 * third :]) - statistics.median(samples[third : 2 * third])


def test_memory_flat_over_mixed_loop():
    o = fresh_objects()
    rng = random.Random(3)
    agg = Aggregate(node_size=8)
    base_state(agg, o)
    agg.check()
    watched = {name: sys.getrefcount(v) for name, v in o.items()}
    base_len = len(agg)
    fail = Failing()

    # Warm-up (caches, interned strings, numpy scratch; the first round also
    # converts one namespace to GENERAL for good), then measure.
    for _ in range(30):
        one_round(agg, o, rng, fail)
    warm_caches(agg)
    gc.collect()
    # Full collections at every sample (a round's failing calls leave a few
    # reference cycles -- exceptions and their frames -- that only a full
    # collection frees), made cheap by freezing everything older.
    gc.freeze()
    try:
        _measure(agg, o, rng, fail, base_len)
    finally:
        gc.unfreeze()

    # Reference counts of every key, id and namespace object are unchanged.
    gc.collect()
    now = {name: sys.getrefcount(v) for name, v in o.items()}
    assert now == watched
    # And the aggregate gives them back when it goes.
    agg.clear_all()
    assert agg.nbytes == 0 and len(agg) == 0 and agg.namespaces() == []
    del agg
    gc.collect()
    after = {name: sys.getrefcount(v) for name, v in o.items()}
    for name in ("ns_str", "ns_tuple", "ns_int"):
        assert after[name] == watched[name] - 1, name  # the dict of trees held one
    for name in ("str_key", "tuple_key", "bytes_key", "big_key", "float_key", "str_id", "tuple_id", "value"):
        assert after[name] == watched[name], name


def _measure(agg, o, rng, fail, base_len):
    rounds = ops = 0

    # Phase 1, untraced and fast: C memory (RSS), the trees' own accounting
    # (nbytes) and Python's allocated blocks (sys.getallocatedblocks, the
    # counter CPython's own leak hunting uses), every 10 rounds.
    # (Samples go to preallocated int64 arrays: a list of int objects would
    # itself grow by a few blocks per sample.)
    samples = np.zeros((3, 100_000), dtype=np.int64)
    n = 0
    deadline = time.monotonic() + 0.6 * BUDGET
    while (time.monotonic() < deadline or n < 30) and n < samples.shape[1]:
        ops += one_round(agg, o, rng, fail)
        rounds += 1
        if rounds % 10 == 0:
            gc.collect()
            samples[0, n] = sys.getallocatedblocks()
            samples[1, n] = rss_bytes()
            samples[2, n] = agg.nbytes
            n += 1
            assert len(agg) == base_len
    blocks, rss, native = (samples[j, :n].tolist() for j in range(3))

    # Phase 2, under tracemalloc (much slower per round): Python bytes.
    traced_samples = np.zeros(100_000, dtype=np.int64)
    n = 0
    tracemalloc.start()
    try:
        deadline = time.monotonic() + 0.4 * BUDGET
        while (time.monotonic() < deadline or n < 15) and n < len(traced_samples):
            ops += one_round(agg, o, rng, fail)
            rounds += 1
            if rounds % 2 == 0:
                gc.collect()
                traced_samples[n] = tracemalloc.get_traced_memory()[0]
                n += 1
    finally:
        tracemalloc.stop()
    traced = traced_samples[:n].tolist()
    agg.check()
    STATS["leak_rounds"] += rounds
    STATS["leak_ops"] += ops
    STATS["leak_failing_calls"] += fail.count

    assert growth(traced) < 16 * 1024, f"Python memory (tracemalloc) grew: {traced}"
    # Blocks are sampled every 10 rounds after a full collection; the two
    # medians compared are about len(blocks) / 3 samples apart.  A leak of one
    # object per round (a round makes ~60 calls) grows by >= 10 blocks per
    # sample; a clean run stays within a few dozen blocks.
    assert growth(blocks) < 200, f"Python allocated blocks grew: {blocks}"
    # nbytes: node shapes vary a little with the order of inserts and
    # deletes, but must not creep up.
    assert growth(native) < 4096, native
    assert max(native) < 4 * min(native), native
    if not SANITIZED:
        # Measured noise of a clean run: < 64 KiB; a leak of 1 KiB per round
        # shows as ~250 KiB.
        assert growth(rss) < 160 * 1024, f"RSS grew: {rss}"


def test_refcounts_of_failing_calls():
    """Calls that raise keep no reference to their arguments."""
    o = fresh_objects()
    agg = Aggregate(node_size=4)
    base_state(agg, o)
    agg.insert(o["str_key"], o["str_id"], namespace=o["ns_str"])
    bad_ns = [o["ns_str"]]
    watched = {name: sys.getrefcount(v) for name, v in o.items()}
    for _ in range(2000):
        for call, exc in (
            (lambda: agg.insert(o["str_key"], o["str_id"], namespace=o["ns_str"]), DuplicateItemError),
            (lambda: agg.delete(o["tuple_key"], o["str_id"], namespace=o["ns_str"]), MissingItemError),
            (lambda: agg.insert(o["tuple_key"], o["tuple_id"], namespace=bad_ns), TypeError),
            (lambda: agg.insert((o["str_key"], math.nan), o["tuple_id"], namespace=o["ns_tuple"]), ValueError),
            (lambda: agg.replace(o["str_key"], o["str_id"], o["bytes_key"], "x", namespace=o["ns_str"]), TypeError),
            (lambda: agg.insert_many([o["big_key"], o["big_key"]], [o["str_id"]] * 2, namespace=o["ns_int"]),
             DuplicateItemError),
            (lambda: agg.paginate(cursor=o["str_key"], namespace=o["ns_str"]), ValueError),
            (lambda: agg.count(lower=Bound(o["tuple_key"], id={}), namespace=o["ns_tuple"]), TypeError),
        ):
            with pytest.raises(exc):
                call()
    gc.collect()
    assert {name: sys.getrefcount(v) for name, v in o.items()} == watched


def test_refcounts_of_reads_and_items():
    """Items read back are new objects: reading does not change the
    reference counts of the inserted objects, and dropping what was read
    releases everything."""
    o = fresh_objects()
    agg = Aggregate()
    agg.insert(o["tuple_key"], o["tuple_id"], namespace=o["ns_tuple"])
    watched = {name: sys.getrefcount(v) for name, v in o.items()}
    for _ in range(2000):
        items = list(agg.iter(namespace=o["ns_tuple"]))
        agg.at(0, namespace=o["ns_tuple"])
        agg.to_arrays(namespace=o["ns_tuple"])
        agg.paginate(namespace=o["ns_tuple"])
        agg.namespaces()
        del items
    gc.collect()
    assert {name: sys.getrefcount(v) for name, v in o.items()} == watched


@pytest.mark.parametrize("kind", ["float", "int", "general", "converted"])
@pytest.mark.parametrize("how", ["delete", "delete_many", "clear", "replace_away", "delete_if_exists"])
def test_dropped_namespaces_free_memory(kind, how):
    agg = Aggregate(node_size=4)
    agg.insert(0.0, 0, namespace="keep")
    keep_nbytes = agg.nbytes
    ns = ("drop", kind)
    if kind == "float":
        keys, ids = [float(j) for j in range(300)], list(range(300))
    elif kind == "int":
        keys, ids = list(range(300)), list(range(300))
    else:
        keys, ids = [f"key {j} " * 5 for j in range(300)], [("id", j) for j in range(300)]
    agg.insert_many(keys, ids, namespace=ns)
    if kind == "converted":
        agg.insert(1.5, 1, namespace=ns)
        keys, ids = keys + [1.5], ids + [1]
    assert agg.nbytes > keep_nbytes
    if how == "delete":
        for k, i in zip(keys, ids):
            agg.delete(k, i, namespace=ns)
    elif how == "delete_if_exists":
        for k, i in zip(keys, ids):
            assert agg.delete_if_exists(k, i, namespace=ns)
    elif how == "delete_many":
        agg.delete_many(keys, ids, namespace=ns)
    elif how == "clear":
        agg.clear(ns)
    else:
        for k, i in zip(keys, ids):
            agg.replace(k, i, k, namespace=ns, new_namespace="elsewhere")
        agg.clear("elsewhere")
    agg.check()
    assert ns not in agg.namespaces()
    assert agg.count(namespace=ns) == 0
    assert agg.nbytes == keep_nbytes
    agg.delete(0.0, 0, namespace="keep")
    assert agg.nbytes == 0 and agg.namespaces() == [] and len(agg) == 0


def test_build_and_drop_many_times_keeps_rss_flat():
    """Big namespaces built and dropped again and again: the memory is
    reused (RSS does not creep up)."""
    if SANITIZED:
        pytest.skip("RSS is meaningless under AddressSanitizer's quarantine")
    agg = Aggregate()
    keys = np.random.default_rng(0).random(100_000)
    ids = np.arange(100_000)
    samples = []
    rounds = 12 if not CI else 30
    for r in range(rounds):
        agg.insert_many(keys, ids, namespace=r % 3)
        agg.insert_many([f"s{j}" for j in range(3000)], list(range(3000)), namespace="g")
        assert agg.nbytes > 0
        agg.clear(r % 3)
        agg.delete_many([f"s{j}" for j in range(3000)], list(range(3000)), namespace="g")
        assert agg.nbytes == 0
        gc.collect()
        samples.append(rss_bytes())
    third = rounds // 3
    assert statistics.median(samples[2 * third :]) - statistics.median(samples[third : 2 * third]) < 4 * 1024 * 1024, samples
