"""SDXL prompt encoding that computes only what SDXL reads from its text encoders.

SDXL conditions the UNet on the *penultimate* hidden states of both CLIP text
encoders, side by side, and on the pooled output of the second (its final layer
at the end token, layer-normed and projected). A plain forward computes more:

- the first encoder's final layer, which nothing reads: here its forward stops
  once the penultimate layer has run;
- the second encoder's final layer at all 77 positions, of which one per row is
  read. Its attention is causal, so the end token sees only the tokens before
  it: the final layer runs on the first ``L`` positions (one past the furthest
  end token in the batch, typically 10-25 of 77) and gives the same pooled
  output.

Both are exact up to float rounding (the shortened attention sums the same
terms). On a full-size SDXL this saves about a twelfth of CLIP-L and most of
one of bigG's 32 layers; on the two-layer stand-in of the tests and benchmarks
it is about a third of the text encoding -- which PhotoMaker does twice.

Both steps lean on the encoder's structure (a list of layers run in order; the
causal mask passed to each layer as ``is_causal`` or a square mask). So the
first call with each encoder also runs the plain forward and compares; if they
differ (another architecture, another transformers release), that encoder is
encoded with the plain forward from then on, and a warning says so.
"""

from __future__ import annotations

import logging
import weakref

import torch

from vault.errors import ModelUnavailable

log = logging.getLogger(__name__)

# The largest difference, relative to the largest value, still read as rounding (at least
# 8 units of the dtype's precision: bfloat16's rounding alone reaches ~5e-3). A wrong layer
# or pooled position differs by O(1).
_TOLERANCE = 1e-2


class _Stop(Exception):
    """Raised from a hook to end a forward once what is needed has been computed."""


def _layers(encoder: torch.nn.Module):
    """The encoder's transformer layers in order (transformers' CLIP text models, 4.x and
    5.x), or None for another structure."""
    for root in (getattr(encoder, "text_model", None), encoder):
        layers = getattr(getattr(root, "encoder", None), "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    return None


def _pooled_extent(encoder: torch.nn.Module, ids: torch.Tensor) -> int:
    """One past the furthest position the pooled output may be read from, over the rows:
    the first end token, or (configs with the legacy end id 2) the largest id."""
    eos = getattr(encoder.config, "eos_token_id", None)
    last = int(ids.argmax(dim=-1).max())
    if isinstance(eos, int):
        last = max(last, int((ids == eos).int().argmax(dim=-1).max()))
    return last + 1


def _shorten(length: int, full: int):
    """A forward pre-hook giving the final layer the first ``length`` positions. Only for
    inputs whose causal masking it recognises; anything else runs at full length."""

    def pre(module, args, kwargs):
        tensors = [(i, a) for i, a in enumerate(args) if torch.is_tensor(a)]
        tensors += [(k, v) for k, v in kwargs.items() if torch.is_tensor(v)]
        hidden = [key for key, t in tensors if t.ndim == 3 and t.shape[1] == full]
        masks = [key for key, t in tensors if t.ndim == 4 and tuple(t.shape[-2:]) == (full, full)]
        if len(hidden) != 1 or len(tensors) != 1 + len(masks):
            return None  # something unrecognised: compute in full
        if not masks and kwargs.get("is_causal") is not True:
            return None  # no causal mask to keep: shortening would change the attention
        args, kwargs = list(args), dict(kwargs)
        for key, t in tensors:
            cut = t[:, :length] if key in hidden else t[..., :length, :length]
            if isinstance(key, int):
                args[key] = cut
            else:
                kwargs[key] = cut
        return tuple(args), kwargs

    return pre


class SDXLTextEncoding:
    """Encode token ids with one SDXL text encoder: ``(hidden, pooled)`` with ``hidden`` the
    penultimate hidden states ``(rows, 77, d)`` and ``pooled`` the projected pooled output
    ``(rows, P)`` (None unless asked). Keeps, per encoder object, whether the shortened
    forward was checked against the plain one."""

    def __init__(self) -> None:
        self._checked: weakref.WeakKeyDictionary[torch.nn.Module, bool] = (
            weakref.WeakKeyDictionary())

    def __call__(self, encoder: torch.nn.Module, ids: torch.Tensor, *,
                 pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        layers = _layers(encoder)
        verdict = self._checked.get(encoder)
        if layers is None or len(layers) < 2 or verdict is False:
            return plain_encoding(encoder, ids, pooled=pooled)
        fast = self._shortened(encoder, layers, ids, pooled)
        if verdict is None:
            full = plain_encoding(encoder, ids, pooled=pooled)
            same = all(_close(a, b) for a, b in zip(fast, full, strict=True))
            self._checked[encoder] = same
            if not same:
                log.warning("%s: the shortened text encoding differs from the plain forward; "
                            "encoding it in full from now on", type(encoder).__name__)
                return full
        return fast

    @staticmethod
    def _shortened(encoder, layers, ids, pooled):
        kept: dict[str, torch.Tensor] = {}

        def keep(module, args, output):
            kept["hidden"] = output[0] if isinstance(output, tuple) else output
            if not pooled:
                raise _Stop

        handles = [layers[-2].register_forward_hook(keep)]
        if pooled:
            handles.append(layers[-1].register_forward_pre_hook(
                _shorten(_pooled_extent(encoder, ids), ids.shape[1]), with_kwargs=True))
        out = None
        try:
            out = encoder(ids)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return kept["hidden"], (_pooled_of(encoder, out) if pooled else None)


def plain_encoding(encoder: torch.nn.Module, ids: torch.Tensor, *,
                   pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The diffusers SDXL encoding: the full forward, ``hidden_states[-2]`` and ``out[0]``."""
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], (_pooled_of(encoder, out) if pooled else None)


def _pooled_of(encoder, out) -> torch.Tensor:
    if out[0].ndim != 2:
        raise ModelUnavailable(f"the second SDXL text encoder ({type(encoder).__name__}) gives "
                               "no pooled projection: CLIPTextModelWithProjection expected")
    return out[0]


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    if a.shape != b.shape:
        return False
    tolerance = max(_TOLERANCE, 8 * torch.finfo(b.dtype).eps)
    a, b = a.float(), b.float()
    scale = float(b.abs().max()) + 1e-6
    return float((a - b).abs().max()) <= tolerance * scale
