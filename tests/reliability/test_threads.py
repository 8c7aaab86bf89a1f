"""Threads: several threads on one native Aggregate.

Stress tests
------------
``THREADS`` threads run mixed writes, reads and vectorised calls on one
aggregate for a bounded time.  Each thread owns

* its ids (``t * 10**9 + n``), and
* a band of keys in every namespace: floats in ``[t * 1e6, (t + 1) * 1e6)``
  and strings starting with ``"t<t>:"``,

so a thread's own items change only through its own calls.  That makes the
final state order-independent (it must equal a serial replay of every
thread's logged writes, replayed on the pure-Python reference, with the same
results), and it gives every read an exact expectation for the thread's own
band *at any moment*, whatever the other threads do meanwhile: counts, sums,
``to_arrays``, ``count_many`` / ``sum_many`` over sub-bands, ``at``,
``index_of``, pagination.  Reads over a whole namespace check what holds in
every state: ``(key, id)`` strictly increasing, every value 1.0 (so a sum is
a count), nested ranges give non-decreasing counts, and the thread's own
items appear exactly as its model says.

Namespaces: ``"f"`` (float keys, FAST), ``"g"`` (str keys, GENERAL), ``"m"``
(float keys, converted to GENERAL by the first str key), ``"p"`` (each thread
keeps at most two items there, so it empties, vanishes and is recreated all
the time).

The workload runs in a child process (a crash then fails the test instead
of killing the test run) with a hard timeout (a deadlock fails the test as
well; the child also joins its threads with a timeout and reports the ones
that hang).

* ``scalar``: scalar writes, every scalar read, ``iter``, ``paginate``,
  ``check``, ``count_many`` and ``at_many``.
* ``vectorised``: also ``insert_many``, ``delete_many``, ``to_arrays``,
  ``sum_many`` and ``index_of_many`` (it failed until the races below were
  fixed).

Races
-----
``test_race`` shows each race found, deterministically: a thread holds the
aggregate's lock (a long ``count_many``), other threads queue on it in a
chosen order, and the outcome is checked against the serial orders.

Bulk writes
-----------
``insert_many`` / ``delete_many`` of FAST keys write without the GIL:
``test_bulk_writes_release_the_gil_and_scalar_reads_see_whole_states``
checks that per-item reads of the namespace being written each see the
state before or after the batch, and that another thread reading another
namespace runs meanwhile.

Durations: ~1.5 s per stress run by default, longer with ``CI`` /
``HYPOTHESIS_PROFILE=ci``, shorter under ``AGGTREE_SANITIZED=1``.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import traceback

import pytest

from _reliability import CI, SANITIZED, stats_reporter  # noqa: E402
DURATION = 1.0 if SANITIZED else (5.0 if CI else 1.5)
THREADS = 4
HERE = os.path.dirname(os.path.abspath(__file__))

STATS = {"thread_runs": 0, "thread_ops": 0, "thread_reads_checked": 0, "thread_writes_replayed": 0}


_report_stats = stats_reporter("test_threads", STATS)


def run_child(function: str, config: dict, timeout: float) -> dict:
    """Run ``function(config)`` of this module in a fresh interpreter; its
    last stdout line is a JSON report."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_threads as t; "
        "print(json.dumps(getattr(t, sys.argv[2])(json.loads(sys.argv[3]))), flush=True)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, HERE, function, json.dumps(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"child hung (deadlock?) after {timeout} s; stderr:\n{err[-3000:]}")
    if proc.returncode != 0:
        raise AssertionError(f"child died with status {proc.returncode}; stderr:\n{err[-3000:]}")
    lines = out.strip().splitlines()
    assert lines, f"no report from the child; stderr:\n{err[-3000:]}"
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------
# The stress workload (runs in the child)
# ---------------------------------------------------------------------------

NAMESPACES = ("f", "g", "m", "p")
BAND = 1e6


