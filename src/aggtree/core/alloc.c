/*
 * core/alloc.c - every allocation of the core: the failure injector, the node pools,
 * and tail and scratch memory through mem_alloc / raw_alloc.
 *
 * 10. Allocation
 * --------------
 * Every malloc/free goes through mem_alloc/mem_free: they keep t->nbytes
 * (the requested sizes) and honour the global failure injector
 * AGG_TEST_FAIL_AFTER (aggtree_test.h; a countdown of successful allocations; atomic,
 * so threads working on different trees do not race on it).
 *
 * Nodes come from the tree's two pools (leaves, internal nodes): blocks
 * carved in order from chunks of 1, 2, 4, ... blocks, up to ~2 MB each
 * (with AGG_HUGE: from the first chunk that would pass 1 MiB, chunks of
 * exactly 2 MiB, 2 MiB-aligned and advised for transparent huge pages:
 * chunk_alloc, below);
 * a freed node goes on its pool's free list and is the next one handed
 * out; the chunks go back to malloc when the tree is cleared or freed (a
 * FAST tree without visiting its nodes).  Why: a batch insert splits most
 * leaves it touches and then walks the leaf level in key order.  From
 * malloc, in a process whose heap holds the freed nodes of other trees
 * (a benchmark suite, a service that rebuilds its aggregates), the new
 * leaves land in those holes all over the heap, and the walk loses its
 * locality: 10^5 random keys into 10^6 cost 61-64 ns per key instead of
 * 41-48 after 10^6 leaf-sized blocks were freed across 1.5 GB (Python,
 * two threads).  From the pools they are as close together as in a fresh
 * process (41-43).  The cost: a tree keeps the nodes it freed for its own
 * later use (nbytes counts only the live ones), and a small tree's last
 * chunk may be up to half empty.  Huge pages (AGG_HUGE, the build switch
 * AGGTREE_HUGEPAGES, on by default): fresh memory costs a page fault per
 * 4 KiB, in which the kernel maps and zeroes the page; a 2 MiB chunk
 * advised MADV_HUGEPAGE is one fault (Linux with transparent_hugepage
 * "madvise" or "always"; if the kernel says no, plain pages and nothing
 * else changes).  raw_alloc then does the same for scratch over 1 MiB (a
 * batch's sort and plan arrays, the bulk build's node array).  The first
 * batch after a bulk build took ~1,320 page faults per 10^5 keys: ~600 in
 * the Python layer's fresh key and value arrays (which _numpy.pxi now lays
 * on huge pages too: 360-550 left), the rest in its plan arrays of 256 KiB
 * - 1 MiB, fresh where later batches reuse what the earlier ones freed.
 * Rounding those up to huge pages as well cut the first batch to ~230
 * faults but moved ~700 to the fourth (each 2 MiB-rounded array is mapped
 * anew, where malloc would have reused heap memory), so the threshold
 * stays at 1 MiB (bench/README.md).  numpy does the
 * same for its large arrays.  Measured on the development VM (tests of 250
 * MB of fresh memory touched in 2 MiB chunks, bench/README.md "Huge pages
 * by default"): 4 KiB pages 110-147 ms, huge pages 15-16 ms once the
 * VM's memory had been touched before; the very first touch of guest
 * memory the host never backed costs ~5 ms per 2 MiB either way (668 ms
 * for the first 250 MB after boot), which is why an earlier measurement
 * under load found huge pages slower for the read load and kept the
 * switch off.  With it on: a load of 10^7 items takes ~1,300-1,800 faults
 * instead of 62,000, and every insert_many batch costs 10-20% less CPU
 * (the first into a bulk-built tree within 1.11-1.21x of the later ones,
 * against 1.22-1.37x without).  ASan builds poison free blocks by hand
 * (POOL_POISON), so a use after free inside a chunk is still reported.  Writes
 * allocate only in their reserve step (insert, build, new, insert_sorted)
 * or never (delete, clear, value overwrite), which is what makes "on
 * failure nothing changed" hold.  Temporary memory of the batch
 * operations and the sort (raw_alloc: honours the injector, not counted
 * in nbytes) is taken before the first mutation too; delete_sorted's only
 * temporary array is optional (it runs without it).  insert_sorted's
 * second thread (section 13) never allocates: its arrays are sized first.
 *
 */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE 1        /* madvise, MADV_HUGEPAGE */
