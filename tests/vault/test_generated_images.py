"""Stored generated images go with the identities they show: erasure (on request, on consent
withdrawal) deletes each image that shows the identity, marks its job, and counts them in the
signed receipt; other images, other owners' and unfinished jobs are untouched."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from tests.helpers import consent
from vault import generated_images
from vault.models import AuditEvent, Job, Owner


def _identity(vault, handle: str) -> str:
    vault.create_identity(handle, consent(), actor="test")
    return handle


def _scene(vault, owner: str, shows: list[str], *, status: str = "done",
           write: bool = True) -> str:
    """A generate job as the web worker leaves it, with its PNG on disk."""
    with vault.session() as s:
        owner_id = s.scalar(select(Owner.id).where(Owner.name == owner))
        job = Job(owner_id=owner_id, kind="generate", status=status, params={"prompt": "x"})
        s.add(job)
        s.flush()
        job.result = {"image": f"outputs/{job.id}.png", "sha256": "ab" * 32, "bytes": 11,
                      "identities": shows, "seed": 7}
        job_id = job.id
    path = generated_images.image_path(vault.settings.data_dir, job_id)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG scene")
    return job_id


def _job(vault, job_id: str) -> Job:
    with vault.session() as s:
        return s.get(Job, job_id)


def _stored(vault, job_id: str) -> bool:
    return generated_images.image_path(vault.settings.data_dir, job_id).is_file()


def test_erasing_an_identity_removes_the_images_that_show_it(family):
    ana, ben = _identity(family, "smiths/ana"), _identity(family, "smiths/ben")
    _identity(family, "northlight/ana")
    both = _scene(family, "smiths", [ana, ben])
    alone = _scene(family, "smiths", [ana], write=False)  # its file already gone
    other = _scene(family, "smiths", [ben])
    studio = _scene(family, "northlight", ["northlight/ana"])
    running = _scene(family, "smiths", [ana], status="running")

    signed = family.delete_identity(ana, actor="test")

    receipt = family.verify_receipt(signed)
    assert receipt["generated_images_removed"] == 2
    for job_id in (both, alone):
        assert not _stored(family, job_id)
        result = _job(family, job_id).result
        assert "image" not in result and "bytes" not in result
        assert result["image_removed"]["reason"] == "smiths/ana erased (requested)"
        assert result["image_removed"]["at"] == receipt["erased_at"]
        assert result["sha256"] == "ab" * 32 and result["seed"] == 7  # the record stays
    for job_id in (other, studio, running):
        assert _stored(family, job_id)
        assert _job(family, job_id).result["image"] == f"outputs/{job_id}.png"
    with family.session() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.action == "identity.delete")).one()
        assert event.details["generated_images"] == 2
    assert family.verify_audit().ok


def test_withdrawal_that_erases_removes_them_too(family):
    ana = _identity(family, "smiths/ana")
    scene = _scene(family, "smiths", [ana])
    result = family.withdraw_consent(ana, actor="test")  # smiths: erase at once
    assert result["receipt"]["receipt"]["generated_images_removed"] == 1
    assert not _stored(family, scene)
    assert "consent withdrawn" in _job(family, scene).result["image_removed"]["reason"]


def test_withdrawal_under_retain_keeps_them_until_erasure(family):
    ana = _identity(family, "northlight/ana")
    scene = _scene(family, "northlight", [ana])
    family.withdraw_consent(ana, actor="test")  # northlight: kept until retention ends
    assert _stored(family, scene)
    family.delete_identity(ana, actor="test", reason="retention period ended")
    assert not _stored(family, scene)
    assert Path(family.settings.data_dir, "outputs").is_dir()  # only the file went
