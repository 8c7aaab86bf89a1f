"""Benchmarks of the event-stats application (aggtree.events) against the
baselines the issue names, each pair in the same run:

``stats``
    ``get_user_stats`` (five aggregate counts) against
    ``get_user_stats_naive`` (the original O(n) path with its N+1 queries)
    for one user with 100,000 own events and 50,000 follows, on the same
    database.  Target: >= 1000x, and a p50 under 50 us.
``open``
    ``EventStore.open`` (reads the tables, builds the four aggregates with
    ``from_arrays``) on 1,000,000 events and 500,000 follows against a plain
    ``SELECT`` of the same columns into Python lists.  Target: <= 2x.
    ``EventStore.open warm`` opens the same database with a current
    snapshot (``store.snapshot()``, aggtree.events.warm): the four
    aggregates and the start cache loaded from the file.  Target: at least
    10x faster than the cold open (printed as ``warm vs cold``).
``write-*``
    each write (create, update that moves the start, delete, follow,
    unfollow) through the store against the same SQLite writes alone
    (``PlainWriter``: same connection settings, inputs, validation queries and
    transactions, no change log and no aggregates), each on its own copy of
    the same database (100,000 events, 50,000 follows; updated and deleted
    events have 1.5 and 2 followers on average).  A round is a batch of
    ``WRITE_BATCH`` writes on different rows, undone untimed afterwards.
    ``aggtree`` is a store alone on its file (no change log);
    ``aggtree-shared`` has a second store open on the same file, so every
    write also appends to the change log (the multi-process cost).
    Target: the store costs at most 1.2x the plain writes.

Datasets are generated with :func:`aggtree.events.generate_dataset` (numpy +
bulk ``executemany``).  ``pytest bench --benchmark-disable`` (the smoke run)
scales every size down by ``SMOKE_DIVISOR`` and runs each benchmark once,
still checking results; ``AGGTREE_BENCH_FULL=1`` forces the full sizes.
With benchmarks enabled, each implementation's ratio to its group's baseline
is printed at the end of the module (run with ``-s`` to see them).

``open`` and ``write-*`` are timed in process CPU time
(``time.process_time``): both sides run the same single-threaded SQLite
work without fsync (WAL, ``synchronous=NORMAL``), and CPU time keeps the
ratios stable on a shared, loaded machine.  ``stats`` uses the wall clock.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from datetime import datetime, timedelta, timezone

import pytest

import aggtree
import aggtree.reference
from aggtree.events import EventStore, _connect, generate_dataset, to_ms

NATIVE = aggtree.Aggregate is not aggtree.reference.Aggregate
NOW = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
SMOKE_DIVISOR = 100
WRITE_BATCH = 200
WRITE_ROUNDS = 30

_RESULTS: dict = {}  # group -> {impl: median seconds}
BASELINES = ("naive", "select", "plain")


def _smoke(config) -> bool:
    disabled = bool(config.getoption("benchmark_disable", default=False))
    return disabled and os.environ.get("AGGTREE_BENCH_FULL", "") in ("", "0")


@pytest.fixture(scope="module")
def sizes(request):
    """Dataset sizes of this run (scaled down in the smoke run)."""
    div = SMOKE_DIVISOR if _smoke(request.config) else 1
    return {
        "div": div,
        "stats_events": 100_000 // div,
        "stats_follows": 50_000 // div,
        "open_events": 1_000_000 // div,
        "open_follows": 500_000 // div,
        "write_events": 100_000 // div,
        "write_follows": 50_000 // div,
        "write_rounds": 1 if div > 1 else WRITE_ROUNDS,
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-events")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _label(benchmark, group: str, impl: str, n: int, ops: int = 1, **info) -> None:
    """Group and extra_info in the shape bench/conftest.py uses (op, impl, n, ops)."""
    benchmark.group = group
    benchmark.extra_info.update(op=group, impl=impl, n=n, ops=ops, native=NATIVE, **info)


def _record(benchmark, group: str, impl: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        _RESULTS.setdefault(group, {})[impl] = stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def report_ratios():
    """Print each pair's ratio at the end of the module."""
    yield
    if not _RESULTS:
        return
    lines = ["", f"aggtree.events benchmarks ({'native' if NATIVE else 'pure-Python reference'}), medians:"]
    for group, res in sorted(_RESULTS.items()):
        base = next((k for k in BASELINES if k in res), None)
        if base is None:
            continue
        for impl, t in sorted(res.items()):
            if impl != base:
                lines.append(
                    f"  {group:<32} {impl:<16} {t * 1e6:>12.1f} us  vs {base:<7} "
                    f"{res[base] * 1e6:>12.1f} us  ratio {t / res[base]:.3g}"
                )
    for group, res in sorted(_RESULTS.items()):
        cold, warm = res.get("EventStore.open"), res.get("EventStore.open warm")
        if cold and warm:
            lines.append(f"  {group:<32} warm vs cold: {warm * 1e3:.1f} ms against {cold * 1e3:.1f} ms, "
                         f"{cold / warm:.1f}x faster (target >= 10x)")
    print("\n".join(lines))


