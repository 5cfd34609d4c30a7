"""LiDB as an identity method: a per-identity low-rank delta confined to its region.

A ``lidb`` artifact holds the train factors, the aux seed and the layer list
(:class:`encoders.fitting.lidb.LidbWeights`) for the base model named by its
``model_id``. Each layer's delta ``dW = up @ down`` (rank r) is added as a
forward hook on the layer's ``nn.Linear`` while the call runs -- no weight is
changed, nothing is merged, and the hooks are removed afterwards (also on
error). The hook adds ``mask * ((x @ down^T) @ up^T)``, where the mask says
where the delta may act:

* **UNet, spatial inputs** (``attn1`` ``to_q``/``to_k``/``to_v``/``to_out.0``
  and ``attn2`` ``to_q``/``to_out.0``: one token per feature-map cell): the
  identity's soft layout mask at that resolution, the same masks the
  regional attention uses. Outside its box the layer is the base layer.
* **UNet, text inputs** (``attn2`` ``to_k``/``to_v``: one token per prompt
  token): the delta acts only on the identity's own text positions (its
  class-word tokens, which the regional attention already shows only inside
  its box); the scene text's keys and values, seen everywhere, stay the base
  model's. Image tokens appended by StoryMaker are never touched.
* **Text encoders**: their deltas act on the prompt, which every region
  sees, so they cannot be regional: they are applied only when the identity
  is the prompt's only one and its box is the whole frame
  (:meth:`~generators.methods.Scene.exact`), and skipped otherwise.

With one identity in a full-frame box every delta applies everywhere, so
the call is exactly the base model with the exported LoRA file
(``load_lora_weights``) loaded at scale 1 (tested at the first denoising
step). Several LiDB identities' deltas add up, each in its own region;
mixing with PhotoMaker / StoryMaker works (their LoRAs are global, on top).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from generators.methods.base import IdentityRequest, Scene
from generators.methods.fitted import FittedMethod
from vault.errors import InvalidInput

__all__ = ["LidbMethod", "LidbSettings"]


@dataclass(frozen=True)
class LidbSettings:
    scale: float = 1.0  # the LoRA scale (1: as load_lora_weights without alphas)


class LidbMethod(FittedMethod):
    """See the module docstring."""

    name = "lidb"
    artifact_kind = "lidb"

    def __init__(self, models_dir, *, device, dtype, settings=None) -> None:
        super().__init__(models_dir, device=device, dtype=dtype, settings=settings)
        self.base_model_id = ""
        self._shapes: dict[str, tuple[int, int]] | None = None
        # request index -> {layer: (down (r, in), up (out, r))}
        self._factors: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    @classmethod
    def default_settings(cls) -> LidbSettings:
        return LidbSettings()

    def _roots(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder,
                "text_encoder_2": self.pipe.text_encoder_2}

    def load(self, unet) -> None:
        if self._shapes is None:
            from encoders.fitting.lidb import lidb_layers

            self._shapes = lidb_layers(self.pipe.unet,
                                       [self.pipe.text_encoder, self.pipe.text_encoder_2])

    def prepare(self, requests: Sequence[IdentityRequest]) -> None:
        from encoders.fitting.lidb import LidbWeights

        self._factors.clear()
        for r in requests:
            try:
                weights = LidbWeights.from_artifact(r.opened.artifact)
                factors = {name: (down.to(self.device, self.dtype), up.to(self.device, self.dtype))
                           for name, down, up in weights.factors(self._shapes)}
            except (KeyError, ValueError) as exc:
                raise InvalidInput(f"{r.handle}: its lidb artifact does not fit this base "
                                   f"model: {exc}", handle=r.handle) from None
            self._factors[r.index] = factors

    # -- hooks -------------------------------------------------------------------------------
    def text_encoder_hooks(self, requests, scene: Scene):
        return self._hooks([r for r in requests if scene.exact(r.handle)], scene,
                           text_encoders=True)

    def unet_hooks(self, requests, scene: Scene):
        return self._hooks(requests, scene, text_encoders=False)

    @contextlib.contextmanager
    def _hooks(self, requests: Sequence[IdentityRequest], scene: Scene, *,
               text_encoders: bool) -> Iterator[None]:
        from encoders.fitting.lidb import resolve

        roots = self._roots()
        per_layer: dict[str, list] = {}
        for r in requests:
            exact = scene.exact(r.handle)
            for name, (down, up) in self._factors[r.index].items():
                prefix, _, path = name.partition(".")
                if (prefix != "unet") != text_encoders:
                    continue
                if text_encoders or exact:
                    where = "all"
                elif ".attn2.to_k" in name or ".attn2.to_v" in name:
                    where = "text"
                else:
                    where = "spatial"
                per_layer.setdefault(name, []).append((r.handle, down, up, where))
        handles = []
        scale = self.settings.scale
        try:
            for name, entries in per_layer.items():
                prefix, _, path = name.partition(".")
                module = resolve(roots[prefix], path)

                def hook(mod, args, output, entries=entries):
                    x = args[0]
                    for handle, down, up, where in entries:
                        d = F.linear(F.linear(x, down.to(x)), up.to(x))  # x dW^T
                        if where == "spatial":
                            d = d * scene.mask(handle, x.shape[-2], device=x.device,
                                               dtype=x.dtype)
                        elif where == "text":
                            keep = torch.zeros(x.shape[-2], 1, device=x.device, dtype=x.dtype)
                            positions = [p for p in scene.text_positions(handle)
                                         if p < x.shape[-2]]
                            keep[positions] = 1
                            d = d * keep
                        output = output + scale * d
                    return output

                handles.append(module.register_forward_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()
