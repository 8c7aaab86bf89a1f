#!/usr/bin/env python
"""A/B of the headline Python rows of bench/report.py between two builds.

Issue 15 asks that a change of structure cost no speed, measured "before and
after on the same machine, alternating, at least three runs each".  This
script does that for the headline rows (count, insert, delete, at, index_of,
count_many, from_arrays, insert_many, delete_many, and count / insert / at on
short str keys), with two pythons whose environments hold the two builds:

    python bench/ab_headline.py --rounds 4 \\
        --python-a /work/venv/ab-base/bin/python --python-b /work/venv/ab/bin/python
    python bench/ab_headline.py --rounds 6 --ops insert,delete ...   # some rows only
    AGGTREE_THREADS=1 python bench/ab_headline.py --clock cpu ...    # CPU time, one thread
    python bench/ab_headline.py --child                               # one side, JSON out

The driver runs the two pythons alternately, A B A B ..., each side in a fresh
subprocess (``--child``) that builds the same data from fixed seeds, times
every operation and prints one JSON line.  Within a child each operation is
timed timeit-style: GC disabled, ``time.perf_counter``, the fastest of several
repeats (other jobs on a shared machine inflate a repeat, never deflate one).
A bulk call (10-50 ms) outlasts a scheduler time slice on a loaded machine,
so its wall time includes waits whatever the repeats; ``--clock cpu`` with
AGGTREE_THREADS=1 times the CPU the one thread used instead.
The driver prints, per operation, the minimum and the median over the rounds
of each side, the ratios B/A of both, the median of the per-round ratios
(A and B of a round ran back to back, under much the same load), and each
side's spread (max/min - 1 over its rounds); it checks that both sides
returned the same results.
AGGTREE_THREADS is passed through unchanged.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

N = 10**6            # items of the float-key tree
BATCH = 1000         # calls per repeat of a single-item operation
BULK_RANGES = 10**5  # ranges of count_many
STR_N = 10**5        # items of the str-key tree

# (name, unit, what it times)
OPS = [
    ("count", "call", "count(lower, upper), 1000 random ranges"),
    ("insert", "call", "insert one at a time, 1000 new items"),
    ("delete", "call", "delete one at a time, 1000 items"),
    ("at", "call", "at(offset), 1000 random offsets"),
    ("index_of", "call", "index_of(key), 1000 present keys"),
    ("count_many", "range", "count_many, 10^5 random ranges"),
    ("from_arrays", "item", "from_arrays, 10^6 unsorted items"),
    ("insert_many", "item", "insert_many, 10^5 new items into 10^6"),
    ("delete_many", "item", "delete_many, 10^5 items out of 1.1x10^6"),
    ("str_count", "call", "str keys: count(lower, upper), 1000 ranges"),
    ("str_insert", "call", "str keys: insert one at a time, 1000 items"),
    ("str_at", "call", "str keys: at(offset), 1000 offsets"),
]
OP_NAMES = [o[0] for o in OPS]


# ---------------------------------------------------------------------------
# Child: time every operation once (fastest of several repeats)
# ---------------------------------------------------------------------------


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def _best(fn, repeats, setup=None, teardown=None):
    """Fastest of ``repeats`` timed calls of ``fn(*setup(r))`` with GC off;
    returns (seconds, result of the last call)."""
    clock = CLOCK
    best, out = float("inf"), None
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            args = setup(r) if setup else ()
            t0 = clock()
            out = fn(*args)
            dt = clock() - t0
            if teardown:
                teardown(*args)
            best = min(best, dt)
    finally:
        gc.enable()
    return best, out


def _strings(rng, m, max_len=16):
    """m random ASCII-letter strings of 1..max_len characters."""
    import numpy as np

    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
    raw = letters[rng.integers(0, len(letters), (m, max_len))].tobytes().decode("ascii")
    lens = rng.integers(1, max_len + 1, m).tolist()
    return [raw[j * max_len: j * max_len + L] for j, L in enumerate(lens)]


def child(ops, scale):
    import numpy as np

    import aggtree

    Agg = aggtree.Aggregate
    res = {}   # op -> seconds per unit
    chk = {}   # op -> a checksum of its results (the same on both sides)
    rep = max(1, int(round(scale)))

    def rng(*seed):
        return np.random.default_rng(list(seed))

    n = N
    g = rng(1)
    keys, ids, values = g.random(n), g.permutation(n).astype(np.int64), g.random(n)
    s = Agg.from_arrays(keys, ids, values)
    order = np.lexsort((ids, keys))
    sk = keys[order]

    def new_items(m, tag, r):
        h = rng(2, tag, r)
        return h.random(m), np.arange(n, n + m, dtype=np.int64), h.random(m)

    if "count" in ops:
        q = np.sort(rng(3).random((BATCH, 2)), axis=1).tolist()
        count = s.count
        t, out = _best(lambda: [count(lower=lo, upper=hi) for lo, hi in q], 20 * rep)
        res["count"], chk["count"] = t / BATCH, sum(out)

    ins, dele = s.insert, s.delete

    def batch(tag):
        def setup(r):
            k, i, v = new_items(BATCH, tag, r)
            return (list(zip(k.tolist(), i.tolist(), v.tolist())),)
        return setup

    def insert_batch(b):
        for k, i, v in b:
            ins(k, i, v)

    def delete_batch(b):
        for k, i, _ in b:
            dele(k, i)

    if "insert" in ops:
        t, _ = _best(insert_batch, 20 * rep, batch(1), delete_batch)
        res["insert"], chk["insert"] = t / BATCH, len(s)

    if "delete" in ops:
        setup_ins = batch(2)

        def setup_del(r):
            b = setup_ins(r)
            insert_batch(*b)
            return b
        t, _ = _best(delete_batch, 20 * rep, setup_del)
        res["delete"], chk["delete"] = t / BATCH, len(s)

    if "at" in ops:
        offs = rng(4).integers(0, n, BATCH).tolist()
        at = s.at
        t, out = _best(lambda: [at(o) for o in offs], 20 * rep)
        res["at"], chk["at"] = t / BATCH, sum(int(x[1]) for x in out)

    if "index_of" in ops:
        pk = sk[rng(5).integers(0, n, BATCH)].tolist()
        index_of = s.index_of
        t, out = _best(lambda: [index_of(k) for k in pk], 20 * rep)
        res["index_of"], chk["index_of"] = t / BATCH, sum(out)

    if "count_many" in ops:
        q = np.sort(rng(6).random((BULK_RANGES, 2)), axis=1)
        lows, highs = np.ascontiguousarray(q[:, 0]), np.ascontiguousarray(q[:, 1])
        t, out = _best(lambda: s.count_many(lows, highs), 7 * rep)
        res["count_many"], chk["count_many"] = t / BULK_RANGES, int(np.asarray(out).sum())

    if "from_arrays" in ops:
        t, out = _best(lambda: Agg.from_arrays(keys, ids, values), 5 * rep)
        res["from_arrays"], chk["from_arrays"] = t / n, len(out)
        del out

    m = n // 10
    if "insert_many" in ops:
        t, _ = _best(s.insert_many, 10 * rep, lambda r: new_items(m, 3, r),
                     lambda k, i, v: s.delete_many(k, i))
        res["insert_many"], chk["insert_many"] = t / m, len(s)

    if "delete_many" in ops:
        def setup_dm(r):
            k, i, v = new_items(m, 4, r)
            s.insert_many(k, i, v)
            return k, i
        t, _ = _best(s.delete_many, 10 * rep, setup_dm)
        res["delete_many"], chk["delete_many"] = t / m, len(s)

    if any(op.startswith("str_") for op in ops):
        del s
        gc.collect()
        sn = STR_N
        h = rng(7)
        skeys = _strings(h, sn)
        sids = h.permutation(sn).tolist()
        svals = h.random(sn).tolist()
        st = Agg.from_arrays(skeys, sids, svals)

        if "str_count" in ops:
            qs = _strings(rng(8), 2 * BATCH)
            qs = [tuple(sorted(p)) for p in zip(qs[0::2], qs[1::2])]
            count = st.count
            t, out = _best(lambda: [count(lower=lo, upper=hi) for lo, hi in qs], 20 * rep)
            res["str_count"], chk["str_count"] = t / BATCH, sum(out)

        if "str_insert" in ops:
            sins, sdel = st.insert, st.delete

            def setup_s(r):
                hh = rng(9, r)
                return (list(zip(_strings(hh, BATCH), range(sn, sn + BATCH),
                                 hh.random(BATCH).tolist())),)

            def s_ins(b):
                for k, i, v in b:
                    sins(k, i, v)

            def s_del(b):
                for k, i, _ in b:
                    sdel(k, i)
            t, _ = _best(s_ins, 20 * rep, setup_s, s_del)
            res["str_insert"], chk["str_insert"] = t / BATCH, len(st)

        if "str_at" in ops:
            offs = rng(10).integers(0, sn, BATCH).tolist()
            at = st.at
            t, out = _best(lambda: [at(o) for o in offs], 20 * rep)
            res["str_at"], chk["str_at"] = t / BATCH, sum(int(x[1]) for x in out)

    return {"times": res, "check": chk, "module": aggtree.__file__}


# ---------------------------------------------------------------------------
# Driver: alternate the two pythons and tabulate
# ---------------------------------------------------------------------------


def _loadavg():
    try:
        with open("/proc/loadavg") as fh:
            return float(fh.read().split()[0])
    except OSError:
        return float("nan")


def run_side(python, ops, scale, clock):
    cmd = [python, os.path.abspath(__file__), "--child", "--ops", ",".join(ops),
           "--scale", str(scale), "--clock", clock]
    # run from / so that neither side can import aggtree from a source tree
    out = subprocess.run(cmd, capture_output=True, text=True, cwd="/", check=False)
    if out.returncode != 0:
        sys.exit(f"{python} failed (exit {out.returncode}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(sec, unit):
    ns = sec * 1e9
    return f"{ns:.1f}" if ns < 100 else f"{ns:.0f}"


def driver(args, ops):
    sides = {"A": args.python_a, "B": args.python_b}
    runs = {"A": [], "B": []}
    loads = [_loadavg()]
    t_start = time.time()
    for r in range(args.rounds):
        for side in ("A", "B"):
            t0 = time.time()
            got = run_side(sides[side], ops, args.scale, args.clock)
            loads.append(_loadavg())
            runs[side].append(got)
            print(f"round {r + 1}/{args.rounds} {side} ({time.time() - t0:.0f} s, "
                  f"load {loads[-1]:.2f}): {got['module']}", file=sys.stderr, flush=True)
    for side in ("A", "B"):
        for got in runs[side]:
            if got["check"] != runs["A"][0]["check"]:
                sys.exit(f"results differ: {side} {got['check']} vs A {runs['A'][0]['check']}")

    meta = {"python_a": args.python_a, "python_b": args.python_b, "rounds": args.rounds,
            "seconds": round(time.time() - t_start), "loads": loads,
            "threads": os.environ.get("AGGTREE_THREADS", "(unset)"), "clock": args.clock,
            "scale": args.scale,
            "rows": {op: {"A": [g["times"][op] for g in runs["A"]],
                          "B": [g["times"][op] for g in runs["B"]]} for op in ops}}
    print_table(meta)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(meta, fh, indent=1)


def print_table(meta):
    """The table of one driver run (also from its --json file: --from-json)."""
    units = {o[0]: o[1] for o in OPS}
    loads = meta["loads"]
    print(f"\nA: {meta['python_a']}\nB: {meta['python_b']}")
    print(f"rounds: {meta['rounds']} each, alternating A B; {meta['seconds']} s; "
          f"load average (1 min) {min(loads):.2f}..{max(loads):.2f}, "
          f"median {statistics.median(loads):.2f}; AGGTREE_THREADS={meta['threads']}; "
          f"clock {meta['clock']}; scale {meta['scale']}")
    print("times: ns per unit, each round's fastest repeat; min / median over the rounds; "
          "paired = median over the rounds of B/A within a round (A and B ran back to back); "
          "spread = max/min - 1 over one side's rounds\n")
    print("| row | unit | A min / median | B min / median | B/A min | B/A median "
          "| B/A paired | spread A / B |")
    print("|---|---|---|---|---|---|---|---|")
    for op, r in meta["rows"].items():
        a, b = r["A"], r["B"]
        ra, rm = min(b) / min(a), statistics.median(b) / statistics.median(a)
        rp = statistics.median(y / x for x, y in zip(a, b))
        u = units[op]
        print(f"| {op} | ns/{u} | {fmt(min(a), u)} / {fmt(statistics.median(a), u)} "
              f"| {fmt(min(b), u)} / {fmt(statistics.median(b), u)} | {ra:.3f} | {rm:.3f} "
              f"| {rp:.3f} | {max(a) / min(a) - 1:.0%} / {max(b) / min(b) - 1:.0%} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", action="store_true", help="time one side, print JSON")
    p.add_argument("--python-a", default=sys.executable, help="python of side A (before)")
    p.add_argument("--python-b", default=sys.executable, help="python of side B (after)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each side (default 3)")
    p.add_argument("--ops", default=",".join(OP_NAMES),
                   help=f"comma-separated rows (default all: {','.join(OP_NAMES)})")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the repeats per operation (default 1)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: time.perf_counter (default); cpu: time.process_time, the "
                        "CPU time of all the process's threads (with AGGTREE_THREADS=1, "
                        "the time the one thread ran: preemption by other jobs left out)")
    p.add_argument("--json", help="also write the raw figures to this file")
    p.add_argument("--from-json", help="print the table of an earlier run's --json file")
    args = p.parse_args()
    ops = [o for o in args.ops.split(",") if o]
    bad = [o for o in ops if o not in OP_NAMES]
    if bad:
        p.error(f"unknown rows {bad}; known: {OP_NAMES}")
    if args.from_json:
        with open(args.from_json) as fh:
            print_table(json.load(fh))
    elif args.child:
        global CLOCK
        CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
        print(json.dumps(child(set(ops), args.scale)))
    else:
        if args.rounds < 1:
            p.error("--rounds must be at least 1")
        driver(args, ops)


if __name__ == "__main__":
    main()
