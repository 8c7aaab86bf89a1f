#!/usr/bin/env python
"""Run the aggtree benchmarks at full size and report them as ratios.

    python bench/report.py                 # full run (10^3 .. 10^6 items), ~15-25 minutes
    python bench/report.py --quick         # 10^3 and 10^4 items, a minute or two
    python bench/report.py --from-json F   # re-render from a pytest-benchmark JSON file

It runs the pytest-benchmark suites (bench_core.py, bench_keys.py,
bench_numpy.py) in a subprocess with ``--benchmark-json`` and GC disabled
during timing, then, from that one run:

* prints a table of ratios, aggtree against each baseline, per operation and
  size (baseline time / aggtree time: above 1 means aggtree is faster);
* checks the project's performance bars (issues 2, 3 and 4) at the largest
  size and says which pass and which fail;
* evaluates the node-size sweep (8..512 at the largest size) and names the
  best node size with the reason;
* writes ``<out>/<date>-<machine>.json`` (compact: machine stamp, per-op
  times, ratios, bars, sweep), ``<out>/summary.md`` (the tables) and
  ``<out>/scaling.png`` (log-log time per operation against n).

Times are the fastest round of each benchmark divided by the number of
operations in the round (``extra_info["ops"]``): the machine is shared, and
other jobs inflate some rounds, never deflate them (timeit's reasoning).  The
JSON keeps the median too, and the bars are also given from the medians.
Compare ratios from one run, not absolute times across runs.

``--out DIR`` defaults to bench/results for a full run and to a temporary
directory for ``--quick`` (so that a quick run never overwrites the published
figures).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUITES = ("bench_core.py", "bench_keys.py", "bench_numpy.py")

BASELINES = ("reference", "sortedcontainers", "bisect", "numpy", "sqlite")

# (group op, title, unit of one operation)
TIME_OPS = [
    ("count", "count, two bounds", "call"),
    ("sum", "sum over a wide range (~80% of items)", "call"),
    ("insert", "insert one at a time", "call"),
    ("delete", "delete one at a time", "call"),
    ("at", "at (select)", "call"),
    ("index_of", "index_of (rank)", "call"),
    ("min_max", "min / max of a range", "call"),
    ("paginate", "paginate (pages of 100)", "page"),
    ("count_many", "count_many (vectorised ranges)", "range"),
    ("sum_many", "sum_many (vectorised ranges)", "range"),
    ("from_arrays", "from_arrays (bulk build from unsorted arrays)", "item"),
    ("insert_many", "insert_many (n/10 new items into n)", "item"),
    ("delete_many", "delete_many (n/10 items out of n + n/10)", "item"),
]
PLOT_OPS = ["count", "sum", "insert", "at", "count_many", "from_arrays"]


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def run_pytest(json_path: Path, quick: bool, extra: list[str]) -> None:
    env = dict(os.environ)
    if quick:
        env.setdefault("AGGTREE_BENCH_SIZES", "1000,10000")
        env.setdefault("AGGTREE_BENCH_BULK", "100000")
    else:
        env["AGGTREE_BENCH_FULL"] = "1"
    cmd = [
        sys.executable, "-m", "pytest", *[str(HERE / s) for s in SUITES],
        "-q", "-p", "no:cacheprovider", "--benchmark-only", "--benchmark-disable-gc",
        # warm-up: the first rounds of a fresh benchmark run slower (caches, the
        # interpreter's specialisation), which would skew the first of a group
        "--benchmark-warmup=on", "--benchmark-warmup-iterations=1000",
        f"--benchmark-max-time={0.2 if quick else 0.5}",
        f"--benchmark-json={json_path}", "--benchmark-columns=median,rounds,iterations",
        *extra,
    ]
    log = json_path.with_suffix(".log")
    print(f"running: {' '.join(cmd)}\n  (pytest output in {log})", flush=True)
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    tail = log.read_text().splitlines()[-5:]
    print("\n".join("  | " + line for line in tail), flush=True)
    if rc != 0 or not json_path.exists():
        sys.exit(f"pytest failed (exit {rc}); see {log}")


# ---------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------


def _cpu_model(bench_json: dict) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    cpu = bench_json.get("machine_info", {}).get("cpu", {})
    return cpu.get("brand_raw") or platform.processor() or platform.machine()


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", None)
    except Exception:  # noqa: BLE001 - a stamp, not a dependency
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def build_stamp() -> dict:
    """Which aggtree is measured: taken before the run starts, because the
    working tree (and the installed module) may change while it runs."""
    stamp = {"aggtree_commit": _git_commit(), "aggtree_module": None, "aggtree_built": None}
    try:
        spec = __import__("importlib.util").util.find_spec("aggtree._core")
        if spec and spec.origin:
            st = os.stat(spec.origin)
            stamp["aggtree_module"] = os.path.basename(spec.origin)
            stamp["aggtree_built"] = _dt.datetime.fromtimestamp(st.st_mtime).isoformat(
                timespec="seconds")
    except (ImportError, OSError):
        pass
    return stamp


def machine_stamp(bench_json: dict, native: bool, build: dict) -> dict:
    import sqlite3

    return {
        "cpu": _cpu_model(bench_json),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "numpy": _version("numpy"),
        "sortedcontainers": _version("sortedcontainers"),
        "sqlite": sqlite3.sqlite_version,
        "pytest_benchmark": bench_json.get("version"),
        "aggtree": _version("aggtree"),
        "aggtree_native": native,
        **build,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }


def machine_slug(m: dict) -> str:
    cpu = re.sub(r"\((r|tm)\)|cpu|processor|\d+-core", "", m["cpu"], flags=re.I)
    cpu = re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-")[:32] or "cpu"
    return f"{cpu}-{m['cores']}c"


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def load_rows(bench_json: dict) -> list[dict]:
    rows = []
    for b in bench_json["benchmarks"]:
        x = b.get("extra_info", {})
        if "op" not in x:
            continue
        st = b["stats"]
        ops = x.get("ops") or 1
        row = {
            "op": x["op"], "impl": x["impl"], "n": x["n"], "node_size": x.get("node_size"),
            "ops": ops, "rounds": st["rounds"],
            "ns_per_op": st["min"] / ops * 1e9,
            "ns_per_op_median": st["median"] / ops * 1e9,
            "iqr_pct": 100 * st["iqr"] / st["median"] if st["median"] else None,
        }
        for k in ("bytes_per_item", "key_kind", "native", "batch"):
            if k in x:
                row[k] = x[k]
        rows.append(row)
    return rows


def index(rows):
    """{(op, impl, n): row} for the default node size; sweep rows apart."""
    main, sweep = {}, defaultdict(dict)
    for r in rows:
        if r["op"].startswith("sweep_"):
            sweep[r["op"][6:]][r["node_size"]] = r
        else:
            main[(r["op"], r["impl"], r["n"])] = r
    return main, sweep


def fmt_ns(ns: float | None) -> str:
    if ns is None:
        return "-"
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e4:
        return f"{ns / 1e3:.1f} us"
    return f"{ns:.0f} ns"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}x"
    if x >= 10:
        return f"{x:.1f}x"
    return f"{x:.2f}x"


def ratio_tables(main: dict, sizes: list[int]) -> tuple[list[dict], list[str]]:
    """The ratio table as records and as markdown lines."""
    records, md = [], []
    for op, title, unit in TIME_OPS:
        impls = sorted({i for (o, i, _n) in main if o == op and i != "aggtree"},
                       key=lambda i: (BASELINES + ("aggtree-loop",)).index(i)
                       if i in BASELINES + ("aggtree-loop",) else 99)
        if not any((op, "aggtree", n) in main for n in sizes):
            continue
        md.append(f"\n**{title}** (time per {unit}; ratio = baseline time / aggtree time)\n")
        md.append("| n | aggtree | " + " | ".join(impls) + " |")
        md.append("|---:|---:|" + "---:|" * len(impls))
        for n in sizes:
            a = main.get((op, "aggtree", n))
            if a is None:
                continue
            cells = []
            rec = {"op": op, "n": n, "aggtree_ns": round(a["ns_per_op"], 2), "ratios": {}}
            for i in impls:
                b = main.get((op, i, n))
                if b is None:
                    cells.append("-")
                    continue
                r = b["ns_per_op"] / a["ns_per_op"]
                rec["ratios"][i] = round(r, 3)
                cells.append(f"{fmt_ratio(r)} ({fmt_ns(b['ns_per_op'])})")
            records.append(rec)
            md.append(f"| {n:,} | {fmt_ns(a['ns_per_op'])} | " + " | ".join(cells) + " |")
    # memory
    mem_impls = ["aggtree", *BASELINES]
    if any(k[0] == "memory" for k in main):
        md.append("\n**memory** (bytes per item; aggtree: `Aggregate.nbytes`)\n")
        md.append("| n | " + " | ".join(mem_impls) + " |")
        md.append("|---:|" + "---:|" * len(mem_impls))
        for n in sizes:
            cells = []
            rec = {"op": "memory", "n": n, "bytes_per_item": {}}
            for i in mem_impls:
                b = main.get(("memory", i, n))
                bpi = b.get("bytes_per_item") if b else None
                if bpi is not None:
                    rec["bytes_per_item"][i] = round(bpi, 2)
                cells.append("-" if bpi is None else f"{bpi:.1f}")
            records.append(rec)
            md.append(f"| {n:,} | " + " | ".join(cells) + " |")
    # key kinds
    if any(k[0].startswith("keys_") for k in main):
        md.append("\n**key types** (aggtree; ratio = time / float-key time: below 1 is faster "
                  "than float keys)\n")
        md.append("| n | op | float | str | str / float | (str, float) prefix | prefix / float "
                  "| sortedcontainers str |")
        md.append("|---:|---|---:|---:|---:|---:|---:|---:|")
        for n in sizes:
            for op in ("keys_count", "keys_insert", "keys_at"):
                f = main.get((op, "aggtree-float", n))
                if f is None:
                    continue
                s = main.get((op, "aggtree-str", n))
                t = main.get((op, "aggtree-tuple", n))
                k = main.get((op, "sortedcontainers-str", n))
                rs = s["ns_per_op"] / f["ns_per_op"] if s else None
                rt = t["ns_per_op"] / f["ns_per_op"] if t else None
                records.append({"op": op, "n": n, "float_ns": round(f["ns_per_op"], 2),
                                "str_over_float": rs and round(rs, 3),
                                "prefix_over_float": rt and round(rt, 3)})
                md.append(
                    f"| {n:,} | {op[5:]} | {fmt_ns(f['ns_per_op'])} | "
                    f"{fmt_ns(s and s['ns_per_op'])} | {fmt_ratio(rs)} | "
                    f"{fmt_ns(t and t['ns_per_op'])} | {fmt_ratio(rt)} | "
                    f"{fmt_ns(k and k['ns_per_op'])} |")
            m = [main.get(("keys_memory", i, n)) for i in
                 ("aggtree-float", "aggtree-str", "aggtree-tuple")]
            if any(m):
                cells = ["-" if r is None else f"{r['bytes_per_item']:.1f} B" for r in m]
                md.append(f"| {n:,} | bytes/item | {cells[0]} | {cells[1]} | | {cells[2]} | | |")
    return records, md


# ---------------------------------------------------------------------------
# Bars
# ---------------------------------------------------------------------------


def _time(main, op, impl, n, stat="ns_per_op"):
    r = main.get((op, impl, n))
    return None if r is None else r[stat]


def evaluate_bars(main: dict, n: int) -> list[dict]:
    """The performance bars of issues 2-4 at size n, from the fastest rounds;
    each bar also carries the same ratio from the median rounds."""
    bars = evaluate_bars_stat(main, n, "ns_per_op")
    for b, m in zip(bars, evaluate_bars_stat(main, n, "ns_per_op_median")):
        b["median_measured"] = m["measured"]
        b["median_pass"] = m["pass"]
    return bars


def evaluate_bars_stat(main: dict, n: int, stat: str) -> list[dict]:
    bars = []

    def _ns(main, op, impl, n):
        return _time(main, op, impl, n, stat)

    def faster(name, op, base, need, base_desc):
        a, b = _ns(main, op, "aggtree", n), _ns(main, op, base, n)
        r = None if a is None or b is None else b / a
        bars.append({"bar": name, "target": f">= {need}x faster than {base_desc}",
                     "measured": None if r is None else f"{r:,.1f}x",
                     "value": r, "pass": None if r is None else r >= need})

    def at_most(name, target, value, limit, measured):
        bars.append({"bar": name, "target": target, "measured": measured, "value": value,
                     "pass": None if value is None else value <= limit})

    faster("count (two bounds)", "count", "sortedcontainers", 10,
           "SortedKeyList bisect_key_right - bisect_key_left")
    faster("sum (wide range)", "sum", "sortedcontainers", 1000, "summing the SortedKeyList slice")
    faster("insert one at a time", "insert", "sortedcontainers", 4, "SortedKeyList.add")
    faster("delete one at a time", "delete", "sortedcontainers", 4, "SortedKeyList.remove")
    faster("at (select)", "at", "sortedcontainers", 3, "SortedList indexing")
    faster("index_of (rank)", "index_of", "sortedcontainers", 3, "SortedList bisect_key_left")
    m = main.get(("memory", "aggtree", n))
    bpi = m and m.get("bytes_per_item")
    at_most("memory per item (float key, int id, float value)", "<= 32 bytes/item", bpi, 32,
            None if bpi is None else f"{bpi:.1f} bytes/item")
    a, b = _ns(main, "count_many", "aggtree", n), _ns(main, "count_many", "numpy", n)
    r = None if a is None or b is None else a / b
    at_most("count_many (random ranges)", "<= 1.5x the two np.searchsorted calls", r, 1.5,
            None if r is None else f"{r:.2f}x numpy")
    a, b = _ns(main, "from_arrays", "aggtree", n), _ns(main, "from_arrays", "numpy", n)
    r = None if a is None or b is None else a / b
    at_most("from_arrays (unsorted)", "<= 2x np.lexsort of keys and ids", r, 2.0,
            None if r is None else f"{r:.2f}x lexsort")
    at_most("from_arrays per item", "< 250 ns/item", a, 250 - 1e-9,
            None if a is None else f"{a:.0f} ns/item")
    a, b = _ns(main, "insert_many", "aggtree", n), _ns(main, "insert_many", "aggtree-loop", n)
    r = None if a is None or b is None else b / a
    bars.append({"bar": f"insert_many ({n // 10:,} into {n:,})",
                 "target": ">= 10x faster than one-by-one insert",
                 "measured": None if r is None else f"{r:.1f}x", "value": r,
                 "pass": None if r is None else r >= 10})
    for op, what in (("keys_count", "count"), ("keys_insert", "insert"), ("keys_at", "at")):
        f, s = _ns(main, op, "aggtree-float", n), _ns(main, op, "aggtree-str", n)
        r = None if f is None or s is None else s / f
        at_most(f"str keys: {what}", "within 2x of float keys", r, 2.0,
                None if r is None else f"{r:.2f}x float")
    f, t = _ns(main, "keys_count", "aggtree-float", n), _ns(main, "keys_count", "aggtree-tuple", n)
    r = None if f is None or t is None else t / f
    at_most("(str, float) keys: prefix count", "within 3x of float count", r, 3.0,
            None if r is None else f"{r:.2f}x float")
    m = main.get(("keys_memory", "aggtree-str", n))
    bpi = m and m.get("bytes_per_item")
    bars.append({"bar": "memory per item, short str keys", "target": "reported",
                 "measured": None if bpi is None else f"{bpi:.1f} bytes/item", "value": bpi,
                 "pass": None})
    return bars


def bars_md(bars: list[dict], n: int) -> list[str]:
    md = [f"\n**Performance bars** at n = {n:,} (ratios from this one run; fastest rounds, "
          "and in the last column the same from the median rounds)\n",
          "| bar | target | measured | result | median rounds |", "|---|---|---:|:---:|---:|"]
    for b in bars:
        res = {True: "PASS", False: "**FAIL**", None: "-"}[b["pass"]]
        if b["pass"] is None and b["measured"] is None:
            res = "not measured"
        med = b.get("median_measured") or "-"
        if b.get("median_pass") is not None and b["median_pass"] != b["pass"]:
            med += " (" + ("pass" if b["median_pass"] else "fail") + ")"
        md.append(f"| {b['bar']} | {b['target']} | {b['measured'] or '-'} | {res} | {med} |")
    return md


# ---------------------------------------------------------------------------
# Node-size sweep
# ---------------------------------------------------------------------------


def evaluate_sweep(sweep: dict, default_node_size) -> tuple[dict, list[str]]:
    ops = [o for o in ("count", "at", "insert") if sweep.get(o)]
    sizes = sorted(set().union(*[set(sweep[o]) for o in ops])) if ops else []
    if not sizes:
        return {}, []
    n = next(iter(sweep[ops[0]].values()))["n"]
    best = {o: min(sweep[o], key=lambda s: sweep[o][s]["ns_per_op"]) for o in ops}
    mem = {s: sweep.get("memory", {}).get(s, {}).get("bytes_per_item") for s in sizes}

    def score(s):
        xs = [sweep[o][s]["ns_per_op"] / sweep[o][best[o]]["ns_per_op"]
              for o in ops if s in sweep[o]]
        return math.exp(sum(map(math.log, xs)) / len(xs)) if len(xs) == len(ops) else math.inf

    fits = [s for s in sizes if mem[s] is None or mem[s] <= 32]
    pick = min(fits or sizes, key=score)
    table = []
    md = [f"\n**Node-size sweep** (aggtree, n = {n:,}; time per call, bytes per item)\n",
          "| node_size | " + " | ".join(ops) + " | bytes/item | geo-mean vs best |",
          "|---:|" + "---:|" * (len(ops) + 2)]
    for s in sizes:
        cells = [fmt_ns(sweep[o][s]["ns_per_op"]) if s in sweep[o] else "-" for o in ops]
        mark = " **(best)**" if s == pick else (" (default)" if s == default_node_size else "")
        md.append(f"| {s}{mark} | " + " | ".join(cells)
                  + f" | {'-' if mem[s] is None else f'{mem[s]:.1f}'} | {score(s):.2f} |")
        table.append({"node_size": s, **{o: round(sweep[o][s]["ns_per_op"], 2)
                                         for o in ops if s in sweep[o]},
                      "bytes_per_item": mem[s], "score": round(score(s), 3)})
    parts = [f"{o} is fastest at {best[o]}" for o in ops]
    small = min((s for s in sizes if mem[s] is not None), key=lambda s: mem[s], default=None)
    why = (f"node_size={pick} has the lowest geometric mean of count, at and insert time "
           f"relative to the per-operation best ({score(pick):.2f}x)"
           + (" among node sizes within 32 bytes/item" if fits and len(fits) < len(sizes) else "")
           + f"; {', '.join(parts)}"
           + (f"; memory is {mem[pick]:.1f} bytes/item (least: {mem[small]:.1f} at {small})"
              if small is not None and mem[pick] is not None else "")
           + ". Small nodes make deeper trees (more pointer chasing per count/at) and more "
             "per-node overhead; large nodes make each insert shift more entries.")
    if default_node_size is not None and default_node_size != pick and default_node_size in mem:
        d, dm = score(default_node_size), mem[default_node_size]
        why += f" The current default ({default_node_size}) scores {d:.2f}x"
        if dm is not None and dm > 32:
            why += f" but holds {dm:.1f} bytes/item, over the 32-byte bar"
        elif d <= score(pick) * 1.10:
            why += " (within 10% of the best: either will do)"
        why += "."
    md.append(f"\n{why}\n")
    return {"n": n, "best": pick, "best_per_op": best, "table": table, "why": why}, md


# ---------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------


def plot(main: dict, out: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot")
        return None
    ops = [o for o in PLOT_OPS if any(k[0] == o for k in main)]
    if not ops:
        return None
    cols = 3
    rows = math.ceil(len(ops) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
    styles = {"aggtree": ("C3", "o", 2.5), "reference": ("C7", "s", 1.2),
              "sortedcontainers": ("C0", "^", 1.2), "bisect": ("C2", "v", 1.2),
              "numpy": ("C1", "D", 1.2), "sqlite": ("C4", "x", 1.2),
              "aggtree-loop": ("C5", "o", 1.2)}
    units = {o: u for o, _t, u in TIME_OPS}
    titles = {o: t for o, t, _u in TIME_OPS}
    for ax, op in zip(axes.flat, ops):
        impls = sorted({i for (o, i, _n) in main if o == op},
                       key=lambda i: list(styles).index(i) if i in styles else 99)
        for impl in impls:
            pts = sorted((n, r["ns_per_op"]) for (o, i, n), r in main.items()
                         if o == op and i == impl)
            if not pts:
                continue
            c, m, lw = styles.get(impl, ("k", ".", 1))
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker=m, color=c, lw=lw,
                      label=impl)
        ax.set_title(titles.get(op, op), fontsize=10)
        ax.set_xlabel("n (items)")
        ax.set_ylabel(f"ns per {units.get(op, 'op')}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "scaling.png"
    fig.savefig(path, dpi=72)
    plt.close(fig)
    try:  # a 256-colour palette keeps the file small (the plot uses a few colours)
        from PIL import Image

        with Image.open(path) as im:
            small = im.convert("RGB").quantize(colors=256)
        small.save(path, optimize=True)
    except Exception:  # noqa: BLE001 - the full-colour PNG is fine too
        pass
    return path


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def compact_json(payload: dict) -> str:
    """JSON with one record per line: small, and diffable."""
    parts = []
    for k, v in payload.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            body = ",\n  ".join(json.dumps(x, separators=(",", ":")) for x in v)
            parts.append(f"{json.dumps(k)}: [\n  {body}\n ]")
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (10^3, 10^4)")
    ap.add_argument("--out", type=Path, help="output directory (default: bench/results; "
                    "a temporary directory with --quick)")
    ap.add_argument("--from-json", type=Path, help="report on an existing pytest-benchmark "
                    "JSON file instead of running the suites")
    ap.add_argument("-k", dest="select", help="pytest -k expression (a subset of benchmarks)")
    ap.add_argument("--commit", help="with --from-json: the aggtree commit that was measured")
    args = ap.parse_args(argv)

    out = args.out or (Path(tempfile.mkdtemp(prefix="aggtree-bench-")) if args.quick
                       else HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    build = build_stamp()
    if args.from_json:
        raw_path = args.from_json
        build["aggtree_commit"] = args.commit  # the run happened earlier
        build["aggtree_built"] = None
    else:
        raw_path = Path(tempfile.mkdtemp(prefix="aggtree-bench-raw-")) / "pytest-benchmark.json"
        run_pytest(raw_path, args.quick, ["-k", args.select] if args.select else [])
    bench_json = json.loads(raw_path.read_text())
    rows = load_rows(bench_json)
    if not rows:
        sys.exit("no aggtree benchmarks in the results")
    main_idx, sweep = index(rows)
    sizes = sorted({r["n"] for r in rows if not r["op"].startswith("sweep_")})
    native = all(r.get("native", True) for r in rows)
    default_ns = next((r["node_size"] for r in rows if r["impl"] == "aggtree"
                       and not r["op"].startswith("sweep_") and r.get("node_size")), None)

    machine = machine_stamp(bench_json, native, build)
    date = (bench_json.get("datetime") or _dt.datetime.now().isoformat())[:10]
    stamp = (f"{machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
             f"numpy {machine['numpy']}, sortedcontainers {machine['sortedcontainers']}, "
             f"SQLite {machine['sqlite']}; aggtree "
             f"{'native' if native else 'PURE-PYTHON REFERENCE (AGGTREE_PURE=1)'}"
             f"{' (commit ' + machine['aggtree_commit'] + ')' if machine['aggtree_commit'] else ''}"
             f"{', module built ' + machine['aggtree_built'] if machine['aggtree_built'] else ''}"
             f", default node_size {default_ns}")

    records, table_md = ratio_tables(main_idx, sizes)
    n_max = sizes[-1]
    bars = evaluate_bars(main_idx, n_max)
    sweep_res, sweep_md = evaluate_sweep(sweep, default_ns)

    md = [f"# aggtree benchmark summary ({date})", "",
          f"Machine: {stamp}.", "",
          "Each figure is the fastest round divided by the operations in the round (a round "
          "is a batch of different random queries), from one run of `python bench/report.py` "
          "on a shared machine: compare ratios, not absolute times. "
          "Ratio = baseline time / aggtree time (above 1: aggtree is faster).",
          "", "![time per operation against n](scaling.png)"]
    if not native:
        md += ["", "**Warning: these figures are for the pure-Python reference standing in for "
                   "aggtree (the native module was not used).**"]
    md += bars_md(bars, n_max) + table_md + sweep_md
    text = "\n".join(md) + "\n"

    payload = {
        "date": date, "machine": machine, "mode": "quick" if args.quick else "full",
        "sizes": sizes, "native": native, "default_node_size": default_ns,
        "method": "ns_per_op = fastest round / ops per round (ns_per_op_median: median round); "
                  "ratios = baseline / aggtree from ns_per_op; GC off while timing",
        "bars": [{k: v for k, v in b.items() if k != "value"} for b in bars],
        "ratios": records, "sweep": sweep_res,
        "results": [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()
                     if k not in ("native", "iqr_pct") and v is not None} for r in rows],
    }
    json_path = out / f"{date}-{machine_slug(machine)}.json"
    json_path.write_text(compact_json(payload))
    (out / "summary.md").write_text(text)
    png = plot(main_idx, out, f"aggtree: time per operation vs n ({machine['cpu']}, "
                              f"{'native' if native else 'pure-Python reference'})")
    print(text)
    print(f"wrote {json_path}\nwrote {out / 'summary.md'}" + (f"\nwrote {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
