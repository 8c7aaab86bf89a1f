# _scalars.pxi - scalar conversion for aggtree._core (included by _core.pyx).
#
# Python keys, ids and values into what the C core takes, and back:
# * the key kinds of a tree (K_*; see _core.pyx "How a Python call becomes a
#   tree walk") and which kind an item fits (_item_kind);
# * values (_value: a finite double), FAST keys (_fast_key, from a double
#   key and an int64 id) and the place of any bound key or id in the double
#   domain of a FAST tree (_num_position, _id_position: P_* codes);
# * GENERAL keys: the byte encoding of keycodec.pxi as an agg_key (GKey),
#   decoded back by _decode_general;
# * Items made without the namedtuple constructor (_mk_item).

# ---------------------------------------------------------------- kinds --

cdef enum:
    K_FLOAT = 0
    K_INT = 1
    K_GENERAL = 2
    K_NONE = 3

# Positions of a bound key in the double domain of a FAST tree.
cdef enum:
    P_EXACT = 0       # the key is the double d
    P_BELOW = 1       # before every item
    P_ABOVE = 2       # after every item
    P_GAP = 3         # strictly between d and the next double (after d's items)

cdef double _TWO53 = 9007199254740992.0
cdef uint64_t _ID_MIN = 0
cdef uint64_t _ID_MAX = UINT64_MAX


cdef object _item_new = tuple.__new__  # Item(k, i, v) without the namedtuple __new__ wrapper

cdef extern from "Python.h":
    object PyType_GenericAlloc(PyTypeObject *type, Py_ssize_t nitems)

# Item is a NamedTuple: a tuple subclass with no fields of its own, so an
# Item can be made the way CPython's tuple.__new__ makes a tuple subclass
# instance (allocate with 3 slots, fill them) without building an argument
# tuple first: about 3x faster, which is most of the cost of reading items
# (iter, paginate, at, min/max...).  The layout is checked once here; if
# Item ever gains instance fields, _mk_item falls back to tuple.__new__.
cdef bint _ITEM_IS_PLAIN_TUPLE = (
    issubclass(Item, tuple) and Item.__basicsize__ == tuple.__basicsize__
    and Item.__itemsize__ == tuple.__itemsize__
)


cdef inline object _mk_item(object key, object id, double value):
    cdef object v = value
    cdef object item
    if not _ITEM_IS_PLAIN_TUPLE:
        return _item_new(Item, (key, id, v))
    item = PyType_GenericAlloc(<PyTypeObject *>Item, 3)
    Py_INCREF(key)
    PyTuple_SET_ITEM(item, 0, key)
    Py_INCREF(id)
    PyTuple_SET_ITEM(item, 1, id)
    Py_INCREF(v)
    PyTuple_SET_ITEM(item, 2, v)
    return item



# ------------------------------------------------------ scalar checking --

cdef inline int _kb_append(KeyBuf *b, const unsigned char *p, Py_ssize_t n) except -1:
    kb_reserve(b, n)
    memcpy(b.data + b.len, p, <size_t>n)
    b.len += n
    return 0


cdef inline double _value(object v) except? -1.0:
    """A finite float from a real number; TypeError / ValueError otherwise."""
    cdef double x
    if PyFloat_CheckExact(v):
        x = PyFloat_AS_DOUBLE(v)
    elif PyLong_CheckExact(v):
        try:
            x = <double>v
        except OverflowError:
            raise ValueError(f"value {v!r} is too large for a float")
    elif v is None or isinstance(v, (str, bytes, bytearray, complex)):
        raise TypeError(f"value must be a real number, not {type(v).__name__}")
    else:
        try:
            x = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"value must be a real number, not {type(v).__name__}")
        except OverflowError:
            raise ValueError(f"value {v!r} is too large for a float")
    if not isfinite(x):
        raise ValueError(f"value must be finite, got {x!r}")
    return x


