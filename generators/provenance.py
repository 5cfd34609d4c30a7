"""Signed provenance manifests in generated PNGs, and their verification.

Every image the generator writes carries, in PNG text chunks, a manifest of
what made it and a signature by the vault's Ed25519 key (kept wrapped in the
key store, the key that also signs erasure receipts):

``idvault:manifest``    canonical JSON (sorted keys, no spaces, ASCII)
``idvault:signature``   base64 Ed25519 signature of exactly those bytes
``idvault:key-id``      the signing key's id
``idvault:public-key``  base64 raw public key (for third parties; this vault
                        verifies with its own copy, never the embedded one)

Manifest fields (``type`` ``idvault.provenance/1``): ``vault`` (vault id),
``created_at`` (UTC), ``identities`` (per identity: ``handle``, ``method``,
``consent`` id, ``artifacts`` with id, kind, model id and the SHA-256 of the
artifact payload as the vault stores it), ``base_model``, ``adapters``,
``seed``, ``steps``, ``size`` ``[width, height]``, ``prompt_sha256`` (the
prompt itself is not stored: it may name people), and ``pixels``: mode, size
and SHA-256 of the decoded pixels, so changing any pixel is detected while
the PNG's compression may differ.

:func:`verify_image` answers one of: ``valid`` (and what was used),
``altered`` (pixels changed, manifest edited, or signature chunks malformed
or missing beside a manifest), ``unknown_signature`` (signed by a key this
vault does not hold: another vault, or a forgery), ``no_manifest``.
``Verification.raise_for_status()`` turns the failures into SignatureInvalid.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin, UnidentifiedImageError
from sqlalchemy.orm import Session

from vault import audit
from vault.errors import InvalidInput, NotFound, SignatureInvalid
from vault.keystore import KeyStore
from vault.private_files import open_private

__all__ = [
    "CHUNK_KEY_ID",
    "CHUNK_MANIFEST",
    "CHUNK_PUBLIC_KEY",
    "CHUNK_SIGNATURE",
    "MANIFEST_TYPE",
    "ArtifactUse",
    "GenerationRecord",
    "IdentityUse",
    "Verification",
    "audit_generation",
    "build_manifest",
    "canonical_json",
    "pixel_digest",
    "save_signed_png",
    "verify_image",
]

MANIFEST_TYPE = "idvault.provenance/1"
CHUNK_MANIFEST = "idvault:manifest"
CHUNK_SIGNATURE = "idvault:signature"
CHUNK_KEY_ID = "idvault:key-id"
CHUNK_PUBLIC_KEY = "idvault:public-key"
SAVE_MODES = ("RGB", "RGBA", "L")  # modes PNG round-trips byte for byte


@dataclass(frozen=True)
class ArtifactUse:
    id: str
    kind: str
    model_id: str
    sha256: str  # of the artifact payload (the vault's stored digest)

    def as_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "model_id": self.model_id,
                "sha256": self.sha256}


@dataclass(frozen=True)
class IdentityUse:
    """One identity in an image: who, under which consent, with which artifacts."""

    handle: str
    consent_id: str
    artifacts: tuple[ArtifactUse, ...]
    method: str | None = None  # photomaker | storymaker | ...

    @classmethod
    def from_resolved(cls, resolved, *, kinds: Sequence[str] | None = None,
                      method: str | None = None) -> IdentityUse:
        """From :class:`generators.prompt.ResolvedIdentity`, keeping the artifact kinds used."""
        arts = tuple(ArtifactUse(a["id"], a["kind"], a["model_id"], a["sha256"])
                     for a in resolved.artifacts if kinds is None or a["kind"] in kinds)
        return cls(resolved.handle, resolved.consent_id, arts, method)

    @classmethod
    def from_opened(cls, opened: Sequence, *, consent_id: str,
                    method: str | None = None) -> IdentityUse:
        """From the ``OpenedArtifact``\\ s the generator decrypted (digests of their payloads)."""
        if not opened:
            raise InvalidInput("an identity use needs at least one artifact")
        handles = {o.handle for o in opened}
        if len(handles) != 1:
            raise InvalidInput(f"artifacts of several identities given as one: {sorted(handles)}")
        arts = tuple(ArtifactUse(o.id, o.artifact.kind, o.artifact.model_id,
                                 hashlib.sha256(o.payload).hexdigest()) for o in opened)
        return cls(handles.pop(), consent_id, arts, method)

    def as_dict(self) -> dict:
        return {"handle": self.handle, "method": self.method, "consent": self.consent_id,
                "artifacts": [a.as_dict() for a in self.artifacts]}


@dataclass(frozen=True)
class GenerationRecord:
    """What made an image, apart from the pixels and the signer."""

    identities: tuple[IdentityUse, ...]
    base_model: str
    seed: int
    steps: int
    size: tuple[int, int]  # (width, height) requested
    prompt_sha256: str
    adapters: tuple[str, ...] = ()  # e.g. "photomaker-v2", "storymaker/mask.bin@<sha256>"

    @classmethod
    def for_prompt(cls, prompt: str, **kwargs) -> GenerationRecord:
        return cls(prompt_sha256=hashlib.sha256(prompt.encode("utf-8")).hexdigest(), **kwargs)


def canonical_json(doc: dict) -> bytes:
    # ASCII so the bytes fit a PNG tEXt chunk (Latin-1) unchanged.
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def pixel_digest(image: Image.Image) -> dict:
    """``{"mode", "size", "sha256"}`` over the decoded pixels (and palette, if any)."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    h.update(image.tobytes())
    if image.mode == "P":
        h.update(bytes(image.getpalette() or []))
    return {"mode": image.mode, "size": [image.width, image.height], "sha256": h.hexdigest()}


