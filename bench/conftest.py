"""Shared workloads, baselines and timing helpers of the aggtree benchmarks.

The suites (``bench_core.py``, ``bench_keys.py``, ``bench_numpy.py``) time
aggtree against the alternatives a user would pick instead, in the same run:

``aggtree``
    ``aggtree.Aggregate`` (the native counted B+tree; the pure-Python
    reference instead when ``AGGTREE_PURE=1`` is set, which every result
    records as ``native: false``).
``reference``
    ``aggtree.reference.Aggregate``: sorted Python lists + ``bisect``, sums by
    brute force.  Skipped above 10^5 items for operations that are O(n) in it.
``sortedcontainers``
    a ``SortedKeyList`` of ``(key, id, value)`` tuples keyed on the key,
    used through ``bisect_key_left`` / ``bisect_key_right``, indexing,
    slicing, ``add`` / ``remove`` / ``update``.
``bisect``
    three static sorted Python lists (keys, ids, values) and the ``bisect``
    module: the read-only lower bound for one query at a time from Python.
``numpy``
    static sorted arrays: ``np.searchsorted`` for count and rank, prefix sums
    (``np.cumsum``) for sums, ``np.lexsort`` for a build: the read-only lower
    bound for vectorised queries.
``sqlite``
    an in-memory table ``t(k REAL, id INTEGER, v REAL)`` with the covering
    index ``t(k, v)``, queried with parameterised ``COUNT(*)`` / ``TOTAL(v)``
    over ``k >= ? AND k <= ?``; one-row INSERT / DELETE statements.

Data: random float keys in [0, 1), int ids (a permutation of 0..n-1), float
values in [0, 1); generated from fixed seeds, so every implementation sees
the same items and the same queries.

Sizes: 10^3, 10^4, 10^5, 10^6 items.  ``pytest bench --benchmark-disable`` is
the CI smoke run: every benchmark runs once at small sizes (``SMOKE_SIZES``)
and still checks its result against a numpy oracle, so the smoke run is a
correctness check of every benchmark and baseline.  ``AGGTREE_BENCH_FULL=1``
forces the full sizes even then; ``AGGTREE_BENCH_SIZES=1000,10000`` and
``AGGTREE_BENCH_BULK=100000`` (ranges of count_many / sum_many) set
them explicitly (``report.py --quick`` uses them).

Single-operation benchmarks time a *batch* of different random queries per
round (``BATCH`` = 1000; 100 for sums over wide ranges and for pages) and
store the batch length as ``extra_info["ops"]``, so that ``stats.min / ops``
(``extra_info["ns_per_op_min"]``) is the time of one call.  Every
implementation in a group (``benchmark.group`` = operation and size) runs the
same batch, so the pytest-benchmark tables compare like with like.  Slow
baselines (O(n) per call at large n) are timed with ``benchmark.pedantic``
and a few rounds instead of pytest-benchmark's calibration.

Writes (insert, delete, insert_many) mutate the shared structures: each
round gets a fresh random batch, and the items are taken out again (untimed)
before the next round, so every test leaves the structures as it found them.

``AGGTREE_BENCH_TRACE=FILE`` appends one line per benchmark to FILE: its
wall-clock start and end (``time.time()``) and its node id, so that a slow
result can be matched against a log of the machine's load taken alongside
(for instance the steal time in ``/proc/stat``).

The bench files are named ``bench_*.py``; ``pytest_collect_file`` below
collects them (the project's pytest configuration only collects ``tests/``).
They import the helpers below as ``from benchkit import ...``: this module
registers itself under that name, because ``conftest`` may name another
directory's conftest when pytest loads several.
"""

from __future__ import annotations

import bisect
import math
import os
import sqlite3
import sys
import time
import zlib
from collections import Counter
from operator import itemgetter
from pathlib import Path

import numpy as np
import pytest

import aggtree
import aggtree.reference

HERE = Path(__file__).resolve().parent
sys.modules["benchkit"] = sys.modules[__name__]

