"""StoryMaker as an identity method: slot tokens behind the background block, decoupled attention.

Per image (METHODS.md section 3, RedAIGC/StoryMaker ``pipeline_sdxl_storymaker.py``):

* Each StoryMaker identity's stored 20 tokens (4 face + 16 character, before
  the slot position embedding) get slot ``k`` -- its order of mention among
  the image's StoryMaker identities, at most ``max_characters`` (3) -- through
  ``StoryMakerImageProj.compose``: ``x = tokens + pos_embed[k]``,
  ``x + norm_out(proj_out(x))``, with the learned ``bg_embed`` block first.
  The sequence appended after the 77 text tokens is ``(B + 1) x 20`` tokens;
  the background block is visible everywhere, each character's block only
  inside its mask (:mod:`generators.regional_attention`).
* The negative (classifier-free guidance) image tokens are the projection of
  zero inputs, composed the same way (``negative_tokens``), as the official
  pipeline's unconditional branch.
* Every cross-attention adds ``image_scale x SDPA(q, to_k_ip(img), to_v_ip(img))``
  (official 0.8), with the IP projections of ``mask.bin``'s ``ip_adapter``
  (index-keyed -> the SDXL processor order), and every attention processor
  gets the rank-128 LoRA of the same file at ``lora_scale`` (official 0.8).

The artifact's ``model_id`` (``storymaker/mask.bin@<sha256[:16]>+clip@...``)
must name the ``mask.bin`` in the models folder; the CLIP tower part is the
encoder's and is not needed here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from generators.lora import LoraWeights, attention_linears, plan_storymaker_lora
from generators.methods.base import IdentityMethod, IdentityRequest, ImageTokens
from vault.errors import InvalidInput

__all__ = ["StoryMakerMethod", "StoryMakerSettings"]


@dataclass(frozen=True)
class StoryMakerSettings:
    """StoryMaker's generation settings; the defaults are the official ones."""

    image_scale: float = 0.8  # weight of the decoupled image branch
    lora_scale: float = 0.8  # weight of the rank-128 LoRA on every processor


@dataclass
class _Loaded:
    image_proj: torch.nn.Module  # encoders.id.storymaker.StoryMakerImageProj
    lora: LoraWeights
    projections: dict[str, torch.Tensor]  # "<index>.to_k_ip.weight" -> (hidden, 2048)
    negatives: dict[int, torch.Tensor] = field(default_factory=dict)  # characters -> tokens


