"""The enrollment flow with the tiny face pack: photos in, identities out."""

import numpy as np
import pytest

from encoders.enrollment import Enroller, face_model_id
from encoders.standins.synthetic_faces import SyntheticFace, synthetic_face, synthetic_photo
from tests.helpers import consent
from vault.errors import DuplicateIdentity, InvalidInput, PhotoRejected


@pytest.fixture
def enroller(family, analyzer):
    return Enroller(family, analyzer)


def photos(person, n, start=0):
    return [synthetic_face(person, start + i) for i in range(n)]


def test_enroll_stores_face_artifact_tied_to_the_weights(enroller, family):
    report = enroller.enroll("smiths/ana", photos(1, 3), consent=consent())
    assert report.status == "active" and len(report.photos) == 3
    assert all(p.faces_found == 1 and p.det_score > 0.6 for p in report.photos)
    art = family.get_artifact("smiths/ana", "face").artifact
    assert art.shapes == {"embeddings": [3, 512], "normed": [3, 512], "mean": [512]}
    assert art.model_id == face_model_id(enroller.analyzer)
    assert art.model_id.startswith("buffalo_l/w600k_r50.onnx@")
    np.testing.assert_allclose(np.linalg.norm(art.tensors["normed"], axis=1), 1, atol=1e-5)


def test_an_enrollments_photos_share_one_recogniser_run(enroller, family, monkeypatch):
    five = photos(6, 5)
    singles = [enroller.analyzer.analyze(p).embedding for p in five]
    recognizer = enroller.analyzer.models.recognizer
    runs: list[int] = []
    original = recognizer.get_feat
    monkeypatch.setattr(recognizer, "get_feat", lambda crops: runs.append(len(crops)) or
                        original(crops))
    enroller.enroll("smiths/fay", five, consent=consent())
    assert runs == [5]  # detected one by one, embedded together
    stored = family.get_artifact("smiths/fay", "face").artifact.tensors["embeddings"]
    # A batch of five and five batches of one may sum in another order:
    # float32 rounding only, orders of magnitude below 1e-5 relative.
    np.testing.assert_allclose(stored, np.stack(singles), rtol=1e-5, atol=1e-6)


def test_duplicate_blocked_with_handle_and_score(enroller, family):
    enroller.enroll("smiths/ana", photos(1, 2), consent=consent())
    with pytest.raises(DuplicateIdentity) as exc:
        enroller.enroll("smiths/annie", photos(1, 1, start=7), consent=consent())
    assert exc.value.handle == "smiths/ana" and exc.value.score > 0.9
    assert [i["handle"] for i in family.list_identities("smiths")] == ["smiths/ana"]


def test_a_bad_photo_stores_nothing_and_every_problem_is_listed(enroller, family):
    two = synthetic_photo([SyntheticFace(2, center=(0.3, 0.5), radius=0.2),
                           SyntheticFace(3, center=(0.72, 0.5), radius=0.2)], 5, (256, 400))
    blank = synthetic_photo([], 6, 256)
    with pytest.raises(PhotoRejected) as exc:
        enroller.enroll("smiths/ben", [synthetic_face(2, 0), two, blank, b"junk"],
                        names=["ok.jpg", "two.png", "blank.png", "junk.bin"], consent=consent())
    rejected = exc.value.details["photos"]
    assert set(rejected) == {"two.png", "blank.png", "junk.bin"}
    assert "found 2 faces" in rejected["two.png"] and "no face" in rejected["blank.png"]
    assert family.list_identities() == []
    # Picking the larger face makes the two-person photo usable.
    report = enroller.enroll("smiths/ben", [synthetic_face(2, 0), two], pick="largest",
                             consent=consent())
    assert report.photos[1].faces_found == 2


def test_reenrollment_updates_embeddings_and_index(enroller, family):
    enroller.enroll("smiths/ana", photos(1, 2), consent=consent())
    report = enroller.enroll("smiths/ana", photos(1, 2, start=10))
    assert (report.status, len(report.photos)) == ("updated", 2)
    assert family.get_artifact("smiths/ana", "face").artifact.shapes["normed"] == [4, 512]
    with pytest.raises(PhotoRejected, match="do not look like smiths/ana"):
        enroller.enroll("smiths/ana", photos(4, 1))


def test_verify_and_search_then_delete_removes_from_search(enroller, family):
    enroller.enroll("smiths/ana", photos(1, 2), consent=consent())
    enroller.enroll("smiths/ben", photos(2, 2), consent=consent())
    same = enroller.verify("smiths/ana", synthetic_face(1, 30))
    other = enroller.verify("smiths/ana", synthetic_face(2, 30))
    assert same["decision"] == "same" and other["decision"] == "different"
    assert len(same["scores"]) == 2
    found = enroller.search("smiths", synthetic_face(2, 31))["matches"]
    assert found[0]["handle"] == "smiths/ben" and found[0]["decision"] == "block"
    family.delete_identity("smiths/ben")
    found = enroller.search("smiths", synthetic_face(2, 31))["matches"]
    assert [m["handle"] for m in found] == ["smiths/ana"] and found[0]["decision"] == "new"


