"""Vault.store_enrollment: dedupe decisions, holds for review, re-enrollment."""

import numpy as np
import pytest

from tests.helpers import consent, face_payload
from vault import codec
from vault.errors import Conflict, DuplicateIdentity, InvalidInput, PhotoRejected

RNG = np.random.default_rng(11)
ANA, BEN = RNG.normal(size=512), RNG.normal(size=512)
# A sibling: cosine to Ana's photos lands in the review band (0.50-0.70).
SIB = ANA + 1.2 * RNG.normal(size=512)


def test_new_identity_enrolled_and_indexed(family):
    r = family.store_enrollment("smiths/ana", face_payload(ANA), consent_request=consent())
    assert (r.status, r.photos_added, r.top_match) == ("active", 2, None)
    # An unrelated person is enrolled too; the closest match is reported as "new".
    r = family.store_enrollment("smiths/ben", face_payload(BEN), consent_request=consent())
    assert (r.status, r.top_match["handle"], r.top_match["decision"]) == (
        "active", "smiths/ana", "new")
    probe = codec.decode(face_payload(ANA, seed=5)).tensors["normed"]
    assert family.search_faces("smiths", probe)[0]["handle"] == "smiths/ana"


def test_new_identity_needs_consent(family):
    with pytest.raises(InvalidInput, match="needs a consent record"):
        family.store_enrollment("smiths/ana", face_payload(ANA))
    assert family.list_identities() == []


def test_duplicate_blocked_names_existing_and_stores_nothing(family):
    family.store_enrollment("smiths/ana", face_payload(ANA), consent_request=consent())
    with pytest.raises(DuplicateIdentity) as exc:
        family.store_enrollment("smiths/anna", face_payload(ANA, seed=3),
                                consent_request=consent())
    assert exc.value.handle == "smiths/ana" and exc.value.decision == "block"
    assert "smiths/ana" in str(exc.value) and exc.value.score >= 0.7
    assert [i["handle"] for i in family.list_identities()] == ["smiths/ana"]
    # Another owner's roster is never compared.
    family.store_enrollment("northlight/ana", face_payload(ANA, seed=4),
                            consent_request=consent())


def test_review_band_holds_then_accept(family):
    family.store_enrollment("smiths/ana", face_payload(ANA), consent_request=consent())
    r = family.store_enrollment("smiths/sis", face_payload(SIB, seed=2),
                                consent_request=consent())
    assert r.status == "held" and r.top_match["handle"] == "smiths/ana"
    assert 0.5 <= r.top_match["score"] < 0.7
    assert family.describe("smiths/sis")["status"] == "held"
    [review] = family.list_reviews("smiths")
    assert (review["handle"], review["candidate"]) == ("smiths/sis", "smiths/ana")
    with pytest.raises(Conflict, match="held for review"):
        family.store_enrollment("smiths/sis", face_payload(SIB, seed=9))
    family.decide_review(review["id"], accept=True)
    assert family.describe("smiths/sis")["status"] == "active"
    assert family.list_reviews("smiths") == []
    with pytest.raises(Conflict, match="already accepted"):
        family.decide_review(review["id"], accept=False)
    # The pair is now "not the same": Sis's new photos no longer flag Ana.
    again = family.store_enrollment("smiths/sis", face_payload(SIB, seed=12))
    assert again.status == "updated"


def test_review_reject_erases_held_identity(family):
    family.store_enrollment("smiths/ana", face_payload(ANA), consent_request=consent())
    r = family.store_enrollment("smiths/sis", face_payload(SIB, seed=2),
                                consent_request=consent())
    doc = family.decide_review(r.review_id, accept=False)
    assert doc["status"] == "rejected" and doc["receipt"]["receipt"]["handle"] == "smiths/sis"
    assert [i["handle"] for i in family.list_identities()] == ["smiths/ana"]
    assert family.list_reviews("smiths", status="rejected")[0]["handle"] == "smiths/sis"


def test_reenrollment_merges_photos_and_checks_likeness(family):
    family.store_enrollment("smiths/ana", face_payload(ANA, photos=2),
                            consent_request=consent())
    r = family.store_enrollment("smiths/ana", face_payload(ANA, photos=3, seed=8))
    assert (r.status, r.photos_added) == ("updated", 3)
    art = family.get_artifact("smiths/ana", "face").artifact
    assert art.shapes["normed"] == [5, 512]
    with pytest.raises(PhotoRejected, match="do not look like smiths/ana"):
        family.store_enrollment("smiths/ana", face_payload(BEN, seed=1))
    assert family.get_artifact("smiths/ana", "face").artifact.shapes["normed"] == [5, 512]


def test_held_identity_is_still_caught_as_a_duplicate(family):
    family.store_enrollment("smiths/ana", face_payload(ANA), consent_request=consent())
    held = family.store_enrollment("smiths/sis", face_payload(SIB, seed=2),
                                   consent_request=consent())
    assert held.status == "held"
    with pytest.raises(DuplicateIdentity) as exc:
        family.store_enrollment("smiths/sis2", face_payload(SIB, seed=3),
                                consent_request=consent())
    assert exc.value.handle == "smiths/sis"


def test_existing_identity_takes_no_new_consent(family):
    family.store_enrollment("smiths/ana", face_payload(ANA), consent_request=consent())
    with pytest.raises(InvalidInput, match="takes no new consent"):
        family.store_enrollment("smiths/ana", face_payload(ANA, seed=4),
                                consent_request=consent())


def test_photos_from_another_face_model_cannot_be_vouched_for(family):
    family.store_enrollment("smiths/ana", face_payload(ANA), consent_request=consent())
    with pytest.raises(PhotoRejected, match="another face model"):
        family.store_enrollment("smiths/ana", face_payload(BEN, model_id="antelopev2"))
    assert [a["model_id"] for a in family.describe("smiths/ana")["artifacts"]] == ["buffalo_l"]
