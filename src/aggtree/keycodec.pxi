# keycodec.pxi - the general-key codec of aggtree.
#
# Included into _core.pyx (`include "keycodec.pxi"`).  Turns Python keys and
# ids into memcmp-ordered byte strings for the C core's AGG_KEYS_GENERAL mode
# (see the KEYS section of aggtree.h) and back, so the core never calls into
# Python.  Self-contained: no cimports; every C name it declares or defines
# starts with `kc_` / `kb_` / `KC_` / `KeyBuf` (keep those prefixes free in
# _core.pyx).
#
# ORDER (total, over supported values)
#   None < numbers < str < bytes < tuple
#   numbers  bool, int, float by exact numeric value (True == 1 == 1.0,
#            -0.0 == 0.0, big ints exact against floats), -inf/inf allowed,
#            NaN -> ValueError.  Ints of any size: -inf < ints below
#            -DBL_MAX < -DBL_MAX ... DBL_MAX < ints above DBL_MAX < inf
#            (sanity limit: |v| - int(DBL_MAX) must fit in 2**31 - 1 bytes,
#            i.e. about 5e9 decimal digits, else ValueError)
#   str      by code point (lone surrogates allowed)
#   bytes    bytewise
#   tuple    element by element, a shorter prefix first; a list is accepted
#            as the equal tuple (and decodes as a tuple)
#   Subclasses of int/float/str/bytes/tuple/list are accepted as their base
#   type (an IntEnum decodes as int, a namedtuple as tuple, np.float64 as
#   float).  Anything else (dict, set, bytearray, memoryview, np.int64,
#   objects...) -> TypeError naming the type.  More than 32 nested tuple/list
#   levels -> ValueError.
#
# ORDERED ENCODING enc(v)
#   None    0x10
#   number  0x20, 8 bytes big-endian sortable image of the double d
#           (-0.0 -> 0.0; negative -> ~bits, else bits | 1<<63), then a
#           marker byte (never 0x00, never 0xFF) and maybe a remainder:
#           - v == d exactly (every float; ints a double holds): 0x01.
#           - an int no double holds, -DBL_MAX < v: d = the largest double
#             < v (DBL_MAX when v > DBL_MAX), r = v - d > 0, rb = r minimal
#             big-endian (first byte non-zero), L = len(rb):
#               L <= 200:  marker 0x01 + L (0x02..0xC9), rb
#               L >  200:  marker 0xFE, L as 4 bytes big-endian, rb
#             (L > 122 and 0xFE only occur with d = DBL_MAX: below it r is
#             under one ulp.)  Order within one d: exact, then by L, then
#             by rb, i.e. by r.
#           - an int v < -DBL_MAX: d = -inf, m = -v - int(DBL_MAX) >= 1,
#             mb = m minimal big-endian, L = len(mb), ~x = x ^ 0xFF..:
#               L <= 200:  marker 0xFF - L (0xFE..0x37), ~mb
#               L >  200:  marker 0x02, ~L as 4 bytes big-endian, ~mb
#             A larger m (smaller v) gets a smaller marker / length code /
#             bytes, so these sort by v, all after -inf itself (0x01) and
#             before -DBL_MAX (whose d bytes are larger).
#           Lengths above 2**31 - 1 are rejected; the decoder also rejects
#           every non-canonical form (leading zero bytes, a long form for
#           L <= 200, a remainder on a small / infinite d, r >= one ulp).
#   str     0x30, UTF-8 ('surrogatepass'), each 0x00 written 0x00 0xFF, 0x00
#   bytes   0x40, same escaping and terminator
#   tuple   0x50, enc(e) for each element, 0x00
#   No tag is 0x00 or 0xFF.  enc(a) < enc(b) bytewise iff a < b; equal iff
#   a == b.  enc is self-delimiting but NOT prefix-free: enc(s) is a proper
#   prefix of enc(s + '\x00' + ...) (the extension starts with 0xFF).  The
#   byte that follows a complete enc(v) inside an item (or a bound built as
#   below) is a tag, a tuple terminator 0x00 or a sig byte 0x01..0x03, always
#   < 0xFF, so appending 0xFF to a bound means "after everything that starts
#   with this".
#
# ITEM ENCODING  E = enc(key) + enc(id) + sig
#   sig: one byte per number in key then id, depth-first order: 0x01 int,
#   0x02 float, 0x03 bool.  It never decides the order of distinct items
#   (enc(key) + enc(id) already does) and makes the decoder give back the
#   inserted types.  E never ends in a zero byte that matters: an E is never
#   E' + zero bytes for another E' or bound, so the core's zero-padded head
#   compare equals memcmp (see aggtree.h).  The decoder ignores anything
#   after the last sig byte (the core's zero padding).
#
# BOUNDS for the core (all compare correctly against item encodings E):
#   before every item with key k          enc(k)
#   after every item with key k           enc(k) + 0xFF
#   before / after item (k, id) exactly   E(k, id) itself, rank side 0 / 1
#     (or enc(k) + enc(id), +0xFF for after: equal to E up to the sig)
#   before every tuple key starting with elements p   kb_put_prefix(p)
#   after  every tuple key starting with elements p   kb_put_prefix(p) + 0xFF

