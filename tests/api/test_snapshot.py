"""Tests of aggregate snapshots (docs/SNAPSHOT.md): dumps / loads / save /
load and pickling, for the native Aggregate and the pure-Python reference.

The two implementations must write the same bytes for the same contents and
read each other's snapshots; every damaged or lying snapshot must raise
SnapshotError in both, never crash and never yield an aggregate.  The pure
Python reader / writer (aggtree.snapshot) is the oracle of the native one.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import os
import pathlib
import pickle
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aggtree
from aggtree import SnapshotError, snapshot
from aggtree._core import Aggregate as Native
from aggtree._core import _tree_info
from aggtree.reference import Aggregate as Ref

from conftest import _typed  # noqa: E402  (a value with its type made visible)

IMPLS = [pytest.param(Native, id="native"), pytest.param(Ref, id="reference")]


# ---------------------------------------------------------------- helpers --


def content(agg):
    """Everything an aggregate holds, types (of namespaces too) and value
    bits included, independent of namespace order."""
    out = []
    for ns in agg.namespaces():
        items = [(_typed(it.key), _typed(it.id), struct.pack("<d", it.value))
                 for it in agg.iter(namespace=ns)]
        out.append((repr(_typed(ns)), items))
    out.sort()
    return agg.node_size, out


def build(cls, rows, node_size=64):
    """An aggregate of `cls` holding rows (ns, key, id, value), inserted one
    by one with upsert (a repeated pair keeps the last value)."""
    agg = cls(node_size)
    for ns, k, i, v in rows:
        agg.upsert(k, i, v, namespace=ns)
    return agg


def reseal(buf) -> bytes:
    """A snapshot with its total length and checksum made to match its bytes
    (to test a body that lies under a valid checksum)."""
    b = bytearray(buf)
    struct.pack_into("<Q", b, 24, len(b))
    struct.pack_into("<Q", b, len(b) - 8, zlib.crc32(bytes(b[:-8])))
    return bytes(b)


def both_refuse(data, match=None):
    for cls in (Native, Ref):
        with pytest.raises(SnapshotError, match=match):
            cls.loads(data)


def sample_rows():
    rows = [
        (None, 1.5, 2, 3.0), (None, -1.0, 5, 1.0), (None, math.inf, -(2**63), -0.0),
        ("ints", 3, 7, 1.0), ("ints", -(2**53), 2**63 - 1, 2.0), ("ints", 2**53, 0, 0.5),
        (3, None, 7, 1.0), (3, None, -7, 2.0),
        ("s", "x", 1, 2.0), ("s", "", None, 1.0), ("s", "a\x00b", b"\x00\xff", 1e300),
        (("t", 1), (1, 2), None, 2.0), (("t", 1), (1, (2.5, b"q", None)), "id", -5.0),
        (b"", None, None, 1.0), (b"", "", b"", 1.0), (2.5, "\ud800", 1, 1.0),
        (True, 10**30, 7, -0.0), (True, -(10**400), 1.0, 4.0), (False, 2**53 + 1, 1, 1.0),
        ("mixed", 1.0, 7, 1.0), ("mixed", 2, 7, 1.0), ("bools", True, 1, 1.0),
        ("boolfirst", True, 1, 1.0), ("boolfirst", 2.0, 1, 1.0), ("boolfirst", 3.0, 1, 1.0),
        ("strlast", 1.0, 1, 1.0), ("strlast", 2.0, 1, 1.0), ("strlast", "z", 1, 1.0),
        ("bigid", 1.0, 2**63, 1.0), ("boolid", 1.0, True, 1.0),
        (-(2**70), 1.0, 1, 1.0), ((), 1.0, 1, 1.0), (("n", (None,)), 1.0, 1, 1.0),
        ("many", tuple(range(300)), 1, 1.0), ("many", tuple(range(301)), 1, 1.0),
    ]
    return rows


# ------------------------------------------------------------ round trips --


@pytest.mark.parametrize("node_size", [4, 64, 200])
def test_same_bytes_and_cross_loading(node_size):
    rows = sample_rows()
    nat = build(Native, rows, node_size)
    ref = build(Ref, rows, node_size)
    assert content(nat) == content(ref)
    data = nat.dumps()
    assert ref.dumps() == data
    for cls in (Native, Ref):
        for src in (nat, ref):
            got = cls.loads(src.dumps())
            got.check()
            assert content(got) == content(nat)
            assert got.dumps() == data
            assert type(got) is cls


def test_header_fields():
    data = build(Native, sample_rows(), 100).dumps()
    magic, version, order, reserved, node_size, nns, total = snapshot.HEADER.unpack_from(data)
    assert magic == b"\x89AGGSNP\n" and version == 1 and order == ord("L") and reserved == 0
    assert node_size == 100 and total == len(data)
    assert nns == len(build(Ref, sample_rows()).namespaces())
    assert struct.unpack_from("<Q", data, len(data) - 8)[0] == zlib.crc32(data[:-8])


def test_empty_aggregate():
    for cls in (Native, Ref):
        data = cls(8).dumps()
        assert len(data) == 40
        got = cls.loads(data)
        got.check()
        assert len(got) == 0 and got.node_size == 8 and got.namespaces() == []


def test_fast_layout_is_the_agg_key_array():
    """A float namespace is stored as (head, rest) uint64 pairs, then the
    float64 values: the order-preserving images of the C core (core/keys.c)."""
    keys = np.array([-2.5, 0.0, 1.0, 1.0, math.inf])
    ids = np.array([3, -1, 1, 2, 0])
    vals = np.array([1.0, 2.0, -0.0, 4.0, 5.0])
    agg = Native.from_arrays(keys, ids, vals)
    data = agg.dumps()
    nse = snapshot.encode_value(None)
    at = 32 + 24 + ((len(nse) + 7) & ~7)
    kind, _, nslen, count, dlen = snapshot.NS_HEADER.unpack_from(data, 32)
    assert (kind, nslen, count, dlen) == (0, len(nse), 5, 0)
    pairs = np.frombuffer(data, dtype="<u8", count=10, offset=at).reshape(5, 2)
    order = np.lexsort((ids, keys))
    want_heads = [snapshot.f64_to_key(k) for k in keys[order]]
    want_rests = [(int(i) ^ (1 << 63)) & ((1 << 64) - 1) for i in ids[order]]
    assert pairs[:, 0].tolist() == want_heads
    assert pairs[:, 1].tolist() == want_rests
    got_vals = np.frombuffer(data, dtype="<f8", count=5, offset=at + 80)
    assert got_vals.tobytes() == vals[order].tobytes()
    assert len(data) == at + 24 * 5 + 8


def test_general_layout_is_the_item_encoding():
    from aggtree._core import _encode_item

    agg = Native()
    items = [("a", 1), ("b", None), (None, None), ((1, "x"), b"")]
    for k, i in items:
        agg.insert(k, i, 1.0)
    data = agg.dumps()
    kind, _, nslen, count, dlen = snapshot.NS_HEADER.unpack_from(data, 32)
    assert kind == snapshot.K_GENERAL and count == 4
    at = 32 + 24 + ((nslen + 7) & ~7)
    lens = struct.unpack_from("<4I", data, at)
    encs = sorted((_encode_item(k, i) for k, i in items))
    assert list(lens) == [len(e) for e in encs] and dlen == sum(lens)
    at += 16
    assert data[at:at + dlen] == b"".join(encs)


def test_kinds_follow_contents():
    agg = Native()
    agg.insert(1.0, 1, namespace="f")
    agg.insert(1, 1, namespace="i")
    agg.insert(None, 1, namespace="n")
    agg.insert("s", 1, namespace="g")
    agg.insert(1.0, 1, namespace="w")
    agg.insert("s", 2, namespace="w")     # widens the tree to general ...
    agg.delete("s", 2, namespace="w")     # ... whose items are all float again
    agg.insert(1.0, 1, namespace="m")
    agg.insert(2, 1, namespace="m")       # float and int: general
    assert _tree_info(agg, "w")[0] == "general"
    got = Native.loads(agg.dumps())
    got.check()
    kinds = {ns: _tree_info(got, ns)[0] for ns in got.namespaces()}
    assert kinds == {"f": "float", "i": "int", "n": "none", "g": "general", "w": "float",
                     "m": "general"}
    # the reference, which has no kinds, writes the same bytes
    ref = Ref.loads(agg.dumps())
    assert ref.dumps() == agg.dumps()


def test_loaded_aggregate_takes_writes():
    rng = np.random.default_rng(3)
    for cls in (Native, Ref):
        agg = cls.from_arrays(rng.random(3000), np.arange(3000), rng.random(3000))
        agg.insert("x", 1, 1.0, namespace="g")
        got = cls.loads(agg.dumps())
        got.insert_many(rng.random(500) + 2.0, np.arange(500))
        got.delete_many(*[a[:1000] for a in got.to_arrays()[:2]])
        got.insert(1.5, 7)
        got.insert("y", 2, 1.0, namespace="g")
        got.insert(3, 3, namespace="g")
        got.check()
        assert len(got) == 3000 + 500 - 1000 + 1 + 1 + 2
        assert len(agg) == 3001


@pytest.mark.parametrize("cls", IMPLS)
def test_pickle_and_copy(cls):
    import copy

    agg = build(cls, sample_rows())
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        got = pickle.loads(pickle.dumps(agg, protocol=protocol))
        got.check()
        assert type(got) is cls and content(got) == content(agg)
    for twin in (copy.copy(agg), copy.deepcopy(agg)):
        twin.check()
        assert type(twin) is cls and content(twin) == content(agg)
        twin.insert(12345.0, 1)
        assert content(twin) != content(agg)
        assert len(twin) == len(agg) + 1


# (pickle protocol 5, PEP 574: the snapshot travels as a PickleBuffer, which a
# buffer_callback takes out-of-band, as Dask and Ray do, without a copy)

PICKLE_KINDS = ["float", "int", "str", "mixed"]


def kind_agg(cls, kind):
    """An aggregate of `cls` with a few thousand items whose namespaces are
    of `kind`: float keys, int keys, str keys (numeric namespaces are read by
    the native fast path, the others item by item), or all sample_rows."""
    rng = np.random.default_rng(16)
    n = 1500
    ids, vals = rng.permutation(n), rng.random(n) - 0.5
    if kind == "float":
        return cls.from_arrays(rng.random(n), ids, vals, node_size=16)
    if kind == "int":
        keys = rng.permutation(n) * 7 - 5000
        return cls.from_arrays(keys, ids, vals, namespaces=[7] * n)
    if kind == "str":
        keys = [f"k{j:05d}"[: 2 + j % 5] + "x" * (j % 3) for j in range(n)]
        return cls.from_arrays(keys, ids, vals, namespaces=["s"] * n)
    agg = build(cls, sample_rows())
    for j in range(n):
        agg.insert(float(rng.random()), j, float(vals[j]), namespace=("f", 1))
    return agg


@pytest.mark.parametrize("kind", PICKLE_KINDS)
@pytest.mark.parametrize("cls", IMPLS)
def test_pickle_protocols_carry_the_snapshot(cls, kind):
    """Every protocol writes the snapshot in-band (protocol 5 too, without a
    buffer_callback, or with one that keeps the buffer in-band)."""
    agg = kind_agg(cls, kind)
    snap = agg.dumps()
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps(agg, protocol=protocol)
        if protocol >= 3:    # (protocol 2 writes bytes through a latin-1 str)
            assert snap in data and len(data) < len(snap) + 300
        got = pickle.loads(data)
        got.check()
        assert type(got) is cls and content(got) == content(agg)
    kept = []
    data = pickle.dumps(agg, protocol=5, buffer_callback=lambda b: kept.append(b) or True)
    assert len(kept) == 1 and snap in data
    got = pickle.loads(data)
    got.check()
    assert content(got) == content(agg)


@pytest.mark.parametrize("kind", PICKLE_KINDS)
@pytest.mark.parametrize("cls", IMPLS)
def test_pickle_protocol5_out_of_band(cls, kind):
    agg = kind_agg(cls, kind)
    snap = agg.dumps()
    bufs: list = []
    data = pickle.dumps(agg, protocol=5, buffer_callback=bufs.append)
    # out-of-band: the pickle holds the call, the snapshot is the one buffer
    assert len(bufs) == 1 and isinstance(bufs[0], pickle.PickleBuffer)
    assert len(data) < 300 < len(snap)
    raw = bufs[0].raw()
    assert raw.nbytes == len(snap) and raw.readonly and bytes(raw) == snap
    got = pickle.loads(data, buffers=bufs)
    got.check()
    assert type(got) is cls and content(got) == content(agg)
    assert got.dumps() == snap
    # the buffers as another process gets them (bytes, or a writable
    # bytearray of a receive); the aggregate keeps no view of them
    received = bytearray(snap)
    for buffers in ([bytes(snap)], [memoryview(received)], [received]):
        got = pickle.loads(data, buffers=buffers)
        got.check()
        assert content(got) == content(agg)
    received[:] = bytes(len(received))
    got.check()
    assert content(got) == content(agg)
    # the other implementation reads the same buffer
    other = Ref if cls is Native else Native
    assert content(other.loads(bufs[0])) == content(agg)


@pytest.mark.parametrize("cls", IMPLS)
def test_pickle_out_of_band_buffer_damaged(cls):
    agg = kind_agg(cls, "mixed")
    bufs: list = []
    data = pickle.dumps(agg, protocol=5, buffer_callback=bufs.append)
    snap = bytes(bufs[0].raw())
    for at in (0, 20, len(snap) // 2, len(snap) - 1):
        bad = bytearray(snap)
        bad[at] ^= 0x10
        with pytest.raises(SnapshotError):
            pickle.loads(data, buffers=[bad])
    for cut in (0, 40, len(snap) - 1):
        with pytest.raises(SnapshotError):
            pickle.loads(data, buffers=[snap[:cut]])
    with pytest.raises(SnapshotError):
        pickle.loads(data, buffers=[snap + bytes(8)])


def _child_adds(agg):
    agg.insert(-99.0, 1, 1.0, namespace="from-child")
    return agg


def test_multiprocessing_round_trip():
    agg = build(Native, sample_rows())
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(1) as pool:
        got = pool.apply(_child_adds, (agg,))
    got.check()
    assert len(got) == len(agg) + 1
    got.delete(-99.0, 1, namespace="from-child")
    assert content(got) == content(agg)


def test_old_pickles_still_load():
    """Pickles written before snapshots (aggtree._core._restore state)."""
    from aggtree._core import _restore

    agg = _restore(16, [("a", [(1.0, 2, 3.0)]), (None, [("x", None, 1.0)])])
    agg.check()
    assert agg.node_size == 16 and len(agg) == 2
    ref = Ref.__new__(Ref)
    ref.__setstate__({"node_size": 64, "namespaces": [("a", [(1.0, 2, 3.0)])]})
    assert len(ref) == 1


@pytest.mark.parametrize("cls", IMPLS)
def test_bytes_like_inputs(cls):
    data = build(cls, sample_rows()).dumps()
    want = content(cls.loads(data))
    shifted = memoryview(b"x" + data)[1:]        # unaligned
    for src in (bytearray(data), memoryview(data), shifted, np.frombuffer(data, np.uint8)):
        assert content(cls.loads(src)) == want
    with pytest.raises(TypeError):
        cls.loads("not bytes")


@pytest.mark.parametrize("cls", IMPLS)
def test_any_contiguous_buffer_loads_and_strided_ones_are_refused(cls):
    data = build(cls, sample_rows()).dumps()
    want = content(cls.loads(data))
    assert len(data) % 8 == 0
    writable = bytearray(data)
    srcs = [pickle.PickleBuffer(data), pickle.PickleBuffer(writable), memoryview(writable),
            memoryview(pickle.PickleBuffer(writable)),
            np.frombuffer(data, np.uint64).reshape(-1, 2 if len(data) % 16 == 0 else 1),
            memoryview(np.frombuffer(data, ">u8"))]
    for src in srcs:
        got = cls.loads(src)
        got.check()
        assert content(got) == want
    assert writable == data
    doubled = np.repeat(np.frombuffer(data, np.uint8), 2)
    rows = np.frombuffer(data, np.uint8).reshape(8, -1)
    for bad in (memoryview(doubled)[::2], doubled[::2], np.asfortranarray(rows),
                pickle.PickleBuffer(doubled[::2])):
        assert not memoryview(bad).c_contiguous
        with pytest.raises(TypeError, match="a snapshot must be a C-contiguous buffer"):
            cls.loads(bad)


# -------------------------------------------------------------- namespaces --


@pytest.mark.parametrize("cls", IMPLS)
@pytest.mark.parametrize("bad", [object(), frozenset({1}), np.int64(3), (1, object())])
def test_bad_namespace_type(cls, bad, tmp_path):
    agg = cls()
    agg.insert(1.0, 1, namespace="good")
    agg.insert(1.0, 1, namespace=bad)
    with pytest.raises(TypeError, match="namespace"):
        agg.dumps()
    path = tmp_path / "snap"
    path.write_bytes(b"old content")
    with pytest.raises(TypeError, match="namespace"):
        agg.save(path)
    assert path.read_bytes() == b"old content"
    assert sorted(os.listdir(tmp_path)) == ["snap"]


@pytest.mark.parametrize("cls", IMPLS)
def test_pickle_and_copy_keep_any_namespace(cls):
    """Pickling and copying do not fail where dumps does: an aggregate with a
    namespace no snapshot can hold pickles as items per namespace."""
    import copy

    agg = cls()
    agg.insert(1.0, 1, 2.0, namespace=frozenset({1}))
    agg.insert("x", 2, 3.0, namespace=float("nan"))
    agg.insert(1.0, 1, 2.0, namespace="ok")
    bufs: list = []
    got_oob = pickle.loads(pickle.dumps(agg, protocol=5, buffer_callback=bufs.append),
                           buffers=bufs)
    assert bufs == []    # (no snapshot: nothing to send out-of-band)
    pickled = [pickle.loads(pickle.dumps(agg, protocol=p))
               for p in range(2, pickle.HIGHEST_PROTOCOL + 1)]
    for got in (*pickled, got_oob, copy.copy(agg), copy.deepcopy(agg)):
        got.check()
        assert len(got) == 3 and got.sum(namespace=frozenset({1})) == 2.0
        assert got.sum(namespace="ok") == 2.0


@pytest.mark.parametrize("cls", IMPLS)
def test_nan_namespace(cls):
    agg = cls()
    agg.insert(1.0, 1, namespace=float("nan"))
    with pytest.raises(ValueError):
        agg.dumps()


def test_namespace_subclasses_come_back_as_base_types():
    import enum

    class Color(enum.IntEnum):
        RED = 3

    for cls in (Native, Ref):
        agg = cls()
        agg.insert(1.0, 1, namespace=Color.RED)
        agg.insert(1.0, 1, namespace=-0.0)
        got = cls.loads(agg.dumps())
        assert sorted(map(repr, got.namespaces())) == ["0.0", "3"]
        assert type(got.namespaces()[0]) in (int, float)


# -------------------------------------------------------------------- files --


@pytest.mark.parametrize("cls", IMPLS)
def test_save_load_paths_and_files(cls, tmp_path):
    agg = build(cls, sample_rows())
    want = content(agg)
    p = tmp_path / "a.snap"
    agg.save(p)
    assert content(cls.load(p)) == want
    assert content(cls.load(str(p), mmap=True)) == want
    assert content(cls.load(os.fsencode(p))) == want
    agg.save(str(p), fsync=False)
    assert p.read_bytes() == agg.dumps()
    buf = io.BytesIO()
    agg.save(buf)
    assert buf.getvalue() == agg.dumps()
    buf.seek(0)
    assert content(cls.load(buf)) == want
    with open(p, "rb") as f:
        assert content(cls.load(f)) == want
    with open(p, "r") as f, pytest.raises(TypeError, match="binary"):
        cls.load(f)
    assert sorted(os.listdir(tmp_path)) == ["a.snap"]
    with pytest.raises(FileNotFoundError):
        cls.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        agg.save(tmp_path / "no" / "dir" / "x")
    assert sorted(os.listdir(tmp_path)) == ["a.snap"]


@pytest.mark.parametrize("cls", IMPLS)
@pytest.mark.parametrize("failing", ["replace", "fsync", "write"])
def test_failing_save_leaves_old_file(cls, failing, tmp_path, monkeypatch):
    p = tmp_path / "a.snap"
    old = build(cls, sample_rows()[:3])
    old.save(p)
    before = p.read_bytes()
    agg = build(cls, sample_rows())

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device (injected)")

    if failing == "write":
        real_open = open

        class Failing(io.FileIO):
            def write(self, b):
                raise OSError(28, "No space left on device (injected)")

        monkeypatch.setattr(snapshot, "open", lambda fd, mode, closefd=True: Failing(fd, "wb"),
                            raising=False)
        assert real_open
    else:
        monkeypatch.setattr(snapshot.os, failing, boom)
    with pytest.raises(OSError, match="injected"):
        agg.save(p)
    monkeypatch.undo()
    assert p.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["a.snap"]
    agg.save(p)
    assert content(cls.load(p)) == content(agg)


def test_save_is_replace_not_rewrite(tmp_path):
    """The target is replaced by rename: a reader holding the old file keeps
    reading the old snapshot whole."""
    p = tmp_path / "a.snap"
    build(Native, sample_rows()[:3]).save(p)
    with open(p, "rb") as f:
        Native.from_arrays([1.0, 2.0], [1, 2]).save(p)
        assert content(Native.load(f)) == content(build(Native, sample_rows()[:3]))
    assert len(Native.load(p)) == 2


# ------------------------------------------------------------ bad snapshots --


def small_snapshot():
    rows = [(None, 1.5, 2, 3.0), (None, 2.5, 1, 1.0), ("g", "ab", 1, 2.0), ("g", "c", None, 1.0),
            (7, 3, 4, 1.0), ((1,), None, -1, 0.5)]
    data = build(Native, rows).dumps()
    assert build(Ref, rows).dumps() == data
    return data


def test_every_truncation_refused():
    data = small_snapshot()
    for cut in range(len(data)):
        for cls in (Native, Ref):
            with pytest.raises(SnapshotError):
                cls.loads(data[:cut])


def every_bit_flip_refused(data) -> None:
    """Both implementations refuse ``data`` with any one bit flipped."""
    for bit in range(len(data) * 8):
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        for cls in (Native, Ref):
            with pytest.raises(SnapshotError):
                cls.loads(bytes(b))


def test_every_bit_flip_refused():
    data = small_snapshot()
    every_bit_flip_refused(data)


def test_envelope_errors():
    data = small_snapshot()
    both_refuse(b"", "empty")
    both_refuse(b"\x89AGG", "truncated")
    both_refuse(b"PK\x03\x04" + data[4:], "magic")
    both_refuse(b"x" * 100, "magic")
    future = bytearray(data)
    future[8] = 2
    both_refuse(bytes(future), "version 2 is not supported")
    both_refuse(reseal(future), "version 2")
    order = bytearray(data)
    order[10] = ord("B")
    both_refuse(reseal(order), "byte order")
    both_refuse(data + b"\0" * 8, "trailing")
    both_refuse(data[:-1], "truncated")
    node = bytearray(data)
    struct.pack_into("<I", node, 12, 3)
    both_refuse(reseal(node), "node size")
    both_refuse(data[:-8] + struct.pack("<Q", zlib.crc32(data[:-8]) ^ 1), "checksum")


def _fast_rows(n=20):
    return [(None, float(j), j, float(j)) for j in range(n)]


def _fast_keys_at(data):
    _, _, nslen, count, _ = snapshot.NS_HEADER.unpack_from(data, 32)
    return 32 + 24 + ((nslen + 7) & ~7), count


def test_lying_fast_bodies():
    data = build(Native, _fast_rows()).dumps()
    at, n = _fast_keys_at(data)
    b = bytearray(data)
    b[at + 16 * 3:at + 16 * 4], b[at + 16 * 4:at + 16 * 5] = (
        data[at + 16 * 4:at + 16 * 5], data[at + 16 * 3:at + 16 * 4])
    both_refuse(reseal(b), "out of order")
    b = bytearray(data)
    b[at + 16 * 5:at + 16 * 6] = data[at + 16 * 4:at + 16 * 5]
    both_refuse(reseal(b), "duplicate")
    for delta in (1, -1, 10**6):
        b = bytearray(data)
        struct.pack_into("<Q", b, 32 + 8, n + delta)
        both_refuse(reseal(b))
    b = bytearray(data)
    struct.pack_into("<Q", b, 32 + 8, 0)
    both_refuse(reseal(b))
    b = bytearray(data)
    b[32] = 9
    both_refuse(reseal(b), "unknown namespace kind")
    b = bytearray(data)
    b[32] = snapshot.K_NONE      # float keys 1.0, 2.0 ... in a none namespace
    both_refuse(reseal(b), "cannot hold")
    b = bytearray(data)
    b[32] = snapshot.K_INT       # integral float keys read as ints: a valid snapshot
    assert [it.key for it in Native.loads(reseal(b)).iter()] == list(range(n))
    assert [it.key for it in Ref.loads(reseal(b)).iter()] == list(range(n))
    b = bytearray(data)
    struct.pack_into("<d", b, at + 16 * n + 8 * 2, math.nan)
    both_refuse(reseal(b), "not finite")
    b = bytearray(data)
    struct.pack_into("<Q", b, at, 123)       # a NaN image
    both_refuse(reseal(b), "cannot hold")
    b = bytearray(data)
    struct.pack_into("<Q", b, 32 + 16, 8)    # data length on a numeric namespace
    both_refuse(reseal(b), "data length")
    both_refuse(reseal(data[:-8] + b"\0" * 8 + data[-8:]), "unused bytes")
    both_refuse(reseal(data[:-8] + b"\x01" + data[-8:]))


@pytest.mark.parametrize("count", [2**60, 2**61, 2**62, 2**63, 2**64 - 1, 2**32 + 3])
def test_huge_counts_refused(count):
    """Counts whose byte sizes overflow 64 bits are refused before use."""
    for rows in (_fast_rows(3), [(None, "a", 1, 1.0), (None, "b", 1, 1.0)]):
        b = bytearray(build(Native, rows).dumps())
        struct.pack_into("<Q", b, 32 + 8, count)
        both_refuse(reseal(b), "cannot fit")
        b = bytearray(build(Native, rows).dumps())
        struct.pack_into("<Q", b, 32 + 16, count)
        both_refuse(reseal(b))


def test_lying_int_and_float_heads():
    data = build(Native, [(None, j, j, 1.0) for j in range(4)]).dumps()
    at, _ = _fast_keys_at(data)
    for bad in (0.5, 2.0**53 * 2, math.inf):
        b = bytearray(data)
        struct.pack_into("<Q", b, at + 16 * 3, snapshot.f64_to_key(bad))
        both_refuse(reseal(b), "cannot hold")
    data = build(Native, [(None, float(j), j, 1.0) for j in range(4)]).dumps()
    # the image of -0.0, a positive NaN, a negative NaN
    for bad in (0x7FFFFFFFFFFFFFFF, 0xFFF8000000000000, 0x0007FFFFFFFFFFFF):
        b = bytearray(data)
        struct.pack_into("<Q", b, at + 16 * 3, bad)
        both_refuse(reseal(b))


def _general(rows):
    data = build(Native, rows).dumps()
    _, _, nslen, count, dlen = snapshot.NS_HEADER.unpack_from(data, 32)
    lat = 32 + 24 + ((nslen + 7) & ~7)
    dat = lat + ((4 * count + 7) & ~7)
    lens = struct.unpack_from(f"<{count}I", data, lat)
    return data, lat, dat, lens


def test_lying_general_bodies():
    rows = [(None, s, 1, 1.0) for s in ("aa", "bb", "cc", "dd")]
    data, lat, dat, lens = _general(rows)
    # out of order: swap the first two encodings (same length)
    b = bytearray(data)
    b[dat:dat + lens[0]], b[dat + lens[0]:dat + 2 * lens[0]] = (
        data[dat + lens[0]:dat + 2 * lens[0]], data[dat:dat + lens[0]])
    both_refuse(reseal(b), "out of order")
    # duplicate
    b = bytearray(data)
    b[dat + lens[0]:dat + 2 * lens[0]] = data[dat:dat + lens[0]]
    both_refuse(reseal(b), "duplicate")
    # lengths past the end / disagreeing with the total
    for bad in (2**32 - 1, lens[0] + 1, 1, 0):
        b = bytearray(data)
        struct.pack_into("<I", b, lat, bad)
        both_refuse(reseal(b))
    b = bytearray(data)
    struct.pack_into("<Q", b, 32 + 16, 2**40)
    both_refuse(reseal(b), "add up|past the end|cannot fit")
    # an encoding that does not decode (bad tag), and a non-canonical one
    b = bytearray(data)
    b[dat] = 0x99
    both_refuse(reseal(b), "decode")
    b = bytearray(data)
    b[dat + 1] = 0xC3                     # invalid UTF-8 in the key
    both_refuse(reseal(b))
    b = bytearray(data)
    b[dat + lens[0] - 1] = 0x02           # sig says float: fine, but then 1.0 != int? canonical
    got = []
    for cls in (Native, Ref):
        try:
            got.append(content(cls.loads(reseal(b))))
        except SnapshotError:
            got.append("refused")
    assert got[0] == got[1]
    # value not finite
    vat = dat + ((sum(lens) + 7) & ~7)
    b = bytearray(data)
    struct.pack_into("<d", b, vat + 8, math.inf)
    both_refuse(reseal(b), "not finite")


def test_non_canonical_general_namespace():
    """A general namespace whose items are all floats must be stored as a
    float namespace: the general form of it is refused."""
    from aggtree._core import _encode_item

    encs = [_encode_item(float(j), j) for j in range(3)]
    nse = snapshot.encode_value(None)
    body = snapshot.NS_HEADER.pack(2, b"\0\0\0", len(nse), 3, sum(map(len, encs)))
    body += nse + b"\0" * (((len(nse) + 7) & ~7) - len(nse))
    lens = struct.pack("<3I", *map(len, encs))
    body += lens + b"\0" * 4
    data = b"".join(encs)
    body += data + b"\0" * (((len(data) + 7) & ~7) - len(data))
    body += struct.pack("<3d", 1.0, 2.0, 3.0)
    head = snapshot.HEADER.pack(snapshot.MAGIC, 1, 0x4C, 0, 64, 1, 0)
    both_refuse(reseal(head + body + b"\0" * 8), "canonical")


def test_lying_namespaces():
    data = build(Native, [("a", 1.0, 1, 1.0), ("b", 1.0, 1, 1.0)]).dumps()
    # the second namespace renamed "a": a repeat; renamed to something that
    # sorts first: out of order
    i = data.index(b"\x30b\x00")
    for repl, msg in ((b"\x30a\x00", "repeat"), (b"\x30A\x00", "out of order"),
                      (b"\x31b\x00", "does not decode"), (b"\x30b\x01", "does not decode")):
        b = bytearray(data)
        b[i:i + 3] = repl
        both_refuse(reseal(b), msg)
    b = bytearray(data)
    struct.pack_into("<Q", b, 16, 3)
    both_refuse(reseal(b))
    struct.pack_into("<Q", b, 16, 2**60)
    both_refuse(reseal(b), "cannot fit")
    b = bytearray(data)
    b[33] = 1
    both_refuse(reseal(b), "reserved")
    b = bytearray(data)
    struct.pack_into("<I", b, 36, 2**31)
    both_refuse(reseal(b), "past the end")
    b = bytearray(data)
    b[i + 3] = 1                          # padding after the namespace encoding
    both_refuse(reseal(b))


# -------------------------------------------------------------------- fuzz --

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.sampled_from([2**53, 2**53 + 1, -(2**53), 2**63 - 1, -(2**63), 2**63, 10**400])
           | st.floats(allow_nan=False) | st.text(max_size=6) | st.binary(max_size=6))
values = st.recursive(scalars, lambda c: st.tuples(c, c) | st.tuples(c), max_leaves=5)
numeric_key = st.floats(allow_nan=False, width=32) | st.integers(-50, 50) | st.none()
namespaces = st.none() | st.integers(-3, 3) | st.text(max_size=3) | st.tuples(st.integers(0, 2))
rows_strategy = st.lists(
    st.tuples(namespaces, numeric_key | values, st.integers(-(2**63), 2**63 - 1) | values,
              st.floats(-1e9, 1e9)),
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, node_size=st.sampled_from([4, 5, 64]))
def test_fuzz_round_trip_both_implementations(rows, node_size):
    nat = build(Native, rows, node_size)
    ref = build(Ref, rows, node_size)
    data = nat.dumps()
    assert ref.dumps() == data
    for cls in (Native, Ref):
        got = cls.loads(data)
        got.check()
        assert content(got) == content(ref)
        assert got.dumps() == data


def _outcome(cls, data):
    try:
        agg = cls.loads(data)
    except SnapshotError:
        return "refused"
    agg.check()
    return content(agg), agg.dumps()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, edits=st.lists(
    st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "copy"]),
              st.integers(0, 10**6), st.integers(0, 255), st.integers(1, 24)),
    min_size=1, max_size=4), fix=st.booleans())
def test_fuzz_mutated_snapshots(rows, edits, fix):
    """Random edits of a valid snapshot, with or without the length and
    checksum made to match: both implementations refuse it, or both load
    the same contents (and then it is canonical: dumps gives it back)."""
    b = bytearray(build(Native, rows).dumps())
    for op, pos, byte, n in edits:
        pos %= len(b) + 1
        if op == "flip" and pos < len(b):
            b[pos] ^= 1 << (byte % 8)
        elif op == "set" and pos < len(b):
            b[pos] = byte
        elif op == "insert":
            b[pos:pos] = bytes([byte]) * n
        elif op == "delete":
            del b[pos:pos + n]
        elif op == "copy" and len(b) > n:
            src = byte * 7 % (len(b) - n)
            b[pos:pos + n] = b[src:src + n]
    data = bytes(b)
    if fix and len(data) >= 40:
        data = reseal(data)
    nat, ref = _outcome(Native, data), _outcome(Ref, data)
    assert nat == ref
    if nat != "refused":
        assert nat[1] == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | st.binary(max_size=200).map(lambda b: snapshot.MAGIC + b))
def test_fuzz_random_bytes(data):
    for cls in (Native, Ref):
        with pytest.raises(SnapshotError):
            cls.loads(data)
    if len(data) >= 40:
        resealed = bytearray(reseal(data))
        resealed[:8] = snapshot.MAGIC
        resealed[8:10] = b"\x01\x00"
        resealed[10] = 0x4C
        resealed = reseal(resealed)
        assert _outcome(Native, resealed) == _outcome(Ref, resealed)


def test_aggtree_exports():
    assert aggtree.SnapshotError is SnapshotError
    assert issubclass(SnapshotError, ValueError)
    assert pathlib.Path(snapshot.__file__).name == "snapshot.py"


def test_checksum_on_a_second_thread(monkeypatch):
    """Large snapshots are checksummed on another thread while the trees
    are built: the same refusals, a checksum error first when both apply."""
    monkeypatch.setattr(snapshot, "CRC_THREAD_MIN", 0)
    data = small_snapshot()
    want = content(Native.loads(data))
    assert content(Ref.loads(data)) == want
    every_bit_flip_refused(data)
    at, _ = _fast_keys_at(data)
    b = bytearray(data)
    b[at + 16 + 7] ^= 0x80             # item 1 negative: out of order; the checksum wrong
    with pytest.raises(SnapshotError, match="checksum") as info:
        Native.loads(bytes(b))
    assert isinstance(info.value.__cause__, SnapshotError)
    with pytest.raises(SnapshotError, match="out of order|cannot hold"):
        Native.loads(reseal(b))


def test_large_snapshot_streamed_to_file(tmp_path):
    """A save larger than the write chunk (1 MiB) and a load on the
    threaded-checksum path: the file equals dumps(), loads the same."""
    rng = np.random.default_rng(7)
    n = 250_000
    agg = Native.from_arrays(rng.random(n), np.arange(n), rng.random(n))
    agg.insert_many([f"k{j}" for j in range(30000)], list(range(30000)), namespace="s")
    p = tmp_path / "big.snap"
    agg.save(p, fsync=False)
    data = agg.dumps()
    assert p.read_bytes() == data and len(data) > snapshot.CRC_THREAD_MIN
    got = Native.load(p)
    got.check()
    assert got.dumps() == data
    assert np.array_equal(got.to_arrays()[2], agg.to_arrays()[2])
    b = bytearray(data)
    b[len(b) // 2] ^= 4
    with pytest.raises(SnapshotError, match="checksum"):
        Native.loads(bytes(b))


def test_snapshots_see_whole_states_under_concurrent_writes(tmp_path):
    """dumps / save hold the aggregate's lock: a snapshot taken while
    another thread writes in batches holds a whole number of batches."""
    import threading

    batch = 20_000
    agg = Native()
    agg.insert_many(np.arange(batch, dtype=float), np.arange(batch))
    stop = threading.Event()

    def writer():
        j = 1
        while not stop.is_set() and j < 40:
            agg.insert_many(np.arange(batch, dtype=float) + j * batch, np.arange(batch))
            agg.insert(-1.0 - j, 0, namespace="single")
            j += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        sizes = set()
        for k in range(15):
            got = Native.loads(agg.dumps())
            got.check()
            sizes.add(got.count() % batch)
            agg.save(tmp_path / "c.snap", fsync=False)
            got = Native.load(tmp_path / "c.snap")
            got.check()
            sizes.add(got.count() % batch)
    finally:
        stop.set()
        t.join()
    assert sizes == {0}


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=0, max_size=3000), offset=st.integers(0, 40))
def test_native_crc32_is_zlibs(data, offset):
    """snapshot.c's folded crc32 (PCLMULQDQ) gives zlib.crc32's value at
    every length and alignment."""
    from aggtree._core import _snap_crc32

    padded = bytes(offset) + data
    assert _snap_crc32(memoryview(padded)[offset:]) == zlib.crc32(data)
    big = np.random.default_rng(len(data)).integers(0, 256, 100_003 + offset, dtype=np.uint8)
    assert _snap_crc32(big[offset:]) == zlib.crc32(big[offset:].tobytes())


@pytest.mark.parametrize("threads", ["default", "1"])
def test_native_crc32_of_large_buffers_is_zlibs(threads, monkeypatch):
    """From 4 MiB snapshot.c computes the checksum in two halves on two
    threads and combines them: zlib's value at every length around that
    threshold and at odd lengths and alignments (AGGTREE_THREADS=1: one
    thread, for the same values)."""
    from aggtree._core import _snap_crc32

    if threads == "1":
        monkeypatch.setenv("AGGTREE_THREADS", "1")
    big = np.random.default_rng(7).integers(0, 256, (9 << 20) + 64, dtype=np.uint8)
    for n in ((4 << 20) - 1, 4 << 20, (4 << 20) + 1, (4 << 20) + 15, (9 << 20) + 33):
        for off in (0, 3):
            view = big[off:off + n]
            assert _snap_crc32(view) == zlib.crc32(view.tobytes()), (n, off)


@pytest.mark.parametrize("where", ["first half", "second half", "both"])
def test_large_numeric_section_reports_its_first_bad_item(where):
    """The checks of a numeric section over 4 MiB run on two threads
    (snapshot.c): whichever half holds the bad items, the error names the
    first one, and nothing is loaded."""
    n = 300_000                                 # 7.2 MB of items
    agg = Native.from_arrays(np.arange(n, dtype=np.float64), np.arange(n),
                             np.ones(n))
    data = agg.dumps()
    at = 32 + 24 + 8                            # the keys of the one namespace
    first = {"first half": 1_000, "second half": 200_000, "both": 100_000}[where]
    b = bytearray(data)
    struct.pack_into("<d", b, at + 16 * n + 8 * first, math.inf)
    if where == "both":
        struct.pack_into("<Q", b, at + 16 * 250_000, 123)     # a NaN image, later
    with pytest.raises(SnapshotError, match=rf"value inf of item {first} .*not finite"):
        Native.loads(reseal(b))
    b = bytearray(data)
    struct.pack_into("<Q", b, at + 16 * first, 123)
    if where == "both":
        struct.pack_into("<d", b, at + 16 * n + 8 * 250_000, math.nan)
    with pytest.raises(SnapshotError, match=rf"item {first} .*cannot hold"):
        Native.loads(reseal(b))


@pytest.mark.parametrize("threads", ["default", "1"])
def test_read_path_of_a_large_file_is_its_bytes(tmp_path, monkeypatch, threads):
    """read_path reads a file of READ_THREAD_MIN or more in two halves on
    two threads: the bytes come back whole at odd sizes around the cut
    (and in one piece with AGGTREE_THREADS=1); a large snapshot loads by
    path to the same contents."""
    if threads == "1":
        monkeypatch.setenv("AGGTREE_THREADS", "1")
    rng = np.random.default_rng(5)
    for size in (snapshot.READ_THREAD_MIN, snapshot.READ_THREAD_MIN + 4097,
                 3 * snapshot.READ_THREAD_MIN + 13):
        data = rng.integers(0, 256, size, dtype=np.uint8)
        path = tmp_path / f"f{size}"
        data.tofile(path)
        assert np.array_equal(snapshot.read_path(path), data)
    n = 400_000                                 # a 9.6 MB snapshot
    agg = Native.from_arrays(rng.random(n), np.arange(n), rng.random(n))
    agg.save(tmp_path / "a.snap", fsync=False)
    got = Native.load(tmp_path / "a.snap")
    got.check()
    assert got.dumps() == agg.dumps()


def test_read_path_falls_back_when_a_half_comes_up_short(tmp_path, monkeypatch):
    """If a half of the two-thread read comes up short (the file shrank
    while it was read), read_path reads the file again in one piece."""
    data = np.random.default_rng(6).integers(0, 256, snapshot.READ_THREAD_MIN + 99,
                                             dtype=np.uint8)
    data.tofile(tmp_path / "f")
    real = snapshot._pread_into
    calls = []

    def short(fd, view, start, end):
        calls.append(start)
        return real(fd, view, start, end) - (1 if start > 0 else 0)

    monkeypatch.setattr(snapshot, "_pread_into", short)
    assert np.array_equal(snapshot.read_path(tmp_path / "f"), data)
    assert len(calls) == 2                      # the two halves, then the fallback


def test_native_crc32_128_bit_fold_is_zlibs():
    """Where the CPU has VPCLMULQDQ the checksum folds 64-byte registers;
    AGGTREE_NO_VPCLMUL (read at the first checksum, so in a child process)
    keeps the 128-bit fold.  Both give zlib's value at sizes around every
    step of either fold (16, 64, 256 bytes) and at odd alignments."""
    code = (
        "import zlib, numpy as np\n"
        "from aggtree._core import _snap_crc32\n"
        "b = np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8)\n"
        "for n in list(range(60, 600, 7)) + [4095, 65_536 + 80, 299_000]:\n"
        "    for off in (0, 1, 8, 15):\n"
        "        v = b[off:off + n]\n"
        "        assert _snap_crc32(v) == zlib.crc32(v.tobytes()), (n, off)\n"
        "print('ok')\n")
    for env in ({"AGGTREE_NO_VPCLMUL": "1"}, {}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=120)
        assert out.returncode == 0 and out.stdout.strip() == "ok", (env, out.stderr[-2000:])
