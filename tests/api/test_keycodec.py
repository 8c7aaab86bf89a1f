"""Tests of the general-key codec (src/aggtree/keycodec.pxi) through its test
hooks in aggtree._core.

The codec maps Python keys to memcmp-ordered byte strings:
    None < numbers (bool/int/float by exact value) < str < bytes < tuple
An independent oracle, ``sort_key``, maps values to nested tuples that Python
itself orders the same way; the encodings must agree with it.
"""

import collections
import enum
import math
import struct
import sys

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from aggtree._core import (
    _decode_item,
    _decode_key,
    _encode_item,
    _encode_key,
    _encode_prefix,
)

DBL_MAX = sys.float_info.max
IMAX = int(DBL_MAX)                 # largest int a double holds
# Ints beyond +-DBL_MAX carry a remainder (v - IMAX, or the magnitude
# -v - IMAX below -DBL_MAX); up to 200 bytes it has a one-byte length marker,
# beyond that a 4-byte length.  The last short-form ints on each side:
SHORT_HI = IMAX + 2**1600 - 1
SHORT_LO = -(IMAX + 2**1600) + 1
INF = math.inf
NAN = math.nan
MAX_DEPTH = 32

# ------------------------------------------------------------------ oracle --


def ref_enc_int(v):
    """enc(v) of an int, built from the ORDERED ENCODING section of the spec
    (independently of the codec)."""
    assert type(v) is int
    if v < -IMAX:                   # d = -inf, m = -v - IMAX, inverted
        m = -v - IMAX
        n = (m.bit_length() + 7) // 8
        inv = ((1 << (8 * n)) - 1 - m).to_bytes(n, "big")
        head = b"\x20" + f64key(-INF)
        if n <= 200:
            return head + bytes([0xFF - n]) + inv
        return head + b"\x02" + (0xFFFFFFFF - n).to_bytes(4, "big") + inv
    if v > IMAX:
        d = DBL_MAX
    else:
        d = float(v)
        if int(d) > v:
            d = math.nextafter(d, -INF)
    r = v - int(d)
    head = b"\x20" + f64key(d)
    if r == 0:
        return head + b"\x01"
    n = (r.bit_length() + 7) // 8
    rb = r.to_bytes(n, "big")
    if n <= 200:
        return head + bytes([1 + n]) + rb
    return head + b"\xfe" + n.to_bytes(4, "big") + rb


def sort_key(v):
    """Independent model of the order: nested (type_rank, value) tuples."""
    if v is None:
        return (0,)
    if isinstance(v, (bool, int, float)):
        return (1, v)               # Python compares int/float/bool exactly
    if isinstance(v, str):
        return (2, v)               # by code point
    if isinstance(v, bytes):
        return (3, v)
    if isinstance(v, (tuple, list)):
        return (4, tuple(sort_key(e) for e in v))
    raise AssertionError(f"oracle got {type(v)}")


def cmp(a, b):
    return (a > b) - (a < b)


def ocmp(a, b):
    return cmp(sort_key(a), sort_key(b))


def same(expected, got):
    """`got` is `expected` decoded: same values and same types (lists come
    back as tuples; -0.0 comes back as 0.0, which == -0.0)."""
    if isinstance(expected, list):
        expected = tuple(expected)
    if type(expected) is not type(got):
        return False
    if isinstance(expected, tuple):
        return len(expected) == len(got) and all(
            same(x, y) for x, y in zip(expected, got))
    return expected == got


def expected_sig(*values):
    out = bytearray()

    def walk(v):
        if isinstance(v, bool):
            out.append(3)
        elif isinstance(v, int):
            out.append(1)
        elif isinstance(v, float):
            out.append(2)
        elif isinstance(v, (tuple, list)):
            for e in v:
                walk(e)

    for v in values:
        walk(v)
    return bytes(out)


def f64key(d):
    """Sortable image of a double, as the spec defines it."""
    if d == 0.0:
        d = 0.0
    (u,) = struct.unpack(">Q", struct.pack(">d", d))
    u = (~u & 0xFFFFFFFFFFFFFFFF) if u >> 63 else (u | 1 << 63)
    return u.to_bytes(8, "big")


def core_cmp(a, b):
    """The C core's GENERAL compare: 8-byte zero-padded head, then tail."""
    ha, hb = a[:8].ljust(8, b"\0"), b[:8].ljust(8, b"\0")
    if ha != hb:
        return cmp(ha, hb)
    return cmp(a[8:], b[8:])


def nest(depth, leaf=1, kind=tuple):
    v = leaf
    for _ in range(depth):
        v = kind([v])
    return v


# -------------------------------------------------------------- strategies --

