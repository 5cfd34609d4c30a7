"""ComposePipeline end to end on the tiny generation stand-ins (generators.compose).

The models folder is written once (generators.standins.generation: ``sdxl-tiny``
with 2048-wide text conditioning, PhotoMaker/StoryMaker checkpoints whose
LoRAs fit it). Identities get random artifacts in the real schemas, made
"with" those checkpoints (their model ids), so the vault, consent, method
selection and strict loading paths are the product's own. Images are 64x64
(8x8 latents) or 128x64 for the locality checks (cross-attention grids 8x4
and 4x2, so each half of the image has whole cells).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from generators.compose import ComposePipeline
from generators.layout import MaskConfig, grid_for_length, parse_layout
from generators.methods.base import IdentityMethod, ImageTokens
from generators.methods.photomaker import PhotoMakerSettings
from generators.methods.storymaker import StoryMakerMethod, StoryMakerSettings
from generators.prompt_tokens import tokenize_prompt
from generators.provenance import verify_image
from generators.regional_attention import ImageGroup
from tests.helpers import consent
from vault import audit, codec
from vault.config import Settings
from vault.errors import (
    ConsentWithdrawn,
    InvalidInput,
    ModelUnavailable,
    NotFound,
    PurposeNotGranted,
)
from vault.vault import Vault

PROMPT = "a photo of @smiths/ana:girl and @smiths/ben hiking in the alps"


@functools.lru_cache(maxsize=1)
def tiny_generation_models() -> Path:
    """The stand-ins, written once per test process (also used by tests/web)."""
    from generators.standins.generation import write_tiny_generation_models

    root = Path(tempfile.mkdtemp(prefix="idvault-gen-models-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    write_tiny_generation_models(root)
    return root


def model_ids(models: Path) -> dict[str, str]:
    from encoders.id.checkpoints import file_digest

    out = {}
    for key, name in (("v1", "photomaker-v1.bin"), ("v2", "photomaker-v2.bin")):
        out[key] = f"photomaker/{name}@{file_digest(models / name)[:16]}"
    out["storymaker"] = (f"storymaker/mask.bin@{file_digest(models / 'mask.bin')[:16]}"
                         "+clip@0123456789abcdef")
    return out


def photomaker_payload(model_id: str, seed: int, photos: int = 2, version: str = "v2") -> bytes:
    rng = np.random.default_rng(seed)
    tokens = 2 if version == "v2" else 1
    emb = rng.normal(size=(photos, tokens, 2048)).astype(np.float32)
    return codec.encode("photomaker", {"id_embeds": emb},
                        {"model_id": model_id, "version": version, "photos": str(photos)})


def storymaker_payload(model_id: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return codec.encode("storymaker", {"tokens": rng.normal(size=(20, 2048)).astype(np.float32)},
                        {"model_id": model_id, "crop": "face_box_fallback"})


class Env:
    def __init__(self, root: Path) -> None:
        self.models = tiny_generation_models()
        self.ids = model_ids(self.models)
        self.vault = Vault.init(Settings(data_dir=root / "vault"), actor="test")
        self.vault.add_owner("smiths", "family", actor="test")
        self.vault.add_owner("northlight", "studio", erase_policy="retain", actor="test")
        self.seed = 0
        self.pipe = ComposePipeline.from_pretrained(None, vault=self.vault,
                                                    models_dir=self.models)

    def person(self, handle: str, *, photomaker: bool = True, storymaker: bool = True,
               purposes: tuple[str, ...] = ("enroll", "generate")) -> str:
        self.vault.create_identity(handle, consent(purposes=list(purposes)), actor="test")
        self.replace(handle, photomaker=photomaker, storymaker=storymaker)
        return handle

    def replace(self, handle: str, *, photomaker: bool = True, storymaker: bool = True) -> None:
        """(Re)write the identity's artifacts with fresh random tensors."""
        self.seed += 1
        if photomaker:
            self.vault.put_artifact(handle, "photomaker",
                                    photomaker_payload(self.ids["v2"], self.seed))
        if storymaker:
            self.vault.put_artifact(handle, "storymaker",
                                    storymaker_payload(self.ids["storymaker"], self.seed))

    @contextlib.contextmanager
    def photomaker(self, **settings) -> Iterator[ComposePipeline]:
        """The shared pipeline with other PhotoMaker settings for a while (no reload)."""
        method = self.pipe.methods["photomaker"]
        saved, method.settings = method.settings, PhotoMakerSettings(**settings)
        try:
            yield self.pipe
        finally:
            method.settings = saved


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    e = Env(tmp_path_factory.mktemp("compose"))
    e.person("smiths/ana")
    e.person("smiths/ben")
    yield e
    e.vault.dispose()


