"""The node pack's ``attn2`` patch (web.comfyui.attention) against idvault's regional
processor (generators.regional_attention) on random tensors, and its SDXL layer map
against diffusers' processor order.

ComfyUI is not installed. The patch is called as ComfyUI's ``BasicTransformerBlock``
calls an ``attn2`` replace patch: with ``to_q(x)``, ``to_k(context)``, ``to_v(context)``
of the block's own attention and ``extra_options``, and ``to_out`` applied to its result;
here those linears are a diffusers ``Attention`` module's, the same one the regional
processor runs, so both sides see the same weights.
"""

from __future__ import annotations

import pytest
import torch

from generators.layout import Box, Layout
from generators.regional_attention import (
    IdentityTokens,
    ImageGroup,
    RegionalAttention,
    RegionalConditioning,
)
from generators.standins.pipelines import TinySDXLConfig, build_tiny_sdxl_unet, sdxl_unet_config
from web.comfyui.attention import SDXL_LAYERS, Group, Identity, IdentityPatch

LATENT = (8, 16)
CROSS = TinySDXLConfig().cross_attention_dim
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"  # a /2 layer: 4 x 8 queries
A, B = "smiths/ana", "smiths/ben"
HALVES = Layout((A, B), (Box(0, 0, 0.5, 1), Box(0.5, 0, 1, 1)))
FULL = Layout((A,), (Box(0, 0, 1, 1),))


@pytest.fixture(scope="module")
def unet():
    return build_tiny_sdxl_unet()


def _random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _projections(regional, adapter, scale, seed):
    state = {k: _random(*v.shape, seed=seed + i) * 0.2 for i, (k, v) in enumerate(
        regional.image_projection_state_dict().items())}
    regional.load_image_projections(state, adapter=adapter, scale=scale)
    return state


def _both(unet, cond: RegionalConditioning, groups, tokens: torch.Tensor, index: int):
    """(regional processor output, ComfyUI-style patch output) for one layer.

    ``tokens``: (2, T, CROSS), row 0 the negative, row 1 the positive tokens; ComfyUI's
    batch order here is [uncond, cond] (``cond_or_uncond = [1, 0]``)."""
    attn = unet.get_submodule(LAYER)
    hidden = _random(2, 32, attn.to_q.in_features, seed=3)  # (batch, 4 x 8 queries, C)
    text = _random(2, 77, CROSS, seed=4)
    regional_proc = unet.attn_processors[LAYER + ".processor"]
    with torch.no_grad():
        regional_proc.state.conditioning = cond
        want = regional_proc(attn, hidden, encoder_hidden_states=torch.cat([text, tokens], 1))
        patch = IdentityPatch(index, tuple(groups))
        got = attn.to_out[0](patch(attn.to_q(hidden), attn.to_k(text), attn.to_v(text), {
            "n_heads": attn.heads, "cond_or_uncond": [1, 0],
            "original_shape": (2, 4, *LATENT), "sigmas": torch.tensor([5.0, 5.0])}))
    return want, got


def _group(state, index, scale, identities, start=10.0, end=0.0):
    return Group({index: (state[f"{index}.to_k_ip.weight"], state[f"{index}.to_v_ip.weight"])},
                 scale, start, end, tuple(identities))


def test_one_full_frame_identity_is_the_regional_and_official_formula(unet):
    with RegionalAttention(unet, image_tokens=True) as regional:
        index = regional.order.index(LAYER + ".processor")
        state = _projections(regional, "faceid", 0.7, seed=10)
        tokens = _random(2, 4, CROSS, seed=5)  # [negative, positive], 4 tokens each
        cond = RegionalConditioning(FULL, LATENT, (IdentityTokens(A, (), (0, 4)),),
                                    num_image_tokens=4,
                                    image_groups=(ImageGroup("faceid", (0, 4)),))
        ident = Identity(A, cond=tokens[1], uncond=tokens[0])
        want, got = _both(unet, cond, [_group(state, index, 0.7, [ident])], tokens, index)
        # The same operations in the same order on both sides (SDPA per branch, the scaled
        # image branch added, to_out); 1e-6 leaves room for a different summation order
        # of the head merge in float32 (values are O(1)).
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        # And it is the official decoupled formula: text + scale * SDPA(q, k_ip, v_ip).
        attn = unet.get_submodule(LAYER)
        text_only = IdentityPatch(index, ())
        assert not torch.allclose(got, attn.to_out[0](text_only(
            attn.to_q(_random(2, 32, attn.to_q.in_features, seed=3)),
            attn.to_k(_random(2, 77, CROSS, seed=4)), attn.to_v(_random(2, 77, CROSS, seed=4)),
            {"n_heads": attn.heads})), atol=1e-3)


