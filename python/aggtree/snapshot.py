"""Aggregate snapshots: the file format of docs/SNAPSHOT.md in pure Python.

This module is three things:

* the pure-Python writer and reader of the snapshot format, which
  ``aggtree.reference.Aggregate`` uses for ``dumps`` / ``loads`` / ``save`` /
  ``load`` and which the tests use as the oracle of the native writer (the
  two must produce the same bytes for the same contents);
* a pure-Python model of the general-key codec (``src/aggtree/keycodec.pxi``):
  ``encode_item`` / ``decode_item`` / ``encode_value`` / ``decode_value``,
  strict (a decoder that only accepts the canonical encoding);
* the file handling both implementations share: ``write_atomic`` (temporary
  file in the target's directory, fsync, rename, fsync of the directory) and
  ``read_path`` (a whole file into an 8-byte aligned buffer).

The native ``aggtree.Aggregate`` does its encoding and decoding in C
(``src/aggtree/_snapshot.pxi``); it only borrows the file handling from here.
"""

from __future__ import annotations

import io
import math
import mmap
import os
import stat
import struct
import sys
import threading
import zlib
from typing import Any

import numpy as np

from ._types import Item, SnapshotError

__all__ = [
    "MAGIC",
    "VERSION",
    "SnapshotError",
    "decode_item",
    "decode_value",
    "dumps_items",
    "encode_item",
    "encode_value",
    "item_kind",
    "loads_items",
    "read_path",
    "write_atomic",
]

# ---------------------------------------------------------------------------
# Layout constants (docs/SNAPSHOT.md)
# ---------------------------------------------------------------------------

MAGIC = b"\x89AGGSNP\n"
VERSION = 1
BYTE_ORDER_LITTLE = 0x4C  # "L"
HEADER = struct.Struct("<8sHBBIQQ")  # magic, version, byte order, reserved, node size, namespaces, total length
NS_HEADER = struct.Struct("<B3sIQQ")  # kind, reserved, namespace length, items, data length
TRAILER = struct.Struct("<Q")  # crc32 of everything before it
HEADER_SIZE = HEADER.size  # 32
NS_HEADER_SIZE = NS_HEADER.size  # 24
TRAILER_SIZE = TRAILER.size  # 8
MIN_SIZE = HEADER_SIZE + TRAILER_SIZE
CRC_THREAD_MIN = 1 << 20  # from this size the checksum runs on a second thread

# Namespace kinds: the numbers of _core.pyx's K_* constants.
K_FLOAT, K_INT, K_GENERAL, K_NONE = 0, 1, 2, 3
KIND_NAMES = {K_FLOAT: "float", K_INT: "int", K_GENERAL: "general", K_NONE: "none"}

NODE_SIZE_MIN, NODE_SIZE_MAX = 4, 4096
MAX_ENCODING = 8 + 0x00FFFFFF  # the core's tail limit (AGG_TAIL_MAX_LEN)
MAX_DEPTH = 32
TWO53 = 2**53
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_M64 = (1 << 64) - 1
_SIGN = 1 << 63
_DBL_MAX = sys.float_info.max
_IMAX = int(_DBL_MAX)
_INF = math.inf


def _pad8(n: int) -> int:
    return (n + 7) & ~7


# ---------------------------------------------------------------------------
# Order-preserving images (agg_f64_to_key / agg_i64_to_key of the C core, core/keys.c)
# ---------------------------------------------------------------------------


def f64_to_key(d: float) -> int:
    """The order-preserving uint64 image of a double (-0.0 maps to 0.0)."""
    (u,) = struct.unpack("<Q", struct.pack("<d", d + 0.0))
    return (~u & _M64) if u >> 63 else (u | _SIGN)


def key_to_f64(k: int) -> float:
    u = (k ^ _SIGN) if k >> 63 else (~k & _M64)
    return struct.unpack("<d", struct.pack("<Q", u))[0]


def _f64_images(a: np.ndarray) -> np.ndarray:
    """f64_to_key over a float64 array (callers have mapped -0.0 to 0.0)."""
    u = a.astype(np.float64).view(np.uint64)
    neg = (u >> np.uint64(63)).astype(bool)
    return np.where(neg, ~u, u | np.uint64(_SIGN))


def _f64_from_images(k: np.ndarray) -> np.ndarray:
    top = (k >> np.uint64(63)).astype(bool)
    u = np.where(top, k ^ np.uint64(_SIGN), ~k)
    return u.view(np.float64)


# ---------------------------------------------------------------------------
# The general-key codec, in Python (keycodec.pxi's ORDERED ENCODING)
# ---------------------------------------------------------------------------

TAG_NONE, TAG_NUM, TAG_STR, TAG_BYTES, TAG_TUPLE = 0x10, 0x20, 0x30, 0x40, 0x50
SIG_INT, SIG_FLOAT, SIG_BOOL = 0x01, 0x02, 0x03


class _Corrupt(Exception):
    """Internal: an encoding that does not decode (turned into SnapshotError)."""


def _put_double(out: bytearray, d: float) -> None:
    out.append(TAG_NUM)
    out += f64_to_key(d).to_bytes(8, "big")


