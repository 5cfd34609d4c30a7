"""The SDXL base pipeline: where its components come from, loading them, and decoding.

The diffusers SDXL components (two tokenizers, two text encoders, UNet, VAE,
scheduler) come from ``StableDiffusionXLPipeline.from_pretrained``: a local
folder, a Hugging Face hub name, or -- with no ``base_model`` -- the first SDXL
folder in the models folder (:data:`BASE_MODEL_DIRS`, which ends with the
``sdxl-tiny`` stand-in of ``idvault models tiny``). Nothing is loaded or
downloaded at import; an absent model is a :class:`~vault.errors.ModelUnavailable`
naming what and where.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from encoders.library_output import quiet_libraries
from vault.errors import ModelUnavailable

__all__ = ["BASE_MODEL_DIRS", "decode_latents", "find_base_model", "load_sdxl"]

# Folders a models folder may hold an SDXL base model in (diffusers layout, model_index.json),
# in order of preference: the real releases' names first, the tiny stand-in last.
BASE_MODEL_DIRS = ("stable-diffusion-xl-base-1.0", "sdxl-base-1.0", "sdxl-base", "sdxl",
                   "sdxl-tiny")


def find_base_model(base_model: str | Path | None, models_dir: Path | str | None = None,
                    env: Mapping[str, str] | None = None) -> str | Path:
    """Where the SDXL components come from: a folder (``Path``) or a hub name (``str``).

    ``None`` looks in the models folder (``--models``, ``IDVAULT_MODELS``,
    ``~/.insightface``) for the folders of :data:`BASE_MODEL_DIRS`.
    """
    from encoders.face.pack import resolve_models_dir

    if base_model is None or str(base_model) == "":
        root = resolve_models_dir(models_dir, env)
        for name in BASE_MODEL_DIRS:
            if (root / name / "model_index.json").is_file():
                return root / name
        raise ModelUnavailable(
            f"no SDXL base model given (--base-model) and none found in the models folder "
            f"{root}: looked for a diffusers folder (with model_index.json) named "
            f"{', '.join(BASE_MODEL_DIRS)}. Pass --base-model DIR or a Hugging Face name "
            "(e.g. stabilityai/stable-diffusion-xl-base-1.0), or `idvault models tiny DIR` "
            "for an offline stand-in that makes noise, not pictures", searched=str(root))
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelUnavailable(f"base model {path}: not a diffusers pipeline folder (no "
                                   "model_index.json); single-file checkpoints are not "
                                   "supported", path=str(path))
        return path
    text = str(base_model)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text  # a hub name: from_pretrained finds it in the cache or downloads it
    raise ModelUnavailable(f"base model {text}: no such folder, and not a Hugging Face name "
                           "(owner/name)", path=text)


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
