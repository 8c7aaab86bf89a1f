"""PostgreSQL building blocks for the event store: schema, a change log in
commit order, a change feed, compaction and a drift marker; and the locking
design that makes the store's writes race-free (its hooks implement it).

This module is everything the PostgreSQL backend of the event store needs
that does not depend on the store's backend seam.  It speaks psycopg 3 (the
``aggtree[postgres]`` extra) and parameterised SQL only; the event store's
PostgreSQL backend (:mod:`aggtree.events.postgres`) is built on it, and
:mod:`aggtree.pgsync` re-exports it under its old name.

The problem
-----------
Any number of store instances, in any number of processes and machines, hold
the four aggregates in memory over one database.  Every instance must apply
every committed write exactly once and in commit order.  Three traps rule out
the obvious designs:

* **Sequence values are assigned at insert, not at commit.**  A change-log
  table with a ``bigserial`` id polled by ``id > last`` skips rows: writer A
  takes id 7, writer B takes id 8 and commits, a reader sees 8 and moves its
  mark past 7; A commits 7 a moment later and nobody ever reads it.
* **Transaction ids are not commit order.**  Gating reads on
  ``pg_snapshot_xmin`` never skips a row, but orders rows by when their
  transactions *started writing*.  Our ops are not commutative ("remove the
  item at start S0, add it at S1"): two transactions touching one event must
  be applied in the order they committed.  (It also stalls every reader
  behind any long transaction on the server.)
* **NOTIFY is not durable and is delivered only at commit.**  A session that
  is not listening at that moment (not connected yet, reconnecting after a
  network cut or a server restart) never gets it; nothing is replayed.  So
  NOTIFY only wakes instances up; the log table is the record.

The change log
--------------
``aggtree_head`` is one row ``(pos, chain)``; ``aggtree_log`` holds one row
``(pos, token, chain, ops, committed_at)`` per write that changed an
aggregate.  A write appends its log row as the **last statement before
COMMIT**, with one statement (:data:`APPEND_SQL`)::

    WITH h AS (UPDATE aggtree_head SET pos = pos + 1,
                      chain = sha256(chain || int8send(pos + 1) || ops)
               RETURNING pos, chain)
    INSERT INTO aggtree_log (pos, token, chain, ops) SELECT ... FROM h
    RETURNING pos, chain, pg_notify('aggtree_log', pos::text)

(:func:`append_commit_simple` sends the same two statements as the
PL/pgSQL function ``aggtree_append``: PostgreSQL plans them once per
session, where the statement above, sent as text, is parsed and planned on
every write.)  The UPDATE takes the head row's lock, which is held until
the transaction ends.  Hence:

* **Positions are dense.**  A second writer's UPDATE waits for the first to
  end; under READ COMMITTED it then increments the *committed* value.  If
  the first rolled back, its increment rolled back with it and the second
  takes the same position: a rolled-back write leaves no trace, no hole.
* **Log order is commit order.**  The writer holding N commits before the
  writer of N+1 gets the lock, so N+1 commits after N.  PostgreSQL makes a
  commit visible (removes it from the proc array) before it releases the
  transaction's locks, so by the time the writer of N+1 proceeds, N is
  visible to every new snapshot; **a reader that sees N+1 committed sees N
  too**.  One SELECT (one snapshot) of ``pos > last`` therefore returns a
  gap-free run ``last+1, last+2, ...`` up to the head it sees in that same
  snapshot (:func:`fetch_since` reads both in one statement and checks).
* The cost: writers that change aggregates serialise for the stretch from
  their append to the end of their commit, which PostgreSQL holds through
  the commit's WAL flush (and a synchronous standby's acknowledgement):
  the log's throughput is at most one append per commit-flush time, and
  the group commit that concurrent plain transactions enjoy is lost.  The
  append is therefore the last statement, and :func:`append_commit` sends
  it with COMMIT (and the gap read) in one round trip so that no client
  round trip is spent holding the row.  Measured on this machine (2 shared
  cores, a virtual disk; 4 client threads, unpaced): with fsync and
  synchronous_commit on, plain one-row transactions 840-1460/s, appends
  130-270/s; with fsync off, plain 3800-4400/s, append then COMMIT
  720-870/s, :func:`append_commit` ~1250/s.  A server whose WAL flush takes
  0.1 ms (NVMe, battery-backed cache) allows ~10^4 appends/s.

*Not taken: a log without the lock.*  Log rows numbered by a sequence at
the end of each write (no head row) keep group commit.  Two writes whose
ops touch one aggregate item also conflict on a row lock (see below), so
the later one takes its number after the earlier one committed: if row x
is visible while a smaller y is not, x and y commute, and a consumer may
apply visible rows in id order and the late ones when they appear.  But the
consumer must then keep the set of holes (a rolled-back write leaves one
forever; telling it from a slow one takes the snapshots' in-progress
transaction ids), its state is no longer one position, and there is no
chain.  Worth it only where durable commits must exceed one per flush.

**The gap check.**  The append returns the position P.  If the writer's
instance has applied up to L and P != L + 1, the rows L+1 .. P-1 were
committed by others (they had to commit before this writer got the head
lock) and are visible to the *next* statement, which :func:`append` runs to
fetch them.  Not the same statement: a statement's snapshot is taken when it
starts, before the UPDATE waited for the lock, so rows committed during
that wait are invisible to the rest of the statement (EvalPlanQual re-reads
only the locked row).  The writer applies those rows, then (after COMMIT
succeeds) its own ops: every instance applies in log order, the writer
included, and the writer reads its own writes as soon as the write returns.

**Commit outcome.**  When COMMIT fails with a connection error the outcome
is unknown.  Every write carries a random ``token`` (uuid, unique in the
log): after reconnecting, :func:`resolve` waits until the old backend has
exited (terminating it; a backend still finishing a COMMIT we sent could
otherwise commit just after we looked) and then the write committed iff a
log row with its token exists.

**Chain.**  Each row's ``chain`` is ``sha256(previous chain || pos as 8
big-endian bytes || ops)`` (:func:`chain_next`), starting from 32 zero
bytes.  A consumer checks every row it applies against the chain it holds,
so it notices a history that changed under it: a server that crashed with
``synchronous_commit=off`` (or failed over, or was restored from a backup)
can lose commits that instances had already applied, and then hand the same
positions to new writes.  A snapshot records ``(pos, chain)`` and
:func:`chain_at` tells whether the database still has that history.

**Compaction.**  :func:`compact` deletes the rows up to a floor ``head -
keep`` and records the floor's position and chain in ``aggtree_meta``.  A
consumer below the floor gets :class:`ReloadNeeded` and reloads (snapshot
plus log, or the tables).

Waking up
---------
:class:`ChangeFeed` runs a thread with its own connection that LISTENs on
``aggtree_log`` and calls ``on_wake()`` when a notification arrives, after
every (re)connection (anything committed before LISTEN took effect has no
notification) and at least every ``poll_interval`` seconds as a safety net.
The consumer (:class:`LogConsumer`) keeps ``(pos, chain)`` and fetches
``pos > last`` on each wake: a lost, duplicated or folded notification, a
reconnect or a server restart can delay it but never make it skip or repeat
a position.  Each notification names its position; given the consumer's
position (``applied=``), the feed drops notifications of positions already
applied (a writing instance hears each of its own commits) without calling
``on_wake``, so they never contend for the consumer's lock; and while an
instance writes in a burst, its feed stops listening (each notification
costs the server a signal and a message to every listener, on the
writer's commit path): the instance's own appends bring it the rows others
committed meanwhile (the gap check), and once its position has stood still
for ``pause`` (5 ms) the feed LISTENs again and fetches
(:class:`ChangeFeed`).

Drift
-----
Writes that bypass the store (raw SQL, another program) are caught by
statement-level AFTER INSERT/UPDATE/DELETE/TRUNCATE triggers on ``users``,
``events`` and ``event_follows`` that bump the ``drift`` counter in
``aggtree_meta`` unless ``current_setting('aggtree.writer', true) =
'store'``, which the store sets transaction-locally in every write
(:data:`BEGIN_WRITE_SQL`, sent with BEGIN in one round trip).  The counter
is a row, not a sequence, so it is transactional: a snapshot that records
it cannot count a bypass write whose rows it did not see.  It lives in
``aggtree_meta``, not the head row: a bypassing transaction must not hold
the lock that orders the log.  Bypassing transactions serialise on the
counter row among themselves (they are expected to be rare; a long one
makes the others wait until it ends).  A statement that changed no row
still counts (a false alarm only costs a verify).  A warm start compares the counter
with the one recorded in its snapshot; a difference means: verify.  We
chose triggers as a marker and not as the capture itself: capturing ops in
triggers would need the aggregate logic (namespaces, keys, follower fan-out)
in PL/pgSQL, duplicated from the Python hooks; bypass writes stay drift
that ``verify_aggregates`` repairs.

Race-free writes (READ COMMITTED)
---------------------------------
The event store's write hooks (:mod:`aggtree.events.store`; the locking
statements are :class:`~aggtree.events.postgres.PostgresDialect`'s
``lock_event`` and ``select_start_locked``) lock what they read, so that
two writes touching one aggregate item are serialised and the later one
computes its ops from the earlier one's result (then, log order being
commit order, replaying the ops in log order reproduces the tables):

* ``follow_event`` / ``unfollow_event`` read the event's start with
  ``SELECT ... FOR SHARE``.  ``update_event`` and ``delete_event`` first
  take ``FOR UPDATE`` on the event row.  FOR SHARE and FOR UPDATE conflict: if
  the update holds the row, the follow waits and then reads the *new*
  start (READ COMMITTED re-reads the locked row's latest version); if the
  follow holds it, the update waits, and then reads the followers in a
  **separate statement** (a fresh snapshot that sees the follow) and moves
  the follower's item too.  Reading the followers in the same statement as
  the lock would miss a follow that committed during the wait.
* ``delete_event`` locks the event, reads it and its followers in a later
  statement, then deletes it (its follows go with it, ON DELETE CASCADE).
  A racing follow either committed first (its follow is deleted and the
  delete's ops remove its items) or finds the event gone after the wait
  (``LookupError``).
* Two ``update_event`` of one event serialise on FOR UPDATE; the second
  reads the first's start.
* Two follows (or a follow and an unfollow) of one pair serialise on the
  follow row (primary key / row lock).

Errors inside a PostgreSQL transaction abort it, so a hook avoids them
where a caller expects an answer (``follow_event`` inserts with ``INSERT
... SELECT ... FROM users WHERE id = ... ON CONFLICT DO NOTHING``: a
missing user or an existing follow inserts nothing); bad input raises
``LookupError`` / ``ValueError`` / ``PermissionError`` and the store rolls
the transaction back.  A deadlock (``psycopg.errors.DeadlockDetected``) is
possible only with bypass writes; the store retries it.  SERIALIZABLE was
not chosen: it would abort and retry exactly the hot contended writes
(moving a popular event's start) and still need the log's commit-order
lock.

How a store instance uses this
------------------------------
Open: ``create_schema``; ``load_tables`` (or a snapshot accepted by
``check_snapshot``, then ``LogConsumer.catch_up``); a
``LogConsumer(apply)`` at ``(info.head, info.head_chain)``; a
``ChangeFeed`` whose ``on_wake`` takes the store lock and runs
``consumer.catch_up(fetch)`` (:exc:`ReloadNeeded`: reload).  A write, under
the store lock, on an autocommit connection::

    begin_write(conn)
    result, ops = hook(conn)            # the write's SQL, under the row locks
    if not ops: COMMIT, return result
    a = append_commit(conn, encode_ops(ops), token, consumer.pos)
    if a.missed is None: reload (it includes this write), return result
    consumer.apply_rows(a.missed)                       # others' rows first
    consumer.apply_rows([LogRow(a.pos, token, a.chain, blob)])

On an error before COMMIT: ROLLBACK, aggregates untouched (retry on
``DeadlockDetected``).  On a connection error in ``append_commit`` (the
COMMIT travels with the append, so the outcome is unknown): reconnect,
``resolve(new, token, old_backend=backend_identity(old))`` (read right
after connecting), then ``catch_up``: the write's own row, if it committed,
is applied from the log like anyone's.  ``store.catch_up()`` is
``consumer.catch_up(fetch)``.  The start-time cache of the SQLite store
must not answer follow/unfollow here: the start is read FOR SHARE.

What the event store does (:mod:`aggtree.events.postgres`,
``EventStore._write_concurrent``): the above with its hooks (the row locks
above, through the dialect), :func:`append_commit_simple` (append and
COMMIT in one simple-protocol round trip; the missed rows read only when
there are some), its ``change_id`` as the position (the chain is checked
when a snapshot is loaded, :func:`check_snapshot`, not per row), and a
feed that drops notifications of positions it has applied (``applied=``;
and a wake that skips the fetch when they name only such positions,
:attr:`ChangeFeed.wake_reason`) and pauses listening during the instance's
write bursts (``own_pid=``, ``pause=``).
"""

