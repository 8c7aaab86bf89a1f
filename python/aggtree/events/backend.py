"""The seam between the event store and a database: :class:`Backend`.

The store, its write hooks, the stats, the migration and verify are written
once, against this class; a backend supplies only

* its SQL dialect (:attr:`Backend.sql`, a :class:`~aggtree.events.schema.Dialect`
  subclass: placeholders, DDL, upsert syntax, ``RETURNING``, locking clauses),
* its connection and transactions (:meth:`Backend.transaction`, with the
  guarantees stated there),
* its way of noticing other writers (:meth:`Backend.change_token`,
  :attr:`Backend.token_sql`, :meth:`Backend.attach`, :meth:`Backend.log_needed`),
* the warm-start state (:meth:`Backend.warm_state`,
  :meth:`Backend.mark_snapshot`, :meth:`Backend.log_clean` and the dialect's
  ``warm_vouch``), see below.

:class:`~aggtree.events.sqlite.SQLiteBackend` and
:class:`~aggtree.events.postgres.PostgresBackend` implement it.  The rules
below are those of a backend with serialised writers (SQLite); a backend
with ``concurrent_writers = True`` (PostgreSQL) keeps the log's ids dense
and in commit order by other means (:mod:`aggtree.events.pglog`), and the
store then takes its concurrent write path (``EventStore._write_concurrent``:
row locks in the hooks, log append with COMMIT, apply after COMMIT).

What the store relies on
------------------------
The change log (table ``aggtree_changes(id, kind, ops)``) is how a store
learns what other connections wrote.  Its ids must be **in commit order and
contiguous**: a row appended by a write that commits after another's has the
next id, ids are never reused, and pruning deletes only a prefix and never
the newest row (so ``max(id)`` never goes back).  A store remembers the id
of the last row its aggregates reflect (``change_id``), replays rows
``change_id + 1, change_id + 2, ...`` in order, and takes a gap (pruned rows)
or a head below ``change_id`` (a replaced database) as "reload from the
tables".

Write transactions are **serialised**: between the start of one (once its
``begin`` statement has run) and its commit no other write transaction on
the database commits.  The store relies on that three ways: the catch-up it does at the
start of a write is exact (the tables the write reads are those the
aggregates then reflect, so the ops it derives are right); the start-time
cache it reads instead of ``SELECT start_time`` is current; and the id it
appends to the log is ``head + 1``.  SQLite gets this from ``BEGIN
IMMEDIATE`` (one writer per file).  A PostgreSQL backend must take one lock
that every writer of the database takes first (for instance
``SELECT pg_advisory_xact_lock(<constant>)`` right after ``BEGIN``, or
``SELECT ... FOR UPDATE`` of a one-row head table), and must assign log ids
itself under that lock (``head + 1``), never from a sequence: sequence
values are handed out at insert, not at commit, so a reader polling
``id > last`` could skip a row that commits late.  (The PostgreSQL backend
does not serialise whole writes: see above.)

Warm start
----------
The snapshot container and the decision at open are backend-neutral
(:mod:`aggtree.events.warm`).  A backend keeps, in the database:

* a **store id**, a random uuid set once when the schema is created (an
  older database gets one at its first open);
* a **token** (a 63-bit int) that :meth:`Backend.mark_snapshot` sets to a
  fresh random value, and a **dirty flag** it clears, in the snapshot's
  write transaction, with the change-log position they were set at;
* **triggers** that set the dirty flag on every write to ``events`` or
  ``event_follows`` that could change an aggregate (insert, delete, an
  update of ``id``, ``user_id``, ``start_time``, ``created_at``; cascaded
  deletes included), whoever writes.  They must cost the write path next
  to nothing: set the flag only when it is clear (SQLite: ``FOR EACH ROW
  ... WHEN (SELECT dirty ...) = 0``; PostgreSQL: ``FOR EACH STATEMENT``
  triggers doing ``UPDATE aggtree_state SET dirty = true WHERE NOT dirty``,
  which writes no row version when the flag is already set);
* the dialect statement ``warm_vouch`` (clear the flag), which a store runs
  after appending its write to the change log when the flag was clear
  before the write (:meth:`Backend.log_clean`, asked under the write lock
  whenever the write token moved): the log then holds every write since the
  snapshot, and the next open replays it.

A backend without these returns None from :meth:`Backend.warm_state`: its
stores always load from the tables.

Read transactions see **one snapshot** of every table: SQLite's deferred
``BEGIN`` in WAL mode; PostgreSQL ``BEGIN ISOLATION LEVEL REPEATABLE READ``
(READ COMMITTED gives each statement its own snapshot).  The stats' naive
path, the bulk load, the migration's batches and verify read in one.
"""

