"""SDXL prompt encoding, computed exactly as diffusers' ``encode_prompt``, with recent
encodings kept for reuse.

SDXL conditions the UNet on the penultimate hidden states of both CLIP text
encoders side by side (768 + 1280 = 2048 wide) and on the pooled projection of
the second. Each prompt row is encoded on its own, with the plain forward
(``output_hidden_states=True``), as diffusers does for one prompt: the same
operations on the same shapes in the same order, so the result is bit-identical
to ``StableDiffusionXLPipeline.encode_prompt`` on every CPU and GPU kernel. (A
batch of several rows, or a forward cut short, can round differently on some
kernels; the saving was about 0.3% of a full-size call.)

:class:`PromptEncoder` keeps recent rows (:class:`Encodings`): the same prompt
is often generated again with another seed. A row is reused only while the text
encoders are unchanged (:func:`encoder_state`) and only for the same calling
owner, and a hit is a copy of what the encoders gave, so it equals a fresh
encoding bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vault.errors import ModelUnavailable

__all__ = ["Encodings", "Injection", "PromptEncoder", "encoder_state"]

# Per mention its token positions, and per encoder key ("text_encoder", "text_encoder_2") the
# (n, d) vectors that replace those positions' input embeddings.
Injection = tuple[Sequence[Sequence[int]], Mapping[str, torch.Tensor]]
ENCODER_KEYS = ("text_encoder", "text_encoder_2")

# transformers installs hooks on its layers that only record outputs (output_hidden_states).
_RECORDING_HOOKS = "transformers.utils.output_capturing"


def _tensor_stamp(t: torch.Tensor) -> tuple:
    # Object, version counter (in-place writes), storage, dtype, device and shape.
    return (id(t), t._version, t.data_ptr(), t.dtype, t.device, tuple(t.shape))


def _foreign_hooks(module: torch.nn.Module) -> bool:
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(getattr(h, "__module__", None) != _RECORDING_HOOKS for h in hooks)


def encoder_state(encoders: Sequence[torch.nn.Module]) -> tuple | None:
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


class Encodings:
    """Recent encodings of single prompt rows, most recent last, at most ``size``.

    The key holds the calling owner: a faster call must not tell one owner that
    another made the same prompt recently. Only scene text is encoded through
    here (class words in place of handles); identity data is fused in afterwards
    or injected on a pass that bypasses this.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: dict[tuple, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def scopes(self) -> set[str | None]:
        """The owners whose encodings are kept."""
        return {key[0] for key in self._entries}

    def get(self, key: tuple, state: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        hit = self._entries.pop(key, None)
        if hit is None or hit[0] != state:
            return None
        self._entries[key] = hit
        return hit[1].clone(), hit[2].clone()

    def put(self, key: tuple, state: tuple, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        self._entries[key] = (state, embeds.clone(), pooled.clone())
        while len(self._entries) > self.size:
            del self._entries[next(iter(self._entries))]

    def clear(self) -> None:
        self._entries.clear()


class PromptEncoder:
    """Rows of per-tokenizer token ids -> ``(rows, 77, 2048)`` penultimate hidden states of
    both encoders side by side and ``(rows, P)`` text encoder 2's pooled projection, in the
    text encoder 2's dtype on ``device``."""

    def __init__(self, pipe, *, device: torch.device, cache_size: int = 16) -> None:
        self.pipe = pipe
        self.device = device
        self.cache = Encodings(cache_size) if cache_size else None

    def __call__(self, rows: Sequence[tuple[tuple[int, ...], ...]], *,
                 scope: str | None = None,
                 inject: Injection | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``scope``: the calling owner (part of the reuse key). ``inject``: those positions'
        input embeddings replaced by the vectors, through a forward hook on each encoder's
        token-embedding module for this pass only (no token or table is changed)."""
        pairs = [self._row(row, scope, inject) for row in rows]
        return torch.cat([e for e, _ in pairs]), torch.cat([p for _, p in pairs])

    def clear(self) -> None:
        if self.cache is not None:
            self.cache.clear()

    def _row(self, row, scope, inject) -> tuple[torch.Tensor, torch.Tensor]:
        encoders = (self.pipe.text_encoder, self.pipe.text_encoder_2)
        key = state = None
        if inject is None and self.cache is not None:
            state = encoder_state(encoders)
            if state is not None:
                key = (scope, row)
                hit = self.cache.get(key, state)
                if hit is not None:
                    return hit
        hidden, pooled = [], None
        for k, encoder in enumerate(encoders):
            ids = torch.tensor([row[k]], device=encoder.device)  # (1, 77)
            handle = None
            if inject is not None:
                handle = encoder.get_input_embeddings().register_forward_hook(
                    _replacing(inject[0], inject[1][ENCODER_KEYS[k]]))
            try:
                out = encoder(ids, output_hidden_states=True)
            finally:
                if handle is not None:
                    handle.remove()
            hidden.append(out.hidden_states[-2])  # (1, 77, d_k): SDXL's penultimate layer
            if k == 1:
                pooled = _pooled_of(encoder, out)  # (1, P)
        dtype = self.pipe.text_encoder_2.dtype
        embeds = torch.cat(hidden, dim=-1).to(self.device, dtype)
        pooled = pooled.to(self.device, dtype)
        if key is not None:
            self.cache.put(key, state, embeds, pooled)
        return embeds, pooled


def _replacing(positions: Sequence[Sequence[int]], vectors: torch.Tensor):
    def hook(module, args, output):
        output = output.clone()
        for mention in positions:
            output[:, list(mention)] = vectors.to(output)
        return output

    return hook


def _pooled_of(encoder, out) -> torch.Tensor:
    if out[0].ndim != 2:
        raise ModelUnavailable(f"the second SDXL text encoder ({type(encoder).__name__}) gives "
                               "no pooled projection: CLIPTextModelWithProjection expected")
    return out[0]
