"""API keys: shown once, stored as a SHA-256, prefix lookup, scopes, expiry, revocation."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from vault import api_keys, audit
from vault.api_keys import KeyRefused
from vault.errors import Conflict, InvalidInput, NotFound
from vault.models import ApiKey, utcnow


def test_create_and_authenticate(family):
    with family.session() as s:
        key, token = api_keys.create_key(s, "smiths", "render farm",
                                         ["generate", "identities:read"], actor="test")
        assert token.startswith(f"idv_{key.prefix}_") and len(key.prefix) == 12
        assert key.scopes == ["identities:read", "generate"]  # canonical order
    with family.session() as s:
        row = s.scalar(select(ApiKey))
        assert token not in (row.secret_sha256, row.prefix, str(row.scopes))
        found, owner = api_keys.authenticate(s, token)
        assert (found.id, owner.name) == (key.id, "smiths")
        assert found.last_used_at is not None
        events = [e.action for e in audit.events(s, owner="smiths")]
        assert "apikey.create" in events
        assert token not in str([e.details for e in audit.events(s)])


def test_refusals(family):
    with family.session() as s:
        key, token = api_keys.create_key(s, "smiths", "k", ["identities:read"], actor="t")
        _, soon = api_keys.create_key(s, "smiths", "soon", ["identities:read"], actor="t",
                                      expires_at=utcnow() + dt.timedelta(seconds=1))
    wrong_secret = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for bad, why in ((wrong_secret, "unknown"), ("idv_000000000000_" + "A" * 43, "unknown"),
                     ("idv_000000000000_nope", "unknown"), (token[:-1], "unknown"),
                     ("not a key", "malformed"), ("idv_nope", "malformed"),
                     ("idv_000000000000_", "malformed"), ("idv_00000000000g_nope", "malformed"),
                     ("", "malformed"), (None, "malformed")):
        with family.session() as s, pytest.raises(KeyRefused, match=why):
            api_keys.authenticate(s, bad)
    with family.session() as s, pytest.raises(KeyRefused, match="expired"):
        api_keys.authenticate(s, soon, now=utcnow() + dt.timedelta(seconds=5))
    with family.session() as s:
        api_keys.revoke_key(s, api_keys.get_key(s, "smiths", key.id), actor="t")
        with pytest.raises(Conflict):
            api_keys.revoke_key(s, api_keys.get_key(s, "smiths", key.id), actor="t")
    with family.session() as s, pytest.raises(KeyRefused, match="revoked"):
        api_keys.authenticate(s, token)


def test_validation_and_tenancy(family):
    with family.session() as s:
        for scopes in ([], ["root"], "admin", [1]):
            with pytest.raises(InvalidInput):
                api_keys.create_key(s, "smiths", "k", scopes, actor="t")
        for name in ("", " ", "x" * 65, "a\x00b"):
            with pytest.raises(InvalidInput):
                api_keys.create_key(s, "smiths", name, ["admin"], actor="t")
        with pytest.raises(InvalidInput, match="future"):
            api_keys.create_key(s, "smiths", "k", ["admin"], actor="t",
                                expires_at=utcnow() - dt.timedelta(days=1))
        key, _ = api_keys.create_key(s, "smiths", "k", ["admin"], actor="t")
        with pytest.raises(NotFound):
            api_keys.get_key(s, "northlight", key.id)  # another owner's key: not found
        assert api_keys.list_keys(s, "northlight") == []
        assert api_keys.find_key(s, key.prefix).id == key.id
        assert api_keys.find_key(s, str(key.id)).id == key.id
        digits, _ = api_keys.create_key(s, "smiths", "k2", ["admin"], actor="t")
        digits.prefix = "123456789012"  # a prefix that looks like a number
        s.flush()
        assert api_keys.find_key(s, "123456789012").id == digits.id


def test_last_used_is_touched_at_most_once_a_minute(family):
    with family.session() as s:
        _, token = api_keys.create_key(s, "smiths", "k", ["admin"], actor="t")
    t0 = utcnow()
    with family.session() as s:
        first = api_keys.authenticate(s, token, now=t0)[0].last_used_at
    with family.session() as s:
        again = api_keys.authenticate(s, token, now=t0 + dt.timedelta(seconds=30))[0]
        assert again.last_used_at.replace(tzinfo=None) == first.replace(tzinfo=None)
    with family.session() as s:
        later = api_keys.authenticate(s, token, now=t0 + dt.timedelta(minutes=2))[0]
        assert later.last_used_at.replace(tzinfo=None) > first.replace(tzinfo=None)
    desc = api_keys.describe_key(later)
    assert desc["status"] == "active" and "secret_sha256" not in desc


def test_verify_refuses_exactly_as_authenticate(family):
    with family.session() as s:
        key, token = api_keys.create_key(s, "smiths", "k", ["identities:read", "generate"],
                                         actor="t")
        _, soon = api_keys.create_key(s, "smiths", "soon", ["admin"], actor="t",
                                      expires_at=utcnow() + dt.timedelta(seconds=1))
    with family.engine.connect() as conn:
        grant = api_keys.verify(conn, token)
        assert (grant.id, grant.prefix, grant.name, grant.owner, grant.owner_kind) == (
            key.id, key.prefix, "k", "smiths", "family")
        assert grant.scopes == ("identities:read", "generate") and grant.last_used_at is None
        assert api_keys.needs_touch(grant)
        wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        for bad, why in ((wrong, "unknown"), ("idv_000000000000_" + "A" * 43, "unknown"),
                         ("idv_000000000000_nope", "unknown"), (token[:-1], "unknown"),
                         ("not a key", "malformed"), ("idv_000000000000_a b", "malformed"),
                         ("", "malformed"), (None, "malformed")):
            with pytest.raises(KeyRefused, match=why):
                api_keys.verify(conn, bad)
        with pytest.raises(KeyRefused, match="expired"):
            api_keys.verify(conn, soon, now=utcnow() + dt.timedelta(seconds=5))


def test_verify_sees_a_revocation_made_elsewhere_at_once(settings, family):
    """Nothing is cached: another process's revocation (here another Vault, with its own
    engines) is refused by the very next verify, on a connection checked out before."""
    from vault.vault import Vault

    with family.session() as s:
        key, token = api_keys.create_key(s, "smiths", "k", ["identities:read"], actor="t")
    with family.engine.connect() as conn:
        assert api_keys.verify(conn, token).id == key.id
        with Vault.open(settings) as elsewhere, elsewhere.session() as s:
            api_keys.revoke_key(s, api_keys.get_key(s, "smiths", key.id), actor="t")
        with pytest.raises(KeyRefused, match="revoked"):
            api_keys.verify(conn, token)


def test_verify_sees_last_used_at(family):
    with family.session() as s:
        _, token = api_keys.create_key(s, "smiths", "k", ["admin"], actor="t")
    t0 = utcnow()
    with family.session() as s:
        api_keys.authenticate(s, token, now=t0)  # touches
    with family.engine.connect() as conn:
        grant = api_keys.verify(conn, token)
    assert not api_keys.needs_touch(grant, t0 + dt.timedelta(seconds=30))
    assert api_keys.needs_touch(grant, t0 + dt.timedelta(minutes=2))