class UNetCalls:
    """Records every UNet call of a pipeline: its keyword inputs and output."""

    def __init__(self, unet) -> None:
        self.calls: list[dict] = []
        self._h = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        self.calls.append({"sample": args[0].detach().clone(), "t": args[1],
                           "ehs": kwargs["encoder_hidden_states"].detach().clone(),
                           "added": {k: v.detach().clone()
                                     for k, v in kwargs["added_cond_kwargs"].items()},
                           "out": output[0].detach().clone()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


def _state(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


# -- plain equivalence, reuse, records ----------------------------------------------------------
def test_no_identity_is_exactly_the_plain_sdxl_pipeline(env) -> None:
    from diffusers import StableDiffusionXLPipeline

    result = env.pipe("two friends hiking in the alps, watercolor", seed=3, steps=2)
    plain = StableDiffusionXLPipeline(**env.pipe.pipe.components)
    plain.set_progress_bar_config(disable=True)
    want = plain("two friends hiking in the alps, watercolor", num_inference_steps=2,
                 height=64, width=64, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(3)).images[0]
    assert result.image.size == (64, 64)
    assert np.array_equal(np.asarray(result.image), np.asarray(want))
    assert list(result.timings) == ["check_inputs", "resolve", "encode_prompt", "conditioning",
                                    "prepare_latents", "denoise", "decode", "record", "total"]
    assert result.manifest["identities"] == [] and result.manifest["seed"] == 3


def test_two_identities_record_audit_provenance_and_reuse(env, tmp_path) -> None:
    unet = env.pipe.pipe.unet
    processors, weights = dict(unet.attn_processors), _state(unet)
    steps_seen = []
    result = env.pipe(PROMPT, seed=5, steps=2, method={"smiths/ana": "photomaker",
                                                       "smiths/ben": "storymaker"},
                      progress=lambda done, total: steps_seen.append((done, total)))
    assert steps_seen == [(1, 2), (2, 2)]
    assert result.methods == {"smiths/ana": "photomaker", "smiths/ben": "storymaker"}
    m = result.manifest
    assert [i["handle"] for i in m["identities"]] == ["smiths/ana", "smiths/ben"]
    assert [i["method"] for i in m["identities"]] == ["photomaker", "storymaker"]
    assert m["adapters"] == [env.ids["v2"], env.ids["storymaker"].split("+clip@")[0]]
    assert m["base_model"].startswith("sdxl-tiny@") and m["size"] == [64, 64]
    # Taken off again: the same processor objects and bit-identical weights.
    assert all(unet.attn_processors[n] is p for n, p in processors.items())
    now = unet.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in weights.items())
    # One audit event per identity, sharing the generation id.
    with env.vault.session() as s:
        events = [e for e in audit.events(s, limit=10) if e.action == "generate"
                  and e.details["generation"] == result.generation_id]
    assert sorted(e.subject for e in events) == ["smiths/ana", "smiths/ben"]
    assert events[0].details["seed"] == 5 and events[0].details["prompt_sha256"] == \
        m["prompt_sha256"] and len(events[0].details["artifacts"]) == 2
    # Signed PNG: valid; one changed pixel makes it altered.
    path = tmp_path / "scene.png"
    assert result.save(path) == m
    check = verify_image(env.vault, path)
    assert check.ok and check.manifest == m
    from PIL import Image

    with Image.open(path) as png:
        img, info = png.copy(), _png_info(png)
    img.putpixel((0, 0), tuple((c + 1) % 256 for c in img.getpixel((0, 0))))
    img.save(tmp_path / "edited.png", pnginfo=info)
    check = verify_image(env.vault, tmp_path / "edited.png")
    assert check.status == "altered" and check.reason == "pixels_changed"
    # Same seed, same settings: the same image.
    again = env.pipe(PROMPT, seed=5, steps=2, method={"smiths/ana": "photomaker",
                                                      "smiths/ben": "storymaker"})
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))


def _png_info(img):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in img.text.items():
        info.add_text(k, v)
    return info


def test_an_error_mid_generation_still_takes_everything_off(env) -> None:
    unet = env.pipe.pipe.unet
    processors, weights = dict(unet.attn_processors), _state(unet)

    def boom(done, total):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        env.pipe(PROMPT, seed=1, steps=2, method="storymaker", progress=boom)
    assert all(unet.attn_processors[n] is p for n, p in processors.items())
    now = unet.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in weights.items())


# -- refusals before any UNet work -------------------------------------------------------------
def test_consent_withdrawal_blocks_generation_at_once(env) -> None:
    handle = env.person("northlight/cleo")
    prompt = "@northlight/cleo on a stage"
    assert env.pipe(prompt, seed=0, steps=1).methods == {handle: "photomaker"}
    env.vault.withdraw_consent(handle, reason="changed her mind", actor="test")
    with env.vault.session() as s:
        last = audit.events(s, limit=1)[0].seq
    with UNetCalls(env.pipe.pipe.unet) as calls, pytest.raises(ConsentWithdrawn, match=handle):
        env.pipe(prompt, seed=0, steps=1)
    assert calls.calls == []  # nothing generated
    with env.vault.session() as s:  # nothing decrypted, no generate event
        assert [e for e in audit.events(s, limit=5) if e.seq > last] == []


