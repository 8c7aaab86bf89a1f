"""The PostgreSQL building blocks (aggtree.pgsync) against a real server.

A session-scoped fixture starts a throwaway server (aggtree.pgserver); each
test gets a database of its own.  Without server binaries the module skips
with the reason, unless AGGTREE_REQUIRE_POSTGRES=1 (CI), where it fails.

Covered: concurrent schema creation; writer processes appending (and rolling
back) while reader processes follow through ChangeFeed: every reader sees
every committed position exactly once, densely and in order; the chain;
a listener that was down catching up; the compaction floor; connection loss
and a server restart; commit-outcome resolution by token; the drift marker;
and the classic write races run through the event store's own write hooks
(two EventStore instances on the test's database), interleaved
deterministically: one store's write paused with its row locks held, the
other's seen waiting on them.  The writes of the multi-process and loading
tests go through EventStore too: the pglog building blocks have no write
helpers of their own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from typing import NamedTuple

import pytest

from aggtree import pgserver

psycopg = pytest.importorskip("psycopg") if os.environ.get("AGGTREE_REQUIRE_POSTGRES") != "1" \
    else __import__("psycopg")

from psycopg import sql as pgsql  # noqa: E402
from aggtree import pgsync as ps  # noqa: E402  (needs psycopg)
from aggtree.events import AGGREGATE_NAMES, EventStore  # noqa: E402
from aggtree.events.schema import from_ms  # noqa: E402



@pytest.fixture(scope="session")
def pg():
    if pgserver.find_binaries() is None:
        reason = ("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
                  "/usr/lib/postgresql/*/bin: install postgresql or set AGGTREE_PG_BIN")
        if os.environ.get("AGGTREE_REQUIRE_POSTGRES") == "1":
            pytest.fail("AGGTREE_REQUIRE_POSTGRES=1 but " + reason)
        pytest.skip(reason)
    with pgserver.TempPostgres() as server:
        yield server


@pytest.fixture(scope="session")
def testdb(pg):
    return pg.uri("aggtree_tests")


@pytest.fixture
def uri(testdb, request):
    """A fresh PostgreSQL schema (namespace) with the event schema in it,
    for this test: a URI whose search_path is that namespace (cheaper than
    a database per test)."""
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    with psycopg.connect(testdb, autocommit=True) as c:
        c.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {0} CASCADE; CREATE SCHEMA {0}").format(
            pgsql.Identifier(name)))
    u = f"{testdb}&options=-c%20search_path%3D{name}"
    with psycopg.connect(u, autocommit=True) as c:
        ps.create_schema(c)
        assert c.execute("SELECT current_schema()").fetchone()[0] == name
    return u


def connect(uri):
    return psycopg.connect(uri, autocommit=True)


def raw_append(conn, blob, after=None, commit=True):
    ps.begin_write(conn)
    token = uuid.uuid4()
    a = ps.append(conn.cursor(), blob, token, ps.read_head(conn)[0] if after is None else after)
    conn.execute("COMMIT" if commit else "ROLLBACK")
    return a, token


def run_py(code, *args, **kw):
    """Run ``code`` in a fresh interpreter: the same Python, so the same
    installed aggtree (not the source tree, which has no compiled modules)."""
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run_readers_and_writers(reader, writer, uri, tmp_path, readers: int):
    """``readers`` processes of ``reader`` (each prints "ready", then works
    until the stop file exists), then 4 processes of ``writer`` doing 150
    writes each (seeds 0..3); after the writers exit, the stop file ends the
    readers.  Asserts that every process exited 0; returns their
    (stdout, stderr) pairs: (writers', readers')."""
    stop = tmp_path / "stop"
    rprocs = [run_py(reader, uri, stop) for _ in range(readers)]
    for r in rprocs:
        assert r.stdout.readline().strip() == "ready", r.stderr.read()
    wprocs = [run_py(writer, uri, 150, seed) for seed in range(4)]
    wouts = [w.communicate(timeout=120) for w in wprocs]
    assert all(w.returncode == 0 for w in wprocs), [o[1][-3000:] for o in wouts]
    stop.touch()
    routs = [r.communicate(timeout=60) for r in rprocs]
    assert all(r.returncode == 0 for r in rprocs), [o[1][-3000:] for o in routs]
    return wouts, routs


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------

SCHEMA_WORKER = r"""
import sys, time, psycopg
from aggtree import pgsync
uri, at = sys.argv[1], float(sys.argv[2])
with psycopg.connect(uri, autocommit=True) as c:
    time.sleep(max(0.0, at - time.time()))
    print(pgsync.create_schema(c))
