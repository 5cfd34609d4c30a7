"""SDXLTextEncoding: the same penultimate states and pooled output as the plain forward,
with the unread final-layer work left out, and the plain forward where it cannot be."""

from __future__ import annotations

import logging

import pytest
import torch

from generators.text_encoding import SDXLTextEncoding, plain_encoding
from generators.tiny_pipelines import build_tiny_sdxl

PROMPTS = ("a girl hiking in the alps", "two people on a long walk by the sea at dusk, watercolor",
           "man")


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl()


def _ids(tokenizer, prompts=PROMPTS) -> torch.Tensor:
    return torch.tensor(tokenizer(list(prompts), padding="max_length", max_length=77,
                                  truncation=True).input_ids)  # (rows, 77)


class LengthProbe:
    """Records the sequence length each call of a module saw."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        self._handle = module.register_forward_hook(
            lambda mod, args, out: self.lengths.append(args[0].shape[1]))

    def close(self) -> None:
        self._handle.remove()


def _final_layer(encoder):
    return getattr(encoder, "text_model", encoder).encoder.layers[-1]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # is_causal flag; a 4-D mask
def test_same_as_the_plain_forward_with_less_work(sdxl, attention) -> None:
    enc1, enc2 = sdxl.text_encoder, sdxl.text_encoder_2
    for enc in (enc1, enc2):
        enc.set_attn_implementation(attention)
    ids1, ids2 = _ids(sdxl.tokenizer), _ids(sdxl.tokenizer_2)
    encode = SDXLTextEncoding()
    with torch.no_grad():
        want1, none = plain_encoding(enc1, ids1, pooled=False)
        want2, want_pooled = plain_encoding(enc2, ids2, pooled=True)
        assert none is None
        for _ in range(2):  # the first call checks against the plain forward; then alone
            probe1, probe2 = LengthProbe(_final_layer(enc1)), LengthProbe(_final_layer(enc2))
            try:
                h1, p1 = encode(enc1, ids1, pooled=False)
                h2, p2 = encode(enc2, ids2, pooled=True)
            finally:
                probe1.close()
                probe2.close()
            torch.testing.assert_close(h1, want1, rtol=0, atol=0)  # same ops, same order
            torch.testing.assert_close(h2, want2, rtol=0, atol=0)
            assert p1 is None
            torch.testing.assert_close(p2, want_pooled, rtol=1e-5, atol=1e-6)
    # Every end token is in the first L positions: the longest prompt's, plus one.
    longest = int((ids2 == enc2.config.eos_token_id).int().argmax(-1).max()) + 1
    assert longest < 30
    assert probe1.lengths == []  # encoder 1's final layer did not run
    assert probe2.lengths == [longest]  # encoder 2's ran on the first L positions only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rounding_is_not_taken_for_a_difference(sdxl, dtype, caplog) -> None:
    import copy

    enc = copy.deepcopy(sdxl.text_encoder_2).to(dtype)
    ids = _ids(sdxl.tokenizer_2)
    encode = SDXLTextEncoding()
    with torch.no_grad(), caplog.at_level(logging.WARNING, "generators.text_encoding"):
        encode(enc, ids, pooled=True)  # checked against the plain forward
        probe = LengthProbe(_final_layer(enc))
        try:
            _, pooled = encode(enc, ids, pooled=True)
        finally:
            probe.close()
        _, want = plain_encoding(enc, ids, pooled=True)
    assert probe.lengths == [int((ids == enc.config.eos_token_id).int().argmax(-1).max()) + 1]
    assert "differs" not in caplog.text
    torch.testing.assert_close(pooled, want)  # the dtype's default tolerance


def test_an_encoder_pooling_elsewhere_is_encoded_in_full(sdxl, caplog) -> None:
    """A model whose pooled output is not at the end token (here: the last position) would
    be wrong when shortened; the first call notices and keeps to the plain forward."""
    from transformers import CLIPTextModelWithProjection

    class LastPositionPooled(CLIPTextModelWithProjection):
        def forward(self, input_ids, **kwargs):
            out = super().forward(input_ids, **kwargs)
            out.text_embeds = self.text_projection(out.last_hidden_state[:, -1])
            return out

    enc = LastPositionPooled(sdxl.text_encoder_2.config).eval()
    enc.load_state_dict(sdxl.text_encoder_2.state_dict())
    ids = _ids(sdxl.tokenizer_2)
    encode = SDXLTextEncoding()
    with torch.no_grad(), caplog.at_level(logging.WARNING, "generators.text_encoding"):
        want = plain_encoding(enc, ids, pooled=True)
        first = encode(enc, ids, pooled=True)
        probe = LengthProbe(_final_layer(enc))
        try:
            second = encode(enc, ids, pooled=True)
        finally:
            probe.close()
    for got in (first, second):
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert probe.lengths == [77]  # no longer shortened
    assert "differs from the plain forward" in caplog.text


def test_an_unknown_structure_gets_the_plain_forward(sdxl) -> None:
    class Wrapped(torch.nn.Module):  # no .encoder.layers to hook
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, **kwargs):
            return self.inner(input_ids, **kwargs)

    enc = Wrapped(sdxl.text_encoder_2)
    ids = _ids(sdxl.tokenizer_2)
    probe = LengthProbe(_final_layer(sdxl.text_encoder_2))
    try:
        with torch.no_grad():
            h, p = SDXLTextEncoding()(enc, ids, pooled=True)
            want_h, want_p = plain_encoding(sdxl.text_encoder_2, ids, pooled=True)
    finally:
        probe.close()
    assert probe.lengths == [77, 77]
    torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    torch.testing.assert_close(p, want_p, rtol=0, atol=0)


def test_a_text_encoder_without_a_projection_is_refused(sdxl) -> None:
    from vault.errors import ModelUnavailable

    with torch.no_grad(), pytest.raises(ModelUnavailable, match="no pooled projection"):
        SDXLTextEncoding()(sdxl.text_encoder, _ids(sdxl.tokenizer), pooled=True)