from __future__ import annotations

import abc
import itertools
from typing import Any

import numpy as np

from .schema import Dialect

__all__ = ["Backend", "Transaction"]


class Transaction:
    """The one transaction helper: a reusable context manager that runs the
    ``begin`` statement on entry and returns the connection, commits on a
    clean exit, and rolls back (:meth:`Backend.rollback`) when the block
    raises or the commit fails; the exception propagates.

    A backend keeps one instance per kind (read, write) and hands it out from
    :meth:`Backend.transaction`: entering costs one ``execute``, no
    allocation.  Not re-entrant: the store never nests transactions (it
    holds its lock around each)."""

    __slots__ = ("_backend", "begin")

    def __init__(self, backend: "Backend", begin: str) -> None:
        self._backend = backend
        #: What opens the transaction, run in one ``execute``.  The store's
        #: write path runs it directly (see ``EventStore._write``), so a
        #: backend that needs more than one statement puts them in this one
        #: string if its driver allows (psycopg does, without parameters).
        self.begin = begin

    def __enter__(self) -> Any:
        conn = self._backend.conn
        conn.execute(self.begin)
        return conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            try:
                self._backend.conn.execute("COMMIT")
            except BaseException:
                self._backend.rollback()
                raise
        else:
            self._backend.rollback()


