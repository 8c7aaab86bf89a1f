/*
 * core/sort.c - agg_keys_sort: (key, value) pairs in FAST order by radix sort, on
 * two threads from 65536 records.
 *
 * 14. Sorting keys
 * ----------------
 * agg_keys_sort orders (key, value) pairs by FAST order for bulk loads
 * (insert_many sorts batches of ~10^5, from_arrays 10^6).  np.lexsort((ids,
 * keys)) takes ~250 ms for 1,000,000 pairs here, qsort of the keys alone
 * ~145 ms.  Everything works on a prefix of the composite 128-bit key
 * (head << 64 | rest): the bits that differ between some two keys are
 * found (OR ^ AND of all keys), and the prefix is head's varying span
 * (its highest to its lowest varying bit), then rest's, cut to 64 bits.
 * Bits outside the spans are the same in every key, so prefix order is
 * key order up to ties, and keys with equal prefixes differ only below
 * the cut (ids 0..n-1 leave most of rest constant, doubles in [0, 1) the
 * sign and top exponent bits: their prefix is exponent, mantissa, top of
 * the id).  Radix digits are taken from (prefix - smallest prefix) of the
 * range at hand, so that a range from 0x0ff.. to 0x100.. (varying in its
 * top bit) is not put nearly all in two buckets.
 *
 *   n <= 16: insertion sort.
 *   keys already in order: nothing to do; in reverse (non-increasing)
 *     order: reversed in place (neither needs scratch; both checks stop at
 *     the first key out of their order, after a few keys for most input).
 *   n <= 16384 (ksort_local): 8-byte pairs prefix << log2(n) | index
 *     (the prefix cut to 64 - log2(n) bits) are MSD radix sorted, digits
 *     of log2(m) + 1 bits (about half a pair per bucket); buckets of more
 *     than 8 pairs are sorted recursively, the rest by one insertion pass
 *     over the range, which moves a pair only inside its bucket (the
 *     digit orders the buckets).  Then the records are gathered by index;
 *     runs of equal (cut) prefixes are sorted again the same way, each on
 *     its own varying bits.
 *   larger (the split): histograms of the first 12 prefix bits (one per
 *     chunk of the input); runs of digit values grouped into buckets that
 *     close at max(384, 2n / 1023) records, or before a digit value that
 *     would take them past twice that (at most 1024 buckets, so at most
 *     2048 write streams; the grouping evens out skewed bits such as the
 *     exponents of doubles, and a heavy value - few distinct heads - gets
 *     a bucket of its own); the records are scattered into the scratch
 *     arrays; then each bucket is sorted back into the caller's arrays
 *     (ksort_direct): one scatter by the top log2(m) + 1 bits of (prefix -
 *     smallest prefix) and one insertion pass comparing the prefixes (and
 *     the keys, where the prefix was cut).  Radix buckets of more than 32
 *     go to ksort_local; a split bucket of more than 16384 records (one
 *     heavy digit value) to the former MSD radix sort of the records
 *     (ksort_msd, ping-pong between the arrays and the scratch, digits only
 *     where that bucket's keys vary), whose leaves are ksort_direct and
 *     ksort_local.  The records cross memory twice; the second time one
 *     bucket (~10-50 KB) at a time, in cache.
 *   two threads, from 65536 records: the caller starts a detached helper
 *     and hands it the split; the input chunks (n / 2^14 of them, 4 to
 *     16) to scan for varying bits, then (after the caller has made the
 *     prefix) to count, then (after its plan) to scatter, then the buckets
 *     to sort are taken one at a time from atomic counters by whichever
 *     thread asks; waits spin briefly, then yield.  The caller never
 *     waits for the helper to start (start-up took 0.05-3 ms here while
 *     the other core was busy): a late helper finds less or nothing left;
 *     the caller waits at most for a piece the helper holds.  The
 *     hand-over goes through one mutex-protected slot (one two-thread sort
 *     at a time per process: a concurrent caller sorts on its own), so a
 *     helper never touches a split whose caller has returned, and it owns
 *     no memory.  Everything is allocated before the helper starts (the
 *     failure injector stays deterministic).
 *     AGGTREE_THREADS=1 in the environment forces one thread; builds
 *     without pthreads or C11 atomics (or with AGG_NO_THREADS) have one.
 *
 * Scratch, one allocation before anything moves (AGG_NOMEM leaves the
 * input untouched): n * 24 bytes (16 without values; up to 16384 keys
 * n * 24 either way) plus ~2 MB per thread of counters and work area and
 * 0.4 MB for the split.  Measured with bench_sort (table of every key
 * shape, one and two threads, against the former sort: bench/README.md,
 * "Core design measurements"): 10^6 random keys ~19 ns per key on one
 * thread and ~10 on two, against ~22 for the former sort.  At 10^6 one
 * thread is bound by memory (the records cross it twice, ~170 bytes a key
 * with the scans); at 10^5 by the scatters and the insertion passes.
 * Commands:
 *   cmake -S . -B build -G Ninja -DAGGTREE_TESTS=ON && cmake --build build
 *   BENCH_REPS=25 build/bench_sort                  (two threads)
 *   AGGTREE_THREADS=1 BENCH_REPS=25 build/bench_sort
 * tests/c/test_sort.c checks the sort against qsort on these shapes and
 * more, at sizes across every threshold above, one and two threads.
 */
#include "internal.h"

/* Sort state (one per thread).  The records (24 bytes: key and value)
 * go from the caller's arrays (a) to scratch arrays (b) of the same size
 * (the split) and back, each bucket sorted on the way (ksort_direct); an
 * input of at most SORT_LOCAL records is sorted in place as 8-byte pairs
 * (prefix << b | index) in the work area w, then gathered by index
 * (ksort_local).  See section 14. */
typedef struct ksort {
    agg_key *ka, *kb;            /* records: caller's, scratch (NULL: none) */
    double *va, *vb;             /* values (NULL: none) */
    uint64_t *w;                 /* pairs or prefixes: 3 * min(n, SORT_LOCAL) words */
    uint32_t *pcnt;              /* pair levels: SORT_NCNT counters each */
    uint64_t *cnt;               /* record levels, likewise (NULL: none) */
    uint64_t vhead, vrest;       /* bits that differ between some two keys */
} ksort;