# ---------------------------------------------------------------------------
# get_user_stats vs the naive path
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stats_db(workdir, sizes):
    path = str(workdir / "stats.db")
    n_own, n_follows = sizes["stats_events"], sizes["stats_follows"]
    generate_dataset(
        path,
        users=1000,
        events=2 * n_own,
        follows=n_follows + n_follows // 2,
        heavy_events=[n_own],
        heavy_follows=[n_follows],
        seed=5,
        now=NOW,
    )
    store = EventStore.open(path)
    yield store
    store.close()


@pytest.mark.parametrize("impl", ["aggregates", "naive"])
def test_stats(benchmark, stats_db, sizes, impl):
    store = stats_db
    group = "stats 100k own + 50k follows"
    s = store.get_user_stats("heavy-1", now=NOW)
    assert s == store.get_user_stats_naive("heavy-1", now=NOW)
    assert (s.all_time_own, s.total_follows) == (sizes["stats_events"], sizes["stats_follows"])
    _label(benchmark, group, impl, s.all_time_own, follows=s.total_follows)
    if impl == "aggregates":
        result = benchmark(store.get_user_stats, "heavy-1", NOW)
    else:
        result = benchmark.pedantic(store.get_user_stats_naive, args=("heavy-1", NOW), rounds=5, warmup_rounds=1)
    assert result == s
    _record(benchmark, group, impl)


# ---------------------------------------------------------------------------
# EventStore.open vs a plain SELECT of the same columns
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def open_db(workdir, sizes):
    path = str(workdir / "open.db")
    generate_dataset(
        path, users=10_000, events=sizes["open_events"], follows=sizes["open_follows"], seed=6, now=NOW
    )
    EventStore.open(path, load=False).close()  # schema + WAL settled before timing
    return path


def plain_select(path: str) -> tuple:
    """What reading the same columns into Python costs without aggtree."""
    conn = sqlite3.connect(path)
    try:
        events = conn.execute("SELECT id, user_id, created_at, start_time FROM events").fetchall()
        follows = conn.execute("SELECT user_id, event_id FROM event_follows").fetchall()
    finally:
        conn.close()
    return events, follows


@pytest.mark.benchmark(timer=time.process_time)
@pytest.mark.parametrize("impl", ["EventStore.open", "EventStore.open warm", "select"])
def test_open(benchmark, open_db, sizes, impl):
    group = "open 1M events + 500k follows"
    _label(benchmark, group, impl, sizes["open_events"], follows=sizes["open_follows"])
    if impl == "select":
        events, follows = benchmark.pedantic(plain_select, args=(open_db,), rounds=3, warmup_rounds=1)
        assert (len(events), len(follows)) == (sizes["open_events"], sizes["open_follows"])
    else:
        warm = impl.endswith("warm")
        if warm:  # a current snapshot to start from
            store = EventStore.open(open_db, snapshot=False)
            store.snapshot_path = open_db + ".aggtree-snapshot"
            store.snapshot()
            store.close(snapshot=False)
        stores = []

        def run():
            store = EventStore.open(open_db, snapshot=warm)
            stores.append(store)
            return store

        def close_previous():
            while stores:
                stores.pop().close(snapshot=False)
            return (), {}

        store = benchmark.pedantic(run, setup=close_previous, rounds=3, warmup_rounds=1)
        assert store.loaded_from == ("snapshot" if warm else "tables")
        assert len(store.events_by_start) == sizes["open_events"]
        assert len(store.followed_events_by_start) == sizes["open_follows"]
        close_previous()
    _record(benchmark, group, impl)


