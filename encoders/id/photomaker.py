"""PhotoMaker v1 and v2 ID encoders, compatible with the official checkpoints.

What enrollment stores (kind ``photomaker``) is the **pre-fusion ID
embedding** of every photo, ``id_embeds`` of shape ``(photos, tokens, 2048)``:

- **v1** (TencentARC/PhotoMaker ``photomaker/model.py``): the photo through
  OpenAI CLIP ViT-L/14 at 224 px; the pooled output (post-LayerNorm class
  token) through ``visual_projection`` (768) and ``visual_projection_2``
  (1280, no bias), concatenated: **one 2048-d vector per photo**.
- **v2** (``photomaker/model_v2.py``): the photo's **raw** ArcFace embedding
  (buffalo_l ``embedding``, not the normalised one) through ``token_proj``
  (512 -> 2048 -> GELU -> 4096), reshaped to 2 tokens x 2048 and LayerNormed,
  refined by a 4-layer perceiver (16 heads x 128) over the CLIP
  **last_hidden_state** (257 x 1024), plus that residual: **two 2048-d tokens
  per photo**.

The class word is chosen at generation time, so fusion happens there: this
module exposes the :class:`FuseModule` (``fused = layer_norm(mlp2(mlp1(cat[class,
id]) + class))``) and :func:`expand_class_tokens` (the class token repeated N
times for v1, 2N for v2, where the official pipeline hard-codes 2).

Checkpoints: ``photomaker-v1.bin`` / ``photomaker-v2.bin`` (a pickled dict
``{"id_encoder": ..., "lora_weights": ...}``, read only with
``torch.load(weights_only=True)``) or the flat safetensors variant with
``id_encoder.`` / ``lora_weights.`` prefixes. The version is read from the
keys (``qformer_perceiver.*`` means v2), every ``id_encoder`` name and shape
is checked against the module before anything loads (a CLIP ``position_ids``
buffer is accepted either way), mixed bf16/fp32 tensors are cast, and the
``lora_weights`` layout is checked and its rank read from the tensor shapes
(:func:`inspect_lora`). Any problem is a :class:`~vault.errors.ModelUnavailable`
naming the file and listing missing/unexpected keys and shape mismatches.

Integration contract (for enrollment)::

    encoder = PhotoMakerEncoder.from_models_dir(models_dir)       # v2 if present, else v1
    tensors, metadata = encoder.encode(photos, faces)             # photos: RGB uint8 arrays
    payload = vault.codec.encode("photomaker", tensors, metadata)  # faces: FaceResult per photo

``tensors == {"id_embeds": float32 (photos, 1|2, 2048)}`` and ``metadata ==
{"model_id": "photomaker/<file>@<sha256[:16]>", "version": "v1"|"v2", "photos":
"<n>"}``. Every photo needs its face (``None`` raises
:class:`~vault.errors.PhotoRejected` naming the photo; none is dropped).

All sizes are in :class:`PhotoMakerConfig`; the defaults are the official
ones (the official modules hard-code them), smaller ones build the tiny
stand-ins of :mod:`encoders.standins.id_models`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from encoders.id.checkpoints import (
    TOLERATED_EXTRA,
    compare_layout,
    file_digest,
    file_problem,
    find_checkpoint,
    is_stand_in,
    layout_error,
    read_pickle_checkpoint,
    shapes_of,
)
from encoders.id.clip_vision import (
    TINY_VIT_L,
    VIT_L14,
    ClipVisionSpec,
    build_vision_model,
    clip_preprocess,
    materialize_position_ids,
)
from vault.artifact_kinds import MAX_PHOTOS
from vault.errors import InvalidInput, ModelUnavailable, PhotoRejected

__all__ = [
    "TINY_PHOTOMAKER",
    "MLP",
    "ExpandedPrompt",
    "FacePerceiverResampler",
    "FuseModule",
    "LoraInfo",
    "PerceiverAttention",
    "PhotoMakerCheckpoint",
    "PhotoMakerConfig",
    "PhotoMakerEncoder",
    "PhotoMakerIDEncoder",
    "QFormerPerceiver",
    "Resampler",
    "detect_version",
    "expand_class_tokens",
    "expected_layout",
    "feed_forward",
    "inspect_lora",
    "load_photomaker",
    "lora_rank",
    "peft_lora_key",
    "read_photomaker_checkpoint",
    "tokens_per_photo",
]

Version = Literal["v1", "v2"]
VERSIONS: tuple[Version, ...] = ("v1", "v2")


# -- perceiver blocks (IP-Adapter ip_adapter/resampler.py, shared with StoryMaker) ----------


def feed_forward(dim: int, mult: float = 4) -> nn.Sequential:
    """LayerNorm -> Linear(no bias) -> GELU -> Linear(no bias); keys ``0``, ``1``, ``3``."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


