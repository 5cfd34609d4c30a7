"""Celeb Basis and LiDB identities in ComposePipeline (generators.methods.celeb_basis / .lidb).

The tiny stand-ins of tests/generators/test_compose.py; identities get random
artifacts in the real schemas (a random basis stored in the vault's
``celeb_bases`` table, random LiDB train factors), "fitted" against the tiny
base model's id, so selection, decryption and the refusals are the product's.
"""

from __future__ import annotations

import pytest
import torch

from generators.layout import MaskConfig, grid_for_length, parse_layout
from tests.generators.test_compose import (
    HALVES,
    Env,
    UNetCalls,
    _cross_attention_run,
    _encode_reference,
    _reference_loop,
    _state,
)
from vault.errors import InvalidInput


class PEnv(Env):
    """Env with Celeb Basis and LiDB artifacts as well."""

    def __init__(self, root) -> None:
        super().__init__(root)
        from encoders.fitting.celeb_basis import CelebBasisObject, store_basis
        from encoders.fitting.lidb import lidb_layers

        sd = self.pipe.pipe
        g = torch.Generator().manual_seed(0)
        tensors = {key: torch.randn(2, 513, enc.config.hidden_size, generator=g) * 0.5
                   for key, enc in (("text_encoder", sd.text_encoder),
                                    ("text_encoder_2", sd.text_encoder_2))}
        self.basis = CelebBasisObject(tensors, "random", "test")
        with self.vault.session() as s:
            store_basis(s, self.basis)
        self.layers = list(lidb_layers(sd.unet, [sd.text_encoder, sd.text_encoder_2]))
        self.model_id = self.pipe.base_model_id

    def fitted(self, handle: str, *, celeb_basis: bool = False, lidb: bool = False,
               basis_id: str | None = None, model_id: str | None = None) -> None:
        """(Re)write the identity's fitted artifacts with fresh random tensors."""
        from encoders.fitting.celeb_basis import coefficients_payload
        from encoders.fitting.lidb import LidbWeights

        self.seed += 1
        g = torch.Generator().manual_seed(1000 + self.seed)
        if celeb_basis:
            coef = torch.nn.functional.normalize(torch.randn(2, 512, generator=g), dim=-1)
            self.vault.put_artifact(handle, "celeb_basis", coefficients_payload(
                coef, basis_id=basis_id or self.basis.id, model_id=model_id or self.model_id))
        if lidb:
            w = LidbWeights.init(self.layers, seed=self.seed, init_seed=self.seed)
            w.up_train = torch.randn(w.up_train.shape, generator=g)
            self.vault.put_artifact(handle, "lidb", w.payload(model_id=model_id or self.model_id))


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> PEnv:
    e = PEnv(tmp_path_factory.mktemp("compose-personalized"))
    yield e
    e.vault.dispose()


def _person(env: PEnv, handle: str, **kinds) -> str:
    from tests.helpers import consent

    env.vault.create_identity(handle, consent(purposes=["enroll", "generate", "share"]),
                              actor="test")
    photomaker, storymaker = kinds.pop("photomaker", False), kinds.pop("storymaker", False)
    if photomaker or storymaker:
        env.replace(handle, photomaker=photomaker, storymaker=storymaker)
    env.fitted(handle, **kinds)
    return handle


def _hooks_everywhere(sd) -> int:
    """Forward hooks on the linears and token tables (transformers keeps its own
    output-capturing hooks on the encoder layers once they have run)."""
    return sum(len(m._forward_hooks) for part in (sd.unet, sd.text_encoder, sd.text_encoder_2)
               for m in part.modules() if isinstance(m, torch.nn.Linear | torch.nn.Embedding))


