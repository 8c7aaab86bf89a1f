# cython: language_level=3, boundscheck=False, wraparound=False
"""aggtree._event_ops: the event store's op loop and start cache, compiled.

Part of the event app (aggtree.events), not of the library: what
``EventStore`` runs inside every write transaction.  ``apply_ops`` applies
the write hooks' ops to native Aggregates in one C loop, through the cdef
methods ``aggtree._core`` declares for other modules (_core.pxd: the write
lock, _insert, _delete); ``StartCache`` is the event ids' start times the
loop keeps in step.  aggtree.events has the pure-Python twin of the loop
(``_apply_ops_python``), which works with the same StartCache.
"""

from cpython cimport array as cpy_array
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport Py_SIZE
from libc.stdint cimport INT64_MIN

from array import array

import numpy as np

from aggtree._core cimport Aggregate


cdef class StartCache:
    """The start time of events, by event id (a mirror of
    ``events.start_time`` for the ids it holds): what
    ``follow_event`` and ``unfollow_event`` need for the follower's
    ``followed_events_by_start`` item, without a SELECT (which would cost
    the write ~1.4 us, a third of the store's overhead over plain SQLite).

    ``a`` is an ``array('q')`` indexed by id, ``EMPTY`` where unknown.  It
    moves in step with ``events_by_start``: every op on that aggregate sets
    it (applied, replayed from another process, or undone after a failure),
    a reload and the migration fill it from the same rows, and
    ``verify_aggregates`` refills it from the tables.  An id it does not
    hold (EMPTY, or beyond the array: ids far above the others are not
    cached, so a sparse id cannot blow up memory) makes the write read the
    table as before."""

    EMPTY = -(2**63)  # no datetime maps to it: to_ms(datetime.min) ~ -6.2e13

    cdef public cpy_array.array a

    def __init__(self):
        self.a = array("q")

    def get(self, event_id):
        """The cached start of ``event_id``, or None."""
        cdef object a = self.a
        if 0 <= event_id < len(a):
            v = a[event_id]
            if v != INT64_MIN:
                return v
        return None

    def set(self, event_id, start):
        """Remember ``start`` (None: forget) for ``event_id``."""
        cdef object a = self.a
        v = INT64_MIN if start is None else start
        if event_id < 0:
            return
        if event_id >= len(a):
            if v == INT64_MIN or event_id >= 2 * len(a) + 65536:
                return  # nothing to forget there / too sparse to cache
            a.extend(array("q", [INT64_MIN]) * (max(event_id + 1, 2 * len(a)) - len(a)))
        a[event_id] = v

    def load(self, ids, starts):
        """Replace the contents with these events (ids >= 0)."""
        ids = np.asarray(ids, dtype=np.int64)
        starts = np.asarray(starts, dtype=np.int64)
        keep = (ids >= 0) & (ids < 4 * len(ids) + 65536)
        ids, starts = ids[keep], starts[keep]
        table = np.full(int(ids.max()) + 1 if len(ids) else 0, INT64_MIN, dtype=np.int64)
        table[ids] = starts
        a = array("q")
        a.frombytes(table.tobytes())
        self.a = a

    cdef int _step(self, object id_, object new, list undo) except -1:
        """apply_ops' step on the cache: what ``get`` then ``set`` do (the
        previous entry recorded in ``undo`` first), read and written in the
        array itself when the id is inside it and the new value an int64."""
        cdef cpy_array.array arr = self.a
        cdef long long i, v
        cdef int ovf = 0
        if type(id_) is int:
            i = PyLong_AsLongLongAndOverflow(id_, &ovf)
            if ovf == 0 and 0 <= i < Py_SIZE(arr):
                v = arr.data.as_longlongs[i]
                if undo is not None:
                    undo.append((None, 0, None if v == INT64_MIN else v, None, id_, None))
                if new is None:
                    arr.data.as_longlongs[i] = INT64_MIN
                    return 0
                if type(new) is int:
                    v = PyLong_AsLongLongAndOverflow(new, &ovf)
                    if ovf == 0 and v != INT64_MIN:
                        arr.data.as_longlongs[i] = v
                        return 0
                self.set(id_, new)
                return 0
        if undo is not None:
            undo.append((None, 0, self.get(id_), None, id_, None))
        self.set(id_, new)
        return 0


def apply_ops(list aggs, ops, list undo, tuple key_is_none, StartCache starts=None,
              Py_ssize_t start_agg=-1):
    """Apply write-hook ops to several native Aggregates in one C loop.

    Each op is ``(a, code, namespace, old_key, new_key, id)``: ``aggs[a]``
    is the Aggregate; code bit 1 deletes ``(old_key, id)`` if present, bit 2
    upserts ``(new_key, id)`` with value 0.0 (both: a move).  Where
    ``key_is_none[a]`` the keys are taken as None whatever the op says (the
    event store logs None keys as 0).

    For every op that changed something, ``(aggregate, done, old_key,
    new_key, id, namespace)`` is appended to ``undo`` (unless None), with
    ``done`` the bits that took effect: also when the op's second step
    raises, so a caller can always roll back exactly what happened.  This
    is what ``aggtree.events.EventStore`` runs inside every write
    transaction.  Measured (a move on a ~100-item namespace, warm caches):
    0.32 us per op here, 0.54 us for the same loop in Python.

    ``starts`` (a StartCache) follows aggregate ``start_agg``: before each
    op on it, the cache's entry for the op's id becomes ``new_key`` (ADD)
    or is forgotten, and ``(None, 0, previous or None, None, id, None)``
    goes to ``undo`` first."""
    cdef Aggregate agg
    cdef int code, done
    cdef bint ex
    cdef Py_ssize_t a
    for op in ops:
        a, code, ns, old, new, id_ = op
        if a == start_agg and starts is not None:
            starts._step(id_, new if code & 2 else None, undo)
        agg = <Aggregate?>aggs[a]
        if key_is_none[a]:
            old = new = None
        done = 0
        agg._wlock()
        try:
            if code & 1 and agg._delete(old, id_, ns, False):
                done = 1
            if code & 2:
                agg._insert(new, id_, 0.0, ns, True, &ex)
                if not ex:
                    done |= 2
        finally:
            agg._wunlock()
            if done and undo is not None:
                undo.append((agg, done, old, new, id_, ns))
