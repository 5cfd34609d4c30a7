"""The ``enroll`` job kind, run in this process as a worker runs it: photos staged sealed
under a new identity's key, enrolled with the job marked done in the enrollment's own
transaction; a refused or cancelled enrollment leaves no key and no staged photo."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

import encoders.enrollment_job as enrollment_job
from encoders.standins.synthetic_faces import synthetic_face
from tests.helpers import consent
from vault import staged_photos
from vault.jobs import JobQueue
from vault.models import Job


def _photos(person: int, n: int = 2) -> list[bytes]:
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(synthetic_face(person, i)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture
def queue(family, tiny_pack_dir: Path):
    sent: list[tuple] = []
    q = JobQueue(family, dispatch=lambda *job: sent.append(job))
    q.models_dir = tiny_pack_dir.parents[1]  # the models folder holding models/buffalo_l
    q.sent = sent
    return q


def _submit(queue, handle: str, person: int) -> tuple[dict, str]:
    import uuid

    uid = str(uuid.uuid4())
    staged = staged_photos.stage(queue.vault, handle, _photos(person), names=["a", "b"],
                                 actor="test", purpose="enroll", uid=uid)
    job = queue.submit(handle.split("/")[0], enrollment_job.KIND, {
        "handle": handle, "staged": staged.to_json(), "kinds": ["face"], "pick": None,
        "uid": uid, "consent": consent().to_dict()}, actor="test")
    return job, uid


def _run(queue, job_id: str) -> dict:
    verdict, claimed = queue.claim_job(job_id)
    assert verdict == "run", (verdict, claimed)
    queue.run_job(claimed)
    return queue.get(job_id)


def test_an_enrollment_job_stores_the_identity_and_its_result_together(queue) -> None:
    job, uid = _submit(queue, "smiths/ana", 1)
    assert queue.sent == [(job["id"], "enroll", "cpu")]  # face only: a cpu worker's
    assert queue.kind("enroll").queue_for({"kinds": ["face", "photomaker"]}) == "gpu"
    done = _run(queue, job["id"])
    assert done["status"] == "done" and done["result"]["status"] == "active"
    assert done["result"]["handle"] == "smiths/ana" and len(done["result"]["photos"]) == 2
    assert queue.vault.describe("smiths/ana")["id"] == uid  # sealed under the staged key
    assert not (Path(queue.vault.settings.data_dir) / "staged" / uid).exists()
    assert queue.claim_job(job["id"]) == ("ended", "done")  # delivered again: nothing to do


def test_a_refused_or_cancelled_new_identity_leaves_no_key_and_no_photo(queue) -> None:
    assert _run(queue, _submit(queue, "smiths/ana", 1)[0]["id"])["status"] == "done"
    twin, uid = _submit(queue, "smiths/annie", 1)  # the same person again
    failed = _run(queue, twin["id"])
    assert failed["status"] == "failed" and "match smiths/ana" in failed["error"]
    assert uid not in queue.vault.keys.dek_uids()
    assert not (Path(queue.vault.settings.data_dir) / "staged" / uid).exists()

    waiting, uid = _submit(queue, "smiths/ben", 2)
    queue.cancel(waiting["id"])
    assert uid not in queue.vault.keys.dek_uids()
    assert not (Path(queue.vault.settings.data_dir) / "staged" / uid).exists()
    with queue.vault.session(read_only=True) as s:
        assert s.scalar(select(Job.status).where(Job.id == waiting["id"])) == "cancelled"


def test_the_params_are_checked_before_anything_runs(queue) -> None:
    from vault.errors import InvalidInput

    with pytest.raises(InvalidInput, match="uid and consent"):
        enrollment_job.validate({"handle": "smiths/ana", "staged": {
            "id": "0" * 32, "names": ["a"], "sha256": ["0" * 64]}, "uid": "not-a-uid"})
    with pytest.raises(InvalidInput, match="kinds"):
        enrollment_job.validate({"handle": "smiths/ana", "kinds": ["celeb_basis"],
                                 "staged": {"id": "0" * 32, "names": ["a"],
                                            "sha256": ["0" * 64]}})
    assert queue.kind("enroll").trusted_params  # never built by POST /v1/jobs


@pytest.fixture
def kinds_queue(family, tiny_pack_dir: Path, tmp_path: Path):
    """A queue whose models folder holds buffalo_l and the antelopev2 pack (InstantID)."""
    import shutil

    from encoders.standins.face_pack import write_tiny_face_pack

    shutil.copytree(tiny_pack_dir, tmp_path / "models" / "models" / "buffalo_l")
    write_tiny_face_pack(tmp_path / "models" / "models" / "antelopev2", pack="antelopev2")
    q = JobQueue(family, dispatch=lambda *job: q.sent.append(job))
    q.models_dir, q.sent = tmp_path / "models", []
    return q


def test_kinds_are_routed_by_what_their_encoders_run_on(queue) -> None:
    kind = queue.kind("enroll")
    assert kind.queue_for({"kinds": ["face", "instantid"]}) == "cpu"  # ONNX only
    assert kind.queue_for({"kinds": ["face", "faceid"]}) == "gpu"  # the CLIP ViT-H/14 tower
    assert kind.queue_for({"kinds": ["instantid"], "mode": "add_kinds"}) == "cpu"


def test_an_add_kinds_job_checks_its_photos_and_stores_with_its_result(kinds_queue) -> None:
    from vault.errors import InvalidInput

    job, _ = _submit(kinds_queue, "smiths/ana", 1)
    assert _run(kinds_queue, job["id"])["status"] == "done"
    face_before = kinds_queue.vault.get_artifact("smiths/ana", "face").id

    def add(person: int) -> dict:
        staged = staged_photos.stage(kinds_queue.vault, "smiths/ana", _photos(person, 1),
                                     names=["x.png"], actor="test", purpose="enroll")
        return kinds_queue.submit("smiths", enrollment_job.KIND, {
            "handle": "smiths/ana", "staged": staged.to_json(), "kinds": ["instantid"],
            "pick": None, "mode": "add_kinds", "replace": False}, identity="smiths/ana",
            actor="test")

    wrong = _run(kinds_queue, add(2)["id"])
    assert wrong["status"] == "failed" and "does not look like smiths/ana" in wrong["error"]
    done = _run(kinds_queue, add(1)["id"])
    assert done["status"] == "done" and done["result"]["status"] == "added"
    assert [a["kind"] for a in done["result"]["artifacts"]] == ["instantid"]
    assert kinds_queue.sent[-1][2] == "cpu"
    assert kinds_queue.vault.get_artifact("smiths/ana", "instantid").artifact.shapes[
        "embeddings"] == [1, 512]
    assert kinds_queue.vault.get_artifact("smiths/ana", "face").id == face_before
    with pytest.raises(InvalidInput, match="'face' comes with enrollment"):
        enrollment_job.validate({"handle": "smiths/ana", "mode": "add_kinds",
                                 "kinds": ["face"], "staged": done["params"]["staged"]})
    with pytest.raises(InvalidInput, match="goes with mode 'add_kinds'"):
        enrollment_job.validate({"handle": "smiths/ana", "kinds": ["face"], "replace": True,
                                 "staged": done["params"]["staged"]})
