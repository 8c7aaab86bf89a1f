"""User stats: what the application shows a user, computed two ways.

* :meth:`StatsMixin.get_user_stats`, the aggregate path: five bounded
  :meth:`Aggregate.count <aggtree.Aggregate.count>` calls, O(log n) whatever
  the user's data;
* :meth:`StatsMixin.get_user_stats_naive`, the original app's path: load
  every event and follow of the user, filter in Python, fetch each followed
  event with its own query (N+1).  O(n); the benchmarks' baseline and the
  tests' oracle.

:class:`UserStats` states the semantics both implement.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Optional

from .. import Bound
from .state import StoreState
from .schema import BY_CREATION, BY_START, FOLLOWED_BY_START, FOLLOWS, WEEK_MS, check_text, to_ms

__all__ = ["UserStats", "StatsMixin", "WEEKLY_GOAL"]

#: The weekly capture goal reported by :meth:`EventStore.get_user_stats`.
WEEKLY_GOAL = 5


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


def _exclusive(key: int) -> Bound:
    return Bound(key, inclusive=False)


class StatsMixin(StoreState):
    """The stats half of :class:`~aggtree.events.EventStore`.  Uses the
    store's ``_lock``, ``_clock``, ``_sync``, ``_lookup_user``, ``_tables``
    and ``_backend``."""

    def _now_ms(self, now: Optional[datetime]) -> int:
        return to_ms(self._clock() if now is None else now, "now")

    def get_user_stats(self, username: str, now: Optional[datetime] = None) -> UserStats:
        """The user's stats at ``now`` (default: the clock), from five
        bounded aggregate counts: O(log n), no query grows with the user's
        data.  An unknown username gets zeros.  See :class:`UserStats` for the
        exact semantics."""
        check_text(username, "username")
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
        check_text(username, "username")
        now_ms = self._now_ms(now)
        week_ago = now_ms - WEEK_MS
        q = self._sql
        with self._lock:
            for attempt in (0, 1):  # once more on a new connection if it was lost
                try:
                    with self._backend.transaction() as conn:  # one snapshot for all the queries
                        row = conn.execute(q.user_by_name, (username,)).fetchone()
                        if row is None:
                            return UserStats.zero()
                        user_id = row[0]
                        events = conn.execute(q.events_of_user, (user_id,)).fetchall()
                        follows = conn.execute(q.follows_of_user, (user_id,)).fetchall()
                        upcoming_followed = 0
                        for follow in follows:
                            event = conn.execute(q.event_by_id, (follow[1],)).fetchone()
                            if event is not None and event[3] >= now_ms:
                                upcoming_followed += 1
                    break
                except self._backend.connection_errors:
                    if attempt:
                        raise
                    self._backend.lost()  # type: ignore[attr-defined]
        return UserStats.from_parts(
            captures_this_week=sum(1 for e in events if week_ago <= e[5] <= now_ms),
            upcoming_own=sum(1 for e in events if e[3] > now_ms),
            upcoming_followed=upcoming_followed,
            all_time_own=len(events),
            total_follows=len(follows),
        )
