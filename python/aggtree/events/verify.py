"""Verify and repair: compare every aggregate with the tables, item by item
(:meth:`VerifyMixin.verify_aggregates`), and fix what differs.

Writes that bypass the store (raw SQL, another program, a store of an older
version) leave the aggregates behind the tables: that is *drift*, and this
is how it is found (:class:`Difference`: a missing, extra, wrong-key or
wrong-value item) and repaired.  Both sides are read in bulk into int64
arrays and compared by sorting, O(n log n); items that do not fit that form
(odd namespaces, keys or ids) are compared apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import numpy as np

from .schema import AGGREGATE_NAMES, FOLLOWS
from .state import StoreState

__all__ = ["Difference", "VerifyReport", "VerifyMixin"]


class Difference(NamedTuple):
    """One disagreement between an aggregate and the tables.

    ``kind`` is ``"missing"`` (the tables have the item, the aggregate not),
    ``"extra"`` (the aggregate has an item the tables do not),
    ``"wrong_key"`` (the item is there under another key) or
    ``"wrong_value"`` (the right item with a value other than 0.0, given as
    ``actual_value``).  For missing items ``actual_key`` is None, for extra
    ones ``expected_key`` is None.
    """

    aggregate: str
    kind: str
    namespace: Any
    id: Any
    expected_key: Any
    actual_key: Any
    actual_value: Optional[float] = None


@dataclasses.dataclass
class VerifyReport:
    """What :meth:`EventStore.verify_aggregates` found.

    ``differences`` lists every difference (up to ``max_listed``, if one was
    given; ``counts`` always counts them all), ``checked`` maps each aggregate
    to the number of items the tables say it should hold, and ``repaired`` is
    true if the differences were fixed.
    """

    differences: list
    counts: dict
    checked: dict
    repaired: bool = False

    @property
    def ok(self) -> bool:
        """True if no difference was found."""
        return not any(self.counts.values())

    @property
    def total(self) -> int:
        """The number of differences found."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = []
        for name in AGGREGATE_NAMES:
            n = self.checked.get(name, 0)
            kinds = {k: v for (agg, k), v in self.counts.items() if agg == name and v}
            detail = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "ok"
            lines.append(f"{name:<26} {n:>10,} items  {detail}")
        if self.ok:
            lines.append("no differences")
        else:
            lines.append(
                f"{self.total:,} differences" + (" (repaired)" if self.repaired else "")
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class VerifyMixin(StoreState):
    """The verify half of :class:`~aggtree.events.EventStore`.  Uses the
    store's ``_lock``, ``_sync``, ``_caught_up``, ``_backend``, ``_sql``,
    ``_tables`` and ``_starts``."""

    def verify_aggregates(self, repair: bool = False, *, max_listed: Optional[int] = None) -> VerifyReport:
        """Compare every aggregate with the tables, item by item.

        Reads the tables in one snapshot (after replaying the change log),
        reads every item of every aggregate, and reports each difference
        (:class:`Difference`: missing, extra, wrong key or wrong value).  With
        ``repair=True`` the aggregates are then fixed to match the tables.
        ``max_listed`` caps the list (not the counts).  O(n log n).
        """
        backend = self._backend
        q = self._sql
        with self._lock:
            self._sync()
            with self._caught_up() as conn:
                ev = backend.read_matrix(conn, q.verify_events, 4)
                fo = backend.read_matrix(conn, q.verify_follows, 3)
                drift = backend.read_drift(conn)
            # The start cache mirrors the table (not the aggregate): refill it
            # from this snapshot, which also undoes any drift it picked up
            # from writes that bypassed the store.
            self._starts.load(ev[:, 3], ev[:, 2])
            expected = [
                ev[:, [0, 1, 3]],
                ev[:, [0, 2, 3]],
                np.column_stack([fo[:, 0], np.zeros(len(fo), dtype=np.int64), fo[:, 2]]),
                fo,
            ]
            differences: list = []
            counts: dict = {}
            checked: dict = {}
            for a, name in enumerate(AGGREGATE_NAMES):
                agg = self._tables[a].aggregate
                actual, odd, valued = _aggregate_items(agg, key_is_none=(a == FOLLOWS))
                missing, extra = _diff_rows(expected[a], actual)
                checked[name] = len(expected[a])
                found = _classify(name, missing, extra, odd, key_is_none=(a == FOLLOWS))
                if valued:  # right items with a value other than 0.0
                    flagged = {(d.namespace, d.actual_key, d.id) for d in found}
                    found.extend(
                        Difference(name, "wrong_value", ns, i, k, k, v)
                        for ns, k, i, v in valued
                        if (ns, k, i) not in flagged
                    )
                for kind in ("missing", "extra", "wrong_key", "wrong_value"):
                    counts[(name, kind)] = sum(1 for d in found if d.kind == kind)
                if max_listed is None:
                    differences.extend(found)
                else:
                    differences.extend(found[: max(0, max_listed - len(differences))])
                if repair and found:
                    _repair(agg, found)
            if repair or not any(counts.values()):  # the aggregates match these tables
                backend.drift_seen = drift
            return VerifyReport(differences=differences, counts=counts, checked=checked,
                                repaired=bool(repair and any(counts.values())))


def _aggregate_items(agg: Any, *, key_is_none: bool) -> tuple:
    """Every item of ``agg`` as an (n, 3) int64 array (namespace, key, id)
    sorted by (namespace, key, id); the items that do not fit that form (odd
    namespaces, ids or keys) as a list of (namespace, key, id); and the items
    whose value is not 0.0 as a list of (namespace, key, id, value)."""
    odd: list = []
    valued: list = []
    int_namespaces = []
    for ns in agg.namespaces():
        if _is_int(ns):
            int_namespaces.append(int(ns))
        else:
            keys, ids, _values = agg.to_arrays(namespace=ns)
            odd.extend(zip([ns] * len(ids), _py_list(keys), _py_list(ids)))
    int_namespaces.sort()  # items come (key, id)-sorted within a namespace
    ns_parts, key_parts, id_parts = [], [], []
    for ns in int_namespaces:
        keys, ids, values = agg.to_arrays(namespace=ns)
        nonzero = np.flatnonzero(np.asarray(values, dtype=np.float64))
        if len(nonzero):
            k_list, i_list, v_list = _py_list(keys), _py_list(ids), _py_list(values)
            valued.extend((ns, k_list[j], i_list[j], v_list[j]) for j in nonzero.tolist())
        keys_i, ids_i = _int_columns(keys, ids, key_is_none)
        if keys_i is None:  # item by item: the odd ones apart
            good_k, good_i = [], []
            for k, i in zip(_py_list(keys), _py_list(ids)):
                if _is_int(i) and (k is None if key_is_none else _is_int(k)):
                    good_k.append(0 if key_is_none else int(k))
                    good_i.append(int(i))
                else:
                    odd.append((ns, k, i))
            keys_i = np.array(good_k, dtype=np.int64)
            ids_i = np.array(good_i, dtype=np.int64)
        ns_parts.append(len(ids_i))
        key_parts.append(keys_i)
        id_parts.append(ids_i)
    if not int_namespaces:
        return np.zeros((0, 3), dtype=np.int64), odd, valued
    rows = np.empty((sum(ns_parts), 3), dtype=np.int64)
    rows[:, 0] = np.repeat(np.array(int_namespaces, dtype=np.int64), ns_parts)
    rows[:, 1] = np.concatenate(key_parts)
    rows[:, 2] = np.concatenate(id_parts)
    return rows, odd, valued


def _int_columns(keys: Any, ids: Any, key_is_none: bool) -> tuple:
    """``(keys, ids)`` as exact int64 arrays (zeros for None keys), or
    ``(None, None)`` if some key or id is not such an int."""
    try:
        ids_a = np.asarray(ids)
        ids_i = ids_a.astype(np.int64)
        if ids_a.dtype.kind not in "iu" and not (ids_i == ids_a).all():
            return None, None
        keys_a = np.asarray(keys)
        if key_is_none:
            if not (keys_a.dtype == object and all(k is None for k in keys_a.tolist())):
                return None, None
            return np.zeros(len(ids_i), dtype=np.int64), ids_i
        keys_i = keys_a.astype(np.int64)
        if keys_a.dtype.kind not in "iu" and not (keys_i == keys_a).all():
            return None, None
        return keys_i, ids_i
    except (TypeError, ValueError, OverflowError):
        return None, None


def _py_list(a: Any) -> list:
    """An array of keys or ids as a list of plain Python objects."""
    if isinstance(a, np.ndarray):
        return a.tolist()
    return list(a)


def _is_int(x: Any) -> bool:
    """An int that fits in int64 (the type of every namespace, key and id the
    tables produce)."""
    return bool(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and -(2**63) <= x < 2**63)


def _diff_rows(expected: np.ndarray, actual: np.ndarray) -> tuple:
    """Rows of ``expected`` not in ``actual`` and rows of ``actual`` not in
    ``expected`` (each side has unique rows; ``actual`` is sorted)."""
    expected = np.asarray(expected, dtype=np.int64).reshape(-1, 3)
    actual = np.asarray(actual, dtype=np.int64).reshape(-1, 3)
    expected = expected[np.lexsort((expected[:, 2], expected[:, 1], expected[:, 0]))]
    if expected.shape == actual.shape and np.array_equal(expected, actual):
        return expected[:0], actual[:0]  # the common case: no difference
    rows = np.concatenate([expected, actual])
    side = np.concatenate([np.zeros(len(expected), np.int8), np.ones(len(actual), np.int8)])
    order = np.lexsort((side, rows[:, 2], rows[:, 1], rows[:, 0]))
    rows, side = rows[order], side[order]
    same = np.all(rows[1:] == rows[:-1], axis=1)
    matched = np.zeros(len(rows), dtype=bool)
    matched[:-1] |= same
    matched[1:] |= same
    lone = ~matched
    return rows[lone & (side == 0)], rows[lone & (side == 1)]


def _classify(name: str, missing: np.ndarray, extra: np.ndarray, odd: list, *, key_is_none: bool) -> list:
    """Differences from the unmatched rows: a missing and an extra item with
    the same (namespace, id) are one wrong key."""
    def key_out(k):
        return None if key_is_none else int(k)

    extra_items = [(int(ns), key_out(k), int(i)) for ns, k, i in extra.tolist()] + list(odd)
    by_ns_id: dict = {}
    for ns, k, i in extra_items:
        by_ns_id.setdefault((ns, i), []).append(k)
    found = []
    for ns, k, i in missing.tolist():
        ns, i = int(ns), int(i)
        wrong = by_ns_id.get((ns, i))
        if wrong:
            found.append(Difference(name, "wrong_key", ns, i, key_out(k), wrong.pop(0)))
        else:
            found.append(Difference(name, "missing", ns, i, key_out(k), None))
    for (ns, i), keys in by_ns_id.items():
        for k in keys:
            found.append(Difference(name, "extra", ns, i, None, k))
    return found


def _repair(agg: Any, found: list) -> None:
    for d in found:
        if d.kind in ("extra", "wrong_key"):
            agg.delete_if_exists(d.actual_key, d.id, namespace=d.namespace)
    for d in found:
        if d.kind in ("missing", "wrong_key", "wrong_value"):
            agg.upsert(d.expected_key, d.id, 0.0, namespace=d.namespace)
