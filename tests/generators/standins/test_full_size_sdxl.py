"""The full-size SDXL builder of the bench (generators.standins.full_size_sdxl) has the manifest's architecture.

Built on the meta device: no memory for its 3.5B parameters, so this runs in
seconds. That ``sdxl_unet_config`` itself yields the manifest's parameter
count and processor order is tests/generators/test_lora_loading.py's check;
here the question is whether the builder uses it, and builds the text
encoders, tokenizers and VAE so that a pipeline call can run.
"""

from __future__ import annotations

import pytest
import torch

from generators.standins.full_size_sdxl import SDXL_VAE_CONFIG, build_full_size_sdxl
from tests.generators.test_lora_loading import MANIFESTS, base  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not MANIFESTS.is_dir(), reason="reference manifests absent")


@pytest.fixture(scope="module")
def full_pipe(base):  # noqa: F811
    return build_full_size_sdxl(base, device="meta", dtype=torch.float16)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_unet_is_the_manifest_sdxl_unet(full_pipe, base) -> None:  # noqa: F811
    unet = full_pipe.unet
    assert _params(unet) == base["sdxl_unet_params"]
    assert list(unet.attn_processors) == base["sdxl_attn_processor_order"]
    for key, value in base["sdxl_unet_config"].items():
        got = unet.config[key]
        assert (list(got) if isinstance(got, tuple | list) else got) == value, key
    # Allocated nowhere, in the asked dtype.
    assert {p.device.type for p in full_pipe.components["unet"].parameters()} == {"meta"}
    assert {p.dtype for p in unet.parameters()} == {torch.float16}


@pytest.mark.parametrize("attr, key", [("text_encoder", "clip_l_text_config"),
                                       ("text_encoder_2", "clip_g_text_config")])
def test_text_encoders_have_the_manifest_widths(full_pipe, base, attr, key) -> None:  # noqa: F811
    config = getattr(full_pipe, attr).config
    for field, value in base[key].items():
        assert getattr(config, field) == value, field
    # The tokenizers' ids fit the embedding table, and the pooled token is found by their eos.
    tokenizer = full_pipe.tokenizer if attr == "text_encoder" else full_pipe.tokenizer_2
    assert len(tokenizer) <= config.vocab_size
    assert config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.model_max_length == config.max_position_embeddings


def test_conditioning_widths_meet_the_unet(full_pipe, base) -> None:  # noqa: F811
    unet = full_pipe.unet.config
    hidden = (full_pipe.text_encoder.config.hidden_size
              + full_pipe.text_encoder_2.config.hidden_size)
    assert hidden == unet.cross_attention_dim == 2048
    # text_time: 6 time ids of addition_time_embed_dim each, plus bigG's pooled projection.
    assert (6 * unet.addition_time_embed_dim + full_pipe.text_encoder_2.config.projection_dim
            == unet.projection_class_embeddings_input_dim)
    vae = full_pipe.vae.config
    assert full_pipe.vae_scale_factor == 8 and vae.latent_channels == unet.in_channels == 4
    assert vae.scaling_factor == SDXL_VAE_CONFIG["scaling_factor"] and vae.force_upcast
