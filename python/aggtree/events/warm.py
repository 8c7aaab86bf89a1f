"""Warm start: the event store's snapshot file and the decision, at open,
whether it may be used.  Backend-neutral: what a database must keep for it
(a store id, a state token, a "dirty" flag set by triggers) is asked of the
:class:`~aggtree.events.backend.Backend`; everything else is here.

The file
--------
One file next to the database (``<db>.aggtree-snapshot`` by default),
written atomically (:func:`aggtree.snapshot.write_atomic`: a temporary file,
fsync, rename, directory fsync)::

    b"AGGTWARM"                      magic, 8 bytes
    u32 format version (1), u32 header length H      (little-endian)
    header: H bytes of UTF-8 JSON, padded with spaces to a multiple of 8
    sections, each padded with zeros to a multiple of 8 bytes:
        the four aggregates (Aggregate.dumps, each with its own crc32),
        then the start-time cache (int64 little-endian, by event id)
    u32 crc32 of every byte before it, except the bodies of the four
        aggregate sections, whose own crc32 (their last 8 bytes) it covers:
        the whole file is checked, each byte once (an aggregate's body is
        checked by Aggregate.loads, before the store uses it)

The header holds ``store_id``, ``token``, ``position`` (the change-log id the
aggregates reflect), ``node_size`` and ``sections`` (the section lengths).

Which state a snapshot reflects
-------------------------------
The database keeps (backend.py, :meth:`Backend.warm_state`) a random
``store_id`` (set once, with the schema), a ``token`` and a ``dirty`` flag.
Taking a snapshot sets a fresh random token and clears ``dirty`` in one
write transaction, at a known change-log position, under the store's lock
(or keeps the token when nothing at all changed since it was set at that
same position); the snapshot records that token and position.  Triggers on ``events`` and
``event_follows`` set ``dirty`` on any write that could change an aggregate,
whoever makes it (raw SQL, another program, an older aggtree, a store opened
with ``snapshot=False``); a store that appends its write to the change log
clears it again in the same transaction when it was clear before the write
(it vouches that the log holds that write).  So at open:

* same store id, same token, ``dirty`` clear, log head = position: the
  database is in the snapshot's state ("snapshot");
* same, but the log holds rows position+1 .. head without a gap: the state
  is the snapshot's plus those rows ("snapshot+log");
* otherwise the tables ("tables"), with the reason logged: another
  database, an older snapshot or a restored backup (the token differs:
  every snapshot sets a new one), writes outside the log (``dirty``), a
  pruned log, an unreadable file.

A restored backup that then takes other writes: its token is that of the
snapshot taken before the backup (if any) and every write since is either
in its log (replayed: correct for that database) or marked ``dirty``.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import time
import zlib
from array import array
from typing import Any, Optional

from .. import SnapshotError
from .. import snapshot as _snapfile
from .state import StoreState

__all__ = ["WarmMixin", "write_file", "read_file", "SUFFIX"]

log = logging.getLogger("aggtree.events")

MAGIC = b"AGGTWARM"
VERSION = 1
SUFFIX = ".aggtree-snapshot"
_HEAD = struct.Struct("<8sII")
_CRC = struct.Struct("<I")


def _pad(n: int) -> int:
    return -n % 8


def _checked(part: Any, is_aggregate: bool) -> Any:
    """What of a part the wrapper's crc32 covers: all of it, or of an
    aggregate snapshot its own trailing checksum (8 bytes)."""
    return part[-8:] if is_aggregate else part


def write_file(path: str, header: dict, sections: list, *, fsync: bool = True) -> int:
    """Write a warm-start file (see the module docstring) atomically.
    Returns its size in bytes."""
    header = dict(header, sections=[len(s) for s in sections])
    text = json.dumps(header, sort_keys=True).encode()
    text += b" " * _pad(len(text))
    parts: list = [(_HEAD.pack(MAGIC, VERSION, len(text)), False), (text, False)]
    for index, sec in enumerate(sections):
        parts.append((sec, index < 4))
        if _pad(len(sec)):
            parts.append((b"\0" * _pad(len(sec)), False))
    crc = 0
    size = 0
    for p, is_aggregate in parts:
        crc = zlib.crc32(_checked(p, is_aggregate), crc)
        size += len(p)

    def write(f: Any) -> None:
        for p, _ in parts:
            f.write(p)
        f.write(_CRC.pack(crc))

    _snapfile.write_atomic(path, write, fsync=fsync)
    return size + _CRC.size


def read_file(path: str) -> tuple:
    """``(header, sections)`` of a warm-start file (sections as memoryviews
    into one 8-byte-aligned buffer).  ``FileNotFoundError`` if it is
    missing, ``SnapshotError`` if it is not a whole, intact file of this
    format."""
    buf = _snapfile.read_path(path)
    view = memoryview(buf).cast("B")  # type: ignore[arg-type]
    n = len(view)
    if n < _HEAD.size + _CRC.size:
        raise SnapshotError(f"{path}: truncated ({n} bytes)")
    magic, version, hlen = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise SnapshotError(f"{path}: not an aggtree warm-start snapshot (bad magic)")
    if version != VERSION:
        raise SnapshotError(f"{path}: format version {version}, this aggtree reads {VERSION}")
    (want,) = _CRC.unpack_from(view, n - _CRC.size)
    pos = _HEAD.size + hlen
    if pos > n - _CRC.size:
        raise SnapshotError(f"{path}: header length past the end")
    crc = zlib.crc32(view[:pos])
    try:
        header = json.loads(bytes(view[_HEAD.size:pos]))
        lengths = [int(x) for x in header["sections"]]
        for key in ("store_id", "token", "position", "node_size"):
            header[key]  # noqa: B018 (presence)
    except (ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{path}: bad header or checksum mismatch ({e})") from None
    sections = []
    for index, length in enumerate(lengths):
        end = pos + length
        # an aggregate section holds at least its crc; the start cache may be
        # empty (a database without events)
        if length < (8 if index < 4 else 0) or end + _pad(length) > n - _CRC.size:
            raise SnapshotError(f"{path}: section length past the end (truncated or corrupted)")
        sections.append(view[pos:end])
        crc = zlib.crc32(_checked(view[pos:end + _pad(length)] if index == 4 else view[pos:end],
                                  index < 4), crc)
        if index < 4 and _pad(length):
            crc = zlib.crc32(view[end:end + _pad(length)], crc)
        pos = end + _pad(length)
    if pos != n - _CRC.size or len(sections) != 5:
        raise SnapshotError(f"{path}: sections do not fill the file")
    if crc != want:
        raise SnapshotError(f"{path}: checksum mismatch (truncated or corrupted)")
    return header, sections


def _remove_dead_temporaries(path: str) -> None:
    """Remove the temporary files that writers of this snapshot killed
    mid-write left (``.<name>.<pid>.<hex>.tmp``, see
    :func:`aggtree.snapshot.write_atomic`) whose process is gone."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = "." + os.path.basename(path) + "."
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        parts = name[len(prefix):-4].split(".")
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to judge)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