class PerceiverAttention(nn.Module):
    """Latents attend to [inputs; latents] (IP-Adapter's PerceiverAttention)."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)  # (b, heads, n, dim_head)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)  # (b, n_in, dim)
        latents = self.norm2(latents)  # (b, n_lat, dim)
        b, n_lat, _ = latents.shape
        q = self._heads(self.to_q(latents))  # (b, heads, n_lat, dim_head)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._heads(k), self._heads(v)  # (b, heads, n_in + n_lat, dim_head)
        # The official order of operations: scale q and k by dim_head^-1/4 each
        # (steadier in fp16 than dividing afterwards), softmax in float32.
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)  # (b, heads, n_lat, n_in + n_lat)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        out = (weight @ v).permute(0, 2, 1, 3).reshape(b, n_lat, -1)  # (b, n_lat, inner)
        return self.to_out(out)


class FacePerceiverResampler(nn.Module):
    """Refines given latents (ID tokens) by attending to image features."""

    def __init__(self, *, dim: int = 768, depth: int = 4, dim_head: int = 64, heads: int = 16,
                 embedding_dim: int = 1280, output_dim: int = 768, ff_mult: float = 4) -> None:
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                           feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(x)  # (b, n_in, dim)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # (b, n_lat, output_dim)


class Resampler(FacePerceiverResampler):
    """Learned queries attending to image features (IP-Adapter's Resampler): the
    perceiver above with its latents as a parameter instead of an input."""

    def __init__(self, *, dim: int = 1024, depth: int = 8, dim_head: int = 64, heads: int = 16,
                 num_queries: int = 8, embedding_dim: int = 768, output_dim: int = 1024,
                 ff_mult: float = 4) -> None:
        super().__init__(dim=dim, depth=depth, dim_head=dim_head, heads=heads,
                         embedding_dim=embedding_dim, output_dim=output_dim, ff_mult=ff_mult)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        latents = self.latents.repeat(x.size(0), 1, 1)  # (b, queries, dim)
        return super().forward(latents, x)  # (b, queries, output_dim)


# -- fusion ------------------------------------------------------------------------------


class MLP(nn.Module):
    """LayerNorm(in) -> fc1 -> GELU -> fc2 (+ x when residual)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int,
                 use_residual: bool = True) -> None:
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError("a residual MLP needs in_dim == out_dim")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.use_residual = use_residual
        self.act_fn = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return out + x if self.use_residual else out


