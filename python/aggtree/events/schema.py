"""The event store's data model, shared by every backend: the tables and the
statements the store runs on them (:class:`Dialect`, written once in
portable SQL), the four aggregates by index, times as milliseconds, and the
checks of write arguments.

Tables (every time an integer number of milliseconds since the Unix epoch,
UTC):

* ``users(id, username UNIQUE, created_at)``
* ``events(id, user_id -> users, name, start_time, end_time, created_at,
  description, location)``, indexed by ``user_id``
* ``event_follows(user_id -> users, event_id -> events ON DELETE CASCADE,
  created_at)``, primary key ``(user_id, event_id)``, indexed by
  ``event_id``
* ``aggtree_changes(id, kind, ops)``: the change log (one row per write
  that changed an aggregate; see :mod:`aggtree.events.backend` for what its
  ids guarantee)
* ``aggtree_meta(name, value)``: the schema version and the store id (a
  random uuid, set once)
* the warm-start state (:mod:`aggtree.events.warm`): a token and a dirty
  flag, set by triggers on ``events`` and ``event_follows``

A backend writes the DDL in its own dialect (types, ``WITHOUT ROWID``...)
and may keep tables of its own (SQLite: ``aggtree_stores``, the registry).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import numpy as np

__all__ = [
    "SCHEMA_VERSION",
    "AGGREGATE_NAMES",
    "BY_CREATION",
    "BY_START",
    "FOLLOWS",
    "FOLLOWED_BY_START",
    "WEEK_MS",
    "Dialect",
    "to_ms",
    "from_ms",
]

SCHEMA_VERSION = 2  # 2: the warm-start state (aggtree_state, its triggers, a store id)

# The four aggregates, by index (the index is what the change log stores).
BY_CREATION, BY_START, FOLLOWS, FOLLOWED_BY_START = range(4)
AGGREGATE_NAMES = (
    "events_by_creation",
    "events_by_start",
    "event_follows",
    "followed_events_by_start",
)

WEEK_MS = 7 * 24 * 3600 * 1000

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
_UNSET: Any = object()  # "argument not given" (None is a value for some fields)


# ---------------------------------------------------------------------------
# Statements
# ---------------------------------------------------------------------------


class Dialect:
    """The SQL the store, the stats, the migration and verify run, written
    once with ``?`` placeholders in SQL that SQLite and PostgreSQL both
    accept (row values, ``coalesce``, ``LEFT JOIN``, ``ON CONFLICT DO
    NOTHING``).

    A backend subclasses it to speak its dialect: ``placeholder`` (``?`` for
    sqlite3; ``%s`` for psycopg, substituted into every statement at
    construction), ``schema`` (its DDL, run in order by the backend, each
    statement idempotent), and any statement whose syntax differs: an
    ``INSERT`` whose new id the driver does not report (PostgreSQL: add
    ``RETURNING id`` to ``insert_user``, ``insert_event`` and ``log_append``;
    :meth:`Backend.inserted_id <aggtree.events.backend.Backend.inserted_id>`
    then reads it), or a locking clause (``FOR UPDATE`` / ``FOR SHARE``) a
    backend needs to keep what a write reads stable.  Every statement keeps
    its parameters and result columns in the order given here: the callers
    index them by position.
    """

    placeholder = "?"
    schema: tuple = ()

    # -- writes (store.py) ---------------------------------------------------
    insert_user = "INSERT INTO users (username, created_at) VALUES (?, ?)"
    insert_event = (
        "INSERT INTO events (user_id, name, start_time, end_time, created_at,"
        " description, location) VALUES (?, ?, ?, ?, ?, ?, ?)"
    )
    # update_event's read of the event; with a new start also its followers
    # (one row per follower, NULL if none).  Measured on SQLite inside a
    # write transaction: the event's SELECT 2.0 us plus a followers SELECT
    # 1.4 us, the join 2.5 us.
    select_event = (
        "SELECT user_id, name, start_time, end_time, description, location, NULL"
        " FROM events WHERE id = ?"
    )
    select_event_and_followers = (
        "SELECT e.user_id, e.name, e.start_time, e.end_time, e.description, e.location, f.user_id"
        " FROM events e LEFT JOIN event_follows f ON f.event_id = e.id WHERE e.id = ?"
    )
    update_event = (
        "UPDATE events SET name = ?, start_time = ?, end_time = ?, description = ?,"
        " location = ? WHERE id = ?"
    )
    # delete_event's read: the event and who followed it (their follows go
    # with the event, ON DELETE CASCADE), in one statement.
    select_event_to_delete = (
        "SELECT e.user_id, e.created_at, e.start_time, f.user_id FROM events e"
        " LEFT JOIN event_follows f ON f.event_id = e.id WHERE e.id = ?"
    )
    delete_event = "DELETE FROM events WHERE id = ?"
    # Idempotent: rowcount 0 when the follow exists (a foreign-key violation
    # still raises: ON CONFLICT covers uniqueness only).
    insert_follow = (
        "INSERT INTO event_follows (user_id, event_id, created_at) VALUES (?, ?, ?)"
        " ON CONFLICT (user_id, event_id) DO NOTHING"
    )
    delete_follow = "DELETE FROM event_follows WHERE user_id = ? AND event_id = ?"
    select_start = "SELECT start_time FROM events WHERE id = ?"
    # Row locks for a backend with concurrent writers (PostgreSQL; empty:
    # none, the writers are serialised): ``lock_event`` runs first in
    # update_event and delete_event; with ``select_start_locked`` (the start
    # read FOR SHARE, never from the start cache) follow_event and
    # unfollow_event read the event first, and follow inserts with
    # ``insert_follow_checked`` (params event_id, created_at, user_id;
    # returns a row iff inserted; a missing user inserts nothing).
    lock_event = ""
    select_start_locked = ""
    insert_follow_checked = ""
    event_exists = "SELECT 1 FROM events WHERE id = ?"
    user_exists = "SELECT 1 FROM users WHERE id = ?"

    # -- reads (store.py, stats.py) -----------------------------------------
    user_by_name = "SELECT id FROM users WHERE username = ?"
    event_by_id = (
        "SELECT id, user_id, name, start_time, end_time, created_at, description, location"
        " FROM events WHERE id = ?"
    )
    events_of_user = (
        "SELECT id, user_id, name, start_time, end_time, created_at, description,"
        " location FROM events WHERE user_id = ?"
    )
    follows_of_user = "SELECT user_id, event_id, created_at FROM event_follows WHERE user_id = ?"

    # -- bulk reads (sync.py: load; verify.py) -------------------------------
    all_events = "SELECT id, user_id, created_at, start_time FROM events ORDER BY id"
    all_follows = "SELECT user_id, event_id FROM event_follows ORDER BY user_id, event_id"
    verify_events = "SELECT user_id, created_at, start_time, id FROM events"
    verify_follows = (
        "SELECT f.user_id, e.start_time, f.event_id FROM event_follows f"
        " JOIN events e ON e.id = f.event_id"
    )

    # -- migration (migrate.py): keyset pagination by (user_id, id) ---------
    count_events = "SELECT count(*) FROM events"
    count_follows = "SELECT count(*) FROM event_follows"
    events_after = (
        "SELECT user_id, id, created_at, start_time FROM events"
        " WHERE (user_id, id) > (?, ?) ORDER BY user_id, id LIMIT ?"
    )
    follows_after = (
        "SELECT f.user_id, f.event_id, e.start_time FROM event_follows f"
        " JOIN events e ON e.id = f.event_id"
        " WHERE (f.user_id, f.event_id) > (?, ?)"
        " ORDER BY f.user_id, f.event_id LIMIT ?"
    )

    # -- the change log (sync.py, store.py) ----------------------------------
    log_head = "SELECT coalesce(max(id), 0) FROM aggtree_changes"
    log_after = "SELECT id, ops FROM aggtree_changes WHERE id > ? ORDER BY id"
    log_append = "INSERT INTO aggtree_changes (kind, ops) VALUES (?, ?)"
    log_prune = "DELETE FROM aggtree_changes WHERE id <= ?"
    log_compact = "DELETE FROM aggtree_changes WHERE id <= ? AND id < ?"  # (up to, head)

    # -- warm start (warm.py, backend.py): clear the dirty flag ---------------
    warm_vouch = ""

    def __init__(self) -> None:
        # Every statement becomes an instance attribute, in this dialect's
        # placeholders (an instance attribute is also the quickest to read:
        # the hooks read one or two per write).
        for name in dir(type(self)):
            value = getattr(self, name)
            if isinstance(value, str) and name != "placeholder" and not name.startswith("_"):
                setattr(self, name, value.replace("?", self.placeholder))


# ---------------------------------------------------------------------------
# Times and arguments
# ---------------------------------------------------------------------------


def is_postgres_target(target: Any) -> bool:
    """Whether ``EventStore.open`` (and ``generate_dataset``) should take
    ``target`` as PostgreSQL: a ``postgresql://`` / ``postgres://`` URI or a
    psycopg connection (told without importing psycopg)."""
    if isinstance(target, str):
        return target.startswith(("postgresql://", "postgres://"))
    return type(target).__module__.startswith("psycopg")


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


def utcnow() -> datetime:
    """The wall clock, aware, in UTC (the store's default clock)."""
    return datetime.now(timezone.utc)


def check_id(value: Any, what: str) -> int:
    """``value`` as an int id; ``TypeError`` for anything but an int (bool
    excluded) or a numpy integer."""
    if type(value) is int:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return int(value)


def check_text(value: Any, what: str, *, optional: bool = False) -> Optional[str]:
    """``value`` if it is a str (or None when ``optional``); ``TypeError``
    otherwise."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    return value
