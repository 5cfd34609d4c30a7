"""The artifact codec refuses anything but a payload matching its kind's schema."""

import json
import pickle
import struct

import numpy as np
import pytest
import safetensors.numpy

from tests.helpers import face_payload, unit
from vault import codec
from vault.artifact_kinds import KINDS
from vault.errors import ArtifactRejected


def _valid(kind):
    rng = np.random.default_rng(1)
    return {
        "face": ({"embeddings": rng.normal(size=(3, 512)), "normed": unit(rng.normal(size=(3, 512))),
                  "mean": unit(rng.normal(size=512))}, {"model_id": "buffalo_l"}),
        "photomaker": ({"id_embeds": rng.normal(size=(2, 2, 2048))},
                       {"model_id": "pm-v2", "version": "v2"}),
        "storymaker": ({"tokens": rng.normal(size=(20, 2048))},
                       {"model_id": "sm", "crop": "mask"}),
        "faceid": ({"normed": unit(rng.normal(size=(2, 512))),
                    "clip_embeds": rng.normal(size=(2, 257, 1280)),
                    "clip_negative": rng.normal(size=(257, 1280))},
                   {"model_id": "clip@a+buffalo_l@b", "face_model_id": "buffalo_l@b",
                    "clip_model_id": "clip@a"}),
        "instantid": ({"embeddings": rng.normal(size=(3, 512)) * 20,
                       "kps": rng.uniform(0, 512, size=(5, 2)),
                       "bbox": np.array([10.0, 20.0, 300.0, 380.0]),
                       "image_size": np.array([512.0, 512.0])},
                      {"model_id": "antelopev2/glintr100.onnx@c"}),
        "celeb_basis": ({"coefficients": rng.normal(size=(2, 512))},
                        {"model_id": "sd15", "basis_id": "abc"}),
        "lidb": ({"down_train": rng.normal(size=(176, 1, 100)),
                  "up_train": rng.normal(size=(176, 50, 1))},
                 {"model_id": "sd15", "seed": "1", "layers": "[]"}),
    }[kind]


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_round_trips(kind):
    tensors, meta = _valid(kind)
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    decoded = codec.decode(codec.encode(kind, tensors, meta), kind=kind)
    assert decoded.kind == kind and decoded.model_id == meta["model_id"]
    for name, value in tensors.items():
        np.testing.assert_array_equal(decoded.tensors[name], value)


def test_faceid_photo_limit_and_clip_dims_agree():
    tensors, meta = _valid("faceid")
    too_many = {**tensors, "normed": unit(np.ones((5, 512))),
                "clip_embeds": np.zeros((5, 257, 1280))}
    with pytest.raises(ArtifactRejected, match="photos"):
        codec.encode("faceid", {k: v.astype(np.float32) for k, v in too_many.items()}, meta)
    mismatched = {**tensors, "clip_negative": np.zeros((256, 1280))}
    with pytest.raises(ArtifactRejected, match="positions"):
        codec.encode("faceid", {k: v.astype(np.float32) for k, v in mismatched.items()}, meta)


def test_pickle_and_zip_refused():
    with pytest.raises(ArtifactRejected, match="pickle"):
        codec.decode(pickle.dumps({"a": 1}), kind="face")
    with pytest.raises(ArtifactRejected, match="pickle or torch zip"):
        codec.decode(b"PK\x03\x04" + b"\x00" * 100, kind="face")


def test_wrong_shape_names_tensor_and_rule():
    tensors, meta = _valid("storymaker")
    with pytest.raises(ArtifactRejected, match=r"tensor 'tokens': dim 0 is 19, must be 20"):
        codec.encode("storymaker", {"tokens": tensors["tokens"][:19].astype(np.float32)}, meta)


