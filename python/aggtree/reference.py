"""The pure-Python reference implementation of :class:`aggtree.Aggregate`.

This module is the *oracle*: it implements the whole contract of
``docs/API.md`` in the most obviously correct way we could write, so that the
native implementation (the C counted B+tree behind ``aggtree._core``) can be
tested against it operation by operation, and so that the benchmarks have a
plain baseline.  It is also what ``aggtree.Aggregate`` is when the environment
variable ``AGGTREE_PURE=1`` is set.

It is deliberately not fast.  Each namespace is two parallel Python lists
kept in ``(key, id)`` order -- the sort keys and the :class:`Item` s -- and
every read is one or two :mod:`bisect` calls plus a slice:

* positions (``count``, ``at``, ``index_of``, ``min``, ``max``, ``random``,
  pagination) are O(log n) bisects;
* ``sum`` is ``math.fsum`` over the slice, O(k) for k items in the range, and
  correctly rounded (the native tree must agree to within a few ulps);
* writes are O(n) list insertions and deletions.

The key order (None < numbers < str < bytes < tuple; numbers by exact value,
so ``1 == 1.0 == True`` are one key; str by code point; tuples elementwise,
shorter prefix first) is produced by :func:`sort_key`, which maps a key to
nested tuples ``(type_rank, payload)`` that Python's own comparison orders
correctly.  Python already compares ``int`` with ``float`` exactly and ``str``
by code point, so the mapping only has to separate the type families.

Every method validates *all* of its arguments before it looks at or changes
anything, so a call that raises leaves the aggregate exactly as it was.

>>> agg = Aggregate()
>>> agg.insert(3, "c", 1.5)
>>> agg.insert(1, "a", 2.0)
>>> agg.count(), agg.sum(), agg.at(0)
(2, 3.5, Item(key=1, id='a', value=2.0))
"""

from __future__ import annotations

import base64
import binascii
import bisect
import itertools
import json
import math
import operator
import pickle
import random as _random_module
import re
import sys
from collections.abc import Iterator
from typing import Any, SupportsIndex

import numpy as np

from ._types import Bound, DuplicateItemError, Item, MissingItemError, Page

__all__ = ["MAX_KEY_DEPTH", "Aggregate", "sort_key"]

#: Deepest tuple nesting a key may have: a tuple of scalars has depth 1.
MAX_KEY_DEPTH = 32
NODE_SIZE_MIN = 4
NODE_SIZE_MAX = 4096

# Type ranks of the key order.
_NONE, _NUMBER, _STR, _BYTES, _TUPLE = 0, 1, 2, 3, 4


class _Unset:
    """Marker for "argument not given" where ``None`` is a meaningful value."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<unset>"

    def __reduce__(self):
        return (_Unset, ())


_UNSET: Any = _Unset()


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def _short(v: Any, limit: int = 120) -> str:
    """``repr(v)`` for error messages: truncated, and safe for huge ints
    (``repr`` of an int with more than 4300 digits raises)."""
    try:
        r = repr(v)
    except Exception:  # noqa: BLE001 - only for a message
        if isinstance(v, int):
            return f"<int of {v.bit_length()} bits>"
        return f"<{type(v).__name__} object>"
    if len(r) > limit:
        r = r[: limit - 3] + "..."
    return r


def _convert(v: Any, depth: int, what: str):
    """Validate and normalise one key (or id) and compute its sort key.

    Returns ``(stored, sk)``: ``stored`` is what the aggregate keeps and reads
    back (lists become tuples, subclasses of int / float / str / bytes become
    the base type, bool stays bool, -0.0 becomes 0.0), ``sk`` is the sort key.  ``depth`` is
    the number of tuples enclosing ``v``.  Raises TypeError for an
    unsupported type, ValueError for NaN or nesting deeper than
    MAX_KEY_DEPTH.
    """
    if v is None:
        return None, (_NONE,)
    t = type(v)
    if t is bool:
        return v, (_NUMBER, v)
    if t is int:
        return v, (_NUMBER, v)
    if t is float:
        if v != v:
            raise ValueError(f"{what} must not be NaN (NaN has no place in the key order)")
        v += 0.0  # -0.0 is the key 0.0 and reads back as 0.0
        return v, (_NUMBER, v)
    if t is str:
        return v, (_STR, v)
    if t is bytes:
        return v, (_BYTES, v)
    if t is tuple or t is list or isinstance(v, (tuple, list)):
        if depth >= MAX_KEY_DEPTH:
            raise ValueError(
                f"{what} is nested too deeply: at most {MAX_KEY_DEPTH} levels of tuples/lists"
            )
        stored = []
        sks = []
        for e in v:
            s, k = _convert(e, depth + 1, what)
            stored.append(s)
            sks.append(k)
        return tuple(stored), (_TUPLE, tuple(sks))
    # Subclasses of the supported scalar types are stored as the base type.
    if isinstance(v, int):
        return _convert(int(v), depth, what)
    if isinstance(v, float):
        return _convert(float(v), depth, what)
    if isinstance(v, str):
        return _convert(str(v), depth, what)
    if isinstance(v, bytes):
        return _convert(bytes(v), depth, what)
    raise TypeError(
        f"{what} of type {t.__name__} is not supported: a key or id must be None, bool, "
        f"int, float, str, bytes, or a tuple/list of those"
    )


def sort_key(v: Any):
    """Map a key (or id) to a value whose Python ordering is the key order.

    The result is a nested tuple ``(type_rank, payload)``: None ->
    ``(0,)``, numbers -> ``(1, v)``, str -> ``(2, v)``, bytes -> ``(3, v)``,
    tuples and lists -> ``(4, tuple_of_element_sort_keys)``.  Equal keys
    (``1``, ``1.0``, ``True``; ``0.0`` and ``-0.0``; a list and the equal
    tuple) get equal sort keys.  Raises TypeError for an unsupported type and
    ValueError for NaN (at any depth) or nesting deeper than 32.  O(size of
    the key).

    >>> sort_key(1) == sort_key(1.0) == sort_key(True)
    True
    >>> sorted([b"x", "y", (1,), None, 2.5], key=sort_key)
    [None, 2.5, 'y', b'x', (1,)]
    """
    return _convert(v, 0, "key")[1]


def _key(v: Any, what: str = "key"):
    return _convert(v, 0, what)


# ---------------------------------------------------------------------------
# Other argument checks
# ---------------------------------------------------------------------------


def _check_namespace(ns: Any, what: str = "namespace") -> None:
    try:
        hash(ns)
    except TypeError:
        raise TypeError(
            f"{what} must be hashable (it is a dict key), not {type(ns).__name__}"
        ) from None


def _value(v: Any, what: str = "value") -> float:
    """A finite float from a real number; TypeError / ValueError otherwise."""
    if isinstance(v, (str, bytes, bytearray)) or v is None:
        raise TypeError(f"{what} must be a real number, not {type(v).__name__}")
    try:
        f = float(v)
    except TypeError:
        raise TypeError(f"{what} must be a real number, not {type(v).__name__}") from None
    except OverflowError:
        raise ValueError(f"{what} {_short(v)} is too large for a float") from None
    except ValueError:
        raise TypeError(f"{what} must be a real number, not {type(v).__name__}") from None
    if not math.isfinite(f):
        raise ValueError(f"{what} must be finite, not {f!r} (NaN and +-inf cannot be summed)")
    return f


def _integer(v: Any, what: str) -> int:
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(v).__name__}") from None


def _ascending(order: Any) -> bool:
    if isinstance(order, str):
        if order == "asc":
            return True
        if order == "desc":
            return False
    raise ValueError(f'order must be "asc" or "desc", not {_short(order)}')


def _exact_int(v: Any, what: str) -> int:
    """An int that is not a bool (sizes are ints, not truth values)."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    return int(v)


