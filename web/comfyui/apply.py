"""The apply nodes: an ``IDVAULT_IDENTITY`` conditions a ComfyUI SDXL model through
IP-Adapter-FaceID Plus v2 or InstantID, with idvault's own model code.

* "idvault Load FaceID Adapter" / "idvault Load InstantID Adapter" read the official
  files strictly with :mod:`generators.adapters.faceid` / :mod:`generators.adapters.instantid`
  (every key and shape of the image projection; the ``to_k_ip`` / ``to_v_ip`` against the
  model when applied). A loaded adapter holds weights only, no identity data.
* "idvault Apply FaceID" computes the identity's tokens as idvault's ``faceid`` method
  does (:mod:`generators.methods.faceid`): ``ProjPlusModel(normed, clip_embeds, shortcut,
  s_scale)`` for each of the ``n`` photos, ``n x 4`` tokens; the negative is the projection
  of a zero embedding with the all-zero image's CLIP features. The official FaceID LoRA is
  a separate file for ComfyUI's LoRA loader (docs/comfyui.md).
* "idvault Apply InstantID" computes the 16 tokens as idvault's ``instantid`` method does
  (the Resampler over ``(1, photos, 512)`` raw antelopev2 embeddings, negatives from zeros),
  patches the model the same way, and sets the IdentityNet ControlNet on the conditioning
  with the keypoint image (:mod:`generators.adapters.keypoints`) and the tokens as the
  ControlNet's cross-attention context (``cross_attn_controlnet``), as ComfyUI_InstantID
  does.

The patch is :class:`web.comfyui.attention.IdentityPatch` (idvault's regional formula; one
full-frame identity is the official one). An optional MASK keeps an identity's tokens in
its region; several apply nodes in a row add identities (one softmax per adapter).
Nothing is kept by the nodes: the tokens live in the patched model ComfyUI holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .attention import Group, Identity, apply_identity, check_projections
from .identity import CATEGORY

__all__ = ["IdvaultApplyFaceID", "IdvaultApplyInstantID", "IdvaultLoadFaceID",
           "IdvaultLoadInstantID"]


class AdapterError(ValueError):
    """A file or an identity that does not fit (ComfyUI shows the message)."""


def _resolve(name: str, folders: tuple[str, ...]) -> Path:
    """An absolute path, or a file name in ComfyUI's model folders ``folders``."""
    path = Path(name).expanduser()
    if path.is_absolute():
        if not path.exists():
            raise AdapterError(f"{path} does not exist")
        return path
    looked = []
    try:
        import folder_paths  # ComfyUI's model folders
    except ImportError:
        folder_paths = None
    for folder in folders if folder_paths is not None else ():
        try:
            found = folder_paths.get_full_path(folder, name)
        except Exception:  # folder name not registered in this ComfyUI
            found = None
        if found:
            return Path(found)
        looked.append(f"models/{folder}")
    raise AdapterError(f"{name!r} not found (looked in {', '.join(looked) or 'nowhere'}); "
                       "give an absolute path or put the file in " + " or ".join(
                           f"ComfyUI/models/{f}" for f in folders))


def _idvault():
    """idvault's model code, or a clear error when ComfyUI's Python lacks it."""
    try:
        from generators.adapters import faceid, instantid, keypoints
    except ImportError as exc:
        raise AdapterError(f"the apply nodes need idvault importable in ComfyUI's Python "
                           f"(pip install --no-deps -e /path/to/idvault; docs/comfyui.md): "
                           f"{exc}") from None
    return faceid, instantid, keypoints


def _identity_of(identity: dict, kind: str) -> dict:
    if not isinstance(identity, dict) or identity.get("kind") != kind:
        got = identity.get("kind") if isinstance(identity, dict) else type(identity).__name__
        raise AdapterError(f"this node needs an idvault Identity of kind {kind!r}; got {got!r} "
                           "(set the Identity node's kind)")
    return identity


def _sigmas(model, start_at: float, end_at: float) -> tuple[float, float]:
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise AdapterError(f"start_at and end_at must satisfy 0 <= start_at <= end_at <= 1, "
                           f"got {start_at}, {end_at}")
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at))


def _mask(mask) -> torch.Tensor | None:
    if mask is None:
        return None
    m = torch.as_tensor(mask, dtype=torch.float32)
    if m.ndim == 3:
        if m.shape[0] != 1:
            raise AdapterError(f"give one mask per identity, got a batch of {m.shape[0]}")
        m = m[0]
    if m.ndim != 2 or not bool((m > 0).any()):
        raise AdapterError("the mask must be one (H, W) mask with some area above 0")
    return m


