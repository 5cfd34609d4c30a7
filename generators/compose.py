"""ComposePipeline: multi-person SDXL scenes from identity handles, with signed provenance.

::

    pipe = ComposePipeline.from_pretrained(None, vault=vault, models_dir="~/models")
    result = pipe("@smiths/ana:girl and @smiths/ben hiking in the alps, watercolor",
                  seed=7, steps=30, owner="smiths")
    result.save("hike.png")          # PNG with the signed provenance manifest

Components. The diffusers SDXL components (two tokenizers, two text encoders,
UNet, VAE, scheduler) come from ``StableDiffusionXLPipeline.from_pretrained``:
a local folder, a Hugging Face hub name, or -- with no ``base_model`` -- the
first SDXL folder in the models folder (:data:`BASE_MODEL_DIRS`, which ends
with the ``sdxl-tiny`` stand-in of ``idvault models tiny``). Nothing is
loaded or downloaded at import; an absent model is a
:class:`~vault.errors.ModelUnavailable` naming what and where.

One call runs numbered steps, each timed (``GenerationResult.timings``):

1. ``check_inputs``: parse the prompt (:mod:`generators.prompt`), size,
   steps, seed, method; the layout (``--layout`` or the automatic strips in
   order of mention) and its masks at every cross-attention resolution.
2. ``resolve``: owner scoping and consent for ``generate`` (and
   ``commercial`` when asked) for every identity, a method per identity
   (:mod:`generators.methods`) with its artifact, made with the weights in
   the models folder -- all from metadata, nothing decrypted; then the
   methods' weights are loaded and the chosen artifacts decrypted (consent
   checked again by the vault, each read audited). Every refusal happens
   here, before any UNet work.
3. ``encode_prompt``: SDXL text conditioning: per tokenizer the scene text
   with each fusing identity's class token repeated; penultimate hidden states
   of both text encoders concatenated (768 + 1280 = 2048), pooled embedding
   of text encoder 2 (text only); the text-only prompt when PhotoMaker needs
   it; the negative prompt (zeros when none, SDXL's
   ``force_zeros_for_empty_prompt``). One batched pass per encoder (none when
   a recent call encoded the same token ids: :class:`_Encodings`); Celeb Basis
   identities' token embeddings go in at their class-token copies (input side,
   :meth:`ComposePipeline._inject`), LiDB's text-encoder deltas act while encoding
   when its identity is alone in a full-frame box.
4. ``conditioning``: the methods' fused text tokens and image tokens, the
   per-phase :class:`~generators.regional_attention.RegionalConditioning`,
   the LoRAs.
5. ``prepare_latents``: seeded Gaussian latents (a CPU generator, so a seed
   gives the same image on any device), exactly as the diffusers pipeline.
6. ``denoise``: the diffusers SDXL loop (classifier-free guidance, the
   scheduler's step) with regional attention installed, the LoRAs applied and
   the methods' UNet hooks (LiDB's regional deltas) in place;
   both are taken off again afterwards, also on error, so the pipeline (and a
   plain ``StableDiffusionXLPipeline`` sharing its components) is as before.
7. ``decode``: VAE decode and post-processing, as the diffusers pipeline.
8. ``record``: the provenance record and manifest, and one ``generate`` audit
   event per identity (handles, artifact ids, seed, prompt digest, pixel digest).

With no identity in the prompt, or one identity with a full-frame box and the
official settings, the steps reduce exactly to the plain / official pipeline
(tested). One generation runs at a time per pipeline object (a lock).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from encoders.base_model_id import base_model_fingerprint, base_model_id
from generators.layout import DEFAULT_FEATHER, Layout, MaskConfig, auto_layout, parse_layout
from generators.methods import (
    DEFAULT_PREFERENCE,
    METHODS,
    IdentityMethod,
    IdentityRequest,
    ImageTokens,
    Scene,
)
from generators.methods.photomaker import PhotoMakerSettings
from generators.methods.storymaker import StoryMakerSettings
from generators.prompt import ParsedPrompt, parse_prompt, resolve_identities
from generators.provenance import (
    GenerationRecord,
    IdentityUse,
    build_manifest,
    save_signed_png,
)
from generators.regional_attention import (
    IdentityTokens,
    RegionalAttention,
    RegionalConditioning,
    RegionalConfig,
    cfg_text_rows,
)
from generators.text_encoding import SDXLTextEncoding
from vault.errors import InvalidInput, ModelUnavailable

__all__ = [
    "BASE_MODEL_DIRS",
    "STEPS",
    "ComposeConfig",
    "ComposePipeline",
    "GenerationResult",
    "PromptTokens",
    "base_model_fingerprint",
    "find_base_model",
    "load_sdxl",
    "tokenize_prompt",
]

# Folders a models folder may hold an SDXL base model in (diffusers layout, model_index.json),
# in order of preference: the real releases' names first, the tiny stand-in last.
BASE_MODEL_DIRS = ("stable-diffusion-xl-base-1.0", "sdxl-base-1.0", "sdxl-base", "sdxl",
                   "sdxl-tiny")
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
    # Prompt encodings kept for reuse (whole batches of token ids, <= 2 MB each; 0: off).
    prompt_cache: int = 16
    preference: tuple[str, ...] = DEFAULT_PREFERENCE  # --method auto: first that works
    photomaker: PhotoMakerSettings = field(default_factory=PhotoMakerSettings)
    storymaker: StoryMakerSettings = field(default_factory=StoryMakerSettings)

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


# -- base model ----------------------------------------------------------------------------------


def find_base_model(base_model: str | Path | None, models_dir: Path | str | None = None,
                    env: Mapping[str, str] | None = None) -> str | Path:
    """Where the SDXL components come from: a folder (``Path``) or a hub name (``str``).

    ``None`` looks in the models folder (``--models``, ``IDVAULT_MODELS``,
    ``~/.insightface``) for the folders of :data:`BASE_MODEL_DIRS`.
    """
    from encoders.face_pack import resolve_models_dir

    if base_model is None or str(base_model) == "":
        root = resolve_models_dir(models_dir, env)
        for name in BASE_MODEL_DIRS:
            if (root / name / "model_index.json").is_file():
                return root / name
        raise ModelUnavailable(
            f"no SDXL base model given (--base-model) and none found in the models folder "
            f"{root}: looked for a diffusers folder (with model_index.json) named "
            f"{', '.join(BASE_MODEL_DIRS)}. Pass --base-model DIR or a Hugging Face name "
            "(e.g. stabilityai/stable-diffusion-xl-base-1.0), or `idvault models tiny DIR` "
            "for an offline stand-in that makes noise, not pictures", searched=str(root))
    path = Path(base_model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ModelUnavailable(f"base model {path}: not a diffusers pipeline folder (no "
                                   "model_index.json); single-file checkpoints are not "
                                   "supported", path=str(path))
        return path
    text = str(base_model)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text  # a hub name: from_pretrained finds it in the cache or downloads it
    raise ModelUnavailable(f"base model {text}: no such folder, and not a Hugging Face name "
                           "(owner/name)", path=text)


def _quiet_loading():
    """diffusers/transformers progress bars and info chatter off while loading."""
    from diffusers.utils import logging as dlog

    from encoders.clip_vision import quiet_transformers

    stack = contextlib.ExitStack()
    was = dlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    stack.callback(lambda: dlog.enable_progress_bar() if was else None)
    stack.enter_context(quiet_transformers())
    return stack


def load_sdxl(source: str | Path, *, device: torch.device | str | None = None,
              dtype: torch.dtype | None = None):
    """``StableDiffusionXLPipeline.from_pretrained(source)`` on ``device`` (default: CUDA if
    present) in ``dtype`` (default: float16 on CUDA, float32 on CPU); ModelUnavailable on
    any failure, naming the source."""
    from diffusers import StableDiffusionXLPipeline

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    from diffusers.pipelines import pipeline_utils

    # diffusers >= 0.36 names it dtype (torch_dtype warns); older releases know only torch_dtype.
    dtype_kw = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
    try:
        with _quiet_loading():
            pipe = StableDiffusionXLPipeline.from_pretrained(str(source), **{dtype_kw: dtype})
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelUnavailable(f"SDXL base model {source}: cannot be loaded with "
                               f"StableDiffusionXLPipeline.from_pretrained: {first}",
                               path=str(source)) from None
    missing = [n for n in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
               if getattr(pipe, n, None) is None]
    if missing:
        raise ModelUnavailable(f"SDXL base model {source}: lacks {', '.join(missing)} (a "
                               "refiner? the generator needs the base model)", path=str(source))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# -- prompt tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTokens:
    """A prompt tokenized for both SDXL tokenizers, with the identity positions."""

    ids: tuple[tuple[int, ...], ...]  # per tokenizer: max_length ids (BOS ... EOS pad...)
    identity: tuple[tuple[int, ...], ...]  # per mention: its class-token copies
    words: tuple[tuple[int, ...], ...]  # per mention: every token of its class word


def tokenize_prompt(tokenizers: Sequence, text: str, spans: Sequence[tuple[int, int]],
                    counts: Sequence[int], *, max_length: int = 77) -> PromptTokens:
    """Tokenize ``text`` with each mention's class token (the last BPE piece of the word at
    ``spans[i]``) repeated ``counts[i]`` times -- PhotoMaker's expansion, per tokenizer.

    Layout as diffusers' tokenization: BOS, the tokens, EOS, padding with the
    tokenizer's pad token; a longer prompt keeps its first ``max_length - 2``
    tokens. A mention whose tokens would fall beyond that limit, or tokenizers
    that disagree on where the identities are, raise InvalidInput.
    """
    results = []
    for tok in tokenizers:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        owner: dict[int, int] = {}
        last: list[int] = []
        for m, (start, end) in enumerate(spans):
            hits = [j for j, (a, b) in enumerate(offsets) if a < end and b > start]
            if not hits:
                raise InvalidInput(f"the class word at characters {start}-{end} "
                                   f"({text[start:end]!r}) has no token")
            for j in hits:
                owner[j] = m
            last.append(hits[-1])
        body: list[int] = []
        identity: list[list[int]] = [[] for _ in spans]
        words: list[list[int]] = [[] for _ in spans]
        for j, token in enumerate(ids):
            m = owner.get(j)
            if m is not None and j == last[m]:
                start = 1 + len(body)  # +1: the BOS token comes first
                body += [token] * counts[m]
                identity[m] = list(range(start, start + counts[m]))
                words[m] += identity[m]
            else:
                if m is not None:
                    words[m].append(1 + len(body))
                body.append(token)
        limit = max_length - 2
        cut = [m for m in range(len(spans)) if words[m] and max(words[m]) > limit]
        if cut:
            s, e = spans[cut[0]]
            raise InvalidInput(
                f"the prompt is too long: the identity at characters {s}-{e} ({text[s:e]!r}) "
                f"falls beyond the {max_length}-token limit of the text encoders (after "
                "PhotoMaker repeats each class token once per ID token); shorten the prompt "
                "or mention the identities earlier")
        body = body[:limit]
        seq = [tok.bos_token_id, *body, tok.eos_token_id]
        seq += [tok.pad_token_id] * (max_length - len(seq))
        results.append((tuple(seq), tuple(map(tuple, identity)), tuple(map(tuple, words)),
                        tuple(body)))
    bodies = {r[3] for r in results}
    positions = {(r[1], r[2]) for r in results}
    if len(bodies) != 1 or len(positions) != 1:
        raise InvalidInput("the two SDXL tokenizers split this prompt differently; the "
                           "identity positions would not line up")
    return PromptTokens(tuple(r[0] for r in results), results[0][1], results[0][2])


# -- the pipeline ----------------------------------------------------------------------------------


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


def _tensor_stamp(t: torch.Tensor) -> tuple:
    # Object, version counter (in-place writes), storage, dtype, device and shape.
    return (id(t), t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))


# transformers installs hooks on its layers that only record outputs (output_hidden_states).
_RECORDING_HOOKS = "transformers.utils.output_capturing"


def _foreign_hooks(module: torch.nn.Module) -> bool:
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(getattr(h, "__module__", None) != _RECORDING_HOOKS for h in hooks)


def _encoder_state(encoders: Sequence[torch.nn.Module]) -> tuple | None:
    """A fingerprint of the text encoders' weights, or None when an encoding must not be
    reused: a forward hook anywhere (LiDB's text-encoder deltas, Celeb Basis' injection, a
    caller's; transformers' own output recorders aside), a peft layer (its scale is not a
    tensor), training mode (dropout)."""
    from torch.nn.modules import module as torch_module

    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return None
    state: list = []
    for encoder in encoders:
        if encoder.training:
            return None
        for m in encoder.modules():
            if _foreign_hooks(m) or type(m).__module__.startswith("peft"):
                return None
        state.append(id(encoder))
        state.extend(_tensor_stamp(t) for t in encoder.parameters())
        state.extend(_tensor_stamp(t) for t in encoder.buffers())
    return tuple(state)


class _Encodings:
    """Recent prompt encodings, reused while the text encoders are unchanged.

    Why: the same prompt is often generated again with another seed, and encoding it
    (both text encoders, one row per prompt; PhotoMaker adds a text-only row) is the
    largest fixed cost of a call. The key is the whole batch of token ids -- a batch of
    other rows may round differently -- and a hit is returned as a copy, so it equals
    the encoding it replaces bit for bit. The key also holds the call's ``owner``: a
    faster call must not tell one owner that another made the same prompt recently. Every lookup compares the encoders'
    fingerprint (:func:`_encoder_state`); with hooks or peft layers present nothing is
    read or stored. Only scene text is encoded here (class words in place of handles):
    identity data is fused in afterwards or injected on a pass that bypasses this.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: dict[tuple, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def get(self, key: tuple, state: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        hit = self._entries.pop(key, None)
        if hit is None or hit[0] != state:
            return None
        self._entries[key] = hit  # most recent last
        return hit[1].clone(), hit[2].clone()

    def put(self, key: tuple, state: tuple, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        self._entries[key] = (state, embeds.clone(), pooled.clone())
        while len(self._entries) > self.size:
            del self._entries[next(iter(self._entries))]

    def clear(self) -> None:
        self._entries.clear()


@dataclass
class _Phase:
    """One conditioning of the denoising loop (PhotoMaker: text-only, then fused)."""

    embeds: torch.Tensor  # (rows, 77 + image tokens, 2048); rows = [negative, positive] with CFG
    pooled: torch.Tensor  # (rows, P)
    conditioning: RegionalConditioning | None


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
        self.methods: dict[str, IdentityMethod] = {
            name: cls(models_dir, device=self.device, dtype=self.dtype,
                      settings=getattr(config, name, None))
            for name, cls in METHODS.items()}
        for m in self.methods.values():
            m.bind(pipe=pipe, vault=vault, base_model_id=base_model_id)
        self._regional: dict[bool, RegionalAttention] = {}
        from generators.lora import MergeCache

        self._merged = MergeCache() if config.fuse_lora and config.lora_cache else None
        self._encodings = _Encodings(config.prompt_cache) if config.prompt_cache else None
        self._text_encoding = SDXLTextEncoding()
        self._projections: int | None = None  # id() of the image projections loaded
        self._lock = threading.Lock()
        cross = getattr(unet.config, "cross_attention_dim", None)
        width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        if cross != width:
            raise ModelUnavailable(f"base model {base_model_id}: the UNet's cross-attention "
                                   f"width {cross} is not the text encoders' {width}; not SDXL")

    @classmethod
    def from_pretrained(cls, base_model: str | Path | None = None, *, vault,
                        models_dir: Path | str | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                        config: ComposeConfig = ComposeConfig()) -> ComposePipeline:
        """Load the SDXL components (see :func:`find_base_model`, :func:`load_sdxl`)."""
        source = find_base_model(base_model, models_dir)
        pipe = load_sdxl(source, device=device, dtype=dtype)
        if isinstance(source, Path):
            model_id = base_model_id(source)
        else:
            model_id = f"hf:{source}"
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
        if self._encodings is not None:
            self._encodings.clear()

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
                 progress: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Make one image. ``owner`` scopes the handles (None: the local administrator);
        ``size`` is (width, height); ``method`` is ``auto``, a method name, or a
        mapping handle -> method. Raises the vault's errors (NotFound, ConsentError,
        InvalidInput, ModelUnavailable) before any UNet work."""
        with self._lock, torch.no_grad():
            return self._generate(prompt, owner=owner, actor=actor, layout=layout, seed=seed,
                                  steps=steps, size=size, method=method, commercial=commercial,
                                  negative_prompt=negative_prompt,
                                  guidance_scale=guidance_scale, progress=progress)

    def _generate(self, prompt, *, owner, actor, layout, seed, steps, size, method, commercial,
                  negative_prompt, guidance_scale, progress) -> GenerationResult:
        clock = _Clock()
        pipe = self.pipe
        # 1. check inputs ----------------------------------------------------------------
        with clock("check_inputs"):
            parsed = parse_prompt(prompt)
            width, height = self._check_size(size)
            if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
                raise InvalidInput(f"steps must be a whole number from 1 to {MAX_STEPS}")
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
                raise InvalidInput(f"seed must be a whole number from 0 to {MAX_SEED}")
            guidance = self.config.guidance_scale if guidance_scale is None else guidance_scale
            if not guidance >= 0:
                raise InvalidInput(f"guidance scale must be >= 0, got {guidance!r}")
            negative = self.config.negative_prompt if negative_prompt is None else negative_prompt
            self._check_method(method, parsed)
            latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
            placed = self._layout(layout, parsed, latent_hw)
        # 2. resolve identities, methods and artifacts -----------------------------------
        with clock("resolve"):
            purposes = ("generate", "commercial") if commercial else ("generate",)
            resolved = resolve_identities(self.vault, parsed, owner=owner, purposes=purposes)
            requests = [IdentityRequest(i, r.handle, parsed.class_words[i], r)
                        for i, r in enumerate(resolved)]
            groups = self._assign(requests, method)
            for name in groups:
                self.methods[name].load(pipe.unet)
            purpose = "commercial" if commercial else "generate"
            # Decrypt last, all in one transaction: a refusal above leaves no read in
            # the audit log, and the reads share one commit.
            opened = self.vault.get_artifacts(
                [(r.handle, r.artifact["kind"], r.artifact["model_id"]) for r in requests],
                purpose=purpose, actor=actor)
            for r, o in zip(requests, opened, strict=True):
                r.opened = o
            for name, members in groups.items():  # e.g. a Celeb Basis basis, LiDB factors
                self.methods[name].prepare(members)
        by_index = {r.index: r for r in requests}
        method_of = {r.index: self.methods[r.method] for r in requests}
        cfg = guidance > 1.0 and pipe.unet.config.time_cond_proj_dim is None
        scene = Scene(len(requests), placed[0] if placed else None)
        # 3. encode the prompt -----------------------------------------------------------
        with clock("encode_prompt"), contextlib.ExitStack() as text_hooks:
            for name, members in groups.items():  # e.g. LiDB's text-encoder deltas
                text_hooks.enter_context(self.methods[name].text_encoder_hooks(members, scene))
            spans = [m.scene_span for m in parsed.mentions]
            fusing = {i for i, m in method_of.items() if m.fuses_text()}
            counts = [method_of[m.identity].class_tokens(by_index[m.identity])
                      if m.identity in fusing else 1 for m in parsed.mentions]
            tokenizers = (pipe.tokenizer, pipe.tokenizer_2)
            fused_tokens = tokenize_prompt(tokenizers, parsed.scene_text, spans, counts)
            merge_until = max((method_of[i].text_only_until(steps) for i in fusing), default=-1)
            text_tokens = (tokenize_prompt(tokenizers, parsed.scene_text, spans,
                                           [1] * len(spans)) if merge_until >= 0 else None)
            rows = [fused_tokens.ids] + ([text_tokens.ids] if text_tokens else [])
            if cfg and negative is not None:
                rows.append(tokenize_prompt(tokenizers, negative, [], []).ids)
            embeds, pooled = self._encode(rows, scope=owner)  # (rows, 77, 2048), (rows, P)
            embeds, pooled = self._inject(embeds, pooled, fused_tokens, parsed, fusing,
                                          method_of, by_index, scene)
            if cfg and negative is None and pipe.config.force_zeros_for_empty_prompt:
                neg_embeds, neg_pooled = torch.zeros_like(embeds[:1]), torch.zeros_like(pooled[:1])
            elif cfg:
                if negative is None:  # a base model without force_zeros: encode ""
                    e, p = self._encode([tokenize_prompt(tokenizers, "", [], []).ids],
                                        scope=owner)
                    neg_embeds, neg_pooled = e, p
                else:
                    neg_embeds, neg_pooled = embeds[-1:], pooled[-1:]
        # 4. method conditioning ---------------------------------------------------------
        with clock("conditioning"):
            fused = embeds[:1]
            for i in sorted(fusing):
                mentions = [fused_tokens.identity[k] for k, m in enumerate(parsed.mentions)
                            if m.identity == i]
                fused = method_of[i].fuse_text(fused, by_index[i], mentions)
            image, regional = self._image_tokens(groups)
            phases = [self._phase(fused, pooled[:1], fused_tokens, parsed, requests, fusing,
                                  image, placed, latent_hw, cfg, neg_embeds if cfg else None,
                                  neg_pooled if cfg else None)]
            if text_tokens is not None:
                phases.insert(0, self._phase(embeds[1:2], pooled[1:2], text_tokens, parsed,
                                             requests, set(), image, placed, latent_hw, cfg,
                                             neg_embeds if cfg else None,
                                             neg_pooled if cfg else None))
            loras = [lora for name in groups for lora in self.methods[name].loras()]
        # 5. latents ---------------------------------------------------------------------
        with clock("prepare_latents"):
            # Timesteps first: the initial noise scale (init_noise_sigma) depends on them.
            pipe.scheduler.set_timesteps(steps, device=self.device)
            timesteps = pipe.scheduler.timesteps
            if hasattr(pipe.scheduler, "set_begin_index"):
                pipe.scheduler.set_begin_index(0)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, height, width,
                                           phases[-1].embeds.dtype, self.device, generator)
            try:
                add_time_ids = pipe._get_add_time_ids(
                    (height, width), (0, 0), (height, width), dtype=phases[-1].embeds.dtype,
                    text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
            except ValueError as exc:
                raise ModelUnavailable(f"base model {self.base_model_id}: {exc}") from None
            add_time_ids = add_time_ids.to(self.device).repeat(2 if cfg else 1, 1)
            extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
        # 6. denoise ---------------------------------------------------------------------
        with clock("denoise"), contextlib.ExitStack() as stack:
            if loras:
                from generators.lora import AppliedLoras

                stack.enter_context(AppliedLoras(pipe.unet, loras, fuse=self.config.fuse_lora,
                                                 cache=self._merged))
            if regional is not None:
                stack.enter_context(regional)  # install ... remove, also on error
            for name, members in groups.items():  # e.g. LiDB's regional deltas
                stack.enter_context(self.methods[name].unet_hooks(members, scene))
            for i, t in enumerate(timesteps):
                phase = phases[0] if i <= merge_until else phases[-1]
                if regional is not None:
                    regional.conditioning = phase.conditioning
                scene.conditioning = phase.conditioning
                model_in = torch.cat([latents] * 2) if cfg else latents
                model_in = pipe.scheduler.scale_model_input(model_in, t)
                noise = pipe.unet(model_in, t, encoder_hidden_states=phase.embeds,
                                  added_cond_kwargs={"text_embeds": phase.pooled,
                                                     "time_ids": add_time_ids},
                                  return_dict=False)[0]
                if cfg:
                    uncond, text = noise.chunk(2)
                    noise = uncond + guidance * (text - uncond)
                latents = pipe.scheduler.step(noise, t, latents, **extra,
                                              return_dict=False)[0]
                if progress is not None:
                    progress(i + 1, len(timesteps))
        # 7. decode ----------------------------------------------------------------------
        with clock("decode"):
            image_out = self._decode(latents)
        # 8. provenance record and audit -------------------------------------------------
        with clock("record"):
            record = GenerationRecord.for_prompt(
                prompt,
                identities=tuple(IdentityUse.from_opened([r.opened],
                                                         consent_id=r.resolved.consent_id,
                                                         method=r.method) for r in requests),
                base_model=self.base_model_id, seed=seed, steps=steps, size=(width, height),
                adapters=tuple(a for name in groups for a in self.methods[name].adapter_ids()))
            created = dt.datetime.now(dt.UTC)
            manifest = build_manifest(self.vault, record, image_out, created_at=created)
            generation_id = str(uuid.uuid4())
            self._audit(generation_id, record, requests, manifest, owner, actor, commercial)
        clock.timings["total"] = time.perf_counter() - clock.start
        return GenerationResult(image_out, manifest, clock.timings, record,
                                {r.handle: r.method for r in requests}, created,
                                generation_id, self.vault)

    # -- steps ---------------------------------------------------------------------------------
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

    def _check_method(self, method, parsed: ParsedPrompt) -> None:
        names = [method] if isinstance(method, str) else list(dict(method).values())
        unknown = sorted({n for n in names if n != "auto" and n not in METHODS})
        if unknown:
            raise InvalidInput(f"unknown method {', '.join(unknown)}; methods: auto, "
                               f"{', '.join(METHODS)}")
        if not isinstance(method, str):
            extra = sorted({k.lstrip("@") for k in method} - set(parsed.handles))
            if extra:
                raise InvalidInput(f"methods given for identities the prompt does not "
                                   f"mention: {', '.join(extra)}")

    def _layout(self, layout, parsed: ParsedPrompt,
                latent_hw) -> tuple[Layout, RegionalConfig] | None:
        names = parsed.handles
        if not names:
            if layout:
                raise InvalidInput("a layout was given but the prompt mentions no identity")
            return None
        if layout is None or (isinstance(layout, str) and not layout.strip()):
            placed = auto_layout(names, overlap=self.config.auto_overlap)
            masks = MaskConfig(feather=self.config.auto_overlap)  # neighbours cross at 0.5
        elif isinstance(layout, Layout):
            placed = parse_layout(json.dumps({n: list(b.as_tuple()) for n, b in
                                              zip(layout.names, layout.boxes, strict=True)}),
                                  names)
            masks = MaskConfig(feather=self.config.feather)
        else:
            placed = parse_layout(str(layout), names)
            masks = MaskConfig(feather=self.config.feather)
        # Refuses a box that covers no cell at some cross-attention resolution.
        placed.masks(latent_hw, self.attention_factors(), masks)
        return placed, RegionalConfig(self.config.text_mask, self.config.image_mask, masks)

    def _assign(self, requests: list[IdentityRequest], method) -> dict[str, list[IdentityRequest]]:
        """A method and an artifact per identity; raises before anything is decrypted."""
        if not requests:
            return {}
        if isinstance(method, str) and method != "auto":
            wanted = {r.index: method for r in requests}
        else:
            given = {} if isinstance(method, str) else {k.lstrip("@"): v for k, v in method.items()}
            wanted = {r.index: given[r.handle] for r in requests
                      if given.get(r.handle, "auto") != "auto"}
            open_ = [r for r in requests if r.index not in wanted]
            wanted.update(self._auto(open_, fixed=wanted))
        groups: dict[str, list[IdentityRequest]] = {}
        for r in requests:
            r.method = wanted[r.index]
            groups.setdefault(r.method, []).append(r)
        for name, members in groups.items():
            self.methods[name].select(members)
        image_methods = [n for n in groups if self.methods[n].uses_image_tokens]
        if len(image_methods) > 1:
            raise InvalidInput(f"one image can use one image-token method, not "
                               f"{', '.join(image_methods)}")
        return groups

    def _auto(self, open_: list[IdentityRequest], *, fixed: dict[int, str]) -> dict[int, str]:
        """``--method auto``: one method for every open identity if one serves them all, else
        per identity the first in the preference order that serves it and has room."""
        if not open_:
            return {}
        order = [n for n in self.config.preference if n in self.methods]
        order += [n for n in self.methods if n not in order]
        reasons: dict[int, list[str]] = {r.index: [] for r in open_}
        missing: list[ModelUnavailable] = []  # methods whose weights are not installed
        absent: set[str] = set()
        serves: dict[str, set[int]] = {}
        room: dict[str, int | None] = {}
        for name in order:
            m = self.methods[name]
            serves[name] = set()
            try:
                for r in open_:
                    why = m.problem(r)
                    if why is None:
                        serves[name].add(r.index)
                    else:
                        reasons[r.index].append(why)
                limit = m.max_identities()
            except ModelUnavailable as exc:
                missing.append(exc)
                absent.add(name)
                for r in open_:
                    reasons[r.index].append(f"{name}: its weights are not in the models folder")
                serves[name], limit = set(), 0
            used = sum(1 for v in fixed.values() if v == name)
            room[name] = None if limit is None else limit - used
        everyone = {r.index for r in open_}
        for name in order:  # one method for all: one kind of conditioning, fewer LoRAs
            if serves[name] == everyone and (room[name] is None or room[name] >= len(open_)):
                return dict.fromkeys(everyone, name)
        out: dict[int, str] = {}
        for r in open_:
            for name in order:
                if r.index in serves[name] and (room[name] is None or room[name] > 0):
                    out[r.index] = name
                    if room[name] is not None:
                        room[name] -= 1
                    break
            else:
                # Every method the identity has an artifact for lacks its weights (methods
                # that need none -- Celeb Basis, LiDB -- count only with an artifact).
                if missing and not any(r.artifacts_of(self.methods[n].artifact_kind)
                                       for n in order if n not in absent):
                    raise ModelUnavailable(
                        "no identity method's weights are in the models folder:\n"
                        + "\n".join(e.message for e in missing))
                text = "; ".join(dict.fromkeys(reasons[r.index])) or "every method is full"
                raise InvalidInput(f"{r.handle} cannot be generated with any method: {text}",
                                   handle=r.handle)
        return out

    def _inject(self, embeds, pooled, tokens: PromptTokens, parsed: ParsedPrompt,
                fusing: set[int], method_of, by_index, scene: Scene):
        """Input-embedding methods (Celeb Basis): row 0 (the identity prompt) with each
        identity's vectors at its class-token copies. One identity in a full-frame box: the
        whole row and its pooled embedding from the injected pass (textual inversion exactly);
        otherwise only the identity's own positions, each from a pass with only its own
        vectors, so that CLIP's causal attention carries no identity into the scene text, the
        other identities or the pooled embedding (all seen everywhere)."""
        injecting = {}
        for i in sorted(fusing):
            vectors = method_of[i].input_embeddings(by_index[i])
            if vectors is not None:
                positions = [tokens.identity[k] for k, m in enumerate(parsed.mentions)
                             if m.identity == i]
                injecting[i] = (positions, vectors)
        if not injecting:
            return embeds, pooled
        embeds, pooled = embeds.clone(), pooled.clone()
        for i, (positions, vectors) in injecting.items():
            e, p = self._encode([tokens.ids], inject=(positions, vectors))
            if scene.exact(by_index[i].handle):
                embeds[0], pooled[0] = e[0], p[0]
            else:
                flat = [q for mention in positions for q in mention]
                embeds[0, flat] = e[0, flat]
        return embeds, pooled

    def _encode(self, rows: Sequence[tuple[tuple[int, ...], ...]],
                inject: tuple[Sequence[Sequence[int]], Mapping[str, torch.Tensor]] | None = None,
                *, scope: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of per-tokenizer ids -> (rows, 77, 2048) penultimate hidden states of both
        encoders side by side, and text encoder 2's pooled embedding (rows, P).

        ``inject``: (per mention its positions, {encoder key: (n, d)}) -- those positions'
        input embeddings replaced by the vectors, through a forward hook on each encoder's
        token-embedding module for this pass only (no token or table is changed).
        ``scope``: the call's owner, part of the reuse key (:class:`_Encodings`)."""
        pipe = self.pipe
        encoders = (pipe.text_encoder, pipe.text_encoder_2)
        key = state = None
        if inject is None and self._encodings is not None:
            state = _encoder_state(encoders)
            if state is not None:
                key = (scope, tuple(rows))
                hit = self._encodings.get(key, state)
                if hit is not None:
                    return hit
        hidden, pooled = [], None
        for k, encoder in enumerate(encoders):
            ids = torch.tensor([row[k] for row in rows], device=encoder.device)  # (rows, 77)
            handle = None
            if inject is not None:
                positions, vectors = inject
                vec = vectors[("text_encoder", "text_encoder_2")[k]]

                def hook(mod, args, output, positions=positions, vec=vec):
                    output = output.clone()
                    for mention in positions:
                        output[:, list(mention)] = vec.to(output)
                    return output

                handle = encoder.get_input_embeddings().register_forward_hook(hook)
            try:
                # (rows, 77, d_k): SDXL's penultimate layer; (rows, P) from text encoder 2
                h, p = self._text_encoding(encoder, ids, pooled=k == 1)
            finally:
                if handle is not None:
                    handle.remove()
            pooled = p if p is not None else pooled
            hidden.append(h)
        embeds = torch.cat(hidden, dim=-1).to(self.device, pipe.text_encoder_2.dtype)
        pooled = pooled.to(self.device, pipe.text_encoder_2.dtype)
        if key is not None:
            self._encodings.put(key, state, embeds, pooled)
        return embeds, pooled

    def _image_tokens(self, groups) -> tuple[ImageTokens | None, RegionalAttention | None]:
        """The image-token method's tokens and the regional attention to install (or None)."""
        if not groups:
            return None, None
        image = None
        for name, members in groups.items():
            m = self.methods[name]
            if m.uses_image_tokens:
                image = m.image_tokens(members)
                regional = self._regional_attention(True)
                projections = m.image_projections()
                if self._projections != id(projections):
                    regional.load_image_projections(projections)
                    self._projections = id(projections)
                regional.image_scale = m.settings.image_scale
                return image, regional
        return image, self._regional_attention(False)

    def _regional_attention(self, image_tokens: bool) -> RegionalAttention:
        if image_tokens not in self._regional:
            self._regional[image_tokens] = RegionalAttention(self.pipe.unet,
                                                             image_tokens=image_tokens)
        return self._regional[image_tokens]

    def _phase(self, embeds, pooled, tokens: PromptTokens, parsed: ParsedPrompt, requests,
               fused: set[int], image: ImageTokens | None, placed, latent_hw, cfg: bool,
               neg_embeds, neg_pooled) -> _Phase:
        """Sequence, pooled embedding and regional conditioning of one phase."""
        n_img = 0
        if image is not None:
            n_img = image.positive.shape[0]
            embeds = torch.cat([embeds, image.positive[None].to(embeds.dtype)], dim=1)
            if cfg:
                neg_embeds = torch.cat([neg_embeds, image.negative[None].to(embeds.dtype)], dim=1)
        if cfg:
            embeds = torch.cat([neg_embeds, embeds])  # diffusers' order: negative first
            pooled = torch.cat([neg_pooled, pooled])
        conditioning = None
        if requests:
            layout, regional_config = placed
            identities = []
            for r in requests:
                positions: set[int] = set()
                for k, m in enumerate(parsed.mentions):
                    if m.identity != r.index:
                        continue
                    if r.index in fused:
                        positions.update(tokens.identity[k])
                    if self.config.regional_class_words:
                        positions.update(tokens.words[k])
                rng = image.ranges.get(r.handle) if image is not None else None
                identities.append(IdentityTokens(r.handle, tuple(sorted(positions)), rng))
            conditioning = RegionalConditioning(
                layout, latent_hw, tuple(identities), text_len=77, num_image_tokens=n_img,
                global_image_tokens=image.global_range if image is not None else None,
                text_rows=cfg_text_rows(1) if cfg else None, config=regional_config)
        return _Phase(embeds, pooled, conditioning)

    def _decode(self, latents: torch.Tensor):
        """The diffusers SDXL decode: VAE (upcast from fp16 when the VAE asks), watermark if
        installed, post-processing to a PIL image."""
        pipe = self.pipe
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        try:
            mean = getattr(vae.config, "latents_mean", None)
            std = getattr(vae.config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
                latents = latents * std / vae.config.scaling_factor + mean
            else:
                latents = latents / vae.config.scaling_factor
            image = vae.decode(latents, return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")[0]

    def _audit(self, generation_id: str, record: GenerationRecord, requests, manifest: dict,
               owner: str | None, actor: str | None, commercial: bool) -> None:
        """One ``generate`` event per identity (so each identity's own trail shows every use),
        all sharing ``generation``; one with no subject when the prompt names nobody."""
        from vault import audit
        from vault.vault import _actor

        details = {"generation": generation_id,
                   "handles": [r.handle for r in requests],
                   "artifacts": [r.opened.id for r in requests],
                   "methods": {r.handle: r.method for r in requests},
                   "seed": record.seed, "steps": record.steps, "size": list(record.size),
                   "prompt_sha256": record.prompt_sha256, "base_model": record.base_model,
                   "adapters": list(record.adapters), "commercial": commercial,
                   "pixels_sha256": manifest["pixels"]["sha256"]}
        who = actor or _actor()
        with self.vault.session() as s:
            for r in requests:
                audit.append(s, "generate", actor=who, owner=r.handle.split("/")[0],
                             subject=r.handle, details=details)
            if not requests:
                audit.append(s, "generate", actor=who, owner=owner, subject=None,
                             details=details)

