"""Lag from commit on one instance to applied on another, on PostgreSQL.

Standalone: starts a throwaway server (aggtree.pgserver.TempPostgres, unix
socket) unless --uri is given, then runs --writers writer processes that
append change-log rows (aggtree.pgsync: begin_write, append, COMMIT) at a
paced total rate, while this process follows the log through a ChangeFeed
(LISTEN/NOTIFY wake-up + fetch + chain check, the way a store instance
will).  For each position it takes the time the writer's COMMIT returned
and the time the follower applied the row, and prints p50/p99/max of the
difference, plus the same from just before COMMIT was sent (an upper
bound that includes the commit itself).

    python bench/pg_lag.py                       # 4 writers, 600 appends/s, 10 s
    python bench/pg_lag.py --rate 1000 --seconds 20 --durable --mode twostep

In pipeline mode "COMMIT sent" is when the append was sent (the append and
COMMIT travel together).

Measured on this machine (2 cores shared with other jobs, load ~8; psycopg
C implementation; fsync off), 4 writer processes, 10 s:
  600/s pipeline: COMMIT returned -> applied p50 0.24 ms, p99 2.5 ms, max 28 ms
  600/s two-step: p50 0.40 ms, p99 11.5 ms, max 32 ms
  1000/s target (851/s reached) pipeline: p50 0.48 ms, p99 19.8 ms, max 45 ms
With --durable (fsync + synchronous_commit on, a virtual disk) the appends
reach only ~180-270/s: the head row is held through each commit's flush.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


WRITER = r"""
import json, os, sys, time, uuid, psycopg
from aggtree import pgsync as ps
uri, rate, seconds, start_at, mode = (sys.argv[1], float(sys.argv[2]), float(sys.argv[3]),
                                      float(sys.argv[4]), sys.argv[5])
out = []
with psycopg.connect(uri, autocommit=True) as c:
    cur = c.cursor()
    after = ps.read_head(c)[0]
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.time()
    i = 0
    while True:
        due = t0 + i / rate
        now = time.time()
        if now - t0 >= seconds:
            break
        if due > now:
            time.sleep(due - now)
        ps.begin_write(c)
        if mode == "pipeline":  # append, COMMIT and gap rows in one round trip
            before = time.time()
            a = ps.append_commit(c, os.urandom(96), uuid.uuid4(), after)
        else:  # append, then COMMIT: the head row is held for a client round trip
            a = ps.append(cur, os.urandom(96), uuid.uuid4(), after)
            before = time.time()
            c.execute("COMMIT")
        out.append((a.pos, before, time.time()))
        after = a.pos
        i += 1
print(json.dumps(out))
"""


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uri", help="an existing database (default: a throwaway server)")
    ap.add_argument("--writers", type=int, default=4)
    ap.add_argument("--rate", type=float, default=600.0, help="total appends per second")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--mode", choices=("pipeline", "twostep"), default="pipeline",
                    help="append_commit (one round trip) or append then COMMIT")
    ap.add_argument("--durable", action="store_true",
                    help="throwaway server with fsync and synchronous_commit on")
    args = ap.parse_args()

    import psycopg

    from aggtree import pgsync as ps
    from aggtree.pgserver import TempPostgres

    server = None
    uri = args.uri
    if uri is None:
        server = TempPostgres(durable=args.durable).start()
        uri = server.uri("lag")
    try:
        with psycopg.connect(uri, autocommit=True) as c:
            ps.create_schema(c)
            start_pos, start_chain = ps.read_head(c)

        applied: dict = {}
        lock = threading.Lock()

        def apply(row):
            applied[row.pos] = time.time()

        consumer = ps.LogConsumer(apply, start_pos, start_chain)
        feed = ps.ChangeFeed(uri, poll_interval=1.0)

        def wake():
            with lock:
                consumer.catch_up(feed.fetch_since)
        feed.on_wake = wake
        feed.start()
        feed.listening.wait(30)

        env = dict(os.environ)  # the writers import the installed aggtree, as this process does
        start_at = time.time() + 1.0 + 0.3 * args.writers
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, str(args.rate / args.writers),
                                   str(args.seconds), str(start_at), args.mode],
                                  stdout=subprocess.PIPE, env=env, text=True)
                 for _ in range(args.writers)]
        commits = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode:
                raise SystemExit(f"a writer failed (exit {p.returncode})")
            commits.extend(json.loads(out))
        deadline = time.time() + 10
        top = max(pos for pos, _, _ in commits)
        while consumer.pos < top and time.time() < deadline:
            time.sleep(0.01)
        feed.close()

        # skip the first second (connections warming up)
        t_first = min(b for _, b, _ in commits)
        steady = [(pos, b, a) for pos, b, a in commits if b >= t_first + 1.0]
        lag_after = [(applied[pos] - a) * 1000 for pos, b, a in steady if pos in applied]
        lag_before = [(applied[pos] - b) * 1000 for pos, b, a in steady if pos in applied]
        span = max(a for _, _, a in commits) - t_first
        missing = sum(1 for pos, _, _ in commits if pos not in applied)
        print(f"server: {'given URI' if args.uri else 'TempPostgres, unix socket'}"
              f"{', durable (fsync, synchronous_commit on)' if args.durable else ', fsync off'}")
        print(f"mode {args.mode}: {args.writers} writer processes, {len(commits)} appends in {span:.1f} s "
              f"= {len(commits) / span:.0f}/s (target {args.rate:.0f}/s); "
              f"follower applied {consumer.applied}, missing {missing}, "
              f"{feed.notifications} notifications in {feed.wakes} wakes")
        for name, lags in (("COMMIT returned -> applied", lag_after),
                           ("COMMIT sent     -> applied", lag_before)):
            print(f"{name}: p50 {pct(lags, 0.50):.2f} ms, p99 {pct(lags, 0.99):.2f} ms, "
                  f"max {max(lags):.2f} ms (n={len(lags)}, after the first second)")
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
