"""Stateful property tests: the native Aggregate against the reference.

Hypothesis runs random sequences of writes (insert, delete, upsert,
delete_if_exists, replace across namespaces, replace_or_insert, clear,
batches of which some fail) on the native implementation and on the
reference side by side.  After every step both must have raised the same
exception type or returned the same result, ``check()`` must pass on both,
and their whole content (types included) must agree; every write also draws
a handful of random reads (count, sum, at, index_of, min, max, random,
paginate, the batch and vectorised forms) over random namespaces and bounds
and compares the answers.

Two machines: ``Pooled`` draws keys from a small numeric pool, so duplicate
keys and boundary collisions are the rule; ``Mixed`` draws keys and ids of
every supported type (None, bools, ints including huge ones, floats
including -0.0 and infinities, str with unicode, bytes, nested tuples and
lists), including values that are equal across types (1 == 1.0 == True).
Each runs at node_size 4 (deep trees: many splits and merges) and 64.
"""

from __future__ import annotations

import importlib
import math
import random

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aggtree import Bound, Item, Page

INF = math.inf


def load_impl(name):
    # Imported when a machine starts, so that a missing native build fails
    # these tests instead of breaking collection of the module.
    module = {"native": "aggtree._core", "reference": "aggtree.reference"}[name]
    return importlib.import_module(module).Aggregate


def typed(v):
    if isinstance(v, tuple):
        return ("tuple", tuple(typed(e) for e in v))
    if isinstance(v, float):
        return ("float", v.hex())
    return (type(v).__name__, v)


def norm(result):
    """A comparable form of a read's result (types of keys and ids kept)."""
    if isinstance(result, Page):
        return ("page", [norm(it) for it in result.items], result.is_done)
    if isinstance(result, Item):
        return ("item", typed(result.key), typed(result.id), float(result.value).hex())
    if isinstance(result, (list, tuple)):
        return [norm(r) for r in result]
    if hasattr(result, "tolist"):
        return [norm(r) for r in result.tolist()]
    if isinstance(result, float):
        return ("float", result.hex())
    return typed(result)


def snapshot(agg):
    """Everything an aggregate holds, types included, by namespace."""
    return len(agg), {
        ns: [(typed(it.key), typed(it.id), float(it.value).hex()) for it in agg.iter(namespace=ns)]
        for ns in agg.namespaces()
    }


def object_array(values):
    """A 1-d object array of keys (np.array would turn tuple keys into rows)."""
    out = np.empty(len(values), dtype=object)
    for j, v in enumerate(values):
        out[j] = v
    return out


def outcome(fn, agg):
    try:
        return True, fn(agg)
    except Exception as e:  # noqa: BLE001 - compared by type below
        return False, e


# ---------------------------------------------------------------------------
# Pools
# ---------------------------------------------------------------------------

NUMERIC_KEYS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 2.0, 2.5, -1.5, 8.0]
NUMERIC_IDS = [0, 1, 2, 3]
NUMERIC_VALUES = st.one_of(
    st.integers(-100, 100),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 0.1, 1e15, -1e15, 2.0**-30]),
)

MIXED_SCALARS = [
    None, False, True, 0, 1, -1, 0.0, -0.0, 1.0, 0.5, -INF, INF, 1.7976931348623157e308,
    2**53, 2**53 + 1, 2.0**53, 2**64, -(2**63) - 1, 10**400, -(10**400),
    "", "a", "ab", "\x00", "é", "\U0001f600", "\uffff",
    b"", b"a", b"\x00", b"\xff",
]
MIXED_KEYS = MIXED_SCALARS + [
    (), (1,), (1.0,), (True, "a"), [1, "a"], (1, "a", b""), ("a",), ("a", (None,)),
    (("a",),), [[1]], (None, None), ((1, 2), 3), (b"a", -0.0),
]
MIXED_IDS = [None, 0, 1, 1.0, True, -0.0, "x", "", b"x", (1,), [1], 2**64, INF, ("x", 1)]
MIXED_VALUES = st.one_of(st.integers(-10, 10), st.floats(-1e3, 1e3, allow_nan=False))
MIXED_PREFIXES = [(), (1,), [1], (1.0,), (True,), ("a",), (("a",),), ((1, 2),), (1, "a"), (None,), (b"a",)]