def default_path(db_path: str) -> str:
    return db_path + SUFFIX


class WarmMixin(StoreState):
    """The warm-start half of :class:`~aggtree.events.EventStore`:
    :meth:`snapshot` and the warm load at open.  State: ``snapshot_path``
    (None: no snapshots), ``loaded_from``, ``_complete`` (the aggregates
    hold every row: False between ``open(load=False)`` and the end of
    :meth:`initialize_aggregates`), ``_vouch`` (this store's logged writes
    clear the dirty flag), ``_snapshot_token`` (the token of the last
    snapshot this store wrote or loaded)."""

    snapshot_path: Optional[str]
    loaded_from: Optional[str]
    _complete: bool
    _vouch: bool
    _snapshot_token: Any

    # -- writing ---------------------------------------------------------------

    def snapshot(self, *, fsync: bool = True) -> Optional[str]:
        """Write the snapshot of the aggregates and the start-time cache to
        :attr:`snapshot_path` (atomically), at the database's current
        state; returns the path, or None when there is nowhere to write it
        (an in-memory database, ``snapshot=False``).  ``RuntimeError`` while
        the aggregates are incomplete (``open(load=False)`` before
        :meth:`initialize_aggregates` finished)."""
        if self.snapshot_path is None:
            return None
        with self._lock:
            if not self._complete:
                raise RuntimeError("the aggregates are incomplete (load=False without "
                                   "initialize_aggregates): no snapshot taken")
            header = self._mark_snapshot()
            sections = [a.dumps() for a in self._aggs]
            sections.append(self._starts.a.tobytes())
            started = time.perf_counter()
            size = write_file(self.snapshot_path, header, sections, fsync=fsync)
            _remove_dead_temporaries(self.snapshot_path)
            log.debug("snapshot of %s: %d bytes in %.3f s", self.path, size,
                      time.perf_counter() - started)
            return self.snapshot_path

    def _mark_snapshot(self) -> dict:
        """In one write transaction, caught up with the change log: a fresh
        token, the dirty flag cleared; the header that records them."""
        from .sync import NeedReload

        backend = self._backend
        for _ in range(3):
            if self._stale:
                self._reload()
            version = backend.change_token()
            with backend.transaction(write=True) as conn:
                try:
                    self._catch_up(conn)
                except NeedReload:
                    conn = None
                if conn is not None:
                    position = self.change_id
                    store_id, token = backend.mark_snapshot(conn, position)
            if conn is None:
                self._reload()
                continue
            # Our own commit does not move our change token: the reads and the
            # writer stay caught up (only the token and the flag changed).
            self._data_version = version
            self._vouch = self._shared
            self._snapshot_token = token
            return {"store_id": store_id, "token": token, "position": position,
                    "node_size": self._node_size, "written_at": time.time(), "pid": os.getpid()}
        raise RuntimeError("could not catch up with the change log")  # pragma: no cover

    # -- loading ---------------------------------------------------------------

    def _load_warm(self) -> None:
        """At open (attached, aggregates empty): load the snapshot if it
        reflects the database's state, replaying the change log after it if
        that covers the gap; otherwise reload from the tables.  Logs one
        line saying which and why."""
        path = self.snapshot_path
        reason = self._try_warm(path) if path is not None else "snapshots are off"
        if reason is None:
            return
        level = logging.INFO if reason.startswith(("no snapshot", "snapshots are off")) else logging.WARNING
        if path is not None:
            log.log(level, "%s: loading from the tables: %s", self.path, reason)
        self._reload()
        self.loaded_from = "tables"

    def _try_warm(self, path: str) -> Optional[str]:
        """Load warm; None on success, else why not (nothing changed)."""
        try:
            header, sections = read_file(path)
        except FileNotFoundError:
            return f"no snapshot at {path}"
        except (OSError, SnapshotError) as e:
            return f"unusable snapshot: {e}"
        if header["node_size"] != self._node_size:
            return f"the snapshot's node size is {header['node_size']}, not {self._node_size}"
        backend = self._backend
        position = header["position"]
        version = backend.change_token()  # before the read: never misses a commit
        with backend.transaction() as conn:
            if backend.check_warm is not None:  # per-instance snapshots (PostgreSQL)
                token = header["token"]
                why = backend.check_warm(conn, header)
                if why is not None:
                    return why
            else:
                state = backend.warm_state(conn)
                if state is None:
                    return "this backend keeps no warm-start state"
                store_id, token, dirty = state
                if store_id != header["store_id"]:
                    return "the snapshot is of another database"
                if token != header["token"]:
                    return ("the database is not in the snapshot's state (an older snapshot, "
                            "or a restored backup)")
                if dirty:
                    return "the database was written outside the change log since the snapshot"
            head = conn.execute(self._sql.log_head).fetchone()[0]
            rows: list = []
            if head < position:
                return "the change log is behind the snapshot"
            if head > position:
                rows = conn.execute(self._sql.log_after, (position,)).fetchall()
                if not rows or rows[0][0] != position + 1 or len(rows) != head - position:
                    return "the change log no longer covers the writes since the snapshot"
        try:
            aggs = [self._cls.loads(s) for s in sections[:4]]
            starts = array("q")
            starts.frombytes(sections[4])
        except (SnapshotError, ValueError, TypeError) as e:
            return f"unusable snapshot: {e}"
        self._set_aggregates(aggs)
        self._starts.a = starts
        self.change_id = position
        self._replay(rows)
        self._data_version = version
        self._write_version = None
        self._stale = False
        self._complete = True
        self._snapshot_token = token if not rows else None
        self.loaded_from = "snapshot+log" if rows else "snapshot"
        log.debug("%s: loaded from %s (%s; %d change-log rows replayed)", self.path, path,
                  self.loaded_from, len(rows))
        return None

    def _close_snapshot(self) -> None:
        """At close: write the snapshot unless there is nothing new to save
        (the state is that of the last snapshot) or it cannot be taken;
        a failure is logged, never raised (the close goes on)."""
        if self.snapshot_path is None or not self._complete:
            return
        try:
            if self._snapshot_token is not None and os.path.exists(self.snapshot_path):
                with self._backend.transaction() as conn:
                    state = self._backend.warm_state(conn)
                if state is not None and state[1] == self._snapshot_token and not state[2]:
                    head_ok = True
                    with self._backend.transaction() as conn:
                        head_ok = conn.execute(self._sql.log_head).fetchone()[0] == self.change_id
                    if head_ok:
                        return  # unchanged since the snapshot loaded or written
            self.snapshot()
        except Exception as e:  # noqa: BLE001 - the close must go on
            log.warning("%s: no snapshot written at close: %s", self.path, e)
