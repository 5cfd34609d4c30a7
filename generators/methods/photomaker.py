"""PhotoMaker as an identity method: class-word expansion, ID fusion, ``start_merge_step``, LoRA.

Per identity (METHODS.md section 2, TencentARC/PhotoMaker ``pipeline.py``):

* The mention becomes its class word (``@smiths/ana:girl`` -> ``girl``,
  default ``person``) and the class token -- the last BPE piece of the word --
  is repeated ``N x tokens_per_photo`` times in the identity prompt (v1: N,
  v2: 2N; N = photos in the stored artifact), in *both* SDXL tokenizers.
  The official trigger word (``img``) is not needed: the mention marks the
  place.
* Those positions of the SDXL prompt embedding (penultimate hidden states of
  both text encoders, 2048 wide) are replaced, in order, by
  ``FuseModule(class embedding, stored ID embedding)`` -- the fuse module of
  the checkpoint in the models folder whose hash the artifact's ``model_id``
  names. Unlike the official single trigger word, any number of identities
  can be fused into one prompt, each at its own positions; the regional
  attention then keeps each one inside its box.
* Denoising steps ``i <= start_merge_step`` use the text-only prompt (the
  scene text, class word once) -- the official loop's ``<=`` -- and later
  steps the fused one. Unset, ``start_merge_step`` is the official demos'
  rule: ``int(style_strength / 100 * steps)``, capped at 30; a negative
  value fuses from the first step.
* The checkpoint's ``lora_weights`` (old diffusers processor format, rank
  read from the tensors) go onto the UNet at ``lora_scale`` (official 1.0)
  while the image is made (:mod:`generators.lora`).

All PhotoMaker identities of one image share one checkpoint (one fuse module,
one LoRA): v2 is preferred when every identity has a v2 artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from generators.lora import LoraWeights, attention_linears, plan_photomaker_lora
from generators.methods.base import IdentityMethod, IdentityRequest
from vault.errors import InvalidInput, ModelUnavailable

__all__ = ["PhotoMakerMethod", "PhotoMakerSettings"]


@dataclass(frozen=True)
class PhotoMakerSettings:
    """PhotoMaker's generation settings; the defaults are the official ones."""

    start_merge_step: int | None = None  # None: style_strength % of the steps, capped
    style_strength: float = 20.0  # percent of the steps conditioned on text only
    max_merge_step: int = 30  # the official demos' cap on start_merge_step
    lora_scale: float = 1.0  # the official pipeline fuses the LoRA at 1.0

    def merge_step(self, steps: int) -> int:
        if self.start_merge_step is not None:
            return self.start_merge_step
        return min(int(self.style_strength / 100 * steps), self.max_merge_step)


@dataclass
class _Loaded:
    version: str
    fuse: torch.nn.Module  # encoders.id.photomaker.FuseModule
    lora: LoraWeights


