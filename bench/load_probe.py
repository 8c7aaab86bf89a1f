"""One snapshot load (or np.fromfile) in this process: wall ms, CPU ms, page faults.

Run it in a fresh process per measurement (a load's cost is mostly fresh
memory, which a second load in the same process may not need):

    python bench/load_probe.py SNAPSHOT RAWFILE load|loadmm|fromfile

``load`` is ``Aggregate.load(SNAPSHOT)``, ``loadmm`` the same with
``mmap=True``, ``fromfile`` ``np.fromfile(RAWFILE, uint8)`` (the floor of
issue 16: a file of the snapshot's size read into a fresh buffer).  CPU
time (user + system, kernel page zeroing included) is steadier than wall
time on a busy machine.  bench/README.md ("First batch into a bulk-built
tree; huge pages") has the runs.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

import aggtree


def _usage() -> tuple[float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def main() -> None:
    if len(sys.argv) != 4 or sys.argv[3] not in ("load", "loadmm", "fromfile"):
        sys.exit(__doc__)
    path, raw, what = sys.argv[1:]
    c0, f0 = _usage()
    t0 = time.perf_counter()
    if what == "loadmm":
        obj = aggtree.Aggregate.load(path, mmap=True)
    elif what == "load":
        obj = aggtree.Aggregate.load(path)
    else:
        obj = np.fromfile(raw, dtype=np.uint8)
    t = time.perf_counter() - t0
    c1, f1 = _usage()
    print(f"{what} wall {t * 1e3:.0f} cpu {(c1 - c0) * 1e3:.0f} ms faults {f1 - f0}")
    del obj


if __name__ == "__main__":
    main()