# -- locality -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["celeb_basis", "lidb"])
def test_replacing_a_artifact_changes_outputs_only_inside_a_mask(env, kind) -> None:
    """A uses ``kind``; B uses another method (PhotoMaker / StoryMaker: mixing works). A new
    artifact for A leaves every cross-attention output outside A's mask as it was."""
    a, b = f"smiths/pa-{kind.replace('_', '-')}", f"smiths/pb-{kind.replace('_', '-')}"
    other = "photomaker" if kind == "celeb_basis" else "storymaker"
    _person(env, a, **{kind: True})
    _person(env, b, **{other: True})
    prompt = f"@{a}:girl and @{b}:man by the sea"
    how = {a: kind, b: other}
    halves = HALVES.replace("ana", a).replace("ben", b)
    sd = env.pipe.pipe
    hooks_before, state_before = _hooks_everywhere(sd), _state(sd.unet)
    with env.photomaker(start_merge_step=-1) as pipe:  # fused from step 0
        before = _cross_attention_run(pipe, prompt, how, halves, None, cross_only=False)
        env.fitted(a, **{kind: True})  # new tensors for A's artifact, same kind and model id
        after = _cross_attention_run(pipe, prompt, how, halves, before, cross_only=False)
    layout = parse_layout(halves, [a, b])
    grids = set()
    for name, rec in before.items():
        out0, out1 = rec["out"], after[name]["out"]  # (rows: negative, positive; q; C)
        _, h, w = grid_for_length((8, 16), out0.shape[1])
        mask_a = torch.from_numpy(layout.mask_grid(a, h, w, MaskConfig(0.05)))
        cross = name.endswith("attn2.processor")
        if cross or kind == "celeb_basis":
            # attn1 under LiDB: A's cells' keys/values are seen by every query of
            # self-attention (documented), so only cross-attention is local per layer.
            torch.testing.assert_close(out1[:, mask_a == 0], out0[:, mask_a == 0], atol=1e-6,
                                       rtol=0, msg=name)
        if kind == "celeb_basis":  # the negative prompt has no identity; LiDB's delta is
            torch.testing.assert_close(out1[0], out0[0], atol=1e-6, rtol=0)  # in the model
            if not cross:
                torch.testing.assert_close(out1, out0, atol=1e-6, rtol=0)  # text-side only
                continue
        change = (out1[1] - out0[1]).abs().amax(dim=-1)  # per query position
        assert (change[mask_a > 0] > 1e-6).all(), name
        if cross:
            grids.add((h, w))
    assert grids == {(4, 8), (2, 4)}  # both SDXL cross-attention resolutions
    assert _hooks_everywhere(sd) == hooks_before  # hooks taken off again
    for k, v in _state(sd.unet).items():
        assert torch.equal(v, state_before[k]), k


# -- equivalence with the plain methods ---------------------------------------------------------
def _fresh_sdxl(env):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(env.models / "sdxl-tiny")
    ref.set_progress_bar_config(disable=True)
    return ref


