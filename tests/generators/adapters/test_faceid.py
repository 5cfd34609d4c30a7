"""IP-Adapter-FaceID Plus v2 SDXL: the projection model, strict reading, variant detection
and the full-size layout (generators.adapters.faceid, generators.standins.faceid).

Files are written with the official names and layouts: the stand-ins of
``generators.standins.faceid`` (for the tiny generation SDXL, 2048-wide tokens, and for the
default tiny SDXL, 64-wide, in the structure diffusers can load), and variants of them for
each refusal, read with ``config=TINY_FACEID`` (the same checks as for every size).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from encoders.id.checkpoints import shapes_of
from generators.adapters.faceid import (
    TINY_FACEID,
    FaceIDConfig,
    FaceIDPlusProjection,
    checkpoint_layout,
    detect_variant,
    expected_image_proj_layout,
    load_faceid,
    plan_faceid_ip_adapter,
    read_faceid_checkpoint,
)
from generators.standins.faceid import full_size_manifest, tiny_faceid_state, write_tiny_faceid
from generators.standins.generation import tiny_sdxl_unet_on_meta
from generators.standins.pipelines import TinySDXLConfig
from tests.generators.test_lora_loading import base, full_unet  # noqa: F401
from vault.errors import ModelUnavailable

ROOT = Path(__file__).resolve().parents[3]
MANIFEST = ROOT / "docs" / "manifests" / "ip_adapter_faceid_plusv2_sdxl.json"
SMALL = TINY_FACEID  # the official token width (so the variant reads as SDXL), small else


@pytest.fixture(scope="module")
def tiny_unet():
    return tiny_sdxl_unet_on_meta()


@pytest.fixture(scope="module")
def small_state(tiny_unet) -> dict:
    return tiny_faceid_state(tiny_unet, config=SMALL, seed=3)


@pytest.fixture(scope="module")
def standin(tmp_path_factory, tiny_unet) -> Path:
    return write_tiny_faceid(tmp_path_factory.mktemp("faceid"), tiny_unet, seed=1)


@pytest.fixture(scope="module")
def narrow_standin(tmp_path_factory) -> Path:
    """For the default tiny SDXL (64-wide tokens): diffusers-loadable sizes."""
    unet = tiny_sdxl_unet_on_meta(TinySDXLConfig())
    return write_tiny_faceid(tmp_path_factory.mktemp("faceid-narrow"), unet, seed=2)


def _write(tmp_path: Path, state: dict, name: str = "ip-adapter-faceid-plusv2_sdxl.bin") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def _edit(state: dict, part: str, **changes) -> dict:
    """A copy of ``state`` with ``part``'s keys replaced (value None: removed)."""
    out = {k: dict(v) for k, v in state.items()}
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del out[part][key]
        else:
            out[part][key] = value
    return out


# -- the stand-in and the projection ------------------------------------------------------------
def test_standin_reads_as_plusv2_sdxl_and_is_listed_as_a_stand_in(standin, tiny_unet) -> None:
    info = read_faceid_checkpoint(standin)  # the sidecar picks the tiny sizes
    assert info.variant.is_plusv2_sdxl and info.variant.num_tokens == 4
    assert info.lora_rank == 4 and info.weights_id.startswith(
        "faceid/ip-adapter-faceid-plusv2_sdxl.bin@")
    assert shapes_of(info.image_proj) == expected_image_proj_layout(TINY_FACEID)
    plan = plan_faceid_ip_adapter(shapes_of(info.ip_adapter), tiny_unet)
    processors = list(tiny_unet.attn_processors)
    assert plan.name == "faceid" and len(plan.targets) == 4 * len(processors)
    assert len(plan.image_projection_keys) == 2 * sum(p.endswith("attn2.processor")
                                                     for p in processors)
    # Without the sidecar the same file is held to the official sizes, and refused.
    (standin.parent / "idvault-stand-ins.json").rename(standin.parent / "listed.json")
    try:
        with pytest.raises(ModelUnavailable, match="shape mismatches"):
            read_faceid_checkpoint(standin)
    finally:
        (standin.parent / "listed.json").rename(standin.parent / "idvault-stand-ins.json")


