"""The SQLite backend: schema and connection, and how stores sharing a file
notice each other's writes.

SQLite (the standard library's :mod:`sqlite3`; WAL mode for files, foreign
keys on, parameterised SQL only) holds the tables.  Writes are serialised by
``BEGIN IMMEDIATE`` (one writer per file); reads run in a deferred ``BEGIN``,
which in WAL mode sees one snapshot.

Several processes
-----------------
Every store on a file registers itself in ``aggtree_stores`` when it opens
(before loading) and unregisters when it closes.  A writer appends its ops to
the change log only while another store is registered: a store that is alone
pays nothing for the log, and a store that registers later loads every
unlogged write from the tables.  Rows of dead processes on the same host are
dropped at the next open; a stale row only costs logging.

``PRAGMA data_version`` (a cheap, in-memory check per connection) tells a
store whether another connection committed since it last asked: the store
asks it before each read and, under the write lock, before each write
(:meth:`SQLiteBackend.change_token`, :attr:`SQLiteBackend.token_sql`).
"""

from __future__ import annotations

import operator
import os
import secrets
import socket
import sqlite3
import uuid
from typing import Any, Optional

from .backend import Backend, Transaction
from .schema import SCHEMA_VERSION, Dialect, to_ms, utcnow

__all__ = ["SQLiteBackend", "SQLiteDialect", "_connect"]


class SQLiteDialect(Dialect):
    """The portable statements, with SQLite's DDL."""

    schema = (
        """CREATE TABLE IF NOT EXISTS users (
            id          INTEGER PRIMARY KEY,
            username    TEXT    NOT NULL UNIQUE,
            created_at  INTEGER NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS events (
            id          INTEGER PRIMARY KEY,
            user_id     INTEGER NOT NULL REFERENCES users(id),
            name        TEXT    NOT NULL,
            start_time  INTEGER NOT NULL,
            end_time    INTEGER,
            created_at  INTEGER NOT NULL,
            description TEXT,
            location    TEXT
        )""",
        "CREATE INDEX IF NOT EXISTS events_user ON events(user_id)",
        """CREATE TABLE IF NOT EXISTS event_follows (
            user_id     INTEGER NOT NULL REFERENCES users(id),
            event_id    INTEGER NOT NULL REFERENCES events(id) ON DELETE CASCADE,
            created_at  INTEGER NOT NULL,
            PRIMARY KEY (user_id, event_id)
        ) WITHOUT ROWID""",
        "CREATE INDEX IF NOT EXISTS event_follows_event ON event_follows(event_id)",
        # One row per write that changed an aggregate.  INTEGER PRIMARY KEY
        # without AUTOINCREMENT takes max(id) + 1, under the write lock: ids
        # are in commit order, and contiguous because the newest row is
        # never pruned (so max(id) never goes back).
        """CREATE TABLE IF NOT EXISTS aggtree_changes (
            id          INTEGER PRIMARY KEY,
            kind        TEXT    NOT NULL,
            ops         BLOB    NOT NULL
        )""",
        # The EventStores that have this file open: writers append to the
        # change log only while some other store is registered.
        """CREATE TABLE IF NOT EXISTS aggtree_stores (
            id          INTEGER PRIMARY KEY,
            host        TEXT    NOT NULL,
            pid         INTEGER NOT NULL,
            opened_at   INTEGER NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS aggtree_meta (
            name        TEXT PRIMARY KEY,
            value       TEXT NOT NULL
        )""",
        # The warm-start state (aggtree.events.warm): the token of the last
        # snapshot and whether the tables were written outside the change
        # log since.  One row, looked up by rowid in the triggers below.
        """CREATE TABLE IF NOT EXISTS aggtree_state (
            id          INTEGER PRIMARY KEY CHECK (id = 0),
            token       INTEGER NOT NULL,
            dirty       INTEGER NOT NULL,
            position    INTEGER NOT NULL
        )""",
        "INSERT OR IGNORE INTO aggtree_state (id, token, dirty, position) VALUES (0, random(), 1, -1)",
    )
    # Any write that could change an aggregate sets aggtree_state.dirty,
    # whoever makes it.  The WHEN clause reads the (cached) page and writes
    # only on the first such write after a snapshot: a write costs no page
    # more than without the trigger (measured: the unconditional form, one
    # UPDATE per row, costs ~5 us a commit, the size of the whole write).
    _dirty = ("WHEN (SELECT dirty FROM aggtree_state WHERE id = 0) = 0"
              " BEGIN UPDATE aggtree_state SET dirty = 1 WHERE id = 0; END")
    triggers = {
        "aggtree_events_ins": f"AFTER INSERT ON events {_dirty}",
        "aggtree_events_del": f"AFTER DELETE ON events {_dirty}",
        "aggtree_events_upd": (
            "AFTER UPDATE OF id, user_id, start_time, created_at ON events"
            " WHEN (OLD.id IS NOT NEW.id OR OLD.user_id IS NOT NEW.user_id"
            " OR OLD.start_time IS NOT NEW.start_time OR OLD.created_at IS NOT NEW.created_at)"
            " AND " + _dirty[5:]
        ),
        "aggtree_follows_ins": f"AFTER INSERT ON event_follows {_dirty}",
        "aggtree_follows_del": f"AFTER DELETE ON event_follows {_dirty}",
        "aggtree_follows_upd": f"AFTER UPDATE ON event_follows {_dirty}",
    }
    schema_version = "INSERT OR IGNORE INTO aggtree_meta (name, value) VALUES ('schema_version', ?)"
    schema_version_set = "UPDATE aggtree_meta SET value = ? WHERE name = 'schema_version'"
    store_id_init = "INSERT OR IGNORE INTO aggtree_meta (name, value) VALUES ('store_id', ?)"
    warm_state = (
        "SELECT (SELECT value FROM aggtree_meta WHERE name = 'store_id'), token, dirty"
        " FROM aggtree_state WHERE id = 0"
    )
    warm_mark = "UPDATE aggtree_state SET token = ?, dirty = 0, position = ? WHERE id = 0"
    warm_mark_state = "SELECT token, dirty, position FROM aggtree_state WHERE id = 0"
    warm_dirty = "UPDATE aggtree_state SET dirty = 1 WHERE id = 0"
    warm_vouch = "UPDATE aggtree_state SET dirty = 0 WHERE id = 0"
    warm_is_clean = "SELECT dirty = 0 FROM aggtree_state WHERE id = 0"
    triggers_present = "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'aggtree_%'"
    event_tables = (
        "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
        " AND name IN ('users', 'events', 'event_follows')"
    )
    # The registry.
    stores_on_host = "SELECT id, pid FROM aggtree_stores WHERE host = ?"
    store_insert = "INSERT INTO aggtree_stores (host, pid, opened_at) VALUES (?, ?, ?)"
    store_delete = "DELETE FROM aggtree_stores WHERE id = ?"
    others_registered = "SELECT EXISTS (SELECT 1 FROM aggtree_stores WHERE id != ?)"


