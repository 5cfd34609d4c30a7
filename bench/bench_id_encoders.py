"""Identity encoders: per-photo encoding time with full-size towers (random weights).

What it measures
    The work enrollment does per photo for the ``photomaker`` and
    ``storymaker`` artifacts, with modules of the **official sizes** and
    random weights (no real weights exist on the development machines; the
    numbers do not depend on the values):

    - PhotoMaker v1 and v2 ID encoders (CLIP ViT-L/14 at 224 px, 326M / 543M
      parameters): CLIP preprocessing of a 1024x768 photo, the vision tower,
      and the head (v1: two projections of the pooled token; v2: ArcFace token
      projection + 4-layer perceiver over the 257 patch features).
    - StoryMaker (OpenCLIP ViT-H/14, 632M, plus ``image_proj_model``, 304M):
      the two 224 px crops (aligned face via ``norm_crop``, fallback character
      crop), CLIP preprocessing, the tower on both crops (penultimate hidden
      states, the last of its 32 layers skipped), and the 20-token head.
      Per character = per photo: StoryMaker stores one photo per identity.

    Batch 1 and batch 8 (photos per forward pass); per-photo milliseconds are
    the batch time divided by the batch. ``--iters`` timed runs after one
    warm-up at batch 1; medians. fp32 on CPU by default (``--device cuda
    --dtype float16`` on a GPU machine). Modules are built on the meta device,
    materialised and filled with N(0, 0.02) noise, one at a time, and freed
    before the next (peak ~4 GB for StoryMaker in fp32). Nothing is asserted.

How to run
    .venv/bin/python bench/bench_id_encoders.py             # ~4-8 min on 2 busy cores
    .venv/bin/python bench/bench_id_encoders.py --iters 1 --only photomaker
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import transformers
from torch import nn

from encoders.id.clip_vision import (
    VIT_H14,
    ClipVisionTower,
    build_vision_model,
    clip_preprocess,
    materialize_position_ids,
)
from encoders.id.photomaker import PhotoMakerIDEncoder
from encoders.id.storymaker import (
    StoryMakerCheckpoint,
    StoryMakerEncoder,
    StoryMakerImageProj,
    character_inputs,
)
from encoders.standins.face_pack import synthetic_face

STAGES = ("prep", "tower", "head")


def random_full_size(factory, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Build on meta, materialise, fill with N(0, 0.02) (LayerNorm weights ~1)."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for owner in module.modules():
            for name, p in owner.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g) * 0.02
                if isinstance(owner, nn.LayerNorm) and name == "weight":
                    noise += 1
                p.copy_(noise.to(p.dtype))
    materialize_position_ids(module, device, reset=True)
    return module.to(dtype).eval()


def _photos(n: int) -> list[np.ndarray]:
    return [synthetic_face(100 + i, i, (768, 1024), radius=0.25) for i in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_photomaker(version: str, batch: int, photos, device, dtype, model) -> dict[str, float]:
    clock = time.perf_counter
    arcface = torch.randn(batch, 512, generator=torch.Generator().manual_seed(1)) * 20
    t0 = clock()
    pixels = clip_preprocess(photos[:batch]).to(device, dtype)  # (b, 3, 224, 224)
    _sync(device)
    t1 = clock()
    with torch.inference_mode():
        out = model.vision_model(pixel_values=pixels)
        _sync(device)
        t2 = clock()
        if version == "v1":
            pooled = out.pooler_output
            ids = torch.cat([model.visual_projection(pooled), model.visual_projection_2(pooled)],
                            -1)[:, None]
        else:
            ids = model.qformer_perceiver(arcface.to(device, dtype), out.last_hidden_state)
        _sync(device)
        t3 = clock()
    assert ids.shape == (batch, 1 if version == "v1" else 2, 2048)
    return {"prep": t1 - t0, "tower": t2 - t1, "head": t3 - t2}


def time_storymaker(encoder: StoryMakerEncoder, batch: int, photos, faces, device
                    ) -> dict[str, float]:
    clock = time.perf_counter
    t0 = clock()
    inputs = [character_inputs(photos[i], faces[i]) for i in range(batch)]
    pixels = clip_preprocess([i.face_crop for i in inputs] + [i.character_crop for i in inputs])
    _sync(device)
    t1 = clock()
    with torch.inference_mode():
        feats = encoder.tower.penultimate(pixels)  # (2b, 257, 1280)
        _sync(device)
        t2 = clock()
        ids = torch.from_numpy(np.stack([i.id_embed for i in inputs])).to(device, encoder.dtype)
        tokens = encoder.image_proj.character_tokens(ids, feats[batch:], feats[:batch])
        _sync(device)
        t3 = clock()
    assert tokens.shape == (batch, 20, 2048)
    return {"prep": t1 - t0, "tower": t2 - t1, "head": t3 - t2}


def _measure(fn, batch: int, iters: int) -> dict[str, float]:
    runs = [fn(batch) for _ in range(iters)]
    per = {s: statistics.median(r[s] for r in runs) / batch * 1e3 for s in STAGES}
    totals = sorted(sum(r.values()) / batch * 1e3 for r in runs)
    per["total"] = statistics.median(totals)
    per["min"] = totals[0]
    return per


def _row(name: str, tower: str, batch: int, m: dict[str, float]) -> str:
    return (f"| {name} | {tower} | {batch} | {m['prep']:.0f} | {m['tower']:.0f} | "
            f"{m['head']:.0f} | **{m['total']:.0f}** | {m['min']:.0f} |")


def _fake_faces(photos) -> list[SimpleNamespace]:
    """Face boxes and keypoints where synthetic_face drew them (no detector needed)."""
    faces = []
    for photo in photos:
        h, w = photo.shape[:2]
        r = 0.25 * min(h, w)
        cx, cy = w / 2, h / 2
        kps = np.array([[cx - 0.35 * r, cy - 0.25 * r], [cx + 0.35 * r, cy - 0.25 * r],
                        [cx, cy + 0.05 * r], [cx - 0.3 * r, cy + 0.4 * r],
                        [cx + 0.3 * r, cy + 0.4 * r]], np.float32)
        normed = np.random.default_rng(len(faces)).normal(size=512).astype(np.float32)
        faces.append(SimpleNamespace(bbox=np.array([cx - r, cy - r, cx + r, cy + r]), kps=kps,
                                     normed=normed / np.linalg.norm(normed)))
    return faces


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--iters", type=int, default=2, help="timed runs per batch size")
    parser.add_argument("--only", choices=["photomaker", "storymaker"], default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16",
                                                                 "bfloat16"])
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    photos = _photos(max(batches))

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch "
          f"threads), {platform.machine()}, device {device}, {args.dtype}; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")
    print("\nPer-photo ms (batch time / batch): prep = CLIP preprocessing (+ crops for "
          "StoryMaker), tower = CLIP vision tower, head = ID projection / perceiver\n")
    rows = ["| encoder | tower | batch | prep | tower | head | total (median) | total (min) |",
            "|---|---|---|---|---|---|---|---|"]

    if args.only in (None, "photomaker"):
        for version in ("v1", "v2"):
            t0 = time.perf_counter()
            model = random_full_size(lambda v=version: PhotoMakerIDEncoder(v), device, dtype)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"built PhotoMaker {version} ID encoder ({params:.0f}M params) in "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
            time_photomaker(version, 1, photos, device, dtype, model)  # warm-up
            for b in batches:
                m = _measure(lambda n, v=version, mod=model: time_photomaker(
                    v, n, photos, device, dtype, mod), b, args.iters)
                rows.append(_row(f"PhotoMaker {version}", "ViT-L/14", b, m))
                print(rows[-1], flush=True)
            del model
            gc.collect()

    if args.only in (None, "storymaker"):
        t0 = time.perf_counter()
        vision = random_full_size(lambda: build_vision_model(VIT_H14), device, dtype, seed=1)
        proj = random_full_size(StoryMakerImageProj, device, dtype, seed=2)
        tower = ClipVisionTower(vision, None, device, dtype)
        checkpoint = StoryMakerCheckpoint(Path("random"), "0" * 64, {}, None)
        encoder = StoryMakerEncoder(proj, tower, checkpoint, device=device, dtype=dtype)
        print(f"built ViT-H/14 ({sum(p.numel() for p in vision.parameters()) / 1e6:.0f}M) + "
              f"image_proj_model ({sum(p.numel() for p in proj.parameters()) / 1e6:.0f}M) in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        faces = _fake_faces(photos)
        time_storymaker(encoder, 1, photos, faces, device)  # warm-up
        for b in batches:
            m = _measure(lambda n: time_storymaker(encoder, n, photos, faces, device), b,
                         args.iters)
            rows.append(_row("StoryMaker", "ViT-H/14 (2 crops)", b, m))
            print(rows[-1], flush=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nload average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at end\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