cdef inline int _item_kind(object key, object id, double *d, int64_t *i) except -1:
    """Which FAST kind can hold (key, id), filling d and i; or K_GENERAL.

    Floats (subclasses too: np.float64 reads back as float), exact ints with
    |key| <= 2**53 and exact int64 ids qualify; bools, other int subclasses
    and everything else go GENERAL, which keeps their type."""
    cdef int overflow = 0
    cdef long long v
    cdef double x
    if not PyLong_CheckExact(id):
        return K_GENERAL
    v = PyLong_AsLongLongAndOverflow(id, &overflow)
    if overflow:
        return K_GENERAL
    i[0] = v
    if key is None:
        d[0] = 0.0
        return K_NONE
    if PyFloat_Check(key):
        x = PyFloat_AS_DOUBLE(key)
        if isnan(x):
            raise ValueError("key must not be NaN")
        d[0] = x + 0.0          # maps -0.0 to 0.0
        return K_FLOAT
    if PyLong_CheckExact(key):
        v = PyLong_AsLongLongAndOverflow(key, &overflow)
        if overflow or v > 9007199254740992LL or v < -9007199254740992LL:
            return K_GENERAL
        d[0] = <double>v
        return K_INT
    return K_GENERAL


cdef inline agg_key _fast_key(double d, int64_t i) noexcept nogil:
    cdef agg_key k
    k.head = agg_f64_to_key(d)
    k.rest = agg_i64_to_key(i)
    return k


cdef int _validate_key(object v) except -1:
    """Raise what an insert would raise for a bad key (encodes into scratch)."""
    cdef KeyBuf kb
    kb_init(&kb)
    try:
        kb_put_value(&kb, v, NULL)
    finally:
        kb_free(&kb)
    return 0


cdef int _num_position(object v, double *d, int kind) except -1:
    """Place a bound key in the double domain of a FAST tree of `kind` (P_* code)."""
    cdef double x
    cdef int overflow = 0
    cdef long long iv
    if kind == K_NONE:
        if v is None:
            d[0] = 0.0
            return P_EXACT
        _validate_key(v)
        return P_ABOVE        # every other key comes after None
    if v is None:
        return P_BELOW
    if PyFloat_Check(v):
        x = PyFloat_AS_DOUBLE(v)
        if isnan(x):
            raise ValueError("key must not be NaN")
        d[0] = x + 0.0
        return P_EXACT
    if PyBool_Check(v):
        d[0] = 1.0 if v else 0.0
        return P_EXACT
    if PyLong_CheckExact(v) or isinstance(v, int):
        iv = PyLong_AsLongLongAndOverflow(v, &overflow)
        if not overflow and -9007199254740992LL <= iv <= 9007199254740992LL:
            d[0] = <double>iv
            return P_EXACT
        try:
            x = float(v)
        except OverflowError:
            # Beyond the finite doubles but short of the infinities.
            d[0] = 1.7976931348623157e308 if v > 0 else -INFINITY
            return P_GAP
        if int(x) == v:
            d[0] = x
            return P_EXACT
        if int(x) > v:
            x = nextafter(x, -INFINITY)
        d[0] = x
        return P_GAP
    _validate_key(v)      # TypeError / ValueError for unsupported keys
    return P_ABOVE        # str, bytes, tuple, list: after every number


cdef int _id_position(object v, int64_t *i) except -1:
    """Place a bound id among int64 ids (P_EXACT / P_BELOW / P_ABOVE / P_GAP
    meaning "after id i[0]")."""
    cdef double x, f
    cdef int overflow = 0
    cdef long long iv
    if v is None:
        return P_BELOW
    if PyBool_Check(v):
        i[0] = 1 if v else 0
        return P_EXACT
    if isinstance(v, int):
        iv = PyLong_AsLongLongAndOverflow(v, &overflow)
        if overflow:
            return P_ABOVE if overflow > 0 else P_BELOW
        i[0] = iv
        return P_EXACT
    if PyFloat_Check(v):
        x = PyFloat_AS_DOUBLE(v)
        if isnan(x):
            raise ValueError("id must not be NaN")
        if x >= 9223372036854775808.0:
            return P_ABOVE
        if x < -9223372036854775808.0:
            return P_BELOW
        f = floor(x)
        i[0] = <int64_t>f
        return P_EXACT if f == x else P_GAP
    _validate_key(v)
    return P_ABOVE