cdef extern from *:
    """
    #include <string.h>
    #include <stdlib.h>
    #include <stdint.h>
    #include <math.h>
    #include <float.h>

    /* Order-preserving 64-bit image of a double (NaN rejected by the caller;
       -0.0 mapped to 0.0 here). Same transform as agg_f64_to_key. */
    static inline uint64_t kc_f64_to_key(double x) {
        uint64_t u;
        if (x == 0.0) x = 0.0;
        memcpy(&u, &x, sizeof u);
        return (u >> 63) ? ~u : (u | UINT64_C(0x8000000000000000));
    }
    static inline double kc_key_to_f64(uint64_t k) {
        uint64_t u = (k >> 63) ? (k ^ UINT64_C(0x8000000000000000)) : ~k;
        double x;
        memcpy(&x, &u, sizeof x);
        return x;
    }
    static inline void kc_store_be64(unsigned char *p, uint64_t v) {
        p[0] = (unsigned char)(v >> 56); p[1] = (unsigned char)(v >> 48);
        p[2] = (unsigned char)(v >> 40); p[3] = (unsigned char)(v >> 32);
        p[4] = (unsigned char)(v >> 24); p[5] = (unsigned char)(v >> 16);
        p[6] = (unsigned char)(v >> 8);  p[7] = (unsigned char)v;
    }
    static inline uint64_t kc_load_be64(const unsigned char *p) {
        return ((uint64_t)p[0] << 56) | ((uint64_t)p[1] << 48)
             | ((uint64_t)p[2] << 40) | ((uint64_t)p[3] << 32)
             | ((uint64_t)p[4] << 24) | ((uint64_t)p[5] << 16)
             | ((uint64_t)p[6] << 8)  | (uint64_t)p[7];
    }
    /* Largest double d <= x, and *rem = x - d (0 when exact, < 2048). */
    static inline double kc_i64_floor(long long x, unsigned long long *rem) {
        double d;
        long long ix;
        if (x >= -(1LL << 53) && x <= (1LL << 53)) { *rem = 0; return (double)x; }
        d = (double)x;
        if (d >= 9223372036854775808.0) d = 9223372036854774784.0; /* 2^63 - 1024 */
        ix = (long long)d;
        if (ix > x) { d = nextafter(d, -INFINITY); ix = (long long)d; }
        *rem = (uint64_t)x - (uint64_t)ix;
        return d;
    }
    static inline uint32_t kc_load_be32(const unsigned char *p) {
        return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16)
             | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
    }
    static inline void kc_store_be32(unsigned char *p, uint32_t v) {
        p[0] = (unsigned char)(v >> 24); p[1] = (unsigned char)(v >> 16);
        p[2] = (unsigned char)(v >> 8);  p[3] = (unsigned char)v;
    }
    static inline int kc_nbytes_u64(uint64_t r) {
        int n = 0;
        while (r) { n++; r >>= 8; }
        return n;
    }
    static inline int kc_is_neg_zero(double d) { return d == 0.0 && signbit(d); }
    static inline int kc_isfinite(double d) { return isfinite(d); }
    static inline int kc_isnan(double d) { return isnan(d); }
    static inline double kc_floor(double d) { return floor(d); }
    static inline double kc_next_up(double d) { return nextafter(d, INFINITY); }
    static inline double kc_next_down(double d) { return nextafter(d, -INFINITY); }
    #define KC_DBL_MAX DBL_MAX
    #define KC_INFINITY INFINITY
    """
    unsigned long long kc_f64_to_key(double x) noexcept nogil
    double kc_key_to_f64(unsigned long long k) noexcept nogil
    void kc_store_be64(unsigned char *p, unsigned long long v) noexcept nogil
    unsigned long long kc_load_be64(const unsigned char *p) noexcept nogil
    unsigned int kc_load_be32(const unsigned char *p) noexcept nogil
    void kc_store_be32(unsigned char *p, unsigned int v) noexcept nogil
    double kc_i64_floor(long long x, unsigned long long *rem) noexcept nogil
    int kc_nbytes_u64(unsigned long long r) noexcept nogil
    int kc_is_neg_zero(double d) noexcept nogil
    int kc_isfinite(double d) noexcept nogil
    int kc_isnan(double d) noexcept nogil
    double kc_floor(double d) noexcept nogil
    double kc_next_up(double d) noexcept nogil
    double kc_next_down(double d) noexcept nogil
    double KC_DBL_MAX
    double KC_INFINITY

