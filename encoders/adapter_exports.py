"""Exports of the face and FaceID artifacts for the tools people already have: a ReActor
face model and diffusers' ``ip_adapter_image_embeds`` for IP-Adapter-FaceID Plus v2.

Both are safetensors files; :func:`encoders.fitting.exports.export` dispatches here, so
``idvault artifact export``, the API's ``/exports/<format>`` and the library share them,
and every export decrypts with purpose ``share`` (consent must grant it; audited).

``reactor`` -- the face model file of Gourieff's ReActor (comfyui-reactor-node and
sd-webui-reactor, ``reactor_utils.save_face_model`` / ``load_face_model``): the nine keys
``save_face_model`` writes from an insightface ``Face``, with its dtypes and shapes::

    bbox            float32 (4,)       embedding  float32 (512,)
    kps             float32 (5, 2)     gender     int64   ()
    det_score       float32 ()         age        int64   ()
    landmark_3d_68  float32 (68, 3)    pose       float32 (3,)
    landmark_2d_106 float32 (106, 2)

``load_face_model`` reads every key into ``insightface.app.common.Face``; the swapper
(inswapper_128) uses only ``Face.normed_embedding`` (``embedding`` / its norm) of a loaded
face model, and the source-face sort reads ``bbox``. ``embedding`` is what ReActor's
"Blend" (compute method Mean) writes for several photos: ``np.mean`` of the raw buffalo_l
embeddings (inswapper was trained on buffalo_l's w600k_r50 space, so other recognisers are
refused). The vault keeps no landmarks: ``bbox`` and ``kps`` are the 112 px aligned crop the
embedding was computed from (ArcFace's five-point template), and ``det_score``, the
landmarks, ``pose``, ``gender`` and ``age`` are zeros, listed in the metadata key
``idvault.placeholders`` (ReActor does not read them for a loaded face model).

``ip_adapter_embeds`` -- IP-Adapter-FaceID Plus v2 inputs for diffusers, from a ``faceid``
artifact (``n`` photos), negatives first as the SDXL pipelines' ``chunk(2)`` expects::

    id_embeds    (2, n, 1, 512)                  [zeros; normed]: ip_adapter_image_embeds=[...]
    clip_embeds  (2, n, positions, clip_dim)     [clip_negative x n; clip_embeds]:
                                                 image_projection_layers[0].clip_embeds

The zero negative is diffusers' documented FaceID negative; the CLIP negative is the tower's
``hidden_states[-2]`` of an all-zero pixel input, which is what ``prepare_ip_adapter_image_embeds``
computes for the unconditional half. Plus v2 needs ``shortcut = True`` on the projection.
Tensors keep the artifact's dtype (float16 or float32).
"""

from __future__ import annotations

import numpy as np
from safetensors.numpy import save

from vault.errors import InvalidInput
from vault.vault import Vault

__all__ = ["ARCFACE_TEMPLATE", "REACTOR_LAYOUT", "ip_adapter_embeds", "reactor_face_model"]

# The five points (eyes, nose, mouth corners) of insightface's 112 px aligned crop
# (``face_align.arcface_dst``): where every ArcFace embedding was computed.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)
ARCFACE_CROP = 112
# ReActor's face model: key -> (dtype, shape), as save_face_model writes an insightface Face
# (SCRFD and the landmark models give float32, the attribute model int64 gender and age).
REACTOR_LAYOUT: dict[str, tuple[str, tuple[int, ...]]] = {
    "bbox": ("float32", (4,)),
    "kps": ("float32", (5, 2)),
    "det_score": ("float32", ()),
    "landmark_3d_68": ("float32", (68, 3)),
    "pose": ("float32", (3,)),
    "landmark_2d_106": ("float32", (106, 2)),
    "embedding": ("float32", (512,)),
    "gender": ("int64", ()),
    "age": ("int64", ()),
}
# inswapper_128 maps buffalo_l (w600k_r50) embeddings; another recogniser's space is foreign.
REACTOR_PACK = "buffalo_l"


def reactor_face_model(vault: Vault, handle: str, *, model_id: str | None = None,
                       actor: str | None = None) -> bytes:
    """``handle``'s ReActor face model (see the module docstring), from its ``face`` artifact."""
    if model_id is not None and not model_id.startswith(f"{REACTOR_PACK}/"):
        raise InvalidInput(_foreign_pack(model_id))
    art = vault.get_artifact(handle, "face", model_id=model_id, purpose="share",
                             actor=actor).artifact
    if not art.model_id.startswith(f"{REACTOR_PACK}/"):
        raise InvalidInput(_foreign_pack(art.model_id))
    raw = art.tensors["embeddings"].astype(np.float32)  # (photos, 512)
    # ReActor's Blend, compute method "Mean": np.mean over the photos' raw embeddings.
    known = {"bbox": np.array([0, 0, ARCFACE_CROP, ARCFACE_CROP], dtype=np.float32),
             "kps": ARCFACE_TEMPLATE.copy(),
             "embedding": np.mean(raw, axis=0)}  # (512,)
    tensors = {name: known.get(name, np.zeros(shape, dtype=dtype))
               for name, (dtype, shape) in REACTOR_LAYOUT.items()}
    return save(tensors, metadata={
        "format": "reactor-face-model", "source": "idvault face artifact",
        "model_id": art.model_id, "photos": str(raw.shape[0]), "blend": "mean",
        "idvault.placeholders": ",".join(n for n in REACTOR_LAYOUT if n not in known)})


def _foreign_pack(model_id: str) -> str:
    return (f"a ReActor face model needs buffalo_l embeddings (inswapper_128 was trained on "
            f"buffalo_l's w600k_r50); this face artifact is from {model_id}")


def ip_adapter_embeds(vault: Vault, handle: str, *, model_id: str | None = None,
                      actor: str | None = None) -> bytes:
    """``handle``'s FaceID Plus v2 embeds in diffusers' layout (see the module docstring)."""
    art = vault.get_artifact(handle, "faceid", model_id=model_id, purpose="share",
                             actor=actor).artifact
    normed = art.tensors["normed"]  # (n, 512)
    clip = art.tensors["clip_embeds"]  # (n, positions, clip_dim)
    negative = art.tensors["clip_negative"]  # (positions, clip_dim)
    n = normed.shape[0]
    positive_id = normed[:, None, :]  # (n, 1, 512): one id embedding per image
    id_embeds = np.stack([np.zeros_like(positive_id), positive_id])  # (2, n, 1, 512)
    clip_negative = np.broadcast_to(negative.astype(clip.dtype), clip.shape)
    clip_embeds = np.stack([clip_negative, clip])  # (2, n, positions, clip_dim)
    return save({"id_embeds": np.ascontiguousarray(id_embeds),
                 "clip_embeds": np.ascontiguousarray(clip_embeds)}, metadata={
        "format": "idvault.ip-adapter-faceid-plusv2-embeds/1", "model_id": art.model_id,
        "face_model_id": art.metadata.get("face_model_id", ""),
        "clip_model_id": art.metadata.get("clip_model_id", ""), "photos": str(n),
        "order": "negative,positive", "shortcut": "true"})
