"""A tiny, offline stand-in for ``ip-adapter-faceid-plusv2_sdxl.bin``, and the full-size layout.

:func:`write_tiny_faceid` writes the official file name and layout -- a pickled dict
with exactly ``image_proj`` (``ProjPlusModel`` at :data:`~generators.adapters.faceid.TINY_FACEID`
sizes) and ``ip_adapter`` (index-keyed LoRA on every attention processor, IP
projections on every cross-attention) -- fitted to a given UNet, by default the tiny
SDXL of :mod:`generators.standins.generation` (``sdxl-tiny``), in fp16 like the
release. It lists the file in the models folder's stand-in sidecar, so the loader uses
the tiny sizes for exactly this file. Random weights, non-zero LoRA: it changes the
output and resembles no one.

The projection's sizes follow the UNet (:func:`tiny_config_for`): for 2048-wide tokens
(``sdxl-tiny`` of the generation stand-ins) the small :data:`TINY_FACEID` (about 9 MB);
for a narrower UNet (the default tiny SDXL, 64) the official structure at that width --
four perceiver layers, heads of 64, feed-forward x4, a 1024-wide ``proj`` -- which is what
diffusers' ``load_ip_adapter`` can rebuild (it hard-codes those), for the conformance test.

:func:`full_size_manifest` gives every key and shape of the official full-size file for
SDXL, from the projection model and the full-size SDXL UNet on the meta device;
``docs/manifests/ip_adapter_faceid_plusv2_sdxl.json`` is its output::

    from diffusers import UNet2DConditionModel
    from generators.standins.full_size_sdxl import load_base_manifest
    with torch.device("meta"):
        unet = UNet2DConditionModel(**load_base_manifest(DIR)["sdxl_unet_config"])
    json.dumps(full_size_manifest(unet), indent=1)   # + a newline, into the file

Both take the UNet as an argument, so this module imports no other stand-in module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from generators.adapters.faceid import (
    OFFICIAL_FILE,
    OFFICIAL_LORA_RANK,
    SDXL_CROSS_DIM,
    SOURCE,
    TINY_FACEID,
    FaceIDConfig,
    FaceIDPlusProjection,
    checkpoint_layout,
    ip_adapter_layout,
)

__all__ = ["TINY_FACEID_RANK", "full_size_manifest", "tiny_config_for", "tiny_faceid_state",
           "write_tiny_faceid"]

TINY_FACEID_RANK = 4


def _random_like(shape: tuple[int, ...], name: str, g: torch.Generator) -> torch.Tensor:
    """Weights of a plausible scale: fan-in scaled matrices, norms near 1, small biases
    (norm weights are not all 1 so that mixing up two norms would show)."""
    if len(shape) >= 2:
        return torch.randn(shape, generator=g) / math.sqrt(shape[-1])
    if name.endswith("weight"):  # LayerNorm
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.1 * torch.randn(shape, generator=g)


def tiny_config_for(unet) -> FaceIDConfig:
    """The stand-in's projection sizes for ``unet`` (see the module docstring)."""
    width = int(unet.config.cross_attention_dim)
    if width == SDXL_CROSS_DIM:
        return TINY_FACEID
    return FaceIDConfig(cross_attention_dim=width,
                        clip_embeddings_dim=TINY_FACEID.clip_embeddings_dim)


def tiny_faceid_state(unet, *, config: FaceIDConfig | None = None,
                      rank: int = TINY_FACEID_RANK, seed: int = 0,
                      dtype: torch.dtype = torch.float16) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` fitting ``unet`` (random, seed-fixed);
    ``config`` defaults to :func:`tiny_config_for`."""
    config = tiny_config_for(unet) if config is None else config
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        names = list(FaceIDPlusProjection(config).state_dict().items())
    image_proj = {k: _random_like(tuple(v.shape), k, g).to(dtype) for k, v in names}
    ip_adapter = {}
    for key, shape in ip_adapter_layout(unet, rank).items():
        # LoRA up/down and IP projections: small, non-zero (training starts up at zero).
        scale = 0.02 if key.endswith("_ip.weight") else 0.05
        ip_adapter[key] = (torch.randn(shape, generator=g) * scale).to(dtype)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def write_tiny_faceid(models_dir: Path | str, unet, *, seed: int = 0,
                      safetensors: bool = False) -> Path:
    """Write the stand-in fitting ``unet`` (any device, meta included; e.g.
    :func:`generators.standins.generation.tiny_sdxl_unet_on_meta`) into ``models_dir``
    under the official name (``.safetensors`` with the ``image_proj.`` / ``ip_adapter.``
    prefixes when asked) and list it as a stand-in."""
    from encoders.id.checkpoints import STAND_INS_FILE

    root = Path(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    state = tiny_faceid_state(unet, seed=seed)
    if safetensors:
        from safetensors.torch import save_file

        path = root / OFFICIAL_FILE.replace(".bin", ".safetensors")
        save_file({f"{part}.{k}": v.contiguous() for part, tensors in state.items()
                   for k, v in tensors.items()}, str(path))
    else:
        path = root / OFFICIAL_FILE
        torch.save(state, path)
    sidecar = root / STAND_INS_FILE
    try:
        listed = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        listed = {"note": "idvault's tiny stand-ins: official file names and key layouts at "
                          "tiny sizes, random weights, no real likeness", "files": []}
    if path.name not in listed.setdefault("files", []):
        listed["files"].append(path.name)
    sidecar.write_text(json.dumps(listed, indent=1))
    return path


def full_size_manifest(unet) -> dict:
    """Every key and shape of the official SDXL file, from :class:`FaceIDPlusProjection`
    and ``unet``, the full-size SDXL UNet of ``base_models.json`` (on the meta device):
    the document ``docs/manifests/ip_adapter_faceid_plusv2_sdxl.json`` holds."""
    layout = checkpoint_layout(unet, FaceIDConfig(), OFFICIAL_LORA_RANK)
    params = sum(math.prod(s) for s in layout.values())
    return {
        "_about": (
            f"State-dict names and shapes of {OFFICIAL_FILE} ({SOURCE}): a pickled dict "
            "{'image_proj': ProjPlusModel (proj, norm, perceiver_resampler), 'ip_adapter': "
            "index-keyed by position in unet.attn_processors (SDXL order of base_models.json): "
            f"rank-{OFFICIAL_LORA_RANK} LoRA to_{{q,k,v,out}}_lora.{{down,up}} on all "
            "140 processors, to_{k,v}_ip on the 70 cross-attention (odd) ones}; shown flat "
            "with the safetensors prefixes 'image_proj.' and 'ip_adapter.'. "
            f"{params:,} parameters: 2 bytes each is the published file's 1.49 GB (fp16)."),
        "generated_by": "generators.standins.faceid.full_size_manifest",
        "parameters": params,
        "tensors": {k: list(v) for k, v in layout.items()},
    }
