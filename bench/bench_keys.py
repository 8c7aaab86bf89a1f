"""Key-type benchmarks: short str keys and (str, float) tuple keys against
float keys, on the same number of items.

Implementations are ``<impl>-<key kind>``:

``aggtree-float``  the float-key aggregate of bench_core (the yardstick)
``aggtree-str``    random str keys of 1..16 letters, int ids
``aggtree-tuple``  ``(group, score)`` keys, ~sqrt(n) str groups, float scores;
                   counted with ``prefix=(group,)``
``sortedcontainers-str`` / ``-tuple``, ``reference-str``: the same keys in
the baselines (the reference only up to 10^5 items).

Groups (``keys_count``, ``keys_insert``, ``keys_at``, ``keys_memory``) put
every key kind of one size side by side, so the ratios str / float and
tuple-prefix / float read straight off the pytest-benchmark table.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from benchkit import BATCH  # bench/conftest.py

COUNT_IMPLS = ["aggtree-float", "aggtree-str", "aggtree-tuple",
               "sortedcontainers-str", "sortedcontainers-tuple", "reference-str"]
INSERT_IMPLS = ["aggtree-float", "aggtree-str", "sortedcontainers-str", "reference-str"]
AT_IMPLS = ["aggtree-float", "aggtree-str", "sortedcontainers-str", "reference-str"]
MEM_IMPLS = ["aggtree-float", "aggtree-str", "aggtree-tuple", "reference-str"]


def _split(impl_kind):
    impl, kind = impl_kind.rsplit("-", 1)
    return impl, kind


def _prepare(kit, n, impl_kind):
    impl, kind = _split(impl_kind)
    kit.skip_slow_reference(impl, n)
    return impl, kind, kit.data(kind, n), kit.build(impl, kind, n)


# ---------------------------------------------------------------------------
# count
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl_kind", COUNT_IMPLS)
def test_keys_count(benchmark, kit, n, impl_kind):
    impl, kind, d, s = _prepare(kit, n, impl_kind)
    if kind == "tuple":
        qs = d.prefixes(BATCH, "keys_prefix")
        if impl == "aggtree":
            count = s.count
            fn = lambda: [count(prefix=p) for p in qs]  # noqa: E731
        else:
            bl, br, inf = s.bisect_key_left, s.bisect_key_right, math.inf
            fn = lambda: [br((g, inf)) - bl((g,)) for (g,) in qs]  # noqa: E731
        want = [d.group_count[g] for (g,) in qs]
    else:
        qs = d.ranges(BATCH, "count" if kind == "float" else "keys_count")
        if impl in ("aggtree", "reference"):
            count = s.count
            fn = lambda: [count(lower=lo, upper=hi) for lo, hi in qs]  # noqa: E731
        else:
            bl, br = s.bisect_key_left, s.bisect_key_right
            fn = lambda: [br(hi) - bl(lo) for lo, hi in qs]  # noqa: E731
        if kind == "float":
            lo, hi = zip(*qs)
            want = d.count_of(lo, hi).tolist()
        else:
            want = d.count_of(qs)
    got = kit.measure(benchmark, "keys_count", impl_kind, n, fn, ops=len(qs), key_kind=kind)
    assert got == want


# ---------------------------------------------------------------------------
# insert one at a time
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl_kind", INSERT_IMPLS)
def test_keys_insert(benchmark, kit, n, impl_kind):
    impl, kind, d, s = _prepare(kit, n, impl_kind)

    def setup(r):
        k, i, v = d.new_items(BATCH, "keys_insert", r)
        if isinstance(k, np.ndarray):
            k, i, v = k.tolist(), i.tolist(), v.tolist()
        return (list(zip(k, i, v)),)

    if impl in ("aggtree", "reference"):
        ins, dele = s.insert, s.delete

        def target(batch):
            for k, i, v in batch:
                ins(k, i, v)

        def teardown(batch):
            for k, i, _ in batch:
                dele(k, i)
    else:
        add, rem = s.add, s.remove

        def target(batch):
            for t in batch:
                add(t)

        def teardown(batch):
            for t in batch:
                rem(t)

    def verify(_result, batch):
        assert len(s) == n + BATCH
        if impl == "aggtree" and kit.mode.smoke:
            s.check()

    kit.measure_writes(benchmark, "keys_insert", impl_kind, n, setup=setup, target=target,
                       teardown=teardown, verify=verify, ops=BATCH,
                       rounds=kit.mode.write_rounds, key_kind=kind)
    assert len(s) == n


# ---------------------------------------------------------------------------
# at
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl_kind", AT_IMPLS)
def test_keys_at(benchmark, kit, n, impl_kind):
    impl, kind, d, s = _prepare(kit, n, impl_kind)
    offs = d.offsets(BATCH, "at" if kind == "float" else "keys_at")
    if impl in ("aggtree", "reference"):
        at = s.at
        fn = lambda: [at(o) for o in offs]  # noqa: E731
    else:
        fn = lambda: [s[o] for o in offs]  # noqa: E731
    got = kit.measure(benchmark, "keys_at", impl_kind, n, fn, ops=len(offs), key_kind=kind)
    if kind == "float":
        assert [t[0] for t in got] == d.sk[offs].tolist()
    else:
        assert [tuple(t[:2]) for t in got] == [d.sorted_items[o][:2] for o in offs]


# ---------------------------------------------------------------------------
# memory per item
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("impl_kind", MEM_IMPLS)
def test_keys_memory(benchmark, kit, n, impl_kind):
    impl, kind, d, s = _prepare(kit, n, impl_kind)
    nbytes = kit.measure(benchmark, "keys_memory", impl_kind, n, lambda: s.nbytes, ops=1,
                         slow=True, rounds=1, key_kind=kind)
    benchmark.extra_info["nbytes"] = nbytes
    benchmark.extra_info["bytes_per_item"] = nbytes / n
    assert len(s) == n
    assert 8 <= nbytes / n < 4096

