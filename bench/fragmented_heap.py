#!/usr/bin/env python
"""insert_many / delete_many in a fresh heap and in a fragmented one.

    python bench/fragmented_heap.py            # both, one process each, 15 rounds
    python bench/fragmented_heap.py --runs 3   # alternate the two 3 times

A process that has built and freed other trees (a benchmark suite, a
service that rebuilds its aggregates) holds many freed leaf-sized blocks.
This script makes such a heap on purpose: 10^6 blocks of 1,560 bytes (the
size of a node_size-64 leaf) are allocated and every other one freed,
leaving holes across ~1.5 GB.  Then, as in bench_numpy.py's insert_many
benchmark, it bulk-builds a tree of 10^6 float keys and times rounds of
insert_many of 10^5 new random items followed by delete_many of the same
items, and prints the fastest and median round per item.  Each variant runs
in a child process of its own, so that the two heaps do not mix.

Before the C core took its nodes from per-tree pools (core/alloc.c, section
10), the new leaves of a batch went into the holes and the fragmented run
was ~1.4x slower than the fresh one.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def child(fragment: bool, rounds: int) -> str:
    import gc

    import numpy as np

    import aggtree

    keep = None
    if fragment:
        blocks = [bytearray(1560) for _ in range(1_000_000)]
        keep = blocks[::2]  # noqa: F841 - holds every other block: the rest are holes
        del blocks
        gc.collect()
    n, m = 10**6, 10**5
    rng = np.random.default_rng(1)
    agg = aggtree.Aggregate.from_arrays(rng.random(n), np.arange(n), rng.random(n))
    ins, dels = [], []
    for r in range(rounds):
        g = np.random.default_rng(100 + r)
        k, i, v = g.random(m), np.arange(n + r * m, n + (r + 1) * m), g.random(m)
        t = time.perf_counter()
        agg.insert_many(k, i, v)
        ins.append(time.perf_counter() - t)
        t = time.perf_counter()
        agg.delete_many(k, i)
        dels.append(time.perf_counter() - t)
    assert len(agg) == n
    ins.sort()
    dels.sort()
    per = 1e9 / m
    return (f"{'fragmented' if fragment else 'fresh':>10}: insert_many best {ins[0] * per:5.1f} "
            f"median {ins[len(ins) // 2] * per:5.1f} ns/item | delete_many best {dels[0] * per:5.1f} "
            f"median {dels[len(dels) // 2] * per:5.1f} ns/item")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1, help="alternate fresh and fragmented this many times")
    ap.add_argument("--rounds", type=int, default=15, help="insert/delete rounds per run (default 15)")
    ap.add_argument("--child", choices=["fresh", "fragmented"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(child(args.child == "fragmented", args.rounds), flush=True)
        return
    for _ in range(args.runs):
        for kind in ("fresh", "fragmented"):
            subprocess.run([sys.executable, __file__, "--child", kind, "--rounds", str(args.rounds)], check=True)


if __name__ == "__main__":
    main()
