"""Adding artifact kinds to an enrolled identity, with photos only where they are needed.

``idvault add-kinds HANDLE [PHOTOS]... --kinds faceid,instantid`` and
``POST /v1/identities/{owner}/{name}/kinds`` run this. An identity enrolled
with ``face`` only can gain ``photomaker``, ``storymaker``, ``faceid`` or
``instantid`` later without being enrolled again:

- **Without photos** (:func:`stored_kinds`, no model loaded): a kind the
  identity already holds is reported as present, unchanged. Every kind
  enrollment computes needs pixels the vault does not keep (it stores no
  photos: :data:`NEEDS` says what each needs), so a kind the identity lacks is
  refused with an error that says so, per kind, and how to pass the photos.
- **With photos** (:func:`add_kinds`): the photos are analysed like an
  enrollment's (every photo one usable face, one error for all rejections), then
  each must show the identity: its best cosine similarity to the identity's
  stored ``face`` embeddings (same face model) must reach the vault's review
  threshold, or nothing is stored and the error names each photo that failed.
  Only then do the slow encoders run. The photos are used for the new kinds
  only: they are not added to the ``face`` artifact (``idvault enroll`` adds
  photos) and not kept.

Everything that can be checked without the photos is checked before them: the
identity exists, is not held for review, and its consent grants ``enroll``;
every model the kinds need is found and loaded (a missing file is named with
the folders searched); and an artifact of the same kind and model id is
**refused** (Conflict) unless ``replace`` is given: adding is not recomputing,
and a ``faceid`` artifact chosen from four good photos should not silently
give way to one from a single snapshot. With ``replace`` it is replaced and the
audit event names the artifact it replaced.

The new artifacts are sealed and stored in one transaction
(:meth:`vault.vault.Vault.put_artifacts`), audited as ``artifact.write`` each and
one ``enroll`` event (status ``kinds_added``, the number of photos checked).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vault import identities
from vault.artifact_kinds import ENROLL_KINDS
from vault.consent import check_use
from vault.errors import Conflict, InvalidInput, PhotoRejected
from vault.handles import Handle
from vault.vault import StoredArtifact, Vault

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from encoders.enrollment import Enroller, Progress
    from encoders.face.analyzer import PhotoInput, Pick

ADDABLE_KINDS = tuple(k for k in ENROLL_KINDS if k != "face")
# What each kind is computed from that the vault does not keep.
NEEDS: dict[str, str] = {
    "photomaker": "PhotoMaker's CLIP ViT-L/14 features of each photo (v2: also the photo's "
                  "raw ArcFace embedding)",
    "storymaker": "StoryMaker's aligned face crop and character crop of a reference photo",
    "faceid": "the CLIP ViT-H/14 features of each photo's 224 px aligned face crop",
    "instantid": "antelopev2's raw embedding of each photo and the reference photo's "
                 "keypoints, face box and size",
}


def parse_kinds(kinds: Sequence[str]) -> list[str]:
    """The kinds to add, in order, each once; ``face`` and unknown kinds refused."""
    out = list(dict.fromkeys(k.strip() for k in kinds if k and k.strip()))
    wrong = [k for k in out if k not in ADDABLE_KINDS]
    if not out or wrong:
        hint = ("; 'face' comes with enrollment (`idvault enroll HANDLE PHOTO...` adds photos "
                "to it)" if "face" in wrong else "")
        raise InvalidInput(f"kinds to add: one or more of {', '.join(ADDABLE_KINDS)} (got "
                           f"{', '.join(out) or 'none'}){hint}")
    return out


@dataclass(frozen=True)
class KindsReport:
    """What adding kinds did."""

    handle: str
    status: str  # added | unchanged
    kinds: list[str]  # asked for
    artifacts: list[StoredArtifact]  # stored now
    present: dict[str, list[str]]  # asked for and already held (no photos given): model ids
    photos: list[dict]  # per photo checked: PhotoSummary fields + "similarity"
    threshold: float | None  # the similarity each photo had to reach
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"handle": self.handle, "status": self.status, "kinds": self.kinds,
                "artifacts": [{"id": a.id, "kind": a.kind, "model_id": a.model_id,
                               "size": a.size, "replaced": a.replaced}
                              for a in self.artifacts],
                "present": self.present, "photos": self.photos, "threshold": self.threshold,
                "timings": {k: round(v, 4) for k, v in self.timings.items()}}


def held_kinds(vault: Vault, handle: str) -> tuple[str, dict[str, list[str]]]:
    """``(handle, {kind: [model ids]})`` of an identity whose artifacts may be added to.

    Raises NotFound, Conflict (held for review) or a ConsentError (consent does
    not grant ``enroll``) before anything else happens.
    """
    with vault.session(read_only=True) as s:
        identity = identities.get_identity(s, Handle.parse(handle))
        check_use(identity.consent, "enroll")
        if identity.status == "held":
            raise Conflict(f"{identity.handle} is held for review; accept or reject it first "
                           "(`idvault review list`)")
        held: dict[str, list[str]] = {}
        for a in identity.artifacts:
            held.setdefault(a.kind, []).append(a.model_id)
        return identity.handle, {k: sorted(v) for k, v in held.items()}


def needs_photos_error(handle: str, missing: Sequence[str]) -> InvalidInput:
    """The refusal for kinds that cannot be made from what the vault holds."""
    lines = "\n".join(f"  - {k}: needs {NEEDS[k]}" for k in missing)
    owner, _, name = handle.partition("/")
    return InvalidInput(
        f"{handle} has no {', '.join(missing)} artifact and the vault keeps no photos to "
        f"compute {'it' if len(missing) == 1 else 'them'} from:\n{lines}\n"
        f"Pass photos of {handle}; they are checked against its enrolled face, used for "
        f"these kinds only, and not kept: `idvault add-kinds {handle} PHOTO... --kinds "
        f"{','.join(missing)}` (API: POST /v1/identities/{owner}/{name}/kinds with the "
        f"photos in the multipart field 'photos')",
        needs_photos={k: NEEDS[k] for k in missing})


def stored_kinds(vault: Vault, handle: str, kinds: Sequence[str], *,
                 replace: bool = False) -> KindsReport:
    """Adding kinds without photos: what the vault holds suffices, or the clear error.

    Loads no model (an API node without models answers it too).
    """
    kinds = parse_kinds(kinds)
    handle, held = held_kinds(vault, handle)
    if replace:
        raise InvalidInput(f"replacing {', '.join(kinds)} recomputes them from photos; pass "
                           f"photos of {handle}")
    missing = [k for k in kinds if k not in held]
    if missing:
        raise needs_photos_error(handle, missing)
    return KindsReport(handle, "unchanged", kinds, [], {k: held[k] for k in kinds}, [], None)


def add_kinds(enroller: Enroller, handle: str, kinds: Sequence[str],
              photos: Sequence[PhotoInput] = (), *, names: Sequence[str] | None = None,
              pick: Pick = None, masks: dict[str, np.ndarray] | None = None,
              cloth: np.ndarray | None = None, replace: bool = False,
              progress: Progress | None = None, actor: str | None = None,
              finish: Callable[[Session, KindsReport], None] | None = None) -> KindsReport:
    """Add ``kinds`` to the enrolled ``handle``; photos where the vault's data does not
    suffice (see the module docstring). ``finish`` runs in the store's transaction."""
    from encoders.enrollment import PhotoSummary, photo_label

    if not photos:
        if masks or cloth is not None:
            raise InvalidInput("masks and a cloth image go with photos")
        return stored_kinds(enroller.vault, handle, kinds, replace=replace)
    kinds = parse_kinds(kinds)
    handle, held = held_kinds(enroller.vault, handle)
    labels = list(names) if names is not None else [photo_label(p, i) for i, p in
                                                          enumerate(photos)]
    unknown_masks = sorted(set(masks or {}) - set(labels))
    if unknown_masks:
        raise InvalidInput(f"masks given for photos not given: {', '.join(unknown_masks)}")
    if enroller.model_id not in held.get("face", []):
        raise InvalidInput(
            f"cannot check these photos against {handle}: it has no face artifact of this "
            f"face model ({enroller.model_id}; it has {', '.join(held.get('face', [])) or 'none'})"
            "; use the pack it was enrolled with (--pack)")
    enroller.load_encoders(kinds)  # a missing model fails here, before any photo
    planned = {k: enroller.kind_model_id(k) for k in kinds}
    clash = [k for k, m in planned.items() if m in held.get(k, [])]
    if clash and not replace:
        raise Conflict(
            f"{handle} already holds " + ", ".join(f"{k} for model {planned[k]}" for k in clash)
            + "; recompute " + ("it" if len(clash) == 1 else "them") + " from these photos "
            "with --replace (API: replace=true), or leave " + ("it" if len(clash) == 1 else
                                                              "them") + " out", kinds=clash)
    t0 = time.perf_counter()
    images, results = enroller.analyze(photos, names=labels, pick=pick, progress=progress)
    scores = _resemblance(enroller, handle, results, actor)  # (photos,) best per photo
    threshold = enroller.vault.settings.dedupe_review
    unlike = {labels[i]: (f"{labels[i]}: does not look like {handle} (best similarity "
                          f"{s:.3f} to its enrolled photos, below {threshold:.2f})")
              for i, s in enumerate(scores) if s < threshold}
    if unlike:
        lines = "\n".join(f"  - {why}" for why in unlike.values())
        raise PhotoRejected(f"{len(unlike)} of {len(labels)} photos do not show {handle} "
                            f"(nothing was stored):\n{lines}", photos=unlike)
    t1 = time.perf_counter()
    payloads = enroller.encode_kinds(kinds, images, results, labels, masks=masks or {},
                                     cloth=cloth, progress=progress)
    t2 = time.perf_counter()
    checked = [{**PhotoSummary(labels[i], r.faces_found, r.face_index, r.det_score, r.face_px,
                               r.blur).to_json(), "similarity": round(float(scores[i]), 4)}
               for i, r in enumerate(results)]
    timings = {"analyse_verify": t1 - t0, "encode": t2 - t1}

    def report(stored: list[StoredArtifact], **more: float) -> KindsReport:
        return KindsReport(handle, "added", kinds, stored, {}, checked, threshold,
                           {**timings, **more})

    if progress:
        progress("seal and store", 0, 1)
    stored = enroller.vault.put_artifacts(
        handle, [payloads[k] for k in kinds], replace=replace, actor=actor,
        enroll_details={"status": "kinds_added", "photos": 0, "photos_checked": len(labels),
                        "model_id": enroller.model_id, "replace": replace},
        finish=None if finish is None else lambda s, r: finish(s, report(r)))
    if progress:
        progress("seal and store", 1, 1)
    return report(stored, seal_store=time.perf_counter() - t2)


def _resemblance(enroller: Enroller, handle: str, results: Sequence[object],
                 actor: str | None) -> np.ndarray:
    """Each photo's best cosine similarity to the identity's enrolled face embeddings.

    The decrypting read is audited (purpose ``enroll``); the embeddings live only
    in this call.
    """
    stored = enroller.vault.get_artifact(handle, "face", model_id=enroller.model_id,
                                         purpose="enroll", actor=actor)
    enrolled = stored.artifact.tensors["normed"]  # (enrolled photos, 512)
    new = np.stack([r.normed for r in results])  # (photos, 512)
    return (new @ enrolled.T).max(axis=1)

