"""Warm start of the event store (aggtree.events.warm): the snapshot written
at close / by ``store.snapshot()``, and the decision at open.

Every case opens a store and then checks it the same way
(:func:`assert_right`): ``verify_aggregates()`` finds no difference, every
aggregate passes ``check()``, ``get_user_stats`` equals
``get_user_stats_naive`` for every user, and the start cache holds the
tables' start times.  The cases: a current snapshot; the log after it; a
snapshot of another database; an older snapshot; writes made while no store
was open (raw SQL, a store with snapshots off, an older aggtree without the
triggers); a restored backup, alone and then written to; a deleted,
truncated, bit-flipped or foreign snapshot; a pruned log; several
processes; SIGKILL while writing a snapshot and while opening warm.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest

from aggtree.events import EventStore, generate_dataset
from aggtree.events import warm as warm_mod

T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
NOWS = (T0, T0 + timedelta(days=3), T0 - timedelta(days=30))


def usernames(store):
    return [r[0] for r in store._conn.execute("SELECT username FROM users ORDER BY id")]


def assert_right(store):
    """The aggregates and the start cache agree with the tables."""
    report = store.verify_aggregates(max_listed=5)
    assert report.ok, report
    for t in (store.events_by_creation, store.events_by_start, store.event_follows,
              store.followed_events_by_start):
        t.aggregate.check()
    for name in usernames(store):
        for now in NOWS:
            assert store.get_user_stats(name, now=now) == store.get_user_stats_naive(name, now=now), name
    # the start cache against the tables in one read transaction that the
    # aggregates reflect (other processes may be writing meanwhile)
    with store._lock, store._caught_up() as conn:
        rows = conn.execute("SELECT id, start_time FROM events").fetchall()
        for eid, start in rows:
            got = store._starts.get(eid)
            assert got is None or got == start, (eid, got, start)


def populate(store, rng, users=6, events=60, follows=80):
    """Users, events and follows through the store."""
    ids = [store.create_user(f"u{len(usernames(store))}-{i}") for i in range(users)]
    evs = []
    for _ in range(events):
        owner = rng.choice(ids)
        start = T0 + timedelta(hours=rng.randint(-500, 500))
        evs.append((owner, store.create_event(owner, name="e", start=start, created_at=T0 - timedelta(hours=rng.randint(0, 900)))))
    for _ in range(follows):
        store.follow_event(rng.choice(ids), rng.choice(evs)[1])
    return ids, evs


def churn(store, rng, n=40):
    """Random writes of every kind through the store."""
    conn = store._conn
    for _ in range(n):
        evs = conn.execute("SELECT id, user_id FROM events").fetchall()
        users = [r[0] for r in conn.execute("SELECT id FROM users")]
        op = rng.randrange(5)
        if op == 0 or not evs:
            owner = rng.choice(users)
            store.create_event(owner, name="c", start=T0 + timedelta(hours=rng.randint(-300, 300)))
        elif op == 1:
            eid, owner = rng.choice(evs)
            store.update_event(owner, eid, start=T0 + timedelta(hours=rng.randint(-300, 300)))
        elif op == 2:
            eid, owner = rng.choice(evs)
            store.delete_event(owner, eid)
        elif op == 3:
            store.follow_event(rng.choice(users), rng.choice(evs)[0])
        else:
            store.unfollow_event(rng.choice(users), rng.choice(evs)[0])


@pytest.fixture
def db(tmp_path):
    """A file database with data, closed (so its snapshot is current)."""
    path = str(tmp_path / "ev.db")
    with EventStore.open(path) as store:
        populate(store, random.Random(1))
    return path


def reopen(path, **kw):
    store = EventStore.open(path, **kw)
    assert_right(store)
    return store


# ---------------------------------------------------------------------------
# The basic cases
# ---------------------------------------------------------------------------


def test_close_writes_and_open_loads(db):
    assert os.path.exists(db + ".aggtree-snapshot")
    with reopen(db) as store:
        assert store.loaded_from == "snapshot"
        assert store.snapshot_path == db + ".aggtree-snapshot"
        assert store.reloads == 0
        churn(store, random.Random(2))
        assert_right(store)
    with reopen(db) as store:
        assert store.loaded_from == "snapshot"
    # the first open had no snapshot
    os.remove(db + ".aggtree-snapshot")
    with reopen(db) as store:
        assert store.loaded_from == "tables"


@pytest.fixture
def any_db(backend_name, tmp_path, request):
    """``(target, open options)`` of a database with data on either backend
    (PostgreSQL: the snapshot is per instance, at the path given), closed
    so that its snapshot is current."""
    snap = str(tmp_path / "instance.aggtree-snapshot")
    if backend_name == "postgres":
        target, kw = request.getfixturevalue("pg_uri"), {"snapshot_path": snap}
    else:
        target, kw = str(tmp_path / "ev.db"), {"snapshot_path": snap}
    with EventStore.open(target, **kw) as store:
        populate(store, random.Random(1))
    return target, kw


def test_warm_start_on_both_backends(any_db):
    """The warm-start cases every backend shares: a current snapshot, the
    log after it (another store's writes), writes of its own, raw SQL since
    (the tables), no snapshot (the tables)."""
    target, kw = any_db
    with reopen(target, **kw) as store:
        assert store.loaded_from == "snapshot" and store.reloads == 0
        churn(store, random.Random(2))
        assert_right(store)
    with reopen(target, **kw) as store:
        assert store.loaded_from == "snapshot"
        # (open meanwhile: on SQLite the other store logs only while one is)
        with EventStore.open(target, snapshot=False) as other:
            churn(other, random.Random(3), n=20)
        store.close(snapshot=False)
    with reopen(target, **kw) as store:
        assert store.loaded_from == "snapshot+log" and store.changes_replayed > 0
    with EventStore.open(target, snapshot=False) as other:  # raw SQL: drift
        other._conn.execute("DELETE FROM event_follows WHERE user_id = (SELECT min(user_id)"
                            " FROM event_follows)")
    with reopen(target, **kw) as store:
        assert store.loaded_from == "tables"
    os.remove(kw["snapshot_path"])
    with reopen(target, **kw) as store:
        assert store.loaded_from == "tables"


def test_a_database_without_events_starts_warm(tmp_path):
    """The start-time cache of a store without events is empty: its section
    of the snapshot has no bytes, which must still load (it once made every
    such snapshot 'unusable')."""
    path = str(tmp_path / "users-only.db")
    with EventStore.open(path) as store:
        store.create_user("alice")
    with reopen(path) as store:
        assert store.loaded_from == "snapshot"
        assert store.get_user_stats("alice") == store.get_user_stats_naive("alice")


def test_memory_and_disabled(tmp_path):
    with EventStore.open(":memory:") as store:
        populate(store, random.Random(3), events=5, follows=5)
        assert store.snapshot_path is None and store.snapshot() is None
    path = str(tmp_path / "off.db")
    with EventStore.open(path, snapshot=False) as store:
        populate(store, random.Random(3), events=5, follows=5)
        assert store.snapshot() is None
    assert not os.path.exists(path + ".aggtree-snapshot")
    with reopen(path) as store:
        assert store.loaded_from == "tables"
    with reopen(path, snapshot=False) as store:  # a current snapshot, ignored
        assert store.loaded_from == "tables"


def test_snapshot_path_override(db, tmp_path):
    other = str(tmp_path / "elsewhere.snap")
    with EventStore.open(db, snapshot_path=other) as store:
        assert store.loaded_from == "tables"
        assert store.snapshot() == other
    with reopen(db, snapshot_path=other) as store:
        assert store.loaded_from == "snapshot"


def test_explicit_snapshot_and_unchanged_close(db):
    snap = db + ".aggtree-snapshot"
    with reopen(db) as store:
        before = os.stat(snap).st_mtime_ns
    assert os.stat(snap).st_mtime_ns == before  # nothing changed: not rewritten
    with reopen(db) as store:
        churn(store, random.Random(4), 10)
        assert store.snapshot() == snap
        churn(store, random.Random(5), 10)
    with reopen(db) as store:
        assert store.loaded_from == "snapshot"


def test_load_false_takes_no_snapshot_until_complete(db):
    os.remove(db + ".aggtree-snapshot")
    store = EventStore.open(db, load=False)
    assert store.loaded_from is None
    with pytest.raises(RuntimeError):
        store.snapshot()
    store.close()
    assert not os.path.exists(db + ".aggtree-snapshot")
    with EventStore.open(db, load=False) as store:
        store.initialize_aggregates(batch_size=7, progress=False)
        store.snapshot()
    with reopen(db) as store:
        assert store.loaded_from == "snapshot"


def test_reference_aggregates_and_node_size(db):
    from aggtree.reference import Aggregate as Ref

    with reopen(db, aggregate_class=Ref) as store:
        assert store.loaded_from == "snapshot"
        assert type(store.events_by_start.aggregate) is Ref
    with reopen(db, node_size=16) as store:  # the snapshot has 64: cold
        assert store.loaded_from == "tables"
    with reopen(db, node_size=16) as store:  # ... and the close saved one with 16
        assert store.loaded_from == "snapshot"


# ---------------------------------------------------------------------------
# Snapshots that must not be used
# ---------------------------------------------------------------------------


def expect_cold(path, caplog, fragment, **kw):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aggtree.events"):
        store = reopen(path, **kw)
    assert store.loaded_from == "tables"
    lines = [r for r in caplog.records if r.name == "aggtree.events" and "loading from the tables" in r.getMessage()]
    assert len(lines) == 1 and fragment in lines[0].getMessage(), [r.getMessage() for r in caplog.records]
    return store


def test_snapshot_of_another_database(db, tmp_path, caplog):
    other = str(tmp_path / "other.db")
    with EventStore.open(other) as store:
        populate(store, random.Random(9))
    shutil.copy(db + ".aggtree-snapshot", other + ".aggtree-snapshot")
    expect_cold(other, caplog, "another database").close()


def test_older_snapshot(db, tmp_path, caplog):
    old = str(tmp_path / "old.snap")
    shutil.copy(db + ".aggtree-snapshot", old)
    with reopen(db) as store:
        churn(store, random.Random(6), 20)
    shutil.copy(old, db + ".aggtree-snapshot")
    expect_cold(db, caplog, "not in the snapshot's state").close()


def test_snapshots_of_one_state_share_its_token(db, tmp_path):
    other = str(tmp_path / "other.snap")
    with reopen(db) as store:
        store.snapshot()
        store.snapshot_path = other
        store.snapshot()
    for path in (None, other):
        with reopen(db, snapshot_path=path) as store:
            assert store.loaded_from == "snapshot"


def test_restored_backup_between_two_snapshots_then_written(db, tmp_path, caplog):
    """Snapshot S1 at p, logged writes, snapshot S2 at p + k: a backup taken
    between them, restored and written to (logged), must not match S2."""
    a = EventStore.open(db)
    b = EventStore.open(db, snapshot=False)  # a's and b's writes are logged
    try:
        a.snapshot()
        churn(b, random.Random(30), 5)
        bak = str(tmp_path / "bak.db")
        backup(db, bak)
        churn(b, random.Random(31), 10)
        a.snapshot()  # S2
    finally:
        a.close(snapshot=False)
        b.close(snapshot=False)
    restore(bak, db)
    x = EventStore.open(db, snapshot=False)
    y = EventStore.open(db, snapshot=False)
    churn(y, random.Random(32), 15)  # logged (x is open), other writes
    x.close(snapshot=False)
    y.close(snapshot=False)
    expect_cold(db, caplog, "not in the snapshot's state").close()


@pytest.mark.parametrize("sql", [
    "INSERT INTO events (user_id, name, start_time, created_at) VALUES (1, 'raw', 5, 5)",
    "UPDATE events SET start_time = start_time + 1 WHERE id = (SELECT min(id) FROM events)",
    "UPDATE events SET user_id = (SELECT max(id) FROM users)"
    " WHERE id = (SELECT min(id) FROM events WHERE user_id != (SELECT max(id) FROM users))",
    "DELETE FROM events WHERE id = (SELECT max(id) FROM events)",
    "DELETE FROM event_follows WHERE (user_id, event_id) IN (SELECT user_id, event_id FROM event_follows LIMIT 1)",
    "INSERT OR IGNORE INTO event_follows (user_id, event_id, created_at)"
    " SELECT u.id, e.id, 0 FROM users u, events e LIMIT 50",
    "UPDATE event_follows SET event_id = (SELECT max(id) FROM events) WHERE (user_id, event_id) ="
    " (SELECT user_id, event_id FROM event_follows f WHERE NOT EXISTS (SELECT 1 FROM event_follows g"
    " WHERE g.user_id = f.user_id AND g.event_id = (SELECT max(id) FROM events)) LIMIT 1)",
    "DELETE FROM events",
])
def test_raw_writes_while_closed(db, sql, caplog):
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA foreign_keys = ON")
    with conn:
        assert conn.execute(sql).rowcount > 0
    conn.close()
    expect_cold(db, caplog, "written outside the change log").close()


def test_raw_writes_that_change_no_aggregate_keep_it_warm(db):
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE events SET name = 'renamed', description = 'x'")
        conn.execute("UPDATE events SET start_time = start_time")  # same value
        conn.execute("INSERT INTO users (username, created_at) VALUES ('raw user', 0)")
    conn.close()
    with reopen(db) as store:
        assert store.loaded_from == "snapshot"


def test_a_store_without_snapshots_writes(db, caplog):
    with EventStore.open(db, snapshot=False) as store:
        churn(store, random.Random(7), 5)
    expect_cold(db, caplog, "written outside the change log").close()


def test_an_older_aggtree_without_the_triggers(db, caplog):
    # an aggtree from before the warm start: no trigger, no state, no store id
    conn = sqlite3.connect(db)
    with conn:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("DELETE FROM event_follows WHERE (user_id, event_id) IN (SELECT user_id, event_id FROM event_follows LIMIT 3)")
    conn.close()
    expect_cold(db, caplog, "written outside the change log").close()
    conn = sqlite3.connect(db)
    with conn:
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("DROP TABLE aggtree_state")
        conn.execute("DELETE FROM aggtree_meta WHERE name = 'store_id'")
        conn.execute("UPDATE aggtree_meta SET value = '1' WHERE name = 'schema_version'")
    conn.close()
    with reopen(db) as store:  # upgraded
        assert store.loaded_from == "tables"
        meta = dict(store._conn.execute("SELECT name, value FROM aggtree_meta"))
        assert meta["schema_version"] == "2" and len(meta["store_id"]) == 32
    with reopen(db) as store:
        assert store.loaded_from == "snapshot"


def backup(src, dst):
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    a.backup(b)
    a.close()
    b.close()


def restore(src, dst):
    for suffix in ("-wal", "-shm"):
        if os.path.exists(dst + suffix):
            os.remove(dst + suffix)
    shutil.copy(src, dst)


def test_restored_backup_from_before_the_snapshot(db, tmp_path, caplog):
    bak = str(tmp_path / "bak.db")
    backup(db, bak)
    with reopen(db) as store:  # a later state, its snapshot at close
        churn(store, random.Random(8), 20)
    restore(bak, db)
    expect_cold(db, caplog, "not in the snapshot's state").close()


def test_restored_backup_then_other_writes(db, tmp_path, caplog):
    snap = db + ".aggtree-snapshot"
    bak = str(tmp_path / "bak.db")
    backup(db, bak)  # the snapshot's state exactly
    with reopen(db) as store:
        churn(store, random.Random(10), 20)
    kept = str(tmp_path / "kept.snap")
    shutil.copy(snap, kept)
    restore(bak, db)
    # the backup takes other writes, from a store that does not snapshot
    with EventStore.open(db, snapshot=False) as store:
        churn(store, random.Random(11), 20)
    expect_cold(db, caplog, "", ).close()  # the newer snapshot: token differs
    restore(bak, db)
    with EventStore.open(db, snapshot=False) as store:
        churn(store, random.Random(12), 20)
    shutil.copy(kept, snap)
    expect_cold(db, caplog, "").close()


def test_restored_backup_at_the_snapshot_state_is_warm(db, tmp_path):
    bak = str(tmp_path / "bak.db")
    backup(db, bak)
    old = str(tmp_path / "old.snap")
    shutil.copy(db + ".aggtree-snapshot", old)
    with reopen(db) as store:
        churn(store, random.Random(13), 20)
    restore(bak, db)
    shutil.copy(old, db + ".aggtree-snapshot")
    with reopen(db) as store:  # the backup IS the snapshot's state
        assert store.loaded_from == "snapshot"


@pytest.mark.parametrize("damage", ["delete", "empty", "truncate", "flip", "garbage", "magic", "version"])
def test_damaged_snapshot(db, caplog, damage):
    snap = db + ".aggtree-snapshot"
    data = bytearray(open(snap, "rb").read())
    rng = random.Random(damage)
    if damage == "delete":
        os.remove(snap)
    else:
        if damage == "empty":
            data = bytearray()
        elif damage == "truncate":
            data = data[: rng.randrange(len(data))]
        elif damage == "flip":
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif damage == "garbage":
            data = bytearray(rng.randbytes(len(data)))
        elif damage == "magic":
            data[0] ^= 0xFF
        elif damage == "version":
            data[8] += 1
        open(snap, "wb").write(bytes(data))
    fragment = "no snapshot" if damage == "delete" else "unusable snapshot"
    expect_cold(db, caplog, fragment).close()


def read_and_load(snap):
    """What the open does with the file before using it: read it (the
    wrapper's checksum), then load each aggregate (its own checksum)."""
    from aggtree import Aggregate

    header, sections = warm_mod.read_file(snap)
    for s in sections[:4]:
        Aggregate.loads(s)


def test_every_truncation_and_many_flips_are_refused(db):
    snap = db + ".aggtree-snapshot"
    data = open(snap, "rb").read()
    for cut in range(0, len(data), 3):
        open(snap, "wb").write(data[:cut])
        with pytest.raises(ValueError):
            warm_mod.read_file(snap)
    rng = random.Random(5)
    # every byte of the header and the last sections, and a sample of the rest
    every = list(range(min(len(data), 600))) + list(range(max(0, len(data) - 200), len(data)))
    for i in every + [rng.randrange(len(data)) for _ in range(600)]:
        b = bytearray(data)
        b[i] ^= 1 << rng.randrange(8)
        open(snap, "wb").write(bytes(b))
        with pytest.raises(ValueError):
            read_and_load(snap)


# ---------------------------------------------------------------------------
# The change log after the snapshot
# ---------------------------------------------------------------------------


def test_snapshot_plus_log(db):
    a = EventStore.open(db)
    b = EventStore.open(db, snapshot=False)  # its writes are logged: a is open
    try:
        a.snapshot()
        churn(b, random.Random(14), 25)
        churn(a, random.Random(15), 25)
        churn(b, random.Random(16), 5)
        c = reopen(db, snapshot_path=a.snapshot_path)  # while a and b are open
        assert c.loaded_from == "snapshot+log"
        assert c.changes_replayed > 0
        churn(c, random.Random(17), 5)
        assert_right(c)
        c.close(snapshot=False)  # (leave a's snapshot alone)
        # a and b die without closing: the next open replays the log
        d = reopen(db, snapshot_path=a.snapshot_path + ".none")
        d.close(snapshot=False)
    finally:
        a.close(snapshot=False)
        b.close(snapshot=False)
    with reopen(db) as store:
        assert store.loaded_from == "snapshot+log"


def test_log_with_a_raw_write_in_between_is_refused(db, caplog):
    a = EventStore.open(db)
    b = EventStore.open(db, snapshot=False)
    try:
        a.snapshot()
        churn(b, random.Random(18), 10)
        raw = sqlite3.connect(db)
        with raw:
            raw.execute("DELETE FROM event_follows WHERE (user_id, event_id) IN (SELECT user_id, event_id FROM event_follows LIMIT 2)")
        raw.close()
        churn(b, random.Random(19), 10)  # logged, but the flag stays set
        expect_cold(db, caplog, "outside the change log",
                    snapshot_path=a.snapshot_path).close(snapshot=False)
    finally:
        a.close(snapshot=False)
        b.close(snapshot=False)


def test_pruned_log_is_refused(db, caplog):
    a = EventStore.open(db, change_log_keep=3)
    b = EventStore.open(db, snapshot=False, change_log_keep=3)
    try:
        a.snapshot()
        churn(b, random.Random(20), 30)
        b.compact_change_log(keep=2)
        s = expect_cold(db, caplog, "no longer covers", snapshot_path=a.snapshot_path)
        s.close(snapshot=False)
    finally:
        a.close(snapshot=False)
        b.close(snapshot=False)


# ---------------------------------------------------------------------------
# Processes and crashes
# ---------------------------------------------------------------------------

WRITER = r"""
import random, sys
from datetime import datetime, timedelta, timezone
from aggtree.events import EventStore
path, seed, n, snap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
store = EventStore.open(path, snapshot=snap)
rng = random.Random(seed)
conn = store._conn
users = [r[0] for r in conn.execute("SELECT id FROM users")]
for i in range(n):
    evs = conn.execute("SELECT id, user_id FROM events ORDER BY random() LIMIT 1").fetchall()
    op = rng.randrange(4)
    if op == 0 or not evs:
        store.create_event(rng.choice(users), name="w", start=T0 + timedelta(hours=rng.randint(-99, 99)))
    elif op == 1:
        store.update_event(evs[0][1], evs[0][0], start=T0 + timedelta(hours=rng.randint(-99, 99)))
    elif op == 2:
        store.follow_event(rng.choice(users), evs[0][0])
    else:
        store.unfollow_event(rng.choice(users), evs[0][0])
    if snap and i % 7 == 3:
        store.snapshot()
print("done", flush=True)
store.close()
"""


def test_snapshots_from_other_processes(db):
    """Two processes write and snapshot while this one does too; every
    snapshot left behind loads consistently (warm, or cold if outdated)."""
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, db, str(s), "60", "1"]) for s in (1, 2)]
    opened = []
    with EventStore.open(db) as store:
        for i in range(20):
            churn(store, random.Random(100 + i), 3)
            store.snapshot()
            other = EventStore.open(db, snapshot_path=store.snapshot_path)
            assert other.loaded_from in ("snapshot", "snapshot+log", "tables")
            opened.append(other)
        for p in procs:
            assert p.wait(120) == 0
        # Compared with the tables only now that nobody writes (a store and a
        # naive read made while others write see two different moments); a
        # store that loaded a wrong state would still be wrong after catching
        # up, since catching up only replays the log on top of it.
        assert_right(store)
        for other in opened:
            assert_right(other)
            other.close(snapshot=False)
    with reopen(db) as store:
        assert store.loaded_from == "snapshot"