cdef extern from "Python.h":
    void *kc_malloc "PyMem_RawMalloc"(size_t n) noexcept nogil
    void *kc_realloc "PyMem_RawRealloc"(void *p, size_t n) noexcept nogil
    void kc_free "PyMem_RawFree"(void *p) noexcept nogil
    void *kc_memchr "memchr"(const void *s, int c, size_t n) noexcept nogil
    void *kc_memcpy "memcpy"(void *d, const void *s, size_t n) noexcept nogil
    # Never fails for an int (or int subclass) argument.
    long long kc_PyLong_AsLongLongAndOverflow "PyLong_AsLongLongAndOverflow"(object v, int *overflow) noexcept
    double kc_PyFloat_AS_DOUBLE "PyFloat_AS_DOUBLE"(object v) noexcept
    object kc_PyFloat_FromDouble "PyFloat_FromDouble"(double d)
    object kc_PyLong_FromDouble "PyLong_FromDouble"(double d)
    object kc_PyLong_FromLongLong "PyLong_FromLongLong"(long long x)
    # Returns NULL with an exception set on failure (we test for it by hand).
    const char *kc_PyUnicode_AsUTF8AndSize "PyUnicode_AsUTF8AndSize"(object s, Py_ssize_t *n) noexcept
    object kc_PyUnicode_AsEncodedString "PyUnicode_AsEncodedString"(object s, const char *enc, const char *errors)
    object kc_PyUnicode_DecodeUTF8 "PyUnicode_DecodeUTF8"(const char *s, Py_ssize_t n, const char *errors)
    object kc_PyBytes_FromStringAndSize "PyBytes_FromStringAndSize"(const char *s, Py_ssize_t n)
    char *kc_PyBytes_AS_STRING "PyBytes_AS_STRING"(object b) noexcept
    Py_ssize_t kc_PyBytes_GET_SIZE "PyBytes_GET_SIZE"(object b) noexcept
    object kc_PyList_AsTuple "PyList_AsTuple"(object lst)
    int kc_PyErr_ExceptionMatches "PyErr_ExceptionMatches"(object exc) noexcept
    void kc_PyErr_Clear "PyErr_Clear"() noexcept

cdef enum:
    KC_TAG_NONE = 0x10
    KC_TAG_NUM = 0x20
    KC_TAG_STR = 0x30
    KC_TAG_BYTES = 0x40
    KC_TAG_TUPLE = 0x50
    KC_END = 0x00
    KC_ESC = 0xFF
    KC_EXACT = 0x01
    KC_SIG_INT = 0x01
    KC_SIG_FLOAT = 0x02
    KC_SIG_BOOL = 0x03
    KC_MAX_DEPTH = 32        # tuple/list nesting levels allowed
    KC_MAX_REM = 200         # longest remainder with a one-byte marker
    KC_POS_LONG = 0xFE       # d = DBL_MAX: 4-byte length + remainder follow
    KC_NEG_LONG = 0x02       # d = -inf: inverted 4-byte length + inverted m
    KC_NEG_SHORT = 0x37      # d = -inf: markers 0x37..0xFE = 0xFF - len(m)
    KC_MAX_LONG = 0x7FFFFFFF # longest remainder (bytes) accepted at all
    KC_SMALL = 256

# --------------------------------------------------------------- KeyBuf --
# Growable byte buffer.  `data` points at `small` until it outgrows it, so a
# KeyBuf must never be copied by value (declare it, kb_init it, pass &buf).

cdef struct KeyBuf:
    unsigned char *data
    Py_ssize_t len
    Py_ssize_t cap
    unsigned char small[256]

cdef inline void kb_init(KeyBuf *b) noexcept:
    b.data = b.small
    b.len = 0
    b.cap = KC_SMALL

cdef inline void kb_free(KeyBuf *b) noexcept:
    if b.data != b.small and b.data != NULL:
        kc_free(b.data)
    kb_init(b)

