# _snapshot.pxi - the native snapshot writer and reader (docs/SNAPSHOT.md).
#
# Included at the end of _core.pyx (`include "_snapshot.pxi"`); the Aggregate
# methods dumps / loads / save / load / __reduce_ex__ / __copy__ are one-line
# calls into the module-level functions here.  The pure-Python twin of this
# file is python/aggtree/snapshot.py: it owns the parts that run once per
# snapshot or per namespace (the header, the checksum, namespace encodings,
# the file handling), and this file borrows them (snapshot.parse walks the
# namespaces and calls back into _snap_read_fast / _snap_read_general).
#
# What is done here, per item, without Python objects:
#   save, numeric trees  agg_tree_read straight into the output buffer (the
#                        file layout is the agg_key array layout);
#   save, general trees  the stored bytes of each key (head + tail) copied
#                        out; only the first item is decoded (to learn the
#                        namespace's kind, which depends on its contents);
#   load, numeric kinds  one validating loop over the key images and values
#                        (snapshot.c, two threads for large sections), then
#                        agg_tree_build on pointers into the read buffer;
#                        load(path) reads large ones from the file straight
#                        into the leaves instead (snapshot_read.c, through
#                        snapshot.read_path_streamed).
# A general namespace is decoded item by item on load (each encoding must be
# canonical: decoded and encoded again to the same bytes), then built from
# the stored bytes.

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uintptr_t

import sys as _sys
import zlib as _zlib
from pickle import PickleBuffer as _PickleBuffer

import aggtree.snapshot as _snapmod
from aggtree._types import SnapshotError

cdef extern from "snapshot.h" nogil:
    uint32_t agg_snapshot_crc32(uint32_t crc, const uint8_t *p, size_t n)
    int agg_snapshot_crc32_fast()
    uint32_t agg_snapshot_crc32_combine(uint32_t crc1, uint32_t crc2, uint64_t len2)
    int64_t agg_snapshot_check_items(const uint64_t *keys, const double *vals, uint64_t n,
                                     int kind, int *what)
    int agg_snapshot_read_numeric(int fd, uint64_t off, uint64_t n, int kind, agg_tree *t,
                                  uint32_t *crc)
    enum:
        AGG_SNAP_KIND_FLOAT, AGG_SNAP_KIND_INT, AGG_SNAP_KIND_NONE
        AGG_SNAP_READ_OK

# (the kinds snapshot.c checks are the trees' kinds, _scalars.pxi)
if (AGG_SNAP_KIND_FLOAT, AGG_SNAP_KIND_INT, AGG_SNAP_KIND_NONE) != (K_FLOAT, K_INT, K_NONE):
    raise ImportError("snapshot.h and _scalars.pxi disagree on the kind codes")

cdef bint _SNAP_LE = _sys.byteorder == "little"
cdef bint _SNAP_FAST_CRC = agg_snapshot_crc32_fast() != 0


cdef uint32_t _snap_crc(uint32_t crc, const uint8_t *p, size_t n, object view) except? 0xFFFFFFFF:
    """zlib.crc32 of p[0:n] (view: the same bytes as a buffer, for zlib),
    continuing from crc; snapshot.c's folded crc32 without the GIL where
    the CPU has carry-less multiplication."""
    cdef uint32_t r
    if not _SNAP_FAST_CRC:
        return _zlib.crc32(view, crc)
    with nogil:
        r = agg_snapshot_crc32(crc, p, n)
    return r


def _snap_crc32(buf):
    """crc32(buffer) for snapshot.parse: zlib's value, without the GIL."""
    cdef const uint8_t[::1] v = buf
    if v.shape[0] == 0:
        return _zlib.crc32(b"")
    return _snap_crc(0, &v[0], <size_t>v.shape[0], buf)
cdef bytes _SNAP_MAGIC = _snapmod.MAGIC
cdef uint32_t _SNAP_TAIL_LEN_MASK = 0x00FFFFFFu


cdef inline Py_ssize_t _snap_pad8(Py_ssize_t n) noexcept nogil:
    return (n + 7) & ~(<Py_ssize_t>7)


