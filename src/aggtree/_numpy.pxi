# _numpy.pxi - the numpy paths of aggtree._core (included by _core.pyx).
#
# What the array methods of Aggregate do (from_arrays, insert_many,
# delete_many, count_many, sum_many, index_of_many, at_many, to_arrays), as
# cdef functions the public methods call with the aggregate's lock held, and
# the array helpers they share: converting and checking item arrays
# (_item_arrays, _as_1d, _bound_array), FAST key arrays (_fast_key_array),
# ranking many bounds without the GIL (_rank_pairs) and reading items out
# into arrays.

# ------------------------------------------------- the vectorised methods --
#
# The cdef bodies of Aggregate's array methods (from_arrays, insert_many,
# delete_many, count_many, sum_many, index_of_many, at_many, to_arrays).
# The public method in _aggregate.pxi takes the aggregate's lock (the write
# lock for writes) and calls the function here, which assumes it held.

cdef _from_arrays(Aggregate agg, keys, ids, values, namespaces):
    """Fill the new, empty `agg` from item arrays (see from_arrays)."""
    ka, ia, va, kind = _item_arrays(keys, ids, values)
    if namespaces is None:
        _load_arrays(agg, ka, ia, va, kind, None)
        return
    if isinstance(namespaces, np.ndarray) and namespaces.dtype.kind in "iub":
        nsa = namespaces
    else:
        nsa = None
    nss = namespaces.tolist() if isinstance(namespaces, np.ndarray) else list(namespaces)
    if len(nss) != len(ka):
        raise ValueError(f"namespaces has {len(nss)} entries for {len(ka)} items")
    if len(ka) == 0:
        return
    if nsa is not None and kind != K_GENERAL:
        # One sort by (namespace, key, id) for all namespaces, then one
        # bottom-up build per contiguous run: no per-namespace sorting.
        uniq, inv = np.unique(nsa, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        ks = np.ascontiguousarray(ka[order], dtype=np.float64)
        iss = np.ascontiguousarray(ia[order], dtype=np.int64)
        vs = np.ascontiguousarray(va[order], dtype=np.float64)
        runs = np.flatnonzero(np.diff(inv[order])) + 1
        starts = [0] + runs.tolist()
        ends = runs.tolist() + [len(ks)]
        names = uniq.tolist()
        karr = _fast_key_array(ks, iss)
        for a, b in zip(starts, ends):
            _build_fast_run(agg, karr, vs, a, b, kind, names[inv[order[a]]])
        return
    if nsa is not None:
        uniq, inv = np.unique(nsa, return_inverse=True)
        order = np.argsort(inv, kind="stable")
        bounds = np.searchsorted(inv[order], np.arange(len(uniq) + 1))
        names = uniq.tolist()
        for g in range(len(uniq)):
            idx = order[bounds[g]:bounds[g + 1]]
            _load_arrays(agg, ka[idx], ia[idx], va[idx], kind, names[g])
        return
    groups = {}
    for j, ns in enumerate(nss):
        try:
            groups.setdefault(ns, []).append(j)
        except TypeError:
            raise TypeError(f"namespace must be hashable, not {type(ns).__name__}") from None
    for ns, idx in groups.items():
        idx = np.asarray(idx, dtype=np.intp)
        _load_arrays(agg, ka[idx], ia[idx], va[idx], kind, ns)


cdef _build_fast_run(Aggregate agg, cnp.ndarray karr, cnp.ndarray vs, Py_ssize_t a,
                     Py_ssize_t b, int kind, namespace):
    """Build one empty namespace from the FAST keys karr[a:b] (sorted here)."""
    cdef _Tree tree = _new_tree(agg._node_size, kind)
    cdef uint64_t bad = 0
    cdef agg_key *kp = (<agg_key *>cnp.PyArray_DATA(karr)) + a
    cdef agg_status st = agg_tree_build_unsorted(
        _tt(tree), kp, (<double *>cnp.PyArray_DATA(vs)) + a, <uint64_t>(b - a), &bad)
    if st == AGG_DUPLICATE:
        _raise_item_fast(E_TWICE_INSERT, kind, kp[bad], namespace)
    _raise_status(st, None, None, namespace)
    agg._trees[namespace] = tree


cdef _load_arrays(Aggregate agg, cnp.ndarray ka, cnp.ndarray ia, cnp.ndarray va, int kind,
                  namespace):
    """Bulk-load one empty namespace from validated arrays."""
    cdef _Tree tree
    cdef agg_tree *t
    cdef agg_status st
    cdef uint64_t bad = 0
    cdef Py_ssize_t n = len(ka)
    cdef cnp.ndarray karr, vs
    cdef agg_key *kp
    cdef double *vp
    if n == 0:
        return
    if kind == K_GENERAL:
        _load_items(agg, zip(ka.tolist(), ia.tolist(), va.tolist()), namespace)
        return
    # The C core sorts (radix) and builds in one call; no numpy sort.
    karr, vs = _fast_batch(ka, ia, va)
    tree = _new_tree(agg._node_size, kind)
    kp = <agg_key *>cnp.PyArray_DATA(karr)
    vp = <double *>cnp.PyArray_DATA(vs)
    t = _tt(tree)            # a new tree, seen by no other thread yet
    with nogil:
        st = agg_tree_build_unsorted(t, kp, vp, <uint64_t>n, &bad)
    if st == AGG_DUPLICATE:
        _raise_item_fast(E_TWICE_INSERT, kind, kp[bad], namespace)
    _raise_status(st, None, None, namespace)
    agg._trees[namespace] = tree


cdef _load_items(Aggregate agg, items, namespace):
    """Bulk-load one empty namespace from Python (key, id, value) triples in
    any order (pickling, the general path of from_arrays)."""
    cdef list its = list(items)
    cdef Py_ssize_t n = len(its), j
    cdef double d
    cdef int64_t i
    cdef int kind = -1, k
    cdef _Tree tree
    if agg._tree(namespace) is not None:
        raise ValueError("_load_items needs an empty namespace")
    if n == 0:
        return
    hs = [0] * n
    for j in range(n):
        it = its[j]
        k = _item_kind(it[0], it[1], &d, &i)
        if kind == -1:
            kind = k
        elif k != kind:
            kind = K_GENERAL
        if kind == K_GENERAL:
            break
        hs[j] = (agg_f64_to_key(d), agg_i64_to_key(i))
    if kind != K_GENERAL:
        order = sorted(range(n), key=hs.__getitem__)
        ka = (np.zeros(n, dtype=np.float64) if kind == K_NONE else
              np.array([its[j][0] for j in order], dtype=np.float64))
        ia = np.array([its[j][1] for j in order], dtype=np.int64)
        va = np.array([_value(its[j][2]) for j in order], dtype=np.float64)
        _load_arrays(agg, ka, ia, va, kind, namespace)
        return
    # General keys: sort by full encoding; a repeated ordered part (the
    # same item spelt 1 and 1.0) is a duplicate.
    rows = []
    for it in its:
        rows.append((_encode_item_bytes(it[0], it[1]), _encode_item_ordered(it[0], it[1]),
                     _value(it[2]), it))
    rows.sort(key=lambda r: r[0])
    for j in range(1, n):
        if rows[j][1] == rows[j - 1][1]:
            it = rows[j][3]
            raise _item_error(E_TWICE_INSERT, it[0], it[1], namespace)
    vals = np.array([r[2] for r in rows], dtype=np.float64)
    tree = _new_tree(agg._node_size, K_GENERAL)
    _build_from_sorted_general(tree, [r[0] for r in rows],
                               [_meta_len(len(r[0]) - len(r[1])) for r in rows],
                               <double *>cnp.PyArray_DATA(vals), namespace)
    agg._trees[namespace] = tree


cdef _insert_many(Aggregate agg, keys, ids, values, namespace):
    """insert_many (the caller holds the write lock)."""
    ka, ia, va, kind = _item_arrays(keys, ids, values)
    cdef Py_ssize_t n = len(ka)
    cdef _Tree tree = agg._tree(namespace)
    cdef cnp.ndarray karr, vs
    cdef agg_key *kp
    cdef double *vp
    cdef agg_tree *t
    cdef agg_status st = AGG_OK
    cdef uint64_t bad = 0
    if n == 0:
        return
    if kind == K_GENERAL or (tree is not None and tree.kind != kind):
        _insert_many_slow(agg, list(zip(_key_list(ka, kind), ia.tolist(), va.tolist())),
                          namespace)
        return
    if tree is None:
        _load_arrays(agg, ka, ia, va, kind, namespace)
        return
    karr, vs = _fast_batch(ka, ia, va)
    kp = <agg_key *>cnp.PyArray_DATA(karr)
    vp = <double *>cnp.PyArray_DATA(vs)
    with nogil:
        st = agg_keys_sort(kp, vp, <uint64_t>n)
    _raise_status(st, None, None, namespace)
    # One ordered pass through the tree, all or nothing.  The keys are
    # sorted, so the core's order check (AGG_INVALID at the first i with
    # keys[i - 1] >= keys[i]) finds a pair repeated in the batch.
    # Without the GIL: readers of this namespace wait in _tt (the
    # aggregate's lock, held here, keeps out every other writer and the
    # vectorised readers), so none sees a half-applied batch.
    t = _bulk_begin(tree)
    if t != NULL:
        with nogil:
            st = agg_tree_insert_sorted(t, kp, vp, <uint64_t>n, &bad)
        _bulk_end(tree)
    else:
        st = agg_tree_insert_sorted(_tt(tree), kp, vp, <uint64_t>n, &bad)
    if st == AGG_INVALID:
        _raise_item_fast(E_TWICE_INSERT, kind, kp[bad], namespace)
    if st == AGG_DUPLICATE:
        _raise_item_fast(E_EXISTS, kind, kp[bad], namespace)
    _raise_status(st, None, None, namespace)


cdef _insert_many_slow(Aggregate agg, list items, object namespace):
    """insert_many for general keys: validate all, insert, roll back on
    failure (the caller holds the write lock)."""
    cdef bint ex
    seen = set()
    vals = []
    for it in items:
        enc = _encode_item_ordered(it[0], it[1])
        if enc in seen:
            raise _item_error(E_TWICE_INSERT, it[0], it[1], namespace)
        seen.add(enc)
        vals.append(_value(it[2]))
        if agg._exists(it[0], it[1], namespace):
            raise _item_error(E_EXISTS, it[0], it[1], namespace)
    done = 0
    try:
        for it, v in zip(items, vals):
            agg._insert(it[0], it[1], v, namespace, False, &ex)
            done += 1
    except BaseException:
        for it in items[:done]:
            agg._delete(it[0], it[1], namespace, False)
        raise


cdef _delete_many(Aggregate agg, keys, ids, namespace):
    """delete_many (the caller holds the write lock)."""
    ka, ia, _, kind = _item_arrays(keys, ids, None)
    cdef Py_ssize_t n = len(ka), j
    cdef _Tree tree = agg._tree(namespace)
    cdef cnp.ndarray karr
    cdef agg_key *kp
    cdef agg_tree *t
    cdef agg_status st
    cdef uint64_t bad = 0
    if n == 0:
        return
    if tree is None or kind == K_GENERAL or tree.kind == K_GENERAL or tree.kind != kind:
        items = list(zip(_key_list(ka, kind), ia.tolist()))
        seen = set()
        for it in items:
            enc = _encode_item_ordered(it[0], it[1])
            if enc in seen:
                raise _item_error(E_TWICE_DELETE, it[0], it[1], namespace)
            if not agg._exists(it[0], it[1], namespace):
                raise _item_error(E_MISSING, it[0], it[1], namespace)
            seen.add(enc)
        for it in items:
            agg._delete(it[0], it[1], namespace, True)
        return
    karr = _fast_key_array(np.ascontiguousarray(ka, dtype=np.float64),
                           np.ascontiguousarray(ia, dtype=np.int64))
    kp = <agg_key *>cnp.PyArray_DATA(karr)
    with nogil:
        st = agg_keys_sort(kp, NULL, <uint64_t>n)
    if st == AGG_NOMEM:
        # Deletes never need the core's memory: sort with numpy instead.
        karr = np.ascontiguousarray(karr[np.lexsort((karr[:, 1], karr[:, 0]))])
        kp = <agg_key *>cnp.PyArray_DATA(karr)
    for j in range(1, n):
        if kp[j - 1].head == kp[j].head and kp[j - 1].rest == kp[j].rest:
            _raise_item_fast(E_TWICE_DELETE, tree.kind, kp[j], namespace)
    # Without the GIL, as in _insert_many.
    t = _bulk_begin(tree)
    if t != NULL:
        with nogil:
            st = agg_tree_delete_sorted(t, kp, <uint64_t>n, &bad)
        _bulk_end(tree)
    else:
        st = agg_tree_delete_sorted(_tt(tree), kp, <uint64_t>n, &bad)
    if st == AGG_MISSING:
        _raise_item_fast(E_MISSING, tree.kind, kp[bad], namespace)
    _raise_status(st, None, None, namespace)
    agg._drop_if_empty(namespace, tree)


cdef tuple _bound_ranks(_Tree tree, lowers, uppers, object lower_inclusive,
                        object upper_inclusive):
    """(lo, hi) int64 arrays of the ranges [lowers[i], uppers[i]] (the
    caller holds the aggregate's lock)."""
    if not isinstance(lower_inclusive, bool) or not isinstance(upper_inclusive, bool):
        raise TypeError("lower_inclusive and upper_inclusive must be bools")
    la = _as_1d(lowers, "lowers")
    ua = _as_1d(uppers, "uppers")
    if len(la) != len(ua):
        raise ValueError(f"lowers and uppers must have equal lengths, got {len(la)} and {len(ua)}")
    n = len(la)
    lf = _bound_array(la, "lowers")
    uf = _bound_array(ua, "uppers")
    if tree is None or lf is None or uf is None or tree.kind == K_GENERAL or tree.kind == K_NONE:
        # Key by key, as Python objects: a numeric array's elements
        # become Python numbers, an object array's (or a mixed list's)
        # stay what they are and are checked like any key (so a stray
        # np.float32 in a list is a TypeError, as for count()).
        la = la.tolist()
        ua = ua.tolist()
        los = np.empty(n, dtype=np.int64)
        his = np.empty(n, dtype=np.int64)
        for j in range(n):
            l = la[j]; u = ua[j]
            if tree is None:
                _validate_key(l); _validate_key(u)
                los[j] = 0; his[j] = 0
            else:
                los[j] = _gap(tree, l, None, False, not lower_inclusive)
                his[j] = max(_gap(tree, u, None, False, upper_inclusive), los[j])
        return los, his
    return _rank_pairs(tree, lf, uf, lower_inclusive, upper_inclusive)


cdef object _sum_many(_Tree tree, lowers, uppers, object lower_inclusive,
                      object upper_inclusive):
    """sum_many (the caller holds the aggregate's lock)."""
    cdef cnp.ndarray lo, hi
    lo, hi = _bound_ranks(tree, lowers, uppers, lower_inclusive, upper_inclusive)
    cdef Py_ssize_t n = len(lo), j
    cdef cnp.ndarray out = np.zeros(n, dtype=np.float64)
    cdef double *op = <double *>cnp.PyArray_DATA(out)
    cdef int64_t *lp = <int64_t *>cnp.PyArray_DATA(lo)
    cdef int64_t *hp = <int64_t *>cnp.PyArray_DATA(hi)
    cdef const agg_tree *t
    if tree is None or n == 0:
        return out
    t = _tt(tree)
    with nogil:
        for j in range(n):
            if hp[j] > lp[j]:
                op[j] = agg_tree_sum(t, <uint64_t>lp[j], <uint64_t>hp[j])
    return out


cdef object _index_of_many(_Tree tree, keys, object order, object lower, object upper,
                           object eq, object prefix):
    """index_of_many (the caller holds the aggregate's lock)."""
    cdef uint64_t lo, hi
    desc = _order_desc(order)
    _range(tree, lower, upper, eq, prefix, &lo, &hi)
    ka = _as_1d(keys, "keys")
    kf = _bound_array(ka, "keys")
    if tree is None:
        if kf is None:
            for k in ka.tolist():
                _validate_key(k)
        return np.zeros(len(ka), dtype=np.int64)
    if kf is None or tree.kind == K_GENERAL or tree.kind == K_NONE:
        g = np.array([_gap(tree, k, None, False, desc) for k in ka.tolist()], dtype=np.int64)
    else:
        r1, r2 = _rank_pairs(tree, kf, kf, not desc, not desc)
        g = r1
    g = np.clip(g, lo, hi)
    return (hi - g) if desc else (g - lo)


cdef tuple _at_many(_Tree tree, offsets, object lower, object upper, object eq,
                    object prefix):
    """at_many (with the GIL held)."""
    cdef uint64_t lo, hi
    _range(tree, lower, upper, eq, prefix, &lo, &hi)
    oa = _as_1d(offsets, "offsets")
    n = hi - lo
    if len(oa) == 0:
        return _empty_arrays(tree)
    if oa.dtype.kind in "iub":
        offs = [int(o) for o in oa.tolist()]
    elif oa.dtype.kind == "O":
        try:
            offs = [_operator.index(o) for o in oa.tolist()]
        except TypeError:
            raise TypeError("offsets must be integers") from None
    else:
        raise TypeError(f"offsets must be integers, not {oa.dtype}")
    pos = np.empty(len(offs), dtype=np.int64)
    for j, o in enumerate(offs):
        if o < 0:
            o += n
        if o < 0 or o >= n:
            raise IndexError(f"offset {offs[j]} out of range for {n} items")
        pos[j] = lo + o
    return _select_arrays(tree, pos)


cdef tuple _to_arrays(_Tree tree, object lower, object upper, object eq, object prefix):
    """to_arrays (the caller holds the aggregate's lock)."""
    cdef uint64_t lo, hi
    _range(tree, lower, upper, eq, prefix, &lo, &hi)
    if hi == lo:
        return _empty_arrays(tree)
    return _read_arrays(tree, lo, hi - lo)


# ------------------------------------------------------ array helpers --

cdef list _key_list(ka, int kind):
    """Python keys of a converted key array (K_NONE arrays hold 0.0 for None)."""
    if kind == K_NONE:
        return [None] * len(ka)
    return ka.tolist()


cdef tuple _item_arrays(keys, ids, values):
    """Validate and convert item arrays: (keys, ids, values, kind).

    kind is K_FLOAT / K_INT when keys and ids can take the FAST path, else
    K_GENERAL (object arrays, per-item encoding).  Any iterable is accepted;
    a str / bytes / scalar is not."""
    ka = _as_1d(keys, "keys")
    ia = _as_1d(ids, "ids")
    if values is not None:
        values = _as_1d(values, "values")
    if ka.ndim != 1 or ia.ndim != 1:
        raise ValueError(f"keys and ids must be 1-D, got shapes {ka.shape} and {ia.shape}")
    n = len(ka)
    if len(ia) != n:
        raise ValueError(f"keys has {n} entries but ids has {len(ia)}")
    if values is None:
        va = np.zeros(n, dtype=np.float64)
    else:
        va = np.asarray(values)
        if va.ndim != 1 or len(va) != n:
            raise ValueError(f"values must be 1-D with {n} entries, got shape {va.shape}")
        if va.dtype.kind not in "fiub":
            if va.dtype.kind == "O":
                va = np.array([_value(v) for v in va.tolist()], dtype=np.float64)
            else:
                raise TypeError(f"values must be numbers, not {va.dtype}")
        va = np.ascontiguousarray(va, dtype=np.float64)
        if n and not np.isfinite(va).all():
            raise ValueError("values must be finite (no NaN or infinity)")
    kk = ka.dtype.kind
    ik = ia.dtype.kind
    if kk in "cmMV" or ik in "cmMV":
        raise TypeError(f"unsupported array dtype for keys/ids: {ka.dtype} / {ia.dtype}")
    kind = K_GENERAL
    if kk == "f":
        ka = ka.astype(np.float64, copy=False)
        if n and np.isnan(ka).any():
            raise ValueError("keys must not contain NaN")
        kind = K_FLOAT
    elif kk in "iu":
        if n and (ka.max() > 9007199254740992 or ka.min() < -9007199254740992):
            ka = ka.astype(object)
        else:
            ka = ka.astype(np.int64, copy=False)
            kind = K_INT
    elif kk == "O" and n and all(k is None for k in ka.tolist()):
        ka = np.zeros(n, dtype=np.float64)
        kind = K_NONE
    else:
        ka = ka.astype(object, copy=False)
    if ik in "iu" and not (ik == "u" and n and ia.max() > 9223372036854775807):
        ia = ia.astype(np.int64, copy=False)
    else:
        ia = ia.astype(object, copy=False)
        kind = K_GENERAL
    if kind == K_GENERAL:
        if ka.dtype.kind == "f" and kk == "O":      # all-None keys, general ids
            ka = np.full(n, None, dtype=object)
        ka = ka.astype(object, copy=False)
        ia = ia.astype(object, copy=False)
    return ka, ia, va, kind


cdef object _as_1d(x, str what):
    """A 1-D ndarray from an array-like or any iterable (tuples inside a
    sequence stay single elements: tuple keys are keys)."""
    if isinstance(x, np.ndarray):
        a = x
    elif isinstance(x, (dict, set, frozenset)):
        raise TypeError(f"{what} must be an ordered sequence or array, not {type(x).__name__}")
    elif isinstance(x, (str, bytes, bytearray)) or not hasattr(x, "__iter__"):
        raise TypeError(f"{what} must be an array or an iterable, not {type(x).__name__}")
    else:
        # Only all-float or all-int lists become numeric arrays: numpy would
        # otherwise coerce mixed lists (1 and "a" both to str, say).
        xs = list(x)
        a = None
        if xs and all(type(v) is float for v in xs):
            a = np.array(xs, dtype=np.float64)
        elif xs and all(type(v) is int for v in xs):
            try:
                a = np.array(xs, dtype=np.int64)
            except OverflowError:
                a = None
        elif not xs:
            a = np.empty(0, dtype=np.float64)
        if a is None:
            a = np.empty(len(xs), dtype=object)
            for j in range(len(xs)):
                a[j] = xs[j]
    if a.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
    return a


cdef Py_ssize_t _HUGE_PAGE = 1 << 21


cdef cnp.ndarray _scratch(Py_ssize_t nbytes):
    """An uninitialised uint8 array of nbytes for a batch's keys and values.
    From 1 MiB it lies on whole 2 MiB pages advised for huge pages
    (agg_advise_huge_pages), as numpy lays its own arrays from 4 MiB: the
    first batch's key and value arrays after a bulk build otherwise cost
    ~600 page faults per 10^5 items, the most of that batch's extra time
    (bench/README.md).  The pages past the array are never touched, so
    they cost address space only."""
    cdef Py_ssize_t span, off
    if nbytes < (1 << 20):
        return np.empty(nbytes, dtype=np.uint8)
    span = (nbytes + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    raw = np.empty(span + _HUGE_PAGE, dtype=np.uint8)
    off = (-<Py_ssize_t>cnp.PyArray_DATA(raw)) & (_HUGE_PAGE - 1)
    agg_advise_huge_pages(<char *>cnp.PyArray_DATA(raw) + off, <size_t>span)
    return raw[off:off + nbytes]


cdef cnp.ndarray _key_scratch(Py_ssize_t n):
    """An uninitialised (n, 2) uint64 array of agg_keys (_scratch)."""
    return _scratch(16 * n).view(np.uint64).reshape(n, 2)


cdef tuple _fast_batch(ka, ia, va):
    """(keys, values) of a FAST batch, ready for agg_keys_sort: the
    agg_key array of float keys ka and int ids ia, and a float64 copy of
    va, in one scratch block."""
    cdef Py_ssize_t n = len(ka)
    cdef cnp.ndarray buf = _scratch(24 * n)
    cdef cnp.ndarray vs = buf[16 * n:].view(np.float64)
    karr = _fast_key_array(np.ascontiguousarray(ka, dtype=np.float64),
                           np.ascontiguousarray(ia, dtype=np.int64),
                           buf[:16 * n].view(np.uint64).reshape(n, 2))
    vs[:] = va
    return karr, vs


cdef cnp.ndarray _fast_key_array(cnp.ndarray ks, cnp.ndarray iss, cnp.ndarray out=None):
    """agg_key array (as a uint64 (n, 2) array) from float64 keys and int64
    ids, written into ``out`` (n, 2 uint64, C-contiguous) or a new one."""
    cdef Py_ssize_t n = len(ks)
    if out is None:
        out = _key_scratch(n)
    cdef agg_key *kp = <agg_key *>cnp.PyArray_DATA(out)
    cdef double *dp = <double *>cnp.PyArray_DATA(ks)
    cdef int64_t *ip = <int64_t *>cnp.PyArray_DATA(iss)
    with nogil:
        agg_fast_keys(dp, ip, kp, <uint64_t>n)
    return out


cdef object _bound_array(a, str what):
    """A contiguous float64 copy of a numeric bound array, or None when the
    values must go through the per-item path (objects, huge ints)."""
    kind = a.dtype.kind
    if kind == "f":
        f = np.ascontiguousarray(a, dtype=np.float64)
        if len(f) and np.isnan(f).any():
            raise ValueError(f"{what} must not contain NaN")
        return f
    if kind in "iu":
        if len(a) and (a.max() > 9007199254740992 or a.min() < -9007199254740992):
            return None
        return np.ascontiguousarray(a, dtype=np.float64)
    if kind in "cmMV":
        raise TypeError(f"unsupported dtype for {what}: {a.dtype}")
    return None


cdef tuple _rank_pairs(_Tree tree, cnp.ndarray lf, cnp.ndarray uf,
                       bint lower_inclusive, bint upper_inclusive):
    """Ranks of [lf[i], uf[i]] ranges in a FAST tree, GIL released (the
    caller holds the aggregate's lock)."""
    cdef Py_ssize_t n = len(lf), j
    cdef cnp.ndarray lk = _key_scratch(n)
    cdef cnp.ndarray uk = _key_scratch(n)
    cdef cnp.ndarray lo = np.empty(n, dtype=np.int64)
    cdef cnp.ndarray hi = np.empty(n, dtype=np.int64)
    cdef agg_key *lkp = <agg_key *>cnp.PyArray_DATA(lk)
    cdef agg_key *ukp = <agg_key *>cnp.PyArray_DATA(uk)
    cdef double *lp = <double *>cnp.PyArray_DATA(lf)
    cdef double *up = <double *>cnp.PyArray_DATA(uf)
    cdef int64_t *lop = <int64_t *>cnp.PyArray_DATA(lo)
    cdef int64_t *hip = <int64_t *>cnp.PyArray_DATA(hi)
    # lower inclusive: before (d, min id); exclusive: after (d, max id).
    # upper inclusive: after (d, max id); exclusive: before (d, min id).
    cdef uint64_t lrest = _ID_MIN if lower_inclusive else _ID_MAX
    cdef uint64_t urest = _ID_MAX if upper_inclusive else _ID_MIN
    cdef const agg_tree *t = _tt(tree)
    with nogil:
        for j in range(n):
            lkp[j].head = agg_f64_to_key(lp[j] + 0.0)
            lkp[j].rest = lrest
            ukp[j].head = agg_f64_to_key(up[j] + 0.0)
            ukp[j].rest = urest
        _rank_many_sorted(t, lkp, n, not lower_inclusive, <uint64_t *>lop)
        _rank_many_sorted(t, ukp, n, upper_inclusive, <uint64_t *>hip)
        for j in range(n):
            if hip[j] < lop[j]:
                hip[j] = lop[j]
    return lo, hi


cdef void _rank_many_sorted(const agg_tree *t, const agg_key *keys, Py_ssize_t n,
                            int after, uint64_t *out) noexcept nogil:
    """out[i] = rank(keys[i]) for keys sharing one `rest`, visiting them in
    sorted order so that consecutive descents share their path (the core's
    rank_many reuses it).  Small or already sorted batches, or a failed
    allocation, take the plain loop in input order."""
    cdef Py_ssize_t j
    cdef agg_key *sk
    cdef uint64_t *idx
    cdef uint64_t *r
    cdef bint sorted_already = True
    for j in range(1, n):
        if keys[j].head < keys[j - 1].head:
            sorted_already = False
            break
    if sorted_already or n < 2048:
        agg_tree_rank_many(t, keys, <uint64_t>n, after, out)
        return
    sk = <agg_key *>malloc(n * sizeof(agg_key))
    idx = <uint64_t *>malloc(n * sizeof(uint64_t))
    r = <uint64_t *>malloc(n * sizeof(uint64_t))
    if sk == NULL or idx == NULL or r == NULL:
        free(sk); free(idx); free(r)
        agg_tree_rank_many(t, keys, <uint64_t>n, after, out)
        return
    # Sort (head, original index) with the core's radix sort, rank the
    # sorted heads with the shared `rest`, scatter the ranks back.
    for j in range(n):
        sk[j].head = keys[j].head
        sk[j].rest = <uint64_t>j
    if agg_keys_sort(sk, NULL, <uint64_t>n) != AGG_OK:
        free(sk); free(idx); free(r)
        agg_tree_rank_many(t, keys, <uint64_t>n, after, out)
        return
    for j in range(n):
        idx[j] = sk[j].rest
        sk[j].rest = keys[0].rest
    agg_tree_rank_many(t, sk, <uint64_t>n, after, r)
    for j in range(n):
        out[idx[j]] = r[j]
    free(sk); free(idx); free(r)


cdef tuple _empty_arrays(_Tree tree):
    if tree is None or tree.kind == K_FLOAT:
        return (np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64),
                np.empty(0, dtype=np.float64))
    if tree.kind == K_INT:
        return (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64),
                np.empty(0, dtype=np.float64))
    if tree.kind == K_NONE:
        return (np.empty(0, dtype=object), np.empty(0, dtype=np.int64),
                np.empty(0, dtype=np.float64))
    return (np.empty(0, dtype=object), np.empty(0, dtype=object),
            np.empty(0, dtype=np.float64))


