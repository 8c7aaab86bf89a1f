"""Bad input, table-driven, over every public method of both implementations.

Each case is a call that must raise a documented exception.  The test checks
the exception type, that the message is non-empty and mentions what was
wrong (a loose regex, case-insensitive), and that afterwards ``check()``
passes and the whole content of the aggregate -- every namespace, item, key
type and value -- is exactly what it was before the call.
"""

from __future__ import annotations

import base64
import json
import math
import re

import numpy as np
import pytest

from aggtree import Bound, DuplicateItemError, MissingItemError

NAN = math.nan
INF = math.inf


def nest(depth, leaf=1):
    v = leaf
    for _ in range(depth):
        v = (v,)
    return v


def nested_list(depth):
    v = 1
    for _ in range(depth):
        v = [v]
    return v


def recursive_list():
    r = [1]
    r.append(r)
    return r


def populate(agg):
    """Content that every failing call must leave exactly as it is."""
    agg.insert_many([1, 2, 2, 2, 3, 4], ["a", "a", "b", "c", "a", "b"], [1.0, 2.0, 4.0, 8.0, 16.0, 32.0])
    agg.insert(1.0, 7, -0.5, namespace="n")
    agg.insert(True, b"x", 0.25, namespace="n")
    agg.insert(("t", (None, b"b")), "\U0001f600", 1e300, namespace="n")
    agg.insert(-0.0, None, 3.0, namespace=("user", 1))
    agg.insert(10**30, 2.5, 1.0, namespace=("user", 1))
    agg.insert(5, 5, 5.0, namespace=1)
    agg.insert(9, "a", 2.0, namespace="n")
    return agg


# ---------------------------------------------------------------------------
# The matrix: (id, call, exception, message regex)
# ---------------------------------------------------------------------------

CASES = []


def case(name, call, exc, pattern):
    CASES.append(pytest.param(call, exc, pattern, id=name))


# -- keys and ids of the wrong type or shape ---------------------------------

BAD_KEYS = [
    ("dict", lambda: {}, TypeError, "dict"),
    ("set", lambda: {1}, TypeError, "set"),
    ("object", lambda: object(), TypeError, "object"),
    ("bytearray", lambda: bytearray(b"x"), TypeError, "bytearray"),
    ("complex", lambda: 1j, TypeError, "complex"),
    ("nan", lambda: NAN, ValueError, "nan"),
    ("nested-nan", lambda: (1, ("a", NAN)), ValueError, "nan"),
    ("list-nan", lambda: ["x", NAN], ValueError, "nan"),
    ("nested-dict", lambda: ("a", (1, {})), TypeError, "dict"),
    ("too-deep", lambda: nest(33), ValueError, "deep|depth|nest|level"),
    ("too-deep-list", lambda: nested_list(33), ValueError, "deep|depth|nest|level"),
    ("recursive-list", recursive_list, ValueError, "deep|depth|nest|level"),
]
# Keys that numpy turns into a 1-d array unharmed (for the array methods).
ARRAY_SAFE = {"dict", "set", "object", "complex", "nan"}