FULL_SIZES = (10**3, 10**4, 10**5, 10**6)
SMOKE_SIZES = (1000, 10000)
FULL_BULK = 10**6     # ranges in count_many / sum_many
SMOKE_BULK = 5000
BATCH = 1000          # queries per round of a single-operation benchmark
WIDE_BATCH = 100      # sums over wide ranges, pages (O(n) baselines)
PAGE_SIZE = 100
REF_MAX_N = 10**5     # the reference is skipped above this for slow operations
SLOW_N = 10**5        # O(n)-per-call baselines use few pedantic rounds from here
WRITE_ROUNDS = 30     # rounds of single-item write benchmarks (BATCH items each)
BULK_ROUNDS = 15      # rounds of insert_many (each side: fastest of these; 5 let
                      # one burst of load on the second core spoil every round)
SWEEP_NODE_SIZES = (8, 16, 32, 64, 128, 256, 512)

Agg = aggtree.Aggregate
RefAgg = aggtree.reference.Aggregate
NATIVE = Agg.__module__ != RefAgg.__module__
DEFAULT_NODE_SIZE = Agg().node_size


# ---------------------------------------------------------------------------
# Collection and mode
# ---------------------------------------------------------------------------


def pytest_collect_file(file_path, parent):
    """Collect ``bench/bench_*.py`` (pytest's default pattern is ``test_*.py``).

    A file named on the command line is already collected by pytest itself."""
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and file_path.parent == HERE
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """With AGGTREE_BENCH_TRACE set: log when each benchmark ran."""
    path = os.environ.get("AGGTREE_BENCH_TRACE")
    t0 = time.time()
    yield
    if path:
        with open(path, "a") as fh:
            fh.write(f"{t0:.3f} {time.time():.3f} {item.nodeid}\n")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


class Mode:
    """Sizes and repetition counts of this run (see the module docstring)."""

    def __init__(self, config) -> None:
        disabled = bool(config.getoption("benchmark_disable", default=False))
        self.smoke = disabled and not _env_flag("AGGTREE_BENCH_FULL")
        env_sizes = os.environ.get("AGGTREE_BENCH_SIZES", "").strip()
        if env_sizes:
            self.sizes = tuple(int(float(s)) for s in env_sizes.split(",") if s.strip())
        else:
            self.sizes = SMOKE_SIZES if self.smoke else FULL_SIZES
        env_bulk = os.environ.get("AGGTREE_BENCH_BULK", "").strip()
        if env_bulk:
            self.bulk = int(float(env_bulk))
        else:
            self.bulk = SMOKE_BULK if self.smoke else FULL_BULK
        self.write_rounds = 1 if self.smoke else WRITE_ROUNDS
        self.bulk_rounds = 1 if self.smoke else BULK_ROUNDS


_MODE: Mode | None = None


def pytest_configure(config):
    global _MODE
    _MODE = Mode(config)
    config.addinivalue_line(
        "markers", "largest: run only at the largest size of the run (10^6 in full runs)"
    )


def pytest_report_header(config):
    kind = "native aggtree._core" if NATIVE else "pure-Python reference (AGGTREE_PURE)"
    m = _MODE
    return (
        f"aggtree bench: {kind}, default node_size={DEFAULT_NODE_SIZE}; "
        f"{'smoke' if m.smoke else 'full'} mode, sizes={list(m.sizes)}, bulk={m.bulk}"
    )


def pytest_generate_tests(metafunc):
    """Parametrise every benchmark that takes ``n`` by the sizes of this run."""
    if "n" in metafunc.fixturenames:
        sizes = _MODE.sizes
        if metafunc.definition.get_closest_marker("largest"):
            sizes = sizes[-1:]
        metafunc.parametrize("n", sizes, ids=[_size_id(s) for s in sizes])


def _size_id(n: int) -> str:
    k = round(math.log10(n)) if n > 0 else 0
    return f"1e{k}" if 10**k == n else str(n)


def seed_of(*parts) -> int:
    """A stable seed for a purpose and a size (``hash()`` is salted per run)."""
    return zlib.crc32(repr(parts).encode())


def rng_for(*parts) -> np.random.Generator:
    return np.random.default_rng(seed_of(*parts))


# ---------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------