#define SORT_WMAX 12             /* widest digit */
#define SORT_WTOP 11             /* widest digit while out of cache */
#define SORT_PER (-1)            /* log2 of the keys aimed at per radix bucket */
#define SORT_INCACHE (1u << 17)  /* keys that fit in a cache level */
#define SORT_LOCAL (1u << 14)    /* larger inputs are split; larger buckets split again */
#define SORT_SMALL 16            /* insertion sort of records at or below this */
#define SORT_PSMALL 8            /* radix buckets of pairs left to the insertion pass */
#define SORT_DSMALL 32           /* radix buckets of records left to the insertion pass */
#define SORT_MAXDEPTH 34         /* record levels: each scatters >= 4 bits of 128, plus the last */
#define SORT_PMAXDEPTH 18        /* pair levels: >= 4 bits of 64 each, plus the last */
#define SORT_NCNT ((1u << SORT_WMAX) + 1)
#define SORT_DBITS 12            /* widest first digit of the split */
#define SORT_BUCKET 384          /* records aimed at per bucket of the split */
#define SORT_NBMAX 1024          /* most buckets of the split (write streams) */
#define SORT_THREADS_MIN (1u << 16) /* two threads from this many records */

/* FAST order: (head, rest) unsigned. */
AGG_INLINE int ksort_lt(agg_key a, agg_key b)
{
    return key_lt_fast(a, b);
}

/* Insertion sort of n keys (and values) in place. */
static void ksort_small(agg_key *k, double *v, uint64_t n)
{
    uint64_t i, j;
    if (v) {
        for (i = 1; i < n; i++) {
            agg_key x = k[i];
            double y = v[i];
            for (j = i; j > 0 && ksort_lt(x, k[j - 1]); j--) {
                k[j] = k[j - 1];
                v[j] = v[j - 1];
            }
            k[j] = x;
            v[j] = y;
        }
    } else {
        for (i = 1; i < n; i++) {
            agg_key x = k[i];
            for (j = i; j > 0 && ksort_lt(x, k[j - 1]); j--)
                k[j] = k[j - 1];
            k[j] = x;
        }
    }
}

/* Leading zero bits of x != 0. */
AGG_INLINE int agg_clz64(uint64_t x)
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_clzll(x);
#else
    int n = 0;
    while (!(x & (UINT64_C(1) << 63))) {
        x <<= 1;
        n++;
    }
    return n;
#endif
}

/* Trailing zero bits of x != 0. */
AGG_INLINE int agg_ctz64(uint64_t x)
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctzll(x);
#else
    int n = 0;
    while (!(x & 1)) {
        x >>= 1;
        n++;
    }
    return n;
#endif
}

/* The digit width for a range of n keys or pairs. */
AGG_INLINE uint32_t ksort_width(uint64_t n)
{
    uint32_t w = (uint32_t)(63 - agg_clz64(n)) - SORT_PER;
    w = w < 4 ? 4 : w > SORT_WMAX ? SORT_WMAX : w;
    if (n > SORT_INCACHE && w > SORT_WTOP)
        w = SORT_WTOP;
    return w;
}

/* MSD radix sort of the n pairs at p0 (or at p1, with in1) on bits lo..hi
 * (the bits below lo are the index); the result ends at p0.  Buckets of
 * more than SORT_PSMALL pairs are sorted recursively; the small ones are
 * finished by one insertion pass over the whole range, which moves every
 * pair only inside its own bucket (all bits above the digit are equal in
 * the range, the digit orders the buckets) and so costs at most
 * SORT_PSMALL steps a pair.  cnt: this level's counters, then the deeper
 * levels'; with have_cnt they already hold the histogram of the w-bit
 * digit ending at bit hi. */
static void ksort_pairs(uint64_t *p0, uint64_t *p1, uint32_t *cnt, uint32_t n, int hi, int lo,
                        int in1, uint32_t w, int have_cnt)
{
    uint64_t *x = in1 ? p1 : p0, *y = in1 ? p0 : p1;
    uint32_t mask, nb, d, i, j, sum, big = 0;
    int shift;
    for (;;) {
        if (hi < lo || n <= SORT_PSMALL) {
            if (in1)
                memcpy(p0, p1, (size_t)n * sizeof *p0);
            if (hi >= lo)           /* else all bits used: index order stands */
                goto finish;
            return;
        }
        if (!have_cnt)
            w = ksort_width(n);
        shift = hi - (int)w + 1;
        if (shift < lo) {
            shift = lo;
            w = (uint32_t)(hi - lo + 1);
        }
        mask = (1u << w) - 1;
        nb = mask + 1;
        if (!have_cnt) {
            memset(cnt, 0, (size_t)nb * sizeof *cnt);
            for (i = 0; i < n; i++)
                cnt[(x[i] >> shift) & mask]++;
        }
        have_cnt = 0;
        for (d = 0; d < nb; d++)
            if (cnt[d])
                break;
        if (cnt[d] != n)
            break;
        hi = shift - 1;             /* one bucket holds all: next digit */
    }
    /* scatter into the other buffer (then back to p0), sort each large
     * bucket there */
    sum = 0;
    for (d = 0; d < nb; d++) {
        uint32_t c = cnt[d];
        cnt[d] = sum;
        sum += c;
        big |= c > SORT_PSMALL;
    }
    for (i = 0; i < n; i++) {
        uint64_t p = x[i];
        y[cnt[(p >> shift) & mask]++] = p;
    }
    if (!in1)
        memcpy(p0, p1, (size_t)n * sizeof *p0);
    if (big) {                      /* cnt[d] is now the end of bucket d */
        uint32_t start = 0;
        for (d = 0; d < nb; d++) {
            uint32_t end = cnt[d];
            if (end - start > SORT_PSMALL)
                ksort_pairs(p0 + start, p1 + start, cnt + SORT_NCNT, end - start, shift - 1, lo,
                            0, 0, 0);
            start = end;
        }
    }
    if (shift == lo)                /* the last digit: ties keep index order */
        return;
finish:                             /* finish the small buckets */
    for (i = 1; i < n; i++) {
        uint64_t p = p0[i];
        if (p < p0[i - 1]) {
            j = i;
            do {
                p0[j] = p0[j - 1];
                j--;
            } while (j > 0 && p < p0[j - 1]);
            p0[j] = p;
        }
    }
}

