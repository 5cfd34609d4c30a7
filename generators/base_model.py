"""Where the SDXL base model comes from: a folder, a hub name, or the models folder.

Torch-free on purpose: ``idvault generate`` calls :func:`find_base_model` before
it imports the ML stack, so a missing base model is reported at once
(:mod:`generators.sdxl` loads what this finds).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from vault.errors import ModelUnavailable

__all__ = ["BASE_MODEL_DIRS", "find_base_model"]

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

