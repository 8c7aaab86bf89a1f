/*
 * core/check.c - agg_tree_check, the verifier of invariants I1-I9
 * (section 4 in internal.h).
 *
 * 11. The checker
 * ---------------
 * agg_tree_check walks everything and verifies I1..I9.  Exact sums are
 * verified with an exact fixed-point accumulator (2304 bits in 32-bit
 * digits) summing the subtree's values, inexact ones by recomputing
 * node_summary() and comparing bits.  Tail reference counts are verified
 * without allocating (the header promises AGG_OK or AGG_CORRUPT only): once
 * the separators are known to satisfy I2, every separator equal to a key
 * lies on that key's search path, at most one per node, so the references
 * to a tail are counted by one descent per reference.  The first failure is
 * reported with the level, the node's position within its level, the entry
 * and the rule.
 *
 */
#include "internal.h"

/* a = 0. */
AGG_INTERN void xacc_zero(xacc *a)
{
    memset(a, 0, sizeof *a);
    a->lo = XACC_DIGITS;
    a->hi = -1;
}

/* Carry so that |digit| < 2^32 everywhere; shrink [lo, hi]. */
static void xacc_norm(xacc *a)
{
    int i;
    a->adds = 0;
    if (a->lo > a->hi)
        return;
    for (i = a->lo; i < XACC_DIGITS - 1; i++) {
        int64_t carry = a->d[i] / ((int64_t)1 << 32);   /* truncates */
        a->d[i] -= carry * ((int64_t)1 << 32);
        a->d[i + 1] += carry;
        if (carry && i + 1 > a->hi)
            a->hi = i + 1;
        if (i >= a->hi)
            break;
    }
    while (a->lo <= a->hi && a->d[a->lo] == 0)
        a->lo++;
    while (a->hi >= a->lo && a->d[a->hi] == 0)
        a->hi--;
    if (a->lo > a->hi) {
        a->lo = XACC_DIGITS;
        a->hi = -1;
    }
}

/* a += x, exactly. */
AGG_INTERN void xacc_add(xacc *a, double x)
{
    uint64_t bits, m, lo, hi;
    uint32_t e, pos, limb, sh;
    int64_t s;
    if (!(x - x == 0.0)) {
        a->nonfinite = 1;
        return;
    }
    memcpy(&bits, &x, sizeof bits);
    s = (bits >> 63) ? -1 : 1;
    e = (uint32_t)((bits >> 52) & 0x7ff);
    m = bits & ((UINT64_C(1) << 52) - 1);
    if (e) {
        m |= UINT64_C(1) << 52;
        pos = e - 1;
    } else {
        pos = 0;
    }
    if (m == 0)
        return;
    limb = pos / 32;
    sh = pos % 32;
    lo = (m & 0xffffffffu) << sh;
    hi = (m >> 32) << sh;
    a->d[limb] += s * (int64_t)(lo & 0xffffffffu);
    a->d[limb + 1] += s * (int64_t)((lo >> 32) + (hi & 0xffffffffu));
    a->d[limb + 2] += s * (int64_t)(hi >> 32);
    if ((int)limb < a->lo)
        a->lo = (int)limb;
    if ((int)limb + 2 > a->hi)
        a->hi = (int)limb + 2;
    if (++a->adds >= (1u << 28))
        xacc_norm(a);
}

/* a += b. */
AGG_INTERN void xacc_merge(xacc *a, xacc *b)
{
    int i;
    xacc_norm(b);
    a->nonfinite |= b->nonfinite;
    if (b->lo > b->hi)
        return;
    xacc_norm(a);
    for (i = b->lo; i <= b->hi; i++)
        a->d[i] += b->d[i];
    if (b->lo < a->lo)
        a->lo = b->lo;
    if (b->hi > a->hi)
        a->hi = b->hi;
    xacc_norm(a);
}

/* 1 iff the accumulated value is exactly 0. */
AGG_INTERN int xacc_is_zero(xacc *a)
{
    xacc_norm(a);
    return a->lo > a->hi;
}