"""


def test_schema_created_once_by_concurrent_processes(pg):
    uri = pg.uri("schema_race")
    at = time.time() + 1.5
    procs = [run_py(SCHEMA_WORKER, uri, at) for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    ids = {o[0].strip() for o in outs}
    assert len(ids) == 1
    with connect(uri) as c:
        info = ps.store_info(c)
        assert str(info.store_id) in ids and info.schema_version == ps.SCHEMA_VERSION
        assert (info.head, info.floor, info.drift) == (0, 0, 0)
        assert c.execute("SELECT count(*) FROM aggtree_meta WHERE key = 'schema_version'"
                         ).fetchone()[0] == 1
        assert c.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'aggtree_drift'"
                         ).fetchone()[0] == 3
        assert c.execute("SELECT count(*) FROM aggtree_head").fetchone()[0] == 1


def test_schema_version_mismatch_raises(uri):
    with connect(uri) as c:
        c.execute("UPDATE aggtree_meta SET value = '99' WHERE key = 'schema_version'")
        with pytest.raises(ValueError, match="version 99"):
            ps.create_schema(c)
        assert c.execute("SELECT value FROM aggtree_meta WHERE key = 'schema_version'"
                         ).fetchone()[0] == "99"


def test_begin_write_needs_autocommit(uri):
    with psycopg.connect(uri) as c:
        with pytest.raises(ValueError, match="autocommit"):
            ps.begin_write(c)


# ---------------------------------------------------------------------------
# Log: order, gaps, chain
# ---------------------------------------------------------------------------

WRITER = r"""
import json, random, sys, uuid, psycopg
from aggtree import pgsync as ps
uri, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
seen = []
cons = ps.LogConsumer(lambda row: seen.append([row.pos, row.token.hex]))
committed, rolled = [], []
with psycopg.connect(uri, autocommit=True) as c:
    cur = c.cursor()
    for i in range(n):
        ps.begin_write(c)
        token = uuid.uuid4()
        ops = rng.randbytes(8 * rng.randint(1, 8))
        kind = rng.random()
        if kind < 0.4:  # one round trip: append, COMMIT, gap rows
            a = ps.append_commit(c, ops, token, cons.pos)
            committed.append(token.hex)
            cons.apply_rows(a.missed)
            cons.apply_rows([ps.LogRow(a.pos, token, a.chain, ops)])
            continue
        a = ps.append(cur, ops, token, cons.pos)
        cons.apply_rows(a.missed)
        if kind < 0.6:
            c.execute("ROLLBACK")
            rolled.append(token.hex)
        else:
            c.execute("COMMIT")
            committed.append(token.hex)
            cons.apply_rows([ps.LogRow(a.pos, token, a.chain, ops)])
print(json.dumps({"committed": committed, "rolled": rolled, "seen": seen}))
"""

READER = r"""
import json, os, sys, time
from aggtree import pgsync as ps
uri, stop = sys.argv[1], sys.argv[2]
seen = []
cons = ps.LogConsumer(lambda row: seen.append([row.pos, row.token.hex]))
feed = ps.ChangeFeed(uri, poll_interval=1.0)
feed.on_wake = lambda: cons.catch_up(feed.fetch_since, limit=37)
feed.start()
feed.listening.wait(30)
print("ready", flush=True)
while not os.path.exists(stop):
    time.sleep(0.02)