from __future__ import annotations

import hashlib
import logging
import select
import threading
import time
import uuid
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import numpy as np
import psycopg
from psycopg import sql

__all__ = [
    "SCHEMA_VERSION",
    "LOG_CHANNEL",
    "ZERO_CHAIN",
    "ReloadNeeded",
    "LogRow",
    "Batch",
    "Appended",
    "StoreInfo",
    "create_schema",
    "store_info",
    "chain_next",
    "chain_at",
    "begin_write",
    "append",
    "append_commit",
    "append_commit_simple",
    "resolve",
    "backend_identity",
    "fetch_since",
    "read_head",
    "compact",
    "drift",
    "read_int_matrix",
    "Loaded",
    "load_tables",
    "SnapshotCheck",
    "check_snapshot",
    "LogConsumer",
    "ChangeFeed",
    "encode_ops",
    "decode_ops",
]

log = logging.getLogger("aggtree.pgsync")

SCHEMA_VERSION = 1
LOG_CHANNEL = "aggtree_log"
ZERO_CHAIN = bytes(32)
# pg_advisory_xact_lock key that serialises schema creation ("aggtree" in ASCII).
_SCHEMA_LOCK = 0x61676774726565

# Aggregates and op codes: the event store's own (schema.py, oplog.py).
from .oplog import ADD, MOVE, OP_WIDTH, REMOVE  # noqa: E402,F401
from .oplog import decode as decode_ops  # noqa: E402
from .oplog import encode as encode_ops  # noqa: E402
from .schema import BY_CREATION, BY_START, FOLLOWED_BY_START, FOLLOWS  # noqa: E402,F401