cdef tuple _read_arrays(_Tree tree, uint64_t start, uint64_t n):
    """keys, ids, values arrays of items start .. start+n-1 (the caller
    holds the aggregate's lock)."""
    cdef cnp.ndarray karr = _key_scratch(n)
    cdef cnp.ndarray vals = np.empty(n, dtype=np.float64)
    cdef agg_key *kp = <agg_key *>cnp.PyArray_DATA(karr)
    cdef double *vp = <double *>cnp.PyArray_DATA(vals)
    cdef const agg_tree *t
    if tree.kind == K_GENERAL:
        items = _read_items(tree, start, n, False)
        return (_obj_array([it[0] for it in items]), _obj_array([it[1] for it in items]),
                np.array([it[2] for it in items], dtype=np.float64))
    t = _tt(tree)
    with nogil:
        agg_tree_read(t, start, n, 0, kp, vp)
    return _split_fast_keys(tree, karr) + (vals,)


cdef tuple _split_fast_keys(_Tree tree, cnp.ndarray karr):
    cdef Py_ssize_t n = karr.shape[0], j
    cdef agg_key *kp = <agg_key *>cnp.PyArray_DATA(karr)
    cdef cnp.ndarray keys = np.empty(n, dtype=np.float64)
    cdef cnp.ndarray ids = np.empty(n, dtype=np.int64)
    cdef double *dp = <double *>cnp.PyArray_DATA(keys)
    cdef int64_t *ip = <int64_t *>cnp.PyArray_DATA(ids)
    with nogil:
        for j in range(n):
            dp[j] = agg_key_to_f64(kp[j].head)
            ip[j] = agg_key_to_i64(kp[j].rest)
    if tree.kind == K_INT:
        keys = keys.astype(np.int64)
    elif tree.kind == K_NONE:
        keys = np.full(n, None, dtype=object)
    return (keys, ids)


cdef tuple _select_arrays(_Tree tree, cnp.ndarray pos):
    cdef Py_ssize_t n = len(pos), j
    cdef cnp.ndarray karr = _key_scratch(n)
    cdef cnp.ndarray vals = np.empty(n, dtype=np.float64)
    cdef agg_key *kp = <agg_key *>cnp.PyArray_DATA(karr)
    cdef double *vp = <double *>cnp.PyArray_DATA(vals)
    cdef int64_t *pp = <int64_t *>cnp.PyArray_DATA(pos)
    if tree.kind == K_GENERAL:
        items = [_read_items(tree, <uint64_t>p, 1, False)[0] for p in pos.tolist()]
        return (_obj_array([it[0] for it in items]), _obj_array([it[1] for it in items]),
                np.array([it[2] for it in items], dtype=np.float64))
    for j in range(n):
        agg_tree_select(_tt(tree), <uint64_t>pp[j], &kp[j], &vp[j])
    return _split_fast_keys(tree, karr) + (vals,)


cdef object _obj_array(list xs):
    cdef Py_ssize_t j
    out = np.empty(len(xs), dtype=object)
    for j in range(len(xs)):
        out[j] = xs[j]
    return out