/* State of one agg_tree_check walk. */
typedef struct chk {
    const agg_tree *t;           /* the tree */
    char *msg;                   /* where the failure message goes */
    size_t msg_len;              /* its capacity */
    node *prev_leaf;             /* last leaf visited, in key order */
    agg_key last_key;            /* last item key visited */
    int have_last;               /* last_key is set */
    uint64_t level_pos[MAX_DEPTH]; /* nodes visited so far per level */
    uint64_t items;              /* items seen */
    size_t bytes;                /* node bytes seen */
    size_t tail_bytes;           /* bytes of the distinct tails (second pass) */
} chk;

/* Record the failure (printf-style) and return 0. */
static int chk_fail(chk *c, const char *fmt, ...)
{
    va_list ap;
    if (c->msg && c->msg_len) {
        va_start(ap, fmt);
        vsnprintf(c->msg, c->msg_len, fmt, ap);
        va_end(ap);
    }
    return 0;
}

/* Verify the subtree n at `level` (0 = root), I1..I8 locally; on success
 * return 1 and its item count, exact value sum, and min / max keys. */
static int chk_node(chk *c, node *n, uint32_t level, int rightmost,
                    uint64_t *count, xacc *sum, agg_key *kmin, agg_key *kmax)
{
    const agg_tree *t = c->t;
    uint64_t at = c->level_pos[level]++;
    uint32_t lowfill, i;
    int is_root = level == 0;
    if (level >= t->depth)
        return chk_fail(c, "level %u node %llu: below the leaf level (depth %u)",
                        level, (unsigned long long)at, t->depth);
    if (!!n->leaf != (level == t->depth - 1))
        return chk_fail(c, "level %u node %llu: %s at the wrong level (depth %u)",
                        level, (unsigned long long)at, n->leaf ? "leaf" : "internal node",
                        t->depth);
    if (n->leaf)
        lowfill = (is_root || rightmost) ? 1 : t->min;
    else
        lowfill = (is_root || rightmost) ? 2 : t->min;
    if (n->count > t->cap || n->count < lowfill)
        return chk_fail(c, "level %u node %llu: %s holds %u, allowed %u..%u%s",
                        level, (unsigned long long)at, n->leaf ? "leaf" : "internal node",
                        n->count, lowfill, t->cap,
                        is_root ? " (root)" : rightmost ? " (rightmost)" : "");

    if (n->leaf) {
        agg_key *keys = node_keys(n);
        const double *vals = leaf_vals(t, n);
        c->bytes += t->leaf_bytes;
        if (n->prev != c->prev_leaf)
            return chk_fail(c, "level %u leaf %llu: prev pointer does not point to the previous leaf",
                            level, (unsigned long long)at);
        if (c->prev_leaf && c->prev_leaf->next != n)
            return chk_fail(c, "level %u leaf %llu: the previous leaf's next does not point here",
                            level, (unsigned long long)at);
        if (!c->prev_leaf && n->prev)
            return chk_fail(c, "level %u leaf %llu: first leaf has a prev",
                            level, (unsigned long long)at);
        c->prev_leaf = n;
        xacc_zero(sum);
        for (i = 0; i < n->count; i++) {
            if (c->have_last && key_cmp(t, c->last_key, keys[i]) >= 0)
                return chk_fail(c, "level %u leaf %llu item %u: key not greater than the previous item's",
                                level, (unsigned long long)at, i);
            if (t->mode == AGG_KEYS_GENERAL && keys[i].rest) {
                const agg_tail *tl = key_tail(keys[i]);
                if (TAIL_LEN(tl) == 0 || tl->refs == 0 ||
                    (tl->len >> AGG_TAIL_META_SHIFT) > TAIL_LEN(tl))
                    return chk_fail(c, "level %u leaf %llu item %u: stored tail has len %u refs %u",
                                    level, (unsigned long long)at, i, tl->len, tl->refs);
            }
            c->last_key = keys[i];
            c->have_last = 1;
            xacc_add(sum, vals[i]);
        }
        *count = n->count;
        *kmin = keys[0];
        *kmax = keys[n->count - 1];
        return 1;
    } else {
        agg_key *sep = node_keys(n);
        node **ch = inner_child(t, n);
        const uint64_t *cn = inner_cnt(t, n);
        const double *hi = inner_hi(t, n), *lo = inner_lo(t, n);
        const uint8_t *ex = inner_ex(t, n);
        uint64_t total = 0;
        xacc sub;
        c->bytes += t->inner_bytes;
        if (n->prev || n->next)
            return chk_fail(c, "level %u node %llu: internal node has leaf-chain pointers",
                            level, (unsigned long long)at);
        if (sep[0].head || sep[0].rest)
            return chk_fail(c, "level %u node %llu: sep[0] is not zero",
                            level, (unsigned long long)at);
        xacc_zero(sum);
        for (i = 0; i < n->count; i++) {
            uint64_t cc;
            agg_key cmin, cmax, prev_max = {0, 0};
            uint64_t ccnt;
            double h, l;
            int e;
            if (i > 0) {
                prev_max = *kmax;
                if (t->mode == AGG_KEYS_GENERAL && sep[i].rest &&
                    (TAIL_LEN(key_tail(sep[i])) == 0 || key_tail(sep[i])->refs == 0))
                    return chk_fail(c, "level %u node %llu sep %u: tail has len 0 or refs 0",
                                    level, (unsigned long long)at, i);
            }
            if (!ch[i])
                return chk_fail(c, "level %u node %llu: child %u is NULL",
                                level, (unsigned long long)at, i);
            if (!chk_node(c, ch[i], level + 1, rightmost && i + 1 == n->count,
                          &cc, &sub, &cmin, &cmax))
                return 0;
            if (i > 0) {
                if (!(key_cmp(t, prev_max, sep[i]) < 0))
                    return chk_fail(c, "level %u node %llu sep %u: not greater than the max key of child %u",
                                    level, (unsigned long long)at, i, i - 1);
                if (!(key_cmp(t, sep[i], cmin) <= 0))
                    return chk_fail(c, "level %u node %llu sep %u: greater than the min key of child %u",
                                    level, (unsigned long long)at, i, i);
            } else {
                *kmin = cmin;
            }
            *kmax = cmax;
            if (cn[i] != cc)
                return chk_fail(c, "level %u node %llu entry %u: cnt %llu but the child holds %llu items",
                                level, (unsigned long long)at, i,
                                (unsigned long long)cn[i], (unsigned long long)cc);
            total += cc;
            if (ex[i] > 1)
                return chk_fail(c, "level %u node %llu entry %u: exact flag is %u",
                                level, (unsigned long long)at, i, ex[i]);
            if (ex[i]) {
                xacc diff = sub;
                double s2, e2;
                if (sub.nonfinite || !(hi[i] - hi[i] == 0.0) || !(lo[i] - lo[i] == 0.0))
                    return chk_fail(c, "level %u node %llu entry %u: flagged exact but not finite",
                                    level, (unsigned long long)at, i);
                two_sum(hi[i], lo[i], &s2, &e2);
                if (s2 != hi[i] || e2 != lo[i])
                    return chk_fail(c, "level %u node %llu entry %u: exact sum (%.17g, %.17g) not canonical",
                                    level, (unsigned long long)at, i, hi[i], lo[i]);
                xacc_add(&diff, -hi[i]);
                xacc_add(&diff, -lo[i]);
                if (!xacc_is_zero(&diff))
                    return chk_fail(c, "level %u node %llu entry %u: flagged exact but %.17g + %.17g is not the sum of the child's values",
                                    level, (unsigned long long)at, i, hi[i], lo[i]);
            } else {
                e = node_summary(t, ch[i], &ccnt, &h, &l);
                if (e || memcmp(&h, &hi[i], sizeof h) != 0 || memcmp(&l, &lo[i], sizeof l) != 0)
                    return chk_fail(c, "level %u node %llu entry %u: inexact sum (%.17g, %.17g) but the child sums to (%.17g, %.17g)%s",
                                    level, (unsigned long long)at, i, hi[i], lo[i], h, l,
                                    e ? " exactly" : "");
            }
            xacc_merge(sum, &sub);
        }
        *count = total;
        return 1;
    }
}

