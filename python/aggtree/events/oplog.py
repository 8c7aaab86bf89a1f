"""The op log: what a write does to the aggregates, as data.

Every write turns into a short list of *ops*; the same ops are applied to
the writer's aggregates, stored in the change log for other processes to
replay, and undone if the write fails.  This module holds their codes, their
encoding in the change log, the loops that apply them (the native one from
the app's compiled module ``aggtree._event_ops`` and a pure-Python one for
any Aggregate class) and the start-time cache those loops keep in step with
``events_by_start`` (``StartCache``, also from ``aggtree._event_ops``).

An op is ``(aggregate, code, namespace, old_key, new_key, id)``, six int64s
in the log: ``REMOVE`` deletes ``(old_key, id)`` if present, ``ADD`` upserts
``(new_key, id)``, ``MOVE`` does both.  The ``event_follows`` aggregate's
key is None, stored as 0.

The native op loop and the start cache are imported HERE and only here: the
rest of the package uses :data:`StartCache` and :func:`pick_apply_ops`.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any, Optional, Sequence

import numpy as np

from .schema import FOLLOWS

# The start cache and the write hooks' C loop live in the app's own compiled
# module (src/aggtree/_event_ops.pyx), which cimports Aggregate.
from .._event_ops import StartCache
from .._event_ops import apply_ops as _apply_ops_native

from .._core import Aggregate as _NativeAggregate

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
    """:func:`aggtree._event_ops.apply_ops` for any Aggregate class (the
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
    native = all(type(a) is _NativeAggregate for a in aggs)
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