SNAPPER = r"""
import sys
from aggtree.events import EventStore
store = EventStore.open(sys.argv[1])
print("open", flush=True)
while True:
    store.snapshot()
"""

OPENER = r"""
import sys
from aggtree.events import EventStore
print("start", flush=True)
while True:
    s = EventStore.open(sys.argv[1])
    s.close(snapshot=False)
"""


@pytest.fixture
def big_db(tmp_path):
    path = str(tmp_path / "big.db")
    generate_dataset(path, users=300, events=60_000, follows=30_000, seed=3, now=T0)
    with EventStore.open(path):
        pass
    return path


def counts(path):
    conn = sqlite3.connect(path)
    try:
        return tuple(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                     for t in ("users", "events", "event_follows"))
    finally:
        conn.close()


@pytest.mark.parametrize("script", [SNAPPER, OPENER], ids=["while-snapshotting", "while-opening"])
def test_sigkill(big_db, script):
    rng = random.Random(script)
    before = counts(big_db)
    for _ in range(4):
        p = subprocess.Popen([sys.executable, "-c", script, big_db], stdout=subprocess.PIPE)
        p.stdout.readline()
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        assert counts(big_db) == before
        store = EventStore.open(big_db)
        try:
            assert store.loaded_from in ("snapshot", "tables")
            assert store.verify_aggregates(max_listed=5).ok
            for t in (store.events_by_creation, store.followed_events_by_start):
                t.aggregate.check()
            for name in usernames(store)[:20]:
                assert store.get_user_stats(name, now=T0) == store.get_user_stats_naive(name, now=T0)
            # a committed write survives, and the next open sees it warm
            uid = store._conn.execute("SELECT min(id) FROM users").fetchone()[0]
            store.create_event(uid, name="after", start=T0)
        finally:
            store.close()
        before = counts(big_db)
    with EventStore.open(big_db) as store:
        assert store.loaded_from == "snapshot"
        assert store.verify_aggregates().ok
    # the temporary files of killed writers are gone (the next snapshot removes them)
    assert [f for f in os.listdir(os.path.dirname(big_db)) if f.endswith(".tmp")] == []