for kname, mk, exc, pat in BAD_KEYS:
    calls = {
        "insert-key": lambda a, mk=mk: a.insert(mk(), "z"),
        "insert-id": lambda a, mk=mk: a.insert(9, mk()),
        "upsert-key": lambda a, mk=mk: a.upsert(mk(), "a", 1.0),
        "upsert-id": lambda a, mk=mk: a.upsert(2, mk(), 1.0),
        "delete-key": lambda a, mk=mk: a.delete(mk(), "a"),
        "delete-id": lambda a, mk=mk: a.delete(2, mk()),
        "delete_if_exists": lambda a, mk=mk: a.delete_if_exists(mk(), "a"),
        "replace-key": lambda a, mk=mk: a.replace(mk(), "a", 3),
        "replace-new_key": lambda a, mk=mk: a.replace(2, "a", mk()),
        "replace-id": lambda a, mk=mk: a.replace(2, mk(), 3),
        "replace_or_insert-new_key": lambda a, mk=mk: a.replace_or_insert(2, "a", mk()),
        "replace_or_insert-key": lambda a, mk=mk: a.replace_or_insert(mk(), "a", 3),
        "insert_many-keys": lambda a, mk=mk: a.insert_many([9, mk()], ["x", "y"]),
        "insert_many-ids": lambda a, mk=mk: a.insert_many([9, 9], ["x", mk()]),
        "delete_many-keys": lambda a, mk=mk: a.delete_many([2, mk()], ["a", "b"]),
        "delete_many-ids": lambda a, mk=mk: a.delete_many([2, 2], ["a", mk()]),
        "from_arrays-keys": lambda a, mk=mk: type(a).from_arrays([9, mk()], ["x", "y"]),
        "from_arrays-ids": lambda a, mk=mk: type(a).from_arrays([9, 9], ["x", mk()]),
        "count-lower": lambda a, mk=mk: a.count(lower=mk()),
        "count-upper-Bound": lambda a, mk=mk: a.count(upper=Bound(mk())),
        "count-Bound-id": lambda a, mk=mk: a.count(lower=Bound(2, id=mk())),
        "count-eq": lambda a, mk=mk: a.count(eq=mk()),
        "count-prefix-element": lambda a, mk=mk: a.count(prefix=("t", mk())),
        "sum-eq": lambda a, mk=mk: a.sum(eq=mk()),
        "sum-upper": lambda a, mk=mk: a.sum(upper=mk()),
        "at-lower": lambda a, mk=mk: a.at(0, lower=mk()),
        "index_of-key": lambda a, mk=mk: a.index_of(mk()),
        "index_of-id": lambda a, mk=mk: a.index_of(2, id=mk()),
        "index_of-bound": lambda a, mk=mk: a.index_of(2, upper=mk()),
        "min-lower": lambda a, mk=mk: a.min(lower=mk()),
        "max-eq": lambda a, mk=mk: a.max(eq=mk()),
        "random-eq": lambda a, mk=mk: a.random(eq=mk()),
        "paginate-lower": lambda a, mk=mk: a.paginate(lower=mk()),
        "iter-eq": lambda a, mk=mk: a.iter(eq=mk()),
        "count_batch": lambda a, mk=mk: a.count_batch([{}, {"eq": mk()}]),
        "sum_batch": lambda a, mk=mk: a.sum_batch([{"lower": Bound(mk())}]),
        "at_batch": lambda a, mk=mk: a.at_batch([{"offset": 0, "upper": mk()}]),
        "at_many-bound": lambda a, mk=mk: a.at_many([0], eq=mk()),
        "to_arrays-bound": lambda a, mk=mk: a.to_arrays(lower=mk()),
        "index_of_many-bound": lambda a, mk=mk: a.index_of_many([1], lower=mk()),
        "count-missing-namespace": lambda a, mk=mk: a.count(eq=mk(), namespace="nope"),
    }
    if kname in ARRAY_SAFE:
        calls.update({
            "count_many-lowers": lambda a, mk=mk: a.count_many([1, mk()], [2, 3]),
            "sum_many-uppers": lambda a, mk=mk: a.sum_many([1, 1], [2, mk()]),
            "index_of_many-keys": lambda a, mk=mk: a.index_of_many([1, mk()]),
            "count_many-missing-namespace": lambda a, mk=mk: a.count_many([mk()], [3], namespace="nope"),
        })
    for cname, call in calls.items():
        case(f"key-{kname}-{cname}", call, exc, pat)


# -- values ------------------------------------------------------------------

