"""Dedupe search at scale: binary codes with exact re-ranking, against the exact scan.

What it measures
    Per roster size (default 100k and 1M identities, one stored photo each) and data
    kind (``--data``):

    * ``faces``: synthetic identities with cluster structure at the levels ArcFace
      shows (docs/dedupe.md cites the figures): identity centres in 20 broad clusters
      (two identities of one cluster at cosine ~0.15) split into lookalike groups of
      20 (cosine ~0.35 to each other, so an identity's nearest other identity in a
      5,749-identity roster, LFW's size, sits at cosine ~0.40, angle ~66 degrees); a
      photo lies at an angle of 28 +- 6 degrees from its identity's centre.
    * ``random``: isotropic unit vectors, no structure.

    Queries are re-enrollments, a new photo of an enrolled identity, in two sets:
    ``photo`` (faces: a fresh photo of the identity, so query-to-stored cosine ~0.6-0.85;
    random: cosine 0.75-0.90 to the stored vector, the issue's band) and ``hard``
    (cosine 0.50-0.75 to the stored photo: pose, age, poor photos).

    * build: ``OwnerIndex.reserve(n)`` then ``add_many`` in batches of 10,000 (what a
      streaming rebuild does), codes included;
    * recall@1 of the product path (``OwnerIndex.search(one photo, k=5)`` at this size:
      binary codes + exact re-rank) against exact search (faiss exhaustive inner
      product over the same vectors), and ``decision differs``: queries whose
      block/review/new decision differs from exact search's (default thresholds);
    * latency p50/p99 of that single-query search, over every query, and the p50 of
      the CPU time it took in its thread (the code path runs in the caller's thread:
      this is its cost without waiting for a core); and, in the same run on the same
      index, the exact scan (index type ``flat``) on an interleaved sample, with both
      paths' p50 on that sample;
    * ``remove`` of an identity (the scan of the id array) and of an id never added.

    ``--crossover``: single-query latency of the exact scan and of the code path from
    1k to 100k vectors: where ``FLAT_BELOW`` should sit. ``--memory N``: resident memory
    added by holding N vectors, each index built in a fresh subprocess: the previous
    flat index (faiss ``IndexIDMap2(IndexFlatIP)`` plus a per-identity dict) against
    ``OwnerIndex`` with and without ``reserve``. ``--sweep BITS``: recall by code length
    and re-rank depth (how ``CODE_BITS`` and ``RERANK`` were chosen).

How to run
    .venv/bin/python bench/bench_dedupe.py                              # 100k + 1M, both kinds
    .venv/bin/python bench/bench_dedupe.py --sizes 100000 --data faces  # ~1 min
    .venv/bin/python bench/bench_dedupe.py --sizes 0 --crossover --memory 1000000
    .venv/bin/python bench/bench_dedupe.py --sizes 1000000 --data faces --sweep 128,192,256,384

    1M vectors take ~2 GB; the 1M case peaks at ~5 GB. Nothing is asserted about time:
    it prints figures, with the load average (a shared machine inflates latencies; compare
    the two paths of one run, not runs).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import subprocess
import sys
import time

import faiss
import numpy as np

from vault.config import Settings
from vault.dedupe_index import (
    CODE_BITS,
    CODE_SEED,
    DIM,
    FLAT_BELOW,
    RERANK,
    DedupeIndex,
    OwnerIndex,
    projection,
)

K = 5
BATCH = 10_000
SETTINGS = Settings()
DECIDE = DedupeIndex(block=SETTINGS.dedupe_block, review=SETTINGS.dedupe_review).decide


# -- data -------------------------------------------------------------------------------
def unit(v: np.ndarray) -> np.ndarray:
    v /= np.linalg.norm(v, axis=-1, keepdims=True)
    return v


def near(base: np.ndarray, cos: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at cosine ``cos`` (one per row) to the unit rows of ``base``."""
    noise = rng.standard_normal(base.shape, dtype=np.float32)
    noise -= np.einsum("ij,ij->i", noise, base)[:, None] * base
    unit(noise)
    c = np.asarray(cos, dtype=np.float32).reshape(-1, 1)
    noise *= np.sqrt(1 - c * c)
    noise += c * base
    return unit(noise)


