#!/usr/bin/env python3
"""Mutation check of the C core: plant small bugs one at a time, see what catches them.

Not a test module (pytest collects only test_*.py files, so it never imports
this one or mutants.py) and not part of CI: it rebuilds the core once per
mutant.  Each mutant (tests/mutation/mutants.py) names a snippet of the core
(src/aggtree/**/*.c, *.h) by its exact text (``find``, which must occur
exactly once across those files) and the text that replaces it.  For each
mutant the script:

1. restores the pristine sources in a scratch copy of the repository and applies
   the mutation there (the worktree itself is never touched);
2. builds incrementally (persistent build directories under the scratch dir);
3. runs ctest on a plain C build (-DAGGTREE_TESTS=ON), then the Python suite
   against the mutated extension (built into <scratch>/site with pip --target,
   imported through PYTHONPATH, so no installed aggtree is disturbed), the
   files most likely to catch a core bug first, stopping at the first failure;
4. reports the first failing ctest test / pytest node id, or "SURVIVED".

A build failure is reported as "build error" (a bad mutant: fix it); a stage
that exceeds its timeout counts as caught (an infinite loop is a detected bug)
and is reported as a timeout.  Usage (from the repository root, with the dev
venv active; 20 s to 7 min per mutant on a loaded 2-core machine, ~50 min for
the whole list):

    python tests/mutation/run.py                  # every mutant
    python tests/mutation/run.py --list           # list them
    python tests/mutation/run.py --only M03,M11   # some of them
    python tests/mutation/run.py --json out.json  # also write the results

Options: --tests FILE,... runs only those pytest files / node ids (does a new
test catch mutant X?: --py-only --only X --tests tests/test_new.py);
--keep-going runs both stages and the whole Python suite (not -x) and
lists every failing test; --c-only / --py-only run one stage; --scratch DIR
(default build/mutation, ignored by git) keeps the copy and build dirs between
runs; --no-baseline skips the pristine run that first proves the suite passes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from mutants import MUTANTS  # noqa: E402

# Python test files in the order they run: fast files that exercise the core's
# reads and writes at size first, so that -x stops early on most mutants.
PY_FIRST = [
    "tests/api/test_scale.py",
    "tests/api/test_core_paths.py",
    "tests/api/test_api.py",
    "tests/api/test_bulk_large.py",
    "tests/reliability/test_fuzz.py",
    "tests/api/test_stateful.py",
]

C_TIMEOUT = 300          # seconds per ctest test
PY_TIMEOUT = 900         # seconds for the whole pytest run of one mutant
BUILD_TIMEOUT = 900


SITECUSTOMIZE = '''"""Written by tests/mutation/run.py: drop editable-install finders of aggtree."""
import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if not type(f).__module__.startswith("_editable_skbc_")]
'''


class MutantError(Exception):
    """A mutant that cannot be applied (stale or ambiguous anchor)."""


def log(msg: str) -> None:
    print(msg, flush=True)


def run(cmd, cwd=None, env=None, timeout=None, logfile=None):
    """Run cmd in its own process group; returns (rc or 'timeout', output)."""
    out = open(logfile, "w") if logfile else subprocess.DEVNULL
    try:
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
    finally:
        if logfile:
            out.close()
    text = open(logfile).read() if logfile else ""
    return rc, text


def core_files(repo: str) -> list[str]:
    """The C core's sources: every .c / .h under src/aggtree (subdirectories too,
    so that a split of the core into several files needs no change here)."""
    return sorted(glob.glob(os.path.join(repo, "src/aggtree/**/*.c"), recursive=True) +
                  glob.glob(os.path.join(repo, "src/aggtree/**/*.h"), recursive=True))


def locate(m: dict, pristine: dict[str, str]) -> str:
    """The one core file holding m['find'] exactly once, else MutantError."""
    hits = [(f, txt.count(m["find"])) for f, txt in pristine.items()]
    hits = [(f, c) for f, c in hits if c]
    total = sum(c for _, c in hits)
    if total == 0:
        raise MutantError(f"{m['id']}: anchor not found in src/aggtree/**/*.c|*.h: {m['find']!r}")
    if total > 1:
        where = ", ".join(f"{os.path.basename(f)} x{c}" for f, c in hits)
        raise MutantError(f"{m['id']}: anchor ambiguous ({where}): {m['find']!r}")
    return hits[0][0]


def sync_tree(src: str, dst: str) -> None:
    """Copy the tracked files of src to dst, rewriting only those that differ
    (unchanged files keep their mtimes, so builds stay incremental)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=src, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        s = os.path.join(src, name)
        d = os.path.join(dst, name)
        if not os.path.isfile(s):
            continue
        with open(s, "rb") as fh:
            data = fh.read()
        if os.path.isfile(d):
            with open(d, "rb") as fh:
                if fh.read() == data:
                    continue
        os.makedirs(os.path.dirname(d), exist_ok=True)
        with open(d, "wb") as fh:
            fh.write(data)
        shutil.copymode(s, d)