BAD_VALUES = [
    ("str", "1.5", TypeError, "value|real|number|str"),
    ("None", None, TypeError, "value|real|number|None"),
    ("complex", 1j, TypeError, "value|real|number|complex"),
    ("object", object(), TypeError, "value|real|number|object"),
    ("list", [1.0], TypeError, "value|real|number|list"),
    ("nan", NAN, ValueError, "finite|nan"),
    ("inf", INF, ValueError, "finite|inf"),
    ("-inf", -INF, ValueError, "finite|inf"),
    ("huge-int", 10**400, ValueError, "large|finite|overflow|inf"),
]
for vname, v, exc, pat in BAD_VALUES:
    calls = {
        "insert": lambda a, v=v: a.insert(9, "z", v),
        "upsert-existing": lambda a, v=v: a.upsert(2, "a", v),
        "upsert-new": lambda a, v=v: a.upsert(9, "z", v),
        "replace": lambda a, v=v: a.replace(2, "a", 9, v),
        "replace-onto-itself": lambda a, v=v: a.replace(2, "a", 2, v),
        "replace_or_insert": lambda a, v=v: a.replace_or_insert(2, "a", 9, v),
        "replace_or_insert-absent": lambda a, v=v: a.replace_or_insert(9, "q", 9, v),
        "insert_many": lambda a, v=v: a.insert_many([9, 10], ["a", "b"], [1.0, v]),
        "from_arrays": lambda a, v=v: type(a).from_arrays([9, 10], ["a", "b"], [1.0, v]),
    }
    for cname, call in calls.items():
        case(f"value-{vname}-{cname}", call, exc, pat)


# -- namespaces ----------------------------------------------------------------

for nname, mk in [("list", lambda: []), ("dict", lambda: {}), ("set", lambda: set()),
                  ("tuple-with-list", lambda: ("a", []))]:
    calls = {
        "insert": lambda a, mk=mk: a.insert(9, "z", namespace=mk()),
        "upsert": lambda a, mk=mk: a.upsert(2, "a", 5.0, namespace=mk()),
        "delete": lambda a, mk=mk: a.delete(2, "a", namespace=mk()),
        "delete_if_exists": lambda a, mk=mk: a.delete_if_exists(2, "a", namespace=mk()),
        "replace-namespace": lambda a, mk=mk: a.replace(2, "a", 9, namespace=mk()),
        "replace-new_namespace": lambda a, mk=mk: a.replace(2, "a", 9, new_namespace=mk()),
        "replace-onto-itself-new_namespace": lambda a, mk=mk: a.replace(2, "a", 2, new_namespace=mk()),
        "replace_or_insert-new_namespace": lambda a, mk=mk: a.replace_or_insert(2, "a", 9, new_namespace=mk()),
        "clear": lambda a, mk=mk: a.clear(mk()),
        "insert_many": lambda a, mk=mk: a.insert_many([9], ["z"], namespace=mk()),
        "delete_many": lambda a, mk=mk: a.delete_many([2], ["a"], namespace=mk()),
        "from_arrays": lambda a, mk=mk: type(a).from_arrays([9, 9], ["x", "y"], namespaces=["n", mk()]),
        "count": lambda a, mk=mk: a.count(namespace=mk()),
        "sum": lambda a, mk=mk: a.sum(namespace=mk()),
        "at": lambda a, mk=mk: a.at(0, namespace=mk()),
        "index_of": lambda a, mk=mk: a.index_of(1, namespace=mk()),
        "min": lambda a, mk=mk: a.min(namespace=mk()),
        "max": lambda a, mk=mk: a.max(namespace=mk()),
        "random": lambda a, mk=mk: a.random(namespace=mk()),
        "paginate": lambda a, mk=mk: a.paginate(namespace=mk()),
        "iter": lambda a, mk=mk: a.iter(namespace=mk()),
        "count_batch": lambda a, mk=mk: a.count_batch([{"namespace": mk()}]),
        "sum_batch": lambda a, mk=mk: a.sum_batch([{"namespace": mk()}]),
        "at_batch": lambda a, mk=mk: a.at_batch([{"offset": 0, "namespace": mk()}]),
        "count_many": lambda a, mk=mk: a.count_many([1], [2], namespace=mk()),
        "sum_many": lambda a, mk=mk: a.sum_many([1], [2], namespace=mk()),
        "at_many": lambda a, mk=mk: a.at_many([0], namespace=mk()),
        "index_of_many": lambda a, mk=mk: a.index_of_many([1], namespace=mk()),
        "to_arrays": lambda a, mk=mk: a.to_arrays(namespace=mk()),
    }
    for cname, call in calls.items():
        case(f"namespace-{nname}-{cname}", call, TypeError, "hashable|namespace")


