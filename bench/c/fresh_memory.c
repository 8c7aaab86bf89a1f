/*
 * bench/c/fresh_memory.c - what fresh memory costs on this machine: 250 MB
 * in 2 MiB chunks, malloc'ed (4 KiB pages) or aligned and advised
 * MADV_HUGEPAGE (as core/alloc.c's chunks are), touched by one or two
 * threads, five rounds each (the first round of huge pages on a VM may pay
 * for guest memory its host never backed).  The numbers behind the
 * AGGTREE_HUGEPAGES default (core/alloc.c, section 10; bench/README.md).
 *
 *   cc -O2 -pthread bench/c/fresh_memory.c -o /tmp/fresh_memory
 *   /tmp/fresh_memory THREADS(1|2) HUGE(0|1)
 */
#define _DEFAULT_SOURCE 1
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define CHUNK ((size_t)2 << 20)
#define NCHUNKS 125

static char *chunks[NCHUNKS];

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Touch chunks [range[0], range[1]). */
static void *touch(void *arg)
{
    const long *range = (const long *)arg;
    for (long i = range[0]; i < range[1]; i++)
        memset(chunks[i], 1, CHUNK);
    return NULL;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 1, huge = argc > 2 ? atoi(argv[2]) : 0;
    for (int round = 0; round < 5; round++) {
        long all[2] = {0, NCHUNKS}, lo[2] = {0, NCHUNKS / 2}, hi[2] = {NCHUNKS / 2, NCHUNKS};
        double t0 = now();
        for (int i = 0; i < NCHUNKS; i++) {
            if (huge) {
                chunks[i] = aligned_alloc(CHUNK, CHUNK);
                if (chunks[i])
                    (void)madvise(chunks[i], CHUNK, MADV_HUGEPAGE);
            } else {
                chunks[i] = malloc(CHUNK);
            }
            if (!chunks[i])
                return 1;
        }
        if (threads == 2) {
            pthread_t th;
            if (pthread_create(&th, NULL, touch, hi) != 0)
                return 1;
            touch(lo);
            pthread_join(th, NULL);
        } else {
            touch(all);
        }
        printf("threads %d, huge pages %d: %.1f ms for %d MB\n", threads, huge,
               (now() - t0) * 1e3, NCHUNKS * 2);
        for (int i = 0; i < NCHUNKS; i++)
            free(chunks[i]);
    }
    return 0;
}
