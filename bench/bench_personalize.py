"""Fitting cost: seconds per step and per identity for Celeb Basis and the LiDB fine-tune.

What it measures
    The two optimisation-based methods (:mod:`encoders.fitting.celeb_basis`,
    :mod:`encoders.fitting.lidb`) with the **full-size SD1.5 architecture** (UNet
    860M parameters, CLIP-L text encoder, the SD VAE; configs from
    ``manifests/base_models.json``) with random weights, on this machine's
    CPU, fp32, at the recipe's batch 2 and 512x512:

    - ``celeb_basis``: one step of :func:`encoders.fitting.celeb_basis.fit_coefficients`
      (VAE encode, text encode with the two mapped tokens, UNet forward and
      backward down to the mapper: only the 512->1024 linear trains);
    - ``lidb``: one step of the rank-relaxed fast fine-tune
      (:func:`encoders.fitting.lidb.fit_lidb`, rank 4, 176 LoRA'd linears in the
      UNet and the text encoder).

    The first step of each is a warm-up and not counted; the median of the
    next ``--steps`` is extrapolated to a whole fit: 400 steps per identity
    (Celeb Basis) and 40 (LiDB), against the papers' ~3 minutes per identity
    (Celeb Basis, an A100) and ~20 s (HyperDreamBooth's fast fine-tune, an
    A100). Random weights cost the same time as real ones.

How to run
    .venv/bin/python bench/bench_personalize.py                   # 2 steps each; ~5-10 min
    .venv/bin/python bench/bench_personalize.py --steps 1 --size 256

    Needs ~12-16 GB of RAM at 512x512. A GPU (``--device cuda``, bf16 with
    ``--dtype bfloat16``) is supported by the code but was not available when
    this was written; see docs/personalization.md, "Performance".
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MANIFEST_CANDIDATES = tuple(
    Path(p) / "base_models.json"
    for p in (os.environ.get("IDVAULT_REFERENCE_MANIFESTS"),
              ROOT.parent / "shared" / "reference" / "manifests")
    if p)


def full_size_sd15(device: str, dtype: torch.dtype):
    """A StableDiffusionPipeline with SD1.5's architecture and random weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from generators.standins.pipelines import tiny_clip_tokenizer

    manifest = next(json.loads(p.read_text()) for p in MANIFEST_CANDIDATES if p.exists())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**manifest["sd15_unet_config"])
    tokenizer = tiny_clip_tokenizer()  # real CLIP BPE layout; ids fit the 49408-row table
    text = CLIPTextModel(CLIPTextConfig(**manifest["clip_l_text_config"],
                                        bos_token_id=tokenizer.bos_token_id,
                                        eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.eos_token_id))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        sample_size=512, scaling_factor=0.18215)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)


def timed(run, steps: int) -> list[float]:
    stamps: list[float] = []

    def progress(done: int, total: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        print(f"    step {done}/{total}: {stamps[-1] - t0:.1f} s, loss {loss:.4f}", flush=True)

    t0 = time.perf_counter()
    run(steps + 1, progress)  # + 1 warm-up step
    return [b - a for a, b in itertools.pairwise(stamps)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2, help="measured steps per method (+1 warm-up)")
    ap.add_argument("--size", type=int, default=512, help="training resolution (px)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--only", choices=["celeb_basis", "lidb"], default=None)
    args = ap.parse_args(argv)

    import torch.nn.functional as F

    from encoders.fitting import celeb_basis as cb
    from encoders.fitting import lidb
    from encoders.fitting.core import DiffusionModel, FitConfig

    dtype = getattr(torch, args.dtype)
    t = time.perf_counter()
    model = DiffusionModel(full_size_sd15(args.device, dtype))
    n_unet = sum(p.numel() for p in model.unet.parameters())
    print(f"built full-size SD1.5 (UNet {n_unet / 1e6:.0f}M params) in "
          f"{time.perf_counter() - t:.0f} s; {torch.get_num_threads()} CPU threads; "
          f"{args.size}x{args.size}, batch 2, {args.dtype} on {args.device}", flush=True)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, args.size, args.size, generator=g)]
    rows = []

    if args.only in (None, "celeb_basis"):
        print("  celeb_basis:", flush=True)
        t = time.perf_counter()
        basis = cb.default_basis(model)
        print(f"    basis built in {time.perf_counter() - t:.1f} s", flush=True)
        face = F.normalize(torch.randn(1, 512, generator=g), dim=-1)
        per = timed(lambda n, p: cb.fit_coefficients(
            model, basis, [face], [images],
            FitConfig(steps=n, resolution=args.size, checkpoint_every=0), progress=p),
            args.steps)
        rows.append(("celeb_basis", statistics.median(per), 400, 180.0))
    if args.only in (None, "lidb"):
        print("  lidb (fast fine-tune, rank 4):", flush=True)
        per = timed(lambda n, p: lidb.fit_lidb(
            model, images, FitConfig(steps=n, resolution=args.size, checkpoint_every=0,
                                     paste_scale=(1.0, 1.0), lr=1e-3),
            rank=lidb.FAST_RANK, progress=p), args.steps)
        rows.append(("lidb", statistics.median(per), 40, 20.0))

    print()
    print(f"| method | s/step (median of {args.steps}) | steps/identity | s/identity "
          f"(extrapolated) | paper (A100) | ratio |")
    print("|---|---|---|---|---|---|")
    for name, s, n, paper in rows:
        print(f"| {name} | {s:.1f} | {n} | {s * n:.0f} ({s * n / 60:.1f} min) | "
              f"~{paper:.0f} s | {s * n / paper:.0f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