class _Machine(RuleBasedStateMachine):
    """Shared rules; subclasses set the pools and the native node size."""

    node_size = 4
    subject = "native"  # what is tested against the reference
    keys: list = NUMERIC_KEYS
    ids: list = NUMERIC_IDS
    values = NUMERIC_VALUES
    namespaces = [None, "a", 1]
    prefixes: list = [()]

    def __init__(self):
        super().__init__()
        self.sut = load_impl(self.subject)(node_size=self.node_size)
        self.ref = load_impl("reference")()

    # -- helpers ------------------------------------------------------------

    def both(self, fn):
        """Run fn on both; same exception type or same (normalised) result."""
        ok_r, res_r = outcome(fn, self.ref)
        ok_s, res_s = outcome(fn, self.sut)
        if not ok_r or not ok_s:
            assert (ok_r, type(res_r)) == (ok_s, type(res_s)), (
                f"reference: {res_r!r}, {self.subject}: {res_s!r}"
            )
            return None
        return res_r, res_s

    def same(self, fn):
        out = self.both(fn)
        if out is not None:
            assert norm(out[0]) == norm(out[1]), (out[0], out[1])

    def existing(self, data):
        """An existing (key, id, namespace), or a random one."""
        items = [
            (it.key, it.id, ns) for ns in self.ref.namespaces() for it in self.ref.iter(namespace=ns)
        ]
        if items and data.draw(st.booleans(), label="pick existing"):
            return data.draw(st.sampled_from(items), label="existing item")
        return (
            data.draw(st.sampled_from(self.keys), label="key"),
            data.draw(st.sampled_from(self.ids), label="id"),
            data.draw(st.sampled_from(self.namespaces), label="namespace"),
        )

    # Reads are generated from one drawn seed with random.Random: far fewer
    # hypothesis draws per step (the bulk of the run time otherwise), and a
    # failure still names the step and the seed that reproduce it.

    def rand_bound(self, rnd):
        if rnd.random() < 0.25:
            return None
        key = rnd.choice(self.keys)
        form = rnd.randrange(4)
        if form == 0:
            return key
        ident = None if form == 1 else rnd.choice(self.ids)
        return Bound(key, inclusive=rnd.random() < 0.5, id=ident)

    def rand_range(self, rnd):
        form = rnd.randrange(6)
        if form == 0:
            return {}
        if form == 1:
            return {"eq": rnd.choice(self.keys)}
        if form == 2:
            return {"prefix": rnd.choice(self.prefixes)}
        return {"lower": self.rand_bound(rnd), "upper": self.rand_bound(rnd)}

    def compare_reads(self, data):
        """Random reads over random namespaces and bounds, compared."""
        rnd = random.Random(data.draw(st.integers(0, 2**32 - 1), label="reads seed"))
        namespaces = self.ref.namespaces() + ["missing"]
        for _ in range(3):
            ns = rnd.choice(namespaces)
            kw = dict(self.rand_range(rnd), namespace=ns)
            n = self.ref.count(**kw)
            assert self.sut.count(**kw) == n, kw
            s_ref, s_sut = self.ref.sum(**kw), self.sut.sum(**kw)
            _, _, values = self.ref.to_arrays(**kw)
            scale = math.fsum(abs(v) for v in values.tolist())
            assert math.isclose(s_sut, s_ref, rel_tol=1e-9, abs_tol=1e-9 * scale), (kw, s_ref, s_sut)
            if n == 0:
                assert s_sut == 0.0
            off = rnd.randint(-n - 1, n)
            self.same(lambda a: a.at(off, **kw))
            key = rnd.choice(self.keys)
            ident = rnd.choice([None] + list(self.ids))
            order = rnd.choice(["asc", "desc"])
            self.same(lambda a: a.index_of(key, id=ident, order=order, **kw))
            self.same(lambda a: a.min(**kw))
            self.same(lambda a: a.max(**kw))
            seed = rnd.randrange(2**32)
            self.same(lambda a: a.random(rng=random.Random(seed), **kw))
            self.compare_pagination(kw, rnd.randint(1, 5), order)

    def compare_pagination(self, kw, size, order):
        cursors = {"ref": None, "sut": None}
        for _ in range(4):
            p_ref = self.ref.paginate(cursor=cursors["ref"], page_size=size, order=order, **kw)
            p_sut = self.sut.paginate(cursor=cursors["sut"], page_size=size, order=order, **kw)
            assert norm(p_ref) == norm(p_sut), (kw, p_ref, p_sut)
            if p_ref.is_done:
                return
            cursors = {"ref": p_ref.cursor, "sut": p_sut.cursor}

    # -- setup ----------------------------------------------------------------

    @initialize(data=st.data())
    def start(self, data):
        if not data.draw(st.booleans(), label="bulk start"):
            return
        n = data.draw(st.integers(0, 30), label="bulk size")
        keys = [data.draw(st.sampled_from(self.keys)) for _ in range(n)]
        ids = [data.draw(st.sampled_from(self.ids)) for _ in range(n)]
        values = [data.draw(self.values) for _ in range(n)]
        nss = [data.draw(st.sampled_from(self.namespaces)) for _ in range(n)]
        cls_ref, cls_sut = type(self.ref), type(self.sut)
        ok_r, r = outcome(lambda _: cls_ref.from_arrays(keys, ids, values, nss), None)
        ok_s, s = outcome(lambda _: cls_sut.from_arrays(keys, ids, values, nss, node_size=self.node_size), None)
        assert (ok_r, type(r) if not ok_r else None) == (ok_s, type(s) if not ok_s else None), (r, s)
        if ok_r:
            self.ref, self.sut = r, s

    # -- writes ---------------------------------------------------------------

    @rule(data=st.data())
    def insert(self, data):
        key, ident, ns = self.existing(data)
        value = data.draw(self.values, label="value")
        self.same(lambda a: a.insert(key, ident, value, namespace=ns))
        self.compare_reads(data)

    @rule(data=st.data())
    def insert_fresh(self, data):
        key = data.draw(st.sampled_from(self.keys), label="key")
        ident = data.draw(st.sampled_from(self.ids), label="id")
        ns = data.draw(st.sampled_from(self.namespaces), label="namespace")
        value = data.draw(self.values, label="value")
        self.same(lambda a: a.insert(key, ident, value, namespace=ns))
        self.compare_reads(data)

    @rule(data=st.data())
    def delete(self, data):
        key, ident, ns = self.existing(data)
        self.same(lambda a: a.delete(key, ident, namespace=ns))
        self.compare_reads(data)

    @rule(data=st.data())
    def upsert(self, data):
        key, ident, ns = self.existing(data)
        value = data.draw(self.values, label="value")
        self.same(lambda a: a.upsert(key, ident, value, namespace=ns))
        self.compare_reads(data)

    @rule(data=st.data())
    def delete_if_exists(self, data):
        key, ident, ns = self.existing(data)
        self.same(lambda a: a.delete_if_exists(key, ident, namespace=ns))
        self.compare_reads(data)

    @rule(data=st.data(), or_insert=st.booleans())
    def replace(self, data, or_insert):
        key, ident, ns = self.existing(data)
        new_key = data.draw(st.sampled_from(self.keys + [key]), label="new key")
        value = data.draw(self.values, label="value")
        kw = {"namespace": ns}
        if data.draw(st.booleans(), label="move namespace"):
            kw["new_namespace"] = data.draw(st.sampled_from(self.namespaces), label="new namespace")
        if or_insert:
            self.same(lambda a: a.replace_or_insert(key, ident, new_key, value, **kw))
        else:
            self.same(lambda a: a.replace(key, ident, new_key, value, **kw))
        self.compare_reads(data)

    @rule(data=st.data())
    def clear(self, data):
        ns = data.draw(st.sampled_from(self.namespaces), label="namespace")
        self.same(lambda a: a.clear(namespace=ns))
        self.compare_reads(data)

    @precondition(lambda self: len(self.ref) > 40)
    @rule()
    def clear_all(self):
        self.same(lambda a: a.clear_all())

    @rule(data=st.data())
    def insert_many(self, data):
        n = data.draw(st.integers(0, 8), label="batch size")
        triples = [self.existing(data) for _ in range(n)]
        ns = data.draw(st.sampled_from(self.namespaces), label="namespace")
        keys = [t[0] for t in triples]
        ids = [t[1] for t in triples]
        values = [data.draw(self.values, label="value") for _ in range(n)]
        self.same(lambda a: a.insert_many(keys, ids, values, namespace=ns))
        self.compare_reads(data)

    @rule(data=st.data())
    def delete_many(self, data):
        ns = data.draw(st.sampled_from(self.namespaces), label="namespace")
        present = [(it.key, it.id) for it in self.ref.iter(namespace=ns)]
        pairs = []
        for _ in range(data.draw(st.integers(0, 6), label="batch size")):
            if present and data.draw(st.integers(0, 4), label="present?") > 0:
                pairs.append(data.draw(st.sampled_from(present), label="pair"))
            else:
                pairs.append((data.draw(st.sampled_from(self.keys)), data.draw(st.sampled_from(self.ids))))
        keys = [p[0] for p in pairs]
        ids = [p[1] for p in pairs]
        self.same(lambda a: a.delete_many(keys, ids, namespace=ns))
        self.compare_reads(data)

    @rule(data=st.data())
    def batch_and_vector_reads(self, data):
        rnd = random.Random(data.draw(st.integers(0, 2**32 - 1), label="reads seed"))
        ns = rnd.choice(self.ref.namespaces() + ["missing"])
        queries = [dict(self.rand_range(rnd), namespace=ns) for _ in range(3)]
        self.same(lambda a: a.count_batch(queries))
        out = self.both(lambda a: a.sum_batch(queries))
        if out is not None:
            for x, y in zip(*out):
                assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9 * max(1.0, abs(x))), (x, y)
        rng_kw = self.rand_range(rnd)
        n = self.ref.count(namespace=ns, **rng_kw)
        offsets = [rnd.randint(-n, n - 1) for _ in range(3)] if n else []
        self.same(lambda a: a.at_batch([dict(rng_kw, namespace=ns, offset=o) for o in offsets]))
        self.same(lambda a: a.at_many(offsets, namespace=ns, **rng_kw))
        self.same(lambda a: a.to_arrays(namespace=ns, **rng_kw))
        keys = object_array([rnd.choice(self.keys) for _ in range(3)])
        order = rnd.choice(["asc", "desc"])
        self.same(lambda a: a.index_of_many(keys, namespace=ns, order=order, **rng_kw))
        if self.numeric_bounds:
            lows = [rnd.choice(self.keys) for _ in range(3)]
            highs = [rnd.choice(self.keys) for _ in range(3)]
            li, ui = rnd.random() < 0.5, rnd.random() < 0.5
            self.same(lambda a: a.count_many(lows, highs, namespace=ns, lower_inclusive=li, upper_inclusive=ui))
            out = self.both(lambda a: a.sum_many(lows, highs, namespace=ns, lower_inclusive=li, upper_inclusive=ui))
            if out is not None:
                for x, y in zip(out[0].tolist(), out[1].tolist()):
                    assert math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9 * max(1.0, abs(x))), (x, y)

    numeric_bounds = True

    # -- after every step -------------------------------------------------------

    @invariant()
    def agree(self):
        self.ref.check()
        self.sut.check()
        assert len(self.sut) == len(self.ref)
        assert snapshot(self.sut) == snapshot(self.ref)