def _is_memory(path: str) -> bool:
    return path in ("", ":memory:") or path.startswith("file::memory:")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _connect(path: str, timeout: float, synchronous: str) -> sqlite3.Connection:
    """A connection in autocommit mode (the store issues BEGIN / COMMIT),
    foreign keys on; for a file also WAL mode and ``synchronous``."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=timeout, check_same_thread=False)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        if not _is_memory(path):
            conn.execute("PRAGMA journal_mode = WAL")
            if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
                raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
            # Interpolating is safe: the value was just checked against a fixed list.
            conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
    except BaseException:
        conn.close()
        raise
    return conn



class SQLiteBackend(Backend):
    """A SQLite file (or ``:memory:``, private to the store) behind an
    :class:`~aggtree.events.EventStore`.  See the module docstring."""

    integrity_error = sqlite3.IntegrityError
    sql: SQLiteDialect

    def __init__(self, path: str, *, create: bool = True, timeout: float = 30.0,
                 synchronous: str = "NORMAL") -> None:
        """Open the database at ``path``.  ``create=False`` raises
        ``FileNotFoundError`` instead of creating a missing file and
        ``ValueError`` for a database without the event tables (with
        ``create=True`` missing tables are created)."""
        self.path = path
        self.private = _is_memory(path)
        self.sql = SQLiteDialect()
        if not create and not self.private and not os.path.exists(path):
            raise FileNotFoundError(f"no database at {path}")
        self.conn = _connect(path, timeout, synchronous)
        # PRAGMA data_version runs before every write and read: a cursor of
        # its own saves creating one each time (~0.2 us of ~0.9).
        self._version_cursor = self.conn.cursor()
        self.token_cursor = self._version_cursor
        self.token_sql = "PRAGMA data_version"
        self._read = Transaction(self, "BEGIN")
        self._write = Transaction(self, "BEGIN IMMEDIATE")
        self._store_id: Optional[int] = None
        try:
            if not create:
                found = self.conn.execute(self.sql.event_tables).fetchone()[0]
                if found != 3:
                    raise ValueError(f"{path} is not an event database (no users/events/event_follows tables)")
            self.create_schema()
        except BaseException:
            self.conn.close()
            raise

    # -- connections and transactions ----------------------------------------

    def transaction(self, write: bool = False) -> Transaction:
        return self._write if write else self._read

    def rollback(self) -> None:
        conn = self.conn
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def close(self) -> None:
        self.conn.close()

    # cursor.lastrowid, through a C callable: no Python call in the writes.
    inserted_id = staticmethod(operator.attrgetter("lastrowid"))  # type: ignore[assignment]

    def create_schema(self) -> None:
        """The tables, the warm-start state and its triggers (a database of
        an older aggtree gains them, its schema version set to the current
        one; when a trigger was missing, the tables may have been written
        unseen: the dirty flag is set)."""
        q = self.sql
        with self.transaction(write=True) as conn:
            for stmt in q.schema:
                conn.execute(stmt)
            conn.execute(q.schema_version, (str(SCHEMA_VERSION),))
            conn.execute(q.store_id_init, (uuid.uuid4().hex,))
            have = {row[0] for row in conn.execute(q.triggers_present)}
            missing = [name for name in q.triggers if name not in have]
            for name in missing:
                conn.execute(f"CREATE TRIGGER IF NOT EXISTS {name} {q.triggers[name]}")
            if missing:
                conn.execute(q.warm_dirty)
                conn.execute(q.schema_version_set, (str(SCHEMA_VERSION),))

    # -- warm start (aggtree.events.warm) ------------------------------------

    def warm_state(self, conn: Any) -> Optional[tuple]:
        if self.private:
            return None
        store_id, token, dirty = conn.execute(self.sql.warm_state).fetchone()
        return store_id, token, bool(dirty)

    def mark_snapshot(self, conn: Any, position: int) -> tuple:
        token, dirty, at = conn.execute(self.sql.warm_mark_state).fetchone()
        if dirty or at != position:
            token = secrets.randbits(63)
            conn.execute(self.sql.warm_mark, (token, position))
        store_id = conn.execute(self.sql.warm_state).fetchone()[0]
        return store_id, token

    def log_clean(self, conn: Any) -> bool:
        return bool(conn.execute(self.sql.warm_is_clean).fetchone()[0])

    # -- noticing other writers ----------------------------------------------

    def attach(self) -> None:
        """Add this store to ``aggtree_stores`` (and drop the rows of dead
        processes on this host) in one write transaction.  Nothing for
        ``:memory:``."""
        if self.private:
            return
        q = self.sql
        host = socket.gethostname()
        with self.transaction(write=True) as conn:
            for row_id, pid in conn.execute(q.stores_on_host, (host,)).fetchall():
                if not _pid_alive(pid):
                    conn.execute(q.store_delete, (row_id,))
            self._store_id = conn.execute(
                q.store_insert, (host, os.getpid(), to_ms(utcnow()))
            ).lastrowid

    def detach(self) -> None:
        if self._store_id is not None:
            try:
                with self.transaction(write=True) as conn:
                    conn.execute(self.sql.store_delete, (self._store_id,))
            except sqlite3.Error:  # a stale row is cleaned up by the next open
                pass
            self._store_id = None

    def change_token(self) -> Optional[int]:
        if self.private:
            return None
        return self._version_cursor.execute("PRAGMA data_version").fetchone()[0]

    def log_needed(self, conn: Any) -> bool:
        return conn.execute(self.sql.others_registered, (self._store_id,)).fetchone()[0] == 1