/* How a key maps to its prefix: ((((head << ah) >> bh) & mh) << ch) |
 * (((rest << ar) >> br) & mr): the varying span of head (its highest to
 * its lowest varying bit), then that of rest, cut to the top eff bits.
 * Bits outside the spans are the same in every key, so dropping them
 * keeps the order. */
typedef struct kprefix {
    int ah, bh, ch, ar, br;
    uint64_t mh, mr;
} kprefix;

AGG_INLINE uint64_t ksort_prefix(const kprefix *f, agg_key k)
{
    return ((((k.head << f->ah) >> f->bh) & f->mh) << f->ch) |
           (((k.rest << f->ar) >> f->br) & f->mr);
}

/* Set f up for keys with varying bits vh, vr (not both 0), keeping at
 * most maxbits (1..64) bits; returns eff, the prefix's width, and sets
 * *total to the width of both spans (the prefix is exact if eff == total). */
static int ksort_prefix_setup(kprefix *f, uint64_t vh, uint64_t vr, int maxbits, int *total)
{
    int hi_h = 0, hi_r = 0, lh = 0, lr = 0, eff;
    if (vh) {
        hi_h = 63 - agg_clz64(vh);
        lh = hi_h - agg_ctz64(vh) + 1;
    }
    if (vr) {
        hi_r = 63 - agg_clz64(vr);
        lr = hi_r - agg_ctz64(vr) + 1;
    }
    *total = lh + lr;
    eff = *total < maxbits ? *total : maxbits;
    memset(f, 0, sizeof *f);
    if (lh >= eff) {                /* all head */
        f->ah = 63 - hi_h;
        f->bh = 64 - eff;
        f->mh = ~UINT64_C(0);
    } else {                        /* all of head's span, then the top of rest's */
        int rb = eff - lh;
        if (lh) {
            f->ah = 63 - hi_h;
            f->bh = 64 - lh;
            f->mh = ~UINT64_C(0);
            f->ch = rb;
        }
        f->ar = 63 - hi_r;
        f->br = 64 - rb;
        f->mr = ~UINT64_C(0);
    }
    return eff;
}

/* OR and AND of the heads and of the rests of k[0..n): m = {OR heads, AND
 * heads, OR rests, AND rests}; a bit varies between two of the keys where
 * OR ^ AND has it (m[0] ^ m[1] for heads, m[2] ^ m[3] for rests). */
static void keys_or_and(const agg_key *k, uint64_t n, uint64_t m[4])
{
    uint64_t hor = 0, hand = ~UINT64_C(0), ror = 0, rand_ = ~UINT64_C(0), i;
    for (i = 0; i < n; i++) {
        hor |= k[i].head;
        hand &= k[i].head;
        ror |= k[i].rest;
        rand_ &= k[i].rest;
    }
    m[0] = hor;
    m[1] = hand;
    m[2] = ror;
    m[3] = rand_;
}

/* Sort the n records xk/xv (SORT_SMALL < n <= SORT_LOCAL, or n of the
 * work area) into dk/dv, which are either the same arrays or disjoint
 * ones; xv and dv are both NULL or both not.  known: keys_or_and of
 * these keys if the caller has it, else NULL.  Uses s->w and s->pcnt. */
static void ksort_local(const ksort *s, agg_key *xk, double *xv, agg_key *dk, double *dv,
                        uint64_t n, const uint64_t *known)
{
    uint64_t own[4], vh, vr, i, imask;
    const uint64_t *mk = known;
    uint32_t *cnt = s->pcnt;
    uint64_t *p0 = s->w, run = 0;
    int b, eff, total, top;
    uint32_t w, mask;
    kprefix f;
    if (!mk) {
        keys_or_and(xk, n, own);
        mk = own;
    }
    vh = mk[0] ^ mk[1];
    vr = mk[2] ^ mk[3];
    if (!vh && !vr) {               /* all keys equal */
        if (dk != xk) {
            memcpy(dk, xk, (size_t)n * sizeof *dk);
            if (xv)
                memcpy(dv, xv, (size_t)n * sizeof *dv);
        }
        return;
    }
    b = 64 - agg_clz64(n - 1);      /* index bits */
    eff = ksort_prefix_setup(&f, vh, vr, 64 - b, &total);
    /* build the pairs; then subtract the smallest prefix, so that the
     * top digit spans the prefixes' range, not just their varying bits
     * (keys from 0x0ff0.. to 0x100f.. vary in the top bit, but would
     * share it but for a few) */
    {
        uint64_t lo = ~UINT64_C(0), hi = 0, base;
        int bits;
        for (i = 0; i < n; i++) {
            uint64_t q = ksort_prefix(&f, xk[i]);
            lo = q < lo ? q : lo;
            hi = q > hi ? q : hi;
            p0[i] = q << b | i;
        }
        bits = 64 - agg_clz64(hi - lo);     /* hi > lo: the keys differ in the prefix */
        base = lo << b;
        w = ksort_width(n);
        if ((int)w > bits)
            w = (uint32_t)bits;
        top = b + bits - (int)w;
        mask = (1u << w) - 1;
        memset(cnt, 0, (size_t)(mask + 1) * sizeof *cnt);
        for (i = 0; i < n; i++) {
            uint64_t p = p0[i] - base;
            p0[i] = p;
            cnt[(p >> top) & mask]++;
        }
        ksort_pairs(p0, p0 + n, cnt, (uint32_t)n, b + bits - 1, b, 0, w, 1);
    }
    /* gather by index (in place: through the work area after the pairs);
     * note whether two neighbours share a prefix */
    imask = (UINT64_C(1) << b) - 1;
    {
        agg_key *g = dk == xk ? (agg_key *)(void *)(p0 + n) : dk;
        g[0] = xk[p0[0] & imask];
        for (i = 1; i < n; i++) {
            g[i] = xk[p0[i] & imask];
            run |= ((p0[i] ^ p0[i - 1]) >> b) == 0;
        }
        if (g != dk)
            memcpy(dk, g, (size_t)n * sizeof *dk);
    }
    if (xv) {
        double *g = dv == xv ? (double *)(void *)(p0 + n) : dv;
        for (i = 0; i < n; i++)
            g[i] = xv[p0[i] & imask];
        if (g != dv)
            memcpy(dv, g, (size_t)n * sizeof *dv);
    }
    if (!run || eff == total)
        return;                     /* equal prefixes: equal keys */
    /* runs of equal prefixes differ below them: sort each in place, on its
     * own varying bits (fewer than here: the prefix's are gone) */
    {
        uint64_t start = 0, cur = ksort_prefix(&f, dk[0]), nx = 0, m;
        for (i = 1; i <= n; i++) {
            if (i < n && (nx = ksort_prefix(&f, dk[i])) == cur)
                continue;
            m = i - start;
            if (m > SORT_SMALL)
                ksort_local(s, dk + start, dv ? dv + start : NULL, dk + start,
                            dv ? dv + start : NULL, m, NULL);
            else if (m > 1)
                ksort_small(dk + start, dv ? dv + start : NULL, m);
            start = i;
            cur = nx;
        }
    }
}

