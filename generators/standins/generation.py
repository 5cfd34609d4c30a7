"""Tiny, offline stand-ins for generation: an SDXL pipeline and identity checkpoints that fit it.

``idvault models tiny DIR`` writes these beside the tiny face pack so that
``idvault generate`` (and the demo, tests and bench) run end to end offline.
**They produce noise, not pictures, and no likeness.**

* ``DIR/sdxl-tiny``: :func:`generators.standins.pipelines.write_tiny_sdxl` with
  the text encoders at the real widths (CLIP-L 768 + OpenCLIP bigG 1280 =
  2048, two layers each), so the prompt embedding is 2048 wide like SDXL's and
  the stored identity artifacts (2048-wide PhotoMaker ID embeddings and
  StoryMaker tokens) fit it unchanged; the UNet keeps the tiny widths. The
  generator finds it as the default base model of a models folder.
* ``photomaker-v1.bin``, ``photomaker-v2.bin``, ``mask.bin``: the stand-ins of
  :mod:`encoders.standins.id_models` (same ID encoders, same file names and
  layouts), but with ``lora_weights`` / ``ip_adapter`` covering **every**
  attention processor of ``sdxl-tiny``'s UNet at its real widths (rank 4,
  non-zero), so the strict LoRA loading of :mod:`generators.lora` accepts them
  and a LoRA visibly changes the output. (The encoder stand-ins' own LoRAs
  cover a few full-size SDXL processors, which no tiny UNet has.)
* ``InstantID/ip-adapter.bin`` and ``InstantID/ControlNetModel``: InstantID's files for
  ``sdxl-tiny`` (:mod:`generators.standins.instantid`).
* ``ip-adapter-faceid-plusv2_sdxl.bin``: IP-Adapter-FaceID Plus v2 for ``sdxl-tiny``
  (:mod:`generators.standins.faceid`), listed in the stand-in sidecar.
"""

from __future__ import annotations

from pathlib import Path

import torch

from generators.standins.pipelines import TinySDXLConfig, sdxl_unet_config, write_tiny_sdxl

__all__ = [
    "TINY_BASE_DIR",
    "TINY_GENERATION_SDXL",
    "tiny_ip_adapter_for",
    "tiny_lora_weights_for",
    "tiny_sdxl_unet_on_meta",
    "write_tiny_generation_models",
]

TINY_BASE_DIR = "sdxl-tiny"
# SDXL's text widths (768 + 1280 = 2048, the identity tokens' width); tiny everywhere else.
TINY_GENERATION_SDXL = TinySDXLConfig(text_hidden=768, text_hidden_2=1280)
TINY_RANK = 4


def tiny_sdxl_unet_on_meta(cfg: TinySDXLConfig = TINY_GENERATION_SDXL):
    """The stand-in UNet's structure without weights (for names and shapes)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**sdxl_unet_config(cfg))


def _lora_pair(out_f: int, in_f: int, rank: int, g: torch.Generator):
    down = torch.randn(rank, in_f, generator=g) * 0.05  # (r, in)
    up = torch.randn(out_f, rank, generator=g) * 0.05  # (out, r); non-zero, unlike training init
    return down, up


def tiny_lora_weights_for(unet, *, rank: int = TINY_RANK, seed: int = 0) -> dict[str, torch.Tensor]:
    """PhotoMaker ``lora_weights`` (old processor format, fp16 like the real files) for
    every attention processor of ``unet``."""
    from generators.lora import PROJECTIONS, attention_linears

    g = torch.Generator().manual_seed(seed)
    linears = attention_linears(unet)
    out = {}
    for name in unet.attn_processors:
        prefix = name.removesuffix(".processor")
        for proj, suffix in PROJECTIONS.items():
            down, up = _lora_pair(*linears[f"{prefix}.{suffix}"], rank, g)
            base = f"unet.{prefix}.processor.to_{proj}_lora"
            out[f"{base}.down.weight"] = down.half()
            out[f"{base}.up.weight"] = up.half()
    return out


def tiny_ip_adapter_for(unet, *, rank: int = TINY_RANK, seed: int = 0) -> dict[str, torch.Tensor]:
    """StoryMaker ``ip_adapter`` (index-keyed, fp32) for every processor of ``unet``."""
    from generators.lora import PROJECTIONS, attention_linears

    g = torch.Generator().manual_seed(seed)
    linears = attention_linears(unet)
    out = {}
    for i, name in enumerate(unet.attn_processors):
        prefix = name.removesuffix(".processor")
        for proj, suffix in PROJECTIONS.items():
            down, up = _lora_pair(*linears[f"{prefix}.{suffix}"], rank, g)
            out[f"{i}.to_{proj}_lora.down.weight"] = down
            out[f"{i}.to_{proj}_lora.up.weight"] = up
        if prefix.endswith("attn2"):
            for proj in ("k", "v"):
                out_f, in_f = linears[f"{prefix}.to_{proj}"]
                out[f"{i}.to_{proj}_ip.weight"] = torch.randn(out_f, in_f, generator=g) * 0.02
    return out


def write_tiny_generation_models(models_dir: Path | str, *, seed: int = 0) -> dict[str, Path]:
    """Write ``sdxl-tiny`` and generation-ready identity stand-ins into ``models_dir``.

    Also writes everything :func:`encoders.standins.id_models.write_tiny_id_models`
    does (the CLIP ViT-H/14 stand-in and the stand-in sidecar), then replaces
    the three checkpoints with versions whose LoRAs fit ``sdxl-tiny``. Same ID
    encoders and seeds, so enrollment computes the same artifacts. Returns the
    paths by key.
    """
    from encoders.standins.id_models import (
        build_tiny_storymaker,
        photomaker_state,
        write_tiny_id_models,
    )

    root = Path(models_dir)
    paths = write_tiny_id_models(root, seed=seed)
    paths["sdxl"] = write_tiny_sdxl(root / TINY_BASE_DIR, TINY_GENERATION_SDXL)
    unet = tiny_sdxl_unet_on_meta()
    for offset, version in enumerate(("v1", "v2")):
        torch.save({"id_encoder": photomaker_state(version, seed + offset),
                    "lora_weights": tiny_lora_weights_for(unet, seed=seed + offset)},
                   paths[f"photomaker-{version}"])
    proj = {k: v.contiguous() for k, v in build_tiny_storymaker(seed + 2).state_dict().items()}
    torch.save({"image_proj_model": proj, "ip_adapter": tiny_ip_adapter_for(unet, seed=seed + 2)},
               paths["storymaker"])
    from generators.standins.instantid import write_tiny_instantid

    paths.update(write_tiny_instantid(root, unet, seed=seed + 3))
    from generators.standins.faceid import write_tiny_faceid

    paths["faceid-plusv2-sdxl"] = write_tiny_faceid(root, unet, seed=seed + 6)
    return paths
