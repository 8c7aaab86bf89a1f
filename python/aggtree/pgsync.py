"""The PostgreSQL change log and change feed, under their old name: the
code lives in :mod:`aggtree.events.pglog` (the event store's PostgreSQL
backend, :mod:`aggtree.events.postgres`, is built on it).  This module
re-exports it for existing imports.  Needs psycopg (the
``aggtree[postgres]`` extra).  Writes go through
:class:`aggtree.events.EventStore`.
"""

from __future__ import annotations

from .events import pglog as _pglog
from .events.pglog import *  # noqa: F401,F403
from .events.pglog import __all__  # noqa: F401

# Every other name too (the op constants, the private helpers tests use).
globals().update({k: v for k, v in vars(_pglog).items() if not k.startswith("__")})
