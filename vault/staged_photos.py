"""Photos staged for a job: uploaded once, sealed with the identity's data key, removed
when the job ends.

The vault stores no photos; it stores what encoders computed from them. A
personalisation fit (``encoders.fitting.jobs``) is different: it trains on the
photos themselves, and a job may run later, on a worker, and resume after a
crash. Photos uploaded for such a job are therefore *staged*: each one sealed
(AES-256-GCM, :mod:`vault.crypto`) with the identity's own DEK, bound by its
AAD to the vault, the identity, the stage and its position, and written to
``<data dir>/staged/<identity uid>/<stage id>/<n>.sealed``. Erasing the
identity crypto-shreds them with everything else (and removes the folder).

A job names its stage in ``params["staged"]`` (:class:`StagedRef`: the stage
id, the photo names and the SHA-256 of each sealed file; no pixels, no
paths). :mod:`vault.jobs` discards the stage when the job reaches a final
status by any road (done, failed, cancelled while queued); :func:`sweep`
removes stages that no live job names (a server killed between staging and
queueing the job), after a grace period.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from vault import audit, crypto, identities
from vault.errors import InvalidInput, NotFound
from vault.handles import Handle, parse_uid
from vault.models import Job
from vault.private_files import private_dir, write_private

STAGED = "staged"
MAX_PHOTOS = 32
SWEEP_GRACE_SECONDS = 3600.0  # a stage younger than this may be about to be queued
_STAGE_ID = re.compile(r"^[0-9a-f]{32}$")
_UID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


@dataclass(frozen=True)
class StagedRef:
    """What a job's params hold about its staged photos (JSON via :meth:`to_json`)."""

    id: str
    names: tuple[str, ...]
    sha256: tuple[str, ...]

    def to_json(self) -> dict:
        return {"id": self.id, "names": list(self.names), "sha256": list(self.sha256)}

    @classmethod
    def from_json(cls, doc: object) -> StagedRef:
        """Parse ``params["staged"]``; InvalidInput names what is wrong."""
        if not isinstance(doc, dict) or set(doc) != {"id", "names", "sha256"}:
            raise InvalidInput("'staged' must be an object with id, names and sha256 "
                               "(made by staging photos, not written by hand)")
        stage_id, names, digests = doc["id"], doc["names"], doc["sha256"]
        if not isinstance(stage_id, str) or not _STAGE_ID.match(stage_id):
            raise InvalidInput("'staged.id' is not a stage id")
        if (not isinstance(names, list) or not isinstance(digests, list)
                or not 1 <= len(names) == len(digests) <= MAX_PHOTOS
                or not all(isinstance(n, str) and len(n) <= 200 for n in names)
                or not all(isinstance(d, str) and re.fullmatch(r"[0-9a-f]{64}", d)
                           for d in digests)):
            raise InvalidInput(f"'staged' must list 1 to {MAX_PHOTOS} photos, each with a "
                               "name and a SHA-256")
        return cls(stage_id, tuple(names), tuple(digests))


def _root(vault) -> Path:
    return Path(vault.settings.data_dir) / STAGED


def _dir(vault, identity_uid: str, stage_id: str) -> Path:
    # Both parts are checked so no value can walk out of the staging folder.
    if not _UID.match(identity_uid) or not _STAGE_ID.match(stage_id):
        raise InvalidInput("not a stage")
    return _root(vault) / identity_uid / stage_id


def _context(vault, identity_uid: str, stage_id: str, index: int) -> dict:
    return {"vault": str(vault.vault_id), "identity": identity_uid, "stage": stage_id,
            "photo": index, "purpose": "staged-photo"}


def _identity_uid(vault, handle: str | Handle) -> str:
    with vault.session(read_only=True) as s:
        return identities.get_identity(s, handle).uid


def stage(vault, handle: str | Handle, photos: list[bytes], *, names: list[str],
          actor: str, purpose: str = "personalize", uid: str | None = None) -> StagedRef:
    """Seal ``photos`` for a job on ``handle``; returns the reference the job carries.

    The caller checks what the photos are (decodable, within limits) and the
    identity's consent before staging; this only keeps them, sealed, and
    records an audit event (the count, never the photos' digests). ``uid``:
    an identity that does not exist yet (an enrollment job creates it with
    this uid), whose data key is made here.
    """
    if not photos or len(photos) > MAX_PHOTOS:
        raise InvalidInput(f"stage 1 to {MAX_PHOTOS} photos (got {len(photos)})")
    if len(names) != len(photos):
        raise InvalidInput("one name per staged photo")
    h = Handle.parse(str(handle))
    uid = _identity_uid(vault, h) if uid is None else parse_uid(uid)
    stage_id = uuid.uuid4().hex
    folder = _dir(vault, uid, stage_id)
    key_id, dek = vault.keys.get_or_create_dek(uid)
    private_dir(folder)  # and staged/ and staged/<identity> above it: 0700
    digests = []
    try:
        for i, data in enumerate(photos):
            sealed = crypto.seal(dek, bytes(data), key_id=key_id, key_version=1,
                                 context=_context(vault, uid, stage_id, i))
            path = folder / f"{i}.sealed"
            write_private(path, sealed)
            digests.append(hashlib.sha256(sealed).hexdigest())
        with vault.session() as s:
            audit.append(s, "photos.stage", actor=actor, owner=h.owner, subject=str(h),
                         details={"stage": stage_id, "photos": len(photos),
                                  "purpose": purpose})
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return StagedRef(stage_id, tuple(names), tuple(digests))


