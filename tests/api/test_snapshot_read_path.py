"""Aggregate.load(path) reading large numeric sections straight into trees.

A snapshot file of snapshot.READ_THREAD_MIN bytes or more is read by
snapshot.read_path_streamed: its numeric sections of snapshot.STREAM_MIN
bytes or more go from the file into their trees' leaves
(src/aggtree/snapshot_read.c: chunks of whole leaves, each checksummed,
checked and put in place), the rest into a buffer with holes that
snapshot.parse walks as usual.  Anything unexpected falls back to reading
the file whole.  These tests check that the two ways give the same
aggregate, or the same SnapshotError, for the same bytes: on big sections
(two halves on two threads in C, from 4 MiB), on small ones (the
thresholds lowered), at every node size's leaf and chunk boundaries.
"""

from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np
import pytest

from aggtree import SnapshotError, snapshot
from aggtree._core import Aggregate as Native
from aggtree._core import _snap_crc32, _snap_crc32_combine, _snap_read_section

KEYS_AT = 32 + 24 + 8           # the keys of a lone namespace None (an 8-byte encoding)


def _streamed(path):
    return snapshot.read_path_streamed(path, _snap_read_section, _snap_crc32,
                                       _snap_crc32_combine)


def _reseal(b: bytearray) -> bytes:
    """The snapshot with its checksum made right again (a body that lies)."""
    struct.pack_into("<Q", b, len(b) - 8, zlib.crc32(bytes(b[:-8])))
    return bytes(b)


def _same_outcome(path, data: bytes):
    """load(path) gives what loads(data) gives: the same snapshot back, or
    a SnapshotError with the same message."""
    try:
        want = Native.loads(data)
    except SnapshotError as exc:
        with pytest.raises(SnapshotError) as got:
            Native.load(path)
        assert str(got.value) == str(exc)
        return None
    agg = Native.load(path)
    agg.check()
    assert agg.dumps() == want.dumps() == data
    return agg


@pytest.fixture
def small_thresholds(monkeypatch):
    """Stream sections from 1 KiB, in files from 4 KiB (C still cuts a
    section in two halves only from 4 MiB)."""
    monkeypatch.setattr(snapshot, "STREAM_MIN", 1 << 10)
    monkeypatch.setattr(snapshot, "READ_THREAD_MIN", 4 << 10)