/* Count the references to the tail of stored key k: walk k's search path
 * (by I2 every separator equal to k lies on it, at most one per node, as
 * sep[i] of the child taken) and count separators and the item whose rest
 * is that very tail.  *item: the item holds it; *first: the shallowest
 * node whose separator holds it (NULL if none). */
static uint64_t chk_tail_refs(const agg_tree *t, agg_key k, int *item, node **first)
{
    node *n = t->root;
    uint64_t refs = 0;
    uint32_t pos;
    *item = 0;
    *first = NULL;
    while (!n->leaf) {
        uint32_t i = inner_find(t, n, k);
        if (i > 0 && node_keys(n)[i].rest == k.rest) {
            refs++;
            if (!*first)
                *first = n;
        }
        n = inner_child(t, n)[i];
    }
    pos = leaf_count_lt(t, n, k);
    if (pos < n->count && node_keys(n)[pos].rest == k.rest) {
        refs++;
        *item = 1;
    }
    return refs;
}

/* Second pass (GENERAL, after the structure passed): every tail's refs
 * equals its references (I8); add each distinct tail's bytes once, at its
 * item if it has one, else at its shallowest separator.  No allocation. */
static int chk_tails(chk *c, node *n, uint32_t level)
{
    const agg_tree *t = c->t;
    agg_key *keys = node_keys(n);
    uint32_t i;
    for (i = n->leaf ? 0 : 1; i < n->count; i++) {
        agg_tail *tl;
        node *first;
        int item;
        uint64_t refs;
        if (!keys[i].rest)
            continue;
        tl = key_tail(keys[i]);
        refs = chk_tail_refs(t, keys[i], &item, &first);
        if (refs != tl->refs)
            return chk_fail(c, "level %u %s %u: tail (len %u) has refs %u but %llu references",
                            level, n->leaf ? "leaf item" : "separator", i, tl->len, tl->refs,
                            (unsigned long long)refs);
        if (n->leaf || (!item && first == n))
            c->tail_bytes += tail_bytes(TAIL_LEN(tl));
    }
    if (!n->leaf)
        for (i = 0; i < n->count; i++)
            if (!chk_tails(c, inner_child(t, n)[i], level + 1))
                return 0;
    return 1;
}

