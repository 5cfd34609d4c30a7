"""Tiny stand-ins for the PhotoMaker and StoryMaker checkpoints, for tests and demos.

No PhotoMaker, StoryMaker or CLIP weights exist on the machines idvault is
developed and tested on. This module writes files in the **official layouts
and under the official names** -- ``photomaker-v1.bin`` / ``photomaker-v2.bin``
(a pickled ``{"id_encoder", "lora_weights"}`` dict, id_encoder in mixed
bf16/fp32 like the real files), their flat ``.safetensors`` variants, StoryMaker's
``mask.bin`` (``{"image_proj_model", "ip_adapter"}``, fp32) and a CLIP vision
tower saved with ``save_pretrained`` -- with the same tensor **names**, but
small sizes and random weights, so the loading, checking and encoding code
users run is exercised end to end.

**They recognise nobody and produce no likeness.** Their outputs have the
real artifact shapes ((photos, 1|2, 2048) and (20, 2048)) because the token
width stays 2048; everything inside is shrunk through the config
dataclasses (:data:`TINY_PHOTOMAKER`, :data:`TINY_STORYMAKER`,
:data:`TINY_VIT_H`), which the loaders need to be given::

    paths = write_tiny_id_models(models_dir)
    PhotoMakerEncoder.from_models_dir(models_dir, config=TINY_PHOTOMAKER)
    StoryMakerEncoder.from_models_dir(models_dir, config=TINY_STORYMAKER)

The ``lora_weights`` and ``ip_adapter`` parts cover a handful of SDXL
attention processors at rank 4, with the real key naming and real
input/output widths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from encoders.id.checkpoints import STAND_INS_FILE
from encoders.id.clip_vision import TINY_VIT_H, ClipVisionSpec
from encoders.id.photomaker import TINY_PHOTOMAKER, PhotoMakerConfig, PhotoMakerIDEncoder, Version
from encoders.id.storymaker import TINY_STORYMAKER, StoryMakerConfig, StoryMakerImageProj
from encoders.library_output import quiet_libraries

__all__ = [
    "build_tiny_photomaker",
    "build_tiny_storymaker",
    "tiny_ip_adapter",
    "tiny_lora_weights",
    "write_tiny_clip_vision",
    "write_tiny_id_models",
    "write_tiny_photomaker",
    "write_tiny_storymaker",
]

TINY_RANK = 4
# (processor, hidden width, cross-attention width or None): a few of SDXL's 140.
_PROCESSORS = (
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1", 640, None),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2", 640, 2048),
    ("mid_block.attentions.0.transformer_blocks.0.attn1", 1280, None),
    ("mid_block.attentions.0.transformer_blocks.0.attn2", 1280, 2048),
)


def _randomize(module: nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Small random values in every parameter, LayerNorms near identity."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * std
            if isinstance(_owner(module, name), nn.LayerNorm) and name.endswith("weight"):
                p.copy_(1 + noise)
            else:
                p.copy_(noise)


def _owner(module: nn.Module, name: str) -> nn.Module:
    return module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module


def build_tiny_photomaker(version: Version, seed: int = 0,
                          config: PhotoMakerConfig = TINY_PHOTOMAKER) -> PhotoMakerIDEncoder:
    model = PhotoMakerIDEncoder(version, config)
    _randomize(model, torch.Generator().manual_seed(seed))
    return model.eval()


def build_tiny_storymaker(seed: int = 0,
                          config: StoryMakerConfig = TINY_STORYMAKER) -> StoryMakerImageProj:
    model = StoryMakerImageProj(config)
    _randomize(model, torch.Generator().manual_seed(seed))
    return model.eval()


def tiny_lora_weights(rank: int = TINY_RANK, seed: int = 0) -> dict[str, torch.Tensor]:
    """``lora_weights`` keys as in photomaker-v*.bin (``unet.<processor>.processor.
    to_{q,k,v,out}_lora.{down,up}.weight``) for a few processors; fp16, rank ``rank``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for proc, hidden, cross in _PROCESSORS:
        for proj in ("q", "k", "v", "out"):
            width_in = cross if (cross and proj in ("k", "v")) else hidden
            base = f"unet.{proc}.processor.to_{proj}_lora"
            out[f"{base}.down.weight"] = (torch.randn(rank, width_in, generator=g) * 0.01).half()
            out[f"{base}.up.weight"] = torch.zeros(hidden, rank, dtype=torch.float16)
    return out