feed.close()
cons.catch_up(ps.ChangeFeed(uri).fetch_since)
print(json.dumps({"seen": seen, "notifications": feed.notifications, "wakes": feed.wakes}))
"""


def test_writers_and_readers_in_processes(uri, tmp_path):
    wouts, routs = run_readers_and_writers(READER, WRITER, uri, tmp_path, readers=3)
    wres = [json.loads(o[0]) for o in wouts]
    rres = [json.loads(o[0].splitlines()[-1]) for o in routs]
    committed = [t for w in wres for t in w["committed"]]
    rolled = {t for w in wres for t in w["rolled"]}
    assert rolled and len(committed) > 300
    with connect(uri) as c:
        rows = c.execute("SELECT pos, token FROM aggtree_log ORDER BY pos").fetchall()
        head = ps.read_head(c)[0]
    log = [[p, t.hex] for p, t in rows]
    # dense, one row per committed write, no rolled-back write
    assert [p for p, _ in log] == list(range(1, len(committed) + 1)) and head == len(committed)
    assert sorted(t for _, t in log) == sorted(committed)
    assert not rolled & {t for _, t in log}
    for r in rres:  # every reader: every position exactly once, in order
        assert r["seen"] == log
        assert r["notifications"] > 0
    for w in wres:  # every writer applied a prefix of the log, in order
        assert w["seen"] == log[: len(w["seen"])]
        assert w["committed"][-1] in {t for _, t in w["seen"]}


def test_chain_verifies_and_detects_a_rewritten_history(uri):
    with connect(uri) as c:
        blobs = [os.urandom(16) for _ in range(5)]
        for b in blobs:
            raw_append(c, b)
        chain = ps.ZERO_CHAIN
        for pos, row_chain, ops in c.execute(
                "SELECT pos, chain, ops FROM aggtree_log ORDER BY pos").fetchall():
            chain = ps.chain_next(chain, pos, ops)
            assert chain == row_chain
        assert ps.read_head(c) == (5, chain)
        assert ps.chain_at(c, 5) == chain and ps.chain_at(c, 0) == ps.ZERO_CHAIN
        assert ps.chain_at(c, 6) is None
        good = ps.LogConsumer(lambda row: None)
        assert good.catch_up(lambda a, n: ps.fetch_since(c, a, n), limit=2) == 5
        assert (good.pos, good.chain) == (5, chain)

        # A consumer at 3; the server "loses" 3..5 (as after a crash with
        # synchronous_commit=off) and new writes take the same positions.
        at3 = ps.LogConsumer(lambda row: None)
        at3.apply_rows(ps.fetch_since(c, 0, 3).rows)
        assert at3.pos == 3
        c.execute("DELETE FROM aggtree_log WHERE pos >= 3")
        c.execute("UPDATE aggtree_head SET pos = 2, chain = (SELECT chain FROM aggtree_log"
                  " WHERE pos = 2)")
        with pytest.raises(ps.ReloadNeeded, match="behind"):
            at3.catch_up(lambda a, n: ps.fetch_since(c, a, n))
        raw_append(c, b"other history")
        with pytest.raises(ps.ReloadNeeded, match="another history"):
            at3.catch_up(lambda a, n: ps.fetch_since(c, a, n))
        raw_append(c, b"and more")
        with pytest.raises(ps.ReloadNeeded, match="does not continue"):
            at3.catch_up(lambda a, n: ps.fetch_since(c, a, n))
        assert at3.pos == 3 and not at3.broken  # nothing applied
        # and a tampered row breaks the chain for a consumer from scratch
        c.execute("UPDATE aggtree_log SET ops = 'x' WHERE pos = 2")
        fresh = ps.LogConsumer(lambda row: None)
        with pytest.raises(ps.ReloadNeeded):
            fresh.catch_up(lambda a, n: ps.fetch_since(c, a, n))
        assert fresh.pos == 1


def test_gap_rows_are_returned_to_the_writer(uri):
    with connect(uri) as a, connect(uri) as b:
        raw_append(a, b"one")
        raw_append(b, b"two")
        raw_append(b, b"three")
        ps.begin_write(a)
        got = ps.append(a.cursor(), b"four", uuid.uuid4(), 1)
        a.execute("COMMIT")
        assert got.pos == 4 and [r.ops for r in got.missed] == [b"two", b"three"]
        assert [r.pos for r in got.missed] == [2, 3]
        cons = ps.LogConsumer(lambda row: None)
        cons.catch_up(lambda x, n: ps.fetch_since(a, x, n))
        assert cons.chain == got.chain


def test_append_commit_in_one_round_trip(uri):
    with connect(uri) as a, connect(uri) as b:
        raw_append(a, b"one")
        raw_append(b, b"two")
        ps.begin_write(a)
        token = uuid.uuid4()
        got = ps.append_commit(a, b"three", token, 1)
        assert a.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert got.pos == 3 and [r.ops for r in got.missed] == [b"two"]
        assert ps.resolve(b, token) == 3 and ps.chain_at(b, 3) == got.chain
        ps.begin_write(a)
        assert ps.append_commit(a, b"four", uuid.uuid4(), 3).missed == []
        ps.compact(b, 0)
        ps.begin_write(a)
        late = ps.append_commit(a, b"five", uuid.uuid4(), 1)
        assert late.pos == 5 and late.missed is None   # committed, but reload needed
        assert ps.read_head(b)[0] == 5


def test_committed_at_is_the_append_time_not_the_transaction_start(uri):
    with connect(uri) as c:
        ps.begin_write(c)
        started = c.execute("SELECT now()").fetchone()[0]
        time.sleep(0.3)
        ps.append_commit(c, b"late", uuid.uuid4(), 0)
        at = c.execute("SELECT committed_at FROM aggtree_log").fetchone()[0]
        assert (at - started).total_seconds() >= 0.3


def test_a_rolled_back_append_leaves_no_hole(uri):
    with connect(uri) as a, connect(uri) as b:
        raw_append(a, b"kept")
        ps.begin_write(a)
        ps.append(a.cursor(), b"rolled back", uuid.uuid4(), 1)   # holds the head row
        result = {}
        t = threading.Thread(target=lambda: result.update(r=raw_append(b, b"next", after=1)))
        t.start()
        wait_blocked(a, b.info.backend_pid)
        a.execute("ROLLBACK")
        t.join(10)
        assert result["r"][0].pos == 2
        assert [r[0] for r in a.execute("SELECT ops FROM aggtree_log ORDER BY pos")] == \
            [b"kept", b"next"]


# ---------------------------------------------------------------------------
# The feed: missed notifications, compaction, connection loss
# ---------------------------------------------------------------------------


def wait_until(pred, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_listener_that_was_down_catches_up_from_the_log(uri):
    seen = []
    cons = ps.LogConsumer(lambda row: seen.append(row.pos))
    with connect(uri) as c:
        for i in range(5):  # nobody is listening: these notifications are lost
            raw_append(c, b"early %d" % i)
        feed = ps.ChangeFeed(uri, poll_interval=30.0)  # no safety poll in this test
        feed.on_wake = lambda: cons.catch_up(feed.fetch_since)
        with feed:
            wait_until(lambda: seen == [1, 2, 3, 4, 5], what="catch-up on connect")
            raw_append(c, b"live")
            wait_until(lambda: seen[-1:] == [6], what="the notification")
        for i in range(3):  # the feed is closed
            raw_append(c, b"while down")
        feed = ps.ChangeFeed(uri, poll_interval=30.0)
        feed.on_wake = lambda: cons.catch_up(feed.fetch_since)
        with feed:
            wait_until(lambda: seen == list(range(1, 10)), what="catch-up after restart")
    assert cons.applied == 9


def test_a_failing_on_wake_is_retried_with_backoff(uri):
    calls = []

    def on_wake():
        calls.append(time.monotonic())
        if len(calls) <= 3:
            raise RuntimeError("transient")
    with ps.ChangeFeed(uri, on_wake, poll_interval=30.0) as feed:
        wait_until(lambda: len(calls) >= 4, what="retries")
        time.sleep(0.3)
        assert feed.wakes == len(calls) == 4  # then quiet: the next wake is the 30 s poll
    gaps = [b - a for a, b in zip(calls, calls[1:4])]
    assert all(0.03 < g < 1.0 for g in gaps), gaps  # backoff, not the 30 s poll


def test_compaction_floor(uri):
    seen = []
    with connect(uri) as c:
        for i in range(10):
            raw_append(c, b"row %d" % i)
        chain6 = ps.chain_at(c, 6)
        at7 = ps.LogConsumer(lambda row: seen.append(row.pos))
        at7.apply_rows(ps.fetch_since(c, 0, 7).rows)
        assert ps.compact(c, 4) == 6
        assert ps.compact(c, 4) == 0 and ps.compact(c, 5) == 0
        info = ps.store_info(c)
        assert (info.floor, info.floor_chain) == (6, chain6)
        assert ps.chain_at(c, 6) == chain6 and ps.chain_at(c, 5) is None
        assert c.execute("SELECT min(pos), count(*) FROM aggtree_log").fetchone() == (7, 4)
        at7.catch_up(lambda a, n: ps.fetch_since(c, a, n))
        assert seen == list(range(1, 11))
        behind = ps.LogConsumer(lambda row: None, pos=3, chain=b"x" * 32)
        with pytest.raises(ps.ReloadNeeded, match="compacted"):
            behind.catch_up(lambda a, n: ps.fetch_since(c, a, n))
        ps.begin_write(c)
        with pytest.raises(ps.ReloadNeeded, match="compacted"):
            ps.append(c.cursor(), b"late writer", uuid.uuid4(), 3)
        c.execute("ROLLBACK")
        at10 = ps.LogConsumer(lambda row: None, pos=10, chain=ps.read_head(c)[1])
        assert ps.compact(c, 0) == 4
        assert ps.fetch_since(c, 10).rows == [] and at10.catch_up(
            lambda a, n: ps.fetch_since(c, a, n)) == 0
        at6 = ps.LogConsumer(lambda row: None, pos=6, chain=chain6)
        with pytest.raises(ps.ReloadNeeded, match="compacted"):
            at6.catch_up(lambda a, n: ps.fetch_since(c, a, n))
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError):
                ps.compact(c, bad)


def test_feed_survives_terminated_connections_and_a_server_restart(pg, uri):
    seen = []
    cons = ps.LogConsumer(lambda row: seen.append(row.pos))
    feed = ps.ChangeFeed(uri, poll_interval=0.5)
    feed.on_wake = lambda: cons.catch_up(feed.fetch_since)
    writing = threading.Event()
    writing.set()
    stop = threading.Event()
    written = []

    def writer():
        c = None
        while not stop.is_set():
            if not writing.is_set():
                time.sleep(0.01)
                continue
            try:
                if c is None or c.closed:
                    c = connect(uri)
                a, _ = raw_append(c, b"w")
                written.append(a.pos)
            except psycopg.OperationalError:
                if c is not None:
                    c.close()
                c = None
                time.sleep(0.05)
            time.sleep(0.002)
        if c is not None:
            c.close()

    t = threading.Thread(target=writer)
    with feed:
        t.start()
        try:
            wait_until(lambda: len(seen) > 20, what="first rows")
            with connect(uri) as admin:
                for _ in range(3):  # cut the listener's connection, then the query one
                    pid = feed.listen_pid
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    wait_until(lambda: feed.listen_pid != pid and feed.listening.is_set(),
                               what="reconnect")
                    n = len(seen)
                    wait_until(lambda: len(seen) > n + 10, what="rows after reconnect")
                cut = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    " AND query LIKE %s", ("%FROM aggtree_head h%",)).fetchall()
                assert cut  # the feed's query connection
                n = len(seen)
                wait_until(lambda: len(seen) > n + 10, what="rows after the query connection")
            connects = feed.connects
            pg.restart()
            wait_until(lambda: feed.connects > connects, timeout=30, what="reconnect after restart")
            n = len(seen)
            wait_until(lambda: len(seen) > n + 10, timeout=30, what="rows after restart")
        finally:
            stop.set()
            t.join(30)
        with connect(uri) as c:
            head = ps.read_head(c)[0]
        wait_until(lambda: cons.pos == head, what="final catch-up")
    assert seen == list(range(1, head + 1))
    assert sorted(written) == written and set(written) <= set(seen)
    assert feed.connects >= 5


# ---------------------------------------------------------------------------
# Commit outcome
# ---------------------------------------------------------------------------


def test_resolve_by_token(uri):
    with connect(uri) as a, connect(uri) as b:
        done, token = raw_append(a, b"committed")
        assert ps.resolve(b, token) == done.pos == 1
        _, token = raw_append(a, b"rolled back", commit=False)
        assert ps.resolve(b, token) is None
        assert ps.resolve(b, uuid.uuid4()) is None

        # In doubt: the writer appended (holding the head row) and its
        # connection is gone from our side; resolve ends the old backend
        # first, so the answer is final, and the position is free again.
        victim = connect(uri)
        ident = ps.backend_identity(victim)
        assert ident[0] == victim.info.backend_pid
        ps.begin_write(victim)
        token = uuid.uuid4()
        assert ps.append(victim.cursor(), b"in doubt", token, 1).pos == 2
        assert ps.resolve(b, token, old_backend=ident) is None
        assert b.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                         (ident[0],)).fetchone()[0] == 0
        with pytest.raises(psycopg.OperationalError):
            victim.execute("COMMIT")
        victim.close()
        assert raw_append(a, b"next")[0].pos == 2

        # Committed, then the connection breaks before we hear back.
        victim = connect(uri)
        ident = ps.backend_identity(victim)
        _, token = raw_append(victim, b"lost ack")
        victim.close()
        assert ps.resolve(b, token, old_backend=ident) == 3


# ---------------------------------------------------------------------------
# Drift
# ---------------------------------------------------------------------------


def test_drift_marker(uri):
    with connect(uri) as c, EventStore.open(uri, snapshot=False) as store:
        uid = store.create_user("alice")  # the store's writes are not drift
        assert ps.drift(c) == 0
        store.create_event(uid, name="e", start=from_ms(100), created_at=from_ms(5))
        assert store.change_id == ps.read_head(c)[0] == 1 and ps.drift(c) == 0
        c.execute("INSERT INTO users (username, created_at) VALUES ('bob', 2)")
        assert ps.drift(c) == 1
        c.execute("UPDATE events SET start_time = 7")
        assert ps.drift(c) == 2
        with c.transaction(force_rollback=True):  # rolled back: no drift
            c.execute("DELETE FROM event_follows")
        assert ps.drift(c) == 2
        c.execute("UPDATE events SET start_time = 7 WHERE id = -1")  # no row: counted anyway
        assert ps.drift(c) == 3
        c.execute("BEGIN")  # the setting is transaction-local
        c.execute("SELECT set_config('aggtree.writer', 'store', true)")
        c.execute("COMMIT")
        c.execute("TRUNCATE event_follows")
        assert ps.drift(c) == 4


# ---------------------------------------------------------------------------
# Write races under READ COMMITTED, through the event store's own hooks
# ---------------------------------------------------------------------------
#
# Each race runs two EventStore instances on the test's database (two
# writers, as two processes would be) and interleaves them deterministically:
# the holder's write is paused after its SQL ran, with its row locks held and
# before its append and COMMIT (Paused); the other store's write then starts
# in a thread and must be seen waiting on a lock (pg_stat_activity); the
# holder is released, both commit, and every instance, the log replayed and
# the tables must agree.


def wait_blocked(admin, pid, timeout=10.0):
    wait_until(lambda: admin.execute(
        "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()[0] == "Lock", timeout, f"backend {pid} to wait on a lock")


def replay(conn, upto=None):
    """The four aggregates rebuilt by replaying the log's ops in order."""
    items = [set() for _ in range(4)]
    for (blob,) in conn.execute("SELECT ops FROM aggtree_log WHERE pos <= %s ORDER BY pos",
                                (2**62 if upto is None else upto,)):
        for agg, code, ns, old, new, id_ in ps.decode_ops(blob):
            if code & ps.REMOVE:
                items[agg].discard((ns, old, id_))
            if code & ps.ADD:
                items[agg].add((ns, new, id_))
    return items