# ---------------------------------------------------------------------------
# Writes: the store vs the same SQLite writes alone
# ---------------------------------------------------------------------------


class PlainWriter:
    """The store's writes without aggregates and without change log: the
    same connection settings, inputs (aware datetimes), validation queries,
    statements and one ``BEGIN IMMEDIATE`` transaction per write."""

    def __init__(self, path: str) -> None:
        self.conn = _connect(path, 30.0, "NORMAL")

    def _tx(self, fn):
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    def create_event(self, user_id, *, name, start, created_at):
        start_ms, created_ms = to_ms(start), to_ms(created_at)
        return self._tx(lambda c: c.execute(
            "INSERT INTO events (user_id, name, start_time, end_time, created_at, description,"
            " location) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (user_id, name, start_ms, None, created_ms, None, None),
        ).lastrowid)

    def update_event(self, user_id, event_id, *, start, end):
        start_ms, end_ms = to_ms(start), to_ms(end)

        def body(c):
            row = c.execute(
                "SELECT user_id, name, start_time, end_time, description, location FROM events"
                " WHERE id = ?", (event_id,),
            ).fetchone()
            if row is None:
                raise LookupError(event_id)
            if row[0] != user_id:
                raise PermissionError(event_id)
            c.execute(
                "UPDATE events SET name = ?, start_time = ?, end_time = ?, description = ?,"
                " location = ? WHERE id = ?",
                (row[1], start_ms, end_ms, row[4], row[5], event_id),
            )

        self._tx(body)

    def delete_event(self, user_id, event_id):
        def body(c):
            row = c.execute("SELECT user_id FROM events WHERE id = ?", (event_id,)).fetchone()
            if row is None:
                raise LookupError(event_id)
            if row[0] != user_id:
                raise PermissionError(event_id)
            c.execute("DELETE FROM events WHERE id = ?", (event_id,))  # follows: ON DELETE CASCADE

        self._tx(body)

    def follow_event(self, user_id, event_id):
        created = to_ms(datetime.now(timezone.utc))
        return self._tx(lambda c: c.execute(
            "INSERT OR IGNORE INTO event_follows (user_id, event_id, created_at) VALUES (?, ?, ?)",
            (user_id, event_id, created),
        ).rowcount == 1)

    def unfollow_event(self, user_id, event_id):
        return self._tx(lambda c: c.execute(
            "DELETE FROM event_follows WHERE user_id = ? AND event_id = ?", (user_id, event_id)
        ).rowcount == 1)

    def close(self):
        self.conn.close()


def make_write_dbs(workdir, events: int, follows: int) -> dict:
    """The write benchmarks' world: copies of one generated database for a
    store alone (``aggtree``), a store with a second one watching
    (``aggtree-shared``) and the plain writer; the target events (each with
    1-3 followers) and a user who follows none of them (``fan``).  Close
    with :func:`close_write_dbs`."""
    base = str(workdir / "writes.db")
    generate_dataset(base, users=1000, events=events, follows=follows, seed=7, now=NOW)
    EventStore.open(base, load=False).close()  # same schema (change log included) in all
    paths = {}
    for impl in ("aggtree", "aggtree-shared", "plain"):
        paths[impl] = str(workdir / f"writes-{impl}.db")
        shutil.copyfile(base, paths[impl])
    store = EventStore.open(paths["aggtree"])
    shared = EventStore.open(paths["aggtree-shared"])
    watcher = EventStore.open(paths["aggtree-shared"])  # makes `shared` log its writes
    plain = PlainWriter(paths["plain"])
    conn = store._conn
    # Targets: BATCH events (each with 1-3 followers), users who follow none of them.
    rows = conn.execute(
        "SELECT e.id, e.user_id FROM events e WHERE EXISTS"
        " (SELECT 1 FROM event_follows f WHERE f.event_id = e.id) ORDER BY e.id LIMIT ?",
        (WRITE_BATCH,),
    ).fetchall()
    fans = [r[0] for r in conn.execute(
        "SELECT id FROM users u WHERE NOT EXISTS (SELECT 1 FROM event_follows f WHERE f.user_id = u.id)"
        " ORDER BY id DESC LIMIT 1"
    )] or [1000]
    return {"aggtree": store, "aggtree-shared": shared, "plain": plain, "events": rows, "fan": fans[0],
            "watcher": watcher}


