/*
 * snapshot.c - the checksum of aggtree snapshots (docs/SNAPSHOT.md): zlib's
 * crc32 (the reflected CRC-32 of gzip and PNG, polynomial 0xEDB88320),
 * computed with carry-less multiplication where the CPU has it.
 *
 * A snapshot's trailer is zlib.crc32 of everything before it, and the pure
 * Python implementation computes it with zlib.  zlib 1.2.13 (the one Python
 * links here) computes ~3.7 GB/s, as much time as reading the snapshot
 * itself; folding 64 bytes per step with PCLMULQDQ (the method of Intel's
 * "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ
 * Instruction", as the Linux kernel's crc32-pclmul does) computes the same
 * value several times faster.  Where PCLMULQDQ is missing,
 * agg_snapshot_crc32_fast() says so and the caller uses zlib.
 *
 * Where the CPU has VPCLMULQDQ (AVX-512), the fold runs on 64-byte registers
 * (crc_vclmul, ~2x the speed here); AGGTREE_NO_VPCLMUL in the environment
 * (read at the first checksum) keeps the 128-bit fold, for tests.
 *
 * A large buffer's checksum is computed in two halves on two threads and
 * the halves' CRCs combined (agg_snapshot_crc32_combine: a CRC is linear,
 * so crc(A B) = crc(A) * x^(8 |B|) + crc(B) mod P).  The per-item checks of
 * a numeric section (agg_snapshot_check_items) are split the same way.
 * Either runs on one thread below SNAP_PAR_MIN bytes, without threads in
 * the build, and with AGGTREE_THREADS=1 in the environment.
 *
 * No Python, no allocation, no global state but the CPU check.
 */
#include "snapshot.h"
#include "core/threading.h"

#include <math.h>
#include <string.h>

/* Bytes from which the checksum and the item checks use a second thread. */
#define SNAP_PAR_MIN ((size_t)4 << 20)

/* Byte-at-a-time update of the raw (not inverted) reflected CRC. */
static uint32_t crc_table[256];
static int crc_table_ready;

static void crc_table_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
        crc_table[i] = c;
    }
    crc_table_ready = 1;
}

static uint32_t crc_bytes(uint32_t crc, const uint8_t *p, size_t n) {
    if (!crc_table_ready)
        crc_table_init();
    while (n--)
        crc = crc_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_CLMUL_PATH 1

/* The 64-byte fold of the loops below: x * k (its low qword by k's low,
 * its high by k's high), plus the next data. */
#define FOLD128(x, k, data) \
    _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128((x), (k), 0x00), \
                                _mm_clmulepi64_si128((x), (k), 0x11)), (data))

/* The end of a fold: four 16-byte lanes x1..x4 holding everything before p,
 * then p[0:n] (n a multiple of 16, 16-byte aligned), to the raw crc.
 * Constants: x^(128+32) / x^(128-32) mod P (the 16-byte fold), x^64 mod P,
 * and the Barrett pair (floor(x^64 / P), P), all bit-reflected. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t crc_lanes_finish(__m128i x1, __m128i x2, __m128i x3, __m128i x4,
                                 const uint8_t *p, size_t n) {
    const __m128i k3k4 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x1f7011641LL, 0x1db710641LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    __m128i t1, t2;
    /* four lanes into one */
    x1 = FOLD128(x1, k3k4, x2);
    x1 = FOLD128(x1, k3k4, x3);
    x1 = FOLD128(x1, k3k4, x4);
    while (n >= 16) {
        x1 = FOLD128(x1, k3k4, _mm_load_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
    /* 128 -> 64 bits (appending 32 zero bits) */
    t1 = _mm_clmulepi64_si128(k3k4, x1, 0x01);       /* k4 * x1.lo */
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), t1);
    /* 64 -> 32 */
    t2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, mask32);
    x1 = _mm_clmulepi64_si128(x1, k5, 0x00);
    x1 = _mm_xor_si128(x1, t2);
    /* Barrett reduction to 32 bits */
    t2 = x1;
    x1 = _mm_and_si128(x1, mask32);
    x1 = _mm_clmulepi64_si128(x1, poly, 0x10);
    x1 = _mm_and_si128(x1, mask32);
    x1 = _mm_clmulepi64_si128(x1, poly, 0x00);
    x1 = _mm_xor_si128(x1, t2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}

