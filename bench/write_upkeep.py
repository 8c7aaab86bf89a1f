#!/usr/bin/env python
"""The event store's write upkeep, measured with the two sides interleaved.

    python bench/write_upkeep.py                  # 40 rounds of each write
    python bench/write_upkeep.py --rounds 80 --writes update delete

The issue-5 bar: each write (create, update, delete, follow, unfollow)
through ``aggtree.events.EventStore`` costs at most 1.2x the same SQLite
writes alone (``bench_events.PlainWriter``).  ``pytest bench/bench_events.py``
measures that with pytest-benchmark, one implementation after the other, so
a slow minute of the shared machine lands on one side only: on the VM these
figures come from, its ratios moved by +-0.1 between runs of the same code.
Here every round times a batch of ``WRITE_BATCH`` writes on the store and
then on the plain writer (the order alternating), in process CPU time, on
the same datasets and with the same round steps as that benchmark
(``bench_events.write_steps``); the ratio of the medians is printed per write,
with the ratio of the per-round ratios' median as a second view.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_events import (  # noqa: E402  (the path above first)
    WRITE_BATCH,
    WRITES,
    close_write_dbs,
    make_write_dbs,
    write_steps,
)

TARGET = 1.2


def measure(dbs: dict, write: str, rounds: int) -> tuple:
    """Per-round CPU seconds of the store and of the plain writer."""
    sides = {impl: write_steps(write, dbs[impl], dbs) for impl in ("aggtree", "plain")}
    times: dict = {"aggtree": [], "plain": []}
    for r in range(rounds + 1):  # round 0 warms up
        order = ("aggtree", "plain") if r % 2 else ("plain", "aggtree")
        for impl in order:
            setup, target, teardown = sides[impl]
            setup()
            t = time.process_time()
            target()
            dt = time.process_time() - t
            teardown()
            if r:
                times[impl].append(dt)
    return times["aggtree"], times["plain"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--writes", nargs="+", choices=WRITES, default=list(WRITES))
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--follows", type=int, default=50_000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aggtree-upkeep-") as tmp:
        dbs = make_write_dbs(Path(tmp), args.events, args.follows)
        try:
            print(f"{args.events:,} events, {args.follows:,} follows; {args.rounds} rounds of "
                  f"{WRITE_BATCH} writes per side, interleaved; CPU time per write")
            print(f"{'write':10} {'store':>9} {'plain':>9} {'ratio':>7} {'per-round':>10}  target {TARGET}x")
            for write in args.writes:
                a, p = measure(dbs, write, args.rounds)
                ma, mp = statistics.median(a), statistics.median(p)
                per_round = statistics.median(x / y for x, y in zip(a, p))
                verdict = "met" if ma / mp <= TARGET else "NOT met"
                print(f"{write:10} {ma / WRITE_BATCH * 1e6:7.1f}us {mp / WRITE_BATCH * 1e6:7.1f}us "
                      f"{ma / mp:6.2f}x {per_round:9.2f}x  {verdict}")
            for impl in ("aggtree",):
                assert dbs[impl].verify_aggregates().ok
        finally:
            close_write_dbs(dbs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