class StoryMakerMethod(IdentityMethod):
    """See the module docstring."""

    name = "storymaker"
    artifact_kind = "storymaker"
    uses_image_tokens = True

    def __init__(self, models_dir, *, device, dtype, settings=None) -> None:
        super().__init__(models_dir, device=device, dtype=dtype, settings=settings)
        self._loaded: dict[str, _Loaded] = {}
        self._selected: str | None = None

    @classmethod
    def default_settings(cls) -> StoryMakerSettings:
        return StoryMakerSettings()

    # -- checkpoint ----------------------------------------------------------------------
    def checkpoint(self) -> tuple[str, Path]:
        """``("storymaker/mask.bin@<sha256[:16]>", path)``; ModelUnavailable when absent."""
        from encoders.id.checkpoints import file_digest, find_checkpoint

        path = find_checkpoint("storymaker", self.models_dir)
        return f"storymaker/{path.name}@{file_digest(path)[:16]}", path

    def _config(self, path: Path):
        from encoders.id.checkpoints import is_stand_in
        from encoders.id.storymaker import StoryMakerConfig

        if is_stand_in(path):
            from encoders.id.storymaker import TINY_STORYMAKER

            return TINY_STORYMAKER
        return StoryMakerConfig()

    def max_identities(self) -> int:
        return self._config(self.checkpoint()[1]).max_characters

    def _matching(self, request: IdentityRequest, weights_id: str) -> list[dict]:
        return [a for a in request.artifacts_of(self.artifact_kind)
                if a["model_id"].split("+clip@")[0] == weights_id]

    def problem(self, request: IdentityRequest) -> str | None:
        arts = request.artifacts_of(self.artifact_kind)
        if not arts:
            return (f"{request.handle} has no storymaker artifact (enroll with --kinds "
                    "storymaker)")
        weights_id, _ = self.checkpoint()
        if self._matching(request, weights_id):
            return None
        return (f"{request.handle}'s storymaker artifact was made with "
                f"{', '.join(sorted(a['model_id'] for a in arts))}, but the models folder "
                f"holds {weights_id}; re-enroll with --kinds storymaker against these "
                "weights, or point --models at the weights it was made with")

    def select(self, requests: Sequence[IdentityRequest]) -> None:
        weights_id, _ = self.checkpoint()
        slots = self.max_identities()
        if len(requests) > slots:
            names = ", ".join(r.handle for r in requests)
            raise InvalidInput(f"StoryMaker has {slots} character slots but {len(requests)} "
                               f"identities were given to it ({names}); use --method auto or "
                               "photomaker for the others")
        for request in requests:
            why = self.problem(request)
            if why:
                raise InvalidInput(why, handle=request.handle)
            request.artifact = self._matching(request, weights_id)[0]
        self._selected = weights_id

    def adapter_ids(self) -> tuple[str, ...]:
        return (self._selected,) if self._selected else ()

    # -- weights ---------------------------------------------------------------------------
    def _current(self) -> _Loaded:
        if self._selected is None or self._selected not in self._loaded:
            raise InvalidInput("StoryMaker: select() and load() come first")
        return self._loaded[self._selected]

    def load(self, unet) -> None:
        if self._selected is None:
            raise InvalidInput("StoryMaker: select() comes before load()")
        if self._selected in self._loaded:
            return
        from encoders.id.checkpoints import read_pickle_checkpoint, shapes_of
        from encoders.id.storymaker import load_storymaker

        _, path = self.checkpoint()
        # Strict: every image_proj_model key and shape (encoders.id.storymaker).
        image_proj, _ = load_storymaker(path, self._config(path), device=self.device,
                                        dtype=self.dtype)
        ip = read_pickle_checkpoint(path, "StoryMaker checkpoint")["ip_adapter"]
        plan = plan_storymaker_lora(shapes_of(ip), list(unet.attn_processors),
                                    attention_linears(unet), source=str(path))
        lora = LoraWeights.from_state_dict(plan, ip, device=self.device, dtype=self.dtype)
        projections = {k: ip[k].to(self.device, self.dtype) for k in plan.image_projection_keys}
        self._loaded[self._selected] = _Loaded(image_proj, lora, projections)

    def loras(self) -> list[tuple[LoraWeights, float]]:
        return [(self._current().lora, self.settings.lora_scale)]

    def image_projections(self) -> dict[str, torch.Tensor]:
        return self._current().projections

    # -- conditioning ----------------------------------------------------------------------
    @torch.no_grad()
    def image_tokens(self, requests: Sequence[IdentityRequest]) -> ImageTokens:
        """``(B + 1) x 20`` tokens: bg, then each identity in slot order (order of mention)."""
        loaded = self._current()
        proj = loaded.image_proj
        n = proj.config.num_tokens  # 20
        tokens = torch.stack([torch.from_numpy(r.tensors["tokens"]) for r in requests])
        tokens = tokens.to(self.device, self.dtype)  # (B, 20, D)
        slots = list(range(len(requests)))
        positive = proj.compose(tokens, slots)  # (B + 1, 20, D)
        if len(requests) not in loaded.negatives:  # input-independent: computed once per B
            loaded.negatives[len(requests)] = proj.compose(proj.negative_tokens(len(requests)),
                                                           slots)  # (B + 1, 20, D)
        negative = loaded.negatives[len(requests)]
        d = positive.shape[-1]
        ranges = {r.handle: (n * (k + 1), n * (k + 2)) for k, r in enumerate(requests)}
        return ImageTokens(positive.reshape(-1, d), negative.reshape(-1, d), (0, n), ranges)