SPECIAL_INT_BASES = [
    0, 2**53, -(2**53), 2**63, -(2**63), 2**64, -(2**64), 2**100, -(2**100),
    IMAX, -IMAX, 2**1024, -(2**1024), IMAX + 2**1000, -IMAX - 2**1000,
    IMAX + 2**970, -IMAX - 2**970,
    # short/long remainder boundaries, and 1-, 2-byte carries of the length
    SHORT_HI, SHORT_LO, IMAX + 2**(8 * 255), -IMAX - 2**(8 * 255),
    IMAX + 2**(8 * 256), -IMAX - 2**(8 * 256),
    10**400, -(10**400), 10**1000, -(10**1000), 2**5000, -(2**5000),
]
SPECIAL_INTS = sorted({
    b + o for b in SPECIAL_INT_BASES for o in (-2, -1, 0, 1, 2)
})
SPECIAL_FLOATS = [
    0.0, -0.0, 1.0, -1.0, 0.5, INF, -INF, DBL_MAX, -DBL_MAX, 5e-324, -5e-324,
    2.2250738585072014e-308, 2.0**53, -(2.0**53), 2.0**53 + 2, 2.0**63,
    -(2.0**63), 2.0**64, 1e300, -1e300,
]
SPECIAL_CHARS = [
    "\x00", "\x01", "a", "\x7f", "\x80", "\xff", "\u07ff", "\u0800", "\ud7ff",
    "\ud800", "\udbff", "\udc00", "\udfff", "\ue000", "\uffff", "\U00010000",
    "\U0001f600", "\U0010ffff",
]
# a small pool of values with many cross-type equalities and near-ties
POOL = [
    None, 0, 0.0, -0.0, False, 1, 1.0, True, -1, 2**53, float(2**53), 2**53 + 1,
    2**53 + 2, IMAX, DBL_MAX, IMAX + 1, INF, -INF, -IMAX, -DBL_MAX, -IMAX - 1,
    SHORT_HI + 1, SHORT_LO - 1, "", "a", "a\x00", "a\x00\x00",
    "a\x01", "\x00", "b", b"", b"a", b"a\x00", b"a\xff", b"\x00", b"\xff",
    (), [], (None,), (0,), [0.0], (False,), (1, "a"), [1.0, "a"], ("a",),
    ("a\x00",), ((),), ([],),
]

ints = st.one_of(
    st.integers(-1000, 1000),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(SPECIAL_INTS),
    st.builds(lambda b, o: b + o, st.sampled_from(SPECIAL_INT_BASES),
              st.integers(-5000, 5000)),
    st.integers(-(IMAX + 2**1700), IMAX + 2**1700),
    # beyond +-DBL_MAX, remainders of every length up to 400 bytes
    st.builds(lambda sign, bits, x: sign * (IMAX + (x >> (3200 - bits)) + 1),
              st.sampled_from([1, -1]), st.integers(0, 3200),
              st.integers(0, 2**3200 - 1)),
)
floats = st.one_of(
    st.floats(allow_nan=False),
    st.sampled_from(SPECIAL_FLOATS),
    st.integers(-IMAX, IMAX).map(float),
)
texts = st.text(st.one_of(st.sampled_from(SPECIAL_CHARS),
                          st.characters(exclude_categories=())), max_size=8)
binaries = st.one_of(
    st.binary(max_size=8),
    st.lists(st.sampled_from([0, 1, 0x61, 0xFE, 0xFF]), max_size=6).map(bytes),
)
scalars = st.one_of(
    st.none(), st.booleans(), ints, floats, texts, binaries, st.sampled_from(POOL),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(tuple),
        st.lists(children, max_size=4),
    ),
    max_leaves=10,
)
value_lists = st.lists(values, min_size=2, max_size=6)

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------ property tests --


@SETTINGS
@given(value_lists)
def test_order_matches_oracle(vs):
    encs = [_encode_key(v) for v in vs]
    for a, ea in zip(vs, encs):
        for b, eb in zip(vs, encs):
            assert cmp(ea, eb) == ocmp(a, b), (a, b, ea.hex(), eb.hex())


@SETTINGS
@given(st.lists(st.sampled_from(POOL), min_size=2, max_size=8))
def test_equal_iff_equal_value(vs):
    for a in vs:
        for b in vs:
            assert (_encode_key(a) == _encode_key(b)) == (sort_key(a) == sort_key(b))


@SETTINGS
@given(values, values)
def test_item_roundtrip_keeps_types(k, i):
    e = _encode_item(k, i)
    assert e == _encode_key(k) + _encode_key(i) + expected_sig(k, i)
    dk, di = _decode_item(e)
    assert same(k, dk), (k, dk)
    assert same(i, di), (i, di)
    # the core may hand the bytes back zero-padded (or with garbage after)
    for tail in (b"\0" * 8, b"\x01\xff\x00"):
        dk2, di2 = _decode_item(e + tail)
        assert same(k, dk2) and same(i, di2)


@SETTINGS
@given(st.lists(st.tuples(values, values), min_size=2, max_size=5))
def test_item_order_and_core_compare(pairs):
    items = [_encode_item(k, i) for k, i in pairs]
    for (ka, ia), ea in zip(pairs, items):
        for (kb, ib), eb in zip(pairs, items):
            o = cmp((sort_key(ka), sort_key(ia)), (sort_key(kb), sort_key(ib)))
            if o != 0:
                assert cmp(ea, eb) == o
                # the core's padded-head compare agrees with memcmp on items
                assert core_cmp(ea, eb) == o


@SETTINGS
@given(st.lists(st.tuples(values, values), min_size=1, max_size=5), values, values)
def test_bounds(pairs, k, i):
    """Bounds the core uses, against items, under memcmp and under the core's
    compare.  All bounds are used with side 0 (items < bound); bounds that do
    not end in 0xFF may also be used with side 1 (items <= bound)."""
    sk = sort_key(k)
    pair = (sort_key(k), sort_key(i))
    lo_key = _encode_key(k)
    hi_key = lo_key + b"\xff"
    lo_pair = _encode_key(k) + _encode_key(i)
    hi_pair = lo_pair + b"\xff"
    for k2, i2 in pairs + [(k, i)]:
        e = _encode_item(k2, i2)
        s2 = sort_key(k2)
        p2 = (s2, sort_key(i2))
        expect = [
            (lo_key, s2 < sk),
            (hi_key, s2 <= sk),
            (lo_pair, p2 < pair),
            (hi_pair, p2 <= pair),
        ]
        for bound, below in expect:
            assert (e < bound) == below
            assert (core_cmp(e, bound) < 0) == below
        for bound in (lo_key, lo_pair):
            assert core_cmp(e, bound) == cmp(e, bound)


