"""ComposePipeline: multi-person SDXL scenes from identity handles, with signed provenance.

::

    pipe = ComposePipeline.from_pretrained(None, vault=vault, models_dir="~/models")
    result = pipe("@smiths/ana:girl and @smiths/ben hiking in the alps, watercolor",
                  seed=7, steps=30, owner="smiths")
    result.save("hike.png")          # PNG with the signed provenance manifest

The SDXL components come from :mod:`generators.sdxl` (a folder, a hub name, or
the models folder). One call runs numbered steps, each timed
(``GenerationResult.timings``):

1. ``check_inputs``: parse the prompt (:mod:`generators.prompt`), size,
   steps, seed, method; the layout (``--layout`` or the automatic strips in
   order of mention) and its masks at every cross-attention resolution.
2. ``resolve``: owner scoping and consent for ``generate`` (and
   ``commercial`` when asked) for every identity, a method per identity
   (:mod:`generators.methods.assignment`) with its artifact, made with the
   weights in the models folder -- all from metadata, nothing decrypted; then
   the methods' weights are loaded and the chosen artifacts decrypted (consent
   checked again by the vault, each read audited). Every refusal happens here,
   before any UNet work.
3. ``encode_prompt``: SDXL text conditioning (:mod:`generators.prompt_tokens`,
   :mod:`generators.prompt_encoding`, exactly diffusers' ``encode_prompt`` per
   row): the scene text with each fusing identity's class token repeated; the
   text-only prompt when PhotoMaker needs it; the negative prompt (zeros when
   none, SDXL's ``force_zeros_for_empty_prompt``). Celeb Basis identities'
   token embeddings go in at their class-token copies
   (:func:`generators.conditioning.inject_input_embeddings`); LiDB's
   text-encoder deltas act while encoding when its identity is alone in a
   full-frame box.
4. ``conditioning``: the methods' fused text tokens and image tokens (every
   image-token method's block after another, each its own adapter: projections
   and scale), the per-phase :class:`~generators.conditioning.Phase` with its
   :class:`~generators.regional_attention.RegionalConditioning`, the LoRAs.
5. ``prepare_latents``: seeded Gaussian latents (a CPU generator, so a seed
   gives the same image on any device), exactly as the diffusers pipeline.
6. ``denoise``: the diffusers SDXL loop (classifier-free guidance, the
   scheduler's step) with regional attention installed, the LoRAs applied and
   the methods' UNet hooks (LiDB's regional deltas) in place; at each step
   the methods' ControlNet residuals (InstantID's IdentityNet,
   ``IdentityMethod.unet_residuals``) are summed and passed to the UNet. All
   are taken off again afterwards, also on error, so the pipeline (and a
   plain ``StableDiffusionXLPipeline`` sharing its components) is as before.
7. ``decode``: VAE decode and post-processing, as the diffusers pipeline.
8. ``record``: the provenance record and manifest, and one ``generate`` audit
   event per identity (handles, artifact ids, seed, prompt digest, pixel digest).

With no identity in the prompt, or one identity with a full-frame box and the
official settings, the steps reduce exactly to the plain / official pipeline
(tested). After every call, also a failed one, each of its methods' ``end_call``
runs, so nothing derived from the decrypted artifacts outlives it. One
generation runs at a time per pipeline object (a lock).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy.orm import Session

from encoders.base_model_id import base_model_id
from generators.conditioning import (
    CallImageTokens,
    Phase,
    build_phase,
    inject_input_embeddings,
    join_image_tokens,
)
from generators.layout import DEFAULT_FEATHER, Layout, MaskConfig, choose_layout
from generators.methods import DEFAULT_PREFERENCE, METHODS
from generators.methods.assignment import assign_methods, check_method_choice
from generators.methods.base import IdentityMethod, IdentityRequest, Scene
from generators.methods.faceid import FaceIDSettings
from generators.methods.instantid import InstantIDSettings
from generators.methods.photomaker import PhotoMakerSettings
from generators.methods.storymaker import StoryMakerSettings
from generators.prompt import ParsedPrompt, parse_prompt, resolve_identities
from generators.prompt_encoding import PromptEncoder
from generators.prompt_tokens import PromptTokens, tokenize_prompt
from generators.provenance import (
    GenerationRecord,
    IdentityUse,
    audit_generation,
    build_manifest,
    save_signed_png,
)
from generators.regional_attention import RegionalAttention, RegionalConfig
from generators.sdxl import decode_latents, find_base_model, load_sdxl
from vault.errors import InvalidInput, ModelUnavailable

__all__ = ["STEPS", "ComposeConfig", "ComposePipeline", "GenerationResult"]

STEPS = ("check_inputs", "resolve", "encode_prompt", "conditioning", "prepare_latents",
         "denoise", "decode", "record")
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class ComposeConfig:
    """Generation settings; per-call arguments override the first two."""

    guidance_scale: float = 5.0  # classifier-free guidance (SDXL, PhotoMaker and StoryMaker demos)
    negative_prompt: str | None = None  # None: the zero negative embedding
    feather: float = DEFAULT_FEATHER  # mask ramp of caller-given layouts (image fraction)
    auto_overlap: float = 0.1  # automatic strips overlap by this and are feathered by it
    text_mask: str = "hard"  # RegionalConfig.text_mask
    image_mask: str = "soft"  # RegionalConfig.image_mask
    # An identity's class word (StoryMaker's, PhotoMaker's text-only phase) acts only in
    # its region too, so "girl" and "man" do not spread over both people.
    regional_class_words: bool = True
    fuse_lora: bool = True  # merge LoRAs into weights per call (exactly restored) vs hooks
    # Keep the merged LoRA weights between calls (generators.lora.MergeCache): one extra copy
    # of the touched attention weights held while idle, no merge per call.
    lora_cache: bool = True
    # Prompt rows kept for reuse (generators.prompt_encoding.Encodings; 0: off).
    prompt_cache: int = 16
    preference: tuple[str, ...] = DEFAULT_PREFERENCE  # --method auto: first that works
    photomaker: PhotoMakerSettings = field(default_factory=PhotoMakerSettings)
    storymaker: StoryMakerSettings = field(default_factory=StoryMakerSettings)
    faceid: FaceIDSettings = field(default_factory=FaceIDSettings)
    instantid: InstantIDSettings = field(default_factory=InstantIDSettings)

    def __post_init__(self) -> None:
        if not self.guidance_scale >= 0:
            raise InvalidInput(f"guidance scale must be >= 0, got {self.guidance_scale!r}")
        if self.prompt_cache < 0:
            raise InvalidInput(f"prompt_cache must be >= 0, got {self.prompt_cache!r}")
        RegionalConfig(self.text_mask, self.image_mask, MaskConfig(self.feather))


@dataclass
class GenerationResult:
    """What one call made: the image, its (unsigned) manifest, timings per step."""

    image: object  # PIL.Image.Image
    manifest: dict  # what save() signs (build_manifest of the record and the pixels)
    timings: dict[str, float]  # seconds per step (STEPS) and "total"
    record: GenerationRecord
    methods: dict[str, str]  # handle -> method
    created_at: dt.datetime
    generation_id: str  # shared by this generation's audit events
    _vault: object = field(repr=False, default=None)

    def save(self, path: Path | str) -> dict:
        """Write the PNG with its signed manifest (the same as ``self.manifest``)."""
        return save_signed_png(self._vault, self.image, self.record, path,
                               created_at=self.created_at)


class _Clock:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - t0


@dataclass
class _Call:
    """What the steps of one call hand each other."""

    parsed: ParsedPrompt
    size: tuple[int, int]  # (width, height)
    latent_hw: tuple[int, int]
    steps: int
    seed: int
    guidance: float
    negative: str | None
    cfg: bool  # classifier-free guidance: [negative, positive] rows
    placed: tuple[Layout, RegionalConfig] | None
    requests: list[IdentityRequest] = field(default_factory=list)
    groups: dict[str, list[IdentityRequest]] = field(default_factory=dict)
    scene: Scene | None = None
    fused_tokens: PromptTokens | None = None
    text_tokens: PromptTokens | None = None  # the text-only phase's prompt (PhotoMaker)
    merge_until: int = -1  # steps i <= merge_until use the text-only phase
    embeds: torch.Tensor | None = None  # (rows, 77, 2048): fused[, text-only][, negative]
    pooled: torch.Tensor | None = None  # (rows, P)
    negative_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (1, 77, 2048), (1, P)

    @property
    def by_index(self) -> dict[int, IdentityRequest]:
        return {r.index: r for r in self.requests}


class ComposePipeline:
    """Composes one image of several identities (see the module docstring).

    Reusable: methods keep their loaded weights, regional attention and LoRAs
    are installed per call and removed after it. Between calls it keeps the
    merged LoRA weights (``ComposeConfig.lora_cache``) and recent prompt
    encodings (``prompt_cache``), each reused only while what it was made
    from is unchanged; nothing decrypted is kept, so consent is checked and
    every artifact read audited on every call.
    """

    def __init__(self, pipe, *, vault, models_dir: Path | str | None = None,
                 config: ComposeConfig = ComposeConfig(), base_model_id: str = "unknown") -> None:
        self.pipe = pipe
        self.vault = vault
        self.models_dir = models_dir
        self.config = config
        self.base_model_id = base_model_id
        unet = pipe.unet
        self.device, self.dtype = unet.device, unet.dtype
        self.methods: dict[str, IdentityMethod] = {}
        for cls in METHODS.values():
            self.add_method(cls)
        # Built at the first call with identities; its processors keep each image-token
        # method's projections (by reference: the method's tensors, no copy) across calls.
        self._regional: RegionalAttention | None = None
        from generators.lora import MergeCache

        self._merged = MergeCache() if config.fuse_lora and config.lora_cache else None
        self.encode = PromptEncoder(pipe, device=self.device, cache_size=config.prompt_cache)
        # Per image-token method, the projections dict its adapter was loaded from.
        self._projections: dict[str, dict] = {}
        self._lock = threading.Lock()
        cross = getattr(unet.config, "cross_attention_dim", None)
        width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        if cross != width:
            raise ModelUnavailable(f"base model {base_model_id}: the UNet's cross-attention "
                                   f"width {cross} is not the text encoders' {width}; not SDXL")

    def add_method(self, cls: type[IdentityMethod], *,
                   settings: object | None = None) -> IdentityMethod:
        """Make ``cls`` available to this pipeline only (``method=cls.name`` and ``auto``,
        after the preference order); the registered methods are added at construction.
        ``settings``: None takes ``ComposeConfig.<name>`` when there is one."""
        if not getattr(cls, "name", None) or not getattr(cls, "artifact_kind", None):
            raise InvalidInput("an identity method needs a name and an artifact_kind")
        if settings is None:
            settings = getattr(self.config, cls.name, None)
        method = cls(self.models_dir, device=self.device, dtype=self.dtype, settings=settings)
        method.bind(pipe=self.pipe, vault=self.vault, base_model_id=self.base_model_id)
        self.methods[cls.name] = method
        return method

    @classmethod
    def from_pretrained(cls, base_model: str | Path | None = None, *, vault,
                        models_dir: Path | str | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        config: ComposeConfig = ComposeConfig()) -> ComposePipeline:
        """Load the SDXL components (see :func:`generators.sdxl.find_base_model`)."""
        source = find_base_model(base_model, models_dir)
        pipe = load_sdxl(source, device=device, dtype=dtype)
        model_id = base_model_id(source) if isinstance(source, Path) else f"hf:{source}"
        return cls(pipe, vault=vault, models_dir=models_dir, config=config,
                   base_model_id=model_id)

    def clear_caches(self) -> None:
        """Drop the merged LoRA weights and prompt encodings kept between calls.

        Only needed after editing the UNet's or text encoders' weights in a way
        PyTorch does not track (writes through ``.data``); every other change is
        noticed on the next call.
        """
        if self._merged is not None:
            self._merged.clear()
        self.encode.clear()

    # -- facts -----------------------------------------------------------------------------
    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) the base model was trained at: SDXL 1024, the stand-in 64."""
        side = int(self.pipe.unet.config.sample_size) * self.pipe.vae_scale_factor
        return side, side

    def attention_factors(self) -> tuple[int, ...]:
        """Latent down-sampling factors at which the UNet has cross-attention (SDXL: 2, 4)."""
        types = list(self.pipe.unet.config.down_block_types)
        factors = {2**i for i, t in enumerate(types) if "CrossAttn" in t}
        factors.add(2 ** (len(types) - 1))  # the mid block
        return tuple(sorted(factors))

    # -- the call ----------------------------------------------------------------------------
    def __call__(self, prompt: str, *, owner: str | None = None, actor: str | None = None,
                 layout: str | Layout | None = None, seed: int = 0, steps: int = 30,
                 size: tuple[int, int] | None = None, method: str | Mapping[str, str] = "auto",
                 commercial: bool = False, negative_prompt: str | None = None,
                 guidance_scale: float | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 finish: Callable[[Session, GenerationResult], None] | None = None
                 ) -> GenerationResult:
        """Make one image. ``owner`` scopes the handles (None: the local administrator);
        ``size`` is (width, height); ``method`` is ``auto``, a method name, or a
        mapping handle -> method. Raises the vault's errors (NotFound, ConsentError,
        InvalidInput, ModelUnavailable) before any UNet work. ``finish(session,
        result)`` runs in the transaction of the generation's audit events, before
        them (a job stores its image and marks itself done there)."""
        clock = _Clock()
        with self._lock, torch.no_grad(), contextlib.ExitStack() as ends:
            # 1. check inputs
            with clock("check_inputs"):
                call = self._check_inputs(prompt, layout, seed, steps, size, method,
                                          negative_prompt, guidance_scale)
            # When the call is over, also by an error: each of its methods drops what it
            # derived from the decrypted artifacts.
            ends.callback(self._end_call, call)
            # 2. resolve identities, methods and artifacts (every refusal happens here)
            with clock("resolve"):
                self._resolve(call, owner=owner, actor=actor, method=method,
                              commercial=commercial)
            # 3. encode the prompt
            with clock("encode_prompt"):
                self._encode_prompt(call, owner=owner)
            # 4. the methods' conditioning, per phase
            with clock("conditioning"):
                phases, image_tokens = self._conditioning(call)
            # 5. latents
            with clock("prepare_latents"):
                latents, time_ids, generator = self._prepare_latents(call, phases[-1])
            # 6. denoise
            with clock("denoise"):
                latents = self._denoise(call, phases, image_tokens, latents, time_ids,
                                        generator, progress)
            # 7. decode
            with clock("decode"):
                image = decode_latents(self.pipe, latents)
            # 8. provenance record and audit
            with clock("record"):
                result = self._record(call, prompt, image, clock.timings, owner=owner,
                                      actor=actor, commercial=commercial, finish=finish)
        clock.timings["total"] = time.perf_counter() - clock.start
        return result

    # -- the steps ---------------------------------------------------------------------------
    def _check_inputs(self, prompt, layout, seed, steps, size, method, negative_prompt,
                      guidance_scale) -> _Call:
        parsed = parse_prompt(prompt)
        width, height = self._check_size(size)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise InvalidInput(f"steps must be a whole number from 1 to {MAX_STEPS}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InvalidInput(f"seed must be a whole number from 0 to {MAX_SEED}")
        guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if not guidance >= 0:
            raise InvalidInput(f"guidance scale must be >= 0, got {guidance!r}")
        check_method_choice(method, parsed.handles, self.methods)
        latent_hw = (height // self.pipe.vae_scale_factor, width // self.pipe.vae_scale_factor)
        placed = None
        chosen = choose_layout(layout, parsed.handles, feather=self.config.feather,
                               auto_overlap=self.config.auto_overlap)
        if chosen is not None:
            where, masks = chosen
            # Refuses a box that covers no cell at some cross-attention resolution.
            where.masks(latent_hw, self.attention_factors(), masks)
            placed = where, RegionalConfig(self.config.text_mask, self.config.image_mask, masks)
        return _Call(
            parsed, (width, height), latent_hw, steps, seed, guidance,
            self.config.negative_prompt if negative_prompt is None else negative_prompt,
            cfg=guidance > 1.0 and self.pipe.unet.config.time_cond_proj_dim is None,
            placed=placed)

    def _check_size(self, size) -> tuple[int, int]:
        if size is None:
            return self.default_size
        try:
            width, height = (int(v) for v in size)
        except (TypeError, ValueError):
            raise InvalidInput(f"size is (width, height), got {size!r}") from None
        step = self.pipe.vae_scale_factor
        if not (step <= width <= 4096 and step <= height <= 4096) or width % step or height % step:
            raise InvalidInput(f"size {width}x{height}: width and height must be multiples of "
                               f"{step} from {step} to 4096")
        return width, height

    def _resolve(self, call: _Call, *, owner, actor, method, commercial) -> None:
        purposes = ("generate", "commercial") if commercial else ("generate",)
        resolved = resolve_identities(self.vault, call.parsed, owner=owner, purposes=purposes)
        call.requests = [IdentityRequest(i, r.handle, call.parsed.class_words[i], r)
                         for i, r in enumerate(resolved)]
        call.groups = assign_methods(self.methods, call.requests, method,
                                     self.config.preference)
        for name in call.groups:
            self.methods[name].load(self.pipe.unet)
        # Decrypt last, all in one transaction: a refusal above leaves no read in the
        # audit log, and the reads share one commit.
        opened = self.vault.get_artifacts(
            [(r.handle, r.artifact["kind"], r.artifact["model_id"]) for r in call.requests],
            purpose="commercial" if commercial else "generate", actor=actor)
        for r, o in zip(call.requests, opened, strict=True):
            r.opened = o
        for name, members in call.groups.items():  # e.g. a Celeb Basis basis, LiDB factors
            self.methods[name].prepare(members)
        call.scene = Scene(len(call.requests), call.placed[0] if call.placed else None)

    def _method_of(self, call: _Call) -> dict[int, IdentityMethod]:
        return {r.index: self.methods[r.method] for r in call.requests}

    def _encode_prompt(self, call: _Call, *, owner) -> None:
        pipe, parsed, by_index = self.pipe, call.parsed, call.by_index
        method_of = self._method_of(call)
        fusing = {i for i, m in method_of.items() if m.fuses_text()}
        spans = [m.scene_span for m in parsed.mentions]
        counts = [method_of[m.identity].class_tokens(by_index[m.identity])
                  if m.identity in fusing else 1 for m in parsed.mentions]
        tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
        call.fused_tokens = tokenize_prompt(tokenizers, parsed.scene_text, spans, counts)
        call.merge_until = max((method_of[i].text_only_until(call.steps) for i in fusing),
                               default=-1)
        if call.merge_until >= 0:
            call.text_tokens = tokenize_prompt(tokenizers, parsed.scene_text, spans,
                                               [1] * len(spans))
        rows = [call.fused_tokens.ids] + ([call.text_tokens.ids] if call.text_tokens else [])
        if call.cfg and call.negative is not None:
            rows.append(tokenize_prompt(tokenizers, call.negative, [], []).ids)
        with contextlib.ExitStack() as text_hooks:
            for name, members in call.groups.items():  # e.g. LiDB's text-encoder deltas
                text_hooks.enter_context(
                    self.methods[name].text_encoder_hooks(members, call.scene))
            embeds, pooled = self.encode(rows, scope=owner)  # (rows, 77, 2048), (rows, P)
            call.embeds, call.pooled = inject_input_embeddings(
                self.encode, embeds, pooled, tokens=call.fused_tokens, parsed=parsed,
                fusing=fusing, method_of=method_of, by_index=by_index, scene=call.scene)
            if not call.cfg:
                return
            if call.negative is not None:
                call.negative_rows = call.embeds[-1:], call.pooled[-1:]
            elif pipe.config.force_zeros_for_empty_prompt:
                call.negative_rows = (torch.zeros_like(call.embeds[:1]),
                                      torch.zeros_like(call.pooled[:1]))
            else:  # a base model without force_zeros: encode ""
                call.negative_rows = self.encode(
                    [tokenize_prompt(tokenizers, "", [], []).ids], scope=owner)

    def _conditioning(self, call: _Call) -> tuple[list[Phase], CallImageTokens | None]:
        method_of = self._method_of(call)
        fusing = {i for i, m in method_of.items() if m.fuses_text()}
        fused = call.embeds[:1]
        for i in sorted(fusing):
            mentions = [call.fused_tokens.identity[k]
                        for k, m in enumerate(call.parsed.mentions) if m.identity == i]
            fused = method_of[i].fuse_text(fused, call.by_index[i], mentions)
        image = self._image_tokens(call.groups)
        common = dict(parsed=call.parsed, requests=call.requests, image=image,
                      placed=call.placed, latent_hw=call.latent_hw, negative=call.negative_rows,
                      class_words=self.config.regional_class_words)
        phases = [build_phase(fused, call.pooled[:1], tokens=call.fused_tokens, fused=fusing,
                              **common)]
        if call.text_tokens is not None:
            phases.insert(0, build_phase(call.embeds[1:2], call.pooled[1:2],
                                         tokens=call.text_tokens, fused=set(), **common))
        return phases, image

    def _prepare_latents(self, call: _Call, phase: Phase):
        pipe = self.pipe
        width, height = call.size
        # Timesteps first: the initial noise scale (init_noise_sigma) depends on them.
        pipe.scheduler.set_timesteps(call.steps, device=self.device)
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        generator = torch.Generator(device="cpu").manual_seed(call.seed)
        latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, height, width,
                                       phase.embeds.dtype, self.device, generator)
        try:
            time_ids = pipe._get_add_time_ids(
                (height, width), (0, 0), (height, width), dtype=phase.embeds.dtype,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        except ValueError as exc:
            raise ModelUnavailable(f"base model {self.base_model_id}: {exc}") from None
        return latents, time_ids.to(self.device).repeat(2 if call.cfg else 1, 1), generator

    def _denoise(self, call: _Call, phases: list[Phase], image: CallImageTokens | None,
                 latents, time_ids, generator, progress) -> torch.Tensor:
        pipe = self.pipe
        timesteps = pipe.scheduler.timesteps
        extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
        loras = [lora for name in call.groups for lora in self.methods[name].loras()]
        regional = self._regional_attention() if call.groups else None
        with contextlib.ExitStack() as stack:
            if loras:
                from generators.lora import AppliedLoras

                stack.enter_context(AppliedLoras(pipe.unet, loras, fuse=self.config.fuse_lora,
                                                 cache=self._merged))
            if regional is not None:
                stack.enter_context(regional)  # install ... remove, also on error
            for name, members in call.groups.items():  # e.g. LiDB's regional deltas
                stack.enter_context(self.methods[name].unet_hooks(members, call.scene))
            for i, t in enumerate(timesteps):
                phase = phases[0] if i <= call.merge_until else phases[-1]
                if regional is not None:
                    regional.conditioning = phase.conditioning
                call.scene.conditioning = phase.conditioning
                model_in = torch.cat([latents] * 2) if call.cfg else latents
                model_in = pipe.scheduler.scale_model_input(model_in, t)
                added = {"text_embeds": phase.pooled, "time_ids": time_ids}
                residuals = self._residuals(call, model_in, t, added)
                noise = pipe.unet(model_in, t, encoder_hidden_states=phase.embeds,
                                  added_cond_kwargs=added, return_dict=False, **residuals)[0]
                if call.cfg:
                    uncond, text = noise.chunk(2)
                    noise = uncond + call.guidance * (text - uncond)
                latents = pipe.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
                if progress is not None:
                    progress(i + 1, len(timesteps))
        return latents

    def _record(self, call: _Call, prompt: str, image, timings: dict[str, float], *, owner,
                actor, commercial, finish) -> GenerationResult:
        from vault.vault import _actor

        groups = call.groups
        record = GenerationRecord.for_prompt(
            prompt,
            identities=tuple(IdentityUse.from_opened([r.opened],
                                                     consent_id=r.resolved.consent_id,
                                                     method=r.method) for r in call.requests),
            base_model=self.base_model_id, seed=call.seed, steps=call.steps, size=call.size,
            adapters=tuple(a for name in groups for a in self.methods[name].adapter_ids()))
        created = dt.datetime.now(dt.UTC)
        manifest = build_manifest(self.vault, record, image, created_at=created)
        generation_id = str(uuid.uuid4())
        result = GenerationResult(image, manifest, timings, record,
                                  {r.handle: r.method for r in call.requests}, created,
                                  generation_id, self.vault)
        uses = [{"handle": r.handle, "artifact": r.opened.id, "method": r.method}
                for r in call.requests]
        audit_generation(self.vault, record, manifest, generation_id=generation_id, uses=uses,
                         owner=owner, actor=actor or _actor(), commercial=commercial,
                         before=None if finish is None else lambda s: finish(s, result))
        return result

    # -- helpers -------------------------------------------------------------------------------
    def _end_call(self, call: _Call) -> None:
        with contextlib.ExitStack() as stack:  # every method's, even when one of them fails
            for name in call.groups:
                stack.callback(self.methods[name].end_call)

    def _residuals(self, call: _Call, sample: torch.Tensor, timestep,
                   added: dict[str, torch.Tensor]) -> dict:
        """The UNet's ControlNet arguments at this step: the elementwise sum of every method's
        ``unet_residuals`` (in the order of the call's methods); ``{}`` when none has any."""
        total: tuple[list[torch.Tensor], torch.Tensor] | None = None
        for name, members in call.groups.items():
            got = self.methods[name].unet_residuals(members, call.scene, sample=sample,
                                                    timestep=timestep, added_cond_kwargs=added,
                                                    cfg=call.cfg)
            if got is None:
                continue
            down, mid = list(got[0]), got[1]
            if total is None:
                total = down, mid
                continue
            if len(down) != len(total[0]) or any(
                    a.shape != b.shape for a, b in zip(down, total[0], strict=True)) or \
                    mid.shape != total[1].shape:
                raise InvalidInput(f"{name}: its ControlNet residuals do not match the shapes "
                                   "of the other methods' residuals")
            total = [a + b for a, b in zip(total[0], down, strict=True)], total[1] + mid
        if total is None:
            return {}
        return {"down_block_additional_residuals": tuple(total[0]),
                "mid_block_additional_residual": total[1]}

    def _image_tokens(self, groups) -> CallImageTokens | None:
        """Every image-token method's tokens, one method's block after another (None when no
        method of the call has any), with each method's projections loaded into regional
        attention as the adapter of its name, at its ``settings.image_scale``."""
        parts = []
        for name, members in groups.items():
            m = self.methods[name]
            if not m.uses_image_tokens:
                continue
            tokens = m.image_tokens(members)
            if tokens is None:
                continue
            regional = self._regional_attention()
            projections = m.image_projections()
            if self._projections.get(name) is not projections:  # strict check once per dict
                regional.load_image_projections(projections, adapter=name)
                self._projections[name] = projections
            regional.set_scale(name, m.settings.image_scale)
            parts.append((name, tokens))
        return join_image_tokens(parts)

    def _regional_attention(self) -> RegionalAttention:
        """The pipeline's one regional attention (built at first use)."""
        if self._regional is None:
            self._regional = RegionalAttention(self.pipe.unet)
        return self._regional
