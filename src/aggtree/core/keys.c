/*
 * core/keys.c - key images (doubles and int64 to FAST keys and back), the byte
 * codec of GENERAL keys and tail copies.  The key order itself (compare,
 * in-node searches) is inline in internal.h, where every unit sees it.
 *
 * 3. Keys
 * -------
 * An agg_key is (head, rest).  FAST: both are order-preserving 64-bit
 * images, compared as one unsigned 128-bit integer (branch-free: the hot
 * search loops compile to cmov chains).  GENERAL: head is the first 8
 * bytes of the encoding, rest a pointer to an agg_tail holding the others;
 * compare heads, and only on a tie the tails (memcmp, shorter first).  The
 * mode is stored in the tree and every search routine exists twice, one
 * per mode, chosen by one predictable branch per node visit.  Within a node
 * the FAST search is a branch-free binary search (lower or upper bound)
 * that stops at <= 8 candidates and counts those with independent
 * compares; the GENERAL one runs the same branch-free search on the heads
 * alone and compares tails (memcmp) only within the run of keys whose head
 * ties with the searched one - usually empty, so a GENERAL search costs
 * about what a FAST one does (it was an ordinary binary search on the
 * three-way compare, ~2x slower on short strings).  On
 * entry to a node the part of it the operation will read is prefetched -
 * the key region always, the values of a leaf for get / insert / delete,
 * the counts for rank / select - so the cache misses of one node overlap
 * instead of forming a chain of dependent misses (this halves get and rank
 * times on a tree larger than the cache).
 *
 * GENERAL tails are reference counted.  The item owns one reference; a
 * separator that copies the item's key owns one more.  So building a
 * separator never allocates, and a separator can outlive its item (delete
 * leaves separators alone) without dangling.  Tails passed in are borrowed:
 * insert allocates the tree's own copy (refs = 1) once it knows the key is
 * new.  A tail of length 0 is the same key as no tail, so it is dropped on
 * entry (rest = 0) and never stored.
 *
 */
#include "internal.h"

/* See aggtree.h. */
uint64_t agg_f64_to_key(double x)
{
    return f64_image(x);
}

/* See aggtree.h.  (The loop vectorises; per key it is a fraction of a
 * nanosecond, against ~2 ns for two calls per key from the bindings.) */
void agg_fast_keys(const double *keys, const int64_t *ids, agg_key *out, uint64_t n)
{
    uint64_t i;
    for (i = 0; i < n; i++) {
        out[i].head = f64_image(keys[i] + 0.0);   /* -0.0 -> 0.0 */
        out[i].rest = i64_image(ids[i]);
    }
}

/* Inverse of agg_f64_to_key. */
double agg_key_to_f64(uint64_t k)
{
    uint64_t b = (k >> 63) ? (k & ~(UINT64_C(1) << 63)) : ~k;
    double x;
    memcpy(&x, &b, sizeof x);
    return x;
}

/* See aggtree.h. */
uint64_t agg_i64_to_key(int64_t x)
{
    return i64_image(x);
}

/* Inverse of agg_i64_to_key. */
int64_t agg_key_to_i64(uint64_t k)
{
    uint64_t u = k ^ (UINT64_C(1) << 63);
    int64_t x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* See aggtree.h. */
int agg_key_cmp(agg_keymode mode, agg_key a, agg_key b)
{
    return mode == AGG_KEYS_FAST ? key_cmp_fast(a, b) : key_cmp_general(a, b);
}

/* See aggtree.h: head = e[0..8) big-endian, zero-padded; the rest into
 * tail_buf (refs 0) when len > 8.  Never allocates. */
agg_key agg_key_from_bytes(const uint8_t *e, size_t len, agg_tail *tail_buf)
{
    agg_key k;
    size_t i, h = len < 8 ? len : 8;
    k.head = 0;
    for (i = 0; i < h; i++)
        k.head |= (uint64_t)e[i] << (56 - 8 * i);
    k.rest = 0;
    if (len > 8) {
        tail_buf->refs = 0;
        tail_buf->len = (uint32_t)(len - 8);
        memcpy(tail_buf->bytes, e + 8, len - 8);
        k.rest = (uint64_t)(uintptr_t)tail_buf;
    }
    return k;
}

/* See aggtree.h. */
agg_key agg_key_from_item_bytes(const uint8_t *e, size_t len, size_t meta,
                                agg_tail *tail_buf)
{
    agg_key k = agg_key_from_bytes(e, len, tail_buf);
    if (k.rest && meta)
        tail_buf->len |= (uint32_t)meta << AGG_TAIL_META_SHIFT;
    return k;
}

/* See aggtree.h: 8 head bytes then the tail, at most cap written; returns
 * the full length. */
size_t agg_key_to_bytes(agg_key k, uint8_t *out, size_t cap)
{
    const agg_tail *tl = (const agg_tail *)(uintptr_t)k.rest;
    size_t tlen = tl ? TAIL_LEN(tl) : 0, i;
    for (i = 0; i < 8 && i < cap; i++)
        out[i] = (uint8_t)(k.head >> (56 - 8 * i));
    if (tlen && cap > 8)
        memcpy(out + 8, tl->bytes, tlen < cap - 8 ? tlen : cap - 8);
    return 8 + tlen;
}

/* The key to store for a new item: GENERAL keys with a tail get the tree's
 * own copy (refs = 1).  0 on allocation failure (nothing allocated). */
AGG_INTERN int tail_copy(agg_tree *t, agg_key k, agg_key *out)
{
    *out = k;
    if (t->mode == AGG_KEYS_GENERAL && k.rest) {
        const agg_tail *src = key_tail(k);
        agg_tail *cp = (agg_tail *)mem_alloc(t, tail_bytes(TAIL_LEN(src)));
        if (!cp)
            return 0;
        cp->refs = 1;
        cp->len = src->len;
        memcpy(cp->bytes, src->bytes, TAIL_LEN(src));
        out->rest = (uint64_t)(uintptr_t)cp;
    }
    return 1;
}
