"""InstantID identities in ComposePipeline (generators.methods.instantid).

The tiny generation stand-ins (tests/generators/test_compose.py's models folder, which holds
InstantID's ``ip-adapter.bin`` and ``ControlNetModel`` for ``sdxl-tiny``). Identities get
random ``instantid`` artifacts in the real schema, "made with" antelopev2's recogniser, so
consent, selection, decryption and the refusals are the product's.

The conformance reference is the official InstantID denoising loop
(InstantX/InstantID ``pipeline_stable_diffusion_xl_instantid.py``) written out here with
diffusers' own parts: ``load_ip_adapter`` for the Resampler and the IP attention (diffusers'
``IPAdapterPlusImageProjection`` / ``IPAdapterAttnProcessor2_0``: ``text + scale x ip``),
``ControlNetModel.from_pretrained`` for the IdentityNet, the official ``draw_kps`` written
from its source, and the ControlNet pipeline's ``prepare_image``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from encoders.library_output import quiet_libraries
from generators.compose import ComposePipeline
from generators.layout import MaskConfig, grid_for_length, parse_layout
from generators.methods.base import IdentityRequest, Scene
from generators.methods.instantid import InstantIDSettings
from generators.regional_attention import IdentityTokens, RegionalConditioning, RegionalConfig
from tests.generators.test_compose import _cross_attention_run, tiny_generation_models
from tests.helpers import consent
from vault import codec
from vault.config import Settings
from vault.errors import InvalidInput, ModelUnavailable
from vault.vault import Vault

ANTELOPE = "antelopev2/glintr100.onnx@0123456789abcdef"
HALVES = "a=0,0,0.5,1;b=0.5,0,1,1"
# A 64 x 64 reference photo's face: eyes, nose, mouth corners, its box.
KPS = np.array([[22, 26], [42, 25], [32, 36], [24, 46], [41, 46]], dtype=np.float32)
BBOX = np.array([12, 12, 52, 56], dtype=np.float32)


def instantid_payload(seed: int, *, photos: int = 2, model_id: str = ANTELOPE,
                      size: tuple[float, float] = (64.0, 64.0)) -> bytes:
    rng = np.random.default_rng(seed)
    kps = KPS + rng.uniform(-3, 3, size=KPS.shape).astype(np.float32)
    return codec.encode("instantid", {
        "embeddings": (rng.normal(size=(photos, 512)) * 20).astype(np.float32),
        "kps": kps, "bbox": BBOX, "image_size": np.array(size, dtype=np.float32)},
        {"model_id": model_id})


class Env:
    def __init__(self, root) -> None:
        self.models = tiny_generation_models()
        self.vault = Vault.init(Settings(data_dir=root / "vault"), actor="test")
        self.vault.add_owner("smiths", "family", actor="test")
        self.pipe = ComposePipeline.from_pretrained(None, vault=self.vault,
                                                    models_dir=self.models)
        self.seed = 0

    def person(self, handle: str, **kwargs) -> str:
        self.vault.create_identity(handle, consent(purposes=["enroll", "generate"]),
                                   actor="test")
        self.replace(handle, **kwargs)
        return handle

    def replace(self, handle: str, **kwargs) -> None:
        self.seed += 1
        self.vault.put_artifact(handle, "instantid", instantid_payload(self.seed, **kwargs))

    def tensors(self, handle: str) -> dict:
        return self.vault.get_artifact(handle, "instantid", purpose="generate").artifact.tensors

    @property
    def method(self):
        return self.pipe.methods["instantid"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    e = Env(tmp_path_factory.mktemp("compose-instantid"))
    yield e
    e.vault.dispose()


class Calls:
    """Every UNet call's inputs (ControlNet residuals included) and output."""

    def __init__(self, unet) -> None:
        self.calls: list[dict] = []
        self._h = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        down = kwargs.get("down_block_additional_residuals")
        mid = kwargs.get("mid_block_additional_residual")
        self.calls.append({
            "sample": args[0].clone(), "ehs": kwargs["encoder_hidden_states"].clone(),
            "added": {k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()},
            "down": None if down is None else [d.clone() for d in down],
            "mid": None if mid is None else mid.clone(), "out": output[0].clone()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


# -- conformance ---------------------------------------------------------------------------------
def official_draw_kps(image_pil, kps, color_list=((255, 0, 0), (0, 255, 0), (0, 0, 255),
                                                  (255, 255, 0), (255, 0, 255))):
    """InstantID's ``draw_kps``, written from its source."""
    import cv2

    stickwidth = 4
    limb_seq = np.array([[0, 2], [1, 2], [3, 2], [4, 2]])
    kps = np.array(kps)
    w, h = image_pil.size
    out_img = np.zeros([h, w, 3])
    for index in limb_seq:
        color = color_list[index[0]]
        x, y = kps[index][:, 0], kps[index][:, 1]
        length = ((x[0] - x[1]) ** 2 + (y[0] - y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(x)), int(np.mean(y))),
                                   (int(length / 2), stickwidth), int(angle), 0, 360, 1)
        out_img = cv2.fillConvexPoly(out_img.copy(), polygon, color)
    out_img = (out_img * 0.6).astype(np.uint8)
    for idx_kp, kp in enumerate(kps):
        x, y = kp
        out_img = cv2.circle(out_img.copy(), (int(x), int(y)), 10, color_list[idx_kp], -1)
    return PIL.Image.fromarray(out_img.astype(np.uint8))


@torch.no_grad()
def test_one_full_frame_identity_equals_the_official_instantid_pipeline(env) -> None:
    """Official settings (ip_adapter_scale 0.8, controlnet_conditioning_scale 0.8, CFG 5):
    every UNet call's image tokens, ControlNet residuals and output, two steps."""
    from diffusers import (
        ControlNetModel,
        EulerDiscreteScheduler,
        StableDiffusionXLControlNetPipeline,
        StableDiffusionXLPipeline,
    )

    handle = env.person("smiths/conform", photos=3)
    with Calls(env.pipe.pipe.unet) as calls:
        env.pipe(f"a photo of @{handle} hiking in the alps", seed=7, steps=2, method="instantid")
    ours = calls.calls
    assert len(ours) == 2

    t = env.tensors(handle)
    folder = env.models / "InstantID"
    with quiet_libraries():
        ref = StableDiffusionXLPipeline.from_pretrained(env.models / "sdxl-tiny")
        ref.set_progress_bar_config(disable=True)
        ref.load_ip_adapter(str(folder), subfolder="", weight_name="ip-adapter.bin",
                            image_encoder_folder=None)
        controlnet = ControlNetModel.from_pretrained(folder / "ControlNetModel").eval()
    ref.set_ip_adapter_scale(0.8)
    embeds, neg, pooled, neg_pooled = ref.encode_prompt(
        "a photo of person hiking in the alps", do_classifier_free_guidance=True)
    # _encode_prompt_image_emb: (1, photos, 512), zeros first, through image_proj_model.
    face = torch.from_numpy(t["embeddings"]).reshape(1, -1, 512)
    prompt_image_emb = torch.cat([torch.zeros_like(face), face])  # (2, 3, 512)
    tokens = ref.unet.encoder_hid_proj.image_projection_layers[0](prompt_image_emb)
    # The control image: draw_kps on the face photo, prepared by the ControlNet pipeline.
    photo = PIL.Image.new("RGB", tuple(int(v) for v in t["image_size"]))
    cn_pipe = StableDiffusionXLControlNetPipeline(**ref.components, controlnet=controlnet)
    image = cn_pipe.prepare_image(official_draw_kps(photo, t["kps"]), width=64, height=64,
                                  batch_size=1, num_images_per_prompt=1, device="cpu",
                                  dtype=controlnet.dtype, do_classifier_free_guidance=True,
                                  guess_mode=False)
    sched = EulerDiscreteScheduler.from_pretrained(env.models / "sdxl-tiny" / "scheduler")
    sched.set_timesteps(2)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    latents = latents * sched.init_noise_sigma
    added = {"text_embeds": torch.cat([neg_pooled, pooled]),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    worst = worst_res = 0.0
    for call, step in zip(ours, sched.timesteps, strict=True):
        x = sched.scale_model_input(torch.cat([latents] * 2), step)
        down, mid = controlnet(x, step, encoder_hidden_states=tokens, controlnet_cond=image,
                               conditioning_scale=0.8, guess_mode=False,
                               added_cond_kwargs=added, return_dict=False)
        out = ref.unet(x, step, encoder_hidden_states=torch.cat([neg, embeds]),
                       added_cond_kwargs={**added, "image_embeds": [prompt_image_emb[:, None]]},
                       down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
        # Different implementations of the same math (the Resampler's attention in
        # diffusers' Attention vs IP-Adapter's scaled q.k; the IP attention's op order),
        # in float32: they agree to float rounding, amplified through two UNet steps.
        torch.testing.assert_close(call["ehs"][:, 77:], tokens, atol=1e-5, rtol=1e-5)
        for got, want in zip(call["down"], down, strict=True):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(call["mid"], mid, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(call["out"], out, atol=1e-4, rtol=1e-4)
        worst = max(worst, (call["out"] - out).abs().max().item())
        worst_res = max([worst_res, (call["mid"] - mid).abs().max().item(),
                         *((g - w).abs().max().item() for g, w in zip(call["down"], down,
                                                                      strict=True))])
        uncond, text = out.chunk(2)
        latents = sched.step(uncond + 5.0 * (text - uncond), step, latents).prev_sample
    print(f"InstantID conformance: largest difference {worst:.2e} (UNet output), "
          f"{worst_res:.2e} (ControlNet residuals)")
    # ... and both branches matter: without residuals or image tokens the output differs.
    plain = ref.unet(x, step, encoder_hidden_states=torch.cat([neg, embeds]),
                     added_cond_kwargs={**added, "image_embeds": [prompt_image_emb[:, None]]}
                     ).sample
    assert (plain - out).abs().max() > 1e-3
    ref.set_ip_adapter_scale(0.0)
    no_tokens = ref.unet(x, step, encoder_hidden_states=torch.cat([neg, embeds]),
                         added_cond_kwargs={**added, "image_embeds": [prompt_image_emb[:, None]]},
                         down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample
    assert (no_tokens - out).abs().max() > 1e-3
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3  # the face moves the tokens


# -- residuals per region -----------------------------------------------------------------------
def _requests(env, handles: list[str]) -> list[IdentityRequest]:
    """Requests for ``handles`` with their decrypted artifacts, as ComposePipeline makes them."""
    out = []
    for i, h in enumerate(handles):
        opened = env.vault.get_artifact(h, "instantid", purpose="generate")
        resolved = SimpleNamespace(artifacts=[{"kind": "instantid", "model_id": ANTELOPE}])
        out.append(IdentityRequest(i, h, "person", resolved, method="instantid",
                                   opened=opened))
    return out


def _scene(handles: list[str], layout: str, latent_hw=(8, 16)) -> Scene:
    placed = parse_layout(layout, handles)
    conditioning = RegionalConditioning(placed, latent_hw,
                                        tuple(IdentityTokens(h) for h in handles),
                                        config=RegionalConfig(masks=MaskConfig(0.05)))
    return Scene(len(handles), placed, conditioning)


@torch.no_grad()
def test_residuals_are_exactly_zero_outside_their_identitys_box(env) -> None:
    a, b = env.person("smiths/res-a"), env.person("smiths/res-b")
    method = env.method
    requests = _requests(env, [a, b])
    method.select(requests)
    method.load(env.pipe.pipe.unet)
    method.prepare(requests)
    scene = _scene([a, b], HALVES.replace("a=", f"{a}=").replace("b=", f"{b}="))
    g = torch.Generator().manual_seed(0)
    kwargs = dict(sample=torch.randn(2, 4, 8, 16, generator=g), timestep=torch.tensor(601.0),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                     "time_ids": torch.tensor([[64.0, 128, 0, 0, 64, 128]] * 2)},
                  cfg=True)
    try:
        down_a, mid_a = method.unet_residuals(requests[:1], scene, **kwargs)
        down_b, mid_b = method.unet_residuals(requests[1:], scene, **kwargs)
        down_ab, mid_ab = method.unet_residuals(requests, scene, **kwargs)
    finally:
        method.end_call()
    layout = scene.layout
    grids = set()
    for ra, rb, rab in zip([*down_a, mid_a], [*down_b, mid_b], [*down_ab, mid_ab], strict=True):
        _, _, h, w = ra.shape
        grids.add((h, w))
        mask_a = torch.from_numpy(layout.mask_grid(a, h, w, MaskConfig(0.05))).view(h, w)
        assert torch.count_nonzero(ra[..., mask_a == 0]) == 0  # exactly zero outside A
        assert ra[..., mask_a > 0].abs().amax() > 1e-4  # and acting inside it
        # Both identities in one batched ControlNet call: the sum of their own residuals.
        torch.testing.assert_close(rab, ra + rb, atol=1e-5, rtol=1e-5)
    assert grids == {(8, 16), (4, 8), (2, 4)}  # every resolution of the UNet's skip path


@torch.no_grad()
def test_replacing_an_identity_changes_nothing_outside_its_region(env) -> None:
    """A's new artifact (tokens and keypoints) leaves B's region as it was: the first step's
    residuals and every cross-attention output outside A's mask."""
    a, b = env.person("smiths/loc-a"), env.person("smiths/loc-b")
    layout = HALVES.replace("a=", f"{a}=").replace("b=", f"{b}=")
    prompt = f"@{a}:girl and @{b}:man by the sea"
    with Calls(env.pipe.pipe.unet) as first:
        before = _cross_attention_run(env.pipe, prompt, "instantid", layout, None)
    env.replace(a)
    with Calls(env.pipe.pipe.unet) as second:
        after = _cross_attention_run(env.pipe, prompt, "instantid", layout, before)
    placed = parse_layout(layout, [a, b])
    r0, r1 = first.calls[0], second.calls[0]
    assert torch.equal(r0["sample"], r1["sample"])  # the same seeded start
    for d0, d1 in zip([*r0["down"], r0["mid"]], [*r1["down"], r1["mid"]], strict=True):
        _, _, h, w = d0.shape
        mask_a = torch.from_numpy(placed.mask_grid(a, h, w, MaskConfig(0.05))).view(h, w)
        torch.testing.assert_close(d1[..., mask_a == 0], d0[..., mask_a == 0], atol=1e-6,
                                   rtol=0)
        assert (d1 - d0)[..., mask_a > 0].abs().amax() > 1e-5
    for name, rec in before.items():
        out0, out1 = rec["out"], after[name]["out"]  # (rows: negative, positive; q; C)
        _, h, w = grid_for_length((8, 16), out0.shape[1])
        mask_a = torch.from_numpy(placed.mask_grid(a, h, w, MaskConfig(0.05)))
        torch.testing.assert_close(out1[:, mask_a == 0], out0[:, mask_a == 0], atol=1e-6,
                                   rtol=0, msg=name)
        change = (out1[1] - out0[1]).abs().amax(dim=-1)
        assert (change[mask_a > 0] > 1e-6).all(), name


# -- per-call state, selection, refusals ----------------------------------------------------------
def _tensors_in(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return 1
    if isinstance(obj, dict):
        return sum(_tensors_in(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensors_in(v) for v in obj)
    return _tensors_in(vars(obj)) if hasattr(obj, "__dataclass_fields__") else 0


def test_end_call_drops_tokens_and_keypoint_images_also_on_error(env) -> None:
    handle = env.person("smiths/ends")
    method = env.method
    during = []

    def look(done, total):
        during.append(_tensors_in(method._call))

    result = env.pipe(f"@{handle} in a cafe", seed=1, steps=2, method="instantid",
                      progress=look)
    assert during[0] == 3  # (negative, positive) tokens and the keypoint image
    assert method._call is None  # dropped when the call ended
    assert result.record.adapters == method.adapter_ids()
    assert {a.split("@")[0] for a in result.record.adapters} == {
        "instantid/ip-adapter.bin", "instantid/ControlNetModel"}

    def boom(done, total):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        env.pipe(f"@{handle} in a cafe", seed=1, steps=2, method="instantid", progress=boom)
    assert method._call is None
    # Loaded weights stay for the next call.
    assert method._loaded and method.controlnet is not None


def test_a_buffalo_l_artifact_is_refused_before_any_unet_work(env) -> None:
    handle = env.person("smiths/buffalo", model_id="buffalo_l/w600k_r50.onnx@0123456789abcdef")
    with Calls(env.pipe.pipe.unet) as calls:
        with pytest.raises(InvalidInput, match="InstantID reads embeddings of "
                                               "antelopev2/glintr100.onnx"):
            env.pipe(f"@{handle} in a cafe", steps=1, method="instantid")
        env.vault.create_identity("smiths/plain", consent(), actor="test")
        with pytest.raises(InvalidInput, match="no instantid artifact"):
            env.pipe("@smiths/plain in a cafe", steps=1, method="instantid")
    assert calls.calls == []


def test_absent_weights_are_model_unavailable_naming_the_instantid_folder(env, tmp_path) -> None:
    handle = env.person("smiths/noweights")
    empty = ComposePipeline(env.pipe.pipe, vault=env.vault, models_dir=tmp_path,
                            base_model_id="test")
    with Calls(env.pipe.pipe.unet) as calls, pytest.raises(
            ModelUnavailable, match=f"(?s)no usable file named ip-adapter.bin.*{tmp_path}"
                                    "/InstantID.*huggingface.co/InstantX/InstantID"):
        empty(f"@{handle} in a cafe", steps=1, method="instantid")
    assert calls.calls == []


def test_settings_are_the_official_defaults_and_checked() -> None:
    s = InstantIDSettings()
    assert (s.ip_adapter_scale, s.controlnet_conditioning_scale) == (0.8, 0.8)
    assert s.image_scale == 0.8  # what regional attention reads
    for bad in ({"ip_adapter_scale": -1.0}, {"controlnet_conditioning_scale": float("nan")},
                {"face_models": ()}):
        with pytest.raises(InvalidInput):
            InstantIDSettings(**bad)


@torch.no_grad()
def test_mixed_with_photomaker_and_storymaker_in_one_image(env) -> None:
    """Three people, three methods (two of them image-token adapters): InstantID's residuals
    are the only ones, so the UNet receives exactly zero outside its identity's box."""
    from tests.generators.test_compose import model_ids, photomaker_payload, storymaker_payload

    ids = model_ids(env.models)
    a = env.person("smiths/mix-a")
    b, c = "smiths/mix-b", "smiths/mix-c"
    for handle in (b, c):
        env.vault.create_identity(handle, consent(), actor="test")
    env.vault.put_artifact(b, "storymaker", storymaker_payload(ids["storymaker"], 3))
    env.vault.put_artifact(c, "photomaker", photomaker_payload(ids["v2"], 4))
    layout = f"{a}=0,0,0.34,1;{b}=0.33,0,0.67,1;{c}=0.66,0,1,1"
    with Calls(env.pipe.pipe.unet) as calls:
        result = env.pipe(f"@{a}:girl, @{b}:man and @{c}:boy on a beach", seed=2, steps=1,
                          size=(192, 64), layout=layout,
                          method={a: "instantid", b: "storymaker", c: "photomaker"})
    assert result.methods == {a: "instantid", b: "storymaker", c: "photomaker"}
    assert {x.split("/")[0] for x in result.record.adapters} >= {"instantid", "storymaker"}
    [call] = calls.calls
    placed = parse_layout(layout, [a, b, c])
    for residual in [*call["down"], call["mid"]]:
        _, _, h, w = residual.shape
        mask_a = torch.from_numpy(placed.mask_grid(a, h, w, MaskConfig(0.05))).view(h, w)
        assert torch.count_nonzero(residual[..., mask_a == 0]) == 0
        assert residual[..., mask_a > 0].abs().amax() > 1e-4
    # 77 text tokens, then StoryMaker's bg + one character (40) and InstantID's 16.
    assert call["ehs"].shape[1] == 77 + 40 + 16
