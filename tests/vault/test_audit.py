"""The audit chain detects altered, removed and reordered events."""

import pytest
from sqlalchemy import delete, select, update

from tests.helpers import consent, face_payload
from vault import audit
from vault.errors import AuditChainBroken
from vault.models import AuditEvent


@pytest.fixture
def busy(family):
    family.create_identity("smiths/ana", consent())
    family.put_artifact("smiths/ana", "face", face_payload())
    family.get_artifact("smiths/ana", "face")
    family.rotate_keys()
    family.delete_identity("smiths/ana")
    return family


def _actions(vault):
    with vault.session() as s:
        return [e.action for e in s.scalars(select(AuditEvent).order_by(AuditEvent.seq))]


def test_events_recorded_and_chain_intact(busy):
    assert _actions(busy) == ["vault.init", "owner.create", "owner.create", "identity.create",
                              "artifact.write", "artifact.read", "keys.rotate",
                              "identity.delete"]
    assert busy.verify_audit().ok


def test_altered_row(busy):
    with busy.session() as s:
        s.execute(update(AuditEvent).where(AuditEvent.seq == 5)
                  .values(details={"artifact": "x", "kind": "face"}))
    result = busy.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 5)
    assert "altered" in result.reason
    with pytest.raises(AuditChainBroken, match="event 5"):
        result.raise_if_bad()


def test_altered_row_with_recomputed_hash_breaks_the_next_link(busy):
    with busy.session() as s:
        ev = s.get(AuditEvent, 4)
        ev.actor = "someone else"
        ev.hash = audit.event_hash(ev.seq, ev.at, ev.action, ev.actor, ev.owner, ev.subject,
                                   ev.details, ev.prev_hash)
    result = busy.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 5)


def test_removed_row(busy):
    with busy.session() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.seq == 3))
    result = busy.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 3) and "missing" in result.reason


def test_removed_last_row(busy):
    with busy.session() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.seq == 8))
    result = busy.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 8) and "removed" in result.reason


def test_reordered_rows(busy):
    with busy.session() as s:
        a, b = s.get(AuditEvent, 5), s.get(AuditEvent, 6)
        fields = ("at", "action", "actor", "owner", "subject", "details", "prev_hash", "hash")
        va = {f: getattr(a, f) for f in fields}
        vb = {f: getattr(b, f) for f in fields}
        for f in fields:
            setattr(a, f, vb[f])
            setattr(b, f, va[f])
    result = busy.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 5)


def test_append_many_chains_each_event_and_writes_the_head_once(family):
    with family.session() as s:
        head_before = s.scalar(select(audit.AuditHead)).seq
        rows = audit.append_many(s, [
            audit.Event("artifact.read", "job:1", "smiths", f"smiths/p{i}", {"n": i})
            for i in range(3)])
        assert [r.seq for r in rows] == [head_before + 1, head_before + 2, head_before + 3]
        assert rows[1].prev_hash == rows[0].hash and rows[2].prev_hash == rows[1].hash
        assert s.scalar(select(audit.AuditHead)).hash == rows[-1].hash
        assert audit.append_many(s, []) == []
        with pytest.raises(ValueError, match="unknown audit action"):
            audit.append_many(s, [audit.Event("artifact.read", "x"), audit.Event("nope", "x")])
    with family.session() as s:
        assert audit.verify(s).ok
        # The refused batch wrote nothing: its valid first event is not in the chain.
        assert s.scalar(select(audit.AuditHead)).seq == head_before + 3


def test_cli_actor_names_the_os_account_when_user_is_unset(monkeypatch):
    import os
    import pwd

    account = pwd.getpwuid(os.getuid()).pw_name
    assert audit.cli_actor({"USER": "maria"}) == "cli:maria"
    for env in ({}, {"USER": ""}, {"USER": "  "}):
        assert audit.cli_actor(env) == f"cli:{account}"

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)  # a container uid with no passwd entry
    assert audit.cli_actor({}) == f"cli:uid{os.getuid()}"