@SETTINGS
@given(st.lists(values, max_size=3), st.lists(values, max_size=3), values, values,
       st.booleans())
def test_prefix(p, rest, other, ident, as_list):
    prefix = list(p) if as_list else tuple(p)
    pe = _encode_prefix(prefix)
    hi = pe + b"\xff"
    t = tuple(p) + tuple(rest)
    et = _encode_key(t)
    assert et.startswith(pe)
    assert pe < et < hi
    it = _encode_item(t, ident)
    assert pe < it < hi
    assert core_cmp(it, pe) > 0 and core_cmp(it, hi) < 0
    for u in (other, (other,), tuple(p[:-1]) + (other,), tuple(p) + (other,)):
        eu = _encode_key(u)
        starts = (isinstance(u, (tuple, list)) and len(u) >= len(p) and all(
            sort_key(x) == sort_key(y) for x, y in zip(u, p)))
        assert (pe <= eu < hi) == starts, (p, u)
        iu = _encode_item(u, ident)
        assert (pe <= iu < hi) == starts
        assert (core_cmp(iu, pe) >= 0 and core_cmp(iu, hi) < 0) == starts
        if not starts:
            # below the range exactly when the oracle says u < p
            assert (eu < pe) == (sort_key(u) < sort_key(tuple(p)))
            # a non-match may only share the prefix through the 0xFF of an
            # escaped 0x00 (a str/bytes element continued by '\x00'), and then
            # it sorts after the whole range
            assert not eu.startswith(pe) or eu.startswith(hi)


@SETTINGS
@given(st.binary(max_size=40))
@example(b"")
@example(b"\x20")
@example(b"\x50" * 40)
@example(b"\x30\x00")
@example(b"\x30\xff\x00\x10")
def test_random_bytes_never_crash(b):
    try:
        r = _decode_item(b)
    except ValueError:
        return
    assert isinstance(r, tuple) and len(r) == 2


@SETTINGS
@given(values, values, st.data())
def test_mutated_encodings_never_crash(k, i, data):
    e = bytearray(_encode_item(k, i))
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(e)))
        if op == "flip" and pos < len(e):
            e[pos] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del e[pos:]
        elif op == "insert":
            e.insert(pos, data.draw(st.integers(0, 255)))
        elif op == "delete" and pos < len(e):
            del e[pos]
    try:
        r = _decode_item(bytes(e))
    except ValueError:
        return
    assert isinstance(r, tuple) and len(r) == 2
    # whatever decodes must be a valid key pair again, and canonical: its
    # encoding is what was read (the decoder ignores bytes after the sig)
    assert bytes(e).startswith(_encode_item(*r))


@SETTINGS
@given(ints)
def test_int_encoding_matches_spec(v):
    e = _encode_key(v)
    assert e == ref_enc_int(v), v
    assert _decode_item(_encode_item(v, None)) == (v, None)
    got = _decode_key(e)
    assert got == v and _encode_key(got) == e


huge_ints = st.one_of(
    st.sampled_from([v for v in SPECIAL_INTS if abs(v) > IMAX]),
    st.builds(lambda sign, bits, x: sign * (IMAX + (x >> (3200 - bits)) + 1),
              st.sampled_from([1, -1]), st.integers(0, 3200),
              st.integers(0, 2**3200 - 1)),
)


@SETTINGS
@given(huge_ints, st.sampled_from([None, 1, 0.5, "x", (2**70,)]), st.data())
def test_huge_int_corruption(v, other, data):
    """Truncated or mutated encodings of ints beyond +-DBL_MAX (marker,
    length field, remainder) are rejected or decode to the canonical value
    they spell; the decoder never reads past the end."""
    e = _encode_item(v, other)
    head = len(_encode_key(v))
    for cut in range(head):         # every truncation inside enc(v)
        with pytest.raises(ValueError, match="corrupt key encoding"):
            _decode_item(e[:cut])
    m = bytearray(e)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, min(len(m) - 1, 20)))
        m[pos] = data.draw(st.sampled_from([0x00, 0x01, 0x02, 0x36, 0x37, 0x7F,
                                            0x80, 0xC9, 0xCA, 0xFD, 0xFE, 0xFF]))
    for cand in (bytes(m), bytes(m[:data.draw(st.integers(0, len(m)))])):
        try:
            r = _decode_item(cand)
        except ValueError:
            continue
        assert cand.startswith(_encode_item(*r)), (v, cand[:24].hex())


@SETTINGS
@given(values)
def test_decode_key_untyped_numbers(v):
    got = _decode_key(_encode_key(v))
    assert sort_key(got) == sort_key(v)
    assert _encode_key(got) == _encode_key(v)


# ------------------------------------------------------- example tests --


def test_none():
    assert _encode_key(None) == b"\x10"
    assert _decode_item(_encode_item(None, None)) == (None, None)
    assert _encode_item(None, None) == b"\x10\x10"


@pytest.mark.parametrize("v", [0.0, 1.0, -1.0, 0.5, -2.5, INF, -INF, DBL_MAX,
                               -DBL_MAX, 5e-324, -5e-324, 1e300])
def test_float_layout(v):
    assert _encode_key(v) == b"\x20" + f64key(v) + b"\x01"


