"""IP-Adapter-FaceID Plus v2 identities in ComposePipeline (generators.methods.faceid).

Two models folders:

* ``wide``: the generation stand-ins of tests/generators/test_compose.py (``sdxl-tiny``
  with 2048-wide text conditioning, PhotoMaker's checkpoints and the FaceID stand-in for
  it, generators.standins.faceid): mixing, locality, four people, refusals.
* ``narrow``: the default tiny SDXL (64-wide conditioning) and a FaceID stand-in in the
  official structure at that width, which diffusers' ``load_ip_adapter`` can rebuild
  (it hard-codes depth 4, heads of 64 and feed-forward x4): the conformance test.

Identities get random ``faceid`` artifacts in the real schema; the CLIP features of the
all-zero image (``clip_negative``) are the same for every artifact, as they are for every
artifact made with one CLIP tower.
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from generators.compose import ComposePipeline
from generators.layout import MaskConfig, grid_for_length, parse_layout
from generators.methods.base import IdentityRequest
from generators.methods.faceid import FaceIDMethod, FaceIDSettings
from generators.standins.faceid import write_tiny_faceid
from tests.generators.test_compose import (
    HALVES,
    UNetCalls,
    _cross_attention_run,
    _state,
    model_ids,
    photomaker_payload,
    tiny_generation_models,
)
from tests.helpers import consent, unit
from vault import codec
from vault.config import Settings
from vault.errors import InvalidInput, ModelUnavailable
from vault.vault import Vault

CLIP_DIM, POSITIONS = 32, 50  # the tiny CLIP ViT-H/14 stand-in: width 32, 7 x 7 + 1 positions
NEGATIVE = np.random.default_rng(99).normal(size=(POSITIONS, CLIP_DIM)).astype(np.float32)


def faceid_payload(seed: int, photos: int = 2, clip_dim: int = CLIP_DIM) -> bytes:
    rng = np.random.default_rng(seed)
    negative = NEGATIVE if clip_dim == CLIP_DIM else rng.normal(size=(POSITIONS, clip_dim))
    return codec.encode(
        "faceid",
        {"normed": unit(rng.normal(size=(photos, 512))),
         "clip_embeds": rng.normal(size=(photos, POSITIONS, clip_dim)).astype(np.float32),
         "clip_negative": negative.astype(np.float32)},
        {"model_id": "clip-vit-h-14@0123456789abcdef+buffalo_l@fedcba9876543210",
         "face_model_id": "buffalo_l@fedcba9876543210",
         "clip_model_id": "clip-vit-h-14@0123456789abcdef"})


class FaceEnv:
    """A vault with owner ``smiths`` and a ComposePipeline on ``models``."""

    def __init__(self, root: Path, models: Path) -> None:
        self.models = models
        self.vault = Vault.init(Settings(data_dir=root / "vault"), actor="test")
        self.vault.add_owner("smiths", "family", actor="test")
        self.seed = 0
        self.pipe = ComposePipeline.from_pretrained(None, vault=self.vault, models_dir=models)

    @property
    def method(self) -> FaceIDMethod:
        return self.pipe.methods["faceid"]

    def person(self, handle: str, *, photos: int = 2, photomaker: bool = False) -> str:
        self.vault.create_identity(handle, consent(purposes=["enroll", "generate"]),
                                   actor="test")
        self.replace(handle, photos=photos)
        if photomaker:
            self.vault.put_artifact(handle, "photomaker",
                                    photomaker_payload(model_ids(self.models)["v2"], 7))
        return handle

    def replace(self, handle: str, *, photos: int = 2, **kwargs) -> None:
        """(Re)write the identity's faceid artifact with fresh random tensors."""
        self.seed += 1
        self.vault.put_artifact(handle, "faceid", faceid_payload(100 + self.seed, photos,
                                                                 **kwargs))

    @contextlib.contextmanager
    def settings(self, **changes):
        saved = self.method.settings
        self.method.settings = FaceIDSettings(**changes)
        try:
            yield self.pipe
        finally:
            self.method.settings = saved


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> FaceEnv:
    """The generation stand-ins, which include the FaceID stand-in for ``sdxl-tiny``."""
    env = FaceEnv(tmp_path_factory.mktemp("faceid-wide"), tiny_generation_models())
    yield env
    env.vault.dispose()


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> FaceEnv:
    from generators.standins.pipelines import write_tiny_sdxl

    models = tmp_path_factory.mktemp("faceid-narrow-models")
    write_tiny_sdxl(models / "sdxl-tiny")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(models / "sdxl-tiny" / "unet")
    write_tiny_faceid(models, unet, seed=5)
    env = FaceEnv(tmp_path_factory.mktemp("faceid-narrow"), models)
    yield env
    env.vault.dispose()


