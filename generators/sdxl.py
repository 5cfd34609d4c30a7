"""The SDXL base pipeline: where its components come from, loading them, and decoding.

The diffusers SDXL components (two tokenizers, two text encoders, UNet, VAE,
scheduler) come from ``StableDiffusionXLPipeline.from_pretrained``: a local
folder, a Hugging Face hub name, or -- with no ``base_model`` -- the first SDXL
folder in the models folder (:data:`~generators.base_model.BASE_MODEL_DIRS`,
which ends with the ``sdxl-tiny`` stand-in of ``idvault models tiny``). Nothing is loaded or
downloaded at import; an absent model is a :class:`~vault.errors.ModelUnavailable`
naming what and where.
"""

from __future__ import annotations

from pathlib import Path

import torch

from encoders.library_output import quiet_libraries
from generators.base_model import BASE_MODEL_DIRS, find_base_model
from vault.errors import ModelUnavailable

# BASE_MODEL_DIRS and find_base_model live in the torch-free generators.base_model (the CLI
# checks the base model before importing torch); re-exported for the loaders' callers.
__all__ = ["BASE_MODEL_DIRS", "decode_latents", "find_base_model", "load_sdxl"]


def load_sdxl(source: str | Path, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None):
    """``StableDiffusionXLPipeline.from_pretrained(source)`` on ``device`` (default: CUDA if
    present) in ``dtype`` (default: float16 on CUDA, float32 on CPU); ModelUnavailable on
    any failure, naming the source."""
    from diffusers import StableDiffusionXLPipeline

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    from diffusers.pipelines import pipeline_utils

    # diffusers >= 0.36 names it dtype (torch_dtype warns); older releases know only torch_dtype.
    dtype_kw = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    try:
        with quiet_libraries():
            pipe = StableDiffusionXLPipeline.from_pretrained(str(source), **{dtype_kw: dtype})
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailable(f"SDXL base model {source}: cannot be loaded with "
                               f"StableDiffusionXLPipeline.from_pretrained: {first}",
                               path=str(source)) from None
    missing = [n for n in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
               if getattr(pipe, n, None) is None]
    if missing:
        raise ModelUnavailable(f"SDXL base model {source}: lacks {', '.join(missing)} (a "
                               "refiner? the generator needs the base model)", path=str(source))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def decode_latents(pipe, latents: torch.Tensor):
    """The diffusers SDXL decode: VAE (upcast from fp16 when the VAE asks), watermark if
    installed, post-processing to a PIL image."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and vae.config.force_upcast
    if upcast:
        vae.to(dtype=torch.float32)
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    try:
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
    finally:
        if upcast:
            vae.to(dtype=torch.float16)
    if getattr(pipe, "watermark", None) is not None:
        image = pipe.watermark.apply_watermark(image)
    return pipe.image_processor.postprocess(image, output_type="pil")[0]
