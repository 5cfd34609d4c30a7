"""Generation overhead: ComposePipeline with 1, 2 and 4 identities against plain diffusers SDXL.

What it measures
    One generation, end to end, by :class:`generators.compose.ComposePipeline`
    with 1, 2 and 4 identities (PhotoMaker; StoryMaker with 1 and 2; FaceID and
    InstantID with 1 and 4; ``mixed x4``: one identity each of PhotoMaker,
    StoryMaker, FaceID and InstantID in one image) against
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
    warm-up each. By default the model is the tiny SDXL stand-in
    (``sdxl-tiny``: SDXL's block structure and 2048-wide text conditioning,
    tiny UNet widths) on the CPU, so fixed per-call costs (text encoders, the
    vault, the audit commit) weigh far more than on a full-size SDXL, where 30
    UNet steps at 1024x1024 dominate; read ``unet`` for the denoising cost.

Full size (``--full-size``)
    The full SDXL architecture with random weights, built offline by
    :mod:`generators.standins.full_size_sdxl` directly on ``--device`` in ``--dtype``
    (default: CUDA if available, float16; on the CPU bfloat16): the UNet and
    both text encoders from ``base_models.json`` of the reference manifests
    (``--manifests``), the SDXL VAE, the tiny offline tokenizers. The
    identity checkpoints are full size too: ``photomaker-v2.bin`` (543M-
    parameter ID encoder, LoRA rank 64 on all 140 attention processors) and
    StoryMaker's ``mask.bin`` (830M parameters, LoRA rank 128) and, when their
    variants run, ``ip-adapter-faceid-plusv2_sdxl.bin`` (744M, fp16) and InstantID's
    ``ip-adapter.bin`` (423M) and ``ControlNetModel`` (1.25B, fp16), written
    random into the temporary models folder and checked by the loaders
    against the official layouts. Defaults become 1024x1024, 30 steps, 5
    rounds. Nothing is downloaded; the images are noise.

    On CUDA the ``unet`` time comes from CUDA events around each forward,
    every call is bracketed by ``torch.cuda.synchronize()``, and a ``peak
    GiB`` column gives ``torch.cuda.max_memory_allocated()`` per variant
    (reset before each call; the highest call, warm-up included), next to the
    memory allocated after setup. ``--variants`` picks a subset (plain always
    runs), e.g. to leave StoryMaker's 3.3 GB checkpoint out.

How to run
    .venv/bin/python bench/bench_generate.py                 # ~1-2 min on 2 busy cores
    .venv/bin/python bench/bench_generate.py --rounds 11 --steps 20 --size 128x128
    .venv/bin/python bench/bench_generate.py --rounds 15 --fresh-prompts   # no prompt reused

    .venv/bin/python bench/bench_generate.py --full-size   # GPU: 1024x1024, 30 steps, fp16
    .venv/bin/python bench/bench_generate.py --full-size --fresh-prompts
    .venv/bin/python bench/bench_generate.py --full-size --time-budget 210  # fewer rounds if slow

    A GPU session runs the first full-size line; it needs the project's
    dependencies (diffusers included) and ``base_models.json`` on that machine:
    the ``../shared`` beside a checkout does not travel to a device machine,
    so copy the file into an ignored folder of the checkout and pass
    ``--manifests`` (e.g. ``.bench/manifests``); ``bench/gpu_session.sh``
    does all of it in one command (bench/README.md, "GPU sessions"). Expect
    a few minutes: writing the full-size checkpoints (~5 GB in the temporary
    folder) and building the model, then 6 variants x 6 calls. The CPU smoke check of
    the path (not a measurement: ~10 min on 2 cores, where bfloat16 matrix
    products have no fast path; peak RSS 10.4 GiB)::

    .venv/bin/python bench/bench_generate.py --full-size --device cpu --dtype bfloat16 \
        --size 64x64 --steps 1 --rounds 1 --variants photomaker-x1

    No full-size figures have been measured yet (no GPU machine so far; see
    docs/generation.md, "Performance").
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


def _full_size_pipe(models: Path, args, storymaker: bool, adapters: set[str]):
    """The full-size SDXL (random) on the target device and full-size identity checkpoints."""
    from generators.adapters.faceid import OFFICIAL_FILE, OFFICIAL_LORA_RANK, FaceIDConfig
    from generators.standins.faceid import tiny_faceid_state
    from generators.standins.full_size_sdxl import (
        build_full_size_sdxl,
        load_base_manifest,
        write_full_size_id_models,
    )
    from generators.standins.instantid import write_full_size_instantid

    manifest = load_base_manifest(args.manifests)
    # Checkpoints first: their float32 build on the CPU (~3.3 GB at most) is freed before
    # the model exists, so the two never add up in host memory.
    meta = build_full_size_sdxl(manifest, device="meta", dtype=args.dtype).unet
    write_full_size_id_models(models, meta, seed=args.seed, storymaker=storymaker)
    if "faceid" in adapters:  # 1.49 GB in fp16, as released
        torch.save(tiny_faceid_state(meta, config=FaceIDConfig(), rank=OFFICIAL_LORA_RANK,
                                     seed=args.seed + 3), models / OFFICIAL_FILE)
    if "instantid" in adapters:  # ip-adapter.bin 1.69 GB, ControlNetModel 2.5 GB
        write_full_size_instantid(models, meta, seed=args.seed + 4)
    del meta
    return build_full_size_sdxl(manifest, device=args.device, dtype=args.dtype, seed=args.seed)


def _adapter_payloads(rng: np.random.Generator, full_size: bool
                      ) -> dict[str, object]:
    """Per adapter a function of nothing -> a random artifact payload that fits its stand-in
    (the CLIP width of the FaceID projection; an antelopev2 model id for InstantID)."""
    from generators.adapters.faceid import TINY_FACEID, FaceIDConfig
    from vault import codec

    clip_dim = (FaceIDConfig() if full_size else TINY_FACEID).clip_embeddings_dim
    positions = 257

    def faceid() -> bytes:
        normed = rng.normal(size=(1, 512))
        return codec.encode("faceid", {
            "normed": (normed / np.linalg.norm(normed, axis=1, keepdims=True)).astype(np.float32),
            "clip_embeds": rng.normal(size=(1, positions, clip_dim)).astype(np.float16),
            "clip_negative": rng.normal(size=(positions, clip_dim)).astype(np.float16)},
            {"model_id": f"clip@{'0' * 16}+buffalo_l/w600k_r50.onnx@{'0' * 16}",
             "face_model_id": f"buffalo_l/w600k_r50.onnx@{'0' * 16}",
             "clip_model_id": f"clip@{'0' * 16}"})

    def instantid() -> bytes:
        return codec.encode("instantid", {
            "embeddings": (rng.normal(size=(1, 512)) * 20).astype(np.float32),
            "kps": np.array([[38, 52], [90, 52], [64, 80], [44, 104], [84, 104]], np.float32),
            "bbox": np.array([20, 20, 108, 124], np.float32),
            "image_size": np.array([128, 128], np.float32)},
            {"model_id": f"antelopev2/glintr100.onnx@{'0' * 16}"})

    return {"faceid": faceid, "instantid": instantid}


def _setup(root: Path, identities: int, args, storymaker: bool = True,
           adapters: set[str] = frozenset()):
    from diffusers import StableDiffusionXLPipeline

    from encoders.id.checkpoints import file_digest
    from generators.compose import ComposePipeline
    from generators.standins.generation import write_tiny_generation_models
    from vault import codec
    from vault.config import Settings
    from vault.consent import ConsentRequest
    from vault.vault import Vault

    models = root / "models"
    if args.full_size:
        pipe = _full_size_pipe(models, args, storymaker, adapters)
    else:
        write_tiny_generation_models(models)
    vault = Vault.init(Settings(data_dir=root / "vault"), actor="bench")
    vault.add_owner("bench", "studio", erase_policy="retain", actor="bench")
    pm = f"photomaker/photomaker-v2.bin@{file_digest(models / 'photomaker-v2.bin')[:16]}"
    sm = (f"storymaker/mask.bin@{file_digest(models / 'mask.bin')[:16]}+clip@{'0' * 16}"
          if storymaker else None)
    rng = np.random.default_rng(0)
    payloads = _adapter_payloads(rng, args.full_size)
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
        if sm is not None:
            vault.put_artifact(handle, "storymaker", codec.encode(
                "storymaker", {"tokens": rng.normal(size=(20, 2048)).astype(np.float32)},
                {"model_id": sm, "crop": "face_box_fallback"}), actor="bench")
        for kind in sorted(adapters):
            vault.put_artifact(handle, kind, payloads[kind](), actor="bench")
    if args.full_size:
        compose = ComposePipeline(pipe, vault=vault, models_dir=models,
                                  base_model_id="sdxl-full-size-random")
    else:
        compose = ComposePipeline.from_pretrained(None, vault=vault, models_dir=models,
                                                  device=args.device, dtype=args.dtype)
    plain = StableDiffusionXLPipeline(**compose.pipe.components)
    plain.set_progress_bar_config(disable=True)
    return vault, compose, plain


class UNetTimer:
    """Sums the seconds spent in ``unet.forward``.

    On CUDA the forward only queues kernels, so wall-clock time around it would
    miss the work: CUDA events recorded on the stream bracket it instead, read
    by :meth:`seconds` after the call.
    """

    def __init__(self, unet, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._spans: list = []
        self._host = 0.0
        self._t0 = 0.0
        unet.register_forward_pre_hook(self._pre)
        unet.register_forward_hook(self._post)

    def reset(self) -> None:
        self._spans.clear()
        self._host = 0.0

    def _pre(self, *_):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._spans.append([start, None])
        else:
            self._t0 = time.perf_counter()

    def _post(self, *_):
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans[-1][1] = end
        else:
            self._host += time.perf_counter() - self._t0

    def seconds(self) -> float:
        if not self.cuda:
            return self._host
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self._spans) / 1000


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
VARIANTS: dict[str, tuple[int, str | None]] = {
    "plain diffusers": (0, None),
    "photomaker x1": (1, "photomaker"), "photomaker x2": (2, "photomaker"),
    "photomaker x4": (4, "photomaker"),
    "storymaker x1": (1, "storymaker"), "storymaker x2": (2, "storymaker"),
    "faceid x1": (1, "faceid"), "faceid x4": (4, "faceid"),
    "instantid x1": (1, "instantid"), "instantid x4": (4, "instantid"),
    # One identity per method: PhotoMaker, StoryMaker, FaceID and InstantID in one image.
    "mixed x4": (4, "mixed"),
}
MIXED = ("photomaker", "storymaker", "faceid", "instantid")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full-size", action="store_true",
                        help="the full-size SDXL architecture, random weights (see the docstring)")
    parser.add_argument("--device", default=None,
                        help="tiny: as ComposePipeline.from_pretrained (CUDA if present); "
                             "--full-size: cuda if available else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: float16 on CUDA; on the CPU float32 (tiny) or "
                             "bfloat16 (--full-size)")
    parser.add_argument("--manifests", type=Path, default=None,
                        help="--full-size: the folder of base_models.json (default: "
                             "../shared/reference/manifests or shared/reference/manifests)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of: " + ", ".join(
                            n.replace(" ", "-") for n in VARIANTS if n != "plain diffusers")
                        + " (plain diffusers always runs)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds (medians); default 7, --full-size 5")
    parser.add_argument("--steps", type=int, default=None, help="default 10, --full-size 30")
    parser.add_argument("--size", default=None,
                        help="WIDTHxHEIGHT; default 128x128, --full-size 1024x1024")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--fresh-prompts", action="store_true",
                        help="a prompt never used before for every call (no encoding reused)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds after setup began: start no round that would end past them "
                             "(judged by the slowest round so far; at least one round runs)")
    args = parser.parse_args(argv)
    full = args.full_size
    args.rounds = args.rounds if args.rounds is not None else (5 if full else 7)
    args.steps = args.steps if args.steps is not None else (30 if full else 10)
    args.size = args.size or ("1024x1024" if full else "128x128")
    if full:
        args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available()
                                                   else "cpu"))
        # A float32 full-size SDXL is ~14 GB: bfloat16 keeps a CPU run within a small
        # machine's memory.
        args.dtype = DTYPES[args.dtype] if args.dtype else (
            torch.float16 if args.device.type == "cuda" else torch.bfloat16)
    else:
        args.dtype = DTYPES[args.dtype] if args.dtype else None
    chosen = {"plain diffusers"}
    for name in (args.variants or "").split(","):
        name = name.strip().replace("-", " ")
        if not name:
            continue
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}")
        chosen.add(name)
    args.variants = [n for n in VARIANTS if not args.variants or n in chosen]
    return args


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    variants = {name: VARIANTS[name] for name in args.variants}
    used = {m for _, method in variants.values() if method
            for m in (MIXED if method == "mixed" else (method,))}
    storymaker = "storymaker" in used
    adapters = used & {"faceid", "instantid"}

    root = args.data_dir or Path(tempfile.mkdtemp(prefix="idvault-bench-gen-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    vault, compose, plain = _setup(root, 4, args, storymaker, adapters)
    device, dtype = compose.device, compose.dtype
    cuda = device.type == "cuda"
    model = "full-size SDXL, random weights" if args.full_size else "sdxl-tiny stand-in"
    gpu = f" ({torch.cuda.get_device_name(device)})" if cuda else ""
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; {model} on "
          f"{device}{gpu}, {str(dtype).removeprefix('torch.')}; "
          f"{args.steps} steps, {width}x{height}, guidance 5.0, {args.rounds} rounds, "
          f"{'a fresh prompt per call' if args.fresh_prompts else 'one prompt per variant'}")
    print(f"setup (stand-ins, vault, 4 identities, load) {time.perf_counter() - t0:.1f} s")
    if cuda:
        print(f"GPU memory allocated after setup {torch.cuda.memory_allocated(device) / 2**30:.2f}"
              " GiB")
    timer = UNetTimer(compose.pipe.unet, device)

    calls = itertools.count()

    def setting() -> str:
        # A call number in the text changes the tokens (and so the encoding) of ours and plain
        # alike.
        return f" on a beach, watercolor, take {next(calls)}" if args.fresh_prompts else \
            " on a beach, watercolor"

    def scene(n: int) -> str:
        return " and ".join(CLASS_WORDS[:n]) + setting()

    steps_ms: dict[str, dict[str, list[float]]] = {name: {} for name in variants}
    peaks: dict[str, float] = {name: 0.0 for name in variants}

    def run(name: str) -> tuple[float, float]:
        n, method = variants[name]
        if method is None:
            # The scene text of the largest variant: every prompt is 77 tokens anyway.
            text = scene(4)
        else:
            text = " and ".join(f"@bench/p{i + 1}:{CLASS_WORDS[i]}" for i in range(n)) + setting()
        timer.reset()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        if method is None:
            plain(text, num_inference_steps=args.steps, height=height, width=width,
                  guidance_scale=5.0, generator=torch.Generator().manual_seed(args.seed))
        else:
            chosen = ({f"bench/p{i + 1}": m for i, m in enumerate(MIXED)}
                      if method == "mixed" else method)
            result = compose(text, seed=args.seed, steps=args.steps, size=(width, height),
                             method=chosen, actor="bench")
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start, timer.seconds()
        if cuda:
            peaks[name] = max(peaks[name], _peak_gib())
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
    slowest = 0.0
    for r in range(args.rounds):
        if r and args.time_budget is not None and \
                time.perf_counter() - t0 + slowest > args.time_budget:
            print(f"  time budget {args.time_budget:.0f} s: stopped after {r} of {args.rounds} "
                  "rounds", flush=True)
            break
        started = time.perf_counter()
        shuffler.shuffle(order)
        for name in order:
            times[name].append(run(name))
        slowest = max(slowest, time.perf_counter() - started)
        print(f"  round {r + 1}/{args.rounds} done ({slowest:.1f} s the slowest)", flush=True)

    base = times["plain diffusers"]
    print(f"\n{'variant':<17} {'total s':>8} {'unet s':>8} {'ratio total':>12} "
          f"{'ratio unet':>11}" + (f" {'peak GiB':>9}" if cuda else ""))
    for name, rows in times.items():
        total = statistics.median(t for t, _ in rows)
        unet = statistics.median(u for _, u in rows)
        paired_total = statistics.median(t / b for (t, _), (b, _) in zip(rows, base, strict=True))
        paired_unet = statistics.median(u / b for (_, u), (_, b) in zip(rows, base, strict=True))
        print(f"{name:<17} {total:>8.3f} {unet:>8.3f} {paired_total:>12.3f} "
              f"{paired_unet:>11.3f}" + (f" {peaks[name]:>9.2f}" if cuda else ""))
    if cuda:
        print("peak GiB: torch.cuda.max_memory_allocated() during the variant's calls (the "
              "highest of its calls, warm-up included; reset before each call)")
    names = [n for n in variants if steps_ms[n]]
    if names:
        print(f"\nours, median ms per step: {'step':<16}" + "".join(f"{n:>15}" for n in names))
        for step in steps_ms[names[0]]:
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
