"""Tests of the event store (aggtree.events): stats semantics, writes and
their errors, random operation sequences against the naive path, injected
failures inside write transactions, the migration (interrupted and resumed),
verify / repair, and catch-up between two stores on one file.

The oracle is ``get_user_stats_naive`` (plain SQL and Python filtering) plus
``verify_aggregates`` (item-by-item comparison with the tables).  Tests that
do not concern the Aggregate implementation use ``aggtree.Aggregate``; the
random sequences run against both implementations (``impl`` fixture).
"""

from __future__ import annotations

import random
import sqlite3
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from aggtree.events import (
    AGGREGATE_NAMES,
    EventStore,
    _StartCache,
    UserStats,
    generate_dataset,
    get_user_stats,
    get_user_stats_naive,
    initialize_aggregates,
    to_ms,
    verify_aggregates,
)

UTC = timezone.utc
T0 = datetime(2024, 5, 1, 12, tzinfo=UTC)
HOUR = timedelta(hours=1)
WEEK = timedelta(days=7)


def at(hours: float) -> datetime:
    """T0 plus a number of hours: a grid on which boundaries coincide."""
    return T0 + hours * HOUR


class Clock:
    """A settable clock for ``EventStore.open(clock=...)``."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def usernames(store: EventStore) -> list:
    return [r[0] for r in store._conn.execute("SELECT username FROM users ORDER BY id")]


def starts_dump(store: EventStore) -> dict:
    """The start cache's contents: event id -> start time."""
    empty = store._starts.EMPTY
    return {i: v for i, v in enumerate(store._starts.a) if v != empty}


def assert_starts_cached_right(store: EventStore) -> None:
    """Every start time the store caches is the event's start in the table
    (the cache may miss events, never disagree or keep deleted ones)."""
    table = dict(store._conn.execute("SELECT id, start_time FROM events").fetchall())
    for event_id, start in starts_dump(store).items():
        assert table.get(event_id) == start, (event_id, start, table.get(event_id))


def assert_consistent(store: EventStore, nows=(T0,)) -> None:
    """Every user's stats equal the naive path at every ``now``, the start
    cache agrees with the table, and verify_aggregates finds nothing."""
    for name in usernames(store):
        for now in nows:
            fast = store.get_user_stats(name, now=now)
            slow = store.get_user_stats_naive(name, now=now)
            assert fast == slow, (name, now, fast, slow)
    store._sync()  # (caught up by the reads above, unless there are no users)
    assert_starts_cached_right(store)
    report = store.verify_aggregates()
    assert report.ok, report.differences[:10]
    for name in AGGREGATE_NAMES:
        getattr(store, name).check()


def table_dump(store: EventStore) -> tuple:
    conn = store._conn
    return tuple(
        conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
        for t in ("users", "events", "event_follows")
    )


def aggregate_dump(store: EventStore) -> list:
    out = []
    for name in AGGREGATE_NAMES:
        agg = getattr(store, name).aggregate
        out.append(
            sorted((ns, tuple((it.key, it.id) for it in agg.iter(namespace=ns))) for ns in agg.namespaces())
        )
    return out


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(backend_name, clock, request):
    """A store on each backend: SQLite ``:memory:`` and a fresh PostgreSQL
    database (skipped without a server, see conftest.py)."""
    if backend_name == "postgres":
        s = EventStore.open(request.getfixturevalue("pg_uri"), clock=clock)
    else:
        s = EventStore.open(":memory:", clock=clock)
    yield s
    s.close()


@pytest.fixture
def sqlite_store(clock):
    """For what only the SQLite store does (undo on a failed commit, the
    start cache answering follow / unfollow, sqlite3 errors)."""
    s = EventStore.open(":memory:", clock=clock)
    yield s
    s.close()


@pytest.fixture
def sqlite_world(sqlite_store):
    return _world(sqlite_store)


def q(store: EventStore, sql: str) -> str:
    """``sql`` written with ``?`` in the store's placeholders."""
    return sql.replace("?", store._sql.placeholder)


@pytest.fixture
def world(store):
    """Three users, a few events, some follows."""
    return _world(store)


def _world(store):
    alice = store.create_user("alice")
    bob = store.create_user("bob")
    carol = store.create_user("carol")
    e1 = store.create_event(alice, name="a1", start=at(10), created_at=at(-1))
    e2 = store.create_event(alice, name="a2", start=at(-10), created_at=at(-200))
    e3 = store.create_event(bob, name="b1", start=at(5), created_at=at(-2))
    store.follow_event(bob, e1)
    store.follow_event(carol, e1)
    store.follow_event(carol, e3)
    return store, (alice, bob, carol), (e1, e2, e3)


# ---------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------


