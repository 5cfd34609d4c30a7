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
