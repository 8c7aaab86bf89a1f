"""The event store on PostgreSQL: what only this backend does.

Instances in sync (the change feed, ``catch_up``, compaction), writes whose
connection is lost mid-COMMIT (resolved by token: applied exactly once, or
no trace), a server restart under open stores, drift from raw SQL, the
per-instance warm start, and a multi-process run: 4 writer processes and 3
reader instances doing every kind of write on a small shared set of users
and events, with a reader and a writer SIGKILLed and the server restarted
mid-run; afterwards every instance equals a fresh rebuild item for item.

Every test needs a PostgreSQL server (conftest.py starts one per session;
skipped with the reason when none is installed, failed under
``AGGTREE_REQUIRE_POSTGRES=1``).  The behaviour tests shared with SQLite are
in test_events.py (parametrised by backend).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone

import pytest

from aggtree.events import AGGREGATE_NAMES, EventStore

T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


def at(hours: float) -> datetime:
    return T0 + hours * HOUR


def dump(store: EventStore) -> list:
    """Every item of the four aggregates, as plain lists (comparable across
    processes through JSON)."""
    out = []
    for name in AGGREGATE_NAMES:
        agg = getattr(store, name).aggregate
        out.append(sorted([int(ns), [[None if it.key is None else int(it.key), int(it.id)]
                                     for it in agg.iter(namespace=ns)]]
                          for ns in agg.namespaces()))
    return out


def fresh_dump(uri: str) -> list:
    with EventStore.open(uri, snapshot=False) as s:
        return dump(s)


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def uri(pg_uri):
    return pg_uri


def small_world(store: EventStore):
    alice = store.create_user("alice")
    bob = store.create_user("bob")
    e = store.create_event(alice, name="x", start=at(5), created_at=at(-1))
    store.follow_event(bob, e)
    return alice, bob, e


# ---------------------------------------------------------------------------
# Instances in sync
# ---------------------------------------------------------------------------


def test_postgres_dialect_runs_every_statement(uri):
    """Every statement of the PostgreSQL dialect plans on the real schema
    (a typo in a statement no test reaches would show here)."""
    from aggtree.events.postgres import PostgresDialect

    with EventStore.open(uri) as s:
        d = PostgresDialect()
        names = [n for n in dir(d) if not n.startswith("_") and n not in ("placeholder", "schema")
                 and isinstance(getattr(d, n), str) and getattr(d, n)]
        assert "lock_event" in names and "select_start_locked" in names and len(names) > 25
        for name in names:
            sql = getattr(d, name)
            s._conn.execute("EXPLAIN " + sql, (None,) * sql.count("%s"))


def test_open_forms_and_errors(uri, pg_server):
    import psycopg

    with EventStore.open(uri) as s:
        alice, bob, e = small_world(s)
        assert s.path.startswith("postgresql://") and s.loaded_from == "tables"
    conn = psycopg.connect(uri)  # an open connection: the store owns it
    with EventStore.open(conn) as s:
        assert s.get_user_stats("bob", now=T0).upcoming_followed == 1
    assert conn.closed
    with pytest.raises(ValueError):  # create=False on a database without the tables
        EventStore.open(pg_server.uri("empty_for_create_false"), create=False)


def test_the_feed_applies_other_instances_writes(uri):
    a = EventStore.open(uri, poll_interval=60.0)
    b = EventStore.open(uri, poll_interval=60.0)
    try:
        alice, bob, e = small_world(a)
        # b hears of it through NOTIFY (not the 60 s safety poll), whole.
        assert wait_until(lambda: b.change_id == a.change_id, 20.0)
        assert b.get_user_stats("bob", now=T0).upcoming_followed == 1
        a.update_event(alice, e, start=at(-5))
        assert b.catch_up() in (0, 1)  # 0 if the feed was first
        assert b.get_user_stats("bob", now=T0).upcoming_followed == 0
        assert b.catch_up() == 0
        # b writes: a's rows it had not applied come first, then its own.
        e2 = b.create_event(bob, name="y", start=at(6), created_at=at(-1))
        a.follow_event(alice, e2)
        b.catch_up()
        a.catch_up()
        assert dump(a) == dump(b) == fresh_dump(uri)
        assert a.verify_aggregates().ok and b.verify_aggregates().ok
        assert a.reloads == b.reloads == 1
    finally:
        a.close()
        b.close()


def test_a_writing_instance_pauses_its_feed_and_still_hears_others(uri):
    # a writes in a burst: its feed drops its own notifications, then stops
    # listening while a's position keeps moving; b only reads and never
    # pauses.  A row b commits while a's feed pauses reaches a by a's next
    # write, or when a has been still for a moment: not the 60 s poll.
    a = EventStore.open(uri, snapshot=False, poll_interval=60.0)
    b = EventStore.open(uri, snapshot=False, poll_interval=60.0)
    try:
        alice, bob, e = small_world(a)
        feed_a, feed_b = a._backend._feed, b._backend._feed
        feed_a.pause = 0.05  # a burst even on a loaded machine (writes of up to 50 ms)
        for _ in range(500):
            a.unfollow_event(bob, e)
            a.follow_event(bob, e)
            if feed_a.pauses:
                break
        assert feed_a.pauses >= 1 and feed_a.skipped >= 1
        e2 = b.create_event(bob, name="y", start=at(7), created_at=at(-1))
        assert wait_until(lambda: a.change_id == b.change_id, 5.0)
        assert a.get_user_stats("bob", now=T0).upcoming_own == 1  # e2, in a's aggregates
        assert wait_until(lambda: b.change_id == a.change_id, 5.0)
        assert feed_b.pauses == 0  # (its skips: rows a fetch had already brought)
        assert dump(a) == dump(b) == fresh_dump(uri)
    finally:
        a.close()
        b.close()


def test_compacted_log_makes_a_lagging_instance_reload(uri):
    a = EventStore.open(uri, change_log_keep=3)
    b = EventStore.open(uri, poll_interval=60.0)
    try:
        b._backend.detach()  # b stops listening: it falls behind
        u = a.create_user("u")
        for i in range(12):
            a.create_event(u, name="x", start=at(i), created_at=at(-i))
        assert a.compact_change_log(keep=2) > 0
        reloads = b.reloads
        b.catch_up()
        assert b.reloads == reloads + 1
        assert dump(b) == dump(a) == fresh_dump(uri)
    finally:
        a.close()
        b.close()


def test_writes_apply_only_on_commit(uri):
    """A write that fails inside its transaction leaves no trace anywhere."""
    s = EventStore.open(uri)
    try:
        alice, bob, e = small_world(s)
        before = dump(s)
        with pytest.raises(PermissionError):
            s.update_event(bob, e, start=at(1))
        with pytest.raises(LookupError):
            s.follow_event(bob, 999)
        with pytest.raises(ValueError):
            s.create_user("alice")
        assert dump(s) == before == fresh_dump(uri)
        s.follow_event(alice, e)  # the connection is usable afterwards
        assert s.verify_aggregates().ok
    finally:
        s.close()


# ---------------------------------------------------------------------------
# Lost connections
# ---------------------------------------------------------------------------


def _kill_connection(store: EventStore) -> None:
    """Terminate the store's server process from another connection."""
    import psycopg

    pid = store._backend._conn.info.backend_pid
    with psycopg.connect(store._backend.conninfo, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.mark.parametrize("committed", [True, False])
def test_lost_commit_is_resolved_by_token(uri, committed):
    """The connection dies around COMMIT: if the write committed it is
    applied exactly once (from the log), if not it is run again; either way
    the aggregates equal the tables."""
    s = EventStore.open(uri)
    other = EventStore.open(uri)
    try:
        alice, bob, e = small_world(s)
        backend = s._backend
        real = backend.append_commit
        calls = []

        def flaky(conn, ops, token, after):
            calls.append(token)
            if len(calls) == 1:
                if committed:
                    real(conn, ops, token, after)  # committed, then the reply is lost
                _kill_connection(s)
                for _ in range(500):  # the connection notices (and raises)
                    conn.execute("SELECT 1")
                    time.sleep(0.01)
                raise AssertionError("the terminated connection still works")
            return real(conn, ops, token, after)

        backend.append_commit = flaky
        s.update_event(alice, e, start=at(-7))
        backend.append_commit = real
        assert len(calls) == (1 if committed else 2)
        assert backend.reconnects >= 1
        other.catch_up()
        assert dump(s) == dump(other) == fresh_dump(uri)
        assert s.get_user_stats("bob", now=T0).upcoming_followed == 0
        rows = s._conn.execute("SELECT count(*) FROM aggtree_log").fetchone()[0]
        assert rows == 3  # create_event, follow_event, update_event: each once
        assert s.verify_aggregates().ok
    finally:
        s.close()
        other.close()


def test_server_restart_under_open_stores(uri, pg_server):
    a = EventStore.open(uri)
    b = EventStore.open(uri)
    try:
        alice, bob, e = small_world(a)
        pg_server.restart()
        # Both reconnect on their next use; b's feed reconnects by itself.
        # Reads of rows reconnect too (a's connection is one the restart cut).
        assert a.get_event(e)["start_time"] is not None
        assert a.get_user_stats_naive("bob", now=T0) == a.get_user_stats("bob", now=T0)
        pg_server.restart()
        assert b.user_id("carol") is None and b.get_user_stats_naive("bob", now=T0).total_follows == 1
        a.update_event(alice, e, start=at(-3))
        e2 = b.create_event(bob, name="after", start=at(8), created_at=at(-1))
        a.follow_event(alice, e2)
        assert wait_until(lambda: b.change_id == a.change_id, 10.0)
        b.catch_up()
        assert dump(a) == dump(b) == fresh_dump(uri)
        assert a._backend.reconnects >= 1
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------
# Drift and warm start
# ---------------------------------------------------------------------------


def test_raw_sql_is_drift_that_verify_repairs(uri):
    s = EventStore.open(uri)
    try:
        alice, bob, e = small_world(s)
        s._conn.execute("UPDATE events SET start_time = %s WHERE id = %s", (0, e))
        report = s.verify_aggregates(repair=True)
        assert not report.ok and report.repaired
        assert s.verify_aggregates().ok
        assert dump(s) == fresh_dump(uri)
    finally:
        s.close()


def test_warm_start_per_instance(uri, tmp_path):
    snap = str(tmp_path / "instance.snap")
    s = EventStore.open(uri, snapshot_path=snap)
    alice, bob, e = small_world(s)
    s.close()
    w = EventStore.open(uri, snapshot_path=snap)
    assert w.loaded_from == "snapshot" and dump(w) == fresh_dump(uri)
    w.close(snapshot=False)
    # Writes through another store: replayed from the log after the snapshot.
    with EventStore.open(uri) as other:
        other.update_event(alice, e, start=at(-9))
    w = EventStore.open(uri, snapshot_path=snap)
    assert w.loaded_from == "snapshot+log" and dump(w) == fresh_dump(uri)
    w.close()
    # Raw SQL since the snapshot (the drift counter moved): the tables.
    with EventStore.open(uri) as other:
        other._conn.execute("DELETE FROM event_follows")
    w = EventStore.open(uri, snapshot_path=snap)
    assert w.loaded_from == "tables" and dump(w) == fresh_dump(uri)
    w.close()
    # A log compacted past the snapshot: the tables.
    w = EventStore.open(uri, snapshot_path=snap)
    assert w.loaded_from == "snapshot"
    w.close(snapshot=False)
    with EventStore.open(uri) as other:
        for i in range(5):
            other.create_event(alice, name="n", start=at(i), created_at=at(-i))
        other.compact_change_log(keep=1)
    w = EventStore.open(uri, snapshot_path=snap)
    assert w.loaded_from == "tables" and dump(w) == fresh_dump(uri)
    w.close()


# ---------------------------------------------------------------------------
# Many processes
# ---------------------------------------------------------------------------

_WORKER = textwrap.dedent(r'''
    import json, os, random, sys, time
    from datetime import datetime, timedelta, timezone
    import psycopg
    from aggtree.events import EventStore, AGGREGATE_NAMES

    uri, role, seed, workdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    rng = random.Random(seed)
    T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
    lost = (psycopg.OperationalError, psycopg.InterfaceError)

    def dump(store):
        out = []
        for name in AGGREGATE_NAMES:
            agg = getattr(store, name).aggregate
            out.append(sorted([int(ns), [[None if it.key is None else int(it.key), int(it.id)]
                                         for it in agg.iter(namespace=ns)]] for ns in agg.namespaces()))
        return out

    store = EventStore.open(uri, snapshot=False, poll_interval=0.5)
    users = [r[0] for r in store._conn.execute("SELECT id FROM users ORDER BY id").fetchall()]
    names = [r[0] for r in store._conn.execute("SELECT username FROM users").fetchall()]
    open(os.path.join(workdir, f"ready-{role}-{seed}"), "w").close()
    go = os.path.join(workdir, "go")  # holds the end time, once every first worker is ready
    while not os.path.exists(go):
        time.sleep(0.01)
    until = None
    while until is None:
        try:
            until = float(open(go).read())
        except ValueError:  # (being written)
            time.sleep(0.01)
    writes = errors = 0
    events = {}
    while time.time() < until:
        try:
            if role == "reader":
                for n in names:
                    store.get_user_stats(n, now=T0)
                time.sleep(0.005)
                continue
            if not events or rng.random() < 0.05:
                events = dict(store._conn.execute("SELECT id, user_id FROM events").fetchall())
            op = rng.random()
            eid = rng.choice(list(events)) if events else None
            start = T0 + timedelta(hours=rng.randrange(-50, 50))
            if op < 0.12 or eid is None:
                owner = rng.choice(users)
                events[store.create_event(owner, name="w", start=start, created_at=start)] = owner
            elif op < 0.40:
                store.update_event(events[eid], eid, start=start)
            elif op < 0.47:
                store.delete_event(events.pop(eid), eid)
            elif op < 0.75:
                store.follow_event(rng.choice(users), eid)
            else:
                store.unfollow_event(rng.choice(users), eid)
            writes += 1
        except LookupError:
            events = {}
            errors += 1
        except lost:
            time.sleep(0.05)  # (reads of rows in this script; the store's writes retry)
    open(os.path.join(workdir, f"done-{role}-{seed}"), "w").close()
    stop = os.path.join(workdir, "stop")
    while not os.path.exists(stop):
        time.sleep(0.02)
    store.catch_up()
    report = store.verify_aggregates()
    result = {"role": role, "seed": seed, "writes": writes, "errors": errors, "ok": report.ok,
              "dump": dump(store), "reloads": store.reloads, "replayed": store.changes_replayed,
              "reconnects": store._backend.reconnects}
    with open(os.path.join(workdir, f"result-{role}-{seed}.json"), "w") as f:
        json.dump(result, f)
    store.close()
''')


def test_many_processes_with_kills_and_a_restart(uri, pg_server, tmp_path):
    """4 writers and 3 readers for ~12 s on 6 users and ~12 events: every
    kind of write, start times moved concurrently, follow / unfollow races,
    deletes of followed events.  A reader and a writer are SIGKILLed
    mid-run (and replaced by new processes, which open while the others
    write) and the server restarts mid-run.  Afterwards every surviving
    instance equals a fresh rebuild item for item, and verify finds
    nothing."""
    duration = float(os.environ.get("AGGTREE_PG_RUN_SECONDS", "12"))
    with EventStore.open(uri, snapshot=False) as s:
        users = [s.create_user(f"u{i}") for i in range(6)]
        for i in range(12):
            e = s.create_event(users[i % 6], name="seed", start=at(i), created_at=at(-i))
            s.follow_event(users[(i + 1) % 6], e)
    workdir = str(tmp_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)

    def spawn(role: str, seed: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _WORKER, uri, role, str(seed), workdir],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    procs = {("writer", i): spawn("writer", i) for i in range(4)}
    procs.update({("reader", 10 + i): spawn("reader", 10 + i) for i in range(3)})
    killed = []
    try:
        assert wait_until(lambda: all(os.path.exists(os.path.join(workdir, f"ready-{r}-{i}"))
                                      for r, i in procs), 120.0), "workers did not start"
        # Every worker is open: the run starts now (the time counts from here,
        # however long the processes took to start on a loaded machine).
        with open(os.path.join(workdir, "go.tmp"), "w") as f:
            f.write(repr(time.time() + duration))
        os.rename(os.path.join(workdir, "go.tmp"), os.path.join(workdir, "go"))
        time.sleep(duration * 0.25)
        for key in (("reader", 10), ("writer", 0)):  # SIGKILL mid-run, then replace
            procs[key].send_signal(signal.SIGKILL)
            procs[key].wait()
            killed.append(key)
        procs[("writer", 4)] = spawn("writer", 4)  # (they open while the others write)
        procs[("reader", 13)] = spawn("reader", 13)
        time.sleep(duration * 0.2)
        # (on a loaded machine a new process can take longer than that to
        # start; an open that meets the restart fails: wait for them first)
        assert wait_until(lambda: all(os.path.exists(os.path.join(workdir, f"ready-{r}-{i}"))
                                      for r, i in (("writer", 4), ("reader", 13))), 120.0)
        pg_server.restart()  # every connection is cut mid-run
        live = [k for k in procs if k not in killed]
        assert wait_until(lambda: all(os.path.exists(os.path.join(workdir, f"done-{r}-{i}"))
                                      for r, i in live), duration + 90.0), "workers did not finish"
        open(os.path.join(workdir, "stop"), "w").close()
        for k in live:
            out, err = procs[k].communicate(timeout=120)
            assert procs[k].returncode == 0, (k, err.decode()[-3000:])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    expected = fresh_dump(uri)
    results = []
    for r, i in live:
        with open(os.path.join(workdir, f"result-{r}-{i}.json")) as f:
            results.append(json.load(f))
    writes = sum(x["writes"] for x in results)
    print("\nprocesses:", [(x["role"], x["seed"], x["writes"], x["errors"], x["reconnects"],
                            x["replayed"], x["reloads"]) for x in results])
    assert writes > 100, writes  # the run did something
    # The restart cut the writers mid-run: they reconnected.
    assert any(x["reconnects"] for x in results if x["role"] == "writer")
    for x in results:
        assert x["ok"], (x["role"], x["seed"])
        if x["dump"] != expected:  # say where (the whole dumps are long)
            diff = []
            for a, name in enumerate(AGGREGATE_NAMES):
                got = {json.dumps(e) for e in x["dump"][a]}
                want = {json.dumps(e) for e in expected[a]}
                if got != want:
                    diff.append((name, "instance:", sorted(got - want)[:2], "rebuild:",
                                 sorted(want - got)[:2]))
            raise AssertionError(f"{x['role']} {x['seed']} differs from a rebuild: {diff}")
    # Every kind of write happened and touched the shared items.
    with EventStore.open(uri, snapshot=False) as s:
        assert s.verify_aggregates().ok
        kinds = dict(s._conn.execute("SELECT 1, count(*) FROM aggtree_log").fetchall())
        assert kinds[1] > 100


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------


def test_cli_on_postgres(uri):
    """``aggtree demo / stats / verify / snapshot --db postgresql://...``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "aggtree", *argv], capture_output=True,
                              text=True, env=env, timeout=300)

    r = run("demo", "--db", uri, "--users", "50", "--events", "2000", "--follows", "1000",
            "--no-progress", "--runs", "20", "--naive-runs", "2")
    assert r.returncode == 0, r.stderr
    assert "Stats agree: yes" in r.stdout and "warm (snapshot)" in r.stdout
    r = run("stats", "heavy-1", "--db", uri, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["all_time_own"] == 500
    r = run("verify", "--db", uri)
    assert r.returncode == 0 and "no differences" in r.stdout
    r = run("snapshot", "--db", uri)
    assert r.returncode == 1 and "--out is required" in r.stderr
