"""InstantID's files: strict reading of ``ip-adapter.bin`` and the IdentityNet ControlNet, the
lookup that tells InstantID's ``ip-adapter.bin`` from other IP-Adapters', and the full-size
layouts (generators.adapters.instantid, generators.standins.instantid).

The stand-ins of ``generators.standins.instantid`` are written for the tiny generation SDXL;
each refusal test edits a copy of them. The full-size layouts are built on the meta device
from the SDXL UNet of the reference ``base_models.json`` and compared with
``docs/manifests/instantid_*.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from encoders.id.checkpoints import find_checkpoint, inspect_id_checkpoints
from generators.adapters.instantid import (
    INSTANTID,
    OFFICIAL_CONTROLNET_CONFIG,
    TINY_INSTANTID,
    controlnet_fit_problems,
    controlnet_layout,
    describe_ip_adapter,
    image_proj_layout,
    ip_adapter_layout,
    load_controlnet,
    read_ip_adapter,
)
from generators.standins.generation import tiny_sdxl_unet_on_meta
from generators.standins.instantid import full_size_manifests, write_tiny_instantid
from vault.errors import ModelUnavailable

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = next((p for p in (ROOT.parent / "shared" / "reference" / "manifests",
                              ROOT / "shared" / "reference" / "manifests") if p.is_dir()),
                 ROOT.parent / "shared" / "reference" / "manifests")


@pytest.fixture(scope="module")
def tiny_unet():
    return tiny_sdxl_unet_on_meta()


@pytest.fixture(scope="module")
def standin(tmp_path_factory, tiny_unet) -> dict[str, Path]:
    return write_tiny_instantid(tmp_path_factory.mktemp("instantid"), tiny_unet, seed=5)


def _copy(standin: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the stand-in folder (with its stand-in sidecar)."""
    folder = tmp_path / "InstantID"
    shutil.copytree(standin["instantid-ip-adapter"].parent, folder)
    return folder


def _rewrite(path: Path, edit) -> None:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)


# -- ip-adapter.bin ---------------------------------------------------------------------------
def test_standin_reads_with_every_cross_attention_projection(standin, tiny_unet) -> None:
    adapter = read_ip_adapter(standin["instantid-ip-adapter"], tiny_unet)
    assert adapter.config == TINY_INSTANTID  # the sidecar picks the tiny sizes
    order = list(tiny_unet.attn_processors)
    cross = [i for i, n in enumerate(order) if n.endswith("attn2.processor")]
    assert cross and all(i % 2 == 1 for i in cross)  # SDXL's order: attn1, attn2, ...
    assert set(adapter.projections) == {f"{i}.to_{p}_ip.weight" for i in cross
                                        for p in ("k", "v")}
    raw = torch.load(standin["instantid-ip-adapter"], weights_only=True)
    for key, value in raw["ip_adapter"].items():
        assert torch.equal(adapter.projections[key], value)
    for key, value in raw["image_proj"].items():
        assert torch.equal(adapter.image_proj.state_dict()[key], value)
    tokens = adapter.image_proj(torch.randn(2, 3, 512))
    assert tokens.shape == (2, 16, 2048)


@pytest.mark.parametrize(("part", "edit", "message"), [
    ("image_proj", lambda s: s.pop("layers.1.0.to_q.weight"),
     r"missing keys \(1\): layers\.1\.0\.to_q\.weight"),
    ("image_proj", lambda s: s.update({"layers.4.0.to_q.weight": torch.zeros(128, 128)}),
     r"unexpected keys \(1\): layers\.4\.0\.to_q\.weight"),
    ("image_proj", lambda s: s.update({"latents": torch.zeros(1, 8, 128)}),
     r"latents is \(1, 8, 128\) in the file, expected \(1, 16, 128\)"),
    ("ip_adapter", lambda s: s.pop("1.to_v_ip.weight"), r"missing keys \(1\): 1\.to_v_ip"),
    ("ip_adapter", lambda s: s.update({"0.to_k_ip.weight": torch.zeros(32, 32)}),
     r"unexpected keys \(1\): 0\.to_k_ip\.weight"),
    ("ip_adapter", lambda s: s.update({"3.to_k_ip.weight": torch.zeros(64, 768)}),
     r"3\.to_k_ip\.weight is \(64, 768\) in the file, expected \(64, 2048\)"),
])
def test_every_key_and_shape_is_checked(standin, tiny_unet, tmp_path, part, edit,
                                        message) -> None:
    path = _copy(standin, tmp_path) / "ip-adapter.bin"
    _rewrite(path, lambda state: edit(state[part]))
    with pytest.raises(ModelUnavailable, match=message) as err:
        read_ip_adapter(path, tiny_unet)
    assert str(path) in str(err.value)


def test_without_the_sidecar_the_official_sizes_are_required(standin, tiny_unet,
                                                            tmp_path) -> None:
    folder = _copy(standin, tmp_path)
    (folder / "idvault-stand-ins.json").unlink()
    with pytest.raises(ModelUnavailable, match=r"(?s)Resampler of width 1280, 4 layers.*shape mismatches \(48\)"):
        read_ip_adapter(folder / "ip-adapter.bin", tiny_unet)