def test_number_layout_details():
    assert f64key(1.0) == bytes.fromhex("bff0000000000000")
    assert f64key(-1.0) == bytes.fromhex("400fffffffffffff")
    assert _encode_key(-0.0) == _encode_key(0.0) == b"\x20\x80" + b"\0" * 7 + b"\x01"
    assert _encode_key(1) == _encode_key(1.0) == _encode_key(True)
    assert _encode_key(0) == _encode_key(False) == _encode_key(-0.0)
    assert _encode_key(2**60) == _encode_key(2.0**60)
    # 2**53 + 1: floor double 2**53, remainder 1
    assert _encode_key(2**53 + 1) == b"\x20" + f64key(2.0**53) + b"\x02\x01"
    # negative: floor rounds toward -inf
    assert _encode_key(-(2**53) - 1) == b"\x20" + f64key(-(2.0**53) - 2) + b"\x02\x01"
    assert _encode_key(2**63 - 1) == b"\x20" + f64key(2.0**63 - 1024) + b"\x03\x03\xff"
    assert _encode_key(-(2**63) - 1) == b"\x20" + f64key(-(2.0**63) - 2048) + b"\x03\x07\xff"
    # beyond DBL_MAX: d = DBL_MAX, remainder v - DBL_MAX
    assert _encode_key(IMAX + 1) == b"\x20" + f64key(DBL_MAX) + b"\x02\x01"
    assert _encode_key(IMAX + 256) == b"\x20" + f64key(DBL_MAX) + b"\x03\x01\x00"
    assert _encode_key(SHORT_HI) == b"\x20" + f64key(DBL_MAX) + b"\xc9" + b"\xff" * 200
    # longer remainders: marker 0xFE, 4-byte big-endian length
    assert (_encode_key(SHORT_HI + 1)
            == b"\x20" + f64key(DBL_MAX) + b"\xfe\x00\x00\x00\xc9\x01" + b"\x00" * 200)
    assert (_encode_key(IMAX + 2**(8 * 256) + 5)
            == b"\x20" + f64key(DBL_MAX) + b"\xfe\x00\x00\x01\x01\x01" + b"\x00" * 255 + b"\x05")
    assert _encode_key(-IMAX) == _encode_key(-DBL_MAX)
    # below -DBL_MAX: d = -inf, m = -v - IMAX, marker 0xFF - len, ~bytes
    ninf = b"\x20" + f64key(-INF)
    assert _encode_key(-INF) == ninf + b"\x01"
    assert _encode_key(-IMAX - 1) == ninf + b"\xfe\xfe"
    assert _encode_key(-IMAX - 255) == ninf + b"\xfe\x00"
    assert _encode_key(-IMAX - 256) == ninf + b"\xfd\xfe\xff"
    assert _encode_key(SHORT_LO) == ninf + b"\x37" + b"\x00" * 200
    # ... and longer magnitudes: marker 0x02, ~(4-byte length), ~bytes
    assert (_encode_key(SHORT_LO - 1)
            == ninf + b"\x02\xff\xff\xff\x36\xfe" + b"\xff" * 200)
    assert (_encode_key(-IMAX - 2**(8 * 256) - 5)
            == ninf + b"\x02\xff\xff\xfe\xfe\xfe" + b"\xff" * 255 + b"\xfa")


def test_number_order():
    chain = [
        -INF, -(10**5000), -IMAX - 2**(8 * 256), -IMAX - 2**(8 * 256) + 1,
        -IMAX - 2**(8 * 255) - 1, -IMAX - 2**(8 * 255), SHORT_LO - 1, SHORT_LO,
        -(10**400), -(2**1100), -IMAX - 256, -IMAX - 255, -IMAX - 2, -IMAX - 1,
        -DBL_MAX, -IMAX + 1, -(2**1023) - 1, -(2**64) - 1, -(2**64), -(2**53) - 1, -(2.0**53), -1,
        -5e-324, 0, 5e-324, 0.5, True, 1.5, 2, 2**53, 2**53 + 1, 2.0**53 + 2,
        2**53 + 3, 2**63 - 1, 2.0**63, 2**63 + 1, 2**64 + 1, 2**1023 + 1,
        DBL_MAX, IMAX + 1, IMAX + 255, IMAX + 256, IMAX + 2**1000, 10**400,
        SHORT_HI, SHORT_HI + 1, IMAX + 2**(8 * 255), IMAX + 2**(8 * 255) + 1,
        IMAX + 2**(8 * 256) - 1, IMAX + 2**(8 * 256), 10**5000, 10**50000, INF,
    ]
    encs = [_encode_key(v) for v in chain]
    for a, b, ea, eb in zip(chain, chain[1:], encs, encs[1:]):
        assert a < b and ea < eb, (a, b)
    assert _encode_key(2**53 + 1) > _encode_key(float(2**53))
    assert _encode_key(2**53 + 1) < _encode_key(float(2**53 + 2))


def test_type_rank_order():
    chain = [None, -INF, 0, INF, "", "\x00", "a", "\U0010ffff", b"", b"\x00",
             b"\xff", (), (None,), (0,), ("a",), (b"",), ((),)]
    encs = [_encode_key(v) for v in chain]
    assert encs == sorted(encs)
    assert len(set(encs)) == len(encs)


