"""StoryMaker character tokens, compatible with the official ``mask.bin``.

StoryMaker (RedAIGC/StoryMaker; ``ip_adapter/ip_adapter_faceid.py`` class
``faceid_plus``, ``pipeline_sdxl_storymaker.py``) describes each character
with **20 tokens of 2048**: 4 face tokens and 16 character tokens.

Per character (one person in one photo):

1. the L2-normalised ArcFace embedding (buffalo_l ``normed_embedding``, 512);
2. the **face crop**: ``face_align.norm_crop(photo, kps, image_size=224)``;
3. the **character crop**: the bounding box of the person mask, the mask
   Gaussian-blurred 5x5, the person composited on white, resized to 224x224
   (PIL bicubic) -- exactly the official ``crop_image``. Without a mask, a
   documented fallback crop around the face box (:class:`FallbackCrop`,
   recorded as ``crop=face_box_fallback``); with a clothing image, that image
   resized to 224x224 replaces the character crop (``crop=cloth``);
4. both crops through OpenCLIP ViT-H/14 (``hidden_states[-2]``, 257 x 1280)
   after CLIP preprocessing (:mod:`encoders.id.clip_vision`).

The ``image_proj_model`` (:class:`StoryMakerImageProj`, state-dict names as
the official ``faceid_plus``) then computes face tokens ``proj`` 512 -> 1024 ->
4 x 2048 + LayerNorm, refined by a perceiver (2048, depth 4, 32 heads x 64)
over the face-crop features with a residual, and 16 character tokens from a
Resampler (1280, 16 queries, depth 4, 20 heads x 64, out 2048) over the
character-crop features. Those 20 tokens, **before the slot position
embedding**, are what enrollment stores (kind ``storymaker``), so the
generator can put the character in any slot: :meth:`StoryMakerImageProj.compose`
adds ``pos_embed[slot]``, applies ``norm_out(proj_out(x)) + x`` and prepends
``bg_embed`` -- the official forward, which :meth:`StoryMakerImageProj.forward`
reproduces in one call. :meth:`StoryMakerImageProj.negative_tokens` gives the
projection of zero inputs (the official negative).

One artifact per identity, from **one photo** (not an average): StoryMaker
was trained with one reference image per character, its tokens are outputs
of LayerNorms and attention (an average of them is not a point the model has
seen), and the 16 character tokens describe one outfit and hair-do, which
averaging across photos would blend. :func:`pick_reference` chooses the photo
with the largest face (ties: detector score), which gives the 224 px face crop
the most detail; a caller with a person mask for a photo should prefer that
photo.

Integration contract (for enrollment)::

    encoder = StoryMakerEncoder.from_models_dir(models_dir)   # mask.bin + CLIP ViT-H/14
    i = pick_reference(faces)
    tensors, metadata = encoder.encode(photos[i], faces[i], mask=None, cloth=None)
    payload = vault.codec.encode("storymaker", tensors, metadata)

``tensors == {"tokens": float32 (20, 2048)}`` and ``metadata == {"model_id":
"storymaker/mask.bin@<sha256[:16]>+clip@<sha256[:16]>", "crop":
"mask"|"face_box_fallback"|"cloth"}``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from insightface.utils import face_align
from PIL import Image
from torch import nn

import encoders.face.analyzer  # noqa: F401 - silences insightface's alignment FutureWarning
from encoders.id.checkpoints import (
    compare_layout,
    file_digest,
    find_checkpoint,
    folder_digest,
    is_stand_in,
    layout_error,
    read_pickle_checkpoint,
    shapes_of,
)
from encoders.id.clip_vision import TINY_VIT_H, ClipVisionTower, clip_preprocess
from encoders.id.photomaker import FacePerceiverResampler, Resampler, default_device
from vault.errors import InvalidInput, ModelUnavailable, PhotoRejected

__all__ = [
    "TINY_STORYMAKER",
    "CharacterInputs",
    "FallbackCrop",
    "StoryMakerCheckpoint",
    "StoryMakerConfig",
    "StoryMakerEncoder",
    "StoryMakerImageProj",
    "character_crop",
    "character_inputs",
    "cloth_crop",
    "expected_layout",
    "face_crop",
    "fallback_box",
    "fallback_crop",
    "load_storymaker",
    "pick_reference",
    "read_storymaker_checkpoint",
]

CROP_SIZE = 224
NEGATIVE_POSITIONS = 257  # CLIP positions of the all-zero negative features (ViT-H/14 at 224)


# -- the image projection model --------------------------------------------------------------


@dataclass(frozen=True)
class StoryMakerConfig:
    """Sizes of ``faceid_plus``; the defaults are the official ones."""

    cross_attention_dim: int = 2048  # token width (SDXL cross-attention)
    id_embeddings_dim: int = 512  # ArcFace
    clip_embeddings_dim: int = 1280  # ViT-H/14 hidden size
    num_face_tokens: int = 4
    max_characters: int = 3  # pos_embed slots
    proj_hidden: int | None = None  # face-token MLP width (official: 2 x 512)
    face_depth: int = 4
    face_dim_head: int = 64
    face_heads: int | None = None  # official: 2048 // 64 = 32
    face_ff_mult: float = 4
    resampler_dim: int = 1280
    resampler_queries: int = 16  # character tokens
    resampler_depth: int = 4
    resampler_dim_head: int = 64
    resampler_heads: int = 20
    resampler_ff_mult: float = 4

    @property
    def num_tokens(self) -> int:
        """Tokens per character: 4 face + 16 character = 20."""
        return self.num_face_tokens + self.resampler_queries


# The stand-ins' sizes (`idvault models tiny`, encoders.standins.id_models); 20 tokens of 2048.
TINY_STORYMAKER = StoryMakerConfig(clip_embeddings_dim=TINY_VIT_H.hidden_size, proj_hidden=16,
                                   face_depth=1, face_dim_head=8, face_heads=2,
                                   face_ff_mult=1 / 128, resampler_dim=32, resampler_depth=1,
                                   resampler_dim_head=8, resampler_heads=2, resampler_ff_mult=2)


class StoryMakerImageProj(nn.Module):
    """``faceid_plus``: ``proj``, ``norm``, ``pos_embed``, ``bg_embed``, ``proj_out``,
    ``norm_out``, ``perceiver_resampler`` and ``resample``, as in ``mask.bin``."""

    def __init__(self, config: StoryMakerConfig = StoryMakerConfig()) -> None:
        super().__init__()
        c = config
        self.config = c
        d = c.cross_attention_dim
        hidden = c.proj_hidden or c.id_embeddings_dim * 2
        self.proj = nn.Sequential(nn.Linear(c.id_embeddings_dim, hidden), nn.GELU(),
                                  nn.Linear(hidden, d * c.num_face_tokens))
        self.norm = nn.LayerNorm(d)
        self.pos_embed = nn.Parameter(torch.zeros(c.max_characters, c.num_tokens, d))
        self.bg_embed = nn.Parameter(torch.zeros(1, c.num_tokens, d))
        self.proj_out = nn.Linear(d, d)
        self.norm_out = nn.LayerNorm(d)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=d, depth=c.face_depth, dim_head=c.face_dim_head,
            heads=c.face_heads or d // c.face_dim_head, embedding_dim=c.clip_embeddings_dim,
            output_dim=d, ff_mult=c.face_ff_mult)
        self.resample = Resampler(
            dim=c.resampler_dim, depth=c.resampler_depth, dim_head=c.resampler_dim_head,
            heads=c.resampler_heads, num_queries=c.resampler_queries,
            embedding_dim=c.clip_embeddings_dim, output_dim=d, ff_mult=c.resampler_ff_mult)

    def face_tokens(self, id_embeds: torch.Tensor, face_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 512) normed ArcFace + (B, 257, 1280) face-crop CLIP -> (B, 4, 2048)."""
        c = self.config
        x = self.proj(id_embeds).reshape(-1, c.num_face_tokens, c.cross_attention_dim)
        x = self.norm(x)  # (B, 4, D)
        return x + self.perceiver_resampler(x, face_embeds)

    def character_tokens(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor,
                         face_embeds: torch.Tensor) -> torch.Tensor:
        """The stored tokens: ``cat[face tokens, Resampler(character crop)]`` (B, 20, 2048),
        before the slot position embedding. Argument order as the official forward:
        ``clip_embeds`` are the character-crop features, ``face_embeds`` the face crop's."""
        face = self.face_tokens(id_embeds, face_embeds)  # (B, 4, D)
        character = self.resample(clip_embeds)  # (B, 16, D)
        return torch.cat([face, character], dim=1)  # (B, 20, D)

    def compose(self, tokens: torch.Tensor, slots: Sequence[int] | None = None) -> torch.Tensor:
        """Characters' stored tokens (B, 20, D) -> the official sequence (B + 1, 20, D):
        ``bg_embed`` then, per character, ``x + norm_out(proj_out(x))`` with
        ``x = tokens + pos_embed[slot]``. Slots default to 0..B-1 (the official order).

        The official code computes a zeroed ``bg_embed`` for all-zero ID inputs but
        then prepends the learned one regardless; so does this.
        """
        b = tokens.shape[0]
        slots = list(range(b)) if slots is None else list(slots)
        if len(slots) != b or not all(0 <= s < self.config.max_characters for s in slots):
            raise InvalidInput(f"need one slot per character, each in 0-"
                               f"{self.config.max_characters - 1} (got {slots} for {b})")
        x = tokens.to(self.pos_embed.dtype) + self.pos_embed[slots]  # (B, 20, D)
        res = self.norm_out(self.proj_out(x)) + x
        return torch.cat([self.bg_embed, res], dim=0)  # (B + 1, 20, D)

    def negative_tokens(self, count: int = 1) -> torch.Tensor:
        """Character tokens of all-zero inputs (ID and CLIP features), the official
        negative image prompt; (count, 20, D) to pass through :meth:`compose`."""
        c = self.config
        p = self.pos_embed
        n_pos = NEGATIVE_POSITIONS
        zeros_id = torch.zeros(count, c.id_embeddings_dim, device=p.device, dtype=p.dtype)
        zeros_clip = torch.zeros(count, n_pos, c.clip_embeddings_dim, device=p.device,
                                 dtype=p.dtype)
        return self.character_tokens(zeros_id, zeros_clip, zeros_clip)

    def forward(self, id_embeds: torch.Tensor, clip_embeds: torch.Tensor,
                face_embeds: torch.Tensor) -> torch.Tensor:
        """The official ``faceid_plus.forward`` (inference): (B + 1, 20, D)."""
        return self.compose(self.character_tokens(id_embeds, clip_embeds, face_embeds))