/* The prefix of a whole split (NULL: none, each range finds its own). */
typedef struct kglobal {
    kprefix f;
    int eff, total;
} kglobal;

/* Sort the n records xk/xv (SORT_SMALL < n <= SORT_LOCAL) into the
 * disjoint arrays dk/dv (xv, dv: both NULL or both not): one scatter of
 * the records by the top digit of (prefix - smallest prefix), the prefix
 * being g's (the split's) or found here from the range's varying bits,
 * then buckets of more than SORT_DSMALL records sorted in place by
 * ksort_local, and one insertion pass over the whole range for the small
 * ones (keys move only inside their bucket: at most SORT_DSMALL steps).
 * The insertion pass compares the prefixes, then the keys if the prefixes
 * are equal but not exact.  Uses s->w (prefixes) and the last level of
 * s->pcnt. */
static void ksort_direct(const ksort *s, const kglobal *g, agg_key *xk, double *xv,
                         agg_key *dk, double *dv, uint64_t n)
{
    uint64_t i, *q = s->w, *qd = s->w + n, lo = ~UINT64_C(0), hi = 0;
    uint32_t *cnt = s->pcnt + (size_t)(SORT_PMAXDEPTH - 1) * SORT_NCNT, w, d, nb, sum, big = 0;
    int eff, total, bits, shift;
    kprefix f;
    if (g) {
        f = g->f;
        eff = g->eff;
        total = g->total;
    } else {
        uint64_t mk[4], vh, vr;
        keys_or_and(xk, n, mk);
        vh = mk[0] ^ mk[1];
        vr = mk[2] ^ mk[3];
        if (!vh && !vr) {           /* all keys equal */
            memcpy(dk, xk, (size_t)n * sizeof *dk);
            if (xv)
                memcpy(dv, xv, (size_t)n * sizeof *dv);
            return;
        }
        eff = ksort_prefix_setup(&f, vh, vr, 64, &total);
    }
    for (i = 0; i < n; i++) {
        uint64_t p = ksort_prefix(&f, xk[i]);
        lo = p < lo ? p : lo;
        hi = p > hi ? p : hi;
        q[i] = p;
    }
    bits = hi > lo ? 64 - agg_clz64(hi - lo) : 0;
    w = ksort_width(n);
    if (g && (int)w > bits) {       /* g's prefix hardly tells these keys apart */
        ksort_direct(s, NULL, xk, xv, dk, dv, n);
        return;
    }
    if ((int)w > bits)
        w = (uint32_t)bits;
    shift = bits - (int)w;
    nb = 1u << w;
    memset(cnt, 0, (size_t)nb * sizeof *cnt);
    for (i = 0; i < n; i++)
        cnt[(q[i] - lo) >> shift]++;
    sum = 0;
    for (d = 0; d < nb; d++) {
        uint32_t c = cnt[d];
        cnt[d] = sum;
        sum += c;
        big |= c > SORT_DSMALL;
    }
    if (xv) {
        for (i = 0; i < n; i++) {
            uint32_t at = cnt[(q[i] - lo) >> shift]++;
            dk[at] = xk[i];
            dv[at] = xv[i];
            qd[at] = q[i];
        }
    } else {
        for (i = 0; i < n; i++) {
            uint32_t at = cnt[(q[i] - lo) >> shift]++;
            dk[at] = xk[i];
            qd[at] = q[i];
        }
    }
    if (shift == 0 && eff == total)
        return;                     /* the digit was the whole key */
    if (big) {                      /* cnt[d] is now the end of bucket d */
        uint32_t start = 0;
        for (d = 0; d < nb; d++) {
            uint32_t end = cnt[d];
            if (end - start > SORT_DSMALL)
                ksort_local(s, dk + start, dv ? dv + start : NULL, dk + start,
                            dv ? dv + start : NULL, end - start, NULL);
            start = end;
        }
        for (i = 0; i < n; i++)     /* ksort_local used their room */
            qd[i] = ksort_prefix(&f, dk[i]);
    }
    {                               /* insertion by prefix (and key) */
        int exact = eff == total;
        for (i = 1; i < n; i++) {
            uint64_t x = qd[i];
            if (x < qd[i - 1] || (!exact && x == qd[i - 1] && ksort_lt(dk[i], dk[i - 1]))) {
                agg_key kx = dk[i];
                double vx = dv ? dv[i] : 0;
                uint64_t j = i;
                do {
                    qd[j] = qd[j - 1];
                    dk[j] = dk[j - 1];
                    if (dv)
                        dv[j] = dv[j - 1];
                    j--;
                } while (j > 0 && (x < qd[j - 1] ||
                                   (!exact && x == qd[j - 1] && ksort_lt(kx, dk[j - 1]))));
                qd[j] = x;
                dk[j] = kx;
                if (dv)
                    dv[j] = vx;
            }
        }
    }
}

