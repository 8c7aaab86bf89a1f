"""Several real processes over one SQLite file stay correct.

Worker processes (``python -c WORKER``) each open an ``EventStore`` on the
same file and execute JSON commands read from stdin.  The test interleaves
writes and reads across the workers and itself, and checks that every
``get_user_stats`` (through the aggregates, caught up from the change log)
equals the naive path read straight from the tables, that no store reloads
per read, and that concurrent write bursts end with every store in sync.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from aggtree.events import EventStore, from_ms, to_ms

T0 = datetime(2024, 5, 1, 12, tzinfo=timezone.utc)
HOUR_MS = 3600 * 1000

WORKER = r"""
import json, random, sys
from aggtree.events import EventStore, from_ms

store = EventStore.open(sys.argv[1])
for line in sys.stdin:
    cmd = json.loads(line)
    op, args = cmd["op"], cmd.get("args", [])
    try:
        if op == "stats":
            out = store.get_user_stats(args[0], now=from_ms(args[1])).to_dict()
        elif op == "create_event":
            user, start, created = args
            out = store.create_event(user, name="w", start=from_ms(start), created_at=from_ms(created))
        elif op == "update_event":
            user, event, start = args
            out = store.update_event(user, event, start=from_ms(start))
        elif op in ("delete_event", "follow_event", "unfollow_event"):
            out = getattr(store, op)(*args)
        elif op == "burst":
            seed, n, base = args
            rng = random.Random(seed)
            conn = store._conn
            users = [r[0] for r in conn.execute("SELECT id FROM users")]
            done = 0
            for _ in range(n):
                row = conn.execute("SELECT id, user_id FROM events ORDER BY random() LIMIT 1").fetchone()
                x = rng.random()
                try:
                    if row is None or x < 0.3:
                        store.create_event(rng.choice(users), name="b",
                                           start=from_ms(base + rng.randrange(-50, 50) * 3600000),
                                           created_at=from_ms(base - rng.randrange(0, 300) * 3600000))
                    elif x < 0.55:
                        store.update_event(row[1], row[0], start=from_ms(base + rng.randrange(-50, 50) * 3600000))
                    elif x < 0.65:
                        store.delete_event(row[1], row[0])
                    elif x < 0.9:
                        store.follow_event(rng.choice(users), row[0])
                    else:
                        store.unfollow_event(rng.choice(users), row[0])
                    done += 1
                except LookupError:
                    pass  # the other worker deleted the event meanwhile
                except PermissionError:
                    pass  # ... and created one of another user's that got its id
                          # (SQLite reuses the highest rowid after a delete)
            out = done
        elif op == "verify":
            report = store.verify_aggregates()
            out = {"ok": report.ok, "total": report.total, "reloads": store.reloads,
                   "replayed": store.changes_replayed}
        elif op == "quit":
            break
        else:
            raise ValueError(op)
        reply = {"ok": True, "result": out}
    except Exception as exc:
        reply = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(reply), flush=True)
"""


class Worker:
    """One process with its own EventStore on the shared file."""

    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )

    def send(self, op: str, *args) -> None:
        self.proc.stdin.write(json.dumps({"op": op, "args": list(args)}) + "\n")
        self.proc.stdin.flush()

    def receive(self):
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker died: {self.proc.stderr.read()}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise AssertionError(f"worker error: {reply}")
        return reply["result"]

    def call(self, op: str, *args):
        self.send(op, *args)
        return self.receive()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def shared(tmp_path):
    path = str(tmp_path / "shared.db")
    store = EventStore.open(path)
    users = [store.create_user(f"user{i}") for i in range(6)]
    workers = [Worker(path), Worker(path)]
    yield store, users, workers
    for w in workers:
        w.close()
    store.close()


def naive(store: EventStore, user_index: int, now_ms: int) -> dict:
    return store.get_user_stats_naive(f"user{user_index}", now=from_ms(now_ms)).to_dict()


def test_interleaved_writes_and_reads_agree(shared):
    store, users, workers = shared
    rng = random.Random(11)
    base = to_ms(T0)
    events: dict = {}  # id -> owner
    for step in range(120):
        actor = rng.choice(workers + [None])
        x = rng.random()
        start = base + rng.randrange(-40, 40) * HOUR_MS
        if not events or x < 0.3:
            owner = rng.choice(users)
            created = base - rng.randrange(0, 300) * HOUR_MS
            if actor is None:
                eid = store.create_event(owner, name="p", start=from_ms(start), created_at=from_ms(created))
            else:
                eid = actor.call("create_event", owner, start, created)
            events[eid] = owner
        elif x < 0.55:
            eid = rng.choice(sorted(events))
            if actor is None:
                store.update_event(events[eid], eid, start=from_ms(start))
            else:
                actor.call("update_event", events[eid], eid, start)
        elif x < 0.65:
            eid = rng.choice(sorted(events))
            owner = events.pop(eid)
            if actor is None:
                store.delete_event(owner, eid)
            else:
                actor.call("delete_event", owner, eid)
        else:
            op = "follow_event" if x < 0.9 else "unfollow_event"
            args = (rng.choice(users), rng.choice(sorted(events)))
            if actor is None:
                getattr(store, op)(*args)
            else:
                actor.call(op, *args)
        # A read from every process after every write.
        i = rng.randrange(len(users))
        now_ms = base + rng.randrange(-200, 50) * HOUR_MS
        want = naive(store, i, now_ms)
        assert store.get_user_stats(f"user{i}", now=from_ms(now_ms)).to_dict() == want
        for w in workers:
            assert w.call("stats", f"user{i}", now_ms) == want, step
    assert store.verify_aggregates().ok
    for w in workers:
        report = w.call("verify")
        assert report["ok"], report
        assert report["reloads"] == 1  # the initial load only: catch-up, not reloads
        assert report["replayed"] > 0


def test_concurrent_bursts_end_in_sync(shared):
    store, users, workers = shared
    base = to_ms(T0)
    for w in workers:  # both stores are open and loaded before the bursts start
        assert w.call("stats", "user0", base)["all_time_own"] == 0
    for w, seed in zip(workers, (1, 2)):
        w.send("burst", seed, 150, base)  # both run at the same time
    done = [w.receive() for w in workers]
    assert all(n > 50 for n in done)
    assert store.verify_aggregates().ok
    for i in range(len(users)):
        for now_ms in (base, base - 24 * HOUR_MS):
            want = naive(store, i, now_ms)
            assert store.get_user_stats(f"user{i}", now=from_ms(now_ms)).to_dict() == want
            for w in workers:
                assert w.call("stats", f"user{i}", now_ms) == want
    for w in workers:
        assert w.call("verify")["ok"]