def test_lidb_single_full_frame_equals_load_lora_weights(env, tmp_path) -> None:
    """One LiDB identity, full frame: the first step's UNet output (and the prompt
    embeddings) equal diffusers with the exported LoRA file loaded."""
    from encoders.fitting.exports import export

    handle = _person(env, "smiths/lidb-solo", lidb=True)
    sd = env.pipe.pipe
    before = {k: v.clone() for k, v in sd.text_encoder.state_dict().items()}
    with UNetCalls(sd.unet) as calls:
        env.pipe(f"a photo of @{handle} by the sea", seed=12, steps=1, method="lidb",
                 layout=f"{handle}=0,0,1,1")
    [ours] = calls.calls

    path = tmp_path / "pytorch_lora_weights.safetensors"
    path.write_bytes(export(env.vault, handle, "diffusers_lora",
                            base_model=env.models / "sdxl-tiny").data)
    ref = _fresh_sdxl(env)
    ids = [tok("a photo of person by the sea", padding="max_length", max_length=77).input_ids
           for tok in (ref.tokenizer, ref.tokenizer_2)]
    plain, _ = _encode_reference(ref, ids)
    ref.load_lora_weights(str(path))
    embeds, pooled = _encode_reference(ref, ids)
    assert (embeds - plain).abs().max() > 1e-3  # the text-encoder deltas act
    zeros, zeros_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    ehs, pool = torch.cat([zeros, embeds]), torch.cat([zeros_pooled, pooled])
    torch.testing.assert_close(ours["ehs"], ehs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["added"]["text_embeds"], pool, atol=1e-5, rtol=1e-5)
    [want] = _reference_loop(env, ref.unet, 12, [(ehs, pool)])
    torch.testing.assert_close(ours["out"], want, atol=1e-4, rtol=1e-4)
    # ... and the LoRA matters: the plain UNet differs.
    [base] = _reference_loop(env, _fresh_sdxl(env).unet, 12, [(ehs, pool)])
    assert (base - want).abs().max() > 1e-3
    for k, v in sd.text_encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_celeb_basis_single_full_frame_equals_load_textual_inversion(env, tmp_path) -> None:
    """One Celeb Basis identity, full frame: the prompt embeddings (both encoders' hidden
    states and the pooled one) equal diffusers with the exported TI file loaded."""
    from encoders.fitting import textual_inversion as ti
    from encoders.fitting.exports import export

    handle = _person(env, "smiths/cb-solo", celeb_basis=True)
    sd = env.pipe.pipe
    sizes = (len(sd.tokenizer), len(sd.tokenizer_2))
    table = sd.text_encoder.get_input_embeddings().weight.clone()
    with UNetCalls(sd.unet) as calls:
        env.pipe(f"a photo of @{handle} by the sea", seed=12, steps=1, method="celeb_basis",
                 layout=f"{handle}=0,0,1,1")
    [ours] = calls.calls
    assert (len(sd.tokenizer), len(sd.tokenizer_2)) == sizes  # no token added
    assert torch.equal(sd.text_encoder.get_input_embeddings().weight, table)

    path = tmp_path / "identity.safetensors"
    path.write_bytes(export(env.vault, handle, "textual_inversion").data)
    ref = _fresh_sdxl(env)
    token = ti.load_into(ref, path)
    ids = []
    for tok in (ref.tokenizer, ref.tokenizer_2):
        text = ref.maybe_convert_prompt(f"a photo of {token} by the sea", tok)
        ids.append(tok(text, padding="max_length", max_length=77).input_ids)
    embeds, pooled = _encode_reference(ref, ids)
    zeros, zeros_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    torch.testing.assert_close(ours["ehs"], torch.cat([zeros, embeds]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["added"]["text_embeds"], torch.cat([zeros_pooled, pooled]),
                               atol=1e-5, rtol=1e-5)
    plain, _ = _encode_reference(ref, [tok("a photo of person by the sea", padding="max_length",
                                           max_length=77).input_ids
                                       for tok in (ref.tokenizer, ref.tokenizer_2)])
    assert (plain - embeds).abs().max() > 1e-2  # the identity's tokens matter


# -- refusals -----------------------------------------------------------------------------------
def test_unknown_basis_or_other_base_model_is_refused_before_unet_work(env) -> None:
    nobasis = _person(env, "smiths/cb-nobasis", celeb_basis=True, basis_id="0" * 64)
    other = _person(env, "smiths/cb-other", celeb_basis=True, lidb=True,
                    model_id="sdxl-other@0123456789abcdef")
    with UNetCalls(env.pipe.pipe.unet) as calls:
        with pytest.raises(InvalidInput, match="basis 0{64}, which this vault does not hold"):
            env.pipe(f"@{nobasis}", steps=1, method="celeb_basis")
        for method in ("celeb_basis", "lidb"):
            with pytest.raises(InvalidInput, match="fitted against sdxl-other@0123456789abcdef"):
                env.pipe(f"@{other}", steps=1, method=method)
        with pytest.raises(InvalidInput, match="cannot be generated with any method"):
            env.pipe(f"@{other}", steps=1)
    assert calls.calls == []


def test_auto_picks_the_fitted_methods(env) -> None:
    cb = _person(env, "smiths/auto-cb", celeb_basis=True)
    li = _person(env, "smiths/auto-lidb", lidb=True)
    hooks = _hooks_everywhere(env.pipe.pipe)
    got = env.pipe(f"@{cb} and @{li} at the beach", seed=0, steps=1).methods
    assert got == {cb: "celeb_basis", li: "lidb"}
    assert _hooks_everywhere(env.pipe.pipe) == hooks