def _mixed(rng, n_big: int, node_size: int):
    """Large float, int and None-key namespaces between small ones and a
    general one (str keys)."""
    agg = Native(node_size)
    agg.insert_many(rng.random(n_big), np.arange(n_big), rng.random(n_big), namespace="f")
    agg.insert_many(rng.permutation(n_big * 3)[:n_big] - n_big, np.arange(n_big),
                    rng.standard_normal(n_big), namespace=7)
    agg.insert_many([None] * (n_big // 2), rng.permutation(n_big)[: n_big // 2],
                    rng.random(n_big // 2), namespace=None)
    for i in range(5):
        agg.insert(float(i), i, 1.5, namespace=("small", i))
    for i in range(50):
        agg.insert(f"k{i:03d}", i, float(i), namespace="general")
    return agg


@pytest.mark.parametrize("node_size", [4, 7, 64, 300])
@pytest.mark.parametrize("threads", ["default", "1"])
def test_streamed_load_is_the_snapshot(tmp_path, monkeypatch, small_thresholds, node_size,
                                       threads):
    """Every large numeric section is read into its tree; the aggregate is
    the snapshot's, item for item and node for node (it dumps the same
    bytes), and passes check()."""
    if threads == "1":
        monkeypatch.setenv("AGGTREE_THREADS", "1")
    rng = np.random.default_rng(node_size)
    agg = _mixed(rng, 3000, node_size)
    path = tmp_path / "a.snap"
    agg.save(path, fsync=False)
    got = _streamed(path)
    assert got is not None
    _, sections, crc = got
    assert sorted(kind for kind, _, _ in sections.values()) == [0, 1, 3]
    body = memoryview(path.read_bytes())[:-8]
    assert crc(body) == zlib.crc32(body)
    loaded = _same_outcome(path, path.read_bytes())
    assert loaded.count(namespace="f") == 3000 and len(loaded.namespaces()) == 9
    loaded.insert(2.5, -1, 1.0, namespace="f")   # takes writes like any other
    loaded.check()


@pytest.mark.parametrize("threads", ["default", "1"])
def test_large_section_on_two_threads(tmp_path, monkeypatch, threads):
    """A section of over 4 MiB is read in two halves (on two threads unless
    AGGTREE_THREADS=1), with default thresholds."""
    if threads == "1":
        monkeypatch.setenv("AGGTREE_THREADS", "1")
    n = 400_003
    rng = np.random.default_rng(3)
    agg = Native.from_arrays(rng.random(n), np.arange(n), rng.random(n))
    path = tmp_path / "big.snap"
    agg.save(path, fsync=False)
    assert _streamed(path) is not None
    loaded = _same_outcome(path, path.read_bytes())
    assert loaded.sum() == agg.sum() and loaded.at(n // 2) == agg.at(n // 2)


def _damages(n: int, per_leaf: int):
    """(name, offset, bytes) edits of a lone float namespace of n items:
    key images and values that no float namespace holds, and order
    errors, at the first item, at leaf and chunk edges, at the middle
    (the two halves' edge) and at the last item."""
    chunk = max(1, (256 << 10) // (16 * per_leaf)) * per_leaf
    spots = sorted({1, per_leaf - 1, per_leaf, chunk - 1, chunk, chunk + 1,
                    n // 2 - 1, n // 2, n // 2 + 1, n - 1} & set(range(1, n)))
    nan_image = struct.pack("<Q", 0xFFF8000000000000)
    for j in spots:
        yield f"NaN key {j}", KEYS_AT + 16 * j, nan_image
        yield f"inf value {j}", KEYS_AT + 16 * n + 8 * j, struct.pack("<d", math.inf)
        yield f"order {j}", KEYS_AT + 16 * j, struct.pack("<Q", 0x8000000000000000)
        yield f"duplicate {j}", KEYS_AT + 16 * j, None          # = item j - 1


@pytest.mark.parametrize("node_size", [4, 64])
def test_lying_large_sections_give_the_whole_file_errors(tmp_path, small_thresholds,
                                                        node_size):
    """A large section with a bad item, checksum resealed or not, fails
    with the very message a load of the bytes gives (the streamed read
    falls back to it), and never yields an aggregate."""
    n = 200_000                                   # 4.8 MB: two halves
    agg = Native.from_arrays(np.arange(n, dtype=np.float64) + 0.5, np.arange(n),
                             np.ones(n), node_size=node_size)
    data = agg.dumps()
    path = tmp_path / "bad.snap"
    path.write_bytes(data)
    assert _streamed(path) is not None
    checked = 0
    for name, at, edit in _damages(n, node_size):
        b = bytearray(data)
        if edit is None:
            b[at:at + 16] = b[at - 16:at]
        else:
            b[at:at + len(edit)] = edit
        for bad in (_reseal(b), bytes(b)):
            path.write_bytes(bad)
            assert _same_outcome(path, bad) is None, name
            checked += 1
    assert checked > 40


def test_truncated_and_padded_files(tmp_path, small_thresholds):
    """A large snapshot cut short or with bytes after it: the header's
    length is checked before any section is read."""
    n = 200_000
    data = Native.from_arrays(np.arange(n, dtype=np.float64), np.arange(n),
                              np.ones(n)).dumps()
    path = tmp_path / "t.snap"
    for bad in (data[:-1], data[: len(data) // 2], data + b"\0" * 8):
        path.write_bytes(bad)
        assert _same_outcome(path, bad) is None


def test_read_section_directly(tmp_path):
    """_snap_read_section: the tree and the section's crc32 when it is
    valid; None (and nothing loaded) when the file ends inside the section
    or an item fails a check."""
    n = 10_000
    agg = Native.from_arrays(np.arange(n, dtype=np.float64), np.arange(n), np.full(n, 2.0))
    data = agg.dumps()
    path = tmp_path / "s.snap"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        tree, crc = _snap_read_section(fd, KEYS_AT, n, 0, 64)
        assert crc == zlib.crc32(data[KEYS_AT:KEYS_AT + 24 * n])
        assert _snap_read_section(fd, KEYS_AT + 16, n, 0, 64) is None     # past the end
        assert _snap_read_section(fd, KEYS_AT, n, 3, 64) is None          # keys not None
    finally:
        os.close(fd)
    half = Native.from_arrays(np.arange(n, dtype=np.float64) + 0.5, np.arange(n), np.ones(n))
    path.write_bytes(half.dumps())
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _snap_read_section(fd, KEYS_AT, n, 1, 64) is None          # 0.5 is no int
        assert _snap_read_section(fd, KEYS_AT, n, 0, 64) is not None
    finally:
        os.close(fd)


def test_short_read_falls_back(tmp_path, monkeypatch, small_thresholds):
    """If a read between the sections comes up short (the file shrank),
    read_path_streamed gives up and load(path) reads the file whole."""
    agg = _mixed(np.random.default_rng(1), 2000, 64)
    path = tmp_path / "a.snap"
    agg.save(path, fsync=False)
    real = snapshot._pread_into
    calls = []

    def short(fd, view, start, end):
        calls.append(start)
        return real(fd, view, start, end) - (1 if len(calls) == 1 else 0)

    monkeypatch.setattr(snapshot, "_pread_into", short)
    assert _streamed(path) is None
    calls.clear()
    _same_outcome(path, path.read_bytes())
    assert len(calls) >= 2


def test_small_and_general_only_files_are_read_whole(tmp_path):
    """Nothing to stream: read_path_streamed declines (None)."""
    path = tmp_path / "g.snap"
    agg = Native()
    agg.insert_many([f"k{i:07d}" for i in range(400_000)], np.arange(400_000))
    agg.save(path, fsync=False)
    assert os.path.getsize(path) >= snapshot.READ_THREAD_MIN
    assert _streamed(path) is None
    _same_outcome(path, path.read_bytes())
    small = tmp_path / "s.snap"
    Native.from_arrays(np.arange(10.0), np.arange(10)).save(small, fsync=False)
    assert _streamed(small) is None