def test_two_masked_identities_and_two_adapters_match_the_regional_processor(unet):
    """A and B share FaceID's softmax, each in its half; C is InstantID's, full frame."""
    with RegionalAttention(unet, image_tokens=True) as regional:
        index = regional.order.index(LAYER + ".processor")
        faceid = _projections(regional, "faceid", 1.0, seed=20)
        instant = _projections(regional, "instantid", 0.8, seed=40)
        layout = Layout((A, B, "smiths/cy"), (Box(0, 0, 0.5, 1), Box(0.5, 0, 1, 1),
                                              Box(0, 0, 1, 1)))
        cond = RegionalConditioning(
            layout, LATENT, (IdentityTokens(A, (), (0, 4)), IdentityTokens(B, (), (4, 8)),
                             IdentityTokens("smiths/cy", (), (8, 11))),
            num_image_tokens=11, image_groups=(ImageGroup("faceid", (0, 8)),
                                               ImageGroup("instantid", (8, 11))))
        masks = cond.masks_for(32)  # the regional masks at this layer: (4 x 8,) each
        tokens = _random(2, 11, CROSS, seed=6)
        ident = {name: Identity(name, tokens[1, s:e], tokens[0, s:e],
                                torch.from_numpy(masks[name]).reshape(4, 8))
                 for name, (s, e) in ((A, (0, 4)), (B, (4, 8)), ("smiths/cy", (8, 11)))}
        ident["smiths/cy"] = Identity("smiths/cy", tokens[1, 8:], tokens[0, 8:])  # no mask
        groups = [_group(faceid, index, 1.0, [ident[A], ident[B]]),
                  _group(instant, index, 0.8, [ident["smiths/cy"]])]
        want, got = _both(unet, cond, groups, tokens, index)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

        # Locality: B's tokens change nothing where B's mask is 0 (the left half).
        changed = tokens.clone()
        changed[:, 4:8] = _random(2, 4, CROSS, seed=77)
        ident_b = Identity(B, changed[1, 4:8], changed[0, 4:8], ident[B].mask)
        groups_b = [_group(faceid, index, 1.0, [ident[A], ident_b]), groups[1]]
        _, got_b = _both(unet, cond, groups_b, changed, index)
        outside = torch.from_numpy(masks[B] == 0)
        assert outside.any() and (~outside).any()
        assert torch.equal(got_b[:, outside], got[:, outside])
        assert not torch.allclose(got_b[:, ~outside], got[:, ~outside])


