"""Shared switches of the reliability tests (test_alloc_failure, test_leaks,
test_threads, test_fuzz, test_crash): how hard to run, and where to report.

* ``SANITIZED``: running against the ASan + UBSan build (``.ci/run`` sets
  ``AGGTREE_SANITIZED=1``); loops shrink.
* ``CI``: the longer CI profile (``CI`` or ``HYPOTHESIS_PROFILE=ci``).
* ``stats_reporter(name, stats)``: a module-scoped autouse fixture that, when
  ``AGGTREE_RELIABILITY_STATS`` names a file, appends ``stats`` (the figures
  quoted in docs/RELIABILITY.md) to it as one JSON line after the module ran.
"""

from __future__ import annotations

import json
import os

import pytest

SANITIZED = os.environ.get("AGGTREE_SANITIZED") == "1" or "asan" in os.environ.get("LD_PRELOAD", "")
CI = bool(os.environ.get("CI")) or os.environ.get("HYPOTHESIS_PROFILE") == "ci"


def stats_reporter(name: str, stats: dict):
    @pytest.fixture(scope="module", autouse=True)
    def _report_stats():
        yield
        path = os.environ.get("AGGTREE_RELIABILITY_STATS")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps({"file": name, **stats}) + "\n")

    return _report_stats