class FuseModule(nn.Module):
    """Fuses ID embeddings into the class-word positions of an SDXL prompt embedding."""

    def __init__(self, embed_dim: int = 2048, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = hidden_dim or embed_dim
        self.mlp1 = MLP(embed_dim * 2, embed_dim, hidden, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, hidden, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def fuse_fn(self, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        """``layer_norm(mlp2(mlp1(cat[class, id]) + class))``, row by row: (K, D) -> (K, D)."""
        stacked = torch.cat([prompt_embeds, id_embeds], dim=-1)  # (K, 2D)
        stacked = self.mlp1(stacked) + prompt_embeds
        return self.layer_norm(self.mlp2(stacked))

    def forward(self, prompt_embeds: torch.Tensor, id_embeds: torch.Tensor,
                class_tokens_mask: torch.Tensor) -> torch.Tensor:
        """Replace each row's class positions, in order, by the fused ID embeddings.

        ``prompt_embeds`` (B, 77, D); ``class_tokens_mask`` (B, 77) bool with K
        positions per row; ``id_embeds`` (B, photos, tokens, D), (B, K, D), or for
        B = 1 also (photos, tokens, D) -- the stored artifact -- or (K, D).
        Photo-major order: photo 0's tokens, then photo 1's, ...
        """
        b, s, d = prompt_embeds.shape
        mask = class_tokens_mask.to(torch.bool).reshape(b, s)
        ids = id_embeds.to(prompt_embeds.dtype).reshape(b, -1, d)  # (B, K, D), photo-major
        counts = mask.sum(dim=1)
        if bool((counts != ids.shape[1]).any()):
            raise InvalidInput(f"the prompt has {counts.tolist()} class-token position(s) per "
                               f"row but {ids.shape[1]} ID embedding(s) per row were given")
        out = prompt_embeds.clone()
        out[mask] = self.fuse_fn(prompt_embeds[mask], ids.reshape(-1, d)).to(out.dtype)
        return out


@dataclass(frozen=True)
class ExpandedPrompt:
    """One tokenizer's prompt with the trigger removed and the class token repeated."""

    input_ids: list[int]  # max_length ids
    class_tokens_mask: list[bool]  # True at the class positions the ID embeddings replace
    class_index: int  # first class position
    count: int  # class positions: photos x tokens per photo


def tokens_per_photo(version: Version, config: PhotoMakerConfig | None = None) -> int:
    """ID tokens per photo: 1 for v1, 2 for v2."""
    _check_version(version)
    return 1 if version == "v1" else (config or PhotoMakerConfig()).num_id_tokens


def expand_class_tokens(input_ids: Sequence[int], *, trigger_token_id: int, num_photos: int,
                        tokens_per_photo: int, pad_token_id: int,
                        max_length: int = 77) -> ExpandedPrompt:
    """The official prompt rewrite, per tokenizer, with the token count fixed for v1.

    ``input_ids`` is one tokenizer's encoding of the prompt (with BOS/EOS, no
    padding) in which the trigger word (``img``, added to the tokenizer as one
    token) follows the class word ("a photo of a woman img"). The trigger is
    removed and the class token (the last BPE piece before it) repeated
    ``num_photos * tokens_per_photo`` times (N for v1, 2N for v2); the result is
    truncated or padded to ``max_length``. Raises InvalidInput when the trigger
    is absent, repeated, first, or the class positions would not fit.
    """
    if num_photos < 1 or tokens_per_photo < 1:
        raise InvalidInput("need at least one photo and one token per photo")
    clean: list[int] = []
    positions = []
    for token in input_ids:
        if token == trigger_token_id:
            positions.append(len(clean) - 1)
        else:
            clean.append(int(token))
    if len(positions) != 1:
        raise InvalidInput(f"the prompt must contain the trigger word exactly once (found "
                           f"{len(positions)}); PhotoMaker takes one identity per prompt")
    index = positions[0]
    if index < 0:
        raise InvalidInput("the trigger word must follow a class word (e.g. 'a woman img')")
    count = num_photos * tokens_per_photo
    if index + count > max_length:
        raise InvalidInput(f"{num_photos} photo(s) x {tokens_per_photo} token(s) need {count} "
                           f"class positions from position {index}, past the {max_length}-token "
                           "limit; use fewer photos or a shorter prompt before the class word")
    ids = clean[:index] + [clean[index]] * count + clean[index + 1:]
    ids = ids[:max_length] + [pad_token_id] * max(0, max_length - len(ids))
    mask = [index <= i < index + count for i in range(max_length)]
    return ExpandedPrompt(ids, mask, index, count)


# -- the ID encoder --------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoMakerConfig:
    """Sizes of the PhotoMaker ID encoder; the defaults are the official ones."""

    vision: ClipVisionSpec = VIT_L14  # CLIP ViT-L/14, 224 px, quick_gelu
    projection_2_dim: int = 1280  # visual_projection_2 (no bias); 768 + 1280 = embed_dim
    embed_dim: int = 2048  # ID embedding width = SDXL prompt-embedding width
    fuse_hidden_dim: int | None = None  # FuseModule MLP width (official: embed_dim)
    id_embeddings_dim: int = 512  # ArcFace embedding (v2)
    num_id_tokens: int = 2  # v2 tokens per photo
    token_proj_hidden: int | None = None  # v2 token_proj width (official: 4 x 512)
    perceiver_depth: int = 4
    perceiver_dim_head: int = 128
    perceiver_heads: int | None = None  # official: embed_dim // 128 = 16
    perceiver_ff_mult: float = 4

    def __post_init__(self) -> None:
        if self.vision.projection_dim + self.projection_2_dim != self.embed_dim:
            raise ValueError("v1 concatenates the two projections: projection_dim + "
                             "projection_2_dim must equal embed_dim")


# The stand-ins' sizes (`idvault models tiny`, encoders.standins.id_models): the token width
# stays 2048, so their outputs have the real artifact shapes.
TINY_PHOTOMAKER = PhotoMakerConfig(vision=TINY_VIT_L, fuse_hidden_dim=16, token_proj_hidden=16,
                                   perceiver_depth=1, perceiver_dim_head=8, perceiver_heads=2,
                                   perceiver_ff_mult=1 / 128)


class QFormerPerceiver(nn.Module):
    """v2: ArcFace embedding -> ID tokens, refined against CLIP patch features."""

    def __init__(self, config: PhotoMakerConfig) -> None:
        super().__init__()
        c = config
        self.num_tokens = c.num_id_tokens
        self.cross_attention_dim = c.embed_dim
        hidden = c.token_proj_hidden or c.id_embeddings_dim * 4
        self.token_proj = nn.Sequential(nn.Linear(c.id_embeddings_dim, hidden), nn.GELU(),
                                        nn.Linear(hidden, c.embed_dim * c.num_id_tokens))
        self.token_norm = nn.LayerNorm(c.embed_dim)
        self.perceiver_resampler = FacePerceiverResampler(
            dim=c.embed_dim, depth=c.perceiver_depth, dim_head=c.perceiver_dim_head,
            heads=c.perceiver_heads or c.embed_dim // c.perceiver_dim_head,
            embedding_dim=c.vision.hidden_size, output_dim=c.embed_dim,
            ff_mult=c.perceiver_ff_mult)

    def forward(self, id_embeds: torch.Tensor, last_hidden_state: torch.Tensor) -> torch.Tensor:
        x = self.token_proj(id_embeds)  # (b, tokens * D)
        x = self.token_norm(x.reshape(-1, self.num_tokens, self.cross_attention_dim))  # (b, T, D)
        return x + self.perceiver_resampler(x, last_hidden_state)  # (b, T, D)


class PhotoMakerIDEncoder(nn.Module):
    """The ``id_encoder`` of a PhotoMaker checkpoint (v1 or v2), with its exact state-dict
    names: ``vision_model.*``, ``visual_projection``, ``visual_projection_2``,
    ``fuse_module.*`` and, for v2, ``qformer_perceiver.*``."""

    def __init__(self, version: Version = "v1", config: PhotoMakerConfig = PhotoMakerConfig()
                 ) -> None:
        super().__init__()
        _check_version(version)
        self.version = version
        self.config = config
        hidden = config.vision.hidden_size
        self.vision_model = build_vision_model(config.vision)
        self.visual_projection = nn.Linear(hidden, config.vision.projection_dim, bias=False)
        self.visual_projection_2 = nn.Linear(hidden, config.projection_2_dim, bias=False)
        self.fuse_module = FuseModule(config.embed_dim, config.fuse_hidden_dim)
        if version == "v2":
            self.qformer_perceiver = QFormerPerceiver(config)

    @property
    def tokens_per_photo(self) -> int:
        return tokens_per_photo(self.version, self.config)

    def id_embeds(self, pixel_values: torch.Tensor,
                  arcface: torch.Tensor | None = None) -> torch.Tensor:
        """Pre-fusion ID embeddings ``(b, tokens, D)`` from CLIP pixels ``(b, 3, 224, 224)``
        and, for v2, raw ArcFace embeddings ``(b, 512)``."""
        out = self.vision_model(pixel_values=pixel_values)
        if self.version == "v1":
            pooled = out.pooler_output  # (b, hidden): post-LayerNorm class token
            ids = torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)],
                            dim=-1)  # (b, 768 + 1280)
            return ids.unsqueeze(1)  # (b, 1, D)
        if arcface is None:
            raise InvalidInput("PhotoMaker v2 needs the ArcFace embedding of every photo")
        last = out.last_hidden_state  # (b, 257, hidden), before post_layernorm
        return self.qformer_perceiver(arcface.to(last.dtype), last)  # (b, 2, D)


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise InvalidInput(f"PhotoMaker version must be v1 or v2, not {version!r}")


