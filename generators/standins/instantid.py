"""InstantID's files as stand-ins: ``ip-adapter.bin`` and the ``ControlNetModel`` folder, in the
official names and layouts, random weights.

* :func:`write_tiny_instantid` writes ``DIR/InstantID/ip-adapter.bin`` (``image_proj`` of
  :data:`~generators.adapters.instantid.TINY_INSTANTID`, ``ip_adapter`` with
  ``to_k_ip``/``to_v_ip`` on every cross-attention processor of the tiny generation SDXL)
  and ``DIR/InstantID/ControlNetModel`` (``ControlNetModel.from_unet`` of that UNet's config, saved
  with ``save_pretrained``), listed as stand-ins beside them so the loaders use the tiny
  sizes for exactly these files. The ControlNet's zero-initialised convolutions (its
  residual outputs and the conditioning embedding's last layer) get random values too, so
  its residuals are not zero and tests can see them act.
* :func:`full_size_manifests` gives the official full-size layouts that
  ``docs/manifests/instantid_ip_adapter.json`` and ``instantid_controlnet.json`` hold.
* :func:`write_full_size_instantid` writes the same two at the official sizes (random, not
  listed as stand-ins: the loaders check them against the official layouts), for
  benchmarks of the real cost.

**Noise, not pictures**: none of this resembles anyone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from generators.adapters.instantid import (
    INSTANTID,
    OFFICIAL_CONTROLNET_CONFIG,
    TINY_INSTANTID,
    InstantIDConfig,
    build_image_proj,
    controlnet_layout,
    ip_adapter_layout,
)

__all__ = ["INSTANTID_DIR", "full_size_manifests", "write_full_size_instantid",
           "write_tiny_instantid"]

INSTANTID_DIR = "InstantID"  # the folder named after the Hugging Face repository


def _ip_adapter(unet, g: torch.Generator, dtype: torch.dtype = torch.float32) -> dict:
    # Near the layer's own to_k/to_v scale (0.02), as a trained projection would be.
    return {k: (torch.randn(shape, generator=g) * 0.02).to(dtype)
            for k, shape in ip_adapter_layout(unet).items()}


def _image_proj(config: InstantIDConfig, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return {k: v.contiguous() for k, v in build_image_proj(config).state_dict().items()}


def write_tiny_instantid(models_dir: Path | str, unet, *, seed: int = 0) -> dict[str, Path]:
    """Write the tiny stand-ins for ``unet`` (the tiny generation SDXL's; its structure is
    enough, the meta device will do) into ``models_dir/InstantID``; returns their paths by
    checkpoint key."""
    from diffusers import ControlNetModel

    from encoders.id.checkpoints import STAND_INS_FILE
    from encoders.library_output import quiet_libraries

    folder = Path(models_dir) / INSTANTID_DIR
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    adapter = folder / "ip-adapter.bin"
    torch.save({"image_proj": _image_proj(TINY_INSTANTID, seed),
                "ip_adapter": _ip_adapter(unet, g)}, adapter)
    with torch.random.fork_rng(), quiet_libraries():
        torch.manual_seed(seed + 1)
        # The UNet's structure, the ControlNet's own random initialisation.
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False).eval()
        with torch.no_grad():
            for p in controlnet.parameters():
                if not p.any():  # the zero convolutions
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        controlnet.save_pretrained(folder / "ControlNetModel", safe_serialization=True)
    sidecar = folder / STAND_INS_FILE
    listed = set()
    if sidecar.exists():
        listed = set(json.loads(sidecar.read_text()).get("files", []))
    sidecar.write_text(json.dumps({"files": sorted(listed | {"ip-adapter.bin",
                                                              "ControlNetModel"})}))
    return {"instantid-ip-adapter": adapter, "instantid-controlnet": folder / "ControlNetModel"}


def write_full_size_instantid(models_dir: Path | str, unet, *, seed: int = 0,
                              dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Random ``ip-adapter.bin`` (fp32, as released) and ``ControlNetModel`` (``dtype``; the
    release is fp16, 2.5 GB) at the official sizes for the full-size SDXL ``unet`` (any
    device, meta included), in ``models_dir/InstantID``."""
    from safetensors.torch import save_file

    folder = Path(models_dir) / INSTANTID_DIR
    (folder / "ControlNetModel").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    adapter = folder / "ip-adapter.bin"
    torch.save({"image_proj": _image_proj(INSTANTID, seed), "ip_adapter": _ip_adapter(unet, g)},
               adapter)
    config = dict(OFFICIAL_CONTROLNET_CONFIG)
    (folder / "ControlNetModel" / "config.json").write_text(json.dumps(config, indent=2))
    weights = {k: (torch.randn(shape, generator=g) * 0.02).to(dtype)
               for k, shape in controlnet_layout(config).items()}
    save_file(weights, str(folder / "ControlNetModel" / "diffusion_pytorch_model.safetensors"))
    return {"instantid-ip-adapter": adapter, "instantid-controlnet": folder / "ControlNetModel"}


SOURCE = "https://huggingface.co/InstantX/InstantID"


def full_size_manifests(manifests: Path | str) -> tuple[dict, dict]:
    """``(ip-adapter.bin, ControlNetModel)`` documents: every key and shape of the official
    files, from the modules and the full-size SDXL UNet of ``manifests/base_models.json``
    (the reference facts), all on the meta device."""
    import math

    from diffusers import UNet2DConditionModel

    from generators.adapters.instantid import image_proj_layout

    base = json.loads((Path(manifests) / "base_models.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**base["sdxl_unet_config"])
    proj, ip = image_proj_layout(INSTANTID), ip_adapter_layout(unet)
    adapter_params = sum(math.prod(s) for s in (*proj.values(), *ip.values()))
    adapter = {
        "_about": (
            f"State-dict names and shapes of ip-adapter.bin ({SOURCE}): a pickled dict "
            "{'image_proj': IP-Adapter's Resampler(dim=1280, depth=4, dim_head=64, heads=20, "
            "num_queries=16, embedding_dim=512, output_dim=2048, ff_mult=4), 'ip_adapter': "
            "index-keyed by position in unet.attn_processors (SDXL order of "
            "base_models.json): to_k_ip/to_v_ip on the 70 cross-attention (odd) processors}. "
            f"{adapter_params:,} parameters: 4 bytes each (fp32) is the published file's "
            "1.69 GB."),
        "generated_by": "generators.standins.instantid.full_size_manifests",
        "parameters": adapter_params,
        "image_proj": {k: list(v) for k, v in proj.items()},
        "ip_adapter": {k: list(v) for k, v in ip.items()},
    }
    layout = controlnet_layout(OFFICIAL_CONTROLNET_CONFIG)
    controlnet_params = sum(math.prod(s) for s in layout.values())
    controlnet = {
        "_about": (
            f"ControlNetModel/config.json of {SOURCE} (less _name_or_path) and the names and "
            "shapes of ControlNetModel/diffusion_pytorch_model.safetensors, as diffusers' "
            f"ControlNetModel builds them from that config. {controlnet_params:,} parameters: "
            "2 bytes each (fp16) is the published file's 2.5 GB."),
        "generated_by": "generators.standins.instantid.full_size_manifests",
        "config": OFFICIAL_CONTROLNET_CONFIG,
        "parameters": controlnet_params,
        "tensors": {k: list(v) for k, v in layout.items()},
    }
    return adapter, controlnet
