"""Crash tests with real processes, and hostile input, for the event store.

Crashes
-------
A child process opens an ``EventStore`` on a file and writes in a loop
(create / update / delete events, follow / unfollow).  Before each write it
prints ``B <op> <args>`` and after the commit ``C <op> <args> <result>``
(flushed).  The parent SIGKILLs it at a random point -- after a random number
of commits plus a random delay, so often in the middle of a transaction --
then checks:

* the tables are exactly the committed writes, plus possibly the one write
  that was in flight (nothing committed is lost, nothing half-done appears);
* ``PRAGMA integrity_check`` is ``ok``;
* ``verify_aggregates()`` finds no drift, both in a store opened afterwards
  and in a store the parent kept open during the child's writes (that one
  catches up from the change log the child wrote).

Then it starts the next child on the same file (the store survives several
crashes in a row).  The migration variant: the child opens the store with
``load=False`` and runs ``initialize_aggregates`` with a small batch size
in a loop while its main thread writes; after the kill the parent checks the
same things and reruns the migration to completion in a fresh store.

Hostile input
-------------
Usernames and event fields with SQL metacharacters, quotes, NUL, lone
surrogates, 1 MB strings; invalid dates, ids and types: each is either
stored and read back verbatim or rejected with a clear exception, and the
database (and the aggregates) stay intact.

Rounds: 5 by default, 15 with ``CI`` / ``HYPOTHESIS_PROFILE=ci``, 3 when
``AGGTREE_SANITIZED=1``.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import date, datetime, timedelta, timezone

import pytest

from aggtree.events import EventStore, generate_dataset, to_ms

from _reliability import CI, SANITIZED, stats_reporter  # noqa: E402
ROUNDS = 3 if SANITIZED else (15 if CI else 5)
T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
HOUR = 3600 * 1000

STATS = {"crash_kills": 0, "crash_commits_checked": 0, "crash_in_flight_at_kill": 0,
         "crash_lost": 0, "hostile_inputs": 0}


_report_stats = stats_reporter("test_crash", STATS)


# ---------------------------------------------------------------------------
# The child
# ---------------------------------------------------------------------------

CHILD = r"""
import random, sys, threading
from aggtree.events import EventStore, from_ms

path, seed, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
base = int(sys.argv[4])
store = EventStore.open(path, load=(mode != "migrate"))
conn = store._conn
users = [r[0] for r in conn.execute("SELECT id FROM users ORDER BY id")]
events = dict(conn.execute("SELECT id, user_id FROM events"))
follows = set(conn.execute("SELECT user_id, event_id FROM event_follows"))
rng = random.Random(seed)
out_lock = threading.Lock()

def say(*parts):
    with out_lock:  # one whole line at a time (two threads print)
        sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
        sys.stdout.flush()

if mode == "migrate":
    def migrate():
        n = 0
        while True:
            store.initialize_aggregates(batch_size=rng.choice([7, 20, 50]), progress=False, restart=True)
            n += 1
            say("M", n)
    threading.Thread(target=migrate, daemon=True).start()

say("READY")
while True:
    x = rng.random()
    if not events or x < 0.35:
        user = rng.choice(users)
        start = base + rng.randrange(-100, 100) * 3600000
        created = base - rng.randrange(0, 500) * 3600000
        say("B create", user, start, created)
        eid = store.create_event(user, name="crash", start=from_ms(start), created_at=from_ms(created))
        events[eid] = user
        say("C create", user, start, created, eid)
    elif x < 0.55:
        eid = rng.choice(sorted(events))
        start = base + rng.randrange(-100, 100) * 3600000
        say("B update", eid, start)
        store.update_event(events[eid], eid, start=from_ms(start), end=from_ms(start + 3600000))
        say("C update", eid, start)
    elif x < 0.65:
        eid = rng.choice(sorted(events))
        say("B delete", eid)
        store.delete_event(events.pop(eid), eid)
        follows = {f for f in follows if f[1] != eid}
        say("C delete", eid)
    elif x < 0.9:
        user, eid = rng.choice(users), rng.choice(sorted(events))
        say("B follow", user, eid)
        r = store.follow_event(user, eid)
        follows.add((user, eid))
        say("C follow", user, eid, int(r))
    else:
        if follows and rng.random() < 0.8:
            user, eid = rng.choice(sorted(follows))
        else:
            user, eid = rng.choice(users), rng.choice(sorted(events))
        say("B unfollow", user, eid)
        r = store.unfollow_event(user, eid)
        follows.discard((user, eid))
        say("C unfollow", user, eid, int(r))