class FloatData:
    """n items with random float keys: unsorted arrays (as a user would have
    them), the same sorted by ``(key, id)``, prefix sums, and the numpy
    oracles that every benchmark checks its results against."""

    kind = "float"

    def __init__(self, n: int) -> None:
        rng = rng_for("float-data", n)
        self.n = n
        self.keys = rng.random(n)
        self.ids = rng.permutation(n).astype(np.int64)
        self.values = rng.random(n)
        order = np.lexsort((self.ids, self.keys))
        self.sk = self.keys[order]
        self.sid = self.ids[order]
        self.sv = self.values[order]
        self.cum = np.concatenate(([0.0], np.cumsum(self.sv)))

    def __len__(self) -> int:
        return self.n

    # -- queries (Python objects, the same for every implementation) --------

    def ranges(self, m: int, purpose: str) -> list:
        """m random ranges ``(lo, hi)``, lo <= hi, uniform in [0, 1)."""
        q = np.sort(rng_for(purpose, self.n).random((m, 2)), axis=1)
        return [tuple(r) for r in q.tolist()]

    def wide_ranges(self, m: int, purpose: str) -> list:
        """m ranges from [0, 0.1) to [0.9, 1): about 80% of the items each."""
        q = rng_for(purpose, self.n).random((m, 2))
        return list(zip((q[:, 0] * 0.1).tolist(), (0.9 + q[:, 1] * 0.1).tolist()))

    def offsets(self, m: int, purpose: str) -> list:
        return rng_for(purpose, self.n).integers(0, self.n, m).tolist()

    def present_keys(self, m: int, purpose: str) -> list:
        return self.sk[rng_for(purpose, self.n).integers(0, self.n, m)].tolist()

    def new_items(self, m: int, purpose: str, round_: int = 0) -> tuple:
        """m new items as (keys, ids, values) arrays; the ids (>= n) are unused,
        so the items are new whatever their keys."""
        rng = rng_for("new", purpose, self.n, round_)
        return rng.random(m), np.arange(self.n, self.n + m, dtype=np.int64), rng.random(m)

    # -- oracles ------------------------------------------------------------

    def count_of(self, lows, highs) -> np.ndarray:
        return np.searchsorted(self.sk, highs, "right") - np.searchsorted(self.sk, lows, "left")

    def sum_of(self, lows, highs) -> np.ndarray:
        return (self.cum[np.searchsorted(self.sk, highs, "right")]
                - self.cum[np.searchsorted(self.sk, lows, "left")])


def _random_strings(rng: np.random.Generator, m: int, max_len: int = 16) -> list:
    """m random ASCII-letter strings of 1..max_len characters."""
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
    raw = letters[rng.integers(0, len(letters), (m, max_len))].tobytes().decode("ascii")
    lens = rng.integers(1, max_len + 1, m).tolist()
    return [raw[j * max_len: j * max_len + L] for j, L in enumerate(lens)]


class StrData:
    """n items with short random str keys (1..16 letters)."""

    kind = "str"

    def __init__(self, n: int) -> None:
        rng = rng_for("str-data", n)
        self.n = n
        self.keys = _random_strings(rng, n)
        self.ids = rng.permutation(n).tolist()
        self.values = rng.random(n).tolist()
        items = sorted(zip(self.keys, self.ids, self.values))
        self.sorted_items = items
        self.sk = [t[0] for t in items]

    def ranges(self, m: int, purpose: str) -> list:
        s = _random_strings(rng_for(purpose, self.n), 2 * m)
        return [tuple(sorted(p)) for p in zip(s[0::2], s[1::2])]

    def offsets(self, m: int, purpose: str) -> list:
        return rng_for(purpose, self.n).integers(0, self.n, m).tolist()

    def new_items(self, m: int, purpose: str, round_: int = 0) -> tuple:
        rng = rng_for("new", purpose, self.n, round_)
        return _random_strings(rng, m), list(range(self.n, self.n + m)), rng.random(m).tolist()

    def count_of(self, ranges) -> list:
        bl, br, sk = bisect.bisect_left, bisect.bisect_right, self.sk
        return [br(sk, hi) - bl(sk, lo) for lo, hi in ranges]


