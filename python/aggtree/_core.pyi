"""Type stubs of aggtree._core, the compiled Aggregate (src/aggtree/_core.pyx).

What mypy and pyright see of the native module: every public method of
Aggregate with its argument and return types (docs/API.md has their
meaning), the value types and errors it re-exports from aggtree._types, and
the test-only helpers.  Keys, ids and namespaces are typed ``Any`` /
``Hashable``: any supported key type (None, numbers, str, bytes, tuples) is
valid, and which ones a namespace holds is known only at run time.
"""

from collections.abc import Hashable, Iterable, Iterator
import os
from typing import Any, BinaryIO, Protocol, SupportsIndex, TypeVar

import numpy as np
import numpy.typing as npt

from aggtree._types import Bound as Bound
from aggtree._types import DuplicateItemError as DuplicateItemError
from aggtree._types import Item as Item
from aggtree._types import MissingItemError as MissingItemError
from aggtree._types import Page as Page

_A = TypeVar("_A", bound=Aggregate)

# A bound: a Bound, a bare key (inclusive), or None for "unbounded".
_BoundArg = Bound | Any
# Items' columns: arrays, lists or any iterable (tuple keys stay elements).
_Column = npt.ArrayLike | Iterable[Any]
_Arrays = tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[np.float64]]
_Query = dict[str, Any]

class _RandRange(Protocol):
    def randrange(self, n: int, /) -> int: ...

class Aggregate:
    def __init__(self, node_size: int = 64) -> None: ...
    @classmethod
    def from_arrays(
        cls: type[_A],
        keys: _Column,
        ids: _Column,
        values: _Column | None = None,
        namespaces: _Column | None = None,
        node_size: int = 64,
    ) -> _A: ...

    # -- writes --
    def insert(self, key: Any, id: Any, value: float = 0.0, *, namespace: Hashable = None) -> None: ...
    def upsert(self, key: Any, id: Any, value: float = 0.0, *, namespace: Hashable = None) -> bool: ...
    def delete(self, key: Any, id: Any, *, namespace: Hashable = None) -> None: ...
    def delete_if_exists(self, key: Any, id: Any, *, namespace: Hashable = None) -> bool: ...
    def replace(
        self,
        key: Any,
        id: Any,
        new_key: Any,
        value: float = 0.0,
        *,
        namespace: Hashable = None,
        new_namespace: Hashable = ...,
    ) -> None: ...
    def replace_or_insert(
        self,
        key: Any,
        id: Any,
        new_key: Any,
        value: float = 0.0,
        *,
        namespace: Hashable = None,
        new_namespace: Hashable = ...,
    ) -> bool: ...
    def clear(self, namespace: Hashable = None) -> None: ...
    def clear_all(self) -> None: ...
    def insert_many(
        self,
        keys: _Column,
        ids: _Column,
        values: _Column | None = None,
        *,
        namespace: Hashable = None,
    ) -> None: ...
    def delete_many(self, keys: _Column, ids: _Column, *, namespace: Hashable = None) -> None: ...

    # -- reads (every range keyword as in count) --
    def count(
        self,
        *,
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> int: ...
    def sum(
        self,
        *,
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> float: ...
    def at(
        self,
        offset: int,
        *,
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> Item: ...
    def index_of(
        self,
        key: Any,
        *,
        id: Any = None,
        order: str = "asc",
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> int: ...
    def min(
        self,
        *,
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> Item | None: ...
    def max(
        self,
        *,
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> Item | None: ...
    def random(
        self,
        *,
        rng: _RandRange | None = None,
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> Item | None: ...
    def paginate(
        self,
        *,
        cursor: str | None = None,
        order: str = "asc",
        page_size: int = 100,
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> Page: ...
    def iter(
        self,
        *,
        order: str = "asc",
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> Iterator[Item]: ...
    def __iter__(self) -> Iterator[Item]: ...

    # -- batches of queries (each a dict of the keywords above) --
    def count_batch(self, queries: Iterable[_Query]) -> list[int]: ...
    def sum_batch(self, queries: Iterable[_Query]) -> list[float]: ...
    def at_batch(self, queries: Iterable[_Query]) -> list[Item]: ...

    # -- vectorised --
    def count_many(
        self,
        lowers: _Column,
        uppers: _Column,
        *,
        namespace: Hashable = None,
        lower_inclusive: bool = True,
        upper_inclusive: bool = True,
    ) -> npt.NDArray[np.int64]: ...
    def sum_many(
        self,
        lowers: _Column,
        uppers: _Column,
        *,
        namespace: Hashable = None,
        lower_inclusive: bool = True,
        upper_inclusive: bool = True,
    ) -> npt.NDArray[np.float64]: ...
    def index_of_many(
        self,
        keys: _Column,
        *,
        namespace: Hashable = None,
        order: str = "asc",
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> npt.NDArray[np.int64]: ...
    def at_many(
        self,
        offsets: _Column,
        *,
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> _Arrays: ...
    def to_arrays(
        self,
        *,
        namespace: Hashable = None,
        lower: _BoundArg = None,
        upper: _BoundArg = None,
        eq: Any = ...,
        prefix: tuple[Any, ...] | list[Any] | None = None,
    ) -> _Arrays: ...

    # -- the whole object --
    def namespaces(self) -> list[Any]: ...
    def __len__(self) -> int: ...
    def __bool__(self) -> bool: ...
    @property
    def node_size(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def check(self) -> None: ...

    # -- snapshots (docs/SNAPSHOT.md) --
    def dumps(self) -> bytes: ...
    @classmethod
    def loads(cls: type[_A], data: bytes | bytearray | memoryview) -> _A: ...
    def save(self, file: str | os.PathLike[str] | BinaryIO, *, fsync: bool = True) -> None: ...
    @classmethod
    def load(cls: type[_A], file: str | os.PathLike[str] | BinaryIO, *, mmap: bool = False) -> _A: ...
    def __reduce_ex__(self, protocol: SupportsIndex, /) -> tuple[Any, ...]: ...
    def __reduce__(self) -> tuple[Any, ...]: ...
    def __copy__(self) -> Aggregate: ...

# -- test-only helpers (not public API) --
def _debug_fail_after(n: int) -> int: ...
def _debug_build_slack(slack: int) -> int: ...
def _tree_busy(agg: Aggregate, namespace: Hashable = None) -> bool: ...
def _tree_info(agg: Aggregate, namespace: Hashable = None) -> tuple[str, int, int, int] | None: ...
def _restore(node_size: int, state: list[tuple[Any, list[Item]]]) -> Aggregate: ...
def _encode_key(v: Any) -> bytes: ...
def _encode_item(key: Any, id: Any) -> bytes: ...
def _encode_prefix(p: tuple[Any, ...] | list[Any]) -> bytes: ...
def _decode_item(b: bytes) -> tuple[Any, Any]: ...
def _decode_key(b: bytes) -> Any: ...

# -- snapshot internals (called by aggtree.snapshot while it parses) --
def _snap_crc32(buf: Any) -> int: ...
def _snap_crc32_combine(crc1: int, crc2: int, len2: int) -> int: ...
def _snap_read_section(fd: int, off: int, count: int, kind: int,
                       node_size: int) -> tuple[Any, int] | None: ...
def _snap_read_fast(r: Any, kind: int, count: int, ns: Any, node_size: int) -> Any: ...
def _snap_read_general(r: Any, count: int, data_len: int, ns: Any, node_size: int) -> Any: ...
def _snap_restore(cls: type[_A], data: bytes) -> _A: ...
def _snap_walk_ints(buf: Any, nns: int, node_size: int) -> Any: ...
