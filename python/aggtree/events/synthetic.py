"""Synthetic data: :func:`generate_dataset` fills a SQLite database with a
skewed, realistic event dataset (a few heavy users, a long tail of light
ones, Zipf-popular events), fast, for the demo, the benchmarks and the
tests.
"""

from __future__ import annotations

import itertools
import time
from datetime import datetime
from typing import Any, NamedTuple, Optional

import numpy as np

from .schema import is_postgres_target, to_ms, utcnow
from .sqlite import SQLiteBackend

__all__ = ["DatasetInfo", "generate_dataset"]


class DatasetInfo(NamedTuple):
    """What :func:`generate_dataset` wrote."""

    users: int
    events: int
    follows: int
    heavy_users: list
    seconds: float


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
    now_ms = to_ms(now if now is not None else utcnow(), "now")
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

    if is_postgres_target(path):
        _write_postgres(path, names, user_created, owners, starts, ends, created,
                        f_users, f_events, f_created)
        return DatasetInfo(users, events, len(f_users), names[:n_heavy], time.perf_counter() - started)
    backend = SQLiteBackend(path, synchronous="OFF")  # (creates the tables)
    try:
        backend.conn.execute("PRAGMA cache_size = -262144")  # 256 MiB: no thrashing on big loads
        if backend.conn.execute("SELECT count(*) FROM users").fetchone()[0]:
            raise ValueError(f"{path} already holds data")
        with backend.transaction(write=True) as conn:
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
            for stmt in backend.sql.schema:  # the indexes again
                conn.execute(stmt)
    finally:
        backend.close()
    return DatasetInfo(users, events, len(f_users), names[:n_heavy], time.perf_counter() - started)


def _write_postgres(target: Any, names: list, user_created: int, owners: np.ndarray,
                    starts: np.ndarray, ends: np.ndarray, created: np.ndarray,
                    f_users: np.ndarray, f_events: np.ndarray, f_created: np.ndarray) -> None:
    """The dataset into an empty PostgreSQL database, with COPY, in one
    transaction marked as the store's (the drift triggers stay quiet: no
    store has loaded anything yet)."""
    from .postgres import PostgresBackend  # psycopg: only here

    backend = PostgresBackend(target)  # (creates the tables)
    try:
        conn = backend.conn
        if conn.execute("SELECT count(*) FROM users").fetchone()[0]:
            raise ValueError(f"{backend.path} already holds data")
        with conn.transaction():
            conn.execute("SELECT set_config('aggtree.writer', 'store', true)")
            with conn.cursor() as cur:
                with cur.copy("COPY users (id, username, created_at) FROM STDIN") as cp:
                    for i, name in enumerate(names):
                        cp.write_row((i + 1, name, user_created))
                with cur.copy("COPY events (id, user_id, name, start_time, end_time, created_at)"
                              " FROM STDIN") as cp:
                    for row in zip(range(1, len(owners) + 1), owners.tolist(), itertools.repeat("event"),
                                   starts.tolist(), ends.tolist(), created.tolist()):
                        cp.write_row(row)
                with cur.copy("COPY event_follows (user_id, event_id, created_at) FROM STDIN") as cp:
                    for row in zip(f_users.tolist(), f_events.tolist(), f_created.tolist()):
                        cp.write_row(row)
            for table in ("users", "events"):  # identities continue after the ids given
                conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                             f" greatest((SELECT max(id) FROM {table}), 1))")
        conn.execute("ANALYZE users, events, event_follows")
    finally:
        backend.close()