def from_tables(conn):
    ev = conn.execute("SELECT id, user_id, created_at, start_time FROM events").fetchall()
    fo = conn.execute("SELECT f.user_id, f.event_id, e.start_time FROM event_follows f"
                      " JOIN events e ON e.id = f.event_id").fetchall()
    return [{(u, c, i) for i, u, c, s in ev}, {(u, s, i) for i, u, c, s in ev},
            {(u, 0, e) for u, e, s in fo}, {(u, s, e) for u, e, s in fo}]


def store_items(store):
    """A store's four aggregates in replay()'s form (a follow's key as 0),
    read under its lock (its feed thread applies rows under it)."""
    with store._lock:
        return [{(int(ns), 0 if it.key is None else int(it.key), int(it.id))
                 for ns in agg.namespaces() for it in agg.iter(namespace=ns)}
                for agg in (getattr(store, name).aggregate for name in AGGREGATE_NAMES)]


def last_ops(conn):
    """The ops of the log's last row."""
    return ps.decode_ops(conn.execute(
        "SELECT ops FROM aggtree_log ORDER BY pos DESC LIMIT 1").fetchone()[0])


class Race(NamedTuple):
    a: EventStore  # the holder's store
    b: EventStore  # the waiter's store
    admin: object  # a plain connection, to watch and read
    owner: int
    fan: int
    event: int


