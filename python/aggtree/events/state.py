"""What the mixins of :class:`~aggtree.events.EventStore` share: the
attributes ``EventStore.__init__`` sets and the methods one mixin calls on
another, declared once (for a reader looking for where ``self._sql`` comes
from, and for type checkers).  Nothing here runs.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional, Sequence

from .backend import Backend
from .schema import Dialect

__all__ = ["StoreState"]


class StoreState:
    """The store's state, as its mixins see it (see ``EventStore.__init__``)."""

    _backend: Backend               # the database (backend.py)
    _sql: Dialect                   # its statements
    _private: bool                  # no other connection can see the database
    _lock: threading.RLock          # held around every read and write
    _cls: Any                       # the Aggregate class
    _node_size: int
    _keep: int                      # change-log rows writers keep
    _prune_every: int
    _clock: Callable[[], datetime]
    _tables: list                   # the four TableAggregates
    _aggs: list                     # ... and their Aggregates (indexed like the ops)
    _apply_ops: Any                 # the op loop for those (oplog.pick_apply_ops)
    _starts: Any                    # oplog.StartCache
    _user_ids: dict                 # username -> id, cached
    _data_version: Any              # change token the reads caught up to (sync.py)
    _write_version: Any             # ... the writer caught up to; None: check
    _shared: bool                   # writes append to the change log
    _stale: bool                    # rebuild from the tables on the next access
    _migration: Optional[dict]      # initialize_aggregates' progress (migrate.py)
    path: str                       # what the store was opened on (messages)
    change_id: int                  # the last change-log row the aggregates reflect
    reloads: int
    changes_replayed: int

    if TYPE_CHECKING:
        def _set_aggregates(self, aggs: list) -> None: ...
        def _apply(self, ops: Sequence, undo: Optional[list]) -> None: ...
        def _reload(self) -> None: ...
        def _catch_up(self, conn: Any) -> None: ...
        def _sync(self) -> None: ...
        def _caught_up(self) -> ContextManager[Any]: ...
        def _lookup_user(self, username: str) -> Optional[int]: ...