def test_wrong_dtype_and_missing_and_unexpected():
    tensors, meta = _valid("celeb_basis")
    with pytest.raises(ArtifactRejected, match=r"tensor 'coefficients': dtype int32 not allowed"):
        codec.encode("celeb_basis", {"coefficients": tensors["coefficients"].astype(np.int32)},
                     meta)
    with pytest.raises(ArtifactRejected) as exc:
        codec.encode("celeb_basis", {"other": np.zeros(3, np.float32)}, meta)
    assert "tensor 'other': not part of" in str(exc.value)
    assert "tensor 'coefficients': missing" in str(exc.value)


def test_symbolic_dims_bind_across_tensors():
    rng = np.random.default_rng(0)
    tensors = {"embeddings": rng.normal(size=(3, 512)).astype(np.float32),
               "normed": unit(rng.normal(size=(2, 512))),
               "mean": unit(rng.normal(size=512))}
    with pytest.raises(ArtifactRejected, match=r"\(photos\) is 2 but tensor 'embeddings' has"):
        codec.encode("face", tensors, {"model_id": "m"})


def test_photomaker_version_must_match_tokens():
    tensors, _ = _valid("photomaker")
    with pytest.raises(ArtifactRejected, match="v1 has 1 token"):
        codec.encode("photomaker", {"id_embeds": tensors["id_embeds"].astype(np.float32)},
                     {"model_id": "pm", "version": "v1"})


def test_nan_and_inf_refused():
    tensors, meta = _valid("celeb_basis")
    bad = tensors["coefficients"].astype(np.float32)
    bad[1, 7] = np.nan
    bad[0, 0] = np.inf
    with pytest.raises(ArtifactRejected, match=r"tensor 'coefficients': 2 value\(s\) are NaN"):
        codec.encode("celeb_basis", {"coefficients": bad}, meta)
    # The same check holds on decode, for payloads built outside the codec.
    payload = safetensors.numpy.save({"coefficients": bad},
                                     metadata={**meta, "idvault.kind": "celeb_basis"})
    with pytest.raises(ArtifactRejected, match="NaN"):
        codec.decode(payload, kind="celeb_basis")


def test_oversized_refused():
    payload = face_payload()
    with pytest.raises(ArtifactRejected, match="limit"):
        codec.decode(payload, kind="face", max_bytes=len(payload) - 1)


def test_metadata_required_and_checked():
    tensors, _ = _valid("storymaker")
    t = {"tokens": tensors["tokens"].astype(np.float32)}
    with pytest.raises(ArtifactRejected, match="metadata 'model_id': missing"):
        codec.encode("storymaker", t, {"crop": "mask"})
    with pytest.raises(ArtifactRejected, match="metadata 'crop': 'guess' is not one of"):
        codec.encode("storymaker", t, {"model_id": "m", "crop": "guess"})


def test_kind_mismatch_and_unknown_kind():
    with pytest.raises(ArtifactRejected, match="is a 'face' artifact, not 'lidb'"):
        codec.decode(face_payload(), kind="lidb")
    with pytest.raises(ArtifactRejected, match="unknown artifact kind"):
        codec.encode("dreambooth", {}, {})


@pytest.mark.parametrize("payload, match", [
    (b"", "too short"),
    (struct.pack("<Q", 10**9) + b"{}", "header length"),
    (struct.pack("<Q", 4) + b"nope", "not JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
])
def test_garbage_headers(payload, match):
    with pytest.raises(ArtifactRejected, match=match):
        codec.decode(payload, kind="face")


def test_lying_offsets_refused():
    payload = bytearray(face_payload())
    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + n])
    header["mean"]["data_offsets"][1] += 4096  # points past the end
    raw = json.dumps(header).encode().ljust(n)
    with pytest.raises(ArtifactRejected):
        codec.decode(bytes(payload[:8] + raw[:n] + payload[8 + n:]), kind="face")


def test_kinds_json_is_serialisable():
    docs = {k: s.to_json() for k, s in KINDS.items()}
    assert json.loads(json.dumps(docs))["storymaker"]["tensors"][0]["shape"] == [20, 2048]


