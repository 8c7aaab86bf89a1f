# _trees.pxi - tree access for aggtree._core (included by _core.pyx).
#
# A _Tree is one namespace: one C tree and its key kind.  Its C tree is
# reached through two accessors only, which is what makes the bulk writes'
# GIL release safe (see "Threads" in _core.pyx):
#   _tt(tree)            the C tree for a call made with the GIL held (it
#                        waits until a bulk write of this tree has ended);
#                        the pointer also serves a loop that then releases
#                        the GIL while holding the aggregate's lock, since
#                        every writer needs that lock;
#   _bulk_begin(tree) / _bulk_end(tree)
#                        around a bulk write made without the GIL (the caller
#                        holds the aggregate's lock).
# The raw pointer, _Tree._t_raw_use_tt, is touched by this file alone
# (grep for it); everything else calls the accessors.
#
# Also here: creating a tree, reading items out of it, building a GENERAL
# tree from sorted encodings, widening a FAST tree to GENERAL, and finding an
# item whatever the spelling of its key (_find).

# ---------------------------------------------------------------- trees --

cdef class _Tree:
    """One namespace: owns one C tree and remembers its key kind.

    A bulk write (insert_many / delete_many on FAST keys) changes the C tree
    with the GIL released.  It sets ``busy`` and holds ``busy_lock`` while it
    does, so code holding the GIL reaches the C tree only through
    ``_tt(tree)``, which waits for such a write to end (_core.pyx,
    "Threads").  Attributes: _core.pxd."""

    def __dealloc__(self):
        if self._t_raw_use_tt != NULL:
            agg_tree_free(self._t_raw_use_tt)
            self._t_raw_use_tt = NULL
        if self.busy_lock != NULL:
            PyThread_free_lock(self.busy_lock)
            self.busy_lock = NULL


cdef inline agg_tree *_tt(_Tree tree) noexcept:
    """Accessor 1: the C tree of `tree`, once no bulk write is changing it,
    for a C call made with the GIL held.  Call it right at the C call, with
    no Python code in between (so no bulk write can start in between); a
    loop that holds the aggregate's lock may take the pointer here and then
    release the GIL (no writer runs without that lock)."""
    if tree.busy:
        _wait_bulk(tree)
    return tree._t_raw_use_tt


cdef void _wait_bulk(_Tree tree) noexcept:
    # The write holds busy_lock until it has cleared busy (with the GIL), so
    # taking and dropping the lock without the GIL waits exactly for it.
    while tree.busy:
        with nogil:
            PyThread_acquire_lock(tree.busy_lock, WAIT_LOCK)
            PyThread_release_lock(tree.busy_lock)


cdef agg_tree *_bulk_begin(_Tree tree) noexcept:
    """Accessor 2: the C tree of `tree` for a bulk write about to release
    the GIL (the caller holds the aggregate's write lock), marked busy until
    _bulk_end(tree), which the caller must call once the write is over, with
    the GIL again.  NULL if the lock for waiters cannot be allocated: the
    caller then writes with the GIL held, through _tt."""
    if tree.busy_lock == NULL:
        tree.busy_lock = PyThread_allocate_lock()
        if tree.busy_lock == NULL:
            return NULL
    if not PyThread_acquire_lock(tree.busy_lock, 0):
        # a waiter of the previous bulk write is taking and dropping it
        with nogil:
            PyThread_acquire_lock(tree.busy_lock, WAIT_LOCK)
    tree.busy = 1
    return tree._t_raw_use_tt


cdef void _bulk_end(_Tree tree) noexcept:
    """End the bulk write begun by _bulk_begin(tree) (GIL held)."""
    tree.busy = 0
    PyThread_release_lock(tree.busy_lock)


cdef _Tree _new_tree(uint32_t node_size, int kind):
    """A new, empty tree for keys of `kind` (MemoryError if out of memory)."""
    cdef _Tree tree = _Tree.__new__(_Tree)
    cdef agg_status st = agg_tree_new(&tree._t_raw_use_tt, node_size,
                                      AGG_KEYS_GENERAL if kind == K_GENERAL else AGG_KEYS_FAST)
    _raise_status(st, None, None, None)
    tree.kind = kind
    return tree


