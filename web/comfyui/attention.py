"""Identity image tokens in a ComfyUI SDXL model: the ``attn2`` replace patch of the apply
nodes, with idvault's regional formula, and where each adapter weight goes.

ComfyUI calls an ``attn2`` replace patch of a transformer block with ``q = to_q(x)``,
``k = to_k(context)``, ``v = to_v(context)`` and ``extra_options`` (``n_heads``,
``cond_or_uncond``, ``sigmas``, ``original_shape``), and applies ``to_out`` to what it
returns (``comfy/ldm/modules/attention.py``, ``BasicTransformerBlock``). The patch computes
:mod:`generators.regional_attention`'s formula::

    text + sum_a scale_a * gate_a(p) * SDPA(q, to_k_ip_a(img_a), to_v_ip_a(img_a), bias_a)

with one *group* ``a`` per adapter (its weights, scale and schedule), one softmax over the
tokens of all the group's identities, ``bias_a[p, j] = log m_i(p)`` for a token of identity
``i`` with mask ``m_i`` (0 without a mask) and ``gate_a(p) = max_i m_i(p)`` (1 without
masks). One full-frame identity is exactly the official decoupled cross-attention
``text + scale * SDPA(q, to_k_ip(img), to_v_ip(img))`` of IP-Adapter-FaceID and InstantID.
Each batch row gets the identity's positive or negative tokens as ComfyUI's
``cond_or_uncond`` says (0 cond, 1 uncond).

Where the weights go. The official files key ``to_k_ip`` / ``to_v_ip`` by the index of
the cross-attention processor in diffusers' ``unet.attn_processors`` (odd: ``2n + 1`` for
the ``n``-th transformer block). :data:`SDXL_LAYERS` lists the 70 SDXL transformer blocks
in that order with their place in ComfyUI's UNet: the down blocks (ComfyUI
``input_blocks`` 4, 5: 2 blocks each; 7, 8: 10 each), the up blocks (``output_blocks``
0-2: 10 each; 3-5: 2 each), then the mid block (10): diffusers registers ``up_blocks``
before ``mid_block``. This is the numbering ComfyUI_IPAdapter_plus and ComfyUI_InstantID
use. ComfyUI has keyed the mid block's transformers ``("middle", 0, i)`` and, in the
nodes written since, ``("middle", 1, i)``; the patch is set under both (a key that does
not occur is never looked up).

Nothing here imports ComfyUI: the patch needs only torch, and a ModelPatcher is used
through ``clone``, ``set_model_attn2_replace`` and ``get_model_object``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["SDXL_LAYERS", "Identity", "IdentityPatch", "Layer", "apply_identity",
           "check_projections"]


@dataclass(frozen=True)
class Layer:
    """One SDXL transformer block's cross-attention."""

    block: str  # ComfyUI block name: input | output | middle
    number: int  # ComfyUI block number
    index: int  # transformer block inside it
    path: str  # the attn2 module inside ComfyUI's model, for shape checks
    processor: int  # diffusers processor index of this attn2: the file's key


def _sdxl_layers() -> tuple[Layer, ...]:
    layers: list[tuple[str, int, int, str]] = []
    for number, depth in ((4, 2), (5, 2), (7, 10), (8, 10)):
        layers += [("input", number, i, f"input_blocks.{number}.1") for i in range(depth)]
    for number, depth in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2)):
        layers += [("output", number, i, f"output_blocks.{number}.1") for i in range(depth)]
    layers += [("middle", 0, i, "middle_block.1") for i in range(10)]
    return tuple(Layer(b, n, i, f"diffusion_model.{p}.transformer_blocks.{i}.attn2", 2 * k + 1)
                 for k, (b, n, i, p) in enumerate(layers))


SDXL_LAYERS = _sdxl_layers()


