"""The PostgreSQL backend of the event store: :class:`PostgresBackend`.

``EventStore.open("postgresql://...")`` (or an open psycopg connection)
lands here.  The store's hooks, stats, migration and verify are the same
code as on SQLite (:mod:`aggtree.events.store` and its mixins); this module
supplies the dialect, the connection (with reconnects) and the way an
instance hears of other writers.  The building blocks (schema, change log in
commit order, append + COMMIT in one round trip, resolve-by-token, the
change feed, compaction, the drift counter, the warm-start check) are in
:mod:`aggtree.events.pglog`, whose docstring has the design.  psycopg 3 is
imported only when this module is (the ``aggtree[postgres]`` extra).

How it differs from SQLite (docs/EVENTS.md, "PostgreSQL"):

* **Concurrent writers, row locks.**  Writes run under READ COMMITTED, not
  behind one database-wide lock: ``update_event`` and ``delete_event`` lock
  the event row ``FOR UPDATE`` before reading it and its followers (in a
  later statement, which sees follows committed during the wait);
  ``follow_event`` / ``unfollow_event`` read the start ``FOR SHARE`` (never
  from the start cache).  Two writes that touch one aggregate item therefore
  serialise, and the later one derives its ops from the earlier's result.
* **The log is ordered at commit.**  A write that changed an aggregate
  appends its ops as its last statement, in a pipeline with COMMIT
  (:func:`~aggtree.events.pglog.append_commit`); the head row's lock makes
  log positions dense and in commit order.  The writing instance applies
  the rows it missed, then its own ops, after COMMIT succeeded: its
  aggregates change only if the write committed.
* **Other writers** are heard by a :class:`~aggtree.events.pglog.ChangeFeed`
  thread (LISTEN/NOTIFY to wake up, a safety poll every ``poll_interval``
  seconds, reconnect with backoff) that applies committed log rows under the
  store's lock: reads never query the database and never see a write half
  applied.  The lag bound is the feed's: a notification's delivery plus the
  apply, and at worst ``poll_interval`` (a notification lost while the feed
  was reconnecting).
* **Lost connections.**  The backend reconnects on the next use.  A write
  whose COMMIT was in flight is resolved by its token
  (:func:`~aggtree.events.pglog.resolve`): applied exactly once (from the
  log) if it committed, retried if it did not.
* **Warm start**: the snapshot is the instance's own file
  (``snapshot_path=``); its identity is the store id, the log position, the
  log's chain at that position and the drift counter as of the tables the
  aggregates were last built or verified from
  (:func:`~aggtree.events.pglog.check_snapshot`).
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Callable, Optional

import psycopg
from psycopg import errors as pgerrors

from . import pglog
from .backend import Backend, Transaction
from .schema import Dialect, is_postgres_target  # noqa: F401  (re-exported)

__all__ = ["PostgresBackend", "PostgresDialect", "is_postgres_target"]


def _redact(conninfo: str) -> str:
    """The URI without its password (for messages and ``repr``)."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", conninfo)


class PostgresDialect(Dialect):
    """The portable statements with psycopg's placeholders, plus what
    PostgreSQL needs: ``RETURNING id`` on inserts, the row locks of the
    write hooks, the change log of :mod:`~aggtree.events.pglog`."""

    placeholder = "%s"
    insert_user = "INSERT INTO users (username, created_at) VALUES (?, ?) RETURNING id"
    insert_event = (
        "INSERT INTO events (user_id, name, start_time, end_time, created_at,"
        " description, location) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id"
    )
    # The row locks (see the module docstring).
    lock_event = "SELECT 1 FROM events WHERE id = ? FOR UPDATE"
    select_start_locked = "SELECT start_time FROM events WHERE id = ? FOR SHARE"
    # Follow a user that may not exist without aborting the transaction.
    insert_follow_checked = (
        "INSERT INTO event_follows (user_id, event_id, created_at)"
        " SELECT id, ?, ? FROM users WHERE id = ? ON CONFLICT DO NOTHING RETURNING 1"
    )
    event_tables = (
        "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema()"
        " AND tablename IN ('users', 'events', 'event_follows')"
    )
    # The change log (pglog): positions dense and in commit order.
    log_head = "SELECT pos FROM aggtree_head"
    log_after = "SELECT pos, ops FROM aggtree_log WHERE pos > ? ORDER BY pos"
    # Appends and compaction are pglog's (append_commit, compact): unused here.
    log_append = log_prune = log_compact = ""