cdef object _item_at(_Tree tree, agg_key k, double v):
    """The Item for a key read from `tree`."""
    cdef object key, id
    if tree.kind == K_FLOAT:
        return _mk_item(agg_key_to_f64(k.head), PyLong_FromLongLong(agg_key_to_i64(k.rest)), v)
    if tree.kind == K_INT:
        return _mk_item(PyLong_FromLongLong(<long long>agg_key_to_f64(k.head)),
                        PyLong_FromLongLong(agg_key_to_i64(k.rest)), v)
    if tree.kind == K_NONE:
        return _mk_item(None, PyLong_FromLongLong(agg_key_to_i64(k.rest)), v)
    key, id = _decode_general(k)
    return _mk_item(key, id, v)


cdef list _read_items(_Tree tree, uint64_t start, uint64_t n, bint desc):
    """Up to n Items from index start (ascending, or descending)."""
    cdef agg_key stack_keys[64]
    cdef double stack_vals[64]
    cdef agg_key *keys = stack_keys
    cdef double *vals = stack_vals
    cdef uint64_t got, j
    cdef list out = []
    if n == 0:
        return out
    if n > 64:
        keys = <agg_key *>malloc(n * sizeof(agg_key))
        vals = <double *>malloc(n * sizeof(double))
        if keys == NULL or vals == NULL:
            free(keys); free(vals)
            raise MemoryError()
    try:
        got = agg_tree_read(_tt(tree), start, n, desc, keys, vals)
        for j in range(got):
            out.append(_item_at(tree, keys[j], vals[j]))
    finally:
        if keys != stack_keys:
            free(keys)
            free(vals)
    return out


cdef int _build_from_sorted_general(_Tree tree, list encs, list metas, double *vals,
                                    object namespace) except -1:
    """Bulk-build an empty GENERAL tree of `namespace` from sorted full
    encodings (metas[i]: signature bytes at the end of encs[i] that compare
    as nothing); DuplicateItemError if two name one item."""
    cdef Py_ssize_t n = len(encs), j, total = 0, off = 0, m
    cdef agg_key *keys = NULL
    cdef uint8_t *arena = NULL
    cdef const unsigned char *p
    cdef agg_tail *tl
    cdef bytes e
    cdef uint64_t bad = 0
    cdef agg_status st
    for e in encs:
        m = len(e)
        if m > 8:
            total += (sizeof(agg_tail) + m - 8 + 7) & ~7
    keys = <agg_key *>malloc((n if n > 0 else 1) * sizeof(agg_key))
    arena = <uint8_t *>malloc(total if total > 0 else 8)
    if keys == NULL or arena == NULL:
        free(keys); free(arena)
        raise MemoryError()
    try:
        for j in range(n):
            e = <bytes>encs[j]
            m = len(e)
            p = <const unsigned char *>(<char *>e)
            tl = <agg_tail *>(arena + off)
            if m - 8 > <Py_ssize_t>AGG_TAIL_MAX_LEN:
                raise ValueError(f"key too large: its encoding takes {m} bytes (limit 16 MiB)")
            keys[j] = agg_key_from_item_bytes(p, <size_t>m, <size_t>(<Py_ssize_t>metas[j]), tl)
            if m > 8:
                off += (sizeof(agg_tail) + m - 8 + 7) & ~7
        st = agg_tree_build(_tt(tree), keys, vals, <uint64_t>n, &bad)
        if st == AGG_DUPLICATE or st == AGG_INVALID:
            key, id = kb_decode_item(<const unsigned char *>(<char *>encs[bad]), len(encs[bad]))
            raise _item_error(E_TWICE_INSERT, key, id, namespace)
        _raise_status(st, None, None, None)
    finally:
        free(keys)
        free(arena)
    return 0