def test_safetensors_form_reads_the_same_tensors(tmp_path, standin, tiny_unet) -> None:
    path = write_tiny_faceid(tmp_path, tiny_unet, seed=1, safetensors=True)
    assert path.name == "ip-adapter-faceid-plusv2_sdxl.safetensors"
    a, b = read_faceid_checkpoint(standin), read_faceid_checkpoint(path)
    for part in ("image_proj", "ip_adapter"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), part


@torch.no_grad()
def test_projection_is_proj_plus_model_with_the_v2_shortcut(standin) -> None:
    model, _ = load_faceid(standin)
    g = torch.Generator().manual_seed(0)
    ids = torch.nn.functional.normalize(torch.randn(3, 512, generator=g), dim=-1)
    clip = torch.randn(3, 50, TINY_FACEID.clip_embeddings_dim, generator=g)
    plain = model(ids, clip)  # the official default: shortcut off
    x = model.id_tokens(ids)
    assert plain.shape == x.shape == (3, 4, 2048)
    for s in (1.0, 0.5):
        torch.testing.assert_close(model(ids, clip, shortcut=True, scale=s), x + s * plain)
    # Each face is projected on its own: a batch is its rows.
    torch.testing.assert_close(model(ids[1:2], clip[1:2], shortcut=True),
                               model(ids, clip, shortcut=True)[1:2], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_projection_equals_diffusers_faceid_plus_image_projection(narrow_standin) -> None:
    """diffusers' converter turns the same ``image_proj`` into its
    ``IPAdapterFaceIDPlusImageProjection``; with the shortcut the outputs agree. Not the
    same kernels (diffusers' SDPA with 1/sqrt(64) vs the official q and k each scaled by
    64^-1/4, a separate to_k/to_v), so equal to float32 rounding: atol 1e-5 on LayerNorm'd
    tokens of size ~1."""
    from diffusers import UNet2DConditionModel

    model, info = load_faceid(narrow_standin)
    # The official structure at width 64, read from the stand-in: 4 layers of one 64-wide head.
    official_at_64 = FaceIDConfig(cross_attention_dim=64, clip_embeddings_dim=32)
    assert (info.config.depth, info.config.num_heads, info.config.hidden) == (4, 1, 1024)
    assert shapes_of(info.image_proj) == expected_image_proj_layout(official_at_64)
    state = {k: v.float() for k, v in info.image_proj.items()}
    theirs = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        None, state, low_cpu_mem_usage=False).eval()
    assert type(theirs).__name__ == "IPAdapterFaceIDPlusImageProjection"
    g = torch.Generator().manual_seed(1)
    ids = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=-1)
    clip = torch.randn(2, 50, TINY_FACEID.clip_embeddings_dim, generator=g)
    theirs.clip_embeds = clip[:, None]  # (batch, images, positions, width), as set by users
    theirs.shortcut, theirs.shortcut_scale = True, 0.7
    want = theirs(ids)
    got = model(ids, clip, shortcut=True, scale=0.7)
    assert got.shape == (2, 4, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# -- strict reading ---------------------------------------------------------------------------
def test_small_variant_reads(tmp_path, small_state) -> None:
    info = read_faceid_checkpoint(_write(tmp_path, small_state), SMALL)
    assert info.variant.is_plusv2_sdxl and info.lora_rank == 4


@pytest.mark.parametrize("change, message", [
    ({"perceiver_resampler__proj_out__bias": None},
     r"missing keys \(1\): perceiver_resampler\.proj_out\.bias"),
    ({"perceiver_resampler__pos_embed": torch.zeros(4)},
     r"unexpected keys \(1\): perceiver_resampler\.pos_embed"),
    ({"proj__0__weight": torch.zeros(16, 256)},
     r"proj\.0\.weight is \(16, 256\) in the file, expected \(16, 512\)"),
])
def test_image_proj_is_checked_key_by_key(tmp_path, small_state, change, message) -> None:
    path = _write(tmp_path, _edit(small_state, "image_proj", **change))
    with pytest.raises(ModelUnavailable, match=message) as err:
        read_faceid_checkpoint(path, SMALL)
    assert str(path) in str(err.value) and "IP-Adapter-FaceID Plus v2 image_proj" in str(err.value)


def test_ip_adapter_is_checked_against_the_unet(tmp_path, small_state, tiny_unet) -> None:
    bad_key = _edit(small_state, "ip_adapter", **{"3__to_q_ip__weight": torch.zeros(2, 2)})
    with pytest.raises(ModelUnavailable, match=r"3\.to_q_ip\.weight"):
        read_faceid_checkpoint(_write(tmp_path, bad_key), SMALL)
    mixed = _edit(small_state, "ip_adapter", **{"0__to_q_lora__down__weight": torch.zeros(8, 32)})
    with pytest.raises(ModelUnavailable, match=r"ranks \[4, 8\]"):
        read_faceid_checkpoint(_write(tmp_path, mixed), SMALL)
    # Key names fine, but not this UNet's: a missing processor, a wrong IP width, an IP
    # projection on self-attention; each named, all in one error.
    ip = shapes_of(small_state["ip_adapter"])
    del ip["2.to_out_lora.up.weight"]
    ip["1.to_k_ip.weight"] = (ip["1.to_k_ip.weight"][0], 768)
    ip["0.to_v_ip.weight"] = ip["1.to_v_ip.weight"]
    with pytest.raises(ModelUnavailable) as err:
        plan_faceid_ip_adapter(ip, tiny_unet, source="test.bin")
    text = str(err.value)
    assert "IP-Adapter-FaceID ip_adapter does not fit this UNet (3 problem(s))" in text
    assert "missing 2.to_out_lora.up.weight" in text
    assert "1.to_k_ip.weight: shape" in text and "0.to_v_ip.weight: processor 0" in text


@pytest.mark.parametrize("top, message", [
    ({"image_proj_model": {}, "ip_adapter": {}}, "StoryMaker's mask.bin"),
    ({"id_encoder": {}, "lora_weights": {}}, "PhotoMaker checkpoint"),
    ({"image_proj": {}}, r"expected exactly \['image_proj', 'ip_adapter'\]"),
])
def test_other_files_are_refused_by_their_top_level_keys(tmp_path, top, message) -> None:
    with pytest.raises(ModelUnavailable, match=message):
        read_faceid_checkpoint(_write(tmp_path, top), SMALL)


def test_safetensors_with_foreign_keys_is_refused(tmp_path, small_state) -> None:
    from safetensors.torch import save_file

    flat = {f"{p}.{k}": v for p, t in small_state.items() for k, v in t.items()}
    flat["text_encoder.lora.weight"] = torch.zeros(2)
    path = tmp_path / "ip-adapter-faceid-plusv2_sdxl.safetensors"
    save_file(flat, str(path))
    with pytest.raises(ModelUnavailable, match="1 key.* outside image_proj.*text_encoder"):
        read_faceid_checkpoint(path, SMALL)


# -- variants --------------------------------------------------------------------------------------
def _mlp_proj(width: int, tokens: int) -> dict[str, torch.Tensor]:
    return {"proj.0.weight": torch.zeros(16, 512), "proj.0.bias": torch.zeros(16),
            "proj.2.weight": torch.zeros(width * tokens, 16),
            "proj.2.bias": torch.zeros(width * tokens),
            "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}


def _sd15_plus(state: dict) -> dict:
    """The same Plus layout at SD1.5's token width 768 (the plus_sd15 / plusv2_sd15 files)."""
    with torch.device("meta"):
        names = FaceIDPlusProjection(FaceIDConfig(cross_attention_dim=768, clip_embeddings_dim=32,
                                                  proj_hidden=16, depth=1, heads=1,
                                                  ff_mult=1 / 64)).state_dict()
    return {"image_proj": {k: torch.zeros(v.shape) for k, v in names.items()},
            "ip_adapter": state["ip_adapter"]}


@pytest.mark.parametrize("variant, message", [
    ("faceid", r"IP-Adapter-FaceID \(ArcFace MLP projection only, no CLIP perceiver\) for SDXL"),
    ("portrait", r"IP-Adapter-FaceID-Portrait \(16 tokens, no LoRA\) for SDXL"),
    ("sd15-plus", r"FaceID Plus / PlusV2 \(one layout\) for SD1\.5"),
    ("no-lora", r"its ip_adapter has no LoRA"),
    ("resampler", r"Resampler projection \(IP-Adapter Plus, or InstantID's ip-adapter\.bin\)"),
])
def test_variants_other_than_plusv2_sdxl_are_refused(tmp_path, small_state, variant,
                                                     message) -> None:
    ip, no_lora = small_state["ip_adapter"], {
        k: v for k, v in small_state["ip_adapter"].items() if "_lora." not in k}
    state = {
        "faceid": {"image_proj": _mlp_proj(2048, 4), "ip_adapter": ip},
        "portrait": {"image_proj": _mlp_proj(2048, 16), "ip_adapter": no_lora},
        "sd15-plus": _sd15_plus(small_state),
        "no-lora": {"image_proj": small_state["image_proj"], "ip_adapter": no_lora},
        "resampler": {"image_proj": {"latents": torch.zeros(1, 16, 1280),
                                     "proj_in.weight": torch.zeros(1280, 512)},
                      "ip_adapter": no_lora},
    }[variant]
    with pytest.raises(ModelUnavailable, match=message) as err:
        read_faceid_checkpoint(_write(tmp_path, state), SMALL)
    assert "needs ip-adapter-faceid-plusv2_sdxl.bin from https://huggingface.co/h94/" \
           "IP-Adapter-FaceID" in str(err.value)


def test_detect_variant_reads_width_and_tokens() -> None:
    v = detect_variant({**shapes_of(_mlp_proj(768, 4))}, {"1.to_k_lora.down.weight": (128, 768)})
    assert (v.family, v.base, v.cross_attention_dim, v.num_tokens, v.lora) == \
        ("faceid", "sd15", 768, 4, True)
    # No norm (a Resampler): the width comes from the IP projections.
    v = detect_variant({"latents": (1, 16, 2048)}, {"1.to_k_ip.weight": (640, 2048)})
    assert (v.family, v.base, v.lora) == ("resampler", "sdxl", False)


# -- the full-size layout ------------------------------------------------------------------
def test_full_size_layout_equals_the_manifest_and_the_loader_accepts_it(full_unet,  # noqa: F811
                                                                        base) -> None:  # noqa: F811
    """docs/manifests/ip_adapter_faceid_plusv2_sdxl.json is what the model and the full-size
    SDXL UNet (meta device) give, and what the loader's checks accept: every image_proj
    name and shape, the LoRA on all 140 processors, IP projections on the 70 cross ones."""
    doc = json.loads(MANIFEST.read_text())
    assert full_size_manifest(full_unet) == doc
    tensors = {k: tuple(v) for k, v in doc["tensors"].items()}
    assert tensors == checkpoint_layout(full_unet)
    image_proj = {k.removeprefix("image_proj."): v for k, v in tensors.items()
                  if k.startswith("image_proj.")}
    ip_adapter = {k.removeprefix("ip_adapter."): v for k, v in tensors.items()
                  if k.startswith("ip_adapter.")}
    assert len(image_proj) + len(ip_adapter) == len(tensors)
    assert image_proj == expected_image_proj_layout(FaceIDConfig())
    assert detect_variant(image_proj, ip_adapter).is_plusv2_sdxl
    plan = plan_faceid_ip_adapter(ip_adapter, full_unet, source="manifest")
    assert plan.rank == 128
    assert len(plan.targets) == 4 * 140 == 4 * len(base["sdxl_attn_processor_order"])
    assert len(plan.image_projection_keys) == 2 * 70
    assert {k.split(".")[0] for k in plan.image_projection_keys} == {
        str(i) for i in range(1, 140, 2)}
    # 743.7M parameters in fp16 is the published file's 1.49 GB.
    assert doc["parameters"] == sum(int(torch.Size(s).numel()) for s in tensors.values())
    assert round(doc["parameters"] * 2 / 1e9, 2) == 1.49