# -- malformed bounds ----------------------------------------------------------

READS = {
    "count": lambda a, **kw: a.count(**kw),
    "sum": lambda a, **kw: a.sum(**kw),
    "at": lambda a, **kw: a.at(0, **kw),
    "index_of": lambda a, **kw: a.index_of(2, **kw),
    "min": lambda a, **kw: a.min(**kw),
    "max": lambda a, **kw: a.max(**kw),
    "random": lambda a, **kw: a.random(**kw),
    "paginate": lambda a, **kw: a.paginate(**kw),
    "iter": lambda a, **kw: a.iter(**kw),
    "count_batch": lambda a, **kw: a.count_batch([kw]),
    "sum_batch": lambda a, **kw: a.sum_batch([kw]),
    "at_batch": lambda a, **kw: a.at_batch([dict(kw, offset=0)]),
    "at_many": lambda a, **kw: a.at_many([0], **kw),
    "index_of_many": lambda a, **kw: a.index_of_many([2], **kw),
    "to_arrays": lambda a, **kw: a.to_arrays(**kw),
}
MALFORMED = [
    ("eq+lower", lambda: {"eq": 2, "lower": 1}, ValueError, "exclusive|combin|together|only one|eq"),
    ("eq-None+upper", lambda: {"eq": None, "upper": 1}, ValueError, "exclusive|combin|together|only one|eq"),
    ("eq+prefix", lambda: {"eq": 2, "prefix": ()}, ValueError, "exclusive|combin|together|only one|eq"),
    ("prefix+lower", lambda: {"prefix": ("t",), "lower": Bound(1)}, ValueError,
     "exclusive|combin|together|only one|prefix"),
    ("prefix-str", lambda: {"prefix": "ab"}, TypeError, "prefix"),
    ("prefix-bytes", lambda: {"prefix": b"ab"}, TypeError, "prefix"),
    ("prefix-int", lambda: {"prefix": 5}, TypeError, "prefix"),
    ("prefix-set", lambda: {"prefix": {1}}, TypeError, "prefix"),
    ("prefix-Bound", lambda: {"prefix": Bound(1)}, TypeError, "prefix"),
    ("prefix-nan", lambda: {"prefix": (NAN,)}, ValueError, "nan"),
    ("prefix-too-deep", lambda: {"prefix": nest(33)}, ValueError, "deep|depth|nest|level"),
    ("Bound-inclusive-str", lambda: {"lower": Bound(1, inclusive="yes")}, TypeError, "inclusive"),
    ("Bound-inclusive-int", lambda: {"upper": Bound(1, inclusive=1)}, TypeError, "inclusive"),
    ("Bound-inclusive-None", lambda: {"upper": Bound(1, inclusive=None)}, TypeError, "inclusive"),
    ("Bound-key-nan", lambda: {"lower": Bound(NAN)}, ValueError, "nan"),
    ("Bound-id-dict", lambda: {"upper": Bound(2, id={})}, TypeError, "dict"),
    ("Bound-id-nan", lambda: {"upper": Bound(2, False, (NAN,))}, ValueError, "nan"),
]
for mname, mk, exc, pat in MALFORMED:
    for rname, read in READS.items():
        case(f"bounds-{mname}-{rname}", lambda a, read=read, mk=mk: read(a, **mk()), exc, pat)


# -- offsets, order, page sizes, cursors -----------------------------------------

for oname, off in [("float", 1.5), ("float-integral", 1.0), ("str", "1"), ("None", None),
                   ("list", [0]), ("np-float", np.float64(0.0))]:
    case(f"offset-{oname}-at", lambda a, off=off: a.at(off), TypeError, "offset|integer|index")
    case(f"offset-{oname}-at_batch", lambda a, off=off: a.at_batch([{"offset": off}]),
         TypeError, "offset|integer|index")