def test_str_layout_and_order():
    assert _encode_key("") == b"\x30\x00"
    assert _encode_key("ab") == b"\x30ab\x00"
    assert _encode_key("a\x00b") == b"\x30a\x00\xffb\x00"
    assert _encode_key("\x00\x00") == b"\x30\x00\xff\x00\xff\x00"
    assert _encode_key("é") == b"\x30" + "é".encode() + b"\x00"
    assert _encode_key("\ud800") == b"\x30\xed\xa0\x80\x00"
    chain = ["", "\x00", "\x00\x00", "\x00\x01", "\x01", "a", "a\x00", "a\x00\x00",
             "a\x01", "ab", "\x7f", "\x80", "\u07ff", "\u0800", "\ud7ff", "\ud800",
             "\udbff\udfff", "\udc00", "\udfff", "\ue000", "\uffff", "\U00010000",
             "\U0001f600", "\U0010ffff"]
    encs = [_encode_key(s) for s in chain]
    assert chain == sorted(chain)
    for a, b, ea, eb in zip(chain, chain[1:], encs, encs[1:]):
        assert ea < eb, (a, b)


def test_str_roundtrip_special():
    for s in ["", "\x00", "a\x00b\x00", "\ud800", "x\udfffy", "\ud83d\ude00",
              "\U0001f600", "é" * 300, "\x00" * 1000, "abc" * 10000]:
        k, i = _decode_item(_encode_item(s, s))
        assert type(k) is str and k == s and i == s
    # two lone surrogates stay two code points (not merged into U+1F600)
    assert len(_decode_item(_encode_item("\ud83d\ude00", None))[0]) == 2


def test_bytes_layout_and_order():
    assert _encode_key(b"") == b"\x40\x00"
    assert _encode_key(b"\x00\xff") == b"\x40\x00\xff\xff\x00"
    chain = [b"", b"\x00", b"\x00\x00", b"\x00\xff", b"\x01", b"a", b"a\x00",
             b"a\x00\xff", b"a\x01", b"\xfe", b"\xff", b"\xff\x00", b"\xff\xff"]
    encs = [_encode_key(v) for v in chain]
    for a, b, ea, eb in zip(chain, chain[1:], encs, encs[1:]):
        assert a < b and ea < eb, (a, b)
    big = bytes(range(256)) * 100
    assert _decode_item(_encode_item(big, b"\xff" * 3000)) == (big, b"\xff" * 3000)


def test_tuple_layout_and_order():
    assert _encode_key(()) == b"\x50\x00"
    assert _encode_key((None, "a")) == b"\x50\x10\x30a\x00\x00"
    assert _encode_key([1, [2.0, "x"]]) == _encode_key((1.0, (2, "x")))
    chain = [(), (None,), (None, None), (-1,), (0,), (0, None), (0, 0), (0, "a"),
             (1,), ("a",), ("a", 1), ("a\x00",), ("a\x00", None), ("b",),
             (b"",), ((),), ((), None), ((None,),), ((1,),), ((1, 2),), ((2,),)]
    encs = [_encode_key(v) for v in chain]
    for a, b, ea, eb in zip(chain, chain[1:], encs, encs[1:]):
        assert sort_key(a) < sort_key(b) and ea < eb, (a, b)


def test_item_types_preserved():
    k = (1, 1.0, True, False, 2**70, [0, 0.0, -0.0], None, "s", b"b", 2**53 + 1)
    ident = [IMAX + 5, SHORT_HI, -IMAX, INF, -INF, (True,)]
    e = _encode_item(k, ident)
    assert e.endswith(bytes([1, 2, 3, 3, 1, 1, 2, 2, 1, 1, 1, 1, 2, 2, 3]))
    dk, di = _decode_item(e)
    assert same(k, dk) and same(ident, di)
    assert dk[2] is True and dk[3] is False
    assert math.copysign(1.0, dk[5][2]) == 1.0       # -0.0 comes back as 0.0
    assert _encode_item(1, 1) != _encode_item(1.0, True)
    assert _encode_item(1, 1)[:-2] == _encode_item(1.0, True)[:-2]


def test_decode_ignores_padding():
    for k, i in [(None, None), (1, None), ("a", None), (None, ""), ((), ())]:
        e = _encode_item(k, i)
        padded = e + b"\0" * (8 - len(e)) if len(e) < 8 else e
        assert same(k, _decode_item(padded)[0])
        assert same(i, _decode_item(padded)[1])


def test_decode_key_semantics():
    assert _decode_key(_encode_key(1)) == 1.0 and type(_decode_key(_encode_key(1))) is float
    assert type(_decode_key(_encode_key(True))) is float
    assert _decode_key(_encode_key(2**53 + 1)) == 2**53 + 1
    assert _decode_key(_encode_key((1, "a", [b"x"]))) == (1.0, "a", (b"x",))
    assert _decode_key(_encode_key("a") + b"\0\0") == "a"


def test_subclasses_accepted_as_base_types():
    class Color(enum.IntEnum):
        RED = 7

    class MyStr(str):
        pass

    class MyFloat(float):
        pass

    class MyBytes(bytes):
        pass

    class MyList(list):
        pass

    Point = collections.namedtuple("Point", "x y")
    cases = [(Color.RED, 7), (MyStr("hi"), "hi"), (MyFloat(2.5), 2.5),
             (MyBytes(b"q"), b"q"), (Point(1, "y"), (1, "y")),
             (MyList([1, 2]), (1, 2))]
    for v, plain in cases:
        assert _encode_key(v) == _encode_key(plain)
        dk, _ = _decode_item(_encode_item(v, None))
        assert same(plain, dk)

    class BigInt(int):
        def __lt__(self, other):
            raise AssertionError("codec must not call subclass methods")

        __gt__ = __sub__ = __rsub__ = __float__ = __int__ = __index__ = __lt__

    assert _encode_key(BigInt(2**80 + 1)) == _encode_key(2**80 + 1)
    assert _encode_key(BigInt(5)) == _encode_key(5)