def check_projections(state: Mapping[str, torch.Tensor], model, what: str
                      ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{processor: (to_k_ip, to_v_ip)}`` from an official ``ip_adapter`` dict, every key
    and shape checked against ``model``'s own ``attn2.to_k`` / ``to_v`` (LoRA keys, which
    FaceID files also hold, are not for this patch and are skipped). ValueError lists
    what does not fit."""
    ip = {k: v for k, v in state.items() if "_lora." not in k}
    expected = {f"{layer.processor}.to_{p}_ip.weight": (layer, p)
                for layer in SDXL_LAYERS for p in ("k", "v")}
    problems = [f"unexpected key {k}" for k in sorted(set(ip) - set(expected))]
    problems += [f"missing key {k}" for k in sorted(set(expected) - set(ip),
                                                    key=lambda k: int(k.split(".")[0]))]
    for key, (layer, p) in expected.items():
        if key not in ip:
            continue
        try:
            target = tuple(model.get_model_object(f"{layer.path}.to_{p}").weight.shape)
        except AttributeError:
            problems.append(f"the model has no {layer.path} (is it an SDXL model?)")
            continue
        if tuple(ip[key].shape) != target:
            problems.append(f"{key}: shape {tuple(ip[key].shape)}, the model's "
                            f"{layer.path}.to_{p} is {target}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more"
                                           if len(problems) > 6 else "")
        raise ValueError(f"{what} does not fit this model: {shown}")
    return {layer.processor: (ip[f"{layer.processor}.to_k_ip.weight"],
                              ip[f"{layer.processor}.to_v_ip.weight"]) for layer in SDXL_LAYERS}


@dataclass(frozen=True, eq=False)
class Identity:
    """One identity's tokens in one adapter group."""

    handle: str
    cond: torch.Tensor  # (tokens, D): the positive tokens
    uncond: torch.Tensor  # (tokens, D): the negative tokens
    mask: torch.Tensor | None = None  # (H, W) in 0..1 at image or latent size; None: everywhere


@dataclass(frozen=True, eq=False)
class Group:
    """One adapter: its per-layer projections, scale, schedule and identities."""

    projections: Mapping[int, tuple[torch.Tensor, torch.Tensor]]
    scale: float
    sigma_start: float  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float
    identities: tuple[Identity, ...] = field(default=())
    # The projected tokens per (layer, device, dtype, batch layout): they are the same at
    # every step, so they move to the device and through to_k_ip / to_v_ip once. They live
    # as long as the patched model that holds the tokens themselves.
    _kv: dict = field(default_factory=dict, repr=False, compare=False)

    def kv(self, processor: int, ident: Identity, q: torch.Tensor,
           cond_or_uncond: tuple[int, ...], per: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(to_k_ip(rows), to_v_ip(rows))``, ``(B, T, inner)`` each, where row ``b`` holds
        the identity's positive or negative tokens as ``cond_or_uncond`` says."""
        key = (processor, id(ident), q.device, q.dtype, cond_or_uncond, per)
        if key not in self._kv:
            wk, wv = (w.to(q.device, q.dtype) for w in self.projections[processor])
            rows = torch.cat([(ident.cond, ident.uncond)[c].to(q.device, q.dtype)
                              .expand(per, -1, -1) for c in cond_or_uncond])  # (B, T, D)
            self._kv[key] = (rows @ wk.T, rows @ wv.T)
        return self._kv[key]

    def same_adapter(self, other: Group) -> bool:
        """The same weights (the very tensors: one loaded adapter), scale and schedule."""
        mine, theirs = self.projections, other.projections
        return (mine.keys() == theirs.keys()
                and all(mine[i][0] is theirs[i][0] and mine[i][1] is theirs[i][1] for i in mine)
                and self.scale == other.scale
                and (self.sigma_start, self.sigma_end) == (other.sigma_start, other.sigma_end))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, L, inner)`` multi-head SDPA, as diffusers' processors split the heads."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0)
    return out.transpose(1, 2).reshape(b, -1, inner)


def _grid(original_shape: Sequence[int] | None, length: int) -> tuple[int, int]:
    """The ``(h, w)`` of a layer with ``length`` queries on a latent of ``original_shape``."""
    if original_shape is not None:
        h, w = int(original_shape[-2]), int(original_shape[-1])
        for _ in range(6):
            if h * w == length:
                return h, w
            h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(f"cannot place a mask on a layer of {length} queries (latent "
                     f"{original_shape}); masks need ComfyUI's original_shape")


