"""The interface of an identity method (:class:`IdentityMethod`) and what the pipeline
hands it: one identity's request, the scene, image tokens. See :mod:`generators.methods`
for how the pipeline calls each hook."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from generators.lora import LoraWeights
from vault.errors import InvalidInput

__all__ = ["IdentityMethod", "IdentityRequest", "ImageTokens", "Scene"]


@dataclass
class IdentityRequest:
    """One identity in one generation, as its method sees it."""

    index: int  # order of first mention = layout order
    handle: str  # owner/name (the layout's name)
    class_word: str
    resolved: object  # generators.prompt.ResolvedIdentity: consent id, artifact metadata
    method: str = ""
    artifact: dict | None = None  # the chosen artifact's metadata: id, kind, model_id, sha256
    opened: object | None = None  # vault.vault.OpenedArtifact, once decrypted

    @property
    def tensors(self) -> dict:
        if self.opened is None:
            raise InvalidInput(f"{self.handle}: artifact not decrypted yet")
        return self.opened.artifact.tensors

    def artifacts_of(self, kind: str) -> list[dict]:
        return [a for a in self.resolved.artifacts if a["kind"] == kind]


@dataclass(frozen=True)
class ImageTokens:
    """Decoupled image tokens of one method's identities in one call.

    ``positive``/``negative`` are ``(n, D)``; ``global_range`` is visible
    everywhere (StoryMaker's background block), ``ranges`` maps each handle
    to its ``[start, stop)``, both counted from the method's first token. The
    pipeline appends every image-token method's block after the text, one after
    another (:func:`generators.conditioning.join_image_tokens`), each an adapter
    of its own in regional attention.
    """

    positive: torch.Tensor
    negative: torch.Tensor
    global_range: tuple[int, int] | None
    ranges: dict[str, tuple[int, int]]


class Scene:
    """What per-identity hooks see of one call: how many identities, the layout, and the
    current phase's :class:`~generators.regional_attention.RegionalConditioning` (masks and
    each identity's text positions; the pipeline sets it per phase, before the UNet runs)."""

    def __init__(self, identities: int, layout=None, conditioning=None) -> None:
        self.identities = identities
        self.layout = layout  # generators.layout.Layout (None: no identity)
        self.conditioning = conditioning

    def exact(self, handle: str) -> bool:
        """True when ``handle`` is the prompt's only identity and its box is the whole frame:
        then a method applies itself everywhere, exactly as its plain (non-regional) form."""
        return (self.identities == 1 and self.layout is not None
                and self.layout.box(handle).full_frame)

    def text_positions(self, handle: str) -> tuple[int, ...]:
        c = self.conditioning
        if c is None:
            return ()
        return next((i.text_positions for i in c.identities if i.name == handle), ())

    def mask(self, handle: str, length: int, *, device, dtype) -> torch.Tensor:
        """``(length, 1)``: the identity's soft mask over a flattened ``h x w`` feature map."""
        m = self.conditioning.masks_for(length)[handle]
        return torch.as_tensor(m.reshape(-1, 1), device=device, dtype=dtype)


class IdentityMethod(ABC):
    """One way of conditioning a generation on an identity (see the module docstring).

    An instance belongs to one :class:`~generators.compose.ComposePipeline`
    and keeps the weights it loaded for the pipeline's lifetime.
    """

    name: ClassVar[str]
    artifact_kind: ClassVar[str]
    uses_image_tokens: ClassVar[bool] = False

    def __init__(self, models_dir: Path | str | None, *, device: torch.device,
                 dtype: torch.dtype, settings: object | None = None) -> None:
        self.models_dir = models_dir
        self.device = device
        self.dtype = dtype
        self.settings = settings if settings is not None else self.default_settings()

    @classmethod
    def default_settings(cls) -> object | None:
        return None

    def bind(self, *, pipe, vault, base_model_id: str) -> None:
        """The pipeline's components, vault and base-model id (ComposePipeline calls it)."""
        self.pipe, self.vault, self.base_model_id = pipe, vault, base_model_id

    # -- before any model work -----------------------------------------------------------
    @abstractmethod
    def problem(self, request: IdentityRequest) -> str | None:
        """None if ``request`` can use this method, else why not (cheap: no weights loaded;
        may raise ModelUnavailable when the method's checkpoint is absent)."""

    @abstractmethod
    def select(self, requests: Sequence[IdentityRequest]) -> None:
        """Set each request's ``artifact``; raise InvalidInput / ModelUnavailable naming why not."""

    def max_identities(self) -> int | None:
        return None

    def adapter_ids(self) -> tuple[str, ...]:
        """What the provenance manifest lists under ``adapters`` (after :meth:`select`)."""
        return ()

    # -- weights ---------------------------------------------------------------------------
    @abstractmethod
    def load(self, unet) -> None:
        """Load what the selected artifacts need (idempotent per checkpoint)."""

    def loras(self) -> list[tuple[LoraWeights, float]]:
        return []

    def prepare(self, requests: Sequence[IdentityRequest]) -> None:
        """After the chosen artifacts are decrypted, before any model work (may raise)."""

    def image_projections(self) -> dict[str, torch.Tensor] | None:
        """Index-keyed ``to_k_ip``/``to_v_ip`` for regional attention (image-token methods):
        the method's adapter, weighted by ``settings.image_scale``. Regional attention
        refers to these tensors (no copy) and checks them once per dict object, so return
        the same dict while the weights are the same."""
        return None

    # -- conditioning ----------------------------------------------------------------------
    def class_tokens(self, request: IdentityRequest) -> int:
        return 1

    def fuses_text(self) -> bool:
        return False

    def fuse_text(self, embeds: torch.Tensor, request: IdentityRequest,
                  mentions: Sequence[Sequence[int]]) -> torch.Tensor:
        """``embeds`` (1, 77, D) with the identity's positions (one list per mention) replaced."""
        return embeds

    def text_only_until(self, steps: int) -> int:
        return -1

    def image_tokens(self, requests: Sequence[IdentityRequest]) -> ImageTokens | None:
        return None

    def input_embeddings(self, request: IdentityRequest) -> dict[str, torch.Tensor] | None:
        """``{"text_encoder": (n, d1), "text_encoder_2": (n, d2)}``: input embeddings that
        replace each mention's ``n`` class-token copies before the text encoders."""
        return None

    def text_encoder_hooks(self, requests: Sequence[IdentityRequest],
                           scene: Scene) -> contextlib.AbstractContextManager:
        """Active while the prompt is encoded."""
        return contextlib.nullcontext()

    def unet_hooks(self, requests: Sequence[IdentityRequest],
                   scene: Scene) -> contextlib.AbstractContextManager:
        """Active while the UNet denoises."""
        return contextlib.nullcontext()

    def unet_residuals(self, requests: Sequence[IdentityRequest], scene: Scene, *,
                       sample: torch.Tensor, timestep: torch.Tensor,
                       added_cond_kwargs: dict[str, torch.Tensor], cfg: bool,
                       ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """Residuals to add to the UNet's skip connections at this step (a ControlNet's
        ``down_block_res_samples`` and ``mid_block_res_sample``: InstantID's IdentityNet),
        each already weighted by its identities' masks so it acts only in their regions;
        None: none. Called once per denoising step with the UNet's own input: ``sample``
        ``(rows, C, h, w)`` after ``scale_model_input`` (rows = [negative, positive] when
        ``cfg``), ``added_cond_kwargs`` its ``text_embeds``/``time_ids``. The pipeline adds
        the residuals of every method of the call."""
        return None

    def end_call(self) -> None:
        """The call is over (also after an error): drop everything derived from the
        decrypted artifacts (image tokens, keypoint images). Loaded weights stay."""
