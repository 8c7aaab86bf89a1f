"""Tests of the event store's backend seam (aggtree.events.backend,
aggtree.events.schema.Dialect, aggtree.events.sqlite): what a second backend
relies on beyond the behaviour tests in test_events.py."""

from __future__ import annotations

import sqlite3

import pytest

from aggtree.events import EventStore
from aggtree.events.backend import Backend, Transaction
from aggtree.events.schema import Dialect
from aggtree.events.sqlite import SQLiteBackend, SQLiteDialect


def statements(dialect: Dialect) -> dict:
    return {name: getattr(dialect, name) for name in dir(type(dialect))
            if not name.startswith("_") and name != "placeholder"
            and isinstance(getattr(dialect, name), str)}


def test_dialect_substitutes_its_placeholder_everywhere():
    class Percent(Dialect):
        placeholder = "%s"

    qmark, percent = statements(Dialect()), statements(Percent())
    assert set(qmark) == set(percent) and len(qmark) > 20
    for name, sql in qmark.items():
        assert "?" not in percent[name], name
        assert percent[name].count("%s") == sql.count("?"), name
    assert qmark["insert_event"].count("?") == 7


def test_sqlite_dialect_runs_every_portable_statement():
    """Every statement of the base dialect prepares on SQLite's schema (a
    typo in a statement no test reaches would show here)."""
    backend = SQLiteBackend(":memory:")
    try:
        for name, sql in statements(SQLiteDialect()).items():
            if name == "schema_version" or name.startswith(("store", "others", "event_tables")):
                continue
            if not sql:  # a statement this dialect does without (the row locks)
                continue
            backend.conn.execute("EXPLAIN " + sql, (0,) * sql.count("?"))
    finally:
        backend.close()


def test_backend_is_abstract():
    with pytest.raises(TypeError):
        Backend()  # type: ignore[abstract]


def test_transaction_commits_rolls_back_and_propagates(tmp_path):
    backend = SQLiteBackend(str(tmp_path / "t.db"))
    try:
        tx = backend.transaction(write=True)
        assert isinstance(tx, Transaction) and tx is backend.transaction(write=True)
        with tx as conn:
            conn.execute("INSERT INTO users (username, created_at) VALUES ('a', 1)")
        assert not backend.conn.in_transaction
        with pytest.raises(ZeroDivisionError):
            with tx as conn:
                conn.execute("INSERT INTO users (username, created_at) VALUES ('b', 1)")
                1 / 0
        assert not backend.conn.in_transaction
        with pytest.raises(sqlite3.IntegrityError):
            with tx as conn:
                conn.execute("INSERT INTO users (username, created_at) VALUES ('c', 1)")
                conn.execute("INSERT INTO users (username, created_at) VALUES ('a', 1)")
        names = [r[0] for r in backend.conn.execute("SELECT username FROM users ORDER BY id")]
        assert names == ["a"]
    finally:
        backend.close()


class FailingCommit:
    def __init__(self, conn) -> None:
        self._conn = conn

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("injected")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_transaction_rolls_back_a_failed_commit(tmp_path):
    backend = SQLiteBackend(str(tmp_path / "t.db"))
    real = backend.conn
    try:
        backend.conn = FailingCommit(real)
        with pytest.raises(sqlite3.OperationalError):
            with backend.transaction(write=True) as conn:
                conn.execute("INSERT INTO users (username, created_at) VALUES ('a', 1)")
        assert not real.in_transaction
        assert real.execute("SELECT count(*) FROM users").fetchone()[0] == 0
    finally:
        backend.conn = real
        backend.close()


def test_change_log_ids_follow_on_across_stores(tmp_path):
    """The log's ids are contiguous and in commit order whichever store
    writes (what catch-up relies on)."""
    path = str(tmp_path / "log.db")
    a, b = EventStore.open(path), EventStore.open(path)
    try:
        u = a.create_user("u")
        for i in range(6):
            (a if i % 2 else b).create_event(u, name=str(i), start=a._clock(), created_at=a._clock())
        ids = [r[0] for r in a._conn.execute("SELECT id FROM aggtree_changes ORDER BY id")]
        assert ids == list(range(ids[0], ids[0] + 6))
        kinds = {r[0] for r in a._conn.execute("SELECT kind FROM aggtree_changes")}
        assert kinds == {"create_event"}
        a.get_user_stats("u")
        b.get_user_stats("u")
        assert a.change_id == b.change_id == ids[-1]
    finally:
        a.close()
        b.close()
