/*
 * core/threading.h - whether the library may start a second thread: the
 * core's batch operations, bulk build and key sort (core/threads.c,
 * core/sort.c), and the snapshot checksum and checks (snapshot.c), which
 * lives outside the core and includes only this.
 */
#ifndef AGGTREE_THREADING_H
#define AGGTREE_THREADING_H

#include <stdlib.h>

/* A second thread for large batch inserts (section 13) and key sorts
 * (section 14).  AGG_THREADS is 0 in builds without pthreads or C11
 * atomics, or with -DAGG_NO_THREADS; at run time AGGTREE_THREADS=1 in the
 * environment keeps everything on the calling thread. */
#if !defined(AGG_NO_THREADS) && !defined(__STDC_NO_ATOMICS__) && \
    (defined(__unix__) || defined(__APPLE__))
#include <pthread.h>
#include <sched.h>
#define AGG_THREADS 1
#else
#define AGG_THREADS 0
#endif

/* 0 if AGGTREE_THREADS=1 in the environment (or the build has no threads). */
static inline int threads_allowed(void)
{
    const char *e = AGG_THREADS ? getenv("AGGTREE_THREADS") : NULL;
    return AGG_THREADS && !(e && atoi(e) == 1);
}

#endif /* AGGTREE_THREADING_H */
