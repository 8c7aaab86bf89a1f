"""The type stubs of the compiled modules (python/aggtree/_core.pyi,
_event_ops.pyi) against the modules themselves: every public name is in its
stub, and every stubbed function takes the same parameters (names, kinds,
which have defaults) as the compiled one.  What mypy checks users' code
against must not drift from what runs."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

core = pytest.importorskip("aggtree._core")
event_ops = pytest.importorskip("aggtree._event_ops")

PKG = Path(__file__).resolve().parents[2] / "python" / "aggtree"
DUNDERS = ("__init__", "__iter__", "__len__", "__bool__", "__copy__", "__reduce__")
KINDS = {
    "posonly": inspect.Parameter.POSITIONAL_ONLY,
    "args": inspect.Parameter.POSITIONAL_OR_KEYWORD,
    "kwonly": inspect.Parameter.KEYWORD_ONLY,
}


def stub_defs(stub: str) -> dict:
    """{"name": FunctionDef or "property"} for module-level functions and
    {"Class.name": ...} for methods, from the stub file's syntax tree."""
    tree = ast.parse((PKG / stub).read_text())
    out: dict = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out[node.name] = node
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    props = any(getattr(d, "id", None) == "property" for d in item.decorator_list)
                    out[f"{node.name}.{item.name}"] = "property" if props else item
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    out[f"{node.name}.{item.target.id}"] = "attribute"
    return out


def stub_params(fn: ast.FunctionDef) -> list:
    a = fn.args
    params = [(p.arg, "posonly") for p in a.posonlyargs] + [(p.arg, "args") for p in a.args]
    defaults = [False] * (len(params) - len(a.defaults)) + [True] * len(a.defaults)
    rows = [(n, KINDS[k], d) for (n, k), d in zip(params, defaults)]
    rows += [(p.arg, KINDS["kwonly"], d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if rows and rows[0][0] in ("self", "cls"):
        rows = rows[1:]
    return rows


def runtime_params(obj) -> list:
    sig = inspect.signature(obj)
    rows = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if p.kind is inspect.Parameter.POSITIONAL_ONLY else p.kind
        rows.append((p.name, kind, p.default is not inspect.Parameter.empty))
    return rows


def public_names(cls) -> list:
    return [n for n in dir(cls) if not n.startswith("_")]


def check_against_stub(stub: str, cls_name: str, cls, dunders=()) -> None:
    """Every public name of cls (and the special methods `dunders`, C slots
    whose parameters Python cannot see) is in the stub; every public method
    has the compiled one's parameters."""
    defs = stub_defs(stub)
    missing = [n for n in public_names(cls) + list(dunders) if f"{cls_name}.{n}" not in defs]
    assert not missing, f"{stub} lacks {cls_name}.{missing}"
    for name in public_names(cls):
        stubbed = defs[f"{cls_name}.{name}"]
        attr = inspect.getattr_static(cls, name)
        if stubbed in ("property", "attribute"):
            continue
        if isinstance(attr, (classmethod, staticmethod)):
            attr = getattr(cls, name)
        want = [(n, k, d) for n, k, d in runtime_params(attr)]
        got = [(n, k if k is not inspect.Parameter.POSITIONAL_ONLY else inspect.Parameter.POSITIONAL_OR_KEYWORD, d)
               for n, k, d in stub_params(stubbed)]
        assert got == want, f"{cls_name}.{name}: stub {got} != runtime {want}"


def test_aggregate_stub_matches_the_compiled_class():
    check_against_stub("_core.pyi", "Aggregate", core.Aggregate, DUNDERS)
    # __init__ is a C slot without a signature: check the stub's by calling.
    assert [p[0] for p in stub_params(stub_defs("_core.pyi")["Aggregate.__init__"])] == ["node_size"]
    assert core.Aggregate(node_size=16).node_size == 16


def test_core_module_functions_are_stubbed():
    defs = stub_defs("_core.pyi")
    names = [n for n in dir(core) if not n.startswith("__") and callable(getattr(core, n))
             and not isinstance(getattr(core, n), type)
             and getattr(getattr(core, n), "__module__", None) == "aggtree._core"]
    assert names, "no module functions found"
    for n in names:
        assert n in defs, f"_core.pyi lacks {n}"
        assert stub_params(defs[n]) == runtime_params(getattr(core, n)), n


def test_event_ops_stub_matches_the_compiled_module():
    check_against_stub("_event_ops.pyi", "StartCache", event_ops.StartCache)
    defs = stub_defs("_event_ops.pyi")
    assert defs["StartCache.a"] == "attribute" and defs["StartCache.EMPTY"] == "attribute"
    assert stub_params(defs["apply_ops"]) == runtime_params(event_ops.apply_ops)


def test_the_checker_sees_a_drifted_stub(tmp_path, monkeypatch):
    """The comparison fails when a stub's parameters differ (a stub with
    count's `prefix` renamed)."""
    text = (PKG / "_core.pyi").read_text().replace("prefix: tuple[Any, ...] | list[Any] | None = None,\n    ) -> int: ...",
                                                     "pfx: tuple[Any, ...] | list[Any] | None = None,\n    ) -> int: ...", 1)
    assert "pfx:" in text
    (tmp_path / "_core.pyi").write_text(text)
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path)
    with pytest.raises(AssertionError, match="count"):
        check_against_stub("_core.pyi", "Aggregate", core.Aggregate)