"""


def db_state(path):
    """(events {id: (user, start, created)}, follows {(user, event)})."""
    conn = sqlite3.connect(path)
    try:
        events = {r[0]: tuple(r[1:]) for r in conn.execute("SELECT id, user_id, start_time, created_at FROM events")}
        follows = set(conn.execute("SELECT user_id, event_id FROM event_follows"))
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
        fk = conn.execute("PRAGMA foreign_key_check").fetchall()
    finally:
        conn.close()
    assert ok == "ok", ok
    assert fk == [], fk
    return events, follows


class Model:
    """What the tables must hold after the reported commits."""

    def __init__(self, events, follows):
        self.events = dict(events)
        self.follows = set(follows)

    def copy(self):
        return Model(self.events, self.follows)

    def apply(self, op, args, result_id=None):
        if op == "create":
            user, start, created = map(int, args[:3])
            self.events[result_id] = (user, start, created)
        elif op == "update":
            eid, start = map(int, args[:2])
            user, _, created = self.events[eid]
            self.events[eid] = (user, start, created)
        elif op == "delete":
            eid = int(args[0])
            del self.events[eid]
            self.follows = {f for f in self.follows if f[1] != eid}
        elif op == "follow":
            self.follows.add((int(args[0]), int(args[1])))
        elif op == "unfollow":
            self.follows.discard((int(args[0]), int(args[1])))

    def matches(self, events, follows, in_flight):
        """The tables equal the committed state, or that state plus the
        in-flight write."""
        if (events, follows) == (self.events, self.follows):
            return True
        if in_flight is None:
            return False
        op, args = in_flight
        after = self.copy()
        if op == "create":
            new = set(events) - set(self.events)
            if len(new) != 1:
                return False
            after.apply(op, args, new.pop())
        else:
            after.apply(op, args)
        return (events, follows) == (after.events, after.follows)


def run_and_kill(path, seed, mode, rng, model):
    """One child: start, let it commit a random number of writes, SIGKILL
    it after a random delay; returns (commits, in_flight)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, path, str(seed), mode, str(to_ms(T0))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    target = rng.choice([0, 1, 3, 10, 30, 80, 150])
    commits = 0
    in_flight = None
    lines = []
    try:
        deadline = time.monotonic() + 60
        while True:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"child exited early: {proc.stderr.read()[-3000:]}")
            lines.append(line)
            if line.startswith("C ") or line.startswith("READY"):
                if line.startswith("C "):
                    commits += 1
                if commits >= target:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("child too slow")
        time.sleep(rng.choice([0, 0, 0.0005, 0.002, 0.01, 0.03]))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # (not communicate(): it would skip what readline() already buffered)
        rest, err = proc.stdout.read(), proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, err[-3000:])
    lines += rest.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # a line cut by the kill: its write is in flight
    for line in lines:
        parts = line.split()
        if not parts or parts[0] not in ("B", "C"):
            continue
        op, args = parts[1], parts[2:]
        if parts[0] == "B":
            in_flight = (op, args)
        else:
            model.apply(op, args, int(args[3]) if op == "create" else None)
            in_flight = None
    return commits, in_flight


