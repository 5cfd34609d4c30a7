"""The official LoRA / IP-adapter layouts load strictly (generators.lora).

Full size: the SDXL UNet is built from ``base_models.json``'s config on the
meta device (2.6B parameters, no memory), and every tensor name and shape of
the official manifests -- PhotoMaker's ``lora_weights`` (rank read from the
tensors) and StoryMaker's index-keyed ``ip_adapter`` -- must land on a module
of the right shape. Small: the tiny generation UNet with real weights, where
applying a LoRA must equal diffusers' own ``load_lora_weights`` and leaving
must restore the UNet bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from generators.lora import (
    AppliedLoras,
    LoraWeights,
    attention_linears,
    plan_photomaker_lora,
    plan_storymaker_lora,
)
from generators.regional_attention import RegionalAttention
from vault.errors import ModelUnavailable

ROOT = Path(__file__).resolve().parents[2]
# The reference facts live beside the checkout (../shared/reference), or in it.
MANIFESTS = next((p for p in (ROOT.parent / "shared" / "reference" / "manifests",
                              ROOT / "shared" / "reference" / "manifests") if p.is_dir()),
                 ROOT.parent / "shared" / "reference" / "manifests")
pytestmark = pytest.mark.skipif(not MANIFESTS.is_dir(), reason="reference manifests absent")


def _manifest(name: str) -> dict:
    return json.loads((MANIFESTS / name).read_text())


@pytest.fixture(scope="module")
def base() -> dict:
    return _manifest("base_models.json")


@pytest.fixture(scope="module")
def full_unet(base):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**base["sdxl_unet_config"])


def _meta(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(v, device="meta") for k, v in shapes.items()}


def test_full_size_unet_matches_the_manifest(full_unet, base) -> None:
    assert sum(p.numel() for p in full_unet.parameters()) == base["sdxl_unet_params"]
    assert list(full_unet.attn_processors) == base["sdxl_attn_processor_order"]
    linears = attention_linears(full_unet)
    assert linears == {k: tuple(v) for k, v in base["sdxl_unet_attention_linears"].items()}


@pytest.mark.parametrize("rank", [64, 128])
def test_photomaker_lora_weights_map_onto_every_processor(full_unet, base, rank) -> None:
    doc = _manifest("photomaker_lora_weights.json")
    shapes = {k: tuple(rank if d == "r" else d for d in v) for k, v in doc["tensors"].items()}
    plan = plan_photomaker_lora(shapes, attention_linears(full_unet), source="manifest")
    assert plan.rank == rank  # read from the tensors, never assumed
    assert len(plan.targets) * 2 == doc["tensor_count"] == len(shapes)
    assert len(set(plan.modules)) == len(plan.targets)
    processors = {m.rsplit(".to_", 1)[0] + ".processor" for m in plan.modules}
    assert processors == set(base["sdxl_attn_processor_order"])  # all 140
    # The module each key lands on is diffusers' own conversion of the key (the manifest's rule).
    for t in plan.targets:
        peft = (t.down_key.replace(".processor.", ".").replace("to_out_lora", "to_out.0_lora")
                .replace("_lora.down", ".lora_A"))
        assert peft == f"unet.{t.module}.lora_A.weight", t
    # Applying on the meta UNet: every merged weight has the linear's shape; exit restores.
    originals = {m: full_unet.get_submodule(m).weight for m in plan.modules}
    lora = LoraWeights.from_state_dict(plan, _meta(shapes), device="meta")
    with AppliedLoras(full_unet, [(lora, 1.0)]):
        for m, w in originals.items():
            now = full_unet.get_submodule(m).weight
            assert now is not w and now.shape == w.shape
    assert all(full_unet.get_submodule(m).weight is w for m, w in originals.items())


def test_storymaker_ip_adapter_maps_by_index_onto_the_processor_order(full_unet, base) -> None:
    doc = _manifest("storymaker_ip_adapter.json")
    shapes = {k: tuple(v) for k, v in doc["tensors"].items()}
    order = list(full_unet.attn_processors)
    plan = plan_storymaker_lora(shapes, order, attention_linears(full_unet), source="manifest")
    assert plan.rank == 128
    assert len(plan.targets) * 2 + len(plan.image_projection_keys) == doc["tensor_count"]
    assert sum(int(torch.Size(s).numel()) for s in shapes.values()) == doc["param_count"]
    for t in plan.targets:  # index i -> the i-th processor of the SDXL order
        i = int(t.down_key.split(".")[0])
        assert t.module.startswith(base["sdxl_attn_processor_order"][i].removesuffix(".processor"))
    ip_indices = sorted({int(k.split(".")[0]) for k in plan.image_projection_keys})
    assert ip_indices == list(range(1, len(order), 2))  # odd = cross-attention
    # The regional processors take exactly these projections, strictly.
    with torch.device("meta"):  # the processors' own to_k_ip / to_v_ip too
        regional = RegionalAttention(full_unet, image_tokens=True)
    expected = regional.image_projection_state_dict()
    assert {k: tuple(v.shape) for k, v in expected.items()} == {
        k: shapes[k] for k in plan.image_projection_keys}
    regional.load_image_projections(_meta(shapes))  # LoRA keys skipped, ip keys all used


@pytest.fixture(scope="module")
def tiny_layouts():
    """The tiny generation UNet (meta) and stand-in LoRA layouts that fit it."""
    from generators.standins.generation import (
        tiny_ip_adapter_for,
        tiny_lora_weights_for,
        tiny_sdxl_unet_on_meta,
    )

    unet = tiny_sdxl_unet_on_meta()
    return unet, tiny_lora_weights_for(unet), tiny_ip_adapter_for(unet)


@pytest.fixture
def tiny_plan_inputs(tiny_layouts):
    unet, lora, ip = tiny_layouts
    return unet, dict(lora), dict(ip)  # each test edits its own copy


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop(next(k for k in sd if k.endswith("to_q_lora.up.weight"))),
     "no matching up"),
    (lambda sd: sd.update({"unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.processor"
                           ".to_q_lora.down.weight": torch.zeros(4, 64),
                           "unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.processor"
                           ".to_q_lora.up.weight": torch.zeros(64, 4)}),
     "no attention linear down_blocks.9"),
    (lambda sd: sd.update({next(k for k in sd if k.endswith("attn2.processor.to_k_lora.down"
                                                            ".weight")): torch.zeros(4, 640)}),
     "shape \\(4, 640\\)"),
    (lambda sd: sd.update({next(k for k in sd if k.endswith("to_v_lora.down.weight")):
                           torch.zeros(8, 64)}), "inconsistent LoRA ranks"),
    (lambda sd: sd.update({"text_encoder.text_model.encoder.layers.0.self_attn.processor"
                           ".to_q_lora.down.weight": torch.zeros(4, 768),
                           "text_encoder.text_model.encoder.layers.0.self_attn.processor"
                           ".to_q_lora.up.weight": torch.zeros(768, 4)}),
     "not a UNet key"),
    (lambda sd: sd.update({"unet.mid_block.lora.weight": torch.zeros(1)}),
     "not an attention-processor LoRA key"),
])
def test_photomaker_lora_refusals_name_the_key(tiny_plan_inputs, edit, message) -> None:
    unet, lora, _ = tiny_plan_inputs
    edit(lora)
    with pytest.raises(ModelUnavailable, match=message):
        plan_photomaker_lora({k: tuple(v.shape) for k, v in lora.items()},
                             attention_linears(unet), source="photomaker-v2.bin")


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("3.to_k_ip.weight"), "missing 3.to_k_ip.weight"),
    (lambda sd: sd.pop("0.to_out_lora.up.weight"), "missing 0.to_out_lora.up.weight"),
    (lambda sd: sd.update({"0.to_k_ip.weight": sd["1.to_k_ip.weight"]}), "is self-attention"),
    (lambda sd: sd.update({"999.to_q_lora.down.weight": torch.zeros(4, 64)}), "index 999"),
    (lambda sd: sd.update({"1.to_v_ip.weight": torch.zeros(64, 77)}), "1.to_v_ip.weight: shape"),
    (lambda sd: sd.update({"1.to_q_lora.bias": torch.zeros(4)}), "not a StoryMaker ip_adapter key"),
])
def test_storymaker_refusals_name_the_key(tiny_plan_inputs, edit, message) -> None:
    unet, _, ip = tiny_plan_inputs
    edit(ip)
    with pytest.raises(ModelUnavailable, match=message):
        plan_storymaker_lora({k: tuple(v.shape) for k, v in ip.items()},
                             list(unet.attn_processors), attention_linears(unet),
                             source="mask.bin")


def test_applying_equals_diffusers_load_lora_weights_and_restores_exactly() -> None:
    """PhotoMaker's official way: ``pipe.load_lora_weights(lora_weights)`` (old format,
    converted by diffusers, via peft) at weight 1.0. Ours, fused or as hooks, must match,
    and leave the UNet as it was."""
    pytest.importorskip("peft")
    from generators.standins.generation import TINY_GENERATION_SDXL, tiny_lora_weights_for
    from generators.standins.pipelines import build_tiny_sdxl_unet

    unet = build_tiny_sdxl_unet(TINY_GENERATION_SDXL)
    state = tiny_lora_weights_for(unet, seed=3)
    plan = plan_photomaker_lora({k: tuple(v.shape) for k, v in state.items()},
                                attention_linears(unet))
    lora = LoraWeights.from_state_dict(plan, state)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, 2048, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}

    def run():
        with torch.no_grad():
            return unet(sample, 400, encoder_hidden_states=ehs, added_cond_kwargs=added).sample

    before = {k: v.clone() for k, v in unet.state_dict().items()}
    plain = run()
    with AppliedLoras(unet, [(lora, 1.0)], fuse=True):
        fused = run()
    with AppliedLoras(unet, [(lora, 1.0)], fuse=False):
        hooked = run()
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    assert torch.equal(run(), plain)

    # diffusers' own path, as pipe.load_lora_weights runs it (its text encoder part is a no-op).
    from diffusers import StableDiffusionXLPipeline

    reference = build_tiny_sdxl_unet(TINY_GENERATION_SDXL)  # same seed: same weights
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state),
                                                                 unet_config=reference.config)
    StableDiffusionXLPipeline.load_lora_into_unet(converted, alphas, unet=reference,
                                                  adapter_name="photomaker")
    reference.set_adapters(["photomaker"], weights=[1.0])
    with torch.no_grad():
        official = reference(sample, 400, encoder_hidden_states=ehs,
                             added_cond_kwargs=added).sample
    assert (official - plain).abs().max() > 1e-4  # the LoRA does something
    torch.testing.assert_close(fused, official, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(hooked, official, atol=2e-5, rtol=1e-4)