def test_face_vectors_must_be_normalised():
    rng = np.random.default_rng(2)
    normed = unit(rng.normal(size=(2, 512)))
    normed[1] = 0.0  # a zero row would break the dedupe index for the whole owner
    with pytest.raises(ArtifactRejected, match=r"tensor 'normed': row 1 has L2 norm 0.0000"):
        codec.encode("face", {"embeddings": rng.normal(size=(2, 512)).astype(np.float32),
                              "normed": normed, "mean": unit(rng.normal(size=512))},
                     {"model_id": "m"})


def test_unknown_schema_version_refused():
    tensors, meta = _valid("celeb_basis")
    payload = safetensors.numpy.save(
        {"coefficients": tensors["coefficients"].astype(np.float32)},
        metadata={**meta, "idvault.kind": "celeb_basis", "idvault.schema_version": "7"})
    with pytest.raises(ArtifactRejected, match="schema version '7'"):
        codec.decode(payload, kind="celeb_basis")


def _rewritten(payload: bytes, **values: np.ndarray) -> bytes:
    """``payload`` with some tensors' bytes replaced, the header kept byte for byte (so it
    shares its layout with the payload it came from)."""
    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + n])
    data = bytearray(payload[8 + n:])
    for name, value in values.items():
        begin, end = header[name]["data_offsets"]
        data[begin:end] = np.ascontiguousarray(value, dtype=np.float32).tobytes()
    return payload[:8 + n] + bytes(data)


def _batch(rng) -> list[bytes]:
    out = [face_payload(photos=1 + i % 4, seed=i) for i in range(30)]
    t = codec.decode(face_payload(photos=2, seed=99), kind="face").tensors
    out.append(codec.encode("face", {k: v.astype(np.float16) for k, v in t.items()},
                            {"model_id": "buffalo_l"}))
    out.append(face_payload(photos=3, seed=5, model_id="antelopev2"))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("name", ["normed", "mean", "embeddings"])
def test_stack_rows_gives_what_decode_gives(name):
    payloads = _batch(np.random.default_rng(3))
    rows, counts = codec.stack_rows(payloads, kind="face", name=name)
    want = [codec.decode(p, kind="face").tensors[name].astype(np.float32).reshape(-1, 512)
            for p in payloads]
    assert counts == [len(w) for w in want]
    assert rows.dtype == np.float32 and np.array_equal(rows, np.concatenate(want))
    empty, none = codec.stack_rows([], kind="face", name=name)
    assert len(empty) == 0 and none == []


_GOOD = face_payload(photos=2, seed=1)  # made once: safetensors orders metadata at random


def _bad_payloads() -> list[bytes]:
    good = _GOOD
    t = codec.decode(good, kind="face").tensors
    nan = t["embeddings"].copy()
    nan[1, 3] = np.nan
    long = t["normed"] * 1.5
    inf_mean = t["mean"].copy()
    inf_mean[0] = np.inf
    return [_rewritten(good, embeddings=nan),  # same layout as its neighbours: value checks
            _rewritten(good, normed=long),
            _rewritten(good, mean=inf_mean),
            _rewritten(good, mean=t["mean"] * 0.5),
            face_payload(photos=2, seed=1)[:-4],  # truncated
            face_payload(model_id="m")[:9]]


@pytest.mark.parametrize("i", range(6))
def test_stack_rows_refuses_what_decode_refuses_with_its_message(i):
    bad = _bad_payloads()[i]
    with pytest.raises(ArtifactRejected) as want:
        codec.decode(bad, kind="face")
    batch = [_rewritten(_GOOD, **codec.decode(face_payload(photos=2, seed=j), kind="face")
                        .tensors) for j in range(5)]
    batch.insert(3, bad)  # one layout (bar the truncated), and not its first, fully decoded
    with pytest.raises(ArtifactRejected) as got:
        codec.stack_rows(batch, kind="face", name="normed")
    assert str(got.value) == str(want.value)


def test_stack_rows_checks_the_kind():
    with pytest.raises(ArtifactRejected, match="is a 'face' artifact, not 'lidb'"):
        codec.stack_rows([face_payload()], kind="lidb", name="down_train")