def _mask_at(mask: torch.Tensor, hw: tuple[int, int], device, dtype) -> torch.Tensor:
    m = mask.to(device=device, dtype=torch.float32)
    if tuple(m.shape) != hw:  # area average: the share of each cell the mask covers
        m = F.interpolate(m[None, None], size=hw, mode="area")[0, 0]
    return m.clamp(0, 1).reshape(-1).to(dtype)  # (h * w,)


class IdentityPatch:
    """The ``attn2`` replace patch of one transformer block (see the module docstring).
    Immutable: adding an identity makes a new patch (:meth:`with_group`)."""

    def __init__(self, processor: int, groups: tuple[Group, ...]) -> None:
        self.processor = processor
        self.groups = groups

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options
        return self

    def with_group(self, group: Group) -> IdentityPatch:
        """This patch plus ``group``'s identities: into the same adapter's group (one
        softmax, as idvault's regional processor), or as a new group."""
        groups = list(self.groups)
        for i, g in enumerate(groups):
            if g.same_adapter(group):
                groups[i] = Group(g.projections, g.scale, g.sigma_start, g.sigma_end,
                                  g.identities + group.identities)
                break
        else:
            groups.append(group)
        return IdentityPatch(self.processor, tuple(groups))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        out = attention(q, k, v, heads)  # (B, L, inner): the text branch
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.detach().flatten()[0]) if sigmas is not None else None
        cond_or_uncond = list(extra_options.get("cond_or_uncond") or [0])
        batch, length, _ = q.shape
        per = batch // len(cond_or_uncond)
        for g in self.groups:
            if sigma is not None and not g.sigma_end <= sigma <= g.sigma_start:
                continue
            out = out + self._group(g, q, heads, cond_or_uncond, per, length,
                                    extra_options.get("original_shape"))
        return out.to(q.dtype)

    def _group(self, g: Group, q, heads, cond_or_uncond, per, length, original_shape):
        keys, values, columns, masks = [], [], [], []
        for ident in g.identities:
            k_ip, v_ip = g.kv(self.processor, ident, q, tuple(cond_or_uncond), per)
            keys.append(k_ip)  # (B, T, inner)
            values.append(v_ip)
            columns.append(k_ip.shape[1])
            masks.append(None if ident.mask is None else
                         _mask_at(ident.mask, _grid(original_shape, length), q.device,
                                  torch.float64))
        bias = gate = None
        if any(m is not None for m in masks):
            full = torch.ones(length, dtype=torch.float64, device=q.device)
            ms = [full if m is None else m for m in masks]
            cols = [torch.log(m)[:, None].expand(length, n)
                    for m, n in zip(ms, columns, strict=True)]
            b = torch.cat(cols, dim=1)  # (L, tokens): log m_i(p), -inf outside
            visible = torch.stack(ms).amax(0)  # (L,): gate = max_i m_i(p)
            b[visible == 0] = 0.0  # nothing visible: a finite row, removed by the gate
            bias = b.to(q.dtype)[None, None] if b.any() else None
            gate = visible.to(q.dtype)[None, :, None] if not (visible == 1).all() else None
        image = attention(q, torch.cat(keys, 1), torch.cat(values, 1), heads, bias)
        if gate is not None:
            image = image * gate
        return g.scale * image


def apply_identity(model, group: Group):
    """A clone of the ComfyUI ``model`` with ``group``'s identities patched into every SDXL
    cross-attention (added to the idvault patches already there)."""
    work = model.clone()
    replace = work.model_options.get("transformer_options", {}).get(
        "patches_replace", {}).get("attn2", {})
    for layer in SDXL_LAYERS:
        keys = [(layer.block, layer.number, layer.index)]
        if layer.block == "middle":
            keys.append(("middle", 1, layer.index))
        existing = replace.get(keys[0])
        if existing is not None and not isinstance(existing, IdentityPatch):
            raise ValueError(f"the model already has another node's attention patch at "
                             f"{keys[0]}; apply the idvault identities first")
        patch = (existing.with_group(group) if existing is not None
                 else IdentityPatch(layer.processor, (group,)))
        for key in keys:
            work.set_model_attn2_replace(patch, *key)
    return work
