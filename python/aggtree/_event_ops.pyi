"""Type stubs of aggtree._event_ops (src/aggtree/_event_ops.pyx): the event
store's compiled op loop and its start cache."""

from array import array
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy.typing as npt

from aggtree._core import Aggregate

class StartCache:
    EMPTY: ClassVar[int]
    a: array[int]
    def __init__(self) -> None: ...
    def get(self, event_id: int) -> int | None: ...
    def set(self, event_id: int, start: int | None) -> None: ...
    def load(self, ids: npt.ArrayLike, starts: npt.ArrayLike) -> None: ...

def apply_ops(
    aggs: list[Aggregate],
    ops: Iterable[Sequence[Any]],
    undo: list[Any] | None,
    key_is_none: tuple[bool, ...],
    starts: StartCache | None = None,
    start_agg: int = -1,
) -> None: ...