def test_schedule_and_chaining(unet):
    """Outside its sigma range an identity adds nothing; a second identity of the same
    adapter joins its softmax (with_group), another adapter's forms a new group."""
    attn = unet.get_submodule(LAYER)
    q = attn.to_q(_random(2, 32, attn.to_q.in_features, seed=3))
    k = attn.to_k(_random(2, 77, CROSS, seed=4))
    v = attn.to_v(_random(2, 77, CROSS, seed=4))
    w = (_random(attn.to_k.out_features, CROSS, seed=8), _random(attn.to_k.out_features,
                                                                    CROSS, seed=9))
    toks = _random(2, 4, CROSS, seed=5)
    late = Group({1: w}, 1.0, 3.0, 0.0, (Identity(A, toks[1], toks[0]),))  # sigma 3 -> 0
    opts = {"n_heads": attn.heads, "cond_or_uncond": [1, 0]}
    with torch.no_grad():
        text = IdentityPatch(1, ())(q, k, v, opts)
        early = IdentityPatch(1, (late,))(q, k, v, {**opts, "sigmas": torch.tensor([9.0])})
        assert torch.equal(early, text)
        inside = IdentityPatch(1, (late,))(q, k, v, {**opts, "sigmas": torch.tensor([2.0])})
        assert not torch.allclose(inside, text)
    other = Group({1: w}, 1.0, 3.0, 0.0, (Identity(B, toks[0], toks[1]),))
    joined = IdentityPatch(1, (late,)).with_group(other)
    assert len(joined.groups) == 1 and [i.handle for i in joined.groups[0].identities] == [A, B]
    separate = IdentityPatch(1, (late,)).with_group(
        Group({1: w}, 0.5, 3.0, 0.0, (Identity(B, toks[0], toks[1]),)))
    assert len(separate.groups) == 2


def test_sdxl_layer_map_follows_diffusers_processor_order():
    """SDXL_LAYERS against the processors of an SDXL-structured UNet (the full model's
    blocks and transformer depths, tiny widths, on the meta device)."""
    from diffusers import UNet2DConditionModel

    cfg = TinySDXLConfig(block_out_channels=(16, 32, 64), transformer_layers_per_block=(1, 2, 10),
                         attention_head_dim=(2, 4, 8))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_unet_config(cfg))
    names = list(unet.attn_processors)
    cross = [(i, n) for i, n in enumerate(names) if ".attn2." in n]
    assert len(cross) == len(SDXL_LAYERS) == 70
    for layer, (index, name) in zip(SDXL_LAYERS, cross, strict=True):
        assert layer.processor == index, (layer, name)
        parts = name.split(".")
        if layer.block == "input":
            # ComfyUI's input_blocks: 0 is conv_in, then 3 per level (2 resnets + down).
            assert parts[0] == "down_blocks"
            assert layer.number == 3 * int(parts[1]) + int(parts[3]) + 1
        elif layer.block == "output":
            assert parts[0] == "up_blocks"
            assert layer.number == 3 * int(parts[1]) + int(parts[3])
        else:
            assert parts[0] == "mid_block"
        assert layer.index == int(parts[parts.index("transformer_blocks") + 1])
        assert layer.path.endswith(f"transformer_blocks.{layer.index}.attn2")


def test_projected_tokens_live_only_as_long_as_the_patched_model(unet):
    """The one cache of the pack: each group's tokens through to_k_ip / to_v_ip, kept on
    the group so the steps do not recompute them. It goes with the patched model."""
    import gc
    import weakref

    from tests.web.comfyui.test_apply import FakeModelPatcher
    from web.comfyui.attention import apply_identity

    attn = unet.get_submodule(LAYER)
    w = {layer.processor: (_random(attn.to_k.out_features, CROSS, seed=8),
                           _random(attn.to_k.out_features, CROSS, seed=9))
         for layer in SDXL_LAYERS}
    toks = _random(2, 4, CROSS, seed=5)
    model = FakeModelPatcher()
    work = apply_identity(model, Group(w, 1.0, 99.0, 0.0, (Identity(A, toks[1], toks[0]),)))
    patch = work.patches()[("input", 4, 0)]
    opts = {"n_heads": attn.heads, "cond_or_uncond": [1, 0]}
    q = attn.to_q(_random(2, 32, attn.to_q.in_features, seed=3))
    k = attn.to_k(_random(2, 77, CROSS, seed=4))
    with torch.no_grad():
        first = patch(q, k, k, opts)
        assert len(patch.groups[0]._kv) == 1
        assert torch.equal(patch(q, k, k, opts), first)  # the cached projections: same result
    group = weakref.ref(patch.groups[0])
    del work, patch
    gc.collect()
    assert group() is None  # dropped with the model; the input model never held it
    assert model.patches() == {}