cdef int _snap_host_check() except -1:
    if not _SNAP_LE:
        raise SnapshotError("snapshots are little-endian; the native implementation does "
                            "not read or write them on a big-endian host")
    return 0


# ------------------------------------------------------------------ save --

cdef Py_ssize_t _snap_key_len(agg_key k) except -1:
    """Length of the item encoding E a GENERAL key holds (without the
    core's zero padding of a head shorter than 8 bytes)."""
    cdef uint8_t small[8]
    cdef Py_ssize_t nnum = 0, end
    if k.rest != 0:
        return 8 + <Py_ssize_t>((<agg_tail *>k.rest).len & _SNAP_TAIL_LEN_MASK)
    # E fits in the head: it holds no number (each takes 10 bytes), and the
    # codec is self-delimiting, so skipping key and id finds its end.
    agg_key_to_bytes(k, small, 8)
    end = kc_skip(<const unsigned char *>small, 8, 0, 0, &nnum)
    end = kc_skip(<const unsigned char *>small, 8, end, 0, &nnum)
    return end + nnum


cdef tuple _snap_plan_general(_Tree tree, uint64_t n):
    """(kind, key array, lengths array, data length) of a GENERAL tree.

    kind is the snapshot kind of its contents: K_GENERAL unless every item
    is of one numeric kind (then the key array holds FAST images)."""
    cdef cnp.ndarray karr = np.empty((n, 2), dtype=np.uint64)
    cdef agg_key *kp = <agg_key *>cnp.PyArray_DATA(karr)
    cdef cnp.ndarray fast
    cdef agg_key *fp
    cdef cnp.ndarray lens
    cdef uint32_t *lp
    cdef uint64_t j
    cdef int kind = -1, k
    cdef double d
    cdef int64_t i
    cdef Py_ssize_t total = 0, m
    agg_tree_read(_tt(tree), 0, n, 0, kp, NULL)
    # The kind depends on the contents: decode items while they all fit one
    # numeric kind (a GENERAL tree almost always fails on its first item).
    # The last item first: str, bytes and tuple keys sort after None and
    # numbers, so a tree that holds any has one there.
    fast = None
    if n > 1:
        key, ident = _decode_general(kp[n - 1])
        if _item_kind(key, ident, &d, &i) == K_GENERAL:
            kind = K_GENERAL
            n = 0                                  # (skip the loop below)
    for j in range(n):
        key, ident = _decode_general(kp[j])
        k = _item_kind(key, ident, &d, &i)
        if k == K_GENERAL or (kind != -1 and k != kind):
            kind = K_GENERAL
            break
        kind = k
        if fast is None:
            fast = np.empty((n, 2), dtype=np.uint64)
            fp = <agg_key *>cnp.PyArray_DATA(fast)
        fp[j] = _fast_key(d, i)
    if kind != K_GENERAL:
        return (kind, fast, None, 0)
    n = <uint64_t>karr.shape[0]
    lens = np.empty(n, dtype=np.uint32)
    lp = <uint32_t *>cnp.PyArray_DATA(lens)
    for j in range(n):
        m = _snap_key_len(kp[j])
        lp[j] = <uint32_t>m
        total += m
    return (K_GENERAL, karr, lens, total)


cdef inline void _snap_put_u64(uint8_t *p, uint64_t v) noexcept nogil:
    memcpy(p, &v, 8)          # little-endian host (checked)


cdef inline void _snap_put_u32(uint8_t *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)


# Bytes of a chunk when streaming to a file: small enough to stay in L2 while
# it is checksummed and written, large enough that the per-chunk Python calls
# (write, crc32) cost nothing.
cdef Py_ssize_t _SNAP_CHUNK = 1 << 20