def close_write_dbs(dbs: dict) -> None:
    for key in ("aggtree", "aggtree-shared", "watcher", "plain"):
        dbs[key].close()


@pytest.fixture(scope="module")
def write_dbs(workdir, sizes):
    """Two identical databases: one for the store, one for the plain writes."""
    dbs = make_write_dbs(workdir, sizes["write_events"], sizes["write_follows"])
    yield dbs
    close_write_dbs(dbs)


def _fresh_events(writer, n, owner=1):
    return [
        writer.create_event(owner, name="bench", start=NOW + timedelta(hours=i), created_at=NOW)
        for i in range(n)
    ]


WRITES = ("create", "update", "delete", "follow", "unfollow")


def write_steps(write: str, w, dbs: dict) -> tuple:
    """(setup, target, teardown) of one round of a write benchmark on writer
    ``w``: ``target`` runs WRITE_BATCH writes of kind ``write`` on different
    rows, ``setup`` prepares them and ``teardown`` undoes them (both
    untimed; ``setup`` returns pytest-benchmark's ``(args, kwargs)``)."""
    targets = dbs["events"]
    fan = dbs["fan"]
    state = {"flip": 0}

    if write == "create":
        created: list = []

        def setup():
            return (), {}

        def target():
            created.extend(_fresh_events(w, WRITE_BATCH))

        def teardown():
            for eid in created:
                w.delete_event(1, eid)
            created.clear()

    elif write == "update":

        def setup():
            state["flip"] ^= 1
            return (), {}

        def target():
            hours = 1000 if state["flip"] else -1000  # every start really moves
            for eid, owner in targets:
                start = NOW + timedelta(hours=hours + eid % 7)
                w.update_event(owner, eid, start=start, end=start + timedelta(hours=2))

        def teardown():
            pass

    elif write == "delete":
        doomed: list = []

        def setup():
            doomed[:] = _fresh_events(w, WRITE_BATCH)
            for eid in doomed:  # each with two followers, like a typical event
                w.follow_event(fan, eid)
                w.follow_event(fan - 1, eid)
            return (), {}

        def target():
            for eid in doomed:
                w.delete_event(1, eid)

        def teardown():
            pass

    elif write == "follow":

        def setup():
            return (), {}

        def target():
            for eid, _owner in targets:
                w.follow_event(fan, eid)

        def teardown():
            for eid, _owner in targets:
                w.unfollow_event(fan, eid)

    else:  # unfollow

        def setup():
            for eid, _owner in targets:
                w.follow_event(fan, eid)
            return (), {}

        def target():
            for eid, _owner in targets:
                w.unfollow_event(fan, eid)

        def teardown():
            pass

    return setup, target, teardown


@pytest.mark.benchmark(timer=time.process_time)
@pytest.mark.parametrize("impl", ["aggtree", "aggtree-shared", "plain"])
@pytest.mark.parametrize("write", WRITES)
def test_write(benchmark, write_dbs, sizes, write, impl):
    w = write_dbs[impl]
    group = f"write-{write} x{WRITE_BATCH}"
    _label(benchmark, group, impl, sizes["write_events"], ops=WRITE_BATCH)
    setup, target, teardown = write_steps(write, w, write_dbs)

    def timed():
        target()

    def setup_round():
        teardown()
        return setup()

    try:
        benchmark.pedantic(timed, setup=setup_round, rounds=sizes["write_rounds"], warmup_rounds=1)
    finally:
        teardown()
    _record(benchmark, group, impl)
    if impl != "plain":
        assert w.verify_aggregates().ok
    if impl == "aggtree-shared":
        assert write_dbs["watcher"].verify_aggregates().ok  # caught up from the log
