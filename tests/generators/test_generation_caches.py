"""What ComposePipeline keeps between calls, and when it must not use it.

Two caches make a repeated call cheaper (generators.lora.MergeCache: merged
LoRA weights; generators.prompt_encoding.Encodings: prompt encodings). These tests
hold them to their promises: a cached call gives bit for bit what an uncached
pipeline gives; a changed base weight, LoRA tensor, text-encoder weight or a
hook on a text encoder is noticed; a replaced artifact is used at once; and
withdrawal or erasure of an identity still refuses the next call before any
UNet work, whatever is cached.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generators.compose import ComposeConfig, ComposePipeline
from generators.lora import (
    AppliedLoras,
    LoraWeights,
    MergeCache,
    attention_linears,
    plan_photomaker_lora,
)
from tests.generators.test_compose import Env, UNetCalls, _state
from vault import audit
from vault.errors import ConsentWithdrawn, NotFound

PROMPT = "a photo of @smiths/ana:girl and @smiths/ben by the lake"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    e = Env(tmp_path_factory.mktemp("caches"))
    e.person("smiths/ana")
    e.person("smiths/ben")
    yield e
    e.vault.dispose()


@pytest.fixture(scope="module")
def uncached(env) -> ComposePipeline:
    """A second pipeline over the same components with both caches off."""
    return ComposePipeline(env.pipe.pipe, vault=env.vault, models_dir=env.models,
                           config=ComposeConfig(lora_cache=False, prompt_cache=0),
                           base_model_id=env.pipe.base_model_id)


# -- merged LoRA weights ------------------------------------------------------------------------
def _tiny_lora(seed: int):
    from generators.standins.generation import TINY_GENERATION_SDXL, tiny_lora_weights_for
    from generators.standins.pipelines import build_tiny_sdxl_unet

    unet = build_tiny_sdxl_unet(TINY_GENERATION_SDXL)
    state = tiny_lora_weights_for(unet, seed=seed)
    plan = plan_photomaker_lora({k: tuple(v.shape) for k, v in state.items()},
                                attention_linears(unet))
    return unet, LoraWeights.from_state_dict(plan, state)


def _weights(unet, modules) -> dict[str, torch.Tensor]:
    return {m: unet.get_submodule(m).weight.detach().clone() for m in modules}


def test_merge_cache_reuses_exact_merges_and_notices_changes() -> None:
    unet, lora = _tiny_lora(3)
    modules = lora.plan.modules
    before = _state(unet)
    with AppliedLoras(unet, [(lora, 1.0)]):  # no cache: the reference merge
        want = _weights(unet, modules)
    cache = MergeCache()
    with AppliedLoras(unet, [(lora, 1.0)], cache=cache):
        first = {m: unet.get_submodule(m).weight for m in modules}
    with AppliedLoras(unet, [(lora, 1.0)], cache=cache):
        second = {m: unet.get_submodule(m).weight for m in modules}
        assert all(second[m] is first[m] for m in modules)  # swapped in, not merged again
        assert all(torch.equal(second[m], want[m]) for m in modules)
    now = unet.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in before.items())  # restored bit for bit

    # Another scale is another entry; the cache keeps one.
    with AppliedLoras(unet, [(lora, 0.5)], cache=cache):
        half = _weights(unet, modules)
    assert len(cache) == 1 and not torch.equal(half[modules[0]], want[modules[0]])

    # A base weight edited in place, and a LoRA tensor edited in place: merged afresh.
    target = modules[0]
    with torch.no_grad():
        unet.get_submodule(target).weight.add_(1.0)
        lora.tensors[modules[1]][1].mul_(2.0)
    with AppliedLoras(unet, [(lora, 1.0)]):
        fresh = _weights(unet, modules)
    with AppliedLoras(unet, [(lora, 1.0)], cache=cache):
        cached = _weights(unet, modules)
    assert all(torch.equal(cached[m], fresh[m]) for m in modules)
    assert not torch.equal(fresh[target], want[target])
    assert not torch.equal(fresh[modules[1]], want[modules[1]])


# -- the pipeline ---------------------------------------------------------------------------------
def _run(pipe, prompt=PROMPT, **kwargs):
    with UNetCalls(pipe.pipe.unet) as calls:
        result = pipe(prompt, seed=5, steps=2, **kwargs)
    return result, calls.calls


def test_cached_calls_equal_an_uncached_pipeline_bit_for_bit(env, uncached) -> None:
    unet = env.pipe.pipe.unet
    processors, weights = dict(unet.attn_processors), _state(unet)
    for method in ("photomaker", "storymaker"):
        first, _ = _run(env.pipe, method=method)
        again, calls = _run(env.pipe, method=method)  # encodings and merged LoRA reused
        plain, want = _run(uncached, method=method)
        assert np.array_equal(np.asarray(again.image), np.asarray(first.image))
        assert np.array_equal(np.asarray(again.image), np.asarray(plain.image))
        for got, ref in zip(calls, want, strict=True):
            assert torch.equal(got["ehs"], ref["ehs"]) and torch.equal(got["out"], ref["out"])
    assert len(env.pipe._merged) == 1
    # Encodings are kept per calling owner: another owner's call encodes afresh.
    scoped = env.pipe(PROMPT, seed=5, steps=2, method="photomaker", owner="smiths")
    assert np.array_equal(np.asarray(scoped.image), np.asarray(_run(
        uncached, method="photomaker")[0].image))
    assert env.pipe.encode.cache.scopes() == {None, "smiths"}
    assert all(unet.attn_processors[n] is p for n, p in processors.items())
    now = unet.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in weights.items())


def test_a_replaced_artifact_is_used_at_once(env, uncached) -> None:
    handle = env.person("smiths/rae")
    prompt = "@smiths/rae:woman reading"
    _, old = _run(env.pipe, prompt, method="photomaker")
    env.replace(handle)  # new ID embeddings, same kind and model id
    _, new = _run(env.pipe, prompt, method="photomaker")
    _, want = _run(uncached, prompt, method="photomaker")
    # The last step is conditioned on the fused prompt: the new artifact's, exactly.
    assert not torch.equal(new[-1]["ehs"], old[-1]["ehs"])
    assert torch.equal(new[-1]["ehs"], want[-1]["ehs"])
    assert torch.equal(new[-1]["out"], want[-1]["out"])


def test_withdrawal_and_erasure_refuse_whatever_is_cached(env) -> None:
    # northlight keeps withdrawn identities (erase policy "retain"): the refusal is about
    # consent, not a missing row; smiths erases on request.
    for handle, end in (("northlight/sol", "withdraw"), ("smiths/tess", "erase")):
        env.person(handle)
        prompt = f"@{handle}:girl on a bridge"
        for _ in range(2):  # cached: encodings and merged weights of this very call
            _run(env.pipe, prompt)
        if end == "withdraw":
            env.vault.withdraw_consent(handle, reason="test", actor="test")
            error = ConsentWithdrawn
        else:
            env.vault.delete_identity(handle, actor="test")
            error = NotFound
        with env.vault.session() as s:
            last = audit.events(s, limit=1)[0].seq
        with UNetCalls(env.pipe.pipe.unet) as calls, pytest.raises(error, match=handle):
            env.pipe(prompt, seed=5, steps=2)
        assert calls.calls == []
        with env.vault.session() as s:  # nothing decrypted, nothing generated
            assert [e for e in audit.events(s, limit=5) if e.seq > last] == []


def test_prompt_encodings_are_not_reused_after_the_text_encoders_change(env, uncached) -> None:
    prompt = "@smiths/ana:girl in the rain"
    _, base = _run(env.pipe, prompt, method="storymaker")
    embedding = env.pipe.pipe.text_encoder_2.get_input_embeddings()

    def shift(module, args, output):
        return output + 0.5

    hook = embedding.register_forward_hook(shift)  # a caller's hook: bypasses the cache
    try:
        _, hooked = _run(env.pipe, prompt, method="storymaker")
        _, want = _run(uncached, prompt, method="storymaker")
    finally:
        hook.remove()
    assert not torch.equal(hooked[0]["ehs"], base[0]["ehs"])
    assert torch.equal(hooked[0]["ehs"], want[0]["ehs"])
    _, again = _run(env.pipe, prompt, method="storymaker")
    assert torch.equal(again[0]["ehs"], base[0]["ehs"])  # hook gone: as before

    weight = embedding.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(1.5)  # an in-place edit bumps the version counter
        _, edited = _run(env.pipe, prompt, method="storymaker")
        _, want = _run(uncached, prompt, method="storymaker")
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert not torch.equal(edited[0]["ehs"], base[0]["ehs"])
    assert torch.equal(edited[0]["ehs"], want[0]["ehs"])


def test_several_adapters_keep_only_weights_between_calls(env) -> None:
    """With two image-token adapters and ControlNet residuals in a call, regional attention
    keeps only the adapters' projections afterwards (no conditioning, no projected image
    tokens), every method's end_call has run, and a replaced artifact of the second adapter
    is used at once and equals a pipeline that never ran before."""
    from generators.methods.storymaker import StoryMakerSettings
    from tests.generators.test_compose import OtherResiduals, SecondStoryMaker

    def pipeline() -> ComposePipeline:
        p = ComposePipeline(env.pipe.pipe, vault=env.vault, models_dir=env.models,
                            base_model_id=env.pipe.base_model_id)
        p.add_method(SecondStoryMaker, settings=StoryMakerSettings(image_scale=0.5))
        p.add_method(OtherResiduals)
        return p

    pipe = pipeline()
    handle = env.person("smiths/uma")
    prompt = "@smiths/ana:girl, @smiths/uma:woman and @smiths/ben:man at a fair"
    how = {"smiths/ana": "storymaker", "smiths/uma": "storymaker_b",
           "smiths/ben": "residuals_b"}
    _, old = _run(pipe, prompt, method=how, size=(192, 64))
    regional = pipe._regional_attention()
    assert set(regional.adapters) == {"storymaker", "storymaker_b"}
    assert regional.conditioning is None and not regional.state.image_kv
    assert not regional.installed
    assert pipe.methods["residuals_b"].ended == 1
    env.replace(handle)  # new StoryMaker tokens for the second adapter's identity
    _, new = _run(pipe, prompt, method=how, size=(192, 64))
    _, want = _run(pipeline(), prompt, method=how, size=(192, 64))
    assert not torch.equal(new[-1]["ehs"], old[-1]["ehs"])
    for got, ref in zip(new, want, strict=True):
        assert torch.equal(got["ehs"], ref["ehs"]) and torch.equal(got["out"], ref["out"])
