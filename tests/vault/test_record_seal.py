"""Identity record seals (vault.record_seal): SQL edits to consent, status or handles are
refused, naming what changed; legitimate changes reseal; old vaults are sealed once."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select, text

from tests.helpers import consent, face_payload
from vault import identities
from vault.errors import (
    ConsentWithdrawn,
    DecryptionError,
    IntegrityError,
    PurposeNotGranted,
    RecordTampered,
)
from vault.models import AuditEvent, Identity
from vault.vault import RECORDS_SEALED_MARKER, Vault


def sql(vault: Vault, statement: str, **params) -> None:
    """An edit made outside idvault, straight on the data database."""
    with vault.engine.begin() as c:
        c.execute(text(statement), params)


def ana(family: Vault, handle: str = "smiths/ana", **consent_overrides) -> dict:
    family.create_identity(handle, consent(**consent_overrides))
    family.put_artifact(handle, "face", face_payload())
    return family.describe(handle)


def test_purposes_widened_in_sql_are_refused(family):
    doc = ana(family, purposes=["enroll"])
    with pytest.raises(PurposeNotGranted):
        family.get_artifact("smiths/ana", "face", purpose="share")
    sql(family, """update consents set purposes = '["enroll","share"]'""")
    with pytest.raises(RecordTampered) as exc:
        family.get_artifact("smiths/ana", "face", purpose="share")
    msg = str(exc.value)
    assert "smiths/ana" in msg and doc["id"] in msg
    assert (f"consent {doc['consent']['id']} purposes were changed from [enroll] to "
            "[enroll, share] outside idvault") in msg
    assert isinstance(exc.value, IntegrityError)
    # the gate used by fits, and the enrollment gate, refuse too
    with family.session() as s, pytest.raises(RecordTampered):
        identities.check_usable(identities.get_identity(s, "smiths/ana"), "enroll")
    with pytest.raises(RecordTampered):
        family.store_enrollment("smiths/ana", face_payload())


def test_inserted_consent_row_is_refused(family):
    doc = ana(family, purposes=["enroll"])
    sql(family, """insert into consents (uid, identity_id, subject, given_by, guardian_name,
                   purposes, retain_until, evidence_sha256, given_at)
                   select 'c0ffee00-0000-4000-8000-000000000000', id, 'Ana Smith', 'self',
                   NULL, '["enroll","generate","share"]', :until, :digest, :now
                   from identities""",
        until=dt.date.today() + dt.timedelta(days=30), digest="0" * 64,
        now=dt.datetime.now(dt.UTC))
    with pytest.raises(RecordTampered) as exc:
        family.get_artifact("smiths/ana", "face", purpose="share")
    assert ("a consent record c0ffee00-0000-4000-8000-000000000000 was added outside "
            "idvault") in str(exc.value)
    assert doc["id"] in str(exc.value)


def test_undone_withdrawal_is_refused(family):
    ana(family, "northlight/lee")
    out = family.withdraw_consent("northlight/lee", reason="changed her mind")
    assert out["erase_policy"] == "retain" and "receipt" not in out
    with pytest.raises(ConsentWithdrawn):
        family.get_artifact("northlight/lee", "face")
    sql(family, "update consents set withdrawn_at = NULL")
    sql(family, "update identities set status = 'active'")
    with pytest.raises(RecordTampered) as exc:
        family.get_artifact("northlight/lee", "face")
    msg = str(exc.value)
    assert "status changed from 'withdrawn' to 'active'" in msg
    assert "withdrawn_at was changed from '20" in msg and "to None" in msg


def test_deleted_consent_row_is_an_integrity_error_not_an_index_error(family):
    doc = ana(family)
    sql(family, "delete from consents")
    with pytest.raises(RecordTampered) as exc:
        family.get_artifact("smiths/ana", "face")
    assert f"consent record {doc['consent']['id']} was removed" in str(exc.value)
    with family.session() as s:
        identity = identities.get_identity(s, "smiths/ana")
        with pytest.raises(RecordTampered, match="smiths/ana"):
            identities.check_usable(identity, "generate")
        with pytest.raises(RecordTampered, match="has no consent record"):
            identity.latest_consent()
    # erasure never needs a valid record
    receipt = family.delete_identity("smiths/ana")
    assert receipt["receipt"]["handle"] == "smiths/ana"


def test_swapped_names_are_refused_naming_the_swap(family):
    a = ana(family)
    b = family.create_identity("smiths/bob", consent(subject="Bob Smith"))
    family.put_artifact("smiths/bob", "face", face_payload(seed=5))
    sql(family, "update identities set name = 'tmp' where name = 'ana'")
    sql(family, "update identities set name = 'ana' where name = 'bob'")
    sql(family, "update identities set name = 'bob' where name = 'tmp'")
    with pytest.raises(RecordTampered) as exc:
        family.get_artifact("smiths/ana", "face")
    assert (f"identity {b['id']} is stored as smiths/ana but was sealed as smiths/bob"
            in str(exc.value))
    with pytest.raises(RecordTampered, match=f"{a['id']} is stored as smiths/bob"):
        family.get_artifact("smiths/bob", "face")


def test_seal_copied_from_another_row_is_refused(family):
    ana(family)
    family.create_identity("smiths/bob", consent(purposes=["enroll", "generate", "share"]))
    sql(family, "update identities set seal = (select seal from identities where name = 'bob')"
                " where name = 'ana'")
    with pytest.raises(RecordTampered, match="smiths/ana .* fails authentication"):
        family.get_artifact("smiths/ana", "face")


def test_nulled_seal_is_refused_once_sealed(family):
    ana(family)
    sql(family, "update identities set seal = NULL")
    with pytest.raises(RecordTampered, match="has no record seal"):
        family.get_artifact("smiths/ana", "face")
    family.dispose()
    # opening again does not reseal it: the key store says the rows were sealed
    with Vault.open(family.settings) as v, pytest.raises(RecordTampered):
        v.get_artifact("smiths/ana", "face")


def test_legitimate_changes_keep_working(family):
    rng_a = face_payload(seed=1)
    r = family.store_enrollment("smiths/ana", rng_a, consent_request=consent())
    assert r.status == "active"
    family.create_identity("northlight/lee", consent())
    family.put_artifact("northlight/lee", "face", face_payload(seed=3))
    family.get_artifact("smiths/ana", "face")
    # photos added to an existing identity (its consent checked through the seal)
    again = family.store_enrollment("smiths/ana", face_payload(seed=1, photos=1))
    assert again.status == "updated"
    # a key rotation re-wraps the signing key; the record key (and the seals) stay valid
    family.rotate_keys()
    family.get_artifact("smiths/ana", "face")
    family.withdraw_consent("northlight/lee")
    with pytest.raises(ConsentWithdrawn):
        family.get_artifact("northlight/lee", "face")
    family.dispose()
    with Vault.open(family.settings) as v:
        assert v.get_artifact("smiths/ana", "face").handle == "smiths/ana"
        with pytest.raises(ConsentWithdrawn):
            v.get_artifact("northlight/lee", "face")
        assert v.verify_audit().ok


def test_review_accept_reseals(family):
    import numpy as np

    rng = np.random.default_rng(11)
    a = rng.normal(size=512)
    sib = a + 1.2 * rng.normal(size=512)
    family.store_enrollment("smiths/ana", face_payload(a), consent_request=consent())
    r = family.store_enrollment("smiths/sis", face_payload(sib, seed=2),
                                consent_request=consent())
    assert r.status == "held"
    family.decide_review(r.review_id, accept=True)
    assert family.get_artifact("smiths/sis", "face").handle == "smiths/sis"


def test_review_accept_of_a_tampered_identity_is_refused(family):
    import numpy as np

    rng = np.random.default_rng(11)
    a = rng.normal(size=512)
    sib = a + 1.2 * rng.normal(size=512)
    family.store_enrollment("smiths/ana", face_payload(a), consent_request=consent())
    r = family.store_enrollment("smiths/sis", face_payload(sib, seed=2),
                                consent_request=consent(purposes=["enroll"]))
    sql(family, """update consents set purposes = '["enroll","share"]'
                   where identity_id = (select id from identities where name = 'sis')""")
    with pytest.raises(RecordTampered, match="purposes were changed"):
        family.decide_review(r.review_id, accept=True)
    # nothing was resealed: still refused
    with pytest.raises(RecordTampered):
        family.get_artifact("smiths/sis", "face", purpose="share")


def test_existing_rows_are_sealed_once_on_open(family):
    ana(family)
    family.create_identity("northlight/lee", consent())
    # a vault from before migration 0005: no seals, no key-store marker
    sql(family, "update identities set seal = NULL")
    with family.keystore_engine.begin() as c:
        c.execute(text("delete from keystore_meta where key = :k"), {"k": RECORDS_SEALED_MARKER})
    family.dispose()
    with Vault.open(family.settings) as v:
        assert v.keys.get_meta(RECORDS_SEALED_MARKER) is not None
        with v.session() as s:
            assert all(i.seal for i in s.scalars(select(Identity)))
            [event] = s.scalars(select(AuditEvent).where(AuditEvent.action == "records.seal"))
            assert event.details == {"count": 2}
        assert v.get_artifact("smiths/ana", "face").handle == "smiths/ana"
        assert v.verify_audit().ok
        sql(v, "update identities set seal = NULL where name = 'ana'")
    with Vault.open(family.settings) as v:
        with pytest.raises(RecordTampered, match="smiths/ana .* has no record seal"):
            v.get_artifact("smiths/ana", "face")
        v.create_identity("smiths/zoe", consent())
        with v.session() as s:  # sealed once: no second event
            assert len(list(s.scalars(select(AuditEvent)
                                      .where(AuditEvent.action == "records.seal")))) == 1


def test_listings_never_read_ciphertext(family, backend):
    ana(family)
    family.create_identity("smiths/bob", consent())
    sql(family, "update artifacts set ciphertext = 'garbage'")
    listed = family.list_identities("smiths")
    assert [i["handle"] for i in listed] == ["smiths/ana", "smiths/bob"]
    assert listed[0]["artifacts"][0]["kind"] == "face"
    assert family.describe("smiths/ana")["artifacts"][0]["kind"] == "face"
    with pytest.raises(DecryptionError, match="smiths/ana"):
        family.get_artifact("smiths/ana", "face")
    if backend == "sqlite":  # TEXT that is not even UTF-8
        sql(family, "update artifacts set ciphertext = CAST(x'ff00ff' AS TEXT)")
        assert len(family.list_identities("smiths")) == 2
        with pytest.raises(DecryptionError):
            family.get_artifact("smiths/ana", "face")


def test_record_read_outside_a_vault_session_is_refused(family):
    from sqlalchemy.orm import Session

    ana(family)
    with Session(family.engine) as s:
        identity = identities.get_identity(s, "smiths/ana")
        with pytest.raises(RecordTampered, match="cannot be verified here"):
            identity.consent  # noqa: B018


def test_retention_sweep_uses_the_sealed_date(family):
    doc = ana(family)
    family.create_identity("smiths/bob", consent(subject="Bob Smith"))
    family.create_identity("smiths/cy", consent(subject="Cy Smith"))
    sealed_until = dt.date.fromisoformat(doc["consent"]["retain_until"])
    # an edit that would keep ana past her retention date; another that widens bob's use
    sql(family, "update consents set retain_until = :later where subject = 'Ana Smith'",
        later=sealed_until + dt.timedelta(days=3650))
    sql(family, """update consents set purposes = '["enroll","share"]'
                   where subject = 'Bob Smith'""")
    receipts = family.sweep_retention(today=sealed_until + dt.timedelta(days=1),
                                      owner="smiths")
    # ana (tampered, sealed as expired) and cy (untampered, expired) are erased; bob's seal
    # says expired too, so he is erased as well: an edit cannot extend retention
    assert sorted(r["receipt"]["handle"] for r in receipts) == [
        "smiths/ana", "smiths/bob", "smiths/cy"]
    family.create_identity("smiths/dan", consent(subject="Dan Smith"))
    sql(family, """update consents set purposes = '["enroll","share"]'
                   where subject = 'Dan Smith'""")
    assert family.sweep_retention(owner="smiths") == []  # not due: kept, no crash
    with pytest.raises(RecordTampered):
        family.get_artifact("smiths/dan", "face", purpose="share")