class ReloadNeeded(Exception):
    """The consumer cannot continue from the log: its position was compacted
    away, or the log's history no longer matches the one it applied.  Reload
    the aggregates (snapshot plus log, or the tables) and restart from the
    head read with them."""


class LogRow(NamedTuple):
    pos: int
    token: uuid.UUID
    chain: bytes
    ops: bytes


class Batch(NamedTuple):
    """One :func:`fetch_since` read, all from one snapshot."""

    head: int        # the newest committed position
    head_chain: bytes
    floor: int       # rows at or below this position were compacted away
    rows: list       # LogRow, positions after+1, after+2, ... (at most limit)


class Appended(NamedTuple):
    """What :func:`append` did: the write's position and chain, and the rows
    others committed before it that the writer had not applied yet."""

    pos: int
    chain: bytes
    missed: Optional[list]  # None: append_commit could not read them (reload)


class StoreInfo(NamedTuple):
    schema_version: int
    store_id: uuid.UUID
    head: int
    head_chain: bytes
    floor: int
    floor_chain: bytes
    drift: int


def _one(cur: Any) -> tuple:
    """The row of a statement that always returns one (an aggregate, the
    head row, a RETURNING of an UPDATE that matched)."""
    row = cur.fetchone()
    if row is None:  # pragma: no cover - the schema guarantees a row
        raise RuntimeError("expected a row: is the aggtree schema complete?")
    return tuple(row)


# ---------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------

_TABLES = (
    """CREATE TABLE IF NOT EXISTS users (
        id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        username    text   NOT NULL UNIQUE,
        created_at  bigint NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        user_id     bigint NOT NULL REFERENCES users(id),
        name        text   NOT NULL,
        start_time  bigint NOT NULL,
        end_time    bigint,
        created_at  bigint NOT NULL,
        description text,
        location    text
    )""",
    "CREATE INDEX IF NOT EXISTS events_user ON events(user_id)",
    """CREATE TABLE IF NOT EXISTS event_follows (
        user_id     bigint NOT NULL REFERENCES users(id),
        event_id    bigint NOT NULL REFERENCES events(id) ON DELETE CASCADE,
        created_at  bigint NOT NULL,
        PRIMARY KEY (user_id, event_id)
    )""",
    "CREATE INDEX IF NOT EXISTS event_follows_event ON event_follows(event_id)",
    """CREATE TABLE IF NOT EXISTS aggtree_meta (
        key         text PRIMARY KEY,
        value       text NOT NULL
    )""",
    # One row: the newest log position and its chain.  Its row lock orders the log.
    """CREATE TABLE IF NOT EXISTS aggtree_head (
        one         boolean PRIMARY KEY DEFAULT true CHECK (one),
        pos         bigint NOT NULL,
        chain       bytea  NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS aggtree_log (
        pos          bigint PRIMARY KEY,
        token        uuid   NOT NULL UNIQUE,
        chain        bytea  NOT NULL,
        ops          bytea  NOT NULL,
        -- the append's wall-clock time: the last statement, so about the
        -- commit time (now() would be the transaction's start)
        committed_at timestamptz NOT NULL DEFAULT clock_timestamp()
    )""",
    # The append (APPEND_SQL) as a function, for append_commit_simple: the
    # statement inside is planned once per session (PL/pgSQL caches its
    # plans), where the same CTE sent as text is parsed and planned on every
    # write (measured server-side: 46 us against 94 us per append).
    """CREATE OR REPLACE FUNCTION aggtree_append(p_ops bytea, p_token uuid,
                                              OUT r_pos bigint, OUT r_chain bytea)
       LANGUAGE plpgsql AS $$
       BEGIN
           UPDATE aggtree_head SET pos = pos + 1, chain = sha256(chain || int8send(pos + 1) || p_ops)
               RETURNING pos, chain INTO r_pos, r_chain;
           INSERT INTO aggtree_log (pos, token, chain, ops) VALUES (r_pos, p_token, r_chain, p_ops);
           PERFORM pg_notify('aggtree_log', r_pos::text);
       END $$""",
    """CREATE OR REPLACE FUNCTION aggtree_note_drift() RETURNS trigger
       LANGUAGE plpgsql AS $$
       BEGIN
           IF coalesce(current_setting('aggtree.writer', true), '') <> 'store' THEN
               UPDATE aggtree_meta SET value = (value::bigint + 1)::text WHERE key = 'drift';
           END IF;
           RETURN NULL;
       END $$""",
)
_DRIFT_TABLES = ("users", "events", "event_follows")


