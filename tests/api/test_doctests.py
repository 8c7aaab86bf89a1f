"""Runs the examples in the package's docstrings (``>>>`` lines) as tests.

The examples are part of the documentation users read first; this keeps
them true.  Each module named here must hold at least one example, so a
module whose examples were dropped by accident fails too.
"""

import doctest
import importlib

import pytest

MODULES = ["aggtree._types", "aggtree.reference", "aggtree.table", "aggtree.events"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring examples left"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