/* Fold 16-byte aligned p[0:n] (n a multiple of 16, >= 64) into the raw crc,
 * 64 bytes (four 16-byte lanes) per step.  Constants: x^(4*128+32) /
 * x^(4*128-32) mod P (the 64-byte fold), bit-reflected. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t crc_clmul(uint32_t crc, const uint8_t *p, size_t n) {
    const __m128i k1k2 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    __m128i x1 = _mm_load_si128((const __m128i *)p);
    __m128i x2 = _mm_load_si128((const __m128i *)(p + 16));
    __m128i x3 = _mm_load_si128((const __m128i *)(p + 32));
    __m128i x4 = _mm_load_si128((const __m128i *)(p + 48));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    p += 64;
    n -= 64;
    while (n >= 64) {
        x1 = FOLD128(x1, k1k2, _mm_load_si128((const __m128i *)p));
        x2 = FOLD128(x2, k1k2, _mm_load_si128((const __m128i *)(p + 16)));
        x3 = FOLD128(x3, k1k2, _mm_load_si128((const __m128i *)(p + 32)));
        x4 = FOLD128(x4, k1k2, _mm_load_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    return crc_lanes_finish(x1, x2, x3, x4, p, n);
}

/* The same with VPCLMULQDQ (AVX-512): four 64-byte registers, 256 bytes per
 * step, each 16-byte lane folded by x^(2048+32) / x^(2048-32) mod P; then
 * the four registers into one (the 64-byte fold above), the rest of the
 * input 64 bytes at a time, and the register's four lanes to
 * crc_lanes_finish.  p 16-byte aligned, n a multiple of 16, >= 256.  240 MB
 * in 7.3 ms on one thread here, against 15.8 for the 128-bit fold
 * (bench/README.md). */
#if (defined(__clang__) && __clang_major__ >= 8) || (!defined(__clang__) && __GNUC__ >= 9)
#define HAVE_VCLMUL_PATH 1
#define FOLD512(x, k, data) \
    _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128((x), (k), 0x00), \
                              _mm512_clmulepi64_epi128((x), (k), 0x11), (data), 0x96)
__attribute__((target("avx512f,avx512vl,vpclmulqdq,pclmul,sse4.1")))
static uint32_t crc_vclmul(uint32_t crc, const uint8_t *p, size_t n) {
    const __m512i k2048 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x1322d1430LL, 0x11542778aLL));
    const __m512i k512 = _mm512_broadcast_i32x4(_mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL));
    __m512i a = _mm512_loadu_si512((const void *)p);
    __m512i b = _mm512_loadu_si512((const void *)(p + 64));
    __m512i c = _mm512_loadu_si512((const void *)(p + 128));
    __m512i d = _mm512_loadu_si512((const void *)(p + 192));
    a = _mm512_xor_si512(a, _mm512_castsi128_si512(_mm_cvtsi32_si128((int)crc)));
    p += 256;
    n -= 256;
    while (n >= 256) {
        a = FOLD512(a, k2048, _mm512_loadu_si512((const void *)p));
        b = FOLD512(b, k2048, _mm512_loadu_si512((const void *)(p + 64)));
        c = FOLD512(c, k2048, _mm512_loadu_si512((const void *)(p + 128)));
        d = FOLD512(d, k2048, _mm512_loadu_si512((const void *)(p + 192)));
        p += 256;
        n -= 256;
    }
    a = FOLD512(a, k512, b);
    a = FOLD512(a, k512, c);
    a = FOLD512(a, k512, d);
    while (n >= 64) {
        a = FOLD512(a, k512, _mm512_loadu_si512((const void *)p));
        p += 64;
        n -= 64;
    }
    return crc_lanes_finish(_mm512_extracti32x4_epi32(a, 0), _mm512_extracti32x4_epi32(a, 1),
                            _mm512_extracti32x4_epi32(a, 2), _mm512_extracti32x4_epi32(a, 3),
                            p, n);
}
#endif

static int clmul_checked, clmul_ok, vclmul_ok;

int agg_snapshot_crc32_fast(void) {
    if (!clmul_checked) {
        __builtin_cpu_init();
        clmul_ok = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
        vclmul_ok = clmul_ok && __builtin_cpu_supports("avx512f") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("vpclmulqdq") &&
                    !getenv("AGGTREE_NO_VPCLMUL");
        clmul_checked = 1;
    }
    return clmul_ok;
}
#else
int agg_snapshot_crc32_fast(void) { return 0; }
#endif

/* agg_snapshot_crc32 on the calling thread. */
static uint32_t crc32_serial(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
#ifdef HAVE_CLMUL_PATH
    if (n >= 64 + 15 && agg_snapshot_crc32_fast()) {
        size_t pre = (16 - ((uintptr_t)p & 15)) & 15, body;
        crc = crc_bytes(crc, p, pre);
        p += pre;
        n -= pre;
        body = n & ~(size_t)15;
#ifdef HAVE_VCLMUL_PATH
        crc = vclmul_ok && body >= 256 ? crc_vclmul(crc, p, body) : crc_clmul(crc, p, body);
#else
        crc = crc_clmul(crc, p, body);
#endif
        p += body;
        n -= body;
    }
#endif
    return ~crc_bytes(crc, p, n);
}

/* ------------------------------------------------------------------ */
/* Combining CRCs, and two threads                                    */
/* ------------------------------------------------------------------ */

