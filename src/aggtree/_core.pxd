# _core.pxd - the cdef classes of aggtree._core, for `cimport`.
#
# Another Cython module (aggtree._event_ops, say) writes
#     from aggtree._core cimport Aggregate
# and may then call the methods below marked CONTRACT: their meaning, the
# lock they need and what they do on failure are stated here and kept.  The
# other cdef methods are internals of _core (declared here only because
# Cython needs every cdef method of a class declared in its .pxd).
#
# The C declarations of the core (aggtree.h) are in _aggtree.pxd; the code is
# in _core.pyx and the .pxi files it includes (see _core.pyx for the map).

from libc.stdint cimport uint32_t, uint64_t
from cpython.pythread cimport PyThread_type_lock

from aggtree._aggtree cimport *


cdef class _Tree:
    """One namespace's C tree and its key kind (_trees.pxi).

    The C tree is reached only through the two accessors of _trees.pxi:
    _tt(tree) with the GIL held, _bulk_begin / _bulk_end around a bulk
    write without the GIL.  The raw pointer's name says so."""
    cdef agg_tree *_t_raw_use_tt         # the C tree: use _tt / _bulk_begin, never this
    cdef int kind                        # K_FLOAT, K_INT, K_GENERAL or K_NONE
    cdef int busy                        # a bulk write is changing the tree without the GIL
    cdef PyThread_type_lock busy_lock    # held by that write; NULL until the first one


cdef class Aggregate:
    cdef dict _trees                # namespace -> _Tree (no empty trees)
    cdef uint32_t _node_size
    cdef PyThread_type_lock _lock
    cdef unsigned long _owner       # thread holding _lock (valid while _depth > 0)
    cdef int _depth                 # re-entrant holds of _lock by _owner
    cdef uint64_t _version          # bumped by every write (live iteration)

    # -- the lock --
    # Take (release) the aggregate's lock without marking a write: what the
    # vectorised readers hold while they run without the GIL.
    cdef inline void _acquire(self) noexcept
    cdef inline void _release(self) noexcept
    # CONTRACT: take (release) the aggregate's write lock.  Re-entrant for
    # the thread holding it; waits without the GIL; _wlock also bumps the
    # version that live iteration watches.  Every change to the aggregate
    # happens between _wlock() and _wunlock(), called in pairs
    # (try / finally).
    cdef inline void _wlock(self) noexcept
    cdef inline void _wunlock(self) noexcept

    # -- namespaces --
    # The tree of `namespace` or None (TypeError if it is not hashable); the
    # tree for an insert of `kind` (created, or widened to GENERAL); drop a
    # namespace whose tree became empty (write lock held).
    cdef inline _Tree _tree(self, object namespace)
    cdef _Tree _tree_for_insert(self, object namespace, int kind)
    cdef inline void _drop_if_empty(self, object namespace, _Tree tree)

    # -- per-item writes --
    # CONTRACT (caller holds the write lock, see _wlock): insert (key, id)
    # with the finite value v into `namespace` (created if need be).  With
    # overwrite, an existing item's value is replaced (upsert), else it is
    # a DuplicateItemError.  *existed is set to whether the item was there.
    # TypeError / ValueError for a bad key, id or namespace, MemoryError:
    # the aggregate is unchanged then.
    cdef int _insert(self, object key, object id, double v, object namespace,
                     bint overwrite, bint *existed) except -1
    # CONTRACT (caller holds the write lock): delete (key, id) from
    # `namespace`; returns whether it was there.  If absent: MissingItemError
    # when `must`, else False.  A namespace left empty is dropped.  Errors
    # as for _insert, with nothing changed.
    cdef bint _delete(self, object key, object id, object namespace, bint must) except -1
    # Whether (key, id) is an item of `namespace` (validating key and id).
    cdef bint _exists(self, object key, object id, object namespace) except -1
    # replace / replace_or_insert (the caller holds the write lock).
    cdef object _replace(self, object key, object id, object new_key, object value,
                         object namespace, object new_namespace, bint must)
