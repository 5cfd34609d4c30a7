"""IP-Adapter-FaceID Plus v2 (SDXL) as an identity method: four tokens per face photo,
regional decoupled cross-attention, the adapter's LoRA on every attention processor.

Per identity (tencent-ailab/IP-Adapter ``IPAdapterFaceIDPlusXL``; diffusers' FaceID-Plus
path with ``ip_adapter_image_embeds``):

* The ``faceid`` artifact holds, per enrolled photo, the buffalo_l ``normed_embedding``
  (512) and the CLIP ViT-H/14 ``hidden_states[-2]`` of the aligned 224 px face crop, plus
  the same features of an all-zero pixel input. Nothing in it depends on the adapter
  weights, so one artifact serves any copy of ``ip-adapter-faceid-plusv2_sdxl.bin``.
* Positive tokens: ``ProjPlusModel(normed, clip_embeds, shortcut, s_scale)`` for all of
  the identity's ``n`` photos, ``(n, 4, 2048)`` flattened to ``n x 4`` tokens -- what
  diffusers does with several images for one adapter (``(batch, n, 512)`` embeddings;
  its processor attends to the ``n x 4`` tokens in one softmax).
* Negative tokens: the official unconditional branch, ``ProjPlusModel(zeros_like(normed),
  clip_negative)`` for each photo (the same ``n x 4`` count).
* Every identity's tokens are regional: its ``[start, stop)`` range is visible only inside
  its mask (:mod:`generators.regional_attention`); there is no global block. With one
  full-frame identity this is exactly the official ``text + scale x SDPA(q, to_k_ip(ip),
  to_v_ip(ip))``.
* The file's rank-128 LoRA goes on every attention processor's q/k/v/out at
  ``lora_scale`` (global, as every method's LoRA), its ``to_k_ip`` / ``to_v_ip`` into
  the regional processors.

Defaults are the official ones (``IPAdapterFaceIDPlusXL.generate``): image scale 1.0,
LoRA 1.0 (the processors' ``lora_scale``; diffusers' ``set_adapters`` weight 1.0),
``shortcut=True`` and ``s_scale=1.0`` (PlusV2). The official examples guide at 7.5; the
guidance scale is ``ComposePipeline``'s, per call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from generators.lora import LoraWeights
from generators.methods.base import IdentityMethod, IdentityRequest, ImageTokens
from vault.errors import InvalidInput

__all__ = ["FaceIDMethod", "FaceIDSettings"]


@dataclass(frozen=True)
class FaceIDSettings:
    """FaceID-PlusV2's generation settings; the defaults are the official ones."""

    image_scale: float = 1.0  # weight of the decoupled image branch (generate(scale=1.0))
    lora_scale: float = 1.0  # weight of the rank-128 LoRA on every processor
    s_scale: float = 1.0  # weight of the CLIP (face structure) branch in the shortcut
    shortcut: bool = True  # PlusV2: tokens = id tokens + s_scale x perceiver(...)

    def __post_init__(self) -> None:
        for f in ("image_scale", "lora_scale", "s_scale"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise InvalidInput(f"faceid {f} must be a finite number, got {value!r}")
        if not isinstance(self.shortcut, bool):
            raise InvalidInput(f"faceid shortcut must be true or false, got {self.shortcut!r}")


@dataclass
class _Loaded:
    projection: torch.nn.Module  # generators.adapters.faceid.FaceIDPlusProjection
    lora: LoraWeights
    projections: dict[str, torch.Tensor]  # "<index>.to_k_ip.weight" -> (hidden, 2048)


class FaceIDMethod(IdentityMethod):
    """See the module docstring."""

    name = "faceid"
    artifact_kind = "faceid"
    uses_image_tokens = True

    def __init__(self, models_dir, *, device, dtype, settings=None) -> None:
        super().__init__(models_dir, device=device, dtype=dtype, settings=settings)
        self._loaded: dict[str, _Loaded] = {}  # weights id -> loaded weights (no identity data)
        self._selected: str | None = None

    @classmethod
    def default_settings(cls) -> FaceIDSettings:
        return FaceIDSettings()

    # -- checkpoint ----------------------------------------------------------------------
    def checkpoint(self) -> tuple[str, Path]:
        """``("faceid/ip-adapter-faceid-plusv2_sdxl.bin@<sha256[:16]>", path)``;
        ModelUnavailable (saying where it looked) when absent."""
        from encoders.id.checkpoints import file_digest, find_checkpoint

        path = find_checkpoint("faceid-plusv2-sdxl", self.models_dir)
        return f"faceid/{path.name}@{file_digest(path)[:16]}", path

    def problem(self, request: IdentityRequest) -> str | None:
        if not request.artifacts_of(self.artifact_kind):
            return f"{request.handle} has no faceid artifact (enroll with --kinds faceid)"
        self.checkpoint()  # ModelUnavailable when the adapter is not in the models folder
        return None

    def select(self, requests: Sequence[IdentityRequest]) -> None:
        for request in requests:
            why = self.problem(request)
            if why:
                raise InvalidInput(why, handle=request.handle)
            # Any faceid artifact fits the adapter (it holds encoder outputs only); the
            # listing is sorted by model id, so the choice is stable.
            request.artifact = request.artifacts_of(self.artifact_kind)[0]
        self._selected = self.checkpoint()[0] if requests else None

    def adapter_ids(self) -> tuple[str, ...]:
        return (self._selected,) if self._selected else ()

    # -- weights ---------------------------------------------------------------------------
    def _current(self) -> _Loaded:
        if self._selected is None or self._selected not in self._loaded:
            raise InvalidInput("FaceID: select() and load() come first")
        return self._loaded[self._selected]

    def load(self, unet) -> None:
        if self._selected is None:
            raise InvalidInput("FaceID: select() comes before load()")
        if self._selected in self._loaded:
            return
        from encoders.id.checkpoints import shapes_of
        from generators.adapters.faceid import load_faceid, plan_faceid_ip_adapter

        _, path = self.checkpoint()
        # Strict: variant, every image_proj key and shape, then every ip_adapter key and
        # shape against this UNet's processors and linears.
        projection, info = load_faceid(path, device=self.device, dtype=self.dtype)
        plan = plan_faceid_ip_adapter(shapes_of(info.ip_adapter), unet, source=str(path))
        lora = LoraWeights.from_state_dict(plan, info.ip_adapter, device=self.device,
                                           dtype=self.dtype)
        projections = {k: info.ip_adapter[k].to(self.device, self.dtype)
                       for k in plan.image_projection_keys}
        # One adapter at a time: a replaced file's weights (~1.5 GB) are not kept beside it.
        self._loaded = {self._selected: _Loaded(projection, lora, projections)}

    def loras(self) -> list[tuple[LoraWeights, float]]:
        return [(self._current().lora, self.settings.lora_scale)]

    def image_projections(self) -> dict[str, torch.Tensor]:
        # The same dict object every call: the pipeline reloads projections only when
        # it changes.
        return self._current().projections

    # -- per call -----------------------------------------------------------------------
    def prepare(self, requests: Sequence[IdentityRequest]) -> None:
        """Refuse, before any UNet work, artifacts whose widths do not fit the adapter."""
        config = self._current().projection.config
        for r in requests:
            t = r.tensors
            clip = t["clip_embeds"].shape[-1]
            if clip != config.clip_embeddings_dim:
                meta = r.opened.artifact.metadata
                raise InvalidInput(
                    f"{r.handle}'s faceid artifact holds {clip}-wide CLIP features (from "
                    f"{meta.get('clip_model_id', 'an unknown tower')}), but the adapter "
                    f"needs {config.clip_embeddings_dim} (CLIP ViT-H/14); re-enroll with "
                    "--kinds faceid using the ViT-H/14 tower", handle=r.handle)
            if t["normed"].shape[-1] != config.id_embeddings_dim:
                raise InvalidInput(f"{r.handle}'s faceid artifact holds "
                                   f"{t['normed'].shape[-1]}-d face embeddings; the adapter "
                                   f"needs {config.id_embeddings_dim}", handle=r.handle)

    @torch.no_grad()
    def image_tokens(self, requests: Sequence[IdentityRequest]) -> ImageTokens:
        """Per identity, in order: ``n x 4`` tokens over its ``n`` photos (see the module
        docstring); every range regional, no global block. Nothing is kept."""
        proj = self._current().projection
        s = self.settings
        positive, negative, ranges = [], [], {}
        start = 0
        for r in requests:
            t = r.tensors
            normed = torch.as_tensor(t["normed"]).to(self.device, self.dtype)  # (n, 512)
            clip = torch.as_tensor(t["clip_embeds"]).to(self.device, self.dtype)  # (n, P, C)
            zero_clip = torch.as_tensor(t["clip_negative"]).to(self.device, self.dtype)[None]
            n = normed.shape[0]
            pos = proj(normed, clip, shortcut=s.shortcut, scale=s.s_scale)  # (n, 4, D)
            # The negative is input-independent per photo: project it once, repeat it.
            neg = proj(torch.zeros_like(normed[:1]), zero_clip, shortcut=s.shortcut,
                       scale=s.s_scale).repeat(n, 1, 1)  # (n, 4, D)
            d = pos.shape[-1]
            positive.append(pos.reshape(-1, d))
            negative.append(neg.reshape(-1, d))
            ranges[r.handle] = (start, start + n * proj.config.num_tokens)
            start = ranges[r.handle][1]
        return ImageTokens(torch.cat(positive), torch.cat(negative), None, ranges)

    def end_call(self) -> None:
        """Nothing to drop: the tokens are computed in :meth:`image_tokens` and handed to
        the pipeline, and the method itself keeps only the adapter's weights (tested)."""
