"""First batch of writes into a bulk-built tree (issue 16, Performance).

Builds an Aggregate of n float keys in bulk (``from_arrays``, or with
``--load`` a ``save`` + ``load`` round trip), then inserts ``--batches``
batches of m new random items with ``insert_many`` (cumulative: n, n + m,
n + 2m, ...) and prints, per batch, the wall-clock ns per inserted item,
plus the memory after the build (``Aggregate.nbytes / n``, and at the end),
the minor page faults and the process CPU time per item of each batch
(steadier than wall time on a busy machine; with AGGTREE_THREADS=1 it is
the batch's work) and the ratio first batch / mean of the later ones.  Each run is a fresh process (the
script re-runs itself with ``--child``): the first batch after a build is
what is measured, so it cannot be repeated within one process.

    AGGTREE_THREADS=1 python bench/first_batch.py [--n 1000000] [--m 100000]
        [--batches 4] [--runs 5] [--load] [--node-size 64] [--seed 0] [--slack S]

To compare two builds, alternate them (a fresh process each time), e.g.
with two ``PYTHONPATH``s, and compare the ratios rather than the absolute
figures on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def child(args: argparse.Namespace) -> dict:
    import aggtree
    import aggtree._core

    if args.slack is not None:
        aggtree._core._debug_build_slack(args.slack)
    rng = np.random.default_rng(args.seed)
    n, m = args.n, args.m
    keys = rng.random(n)
    ids = np.arange(n, dtype=np.int64)
    vals = rng.random(n)
    agg = aggtree.Aggregate.from_arrays(keys, ids, vals, node_size=args.node_size)
    if args.load:
        with tempfile.TemporaryDirectory(dir=args.dir) as d:
            path = os.path.join(d, "snap.agg")
            agg.save(path)
            del agg
            agg = aggtree.Aggregate.load(path)
    bpi = agg.nbytes / n
    del keys, vals
    batches = []
    faults = []
    cpu = []
    for b in range(args.batches):
        k = rng.random(m)
        i = np.arange(n + b * m, n + (b + 1) * m, dtype=np.int64)
        v = rng.random(m)
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        c0 = time.process_time_ns()
        t0 = time.perf_counter_ns()
        agg.insert_many(k, i, v)
        batches.append((time.perf_counter_ns() - t0) / m)
        cpu.append((time.process_time_ns() - c0) / m)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    assert len(agg) == n + args.batches * m
    return {"bytes_per_item": bpi, "ns_per_item": batches, "faults": faults, "cpu_ns_per_item": cpu,
            "bytes_per_item_end": agg.nbytes / len(agg),
            "module": aggtree._core.__file__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--m", type=int, default=100_000)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5, help="fresh processes")
    ap.add_argument("--node-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load", action="store_true",
                    help="build by save + load instead of from_arrays")
    ap.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="directory of the snapshot file (--load)")
    ap.add_argument("--slack", type=int, default=None,
                    help="free slots per bulk-built leaf (0: packed full; default: the core's rule)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.batches < 2:
        ap.error("--batches must be at least 2 (the ratio needs later batches)")
    if args.child:
        print(json.dumps(child(args)))
        return
    cmd = [sys.executable, os.path.abspath(__file__), "--child",
           "--n", str(args.n), "--m", str(args.m), "--batches", str(args.batches),
           "--node-size", str(args.node_size), "--seed", str(args.seed)]
    if args.slack is not None:
        cmd += ["--slack", str(args.slack)]
    if args.load:
        cmd += ["--load"] + (["--dir", args.dir] if args.dir else [])
    ratios = []
    print(f"n={args.n} m={args.m} build={'load' if args.load else 'from_arrays'} slack={args.slack} "
          f"node_size={args.node_size} AGGTREE_THREADS={os.environ.get('AGGTREE_THREADS', '-')}")
    for r in range(args.runs):
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        ns = res["ns_per_item"]
        if r == 0:
            print("module:", res["module"])
        later = sum(ns[1:]) / len(ns[1:])
        ratios.append(ns[0] / later)
        print(f"run {r}: ns/item per batch " + " ".join(f"{x:6.1f}" for x in ns)
              + f"  first/later {ns[0] / later:4.2f}"
              + f"  bytes/item {res['bytes_per_item']:.2f} (end {res['bytes_per_item_end']:.2f})"
              + "  page faults " + "/".join(str(f) for f in res["faults"])
              + "  CPU ns/item " + " ".join(f"{x:.0f}" for x in res["cpu_ns_per_item"]))
    ratios.sort()
    print(f"first/later ratio: median {ratios[len(ratios) // 2]:.2f}, "
          f"min {ratios[0]:.2f}, max {ratios[-1]:.2f}")


if __name__ == "__main__":
    main()