@functools.lru_cache(maxsize=8)
def expected_layout(config: StoryMakerConfig = StoryMakerConfig()) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return shapes_of(StoryMakerImageProj(config).state_dict())


_IP_KEY = re.compile(r"^\d+\.(to_(q|k|v|out)_lora\.(down|up)|to_(k|v)_ip)\.weight$")


@dataclass(frozen=True)
class StoryMakerCheckpoint:
    path: Path
    sha256: str
    ip_adapter_shapes: dict[str, tuple[int, ...]]
    lora_rank: int | None


def read_storymaker_checkpoint(path: Path | str, config: StoryMakerConfig = StoryMakerConfig()
                               ) -> tuple[StoryMakerCheckpoint, dict[str, torch.Tensor]]:
    """Read ``mask.bin`` (weights_only) and check ``image_proj_model`` key by key."""
    path = Path(path)
    what = "StoryMaker checkpoint"
    obj = read_pickle_checkpoint(path, what)
    keys = sorted(map(str, obj))
    if set(keys) != {"image_proj_model", "ip_adapter"}:
        raise ModelUnavailable(f"{what} {path}: top-level keys are {keys}; expected exactly "
                               "['image_proj_model', 'ip_adapter']", path=str(path))
    proj, ip = obj["image_proj_model"], obj["ip_adapter"]
    for name, part in (("image_proj_model", proj), ("ip_adapter", ip)):
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor)
                                                 for v in part.values()):
            raise ModelUnavailable(f"{what} {path}: {name} is not a dict of tensors",
                                   path=str(path))
    report = compare_layout(expected_layout(config), shapes_of(proj))
    if not report.ok:
        raise layout_error("StoryMaker image_proj_model", path, report)
    bad = sorted(k for k in ip if not _IP_KEY.match(k))
    if bad or not ip:
        raise ModelUnavailable(
            f"{path}: ip_adapter does not look like StoryMaker's (keys <index>.to_*_lora."
            f"down|up.weight and <index>.to_k_ip|to_v_ip.weight): "
            + (", ".join(bad[:10]) if bad else "it is empty"), path=str(path))
    ranks = {int(v.shape[0]) for k, v in ip.items() if k.endswith("_lora.down.weight")}
    info = StoryMakerCheckpoint(path, file_digest(path), shapes_of(ip),
                                next(iter(ranks)) if len(ranks) == 1 else None)
    return info, dict(proj)