#endif
#include "internal.h"
#if defined(__linux__)
#include <sys/mman.h>
#endif
/* AGG_HUGE: node chunks and large scratch in 2 MiB pages advised for
 * transparent huge pages (section 10); a build switch (CMake
 * AGGTREE_HUGEPAGES, -DAGG_HUGEPAGES=1), on by default. */
#if defined(AGG_HUGEPAGES) && AGG_HUGEPAGES && defined(MADV_HUGEPAGE)
#define AGG_HUGE 1
#else
#define AGG_HUGE 0
#endif

#define POOL_CHUNK_MAX_BYTES ((size_t)1 << 21)   /* 2 MiB: a huge page */

/* Failure injector: < 0 off; else the number of allocations still allowed
 * to succeed.  alloc_count: successful allocations since the last
 * AGG_TEST_FAIL_AFTER. */
static AGG_ATOMIC(long) g_fail_countdown = -1;
static AGG_ATOMIC(long) g_alloc_count = 0;

/* 1 if the injector fails this allocation; else it is counted down. */
AGG_INLINE int injected_failure(void)
{
    long c = atomic_load_relaxed(&g_fail_countdown);
    if (AGG_UNLIKELY(c >= 0)) {
        if (c == 0)
            return 1;
        atomic_store_relaxed(&g_fail_countdown, c - 1);
    }
    return 0;
}

static void *chunk_alloc(size_t bytes);

/* malloc honouring the injector.  NULL on (real or injected) failure.
 * Over 1 MiB (a batch's or a sort's scratch arrays): whole 2 MiB pages,
 * advised for huge pages like the pools' chunks (chunk_alloc).  free()
 * releases either. */
AGG_INTERN void *raw_alloc(size_t size)
{
    void *p;
    if (injected_failure())
        return NULL;
#if AGG_HUGE
    if (size > POOL_CHUNK_MAX_BYTES / 2 && size <= SIZE_MAX - POOL_CHUNK_MAX_BYTES)
        size = (size + POOL_CHUNK_MAX_BYTES - 1) / POOL_CHUNK_MAX_BYTES * POOL_CHUNK_MAX_BYTES;
#endif
    p = chunk_alloc(size);
    if (p)
        atomic_add_relaxed(&g_alloc_count, 1);
    return p;
}

/* Node pools (section 10).  ASan builds mark free blocks unaddressable
 * themselves, so a use after free inside a chunk is still reported. */
#if defined(__SANITIZE_ADDRESS__)
#define AGG_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define AGG_ASAN 1
#endif
#endif
#ifdef AGG_ASAN
#include <sanitizer/asan_interface.h>
#define POOL_POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define POOL_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POOL_POISON(p, n) ((void)(p), (void)(n))
#define POOL_UNPOISON(p, n) ((void)(p), (void)(n))
#endif
#define POOL_CHUNK_MAX POOL_CHUNK_MAX_BYTES  /* a grown chunk: 2 MiB */

/* A chunk of `bytes` bytes.  A multiple of 2 MiB is taken 2 MiB-aligned
 * and, where the kernel offers transparent huge pages on request
 * (MADV_HUGEPAGE), marked for them: one page fault then maps (and the
 * kernel zeroes) 2 MiB at once instead of 512 faults of 4 KiB.  Silently
 * plain pages if the advice is refused; plain malloc for smaller chunks
 * and where there is no MADV_HUGEPAGE. */
static void *chunk_alloc(size_t bytes)
{
#if AGG_HUGE
    if (bytes % POOL_CHUNK_MAX == 0) {
        void *p = aligned_alloc(POOL_CHUNK_MAX, bytes);
        if (p)
            (void)madvise(p, bytes, MADV_HUGEPAGE);
        return p;
    }
#endif
    return malloc(bytes);
}

