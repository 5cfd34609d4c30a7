"""CLIP preprocessing and vision-tower loading (encoders.id.clip_vision).

Preprocessing is checked three ways: against a direct numpy computation of
each step, against transformers' own ``CLIPImageProcessor`` (the PIL backend
the official pipelines end up using here), and on cases with known answers.
Towers are tiny ``save_pretrained`` folders; the ViT-H/14 sizes are checked
on the meta device against ``base_models.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.id.clip_vision import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TINY_VIT_H,
    VIT_H14,
    VIT_L14,
    ClipVisionTower,
    clip_preprocess,
    resize_output_size,
)
from encoders.library_output import quiet_libraries
from encoders.standins.id_models import write_tiny_clip_vision
from vault.errors import InvalidInput, ModelUnavailable

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = Path(os.environ.get("IDVAULT_REFERENCE_MANIFESTS",
                                ROOT.parent / "shared" / "reference" / "manifests"))


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _numpy_reference(image: np.ndarray) -> np.ndarray:
    """Each step written out: short side to 224 (PIL bicubic), centre crop, /255, mean/std."""
    h, w = image.shape[:2]
    if w <= h:
        new_w, new_h = 224, int(224 * h / w)
    else:
        new_w, new_h = int(224 * w / h), 224
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - 224) // 2, (new_w - 224) // 2
    crop = resized[top:top + 224, left:left + 224].astype(np.float64) / 255.0
    out = (crop - np.array(OPENAI_CLIP_MEAN)) / np.array(OPENAI_CLIP_STD)
    return out.transpose(2, 0, 1)


@pytest.mark.parametrize("h, w, expected", [
    (300, 451, (224, 336)),  # int(224 * 451 / 300) = 336.7 -> 336 (truncated)
    (451, 300, (336, 224)),
    (224, 224, (224, 224)),
    (1000, 1000, (224, 224)),
    (100, 1001, (224, 2242)),
    (3024, 4032, (224, 298)),
])
def test_resize_output_size_truncates_like_transformers(h, w, expected):
    assert resize_output_size(h, w) == expected


@pytest.mark.parametrize("h, w", [(300, 451), (451, 300), (224, 224), (97, 130), (640, 480)])
def test_preprocess_matches_a_direct_numpy_reference(h, w):
    image = _image(h, w, seed=h * w)
    out = clip_preprocess([image])
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    np.testing.assert_allclose(out[0].numpy(), _numpy_reference(image), rtol=0, atol=2e-6)


def test_preprocess_of_a_224_image_is_pure_arithmetic():
    # A 224x224 input is neither resized nor cropped (what StoryMaker feeds).
    image = _image(224, 224, seed=7)
    expected = ((image / 255.0 - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD).transpose(2, 0, 1)
    np.testing.assert_allclose(clip_preprocess([image])[0].numpy(), expected, atol=2e-6)


def test_a_flat_colour_maps_to_known_values():
    image = np.full((480, 640, 3), (255, 0, 128), np.uint8)
    out = clip_preprocess([image])[0].numpy()
    for c, v in enumerate((255, 0, 128)):
        want = (v / 255 - OPENAI_CLIP_MEAN[c]) / OPENAI_CLIP_STD[c]
        np.testing.assert_allclose(out[c], want, atol=2e-6)


@pytest.mark.parametrize("h, w", [(300, 451), (451, 300), (224, 224), (97, 130), (1001, 333)])
def test_preprocess_matches_transformers_clip_image_processor(h, w):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image = _image(h, w, seed=h + w)
    theirs = CLIPImageProcessorPil()(images=image, return_tensors="np").pixel_values
    ours = clip_preprocess([image]).numpy()
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_preprocess_accepts_pil_and_batches():
    a, b = _image(300, 200, 1), _image(200, 300, 2)
    batch = clip_preprocess([a, Image.fromarray(b)])
    assert batch.shape == (2, 3, 224, 224)
    assert torch.equal(batch[1], clip_preprocess([b])[0])


@pytest.mark.parametrize("bad", [
    np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
    np.zeros((10, 10, 3), np.float32), np.zeros((0, 10, 3), np.uint8)])
def test_preprocess_rejects_what_is_not_an_rgb_image(bad):
    with pytest.raises(InvalidInput, match="image 0: CLIP input must be"):
        clip_preprocess([bad])
    with pytest.raises(InvalidInput, match="no images"):
        clip_preprocess([])


# -- towers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory) -> Path:
    return write_tiny_clip_vision(tmp_path_factory.mktemp("clip") / "clip-vit-h-14", seed=3)


def test_penultimate_is_hidden_states_minus_two_without_the_last_layer(tower_dir):
    tower = ClipVisionTower.from_pretrained(tower_dir)
    assert tower.spec == TINY_VIT_H
    pixels = clip_preprocess([_image(256, 300, 1), _image(300, 256, 2)])
    with torch.inference_mode():
        full = tower.model(pixel_values=pixels, output_hidden_states=True)
        ours = tower.penultimate(pixels)
    assert ours.shape == (2, TINY_VIT_H.num_positions, TINY_VIT_H.hidden_size)  # (2, 50, 32)
    torch.testing.assert_close(ours, full.hidden_states[-2])
    assert not torch.allclose(ours, full.hidden_states[-1])


def test_tower_folders_of_every_clip_class_load(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    pixels = clip_preprocess([_image(224, 224, 5)])
    with quiet_libraries():
        plain = CLIPVisionModel(TINY_VIT_H.to_config())
        plain.save_pretrained(tmp_path / "plain")
        whole = CLIPModel(CLIPConfig(
            text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2},
            vision_config=TINY_VIT_H.to_config().to_dict(), projection_dim=16))
        whole.save_pretrained(tmp_path / "whole")
    for name, reference in (("plain", plain), ("whole", whole.vision_model)):
        tower = ClipVisionTower.from_pretrained(tmp_path / name)
        with torch.inference_mode():
            want = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tower.penultimate(pixels), want)


def test_tower_errors_name_the_folder_and_the_problem(tmp_path, tower_dir):
    with pytest.raises(ModelUnavailable) as err:
        ClipVisionTower.from_pretrained(tmp_path / "nowhere")
    assert str(err.value) == f"CLIP vision tower {tmp_path / 'nowhere'}: missing"

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable, match=r"empty: no config\.json"):
        ClipVisionTower.from_pretrained(tmp_path / "empty")

    broken = tmp_path / "truncated"
    broken.mkdir()
    (broken / "config.json").write_bytes((tower_dir / "config.json").read_bytes())
    data = (tower_dir / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelUnavailable, match=r"truncated: cannot be loaded \(SafetensorError"):
        ClipVisionTower.from_pretrained(broken)

    # Weights missing from the folder would otherwise be random: refused by name.
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_bytes((tower_dir / "config.json").read_bytes())
    state = load_file(tower_dir / "model.safetensors")
    gone = next(k for k in state if k.endswith("post_layernorm.bias"))
    del state[gone]
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelUnavailable) as err:
        ClipVisionTower.from_pretrained(partial)
    assert str(err.value) == (f"CLIP vision tower {partial}: incomplete checkpoint, "
                              "1 missing weight(s): post_layernorm.bias")

    lfs = tmp_path / "lfs"
    lfs.mkdir()
    (lfs / "config.json").write_bytes((tower_dir / "config.json").read_bytes())
    (lfs / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ModelUnavailable, match="Git LFS pointer"):
        ClipVisionTower.from_pretrained(lfs)


def test_vit_specs_are_the_official_sizes():
    from transformers import CLIPVisionModelWithProjection

    assert VIT_L14.num_positions == VIT_H14.num_positions == 257
    with torch.device("meta"), quiet_libraries():
        model = CLIPVisionModelWithProjection(VIT_H14.to_config())
    params = sum(p.numel() for p in model.parameters())
    manifest = MANIFESTS / "base_models.json"
    if not manifest.is_file():
        assert params == 632_076_800  # base_models.json clip_vit_h14_vision_params
        pytest.skip(f"{manifest} not present; checked against the recorded count only")
    doc = json.loads(manifest.read_text())
    assert params == doc["clip_vit_h14_vision_params"]
    for key, value in doc["clip_vit_h14_vision_config"].items():
        assert getattr(VIT_H14, key) == value, key
