"""LiDB: layer lists and parameter counts against the manifest, aux matrices, LoRA export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from encoders.fitting import lidb
from encoders.fitting.core import DiffusionModel, FitConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[3]
MANIFEST = Path(os.environ.get("IDVAULT_REFERENCE_MANIFESTS",
                               ROOT.parent / "shared" / "reference" / "manifests")
                ) / "base_models.json"


def manifest() -> dict:
    for candidate in (ROOT.parent / "shared/reference/manifests/base_models.json", MANIFEST):
        if candidate.exists():
            return json.loads(candidate.read_text())
    pytest.skip("manifests/base_models.json is not on this machine")


def _meta_models(kind: str):
    import transformers
    from diffusers import UNet2DConditionModel

    d = manifest()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**d[f"{kind}_unet_config"])
        encoders = [transformers.CLIPTextModel(transformers.CLIPTextConfig(**d["clip_l_text_config"]))]
        if kind == "sdxl":
            encoders.append(transformers.CLIPTextModelWithProjection(
                transformers.CLIPTextConfig(**d["clip_g_text_config"])))
    return d, unet, encoders


def _tail(name: str) -> str:
    """A text-encoder layer name without the component / text_model prefixes."""
    return name[name.index("encoder.layers."):]


@pytest.mark.parametrize("kind,n_unet,n_text", [("sd15", 128, 48), ("sdxl", 560, 48 + 128)])
def test_layer_list_and_parameter_count_match_the_manifest(kind, n_unet, n_text):
    d, unet, encoders = _meta_models(kind)
    layers = lidb.lidb_layers(unet, encoders)
    unet_layers = {k[len("unet."):]: v for k, v in layers.items() if k.startswith("unet.")}
    # The UNet list is the manifest's, names, order and [out, in] shapes.
    assert list(unet_layers) == list(d[f"{kind}_unet_attention_linears"])
    assert [list(v) for v in unet_layers.values()] == list(d[f"{kind}_unet_attention_linears"].values())
    clip_l = {_tail(k): v for k, v in layers.items() if k.startswith("text_encoder.")}
    assert list(clip_l) == [_tail(k) for k in d["clip_l_text_attention_linears"]]
    if kind == "sdxl":
        clip_g = {_tail(k): v for k, v in layers.items() if k.startswith("text_encoder_2.")}
        assert list(clip_g) == [_tail(k) for k in d["clip_g_text_attention_linears"]]
        assert all(k.startswith("text_encoder_2.text_model.encoder.layers.")
                   for k in layers if k.startswith("text_encoder_2."))
    assert len(unet_layers) == n_unet and len(layers) == n_unet + n_text
    # r * (a + b) per layer at r = 1.
    expected = (n_unet + n_text) * (100 + 50)
    assert lidb.parameter_count(layers) == expected
    assert lidb.LidbWeights.init(list(layers)).num_params == expected
    if kind == "sd15":
        assert expected == 26_400
    else:
        assert expected == 110_400


def test_aux_matrices_are_orthonormal_and_reproducible():
    shapes = [(320, 320), (1280, 768), (32, 32)]
    aux = lidb.aux_matrices(7, shapes)
    again = lidb.aux_matrices(7, shapes)
    other = lidb.aux_matrices(8, shapes)
    for (down, up), (d2, u2), (d3, _) in zip(aux, again, other, strict=True):
        assert torch.equal(down, d2) and torch.equal(up, u2)
        assert not torch.allclose(down, d3)
    down, up = aux[0]
    assert down.shape == (100, 320) and up.shape == (320, 50)
    # Rows of down_aux (a x in) and of up_aux^T (b x out): orthonormal, norm 1.
    torch.testing.assert_close(down @ down.T, torch.eye(100), atol=1e-5, rtol=0)
    torch.testing.assert_close(up.T @ up, torch.eye(50), atol=1e-5, rtol=0)
    # A layer narrower than a (tiny models only): orthonormal columns instead.
    narrow_down, _ = aux[2]
    torch.testing.assert_close(narrow_down.T @ narrow_down, torch.eye(32), atol=1e-5, rtol=0)


def test_factors_follow_the_methods_formula():
    shapes = {"unet.x": (48, 40)}
    w = lidb.LidbWeights(["unet.x"], torch.randn(1, 1, 100), torch.randn(1, 50, 1), seed=3)
    (down_aux, up_aux), = lidb.aux_matrices(3, [(48, 40)])
    _name, down, up = next(w.factors(shapes))
    torch.testing.assert_close(down, w.down_train[0] @ down_aux)  # (r x a) @ (a x in)
    torch.testing.assert_close(up, up_aux @ w.up_train[0])  # (out x b) @ (b x r)
    assert down.shape == (1, 40) and up.shape == (48, 1)
    torch.testing.assert_close(w.deltas(shapes)["unet.x"], up @ down)


def test_relaxing_the_rank_keeps_the_delta():
    shapes = {"unet.x": (64, 64)}
    w = lidb.LidbWeights(["unet.x"], torch.randn(1, 1, 100), torch.randn(1, 50, 1), seed=0)
    r4 = w.relaxed(4)
    assert r4.rank == 4 and r4.down_train.shape == (1, 4, 100) and r4.up_train.shape == (1, 50, 4)
    torch.testing.assert_close(r4.deltas(shapes)["unet.x"], w.deltas(shapes)["unet.x"])






def _random_weights(model: DiffusionModel, seed: int = 5) -> lidb.LidbWeights:
    layers = list(lidb.model_layers(model))
    g = torch.Generator().manual_seed(seed)
    return lidb.LidbWeights(layers, torch.randn(len(layers), 1, 100, generator=g) * 0.5,
                            torch.randn(len(layers), 50, 1, generator=g) * 0.5, seed=11)


def test_the_installed_lora_equals_the_weight_delta(tiny_sd15):
    model = DiffusionModel.from_pretrained(tiny_sd15)
    w = _random_weights(model)
    shapes = lidb.model_layers(model)
    prompts = ["a photo of sks face"]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    base_h, _ = model.encode(prompts)
    with lidb.installed(model, w.layers, w.down_train, w.up_train, w.seed):
        h1, _ = model.encode(prompts)
        e1 = model.unet(x, 10, encoder_hidden_states=h1).sample
    modules = {"unet": model.unet, "text_encoder": model.encoders[0][1]}
    with lidb.applied_deltas(modules, w.deltas(shapes)):
        h2, _ = model.encode(prompts)
        e2 = model.unet(x, 10, encoder_hidden_states=h2).sample
    torch.testing.assert_close(h1, h2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(h1, base_h, atol=1e-3)  # the LoRA does something
    after, _ = model.encode(prompts)
    torch.testing.assert_close(after, base_h)  # and is gone after the block


def test_exported_lora_loads_into_diffusers_and_matches_the_artifact(tiny_sd15, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    pipe.set_progress_bar_config(disable=True)
    model = DiffusionModel(pipe)
    w = _random_weights(model)
    # Through the artifact payload, as the CLI export does.
    from vault import codec

    w = lidb.LidbWeights.from_artifact(codec.decode(w.payload(model_id="tiny"), kind="lidb"))
    shapes = lidb.layers_from_folder(tiny_sd15)  # configs only, as the CLI export reads them
    assert shapes == lidb.model_layers(model)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    sd = w.to_diffusers(shapes)
    safetensors.torch.save_file(sd, str(path))
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in sd
    assert sd["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] \
        .shape == (1, 32)

    def run():
        return pipe("a photo of a person", num_inference_steps=2, guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    base = run()
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    with lidb.applied_deltas(modules, w.deltas(shapes)):
        ours = run()
    pipe.load_lora_weights(str(path))
    theirs = run()
    assert abs(ours - base).max() > 1e-3
    assert abs(theirs - ours).max() < 1e-4


def test_hypernetwork_trains_towards_targets_and_round_trips(tmp_path):
    layers = [f"unet.l{i}" for i in range(3)]
    cfg = lidb.HyperConfig(image_size=32, patch=16, dim=32, heads=2, encoder_depth=1,
                           decoder_depth=1, iterations=2, aux_seed=4)
    torch.manual_seed(0)
    net = lidb.LidbHypernetwork(layers, cfg)
    g = torch.Generator().manual_seed(1)
    samples = [(torch.rand(3, 40, 40, generator=g),
                lidb.LidbWeights(layers, torch.randn(3, 1, 100, generator=g) * 0.1,
                                 torch.randn(3, 50, 1, generator=g) * 0.1, 4))
               for _ in range(2)]
    first = lidb.predict_weights(net, samples[0][0])
    assert first.num_params == 450 and float(first.down_train.abs().max()) == 0.0  # theta_0 = 0
    losses = lidb.train_hypernetwork(net, samples, steps=30, lr=3e-3, batch_size=2)
    assert losses[-1] < losses[0]
    path = lidb.save_hypernetwork(net, tmp_path / "h.safetensors")
    again = lidb.load_hypernetwork(path)
    p1, p2 = lidb.predict_weights(net, samples[0][0]), lidb.predict_weights(again, samples[0][0])
    torch.testing.assert_close(p1.down_train, p2.down_train)
    assert p2.seed == 4 and p2.layers == layers


def test_a_tiny_lidb_fit_decreases_the_loss_and_is_reproducible(tiny_sd15):
    model = DiffusionModel.from_pretrained(tiny_sd15)
    images = [torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    cfg = FitConfig(steps=12, lr=1e-2, seed=3, checkpoint_every=0, batch_size=2)
    w1, r1 = lidb.fit_lidb(model, images, cfg, rank=2, seed=9)
    w2, r2 = lidb.fit_lidb(model, images, cfg, rank=2, seed=9)
    assert r1.losses == r2.losses
    assert torch.equal(w1.up_train, w2.up_train)
    assert w1.rank == 2 and w1.seed == 9 and float(w1.up_train.abs().max()) > 0
    # Per-step losses are noisy (random timesteps); compare a fixed batch before and after.
    start = lidb.LidbWeights.init(w1.layers, rank=1, seed=9)
    assert _fixed_loss(model, w1, images) < _fixed_loss(model, start, images)


def _fixed_loss(model, w, images, seed=321):
    from encoders.fitting.core import augment

    g = torch.Generator().manual_seed(seed)
    views = torch.stack([augment(images[i % len(images)], model.resolution, g, lidb.FAST_FIT)
                         for i in range(6)])
    with torch.no_grad(), lidb.installed(model, w.layers, w.down_train, w.up_train, w.seed):
        z = model.latents(views, g)
        hidden, added = model.encode(["a photo of sks face"] * 6)
        return float(model.eps_loss(z, hidden, added, g))
