"""StoryMaker character tokens (encoders.id.storymaker): layout, loading, crops, math, artifacts.

The full-size ``image_proj_model`` is built only on the meta device and
compared with the official manifest; everything that runs uses the tiny
stand-ins (``encoders.standins.id_models``) and synthetic photos.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from insightface.utils import face_align
from PIL import Image

from encoders.id.checkpoints import compare_layout, layout_error
from encoders.id.clip_vision import TINY_VIT_H, clip_preprocess
from encoders.id.storymaker import (
    TINY_STORYMAKER,
    FallbackCrop,
    StoryMakerEncoder,
    StoryMakerImageProj,
    character_crop,
    expected_layout,
    fallback_box,
    load_storymaker,
    pick_reference,
    read_storymaker_checkpoint,
)
from encoders.standins.face_pack import synthetic_face
from encoders.standins.id_models import (
    build_tiny_storymaker,
    tiny_ip_adapter,
    write_tiny_clip_vision,
    write_tiny_storymaker,
)
from vault import codec
from vault.errors import InvalidInput, ModelUnavailable, PhotoRejected

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = Path(os.environ.get("IDVAULT_REFERENCE_MANIFESTS",
                                ROOT.parent / "shared" / "reference" / "manifests"))
DIGEST = ("6079b7e969cc557f8bfb3056c9b7c4667e76a3ae80cfdc0fb8c9425a74e1c9d4", 113, 304_451_840)


def layout_digest(layout: dict[str, tuple[int, ...]]) -> str:
    items = sorted((k, list(v)) for k, v in layout.items())
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# -- full-size layout (meta device) -----------------------------------------------------------


def test_full_size_image_proj_model_matches_the_official_manifest_exactly():
    path = MANIFESTS / "storymaker_image_proj_model.json"
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine (the digest test still checks the layout)")
    doc = json.loads(path.read_text())
    want = {k: tuple(v) for k, v in doc["tensors"].items()}
    with torch.device("meta"):
        module = StoryMakerImageProj()
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert sorted(set(want) ^ set(got)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}
    assert len(got) == doc["tensor_count"]
    assert sum(p.numel() for p in module.parameters()) == doc["param_count"]
    assert layout_digest(want) == DIGEST[0]


def test_full_size_layout_digest():
    layout = expected_layout()
    assert (layout_digest(layout), len(layout)) == DIGEST[:2]
    assert sum(int(np.prod(s)) for s in layout.values()) == DIGEST[2]


def test_full_size_shapes_and_damage_text():
    with torch.device("meta"):
        m = StoryMakerImageProj()
        ids, feats = torch.randn(2, 512), torch.randn(2, 257, 1280)
        assert m.face_tokens(ids, feats).shape == (2, 4, 2048)
        assert m.resample(feats).shape == (2, 16, 2048)
        assert m.character_tokens(ids, feats, feats).shape == (2, 20, 2048)
        assert m(ids, feats, feats).shape == (3, 20, 2048)  # bg + 2 characters
    assert m.perceiver_resampler.layers[0][0].heads == 32
    assert m.resample.layers[0][0].heads == 20
    damaged = dict(expected_layout())
    del damaged["bg_embed"]
    damaged["pos_embed"] = (4, 20, 2048)
    damaged["resample.extra"] = (1,)
    assert str(layout_error("StoryMaker image_proj_model", "mask.bin",
                            compare_layout(expected_layout(), damaged))) == (
        "mask.bin: does not match the StoryMaker image_proj_model layout (113 tensors "
        "expected):\n"
        "  - missing keys (1): bg_embed\n"
        "  - unexpected keys (1): resample.extra\n"
        "  - shape mismatches (1): pos_embed is (4, 20, 2048) in the file, expected "
        "(3, 20, 2048)")


# -- tiny checkpoint -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("storymaker")
    write_tiny_storymaker(d / "mask.bin", seed=2)
    write_tiny_clip_vision(d / "clip-vit-h-14", seed=3)
    return d


@pytest.fixture(scope="module")
def encoder(models_dir) -> StoryMakerEncoder:
    return StoryMakerEncoder.from_models_dir(models_dir, config=TINY_STORYMAKER, device="cpu")


@pytest.fixture(scope="module")
def person(analyzer):
    photo = synthetic_face(6, 1, (320, 256), radius=0.2, center=(0.5, 0.3))
    return photo, analyzer.analyze(photo)


def _write_mask_bin(path: Path, proj: dict, ip: dict | None = None) -> Path:
    torch.save({"image_proj_model": proj, "ip_adapter": ip or tiny_ip_adapter()}, path)
    return path


def test_damaged_mask_bin_errors(tmp_path):
    state = build_tiny_storymaker(seed=2).state_dict()
    del state["norm.bias"]
    state["extra"] = torch.zeros(2)
    state["pos_embed"] = torch.zeros(2, 20, 2048)
    path = _write_mask_bin(tmp_path / "mask.bin", state)
    n = len(expected_layout(TINY_STORYMAKER))
    with pytest.raises(ModelUnavailable) as err:
        read_storymaker_checkpoint(path, TINY_STORYMAKER)
    assert str(err.value) == (
        f"{path}: does not match the StoryMaker image_proj_model layout ({n} tensors "
        "expected):\n"
        "  - missing keys (1): norm.bias\n"
        "  - unexpected keys (1): extra\n"
        "  - shape mismatches (1): pos_embed is (2, 20, 2048) in the file, expected "
        "(3, 20, 2048)")

    good = tmp_path / "good.bin"
    write_tiny_storymaker(good)
    data = good.read_bytes()
    cut = tmp_path / "cut.bin"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelUnavailable) as err:
        read_storymaker_checkpoint(cut, TINY_STORYMAKER)
    assert str(err.value) == (
        f"StoryMaker checkpoint {cut}: cannot be read as a PyTorch checkpoint (truncated or "
        "corrupt?): PytorchStreamReader failed reading zip archive: failed finding central "
        "directory")

    torch.save({"image_proj_model": build_tiny_storymaker().state_dict()}, tmp_path / "one.bin")
    with pytest.raises(ModelUnavailable, match=r"top-level keys are \['image_proj_model'\]; "
                                               r"expected exactly \['image_proj_model', "
                                               r"'ip_adapter'\]"):
        read_storymaker_checkpoint(tmp_path / "one.bin", TINY_STORYMAKER)

    odd = _write_mask_bin(tmp_path / "odd.bin", build_tiny_storymaker().state_dict(),
                          {"unet.to_q.weight": torch.zeros(2, 2)})
    with pytest.raises(ModelUnavailable, match="ip_adapter does not look like StoryMaker's"):
        read_storymaker_checkpoint(odd, TINY_STORYMAKER)


def test_loads_strictly_in_fp32(models_dir):
    model, info = load_storymaker(models_dir / "mask.bin", TINY_STORYMAKER)
    reference = build_tiny_storymaker(seed=2)
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), name
    assert info.lora_rank == 4 and info.sha256 == hashlib.sha256(
        (models_dir / "mask.bin").read_bytes()).hexdigest()
    with pytest.raises(ModelUnavailable, match=r"mask\.bin: does not match the StoryMaker "
                                               r"image_proj_model layout \(113 tensors"):
        load_storymaker(models_dir / "mask.bin")  # the official sizes


def test_missing_files_and_a_mismatched_tower(tmp_path, models_dir):
    with pytest.raises(ModelUnavailable) as err:
        StoryMakerEncoder.from_models_dir(tmp_path, config=TINY_STORYMAKER)
    text = str(err.value)
    assert text.startswith("StoryMaker image_proj_model and ip_adapter: no usable file named "
                           f"mask.bin in:\n  - {tmp_path}\n  - {tmp_path / 'checkpoints'}\n"
                           f"  - {tmp_path / 'StoryMaker'}\n")
    assert "https://huggingface.co/RED-AIGC/StoryMaker" in text
    (tmp_path / "StoryMaker").mkdir()
    (tmp_path / "StoryMaker" / "mask.bin").write_bytes((models_dir / "mask.bin").read_bytes())
    with pytest.raises(ModelUnavailable, match="no usable folder named clip-vit-h-14 or "
                                               "CLIP-ViT-H-14-laion2B-s32B-b79K or image_encoder"):
        StoryMakerEncoder.from_models_dir(tmp_path, config=TINY_STORYMAKER)
    wide = dataclasses.replace(TINY_VIT_H, hidden_size=48)
    write_tiny_clip_vision(tmp_path / "checkpoints" / "image_encoder", spec=wide)
    with pytest.raises(ModelUnavailable, match="has hidden size 48; StoryMaker needs 32"):
        StoryMakerEncoder.from_models_dir(tmp_path, config=TINY_STORYMAKER)


# -- crops ----------------------------------------------------------------------------------------


def _official_crop(photo: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pipeline_sdxl_storymaker.py: bounding_rectangle + crop_image, step by step."""
    contours, _ = cv2.findContours(mask[:, :, 0], cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    rects = [cv2.boundingRect(c) for c in contours]
    x0 = min(x for x, _, _, _ in rects)
    y0 = min(y for _, y, _, _ in rects)
    x1 = max(x + w for x, _, w, _ in rects)
    y1 = max(y + h for _, y, _, h in rects)
    crop, m = photo[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    m = cv2.GaussianBlur(m, (5, 5), 0) / 255.0
    composite = (255 * np.ones_like(m) * (1 - m) + m * crop).astype(np.uint8)
    return composite, np.asarray(Image.fromarray(composite).resize((224, 224)))


def _two_blob_mask(h: int = 300, w: int = 400) -> np.ndarray:
    mask = np.zeros((h, w, 3), np.uint8)
    cv2.ellipse(mask, (150, 120), (60, 80), 0, 0, 360, (255, 255, 255), -1)
    cv2.rectangle(mask, (230, 150), (330, 260), (255, 255, 255), -1)
    return mask


def test_character_crop_is_the_official_crop():
    photo = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    mask = _two_blob_mask()
    _, want = _official_crop(photo, mask)
    ours = character_crop(photo, mask)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, want)
    # Every accepted mask form gives the same crop.
    binary = mask[:, :, 0] > 0
    for form in (binary, binary.astype(np.uint8) * 255, binary.astype(np.uint8),
                 (binary.astype(np.uint8) * 255)[:, :, None]):
        np.testing.assert_array_equal(character_crop(photo, form), want)


def test_character_crop_box_blur_and_white_composite():
    # A 224x224 bounding box makes the final resize a copy, so the composite shows.
    photo = np.full((300, 400, 3), 90, np.uint8)
    mask = np.zeros((300, 400), np.uint8)
    cv2.circle(mask, (200, 150), 111, 255, -1)  # x 89..311, y 39..261: 223 x 223
    mask[150, 312] = mask[262, 200] = 255  # one more column and row: 224 x 224
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (89, 312, 39, 262)
    out = character_crop(photo, mask)
    composite, _ = _official_crop(photo, np.repeat(mask[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(out, composite)
    assert (out[0, 0] == 255).all() and (out[-1, -1] == 255).all()  # corners: background -> white
    assert (out[112, 112] == 90).all()  # inside the person: the photo
    # The blur makes a soft edge: values strictly between photo and white on the rim.
    rim = out[112, :12, 0]
    assert ((rim > 90) & (rim < 255)).any()


def test_mask_errors():
    photo = np.zeros((100, 120, 3), np.uint8)
    with pytest.raises(InvalidInput, match="the person mask is empty"):
        character_crop(photo, np.zeros((100, 120), bool))
    with pytest.raises(InvalidInput, match="the person mask is 100x120 but the photo is 120x100"):
        character_crop(photo, np.ones((120, 100), bool))
    with pytest.raises(InvalidInput, match="must be bool or uint8"):
        character_crop(photo, np.ones((100, 120), np.float32))


def test_fallback_box_follows_the_documented_rule():
    rule = FallbackCrop()
    assert (rule.width, rule.above, rule.below) == (3.0, 0.5, 3.0)
    # face box 60 x 80 at (100, 50): 3 widths centred on x = 130, 0.5 heights above,
    # 3 heights below, clipped to the 400 x 300 photo.
    assert fallback_box(np.array([100, 50, 160, 130]), (300, 400)) == (40, 10, 220, 300)
    assert fallback_box(np.array([0, 0, 60, 80]), (300, 400)) == (0, 0, 120, 300)
    assert fallback_box(np.array([10, 10, 20, 20]), (300, 400), FallbackCrop(1, 0, 0)) == \
        (10, 10, 20, 20)
    with pytest.raises(InvalidInput, match="no area"):
        fallback_box(np.array([10, 10, 10, 20]), (300, 400))


# -- tokens and artifacts ------------------------------------------------------------------


def test_compose_adds_the_slot_embedding_and_prepends_the_background():
    model = build_tiny_storymaker(seed=5)
    tokens = torch.randn(2, 20, 2048)
    with torch.inference_mode():
        out = model.compose(tokens, slots=[2, 0])
        assert out.shape == (3, 20, 2048)
        torch.testing.assert_close(out[0], model.bg_embed[0])
        for row, (tok, slot) in enumerate(zip(tokens, [2, 0]), start=1):
            x = tok + model.pos_embed[slot]
            y = F.layer_norm(F.linear(x, model.proj_out.weight, model.proj_out.bias), (2048,),
                             model.norm_out.weight, model.norm_out.bias)
            torch.testing.assert_close(out[row], y + x)
        ids, feats = torch.randn(2, 512), torch.randn(2, 50, 32)
        torch.testing.assert_close(model(ids, feats, feats),
                                   model.compose(model.character_tokens(ids, feats, feats)))
        assert model.negative_tokens(2).shape == (2, 20, 2048)
    with pytest.raises(InvalidInput, match="one slot per character, each in 0-2"):
        model.compose(tokens, slots=[0, 3])


def test_tokens_are_the_image_proj_of_both_crops(encoder, person):
    photo, face = person
    tensors, metadata = encoder.encode(photo, face)
    assert metadata["crop"] == "face_box_fallback"
    tokens = tensors["tokens"]
    assert tokens.shape == (20, 2048) and tokens.dtype == np.float32
    face_img = face_align.norm_crop(photo, landmark=face.kps, image_size=224)
    x0, y0, x1, y1 = fallback_box(face.bbox, photo.shape[:2])
    char_img = np.asarray(Image.fromarray(photo[y0:y1, x0:x1]).resize((224, 224),
                                                                      Image.BICUBIC))
    with torch.inference_mode():
        feats = encoder.tower.penultimate(clip_preprocess([face_img, char_img]))  # (2, 50, 32)
        want = encoder.image_proj.character_tokens(torch.from_numpy(face.normed)[None],
                                                   feats[1:], feats[:1])
    np.testing.assert_allclose(tokens, want[0].numpy(), atol=1e-5)


def test_crop_kinds_and_inputs(encoder, person):
    photo, face = person
    mask = np.zeros(photo.shape[:2], bool)
    mask[20:300, 40:220] = True
    masked, meta = encoder.encode(photo, face, mask=mask)
    assert meta["crop"] == "mask"
    cloth = np.full((90, 60, 3), (10, 120, 200), np.uint8)
    clothed, meta = encoder.encode(photo, face, mask=mask, cloth=cloth)
    assert meta["crop"] == "cloth"  # the clothing image replaces the character crop
    plain, _ = encoder.encode(photo, face)
    # Only the 16 character tokens change with the crop; the 4 face tokens do not.
    np.testing.assert_allclose(masked["tokens"][:4], plain["tokens"][:4], atol=1e-6)
    assert not np.allclose(masked["tokens"][4:], plain["tokens"][4:])
    assert not np.allclose(clothed["tokens"][4:], masked["tokens"][4:])
    with pytest.raises(PhotoRejected, match="no face"):
        encoder.encode(photo, None)
    with pytest.raises(InvalidInput, match="normed ArcFace embedding must be 512"):
        encoder.encode(photo, dataclasses.replace(face, normed=np.zeros(3, np.float32)))


def test_artifact_round_trips_and_names_both_weights(encoder, models_dir, person):
    photo, face = person
    tensors, metadata = encoder.encode(photo, face)
    assert metadata == {
        "model_id": f"storymaker/mask.bin@{sha16(models_dir / 'mask.bin')}"
                    f"+clip@{sha16(models_dir / 'clip-vit-h-14' / 'model.safetensors')}",
        "crop": "face_box_fallback"}
    decoded = codec.decode(codec.encode("storymaker", tensors, metadata), kind="storymaker")
    assert decoded.model_id == metadata["model_id"] and decoded.metadata["crop"] == \
        "face_box_fallback"
    np.testing.assert_array_equal(decoded.tensors["tokens"], tensors["tokens"])


def test_pick_reference_prefers_the_largest_face(person):
    _, face = person
    faces = [dataclasses.replace(face, face_px=80.0, det_score=0.9),
             dataclasses.replace(face, face_px=120.0, det_score=0.7),
             dataclasses.replace(face, face_px=120.0, det_score=0.8)]
    assert pick_reference(faces) == 2
    with pytest.raises(PhotoRejected):
        pick_reference([face, None])


def test_inventory_lists_every_identity_checkpoint(tmp_path):
    from encoders.id.checkpoints import inspect_id_checkpoints
    from encoders.standins.id_models import write_tiny_id_models

    paths = write_tiny_id_models(tmp_path / "models")
    (tmp_path / "models" / "photomaker-v1.bin").unlink()
    rows = {r.key: r for r in inspect_id_checkpoints(tmp_path / "models", hashes=True)}
    from encoders.id.checkpoints import CHECKPOINTS

    assert list(rows) == list(CHECKPOINTS)  # one row per checkpoint idvault can use
    assert {"photomaker-v1", "photomaker-v2", "storymaker", "clip-vit-h-14"} <= set(rows)
    assert rows["photomaker-v1"].path is None
    assert "no usable file named photomaker-v1.safetensors or photomaker-v1.bin" in \
        rows["photomaker-v1"].problem
    for key in ("photomaker-v2", "storymaker"):
        assert rows[key].path == paths[key] and rows[key].problem is None
        assert rows[key].size == paths[key].stat().st_size
        assert rows[key].sha256 == hashlib.sha256(paths[key].read_bytes()).hexdigest()
    clip = rows["clip-vit-h-14"]
    assert clip.path == paths["clip-vit-h-14"]
    assert clip.sha256 == hashlib.sha256(
        (paths["clip-vit-h-14"] / "model.safetensors").read_bytes()).hexdigest()