def crash_rounds(tmp_path, mode, seed0):
    path = str(tmp_path / "crash.db")
    if mode == "migrate":
        generate_dataset(path, users=20, events=1500, follows=1000, seed=seed0, now=T0)
    with EventStore.open(path) as store:
        for name in ("alice", "bob", "carol"):
            if store.user_id(name) is None:
                store.create_user(name)
    model = Model(*db_state(path))
    rng = random.Random(seed0)
    watcher = EventStore.open(path)  # stays open: catches up from the change log
    try:
        for r in range(ROUNDS):
            commits, in_flight = run_and_kill(path, seed0 * 1000 + r, mode, rng, model)
            STATS["crash_kills"] += 1
            STATS["crash_commits_checked"] += commits
            STATS["crash_in_flight_at_kill"] += in_flight is not None
            events, follows = db_state(path)
            if not model.matches(events, follows, in_flight):
                STATS["crash_lost"] += 1
                missing = set(model.events.items()) - set(events.items())
                extra = set(events.items()) - set(model.events.items())
                raise AssertionError(
                    f"round {r}: tables differ from the committed writes (in flight: {in_flight}); "
                    f"missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}, "
                    f"follows missing {sorted(model.follows - follows)[:5]}, extra {sorted(follows - model.follows)[:5]}")
            # Whatever the in-flight write did is now part of the model.
            model = Model(events, follows)
            with EventStore.open(path) as fresh:
                report = fresh.verify_aggregates()
                assert report.ok, f"round {r}: fresh store drifted:\n{report.summary()}"
            report = watcher.verify_aggregates()
            assert report.ok, f"round {r}: long-lived store drifted:\n{report.summary()}"
            if mode == "migrate":
                with EventStore.open(path, load=False) as rerun:
                    rerun.initialize_aggregates(batch_size=97, progress=False)
                    report = rerun.verify_aggregates()
                    assert report.ok, f"round {r}: migration rerun drifted:\n{report.summary()}"
    finally:
        watcher.close()
    # The file is still a working store.
    with EventStore.open(path) as store:
        alice = store.user_id("alice")
        eid = store.create_event(alice, name="after", start=T0 + timedelta(days=1), created_at=T0)
        assert store.get_user_stats("alice", now=T0).upcoming_events >= 1
        store.delete_event(alice, eid)
        assert store.verify_aggregates().ok


def test_kill_during_writes(tmp_path):
    crash_rounds(tmp_path, "write", 11)


def test_kill_during_migration(tmp_path):
    crash_rounds(tmp_path, "migrate", 23)


def test_kill_before_first_write_and_reopen(tmp_path):
    """A child killed while opening (registering, loading) leaves a usable
    file; its stale registry row is dropped at the next open."""
    path = str(tmp_path / "early.db")
    with EventStore.open(path) as store:
        store.create_user("alice")
    for delay in (0.0, 0.05, 0.2):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, path, "1", "write", str(to_ms(T0))],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        STATS["crash_kills"] += 1
        db_state(path)
        with EventStore.open(path) as store:
            assert store.verify_aggregates().ok
            rows = store._conn.execute("SELECT pid FROM aggtree_stores").fetchall()
            assert rows == [(os.getpid(),)], rows


# ---------------------------------------------------------------------------
# Hostile input
# ---------------------------------------------------------------------------

HOSTILE_NAMES = [
    "'; DROP TABLE users; --",
    "Robert'); DROP TABLE events;--",
    '" OR 1=1 --',
    "' OR '1'='1",
    "admin'--",
    "%",
    "_",
    "a%b_c",
    "\\",
    "\\'",
    "\"\"\"",
    "`backticks`",
    "[brackets]",
    "$1 ?1 :name @x",
    "?",
    "; PRAGMA writable_schema = 1; --",
    "a\x00b",
    "\x00",
    "nul\x00' OR 1=1 --",
    "tab\tnew\nline\rcr",
    "é\u0301 \u202e rtl \ufeff bom",
    "\U0001f600" * 10,
    " leading and trailing ",
    "x" * (1 << 20),  # 1 MiB
    "SELECT * FROM users",
    "users",
    "1",
]