for oname, off in [("huge", 10**30), ("-huge", -(10**30)), ("len", 6), ("-len-1", -7),
                   ("2**64", 2**64), ("-2**63", -(2**63))]:
    case(f"offset-{oname}-at", lambda a, off=off: a.at(off), IndexError, "range|offset|index")
    case(f"offset-{oname}-at_batch", lambda a, off=off: a.at_batch([{"offset": 0}, {"offset": off}]),
         IndexError, "range|offset|index")
    case(f"offset-{oname}-at_many", lambda a, off=off: a.at_many([0, off]), IndexError, "range|offset|index")
case("offset-in-range-of-empty-range", lambda a: a.at(0, eq=99), IndexError, "range|offset|index")
case("offset-missing-namespace", lambda a: a.at(-1, namespace="nope"), IndexError, "range|offset|index")
case("at_many-float-offsets", lambda a: a.at_many(np.array([0.0, 1.0])), TypeError, "offset|integer|float")
case("at_many-float-list", lambda a: a.at_many([0, 1.5]), TypeError, "offset|integer|float")
case("at_many-str-offsets", lambda a: a.at_many(np.array(["0"])), TypeError, "offset|integer")

for ordname, order in [("sideways", "sideways"), ("ASC", "ASC"), ("None", None), ("int", 1),
                       ("bytes", b"asc")]:
    case(f"order-{ordname}-index_of", lambda a, o=order: a.index_of(2, order=o), ValueError, "order|asc")
    case(f"order-{ordname}-paginate", lambda a, o=order: a.paginate(order=o), ValueError, "order|asc")
    case(f"order-{ordname}-iter", lambda a, o=order: a.iter(order=o), ValueError, "order|asc")
    case(f"order-{ordname}-index_of_many", lambda a, o=order: a.index_of_many([2], order=o),
         ValueError, "order|asc")

for pname, size, exc in [("0", 0, ValueError), ("-1", -1, ValueError), ("-huge", -(10**30), ValueError),
                         ("float", 1.5, TypeError), ("float-integral", 2.0, TypeError),
                         ("str", "10", TypeError), ("None", None, TypeError), ("bool", True, TypeError)]:
    case(f"page_size-{pname}", lambda a, s=size: a.paginate(page_size=s), exc, "page_size")
    case(f"page_size-{pname}-missing-namespace",
         lambda a, s=size: a.paginate(page_size=s, namespace="nope"), exc, "page_size")


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii")


GARBAGE_CURSORS = [
    ("empty", ""),
    ("x", "x"),
    ("random-base64", b64(b"\x93\x17hello\x00world\xff")),
    ("base64-json", b64(json.dumps([["I", "1"], ["S", "a"]]).encode())),
    ("native-prefix-only", "agg1."),
    ("native-prefix-garbage", "agg1.!!!!"),
    ("native-prefix-base64-junk", "agg1." + b64(b"\xff\xfe\xfd")),
    ("oracle-prefix-only", "aggref1."),
    ("oracle-prefix-garbage", "aggref1.%%%"),
    ("oracle-prefix-not-json", "aggref1." + b64(b"{not json")),
    ("oracle-prefix-wrong-shape", "aggref1." + b64(b'{"k": 1}')),
    ("oracle-prefix-nan", "aggref1." + b64(b'[["F","nan"],["N"]]')),
    ("oracle-prefix-bad-tag", "aggref1." + b64(b'[["Q",1],["N"]]')),
    ("oracle-prefix-deep", "aggref1." + b64(b"[" * 5000 + b"]" * 5000)),
    ("unicode", "\U0001f600"),
    ("long", "A" * 100_000),
]
for cname, cur in GARBAGE_CURSORS:
    case(f"cursor-{cname}", lambda a, c=cur: a.paginate(cursor=c), ValueError, "cursor")
    case(f"cursor-{cname}-desc-missing-namespace",
         lambda a, c=cur: a.paginate(cursor=c, order="desc", namespace="nope"), ValueError, "cursor")