/* Highest varying bit of the composite 128-bit key (head << 64 | rest)
 * at or below bit p, or -1. */
static int ksort_next_bit(const ksort *s, int p)
{
    if (p >= 64) {
        uint64_t m = s->vhead & (p >= 127 ? ~UINT64_C(0) : ((UINT64_C(1) << (p - 63)) - 1));
        if (m)
            return 64 + 63 - agg_clz64(m);
        p = 63;
    }
    if (p < 0)
        return -1;
    {
        uint64_t m = s->vrest & (p >= 63 ? ~UINT64_C(0) : ((UINT64_C(1) << (p + 1)) - 1));
        return m ? 63 - agg_clz64(m) : -1;
    }
}

/* The w-bit digit of k whose lowest bit is composite bit `shift`. */
AGG_INLINE uint32_t ksort_digit(agg_key k, int shift, uint32_t mask)
{
    if (shift >= 64)
        return (uint32_t)(k.head >> (shift - 64)) & mask;
    if (shift == 0)
        return (uint32_t)k.rest & mask;
    return (uint32_t)((k.rest >> shift) | (k.head << (64 - shift))) & mask;
}

/* MSD radix sort of the records [off, off + n), currently in buffer b
 * (in_b) or a, on the bits at and below composite bit p; the result ends
 * in a.  Ranges of at most SORT_LOCAL records go to ksort_direct (from b)
 * or ksort_local (in a). */
static void ksort_msd(ksort *s, uint64_t off, uint64_t n, int p, int depth, int in_b)
{
    agg_key *xk = in_b ? s->kb : s->ka, *yk = in_b ? s->ka : s->kb;
    double *xv = in_b ? s->vb : s->va, *yv = in_b ? s->va : s->vb;
    uint64_t *cnt = s->cnt + (size_t)depth * SORT_NCNT, i, sum;
    uint32_t w, mask, nb, d;
    int shift;
    for (;;) {
        p = ksort_next_bit(s, p);
        if (p < 0 || n <= SORT_SMALL) {
            ksort_small(xk + off, xv ? xv + off : NULL, n);
            if (in_b) {
                memcpy(s->ka + off, xk + off, (size_t)n * sizeof *xk);
                if (xv)
                    memcpy(s->va + off, xv + off, (size_t)n * sizeof *xv);
            }
            return;
        }
        if (n <= SORT_LOCAL) {
            if (in_b)
                ksort_direct(s, NULL, xk + off, xv ? xv + off : NULL, s->ka + off,
                             s->va ? s->va + off : NULL, n);
            else
                ksort_local(s, xk + off, xv ? xv + off : NULL, xk + off, xv ? xv + off : NULL, n,
                            NULL);
            return;
        }
        /* at most 2^SORT_WTOP buckets while the data is larger than the
         * caches (many write streams thrash the TLB) */
        w = ksort_width(n);
        shift = p - (int)w + 1;
        if (shift < 0) {
            shift = 0;
            w = (uint32_t)p + 1;
        }
        mask = (1u << w) - 1;
        nb = mask + 1;
        memset(cnt, 0, (size_t)nb * sizeof *cnt);
        for (i = 0; i < n; i++)
            cnt[ksort_digit(xk[off + i], shift, mask)]++;
        for (d = 0; d < nb; d++)
            if (cnt[d])
                break;
        if (cnt[d] != n)
            break;
        p = shift - 1;              /* one bucket holds all: next digit */
    }
    /* scatter into the other buffer, then sort each bucket there */
    sum = off;
    for (d = 0; d < nb; d++) {
        uint64_t c = cnt[d];
        cnt[d] = sum;
        sum += c;
    }
    if (xv) {
        for (i = off; i < off + n; i++) {
            uint64_t at = cnt[ksort_digit(xk[i], shift, mask)]++;
            yk[at] = xk[i];
            yv[at] = xv[i];
        }
    } else {
        for (i = off; i < off + n; i++)
            yk[cnt[ksort_digit(xk[i], shift, mask)]++] = xk[i];
    }
    /* cnt[d] is now the end of bucket d */
    {
        uint64_t start = off;
        for (d = 0; d < nb; d++) {
            uint64_t end = cnt[d];
            if (end > start)
                ksort_msd(s, start, end - start, shift - 1, depth + 1, !in_b);
            start = end;
        }
    }
}

/* A range of the split: sort the n records at offset off of b into a
 * (g: the split's prefix). */
static void ksort_bucket(ksort *s, const kglobal *g, uint64_t off, uint64_t n)
{
    if (n <= SORT_SMALL) {
        memcpy(s->ka + off, s->kb + off, (size_t)n * sizeof *s->ka);
        if (s->va)
            memcpy(s->va + off, s->vb + off, (size_t)n * sizeof *s->va);
        ksort_small(s->ka + off, s->va ? s->va + off : NULL, n);
    } else if (n <= SORT_LOCAL) {
        ksort_direct(s, g, s->kb + off, s->vb ? s->vb + off : NULL, s->ka + off,
                     s->va ? s->va + off : NULL, n);
    } else {                        /* a heavy digit value: MSD on its own varying bits */
        ksort t = *s;
        uint64_t mk[4];
        keys_or_and(s->kb + off, n, mk);
        t.vhead = mk[0] ^ mk[1];
        t.vrest = mk[2] ^ mk[3];
        ksort_msd(&t, off, n, 127, 0, 1);
    }
}

#define KSORT_CHUNKS 16          /* most pieces of the input (n / 2^14, at least 4) */

/* The split.  The records a -> b by the first dbits bits of their
 * prefix, grouped into at most SORT_NBMAX buckets of about SORT_BUCKET
 * records or more (a run of digit values per bucket: the histogram
 * evens out skewed bits such as the exponents of doubles); then every
 * bucket is sorted from b into a.  The caller's thread makes the
 * histograms (one per chunk of the input) and the plan; the chunks to
 * scatter and then the buckets to sort are handed out one at a time to
 * whichever thread asks, the caller's and a helper's.  The caller never
 * waits for the helper to start: if it comes late, the caller has done
 * more of the work (all of it, if the helper never comes), and waits at
 * most for a chunk or a bucket the helper has taken. */
