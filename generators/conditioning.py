"""The conditioning of one generation's denoising phases: each phase's prompt sequence
(text, then image tokens), pooled embedding and regional conditioning, and the identity
vectors that input-embedding methods (Celeb Basis) put into the prompt.

PhotoMaker denoises in two phases (the text-only prompt up to its
``start_merge_step``, then the fused one); every other method in one.

Several image-token methods may serve one call (StoryMaker, IP-Adapter-FaceID,
InstantID): :func:`join_image_tokens` puts their tokens one method after
another, each method one adapter group
(:class:`~generators.regional_attention.ImageGroup`) with its own projections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from generators.layout import Layout
from generators.methods.base import IdentityMethod, IdentityRequest, ImageTokens, Scene
from generators.prompt import ParsedPrompt
from generators.prompt_encoding import PromptEncoder
from generators.prompt_tokens import PromptTokens
from generators.regional_attention import (
    IdentityTokens,
    ImageGroup,
    RegionalConditioning,
    RegionalConfig,
    cfg_text_rows,
)
from vault.errors import InvalidInput

__all__ = ["CallImageTokens", "Phase", "build_phase", "inject_input_embeddings",
           "join_image_tokens"]

TEXT_LENGTH = 77  # CLIP's context: the text part of every sequence


@dataclass(frozen=True)
class CallImageTokens:
    """Every image-token method's tokens of one call, one method's block after another.

    ``positive``/``negative`` are ``(n, D)``; ``groups`` hold one
    :class:`~generators.regional_attention.ImageGroup` per method (the adapter is the
    method's name), ``ranges`` each handle's ``[start, stop)``; both count from the
    first image token of the whole sequence.
    """

    positive: torch.Tensor
    negative: torch.Tensor
    groups: tuple[ImageGroup, ...]
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)


def join_image_tokens(parts: Sequence[tuple[str, ImageTokens]]) -> CallImageTokens | None:
    """``(adapter, tokens)`` per image-token method, in order -> one sequence of groups
    (None when there are none). One method's tensors are used as they are."""
    if not parts:
        return None
    width = parts[0][1].positive.shape[-1]
    groups, ranges, offset = [], {}, 0
    for adapter, tokens in parts:
        n = tokens.positive.shape[0]
        if tokens.positive.ndim != 2 or tokens.positive.shape[-1] != width or \
                tokens.negative.shape != tokens.positive.shape:
            raise InvalidInput(f"{adapter}: image tokens {tuple(tokens.positive.shape)} / "
                               f"negative {tuple(tokens.negative.shape)}; every method's must "
                               f"be (n, {width}) for both")
        shift = (None if tokens.global_range is None
                 else (tokens.global_range[0] + offset, tokens.global_range[1] + offset))
        groups.append(ImageGroup(adapter, (offset, offset + n), shift))
        for handle, (start, stop) in tokens.ranges.items():
            if handle in ranges:
                raise InvalidInput(f"{handle} has image tokens from two methods")
            ranges[handle] = (start + offset, stop + offset)
        offset += n
    if len(parts) == 1:
        positive, negative = parts[0][1].positive, parts[0][1].negative
    else:
        dtype = parts[0][1].positive.dtype
        positive = torch.cat([t.positive.to(dtype) for _, t in parts])
        negative = torch.cat([t.negative.to(dtype) for _, t in parts])
    return CallImageTokens(positive, negative, tuple(groups), ranges)


@dataclass
class Phase:
    """One conditioning of the denoising loop."""

    embeds: torch.Tensor  # (rows, 77 + image tokens, 2048); rows = [negative, positive] with CFG
    pooled: torch.Tensor  # (rows, P)
    conditioning: RegionalConditioning | None


def build_phase(embeds: torch.Tensor, pooled: torch.Tensor, *, tokens: PromptTokens,
                parsed: ParsedPrompt, requests: Sequence[IdentityRequest], fused: set[int],
                image: CallImageTokens | None, placed: tuple[Layout, RegionalConfig] | None,
                latent_hw: tuple[int, int],
                negative: tuple[torch.Tensor, torch.Tensor] | None,
                class_words: bool) -> Phase:
    """The sequence, pooled embedding and regional conditioning of one phase.

    ``embeds`` ``(1, 77, 2048)`` and ``pooled`` ``(1, P)`` are the phase's prompt;
    ``negative`` the same for the negative prompt when classifier-free guidance runs
    (diffusers' row order: negative first). ``fused``: identities whose class-token
    copies carry their fused tokens in this phase; ``class_words``: an identity's class
    word acts only in its region too.
    """
    n_img = 0
    if image is not None:
        n_img = image.positive.shape[0]
        embeds = torch.cat([embeds, image.positive[None].to(embeds.dtype)], dim=1)
    if negative is not None:
        neg_embeds, neg_pooled = negative
        if image is not None:
            neg_embeds = torch.cat([neg_embeds, image.negative[None].to(embeds.dtype)], dim=1)
        embeds = torch.cat([neg_embeds, embeds])
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
                if class_words:
                    positions.update(tokens.words[k])
            rng = image.ranges.get(r.handle) if image is not None else None
            identities.append(IdentityTokens(r.handle, tuple(sorted(positions)), rng))
        conditioning = RegionalConditioning(
            layout, latent_hw, tuple(identities), text_len=TEXT_LENGTH, num_image_tokens=n_img,
            image_groups=image.groups if image is not None else (),
            text_rows=cfg_text_rows(1) if negative is not None else None,
            config=regional_config)
    return Phase(embeds, pooled, conditioning)


def inject_input_embeddings(encode: PromptEncoder, embeds: torch.Tensor, pooled: torch.Tensor,
                            *, tokens: PromptTokens, parsed: ParsedPrompt, fusing: set[int],
                            method_of: Mapping[int, IdentityMethod],
                            by_index: Mapping[int, IdentityRequest],
                            scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0 (the identity prompt) with each input-embedding identity's vectors at its
    class-token copies.

    One identity in a full-frame box: the whole row and its pooled embedding from the
    injected pass (textual inversion exactly). Otherwise only the identity's own
    positions, each from a pass with only its own vectors, so that CLIP's causal
    attention carries no identity into the scene text, the other identities or the
    pooled embedding (all seen everywhere).
    """
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
        e, p = encode([tokens.ids], inject=(positions, vectors))
        if scene.exact(by_index[i].handle):
            embeds[0], pooled[0] = e[0], p[0]
        else:
            flat = [q for mention in positions for q in mention]
            embeds[0, flat] = e[0, flat]
    return embeds, pooled