def _put_int(out: bytearray, v: int) -> None:
    if v < -_IMAX:  # below -DBL_MAX: d = -inf, the magnitude m inverted
        m = -v - _IMAX
        n = (m.bit_length() + 7) // 8
        inv = ((1 << (8 * n)) - 1 - m).to_bytes(n, "big")
        _put_double(out, -_INF)
        if n <= 200:
            out.append(0xFF - n)
        else:
            out.append(0x02)
            out += (0xFFFFFFFF - n).to_bytes(4, "big")
        out += inv
        return
    if v > _IMAX:
        d = _DBL_MAX
    else:
        d = float(v)
        if int(d) > v:
            d = math.nextafter(d, -_INF)
    r = v - int(d)
    _put_double(out, d)
    if r == 0:
        out.append(0x01)
        return
    n = (r.bit_length() + 7) // 8
    if n <= 200:
        out.append(1 + n)
    else:
        out.append(0xFE)
        out += n.to_bytes(4, "big")
    out += r.to_bytes(n, "big")


def _put_escaped(out: bytearray, tag: int, body: bytes) -> None:
    out.append(tag)
    out += body.replace(b"\x00", b"\x00\xff")
    out.append(0x00)


def _put(out: bytearray, v: Any, sig: bytearray, depth: int) -> None:
    if v is None:
        out.append(TAG_NONE)
        return
    t = type(v)
    if t is bool:
        _put_double(out, 1.0 if v else 0.0)
        out.append(0x01)
        sig.append(SIG_BOOL)
        return
    if t is float or (t is not int and isinstance(v, float)):
        d = float(v)
        if d != d:
            raise ValueError("a key must not be NaN")
        _put_double(out, d)
        out.append(0x01)
        sig.append(SIG_FLOAT)
        return
    if t is int or isinstance(v, int):
        _put_int(out, int(v))
        sig.append(SIG_INT)
        return
    if t is str or isinstance(v, str):
        _put_escaped(out, TAG_STR, str(v).encode("utf-8", "surrogatepass"))
        return
    if t is bytes or isinstance(v, bytes):
        _put_escaped(out, TAG_BYTES, bytes(v))
        return
    if isinstance(v, (tuple, list)):
        if depth >= MAX_DEPTH:
            raise ValueError(f"a key is nested too deeply: at most {MAX_DEPTH} levels of tuples")
        out.append(TAG_TUPLE)
        for e in v:
            _put(out, e, sig, depth + 1)
        out.append(0x00)
        return
    raise TypeError(
        f"a value of type {type(v).__name__} has no key encoding: it must be None, bool, "
        f"int, float, str, bytes, or a tuple of those"
    )


def encode_value(v: Any) -> bytes:
    """enc(v) + sig(v): one value with the type signature of its numbers (the
    namespace encoding of a snapshot).  TypeError / ValueError as the codec."""
    out = bytearray()
    sig = bytearray()
    _put(out, v, sig, 0)
    return bytes(out + sig)


def encode_item(key: Any, id: Any) -> tuple[bytes, int]:
    """(E, nsig): E = enc(key) + enc(id) + sig, the item encoding a GENERAL
    tree holds, and the number of sig bytes at its end."""
    out = bytearray()
    sig = bytearray()
    _put(out, key, sig, 0)
    _put(out, id, sig, 0)
    return bytes(out + sig), len(sig)


class _Num:
    """A number read before its sig byte says its type: the double d, or the
    int value when a remainder follows d."""

    __slots__ = ("d", "big")

    def __init__(self, d: float, big: int | None) -> None:
        self.d = d
        self.big = big


def _be(b: bytes, i: int, n: int) -> int:
    if i + n > len(b):
        raise _Corrupt("truncated number")
    return int.from_bytes(b[i : i + n], "big")


def _get(b: bytes, i: int, depth: int, nums: list):
    """Parse one enc(v) at b[i:] -> (value with _Num placeholders, next index)."""
    if i >= len(b):
        raise _Corrupt("encoding ends inside a value")
    tag = b[i]
    if tag == TAG_NONE:
        return None, i + 1
    if tag == TAG_NUM:
        d = key_to_f64(_be(b, i + 1, 8))
        if d != d:
            raise _Corrupt("NaN in a number")
        if i + 10 > len(b):
            raise _Corrupt("truncated number")
        m = b[i + 9]
        j = i + 10
        big = None
        if m != 0x01:
            if d == -_INF:
                if m == 0x02:
                    n = 0xFFFFFFFF - _be(b, j, 4)
                    j += 4
                elif 0x37 <= m < 0xFF:
                    n = 0xFF - m
                else:
                    raise _Corrupt("bad number marker")
                if j + n > len(b):
                    raise _Corrupt("truncated number")
                mag = ((1 << (8 * n)) - 1) - int.from_bytes(b[j : j + n], "big")
                big = -_IMAX - mag
            else:
                if not math.isfinite(d):
                    raise _Corrupt("remainder after an infinity")
                if m == 0xFE and d == _DBL_MAX:
                    n = _be(b, j, 4)
                    j += 4
                elif 0x02 <= m <= 0xC9:
                    n = m - 1
                else:
                    raise _Corrupt("bad number marker")
                if j + n > len(b):
                    raise _Corrupt("truncated number")
                big = int(d) + int.from_bytes(b[j : j + n], "big")
            j += n
        num = _Num(d, big)
        nums.append(num)
        return num, j
    if tag == TAG_STR or tag == TAG_BYTES:
        j = i + 1
        body = bytearray()
        while True:
            z = b.find(b"\x00", j)
            if z < 0:
                raise _Corrupt("unterminated str / bytes")
            body += b[j:z]
            if z + 1 < len(b) and b[z + 1] == 0xFF:
                body.append(0)
                j = z + 2
                continue
            break
        if tag == TAG_BYTES:
            return bytes(body), z + 1
        try:
            return body.decode("utf-8", "surrogatepass"), z + 1
        except UnicodeDecodeError:
            raise _Corrupt("str that is not UTF-8") from None
    if tag == TAG_TUPLE:
        if depth >= MAX_DEPTH:
            raise _Corrupt("tuples nested too deeply")
        j = i + 1
        elems: list = []
        while True:
            if j >= len(b):
                raise _Corrupt("unterminated tuple")
            if b[j] == 0x00:
                return tuple(elems), j + 1
            e, j = _get(b, j, depth + 1, nums)
            elems.append(e)
    raise _Corrupt(f"unknown tag byte 0x{tag:02x}")


