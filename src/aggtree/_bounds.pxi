# _bounds.pxi - bounds for aggtree._core (included by _core.pyx).
#
# Every bound form (lower / upper as a key or a Bound, eq, prefix, a
# paginate cursor) becomes a gap: the number of items of a tree before a
# point of the key order (_gap).  _range turns the bounds keywords into a
# half-open index interval [lo, hi), on which count / sum / at / min / max /
# paginate then work by index.  Cursors (paginate) are made and parsed here.

cdef object _UNSET = object()          # default of eq= (None is a valid key)
_CURSOR_PREFIX = "agg1."

# ------------------------------------------------------------- gaps --

cdef uint64_t _gap(_Tree tree, object key, object id, bint has_id, bint after) except? 0xFFFFFFFFFFFFFFFF:
    """Number of items of `tree` before a point of the key order.

    The point is just before (after=False) or just after (after=True) the
    item (key, id), or, without an id, all the items of `key`."""
    cdef double d
    cdef int64_t i
    cdef int pk, pi
    cdef GKey g
    cdef agg_key k
    cdef uint64_t r
    if tree.kind == K_GENERAL:
        gkey_init(&g)
        try:
            kb_put_value(&g.kb, key, NULL)
            if has_id:
                kb_put_value(&g.kb, id, NULL)
            if after:
                kb_put_byte(&g.kb, 0xFF)
            k = gkey_finish(&g)
            r = agg_tree_rank(_tt(tree), k, 0)
        finally:
            gkey_free(&g)
        return r
    pk = _num_position(key, &d, tree.kind)
    if pk == P_BELOW:
        if has_id:
            _id_position(id, &i)     # still validate the id
        return 0
    if pk == P_ABOVE:
        if has_id:
            _id_position(id, &i)
        return agg_tree_len(_tt(tree))
    if pk == P_GAP:
        if has_id:
            _id_position(id, &i)
        k.head = agg_f64_to_key(d)
        k.rest = _ID_MAX
        return agg_tree_rank(_tt(tree), k, 1)
    k.head = agg_f64_to_key(d)
    if not has_id:
        k.rest = _ID_MAX if after else _ID_MIN
        return agg_tree_rank(_tt(tree), k, after)
    pi = _id_position(id, &i)
    if pi == P_BELOW:
        k.rest = _ID_MIN
        return agg_tree_rank(_tt(tree), k, 0)
    if pi == P_ABOVE:
        k.rest = _ID_MAX
        return agg_tree_rank(_tt(tree), k, 1)
    k.rest = agg_i64_to_key(i)
    if pi == P_GAP:
        return agg_tree_rank(_tt(tree), k, 1)
    return agg_tree_rank(_tt(tree), k, after)


cdef inline tuple _split_bound(object b):
    """(key, inclusive, id) of a Bound or a bare key (inclusive, no id)."""
    if PyFloat_CheckExact(b) or PyLong_CheckExact(b):
        return (b, True, None)
    if isinstance(b, Bound):
        return (b.key, b.inclusive, b.id)
    return (b, True, None)


cdef int _check_prefix(object prefix) except -1:
    if not isinstance(prefix, (tuple, list)):
        raise TypeError(f"prefix must be a tuple or list, not {type(prefix).__name__}")
    cdef KeyBuf kb
    kb_init(&kb)
    try:
        kb_put_prefix(&kb, prefix)
    finally:
        kb_free(&kb)
    return 0


cdef inline agg_key _float_bound(object v, uint64_t rest) except *:
    """The FAST key of a bare float bound `v` (an exact float) with id
    image `rest`; ValueError for NaN."""
    cdef double x = PyFloat_AS_DOUBLE(v)
    cdef agg_key k
    if isnan(x):
        raise ValueError("key must not be NaN")
    k.head = agg_f64_to_key(x + 0.0)
    k.rest = rest
    return k