def build_manifest(vault, record: GenerationRecord, image: Image.Image, *,
                   created_at: dt.datetime | None = None) -> dict:
    created = created_at or dt.datetime.now(dt.UTC)
    return {
        "type": MANIFEST_TYPE,
        "vault": str(vault.vault_id),
        "created_at": audit.canonical_time(created),
        "identities": [i.as_dict() for i in record.identities],
        "base_model": record.base_model,
        "adapters": list(record.adapters),
        "seed": int(record.seed),
        "steps": int(record.steps),
        "size": [int(record.size[0]), int(record.size[1])],
        "prompt_sha256": record.prompt_sha256,
        "pixels": pixel_digest(image),
    }


def save_signed_png(vault, image: Image.Image, record: GenerationRecord, path: Path | str, *,
                    created_at: dt.datetime | None = None) -> dict:
    """Write ``image`` as a PNG with its signed manifest; returns the manifest.

    The file is written beside ``path`` and renamed into place, so a crash
    never leaves a half-written image with a valid-looking manifest.
    """
    if image.mode not in SAVE_MODES:
        image = image.convert("RGB")
    manifest = build_manifest(vault, record, image, created_at=created_at)
    body = canonical_json(manifest)
    key_id, public, signature = vault.keys.sign(body)
    info = PngImagePlugin.PngInfo()
    info.add_text(CHUNK_MANIFEST, body.decode("ascii"))
    info.add_text(CHUNK_SIGNATURE, base64.b64encode(signature).decode())
    info.add_text(CHUNK_KEY_ID, str(key_id))
    info.add_text(CHUNK_PUBLIC_KEY, base64.b64encode(public).decode())
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open_private(tmp) as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def audit_generation(vault, record: GenerationRecord, manifest: dict, *, generation_id: str,
                     uses: Sequence[dict], owner: str | None, actor: str, commercial: bool,
                     before: Callable[[Session], None] | None = None) -> None:
    """One ``generate`` audit event per identity (so each identity's own trail shows every
    use), all sharing ``generation``; one with no subject when the prompt names nobody.

    ``uses``: per identity ``{"handle", "artifact", "method"}``, in order of mention.
    ``before(session)`` runs first in the same transaction (a job stores its image and
    marks itself done there: the events and the job commit together or not at all).
    """
    details = {"generation": generation_id,
               "handles": [u["handle"] for u in uses],
               "artifacts": [u["artifact"] for u in uses],
               "methods": {u["handle"]: u["method"] for u in uses},
               "seed": record.seed, "steps": record.steps, "size": list(record.size),
               "prompt_sha256": record.prompt_sha256, "base_model": record.base_model,
               "adapters": list(record.adapters), "commercial": commercial,
               "pixels_sha256": manifest["pixels"]["sha256"]}
    with vault.session() as s:
        if before is not None:
            before(s)
        for u in uses:
            audit.append(s, "generate", actor=actor, owner=u["handle"].split("/")[0],
                         subject=u["handle"], details=details)
        if not uses:
            audit.append(s, "generate", actor=actor, owner=owner, subject=None,
                         details=details)


STATUSES = ("valid", "altered", "unknown_signature", "no_manifest")


@dataclass(frozen=True)
class Verification:
    """The outcome of :func:`verify_image`."""

    status: str  # one of STATUSES
    message: str
    reason: str | None = None  # altered: pixels_changed | manifest_edited | malformed | unsigned
    manifest: dict | None = None  # valid: what was used; otherwise the unverified claim, if any
    key_id: str | None = None
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "valid"

    def raise_for_status(self) -> Verification:
        if not self.ok:
            raise SignatureInvalid(self.message, status=self.status, reason=self.reason)
        return self

    def summary(self) -> list[str]:
        """Human-readable lines: the verdict, then (if any) what the manifest says."""
        lines = [self.message]
        m = self.manifest
        if m:
            prefix = "" if self.ok else "unverified claim: "
            for ident in m.get("identities", []):
                arts = ", ".join(f"{a.get('kind')} {str(a.get('sha256'))[:12]}"
                                 for a in ident.get("artifacts", []))
                lines.append(f"{prefix}{ident.get('handle')} via {ident.get('method') or '?'} "
                             f"(consent {ident.get('consent')}; {arts})")
            lines.append(f"{prefix}base model {m.get('base_model')}, adapters "
                         f"{', '.join(m.get('adapters') or []) or 'none'}, seed {m.get('seed')}, "
                         f"{m.get('steps')} steps, {'x'.join(map(str, m.get('size') or []))}, "
                         f"made {m.get('created_at')}")
        return lines


