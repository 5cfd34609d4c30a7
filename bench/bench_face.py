"""Face analysis for enrollment: per-photo latency by stage, and batch throughput.

What it measures
    1. onnxruntime session options (``--options``, on by default): the
       enrollment sequence (tiny detector, align, ArcFace R50 embed) per photo
       with sessions built under each variant: onnxruntime's defaults (what
       insightface builds, the state before ``session_options``), the
       product's ``encoders.face.models.session_options``, and the product's
       with one option changed (threads 1, spinning on, graph optimisation
       EXTENDED, no CPU arena, no memory patterns, parallel execution mode).
       All variants live in one process and take turns in a new random order
       for each photo, so machine load hits them alike; median ms and the
       median per-photo ratio to the product's variant.
    2. Per-photo enrollment latency on CPU with a recogniser of the real size
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
       after a warm-up; median and p90 per stage. With ``--scrfd`` (default)
       each run also times ``locate`` with a full-size SCRFD-10G (random
       weights, ``encoders.standins.scrfd_10g``) on the same photo: the row
       "detect 10G", what the real det_10g would cost instead of the tiny
       detector, and "total 10G", the total with it.
    3. Photos per enrollment (``--photos``, default 1,3,5): ``Enroller.enroll``
       of one new identity from that many JPEG photos (1024x768, bytes as an
       upload brings them), R50 + tiny detector, SQLite: ms per photo for the
       whole call, for its analysis (decode, detect, align, one recogniser run
       for all the photos) and its store.
    4. Throughput of ``FaceAnalyzer.analyze_many`` on ``--n`` synthetic people
       (256x256 RGB arrays, one photo each, rendered beforehand and not timed)
       with the tiny pack, in chunks of ``--chunk`` photos (one recogniser
       run per 32 faces), and the same with the R50 recogniser on
       ``--r50-n`` of them.
    5. Whole enrollments per second: ``Enroller.enroll`` (the product's
       library call: analysis, face artifact, dedupe, seal, store, audit) of
       ``--n`` synthetic people, one photo each, one after another into one
       owner with the tiny pack, on SQLite.

    The tiny detector is far cheaper than det_10g (SCRFD-10G, 10 G
    multiply-adds at 640x480, 13.3 G at the 640x640 enrollment uses); the
    "10G" rows say what the real one adds. Decode, align and the R50 embed
    are representative. Nothing is asserted: it prints.

How to run
    .venv/bin/python bench/bench_face.py                  # ~4-5 min on 2 cores
    .venv/bin/python bench/bench_face.py --n 200 --r50-n 32 --repeats 5
    .venv/bin/python bench/bench_face.py --n 0 --r50-n 0 --sizes 1024 --repeats 20 \
        --option-photos 30                                # the per-photo figures only
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnxruntime
from PIL import Image

from encoders.face.analyzer import FaceAnalyzer
from encoders.face.models import session_options
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


def latency(analyzer: FaceAnalyzer, sizes: list[int], repeats: int, vault,
            scrfd: FaceAnalyzer | None = None) -> None:
    print("\nPer-photo enrollment latency, ArcFace R50 (random weights) + tiny detector, CPU,"
          " vault on SQLite")
    print(f"{'photo':>16} {'stage':>10} {'median ms':>10} {'p90 ms':>8} {'min ms':>8}")
    for side in sizes:
        photos = [_jpeg(side, seed=side * 1000 + i) for i in range(repeats + 1)]
        runs = []
        for i, photo in enumerate(photos):
            # An owner per run: a random-weight R50 embeds every synthetic face
            # alike, so one roster would block them as duplicates (dedupe
            # search cost is bench_dedupe's subject).
            vault.add_owner(f"s{side}r{i}", "studio", actor="bench")
            runs.append(enrollment_stage_timings(analyzer, photo, vault, f"s{side}r{i}/p"))
            if scrfd is not None:
                # The full-size detector on the same photo, outside the sequence
                # above so that its stages stay those the product runs.
                image = load_photo(photo)
                t0 = time.perf_counter()
                scrfd.locate(image)
                runs[-1]["detect 10G"] = time.perf_counter() - t0
        runs = runs[1:]  # the first run warms up
        label = f"{side}x{side * 3 // 4} {len(photos[0]) // 1024}KB"
        total = [sum(r[stage] for stage in STAGES) for r in runs]
        rows = [(stage, [r[stage] for r in runs]) for stage in STAGES] + [("total", total)]
        if scrfd is not None:
            rows += [("detect 10G", [r["detect 10G"] for r in runs]),
                     ("total 10G", [t - r["detect"] + r["detect 10G"]
                                    for t, r in zip(total, runs)])]
        for stage, values in rows:
            med, p90 = _ms(values)
            print(f"{label:>16} {stage:>10} {med:10.1f} {p90:8.1f} {min(values) * 1e3:8.1f}")
            label = ""


# -- onnxruntime session options ------------------------------------------------------

LEVEL = onnxruntime.GraphOptimizationLevel


def _options(threads: int = 0, spinning: bool = False, level: LEVEL = LEVEL.ORT_ENABLE_ALL,
             arena: bool = True, mem_pattern: bool = True,
             parallel: bool = False) -> onnxruntime.SessionOptions:
    """The product's options with one changed (each variant of OPTION_VARIANTS)."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = level
    options.enable_cpu_mem_arena = arena
    options.enable_mem_pattern = mem_pattern
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if parallel:
        options.execution_mode = onnxruntime.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = 2
    return options


