# _aggregate.pxi - the Aggregate class of aggtree._core (included by
# _core.pyx).
#
# Its attributes and cdef methods are declared in _core.pxd (with the
# contract of those other Cython modules may call).  Here: construction and
# the lock, namespace lookup, the per-item writes and reads, batches of
# queries, whole-object methods (len, check, pickling), and the array methods,
# whose cdef bodies are in _numpy.pxi.  Every public method states its
# meaning and cost; docs/API.md has the full contract.

cdef object _SAME = object()           # default of new_namespace=
_ALLOWED_QUERY_KEYS = frozenset(("namespace", "lower", "upper", "eq", "prefix"))
_ALLOWED_AT_KEYS = frozenset(("namespace", "lower", "upper", "eq", "prefix", "offset"))


cdef class Aggregate:
    """Items ``(key, id, value)`` in ``(key, id)`` order, per namespace, with
    O(log n) count, sum, rank and select over any key range.

    See docs/API.md for the full contract; every method's docstring states
    its meaning and cost (n = items in the namespace, B = node_size).

    >>> agg = Aggregate()
    >>> agg.insert(1.5, 1, 10.0); agg.insert(2.5, 2, 5.0)
    >>> agg.count(lower=2.0), agg.sum()
    (1, 15.0)
    """

    # (attributes and cdef method declarations: _core.pxd)

    def __cinit__(self):
        self._lock = PyThread_allocate_lock()
        if self._lock == NULL:
            raise MemoryError()
        self._trees = {}

    def __init__(self, node_size=64):
        if not isinstance(node_size, int) or isinstance(node_size, bool):
            raise TypeError(f"node_size must be an int, not {type(node_size).__name__}")
        if not (AGG_NODE_SIZE_MIN <= node_size <= AGG_NODE_SIZE_MAX):
            raise ValueError(
                f"node_size must be in [{AGG_NODE_SIZE_MIN}, {AGG_NODE_SIZE_MAX}], got {node_size}")
        if self._trees:
            raise RuntimeError("Aggregate.__init__ called twice")
        self._node_size = node_size

    def __dealloc__(self):
        if self._lock != NULL:
            PyThread_free_lock(self._lock)

    # -- locking (see "Threads" in _core.pyx) --

    cdef inline void _acquire(self) noexcept:
        """Take the aggregate's lock, re-entrantly for the thread that holds
        it: Python code called back from inside a method (a namespace's
        __hash__, a value's __float__, an rng) may use the aggregate again.
        Waiting happens without the GIL, so the holder can finish."""
        cdef unsigned long me = PyThread_get_thread_ident()
        if self._depth > 0 and self._owner == me:
            self._depth += 1
            return
        if not PyThread_acquire_lock(self._lock, 0):
            with nogil:
                PyThread_acquire_lock(self._lock, WAIT_LOCK)
        self._owner = me
        self._depth = 1

    cdef inline void _release(self) noexcept:
        self._depth -= 1
        if self._depth == 0:
            self._owner = 0
            PyThread_release_lock(self._lock)

    cdef inline void _wlock(self) noexcept:
        self._acquire()
        self._version += 1

    cdef inline void _wunlock(self) noexcept:
        self._release()

    # -- namespace lookup --

    cdef inline _Tree _tree(self, object namespace):
        cdef PyObject *p
        try:
            p = PyDict_GetItemWithError(self._trees, namespace)
        except TypeError:
            raise TypeError(f"namespace must be hashable, not {type(namespace).__name__}") from None
        if p == NULL:
            return None
        return <_Tree>p

    cdef _Tree _tree_for_insert(self, object namespace, int kind):
        """The tree of `namespace`, created or widened so it can take `kind`."""
        cdef _Tree tree = self._tree(namespace)
        if tree is None:
            tree = _new_tree(self._node_size, kind)
            self._trees[namespace] = tree
        elif tree.kind != kind and tree.kind != K_GENERAL:
            _tree_to_general(tree)
        return tree

    cdef inline void _drop_if_empty(self, object namespace, _Tree tree):
        if agg_tree_len(_tt(tree)) == 0:
            self._trees.pop(namespace, None)

    # ------------------------------------------------------------ writes --

    cdef int _insert(self, object key, object id, double v, object namespace,
                     bint overwrite, bint *existed) except -1:
        """Insert or (overwrite) upsert one validated value; see insert()."""
        cdef double d
        cdef int64_t i
        cdef int kind = _item_kind(key, id, &d, &i)
        cdef _Tree tree = self._tree(namespace)
        cdef GKey g, e
        cdef KeyBuf sig
        cdef agg_key k, sk
        cdef agg_status st
        cdef int ex = 0
        cdef bint created = tree is None
        gkey_init(&g)
        gkey_init(&e)
        kb_init(&sig)
        try:
            if kind == K_GENERAL or (tree is not None and tree.kind == K_GENERAL):
                # Full encoding E = ordered(key, id) + type signature; this is
                # also the validation of key and id.
                kb_put_value(&e.kb, key, &sig)
                kb_put_value(&e.kb, id, &sig)
                _kb_append(&e.kb, sig.data, sig.len)
            if tree is not None and ((tree.kind == K_GENERAL and sig.len > 255)
                                     or (tree.kind != K_GENERAL and kind != tree.kind)):
                # The pair may already be present under another spelling
                # (1 vs 1.0), which only a lookup by value can tell (GENERAL
                # trees tell it themselves when the signature is ignorable).
                if _find(tree, key, id, &g, &sk):
                    if not overwrite:
                        raise _item_error(E_EXISTS, key, id, namespace)
                    st = agg_tree_insert(_tt(tree), sk, v, 1, &ex, NULL)
                    _raise_status(st, key, id, namespace)
                    existed[0] = 1
                    return 0
            tree = self._tree_for_insert(namespace, kind)
            if tree.kind == K_GENERAL:
                if kind != K_GENERAL and e.kb.len == 0:
                    kb_put_value(&e.kb, key, &sig)
                    kb_put_value(&e.kb, id, &sig)
                    _kb_append(&e.kb, sig.data, sig.len)
                k = gkey_finish(&e, _meta_len(sig.len))
            else:
                k = _fast_key(d, i)
            st = agg_tree_insert(_tt(tree), k, v, overwrite, &ex, NULL)
            if st != AGG_OK and created:
                self._trees.pop(namespace, None)
            _raise_status(st, key, id, namespace)
        finally:
            gkey_free(&g)
            gkey_free(&e)
            kb_free(&sig)
        existed[0] = ex
        return 0

    cdef bint _delete(self, object key, object id, object namespace, bint must) except -1:
        """Delete (key, id); MissingItemError if absent and `must`."""
        cdef _Tree tree = self._tree(namespace)
        cdef GKey g, c
        cdef agg_key sk
        cdef agg_status st = AGG_MISSING
        cdef uint8_t small[256]
        cdef size_t n
        cdef int found
        gkey_init(&g)
        gkey_init(&c)
        try:
            found = _find(tree, key, id, &g, &sk, False)
            if found:
                if tree.kind == K_GENERAL and found == 1:
                    # Delete by a private copy of the stored key: the tree
                    # frees the stored tail while it deletes.
                    n = agg_key_to_bytes(sk, small, 0)
                    kb_reserve(&c.kb, <Py_ssize_t>n)
                    agg_key_to_bytes(sk, <uint8_t *>c.kb.data, n)
                    c.kb.len = <Py_ssize_t>n
                    sk = gkey_finish(&c)
                st = agg_tree_delete(_tt(tree), sk, NULL)
        finally:
            gkey_free(&g)
            gkey_free(&c)
        if st == AGG_MISSING:
            if must:
                _raise_status(st, key, id, namespace)
            return False
        _raise_status(st, key, id, namespace)
        self._drop_if_empty(namespace, tree)
        return True

    cdef bint _exists(self, object key, object id, object namespace) except -1:
        cdef GKey g
        cdef agg_key sk
        cdef int found
        gkey_init(&g)
        try:
            found = _find(self._tree(namespace), key, id, &g, &sk)
        finally:
            gkey_free(&g)
        return found

    def insert(self, key, id, value=0.0, *, namespace=None):
        """Insert item ``(key, id)`` with ``value``.

        Raises DuplicateItemError (a KeyError) if ``(key, id)`` exists in the
        namespace, TypeError / ValueError for a bad key, id, value or
        namespace; nothing changes then.  O(B log n)."""
        cdef bint ex
        cdef double v = _value(value)
        self._wlock()
        try:
            self._insert(key, id, v, namespace, False, &ex)
        finally:
            self._wunlock()

    def upsert(self, key, id, value=0.0, *, namespace=None):
        """Insert ``(key, id)``, or overwrite the value of the existing item.

        Returns True if a new item was inserted.  The idempotent form for
        backfills and sync hooks (Convex: insertIfDoesNotExist).  O(B log n)."""
        cdef bint ex
        cdef double v = _value(value)
        self._wlock()
        try:
            self._insert(key, id, v, namespace, True, &ex)
        finally:
            self._wunlock()
        return not ex

    def delete(self, key, id, *, namespace=None):
        """Delete item ``(key, id)``; MissingItemError if absent.  O(B log n)."""
        self._wlock()
        try:
            self._delete(key, id, namespace, True)
        finally:
            self._wunlock()

    def delete_if_exists(self, key, id, *, namespace=None):
        """Delete ``(key, id)`` if present; returns whether it was."""
        self._wlock()
        try:
            return self._delete(key, id, namespace, False)
        finally:
            self._wunlock()

    cdef object _replace(self, object key, object id, object new_key, object value,
                         object namespace, object new_namespace, bint must):
        """replace / replace_or_insert: validate all, then at most one step
        that can fail (the insert), then the delete, which cannot."""
        cdef double v = _value(value)
        cdef bint ex
        cdef bint old_exists
        cdef _Tree old_tree
        if new_namespace is _SAME:
            new_namespace = namespace
        old_tree = self._tree(namespace)
        self._tree(new_namespace)                       # hashable?
        _validate_key(new_key)
        old_exists = self._exists(key, id, namespace)
        if not old_exists and must:
            raise _item_error(E_MISSING, key, id, namespace)
        if (old_exists and old_tree is self._trees.get(new_namespace)
                and _encode_item_ordered(key, id) == _encode_item_ordered(new_key, id)):
            # The target is the item itself: only its value changes.
            self._insert(key, id, v, namespace, True, &ex)
            return True
        if self._exists(new_key, id, new_namespace) and must:
            raise _item_error(E_EXISTS, new_key, id, new_namespace)
        self._insert(new_key, id, v, new_namespace, True, &ex)
        if old_exists:
            self._delete(key, id, namespace, True)
        return old_exists

    def replace(self, key, id, new_key, value=0.0, *, namespace=None, new_namespace=_SAME):
        """Move item ``(key, id)`` to ``new_key`` (and optionally
        ``new_namespace``) with ``value``, atomically.

        MissingItemError if the item is absent, DuplicateItemError if the
        target exists (and is not the item itself).  O(B log n)."""
        self._wlock()
        try:
            self._replace(key, id, new_key, value, namespace, new_namespace, True)
        finally:
            self._wunlock()

    def replace_or_insert(self, key, id, new_key, value=0.0, *, namespace=None,
                          new_namespace=_SAME):
        """Idempotent replace: delete ``(key, id)`` if present, then upsert
        ``(new_key, id)`` in ``new_namespace``.  Returns True if the old item
        existed.  Atomic."""
        self._wlock()
        try:
            return self._replace(key, id, new_key, value, namespace, new_namespace, False)
        finally:
            self._wunlock()

    def clear(self, namespace=None):
        """Remove every item of one namespace (it then no longer exists)."""
        self._tree(namespace)
        self._wlock()
        try:
            self._trees.pop(namespace, None)
        finally:
            self._wunlock()

    def clear_all(self):
        """Remove every item of every namespace."""
        self._wlock()
        try:
            self._trees.clear()
        finally:
            self._wunlock()

    # ------------------------------------------------------------- reads --

    def count(self, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None):
        """Number of items in the range (0 for a missing namespace).  O(log n)."""
        cdef uint64_t lo, hi
        _range(self._tree(namespace), lower, upper, eq, prefix, &lo, &hi)
        return hi - lo

    def sum(self, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None):
        """Sum of the values in the range (0.0 when empty).  Accumulated in
        double-double from per-subtree sums, rounded once.  O(B log n)."""
        cdef uint64_t lo, hi
        cdef _Tree tree = self._tree(namespace)
        _range(tree, lower, upper, eq, prefix, &lo, &hi)
        if hi == lo:
            return 0.0
        return agg_tree_sum(_tt(tree), lo, hi)

    def at(self, offset, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None):
        """The item at ``offset`` within the range, in (key, id) order;
        negative offsets count from the end.  IndexError out of range.
        O(log n)."""
        cdef uint64_t lo, hi
        cdef agg_key k
        cdef double v
        cdef _Tree tree = self._tree(namespace)
        cdef long long o
        cdef uint64_t n
        cdef int overflow = 0
        if PyLong_CheckExact(offset):
            o = PyLong_AsLongLongAndOverflow(offset, &overflow)
        else:
            try:
                off = _operator.index(offset)
            except TypeError:
                raise TypeError(f"offset must be an integer, not {type(offset).__name__}") from None
            o = PyLong_AsLongLongAndOverflow(off, &overflow)
        _range(tree, lower, upper, eq, prefix, &lo, &hi)
        n = hi - lo
        if o < 0 and not overflow:
            o += <long long>n
        if overflow or o < 0 or <uint64_t>o >= n:
            raise IndexError(f"offset {offset} out of range for {n} items")
        agg_tree_select(_tt(tree), lo + <uint64_t>o, &k, &v)
        return _item_at(tree, k, v)

    def index_of(self, key, *, id=None, order="asc", namespace=None, lower=None,
                 upper=None, eq=_UNSET, prefix=None):
        """Rank of ``(key, id)`` within the range.

        Ascending: the number of items in the range before ``(key, id)`` (no
        id: before every item of ``key``).  Descending: the number after it
        (no id: after every item of ``key``).  Absent keys get the position
        where they would be.  O(log n)."""
        cdef uint64_t lo, hi, g
        cdef _Tree tree = self._tree(namespace)
        desc = _order_desc(order)
        _range(tree, lower, upper, eq, prefix, &lo, &hi)
        if tree is None:
            _validate_key(key)
            if id is not None:
                _validate_key(id)
            return 0
        g = _gap(tree, key, id, id is not None, desc)
        if g < lo:
            g = lo
        if g > hi:
            g = hi
        return (hi - g) if desc else (g - lo)

    def min(self, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None):
        """The first item of the range, or None.  O(log n)."""
        cdef uint64_t lo, hi
        cdef agg_key k
        cdef double v
        cdef _Tree tree = self._tree(namespace)
        _range(tree, lower, upper, eq, prefix, &lo, &hi)
        if hi == lo:
            return None
        agg_tree_select(_tt(tree), lo, &k, &v)
        return _item_at(tree, k, v)

    def max(self, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None):
        """The last item of the range, or None.  O(log n)."""
        cdef uint64_t lo, hi
        cdef agg_key k
        cdef double v
        cdef _Tree tree = self._tree(namespace)
        _range(tree, lower, upper, eq, prefix, &lo, &hi)
        if hi == lo:
            return None
        agg_tree_select(_tt(tree), hi - 1, &k, &v)
        return _item_at(tree, k, v)

    def random(self, *, rng=None, namespace=None, lower=None, upper=None, eq=_UNSET,
               prefix=None):
        """A uniformly random item of the range, or None if it is empty.

        Calls ``rng.randrange(n)`` once (default: the ``random`` module).
        O(log n)."""
        cdef uint64_t lo, hi, version
        cdef agg_key k
        cdef double v
        cdef _Tree tree
        randrange = (_random_module if rng is None else rng).randrange
        for _ in range(100):
            tree = self._tree(namespace)
            _range(tree, lower, upper, eq, prefix, &lo, &hi)
            if hi == lo:
                return None
            version = self._version
            r = randrange(hi - lo)
            # randrange is Python code: if it changed the aggregate, the
            # range is stale; draw again on the new state.
            if self._version != version or self._tree(namespace) is not tree:
                continue
            if not isinstance(r, int) or not 0 <= r < hi - lo:
                raise ValueError(f"rng.randrange({hi - lo}) returned {r!r}")
            if agg_tree_select(_tt(tree), lo + <uint64_t>r, &k, &v) != AGG_OK:
                raise IndexError("random(): position out of range")
            return _item_at(tree, k, v)
        raise RuntimeError("random(): the aggregate kept changing while the rng ran")

    def paginate(self, *, cursor=None, order="asc", page_size=100, namespace=None,
                 lower=None, upper=None, eq=_UNSET, prefix=None):
        """One page of keyset pagination: ``Page(items, cursor, is_done)``.

        The page starts strictly after (asc) or before (desc) the cursor's
        item, within the range, so it stays correct across inserts and
        deletes between calls, even of the cursor's own item.  ``is_done`` is
        true exactly when nothing in the range is left after this page.
        O(log n + page_size)."""
        cdef uint64_t lo, hi, start, n
        cdef _Tree tree = self._tree(namespace)
        desc = _order_desc(order)
        if not isinstance(page_size, int) or isinstance(page_size, bool):
            raise TypeError(f"page_size must be an int, not {type(page_size).__name__}")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        has_cursor = cursor is not None
        if has_cursor:
            ck, cid = _parse_cursor(cursor)
        _range(tree, lower, upper, eq, prefix, &lo, &hi)
        if tree is None:
            return Page([], cursor, True)
        if has_cursor:
            if desc:
                g = _gap(tree, ck, cid, True, False)
                if g < hi:
                    hi = g
            else:
                g = _gap(tree, ck, cid, True, True)
                if g > lo:
                    lo = g
        if hi <= lo:
            return Page([], cursor, True)
        n = hi - lo
        if page_size < n:
            n = <uint64_t>page_size
        items = _read_items(tree, (hi - 1) if desc else lo, n, desc)
        last = items[len(items) - 1]
        return Page(items, _make_cursor(last[0], last[1]), n == hi - lo)

    def iter(self, *, order="asc", namespace=None, lower=None, upper=None, eq=_UNSET,
             prefix=None):
        """Iterate over the items of the range in (key, id) order (or reverse).

        Keyset iteration in chunks: the aggregate may change between steps;
        items present throughout are yielded exactly once, in order."""
        cdef uint64_t lo, hi
        desc = _order_desc(order)
        _range(self._tree(namespace), lower, upper, eq, prefix, &lo, &hi)  # validate now
        return self._iter(desc, namespace, lower, upper, eq, prefix)

    def _iter(self, desc, namespace, lower, upper, eq, prefix):
        # Reads chunks of growing size; yields from a chunk only while the
        # aggregate is unchanged (self._version), and otherwise seeks again
        # from the last item yielded, so every step sees the live state.
        cdef uint64_t lo, hi, g, n
        cdef _Tree tree
        cdef uint64_t version
        chunk = 16
        last = None
        while True:
            tree = self._tree(namespace)
            if tree is None:
                return
            _range(tree, lower, upper, eq, prefix, &lo, &hi)
            if last is not None:
                if desc:
                    g = _gap(tree, last[0], last[1], True, False)
                    if g < hi:
                        hi = g
                else:
                    g = _gap(tree, last[0], last[1], True, True)
                    if g > lo:
                        lo = g
            if hi <= lo:
                return
            n = min(<uint64_t>chunk, hi - lo)
            items = _read_items(tree, (hi - 1) if desc else lo, n, desc)
            version = self._version
            for it in items:
                if self._version != version:
                    break
                yield it
                last = it
            if chunk < 4096:
                chunk *= 2

    def __iter__(self):
        """Iterate over the items of the None namespace."""
        return self.iter()

    # ----------------------------------------------------------- batches --

    def count_batch(self, queries):
        """``[count(**q) for q in queries]`` in one call."""
        return _run_batch(self.count, queries)

    def sum_batch(self, queries):
        """``[sum(**q) for q in queries]`` in one call."""
        return _run_batch(self.sum, queries)

    def at_batch(self, queries):
        """``[at(q['offset'], **rest) for q in queries]`` in one call."""
        out = []
        for q in queries:
            _check_query(q, _ALLOWED_AT_KEYS)
            if "offset" not in q:
                raise TypeError("at_batch: every query needs an 'offset'")
            q = dict(q)
            off = q.pop("offset")
            out.append(self.at(off, **q))
        return out

    # ------------------------------------------------------- whole object --

    def namespaces(self):
        """The namespaces that hold at least one item."""
        return list(self._trees)

    def __len__(self):
        cdef uint64_t n = 0
        cdef _Tree tree
        # (a copy: _tt may wait for a bulk write without the GIL, and another
        # thread may add or drop a namespace meanwhile)
        for tree in list(self._trees.values()):
            n += agg_tree_len(_tt(tree))
        return n

    def __bool__(self):
        return bool(self._trees)

    def __repr__(self):
        return (f"Aggregate(items={len(self)}, namespaces={len(self._trees)}, "
                f"node_size={self._node_size})")

    @property
    def node_size(self):
        """Maximum entries per tree node."""
        return self._node_size

    @property
    def nbytes(self):
        """Bytes of native memory held by the trees (nodes and key tails)."""
        cdef size_t n = 0
        cdef _Tree tree
        for tree in list(self._trees.values()):     # (a copy, as in __len__)
            n += agg_tree_nbytes(_tt(tree))
        return n

    def check(self):
        """Verify every invariant of every tree (core/check.c, invariants in core/internal.h); raises
        AssertionError describing the first broken one.  O(total items)."""
        cdef char msg[512]
        cdef _Tree tree
        cdef agg_status st
        for ns, tree in list(self._trees.items()):  # (a copy, as in __len__)
            if _tt(tree) == NULL:
                raise AssertionError(f"namespace {ns!r}: no tree")
            if agg_tree_len(_tt(tree)) == 0:
                raise AssertionError(f"namespace {ns!r}: empty tree kept")
            if (tree.kind == K_GENERAL) != (agg_tree_mode(_tt(tree)) == AGG_KEYS_GENERAL):
                raise AssertionError(f"namespace {ns!r}: kind and key mode disagree")
            st = agg_tree_check(_tt(tree), msg, sizeof(msg))
            if st != AGG_OK:
                raise AssertionError(f"namespace {ns!r}: {msg.decode('utf-8', 'replace')}")
            if tree.kind == K_INT:
                for it in _read_items(tree, 0, agg_tree_len(_tt(tree)), False):
                    if not (-_TWO53 <= it[0] <= _TWO53):
                        raise AssertionError(f"namespace {ns!r}: int key out of range")

    # -- snapshots (docs/SNAPSHOT.md; the work is in _snapshot.pxi) --

    def dumps(self):
        """The snapshot of this aggregate as bytes (docs/SNAPSHOT.md).
        TypeError for a namespace a snapshot cannot hold.  O(n)."""
        return _snap_dumps(self)

    @classmethod
    def loads(cls, data):
        """An aggregate from snapshot bytes (any C-contiguous bytes-like
        object, read in place; TypeError for anything else), each namespace
        built bottom-up from the stored order; SnapshotError if they are not
        a valid snapshot.  O(n)."""
        return _snap_loads(cls, data)

    def save(self, file, *, fsync=True):
        """Write the snapshot to ``file``: a path (str / os.PathLike), written
        atomically (temporary file, fsync, rename, directory fsync;
        ``fsync=False`` skips the fsyncs), or a binary file object."""
        _snap_save(self, file, fsync)

    @classmethod
    def load(cls, file, *, mmap=False):
        """The aggregate saved in ``file`` (a path or a binary file object).
        With ``mmap=True`` a path is mapped into memory rather than read
        (no copy of the bytes first; but a mapped file that another program
        truncates while it loads kills the process with SIGBUS)."""
        return _snap_load(cls, file, mmap)

    def __reduce_ex__(self, protocol):
        # pickles carry the snapshot format (_snapshot.pxi); from protocol 5
        # on as a PickleBuffer, which may travel out-of-band (PEP 574)
        return _snap_reduce(self, protocol)

    def __reduce__(self):
        return _snap_reduce(self, 4)

    def __copy__(self):
        return _snap_copy(self)

    # -------------------------------------------------------- vectorised --
    # (the cdef bodies are in _numpy.pxi)

    @classmethod
    def from_arrays(cls, keys, ids, values=None, namespaces=None, node_size=64):
        """Build an Aggregate from arrays in O(n log n) sort + O(n) build.

        ``keys`` / ``ids`` / ``values`` are equal-length 1-D array-likes
        (unsorted is fine); ``namespaces`` is None (all items in the None
        namespace) or one namespace per item.  Float or integer keys with
        integer ids take the native fast path (leaves 7/8 full, room for
        later writes; no per-item inserts); other key and id types fall back to a per-item encoding.
        DuplicateItemError names a repeated (key, id), ValueError reports NaN
        or a length mismatch, TypeError a dtype that cannot be converted
        losslessly; nothing is half-built."""
        cdef Aggregate agg = cls(node_size)
        _from_arrays(agg, keys, ids, values, namespaces)
        return agg

    def insert_many(self, keys, ids, values=None, *, namespace=None):
        """Insert every ``(keys[i], ids[i], values[i])``; all or nothing.

        DuplicateItemError if a pair repeats within the batch or already
        exists (nothing is inserted then).  Numeric arrays go through the
        C core without per-item Python work."""
        self._wlock()
        try:
            _insert_many(self, keys, ids, values, namespace)
        finally:
            self._wunlock()

    def delete_many(self, keys, ids, *, namespace=None):
        """Delete every ``(keys[i], ids[i])``; all or nothing.

        MissingItemError if any is absent (or named twice)."""
        self._wlock()
        try:
            _delete_many(self, keys, ids, namespace)
        finally:
            self._wunlock()

    def count_many(self, lowers, uppers, *, namespace=None, lower_inclusive=True,
                   upper_inclusive=True):
        """Vectorised count: ``out[i]`` = items with lowers[i] <= key <=
        uppers[i] (inclusive flags as given).  int64 array, input order.  The
        ranking loop runs in C without the GIL."""
        self._acquire()
        try:
            lo, hi = _bound_ranks(self._tree(namespace), lowers, uppers,
                                  lower_inclusive, upper_inclusive)
        finally:
            self._release()
        return hi - lo

    def sum_many(self, lowers, uppers, *, namespace=None, lower_inclusive=True,
                 upper_inclusive=True):
        """Vectorised sum over the same ranges as count_many; float64 array."""
        self._acquire()
        try:
            return _sum_many(self._tree(namespace), lowers, uppers, lower_inclusive,
                             upper_inclusive)
        finally:
            self._release()

    def index_of_many(self, keys, *, namespace=None, order="asc", lower=None, upper=None,
                      eq=_UNSET, prefix=None):
        """Vectorised index_of (no ids): int64 array, input order."""
        self._acquire()
        try:
            return _index_of_many(self._tree(namespace), keys, order, lower, upper, eq, prefix)
        finally:
            self._release()

    def at_many(self, offsets, *, namespace=None, lower=None, upper=None, eq=_UNSET,
                prefix=None):
        """Vectorised at: ``(keys, ids, values)`` arrays of the items at the
        given offsets within the range (negative from the end).  IndexError
        if any offset is out of range."""
        return _at_many(self._tree(namespace), offsets, lower, upper, eq, prefix)

    def to_arrays(self, *, namespace=None, lower=None, upper=None, eq=_UNSET, prefix=None):
        """``(keys, ids, values)`` arrays of the items in the range, in order.

        float64 / int64 arrays for numeric namespaces, object arrays
        otherwise.  O(log n + items)."""
        self._acquire()
        try:
            return _to_arrays(self._tree(namespace), lower, upper, eq, prefix)
        finally:
            self._release()


cdef list _run_batch(object method, object queries):
    """[method(**q) for q in queries], each query checked for unknown names."""
    out = []
    for q in queries:
        _check_query(q, _ALLOWED_QUERY_KEYS)
        out.append(method(**q))
    return out


cdef int _check_query(object q, frozenset allowed) except -1:
    if not isinstance(q, dict):
        raise TypeError(f"each query must be a dict, not {type(q).__name__}")
    for name in q:
        if name not in allowed:
            raise TypeError(f"unknown query argument {name!r}")
    return 0


def _restore(node_size, state):
    """Rebuild an Aggregate from the ``__reduce__`` state of pickles written
    before snapshots (lists of items per namespace)."""
    agg = Aggregate(node_size)
    for ns, items in state:
        _load_items(agg, items, ns)
    return agg