class TupleData:
    """n items with ``(group, score)`` keys: about sqrt(n) random str groups
    (1..16 letters), float scores; queried with ``prefix=(group,)``."""

    kind = "tuple"

    def __init__(self, n: int) -> None:
        rng = rng_for("tuple-data", n)
        self.n = n
        g = max(1, math.isqrt(n))
        self.groups = sorted(set(_random_strings(rng, g)))
        gi = rng.integers(0, len(self.groups), n)
        scores = rng.random(n).tolist()
        self.keys = [(self.groups[j], s) for j, s in zip(gi.tolist(), scores)]
        self.ids = rng.permutation(n).tolist()
        self.values = rng.random(n).tolist()
        self.group_count = Counter(self.groups[j] for j in gi.tolist())

    def prefixes(self, m: int, purpose: str) -> list:
        idx = rng_for(purpose, self.n).integers(0, len(self.groups), m).tolist()
        return [(self.groups[j],) for j in idx]


# ---------------------------------------------------------------------------
# Structures
# ---------------------------------------------------------------------------


class SqliteTable:
    """The SQLite baseline: an in-memory table with a covering index on the
    key (``(k, v)``, so that COUNT and SUM over a key range read the index
    only) and the parameterised statements a user would write."""

    COUNT = "SELECT COUNT(*) FROM t WHERE k >= ? AND k <= ?"
    SUM = "SELECT TOTAL(v) FROM t WHERE k >= ? AND k <= ?"
    INSERT = "INSERT INTO t (k, id, v) VALUES (?, ?, ?)"
    DELETE = "DELETE FROM t WHERE k = ? AND id = ?"
    PAGE_FIRST = "SELECT k, id, v FROM t WHERE k >= ? ORDER BY k LIMIT ?"
    PAGE_NEXT = "SELECT k, id, v FROM t WHERE k > ? ORDER BY k LIMIT ?"

    def __init__(self, keys, ids, values) -> None:
        self.con = sqlite3.connect(":memory:")
        self.con.execute("CREATE TABLE t (k REAL NOT NULL, id INTEGER NOT NULL, v REAL NOT NULL)")
        self.con.executemany(self.INSERT, zip(keys, ids, values))
        self.con.execute("CREATE INDEX t_k ON t (k, v)")
        self.con.commit()

    def nbytes(self) -> int:
        (pages,) = self.con.execute("PRAGMA page_count").fetchone()
        (size,) = self.con.execute("PRAGMA page_size").fetchone()
        return pages * size

    def __len__(self) -> int:
        return self.con.execute("SELECT COUNT(*) FROM t").fetchone()[0]


class PyLists:
    """The ``bisect`` baseline: static sorted Python lists of keys, ids, values."""

    def __init__(self, d: FloatData) -> None:
        self.k = d.sk.tolist()
        self.i = d.sid.tolist()
        self.v = d.sv.tolist()

    def __len__(self) -> int:
        return len(self.k)


def make_skl(items):
    from sortedcontainers import SortedKeyList

    return SortedKeyList(items, key=itemgetter(0))


def deep_sizeof(obj, seen=None) -> int:
    """Bytes of lists, tuples and their scalar elements, each object counted
    once (how much memory a Python-object baseline really holds)."""
    if seen is None:
        seen = set()
    total = 0
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        total += sys.getsizeof(o)
        if isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


def skl_nbytes(skl) -> int:
    seen: set = set()
    total = sys.getsizeof(skl)
    for part in (skl._lists, skl._keys, skl._maxes, skl._index):
        total += deep_sizeof(part, seen)
    return total