def _box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """The mask's bounding box as image fractions ``x0, y0, x1, y1``."""
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    h, w = mask.shape
    return (float(xs.min()) / w, float(ys.min()) / h, float(xs.max() + 1) / w,
            float(ys.max() + 1) / h)


MODEL_IO = {"start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001})}


class IdvaultLoadFaceID:
    """``ip-adapter-faceid-plusv2_sdxl.bin`` (or ``.safetensors``), read strictly."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IDVAULT_FACEID",)
    RETURN_NAMES = ("faceid_adapter",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"adapter_file": ("STRING", {
            "default": "ip-adapter-faceid-plusv2_sdxl.bin",
            "tooltip": "a file in ComfyUI/models/ipadapter, or an absolute path"})}}

    def load(self, adapter_file: str) -> tuple[dict]:
        faceid, _, _ = _idvault()
        path = _resolve(adapter_file, ("ipadapter",))
        projection, info = faceid.load_faceid(path)
        return ({"projection": projection, "ip_adapter": info.ip_adapter,
                 "weights_id": info.weights_id},)


class IdvaultLoadInstantID:
    """InstantID's ``ip-adapter.bin``, read strictly (the ControlNet goes through
    ComfyUI's own ControlNet loader)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IDVAULT_INSTANTID",)
    RETURN_NAMES = ("instantid_adapter",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {"adapter_file": ("STRING", {
            "default": "ip-adapter.bin",
            "tooltip": "a file in ComfyUI/models/instantid, or an absolute path"})}}

    def load(self, adapter_file: str) -> tuple[dict]:
        _, instantid, _ = _idvault()
        from encoders.id.checkpoints import (
            compare_layout,
            layout_error,
            read_pickle_checkpoint,
            shapes_of,
        )

        path = _resolve(adapter_file, ("instantid",))
        obj = read_pickle_checkpoint(path, "InstantID ip-adapter.bin")
        if set(obj) != {"image_proj", "ip_adapter"}:
            raise AdapterError(f"{path}: not InstantID's ip-adapter.bin: it holds "
                               f"{sorted(map(str, obj))}, not exactly image_proj and ip_adapter")
        image_proj, ip_adapter = dict(obj["image_proj"]), dict(obj["ip_adapter"])
        what = instantid.describe_ip_adapter(shapes_of(image_proj), shapes_of(ip_adapter))
        if what:
            raise AdapterError(f"{path}: not InstantID's ip-adapter.bin: {what}")
        config = instantid.config_for(path)
        report = compare_layout(instantid.image_proj_layout(config), shapes_of(image_proj))
        if not report.ok:
            raise layout_error("InstantID image_proj (Resampler)", path, report)
        module = instantid.build_image_proj(config)
        module.load_state_dict(image_proj, strict=True)
        return ({"projection": module.eval().requires_grad_(False), "ip_adapter": ip_adapter,
                 "path": str(path)},)


class IdvaultApplyFaceID:
    """An identity's FaceID Plus v2 tokens into a MODEL (see the module docstring)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "model": ("MODEL",),
            "identity": ("IDVAULT_IDENTITY",),
            "faceid_adapter": ("IDVAULT_FACEID",),
            "weight": ("FLOAT", {"default": 1.0, "min": -1.0, "max": 3.0, "step": 0.01}),
            "s_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 3.0, "step": 0.01,
                                  "tooltip": "face structure (CLIP) weight of PlusV2"}),
            **MODEL_IO,
        }, "optional": {"mask": ("MASK",)}}

    @torch.no_grad()
    def apply(self, model, identity, faceid_adapter, weight: float, s_scale: float,
              start_at: float, end_at: float, mask=None):
        ident = _identity_of(identity, "faceid")
        proj = faceid_adapter["projection"]
        config = proj.config
        t = ident["tensors"]
        normed = t["normed"].float()  # (n, 512)
        clip = t["clip_embeds"].float()  # (n, positions, clip_dim)
        if clip.shape[-1] != config.clip_embeddings_dim or normed.shape[-1] != \
                config.id_embeddings_dim:
            raise AdapterError(f"{ident['handle']}'s faceid artifact ({normed.shape[-1]}-d "
                               f"faces, {clip.shape[-1]}-wide CLIP) does not fit this adapter "
                               f"({config.id_embeddings_dim}, {config.clip_embeddings_dim})")
        projections = check_projections(faceid_adapter["ip_adapter"], model,
                                        f"the FaceID adapter {faceid_adapter['weights_id']}")
        dtype = next(proj.parameters()).dtype
        pos = proj(normed.to(dtype), clip.to(dtype), shortcut=True, scale=s_scale)  # (n, 4, D)
        neg = proj(torch.zeros_like(normed[:1]).to(dtype),
                   t["clip_negative"].to(dtype)[None], shortcut=True,
                   scale=s_scale).repeat(normed.shape[0], 1, 1)  # (n, 4, D)
        d = pos.shape[-1]
        start, end = _sigmas(model, start_at, end_at)
        group = Group(projections, float(weight), start, end, (Identity(
            ident["handle"], pos.reshape(-1, d), neg.reshape(-1, d), _mask(mask)),))
        return (apply_identity(model, group),)


class IdvaultApplyInstantID:
    """An identity's InstantID tokens into a MODEL, and the IdentityNet ControlNet with its
    keypoints on the conditioning (see the module docstring)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {"required": {
            "model": ("MODEL",),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "control_net": ("CONTROL_NET",),
            "identity": ("IDVAULT_IDENTITY",),
            "instantid_adapter": ("IDVAULT_INSTANTID",),
            "ip_weight": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 3.0, "step": 0.01}),
            "cn_strength": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 10.0, "step": 0.01}),
            **MODEL_IO,
        }, "optional": {
            "mask": ("MASK",),
            "width": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8,
                              "tooltip": "image width (keypoints drawn in the mask's box)"}),
            "height": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8}),
        }}

    @torch.no_grad()
    def apply(self, model, positive, negative, control_net, identity, instantid_adapter,
              ip_weight: float, cn_strength: float, start_at: float, end_at: float,
              mask=None, width: int = 1024, height: int = 1024):
        from generators.methods.instantid import InstantIDSettings

        _, _, keypoints = _idvault()
        ident = _identity_of(identity, "instantid")
        recognizer = ident["model_id"].split("@")[0]
        if recognizer not in InstantIDSettings().face_models:
            raise AdapterError(f"{ident['handle']}'s instantid artifact comes from "
                               f"{ident['model_id']}; InstantID reads antelopev2 (glintr100) "
                               "embeddings")
        proj = instantid_adapter["projection"]
        projections = check_projections(instantid_adapter["ip_adapter"], model,
                                        f"InstantID's {instantid_adapter['path']}")
        t = ident["tensors"]
        dtype = next(proj.parameters()).dtype
        emb = t["embeddings"].to(dtype).reshape(1, -1, t["embeddings"].shape[-1])  # (1, n, 512)
        neg, pos = proj(torch.cat([torch.zeros_like(emb), emb]))  # (16, D) each
        m = _mask(mask)
        start, end = _sigmas(model, start_at, end_at)
        group = Group(projections, float(ip_weight), start, end,
                      (Identity(ident["handle"], pos, neg, m),))
        work = apply_identity(model, group)

        box = (0.0, 0.0, 1.0, 1.0) if m is None else _box(m)
        picture = keypoints.keypoint_image(t["kps"].numpy(), tuple(t["image_size"].tolist()),
                                           box, (int(width), int(height)))
        hint = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)  # (H, W, 3)
        hint = hint.permute(2, 0, 1)[None]  # (1, 3, H, W) in 0..1, ComfyUI's hint layout
        cnets: dict = {}
        out = []
        for tokens, conditioning, is_positive in ((pos, positive, True), (neg, negative, False)):
            entries = []
            for cond, options in conditioning:
                d = dict(options)
                prev = d.get("control")
                if prev not in cnets:
                    c_net = control_net.copy().set_cond_hint(hint, cn_strength, (start_at, end_at))
                    c_net.set_previous_controlnet(prev)
                    cnets[prev] = c_net
                c_net = cnets[prev]
                d["control"] = c_net
                d["control_apply_to_uncond"] = False
                hint_dtype = getattr(getattr(c_net, "cond_hint_original", None), "dtype",
                                     tokens.dtype)
                d["cross_attn_controlnet"] = tokens[None].to(hint_dtype)  # (1, 16, D)
                if m is not None and is_positive:
                    d["mask"] = m[None]
                    d["set_area_to_bounds"] = False
                entries.append([cond, d])
            out.append(entries)
        return (work, out[0], out[1])