@pytest.mark.parametrize(("state", "message"), [
    ({"image_proj_model": {}, "ip_adapter": {}}, "StoryMaker mask.bin"),
    ({"id_encoder": {}, "lora_weights": {}}, "PhotoMaker checkpoint"),
    ({"image_proj": {"proj.weight": torch.zeros(8192, 1024), "proj.bias": torch.zeros(8192),
                     "norm.weight": torch.zeros(2048), "norm.bias": torch.zeros(2048)},
      "ip_adapter": {}}, "plain IP-Adapter"),
    ({"image_proj": {"latents": torch.zeros(1, 16, 1280),
                     "proj_in.weight": torch.zeros(1280, 1280)},
      "ip_adapter": {}}, "IP-Adapter Plus Resampler over 1280-wide CLIP image features"),
    ({"image_proj": {"proj.0.weight": torch.zeros(1024, 512), "norm.weight": torch.zeros(2048),
                     "perceiver_resampler.proj_in.weight": torch.zeros(2048, 1280)},
      "ip_adapter": {}}, "IP-Adapter-FaceID Plus"),
    ({"image_proj": {"latents": torch.zeros(1, 16, 128)},
      "ip_adapter": {"0.to_q_lora.down.weight": torch.zeros(4, 32)}}, "carries LoRA weights"),
])
def test_other_ip_adapters_are_named(tmp_path, tiny_unet, state, message) -> None:
    path = tmp_path / "ip-adapter.bin"
    torch.save(state, path)
    with pytest.raises(ModelUnavailable, match=message) as err:
        read_ip_adapter(path, tiny_unet, TINY_INSTANTID)
    assert "not InstantID's ip-adapter.bin" in str(err.value)


def test_lookup_prefers_the_instantid_folder_and_names_a_foreign_file(standin, tiny_unet,
                                                                     tmp_path) -> None:
    _copy(standin, tmp_path)
    foreign = tmp_path / "ip-adapter.bin"  # another IP-Adapter's file of the same name
    torch.save({"image_proj": {"latents": torch.zeros(1, 16, 1280),
                               "proj_in.weight": torch.zeros(1280, 1664)}, "ip_adapter": {}},
               foreign)
    assert find_checkpoint("instantid-ip-adapter", tmp_path) == \
        tmp_path / "InstantID" / "ip-adapter.bin"
    shutil.rmtree(tmp_path / "InstantID")
    assert find_checkpoint("instantid-ip-adapter", tmp_path) == foreign
    with pytest.raises(ModelUnavailable, match="1664-wide CLIP image features"):
        read_ip_adapter(foreign, tiny_unet)


def test_inventory_lists_both_files_with_the_controlnet_weights(standin) -> None:
    root = standin["instantid-ip-adapter"].parent.parent
    rows = {r.key: r for r in inspect_id_checkpoints(root, hashes=True)}
    adapter, controlnet = rows["instantid-ip-adapter"], rows["instantid-controlnet"]
    assert adapter.path == standin["instantid-ip-adapter"] and adapter.problem is None
    assert adapter.sha256 == hashlib.sha256(adapter.path.read_bytes()).hexdigest()
    weights = standin["instantid-controlnet"] / "diffusion_pytorch_model.safetensors"
    assert controlnet.path == standin["instantid-controlnet"]
    assert controlnet.size == weights.stat().st_size
    assert controlnet.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()


# -- the ControlNet ------------------------------------------------------------------------------
def test_controlnet_loads_strictly_with_the_files_tensors(standin, tiny_unet) -> None:
    from safetensors.torch import load_file

    folder = standin["instantid-controlnet"]
    model = load_controlnet(folder, tiny_unet, token_width=2048)
    want = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    got = model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    # The zero convolutions of a fresh ControlNet were given values: residuals can act.
    assert model.controlnet_mid_block.weight.abs().sum() > 0


@pytest.mark.parametrize(("change", "message"), [
    ({"block_out_channels": [32, 64, 128]}, r"block_out_channels is \[32, 64, 128\]"),
    ({"layers_per_block": 1}, "layers_per_block is 1, the base UNet's is 2"),
    ({"cross_attention_dim": 768}, "cross_attention_dim is 768, the image tokens are 2048"),
    ({"addition_embed_type": None}, "addition_embed_type is None"),
    ({"global_pool_conditions": True}, "guess mode"),
    ({"conditioning_channels": 1}, r"conditioning_channels is 1; the keypoint image is RGB"),
])
def test_controlnet_config_must_fit_the_base_unet(standin, tiny_unet, tmp_path, change,
                                                  message) -> None:
    folder = _copy(standin, tmp_path) / "ControlNetModel"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelUnavailable, match=message) as err:
        load_controlnet(folder, tiny_unet, token_width=2048)
    assert "does not fit the base model's UNet" in str(err.value)