def _typed(v: Any, sigs: dict):
    """Replace the _Num placeholders in v by numbers of their sig's type."""
    if isinstance(v, _Num):
        s = sigs[id(v)]
        if v.big is not None:
            if s != SIG_INT:
                raise _Corrupt("a remainder on a number that is not an int")
            return v.big
        d = v.d
        if s == SIG_FLOAT:
            return d
        if s == SIG_INT:
            if not math.isfinite(d) or d != math.floor(d):
                raise _Corrupt("an int sig on a number that is not an integer")
            return int(d)
        if d == 0.0:
            return False
        if d == 1.0:
            return True
        raise _Corrupt("a bool sig on a number that is neither 0 nor 1")
    if isinstance(v, tuple):
        return tuple(_typed(e, sigs) for e in v)
    return v


def _decode(b: bytes, count: int):
    """`count` values then their sig bytes, exactly filling b; canonical."""
    nums: list = []
    vals = []
    i = 0
    for _ in range(count):
        v, i = _get(b, i, 0, nums)
        vals.append(v)
    if len(b) - i != len(nums):
        raise _Corrupt(f"{len(b) - i} bytes after the values, {len(nums)} sig bytes expected")
    sigs = {}
    for num, s in zip(nums, b[i:]):
        if s not in (SIG_INT, SIG_FLOAT, SIG_BOOL):
            raise _Corrupt(f"bad sig byte 0x{s:02x}")
        sigs[id(num)] = s
    typed = [_typed(v, sigs) for v in vals]
    return typed, len(nums)