_READ_BEGIN = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"


class PostgresBackend(Backend):
    """A PostgreSQL database behind an :class:`~aggtree.events.EventStore`
    (see the module docstring).  ``target``: a libpq URI, or an open psycopg
    connection (switched to autocommit; reconnects then use its
    ``info.dsn``, which holds no password: give it through ``PGPASSWORD`` or
    a ``.pgpass`` file)."""

    #: The store takes the concurrent write path (EventStore._write_concurrent).
    concurrent_writers = True
    integrity_error = psycopg.IntegrityError
    connection_errors = (psycopg.OperationalError, psycopg.InterfaceError)
    sql: PostgresDialect

    def __init__(self, target: Any, *, create: bool = True, poll_interval: float = 1.0,
                 reconnect_timeout: float = 30.0) -> None:
        if isinstance(target, str):
            self.conninfo = target
            conn = None
        else:
            conn = target
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                raise ValueError("the connection is inside a transaction: commit or roll back first")
            conn.autocommit = True
            self.conninfo = conn.info.dsn
        self.path = _redact(self.conninfo) if isinstance(target, str) else f"psycopg:{self.conninfo}"
        self.sql = PostgresDialect()
        self.poll_interval = poll_interval
        self.reconnect_timeout = reconnect_timeout
        self._conn: Any = None
        self._identity: Optional[tuple] = None
        self._feed: Optional[pglog.ChangeFeed] = None
        self.on_wake: Optional[Callable[[], Any]] = None
        #: The consumer's applied position (the feed skips notifications at or below it).
        self.applied: Optional[Callable[[], int]] = None
        self.drift_seen: Optional[int] = None
        self.reconnects = 0
        self._read = Transaction(self, _READ_BEGIN)
        self._write = Transaction(self, pglog.BEGIN_WRITE_SQL)
        if conn is None:
            self._connect()
        else:
            self._conn = conn
            self._identity = pglog.backend_identity(conn)
        try:
            if not create:
                found = self._conn.execute(self.sql.event_tables).fetchone()[0]
                if found != 3:
                    raise ValueError(f"{self.path} is not an event database "
                                     "(no users/events/event_follows tables)")
            self.store_id = str(self.create_schema_id())
        except BaseException:
            self._conn.close()
            raise

    # -- connections ----------------------------------------------------------

    def _connect(self) -> Any:
        conn = psycopg.connect(self.conninfo, autocommit=True)
        try:
            self._identity = pglog.backend_identity(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    @property
    def conn(self) -> Any:
        """The connection; a new one when the last was lost."""
        c = self._conn
        if getattr(c, "closed", False):
            self.reconnects += 1
            c = self._connect()
        return c

    @conn.setter
    def conn(self, value: Any) -> None:
        self._conn = value

    def lost(self) -> None:
        """Drop a connection that failed (the next use reconnects)."""
        try:
            self._conn.close()
        except Exception:  # noqa: BLE001 - it is broken anyway
            pass

    def failure_kind(self, exc: BaseException) -> Optional[str]:
        """How the concurrent write path handles an exception: ``"retry"``
        (a deadlock or serialisation failure: the transaction rolled back,
        run the write again), ``"lost"`` (the connection is gone: reconnect;
        the outcome of a COMMIT in flight is unknown) or None (raise)."""
        if isinstance(exc, (pgerrors.DeadlockDetected, pgerrors.SerializationFailure)):
            return "retry"
        if isinstance(exc, self.connection_errors):
            if getattr(self._conn, "closed", True):
                return "lost"
            # The server ends the session (a shutdown, a terminated backend,
            # a connection failure) before libpq may have noticed the EOF.
            state = getattr(exc, "sqlstate", None) or ""
            if state.startswith("08") or state in ("57P01", "57P02", "57P03"):
                return "lost"
        return None

    def transaction(self, write: bool = False) -> Transaction:
        return self._write if write else self._read

    def rollback(self) -> None:
        c = self._conn
        if c is None or getattr(c, "closed", True):
            return
        try:
            if c.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                c.execute("ROLLBACK")
        except self.connection_errors:
            self.lost()

    def close(self) -> None:
        self.detach()
        if self._conn is not None:
            self._conn.close()

    def inserted_id(self, cursor: Any) -> int:
        return cursor.fetchone()[0]

    # -- the schema -------------------------------------------------------------

    def create_schema(self) -> None:
        self.create_schema_id()

    def create_schema_id(self) -> uuid.UUID:
        """:func:`pglog.create_schema` (tables, change log, meta rows, drift
        triggers; idempotent); the store id."""
        return pglog.create_schema(self._conn)

    # -- writes -----------------------------------------------------------------

    def append_commit(self, conn: Any, ops: bytes, token: uuid.UUID, after: int) -> pglog.Appended:
        """The append and COMMIT in one round trip
        (:func:`pglog.append_commit_simple`)."""
        return pglog.append_commit_simple(conn, ops, token, after)

    def resolve(self, token: uuid.UUID) -> Optional[int]:
        """After a connection error during COMMIT: reconnect and tell
        whether the write with ``token`` committed (its log position) or not
        (None).  The old server process is waited for first."""
        old = self._identity
        self.lost()
        conn = self.conn
        return pglog.resolve(conn, token, old_backend=old, timeout=self.reconnect_timeout)

    def compact_log(self, keep: int) -> int:
        return pglog.compact(self.conn, keep)

    # -- noticing other writers ---------------------------------------------------

    def attach(self) -> None:
        """Start the change feed (its thread calls :attr:`on_wake`)."""
        if self._feed is None:
            self._feed = pglog.ChangeFeed(self.conninfo, self._wake,
                                          poll_interval=self.poll_interval,
                                          applied=self.applied, own_pid=self._writer_pid).start()

    def _writer_pid(self) -> Optional[int]:
        """The server process id of the writing connection (the feed pauses
        while it hears only that process's commits)."""
        identity = self._identity
        return None if identity is None else identity[0]

    def _wake(self) -> None:
        if self.on_wake is not None:
            self.on_wake()

    def feed_news(self, position: int) -> bool:
        """Whether the feed's current wake may bring rows after
        ``position``: False only when it was woken by notifications alone,
        all of positions at or before it (the writer's own commits)."""
        feed = self._feed
        return feed is None or feed.wake_reason != "notify" or feed.notified_max > position

    def feed_query(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(conn)`` on the feed's query connection (reconnected
        when broken), or on the main one without a feed."""
        if self._feed is None:
            return fn(self.conn)
        return self._feed._query(fn)

    def detach(self) -> None:
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.close()

    def change_token(self) -> int:
        # Other writers' rows are applied by the feed thread: reads never
        # poll (the lag is the feed's).  A constant.
        return 0

    def log_needed(self, conn: Any) -> bool:
        return True

    # -- warm start ---------------------------------------------------------------

    def read_drift(self, conn: Any) -> Optional[int]:
        return pglog.drift(conn)

    def warm_state(self, conn: Any) -> tuple:
        # The token / dirty scheme of SQLite does not apply (snapshots are
        # per instance; check_warm decides): never "unchanged since".
        return self.store_id, None, True

    def mark_snapshot(self, conn: Any, position: int) -> tuple:
        chain = pglog.chain_at(conn, position)
        if chain is None or self.drift_seen is None:
            raise RuntimeError(f"no chain at log position {position} (compacted meanwhile)")
        return self.store_id, {"chain": chain.hex(), "drift": self.drift_seen}

    def check_warm(self, conn: Any, header: dict) -> Optional[str]:
        """Inside a read transaction: None if the snapshot with this header
        reflects this database's history (then the log after its position
        is replayed), else why not."""
        token: Any = header.get("token")
        try:
            sid = uuid.UUID(str(header["store_id"]))
            chain = bytes.fromhex(token["chain"])
            drift = int(token["drift"])
        except (TypeError, ValueError, KeyError):
            return "not a snapshot of a PostgreSQL store"
        check = pglog.check_snapshot(conn, sid, int(header["position"]), chain, drift)
        if not check.usable:
            return check.reason
        if check.drifted:
            return "the tables were written outside the store since the snapshot (drift counter)"
        self.drift_seen = drift
        return None

    log_clean = staticmethod(lambda conn: False)

