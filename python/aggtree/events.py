"""The event-stats application: a SQLite event store whose user stats are
aggregate counts.

This is the system aggtree exists for (``SEED-aggregate-migration.md``): an
events app whose ``getUserStats`` read every event and follow of a user, plus
one query per followed event, rebuilt so that every stat is a bounded
O(log n) :meth:`Aggregate.count <aggtree.Aggregate.count>`.

Data
----
SQLite (the standard library's :mod:`sqlite3`; WAL mode for files, foreign
keys on, parameterised SQL only) holds the tables; every time is an integer
number of milliseconds since the Unix epoch, UTC:

* ``users(id, username UNIQUE, created_at)``
* ``events(id, user_id -> users, name, start_time, end_time, created_at,
  description, location)``
* ``event_follows(user_id -> users, event_id -> events ON DELETE CASCADE,
  created_at)``, primary key ``(user_id, event_id)``
* ``aggtree_changes(id, kind, ops)``: the change log, and
  ``aggtree_stores(id, host, pid, opened_at)``: the stores that have the file
  open (see below).

Four aggregates live in memory, each namespaced by user id, each a
:class:`~aggtree.TableAggregate`:

=============================  =====================  ==========  ========
attribute                      namespace              key         id
=============================  =====================  ==========  ========
``events_by_creation``         owner                  created_at  event id
``events_by_start``            owner                  start_time  event id
``event_follows``              follower               ``None``    event id
``followed_events_by_start``   follower               start_time  event id
=============================  =====================  ==========  ========

The fourth is the denormalised aggregate the seed left as "future work": it
makes ``upcoming_followed`` O(log n).  Changing an event's start moves the
event's item in every follower's namespace; deleting it removes them.

Writes
------
Each write is one SQLite transaction (``BEGIN IMMEDIATE``).  Inside it the
SQL runs first and yields a list of aggregate *ops* (add / remove / move an
item); the ops are appended to the change log (if another store is open),
then applied to the aggregates, and the transaction commits last.  If applying an op or the
commit raises, the ops already applied are undone and the transaction is
rolled back, so the tables and the aggregates never disagree.  Live writes use
the idempotent forms (``upsert``, ``delete_if_exists``), which is what lets a
backfill (:meth:`EventStore.initialize_aggregates`) run next to them.

``follow_event`` and ``unfollow_event`` need the event's start time (the key
of the follower's ``followed_events_by_start`` item).  A start-time cache by
event id (:class:`_StartCache`), moved by the same ops as
``events_by_start`` and undone with them, answers that without a SELECT; an
event it does not hold is read from the table.  SQL that changes
``start_time`` behind the store's back is drift like any other:
:meth:`EventStore.verify_aggregates` reports it and refills the cache.

Several processes
-----------------
Every ``EventStore`` on a file registers itself in ``aggtree_stores`` when it
opens (before loading) and unregisters when it closes.  A writer appends its
ops to the change log only while another store is registered: a store that
is alone pays nothing for the log, and a store that registers later loads
every unlogged write from the tables.  Rows of dead processes on the same
host are dropped at the next open; a stale row only costs logging.

Every store remembers the id of the last change-log row its aggregates
reflect.  Before each read it asks SQLite's ``PRAGMA data_version`` (a cheap,
in-memory check) whether another connection committed; if so it reads only
the change-log rows after its own and replays their ops.  A writer asks the
same question under the write lock, replays what others appended and
re-reads the registry.  Writers prune the log now and then (keeping the
newest ``change_log_keep`` rows); a store that has fallen further behind than
that reloads in bulk.

>>> from datetime import datetime, timedelta, timezone
>>> store = EventStore.open(":memory:")
>>> now = datetime(2024, 5, 1, tzinfo=timezone.utc)
>>> alice = store.create_user("alice")
>>> e = store.create_event(alice, name="talk", start=now + timedelta(days=1),
...                        created_at=now - timedelta(days=1))
>>> store.get_user_stats("alice", now=now).upcoming_events
1
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import socket
import sqlite3
import struct
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np

from . import Aggregate, Bound, DuplicateItemError
from .table import TableAggregate

from ._event_ops import StartCache as _StartCache

try:  # the write hooks' C loop, for native aggregates
    from ._core import Aggregate as _NativeAggregate
    from ._event_ops import apply_ops as _apply_ops_native
except ImportError:  # pragma: no cover - no compiled core
    _NativeAggregate = None
    _apply_ops_native = None

__all__ = [
    "EventStore",
    "UserStats",
    "VerifyReport",
    "Difference",
    "MigrationReport",
    "DatasetInfo",
    "get_user_stats",
    "get_user_stats_naive",
    "initialize_aggregates",
    "verify_aggregates",
    "generate_dataset",
    "to_ms",
    "from_ms",
    "WEEKLY_GOAL",
]

log = logging.getLogger("aggtree.events")

#: The weekly capture goal reported by :meth:`EventStore.get_user_stats`.
WEEKLY_GOAL = 5
WEEK_MS = 7 * 24 * 3600 * 1000

SCHEMA_VERSION = 1

_SCHEMA = (
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
    # One row per write that changed an aggregate; ids are contiguous because
    # the newest row is never pruned (so max(id) never goes back).
    """CREATE TABLE IF NOT EXISTS aggtree_changes (
        id          INTEGER PRIMARY KEY,
        kind        TEXT    NOT NULL,
        ops         BLOB    NOT NULL
    )""",
    # The EventStores that have this file open: writers append to the change
    # log only while some other store is registered.
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
)

# The four aggregates, by index (the index is what the change log stores).
BY_CREATION, BY_START, FOLLOWS, FOLLOWED_BY_START = range(4)
AGGREGATE_NAMES = (
    "events_by_creation",
    "events_by_start",
    "event_follows",
    "followed_events_by_start",
)

# Op codes: an op is (aggregate, code, namespace, old_key, new_key, id), six
# int64s in the log.  REMOVE deletes (old_key, id) if present, ADD upserts
# (new_key, id), MOVE does both.  The event_follows aggregate's key is None,
# stored as 0.
_REMOVE, _ADD, _MOVE = 1, 2, 3
_OP_WIDTH = 6
_KEY_IS_NONE = tuple(a == FOLLOWS for a in range(4))

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
_UNSET: Any = object()

# update_event's read of the event; with a new start also its followers (one
# row per follower, NULL if none).  Measured inside a write transaction: the
# event's SELECT 2.0 us plus a followers SELECT 1.4 us, the join 2.5 us.
_SELECT_EVENT = (
    "SELECT user_id, name, start_time, end_time, description, location, NULL"
    " FROM events WHERE id = ?"
)
_SELECT_EVENT_AND_FOLLOWERS = (
    "SELECT e.user_id, e.name, e.start_time, e.end_time, e.description, e.location, f.user_id"
    " FROM events e LEFT JOIN event_follows f ON f.event_id = e.id WHERE e.id = ?"
)


# ---------------------------------------------------------------------------
# Times
# ---------------------------------------------------------------------------


def to_ms(dt: datetime, what: str = "time") -> int:
    """Milliseconds since the Unix epoch (UTC) of an aware datetime, rounded
    down.  ``TypeError`` for a non-datetime, ``ValueError`` for a naive one."""
    if not isinstance(dt, datetime):
        raise TypeError(f"{what} must be a datetime, not {type(dt).__name__}")
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (got the naive datetime {dt.isoformat()})")
    return (dt - _EPOCH) // _ONE_MS


def from_ms(ms: int) -> datetime:
    """The aware UTC datetime of a millisecond timestamp."""
    return _EPOCH + timedelta(milliseconds=ms)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _check_id(value: Any, what: str) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return int(value)


def _check_text(value: Any, what: str, *, optional: bool = False) -> Optional[str]:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserStats:
    """The stats of one user at one instant ``now``.

    * ``captures_this_week``: own events created in ``[now - 7 days, now]``
      (both ends inclusive);
    * ``weekly_goal``: the goal for ``captures_this_week`` (5);
    * ``upcoming_events`` = ``upcoming_own`` (own events starting strictly
      after ``now``) + ``upcoming_followed`` (followed events starting at or
      after ``now``);
    * ``all_time_events`` = ``all_time_own`` (own events) +
      ``total_follows`` (events followed).
    """

    captures_this_week: int
    weekly_goal: int
    upcoming_events: int
    all_time_events: int
    upcoming_own: int
    upcoming_followed: int
    all_time_own: int
    total_follows: int

    @classmethod
    def from_parts(
        cls,
        captures_this_week: int,
        upcoming_own: int,
        upcoming_followed: int,
        all_time_own: int,
        total_follows: int,
    ) -> "UserStats":
        """Build the stats from the five counts; derives the totals."""
        return cls(
            captures_this_week=captures_this_week,
            weekly_goal=WEEKLY_GOAL,
            upcoming_events=upcoming_own + upcoming_followed,
            all_time_events=all_time_own + total_follows,
            upcoming_own=upcoming_own,
            upcoming_followed=upcoming_followed,
            all_time_own=all_time_own,
            total_follows=total_follows,
        )

    @classmethod
    def zero(cls) -> "UserStats":
        """The stats of a user with no data (also: of an unknown user)."""
        return cls.from_parts(0, 0, 0, 0, 0)

    def to_dict(self) -> dict:
        """The fields as a plain dict (for JSON)."""
        return dataclasses.asdict(self)


class Difference(NamedTuple):
    """One disagreement between an aggregate and the tables.

    ``kind`` is ``"missing"`` (the tables have the item, the aggregate not),
    ``"extra"`` (the aggregate has an item the tables do not),
    ``"wrong_key"`` (the item is there under another key) or
    ``"wrong_value"`` (the right item with a value other than 0.0, given as
    ``actual_value``).  For missing items ``actual_key`` is None, for extra
    ones ``expected_key`` is None.
    """

    aggregate: str
    kind: str
    namespace: Any
    id: Any
    expected_key: Any
    actual_key: Any
    actual_value: Optional[float] = None


@dataclasses.dataclass
class VerifyReport:
    """What :meth:`EventStore.verify_aggregates` found.

    ``differences`` lists every difference (up to ``max_listed``, if one was
    given; ``counts`` always counts them all), ``checked`` maps each aggregate
    to the number of items the tables say it should hold, and ``repaired`` is
    true if the differences were fixed.
    """

    differences: list
    counts: dict
    checked: dict
    repaired: bool = False

    @property
    def ok(self) -> bool:
        """True if no difference was found."""
        return not any(self.counts.values())

    @property
    def total(self) -> int:
        """The number of differences found."""
        return sum(self.counts.values())

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = []
        for name in AGGREGATE_NAMES:
            n = self.checked.get(name, 0)
            kinds = {k: v for (agg, k), v in self.counts.items() if agg == name and v}
            detail = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "ok"
            lines.append(f"{name:<26} {n:>10,} items  {detail}")
        if self.ok:
            lines.append("no differences")
        else:
            lines.append(
                f"{self.total:,} differences" + (" (repaired)" if self.repaired else "")
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclasses.dataclass
class MigrationReport:
    """What :meth:`EventStore.initialize_aggregates` did: rows read from each
    table, items inserted (0 on a rerun over unchanged data), batches and
    seconds."""

    events: int
    follows: int
    inserted: int
    batches: int
    seconds: float
    resumed: bool


class DatasetInfo(NamedTuple):
    """What :func:`generate_dataset` wrote."""

    users: int
    events: int
    follows: int
    heavy_users: list
    seconds: float


class _NeedReload(Exception):
    """Internal: the change-log rows this store needs were pruned."""


# ---------------------------------------------------------------------------
# Change-log encoding
# ---------------------------------------------------------------------------


_STRUCTS: dict = {}


def _encode(ops: Any) -> bytes:
    """The ops as little-endian int64s (one ``_OP_WIDTH``-tuple per op)."""
    n = len(ops)
    packer = _STRUCTS.get(n)
    if packer is None:
        packer = _STRUCTS[n] = struct.Struct(f"<{_OP_WIDTH * n}q")
    return packer.pack(*itertools.chain.from_iterable(ops))


def _decode(blob: bytes) -> list:
    flat = struct.unpack(f"<{len(blob) // 8}q", blob)
    return [flat[i : i + _OP_WIDTH] for i in range(0, len(flat), _OP_WIDTH)]


# ---------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------


class _Progress:
    """A tqdm bar on a terminal, log lines (every ~10%) otherwise, or nothing."""

    def __init__(self, total: int, desc: str, mode: Optional[bool], stream=None) -> None:
        self.total = max(total, 0)
        self.done = 0
        self.desc = desc
        self.bar = None
        self.log = False
        self.next_log = 0
        self.started = time.perf_counter()
        if mode is False:
            return
        stream = stream if stream is not None else sys.stderr
        if hasattr(stream, "isatty") and stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is optional
                self.log = True
            else:
                self.bar = tqdm(total=self.total, desc=desc, unit="row", unit_scale=True, file=stream)
                return
        self.log = True
        log.info("%s: %s rows", desc, f"{self.total:,}")
        self.next_log = self._step()

    def _step(self) -> int:
        return self.done + max(self.total // 10, 1)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.log and self.done >= self.next_log and self.done < self.total:
            pct = 100.0 * self.done / self.total if self.total else 100.0
            log.info("%s: %s / %s rows (%.0f%%)", self.desc, f"{self.done:,}", f"{self.total:,}", pct)
            self.next_log = self._step()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.log:
            log.info(
                "%s: %s rows in %.2f s", self.desc, f"{self.done:,}", time.perf_counter() - self.started
            )


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------


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


def _apply_ops_python(
    aggs: list,
    ops: Sequence,
    undo: Optional[list],
    key_is_none: tuple,
    starts: Optional["_StartCache"] = None,
    start_agg: int = -1,
) -> None:
    """:func:`aggtree._event_ops.apply_ops` for any Aggregate class (the
    pure-Python reference included): the same ops, the same undo records,
    the same start cache steps."""
    for a, code, ns, old, new, id_ in ops:
        if a == start_agg and starts is not None:
            if undo is not None:
                undo.append((None, 0, starts.get(id_), None, id_, None))
            starts.set(id_, new if code & _ADD else None)
        agg = aggs[a]
        if key_is_none[a]:
            old = new = None
        done = 0
        try:
            if code & _REMOVE and agg.delete_if_exists(old, id_, namespace=ns):
                done = _REMOVE
            if code & _ADD and agg.upsert(new, id_, namespace=ns):
                done |= _ADD
        finally:
            if done and undo is not None:
                undo.append((agg, done, old, new, id_, ns))


def _read_matrix(conn: sqlite3.Connection, sql: str, width: int) -> np.ndarray:
    """Stream an all-integer query into an (n, width) int64 array without
    building a list of rows (cheaper than ``fetchall``)."""
    flat = np.fromiter(itertools.chain.from_iterable(conn.execute(sql)), dtype=np.int64)
    return flat.reshape(-1, width)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _lookup(ids: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> tuple:
    """``(values of wanted ids, found mask)`` for ascending ``ids``: a dense
    table indexed by id when the ids are dense enough (O(n)), a binary search
    otherwise."""
    found = np.zeros(len(wanted), dtype=bool)
    if not len(ids) or not len(wanted):
        return np.zeros(len(wanted), dtype=np.int64), found
    lo, hi = int(ids[0]), int(ids[-1])
    if lo >= 0 and hi < 4 * len(ids) + 1024:
        table = np.zeros(hi + 1, dtype=np.int64)
        present = np.zeros(hi + 1, dtype=bool)
        table[ids] = values
        present[ids] = True
        inside = (wanted >= 0) & (wanted <= hi)
        idx = np.where(inside, wanted, 0)
        found = inside & present[idx]
        return table[idx], found
    pos = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
    return values[pos], ids[pos] == wanted


def _is_memory(path: str) -> bool:
    return path in ("", ":memory:") or path.startswith("file::memory:")


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables, indexes and change log if they are missing
    (idempotent; one transaction)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for stmt in _SCHEMA:
            conn.execute(stmt)
        conn.execute(
            "INSERT OR IGNORE INTO aggtree_meta (name, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _connect(path: str, timeout: float, synchronous: str) -> sqlite3.Connection:
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


class EventStore:
    """Users, events and follows in SQLite, with the four per-user aggregates
    in memory (see the module docstring).  Create one with :meth:`open`.

    All methods are thread-safe (one lock per store); for several processes,
    open one store per process on the same file.  Close a store (or use it
    as a context manager) when done: while it is open, writers in other
    processes keep a change log for it.

    The aggregates are public attributes (:class:`~aggtree.TableAggregate`):
    :attr:`events_by_creation`, :attr:`events_by_start`,
    :attr:`event_follows` and :attr:`followed_events_by_start`.  Read them;
    write only through the store.

    Diagnostics: :attr:`reloads` counts full reloads from the tables,
    :attr:`changes_replayed` the change-log rows replayed from other
    processes, and :attr:`change_id` is the last change-log row the
    aggregates reflect.
    """

    def __init__(self, conn: sqlite3.Connection, path: str, *, node_size: int,
                 change_log_keep: int, clock: Callable[[], datetime],
                 aggregate_class: Any = None) -> None:
        # Use EventStore.open().
        self._cls = aggregate_class if aggregate_class is not None else Aggregate
        self._conn = conn
        # PRAGMA data_version runs before every write and read: a cursor of
        # its own saves creating one each time (~0.2 us of ~0.9).
        self._version_cursor = conn.cursor()
        self.path = path
        self._memory = _is_memory(path)
        self._node_size = node_size
        self._keep = change_log_keep
        self._prune_every = max(1, min(1000, change_log_keep))
        self._clock = clock
        self._lock = threading.RLock()
        self._user_ids: dict = {}
        self._data_version = None   # PRAGMA data_version the aggregates reflect (reads)
        self._write_version = None  # ... when the writer last checked log and registry
        self._shared = not self._memory  # another store may be open: log every write
        self._store_id: Optional[int] = None
        self._stale = False
        self._migration: Optional[dict] = None
        self._set_aggregates([self._cls(node_size=node_size) for _ in range(4)])
        self._starts = _StartCache()  # event id -> start_time (follow / unfollow)
        self.change_id = 0
        self.reloads = 0
        self.changes_replayed = 0

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

        Loading reads each table once and builds every aggregate with
        ``Aggregate.from_arrays``: O(n log n), no per-row inserts.
        """
        if not isinstance(path, str):
            path = os.fspath(path)
        if isinstance(node_size, bool) or not isinstance(node_size, int):
            raise TypeError("node_size must be an int")
        if isinstance(change_log_keep, bool) or not isinstance(change_log_keep, int) or change_log_keep < 1:
            raise ValueError("change_log_keep must be a positive int")
        if not create and not _is_memory(path) and not os.path.exists(path):
            raise FileNotFoundError(f"no database at {path}")
        conn = _connect(path, timeout, synchronous)
        store = None
        try:
            if not create:
                found = conn.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                    " AND name IN ('users', 'events', 'event_follows')"
                ).fetchone()[0]
                if found != 3:
                    raise ValueError(f"{path} is not an event database (no users/events/event_follows tables)")
            create_schema(conn)
            store = cls(conn, path, node_size=node_size, change_log_keep=change_log_keep,
                        clock=clock or _utcnow, aggregate_class=aggregate_class)
            if not store._memory:
                store._register()  # before loading: later writers log for us
            if load:
                store._reload()
            else:
                store._data_version = store._read_data_version()
                store.change_id = conn.execute(
                    "SELECT coalesce(max(id), 0) FROM aggtree_changes"
                ).fetchone()[0]
        except BaseException:
            if store is not None:
                store.close()  # unregisters
            else:
                conn.close()
            raise
        return store

    def close(self) -> None:
        """Unregister and close the database connection (the aggregates stay
        readable).  Idempotent."""
        with self._lock:
            if self._store_id is not None:
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._conn.execute("DELETE FROM aggtree_stores WHERE id = ?", (self._store_id,))
                    self._conn.execute("COMMIT")
                except sqlite3.Error:  # a stale row is cleaned up by the next open
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                self._store_id = None
            self._conn.close()

    def __enter__(self) -> "EventStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={len(t)}" for name, t in zip(AGGREGATE_NAMES, self._tables))
        return f"<EventStore {self.path!r}: {sizes}>"

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

    # -- loading and catching up -------------------------------------------

    def _register(self) -> None:
        """Add this store to ``aggtree_stores`` (and drop the rows of dead
        processes on this host) in one write transaction."""
        conn = self._conn
        host = socket.gethostname()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for row_id, pid in conn.execute(
                "SELECT id, pid FROM aggtree_stores WHERE host = ?", (host,)
            ).fetchall():
                if not _pid_alive(pid):
                    conn.execute("DELETE FROM aggtree_stores WHERE id = ?", (row_id,))
            self._store_id = conn.execute(
                "INSERT INTO aggtree_stores (host, pid, opened_at) VALUES (?, ?, ?)",
                (host, os.getpid(), to_ms(_utcnow())),
            ).lastrowid
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._write_version = None

    def _read_data_version(self) -> Optional[int]:
        if self._memory:
            return None
        return self._version_cursor.execute("PRAGMA data_version").fetchone()[0]

    def _reload(self) -> None:
        """Rebuild every aggregate from the tables, in bulk."""
        conn = self._conn
        version = self._read_data_version()  # before the snapshot: never misses a commit
        conn.execute("BEGIN")
        try:
            last = conn.execute("SELECT coalesce(max(id), 0) FROM aggtree_changes").fetchone()[0]
            ev = _read_matrix(
                conn, "SELECT id, user_id, created_at, start_time FROM events ORDER BY id", 4
            )
            fo = _read_matrix(
                conn, "SELECT user_id, event_id FROM event_follows ORDER BY user_id, event_id", 2
            )
        finally:
            conn.execute("COMMIT")
        ids = ev[:, 0]
        starts = ev[:, 3]
        # Follows come in primary-key order: grouped by follower, event ids ascending.
        followers = np.ascontiguousarray(fo[:, 0])
        followed = np.ascontiguousarray(fo[:, 1])
        followed_starts, ok = _lookup(ids, starts, followed)
        if not ok.all():  # dangling follows (foreign keys were off): skip them
            followers, followed, followed_starts = followers[ok], followed[ok], followed_starts[ok]
        # Group the events by owner once (stable: ids stay ascending within an
        # owner); from_arrays then finds its input nearly sorted.
        by_owner = np.argsort(ev[:, 1], kind="stable")
        owners = ev[by_owner, 1]
        ids_o = ids[by_owner]
        size = self._node_size
        build = self._cls.from_arrays
        aggs = [
            build(ev[by_owner, 2], ids_o, namespaces=owners, node_size=size),
            build(starts[by_owner], ids_o, namespaces=owners, node_size=size),
            build([None] * len(followed), followed, namespaces=followers, node_size=size),
            build(followed_starts, followed, namespaces=followers, node_size=size),
        ]
        self._set_aggregates(aggs)
        self._starts.load(ids, starts)
        self.change_id = last
        self._data_version = version
        self._write_version = None
        self._stale = False
        self._migration = None
        self.reloads += 1

    def _replay(self, rows: list) -> None:
        """Apply change-log rows (id, ops) written by other connections."""
        try:
            for change_id, blob in rows:
                self._apply(_decode(blob), None)
                self.change_id = change_id
                self.changes_replayed += 1
        except BaseException:
            self._stale = True  # half-replayed: rebuild on the next access
            raise

    def _sync(self) -> None:
        """Bring the aggregates up to date with the file: cheap when nothing
        changed (one ``PRAGMA data_version``), otherwise replays only the new
        change-log rows, and reloads in bulk only if those were pruned."""
        if self._stale:
            self._reload()
            return
        if self._memory:
            return
        version = self._read_data_version()
        if version == self._data_version:
            return
        conn = self._conn
        last = self.change_id
        rows = conn.execute(
            "SELECT id, ops FROM aggtree_changes WHERE id > ? ORDER BY id", (last,)
        ).fetchall()
        if rows and rows[0][0] != last + 1:
            self._reload()
            return
        if not rows:
            top = conn.execute("SELECT max(id) FROM aggtree_changes").fetchone()[0]
            if (top or 0) < last:  # the file was replaced or its log reset
                self._reload()
                return
        self._replay(rows)
        self._data_version = version

    def _begin_caught_up(self) -> None:
        """Open a read transaction whose snapshot the aggregates reflect
        exactly (replaying the change log inside it; reloading if needed)."""
        conn = self._conn
        for _ in range(3):
            conn.execute("BEGIN")
            try:
                self._catch_up_in_transaction()
                return
            except _NeedReload:
                conn.execute("COMMIT")
                self._reload()
            except BaseException:
                conn.execute("COMMIT")
                raise
        raise RuntimeError("could not catch up with the change log")  # pragma: no cover

    def _catch_up_in_transaction(self) -> None:
        """Inside a transaction: replay the change-log rows after ours that
        this snapshot holds (consistent with the snapshot's tables)."""
        last = self.change_id
        rows = self._conn.execute(
            "SELECT id, ops FROM aggtree_changes WHERE id > ? ORDER BY id", (last,)
        ).fetchall()
        if rows and rows[0][0] != last + 1:
            raise _NeedReload()
        self._replay(rows)

    # -- applying ops -------------------------------------------------------

    def _set_aggregates(self, aggs: list) -> None:
        """Install four Aggregates (indexed like the ops) behind the
        TableAggregates, and pick the loop that applies ops to them."""
        self._tables: list = _table_aggregates(aggs)
        self._aggs = list(aggs)
        native = _NativeAggregate is not None and all(type(a) is _NativeAggregate for a in aggs)
        self._apply_ops = _apply_ops_native if native else _apply_ops_python

    def _apply(self, ops: Sequence, undo: Optional[list]) -> None:
        """Apply ops with the idempotent forms (REMOVE: delete if present,
        ADD: upsert); with ``undo``, record what actually changed.  One C
        loop (:func:`aggtree._event_ops.apply_ops`) runs them and records
        ``(aggregate, done bits, old, new, id, namespace)`` per op that
        changed something, even when it raises halfway.  The start cache
        follows events_by_start: before each op on it, set (ADD) or
        forgotten, its previous entry recorded as ``(None, 0, previous
        start, None, id, None)``."""
        self._apply_ops(self._aggs, ops, undo, _KEY_IS_NONE, self._starts, BY_START)

    def _undo(self, undo: list) -> None:
        try:
            for agg, done, old, new, id_, ns in reversed(undo):
                if agg is None:
                    self._starts.set(id_, old)
                    continue
                if done & _ADD:
                    agg.delete(new, id_, namespace=ns)
                if done & _REMOVE:
                    agg.insert(old, id_, namespace=ns)
        except BaseException:
            # Cannot restore by hand: rebuild from the tables on the next access.
            self._stale = True
            log.exception("undoing aggregate changes failed; the aggregates will be reloaded")
        finally:
            undo.clear()

    def _write(self, kind: str, body: Callable[[sqlite3.Connection], tuple]) -> Any:
        """Run ``body(conn) -> (result, ops)`` in one write transaction, log
        the ops if another store is open, apply them, commit last; on any
        failure undo the applied ops and roll back."""
        with self._lock:
            if self._stale:
                self._reload()
            conn = self._conn
            for _attempt in range(3):
                conn.execute("BEGIN IMMEDIATE")
                undo: list = []
                change_id = None
                try:
                    if not self._memory:
                        # Under the write lock: has anyone else committed since
                        # we last looked?  Then replay their log rows and see
                        # who is registered now.
                        version = self._read_data_version()
                        if version != self._write_version:
                            self._catch_up_in_transaction()
                            self._shared = conn.execute(
                                "SELECT EXISTS (SELECT 1 FROM aggtree_stores WHERE id != ?)",
                                (self._store_id,),
                            ).fetchone()[0] == 1
                            self._write_version = self._data_version = version
                    result, ops = body(conn)
                    if ops:
                        if self._shared:
                            change_id = conn.execute(
                                "INSERT INTO aggtree_changes (kind, ops) VALUES (?, ?)",
                                (kind, _encode(ops)),
                            ).lastrowid
                            if change_id != self.change_id + 1:
                                raise _NeedReload()  # (cannot happen: we are caught up)
                            if change_id % self._prune_every == 0:
                                conn.execute(
                                    "DELETE FROM aggtree_changes WHERE id <= ?",
                                    (change_id - self._keep,),
                                )
                        self._apply(ops, undo)
                    conn.execute("COMMIT")
                except _NeedReload:
                    self._undo(undo)
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    self._reload()
                    continue
                except BaseException:
                    self._undo(undo)
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                if change_id is not None:
                    self.change_id = change_id
                return result
            raise RuntimeError("could not catch up with the change log")  # pragma: no cover

    # -- writes ---------------------------------------------------------------

    def create_user(self, username: str) -> int:
        """Add a user; returns its id.  ``ValueError`` if the username is
        taken or empty."""
        _check_text(username, "username")
        if not username:
            raise ValueError("username must not be empty")
        created = to_ms(self._clock(), "clock()")

        def body(conn):
            try:
                cur = conn.execute(
                    "INSERT INTO users (username, created_at) VALUES (?, ?)", (username, created)
                )
            except sqlite3.IntegrityError:
                raise ValueError(f"username {username!r} is taken") from None
            return cur.lastrowid, ()

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
        user_id = _check_id(user_id, "user_id")
        _check_text(name, "name")
        _check_text(description, "description", optional=True)
        _check_text(location, "location", optional=True)
        start_ms = to_ms(start, "start")
        end_ms = None if end is None else to_ms(end, "end")
        if end_ms is not None and end_ms < start_ms:
            raise ValueError("end must not be before start")
        created_ms = to_ms(self._clock() if created_at is None else created_at, "created_at")

        def body(conn):
            try:
                cur = conn.execute(
                    "INSERT INTO events (user_id, name, start_time, end_time, created_at,"
                    " description, location) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (user_id, name, start_ms, end_ms, created_ms, description, location),
                )
            except sqlite3.IntegrityError:
                raise LookupError(f"no user with id {user_id}") from None
            event_id = cur.lastrowid
            return event_id, (
                (BY_CREATION, _ADD, user_id, 0, created_ms, event_id),
                (BY_START, _ADD, user_id, 0, start_ms, event_id),
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
        user_id = _check_id(user_id, "user_id")
        event_id = _check_id(event_id, "event_id")
        if name is not _UNSET:
            _check_text(name, "name")
        if description is not _UNSET:
            _check_text(description, "description", optional=True)
        if location is not _UNSET:
            _check_text(location, "location", optional=True)
        start_ms = _UNSET if start is _UNSET else to_ms(start, "start")
        end_ms = _UNSET if end is _UNSET or end is None else to_ms(end, "end")
        if end is None:
            end_ms = None

        def body(conn):
            if start_ms is _UNSET:
                rows = conn.execute(_SELECT_EVENT, (event_id,)).fetchall()
            else:  # the start may move: the followers' items move with it
                rows = conn.execute(_SELECT_EVENT_AND_FOLLOWERS, (event_id,)).fetchall()
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
                "UPDATE events SET name = ?, start_time = ?, end_time = ?, description = ?,"
                " location = ? WHERE id = ?",
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
            ops = [(BY_START, _MOVE, owner, old_start, new_start, event_id)]
            for row in rows:
                if row[6] is not None:
                    ops.append((FOLLOWED_BY_START, _MOVE, row[6], old_start, new_start, event_id))
            return None, ops

        self._write("update_event", body)

    def delete_event(self, user_id: int, event_id: int) -> None:
        """Delete an event and (cascading) its follows.  Only its owner may:
        ``PermissionError`` otherwise; ``LookupError`` if there is no such
        event."""
        user_id = _check_id(user_id, "user_id")
        event_id = _check_id(event_id, "event_id")

        def body(conn):
            # The event and who followed it: their follows go with the event
            # (ON DELETE CASCADE).  One statement (see _SELECT_EVENT_AND_FOLLOWERS).
            rows = conn.execute(
                "SELECT e.user_id, e.created_at, e.start_time, f.user_id FROM events e"
                " LEFT JOIN event_follows f ON f.event_id = e.id WHERE e.id = ?",
                (event_id,),
            ).fetchall()
            if not rows:
                raise LookupError(f"no event with id {event_id}")
            owner, created, start = rows[0][:3]
            if owner != user_id:
                raise PermissionError(f"user {user_id} does not own event {event_id}")
            conn.execute("DELETE FROM events WHERE id = ?", (event_id,))
            ops = [
                (BY_CREATION, _REMOVE, owner, created, 0, event_id),
                (BY_START, _REMOVE, owner, start, 0, event_id),
            ]
            for row in rows:
                follower = row[3]
                if follower is not None:
                    ops.append((FOLLOWS, _REMOVE, follower, 0, 0, event_id))
                    ops.append((FOLLOWED_BY_START, _REMOVE, follower, start, 0, event_id))
            return None, ops

        self._write("delete_event", body)

    def follow_event(self, user_id: int, event_id: int) -> bool:
        """``user_id`` follows ``event_id``; True if it was not following yet
        (idempotent).  ``LookupError`` for an unknown user or event."""
        user_id = _check_id(user_id, "user_id")
        event_id = _check_id(event_id, "event_id")
        created = to_ms(self._clock(), "clock()")

        def body(conn):
            try:
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO event_follows (user_id, event_id, created_at)"
                    " VALUES (?, ?, ?)",
                    (user_id, event_id, created),
                ).rowcount
            except sqlite3.IntegrityError:
                raise self._missing(conn, user_id, event_id) from None
            if not inserted:
                return False, ()
            start = self._event_start(conn, event_id)
            return True, (
                (FOLLOWS, _ADD, user_id, 0, 0, event_id),
                (FOLLOWED_BY_START, _ADD, user_id, 0, start, event_id),
            )

        return self._write("follow_event", body)

    def unfollow_event(self, user_id: int, event_id: int) -> bool:
        """``user_id`` stops following ``event_id``; True if it was following
        (idempotent).  ``LookupError`` for an unknown user or event."""
        user_id = _check_id(user_id, "user_id")
        event_id = _check_id(event_id, "event_id")

        def body(conn):
            deleted = conn.execute(
                "DELETE FROM event_follows WHERE user_id = ? AND event_id = ?",
                (user_id, event_id),
            ).rowcount
            if not deleted:
                error = self._missing(conn, user_id, event_id)
                if error is not None:
                    raise error
                return False, ()
            start = self._event_start(conn, event_id)
            return True, (
                (FOLLOWS, _REMOVE, user_id, 0, 0, event_id),
                (FOLLOWED_BY_START, _REMOVE, user_id, start, 0, event_id),
            )

        return self._write("unfollow_event", body)

    def _event_start(self, conn: sqlite3.Connection, event_id: int) -> int:
        """Start time of an existing event, inside a write transaction that
        has caught up: from the start cache, else (and then remembered) from
        the table.  (A separate SELECT is cheaper than RETURNING with a
        subquery, and the cache cheaper than both.)"""
        start = self._starts.get(event_id)
        if start is None:
            start = conn.execute(
                "SELECT start_time FROM events WHERE id = ?", (event_id,)
            ).fetchone()[0]
            self._starts.set(event_id, start)
        return start

    @staticmethod
    def _missing(conn: sqlite3.Connection, user_id: int, event_id: int) -> Optional[LookupError]:
        if conn.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchone() is None:
            return LookupError(f"no event with id {event_id}")
        if conn.execute("SELECT 1 FROM users WHERE id = ?", (user_id,)).fetchone() is None:
            return LookupError(f"no user with id {user_id}")
        return None

    # -- reads ----------------------------------------------------------------

    def user_id(self, username: str) -> Optional[int]:
        """The id of ``username``, or None."""
        _check_text(username, "username")
        with self._lock:
            return self._lookup_user(username)

    def _lookup_user(self, username: str) -> Optional[int]:
        user_id = self._user_ids.get(username)
        if user_id is None:
            row = self._conn.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchone()
            if row is None:
                return None  # not cached: another process may create it
            user_id = self._user_ids[username] = row[0]
        return user_id

    def get_event(self, event_id: int) -> Optional[dict]:
        """The event's row as a dict (times in ms), or None."""
        event_id = _check_id(event_id, "event_id")
        with self._lock:
            cur = self._conn.execute(
                "SELECT id, user_id, name, start_time, end_time, created_at, description, location"
                " FROM events WHERE id = ?",
                (event_id,),
            )
            row = cur.fetchone()
            if row is None:
                return None
            return dict(zip((c[0] for c in cur.description), row))

    def _now_ms(self, now: Optional[datetime]) -> int:
        return to_ms(self._clock() if now is None else now, "now")

    def get_user_stats(self, username: str, now: Optional[datetime] = None) -> UserStats:
        """The user's stats at ``now`` (default: the clock), from five
        bounded aggregate counts: O(log n), no query grows with the user's
        data.  An unknown username gets zeros.  See :class:`UserStats` for the
        exact semantics."""
        _check_text(username, "username")
        now_ms = self._now_ms(now)
        with self._lock:
            self._sync()
            user_id = self._lookup_user(username)
            if user_id is None:
                return UserStats.zero()
            tables = self._tables
            by_creation = tables[BY_CREATION].aggregate
            return UserStats.from_parts(
                captures_this_week=by_creation.count(
                    namespace=user_id, lower=now_ms - WEEK_MS, upper=now_ms
                ),
                upcoming_own=tables[BY_START].aggregate.count(
                    namespace=user_id, lower=_exclusive(now_ms)
                ),
                upcoming_followed=tables[FOLLOWED_BY_START].aggregate.count(
                    namespace=user_id, lower=now_ms
                ),
                all_time_own=by_creation.count(namespace=user_id),
                total_follows=tables[FOLLOWS].aggregate.count(namespace=user_id),
            )

    def get_user_stats_naive(self, username: str, now: Optional[datetime] = None) -> UserStats:
        """The same stats computed the way the original app did: load every
        event and follow of the user, filter in Python, and fetch each
        followed event with its own query (N+1).  O(n); the baseline for
        benchmarks and the oracle for tests."""
        _check_text(username, "username")
        now_ms = self._now_ms(now)
        week_ago = now_ms - WEEK_MS
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN")  # one snapshot for all the queries
            try:
                row = conn.execute("SELECT id FROM users WHERE username = ?", (username,)).fetchone()
                if row is None:
                    return UserStats.zero()
                user_id = row[0]
                events = conn.execute(
                    "SELECT id, user_id, name, start_time, end_time, created_at, description,"
                    " location FROM events WHERE user_id = ?",
                    (user_id,),
                ).fetchall()
                follows = conn.execute(
                    "SELECT user_id, event_id, created_at FROM event_follows WHERE user_id = ?",
                    (user_id,),
                ).fetchall()
                upcoming_followed = 0
                for follow in follows:
                    event = conn.execute(
                        "SELECT id, user_id, name, start_time, end_time, created_at, description,"
                        " location FROM events WHERE id = ?",
                        (follow[1],),
                    ).fetchone()
                    if event is not None and event[3] >= now_ms:
                        upcoming_followed += 1
            finally:
                conn.execute("COMMIT")
        return UserStats.from_parts(
            captures_this_week=sum(1 for e in events if week_ago <= e[5] <= now_ms),
            upcoming_own=sum(1 for e in events if e[3] > now_ms),
            upcoming_followed=upcoming_followed,
            all_time_own=len(events),
            total_follows=len(follows),
        )

    # -- change log -----------------------------------------------------------

    def compact_change_log(self, keep: Optional[int] = None) -> int:
        """Delete all but the newest ``keep`` change-log rows (default:
        ``change_log_keep``; the newest row always stays).  Returns the
        number of rows deleted.  Stores that still needed them reload in bulk
        on their next read."""
        keep = self._keep if keep is None else keep
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError("keep must be a non-negative int")
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                top = conn.execute("SELECT coalesce(max(id), 0) FROM aggtree_changes").fetchone()[0]
                cur = conn.execute(
                    "DELETE FROM aggtree_changes WHERE id <= ? AND id < ?", (top - keep, top)
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return cur.rowcount

    # -- migration --------------------------------------------------------------

    def initialize_aggregates(
        self, batch_size: int = 5000, progress: Optional[bool] = None, *, restart: bool = False
    ) -> MigrationReport:
        """The backfill: upsert every event and follow into the aggregates,
        ``batch_size`` rows at a time (keyset pagination by ``(user_id,
        id)``), each batch read in one snapshot after replaying the change
        log, so live writes may interleave.

        ``progress``: a tqdm bar on a terminal and log lines (logger
        ``aggtree.events``, INFO) otherwise; ``None`` (default) shows it only
        on a terminal, ``False`` never.

        Idempotent (upserts: a second run inserts nothing) and resumable: if
        a run is interrupted (any exception, Ctrl-C), the next call continues
        after the last completed batch (``restart=True`` starts over).  The
        progress lives with the aggregates it describes, in this store.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError("batch_size must be a positive int")
        started = time.perf_counter()
        with self._lock:
            self._sync()
            resumed = self._migration is not None and not restart
            if not resumed:
                self._migration = {"phase": "events", "after": (-(2**63), -(2**63)),
                                   "events": 0, "follows": 0, "inserted": 0, "batches": 0}
            state = self._migration
            n_events = self._conn.execute("SELECT count(*) FROM events").fetchone()[0]
            n_follows = self._conn.execute("SELECT count(*) FROM event_follows").fetchone()[0]
        show = progress if progress is not None else sys.stderr.isatty()
        bar = _Progress(n_events + n_follows, "initialize aggregates", show)
        bar.update(min(state["events"] + state["follows"], bar.total))
        try:
            while state["phase"] != "done":
                with self._lock:
                    if self._migration is not state:
                        break  # the aggregates were reloaded in bulk meanwhile: complete
                    n = self._migrate_batch(state, batch_size)
                bar.update(n)
        finally:
            bar.close()
        with self._lock:
            if self._migration is state:
                self._migration = None
        return MigrationReport(
            events=state["events"],
            follows=state["follows"],
            inserted=state["inserted"],
            batches=state["batches"],
            seconds=time.perf_counter() - started,
            resumed=resumed,
        )

    def _migrate_batch(self, state: dict, batch_size: int) -> int:
        """One batch of the migration; advances ``state`` only when the batch
        is fully applied.  Returns the number of rows processed."""
        conn = self._conn
        reloads = self.reloads
        if self._stale:
            self._reload()
        self._begin_caught_up()
        if self.reloads != reloads:  # a bulk reload is a complete migration
            conn.execute("COMMIT")
            state["phase"] = "done"
            return 0
        try:
            after = state["after"]
            if state["phase"] == "events":
                rows = conn.execute(
                    "SELECT user_id, id, created_at, start_time FROM events"
                    " WHERE (user_id, id) > (?, ?) ORDER BY user_id, id LIMIT ?",
                    (after[0], after[1], batch_size),
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT f.user_id, f.event_id, e.start_time FROM event_follows f"
                    " JOIN events e ON e.id = f.event_id"
                    " WHERE (f.user_id, f.event_id) > (?, ?)"
                    " ORDER BY f.user_id, f.event_id LIMIT ?",
                    (after[0], after[1], batch_size),
                ).fetchall()
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        if state["phase"] == "events":
            for _owner, event_id, _created, start in rows:
                self._starts.set(event_id, start)
            inserted = self._upsert_rows(rows, ((BY_CREATION, 2), (BY_START, 3)))
            state["events"] += len(rows)
        else:
            inserted = self._upsert_rows(rows, ((FOLLOWS, None), (FOLLOWED_BY_START, 2)))
            state["follows"] += len(rows)
        state["inserted"] += inserted
        state["batches"] += 1
        if len(rows) < batch_size:
            if state["phase"] == "events":
                state["phase"], state["after"] = "follows", (-(2**63), -(2**63))
            else:
                state["phase"] = "done"
        else:
            state["after"] = (rows[-1][0], rows[-1][1])
        return len(rows)

    def _upsert_rows(self, rows: list, targets: tuple) -> int:
        """Upsert rows ``(namespace, id, ...)`` into each target aggregate
        (index, key column or None for the key None).  One ``insert_many``
        per namespace when none of its items exists yet, item by item
        otherwise.  Returns the number of items inserted."""
        inserted = 0
        for _ns, group in itertools.groupby(rows, key=lambda r: r[0]):
            group = list(group)
            ns = group[0][0]
            ids = [r[1] for r in group]
            for a, col in targets:
                agg = self._tables[a].aggregate
                keys = [None] * len(group) if col is None else [r[col] for r in group]
                try:
                    agg.insert_many(keys, ids, namespace=ns)
                    inserted += len(group)
                except DuplicateItemError:
                    for key, id_ in zip(keys, ids):
                        inserted += agg.upsert(key, id_, namespace=ns)
        return inserted

    # -- verification -----------------------------------------------------------

    def verify_aggregates(self, repair: bool = False, *, max_listed: Optional[int] = None) -> VerifyReport:
        """Compare every aggregate with the tables, item by item.

        Reads the tables in one snapshot (after replaying the change log),
        reads every item of every aggregate, and reports each difference
        (:class:`Difference`: missing, extra, wrong key or wrong value).  With
        ``repair=True`` the aggregates are then fixed to match the tables.
        ``max_listed`` caps the list (not the counts).  O(n log n).
        """
        with self._lock:
            self._sync()
            conn = self._conn
            self._begin_caught_up()
            try:
                ev = _read_matrix(conn, "SELECT user_id, created_at, start_time, id FROM events", 4)
                fo = _read_matrix(
                    conn,
                    "SELECT f.user_id, e.start_time, f.event_id FROM event_follows f"
                    " JOIN events e ON e.id = f.event_id",
                    3,
                )
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
            # The start cache mirrors the table (not the aggregate): refill it
            # from this snapshot, which also undoes any drift it picked up
            # from writes that bypassed the store.
            self._starts.load(ev[:, 3], ev[:, 2])
            expected = [
                ev[:, [0, 1, 3]],
                ev[:, [0, 2, 3]],
                np.column_stack([fo[:, 0], np.zeros(len(fo), dtype=np.int64), fo[:, 2]]),
                fo,
            ]
            differences: list = []
            counts: dict = {}
            checked: dict = {}
            for a, name in enumerate(AGGREGATE_NAMES):
                agg = self._tables[a].aggregate
                actual, odd, valued = _aggregate_items(agg, key_is_none=(a == FOLLOWS))
                missing, extra = _diff_rows(expected[a], actual)
                checked[name] = len(expected[a])
                found = _classify(name, missing, extra, odd, key_is_none=(a == FOLLOWS))
                if valued:  # right items with a value other than 0.0
                    flagged = {(d.namespace, d.actual_key, d.id) for d in found}
                    found.extend(
                        Difference(name, "wrong_value", ns, i, k, k, v)
                        for ns, k, i, v in valued
                        if (ns, k, i) not in flagged
                    )
                for kind in ("missing", "extra", "wrong_key", "wrong_value"):
                    counts[(name, kind)] = sum(1 for d in found if d.kind == kind)
                if max_listed is None:
                    differences.extend(found)
                else:
                    differences.extend(found[: max(0, max_listed - len(differences))])
                if repair and found:
                    _repair(agg, found)
            return VerifyReport(differences=differences, counts=counts, checked=checked,
                                repaired=bool(repair and any(counts.values())))


def _exclusive(key: int) -> Bound:
    return Bound(key, inclusive=False)


def _aggregate_items(agg: Any, *, key_is_none: bool) -> tuple:
    """Every item of ``agg`` as an (n, 3) int64 array (namespace, key, id)
    sorted by (namespace, key, id); the items that do not fit that form (odd
    namespaces, ids or keys) as a list of (namespace, key, id); and the items
    whose value is not 0.0 as a list of (namespace, key, id, value)."""
    odd: list = []
    valued: list = []
    int_namespaces = []
    for ns in agg.namespaces():
        if _is_int(ns):
            int_namespaces.append(int(ns))
        else:
            keys, ids, _values = agg.to_arrays(namespace=ns)
            odd.extend(zip([ns] * len(ids), _py_list(keys), _py_list(ids)))
    int_namespaces.sort()  # items come (key, id)-sorted within a namespace
    ns_parts, key_parts, id_parts = [], [], []
    for ns in int_namespaces:
        keys, ids, values = agg.to_arrays(namespace=ns)
        nonzero = np.flatnonzero(np.asarray(values, dtype=np.float64))
        if len(nonzero):
            k_list, i_list, v_list = _py_list(keys), _py_list(ids), _py_list(values)
            valued.extend((ns, k_list[j], i_list[j], v_list[j]) for j in nonzero.tolist())
        keys_i, ids_i = _int_columns(keys, ids, key_is_none)
        if keys_i is None:  # item by item: the odd ones apart
            good_k, good_i = [], []
            for k, i in zip(_py_list(keys), _py_list(ids)):
                if _is_int(i) and (k is None if key_is_none else _is_int(k)):
                    good_k.append(0 if key_is_none else int(k))
                    good_i.append(int(i))
                else:
                    odd.append((ns, k, i))
            keys_i = np.array(good_k, dtype=np.int64)
            ids_i = np.array(good_i, dtype=np.int64)
        ns_parts.append(len(ids_i))
        key_parts.append(keys_i)
        id_parts.append(ids_i)
    if not int_namespaces:
        return np.zeros((0, 3), dtype=np.int64), odd, valued
    rows = np.empty((sum(ns_parts), 3), dtype=np.int64)
    rows[:, 0] = np.repeat(np.array(int_namespaces, dtype=np.int64), ns_parts)
    rows[:, 1] = np.concatenate(key_parts)
    rows[:, 2] = np.concatenate(id_parts)
    return rows, odd, valued


def _int_columns(keys: Any, ids: Any, key_is_none: bool) -> tuple:
    """``(keys, ids)`` as exact int64 arrays (zeros for None keys), or
    ``(None, None)`` if some key or id is not such an int."""
    try:
        ids_a = np.asarray(ids)
        ids_i = ids_a.astype(np.int64)
        if ids_a.dtype.kind not in "iu" and not (ids_i == ids_a).all():
            return None, None
        keys_a = np.asarray(keys)
        if key_is_none:
            if not (keys_a.dtype == object and np.equal(keys_a, None).all()):
                return None, None
            return np.zeros(len(ids_i), dtype=np.int64), ids_i
        keys_i = keys_a.astype(np.int64)
        if keys_a.dtype.kind not in "iu" and not (keys_i == keys_a).all():
            return None, None
        return keys_i, ids_i
    except (TypeError, ValueError, OverflowError):
        return None, None


def _py_list(a: Any) -> list:
    """An array of keys or ids as a list of plain Python objects."""
    if isinstance(a, np.ndarray):
        return a.tolist()
    return list(a)


def _is_int(x: Any) -> bool:
    """An int that fits in int64 (the type of every namespace, key and id the
    tables produce)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and -(2**63) <= x < 2**63


def _diff_rows(expected: np.ndarray, actual: np.ndarray) -> tuple:
    """Rows of ``expected`` not in ``actual`` and rows of ``actual`` not in
    ``expected`` (each side has unique rows; ``actual`` is sorted)."""
    expected = np.asarray(expected, dtype=np.int64).reshape(-1, 3)
    actual = np.asarray(actual, dtype=np.int64).reshape(-1, 3)
    expected = expected[np.lexsort((expected[:, 2], expected[:, 1], expected[:, 0]))]
    if expected.shape == actual.shape and np.array_equal(expected, actual):
        return expected[:0], actual[:0]  # the common case: no difference
    rows = np.concatenate([expected, actual])
    side = np.concatenate([np.zeros(len(expected), np.int8), np.ones(len(actual), np.int8)])
    order = np.lexsort((side, rows[:, 2], rows[:, 1], rows[:, 0]))
    rows, side = rows[order], side[order]
    same = np.all(rows[1:] == rows[:-1], axis=1)
    matched = np.zeros(len(rows), dtype=bool)
    matched[:-1] |= same
    matched[1:] |= same
    lone = ~matched
    return rows[lone & (side == 0)], rows[lone & (side == 1)]


def _classify(name: str, missing: np.ndarray, extra: np.ndarray, odd: list, *, key_is_none: bool) -> list:
    """Differences from the unmatched rows: a missing and an extra item with
    the same (namespace, id) are one wrong key."""
    def key_out(k):
        return None if key_is_none else int(k)

    extra_items = [(int(ns), key_out(k), int(i)) for ns, k, i in extra.tolist()] + list(odd)
    by_ns_id: dict = {}
    for ns, k, i in extra_items:
        by_ns_id.setdefault((ns, i), []).append(k)
    found = []
    for ns, k, i in missing.tolist():
        ns, i = int(ns), int(i)
        wrong = by_ns_id.get((ns, i))
        if wrong:
            found.append(Difference(name, "wrong_key", ns, i, key_out(k), wrong.pop(0)))
        else:
            found.append(Difference(name, "missing", ns, i, key_out(k), None))
    for (ns, i), keys in by_ns_id.items():
        for k in keys:
            found.append(Difference(name, "extra", ns, i, None, k))
    return found


def _repair(agg: Any, found: list) -> None:
    for d in found:
        if d.kind in ("extra", "wrong_key"):
            agg.delete_if_exists(d.actual_key, d.id, namespace=d.namespace)
    for d in found:
        if d.kind in ("missing", "wrong_key", "wrong_value"):
            agg.upsert(d.expected_key, d.id, 0.0, namespace=d.namespace)


# ---------------------------------------------------------------------------
# Module-level forms
# ---------------------------------------------------------------------------


def get_user_stats(store: EventStore, username: str, now: Optional[datetime] = None) -> UserStats:
    """``store.get_user_stats(username, now)``."""
    return store.get_user_stats(username, now)


def get_user_stats_naive(store: EventStore, username: str, now: Optional[datetime] = None) -> UserStats:
    """``store.get_user_stats_naive(username, now)``."""
    return store.get_user_stats_naive(username, now)


def initialize_aggregates(store: EventStore, batch_size: int = 5000, progress: Optional[bool] = None) -> MigrationReport:
    """``store.initialize_aggregates(batch_size, progress)``."""
    return store.initialize_aggregates(batch_size, progress)


def verify_aggregates(store: EventStore, repair: bool = False) -> VerifyReport:
    """``store.verify_aggregates(repair)``."""
    return store.verify_aggregates(repair)


# ---------------------------------------------------------------------------
# Synthetic data
# ---------------------------------------------------------------------------


def generate_dataset(
    path: str,
    *,
    users: int = 2000,
    events: int = 200_000,
    follows: int = 100_000,
    heavy_events: Optional[list] = None,
    heavy_follows: Optional[list] = None,
    seed: int = 0,
    now: Optional[datetime] = None,
) -> DatasetInfo:
    """Fill the (new or empty) database at ``path`` with a skewed, realistic
    dataset, fast (numpy + one ``executemany`` transaction per table).

    A few heavy users (``heavy-1``, ``heavy-2``...) own ``heavy_events[i]``
    events and follow ``heavy_follows[i]`` events (default: 25%, 12.5% and
    6.25% of ``events`` and 20%, 10%, 5% of ``follows``); the rest is spread
    over light users (``user-000004``...) with a long-tailed distribution.
    Events were created over the last two years (more of them recently),
    start between 30 days before and 120 days after creation and last 1 to 4
    hours; popular events collect most follows.  Deterministic for a given
    ``seed`` and ``now``.
    """
    started = time.perf_counter()
    now_ms = to_ms(now if now is not None else _utcnow(), "now")
    if heavy_events is None:
        heavy_events = [int(events * f) for f in (0.25, 0.125, 0.0625)]
    if heavy_follows is None:
        heavy_follows = [int(follows * f) for f in (0.20, 0.10, 0.05)][: len(heavy_events)]
    heavy_follows = list(heavy_follows) + [0] * (len(heavy_events) - len(heavy_follows))
    n_heavy = len(heavy_events)
    if users < n_heavy + 1:
        raise ValueError(f"users must be at least {n_heavy + 1}")
    if sum(heavy_events) > events or sum(heavy_follows) > follows:
        raise ValueError("the heavy users cannot have more than the totals")
    rng = np.random.default_rng(seed)
    day = 24 * 3600 * 1000

    # Users: ids 1..users; the heavy ones first.
    names = [f"heavy-{i + 1}" for i in range(n_heavy)] + [
        f"user-{i:06d}" for i in range(n_heavy + 1, users + 1)
    ]
    user_created = now_ms - 800 * day

    # Owners: fixed counts for heavy users, a long tail for the others.
    light_users = np.arange(n_heavy + 1, users + 1)
    weights = 1.0 / (np.arange(len(light_users)) + 10.0) ** 1.1
    weights /= weights.sum()
    n_light = events - sum(heavy_events)
    owners = np.concatenate(
        [np.full(c, i + 1, dtype=np.int64) for i, c in enumerate(heavy_events)]
        + [rng.choice(light_users, size=n_light, p=weights)]
    )
    rng.shuffle(owners)  # interleave ids like real traffic
    # Creation: over two years, a third of them in the last 60 days.
    age = np.where(rng.random(events) < 0.33, rng.random(events) * 60 * day, rng.random(events) * 730 * day)
    created = now_ms - age.astype(np.int64)
    starts = created + rng.integers(-30 * day, 120 * day, size=events)
    ends = starts + rng.integers(3600 * 1000, 4 * 3600 * 1000, size=events)

    # Follows: followers skewed like owners; followed events Zipf-popular.
    n_light_f = follows - sum(heavy_follows)
    followers = np.concatenate(
        [np.full(c, i + 1, dtype=np.int64) for i, c in enumerate(heavy_follows)]
        + [rng.choice(light_users, size=n_light_f, p=weights)]
    )
    popularity = rng.permutation(events) + 1  # event id by popularity rank

    def draw(n: int) -> np.ndarray:
        # Half the follows go to a Pareto-popular head, half anywhere.
        ranks = (rng.pareto(0.8, size=n) * max(events // 50, 1)).astype(np.int64)
        ranks = np.where(rng.random(n) < 0.5, ranks, rng.integers(0, max(events, 1), size=n))
        return popularity[np.minimum(ranks, events - 1)]

    f_users = followers
    f_events = draw(len(f_users)) if events else np.zeros(0, dtype=np.int64)
    keep = np.arange(len(f_users))
    for _ in range(50):  # redraw the duplicate pairs until none is left
        _, keep = np.unique(f_users * (events + 1) + f_events, return_index=True)
        dup = np.ones(len(f_users), dtype=bool)
        dup[keep] = False
        if not dup.any():
            break
        f_events[dup] = draw(int(dup.sum()))
    f_users, f_events = f_users[keep], f_events[keep]  # sorted by (user, event)
    f_created = np.maximum(created[f_events - 1], now_ms - 365 * day) + rng.integers(0, 7 * day, size=len(f_users))

    conn = _connect(path, 30.0, "OFF")
    try:
        conn.execute("PRAGMA cache_size = -262144")  # 256 MiB: no thrashing on big loads
        create_schema(conn)
        if conn.execute("SELECT count(*) FROM users").fetchone()[0]:
            raise ValueError(f"{path} already holds data")
        conn.execute("BEGIN")
        # Secondary indexes are cheaper to build once, sorted, after the load.
        conn.execute("DROP INDEX events_user")
        conn.execute("DROP INDEX event_follows_event")
        conn.executemany(
            "INSERT INTO users (id, username, created_at) VALUES (?, ?, ?)",
            zip(range(1, users + 1), names, itertools.repeat(user_created)),
        )
        conn.executemany(
            "INSERT INTO events (id, user_id, name, start_time, end_time, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            zip(
                range(1, events + 1),
                owners.tolist(),
                itertools.repeat("event"),
                starts.tolist(),
                ends.tolist(),
                created.tolist(),
            ),
        )
        conn.executemany(
            "INSERT INTO event_follows (user_id, event_id, created_at) VALUES (?, ?, ?)",
            zip(f_users.tolist(), f_events.tolist(), f_created.tolist()),
        )
        for stmt in _SCHEMA:  # the indexes again
            conn.execute(stmt)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    return DatasetInfo(users, events, len(f_users), names[:n_heavy], time.perf_counter() - started)
