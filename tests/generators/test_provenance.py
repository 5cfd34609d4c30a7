"""Signed provenance manifests in PNGs (generators.provenance)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from generators.prompt import parse_prompt, resolve_identities
from generators.provenance import (
    CHUNK_KEY_ID,
    CHUNK_MANIFEST,
    CHUNK_PUBLIC_KEY,
    CHUNK_SIGNATURE,
    GenerationRecord,
    IdentityUse,
    canonical_json,
    save_signed_png,
    verify_image,
)
from tests.helpers import consent, face_payload
from vault.config import Settings
from vault.errors import InvalidInput, NotFound, SignatureInvalid
from vault.vault import Vault

PROMPT = "@smiths/ana and @smiths/ben hiking in the alps, watercolor"


def _vault(path: Path) -> Vault:
    v = Vault.init(Settings(data_dir=path), actor="test")
    v.add_owner("smiths", "family", actor="test")
    for i, name in enumerate(("ana", "ben")):
        v.create_identity(f"smiths/{name}", consent(), actor="test")
        v.put_artifact(f"smiths/{name}", "face", face_payload(seed=i), actor="test")
    return v


@pytest.fixture
def vault(tmp_path: Path):
    v = _vault(tmp_path / "vault")
    yield v
    v.dispose()


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))


def _record(vault: Vault) -> GenerationRecord:
    resolved = resolve_identities(vault, parse_prompt(PROMPT), owner="smiths")
    return GenerationRecord.for_prompt(
        PROMPT, identities=tuple(IdentityUse.from_resolved(r, kinds=("face",),
                                                           method="photomaker")
                                 for r in resolved),
        base_model="tiny-sdxl", adapters=("photomaker-v2",), seed=42, steps=2, size=(64, 48))


def _signed(vault: Vault, tmp_path: Path, name: str = "out.png") -> Path:
    path = tmp_path / name
    save_signed_png(vault, _image(), _record(vault), path)
    return path


def _resave(src: Path, dst: Path, *, edit_text=None, edit_pixels=None, keep_text=True,
            **save) -> Path:
    with Image.open(src) as im:
        im.load()
        text = dict(im.text)
        pixels = im.copy()
    if edit_text:
        text = edit_text(text)
    if edit_pixels:
        pixels = edit_pixels(pixels)
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    pixels.save(dst, format=save.pop("format", "PNG"), pnginfo=info if keep_text else None,
                **save)
    return dst


def test_round_trip_says_what_was_used(vault: Vault, tmp_path: Path) -> None:
    path = _signed(vault, tmp_path)
    result = verify_image(vault, path)
    assert result.ok and result.status == "valid"
    assert result.raise_for_status() is result
    m = result.manifest
    assert m["type"] == "idvault.provenance/1" and m["vault"] == str(vault.vault_id)
    assert [i["handle"] for i in m["identities"]] == ["smiths/ana", "smiths/ben"]
    ana = vault.describe("smiths/ana")
    assert m["identities"][0]["consent"] == ana["consent"]["id"]
    assert m["identities"][0]["artifacts"][0]["sha256"] == ana["artifacts"][0]["sha256"]
    assert m["identities"][0]["method"] == "photomaker"
    assert (m["base_model"], m["adapters"], m["seed"], m["steps"], m["size"]) == (
        "tiny-sdxl", ["photomaker-v2"], 42, 2, [64, 48])
    assert m["prompt_sha256"] == parse_prompt(PROMPT).prompt_sha256
    assert PROMPT not in path.read_bytes().decode("latin-1")  # the prompt itself is not stored
    assert m["created_at"].endswith("Z")
    key_id, _ = vault.keys.public_key()
    assert result.key_id == str(key_id)
    assert any("smiths/ana via photomaker" in line for line in result.summary())


def test_signed_pngs_are_0600_whatever_the_umask(vault: Vault, tmp_path: Path) -> None:
    import os
    import stat

    old = os.umask(0o022)
    try:
        stale = tmp_path / "again.png"
        stale.write_bytes(b"an older, readable file")
        stale.chmod(0o644)
        for path in (_signed(vault, tmp_path), _signed(vault, tmp_path, "again.png")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert verify_image(vault, path).ok
    finally:
        os.umask(old)


def test_recompressing_with_the_metadata_kept_stays_valid(vault: Vault, tmp_path: Path) -> None:
    src = _signed(vault, tmp_path)
    copy = _resave(src, tmp_path / "copy.png", compress_level=0)
    assert copy.read_bytes() != src.read_bytes()
    assert verify_image(vault, copy).status == "valid"


def test_one_changed_pixel_is_detected(vault: Vault, tmp_path: Path) -> None:
    def nudge(im: Image.Image) -> Image.Image:
        r, g, b = im.getpixel((10, 10))
        im.putpixel((10, 10), ((r + 1) % 256, g, b))
        return im

    path = _resave(_signed(vault, tmp_path), tmp_path / "nudged.png", edit_pixels=nudge)
    result = verify_image(vault, path)
    assert (result.status, result.reason) == ("altered", "pixels_changed")
    assert "pixels were changed" in result.message
    with pytest.raises(SignatureInvalid, match="pixels were changed") as err:
        result.raise_for_status()
    assert err.value.details["status"] == "altered"


def test_an_edited_manifest_fails_the_signature(vault: Vault, tmp_path: Path) -> None:
    def edit(text: dict) -> dict:
        doc = json.loads(text[CHUNK_MANIFEST])
        doc["identities"] = doc["identities"][:1]  # hide that ben was used
        return {**text, CHUNK_MANIFEST: canonical_json(doc).decode()}

    path = _resave(_signed(vault, tmp_path), tmp_path / "edited.png", edit_text=edit)
    result = verify_image(vault, path)
    assert (result.status, result.reason) == ("altered", "manifest_edited")
    assert "signature does not match" in result.message
    assert len(result.manifest["identities"]) == 1  # the claim is shown, marked unverified
    assert all(line.startswith("unverified") for line in result.summary()[1:])
    with pytest.raises(SignatureInvalid):
        result.raise_for_status()


def test_a_swapped_public_key_is_an_edit(vault: Vault, tmp_path: Path, tmp_path_factory) -> None:
    other = _vault(tmp_path_factory.mktemp("other") / "vault")
    try:
        import base64

        foreign_public = base64.b64encode(other.keys.public_key()[1]).decode()
    finally:
        other.dispose()
    path = _resave(_signed(vault, tmp_path), tmp_path / "key.png",
                   edit_text=lambda t: {**t, CHUNK_PUBLIC_KEY: foreign_public})
    assert verify_image(vault, path).reason == "manifest_edited"


def test_another_vaults_image_has_an_unknown_signature(vault: Vault, tmp_path: Path,
                                                        tmp_path_factory) -> None:
    other = _vault(tmp_path_factory.mktemp("foreign") / "vault")
    try:
        path = _signed(other, tmp_path, "foreign.png")
        assert verify_image(other, path).ok  # its own vault vouches for it
    finally:
        other.dispose()
    result = verify_image(vault, path)
    assert result.status == "unknown_signature"
    assert "does not hold" in result.message and str(other.vault_id) in result.message
    assert result.details["self_consistent"] is True
    with pytest.raises(SignatureInvalid, match="does not hold"):
        result.raise_for_status()


def test_stripped_metadata_means_no_manifest(vault: Vault, tmp_path: Path) -> None:
    signed = _signed(vault, tmp_path)
    stripped = _resave(signed, tmp_path / "stripped.png", keep_text=False)
    result = verify_image(vault, stripped)
    assert result.status == "no_manifest" and result.manifest is None
    with pytest.raises(SignatureInvalid, match="no idvault provenance manifest"):
        result.raise_for_status()
    jpeg = _resave(signed, tmp_path / "copy.jpg", keep_text=False, format="JPEG")
    assert verify_image(vault, jpeg).status == "no_manifest"


def test_a_manifest_without_its_signature_is_altered(vault: Vault, tmp_path: Path) -> None:
    path = _resave(_signed(vault, tmp_path), tmp_path / "unsigned.png",
                   edit_text=lambda t: {k: v for k, v in t.items()
                                        if k not in (CHUNK_SIGNATURE, CHUNK_KEY_ID)})
    result = verify_image(vault, path)
    assert (result.status, result.reason) == ("altered", "unsigned")
    garbled = _resave(_signed(vault, tmp_path), tmp_path / "garbled.png",
                      edit_text=lambda t: {**t, CHUNK_SIGNATURE: "not base64!"})
    assert verify_image(vault, garbled).reason == "malformed"


def test_unreadable_and_missing_files(vault: Vault, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        verify_image(vault, tmp_path / "nope.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(InvalidInput, match="cannot read"):
        verify_image(vault, junk)


def test_identity_use_from_opened_artifacts_digests_the_payloads(vault: Vault) -> None:
    opened = vault.get_artifact("smiths/ana", "face", purpose="generate", actor="test")
    use = IdentityUse.from_opened([opened], consent_id="c-1", method="storymaker")
    assert use.handle == "smiths/ana"
    assert use.artifacts[0].sha256 == vault.describe("smiths/ana")["artifacts"][0]["sha256"]
    assert use.artifacts[0].id == opened.id


def test_generation_md_documents_the_manifest_and_chunks(vault: Vault, tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "generation.md").read_text()
    m = verify_image(vault, _signed(vault, tmp_path)).manifest
    names = set(m) | set(m["identities"][0]) | set(m["identities"][0]["artifacts"][0]) | set(
        m["pixels"])
    missing = sorted(n for n in names if f"`{n}`" not in docs)
    assert not missing, f"docs/generation.md does not document {missing}"
    for chunk in (CHUNK_MANIFEST, CHUNK_SIGNATURE, CHUNK_KEY_ID, CHUNK_PUBLIC_KEY):
        assert f"`{chunk}`" in docs
    for status in ("valid", "altered", "unknown_signature", "no_manifest", "pixels_changed",
                   "manifest_edited", "unsigned", "malformed"):
        assert f"`{status}`" in docs, status
