"""Prompt tokens for both SDXL tokenizers, with each identity's class token repeated as
its method asks (PhotoMaker's expansion) and the identity positions recorded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vault.errors import InvalidInput

__all__ = ["PromptTokens", "tokenize_prompt"]


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
