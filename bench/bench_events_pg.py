"""The event store on PostgreSQL against SQLite and against plain psycopg.

Standalone (no pytest): starts a throwaway server (aggtree.pgserver,
unix socket, fsync off) unless --uri is given; exits with a message when no
server binaries are installed.  Sections:

* ``open``: an instance on --events events and --follows follows (the
  generate_dataset data of bench_events.py), cold (the tables) and warm (its
  snapshot file), next to the SQLite store on the same data;
* ``stats``: get_user_stats p50 / p99 for the heaviest users, PostgreSQL
  instance vs SQLite store (both in-process aggregate counts);
* ``writes``: each kind of write through the store vs the same SQL
  issued by a plain psycopg client, alternating rounds in one run (bar:
  store <= 1.25x the plain client issuing the same SQL).  Two plain
  clients: ``plain+log`` issues the store's SQL (BEGIN with the writer
  mark, the hook's statements with the same row locks, the log append with
  COMMIT in one round trip, :func:`aggtree.events.pglog.append_commit_simple`,
  whose ops are empty: a no-op for whoever replays them), ``plain`` the
  hook's statements alone (BEGIN implicit, COMMIT; its writes are drift to
  the store, and the drift triggers bump a counter for each).  The
  environment is the same for every side: one listening session in another
  process (a stand-in for the other instances, which NOTIFY signals), and
  the store's own change feed runs only during the store's rounds (a plain
  client has no feed; left running, the store's feed would wake on the plain
  client's commits and fetch their rows in this process, charging the
  plain side for the store's work).  12 rounds of 100 writes per side by
  default (the median of the rounds is less noisy with more, shorter
  rounds on a shared machine);
* ``lag``: --writers writer processes (EventStore instances) make paced
  writes (--rate in total) while an instance in this process applies them
  through its change feed; lag = applied on the reader - committed_at of the
  log row (the append's clock_timestamp, just before COMMIT), p50 / p99.

    python bench/bench_events_pg.py                          # everything, 10^6 / 5x10^5
    python bench/bench_events_pg.py --events 200000 --follows 100000 --only open,stats
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone


NOW = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)


def pct(xs: list, q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


def fmt(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def best(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# ---------------------------------------------------------------------------


def bench_open_and_stats(uri: str, sqlite_path: str, snap: str, args, out: dict) -> None:
    from aggtree.events import EventStore

    heavy = ["heavy-1", "heavy-2", "heavy-3"]
    cold_pg = best(lambda: EventStore.open(uri, snapshot=False).close(), args.repeat)
    s = EventStore.open(uri, snapshot_path=snap)
    s.close()  # writes the instance's snapshot
    loaded = []

    def warm():
        w = EventStore.open(uri, snapshot_path=snap)
        loaded.append(w.loaded_from)
        w.close(snapshot=False)

    warm_pg = best(warm, args.repeat)
    cold_sq = best(lambda: EventStore.open(sqlite_path, snapshot=False).close(), args.repeat)
    out["open"] = {"pg_cold": cold_pg, "pg_warm": warm_pg, "pg_warm_from": loaded[-1],
                   "sqlite_cold": cold_sq}
    print(f"open ({args.events:,} events, {args.follows:,} follows; best of {args.repeat})")
    print(f"  PostgreSQL cold (tables) {fmt(cold_pg):>10}   warm ({loaded[-1]}) {fmt(warm_pg):>10}"
          f"   {cold_pg / warm_pg:.1f}x")
    print(f"  SQLite     cold (tables) {fmt(cold_sq):>10}")

    pg = EventStore.open(uri, snapshot=False)
    sq = EventStore.open(sqlite_path, snapshot=False)
    res = {}
    for name, store in (("postgres", pg), ("sqlite", sq)):
        samples = []
        for u in heavy:
            assert store.get_user_stats(u, now=NOW) == sq.get_user_stats(u, now=NOW)
            for _ in range(args.stats_runs):
                t0 = time.perf_counter()
                store.get_user_stats(u, now=NOW)
                samples.append(time.perf_counter() - t0)
        res[name] = (pct(samples, 0.5), pct(samples, 0.99))
    pg.close()
    sq.close()
    out["stats"] = res
    print(f"get_user_stats ({len(heavy)} heavy users x {args.stats_runs} runs)")
    for name, (p50, p99) in res.items():
        print(f"  {name:<10} p50 {fmt(p50):>9}   p99 {fmt(p99):>9}")
    print(f"  PostgreSQL / SQLite p50: {res['postgres'][0] / res['sqlite'][0]:.2f}x")


# ---------------------------------------------------------------------------


PLAIN = {
    # The statements the store's hooks run on PostgreSQL, by a plain client.
    "create_event": [("INSERT INTO events (user_id, name, start_time, end_time, created_at,"
                      " description, location) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
                      "event")],
    "update_event": [("SELECT 1 FROM events WHERE id = %s FOR UPDATE", "id"),
                     ("SELECT e.user_id, e.name, e.start_time, e.end_time, e.description, e.location,"
                      " f.user_id FROM events e LEFT JOIN event_follows f ON f.event_id = e.id"
                      " WHERE e.id = %s", "id"),
                     ("UPDATE events SET name = %s, start_time = %s, end_time = %s, description = %s,"
                      " location = %s WHERE id = %s", "update")],
    "follow_event": [("SELECT start_time FROM events WHERE id = %s FOR SHARE", "id"),
                     ("INSERT INTO event_follows (user_id, event_id, created_at) SELECT id, %s, %s"
                      " FROM users WHERE id = %s ON CONFLICT DO NOTHING RETURNING 1", "follow")],
    "unfollow_event": [("SELECT start_time FROM events WHERE id = %s FOR SHARE", "id"),
                       ("DELETE FROM event_follows WHERE user_id = %s AND event_id = %s", "pair")],
    "delete_event": [("SELECT 1 FROM events WHERE id = %s FOR UPDATE", "id"),
                     ("SELECT e.user_id, e.created_at, e.start_time, f.user_id FROM events e"
                      " LEFT JOIN event_follows f ON f.event_id = e.id WHERE e.id = %s", "id"),
                     ("DELETE FROM events WHERE id = %s", "id")],
}


def bench_writes(uri: str, args, out: dict) -> None:
    import psycopg

    from aggtree.events import EventStore

    import uuid

    from aggtree.events import pglog

    store = EventStore.open(uri, snapshot=False)
    plain = psycopg.connect(uri)  # a plain client: implicit BEGIN, commit()
    logged = psycopg.connect(uri, autocommit=True)  # the same, plus the store's log SQL
    owner = store.user_id("heavy-1")
    fan = store.user_id("heavy-2")
    n = args.write_runs
    start_ms = 1714564800000

    def make_events(k: int) -> list:
        return [store.create_event(owner, name="b", start=NOW, created_at=NOW) for _ in range(k)]

    def params(what: str, eid: int, i: int) -> tuple:
        """The parameters of one of PLAIN's statements, for event eid, round i."""
        if what == "event":
            return (owner, "b", start_ms, None, start_ms, None, None)
        if what == "id":
            return (eid,)
        if what == "update":
            return ("b", start_ms + 1000 * (i + 1), None, None, None, eid)
        if what == "follow":
            return (eid, start_ms, fan)
        return (fan, eid)

    def plain_write(kind: str, eid: int, i: int) -> None:
        for sql, what in PLAIN[kind]:
            plain.execute(sql, params(what, eid, i))
        plain.commit()

    def plain_log_write(kind: str, eid: int, i: int) -> None:
        # The store's SQL without the store: BEGIN with the writer mark, the
        # hook's statements, then the log append (empty ops: a no-op for
        # the instances that replay it) with COMMIT in one round trip.
        logged.execute(pglog.BEGIN_WRITE_SQL)
        for sql, what in PLAIN[kind]:
            logged.execute(sql, params(what, eid, i))
        pglog.append_commit_simple(logged, b"", uuid.uuid4(), 2**62)

    def store_write(kind: str, eid: int, i: int) -> None:
        if kind == "create_event":
            store.create_event(owner, name="b", start=NOW, created_at=NOW)
        elif kind == "update_event":
            store.update_event(owner, eid, start=NOW + timedelta(seconds=i + 1))
        elif kind == "follow_event":
            store.follow_event(fan, eid)
        elif kind == "unfollow_event":
            store.unfollow_event(fan, eid)
        else:
            store.delete_event(owner, eid)

    # The other instances' stand-in: a session that LISTENs and drains, in
    # another process (the server signals it on every commit that notifies).
    listener = subprocess.Popen(
        [sys.executable, "-c", "import sys, psycopg\n"
         "c = psycopg.connect(sys.argv[1], autocommit=True)\n"
         "c.execute('LISTEN aggtree_log')\n"
         "print('listening', flush=True)\n"
         "for _ in c.notifies(): pass\n", uri],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    listener.stdout.readline()
    backend = store._backend

    def feed(on: bool) -> None:
        """The store's change feed: on for the store's rounds, off for the plain clients'."""
        if not on:
            backend.detach()
            return
        backend.attach()
        deadline = time.monotonic() + 10
        while backend._feed.wakes < 1 and time.monotonic() < deadline:
            time.sleep(0.001)  # its first wake (on connecting) has begun
        store.catch_up()  # after it: the plain+log rows are applied

    res = {}
    print(f"writes: store vs plain psycopg, the same statements ({args.rounds} alternating rounds"
          f" of {n}; median of the rounds' per-write times)")
    print("  (plain: the statements alone; plain+log: plus the store's log append, i.e. the"
          " store's SQL without the store)")
    sides = (store_write, plain_write, plain_log_write)
    for kind in ("create_event", "update_event", "follow_event", "unfollow_event", "delete_event"):
        times: list = [[], [], []]
        for r in range(args.rounds):
            order = (0, 1, 2) if r % 2 == 0 else (2, 1, 0)
            for side in order:
                # targets: fresh events; follows need the follow made first
                targets = make_events(n) if kind != "create_event" else [0] * n
                if kind == "unfollow_event":
                    for e in targets:
                        store.follow_event(fan, e)
                feed(side == 0)
                t0 = time.perf_counter()
                for i, e in enumerate(targets):
                    sides[side](kind, e, i)
                times[side].append((time.perf_counter() - t0) / n)
        s, p, pl = (statistics.median(t) for t in times)
        res[kind] = {"store": s, "plain": p, "plain_log": pl, "ratio": s / p, "ratio_log": s / pl}
        print(f"  {kind:<15} store {fmt(s):>9}   plain {fmt(p):>9} ({s / p:.2f}x)"
              f"   plain+log {fmt(pl):>9} ({s / pl:.2f}x)")
    listener.kill()
    listener.wait()
    plain.close()
    logged.close()
    feed(True)
    store.close()  # (the plain client's writes are drift to it, by design)
    out["writes"] = res


# ---------------------------------------------------------------------------

LAG_WRITER = r"""
import json, random, sys, time
from datetime import datetime, timedelta, timezone
from aggtree.events import EventStore
uri, rate, seconds, start_at, seed = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
NOW = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
s = EventStore.open(uri, snapshot=False)
me = s.create_user(f"lag-writer-{seed}-{time.time()}")
mine = [s.create_event(me, name="l", start=NOW, created_at=NOW) for _ in range(20)]
time.sleep(max(0.0, start_at - time.time()))
t0 = time.time()
i = 0
while time.time() - t0 < seconds:
    due = t0 + i / rate
    now = time.time()
    if due > now:
        time.sleep(due - now)
    k = rng.random()
    if k < 0.4:
        s.update_event(me, rng.choice(mine), start=NOW + timedelta(minutes=rng.randrange(10000)))
    elif k < 0.7:
        s.follow_event(me, rng.choice(mine))
    elif k < 0.9:
        s.unfollow_event(me, rng.choice(mine))
    else:
        mine.append(s.create_event(me, name="l", start=NOW, created_at=NOW))
    i += 1
print(json.dumps({"writes": i, "seconds": time.time() - t0}))
s.close()
"""


def bench_lag(uri: str, args, out: dict) -> None:
    import psycopg

    from aggtree.events import EventStore

    reader = EventStore.open(uri, snapshot=False, poll_interval=1.0)
    applied: dict = {}
    real_apply = reader._apply

    def timed_apply(ops, undo):
        real_apply(ops, undo)
        applied[reader.change_id + 1] = time.time()

    reader._apply = timed_apply
    env = dict(os.environ)  # the writers import the installed aggtree, as this process does
    start_at = time.time() + 3.0
    first = reader.change_id
    procs = [subprocess.Popen([sys.executable, "-c", LAG_WRITER, uri, str(args.rate / args.writers),
                               str(args.lag_seconds), str(start_at), str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(args.writers)]
    results = []
    for p in procs:
        o, e = p.communicate(timeout=args.lag_seconds + 120)
        if p.returncode != 0:
            raise SystemExit(f"lag writer failed: {e.decode()[-2000:]}")
        results.append(json.loads(o))
    reader.catch_up()
    time.sleep(0.2)
    with psycopg.connect(uri) as c:
        rows = c.execute("SELECT pos, extract(epoch FROM committed_at) FROM aggtree_log"
                         " WHERE pos > %s AND committed_at >= to_timestamp(%s)",
                         (first, start_at)).fetchall()
    lags = [applied[pos] - float(ts) for pos, ts in rows if pos in applied]
    reader.close()
    writes = sum(r["writes"] for r in results)
    secs = max(r["seconds"] for r in results)
    p50, p99 = pct(lags, 0.5), pct(lags, 0.99)
    out["lag"] = {"writes_per_s": writes / secs, "p50": p50, "p99": p99, "max": max(lags),
                  "n": len(lags), "writers": args.writers}
    print(f"lag: {args.writers} writer processes, {writes / secs:,.0f} writes/s for {secs:.1f} s;"
          f" committed -> applied on another instance ({len(lags):,} rows)")
    print(f"  p50 {fmt(p50)}   p99 {fmt(p99)}   max {fmt(max(lags))}")


# ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", help="an empty PostgreSQL database (default: a throwaway server)")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--follows", type=int, default=500_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=3, help="opens timed (best of)")
    ap.add_argument("--stats-runs", type=int, default=2000)
    ap.add_argument("--write-runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=600.0, help="lag: total writes/s")
    ap.add_argument("--lag-seconds", type=float, default=10.0)
    ap.add_argument("--only", default="open,stats,writes,lag")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    only = set(args.only.split(","))

    from aggtree.events import generate_dataset
    from aggtree.pgserver import TempPostgres, find_binaries

    pg = None
    if args.uri is None:
        if find_binaries() is None:
            print("no PostgreSQL server binaries (initdb, pg_ctl): skipped", file=sys.stderr)
            return 0
        pg = TempPostgres().start()
        uri = pg.uri("bench")
    else:
        uri = args.uri
    tmp = tempfile.mkdtemp(prefix="aggtree-bench-pg-")
    out: dict = {"events": args.events, "follows": args.follows}
    try:
        t0 = time.perf_counter()
        generate_dataset(uri, users=args.users, events=args.events, follows=args.follows, now=NOW)
        sqlite_path = os.path.join(tmp, "events.db")
        generate_dataset(sqlite_path, users=args.users, events=args.events, follows=args.follows, now=NOW)
        print(f"datasets: {args.events:,} events, {args.follows:,} follows in PostgreSQL and SQLite"
              f" ({time.perf_counter() - t0:.1f} s)")
        if only & {"open", "stats"}:
            bench_open_and_stats(uri, sqlite_path, os.path.join(tmp, "pg.snap"), args, out)
        if "writes" in only:
            bench_writes(uri, args, out)
        if "lag" in only:
            bench_lag(uri, args, out)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if pg is not None:
            pg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
