"""Bytes per item held by aggtree (``Aggregate.nbytes``) for 1,000,000 items
with float keys, int ids and float values, built three ways:

* ``from_arrays`` (bottom-up bulk build, leaves 7/8 full);
* one ``insert`` at a time in random order (leaves overflow into siblings
  before they split);
* the random build after churn: 10 rounds of deleting and re-inserting 10% of
  the items.

Run: ``python bench/memory_per_item.py [n]``.
"""

from __future__ import annotations

import sys

import numpy as np

from aggtree import Aggregate


def main(n: int = 1_000_000) -> None:
    rng = np.random.default_rng(7)
    keys, ids, values = rng.random(n), rng.permutation(n), rng.random(n)
    bulk = Aggregate.from_arrays(keys, ids, values)
    print(f"from_arrays:             {bulk.nbytes / n:6.2f} bytes/item")
    one = Aggregate()
    for k, i, v in zip(keys.tolist(), ids.tolist(), values.tolist()):
        one.insert(k, i, v)
    print(f"random one-by-one:       {one.nbytes / n:6.2f} bytes/item")
    for _ in range(10):
        pick = rng.choice(n, n // 10, replace=False)
        one.delete_many(keys[pick], ids[pick])
        for k, i, v in zip(keys[pick].tolist(), ids[pick].tolist(), values[pick].tolist()):
            one.insert(k, i, v)
    one.check()
    print(f"after 10 rounds of churn: {one.nbytes / n:6.2f} bytes/item")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000)