class Backend(abc.ABC):
    """A database the event store keeps its tables in.  One backend object
    per store; it owns one connection (:attr:`conn`) that the store uses
    under its own lock, from any thread.

    Attributes every backend sets:

    * ``sql``: its :class:`~aggtree.events.schema.Dialect` instance;
    * ``conn``: the connection; ``conn.execute(sql, params)`` returns a
      cursor with ``fetchone``, ``fetchall``, ``rowcount`` and iteration
      (sqlite3 and psycopg 3 connections both do).  Tests replace it with a
      wrapper to inject failures, so read it at each use;
    * ``integrity_error``: the exception class a constraint violation
      (unique, foreign key) raises from ``execute``;
    * ``private``: True when no other connection can ever see this database
      (SQLite ``:memory:``): the store then skips the change log, the
      registry and every poll;
    * ``path``: what the store was opened on, for messages and ``repr``.
    """

    sql: Dialect
    conn: Any
    integrity_error: type = Exception
    private: bool = False
    path: str = ""
    #: False: writers are serialised (the store's write path of SQLite,
    #: ``EventStore._write``).  True: writers run at once under row locks
    #: and append to the log at commit (PostgreSQL,
    #: ``EventStore._write_concurrent``); such a backend also provides
    #: ``failure_kind``, ``append_commit``, ``resolve``, ``lost`` and
    #: ``feed_query`` (see :mod:`aggtree.events.postgres`).
    concurrent_writers: bool = False
    #: Exceptions that mean "the connection was lost" (none for SQLite).
    connection_errors: tuple = ()
    #: The drift counter as of the tables the aggregates were last built or
    #: verified from (:meth:`read_drift`; None where there is none).
    drift_seen: Any = None
    #: ``check_warm(conn, header) -> Optional[str]``: a backend whose
    #: snapshots are per instance (PostgreSQL) decides there whether a
    #: snapshot may be loaded (None) or why not; None here: the token and
    #: dirty flag of :meth:`warm_state` decide.
    check_warm: Any = None

    # -- connections and transactions ----------------------------------------

    @abc.abstractmethod
    def transaction(self, write: bool = False) -> Transaction:
        """The :class:`Transaction` (a context manager yielding the
        connection) for one transaction.  ``write=True``: a write
        transaction, serialised with every other writer of the database as
        the module docstring says; ``write=False``: a read transaction over
        one snapshot.  On a clean exit it commits; if the block raises (or
        the commit fails) it rolls back and the exception propagates.  The
        store's write path runs the write one's ``begin`` itself, then
        ``COMMIT`` or :meth:`rollback`, so both must be all it takes."""

    @abc.abstractmethod
    def rollback(self) -> None:
        """Roll back the open transaction of :attr:`conn`, if any (a no-op
        outside one, so it is safe in every error path)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection.  Idempotent."""

    # -- statements with driver-specific results ----------------------------

    @abc.abstractmethod
    def inserted_id(self, cursor: Any) -> int:
        """The id of the row that the ``INSERT`` just run on ``cursor``
        created (``insert_user``, ``insert_event``, ``log_append``).  SQLite:
        ``cursor.lastrowid``; PostgreSQL: those statements end in
        ``RETURNING id``, so ``cursor.fetchone()[0]``."""

    def read_matrix(self, conn: Any, sql: str, width: int, params: Any = ()) -> np.ndarray:
        """Stream an all-integer query into an ``(n, width)`` int64 array
        without building a list of rows (cheaper than ``fetchall``).  A
        backend whose driver has a faster bulk path (PostgreSQL's binary
        ``COPY``) may override it."""
        flat = np.fromiter(itertools.chain.from_iterable(conn.execute(sql, params)), dtype=np.int64)
        return flat.reshape(-1, width)

    def compact_log(self, keep: int) -> int:
        """Delete all but the newest ``keep`` change-log rows (never the
        newest), in one write transaction; the number deleted."""
        q = self.sql
        with self.transaction(write=True) as conn:
            top = conn.execute(q.log_head).fetchone()[0]
            cur = conn.execute(q.log_compact, (top - keep, top))
        return cur.rowcount

    def read_drift(self, conn: Any) -> Any:
        """Inside a read transaction: the drift counter (writes that bypassed
        the store), or None if the backend keeps none."""
        return None

    # -- the schema ------------------------------------------------------------

    @abc.abstractmethod
    def create_schema(self) -> None:
        """Create the tables, indexes and change log if they are missing
        (``sql.schema``), and the ``schema_version`` row, in one write
        transaction.  Idempotent."""

    # -- noticing other writers ----------------------------------------------

    @abc.abstractmethod
    def attach(self) -> None:
        """Announce this store to the other writers, before it loads: from
        the end of this call every write committed by another store appears
        in the change log (or the backend otherwise guarantees that this
        store's next catch-up sees it).  SQLite: a row in the registry
        ``aggtree_stores``; PostgreSQL: ``LISTEN`` on the change channel
        (its writers always log)."""

    @abc.abstractmethod
    def detach(self) -> None:
        """Undo :meth:`attach` (best effort: a stale announcement may only
        cost other writers some logging).  Idempotent."""

    @abc.abstractmethod
    def change_token(self) -> Any:
        """A cheap check before each read (no round trip if the driver
        allows): a value that differs from the one returned before whenever
        another connection may have committed a change since.  Equal values
        promise that the change log has no row the store has not seen; the
        store then skips reading it.  The value may lag a commit by a
        bounded delay (the read then sees the state before that commit; this
        delay is the instances' lag).  SQLite: ``PRAGMA data_version``;
        PostgreSQL: a count of the notifications received (drain
        ``conn.notifies()`` without blocking; a trigger on
        ``aggtree_changes`` can send them, delivered only at commit, and
        since NOTIFY is not durable the log stays the source of truth).  A backend that cannot tell
        returns a new ``object()`` each time (always poll the log)."""

    #: The write token: ``token_cursor.execute(token_sql).fetchone()[0]``,
    #: run inside a write transaction once its lock is held.  It must have
    #: no lag: its value differs from every value it returned before any
    #: commit of another writer that precedes this transaction.  When it
    #: moved, the store catches up from the log and remembers the value as
    #: both its write and its read token (a backend whose two tokens differ
    #: in kind pays one extra poll on the next read).  A statement rather
    #: than a method because it runs in every write, where one more Python
    #: call costs as much as the check itself.  SQLite: a cursor of its own
    #: and ``PRAGMA data_version``; PostgreSQL: a cursor and ``sql.log_head``
    #: (a notification from a writer that committed just before our lock may
    #: not have arrived yet).
    token_cursor: Any = None
    token_sql: str = ""

    @abc.abstractmethod
    def log_needed(self, conn: Any) -> bool:
        """Inside a write transaction: whether writes must append their ops
        to the change log.  Asked again whenever the write token changes.
        SQLite: only while another store is registered (a store alone pays
        nothing for the log, and a store that attaches later loads every
        unlogged write from the tables); PostgreSQL: always."""

    # -- warm start (aggtree.events.warm; see the module docstring) ----------

    def warm_state(self, conn: Any) -> Any:
        """Inside a transaction: ``(store_id, token, dirty)`` of the
        database, or None if this backend keeps no warm-start state (then
        every open loads from the tables)."""
        return None

    def mark_snapshot(self, conn: Any, position: int) -> tuple:
        """Inside a write transaction, caught up to change-log ``position``:
        set a fresh random token, clear the dirty flag and record
        ``position`` with them; returns ``(store_id, token)``.  When the
        flag is clear and the recorded position is ``position`` (nothing
        changed since the token was set), keep the token instead: snapshots
        of one state (say, two paths) then both stay usable.  Never keep it
        after a log row was appended: a backup restored from between two
        snapshots and then written to would match the later one."""
        raise NotImplementedError("this backend keeps no warm-start state")

    def log_clean(self, conn: Any) -> bool:
        """Inside a write transaction: whether the dirty flag is clear."""
        return False
