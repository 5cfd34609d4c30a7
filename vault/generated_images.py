"""Generated images the vault stores, and their removal when a person they show is erased.

A generation run as a job (the web API's ``generate`` kind) leaves its signed
PNG at ``<data dir>/outputs/<job id>.png``; the job's result names it
(``result["image"]``, relative to the data dir) and the identities it shows
(``result["identities"]``, handles). Such an image is not identity data in
the vault's sense -- nothing is sealed with the identity's key -- but it is a
likeness of the person made from their enrolled data, so erasing an identity
(on request, on consent withdrawal under the ``immediate`` policy, or when
its retention period ends) removes every stored image that shows it, in the
same transaction that deletes the identity. The job keeps its record, with
``image`` cleared and ``image_removed`` saying when and why; the erasure
receipt counts the images removed.

Images written to a path of the caller's choosing (``idvault generate -o``)
are the caller's, and untouched.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from vault.audit import canonical_time
from vault.models import Job

OUTPUTS = "outputs"


def image_path(data_dir: Path | str, job_id: str) -> Path:
    """Where the image of job ``job_id`` is stored."""
    return Path(data_dir) / OUTPUTS / f"{job_id}.png"


def jobs_showing(s: Session, owner_id: int, handle: str) -> list[Job]:
    """The owner's jobs whose stored image shows ``handle`` (a canonical ``owner/name``)."""
    jobs = s.scalars(select(Job).where(Job.owner_id == owner_id, Job.status == "done")
                     .order_by(Job.created_at, Job.id)).all()
    return [j for j in jobs if isinstance(j.result, dict) and j.result.get("image")
            and handle in (j.result.get("identities") or ())]


def remove_showing(s: Session, data_dir: Path | str, owner_id: int, handle: str, *,
                   reason: str, now: dt.datetime) -> list[str]:
    """Delete the stored images that show ``handle`` and mark their jobs; returns the job
    ids. Files go before the caller commits: should the commit fail, a job may name an
    image that is gone (reads answer NotFound), never the other way round."""
    removed = []
    for job in jobs_showing(s, owner_id, handle):
        image_path(data_dir, job.id).unlink(missing_ok=True)
        result = {k: v for k, v in job.result.items() if k not in ("image", "bytes")}
        result["image_removed"] = {"at": canonical_time(now),
                                   "reason": f"{handle} erased ({reason})"}
        job.result = result  # a new object: the JSON column sees the change
        removed.append(job.id)
    return removed
