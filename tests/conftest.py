"""Fixtures: a fresh vault on SQLite and on the local PostgreSQL server.

PostgreSQL tests create throwaway databases on ``IDVAULT_TEST_PG`` (default
the local server with trust auth). They skip, saying why, when no server
answers; under CI (``CI=true``) an absent server is a failure instead, since
.ci/run starts one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vault.config import Settings
from vault.vault import Vault

PG_ADMIN = os.environ.get("IDVAULT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_pg_state: dict[str, object] = {}


def pg_reason() -> str | None:
    """None when PostgreSQL answers, else why not."""
    if "reason" not in _pg_state:
        try:
            import psycopg

            with psycopg.connect(PG_ADMIN, connect_timeout=3, autocommit=True) as c:
                c.execute("SELECT 1")
            _pg_state["reason"] = None
        except Exception as exc:
            _pg_state["reason"] = f"PostgreSQL at {PG_ADMIN} is not reachable: {exc}"
    return _pg_state["reason"]  # type: ignore[return-value]


class PgDatabases:
    """Creates and drops throwaway PostgreSQL databases."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def create(self, template: str | None = None) -> str:
        """A new database (a copy of ``template`` if given); its SQLAlchemy URL."""
        import psycopg

        name = f"idvault_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template
                                                      else ""))
        self.created.append(name)
        return _url(name)

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            for name in self.created:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


def _url(name: str) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def require_pg() -> None:
    reason = pg_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must test PostgreSQL; .ci/run starts it)")
        pytest.skip(reason)


@pytest.fixture
def pg_databases() -> Iterator[PgDatabases]:
    require_pg()
    dbs = PgDatabases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(scope="session")
def pg_templates() -> Iterator[dict[str, str]]:
    """A data and a key-store database migrated to the newest schema, which each test's
    PostgreSQL vault copies (``CREATE DATABASE ... TEMPLATE``, a file copy): running
    every migration on two fresh databases took ~0.3 s a vault, ~1 min over the suite.
    A copy is what the migrations make; tests/vault/test_migrations.py runs them."""
    require_pg()
    from vault import db

    dbs = PgDatabases()
    names = {}
    for schema in db.SCHEMAS:
        url = dbs.create()
        engine = db.make_engine(url, schema=schema)
        db.upgrade(engine, schema)
        engine.dispose()  # a template must have no connection when it is copied
        names[schema] = url.rsplit("/", 1)[1]
    yield names
    dbs.drop_all()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    data_dir = tmp_path / "vault"
    if backend == "sqlite":
        return Settings(data_dir=data_dir)
    dbs: PgDatabases = request.getfixturevalue("pg_databases")
    templates: dict[str, str] = request.getfixturevalue("pg_templates")
    return Settings(data_dir=data_dir, database_url=dbs.create(templates["data"]),
                    keystore_url=dbs.create(templates["keystore"]))


@pytest.fixture
def vault(settings: Settings) -> Iterator[Vault]:
    v = Vault.init(settings, actor="test")
    yield v
    v.dispose()


@pytest.fixture
def family(vault: Vault) -> Vault:
    """A vault with owner ``smiths`` (family, erase at once) and ``northlight`` (studio)."""
    vault.add_owner("smiths", "family", actor="test")
    vault.add_owner("northlight", "studio", erase_policy="retain", actor="test")
    return vault