for cname, cur in [("bytes", b"agg1.AAAA"), ("int", 5), ("Item", ("a", 1)), ("list", ["x"])]:
    case(f"cursor-type-{cname}", lambda a, c=cur: a.paginate(cursor=c), TypeError, "cursor")


# -- batches, arrays ---------------------------------------------------------

case("count_batch-unknown-key", lambda a: a.count_batch([{"namespace": None, "bogus": 1}]),
     TypeError, "bogus|unknown")
case("count_batch-offset-is-unknown", lambda a: a.count_batch([{"offset": 0}]), TypeError, "offset|unknown")
case("sum_batch-unknown-key", lambda a: a.sum_batch([{}, {"lowr": 1}]), TypeError, "lowr|unknown")
case("at_batch-unknown-key", lambda a: a.at_batch([{"offset": 0, "order": "asc"}]), TypeError, "order|unknown")
case("at_batch-missing-offset", lambda a: a.at_batch([{"offset": 0}, {"eq": 2}]), TypeError, "offset")
case("count_batch-not-a-dict", lambda a: a.count_batch([{}, 5]), TypeError, "dict|query")
case("sum_batch-tuple-query", lambda a: a.sum_batch([("namespace", None)]), TypeError, "dict|query")
case("at_batch-not-a-list", lambda a: a.at_batch(5), TypeError, "")
case("count_batch-eq+lower", lambda a: a.count_batch([{"eq": 1, "lower": 1}]), ValueError,
     "exclusive|combin|together|only one|eq")

LENGTH = "length|entries|same|mismatch|equal"
case("insert_many-ids-short", lambda a: a.insert_many([9, 10], ["x"]), ValueError, LENGTH)
case("insert_many-values-long", lambda a: a.insert_many([9], ["x"], [1.0, 2.0]), ValueError, LENGTH)
case("insert_many-np-values-short", lambda a: a.insert_many(np.array([9, 10]), np.array([1, 2]), np.array([1.0])),
     ValueError, LENGTH)
case("delete_many-ids-long", lambda a: a.delete_many([2], ["a", "b"]), ValueError, LENGTH)
case("from_arrays-ids-short", lambda a: type(a).from_arrays([1, 2], [1]), ValueError, LENGTH)
case("from_arrays-values-short", lambda a: type(a).from_arrays([1, 2], [1, 2], [1.0]), ValueError, LENGTH)
case("from_arrays-namespaces-long", lambda a: type(a).from_arrays([1], [1], namespaces=["a", "b"]),
     ValueError, LENGTH)
case("count_many-length", lambda a: a.count_many([1, 2], [3]), ValueError, LENGTH)
case("sum_many-length", lambda a: a.sum_many(np.array([1]), np.array([2, 3])), ValueError, LENGTH)
case("insert_many-2d-keys", lambda a: a.insert_many(np.zeros((2, 2)), [9, 10]), ValueError, "1-d|dimension|shape")
case("at_many-2d-offsets", lambda a: a.at_many(np.zeros((1, 1), dtype=np.int64)), ValueError, "1-d|dimension|shape")
case("insert_many-str-keys-arg", lambda a: a.insert_many("ab", "cd"), TypeError, "str|sequence|array|iterable")
case("insert_many-int-keys-arg", lambda a: a.insert_many(5, 6), TypeError, "int|sequence|array|iterable")

DTYPE = "dtype|value|number|real|str|float|complex|datetime|unsupported|type"
case("insert_many-str-values", lambda a: a.insert_many([9], ["x"], np.array(["1.5"])), TypeError, DTYPE)
case("insert_many-complex-keys", lambda a: a.insert_many(np.array([1j]), [1]), TypeError, DTYPE)
case("insert_many-datetime-keys", lambda a: a.insert_many(np.array(["2020-01-01"], dtype="datetime64[D]"), [1]),
     TypeError, DTYPE)