class Runner:
    def __init__(self, args):
        self.args = args
        self.scratch = os.path.abspath(args.scratch)
        self.repo = os.path.join(self.scratch, "repo")
        self.build_c = os.path.join(self.scratch, "build-c")
        self.build_ext = os.path.join(self.scratch, "build-ext")
        self.site = os.path.join(self.scratch, "site")
        self.logs = os.path.join(self.scratch, "logs")
        # An editable install of aggtree (scikit-build-core) imports through a
        # finder in sys.meta_path, ahead of PYTHONPATH: a sitecustomize on
        # PYTHONPATH removes such finders so that <scratch>/site is what loads.
        self.boot = os.path.join(self.scratch, "boot")
        os.makedirs(self.boot, exist_ok=True)
        with open(os.path.join(self.boot, "sitecustomize.py"), "w") as fh:
            fh.write(SITECUSTOMIZE)
        os.makedirs(self.repo, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        sync_tree(ROOT, self.repo)
        self.pristine = {}
        for f in core_files(self.repo):
            with open(f) as fh:
                self.pristine[f] = fh.read()
        self.ext_ready = False

    # -- sources ---------------------------------------------------------
    def restore(self) -> None:
        for f, txt in self.pristine.items():
            with open(f) as fh:
                if fh.read() == txt:
                    continue
            with open(f, "w") as fh:
                fh.write(txt)

    def apply(self, m: dict) -> None:
        f = locate(m, self.pristine)
        with open(f, "w") as fh:
            fh.write(self.pristine[f].replace(m["find"], m["replace"], 1))

    # -- C stage ---------------------------------------------------------
    def c_stage(self, tag: str) -> dict:
        lg = os.path.join(self.logs, f"{tag}-c-build.log")
        if not os.path.isfile(os.path.join(self.build_c, "CMakeCache.txt")):
            rc, _ = run(["cmake", "-S", self.repo, "-B", self.build_c, "-G", "Ninja",
                         "-DAGGTREE_TESTS=ON"], logfile=lg, timeout=BUILD_TIMEOUT)
            if rc != 0:
                return {"status": "build error", "log": lg}
        rc, _ = run(["cmake", "--build", self.build_c], logfile=lg, timeout=BUILD_TIMEOUT)
        if rc != 0:
            return {"status": "build error", "log": lg}
        lg = os.path.join(self.logs, f"{tag}-ctest.log")
        cmd = ["ctest", "--test-dir", self.build_c, "--output-on-failure",
               "--timeout", str(C_TIMEOUT)]
        if not self.args.keep_going:
            cmd.append("--stop-on-failure")
        rc, out = run(cmd, logfile=lg, timeout=C_TIMEOUT * 8)
        if rc == 0:
            return {"status": "passed", "log": lg}
        failed = re.findall(r"^\s*\d+ - (\S+) \(([^)]*)\)", out, re.M)
        if rc == "timeout" or any("Timeout" in why for _, why in failed):
            names = [n for n, why in failed if "Timeout" in why] or ["ctest"]
            return {"status": "caught", "by": [f"ctest {n} (timeout)" for n in names], "log": lg}
        names = [f"ctest {n} ({why})" for n, why in failed] or [f"ctest (rc {rc})"]
        return {"status": "caught", "by": names, "log": lg}

    # -- Python stage ----------------------------------------------------
    def make_ext(self, tag: str) -> bool:
        lg = os.path.join(self.logs, f"{tag}-ext-build.log")
        if not self.ext_ready:
            # First time: a full pip install into <scratch>/site (configures
            # build-ext); later mutants rebuild there and copy the module in.
            rc, _ = run([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                         "--no-deps", "--upgrade", "-q", f"-Cbuild-dir={self.build_ext}",
                         "--target", self.site, self.repo], logfile=lg, timeout=BUILD_TIMEOUT)
            if rc != 0:
                return False
            self.ext_ready = True
            return True
        rc, _ = run(["cmake", "--build", self.build_ext], logfile=lg, timeout=BUILD_TIMEOUT)
        if rc != 0:
            return False
        built = glob.glob(os.path.join(self.build_ext, "_core.*.so")) + \
            glob.glob(os.path.join(self.build_ext, "_core.*.pyd"))
        if len(built) != 1:
            log(f"  cannot find the built module in {self.build_ext}: {built}")
            return False
        shutil.copy2(built[0], os.path.join(self.site, "aggtree", os.path.basename(built[0])))
        return True

    def py_files(self) -> list[str]:
        if self.args.tests:
            return [t.strip() for t in self.args.tests.split(",") if t.strip()]
        first = [f for f in PY_FIRST if os.path.isfile(os.path.join(self.repo, f))]
        rest = sorted(os.path.relpath(f, self.repo)
                      for f in glob.glob(os.path.join(self.repo, "tests/**/test_*.py"), recursive=True))
        return first + [f for f in rest if f not in first]

    def py_stage(self, tag: str) -> dict:
        if not self.make_ext(tag):
            return {"status": "build error",
                    "log": os.path.join(self.logs, f"{tag}-ext-build.log")}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([self.boot, self.site])
        env.pop("AGGTREE_PURE", None)
        # the extension must come from <scratch>/site, nowhere else
        chk = subprocess.run([sys.executable, "-c", "import aggtree._core as c; print(c.__file__)"],
                             cwd=self.repo, env=env, capture_output=True, text=True)
        if chk.returncode != 0 or not chk.stdout.strip().startswith(self.site):
            raise SystemExit(f"aggtree._core does not import from {self.site}: "
                             f"{chk.stdout.strip()} {chk.stderr.strip()[-500:]}")
        junit = os.path.join(self.logs, f"{tag}-pytest.xml")
        lg = os.path.join(self.logs, f"{tag}-pytest.log")
        if os.path.exists(junit):
            os.remove(junit)
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
               f"--junitxml={junit}", "-o", "junit_family=xunit1"]
        if not self.args.keep_going:
            cmd.append("-x")
        cmd += self.py_files()
        rc, out = run(cmd, cwd=self.repo, env=env, timeout=PY_TIMEOUT, logfile=lg)
        if rc == "timeout":
            running = re.findall(r"^(tests/\S+::\S+)", out, re.M)
            where = running[-1] if running else "pytest"
            return {"status": "caught", "by": [f"{where} (timeout after {PY_TIMEOUT} s)"], "log": lg}
        if rc == 0:
            return {"status": "passed", "log": lg}
        failed = []
        try:
            for case in ET.parse(junit).getroot().iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    cls = case.get("classname", "")
                    fn = case.get("file") or (cls.replace(".", "/") + ".py")
                    failed.append(f"{fn}::{case.get('name')}")
        except (ET.ParseError, FileNotFoundError):
            pass
        if not failed:
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M) or [f"pytest (rc {rc})"]
        return {"status": "caught", "by": failed, "log": lg}

    # -- one mutant ------------------------------------------------------
    def run_one(self, m: dict | None) -> dict:
        tag = m["id"] if m else "baseline"
        t0 = time.time()
        res = {"id": tag, "stages": {}}
        try:
            self.restore()
            if m:
                self.apply(m)
            stages = []
            if not self.args.py_only:
                stages.append(("c", self.c_stage))
            if not self.args.c_only:
                stages.append(("py", self.py_stage))
            for name, fn in stages:
                r = fn(tag)
                res["stages"][name] = r
                if r["status"] == "build error":
                    break
                if r["status"] == "caught" and not self.args.keep_going:
                    break
        finally:
            self.restore()
        st = [r["status"] for r in res["stages"].values()]
        if "build error" in st:
            res["result"] = "build error"
        elif "caught" in st:
            res["result"] = "caught"
            res["by"] = [b for r in res["stages"].values() for b in r.get("by", [])]
        else:
            res["result"] = "survived"
        res["seconds"] = round(time.time() - t0, 1)
        return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--keep-going", action="store_true",
                    help="run both stages and the whole Python suite, report every failure")
    ap.add_argument("--c-only", action="store_true", help="ctest only")
    ap.add_argument("--py-only", action="store_true", help="Python suite only")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--tests", help="comma-separated pytest files or node ids to run instead of "
                    "the whole suite (e.g. to see whether a new test catches a mutant)")
    ap.add_argument("--scratch", default=os.path.join(ROOT, "build", "mutation"),
                    help="scratch directory (copy of the repo and build dirs)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the run on the unmutated sources")
    args = ap.parse_args()
    if args.c_only and args.py_only:
        ap.error("--c-only and --py-only exclude each other")

    ids = [m["id"] for m in MUTANTS]
    if len(set(ids)) != len(ids):
        raise SystemExit("duplicate mutant ids")
    chosen = MUTANTS
    if args.only:
        want = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [w for w in want if w not in ids]
        if unknown:
            raise SystemExit(f"unknown mutant ids: {', '.join(unknown)}")
        chosen = [m for m in MUTANTS if m["id"] in want]

    if args.list:
        for m in chosen:
            eq = f"  [equivalent: {m['equivalent']}]" if m.get("equivalent") else ""
            print(f"{m['id']:5} {m['section']:<22} {m['bug']}{eq}")
        return 0

    t_start = time.time()
    runner = Runner(args)
    bad = []
    for m in chosen:                 # every anchor first: a stale list fails fast
        try:
            locate(m, runner.pristine)
        except MutantError as e:
            bad.append(str(e))
    if bad:
        raise SystemExit("\n".join(bad))

    results = []
    if not args.no_baseline:
        log("baseline (no mutation) ...")
        base = runner.run_one(None)
        log(f"  {'the suite passes' if base['result'] == 'survived' else base['result']} in {base['seconds']} s")
        if base["result"] != "survived":
            log(f"  the unmutated suite does not pass: {json.dumps(base['stages'], indent=1)}")
            return 2
    for m in chosen:
        log(f"{m['id']} [{m['section']}] {m['bug']}")
        r = runner.run_one(m)
        r.update(section=m["section"], bug=m["bug"])
        if m.get("equivalent"):
            r["equivalent"] = m["equivalent"]
        if r["result"] == "caught":
            log(f"  CAUGHT by {r['by'][0]}" + (f" (+{len(r['by']) - 1} more)" if len(r["by"]) > 1 else "")
                + f"  [{r['seconds']} s]")
        elif r["result"] == "build error":
            log(f"  BUILD ERROR (a bad mutant)  [{r['seconds']} s]")
        elif m.get("equivalent"):
            log(f"  not caught: equivalent ({m['equivalent']})  [{r['seconds']} s]")
        else:
            log(f"  SURVIVED  [{r['seconds']} s]")
        results.append(r)

    wall = time.time() - t_start
    caught = sum(r["result"] == "caught" for r in results)
    equiv = sum(r["result"] == "survived" and bool(r.get("equivalent")) for r in results)
    survived = sum(r["result"] == "survived" and not r.get("equivalent") for r in results)
    broken = sum(r["result"] == "build error" for r in results)
    eq_caught = [r["id"] for r in results if r["result"] == "caught" and r.get("equivalent")]
    totals = {"mutants": len(results), "caught": caught, "equivalent": equiv,
              "survived": survived, "build_errors": broken, "wall_seconds": round(wall, 1)}
    log("")
    log(f"{'id':5} {'section':<22} result")
    for r in results:
        what = r["result"]
        if what == "caught":
            what = f"caught by {r['by'][0]}"
        elif what == "survived" and r.get("equivalent"):
            what = "equivalent"
        log(f"{r['id']:5} {r['section']:<22} {what}")
    log("")
    log("mutants {mutants}, caught {caught}, equivalent {equivalent}, survived {survived}, "
        "build errors {build_errors}; wall time {wall_seconds} s".format(**totals))
    if eq_caught:
        log(f"note: marked equivalent but caught (the mark is wrong): {', '.join(eq_caught)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"totals": totals, "mutants": results,
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, fh, indent=1)
    return 0 if survived == 0 and broken == 0 and not eq_caught else 1


if __name__ == "__main__":
    sys.exit(main())
