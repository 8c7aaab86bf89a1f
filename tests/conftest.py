"""Shared test configuration: hypothesis profiles and the implementation fixtures.

Every API test runs against both implementations of the contract in
``docs/API.md``: the native ``aggtree._core.Aggregate`` and the pure-Python
``aggtree.reference.Aggregate``.  The native one is never skipped: if it does
not import, its tests fail.  To run only the reference tests (for instance
while the extension is not built)::

    AGGTREE_PURE=1 PYTHONPATH=python python -m pytest tests -k reference

Hypothesis profiles: ``default`` (quick, used locally) and ``ci`` (more
examples, still bounded so that the suite, sanitizer build included, takes a
few minutes).  ``ci`` is selected by ``HYPOTHESIS_PROFILE=ci`` or whenever
the environment variable ``CI`` is set.
"""

from __future__ import annotations

import importlib
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "default")
)

IMPLEMENTATIONS = ("native", "reference")
_MODULES = {"native": "aggtree._core", "reference": "aggtree.reference"}


def load_impl(name: str):
    """The Aggregate class of implementation ``name`` ("native" or "reference")."""
    return importlib.import_module(_MODULES[name]).Aggregate


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request):
    """The Aggregate class under test, once per implementation."""
    return load_impl(request.param)


class Maker:
    """Builds aggregates of one implementation at one node size.

    ``make()`` is an empty aggregate; ``make(items, namespace=ns)`` inserts
    ``(key, id, value)`` (or ``(key, id)``) tuples one by one.  ``make.cls``
    is the class, ``make.node_size`` the node size, ``make.name`` the
    implementation.
    """

    def __init__(self, name: str, node_size: int) -> None:
        self.name = name
        self.cls = load_impl(name)
        self.node_size = node_size

    def __call__(self, items=(), *, namespace=None):
        agg = self.cls(node_size=self.node_size)
        for item in items:
            agg.insert(*item, namespace=namespace)
        agg.check()
        return agg

    def __repr__(self) -> str:
        return f"Maker({self.name}, node_size={self.node_size})"


# The reference ignores node_size, so it runs once; the native tree runs at
# the smallest node size (deep trees, many splits and merges) and the default.
_MAKE_PARAMS = [
    pytest.param(("native", 4), id="native-4"),
    pytest.param(("native", 64), id="native-64"),
    pytest.param(("reference", 64), id="reference"),
]


@pytest.fixture(params=_MAKE_PARAMS)
def make(request):
    """A :class:`Maker` per implementation and node size."""
    name, node_size = request.param
    return Maker(name, node_size)


def _typed(v):
    """A value with its type made visible, so that 1, 1.0 and True differ."""
    if isinstance(v, tuple):
        return ("tuple", tuple(_typed(e) for e in v))
    if isinstance(v, float):
        return ("float", v.hex())
    return (type(v).__name__, v)


def snapshot(agg):
    """The full observable content of an aggregate, types included."""
    out = {}
    for ns in agg.namespaces():
        # Keyed by the namespace itself: dict semantics, as in the aggregate.
        out[ns] = [
            (_typed(it.key), _typed(it.id), float(it.value).hex()) for it in agg.iter(namespace=ns)
        ]
    return len(agg), out


@pytest.fixture
def take_snapshot():
    """``snapshot(agg)``: a comparable picture of everything an aggregate holds."""
    return snapshot


@pytest.fixture(name="load_impl")
def load_impl_fixture():
    """``load_impl(name)``: the Aggregate class of "native" or "reference"."""
    return load_impl


# ---------------------------------------------------------------------------
# PostgreSQL: one throwaway server per session, a fresh database per test
# ---------------------------------------------------------------------------

#: Set to 1 (CI does) to make a missing PostgreSQL server a failure, not a skip.
REQUIRE_POSTGRES = os.environ.get("AGGTREE_REQUIRE_POSTGRES") == "1"


def _postgres_unavailable() -> "str | None":
    """Why the PostgreSQL tests cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'aggtree[postgres]')"
    from aggtree.pgserver import find_binaries

    if find_binaries() is None:
        return ("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
                "/usr/lib/postgresql/*/bin: apt-get install -y postgresql, or set AGGTREE_PG_BIN")
    return None


def need_postgres() -> None:
    """Skip the calling test (fail under AGGTREE_REQUIRE_POSTGRES=1) when no
    server can run."""
    why = _postgres_unavailable()
    if why is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"AGGTREE_REQUIRE_POSTGRES=1 but {why}")
        pytest.skip(why)


@pytest.fixture(scope="session")
def pg_server():
    """A TempPostgres for the whole session (started on first use)."""
    need_postgres()
    from aggtree.pgserver import TempPostgres

    with TempPostgres() as pg:
        yield pg


_pg_databases = [0]


@pytest.fixture
def pg_uri(pg_server):
    """The URI of a new, empty database on the session's server."""
    _pg_databases[0] += 1
    return pg_server.uri(f"t{os.getpid()}_{_pg_databases[0]}")


#: The two backends of the event store, for ``backend`` parametrisations.
BACKENDS = ("sqlite", "postgres")


@pytest.fixture(params=BACKENDS)
def backend_name(request):
    """``"sqlite"`` or ``"postgres"`` (the latter skips without a server)."""
    if request.param == "postgres":
        need_postgres()
    return request.param