# -- conformance ------------------------------------------------------------------------------
class _Outputs:
    """Each UNet call's input sample and output (diffusers passes the IP-Adapter's image
    embeddings as a list in ``added_cond_kwargs``, which UNetCalls does not record)."""

    def __init__(self, unet) -> None:
        self.calls: list[dict] = []
        self._h = unet.register_forward_hook(
            lambda m, args, out: self.calls.append({"sample": args[0].clone(),
                                                    "out": out[0].clone()}))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


@torch.no_grad()
def test_one_full_frame_identity_equals_diffusers_load_ip_adapter(narrow) -> None:
    """Official settings (image scale 1, LoRA 1, shortcut with s_scale 1), CFG 5, 2 steps,
    2 photos: every UNet output equals diffusers' own pipeline with ``load_ip_adapter``
    (the FaceID LoRA loaded by diffusers through peft from the same file), the projection's
    ``clip_embeds`` / ``shortcut`` set as its docs say, and ``ip_adapter_image_embeds``
    from the same normed embeddings."""
    from diffusers import StableDiffusionXLPipeline

    handle = narrow.person("smiths/fay")
    with UNetCalls(narrow.pipe.pipe.unet) as calls:
        ours = narrow.pipe(f"a photo of @{handle} hiking", seed=12, steps=2, method="faceid",
                           layout=f"{handle}=0,0,1,1")
    assert ours.methods == {handle: "faceid"}
    assert ours.manifest["adapters"] == [narrow.method.adapter_ids()[0]]
    assert len(calls.calls) == 2

    ref = StableDiffusionXLPipeline.from_pretrained(narrow.models / "sdxl-tiny")
    ref.set_progress_bar_config(disable=True)
    run = dict(prompt="a photo of person hiking", num_inference_steps=2, guidance_scale=5.0,
               height=64, width=64, output_type="latent")
    with _Outputs(ref.unet) as plain:  # the base model alone, for scale
        ref(**run, generator=torch.Generator().manual_seed(12))
    ref.load_ip_adapter(str(narrow.models), subfolder="",
                        weight_name="ip-adapter-faceid-plusv2_sdxl.bin", image_encoder_folder=None)
    assert "faceid_0" in ref.unet.peft_config  # diffusers loaded the file's LoRA itself
    t = narrow.vault.get_artifact(handle, "faceid", purpose="generate").artifact.tensors
    ids = torch.from_numpy(t["normed"])[None]  # (1, n, 512)
    clip = torch.from_numpy(t["clip_embeds"])[None]  # (1, n, P, C)
    negative = torch.from_numpy(t["clip_negative"])[None, None].expand_as(clip)
    projection = ref.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds = torch.cat([negative, clip])  # (2, n, P, C): negative first
    projection.shortcut, projection.shortcut_scale = True, 1.0
    with _Outputs(ref.unet) as theirs:
        ref(**run, generator=torch.Generator().manual_seed(12),
            ip_adapter_image_embeds=[torch.cat([torch.zeros_like(ids), ids])])

    worst = 0.0
    for mine, want, base in zip(calls.calls, theirs.calls, plain.calls, strict=True):
        torch.testing.assert_close(mine["sample"], want["sample"], atol=1e-4, rtol=1e-4)
        # Same math, different operation order (LoRA merged into the weights here, added by
        # peft there; the perceiver's q/k scaling; the regional processor's own SDPA calls):
        # float32 rounding of O(1) values, ~1e-6 in practice; 1e-4 leaves room for other
        # BLAS builds while any real difference (a token, a scale, the shortcut: >= 1e-2,
        # see the base-model gap below) would fail.
        torch.testing.assert_close(mine["out"], want["out"], atol=1e-4, rtol=1e-4)
        worst = max(worst, float((mine["out"] - want["out"]).abs().max()))
        assert float((want["out"] - base["out"]).abs().max()) > 1e-2  # the adapter acts
    print(f"faceid vs diffusers load_ip_adapter: largest UNet-output difference {worst:.2e}")


# -- the tokens -------------------------------------------------------------------------------
def _request(index: int, handle: str, payload: bytes) -> IdentityRequest:
    """A request as the pipeline hands it over: artifact metadata, then the decrypted one."""
    decoded = codec.decode(payload, kind="faceid")
    listed = {"id": f"art-{index}", "kind": "faceid", "model_id": decoded.model_id}
    return IdentityRequest(index, handle, "person", types.SimpleNamespace(artifacts=(listed,)),
                           method="faceid", opened=types.SimpleNamespace(artifact=decoded))