cdef class _SnapSink:
    """Where a snapshot is written: the whole output buffer (dumps), or a
    chunk buffer flushed to a binary file object (save), whose crc32 is
    accumulated chunk by chunk while the chunk is in cache."""
    cdef uint8_t *buf          # the chunk (or whole output) being filled
    cdef Py_ssize_t cap        # its size
    cdef Py_ssize_t n          # bytes filled in it
    cdef Py_ssize_t pos        # bytes emitted in total
    cdef object arr            # owner of buf (numpy array; None in whole mode)
    cdef object f              # file object, or None (whole mode)
    cdef object crc            # crc32 of the flushed bytes (file mode)

    cdef uint8_t *reserve(self, Py_ssize_t m) except NULL:
        """Room for m more bytes (flushing first if needed)."""
        if self.n + m > self.cap:
            if self.f is None:
                raise AssertionError("snapshot size miscomputed")
            self.flush()
            if m > self.cap:
                self.arr = np.empty(m, dtype=np.uint8)
                self.buf = <uint8_t *>cnp.PyArray_DATA(self.arr)
                self.cap = m
        return self.buf + self.n

    cdef inline void commit(self, Py_ssize_t m) noexcept:
        self.n += m
        self.pos += m

    cdef int put(self, const void *src, Py_ssize_t m) except -1:
        cdef Py_ssize_t k
        cdef const uint8_t *p = <const uint8_t *>src
        while m > 0:
            # a large block goes through the chunk in pieces
            k = m if self.f is None or m <= self.cap - self.n else self.cap - self.n
            if k == 0:
                self.flush()
                continue
            memcpy(self.reserve(k), p, k)
            self.commit(k)
            p += k
            m -= k
        return 0

    cdef int zeros(self, Py_ssize_t m) except -1:
        if m > 0:
            memset(self.reserve(m), 0, m)
            self.commit(m)
        return 0

    cdef int flush(self) except -1:
        if self.f is None or self.n == 0:
            return 0
        view = memoryview(self.arr)[:self.n]
        self.crc = _snap_crc(<uint32_t>self.crc, self.buf, <size_t>self.n, view)
        self.f.write(view)
        self.n = 0
        return 0


cdef _SnapSink _snap_sink_whole(uint8_t *buf, Py_ssize_t total):
    cdef _SnapSink s = _SnapSink.__new__(_SnapSink)
    s.buf = buf
    s.cap = total
    return s


cdef _SnapSink _snap_sink_file(object f):
    cdef _SnapSink s = _SnapSink.__new__(_SnapSink)
    s.arr = np.empty(_SNAP_CHUNK, dtype=np.uint8)
    s.buf = <uint8_t *>cnp.PyArray_DATA(s.arr)
    s.cap = _SNAP_CHUNK
    s.f = f
    s.crc = 0
    return s


cdef int _snap_emit(_SnapSink out, Py_ssize_t total, uint32_t node_size,
                    list plans) except -1:
    """Write the whole snapshot but its trailer to `out`."""
    cdef Py_ssize_t nslen, m, step
    cdef uint64_t n, j, c
    cdef int kind
    cdef _Tree tree
    cdef agg_tree *tp
    cdef bytes nse
    cdef agg_key *kp
    cdef uint32_t *lp
    cdef uint8_t *dst
    cdef Py_ssize_t data_len
    cdef uint8_t head[32]
    memcpy(head, <const char *>_SNAP_MAGIC, 8)
    head[8] = 1
    head[9] = 0
    head[10] = 0x4C
    head[11] = 0
    _snap_put_u32(head + 12, node_size)
    _snap_put_u64(head + 16, <uint64_t>len(plans))
    _snap_put_u64(head + 24, <uint64_t>total)
    out.put(head, 32)
    step = out.cap // 16 if out.cap >= 16 else 1
    for plan in plans:
        nse, tree, kind, n, karr, lens, data_len = plan
        tp = _tt(tree)   # the caller holds the aggregate's lock: no writer runs
        nslen = len(nse)
        memset(head, 0, 24)
        head[0] = <uint8_t>kind
        _snap_put_u32(head + 4, <uint32_t>nslen)
        _snap_put_u64(head + 8, n)
        _snap_put_u64(head + 16, <uint64_t>data_len)
        out.put(head, 24)
        out.put(<const char *>nse, nslen)
        out.zeros(_snap_pad8(nslen) - nslen)
        if kind != K_GENERAL and karr is None:
            # a numeric tree: its keys, then its values, read from the tree
            # straight into place (the layout is agg_key's)
            j = 0
            while j < n:
                c = min(<uint64_t>step, n - j)
                dst = out.reserve(16 * c)
                with nogil:
                    agg_tree_read(tp, j, c, 0, <agg_key *>dst, NULL)
                out.commit(16 * c)
                j += c
        elif kind != K_GENERAL:
            # a GENERAL tree of numeric items: their FAST images
            out.put(cnp.PyArray_DATA(karr), 16 * n)
        else:
            kp = <agg_key *>cnp.PyArray_DATA(karr)
            lp = <uint32_t *>cnp.PyArray_DATA(lens)
            out.put(lp, 4 * n)
            out.zeros(_snap_pad8(4 * n) - 4 * n)
            for j in range(n):
                m = lp[j]
                agg_key_to_bytes(kp[j], out.reserve(m), <size_t>m)
                out.commit(m)
            out.zeros(_snap_pad8(data_len) - data_len)
        j = 0
        while j < n:
            c = min(<uint64_t>(2 * step), n - j)
            dst = out.reserve(8 * c)
            with nogil:
                agg_tree_read(tp, j, c, 0, NULL, <double *>dst)
            out.commit(8 * c)
            j += c
    return 0


