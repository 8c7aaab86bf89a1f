"""A small typed use of aggtree, checked by mypy in CI (.ci/run) and runnable
as a script (``python examples/typed_usage.py``).

It shows what a type checker sees of the compiled Aggregate through its
stubs (python/aggtree/_core.pyi): every annotation below must agree with the
stub's return types, and the calls in ``_mistakes`` must be rejected (their
``type: ignore`` comments would be reported as unused, with
``warn_unused_ignores``, if the stubs stopped catching them).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from aggtree import Aggregate, Bound, DuplicateItemError, Item, Page


def leaderboard(scores: dict[str, float]) -> Aggregate:
    """Players ordered by score (the key), their id the name, value 1.0."""
    agg = Aggregate()
    for name, score in scores.items():
        agg.insert(score, name, 1.0, namespace="game-1")
    return agg


def rank_of(agg: Aggregate, score: float, name: str) -> int:
    """How many players score above (score, name)."""
    return agg.index_of(score, id=name, order="desc", namespace="game-1")


def main() -> None:
    agg = leaderboard({"ann": 31.0, "bob": 12.5, "cy": 27.0, "dee": 12.5})
    n: int = agg.count(namespace="game-1", lower=Bound(12.5, inclusive=False))
    total: float = agg.sum(namespace="game-1")
    top: Item | None = agg.max(namespace="game-1")
    first: Item = agg.at(0, namespace="game-1")
    page: Page = agg.paginate(page_size=2, namespace="game-1", order="desc")
    names: list[str] = [str(it.id) for it in agg.iter(namespace="game-1")]
    inserted: bool = agg.upsert(40.0, "eve", namespace="game-1")
    try:
        agg.insert(40.0, "eve", namespace="game-1")
    except DuplicateItemError as exc:
        print("refused:", exc)

    # Arrays in, arrays out.
    keys = np.array([1.0, 2.0, 3.0, 4.0])
    ids = np.arange(4)
    bulk = Aggregate.from_arrays(keys, ids, values=keys * 10)
    counts: npt.NDArray[np.int64] = bulk.count_many([1.0, 2.5], [2.0, 4.0])
    sums: npt.NDArray[np.float64] = bulk.sum_many([1.0], [4.0])
    k, i, v = bulk.to_arrays()
    values: npt.NDArray[np.float64] = v

    print(n, total, top, first, page.is_done, names, inserted)
    print(counts.tolist(), sums.tolist(), k.tolist(), i.tolist(), values.tolist())
    print("rank of cy:", rank_of(agg, 27.0, "cy"), "of", len(agg))


def _mistakes(agg: Aggregate, page: Page) -> None:
    """Never called: calls a type checker must reject."""
    agg.insert(1.0, 1, namespace=[1])  # type: ignore[arg-type]  # unhashable namespace
    label: str = agg.count()  # type: ignore[assignment]  # count is an int
    cursor: str = page.cursor  # type: ignore[assignment]  # may be None on the last page
    agg.count(lower_inclusive=True)  # type: ignore[call-arg]  # a count_many keyword
    print(label, cursor)


if __name__ == "__main__":
    main()
