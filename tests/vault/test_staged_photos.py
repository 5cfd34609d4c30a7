"""Staged photos: sealed under the identity's key and bound to their place, read back
checked, and discarded when their job ends by any road, with the identity, or by the
orphan sweep."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.helpers import consent
from vault import staged_photos
from vault.errors import DecryptionError, InvalidInput, NotFound
from vault.jobs import JobContext, JobKind, JobQueue
from vault.models import AuditEvent, Job, JobLease, utcnow

PHOTOS = [b"\xff\xd8 first photo bytes " * 20, b"\x89PNG second photo bytes " * 20]


def _identity(vault, name: str) -> str:
    handle = f"smiths/{name}"
    vault.create_identity(handle, consent(), actor="test")
    return handle


def _folder(vault, ref: staged_photos.StagedRef) -> Path:
    [folder] = list((Path(vault.settings.data_dir) / "staged").glob(f"*/{ref.id}"))
    return folder


def test_stage_seals_and_loads_back(family):
    handle = _identity(family, "ana")
    ref = staged_photos.stage(family, handle, PHOTOS, names=["a.jpg", "b.png"], actor="test")
    folder = _folder(family, ref)
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["0.sealed", "1.sealed"]
    for f, plain in zip(files, PHOTOS, strict=True):
        data = f.read_bytes()
        assert plain[:20] not in data and len(data) > len(plain)
        assert oct(f.stat().st_mode & 0o777) == "0o600"
    assert staged_photos.load(family, handle, ref) == [("a.jpg", PHOTOS[0]),
                                                       ("b.png", PHOTOS[1])]
    assert staged_photos.StagedRef.from_json(ref.to_json()) == ref
    with family.session() as s:
        [event] = s.scalars(select(AuditEvent).where(AuditEvent.action == "photos.stage"))
        assert event.subject == handle and event.details["photos"] == 2
        assert not set(ref.sha256) & set(str(event.details).split("'"))


def test_a_stage_is_bound_to_its_identity_and_its_place(family):
    ana, ben = _identity(family, "ana"), _identity(family, "ben")
    ref = staged_photos.stage(family, ana, PHOTOS, names=["a", "b"], actor="test")
    # Another identity cannot read it (its folder is under ana's uid).
    with pytest.raises(NotFound):
        staged_photos.load(family, ben, ref)
    folder = _folder(family, ref)
    # Swapped files with their digests swapped too: the AAD names each file's place.
    swapped = staged_photos.StagedRef(ref.id, ref.names, (ref.sha256[1], ref.sha256[0]))
    first, second = (folder / "0.sealed").read_bytes(), (folder / "1.sealed").read_bytes()
    (folder / "0.sealed").write_bytes(second)
    (folder / "1.sealed").write_bytes(first)
    with pytest.raises(DecryptionError):
        staged_photos.load(family, ana, swapped)
    # A file changed after staging: refused by its recorded digest.
    with pytest.raises(InvalidInput, match="changed after staging"):
        staged_photos.load(family, ana, ref)
    # A stage moved under another identity: that identity's key cannot open it.
    staged_photos.stage(family, ben, PHOTOS[:1], names=["c"], actor="test")  # ben's DEK
    with family.session() as s:
        from vault import identities

        ben_uid = identities.get_identity(s, ben).uid
    target = folder.parent.parent / ben_uid / ref.id
    shutil.copytree(folder, target)
    (target / "0.sealed").write_bytes(first)
    (target / "1.sealed").write_bytes(second)
    with pytest.raises(DecryptionError):
        staged_photos.load(family, ben, ref)


@pytest.mark.parametrize("doc", [
    None, {}, {"id": "../../etc", "names": ["a"], "sha256": ["0" * 64]},
    {"id": "0" * 32, "names": [], "sha256": []},
    {"id": "0" * 32, "names": ["a"], "sha256": ["xyz"]},
    {"id": "0" * 32, "names": ["a", "b"], "sha256": ["0" * 64]},
    {"id": "0" * 32, "names": ["a"], "sha256": ["0" * 64], "path": "/etc/passwd"},
])
def test_malformed_references_are_refused(doc):
    with pytest.raises(InvalidInput):
        staged_photos.StagedRef.from_json(doc)


def test_erasure_removes_the_stages_and_their_key(family):
    from vault import crypto, identities

    handle = _identity(family, "ana")
    ref = staged_photos.stage(family, handle, PHOTOS, names=["a", "b"], actor="test")
    folder = _folder(family, ref)
    copy = (folder / "0.sealed").read_bytes()  # e.g. in a backup
    with family.session() as s:
        uid = identities.get_identity(s, handle).uid
    _, dek = family.keys.dek(uid)
    context = {"vault": str(family.vault_id), "identity": uid, "stage": ref.id, "photo": 0,
               "purpose": "staged-photo"}
    assert crypto.open_token(dek, copy, context=context) == PHOTOS[0]
    family.delete_identity(handle, actor="test")
    assert not folder.exists() and not folder.parent.exists()
    with pytest.raises(NotFound):  # the copy's key is shredded
        family.keys.dek(uid)


def _staged_kind(log: list) -> JobKind:
    def run(ctx: JobContext) -> dict:
        photos = staged_photos.load(ctx.vault, ctx.identity,
                                    staged_photos.StagedRef.from_json(ctx.params["staged"]))
        log.append([name for name, _ in photos])
        if ctx.params.get("fail"):
            raise InvalidInput("the fit failed")
        return {"photos": len(photos)}

    return JobKind("staged", run, needs_identity=True)


def _submit(vault, q: JobQueue, handle: str, **params) -> tuple[dict, Path]:
    ref = staged_photos.stage(vault, handle, PHOTOS, names=["a", "b"], actor="test")
    job = q.submit("smiths", "staged", {"staged": ref.to_json(), **params}, identity=handle)
    return job, _folder(vault, ref)


@pytest.mark.parametrize("fail", [False, True])
def test_a_job_that_ends_drops_its_stage(family, fail):
    handle = _identity(family, "ana")
    log: list = []
    q = JobQueue(family, registry={"staged": _staged_kind(log)})
    job, folder = _submit(family, q, handle, fail=fail)
    assert q.run_pending() == 1
    assert q.get(job["id"])["status"] == ("failed" if fail else "done")
    assert log == [["a", "b"]] and not folder.exists()


def test_a_cancelled_or_abandoned_job_drops_its_stage(family):
    handle = _identity(family, "ana")
    q = JobQueue(family, registry={"staged": _staged_kind([])}, lease_seconds=0.0,
                 max_attempts=1)
    job, folder = _submit(family, q, handle)
    q.cancel(job["id"], owner="smiths")
    assert not folder.exists()
    # A job whose worker died as often as it may: failed by recover(), stage dropped.
    job, folder = _submit(family, q, handle)
    assert q.claim() is not None  # claimed; the worker then "dies"
    with family.session() as s:
        s.execute(update(JobLease).where(JobLease.job_id == job["id"])
                  .values(heartbeat_at=utcnow().replace(year=2000)))
    assert q.recover() == 1
    assert q.get(job["id"])["status"] == "failed" and not folder.exists()


def test_a_resumed_job_still_finds_its_stage(family):
    handle = _identity(family, "ana")
    log: list = []
    q = JobQueue(family, registry={"staged": _staged_kind(log)}, lease_seconds=0.0)
    job, folder = _submit(family, q, handle)
    assert q.claim() is not None  # the worker dies before running it
    assert q.recover() == 1 and q.get(job["id"])["status"] == "queued"
    assert folder.exists()
    assert q.run_pending() == 1 and log == [["a", "b"]] and not folder.exists()


def test_sweep_removes_only_old_orphans(family):
    handle = _identity(family, "ana")
    q = JobQueue(family, registry={"staged": _staged_kind([])})
    job, live = _submit(family, q, handle)
    orphan_ref = staged_photos.stage(family, handle, PHOTOS, names=["a", "b"], actor="test")
    orphan = _folder(family, orphan_ref)
    young_ref = staged_photos.stage(family, handle, PHOTOS, names=["a", "b"], actor="test")
    young = _folder(family, young_ref)
    old = time.time() - 2 * staged_photos.SWEEP_GRACE_SECONDS
    for folder in (live, orphan):
        os.utime(folder, (old, old))
    assert staged_photos.sweep(family) == 1
    assert live.exists() and young.exists() and not orphan.exists()
    # Once the job is no longer queued or running, its stage is an orphan too.
    with family.session() as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(status="failed"))
    assert staged_photos.sweep(family) == 1 and not live.exists()