OPTION_VARIANTS = {
    # name: options of both sessions (None: what insightface builds by itself)
    "ort defaults": lambda: None,
    "product": session_options,
    "threads=1": lambda: _options(threads=1),
    "spinning on": lambda: _options(spinning=True),
    "EXTENDED": lambda: _options(level=LEVEL.ORT_ENABLE_EXTENDED),
    "no arena": lambda: _options(arena=False),
    "no mem pattern": lambda: _options(mem_pattern=False),
    "parallel": lambda: _options(parallel=True),
}


def session_option_effects(pack_dir: Path, photos: int) -> None:
    """The enrollment sequence under each variant, interleaved in one process."""
    from insightface.model_zoo import get_model
    from insightface.utils import face_align

    cpu = ["CPUExecutionProvider"]
    models = {}
    for name, make in OPTION_VARIANTS.items():
        options = make()
        extra = {} if options is None else {"sess_options": options}
        detector = get_model(str(pack_dir / "det_10g.onnx"), providers=cpu, **extra)
        detector.prepare(0, input_size=(640, 640), nms_thresh=0.4)
        detector.detect(np.zeros((640, 640, 3), np.uint8), input_size=(640, 640))
        recognizer = get_model(str(pack_dir / "w600k_r50.onnx"), providers=cpu, **extra)
        recognizer.get_feat([np.zeros((112, 112, 3), np.uint8)])
        models[name] = (detector, recognizer)
    images = [cv2.cvtColor(load_photo(_jpeg(1024, seed=7000 + i)), cv2.COLOR_RGB2BGR)
              for i in range(photos + 1)]
    times: dict[str, dict[str, list[float]]] = {n: {"detect": [], "embed": [], "both": []}
                                                for n in models}
    for i, bgr in enumerate(images):
        order = list(models)
        random.Random(i).shuffle(order)
        for name in order:
            detector, recognizer = models[name]
            t0 = time.perf_counter()
            _, kps = detector.detect(bgr, input_size=(640, 640), det_thresh=0.5)
            crop = face_align.norm_crop(bgr, kps[0], image_size=112)
            t1 = time.perf_counter()
            recognizer.get_feat([crop])
            t2 = time.perf_counter()
            if i:  # the first photo warms up
                for key, value in (("detect", t1 - t0), ("embed", t2 - t1), ("both", t2 - t0)):
                    times[name][key].append(value)
            time.sleep(0.02)  # the store's I/O waits between photos
    print(f"\nonnxruntime session options: tiny detector + align + R50 embed per 1024x768 photo, "
          f"{photos} photos, variants interleaved ({os.popen('uptime').read().strip()})")
    print(f"{'variant':>16} {'detect ms':>10} {'embed ms':>9} {'both ms':>8} {'min ms':>7} "
          f"{'vs product':>11}")
    base = times["product"]["both"]
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t["both"], base))
        print(f"{name:>16} {statistics.median(t['detect']) * 1e3:10.1f} "
              f"{statistics.median(t['embed']) * 1e3:9.1f} "
              f"{statistics.median(t['both']) * 1e3:8.1f} {min(t['both']) * 1e3:7.1f} "
              f"{ratio:11.2f}")


# -- photos per enrollment ---------------------------------------------------------------

