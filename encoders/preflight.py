"""The checks of an enrollment or a fit that need no model, made before any model loads.

``idvault enroll`` and ``idvault personalize`` run these first, so that an unknown
owner or identity, a consent that does not grant the use, a missing consent record,
an unknown artifact kind, a photo that is not a readable image or a base model
folder that is not a diffusers pipeline is reported in well under a second, not
after the face models or torch load (or, for an enrollment, after every photo was
analysed: the vault checks the identity only when it stores the result). Metadata
only and read-only; the vault and the job make the same checks again when they
store or run (the vault may change in between).

Torch-free on purpose; a test runs the commands in a fresh interpreter and checks
that torch was never imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from encoders.photo import check_photo
from vault import identities
from vault.artifact_kinds import ENROLL_KINDS
from vault.consent import ConsentRequest, check_use
from vault.errors import (
    Conflict,
    ConsentError,
    InvalidInput,
    ModelUnavailable,
    NotFound,
    PhotoRejected,
)
from vault.handles import Handle

__all__ = ["check_base_model_folder", "check_enrollment", "check_fit", "check_kinds",
           "check_photos"]


def check_kinds(kinds: Sequence[str]) -> None:
    """``kinds`` are artifact kinds an enrollment computes, ``face`` among them."""
    unknown = [k for k in kinds if k not in ENROLL_KINDS]
    if unknown or "face" not in kinds:
        raise InvalidInput(f"enrollment computes these kinds: {', '.join(ENROLL_KINDS)} "
                           f"(asked for {', '.join(kinds)}); 'face' is always required")


def check_enrollment(vault, handle: str, *, consent: ConsentRequest | None,
                     photos: Sequence[str | Path], kinds: Sequence[str]) -> None:
    """What :meth:`vault.vault.Vault.store_enrollment` would refuse without looking at a
    face (no such owner; a new identity without a consent record, an existing one given
    one, or whose consent does not grant ``enroll``, or held for review), plus unknown
    kinds and unreadable photos."""
    h = Handle.parse(handle)
    check_kinds(kinds)
    with vault.session(read_only=True) as s:
        try:
            identities.enrollment_target(s, h, consent_given=consent is not None)
        except ConsentError as exc:
            raise type(exc)(f"{h}: {exc.message}", handle=str(h), purpose="enroll") from None
    check_photos(photos)


def check_photos(photos: Sequence[str | Path]) -> None:
    """Every photo is a readable image within the limits, from its header (no pixels are
    decoded). Like an enrollment's analysis, one PhotoRejected lists every bad photo."""
    rejected: dict[str, str] = {}
    for i, photo in enumerate(photos):
        try:
            check_photo(photo)
        except PhotoRejected as exc:
            name = Path(photo).name
            rejected[name if name not in rejected else f"{name} ({i + 1})"] = str(exc)
    if not rejected:
        return
    if len(photos) == 1:
        raise PhotoRejected(next(iter(rejected.values())), photos=rejected)
    lines = "\n".join(f"  - {why}" for why in rejected.values())
    raise PhotoRejected(f"{len(rejected)} of {len(photos)} photos rejected (nothing was "
                        f"stored):\n{lines}", photos=rejected)


def check_fit(vault, handle: str, *, kind: str, photos: Sequence[str | Path],
              base_model: str | Path) -> None:
    """What a ``kind`` (``celeb_basis`` / ``lidb``) job would refuse before fitting: an
    unknown identity, one held for review or whose consent does not grant
    ``personalize``, for Celeb Basis one without a ``face`` artifact (its mapper reads the
    mean face embedding), a photo that is not a readable image, a base model folder that
    is not a diffusers pipeline."""
    h = Handle.parse(handle)
    with vault.session(read_only=True) as s:
        identity = identities.get_identity(s, h)
        if identity.status == "held":
            raise Conflict(f"{h} is held for review and cannot be used until the review is "
                           "decided (`idvault review list`)")
        _check_use(h, identity.consent, "personalize")
        if kind == "celeb_basis" and not any(a.kind == "face" for a in identity.artifacts):
            raise NotFound(f"{h} has no face artifact: enroll photos of it first (Celeb "
                           "Basis starts from its mean face embedding)")
    check_photos(photos)
    check_base_model_folder(base_model)


def check_base_model_folder(folder: str | Path) -> None:
    """``folder`` holds a diffusers pipeline (its ``model_index.json``)."""
    path = Path(folder)
    if not (path / "model_index.json").is_file():
        raise ModelUnavailable(f"base model {path}: not a diffusers pipeline folder (no "
                               "model_index.json)", path=str(path))


def _check_use(h: Handle, record, purpose: str) -> None:
    """The consent grants ``purpose``; the ConsentError names the identity."""
    try:
        check_use(record, purpose)
    except ConsentError as exc:
        raise type(exc)(f"{h}: {exc.message}", handle=str(h), purpose=purpose) from None
