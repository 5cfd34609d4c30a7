"""PhotoMaker ID encoders (encoders.id.photomaker): layouts, loading, math, artifacts.

Full-size modules are only ever built on the meta device and compared name by
name and shape by shape with the official manifests
(``../shared/reference/manifests``, or ``IDVAULT_REFERENCE_MANIFESTS``); when
the manifests are not on the machine, the layouts are still checked against
digests recorded from them. Everything that runs uses the tiny stand-ins of
``encoders.standins.id_models`` (random weights, the official key names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoders.id.checkpoints import compare_layout, layout_error
from encoders.id.photomaker import (
    TINY_PHOTOMAKER,
    FuseModule,
    PerceiverAttention,
    PhotoMakerEncoder,
    PhotoMakerIDEncoder,
    Resampler,
    expand_class_tokens,
    expected_layout,
    inspect_lora,
    load_photomaker,
    lora_rank,
    peft_lora_key,
    read_photomaker_checkpoint,
    tokens_per_photo,
)
from encoders.standins.face_pack import synthetic_face
from encoders.standins.id_models import photomaker_state, write_tiny_photomaker
from vault import codec
from vault.errors import InvalidInput, ModelUnavailable, PhotoRejected

ROOT = Path(__file__).resolve().parents[3]
MANIFESTS = Path(os.environ.get("IDVAULT_REFERENCE_MANIFESTS",
                                ROOT.parent / "shared" / "reference" / "manifests"))
# sha256 of json.dumps(sorted([name, shape]...)) of each manifest's tensors, with its
# tensor and parameter counts: the layouts stay checked where the manifests are absent.
DIGESTS = {
    "photomaker_v1_id_encoder": (
        "983a5e6c7d01318d97a477ade8dd4014f7c5030c9293cb9bcf6b2ece5f0d40ce", 407, 326_273_024),
    "photomaker_v2_id_encoder": (
        "d858b8edab1f834ccdcb5de4c6fd552aabaf6820af4f82da87f616a68d365a6c", 463, 543_395_840),
}
TRIGGER = 49408  # "img", added to the tokenizer
BOS, EOS = 49406, 49407


def layout_digest(layout: dict[str, tuple[int, ...]]) -> str:
    items = sorted((k, list(v)) for k, v in layout.items())
    return hashlib.sha256(json.dumps(items, separators=(",", ":")).encode()).hexdigest()


def manifest(name: str) -> dict:
    path = MANIFESTS / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"{path} is not on this machine (the digest test still checks the layout)")
    return json.loads(path.read_text())


def full_layout(version: str) -> dict[str, tuple[int, ...]]:
    return expected_layout(version)  # official config, built on the meta device


def sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# -- full-size layouts (meta device) --------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_id_encoder_matches_the_official_manifest_exactly(version):
    doc = manifest(f"photomaker_{version}_id_encoder")
    want = {k: tuple(v) for k, v in doc["tensors"].items()}
    with torch.device("meta"):
        module = PhotoMakerIDEncoder(version)
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}
    assert len(got) == doc["tensor_count"]
    assert sum(p.numel() for p in module.parameters()) == doc["param_count"]
    assert layout_digest(want) == DIGESTS[f"photomaker_{version}_id_encoder"][0]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_full_size_layout_digest(version):
    digest, count, params = DIGESTS[f"photomaker_{version}_id_encoder"]
    layout = full_layout(version)
    assert (layout_digest(layout), len(layout)) == (digest, count)
    assert sum(int(np.prod(s)) for s in layout.values()) == params


def test_full_size_damage_is_listed_exactly():
    expected = full_layout("v2")
    damaged = dict(expected)
    del damaged["fuse_module.layer_norm.bias"]
    damaged["fuse_module.extra.weight"] = (4,)
    damaged["visual_projection_2.weight"] = (1280, 512)
    damaged["vision_model.embeddings.position_ids"] = (1, 257)  # tolerated either way
    err = layout_error("PhotoMaker v2 ID encoder", "photomaker-v2.bin",
                       compare_layout(expected, damaged))
    assert isinstance(err, ModelUnavailable)
    assert str(err) == (
        "photomaker-v2.bin: does not match the PhotoMaker v2 ID encoder layout "
        "(463 tensors expected):\n"
        "  - missing keys (1): fuse_module.layer_norm.bias\n"
        "  - unexpected keys (1): fuse_module.extra.weight\n"
        "  - shape mismatches (1): visual_projection_2.weight is (1280, 512) in the file, "
        "expected (1280, 1024)")
    assert err.details["missing"] == ["fuse_module.layer_norm.bias"]


def test_long_lists_are_capped_and_counted():
    report = compare_layout(full_layout("v2"), full_layout("v1"))
    assert len(report.missing) == 56 and not report.unexpected and not report.mismatched
    line = report.lines()[0]
    assert line.startswith("missing keys (56): qformer_perceiver.perceiver_resampler.layers.0.0.")
    assert line.endswith("; ... and 46 more")


def test_position_ids_are_tolerated_either_way():
    expected = full_layout("v1")
    assert "vision_model.embeddings.position_ids" not in expected  # official: no such key
    with_ids = {**expected, "vision_model.embeddings.position_ids": (1, 257)}
    assert compare_layout(expected, with_ids).ok
    assert compare_layout(with_ids, expected).ok


# -- tiny checkpoints ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("photomaker")
    write_tiny_photomaker(d / "photomaker-v1.bin", "v1", seed=0)
    write_tiny_photomaker(d / "photomaker-v2.bin", "v2", seed=1)
    write_tiny_photomaker(d / "other" / "photomaker-v2.safetensors", "v2", seed=1)
    return d


@pytest.fixture(scope="module")
def encoders_(tiny_dir):
    return {v: PhotoMakerEncoder.from_models_dir(tiny_dir, version=v, config=TINY_PHOTOMAKER,
                                                 device="cpu")
            for v in ("v1", "v2")}


@pytest.fixture(scope="module")
def people(analyzer):
    photos = [synthetic_face(4, s, 256) for s in range(3)]
    return photos, analyzer.analyze_many(photos)


def _damaged(tmp_path: Path, version: str, edit) -> Path:
    ids = photomaker_state(version, seed=1)
    edit(ids)
    from encoders.standins.id_models import tiny_lora_weights

    path = tmp_path / f"photomaker-{version}.bin"
    torch.save({"id_encoder": ids, "lora_weights": tiny_lora_weights()}, path)
    return path


def test_damaged_checkpoint_errors_name_the_file_and_every_difference(tmp_path):
    def edit(ids):
        del ids["qformer_perceiver.token_norm.bias"]
        ids["qformer_perceiver.surplus"] = torch.zeros(3)
        ids["visual_projection.weight"] = torch.zeros(768, 16)

    path = _damaged(tmp_path, "v2", edit)
    n = len(expected_layout("v2", TINY_PHOTOMAKER))
    with pytest.raises(ModelUnavailable) as err:
        read_photomaker_checkpoint(path, config=TINY_PHOTOMAKER)
    assert str(err.value) == (
        f"{path}: does not match the PhotoMaker v2 ID encoder layout ({n} tensors expected):\n"
        "  - missing keys (1): qformer_perceiver.token_norm.bias\n"
        "  - unexpected keys (1): qformer_perceiver.surplus\n"
        "  - shape mismatches (1): visual_projection.weight is (768, 16) in the file, "
        "expected (768, 32)")


def test_a_tiny_file_is_refused_by_the_official_layout(tiny_dir):
    path = tiny_dir / "photomaker-v1.bin"
    with pytest.raises(ModelUnavailable) as err:
        read_photomaker_checkpoint(path)  # official sizes
    text = str(err.value)
    assert text.startswith(f"{path}: does not match the PhotoMaker v1 ID encoder layout "
                           "(407 tensors expected):\n  - missing keys (")
    assert "shape mismatches" in text and "is (32, 3, 32, 32) in the file, expected " \
        "(1024, 3, 14, 14)" in text


def test_truncated_and_foreign_files_are_refused(tmp_path, tiny_dir):
    data = (tiny_dir / "photomaker-v2.bin").read_bytes()
    cut = tmp_path / "photomaker-v2.bin"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelUnavailable) as err:
        read_photomaker_checkpoint(cut, config=TINY_PHOTOMAKER)
    assert str(err.value) == (
        f"PhotoMaker checkpoint {cut}: cannot be read as a PyTorch checkpoint (truncated or "
        "corrupt?): PytorchStreamReader failed reading zip archive: failed finding central "
        "directory")

    st = (tiny_dir / "other" / "photomaker-v2.safetensors").read_bytes()
    cut_st = tmp_path / "photomaker-v2.safetensors"
    cut_st.write_bytes(st[: len(st) // 2])
    with pytest.raises(ModelUnavailable) as err:
        read_photomaker_checkpoint(cut_st, config=TINY_PHOTOMAKER)
    assert str(err.value) == (
        f"PhotoMaker checkpoint {cut_st}: cannot be read as safetensors (truncated or "
        "corrupt?): Error while deserializing header: incomplete metadata, file not fully "
        "covered")

    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ModelUnavailable, match="empty.bin: empty file$"):
        read_photomaker_checkpoint(empty)
    lfs = tmp_path / "lfs.bin"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    with pytest.raises(ModelUnavailable, match="a Git LFS pointer, not the checkpoint"):
        read_photomaker_checkpoint(lfs)
    html = tmp_path / "html.bin"
    html.write_text("<html>Not found</html>")
    with pytest.raises(ModelUnavailable, match="not a PyTorch checkpoint"):
        read_photomaker_checkpoint(html)


class _NotATensor:
    pass


def test_pickles_are_read_with_weights_only(tmp_path):
    path = tmp_path / "photomaker-v1.bin"
    torch.save({"id_encoder": {}, "lora_weights": _NotATensor()}, path)
    with pytest.raises(ModelUnavailable) as err:
        read_photomaker_checkpoint(path)
    assert str(err.value) == (
        f"PhotoMaker checkpoint {path}: refused: it holds Python objects other than tensors "
        f"({__name__}._NotATensor); idvault reads checkpoints only with "
        "torch.load(weights_only=True)")


def test_top_level_keys_must_be_the_official_two(tmp_path):
    path = tmp_path / "photomaker-v1.bin"
    torch.save({"id_encoder": photomaker_state("v1"), "extra": {}}, path)
    with pytest.raises(ModelUnavailable) as err:
        read_photomaker_checkpoint(path, config=TINY_PHOTOMAKER)
    assert str(err.value) == (f"PhotoMaker checkpoint {path}: top-level keys are ['extra', "
                              "'id_encoder']; expected exactly ['id_encoder', 'lora_weights']")


def test_version_comes_from_the_keys_not_the_file_name(tmp_path, tiny_dir):
    misnamed = tmp_path / "photomaker-v2.bin"
    misnamed.write_bytes((tiny_dir / "photomaker-v1.bin").read_bytes())
    encoder = PhotoMakerEncoder.from_models_dir(tmp_path, config=TINY_PHOTOMAKER, device="cpu")
    assert encoder.version == "v1" and encoder.tokens_per_photo == 1
    with pytest.raises(ModelUnavailable) as err:
        PhotoMakerEncoder.from_checkpoint(misnamed, version="v2", config=TINY_PHOTOMAKER)
    assert str(err.value) == (
        f"PhotoMaker checkpoint {misnamed}: holds a PhotoMaker v1 ID encoder (the version is "
        "read from its keys: qformer_perceiver.* means v2), but v2 was asked for")


def test_mixed_bf16_fp32_is_cast_and_position_ids_are_accepted(tmp_path):
    path = write_tiny_photomaker(tmp_path / "photomaker-v2.bin", "v2", seed=1,
                                 with_position_ids=True)
    stored = torch.load(path, weights_only=True)["id_encoder"]
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.bfloat16,
                                                                           torch.float32}
    model, info = load_photomaker(path, config=TINY_PHOTOMAKER)
    assert info.id_encoder_dtypes == ("torch.bfloat16", "torch.float32", "torch.int64")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert stored[key].dtype == torch.bfloat16
    torch.testing.assert_close(model.state_dict()[key], stored[key].float(), rtol=0, atol=0)
    ids = model.vision_model.embeddings.position_ids
    assert torch.equal(ids, torch.arange(TINY_PHOTOMAKER.vision.num_positions)[None])


def test_safetensors_variant_loads_the_same_weights(tiny_dir, encoders_, people):
    photos, faces = people
    st = PhotoMakerEncoder.from_checkpoint(tiny_dir / "other" / "photomaker-v2.safetensors",
                                           config=TINY_PHOTOMAKER, device="cpu")
    assert st.version == "v2" and st.lora_rank == 4
    np.testing.assert_array_equal(st.id_embeddings(photos, faces),
                                  encoders_["v2"].id_embeddings(photos, faces))
    # model_id is the file's own hash: the two files are different files.
    assert st.model_id != encoders_["v2"].model_id


def test_models_dir_lookup(tmp_path, tiny_dir):
    with pytest.raises(ModelUnavailable) as err:
        PhotoMakerEncoder.from_models_dir(tmp_path / "none", config=TINY_PHOTOMAKER)
    text = str(err.value)
    assert "PhotoMaker v2 (ID encoder with CLIP ViT-L/14 + ArcFace, SDXL LoRA): no usable file " \
        "named photomaker-v2.safetensors or photomaker-v2.bin in:" in text
    assert "PhotoMaker v1 (ID encoder with CLIP ViT-L/14, SDXL LoRA)" in text
    assert f"  - {tmp_path / 'none' / 'checkpoints'}" in text
    assert "https://huggingface.co/TencentARC/PhotoMaker-V2" in text
    # The default prefers v2; checkpoints/ is searched too.
    (tmp_path / "m" / "checkpoints").mkdir(parents=True)
    for v in ("v1", "v2"):
        (tmp_path / "m" / "checkpoints" / f"photomaker-{v}.bin").write_bytes(
            (tiny_dir / f"photomaker-{v}.bin").read_bytes())
    assert PhotoMakerEncoder.from_models_dir(tmp_path / "m", config=TINY_PHOTOMAKER,
                                             device="cpu").version == "v2"
    env = {"IDVAULT_MODELS": str(tmp_path / "m")}
    assert PhotoMakerEncoder.from_models_dir(version="v1", config=TINY_PHOTOMAKER, env=env,
                                             device="cpu").version == "v1"


# -- the math -------------------------------------------------------------------------------


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def _mlp(x, m, residual):
    h = F.layer_norm(x, (x.shape[-1],), m.layernorm.weight, m.layernorm.bias)
    h = F.linear(F.gelu(F.linear(h, m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias)
    return h + x if residual else h


def test_fuse_math_matches_a_straightforward_recomputation():
    fuse = _randomize(FuseModule(embed_dim=8, hidden_dim=6), seed=1)
    cls, ids = torch.randn(5, 8), torch.randn(5, 8)
    mixed = _mlp(torch.cat([cls, ids], -1), fuse.mlp1, residual=False) + cls
    want = F.layer_norm(_mlp(mixed, fuse.mlp2, residual=True), (8,), fuse.layer_norm.weight,
                        fuse.layer_norm.bias)
    torch.testing.assert_close(fuse.fuse_fn(cls, ids), want)


@pytest.mark.parametrize("version, photos, count", [("v1", 1, 1), ("v1", 4, 4), ("v2", 1, 2),
                                                    ("v2", 4, 8), ("v2", 30, 60)])
def test_class_word_expansion_token_counts(version, photos, count):
    # "a photo of a woman img in a garden"
    prompt = [BOS, 320, 1125, 539, 320, 2308, TRIGGER, 530, 320, 2445, EOS]
    out = expand_class_tokens(prompt, trigger_token_id=TRIGGER, num_photos=photos,
                              tokens_per_photo=tokens_per_photo(version), pad_token_id=EOS)
    assert out.count == count == sum(out.class_tokens_mask)
    assert len(out.input_ids) == len(out.class_tokens_mask) == 77
    assert out.class_index == 5
    assert out.input_ids[:5] == [BOS, 320, 1125, 539, 320]
    assert out.input_ids[5:5 + count] == [2308] * count
    assert out.input_ids[5 + count:5 + count + 4] == [530, 320, 2445, EOS]
    assert out.class_tokens_mask[5:5 + count] == [True] * count
    assert TRIGGER not in out.input_ids


def test_class_word_expansion_refuses_bad_prompts():
    kw = {"trigger_token_id": TRIGGER, "tokens_per_photo": 2, "pad_token_id": EOS}
    with pytest.raises(InvalidInput, match="exactly once \\(found 0\\)"):
        expand_class_tokens([BOS, 320, 2308, EOS], num_photos=1, **kw)
    with pytest.raises(InvalidInput, match="exactly once \\(found 2\\)"):
        expand_class_tokens([BOS, 2308, TRIGGER, 2308, TRIGGER, EOS], num_photos=1, **kw)
    with pytest.raises(InvalidInput, match="must follow a class word"):
        expand_class_tokens([TRIGGER, 2308, EOS], num_photos=1, **kw)
    with pytest.raises(InvalidInput, match="need 80 class positions from position 1, past the "
                                           "77-token limit"):
        expand_class_tokens([BOS, 2308, TRIGGER, EOS], num_photos=40, **kw)


def test_fuse_forward_replaces_the_class_positions_in_photo_order(encoders_, people):
    photos, faces = people
    encoder = encoders_["v2"]
    tensors, _ = encoder.encode(photos, faces)
    ids = torch.from_numpy(tensors["id_embeds"])  # (3, 2, 2048)
    prompt = [BOS, 320, 2308, TRIGGER, 530, EOS]
    expanded = expand_class_tokens(prompt, trigger_token_id=TRIGGER, num_photos=3,
                                   tokens_per_photo=2, pad_token_id=EOS)
    mask = torch.tensor([expanded.class_tokens_mask])
    embeds = torch.randn(1, 77, 2048)
    fuse = encoder.model.fuse_module
    with torch.inference_mode():
        out = fuse(embeds, ids, mask)
        want = fuse.fuse_fn(embeds[0, 2:8], ids.reshape(6, 2048))
    torch.testing.assert_close(out[0, 2:8], want)
    torch.testing.assert_close(out[0, :2], embeds[0, :2])
    torch.testing.assert_close(out[0, 8:], embeds[0, 8:])
    with pytest.raises(InvalidInput, match=r"\[6\] class-token position\(s\) per row but 4"):
        fuse(embeds, ids[:2], mask)


def test_perceiver_attention_matches_plain_attention():
    attn = _randomize(PerceiverAttention(dim=16, dim_head=4, heads=3), seed=2)
    x, lat = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    xn = F.layer_norm(x, (16,), attn.norm1.weight, attn.norm1.bias)
    ln = F.layer_norm(lat, (16,), attn.norm2.weight, attn.norm2.bias)
    q = ln @ attn.to_q.weight.T  # (2, 5, 12)
    k, v = (torch.cat([xn, ln], 1) @ attn.to_kv.weight.T).split(12, dim=-1)  # (2, 12, 12)

    def heads(t):
        return t.reshape(2, -1, 3, 4).permute(0, 2, 1, 3)

    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0, dim=-1)  # sqrt(4) = 2
    out = (w @ heads(v)).permute(0, 2, 1, 3).reshape(2, 5, 12) @ attn.to_out.weight.T
    torch.testing.assert_close(attn(x, lat), out)


def test_resampler_and_perceiver_output_shapes():
    r = Resampler(dim=32, depth=2, dim_head=8, heads=4, num_queries=16, embedding_dim=24,
                  output_dim=48, ff_mult=2)
    assert r(torch.randn(3, 50, 24)).shape == (3, 16, 48)
    with torch.device("meta"):
        official = PhotoMakerIDEncoder("v2").qformer_perceiver
        out = official(torch.randn(3, 512), torch.randn(3, 257, 1024))
    assert out.shape == (3, 2, 2048)  # two 2048-d tokens per photo
    assert official.perceiver_resampler.layers[0][0].heads == 16


def test_v1_id_embedding_is_both_projections_of_the_pooled_class_token(encoders_, people):
    photos, faces = people
    encoder = encoders_["v1"]
    got = encoder.id_embeddings(photos, faces)
    assert got.shape == (3, 1, 2048) and got.dtype == np.float32
    from encoders.id.clip_vision import clip_preprocess

    m = encoder.model
    with torch.inference_mode():
        out = m.vision_model(pixel_values=clip_preprocess(photos))
        ln = m.vision_model.post_layernorm
        pooled = F.layer_norm(out.last_hidden_state[:, 0], (32,), ln.weight, ln.bias, ln.eps)
        want = torch.cat([pooled @ m.visual_projection.weight.T,
                          pooled @ m.visual_projection_2.weight.T], -1)[:, None]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_v2_uses_the_raw_arcface_embedding_and_clip_last_hidden_state(encoders_, people):
    photos, faces = people
    encoder = encoders_["v2"]
    got = encoder.id_embeddings(photos, faces)
    assert got.shape == (3, 2, 2048)
    from encoders.id.clip_vision import clip_preprocess

    m = encoder.model
    q = m.qformer_perceiver
    raw = torch.from_numpy(np.stack([f.embedding for f in faces]))
    with torch.inference_mode():
        last = m.vision_model(pixel_values=clip_preprocess(photos)).last_hidden_state
        x = F.linear(F.gelu(F.linear(raw, q.token_proj[0].weight, q.token_proj[0].bias)),
                     q.token_proj[2].weight, q.token_proj[2].bias).reshape(3, 2, 2048)
        x = F.layer_norm(x, (2048,), q.token_norm.weight, q.token_norm.bias)
        want = x + q.perceiver_resampler(x, last)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    # The raw embedding is what counts: its scale changes the result, `normed` does not.
    scaled = [dataclasses.replace(f, embedding=f.embedding * 2) for f in faces]
    renormed = [dataclasses.replace(f, normed=np.zeros_like(f.normed)) for f in faces]
    assert not np.allclose(encoder.id_embeddings(photos, scaled), got)
    np.testing.assert_array_equal(encoder.id_embeddings(photos, renormed), got)


def test_every_photo_needs_its_face(encoders_, people):
    photos, faces = people
    with pytest.raises(PhotoRejected) as err:
        encoders_["v2"].encode(photos, [faces[0], None, faces[2]], names=["a.jpg", "b.jpg",
                                                                           "c.jpg"])
    assert str(err.value) == ("1 of 3 photos have no face; PhotoMaker needs the face of every "
                              "photo (none is dropped): b.jpg")
    with pytest.raises(InvalidInput, match="3 photos but 2 faces"):
        encoders_["v1"].encode(photos, faces[:2])
    with pytest.raises(InvalidInput, match="no photos"):
        encoders_["v1"].encode([], [])
    with pytest.raises(InvalidInput, match="CLIP input must be"):
        encoders_["v1"].encode([photos[0][:, :, 0]], faces[:1])


# -- artifacts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_artifacts_round_trip_and_name_the_checkpoint_hash(version, tiny_dir, encoders_, people):
    photos, faces = people
    tensors, metadata = encoders_[version].encode(photos, faces)
    assert metadata == {"model_id": f"photomaker/photomaker-{version}.bin@"
                                    f"{sha16(tiny_dir / f'photomaker-{version}.bin')}",
                        "version": version, "photos": "3"}
    decoded = codec.decode(codec.encode("photomaker", tensors, metadata), kind="photomaker")
    assert decoded.model_id == metadata["model_id"]
    assert decoded.metadata["version"] == version
    assert decoded.shapes == {"id_embeds": [3, 1 if version == "v1" else 2, 2048]}
    np.testing.assert_array_equal(decoded.tensors["id_embeds"], tensors["id_embeds"])


# -- lora_weights ---------------------------------------------------------------------------------


def test_official_lora_layout_is_read_with_rank_from_shapes():
    doc = manifest("photomaker_lora_weights")
    for rank in (8, 64):
        shapes = {k: [rank if d == "r" else d for d in s] for k, s in doc["tensors"].items()}
        info = inspect_lora(shapes)
        assert info.problems == [] and info.rank == rank == lora_rank(shapes)
        assert info.tensors == doc["tensor_count"] == 1120
        assert len(info.processors) == 140
    example = doc["observed_key_example"]
    assert example in doc["tensors"]
    assert peft_lora_key(example) == ("unet.down_blocks.2.attentions.0.transformer_blocks.2."
                                      "attn1.to_k.lora_A.weight")


def test_lora_helpers_refuse_inconsistent_layouts():
    base = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor"
    assert peft_lora_key(f"{base}.to_out_lora.up.weight") == \
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight"
    good = {f"{base}.to_q_lora.down.weight": (4, 1280), f"{base}.to_q_lora.up.weight": (1280, 4)}
    assert lora_rank(good) == 4
    mixed = {**good, f"{base}.to_k_lora.down.weight": (8, 1280),
             f"{base}.to_k_lora.up.weight": (1280, 8)}
    assert inspect_lora(mixed).problems == [("inconsistent LoRA ranks: rank 4 in 2 tensor(s), "
                                             "rank 8 in 2 tensor(s)")]
    lonely = {f"{base}.to_v_lora.down.weight": (4, 1280), "unet.foo.weight": (3, 3)}
    assert inspect_lora(lonely).problems == [
        f"{base}.to_v_lora.down.weight: no matching up weight",
        "unet.foo.weight: not an attention-processor LoRA key"]
    with pytest.raises(ModelUnavailable, match="lora_weights: no LoRA tensors"):
        lora_rank({})


def test_a_checkpoint_with_broken_lora_weights_is_refused(tmp_path):
    path = tmp_path / "photomaker-v1.bin"
    torch.save({"id_encoder": photomaker_state("v1"),
                "lora_weights": {"unet.x.processor.to_q_lora.down.weight": torch.zeros(4, 8)}},
               path)
    with pytest.raises(ModelUnavailable) as err:
        read_photomaker_checkpoint(path, config=TINY_PHOTOMAKER)
    assert str(err.value) == (
        f"{path}: lora_weights do not match the PhotoMaker LoRA layout "
        "(<processor>.processor.to_{q,k,v,out}_lora.{down,up}.weight, one rank):\n"
        "  - unet.x.processor.to_q_lora.down.weight: no matching up weight")