def photos_per_enrollment(analyzer: FaceAnalyzer, vault, counts: list[int],
                          repeats: int) -> None:
    """One new identity per call; the counts take turns so that load hits them alike."""
    from encoders.enrollment import Enroller

    enroller = Enroller(vault, analyzer)
    consent = _consent()
    runs: dict[int, list[tuple[float, float, float]]] = {k: [] for k in counts}
    for r in range(repeats + 1):
        order = list(counts)
        random.Random(r).shuffle(order)
        for k in order:
            photos = [_jpeg(1024, seed=9000 + 100 * k + 10 * r + j) for j in range(k)]
            owner = f"k{k}r{r}"
            vault.add_owner(owner, "studio", actor="bench")
            t0 = time.perf_counter()
            report = enroller.enroll(f"{owner}/p", photos, consent=consent, actor="bench")
            elapsed = time.perf_counter() - t0
            if r:  # the first round warms up
                runs[k].append((elapsed / k, report.timings["analyse"] / k,
                                report.timings["dedupe_seal_store"] / k))
    print(f"\nPhotos per enrollment: Enroller.enroll of one new identity, 1024x768 JPEGs, "
          f"R50 + tiny detector, SQLite, {repeats} runs each")
    print(f"{'photos':>7} {'ms/photo':>9} {'analyse/photo':>14} {'store/photo':>12} "
          f"{'p90 ms/photo':>13} {'min ms/photo':>13}")
    for k, values in runs.items():
        total, analyse, store = ([v[i] for v in values] for i in range(3))
        med, p90 = _ms(total)
        print(f"{k:>7} {med:9.1f} {_ms(analyse)[0]:14.1f} {_ms(store)[0]:12.1f} {p90:13.1f} "
              f"{min(total) * 1e3:13.1f}")


# -- throughput ----------------------------------------------------------------------------

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
    parser.add_argument("--photos", default="1,3,5", help="photos per enrollment to time")
    parser.add_argument("--option-photos", type=int, default=20,
                        help="photos per session-options variant (0: skip)")
    parser.add_argument("--scrfd", action=argparse.BooleanOptionalAction, default=True,
                        help="also time a full-size SCRFD-10G detector (random weights)")
    args = parser.parse_args(argv)

    print(f"python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}; {os.popen('uptime').read().strip()}")
    with tempfile.TemporaryDirectory(prefix="bench_face_") as tmp:
        tiny_dir = write_tiny_face_pack(Path(tmp) / "tiny")
        r50_dir = Path(tmp) / "r50"
        r50_dir.mkdir()
        shutil.copy(tiny_dir / "det_10g.onnx", r50_dir / "det_10g.onnx")
        t0 = time.perf_counter()
        from encoders.standins.arcface_r50 import export_random_arcface_r50  # torch: only here

        export_random_arcface_r50(r50_dir / "w600k_r50.onnx")
        print(f"exported random ArcFace R50 in {time.perf_counter() - t0:.1f} s")
        scrfd = None
        if args.scrfd:
            from encoders.standins.scrfd_10g import export_random_scrfd_10g

            scrfd_dir = Path(tmp) / "scrfd"
            export_random_scrfd_10g(scrfd_dir / "det_10g.onnx")
            # The tiny recogniser: only this analyzer's locate() is timed.
            shutil.copy(tiny_dir / "w600k_r50.onnx", scrfd_dir / "w600k_r50.onnx")
            scrfd = FaceAnalyzer(find_face_pack(scrfd_dir))
        if args.option_photos:
            session_option_effects(r50_dir, args.option_photos)
        t0 = time.perf_counter()
        r50 = FaceAnalyzer(find_face_pack(r50_dir))
        print(f"\nloaded + warmed up R50 pack in {time.perf_counter() - t0:.2f} s "
              f"(providers {', '.join(r50.providers)}, embedding dim {r50.embedding_dim})")
        tiny = FaceAnalyzer(find_face_pack(tiny_dir))

        vault = Vault.init(Settings(data_dir=Path(tmp) / "vault"), actor="bench")
        vault.add_owner("people", "studio", actor="bench")
        sizes = [int(s) for s in args.sizes.split(",") if s]
        if sizes:
            latency(r50, sizes, args.repeats, vault, scrfd)
        counts = [int(k) for k in args.photos.split(",") if k]
        if counts:
            photos_per_enrollment(r50, vault, counts, args.repeats)
        if args.n or args.r50_n:
            print("\nBatch throughput (analyze_many, 256x256 arrays, rendering not timed)")
        if args.n:
            throughput(tiny, args.n, args.chunk, "tiny pack (tiny detector + tiny recogniser)")
        if args.r50_n:
            throughput(r50, args.r50_n, min(args.chunk, args.r50_n),
                       "tiny detector + ArcFace R50")
        if args.n:
            print("\nWhole enrollments (analysis + dedupe + seal + store + audit)")
            enrollments(tiny, vault, args.n)
        vault.dispose()
    print(os.popen("uptime").read().strip())


if __name__ == "__main__":
    main()