def test_hostile_usernames(tmp_path):
    path = str(tmp_path / "hostile.db")
    store = EventStore.open(path)
    try:
        ids = {}
        for name in HOSTILE_NAMES:
            ids[name] = store.create_user(name)
            STATS["hostile_inputs"] += 1
        assert len(set(ids.values())) == len(HOSTILE_NAMES)
        for name, uid in ids.items():
            assert store.user_id(name) == uid
            eid = store.create_event(uid, name=name, start=T0 + timedelta(hours=uid), created_at=T0,
                                     description=name, location=name)
            row = store.get_event(eid)
            assert (row["name"], row["description"], row["location"]) == (name, name, name)
            store.follow_event(uid, eid)
            stats = store.get_user_stats(name, now=T0)
            assert stats == store.get_user_stats_naive(name, now=T0)
            assert (stats.all_time_own, stats.total_follows, stats.upcoming_events) == (1, 1, 2)
            # A lookup of a similar name finds nothing (no pattern matching).
            assert store.user_id(name + "x") is None
            assert store.get_user_stats(name + "'", now=T0).all_time_events == 0
        # Taken names stay taken, verbatim.
        for name in HOSTILE_NAMES[:5]:
            with pytest.raises(ValueError, match="taken"):
                store.create_user(name)
        # Read back byte for byte from the table itself.
        got = dict(store._conn.execute("SELECT username, id FROM users"))
        assert got == ids
        assert store.verify_aggregates().ok
    finally:
        store.close()
    assert_intact(path, users=len(HOSTILE_NAMES), events=len(HOSTILE_NAMES), follows=len(HOSTILE_NAMES))
    with EventStore.open(path) as again:  # reload from the tables
        assert again.verify_aggregates().ok
        for name, uid in list(ids.items())[:5]:
            assert again.user_id(name) == uid


def assert_intact(path, *, users, events, follows):
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"users", "events", "event_follows", "aggtree_changes", "aggtree_stores"} <= tables
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == users
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == events
        assert conn.execute("SELECT count(*) FROM event_follows").fetchone()[0] == follows
    finally:
        conn.close()


