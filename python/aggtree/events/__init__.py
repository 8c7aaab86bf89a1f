"""The event-stats application: an event store whose user stats are
aggregate counts.

The application is the kind of system aggtree exists for: users create
events (with a start time) and follow other users' events, and each user's
stats page shows how many events they captured this week, how many of their
own and followed events are upcoming, and their all-time totals.  Its
original form computed those stats by reading every event and follow of the
user, plus one query per followed event, so a heavy user's page cost
hundreds of milliseconds.  Here every stat is a bounded O(log n)
:meth:`Aggregate.count <aggtree.Aggregate.count>` on an aggregate kept in
step with the tables by every write.  docs/EVENTS.md describes the
application, its four aggregates and the stats at more length.

Data
----
The tables live in a database (SQLite today; :mod:`aggtree.events.schema`
lists them).  Four aggregates live in memory, each namespaced by user id,
each a :class:`~aggtree.TableAggregate`:

=============================  =====================  ==========  ========
attribute                      namespace              key         id
=============================  =====================  ==========  ========
``events_by_creation``         owner                  created_at  event id
``events_by_start``            owner                  start_time  event id
``event_follows``              follower               ``None``    event id
``followed_events_by_start``   follower               start_time  event id
=============================  =====================  ==========  ========

The fourth is denormalised (an event's start time copied into every
follower's namespace): it makes ``upcoming_followed`` O(log n) instead of a
query per followed event.  Changing an event's start moves the event's item
in every follower's namespace; deleting it removes them.

The package, one module per concern
-----------------------------------
* :mod:`~aggtree.events.schema`: the tables, the portable SQL statements,
  times as milliseconds;
* :mod:`~aggtree.events.oplog`: op codes, their change-log codec, the op
  loops and the start-time cache;
* :mod:`~aggtree.events.store`: :class:`EventStore`, its transactional
  writes and the write hooks;
* :mod:`~aggtree.events.sync`: bulk load and catch-up from the change log
  (several processes on one database);
* :mod:`~aggtree.events.warm`: the warm start (the snapshot written at
  close, loaded at open when it reflects the database's state);
* :mod:`~aggtree.events.migrate`: the batched, resumable backfill;
* :mod:`~aggtree.events.verify`: compare the aggregates with the tables,
  repair;
* :mod:`~aggtree.events.stats`: the stats through the aggregates and the
  naive oracle;
* :mod:`~aggtree.events.synthetic`: :func:`generate_dataset`;
* :mod:`~aggtree.events.backend`: the :class:`~aggtree.events.backend.Backend`
  seam (dialect, transactions, noticing other writers, the warm-start
  state), implemented by
  :mod:`~aggtree.events.sqlite`.

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

from datetime import datetime
from typing import Optional

from .migrate import MigrationReport
from .oplog import StartCache as _StartCache  # noqa: F401  (tests)
from .schema import AGGREGATE_NAMES, from_ms, to_ms  # noqa: F401
from .sqlite import _connect  # noqa: F401  (benchmarks)
from .stats import WEEKLY_GOAL, UserStats
from .store import EventStore
from .synthetic import DatasetInfo, generate_dataset
from .verify import Difference, VerifyReport

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



# ---------------------------------------------------------------------------
# Module-level forms (every option passed through)
# ---------------------------------------------------------------------------


def get_user_stats(store: EventStore, username: str, now: Optional[datetime] = None) -> UserStats:
    """``store.get_user_stats(username, now)``."""
    return store.get_user_stats(username, now)


def get_user_stats_naive(store: EventStore, username: str, now: Optional[datetime] = None) -> UserStats:
    """``store.get_user_stats_naive(username, now)``."""
    return store.get_user_stats_naive(username, now)


def initialize_aggregates(
    store: EventStore, batch_size: int = 5000, progress: Optional[bool] = None, *, restart: bool = False
) -> MigrationReport:
    """``store.initialize_aggregates(batch_size, progress, restart=restart)``."""
    return store.initialize_aggregates(batch_size, progress, restart=restart)


def verify_aggregates(
    store: EventStore, repair: bool = False, *, max_listed: Optional[int] = None
) -> VerifyReport:
    """``store.verify_aggregates(repair, max_listed=max_listed)``."""
    return store.verify_aggregates(repair, max_listed=max_listed)
