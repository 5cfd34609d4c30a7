"""Face analysis for enrollment: per-photo latency by stage, and batch throughput.

What it measures
    1. Per-photo enrollment analysis on CPU with a recogniser of the real size
       (ArcFace IResNet-50, 43.6M parameters, random weights exported to ONNX
       in w600k_r50's interface) and the tiny stand-in detector, split into
       decode (JPEG bytes -> RGB, ``encoders.photo.load_photo``), detect
       (``FaceAnalyzer.locate``: letterbox to 640x640 + detector + NMS),
       align (``norm_crop`` to 112x112 + the sharpness measure), embed (one
       recogniser run) and store (``Vault.store_enrollment`` on the embedded
       default, SQLite: dedupe search in the owner's index, seal under the
       identity's new data key, insert, audit event, durable commits in the
       data DB and the key store). Synthetic photos at ``--sizes`` (long side,
       4:3, JPEG quality 90), a new person per run, ``--repeats`` runs each
       after a warm-up; median and p90 per stage.
    2. Throughput of ``FaceAnalyzer.analyze_many`` on ``--n`` synthetic people
       (256x256 RGB arrays, one photo each, rendered beforehand and not timed)
       with the tiny pack, in chunks of ``--chunk`` photos (one recogniser
       run per 32 faces), and the same with the R50 recogniser on
       ``--r50-n`` of them.
    3. Whole enrollments per second: ``Enroller.enroll`` (the product's
       library call: analysis, face artifact, dedupe, seal, store, audit) of
       ``--n`` synthetic people, one photo each, one after another into one
       owner with the tiny pack, on SQLite.

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

from encoders.face.analyzer import FaceAnalyzer
from encoders.face.pack import find_face_pack
from encoders.photo import load_photo
from encoders.standins.face_pack import synthetic_face, write_tiny_face_pack
from vault import codec
from vault.config import Settings
from vault.consent import ConsentRequest
from vault.errors import DuplicateIdentity
from vault.vault import Vault

STAGES = ("decode", "detect", "align", "embed", "store")


def enrollment_stage_timings(analyzer: FaceAnalyzer, photo: bytes, vault=None,
                             handle: str | None = None) -> dict[str, float]:
    """Seconds spent in each stage of one enrollment photo.

    Mirrors ``FaceAnalyzer.analyze`` step by step, then (with ``vault``) the
    vault's part: ``store_enrollment`` of ``handle`` (dedupe, seal, store).
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
    times = {"decode": t1 - t0, "detect": t2 - t1, "align": t3 - t2, "embed": t4 - t3}
    if vault is not None:
        raw = embedding[0].astype(np.float32)
        payload = codec.encode("face", {"embeddings": raw[None], "normed":
                                        (raw / np.linalg.norm(raw))[None],
                                        "mean": raw / np.linalg.norm(raw)},
                               {"model_id": "bench"})
        t5 = clock()
        vault.store_enrollment(handle, payload, consent_request=_consent(), actor="bench")
        times["store"] = clock() - t5
    return times


def _consent():
    import datetime as dt

    return ConsentRequest.from_dict({
        "subject": "bench", "given_by": "self", "purposes": ["enroll"],
        "retain_until": (dt.date.today() + dt.timedelta(days=30)).isoformat(),
        "evidence_sha256": "0" * 64})


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


def latency(analyzer: FaceAnalyzer, sizes: list[int], repeats: int, vault) -> None:
    print("\nPer-photo enrollment latency, ArcFace R50 (random weights) + tiny detector, CPU,"
          " vault on SQLite")
    print(f"{'photo':>16} {'stage':>8} {'median ms':>10} {'p90 ms':>8}")
    for side in sizes:
        photos = [_jpeg(side, seed=side * 1000 + i) for i in range(repeats + 1)]
        runs = []
        for i, photo in enumerate(photos):
            # An owner per run: a random-weight R50 embeds every synthetic face
            # alike, so one roster would block them as duplicates (dedupe
            # search cost is bench_dedupe's subject).
            vault.add_owner(f"s{side}r{i}", "studio", actor="bench")
            runs.append(enrollment_stage_timings(analyzer, photo, vault, f"s{side}r{i}/p"))
        runs = runs[1:]  # the first run warms up
        label = f"{side}x{side * 3 // 4} {len(photos[0]) // 1024}KB"
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


def enrollments(analyzer: FaceAnalyzer, vault, n: int) -> float:
    """Whole enrollments, one person (one photo) each, through Enroller.enroll."""
    from encoders.enrollment import Enroller

    enroller = Enroller(vault, analyzer)
    consent = _consent()
    photos = [synthetic_face(10_000 + p, p) for p in range(n)]  # rendering not timed
    blocked = 0
    t0 = time.perf_counter()
    for p, photo in enumerate(photos):
        try:
            enroller.enroll(f"people/p{p}", [photo], consent=consent, actor="bench")
        except DuplicateIdentity:
            blocked += 1
    elapsed = time.perf_counter() - t0
    rate = n / elapsed
    print(f"{'Enroller.enroll, tiny pack, SQLite':<44} {n:>6} people {elapsed:8.2f} s "
          f"{rate:8.1f} enrollments/s  ({blocked} blocked as duplicates)")
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
        from encoders.standins.arcface_r50 import export_random_arcface_r50  # torch: only here

        export_random_arcface_r50(r50_dir / "w600k_r50.onnx")
        print(f"exported random ArcFace R50 in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        r50 = FaceAnalyzer(find_face_pack(r50_dir))
        print(f"loaded + warmed up R50 pack in {time.perf_counter() - t0:.2f} s "
              f"(providers {', '.join(r50.providers)}, embedding dim {r50.embedding_dim})")
        tiny = FaceAnalyzer(find_face_pack(tiny_dir))

        vault = Vault.init(Settings(data_dir=Path(tmp) / "vault"), actor="bench")
        vault.add_owner("people", "studio", actor="bench")
        latency(r50, [int(s) for s in args.sizes.split(",") if s], args.repeats, vault)
        print("\nBatch throughput (analyze_many, 256x256 arrays, rendering not timed)")
        throughput(tiny, args.n, args.chunk, "tiny pack (tiny detector + tiny recogniser)")
        if args.r50_n:
            throughput(r50, args.r50_n, min(args.chunk, args.r50_n),
                       "tiny detector + ArcFace R50")
        print("\nWhole enrollments (analysis + dedupe + seal + store + audit)")
        enrollments(tiny, vault, args.n)
        vault.dispose()


if __name__ == "__main__":
    main()
