"""The store: :class:`EventStore`, its transactional writes and the write
hooks that keep the aggregates in step with the tables.

Each write is one database transaction (:meth:`EventStore._write`).  Inside
it the SQL runs first and yields a list of aggregate ops (add / remove /
move an item, :mod:`aggtree.events.oplog`); the ops are appended to the
change log (if other stores need it), then applied to the aggregates, and
the transaction commits last.  If applying an op or the commit raises, the
ops already applied are undone and the transaction is rolled back, so the
tables and the aggregates never disagree.  Live writes use the idempotent
forms (``upsert``, ``delete_if_exists``), which is what lets a backfill
(:meth:`EventStore.initialize_aggregates`) run next to them.

``follow_event`` and ``unfollow_event`` need the event's start time (the key
of the follower's ``followed_events_by_start`` item).  A start-time cache by
event id (:class:`~aggtree.events.oplog.StartCache`), moved by the same ops
as ``events_by_start`` and undone with them, answers that without a SELECT;
an event it does not hold is read from the table.  SQL that changes
``start_time`` behind the store's back is drift like any other:
:meth:`EventStore.verify_aggregates` reports it and refills the cache.

The class is assembled from one mixin per concern (sync, stats, migration,
verify, each in its module) and talks to the database only through its
:class:`~aggtree.events.backend.Backend`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from datetime import datetime
from typing import Any, Callable, Optional, Sequence

from .. import Aggregate
from ..table import TableAggregate
from .backend import Backend
from .migrate import MigrationMixin
from .oplog import ADD, KEY_IS_NONE, MOVE, REMOVE, StartCache, decode, encode, pick_apply_ops, undo_ops
from .schema import (
    AGGREGATE_NAMES,
    BY_CREATION,
    BY_START,
    FOLLOWED_BY_START,
    FOLLOWS,
    _UNSET,
    check_id,
    check_text,
    is_postgres_target,
    to_ms,
    utcnow,
)
from .sqlite import SQLiteBackend
from .stats import StatsMixin
from .sync import NeedReload, SyncMixin
from .verify import VerifyMixin
from .warm import WarmMixin, default_path

__all__ = ["EventStore"]

log = logging.getLogger("aggtree.events")


def _doc_id(doc: Any) -> Any:
    return doc["id"]


def _doc_user(doc: Any) -> Any:
    return doc["user_id"]


def _doc_created(doc: Any) -> Any:
    return doc["created_at"]


def _doc_start(doc: Any) -> Any:
    return doc["start_time"]


def _doc_event(doc: Any) -> Any:
    return doc["event_id"]


def _doc_none(doc: Any) -> None:
    return None


def _table_aggregates(aggs: list) -> list:
    """The four TableAggregates over four Aggregates.  Event documents are
    dicts with ``id``, ``user_id``, ``created_at``, ``start_time`` (as
    :meth:`EventStore.get_event` returns); follow documents have ``user_id``
    (the follower), ``event_id`` and ``start_time`` (the event's)."""
    return [
        TableAggregate(sort_key=_doc_created, id=_doc_id, namespace=_doc_user, aggregate=aggs[0]),
        TableAggregate(sort_key=_doc_start, id=_doc_id, namespace=_doc_user, aggregate=aggs[1]),
        TableAggregate(sort_key=_doc_none, id=_doc_event, namespace=_doc_user, aggregate=aggs[2]),
        TableAggregate(sort_key=_doc_start, id=_doc_event, namespace=_doc_user, aggregate=aggs[3]),
    ]


class EventStore(SyncMixin, WarmMixin, StatsMixin, MigrationMixin, VerifyMixin):
    """Users, events and follows in a database (SQLite today), with the four
    per-user aggregates in memory (see :mod:`aggtree.events`).  Create one
    with :meth:`open`.

    All methods are thread-safe (one lock per store); for several processes,
    open one store per process on the same file.  Close a store (or use it
    as a context manager) when done: while it is open, writers in other
    processes keep a change log for it.

    The aggregates are public attributes (:class:`~aggtree.TableAggregate`):
    :attr:`events_by_creation`, :attr:`events_by_start`,
    :attr:`event_follows` and :attr:`followed_events_by_start`.  Read them;
    write only through the store.

    Warm start: :meth:`close` (and :meth:`snapshot`) write a snapshot of
    the aggregates next to the database (:attr:`snapshot_path`), and
    :meth:`open` loads it when it reflects the database's state;
    :attr:`loaded_from` says how the store opened (``"snapshot"``,
    ``"snapshot+log"``, ``"tables"``, or None for ``load=False``).  See
    :mod:`aggtree.events.warm`.

    Diagnostics: :attr:`reloads` counts full reloads from the tables,
    :attr:`changes_replayed` the change-log rows replayed from other
    processes, and :attr:`change_id` is the last change-log row the
    aggregates reflect.
    """

    def __init__(self, backend: Backend, *, node_size: int, change_log_keep: int,
                 clock: Callable[[], datetime], aggregate_class: Any = None) -> None:
        # Use EventStore.open().
        self._cls = aggregate_class if aggregate_class is not None else Aggregate
        self._backend = backend
        self._sql = backend.sql
        self._begin_write = backend.transaction(write=True).begin  # (see _write)
        self._private = backend.private  # (read in every write)
        self.path = backend.path
        self._node_size = node_size
        self._keep = change_log_keep
        self._prune_every = max(1, min(1000, change_log_keep))
        self._clock = clock
        self._lock = threading.RLock()
        self._user_ids: dict = {}
        self._data_version = None   # change token the aggregates reflect (reads)
        self._write_version = None  # ... when the writer last checked log and registry
        self._shared = not backend.private  # another store may be open: log every write
        self._stale = False
        self._migration: Optional[dict] = None
        self._set_aggregates([self._cls(node_size=node_size) for _ in range(4)])
        self._starts = StartCache()  # event id -> start_time (follow / unfollow)
        self.change_id = 0
        self.reloads = 0
        self.changes_replayed = 0
        self.snapshot_path: Optional[str] = None
        self.loaded_from: Optional[str] = None
        self._complete = False  # the aggregates hold every row (a snapshot may be taken)
        self._vouch = False  # logged writes clear the dirty flag (warm.py)
        self._snapshot_token = None
        self._closed = False
        self._ready = False  # loaded: the change feed may apply rows (PostgreSQL)
        self._concurrent = backend.concurrent_writers

    # -- opening and closing --------------------------------------------

    @classmethod
    def open(
        cls,
        path: str = ":memory:",
        *,
        load: bool = True,
        create: bool = True,
        node_size: int = 64,
        change_log_keep: int = 10_000,
        clock: Optional[Callable[[], datetime]] = None,
        timeout: float = 30.0,
        synchronous: str = "NORMAL",
        aggregate_class: Any = None,
        snapshot: bool = True,
        snapshot_path: Optional[str] = None,
        poll_interval: float = 1.0,
    ) -> "EventStore":
        """Open (or create) the database at ``path`` (``":memory:"`` works)
        and load the aggregates from its tables in bulk.

        ``load=False`` leaves the aggregates empty, for a backfill with
        :meth:`initialize_aggregates` (live writes keep them right for the
        rows they touch meanwhile).  ``create=False`` raises
        ``FileNotFoundError`` instead of creating a missing file and
        ``ValueError`` for a database without the event tables (with
        ``create=True`` the missing tables are created, so an existing
        database of the original app gains the change log).
        ``change_log_keep`` is how many change-log rows writers keep for
        other processes to catch up from; ``clock`` (returning an aware
        datetime) replaces the wall clock for ``created_at`` defaults and
        ``now``; ``timeout`` is SQLite's busy timeout in seconds;
        ``synchronous`` is SQLite's ``PRAGMA synchronous`` for files (WAL
        mode: ``NORMAL`` survives application crashes, ``FULL`` also power
        loss); ``aggregate_class`` replaces :class:`aggtree.Aggregate` (for
        instance with ``aggtree.reference.Aggregate``).

        Warm start: with ``snapshot=True`` (default) and a file database,
        the store loads the snapshot at ``snapshot_path`` (default
        ``path + ".aggtree-snapshot"``) when it reflects the database's
        current state, replaying the change log after it when that covers
        the gap, and :meth:`close` writes it; :attr:`loaded_from` tells
        which way the store opened, and a log line (logger
        ``aggtree.events``) why not warm.  ``snapshot=False``: no snapshot
        read or written.

        Loading from the tables reads each table once and builds every
        aggregate with ``Aggregate.from_arrays``: O(n log n), no per-row
        inserts.

        PostgreSQL: ``path`` is a libpq URI (``postgresql://...``) or an
        open psycopg connection (the store then owns it: switched to
        autocommit, closed by :meth:`close`; reconnects use its
        ``info.dsn``).  Needs the ``aggtree[postgres]`` extra.  Each
        instance holds its own aggregates; other instances' writes are
        applied by a background thread within the lag of a notification (at
        worst ``poll_interval`` seconds; :meth:`catch_up` waits for none).
        The snapshot is per instance: only with ``snapshot_path`` given.
        ``timeout`` is there how long a write (or :meth:`catch_up`) keeps
        reconnecting to a lost server before it raises; ``synchronous`` is
        SQLite's and ignored.  See :mod:`aggtree.events.postgres`.
        """
        pg = is_postgres_target(path)
        if not pg and not isinstance(path, str):
            path = os.fspath(path)
        if isinstance(node_size, bool) or not isinstance(node_size, int):
            raise TypeError("node_size must be an int")
        if isinstance(change_log_keep, bool) or not isinstance(change_log_keep, int) or change_log_keep < 1:
            raise ValueError("change_log_keep must be a positive int")
        if snapshot_path is not None:
            snapshot_path = os.fspath(snapshot_path)
            if not isinstance(snapshot_path, str):
                raise TypeError("snapshot_path must be a str or os.PathLike of str")
        backend: Backend
        if pg:
            from .postgres import PostgresBackend  # imports psycopg: only here

            backend = PostgresBackend(path, create=create, poll_interval=poll_interval,
                                      reconnect_timeout=timeout)
            if not snapshot:
                snapshot_path = None
        else:
            backend = SQLiteBackend(path, create=create, timeout=timeout, synchronous=synchronous)
        if pg:
            pass  # the snapshot is the instance's own: only where snapshot_path says
        elif snapshot and not backend.private:
            snapshot_path = snapshot_path if snapshot_path is not None else default_path(path)
        else:
            snapshot_path = None
        return cls._open_backend(backend, load=load, node_size=node_size,
                                 change_log_keep=change_log_keep, clock=clock,
                                 aggregate_class=aggregate_class, snapshot_path=snapshot_path)

    @classmethod
    def _open_backend(cls, backend: Backend, *, load: bool, node_size: int, change_log_keep: int,
                      clock: Optional[Callable[[], datetime]], aggregate_class: Any,
                      snapshot_path: Optional[str] = None) -> "EventStore":
        """A store on an open backend whose schema exists: attach it to the
        other stores (before loading: later writers log for it), then load
        (or, with ``load=False``, start at the log's head).  Closes the
        backend if anything fails."""
        store = None
        try:
            store = cls(backend, node_size=node_size, change_log_keep=change_log_keep,
                        clock=clock or utcnow, aggregate_class=aggregate_class)
            store.snapshot_path = snapshot_path
            if backend.concurrent_writers:
                backend.on_wake = store._feed_wake  # type: ignore[attr-defined]
                backend.applied = store._applied  # type: ignore[attr-defined]
            with store._lock:  # the feed applies nothing before the load is done
                backend.attach()
                store._write_version = None
                if load:
                    store._load_warm()
                else:
                    store._data_version = backend.change_token()
                    with backend.transaction() as conn:
                        store.change_id = conn.execute(store._sql.log_head).fetchone()[0]
                store._ready = True
        except BaseException:
            if store is not None:
                store.close()  # detaches
            else:
                backend.close()
            raise
        return store

    def close(self, *, snapshot: bool = True) -> None:
        """Write the snapshot (unless ``snapshot=False``, the state is that
        of the last one, the aggregates are incomplete or snapshots are off;
        a failure to write it is logged, not raised), unregister and close
        the database connection (the aggregates stay readable).
        Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if snapshot:
                    self._close_snapshot()
            self._backend.detach()
            self._backend.close()

    def __enter__(self) -> "EventStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(t)}" for name, t in zip(AGGREGATE_NAMES, self._tables))
        return f"<EventStore {self.path!r}: {sizes}>"

    @property
    def _conn(self) -> Any:
        """The backend's connection (tests read the tables through it, and
        replace it to inject failures)."""
        return self._backend.conn

    @_conn.setter
    def _conn(self, conn: Any) -> None:
        self._backend.conn = conn

    # -- the aggregates ---------------------------------------------------

    @property
    def events_by_creation(self) -> TableAggregate:
        """Own events: namespace owner id, key ``created_at`` (ms), id event id."""
        return self._tables[BY_CREATION]

    @property
    def events_by_start(self) -> TableAggregate:
        """Own events: namespace owner id, key ``start_time`` (ms), id event id."""
        return self._tables[BY_START]

    @property
    def event_follows(self) -> TableAggregate:
        """Follows: namespace follower id, key ``None``, id event id."""
        return self._tables[FOLLOWS]

    @property
    def followed_events_by_start(self) -> TableAggregate:
        """Followed events: namespace follower id, key the event's
        ``start_time`` (ms), id event id."""
        return self._tables[FOLLOWED_BY_START]

    # -- applying ops -------------------------------------------------------

    def _set_aggregates(self, aggs: list) -> None:
        """Install four Aggregates (indexed like the ops) behind the
        TableAggregates, and pick the loop that applies ops to them."""
        self._tables: list = _table_aggregates(aggs)
        self._aggs = list(aggs)
        self._apply_ops = pick_apply_ops(aggs)

    def _apply(self, ops: Sequence, undo: Optional[list]) -> None:
        """Apply ops with the idempotent forms (REMOVE: delete if present,
        ADD: upsert); with ``undo``, record what actually changed.  One C
        loop (:func:`aggtree._event_ops.apply_ops`) runs them and records
        ``(aggregate, done bits, old, new, id, namespace)`` per op that
        changed something, even when it raises halfway.  The start cache
        follows events_by_start: before each op on it, set (ADD) or
        forgotten, its previous entry recorded as ``(None, 0, previous
        start, None, id, None)``."""
        self._apply_ops(self._aggs, ops, undo, KEY_IS_NONE, self._starts, BY_START)

    def _undo(self, undo: list) -> None:
        try:
            undo_ops(undo, self._starts)
        except BaseException:
            # Cannot restore by hand: rebuild from the tables on the next access.
            self._stale = True
            log.exception("undoing aggregate changes failed; the aggregates will be reloaded")

    def _write(self, kind: str, body: Callable[[Any], tuple]) -> Any:
        """Run ``body(conn) -> (result, ops)`` in one write transaction, log
        the ops if another store needs them, apply them, commit last; on any
        failure (the commit's included) undo the applied ops and roll back."""
        if self._concurrent:
            return self._write_concurrent(kind, body)
        with self._lock:
            if self._stale:
                self._reload()
            backend = self._backend
            for _attempt in range(3):
                # The write Transaction (backend.py), unrolled: its __enter__
                # and __exit__ are two Python calls, 0.29 us of a 6.3 us
                # empty write on a file (alternating A/B, 30 rounds of 2,000),
                # and the write path must not get slower than it was.  The
                # same steps: begin, commit last, roll back on any failure.
                conn = backend.conn
                conn.execute(self._begin_write)
                undo: list = []
                change_id = None
                try:
                    if not self._private:
                        # Under the write lock: has anyone else committed
                        # since we last looked?  Then replay their log rows
                        # and ask whether writes must be logged.
                        version = backend.token_cursor.execute(backend.token_sql).fetchone()[0]
                        if version != self._write_version:
                            self._catch_up(conn)
                            self._shared = backend.log_needed(conn)
                            self._vouch = self._shared and backend.log_clean(conn)
                            self._write_version = self._data_version = version
                    result, ops = body(conn)
                    if ops:
                        if self._shared:
                            change_id = self._log(conn, kind, ops)
                        # self._apply(ops, undo), one call less:
                        self._apply_ops(self._aggs, ops, undo, KEY_IS_NONE, self._starts, BY_START)
                    conn.execute("COMMIT")
                except NeedReload:
                    self._undo(undo)
                    backend.rollback()
                    self._reload()
                    continue
                except BaseException:
                    self._undo(undo)
                    backend.rollback()
                    raise
                if change_id is not None:
                    self.change_id = change_id
                return result
            raise RuntimeError("could not catch up with the change log")  # pragma: no cover

    def _write_concurrent(self, kind: str, body: Callable[[Any], tuple]) -> Any:
        """:meth:`_write` for a backend whose writers run at once under row
        locks (PostgreSQL, :mod:`aggtree.events.postgres`): ``body`` runs in
        a READ COMMITTED transaction; if it produced ops they are appended
        to the log as the last statement, sent with COMMIT in one round
        trip.  Only after COMMIT succeeded are the aggregates touched: first
        the log rows other writers committed before this one (not applied
        yet), then this write's ops, in log order.  A deadlock is retried; a
        lost connection is re-opened, and a write whose COMMIT was in flight
        is resolved by its token (committed: applied once, from the log;
        not: run again).  Nothing to undo: the aggregates never saw an
        uncommitted write."""
        with self._lock:
            if self._stale:
                self._reload()
            backend: Any = self._backend
            deadline = time.monotonic() + backend.reconnect_timeout
            retries = 0
            backoff = 0.05
            while True:
                token = None
                committing = False
                try:
                    conn = backend.conn  # (reconnects)
                    conn.execute(self._begin_write)
                    result, ops = body(conn)
                    committing = True
                    if not ops:
                        conn.execute("COMMIT")
                        return result
                    token = uuid.uuid4()
                    appended = backend.append_commit(conn, encode(ops), token, self.change_id)
                except BaseException as exc:
                    what = backend.failure_kind(exc)
                    if what is None:
                        backend.rollback()
                        raise
                    if what == "retry" and retries < 10:
                        retries += 1
                        backend.rollback()
                        continue
                    if what != "lost" or time.monotonic() > deadline:
                        backend.rollback()
                        raise
                    backend.lost()
                    if committing:
                        pos = self._resolve_lost(token, deadline)
                        if pos is not None or token is None:
                            # Committed (applied from the log, with anyone's
                            # rows before it), or nothing to apply: done.
                            # (An unlogged write whose COMMIT was lost is
                            # taken as committed: it changed no aggregate.)
                            self._catch_up_now()
                            return result
                    log.info("%s: connection lost during %s; reconnecting", self.path, kind)
                    time.sleep(backoff)
                    backoff = min(1.0, backoff * 2)
                    continue
                break
            try:
                if appended.missed is None:  # rows before ours were compacted: reload
                    self._reload()
                    return result
                for row in appended.missed:
                    self._apply(decode(row.ops), None)
                    self.change_id = row.pos
                    self.changes_replayed += 1
                self._apply(ops, None)
                self.change_id = appended.pos
            except BaseException:
                self._stale = True  # half applied (cannot happen with sane ops): rebuild
                raise
            if appended.pos % self._prune_every == 0:
                try:
                    backend.compact_log(self._keep)
                except Exception:  # noqa: BLE001 - the write committed; compaction waits
                    log.warning("%s: compacting the change log failed", self.path, exc_info=True)
            return result

    def _resolve_lost(self, token: Any, deadline: float) -> Optional[int]:
        """After the connection broke during COMMIT: reconnect (until
        ``deadline``) and return the write's log position if it committed,
        None otherwise (or when ``token`` is None: an unlogged write)."""
        backend: Any = self._backend
        backoff = 0.05
        while True:
            try:
                if token is None:
                    backend.conn  # noqa: B018 - reconnect
                    return None
                return backend.resolve(token)
            except backend.connection_errors:
                if time.monotonic() > deadline:
                    raise
                backend.lost()
                time.sleep(backoff)
                backoff = min(1.0, backoff * 2)

    def catch_up(self) -> int:
        """Bring this store to the database's current head: when it returns,
        every write committed before the call (by any store, any process) is
        in the aggregates.  Returns the number of change-log rows replayed
        (a reload counts as 0).  Reconnects on PostgreSQL."""
        with self._lock:
            before = self.changes_replayed
            if self._stale:
                self._reload()
                return 0
            if self._private:
                return 0
            backend = self._backend
            deadline = time.monotonic() + getattr(backend, "reconnect_timeout", 0.0)
            while True:
                try:
                    self._catch_up_now()
                    break
                except backend.connection_errors:
                    if time.monotonic() > deadline:
                        raise
                    backend.lost()  # type: ignore[attr-defined]
                    time.sleep(0.1)
            return self.changes_replayed - before

    def _applied(self) -> int:
        """The last change-log position applied, read without the lock (the
        change feed skips notifications of positions at or below it)."""
        return self.change_id

    def _feed_wake(self) -> None:
        """The change feed's callback (its own thread, PostgreSQL): apply the
        log rows committed since ``change_id``, under the store's lock (so
        a read sees each write whole), on the feed's connection."""
        lock = self._lock
        while not lock.acquire(timeout=0.05):
            if self._closed:
                return
        try:
            if self._closed or not self._ready:
                return
            if self._stale:
                self._reload()
                return
            backend: Any = self._backend
            if not backend.feed_news(self.change_id):
                return  # notifications of rows this store applied (its own writes)
            try:
                backend.feed_query(self._catch_up)
            except NeedReload:
                self._reload()
        finally:
            lock.release()

    def _log(self, conn: Any, kind: str, ops: Sequence) -> int:
        """Append the ops to the change log (inside the write transaction,
        caught up); prune it every ``_prune_every`` rows.  Returns the row's
        id."""
        change_id = self._backend.inserted_id(conn.execute(self._sql.log_append, (kind, encode(ops))))
        if change_id != self.change_id + 1:
            raise NeedReload()  # (cannot happen: we are caught up)
        if self._vouch:  # the log holds every write since the snapshot: say so
            conn.execute(self._sql.warm_vouch)
        if change_id % self._prune_every == 0:
            conn.execute(self._sql.log_prune, (change_id - self._keep,))
        return change_id

    # -- writes (the hooks) ---------------------------------------------------

    def create_user(self, username: str) -> int:
        """Add a user; returns its id.  ``ValueError`` if the username is
        taken or empty."""
        check_text(username, "username")
        if not username:
            raise ValueError("username must not be empty")
        created = to_ms(self._clock(), "clock()")

        def body(conn):
            try:
                cur = conn.execute(self._sql.insert_user, (username, created))
            except self._backend.integrity_error:  # (evaluated only on an error)
                raise ValueError(f"username {username!r} is taken") from None
            return self._backend.inserted_id(cur), ()

        user_id = self._write("create_user", body)
        self._user_ids[username] = user_id
        return user_id

    def create_event(
        self,
        user_id: int,
        *,
        name: str,
        start: datetime,
        end: Optional[datetime] = None,
        created_at: Optional[datetime] = None,
        description: Optional[str] = None,
        location: Optional[str] = None,
    ) -> int:
        """Add an event owned by ``user_id``; returns its id.

        Times are aware datetimes (``ValueError`` if naive), stored as UTC
        milliseconds; ``created_at`` defaults to now.  ``LookupError`` if the
        user does not exist; ``ValueError`` if ``end`` is before ``start``.
        """
        user_id = check_id(user_id, "user_id")
        check_text(name, "name")
        check_text(description, "description", optional=True)
        check_text(location, "location", optional=True)
        start_ms = to_ms(start, "start")
        end_ms = None if end is None else to_ms(end, "end")
        if end_ms is not None and end_ms < start_ms:
            raise ValueError("end must not be before start")
        created_ms = to_ms(self._clock() if created_at is None else created_at, "created_at")

        def body(conn):
            try:
                cur = conn.execute(
                    self._sql.insert_event,
                    (user_id, name, start_ms, end_ms, created_ms, description, location),
                )
            except self._backend.integrity_error:
                raise LookupError(f"no user with id {user_id}") from None
            event_id = self._backend.inserted_id(cur)
            return event_id, (
                (BY_CREATION, ADD, user_id, 0, created_ms, event_id),
                (BY_START, ADD, user_id, 0, start_ms, event_id),
            )

        return self._write("create_event", body)

    def update_event(
        self,
        user_id: int,
        event_id: int,
        *,
        name: Any = _UNSET,
        start: Any = _UNSET,
        end: Any = _UNSET,
        description: Any = _UNSET,
        location: Any = _UNSET,
    ) -> None:
        """Change an event's fields (only those given).  Only its owner may:
        ``PermissionError`` otherwise; ``LookupError`` if there is no such
        event.  A new ``start`` moves the event in the owner's
        ``events_by_start`` and in every follower's
        ``followed_events_by_start`` (O(followers * log n)).  ``created_at``
        cannot change."""
        user_id = check_id(user_id, "user_id")
        event_id = check_id(event_id, "event_id")
        if name is not _UNSET:
            check_text(name, "name")
        if description is not _UNSET:
            check_text(description, "description", optional=True)
        if location is not _UNSET:
            check_text(location, "location", optional=True)
        start_ms = _UNSET if start is _UNSET else to_ms(start, "start")
        end_ms = _UNSET if end is _UNSET or end is None else to_ms(end, "end")
        if end is None:
            end_ms = None
        q = self._sql

        def body(conn):
            if q.lock_event:  # concurrent writers: lock first, then read (a new snapshot)
                conn.execute(q.lock_event, (event_id,))
            if start_ms is _UNSET:
                rows = conn.execute(q.select_event, (event_id,)).fetchall()
            else:  # the start may move: the followers' items move with it
                rows = conn.execute(q.select_event_and_followers, (event_id,)).fetchall()
            if not rows:
                raise LookupError(f"no event with id {event_id}")
            owner, old_name, old_start, old_end, old_desc, old_loc = rows[0][:6]
            if owner != user_id:
                raise PermissionError(f"user {user_id} does not own event {event_id}")
            new_start = old_start if start_ms is _UNSET else start_ms
            new_end = old_end if end_ms is _UNSET else end_ms
            if new_end is not None and new_end < new_start:
                raise ValueError("end must not be before start")
            conn.execute(
                q.update_event,
                (
                    old_name if name is _UNSET else name,
                    new_start,
                    new_end,
                    old_desc if description is _UNSET else description,
                    old_loc if location is _UNSET else location,
                    event_id,
                ),
            )
            if new_start == old_start:
                return None, ()
            ops = [(BY_START, MOVE, owner, old_start, new_start, event_id)]
            for row in rows:
                if row[6] is not None:
                    ops.append((FOLLOWED_BY_START, MOVE, row[6], old_start, new_start, event_id))
            return None, ops

        self._write("update_event", body)

    def delete_event(self, user_id: int, event_id: int) -> None:
        """Delete an event and (cascading) its follows.  Only its owner may:
        ``PermissionError`` otherwise; ``LookupError`` if there is no such
        event."""
        user_id = check_id(user_id, "user_id")
        event_id = check_id(event_id, "event_id")
        q = self._sql

        def body(conn):
            if q.lock_event:  # concurrent writers: lock first, then read the followers
                conn.execute(q.lock_event, (event_id,))
            rows = conn.execute(q.select_event_to_delete, (event_id,)).fetchall()
            if not rows:
                raise LookupError(f"no event with id {event_id}")
            owner, created, start = rows[0][:3]
            if owner != user_id:
                raise PermissionError(f"user {user_id} does not own event {event_id}")
            conn.execute(q.delete_event, (event_id,))
            ops = [
                (BY_CREATION, REMOVE, owner, created, 0, event_id),
                (BY_START, REMOVE, owner, start, 0, event_id),
            ]
            for row in rows:
                follower = row[3]
                if follower is not None:
                    ops.append((FOLLOWS, REMOVE, follower, 0, 0, event_id))
                    ops.append((FOLLOWED_BY_START, REMOVE, follower, start, 0, event_id))
            return None, ops

        self._write("delete_event", body)

    def follow_event(self, user_id: int, event_id: int) -> bool:
        """``user_id`` follows ``event_id``; True if it was not following yet
        (idempotent).  ``LookupError`` for an unknown user or event."""
        user_id = check_id(user_id, "user_id")
        event_id = check_id(event_id, "event_id")
        created = to_ms(self._clock(), "clock()")
        q = self._sql

        def body(conn):
            if q.select_start_locked:  # concurrent writers: the start FOR SHARE first
                start = self._locked_start(conn, event_id)
                if conn.execute(q.insert_follow_checked, (event_id, created, user_id)).fetchone() is None:
                    if conn.execute(q.user_exists, (user_id,)).fetchone() is None:
                        raise LookupError(f"no user with id {user_id}")
                    return False, ()
                return True, (
                    (FOLLOWS, ADD, user_id, 0, 0, event_id),
                    (FOLLOWED_BY_START, ADD, user_id, 0, start, event_id),
                )
            try:
                inserted = conn.execute(self._sql.insert_follow, (user_id, event_id, created)).rowcount
            except self._backend.integrity_error:
                raise self._missing(conn, user_id, event_id) from None
            if not inserted:
                return False, ()
            start = self._event_start(conn, event_id)
            return True, (
                (FOLLOWS, ADD, user_id, 0, 0, event_id),
                (FOLLOWED_BY_START, ADD, user_id, 0, start, event_id),
            )

        return self._write("follow_event", body)

    def unfollow_event(self, user_id: int, event_id: int) -> bool:
        """``user_id`` stops following ``event_id``; True if it was following
        (idempotent).  ``LookupError`` for an unknown user or event."""
        user_id = check_id(user_id, "user_id")
        event_id = check_id(event_id, "event_id")

        q = self._sql

        def body(conn):
            locked = q.select_start_locked  # concurrent writers: the start FOR SHARE first
            start = self._locked_start(conn, event_id) if locked else None
            deleted = conn.execute(self._sql.delete_follow, (user_id, event_id)).rowcount
            if not deleted:
                error = self._missing(conn, user_id, event_id)
                if error is not None:
                    raise error
                return False, ()
            if start is None:
                start = self._event_start(conn, event_id)
            return True, (
                (FOLLOWS, REMOVE, user_id, 0, 0, event_id),
                (FOLLOWED_BY_START, REMOVE, user_id, start, 0, event_id),
            )

        return self._write("unfollow_event", body)

    def _event_start(self, conn: Any, event_id: int) -> int:
        """Start time of an existing event, inside a write transaction that
        has caught up: from the start cache, else (and then remembered) from
        the table.  (A separate SELECT is cheaper than RETURNING with a
        subquery, and the cache cheaper than both.)"""
        start = self._starts.get(event_id)
        if start is None:
            start = conn.execute(self._sql.select_start, (event_id,)).fetchone()[0]
            self._starts.set(event_id, start)
        return start

    def _locked_start(self, conn: Any, event_id: int) -> int:
        """The event's start read with a row lock (``FOR SHARE``: an update
        or delete of the event waits for this write, or this write for it
        and then reads its result); ``LookupError`` if there is none."""
        row = conn.execute(self._sql.select_start_locked, (event_id,)).fetchone()
        if row is None:
            raise LookupError(f"no event with id {event_id}")
        return row[0]

    def _missing(self, conn: Any, user_id: int, event_id: int) -> Optional[LookupError]:
        """The LookupError a follow or unfollow of a missing user or event
        raises (None if both exist)."""
        q = self._sql
        if conn.execute(q.event_exists, (event_id,)).fetchone() is None:
            return LookupError(f"no event with id {event_id}")
        if conn.execute(q.user_exists, (user_id,)).fetchone() is None:
            return LookupError(f"no user with id {user_id}")
        return None

    # -- reads of rows -------------------------------------------------------------

    def user_id(self, username: str) -> Optional[int]:
        """The id of ``username``, or None."""
        check_text(username, "username")
        with self._lock:
            return self._lookup_user(username)

    def _execute(self, sql: str, params: Any) -> Any:
        """One statement outside a transaction, on the backend's connection;
        run once more on a new connection if that one was lost (PostgreSQL:
        a server restart; SQLite has no such errors)."""
        backend = self._backend
        try:
            return backend.conn.execute(sql, params)
        except backend.connection_errors:
            backend.lost()  # type: ignore[attr-defined]
            return backend.conn.execute(sql, params)

    def _lookup_user(self, username: str) -> Optional[int]:
        user_id = self._user_ids.get(username)
        if user_id is None:
            row = self._execute(self._sql.user_by_name, (username,)).fetchone()
            if row is None:
                return None  # not cached: another process may create it
            user_id = self._user_ids[username] = row[0]
        return user_id

    def get_event(self, event_id: int) -> Optional[dict]:
        """The event's row as a dict (times in ms), or None."""
        event_id = check_id(event_id, "event_id")
        with self._lock:
            cur = self._execute(self._sql.event_by_id, (event_id,))
            row = cur.fetchone()
            if row is None:
                return None
            return dict(zip((c[0] for c in cur.description), row))
