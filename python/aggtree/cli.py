"""The ``aggtree`` command line (also ``python -m aggtree``).

Commands:

* ``aggtree demo``: generate a skewed event dataset, run the aggregate
  migration with a progress bar, then compare ``get_user_stats`` through the
  aggregates with the naive path for the heaviest users (agreement, p50 / p99
  latency, speed-up).
* ``aggtree init --db PATH``: create the tables if needed and run the
  migration (batched, with progress), then verify the result.
* ``aggtree stats USERNAME --db PATH [--now ISO] [--json] [--naive]``: one
  user's stats.
* ``aggtree verify --db PATH [--repair] [--json]``: compare the aggregates
  with the tables item by item.

``--db`` also takes a PostgreSQL URI (``postgresql://user@host/dbname``;
needs the ``aggtree[postgres]`` extra): ``demo`` then fills that (empty)
database, and ``snapshot`` needs ``--out``.

User errors (missing file, unknown user, bad date...) print one line on
stderr and exit with status 1, without a traceback; ``verify`` exits with 1
when it finds differences it did not repair.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from typing import Optional, Sequence

__all__ = ["main"]


class CLIError(Exception):
    """A user error: reported as one line, exit status 1."""


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {n}")
    return n


def _parse_now(text: Optional[str]) -> Optional[datetime]:
    """An ISO 8601 instant; naive ones are taken as UTC."""
    if text is None:
        return None
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise CLIError(f"bad date {text!r}: expected ISO 8601, e.g. 2024-05-01T12:00:00Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt


def _is_pg(path: str) -> bool:
    """A PostgreSQL URI (``--db postgresql://...``) rather than a file."""
    return path.startswith(("postgresql://", "postgres://"))


def _open_existing(path: str, **kw):
    from .events import EventStore

    if _is_pg(path):
        try:
            return EventStore.open(path, create=False, **kw)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
    if not os.path.exists(path):
        raise CLIError(f"database not found: {path}")
    if os.path.isdir(path):
        raise CLIError(f"database path is a directory: {path}")
    try:
        return EventStore.open(path, create=False, **kw)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _percentile(samples: list, q: float) -> float:
    """The q-quantile (0..1) of samples, nearest rank."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[index]


def _fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate data, migrate, compare both stats paths."""
    from .events import EventStore, generate_dataset

    out = sys.stdout
    tmpdir = None
    if args.db is None:
        tmpdir = tempfile.mkdtemp(prefix="aggtree-demo-")
        path = os.path.join(tmpdir, "events.db")
    else:
        path = args.db
        if _is_pg(path):
            # A PostgreSQL instance keeps its snapshot in a file of its own.
            tmpdir = tempfile.mkdtemp(prefix="aggtree-demo-")
        elif os.path.exists(path):
            raise CLIError(f"{path} already exists: demo writes a fresh database, pick a new path")
    heavy = min(args.heavy, max(args.users - 1, 0))
    heavy_events = [int(args.events * f) for f in (0.25, 0.125, 0.0625, 0.03)][:heavy]
    heavy_follows = [int(args.follows * f) for f in (0.20, 0.10, 0.05, 0.025)][:heavy]
    if heavy > 4:
        heavy_events += [max(args.events // 100, 1)] * (heavy - 4)
        heavy_follows += [max(args.follows // 100, 1)] * (heavy - 4)
    snap: dict = {}
    if _is_pg(path):
        assert tmpdir is not None  # made above for a PostgreSQL instance
        snap = {"snapshot_path": os.path.join(tmpdir, "instance.aggtree-snapshot")}
    try:
        now = datetime.now(timezone.utc).replace(microsecond=0)
        print(
            f"Generating {args.users:,} users, {args.events:,} events and about "
            f"{args.follows:,} follows ({heavy} heavy users) in {path} ...",
            file=out,
            flush=True,
        )
        try:
            info = generate_dataset(
                path,
                users=args.users,
                events=args.events,
                follows=args.follows,
                heavy_events=heavy_events,
                heavy_follows=heavy_follows,
                seed=args.seed,
                now=now,
            )
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        print(f"  {info.events:,} events, {info.follows:,} follows in {info.seconds:.2f} s", file=out)

        print("Migrating: filling the four aggregates from the tables ...", file=out, flush=True)
        store = EventStore.open(path, load=False, **snap)
        report = store.initialize_aggregates(progress=not args.no_progress)
        print(
            f"  {report.events:,} events and {report.follows:,} follows -> "
            f"{report.inserted:,} aggregate items in {report.seconds:.2f} s",
            file=out,
        )
        verify = store.verify_aggregates(max_listed=10)
        print(f"  verify: {'no differences' if verify.ok else f'{verify.total} differences'}", file=out)

        print(
            f"\nget_user_stats for the {len(info.heavy_users)} heaviest users "
            f"(aggregates: {args.runs} runs each, naive: {args.naive_runs} runs each)",
            file=out,
        )
        header = f"{'user':<10} {'own':>8} {'follows':>8} {'upcoming':>9} {'week':>5}  {'agg p50':>9} {'naive p50':>10}  {'speed-up':>9}  agree"
        print(header, file=out)
        agg_all: list = []
        naive_all: list = []
        all_agree = True
        for username in info.heavy_users:
            fast = store.get_user_stats(username, now=now)
            slow = store.get_user_stats_naive(username, now=now)
            agree = fast == slow
            all_agree &= agree
            agg_t = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                store.get_user_stats(username, now=now)
                agg_t.append(time.perf_counter() - t0)
            naive_t = []
            for _ in range(args.naive_runs):
                t0 = time.perf_counter()
                store.get_user_stats_naive(username, now=now)
                naive_t.append(time.perf_counter() - t0)
            agg_all += agg_t
            naive_all += naive_t
            a50, n50 = statistics.median(agg_t), statistics.median(naive_t)
            print(
                f"{username:<10} {fast.all_time_own:>8,} {fast.total_follows:>8,} "
                f"{fast.upcoming_events:>9,} {fast.captures_this_week:>5}  "
                f"{_fmt_seconds(a50):>9} {_fmt_seconds(n50):>10}  {n50 / a50:>8,.0f}x  "
                f"{'yes' if agree else 'NO'}",
                file=out,
            )
            if not agree:
                print(f"  aggregates: {fast}\n  naive:      {slow}", file=out)

        print("\nLive writes (create, follow, move, delete) keep the aggregates in sync ...", file=out)
        top = store.user_id(info.heavy_users[0])
        other = store.user_id(info.heavy_users[-1])
        assert top is not None and other is not None  # (the demo data made them)
        eid = store.create_event(top, name="demo", start=now + timedelta(days=2), created_at=now)
        store.follow_event(other, eid)
        store.update_event(top, eid, start=now - timedelta(days=1))
        store.update_event(top, eid, start=now + timedelta(days=3))
        for username in (info.heavy_users[0], info.heavy_users[-1]):
            ok = store.get_user_stats(username, now=now) == store.get_user_stats_naive(username, now=now)
            all_agree &= ok
        store.delete_event(top, eid)
        for username in (info.heavy_users[0], info.heavy_users[-1]):
            ok = store.get_user_stats(username, now=now) == store.get_user_stats_naive(username, now=now)
            all_agree &= ok
        all_agree &= store.verify_aggregates(max_listed=10).ok

        a50, a99 = _percentile(agg_all, 0.5), _percentile(agg_all, 0.99)
        n50, n99 = _percentile(naive_all, 0.5), _percentile(naive_all, 0.99)
        print("\nLatency over all runs", file=out)
        print(f"  aggregates  p50 {_fmt_seconds(a50):>10}   p99 {_fmt_seconds(a99):>10}", file=out)
        print(f"  naive       p50 {_fmt_seconds(n50):>10}   p99 {_fmt_seconds(n99):>10}", file=out)
        print(f"  speed-up    p50 {n50 / a50:>9,.0f}x   p99 {n99 / a99:>9,.0f}x", file=out)
        store.close()  # writes the warm-start snapshot

        print("\nOpening the database again (best of 3 each)", file=out)
        cold_t, warm_t = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            EventStore.open(path, snapshot=False).close()
            cold_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            again = EventStore.open(path, **snap)
            warm_t.append(time.perf_counter() - t0)
            warm_from = again.loaded_from
            all_agree &= again.verify_aggregates(max_listed=10).ok
            again.close()
        cold, warm = min(cold_t), min(warm_t)
        print(f"  {'cold (tables)':<22} {f'warm ({warm_from})':<22} {'speed-up':>9}", file=out)
        print(f"  {_fmt_seconds(cold):<22} {_fmt_seconds(warm):<22} {cold / warm:>8.1f}x", file=out)
        print(f"\nStats agree: {'yes' if all_agree else 'NO'}", file=out)
        return 0 if all_agree else 1
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def cmd_init(args: argparse.Namespace) -> int:
    """Create the tables if needed and run the migration."""
    from .events import EventStore

    if _is_pg(args.db):
        pass
    elif os.path.isdir(args.db):
        raise CLIError(f"database path is a directory: {args.db}")
    parent = os.path.dirname(os.path.abspath(args.db)) if not _is_pg(args.db) else "/"
    if not os.path.isdir(parent):
        raise CLIError(f"directory not found: {parent}")
    store = EventStore.open(args.db, load=False)
    try:
        report = store.initialize_aggregates(batch_size=args.batch_size, progress=not args.no_progress)
        print(
            f"initialized {args.db}: {report.events:,} events and {report.follows:,} follows -> "
            f"{report.inserted:,} aggregate items in {report.batches} batches, {report.seconds:.2f} s"
        )
        verify = store.verify_aggregates(max_listed=20)
        print(f"verify: {'no differences' if verify.ok else f'{verify.total} differences'}")
        return 0 if verify.ok else 1
    finally:
        store.close()


def cmd_snapshot(args: argparse.Namespace) -> int:
    """Open a database (warm if it can) and write its snapshot."""
    if _is_pg(args.db) and args.out is None:
        raise CLIError("--out is required with a PostgreSQL database (each instance keeps its own snapshot)")
    t0 = time.perf_counter()
    store = _open_existing(args.db, snapshot_path=args.out)
    opened = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        path = store.snapshot()
        wrote = time.perf_counter() - t0
        size = os.path.getsize(path)
        print(f"opened {args.db} from the {store.loaded_from} in {_fmt_seconds(opened)}; "
              f"snapshot {path}: {size:,} bytes in {_fmt_seconds(wrote)}")
        return 0
    finally:
        store.close()


def cmd_stats(args: argparse.Namespace) -> int:
    """Print one user's stats."""
    now = _parse_now(args.now) or datetime.now(timezone.utc)
    store = _open_existing(args.db)
    try:
        if store.user_id(args.username) is None:
            raise CLIError(f"unknown user: {args.username!r}")
        t0 = time.perf_counter()
        stats = (store.get_user_stats_naive if args.naive else store.get_user_stats)(args.username, now=now)
        elapsed = time.perf_counter() - t0
    finally:
        store.close()
    if args.json:
        print(json.dumps({"username": args.username, "now": now.isoformat(), **stats.to_dict()}))
        return 0
    print(f"{args.username} at {now.isoformat()} ({'naive path' if args.naive else 'aggregates'}, {_fmt_seconds(elapsed)})")
    print(f"  captures this week   {stats.captures_this_week} / {stats.weekly_goal}")
    print(f"  upcoming events      {stats.upcoming_events}  ({stats.upcoming_own} own + {stats.upcoming_followed} followed)")
    print(f"  all-time events      {stats.all_time_events}  ({stats.all_time_own} own + {stats.total_follows} follows)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Compare the aggregates with the tables."""
    store = _open_existing(args.db)
    try:
        report = store.verify_aggregates(repair=args.repair, max_listed=args.limit)
    finally:
        store.close()
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "repaired": report.repaired,
                    "checked": report.checked,
                    "counts": {f"{a}.{k}": v for (a, k), v in report.counts.items()},
                    "differences": [d._asdict() for d in report.differences],
                }
            )
        )
    else:
        print(report.summary())
        for d in report.differences:
            print(
                f"  {d.aggregate}: {d.kind} namespace={d.namespace} id={d.id}"
                f" expected_key={d.expected_key} actual_key={d.actual_key}"
            )
    return 0 if report.ok or report.repaired else 1


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``aggtree`` command."""
    parser = argparse.ArgumentParser(
        prog="aggtree",
        description="Convex-style aggregates for Python: the event-stats application.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="generate a skewed dataset, migrate, compare both stats paths")
    p.add_argument("--db", metavar="PATH", help="write the database here: a new SQLite file or an empty PostgreSQL database (postgresql://...); default: a temporary file")
    p.add_argument("--users", type=_positive, default=5000, help="number of users (default 5000)")
    p.add_argument("--events", type=_positive, default=400_000,
                   help="number of events (default 400000; the heaviest user owns a quarter)")
    p.add_argument("--follows", type=_positive, default=200_000, help="number of follows (default 200000)")
    p.add_argument("--heavy", type=_positive, default=3, help="number of heavy users (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--runs", type=_positive, default=300, help="timed runs of the aggregate path per user")
    p.add_argument("--naive-runs", type=_positive, default=5, help="timed runs of the naive path per user")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("init", help="create the tables if needed and run the aggregate migration")
    p.add_argument("--db", metavar="PATH", required=True, help="the SQLite database, or a postgresql:// URI")
    p.add_argument("--batch-size", type=_positive, default=5000, help="rows per batch (default 5000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("stats", help="print a user's stats")
    p.add_argument("username")
    p.add_argument("--db", metavar="PATH", required=True, help="the SQLite database, or a postgresql:// URI")
    p.add_argument("--now", metavar="ISO", help="the instant to compute at (default: now; naive = UTC)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--naive", action="store_true", help="use the naive O(n) path")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("snapshot", help="write the warm-start snapshot of a database's aggregates")
    p.add_argument("--db", metavar="PATH", required=True, help="the SQLite database, or a postgresql:// URI")
    p.add_argument("--out", metavar="PATH", help="write it here (default: PATH.aggtree-snapshot)")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("verify", help="compare the aggregates with the tables item by item")
    p.add_argument("--db", metavar="PATH", required=True, help="the SQLite database, or a postgresql:// URI")
    p.add_argument("--repair", action="store_true", help="fix the differences found")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--limit", type=_positive, default=50, help="list at most this many differences")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``aggtree`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command in ("init", "demo") and getattr(args, "no_progress", False):
        logging.getLogger("aggtree.events").setLevel(logging.WARNING)
    if args.command in ("stats", "verify"):
        # "no snapshot yet, loading from the tables" is not news here; why a
        # snapshot could not be used (a WARNING) still is
        logging.getLogger("aggtree.events").setLevel(logging.WARNING)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"aggtree: error: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"aggtree: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as exc:
        print(f"aggtree: error: {getattr(args, 'db', None) or 'database'}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # psycopg's errors (not imported unless a URI was given)
        if not type(exc).__module__.startswith("psycopg"):
            raise
        db = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", getattr(args, "db", None) or "database")
        print(f"aggtree: error: {db}: {str(exc).strip()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aggtree: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `aggtree verify ... | head`
        return 0