def test_stats_example(world):
    store, (alice, bob, carol), _ = world
    s = store.get_user_stats("carol", now=T0)
    assert s == UserStats(
        captures_this_week=0, weekly_goal=5, upcoming_events=2, all_time_events=2,
        upcoming_own=0, upcoming_followed=2, all_time_own=0, total_follows=2,
    )
    s = store.get_user_stats("alice", now=T0)
    assert (s.captures_this_week, s.upcoming_own, s.all_time_own, s.all_time_events) == (1, 1, 2, 2)
    assert get_user_stats(store, "bob", T0) == get_user_stats_naive(store, "bob", T0)
    assert s.to_dict()["weekly_goal"] == 5


def test_boundaries_are_exact(store):
    u = store.create_user("u")
    f = store.create_user("f")
    now = at(0)
    # created exactly at now - 7 days and exactly at now count; 1 ms outside does not.
    for created in (now - WEEK, now, now - WEEK - timedelta(milliseconds=1), now + timedelta(milliseconds=1)):
        store.create_event(u, name="c", start=at(-100), created_at=created)
    # own events: start == now is not upcoming; followed: start == now is.
    e_now = store.create_event(u, name="s", start=now, created_at=at(-500))
    e_later = store.create_event(u, name="s", start=now + timedelta(milliseconds=1), created_at=at(-500))
    store.follow_event(f, e_now)
    store.follow_event(f, e_later)
    s = store.get_user_stats("u", now=now)
    assert s.captures_this_week == 2
    assert s.upcoming_own == 1
    t = store.get_user_stats("f", now=now)
    assert t.upcoming_followed == 2
    assert t == store.get_user_stats_naive("f", now=now)
    assert s == store.get_user_stats_naive("u", now=now)


def test_unknown_user_gets_zeros(store):
    assert store.get_user_stats("nobody") == UserStats.zero()
    assert store.get_user_stats_naive("nobody") == UserStats.zero()
    assert store.user_id("nobody") is None


def test_other_timezones_and_default_now(store, clock):
    u = store.create_user("u")
    tz = timezone(timedelta(hours=-5))
    store.create_event(u, name="x", start=(T0 + HOUR).astimezone(tz), created_at=T0.astimezone(tz))
    assert store.get_user_stats("u").upcoming_own == 1  # now = clock = T0
    clock.now = T0 + 2 * HOUR
    assert store.get_user_stats("u").upcoming_own == 0
    assert store.get_event(1)["start_time"] == to_ms(T0 + HOUR)


# ---------------------------------------------------------------------------
# Writes and their errors
# ---------------------------------------------------------------------------


