/*
 * core/threads.c - the thread runner of the batch operations (sections
 * 13; the key sort of section 14 has its own helper, sort.c, since its
 * phases hand over between threads and it may outlive nothing it owns).
 *
 * A pass is cut into parts; the calling thread and, with two threads, one
 * helper thread claim them in order from a shared counter, so a helper
 * that starts late (thread start-up took 0.05-3 ms while the other core
 * was busy) finds fewer parts or none, and at the end the caller waits at
 * most for the part the helper holds.  A part may stop the pass: when it
 * returns a result (anything but UINT64_MAX), no thread takes another part;
 * parts taken before it - every part before it in order - run to their end
 * or to their own result, so the smallest result returned is the first in
 * part order (insert_sorted: the first present key).  Parts write disjoint
 * memory; the runner allocates nothing (a failed thread start runs every
 * part on the caller).
 */
#include "internal.h"

/* One run: the parts, the counter they are claimed from, the stop flag. */
typedef struct parts_run {
    void *ctx;
    part_fn fn;
    int np;                      /* parts 0..np-1 */
    AGG_ATOMIC(long) next;       /* the next part to take */
    AGG_ATOMIC(long) stop;       /* a part returned a result: take no more */
    uint64_t helper_res;         /* the helper's result */
} parts_run;

/* Worker w (0: the caller, 1: the helper): takes parts until none is left
 * or one has returned a result; returns its own result (UINT64_MAX: none). */
static uint64_t parts_worker(parts_run *r, int w)
{
    for (;;) {
        long p;
        uint64_t res;
        if (atomic_load_relaxed(&r->stop))
            return UINT64_MAX;
        p = atomic_add_relaxed(&r->next, 1);
        if (p >= r->np)
            return UINT64_MAX;
        if ((res = r->fn(r->ctx, (int)p, w)) != UINT64_MAX) {
            atomic_store_relaxed(&r->stop, 1);
            return res;
        }
    }
}

#if AGG_THREADS
static void *parts_helper(void *arg)
{
    parts_run *r = (parts_run *)arg;
    r->helper_res = parts_worker(r, 1);
    return NULL;
}
#endif

/* See internal.h. */
AGG_INTERN uint64_t run_parts(void *ctx, part_fn fn, int np, int threads)
{
    parts_run r;
    r.ctx = ctx;
    r.fn = fn;
    r.np = np;
    r.helper_res = UINT64_MAX;
    atomic_store_relaxed(&r.next, 0);
    atomic_store_relaxed(&r.stop, 0);
#if AGG_THREADS
    if (threads == 1 && np > 1) {
        pthread_t th;
        if (pthread_create(&th, NULL, parts_helper, &r) == 0) {
            uint64_t r0 = parts_worker(&r, 0);
            pthread_join(th, NULL);
            return r0 < r.helper_res ? r0 : r.helper_res;
        }
    }
#else
    (void)threads;
#endif
    return parts_worker(&r, 0);
}