class Kit:
    """What the benchmarks share: the mode, the data sets, the structures
    (built once per session and size, restored after every write test), and
    the timing helpers."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self._data: dict = {}
        self._structs: dict = {}

    # -- data and structures -----------------------------------------------

    def data(self, kind: str, n: int):
        key = (kind, n)
        if key not in self._data:
            self._data[key] = {"float": FloatData, "str": StrData, "tuple": TupleData}[kind](n)
        return self._data[key]

    def floats(self, n: int) -> FloatData:
        return self.data("float", n)

    def build(self, impl: str, kind: str, n: int, node_size: int | None = None):
        """The structure of implementation ``impl`` holding data set (kind, n).
        Cached: every test that mutates one restores it."""
        key = (impl, kind, n, node_size)
        s = self._structs.get(key)
        if s is None:
            s = self._structs[key] = self._build(impl, kind, n, node_size)
        return s

    def _build(self, impl, kind, n, node_size):
        d = self.data(kind, n)
        if impl in ("aggtree", "reference"):
            cls = Agg if impl == "aggtree" else RefAgg
            kw = {} if node_size is None else {"node_size": node_size}
            return cls.from_arrays(d.keys, d.ids, d.values, **kw)
        if impl == "sortedcontainers":
            if kind == "float":
                return make_skl(zip(d.sk.tolist(), d.sid.tolist(), d.sv.tolist()))
            # from (key, id)-sorted items: the sort is stable, so equal keys keep id order
            return make_skl(sorted(zip(d.keys, d.ids, d.values)))
        if impl == "bisect":
            return PyLists(d)
        if impl == "numpy":
            return d
        if impl == "sqlite":
            return SqliteTable(d.keys.tolist(), d.ids.tolist(), d.values.tolist())
        raise ValueError(f"unknown implementation {impl!r}")

    def skip_slow_reference(self, impl: str, n: int, limit: int = REF_MAX_N) -> None:
        """Skip the pure-Python reference above ``limit`` items for operations
        that are O(n) in it (never in the smoke run)."""
        if impl == "reference" and n > limit and not self.mode.smoke:
            pytest.skip(f"reference is O(n) per call here; skipped above {limit} items")

    # -- timing ---------------------------------------------------------------

    def _label(self, benchmark, op, impl, n, ops, info) -> None:
        benchmark.group = f"{op} n={n:,}"
        default = DEFAULT_NODE_SIZE if impl.startswith("aggtree") else None
        benchmark.extra_info.update(
            op=op, impl=impl, n=n, ops=ops, native=NATIVE, node_size=info.pop("node_size", default)
        )
        benchmark.extra_info.update(info)

    @staticmethod
    def _per_op(benchmark, ops) -> None:
        stats = getattr(benchmark, "stats", None)
        if stats is not None and ops:
            benchmark.extra_info["ns_per_op_min"] = stats.stats.min / ops * 1e9
            benchmark.extra_info["ns_per_op_median"] = stats.stats.median / ops * 1e9

    def measure(self, benchmark, op, impl, n, fn, *, ops, slow=False, rounds=3, **info):
        """Time ``fn()`` (one batch of ``ops`` calls) and return its result.

        ``slow``: the batch takes seconds; time ``rounds`` rounds with
        ``benchmark.pedantic`` instead of calibrating."""
        self._label(benchmark, op, impl, n, ops, info)
        if slow and not benchmark.disabled:
            result = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0)
        else:
            result = benchmark(fn)
        self._per_op(benchmark, ops)
        return result

    def measure_writes(self, benchmark, op, impl, n, *, setup, target, teardown, verify,
                       ops, rounds, **info):
        """Time a mutating batch: every round ``args = setup(r)`` (untimed),
        ``target(*args)`` (timed), ``verify(result, *args)`` after the first
        round, then ``teardown(*args)`` (untimed) restores the structure.

        The structure is restored even if a round or the check fails."""
        self._label(benchmark, op, impl, n, ops, info)
        state = {"round": 0, "verified": False, "pending": None}

        def _setup():
            args = setup(state["round"])
            state["round"] += 1
            state["pending"] = args
            return args, {}

        def _target(*args):
            r = target(*args)
            if not state["verified"]:
                verify(r, *args)
                state["verified"] = True
            return r

        def _teardown(*args):
            state["pending"] = None
            teardown(*args)

        try:
            # (disabled: pedantic runs setup and target once, without teardown)
            result = benchmark.pedantic(
                _target, setup=_setup, teardown=_teardown, rounds=rounds, warmup_rounds=1
            )
        finally:
            if state["pending"] is not None:
                teardown(*state["pending"])
        self._per_op(benchmark, ops)
        return result


@pytest.fixture(scope="session")
def kit() -> Kit:
    return Kit(_MODE)


@pytest.fixture(scope="session")
def mode() -> Mode:
    return _MODE