def test_errors(world):
    store, (alice, bob, carol), (e1, e2, e3) = world
    before = (table_dump(store), aggregate_dump(store))
    with pytest.raises(ValueError):
        store.create_user("alice")
    with pytest.raises(ValueError):
        store.create_event(alice, name="x", start=datetime(2024, 1, 1))  # naive
    with pytest.raises(ValueError):
        store.create_event(alice, name="x", start=at(1), created_at=datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        store.create_event(alice, name="x", start=at(2), end=at(1))
    with pytest.raises(TypeError):
        store.create_event(alice, name="x", start=to_ms(at(1)))
    with pytest.raises(TypeError):
        store.create_event("alice", name="x", start=at(1))
    with pytest.raises(LookupError):
        store.create_event(999, name="x", start=at(1))
    with pytest.raises(PermissionError):
        store.update_event(bob, e1, start=at(3))
    with pytest.raises(PermissionError):
        store.delete_event(bob, e1)
    with pytest.raises(LookupError):
        store.update_event(alice, 999, start=at(3))
    with pytest.raises(LookupError):
        store.delete_event(alice, 999)
    with pytest.raises(ValueError):
        store.update_event(alice, e1, start=datetime(2024, 1, 1))
    with pytest.raises(ValueError):
        store.update_event(alice, e1, end=at(-50))  # before start
    with pytest.raises(LookupError):
        store.follow_event(999, e1)
    with pytest.raises(LookupError):
        store.follow_event(bob, 999)
    with pytest.raises(LookupError):
        store.unfollow_event(bob, 999)
    with pytest.raises(LookupError):
        store.unfollow_event(999, e1)
    with pytest.raises(ValueError):
        store.get_user_stats("alice", now=datetime(2024, 1, 1))
    assert (table_dump(store), aggregate_dump(store)) == before
    assert_consistent(store)


def test_follow_unfollow_are_idempotent(world):
    store, (alice, bob, carol), (e1, e2, e3) = world
    assert store.follow_event(alice, e3) is True
    assert store.follow_event(alice, e3) is False
    assert store.get_user_stats("alice", now=T0).total_follows == 1
    assert store.unfollow_event(alice, e3) is True
    assert store.unfollow_event(alice, e3) is False
    assert store.get_user_stats("alice", now=T0).total_follows == 0
    assert_consistent(store)


def test_update_moves_every_follower(world):
    store, (alice, bob, carol), (e1, e2, e3) = world
    assert store.get_user_stats("carol", now=T0).upcoming_followed == 2
    store.update_event(alice, e1, start=at(-3), name="moved")
    assert store.get_user_stats("carol", now=T0).upcoming_followed == 1
    assert store.get_user_stats("bob", now=T0).upcoming_followed == 0
    assert store.get_user_stats("alice", now=T0).upcoming_own == 0
    store.update_event(alice, e1, name="renamed only")  # no aggregate change
    assert store.get_event(e1)["name"] == "renamed only"
    assert store.get_event(e1)["start_time"] == to_ms(at(-3))
    store.update_event(alice, e1, end=None, description="d", location="l")
    assert_consistent(store, nows=(at(-5), T0, at(20)))


def test_delete_cascades_to_follows(world):
    store, (alice, bob, carol), (e1, e2, e3) = world
    store.delete_event(alice, e1)
    assert store.get_event(e1) is None
    assert store._conn.execute(q(store, "SELECT count(*) FROM event_follows WHERE event_id = ?"), (e1,)).fetchone()[0] == 0
    assert store.get_user_stats("carol", now=T0).total_follows == 1
    assert store.get_user_stats("bob", now=T0).all_time_events == 1
    assert_consistent(store)


# ---------------------------------------------------------------------------
# Random operation sequences
# ---------------------------------------------------------------------------

GRID = [at(h) for h in range(-400, 401, 8)]  # 7 days = 21 grid steps


def run_random_sequence(store: EventStore, clock: Clock, rng: random.Random, steps: int) -> None:
    users: list = []
    events: dict = {}  # id -> owner
    for step in range(steps):
        op = rng.random()
        if not users or op < 0.05:
            users.append(store.create_user(f"user{len(users)}"))
        elif op < 0.35:
            owner = rng.choice(users)
            eid = store.create_event(
                owner, name="e", start=rng.choice(GRID), created_at=min(rng.choice(GRID), clock.now)
            )
            events[eid] = owner
        elif op < 0.55 and events:
            eid = rng.choice(list(events))
            store.update_event(events[eid], eid, start=rng.choice(GRID))
        elif op < 0.62 and events:
            eid = rng.choice(list(events))
            store.delete_event(events.pop(eid), eid)
        elif op < 0.85 and events:
            store.follow_event(rng.choice(users), rng.choice(list(events)))
        elif op < 0.95 and events:
            store.unfollow_event(rng.choice(users), rng.choice(list(events)))
        else:
            clock.now += rng.choice([HOUR, 24 * HOUR, WEEK])
        if step % 25 == 0:
            assert_consistent(store, nows=(clock.now, rng.choice(GRID)))
    assert_consistent(store, nows=(clock.now, *rng.sample(GRID, 5)))


@pytest.mark.parametrize("seed", range(4))
def test_random_sequences(impl, seed):
    clock = Clock()
    store = EventStore.open(":memory:", clock=clock, aggregate_class=impl, node_size=4)
    run_random_sequence(store, clock, random.Random(seed), 500)
    # A bulk reload builds exactly what the writes built.
    before = aggregate_dump(store)
    store._reload()
    assert aggregate_dump(store) == before


def test_random_sequence_on_postgres(pg_uri):
    """The random writes through the PostgreSQL store: stats == naive and
    verify clean along the way; a second instance ends equal."""
    clock = Clock()
    store = EventStore.open(pg_uri, clock=clock, node_size=4)
    try:
        run_random_sequence(store, clock, random.Random(7), 150)
        with EventStore.open(pg_uri, clock=clock) as other:
            assert aggregate_dump(other) == aggregate_dump(store)
    finally:
        store.close()


def test_random_sequence_on_a_file(tmp_path):
    clock = Clock()
    store = EventStore.open(str(tmp_path / "ev.db"), clock=clock, node_size=4)
    run_random_sequence(store, clock, random.Random(99), 200)
    store.close()
    again = EventStore.open(str(tmp_path / "ev.db"), clock=clock)
    assert_consistent(again, nows=(clock.now,))


class EventStoreMachine(RuleBasedStateMachine):
    """Hypothesis drives the writes; after every step the aggregates agree
    with the naive path."""

    aggregate_class = None

    @initialize()
    def open_store(self):
        self.clock = Clock()
        self.store = EventStore.open(":memory:", clock=self.clock, node_size=4,
                                     aggregate_class=self.aggregate_class)
        self.users: list = []
        self.events: dict = {}

    @rule()
    def create_user(self):
        self.users.append(self.store.create_user(f"u{len(self.users)}"))

    @precondition(lambda self: self.users)
    @rule(data=st.data(), start=st.sampled_from(GRID), created=st.sampled_from(GRID))
    def create_event(self, data, start, created):
        owner = data.draw(st.sampled_from(self.users))
        eid = self.store.create_event(owner, name="e", start=start, created_at=created)
        self.events[eid] = owner

    @precondition(lambda self: self.events)
    @rule(data=st.data(), start=st.sampled_from(GRID))
    def move_event(self, data, start):
        eid = data.draw(st.sampled_from(sorted(self.events)))
        self.store.update_event(self.events[eid], eid, start=start)

    @precondition(lambda self: self.events)
    @rule(data=st.data())
    def delete_event(self, data):
        eid = data.draw(st.sampled_from(sorted(self.events)))
        self.store.delete_event(self.events.pop(eid), eid)

    @precondition(lambda self: self.events and self.users)
    @rule(data=st.data(), follow=st.booleans())
    def follow_or_unfollow(self, data, follow):
        user = data.draw(st.sampled_from(self.users))
        eid = data.draw(st.sampled_from(sorted(self.events)))
        (self.store.follow_event if follow else self.store.unfollow_event)(user, eid)

    @rule(hours=st.integers(0, 200))
    def time_passes(self, hours):
        self.clock.now += hours * HOUR

    @invariant()
    def stats_agree(self):
        if not hasattr(self, "store"):
            return
        for name in usernames(self.store):
            for now in (self.clock.now, T0):
                assert self.store.get_user_stats(name, now=now) == self.store.get_user_stats_naive(name, now=now)

    def teardown(self):
        if hasattr(self, "store"):
            assert self.store.verify_aggregates().ok
            self.store.close()


def test_state_machine(impl):
    machine = type("Machine", (EventStoreMachine,), {"aggregate_class": impl})
    run = machine.TestCase
    run.settings = settings(run.settings, max_examples=15, stateful_step_count=25, deadline=None)
    run().runTest()


# ---------------------------------------------------------------------------
# Injected failures
# ---------------------------------------------------------------------------


class Injected(Exception):
    """The failure tests inject."""


_MUTATORS = {"insert", "delete", "replace", "upsert", "delete_if_exists",
             "replace_or_insert", "insert_many", "delete_many"}


class Flaky:
    """Wraps an Aggregate; the ``fail_at``-th mutating call (counted over all
    wrappers sharing ``counter``) raises ``exc`` instead of running."""

    def __init__(self, agg, counter: list, fail_at: int, exc=Injected) -> None:
        self._agg = agg
        self._counter = counter
        self._fail_at = fail_at
        self._exc = exc

    def __getattr__(self, name):
        attr = getattr(self._agg, name)
        if name not in _MUTATORS:
            return attr

        def call(*args, **kwargs):
            n = self._counter[0]
            self._counter[0] += 1
            if n == self._fail_at:
                raise self._exc("injected")
            return attr(*args, **kwargs)

        return call

    def __len__(self):
        return len(self._agg)


def make_flaky(store: EventStore, fail_at: int, exc=Injected) -> list:
    """Put Flaky wrappers in place of the store's four aggregates (the
    store then applies its ops through the Python loop, which calls the
    wrappers); returns the real ones for :func:`restore`."""
    counter = [0]
    real = [getattr(store, name).aggregate for name in AGGREGATE_NAMES]
    store._set_aggregates([Flaky(agg, counter, fail_at, exc) for agg in real])
    return real


def restore(store: EventStore, real: list) -> None:
    store._set_aggregates(real)


def popular_world(store):
    owner = store.create_user("owner")
    fans = [store.create_user(f"fan{i}") for i in range(4)]
    eid = store.create_event(owner, name="popular", start=at(10), created_at=at(-1))
    for fan in fans:
        store.follow_event(fan, eid)
    return owner, fans, eid


WRITES = {
    "create_event": lambda s, o, f, e: s.create_event(o, name="n", start=at(3), created_at=at(-3)),
    "update_event": lambda s, o, f, e: s.update_event(o, e, start=at(-30)),
    "delete_event": lambda s, o, f, e: s.delete_event(o, e),
    "follow_event": lambda s, o, f, e: s.follow_event(o, e),
    "unfollow_event": lambda s, o, f, e: s.unfollow_event(f[0], e),
}


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("write", sorted(WRITES))
def test_failure_midway_leaves_no_drift(sqlite_store, write, exc):
    store = sqlite_store  # (PostgreSQL applies only after COMMIT: test_events_postgres.py)
    owner, fans, eid = popular_world(store)
    fail_at = 0
    while True:
        before = (table_dump(store), aggregate_dump(store), starts_dump(store))
        real = make_flaky(store, fail_at, exc)
        try:
            WRITES[write](store, owner, fans, eid)
        except exc:
            restore(store, real)
            assert (table_dump(store), aggregate_dump(store), starts_dump(store)) == before, fail_at
            assert not store._conn.in_transaction
            fail_at += 1
            continue
        restore(store, real)
        break
    assert fail_at >= 1  # at least one injection point was exercised
    assert_consistent(store, nows=(T0, at(-40)))


ALLOCATING_WRITES = {
    # writes whose ops make new namespaces (new trees: C allocations) in two
    # aggregates, so that the second op can fail after the first took effect
    "create_event": lambda s, u: s.create_event(u, name="n", start=at(3), created_at=at(-3)),
    "follow_event": lambda s, u: s.follow_event(u, 1),
}


@pytest.mark.parametrize("write", sorted(ALLOCATING_WRITES))
def test_allocation_failure_in_the_native_apply_leaves_no_drift(sqlite_store, write):
    """The C loop (aggtree._event_ops.apply_ops) under allocation failures:
    every failing write raises MemoryError and leaves tables, aggregates and
    the start cache as they were."""
    store = sqlite_store
    core = pytest.importorskip("aggtree._core")
    event_ops = pytest.importorskip("aggtree._event_ops")
    if store._apply_ops is not event_ops.apply_ops:
        pytest.skip("the store does not use the native loop")
    popular_world(store)
    fail_at = 0
    while True:
        user = store.create_user(f"fresh{fail_at}")
        before = (table_dump(store), aggregate_dump(store), starts_dump(store))
        core._debug_fail_after(fail_at)
        try:
            ALLOCATING_WRITES[write](store, user)
        except MemoryError:
            core._debug_fail_after(-1)
            assert (table_dump(store), aggregate_dump(store), starts_dump(store)) == before, fail_at
            assert not store._conn.in_transaction
            fail_at += 1
            continue
        finally:
            core._debug_fail_after(-1)
        break
    assert fail_at >= 2  # the first op failed, then the second after the first had applied
    assert_consistent(store, nows=(T0, at(-40)))


class FailingCommit:
    """Wraps a sqlite3 connection so that COMMIT fails (after the aggregate
    changes were applied)."""

    def __init__(self, conn) -> None:
        self._conn = conn

    def execute(self, sql, *args):
        if sql == "COMMIT":
            raise sqlite3.OperationalError("injected: disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


@pytest.mark.parametrize("write", sorted(WRITES))
def test_failed_commit_undoes_aggregates(sqlite_store, write):
    store = sqlite_store
    owner, fans, eid = popular_world(store)
    before = (table_dump(store), aggregate_dump(store), starts_dump(store))
    real = store._conn
    store._conn = FailingCommit(real)
    try:
        with pytest.raises(sqlite3.OperationalError):
            WRITES[write](store, owner, fans, eid)
    finally:
        store._conn = real
    assert (table_dump(store), aggregate_dump(store), starts_dump(store)) == before
    assert_consistent(store)


# ---------------------------------------------------------------------------
# Migration
# ---------------------------------------------------------------------------


@pytest.fixture
def dataset(tmp_path, backend_name, request):
    """A generated dataset in a SQLite file or a fresh PostgreSQL database."""
    if backend_name == "postgres":  # a database of its own (``world`` has pg_uri's)
        path = request.getfixturevalue("pg_uri").replace("?", "_data?", 1)
        request.getfixturevalue("pg_server").create_database(path.split("?")[0].rsplit("/", 1)[1])
    else:
        path = str(tmp_path / "data.db")
    info = generate_dataset(path, users=30, events=600, follows=400, seed=3, now=T0)
    return path, info


def test_generate_dataset_is_skewed(dataset):
    path, info = dataset
    store = EventStore.open(path)
    counts = [store.get_user_stats(u, now=T0).all_time_own for u in info.heavy_users]
    assert counts == sorted(counts, reverse=True) and counts[0] == 150
    assert info.follows > 300
    assert_consistent(store, nows=(T0,))


def test_migration_fills_and_is_idempotent(dataset):
    path, info = dataset
    store = EventStore.open(path, load=False)
    assert len(store.events_by_creation) == 0
    assert not store.verify_aggregates().ok
    report = initialize_aggregates(store, batch_size=37, progress=False)
    assert (report.events, report.follows) == (600, info.follows)
    assert report.inserted == 2 * (600 + info.follows)
    assert_consistent(store, nows=(T0,))
    again = store.initialize_aggregates(batch_size=50, progress=False)
    assert again.inserted == 0 and not again.resumed
    assert_consistent(store, nows=(T0,))


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
def test_interrupted_migration_resumes(dataset, exc):
    path, info = dataset
    clock = Clock()
    store = EventStore.open(path, load=False, clock=clock)
    real = make_flaky(store, 9, exc)  # a few batches in
    with pytest.raises(exc):
        store.initialize_aggregates(batch_size=40, progress=False)
    restore(store, real)
    done = len(store.events_by_creation)
    assert 0 < done < 600
    # Live writes while the migration is paused, on rows on both sides of its cursor.
    ids = [r[0] for r in store._conn.execute("SELECT id, user_id FROM events ORDER BY user_id, id")]
    owner_of = dict(store._conn.execute("SELECT id, user_id FROM events").fetchall())
    first, last = ids[0], ids[-1]
    store.update_event(owner_of[first], first, start=at(-77), end=at(-76))
    store.update_event(owner_of[last], last, start=at(77), end=None)
    store.delete_event(owner_of[ids[1]], ids[1])
    store.delete_event(owner_of[ids[-2]], ids[-2])
    new = store.create_event(1, name="new", start=at(5), created_at=at(-5))
    store.follow_event(2, new)
    store.follow_event(30, ids[2])
    report = store.initialize_aggregates(batch_size=40, progress=False)
    assert report.resumed
    assert_consistent(store, nows=(T0, at(-100)))


def test_migration_progress_logs_lines(dataset, caplog):
    path, _ = dataset
    store = EventStore.open(path, load=False)
    with caplog.at_level("INFO", logger="aggtree.events"):
        store.initialize_aggregates(batch_size=100, progress=True)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("initialize aggregates:") and "rows in" in lines[-1]
    assert any("%" in line for line in lines)


# ---------------------------------------------------------------------------
# Verify and repair
# ---------------------------------------------------------------------------


def test_verify_finds_and_repairs_drift(world):
    store, (alice, bob, carol), (e1, e2, e3) = world
    by_start = store.events_by_start.aggregate
    by_start.delete(to_ms(at(10)), e1, namespace=alice)  # missing
    by_start.insert(123, 999, namespace=bob)  # extra
    store.events_by_creation.aggregate.replace(to_ms(at(-2)), e3, 5, namespace=bob)  # wrong key
    store.event_follows.aggregate.insert(None, 777, namespace=carol)  # extra follow
    store.followed_events_by_start.aggregate.delete(to_ms(at(5)), e3, namespace=carol)  # missing
    report = verify_aggregates(store)
    assert not report.ok
    kinds = sorted((d.aggregate, d.kind) for d in report.differences)
    assert kinds == [
        ("event_follows", "extra"),
        ("events_by_creation", "wrong_key"),
        ("events_by_start", "extra"),
        ("events_by_start", "missing"),
        ("followed_events_by_start", "missing"),
    ]
    wrong = next(d for d in report.differences if d.kind == "wrong_key")
    assert (wrong.namespace, wrong.id, wrong.expected_key, wrong.actual_key) == (bob, e3, to_ms(at(-2)), 5)
    assert report.total == 5 and "differences" in report.summary()
    assert store.get_user_stats("carol", now=T0) != store.get_user_stats_naive("carol", now=T0)
    capped = store.verify_aggregates(max_listed=2)
    assert len(capped.differences) == 2 and capped.total == 5
    fixed = store.verify_aggregates(repair=True)
    assert fixed.repaired and fixed.total == 5
    assert_consistent(store)


def test_module_level_forms_pass_every_option(dataset, world):
    """initialize_aggregates(store, ..., restart=) and verify_aggregates(store,
    ..., max_listed=) reach the methods (they used to be dropped)."""
    path, info = dataset
    store = EventStore.open(path, load=False)
    real = make_flaky(store, 9)
    with pytest.raises(Injected):
        initialize_aggregates(store, batch_size=40, progress=False)
    restore(store, real)
    report = initialize_aggregates(store, 40, False, restart=True)
    assert not report.resumed and report.events == 600  # started over
    assert_consistent(store, nows=(T0,))
    wstore, (alice, bob, carol), (e1, e2, e3) = world
    for i in range(5):
        wstore.events_by_start.aggregate.insert(i, 1000 + i, namespace=bob)  # extra items
    capped = verify_aggregates(wstore, max_listed=2)
    assert len(capped.differences) == 2 and capped.total == 5
    assert verify_aggregates(wstore, True, max_listed=0).repaired
    assert verify_aggregates(wstore).ok


# ---------------------------------------------------------------------------
# The start cache (follow / unfollow find the event's start without a SELECT)
# ---------------------------------------------------------------------------


def test_start_cache_basics():
    c = _StartCache()
    assert c.get(0) is None and c.get(5) is None and c.get(-1) is None
    c.set(5, 123)
    assert c.get(5) == 123 and c.get(4) is None and len(c.a) >= 6
    c.set(5, None)
    assert c.get(5) is None
    c.set(10**12, 7)  # far beyond the others: not cached (no huge array)
    assert c.get(10**12) is None and len(c.a) < 10**6
    c.set(-3, 9)
    assert c.get(-3) is None
    c.set(3, c.EMPTY + 1)
    assert c.get(3) == c.EMPTY + 1
    c.load(np.array([2, 7, 10**12], dtype=np.int64), np.array([20, 70, 1], dtype=np.int64))
    assert (c.get(2), c.get(7), c.get(5), c.get(10**12)) == (20, 70, None, None)
    c.load(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert len(c.a) == 0


def test_follow_without_cached_start_reads_the_table(sqlite_world):
    store, (alice, bob, carol), (e1, e2, e3) = sqlite_world
    store._starts = _StartCache()  # as after a migration that has not reached e1
    assert store.follow_event(alice, e1)
    assert store._starts.get(e1) == to_ms(at(10))  # read, then remembered
    store._starts = _StartCache()
    assert store.unfollow_event(carol, e1)
    assert_consistent(store)


def test_start_edited_behind_the_stores_back_is_repaired(world):
    store, (alice, bob, carol), (e1, e2, e3) = world
    # (both connections are in autocommit mode: the statement commits)
    store._conn.execute(q(store, "UPDATE events SET start_time = ? WHERE id = ?"), (to_ms(at(-50)), e1))
    report = store.verify_aggregates(repair=True)  # events_by_start and the followers' copies
    assert not report.ok and report.repaired
    assert store._starts.get(e1) == to_ms(at(-50))  # the cache follows the table again
    store.follow_event(carol, e1)
    assert_consistent(store, nows=(T0, at(-60)))


# ---------------------------------------------------------------------------
# Two stores on one file (same process; real processes: test_events_processes)
# ---------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path):
    path = str(tmp_path / "shared.db")
    a = EventStore.open(path, change_log_keep=1000)
    b = EventStore.open(path, change_log_keep=1000)
    yield a, b
    a.close()
    b.close()


def test_catch_up_replays_only_new_rows(pair):
    a, b = pair
    alice = a.create_user("alice")
    bob = a.create_user("bob")
    e = a.create_event(alice, name="x", start=at(5), created_at=at(-1))
    a.follow_event(bob, e)
    assert b.get_user_stats("bob", now=T0).upcoming_followed == 1
    reloads, replayed = b.reloads, b.changes_replayed
    a.update_event(alice, e, start=at(-5))
    assert b.get_user_stats("bob", now=T0).upcoming_followed == 0
    assert b.get_user_stats("alice", now=T0) == b.get_user_stats_naive("alice", now=T0)
    assert (b.reloads, b.changes_replayed) == (reloads, replayed + 1)
    # Unchanged file: no replay at all.
    b.get_user_stats("alice", now=T0)
    assert b.changes_replayed == replayed + 1
    # b writes while behind a: it replays a's rows first, inside its transaction.
    a.create_event(bob, name="y", start=at(6), created_at=at(-1))
    b.follow_event(alice, e)
    assert b.reloads == reloads
    for s in (a, b):
        assert_consistent(s, nows=(T0,))
    assert a.change_id == b.change_id


def test_catch_up_brings_a_store_to_the_head(pair):
    """store.catch_up() (public, both backends; PostgreSQL: test_events_postgres)
    replays what others committed, without waiting for a read."""
    a, b = pair
    alice = a.create_user("alice")
    assert b.catch_up() == 0  # creating a user changes no aggregate
    for i in range(3):
        a.create_event(alice, name="x", start=at(i), created_at=at(-i))
    assert b.change_id < a.change_id
    assert b.catch_up() == 3 and b.change_id == a.change_id
    assert b.catch_up() == 0
    assert_consistent(b, nows=(T0,))
    with EventStore.open(":memory:") as alone:
        assert alone.catch_up() == 0


def test_pruned_log_falls_back_to_reload(tmp_path):
    path = str(tmp_path / "shared.db")
    a = EventStore.open(path, change_log_keep=3)
    b = EventStore.open(path)
    u = a.create_user("u")
    b.get_user_stats("u", now=T0)
    reloads = b.reloads
    for i in range(12):
        a.create_event(u, name="x", start=at(i), created_at=at(-i))
    count = a._conn.execute("SELECT count(*) FROM aggtree_changes").fetchone()[0]
    assert count < 12
    assert b.get_user_stats("u", now=T0).all_time_own == 12
    assert b.reloads == reloads + 1
    # b's own write after a's pruned writes also ends right.
    for i in range(12):
        a.create_event(u, name="x", start=at(i), created_at=at(-i))
    b.create_event(u, name="b", start=at(1), created_at=at(-1))
    for s in (a, b):
        assert_consistent(s, nows=(T0,))
    a.close()
    b.close()


def test_compact_change_log_keeps_newest(pair):
    a, b = pair
    u = a.create_user("u")
    for i in range(5):
        a.create_event(u, name="x", start=at(i), created_at=at(-i))
    top = a.change_id
    assert a.compact_change_log(keep=0) == 4
    assert a._conn.execute("SELECT id FROM aggtree_changes").fetchall() == [(top,)]
    a.create_event(u, name="x", start=at(9), created_at=at(-9))
    assert a.change_id == top + 1  # ids never go back
    assert b.get_user_stats("u", now=T0).all_time_own == 6
    assert_consistent(b, nows=(T0,))


def test_open_options(tmp_path):
    with pytest.raises(FileNotFoundError):
        EventStore.open(str(tmp_path / "missing.db"), create=False)
    plain = tmp_path / "other.db"
    sqlite3.connect(plain).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(ValueError):
        EventStore.open(str(plain), create=False)
    with pytest.raises(ValueError):
        EventStore.open(":memory:", change_log_keep=0)
    with EventStore.open(tmp_path / "pathlike.db") as s:
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert "EventStore" in repr(s)


def test_verify_reports_odd_items(world):
    store, (alice, bob, carol), (e1, e2, e3) = world
    store.events_by_start.aggregate.insert(5.5, e2, namespace=alice)  # a float key
    store.events_by_start.aggregate.insert(1, 1, namespace="not-a-user")
    store.event_follows.aggregate.insert(0, e1, namespace=alice)  # key must be None
    store.events_by_creation.aggregate.upsert(to_ms(at(-1)), e1, 2.5, namespace=alice)  # value
    report = store.verify_aggregates()
    found = sorted((d.aggregate, d.kind, repr(d.namespace), d.actual_key) for d in report.differences)
    assert found == sorted([
        ("event_follows", "extra", repr(alice), 0),
        ("events_by_start", "extra", repr(alice), 5.5),
        ("events_by_start", "extra", "'not-a-user'", 1),
        ("events_by_creation", "wrong_value", repr(alice), to_ms(at(-1))),
    ])
    assert next(d for d in report.differences if d.kind == "wrong_value").actual_value == 2.5
    assert store.verify_aggregates(repair=True).repaired
    assert_consistent(store)


def log_rows(store: EventStore) -> int:
    return store._conn.execute("SELECT count(*) FROM aggtree_changes").fetchone()[0]


def test_a_store_alone_does_not_log(tmp_path):
    path = str(tmp_path / "alone.db")
    a = EventStore.open(path)
    u = a.create_user("u")
    e = a.create_event(u, name="x", start=at(1), created_at=at(-1))
    a.follow_event(u, e)
    assert log_rows(a) == 0
    b = EventStore.open(path)  # loads everything a wrote; a logs from now on
    a.update_event(u, e, start=at(-1))
    assert log_rows(a) == 1
    assert b.get_user_stats("u", now=T0) == a.get_user_stats("u", now=T0)
    assert b.reloads == 1 and b.changes_replayed == 1
    b.close()
    a.delete_event(u, e)  # a notices that b is gone
    a.create_event(u, name="y", start=at(2), created_at=at(-2))
    assert log_rows(a) == 1
    assert_consistent(a)
    c = EventStore.open(path)
    assert_consistent(c)
    a.close()
    c.close()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM aggtree_stores").fetchone()[0] == 0


def test_registrations_of_dead_processes_are_dropped(tmp_path):
    import socket
    import subprocess
    import sys

    path = str(tmp_path / "stale.db")
    EventStore.open(path).close()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO aggtree_stores (host, pid, opened_at) VALUES (?, ?, 0), ('elsewhere', 1, 0)",
        (socket.gethostname(), dead.pid),
    )
    conn.commit()
    conn.close()
    store = EventStore.open(path)
    hosts = [r[0] for r in store._conn.execute("SELECT host FROM aggtree_stores ORDER BY id")]
    assert hosts == ["elsewhere", socket.gethostname()]  # the dead one is gone
    u = store.create_user("u")
    store.create_event(u, name="x", start=at(1), created_at=at(-1))
    assert log_rows(store) == 1  # another host may have it open: log, to be safe
    store.close()


@pytest.mark.parametrize("write", sorted(WRITES))
def test_failure_while_shared_leaves_no_drift(tmp_path, write):
    """Shared file: the failed write's change-log row is rolled back with it,
    so the other store never replays it."""
    path = str(tmp_path / "shared.db")
    store = EventStore.open(path)
    watcher = EventStore.open(path)
    owner, fans, eid = popular_world(store)
    assert watcher.get_user_stats("fan0", now=T0).total_follows == 1
    top = log_rows(store)
    real = make_flaky(store, 1)
    with pytest.raises(Injected):
        WRITES[write](store, owner, fans, eid)
    restore(store, real)
    assert log_rows(store) == top
    for s in (store, watcher):
        assert_consistent(s, nows=(T0, at(-40)))
    WRITES[write](store, owner, fans, eid)
    for s in (store, watcher):
        assert_consistent(s, nows=(T0, at(-40)))
    store.close()
    watcher.close()