class Faces:
    """Identity centres: broad cluster -> lookalike group -> identity; photos around them."""

    def __init__(self, rng: np.random.Generator, clusters: int = 20, cluster_cos: float = 0.15,
                 group: int = 20, group_cos: float = 0.35, angle: float = 28.0,
                 angle_sd: float = 6.0) -> None:
        self.rng = rng
        self.clusters = unit(rng.standard_normal((clusters, DIM), dtype=np.float32))
        self.cluster_cos, self.group, self.group_cos = cluster_cos, group, group_cos
        self.angle, self.angle_sd = angle, angle_sd

    def centres(self, n: int) -> np.ndarray:
        groups = -(-n // self.group)
        c = self.rng.integers(len(self.clusters), size=groups)
        # group centres at sqrt(cluster/group cos) to their cluster, identities at
        # sqrt(group cos) to their group: identity pairs then sit at the stated cosines
        g = near(self.clusters[c], np.full(groups, math.sqrt(self.cluster_cos / self.group_cos)),
                 self.rng)
        out = np.empty((n, DIM), dtype=np.float32)
        for s in range(0, n, 100_000):
            m = min(100_000, n - s)
            out[s:s + m] = near(g[np.arange(s, s + m) // self.group],
                                np.full(m, math.sqrt(self.group_cos)), self.rng)
        return out

    def photos(self, centres: np.ndarray) -> np.ndarray:
        a = np.clip(self.rng.normal(self.angle, self.angle_sd, len(centres)), 5.0, 60.0)
        return near(centres, np.cos(np.radians(a)), self.rng)


def make_data(kind: str, n: int, queries: int, seed: int) -> tuple[np.ndarray, dict, dict]:
    """Stored vectors (one per identity, id = row + 1), query sets, and notes."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    src = rng.choice(n, size=queries, replace=False)
    if kind == "faces":
        faces = Faces(rng)
        x = faces.centres(n)
        own = x[src].copy()
        for s in range(0, n, 100_000):
            x[s:s + 100_000] = faces.photos(x[s:s + 100_000])
        photo = faces.photos(own)
    else:
        x = np.empty((n, DIM), dtype=np.float32)
        for s in range(0, n, 100_000):
            x[s:s + 100_000] = unit(rng.standard_normal((min(100_000, n - s), DIM),
                                                        dtype=np.float32))
        photo = near(x[src], rng.uniform(0.75, 0.90, queries), rng)
    hard = near(x[src], rng.uniform(0.50, 0.75, queries), rng)
    sets = {"photo": photo, "hard": hard}
    notes = {"generated_s": time.perf_counter() - t0}
    for name, q in sets.items():
        c = np.einsum("ij,ij->i", q, x[src])
        notes[name] = (f"cosine to the stored photo {c.min():.2f}-{c.max():.2f} "
                       f"(p50 {np.median(c):.2f})")
    return x, sets, notes


def calibration(seed: int) -> str:
    """The ``faces`` model's own figures on a roster of LFW's size (5,749 identities)."""
    faces = Faces(np.random.default_rng(seed))
    c = faces.centres(5749)
    s = c @ c.T
    np.fill_diagonal(s, -2)
    nearest = s.max(axis=1)
    a, b = faces.photos(c), faces.photos(c)
    angle = np.degrees(np.arccos(np.einsum("ij,ij->i", a, c)))
    genuine = np.einsum("ij,ij->i", a, b)
    iu = np.triu_indices(len(c), 1)
    return (f"faces model at 5,749 identities: nearest other identity cosine "
            f"{nearest.mean():.2f} (angle {np.degrees(np.arccos(nearest)).mean():.1f} deg); "
            f"photo to its centre {angle.mean():.1f} deg; two photos of one identity cosine "
            f"p1/p50 {np.percentile(genuine, 1):.2f}/{np.median(genuine):.2f}; identity pairs "
            f"mean {s[iu].mean():.3f}, p99 {np.percentile(s[iu], 99):.2f}")


# -- timing helpers ---------------------------------------------------------------------
def pct(ms: list[float], q: float) -> float:
    return float(np.percentile(ms, q)) if ms else float("nan")


def timed(f, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter_ns()
    out = f(*args, **kw)
    return (time.perf_counter_ns() - t0) / 1e6, out


def timed_cpu(f, *args, **kw) -> tuple[float, float, object]:
    """Wall ms, and CPU ms of this thread: what the call cost without the wait for a
    core that other processes hold (the code path runs entirely in this thread)."""
    c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
    out = f(*args, **kw)
    return (time.perf_counter_ns() - t0) / 1e6, (time.thread_time_ns() - c0) / 1e6, out


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


# -- part 1: one size -------------------------------------------------------------------
def bench_size(kind: str, n: int, args: argparse.Namespace) -> list[str]:
    out = [f"== {kind}, {n:,} identities (load {load()}) =="]
    x, sets, notes = make_data(kind, n, args.queries, args.seed + n)
    out.append(f"  data generated in {notes['generated_s']:.0f} s; queries: "
               + "; ".join(f"{k} {v}" for k, v in notes.items() if k in sets))
    idx = OwnerIndex()
    t0 = time.perf_counter()
    idx.reserve(n)
    for s in range(0, n, BATCH):
        idx.add_many(np.arange(s + 1, min(n, s + BATCH) + 1), x[s:s + BATCH])
    t_build = time.perf_counter() - t0
    del x
    depths = "/".join(map(str, args.rerank))
    path = "exact scan" if idx.exact else f"{CODE_BITS}-bit codes + exact re-rank of {depths}"
    out.append(f"  build (reserve + add_many x {BATCH:,}, codes included): {t_build:.1f} s; "
               f"search path at this size: {path}")
    out.append(f"  {'queries':<8}{'rerank':>7}{'n':>6}{'recall@1':>10}{'decision differs':>18}"
               f"{'p50 ms':>9}{'p99 ms':>9}{'cpu p50':>9}{'exact p50 ms':>14}  (exact sample)")
    for name, queries in sets.items():
        t0 = time.perf_counter()
        with faiss_threads(args.threads):
            ex_scores, ex_rows = faiss.knn(queries, idx._vectors[:n], 1,
                                           faiss.METRIC_INNER_PRODUCT)
        t_truth = time.perf_counter() - t0
        ex_top = idx._labels[ex_rows[:, 0]]
        for q in queries[:3]:
            idx.search(q, k=K)  # warm-up
        lat = {r: [] for r in args.rerank}
        cpu = {r: [] for r in args.rerank}
        same = dict.fromkeys(args.rerank, 0)
        differs = dict.fromkeys(args.rerank, 0)
        flat_lat = []
        for i, q in enumerate(queries):
            if i < args.exact_sample:  # the exact scan, interleaved, on the same index
                idx.index_type = "flat"
                flat_lat.append(timed(idx.search, q, k=K)[0])
                idx.index_type = "auto"
            for r in args.rerank:  # each depth on each query, interleaved
                idx.rerank = r
                ms, cpu_ms, hits = timed_cpu(idx.search, q, k=K)
                lat[r].append(ms)
                cpu[r].append(cpu_ms)
                same[r] += hits[0][0] == ex_top[i]
                differs[r] += DECIDE(hits[0][1]) != DECIDE(float(ex_scores[i, 0]))
        for j, r in enumerate(args.rerank):
            sample = "" if j else (f"  (n={len(flat_lat)}; codes p50 on those "
                                   f"{pct(lat[r][:len(flat_lat)], 50):.2f} ms; exact truth "
                                   f"{t_truth:.0f} s)")
            out.append(f"  {name:<8}{r:>7}{len(queries):>6}{same[r] / len(queries):>10.4f}"
                       f"{differs[r]:>18}{pct(lat[r], 50):>9.2f}{pct(lat[r], 99):>9.2f}"
                       f"{pct(cpu[r], 50):>9.2f}"
                       + (f"{pct(flat_lat, 50):>14.1f}" if not j else f"{'':>14}") + sample)
    idx.rerank = RERANK
    gone = np.random.default_rng(args.seed).choice(n, size=20, replace=False) + 1
    ms_present = []
    for i in gone:
        v = idx._vectors[np.flatnonzero(idx._labels[:len(idx)] == i)].copy()
        ms, removed = timed(idx.remove, int(i))
        ms_present.append(ms)
        assert removed == 1
        idx.add(int(i), v)
    ms_absent = [timed(idx.remove, n + 10 + j)[0] for j in range(20)]
    out.append(f"  remove: an enrolled identity p50 {pct(ms_present, 50):.2f} ms (scan of "
               f"{n:,} ids); an id never added {pct(ms_absent, 50):.3f} ms")
    return out


class faiss_threads:
    """Temporarily set faiss's OpenMP thread count (0: unchanged)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = faiss.omp_get_max_threads()
        if self.n:
            faiss.omp_set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        faiss.omp_set_num_threads(self.before)


# -- crossover --------------------------------------------------------------------------
def crossover(args: argparse.Namespace) -> list[str]:
    out = [f"== crossover: one query, k={K}, exact scan vs codes (load {load()}) ==",
           f"  {'vectors':>9}{'exact p50':>11}{'codes p50':>11}{'ratio':>8}"]
    rng = np.random.default_rng(args.seed)
    for n in (1000, 2000, 3000, 5000, 10_000, 20_000, 50_000, 100_000):
        x = unit(rng.standard_normal((n, DIM), dtype=np.float32))
        idx = OwnerIndex(flat_below=0)
        idx.add_many(np.arange(1, n + 1), x)
        qs = near(x[rng.choice(n, 300)], np.full(300, 0.8, dtype=np.float32), rng)
        ex, co = [], []
        for q in qs:  # interleaved, so load hits both alike
            idx.index_type = "flat"
            ex.append(timed(idx.search, q, k=K)[0])
            idx.index_type = "auto"
            co.append(timed(idx.search, q, k=K)[0])
        out.append(f"  {n:>9,}{pct(ex, 50):>11.3f}{pct(co, 50):>11.3f}"
                   f"{pct(ex, 50) / pct(co, 50):>8.2f}")
    out.append(f"  (ratio > 1: codes faster; FLAT_BELOW is {FLAT_BELOW:,})")
    return out


# -- memory -----------------------------------------------------------------------------
def rss_kb(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class PreviousFlat:
    """The flat index before binary codes: faiss IndexIDMap2 over IndexFlatIP, and a dict
    of vectors per identity (what ``OwnerIndex("flat")`` held until this change)."""

    def __init__(self) -> None:
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
        self.ids: dict[int, int] = {}

    def add_many(self, ids: np.ndarray, v: np.ndarray) -> None:
        self.index.add_with_ids(v, ids)
        for i, c in zip(*np.unique(ids, return_counts=True), strict=True):
            self.ids[int(i)] = self.ids.get(int(i), 0) + int(c)


def memory_child(kind: str, n: int) -> None:
    rng = np.random.default_rng(0)
    idx = PreviousFlat() if kind == "previous-flat" else OwnerIndex()
    if kind == "reserve":
        idx.reserve(n)
    base, t0 = rss_kb(), time.perf_counter()
    for s in range(0, n, BATCH):
        m = min(BATCH, n - s)
        idx.add_many(np.arange(s + 1, s + m + 1), unit(rng.standard_normal((m, DIM),
                                                                           dtype=np.float32)))
    print(rss_kb() - base, rss_kb("VmHWM") - base, time.perf_counter() - t0)


def memory(n: int) -> list[str]:
    out = [f"== resident memory to hold {n:,} vectors, one identity each, added in batches "
           f"of {BATCH:,} (fresh subprocess each; load {load()}) =="]
    floats = n * DIM * 4 / 2**20
    for kind, label in (("previous-flat", "previous flat (IndexIDMap2 + dict)"),
                        ("reserve", "OwnerIndex, reserve(n) first"),
                        ("grow", "OwnerIndex, growing by 1/4")):
        res = subprocess.run([sys.executable, __file__, "--memory-child", kind, str(n)],
                             capture_output=True, text=True, check=True).stdout.split()
        rss, peak, secs = int(res[0]) / 1024, int(res[1]) / 1024, float(res[2])
        out.append(f"  {label:<36} +{rss:8,.0f} MiB ({rss * 2**20 / n:,.0f} B/vector), "
                   f"peak +{peak:,.0f} MiB, {secs:.1f} s")
    out.append(f"  (the float32 vectors alone: {floats:,.0f} MiB = {DIM * 4} B/vector)")
    return out


# -- sweep ------------------------------------------------------------------------------
def sweep(kind: str, n: int, bits: list[int], args: argparse.Namespace) -> list[str]:
    """Recall@1 of code length x re-rank depth against exact search (re-ranking is exact,
    so a query is right exactly when exact search's top row is among its candidates)."""
    out = [f"== sweep: {kind}, {n:,} identities; recall@1 photo / hard by re-rank depth "
           f"(load {load()}) =="]
    x, sets, _ = make_data(kind, n, args.queries, args.seed + n)
    q = np.concatenate(list(sets.values()))
    with faiss_threads(args.threads):
        _, truth = faiss.knn(q, x, 1, faiss.METRIC_INNER_PRODUCT)
    depths = [50, 100, 200, 500, 1000, 2000, 4000]
    m = len(sets["photo"])
    out.append("  bits  " + "".join(f"{d:>16}" for d in depths))
    rows_of = [(f"{b:>4}", projection(b)) for b in bits]
    if args.gaussian:  # plain Gaussian directions, not orthogonalised: what projection() beats
        rows_of += [(f"{b:>4}g", np.random.default_rng(CODE_SEED).standard_normal(
            (DIM, b), dtype=np.float32)) for b in bits]
    for label, p in rows_of:
        b = p.shape[1]
        codes = np.empty((n, b // 8), dtype=np.uint8)
        for s in range(0, n, 100_000):
            codes[s:s + 100_000] = np.packbits(x[s:s + 100_000] @ p > 0, axis=1)
        with faiss_threads(args.threads):
            _, rows = faiss.knn_hamming(np.packbits(q @ p > 0, axis=1), codes, max(depths))
        cells = []
        for d in depths:
            hit = (rows[:, :d] == truth).any(axis=1)
            cells.append(f"{hit[:m].mean():.4f}/{hit[m:].mean():.4f}")
        out.append(f"  {label:<5} " + "".join(f"{c:>16}" for c in cells))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000",
                    help="roster sizes, comma-separated (0 or empty: none)")
    ap.add_argument("--data", default="faces,random", help="faces and/or random")
    ap.add_argument("--queries", type=int, default=1000,
                    help="re-enrollment queries per set (photo, hard); default 1000")
    ap.add_argument("--rerank", default=str(RERANK),
                    help=f"re-rank depths to compare, comma-separated (default {RERANK})")
    ap.add_argument("--exact-sample", type=int, default=40,
                    help="queries also run through the exact scan, interleaved (default 40)")
    ap.add_argument("--crossover", action="store_true", help="exact scan vs codes, 1k-100k")
    ap.add_argument("--memory", type=int, default=0, metavar="N",
                    help="resident memory of N vectors: previous flat index vs OwnerIndex")
    ap.add_argument("--sweep", default="", metavar="BITS",
                    help="recall by code length (comma-separated bits) and re-rank depth, "
                         "on --data and --sizes instead of the main measurement")
    ap.add_argument("--gaussian", action="store_true",
                    help="--sweep also with plain Gaussian directions (rows marked g)")
    ap.add_argument("--threads", type=int, default=0,
                    help="faiss threads for the exact ground truth (default: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--memory-child", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        return memory_child(args.memory_child[0], int(args.memory_child[1]))
    sizes = [int(s) for s in args.sizes.split(",") if s.strip() and int(s) > 0]
    args.rerank = [int(s) for s in args.rerank.split(",") if s.strip()]
    kinds = [s.strip() for s in args.data.split(",") if s.strip()]
    if not set(kinds) <= {"faces", "random"}:
        ap.error("--data takes faces and/or random")

    print(f"bench_dedupe  {dt.datetime.now():%Y-%m-%d %H:%M}  python "
          f"{platform.python_version()}  faiss {faiss.__version__}  {os.cpu_count()} CPUs, "
          f"load average {load()}; CODE_BITS {CODE_BITS}, RERANK {RERANK}, FLAT_BELOW "
          f"{FLAT_BELOW:,}; thresholds review {SETTINGS.dedupe_review}, block "
          f"{SETTINGS.dedupe_block}", flush=True)
    t_all = time.perf_counter()
    if "faces" in kinds and sizes:
        print(calibration(args.seed), flush=True)
    for kind in kinds:
        for n in sizes:
            lines = sweep(kind, n, [int(b) for b in args.sweep.split(",")], args) \
                if args.sweep else bench_size(kind, n, args)
            print("\n".join(lines), flush=True)
    if args.crossover:
        print("\n".join(crossover(args)), flush=True)
    if args.memory:
        print("\n".join(memory(args.memory)), flush=True)
    print(f"total {time.perf_counter() - t_all:.0f} s, load average now {load()}")


if __name__ == "__main__":
    sys.exit(main())