@pytest.fixture
def race(uri):
    """Two store instances, an admin connection, an owner, a follower and
    one event at start 1000 ms (written through the store)."""
    a = EventStore.open(uri, snapshot=False)
    b = EventStore.open(uri, snapshot=False)
    admin = connect(uri)
    try:
        owner = a.create_user("owner")
        fan = a.create_user("fan")
        event = a.create_event(owner, name="talk", start=from_ms(1000), created_at=from_ms(10))
        yield Race(a, b, admin, owner, fan, event)
    finally:
        a.close()
        b.close()
        admin.close()


def in_thread(fn):
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test
            box["error"] = exc
    t = threading.Thread(target=run)
    t.start()
    return t, box


class Paused:
    """Stops ``store``'s next logged write after its SQL ran (its row locks
    held), before its append and COMMIT.  The store's concurrent write path
    (``EventStore._write_concurrent``) calls ``backend.append_commit`` as its
    last step; this replaces it on the instance for one call, so the write
    path itself carries nothing for the test."""

    def __init__(self, store):
        self.reached, self.go = threading.Event(), threading.Event()
        backend = store._backend
        real = backend.append_commit

        def paused(*args):
            del backend.append_commit  # once: the method again
            self.reached.set()
            if not self.go.wait(30):
                raise AssertionError("the paused write was never released")
            return real(*args)
        backend.append_commit = paused


def run_race(race, holder, waiter):
    """``holder()`` (a write on store a) runs and pauses with its locks
    held; ``waiter()`` (a write on store b) must then wait on a row lock;
    the holder commits, the waiter finishes.  Returns the waiter's box
    (``result`` or ``error``), after both stores caught up and checks that
    the log replayed, the tables and both instances agree."""
    pause = Paused(race.a)
    held, hbox = in_thread(holder)
    assert pause.reached.wait(10), hbox
    waiting, wbox = in_thread(waiter)
    wait_blocked(race.admin, race.b._backend._conn.info.backend_pid)
    assert held.is_alive() and waiting.is_alive()
    pause.go.set()
    held.join(10)
    waiting.join(10)
    assert not held.is_alive() and not waiting.is_alive()
    assert "error" not in hbox, hbox
    race.a.catch_up()
    race.b.catch_up()
    return wbox