/* See aggtree.h and section 11.  AGG_OK or AGG_CORRUPT (also for a NULL
 * tree); never allocates. */
agg_status agg_tree_check(const agg_tree *t, char *msg, size_t msg_len)
{
    chk c;
    uint64_t count = 0;
    xacc sum;
    agg_key kmin, kmax;
    int ok = 1;
    memset(&c, 0, sizeof c);
    c.msg = msg;
    c.msg_len = msg_len;
    if (msg && msg_len)
        msg[0] = 0;
    if (!t) {
        chk_fail(&c, "NULL tree");
        return AGG_CORRUPT;
    }
    c.t = t;
    c.msg = msg;
    c.msg_len = msg_len;
    if (!t->root) {
        if (t->depth != 0 || t->len != 0 || t->nbytes != 0) {
            chk_fail(&c, "empty tree with depth %u, len %llu, nbytes %zu",
                     t->depth, (unsigned long long)t->len, t->nbytes);
            return AGG_CORRUPT;
        }
        return AGG_OK;
    }
    if (t->depth == 0 || t->depth > MAX_DEPTH) {
        chk_fail(&c, "depth %u with a root", t->depth);
        return AGG_CORRUPT;
    }
    ok = chk_node(&c, t->root, 0, 1, &count, &sum, &kmin, &kmax);
    if (ok && c.prev_leaf && c.prev_leaf->next) {
        chk_fail(&c, "last leaf has a next pointer");
        ok = 0;
    }
    if (ok && count != t->len) {
        chk_fail(&c, "tree holds %llu items, len says %llu",
                 (unsigned long long)count, (unsigned long long)t->len);
        ok = 0;
    }
    if (ok && t->mode == AGG_KEYS_GENERAL)
        ok = chk_tails(&c, t->root, 0);
    if (ok && c.bytes + c.tail_bytes != t->nbytes) {
        chk_fail(&c, "nbytes is %zu, the structure holds %zu (nodes %zu + tails %zu)",
                 t->nbytes, c.bytes + c.tail_bytes, c.bytes, c.tail_bytes);
        ok = 0;
    }
    return ok ? AGG_OK : AGG_CORRUPT;
}
