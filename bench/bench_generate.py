"""Generation overhead: ComposePipeline with 1, 2 and 4 identities against plain diffusers SDXL.

What it measures
    One generation, end to end, by :class:`generators.compose.ComposePipeline`
    with 1, 2 and 4 identities (PhotoMaker; StoryMaker with 1 and 2) against
    a plain ``StableDiffusionXLPipeline`` built from **the same component
    objects** (``StableDiffusionXLPipeline(**compose.pipe.components)``), the
    same steps, size and seed, and the same prompt text with the class words
    in place of the handles. Both return a PIL image.

    Ours includes everything a call does: consent and owner checks, decrypting
    each identity's artifact, the methods' conditioning (PhotoMaker: a second,
    text-only prompt and the ID fusion; StoryMaker: the image tokens), LoRA
    merged into the weights for the call and restored after it, regional
    attention installed and removed, the provenance manifest (pixel digest)
    and the audit events (one SQLite commit). It does not write the PNG.

    Three figures per variant, medians over the rounds:

    - ``total``: wall-clock seconds of the call;
    - ``unet``: seconds spent inside ``unet.forward`` (a hook sums them): the
      regional attention and the LoRA cost show up here and nowhere else;
    - ``ratio``: median over rounds of (ours / plain in the same round) --
      paired, so slow drift of a shared machine cancels -- for ``total`` and
      ``unet``. Goal: <= 1.05 with one identity and <= 1.15 with four.

    Also printed: ours' median ``timings`` per step (``GenerationResult.timings``).

    Between calls the pipeline keeps the merged LoRA weights and recent prompt
    encodings (``ComposeConfig.lora_cache`` / ``prompt_cache``). By default
    every call of a variant uses the same prompt, as when an image is made
    again with another seed, so the encoding is reused; ``--fresh-prompts``
    gives every call (ours and plain alike) a prompt never seen before, so
    nothing about the prompt is reused and both encode it in full.

    Variants run interleaved, in a new random order every round, after one
    warm-up each. The model is the tiny SDXL stand-in (``sdxl-tiny``: SDXL's
    block structure and 2048-wide text conditioning, tiny UNet widths) on the
    CPU, so fixed per-call costs (text encoders, the vault, the audit commit)
    weigh far more than on a full-size SDXL, where 30 UNet steps at 1024x1024
    dominate; read ``unet`` for the denoising cost.

How to run
    .venv/bin/python bench/bench_generate.py                 # ~1-2 min on 2 busy cores
    .venv/bin/python bench/bench_generate.py --rounds 11 --steps 20 --size 128x128
    .venv/bin/python bench/bench_generate.py --rounds 15 --fresh-prompts   # no prompt reused

    The full-size SDXL architecture at 1024x1024 on a GPU (random weights,
    peak GPU memory) is not implemented here: no GPU machine was available
    when this was written (see docs/generation.md, "Performance").
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CLASS_WORDS = ("girl", "man", "woman", "boy")


def _setup(root: Path, identities: int):
    from diffusers import StableDiffusionXLPipeline

    from encoders.id_checkpoints import file_digest
    from generators.compose import ComposePipeline
    from generators.tiny_generation import write_tiny_generation_models
    from vault import codec
    from vault.config import Settings
    from vault.consent import ConsentRequest
    from vault.vault import Vault

    models = root / "models"
    write_tiny_generation_models(models)
    vault = Vault.init(Settings(data_dir=root / "vault"), actor="bench")
    vault.add_owner("bench", "studio", erase_policy="retain", actor="bench")
    pm = f"photomaker/photomaker-v2.bin@{file_digest(models / 'photomaker-v2.bin')[:16]}"
    sm = f"storymaker/mask.bin@{file_digest(models / 'mask.bin')[:16]}+clip@{'0' * 16}"
    rng = np.random.default_rng(0)
    import datetime as dt
    import hashlib

    for i in range(1, identities + 1):
        handle = f"bench/p{i}"
        vault.create_identity(handle, ConsentRequest.from_dict({
            "subject": f"Person {i}", "given_by": "self", "purposes": ["enroll", "generate"],
            "retain_until": (dt.date.today() + dt.timedelta(days=30)).isoformat(),
            "evidence_sha256": hashlib.sha256(b"bench").hexdigest()}), actor="bench")
        vault.put_artifact(handle, "photomaker", codec.encode(
            "photomaker", {"id_embeds": rng.normal(size=(2, 2, 2048)).astype(np.float32)},
            {"model_id": pm, "version": "v2", "photos": "2"}), actor="bench")
        vault.put_artifact(handle, "storymaker", codec.encode(
            "storymaker", {"tokens": rng.normal(size=(20, 2048)).astype(np.float32)},
            {"model_id": sm, "crop": "face_box_fallback"}), actor="bench")
    compose = ComposePipeline.from_pretrained(None, vault=vault, models_dir=models)
    plain = StableDiffusionXLPipeline(**compose.pipe.components)
    plain.set_progress_bar_config(disable=True)
    return vault, compose, plain


class UNetTimer:
    """Sums the seconds spent in ``unet.forward``."""

    def __init__(self, unet) -> None:
        self.seconds = 0.0
        self._t0 = 0.0
        unet.register_forward_pre_hook(self._pre)
        unet.register_forward_hook(self._post)

    def _pre(self, *_):
        self._t0 = time.perf_counter()

    def _post(self, *_):
        self.seconds += time.perf_counter() - self._t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (medians)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", default="128x128", help="WIDTHxHEIGHT")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--fresh-prompts", action="store_true",
                        help="a prompt never used before for every call (no encoding reused)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    root = args.data_dir or Path(tempfile.mkdtemp(prefix="idvault-bench-gen-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, device cpu, float32; "
          f"{args.steps} steps, {width}x{height}, guidance 5.0, {args.rounds} rounds, "
          f"{'a fresh prompt per call' if args.fresh_prompts else 'one prompt per variant'}")
    t0 = time.perf_counter()
    vault, compose, plain = _setup(root, 4)
    print(f"setup (stand-ins, vault, 4 identities, load) {time.perf_counter() - t0:.1f} s")
    timer = UNetTimer(compose.pipe.unet)

    calls = itertools.count()

    def setting() -> str:
        # A call number in the text changes the tokens (and so the encoding) of ours and plain
        # alike.
        return f" on a beach, watercolor, take {next(calls)}" if args.fresh_prompts else \
            " on a beach, watercolor"

    def scene(n: int) -> str:
        return " and ".join(CLASS_WORDS[:n]) + setting()

    variants: dict[str, tuple[int, str | None]] = {
        "plain diffusers": (0, None),
        "photomaker x1": (1, "photomaker"), "photomaker x2": (2, "photomaker"),
        "photomaker x4": (4, "photomaker"),
        "storymaker x1": (1, "storymaker"), "storymaker x2": (2, "storymaker"),
    }

    steps_ms: dict[str, dict[str, list[float]]] = {name: {} for name in variants}

    def run(name: str) -> tuple[float, float]:
        n, method = variants[name]
        if method is None:
            # The scene text of the largest variant: every prompt is 77 tokens anyway.
            text = scene(4)
        else:
            text = " and ".join(f"@bench/p{i + 1}:{CLASS_WORDS[i]}" for i in range(n)) + setting()
        timer.seconds = 0.0
        start = time.perf_counter()
        if method is None:
            plain(text, num_inference_steps=args.steps, height=height, width=width,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(args.seed))
        else:
            result = compose(text, seed=args.seed, steps=args.steps, size=(width, height),
                             method=method, actor="bench")
        elapsed = time.perf_counter() - start, timer.seconds
        if method is not None:
            for step, seconds in result.timings.items():
                steps_ms[name].setdefault(step, []).append(seconds * 1000)
        return elapsed

    for name in variants:  # warm-up: loads the methods' weights, first-call costs
        run(name)
    for per_step in steps_ms.values():
        per_step.clear()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    order = list(variants)
    shuffler = random.Random(args.seed)
    for r in range(args.rounds):
        shuffler.shuffle(order)
        for name in order:
            times[name].append(run(name))
        print(f"  round {r + 1}/{args.rounds} done", flush=True)

    base = times["plain diffusers"]
    print(f"\n{'variant':<17} {'total s':>8} {'unet s':>8} {'ratio total':>12} "
          f"{'ratio unet':>11}")
    for name, rows in times.items():
        total = statistics.median(t for t, _ in rows)
        unet = statistics.median(u for _, u in rows)
        paired_total = statistics.median(t / b for (t, _), (b, _) in zip(rows, base, strict=True))
        paired_unet = statistics.median(u / b for (_, u), (_, b) in zip(rows, base, strict=True))
        print(f"{name:<17} {total:>8.3f} {unet:>8.3f} {paired_total:>12.3f} "
              f"{paired_unet:>11.3f}")
    names = [n for n in variants if steps_ms[n]]
    print(f"\nours, median ms per step: {'step':<16}" + "".join(f"{n:>15}" for n in names))
    for step in next(iter(steps_ms[n] for n in names)):
        print(f"{'':<26}{step:<16}" + "".join(
            f"{statistics.median(steps_ms[n][step]):>15.1f}" for n in names))
    load = os.getloadavg()
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end (the CPU may be "
          "shared: compare ratios, not absolute times)")
    vault.dispose()
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
