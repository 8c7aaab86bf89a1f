"""Small value types and exceptions shared by every aggtree implementation.

Both the native ``aggtree.Aggregate`` (Cython, ``_core.pyx``) and the pure
Python ``aggtree.reference.Aggregate`` return and accept these, so results of
the two compare equal and tests can run one suite against both.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

__all__ = [
    "Bound",
    "Item",
    "Page",
    "DuplicateItemError",
    "MissingItemError",
    "SnapshotError",
]


class Item(NamedTuple):
    """One item of an aggregate: ordered by ``(key, id)``; ``value`` is summed."""

    key: Any
    id: Any
    value: float = 0.0


class Bound:
    """One end of a key range.

    ``Bound(key)`` is inclusive.  With ``id`` the bound sits exactly before
    (inclusive lower / exclusive upper) or exactly after (exclusive lower /
    inclusive upper) the item ``(key, id)``; without it an inclusive lower
    bound sits before every item of ``key`` and an exclusive one after all of
    them (mirrored for upper bounds).  ``id=None`` means "no id", so a bound
    cannot name an item whose id is ``None``.

    Bound is deliberately not a tuple, so that it can never be mistaken for a
    tuple key.

    >>> Bound(10, inclusive=False)
    Bound(10, inclusive=False)
    """

    __slots__ = ("key", "inclusive", "id")

    def __init__(self, key: Any, inclusive: bool = True, id: Any = None) -> None:
        if not isinstance(inclusive, bool):
            raise TypeError(
                f"Bound.inclusive must be a bool, not {type(inclusive).__name__}"
            )
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "inclusive", inclusive)
        object.__setattr__(self, "id", id)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Bound is immutable")

    def __repr__(self) -> str:
        parts = [repr(self.key)]
        if not self.inclusive:
            parts.append("inclusive=False")
        if self.id is not None:
            parts.append(f"id={self.id!r}")
        return f"Bound({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bound):
            return NotImplemented
        return (self.key, self.inclusive, self.id) == (other.key, other.inclusive, other.id)

    def __hash__(self) -> int:
        return hash((Bound, self.key, self.inclusive, self.id))

    def __reduce__(self):
        return (Bound, (self.key, self.inclusive, self.id))


class Page(NamedTuple):
    """One page of :meth:`Aggregate.paginate`.

    ``cursor`` is an opaque string naming the last item returned; pass it back
    to continue.  ``is_done`` is true exactly when nothing in the range comes
    after this page.
    """

    items: list
    cursor: Optional[str]
    is_done: bool


class DuplicateItemError(KeyError):
    """An item with this ``(key, id)`` already exists in the namespace."""


class MissingItemError(KeyError):
    """No item with this ``(key, id)`` exists in the namespace."""


class SnapshotError(ValueError):
    """A snapshot (``Aggregate.load`` / ``loads``) is damaged, truncated, of
    an unknown format version, or not a snapshot at all; docs/SNAPSHOT.md."""