cdef int kb_grow(KeyBuf *b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need, newcap
    cdef unsigned char *p
    if extra < 0 or extra > (<Py_ssize_t>(<size_t>-1 >> 2)) - b.len:
        raise MemoryError()
    need = b.len + extra
    newcap = b.cap * 2
    while newcap < need:
        newcap *= 2
    if b.data == b.small:
        p = <unsigned char *>kc_malloc(<size_t>newcap)
        if p == NULL:
            raise MemoryError()
        kc_memcpy(p, b.small, <size_t>b.len)
    else:
        p = <unsigned char *>kc_realloc(b.data, <size_t>newcap)
        if p == NULL:
            raise MemoryError()
    b.data = p
    b.cap = newcap
    return 0

cdef inline int kb_reserve(KeyBuf *b, Py_ssize_t extra) except -1:
    if b.cap - b.len >= extra:
        return 0
    return kb_grow(b, extra)

cdef inline int kb_put_byte(KeyBuf *b, unsigned char c) except -1:
    if b.len >= b.cap:
        kb_grow(b, 1)
    b.data[b.len] = c
    b.len += 1
    return 0

cdef inline int kb_put_bytes(KeyBuf *b, const unsigned char *src, Py_ssize_t n) except -1:
    kb_reserve(b, n)
    kc_memcpy(b.data + b.len, src, <size_t>n)
    b.len += n
    return 0

# --------------------------------------------------------------- encode --

cdef int kc_raise_type(object v) except -1:
    raise TypeError(
        f"unsupported key type {type(v).__name__!r}: aggtree keys are None, "
        f"bool, int, float, str, bytes, or tuples/lists of those")

cdef int kc_raise_depth() except -1:
    raise ValueError(f"key nested deeper than {KC_MAX_DEPTH} levels")

cdef int kc_raise_int_size() except -1:
    raise ValueError(
        f"integer key too large: more than {KC_MAX_LONG} bytes beyond DBL_MAX")

cdef inline int kc_put_sig(KeyBuf *sig, unsigned char s) except -1:
    if sig != NULL:
        kb_put_byte(sig, s)
    return 0

cdef inline int kc_put_double(KeyBuf *b, double d, KeyBuf *sig,
                              unsigned char s) except -1:
    cdef unsigned char *p
    if kc_isnan(d):
        raise ValueError("NaN cannot be used in a key")
    if b.cap - b.len < 10:
        kb_grow(b, 10)
    p = b.data + b.len
    p[0] = KC_TAG_NUM
    kc_store_be64(p + 1, kc_f64_to_key(d))
    p[9] = KC_EXACT
    b.len += 10
    if sig != NULL:
        kb_put_byte(sig, s)
    return 0

# int(DBL_MAX), the largest int a double holds.
cdef object KC_IMAX = int(1.7976931348623157e308)

cdef int kc_put_rem(KeyBuf *b, double d, object r, bint neg,
                    KeyBuf *sig) except -1:
    """Append 0x20, the image of d, a marker and the remainder r >= 1: r =
    v - d above -DBL_MAX, or (neg, d = -inf) the magnitude m = -v - IMAX,
    written with its length code and bytes inverted."""
    cdef object nbo = (r.bit_length() + 7) // 8
    cdef Py_ssize_t nb, hdr, k
    cdef unsigned char *p
    cdef bytes rb
    if nbo > KC_MAX_LONG:
        kc_raise_int_size()
    nb = nbo
    rb = r.to_bytes(nb, "big")
    hdr = 10 if nb <= KC_MAX_REM else 14
    kb_reserve(b, hdr + nb)
    p = b.data + b.len
    p[0] = KC_TAG_NUM
    kc_store_be64(p + 1, kc_f64_to_key(d))
    if nb <= KC_MAX_REM:
        p[9] = <unsigned char>(0xFF - nb if neg else KC_EXACT + nb)
    elif neg:
        p[9] = KC_NEG_LONG
        kc_store_be32(p + 10, <unsigned int>(0xFFFFFFFF - <unsigned int>nb))
    else:
        p[9] = KC_POS_LONG
        kc_store_be32(p + 10, <unsigned int>nb)
    kc_memcpy(p + hdr, kc_PyBytes_AS_STRING(rb), <size_t>nb)
    if neg:
        p += hdr
        for k in range(nb):
            p[k] ^= 0xFF
    b.len += hdr + nb
    return kc_put_sig(sig, KC_SIG_INT)

cdef int kc_put_bigint(KeyBuf *b, object v, KeyBuf *sig) except -1:
    # Rare path (|v| beyond int64): exact arithmetic with Python ints.
    cdef double d
    cdef object iv, r
    if type(v) is not int:
        v = int.__int__(v)          # plain int copy, bypasses subclass dunders
    try:
        d = float(v)
    except OverflowError:
        if v < 0:                   # below -DBL_MAX: d = -inf, m = -v - IMAX
            return kc_put_rem(b, -KC_INFINITY, -v - KC_IMAX, True, sig)
        d = KC_DBL_MAX
    iv = kc_PyLong_FromDouble(d)
    if iv > v:
        d = kc_next_down(d)
        if not kc_isfinite(d):      # -IMAX > v: below -DBL_MAX
            return kc_put_rem(b, d, -v - KC_IMAX, True, sig)
        iv = kc_PyLong_FromDouble(d)
    r = v - iv
    if not r:
        return kc_put_double(b, d, sig, KC_SIG_INT)
    return kc_put_rem(b, d, r, False, sig)

cdef inline int kc_put_int(KeyBuf *b, object v, KeyBuf *sig) except -1:
    # v is an int (or int subclass), not a bool.
    cdef int overflow = 0
    cdef long long x = kc_PyLong_AsLongLongAndOverflow(v, &overflow)
    cdef unsigned long long rem = 0
    cdef double d
    cdef unsigned char *p
    cdef int nb, i
    if overflow:
        return kc_put_bigint(b, v, sig)
    d = kc_i64_floor(x, &rem)
    if b.cap - b.len < 18:
        kb_grow(b, 18)
    p = b.data + b.len
    p[0] = KC_TAG_NUM
    kc_store_be64(p + 1, kc_f64_to_key(d))
    if rem == 0:
        p[9] = KC_EXACT
        b.len += 10
    else:
        nb = kc_nbytes_u64(rem)
        p[9] = <unsigned char>(KC_EXACT + nb)
        for i in range(nb):
            p[10 + i] = <unsigned char>(rem >> (8 * (nb - 1 - i)))
        b.len += 10 + nb
    if sig != NULL:
        kb_put_byte(sig, KC_SIG_INT)
    return 0

cdef inline int kc_put_escaped(KeyBuf *b, unsigned char tag,
                               const unsigned char *s, Py_ssize_t n) except -1:
    cdef unsigned char *p
    cdef unsigned char c
    cdef Py_ssize_t i
    if kc_memchr(s, 0, <size_t>n) == NULL:
        if b.cap - b.len < n + 2:
            kb_grow(b, n + 2)
        p = b.data + b.len
        p[0] = tag
        kc_memcpy(p + 1, s, <size_t>n)
        p[n + 1] = KC_END
        b.len += n + 2
        return 0
    kb_reserve(b, 2 * n + 2)
    p = b.data + b.len
    p[0] = tag
    p += 1
    for i in range(n):
        c = s[i]
        p[0] = c
        p += 1
        if c == 0:
            p[0] = KC_ESC
            p += 1
    p[0] = KC_END
    p += 1
    b.len = p - b.data
    return 0

cdef int kc_put_str_slow(KeyBuf *b, object s) except -1:
    # Called with the exception of PyUnicode_AsUTF8AndSize pending.
    cdef object enc
    if not kc_PyErr_ExceptionMatches(UnicodeEncodeError):
        return -1                   # e.g. MemoryError: propagate
    kc_PyErr_Clear()
    enc = kc_PyUnicode_AsEncodedString(s, b"utf-8", b"surrogatepass")
    return kc_put_escaped(b, KC_TAG_STR,
                          <const unsigned char *>kc_PyBytes_AS_STRING(enc),
                          kc_PyBytes_GET_SIZE(enc))

cdef inline int kc_put_str(KeyBuf *b, object s) except -1:
    cdef Py_ssize_t n = 0
    cdef const char *u = kc_PyUnicode_AsUTF8AndSize(s, &n)
    if u == NULL:
        return kc_put_str_slow(b, s)   # lone surrogates
    return kc_put_escaped(b, KC_TAG_STR, <const unsigned char *>u, n)

cdef inline int kc_put_bytes(KeyBuf *b, object v) except -1:
    return kc_put_escaped(b, KC_TAG_BYTES,
                          <const unsigned char *>kc_PyBytes_AS_STRING(v),
                          kc_PyBytes_GET_SIZE(v))

cdef int kc_put_tuple(KeyBuf *b, tuple v, KeyBuf *sig, int depth) except -1:
    if depth >= KC_MAX_DEPTH:
        kc_raise_depth()
    kb_put_byte(b, KC_TAG_TUPLE)
    for e in v:
        kc_put(b, e, sig, depth + 1)
    kb_put_byte(b, KC_END)
    return 0

cdef int kc_put_list(KeyBuf *b, list v, KeyBuf *sig, int depth) except -1:
    if depth >= KC_MAX_DEPTH:
        kc_raise_depth()
    kb_put_byte(b, KC_TAG_TUPLE)
    for e in v:                     # re-reads the size each step
        kc_put(b, e, sig, depth + 1)
    kb_put_byte(b, KC_END)
    return 0

cdef int kc_put_other(KeyBuf *b, object v, KeyBuf *sig, int depth) except -1:
    # Subclasses of the supported types, then TypeError.
    if isinstance(v, float):
        return kc_put_double(b, kc_PyFloat_AS_DOUBLE(v), sig, KC_SIG_FLOAT)
    if isinstance(v, int):
        return kc_put_int(b, v, sig)
    if isinstance(v, str):
        return kc_put_str(b, v)
    if isinstance(v, bytes):
        return kc_put_bytes(b, v)
    if isinstance(v, tuple):
        return kc_put_tuple(b, <tuple>v, sig, depth)
    if isinstance(v, list):
        return kc_put_list(b, <list>v, sig, depth)
    return kc_raise_type(v)

cdef int kc_put(KeyBuf *b, object v, KeyBuf *sig, int depth) except -1:
    cdef type t = type(v)
    if t is str:
        return kc_put_str(b, v)
    if t is float:
        return kc_put_double(b, kc_PyFloat_AS_DOUBLE(v), sig, KC_SIG_FLOAT)
    if t is int:
        return kc_put_int(b, v, sig)
    if t is tuple:
        return kc_put_tuple(b, <tuple>v, sig, depth)
    if v is None:
        return kb_put_byte(b, KC_TAG_NONE)
    if t is bool:
        return kc_put_double(b, 1.0 if v is True else 0.0, sig, KC_SIG_BOOL)
    if t is bytes:
        return kc_put_bytes(b, v)
    if t is list:
        return kc_put_list(b, <list>v, sig, depth)
    return kc_put_other(b, v, sig, depth)

cdef int kb_put_value(KeyBuf *b, object v, KeyBuf *sig) except -1:
    """Append enc(v) to *b and one sig byte per number to *sig (sig may be
    NULL).  TypeError / ValueError on unsupported input; b and sig may then
    hold partial data (callers reset them)."""
    return kc_put(b, v, sig, 0)

cdef int kb_put_prefix(KeyBuf *b, object prefix) except -1:
    """Append 0x50 + enc(e) for each element of the tuple/list `prefix`,
    without the terminator: a lower bound of every tuple key that starts with
    those elements (append 0xFF for the upper bound)."""
    if isinstance(prefix, tuple):
        kb_put_byte(b, KC_TAG_TUPLE)
        for e in <tuple>prefix:
            kc_put(b, e, NULL, 1)
    elif isinstance(prefix, list):
        kb_put_byte(b, KC_TAG_TUPLE)
        for e in <list>prefix:
            kc_put(b, e, NULL, 1)
    else:
        raise TypeError(
            f"a key prefix must be a tuple or list, not {type(prefix).__name__!r}")
    return 0

cdef int kb_put_item(KeyBuf *b, object key, object id) except -1:
    """Append the full item encoding enc(key) + enc(id) + sig."""
    cdef KeyBuf sig
    kb_init(&sig)
    try:
        kc_put(b, key, &sig, 0)
        kc_put(b, id, &sig, 0)
        kb_reserve(b, sig.len)
        kc_memcpy(b.data + b.len, sig.data, <size_t>sig.len)
        b.len += sig.len
    finally:
        kb_free(&sig)
    return 0

# --------------------------------------------------------------- decode --

cdef int kc_corrupt() except -1:
    raise ValueError("corrupt key encoding")

cdef Py_ssize_t kc_rem_span(const unsigned char *p, Py_ssize_t n, Py_ssize_t i,
                            double d, Py_ssize_t *start) except -1:
    """Validate the marker and remainder of the number at p[i:n] (double d,
    marker p[i + 9] != KC_EXACT, 10 bytes available); set *start to the index
    of the remainder's first byte and return its length."""
    cdef unsigned char m = p[i + 9]
    cdef Py_ssize_t j = i + 10
    cdef Py_ssize_t rl
    cdef unsigned long long L
    if d == -KC_INFINITY:
        # an int below -DBL_MAX: m = -v - IMAX, length code and bytes inverted
        if m == KC_NEG_LONG:
            if n - j < 4:
                kc_corrupt()
            L = 0xFFFFFFFFULL - <unsigned long long>kc_load_be32(p + j)
            j += 4
            if L <= KC_MAX_REM or L > KC_MAX_LONG:
                kc_corrupt()
            rl = <Py_ssize_t>L
        elif m >= KC_NEG_SHORT and m < 0xFF:
            rl = 0xFF - <Py_ssize_t>m
        else:
            kc_corrupt()
        if n - j < rl or p[j] == 0xFF:
            kc_corrupt()
    else:
        if m == KC_POS_LONG and d == KC_DBL_MAX:
            if n - j < 4:
                kc_corrupt()
            L = <unsigned long long>kc_load_be32(p + j)
            j += 4
            if L <= KC_MAX_REM or L > KC_MAX_LONG:
                kc_corrupt()
            rl = <Py_ssize_t>L
        elif m > KC_EXACT and m <= KC_EXACT + KC_MAX_REM:
            rl = <Py_ssize_t>m - KC_EXACT
        else:
            kc_corrupt()
        if n - j < rl or p[j] == 0:
            kc_corrupt()
        # a remainder only follows the floor of an int no double holds
        if not kc_isfinite(d) or (d < 9007199254740992.0 and d > -9007199254740992.0):
            kc_corrupt()
    start[0] = j
    return rl

cdef Py_ssize_t kc_skip(const unsigned char *p, Py_ssize_t n, Py_ssize_t i,
                        int depth, Py_ssize_t *nnum) except -1:
    """Validate the structure of one enc(v) at p[i:n]; return the index just
    after it and add the numbers it holds to *nnum."""
    cdef unsigned char tag, m
    cdef double d
    cdef Py_ssize_t j, rl
    cdef const unsigned char *q
    if i >= n:
        kc_corrupt()
    tag = p[i]
    if tag == KC_TAG_NONE:
        return i + 1
    if tag == KC_TAG_NUM:
        if n - i < 10:
            kc_corrupt()
        d = kc_key_to_f64(kc_load_be64(p + i + 1))
        if kc_isnan(d) or kc_is_neg_zero(d):
            kc_corrupt()
        m = p[i + 9]
        nnum[0] += 1
        if m == KC_EXACT:
            return i + 10
        rl = kc_rem_span(p, n, i, d, &j)
        return j + rl
    if tag == KC_TAG_STR or tag == KC_TAG_BYTES:
        j = i + 1
        while True:
            if j >= n:
                kc_corrupt()
            q = <const unsigned char *>kc_memchr(p + j, 0, <size_t>(n - j))
            if q == NULL:
                kc_corrupt()
            j = q - p
            if j + 1 < n and p[j + 1] == KC_ESC:
                j += 2
                continue
            return j + 1
    if tag == KC_TAG_TUPLE:
        if depth >= KC_MAX_DEPTH:
            kc_corrupt()
        j = i + 1
        while True:
            if j >= n:
                kc_corrupt()
            if p[j] == KC_END:
                return j + 1
            j = kc_skip(p, n, j, depth + 1, nnum)
    kc_corrupt()
    return -1

cdef object kc_dec_escaped(const unsigned char *p, Py_ssize_t start,
                           Py_ssize_t end, bint is_str):
    """Decode the escaped body p[start:end] (end = index of the terminator)."""
    cdef KeyBuf tmp
    cdef Py_ssize_t i
    cdef const unsigned char *s = p + start
    cdef Py_ssize_t n = end - start
    if kc_memchr(s, 0, <size_t>n) == NULL:
        if is_str:
            try:
                return kc_PyUnicode_DecodeUTF8(<const char *>s, n, b"surrogatepass")
            except UnicodeDecodeError:
                kc_corrupt()
        return kc_PyBytes_FromStringAndSize(<const char *>s, n)
    kb_init(&tmp)
    try:
        kb_reserve(&tmp, n)
        i = 0
        while i < n:
            tmp.data[tmp.len] = s[i]
            tmp.len += 1
            if s[i] == 0:
                i += 1              # skip the 0xFF of the escape
            i += 1
        if is_str:
            try:
                return kc_PyUnicode_DecodeUTF8(<const char *>tmp.data, tmp.len,
                                               b"surrogatepass")
            except UnicodeDecodeError:
                kc_corrupt()
        return kc_PyBytes_FromStringAndSize(<const char *>tmp.data, tmp.len)
    finally:
        kb_free(&tmp)

cdef object kc_dec_bignum(const unsigned char *p, Py_ssize_t n, Py_ssize_t i,
                          double d, Py_ssize_t *pos):
    """The int at p[i:] (double d, a remainder after it); advance pos."""
    cdef Py_ssize_t j = 0
    cdef Py_ssize_t k
    cdef Py_ssize_t rl = kc_rem_span(p, n, i, d, &j)
    cdef object iv, r
    cdef bytes mb
    cdef unsigned char *q
    pos[0] = j + rl
    if not kc_isfinite(d):
        # d = -inf: v = -IMAX - m, m stored inverted
        mb = kc_PyBytes_FromStringAndSize(NULL, rl)
        q = <unsigned char *>kc_PyBytes_AS_STRING(mb)
        for k in range(rl):
            q[k] = p[j + k] ^ 0xFF
        return -KC_IMAX - int.from_bytes(mb, "big")
    r = int.from_bytes(
        kc_PyBytes_FromStringAndSize(<const char *>(p + j), rl), "big")
    iv = kc_PyLong_FromDouble(d)
    if d != KC_DBL_MAX and r >= kc_PyLong_FromDouble(kc_next_up(d)) - iv:
        kc_corrupt()                # not the floor: non-canonical
    return iv + r

cdef object kc_dec_exact(double d, unsigned char s):
    """The number a double holds exactly, typed by its sig byte s (0: none,
    then float)."""
    if s == KC_SIG_FLOAT or s == 0:
        return kc_PyFloat_FromDouble(d)
    if s == KC_SIG_INT:
        if not kc_isfinite(d) or kc_floor(d) != d:
            kc_corrupt()
        if -9.2e18 < d < 9.2e18:
            return kc_PyLong_FromLongLong(<long long>d)
        return kc_PyLong_FromDouble(d)
    if s == KC_SIG_BOOL:
        if d == 0.0:
            return False
        if d == 1.0:
            return True
    kc_corrupt()

cdef object kc_dec(const unsigned char *p, Py_ssize_t n, Py_ssize_t *pos,
                   const unsigned char *sig, Py_ssize_t *sigpos):
    """Decode one (already validated) enc(v) at p[pos[0]:]; advance pos.  With
    sig == NULL numbers come back untyped: float when exact, int otherwise."""
    cdef Py_ssize_t i = pos[0]
    cdef Py_ssize_t j
    cdef unsigned char tag = p[i]
    cdef unsigned char m, s
    cdef double d
    cdef const unsigned char *q
    cdef list items
    if tag == KC_TAG_NONE:
        pos[0] = i + 1
        return None
    if tag == KC_TAG_NUM:
        d = kc_key_to_f64(kc_load_be64(p + i + 1))
        m = p[i + 9]
        s = 0
        if sig != NULL:
            s = sig[sigpos[0]]
            sigpos[0] += 1
        if m == KC_EXACT:
            pos[0] = i + 10
            return kc_dec_exact(d, s)
        if s != KC_SIG_INT and s != 0:
            kc_corrupt()
        return kc_dec_bignum(p, n, i, d, pos)
    if tag == KC_TAG_STR or tag == KC_TAG_BYTES:
        j = i + 1
        while True:
            q = <const unsigned char *>kc_memchr(p + j, 0, <size_t>(n - j))
            j = q - p
            if j + 1 < n and p[j + 1] == KC_ESC:
                j += 2
                continue
            break
        pos[0] = j + 1
        return kc_dec_escaped(p, i + 1, j, tag == KC_TAG_STR)
    # KC_TAG_TUPLE
    items = []
    j = i + 1
    while p[j] != KC_END:
        pos[0] = j
        items.append(kc_dec(p, n, pos, sig, sigpos))
        j = pos[0]
    pos[0] = j + 1
    return kc_PyList_AsTuple(items)

cdef tuple kb_decode_item(const unsigned char *p, Py_ssize_t n):
    """(key, id) from a full item encoding E = enc(key) + enc(id) + sig.
    Bytes after the last sig byte (the core's zero padding) are ignored.
    ValueError("corrupt key encoding") on malformed input; never reads p[n:]."""
    cdef Py_ssize_t nnum = 0
    cdef Py_ssize_t end, k, pos, sigpos, j
    cdef object key, ident
    cdef const unsigned char *q
    cdef double d
    # Fast path for the commonest shape, a str key without NUL characters and
    # an id a double holds: 0x30 body 0x00 | 0x20 d[8] 0x01 | sig.  It checks
    # what kc_skip would and decodes in one pass.
    if n >= 13 and p[0] == KC_TAG_STR:
        q = <const unsigned char *>kc_memchr(p + 1, 0, <size_t>(n - 1))
        if q != NULL:
            j = q - p               # the terminator (unless an escape follows)
            if (n - j >= 12 and p[j + 1] == KC_TAG_NUM and p[j + 10] == KC_EXACT
                    and p[j + 11] >= KC_SIG_INT and p[j + 11] <= KC_SIG_BOOL):
                d = kc_key_to_f64(kc_load_be64(p + j + 2))
                if kc_isnan(d) or kc_is_neg_zero(d):
                    kc_corrupt()
                try:
                    key = kc_PyUnicode_DecodeUTF8(<const char *>(p + 1), j - 1, b"surrogatepass")
                except UnicodeDecodeError:
                    kc_corrupt()
                return (key, kc_dec_exact(d, p[j + 11]))
    end = kc_skip(p, n, 0, 0, &nnum)
    end = kc_skip(p, n, end, 0, &nnum)
    if n - end < nnum:
        kc_corrupt()
    for k in range(end, end + nnum):
        if p[k] < KC_SIG_INT or p[k] > KC_SIG_BOOL:
            kc_corrupt()
    pos = 0
    sigpos = 0
    key = kc_dec(p, n, &pos, p + end, &sigpos)
    ident = kc_dec(p, n, &pos, p + end, &sigpos)
    return (key, ident)

cdef object kb_decode_value(const unsigned char *p, Py_ssize_t n):
    """One enc(v) without sig (bytes after it are ignored).  Numbers carry no
    type here: an exact number comes back as float (so 1 -> 1.0 and
    True -> 1.0), an int that no double holds as int."""
    cdef Py_ssize_t nnum = 0
    cdef Py_ssize_t pos = 0
    cdef Py_ssize_t sigpos = 0
    kc_skip(p, n, 0, 0, &nnum)
    return kc_dec(p, n, &pos, NULL, &sigpos)

# ------------------------------------------------------ Python test hooks --

def _encode_key(v):
    """enc(v) as bytes (no sig)."""
    cdef KeyBuf b
    kb_init(&b)
    try:
        kb_put_value(&b, v, NULL)
        return kc_PyBytes_FromStringAndSize(<const char *>b.data, b.len)
    finally:
        kb_free(&b)

def _encode_item(key, id):
    """The full item encoding enc(key) + enc(id) + sig as bytes."""
    cdef KeyBuf b
    kb_init(&b)
    try:
        kb_put_item(&b, key, id)
        return kc_PyBytes_FromStringAndSize(<const char *>b.data, b.len)
    finally:
        kb_free(&b)

def _encode_prefix(p):
    """The prefix bound of the tuple/list p (0x50 + enc of each element)."""
    cdef KeyBuf b
    kb_init(&b)
    try:
        kb_put_prefix(&b, p)
        return kc_PyBytes_FromStringAndSize(<const char *>b.data, b.len)
    finally:
        kb_free(&b)

def _decode_item(bytes b not None):
    """(key, id) from an item encoding (trailing bytes ignored)."""
    return kb_decode_item(<const unsigned char *>kc_PyBytes_AS_STRING(b),
                          kc_PyBytes_GET_SIZE(b))

def _decode_key(bytes b not None):
    """One enc(v) without sig, as kb_decode_value (exact numbers -> float)."""
    return kb_decode_value(<const unsigned char *>kc_PyBytes_AS_STRING(b),
                           kc_PyBytes_GET_SIZE(b))