def test_only_known_kinds(enroller):
    with pytest.raises(InvalidInput, match="enrollment computes these kinds: face"):
        enroller.enroll("smiths/ana", photos(1, 1), consent=consent(),
                        kinds=["face", "dreambooth"])


def test_progress_is_reported(enroller):
    seen = []
    enroller.enroll("smiths/ana", photos(1, 3), consent=consent(),
                    progress=lambda stage, done, total: seen.append((stage, done, total)))
    assert ("analysing photos", 3, 3) in seen and ("dedupe and store", 1, 1) in seen


def test_twin_is_held_for_review_then_accepted(enroller, family):
    enroller.enroll("smiths/cleo", photos(3, 3), consent=consent())
    twin = [synthetic_face(4, i, kin=(3, 0.4)) for i in range(3)]
    held = enroller.enroll("smiths/dan", twin, consent=consent())
    assert held.status == "held" and held.top_match["handle"] == "smiths/cleo"
    assert 0.5 <= held.top_match["score"] < 0.7
    family.decide_review(held.review_id, accept=True)
    more = enroller.enroll("smiths/dan", [synthetic_face(4, 9, kin=(3, 0.4))])
    assert more.status == "updated"  # the twin pair is no longer flagged


@pytest.fixture(scope="module")
def id_models(tmp_path_factory):
    from encoders.standins.id_models import write_tiny_id_models

    root = tmp_path_factory.mktemp("id_models")
    write_tiny_id_models(root)
    return root


def test_photomaker_and_storymaker_artifacts(family, analyzer, id_models):
    enroller = Enroller(family, analyzer, id_models)
    mask = np.zeros((256, 256), np.uint8)
    mask[30:250, 50:210] = 255
    report = enroller.enroll("smiths/ana", photos(1, 2), names=["a.png", "b.png"],
                             consent=consent(), kinds=["face", "photomaker", "storymaker"],
                             masks={"b.png": mask})
    assert [a.kind for a in report.artifacts] == ["face", "photomaker", "storymaker"]
    pm = family.get_artifact("smiths/ana", "photomaker").artifact
    assert pm.shapes == {"id_embeds": [2, 2, 2048]} and pm.metadata["version"] == "v2"
    assert pm.model_id == enroller.encoder("photomaker").model_id
    sm = family.get_artifact("smiths/ana", "storymaker").artifact
    assert sm.shapes == {"tokens": [20, 2048]}
    assert (sm.metadata["crop"], sm.metadata["reference_photo"]) == ("mask", "b.png")
    # Adding a photo appends its PhotoMaker embedding; StoryMaker keeps one reference.
    enroller.enroll("smiths/ana", photos(1, 1, start=5), kinds=["face", "photomaker"])
    pm2 = family.get_artifact("smiths/ana", "photomaker").artifact
    assert pm2.shapes["id_embeds"] == [3, 2, 2048]
    np.testing.assert_array_equal(pm2.tensors["id_embeds"][:2], pm.tensors["id_embeds"])


def test_missing_checkpoint_fails_before_any_work(family, analyzer, tmp_path):
    from vault.errors import ModelUnavailable

    enroller = Enroller(family, analyzer, tmp_path / "empty")
    with pytest.raises(ModelUnavailable, match="photomaker"):
        enroller.enroll("smiths/ana", photos(1, 1), consent=consent(),
                        kinds=["face", "photomaker"])
    assert family.list_identities() == []


def test_mask_for_unknown_photo_refused(family, analyzer, id_models):
    enroller = Enroller(family, analyzer, id_models)
    with pytest.raises(InvalidInput, match="masks given for photos not enrolled: z.png"):
        enroller.enroll("smiths/ana", photos(1, 1), names=["a.png"], consent=consent(),
                        kinds=["face", "storymaker"], masks={"z.png": np.ones((4, 4))})


def test_storymaker_and_faceid_share_one_clip_tower(family, analyzer, id_models,
                                                    one_torch_thread):
    enroller = Enroller(family, analyzer, id_models)
    report = enroller.enroll("smiths/ana", photos(1, 2), consent=consent(),
                             kinds=["face", "storymaker", "faceid"])
    assert [a.kind for a in report.artifacts] == ["face", "storymaker", "faceid"]
    tower = enroller.clip_tower()
    assert enroller.encoder("storymaker").tower is tower
    assert enroller.encoder("faceid").tower is tower
    sm = family.get_artifact("smiths/ana", "storymaker").artifact
    fi = family.get_artifact("smiths/ana", "faceid").artifact
    assert sm.model_id.split("+clip@")[1] == fi.metadata["clip_model_id"].split("@")[1]