typedef struct ksplit {
    ksort *s[2];                 /* state of the caller, of the helper */
    int sh, dbits;
    uint64_t n, target;
    kglobal g;                   /* the prefix (64 bits at most) */
    uint32_t *hist;              /* KSORT_CHUNKS x 2^dbits counters */
    uint16_t *tab;               /* digit value -> bucket */
    uint64_t *start;             /* bucket k: [start[k], start[k + 1]) */
    uint64_t *pos;               /* KSORT_CHUNKS x SORT_NBMAX: next place of chunk j in bucket k */
    uint64_t chunk[KSORT_CHUNKS + 1];
    uint64_t mask[KSORT_CHUNKS][4]; /* per chunk: OR, AND of heads, of rests */
    int nch;                     /* pieces of the input */
    int equal;                   /* all keys are equal: nothing to do */
    uint32_t nbk;                /* buckets */
#if AGG_THREADS
    atomic_int next_mask, masks_done, masked, next_hist, hists_done, planned;
    atomic_int next_chunk, chunks_done;
    atomic_uint next_bucket, buckets_done;
#else
    int next_mask, masks_done, masked, next_hist, hists_done, planned;
    int next_chunk, chunks_done;
    unsigned next_bucket, buckets_done;
#endif
} ksplit;

#if AGG_THREADS
typedef atomic_int ks_count;
#else
typedef int ks_count;
#endif

#if AGG_THREADS
#define KS_TAKE(p) atomic_fetch_add_explicit((p), 1, memory_order_relaxed)
#define KS_DONE(p) atomic_fetch_add_explicit((p), 1, memory_order_release)
#define KS_SEEN(p) atomic_load_explicit((p), memory_order_acquire)
#else
#define KS_TAKE(p) ((*(p))++)
#define KS_DONE(p) ((*(p))++)
#define KS_SEEN(p) (*(p))
#endif

/* Buckets from the summed histograms, and each chunk's first place in
 * each bucket (chunk j's records of a bucket before chunk j + 1's:
 * stable). */
static void ksplit_plan(ksplit *c)
{
    uint32_t nd = 1u << c->dbits, d, nbk = 0, j;
    uint64_t acc = 0, sum = 0, *start = c->start;
    /* a bucket closes once it holds target records, or before a digit
     * value that would take it past 2 * target (a heavy value is best
     * alone: its keys share the prefix bits above the digit); every early
     * close is followed by a bucket of >= target, so there are at most
     * 2n / target + 1 <= SORT_NBMAX */
    start[0] = 0;
    for (d = 0; d < nd; d++) {
        uint64_t h = 0;
        for (j = 0; j < (uint32_t)c->nch; j++)
            h += c->hist[(size_t)j * nd + d];
        if (acc && acc + h > 2 * c->target) {
            start[++nbk] = sum;
            acc = 0;
        }
        c->tab[d] = (uint16_t)nbk;
        acc += h;
        sum += h;
        if (acc >= c->target) {
            start[++nbk] = sum;
            acc = 0;
        }
    }
    if (acc)
        start[++nbk] = c->n;
    c->nbk = nbk;
    memcpy(c->pos, start, (size_t)nbk * sizeof *start);
    for (j = 1; j < (uint32_t)c->nch; j++) {
        uint64_t *p = c->pos + (size_t)j * SORT_NBMAX;
        const uint32_t *h = c->hist + (size_t)(j - 1) * nd;
        memcpy(p, p - SORT_NBMAX, (size_t)nbk * sizeof *p);
        for (d = 0; d < nd; d++)
            p[c->tab[d]] += h[d];
    }
}

/* Wait until *p reaches v (the other thread is finishing its piece). */
#if AGG_THREADS
#define KS_WAIT(p, v)                                       \
    do {                                                    \
        int spin_ = 0;                                      \
        while (KS_SEEN(p) < (v))                            \
            if (++spin_ > 4000) /* long: give way */        \
                sched_yield();                              \
    } while (0)
#else
#define KS_WAIT(p, v) ((void)0)
#endif

/* The end of a phase whose chunks either thread takes: the caller (t ==
 * 0) waits until all c->nch are `done`, runs `lead` (the one-thread step
 * before the next phase) and then marks `open`; the helper waits for
 * that. */
static void ksplit_phase_end(ksplit *c, int t, ks_count *done, void (*lead)(ksplit *),
                             ks_count *open)
{
    (void)done;
    if (t == 0) {
        KS_WAIT(done, c->nch);
        lead(c);
        KS_DONE(open);
    } else {
        KS_WAIT(open, 1);
    }
}

/* The caller's part between the varying bits and the histograms: the
 * prefix and the first digit's width. */
static void ksplit_prefix(ksplit *c)
{
    uint64_t hor = 0, hand = ~UINT64_C(0), ror = 0, rand_ = ~UINT64_C(0);
    int j;
    for (j = 0; j < c->nch; j++) {
        hor |= c->mask[j][0];
        hand &= c->mask[j][1];
        ror |= c->mask[j][2];
        rand_ &= c->mask[j][3];
    }
    c->s[0]->vhead = hor ^ hand;
    c->s[0]->vrest = ror ^ rand_;
    if (c->s[1]) {
        c->s[1]->vhead = c->s[0]->vhead;
        c->s[1]->vrest = c->s[0]->vrest;
    }
    if (!c->s[0]->vhead && !c->s[0]->vrest) {
        c->equal = 1;
        return;
    }
    c->dbits = 63 - agg_clz64(c->n) - 2;
    if (c->dbits > SORT_DBITS)
        c->dbits = SORT_DBITS;
    c->g.eff = ksort_prefix_setup(&c->g.f, c->s[0]->vhead, c->s[0]->vrest, 64, &c->g.total);
    if (c->dbits > c->g.eff)
        c->dbits = c->g.eff;
    c->sh = c->g.eff - c->dbits;
}

/* Take pieces of work as long as there are any (thread t: 0 the caller,
 * 1 the helper): chunks of the input to find the varying bits of, then
 * (once the caller has made the prefix) chunks to count, then (once it
 * has made the plan) chunks to scatter, then buckets to sort.  Each phase
 * starts when every piece of the one before is done; the caller also
 * waits until every bucket is sorted before it returns. */
