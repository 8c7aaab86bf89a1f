# _errors.pxi - exceptions of aggtree._core and their messages (included by
# _core.pyx).
#
# Two functions make every exception a C status or an item turns into:
# _raise_status maps a C status (aggtree.h) to the documented exception, and
# _item_error words every DuplicateItemError / MissingItemError, in one form:
#     item (key=K, id=I) already exists in namespace N
#     item (key=K, id=I) is not in namespace N
#     item (key=K, id=I) occurs twice in the batch for namespace N
# (the last for a batch or an array build that names one item twice: a
# DuplicateItemError from an insert or a build, a MissingItemError from a
# delete, whose second delete would find the item gone).

cdef enum:
    E_EXISTS = 1          # DuplicateItemError: the item is in the namespace already
    E_MISSING = 2         # MissingItemError: the item is not in the namespace
    E_TWICE_INSERT = 3    # DuplicateItemError: an insert / build input names it twice
    E_TWICE_DELETE = 4    # MissingItemError: a delete batch names it twice


cdef object _item_error(int what, object key, object id, object namespace):
    """The DuplicateItemError / MissingItemError about item (key, id) of
    `namespace` (`what`: an E_* code); the one place these are worded."""
    cdef str item = f"item (key={key!r}, id={id!r})"
    if what == E_EXISTS:
        return DuplicateItemError(f"{item} already exists in namespace {namespace!r}")
    if what == E_MISSING:
        return MissingItemError(f"{item} is not in namespace {namespace!r}")
    msg = f"{item} occurs twice in the batch for namespace {namespace!r}"
    if what == E_TWICE_DELETE:
        return MissingItemError(msg)
    return DuplicateItemError(msg)


cdef int _raise_item_fast(int what, int kind, agg_key k, object namespace) except -1:
    """_item_error for an item of a FAST tree of `kind`, named by its C key."""
    raise _item_error(what, _fast_key_obj(kind, k), agg_key_to_i64(k.rest), namespace)


cdef int _raise_status(agg_status st, object key, object id, object ns) except -1:
    """Turn a C status into the documented exception (the one place that does;
    AGG_DUPLICATE / AGG_MISSING name the item (key, id) of namespace ns)."""
    if st == AGG_OK:
        return 0
    if st == AGG_NOMEM:
        raise MemoryError("aggtree: out of memory (the aggregate is unchanged)")
    if st == AGG_DUPLICATE:
        raise _item_error(E_EXISTS, key, id, ns)
    if st == AGG_MISSING:
        raise _item_error(E_MISSING, key, id, ns)
    if st == AGG_RANGE:
        raise IndexError("aggtree: index out of range")
    if st == AGG_INVALID:
        raise ValueError("aggtree: invalid argument")
    raise AssertionError("aggtree: corrupt tree")