class Worker:
    """One thread: its own ids and key bands, its model, its log."""

    def __init__(self, agg, t, seed, deadline, vectorised, violations):
        import numpy as np

        self.np = np
        self.agg = agg
        self.t = t
        self.rng = random.Random(seed)
        self.deadline = deadline
        self.vectorised = vectorised
        self.violations = violations
        self.model = {ns: set() for ns in NAMESPACES}  # (key, id) of own items
        self.log = []  # (op, args, kwargs, result-or-exception-name)
        self.next_id = t * 10**9
        self.ops = 0
        self.reads = 0
        self.lo = t * BAND
        self.hi = (t + 1) * BAND
        self.slo = f"t{t}:"
        self.shi = f"t{t};"  # ";" follows ":"

    # -- helpers -------------------------------------------------------------

    def fail(self, msg):
        if len(self.violations) < 50:
            self.violations.append(f"thread {self.t} op {self.ops}: {msg}")

    def fresh(self, ns):
        self.next_id += 1
        if ns == "g" or (ns == "m" and self.rng.random() < 0.3):
            return f"t{self.t}:{self.rng.randrange(10**6):07d}", self.next_id
        return self.lo + self.rng.randrange(10**6 - 1) + self.rng.choice([0.0, 0.5]), self.next_id

    def own_sorted(self, ns):
        return sorted(self.model[ns], key=lambda p: (isinstance(p[0], str), p[0], p[1]))

    def band_kw(self, ns, which):
        from aggtree import Bound

        if which == "float":
            return {"lower": self.lo, "upper": Bound(self.hi, inclusive=False)}
        return {"lower": self.slo, "upper": Bound(self.shi, inclusive=False)}

    def own_in(self, ns, which):
        return [p for p in self.own_sorted(ns) if isinstance(p[0], str) == (which == "str")]

    def call(self, op, *args, **kwargs):
        """A logged write."""
        try:
            result = getattr(self.agg, op)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - logged and replayed
            result = ("raised", type(exc).__name__)
            self.fail(f"{op}{args} {kwargs} raised {exc!r}")
        self.log.append((op, args, kwargs, result))
        self.ops += 1
        return result

    # -- writes --------------------------------------------------------------

    def w_insert(self):
        ns = self.rng.choice(NAMESPACES)
        if ns == "p" and len(self.model["p"]) >= 2:
            return self.w_delete("p")
        k, i = self.fresh(ns)
        self.call("insert", k, i, 1.0, namespace=ns)
        self.model[ns].add((k, i))

    def w_delete(self, ns=None):
        ns = ns or self.rng.choice(NAMESPACES)
        if not self.model[ns]:
            return
        k, i = self.rng.choice(sorted(self.model[ns], key=repr))
        if self.rng.random() < 0.5:
            self.call("delete", k, i, namespace=ns)
        else:
            r = self.call("delete_if_exists", k, i, namespace=ns)
            if r is not True:
                self.fail(f"delete_if_exists of an own item returned {r!r}")
        self.model[ns].discard((k, i))

    def w_upsert(self):
        ns = self.rng.choice(("f", "g", "m"))
        if self.model[ns] and self.rng.random() < 0.5:
            k, i = self.rng.choice(sorted(self.model[ns], key=repr))
            want = False
        else:
            k, i = self.fresh(ns)
            want = True
        r = self.call("upsert", k, i, 1.0, namespace=ns)
        if r is not want:
            self.fail(f"upsert returned {r!r}, expected {want!r}")
        self.model[ns].add((k, i))

    def w_replace(self):
        ns = self.rng.choice(NAMESPACES)
        if not self.model[ns]:
            return
        k, i = self.rng.choice(sorted(self.model[ns], key=repr))
        new_ns = self.rng.choice(NAMESPACES)
        if new_ns == "p" and len(self.model["p"]) >= 2 and ns != "p":
            new_ns = ns
        nk, _ = self.fresh(new_ns)
        if self.rng.random() < 0.5:
            self.call("replace", k, i, nk, 1.0, namespace=ns, new_namespace=new_ns)
        else:
            r = self.call("replace_or_insert", k, i, nk, 1.0, namespace=ns, new_namespace=new_ns)
            if r is not True:
                self.fail(f"replace_or_insert of an own item returned {r!r}")
        self.model[ns].discard((k, i))
        self.model[new_ns].add((nk, i))

    def w_insert_many(self):
        np = self.np
        ns = self.rng.choice(("f", "g", "m", "p"))
        n = 2 if ns == "p" else self.rng.randint(1, 40)
        if ns == "p" and self.model["p"]:
            return self.w_delete_many("p")
        pairs = {}
        while len(pairs) < n:
            k, i = self.fresh(ns)
            pairs[(k, i)] = None
        pairs = list(pairs)
        keys = [p[0] for p in pairs]
        ids = [p[1] for p in pairs]
        if all(isinstance(k, float) for k in keys) and self.rng.random() < 0.7:
            keys, ids = np.array(keys), np.array(ids, dtype=np.int64)
        self.call("insert_many", keys, ids, [1.0] * n, namespace=ns)
        self.model[ns].update(pairs)

    def w_delete_many(self, ns=None):
        np = self.np
        ns = ns or self.rng.choice(NAMESPACES)
        own = sorted(self.model[ns], key=repr)
        if not own:
            return
        chosen = self.rng.sample(own, self.rng.randint(1, min(len(own), 30)))
        keys = [p[0] for p in chosen]
        ids = [p[1] for p in chosen]
        if all(isinstance(k, float) for k in keys) and self.rng.random() < 0.7:
            keys, ids = np.array(keys), np.array(ids, dtype=np.int64)
        self.call("delete_many", keys, ids, namespace=ns)
        self.model[ns].difference_update(chosen)

    # -- reads ---------------------------------------------------------------

    def r_own_band(self):
        """Exact expectations for the own band, whatever the others do."""
        agg = self.agg
        ns = self.rng.choice(NAMESPACES)
        which = "str" if ns == "g" else ("float" if ns in ("f", "p") else self.rng.choice(("float", "str")))
        kw = self.band_kw(ns, which)
        own = self.own_in(ns, which)
        n = len(own)
        self.reads += 1
        c = agg.count(namespace=ns, **kw)
        if c != n:
            self.fail(f"count of own band of {ns!r}: {c}, expected {n}")
        s = agg.sum(namespace=ns, **kw)
        if s != float(n):
            self.fail(f"sum of own band of {ns!r}: {s}, expected {n}")
        if n:
            j = self.rng.randrange(n)
            it = agg.at(j, namespace=ns, **kw)
            if (it.key, it.id) != own[j] or it.value != 1.0:
                self.fail(f"at({j}) of own band of {ns!r}: {it}, expected {own[j]}")
            ix = agg.index_of(own[j][0], id=own[j][1], namespace=ns, **kw)
            if ix != j:
                self.fail(f"index_of own item in {ns!r}: {ix}, expected {j}")
            mn = agg.min(namespace=ns, **kw)
            if mn is None or (mn.key, mn.id) != own[0]:
                self.fail(f"min of own band of {ns!r}: {mn}, expected {own[0]}")
        page = agg.paginate(namespace=ns, page_size=max(1, n // 2 + 1), **kw)
        got = [(it.key, it.id) for it in page.items]
        if got != own[: len(got)] or page.is_done != (len(got) == n):
            self.fail(f"paginate of own band of {ns!r}: {got[:5]}... done={page.is_done}, own {n}")

    def r_own_vectorised(self):
        np = self.np
        agg = self.agg
        ns = self.rng.choice(("f", "p", "m"))
        own = self.own_in(ns, "float")
        keys = [p[0] for p in own]
        cuts = sorted(self.rng.uniform(self.lo, self.hi) for _ in range(6))
        lowers, uppers = np.array(cuts[:3]), np.array(cuts[3:][::-1])
        want = np.array([sum(1 for k in keys if lo_ <= k <= up_) for lo_, up_ in zip(lowers, uppers)])
        self.reads += 1
        c = agg.count_many(lowers, uppers, namespace=ns)
        if not np.array_equal(c, want):
            self.fail(f"count_many over own band of {ns!r}: {c.tolist()}, expected {want.tolist()}")
        if own:
            offs = [0, len(own) - 1]
            k_, i_, v_ = agg.at_many(offs, namespace=ns, lower=self.lo, upper=self.hi - 1)
            got = list(zip(k_.tolist(), i_.tolist()))
            if got != [own[0], own[-1]]:
                self.fail(f"at_many over own band of {ns!r}: {got}, expected {[own[0], own[-1]]}")
        if self.vectorised:
            ix = agg.index_of_many(np.array(cuts), namespace=ns, lower=self.lo, upper=self.hi - 1)
            want_ix = [sum(1 for k in keys if k < x) for x in cuts]
            if ix.tolist() != want_ix:
                self.fail(f"index_of_many over own band of {ns!r}: {ix.tolist()}, expected {want_ix}")
            s = agg.sum_many(lowers, uppers, namespace=ns)
            if not np.array_equal(s, want.astype(float)):
                self.fail(f"sum_many over own band of {ns!r}: {s.tolist()}, expected {want.tolist()}")
            k_, i_, v_ = agg.to_arrays(namespace=ns, lower=self.lo, upper=self.hi - 1)
            got = list(zip(k_.tolist(), i_.tolist()))
            if got != own or not (v_ == 1.0).all():
                bad = next((j for j, (a, b) in enumerate(zip(got, own)) if a != b), min(len(got), len(own)))
                self.fail(f"to_arrays of own band of {ns!r}: {len(got)} items, expected {len(own)}; "
                          f"first difference at {bad}: {got[bad:bad + 1]} vs {own[bad:bad + 1]}; "
                          f"values other than 1.0: {v_[v_ != 1.0][:3].tolist()}")

    def r_global(self):
        """Invariants of every state, over a whole namespace."""
        np = self.np
        agg = self.agg
        ns = self.rng.choice(NAMESPACES)
        self.reads += 1
        if self.vectorised and self.rng.random() < 0.5:
            k_, i_, v_ = agg.to_arrays(namespace=ns)
            items = list(zip(k_.tolist(), i_.tolist(), v_.tolist()))
        else:
            items = [tuple(it) for it in agg.iter(namespace=ns)]
        pairs = [(isinstance(k, str), k, i) for k, i, _ in items]
        if any(a >= b for a, b in zip(pairs, pairs[1:])):
            self.fail(f"items of {ns!r} not strictly increasing")
        if any(v != 1.0 for _, _, v in items):
            self.fail(f"a value other than 1.0 in {ns!r}")
        owners = {i // 10**9 for _, i, _ in items if isinstance(i, int)}
        if any(not (0 <= o < THREADS) for o in owners) or any(not isinstance(i, int) for _, i, _ in items):
            self.fail(f"an id nobody wrote in {ns!r}")
        mine = {(k, i) for k, i, _ in items if i // 10**9 == self.t}
        if mine != self.model[ns]:
            self.fail(f"own items of {ns!r} seen {len(mine)}, expected {len(self.model[ns])}")
        # Nested ranges: non-decreasing counts (one atomic call).
        lowers = np.array([-np.inf, 0.0, BAND, 2 * BAND])
        uppers = np.array([np.inf, THREADS * BAND, 3 * BAND, 2.5 * BAND])
        c = agg.count_many(lowers, uppers, namespace=ns).tolist()
        if not (c[0] >= c[1] >= c[2] >= c[3] >= 0):
            self.fail(f"count_many over nested ranges of {ns!r} not monotonic: {c}")
        if self.vectorised:
            s = agg.sum_many(lowers, uppers, namespace=ns).tolist()
            if not (s[0] >= s[1] >= s[2] >= s[3] >= 0) or any(x != int(x) for x in s):
                self.fail(f"sum_many over nested ranges of {ns!r}: {s}")
        if self.rng.random() < 0.05:
            try:
                agg.check()
            except AssertionError as exc:
                self.fail(f"check() failed: {exc}")

    # -- loop ------------------------------------------------------------------

    def run(self):
        writes = [self.w_insert, self.w_insert, self.w_delete, self.w_upsert, self.w_replace]
        if self.vectorised:
            writes += [self.w_insert_many, self.w_delete_many]
        reads = [self.r_own_band, self.r_own_vectorised, self.r_global]
        try:
            while time.monotonic() < self.deadline:
                if self.rng.random() < 0.55:
                    self.rng.choice(writes)()
                else:
                    self.rng.choice(reads)()
        except Exception:  # noqa: BLE001 - reported
            self.fail("crashed:\n" + traceback.format_exc())


def stress(config: dict) -> dict:
    """The stress workload; returns a report (runs in the child)."""
    from aggtree import reference
    from aggtree._core import Aggregate

    sys.path.insert(0, os.path.dirname(HERE))  # tests/, for conftest
    from conftest import snapshot

    sys.setswitchinterval(config.get("switch", 0.0005))  # many more thread switches
    agg = Aggregate(node_size=config.get("node_size", 8))
    violations: list = []
    deadline = time.monotonic() + config["duration"]
    workers = [Worker(agg, t, config["seed"] * 100 + t, deadline, config["vectorised"], violations)
               for t in range(config["threads"])]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for th in threads:
        th.start()
    hung = []
    for t, th in enumerate(threads):
        th.join(timeout=max(0.0, deadline - time.monotonic()) + 60)
        if th.is_alive():
            hung.append(t)
    if hung:
        return {"hung": hung, "violations": violations}
    try:
        agg.check()
        checked = "ok"
    except AssertionError as exc:
        checked = str(exc)
    # Serial replay of every thread's writes on the reference.
    ref = reference.Aggregate()
    replay_mismatch = []
    for w in workers:
        for op, args, kwargs, result in w.log:
            try:
                r = getattr(ref, op)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                r = ("raised", type(exc).__name__)
            if r != result and len(replay_mismatch) < 20:
                replay_mismatch.append(f"thread {w.t}: {op}{args[:3]} -> {result!r}, replay {r!r}")
    same = snapshot(agg) == snapshot(ref)
    union_ok = all(
        {(it.key, it.id) for it in agg.iter(namespace=ns)}
        == set().union(*(w.model[ns] for w in workers))
        for ns in NAMESPACES
    )
    return {
        "hung": [],
        "violations": violations,
        "check": checked,
        "replay_mismatch": replay_mismatch,
        "final_equals_replay": same,
        "final_equals_models": union_ok,
        "ops": sum(w.ops for w in workers),
        "reads": sum(w.reads for w in workers),
        "writes": sum(len(w.log) for w in workers),
        "items": len(agg),
    }


def _assert_clean(report):
    assert not report["hung"], f"threads {report['hung']} hung: {report['violations'][:5]}"
    assert report["check"] == "ok", report["check"]
    assert not report["violations"], "\n".join(report["violations"][:10])
    assert not report["replay_mismatch"], report["replay_mismatch"]
    assert report["final_equals_replay"] and report["final_equals_models"]


def test_threads_scalar_writes_and_all_reads():
    report = run_child(
        "stress",
        {"duration": DURATION, "threads": THREADS, "seed": 1, "vectorised": False},
        timeout=DURATION * 20 + 60,
    )
    STATS["thread_runs"] += 1
    STATS["thread_ops"] += report.get("ops", 0) + report.get("reads", 0)
    STATS["thread_reads_checked"] += report.get("reads", 0)
    STATS["thread_writes_replayed"] += report.get("writes", 0)
    _assert_clean(report)
    assert report["ops"] > 100 and report["reads"] > 100


def test_threads_vectorised_writes_and_reads():
    report = run_child(
        "stress",
        {"duration": DURATION, "threads": THREADS, "seed": 7, "vectorised": True},
        timeout=DURATION * 20 + 60,
    )
    STATS["thread_runs"] += 1
    STATS["thread_ops"] += report.get("ops", 0) + report.get("reads", 0)
    _assert_clean(report)


# ---------------------------------------------------------------------------
# Deterministic races (run in the child)
# ---------------------------------------------------------------------------


def _hold_lock(agg):
    """Start a thread that holds ``agg``'s lock for a while (a long
    count_many ranks with the lock held and the GIL released) and return it
    once the lock is known to be held (a probe insert blocks)."""
    import numpy as np

    lows = np.zeros(4_000_000)
    ups = np.full(4_000_000, 5e4)
    for attempt in range(50):
        holder = threading.Thread(target=agg.count_many, args=(lows, ups), kwargs={"namespace": "big"})
        holder.start()
        time.sleep(0.02)
        probe = threading.Thread(target=agg.upsert, args=(float(attempt), attempt), kwargs={"namespace": "probe"})
        probe.start()
        time.sleep(0.01)
        if probe.is_alive():  # blocked on the lock: the holder has it
            return holder, probe
        holder.join()
        probe.join()
    # count_many no longer releases the GIL with the lock held (or takes no
    # lock): nothing can queue behind it, the scenario cannot arise.
    return None, None


def _queue(*calls):
    """Start each call in a thread, in order, each after the previous one
    has had time to block on the lock; returns the threads and results."""
    results = [None] * len(calls)
    threads = []

    def runner(j, fn):
        try:
            results[j] = ("ok", fn())
        except Exception as exc:  # noqa: BLE001
            results[j] = ("raised", type(exc).__name__, str(exc))

    for j, fn in enumerate(calls):
        th = threading.Thread(target=runner, args=(j, fn))
        th.start()
        threads.append(th)
        time.sleep(0.01)
    return threads, results


def _base():
    import numpy as np

    from aggtree._core import Aggregate

    agg = Aggregate()
    agg.insert_many(np.arange(100_000.0), np.arange(100_000), namespace="big")
    return agg


def race(config: dict) -> dict:
    """One race scenario; returns what was observed and whether it is a
    state some serial order of the calls produces."""
    import numpy as np

    name = config["scenario"]
    agg = _base()
    if name not in ("sum_many_stale_ranks", "reads_during_insert_many"):
        holder, probe = _hold_lock(agg)
        if holder is None:
            return {"ok": True, "detail": "the lock was never seen held: scenario does not arise"}
        holder.join()
        probe.join()
    if name == "insert_many_vs_namespace_drop":
        # insert_many validates against the namespace's tree, then waits for
        # the lock; a delete queued earlier empties (drops) the namespace;
        # insert_many then writes into the dropped tree.
        agg.insert(0.0, 0, namespace="x")
        holder, probe = _hold_lock(agg)  # (seen held above)
        ths, res = _queue(
            lambda: agg.delete(0.0, 0, namespace="x"),
            lambda: agg.insert_many(np.array([5.0, 6.0]), np.array([5, 6]), namespace="x"),
        )
        expect = [(5.0, 5), (6.0, 6)]
    elif name == "insert_many_vs_conversion":
        # insert_many (FAST keys) waits for the lock; an insert queued
        # earlier converts the namespace to GENERAL; insert_many then writes
        # FAST keys into a GENERAL tree.
        agg.insert(0.0, 0, namespace="x")
        holder, probe = _hold_lock(agg)  # (seen held above)
        ths, res = _queue(
            lambda: agg.insert("s", 1, namespace="x"),
            lambda: agg.insert_many(np.array([5.0, 6.0]), np.array([5, 6]), namespace="x"),
        )
        expect = [(0.0, 0), (5.0, 5), (6.0, 6), ("s", 1)]
    elif name == "insert_many_vs_namespace_creation":
        # insert_many into a missing namespace bulk-builds a tree and stores
        # it, replacing the one an insert queued earlier created.
        holder, probe = _hold_lock(agg)  # (seen held above)
        ths, res = _queue(
            lambda: agg.insert(1.0, 1, namespace="y"),
            lambda: agg.insert_many(np.array([5.0]), np.array([5]), namespace="y"),
        )
        expect = [(1.0, 1), (5.0, 5)]
    elif name == "delete_many_vs_namespace_recreation":
        # delete_many takes the namespace's tree, then waits for the lock;
        # meanwhile the namespace is cleared (its tree dropped, items and
        # all) and recreated by an insert; delete_many deletes from the
        # dropped tree, finds it empty and drops the namespace's new tree.
        agg.insert(0.0, 0, namespace="x")
        holder, probe = _hold_lock(agg)  # (seen held above)
        ths, res = _queue(
            lambda: agg.clear("x"),
            lambda: agg.insert(2.0, 2, namespace="x"),
            lambda: agg.delete_many(np.array([0.0]), np.array([0]), namespace="x"),
        )
        expect = [(2.0, 2)]  # and delete_many must raise MissingItemError
    elif name == "to_arrays_stale_range":
        # to_arrays computes its index range, then waits for the lock; a
        # delete queued earlier shifts the items; it reads the old positions.
        agg.insert_many(np.arange(100.0), np.arange(100), np.arange(100.0), namespace="x")
        holder, probe = _hold_lock(agg)  # (seen held above)
        ths, res = _queue(
            lambda: agg.delete(10.0, 10, namespace="x"),
            lambda: agg.to_arrays(namespace="x", lower=50.0, upper=60.0),
        )
        expect = None
    elif name == "sum_many_stale_ranks":
        # sum_many ranks under the lock, releases it (and the GIL), and takes
        # it again to sum: a writer that runs in between shifts the items, so
        # the sums are over other positions than the ranked ones.  A writer
        # toggles an item below the range; every sum must be 50 + ... + 60.
        agg.insert_many(np.arange(100.0), np.arange(100), np.arange(100.0), namespace="x")
        stop = []

        def toggle():
            while not stop:
                agg.delete(10.0, 10, namespace="x")
                agg.insert(10.0, 10, 10.0, namespace="x")

        writer = threading.Thread(target=toggle)
        writer.start()
        lows, ups = np.full(50, 50.0), np.full(50, 60.0)
        seen = set()
        end = time.monotonic() + (1.0 if CI else 0.5)
        while time.monotonic() < end and not (seen - {605.0}):
            seen.update(agg.sum_many(lows, ups, namespace="x").tolist())
        stop.append(1)
        writer.join()
        return {"ok": seen <= {605.0}, "detail": f"sum_many(50..60) gave {sorted(seen)[:10]}, always expected 605.0"}
    elif name == "index_of_many_stale_range":
        # index_of_many computes the range without the lock, then ranks the
        # keys under it: a delete queued in between shifts the ranks.
        agg.insert_many(np.arange(100.0), np.arange(100), namespace="x")
        holder, probe = _hold_lock(agg)  # (seen held above)
        ths, res = _queue(
            lambda: agg.delete(10.0, 10, namespace="x"),
            lambda: agg.index_of_many(np.array([55.0]), namespace="x", lower=50.0),
        )
        expect = None
    elif name == "reads_during_insert_many":
        # insert_many mutates the tree with the GIL released (holding only
        # the aggregate's lock); scalar reads take no lock, so they ran in
        # the middle of the mutation until they learned to wait for it (the
        # tree's busy mark, _tt in _core.pyx).  An item present throughout
        # (the last one) must always be seen where it is.
        from aggtree._core import Aggregate

        agg = Aggregate(node_size=64)
        agg.insert_many(np.arange(0, 1000, dtype=np.float64) * 1e6, np.arange(1000), namespace="x")
        agg.insert(1e18, 0, namespace="x")  # present throughout
        keys = np.random.default_rng(1).random(3_000_000) * 1e9
        writer = threading.Thread(
            target=agg.insert_many, args=(keys, np.arange(10_000, 10_000 + len(keys))), kwargs={"namespace": "x"}
        )
        writer.start()
        bad = []
        while writer.is_alive() and len(bad) < 5:
            ix = agg.index_of(1e18, namespace="x")
            last = agg.max(namespace="x")
            k, _, _ = agg.to_arrays(namespace="x", lower=9.99e17)
            if ix not in (1000, 1000 + len(keys)) or tuple(last) != (1e18, 0, 0.0) or k.tolist() != [1e18]:
                bad.append(f"index_of={ix}, max={tuple(last)}, to_arrays(lower=9.99e17)={k.tolist()[:3]}")
        writer.join()
        agg.check()
        return {"ok": not bad, "detail": f"reads during insert_many saw: {bad}"}
    else:
        raise ValueError(name)
    for th in ths:
        th.join(60)
    holder.join(60)
    probe.join(60)
    try:
        agg.check()
        checked = "ok"
    except AssertionError as exc:
        checked = str(exc)
    if name == "to_arrays_stale_range":
        k, _, v = res[1][1]
        ok = k.tolist() in (list(np.arange(50.0, 61.0)),) and v.tolist() == k.tolist()
        return {"ok": ok and checked == "ok", "detail": f"to_arrays(50..60) -> keys {k.tolist()}"}
    if name == "index_of_many_stale_range":
        r = res[1][1].tolist()
        return {"ok": r == [5] and checked == "ok", "detail": f"index_of_many([55], lower=50) -> {r}, expected [5]"}
    ns = "y" if name == "insert_many_vs_namespace_creation" else "x"
    got = sorted(((it.key, it.id) for it in agg.iter(namespace=ns)), key=repr)
    ok = checked == "ok" and got == sorted(expect, key=repr)
    if name == "delete_many_vs_namespace_recreation":
        ok = ok and res[2][0] == "raised" and res[2][1] == "MissingItemError"
    return {"ok": ok, "detail": f"namespace {ns!r}: {got}, expected {expect}; results {res}; check {checked}"}


RACES = [
    "insert_many_vs_namespace_drop",
    "insert_many_vs_conversion",
    "insert_many_vs_namespace_creation",
    "delete_many_vs_namespace_recreation",
    "to_arrays_stale_range",
    "sum_many_stale_ranks",
    "index_of_many_stale_range",
    "reads_during_insert_many",
]


@pytest.mark.parametrize("scenario", RACES)
def test_race(scenario):
    """Each scenario must end in a state of some serial order of its calls
    (tried a few times: the lock queue order is not guaranteed)."""
    for _ in range(3 if CI and not SANITIZED else 1):
        report = run_child("race", {"scenario": scenario}, timeout=120)
        assert report["ok"], report["detail"]


# ---------------------------------------------------------------------------
# Bulk writes release the GIL (run in the child)
# ---------------------------------------------------------------------------


def bulk_reads(config: dict) -> dict:
    """insert_many and delete_many of FAST keys change the tree without the
    GIL.  Meanwhile per-item reads (which take no lock) of the namespace
    being written must each see the state before or after the batch, and
    reads of another namespace must not wait for it.  A read that reached
    the tree mid-write would read freed or half-moved nodes: a wrong answer
    or a crash (which fails the test as a dead child)."""
    import numpy as np

    from aggtree._core import Aggregate, _tree_busy

    n = config["n"]
    rng = np.random.default_rng(config["seed"])
    k0 = rng.random(n)
    agg = Aggregate.from_arrays(k0, np.arange(n), np.ones(n))
    agg.insert_many(np.arange(100.0), np.arange(100), namespace="other")
    k1 = rng.random(n)
    i1 = np.arange(n, 2 * n)
    before = np.sort(k0)
    after = np.sort(np.concatenate([k0, k1]))
    bad, reads = [], 0
    seen = {"busy": 0, "other_reads_while_busy": 0}

    def watch(writer):
        # reads only the other namespace, so it never waits for the batch
        while writer.is_alive():
            if _tree_busy(agg):
                seen["busy"] += 1
                if agg.count(namespace="other") == 100 and _tree_busy(agg):
                    seen["other_reads_while_busy"] += 1

    def check(states, got, what):
        if got not in states and len(bad) < 5:
            bad.append(f"{what} = {got!r}, neither {states[0]!r} (before) nor {states[1]!r} (after)")

    for rep in range(config["rounds"]):
        inserting = rep % 2 == 0
        # old -> new state of this round, for the two kinds of batch
        lo_n, hi_n = (n, 2 * n) if inserting else (2 * n, n)
        lo_k, hi_k = (before, after) if inserting else (after, before)
        writer = threading.Thread(
            target=(lambda: agg.insert_many(k1, i1, np.ones(n))) if inserting else (lambda: agg.delete_many(k1, i1))
        )
        watcher = threading.Thread(target=watch, args=(writer,))
        writer.start()
        watcher.start()
        while writer.is_alive():
            i = int(rng.integers(0, n))
            check((lo_n, hi_n), agg.count(), "count()")
            check((float(lo_n), float(hi_n)), agg.sum(), "sum()")
            check((lo_k[i], hi_k[i]), agg.at(i).key, f"at({i}).key")
            check((lo_k[-1], hi_k[-1]), agg.max().key, "max().key")
            x = float(before[i])
            check((int(np.searchsorted(lo_k, x)), int(np.searchsorted(hi_k, x))),
                  agg.index_of(x), f"index_of({x})")
            reads += 1
        writer.join()
        watcher.join()
    agg.check()
    if agg.count() != n or agg.count(namespace="other") != 100:
        bad.append(f"final counts {agg.count()}, {agg.count(namespace='other')}")
    return {"ok": not bad, "bad": bad, "reads": reads, **seen}


def test_bulk_writes_release_the_gil_and_scalar_reads_see_whole_states():
    n = 100_000 if SANITIZED else 500_000
    for attempt in range(5):
        report = run_child("bulk_reads", {"n": n, "seed": attempt, "rounds": 4}, timeout=300)
        assert report["ok"], report["bad"]
        assert report["reads"] > 0
        if report["other_reads_while_busy"] > 0:
            return
    # every try: no read ever ran while a batch was being written
    pytest.fail(f"no read ran during a bulk write in 5 tries (last: {report}): the GIL is held")


# ---------------------------------------------------------------------------
# Re-entrancy: Python code called back from inside an Aggregate method
# ---------------------------------------------------------------------------


def reentrant(config: dict) -> dict:
    """Callbacks (``rng.randrange``, ``__float__`` of a value, ``__hash__``
    of a namespace) that use the same aggregate while one of its methods
    runs.  Another thread can do the same thing whenever such a callback
    lets the GIL go; a callback just does it deterministically."""
    from aggtree._core import Aggregate

    name = config["scenario"]
    agg = Aggregate()
    if name.startswith("random_rng_mutates"):
        general = name.endswith("general")
        keys = [f"key-{j:03d}" * 4 if general else float(j) for j in range(100)]
        for j, k in enumerate(keys):
            agg.insert(k, j, 1.0)
        before = {(k, j, 1.0) for j, k in enumerate(keys)}

        class Rng:
            def randrange(self, n):
                for j in range(1, 100):  # only the first item is left
                    agg.delete_if_exists(keys[j], j)
                return n - 1

        try:
            got = agg.random(rng=Rng())
        except (IndexError, RuntimeError) as exc:  # a clean refusal is fine
            return {"ok": True, "detail": f"raised {exc!r}"}
        except Exception as exc:  # noqa: BLE001
            return {"ok": False, "detail": f"random() raised {exc!r} (read a key that is not there)"}
        ok = got is None or tuple(got) in before
        return {"ok": ok, "detail": f"random() returned {got!r}, not an item of the range before or after"}

    # Deadlocks: the call runs in a thread; a hang is reported, not waited for.
    agg.insert(1.0, 1)

    class Value:
        def __float__(self):
            agg.insert(5.0, 5)  # a write from inside the write
            return 2.0

    class Namespace:
        def __hash__(self):
            if agg.count() < 3:
                agg.insert(10.0 + agg.count(), 9)
            return 1

        def __eq__(self, other):
            return isinstance(other, Namespace)

    calls = {
        "replace_value_writes": lambda: agg.replace(1.0, 1, 3.0, Value()),
        "replace_or_insert_value_writes": lambda: agg.replace_or_insert(1.0, 1, 3.0, Value()),
        "insert_namespace_hash_writes": lambda: agg.insert(7.0, 7, namespace=Namespace()),
    }
    result = []

    def run():
        try:
            calls[name]()
            result.append("ok")
        except Exception as exc:  # noqa: BLE001 - a clean error is acceptable
            result.append(repr(exc))

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(1.0)
    if th.is_alive():
        print(json.dumps({"ok": False, "detail": f"{name}: deadlock (the call never returned)"}), flush=True)
        os._exit(0)
    agg.check()
    return {"ok": True, "detail": result[0]}


@pytest.mark.parametrize("scenario", ["random_rng_mutates_fast", "random_rng_mutates_general"])
def test_random_with_rng_that_changes_the_aggregate(scenario):
    report = run_child("reentrant", {"scenario": scenario}, timeout=60)
    assert report["ok"], report["detail"]


@pytest.mark.parametrize("scenario", ["replace_value_writes", "replace_or_insert_value_writes",
                                      "insert_namespace_hash_writes"])
def test_no_deadlock_on_reentrant_callbacks(scenario):
    report = run_child("reentrant", {"scenario": scenario}, timeout=60)
    assert report["ok"], report["detail"]