cdef tuple _snap_plan(Aggregate agg):
    """(total size, per-namespace plans) of `agg`'s snapshot; the caller
    holds the aggregate's lock until the plans are written."""
    cdef _Tree tree
    cdef Py_ssize_t total = 32 + 8, size
    cdef uint64_t n
    plans = []
    for ns, tree in list(agg._trees.items()):
        plans.append((_snapmod.encode_namespace(ns), tree))
    plans.sort(key=_operator.itemgetter(0))
    rows = []
    for nse, tree in plans:
        n = agg_tree_len(_tt(tree))
        if tree.kind == K_GENERAL:
            kind, karr, lens, data_len = _snap_plan_general(tree, n)
        else:
            kind, karr, lens, data_len = tree.kind, None, None, 0
        size = 24 + _snap_pad8(len(nse))
        if kind == K_GENERAL:
            size += _snap_pad8(4 * n) + _snap_pad8(data_len) + 8 * n
        else:
            size += 24 * n
        total += size
        rows.append((nse, tree, kind, n, karr, lens, data_len))
    return total, rows


cdef object _snap_dumps(Aggregate agg):
    """The snapshot of `agg` as bytes (docs/SNAPSHOT.md)."""
    cdef Py_ssize_t total
    cdef uint8_t *buf
    cdef object out
    cdef cnp.ndarray arr = None
    cdef _SnapSink sink
    _snap_host_check()
    agg._acquire()           # no write runs while we read the trees
    try:
        total, rows = _snap_plan(agg)
        out = PyBytes_FromStringAndSize(NULL, total)
        buf = <uint8_t *>PyBytes_AS_STRING(out)
        agg_advise_huge_pages(buf, <size_t>total)
        if (<uintptr_t>buf) & 7:
            # (never seen: bytes data is 16-byte aligned in CPython) the
            # keys are written as uint64s, so fill an aligned buffer instead
            arr = np.empty(total, dtype=np.uint8)
            buf = <uint8_t *>cnp.PyArray_DATA(arr)
        sink = _snap_sink_whole(buf, total)
        _snap_emit(sink, total, agg._node_size, rows)
        assert sink.pos == total - 8
    finally:
        agg._release()
    _snap_put_u64(buf + total - 8,
                  _snap_crc(0, buf, total - 8, memoryview(arr if arr is not None else out)[:total - 8]))
    if arr is not None:
        return arr.tobytes()
    return out


cdef object _snap_write(Aggregate agg, object f):
    """Stream the snapshot of `agg` to the binary file object `f`."""
    cdef Py_ssize_t total
    cdef _SnapSink sink
    cdef uint8_t trailer[8]
    _snap_host_check()
    agg._acquire()
    try:
        total, rows = _snap_plan(agg)
        sink = _snap_sink_file(f)
        _snap_emit(sink, total, agg._node_size, rows)
        sink.flush()
    finally:
        agg._release()
    assert sink.pos == total - 8
    _snap_put_u64(trailer, <uint64_t>sink.crc)
    f.write(trailer[:8])


