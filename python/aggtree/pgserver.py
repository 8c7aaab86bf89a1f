"""A throwaway PostgreSQL server for tests, benchmarks and the demo.

``TempPostgres`` runs ``initdb`` and ``pg_ctl`` into a temporary directory and
serves on a unix socket only (no TCP port is opened), so nothing outside this
machine can reach it and two servers never fight over a port.  It finds the
server binaries on ``PATH`` or in the usual Debian location
(``/usr/lib/postgresql/<version>/bin``, newest first).  PostgreSQL refuses to
run as root: when this process is root, the data and socket directories are
handed to the ``postgres`` system user (or ``$AGGTREE_PG_USER``) and the
server runs as that user through ``runuser``.

    with TempPostgres() as pg:
        store = EventStore.open(pg.uri("events"))   # creates database "events"

The server is for throwaway data: it runs with ``fsync=off`` unless
``durable=True``.  ``restart()`` stops and starts it on the same data (the
tests use it to cut every connection mid-run); ``stop()`` / ``start()`` do the
halves.  ``find_binaries()`` returns None when no server is installed, so
callers can skip with a clear reason.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Optional

__all__ = ["TempPostgres", "find_binaries", "PostgresUnavailable"]


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries, or the server would not start."""


def find_binaries() -> Optional[str]:
    """The directory holding ``initdb`` and ``pg_ctl``, or None.

    ``$AGGTREE_PG_BIN`` wins; then ``PATH`` (when both tools are there);
    then ``/usr/lib/postgresql/*/bin``, newest version first."""
    env = os.environ.get("AGGTREE_PG_BIN")
    if env:
        return env if _has_tools(env) else None
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        # /usr/local/bin/pg_ctl may be a symlink into the versioned directory
        d = os.path.dirname(os.path.realpath(pg_ctl))
        if _has_tools(d):
            return d
    def version(path: str) -> tuple:
        v = path.split("/")[-2]
        return tuple(int(p) for p in v.split(".") if p.isdigit())
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if _has_tools(d):
            return d
    return None


def _has_tools(d: str) -> bool:
    return all(os.access(os.path.join(d, t), os.X_OK) for t in ("initdb", "pg_ctl", "postgres"))


class TempPostgres:
    """A PostgreSQL server in a temporary directory, on a unix socket.

    ``uri(dbname)`` creates the database on first use and returns a libpq URI
    for it.  Use as a context manager, or call ``start()`` and ``close()``."""

    def __init__(self, *, durable: bool = False, bindir: Optional[str] = None,
                 settings: Optional[dict] = None) -> None:
        self.bindir = bindir or find_binaries()
        if self.bindir is None:
            raise PostgresUnavailable(
                "no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in "
                "/usr/lib/postgresql/*/bin; install them (apt-get install -y postgresql) "
                "or set AGGTREE_PG_BIN")
        self.durable = durable
        self.settings = dict(settings or {})
        self.root = tempfile.mkdtemp(prefix="aggtree-pg-")
        self.datadir = os.path.join(self.root, "data")
        self.sockdir = os.path.join(self.root, "sock")
        self.logfile = os.path.join(self.root, "server.log")
        self._user: Optional[str] = None
        self._running = False
        self._created: set = set()
        os.makedirs(self.sockdir)
        if os.geteuid() == 0:
            self._user = os.environ.get("AGGTREE_PG_USER", "postgres")
            try:
                pw = pwd.getpwnam(self._user)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root, and there is no {self._user!r} user to run the "
                    "server as (PostgreSQL refuses root); create one or set AGGTREE_PG_USER")
            os.chmod(self.root, 0o755)
            for d in (self.root, self.sockdir):
                os.chown(d, pw.pw_uid, pw.pw_gid)
        self._run([self._tool("initdb"), "-D", self.datadir, "-U", "postgres",
                   "--auth=trust", "-E", "UTF8", "--no-sync"], "initdb")

    # -- life cycle --------------------------------------------------------

    def _tool(self, name: str) -> str:
        assert self.bindir is not None  # checked in __init__
        return os.path.join(self.bindir, name)

    def _run(self, argv: list, what: str) -> None:
        if self._user is not None:
            argv = ["runuser", "-u", self._user, "--"] + argv
        r = subprocess.run(argv, capture_output=True, text=True, cwd=self.root)
        if r.returncode != 0:
            log = ""
            if os.path.exists(self.logfile):
                with open(self.logfile, errors="replace") as f:
                    log = f.read()[-2000:]
            raise PostgresUnavailable(
                f"{what} failed (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}"
                + (f"\nserver log tail:\n{log}" if log else ""))

    def start(self) -> "TempPostgres":
        if self._running:
            return self
        opts = {"listen_addresses": "''", "unix_socket_directories": f"'{self.sockdir}'",
                "max_connections": "200"}
        if not self.durable:
            opts.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        opts.update({k: str(v) for k, v in self.settings.items()})
        o = " ".join(f"-c {k}={v}" for k, v in opts.items())
        self._run([self._tool("pg_ctl"), "-D", self.datadir, "-o", o, "-l", self.logfile,
                   "-w", "-t", "60", "start"], "pg_ctl start")
        self._running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: smart, fast or immediate)."""
        if self._running:
            self._run([self._tool("pg_ctl"), "-D", self.datadir, "-m", mode, "-w", "stop"],
                      "pg_ctl stop")
            self._running = False

    def restart(self, mode: str = "fast") -> None:
        """Stop and start on the same data: every client connection is cut."""
        self.stop(mode)
        self.start()

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "TempPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- connecting --------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def uri(self, dbname: str = "postgres") -> str:
        """A libpq URI for ``dbname`` on this server, creating the database
        on first use."""
        if dbname != "postgres" and dbname not in self._created:
            self.create_database(dbname)
        return f"postgresql://postgres@/{dbname}?host={self.sockdir}"

    def create_database(self, dbname: str) -> None:
        import psycopg  # the optional 'postgres' extra
        from psycopg import sql

        with psycopg.connect(self.uri("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                  (dbname,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        self._created.add(dbname)