@functools.lru_cache(maxsize=16)
def expected_layout(version: Version, config: PhotoMakerConfig = PhotoMakerConfig()
                    ) -> dict[str, tuple[int, ...]]:
    """Names -> shapes of the id_encoder state dict (built on the meta device)."""
    with torch.device("meta"):
        module = PhotoMakerIDEncoder(version, config)
    return shapes_of(module.state_dict())


def detect_version(keys: Sequence[str] | Mapping[str, object]) -> Version:
    """v2 when the id_encoder has ``qformer_perceiver.*`` weights, else v1."""
    return "v2" if any(k.startswith("qformer_perceiver.") for k in keys) else "v1"


# -- lora_weights -----------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(?P<processor>.+)\.processor\.to_(?P<proj>q|k|v|out)_lora\."
                       r"(?P<which>down|up)\.weight$")


@dataclass(frozen=True)
class LoraInfo:
    """What a ``lora_weights`` dict holds (old diffusers attention-processor format)."""

    rank: int | None  # None when it cannot be told
    processors: list[str]  # attention processors covered, in key order
    tensors: int
    problems: list[str] = field(default_factory=list)


def inspect_lora(shapes: Mapping[str, Sequence[int]]) -> LoraInfo:
    """Read the LoRA rank from the shapes (``down`` is (r, in), ``up`` is (out, r)).

    Every key must be ``<processor>.processor.to_{q,k,v,out}_lora.{down,up}.weight``,
    every ``down`` needs its ``up``, and one rank must hold throughout.
    """
    problems: list[str] = []
    ranks: dict[int, int] = {}
    processors: dict[str, None] = {}
    for key, shape in shapes.items():
        m = _LORA_KEY.match(key)
        if m is None:
            problems.append(f"{key}: not an attention-processor LoRA key")
            continue
        processors.setdefault(m["processor"], None)
        if len(shape) != 2:
            problems.append(f"{key}: shape {tuple(shape)} is not 2-D")
            continue
        r = int(shape[0] if m["which"] == "down" else shape[1])
        ranks[r] = ranks.get(r, 0) + 1
        partner = key.replace("_lora.down.", "_lora.up.") if m["which"] == "down" else \
            key.replace("_lora.up.", "_lora.down.")
        if partner not in shapes:
            problems.append(f"{key}: no matching {partner.rsplit('.', 2)[-2]} weight")
    if not shapes:
        problems.append("no LoRA tensors")
    if len(ranks) > 1:
        problems.append("inconsistent LoRA ranks: " + ", ".join(
            f"rank {r} in {n} tensor(s)" for r, n in sorted(ranks.items())))
    rank = next(iter(ranks)) if len(ranks) == 1 else None
    return LoraInfo(rank, list(processors), len(shapes), problems)