# ------------------------------------------------------------------ load --

cdef int _snap_check_count(object r, uint64_t count, uint64_t per_item) except -1:
    """(snapshot.parse checks this first; again here, before any C
    arithmetic on the count can overflow)"""
    if count > <uint64_t>(r.end - r.pos) // per_item:
        raise SnapshotError(f"{count} items cannot fit in the rest of the snapshot")
    return 0


cdef const uint8_t *_snap_base(object r) except NULL:
    cdef const uint8_t[::1] view = r.buf
    return &view[0]


def _snap_read_fast(r, int kind, uint64_t count, ns, uint32_t node_size):
    """A _Tree of `kind` from the numeric section at the reader's position."""
    _snap_check_count(r, count, 24)
    cdef Py_ssize_t kat, vat
    if <Py_ssize_t>(24 * count) <= r.end - r.pos:
        # (the messages below are formatted only when they are raised: two
        # f-strings per namespace cost more than building a small tree)
        kat = r.pos
        vat = kat + 16 * count
        r.pos = vat + 8 * count
    else:
        kat = r.take(16 * count, f"the keys of namespace {ns!r:.80}")
        vat = r.take(8 * count, f"the values of namespace {ns!r:.80}")
    cdef const uint8_t *base = _snap_base(r)
    cdef const agg_key *kp = <const agg_key *>(base + kat)
    cdef const double *vp = <const double *>(base + vat)
    cdef int what = 0
    cdef Py_ssize_t j
    cdef uint64_t bad = 0
    cdef agg_status st
    cdef _Tree tree
    cdef agg_tree *tp
    with nogil:   # (snapshot.c; two threads for a large section)
        j = <Py_ssize_t>agg_snapshot_check_items(<const uint64_t *>kp, vp, count, kind, &what)
    if j >= 0:
        if what == 1:
            raise SnapshotError(f"value {vp[j]!r} of item {j} (byte offset {vat + 8 * j}) "
                                f"is not finite")
        raise SnapshotError(f"item {j} (byte offset {kat + 16 * j}) has a key image that a "
                            f"namespace of kind {_snapmod.KIND_NAMES[kind]} cannot hold")
    tree = _new_tree(node_size, kind)
    tp = _tt(tree)       # a new tree: no one else can reach it yet
    with nogil:
        st = agg_tree_build(tp, kp, vp, count, &bad)
    if st == AGG_DUPLICATE or st == AGG_INVALID:
        raise SnapshotError(
            f"item {bad} of namespace {ns!r:.80} (byte offset {kat + 16 * bad}) is "
            f"{'a duplicate of the item before it' if st == AGG_DUPLICATE else 'out of order'}")
    _raise_status(st, None, None, ns)
    return tree