def test_controlnet_config_must_be_a_controlnet(standin, tiny_unet, tmp_path) -> None:
    folder = _copy(standin, tmp_path) / "ControlNetModel"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelUnavailable, match="describes a 'UNet2DConditionModel'"):
        load_controlnet(folder, tiny_unet, token_width=2048)
    with pytest.raises(ModelUnavailable, match="describes a 'UNet2DConditionModel', not a "
                                               "ControlNetModel"):
        find_checkpoint("instantid-controlnet", tmp_path)
    # A config diffusers cannot build from is refused as such, not with a traceback.
    (folder / "config.json").write_text(json.dumps({**config, "attention_head_dim": [2, 4]}))
    with pytest.raises(ModelUnavailable, match="diffusers cannot build a ControlNetModel"):
        load_controlnet(folder, tiny_unet, token_width=2048)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("controlnet_mid_block.weight"),
     r"missing keys \(1\): controlnet_mid_block\.weight"),
    (lambda s: s.update({"controlnet_down_blocks.9.weight": torch.zeros(64, 64, 1, 1)}),
     r"unexpected keys \(1\): controlnet_down_blocks\.9\.weight"),
    (lambda s: s.update({"controlnet_mid_block.bias": torch.zeros(32)}),
     r"controlnet_mid_block\.bias is \(32,\) in the file, expected \(64,\)"),
])
def test_controlnet_weights_are_checked_key_by_key(standin, tiny_unet, tmp_path, edit,
                                                   message) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy(standin, tmp_path) / "ControlNetModel"
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    edit(state)
    save_file(state, str(weights))
    with pytest.raises(ModelUnavailable, match=message) as err:
        load_controlnet(folder, tiny_unet, token_width=2048)
    assert str(weights) in str(err.value)


def test_controlnet_without_weights_is_refused(standin, tiny_unet, tmp_path) -> None:
    folder = _copy(standin, tmp_path) / "ControlNetModel"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelUnavailable, match="no diffusion_pytorch_model.safetensors or "
                                               "diffusion_pytorch_model.bin"):
        load_controlnet(folder, tiny_unet, token_width=2048)


# -- the full-size layouts ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_size():
    from diffusers import UNet2DConditionModel

    from generators.standins.full_size_sdxl import load_base_manifest

    base = load_base_manifest(MANIFESTS)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**base["sdxl_unet_config"])
    return base, unet


def test_full_size_ip_adapter_layout_is_the_manifest_and_the_loaders(full_size) -> None:
    """docs/manifests/instantid_ip_adapter.json is what the modules give on the meta device
    and what read_ip_adapter expects for the full-size SDXL UNet."""
    base, unet = full_size
    doc = json.loads((ROOT / "docs" / "manifests" / "instantid_ip_adapter.json").read_text())
    adapter_doc, _ = full_size_manifests(MANIFESTS)
    assert adapter_doc == doc
    proj = {k: tuple(v) for k, v in doc["image_proj"].items()}
    ip = {k: tuple(v) for k, v in doc["ip_adapter"].items()}
    assert proj == image_proj_layout(INSTANTID)
    assert ip == ip_adapter_layout(unet)
    assert describe_ip_adapter(proj, ip) is None
    assert proj["latents"] == (1, 16, 1280) and proj["proj_in.weight"] == (1280, 512)
    assert proj["proj_out.weight"] == (2048, 1280) and len(
        {k.split(".")[1] for k in proj if k.startswith("layers.")}) == 4
    # to_k_ip / to_v_ip on the 70 cross-attention processors, the odd indices 1 to 139.
    assert {int(k.split(".")[0]) for k in ip} == set(range(1, 140, 2))
    assert len(ip) == 2 * 70 and len(base["sdxl_attn_processor_order"]) == 140
    # 422.8M parameters in fp32 is the published 1.69 GB (1.57 GiB).
    assert doc["parameters"] == sum(int(torch.Size(s).numel())
                                    for s in (*proj.values(), *ip.values()))
    assert round(doc["parameters"] * 4 / 1e9, 2) == 1.69


def test_full_size_controlnet_layout_is_the_manifest_and_fits_sdxl(full_size) -> None:
    _, unet = full_size
    doc = json.loads((ROOT / "docs" / "manifests" / "instantid_controlnet.json").read_text())
    _, controlnet_doc = full_size_manifests(MANIFESTS)
    assert controlnet_doc == doc
    assert doc["config"] == OFFICIAL_CONTROLNET_CONFIG
    tensors = {k: tuple(v) for k, v in doc["tensors"].items()}
    assert tensors == controlnet_layout(OFFICIAL_CONTROLNET_CONFIG)
    # The SDXL UNet's full config (defaults included, as the loader sees it).
    assert controlnet_fit_problems(OFFICIAL_CONTROLNET_CONFIG, dict(unet.config)) == []
    # Nine down-block residuals (conv_in, 2 per block, 2 downsamplers) and one mid.
    assert len([k for k in tensors if k.startswith("controlnet_down_blocks.")
                and k.endswith(".weight")]) == 9
    assert tensors["controlnet_mid_block.weight"] == (1280, 1280, 1, 1)
    # 1.25B parameters in fp16 is the published 2.5 GB.
    assert round(doc["parameters"] * 2 / 1e9, 1) == 2.5
    assert doc["parameters"] == sum(int(torch.Size(s).numel()) for s in tensors.values())