@pytest.mark.parametrize("bad", [
    {}, {1: 2}, set(), frozenset(), object(), bytearray(b"a"), memoryview(b"a"),
    1j, type, len, (1, {}), [None, [set()]], ("a", object()),
])
def test_unsupported_types(bad):
    with pytest.raises(TypeError) as ei:
        _encode_key(bad)
    inner = bad
    while isinstance(inner, (tuple, list)):
        inner = [x for x in inner if not isinstance(x, (str, int, type(None)))][0]
    assert type(inner).__name__ in str(ei.value)
    with pytest.raises(TypeError):
        _encode_item(bad, None)
    with pytest.raises(TypeError):
        _encode_item(None, bad)
    with pytest.raises(TypeError):
        _encode_prefix([bad])


@pytest.mark.parametrize("bad", [
    NAN, -NAN, float("nan"), (1, NAN), [["a", [NAN]]], (None, (), (1.0, NAN)),
])
def test_nan_rejected(bad):
    with pytest.raises(ValueError):
        _encode_key(bad)
    with pytest.raises(ValueError):
        _encode_item(None, bad)
    with pytest.raises(ValueError):
        _encode_item(bad, 1)


@pytest.mark.parametrize("v", [
    SHORT_LO - 1, -(IMAX + 2**1600) - 2**970, -(2**1700), -(2**5000),
    -(10**20000), SHORT_HI + 1, IMAX + 2**1600, 2**1700, 2**10000, 10**20000,
    -(2**(8 * 70000)) - 3, 2**(8 * 70000) + 3,
], ids=lambda v: f"{'-' if v < 0 else '+'}2^{v.bit_length()}")
def test_ints_of_any_size(v):
    """Ints of any size are keys (no range limit short of 2**31 bytes)."""
    e = _encode_key(v)
    assert e == ref_enc_int(v)
    assert _decode_item(_encode_item(v, (v, "x"))) == (v, (v, "x"))
    assert _decode_key(e) == v
    assert _encode_key(v - 1) < e < _encode_key(v + 1)
    if v > 0:
        assert _encode_key(DBL_MAX) < e < _encode_key(INF)
    else:
        assert _encode_key(-INF) < e < _encode_key(-DBL_MAX)
    assert _encode_key((1, v)) == b"\x50" + _encode_key(1) + e + b"\x00"


@pytest.mark.parametrize("kind", [tuple, list])
def test_nesting_depth(kind):
    ok = nest(MAX_DEPTH, kind=kind)
    assert _decode_item(_encode_item(ok, ok))[0] == nest(MAX_DEPTH)
    with pytest.raises(ValueError):
        _encode_key(nest(MAX_DEPTH + 1, kind=kind))
    with pytest.raises(ValueError):
        _encode_item(None, nest(MAX_DEPTH + 1, kind=kind))
    with pytest.raises(ValueError):
        _encode_key(nest(10000, kind=kind))
    # the prefix container is level 1
    assert _encode_prefix([nest(MAX_DEPTH - 1)]) == _encode_key((nest(MAX_DEPTH - 1),))[:-1]
    with pytest.raises(ValueError):
        _encode_prefix([nest(MAX_DEPTH)])


def test_self_referential_list():
    a = []
    a.append(a)
    with pytest.raises(ValueError):
        _encode_key(a)


def test_prefix_examples():
    assert _encode_prefix(()) == b"\x50"
    assert _encode_prefix([]) == b"\x50"
    assert _encode_prefix((1, "a")) == _encode_key((1, "a"))[:-1]
    assert _encode_prefix([1.0, "a"]) == _encode_prefix((True, "a"))
    for bad in ["ab", b"ab", 1, None, {1: 2}]:
        with pytest.raises(TypeError):
            _encode_prefix(bad)
    pe = _encode_prefix(("a",))
    # ("a\x00",) shares the bytes of the prefix but sorts after its range
    assert _encode_key(("a\x00",)).startswith(pe)
    assert _encode_key(("a\x00",)) > pe + b"\xff"
    assert pe < _encode_key(("a",)) < _encode_key(("a", None)) < pe + b"\xff"


def _num(d, marker=b"\x01", rem=b""):
    return b"\x20" + f64key(d) + marker + rem


