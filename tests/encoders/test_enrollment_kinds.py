"""Adding kinds to an enrolled identity: without photos where the vault's data suffices,
else the clear error; photos checked against the identity before anything is stored."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from encoders.enrollment import Enroller
from encoders.enrollment_kinds import NEEDS, add_kinds, stored_kinds
from encoders.standins.synthetic_faces import synthetic_face
from tests.helpers import consent
from vault.errors import Conflict, ConsentError, InvalidInput, ModelUnavailable, PhotoRejected
from vault.models import AuditEvent


@pytest.fixture(scope="module")
def kinds_models(tmp_path_factory):
    """The tiny antelopev2 pack and CLIP ViT-H/14 tower (buffalo_l is the analyzer's)."""
    from encoders.standins.face_pack import write_tiny_face_pack
    from encoders.standins.id_models import write_tiny_clip_vision

    root = tmp_path_factory.mktemp("kinds_models")
    write_tiny_face_pack(root / "models" / "antelopev2", pack="antelopev2")
    write_tiny_clip_vision(root / "clip-vit-h-14", seed=5)
    return root


@pytest.fixture
def enroller(family, analyzer, kinds_models, one_torch_thread):
    return Enroller(family, analyzer, kinds_models)


def photos(person, n, start=0):
    return [synthetic_face(person, start + i) for i in range(n)]


def _events(vault, action):
    with vault.session(read_only=True) as s:
        return [(e.subject, e.details) for e in
                s.scalars(select(AuditEvent).where(AuditEvent.action == action)
                          .order_by(AuditEvent.seq))]


def _artifacts(vault, handle):
    return {(a["kind"], a["model_id"]): a["id"] for a in vault.describe(handle)["artifacts"]}


def test_without_photos_a_missing_kind_says_what_it_needs(enroller, family):
    enroller.enroll("smiths/ana", photos(1, 2), consent=consent())
    before = _artifacts(family, "smiths/ana")
    with pytest.raises(InvalidInput) as exc:
        add_kinds(enroller, "smiths/ana", ["faceid", "instantid"])
    message = str(exc.value)
    assert "vault keeps no photos" in message
    assert NEEDS["faceid"] in message and NEEDS["instantid"] in message
    assert "idvault add-kinds smiths/ana PHOTO... --kinds faceid,instantid" in message
    assert "POST /v1/identities/smiths/ana/kinds" in message
    assert set(exc.value.details["needs_photos"]) == {"faceid", "instantid"}
    assert _artifacts(family, "smiths/ana") == before


def test_without_photos_kinds_already_held_are_reported_unchanged(enroller, family):
    enroller.enroll("smiths/ana", photos(1, 2), consent=consent(), kinds=["face", "faceid"])
    report = stored_kinds(family, "smiths/ana", ["faceid"])
    assert report.status == "unchanged" and report.artifacts == []
    assert report.present == {"faceid": [enroller.kind_model_id("faceid")]}
    with pytest.raises(InvalidInput, match="no instantid artifact"):
        stored_kinds(family, "smiths/ana", ["faceid", "instantid"])
    with pytest.raises(InvalidInput, match="recomputes them from photos"):
        stored_kinds(family, "smiths/ana", ["faceid"], replace=True)


def test_another_persons_photos_are_refused_before_the_encoders_run(enroller, family,
                                                                    monkeypatch):
    enroller.enroll("smiths/ana", photos(1, 2), consent=consent())
    before = _artifacts(family, "smiths/ana")
    monkeypatch.setattr(enroller, "encode_kinds", lambda *a, **k: pytest.fail("encoded"))
    with pytest.raises(PhotoRejected) as exc:
        add_kinds(enroller, "smiths/ana", ["faceid", "instantid"],
                  [synthetic_face(1, 5), synthetic_face(2, 0)], names=["ana.png", "ben.png"])
    assert set(exc.value.details["photos"]) == {"ben.png"}
    assert "does not look like smiths/ana" in str(exc.value)
    assert _artifacts(family, "smiths/ana") == before
    assert [d["status"] for _, d in _events(family, "enroll")] == ["active"]


def test_the_right_photos_add_the_kinds_sealed_and_audited(enroller, family):
    enroller.enroll("smiths/ana", photos(1, 2), consent=consent())
    face_before = family.get_artifact("smiths/ana", "face")
    seen = []
    report = add_kinds(enroller, "smiths/ana", ["faceid", "instantid"], photos(1, 3, start=10),
                       actor="test:add", progress=lambda *a: seen.append(a))
    assert report.status == "added" and [a.kind for a in report.artifacts] == ["faceid",
                                                                             "instantid"]
    assert len(report.photos) == 3
    assert all(p["similarity"] >= report.threshold for p in report.photos)
    assert ("computing faceid", 1, 1) in seen and ("computing instantid", 1, 1) in seen
    faceid = family.get_artifact("smiths/ana", "faceid").artifact
    instantid = family.get_artifact("smiths/ana", "instantid").artifact
    assert faceid.shapes["normed"] == [3, 512] and instantid.shapes["embeddings"] == [3, 512]
    # The photos were used for the kinds only: the face artifact is the one enrolled.
    face_after = family.get_artifact("smiths/ana", "face")
    assert face_after.id == face_before.id and face_after.payload == face_before.payload
    writes = [d for s, d in _events(family, "artifact.write") if d["kind"] != "face"]
    assert [d["kind"] for d in writes] == ["faceid", "instantid"]
    enroll = _events(family, "enroll")[-1]
    assert enroll[0] == "smiths/ana"
    assert enroll[1]["status"] == "kinds_added" and enroll[1]["photos_checked"] == 3
    assert enroll[1]["kinds"] == ["faceid", "instantid"]
    # The check decrypted the enrolled face for 'enroll': audited like any read.
    reads = [d for _, d in _events(family, "artifact.read") if d["purpose"] == "enroll"]
    assert [d["kind"] for d in reads] == ["face"]


def test_an_existing_kind_of_the_same_model_is_refused_unless_replaced(enroller, family,
                                                                       monkeypatch):
    enroller.enroll("smiths/ana", photos(1, 2), consent=consent(), kinds=["face", "faceid"])
    old = _artifacts(family, "smiths/ana")
    analysed = []
    original = enroller.analyze
    monkeypatch.setattr(enroller, "analyze", lambda *a, **k: analysed.append(1) or
                        original(*a, **k))
    with pytest.raises(Conflict, match="already holds faceid"):
        add_kinds(enroller, "smiths/ana", ["instantid", "faceid"], photos(1, 1, start=20))
    assert analysed == [] and _artifacts(family, "smiths/ana") == old
    report = add_kinds(enroller, "smiths/ana", ["faceid"], photos(1, 1, start=20),
                       replace=True)
    key = ("faceid", enroller.kind_model_id("faceid"))
    assert report.artifacts[0].replaced == old[key]
    new = _artifacts(family, "smiths/ana")
    assert new[key] != old[key] and len(new) == len(old)
    assert family.get_artifact("smiths/ana", "faceid").artifact.shapes["normed"] == [1, 512]


def test_missing_models_are_refused_before_any_photo_is_analysed(family, analyzer, tmp_path,
                                                                 monkeypatch):
    enroller = Enroller(family, analyzer, tmp_path / "none")
    enroller.enroll("smiths/ana", photos(1, 1), consent=consent())
    monkeypatch.setattr(enroller, "analyze", lambda *a, **k: pytest.fail("analysed"))
    with pytest.raises(ModelUnavailable, match="glintr100.onnx"):
        add_kinds(enroller, "smiths/ana", ["instantid"], photos(1, 1, start=3))
    with pytest.raises(ModelUnavailable, match="clip-vit-h-14"):
        add_kinds(enroller, "smiths/ana", ["faceid"], photos(1, 1, start=3))


def test_kind_consent_and_hold_checks_come_before_the_photos(enroller, family, monkeypatch):
    analysed = []
    original = enroller.analyze
    monkeypatch.setattr(enroller, "analyze", lambda *a, **k: analysed.append(1) or
                        original(*a, **k))
    enroller.enroll("northlight/ana", photos(1, 2), consent=consent())
    enroller.enroll("smiths/cleo", photos(3, 3), consent=consent())
    held = enroller.enroll("smiths/dan", [synthetic_face(4, i, kin=(3, 0.4)) for i in range(3)],
                           consent=consent())
    assert held.status == "held"
    analysed.clear()
    with pytest.raises(InvalidInput, match="'face' comes with enrollment"):
        add_kinds(enroller, "smiths/cleo", ["face"], photos(3, 1))
    with pytest.raises(InvalidInput, match="kinds to add"):
        add_kinds(enroller, "smiths/cleo", ["dreambooth"], photos(3, 1))
    with pytest.raises(Conflict, match="held for review"):
        add_kinds(enroller, "smiths/dan", ["instantid"], photos(4, 1))
    family.withdraw_consent("northlight/ana")  # the studio retains: the identity stays
    with pytest.raises(ConsentError, match="withdrawn"):
        add_kinds(enroller, "northlight/ana", ["instantid"], photos(1, 1, start=4))
    with pytest.raises(ConsentError, match="withdrawn"):
        stored_kinds(family, "northlight/ana", ["instantid"])
    assert analysed == []
    assert np.isfinite(held.top_match["score"])
