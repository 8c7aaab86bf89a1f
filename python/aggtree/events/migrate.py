"""The migration: fill the aggregates of a live database in batches
(:meth:`MigrationMixin.initialize_aggregates`), next to live writes.

This is how an existing database of the original app gains its aggregates
without downtime: open the store with ``load=False`` (empty aggregates, live
writes keep them right for the rows they touch), then backfill every event
and follow with idempotent upserts, ``batch_size`` rows at a time, each batch
read in one snapshot after catching up with the change log.  Progress is a
tqdm bar on a terminal, log lines otherwise (:class:`_Progress`); an
interrupted run resumes after its last complete batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import time
from typing import Optional

from .. import DuplicateItemError
from .schema import BY_CREATION, BY_START, FOLLOWED_BY_START, FOLLOWS
from .state import StoreState

__all__ = ["MigrationReport", "MigrationMixin"]

log = logging.getLogger("aggtree.events")


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


_FIRST = (-(2**63), -(2**63))  # the keyset before every (user_id, id)


class MigrationMixin(StoreState):
    """The migration half of :class:`~aggtree.events.EventStore`.  Uses the
    store's ``_lock``, ``_sync``, ``_reload``, ``_caught_up``, ``_stale``,
    ``reloads``, ``_tables``, ``_starts`` and ``_sql``; keeps its progress in
    ``_migration`` (None when no run is under way; a bulk load, which is a
    complete migration, resets it)."""

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
        q = self._sql
        with self._lock:
            self._sync()
            state = self._migration
            resumed = state is not None and not restart
            if state is None or not resumed:
                state = self._migration = {"phase": "events", "after": _FIRST,
                                           "events": 0, "follows": 0, "inserted": 0, "batches": 0}
            conn = self._backend.conn
            n_events = conn.execute(q.count_events).fetchone()[0]
            n_follows = conn.execute(q.count_follows).fetchone()[0]
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
                if state["phase"] == "done":
                    self._complete = True  # every row is in: a snapshot may be taken
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
        q = self._sql
        reloads = self.reloads
        if self._stale:
            self._reload()
        with self._caught_up() as conn:
            if self.reloads != reloads:  # a bulk reload is a complete migration
                state["phase"] = "done"
                return 0
            after = state["after"]
            sql = q.events_after if state["phase"] == "events" else q.follows_after
            rows = conn.execute(sql, (after[0], after[1], batch_size)).fetchall()
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
                state["phase"], state["after"] = "follows", _FIRST
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
        for _ns, rows_of_ns in itertools.groupby(rows, key=lambda r: r[0]):
            group = list(rows_of_ns)
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