@torch.no_grad()
def test_tokens_cover_every_photo_negatives_are_the_zero_projection(wide) -> None:
    from generators.adapters.faceid import load_faceid

    method = wide.method
    a, b = _request(0, "smiths/a", faceid_payload(1, photos=1)), \
        _request(1, "smiths/b", faceid_payload(2, photos=3))
    method.select([a, b])
    assert a.artifact["id"] == "art-0" and b.artifact["id"] == "art-1"
    method.load(wide.pipe.pipe.unet)
    method.prepare([a, b])
    proj, _ = load_faceid(method.checkpoint()[1])
    for shortcut, s_scale in ((True, 1.0), (True, 0.3), (False, 1.0)):
        with wide.settings(shortcut=shortcut, s_scale=s_scale):
            tokens = method.image_tokens([a, b])
        assert tokens.global_range is None
        assert tokens.ranges == {"smiths/a": (0, 4), "smiths/b": (4, 16)}
        assert tokens.positive.shape == tokens.negative.shape == (16, 2048)
        tb = b.tensors
        want = proj(torch.from_numpy(tb["normed"]), torch.from_numpy(tb["clip_embeds"]),
                    shortcut=shortcut, scale=s_scale).reshape(-1, 2048)
        assert torch.equal(tokens.positive[4:], want)  # the same operations, in order
        zero = proj(torch.zeros(1, 512), torch.from_numpy(tb["clip_negative"])[None],
                    shortcut=shortcut, scale=s_scale).reshape(-1, 2048)
        assert torch.equal(tokens.negative[4:], zero.repeat(3, 1))
        assert torch.equal(tokens.negative[:4], zero)
    with pytest.raises(InvalidInput, match="s_scale must be a finite number"):
        FaceIDSettings(s_scale=float("nan"))


# -- locality -----------------------------------------------------------------------------------
@pytest.mark.parametrize("other", ["faceid", "photomaker"])
def test_replacing_a_artifact_changes_cross_attention_only_inside_its_mask(wide, other) -> None:
    """A uses FaceID; B FaceID or PhotoMaker (methods mix). A new faceid artifact for A
    leaves every cross-attention output outside A's mask as it was, at both SDXL
    cross-attention resolutions, and changes every position inside it."""
    a, b = wide.person(f"smiths/fa-{other}"), wide.person(f"smiths/fb-{other}", photomaker=True)
    prompt = f"@{a}:girl and @{b}:man by the sea"
    how = {a: "faceid", b: other}
    halves = HALVES.replace("ana", a).replace("ben", b)
    sd = wide.pipe.pipe
    processors, weights = dict(sd.unet.attn_processors), _state(sd.unet)
    before = _cross_attention_run(wide.pipe, prompt, how, halves, None)
    wide.replace(a, photos=3)  # new tensors, another photo count
    after = _cross_attention_run(wide.pipe, prompt, how, halves, before)
    layout = parse_layout(halves, [a, b])
    grids = set()
    for name, rec in before.items():
        out0, out1 = rec["out"], after[name]["out"]  # (rows: negative, positive; q; C)
        _, h, w = grid_for_length((8, 16), out0.shape[1])
        grids.add((h, w))
        mask_a = torch.from_numpy(layout.mask_grid(a, h, w, MaskConfig(0.05)))
        torch.testing.assert_close(out1[:, mask_a == 0], out0[:, mask_a == 0], atol=1e-6,
                                   rtol=0, msg=name)
        # The negative tokens (the zero-input projection) do not depend on the identity.
        torch.testing.assert_close(out1[0], out0[0], atol=1e-6, rtol=0)
        change = (out1[1] - out0[1]).abs().amax(dim=-1)  # per query position
        assert (change[mask_a > 0] > 1e-6).all(), name
    assert grids == {(4, 8), (2, 4)}
    # Taken off again: the same processor objects, bit-identical weights (LoRA removed).
    assert all(sd.unet.attn_processors[n] is p for n, p in processors.items())
    now = sd.unet.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in weights.items())


# -- four people, provenance, nothing kept --------------------------------------------------------
QUADRANTS = "fq1=0,0,0.5,0.5;fq2=0.5,0,1,0.5;fq3=0,0.5,0.5,1;fq4=0.5,0.5,1,1"


def _tensors_reachable(obj, seen=None) -> dict[int, torch.Tensor]:
    """Every tensor reachable from ``obj`` through the attributes of plain objects and
    dataclasses, containers and modules (their parameters and buffers)."""
    seen = set() if seen is None else seen
    found: dict[int, torch.Tensor] = {}
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return {id(obj): obj}
    if isinstance(obj, torch.nn.Module):
        return {id(t): t for t in list(obj.parameters()) + list(obj.buffers())}
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, list | tuple | set | frozenset):
        items = list(obj)
    elif type(obj).__module__.startswith(("generators.", "tests.")):
        items = list(vars(obj).values()) if hasattr(obj, "__dict__") else []
    else:  # strings, numbers, paths, library objects
        return found
    for item in items:
        found.update(_tensors_reachable(item, seen))
    return found


