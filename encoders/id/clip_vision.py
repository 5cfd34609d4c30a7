"""CLIP vision towers for the identity encoders: OpenAI CLIP preprocessing and loading.

PhotoMaker (ViT-L/14, inside its own checkpoint) and StoryMaker (OpenCLIP
ViT-H/14, a separate ``from_pretrained`` folder) both feed photos through a
CLIP vision tower after the preprocessing of transformers'
``CLIPImageProcessor()`` with its defaults, which the official pipelines use:

1. resize so the **shortest side is 224** px, bicubic (PIL), the long side
   ``int(224 * long / short)`` (truncated, as transformers computes it);
2. **centre crop** 224 x 224 (offsets ``(size - 224) // 2``);
3. scale by **1/255** (computed in float64, stored as float32);
4. normalise per channel with the OpenAI CLIP mean and std.

This module reimplements those steps with PIL and numpy (there is no
torchvision here; transformers' own PIL backend gives the same numbers, which
``tests/encoders/id/test_clip_vision.py`` checks), describes tower sizes with
:class:`ClipVisionSpec` (the official ViT-L/14 and ViT-H/14 values are
:data:`VIT_L14` and :data:`VIT_H14`), and loads a tower from a
``from_pretrained`` folder (:class:`ClipVisionTower`), failing with
:class:`~vault.errors.ModelUnavailable` when the folder is absent, broken or
incomplete. The tower's :meth:`ClipVisionTower.penultimate` returns
``hidden_states[-2]`` (what StoryMaker and IP-Adapter-FaceID-Plus consume)
without running the last layer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoders.library_output import quiet_libraries
from vault.errors import InvalidInput, ModelUnavailable

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "VIT_H14",
    "VIT_L14",
    "ClipPreprocess",
    "ClipVisionSpec",
    "ClipVisionTower",
    "build_vision_model",
    "clip_preprocess",
    "penultimate_hidden_states",
    "resize_output_size",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# -- preprocessing --------------------------------------------------------------------


@dataclass(frozen=True)
class ClipPreprocess:
    """``CLIPImageProcessor()`` defaults: shortest side 224 bicubic, centre crop 224."""

    shortest_side: int = 224
    crop: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.shortest_side:
            raise InvalidInput("CLIP preprocessing needs 0 < crop <= shortest_side")


def resize_output_size(height: int, width: int, shortest_side: int = 224) -> tuple[int, int]:
    """``(new_height, new_width)`` with the short side at ``shortest_side``, as transformers."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_side * long / short)
    return (new_long, shortest_side) if width <= height else (shortest_side, new_long)


def _as_pil(image: np.ndarray | Image.Image, index: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0):
        raise InvalidInput(f"image {index}: CLIP input must be an (H, W, 3) uint8 RGB array "
                           f"or a PIL image")
    return Image.fromarray(np.ascontiguousarray(image))


def preprocess_one(image: np.ndarray | Image.Image,
                   config: ClipPreprocess = ClipPreprocess(), *, index: int = 0) -> np.ndarray:
    """One image -> ``(3, crop, crop)`` float32, exactly as ``CLIPImageProcessor()``."""
    pil = _as_pil(image, index)
    new_h, new_w = resize_output_size(pil.height, pil.width, config.shortest_side)
    # PIL returns a copy when the size is unchanged (the 224 px crops StoryMaker feeds).
    resized = np.asarray(pil.resize((new_w, new_h), resample=Image.BICUBIC, reducing_gap=None))
    top = (new_h - config.crop) // 2
    left = (new_w - config.crop) // 2
    cropped = resized[top:top + config.crop, left:left + config.crop]  # (crop, crop, 3) uint8
    scaled = (cropped.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(config.mean, np.float32)
    std = np.asarray(config.std, np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))  # (3, crop, crop)


