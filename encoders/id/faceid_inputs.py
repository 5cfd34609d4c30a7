"""IP-Adapter-FaceID Plus v2 inputs, computed once at enrollment (artifact kind ``faceid``).

IP-Adapter-FaceID Plus v2 (h94/IP-Adapter-FaceID; ``ip_adapter/ip_adapter_faceid.py``
``IPAdapterFaceIDPlus.get_image_embeds`` in tencent-ailab/IP-Adapter) conditions a
model on two things per face:

1. the buffalo_l ArcFace ``normed_embedding`` (512, L2-normalised);
2. the CLIP ViT-H/14 ``hidden_states[-2]`` (257 x 1280) of the 224 px aligned face
   crop: ``face_align.norm_crop(image, landmark=face.kps, image_size=224)``, then
   ``CLIPImageProcessor()``;

and, for classifier-free guidance, the tower's ``hidden_states[-2]`` of
``torch.zeros_like(pixel_values)`` (an all-zero *preprocessed* input, not a black
photo) with a zero ID embedding. Everything after that (``ProjPlusModel``: the
ID MLP, the perceiver over the CLIP features, the v2 ``shortcut``) is the
adapter's own weights and runs at generation, so these three tensors are what
enrollment stores: one artifact serves any adapter scale and ``s_scale``.

The crop and the CLIP features are StoryMaker's (same tower, same crop):
:func:`encoders.id.storymaker.face_crop` and
:class:`encoders.id.clip_vision.ClipVisionTower`. The crop is RGB. (The model
card's snippet reads the photo with ``cv2.imread`` and hands the BGR crop to
``CLIPImageProcessor``, which takes it for RGB; the training crops were written
to files first, per the IP-Adapter-Face wiki, so they were RGB, and so are ours.)

At most :data:`~vault.artifact_kinds.FACEID_MAX_PHOTOS` photos are kept
(:func:`select_photos`): those with the largest faces (the shorter side of the
detector box), then the highest detector score, then the earliest; kept in
enrollment order. A bigger face gives the 224 px crop real detail instead of
upsampling, and more photos add tokens, not likeness.

The tower must be OpenCLIP ViT-H/14 (hidden 1280, patch 14, 32 layers at 224 px):
the FaceID Plus weights were trained on it, and IP-Adapter's SDXL
``sdxl_models/image_encoder`` (ViT-bigG, 1664 wide) would give features of the
wrong width. idvault's tiny stand-in tower (:data:`~encoders.id.clip_vision.TINY_VIT_H`)
is accepted too, for tests and the demo.

Integration contract (for enrollment)::

    encoder = FaceIDEncoder.from_models_dir(models_dir)        # the clip-vit-h-14 folder
    tensors, metadata = encoder.encode(photos, faces, face_model_id=..., names=...)
    payload = vault.codec.encode("faceid", tensors, metadata)

``tensors == {"normed": (photos, 512), "clip_embeds": (photos, 257, 1280),
"clip_negative": (257, 1280)}`` (float32; float16 when the tower runs in half
precision) and ``metadata == {"model_id": "<clip id>+<face model id>",
"clip_model_id": "clip-vit-h-14@<sha256[:16]>", "face_model_id": ..., "photos":
<JSON list of the photo names used>}``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from encoders.id.checkpoints import find_checkpoint, folder_digest
from encoders.id.clip_vision import (
    TINY_VIT_H,
    VIT_H14,
    ClipVisionSpec,
    ClipVisionTower,
    clip_preprocess,
)
from encoders.id.photomaker import default_device
from encoders.id.storymaker import face_crop
from vault.artifact_kinds import FACEID_MAX_PHOTOS
from vault.errors import InvalidInput, ModelUnavailable, PhotoRejected

__all__ = ["CLIP_CHECKPOINT", "FaceIDEncoder", "clip_model_id", "select_photos"]

CLIP_CHECKPOINT = "clip-vit-h-14"  # encoders.id.checkpoints.CHECKPOINTS key, shared with StoryMaker
# What makes two towers the same network (projection width and activation aside:
# hidden_states[-2] does not depend on the projection).
_ARCHITECTURE = ("hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "patch_size", "image_size")
ACCEPTED_TOWERS = {"OpenCLIP ViT-H/14": VIT_H14, "idvault's tiny stand-in": TINY_VIT_H}


def clip_model_id(folder: Path | str | None) -> str:
    """``clip-vit-h-14@<sha256[:16]>`` of the weights ``from_pretrained`` reads."""
    digest = folder_digest(folder) if folder else "0" * 64
    return f"{CLIP_CHECKPOINT}@{digest[:16]}"


def _same_architecture(a: ClipVisionSpec, b: ClipVisionSpec) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in _ARCHITECTURE)


def check_tower(tower: ClipVisionTower) -> None:
    """Refuse a tower that is not ViT-H/14 (or the tiny stand-in), naming what it is."""
    if any(_same_architecture(tower.spec, ref) for ref in ACCEPTED_TOWERS.values()):
        return
    s = tower.spec
    raise ModelUnavailable(
        f"CLIP vision tower {tower.folder}: IP-Adapter-FaceID Plus v2 needs OpenCLIP "
        f"ViT-H/14 (hidden 1280, 32 layers, patch 14 at 224 px; "
        f"laion/CLIP-ViT-H-14-laion2B-s32B-b79K or IP-Adapter's models/image_encoder), "
        f"but this one is hidden {s.hidden_size}, {s.num_hidden_layers} layers, patch "
        f"{s.patch_size} at {s.image_size} px (IP-Adapter's sdxl_models/image_encoder is "
        f"ViT-bigG, hidden 1664: not this one)", path=str(tower.folder))


def select_photos(faces: Sequence[object], limit: int = FACEID_MAX_PHOTOS) -> list[int]:
    """Indices of the photos a ``faceid`` artifact keeps, in enrollment order.

    The ``limit`` largest faces (shorter side of the detector box), ties broken by
    the higher detector score, then the earlier photo.
    """
    if not faces:
        raise InvalidInput("no faces to choose from")
    if limit < 1:
        raise InvalidInput("keep at least one photo")
    if any(f is None for f in faces):
        raise PhotoRejected("every photo needs its face")
    ranked = sorted(range(len(faces)),
                    key=lambda i: (-float(faces[i].face_px), -float(faces[i].det_score), i))
    return sorted(ranked[:limit])


class FaceIDEncoder:
    """Photos + their buffalo_l faces -> the ``faceid`` artifact (see the module docstring)."""

    kind = "faceid"

    def __init__(self, tower: ClipVisionTower) -> None:
        check_tower(tower)
        self.tower = tower
        self.clip_model_id = clip_model_id(tower.folder)
        self._negative: np.ndarray | None = None  # of the tower alone: no identity data

    @classmethod
    def from_models_dir(cls, models_dir: Path | str | None = None, *,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32,
                        env: Mapping[str, str] | None = None) -> FaceIDEncoder:
        """Find and load the ``clip-vit-h-14`` folder (see encoders.id.checkpoints);
        ModelUnavailable names the folders searched when it is not there."""
        folder = find_checkpoint(CLIP_CHECKPOINT, models_dir, env)
        device = torch.device(device) if device is not None else default_device()
        return cls(ClipVisionTower.from_pretrained(folder, device=device, dtype=dtype))

    def model_id(self, face_model_id: str) -> str:
        """Ties the artifact to both weights: the CLIP tower and the ArcFace recogniser."""
        return f"{self.clip_model_id}+{face_model_id}"

    def _numpy(self, x: torch.Tensor) -> np.ndarray:
        # The codec takes float32 and float16: half-precision towers keep their values
        # exactly in float16, anything else is widened to float32 without loss.
        out = x.detach().to("cpu")
        return (out.half() if out.dtype == torch.float16 else out.float()).numpy()

    def clip_features(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """``hidden_states[-2]`` of RGB 224 px crops, one batch: (n, positions, hidden)."""
        return self._numpy(self.tower.penultimate(clip_preprocess(list(crops))))

    def negative(self) -> np.ndarray:
        """``hidden_states[-2]`` of ``torch.zeros_like(pixel_values)`` for one image:
        (positions, hidden), the official unconditional CLIP input. Depends only on the
        tower, so it is computed once per encoder."""
        if self._negative is None:
            size = self.tower.spec.image_size
            zeros = torch.zeros(1, 3, size, size)  # (1, 3, 224, 224), like one crop's pixels
            self._negative = self._numpy(self.tower.penultimate(zeros))[0]
        return self._negative

    def encode(self, photos: Sequence[np.ndarray], faces: Sequence[object], *,
               face_model_id: str, names: Sequence[str] | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Tensors and metadata for ``vault.codec.encode("faceid", ...)``.

        ``faces`` are the buffalo_l analysis results of ``photos`` (``kps`` and
        ``normed`` of each); ``face_model_id`` names the recogniser of ``normed``.
        """
        if len(photos) != len(faces):
            raise InvalidInput("one face per photo")
        names = list(names) if names is not None else [f"photo {i + 1}"
                                                       for i in range(len(photos))]
        keep = select_photos(faces)
        crops = [face_crop(photos[i], faces[i].kps) for i in keep]  # (224, 224, 3) RGB each
        normed = np.stack([np.asarray(faces[i].normed, np.float32) for i in keep])  # (n, 512)
        tensors = {"normed": normed, "clip_embeds": self.clip_features(crops),
                   "clip_negative": self.negative()}
        metadata = {"model_id": self.model_id(face_model_id), "clip_model_id": self.clip_model_id,
                    "face_model_id": face_model_id,
                    "photos": json.dumps([names[i] for i in keep])}
        return tensors, metadata