def _snap_read_general(r, uint64_t count, uint64_t data_len, ns, uint32_t node_size):
    """A GENERAL _Tree from the general section at the reader's position."""
    _snap_check_count(r, count, 14)
    cdef Py_ssize_t lat = r.take(4 * count, f"the key lengths of namespace {ns!r:.80}")
    cdef Py_ssize_t dat, vat, off, L, prev_off = 0, prev_len = -1, olen, c, arena_size = 0
    cdef const uint8_t *base
    cdef const uint32_t *lp
    cdef const double *vp
    cdef const uint8_t *e
    cdef uint64_t j, total = 0, bad = 0
    cdef KeyBuf kb, sig
    cdef int kind = -1, k
    cdef double d
    cdef int64_t i
    cdef agg_key *keys = NULL
    cdef uint8_t *arena = NULL
    cdef Py_ssize_t aoff = 0
    cdef agg_status st
    cdef _Tree tree
    r.pad("the key lengths")
    base = _snap_base(r)
    lp = <const uint32_t *>(base + lat)
    for j in range(count):
        L = lp[j]
        if L < 2 or L > 8 + <Py_ssize_t>AGG_TAIL_MAX_LEN:
            raise SnapshotError(f"key length {L} of item {j} (byte offset {lat + 4 * j}) "
                                f"is impossible")
        total += <uint64_t>L
        if L > 8:
            arena_size += (8 + L - 8 + 7) & ~7
    if total != data_len:
        raise SnapshotError(
            f"the key lengths of namespace {ns!r:.80} (byte offset {lat}) add up to "
            f"{total} bytes, not the {data_len} its header records")
    dat = r.take(data_len, f"the keys of namespace {ns!r:.80}")
    r.pad("the keys")
    vat = r.take(8 * count, f"the values of namespace {ns!r:.80}")
    vp = <const double *>(base + vat)
    keys = <agg_key *>malloc(count * sizeof(agg_key))
    arena = <uint8_t *>malloc(arena_size if arena_size > 0 else 8)
    kb_init(&kb)
    kb_init(&sig)
    try:
        if keys == NULL or arena == NULL:
            raise MemoryError()
        off = dat
        for j in range(count):
            L = lp[j]
            e = base + off
            try:
                key, ident = kb_decode_item(<const unsigned char *>e, L)
            except (ValueError, TypeError, OverflowError):
                raise SnapshotError(f"item {j} of namespace {ns!r:.80} (byte offset {off}) "
                                    f"does not decode") from None
            # canonical: encoding what was decoded gives the same bytes
            kb.len = 0
            sig.len = 0
            kb_put_value(&kb, key, &sig)
            kb_put_value(&kb, ident, &sig)
            olen = kb.len
            if (olen + sig.len != L or memcmp(kb.data, e, olen) != 0
                    or memcmp(sig.data, e + olen, sig.len) != 0):
                raise SnapshotError(f"item {j} of namespace {ns!r:.80} (byte offset {off}) "
                                    f"is not in the canonical encoding")
            if prev_len >= 0:
                c = memcmp(base + prev_off, e, prev_len if prev_len < olen else olen)
                if c > 0 or (c == 0 and prev_len >= olen):
                    raise SnapshotError(
                        f"item {j} of namespace {ns!r:.80} (byte offset {off}) is "
                        f"{'a duplicate of the item before it' if c == 0 and prev_len == olen else 'out of order'}")
            prev_off = off
            prev_len = olen
            if not isfinite(vp[j]):
                raise SnapshotError(f"value {vp[j]!r} of item {j} (byte offset "
                                    f"{vat + 8 * j}) is not finite")
            if kind != K_GENERAL:
                k = _item_kind(key, ident, &d, &i)
                kind = k if kind == -1 or k == kind else K_GENERAL
            keys[j] = agg_key_from_item_bytes(e, <size_t>L, <size_t>_meta_len(sig.len),
                                              <agg_tail *>(arena + aoff))
            if L > 8:
                aoff += (8 + L - 8 + 7) & ~7
            off += L
        if kind != K_GENERAL:
            raise SnapshotError(
                f"namespace {ns!r:.80} is stored as general but all its items are "
                f"{_snapmod.KIND_NAMES[kind]}: not the canonical snapshot")
        tree = _new_tree(node_size, K_GENERAL)
        st = agg_tree_build(_tt(tree), keys, vp, count, &bad)
        if st == AGG_DUPLICATE or st == AGG_INVALID:
            # (the order check above finds these first)
            raise SnapshotError(f"item {bad} of namespace {ns!r:.80} is out of order")
        _raise_status(st, None, None, ns)
    finally:
        free(keys)
        free(arena)
        kb_free(&kb)
        kb_free(&sig)
    return tree


cdef int _SNAP_K_FLOAT = _snapmod.K_FLOAT
cdef int _SNAP_K_INT = _snapmod.K_INT
cdef int _SNAP_K_NONE = _snapmod.K_NONE
cdef int _SNAP_TAG_NUM = _snapmod.TAG_NUM
cdef int _SNAP_SIG_INT = _snapmod.SIG_INT