def clip_preprocess(images: Sequence[np.ndarray | Image.Image],
                    config: ClipPreprocess = ClipPreprocess()) -> torch.Tensor:
    """RGB images (uint8 arrays or PIL) -> pixel values ``(batch, 3, 224, 224)`` float32."""
    if len(images) == 0:
        raise InvalidInput("no images to preprocess")
    return torch.from_numpy(np.stack([preprocess_one(im, config, index=i)
                                      for i, im in enumerate(images)]))


# -- tower sizes ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClipVisionSpec:
    """The sizes of a CLIP vision tower (fields of transformers' ``CLIPVisionConfig``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    image_size: int = 224
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_positions(self) -> int:
        """Patch tokens plus the class token (257 for /14 at 224 px)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_config(self):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**asdict(self))

    @classmethod
    def from_config(cls, config) -> ClipVisionSpec:
        return cls(**{k: getattr(config, k) for k in cls.__dataclass_fields__})


# OpenAI CLIP ViT-L/14 at 224 px, as PhotoMaker's VISION_CONFIG_DICT (quick_gelu is
# CLIPVisionConfig's default activation, which the official config relies on).
VIT_L14 = ClipVisionSpec(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, patch_size=14, image_size=224,
                         projection_dim=768, hidden_act="quick_gelu")
# OpenCLIP ViT-H/14 (laion2B-s32B-b79K) vision tower, as in manifests/base_models.json.
VIT_H14 = ClipVisionSpec(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                         num_attention_heads=16, patch_size=14, image_size=224,
                         projection_dim=1024, hidden_act="gelu")
# The stand-ins of `idvault models tiny` (encoders.standins.id_models): the layouts above at
# 32 wide, patch 32 (50 positions). ViT-L/14's: quick_gelu, 768 + 1280 projections, 2 layers.
TINY_VIT_L = ClipVisionSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, patch_size=32, image_size=224,
                            projection_dim=768, hidden_act="quick_gelu")
# ViT-H/14's: gelu, 3 layers.
TINY_VIT_H = ClipVisionSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, patch_size=32, image_size=224,
                            projection_dim=16, hidden_act="gelu")


def build_vision_model(spec: ClipVisionSpec):
    """A transformers ``CLIPVisionModel`` of these sizes (random weights; meta under
    ``torch.device('meta')``). Its state-dict names are the official ``vision_model.*``
    ones once it is a ``vision_model`` attribute."""
    from transformers import CLIPVisionModel

    with quiet_libraries():
        return CLIPVisionModel(spec.to_config())