def lora_rank(shapes: Mapping[str, Sequence[int]]) -> int:
    """The rank of a PhotoMaker ``lora_weights`` layout; ModelUnavailable if unreadable."""
    info = inspect_lora(shapes)
    if info.problems or info.rank is None:
        raise ModelUnavailable("lora_weights: " + "; ".join(info.problems[:10]))
    return info.rank


def peft_lora_key(key: str) -> str:
    """The diffusers/PEFT name of an old-format key, as ``load_lora_weights`` converts it:
    ``...attn1.processor.to_out_lora.down.weight`` -> ``...attn1.to_out.0.lora_A.weight``."""
    m = _LORA_KEY.match(key)
    if m is None:
        raise InvalidInput(f"not an attention-processor LoRA key: {key}")
    target = "to_out.0" if m["proj"] == "out" else f"to_{m['proj']}"
    return f"{m['processor']}.{target}.lora_{'A' if m['which'] == 'down' else 'B'}.weight"


# -- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoMakerCheckpoint:
    """A read and checked PhotoMaker checkpoint (the ID-encoder half, with LoRA facts)."""

    path: Path
    version: Version
    id_encoder_dtypes: tuple[str, ...]  # as stored, e.g. ('torch.bfloat16', 'torch.float32')
    lora_shapes: dict[str, tuple[int, ...]]
    lora: LoraInfo
    sha256: str

    @property
    def model_id(self) -> str:
        return f"photomaker/{self.path.name}@{self.sha256[:16]}"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple], list[str]]:
    from safetensors import SafetensorError, safe_open

    ids: dict[str, torch.Tensor] = {}
    lora: dict[str, tuple] = {}
    other: list[str] = []
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith("id_encoder."):
                    ids[key[len("id_encoder."):]] = f.get_tensor(key)
                elif key.startswith("lora_weights."):
                    lora[key[len("lora_weights."):]] = tuple(f.get_slice(key).get_shape())
                else:
                    other.append(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelUnavailable(f"PhotoMaker checkpoint {path}: cannot be read as safetensors "
                               f"(truncated or corrupt?): {exc}", path=str(path)) from None
    return ids, lora, other


def read_photomaker_checkpoint(path: Path | str, *, version: Version | None = None,
                               config: PhotoMakerConfig = PhotoMakerConfig()
                               ) -> tuple[PhotoMakerCheckpoint, dict[str, torch.Tensor]]:
    """Read a ``.bin`` or ``.safetensors`` PhotoMaker file and check every key and shape.

    Returns the checkpoint's facts and its ``id_encoder`` tensors as stored.
    """
    path = Path(path)
    what = "PhotoMaker checkpoint"
    if path.suffix == ".safetensors":
        problem = file_problem(path)
        if problem:
            raise ModelUnavailable(f"{what} {path}: {problem}", path=str(path))
        ids, lora_shapes, other = _read_safetensors(path)
        if other:
            raise ModelUnavailable(
                f"{what} {path}: {len(other)} tensor(s) outside id_encoder.* and "
                f"lora_weights.*: {', '.join(sorted(other)[:10])}", path=str(path))
        if not ids:
            raise ModelUnavailable(f"{what} {path}: no id_encoder.* tensors", path=str(path))
    else:
        obj = read_pickle_checkpoint(path, what)
        keys = sorted(map(str, obj))
        if set(keys) != {"id_encoder", "lora_weights"}:
            raise ModelUnavailable(
                f"{what} {path}: top-level keys are {keys}; expected exactly "
                "['id_encoder', 'lora_weights']", path=str(path))
        ids, lora = obj["id_encoder"], obj["lora_weights"]
        for name, part in (("id_encoder", ids), ("lora_weights", lora)):
            if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor)
                                                     for v in part.values()):
                raise ModelUnavailable(f"{what} {path}: {name} is not a dict of tensors",
                                       path=str(path))
        lora_shapes = shapes_of(lora)
    detected = detect_version(ids)
    if version is not None and version != detected:
        raise ModelUnavailable(
            f"{what} {path}: holds a PhotoMaker {detected} ID encoder (the version is read "
            f"from its keys: qformer_perceiver.* means v2), but {version} was asked for",
            path=str(path))
    report = compare_layout(expected_layout(detected, config), shapes_of(ids))
    if not report.ok:
        raise layout_error(f"PhotoMaker {detected} ID encoder", path, report)
    lora_info = inspect_lora(lora_shapes)
    if lora_info.problems:
        raise ModelUnavailable(
            f"{path}: lora_weights do not match the PhotoMaker LoRA layout "
            "(<processor>.processor.to_{q,k,v,out}_lora.{down,up}.weight, one rank):\n"
            + "\n".join(f"  - {p}" for p in lora_info.problems[:10]), path=str(path))
    dtypes = tuple(sorted({str(v.dtype) for v in ids.values()}))
    info = PhotoMakerCheckpoint(path, detected, dtypes, lora_shapes, lora_info, file_digest(path))
    return info, dict(ids)


