"""Vault.put_artifacts: several artifacts of one identity in one transaction (adding kinds
to an enrolled identity), consent-gated and audited, all or nothing."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from tests.helpers import basis_payload, consent, face_payload
from vault import codec
from vault.errors import Conflict, ConsentError, InvalidInput
from vault.models import AuditEvent


def tokens_payload(seed: int, model_id: str = "sm") -> bytes:
    tokens = np.random.default_rng(seed).normal(size=(20, 2048)).astype(np.float32)
    return codec.encode("storymaker", {"tokens": tokens}, {"model_id": model_id,
                                                            "crop": "mask"})


def _actions(vault) -> list[tuple[str, dict]]:
    with vault.session(read_only=True) as s:
        return [(e.action, e.details) for e in s.scalars(select(AuditEvent)
                                                           .order_by(AuditEvent.seq))]


def test_stores_all_in_one_transaction_and_audits_each(family):
    family.create_identity("smiths/ana", consent())
    seen = []
    stored = family.put_artifacts(
        "smiths/ana", [tokens_payload(1), basis_payload(np.ones((2, 512)))], actor="t",
        enroll_details={"status": "kinds_added", "photos_checked": 2},
        finish=lambda s, arts: seen.append([a.kind for a in arts]))
    assert [a.kind for a in stored] == ["storymaker", "celeb_basis"] and seen == [
        ["storymaker", "celeb_basis"]]
    actions = _actions(family)
    writes = [d["kind"] for a, d in actions if a == "artifact.write"]
    assert writes == ["storymaker", "celeb_basis"]
    assert actions[-1] == ("enroll", {"status": "kinds_added", "photos_checked": 2,
                                      "kinds": ["storymaker", "celeb_basis"]})


def test_without_replace_a_clash_stores_nothing(family):
    family.create_identity("smiths/ana", consent())
    first = family.put_artifact("smiths/ana", "storymaker", tokens_payload(1))
    with pytest.raises(Conflict, match="already holds a storymaker artifact for model sm") as e:
        family.put_artifacts("smiths/ana", [basis_payload(np.ones((2, 512))),
                                            tokens_payload(2)], replace=False)
    assert e.value.details["artifacts"] == [first.id]
    kinds = [a["kind"] for a in family.describe("smiths/ana")["artifacts"]]
    assert kinds == ["storymaker"]  # the celeb_basis of the refused call is not there
    # Another model id of the same kind is not a clash; replace=True replaces.
    family.put_artifacts("smiths/ana", [tokens_payload(3, model_id="sm2")], replace=False)
    again = family.put_artifacts("smiths/ana", [tokens_payload(4)])
    assert again[0].replaced == first.id


def test_consent_is_checked_and_face_is_refused(family):
    family.create_identity("northlight/ana", consent())
    with pytest.raises(InvalidInput, match="other than 'face'"):
        family.put_artifacts("northlight/ana", [face_payload()])
    family.withdraw_consent("northlight/ana")
    with pytest.raises(ConsentError):
        family.put_artifacts("northlight/ana", [tokens_payload(1)])
    assert family.describe("northlight/ana")["artifacts"] == []
