"""TableAggregate: an :class:`~aggtree.Aggregate` bound to a table's documents.

This is the Python form of Convex's ``TableAggregate``.  Instead of passing
``(key, id, value, namespace)`` to every write, you describe once how to
derive them from a document (a row as a dict, a dataclass, any object) and
then write documents::

    >>> from aggtree import TableAggregate
    >>> by_score = TableAggregate(
    ...     sort_key=lambda doc: doc["score"],
    ...     id=lambda doc: doc["_id"],
    ...     namespace=lambda doc: doc["game"],
    ... )
    >>> by_score.insert({"_id": 1, "game": "chess", "score": 120})
    >>> by_score.insert({"_id": 2, "game": "chess", "score": 90})
    >>> by_score.count(namespace="chess", lower=100)
    1
    >>> by_score.index_of_doc({"_id": 2, "game": "chess", "score": 90})
    0

Sync hooks: :meth:`TableAggregate.trigger` returns a function that applies
one table change (``operation`` insert / update / delete with ``old_doc`` and
``new_doc``) as insert / replace / delete; :meth:`idempotent_trigger` does the
same with the idempotent forms (upsert, replace_or_insert, delete_if_exists),
which is what live writes should use while a backfill is running (see
``docs`` and :func:`aggtree.events.EventStore.initialize_aggregates`).

Every extractor runs before the aggregate is touched, so a document whose
extractor raises leaves the aggregate unchanged; the aggregate itself
guarantees that a failed write changes nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

from . import Aggregate

__all__ = ["TableAggregate", "Change"]

_OPERATIONS = ("insert", "update", "delete")


class Change(NamedTuple):
    """One table change for a trigger: ``operation`` is ``"insert"``,
    ``"update"`` or ``"delete"``; ``old_doc`` is None for inserts and
    ``new_doc`` is None for deletes."""

    operation: str
    old_doc: Any = None
    new_doc: Any = None


def _change_fields(change: Any) -> tuple:
    """(operation, old_doc, new_doc) of a change given as a Change, a mapping
    or any object with those attributes."""
    if isinstance(change, Mapping):
        try:
            return change["operation"], change.get("old_doc"), change.get("new_doc")
        except KeyError:
            raise ValueError("a change needs an 'operation'") from None
    try:
        operation = change.operation
    except AttributeError:
        raise TypeError(
            "a change must be a Change, a mapping or an object with "
            f"operation / old_doc / new_doc, not {type(change).__name__}"
        ) from None
    return operation, getattr(change, "old_doc", None), getattr(change, "new_doc", None)


class TableAggregate:
    """An :class:`~aggtree.Aggregate` whose items are derived from documents.

    ``sort_key(doc)`` gives the item's key, ``id(doc)`` its id (unique per
    document and stable across updates), ``namespace(doc)`` its namespace
    (default: everything in the namespace ``None``) and ``sum_value(doc)`` its
    value (default ``0.0``).  ``node_size`` is passed to the Aggregate.

    Writes take documents; reads are exactly those of :class:`Aggregate`
    (``count``, ``sum``, ``at``, ``index_of``, ``min``, ``max``, ``random``,
    ``paginate``, ``iter``, the batch and vectorised forms...) and take
    ``namespace=`` and the bounds keywords.  The underlying aggregate is
    :attr:`aggregate`.

    Costs are those of the Aggregate (O(log n) per write or read) plus one
    call of each extractor per document.
    """

    __slots__ = ("_sort_key", "_id", "_namespace", "_sum_value", "aggregate")

    def __init__(
        self,
        *,
        sort_key: Callable[[Any], Any],
        id: Callable[[Any], Any],
        namespace: Optional[Callable[[Any], Any]] = None,
        sum_value: Optional[Callable[[Any], Any]] = None,
        node_size: int = 64,
        aggregate: Optional[Aggregate] = None,
    ) -> None:
        for name, fn in (("sort_key", sort_key), ("id", id)):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, not {type(fn).__name__}")
        for name, opt in (("namespace", namespace), ("sum_value", sum_value)):
            if opt is not None and not callable(opt):
                raise TypeError(f"{name} must be callable or None, not {type(opt).__name__}")
        self._sort_key = sort_key
        self._id = id
        self._namespace = namespace
        self._sum_value = sum_value
        #: The :class:`Aggregate` holding the items (use it for bulk loads).
        self.aggregate = aggregate if aggregate is not None else Aggregate(node_size=node_size)

    def __repr__(self) -> str:
        return f"TableAggregate({self.aggregate!r})"

    # ------------------------------------------------------------------
    # Extraction
    # ------------------------------------------------------------------

    def _item(self, doc: Any) -> tuple:
        """(namespace, key, id, value) of ``doc``; raises whatever an
        extractor raises, before anything is written."""
        if doc is None:
            raise TypeError("a document is required, not None")
        ns = self._namespace(doc) if self._namespace is not None else None
        value = self._sum_value(doc) if self._sum_value is not None else 0.0
        return ns, self._sort_key(doc), self._id(doc), value

    def key_of(self, doc: Any) -> tuple:
        """The ``(namespace, key, id, value)`` this aggregate derives from
        ``doc`` (handy for checking a table against the aggregate)."""
        return self._item(doc)

    # ------------------------------------------------------------------
    # Writes
    # ------------------------------------------------------------------

    def insert(self, doc: Any) -> None:
        """Add ``doc``'s item; :class:`~aggtree.DuplicateItemError` if its
        ``(key, id)`` is already present in its namespace."""
        ns, key, id_, value = self._item(doc)
        self.aggregate.insert(key, id_, value, namespace=ns)

    def delete(self, doc: Any) -> None:
        """Remove ``doc``'s item; :class:`~aggtree.MissingItemError` if absent."""
        ns, key, id_, _ = self._item(doc)
        self.aggregate.delete(key, id_, namespace=ns)

    def replace(self, old_doc: Any, new_doc: Any) -> None:
        """Move the item of ``old_doc`` to where ``new_doc`` puts it (key,
        namespace and value), atomically.  The id must not change
        (``ValueError``); :class:`~aggtree.MissingItemError` if the old item
        is absent."""
        ns, key, id_, _ = self._item(old_doc)
        new_ns, new_key, new_id, value = self._item(new_doc)
        if new_id != id_:
            raise ValueError(f"replace cannot change a document's id ({id_!r} -> {new_id!r})")
        self.aggregate.replace(key, id_, new_key, value, namespace=ns, new_namespace=new_ns)

    def upsert(self, doc: Any) -> bool:
        """Insert ``doc``'s item, or overwrite its value if present
        (Convex: ``insertIfDoesNotExist``).  True if it was inserted."""
        ns, key, id_, value = self._item(doc)
        return self.aggregate.upsert(key, id_, value, namespace=ns)

    def delete_if_exists(self, doc: Any) -> bool:
        """Remove ``doc``'s item if present; True if it was."""
        ns, key, id_, _ = self._item(doc)
        return self.aggregate.delete_if_exists(key, id_, namespace=ns)

    def replace_or_insert(self, old_doc: Any, new_doc: Any) -> bool:
        """Remove ``old_doc``'s item if present and upsert ``new_doc``'s,
        atomically; True if the old item existed.  The id must not change
        (``ValueError``)."""
        ns, key, id_, _ = self._item(old_doc)
        new_ns, new_key, new_id, value = self._item(new_doc)
        if new_id != id_:
            raise ValueError(f"replace cannot change a document's id ({id_!r} -> {new_id!r})")
        return self.aggregate.replace_or_insert(
            key, id_, new_key, value, namespace=ns, new_namespace=new_ns
        )

    # ------------------------------------------------------------------
    # Triggers
    # ------------------------------------------------------------------

    def trigger(self) -> Callable[[Any], None]:
        """A function applying one table change with the strict forms:
        insert -> :meth:`insert`, update -> :meth:`replace`, delete ->
        :meth:`delete`.  A change is a :class:`Change`, a mapping or an
        object with ``operation``, ``old_doc`` and ``new_doc``."""

        def apply(change: Any) -> None:
            operation, old_doc, new_doc = _change_fields(change)
            if operation == "insert":
                self.insert(new_doc)
            elif operation == "update":
                self.replace(old_doc, new_doc)
            elif operation == "delete":
                self.delete(old_doc)
            else:
                raise ValueError(f"operation must be one of {_OPERATIONS}, not {operation!r}")

        return apply

    def idempotent_trigger(self) -> Callable[[Any], None]:
        """Like :meth:`trigger` with the idempotent forms: insert ->
        :meth:`upsert`, update -> :meth:`replace_or_insert`, delete ->
        :meth:`delete_if_exists`.  Use it for live writes while a backfill
        is filling the aggregate: applying a change twice, or to a document
        the aggregate has not seen yet, ends in the right state."""

        def apply(change: Any) -> None:
            operation, old_doc, new_doc = _change_fields(change)
            if operation == "insert":
                self.upsert(new_doc)
            elif operation == "update":
                self.replace_or_insert(old_doc, new_doc)
            elif operation == "delete":
                self.delete_if_exists(old_doc)
            else:
                raise ValueError(f"operation must be one of {_OPERATIONS}, not {operation!r}")

        return apply

    # ------------------------------------------------------------------
    # Reads (all delegate to the Aggregate; see docs/API.md)
    # ------------------------------------------------------------------

    def index_of_doc(self, doc: Any, *, order: str = "asc", **bounds: Any) -> int:
        """The exact rank of ``doc``'s item within its namespace (and the
        bounds, if given): the number of items before it in ``(key, id)``
        order (after it, with ``order="desc"``).  The document need not be
        present: the answer is then where it would go."""
        ns, key, id_, _ = self._item(doc)
        return self.aggregate.index_of(key, id=id_, order=order, namespace=ns, **bounds)

    def count(self, **kw: Any) -> int:
        """Number of items in the range (``Aggregate.count``)."""
        return self.aggregate.count(**kw)

    def sum(self, **kw: Any) -> float:
        """Sum of the values in the range (``Aggregate.sum``)."""
        return self.aggregate.sum(**kw)

    def at(self, offset: int, **kw: Any):
        """The item at ``offset`` within the range (``Aggregate.at``)."""
        return self.aggregate.at(offset, **kw)

    def index_of(self, key: Any, **kw: Any) -> int:
        """Position of ``key`` (and ``id=``) in the range (``Aggregate.index_of``)."""
        return self.aggregate.index_of(key, **kw)

    def min(self, **kw: Any):
        """First item of the range or None (``Aggregate.min``)."""
        return self.aggregate.min(**kw)

    def max(self, **kw: Any):
        """Last item of the range or None (``Aggregate.max``)."""
        return self.aggregate.max(**kw)

    def random(self, **kw: Any):
        """A uniformly random item of the range or None (``Aggregate.random``)."""
        return self.aggregate.random(**kw)

    def paginate(self, **kw: Any):
        """One page of keyset pagination (``Aggregate.paginate``)."""
        return self.aggregate.paginate(**kw)

    def iter(self, **kw: Any):
        """Iterate the items of the range (``Aggregate.iter``)."""
        return self.aggregate.iter(**kw)

    def count_batch(self, queries):
        """Many counts in one call (``Aggregate.count_batch``)."""
        return self.aggregate.count_batch(queries)

    def sum_batch(self, queries):
        """Many sums in one call (``Aggregate.sum_batch``)."""
        return self.aggregate.sum_batch(queries)

    def at_batch(self, queries):
        """Many ``at`` lookups in one call (``Aggregate.at_batch``)."""
        return self.aggregate.at_batch(queries)

    def count_many(self, lowers, uppers, **kw: Any):
        """Vectorised counts (``Aggregate.count_many``)."""
        return self.aggregate.count_many(lowers, uppers, **kw)

    def sum_many(self, lowers, uppers, **kw: Any):
        """Vectorised sums (``Aggregate.sum_many``)."""
        return self.aggregate.sum_many(lowers, uppers, **kw)

    def at_many(self, offsets, **kw: Any):
        """Vectorised ``at`` (``Aggregate.at_many``)."""
        return self.aggregate.at_many(offsets, **kw)

    def index_of_many(self, keys, **kw: Any):
        """Vectorised ``index_of`` (``Aggregate.index_of_many``)."""
        return self.aggregate.index_of_many(keys, **kw)

    def to_arrays(self, **kw: Any):
        """The range as ``(keys, ids, values)`` arrays (``Aggregate.to_arrays``)."""
        return self.aggregate.to_arrays(**kw)

    def namespaces(self) -> list:
        """The non-empty namespaces."""
        return self.aggregate.namespaces()

    def clear(self, namespace: Any = None) -> None:
        """Remove every item of one namespace."""
        self.aggregate.clear(namespace)

    def clear_all(self) -> None:
        """Remove every item."""
        self.aggregate.clear_all()

    def check(self) -> None:
        """Check the aggregate's invariants (``AssertionError`` if broken)."""
        self.aggregate.check()

    @property
    def nbytes(self) -> int:
        """Bytes of memory held by the aggregate."""
        return self.aggregate.nbytes

    def __len__(self) -> int:
        return len(self.aggregate)
