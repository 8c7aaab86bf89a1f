"""Snapshot benchmarks: Aggregate.save / load / dumps / loads and pickling.

Under pytest (like the other bench files; see conftest.py for sizes, the
smoke run and the timing helpers):

``snapshot_load``
    ``Aggregate.load(path)`` of n float items against ``from_arrays`` on the
    same items in random order (what a cold rebuild costs), ``np.fromfile``
    of a file of the same size (the floor: the bytes must be read) and the
    reference's ``load``.
``snapshot_save``
    ``save(path, fsync=False)`` against ``ndarray.tofile`` writing the same
    number of bytes, and the reference's ``save``.
``snapshot_pickle``
    ``pickle.loads(pickle.dumps(agg))`` (protocol 5, in-band), the same with
    the snapshot out-of-band (``buffer_callback``, as Dask and Ray pickle:
    the snapshot is not copied into the pickle nor out of it) against
    ``loads(dumps())``.
``snapshot_str_load`` / ``snapshot_str_save``
    the same with short str keys (general namespaces).

Standalone, for the big figures of issue 16 (10^7 float items, 10^6 str
items; each timing the best of --repeat runs, memory measured in fresh
child processes)::

    python bench/bench_snapshot.py [--n 10000000] [--str-n 1000000]
                                   [--dir /dev/shm] [--repeat 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

try:  # under pytest: the shared kit (bench/conftest.py)
    from benchkit import Agg, RefAgg
except ImportError:  # standalone
    import aggtree
    import aggtree.reference

    Agg = aggtree.Aggregate
    RefAgg = aggtree.reference.Aggregate


def _same_items(a, b) -> None:
    assert len(a) == len(b)
    for ns in a.namespaces():
        ka, ia, va = a.to_arrays(namespace=ns)
        kb, ib, vb = b.to_arrays(namespace=ns)
        assert np.array_equal(ia, ib) and np.array_equal(va, vb)
        assert list(ka) == list(kb)


# ---------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------

LOAD_IMPLS = ["aggtree", "from_arrays", "fromfile", "reference"]


@pytest.fixture(scope="module")
def snapdir(tmp_path_factory):
    return tmp_path_factory.mktemp("snapshots")


def _float_snapshot(kit, n, snapdir, impl="aggtree"):
    path = snapdir / f"float-{impl}-{n}.snap"
    if not path.exists():
        kit.build(impl, "float", n).save(path, fsync=False)
    return path


@pytest.mark.parametrize("impl", LOAD_IMPLS)
def test_snapshot_load(benchmark, kit, n, impl, snapdir):
    if impl == "reference" and not kit.mode.smoke and n > 10**5:
        pytest.skip("reference: Python objects per item; run up to 10^5")
    d = kit.floats(n)
    path = _float_snapshot(kit, n, snapdir)
    if impl == "aggtree":
        fn = lambda: Agg.load(path)  # noqa: E731
    elif impl == "reference":
        fn = lambda: RefAgg.load(path)  # noqa: E731
    elif impl == "from_arrays":
        fn = lambda: Agg.from_arrays(d.keys, d.ids, d.values)  # noqa: E731
    else:
        fn = lambda: np.fromfile(path, dtype=np.uint8)  # noqa: E731
    got = kit.measure(benchmark, "snapshot_load", impl, n, fn, ops=n, slow=n >= 10**6)
    if impl == "fromfile":
        assert len(got) == path.stat().st_size
        return
    got.check()
    ks, ids, vs = got.to_arrays()
    assert np.array_equal(ks, d.sk) and np.array_equal(ids, d.sid)
    assert np.array_equal(vs, d.sv)


@pytest.mark.parametrize("impl", ["aggtree", "tofile", "reference"])
def test_snapshot_save(benchmark, kit, n, impl, snapdir):
    if impl == "reference" and not kit.mode.smoke and n > 10**5:
        pytest.skip("reference: Python objects per item; run up to 10^5")
    size = _float_snapshot(kit, n, snapdir).stat().st_size
    out = snapdir / f"save-{impl}-{n}.snap"
    if impl == "tofile":
        raw = np.frombuffer(_float_snapshot(kit, n, snapdir).read_bytes(), dtype=np.uint8)
        fn = lambda: raw.tofile(out)  # noqa: E731
    else:
        agg = kit.build(impl, "float", n)
        fn = lambda: agg.save(out, fsync=False)  # noqa: E731
    kit.measure(benchmark, "snapshot_save", impl, n, fn, ops=n, slow=n >= 10**6)
    assert out.stat().st_size == size
    assert size <= 24 * n + 200


def _pickle_oob(agg):
    """A protocol 5 pickle round trip with out-of-band buffers (PEP 574)."""
    bufs: list = []
    data = pickle.dumps(agg, protocol=5, buffer_callback=bufs.append)
    assert len(bufs) == 1
    return pickle.loads(data, buffers=bufs)


@pytest.mark.parametrize("impl", ["pickle", "pickle5-oob", "dumps+loads"])
def test_snapshot_pickle(benchmark, kit, n, impl):
    agg = kit.build("aggtree", "float", n)
    if impl == "pickle":
        fn = lambda: pickle.loads(pickle.dumps(agg, protocol=pickle.HIGHEST_PROTOCOL))  # noqa: E731
    elif impl == "pickle5-oob":
        fn = lambda: _pickle_oob(agg)  # noqa: E731
    else:
        fn = lambda: Agg.loads(agg.dumps())  # noqa: E731
    got = kit.measure(benchmark, "snapshot_pickle", impl, n, fn, ops=n, slow=n >= 10**6)
    assert len(got) == n and got.sum() == agg.sum()


@pytest.mark.largest
@pytest.mark.parametrize("impl", ["load", "save", "from_arrays"])
def test_snapshot_str(benchmark, kit, n, impl, snapdir):
    d = kit.data("str", n)
    agg = kit.build("aggtree", "str", n)
    path = snapdir / f"str-{n}.snap"
    if not path.exists():
        agg.save(path, fsync=False)
    if impl == "load":
        fn = lambda: Agg.load(path)  # noqa: E731
    elif impl == "save":
        fn = lambda: agg.save(snapdir / f"str-save-{n}.snap", fsync=False)  # noqa: E731
    else:
        fn = lambda: Agg.from_arrays(d.keys, d.ids, d.values)  # noqa: E731
    got = kit.measure(benchmark, "snapshot_str", impl, n, fn, ops=n, slow=n >= 10**5)
    if impl != "save":
        got.check()
        assert len(got) == n and [it.key for it in got.iter()][:50] == d.sk[:50]


# ---------------------------------------------------------------------------
# standalone: the figures of issue 16
# ---------------------------------------------------------------------------


def _best(fn, repeat):
    """(best wall time, last result) of `repeat` runs; the previous result is
    dropped before each run so that runs do not stack memory."""
    best = float("inf")
    result = None
    for _ in range(repeat):
        result = None
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _float_data(n):
    rng = np.random.default_rng(20261207)
    return rng.random(n), rng.permutation(n).astype(np.int64), rng.random(n)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(what: str, n: int, path: str) -> None:
    """Child process: build by `what` and print 'rss_delta nbytes'.  A small
    build of the same kind runs first, so that what the first call of a
    process sets up once (imports, the sort's and the checksum's threads and
    their malloc arenas) is not counted as memory of the aggregate."""
    small = Agg.from_arrays(*_float_data(10**5))
    if what == "from_arrays":
        small = None
    else:
        small = Agg.loads(small.dumps())
        small = None
    if what == "from_arrays":
        k, i, v = _float_data(n)
        gc.collect()
        base = _rss()
        agg = Agg.from_arrays(k, i, v)
    else:
        gc.collect()
        base = _rss()
        agg = Agg.load(path)
    gc.collect()
    print(_rss() - base, agg.nbytes)


def _memory(what, n, path):
    out = subprocess.run(
        [sys.executable, __file__, "--child", what, "--n", str(n), "--path", path],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    return int(out[0]), int(out[1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10**7)
    ap.add_argument("--str-n", type=int, default=10**6)
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", choices=["from_arrays", "load"])
    ap.add_argument("--path")
    a = ap.parse_args(argv)
    if a.child:
        _child(a.child, a.n, a.path)
        return 0
    n, r = a.n, a.repeat
    work = Path(tempfile.mkdtemp(prefix="aggtree-snapbench-", dir=a.dir))
    snap, raw, out = work / "a.snap", work / "raw.bin", work / "b.snap"
    try:
        print(f"aggtree snapshot figures: n={n:,} float keys / int ids / float values, "
              f"best of {r}, files in {work}")
        k, i, v = _float_data(n)
        t_build, agg = _best(lambda: Agg.from_arrays(k, i, v), r)
        agg.save(snap, fsync=False)
        size = snap.stat().st_size
        t_load, loaded = _best(lambda: Agg.load(snap), r)
        loaded.check()
        t_load_mm, _ = _best(lambda: Agg.load(snap, mmap=True), r)
        _same_items(agg, loaded)
        loaded = None
        buf = np.frombuffer(snap.read_bytes(), dtype=np.uint8)
        buf.tofile(raw)
        t_fromfile, _ = _best(lambda: np.fromfile(raw, dtype=np.uint8), r)
        t_save, _ = _best(lambda: agg.save(out, fsync=False), r)
        t_tofile, _ = _best(lambda: buf.tofile(raw), r)
        t_save_sync, _ = _best(lambda: agg.save(out), 1)
        assert out.read_bytes() == snap.read_bytes()
        buf = None
        t_dumps, data = _best(agg.dumps, r)
        t_loads, _ = _best(lambda: Agg.loads(data), r)
        data = None
        t_pickle, _ = _best(lambda: pickle.loads(pickle.dumps(agg, protocol=5)), r)
        t_pickle_oob, _ = _best(lambda: _pickle_oob(agg), r)
        agg = None
        gc.collect()
        rss_fa, nb_fa = _memory("from_arrays", n, str(snap))
        rss_ld, nb_ld = _memory("load", n, str(snap))
        rows = [
            ("from_arrays (random order)", t_build, ""),
            ("load(path)", t_load, f"{t_build / t_load:.2f}x faster than from_arrays (bar >= 3)"),
            ("load(path, mmap=True)", t_load_mm,
             f"{t_build / t_load_mm:.2f}x faster than from_arrays"),
            ("np.fromfile, same size", t_fromfile,
             f"load / fromfile = {t_load / t_fromfile:.2f} (bar <= 2); mapped "
             f"{t_load_mm / t_fromfile:.2f}"),
            ("save(path, fsync=False)", t_save, ""),
            ("ndarray.tofile, same size", t_tofile,
             f"save / tofile = {t_save / t_tofile:.2f} (bar <= 2)"),
            ("save(path) with fsyncs", t_save_sync, "(one run)"),
            ("dumps()", t_dumps, ""),
            ("loads(bytes)", t_loads, ""),
            ("pickle round trip, in-band", t_pickle,
             f"/ (dumps + loads) = {t_pickle / (t_dumps + t_loads):.2f} (two copies more: "
             f"bench/README.md)"),
            ("pickle round trip, protocol 5 out-of-band", t_pickle_oob,
             f"/ (dumps + loads) = {t_pickle_oob / (t_dumps + t_loads):.2f} (bar <= 1.5)"),
        ]
        w = max(len(name) for name, _, _ in rows)
        for name, t, note in rows:
            print(f"  {name:<{w}} {t * 1e3:9.1f} ms  {note}")
        print(f"  {'snapshot size':<{w}} {size:,} bytes = {size / (24 * n):.4f} x 24 "
              f"bytes/item (bar <= 1.1)")
        print(f"  {'memory after from_arrays':<{w}} nbytes {nb_fa:,}  RSS +{rss_fa:,}")
        print(f"  {'memory after load':<{w}} nbytes {nb_ld:,}  RSS +{rss_ld:,}  "
              f"(load / from_arrays: nbytes {nb_ld / nb_fa:.3f}, RSS {rss_ld / rss_fa:.3f}; "
              f"bar <= 1)")
        if a.str_n:
            m = a.str_n
            rng = np.random.default_rng(7)
            letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)
            raw_s = letters[rng.integers(0, 26, (m, 12))].tobytes().decode()
            lens = rng.integers(1, 13, m).tolist()
            keys = [raw_s[j * 12: j * 12 + L] for j, L in enumerate(lens)]
            ids, vals = rng.permutation(m), rng.random(m)
            t_sb, sagg = _best(lambda: Agg.from_arrays(keys, ids, vals), min(r, 2))
            spath = work / "s.snap"
            t_ss, _ = _best(lambda: sagg.save(spath, fsync=False), r)
            t_sl, sl = _best(lambda: Agg.load(spath), r)
            sl.check()
            print(f"  str keys, n={m:,} (1..12 letters, int ids): from_arrays {t_sb * 1e3:.1f} ms, "
                  f"save {t_ss * 1e3:.1f} ms, load {t_sl * 1e3:.1f} ms, "
                  f"{spath.stat().st_size / m:.1f} bytes/item")
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