def check_agree(race):
    tables = from_tables(race.admin)
    assert replay(race.admin) == tables
    assert store_items(race.a) == tables and store_items(race.b) == tables
    assert ps.drift(race.admin) == 0
    return tables


def test_update_holds_the_event_then_follow_reads_the_final_start(race):
    a, b, admin, owner, fan, event = race
    box = run_race(race, lambda: a.update_event(owner, event, start=from_ms(2000)),
                   lambda: b.follow_event(fan, event))   # waits for the update
    assert box.get("result") is True, box
    assert (ps.FOLLOWED_BY_START, ps.ADD, fan, 0, 2000, event) in last_ops(admin)
    assert (fan, 2000, event) in check_agree(race)[ps.FOLLOWED_BY_START]


def test_follow_holds_the_event_then_update_moves_the_new_follower(race):
    a, b, admin, owner, fan, event = race
    box = run_race(race, lambda: a.follow_event(fan, event),
                   lambda: b.update_event(owner, event, start=from_ms(3000)))
    assert "error" not in box, box
    assert (ps.FOLLOWED_BY_START, ps.MOVE, fan, 1000, 3000, event) in last_ops(admin)
    assert (fan, 3000, event) in check_agree(race)[ps.FOLLOWED_BY_START]


def test_naive_follow_without_the_lock_gets_it_wrong(race):
    """The same interleaving with the start read unlocked (store b's
    dialect without FOR SHARE): the log and b's aggregates disagree with
    the tables (the checks above can fail)."""
    a, b, admin, owner, fan, event = race
    b._sql.select_start_locked = b._sql.select_start_locked.replace(" FOR SHARE", "")
    assert "FOR" not in b._sql.select_start_locked
    box = run_race(race, lambda: a.update_event(owner, event, start=from_ms(2000)),
                   lambda: b.follow_event(fan, event))   # blocked only at its foreign-key check
    assert box.get("result") is True, box
    tables = from_tables(admin)
    assert (fan, 2000, event) in tables[ps.FOLLOWED_BY_START]
    assert replay(admin) != tables and store_items(b) != tables
    assert (fan, 1000, event) in replay(admin)[ps.FOLLOWED_BY_START]
    assert not b.verify_aggregates().ok


def test_delete_holds_the_event_then_follow_finds_it_gone(race):
    a, b, admin, owner, fan, event = race
    box = run_race(race, lambda: a.delete_event(owner, event), lambda: b.follow_event(fan, event))
    assert isinstance(box.get("error"), LookupError), box
    assert not any(check_agree(race))


def test_follow_holds_the_event_then_delete_removes_the_follow(race):
    a, b, admin, owner, fan, event = race
    box = run_race(race, lambda: a.follow_event(fan, event), lambda: b.delete_event(owner, event))
    assert "error" not in box, box
    assert (ps.FOLLOWED_BY_START, ps.REMOVE, fan, 1000, 0, event) in last_ops(admin)
    assert not any(check_agree(race))


def test_two_updates_of_one_event_serialise(race):
    a, b, admin, owner, fan, event = race
    assert a.follow_event(fan, event)
    box = run_race(race, lambda: a.update_event(owner, event, start=from_ms(2000)),
                   lambda: b.update_event(owner, event, start=from_ms(5000)))
    assert "error" not in box, box
    assert (ps.BY_START, ps.MOVE, owner, 2000, 5000, event) in last_ops(admin)
    assert (fan, 5000, event) in check_agree(race)[ps.FOLLOWED_BY_START]


def test_unfollow_waits_for_update_and_removes_the_moved_item(race):
    a, b, admin, owner, fan, event = race
    assert a.follow_event(fan, event)
    box = run_race(race, lambda: a.update_event(owner, event, start=from_ms(2000)),
                   lambda: b.unfollow_event(fan, event))
    assert box.get("result") is True, box
    assert (ps.FOLLOWED_BY_START, ps.REMOVE, fan, 2000, 0, event) in last_ops(admin)
    assert not check_agree(race)[ps.FOLLOWED_BY_START]