def create_schema(conn: psycopg.Connection) -> uuid.UUID:
    """Create the event tables, the change log, the head row, the meta rows
    (schema version, store id, drift counter, log floor) and the drift
    triggers where missing; return the store id.  Idempotent and safe when
    several processes open at once (one transaction under an advisory
    lock).  ``ValueError`` for a database of another schema version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        if _one(conn.execute("SELECT to_regclass('aggtree_meta')"))[0] is not None:
            row = conn.execute(
                "SELECT value FROM aggtree_meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) != SCHEMA_VERSION:
                raise ValueError(
                    f"the database has event schema version {row[0]}; this aggtree "
                    f"knows version {SCHEMA_VERSION}")
        for stmt in _TABLES:
            conn.execute(stmt)
        for key, value in (("schema_version", str(SCHEMA_VERSION)),
                           ("store_id", str(uuid.uuid4())),
                           ("drift", "0"),
                           ("log_floor", "0"),
                           ("log_floor_chain", ZERO_CHAIN.hex())):
            conn.execute("INSERT INTO aggtree_meta (key, value) VALUES (%s, %s)"
                         " ON CONFLICT (key) DO NOTHING", (key, value))
        conn.execute("INSERT INTO aggtree_head (pos, chain) VALUES (0, %s)"
                     " ON CONFLICT (one) DO NOTHING", (ZERO_CHAIN,))
        have = {r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE t.tgname = 'aggtree_drift' AND c.relname = ANY(%s)"
            " AND pg_table_is_visible(c.oid)", (list(_DRIFT_TABLES),))}
        for table in _DRIFT_TABLES:
            if table not in have:
                # Identifiers cannot be parameters; these come from a fixed tuple.
                conn.execute(sql.SQL(
                    "CREATE TRIGGER aggtree_drift AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
                    " ON {} FOR EACH STATEMENT EXECUTE FUNCTION aggtree_note_drift()"
                ).format(sql.Identifier(table)))
        store_id = _one(conn.execute(
            "SELECT value FROM aggtree_meta WHERE key = 'store_id'"))[0]
    return uuid.UUID(store_id)


_INFO_SQL = """
SELECT h.pos, h.chain,
       max(m.value) FILTER (WHERE m.key = 'schema_version'),
       max(m.value) FILTER (WHERE m.key = 'store_id'),
       max(m.value) FILTER (WHERE m.key = 'log_floor'),
       max(m.value) FILTER (WHERE m.key = 'log_floor_chain'),
       max(m.value) FILTER (WHERE m.key = 'drift')
FROM aggtree_head h CROSS JOIN aggtree_meta m
GROUP BY h.pos, h.chain
"""


def store_info(conn: psycopg.Connection) -> StoreInfo:
    """Schema version, store id, head, floor and drift counter, from one
    snapshot (record it with a snapshot of the aggregates)."""
    head, chain, version, sid, floor, floor_chain, drift_ = _one(conn.execute(_INFO_SQL))
    return StoreInfo(int(version), uuid.UUID(sid), head, bytes(chain), int(floor),
                     bytes.fromhex(floor_chain), int(drift_))


def drift(conn: psycopg.Connection) -> int:
    """The drift counter: how many statements changed the event tables
    without going through the store (see the module docstring)."""
    return int(_one(conn.execute("SELECT value FROM aggtree_meta WHERE key = 'drift'"))[0])


# ---------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------


def chain_next(prev: bytes, pos: int, ops: bytes) -> bytes:
    """The chain of the log row at ``pos`` after a row whose chain is
    ``prev``; what the append statement computes in SQL."""
    return hashlib.sha256(bytes(prev) + pos.to_bytes(8, "big", signed=True) + bytes(ops)).digest()


def chain_at(conn: psycopg.Connection, pos: int) -> Optional[bytes]:
    """The chain the database has at ``pos`` (a log row, the compaction
    floor, or 32 zero bytes at 0), or None when the position is beyond the
    head or compacted away.  A snapshot taken at ``(pos, chain)`` is from
    this database's history iff ``chain_at(conn, pos) == chain``."""
    row = _one(conn.execute(
        "SELECT CASE WHEN %(p)s = 0 THEN %(zero)s"
        "            WHEN %(p)s = (SELECT value::bigint FROM aggtree_meta WHERE key = 'log_floor')"
        "            THEN decode((SELECT value FROM aggtree_meta WHERE key = 'log_floor_chain'), 'hex')"
        "            ELSE (SELECT chain FROM aggtree_log WHERE pos = %(p)s) END",
        {"p": pos, "zero": ZERO_CHAIN}))
    return None if row[0] is None else bytes(row[0])


# ---------------------------------------------------------------------------
# Writing: begin, append, resolve
# ---------------------------------------------------------------------------

#: Starts a store write transaction and marks it as the store's (the drift
#: triggers then stay quiet), in one round trip: psycopg sends a query
#: without parameters with the simple protocol, which allows several
#: statements.  Run it on an autocommit connection; end with COMMIT or
#: ROLLBACK.
BEGIN_WRITE_SQL = ("BEGIN ISOLATION LEVEL READ COMMITTED;"
                   " SELECT set_config('aggtree.writer', 'store', true)")

#: The append (see the module docstring).  Parameters: ops (bytea), token (uuid).
APPEND_SQL = """
WITH h AS (
    UPDATE aggtree_head
       SET pos = pos + 1, chain = sha256(chain || int8send(pos + 1) || %(ops)s::bytea)
    RETURNING pos, chain)
INSERT INTO aggtree_log (pos, token, chain, ops)
SELECT pos, %(token)s, chain, %(ops)s FROM h
RETURNING pos, chain, pg_notify('aggtree_log', pos::text)
"""

_MISSED_SQL = ("SELECT pos, token, chain, ops FROM aggtree_log"
               " WHERE pos > %s AND pos < %s ORDER BY pos")


def begin_write(conn: psycopg.Connection) -> None:
    """Begin a store write transaction on an autocommit connection
    (:data:`BEGIN_WRITE_SQL`)."""
    if not conn.autocommit:
        raise ValueError("begin_write needs an autocommit connection (it sends BEGIN itself)")
    conn.execute(BEGIN_WRITE_SQL)