def penultimate_hidden_states(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """``model(pixel_values, output_hidden_states=True).hidden_states[-2]``, minus the
    last layer's work: embeddings, pre-LayerNorm and every encoder layer but the last.

    ``model`` is a transformers ``CLIPVisionModel``; the result is
    ``(batch, positions, hidden)``, e.g. ``(batch, 257, 1280)`` for ViT-H/14.
    """
    hidden = model.embeddings(pixel_values)  # (batch, positions, hidden)
    hidden = model.pre_layrnorm(hidden)
    for layer in model.encoder.layers[:-1]:
        hidden = layer(hidden, None)
    return hidden


def materialize_position_ids(module: torch.nn.Module, device: torch.device | str, *,
                             reset: bool = False) -> None:
    """Recreate the non-persistent ``position_ids`` buffers left on the meta device when a
    module built under ``torch.device('meta')`` is loaded with ``assign=True`` (``reset``:
    also those ``to_empty`` left uninitialised)."""
    for owner in module.modules():
        buffers = owner._buffers
        ids = buffers.get("position_ids")
        if ids is not None and (ids.is_meta or reset):
            count = ids.shape[-1]
            buffers["position_ids"] = torch.arange(count, device=device).expand((1, -1))
    leftover = [n for n, b in module.named_buffers() if b.is_meta]
    leftover += [n for n, p in module.named_parameters() if p.is_meta]
    if leftover:  # pragma: no cover - a programming error, not a user's
        raise RuntimeError(f"tensors left on the meta device after loading: {leftover[:5]}")


# -- a tower loaded from a from_pretrained folder -------------------------------------------

# What transformers loads from a folder, in its order of preference.
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def weights_files(folder: Path) -> list[Path]:
    """The files ``from_pretrained`` reads weights from (shards included), or []."""
    for name in _WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            if name.endswith(".index.json"):
                try:
                    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
                except (OSError, ValueError, KeyError, TypeError):
                    return [path]
                return [path] + [folder / s for s in shards]
            return [path]
    return []


def folder_problem(folder: Path) -> str | None:
    """None when ``folder`` looks like a ``from_pretrained`` CLIP folder, else what is wrong."""
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "not a folder"
    config = folder / "config.json"
    if not config.is_file():
        return "no config.json (a from_pretrained folder needs config.json and weights)"
    try:
        doc = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        return f"config.json is not readable JSON ({exc})"
    if not isinstance(doc, dict) or doc.get("model_type") not in ("clip", "clip_vision_model"):
        kind = doc.get("model_type") if isinstance(doc, dict) else None
        return f"config.json describes a {kind!r} model, not CLIP"
    files = weights_files(folder)
    if not files:
        return "no weights (model.safetensors or pytorch_model.bin)"
    for path in files:
        if not path.is_file():
            return f"{path.name} is missing"
        with path.open("rb") as handle:
            head = handle.read(64)
        if head.startswith(b"version https://git-lfs"):
            return f"{path.name} is a Git LFS pointer, not the weights (run `git lfs pull`)"
    return None


class ClipVisionTower:
    """A CLIP vision tower loaded from a ``from_pretrained`` folder.

    Accepts folders saved from ``CLIPVisionModelWithProjection`` (e.g.
    IP-Adapter's ``image_encoder``), ``CLIPVisionModel`` or a whole ``CLIPModel``
    (e.g. ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``): only the vision weights are
    used, and every one of them must be in the folder.
    """

    def __init__(self, model, folder: Path | None, device: torch.device, dtype: torch.dtype):
        self.model = model.eval()
        self.folder = folder
        self.device = device
        self.dtype = dtype
        self.spec = ClipVisionSpec.from_config(model.config)

    @classmethod
    def from_pretrained(cls, folder: Path | str, *, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> ClipVisionTower:
        from transformers import CLIPVisionModel

        folder = Path(folder)
        problem = folder_problem(folder)
        if problem:
            raise ModelUnavailable(f"CLIP vision tower {folder}: {problem}", path=str(folder))
        try:
            with quiet_libraries():
                model, info = CLIPVisionModel.from_pretrained(
                    folder, output_loading_info=True, dtype=dtype)
        except Exception as exc:
            raise ModelUnavailable(
                f"CLIP vision tower {folder}: cannot be loaded ({type(exc).__name__}: {exc})",
                path=str(folder)) from None
        missing = sorted(info.get("missing_keys") or ())
        mismatched = sorted(str(m) for m in (info.get("mismatched_keys") or ()))
        if missing or mismatched:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing weight(s): {_listing(missing)}")
            if mismatched:
                parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
            raise ModelUnavailable(f"CLIP vision tower {folder}: incomplete checkpoint, "
                                   + "; ".join(parts), path=str(folder))
        device = torch.device(device)
        return cls(model.to(device), folder, device, dtype)

    @property
    def hidden_size(self) -> int:
        return self.spec.hidden_size

    @torch.inference_mode()
    def penultimate(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``hidden_states[-2]``: ``(batch, 257, hidden)`` for 224 px and patch 14."""
        return penultimate_hidden_states(
            self.model, pixel_values.to(self.device, self.dtype))

    @torch.inference_mode()
    def encode_images(self, images: Sequence[np.ndarray | Image.Image]) -> torch.Tensor:
        """Preprocess RGB images and return their penultimate hidden states."""
        return self.penultimate(clip_preprocess(images))


def _listing(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