case("insert_many-nan-values", lambda a: a.insert_many([9], ["x"], np.array([np.nan])), ValueError, "nan|finite")
case("insert_many-nan-keys", lambda a: a.insert_many(np.array([9.0, np.nan]), [1, 2]), ValueError, "nan")
case("from_arrays-complex-values", lambda a: type(a).from_arrays([1], [1], np.array([1j])), TypeError, DTYPE)
case("from_arrays-nan-keys", lambda a: type(a).from_arrays(np.array([np.nan]), np.array([1])), ValueError, "nan")
case("from_arrays-inf-values", lambda a: type(a).from_arrays([1], [1], [np.inf]), ValueError, "finite|inf")
case("count_many-complex", lambda a: a.count_many(np.array([1j]), np.array([2j])), TypeError, DTYPE)
case("sum_many-nan", lambda a: a.sum_many(np.array([np.nan]), np.array([2.0])), ValueError, "nan")
case("index_of_many-complex", lambda a: a.index_of_many(np.array([1j])), TypeError, DTYPE)
case("index_of_many-nan", lambda a: a.index_of_many(np.array([1.0, np.nan])), ValueError, "nan")
case("count_many-inclusive-str", lambda a: a.count_many([1], [2], lower_inclusive="yes"), TypeError, "inclusive")
case("sum_many-inclusive-None", lambda a: a.sum_many([1], [2], upper_inclusive=None), TypeError, "inclusive")

# -- duplicates and missing items ------------------------------------------------

DUP, MISS = DuplicateItemError, MissingItemError
case("insert-duplicate", lambda a: a.insert(2, "b", 9.0), DUP, "2")
case("insert-duplicate-equal-key", lambda a: a.insert(2.0, "b"), DUP, "2")
case("insert-duplicate-other-namespace", lambda a: a.insert(True, 7, namespace="n"), DUP, "7")
case("delete-missing", lambda a: a.delete(2, "z"), MISS, "z")
case("delete-missing-namespace", lambda a: a.delete(2, "a", namespace="nope"), MISS, "nope|2")
case("replace-missing", lambda a: a.replace(2, "z", 3), MISS, "z")
case("replace-missing-namespace", lambda a: a.replace(2, "a", 3, namespace="nope"), MISS, "nope|2")
case("replace-onto-existing", lambda a: a.replace(2, "a", 3), DUP, "3")
case("replace-onto-existing-other-namespace",
     lambda a: a.replace(2, "a", 9.0, namespace=None, new_namespace="n"), DUP, "9")
case("insert_many-duplicate-in-batch", lambda a: a.insert_many([9, 8, 9.0], ["x", "y", "x"]), DUP, "9")
case("insert_many-duplicate-existing", lambda a: a.insert_many([9, 2], ["x", "c"]), DUP, "2")
case("insert_many-duplicate-in-batch-np",
     lambda a: a.insert_many(np.array([7.5, 6.5, 7.5]), np.array([4, 5, 4]), namespace=1), DUP,
     "in the batch")
case("insert_many-duplicate-existing-np",
     lambda a: a.insert_many(np.array([5.0, 5.0]), np.array([4, 5]), namespace=1), DUP, "5")
case("delete_many-missing", lambda a: a.delete_many([2, 2], ["a", "z"]), MISS, "z")
case("delete_many-twice-in-batch", lambda a: a.delete_many([2, 3, 2.0], ["a", "a", "a"]), MISS, "2")
case("delete_many-missing-namespace", lambda a: a.delete_many([2], ["a"], namespace="nope"), MISS, "2|nope")
case("from_arrays-duplicate", lambda a: type(a).from_arrays([1, 2, 1.0], [1, 1, 1]), DUP, "1")
case("from_arrays-duplicate-in-namespace",
     lambda a: type(a).from_arrays([1, 1, 1], [1, 1, 1], namespaces=["a", "b", "a"]), DUP, "1")

# -- construction ------------------------------------------------------------------

