/*
 * core/threading.h - whether the library may start a second thread: the
 * core's batch operations, bulk build and key sort (core/threads.c,
 * core/sort.c), and the snapshot checksum, checks and section reader
 * (snapshot.c, snapshot_read.c), which live outside the core and include
 * only this.
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

/* Run job(arg1) on a helper thread and job(arg0) on this one (the
 * snapshot code's two halves); 0 if the helper could not be started
 * (nothing ran: the caller runs both itself). */
static inline int run_two(void *(*job)(void *), void *arg0, void *arg1)
{
#if AGG_THREADS
    pthread_t th;
    if (pthread_create(&th, NULL, job, arg1) != 0)
        return 0;
    job(arg0);
    pthread_join(th, NULL);
    return 1;
#else
    (void)job, (void)arg0, (void)arg1;
    return 0;
#endif
}

#endif /* AGGTREE_THREADING_H */
