"""CompiledRead: the rows Connection.execute gives, on SQLite and PostgreSQL; a lost
database connection is invalidated, not handed out again."""

from __future__ import annotations

import pytest
from sqlalchemy import String, TypeDecorator, bindparam, literal_column, select

from tests.helpers import consent, face_payload
from vault import api_keys, identities
from vault.compiled_read import CompiledRead
from vault.models import Identity


def rows(result) -> list[tuple]:
    return [tuple(r) for r in result]


def test_rows_are_those_of_connection_execute(family):
    v = family
    v.create_identity("smiths/ana", consent(), actor="t")
    v.put_artifact("smiths/ana", "face", face_payload(seed=1), actor="t")
    v.create_identity("smiths/ben", consent(), actor="t")
    with v.session() as s:
        key, _ = api_keys.create_key(s, "smiths", "k", ["identities:read"], actor="t")
        prefix = key.prefix
    cases = [(identities.DESCRIBE_BY_HANDLE, {"owner": "smiths", "name": "ana"}),
             (identities.DESCRIBE_BY_HANDLE, {"owner": "smiths", "name": "ben"}),  # NULLs
             (identities.DESCRIBE_BY_HANDLE, {"owner": "smiths", "name": "nobody"}),
             (api_keys.KEY_BY_PREFIX, {"prefix": prefix})]
    with v.engine.connect() as conn:
        for statement, params in cases:
            read = CompiledRead(statement)
            expected = rows(conn.execute(statement, params))
            got = read.all(conn, params)
            assert rows(got) == expected
            assert all(g._fields == tuple(statement.selected_columns.keys()) for g in got)
            assert read.all(conn, params) == got  # the second call uses what the first kept
            assert read.first(conn, params) == (got[0] if got else None)


class Shouting(TypeDecorator):
    impl = String
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return value.upper()


def test_parameters_that_need_converting_are_refused(family):
    statement = select(Identity.id).where(Identity.name == bindparam("name", type_=Shouting))
    with family.engine.connect() as conn, pytest.raises(TypeError, match="as they are"):
        CompiledRead(statement).all(conn, {"name": "ana"})


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_lost_connection_is_replaced_and_the_read_made_again(family):
    read = CompiledRead(select(literal_column("1").label("one")))
    with family.engine.connect() as conn:
        assert rows(read.all(conn, {})) == [(1,)]
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        conn.rollback()
        with family.engine.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
            other.commit()
        assert rows(read.all(conn, {})) == [(1,)]  # on a new database connection
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
    # A failure that is not a lost connection is raised as it is, not retried.
    broken = CompiledRead(select(literal_column("1/0").label("boom")))
    with family.engine.connect() as conn, pytest.raises(Exception, match="division by zero"):
        broken.all(conn, {})