@pytest.mark.parametrize("bad", [
    b"",                                   # nothing
    b"\x10",                               # no id
    b"\x00\x10",                           # 0x00 is no tag
    b"\xff\x10",                           # 0xff is no tag
    b"\x60\x10",                           # unknown tag
    b"\x30abc",                            # unterminated str
    b"\x40\x00\xff",                       # unterminated bytes
    b"\x50\x10",                           # unterminated tuple
    b"\x30\xc0\x80\x00\x10",               # overlong UTF-8
    b"\x30\xff\x00\x10",                   # invalid UTF-8
    b"\x20\x00\x00",                       # short number
    _num(1.0) + b"\x10",                   # missing sig byte
    _num(1.0) + b"\x10\x04",               # bad sig byte
    _num(1.0) + b"\x10\x00",               # bad sig byte
    b"\x20" + b"\x00\x07" + b"\xff" * 6 + b"\x01\x10\x02",  # -NaN bits
    b"\x20" + b"\xff\xf8" + b"\0" * 6 + b"\x01\x10\x02",    # NaN bits
    b"\x20" + b"\x7f" + b"\xff" * 7 + b"\x01\x10\x02",    # -0.0 bits
    _num(2.0**53, b"\x02", b"\x00") + b"\x10\x01",        # remainder with leading 0
    _num(2.0**53, b"\x02", b"\x02") + b"\x10\x01",        # remainder >= ulp
    _num(2.0**53, b"\x03", b"\x01") + b"\x10\x01",        # remainder truncated
    _num(1.0, b"\x02", b"\x01") + b"\x10\x01",            # remainder on small double
    _num(INF, b"\x02", b"\x01") + b"\x10\x01",            # remainder on inf
    _num(-INF, b"\x02", b"\x01") + b"\x10\x01",           # long form cut
    _num(DBL_MAX, b"\xca", b"\x01" * 201) + b"\x10\x01",  # no such marker
    _num(DBL_MAX, b"\xfd", b"\x01" * 252) + b"\x10\x01",  # no such marker
    _num(DBL_MAX, b"\xff", b"\x01" * 254) + b"\x10\x01",  # no such marker
    _num(DBL_MAX, b"\x00", b"") + b"\x10\x01",             # no such marker
    _num(DBL_MAX, b"\xfe", b"\x00\x00\x00") + b"\x10\x01",  # length cut
    _num(DBL_MAX, b"\xfe", b"\x00\x00\x00\xc8" + b"\x01" * 200) + b"\x10\x01",  # long form, short length
    _num(DBL_MAX, b"\xfe", b"\x00\x00\x00\x00") + b"\x10\x01",  # zero length
    _num(DBL_MAX, b"\xfe", b"\x00\x00\x00\xc9" + b"\x01" * 200) + b"\x10\x01",  # remainder cut
    _num(DBL_MAX, b"\xfe", b"\x00\x00\x00\xc9\x00" + b"\x01" * 200) + b"\x10\x01",  # leading 0
    _num(DBL_MAX, b"\xfe", b"\x80\x00\x00\x00\x01") + b"\x10\x01",  # > 2**31 - 1 bytes
    _num(DBL_MAX, b"\xfe", b"\x7f\xff\xff\xff\x01") + b"\x10\x01",  # claims 2 GB
    _num(2.0**1000, b"\xfe", b"\x00\x00\x00\xc9\x01" + b"\x00" * 200) + b"\x10\x01",  # long form below DBL_MAX
    _num(2.0**1000, b"\x7c", b"\x01" * 123) + b"\x10\x01",  # remainder >= ulp
    _num(DBL_MAX, b"\x02", b"\x01") + b"\x10\x02",    # float with remainder
    _num(INF, b"\xfe", b"\x00\x00\x00\xc9" + b"\x01" * 201) + b"\x10\x01",  # remainder on inf
    _num(-INF, b"\xfe", b"") + b"\x10\x01",           # magnitude cut
    _num(-INF, b"\xfe", b"\xff") + b"\x10\x01",       # magnitude with leading 0
    _num(-INF, b"\xfd", b"\xff\x00") + b"\x10\x01",   # magnitude with leading 0
    _num(-INF, b"\x37", b"\x00" * 199) + b"\x10\x01", # magnitude cut
    _num(-INF, b"\x36", b"\x00" * 201) + b"\x10\x01", # no such marker
    _num(-INF, b"\x03", b"\x00" * 252) + b"\x10\x01", # no such marker
    _num(-INF, b"\xff", b"\x00") + b"\x10\x01",       # no such marker
    _num(-INF, b"\x00", b"\x00") + b"\x10\x01",       # no such marker
    _num(-INF, b"\x02", b"\xff\xff\xff") + b"\x10\x01",  # length cut
    _num(-INF, b"\x02", b"\xff\xff\xff\x37" + b"\x00" * 200) + b"\x10\x01",  # long form, short length
    _num(-INF, b"\x02", b"\xff\xff\xff\xff") + b"\x10\x01",  # zero length
    _num(-INF, b"\x02", b"\xff\xff\xff\x36" + b"\x00" * 200) + b"\x10\x01",  # magnitude cut
    _num(-INF, b"\x02", b"\xff\xff\xff\x36\xff" + b"\x00" * 200) + b"\x10\x01",  # leading 0
    _num(-INF, b"\x02", b"\x7f\xff\xff\xff\x00") + b"\x10\x01",  # > 2**31 - 1 bytes
    _num(-INF, b"\x02", b"\x80\x00\x00\x00\x00") + b"\x10\x01",  # claims 2 GB
    _num(-INF, b"\xfe", b"\x00") + b"\x10\x02",       # float with magnitude
    _num(-INF, b"\xfe", b"\x00") + b"\x10\x03",       # bool with magnitude
    _num(-DBL_MAX, b"\xfe", b"\x00\x00\x00\xc9\x01" + b"\x00" * 200) + b"\x10\x01",  # long form on -DBL_MAX
    _num(2.0**53, b"\x02", b"\x01") + b"\x10\x02",        # float with remainder
    _num(2.0**53, b"\x02", b"\x01") + b"\x10\x03",        # bool with remainder
    _num(0.5) + b"\x10\x01",               # int that is not integral
    _num(INF) + b"\x10\x01",               # int that is infinite
    _num(2.0) + b"\x10\x03",               # bool that is 2
    b"\x50" * 33 + b"\x00" * 33 + b"\x10", # nested deeper than 32
])
def test_corrupt_rejected(bad):
    with pytest.raises(ValueError, match="corrupt key encoding"):
        _decode_item(bad)