for sname, size, exc in [("3", 3, ValueError), ("0", 0, ValueError), ("-4", -4, ValueError),
                         ("4097", 4097, ValueError), ("huge", 10**30, ValueError),
                         ("float", 64.0, TypeError), ("str", "64", TypeError),
                         ("None", None, TypeError), ("bool", True, TypeError)]:
    case(f"node_size-{sname}", lambda a, s=size: type(a)(node_size=s), exc, "node_size")
    case(f"node_size-{sname}-from_arrays", lambda a, s=size: type(a).from_arrays([1], [1], node_size=s),
         exc, "node_size")


# ---------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------


@pytest.fixture
def populated(make):
    return populate(make())


@pytest.fixture
def snapshot(take_snapshot):
    return take_snapshot


@pytest.mark.parametrize("call,exc,pattern", CASES)
def test_bad_input(populated, call, exc, pattern, snapshot):
    agg = populated
    before = snapshot(agg)
    with pytest.raises(exc) as info:
        call(agg)
    message = str(info.value)
    assert message.strip("'\" "), f"empty message for {exc.__name__}"
    assert re.search(pattern, message, re.IGNORECASE), f"unhelpful message: {message!r}"
    agg.check()
    assert snapshot(agg) == before


def test_failing_calls_in_a_row_change_nothing(populated, snapshot):
    """Many failures back to back, then the aggregate still works normally."""
    agg = populated
    before = snapshot(agg)
    for call, _, _ in (p.values for p in CASES[::7]):
        try:
            call(agg)
        except Exception:  # noqa: BLE001 - the types are checked one by one above
            pass
    agg.check()
    assert snapshot(agg) == before
    agg.insert(100, "ok", 1.0)
    assert agg.count(lower=100) == 1
    agg.delete(100, "ok")
    assert snapshot(agg) == before


# A cursor from the other implementation is malformed here.  The ids say
# "native" on both sides so that `-k reference` does not pick them up while
# the extension is missing.
@pytest.mark.parametrize("source,target", [("native", "reference"), ("reference", "native")],
                         ids=["from-native", "to-native"])
def test_foreign_cursor(source, target, load_impl, snapshot):
    src = populate(load_impl(source)())
    dst = populate(load_impl(target)())
    cursor = src.paginate(page_size=2).cursor
    assert isinstance(cursor, str)
    before = snapshot(dst)
    for order in ("asc", "desc"):
        with pytest.raises(ValueError, match="(?i)cursor"):
            dst.paginate(cursor=cursor, order=order)
    dst.check()
    assert snapshot(dst) == before


def test_own_cursor_is_accepted_and_tampering_is_caught_or_harmless(make, snapshot):
    agg = populate(make())
    before = snapshot(agg)
    page = agg.paginate(page_size=2)
    assert agg.paginate(cursor=page.cursor).items[0] == (2, "b", 4.0)
    # Truncations either raise ValueError or name some other position; they
    # never crash or change anything.
    for cut in range(1, min(len(page.cursor), 40)):
        try:
            agg.paginate(cursor=page.cursor[:-cut])
        except ValueError as e:
            assert "cursor" in str(e).lower()
    agg.check()
    assert snapshot(agg) == before


class Boom(Exception):
    pass


class RaisingRng:
    def randrange(self, n):
        raise Boom("rng failed")


def test_rng_error_propagates_and_changes_nothing(populated, snapshot):
    before = snapshot(populated)
    with pytest.raises(Boom):
        populated.random(rng=RaisingRng())
    populated.check()
    assert snapshot(populated) == before


class EvilNamespace:
    """Hashable, but its __eq__ raises: dict lookups propagate the error."""

    def __hash__(self):
        return hash("n")

    def __eq__(self, other):
        raise Boom("namespace comparison failed")


def test_namespace_whose_eq_raises(populated, snapshot):
    before = snapshot(populated)
    for call in (
        lambda a: a.insert(1, 1, namespace=EvilNamespace()),
        lambda a: a.count(namespace=EvilNamespace()),
        lambda a: a.replace(2, "a", 3.5, new_namespace=EvilNamespace()),
        lambda a: a.replace_or_insert(2, "a", 3.5, new_namespace=EvilNamespace()),
    ):
        with pytest.raises(Boom):
            call(populated)
        populated.check()
        assert snapshot(populated) == before