/* See aggtree.h. */
void agg_advise_huge_pages(void *p, size_t n)
{
#if AGG_HUGE
    uintptr_t lo = ((uintptr_t)p + POOL_CHUNK_MAX - 1) & ~(uintptr_t)(POOL_CHUNK_MAX - 1);
    uintptr_t hi = ((uintptr_t)p + n) & ~(uintptr_t)(POOL_CHUNK_MAX - 1);
    if (hi > lo)
        (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
}

/* Start a new chunk in pl holding n blocks of `size` bytes (n >= 1). 0 on
 * failure (pl unchanged).  The chunk's descriptor is a small allocation
 * of its own, so that nothing writes to the chunk before its blocks are
 * filled: a bulk build's threads then take the page faults (the kernel
 * zeroing a 2 MiB page) of the chunks they fill, in parallel, not the
 * thread that allocates (measured: a 10^7-item load spent 13 ms of one
 * thread faulting every chunk in at the header write). */
static int pool_grow(node_pool *pl, size_t size, size_t n)
{
    size_t bytes = n * size;
    pool_chunk *c;
    if (AGG_HUGE && 2 * bytes > POOL_CHUNK_MAX) {  /* over 1 MiB: whole 2 MiB pages of blocks */
        bytes = (bytes + POOL_CHUNK_MAX - 1) / POOL_CHUNK_MAX * POOL_CHUNK_MAX;
        n = bytes / size;
    }
    c = (pool_chunk *)malloc(sizeof *c);
    if (!c)
        return 0;
    c->mem = chunk_alloc(bytes);
    if (!c->mem) {
        free(c);
        return 0;
    }
    c->next = pl->chunks;
    c->bytes = bytes;
    pl->chunks = c;
    pl->bump = (char *)c->mem;
    pl->end = pl->bump + n * size;
    POOL_POISON(pl->bump, n * size);
    return 1;
}

/* The pool of t's blocks of `size` bytes, or NULL (tails of other sizes). */
AGG_INLINE node_pool *pool_of(agg_tree *t, size_t size)
{
    return size == t->leaf_bytes ? &t->pools[0] : size == t->inner_bytes ? &t->pools[1] : NULL;
}

/* A block of `size` bytes from pool pl: a freed one, else the newest
 * chunk's next, else from a new chunk twice the size of the last (1
 * block first, so a small tree holds no more than malloc would give it).
 * Honours the injector like raw_alloc; NULL on failure. */
static void *pool_alloc(node_pool *pl, size_t size)
{
    char *p;
    if (injected_failure())
        return NULL;
    if (pl->free) {
        p = (char *)pl->free;
        POOL_UNPOISON(p, size);
        pl->free = *(void **)p;
    } else {
        if (pl->bump == pl->end) {
            size_t n = pl->blocks ? pl->blocks : 1;
            if (!pool_grow(pl, size, n))
                return NULL;
            n = (size_t)(pl->end - pl->bump) / size;       /* what it holds */
            pl->blocks = 2 * n * size <= POOL_CHUNK_MAX ? 2 * n : n;
        }
        p = pl->bump;
        pl->bump += size;
        POOL_UNPOISON(p, size);
    }
    atomic_add_relaxed(&g_alloc_count, 1);
    return p;
}

/* Give every chunk of pl back to malloc (its blocks are all free or
 * abandoned with the tree's nodes). */
AGG_INTERN void pool_release(node_pool *pl)
{
    pool_chunk *c = pl->chunks;
    while (c) {
        pool_chunk *nx = c->next;
        POOL_UNPOISON(c->mem, c->bytes);
        free(c->mem);
        free(c);
        c = nx;
    }
    memset(pl, 0, sizeof *pl);
}

/* Allocate `size` bytes for tree t, counted in t->nbytes: nodes from the
 * tree's pools, tails from malloc. */
AGG_INTERN void *mem_alloc(agg_tree *t, size_t size)
{
    node_pool *pl = pool_of(t, size);
    void *p = pl ? pool_alloc(pl, size) : raw_alloc(size);
    if (p)
        t->nbytes += size;
    return p;
}

/* Free a block of `size` bytes obtained from mem_alloc(t, size). */
AGG_INTERN void mem_free(agg_tree *t, void *p, size_t size)
{
    node_pool *pl;
    if (!p)
        return;
    t->nbytes -= size;
    if ((pl = pool_of(t, size)) != NULL) {
        *(void **)p = pl->free;
        pl->free = p;
        POOL_POISON(p, size);
    } else {
        free(p);
    }
}

/* AGG_TEST_FAIL_AFTER (aggtree_test.h): resets the allocation counter and
 * arms (n >= 0) or disarms (n < 0) the countdown. */
AGG_INTERN long alloc_fail_after(long n)
{
    long made = atomic_exchange_relaxed(&g_alloc_count, 0);
    atomic_store_relaxed(&g_fail_countdown, n < 0 ? -1 : n);
    return made;
}