UTC = timezone.utc
AWARE = T0


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"start": datetime(2024, 1, 1)}, ValueError),  # naive
        ({"start": "2024-01-01T00:00:00Z"}, TypeError),
        ({"start": date(2024, 1, 1)}, TypeError),
        ({"start": 1714564800000}, TypeError),
        ({"start": None}, TypeError),
        ({"start": float("nan")}, TypeError),
        ({"start": AWARE, "end": AWARE - timedelta(seconds=1)}, ValueError),
        ({"start": AWARE, "end": datetime(2024, 1, 1)}, ValueError),
        ({"start": AWARE, "created_at": "yesterday"}, TypeError),
        ({"start": AWARE, "created_at": datetime(2024, 1, 1)}, ValueError),
        ({"start": AWARE, "name": None}, TypeError),
        ({"start": AWARE, "name": b"bytes"}, TypeError),
        ({"start": AWARE, "description": 5}, TypeError),
        ({"start": AWARE, "location": ["x"]}, TypeError),
        ({"start": AWARE, "name": "\ud800"}, UnicodeEncodeError),  # lone surrogate: not UTF-8
    ],
)
def test_invalid_event_input_is_rejected_cleanly(tmp_path, kwargs, exc):
    path = str(tmp_path / "bad.db")
    with EventStore.open(path) as store:
        uid = store.create_user("alice")
        keep = store.create_event(uid, name="keep", start=AWARE, created_at=AWARE)
        kwargs = {"name": "e", **kwargs}
        with pytest.raises(exc) as info:
            store.create_event(uid, **kwargs)
        assert str(info.value)
        STATS["hostile_inputs"] += 1
        # Same through update_event.
        updatable = ("start", "end", "name", "description", "location")
        bad = [k for k, v in kwargs.items() if not (k == "start" and v is AWARE) and not (k == "name" and v == "e")]
        upd = {k: v for k, v in kwargs.items() if k in updatable}
        if bad and all(k in updatable for k in bad):
            with pytest.raises(exc):
                store.update_event(uid, keep, **upd)
            STATS["hostile_inputs"] += 1
        assert store.get_event(keep)["name"] == "keep"
        assert store.verify_aggregates().ok
        assert store.get_user_stats("alice", now=AWARE) == store.get_user_stats_naive("alice", now=AWARE)
    assert_intact(path, users=1, events=1, follows=0)


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda s, u, e: s.create_event("1; DROP TABLE events", name="x", start=AWARE), TypeError),
        (lambda s, u, e: s.create_event(True, name="x", start=AWARE), TypeError),
        (lambda s, u, e: s.create_event(1.0, name="x", start=AWARE), TypeError),
        (lambda s, u, e: s.create_event(2**70, name="x", start=AWARE), OverflowError),
        (lambda s, u, e: s.create_event(-1, name="x", start=AWARE), LookupError),
        (lambda s, u, e: s.create_event(u + 100, name="x", start=AWARE), LookupError),
        (lambda s, u, e: s.update_event(u, "1 OR 1=1", start=AWARE), TypeError),
        (lambda s, u, e: s.update_event(u, e + 100, start=AWARE), LookupError),
        (lambda s, u, e: s.update_event(u + 1, e, start=AWARE), (PermissionError, LookupError)),
        (lambda s, u, e: s.delete_event(u, 2**70), OverflowError),
        (lambda s, u, e: s.delete_event(u, None), TypeError),
        (lambda s, u, e: s.follow_event(u, "e"), TypeError),
        (lambda s, u, e: s.follow_event(u, e + 100), LookupError),
        (lambda s, u, e: s.follow_event(u + 100, e), LookupError),
        (lambda s, u, e: s.unfollow_event(u, 2**70), OverflowError),
        (lambda s, u, e: s.create_user(""), ValueError),
        (lambda s, u, e: s.create_user(None), TypeError),
        (lambda s, u, e: s.create_user(b"bytes"), TypeError),
        (lambda s, u, e: s.create_user("\ud800"), UnicodeEncodeError),
        (lambda s, u, e: s.create_user("alice"), ValueError),
        (lambda s, u, e: s.get_user_stats(None), TypeError),
        (lambda s, u, e: s.get_user_stats("alice", now=datetime(2024, 1, 1)), ValueError),
        (lambda s, u, e: s.get_user_stats("alice", now="now"), TypeError),
        (lambda s, u, e: s.get_event("1"), TypeError),
        (lambda s, u, e: s.initialize_aggregates(batch_size=0), ValueError),
        (lambda s, u, e: s.initialize_aggregates(batch_size="5"), (TypeError, ValueError)),
    ],
)
def test_invalid_ids_and_arguments(tmp_path, call, exc):
    path = str(tmp_path / "bad-ids.db")
    with EventStore.open(path) as store:
        uid = store.create_user("alice")
        store.create_user("bob")
        eid = store.create_event(uid, name="keep", start=AWARE, created_at=AWARE)
        store.follow_event(uid, eid)
        with pytest.raises(exc) as info:
            call(store, uid, eid)
        assert str(info.value)
        STATS["hostile_inputs"] += 1
        assert store.verify_aggregates().ok
        # the store keeps working
        e2 = store.create_event(uid, name="after", start=AWARE, created_at=AWARE)
        store.delete_event(uid, e2)
        assert store.get_user_stats("alice", now=AWARE - timedelta(hours=1)).upcoming_events == 2
    assert_intact(path, users=2, events=1, follows=1)


def test_extreme_dates_round_trip(tmp_path):
    """The extremes of datetime are valid times: stored, counted, read back."""
    with EventStore.open(str(tmp_path / "dates.db")) as store:
        uid = store.create_user("alice")
        extremes = [
            datetime.max.replace(tzinfo=UTC),
            datetime.min.replace(tzinfo=UTC),
            datetime(1970, 1, 1, tzinfo=UTC),
            datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
            datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC),
            datetime(2024, 2, 29, tzinfo=timezone(timedelta(hours=14))),
            datetime(2024, 2, 29, tzinfo=timezone(timedelta(hours=-12, minutes=-59))),
        ]
        for dt in extremes:
            eid = store.create_event(uid, name="x", start=dt, end=dt, created_at=dt)
            assert store.get_event(eid)["start_time"] == to_ms(dt)
            STATS["hostile_inputs"] += 1
        stats = store.get_user_stats("alice", now=datetime(2000, 1, 1, tzinfo=UTC))
        assert stats == store.get_user_stats_naive("alice", now=datetime(2000, 1, 1, tzinfo=UTC))
        assert stats.all_time_own == len(extremes)
        assert store.verify_aggregates().ok