@pytest.mark.parametrize("prompt, kwargs, error, message", [
    ("@smiths/zoe in a cafe", {}, NotFound, "no identity smiths/zoe"),
    ("@northlight/ida in a cafe", {"owner": "smiths"}, NotFound, "no identity northlight/ida"),
    ("@smiths/ana in a cafe", {"commercial": True}, PurposeNotGranted, "smiths/ana"),
    ("@smiths/dan in a cafe", {"method": "storymaker"}, InvalidInput, "no storymaker artifact"),
    ("@smiths/eli in a cafe", {"method": "photomaker"}, InvalidInput,
     "was made with photomaker/photomaker-v2.bin@0000"),
    ("@smiths/ana @smiths/ben @smiths/dan @smiths/eli", {"method": "storymaker"},
     InvalidInput, "3 character slots"),
    ("@smiths/ana in a cafe", {"layout": "ana=0,0,0.01,0.01"}, InvalidInput, "too small"),
    ("@smiths/ana in a cafe", {"method": "celeb"}, InvalidInput, "unknown method celeb"),
])
def test_refusals_come_before_any_unet_work(env, prompt, kwargs, error, message) -> None:
    for handle, pm, sm in (("northlight/ida", True, True), ("smiths/dan", True, False),
                           ("smiths/eli", False, True)):
        try:
            env.vault.describe(handle)
        except NotFound:
            env.person(handle, photomaker=pm, storymaker=sm)
            if handle == "smiths/eli":  # a PhotoMaker artifact from other weights
                env.vault.put_artifact(handle, "photomaker", photomaker_payload(
                    "photomaker/photomaker-v2.bin@0000000000000000", 9))
    with UNetCalls(env.pipe.pipe.unet) as calls, pytest.raises(error, match=message):
        env.pipe(prompt, seed=0, steps=1, **kwargs)
    assert calls.calls == []


def test_absent_or_misfit_checkpoints_are_model_unavailable(env, tmp_path) -> None:
    from encoders.id.checkpoints import file_digest
    from encoders.standins.id_models import write_tiny_photomaker

    empty = ComposePipeline(env.pipe.pipe, vault=env.vault, models_dir=tmp_path / "none",
                            base_model_id="test")
    with UNetCalls(env.pipe.pipe.unet) as calls:
        with pytest.raises(ModelUnavailable, match="photomaker-v2.safetensors or "
                                                   "photomaker-v2.bin"):
            empty("@smiths/ana", steps=1, method="photomaker")
        with pytest.raises(ModelUnavailable, match="no identity method's weights"):
            empty("@smiths/ana", steps=1)
        # The encoders' stand-in: its lora_weights cover full-size SDXL widths, which this
        # UNet does not have; refused when the weights load, naming the tensors.
        path = write_tiny_photomaker(tmp_path / "misfit" / "photomaker-v2.bin", "v2")
        (tmp_path / "misfit" / "idvault-stand-ins.json").write_text(
            '{"files": ["photomaker-v2.bin"]}')
        misfit = ComposePipeline(env.pipe.pipe, vault=env.vault, models_dir=tmp_path / "misfit",
                                 base_model_id="test")
        env.person("smiths/misfit", storymaker=False)
        env.vault.put_artifact("smiths/misfit", "photomaker", photomaker_payload(
            f"photomaker/photomaker-v2.bin@{file_digest(path)[:16]}", 3))
        with pytest.raises(ModelUnavailable,
                           match="(?s)does not fit this UNet.*shape \\(4, 640\\)"):
            misfit("@smiths/misfit", steps=1)
    assert calls.calls == []


def test_auto_picks_one_method_when_it_serves_everyone_else_mixes(env) -> None:
    assert set(env.pipe("@smiths/ana and @smiths/ben", seed=0, steps=1).methods.values()) == {
        "photomaker"}
    for handle, pm, sm in (("smiths/finn", False, True),):
        env.person(handle, photomaker=pm, storymaker=sm)
    got = env.pipe("@smiths/ana and @smiths/finn", seed=0, steps=1).methods
    assert got == {"smiths/ana": "storymaker", "smiths/finn": "storymaker"}
    env.person("smiths/gus", photomaker=True, storymaker=False)
    got = env.pipe("@smiths/gus and @smiths/finn", seed=0, steps=1).methods
    assert got == {"smiths/gus": "photomaker", "smiths/finn": "storymaker"}


def test_tokenize_prompt_expands_class_tokens_per_mention(env) -> None:
    toks = (env.pipe.pipe.tokenizer, env.pipe.pipe.tokenizer_2)
    text = "a girl and xylophonist by the sea"
    spans = [(2, 6), (11, 22)]  # "girl" (one token), "xylophonist" (byte pieces)
    t = tokenize_prompt(toks, text, spans, [4, 1])
    assert t.identity[0] == (2, 3, 4, 5)
    assert len(set(t.ids[0][2:6])) == 1  # the class token, four times
    assert len(t.words[1]) > 1 and t.identity[1] == (t.words[1][-1],)
    assert t.ids[0][:8] == t.ids[1][:8] and t.ids[0][-1] != t.ids[1][-1]  # pads differ
    plain = toks[0](text, padding="max_length", max_length=77).input_ids
    assert list(tokenize_prompt(toks, text, spans, [1, 1]).ids[0]) == plain
    with pytest.raises(InvalidInput, match="too long"):
        tokenize_prompt(toks, "sea " * 70 + text, [(280 + a, 280 + b) for a, b in spans], [8, 1])


