"""Tests of the ``aggtree`` command line, run as ``python -m aggtree`` in a
subprocess: demo, init, stats, verify, and the one-line user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from aggtree.events import EventStore, generate_dataset

T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)


def run(*args, check_ok=None):
    proc = subprocess.run(
        [sys.executable, "-m", "aggtree", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if check_ok is True:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_user_error(proc, *fragments):
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("aggtree: error:")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli") / "events.db")
    generate_dataset(path, users=20, events=400, follows=300, seed=7, now=T0)
    return path


def test_help():
    proc = run("--help", check_ok=True)
    for command in ("demo", "init", "stats", "verify", "snapshot"):
        assert command in proc.stdout
    proc = run()
    assert proc.returncode == 2  # argparse: a command is required


def test_demo_small(tmp_path):
    path = str(tmp_path / "demo.db")
    proc = run(
        "demo", "--db", path, "--users", "40", "--events", "3000", "--follows", "1500",
        "--runs", "20", "--naive-runs", "2", check_ok=True,
    )
    out = proc.stdout
    assert "Stats agree: yes" in out
    assert "heavy-1" in out and "p50" in out and "p99" in out and "speed-up" in out
    assert "verify: no differences" in out
    # Not a terminal: the migration reports progress as log lines.
    assert "initialize aggregates:" in proc.stderr
    # The demo refuses to overwrite.
    assert_user_error(run("demo", "--db", path), "already exists")


def test_init_then_stats_and_verify(db):
    proc = run("init", "--db", db, "--batch-size", "64", check_ok=True)
    assert "400 events" in proc.stdout and "verify: no differences" in proc.stdout
    # Run twice: idempotent.
    proc = run("init", "--db", db, "--no-progress", check_ok=True)
    assert proc.stderr == ""

    store = EventStore.open(db)
    want = store.get_user_stats_naive("heavy-1", now=T0).to_dict()
    store.close()
    proc = run("stats", "heavy-1", "--db", db, "--now", T0.isoformat(), "--json", check_ok=True)
    got = json.loads(proc.stdout)
    assert got["username"] == "heavy-1"
    assert {k: got[k] for k in want} == want
    proc = run("stats", "heavy-1", "--db", db, "--now", "2024-05-01T12:00:00", "--json", "--naive", check_ok=True)
    assert {k: json.loads(proc.stdout)[k] for k in want} == want  # naive ISO = UTC
    proc = run("stats", "heavy-1", "--db", db, "--now", "2024-05-01T12:00:00Z", check_ok=True)
    assert "captures this week" in proc.stdout and f"{want['all_time_events']}" in proc.stdout

    proc = run("verify", "--db", db, check_ok=True)
    assert "no differences" in proc.stdout
    proc = run("verify", "--db", db, "--json", "--repair", check_ok=True)
    report = json.loads(proc.stdout)
    assert report["ok"] and report["checked"]["events_by_creation"] == 400


def test_user_errors(db, tmp_path):
    missing = str(tmp_path / "nope.db")
    assert_user_error(run("stats", "heavy-1", "--db", missing), "database not found", missing)
    assert_user_error(run("verify", "--db", missing), "database not found")
    assert_user_error(run("stats", "nobody", "--db", db), "unknown user", "nobody")
    assert_user_error(run("stats", "heavy-1", "--db", db, "--now", "yesterday"), "bad date", "yesterday")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    assert_user_error(run("stats", "heavy-1", "--db", str(junk)))
    other = tmp_path / "other.db"
    import sqlite3

    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    assert_user_error(run("verify", "--db", str(other)), "not an event database")
    assert_user_error(run("init", "--db", str(tmp_path / "no" / "such" / "dir.db")), "directory not found")
    proc = run("demo", "--events", "x")
    assert proc.returncode == 2 and "not an integer" in proc.stderr


def test_snapshot_command(tmp_path):
    path = str(tmp_path / "snap.db")
    generate_dataset(path, users=10, events=200, follows=100, seed=3, now=T0)
    out = run("snapshot", "--db", path, check_ok=True).stdout
    assert "from the tables" in out and path + ".aggtree-snapshot" in out
    assert os.path.getsize(path + ".aggtree-snapshot") > 0
    out = run("snapshot", "--db", path, check_ok=True).stdout
    assert "from the snapshot" in out
    other = str(tmp_path / "else.snap")
    out = run("snapshot", "--db", path, "--out", other, check_ok=True).stdout
    assert other in out and os.path.exists(other)
    for snap in (None, other):  # one state, two files: both usable
        with EventStore.open(path, snapshot_path=snap) as store:
            assert store.loaded_from == "snapshot"
            assert store.verify_aggregates().ok
    assert_user_error(run("snapshot", "--db", str(tmp_path / "nope.db")), "database not found")