def _instances(obj, cls, seen=None) -> list:
    """Every ``cls`` instance reachable from ``obj`` through idvault's own objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, cls):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, list | tuple | set | frozenset):
        items = list(obj)
    elif type(obj).__module__.startswith("generators.") and hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return []
    return [found for item in items for found in _instances(item, cls, seen)]


def _method_state(method: FaceIDMethod) -> dict[int, torch.Tensor]:
    """The tensors the method holds itself (``bind`` hands it the shared pipeline and
    vault, which are not its state)."""
    own = {k: v for k, v in vars(method).items() if k not in ("pipe", "vault")}
    return _tensors_reachable(own)


def test_four_people_mixed_then_nothing_derived_is_kept(wide) -> None:
    handles = [wide.person(f"smiths/fq{i}", photos=1 + i % 3, photomaker=i == 4)
               for i in range(1, 5)]
    method = wide.method
    prompt = " and ".join(f"@{h}" for h in handles) + " at a picnic"
    how = {h: "faceid" for h in handles[:3]} | {handles[3]: "photomaker"}
    result = wide.pipe(prompt, seed=3, steps=2, size=(128, 128), layout=QUADRANTS, method=how)
    assert result.image.size == (128, 128) and result.methods == how
    m = result.manifest
    assert [i["handle"] for i in m["identities"]] == handles
    assert [i["method"] for i in m["identities"]] == ["faceid"] * 3 + ["photomaker"]
    assert method.adapter_ids()[0] in m["adapters"]
    assert method.adapter_ids()[0].startswith("faceid/ip-adapter-faceid-plusv2_sdxl.bin@")

    # What the method holds after the call: exactly the adapter's weights.
    weights = _tensors_reachable(method._current())  # projection, LoRA, IP projections
    assert len(weights) > 3 and _method_state(method).keys() == weights.keys()
    method.end_call()
    assert _method_state(method).keys() == weights.keys()
    # ... and the pipeline's regional attention keeps no tokens or projections of them.
    from generators.regional_attention import RegionalState

    states = _instances(wide.pipe, RegionalState)
    assert states
    for state in states:
        assert state.conditioning is None and not state.image_kv


# -- refusals before any UNet work ---------------------------------------------------------------
def test_refusals_come_before_any_unet_work(wide, tmp_path) -> None:
    from generators.standins.faceid import tiny_faceid_state

    bare = "smiths/no-faceid"
    wide.vault.create_identity(bare, consent(purposes=["enroll", "generate"]), actor="test")
    wide.vault.put_artifact(bare, "photomaker", photomaker_payload(model_ids(wide.models)["v2"], 1))
    odd = wide.person("smiths/odd-clip")
    wide.replace(odd, clip_dim=48)  # not the adapter's CLIP width
    sd = wide.pipe.pipe
    with UNetCalls(sd.unet) as calls:
        with pytest.raises(InvalidInput, match="no faceid artifact .enroll with --kinds faceid"):
            wide.pipe(f"@{bare} in a cafe", steps=1, method="faceid")
        with pytest.raises(InvalidInput, match="holds 48-wide CLIP features .from "
                                               "clip-vit-h-14@0123456789abcdef.*needs 32"):
            wide.pipe(f"@{odd} in a cafe", steps=1, method="faceid")
        empty = ComposePipeline(sd, vault=wide.vault, models_dir=tmp_path / "none",
                                base_model_id="test")
        with pytest.raises(ModelUnavailable, match="ip-adapter-faceid-plusv2_sdxl.bin or "
                                                   "ip-adapter-faceid-plusv2_sdxl.safetensors"):
            empty(f"@{odd} in a cafe", steps=1, method="faceid")
        # A plain FaceID file under the PlusV2 name: refused when the weights load.
        state = tiny_faceid_state(sd.unet)
        state["image_proj"] = {k: v for k, v in state["image_proj"].items()
                               if not k.startswith("perceiver_resampler.")}
        (tmp_path / "plain").mkdir()
        torch.save(state, tmp_path / "plain" / "ip-adapter-faceid-plusv2_sdxl.bin")
        plain = ComposePipeline(sd, vault=wide.vault, models_dir=tmp_path / "plain",
                                base_model_id="test")
        with pytest.raises(ModelUnavailable, match="not IP-Adapter-FaceID Plus v2 for SDXL: it "
                                                   r"is IP-Adapter-FaceID \(ArcFace MLP"):
            plain(f"@{odd} in a cafe", steps=1, method="faceid")
    assert calls.calls == []