static void ksplit_work(ksplit *c, int t)
{
    ksort *s = c->s[t];
    const kprefix *f = &c->g.f;
    agg_key *ka = s->ka, *kb = s->kb;
    double *va = s->va, *vb = s->vb;
    int sh, j;
    unsigned k;
    uint32_t nd;
    while ((j = KS_TAKE(&c->next_mask)) < c->nch) {
        keys_or_and(ka + c->chunk[j], c->chunk[j + 1] - c->chunk[j], c->mask[j]);
        KS_DONE(&c->masks_done);
    }
    ksplit_phase_end(c, t, &c->masks_done, ksplit_prefix, &c->masked);
    if (c->equal)
        return;
    sh = c->sh;
    nd = 1u << c->dbits;
    while ((j = KS_TAKE(&c->next_hist)) < c->nch) {
        uint32_t *h = c->hist + (size_t)j * nd;
        uint64_t i;
        memset(h, 0, (size_t)nd * sizeof *h);
        for (i = c->chunk[j]; i < c->chunk[j + 1]; i++)
            h[ksort_prefix(f, ka[i]) >> sh]++;
        KS_DONE(&c->hists_done);
    }
    ksplit_phase_end(c, t, &c->hists_done, ksplit_plan, &c->planned);
    while ((j = KS_TAKE(&c->next_chunk)) < c->nch) {
        uint64_t *pos = c->pos + (size_t)j * SORT_NBMAX, i;
        if (va) {
            for (i = c->chunk[j]; i < c->chunk[j + 1]; i++) {
                uint64_t at = pos[c->tab[ksort_prefix(f, ka[i]) >> sh]]++;
                kb[at] = ka[i];
                vb[at] = va[i];
            }
        } else {
            for (i = c->chunk[j]; i < c->chunk[j + 1]; i++)
                kb[pos[c->tab[ksort_prefix(f, ka[i]) >> sh]]++] = ka[i];
        }
        KS_DONE(&c->chunks_done);
    }
    KS_WAIT(&c->chunks_done, c->nch);
    while ((k = KS_TAKE(&c->next_bucket)) < c->nbk) {
        if (c->start[k + 1] > c->start[k])
            ksort_bucket(s, &c->g, c->start[k], c->start[k + 1] - c->start[k]);
        KS_DONE(&c->buckets_done);
    }
    if (t == 0)
        KS_WAIT(&c->buckets_done, c->nbk);
}

#if AGG_THREADS
/* The job a helper may take: one split at a time in the process (another
 * caller meanwhile sorts on its own).  Every hand-over goes through the
 * mutex, so that a helper never touches a split whose caller has left. */
static pthread_mutex_t g_ksort_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_ksort_cv = PTHREAD_COND_INITIALIZER;
static ksplit *g_ksort_job;      /* open: waiting for a helper */
static int g_ksort_busy;         /* the slot is in use (job open or taken) */
static int g_ksort_helping;      /* a helper works on the taken job */
static pthread_once_t g_ksort_once = PTHREAD_ONCE_INIT;

/* fork() while a two-thread sort runs in another thread: the child has
 * neither that sort nor its helper, so it starts with a free slot (and the
 * lock is held across the fork, so it is never copied half-taken). */
static void ksort_fork_prepare(void)
{
    pthread_mutex_lock(&g_ksort_mu);
}

static void ksort_fork_parent(void)
{
    pthread_mutex_unlock(&g_ksort_mu);
}

static void ksort_fork_child(void)
{
    g_ksort_job = NULL;
    g_ksort_busy = 0;
    g_ksort_helping = 0;
    pthread_mutex_unlock(&g_ksort_mu);
    pthread_cond_init(&g_ksort_cv, NULL);
}

static void ksort_register_fork(void)
{
    pthread_atfork(ksort_fork_prepare, ksort_fork_parent, ksort_fork_child);
}

static void *ksplit_helper(void *arg)
{
    ksplit *c;
    (void)arg;
    pthread_mutex_lock(&g_ksort_mu);
    while (!g_ksort_job && g_ksort_busy && !g_ksort_helping)
        pthread_cond_wait(&g_ksort_cv, &g_ksort_mu);    /* the plan is being made */
    c = g_ksort_job;                /* NULL: closed (done without us) or taken */
    g_ksort_job = NULL;
    if (c)
        g_ksort_helping = 1;
    pthread_mutex_unlock(&g_ksort_mu);
    if (!c)
        return NULL;
    ksplit_work(c, 1);
    pthread_mutex_lock(&g_ksort_mu);
    g_ksort_helping = 0;
    pthread_cond_broadcast(&g_ksort_cv);
    pthread_mutex_unlock(&g_ksort_mu);
    return NULL;
}
#endif

/* Run the split (s1: a helper's state, or NULL for one thread); mem: the
 * split's memory (KSPLIT_BYTES). */
