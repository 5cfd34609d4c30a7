"""Regional identity cross-attention: each identity's tokens act only inside its mask.

Why. The official StoryMaker pipeline appends every character's image tokens
to the text and lets all of them reach all pixels (masks are used only to
crop the inputs), which is why characters blend into each other; PhotoMaker
supports one trigger word at all. Here every cross-attention layer (``attn2``)
gets a processor that restricts, per query pixel, which identity tokens it
may attend to, so with two people each keeps their own likeness.

Sequence layout (what the pipeline passes as ``encoder_hidden_states``)::

    (batch, text_len + num_image_tokens, cross_dim)   # SDXL: cross_dim 2048
     |-- text: text_len tokens (77 per CLIP chunk) ---|-- adapter a --|-- adapter b --|

* The **text** part is the usual prompt embedding. Some positions may hold an
  identity's *text-fused* tokens (PhotoMaker: fused ID embeddings at the
  class-word positions): ``IdentityTokens.text_positions``. Every other text
  position is scene text and is visible everywhere.
* The **image** part holds decoupled image tokens in one contiguous
  :class:`ImageGroup` per image-token *adapter* (StoryMaker, IP-Adapter-FaceID,
  InstantID's IP-Adapter): each adapter has its own ``to_k_ip`` / ``to_v_ip``
  per layer and its own scale. Inside a group, ranges belong to one identity
  (``IdentityTokens.image_tokens``, counted from the first image token) or to
  everyone (``ImageGroup.global_tokens``: StoryMaker's background block
  ``bg_embed``). Without ``image_groups`` the whole image part is one group of
  the adapter :data:`DEFAULT_ADAPTER` with ``global_image_tokens``.

Per query position ``p`` with identity masks ``m_i(p)`` (:mod:`generators.layout`):

* text branch: ``SDPA(q, K_text, V_text, bias)`` where ``bias[p, j] = 0`` for
  scene tokens and, for a token of identity ``i``, ``0`` if ``m_i(p) > 0``
  else ``-inf`` (``text_mask="hard"``, the default) or ``log m_i(p)``
  (``"soft"``: fades the token out across the feather);
* image branch, per adapter ``a``: ``SDPA(q, to_k_ip_a(img_a), to_v_ip_a(img_a),
  bias_a)`` over the group's global tokens (bias 0) and identity tokens
  (``log m_i(p)`` by default, or the hard rule), **one softmax per adapter** as
  in the official processor (and diffusers' multi-adapter
  ``IPAdapterAttnProcessor2_0``). Without global tokens, a pixel none of the
  adapter's identities covers attends to nothing, so its branch is gated by
  ``gate_a(p) = max_i m_i(p)`` over the adapter's identities (0 there, 1
  inside a region);
* output: ``to_out(text + sum_a scale_a * gate_a * image_a)``; with one adapter,
  the official decoupled processor's ``text + scale * image``.

Locality is exact: where ``m_A(p) = 0`` every bias entry of A's tokens is
``-inf``, their softmax weights are exactly 0, and nothing about A's tokens
reaches ``p``; the other adapters' softmaxes never see A's tokens at all. With
one identity and a full-frame mask every bias is 0 and every gate 1, the biases
are dropped, and the processor computes exactly diffusers' ``AttnProcessor2_0``
(text only) or the official decoupled formula
``text + scale * SDPA(q, to_k_ip(img), to_v_ip(img))``.

Resolution. A processor sees only ``h * w`` queries; the grid is recovered
from the query length and the latent size (:func:`layout.grid_for_length`),
so one conditioning serves every ``attn2`` of SDXL (/2, /4) or SD1.5
(/1, /2, /4). Biases are built once per (length, batch, dtype, device, group)
and cached on the conditioning, not per layer and step.

Install / remove. :class:`RegionalAttention` swaps processors only on
cross-attention layers (self-attention keeps its processor), remembers the
originals, and ``remove()`` puts back exactly those objects; the UNet and its
pipeline are then as before. Both go to the cross-attention modules directly
(found once, checked to still be at their paths), not through the UNet-wide
``attn_processors`` / ``set_attn_processor`` walks. While installed and with no conditioning set,
every layer delegates to its original processor. LoRA (PhotoMaker's
``lora_weights``, StoryMaker's rank-128 LoRA) belongs on the attention's
``to_q``/``to_k``/``to_v``/``to_out`` linears through diffusers/peft, which
these processors call, so it composes with them.

Adapter weights. ``load_image_projections(state_dict, adapter=name)`` checks an
index-keyed dict strictly and makes each processor's ``to_k_ip`` / ``to_v_ip``
of that adapter *refer to* the given tensors (no copy when their dtype and
device are the UNet's), so a method's loaded projections exist once however
many calls use them; they stay loaded across install / remove.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from generators.layout import Layout, MaskConfig, grid_for_length
from generators.lora import submodule
from vault.errors import InvalidInput

__all__ = [
    "DEFAULT_ADAPTER",
    "IdentityTokens",
    "ImageGroup",
    "ImageProjection",
    "RegionalAttention",
    "RegionalAttnProcessor",
    "RegionalConditioning",
    "RegionalConfig",
    "RegionalState",
    "cfg_text_rows",
]

MASK_MODES = ("hard", "soft")
# The adapter of a conditioning without image_groups, and of RegionalAttention(image_tokens=True).
DEFAULT_ADAPTER = "default"


@dataclass(frozen=True)
class RegionalConfig:
    """How masks turn into attention biases (see the module docstring)."""

    text_mask: str = "hard"  # text-fused tokens: visible where m > 0 ("hard") or log m ("soft")
    image_mask: str = "soft"  # decoupled image tokens: log m ("soft") or m > 0 ("hard")
    masks: MaskConfig = field(default_factory=MaskConfig)  # the feather of the soft masks

    def __post_init__(self) -> None:
        for name in ("text_mask", "image_mask"):
            if getattr(self, name) not in MASK_MODES:
                raise InvalidInput(f"{name} must be one of {MASK_MODES}, "
                                   f"got {getattr(self, name)!r}")


@dataclass(frozen=True)
class IdentityTokens:
    """Where one identity's tokens sit in ``encoder_hidden_states``.

    ``name`` is its layout name (the handle ``owner/name``).
    ``text_positions`` index the text part (0 = begin-of-text, which is never
    an identity's); ``image_tokens`` is ``[start, stop)`` inside the image
    part (0 = the first token after the text), inside one :class:`ImageGroup`.
    """

    name: str
    text_positions: tuple[int, ...] = ()
    image_tokens: tuple[int, int] | None = None


@dataclass(frozen=True)
class ImageGroup:
    """One image-token adapter's contiguous part of the image tokens.

    ``tokens`` is ``[start, stop)`` inside the image part; ``global_tokens``,
    inside ``tokens``, are visible everywhere (StoryMaker's ``bg_embed``). The
    tokens go through the adapter's own ``to_k_ip`` / ``to_v_ip``, in a softmax
    of their own, weighted by the adapter's scale (:class:`RegionalState`).
    """

    adapter: str  # the name its projections were loaded under (ComposePipeline: the method's)
    tokens: tuple[int, int]
    global_tokens: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        _check_adapter_name(self.adapter)


def _check_adapter_name(name: str) -> None:
    # A submodule name of every processor (nn.ModuleDict): no dots, not empty.
    if not isinstance(name, str) or not name or "." in name:
        raise InvalidInput(f"an adapter name is a non-empty string without dots, got {name!r}")


def cfg_text_rows(num_images: int = 1) -> tuple[bool, ...]:
    """``text_rows`` for diffusers' classifier-free guidance batch: negatives first.

    The negative prompt has no identity tokens at the identity positions, so
    its rows must not be masked there.
    """
    return (False,) * num_images + (True,) * num_images


@dataclass(frozen=True)
class RegionalConditioning:
    """One generation's token layout and masks, shared by every ``attn2`` processor."""

    layout: Layout
    latent_size: tuple[int, int]  # (H, W) of the latent at /1, e.g. (128, 128) for 1024 px SDXL
    identities: tuple[IdentityTokens, ...]
    text_len: int = 77  # 77 per CLIP chunk
    num_image_tokens: int = 0  # tokens appended after the text (every adapter's)
    # Visible everywhere (StoryMaker bg), for a conditioning without image_groups.
    global_image_tokens: tuple[int, int] | None = None
    # Batch rows whose text carries identity tokens; None: all. With CFG use
    # cfg_text_rows(n): the negative prompt's positions are ordinary words.
    text_rows: tuple[bool, ...] | None = None
    config: RegionalConfig = field(default_factory=RegionalConfig)
    # One per adapter, together covering the image tokens; () with image tokens: one
    # group of DEFAULT_ADAPTER over all of them, global_image_tokens its global range.
    image_groups: tuple[ImageGroup, ...] = ()
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "identities", tuple(self.identities))
        object.__setattr__(self, "image_groups", tuple(self.image_groups))
        if self.text_len < 1:
            raise InvalidInput("text_len must be at least 1")
        if self.num_image_tokens < 0:
            raise InvalidInput("num_image_tokens must be >= 0")
        h, w = self.latent_size
        if h < 1 or w < 1:
            raise InvalidInput(f"latent size must be positive, got {self.latent_size}")
        names = [i.name for i in self.identities]
        if len(set(names)) != len(names):
            raise InvalidInput("each identity appears once in a regional conditioning")
        for n in names:
            self.layout.box(n)  # InvalidInput when the layout lacks it
        taken: dict[int, str] = {}
        for ident in self.identities:
            for p in ident.text_positions:
                if not 1 <= p < self.text_len:
                    raise InvalidInput(
                        f"{ident.name}: text position {p} is outside 1..{self.text_len - 1} "
                        "(position 0 is the begin-of-text token, scene text for every pixel)")
                if p in taken:
                    raise InvalidInput(f"text position {p} is claimed by {taken[p]} and "
                                       f"{ident.name}")
                taken[p] = ident.name
        self._check_groups()
        owner = np.full(self.num_image_tokens, -1)
        ranges = [(f"global image tokens of {g.adapter}", g.global_tokens) for g in self.groups]
        ranges += [(i.name, i.image_tokens) for i in self.identities]
        for label, rng in ranges:
            if rng is None:
                continue
            start, stop = rng
            if not 0 <= start < stop <= self.num_image_tokens:
                raise InvalidInput(f"{label}: image tokens [{start}, {stop}) are not inside the "
                                   f"{self.num_image_tokens} image tokens")
            if (owner[start:stop] >= 0).any():
                raise InvalidInput(f"{label}: image tokens [{start}, {stop}) overlap another "
                                   "range")
            owner[start:stop] = 1
            if not any(g.tokens[0] <= start and stop <= g.tokens[1] for g in self.groups):
                raise InvalidInput(f"{label}: image tokens [{start}, {stop}) are not inside "
                                   "one adapter's group")
        if (owner < 0).any():
            raise InvalidInput(
                f"image tokens {np.flatnonzero(owner < 0).tolist()[:8]} belong to no identity "
                "and are not global; every appended token must be assigned")

    def _check_groups(self) -> None:
        if not self.image_groups:
            return
        if self.global_image_tokens is not None:
            raise InvalidInput("with image_groups, global image tokens are given per group "
                               "(ImageGroup.global_tokens), not as global_image_tokens")
        adapters = [g.adapter for g in self.image_groups]
        if len(set(adapters)) != len(adapters):
            raise InvalidInput(f"each adapter has one image group, got {adapters}")
        covered = np.zeros(self.num_image_tokens, dtype=int)
        for g in self.image_groups:
            start, stop = g.tokens
            if not 0 <= start < stop <= self.num_image_tokens:
                raise InvalidInput(f"adapter {g.adapter}: image tokens [{start}, {stop}) are not "
                                   f"inside the {self.num_image_tokens} image tokens")
            covered[start:stop] += 1
            if g.global_tokens is not None and not (
                    start <= g.global_tokens[0] < g.global_tokens[1] <= stop):
                raise InvalidInput(f"adapter {g.adapter}: global tokens {g.global_tokens} are "
                                   f"not inside its group [{start}, {stop})")
        if (covered != 1).any():
            raise InvalidInput("the image groups must cover every image token exactly once; "
                               f"tokens {np.flatnonzero(covered != 1).tolist()[:8]} do not")

    @property
    def groups(self) -> tuple[ImageGroup, ...]:
        """The image groups in effect: ``image_groups``, or one :data:`DEFAULT_ADAPTER` group
        over all image tokens (none without image tokens)."""
        if self.image_groups or not self.num_image_tokens:
            return self.image_groups
        return (ImageGroup(DEFAULT_ADAPTER, (0, self.num_image_tokens),
                           self.global_image_tokens),)

    # -- masks and biases ------------------------------------------------------------
    def grid(self, query_len: int) -> tuple[int, int, int]:
        """``(factor, h, w)`` of the layer whose queries number ``query_len``."""
        return grid_for_length(self.latent_size, query_len)

    def masks_for(self, query_len: int) -> dict[str, np.ndarray]:
        """Per identity, its ``(query_len,)`` soft mask at that layer's resolution."""
        key = ("masks", query_len)
        if key not in self._cache:
            _, h, w = self.grid(query_len)
            self._cache[key] = {i.name: self.layout.mask_grid(i.name, h, w, self.config.masks)
                                for i in self.identities}
        return self._cache[key]

    @staticmethod
    def _bias_column(mask: np.ndarray, mode: str) -> np.ndarray:
        with np.errstate(divide="ignore"):
            if mode == "soft":
                return np.log(mask.astype(np.float64))  # log 0 = -inf: exactly invisible
            return np.where(mask > 0, 0.0, -np.inf)

    def text_bias(self, query_len: int, batch: int, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
        """Additive bias ``(1 or batch, 1, query_len, text_len)`` for the text branch, or None."""
        key = ("text", query_len, batch, dtype, device)
        if key in self._cache:
            return self._cache[key]
        bias = np.zeros((query_len, self.text_len))
        masks = self.masks_for(query_len)
        for ident in self.identities:
            if ident.text_positions:
                col = self._bias_column(masks[ident.name], self.config.text_mask)
                bias[:, list(ident.text_positions)] = col[:, None]
        out: torch.Tensor | None = None
        if bias.any():  # all zeros (full-frame masks): no bias, the plain kernel
            t = torch.as_tensor(bias, dtype=dtype, device=device)[None, None]
            if self.text_rows is not None and not all(self.text_rows):
                if len(self.text_rows) != batch:
                    raise InvalidInput(f"text_rows has {len(self.text_rows)} rows but the "
                                       f"batch has {batch}")
                rows = torch.tensor(self.text_rows, device=device)[:, None, None, None]
                t = torch.where(rows, t, torch.zeros((), dtype=dtype, device=device))
            out = t
        self._cache[key] = out
        return out

    def image_bias(self, query_len: int, dtype: torch.dtype, device: torch.device,
                   group: ImageGroup | None = None,
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """For one adapter's group (None: the only one), ``(bias (1, 1, query_len, group
        tokens) or None, gate (1, 1, query_len, 1) or None)``."""
        if group is None:
            if len(self.groups) != 1:
                raise InvalidInput(f"this conditioning has {len(self.groups)} image groups; "
                                   "name one")
            group = self.groups[0]
        key = ("image", query_len, dtype, device, group)
        if key in self._cache:
            return self._cache[key]
        first, last = group.tokens
        bias = np.zeros((query_len, last - first))
        masks = self.masks_for(query_len)
        has_global = group.global_tokens is not None
        visible = np.full(query_len, has_global)
        gate = np.ones(query_len) if has_global else np.zeros(query_len)
        for ident in self.identities:
            if ident.image_tokens is None or not first <= ident.image_tokens[0] < last:
                continue  # no image tokens, or another adapter's
            m = masks[ident.name].astype(np.float64)
            start, stop = ident.image_tokens
            bias[:, start - first:stop - first] = self._bias_column(
                m, self.config.image_mask)[:, None]
            visible |= m > 0
            if not has_global:
                gate = np.maximum(gate, m if self.config.image_mask == "soft" else (m > 0))
        # A row with nothing visible would be softmax over all -inf (NaN): give
        # it a finite row and let the zero gate remove its output exactly.
        bias[~visible] = 0.0
        b = (torch.as_tensor(bias, dtype=dtype, device=device)[None, None]
             if bias.any() else None)
        g = (torch.as_tensor(gate, dtype=dtype, device=device)[None, None, :, None]
             if not (gate == 1.0).all() else None)
        self._cache[key] = (b, g)
        return b, g


class RegionalState:
    """What all processors of one :class:`RegionalAttention` share (set per generation or step)."""

    def __init__(self, image_scale: float = 1.0) -> None:
        self.conditioning: RegionalConditioning | None = None
        # Per adapter, the weight of its image branch (StoryMaker's image_scale, ...).
        self.scales: dict[str, float] = {DEFAULT_ADAPTER: float(image_scale)}
        # Per (processor, adapter): the image tokens' key and value projections, with the
        # stamp of what they were computed from (see RegionalAttnProcessor._image_kv).
        # Cleared at install and remove, so nothing outlives the generation that made it.
        self.image_kv: dict[tuple[int, str], tuple[tuple, tuple, torch.Tensor,
                                                   torch.Tensor]] = {}

    @property
    def image_scale(self) -> float:
        return self.scales[DEFAULT_ADAPTER]

    @image_scale.setter
    def image_scale(self, value: float) -> None:
        self.scales[DEFAULT_ADAPTER] = float(value)


def _add_masks(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # A Parameter over the same storage: the processor refers to the tensor, no copy.
    return nn.Parameter(t, requires_grad=False)


class ImageProjection(nn.Module):
    """One adapter's ``to_k_ip`` / ``to_v_ip`` in one cross-attention layer
    (``Linear(cross_dim, inner_dim, bias=False)``, the official names)."""

    def __init__(self, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor) -> None:
        super().__init__()
        out_features, in_features = to_k_ip.shape
        # Built on meta and given the tensors: no allocation, no random init.
        self.to_k_ip = nn.Linear(in_features, out_features, bias=False, device="meta")
        self.to_v_ip = nn.Linear(in_features, out_features, bias=False, device="meta")
        self.set(to_k_ip, to_v_ip)

    def set(self, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor) -> None:
        self.to_k_ip.weight = _frozen(to_k_ip)
        self.to_v_ip.weight = _frozen(to_v_ip)


class RegionalAttnProcessor(nn.Module):
    """Cross-attention processor with regional identity tokens (see the module docstring).

    An ``nn.Module`` so its adapters' projections (``adapters[name]``, an
    :class:`ImageProjection`) move with the UNet and appear in its state dict
    while installed. ``to_k_ip`` / ``to_v_ip`` are :data:`DEFAULT_ADAPTER`'s.
    """

    def __init__(self, state: RegionalState, fallback, *, hidden_size: int,
                 cross_attention_dim: int) -> None:
        super().__init__()
        self.state = state
        # A list, not an attribute: an nn.Module fallback must not become a
        # submodule (its weights would appear twice in the UNet state dict).
        self._fallback = [fallback]
        self.hidden_size, self.cross_attention_dim = hidden_size, cross_attention_dim
        self.adapters = nn.ModuleDict()  # adapter name -> ImageProjection

    @property
    def fallback(self):
        return self._fallback[0]

    @property
    def to_k_ip(self) -> nn.Linear | None:
        p = self.adapters[DEFAULT_ADAPTER] if DEFAULT_ADAPTER in self.adapters else None
        return None if p is None else p.to_k_ip

    @property
    def to_v_ip(self) -> nn.Linear | None:
        p = self.adapters[DEFAULT_ADAPTER] if DEFAULT_ADAPTER in self.adapters else None
        return None if p is None else p.to_v_ip

    def __call__(self, attn, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        cond = self.state.conditioning
        if cond is None or encoder_hidden_states is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, temb=temb, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, total, _ = encoder_hidden_states.shape
        t_len = cond.text_len
        if total - t_len != cond.num_image_tokens:
            raise InvalidInput(
                f"encoder_hidden_states has {total} tokens; the regional conditioning expects "
                f"{t_len} text + {cond.num_image_tokens} image tokens")
        groups = cond.groups
        for group in groups:  # before any work: a missing adapter is the caller's error
            if group.adapter not in self.adapters:
                raise InvalidInput(
                    f"image tokens of adapter {group.adapter!r} were passed but these "
                    "processors have no image projections for it (load them with "
                    "RegionalAttention.load_image_projections(..., adapter=...))")
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, total, batch)
            # (batch, heads, 1 or q_len, total)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (batch, q_len, inner)
        text = encoder_hidden_states[:, :t_len]  # (batch, text_len, cross_dim)
        image = encoder_hidden_states[:, t_len:]  # (batch, num_image_tokens, cross_dim)
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        key = attn.to_k(text)
        value = attn.to_v(text)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (b, heads, q, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (b, heads, text, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        q_len = query.shape[2]

        bias = cond.text_bias(q_len, batch, query.dtype, query.device)
        if attention_mask is not None:
            bias = _add_masks(bias, attention_mask[..., :t_len])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=0.0,
                                             is_causal=False)  # (b, heads, q, d)

        for group in groups:  # one softmax per adapter, summed
            start, stop = group.tokens
            # The whole image part when it is one group: the very tensor of one adapter.
            part = image if (start, stop) == (0, cond.num_image_tokens) else image[:, start:stop]
            ip_key, ip_value = self._image_kv(group, encoder_hidden_states, part)
            ip_key = ip_key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            ip_value = ip_value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            ip_bias, gate = cond.image_bias(q_len, query.dtype, query.device, group)
            if attention_mask is not None:
                ip_bias = _add_masks(ip_bias, attention_mask[..., t_len + start:t_len + stop])
            ip_out = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=ip_bias,
                                                    dropout_p=0.0, is_causal=False)
            if gate is not None:
                ip_out = ip_out * gate
            out = out + self.state.scales[group.adapter] * ip_out

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)  # linear
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _image_kv(self, group: ImageGroup, encoder_hidden_states: torch.Tensor,
                  image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``to_k_ip_a(image)``, ``to_v_ip_a(image)`` of the group's adapter ``a``: (batch,
        group tokens, inner) each.

        The image tokens are the same at every denoising step of a phase, so their
        projections are computed at the first step and reused while the sequence and
        both projection weights are the same tensor objects (held by weak reference, so
        a new tensor at a freed address never matches) with the same in-place version,
        shape and dtype, and the group spans the same tokens. The official processor
        recomputes them at every step; the result is the same. Not kept with autograd on
        (training) or with hooks on the projections (they would be skipped)."""
        proj = self.adapters[group.adapter]
        k_ip, v_ip = proj.to_k_ip, proj.to_v_ip
        if torch.is_grad_enabled() or _hooked(k_ip) or _hooked(v_ip):
            return k_ip(image), v_ip(image)
        sources = (encoder_hidden_states, k_ip.weight, v_ip.weight)
        stamp = (group.tokens,) + tuple((t._version, tuple(t.shape), t.dtype, t.device)
                                        for t in sources)
        slot = (id(self), group.adapter)
        hit = self.state.image_kv.get(slot)
        if hit is not None and hit[1] == stamp and all(
                ref() is t for ref, t in zip(hit[0], sources, strict=True)):
            return hit[2], hit[3]
        key, value = k_ip(image), v_ip(image)
        self.state.image_kv[slot] = (tuple(weakref.ref(t) for t in sources), stamp, key, value)
        return key, value


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class RegionalAttention:
    """Installs :class:`RegionalAttnProcessor` on a UNet's cross-attention layers.

    ::

        regional = RegionalAttention(pipe.unet)
        regional.load_image_projections(storymaker_ip, adapter="storymaker", scale=0.8)
        regional.load_image_projections(faceid_ip, adapter="faceid", scale=1.0)  # optional
        with regional:                       # install ... remove, even on error
            regional.conditioning = RegionalConditioning(..., image_groups=(...))
            pipe(prompt_embeds=..., ...)

    The processors are built once and survive remove/install cycles, so loaded
    adapters are kept. ``image_tokens=True`` adds :data:`DEFAULT_ADAPTER` with
    ``to_k_ip``/``to_v_ip`` initialised as copies of the layer's ``to_k``/``to_v``
    (as IP-Adapter training starts) and ``image_scale`` its scale.
    """

    def __init__(self, unet, *, image_tokens: bool = False, image_scale: float = 1.0) -> None:
        self.unet = unet
        self.state = RegionalState(image_scale)
        self._originals: dict | None = None
        self.order = list(unet.attn_processors)  # processor names, diffusers' fixed order
        self.processors: dict[str, RegionalAttnProcessor] = {}
        self._layers: dict[str, nn.Module] = {}  # processor name -> its Attention module
        for name, proc in unet.attn_processors.items():
            attn = unet.get_submodule(name.removesuffix(".processor"))
            if not getattr(attn, "is_cross_attention", False):
                continue  # self-attention keeps its processor
            self.processors[name] = RegionalAttnProcessor(
                self.state, proc, hidden_size=attn.to_k.out_features,
                cross_attention_dim=attn.to_k.in_features)
            self._layers[name] = attn
        if not self.processors:
            raise InvalidInput("this UNet has no cross-attention layers to make regional")
        if image_tokens:
            with torch.no_grad():
                for name, p in self.processors.items():
                    attn = self._layers[name]
                    p.adapters[DEFAULT_ADAPTER] = ImageProjection(
                        attn.to_k.weight.detach().clone(), attn.to_v.weight.detach().clone())

    # -- state ---------------------------------------------------------------------
    @property
    def conditioning(self) -> RegionalConditioning | None:
        return self.state.conditioning

    @conditioning.setter
    def conditioning(self, value: RegionalConditioning | None) -> None:
        self.state.conditioning = value

    @property
    def image_scale(self) -> float:
        """The scale of :data:`DEFAULT_ADAPTER` (see :meth:`set_scale` for the others)."""
        return self.state.image_scale

    @image_scale.setter
    def image_scale(self, value: float) -> None:
        self.state.image_scale = value

    def set_scale(self, adapter: str, value: float) -> None:
        """The weight of ``adapter``'s image branch (``scale_a`` in the module docstring)."""
        _check_adapter_name(adapter)
        self.state.scales[adapter] = float(value)

    @property
    def adapters(self) -> tuple[str, ...]:
        """The adapters whose projections are loaded, in loading order."""
        return tuple(next(iter(self.processors.values())).adapters.keys())

    @property
    def image_tokens(self) -> bool:
        return bool(self.adapters)

    @property
    def installed(self) -> bool:
        return self._originals is not None

    # -- install / remove --------------------------------------------------------------
    def install(self) -> Self:
        if self._originals is not None:
            raise InvalidInput("regional attention is already installed on this UNet")
        # Only the cross-attention layers are touched, each through its own module: walking
        # the whole UNet (unet.attn_processors, set_attn_processor) three times per call
        # cost more than the rest of install and remove together.
        originals = {}
        for name, attn in self._layers.items():
            try:
                current = submodule(self.unet, name.removesuffix(".processor"))
            except AttributeError:
                current = None
            if current is not attn:
                raise InvalidInput("the UNet's attention layers changed since "
                                   "RegionalAttention was created; create a new one")
            originals[name] = attn.processor
        for name, p in self.processors.items():
            # The originals may have been swapped since construction (e.g. a LoRA
            # processor): delegate to what is there now.
            p._fallback[0] = originals[name]
            w = self._layers[name].to_k.weight
            if any(t.device != w.device or t.dtype != w.dtype for t in p.parameters()):
                p.to(device=w.device, dtype=w.dtype)  # the UNet moved: the only tensors held
        self._originals = originals
        self.state.image_kv.clear()
        for name, p in self.processors.items():
            self._layers[name].set_processor(p)
        return self

    def remove(self) -> None:
        """Put back exactly the processor objects that were there before install."""
        if self._originals is None:
            return
        originals, self._originals = self._originals, None
        for name, original in originals.items():
            self._layers[name].set_processor(original)
        self.state.conditioning = None
        self.state.image_kv.clear()

    def __enter__(self) -> Self:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- image projections (official index-keyed layout), one set per adapter -----------
    def _expected_projections(self) -> dict[str, tuple[int, int]]:
        """``{"<index>.to_k_ip.weight": (inner, cross_dim), ...}`` for every cross-attention."""
        out = {}
        for name, p in self.processors.items():
            i = self.order.index(name)
            for kind in ("to_k_ip", "to_v_ip"):
                out[f"{i}.{kind}.weight"] = (p.hidden_size, p.cross_attention_dim)
        return out

    def image_projection_state_dict(self, adapter: str = DEFAULT_ADAPTER,
                                    ) -> dict[str, torch.Tensor]:
        """``{"<index>.to_k_ip.weight": ..., ...}`` of ``adapter``, keyed by position in
        ``unet.attn_processors``."""
        if adapter not in self.adapters:
            raise InvalidInput(f"no image projections are loaded for adapter {adapter!r}")
        out = {}
        for name, p in self.processors.items():
            i = self.order.index(name)
            out[f"{i}.to_k_ip.weight"] = p.adapters[adapter].to_k_ip.weight.detach()
            out[f"{i}.to_v_ip.weight"] = p.adapters[adapter].to_v_ip.weight.detach()
        return out

    def load_image_projections(self, state_dict: Mapping[str, torch.Tensor], *,
                               adapter: str = DEFAULT_ADAPTER, scale: float | None = None,
                               ignore: Sequence[str] = ("_lora.",)) -> None:
        """Make ``adapter``'s ``to_k_ip``/``to_v_ip`` the tensors of an index-keyed dict
        (StoryMaker's or IP-Adapter's ``ip_adapter``); ``scale``: its weight (None: keep
        the current one, 1.0 for a new adapter).

        Keys are ``"<i>.to_k_ip.weight"`` / ``"<i>.to_v_ip.weight"`` with ``i``
        the index into ``unet.attn_processors`` (odd = cross-attention in
        SDXL). Strict: every cross-attention layer needs both, with matching
        shapes, and no other keys are allowed except those containing a
        string in ``ignore`` (LoRA keys, loaded elsewhere). The processors refer to
        the tensors themselves (converted only when their dtype or device is not
        the layer's), so the caller's dict and the processors share one copy.
        """
        _check_adapter_name(adapter)
        expected = self._expected_projections()
        problems: list[str] = []
        for key in state_dict:
            if key not in expected and not any(s in key for s in ignore):
                problems.append(f"unexpected key {key}")
        for key, shape in expected.items():
            if key not in state_dict:
                problems.append(f"missing key {key}")
            elif tuple(state_dict[key].shape) != shape:
                problems.append(f"{key}: shape {tuple(state_dict[key].shape)}, expected "
                                f"{shape}")
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more"
                                               if len(problems) > 6 else "")
            raise InvalidInput(f"image projections of {adapter} do not fit this UNet: {shown}")
        with torch.no_grad():
            for name, p in self.processors.items():
                i = self.order.index(name)
                w = self._layers[name].to_k.weight
                k, v = (state_dict[f"{i}.{kind}.weight"].detach().to(w.device, w.dtype)
                        for kind in ("to_k_ip", "to_v_ip"))
                if adapter in p.adapters:
                    p.adapters[adapter].set(k, v)
                else:
                    p.adapters[adapter] = ImageProjection(k, v)
        if scale is not None or adapter not in self.state.scales:
            self.state.scales[adapter] = 1.0 if scale is None else float(scale)
        self.state.image_kv.clear()