# -- equivalence with the official single-identity methods ------------------------------------
def _encode_reference(pipe, ids_per_tokenizer):
    hidden, pooled = [], None
    for ids, encoder in zip(ids_per_tokenizer, (pipe.text_encoder, pipe.text_encoder_2),
                            strict=True):
        out = encoder(torch.tensor([ids]), output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else pooled
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def _fresh_unet(env):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(env.models / "sdxl-tiny" / "unet").eval()


def _reference_loop(env, unet, seed, phases, guidance=5.0):
    """The diffusers SDXL loop, written out: yields each step's UNet output."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler.from_pretrained(env.models / "sdxl-tiny" / "scheduler")
    sched.set_timesteps(len(phases))
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    latents = latents * sched.init_noise_sigma
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    outs = []
    for (ehs, pooled), t in zip(phases, sched.timesteps, strict=True):
        x = sched.scale_model_input(torch.cat([latents] * 2), t)
        out = unet(x, t, encoder_hidden_states=ehs,
                   added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        outs.append(out)
        uncond, text = out.chunk(2)
        latents = sched.step(uncond + guidance * (text - uncond), t, latents).prev_sample
    return outs


@torch.no_grad()
def test_photomaker_single_identity_equals_the_official_method(env) -> None:
    """One identity, full frame, official settings (LoRA 1.0, CFG 5): the official
    trigger-word prompt rewrite, SDXL encoding, FuseModule and ``i <= start_merge_step``."""
    from diffusers import StableDiffusionXLPipeline

    from encoders.id.photomaker import TINY_PHOTOMAKER, expand_class_tokens, load_photomaker

    with env.photomaker(start_merge_step=0) as pipe, UNetCalls(pipe.pipe.unet) as calls:
        pipe("a photo of @smiths/ana:girl hiking in the alps", seed=11, steps=2,
             method="photomaker")  # step 0: text only, step 1: fused
    ours = calls.calls
    assert len(ours) == 2

    # The reference, from the official recipe.
    sd = pipe.pipe
    opened = env.vault.get_artifact("smiths/ana", "photomaker", purpose="generate")
    id_embeds = torch.from_numpy(opened.artifact.tensors["id_embeds"])  # (2, 2, 2048)
    ids, mask = [], None
    for tok in (sd.tokenizer, sd.tokenizer_2):
        trigger = tok("img", add_special_tokens=False).input_ids
        assert len(trigger) == 1
        ex = expand_class_tokens(tok("a photo of girl img hiking in the alps").input_ids,
                                 trigger_token_id=trigger[0], num_photos=2, tokens_per_photo=2,
                                 pad_token_id=tok.pad_token_id)
        ids.append(ex.input_ids)
        mask = torch.tensor([ex.class_tokens_mask])
    embeds, pooled = _encode_reference(sd, ids)
    id_encoder, _ = load_photomaker(env.models / "photomaker-v2.bin", config=TINY_PHOTOMAKER)
    fused = id_encoder.fuse_module(embeds, id_embeds, mask)
    text_only, pooled_text = _encode_reference(sd, [
        tok("a photo of girl hiking in the alps", padding="max_length", max_length=77).input_ids
        for tok in (sd.tokenizer, sd.tokenizer_2)])
    zeros, zeros_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    phases = [(torch.cat([zeros, text_only]), torch.cat([zeros_pooled, pooled_text])),
              (torch.cat([zeros, fused]), torch.cat([zeros_pooled, pooled]))]
    for call, (ehs, pool) in zip(ours, phases, strict=True):  # the prompt embeddings
        torch.testing.assert_close(call["ehs"], ehs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(call["added"]["text_embeds"], pool, atol=1e-5, rtol=1e-5)
    assert (fused - embeds).abs().max() > 1e-2  # fusion did something

    # The official UNet: the checkpoint's lora_weights through diffusers' own loader.
    state = torch.load(env.models / "photomaker-v2.bin", weights_only=True)["lora_weights"]
    unet = _fresh_unet(env)
    converted, alphas = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    StableDiffusionXLPipeline.load_lora_into_unet(converted, alphas, unet=unet,
                                                  adapter_name="photomaker")
    unet.set_adapters(["photomaker"], weights=[1.0])
    reference = _reference_loop(env, unet, 11, phases)
    for call, want in zip(ours, reference, strict=True):  # both denoising steps
        torch.testing.assert_close(call["out"], want, atol=1e-4, rtol=1e-4)


class _OfficialLoRAAttn:
    """StoryMaker's ``LoRAAttnProcessor`` / ``LoRAIPAttnProcessor`` (attention_processor_faceid.py),
    written out: LoRA added to q, k, v, out at ``lora_scale``; cross-attention splits the
    sequence after 77 text tokens and adds ``scale * SDPA(q, to_k_ip(ip), to_v_ip(ip))``."""

    def __init__(self, w: dict, index: int, cross: bool, scale=0.8, lora_scale=0.8) -> None:
        self.w, self.i, self.cross, self.scale, self.lora_scale = w, index, cross, scale, lora_scale

    def lora(self, x, proj):
        down, up = self.w[f"{self.i}.to_{proj}_lora.down.weight"], \
            self.w[f"{self.i}.to_{proj}_lora.up.weight"]
        return self.lora_scale * F.linear(F.linear(x, down), up)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs):
        b = hidden_states.shape[0]
        query = attn.to_q(hidden_states) + self.lora(hidden_states, "q")
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        text, ip = encoder_hidden_states, None
        if self.cross:
            text, ip = encoder_hidden_states[:, :77], encoder_hidden_states[:, 77:]
        key = attn.to_k(text) + self.lora(text, "k")
        value = attn.to_v(text) + self.lora(text, "v")

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value))
        if self.cross:
            ip_key = F.linear(ip, self.w[f"{self.i}.to_k_ip.weight"])
            ip_value = F.linear(ip, self.w[f"{self.i}.to_v_ip.weight"])
            out = out + self.scale * F.scaled_dot_product_attention(heads(query), heads(ip_key),
                                                                    heads(ip_value))
        out = out.transpose(1, 2).reshape(b, -1, query.shape[-1])
        out = attn.to_out[0](out) + self.lora(out, "out")
        return attn.to_out[1](out)


@torch.no_grad()
def test_storymaker_single_identity_equals_the_official_method(env) -> None:
    """One identity, full frame, official settings: bg + slot-0 tokens, zero-input
    negative, decoupled attention at 0.8 and the rank-r LoRA at 0.8 on every processor."""
    from diffusers import StableDiffusionXLPipeline

    from encoders.id.storymaker import NEGATIVE_POSITIONS, TINY_STORYMAKER, load_storymaker

    with UNetCalls(env.pipe.pipe.unet) as calls:
        env.pipe("a photo of @smiths/ben hiking in the alps", seed=12, steps=1,
                 method="storymaker")
    [ours] = calls.calls

    proj, _ = load_storymaker(env.models / "mask.bin", TINY_STORYMAKER)
    tokens = torch.from_numpy(env.vault.get_artifact("smiths/ben", "storymaker")
                              .artifact.tensors["tokens"])[None]  # (1, 20, 2048)
    x = tokens + proj.pos_embed[0]  # faceid_plus.forward's tail, slot 0
    x = proj.norm_out(proj.proj_out(x)) + x
    image = torch.cat([proj.bg_embed, x]).reshape(1, -1, 2048)  # (1, 40, 2048): bg first
    c = TINY_STORYMAKER
    negative = proj(torch.zeros(1, c.id_embeddings_dim),
                    torch.zeros(1, NEGATIVE_POSITIONS, c.clip_embeddings_dim),
                    torch.zeros(1, NEGATIVE_POSITIONS, c.clip_embeddings_dim)).reshape(1, -1, 2048)
    plain = StableDiffusionXLPipeline(**env.pipe.pipe.components)
    embeds, neg, pooled, neg_pooled = plain.encode_prompt(
        "a photo of person hiking in the alps", do_classifier_free_guidance=True)
    ehs = torch.cat([torch.cat([neg, negative], 1), torch.cat([embeds, image], 1)])
    torch.testing.assert_close(ours["ehs"], ehs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["added"]["text_embeds"], torch.cat([neg_pooled, pooled]))

    w = torch.load(env.models / "mask.bin", weights_only=True)["ip_adapter"]
    unet = _fresh_unet(env)
    unet.set_attn_processor({name: _OfficialLoRAAttn(w, i, name.endswith("attn2.processor"))
                             for i, name in enumerate(unet.attn_processors)})
    [want] = _reference_loop(env, unet, 12, [(ehs, torch.cat([neg_pooled, pooled]))])
    torch.testing.assert_close(ours["out"], want, atol=1e-4, rtol=1e-4)


# -- locality -----------------------------------------------------------------------------------
HALVES = "ana=0,0,0.5,1;ben=0.5,0,1,1"


def _cross_attention_run(pipe, prompt, method, layout, replay: dict | None, *,
                         cross_only: bool = True):
    """Run one 1-step generation of 128x64; per cross-attention layer (every attention
    layer when not ``cross_only``) of the first UNet call record its input and output, or
    (``replay``) the output for the recorded input."""
    unet = pipe.pipe.unet
    seen: dict[str, dict] = {}
    hooks = []
    for name in unet.attn_processors:
        if cross_only and not name.endswith("attn2.processor"):
            continue
        module = unet.get_submodule(name.removesuffix(".processor"))

        def hook(mod, args, kwargs, output, name=name):
            if name in seen:
                return
            ehs = kwargs.get("encoder_hidden_states")  # None in self-attention
            if replay is None:
                seen[name] = {"in": args[0].detach().clone(), "out": output.detach().clone()}
            else:
                seen[name] = {"out": mod.processor(mod, replay[name]["in"],
                                                   encoder_hidden_states=ehs).detach().clone()}
        hooks.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        pipe(prompt, seed=4, steps=1, size=(128, 64), layout=layout, method=method)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("method", ["photomaker", "storymaker", "mixed"])
def test_replacing_a_artifact_changes_cross_attention_only_inside_a_mask(env, method) -> None:
    a, b = f"smiths/la-{method}", f"smiths/lb-{method}"
    env.person(a)
    env.person(b)
    prompt = f"@{a}:girl and @{b}:man by the sea"
    how = {a: "photomaker", b: "storymaker"} if method == "mixed" else method
    halves = HALVES.replace("ana", a).replace("ben", b)
    with env.photomaker(start_merge_step=-1) as pipe:  # fused from step 0
        before = _cross_attention_run(pipe, prompt, how, halves, None)
        env.replace(a)  # new tensors for A's artifacts, same kinds and model ids
        after = _cross_attention_run(pipe, prompt, how, halves, before)
    layout = parse_layout(halves, [a, b])
    grids = set()
    for name, rec in before.items():
        out0, out1 = rec["out"], after[name]["out"]  # (rows: negative, positive; q; C)
        _, h, w = grid_for_length((8, 16), out0.shape[1])
        grids.add((h, w))
        mask_a = torch.from_numpy(layout.mask_grid(a, h, w, MaskConfig(0.05)))
        torch.testing.assert_close(out1[:, mask_a == 0], out0[:, mask_a == 0], atol=1e-6,
                                   rtol=0, msg=name)
        torch.testing.assert_close(out1[0], out0[0], atol=1e-6, rtol=0)  # negative row
        change = (out1[1] - out0[1]).abs().amax(dim=-1)  # per query position
        assert (change[mask_a > 0] > 1e-6).all(), name
    assert grids == {(4, 8), (2, 4)}  # both SDXL cross-attention resolutions


# -- several image-token methods, ControlNet residuals, end_call --------------------------------
class SecondStoryMaker(StoryMakerMethod):
    """A second image-token method, registered on test pipelines only: StoryMaker's artifacts
    and projection model, but an adapter of its own (its projections halved, scale 0.5), no
    background block (identity tokens only, gated by their masks, as IP-Adapter-FaceID) and
    no LoRA."""

    name = "storymaker_b"

    def load(self, unet) -> None:
        super().load(unet)
        if not hasattr(self, "halved"):  # once: the same dict every call, as a real method's
            self.halved = {k: v * 0.5 for k, v in super().image_projections().items()}

    def loras(self):
        return []

    def image_projections(self):
        return self.halved

    def image_tokens(self, requests):
        t = super().image_tokens(requests)
        n = t.global_range[1]  # drop the bg block
        return ImageTokens(t.positive[n:], t.negative[n:], None,
                           {h: (a - n, b - n) for h, (a, b) in t.ranges.items()})


def residual_shapes(unet, sample: torch.Tensor) -> tuple[list[tuple], tuple]:
    """A ControlNet's ``down_block_res_samples`` / ``mid_block_res_sample`` shapes for this
    UNet and input (conv_in, then per down block its resnets and downsampler)."""
    rows, _, h, w = sample.shape
    channels = unet.config.block_out_channels
    down = [(rows, channels[0], h, w)]
    for i, c in enumerate(channels):
        down += [(rows, c, h, w)] * unet.config.layers_per_block
        if i < len(channels) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            down.append((rows, c, h, w))
    return down, (rows, channels[-1], h, w)


class Residuals(IdentityMethod):
    """A test method with ControlNet residuals only (as InstantID's IdentityNet): random,
    fixed per call and step, times its identities' masks; it records what it returned and
    how often ``end_call`` ran. Uses the identity's PhotoMaker artifact (any will do)."""

    name = "residuals_a"
    artifact_kind = "photomaker"
    seed = 100

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.returned: list[tuple] = []  # (sample, timestep, cfg, down, mid) per step
        self.ended = 0
        self.fail_prepare = False
        self.step = 0  # of the current call

    def problem(self, request):
        return None if request.artifacts_of("photomaker") else "no photomaker artifact"

    def select(self, requests) -> None:
        for r in requests:
            r.artifact = r.artifacts_of("photomaker")[0]

    def load(self, unet) -> None:
        self.unet = unet

    def prepare(self, requests) -> None:
        if self.fail_prepare:
            raise InvalidInput("prepare failed on purpose")

    def unet_residuals(self, requests, scene, *, sample, timestep, added_cond_kwargs, cfg):
        g = torch.Generator().manual_seed(self.seed + self.step)
        self.step += 1
        down_shapes, mid_shape = residual_shapes(self.unet, sample)

        def masked(shape):
            h, w = shape[-2:]
            mask = sum(scene.mask(r.handle, h * w, device=sample.device, dtype=sample.dtype)
                       for r in requests).reshape(1, 1, h, w)
            return torch.randn(shape, generator=g) * mask

        down, mid = [masked(s) for s in down_shapes], masked(mid_shape)
        self.returned.append((sample.clone(), timestep, cfg, down, mid))
        return down, mid

    def end_call(self) -> None:
        self.ended += 1
        self.step = 0


class OtherResiduals(Residuals):
    name = "residuals_b"
    seed = 200


@pytest.fixture(scope="module")
def extra(env) -> ComposePipeline:
    """A pipeline over the same components with the test methods added (to it only)."""
    pipe = ComposePipeline(env.pipe.pipe, vault=env.vault, models_dir=env.models,
                           base_model_id=env.pipe.base_model_id)
    pipe.add_method(SecondStoryMaker, settings=StoryMakerSettings(image_scale=0.5))
    pipe.add_method(Residuals)
    pipe.add_method(OtherResiduals)
    return pipe


def test_test_methods_are_only_on_their_pipeline(env, extra) -> None:
    from generators.methods import METHODS

    assert {"storymaker_b", "residuals_a", "residuals_b"} <= set(extra.methods)
    assert not {"storymaker_b", "residuals_a"} & (set(env.pipe.methods) | set(METHODS))
    with pytest.raises(InvalidInput, match="unknown method residuals_a"):
        env.pipe("@smiths/ana", steps=1, method="residuals_a")


class _UNetRecorder:
    """Per UNet call: its residual arguments, its output, and the output of the same UNet
    (same processors, LoRAs, conditioning: inside the call) called by the test with
    ``residuals(step)`` and without any."""

    def __init__(self, unet, residuals=None) -> None:
        self.calls: list[dict] = []
        self._inside = False
        self._residuals = residuals
        self._h = unet.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        if self._inside:
            return
        rec = {k: kwargs.get(k) for k in ("down_block_additional_residuals",
                                          "mid_block_additional_residual")}
        rec["sample"], rec["out"] = args[0], output[0].detach().clone()
        if self._residuals is not None:
            plain = {k: v for k, v in kwargs.items() if k not in rec}
            down, mid = self._residuals(len(self.calls))
            self._inside = True
            try:
                rec["replay"] = module(*args, **plain, down_block_additional_residuals=down,
                                       mid_block_additional_residual=mid)[0]
                rec["plain"] = module(*args, **plain)[0]
            finally:
                self._inside = False
        self.calls.append(rec)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._h.remove()


def test_residuals_of_every_method_are_summed_into_the_unet_call(env, extra) -> None:
    a, b = extra.methods["residuals_a"], extra.methods["residuals_b"]
    a.returned.clear(), b.returned.clear()
    ended = a.ended, b.ended

    def summed(k):  # what the test expects the UNet to get at step k
        return ([x + y for x, y in zip(a.returned[k][3], b.returned[k][3], strict=True)],
                a.returned[k][4] + b.returned[k][4])

    halves = HALVES
    with _UNetRecorder(extra.pipe.unet, summed) as rec:
        extra("@smiths/ana and @smiths/ben in a park", seed=3, steps=2, size=(128, 64),
              layout=halves, method={"smiths/ana": "residuals_a", "smiths/ben": "residuals_b"})
    assert len(rec.calls) == len(a.returned) == len(b.returned) == 2
    for k, call in enumerate(rec.calls):
        down, mid = summed(k)
        assert len(call["down_block_additional_residuals"]) == len(down) == 9
        assert all(torch.equal(got, want) for got, want in
                   zip(call["down_block_additional_residuals"], down, strict=True))
        assert torch.equal(call["mid_block_additional_residual"], mid)
        # Each method saw the UNet's own input: scaled latents, [negative, positive] rows.
        for m in (a, b):
            sample, timestep, cfg, _, _ = m.returned[k]
            assert torch.equal(sample, call["sample"]) and cfg is True
            assert sample.shape == (2, 4, 8, 16)
        assert torch.equal(call["out"], call["replay"])  # = the UNet with these residuals
        assert (call["out"] - call["plain"]).abs().max() > 1e-4  # and they matter
        # Masked by the test methods: ana's residuals are zero in the right half.
        assert (a.returned[k][3][0][..., 8:] == 0).all() and a.returned[k][3][0][..., :8].any()
    assert (a.ended, b.ended) == (ended[0] + 1, ended[1] + 1)

    # No method with residuals: the UNet is called exactly as before, without them.
    with _UNetRecorder(extra.pipe.unet) as rec:
        extra("@smiths/ana and @smiths/ben", seed=3, steps=1,
              method={"smiths/ana": "photomaker", "smiths/ben": "storymaker_b"})
    assert rec.calls[0]["down_block_additional_residuals"] is None
    assert rec.calls[0]["mid_block_additional_residual"] is None


def test_end_call_runs_after_every_call_also_on_error(env, extra) -> None:
    a, b = extra.methods["residuals_a"], extra.methods["residuals_b"]
    how = {"smiths/ana": "residuals_a", "smiths/ben": "residuals_b"}
    unet = extra.pipe.unet
    processors = dict(unet.attn_processors)

    def boom(done, total):
        raise RuntimeError("interrupted")

    ended = a.ended, b.ended
    with pytest.raises(RuntimeError, match="interrupted"):  # in the denoising loop
        extra("@smiths/ana and @smiths/ben", seed=1, steps=2, method=how, progress=boom)
    assert (a.ended, b.ended) == (ended[0] + 1, ended[1] + 1)
    a.fail_prepare = True
    try:  # after decryption, before any UNet work
        with UNetCalls(unet) as calls, pytest.raises(InvalidInput, match="on purpose"):
            extra("@smiths/ana and @smiths/ben", seed=1, steps=2, method=how)
    finally:
        a.fail_prepare = False
    assert calls.calls == []
    assert (a.ended, b.ended) == (ended[0] + 2, ended[1] + 2)
    with pytest.raises(InvalidInput, match="seed"):  # before any method is chosen: none runs
        extra("@smiths/ana and @smiths/ben", seed=-1, steps=2, method=how)
    assert (a.ended, b.ended) == (ended[0] + 2, ended[1] + 2)
    extra("@smiths/ana", seed=1, steps=1, method="residuals_a")  # ben's method is not used
    assert (a.ended, b.ended) == (ended[0] + 3, ended[1] + 2)
    assert all(unet.attn_processors[n] is p for n, p in processors.items())


def test_two_image_token_methods_in_one_image(env, extra) -> None:
    """StoryMaker and a second image-token adapter in one call: the sequence is each
    method's block, unchanged, one after the other; each adapter has its projections (the
    method's own tensors, loaded once) and scale."""
    prompt = "@smiths/ana:girl and @smiths/ben:man by the sea"

    def run(how):
        groups = []
        regional = extra._regional_attention()
        hook = extra.pipe.unet.register_forward_pre_hook(
            lambda m, args: groups.append(regional.conditioning.image_groups))
        try:
            with UNetCalls(extra.pipe.unet) as calls:
                result = extra(prompt, seed=2, steps=1, size=(128, 64), layout=HALVES,
                               method=how)
        finally:
            hook.remove()
        return result, calls.calls[0]["ehs"], groups[0]

    result, ehs, groups = run({"smiths/ana": "storymaker", "smiths/ben": "storymaker_b"})
    assert result.methods == {"smiths/ana": "storymaker", "smiths/ben": "storymaker_b"}
    assert ehs.shape == (2, 77 + 40 + 20, 2048)  # [bg, ana] | [ben]
    assert groups == (ImageGroup("storymaker", (0, 40), (0, 20)),
                      ImageGroup("storymaker_b", (40, 60), None))
    _, alone_a, _ = run({"smiths/ana": "storymaker", "smiths/ben": "photomaker"})
    _, alone_b, _ = run({"smiths/ana": "photomaker", "smiths/ben": "storymaker_b"})
    assert torch.equal(ehs[:, 77:117], alone_a[:, 77:])  # both rows: negative and positive
    assert torch.equal(ehs[:, 117:], alone_b[:, 77:])
    assert not torch.equal(ehs[:, 117:], alone_a[:, 97:])  # another adapter's bg-less tokens

    regional = extra._regional_attention()
    assert {"storymaker", "storymaker_b"} <= set(regional.adapters)
    assert regional.state.scales["storymaker"] == 0.8
    assert regional.state.scales["storymaker_b"] == 0.5
    params = {n: list(p.parameters()) for n, p in regional.processors.items()}
    for name in ("storymaker", "storymaker_b"):  # one copy of each adapter's projections
        own = extra.methods[name].image_projections()
        assert all(t.data_ptr() == own[k].data_ptr()
                   for k, t in regional.image_projection_state_dict(name).items())
    run({"smiths/ana": "storymaker", "smiths/ben": "storymaker_b"})
    assert all(a is b for n, p in regional.processors.items()
               for a, b in zip(p.parameters(), params[n], strict=True))  # not reloaded


@pytest.mark.parametrize("replaced", ["storymaker", "storymaker_b"])
def test_two_image_token_methods_stay_in_their_regions(env, extra, replaced) -> None:
    tag = replaced.replace("_", "-")  # handles take no '_'
    a, b = f"smiths/ma-{tag}", f"smiths/mb-{tag}"
    env.person(a)
    env.person(b)
    how = {a: "storymaker", b: "storymaker_b"}
    target = a if replaced == "storymaker" else b
    prompt = f"@{a}:girl and @{b}:man by the sea"
    halves = HALVES.replace("ana", a).replace("ben", b)
    before = _cross_attention_run(extra, prompt, how, halves, None)
    env.replace(target)
    after = _cross_attention_run(extra, prompt, how, halves, before)
    layout = parse_layout(halves, [a, b])
    for name, rec in before.items():
        out0, out1 = rec["out"], after[name]["out"]
        _, h, w = grid_for_length((8, 16), out0.shape[1])
        mask = torch.from_numpy(layout.mask_grid(target, h, w, MaskConfig(0.05)))
        torch.testing.assert_close(out1[:, mask == 0], out0[:, mask == 0], atol=1e-6, rtol=0,
                                   msg=name)
        torch.testing.assert_close(out1[0], out0[0], atol=1e-6, rtol=0)  # negative row
        assert ((out1[1] - out0[1]).abs().amax(dim=-1)[mask > 0] > 1e-6).all(), name


def test_join_image_tokens_shifts_each_methods_ranges() -> None:
    from generators.conditioning import join_image_tokens

    g = torch.Generator().manual_seed(0)

    def tokens(n, global_range, ranges):
        return ImageTokens(torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g),
                           global_range, ranges)

    story = tokens(6, (0, 2), {"x/a": (2, 4), "x/b": (4, 6)})
    face = tokens(3, None, {"x/c": (0, 3)})
    assert join_image_tokens([]) is None
    one = join_image_tokens([("story", story)])
    assert one.positive is story.positive and one.negative is story.negative
    both = join_image_tokens([("story", story), ("face", face)])
    assert both.groups == (ImageGroup("story", (0, 6), (0, 2)), ImageGroup("face", (6, 9)))
    assert both.ranges == {"x/a": (2, 4), "x/b": (4, 6), "x/c": (6, 9)}
    assert torch.equal(both.positive, torch.cat([story.positive, face.positive]))
    assert torch.equal(both.negative, torch.cat([story.negative, face.negative]))
    with pytest.raises(InvalidInput, match="two methods"):
        join_image_tokens([("story", story), ("again", story)])
    narrow = ImageTokens(torch.zeros(3, 4), torch.zeros(3, 4), None, {"x/d": (0, 3)})
    with pytest.raises(InvalidInput, match="face: image tokens \\(3, 4\\)"):
        join_image_tokens([("story", story), ("face", narrow)])


def test_compose_config_carries_every_builtin_methods_settings(env) -> None:
    """Each built-in method takes its settings from the ComposeConfig field of its name."""
    from generators.compose import ComposeConfig
    from generators.methods.faceid import FaceIDSettings
    from generators.methods.instantid import InstantIDSettings

    config = ComposeConfig(faceid=FaceIDSettings(image_scale=0.5, s_scale=0.3),
                           instantid=InstantIDSettings(ip_adapter_scale=0.6,
                                                       controlnet_conditioning_scale=0.4))
    pipe = ComposePipeline(env.pipe.pipe, vault=env.vault, models_dir=env.models, config=config)
    assert pipe.methods["faceid"].settings == config.faceid
    assert pipe.methods["instantid"].settings == config.instantid
    assert env.pipe.methods["faceid"].settings == FaceIDSettings()
