/*
 * core/test_control.c - agg_test_control (aggtree_test.h): one entry point
 * for the hooks the tests use - allocation-failure injection (alloc.c),
 * the batch operations' thread mode (batch.c) - and the shape hash, which
 * lives here.
 */
#include "internal.h"
#include "aggtree_test.h"

/* FNV-1a over n bytes, continuing from h. */
static uint64_t hash_bytes(uint64_t h, const void *p, size_t n)
{
    const uint8_t *s = (const uint8_t *)p;
    while (n--)
        h = (h ^ *s++) * 0x100000001b3ull;
    return h;
}

/* A key's bits: FAST keys as they are, GENERAL ones as head and tail. */
static uint64_t hash_key(const agg_tree *t, uint64_t h, agg_key k)
{
    h = hash_bytes(h, &k.head, sizeof k.head);
    if (t->mode == AGG_KEYS_FAST)
        return hash_bytes(h, &k.rest, sizeof k.rest);
    if (k.rest) {
        const agg_tail *tl = key_tail(k);
        h = hash_bytes(h, &tl->len, sizeof tl->len);
        h = hash_bytes(h, tl->bytes, TAIL_LEN(tl));
    }
    return h;
}

static uint64_t hash_node(const agg_tree *t, uint64_t h, node *n)
{
    uint32_t i;
    h = hash_bytes(h, &n->count, sizeof n->count);
    if (n->leaf) {
        for (i = 0; i < n->count; i++) {
            h = hash_key(t, h, node_keys(n)[i]);
            h = hash_bytes(h, &leaf_vals(t, n)[i], sizeof(double));
        }
        return h;
    }
    for (i = 0; i < n->count; i++) {
        if (i > 0)
            h = hash_key(t, h, node_keys(n)[i]);
        h = hash_bytes(h, &inner_cnt(t, n)[i], sizeof(uint64_t));
        h = hash_bytes(h, &inner_hi(t, n)[i], sizeof(double));
        h = hash_bytes(h, &inner_lo(t, n)[i], sizeof(double));
        h = hash_bytes(h, &inner_ex(t, n)[i], 1);
        h = hash_node(t, h, inner_child(t, n)[i]);
    }
    return h;
}

/* See aggtree.h. */
AGG_INTERN uint64_t shape_hash(const agg_tree *t)
{
    uint64_t h = 0xcbf29ce484222325ull;
    h = hash_bytes(h, &t->depth, sizeof t->depth);
    return t->root ? hash_node(t, h, t->root) : h;
}

/* See aggtree_test.h. */
long agg_test_control(int op, ...)
{
    va_list ap;
    long r = -1;
    va_start(ap, op);
    switch (op) {
    case AGG_TEST_FAIL_AFTER:
        r = alloc_fail_after(va_arg(ap, long));
        break;
    case AGG_TEST_BATCH_THREAD_MODE:
        r = batch_thread_mode(va_arg(ap, long));
        break;
    case AGG_TEST_SHAPE_HASH: {
        const agg_tree *t = va_arg(ap, const agg_tree *);
        uint64_t *out = va_arg(ap, uint64_t *);
        *out = shape_hash(t);
        r = 0;
        break;
    }
    case AGG_TEST_BUILD_SLACK:
        r = build_slack_set(va_arg(ap, long));
        break;
    default:
        break;
    }
    va_end(ap);
    return r;
}
