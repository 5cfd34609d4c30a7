"""The lookup by handle over the API: the ORM's document exactly, and nothing remembered
between requests (a revocation, an erasure, a withdrawal made elsewhere shows at once)."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from tests.helpers import consent
from tests.web.web_fixtures import lookup_roster
from vault import api_keys
from vault.models import ApiKey
from vault.vault import Vault

BOTH = pytest.mark.parametrize("backend", ["sqlite", pytest.param(
    "postgres", marks=pytest.mark.postgres)])


def get(web, handle: str, headers: dict, suffix: str = ""):
    return web.client.get(f"/v1/identities/{handle}{suffix}", headers=headers)


@BOTH
def test_lookups_answer_the_orm_document(web):
    v = web.vault
    lookup_roster(v)
    for handle in ("smiths/ana", "smiths/ben", "smiths/held", "northlight/sol"):
        h = web.headers(handle.split("/")[0], "identities:read")
        resp = get(web, handle, h)
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert resp.get_json() == v.describe(handle)
        consent_doc = get(web, handle, h, "/consent").get_json()
        assert consent_doc == v.describe(handle)["consent"]
    assert get(web, "northlight/sol", web.headers("northlight")).get_json()["consent"][
        "status"] == "withdrawn"


@BOTH
def test_nothing_outlives_a_change_made_elsewhere(web, settings):
    """Another Vault (its own engines and pools: what another process has) revokes a key,
    erases an identity, withdraws consent; the very next request shows each."""
    web.vault.create_identity("smiths/ana", consent(), actor="t")
    web.vault.create_identity("smiths/ben", consent(), actor="t")
    web.vault.create_identity("northlight/sol", consent(), actor="t")
    h, hn = web.headers("smiths", "identities:read"), web.headers("northlight")
    for handle, headers in (("smiths/ana", h), ("smiths/ben", h), ("northlight/sol", hn)):
        assert get(web, handle, headers).status_code == 200
    with Vault.open(settings) as elsewhere:
        elsewhere.delete_identity("smiths/ana", actor="t")
        assert get(web, "smiths/ana", h).status_code == 404
        elsewhere.withdraw_consent("northlight/sol", actor="t")  # retained, blocked
        assert get(web, "northlight/sol", hn).get_json()["consent"]["status"] == "withdrawn"
        elsewhere.withdraw_consent("smiths/ben", actor="t")  # erased at once
        assert get(web, "smiths/ben", h).status_code == 404
        with elsewhere.session() as s:
            key = s.scalar(select(ApiKey).where(ApiKey.prefix == h["Authorization"][11:23]))
            api_keys.revoke_key(s, key, actor="t")
    resp = get(web, "smiths/ben", h)
    assert resp.status_code == 401 and "revoked" in resp.get_json()["error"]["message"]


def test_a_lookup_touches_last_used_at_at_most_once_a_minute(web):
    web.vault.create_identity("smiths/ana", consent(), actor="t")
    h = web.headers("smiths", "identities:read")
    prefix = h["Authorization"][11:23]

    def last_used() -> dt.datetime | None:
        with web.vault.session() as s:
            return s.scalar(select(ApiKey.last_used_at).where(ApiKey.prefix == prefix))

    assert last_used() is None
    assert get(web, "smiths/ana", h).status_code == 200
    first = last_used()
    assert first is not None
    assert get(web, "smiths/ana", h).status_code == 200
    assert last_used() == first  # within the minute: the lookup wrote nothing
    with web.vault.session() as s:
        s.scalar(select(ApiKey).where(ApiKey.prefix == prefix)).last_used_at = (
            first - dt.timedelta(minutes=2))
    assert get(web, "smiths/ana", h).status_code == 200
    assert last_used() > first - dt.timedelta(minutes=2)


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_lookups_survive_lost_database_connections(web):
    """The read path's pool does not ping before each use; a connection lost in the pool
    (a database restart) costs a second try, never an error."""
    web.vault.create_identity("smiths/ana", consent(), actor="t")
    h = web.headers("smiths", "identities:read")
    assert get(web, "smiths/ana", h).status_code == 200
    with web.vault.engine.connect() as c:
        killed = c.exec_driver_sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()").scalar()
        c.commit()
    assert killed >= 1
    for _ in range(3):
        resp = get(web, "smiths/ana", h)
        assert resp.status_code == 200, resp.get_data(as_text=True)
