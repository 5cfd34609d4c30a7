"""Face analysis for enrollment: per-photo latency by stage, and batch throughput.

What it measures
    1. Per-photo enrollment analysis on CPU with a recogniser of the real size
       (ArcFace IResNet-50, 43.6M parameters, random weights exported to ONNX
       in w600k_r50's interface) and the tiny stand-in detector, split into
       decode (JPEG bytes -> RGB, ``encoders.photo.load_photo``), detect
       (``FaceAnalyzer.locate``: letterbox to 640x640 + detector + NMS),
       align (``norm_crop`` to 112x112 + the sharpness measure) and embed
       (one recogniser run). Synthetic photos at ``--sizes`` (long side, 4:3,
       JPEG quality 90), ``--repeats`` runs each after a warm-up; median and
       p90 per stage. :func:`enrollment_stage_timings` returns the stages for
       one photo and is where the vault's seal and store stages belong.
    2. Throughput of ``FaceAnalyzer.analyze_many`` on ``--n`` synthetic people
       (256x256 RGB arrays, one photo each, rendered beforehand and not timed)
       with the tiny pack, in chunks of ``--chunk`` photos (one recogniser
       run per 32 faces), and the same with the R50 recogniser on
       ``--r50-n`` of them.

    The detector is the tiny stand-in, far cheaper than det_10g (SCRFD-10G,
    ~10 GFLOPs at 640x640), so "detect" here is a lower bound; decode, align
    and the R50 embed are representative. Nothing is asserted: it prints.

How to run
    .venv/bin/python bench/bench_face.py                  # ~1-2 min on 2 cores
    .venv/bin/python bench/bench_face.py --n 200 --r50-n 32 --repeats 5
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image

from encoders.face_analyzer import FaceAnalyzer
from encoders.face_pack import find_face_pack
from encoders.photo import load_photo
from encoders.tiny_models import synthetic_face, write_tiny_face_pack

STAGES = ("decode", "detect", "align", "embed")


def enrollment_stage_timings(analyzer: FaceAnalyzer, photo: bytes) -> dict[str, float]:
    """Seconds spent in each analysis stage of one enrollment photo.

    Mirrors ``FaceAnalyzer.analyze`` step by step. Extend it with the
    vault's stages (dedupe search, seal, store) to time a whole enrollment.
    """
    clock = time.perf_counter
    t0 = clock()
    image = load_photo(photo)  # (H, W, 3) uint8 RGB
    t1 = clock()
    boxes, kps = analyzer.locate(image)  # (N, 5), (N, 5, 2)
    t2 = clock()
    if len(boxes) != 1:
        raise RuntimeError(f"expected one face in the bench photo, found {len(boxes)}")
    crop = analyzer.align(image, kps[0])  # (112, 112, 3)
    _sharpness(crop)
    t3 = clock()
    embedding = analyzer.embed([crop])  # (1, D)
    t4 = clock()
    assert embedding.shape == (1, analyzer.embedding_dim)
    return {"decode": t1 - t0, "detect": t2 - t1, "align": t3 - t2, "embed": t4 - t3}


def _sharpness(crop: np.ndarray) -> float:
    import cv2

    return float(cv2.Laplacian(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def _jpeg(long_side: int, seed: int) -> bytes:
    size = (long_side * 3 // 4, long_side)  # (height, width), 4:3 landscape
    image = synthetic_face(seed, seed, size=size, radius=0.3)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _ms(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return statistics.median(values) * 1e3, p90 * 1e3


def latency(analyzer: FaceAnalyzer, sizes: list[int], repeats: int) -> None:
    print("\nPer-photo analysis latency, ArcFace R50 (random weights) + tiny detector, CPU")
    print(f"{'photo':>16} {'stage':>8} {'median ms':>10} {'p90 ms':>8}")
    for side in sizes:
        photo = _jpeg(side, seed=side)
        enrollment_stage_timings(analyzer, photo)  # warm-up (caches, allocator)
        runs = [enrollment_stage_timings(analyzer, photo) for _ in range(repeats)]
        label = f"{side}x{side * 3 // 4} {len(photo) // 1024}KB"
        total = [sum(r.values()) for r in runs]
        for stage in STAGES:
            med, p90 = _ms([r[stage] for r in runs])
            print(f"{label:>16} {stage:>8} {med:10.1f} {p90:8.1f}")
            label = ""
        med, p90 = _ms(total)
        print(f"{'':>16} {'total':>8} {med:10.1f} {p90:8.1f}")


def throughput(analyzer: FaceAnalyzer, n: int, chunk: int, label: str) -> float:
    elapsed = 0.0
    done = 0
    for start in range(0, n, chunk):
        photos = [synthetic_face(p, p) for p in range(start, min(n, start + chunk))]
        t0 = time.perf_counter()
        results = analyzer.analyze_many(photos)
        elapsed += time.perf_counter() - t0
        done += len(results)
    rate = done / elapsed
    print(f"{label:<44} {done:>6} photos {elapsed:8.2f} s {rate:8.1f} photos/s")
    return rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="people in the tiny-pack batch")
    parser.add_argument("--r50-n", type=int, default=64, help="people in the R50 batch")
    parser.add_argument("--chunk", type=int, default=100, help="photos per analyze_many call")
    parser.add_argument("--sizes", default="1024,4032", help="photo long sides for latency")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    print(f"python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}")
    with tempfile.TemporaryDirectory(prefix="bench_face_") as tmp:
        tiny_dir = write_tiny_face_pack(Path(tmp) / "tiny")
        r50_dir = Path(tmp) / "r50"
        r50_dir.mkdir()
        (r50_dir / "det_10g.onnx").write_bytes((tiny_dir / "det_10g.onnx").read_bytes())
        t0 = time.perf_counter()
        from encoders.arcface_r50 import export_random_arcface_r50  # torch: only here

        export_random_arcface_r50(r50_dir / "w600k_r50.onnx")
        print(f"exported random ArcFace R50 in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        r50 = FaceAnalyzer(find_face_pack(r50_dir))
        print(f"loaded + warmed up R50 pack in {time.perf_counter() - t0:.2f} s "
              f"(providers {', '.join(r50.providers)}, embedding dim {r50.embedding_dim})")
        tiny = FaceAnalyzer(find_face_pack(tiny_dir))

        latency(r50, [int(s) for s in args.sizes.split(",") if s], args.repeats)
        print("\nBatch throughput (analyze_many, 256x256 arrays, rendering not timed)")
        throughput(tiny, args.n, args.chunk, "tiny pack (tiny detector + tiny recogniser)")
        if args.r50_n:
            throughput(r50, args.r50_n, min(args.chunk, args.r50_n),
                       "tiny detector + ArcFace R50")


if __name__ == "__main__":
    main()