def decode_item(e: bytes) -> tuple[Any, Any, int]:
    """(key, id, nsig) of an item encoding E; ValueError unless E is exactly
    the canonical encoding of an item (what encode_item gives back)."""
    e = bytes(e)
    try:
        (key, id_), nsig = _decode(e, 2)
        again = encode_item(key, id_)[0]
    except (_Corrupt, ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise ValueError(f"not an item encoding: {exc}") from None
    if again != e:
        raise ValueError("not the canonical item encoding")
    return key, id_, nsig


def decode_value(e: bytes) -> Any:
    """The value of enc(v) + sig(v) (encode_value's output); ValueError unless
    canonical."""
    e = bytes(e)
    try:
        (v,), _ = _decode(e, 1)
        again = encode_value(v)
    except (_Corrupt, ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise ValueError(f"not a value encoding: {exc}") from None
    if again != e:
        raise ValueError("not the canonical value encoding")
    return v


# ---------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------


def item_kind(key: Any, id: Any) -> int:
    """The kind one item would give a namespace (_item_kind of _core.pyx, on
    the types an aggregate reads back): K_NONE / K_FLOAT / K_INT when the id
    is an int (not a bool) in int64 range and the key None / a float / an int
    with |key| <= 2**53; else K_GENERAL."""
    if type(id) is not int or not INT64_MIN <= id <= INT64_MAX:
        return K_GENERAL
    if key is None:
        return K_NONE
    t = type(key)
    if t is float:
        return K_FLOAT
    if t is int and -TWO53 <= key <= TWO53:
        return K_INT
    return K_GENERAL


def namespace_kind(items) -> int:
    """The kind a snapshot records for these items: their common item_kind
    when they all have the same one, else K_GENERAL."""
    kind = -1
    for it in items:
        k = item_kind(it[0], it[1])
        if k == K_GENERAL or (kind != -1 and k != kind):
            return K_GENERAL
        kind = k
    return K_GENERAL if kind == -1 else kind


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------


def encode_namespace(ns: Any) -> bytes:
    """The namespace's encoding; TypeError for a type a snapshot cannot hold."""
    try:
        return encode_value(ns)
    except TypeError:
        raise TypeError(
            f"cannot save a namespace of type {type(ns).__name__} in a snapshot: namespaces "
            f"must be None, bool, int, float, str, bytes or tuples of these"
        ) from None
    except ValueError as exc:
        raise ValueError(f"cannot save the namespace {ns!r} in a snapshot: {exc}") from None


def namespaces_encodable(namespaces) -> bool:
    """Whether a snapshot can hold every one of these namespaces (pickling
    and copying fall back to a list of items per namespace when not)."""
    for ns in namespaces:
        try:
            encode_value(ns)
        except (TypeError, ValueError):
            return False
    return True


def _fast_section(kind: int, items: list) -> bytes:
    n = len(items)
    keys = np.empty((n, 2), dtype="<u8")
    if kind == K_NONE:
        keys[:, 0] = f64_to_key(0.0)
    else:
        keys[:, 0] = _f64_images(np.array([it[0] for it in items], dtype=np.float64) + 0.0)
    ids = np.array([it[1] for it in items], dtype=np.int64)
    keys[:, 1] = ids.view(np.uint64) ^ np.uint64(_SIGN)
    vals = np.array([it[2] for it in items], dtype="<f8")
    return keys.tobytes() + vals.tobytes()


def _general_section(items: list) -> tuple[bytes, int]:
    encs = []
    for it in items:
        e, _ = encode_item(it[0], it[1])
        if len(e) > MAX_ENCODING:
            raise ValueError(
                f"item key={it[0]!r:.60} id={it[1]!r:.60} is too large for a snapshot "
                f"(its encoding takes {len(e)} bytes, limit {MAX_ENCODING})"
            )
        encs.append(e)
    n = len(items)
    lens = np.array([len(e) for e in encs], dtype="<u4").tobytes()
    data = b"".join(encs)
    out = bytearray(lens)
    out += bytes(_pad8(len(out)) - len(out))
    out += data
    out += bytes(_pad8(len(data)) - len(data))
    out += np.array([it[2] for it in items], dtype="<f8").tobytes()
    assert n == len(encs)
    return bytes(out), len(data)


def dumps_items(node_size: int, namespaces) -> bytes:
    """A snapshot of ``namespaces``: an iterable of (namespace, items) with
    the items of each (key, id, value) in the aggregate's order, non-empty.
    Every namespace is encoded before anything else is done, so a namespace
    of a bad type raises TypeError (ValueError for NaN) at once."""
    encoded = []
    for ns, items in namespaces:
        encoded.append((encode_namespace(ns), list(items)))
    encoded.sort(key=lambda e: e[0])
    parts = [b""]  # the header, filled in below
    for nse, items in encoded:
        kind = namespace_kind(items)
        if kind == K_GENERAL:
            body, data_len = _general_section(items)
        else:
            body, data_len = _fast_section(kind, items), 0
        parts.append(NS_HEADER.pack(kind, b"\0\0\0", len(nse), len(items), data_len))
        parts.append(nse + bytes(_pad8(len(nse)) - len(nse)))
        parts.append(body)
    total = sum(len(p) for p in parts) + HEADER_SIZE + TRAILER_SIZE
    parts[0] = HEADER.pack(MAGIC, VERSION, BYTE_ORDER_LITTLE, 0, node_size, len(encoded), total)
    body = b"".join(parts)
    return body + TRAILER.pack(zlib.crc32(body))


# ---------------------------------------------------------------------------
# Reader
# ---------------------------------------------------------------------------


def check_envelope(buf, check_crc: bool = True, crc32=zlib.crc32) -> tuple[int, int]:
    """Validate header, length and (unless check_crc is false) checksum of a
    snapshot in ``buf`` (a buffer); return (node_size, namespace count).
    SnapshotError otherwise."""
    size = len(buf)
    if size == 0:
        raise SnapshotError("empty input: not an aggtree snapshot")
    head = bytes(buf[:8])
    if head != MAGIC[: len(head)]:
        raise SnapshotError("not an aggtree snapshot (bad magic at byte offset 0)")
    if size < MIN_SIZE:
        raise SnapshotError(
            f"truncated snapshot: {size} bytes, the header and checksum alone take {MIN_SIZE}"
        )
    _, version, order, reserved, node_size, nns, total = HEADER.unpack_from(buf, 0)
    if version != VERSION:
        raise SnapshotError(
            f"snapshot format version {version} is not supported (this aggtree reads "
            f"version {VERSION}; byte offset 8)"
        )
    if order != BYTE_ORDER_LITTLE:
        raise SnapshotError(f"unknown byte order mark 0x{order:02x} at byte offset 10")
    if reserved != 0:
        raise SnapshotError(f"reserved byte at offset 11 is 0x{reserved:02x}, not 0")
    if total != size:
        if total > size:
            raise SnapshotError(
                f"truncated snapshot: {size} bytes of the {total} its header announces"
            )
        raise SnapshotError(
            f"{size - total} bytes of trailing garbage after the {total}-byte snapshot"
        )
    if check_crc:
        check_crc32(buf, crc32(buf[: size - TRAILER_SIZE]))
    if not NODE_SIZE_MIN <= node_size <= NODE_SIZE_MAX:
        raise SnapshotError(f"node size {node_size} at byte offset 12 is out of range")
    return node_size, nns


def check_crc32(buf, got: int) -> None:
    """SnapshotError unless ``got`` is the checksum the trailer records."""
    size = len(buf)
    (crc,) = TRAILER.unpack_from(buf, size - TRAILER_SIZE)
    if crc != got:
        raise SnapshotError(
            f"checksum mismatch: the snapshot is damaged (crc32 0x{got:08x}, recorded "
            f"0x{crc:08x} at byte offset {size - TRAILER_SIZE})"
        )


class _Reader:
    def __init__(self, buf) -> None:
        self.buf = buf
        self.end = len(buf) - TRAILER_SIZE
        self.pos = HEADER_SIZE

    def take(self, n: int, what: str) -> int:
        """Reserve n bytes at the current position; return their offset."""
        if n < 0 or n > self.end - self.pos:
            raise SnapshotError(
                f"{what} at byte offset {self.pos} ({n} bytes) runs past the end of the "
                f"snapshot body (byte offset {self.end})"
            )
        at = self.pos
        self.pos += n
        return at

    def pad(self, what: str) -> None:
        n = _pad8(self.pos) - self.pos
        at = self.take(n, what)
        if any(self.buf[at : at + n]):
            raise SnapshotError(f"non-zero padding after {what} at byte offset {at}")


def _int_namespace(nse: bytes):
    """The int namespace of a canonical encoding of a small int (|v| <=
    2^53: TAG_NUM, its exact double's image, no remainder, SIG_INT), else
    None (then decode_value decides).  The common case of namespaces (user
    ids...) without the general decoder: a snapshot of 10^4 namespaces
    spent most of its load decoding them."""
    if len(nse) != 11 or nse[0] != TAG_NUM or nse[9] != 0x01 or nse[10] != SIG_INT:
        return None
    k = int.from_bytes(nse[1:9], "big")
    d = key_to_f64(k)
    if not (-_SAFE_INT <= d <= _SAFE_INT) or d != d or not d.is_integer():
        return None
    v = int(d)
    if f64_to_key(float(v)) != k:  # (-0.0: not the canonical image of 0)
        return None
    return v


_SAFE_INT = float(2**53)


def read_namespace_header(r: _Reader, index: int):
    """(kind, namespace, namespace encoding, count, data length, offset)."""
    at = r.take(NS_HEADER_SIZE, f"the header of namespace {index}")
    kind, reserved, nslen, count, data_len = NS_HEADER.unpack_from(r.buf, at)
    if kind not in KIND_NAMES:
        raise SnapshotError(f"unknown namespace kind byte 0x{kind:02x} at byte offset {at}")
    if reserved != b"\0\0\0":
        raise SnapshotError(f"reserved bytes at offset {at + 1} are not zero")
    if count == 0:
        raise SnapshotError(f"namespace {index} at byte offset {at} holds no items")
    if kind != K_GENERAL and data_len != 0:
        raise SnapshotError(f"namespace {index} of kind {KIND_NAMES[kind]} has a data "
                            f"length of {data_len} (byte offset {at + 16})")
    # (before any reader multiplies the count: it must fit in what is left)
    per_item = 24 if kind != K_GENERAL else 4 + 2 + 8
    if count > (r.end - r.pos) // per_item or data_len > r.end - r.pos:
        raise SnapshotError(
            f"namespace {index} at byte offset {at} announces {count} items "
            f"({data_len} bytes of keys), which cannot fit in the rest of the snapshot"
        )
    nat = r.take(nslen, f"the encoding of namespace {index}")
    nse = bytes(r.buf[nat : nat + nslen])
    ns = _int_namespace(nse)
    if ns is not None:
        r.pad("a namespace encoding")
        return kind, ns, nse, count, data_len, at
    try:
        ns = decode_value(nse)
    except ValueError as exc:
        raise SnapshotError(
            f"the namespace encoding at byte offset {nat} does not decode ({exc})"
        ) from None
    r.pad("a namespace encoding")
    return kind, ns, nse, count, data_len, at


def _bad_order(index: int, equal: bool, offset: int, ns: Any) -> SnapshotError:
    what = "a duplicate of the item before it" if equal else "out of order"
    return SnapshotError(
        f"item {index} of namespace {ns!r:.80} (byte offset {offset}) is {what}"
    )


def _read_fast(r: _Reader, kind: int, count: int, ns: Any) -> list:
    kat = r.take(16 * count, f"the keys of namespace {ns!r:.80}")
    vat = r.take(8 * count, f"the values of namespace {ns!r:.80}")
    keys = np.frombuffer(r.buf, dtype="<u8", count=2 * count, offset=kat).reshape(count, 2)
    vals = np.frombuffer(r.buf, dtype="<f8", count=count, offset=vat)
    heads = keys[:, 0].astype(np.uint64)
    rests = keys[:, 1].astype(np.uint64)
    bad = np.flatnonzero(~np.isfinite(vals))
    if len(bad):
        j = int(bad[0])
        raise SnapshotError(f"value {vals[j]!r} of item {j} (byte offset {vat + 8 * j}) "
                            f"is not finite")
    d = _f64_from_images(heads)
    if kind == K_NONE:
        badk = heads != np.uint64(f64_to_key(0.0))
    else:
        badk = np.isnan(d) | (heads == np.uint64(0x7FFFFFFFFFFFFFFF))  # NaN, -0.0
        if kind == K_INT:
            with np.errstate(invalid="ignore"):
                badk |= ~((np.floor(d) == d) & (np.abs(d) <= float(TWO53)))
    bad = np.flatnonzero(badk)
    if len(bad):
        j = int(bad[0])
        raise SnapshotError(f"item {j} (byte offset {kat + 16 * j}) has a key image that "
                            f"a namespace of kind {KIND_NAMES[kind]} cannot hold")
    if count > 1:
        gt = (heads[1:] > heads[:-1]) | ((heads[1:] == heads[:-1]) & (rests[1:] > rests[:-1]))
        bad = np.flatnonzero(~gt)
        if len(bad):
            j = int(bad[0]) + 1
            eq = heads[j] == heads[j - 1] and rests[j] == rests[j - 1]
            raise _bad_order(j, bool(eq), kat + 16 * j, ns)
    ids = (rests ^ np.uint64(_SIGN)).view(np.int64).tolist()
    ks: list
    if kind == K_NONE:
        ks = [None] * count
    elif kind == K_INT:
        ks = [int(x) for x in d.tolist()]
    else:
        ks = d.tolist()
    return [Item(k, i, v) for k, i, v in zip(ks, ids, vals.tolist())]


def _read_general(r: _Reader, count: int, data_len: int, ns: Any) -> list:
    lat = r.take(4 * count, f"the key lengths of namespace {ns!r:.80}")
    lens = np.frombuffer(r.buf, dtype="<u4", count=count, offset=lat).astype(np.int64)
    r.pad("the key lengths")
    if int(lens.sum()) != data_len:
        raise SnapshotError(
            f"the key lengths of namespace {ns!r:.80} (byte offset {lat}) add up to "
            f"{int(lens.sum())} bytes, not the {data_len} its header records"
        )
    dat = r.take(data_len, f"the keys of namespace {ns!r:.80}")
    r.pad("the keys")
    vat = r.take(8 * count, f"the values of namespace {ns!r:.80}")
    vals = np.frombuffer(r.buf, dtype="<f8", count=count, offset=vat)
    out = []
    off = dat
    prev = None
    for j, n in enumerate(lens.tolist()):
        if n > MAX_ENCODING or n < 2:
            raise SnapshotError(f"key length {n} of item {j} (byte offset {lat + 4 * j}) "
                                f"is impossible")
        e = bytes(r.buf[off : off + n])
        try:
            key, id_, nsig = decode_item(e)
        except ValueError as exc:
            raise SnapshotError(
                f"item {j} of namespace {ns!r:.80} (byte offset {off}) does not decode: {exc}"
            ) from None
        ordered = e[: n - nsig]
        if prev is not None and not prev < ordered:
            raise _bad_order(j, prev == ordered, off, ns)
        prev = ordered
        v = float(vals[j])
        if not math.isfinite(v):
            raise SnapshotError(f"value {v!r} of item {j} (byte offset {vat + 8 * j}) "
                                f"is not finite")
        out.append(Item(key, id_, v))
        off += n
    if namespace_kind(out) != K_GENERAL:
        raise SnapshotError(
            f"namespace {ns!r:.80} is stored as general but all its items are "
            f"{KIND_NAMES[namespace_kind(out)]}: not the canonical snapshot"
        )
    return out


def byte_view(data) -> memoryview:
    """``data``, any bytes-like object (bytes, bytearray, memoryview,
    pickle.PickleBuffer, a numpy array...), as a flat memoryview of its
    bytes: no copy.  TypeError for what is not a buffer or is not
    C-contiguous (a strided view's bytes are not a snapshot in order)."""
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"a snapshot is a bytes-like object, not {type(data).__name__}"
        ) from None
    if not view.c_contiguous:
        raise TypeError(
            f"a snapshot must be a C-contiguous buffer: this {type(data).__name__} is a "
            f"non-contiguous view (copy it first, e.g. with bytes())"
        )
    return view.cast("B")


def parse(data, read_fast, read_general, crc32=zlib.crc32, walk_fast=None) -> tuple[int, list]:
    """Walk a snapshot: check its envelope (header, length, checksum), then
    each namespace header and encoding here, handing the item sections to
    ``read_fast(r, kind, count, ns, node_size)`` and ``read_general(r, count,
    data_len, ns, node_size)`` (which take their bytes from the _Reader ``r``
    and return what a namespace becomes).  Returns (node_size, [(namespace,
    what the reader returned), ...]) in file order.  The native loader passes
    its own readers (src/aggtree/_snapshot.pxi), its own ``crc32(buffer)``
    (the same value as zlib's, faster; it must release the GIL), and
    ``walk_fast(buf, nns, node_size)``, a walk of the common shape that
    returns None for any other (this walk then runs and reports what is
    wrong).  ``data`` is any C-contiguous bytes-like object, read in
    place (byte_view)."""
    buf = byte_view(data)
    if len(buf) < CRC_THREAD_MIN:
        node_size, nns = check_envelope(buf, True, crc32)
        return node_size, _walk_either(buf, nns, node_size, read_fast, read_general, walk_fast)
    # A large snapshot: its checksum is computed on another thread (zlib
    # releases the GIL) while the trees are built; the result counts only
    # if the checksum matches, and a mismatch is the error reported even
    # when the walk of the damaged bytes failed first.
    node_size, nns = check_envelope(buf, check_crc=False)
    got: list = []
    body = buf[: len(buf) - TRAILER_SIZE]
    worker = threading.Thread(target=lambda: got.append(crc32(body)), daemon=True)
    worker.start()
    try:
        out = _walk_either(buf, nns, node_size, read_fast, read_general, walk_fast)
    except BaseException as exc:
        worker.join()
        if got:
            try:
                check_crc32(buf, got[0])
            except SnapshotError as bad:
                raise bad from exc
        raise
    worker.join()
    if not got:
        raise MemoryError("the checksum of the snapshot could not be computed")
    check_crc32(buf, got[0])
    return node_size, out


def _walk_either(buf, nns: int, node_size: int, read_fast, read_general, walk_fast) -> list:
    out = walk_fast(buf, nns, node_size) if walk_fast is not None else None
    return out if out is not None else _walk(buf, nns, node_size, read_fast, read_general)


def _walk(buf, nns: int, node_size: int, read_fast, read_general) -> list:
    r = _Reader(buf)
    out = []
    prev_ns = None
    if nns > (r.end - r.pos) // NS_HEADER_SIZE:
        raise SnapshotError(f"{nns} namespaces cannot fit in {len(buf)} bytes (byte offset 16)")
    seen = set()
    for index in range(nns):
        kind, ns, nse, count, data_len, at = read_namespace_header(r, index)
        # (an int namespace from _int_namespace: one sig byte)
        ordered = nse[:-1] if type(ns) is int and len(nse) == 11 else nse[: len(nse) - _sig_count(nse)]
        if prev_ns is not None and not prev_ns < ordered:
            raise SnapshotError(
                f"namespace {ns!r:.80} (byte offset {at}) is "
                f"{'a repeat' if prev_ns == ordered else 'out of order'}"
            )
        prev_ns = ordered
        if kind == K_GENERAL:
            items = read_general(r, count, data_len, ns, node_size)
        else:
            items = read_fast(r, kind, count, ns, node_size)
        out.append((ns, items))
        seen.add(ns)
    if r.pos != r.end:
        raise SnapshotError(
            f"{r.end - r.pos} unused bytes at byte offset {r.pos} before the checksum"
        )
    if len(seen) != nns:
        raise SnapshotError("two namespaces of the snapshot are the same namespace")
    return out


def loads_items(data) -> tuple[int, list]:
    """(node_size, [(namespace, [Item, ...]), ...]) of a snapshot, in file
    order; SnapshotError for anything that is not a valid snapshot."""
    return parse(
        data,
        lambda r, kind, count, ns, _: _read_fast(r, kind, count, ns),
        lambda r, count, data_len, ns, _: _read_general(r, count, data_len, ns),
    )


def _sig_count(e: bytes) -> int:
    """Sig bytes at the end of a valid value encoding."""
    nums: list = []
    _get(e, 0, 0, nums)
    return len(nums)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def is_path(file) -> bool:
    return isinstance(file, (str, bytes, os.PathLike))


def _write_to(f, data) -> None:
    """Write data (a buffer, or a callable that writes to f) to f."""
    if callable(data):
        data(f)
        return
    view = memoryview(data).cast("B")
    written = 0
    while written < len(view):
        written += f.write(view[written : written + (1 << 30)])


def write_atomic(path, data, *, fsync: bool = True) -> None:
    """Write ``data`` (a buffer, or a callable ``data(f)`` that writes to the
    binary file ``f``) to ``path`` so that the path holds either its
    old content or all of ``data``: a temporary file in the same directory,
    written, fsynced, renamed over ``path``, then the directory fsynced
    (``fsync=False`` skips both fsyncs).  The temporary file is removed on
    any failure."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    tmp = None
    fd = -1
    for attempt in range(100):
        name = os.path.join(directory, f".{base}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                         0o666)
        except FileExistsError:
            continue
        tmp = name
        break
    if tmp is None:
        raise FileExistsError(f"could not create a temporary file next to {path!r}")
    try:
        with open(fd, "wb", closefd=True) as f:
            fd = -1
            _write_to(f, data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    if fsync and os.name == "posix":  # (a directory cannot be opened for fsync elsewhere)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


READ_THREAD_MIN = 8 << 20  # from this size a file is read in two halves on two threads


def _pread_into(fd: int, view: memoryview, start: int, end: int) -> int:
    """Read bytes [start, end) of file ``fd`` into ``view[start:end]``;
    returns how many were read (fewer at end of file)."""
    at = start
    while at < end:
        n = os.preadv(fd, [view[at:end]], at)
        if n <= 0:
            break
        at += n
    return at - start


def _two_thread_read(fd: int, view: memoryview, size: int) -> bool:
    """Fill ``view[:size]`` from ``fd`` in two halves, the second on a
    helper thread (``os.preadv`` releases the GIL): the copy out of the page
    cache and the page faults of the fresh buffer then run on both cores
    (a 240 MB snapshot in 25 ms instead of 43 on the development VM,
    bench/README.md).  False if either half came up short (the file
    shrank meanwhile)."""
    half = (size // 2) & ~4095
    got = [0]
    helper = threading.Thread(target=lambda: got.__setitem__(0, _pread_into(fd, view, half, size)),
                              daemon=True)
    helper.start()
    first = _pread_into(fd, view, 0, half)
    helper.join()
    return first == half and got[0] == size - half


def read_path(path) -> np.ndarray:
    """The whole file at ``path`` as a uint8 array (8-byte aligned); a large
    file on two threads (READ_THREAD_MIN; not with AGGTREE_THREADS=1)."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = np.empty(size, dtype=np.uint8)
        view = memoryview(buf)  # type: ignore[arg-type]  # (numpy arrays are buffers)
        if (size >= READ_THREAD_MIN and hasattr(os, "preadv")
                and os.environ.get("AGGTREE_THREADS", "").strip() != "1"
                and _two_thread_read(f.fileno(), view, size)):
            got = size
            f.seek(size)
        else:
            got = 0
            f.seek(0)
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        if got < size:
            return buf[:got].copy()
        if f.read(1):
            # the file grew while we read it: take it whole, the slow way
            f.seek(0)
            return np.frombuffer(f.read(), dtype=np.uint8).copy()
    return buf


STREAM_MIN = 4 << 20  # numeric sections of this many bytes or more are read straight into trees
_READ_AHEAD = 256 << 10  # the bytes between them are read in blocks of at least this


class _Short(Exception):
    """The file ended early (it shrank while it was read)."""


def read_path_streamed(path, read_section, crc32, crc32_combine) -> tuple[Any, dict, Any] | None:
    """Read the snapshot file at ``path`` with its large numeric sections
    going straight into their trees, or None when that does not apply (a
    small file, no large numeric section, anything unexpected: the caller
    then reads the file whole, whose checks report what is wrong).

    Walks the namespace headers as ``parse`` does; a numeric section of
    STREAM_MIN bytes or more is handed to ``read_section(fd, offset, count,
    kind, node_size)``, which returns (tree, crc32 of the section) or None
    (the section fails a check); every other byte is read into a buffer the
    size of the file, at its offset, so that ``parse`` can walk it: the
    sections read into trees are holes in it (never touched, so never in
    memory).  Returns (buffer, {offset: (kind, count, tree)}, crc) where
    ``crc(body)`` is the crc32 of the file's body, holes included (from the
    sections' checksums, combined with ``crc32_combine(crc1, crc2, len2)``).
    Raises SnapshotError only for a bad header (as ``parse`` would)."""
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        st = os.fstat(fd)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode) or size < READ_THREAD_MIN or not hasattr(os, "preadv"):
            return None
        buf = np.empty(size, dtype=np.uint8)
        view = memoryview(buf)  # type: ignore[arg-type]  # (numpy arrays are buffers)
        have = 0  # buf[:have] is read, but for the holes
        holes: list = []  # (offset, length, crc32) of each section read into a tree
        sections: dict = {}

        def need(stop: int) -> None:
            nonlocal have
            if stop > have:
                stop = min(size, max(stop, have + _READ_AHEAD))
                if _pread_into(fd, view, have, stop) != stop - have:
                    raise _Short
                have = stop

        try:
            need(HEADER_SIZE)
            node_size, nns = check_envelope(buf, check_crc=False)
            pos, end = HEADER_SIZE, size - TRAILER_SIZE
            for _ in range(nns):
                need(pos + NS_HEADER_SIZE)
                if pos + NS_HEADER_SIZE > end:
                    return None
                kind, _, nslen, count, data_len = NS_HEADER.unpack_from(view, pos)
                pos += NS_HEADER_SIZE + _pad8(nslen)
                if kind in (K_FLOAT, K_INT, K_NONE):
                    n = 24 * count
                    if n >= STREAM_MIN and pos + n <= end:
                        need(pos)
                        got = read_section(fd, pos, count, kind, node_size)
                        if got is None:
                            return None
                        sections[pos] = (kind, count, got[0])
                        holes.append((pos, n, got[1]))
                        have = max(have, pos + n)
                elif kind == K_GENERAL:
                    n = _pad8(4 * count) + _pad8(data_len) + 8 * count
                else:
                    return None
                pos += n
                if pos > end:
                    return None
            if not holes:
                return None
            need(size)
            if os.pread(fd, 1, size):
                return None  # the file grew while it was read
        except _Short:
            return None

    def crc(body) -> int:
        value, at = 0, 0
        for off, n, c in holes + [(len(body), 0, 0)]:
            value = crc32_combine(value, crc32(body[at:off]), off - at)
            value = crc32_combine(value, c, n)
            at = off + n
        return value

    return buf, sections, crc