def test_store_writes_report_bad_input_and_change_nothing(race):
    """On PostgreSQL each bad write raises the documented exception and
    leaves the tables, the log and the aggregates as they were; the
    idempotent cases answer without logging."""
    a, b, admin, owner, fan, event = race

    def state():
        return ps.read_head(admin), store_items(a), [admin.execute(
            f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in ("users", "events", "event_follows")]
    before = state()
    with pytest.raises(ValueError, match="taken"):
        a.create_user("owner")
    with pytest.raises(LookupError):
        a.create_event(999999, name="x", start=from_ms(1))
    with pytest.raises(LookupError):
        a.update_event(owner, 999999, start=from_ms(1))
    with pytest.raises(PermissionError):
        a.update_event(fan, event, start=from_ms(1))
    with pytest.raises(PermissionError):
        a.delete_event(fan, event)
    with pytest.raises(ValueError, match="end"):
        a.update_event(owner, event, end=from_ms(1))
    with pytest.raises(LookupError):
        a.follow_event(999999, event)
    with pytest.raises(LookupError):
        a.follow_event(fan, 999999)
    with pytest.raises(LookupError):
        a.unfollow_event(fan, 999999)
    assert a.unfollow_event(fan, event) is False
    assert state() == before and ps.drift(admin) == 0
    assert a.follow_event(fan, event) is True
    head = ps.read_head(admin)[0]
    assert head == before[0][0] + 1
    assert a.follow_event(fan, event) is False
    a.update_event(owner, event, name="renamed")  # no aggregate moves: not logged
    assert ps.read_head(admin)[0] == head
    assert admin.execute("SELECT name FROM events").fetchone()[0] == "renamed"
    b.catch_up()
    check_agree(race)


def test_op_layout_matches_the_event_store():
    from aggtree.events import oplog, schema
    assert (ps.BY_CREATION, ps.BY_START, ps.FOLLOWS, ps.FOLLOWED_BY_START) == (
        schema.BY_CREATION, schema.BY_START, schema.FOLLOWS, schema.FOLLOWED_BY_START)
    assert (ps.REMOVE, ps.ADD, ps.MOVE, ps.OP_WIDTH) == (
        oplog.REMOVE, oplog.ADD, oplog.MOVE, oplog.OP_WIDTH)
    ops = [(1, 3, 7, -5, 2**40, 9), (0, 2, 1, 0, 3, 4)]
    assert ps.encode_ops(ops) == oplog.encode(ops)
    assert ps.decode_ops(ps.encode_ops(ops)) == [tuple(o) for o in ops]


# ---------------------------------------------------------------------------
# Loading and snapshots
# ---------------------------------------------------------------------------


def populate(uri, users=5, events=40, seed=3):
    """Users, events and follows written through an event store."""
    import random
    rng = random.Random(seed)
    with EventStore.open(uri, snapshot=False) as s:
        uids = [s.create_user(f"user{i}") for i in range(users)]
        eids = [s.create_event(rng.choice(uids), name=f"e{i}",
                               start=from_ms(rng.randint(-2**40, 2**40)),
                               created_at=from_ms(rng.randint(0, 10**12)))
                for i in range(events)]
        for u in uids:
            for e in rng.sample(eids, min(9, len(eids))):
                s.follow_event(u, e)
    return uids, eids


def test_load_tables_reads_every_row_at_one_position(uri):
    with connect(uri) as c:
        populate(uri, events=400)  # several heap pages
        c.execute("UPDATE events SET user_id = user_id")  # drift, for the record
        ev = c.execute("SELECT id, user_id, created_at, start_time FROM events ORDER BY id").fetchall()
        fo = c.execute("SELECT user_id, event_id FROM event_follows ORDER BY 1, 2").fetchall()
        loaded = ps.load_tables(c)
        assert loaded.events.tolist() == [list(r) for r in ev]
        assert loaded.follows.tolist() == [list(r) for r in fo]
        assert loaded.events.dtype == loaded.follows.dtype == "int64"
        assert loaded.info.head == ps.read_head(c)[0] == 400 + 5 * 9
        assert loaded.info.drift == 1
        for blocks in (1, 2, 1000):  # ranges of pages, sorted at the end
            assert (ps.read_int_matrix(c, "events", ("id", "user_id", "created_at", "start_time"),
                                       ("id",), blocks=blocks) == loaded.events).all()
            assert (ps.read_int_matrix(c, "event_follows", ("user_id", "event_id"),
                                       ("user_id", "event_id"), blocks=blocks) == loaded.follows).all()
        by_start = ps.read_int_matrix(c, "events", ("start_time", "id"), ("start_time",))
        assert by_start.tolist() == sorted([s, i] for i, u, cr, s in ev)
        with pytest.raises(ValueError, match="NULL"):
            ps.read_int_matrix(c, "events", ("id", "end_time"), ("id",))
        with pytest.raises(ValueError, match="order"):
            ps.read_int_matrix(c, "events", ("user_id",), ("id",))
        c.execute("TRUNCATE event_follows")
        assert ps.read_int_matrix(c, "event_follows", ("user_id", "event_id"),
                                  ("user_id",)).shape == (0, 2)
    with psycopg.connect(uri) as c:
        with pytest.raises(ValueError, match="autocommit"):
            ps.load_tables(c)


def test_load_tables_and_its_position_agree_under_concurrent_writes(uri):
    """While writers add events, each load's rows match its head: replaying
    the log up to info.head gives exactly the loaded events."""
    with connect(uri) as c:
        populate(uri, users=2, events=2)
        stop = threading.Event()
        owner = c.execute("SELECT min(id) FROM users").fetchone()[0]
        written = [0, 0]
        errors = []

        def writer(k):
            try:
                with EventStore.open(uri, snapshot=False) as w:
                    while not stop.is_set():
                        i = written[k]
                        w.create_event(owner, name="x", start=from_ms(i), created_at=from_ms(i))
                        written[k] += 1
            except BaseException as exc:  # handed to the test
                errors.append(exc)
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: all(written) or errors, what="both writers to write")
            for _ in range(15):
                loaded = ps.load_tables(c)
                ids = set()
                for (blob,) in c.execute("SELECT ops FROM aggtree_log WHERE pos <= %s ORDER BY pos",
                                         (loaded.info.head,)):
                    for agg, code, ns, old, new, id_ in ps.decode_ops(blob):
                        if agg == ps.BY_CREATION:
                            (ids.add if code & ps.ADD else ids.discard)(id_)
                assert ids == set(loaded.events[:, 0].tolist())
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors and min(written) > 1, (errors, written)


