"""Shared body of both Alembic ``env.py`` files: run migrations online on the
connection ``vault.db.upgrade`` hands over, or on a URL for the alembic CLI."""

from __future__ import annotations

from alembic import context
from sqlalchemy import MetaData, create_engine


def run(metadata: MetaData) -> None:
    cfg = context.config
    connection = cfg.attributes.get("connection")
    if connection is not None:
        _migrate(connection, metadata)
        return
    if context.is_offline_mode():
        context.configure(url=cfg.get_main_option("sqlalchemy.url"), target_metadata=metadata,
                          literal_binds=True, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = cfg.attributes.get("engine") or create_engine(cfg.get_main_option("sqlalchemy.url"))
    with engine.begin() as conn:
        _migrate(conn, metadata)


def _migrate(connection, metadata: MetaData) -> None:
    # Batch mode lets later ALTERs work on SQLite (it rebuilds the table).
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