# The decoder's fast path: a str key without NUL and an id a double holds
# (0x30 body 0x00 | 0x20 d 0x01 | sig).  Every check of the general path holds there.
@pytest.mark.parametrize("bad", [
    b"\x30abc\x00" + _num(float("nan")) + b"\x02",   # NaN id
    b"\x30abc\x00\x20" + b"\x7f" + b"\xff" * 7 + b"\x01\x02",  # the image of -0.0 (0.0 has its own)
    b"\x30abc\x00" + _num(2.0) + b"\x03",            # bool that is 2
    b"\x30abc\x00" + _num(0.5) + b"\x01",            # int that is not integral
    b"\x30abc\x00" + _num(1.0) + b"\x04",            # no such sig
    b"\x30abc\x00" + _num(1.0),                      # sig missing
    b"\x30\xff\xfe\x00" + _num(1.0) + b"\x01",      # not UTF-8
    b"\x30\xc0\x80\x00" + _num(1.0) + b"\x01",      # overlong UTF-8
])
def test_fast_path_corrupt_rejected(bad):
    with pytest.raises(ValueError, match="corrupt key encoding"):
        _decode_item(bad)


def test_fast_path_decodes_like_the_general_path():
    for k, i in [("abc", 5), ("", -7), ("x" * 300, 2.5), ("é\U0001f600", True), ("a", False),
                 ("\ud800", 2**53), ("a\x00b", 1), ("abc", 2**80), ("abc", (1,))]:
        e = _encode_item(k, i)
        got = _decode_item(e)
        assert got == (k, i) and type(got[1]) is type(i), (k, i, got)
        assert _decode_item(e + b"\x00" * 8) == got   # padding ignored


def test_corrupt_boundaries_accepted():
    assert _decode_item(b"\x50" * 32 + b"\x00" * 32 + b"\x10")[0] == nest(32, leaf=())[0]
    assert _decode_item(_num(DBL_MAX, b"\xc9", b"\xff" * 200) + b"\x10\x01") == (SHORT_HI, None)
    assert _decode_item(_num(DBL_MAX, b"\xfe", b"\x00\x00\x00\xc9\x01" + b"\x00" * 200)
                        + b"\x10\x01") == (SHORT_HI + 1, None)
    assert _decode_item(_num(-INF, b"\xfe", b"\xfe") + b"\x10\x01") == (-IMAX - 1, None)
    assert _decode_item(_num(-INF, b"\xfe", b"\x00") + b"\x10\x01") == (-IMAX - 255, None)
    assert _decode_item(_num(-INF, b"\x37", b"\x00" * 200) + b"\x10\x01") == (SHORT_LO, None)
    assert _decode_item(_num(-INF, b"\x02", b"\xff\xff\xff\x36\xfe" + b"\xff" * 200)
                        + b"\x10\x01") == (SHORT_LO - 1, None)
    # a remainder may follow -DBL_MAX (ints just above it)
    assert _decode_item(_num(-DBL_MAX, b"\x02", b"\x01") + b"\x10\x01") == (-IMAX + 1, None)
    assert _decode_item(_num(0.5) + b"\x10\x02") == (0.5, None)
    assert _decode_item(_num(1.0) + _num(0.0) + b"\x03\x03") == (True, False)


def test_large_buffers():
    s = "x\x00" * 5000
    e = _encode_item(s, (s, 2**1000 + 1, [b"\x00" * 700]))
    assert len(e) > 20000
    k, i = _decode_item(e)
    assert k == s and i == (s, 2**1000 + 1, (b"\x00" * 700,))


def test_many_numbers_sig_growth():
    k = tuple(range(-300, 300)) + tuple(x / 7 for x in range(300)) + (True,) * 300
    ident = [2**60 + 1] * 100
    e = _encode_item(k, ident)
    assert e.endswith(expected_sig(k, ident)) and len(expected_sig(k, ident)) == 1300
    dk, di = _decode_item(e)
    assert same(k, dk) and same(ident, di)


def test_ints_beyond_dbl_max():
    """Ints below -DBL_MAX sit between -inf and -DBL_MAX, ints above DBL_MAX
    between DBL_MAX and inf, in order, and round-trip exactly."""
    vals = [-INF, -(10**5000), SHORT_LO - 1, SHORT_LO, -(2**1100), -IMAX - 2,
            -IMAX - 1, -DBL_MAX, -IMAX + 1, 0, IMAX - 1, DBL_MAX, IMAX + 1,
            2**1100, SHORT_HI, SHORT_HI + 1, 10**5000, INF]
    encs = [_encode_key(v) for v in vals]
    assert encs[7] == _encode_key(-IMAX) and encs[11] == _encode_key(IMAX)
    assert all(a < b for a, b in zip(encs, encs[1:]))
    for v in vals:
        if isinstance(v, int):
            assert _decode_item(_encode_item(v, v)) == (v, v)
    for v in (SHORT_LO - 1, -(10**5000), SHORT_HI + 1, 10**5000):
        dk, di = _decode_item(_encode_item((v, "a"), [v]))
        assert dk == (v, "a") and di == (v,) and type(dk[0]) is int


def test_huge_int_bounds():
    """Bounds built from huge ints (enc(k), enc(k) + 0xFF, enc(k) + enc(id))
    place items exactly, also against the core's compare."""
    ks = [-INF, -(10**5000), SHORT_LO - 1, -IMAX - 1, -DBL_MAX, 0, DBL_MAX,
          IMAX + 1, SHORT_HI + 1, 10**5000, INF]
    items = [_encode_item(k, i) for k in ks for i in (None, 10**400, "z")]
    for k in ks:
        lo, hi = _encode_key(k), _encode_key(k) + b"\xff"
        for k2 in ks:
            for i2 in (None, 10**400, "z"):
                e = _encode_item(k2, i2)
                assert (e < lo) == (k2 < k) and (core_cmp(e, lo) < 0) == (k2 < k)
                assert (e < hi) == (k2 <= k) and (core_cmp(e, hi) < 0) == (k2 <= k)
    assert items == sorted(items)