def _snap_walk_ints(buf, uint64_t nns, uint32_t node_size):
    """snapshot._walk for the common snapshot whose namespaces are all small
    ints (|v| <= 2^53, canonically encoded) of numeric kinds, with the
    namespace headers read here rather than in Python (10^4 user-id
    namespaces cost ~60 ms a load in the Python walk).  Returns the same
    list, or None at the first namespace that is not of that shape or any
    irregularity in the headers: the Python walk then reads the snapshot
    again and reports what is wrong.  The item sections are read by
    _snap_read_fast, as in the Python walk."""
    r = _snapmod._Reader(buf)
    cdef const uint8_t *base = _snap_base(r)
    cdef Py_ssize_t pos = r.pos, end = r.end, p
    cdef uint64_t i, count, data_len, k, u, img
    cdef uint32_t nslen
    cdef int kind, b
    cdef double d, d2
    cdef int64_t v
    cdef const uint8_t *prev = NULL
    cdef const uint8_t *e
    out = []
    if nns > <uint64_t>((end - pos) // 24):
        return None
    for i in range(nns):
        if end - pos < 40:  # header, encoding, padding
            return None
        kind = base[pos]
        if kind != _SNAP_K_FLOAT and kind != _SNAP_K_INT and kind != _SNAP_K_NONE:
            return None
        if base[pos + 1] or base[pos + 2] or base[pos + 3]:
            return None
        memcpy(&nslen, base + pos + 4, 4)  # little-endian host (checked)
        memcpy(&count, base + pos + 8, 8)
        memcpy(&data_len, base + pos + 16, 8)
        if count == 0 or data_len != 0 or nslen != 11:
            return None
        pos += 24
        e = base + pos
        if e[0] != _SNAP_TAG_NUM or e[9] != 1 or e[10] != _SNAP_SIG_INT:
            return None
        k = 0
        for b in range(1, 9):
            k = (k << 8) | e[b]
        u = (k ^ 0x8000000000000000ULL) if (k >> 63) else (~k)
        memcpy(&d, &u, 8)
        if not (d >= -9007199254740992.0 and d <= 9007199254740992.0):
            return None
        v = <int64_t>d
        d2 = <double>v + 0.0
        if d2 != d:
            return None
        memcpy(&u, &d2, 8)
        img = (~u) if (u >> 63) else (u | 0x8000000000000000ULL)
        if img != k:  # not the canonical image (-0.0)
            return None
        if prev != NULL and memcmp(prev, e, 10) >= 0:
            return None
        prev = e
        pos += 11
        p = (-pos) & 7
        for b in range(p):
            if base[pos + b]:
                return None
        pos += p
        r.pos = pos
        ns = v
        tree = _snap_read_fast(r, kind, count, ns, node_size)
        pos = r.pos
        out.append((ns, tree))
    if pos != end:
        return None
    return out


cdef object _snap_loads(type cls, object data):
    """An Aggregate of class `cls` from snapshot bytes: any C-contiguous
    buffer (bytes, bytearray, memoryview, PickleBuffer, ndarray), read in
    place, not copied (unless unaligned); TypeError for anything else."""
    _snap_host_check()
    view = _snapmod.byte_view(data)
    if view.nbytes and (<uintptr_t>_snap_view_ptr(view)) & 7:
        # keys are read as uint64s in place: an unaligned buffer is copied
        view = memoryview(np.frombuffer(view, dtype=np.uint8).copy())
    return _snap_aggregate(cls, _snapmod.parse(view, _snap_read_fast, _snap_read_general,
                                               _snap_crc32, _snap_walk_ints))


cdef object _snap_aggregate(type cls, tuple parsed):
    """An Aggregate of class `cls` from snapshot.parse's (node_size,
    [(namespace, tree), ...])."""
    cdef Aggregate agg
    node_size, namespaces = parsed
    agg = cls(node_size)
    for ns, tree in namespaces:
        agg._trees[ns] = tree
    return agg


cdef const uint8_t *_snap_view_ptr(object view) except? NULL:
    cdef const uint8_t[::1] v = view
    return &v[0]


cdef object _snap_save(Aggregate agg, object file, bint fsync):
    """save(): everything that can fail before the file is touched (the
    namespace encodings) fails first; the snapshot is then streamed."""
    _snap_host_check()
    for ns in list(agg._trees):
        _snapmod.encode_namespace(ns)
    _snapmod.save_to(file, lambda f: _snap_write(agg, f), fsync)


cdef object _snap_load(type cls, object file, bint use_mmap):
    if not use_mmap and _snapmod.is_path(file):
        _snap_host_check()
        got = _snapmod.read_path_streamed(file, _snap_read_section, _snap_crc32,
                                          _snap_crc32_combine)
        if got is not None:
            return _snap_load_streamed(cls, got[0], got[1], got[2])
    return _snap_loads(cls, _snapmod.read_file(file, use_mmap))


def _snap_read_section(int fd, uint64_t off, uint64_t count, int kind, uint32_t node_size):
    """(tree, crc32 of the section) of the numeric section at byte offset
    `off` of file `fd`, read straight into the tree's leaves; None if an
    item fails a check or the file is short (snapshot_read.c)."""
    cdef _Tree tree = _new_tree(node_size, kind)
    cdef agg_tree *tp = _tt(tree)     # a new tree: no one else can reach it yet
    cdef uint32_t crc = 0
    cdef int st
    with nogil:
        st = agg_snapshot_read_numeric(fd, off, count, kind, tp, &crc)
    if st != AGG_SNAP_READ_OK:
        return None
    return tree, crc


def _snap_crc32_combine(uint32_t crc1, uint32_t crc2, uint64_t len2):
    return agg_snapshot_crc32_combine(crc1, crc2, len2)


cdef object _snap_load_streamed(type cls, object buf, dict sections, object crc32):
    """An Aggregate from read_path_streamed's result: `parse` walks the
    buffer (whose large numeric sections are holes) and takes those
    sections' trees as they were read."""

    def read_fast(r, int kind, uint64_t count, ns, uint32_t node_size):
        got = sections.get(r.pos)
        if got is None:
            return _snap_read_fast(r, kind, count, ns, node_size)
        if got[0] != kind or got[1] != count:   # (read from the same header bytes)
            raise AssertionError("a streamed section does not match its header")
        r.pos += 24 * count
        return got[2]

    return _snap_aggregate(cls, _snapmod.parse(buf, read_fast, _snap_read_general, crc32, None))


cdef list _snap_items_state(Aggregate agg):
    """[(namespace, [Item, ...]), ...]: the pickle state of an aggregate
    whose namespaces a snapshot cannot hold (any hashable is a namespace)."""
    cdef _Tree tree
    state = []
    for ns, tree in list(agg._trees.items()):
        state.append((ns, _read_items(tree, 0, agg_tree_len(_tt(tree)), False)))
    return state


cdef object _snap_reduce(Aggregate agg, object protocol):
    """__reduce_ex__(protocol): the snapshot, or (a namespace that no
    snapshot can hold, say a frozenset) the items of each namespace as
    before snapshots.  From protocol 5 on the snapshot travels as a
    pickle.PickleBuffer (PEP 574): written in-band as bytes, as before,
    but handed to a ``buffer_callback`` out-of-band (Dask, Ray) without
    a copy into the pickle, and read back in place by _snap_restore."""
    if _snapmod.namespaces_encodable(list(agg._trees)):
        data = _snap_dumps(agg)
        if protocol >= 5:
            data = _PickleBuffer(data)
        return (_snap_restore, (type(agg), data))
    return (_restore, (agg._node_size, _snap_items_state(agg)))


cdef object _snap_copy(Aggregate agg):
    if _snapmod.namespaces_encodable(list(agg._trees)):
        return _snap_loads(type(agg), _snap_dumps(agg))
    return _restore(agg._node_size, _snap_items_state(agg))


def _snap_restore(cls, data):
    """Unpickle an Aggregate (``__reduce_ex__`` carries a snapshot: bytes,
    or from protocol 5 on whatever buffer the unpickler hands over, an
    out-of-band PickleBuffer or memoryview included)."""
    return _snap_loads(cls, data)