def append(cur: Any, ops: bytes, token: uuid.UUID, after: int) -> Appended:
    """Append ``ops`` to the log as the last statement of the current write
    transaction; ``after`` is the last position the writer's instance has
    applied.  Returns the write's position and chain and the rows between
    (committed by others, to apply before this write's own ops).  Commit
    right after; apply the write's ops once COMMIT succeeded.

    ``ReloadNeeded`` when those rows were compacted away or the log went
    back behind ``after`` (roll back, reload, retry).

    Every moment between this statement and the end of COMMIT holds the
    head row, and so every other writer: prefer :func:`append_commit`,
    which also lets the writer apply the missed rows after COMMIT."""
    pos, chain, _ = _one(cur.execute(APPEND_SQL, {"ops": ops, "token": token}))
    chain = bytes(chain)
    if pos <= after:
        raise ReloadNeeded(f"the log's head went back to {pos - 1}, behind position {after}")
    missed: list = []
    if pos != after + 1:
        missed = [LogRow(p, t, bytes(c), bytes(o))
                  for p, t, c, o in cur.execute(_MISSED_SQL, (after, pos)).fetchall()]
        if len(missed) != pos - after - 1 or (missed and missed[0].pos != after + 1):
            raise ReloadNeeded(f"log rows after {after} were compacted away")
    return Appended(pos, chain, missed)


_OWN_AND_MISSED_SQL = ("SELECT pos, token, chain, ops FROM aggtree_log WHERE pos > %s"
                       " AND pos < (SELECT pos FROM aggtree_log WHERE token = %s) ORDER BY pos")


def append_commit(conn: psycopg.Connection, ops: bytes, token: uuid.UUID,
                  after: int) -> Appended:
    """:func:`append`, COMMIT and the gap check in one round trip (libpq
    pipeline mode): the head row is then held only for the server's own
    append-to-commit time, not for a client round trip, which is what
    bounds the log's throughput (see the module docstring).  The rows
    between ``after`` and the write are read by a third statement after the
    COMMIT, in a snapshot that sees them (they committed before this write
    got the head row).

    Returns ``Appended(pos, chain, missed)``; ``missed`` is None when those
    rows were compacted away (or the log went back): the write *did* commit,
    and the instance must reload (which includes it).  A connection error
    leaves the outcome unknown: :func:`resolve`.  Without pipeline support
    (libpq < 14) it falls back to two round trips."""
    params = {"ops": ops, "token": token}
    if not psycopg.Pipeline.is_supported():  # pragma: no cover - old libpq
        cur = conn.cursor()
        pos, chain, _ = _one(cur.execute(APPEND_SQL, params))
        conn.execute("COMMIT")
        rows = cur.execute(_MISSED_SQL, (after, pos)).fetchall()
    else:
        with conn.pipeline():
            c1 = conn.execute(APPEND_SQL, params)
            conn.execute("COMMIT")
            c3 = conn.execute(_OWN_AND_MISSED_SQL, (after, token))
        pos, chain, _ = _one(c1)
        rows = c3.fetchall()
    missed = [LogRow(p, t, bytes(c), bytes(o)) for p, t, c, o in rows]
    if pos <= after or len(missed) != pos - after - 1 or (missed and missed[0].pos != after + 1):
        return Appended(pos, bytes(chain), None)
    return Appended(pos, bytes(chain), missed)


def append_commit_simple(conn: psycopg.Connection, ops: bytes, token: uuid.UUID,
                         after: int) -> Appended:
    """:func:`append_commit` in one simple-protocol round trip: the append
    (the ``aggtree_append`` function, :data:`APPEND_SQL` planned once per
    session) and COMMIT travel as one query string, and the rows others
    committed between ``after`` and this write are read by a second round
    trip only when there are some (the write's position is not ``after +
    1``).  The arguments are the ops as hex digits and the token's canonical
    text (bytes and a :class:`uuid.UUID`, nothing from a caller's text, so
    inlining them is safe).  The head row is held only for the server's
    append-to-commit time, as with the pipeline, and a write by a lone or
    caught-up writer costs one round trip for the log instead of the
    pipeline's heavier exchange (measured on this machine: ~0.2 ms less per
    write).  The outcome of a connection error is unknown, as for
    :func:`append_commit`: :func:`resolve`."""
    if not isinstance(token, uuid.UUID):
        raise TypeError("token must be a uuid.UUID")
    cur = conn.execute("SELECT r_pos, r_chain FROM aggtree_append(decode('%s', 'hex'), '%s');"
                       " COMMIT" % (bytes(ops).hex(), token))
    pos, chain = _one(cur)
    missed: list = []
    if pos != after + 1:
        if pos <= after:
            return Appended(pos, bytes(chain), None)
        rows = conn.execute(_MISSED_SQL, (after, pos)).fetchall()
        missed = [LogRow(p, t, bytes(c), bytes(o)) for p, t, c, o in rows]
        if len(missed) != pos - after - 1 or (missed and missed[0].pos != after + 1):
            return Appended(pos, bytes(chain), None)
    return Appended(pos, bytes(chain), missed)