/* a * b mod P, for bit-reflected polynomials of degree < 32 (bit 31 holds
 * the coefficient of x^0, bit 0 that of x^31). */
static uint32_t gf2_mulmod(uint32_t a, uint32_t b) {
    uint32_t r = 0;
    for (int i = 0; i < 32; i++) {
        if (a & (0x80000000u >> i))                 /* a has x^i: add b * x^i */
            r ^= b;
        b = (b & 1) ? (b >> 1) ^ 0xEDB88320u : b >> 1;   /* b *= x, mod P */
    }
    return r;
}

uint32_t agg_snapshot_crc32_combine(uint32_t crc1, uint32_t crc2, uint64_t len2) {
    uint32_t r = 0x80000000u, sq = 0x80000000u;     /* 1, then x^8 below */
    for (int i = 0; i < 8; i++)
        sq = gf2_mulmod(sq, 0x40000000u);           /* times x */
    for (; len2; len2 >>= 1) {                      /* r = x^(8 len2) */
        if (len2 & 1)
            r = gf2_mulmod(r, sq);
        sq = gf2_mulmod(sq, sq);
    }
    return gf2_mulmod(r, crc1) ^ crc2;
}

typedef struct crc_half {
    const uint8_t *p;
    size_t n;
    uint32_t crc;                /* in: the starting value; out: the result */
} crc_half;

static void *crc_half_job(void *arg) {
    crc_half *h = (crc_half *)arg;
    h->crc = crc32_serial(h->crc, h->p, h->n);
    return NULL;
}

uint32_t agg_snapshot_crc32(uint32_t crc, const uint8_t *p, size_t n) {
    if (n >= SNAP_PAR_MIN && threads_allowed()) {
        crc_half a = {p, n / 2, crc}, b = {p + n / 2, n - n / 2, 0};
        (void)agg_snapshot_crc32_fast();            /* (its CPU check, before the threads) */
        if (run_two(crc_half_job, &a, &b))
            return agg_snapshot_crc32_combine(a.crc, b.crc, b.n);
    }
    return crc32_serial(crc, p, n);
}

/* Key images (heads) of the numeric kinds: zero; -0.0 unmapped; +-inf. */
#define HEAD_ZERO 0x8000000000000000ULL
#define HEAD_NEGZERO 0x7FFFFFFFFFFFFFFFULL
#define HEAD_POSINF 0xFFF0000000000000ULL
#define HEAD_NEGINF 0x000FFFFFFFFFFFFFULL

/* The double whose key image is h (the core's agg_f64_to_key inverted). */
static double head_to_f64(uint64_t h) {
    uint64_t u = (h >> 63) ? (h ^ 0x8000000000000000ULL) : ~h;
    double d;
    memcpy(&d, &u, 8);
    return d;
}

typedef struct check_part {
    const uint64_t *keys;        /* (head, rest) pairs */
    const double *vals;
    uint64_t lo, hi;             /* items [lo, hi) */
    int kind;
    int64_t bad;                 /* out: first bad item, or -1 */
    int what;                    /* out: 1 value, 2 key image */
} check_part;

static void *check_job(void *arg) {
    check_part *c = (check_part *)arg;
    c->bad = -1;
    for (uint64_t j = c->lo; j < c->hi; j++) {
        uint64_t h;
        if (c->vals && !isfinite(c->vals[j])) {
            c->what = 1;
            c->bad = (int64_t)j;
            return NULL;
        }
        if (!c->keys)
            continue;
        h = c->keys[2 * j];
        if (c->kind == AGG_SNAP_KIND_NONE) {
            if (h != HEAD_ZERO)
                goto bad_key;
            continue;
        }
        /* images of NaNs lie below that of -inf or above that of +inf */
        if (h < HEAD_NEGINF || h > HEAD_POSINF || h == HEAD_NEGZERO)
            goto bad_key;
        if (c->kind == AGG_SNAP_KIND_INT) {
            double d = head_to_f64(h);
            if (!(floor(d) == d && fabs(d) <= 9007199254740992.0))
                goto bad_key;
        }
        continue;
    bad_key:
        c->what = 2;
        c->bad = (int64_t)j;
        return NULL;
    }
    return NULL;
}

int64_t agg_snapshot_check_items(const uint64_t *keys, const double *vals, uint64_t n,
                                 int kind, int *what) {
    check_part a = {keys, vals, 0, n, kind, -1, 0}, b = a;
    if (n * 24 >= SNAP_PAR_MIN && threads_allowed()) {
        a.hi = b.lo = n / 2;
        if (run_two(check_job, &a, &b)) {
            const check_part *first = a.bad >= 0 ? &a : &b;
            *what = first->what;
            return first->bad;
        }
        a.hi = n;                                   /* (no helper: all here) */
    }
    check_job(&a);
    *what = a.what;
    return a.bad;
}
