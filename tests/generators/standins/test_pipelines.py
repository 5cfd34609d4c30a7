"""The tiny offline SDXL / SD1.5 pipelines (generators.standins.pipelines)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from generators.standins.pipelines import (
    COMMON_WORDS,
    TinySDXLConfig,
    build_tiny_sd15,
    sdxl_unet_config,
    tiny_clip_tokenizer,
    write_tiny_sd15,
    write_tiny_sdxl,
)

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = Path(os.environ.get("IDVAULT_REFERENCE_MANIFESTS",
                                ROOT.parent / "shared" / "reference" / "manifests"))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return write_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, seed: int, prompt: str = "@smiths/ana hiking in the alps, watercolor"):
    return pipe(prompt, num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


def test_sdxl_folder_has_the_real_layout_and_loads_back(sdxl_dir, sdxl) -> None:
    index = json.loads((sdxl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert {k: v[1] for k, v in index.items() if isinstance(v, list) and v[1]} == {
        "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
        "text_encoder_2": "CLIPTextModelWithProjection", "tokenizer": "CLIPTokenizer",
        "tokenizer_2": "CLIPTokenizer", "unet": "UNet2DConditionModel",
        "scheduler": "EulerDiscreteScheduler"}
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert (sdxl_dir / sub / "config.json").exists()
        assert list((sdxl_dir / sub).glob("*.safetensors")), sub
    cfg = sdxl.unet.config
    assert cfg.addition_embed_type == "text_time"
    # cross_attention_dim is both encoders side by side, as 768 + 1280 = 2048.
    assert cfg.cross_attention_dim == (sdxl.text_encoder.config.hidden_size
                                       + sdxl.text_encoder_2.config.hidden_size)
    assert cfg.projection_class_embeddings_input_dim == (
        6 * cfg.addition_time_embed_dim + sdxl.text_encoder_2.config.projection_dim)
    assert sdxl.vae_scale_factor == 8
    assert sum(p.numel() for p in sdxl.unet.parameters()) < 5_000_000  # tiny: fast on CPU


def test_saving_is_deterministic(sdxl_dir, tmp_path) -> None:
    again = write_tiny_sdxl(tmp_path / "again")
    for f in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        assert (sdxl_dir / f).read_bytes() == (again / f).read_bytes(), f


def test_generation_shape_and_seed_determinism(sdxl) -> None:
    a = _generate(sdxl, 0)
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    assert np.array_equal(a, _generate(sdxl, 0))
    assert not np.array_equal(a, _generate(sdxl, 1))


def test_tokenizers_encode_any_prompt_without_unknowns(sdxl) -> None:
    prompt = "@smiths/ana:girl and Zoë 🙂 hiking — 3 friends, 水彩, xyzzy"
    for tok in (sdxl.tokenizer, sdxl.tokenizer_2):
        ids = tok(prompt).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        # CLIP's unknown token is <|endoftext|>: inside the text it would mean a lost piece.
        assert tok.unk_token_id == tok.eos_token_id and tok.eos_token_id not in ids[1:-1]
        # Decoding gives the (lower-cased) text back: every byte was kept.
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == \
            prompt.lower().replace(" ", "")
    fresh = tiny_clip_tokenizer()
    assert sdxl.tokenizer(prompt).input_ids == fresh(prompt).input_ids  # saved == built
    for word in COMMON_WORDS:
        assert len(fresh(word).input_ids) == 3, word  # one token between BOS and EOS
    assert len(fresh("photo " * 100, truncation=True).input_ids) == 77


def _structure(names: list[str]) -> tuple[list[str], dict[str, list[tuple[int, str]]]]:
    """Attention prefixes in order, and per prefix its (transformer block, attn) sequence."""
    pattern = re.compile(r"(.+)\.transformer_blocks\.(\d+)\.(attn[12])\.processor")
    prefixes: list[str] = []
    blocks: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        prefix, block, kind = pattern.fullmatch(name).groups()
        if prefix not in blocks:
            prefixes.append(prefix)
            blocks[prefix] = []
        blocks[prefix].append((int(block), kind))
    return prefixes, blocks


def _manifest() -> dict:
    path = MANIFESTS / "base_models.json"
    if not path.exists():
        pytest.skip(f"reference manifests not found at {MANIFESTS} (set "
                    "IDVAULT_REFERENCE_MANIFESTS)")
    return json.loads(path.read_text())


def test_sdxl_attention_processor_order_follows_the_full_model(sdxl) -> None:
    manifest = _manifest()
    full = manifest["sdxl_attn_processor_order"]
    tiny = list(sdxl.unet.attn_processors)
    full_prefixes, full_blocks = _structure(full)
    tiny_prefixes, tiny_blocks = _structure(tiny)
    assert tiny_prefixes == full_prefixes  # same attentions, same order (down, up, mid)
    for prefix in full_prefixes:
        n = len(tiny_blocks[prefix]) // 2
        # Each transformer block: attn1 then attn2, blocks counted from 0.
        assert tiny_blocks[prefix] == [(b, k) for b in range(n) for k in ("attn1", "attn2")]
        assert full_blocks[prefix][:2 * n] == tiny_blocks[prefix]
    # Even index = self-attention, odd = cross-attention (what StoryMaker's keys rely on).
    assert all(name.endswith("attn1.processor") == (i % 2 == 0) for i, name in enumerate(tiny))
    assert len(tiny) < len(full)
    # The structural config keys agree with the full model's.
    full_cfg, tiny_cfg = manifest["sdxl_unet_config"], sdxl_unet_config(TinySDXLConfig())
    for key in ("down_block_types", "up_block_types", "layers_per_block", "use_linear_projection",
                "addition_embed_type", "in_channels", "out_channels"):
        assert list(np.atleast_1d(tiny_cfg[key])) == list(np.atleast_1d(full_cfg[key])), key


def test_sd15_round_trip_and_processor_order(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    folder = write_tiny_sd15(tmp_path / "sd15")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    img = _generate(pipe, 0, "a dog in the park")
    assert img.shape == (1, 64, 64, 3)
    assert np.array_equal(img, _generate(build_tiny_sd15(), 0, "a dog in the park"))
    # One transformer block per attention, as in SD1.5: the names match exactly.
    assert list(pipe.unet.attn_processors) == _manifest()["sd15_attn_processor_order"]