cdef int _tree_to_general(_Tree tree) except -1:
    """Convert a FAST tree to GENERAL in place (same items, same order)."""
    cdef uint64_t n = agg_tree_len(_tt(tree)), j
    cdef list items
    cdef list encs = []
    cdef list metas = []
    cdef double *vals
    cdef agg_tree *fresh = NULL
    cdef agg_tree *old
    cdef _Tree tmp
    if tree.kind == K_GENERAL:
        return 0
    items = _read_items(tree, 0, n, False)
    vals = <double *>malloc((n if n > 0 else 1) * sizeof(double))
    if vals == NULL:
        raise MemoryError()
    try:
        for j in range(n):
            it = items[j]
            e, m = _encode_item_meta(it[0], it[1])
            encs.append(e)
            metas.append(m)
            vals[j] = it[2]
        tmp = _new_tree(agg_tree_node_size(_tt(tree)), K_GENERAL)
        _build_from_sorted_general(tmp, encs, metas, vals, None)
    finally:
        free(vals)
    old = _tt(tree)
    tree._t_raw_use_tt = tmp._t_raw_use_tt
    tree.kind = K_GENERAL
    tmp._t_raw_use_tt = old          # freed with tmp
    return 0


cdef int _find(_Tree tree, object key, object id, GKey *g,
               agg_key *stored, bint probe=True) except -1:
    """Nonzero if (key, id) is an item of `tree`, with a key that finds it
    in *stored: 2 when that key is the caller's own (built in `g`, valid
    while g lives), 1 when it is the tree's stored key (borrowed: valid
    until the next write); else 0.  Validates key and id
    either way (TypeError / ValueError).  `g` must be initialised; it is
    used as scratch.

    Items that compare equal are the same item whatever their types, so
    (1, 5), (1.0, 5) and (True, 5) all find one another: FAST trees
    translate the pair into their double domain, GENERAL trees search by
    the ordered encoding (without the type signature that follows it).

    With `probe` False the exact-key paths skip their lookup and return
    the key the item would have (a caller that deletes by it learns
    from the delete whether it was there: one descent instead of two)."""
    cdef double d, v
    cdef int64_t i
    cdef int pk, pi
    cdef agg_key k, sk
    cdef uint64_t r
    cdef Py_ssize_t olen, nsig
    cdef KeyBuf sig
    cdef uint8_t small[256]
    cdef uint8_t *buf = small
    cdef size_t n
    cdef int found = 0
    if tree is None:
        kb_put_item(&g.kb, key, id)          # validate only
        return 0
    if tree.kind != K_GENERAL:
        pk = _num_position(key, &d, tree.kind)
        pi = _id_position(id, &i)
        if pk != P_EXACT or pi != P_EXACT:
            return 0
        k = _fast_key(d, i)
        if probe and not agg_tree_get(_tt(tree), k, NULL):
            return 0
        stored[0] = k
        return 1
    kb_init(&sig)
    try:
        kb_put_value(&g.kb, key, &sig)
        kb_put_value(&g.kb, id, &sig)
        nsig = sig.len
        if nsig <= 255:
            # The core ignores the type signature: an exact lookup by
            # the full encoding finds the item however it was spelt.
            _kb_append(&g.kb, sig.data, nsig)
            k = gkey_finish(g, nsig)
            if probe and not agg_tree_get(_tt(tree), k, NULL):
                return 0
            stored[0] = k
            return 2
    finally:
        kb_free(&sig)
    olen = g.kb.len
    k = gkey_finish(g)
    r = agg_tree_rank(_tt(tree), k, 0)
    if r >= agg_tree_len(_tt(tree)):
        return 0
    agg_tree_select(_tt(tree), r, &sk, &v)
    n = agg_key_to_bytes(sk, small, sizeof(small))
    if n > sizeof(small):
        buf = <uint8_t *>malloc(n)
        if buf == NULL:
            raise MemoryError()
        agg_key_to_bytes(sk, buf, n)
    # The stored E must be our ordered pair plus its type signature: the
    # byte after it is a sig byte (0x01..0x03), head padding, or nothing.
    # 0xFF there would mean a longer pair that merely extends ours (an
    # escaped 0x00 inside a str / bytes id).
    if (n >= <size_t>olen and memcmp(buf, g.kb.data, olen) == 0
            and (n == <size_t>olen or buf[olen] != 0xFF)):
        stored[0] = sk
        found = 1
    if buf != small:
        free(buf)
    return found
