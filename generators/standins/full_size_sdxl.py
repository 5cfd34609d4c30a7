"""The full-size SDXL architecture with random weights, built offline, for timing and memory.

``bench/bench_generate.py --full-size`` needs SDXL's real cost -- a 2.6B-parameter
UNet at 1024x1024, both full text encoders, the real VAE -- on machines that
hold no SDXL weights and cannot download any. Timing does not depend on the
weights' values, so this module builds the real architecture with random
weights:

* UNet: ``UNet2DConditionModel(**sdxl_unet_config)`` of
  ``manifests/base_models.json`` (the reference facts beside the checkout).
* Text encoders: ``CLIPTextModel`` (CLIP-L) and ``CLIPTextModelWithProjection``
  (OpenCLIP bigG) from the manifest's ``clip_l_text_config`` /
  ``clip_g_text_config`` (vocabulary 49408, 77 positions), with the special
  token ids of the tokenizers below.
* Tokenizers: the offline tiny BPE of :mod:`generators.standins.pipelines`. Its
  ids are all below 49408, which is all the embedding tables need; what the
  vocabulary spells does not change the cost (every prompt is padded to 77).
* VAE: not in the manifest; :data:`SDXL_VAE_CONFIG` holds the values of the
  SDXL release's ``vae/config.json``.
* Scheduler: the tiny pipeline's, which has the SDXL base settings.

Every module is constructed under ``torch.device(device)`` with ``dtype`` as
the default dtype, so its parameters are allocated once, where and as they
are used (no float32 CPU copy of 2.6B parameters first); the constructors'
own random initialisation fills them. With ``device="meta"`` nothing is
allocated at all (architecture checks).

:func:`write_full_size_id_models` writes identity checkpoints at the official
full sizes (PhotoMaker v2 ``photomaker-v2.bin``, StoryMaker ``mask.bin``),
random, with LoRAs on all 140 attention processors. They are not listed as
stand-ins, so the loaders check them against the official layouts.

**Noise, not pictures**: none of this resembles anyone or anything.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

__all__ = [
    "PHOTOMAKER_RANK",
    "SDXL_VAE_CONFIG",
    "STORYMAKER_RANK",
    "build_full_size_sdxl",
    "find_manifests",
    "load_base_manifest",
    "write_full_size_id_models",
]

ROOT = Path(__file__).resolve().parents[1]

# The SDXL base release's vae/config.json (the manifest has no VAE entry).
SDXL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    # The SDXL VAE overflows in float16; pipelines decode it in float32.
    "force_upcast": True,
}

# PhotoMaker does not publish its LoRA rank (the loaders read it from the tensors); 64 is
# an assumption. It changes only the merge done once per LoRA, not the steps: the LoRA is
# merged into the weights.
PHOTOMAKER_RANK = 64
STORYMAKER_RANK = 128  # manifests/storymaker_ip_adapter.json


def find_manifests(directory: Path | str | None = None) -> Path:
    """The reference ``manifests`` folder: ``directory`` if given, else beside the checkout
    (``../shared/reference/manifests``) or in it (``shared/reference/manifests``)."""
    candidates = [Path(directory)] if directory else [
        ROOT.parent / "shared" / "reference" / "manifests",
        ROOT / "shared" / "reference" / "manifests"]
    for path in candidates:
        if (path / "base_models.json").is_file():
            return path
    raise FileNotFoundError(
        "no base_models.json in " + " or ".join(str(p) for p in candidates)
        + " (pass the reference manifests folder)")


def load_base_manifest(directory: Path | str | None = None) -> dict:
    """``base_models.json`` (see :func:`find_manifests`)."""
    return json.loads((find_manifests(directory) / "base_models.json").read_text())


@contextlib.contextmanager
def _building(device: torch.device | str, dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _text_config(fields: dict, tokenizer):
    from transformers import CLIPTextConfig

    # The tokenizer's own special ids: the pooled token is found by the eos id.
    eos = tokenizer.eos_token_id
    return CLIPTextConfig(**fields, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
                          pad_token_id=eos)


def build_full_size_sdxl(manifest: dict, *, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ``StableDiffusionXLPipeline`` of the full SDXL architecture, random weights, built
    on ``device`` in ``dtype`` (``"meta"``: structure only). Deterministic per ``seed``
    on one device."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from generators.standins.pipelines import _scheduler, tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer()
    # As in the release: tokenizer_2 pads with "!".
    tokenizer_2 = tiny_clip_tokenizer(pad_token="!")
    for cfg in (manifest["clip_l_text_config"], manifest["clip_g_text_config"]):
        if len(tokenizer) > cfg["vocab_size"]:
            raise ValueError(f"tokenizer has {len(tokenizer)} ids, the text encoder "
                             f"{cfg['vocab_size']}")
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with _building(device, dtype):
        text_encoder = CLIPTextModel(_text_config(manifest["clip_l_text_config"], tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(manifest["clip_g_text_config"], tokenizer))
        unet = UNet2DConditionModel(**manifest["sdxl_unet_config"])
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    for module in (text_encoder, text_encoder_2, unet, vae):
        module.eval().requires_grad_(False)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_full_size_id_models(models_dir: Path | str, unet, *, seed: int = 0,
                              photomaker_rank: int = PHOTOMAKER_RANK,
                              storymaker_rank: int = STORYMAKER_RANK,
                              storymaker: bool = True) -> dict[str, Path]:
    """Write random full-size ``photomaker-v2.bin`` and (``storymaker``) ``mask.bin``.

    ``unet`` (any device, ``meta`` included) gives the LoRA targets: every
    attention processor at its real widths. Built on the CPU in float32 and
    freed before returning: ~2.2 GB while the PhotoMaker ID encoder (543M
    parameters, CLIP ViT-L tower included) is made, ~3.3 GB of ``mask.bin``
    (830M parameters, fp32 as released). Returns the paths by key.
    """
    from encoders.id.photomaker import PhotoMakerConfig
    from encoders.id.storymaker import StoryMakerConfig
    from encoders.standins.id_models import build_tiny_storymaker, photomaker_state
    from generators.standins.generation import tiny_ip_adapter_for, tiny_lora_weights_for

    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"photomaker-v2": root / "photomaker-v2.bin"}
    with torch.device("cpu"):
        torch.save({"id_encoder": photomaker_state("v2", seed, PhotoMakerConfig()),
                    "lora_weights": tiny_lora_weights_for(unet, rank=photomaker_rank, seed=seed)},
                   paths["photomaker-v2"])
        if storymaker:
            paths["storymaker"] = root / "mask.bin"
            proj = {k: v.contiguous() for k, v in
                    build_tiny_storymaker(seed + 2, StoryMakerConfig()).state_dict().items()}
            torch.save({"image_proj_model": proj,
                        "ip_adapter": tiny_ip_adapter_for(unet, rank=storymaker_rank,
                                                          seed=seed + 2)},
                       paths["storymaker"])
    return paths
