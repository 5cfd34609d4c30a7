"""Database engines and schema migrations for the data DB and the key store.

SQLite connections get ``foreign_keys``, ``secure_delete`` (freed pages are
zeroed, so deleted keys and ciphertexts do not linger in the file) and a busy
timeout, and begin write transactions with ``BEGIN IMMEDIATE`` so concurrent
writers queue instead of failing on a stale snapshot. The data DB uses WAL;
the key store uses a rollback journal so a deleted key leaves no WAL copy.
Schemas are created and upgraded only through the Alembic chains in
``migrations/`` (``data`` and ``keystore``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError

from vault.config import redact_url
from vault.errors import InvalidInput

SCHEMAS = ("data", "keystore")
READ_ONLY = "idvault_read_only"  # execution option: a read-only transaction


def make_engine(url: str, *, schema: str) -> Engine:
    """An engine for ``url`` set up for the ``data`` or ``keystore`` schema."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
            _sqlite_setup(engine, wal=schema == "data")
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except (ArgumentError, ImportError) as exc:
        raise InvalidInput(f"cannot use database URL {redact_url(url)}: {exc}") from None
    return engine


def _sqlite_setup(engine: Engine, *, wal: bool, foreign_keys: bool = True) -> None:
    # pysqlite's own transaction handling would defer BEGIN; take it over.
    engine.dialect.isolation_level = None  # type: ignore[attr-defined]

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
        cur.execute("PRAGMA secure_delete=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute(f"PRAGMA journal_mode={'WAL' if wal else 'DELETE'}")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Writers take the lock up front so they queue instead of failing on a
        # stale snapshot; read-only sessions (READ_ONLY) must not block them.
        readonly = conn.get_execution_options().get(READ_ONLY)
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")


def sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url.removeprefix("sqlite:///"))
    return None


def alembic_config(schema: str, engine: Engine | None = None) -> Config:
    if schema not in SCHEMAS:
        raise ValueError(schema)
    root = resources.files("migrations")
    location = root if schema == "data" else root / "keystore"
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
        cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, schema: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (default newest; creates it on an empty DB)."""
    _run(engine, schema, lambda cfg: command.upgrade(cfg, revision))


def downgrade(engine: Engine, schema: str, revision: str) -> None:
    _run(engine, schema, lambda cfg: command.downgrade(cfg, revision))


def _run(engine: Engine, schema: str, op) -> None:
    url = engine.url.render_as_string(hide_password=False)
    if engine.dialect.name == "sqlite":
        # SQLite alters tables by rebuilding them (drop + rename); with foreign
        # keys on, dropping a parent table would cascade-delete its children.
        engine = create_engine(url, connect_args={"timeout": 30})
        _sqlite_setup(engine, wal=schema == "data", foreign_keys=False)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(schema, engine)
            cfg.attributes["connection"] = conn
            op(cfg)
            if engine.dialect.name == "sqlite":
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left dangling foreign keys: {broken[:5]}")
    finally:
        if engine.dialect.name == "sqlite":
            engine.dispose()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(schema: str) -> str:
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config(schema)).get_current_head()
    assert head is not None
    return head