def load_storymaker(path: Path | str, config: StoryMakerConfig = StoryMakerConfig(), *,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                    ) -> tuple[StoryMakerImageProj, StoryMakerCheckpoint]:
    """Check and load ``mask.bin``'s ``image_proj_model`` (strict)."""
    info, stored = read_storymaker_checkpoint(path, config)
    state = {k: v.to(device=device, dtype=dtype) for k, v in stored.items()}
    del stored
    with torch.device("meta"):
        model = StoryMakerImageProj(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), info


# -- character inputs -----------------------------------------------------------------------


@dataclass(frozen=True)
class FallbackCrop:
    """The character crop without a person mask: a rectangle around the face box.

    In face-box units (w, h of the detector box): ``width`` face widths wide,
    centred on the face; from ``above`` face heights above its top to ``below``
    face heights under its bottom (head, shoulders and chest of an upright
    person); clipped to the photo. Nothing is composited: without a mask the
    background cannot be told from the person, so it stays. StoryMaker was
    trained on masked crops on white, so these tokens carry background and
    are less faithful: the artifact says ``crop=face_box_fallback``.
    """

    width: float = 3.0
    above: float = 0.5
    below: float = 3.0


def face_crop(photo: np.ndarray, kps: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """``face_align.norm_crop(photo, kps, image_size=224)``: (224, 224, 3) uint8 RGB."""
    kps = np.asarray(kps, np.float32)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise InvalidInput("face keypoints must be 5 finite (x, y) points")
    return np.ascontiguousarray(face_align.norm_crop(photo, landmark=kps, image_size=size))


def _mask_array(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A person mask as the official code sees it: (H, W, 3) uint8, 0 = background."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.ndim not in (2, 3) or (mask.ndim == 3 and mask.shape[2] != 3):
        raise InvalidInput(f"a person mask must be (H, W), (H, W, 1) or (H, W, 3), "
                           f"not {mask.shape}")
    if mask.shape[:2] != shape:
        raise InvalidInput(f"the person mask is {mask.shape[1]}x{mask.shape[0]} but the photo "
                           f"is {shape[1]}x{shape[0]}; they must match")
    if mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    elif mask.dtype != np.uint8:
        raise InvalidInput(f"a person mask must be bool or uint8 (0-255), not {mask.dtype}")
    elif mask.max() == 1:
        mask = mask * np.uint8(255)  # a 0/1 label mask
    if mask.ndim == 2:
        mask = np.repeat(mask[:, :, None], 3, axis=2)
    return np.ascontiguousarray(mask)


def character_crop(photo: np.ndarray, mask: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """The official character crop: (224, 224, 3) uint8 RGB.

    Bounding box of the mask's non-zero pixels (channel 0, as the official
    contours), the mask Gaussian-blurred 5x5 (sigma from the kernel size, OpenCV's
    default border), ``255 * (1 - m) + m * crop`` truncated to uint8, then
    resized to 224x224 bicubic (aspect not kept, as the official ``resize``).
    Accepts bool or uint8 masks, (H, W) or (H, W, 3); a 0/1 uint8 mask counts as 0/255.
    """
    mask3 = _mask_array(mask, photo.shape[:2])
    ys, xs = np.nonzero(mask3[:, :, 0])
    if ys.size == 0:
        raise InvalidInput("the person mask is empty (no non-zero pixel)")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = photo[y0:y1, x0:x1]  # (h, w, 3) uint8
    m = cv2.GaussianBlur(mask3[y0:y1, x0:x1], (5, 5), 0) / 255.0  # (h, w, 3) float64
    composite = (255 * np.ones_like(m) * (1 - m) + m * crop).astype(np.uint8)
    return np.asarray(Image.fromarray(composite).resize((size, size), Image.BICUBIC))


def fallback_box(bbox: np.ndarray, shape: tuple[int, int],
                 rule: FallbackCrop = FallbackCrop()) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the fallback character crop, clipped to the photo."""
    x1f, y1f, x2f, y2f = (float(v) for v in np.asarray(bbox, np.float64)[:4])
    w, h = x2f - x1f, y2f - y1f
    if not (w > 0 and h > 0):
        raise InvalidInput("the face box has no area")
    cx = (x1f + x2f) / 2
    height, width = shape
    x0 = int(np.clip(np.floor(cx - rule.width * w / 2), 0, width - 1))
    x1 = int(np.clip(np.ceil(cx + rule.width * w / 2), x0 + 1, width))
    y0 = int(np.clip(np.floor(y1f - rule.above * h), 0, height - 1))
    y1 = int(np.clip(np.ceil(y2f + rule.below * h), y0 + 1, height))
    return x0, y0, x1, y1


def fallback_crop(photo: np.ndarray, bbox: np.ndarray, rule: FallbackCrop = FallbackCrop(),
                  size: int = CROP_SIZE) -> np.ndarray:
    """The fallback character crop (no mask): see :class:`FallbackCrop`."""
    x0, y0, x1, y1 = fallback_box(bbox, photo.shape[:2], rule)
    region = np.ascontiguousarray(photo[y0:y1, x0:x1])
    return np.asarray(Image.fromarray(region).resize((size, size), Image.BICUBIC))


def cloth_crop(cloth: np.ndarray | Image.Image, size: int = CROP_SIZE) -> np.ndarray:
    """A clothing image as the official pipeline takes it: ``cloth.resize((224, 224))``."""
    image = cloth if isinstance(cloth, Image.Image) else Image.fromarray(_rgb(cloth, "cloth"))
    return np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC))


@dataclass(frozen=True, eq=False)
class CharacterInputs:
    """Everything ``image_proj_model`` needs for one character, before CLIP."""

    id_embed: np.ndarray  # (512,) float32, L2-normalised ArcFace
    face_crop: np.ndarray  # (224, 224, 3) uint8 RGB, aligned
    character_crop: np.ndarray  # (224, 224, 3) uint8 RGB
    crop: str  # mask | face_box_fallback | cloth


def _rgb(image: np.ndarray, what: str) -> np.ndarray:
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
            and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0):
        raise InvalidInput(f"the {what} must be an (H, W, 3) uint8 RGB array")
    return np.ascontiguousarray(image)


def character_inputs(photo: np.ndarray, face, *, mask: np.ndarray | None = None,
                     cloth: np.ndarray | Image.Image | None = None,
                     fallback: FallbackCrop = FallbackCrop(), id_dim: int = 512
                     ) -> CharacterInputs:
    """Face crop, character crop and normed embedding of one person in one photo."""
    photo = _rgb(photo, "photo")
    if face is None:
        raise PhotoRejected("the photo has no face; StoryMaker needs the character's face")
    normed = np.asarray(getattr(face, "normed", None), np.float32)
    if normed.shape != (id_dim,) or not np.isfinite(normed).all():
        raise InvalidInput(f"the face's normed ArcFace embedding must be {id_dim} finite "
                           f"numbers (got shape {normed.shape})")
    aligned = face_crop(photo, face.kps)
    if cloth is not None:
        crop, kind = cloth_crop(cloth), "cloth"
    elif mask is not None:
        crop, kind = character_crop(photo, mask), "mask"
    else:
        crop, kind = fallback_crop(photo, face.bbox, fallback), "face_box_fallback"
    return CharacterInputs(normed, aligned, crop, kind)


def pick_reference(faces: Sequence[object]) -> int:
    """Index of the photo to build the StoryMaker artifact from: largest face, then
    highest detector score (see the module docstring for why one photo)."""
    if not faces:
        raise InvalidInput("no faces to choose from")
    if any(f is None for f in faces):
        raise PhotoRejected("every photo needs its face")
    return max(range(len(faces)),
               key=lambda i: (float(faces[i].face_px), float(faces[i].det_score), -i))


# -- the encoder enrollment calls -------------------------------------------------------------


class StoryMakerEncoder:
    """One person in one photo -> the ``storymaker`` artifact (see the module docstring)."""

    kind = "storymaker"

    def __init__(self, image_proj: StoryMakerImageProj, tower: ClipVisionTower,
                 checkpoint: StoryMakerCheckpoint, *, device: torch.device, dtype: torch.dtype,
                 fallback: FallbackCrop = FallbackCrop()) -> None:
        if tower.hidden_size != image_proj.config.clip_embeddings_dim:
            raise ModelUnavailable(
                f"CLIP vision tower {tower.folder} has hidden size {tower.hidden_size}; "
                f"StoryMaker needs {image_proj.config.clip_embeddings_dim} (ViT-H/14)")
        self.image_proj = image_proj
        self.tower = tower
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self.fallback = fallback
        self.clip_sha256 = folder_digest(tower.folder) if tower.folder else "0" * 64

    @classmethod
    def from_files(cls, mask_bin: Path | str, clip_folder: Path | str, *,
                   config: StoryMakerConfig = StoryMakerConfig(),
                   device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                   fallback: FallbackCrop = FallbackCrop()) -> StoryMakerEncoder:
        device = torch.device(device) if device is not None else default_device()
        image_proj, checkpoint = load_storymaker(mask_bin, config, device=device, dtype=dtype)
        tower = ClipVisionTower.from_pretrained(clip_folder, device=device, dtype=dtype)
        return cls(image_proj, tower, checkpoint, device=device, dtype=dtype, fallback=fallback)

    @classmethod
    def from_models_dir(cls, models_dir: Path | str | None = None, *,
                        config: StoryMakerConfig | None = None,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32,
                        fallback: FallbackCrop = FallbackCrop(),
                        env: Mapping[str, str] | None = None) -> StoryMakerEncoder:
        """Find ``mask.bin`` and the CLIP ViT-H/14 folder (see encoders.id.checkpoints)."""
        mask_bin = find_checkpoint("storymaker", models_dir, env)
        clip_folder = find_checkpoint("clip-vit-h-14", models_dir, env)
        if config is None and is_stand_in(mask_bin):
            config = TINY_STORYMAKER
        return cls.from_files(mask_bin, clip_folder, config=config or StoryMakerConfig(),
                              device=device, dtype=dtype, fallback=fallback)

    @property
    def model_id(self) -> str:
        """Ties the tokens to both weights: ``mask.bin`` and the CLIP tower."""
        return (f"storymaker/{self.checkpoint.path.name}@{self.checkpoint.sha256[:16]}"
                f"+clip@{self.clip_sha256[:16]}")

    @torch.inference_mode()
    def tokens(self, inputs: Sequence[CharacterInputs]) -> np.ndarray:
        """(characters, 20, 2048) float32 before the slot position embedding."""
        n = len(inputs)
        images = [i.face_crop for i in inputs] + [i.character_crop for i in inputs]
        feats = self.tower.penultimate(clip_preprocess(images))  # (2n, 257, 1280)
        face_feats, char_feats = feats[:n], feats[n:]
        ids = torch.from_numpy(np.stack([i.id_embed for i in inputs])).to(self.device,
                                                                           self.dtype)
        out = self.image_proj.character_tokens(ids, char_feats.to(self.dtype),
                                               face_feats.to(self.dtype))  # (n, 20, D)
        return out.float().cpu().numpy()

    def encode(self, photo: np.ndarray, face, *, mask: np.ndarray | None = None,
               cloth: np.ndarray | Image.Image | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Tensors and metadata for ``vault.codec.encode("storymaker", ...)``."""
        inputs = character_inputs(photo, face, mask=mask, cloth=cloth, fallback=self.fallback,
                                  id_dim=self.image_proj.config.id_embeddings_dim)
        tokens = self.tokens([inputs])[0]  # (20, 2048)
        return {"tokens": tokens}, {"model_id": self.model_id, "crop": inputs.crop}