# ------------------------------------------------------ general keys --

cdef struct GKey:
    KeyBuf kb              # the full encoding being built
    agg_tail *tail         # where agg_key_from_bytes put the tail
    bint tail_heap         # tail was malloc'd
    uint64_t tail_small[34]  # inline tail storage (272 bytes, 8-aligned)


cdef inline void gkey_init(GKey *g) noexcept:
    kb_init(&g.kb)
    g.tail = NULL
    g.tail_heap = False


cdef inline void gkey_free(GKey *g) noexcept:
    kb_free(&g.kb)
    if g.tail_heap:
        free(g.tail)
        g.tail_heap = False
    g.tail = NULL


cdef inline Py_ssize_t _meta_len(Py_ssize_t nsig) noexcept:
    """Type-signature bytes the core can be told to ignore (at most 255; an
    item with more numbers keeps its signature in the compared bytes and is
    looked up by ordered encoding instead, see _find in _trees.pxi)."""
    return nsig if nsig <= 255 else 0


cdef agg_key gkey_finish(GKey *g, Py_ssize_t meta=0) except *:
    """The agg_key view of the bytes in g.kb (valid while g lives); the last
    `meta` bytes are a type signature that the core's comparisons ignore."""
    cdef Py_ssize_t n = g.kb.len
    cdef size_t need
    if n - 8 > <Py_ssize_t>AGG_TAIL_MAX_LEN:
        raise ValueError(f"key too large: its encoding takes {n} bytes (limit 16 MiB)")
    if n > 8:
        need = sizeof(agg_tail) + <size_t>(n - 8)
        if need <= sizeof(g.tail_small):
            g.tail = <agg_tail *>g.tail_small
        else:
            g.tail = <agg_tail *>malloc(need)
            if g.tail == NULL:
                raise MemoryError()
            g.tail_heap = True
    return agg_key_from_item_bytes(<uint8_t *>g.kb.data, <size_t>n, <size_t>meta, g.tail)


cdef object _decode_general(agg_key k):
    """(key, id) of a GENERAL agg_key."""
    cdef uint8_t small[256]
    cdef uint8_t *buf = small
    cdef size_t n = agg_key_to_bytes(k, small, sizeof(small))
    if n > sizeof(small):
        buf = <uint8_t *>malloc(n)
        if buf == NULL:
            raise MemoryError()
        try:
            agg_key_to_bytes(k, buf, n)
            return kb_decode_item(<const unsigned char *>buf, <Py_ssize_t>n)
        finally:
            free(buf)
    return kb_decode_item(<const unsigned char *>buf, <Py_ssize_t>n)


cdef tuple _encode_item_meta(object key, object id):
    """(E, meta): the full item encoding and the signature bytes to ignore."""
    cdef KeyBuf kb, sig
    kb_init(&kb)
    kb_init(&sig)
    try:
        kb_put_value(&kb, key, &sig)
        kb_put_value(&kb, id, &sig)
        _kb_append(&kb, sig.data, sig.len)
        return ((<char *>kb.data)[:kb.len], _meta_len(sig.len))
    finally:
        kb_free(&kb)
        kb_free(&sig)


cdef bytes _encode_item_bytes(object key, object id):
    cdef KeyBuf kb
    kb_init(&kb)
    try:
        kb_put_item(&kb, key, id)
        return (<char *>kb.data)[:kb.len]
    finally:
        kb_free(&kb)


cdef object _fast_key_obj(int kind, agg_key k):
    if kind == K_NONE:
        return None
    if kind == K_INT:
        return int(agg_key_to_f64(k.head))
    return agg_key_to_f64(k.head)


cdef bytes _encode_item_ordered(object key, object id):
    cdef KeyBuf kb
    kb_init(&kb)
    try:
        kb_put_value(&kb, key, NULL)
        kb_put_value(&kb, id, NULL)
        return (<char *>kb.data)[:kb.len]
    finally:
        kb_free(&kb)