def tiny_ip_adapter(rank: int = TINY_RANK, seed: int = 0) -> dict[str, torch.Tensor]:
    """``ip_adapter`` keys as in mask.bin (``<index>.to_*_lora.{down,up}.weight``, odd
    indices also ``to_k_ip`` / ``to_v_ip``) for the first two SDXL processors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for index, (_, hidden, cross) in enumerate(_PROCESSORS[:2]):
        for proj in ("q", "k", "v", "out"):
            width_in = cross if (cross and proj in ("k", "v")) else hidden
            out[f"{index}.to_{proj}_lora.down.weight"] = torch.randn(rank, width_in,
                                                                      generator=g) * 0.01
            out[f"{index}.to_{proj}_lora.up.weight"] = torch.zeros(hidden, rank)
        if cross:
            out[f"{index}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.01
            out[f"{index}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * 0.01
    return out


def photomaker_state(version: Version, seed: int = 0,
                     config: PhotoMakerConfig = TINY_PHOTOMAKER) -> dict[str, torch.Tensor]:
    """The id_encoder state dict as the official files store it: the CLIP tower in
    bf16, the rest in fp32."""
    state = build_tiny_photomaker(version, seed, config).state_dict()
    return {k: (v.to(torch.bfloat16) if k.startswith("vision_model.") else v).contiguous()
            for k, v in state.items()}


def write_tiny_photomaker(path: Path | str, version: Version, *, seed: int = 0,
                          config: PhotoMakerConfig = TINY_PHOTOMAKER,
                          with_position_ids: bool = False) -> Path:
    """A tiny ``photomaker-v1.bin`` / ``-v2.bin``, or the flat safetensors variant when
    ``path`` ends in ``.safetensors``. ``with_position_ids`` adds the CLIP buffer
    older exports keep."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = photomaker_state(version, seed, config)
    if with_position_ids:
        n = config.vision.num_positions
        ids["vision_model.embeddings.position_ids"] = torch.arange(n).expand((1, -1)).clone()
    lora = tiny_lora_weights(seed=seed)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"id_encoder.{k}": v for k, v in ids.items()}
        flat.update({f"lora_weights.{k}": v for k, v in lora.items()})
        save_file(flat, str(path))
    else:
        torch.save({"id_encoder": ids, "lora_weights": lora}, path)
    return path


def write_tiny_storymaker(path: Path | str, *, seed: int = 0,
                          config: StoryMakerConfig = TINY_STORYMAKER) -> Path:
    """A tiny ``mask.bin``: ``{"image_proj_model": ..., "ip_adapter": ...}``, fp32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in build_tiny_storymaker(seed, config).state_dict().items()}
    torch.save({"image_proj_model": state, "ip_adapter": tiny_ip_adapter(seed=seed)}, path)
    return path


def write_tiny_clip_vision(folder: Path | str, *, seed: int = 0,
                           spec: ClipVisionSpec = TINY_VIT_H) -> Path:
    """A ``from_pretrained`` folder (config.json + model.safetensors) of a tiny
    ``CLIPVisionModelWithProjection``, like IP-Adapter's ``image_encoder``."""
    from transformers import CLIPVisionModelWithProjection

    folder = Path(folder)
    with quiet_libraries(), torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(spec.to_config())
        model.save_pretrained(folder)
    return folder


def write_tiny_id_models(models_dir: Path | str, *, seed: int = 0) -> dict[str, Path]:
    """All stand-ins under their official names in ``models_dir``; returns their paths."""
    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "photomaker-v1": write_tiny_photomaker(root / "photomaker-v1.bin", "v1", seed=seed),
        "photomaker-v2": write_tiny_photomaker(root / "photomaker-v2.bin", "v2", seed=seed + 1),
        "storymaker": write_tiny_storymaker(root / "mask.bin", seed=seed + 2),
        "clip-vit-h-14": write_tiny_clip_vision(root / "clip-vit-h-14", seed=seed + 3),
    }
    # Lets the loaders pick the tiny configuration for exactly these files.
    (root / STAND_INS_FILE).write_text(json.dumps({
        "note": "idvault's tiny stand-ins: official file names and key layouts at tiny "
                "sizes, random weights, no real likeness",
        "files": ["photomaker-v1.bin", "photomaker-v2.bin", "mask.bin"],
    }, indent=1))
    return paths
