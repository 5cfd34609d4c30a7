"""Regional identity cross-attention: each identity's tokens act only inside its mask.

Why. The official StoryMaker pipeline appends every character's image tokens
to the text and lets all of them reach all pixels (masks are used only to
crop the inputs), which is why characters blend into each other; PhotoMaker
supports one trigger word at all. Here every cross-attention layer (``attn2``)
gets a processor that restricts, per query pixel, which identity tokens it
may attend to, so with two people each keeps their own likeness.

Sequence layout (what the pipeline passes as ``encoder_hidden_states``)::

    (batch, text_len + num_image_tokens, cross_dim)   # SDXL: cross_dim 2048
     |-- text: text_len tokens (77 per CLIP chunk) ---|-- image tokens --|

* The **text** part is the usual prompt embedding. Some positions may hold an
  identity's *text-fused* tokens (PhotoMaker: fused ID embeddings at the
  class-word positions): ``IdentityTokens.text_positions``. Every other text
  position is scene text and is visible everywhere.
* The **image** part holds decoupled image tokens (StoryMaker, IP-Adapter),
  attended through the processor's own ``to_k_ip`` / ``to_v_ip`` and added
  with ``image_scale``. Ranges inside it belong to one identity
  (``IdentityTokens.image_tokens``) or to everyone
  (``RegionalConditioning.global_image_tokens``: StoryMaker's background
  block ``bg_embed``).

Per query position ``p`` with identity masks ``m_i(p)`` (:mod:`generators.layout`):

* text branch: ``SDPA(q, K_text, V_text, bias)`` where ``bias[p, j] = 0`` for
  scene tokens and, for a token of identity ``i``, ``0`` if ``m_i(p) > 0``
  else ``-inf`` (``text_mask="hard"``, the default) or ``log m_i(p)``
  (``"soft"``: fades the token out across the feather);
* image branch: ``SDPA(q, to_k_ip(img), to_v_ip(img), bias)`` over the global
  tokens (bias 0) and identity tokens (``log m_i(p)`` by default, or the
  hard rule), **one joint softmax** as in the official processor. Without
  global tokens, a pixel no identity covers attends to nothing, so the
  branch is gated by ``max_i m_i(p)`` (0 there, 1 inside a region);
* output: ``to_out(text + image_scale * image)``, as in the official
  decoupled processor.

Locality is exact: where ``m_A(p) = 0`` every bias entry of A's tokens is
``-inf``, their softmax weights are exactly 0, and nothing about A's tokens
reaches ``p``. With one identity and a full-frame mask every bias is 0 and
every gate 1, the biases are dropped, and the processor computes exactly
diffusers' ``AttnProcessor2_0`` (text only) or the official decoupled
formula ``text + scale * SDPA(q, to_k_ip(img), to_v_ip(img))``.

Resolution. A processor sees only ``h * w`` queries; the grid is recovered
from the query length and the latent size (:func:`layout.grid_for_length`),
so one conditioning serves every ``attn2`` of SDXL (/2, /4) or SD1.5
(/1, /2, /4). Biases are built once per (length, batch, dtype, device) and
cached on the conditioning, not per layer and step.

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
    "IdentityTokens",
    "RegionalAttention",
    "RegionalAttnProcessor",
    "RegionalConditioning",
    "RegionalConfig",
    "RegionalState",
    "cfg_text_rows",
]

MASK_MODES = ("hard", "soft")


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
    part (0 = the first token after the text).
    """

    name: str
    text_positions: tuple[int, ...] = ()
    image_tokens: tuple[int, int] | None = None


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
    num_image_tokens: int = 0  # tokens appended after the text (global + identities)
    global_image_tokens: tuple[int, int] | None = None  # visible everywhere (StoryMaker bg)
    # Batch rows whose text carries identity tokens; None: all. With CFG use
    # cfg_text_rows(n): the negative prompt's positions are ordinary words.
    text_rows: tuple[bool, ...] | None = None
    config: RegionalConfig = field(default_factory=RegionalConfig)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "identities", tuple(self.identities))
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
        owner = np.full(self.num_image_tokens, -1)
        ranges = [("global image tokens", self.global_image_tokens)] + [
            (i.name, i.image_tokens) for i in self.identities]
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
        if (owner < 0).any():
            raise InvalidInput(
                f"image tokens {np.flatnonzero(owner < 0).tolist()[:8]} belong to no identity "
                "and are not global; every appended token must be assigned")

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
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(bias (1, 1, query_len, num_image_tokens) or None, gate (1, 1, query_len, 1) or None)``."""
        key = ("image", query_len, dtype, device)
        if key in self._cache:
            return self._cache[key]
        bias = np.zeros((query_len, self.num_image_tokens))
        masks = self.masks_for(query_len)
        has_global = self.global_image_tokens is not None
        visible = np.full(query_len, has_global)
        gate = np.ones(query_len) if has_global else np.zeros(query_len)
        for ident in self.identities:
            if ident.image_tokens is None:
                continue
            m = masks[ident.name].astype(np.float64)
            start, stop = ident.image_tokens
            bias[:, start:stop] = self._bias_column(m, self.config.image_mask)[:, None]
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
        self.image_scale = image_scale
        # Per processor: the image tokens' key and value projections, with the stamp of
        # what they were computed from (see RegionalAttnProcessor._image_kv). Cleared at
        # install and remove, so nothing outlives the generation that made it.
        self.image_kv: dict[int, tuple[tuple, tuple, torch.Tensor, torch.Tensor]] = {}


def _add_masks(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class RegionalAttnProcessor(nn.Module):
    """Cross-attention processor with regional identity tokens (see the module docstring).

    An ``nn.Module`` so its ``to_k_ip`` / ``to_v_ip`` (StoryMaker / IP-Adapter
    image projections, ``Linear(cross_dim, inner_dim, bias=False)``, the
    official names) move with the UNet and appear in its state dict while
    installed.
    """

    def __init__(self, state: RegionalState, fallback, *, hidden_size: int,
                 cross_attention_dim: int, image_tokens: bool) -> None:
        super().__init__()
        self.state = state
        # A list, not an attribute: an nn.Module fallback must not become a
        # submodule (its weights would appear twice in the UNet state dict).
        self._fallback = [fallback]
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False) if image_tokens else None
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False) if image_tokens else None

    @property
    def fallback(self):
        return self._fallback[0]

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

        if cond.num_image_tokens:
            if self.to_k_ip is None:
                raise InvalidInput("image tokens were passed but these processors have no image "
                                   "projections (install RegionalAttention with "
                                   "image_tokens=True)")
            ip_key, ip_value = self._image_kv(encoder_hidden_states, image)
            ip_key = ip_key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            ip_value = ip_value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            ip_bias, gate = cond.image_bias(q_len, query.dtype, query.device)
            if attention_mask is not None:
                ip_bias = _add_masks(ip_bias, attention_mask[..., t_len:])
            ip_out = F.scaled_dot_product_attention(query, ip_key, ip_value, attn_mask=ip_bias,
                                                    dropout_p=0.0, is_causal=False)
            if gate is not None:
                ip_out = ip_out * gate
            out = out + self.state.image_scale * ip_out

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)  # linear
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _image_kv(self, encoder_hidden_states: torch.Tensor,
                  image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``to_k_ip(image)``, ``to_v_ip(image)``: (batch, num_image_tokens, inner) each.

        The image tokens are the same at every denoising step of a phase, so their
        projections are computed at the first step and reused while the sequence and
        both projection weights are the same tensor objects (held by weak reference, so
        a new tensor at a freed address never matches) with the same in-place version,
        shape and dtype. The official processor recomputes them at every step; the result
        is the same. Not kept with autograd on (training) or with hooks on the
        projections (they would be skipped)."""
        k_ip, v_ip = self.to_k_ip, self.to_v_ip
        if torch.is_grad_enabled() or _hooked(k_ip) or _hooked(v_ip):
            return k_ip(image), v_ip(image)
        sources = (encoder_hidden_states, k_ip.weight, v_ip.weight)
        stamp = tuple((t._version, tuple(t.shape), t.dtype, t.device) for t in sources)
        hit = self.state.image_kv.get(id(self))
        if hit is not None and hit[1] == stamp and all(
                ref() is t for ref, t in zip(hit[0], sources, strict=True)):
            return hit[2], hit[3]
        key, value = k_ip(image), v_ip(image)
        self.state.image_kv[id(self)] = (tuple(weakref.ref(t) for t in sources), stamp,
                                         key, value)
        return key, value


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class RegionalAttention:
    """Installs :class:`RegionalAttnProcessor` on a UNet's cross-attention layers.

    ::

        regional = RegionalAttention(pipe.unet, image_tokens=True, image_scale=0.8)
        regional.load_image_projections(ip_adapter_state_dict)   # optional
        with regional:                       # install ... remove, even on error
            regional.conditioning = RegionalConditioning(...)
            pipe(prompt_embeds=..., ...)

    The processors are built once (``to_k_ip``/``to_v_ip`` initialised as
    copies of the layer's ``to_k``/``to_v``, as IP-Adapter training starts)
    and survive remove/install cycles, so loaded weights are kept.
    """

    def __init__(self, unet, *, image_tokens: bool = False, image_scale: float = 1.0) -> None:
        self.unet = unet
        self.state = RegionalState(image_scale)
        self.image_tokens = image_tokens
        self._originals: dict | None = None
        self.order = list(unet.attn_processors)  # processor names, diffusers' fixed order
        self.processors: dict[str, RegionalAttnProcessor] = {}
        self._layers: dict[str, nn.Module] = {}  # processor name -> its Attention module
        for name, proc in unet.attn_processors.items():
            attn = unet.get_submodule(name.removesuffix(".processor"))
            if not getattr(attn, "is_cross_attention", False):
                continue  # self-attention keeps its processor
            p = RegionalAttnProcessor(self.state, proc, hidden_size=attn.to_k.out_features,
                                      cross_attention_dim=attn.to_k.in_features,
                                      image_tokens=image_tokens)
            if image_tokens:
                with torch.no_grad():
                    p.to_k_ip.weight.copy_(attn.to_k.weight)
                    p.to_v_ip.weight.copy_(attn.to_v.weight)
            p.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
            self.processors[name] = p
            self._layers[name] = attn
        if not self.processors:
            raise InvalidInput("this UNet has no cross-attention layers to make regional")

    # -- state ---------------------------------------------------------------------
    @property
    def conditioning(self) -> RegionalConditioning | None:
        return self.state.conditioning

    @conditioning.setter
    def conditioning(self, value: RegionalConditioning | None) -> None:
        self.state.conditioning = value

    @property
    def image_scale(self) -> float:
        return self.state.image_scale

    @image_scale.setter
    def image_scale(self, value: float) -> None:
        self.state.image_scale = float(value)

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
            if p.to_k_ip is not None:  # the only tensors a processor holds
                w = self._layers[name].to_k.weight
                if p.to_k_ip.weight.device != w.device or p.to_k_ip.weight.dtype != w.dtype:
                    p.to(device=w.device, dtype=w.dtype)
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

    # -- image projections (official index-keyed layout) -------------------------------
    def image_projection_state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<index>.to_k_ip.weight": ..., ...}`` keyed by position in ``unet.attn_processors``."""
        out = {}
        for name, p in self.processors.items():
            if p.to_k_ip is not None:
                i = self.order.index(name)
                out[f"{i}.to_k_ip.weight"] = p.to_k_ip.weight.detach()
                out[f"{i}.to_v_ip.weight"] = p.to_v_ip.weight.detach()
        return out

    def load_image_projections(self, state_dict: Mapping[str, torch.Tensor], *,
                               ignore: Sequence[str] = ("_lora.",)) -> None:
        """Load ``to_k_ip``/``to_v_ip`` from an index-keyed dict (StoryMaker's ``ip_adapter``).

        Keys are ``"<i>.to_k_ip.weight"`` / ``"<i>.to_v_ip.weight"`` with ``i``
        the index into ``unet.attn_processors`` (odd = cross-attention in
        SDXL). Strict: every cross-attention layer needs both, with matching
        shapes, and no other keys are allowed except those containing a
        string in ``ignore`` (LoRA keys, loaded elsewhere).
        """
        if not self.image_tokens:
            raise InvalidInput("this RegionalAttention was created without image projections "
                               "(image_tokens=False)")
        expected = self.image_projection_state_dict()
        problems: list[str] = []
        for key in state_dict:
            if key not in expected and not any(s in key for s in ignore):
                problems.append(f"unexpected key {key}")
        for key, current in expected.items():
            if key not in state_dict:
                problems.append(f"missing key {key}")
            elif tuple(state_dict[key].shape) != tuple(current.shape):
                problems.append(f"{key}: shape {tuple(state_dict[key].shape)}, expected "
                                f"{tuple(current.shape)}")
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more"
                                               if len(problems) > 6 else "")
            raise InvalidInput(f"image projections do not fit this UNet: {shown}")
        with torch.no_grad():
            for name, p in self.processors.items():
                i = self.order.index(name)
                p.to_k_ip.weight.copy_(state_dict[f"{i}.to_k_ip.weight"])
                p.to_v_ip.weight.copy_(state_dict[f"{i}.to_v_ip.weight"])
