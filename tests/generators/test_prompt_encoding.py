"""PromptEncoder: each row bit-identical to diffusers' ``encode_prompt`` (fp32), whatever
else is encoded with it, and recent rows reused only while that stays true."""

from __future__ import annotations

import pytest
import torch

from generators.prompt_encoding import PromptEncoder, encoder_state
from generators.prompt_tokens import tokenize_prompt
from generators.standins.pipelines import build_tiny_sdxl
from vault.errors import ModelUnavailable

PROMPT = "two friends hiking in the alps, watercolor"
NEGATIVE = "blurry, low quality, extra fingers"


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl()


def _ids(pipe, text: str) -> tuple[tuple[int, ...], ...]:
    return tokenize_prompt((pipe.tokenizer, pipe.tokenizer_2), text, [], []).ids


def test_rows_equal_diffusers_encode_prompt_bit_for_bit(sdxl) -> None:
    from diffusers import StableDiffusionXLPipeline

    plain = StableDiffusionXLPipeline(**sdxl.components)
    encode = PromptEncoder(sdxl, device=torch.device("cpu"), cache_size=0)
    with torch.no_grad():
        want, want_neg, want_pooled, want_neg_pooled = plain.encode_prompt(
            PROMPT, negative_prompt=NEGATIVE, do_classifier_free_guidance=True)
        embeds, pooled = encode([_ids(sdxl, PROMPT), _ids(sdxl, NEGATIVE)])
    width = sdxl.text_encoder.config.hidden_size + sdxl.text_encoder_2.config.hidden_size
    assert embeds.shape == (2, 77, width) and pooled.shape == (2, want_pooled.shape[-1])
    # Same operations on the same shapes in the same order: equal, not merely close.
    assert torch.equal(embeds[:1], want) and torch.equal(embeds[1:], want_neg)
    assert torch.equal(pooled[:1], want_pooled) and torch.equal(pooled[1:], want_neg_pooled)


def test_a_row_does_not_depend_on_the_rows_beside_it(sdxl) -> None:
    encode = PromptEncoder(sdxl, device=torch.device("cpu"), cache_size=0)
    rows = [_ids(sdxl, t) for t in (PROMPT, NEGATIVE, "a cat")]
    with torch.no_grad():
        alone = encode(rows[:1])
        batch = encode(rows)
    assert torch.equal(batch[0][:1], alone[0]) and torch.equal(batch[1][:1], alone[1])


def test_reused_rows_are_copies_and_kept_per_owner(sdxl) -> None:
    encode = PromptEncoder(sdxl, device=torch.device("cpu"), cache_size=2)
    row = _ids(sdxl, PROMPT)
    with torch.no_grad():
        first, _ = encode([row], scope="smiths")
        first_copy = first.clone()
        first.add_(1.0)  # a caller editing its tensor must not edit the kept row
        again, _ = encode([row], scope="smiths")
        assert torch.equal(again, first_copy)
        assert encode.cache.scopes() == {"smiths"}
        encode([row], scope="northlight")
        assert encode.cache.scopes() == {"smiths", "northlight"}
        encode([_ids(sdxl, "a cat")], scope="smiths")  # a third row: the oldest goes
    assert len(encode.cache) == 2 and encode.cache.scopes() == {"northlight", "smiths"}
    encode.clear()
    assert len(encode.cache) == 0


def test_nothing_is_reused_while_a_hook_is_on_an_encoder(sdxl) -> None:
    encoders = (sdxl.text_encoder, sdxl.text_encoder_2)
    assert encoder_state(encoders) is not None
    hook = sdxl.text_encoder.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output * 2)
    try:
        assert encoder_state(encoders) is None
        encode = PromptEncoder(sdxl, device=torch.device("cpu"), cache_size=4)
        with torch.no_grad():
            encode([_ids(sdxl, PROMPT)])
        assert len(encode.cache) == 0
    finally:
        hook.remove()


def test_injection_replaces_only_the_given_positions_input(sdxl) -> None:
    encode = PromptEncoder(sdxl, device=torch.device("cpu"), cache_size=4)
    row = _ids(sdxl, PROMPT)
    d1, d2 = sdxl.text_encoder.config.hidden_size, sdxl.text_encoder_2.config.hidden_size
    vectors = {"text_encoder": torch.ones(1, d1), "text_encoder_2": torch.ones(1, d2)}
    with torch.no_grad():
        plain, _ = encode([row])
        injected, _ = encode([row], inject=([(3,)], vectors))
    # Causal attention: the positions before the injected one are unchanged, it and the
    # later ones change.
    assert torch.equal(injected[0, :3], plain[0, :3])
    assert not torch.equal(injected[0, 3], plain[0, 3])
    assert len(encode.cache) == 1  # the injected pass is never kept


def test_a_second_encoder_without_a_projection_is_refused(sdxl) -> None:
    from types import SimpleNamespace

    pipe = SimpleNamespace(text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder)
    encode = PromptEncoder(pipe, device=torch.device("cpu"), cache_size=0)
    ids = _ids(sdxl, PROMPT)
    with torch.no_grad(), pytest.raises(ModelUnavailable, match="no pooled projection"):
        encode([(ids[0], ids[0])])