def test_check_snapshot(uri, pg):
    with connect(uri) as c:
        for i in range(6):
            raw_append(c, b"r%d" % i)
        info = ps.store_info(c)
        ok = ps.check_snapshot(c, info.store_id, info.head, info.head_chain, info.drift)
        assert ok.usable and not ok.drifted and ok.reason == "ok"
        mid = ps.check_snapshot(c, info.store_id, 3, ps.chain_at(c, 3), info.drift)
        assert mid.usable
        assert not ps.check_snapshot(c, uuid.uuid4(), 3, ps.chain_at(c, 3), 0).usable
        bad = ps.check_snapshot(c, info.store_id, 3, b"\0" * 32, info.drift)
        assert not bad.usable and "differs" in bad.reason
        assert "past the log's head" in ps.check_snapshot(
            c, info.store_id, 9, info.head_chain, info.drift).reason
        c.execute("INSERT INTO users (username, created_at) VALUES ('raw', 1)")
        drifted = ps.check_snapshot(c, info.store_id, 3, ps.chain_at(c, 3), info.drift)
        assert drifted.usable and drifted.drifted and "verify" in drifted.reason
        ps.compact(c, 2)
        gone = ps.check_snapshot(c, info.store_id, 3, ps.chain_at(c, 3) or b"", info.drift)
        assert not gone.usable and "compacted" in gone.reason
        at_floor = ps.check_snapshot(c, info.store_id, 4, ps.chain_at(c, 4), info.drift)
        assert at_floor.usable
    # another database on the same server: another store id
    other = pg.uri("t_other_store")
    with connect(other) as c2:
        ps.create_schema(c2)
        assert not ps.check_snapshot(c2, info.store_id, 0, ps.ZERO_CHAIN, 0).usable


# ---------------------------------------------------------------------------
# Everything together: random writes of every kind from several processes
# ---------------------------------------------------------------------------

MIXED_WRITER = r"""
import json, random, sys
from aggtree.events import AGGREGATE_NAMES, EventStore
from aggtree.events.schema import from_ms
uri, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
counts = {}
# The other writers may have started: the store loads the tables at one log position.
store = EventStore.open(uri, snapshot=False)
c = store._conn
users = [r[0] for r in c.execute("SELECT id FROM users")]
for i in range(n):
    kind = rng.choice(["create", "move", "move", "move", "delete", "follow", "follow",
                       "unfollow"])
    top = c.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
    event = rng.randint(max(1, top - 6), top + 1)
    owner = c.execute("SELECT user_id FROM events WHERE id = %s", (event,)).fetchone()
    owner = owner[0] if owner else rng.choice(users)
    try:
        if kind == "create":
            store.create_event(rng.choice(users), name="e", start=from_ms(rng.randint(0, 50)),
                               created_at=from_ms(i))
            changed = True
        elif kind == "move":
            store.update_event(owner, event, start=from_ms(rng.randint(0, 50)))
            changed = True
        elif kind == "delete":
            store.delete_event(owner, event)
            changed = True
        elif kind == "follow":
            changed = store.follow_event(rng.choice(users), event)
        else:
            changed = store.unfollow_event(rng.choice(users), event)
    except (LookupError, PermissionError) as exc:
        counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
        continue
    if changed:
        counts[kind] = counts.get(kind, 0) + 1
store.catch_up()
with store._lock:  # (the feed thread applies others' rows under it)
    pos = store.change_id
    items = [sorted([int(ns), 0 if it.key is None else int(it.key), int(it.id)]
                    for ns in agg.namespaces() for it in agg.iter(namespace=ns))
             for agg in (getattr(store, name).aggregate for name in AGGREGATE_NAMES)]
store.close()
print(json.dumps({"pos": pos, "counts": counts, "items": items}))
"""


MIXED_READER = r"""
import json, os, sys, time
from aggtree import pgsync as ps
uri, stop = sys.argv[1], sys.argv[2]
items = [set() for _ in range(4)]

def apply(row):
    for agg, code, ns, old, new, id_ in ps.decode_ops(row.ops):
        if code & ps.REMOVE:
            items[agg].discard((ns, old, id_))
        if code & ps.ADD:
            items[agg].add((ns, new, id_))

cons = ps.LogConsumer(apply)
feed = ps.ChangeFeed(uri, poll_interval=1.0)
feed.on_wake = lambda: cons.catch_up(feed.fetch_since)
feed.start()
feed.listening.wait(30)
print("ready", flush=True)
while not os.path.exists(stop):
    time.sleep(0.02)
feed.close()
cons.catch_up(ps.ChangeFeed(uri).fetch_since)
print(json.dumps({"pos": cons.pos, "items": [sorted(map(list, s)) for s in items]}))
"""


def test_random_writes_of_every_kind_keep_every_instance_equal_to_the_tables(uri, tmp_path):
    with connect(uri) as c:
        c.execute("INSERT INTO users (username, created_at) SELECT 'u' || g, 0"
                  " FROM generate_series(1, 4) g")
        c.execute("UPDATE aggtree_meta SET value = '0' WHERE key = 'drift'")
    wouts, routs = run_readers_and_writers(MIXED_READER, MIXED_WRITER, uri, tmp_path, readers=2)
    with connect(uri) as c:
        want = [sorted(map(list, s)) for s in from_tables(c)]
        head = ps.read_head(c)[0]
        assert ps.drift(c) == 0
    results = [json.loads(o[0]) for o in wouts] + [json.loads(o[0]) for o in routs]
    moves = sum(r["counts"].get("move", 0) for r in results[:4])
    follows = sum(r["counts"].get("follow", 0) for r in results[:4])
    assert moves > 50 and follows > 20 and want[ps.FOLLOWED_BY_START]
    with connect(uri) as c:
        assert [sorted(map(list, s)) for s in replay(c)] == want
        for r in results[:4]:  # a writer: the log's state at its last position
            assert r["items"] == [sorted(map(list, s)) for s in replay(c, upto=r["pos"])]
    assert max(r["pos"] for r in results[:4]) == head
    for r in results[4:]:  # a reader: the tables
        assert r["pos"] == head
        assert r["items"] == want
