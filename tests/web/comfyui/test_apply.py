"""The loader and apply nodes (web.comfyui.apply), fed by the Identity node from a real
server on loopback.

ComfyUI is not installed, and nothing here pretends it ran. The nodes are tested through
minimal objects implementing exactly what they call: :class:`FakeModelPatcher` has
ComfyUI's ``ModelPatcher.clone`` (a deep copy of ``model_options``),
``set_model_attn2_replace`` (ComfyUI's ``set_model_options_patch_replace``, written out)
and ``get_model_object`` (the SDXL attn2 linears' weight shapes, ``model_sampling``);
:class:`FakeControlNet` has ``copy``, ``set_cond_hint``, ``set_previous_controlnet`` and
``cond_hint_original``. The adapter files are idvault's stand-ins in the official layouts,
fitted to an SDXL-structured UNet (all 70 cross-attention layers, tiny widths).
"""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch

from encoders.id.checkpoints import STAND_INS_FILE
from tests.encoders.adapter_payloads import faceid_payload, instantid_payload
from tests.helpers import consent_doc
from vault import codec
from web.comfyui.apply import (
    AdapterError,
    IdvaultApplyFaceID,
    IdvaultApplyInstantID,
    IdvaultLoadFaceID,
    IdvaultLoadInstantID,
)
from web.comfyui.attention import SDXL_LAYERS, IdentityPatch
from web.comfyui.identity import IdvaultIdentity

WIDTHS = {"input": {4: 32, 5: 32, 7: 64, 8: 64}, "output": {0: 64, 1: 64, 2: 64, 3: 32,
                                                         4: 32, 5: 32}, "middle": {0: 64}}
CROSS = 2048  # the stand-ins' token width (TINY_FACEID, TINY_INSTANTID)


class FakeModelPatcher:
    """The ModelPatcher methods the apply nodes call, as ComfyUI implements them."""

    def __init__(self, widths=WIDTHS, cross: int = CROSS) -> None:
        self.model_options = {"transformer_options": {}}
        self.widths, self.cross = widths, cross

    def clone(self):
        n = FakeModelPatcher(self.widths, self.cross)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        to = self.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        block = (block_name, number) if transformer_index is None else (
            block_name, number, transformer_index)
        to["patches_replace"]["attn2"][block] = patch
        self.model_options["transformer_options"] = to

    def get_model_object(self, name: str):
        if name == "model_sampling":  # sigma falls linearly from 14.6 to 0.03
            return types.SimpleNamespace(percent_to_sigma=lambda p: 14.6 - p * (14.6 - 0.03))
        for layer in SDXL_LAYERS:
            if name in (f"{layer.path}.to_k", f"{layer.path}.to_v"):
                width = self.widths[layer.block][layer.number]
                return types.SimpleNamespace(weight=torch.empty(width, self.cross,
                                                                device="meta"))
        raise AttributeError(name)

    def patches(self) -> dict:
        return self.model_options["transformer_options"].get("patches_replace", {}).get(
            "attn2", {})


class FakeControlNet:
    def __init__(self) -> None:
        self.hint = self.strength = self.range = self.previous = None
        self.cond_hint_original = None

    def copy(self):
        return FakeControlNet()

    def set_cond_hint(self, hint, strength=1.0, timestep_percent_range=(0.0, 1.0)):
        self.hint, self.strength, self.range = hint, strength, timestep_percent_range
        self.cond_hint_original = hint
        return self

    def set_previous_controlnet(self, previous):
        self.previous = previous
        return self


@pytest.fixture(scope="module")
def sdxl_structure():
    """An SDXL-structured diffusers UNet on the meta device (the widths of WIDTHS, 2048-wide
    context): what the stand-in files are fitted to."""
    from diffusers import UNet2DConditionModel

    from generators.standins.pipelines import TinySDXLConfig, sdxl_unet_config

    cfg = TinySDXLConfig(block_out_channels=(16, 32, 64), transformer_layers_per_block=(1, 2, 10),
                         attention_head_dim=(2, 4, 8), text_hidden=768, text_hidden_2=1280)
    with torch.device("meta"):
        return UNet2DConditionModel(**sdxl_unet_config(cfg))


def _stand_in(folder, name: str, state: dict):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / name)
    (folder / STAND_INS_FILE).write_text(json.dumps({"files": [name]}))
    return folder / name


@pytest.fixture(scope="module")
def faceid_file(sdxl_structure, tmp_path_factory):
    from generators.adapters.faceid import TINY_FACEID
    from generators.standins.faceid import tiny_faceid_state

    state = tiny_faceid_state(sdxl_structure, config=TINY_FACEID, dtype=torch.float32)
    return _stand_in(tmp_path_factory.mktemp("faceid"), "ip-adapter-faceid-plusv2_sdxl.bin",
                     state)


