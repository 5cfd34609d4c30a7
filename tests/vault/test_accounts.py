"""UI accounts: argon2id hashes, one-time passwords, memberships and roles, sessions."""

from __future__ import annotations

import datetime as dt

import pytest
from argon2 import PasswordHasher
from sqlalchemy import select

from vault import accounts
from vault.errors import AlreadyExists, InvalidInput, NotFound
from vault.models import User, WebSession


@pytest.fixture(autouse=True)
def cheap(monkeypatch):
    monkeypatch.setattr(accounts, "hasher",
                        PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    monkeypatch.setattr(accounts, "_DUMMY_HASH", None)


REAL_HASHER = accounts.hasher  # before the fixture swaps in a cheap one


def test_default_hasher_is_memory_hard_argon2id():
    from argon2 import Type

    assert REAL_HASHER.type is Type.ID
    assert REAL_HASHER.memory_cost >= 64 * 1024 and REAL_HASHER.time_cost >= 2
    assert REAL_HASHER.hash("x" * 12).startswith("$argon2id$v=19$m=65536")


def test_users_passwords_and_one_time_passwords(family):
    with family.session() as s:
        user, generated = accounts.create_user(s, "maria", "correct horse battery", actor="test")
        assert generated is None and not user.must_change_password
        assert user.password_hash.startswith("$argon2id$")
        assert "correct horse" not in user.password_hash
        _, one_time = accounts.create_user(s, "ben", actor="test")
        assert len(one_time) >= 20
        with pytest.raises(AlreadyExists):
            accounts.create_user(s, "maria", "another password", actor="test")
        with pytest.raises(InvalidInput, match="at least 10"):
            accounts.create_user(s, "shorty", "short", actor="test")
        with pytest.raises(InvalidInput, match="username"):
            accounts.create_user(s, "Bad Name!", "long enough password", actor="test")
        with pytest.raises(InvalidInput, match="not the username"):
            accounts.create_user(s, "samename1", "samename1", actor="test")
    with family.session() as s:
        assert accounts.authenticate(s, "maria", "correct horse battery").username == "maria"
        assert accounts.authenticate(s, "MARIA ", "correct horse battery") is not None
        assert accounts.authenticate(s, "maria", "wrong") is None
        assert accounts.authenticate(s, "nobody", "whatever") is None
        assert accounts.authenticate(s, "maria", "x" * 5000) is None
        ben = accounts.authenticate(s, "ben", one_time)
        assert ben.must_change_password and ben.last_login_at is not None
    with family.session() as s:
        new = accounts.set_password(s, "ben", "ben's own password", actor="test")
        assert new is None
        assert not accounts.get_user(s, "ben").must_change_password
        reset = accounts.set_password(s, "ben", actor="test")
        assert reset and accounts.get_user(s, "ben").must_change_password


def test_unknown_users_cost_the_same(family, monkeypatch):
    """An unknown name runs one argon2 verification too, so timing does not tell."""
    with family.session() as s:
        accounts.create_user(s, "maria", "correct horse battery", actor="test")
    calls = []
    real = accounts.hasher

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def verify(self, digest, password):
            calls.append(digest)
            return real.verify(digest, password)

    monkeypatch.setattr(accounts, "hasher", Spy())
    with family.session() as s:
        assert accounts.authenticate(s, "maria", "wrong password") is None
        assert accounts.authenticate(s, "nobody-here", "wrong password") is None
    assert len(calls) == 2 and all(c.startswith("$argon2id$") for c in calls)


def test_memberships_and_roles(family):
    with family.session() as s:
        maria, _ = accounts.create_user(s, "maria", "correct horse battery", actor="test")
        root, _ = accounts.create_user(s, "root-user", "correct horse battery", superuser=True, actor="test")
        accounts.grant(s, "maria", "smiths", "editor", actor="test")
        accounts.grant(s, "maria", "smiths", "viewer", actor="test")  # replaces
        with pytest.raises(InvalidInput):
            accounts.grant(s, "maria", "smiths", "owner", actor="test")
        with pytest.raises(NotFound):
            accounts.grant(s, "maria", "nowhere", "viewer", actor="test")
        owners = {o.name: r for o, r in accounts.owners_of(s, maria)}
        assert owners == {"smiths": "viewer"}
        smiths = next(o for o, _ in accounts.owners_of(s, maria))
        assert accounts.role_in(s, maria, smiths.id) == "viewer"
        assert {o.name: r for o, r in accounts.owners_of(s, root)} == {
            "northlight": "admin", "smiths": "admin"}
        assert [m["username"] for m in accounts.members_of(s, "smiths")] == ["maria"]
        accounts.revoke(s, "maria", "smiths", actor="test")
        with pytest.raises(NotFound):
            accounts.revoke(s, "maria", "smiths", actor="test")
        assert accounts.role_in(s, maria, smiths.id) is None
    assert accounts.ROLE_SCOPES["admin"] == accounts.SCOPES
    assert set(accounts.ROLE_SCOPES["viewer"]) < set(accounts.ROLE_SCOPES["editor"])


def test_sessions(family):
    with family.session() as s:
        user, _ = accounts.create_user(s, "maria", "correct horse battery", actor="test")
        token = accounts.create_session(s, user, None)
        expired = accounts.create_session(s, user, None, ttl=dt.timedelta(seconds=-1))
        assert len(token) >= 40
        # Only the token's SHA-256 is stored.
        assert token not in str([r.id for r in s.scalars(select(WebSession))])
    with family.session() as s:
        _, found = accounts.resume_session(s, token)
        assert found.username == "maria"
        assert accounts.resume_session(s, expired) is None
        assert accounts.resume_session(s, "forged-token-forged-token") is None
        assert accounts.resume_session(s, "") is None
    with family.session() as s:
        accounts.set_password(s, "maria", "a new password here", actor="test")  # ends every session
    with family.session() as s:
        assert accounts.resume_session(s, token) is None
        token = accounts.create_session(s, accounts.get_user(s, "maria"), None)
        accounts.end_session(s, token)
        assert accounts.resume_session(s, token) is None


def test_deleting_a_user_removes_memberships_and_sessions(family):
    with family.session() as s:
        user, _ = accounts.create_user(s, "maria", "correct horse battery", actor="test")
        accounts.grant(s, "maria", "smiths", "admin", actor="test")
        accounts.create_session(s, user, None)
    with family.session() as s:
        accounts.delete_user(s, "maria", actor="test")
    with family.session() as s:
        assert s.scalars(select(User)).all() == []
        assert s.scalars(select(WebSession)).all() == []
        assert accounts.members_of(s, "smiths") == []


def test_account_changes_are_audited(family):
    from sqlalchemy import select

    from vault import audit
    from vault.models import AuditEvent

    with family.session() as s:
        accounts.create_user(s, "maria", "correct horse battery", actor="cli:root")
        accounts.grant(s, "maria", "smiths", "viewer", actor="web:admin")
        accounts.grant(s, "maria", "smiths", "editor", actor="web:admin")
        accounts.set_password(s, "maria", actor="cli:root")
        accounts.revoke(s, "maria", "smiths", actor="web:admin")
        accounts.delete_user(s, "maria", actor="cli:root")
    with family.session() as s:
        events = [(e.action, e.actor, e.owner, e.subject, e.details) for e in s.scalars(
            select(AuditEvent).where(AuditEvent.action.like("user.%")
                                     | AuditEvent.action.like("member.%"))
            .order_by(AuditEvent.seq))]
        assert audit.verify(s).ok
    assert events == [
        ("user.create", "cli:root", None, "maria",
         {"superuser": False, "one_time_password": False}),
        ("member.grant", "web:admin", "smiths", "maria", {"role": "viewer", "previous": None}),
        ("member.grant", "web:admin", "smiths", "maria", {"role": "editor", "previous": "viewer"}),
        ("user.password", "cli:root", None, "maria", {"one_time_password": True}),
        ("member.revoke", "web:admin", "smiths", "maria", {"role": "editor"}),
        ("user.delete", "cli:root", None, "maria", {}),
    ]