def load(vault, handle: str | Handle, ref: StagedRef, *,
         uid: str | None = None) -> list[tuple[str, bytes]]:
    """The staged photos of ``ref`` as ``(name, bytes)``, checked and decrypted (``uid``:
    of an identity not created yet, as at :func:`stage`).

    NotFound when the stage is gone (the job ended, or the identity was
    erased); InvalidInput when a file differs from what the job recorded.
    """
    uid = _identity_uid(vault, handle) if uid is None else parse_uid(uid)
    folder = _dir(vault, uid, ref.id)
    if not folder.is_dir():
        raise NotFound(f"the photos staged for this job are gone (stage {ref.id})")
    _, dek = vault.keys.dek(uid)
    out = []
    for i, (name, digest) in enumerate(zip(ref.names, ref.sha256, strict=True)):
        try:
            sealed = (folder / f"{i}.sealed").read_bytes()
        except FileNotFoundError:
            raise NotFound(f"staged photo {name!r} is gone (stage {ref.id})") from None
        if hashlib.sha256(sealed).hexdigest() != digest:
            raise InvalidInput(f"staged photo {name!r} was changed after staging")
        out.append((name, crypto.open_token(dek, sealed,
                                            context=_context(vault, uid, ref.id, i))))
    return out


def discard(vault, identity_uid: str, stage_id: str) -> bool:
    """Remove one stage; True when it existed."""
    try:
        folder = _dir(vault, identity_uid, stage_id)
    except InvalidInput:
        return False
    existed = folder.is_dir()
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # the identity's folder, once it holds no stage
    except OSError:
        pass
    return existed


def discard_identity(vault, identity_uid: str) -> None:
    """Remove every stage of an identity (its erasure; the DEK is already shredded)."""
    if _UID.match(identity_uid):
        shutil.rmtree(_root(vault) / identity_uid, ignore_errors=True)


def staged_uids(vault) -> set[str]:
    """The identity uids that have a staging folder: their data keys seal photos that a
    job may still need, even while no identity row has that uid yet (the orphan-key
    sweep keeps them)."""
    root = _root(vault)
    if not root.is_dir():
        return set()
    return {d.name for d in root.iterdir() if d.is_dir() and _UID.match(d.name)}


def stage_id(params: object) -> str | None:
    """The stage a job's params name, if any (a malformed one names none)."""
    doc = params.get(STAGED) if isinstance(params, dict) else None
    sid = doc.get("id") if isinstance(doc, dict) else None
    return sid if isinstance(sid, str) and _STAGE_ID.match(sid) else None


def staged_uid(params: object) -> str | None:
    """The uid a job's params stage its photos under for an identity it will create."""
    uid = params.get("uid") if isinstance(params, dict) else None
    try:
        return str(uuid.UUID(uid)) if isinstance(uid, str) else None
    except ValueError:
        return None


def sweep(vault, *, grace_seconds: float = SWEEP_GRACE_SECONDS, now: float | None = None) -> int:
    """Remove stages no queued or running job names and older than ``grace_seconds``.

    Returns how many were removed. Stages are discarded when their job ends;
    what is left is the rare orphan of a process killed between staging and
    queueing, or of a job row removed by hand.
    """
    root = _root(vault)
    if not root.is_dir():
        return 0
    with vault.session(read_only=True) as s:
        live = {stage_id(params) for params in s.scalars(select(Job.params).where(
            Job.status.in_(("queued", "running"))))} - {None}
    now = time.time() if now is None else now
    removed = 0
    for identity_dir in root.iterdir():
        if not identity_dir.is_dir():
            continue
        for folder in identity_dir.iterdir():
            if folder.name in live or now - folder.stat().st_mtime < grace_seconds:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        if not any(identity_dir.iterdir()):
            identity_dir.rmdir()
    return removed
