"""Regional identity cross-attention (generators.regional_attention) on a tiny SDXL UNet.

The UNet has SDXL's block structure with tiny widths and random, seed-fixed
weights (generators.standins.pipelines). Latents are 8x16 (a 64x128 px image), so
SDXL's cross-attention runs at 4x8 (/2) and 2x4 (/4), and the non-square
aspect checks that processors recover each layer's grid from its length.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from generators.layout import Box, Layout, MaskConfig, auto_layout
from generators.regional_attention import (
    DEFAULT_ADAPTER,
    IdentityTokens,
    ImageGroup,
    RegionalAttention,
    RegionalConditioning,
    RegionalConfig,
    cfg_text_rows,
)
from generators.standins.pipelines import TinySDXLConfig, build_tiny_sdxl, build_tiny_sdxl_unet
from vault.errors import InvalidInput

LATENT = (8, 16)
CROSS = TinySDXLConfig().cross_attention_dim  # 64: the tiny "2048"
FIRST_ATTN2 = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
A, B = "smiths/ana", "smiths/ben"
# Disjoint halves: A's mask is exactly 0 on the right half, B's on the left.
HALVES = Layout((A, B), (Box(0, 0, 0.5, 1), Box(0.5, 0, 1, 1)))
A_TEXT, B_TEXT = (4, 5), (8,)  # text-fused token positions (PhotoMaker style)
BG, A_IMG, B_IMG = (0, 3), (3, 7), (7, 11)  # StoryMaker style: background block first


@pytest.fixture(scope="module")
def unet():
    return build_tiny_sdxl_unet()


@pytest.fixture(scope="module")
def regional(unet):
    ra = RegionalAttention(unet, image_tokens=True, image_scale=0.8)
    # Random image projections (not the to_k/to_v copies they start as), so a
    # test cannot pass by confusing the two.
    g = torch.Generator().manual_seed(7)
    ra.load_image_projections({k: torch.randn(v.shape, generator=g) * 0.2
                               for k, v in ra.image_projection_state_dict().items()})
    return ra


def _attn(unet, name: str = FIRST_ATTN2):
    return unet.get_submodule(name)


def _hidden(attn, q_len: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, q_len, attn.to_q.in_features, generator=g)  # (batch, q, C)


def _ehs(n_img: int = 0, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77 + n_img, CROSS, generator=g)  # (batch, 77 + img, cross)


def _replace(ehs: torch.Tensor, positions, seed: int = 99) -> torch.Tensor:
    """A copy with the tokens at ``positions`` (absolute) replaced by other values."""
    out = ehs.clone()
    g = torch.Generator().manual_seed(seed)
    idx = list(positions)
    out[:, idx] = torch.randn(out[:, idx].shape, generator=g)
    return out


def _run(proc, attn, hidden, ehs):
    with torch.no_grad():
        return proc(attn, hidden, encoder_hidden_states=ehs)


def _two(text=True, image=True, bg=True, config=None, layout=HALVES,
         text_rows=None) -> RegionalConditioning:
    n_img = (B_IMG[1] if image else 0)
    ids = (IdentityTokens(A, A_TEXT if text else (), A_IMG if image else None),
           IdentityTokens(B, B_TEXT if text else (), B_IMG if image else None))
    if image and not bg:  # shift the identity ranges down: no background block
        ids = (IdentityTokens(A, ids[0].text_positions, (0, 4)),
               IdentityTokens(B, ids[1].text_positions, (4, 8)))
        n_img = 8
    return RegionalConditioning(layout, LATENT, ids, num_image_tokens=n_img,
                                global_image_tokens=BG if image and bg else None,
                                text_rows=text_rows, config=config or RegionalConfig())


# -- equivalence ---------------------------------------------------------------------
def test_one_identity_full_frame_equals_diffusers_default(unet, regional) -> None:
    attn = _attn(unet)
    hidden, ehs = _hidden(attn, 32), _ehs()
    full = Layout((A,), (Box(0, 0, 1, 1),))
    for mode in ("hard", "soft"):
        regional.conditioning = RegionalConditioning(
            full, LATENT, (IdentityTokens(A, A_TEXT),), config=RegionalConfig(text_mask=mode))
        got = _run(regional.processors[FIRST_ATTN2 + ".processor"], attn, hidden, ehs)
        want = _run(AttnProcessor2_0(), attn, hidden, ehs)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def _decoupled_reference(attn, proc, hidden, ehs, scale):
    """The official decoupled cross-attention, written out (StoryMaker / IP-Adapter)."""
    b, heads = hidden.shape[0], attn.heads
    text, image = ehs[:, :77], ehs[:, 77:]

    def split(x):  # (b, n, inner) -> (b, heads, n, d)
        return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    q = split(attn.to_q(hidden))
    out = F.scaled_dot_product_attention(q, split(attn.to_k(text)), split(attn.to_v(text)))
    ip = F.scaled_dot_product_attention(q, split(proc.to_k_ip(image)), split(proc.to_v_ip(image)))
    out = (out + scale * ip).transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
    return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("with_bg", [True, False])
def test_one_identity_full_frame_with_image_tokens_equals_decoupled_formula(
        unet, regional, with_bg) -> None:
    attn = _attn(unet)
    proc = regional.processors[FIRST_ATTN2 + ".processor"]
    hidden = _hidden(attn, 32)
    full = Layout((A,), (Box(0, 0, 1, 1),))
    if with_bg:  # StoryMaker: bg block + one character, one joint softmax over both
        cond = RegionalConditioning(full, LATENT, (IdentityTokens(A, A_TEXT, (3, 7)),),
                                    num_image_tokens=7, global_image_tokens=(0, 3))
        ehs = _ehs(7)
    else:  # IP-Adapter style: the identity's tokens only
        cond = RegionalConditioning(full, LATENT, (IdentityTokens(A, (), (0, 4)),),
                                    num_image_tokens=4)
        ehs = _ehs(4)
    regional.conditioning = cond
    got = _run(proc, attn, hidden, ehs)
    with torch.no_grad():
        want = _decoupled_reference(attn, proc, hidden, ehs, 0.8)
        text_only = _run(AttnProcessor2_0(), attn, hidden, ehs[:, :77])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - text_only).abs().max() > 1e-3  # the image branch contributes


# -- locality at the processor ---------------------------------------------------------
CASES = {
    "text-fused, hard": {"text": True, "image": False},
    "text-fused, soft": {"text": True, "image": False,
                         "config": RegionalConfig(text_mask="soft")},
    "image tokens + bg, soft": {"text": False, "image": True},
    "image tokens + bg, hard": {"text": False, "image": True,
                                "config": RegionalConfig(image_mask="hard")},
    "image tokens, no bg": {"text": False, "image": True, "bg": False},
    "both": {"text": True, "image": True},
}


def _a_positions(cond: RegionalConditioning) -> list[int]:
    a = cond.identities[0]
    pos = list(a.text_positions)
    if a.image_tokens:
        pos += [77 + i for i in range(*a.image_tokens)]
    return pos


@pytest.mark.parametrize("case", list(CASES))
def test_replacing_a_tokens_changes_nothing_outside_a_mask(unet, regional, case) -> None:
    attn = _attn(unet)
    proc = regional.processors[FIRST_ATTN2 + ".processor"]
    cond = _two(**CASES[case])
    regional.conditioning = cond
    hidden = _hidden(attn, 32)
    ehs = _ehs(cond.num_image_tokens)
    before = _run(proc, attn, hidden, ehs)
    after = _run(proc, attn, hidden, _replace(ehs, _a_positions(cond)))
    mask_a = torch.from_numpy(cond.masks_for(32)[A])
    outside, inside = mask_a == 0, mask_a > 0
    assert outside.sum() == 16 and inside.sum() == 16  # left / right half of a 4x8 grid
    assert torch.isfinite(before).all() and torch.isfinite(after).all()
    torch.testing.assert_close(after[:, outside], before[:, outside], atol=1e-6, rtol=0)
    change = (after - before).abs().amax(dim=(0, 2))  # per query position
    assert (change[inside] > 1e-5).all(), change


def test_scene_and_background_tokens_still_reach_every_pixel(unet, regional) -> None:
    attn = _attn(unet)
    proc = regional.processors[FIRST_ATTN2 + ".processor"]
    cond = _two(text=True, image=True)
    regional.conditioning = cond
    hidden = _hidden(attn, 32)
    ehs = _ehs(cond.num_image_tokens)
    before = _run(proc, attn, hidden, ehs)
    for positions in ([1, 2, 3], [77 + i for i in range(*BG)]):  # scene words; bg block
        change = (_run(proc, attn, hidden, _replace(ehs, positions)) - before).abs().amax((0, 2))
        assert (change > 1e-5).all(), positions


def test_no_bg_pixels_outside_every_region_get_text_only(unet, regional) -> None:
    """Without global image tokens, uncovered pixels attend to no image token, exactly."""
    attn = _attn(unet)
    proc = regional.processors[FIRST_ATTN2 + ".processor"]
    gap = Layout((A, B), (Box(0, 0, 0.3, 1), Box(0.7, 0, 1, 1)))
    cond = _two(text=False, image=True, bg=False, layout=gap)
    regional.conditioning = cond
    hidden = _hidden(attn, 32)
    ehs = _ehs(cond.num_image_tokens)
    got = _run(proc, attn, hidden, ehs)
    text_only = _run(AttnProcessor2_0(), attn, hidden, ehs[:, :77])
    masks = cond.masks_for(32)
    uncovered = torch.from_numpy((masks[A] == 0) & (masks[B] == 0))
    assert uncovered.sum() == 16  # the middle four columns of the 4x8 grid
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, uncovered], text_only[:, uncovered], atol=1e-6, rtol=0)
    assert (got[:, ~uncovered] - text_only[:, ~uncovered]).abs().max() > 1e-3


def test_cfg_negative_rows_are_not_masked(unet, regional) -> None:
    attn = _attn(unet)
    proc = regional.processors[FIRST_ATTN2 + ".processor"]
    regional.conditioning = _two(text=True, image=False, text_rows=cfg_text_rows(1))
    hidden, ehs = _hidden(attn, 32), _ehs()
    got = _run(proc, attn, hidden, ehs)
    plain = _run(AttnProcessor2_0(), attn, hidden, ehs)
    torch.testing.assert_close(got[0], plain[0], atol=1e-6, rtol=0)  # negative prompt row
    assert (got[1] - plain[1]).abs().max() > 1e-4  # the identity row is regional
    regional.conditioning = _two(text=True, image=False, text_rows=(False, True, True))
    with pytest.raises(InvalidInput, match="text_rows has 3 rows"):
        _run(proc, attn, hidden, ehs)


# -- locality through a full UNet forward ---------------------------------------------------
def _unet_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(batch, 4, *LATENT, generator=g)
    added = {"text_embeds": torch.randn(batch, TinySDXLConfig().projection_dim_2, generator=g),
             "time_ids": torch.tensor([[64.0, 128, 0, 0, 64, 128]] * batch)}
    return latents, added


def test_unet_forward_first_cross_attention_is_local(unet, regional) -> None:
    cond = _two(text=True, image=True)
    ehs = _ehs(cond.num_image_tokens)
    latents, added = _unet_inputs()
    outputs = []
    hook = _attn(unet).register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    try:
        with regional, torch.no_grad():
            regional.conditioning = cond
            for e in (ehs, _replace(ehs, _a_positions(cond))):
                unet(latents, 500, encoder_hidden_states=e, added_cond_kwargs=added)
    finally:
        hook.remove()
    before, after = outputs
    mask_a = torch.from_numpy(cond.masks_for(before.shape[1])[A])
    torch.testing.assert_close(after[:, mask_a == 0], before[:, mask_a == 0], atol=1e-6, rtol=0)
    assert ((after - before).abs().amax((0, 2))[mask_a > 0] > 1e-5).all()


def test_every_cross_attention_layer_is_local(unet, regional) -> None:
    """Capture each attn2's real input in a UNet forward; replay it with A's tokens replaced."""
    cond = _two(text=True, image=True)
    ehs = _ehs(cond.num_image_tokens)
    other = _replace(ehs, _a_positions(cond))
    latents, added = _unet_inputs()
    inputs: dict[str, torch.Tensor] = {}
    hooks = [_attn(unet, n.removesuffix(".processor")).register_forward_pre_hook(
        lambda m, args, n=n: inputs.setdefault(n, args[0].detach()))
        for n in regional.processors]
    try:
        with regional, torch.no_grad():
            regional.conditioning = cond
            unet(latents, 500, encoder_hidden_states=ehs, added_cond_kwargs=added)
            assert set(inputs) == set(regional.processors)
            grids = set()
            for name, hidden in inputs.items():
                attn = _attn(unet, name.removesuffix(".processor"))
                proc = regional.processors[name]
                before, after = _run(proc, attn, hidden, ehs), _run(proc, attn, hidden, other)
                factor, h, w = cond.grid(hidden.shape[1])
                grids.add((factor, h, w))
                mask_a = torch.from_numpy(cond.masks_for(hidden.shape[1])[A])
                torch.testing.assert_close(after[:, mask_a == 0], before[:, mask_a == 0],
                                           atol=1e-6, rtol=0, msg=name)
                assert ((after - before).abs().amax((0, 2))[mask_a > 0] > 1e-6).all(), name
    finally:
        for h in hooks:
            h.remove()
    assert grids == {(2, 4, 8), (4, 2, 4)}  # both SDXL cross-attention resolutions


# -- install / remove ---------------------------------------------------------------------
def test_install_replaces_only_cross_attention_and_remove_restores_the_objects(unet) -> None:
    latents, added = _unet_inputs()
    ehs = _ehs()
    original = dict(unet.attn_processors)
    with torch.no_grad():
        base = unet(latents, 500, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
    ra = RegionalAttention(unet)
    ra.install()
    try:
        now = unet.attn_processors
        for name, proc in now.items():
            if name.endswith("attn2.processor"):
                assert proc is ra.processors[name]
            else:
                assert proc is original[name]
        with pytest.raises(InvalidInput, match="already installed"):
            ra.install()
        with torch.no_grad():  # no conditioning: every layer delegates to its original
            same = unet(latents, 500, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
        assert torch.equal(same, base)
    finally:
        ra.remove()
    assert all(unet.attn_processors[n] is p for n, p in original.items())
    assert not any("to_k_ip" in k for k in unet.state_dict())
    with torch.no_grad():
        after = unet(latents, 500, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
    assert torch.equal(after, base)
    ra.remove()  # idempotent


def test_install_refuses_a_unet_whose_cross_attention_was_replaced(unet) -> None:
    import copy

    ra = RegionalAttention(unet)
    path = next(iter(ra.processors)).removesuffix(".processor")
    parent_path, _, last = path.rpartition(".")
    parent = unet.get_submodule(parent_path)
    original = getattr(parent, last)
    setattr(parent, last, copy.deepcopy(original))  # e.g. a wrapper swapped in by a tool
    try:
        with pytest.raises(InvalidInput, match="changed since RegionalAttention was created"):
            ra.install()
        assert not ra.installed
    finally:
        setattr(parent, last, original)
    with ra:
        assert unet.get_submodule(path).processor is ra.processors[f"{path}.processor"]


def test_image_projections_survive_reinstall_and_load_strictly(unet) -> None:
    ra = RegionalAttention(unet, image_tokens=True)
    sd = ra.image_projection_state_dict()
    order = list(unet.attn_processors)
    indices = sorted({int(k.split(".")[0]) for k in sd})
    assert all(i % 2 == 1 and order[i].endswith("attn2.processor") for i in indices)
    assert len(indices) == len(ra.processors)
    new = {k: torch.full_like(v, 0.5) for k, v in sd.items()}
    ra.load_image_projections({**new, "1.to_q_lora.down.weight": torch.zeros(2)})  # LoRA skipped
    with ra:
        # Under the adapter's name (DEFAULT_ADAPTER for image_tokens=True).
        assert any(k.endswith("attn2.processor.adapters.default.to_k_ip.weight")
                   for k in unet.state_dict())
    with ra:
        assert (ra.processors[order[indices[0]]].to_k_ip.weight == 0.5).all()
    first = f"{indices[0]}.to_k_ip.weight"
    with pytest.raises(InvalidInput, match=f"missing key {first}"):
        ra.load_image_projections({k: v for k, v in new.items() if k != first})
    with pytest.raises(InvalidInput, match="shape"):
        ra.load_image_projections({**new, first: torch.zeros(3, 3)})
    with pytest.raises(InvalidInput, match="unexpected key 0.to_k_ip.weight"):
        ra.load_image_projections({**new, "0.to_k_ip.weight": new[first]})


def test_image_projections_are_computed_once_per_sequence(unet, regional) -> None:
    """The image tokens' key/value projections are reused across steps while the sequence
    and the projection weights are unchanged, and recomputed whenever either changes."""
    attn = _attn(unet)
    proc = regional.processors[FIRST_ATTN2 + ".processor"]
    cond = _two(text=False, image=True)
    hidden, ehs = _hidden(attn, 32), _ehs(cond.num_image_tokens)
    calls: list[int] = []
    projection = proc.to_k_ip.forward
    proc.to_k_ip.forward = lambda x: (calls.append(1), projection(x))[1]  # no hook: a spy
    try:
        with regional:
            regional.conditioning = cond
            first = _run(proc, attn, hidden, ehs)
            again = _run(proc, attn, hidden, ehs)  # the next step: same sequence
            assert len(calls) == 1
            torch.testing.assert_close(again, first, rtol=0, atol=0)
            copy = ehs.clone()  # equal values, another tensor: not trusted
            torch.testing.assert_close(_run(proc, attn, hidden, copy), first, rtol=0, atol=0)
            assert len(calls) == 2
            ehs[:, 77:] += 0.5  # changed in place: recomputed
            changed = _run(proc, attn, hidden, ehs)
            assert len(calls) == 3 and (changed - first).abs().max() > 1e-3
            regional.state.image_kv.clear()
            torch.testing.assert_close(_run(proc, attn, hidden, ehs), changed, rtol=0, atol=0)
            assert len(calls) == 4
            with torch.no_grad():
                proc.to_v_ip.weight.mul_(1.0)  # a weight written in place: recomputed
            _run(proc, attn, hidden, ehs)
            assert len(calls) == 5
            assert regional.state.image_kv
        assert not regional.state.image_kv  # nothing outlives the installation
    finally:
        del proc.to_k_ip.forward


def test_pipeline_runs_with_regional_attention_and_is_reusable() -> None:
    pipe = build_tiny_sdxl()

    def generate():
        return pipe("a girl and a man hiking in the alps", num_inference_steps=2, height=64,
                    width=128, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    base = generate()
    ra = RegionalAttention(pipe.unet)
    with ra:
        # "girl" (position 2) acts on the left strip, "man" (5) on the right.
        ra.conditioning = RegionalConditioning(
            auto_layout((A, B)), LATENT, (IdentityTokens(A, (2,)), IdentityTokens(B, (5,))),
            text_rows=cfg_text_rows(1), config=RegionalConfig(masks=MaskConfig(feather=0.1)))
        regional_image = generate()
    assert regional_image.shape == base.shape == (1, 64, 128, 3)
    assert abs(regional_image - base).max() > 1e-4
    assert (generate() == base).all()  # removed: the pipeline is as before


# -- several image-token adapters ---------------------------------------------------------------
# Adapter "story" (StoryMaker style): a bg block and A's tokens; adapter "face" (IP-Adapter
# style): B's tokens, no global block. One sequence: 77 text + [bg, A | B].
S_BG, S_A, F_B = (0, 3), (3, 7), (7, 11)
STORY, FACE = ImageGroup("story", (0, 7), S_BG), ImageGroup("face", (7, 11))
OVERLAP = Layout((A, B), (Box(0, 0, 0.75, 1), Box(0.25, 0, 1, 1)))


@pytest.fixture(scope="module")
def adapters(unet):
    """One RegionalAttention with two adapters: different random projections and scales."""
    ra = RegionalAttention(unet)
    g = torch.Generator().manual_seed(11)
    shapes = RegionalAttention(unet, image_tokens=True).image_projection_state_dict()
    weights = {}
    for name, scale in (("story", 0.8), ("face", 0.6)):
        weights[name] = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in shapes.items()}
        ra.load_image_projections(weights[name], adapter=name, scale=scale)
    return ra, weights


def _mixed(layout=HALVES, text=True) -> RegionalConditioning:
    ids = (IdentityTokens(A, A_TEXT if text else (), S_A),
           IdentityTokens(B, B_TEXT if text else (), F_B))
    return RegionalConditioning(layout, LATENT, ids, num_image_tokens=11,
                                image_groups=(STORY, FACE))


def test_two_full_frame_adapters_equal_the_multi_adapter_formula(unet, adapters) -> None:
    """Every mask full frame: ``text + 0.8 * SDPA(q, K_story, V_story) + 0.6 * SDPA(q, K_face,
    V_face)``, each adapter with its own weights and softmax (diffusers' multi-IP-Adapter
    ``IPAdapterAttnProcessor2_0``, here written out from the loaded tensors)."""
    ra, weights = adapters
    full = Layout((A, B), (Box(0, 0, 1, 1), Box(0, 0, 1, 1)))
    ra.conditioning = _mixed(full, text=False)
    for name in (FIRST_ATTN2, "up_blocks.0.attentions.0.transformer_blocks.1.attn2"):
        attn = _attn(unet, name)
        index = ra.order.index(name + ".processor")
        hidden, ehs = _hidden(attn, 32 if name == FIRST_ATTN2 else 8), _ehs(11)
        b, heads = hidden.shape[0], attn.heads

        def split(x):  # (b, n, inner) -> (b, heads, n, d)
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        with torch.no_grad():
            got = _run(ra.processors[name + ".processor"], attn, hidden, ehs)
            q = split(attn.to_q(hidden))
            out = F.scaled_dot_product_attention(q, split(attn.to_k(ehs[:, :77])),
                                                 split(attn.to_v(ehs[:, :77])))
            for adapter, scale, (start, stop) in (("story", 0.8, (77, 84)),
                                                  ("face", 0.6, (84, 88))):
                w = weights[adapter]
                img = ehs[:, start:stop]
                out = out + scale * F.scaled_dot_product_attention(
                    q, split(F.linear(img, w[f"{index}.to_k_ip.weight"])),
                    split(F.linear(img, w[f"{index}.to_v_ip.weight"])))
            want = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, -1, out.shape[1]
                                                                              * out.shape[-1])))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=name)


def test_two_adapters_are_the_sum_of_each_alone(unet, adapters) -> None:
    """``to_out(text + s_story * story + s_face * gate_face * face)``: equal to the two
    single-adapter outputs minus the text-only one (``to_out`` is affine)."""
    ra, _ = adapters
    attn = _attn(unet)
    proc = ra.processors[FIRST_ATTN2 + ".processor"]
    hidden, ehs = _hidden(attn, 32), _ehs(11)
    for layout in (HALVES, OVERLAP):
        text_ids = (IdentityTokens(A, A_TEXT), IdentityTokens(B, B_TEXT))
        ra.conditioning = _mixed(layout)
        both = _run(proc, attn, hidden, ehs)
        ra.conditioning = RegionalConditioning(  # the story adapter alone: 77 + 7 tokens
            layout, LATENT, (IdentityTokens(A, A_TEXT, S_A), text_ids[1]), num_image_tokens=7,
            image_groups=(STORY,))
        story = _run(proc, attn, hidden, ehs[:, :84])
        ra.conditioning = RegionalConditioning(  # the face adapter alone: 77 + 4 tokens
            layout, LATENT, (text_ids[0], IdentityTokens(B, B_TEXT, (0, 4))), num_image_tokens=4,
            image_groups=(ImageGroup("face", (0, 4)),))
        face = _run(proc, attn, hidden, torch.cat([ehs[:, :77], ehs[:, 84:]], 1))
        ra.conditioning = RegionalConditioning(layout, LATENT, text_ids)
        text_only = _run(proc, attn, hidden, ehs[:, :77])
        # Different sums of the same O(1) float32 terms: a few ulps apart.
        torch.testing.assert_close(both, story + face - text_only, atol=1e-5, rtol=0)
        assert (story - text_only).abs().max() > 1e-3 and (face - text_only).abs().max() > 1e-3
    # The face adapter has no global tokens: outside B's mask its branch is gated off, so
    # there the output is the story adapter's alone (HALVES: B covers the right half).
    ra.conditioning = _mixed(HALVES)
    both = _run(proc, attn, hidden, ehs)
    ra.conditioning = RegionalConditioning(
        HALVES, LATENT, (IdentityTokens(A, A_TEXT, S_A), IdentityTokens(B, B_TEXT)),
        num_image_tokens=7, image_groups=(STORY,))
    story = _run(proc, attn, hidden, ehs[:, :84])
    outside_b = torch.from_numpy(_mixed(HALVES).masks_for(32)[B] == 0)
    torch.testing.assert_close(both[:, outside_b], story[:, outside_b], atol=1e-6, rtol=0)


def test_each_adapters_identity_is_local_and_leaves_the_other_adapter_alone(
        unet, adapters) -> None:
    ra, _ = adapters
    attn = _attn(unet)
    proc = ra.processors[FIRST_ATTN2 + ".processor"]
    hidden, ehs = _hidden(attn, 32), _ehs(11)
    for layout in (HALVES, OVERLAP):
        cond = _mixed(layout, text=False)
        ra.conditioning = cond
        before = _run(proc, attn, hidden, ehs)
        masks = cond.masks_for(32)
        for name, tokens in ((A, S_A), (B, F_B)):
            after = _run(proc, attn, hidden, _replace(ehs, [77 + i for i in range(*tokens)]))
            inside = torch.from_numpy(masks[name] > 0)
            assert 0 < inside.sum() < 32
            torch.testing.assert_close(after[:, ~inside], before[:, ~inside], atol=1e-6, rtol=0)
            assert ((after - before).abs().amax((0, 2))[inside] > 1e-5).all(), name
    # Where both masks cover a pixel, B's tokens still do not enter the story adapter's
    # softmax (one joint softmax would renormalise A's weights there): with the face
    # adapter's scale at 0, replacing B's tokens changes nothing, bit for bit.
    ra.conditioning = _mixed(OVERLAP, text=False)
    ra.set_scale("face", 0.0)
    try:
        before = _run(proc, attn, hidden, ehs)
        after = _run(proc, attn, hidden, _replace(ehs, [77 + i for i in range(*F_B)]))
    finally:
        ra.set_scale("face", 0.6)
    assert torch.equal(after, before)


def test_adapter_weights_are_the_loaded_tensors_and_survive_install_cycles(
        unet, adapters) -> None:
    ra, weights = adapters
    latents, added = _unet_inputs()
    ehs = _ehs(11)
    original = dict(unet.attn_processors)
    with torch.no_grad():
        base = unet(latents, 500, encoder_hidden_states=ehs[:, :77],
                    added_cond_kwargs=added).sample
    assert ra.adapters == ("story", "face")
    assert ra.state.scales == {DEFAULT_ADAPTER: 1.0, "story": 0.8, "face": 0.6}
    for name in ra.adapters:  # one copy: the processors refer to the loaded tensors
        for key, t in ra.image_projection_state_dict(name).items():
            assert t.data_ptr() == weights[name][key].data_ptr(), key
    params = {n: list(p.parameters()) for n, p in ra.processors.items()}
    for _ in range(2):
        with ra, torch.no_grad():
            keys = [k for k in unet.state_dict() if "_ip." in k]
            assert len(keys) == 2 * 2 * len(ra.processors)  # k and v, two adapters
            assert {k.split(".adapters.")[1].split(".")[0] for k in keys} == {"story", "face"}
            ra.conditioning = _mixed()
            out = unet(latents, 500, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
            assert (out - base).abs().max() > 1e-4
            assert ra.state.image_kv  # the image tokens' projections of this installation
        assert all(unet.attn_processors[n] is p for n, p in original.items())
        assert not any("_ip." in k for k in unet.state_dict())
        assert ra.conditioning is None and not ra.state.image_kv
        with torch.no_grad():
            after = unet(latents, 500, encoder_hidden_states=ehs[:, :77],
                         added_cond_kwargs=added).sample
        assert torch.equal(after, base)
        assert all(a is b for n, p in ra.processors.items()
                   for a, b in zip(p.parameters(), params[n], strict=True))
    # Loading an adapter again replaces its tensors (still by reference), strictly.
    new = {k: v * 2 for k, v in weights["face"].items()}
    ra.load_image_projections(new, adapter="face")
    try:
        assert ra.state.scales["face"] == 0.6  # kept
        assert all(t.data_ptr() == new[k].data_ptr()
                   for k, t in ra.image_projection_state_dict("face").items())
        first = next(iter(new))
        with pytest.raises(InvalidInput, match=f"projections of face do not fit.*missing key "
                                               f"{first}"):
            ra.load_image_projections({k: v for k, v in new.items() if k != first},
                                      adapter="face")
    finally:
        ra.load_image_projections(weights["face"], adapter="face")
    with pytest.raises(InvalidInput, match="without dots"):
        ra.load_image_projections(new, adapter="a.b")
    with pytest.raises(InvalidInput, match="no image projections are loaded for adapter"):
        ra.image_projection_state_dict("instantid")


def test_full_size_sdxl_holds_one_copy_of_each_adapters_projections() -> None:
    """On the full SDXL UNet (meta device, from base_models.json): two adapters loaded from
    StoryMaker's manifest layout each hold exactly the 140 given tensors (70 cross-attention
    layers; 340,787,200 parameters, 0.68 GB in float16), no copies."""
    from diffusers import UNet2DConditionModel

    from tests.generators.test_lora_loading import _manifest

    with torch.device("meta"):
        full = UNet2DConditionModel(**_manifest("base_models.json")["sdxl_unet_config"])
    ra = RegionalAttention(full)
    assert len(ra.processors) == 70 and ra.adapters == ()
    shapes = {k: tuple(v) for k, v in _manifest("storymaker_ip_adapter.json")["tensors"].items()}
    loaded = {}
    for name in ("storymaker", "faceid"):
        loaded[name] = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
        ra.load_image_projections(loaded[name], adapter=name)  # LoRA keys skipped
    assert ra.adapters == ("storymaker", "faceid")
    for name, given in loaded.items():
        held = ra.image_projection_state_dict(name)
        assert set(held) == {k for k in shapes if "_ip." in k} and len(held) == 140
        assert sum(t.numel() for t in held.values()) == 340_787_200
        assert all(t.untyped_storage()._cdata == given[k].untyped_storage()._cdata
                   for k, t in held.items())  # the given tensors' storage
    params = [p for proc in ra.processors.values() for p in proc.parameters()]
    assert len(params) == 2 * 140  # nothing else is held


def test_an_adapter_without_projections_is_refused(unet, adapters) -> None:
    ra, _ = adapters
    attn = _attn(unet)
    ra.conditioning = RegionalConditioning(
        HALVES, LATENT, (IdentityTokens(A, (), (0, 4)), IdentityTokens(B)), num_image_tokens=4,
        image_groups=(ImageGroup("instantid", (0, 4)),))
    with pytest.raises(InvalidInput, match="adapter 'instantid'.*no image projections"):
        _run(ra.processors[FIRST_ATTN2 + ".processor"], attn, _hidden(attn, 32), _ehs(4))


@pytest.mark.parametrize("groups, ids, extra, message", [
    ((ImageGroup("a", (0, 4)), ImageGroup("a", (4, 8))), ((0, 4), (4, 8)), {},
     "one image group"),
    ((ImageGroup("a", (0, 5)), ImageGroup("b", (4, 8))), ((0, 4), (5, 8)), {},
     "exactly once"),
    ((ImageGroup("a", (0, 3)), ImageGroup("b", (4, 8))), ((0, 3), (4, 8)), {}, "exactly once"),
    ((ImageGroup("a", (0, 4), (3, 5)), ImageGroup("b", (4, 8))), ((0, 3), (5, 8)), {},
     "not inside its group"),
    ((ImageGroup("a", (0, 4)), ImageGroup("b", (4, 8))), ((0, 2), (2, 8)), {},
     "not inside one adapter's group"),
    ((ImageGroup("a", (0, 4)), ImageGroup("b", (4, 8))), ((0, 4), (4, 8)),
     {"global_image_tokens": (0, 1)}, "given per group"),
    ((ImageGroup("a", (0, 4)), ImageGroup("b", (4, 9))), ((0, 4), (4, 8)), {}, "not inside"),
])
def test_image_group_validation(groups, ids, extra, message) -> None:
    with pytest.raises(InvalidInput, match=message):
        RegionalConditioning(HALVES, LATENT, (IdentityTokens(A, (), ids[0]),
                                              IdentityTokens(B, (), ids[1])),
                             num_image_tokens=8, image_groups=groups, **extra)


def test_without_groups_the_image_tokens_are_one_default_group() -> None:
    cond = _two(text=False, image=True)
    assert cond.groups == (ImageGroup(DEFAULT_ADAPTER, (0, 11), BG),)
    assert RegionalConditioning(HALVES, LATENT, ()).groups == ()
    with pytest.raises(InvalidInput, match="without dots"):
        ImageGroup("", (0, 1))


# -- validation -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    ({"identities": (IdentityTokens(A, (0,)),)}, "begin-of-text"),
    ({"identities": (IdentityTokens(A, (77,)),)}, "outside 1..76"),
    ({"identities": (IdentityTokens(A, (3,)), IdentityTokens(B, (3,)))}, "claimed by"),
    ({"identities": (IdentityTokens("x/y", (3,)),)}, "no box for"),
    ({"identities": (IdentityTokens(A, (), (0, 4)),), "num_image_tokens": 6},
     "belong to no identity"),
    ({"identities": (IdentityTokens(A, (), (0, 4)),), "num_image_tokens": 6,
      "global_image_tokens": (3, 6)}, "overlap"),
    ({"identities": (IdentityTokens(A, (), (2, 9)),), "num_image_tokens": 6}, "not inside"),
])
def test_conditioning_validation(kwargs, message) -> None:
    with pytest.raises(InvalidInput, match=message):
        RegionalConditioning(HALVES, LATENT, **kwargs)


def test_mismatched_sequences_are_refused(unet, regional) -> None:
    attn = _attn(unet)
    proc = regional.processors[FIRST_ATTN2 + ".processor"]
    regional.conditioning = _two(text=False, image=True)
    with pytest.raises(InvalidInput, match="expects 77 text \\+ 11 image tokens"):
        _run(proc, attn, _hidden(attn, 32), _ehs(5))
    with pytest.raises(InvalidInput, match="another image size"):
        _run(proc, attn, _hidden(attn, 30), _ehs(11))
    plain = RegionalAttention(unet)  # no image projections
    plain.conditioning = _two(text=False, image=True)
    with pytest.raises(InvalidInput, match="no image projections"):
        _run(plain.processors[FIRST_ATTN2 + ".processor"], attn, _hidden(attn, 32), _ehs(11))