def _node_size(node_size: Any) -> int:
    n = _exact_int(node_size, "node_size")
    if not NODE_SIZE_MIN <= n <= NODE_SIZE_MAX:
        raise ValueError(
            f"node_size must be in [{NODE_SIZE_MIN}, {NODE_SIZE_MAX}], not {_short(n)}"
        )
    return n


def _as_list(x: Any, what: str) -> list:
    """A batch argument (sequence or 1-d numpy array) as a list of Python objects."""
    if isinstance(x, np.ndarray):
        if x.ndim != 1:
            raise ValueError(f"{what} must be a 1-dimensional array, not {x.ndim}-dimensional")
        return x.tolist()
    if isinstance(x, (str, bytes, bytearray, dict, set, frozenset)) or x is None:
        raise TypeError(f"{what} must be a sequence or a 1-d array, not {type(x).__name__}")
    try:
        return list(x)
    except TypeError:
        raise TypeError(
            f"{what} must be a sequence or a 1-d array, not {type(x).__name__}"
        ) from None


def _same_length(**seqs: list) -> int:
    lengths = {name: len(s) for name, s in seqs.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{name} has {n}" for name, n in lengths.items())
        raise ValueError(f"the arrays must have the same length: {detail}")
    return next(iter(lengths.values()))


def _object_array(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        out[i] = v
    return out


# ---------------------------------------------------------------------------
# Bounds
# ---------------------------------------------------------------------------
#
# A parsed range ("spec") is one of
#   None                      everything
#   ("range", lo, hi)         lo / hi: None or (key_sk, inclusive, id_sk or None)
#   ("eq", key_sk)
#   ("prefix", prefix_sk, m)  prefix_sk: tuple of element sort keys, m = len
# and resolves against one namespace's sorted list of (key_sk, id_sk) pairs
# to a half-open index interval [lo, hi) with lo <= hi.


def _pair_key(p):
    return p[0]


def _parse_bound(b: Any, what: str):
    if b is None:
        return None
    if isinstance(b, Bound):
        if type(b.inclusive) is not bool:
            raise TypeError(f"{what}.inclusive must be a bool")
        ksk = _key(b.key, f"{what} key")[1]
        isk = None if b.id is None else _key(b.id, f"{what} id")[1]
        return (ksk, b.inclusive, isk)
    return (_key(b, what)[1], True, None)


def _parse_bounds(lower: Any, upper: Any, eq: Any, prefix: Any):
    forms = [
        name
        for name, given in (
            ("lower=/upper=", lower is not None or upper is not None),
            ("eq=", eq is not _UNSET),
            ("prefix=", prefix is not None),
        )
        if given
    ]
    if len(forms) > 1:
        raise ValueError(
            f"{' and '.join(forms)} cannot be combined: eq=, prefix= and lower=/upper= "
            f"are mutually exclusive"
        )
    if eq is not _UNSET:
        return ("eq", _key(eq, "eq")[1])
    if prefix is not None:
        if not isinstance(prefix, (tuple, list)):
            raise TypeError(f"prefix must be a tuple or list, not {type(prefix).__name__}")
        psk = _key(prefix, "prefix")[1][1]
        if not psk:
            return None
        return ("prefix", psk, len(psk))
    if lower is None and upper is None:
        return None
    return ("range", _parse_bound(lower, "lower"), _parse_bound(upper, "upper"))


def _lower_index(sks: list, b) -> int:
    if b is None:
        return 0
    ksk, inclusive, isk = b
    find = bisect.bisect_left if inclusive else bisect.bisect_right
    if isk is None:
        return find(sks, ksk, key=_pair_key)
    return find(sks, (ksk, isk))


def _upper_index(sks: list, b) -> int:
    if b is None:
        return len(sks)
    ksk, inclusive, isk = b
    find = bisect.bisect_right if inclusive else bisect.bisect_left
    if isk is None:
        return find(sks, ksk, key=_pair_key)
    return find(sks, (ksk, isk))


def _resolve(sks: list, spec) -> tuple[int, int]:
    """The half-open index interval [lo, hi) of ``spec`` in ``sks``; lo <= hi."""
    if spec is None:
        return 0, len(sks)
    kind = spec[0]
    if kind == "range":
        lo = _lower_index(sks, spec[1])
        hi = _upper_index(sks, spec[2])
    elif kind == "eq":
        lo = bisect.bisect_left(sks, spec[1], key=_pair_key)
        hi = bisect.bisect_right(sks, spec[1], key=_pair_key)
    else:
        _, psk, m = spec

        # Monotone in the item order: tuple keys cut to the prefix length,
        # every other key just its type rank (which sorts before tuples).
        def head(p):
            ksk = p[0]
            return (_TUPLE, ksk[1][:m]) if ksk[0] == _TUPLE else (ksk[0],)

        target = (_TUPLE, psk)
        lo = bisect.bisect_left(sks, target, key=head)
        hi = bisect.bisect_right(sks, target, key=head)
    return lo, max(lo, hi)


_QUERY_KEYS = frozenset(("namespace", "lower", "upper", "eq", "prefix"))
_AT_QUERY_KEYS = _QUERY_KEYS | {"offset"}


def _parse_query(q: Any, allowed: frozenset, i: int):
    if not isinstance(q, dict):
        raise TypeError(f"query {i} must be a dict of keyword arguments, not {type(q).__name__}")
    unknown = [k for k in q if k not in allowed]
    if unknown:
        raise TypeError(
            f"query {i} has unknown key(s) {', '.join(_short(k) for k in unknown)}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    ns = q.get("namespace")
    _check_namespace(ns, f"query {i} namespace")
    spec = _parse_bounds(q.get("lower"), q.get("upper"), q.get("eq", _UNSET), q.get("prefix"))
    return ns, spec


# ---------------------------------------------------------------------------
# Cursors
# ---------------------------------------------------------------------------
#
# A cursor is "aggref1." followed by urlsafe base64 (unpadded) of compact
# JSON [key, id] in a tagged encoding:
#   None -> ["N"]   bool -> ["B", true]   int -> ["I", "<hex>"]
#   float -> ["F", float.hex(x)]   str -> ["S", s]   bytes -> ["Y", "<b64>"]
#   tuple -> ["T", [elements...]]
# Decoding parses strictly, rebuilds the key, re-encodes it and requires the
# same text, so only canonical cursors that this module wrote are accepted.
# Nothing is ever unpickled or evaluated.

_CURSOR_PREFIX = "aggref1."
_HEX_INT = re.compile(r"-?[0-9a-f]+\Z")


def _enc(v: Any):
    if v is None:
        return ["N"]
    if type(v) is bool:
        return ["B", v]
    if isinstance(v, int):
        return ["I", format(v, "x")]
    if isinstance(v, float):
        return ["F", v.hex()]
    if isinstance(v, str):
        return ["S", v]
    if isinstance(v, bytes):
        return ["Y", base64.b64encode(v).decode("ascii")]
    return ["T", [_enc(e) for e in v]]


def _dec(x: Any, depth: int = 0):
    if not isinstance(x, list) or not x or not isinstance(x[0], str):
        raise ValueError("bad node")
    tag = x[0]
    if tag == "N" and len(x) == 1:
        return None
    if len(x) != 2:
        raise ValueError("bad node")
    p = x[1]
    if tag == "B" and isinstance(p, bool):
        return p
    if tag == "I" and isinstance(p, str) and _HEX_INT.match(p):
        return int(p, 16)
    if tag == "F" and isinstance(p, str):
        return float.fromhex(p)
    if tag == "S" and isinstance(p, str):
        return p
    if tag == "Y" and isinstance(p, str):
        return base64.b64decode(p.encode("ascii"), validate=True)
    if tag == "T" and isinstance(p, list) and depth < MAX_KEY_DEPTH:
        return tuple(_dec(e, depth + 1) for e in p)
    raise ValueError("bad node")


def _cursor_text(key: Any, id: Any) -> str:
    payload = json.dumps([_enc(key), _enc(id)], separators=(",", ":"), ensure_ascii=True)
    b64 = base64.urlsafe_b64encode(payload.encode("ascii")).decode("ascii").rstrip("=")
    return _CURSOR_PREFIX + b64


def _parse_cursor(cursor: Any):
    """The (key_sk, id_sk) pair a cursor names; TypeError / ValueError if bad."""
    if not isinstance(cursor, str):
        raise TypeError(f"cursor must be a str or None, not {type(cursor).__name__}")
    bad = ValueError(
        f"malformed cursor {_short(cursor, 60)}: pass back the cursor of a Page "
        f"returned by this implementation's paginate()"
    )
    if not cursor.startswith(_CURSOR_PREFIX) or len(cursor) > 1_000_000:
        raise bad
    try:
        b64 = cursor[len(_CURSOR_PREFIX) :]
        raw = base64.urlsafe_b64decode((b64 + "=" * (-len(b64) % 4)).encode("ascii"))
        doc = json.loads(raw.decode("ascii"), parse_constant=_reject_constant)
        if not isinstance(doc, list) or len(doc) != 2:
            raise ValueError("not a pair")
        key, ksk = _key(_dec(doc[0]), "cursor key")
        id_, isk = _key(_dec(doc[1]), "cursor id")
        if _cursor_text(key, id_) != cursor:
            raise ValueError("not canonical")
    except (ValueError, TypeError, RecursionError, UnicodeError, binascii.Error, OverflowError):
        raise bad from None
    return (ksk, isk)


def _reject_constant(name: str):
    raise ValueError(f"JSON constant {name} not allowed")


# ---------------------------------------------------------------------------
# The aggregate
# ---------------------------------------------------------------------------


class _Tree:
    """One namespace: sort keys and items, parallel lists in (key, id) order."""

    __slots__ = ("items", "sks")

    def __init__(self) -> None:
        self.sks: list = []
        self.items: list = []


class Aggregate:
    """Items ``(key, id, value)`` in ``(key, id)`` order, partitioned into
    namespaces, with count / sum / rank / select over key ranges.

    The pure-Python twin of the native ``aggtree._core.Aggregate``; see the
    module docstring and ``docs/API.md``.  ``node_size`` is validated like the
    native one (an int in [4, 4096]) and otherwise ignored.

    Every read takes ``namespace=`` and one of three range forms:
    ``lower=`` / ``upper=`` (a :class:`Bound` or a bare key, meaning an
    inclusive bound; ``None`` is unbounded), ``eq=key`` or
    ``prefix=tuple``.

    >>> agg = Aggregate()
    >>> agg.insert_many([1, 2, 2, 3], ["a", "b", "c", "d"], [1.0, 2.0, 3.0, 4.0])
    >>> agg.count(lower=Bound(2, inclusive=False)), agg.sum(eq=2)
    (1, 5.0)
    """

    def __init__(self, node_size: int = 64) -> None:
        self._node_size = _node_size(node_size)
        self._trees: dict = {}
        self._len = 0

    # -- construction -----------------------------------------------------

    @classmethod
    def from_arrays(cls, keys, ids, values=None, namespaces=None, node_size=64) -> Aggregate:
        """Build an aggregate from parallel arrays (any sequences or 1-d numpy
        arrays) of keys, ids, values (default all 0.0) and namespaces (default
        all None).  Raises ValueError for different lengths, NaN or bad
        values, DuplicateItemError for a repeated ``(key, id)`` within a
        namespace; nothing is half-built.  O(n log n).
        """
        size = _node_size(node_size)
        keys = _as_list(keys, "keys")
        ids = _as_list(ids, "ids")
        lengths = {"keys": keys, "ids": ids}
        if values is not None:
            values = _as_list(values, "values")
            lengths["values"] = values
        if namespaces is not None:
            namespaces = _as_list(namespaces, "namespaces")
            lengths["namespaces"] = namespaces
        n = _same_length(**lengths)
        groups: dict = {}
        for j in range(n):
            k, ksk = _key(keys[j], f"keys[{j}]")
            i, isk = _key(ids[j], f"ids[{j}]")
            v = 0.0 if values is None else _value(values[j], f"values[{j}]")
            ns = None if namespaces is None else namespaces[j]
            _check_namespace(ns, f"namespaces[{j}]")
            groups.setdefault(ns, []).append(((ksk, isk), Item(k, i, v)))
        for ns, entries in groups.items():
            entries.sort(key=_pair_key)
            for a, b in itertools.pairwise(entries):
                if a[0] == b[0]:
                    raise DuplicateItemError(
                        f"item (key={_short(b[1].key)}, id={_short(b[1].id)}) occurs twice "
                        f"in namespace {_short(ns)}"
                    )
        agg = cls(size)
        for ns, entries in groups.items():
            tree = _Tree()
            tree.sks = [e[0] for e in entries]
            tree.items = [e[1] for e in entries]
            agg._trees[ns] = tree
            agg._len += len(entries)
        return agg

    @property
    def node_size(self) -> int:
        """The node size given at construction (unused by this implementation)."""
        return self._node_size

    # -- internal helpers -------------------------------------------------

    def _find(self, tree: _Tree | None, pair) -> int:
        """Index of ``pair`` in ``tree`` or -1."""
        if tree is None:
            return -1
        pos = bisect.bisect_left(tree.sks, pair)
        if pos < len(tree.sks) and tree.sks[pos] == pair:
            return pos
        return -1

    def _add(self, ns: Any, pair, item: Item) -> None:
        tree = self._trees.get(ns)
        if tree is None:
            tree = self._trees[ns] = _Tree()
        pos = bisect.bisect_left(tree.sks, pair)
        tree.sks.insert(pos, pair)
        tree.items.insert(pos, item)
        self._len += 1

    def _remove(self, ns: Any, pos: int) -> Item:
        tree = self._trees[ns]
        del tree.sks[pos]
        item = tree.items.pop(pos)
        self._len -= 1
        if not tree.items:
            del self._trees[ns]
        return item

    def _range(self, ns: Any, spec):
        """(tree, lo, hi) for a validated namespace and spec; tree may be None."""
        tree = self._trees.get(ns)
        if tree is None:
            return None, 0, 0
        lo, hi = _resolve(tree.sks, spec)
        return tree, lo, hi

    @staticmethod
    def _dup(key: Any, id: Any, ns: Any) -> DuplicateItemError:
        return DuplicateItemError(
            f"item (key={_short(key)}, id={_short(id)}) already exists in namespace {_short(ns)}"
        )

    @staticmethod
    def _missing(key: Any, id: Any, ns: Any) -> MissingItemError:
        return MissingItemError(
            f"no item (key={_short(key)}, id={_short(id)}) in namespace {_short(ns)}"
        )

    # -- writes -----------------------------------------------------------

    def insert(self, key, id, value=0.0, *, namespace=None) -> None:
        """Insert the item ``(key, id, value)``.  DuplicateItemError if
        ``(key, id)`` already exists in the namespace.  O(n) (list insert)."""
        k, ksk = _key(key)
        i, isk = _key(id, "id")
        v = _value(value)
        _check_namespace(namespace)
        pair = (ksk, isk)
        if self._find(self._trees.get(namespace), pair) >= 0:
            raise self._dup(key, id, namespace)
        self._add(namespace, pair, Item(k, i, v))

    def delete(self, key, id, *, namespace=None) -> None:
        """Delete the item ``(key, id)``.  MissingItemError if absent.  O(n)."""
        ksk = _key(key)[1]
        isk = _key(id, "id")[1]
        _check_namespace(namespace)
        pos = self._find(self._trees.get(namespace), (ksk, isk))
        if pos < 0:
            raise self._missing(key, id, namespace)
        self._remove(namespace, pos)

    def _move(self, key, id, new_key, value, namespace, new_namespace, or_insert: bool) -> bool:
        ksk = _key(key)[1]
        i, isk = _key(id, "id")
        nk, nksk = _key(new_key, "new_key")
        v = _value(value)
        _check_namespace(namespace)
        if new_namespace is _UNSET:
            new_namespace = namespace
        else:
            _check_namespace(new_namespace, "new_namespace")
        old_pair, new_pair = (ksk, isk), (nksk, isk)
        old_pos = self._find(self._trees.get(namespace), old_pair)
        if old_pos < 0 and not or_insert:
            raise self._missing(key, id, namespace)
        same_ns = new_namespace in {namespace: None}
        if old_pos >= 0 and same_ns and old_pair == new_pair:
            # Onto itself: only the value changes (the stored key keeps its type).
            tree = self._trees[namespace]
            tree.items[old_pos] = tree.items[old_pos]._replace(value=v)
            return True
        target = self._trees.get(new_namespace)
        new_pos = self._find(target, new_pair)
        if new_pos >= 0 and not or_insert:
            raise self._dup(new_key, id, new_namespace)
        # All checks done: mutate.
        if old_pos >= 0:
            self._remove(namespace, old_pos)
        if new_pos >= 0:
            # replace_or_insert onto another existing item: upsert overwrites it.
            target = self._trees[new_namespace]
            new_pos = self._find(target, new_pair)
            target.items[new_pos] = target.items[new_pos]._replace(value=v)
        else:
            self._add(new_namespace, new_pair, Item(nk, i, v))
        return old_pos >= 0

    def replace(self, key, id, new_key, value=0.0, *, namespace=None, new_namespace=_UNSET) -> None:
        """Move the item ``(key, id)`` to ``(new_key, id)`` in ``new_namespace``
        (default: the same namespace) with ``value``, atomically.

        MissingItemError if ``(key, id)`` is absent; DuplicateItemError if the
        target exists and is not the item itself.  Replacing an item onto
        itself only sets its value (its stored key keeps its type).  O(n).
        """
        self._move(key, id, new_key, value, namespace, new_namespace, False)

    def upsert(self, key, id, value=0.0, *, namespace=None) -> bool:
        """Insert ``(key, id, value)``, or set the value of the existing item
        (whose stored key and id keep their types).  True if inserted.  O(n)."""
        k, ksk = _key(key)
        i, isk = _key(id, "id")
        v = _value(value)
        _check_namespace(namespace)
        pair = (ksk, isk)
        tree = self._trees.get(namespace)
        pos = self._find(tree, pair)
        if pos >= 0:
            assert tree is not None  # (found in it)
            tree.items[pos] = tree.items[pos]._replace(value=v)
            return False
        self._add(namespace, pair, Item(k, i, v))
        return True

    def delete_if_exists(self, key, id, *, namespace=None) -> bool:
        """Delete ``(key, id)`` if present; True if it was.  O(n)."""
        ksk = _key(key)[1]
        isk = _key(id, "id")[1]
        _check_namespace(namespace)
        pos = self._find(self._trees.get(namespace), (ksk, isk))
        if pos < 0:
            return False
        self._remove(namespace, pos)
        return True

    def replace_or_insert(
        self, key, id, new_key, value=0.0, *, namespace=None, new_namespace=_UNSET
    ) -> bool:
        """Delete ``(key, id)`` if present, then upsert ``(new_key, id, value)``
        in ``new_namespace`` (default: the same), atomically.  True if the old
        item existed.  Never raises DuplicateItemError: an existing target has
        its value overwritten.  O(n)."""
        return self._move(key, id, new_key, value, namespace, new_namespace, True)

    def clear(self, namespace=None) -> None:
        """Remove every item of one namespace (which then no longer exists)."""
        _check_namespace(namespace)
        tree = self._trees.pop(namespace, None)
        if tree is not None:
            self._len -= len(tree.items)

    def clear_all(self) -> None:
        """Remove every item of every namespace."""
        self._trees.clear()
        self._len = 0

    def insert_many(self, keys, ids, values=None, *, namespace=None) -> None:
        """Insert a batch, all or nothing.  ValueError for arrays of different
        lengths; DuplicateItemError for a ``(key, id)`` repeated in the batch
        or already present.  O((n + m) log(n + m))."""
        keys = _as_list(keys, "keys")
        ids = _as_list(ids, "ids")
        if values is None:
            n = _same_length(keys=keys, ids=ids)
        else:
            values = _as_list(values, "values")
            n = _same_length(keys=keys, ids=ids, values=values)
        _check_namespace(namespace)
        entries = []
        for j in range(n):
            k, ksk = _key(keys[j], f"keys[{j}]")
            i, isk = _key(ids[j], f"ids[{j}]")
            v = 0.0 if values is None else _value(values[j], f"values[{j}]")
            entries.append(((ksk, isk), Item(k, i, v)))
        if not entries:
            return
        entries.sort(key=_pair_key)
        for a, b in itertools.pairwise(entries):
            if a[0] == b[0]:
                raise DuplicateItemError(
                    f"item (key={_short(b[1].key)}, id={_short(b[1].id)}) occurs twice in the batch"
                )
        tree = self._trees.get(namespace)
        for pair, item in entries:
            if self._find(tree, pair) >= 0:
                raise self._dup(item.key, item.id, namespace)
        if tree is None:
            tree = self._trees[namespace] = _Tree()
        merged = list(zip(tree.sks, tree.items)) + entries
        merged.sort(key=_pair_key)
        tree.sks = [e[0] for e in merged]
        tree.items = [e[1] for e in merged]
        self._len += len(entries)

    def delete_many(self, keys, ids, *, namespace=None) -> None:
        """Delete a batch, all or nothing.  ValueError for arrays of different
        lengths; MissingItemError if an item is absent (or named twice).
        O(n + m log n)."""
        keys = _as_list(keys, "keys")
        ids = _as_list(ids, "ids")
        n = _same_length(keys=keys, ids=ids)
        _check_namespace(namespace)
        pairs = []
        for j in range(n):
            ksk = _key(keys[j], f"keys[{j}]")[1]
            isk = _key(ids[j], f"ids[{j}]")[1]
            pairs.append((ksk, isk))
        if not pairs:
            return
        tree = self._trees.get(namespace)
        doomed = set()
        for j, pair in enumerate(pairs):
            pos = self._find(tree, pair)
            if pos < 0 or pos in doomed:
                raise self._missing(keys[j], ids[j], namespace)
            doomed.add(pos)
        assert tree is not None  # (every pair was found in it)
        keep = [p for p in range(len(tree.items)) if p not in doomed]
        tree.sks = [tree.sks[p] for p in keep]
        tree.items = [tree.items[p] for p in keep]
        self._len -= len(doomed)
        if not tree.items:
            del self._trees[namespace]

    # -- reads ------------------------------------------------------------

    def count(self, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None) -> int:
        """Number of items in the range (0 for a missing namespace).  O(log n)."""
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        _, lo, hi = self._range(namespace, spec)
        return hi - lo

    def sum(self, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None) -> float:
        """Sum of the values in the range, correctly rounded (``math.fsum``);
        0.0 for an empty range or a missing namespace.  O(log n + k)."""
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        tree, lo, hi = self._range(namespace, spec)
        if tree is None or lo >= hi:
            return 0.0
        return math.fsum(item.value for item in tree.items[lo:hi])

    def at(self, offset, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None) -> Item:
        """The item at position ``offset`` of the range in ``(key, id)`` order;
        negative offsets count from the end.  IndexError out of range,
        TypeError for a non-integer offset.  O(log n)."""
        off = _integer(offset, "offset")
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        tree, lo, hi = self._range(namespace, spec)
        n = hi - lo
        pos = off + n if off < 0 else off
        if not 0 <= pos < n:
            raise IndexError(f"offset {_short(off)} is out of range for a range of {n} items")
        return tree.items[lo + pos]

    def index_of(
        self, key, *, id=None, order="asc", namespace=None, lower=None, upper=None,
        eq=_UNSET, prefix=None,
    ) -> int:
        """Ascending: how many items of the range come before ``(key, id)``
        (no id: before every item of ``key``).  Descending: how many come
        after it (no id: after every item of ``key``).  The key need not be
        present.  O(log n)."""
        ksk = _key(key)[1]
        isk = None if id is None else _key(id, "id")[1]
        asc = _ascending(order)
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        tree, lo, hi = self._range(namespace, spec)
        if tree is None:
            return 0
        if asc:
            if isk is None:
                p = bisect.bisect_left(tree.sks, ksk, key=_pair_key)
            else:
                p = bisect.bisect_left(tree.sks, (ksk, isk))
            return min(max(p, lo), hi) - lo
        if isk is None:
            p = bisect.bisect_right(tree.sks, ksk, key=_pair_key)
        else:
            p = bisect.bisect_right(tree.sks, (ksk, isk))
        return hi - min(max(p, lo), hi)

    def min(self, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None) -> Item | None:
        """The first item of the range, or None.  O(log n)."""
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        tree, lo, hi = self._range(namespace, spec)
        return tree.items[lo] if lo < hi else None

    def max(self, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None) -> Item | None:
        """The last item of the range, or None.  O(log n)."""
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        tree, lo, hi = self._range(namespace, spec)
        return tree.items[hi - 1] if lo < hi else None

    def random(
        self, *, rng=None, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None
    ) -> Item | None:
        """A uniformly random item of the range, or None if it is empty.
        Calls ``rng.randrange(n)`` exactly once when the range holds n > 0
        items (default: the :mod:`random` module).  O(log n)."""
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        tree, lo, hi = self._range(namespace, spec)
        n = hi - lo
        if n == 0:
            return None
        r = (rng if rng is not None else _random_module).randrange(n)
        r = _integer(r, "rng.randrange(n)")
        if not 0 <= r < n:
            raise ValueError(f"rng.randrange({n}) returned {_short(r)}, out of range")
        return tree.items[lo + r]

    def paginate(
        self, *, cursor=None, order="asc", page_size=100, namespace=None, lower=None,
        upper=None, eq=_UNSET, prefix=None,
    ) -> Page:
        """One page of keyset pagination over the range.

        The page holds up to ``page_size`` items strictly after (ascending) or
        before (descending) the item named by ``cursor`` (the start of the
        range when None), whether or not that item still exists.  The
        returned cursor names the last item of the page (or is the cursor
        passed in when the page is empty); ``is_done`` is true exactly when
        nothing in the range follows the page.  ValueError for a malformed
        cursor (or one from another implementation) or ``page_size <= 0``;
        TypeError for a cursor that is not a str or a page_size that is not
        an int (bools included).  O(log n + page_size).
        """
        asc = _ascending(order)
        size = _exact_int(page_size, "page_size")
        if size <= 0:
            raise ValueError(f"page_size must be positive, not {_short(size)}")
        after = None if cursor is None else _parse_cursor(cursor)
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        tree, lo, hi = self._range(namespace, spec)
        if tree is None:
            return Page([], cursor, True)
        if asc:
            start = lo if after is None else max(lo, bisect.bisect_right(tree.sks, after))
            stop = min(hi, start + size) if start < hi else start
            items = tree.items[start:stop]
            done = stop >= hi
        else:
            stop = hi if after is None else min(hi, bisect.bisect_left(tree.sks, after))
            start = max(lo, stop - size) if stop > lo else stop
            items = tree.items[start:stop][::-1]
            done = start <= lo
        if not items:
            return Page([], cursor, True)
        last = items[-1]
        return Page(items, _cursor_text(last.key, last.id), done)

    def iter(
        self, *, order="asc", namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None
    ) -> Iterator[Item]:
        """Iterate over the range in ``(key, id)`` order (or reversed).

        Keyset iteration: each step looks up the item after the last one
        yielded, so the aggregate may change between steps; items present
        throughout are yielded exactly once, in order.  Arguments are
        validated at the call, not at the first step.  O(log n) per item.
        """
        asc = _ascending(order)
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        return self._iter(namespace, spec, asc)

    def _iter(self, namespace, spec, asc: bool) -> Iterator[Item]:
        last = None
        while True:
            tree, lo, hi = self._range(namespace, spec)
            if tree is None:
                return
            if asc:
                pos = lo if last is None else max(lo, bisect.bisect_right(tree.sks, last))
                if pos >= hi:
                    return
            else:
                pos = hi - 1 if last is None else min(hi, bisect.bisect_left(tree.sks, last)) - 1
                if pos < lo:
                    return
            last = tree.sks[pos]
            yield tree.items[pos]

    # -- batch reads ------------------------------------------------------

    def count_batch(self, queries) -> list:
        """``[count(**q) for q in queries]``; TypeError for an unknown query key."""
        parsed = [_parse_query(q, _QUERY_KEYS, i) for i, q in enumerate(_as_list(queries, "queries"))]
        out = []
        for ns, spec in parsed:
            _, lo, hi = self._range(ns, spec)
            out.append(hi - lo)
        return out

    def sum_batch(self, queries) -> list:
        """``[sum(**q) for q in queries]``; TypeError for an unknown query key."""
        parsed = [_parse_query(q, _QUERY_KEYS, i) for i, q in enumerate(_as_list(queries, "queries"))]
        out = []
        for ns, spec in parsed:
            tree, lo, hi = self._range(ns, spec)
            out.append(0.0 if lo >= hi else math.fsum(it.value for it in tree.items[lo:hi]))
        return out

    def at_batch(self, queries) -> list:
        """``[at(**q) for q in queries]``; each query needs ``offset``.
        TypeError for an unknown or missing key, IndexError if any offset is
        out of range."""
        parsed = []
        for i, q in enumerate(_as_list(queries, "queries")):
            ns, spec = _parse_query(q, _AT_QUERY_KEYS, i)
            if "offset" not in q:
                raise TypeError(f"query {i} is missing the required key 'offset'")
            parsed.append((_integer(q["offset"], f"query {i} offset"), ns, spec))
        out = []
        for i, (off, ns, spec) in enumerate(parsed):
            tree, lo, hi = self._range(ns, spec)
            n = hi - lo
            pos = off + n if off < 0 else off
            if not 0 <= pos < n:
                raise IndexError(
                    f"query {i}: offset {_short(off)} is out of range for a range of {n} items"
                )
            out.append(tree.items[lo + pos])
        return out

    # -- vectorised (numpy) -----------------------------------------------

    def _many_specs(self, lowers, uppers, lower_inclusive, upper_inclusive):
        if type(lower_inclusive) is not bool or type(upper_inclusive) is not bool:
            raise TypeError("lower_inclusive and upper_inclusive must be bools")
        lowers = _as_list(lowers, "lowers")
        uppers = _as_list(uppers, "uppers")
        _same_length(lowers=lowers, uppers=uppers)
        return [
            ("range",
             (_key(lo, f"lowers[{j}]")[1], lower_inclusive, None),
             (_key(hi, f"uppers[{j}]")[1], upper_inclusive, None))
            for j, (lo, hi) in enumerate(zip(lowers, uppers))
        ]

    def count_many(
        self, lowers, uppers, *, namespace=None, lower_inclusive=True, upper_inclusive=True
    ) -> np.ndarray:
        """``count(lower=Bound(lowers[j], lower_inclusive), upper=Bound(uppers[j],
        upper_inclusive))`` for every j, as an int64 array.  ValueError for
        arrays of different lengths."""
        specs = self._many_specs(lowers, uppers, lower_inclusive, upper_inclusive)
        _check_namespace(namespace)
        out = np.zeros(len(specs), dtype=np.int64)
        tree = self._trees.get(namespace)
        if tree is not None:
            for j, spec in enumerate(specs):
                lo, hi = _resolve(tree.sks, spec)
                out[j] = hi - lo
        return out

    def sum_many(
        self, lowers, uppers, *, namespace=None, lower_inclusive=True, upper_inclusive=True
    ) -> np.ndarray:
        """Like :meth:`count_many` for sums, as a float64 array."""
        specs = self._many_specs(lowers, uppers, lower_inclusive, upper_inclusive)
        _check_namespace(namespace)
        out = np.zeros(len(specs), dtype=np.float64)
        tree = self._trees.get(namespace)
        if tree is not None:
            for j, spec in enumerate(specs):
                lo, hi = _resolve(tree.sks, spec)
                if lo < hi:
                    out[j] = math.fsum(it.value for it in tree.items[lo:hi])
        return out

    def at_many(
        self, offsets, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None
    ):
        """``at(o)`` for every offset, as ``(keys, ids, values)``: two object
        arrays and a float64 array.  TypeError for non-integer offsets,
        IndexError if any is out of range."""
        offs = [_integer(o, f"offsets[{j}]") for j, o in enumerate(_as_list(offsets, "offsets"))]
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        tree, lo, hi = self._range(namespace, spec)
        n = hi - lo
        items = []
        for j, off in enumerate(offs):
            pos = off + n if off < 0 else off
            if not 0 <= pos < n:
                raise IndexError(
                    f"offsets[{j}] = {_short(off)} is out of range for a range of {n} items"
                )
            items.append(tree.items[lo + pos])
        return self._arrays(items)

    @staticmethod
    def _arrays(items: list):
        return (
            _object_array([it.key for it in items]),
            _object_array([it.id for it in items]),
            np.array([it.value for it in items], dtype=np.float64),
        )

    def index_of_many(
        self, keys, *, namespace=None, order="asc", lower=None, upper=None, eq=_UNSET,
        prefix=None,
    ) -> np.ndarray:
        """``index_of(k, order=order)`` for every key, as an int64 array."""
        ksks = [_key(k, f"keys[{j}]")[1] for j, k in enumerate(_as_list(keys, "keys"))]
        asc = _ascending(order)
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        tree, lo, hi = self._range(namespace, spec)
        out = np.zeros(len(ksks), dtype=np.int64)
        if tree is None:
            return out
        for j, ksk in enumerate(ksks):
            if asc:
                p = bisect.bisect_left(tree.sks, ksk, key=_pair_key)
                out[j] = min(max(p, lo), hi) - lo
            else:
                p = bisect.bisect_right(tree.sks, ksk, key=_pair_key)
                out[j] = hi - min(max(p, lo), hi)
        return out

    def to_arrays(self, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None):
        """The items of the range in ascending order as ``(keys, ids, values)``:
        two object arrays and a float64 array.  O(log n + k)."""
        _check_namespace(namespace)
        spec = _parse_bounds(lower, upper, eq, prefix)
        tree, lo, hi = self._range(namespace, spec)
        return self._arrays([] if tree is None else tree.items[lo:hi])

    # -- whole-aggregate --------------------------------------------------

    def namespaces(self) -> list:
        """The namespaces that hold items (in creation order)."""
        return list(self._trees)

    def __len__(self) -> int:
        """Number of items in all namespaces.  O(1)."""
        return self._len

    def __repr__(self) -> str:
        return (
            f"<{type(self).__module__}.{type(self).__qualname__}: {self._len} items "
            f"in {len(self._trees)} namespaces>"
        )

    def check(self) -> None:
        """Verify every invariant; raise AssertionError naming the first broken
        one: each namespace non-empty, its lists parallel, sort keys matching
        the stored items and strictly increasing, values finite floats, the
        item count exact.  O(n)."""
        total = 0
        for ns, tree in self._trees.items():
            where = f"namespace {_short(ns)}"
            if not tree.items:
                raise AssertionError(f"{where} is empty but still kept")
            if len(tree.sks) != len(tree.items):
                raise AssertionError(f"{where}: {len(tree.sks)} sort keys for {len(tree.items)} items")
            prev = None
            for j, (pair, item) in enumerate(zip(tree.sks, tree.items)):
                if not isinstance(item, Item):
                    raise AssertionError(f"{where}: entry {j} is not an Item")
                if (sort_key(item.key), sort_key(item.id)) != pair:
                    raise AssertionError(f"{where}: sort key of item {j} does not match the item")
                if type(item.value) is not float or not math.isfinite(item.value):
                    raise AssertionError(f"{where}: item {j} has value {item.value!r}")
                if prev is not None and not prev < pair:
                    raise AssertionError(f"{where}: items {j - 1} and {j} are out of order")
                prev = pair
            total += len(tree.items)
        if total != self._len:
            raise AssertionError(f"item count {self._len} != {total} items held")

    @property
    def nbytes(self) -> int:
        """Estimated bytes held (``sys.getsizeof`` of the containers, items and
        their keys, ids and values, shallowly).  O(n)."""
        size = sys.getsizeof(self) + sys.getsizeof(self._trees)
        for tree in self._trees.values():
            size += sys.getsizeof(tree) + sys.getsizeof(tree.sks) + sys.getsizeof(tree.items)
            for pair, item in zip(tree.sks, tree.items):
                size += sys.getsizeof(pair) + sys.getsizeof(item)
                size += sys.getsizeof(item.key) + sys.getsizeof(item.id) + sys.getsizeof(item.value)
        return size

    # -- snapshots (docs/SNAPSHOT.md) ---------------------------------------

    def dumps(self) -> bytes:
        """The snapshot of this aggregate as bytes (docs/SNAPSHOT.md): the
        same bytes the native implementation writes for the same contents.
        TypeError for a namespace that a snapshot cannot hold.  O(n)."""
        from . import snapshot

        return snapshot.dumps_items(
            self._node_size, [(ns, tree.items) for ns, tree in self._trees.items()]
        )

    @classmethod
    def loads(cls, data) -> Aggregate:
        """An aggregate from snapshot bytes (any C-contiguous bytes-like
        object, a PickleBuffer included; TypeError for anything else);
        SnapshotError if they are not a valid snapshot.  O(n)."""
        from . import snapshot

        node_size, namespaces = snapshot.loads_items(data)
        agg = cls(node_size)
        for ns, items in namespaces:
            tree = _Tree()
            tree.items = items
            tree.sks = [(sort_key(it.key), sort_key(it.id)) for it in items]
            agg._trees[ns] = tree
            agg._len += len(items)
        return agg

    def save(self, file, *, fsync: bool = True) -> None:
        """Write the snapshot to ``file``: a path (str / os.PathLike), written
        atomically (temporary file, fsync, rename, directory fsync; ``fsync=
        False`` skips the fsyncs), or a binary file object."""
        from . import snapshot

        data = self.dumps()
        snapshot.save_to(file, data, fsync)

    @classmethod
    def load(cls, file, *, mmap: bool = False) -> Aggregate:
        """The aggregate saved in ``file`` (a path or a binary file object);
        ``mmap`` as in the native ``load`` (the reference always reads)."""
        from . import snapshot

        if not isinstance(mmap, bool):
            raise TypeError(f"mmap must be a bool, not {type(mmap).__name__}")
        return cls.loads(snapshot.read_file(file))

    # -- pickling ---------------------------------------------------------

    def __reduce_ex__(self, protocol: SupportsIndex):
        return _reduce(self, operator.index(protocol))

    def __reduce__(self):
        return _reduce(self, 4)

    def __getstate__(self):
        return {
            "node_size": self._node_size,
            "namespaces": [
                (ns, [tuple(it) for it in tree.items]) for ns, tree in self._trees.items()
            ],
        }

    def __setstate__(self, state) -> None:
        # The items-per-namespace state (also pickles written before snapshots).
        self._node_size = _node_size(state["node_size"])
        self._trees = {}
        self._len = 0
        for ns, items in state["namespaces"]:
            _check_namespace(ns)
            tree = _Tree()
            for key, id_, value in items:
                k, ksk = _key(key)
                i, isk = _key(id_, "id")
                tree.sks.append((ksk, isk))
                tree.items.append(Item(k, i, _value(value)))
            if tree.items:
                self._trees[ns] = tree
                self._len += len(tree.items)
        self.check()


def _reduce(agg: Aggregate, protocol: int) -> tuple:
    """Pickles carry the snapshot format (docs/SNAPSHOT.md), unless a
    namespace is of a type no snapshot can hold (any hashable is a
    namespace): then the items of each namespace, as before snapshots.
    From protocol 5 on the snapshot is a PickleBuffer (PEP 574): in-band it
    is written as bytes, out-of-band (a buffer_callback) it is not copied
    into the pickle, and loads reads it in place."""
    from . import snapshot

    if snapshot.namespaces_encodable(agg._trees):
        data: Any = agg.dumps()
        if protocol >= 5:
            data = pickle.PickleBuffer(data)
        return (_from_snapshot, (type(agg), data))
    return (_from_state, (type(agg), agg.__getstate__()))


def _from_snapshot(cls, data):
    """Unpickle: ``cls.loads(data)`` (bytes, or from protocol 5 on whatever
    buffer the unpickler hands over, an out-of-band PickleBuffer included)."""
    return cls.loads(data)


def _from_state(cls, state):
    """Unpickle an aggregate pickled as items per namespace."""
    agg = cls.__new__(cls)
    agg.__setstate__(state)
    return agg
