"""The lookup by handle's Core read (``describe_handle``) gives exactly the ORM's document
(``describe_identity``), whatever the identity's state; a missing one is the same NotFound."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from sqlalchemy import select, update

from tests.helpers import basis_payload, consent, face_payload
from vault import identities
from vault.errors import NotFound
from vault.models import Consent, Identity, Owner


def core(vault, handle: str) -> dict:
    with vault.engine.connect() as conn:
        return identities.describe_handle(conn, handle)


def same_document(vault, handle: str) -> dict:
    orm = vault.describe(handle)
    fast = core(vault, handle)
    assert fast == orm
    # The same JSON too: no tuple for a list, no other key order once sorted.
    assert json.dumps(fast, sort_keys=True) == json.dumps(orm, sort_keys=True)
    return fast


def set_identity(vault, handle: str, **values) -> None:
    owner, name = handle.split("/")
    with vault.session() as s:
        ident = s.scalar(select(Identity).join(Owner).where(Owner.name == owner,
                                                            Identity.name == name))
        for k, v in values.items():
            setattr(ident, k, v)


def test_core_read_matches_the_orm_document(family):
    v = family
    v.create_identity("smiths/ana", consent(), actor="t")
    v.put_artifact("smiths/ana", "face", face_payload(seed=1), actor="t")
    v.put_artifact("smiths/ana", "face", face_payload(seed=2, model_id="antelopev2"),
                   actor="t")
    v.put_artifact("smiths/ana", "celeb_basis",
                   basis_payload(np.random.default_rng(0).normal(size=(2, 512))), actor="t")
    doc = same_document(v, "smiths/ana")
    assert [(a["kind"], a["model_id"]) for a in doc["artifacts"]] == [
        ("celeb_basis", "sd15"), ("face", "antelopev2"), ("face", "buffalo_l")]

    v.create_identity("smiths/ben", consent(given_by="self", guardian_name=None), actor="t")
    assert same_document(v, "smiths/ben")["artifacts"] == []  # the outer join's empty row

    v.create_identity("smiths/held", consent(), actor="t")
    v.put_artifact("smiths/held", "face", face_payload(seed=3), actor="t")
    set_identity(v, "smiths/held", status="held")
    assert same_document(v, "smiths/held")["status"] == "held"

    # Withdrawn under a retain policy: the identity stays, its consent says so.
    v.create_identity("northlight/sol", consent(purposes=["enroll"]), actor="t")
    v.put_artifact("northlight/sol", "face", face_payload(seed=4), actor="t")
    v.withdraw_consent("northlight/sol", reason="changed my mind", actor="t")
    doc = same_document(v, "northlight/sol")
    assert (doc["status"], doc["consent"]["status"]) == ("withdrawn", "withdrawn")
    assert doc["consent"]["withdrawal_reason"] == "changed my mind"
    assert doc["owner_kind"] == "studio"


def test_the_newest_consent_record_is_the_current_one(family):
    v = family
    v.create_identity("smiths/ana", consent(), actor="t")
    with v.session() as s:
        ident = s.scalar(select(Identity).where(Identity.name == "ana"))
        newer = consent(subject="Ana B. Smith", purposes=["enroll", "generate", "commercial"]
                        ).to_model()
        newer.identity_id = ident.id
        s.add(newer)
    doc = same_document(v, "smiths/ana")
    assert doc["consent"]["subject"] == "Ana B. Smith"
    assert doc["consent"]["purposes"] == ["enroll", "generate", "commercial"]


def test_expired_consent_reads_as_expired(family):
    v = family
    v.create_identity("smiths/ana", consent(), actor="t")
    with v.session() as s:
        s.execute(update(Consent).values(retain_until=dt.date.today() - dt.timedelta(days=1)))
    assert same_document(v, "smiths/ana")["consent"]["status"] == "expired"


def test_missing_identities_are_the_same_not_found(family):
    v = family
    v.create_identity("northlight/sol", consent(), actor="t")
    for handle in ("smiths/nobody", "nobody/sol", "smiths/sol"):
        with pytest.raises(NotFound) as core_error:
            core(v, handle)
        with pytest.raises(NotFound) as orm_error:
            v.describe(handle)
        assert str(core_error.value) == str(orm_error.value) == f"no identity {handle}"