def backend_identity(conn: psycopg.Connection) -> tuple:
    """``(pid, backend_start)`` of the connection's server process: what
    :func:`resolve` needs to wait for it after the connection broke.  Read
    it right after connecting."""
    return tuple(_one(conn.execute(
        "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    )))


def resolve(conn: psycopg.Connection, token: uuid.UUID, *, old_backend: Optional[tuple] = None,
            timeout: float = 30.0) -> Optional[int]:
    """Whether the write with ``token`` committed: its position, or None.

    Use after COMMIT failed with a connection error, on a new connection.
    ``old_backend`` (from :func:`backend_identity` on the broken connection)
    makes the answer final: the old server process is terminated and waited
    for first, since a process still finishing our COMMIT could otherwise
    commit just after we looked.  Without it, call this only when the
    server restarted.  A write whose row was compacted away reads as not
    committed: resolve before compacting past the writer's position.
    Terminating needs the same role as the old connection (or
    ``pg_signal_backend``)."""
    if old_backend is not None:
        pid, started = old_backend
        deadline = time.monotonic() + timeout
        while True:
            row = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid = %s AND backend_start = %s", (pid, started)).fetchone()
            if row is None:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server process {pid} of the broken connection did not exit")
            time.sleep(0.01)
    row = conn.execute("SELECT pos FROM aggtree_log WHERE token = %s", (token,)).fetchone()
    return None if row is None else row[0]


# ---------------------------------------------------------------------------
# Reading the log
# ---------------------------------------------------------------------------

_FETCH_SQL = """
SELECT h.pos, h.chain, f.floor, l.pos, l.token, l.chain, l.ops
FROM aggtree_head h
CROSS JOIN (SELECT value::bigint AS floor FROM aggtree_meta WHERE key = 'log_floor') f
LEFT JOIN LATERAL (
    SELECT pos, token, chain, ops FROM aggtree_log
    WHERE pos > %(after)s ORDER BY pos LIMIT %(limit)s) l ON true
ORDER BY l.pos
"""


def fetch_since(conn: psycopg.Connection, after: int, limit: int = 1000) -> Batch:
    """The log rows after position ``after`` (at most ``limit``), in order,
    with the head and the compaction floor, in one statement (one snapshot:
    the rows run gap-free from ``after + 1``; checked)."""
    rows = conn.execute(_FETCH_SQL, {"after": after, "limit": limit}).fetchall()
    head, head_chain, floor = rows[0][0], bytes(rows[0][1]), rows[0][2]
    out = [LogRow(r[3], r[4], bytes(r[5]), bytes(r[6])) for r in rows if r[3] is not None]
    for i, row in enumerate(out):
        if row.pos != after + 1 + i and after >= floor:  # rows deleted by hand
            raise ReloadNeeded(f"log gap: expected position {after + 1 + i}, read {row.pos}")
    return Batch(head, head_chain, floor, out)


def read_head(conn: psycopg.Connection) -> tuple:
    """``(pos, chain)`` of the newest committed log row.  Read it in the
    same transaction (REPEATABLE READ) as a reload of the tables: the
    aggregates then reflect exactly that position."""
    pos, chain = _one(conn.execute("SELECT pos, chain FROM aggtree_head"))
    return pos, bytes(chain)


def compact(conn: psycopg.Connection, keep: int) -> int:
    """Delete the log rows up to ``head - keep`` and record that floor (its
    position and chain) in ``aggtree_meta``; returns the number of rows
    deleted.  Consumers below the floor get :class:`ReloadNeeded`."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError("keep must be a non-negative int")
    with conn.transaction():
        old = int(_one(conn.execute("SELECT value FROM aggtree_meta WHERE key = 'log_floor'"
                               " FOR UPDATE"))[0])
        head = _one(conn.execute("SELECT pos FROM aggtree_head"))[0]
        floor = head - keep
        if floor <= old:
            return 0
        chain = bytes(_one(conn.execute("SELECT chain FROM aggtree_log WHERE pos = %s",
                                   (floor,)))[0])
        deleted = conn.execute("DELETE FROM aggtree_log WHERE pos <= %s", (floor,)).rowcount
        conn.execute("UPDATE aggtree_meta SET value = %s WHERE key = 'log_floor'", (str(floor),))
        conn.execute("UPDATE aggtree_meta SET value = %s WHERE key = 'log_floor_chain'",
                     (chain.hex(),))
    return deleted


# ---------------------------------------------------------------------------
# Loading: the tables at one log position; checking a snapshot
# ---------------------------------------------------------------------------

def read_int_matrix(conn: psycopg.Connection, table: str, columns: Sequence[str],
                    order: Sequence[str] = (), *, blocks: int = 2000) -> np.ndarray:
    """The bigint NOT NULL ``columns`` of ``table`` as an ``(n,
    len(columns))`` int64 array, sorted by the ``order`` columns (a subset
    of ``columns``; ties keep no particular order).

    The table is read in ranges of ``blocks`` heap pages (a TID range scan,
    PostgreSQL 14+: sequential, no index, no server-side sort) and the
    server packs each range into one bytea (``string_agg(int8send(...))``)
    that numpy reads as big-endian int64s; numpy sorts at the end.  No
    Python object per value, whichever psycopg implementation runs.
    Measured on this machine (2 cores at load 8, so noisy): 10^6 events
    plus 5x10^5 follows in 1.7-3.8 s (keyset pages in index order with an
    ordered aggregate: ~3.1-5 s), where a ``fetchall`` of the events alone
    takes 1.5-4 s with psycopg's C implementation and 25 s with its
    pure-Python one.  Read inside one snapshot (:func:`load_tables`) for a
    consistent result.  ``ValueError`` for a NULL."""
    width = len(columns)
    if not width or not set(order) <= set(columns):
        raise ValueError("order must name some of the columns")
    ident = sql.Identifier
    packed = sql.SQL(" || ").join(sql.SQL("int8send({})").format(ident(c)) for c in columns)
    head = sql.SQL("SELECT count(*), string_agg({}, ''::bytea) FROM {}").format(
        packed, ident(table))
    ranged = conn.info.server_version >= 140000
    nblocks = 0
    if ranged:
        nblocks = _one(conn.execute(
            "SELECT pg_relation_size(%s::regclass) / current_setting('block_size')::int",
            (table,)))[0]
    parts = []
    start = 0
    while True:
        if not ranged:
            n, blob = _one(conn.execute(head))
        elif start + blocks >= nblocks:  # open-ended: pages added since are covered
            n, blob = _one(conn.execute(head + sql.SQL(" WHERE ctid >= %s::tid"),
                                   (f"({start},0)",)))
        else:
            n, blob = _one(conn.execute(head + sql.SQL(" WHERE ctid >= %s::tid AND ctid < %s::tid"),
                                   (f"({start},0)", f"({start + blocks},0)")))
        if n:
            part = np.frombuffer(blob or b"", dtype=">i8")
            if len(part) != n * width:
                raise ValueError(f"{table}: NULL in {', '.join(columns)}")
            parts.append(part.reshape(n, width))
        start += blocks
        if not ranged or start >= nblocks:
            break
    if not parts:
        return np.empty((0, width), dtype=np.int64)
    out = np.concatenate(parts).astype(np.int64)
    if order:
        idx = [list(columns).index(c) for c in order]
        if len(idx) == 1:
            out = out[np.argsort(out[:, idx[0]], kind="stable")]
        else:
            out = out[np.lexsort(tuple(out[:, i] for i in reversed(idx)))]
    return out


class Loaded(NamedTuple):
    """The event tables at one log position (:func:`load_tables`)."""

    info: StoreInfo      # head, chain, floor, drift counter: same snapshot
    events: np.ndarray   # (n, 4): id, user_id, created_at, start_time, by id
    follows: np.ndarray  # (m, 2): user_id, event_id, by (user_id, event_id)


def load_tables(conn: psycopg.Connection) -> Loaded:
    """Read what the aggregates are built from, with the log head and the
    drift counter, in one REPEATABLE READ snapshot: the aggregates built
    from it reflect exactly ``info.head``; continue from ``(info.head,
    info.head_chain)``.  Needs an autocommit connection (it sends BEGIN)."""
    if not conn.autocommit:
        raise ValueError("load_tables needs an autocommit connection (it sends BEGIN)")
    conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        info = store_info(conn)
        events = read_int_matrix(conn, "events", ("id", "user_id", "created_at", "start_time"),
                                 ("id",))
        follows = read_int_matrix(conn, "event_follows", ("user_id", "event_id"),
                                  ("user_id", "event_id"))
    finally:
        conn.execute("COMMIT")
    return Loaded(info, events, follows)


class SnapshotCheck(NamedTuple):
    usable: bool     # catch up from the snapshot's position (else reload)
    drifted: bool    # writes bypassed the store since: verify after catching up
    reason: str


def check_snapshot(conn: psycopg.Connection, store_id: uuid.UUID, pos: int, chain: bytes,
                   drift_count: int) -> SnapshotCheck:
    """Whether a snapshot recorded at ``(store_id, pos, chain, drift)``
    (from :func:`store_info` or :class:`Loaded`) can warm-start an instance
    on this database: the same store id, and the database's chain at
    ``pos`` equal to the recorded one (so it has the snapshot's history and
    still has the log after it)."""
    info = store_info(conn)
    drifted = info.drift != drift_count
    if info.store_id != store_id:
        return SnapshotCheck(False, drifted, f"the snapshot is of store {store_id}, "
                             f"the database is store {info.store_id}")
    if pos > info.head:
        return SnapshotCheck(False, drifted, f"the snapshot is at position {pos}, "
                             f"past the log's head {info.head} (the history went back)")
    if pos < info.floor:
        return SnapshotCheck(False, drifted, f"the log was compacted to {info.floor}, "
                             f"past the snapshot's position {pos}")
    if chain_at(conn, pos) != bytes(chain):
        return SnapshotCheck(False, drifted, f"the log's history at position {pos} "
                             "differs from the snapshot's")
    return SnapshotCheck(True, drifted, "drift since the snapshot: verify" if drifted else "ok")


class LogConsumer:
    """An instance's position in the log: ``pos`` and ``chain`` of the last
    row applied.  :meth:`apply_rows` applies rows strictly in order (each
    one exactly once, its chain checked); :meth:`catch_up` fetches and
    applies everything after ``pos``.  ``apply(row)`` does the work (for the
    store: decode the ops and apply them to the aggregates).

    If ``apply`` raises, the row may be half applied: the consumer is then
    ``broken`` and every later call raises :class:`ReloadNeeded`."""

    def __init__(self, apply: Callable[[LogRow], None], pos: int = 0,
                 chain: bytes = ZERO_CHAIN) -> None:
        self._apply = apply
        self.pos = pos
        self.chain = bytes(chain)
        self.broken = False
        self.applied = 0
        self.lock = threading.RLock()

    def reset(self, pos: int, chain: bytes) -> None:
        """After a reload: the aggregates reflect ``(pos, chain)``."""
        with self.lock:
            self.pos, self.chain, self.broken = pos, bytes(chain), False

    def apply_rows(self, rows: Iterable[LogRow]) -> int:
        with self.lock:
            n = 0
            for row in rows:
                if self.broken:
                    raise ReloadNeeded("a log row was half applied")
                if row.pos <= self.pos:
                    continue  # already applied (a fetch that overlapped the writer's own)
                if row.pos != self.pos + 1:
                    raise ReloadNeeded(f"log row {row.pos} after {self.pos}: rows are missing")
                if chain_next(self.chain, row.pos, row.ops) != row.chain:
                    raise ReloadNeeded(f"log row {row.pos} does not continue the history applied")
                try:
                    self._apply(row)
                except BaseException:
                    self.broken = True
                    raise
                self.pos, self.chain = row.pos, row.chain
                self.applied += 1
                n += 1
            return n

    def catch_up(self, fetch: Callable[[int, int], Batch], limit: int = 1000) -> int:
        """Apply every row after :attr:`pos` that ``fetch(after, limit)``
        (:func:`fetch_since` on some connection) returns, until the head;
        returns how many."""
        with self.lock:
            n = 0
            while True:
                if self.broken:
                    raise ReloadNeeded("a log row was half applied")
                batch = fetch(self.pos, limit)
                if self.pos > batch.head:
                    raise ReloadNeeded(f"the log's head {batch.head} is behind position {self.pos}")
                if self.pos < batch.floor:
                    raise ReloadNeeded(f"the log was compacted to {batch.floor}, past {self.pos}")
                if self.pos == batch.head and batch.head_chain != self.chain:
                    raise ReloadNeeded(f"position {self.pos} has another history in the log")
                n += self.apply_rows(batch.rows)
                if self.pos >= batch.head or not batch.rows:
                    return n


# ---------------------------------------------------------------------------
# The change feed
# ---------------------------------------------------------------------------


class ChangeFeed:
    """Wakes a consumer when the log may have grown.

    A thread holds its own connection, LISTENs on ``aggtree_log`` and calls
    ``on_wake()`` (and sets :attr:`woken`) after each (re)connection, on
    every batch of notifications, and at least every ``poll_interval``
    seconds.  A lost connection is re-opened with backoff (50 ms doubling
    to 2 s); an ``on_wake`` that raises is retried after the same backoff.
    :meth:`fetch_since` and :meth:`head` read the log on a second
    connection (re-opened when broken).  The feed keeps no position: the
    consumer does, so nothing the feed misses is lost.

    ``connect`` opens a connection (default: ``psycopg.connect(conninfo,
    autocommit=True)``).

    ``applied`` (optional) returns the position the consumer has applied;
    a batch of notifications that names only positions at or below it (a
    writing instance hearing its own commits) then wakes nobody: the thread
    skips ``on_wake`` (counted in :attr:`skipped`) without taking any lock
    the consumer holds.  The read is not locked: a stale value is only
    lower (positions grow), which wakes the consumer for nothing, except
    after a reload that moved the consumer back (the history changed under
    it), where a skipped notification waits for the next one or the safety
    poll.  The thread reads the socket with libpq directly (no psycopg
    generator per wait).

    ``pause`` (seconds, with ``applied`` and ``own_pid``, which returns the
    server process id of the instance's writing connection): a writing
    instance hears every one of its own commits, and each costs the server
    a signal to this connection's process and a message, on the writer's
    critical path.  When four batches of notifications in a row, all sent
    by ``own_pid()`` and all of applied positions, each come within
    ``pause`` of the one before (a burst: a slower writer would pay more
    for the toggles than for its notifications), the feed stops listening
    (UNLISTEN) for as long as the consumer's position keeps moving within
    every ``pause`` (the instance keeps writing, and each of its appends
    brings it the rows others committed before it); when the position has
    stood still for ``pause``, it LISTENs again and wakes the consumer to
    fetch.  So a writing instance applies
    other instances' rows at its next write or within about ``2 * pause``
    (counted in :attr:`pauses`); an instance that only reads never pauses.
    ``pause=0``: never."""

    def __init__(self, conninfo: str, on_wake: Optional[Callable[[], Any]] = None, *,
                 poll_interval: float = 1.0, connect: Optional[Callable[[], Any]] = None,
                 applied: Optional[Callable[[], int]] = None, pause: float = 0.005,
                 own_pid: Optional[Callable[[], Optional[int]]] = None) -> None:
        self.conninfo = conninfo
        self.on_wake = on_wake
        self.applied = applied
        self.own_pid = own_pid
        self.pause = pause
        self.pauses = 0
        self.skipped = 0
        self.poll_interval = poll_interval
        self._connect = connect or (lambda: psycopg.connect(conninfo, autocommit=True))
        self.woken = threading.Event()
        self.wakes = 0
        self.notifications = 0
        self.connects = 0
        self.listen_pid: Optional[int] = None
        #: Why the current ``on_wake`` runs: ``"notify"`` (notifications
        #: only), ``"poll"`` or ``"connect"``; with ``"notify"``,
        #: :attr:`notified_max` is the highest position their payloads
        #: named (a consumer already past it may skip the fetch).
        self.wake_reason = "connect"
        self.notified_max = 0
        self.listening = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._qconn: Any = None
        self._qlock = threading.Lock()

    def start(self) -> "ChangeFeed":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="aggtree-changefeed",
                                            daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._qlock:
            if self._qconn is not None:
                self._qconn.close()
                self._qconn = None

    def __enter__(self) -> "ChangeFeed":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- reading -------------------------------------------------------------

    def _query(self, fn: Callable[[Any], Any]) -> Any:
        with self._qlock:
            for attempt in (0, 1):
                if self._qconn is None or self._qconn.closed:
                    self._qconn = self._connect()
                try:
                    return fn(self._qconn)
                except psycopg.OperationalError:
                    self._qconn.close()
                    self._qconn = None
                    if attempt:
                        raise

    def fetch_since(self, after: int, limit: int = 1000) -> Batch:
        return self._query(lambda c: fetch_since(c, after, limit))

    def head(self) -> tuple:
        return self._query(read_head)

    # -- the listener thread -------------------------------------------------

    def _wake(self) -> bool:
        self.wakes += 1
        self.woken.set()
        if self.on_wake is None:
            return True
        try:
            self.on_wake()
            return True
        except Exception:
            log.warning("change feed: on_wake failed; retrying", exc_info=True)
            return False

    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            conn = None
            try:
                conn = self._connect()
                # Notifications that arrive during a statement on this
                # connection are dropped (not queued in psycopg): each
                # statement here is followed by a wake that fetches.
                conn.add_notify_handler(_drop)
                conn.execute("LISTEN aggtree_log")
                self.listen_pid = conn.info.backend_pid
                self.connects += 1
                self.listening.set()
                backoff = 0.05
                self._listen(conn)
            except psycopg.OperationalError:
                log.info("change feed: connection lost; reconnecting in %.2f s", backoff)
            finally:
                self.listening.clear()
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # pragma: no cover
                        pass
            self._stop.wait(backoff)
            backoff = min(2.0, backoff * 2)

    def _pause(self, conn: Any, applied: Callable[[], int]) -> bool:
        """UNLISTEN while the consumer's position moves within every
        ``pause`` seconds, then LISTEN again; False if closing."""
        self.pauses += 1
        conn.execute("UNLISTEN aggtree_log")
        pos = applied()
        while True:
            if self._stop.wait(max(self.pause, 0.001)):
                return False
            now = applied()
            if now == pos:
                break
            pos = now
        conn.execute("LISTEN aggtree_log")
        return True

    def _listen(self, conn: Any) -> None:
        """Wake on ``conn`` (listening) until :meth:`close` or a connection
        error.  The socket is polled and read with libpq directly: on a
        writing instance this loop runs once per commit (the instance's own
        notifications) until it pauses, and every Python step it takes then
        is taken from the writer (the GIL), so the path that drops them is
        kept short."""
        pgconn = conn.pgconn
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        stop = self._stop
        monotonic = time.monotonic
        backoff = 0.05
        self.wake_reason = "connect"
        ok = self._wake()  # commits before LISTEN took effect sent us nothing
        due = monotonic() + self.poll_interval
        last_own = -1.0  # when the last batch of our own notifications came
        burst = 0  # how many batches in a row came within pause of the one before
        while not stop.is_set():
            if not ok:
                due = min(due, monotonic() + backoff)
            # wait in slices so that close() never waits long
            timeout = due - monotonic()
            got = 0
            top = 0
            if poller.poll(0 if timeout <= 0 else min(200, int(timeout * 1000) + 1)):
                # Take everything that arrived, in one wake.  (A broken
                # connection: consume_input raises.)
                pgconn.consume_input()
                n = pgconn.notifies()
                if n is None:
                    if pgconn.status != psycopg.pq.ConnStatus.OK:
                        raise psycopg.OperationalError("change feed: connection lost")
                else:
                    own = self.own_pid() if self.own_pid is not None else None
                    while n is not None:
                        got += 1
                        if n.be_pid != own:
                            own = None
                        try:
                            pos = int(n.extra)  # the append sends pos::text
                        except ValueError:  # another sender: fetch
                            pos = 2**62
                        if pos > top:
                            top = pos
                        n = pgconn.notifies()
                    self.notifications += got
                    applied = self.applied
                    if ok and applied is not None and top <= applied():
                        self.skipped += 1  # our own commits: nothing to fetch
                        if own is None:
                            continue  # (others' rows a fetch already brought)
                        now = monotonic()
                        burst = burst + 1 if now - last_own < self.pause else 0
                        last_own = now
                        if burst < 3:
                            continue
                        # A burst of our own commits: stop hearing them.
                        if not self._pause(conn, applied):
                            return  # closing
                        last_own = -1.0
                        burst = 0
                        got = 0
                        due = 0.0  # fetch now (below): nobody told us of the rows meanwhile
            if not got and monotonic() < due:
                continue
            # (a failed wake is retried as a poll: it must fetch)
            self.wake_reason = "notify" if got and ok else "poll"
            self.notified_max = top
            ok = self._wake()
            backoff = 0.05 if ok else min(2.0, backoff * 2)
            due = monotonic() + self.poll_interval


def _drop(notify: Any) -> None:
    """A notify handler that drops the notification (see ChangeFeed._run)."""
