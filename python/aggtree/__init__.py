"""aggtree: Convex-style aggregates for Python.

An :class:`Aggregate` keeps items ``(key, id, value)`` in ``(key, id)`` order,
partitioned into namespaces, and answers count, sum, rank (``index_of``),
select (``at``), min/max, random and keyset pagination over any key range in
O(log n).  The work is done by a C counted B+tree (``src/aggtree/aggtree.c``)
wrapped by Cython (``src/aggtree/_core.pyx``); this package adds the public
names, the pure-Python reference implementation (:mod:`aggtree.reference`)
and the event-stats application built on top (:mod:`aggtree.events`).

Setting the environment variable ``AGGTREE_PURE=1`` before the first import
makes ``aggtree.Aggregate`` the pure-Python reference implementation (slow,
obviously correct; useful for debugging and on machines without a compiler).
"""

from __future__ import annotations

import os as _os

from ._types import Bound, DuplicateItemError, Item, MissingItemError, Page, SnapshotError

if _os.environ.get("AGGTREE_PURE", "") not in ("", "0"):
    from .reference import Aggregate
else:
    from ._core import Aggregate

__all__ = [
    "Aggregate",
    "Bound",
    "Item",
    "Page",
    "DuplicateItemError",
    "MissingItemError",
    "SnapshotError",
    "TableAggregate",
]
__version__ = "0.1.0"


def __getattr__(name):
    # TableAggregate lives in its own module and is imported on first use so
    # that `import aggtree` stays cheap.
    if name == "TableAggregate":
        from .table import TableAggregate

        return TableAggregate
    raise AttributeError(f"module 'aggtree' has no attribute {name!r}")