@pytest.fixture(scope="module")
def instantid_file(sdxl_structure, tmp_path_factory):
    from generators.adapters.instantid import TINY_INSTANTID, build_image_proj, ip_adapter_layout

    torch.manual_seed(3)
    state = {"image_proj": build_image_proj(TINY_INSTANTID).state_dict(),
             "ip_adapter": {k: torch.randn(s) * 0.02
                            for k, s in ip_adapter_layout(sdxl_structure).items()}}
    return _stand_in(tmp_path_factory.mktemp("instantid"), "ip-adapter.bin", state)


def _lookup(web, live, handle: str, kind: str, payload: bytes) -> dict:
    owner, name = handle.split("/")
    resp = web.client.post("/v1/identities", headers=web.headers(owner), json={
        "name": name, "consent": consent_doc(purposes=["enroll", "generate"])})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    web.vault.put_artifact(handle, kind, payload, actor="test")
    key = web.key(owner, "identities:read", "artifacts:read")
    return IdvaultIdentity().load(server_url=live, api_key_env="IDVAULT_TEST_UNSET",
                                  api_key=key, handle=handle, kind=kind, purpose="generate")[0]


def test_apply_faceid_patches_every_cross_attention_with_the_methods_tokens(web, live,
                                                                            faceid_file):
    from generators.adapters.faceid import load_faceid

    payload = faceid_payload(1, photos=2)
    ana = _lookup(web, live, "smiths/ana", "faceid", payload)
    (adapter,) = IdvaultLoadFaceID().load(str(faceid_file))
    model = FakeModelPatcher()
    (work,) = IdvaultApplyFaceID().apply(model, ana, adapter, weight=0.9, s_scale=0.7,
                                         start_at=0.0, end_at=0.5)
    assert model.patches() == {}  # the input model is untouched (ComfyUI may reuse it)
    patches = work.patches()
    # 70 cross-attention blocks, the mid block's under both of ComfyUI's keys.
    assert len(patches) == 80 and len({id(p) for p in patches.values()}) == 70
    for layer in SDXL_LAYERS:
        patch = patches[(layer.block, layer.number, layer.index)]
        assert isinstance(patch, IdentityPatch) and patch.processor == layer.processor
        if layer.block == "middle":
            assert patches[("middle", 1, layer.index)] is patch
    (group,) = patches[("input", 4, 0)].groups
    assert group.scale == 0.9 and group.sigma_start == pytest.approx(14.6)
    assert group.sigma_end == pytest.approx(14.6 - 0.5 * (14.6 - 0.03))
    wk, wv = group.projections[1]
    assert wk is adapter["ip_adapter"]["1.to_k_ip.weight"] and tuple(wk.shape) == (32, CROSS)
    # The tokens are the faceid method's: ProjPlusModel with the shortcut, n x 4 tokens;
    # the negative is the zero face with the all-zero image's CLIP features, per photo.
    stored = codec.decode(payload).tensors
    proj, _ = load_faceid(faceid_file)
    with torch.no_grad():
        pos = proj(torch.from_numpy(stored["normed"]).float(),
                   torch.from_numpy(stored["clip_embeds"]).float(), shortcut=True, scale=0.7)
        neg = proj(torch.zeros(1, 512), torch.from_numpy(stored["clip_negative"]).float()[None],
                   shortcut=True, scale=0.7)
    (ident,) = group.identities
    assert ident.handle == "smiths/ana" and ident.mask is None
    torch.testing.assert_close(ident.cond, pos.reshape(8, CROSS), rtol=0, atol=0)
    torch.testing.assert_close(ident.uncond, neg.repeat(2, 1, 1).reshape(8, CROSS),
                               rtol=0, atol=0)

    # A second identity of the same adapter joins its softmax, in its own region.
    ben = _lookup(web, live, "smiths/ben", "faceid", faceid_payload(2, photos=1))
    mask = torch.zeros(64, 128)
    mask[:, 64:] = 1.0
    (both,) = IdvaultApplyFaceID().apply(work, ben, adapter, weight=0.9, s_scale=0.7,
                                         start_at=0.0, end_at=0.5, mask=mask[None])
    (joint,) = both.patches()[("output", 2, 9)].groups
    assert [i.handle for i in joint.identities] == ["smiths/ana", "smiths/ben"]
    assert torch.equal(joint.identities[1].mask, mask)