def _read_png(path: Path, data: bytes | None = None) -> tuple[Image.Image, dict[str, str]]:
    if data is None and not path.exists():
        raise NotFound(f"no image at {path}")
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img.load()
            fmt = img.format
            text = dict(getattr(img, "text", {}) or {})
            image = img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InvalidInput(f"cannot read {path} as an image: {exc}") from None
    if fmt != "PNG":
        text = {}  # only PNG text chunks carry manifests
    return image, text


def verify_image(vault, path: Path | str, *, data: bytes | None = None) -> Verification:
    """Check an image's provenance against this vault's signing key.

    ``data``: the image itself (an upload, checked in memory, never written to a
    disk); ``path`` then only names it in the verdict."""
    path = Path(path)
    image, text = _read_png(path, data)
    body_text = text.get(CHUNK_MANIFEST)
    sig_text = text.get(CHUNK_SIGNATURE)
    key_text = text.get(CHUNK_KEY_ID)
    if body_text is None and sig_text is None:
        return Verification("no_manifest", f"{path.name} carries no idvault provenance manifest "
                            "(never signed, or its metadata was stripped, e.g. by re-encoding)")
    claim = _parse(body_text)
    if body_text is None or sig_text is None or key_text is None:
        return Verification("altered", f"{path.name}: the provenance metadata is incomplete "
                            "(manifest, signature or key id missing)", reason="unsigned",
                            manifest=claim, key_id=key_text)
    try:
        signature = base64.b64decode(sig_text, validate=True)
    except (binascii.Error, ValueError):
        return Verification("altered", f"{path.name}: the signature is not valid base64",
                            reason="malformed", manifest=claim, key_id=key_text)
    try:
        body = body_text.encode("ascii")
    except UnicodeEncodeError:
        return Verification("altered", f"{path.name}: the manifest was edited after signing "
                            "(it holds characters a signed manifest never does)",
                            reason="manifest_edited", manifest=claim, key_id=key_text)

    key_id, public = vault.keys.public_key()
    if key_text != str(key_id):
        consistent = _self_consistent(text.get(CHUNK_PUBLIC_KEY), body, signature)
        vault_claim = claim.get("vault") if claim else None
        return Verification(
            "unknown_signature",
            f"{path.name} was signed by a key this vault does not hold (key id {key_text}"
            + (f", claiming vault {vault_claim}" if vault_claim else "") + "); only the vault "
            "that made it can vouch for it", manifest=claim, key_id=key_text,
            details={"self_consistent": consistent})
    embedded = text.get(CHUNK_PUBLIC_KEY)
    if embedded is not None and embedded != base64.b64encode(public).decode():
        return Verification("altered", f"{path.name}: the embedded public key is not this "
                            "vault's key for that key id (the metadata was edited)",
                            reason="manifest_edited", manifest=claim, key_id=key_text)
    if not KeyStore.verify_signature(public, body, signature):
        return Verification("altered", f"{path.name}: the provenance manifest was edited after "
                            "signing (its signature does not match)", reason="manifest_edited",
                            manifest=claim, key_id=key_text)
    if claim is None or claim.get("type") != MANIFEST_TYPE:
        # Signed by us but not a manifest: a signature lifted from another document.
        return Verification("altered", f"{path.name}: the signed text is not an idvault "
                            "provenance manifest", reason="malformed", key_id=key_text)
    if claim.get("vault") != str(vault.vault_id):
        return Verification("altered", f"{path.name}: the manifest names another vault",
                            reason="manifest_edited", manifest=claim, key_id=key_text)
    actual = pixel_digest(image)
    if actual != claim.get("pixels"):
        return Verification("altered", f"{path.name}: the pixels were changed after signing "
                            "(their digest differs from the signed one)", reason="pixels_changed",
                            manifest=claim, key_id=key_text,
                            details={"expected": claim.get("pixels"), "actual": actual})
    handles = ", ".join(i.get("handle", "?") for i in claim.get("identities", [])) or "no identity"
    return Verification("valid", f"{path.name}: valid, signed by this vault at "
                        f"{claim.get('created_at')}: {handles}", manifest=claim, key_id=key_text)


def _parse(body_text: str | None) -> dict | None:
    if body_text is None:
        return None
    try:
        doc = json.loads(body_text)
    except json.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _self_consistent(public_b64: str | None, body: bytes, signature: bytes) -> bool:
    """Whether a foreign signature verifies under its own embedded key (proves no origin)."""
    if not public_b64:
        return False
    try:
        public = base64.b64decode(public_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    return KeyStore.verify_signature(public, body, signature)