def load_photomaker(path: Path | str, *, version: Version | None = None,
                    config: PhotoMakerConfig = PhotoMakerConfig(),
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                    ) -> tuple[PhotoMakerIDEncoder, PhotoMakerCheckpoint]:
    """Check and load a checkpoint into a :class:`PhotoMakerIDEncoder` (strict, cast)."""
    checkpoint, stored = read_photomaker_checkpoint(path, version=version, config=config)
    # Mixed bf16/fp32 in the official files: everything floating becomes ``dtype``.
    state = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
             for k, v in stored.items() if k not in TOLERATED_EXTRA}
    del stored
    with torch.device("meta"):
        model = PhotoMakerIDEncoder(checkpoint.version, config)
    model.load_state_dict(state, strict=True, assign=True)
    materialize_position_ids(model, device)
    return model.eval(), checkpoint


# -- the encoder enrollment calls -----------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PhotoMakerEncoder:
    """Photos + their faces -> the ``photomaker`` artifact (see the module docstring)."""

    kind = "photomaker"

    def __init__(self, model: PhotoMakerIDEncoder, checkpoint: PhotoMakerCheckpoint, *,
                 device: torch.device, dtype: torch.dtype, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise InvalidInput("batch_size must be at least 1")
        self.model = model
        self.checkpoint = checkpoint
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(cls, path: Path | str, *, version: Version | None = None,
                        config: PhotoMakerConfig = PhotoMakerConfig(),
                        device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32,
                        batch_size: int = 8) -> PhotoMakerEncoder:
        device = torch.device(device) if device is not None else default_device()
        model, checkpoint = load_photomaker(path, version=version, config=config,
                                            device=device, dtype=dtype)
        return cls(model, checkpoint, device=device, dtype=dtype, batch_size=batch_size)

    @classmethod
    def from_models_dir(cls, models_dir: Path | str | None = None, *,
                        version: Version | None = None,
                        config: PhotoMakerConfig | None = None,
                        device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32, batch_size: int = 8,
                        env: Mapping[str, str] | None = None) -> PhotoMakerEncoder:
        """Find ``photomaker-v2.*`` (preferred) or ``photomaker-v1.*`` and load it;
        ``version`` insists on one. ``config`` defaults to the official sizes, or
        the tiny ones for files ``idvault models tiny`` wrote."""
        if version is not None:
            _check_version(version)
        wanted = [version] if version else ["v2", "v1"]
        errors = []
        for v in wanted:
            try:
                path = find_checkpoint(f"photomaker-{v}", models_dir, env)
            except ModelUnavailable as exc:
                errors.append(exc)
                continue
            if config is None and is_stand_in(path):
                config = TINY_PHOTOMAKER
            return cls.from_checkpoint(path, version=version, config=config or PhotoMakerConfig(),
                                       device=device, dtype=dtype, batch_size=batch_size)
        raise ModelUnavailable("\n".join(e.message for e in errors),
                               searched=errors[0].details.get("searched"))

    @property
    def version(self) -> Version:
        return self.model.version

    @property
    def model_id(self) -> str:
        return self.checkpoint.model_id

    @property
    def tokens_per_photo(self) -> int:
        return self.model.tokens_per_photo

    @property
    def lora_rank(self) -> int | None:
        return self.checkpoint.lora.rank

    @torch.inference_mode()
    def id_embeddings(self, photos: Sequence[np.ndarray], faces: Sequence[object | None], *,
                      names: Sequence[str] | None = None) -> np.ndarray:
        """``(photos, tokens, D)`` float32: one ID embedding (v1) or two tokens (v2) per photo."""
        arcface = self._check_inputs(photos, faces, names)
        out = []
        for start in range(0, len(photos), self.batch_size):
            pixels = clip_preprocess(photos[start:start + self.batch_size])  # (b, 3, 224, 224)
            ids = None
            if arcface is not None:
                ids = torch.from_numpy(arcface[start:start + self.batch_size])
                ids = ids.to(self.device, self.dtype)  # (b, 512) raw
            emb = self.model.id_embeds(pixels.to(self.device, self.dtype), ids)  # (b, T, D)
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out, axis=0).astype(np.float32)

    def encode(self, photos: Sequence[np.ndarray], faces: Sequence[object | None], *,
               names: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray],
                                                            dict[str, str]]:
        """Tensors and metadata for ``vault.codec.encode("photomaker", ...)``."""
        embeds = self.id_embeddings(photos, faces, names=names)
        return ({"id_embeds": embeds},
                {"model_id": self.model_id, "version": self.version,
                 "photos": str(len(embeds))})

    def _check_inputs(self, photos: Sequence[np.ndarray], faces: Sequence[object | None],
                      names: Sequence[str] | None) -> np.ndarray | None:
        n = len(photos)
        if n == 0:
            raise InvalidInput("no photos given")
        if n > MAX_PHOTOS:
            raise InvalidInput(f"{n} photos given; a photomaker artifact holds at most "
                               f"{MAX_PHOTOS}")
        if len(faces) != n or (names is not None and len(names) != n):
            raise InvalidInput(f"{n} photos but {len(faces)} faces"
                               + (f" and {len(names)} names" if names is not None else "")
                               + "; give one face per photo")
        labels = list(names) if names is not None else [f"photo {i + 1}" for i in range(n)]
        missing = [labels[i] for i, f in enumerate(faces) if f is None]
        if missing:
            raise PhotoRejected(
                f"{len(missing)} of {n} photos have no face; PhotoMaker needs the face of "
                f"every photo (none is dropped): {', '.join(missing)}",
                photos={m: "no face" for m in missing})
        if self.version == "v1":
            return None
        dim = self.model.config.id_embeddings_dim
        rows = []
        for label, face in zip(labels, faces):
            emb = np.asarray(getattr(face, "embedding", None), dtype=np.float32)
            if emb.shape != (dim,) or not np.isfinite(emb).all():
                raise InvalidInput(f"{label}: the face's raw ArcFace embedding must be "
                                   f"{dim} finite numbers (got shape {emb.shape})")
            rows.append(emb)
        return np.stack(rows)  # (photos, 512), raw as PhotoMaker v2 uses it