cdef int _range(_Tree tree, object lower, object upper, object eq, object prefix,
                uint64_t *lo, uint64_t *hi) except -1:
    """Resolve the bounds keywords to an index interval [lo, hi) of `tree`.

    With tree None (missing namespace) only validates, and sets [0, 0)."""
    cdef object key, id
    cdef bint incl
    cdef uint64_t a = 0, b = 0
    cdef GKey g
    cdef agg_key k
    cdef bint has_eq = eq is not _UNSET
    cdef agg_key k2
    cdef GKey g2
    # Fast path: bare float bounds (inclusive, no id) on a numeric tree.
    if (tree is not None and tree.kind <= K_INT and not has_eq and prefix is None
            and (lower is None or PyFloat_CheckExact(lower))
            and (upper is None or PyFloat_CheckExact(upper))):
        if lower is not None:
            k = _float_bound(lower, _ID_MIN)     # before every item of the key
        if upper is not None:
            k2 = _float_bound(upper, _ID_MAX)    # after every item of the key
        if lower is not None and upper is not None:
            agg_tree_rank2(_tt(tree), k, 0, k2, 1, &a, &b)
        else:
            a = 0 if lower is None else agg_tree_rank(_tt(tree), k, 0)
            b = agg_tree_len(_tt(tree)) if upper is None else agg_tree_rank(_tt(tree), k2, 1)
        lo[0] = a
        hi[0] = b if b > a else a
        return 0
    if has_eq or prefix is not None:
        if lower is not None or upper is not None or (has_eq and prefix is not None):
            raise ValueError("eq, prefix and lower/upper are exclusive: pass only one form of bounds")
    if tree is None:
        # Validate exactly as a present namespace would, then report empty.
        if has_eq:
            _validate_key(eq)
        elif prefix is not None:
            _check_prefix(prefix)
        else:
            for bound in (lower, upper):
                if bound is not None:
                    key, incl, id = _split_bound(bound)
                    _validate_key(key)
                    if id is not None:
                        _validate_key(id)
        lo[0] = 0
        hi[0] = 0
        return 0
    if has_eq:
        a = _gap(tree, eq, None, False, False)
        b = _gap(tree, eq, None, False, True)
    elif prefix is not None:
        _check_prefix(prefix)
        if len(prefix) == 0:
            a = 0
            b = agg_tree_len(_tt(tree))
        elif tree.kind != K_GENERAL:
            a = 0
            b = 0
        else:
            # [prefix, prefix + 0xFF): both ends in one lockstep descent.
            gkey_init(&g)
            gkey_init(&g2)
            try:
                kb_put_prefix(&g.kb, prefix)
                kb_put_bytes(&g2.kb, g.kb.data, g.kb.len)
                kb_put_byte(&g2.kb, 0xFF)
                k = gkey_finish(&g)
                k2 = gkey_finish(&g2)
                agg_tree_rank2(_tt(tree), k, 0, k2, 0, &a, &b)
            finally:
                gkey_free(&g)
                gkey_free(&g2)
    elif (tree.kind == K_GENERAL and lower is not None and upper is not None
          and not isinstance(lower, Bound) and not isinstance(upper, Bound)):
        # Two bare keys on a GENERAL tree: both ends in one lockstep descent.
        gkey_init(&g)
        gkey_init(&g2)
        try:
            kb_put_value(&g.kb, lower, NULL)
            kb_put_value(&g2.kb, upper, NULL)
            kb_put_byte(&g2.kb, 0xFF)
            k = gkey_finish(&g)
            k2 = gkey_finish(&g2)
            agg_tree_rank2(_tt(tree), k, 0, k2, 0, &a, &b)
        finally:
            gkey_free(&g)
            gkey_free(&g2)
    else:
        if lower is None:
            a = 0
        else:
            key, incl, id = _split_bound(lower)
            a = _gap(tree, key, id, id is not None, not incl)
        if upper is None:
            b = agg_tree_len(_tt(tree))
        else:
            key, incl, id = _split_bound(upper)
            b = _gap(tree, key, id, id is not None, incl)
    if b < a:
        b = a
    lo[0] = a
    hi[0] = b
    return 0


cdef object _order_desc(object order):
    if order == "asc":
        return False
    if order == "desc":
        return True
    raise ValueError(f"order must be 'asc' or 'desc', not {order!r}")


cdef str _make_cursor(object key, object id):
    return _CURSOR_PREFIX + _base64.urlsafe_b64encode(_encode_item_bytes(key, id)).decode("ascii")


cdef tuple _parse_cursor(object cursor):
    if not isinstance(cursor, str):
        raise TypeError(f"cursor must be a str from paginate(), not {type(cursor).__name__}")
    if not cursor.startswith(_CURSOR_PREFIX):
        raise ValueError(f"malformed cursor {cursor!r}")
    try:
        raw = _base64.urlsafe_b64decode(cursor[len(_CURSOR_PREFIX):].encode("ascii"))
    except (_binascii.Error, ValueError, UnicodeEncodeError):
        raise ValueError(f"malformed cursor {cursor!r}")
    try:
        res = kb_decode_item(<const unsigned char *>(<char *>raw), len(raw))
    except (ValueError, TypeError):
        raise ValueError(f"malformed cursor {cursor!r}")
    if _encode_item_bytes(res[0], res[1]) != raw:
        raise ValueError(f"malformed cursor {cursor!r}")
    return res
