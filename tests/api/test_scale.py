"""Exact reads at scale: every read of large aggregates against a numpy model.

The other read tests use small trees (node size 4, a few thousand items), so
a bug that appears only once subtrees hold thousands of items - in the
two-bound lockstep descent, the float fast path, the rank of a big subtree -
would pass them.  Here aggregates of 200,000 items at the default node size
are built in bulk (``from_arrays``) and by single inserts, with float keys,
int keys and a GENERAL namespace (str and tuple keys, int and str ids), many
duplicate keys (runs longer than a leaf) and random bounds (on and next to
duplicate runs, and outside the key range).  Every read is compared EXACTLY
with a model: the items' (key, id, value) arrays sorted by (key, id), ranks
by ``np.searchsorted``.  The checks run on the fresh aggregate, again after
``insert_many`` / ``delete_many`` batches of more than 16,384 items (the
two-thread paths of section 13, ``core/batch_insert.c`` and ``core/batch_delete.c``) and after a few thousand
single writes (insert, delete, replace, upsert).

Sums are compared exactly too.  The core sums in double-double and rounds
once (section 8, ``core/internal.h``): exact whenever the exact sum of every
subtree fits in 106 bits.  The values here are integers times 2**-40 of up
to 53 bits (magnitude below 2**12), so every subtree sum spans at most ~71
bits and the API's sum must be the correctly rounded exact sum, which is
what ``math.fsum`` returns.  The model computes it from exact integer
prefix sums (``int / 2**40`` is correctly rounded in Python) and, for a
sample of ranges, checks that this equals ``math.fsum`` of the slice.

Queries come from a seeded ``numpy.random.Generator``; every assertion
message names the seed and the query.  Under the sanitizer build of CI
(``AGGTREE_SANITIZED=1``) sizes and query counts are scaled down; batches
stay above 16,384 items so the two-thread paths still run.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from aggtree import Bound
from conftest import load_impl

SANITIZED = bool(os.environ.get("AGGTREE_SANITIZED"))
N = int(os.environ.get("AGGTREE_SCALE_N") or (50_000 if SANITIZED else 230_000))  # items drawn
# distinct items each aggregate must hold after duplicates are dropped (issue 18: >= 2x10^5)
MIN_ITEMS = 200_000 if N == 230_000 else (N * 9) // 10
Q = 150 if SANITIZED else 1_000               # random queries per read kind and stage
BATCH = 20_000                                # > BATCH_THREAD_MIN (16,384)
SINGLES = 600 if SANITIZED else 1_500         # single writes of each kind
SCALE = 2.0 ** -40                            # values are integers * SCALE
VMAX = 2 ** 52                                # |integer| < VMAX: exact doubles


def _values(rng, n):
    """(float values, their exact integer numerators)."""
    ints = rng.integers(-VMAX, VMAX, n)
    return ints.astype(np.float64) * SCALE, ints


# ------------------------------------------------------------------ model --


class Model:
    """The items as arrays sorted by (key code, id code).

    Keys and ids are held as codes whose numeric order is the API's order:
    numeric keys and int ids are their own codes; general keys and str ids
    are positions in a sorted universe (``Codec``).  ``decode`` gives the
    Python key / id back.  ``items`` maps (key code, id code) to the exact
    integer numerator of the value; the arrays are rebuilt on demand.
    """

    def __init__(self, kcodes, icodes, vints, decode_key, decode_id):
        self.items = dict(zip(zip(kcodes.tolist(), icodes.tolist()), vints.tolist()))
        self.decode_key = decode_key
        self.decode_id = decode_id
        self._arrays = None

    # writes (mirror the aggregate's)
    def insert(self, kc, ic, vint):
        assert (kc, ic) not in self.items
        self.items[(kc, ic)] = vint
        self._arrays = None

    def delete(self, kc, ic):
        del self.items[(kc, ic)]
        self._arrays = None

    def arrays(self):
        if self._arrays is None:
            pairs = list(self.items)
            k = np.array([p[0] for p in pairs], dtype=np.float64)
            i = np.array([p[1] for p in pairs], dtype=np.int64)
            vi = np.array(list(self.items.values()), dtype=np.int64)
            order = np.lexsort((i, k))
            k, i, vi = k[order], i[order], vi[order]
            # exact prefix sums of the numerators (Python ints: no overflow)
            cum = np.zeros(len(vi) + 1, dtype=object)
            cum[1:] = np.cumsum(vi.astype(object))
            self._arrays = (k, i, vi, vi.astype(np.float64) * SCALE, cum)
        return self._arrays

    @property
    def k(self):
        a = self._arrays
        return (a if a is not None else self.arrays())[0]

    @property
    def i(self):
        a = self._arrays
        return (a if a is not None else self.arrays())[1]

    @property
    def v(self):
        a = self._arrays
        return (a if a is not None else self.arrays())[3]

    def __len__(self):
        return len(self.items)

    def gap(self, kc, ic=None, after=False):
        """Items < (kc, ic) (after=False) or <= (after=True); without an id,
        before every item of key kc / after every item of kc."""
        k, i = self.k, self.i
        side = "right" if after else "left"
        if ic is None:
            return int(np.searchsorted(k, kc, side))
        a = int(np.searchsorted(k, kc, "left"))
        b = int(np.searchsorted(k, kc, "right"))
        return a + int(np.searchsorted(i[a:b], ic, side))

    def sum(self, lo, hi):
        """The correctly rounded exact sum of values lo..hi-1."""
        if hi <= lo:
            return 0.0
        cum = self.arrays()[4]
        return (cum[hi] - cum[lo]) / 2 ** 40

    def item(self, pos):
        k, i, _, v, _ = self.arrays()
        return (self.decode_key(k[pos]), self.decode_id(i[pos]), float(v[pos]))


def _int_safe(codes):
    """True if every code is an integer an int64 array holds exactly."""
    return bool(np.all(np.abs(codes) < 2.0 ** 62) and np.all(codes == np.round(codes)))


def _same_item(got, want):
    """Equal, with the key and id types as inserted (1 and 1.0 differ)."""
    return (
        got is not None
        and tuple(got) == want
        and type(got[0]) is type(want[0])
        and type(got[1]) is type(want[1])
    )


# ---------------------------------------------------------------- domains --


class NumericDomain:
    """Float or int keys with int ids: codes are the keys and ids themselves."""

    general = False

    def __init__(self, kind):
        self.kind = kind

    def decode_key(self, c):
        return int(c) if self.kind == "int" else float(c)

    def decode_id(self, c):
        return int(c)

    def key(self, c):
        return self.decode_key(c)

    def make_items(self, rng, n):
        """n distinct (key, id) pairs with heavy duplication of keys."""
        if self.kind == "float":
            k = np.round(rng.normal(0.0, 50.0, n), 1)           # ~2,000 keys
            k[rng.random(n) < 0.08] = 0.5                      # a run of ~16,000
            k[rng.random(n) < 0.01] = -np.inf if rng.random() < 0.5 else 1e300
            ids = rng.integers(-(2 ** 62), 2 ** 62, n)
        else:
            k = rng.integers(-3_000, 3_000, n).astype(np.float64)
            k[rng.random(n) < 0.05] = 7.0                      # a run of ~10,000
            k[rng.random(n) < 0.005] = float(2 ** 52 - 1)
            ids = rng.integers(0, 4 * n // 3_000 + 50, n)      # ids repeat across keys
        k = k + 0.0                                            # -0.0 is the key 0.0
        order = np.lexsort((ids, k))
        k, ids = k[order], ids[order]
        keep = np.ones(n, dtype=bool)
        keep[1:] = (k[1:] != k[:-1]) | (ids[1:] != ids[:-1])
        k, ids = k[keep], ids[keep]
        perm = rng.permutation(len(k))
        return k[perm], ids[perm].astype(np.int64)

    def api_keys(self, kcodes):
        """Key array as passed to the API."""
        return kcodes.astype(np.int64) if self.kind == "int" else kcodes

    def query_keys(self, rng, model, n):
        """Key codes for bounds: present keys, their neighbours, random
        values inside and outside the range, and the extremes."""
        k = model.k
        picks = k[rng.integers(0, len(k), n)]
        kind = rng.integers(0, 6, n)
        out = picks.copy()
        lo, hi = float(k[np.isfinite(k)].min()), float(k[np.isfinite(k)].max())
        if self.kind == "float":
            out[kind == 1] = np.nextafter(picks[kind == 1], np.inf)
            out[kind == 2] = np.nextafter(picks[kind == 2], -np.inf)
            out[kind == 3] = np.round(rng.uniform(lo - 20, hi + 20, (kind == 3).sum()), 2)
            out[kind == 4] = 0.5
        else:
            out[kind == 1] = picks[kind == 1] + 1
            out[kind == 2] = picks[kind == 2] - 1
            out[kind == 3] = rng.integers(int(lo) - 50, 3_100, (kind == 3).sum())
            out[kind == 4] = 7.0
        ext = rng.random(n) < 0.03
        out[ext] = rng.choice([-np.inf, np.inf, -1e308, 1e308], ext.sum())
        if self.kind == "int":
            out[np.isinf(out)] = rng.choice([-1e18, 1e18], np.isinf(out).sum())
        return out

    def query_key_obj(self, c):
        """The Python bound for a code: ints stay ints where they can."""
        if self.kind == "int" and float(c).is_integer():
            return int(c)
        return float(c)

    def query_ids(self, rng, model, kcodes):
        """Id codes: present ids of the key (if any) or random ones."""
        out = []
        for kc in kcodes.tolist():
            a = int(np.searchsorted(model.k, kc, "left"))
            b = int(np.searchsorted(model.k, kc, "right"))
            if b > a and rng.random() < 0.7:
                out.append(int(model.i[rng.integers(a, b)]) + int(rng.integers(-1, 2)))
            else:
                out.append(int(rng.integers(-(2 ** 62), 2 ** 62)))
        return out


class GeneralDomain:
    """str and tuple keys, int and str ids, coded by position in universes.

    A key's code: str keys by code point order first, then tuples; tuples
    hold (int, str[, int]) so Python's own tuple order is the API's."""

    general = True
    TUPLE_BASE = 10 ** 7
    STR_ID_BASE = 2 ** 40

    def __init__(self):
        strs = sorted({f"k{x:05d}" for x in range(4_000)} | {"", "a", "k", "k0", "zzz", "\u00e9t\u00e9", "\U0001f600"})
        tups = sorted(
            {(a, f"s{b:03d}") for a in range(-20, 20) for b in range(150)}
            | {(a,) for a in range(-21, 21)}
            | {(a, f"s{b:03d}", c) for a in (-3, 0, 5) for b in range(0, 150, 7) for c in (-1, 2)}
        )
        self.keys = strs + tups
        self.key_code = {}
        for j, s in enumerate(strs):
            self.key_code[("s", s)] = float(j)
        for j, t in enumerate(tups):
            self.key_code[("t", t)] = float(self.TUPLE_BASE + j)
        self.code_key = {c: (s[1]) for s, c in self.key_code.items()}
        self.str_ids = sorted(f"id{x}" for x in range(500))
        self.str_id_code = {s: self.STR_ID_BASE + j for j, s in enumerate(self.str_ids)}
        self.code_str_id = {c: s for s, c in self.str_id_code.items()}
        # prefix -> (first code, last code) of the universe tuples it matches
        self.prefixes = {}
        for j, t in enumerate(tups):
            for m in (1, 2):
                if len(t) >= m:
                    lo, hi = self.prefixes.get(t[:m], (j, j))
                    self.prefixes[t[:m]] = (min(lo, j), max(hi, j))
        self.tups = tups
        self.key_objs = np.empty(len(strs) + len(tups), dtype=object)
        self.key_objs[:] = strs + tups
        self.id_objs = np.empty(len(self.str_ids), dtype=object)
        self.id_objs[:] = self.str_ids
        self.strs = strs

    def kcode(self, key):
        return self.key_code[("t" if isinstance(key, tuple) else "s", key)]

    def icode(self, id_):
        return self.str_id_code[id_] if isinstance(id_, str) else id_

    def decode_key(self, c):
        return self.code_key[float(c)]

    def decode_id(self, c):
        c = int(c)
        return self.code_str_id[c] if c >= self.STR_ID_BASE else c

    key = decode_key

    def decode_arrays(self, kcodes, icodes):
        """Lists of the keys and ids of code arrays (vectorised)."""
        kc = kcodes.astype(np.int64)
        is_t = kc >= self.TUPLE_BASE
        kj = np.where(is_t, kc - self.TUPLE_BASE + len(self.strs), kc)
        keys = self.key_objs[kj].tolist()
        ids = icodes.astype(object)
        is_s = icodes >= self.STR_ID_BASE
        ids[is_s] = self.id_objs[icodes[is_s] - self.STR_ID_BASE]
        return keys, ids.tolist()

    def make_items(self, rng, n):
        """n distinct pairs: str keys from a subset of the universe (so
        absent keys exist between them), tuple keys likewise."""
        scodes = np.array([self.kcode(s) for s in self.strs[::2]])
        tcodes = np.array([self.kcode(t) for t in self.tups if rng.random() < 0.6])
        is_t = rng.random(n) < 0.5
        k = np.where(is_t, tcodes[rng.integers(0, len(tcodes), n)],
                     scodes[rng.integers(0, len(scodes), n)])
        k[rng.random(n) < 0.05] = self.kcode((0, "s010"))      # a run of ~10,000
        ids = rng.integers(0, 2_000, n)
        str_id = rng.random(n) < 0.2
        ids[str_id] = self.STR_ID_BASE + rng.integers(0, len(self.str_ids), str_id.sum())
        order = np.lexsort((ids, k))
        k, ids = k[order], ids[order]
        keep = np.ones(len(k), dtype=bool)
        keep[1:] = (k[1:] != k[:-1]) | (ids[1:] != ids[:-1])
        k, ids = k[keep], ids[keep]
        perm = rng.permutation(len(k))
        return k[perm], ids[perm].astype(np.int64)

    def api_keys(self, kcodes):
        return [self.decode_key(c) for c in kcodes.tolist()]

    def query_keys(self, rng, model, n):
        picks = model.k[rng.integers(0, len(model), n)]
        anyk = rng.integers(0, len(self.keys), n)
        anyc = np.array([self.kcode(self.keys[j]) for j in anyk.tolist()])
        return np.where(rng.random(n) < 0.5, picks, anyc)

    def query_key_obj(self, c):
        return self.decode_key(c)

    def query_ids(self, rng, model, kcodes):
        out = []
        for kc in kcodes.tolist():
            a = int(np.searchsorted(model.k, kc, "left"))
            b = int(np.searchsorted(model.k, kc, "right"))
            if b > a and rng.random() < 0.7:
                out.append(int(model.i[rng.integers(a, b)]))
            elif rng.random() < 0.5:
                out.append(int(rng.integers(-5, 2_010)))
            else:
                out.append(self.STR_ID_BASE + int(rng.integers(0, len(self.str_ids))))
        return out


# ------------------------------------------------------------------ reads --


class Checker:
    """Runs every read kind on random queries against the model."""

    def __init__(self, agg, model, dom, seed, stage):
        self.agg = agg
        self.m = model
        self.dom = dom
        self.rng = np.random.default_rng([seed, len(stage), ord(stage[0])])
        self.tag = f"seed={seed} stage={stage}"
        self.pool = []
        # general keys are encoded and ranked one by one in Python: fewer
        self.q = Q // 2 if dom.general else Q

    def qkey(self):
        """One query key code (drawn in bulk: query_keys is O(n) a call)."""
        if not self.pool:
            self.pool = self.dom.query_keys(self.rng, self.m, 4_096).tolist()
        return self.pool.pop()

    # a random range: (kwargs for the API, lo, hi) as model positions
    def random_range(self):
        rng, m, dom = self.rng, self.m, self.dom
        form = int(rng.integers(0, 9 if dom.general else 8))
        c1, c2 = sorted((self.qkey(), self.qkey()))
        if rng.random() < 0.1:
            c1, c2 = c2, c1                                   # inverted range
        k1, k2 = dom.query_key_obj(c1), dom.query_key_obj(c2)
        if form == 0:
            return {}, 0, len(m)
        if form == 1:                                         # two bare bounds
            return {"lower": k1, "upper": k2}, m.gap(c1), m.gap(c2, after=True)
        if form == 2:                                         # lower only
            inc = bool(rng.random() < 0.5)
            return {"lower": Bound(k1, inclusive=inc)}, m.gap(c1, after=not inc), len(m)
        if form == 3:                                         # upper only
            inc = bool(rng.random() < 0.5)
            return {"upper": Bound(k2, inclusive=inc)}, 0, m.gap(c2, after=inc)
        if form == 4:                                         # exclusive / mixed
            i1, i2 = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            return ({"lower": Bound(k1, inclusive=i1), "upper": Bound(k2, inclusive=i2)},
                    m.gap(c1, after=not i1), m.gap(c2, after=i2))
        if form in (5, 6):                                    # with ids
            d1, d2 = dom.query_ids(rng, m, np.array([c1, c2]))
            i1, i2 = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            lb = Bound(k1, inclusive=i1, id=dom.decode_id(d1))
            ub = Bound(k2, inclusive=i2, id=dom.decode_id(d2))
            if form == 6 and rng.random() < 0.5:
                ub = k2                                       # id on one side only
                return {"lower": lb, "upper": ub}, m.gap(c1, d1, after=not i1), m.gap(c2, after=True)
            return {"lower": lb, "upper": ub}, m.gap(c1, d1, after=not i1), m.gap(c2, d2, after=i2)
        if form == 7:                                         # eq
            return {"eq": k1}, m.gap(c1), m.gap(c1, after=True)
        # prefix (general keys)
        choices = list(dom.prefixes)
        r = rng.random()
        if r < 0.05:
            return {"prefix": ()}, 0, len(m)
        if r < 0.1:
            return {"prefix": (99,)}, 0, 0
        p = choices[int(rng.integers(0, len(choices)))]
        a, b = dom.prefixes[p]
        lo = m.gap(float(dom.TUPLE_BASE + a))
        hi = m.gap(float(dom.TUPLE_BASE + b), after=True)
        return {"prefix": list(p) if rng.random() < 0.3 else p}, lo, hi

    def msg(self, what, q, got, want):
        return f"{self.tag}: {what} {q!r}: got {got!r}, want {want!r}"

    def counts_and_sums(self):
        fsum_checked = 0
        for _ in range(self.q):
            q, lo, hi = self.random_range()
            hi = max(hi, lo)
            got = self.agg.count(**q)
            assert got == hi - lo, self.msg("count", q, got, hi - lo)
            got = self.agg.sum(**q)
            want = self.m.sum(lo, hi)
            assert got == want, self.msg("sum", q, got, want)
            if fsum_checked < 10 and hi - lo > 1_000:
                # the model's exact rounding is math.fsum's
                assert want == math.fsum(self.m.v[lo:hi].tolist()), self.msg("fsum", q, want, None)
                fsum_checked += 1

    def positions(self):
        """at (both signs), min, max, index_of (both orders, with and
        without id) in random ranges."""
        for _ in range(self.q):
            q, lo, hi = self.random_range()
            n = max(hi - lo, 0)
            if n == 0:
                with pytest.raises(IndexError):
                    self.agg.at(0, **q)
                assert self.agg.min(**q) is None and self.agg.max(**q) is None, self.msg("min", q, None, None)
            else:
                off = int(self.rng.integers(-n, n))
                want = self.m.item(lo + (off if off >= 0 else n + off))
                got = self.agg.at(off, **q)
                assert _same_item(got, want), self.msg(f"at({off})", q, got, want)
                got = self.agg.min(**q)
                assert _same_item(got, self.m.item(lo)), self.msg("min", q, got, self.m.item(lo))
                got = self.agg.max(**q)
                assert _same_item(got, self.m.item(hi - 1)), self.msg("max", q, got, self.m.item(hi - 1))
                with pytest.raises(IndexError):
                    self.agg.at(n if off >= 0 else -n - 1, **q)
            kc = self.qkey()
            key = self.dom.query_key_obj(kc)
            use_id = self.rng.random() < 0.5
            ic = self.dom.query_ids(self.rng, self.m, np.array([kc]))[0] if use_id else None
            kw = {"id": self.dom.decode_id(ic)} if use_id else {}
            for order in ("asc", "desc"):
                g = self.m.gap(kc, ic, after=(order == "desc"))
                g = min(max(g, lo), max(hi, lo))
                want = (g - lo) if order == "asc" else (max(hi, lo) - g)
                got = self.agg.index_of(key, order=order, **kw, **q)
                assert got == want, self.msg(f"index_of({key!r}, {kw}, {order})", q, got, want)

    def paginate(self):
        """Keyset pagination through random ranges of up to ~20,000 items
        (tens of pages), ascending and descending."""
        for _ in range(2):
            for _ in range(50):
                q, lo, hi = self.random_range()
                hi = max(hi, lo)
                if 2_000 < hi - lo <= 20_000:
                    break
            for order in ("asc", "desc"):
                size = int(self.rng.integers(200, 1_500))
                got, cursor, pages = [], None, 0
                while True:
                    page = self.agg.paginate(cursor=cursor, order=order, page_size=size, **q)
                    got.extend(page.items)
                    pages += 1
                    if page.items:
                        cursor = page.cursor
                    if page.is_done:
                        break
                    assert pages <= len(self.m) // size + 2, self.msg("paginate loops", q, pages, None)
                pos = np.arange(lo, hi)
                if order == "desc":
                    pos = pos[::-1]
                ks = [it.key for it in got]
                ids = [it.id for it in got]
                vs = np.array([it.value for it in got])
                if not self.dom.general:
                    ktype = int if self.dom.kind == "int" else float
                    assert all(type(x) is ktype for x in ks[:200]), self.msg("paginate key types", q, None, None)
                    assert all(type(x) is int for x in ids[:200]), self.msg("paginate id types", q, None, None)
                    ks = np.array(ks, dtype=np.int64 if ktype is int else np.float64)
                    ids = np.array(ids, dtype=np.int64)
                self._same_arrays(f"paginate {order} size {size}", q, ks, ids, vs, pos)

    def vectorised(self, full=True):
        rng, m, dom = self.rng, self.m, self.dom
        # count_many / sum_many with each pair of inclusive flags (general
        # keys are ranked one by one in Python: fewer of them)
        nq = self.q // 2 if dom.general else self.q
        for li in (True, False):
            for ui in (True, False):
                c = np.sort(np.stack([dom.query_keys(rng, m, nq), dom.query_keys(rng, m, nq)]), axis=0)
                flip = rng.random(nq) < 0.1
                c[:, flip] = c[::-1, flip]
                lows, ups = c[0], c[1]
                if dom.general:
                    la = [dom.decode_key(x) for x in lows.tolist()]
                    ua = [dom.decode_key(x) for x in ups.tolist()]
                elif dom.kind == "int" and rng.random() < 0.5 and _int_safe(lows) and _int_safe(ups):
                    la, ua = lows.astype(np.int64), ups.astype(np.int64)
                else:
                    la, ua = lows, ups
                lo = np.searchsorted(m.k, lows, "left" if li else "right")
                hi = np.maximum(np.searchsorted(m.k, ups, "right" if ui else "left"), lo)
                got = self.agg.count_many(la, ua, lower_inclusive=li, upper_inclusive=ui)
                bad = np.flatnonzero(got != hi - lo)
                assert len(bad) == 0, self.msg(f"count_many li={li} ui={ui}", (la[bad[0]], ua[bad[0]]),
                                               got[bad[0]], hi[bad[0]] - lo[bad[0]])
                got = self.agg.sum_many(la, ua, lower_inclusive=li, upper_inclusive=ui)
                want = np.array([m.sum(a, b) for a, b in zip(lo.tolist(), hi.tolist())])
                bad = np.flatnonzero(got != want)
                assert len(bad) == 0, self.msg(f"sum_many li={li} ui={ui}", (la[bad[0]], ua[bad[0]]),
                                               got[bad[0]], want[bad[0]])
        # index_of_many, at_many, to_arrays in random ranges
        if full:
            ks, ids, vs = self.agg.to_arrays()
            self._same_arrays("to_arrays (all)", {}, ks, ids, vs, np.arange(len(m)))
        cap = 10_000 if dom.general else 40_000     # general keys decode slowly
        for _ in range(10):
            for _ in range(50):
                q, lo, hi = self.random_range()
                hi = max(hi, lo)
                if hi - lo <= cap:
                    break
            kc = dom.query_keys(rng, m, self.q // 4)
            keys = dom.api_keys(kc) if dom.general or (dom.kind == "int" and _int_safe(kc)) else kc
            for order in ("asc", "desc"):
                g = np.clip(np.searchsorted(m.k, kc, "right" if order == "desc" else "left"), lo, hi)
                want = (g - lo) if order == "asc" else (hi - g)
                got = self.agg.index_of_many(keys, order=order, **q)
                bad = np.flatnonzero(got != want)
                assert len(bad) == 0, self.msg(f"index_of_many {order}", (q, kc[bad[0]]),
                                               got[bad[0]], want[bad[0]])
            n = hi - lo
            if n > 0:
                offs = rng.integers(-n, n, self.q // 4)
                ks, ids, vs = self.agg.at_many(offs, **q)
                pos = np.where(offs < 0, offs + n, offs) + lo
                self._same_arrays("at_many", q, ks, ids, vs, pos)
            ks, ids, vs = self.agg.to_arrays(**q)
            self._same_arrays("to_arrays", q, ks, ids, vs, np.arange(lo, hi))

    def _same_arrays(self, what, q, ks, ids, vs, pos):
        m, dom = self.m, self.dom
        assert len(ks) == len(ids) == len(vs) == len(pos), self.msg(what, q, len(ks), len(pos))
        if dom.general:
            wk, wi = dom.decode_arrays(m.k[pos], m.i[pos])
            gk, gi = list(ks), list(ids)
            # list equality: an int id never equals a str id, a str key a tuple
            if gk != wk or gi != wi:
                j = next(j for j in range(len(wk)) if gk[j] != wk[j] or gi[j] != wi[j])
                raise AssertionError(self.msg(what, q, (gk[j], gi[j]), (wk[j], wi[j])))
        else:
            assert ks.dtype == (np.int64 if dom.kind == "int" else np.float64), self.msg(what, q, ks.dtype, None)
            if len(pos) == 0:
                return
            bad = np.flatnonzero((ks != m.k[pos]) | (ids != m.i[pos]))
            assert len(bad) == 0, self.msg(what, q, (ks[bad[0]], ids[bad[0]]),
                                           (m.k[pos][bad[0]], m.i[pos][bad[0]]))
        bad = np.flatnonzero(np.asarray(vs) != m.v[pos])
        assert len(bad) == 0, self.msg(what + " values", q, vs[bad[0]], m.v[pos][bad[0]])

    def all(self, full=True):
        """Every read kind; ``full``: compare the whole content too (general
        keys decode slowly: for those only the last stage does)."""
        self.agg.check()
        assert len(self.agg) == len(self.m), self.msg("len", None, len(self.agg), len(self.m))
        self.counts_and_sums()
        self.positions()
        self.vectorised(full)
        self.paginate()


# ------------------------------------------------------------------ writes --


def _batches(agg, model, dom, rng):
    """insert_many then delete_many of BATCH items each (two-thread paths
    for numeric keys), mirrored in the model."""
    k, i = dom.make_items(rng, BATCH * 2)
    fresh = [(kc, ic) for kc, ic in zip(k.tolist(), i.tolist()) if (kc, ic) not in model.items]
    fresh = fresh[:BATCH]
    assert len(fresh) > 16_384
    kc = np.array([p[0] for p in fresh])
    ic = np.array([p[1] for p in fresh], dtype=np.int64)
    vals, vints = _values(rng, len(fresh))
    agg.insert_many(dom.api_keys(kc), _api_ids(dom, ic), vals)
    for a, b, c in zip(kc.tolist(), ic.tolist(), vints.tolist()):
        model.insert(a, b, c)
    # delete a random BATCH of the items, old and new
    pos = rng.choice(len(model), BATCH, replace=False)
    dk, di = model.k[pos], model.i[pos]
    agg.delete_many(dom.api_keys(dk), _api_ids(dom, di))
    for a, b in zip(dk.tolist(), di.tolist()):
        model.delete(a, b)


def _api_ids(dom, icodes):
    if dom.general:
        return [dom.decode_id(c) for c in icodes.tolist()]
    return icodes


def _single_writes(agg, model, dom, rng):
    """SINGLES each of insert, delete, replace (to another key) and upsert
    (half new items, half overwrites), in random order, mirrored."""
    k, i = dom.make_items(rng, SINGLES * 3)
    new = [(a, b) for a, b in zip(k.tolist(), i.tolist()) if (a, b) not in model.items]
    live = list(model.items)        # candidates for delete / replace / overwrite
    ops = ["insert"] * SINGLES + ["delete"] * SINGLES + ["replace"] * SINGLES + ["upsert"] * SINGLES
    rng.shuffle(ops)
    qkeys = dom.query_keys(rng, model, 8 * SINGLES).tolist()  # targets of replace
    for op in ops:
        vint = int(_values(rng, 1)[1][0])
        v = vint * SCALE
        if op == "insert" or (op == "upsert" and rng.random() < 0.5):
            while new[-1] in model.items:
                new.pop()
            kc, ic = new.pop()
            if op == "insert":
                agg.insert(dom.key(kc), dom.decode_id(ic), v)
            else:
                assert agg.upsert(dom.key(kc), dom.decode_id(ic), v) is True
            model.insert(kc, ic, vint)
            live.append((kc, ic))
            continue
        while True:
            j = int(rng.integers(0, len(live)))
            kc, ic = live[j]
            if (kc, ic) in model.items:
                break
            live[j] = live[-1]
            live.pop()
        if op == "delete":
            agg.delete(dom.key(kc), dom.decode_id(ic))
            model.delete(kc, ic)
        elif op == "upsert":
            assert agg.upsert(dom.key(kc), dom.decode_id(ic), v) is False
            model.items[(kc, ic)] = vint
            model._arrays = None
        else:
            nk = qkeys.pop()
            while (nk, ic) in model.items or not np.isfinite(nk) or abs(nk) > 2 ** 53:
                nk = qkeys.pop()
            agg.replace(dom.key(kc), dom.decode_id(ic), dom.key(nk), v)
            model.delete(kc, ic)
            model.insert(nk, ic, vint)
            live.append((nk, ic))


# ------------------------------------------------------------------ tests --


def _domain(kind):
    return GeneralDomain() if kind == "general" else NumericDomain(kind)


@pytest.mark.parametrize("kind", ["float", "int", "general"])
@pytest.mark.parametrize("build", ["bulk", "single"])
def test_exact_reads_at_scale(kind, build):
    """Build N items (bulk or one by one), check every read; then large
    batches, check; then single writes, check."""
    Agg = load_impl("native")
    seed = {"float": 1801, "int": 1802, "general": 1803}[kind] + (0 if build == "bulk" else 10)
    rng = np.random.default_rng(seed)
    dom = _domain(kind)
    k, i = dom.make_items(rng, N)
    vals, vints = _values(rng, len(k))
    model = Model(k, i, vints, dom.decode_key, dom.decode_id)
    if build == "bulk":
        agg = Agg.from_arrays(dom.api_keys(k), _api_ids(dom, i), vals)
    else:
        agg = Agg()
        keys = dom.api_keys(k)
        ids = _api_ids(dom, i).tolist() if not dom.general else _api_ids(dom, i)
        ins = agg.insert
        for a, b, c in zip(keys.tolist() if not dom.general else keys, ids, vals.tolist()):
            ins(a, b, c)
    assert agg.node_size == 64
    assert len(agg) >= MIN_ITEMS, f"seed={seed}: only {len(agg)} distinct items"
    Checker(agg, model, dom, seed, "built").all(full=not dom.general)
    _batches(agg, model, dom, rng)
    Checker(agg, model, dom, seed, "batches").all(full=not dom.general)
    _single_writes(agg, model, dom, rng)
    Checker(agg, model, dom, seed, "single writes").all()