class PhotoMakerMethod(IdentityMethod):
    """See the module docstring."""

    name = "photomaker"
    artifact_kind = "photomaker"
    VERSIONS = ("v2", "v1")  # preference when several checkpoints would do

    def __init__(self, models_dir, *, device, dtype, settings=None) -> None:
        super().__init__(models_dir, device=device, dtype=dtype, settings=settings)
        self._selected: str | None = None  # model_id chosen for the current call
        self._loaded: dict[str, _Loaded] = {}

    @classmethod
    def default_settings(cls) -> PhotoMakerSettings:
        return PhotoMakerSettings()

    # -- checkpoints ---------------------------------------------------------------------
    def checkpoints(self) -> dict[str, tuple[str, Path]]:
        """``{model_id: (version, path)}`` of the PhotoMaker files in the models folder.

        Hashes each file once per process (encoders.id.checkpoints.file_digest).
        Raises ModelUnavailable (saying where it looked) when there is none.
        """
        from encoders.id.checkpoints import file_digest, find_checkpoint

        found: dict[str, tuple[str, Path]] = {}
        errors: list[ModelUnavailable] = []
        for version in self.VERSIONS:
            try:
                path = find_checkpoint(f"photomaker-{version}", self.models_dir)
            except ModelUnavailable as exc:
                errors.append(exc)
                continue
            found[f"photomaker/{path.name}@{file_digest(path)[:16]}"] = (version, path)
        if not found:
            raise ModelUnavailable("PhotoMaker: " + "\n".join(e.message for e in errors),
                                   searched=errors[0].details.get("searched"))
        return found

    def problem(self, request: IdentityRequest) -> str | None:
        arts = request.artifacts_of(self.artifact_kind)
        if not arts:
            return (f"{request.handle} has no photomaker artifact (enroll with --kinds "
                    "photomaker)")
        available = self.checkpoints()
        if any(a["model_id"] in available for a in arts):
            return None
        return (f"{request.handle}'s photomaker artifact was made with "
                f"{', '.join(sorted(a['model_id'] for a in arts))}, but the models folder "
                f"holds {', '.join(available)}; re-enroll with --kinds photomaker against "
                "these weights, or point --models at the weights it was made with")

    def select(self, requests: Sequence[IdentityRequest]) -> None:
        available = self.checkpoints()
        for request in requests:
            why = self.problem(request)
            if why:
                raise InvalidInput(why, handle=request.handle)
        for model_id in available:  # v2 first
            if all(any(a["model_id"] == model_id for a in r.artifacts_of(self.artifact_kind))
                   for r in requests):
                self._selected = model_id
                for r in requests:
                    r.artifact = next(a for a in r.artifacts_of(self.artifact_kind)
                                      if a["model_id"] == model_id)
                return
        listing = "; ".join(
            f"{r.handle}: " + ", ".join(a["model_id"] for a in r.artifacts_of(self.artifact_kind)
                                        if a["model_id"] in available) for r in requests)
        raise InvalidInput("PhotoMaker identities in one image share one checkpoint, but no "
                           f"checkpoint serves them all ({listing}); use --method storymaker "
                           "for some, or re-enroll them against one checkpoint")

    def adapter_ids(self) -> tuple[str, ...]:
        return (self._selected,) if self._selected else ()

    # -- weights ---------------------------------------------------------------------------
    def _current(self) -> _Loaded:
        if self._selected is None or self._selected not in self._loaded:
            raise InvalidInput("PhotoMaker: select() and load() come first")
        return self._loaded[self._selected]

    def load(self, unet) -> None:
        if self._selected is None:
            raise InvalidInput("PhotoMaker: select() comes before load()")
        if self._selected in self._loaded:
            return
        from encoders.id.checkpoints import is_stand_in
        from encoders.id.photomaker import FuseModule, PhotoMakerConfig, read_photomaker_checkpoint

        version, path = self.checkpoints()[self._selected]
        config = PhotoMakerConfig()
        if is_stand_in(path):
            from encoders.id.photomaker import TINY_PHOTOMAKER

            config = TINY_PHOTOMAKER
        # Checks every id_encoder key and shape and the LoRA layout, strictly.
        info, ids = read_photomaker_checkpoint(path, version=version, config=config)
        fuse_state = {k.removeprefix("fuse_module."): v.to(self.device, self.dtype)
                      for k, v in ids.items() if k.startswith("fuse_module.")}
        del ids
        with torch.device("meta"):
            fuse = FuseModule(config.embed_dim, config.fuse_hidden_dim)
        fuse.load_state_dict(fuse_state, strict=True, assign=True)
        plan = plan_photomaker_lora(info.lora_shapes, attention_linears(unet), source=str(path))
        lora = LoraWeights.from_state_dict(plan, _read_lora(path), device=self.device,
                                           dtype=self.dtype)
        self._loaded[self._selected] = _Loaded(version, fuse.eval(), lora)

    def loras(self) -> list[tuple[LoraWeights, float]]:
        return [(self._current().lora, self.settings.lora_scale)]

    # -- conditioning ----------------------------------------------------------------------
    def class_tokens(self, request: IdentityRequest) -> int:
        from encoders.id.photomaker import tokens_per_photo

        photos, tokens, _ = request.tensors["id_embeds"].shape  # (N, 1|2, 2048)
        version = self._current().version
        if tokens != tokens_per_photo(version):
            raise InvalidInput(f"{request.handle}: the photomaker artifact has {tokens} token(s) "
                               f"per photo but the {version} checkpoint uses "
                               f"{tokens_per_photo(version)}")
        return photos * tokens  # official: N (v1) or 2N (v2) class positions

    def fuses_text(self) -> bool:
        return True

    @torch.no_grad()
    def fuse_text(self, embeds: torch.Tensor, request: IdentityRequest,
                  mentions: Sequence[Sequence[int]]) -> torch.Tensor:
        """Each mention's class positions -> FuseModule(class embedding, ID embeddings)."""
        fuse = self._current().fuse
        ids = torch.from_numpy(request.tensors["id_embeds"]).to(embeds.device, embeds.dtype)
        for positions in mentions:  # a repeated mention is fused the same way again
            mask = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            mask[0, list(positions)] = True  # (1, 77)
            embeds = fuse(embeds, ids, mask)  # photo-major order, as the official forward
        return embeds

    def text_only_until(self, steps: int) -> int:
        return self.settings.merge_step(steps)


def _read_lora(path: Path) -> dict[str, torch.Tensor]:
    """The ``lora_weights`` tensors of a ``.bin`` (weights_only, memory-mapped) or the
    flat ``.safetensors`` variant."""
    from encoders.id.checkpoints import read_pickle_checkpoint

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k.removeprefix("lora_weights."): f.get_tensor(k)
                    for k in f.keys() if k.startswith("lora_weights.")}
    return dict(read_pickle_checkpoint(path, "PhotoMaker checkpoint")["lora_weights"])
