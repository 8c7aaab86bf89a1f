"""The op log: what a write does to the aggregates, as data.

Every write turns into a short list of *ops*; the same ops are applied to
the writer's aggregates, stored in the change log for other processes to
replay, and undone if the write fails.  This module holds their codes, their
encoding in the change log, the loops that apply them (the native one from
the compiled core and a pure-Python one for any Aggregate class) and the
start-time cache those loops keep in step with ``events_by_start``.

An op is ``(aggregate, code, namespace, old_key, new_key, id)``, six int64s
in the log: ``REMOVE`` deletes ``(old_key, id)`` if present, ``ADD`` upserts
``(new_key, id)``, ``MOVE`` does both.  The ``event_follows`` aggregate's
key is None, stored as 0.

The native op loop and the start cache are chosen HERE and only here (the
``try`` import below and ``StartCache``): the rest of the package uses
:data:`StartCache` and :func:`pick_apply_ops`.
"""

from __future__ import annotations

import itertools
import struct
from array import array
from typing import Any, Optional, Sequence

import numpy as np

from .schema import FOLLOWS

try:  # the write hooks' C loop, for native aggregates
    from .._core import Aggregate as _NativeAggregate
    from .._core import apply_ops as _apply_ops_native
except ImportError:  # pragma: no cover - no compiled core
    _NativeAggregate = None
    _apply_ops_native = None

__all__ = ["REMOVE", "ADD", "MOVE", "OP_WIDTH", "KEY_IS_NONE", "encode", "decode",
           "StartCache", "apply_ops_python", "pick_apply_ops"]

# Op codes (bits: MOVE = REMOVE | ADD).
REMOVE, ADD, MOVE = 1, 2, 3
OP_WIDTH = 6
KEY_IS_NONE = tuple(a == FOLLOWS for a in range(4))


# ---------------------------------------------------------------------------
# Change-log encoding
# ---------------------------------------------------------------------------


_STRUCTS: dict = {}


def encode(ops: Any) -> bytes:
    """The ops as little-endian int64s (one ``OP_WIDTH``-tuple per op)."""
    n = len(ops)
    packer = _STRUCTS.get(n)
    if packer is None:
        packer = _STRUCTS[n] = struct.Struct(f"<{OP_WIDTH * n}q")
    return packer.pack(*itertools.chain.from_iterable(ops))


def decode(blob: bytes) -> list:
    """The ops of one change-log row (the inverse of :func:`encode`)."""
    flat = struct.unpack(f"<{len(blob) // 8}q", blob)
    return [flat[i : i + OP_WIDTH] for i in range(0, len(flat), OP_WIDTH)]


# ---------------------------------------------------------------------------
# The start cache
# ---------------------------------------------------------------------------


class _StartCache:
    """The start time of events, by event id (a mirror of
    ``events.start_time`` for the ids it holds): what
    ``follow_event`` and ``unfollow_event`` need for the follower's
    ``followed_events_by_start`` item, without a SELECT (which would cost
    the write ~1.4 us, a third of the store's overhead over plain SQLite).

    An ``array('q')`` indexed by id, ``EMPTY`` where unknown.  It moves in
    step with ``events_by_start``: every op on that aggregate sets it
    (applied, replayed from another process, or undone after a failure), a
    reload and the migration fill it from the same rows, and
    ``verify_aggregates`` refills it from the tables.  An id it does not
    hold (EMPTY, or beyond the array: ids far above the others are not
    cached, so a sparse id cannot blow up memory) makes the write read the
    table as before."""

    EMPTY = -(2**63)  # no datetime maps to it: to_ms(datetime.min) ~ -6.2e13

    __slots__ = ("a",)

    def __init__(self) -> None:
        self.a = array("q")

    def get(self, event_id: int) -> Optional[int]:
        a = self.a
        if 0 <= event_id < len(a):
            v = a[event_id]
            if v != -(2**63):
                return v
        return None

    def set(self, event_id: int, start: Optional[int]) -> None:
        """Remember ``start`` (None: forget) for ``event_id``."""
        a = self.a
        v = self.EMPTY if start is None else start
        if event_id < 0:
            return
        if event_id >= len(a):
            if v == self.EMPTY or event_id >= 2 * len(a) + 65536:
                return  # nothing to forget there / too sparse to cache
            a.extend(array("q", [self.EMPTY]) * (max(event_id + 1, 2 * len(a)) - len(a)))
        a[event_id] = v

    def load(self, ids: np.ndarray, starts: np.ndarray) -> None:
        """Replace the contents with these events (ids >= 0)."""
        ids = np.asarray(ids, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64)
        keep = (ids >= 0) & (ids < 4 * len(ids) + 65536)
        ids, starts = ids[keep], starts[keep]
        table = np.full(int(ids.max()) + 1 if len(ids) else 0, self.EMPTY, dtype=np.int64)
        table[ids] = starts
        a = array("q")
        a.frombytes(table.tobytes())
        self.a = a


#: The start cache the store uses (the class the native loop understands).
StartCache = _StartCache


# ---------------------------------------------------------------------------
# Applying ops
# ---------------------------------------------------------------------------


def apply_ops_python(
    aggs: list,
    ops: Sequence,
    undo: Optional[list],
    key_is_none: tuple,
    starts: Optional[Any] = None,
    start_agg: int = -1,
) -> None:
    """:func:`aggtree._core.apply_ops` for any Aggregate class (the
    pure-Python reference included): the same ops, the same undo records,
    the same start cache steps.

    Applies each op with the idempotent forms (REMOVE: delete if present,
    ADD: upsert); with ``undo``, records ``(aggregate, done bits, old, new,
    id, namespace)`` per op that changed something, even when it raises
    halfway.  Before each op on aggregate ``start_agg`` the start cache is
    set (ADD) or forgotten, its previous entry recorded as ``(None, 0,
    previous start, None, id, None)``."""
    for a, code, ns, old, new, id_ in ops:
        if a == start_agg and starts is not None:
            if undo is not None:
                undo.append((None, 0, starts.get(id_), None, id_, None))
            starts.set(id_, new if code & ADD else None)
        agg = aggs[a]
        if key_is_none[a]:
            old = new = None
        done = 0
        try:
            if code & REMOVE and agg.delete_if_exists(old, id_, namespace=ns):
                done = REMOVE
            if code & ADD and agg.upsert(new, id_, namespace=ns):
                done |= ADD
        finally:
            if done and undo is not None:
                undo.append((agg, done, old, new, id_, ns))


def pick_apply_ops(aggs: list) -> Any:
    """The loop that applies ops to these four aggregates: the native one
    when they all are native Aggregates, the Python one otherwise.  Both are
    called as ``f(aggs, ops, undo, KEY_IS_NONE, starts, BY_START)``."""
    native = _NativeAggregate is not None and all(type(a) is _NativeAggregate for a in aggs)
    return _apply_ops_native if native else apply_ops_python


def undo_ops(undo: list, starts: Any) -> None:
    """Reverse the records an apply loop wrote into ``undo`` (newest first)
    and clear it.  Raises if a step fails; the caller then rebuilds."""
    try:
        for agg, done, old, new, id_, ns in reversed(undo):
            if agg is None:
                starts.set(id_, old)
                continue
            if done & ADD:
                agg.delete(new, id_, namespace=ns)
            if done & REMOVE:
                agg.insert(old, id_, namespace=ns)
    finally:
        undo.clear()

