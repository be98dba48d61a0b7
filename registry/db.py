"""Engine set-up and schema management for SQLite (default) and PostgreSQL.

SQLite runs in WAL mode with a busy timeout; write transactions start with BEGIN IMMEDIATE so two
writers queue instead of failing with "database is locked" half-way through. Opening a registry brings
its schema to the current Alembic revision; a schema this code does not know is refused.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from modelzoo.registry.errors import BadInput, SchemaMismatch
from modelzoo.registry.paths import output_folder

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 60_000


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for an in-memory database)."""
    path = url.split("///", 1)[-1].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            output_folder(path.parent, "registry database folder")
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
            immediate = conn.get_execution_options().get("zoo_write", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
    raise BadInput(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql+psycopg://...")


class Database:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One write transaction: BEGIN IMMEDIATE on SQLite, committed on success, rolled back on error."""
        with self.engine.connect().execution_options(zoo_write=True) as conn, Session(
            bind=conn, expire_on_commit=False
        ) as session, session.begin():
            yield session

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def ensure_schema(self) -> None:
        """Create or upgrade the schema to head; refuse a schema this code does not know.

        A SQLite file is first looked at read-only, and only a registry (or an empty file) is then
        switched to WAL mode, which is a lasting change to the file."""
        head = head_revision()
        path = sqlite_path(self.url) if self.is_sqlite else None
        if path is not None:
            _refuse_foreign_sqlite(path)
        try:
            if path is not None:  # outside any transaction, where SQLite can change the journal mode
                with contextlib.closing(self.engine.raw_connection()) as raw:
                    raw.cursor().execute("PRAGMA journal_mode=WAL")
            current = self.current_revision()
        except DatabaseError as e:  # not a database file, unreachable server, no permission
            raise BadInput(f"cannot open the registry database {self.url}: {e.orig}") from None
        if current == head:
            return
        with self.engine.connect().execution_options(zoo_write=True) as conn, conn.begin():
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(7350001)"))
            current = MigrationContext.configure(conn).get_current_revision()
            if current == head:
                return
            scripts = ScriptDirectory.from_config(_alembic_config())
            if current is None:
                tables = set(inspect(conn).get_table_names())
                if tables:
                    raise SchemaMismatch(
                        f"{self.url} holds tables {sorted(tables)[:3]}... but is not a modelzoo registry"
                    )
            elif current not in {s.revision for s in scripts.walk_revisions()}:
                raise SchemaMismatch(
                    f"registry schema {current} is newer than this modelzoo knows (head {head}); "
                    "upgrade modelzoo to open it"
                )
            log.info("upgrading registry schema %s -> %s", current, head)
            command.upgrade(_alembic_config(conn), "head")


def _refuse_foreign_sqlite(path: Path) -> None:
    """Refuse a file that is not a modelzoo registry (nor empty) before anything writes to it."""
    if not path.exists():
        return
    if not path.is_file():
        raise BadInput(f"{path} is not a regular file, so it cannot be a registry database")
    if path.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise BadInput(f"cannot open the registry database {path}: {e}") from None
    if tables and "alembic_version" not in tables:
        raise SchemaMismatch(f"{path} holds tables {sorted(tables)[:3]}... but is not a modelzoo registry")
