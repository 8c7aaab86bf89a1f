/*
 * bench_util.h - what the C benchmarks (bench_core, bench_sort,
 * bench_floor) share: a seeded splitmix64 generator and two clocks.
 */
#ifndef AGGTREE_BENCH_UTIL_H
#define AGGTREE_BENCH_UTIL_H

#include <stdint.h>
#include <time.h>

static uint64_t g_rng = 0x12345678;

/* splitmix64: the next pseudo-random 64-bit word. */
static inline uint64_t rnd(void)
{
    uint64_t z = (g_rng += UINT64_C(0x9E3779B97F4A7C15));
    z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
    return z ^ (z >> 31);
}

/* CPU time of this thread: the machine may be shared, and time spent
 * descheduled is not the code's. */
static inline double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Wall-clock time: for code that may run on two threads (one thread's CPU
 * time would leave the other's out). */
static inline double wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#endif
