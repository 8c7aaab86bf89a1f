"""Multi-process sync: how a store's aggregates follow the database.

A store's aggregates reflect the database up to one change-log row, its
``change_id``.  Three ways bring them forward:

* the **bulk load** (:meth:`SyncMixin._reload`): read every event and follow
  in one snapshot and build each aggregate with ``Aggregate.from_arrays``
  (O(n log n), no per-row inserts); at open, and whenever catching up is
  impossible (the rows needed were pruned, the database was replaced, a
  replay or an undo failed halfway);
* the **catch-up** (:meth:`SyncMixin._catch_up`, the one function that
  replays the change log): read the rows after ``change_id`` and apply their
  ops; before each read (:meth:`SyncMixin._sync`, only when the backend's
  change token moved), at the start of each write under the write lock, and
  at the start of each migration batch and verify;
* the store's own writes, which apply their ops as they commit
  (:mod:`aggtree.events.store`).

Writers prune the log now and then (keeping the newest ``change_log_keep``
rows); :meth:`SyncMixin.compact_change_log` does it on demand.  A store that
has fallen further behind than that reloads in bulk.

How a backend notices other writers, and what it guarantees about the log's
ids, is in :mod:`aggtree.events.backend`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import numpy as np

from .oplog import decode
from .state import StoreState

__all__ = ["SyncMixin", "NeedReload"]


class NeedReload(Exception):
    """Internal: the change-log rows this store needs were pruned (or the
    log went back): only a bulk load brings the aggregates up to date."""


class SyncMixin(StoreState):
    """The sync half of :class:`~aggtree.events.EventStore`.  Uses the
    store's ``_backend``, ``_sql``, ``_aggs`` / ``_set_aggregates``,
    ``_starts``, ``_apply``, ``_cls``, ``_node_size`` and the state below;
    every method runs under the store's lock.

    State: ``change_id`` (the last change-log row reflected),
    ``_data_version`` (the change token the reads last caught up to),
    ``_write_version`` (the token the writer last caught up to, None to
    force a check), ``_stale`` (rebuild on the next access), counters
    ``reloads`` and ``changes_replayed``."""

    # -- the bulk load ---------------------------------------------------------

    def _reload(self) -> None:
        """Rebuild every aggregate (and the start cache) from the tables, in
        bulk."""
        backend = self._backend
        q = self._sql
        version = backend.change_token()  # before the snapshot: never misses a commit
        with backend.transaction() as conn:
            last = conn.execute(q.log_head).fetchone()[0]
            drift = backend.read_drift(conn)
            ev = backend.read_matrix(conn, q.all_events, 4)
            fo = backend.read_matrix(conn, q.all_follows, 2)
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
        backend.drift_seen = drift
        self._data_version = version
        self._write_version = None
        self._stale = False
        self._migration = None
        self._complete = True
        self.reloads += 1

    # -- catching up -------------------------------------------------------------

    def _catch_up(self, conn: Any) -> None:
        """Replay the change-log rows after ``change_id`` that ``conn`` sees
        (inside a transaction: exactly those of its snapshot), in order.
        ``NeedReload`` if they do not follow on from ``change_id`` (pruned)
        or if the log's head is below it (the database was replaced or its
        log reset).  If applying fails halfway the store is marked stale
        (rebuilt on the next access) and the error propagates."""
        last = self.change_id
        rows = conn.execute(self._sql.log_after, (last,)).fetchall()
        if rows:
            if rows[0][0] != last + 1:
                raise NeedReload()
        elif last and conn.execute(self._sql.log_head).fetchone()[0] < last:
            raise NeedReload()
        self._replay(rows)

    def _replay(self, rows: Any) -> None:
        """Apply change-log rows ``(change_id, ops blob)``, which follow on
        from ``change_id``, in order: the one replay loop of the store (catch
        up, warm start).  If applying fails halfway the store is marked stale
        (rebuilt on the next access) and the error propagates."""
        try:
            for change_id, blob in rows:
                self._apply(decode(blob), None)
                self.change_id = change_id
                self.changes_replayed += 1
        except BaseException:
            self._stale = True  # half-replayed: rebuild on the next access
            raise

    def _sync(self) -> None:
        """Before a read: bring the aggregates up to date with the database.
        Cheap when nothing changed (one :meth:`change_token`), otherwise
        replays only the new change-log rows, and reloads in bulk only if
        those were pruned."""
        if self._stale:
            self._reload()
            return
        if self._backend.private:
            return
        version = self._backend.change_token()
        if version != self._data_version:
            self._catch_up_now(version)

    def _catch_up_now(self, version: Any = None) -> None:
        """Under the lock: replay every committed change-log row after
        ``change_id`` on the main connection (reload if they were pruned),
        then remember ``version`` (the backend's change token read before
        the replay; read here if not given) as the state caught up to."""
        if version is None:
            version = self._backend.change_token()
        try:
            self._catch_up(self._backend.conn)
        except NeedReload:
            self._reload()
            return
        self._data_version = version

    @contextlib.contextmanager
    def _caught_up(self) -> Iterator[Any]:
        """A read transaction whose snapshot the aggregates reflect exactly
        (the change log replayed inside it; reloading first if needed);
        yields the connection."""
        backend = self._backend
        for _ in range(3):
            with backend.transaction() as conn:
                try:
                    self._catch_up(conn)
                    caught_up = True
                except NeedReload:
                    caught_up = False
                if caught_up:
                    yield conn
                    return
            self._reload()
        raise RuntimeError("could not catch up with the change log")  # pragma: no cover

    # -- the change log ----------------------------------------------------------

    def compact_change_log(self, keep: Optional[int] = None) -> int:
        """Delete all but the newest ``keep`` change-log rows (default:
        ``change_log_keep``; the newest row always stays).  Returns the
        number of rows deleted.  Stores that still needed them reload in bulk
        on their next read."""
        keep = self._keep if keep is None else keep
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError("keep must be a non-negative int")
        with self._lock:
            return self._backend.compact_log(keep)


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