# ---------------------------------------------------------------------------
# The native walk of int namespaces (what makes the warm load fast)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("namespaces", [
    [0, 1, 2, 3],
    [-(2**53), -5, -1, 0, 7, 2**53],
    [2**53 + 1, 1],          # past 2^53: the Python walk
    [2**60, -(2**62), 5],
    [1, 2.5, 3],             # a float namespace among ints
    [True, 2, 3],
    [None, 1, "x", (1, 2)],
])
def test_int_namespace_walk_matches_the_reference(namespaces):
    import aggtree
    from aggtree import SnapshotError
    from aggtree.reference import Aggregate as Ref

    agg = aggtree.Aggregate()
    ref = Ref()
    for i, ns in enumerate(namespaces):
        for j in range(3 + i):
            for a in (agg, ref):
                a.insert(float(j * 7 - i), j, namespace=ns)
        agg.insert(None, 99, namespace=("none", i)) if i == 0 else None
        ref.insert(None, 99, namespace=("none", i)) if i == 0 else None
    data = agg.dumps()
    assert ref.dumps() == data
    back = aggtree.Aggregate.loads(data)
    back.check()
    assert back.dumps() == data and Ref.loads(data).dumps() == data
    for ns in namespaces:
        assert back.count(namespace=ns) == ref.count(namespace=ns)
    # a damaged namespace header is reported, as by the Python walk
    bad = bytearray(data)
    bad[32 + 1] = 1  # the first namespace header's reserved bytes
    with pytest.raises(SnapshotError):
        aggtree.Aggregate.loads(bytes(bad))