static void ksort_split(ksort *s0, ksort *s1, uint64_t n, char *mem)
{
    ksplit c;
    uint32_t j;
#if AGG_THREADS
    int helper = 0;
#endif
    memset(&c, 0, sizeof c);
    c.s[0] = s0;
    c.s[1] = s1;
    c.n = n;
    c.target = 2 * n / (SORT_NBMAX - 1) + 1;
    if (c.target < SORT_BUCKET)
        c.target = SORT_BUCKET;
    c.start = (uint64_t *)(void *)mem;
    c.pos = c.start + SORT_NBMAX + 1;
    c.hist = (uint32_t *)(void *)(c.pos + (size_t)KSORT_CHUNKS * SORT_NBMAX);
    c.tab = (uint16_t *)(void *)(c.hist + (size_t)KSORT_CHUNKS * ((size_t)1 << SORT_DBITS));
    c.nch = n >> 14 > KSORT_CHUNKS ? KSORT_CHUNKS : n >> 14 < 4 ? 4 : (int)(n >> 14);
    for (j = 0; j <= (uint32_t)c.nch; j++)
        c.chunk[j] = n / (uint32_t)c.nch * j;
    c.chunk[c.nch] = n;
#if AGG_THREADS
    atomic_init(&c.next_mask, 0);
    atomic_init(&c.masks_done, 0);
    atomic_init(&c.masked, 0);
    atomic_init(&c.next_hist, 0);
    atomic_init(&c.hists_done, 0);
    atomic_init(&c.planned, 0);
    atomic_init(&c.next_chunk, 0);
    atomic_init(&c.chunks_done, 0);
    atomic_init(&c.next_bucket, 0);
    atomic_init(&c.buckets_done, 0);
    if (s1) {                       /* start a helper and open the job to it */
        pthread_t th;
        pthread_attr_t at;
        pthread_once(&g_ksort_once, ksort_register_fork);
        pthread_mutex_lock(&g_ksort_mu);
        if (!g_ksort_busy && pthread_attr_init(&at) == 0) {
            if (pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED) == 0 &&
                pthread_create(&th, &at, ksplit_helper, NULL) == 0) {
                g_ksort_busy = 1;
                g_ksort_job = &c;
                helper = 1;
            }
            pthread_attr_destroy(&at);
        }
        pthread_mutex_unlock(&g_ksort_mu);
    }
#else
    (void)s1;
#endif
    ksplit_work(&c, 0);
#if AGG_THREADS
    if (helper) {                   /* close it; wait for a helper still inside */
        pthread_mutex_lock(&g_ksort_mu);
        if (g_ksort_job == &c)
            g_ksort_job = NULL;
        while (g_ksort_helping)
            pthread_cond_wait(&g_ksort_cv, &g_ksort_mu);
        g_ksort_busy = 0;
        pthread_cond_broadcast(&g_ksort_cv);    /* helpers still waiting: leave */
        pthread_mutex_unlock(&g_ksort_mu);
    }
#endif
}

/* Bytes of the split's memory. */
#define KSPLIT_BYTES \
    ((size_t)(SORT_NBMAX + 1 + KSORT_CHUNKS * SORT_NBMAX) * sizeof(uint64_t) + \
     ((size_t)1 << SORT_DBITS) * (KSORT_CHUNKS * sizeof(uint32_t) + sizeof(uint16_t)))

/* See aggtree.h. */
agg_status agg_keys_sort(agg_key *keys, double *values, uint64_t n)
{
    ksort s[2];
    /* all bits "vary" unless measured below (the split measures its own) */
    uint64_t mk[4] = {0, ~UINT64_C(0), 0, ~UINT64_C(0)}, i, cap;
    size_t rbytes = 0, vbytes = 0, wbytes, pbytes, cbytes = 0, sbytes = 0, per, total;
    int nt = 1, t;
    char *mem, *m;
    if (n <= SORT_SMALL) {
        ksort_small(keys, values, n);
        return AGG_OK;
    }
    /* already in order, or in reverse order: no scratch (random input
     * leaves these loops after a few keys) */
    for (i = 1; i < n && !ksort_lt(keys[i], keys[i - 1]); i++)
        ;
    if (i == n)
        return AGG_OK;
    for (i = 1; i < n && !ksort_lt(keys[i - 1], keys[i]); i++)
        ;
    if (i == n) {                   /* non-increasing: reversed, non-decreasing */
        for (i = 0; i < n / 2; i++) {
            agg_key t = keys[i];
            keys[i] = keys[n - 1 - i];
            keys[n - 1 - i] = t;
            if (values) {
                double x = values[i];
                values[i] = values[n - 1 - i];
                values[n - 1 - i] = x;
            }
        }
        return AGG_OK;
    }
    if (n <= SORT_LOCAL || n > UINT32_MAX) {   /* (the split finds them itself) */
        keys_or_and(keys, n, mk);
        if (!(mk[0] ^ mk[1]) && !(mk[2] ^ mk[3]))
            return AGG_OK;          /* all keys equal */
    }
    /* everything is allocated here, before any key moves (and before the
     * second thread starts) */
    cap = n < SORT_LOCAL ? n : SORT_LOCAL;
    wbytes = (size_t)cap * 3 * sizeof(uint64_t);
    pbytes = (size_t)SORT_PMAXDEPTH * SORT_NCNT * sizeof(uint32_t);
    pbytes = (pbytes + 63) & ~(size_t)63;
    if (n > SORT_LOCAL) {
        rbytes = (size_t)n * sizeof(agg_key);
        vbytes = values ? (size_t)n * sizeof(double) : 0;
        cbytes = (size_t)SORT_MAXDEPTH * SORT_NCNT * sizeof(uint64_t);
        sbytes = KSPLIT_BYTES;
        if (n >= SORT_THREADS_MIN && n <= UINT32_MAX && threads_allowed())
            nt = 2;
    }
    per = wbytes + pbytes + cbytes;
    total = rbytes + vbytes + (size_t)nt * per + sbytes;
    mem = (char *)raw_alloc(total);
    if (!mem)
        return AGG_NOMEM;
    for (t = 0; t < nt; t++) {
        m = mem + rbytes + vbytes + (size_t)t * per;
        s[t].ka = keys;
        s[t].va = values;
        s[t].kb = rbytes ? (agg_key *)(void *)mem : NULL;
        s[t].vb = vbytes ? (double *)(void *)(mem + rbytes) : NULL;
        s[t].vhead = mk[0] ^ mk[1];
        s[t].vrest = mk[2] ^ mk[3];
        s[t].pcnt = (uint32_t *)(void *)m;
        s[t].cnt = cbytes ? (uint64_t *)(void *)(m + pbytes) : NULL;
        s[t].w = (uint64_t *)(void *)(m + pbytes + cbytes);
    }
    if (n <= SORT_LOCAL)
        ksort_local(&s[0], keys, values, keys, values, n, mk);   /* masks measured above */
    else if (n > UINT32_MAX)        /* the split's counters are 32-bit */
        ksort_msd(&s[0], 0, n, 127, 0, 0);
    else
        ksort_split(&s[0], nt > 1 ? &s[1] : NULL, n, mem + rbytes + vbytes + (size_t)nt * per);
    free(mem);
    return AGG_OK;
}