def map_path(path):
    """The file at ``path`` mapped read-only, or None when it cannot be
    mapped (empty, not a regular file, no mmap): loading from the page cache
    without copying the bytes first.  Not populated up front (MAP_POPULATE
    maps every page on the calling thread; mapped lazily, the checksum's two
    threads fault them in, which measured faster: bench/README.md).  A
    mapped file that another program truncates while it is read raises
    SIGBUS; aggtree never truncates a snapshot (save renames a new file
    over it)."""
    if not hasattr(mmap, "MAP_PRIVATE"):
        return None
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return None
        try:
            return mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                             prot=mmap.PROT_READ)
        except (OSError, ValueError):
            return None


def read_file(file, use_mmap: bool = False):
    """The bytes of a snapshot from a path (mapped with ``use_mmap``, else
    read) or a binary file object."""
    if is_path(file):
        if use_mmap:
            m = map_path(file)
            if m is not None:
                return m
        return read_path(file)
    if isinstance(file, io.TextIOBase):
        raise TypeError("a snapshot is binary: open the file in binary mode ('rb')")
    data = file.read()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"file.read() returned {type(data).__name__}, not bytes: open the "
                        f"file in binary mode")
    return data


def save_to(file, data, fsync: bool) -> None:
    if is_path(file):
        write_atomic(file, data, fsync=fsync)
        return
    if isinstance(file, io.TextIOBase):
        raise TypeError("a snapshot is binary: open the file in binary mode ('wb')")
    _write_to(file, data)