class PooledMachine(_Machine):
    """Numeric keys from a small pool, int ids: duplicates everywhere."""

    @precondition(lambda self: len(self.ref) < 200)
    @rule(data=st.data())
    def insert_spread(self, data):
        # Many distinct keys at once, so that node_size 64 grows past one leaf.
        n = data.draw(st.integers(65, 130), label="spread size")
        start = data.draw(st.integers(0, 3), label="spread start")
        keys = [start + j / 8 for j in range(n)]
        ids = [100 + j for j in range(n)]
        ns = data.draw(st.sampled_from(self.namespaces), label="namespace")
        self.same(lambda a: a.insert_many(keys, ids, [float(j % 7) for j in range(n)], namespace=ns))
        self.compare_reads(data)


class MixedMachine(_Machine):
    """Keys and ids of every supported type, equal values of different types."""

    keys = MIXED_KEYS
    ids = MIXED_IDS
    values = MIXED_VALUES
    namespaces = [None, "a", 1, 1.0, ("t", 2)]
    prefixes = MIXED_PREFIXES
    numeric_bounds = False  # count_many / sum_many take arrays: numeric pools only


def _case(machine, node_size, name):
    cls = type(name, (machine,), {"node_size": node_size})
    case = cls.TestCase
    # One shrunk failure at a time: shrinking several distinct failures of a
    # long machine run at once can take minutes.
    case.settings = settings(stateful_step_count=25, report_multiple_bugs=False)
    case.__name__ = case.__qualname__ = name
    return case


TestPooledNode4 = _case(PooledMachine, 4, "TestPooledNode4")
TestPooledNode64 = _case(PooledMachine, 64, "TestPooledNode64")
TestMixedNode4 = _case(MixedMachine, 4, "TestMixedNode4")
TestMixedNode64 = _case(MixedMachine, 64, "TestMixedNode64")