def test_apply_refuses_what_does_not_fit(web, live, faceid_file, instantid_file):
    ana = _lookup(web, live, "smiths/ana", "faceid", faceid_payload(1))
    (adapter,) = IdvaultLoadFaceID().load(str(faceid_file))
    args = {"weight": 1.0, "s_scale": 1.0, "start_at": 0.0, "end_at": 1.0}
    with pytest.raises(AdapterError, match="kind 'instantid'"):
        IdvaultApplyInstantID().apply(FakeModelPatcher(), [], [], FakeControlNet(), ana,
                                      {"projection": None}, 0.8, 0.8, 0.0, 1.0)
    narrow = FakeModelPatcher(cross=1024)  # an SD2-width context: not this adapter's model
    with pytest.raises(ValueError, match=r"1.to_k_ip.weight: shape \(32, 2048\), the model's "
                                         r"diffusion_model.input_blocks.4.1.transformer_blocks."
                                         r"0.attn2.to_k is \(32, 1024\)"):
        IdvaultApplyFaceID().apply(narrow, ana, adapter, **args)
    with pytest.raises(AdapterError, match="start_at"):
        IdvaultApplyFaceID().apply(FakeModelPatcher(), ana, adapter, **{**args, "start_at": 0.8,
                                                                        "end_at": 0.2})
    # Another node's patch already there: refused, not silently replaced.
    taken = FakeModelPatcher()
    taken.set_model_attn2_replace(lambda *a: None, "input", 4, 0)
    with pytest.raises(ValueError, match="another node's attention patch"):
        IdvaultApplyFaceID().apply(taken, ana, adapter, **args)
    # Files: InstantID's adapter is not FaceID's, and a missing file says where it looked.
    with pytest.raises(Exception, match="not IP-Adapter-FaceID Plus v2"):
        IdvaultLoadFaceID().load(str(instantid_file))
    with pytest.raises(AdapterError, match="not found .*ComfyUI/models/ipadapter"):
        IdvaultLoadFaceID().load("nope.bin")


def test_apply_instantid_patches_the_model_and_sets_the_identitynet(web, live, instantid_file):
    payload = instantid_payload(4, photos=2)
    cy = _lookup(web, live, "smiths/cy", "instantid", payload)
    (adapter,) = IdvaultLoadInstantID().load(str(instantid_file))
    prev = object()  # a ControlNet already on the positive conditioning
    positive = [[torch.ones(1, 77, CROSS), {"pooled_output": 1, "control": prev}]]
    negative = [[torch.zeros(1, 77, CROSS), {"pooled_output": 0}]]
    cnet = FakeControlNet()
    work, pos_out, neg_out = IdvaultApplyInstantID().apply(
        FakeModelPatcher(), positive, negative, cnet, cy, adapter, ip_weight=0.8,
        cn_strength=0.6, start_at=0.0, end_at=0.9)
    # The model: InstantID's tokens in every cross-attention.
    (group,) = work.patches()[("middle", 0, 3)].groups
    stored = codec.decode(payload).tensors
    with torch.no_grad():
        emb = torch.from_numpy(stored["embeddings"]).reshape(1, -1, 512)
        neg, pos = adapter["projection"](torch.cat([torch.zeros_like(emb), emb]))
    (ident,) = group.identities
    assert torch.equal(ident.cond, pos) and torch.equal(ident.uncond, neg)
    assert ident.cond.shape == (16, CROSS) and group.scale == 0.8
    # The conditioning: the IdentityNet with the keypoint image and the tokens as context.
    assert positive[0][1]["control"] is prev  # inputs untouched
    (p,), (n,) = pos_out, neg_out
    assert p[1]["pooled_output"] == 1 and n[1]["pooled_output"] == 0
    c_pos, c_neg = p[1]["control"], n[1]["control"]
    assert c_pos.previous is prev and c_neg.previous is None
    assert c_pos.strength == 0.6 and c_pos.range == (0.0, 0.9)
    assert p[1]["control_apply_to_uncond"] is False
    torch.testing.assert_close(p[1]["cross_attn_controlnet"], pos[None], rtol=0, atol=0)
    torch.testing.assert_close(n[1]["cross_attn_controlnet"], neg[None], rtol=0, atol=0)
    # Full frame: the official drawing at the reference photo's size (400 x 500), in 0..1.
    from generators.adapters.keypoints import draw_kps

    hint = c_pos.hint
    assert hint.shape == (1, 3, 500, 400) and float(hint.max()) <= 1.0
    want = draw_kps((400, 500), stored["kps"]).astype(np.float32) / 255.0
    np.testing.assert_array_equal(hint[0].permute(1, 2, 0).numpy(), want)
    assert "mask" not in p[1]

    # With a mask: the keypoints go in the mask's box of the canvas, the positive
    # conditioning is masked (ComfyUI_InstantID's way), the tokens regional.
    mask = torch.zeros(1, 128, 256)
    mask[0, :, 128:] = 1.0
    _, pos_m, _ = IdvaultApplyInstantID().apply(
        FakeModelPatcher(), positive, negative, cnet, cy, adapter, 0.8, 0.6, 0.0, 1.0,
        mask=mask, width=256, height=128)
    d = pos_m[0][1]
    assert torch.equal(d["mask"], mask) and d["set_area_to_bounds"] is False
    drawn = d["control"].hint[0]
    assert drawn.shape == (3, 128, 256)
    assert drawn[:, :, 128:].any() and not drawn[:, :, :128].any()  # only in its box
    # A buffalo_l artifact is not what InstantID reads.
    bo = _lookup(web, live, "smiths/bo", "instantid",
                 instantid_payload(5, model_id="buffalo_l/w600k_r50.onnx@0123456789abcdef"))
    with pytest.raises(AdapterError, match="antelopev2"):
        IdvaultApplyInstantID().apply(FakeModelPatcher(), positive, negative, cnet, bo, adapter,
                                      0.8, 0.8, 0.0, 1.0)
