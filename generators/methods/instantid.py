"""InstantID as an identity method: face tokens through decoupled attention, and the IdentityNet
ControlNet's residuals, each identity in its own region.

Per identity (InstantX/InstantID ``pipeline_stable_diffusion_xl_instantid.py``, ``infer.py``;
:mod:`generators.adapters.instantid` for the files):

* **Image tokens.** The stored raw antelopev2 embeddings ``(photos, 512)`` become
  ``(1, photos, 512)`` (the official ``prompt_image_emb.reshape([1, -1, 512])``) and the
  Resampler of ``ip-adapter.bin`` turns them into 16 tokens of 2048; the negative tokens are
  the projection of zeros of the same shape, computed in the same batch (the official
  ``image_proj_model(cat([zeros_like(emb), emb]))``). Every cross-attention adds
  ``ip_adapter_scale x SDPA(q, to_k_ip(tokens), to_v_ip(tokens))`` (official 0.8) with the
  file's ``ip_adapter`` projections; each identity's 16 tokens are visible only inside its
  mask (:mod:`generators.regional_attention`; no global block).
* **IdentityNet.** At every denoising step, per identity, the ControlNet runs on the UNet's
  own input with ``encoder_hidden_states`` = that identity's tokens (``[negative,
  positive]`` rows under classifier-free guidance, as the official pipeline), the
  keypoint image drawn for its box on the whole canvas (:mod:`generators.adapters.keypoints`,
  preprocessed as diffusers' ControlNet image processor does: ``prepare_image``),
  ``conditioning_scale`` = ``controlnet_conditioning_scale`` (official 0.8) and the UNet's
  ``added_cond_kwargs``. Every residual ``(rows, C, h, w)`` is multiplied by the identity's
  mask at ``h x w`` (exactly 0 outside its box) and the identities' residuals are summed
  (:meth:`InstantIDMethod.unet_residuals`). One identity with a full-frame box: the mask is
  all ones and the residuals are the official ones, unmasked. All identities run in one
  batched ControlNet call.

The face model. InstantID's adapter was trained on antelopev2's ``glintr100`` embeddings,
not buffalo_l's: an artifact is usable only when its ``model_id`` names a recogniser in
``InstantIDSettings.face_models``.

Per call, the tokens and keypoint images live in ``self._call`` and are dropped by
:meth:`InstantIDMethod.end_call` (and replaced at the next :meth:`prepare`): nothing derived
from a decrypted artifact outlives the call. Loaded weights stay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generators.methods.base import IdentityMethod, IdentityRequest, ImageTokens, Scene
from vault.errors import InvalidInput

__all__ = ["InstantIDMethod", "InstantIDSettings"]


@dataclass(frozen=True)
class InstantIDSettings:
    """InstantID's generation settings; the defaults are the official ones (README, infer.py)."""

    ip_adapter_scale: float = 0.8  # weight of the decoupled image branch (the Adapter)
    controlnet_conditioning_scale: float = 0.8  # weight of the IdentityNet residuals
    # Face recognisers (``<pack>/<file>``, the model id before "@") whose raw embeddings
    # the adapter reads: InstantID was trained on antelopev2's glintr100.
    face_models: tuple[str, ...] = ("antelopev2/glintr100.onnx",)

    def __post_init__(self) -> None:
        for name in ("ip_adapter_scale", "controlnet_conditioning_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise InvalidInput(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.face_models:
            raise InvalidInput("face_models names at least one face recogniser")

    @property
    def image_scale(self) -> float:
        """The name regional attention reads every image-token method's scale by."""
        return self.ip_adapter_scale


@dataclass
class _Loaded:
    adapter: object  # generators.adapters.instantid.InstantIDAdapter
    controlnet: torch.nn.Module  # diffusers ControlNetModel


@dataclass
class _CallState:
    """What one call derives from its decrypted artifacts (dropped by ``end_call``)."""

    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # (handle, (W, H)) -> (1, 3, H, W): the identity's keypoint image on that canvas
    images: dict[tuple[str, tuple[int, int]], torch.Tensor] = field(default_factory=dict)


class InstantIDMethod(IdentityMethod):
    """See the module docstring."""

    name = "instantid"
    artifact_kind = "instantid"
    uses_image_tokens = True

    def __init__(self, models_dir, *, device, dtype, settings=None) -> None:
        super().__init__(models_dir, device=device, dtype=dtype, settings=settings)
        self._loaded: dict[tuple[str, str], _Loaded] = {}
        self._selected: tuple[str, str] | None = None
        self._call: _CallState | None = None

    @classmethod
    def default_settings(cls) -> InstantIDSettings:
        return InstantIDSettings()

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoints(self) -> tuple[tuple[str, Path], tuple[str, Path]]:
        """``((adapter id, ip-adapter.bin), (controlnet id, ControlNetModel folder))``, ids
        ``instantid/<name>@<sha256[:16]>`` (the ControlNet's of its weights file);
        ModelUnavailable when either is absent."""
        from encoders.id.checkpoints import file_digest, find_checkpoint
        from generators.adapters.instantid import controlnet_weights_file

        adapter = find_checkpoint("instantid-ip-adapter", self.models_dir)
        folder = find_checkpoint("instantid-controlnet", self.models_dir)
        weights = controlnet_weights_file(folder)
        return ((f"instantid/{adapter.name}@{file_digest(adapter)[:16]}", adapter),
                (f"instantid/{folder.name}@{file_digest(weights)[:16]}", folder))

    def _usable(self, request: IdentityRequest) -> list[dict]:
        return [a for a in request.artifacts_of(self.artifact_kind)
                if a["model_id"].split("@")[0] in self.settings.face_models]

    def problem(self, request: IdentityRequest) -> str | None:
        arts = request.artifacts_of(self.artifact_kind)
        if not arts:
            return (f"{request.handle} has no instantid artifact (enroll with --kinds "
                    "instantid)")
        self.checkpoints()  # ModelUnavailable when the weights are absent
        if self._usable(request):
            return None
        return (f"{request.handle}'s instantid artifact was made with "
                f"{', '.join(sorted(a['model_id'] for a in arts))}, but InstantID reads "
                f"embeddings of {', '.join(self.settings.face_models)}; re-enroll with "
                "--kinds instantid using the antelopev2 face pack")

    def select(self, requests: Sequence[IdentityRequest]) -> None:
        (adapter_id, _), (controlnet_id, _) = self.checkpoints()
        for request in requests:
            why = self.problem(request)
            if why:
                raise InvalidInput(why, handle=request.handle)
            request.artifact = self._usable(request)[0]
        self._selected = (adapter_id, controlnet_id)

    def adapter_ids(self) -> tuple[str, ...]:
        return self._selected or ()

    # -- weights ---------------------------------------------------------------------------
    def _current(self) -> _Loaded:
        if self._selected is None or self._selected not in self._loaded:
            raise InvalidInput("InstantID: select() and load() come first")
        return self._loaded[self._selected]

    def load(self, unet) -> None:
        if self._selected is None:
            raise InvalidInput("InstantID: select() comes before load()")
        if self._selected in self._loaded:
            return
        from generators.adapters.instantid import load_controlnet, read_ip_adapter

        (_, adapter_path), (_, folder) = self.checkpoints()
        adapter = read_ip_adapter(adapter_path, unet, device=self.device, dtype=self.dtype)
        controlnet = load_controlnet(folder, unet, token_width=adapter.config.output_dim,
                                     device=self.device, dtype=self.dtype)
        self._loaded[self._selected] = _Loaded(adapter, controlnet)

    def image_projections(self) -> dict[str, torch.Tensor]:
        return self._current().adapter.projections

    @property
    def controlnet(self) -> torch.nn.Module:
        """The loaded IdentityNet of the selected files."""
        return self._current().controlnet

    # -- per call ----------------------------------------------------------------------------
    def prepare(self, requests: Sequence[IdentityRequest]) -> None:
        width = self._current().adapter.config.embedding_dim
        for r in requests:
            emb = r.tensors["embeddings"]
            if emb.ndim != 2 or emb.shape[1] != width:
                raise InvalidInput(f"{r.handle}: instantid embeddings are {emb.shape}, the "
                                   f"adapter reads (photos, {width})", handle=r.handle)
        self._call = _CallState()

    def end_call(self) -> None:
        self._call = None

    def _state(self) -> _CallState:
        if self._call is None:
            self._call = _CallState()
        return self._call

    @torch.no_grad()
    def _tokens(self, request: IdentityRequest) -> tuple[torch.Tensor, torch.Tensor]:
        """``(negative, positive)``, each ``(16, 2048)``, of one identity (once per call)."""
        state = self._state()
        if request.handle not in state.tokens:
            proj = self._current().adapter.image_proj
            emb = torch.from_numpy(request.tensors["embeddings"]).to(self.device, self.dtype)
            emb = emb.reshape(1, -1, emb.shape[-1])  # (1, photos, 512), official reshape
            both = proj(torch.cat([torch.zeros_like(emb), emb]))  # (2, 16, 2048)
            state.tokens[request.handle] = (both[0], both[1])
        return state.tokens[request.handle]

    def image_tokens(self, requests: Sequence[IdentityRequest]) -> ImageTokens:
        """16 tokens per identity in order of mention; no global block."""
        pairs = [self._tokens(r) for r in requests]
        n = pairs[0][1].shape[0]
        ranges = {r.handle: (n * k, n * (k + 1)) for k, r in enumerate(requests)}
        return ImageTokens(torch.cat([p for _, p in pairs]), torch.cat([q for q, _ in pairs]),
                           None, ranges)

    def _keypoint_images(self, requests: Sequence[IdentityRequest], scene: Scene,
                         canvas: tuple[int, int]) -> torch.Tensor:
        """``(identities, 3, H, W)`` in [0, 1]: each identity's keypoints in its box."""
        state = self._state()
        width, height = canvas
        for r in requests:
            if (r.handle, canvas) in state.images:
                continue
            from diffusers.image_processor import VaeImageProcessor

            from generators.adapters.keypoints import keypoint_image

            # diffusers' ControlNet image processor (StableDiffusionXLControlNetPipeline).
            processor = VaeImageProcessor(vae_scale_factor=self.pipe.vae_scale_factor,
                                          do_convert_rgb=True, do_normalize=False)
            t = r.tensors
            box = scene.layout.box(r.handle).as_tuple()
            image = keypoint_image(t["kps"], tuple(t["image_size"]), box, canvas)
            state.images[r.handle, canvas] = processor.preprocess(
                image, height=height, width=width).to(dtype=torch.float32)
        return torch.cat([state.images[r.handle, canvas] for r in requests])

    @torch.no_grad()
    def unet_residuals(self, requests: Sequence[IdentityRequest], scene: Scene, *,
                       sample: torch.Tensor, timestep: torch.Tensor,
                       added_cond_kwargs: dict[str, torch.Tensor], cfg: bool,
                       ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The IdentityNet residuals of every identity, masked to its region and summed:
        ``([(rows, C_i, h_i, w_i)] per down-block residual, (rows, C, h, w))``."""
        controlnet = self.controlnet
        rows, _, h, w = sample.shape
        k = len(requests)
        canvas = (w * self.pipe.vae_scale_factor, h * self.pipe.vae_scale_factor)
        images = self._keypoint_images(requests, scene, canvas)  # (k, 3, H, W)
        images = images.to(self.device, controlnet.dtype).repeat_interleave(rows, dim=0)
        tokens = []
        for r in requests:  # (rows, 16, D) each: [negative, positive] under CFG
            negative, positive = self._tokens(r)
            tokens.append(torch.stack([negative, positive]) if cfg else positive[None])
        if tokens[0].shape[0] != rows:
            raise InvalidInput(f"the UNet input has {rows} rows; InstantID expects "
                               f"{tokens[0].shape[0]} ({'with' if cfg else 'without'} "
                               "classifier-free guidance)")
        # One batched call, identity-major: rows of identity 0, then identity 1, ...
        down, mid = controlnet(
            sample.repeat(k, 1, 1, 1), timestep,
            encoder_hidden_states=torch.cat(tokens).to(controlnet.dtype),
            controlnet_cond=images,
            conditioning_scale=float(self.settings.controlnet_conditioning_scale),
            added_cond_kwargs={key: v.repeat(k, *([1] * (v.ndim - 1)))
                               for key, v in added_cond_kwargs.items()},
            return_dict=False)
        if k == 1 and scene.exact(requests[0].handle):
            return list(down), mid  # the official residuals, unmasked
        return [self._masked_sum(d, requests, scene) for d in down], \
            self._masked_sum(mid, requests, scene)

    def _masked_sum(self, residual: torch.Tensor, requests: Sequence[IdentityRequest],
                    scene: Scene) -> torch.Tensor:
        """``(k * rows, C, h, w)`` -> ``sum_i mask_i * residual_i``: ``(rows, C, h, w)``."""
        k = len(requests)
        _, c, h, w = residual.shape
        per = residual.view(k, -1, c, h, w)
        masks = torch.stack([scene.mask(r.handle, h * w, device=residual.device,
                                        dtype=residual.dtype).view(1, 1, h, w)
                             for r in requests])  # (k, 1, 1, h, w)
        return (per * masks).sum(dim=0)
