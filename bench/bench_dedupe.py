"""Dedupe search: exact flat index against IVF, and rebuilding the index from the store.

What it measures
    1. For rosters of 10k, 100k and 1M identities (one L2-normalised 512-d
       vector each, with cluster structure: ``--clusters`` centres, identities of
       one centre at cosine ~0.2 of each other, as unrelated faces are):

       * build time: exact ``OwnerIndex("flat")`` (add), and IVF as
         ``OwnerIndex.optimise()`` makes it (nlist = 4 sqrt(n), IndexFlatIP
         quantiser, training sample min(32 x nlist, 100k), faiss k-means 10
         iterations, nprobe 32), split into train and add;
       * single-query latency p50/p99 through ``OwnerIndex.search(q, k=5)``
         (the product path: normalise, faiss search of depth 80, per-identity
         best score), flat and IVF, with faiss's default thread count (what
         the product does) and with one thread;
       * batched throughput (queries/s) of the underlying faiss index, 1000
         independent queries in one call, depth 80;
       * quality of IVF against exact, on the dedupe query set: half noisy
         re-enrollments of stored identities (the stored vector plus noise,
         cosine 0.75-0.9 to it) and half new people (fresh vectors from the same
         distribution). recall@1 = IVF's best identity equals exact's; "missed
         dup" = re-enrollments that exact search flags (score >= review
         threshold 0.50) but IVF does not. An nprobe sweep shows the tradeoff.
    2. Rebuilding the index from the encrypted store (``Vault.rebuild_index``,
       the product path: read rows, unwrap each identity's data key, open and
       decode each ``face`` artifact, index) for ``--rebuild-n`` identities
       (default 100k) of one owner, one photo each. The fixture is written with
       bulk inserts but is what the product stores, byte for byte in format:
       identities, consent records, a hash-chained audit event per identity
       creation and artifact write, data keys wrapped by ``KeyStore._wrap`` with
       the key store's own context, and artifacts sealed by ``vault.crypto.seal``
       with ``Vault._context``. A few artifacts are then read back through
       ``Vault.get_artifact`` to prove it. After the rebuild the bench checks the
       index holds every identity and that noisy queries find their source
       through ``Vault.search_faces``.

How to run
    .venv/bin/python bench/bench_dedupe.py                        # all (~6-9 min)
    .venv/bin/python bench/bench_dedupe.py --sizes 10000,100000 --rebuild-n 20000
    .venv/bin/python bench/bench_dedupe.py --sizes 10000 --rebuild-n 0   # quick look
    .venv/bin/python bench/bench_dedupe.py --sizes 0 --rebuild-n 100000 --profile-rebuild

    Vault files live in a temporary directory (or under ``--data-dir``),
    removed at the end unless ``--keep``. 1M vectors take ~2 GB per copy; the
    1M case peaks at ~7 GB. Nothing is asserted about time: it prints figures.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import io
import json
import math
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from sqlalchemy import insert, select, update

from vault import audit, codec, crypto
from vault.config import Settings
from vault.dedupe_index import DIM, OwnerIndex
from vault.keystore import _dek_context
from vault.keystore_models import DataKey
from vault.models import Artifact, AuditEvent, AuditHead, Consent, Identity, Owner, utcnow
from vault.vault import Vault

DEPTH_K = 5  # OwnerIndex.search(k=5) asks faiss for depth min(n, 4k*4) = 80
DEPTH = 4 * DEPTH_K * 4
REVIEW, BLOCK = Settings().dedupe_review, Settings().dedupe_block
OWNER = "bench"
ACTOR = "bench"


# -- data -----------------------------------------------------------------------------
def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


class People:
    """Synthetic identities: a cluster centre plus an individual part, normalised.

    cos(two people of one centre) ~ alpha^2 / (1 + alpha^2) (0.2 at alpha 0.5);
    across centres ~0 +- 0.04: the spread of unrelated ArcFace faces.
    """

    def __init__(self, seed: int, clusters: int, alpha: float = 0.5) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = unit(self.rng.standard_normal((max(clusters, 1), DIM), dtype=np.float32))
        self.alpha = alpha if clusters > 0 else 0.0  # 0 clusters: isotropic

    def draw(self, n: int, chunk: int = 100_000) -> np.ndarray:
        out = np.empty((n, DIM), dtype=np.float32)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            k = self.rng.integers(len(self.centres), size=m)
            g = self.rng.standard_normal((m, DIM), dtype=np.float32) / np.float32(math.sqrt(DIM))
            v = self.alpha * self.centres[k] + g
            out[s:s + m] = v / np.linalg.norm(v, axis=1, keepdims=True)
        return out

    def reenroll(self, sources: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
        """A new photo of each source: cosine to it uniform in [lo, hi]."""
        c = self.rng.uniform(lo, hi, size=len(sources))
        noise = unit(self.rng.standard_normal(sources.shape, dtype=np.float32))
        noise -= (noise * sources).sum(1, keepdims=True) * sources  # orthogonal part
        noise = unit(noise)
        s = np.sqrt(1.0 / c**2 - 1.0)[:, None]
        q = unit(sources + s * noise)
        return q, (q * sources).sum(1)


# -- timing helpers -------------------------------------------------------------------
def pct(ns: list[float], q: float) -> float:
    s = sorted(ns)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s))) - 1))]


def single_latency(idx: OwnerIndex, queries: np.ndarray, n: int, budget_s: float,
                   minimum: int = 30) -> list[float]:
    """ms per OwnerIndex.search call, one query each; stops early past budget_s."""
    for q in queries[:3]:
        idx.search(q[None], k=DEPTH_K)  # warm-up
    out: list[float] = []
    t_start = time.perf_counter()
    for q in queries[:n]:
        t0 = time.perf_counter_ns()
        idx.search(q[None], k=DEPTH_K)
        out.append((time.perf_counter_ns() - t0) / 1e6)
        if len(out) >= minimum and time.perf_counter() - t_start > budget_s:
            break
    return out


class faiss_threads:
    """Temporarily set faiss's OpenMP thread count (process-wide)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self) -> None:
        self.before = faiss.omp_get_max_threads()
        if self.n:
            faiss.omp_set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        faiss.omp_set_num_threads(self.before)


def batched(index: faiss.Index, queries: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    index.search(queries[:8], DEPTH)  # warm-up
    t0 = time.perf_counter()
    scores, labels = index.search(queries, DEPTH)
    return time.perf_counter() - t0, scores, labels


# -- IVF as OwnerIndex.optimise() builds it ----------------------------------------------
def build_ivf(vectors: np.ndarray, ids: np.ndarray, per_list: int, niter: int,
              cap: int = 100_000) -> tuple[OwnerIndex, int, int, float, float]:
    """The steps of OwnerIndex.optimise(), with the training budget as parameters.

    With per_list=32, niter=10 and cap=100k this is exactly what optimise()
    does (the bench checks that on the smallest size). Returns the OwnerIndex,
    nlist, the sample size and the train and add times.
    """
    nlist = int(4 * np.sqrt(len(vectors)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter = niter
    rng = np.random.default_rng(0)
    sample = vectors[rng.choice(len(vectors), min(len(vectors), per_list * nlist, cap),
                                replace=False)]
    t0 = time.perf_counter()
    ivf.train(sample)
    t_train = time.perf_counter() - t0
    ivf.nprobe = 32
    index = faiss.IndexIDMap2(ivf)
    t0 = time.perf_counter()
    index.add_with_ids(vectors, ids)
    t_add = time.perf_counter() - t0
    idx = OwnerIndex("ivf")
    idx._index = index
    idx._ids = dict.fromkeys(ids.tolist(), 1)
    return idx, nlist, len(sample), t_train, t_add


def set_nprobe(idx: OwnerIndex, nprobe: int) -> None:
    faiss.extract_index_ivf(idx._index).nprobe = nprobe


def check_mirror(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> bool:
    """build_ivf(32, 10) gives the same results as the product's optimise()."""
    prod = OwnerIndex("ivf")
    prod.add_many(ids, vectors)
    prod.optimise()
    mine = build_ivf(vectors, ids, 32, 10)[0]
    a = prod._index.search(queries, 10)
    b = mine._index.search(queries, 10)
    return bool(np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0]))


# -- part 1: search -----------------------------------------------------------------------
@dataclass
class SizeResult:
    n: int
    rows: list[tuple]
    notes: list[str]


def quality(flat_scores: np.ndarray, flat_labels: np.ndarray, scores: np.ndarray,
            labels: np.ndarray, n_re: int) -> dict[str, float]:
    top_f, top_i = flat_labels[:, 0], labels[:, 0]
    same = top_f == top_i
    flagged_f = flat_scores[:n_re, 0] >= REVIEW
    flagged_i = scores[:n_re, 0] >= REVIEW
    return {"recall": float(same.mean()), "recall_re": float(same[:n_re].mean()),
            "recall_new": float(same[n_re:].mean()),
            "missed": int((flagged_f & ~flagged_i).sum()), "flagged": int(flagged_f.sum())}


def bench_size(n: int, args: argparse.Namespace) -> SizeResult:
    notes: list[str] = []
    people = People(args.seed + n, args.clusters)
    t0 = time.perf_counter()
    x = people.draw(n)
    ids = np.arange(1, n + 1, dtype=np.int64)
    n_re = args.queries // 2
    src = people.rng.choice(n, size=n_re, replace=False)
    q_re, cos_re = people.reenroll(x[src], *args.reenroll_cos)
    q_new = people.draw(args.queries - n_re)
    queries = np.ascontiguousarray(np.concatenate([q_re, q_new]))
    # single-query order: alternate re-enrollment / new person
    order = np.ravel(np.column_stack([np.arange(n_re), n_re + np.arange(n_re)]))[:args.single]
    singles = queries[order]
    notes.append(f"data: {n} identities, {args.clusters} clusters, generated in "
                 f"{time.perf_counter() - t0:.1f} s; {n_re} re-enrollment queries (cosine to "
                 f"source {cos_re.min():.2f}-{cos_re.max():.2f}, mean {cos_re.mean():.2f}) + "
                 f"{len(q_new)} new people")

    # exact
    flat = OwnerIndex("flat")
    t0 = time.perf_counter()
    flat.add_many(ids, x)
    t_flat = time.perf_counter() - t0
    flat_single = single_latency(flat, singles, args.single, args.single_budget)
    with faiss_threads(1):
        flat_single1 = single_latency(flat, singles, args.single, args.single_budget)
    t_fb, fs, fl = batched(flat._index, queries)
    found_src = float((fl[:n_re, 0] == ids[src]).mean())
    new_best = fs[n_re:, 0]
    notes.append(f"exact: re-enrollments whose source is the top hit {found_src:.1%}; new "
                 f"people's best score p50 {np.median(new_best):.2f}, max {new_best.max():.2f} "
                 f"(review threshold {REVIEW}, block {BLOCK})")
    rows = [("flat (exact)", "-", f"{t_flat:.1f}", f"{pct(flat_single, 50):.2f}",
             f"{pct(flat_single, 99):.2f}", f"{pct(flat_single1, 50):.2f}",
             f"{pct(flat_single1, 99):.2f}", len(flat_single), f"{len(queries) / t_fb:,.0f}",
             "1.000", "1.000", "1.000", f"0/{int((fs[:n_re, 0] >= REVIEW).sum())}")]

    # IVF
    if args.check_mirror and n == min(args.sizes):
        ok = check_mirror(x, ids, queries[:200])
        notes.append(f"bench IVF build == OwnerIndex.optimise() on the same data: {ok}")
    per_list, niter = args.train_per_list, args.niter
    ivf, nlist, sample, t_train, t_add = build_ivf(x, ids, per_list, niter)
    notes.append(f"IVF nlist={nlist}, trained on {sample} vectors ({per_list}/list, at most "
                 f"100k) x {niter} k-means iterations in {t_train:.1f} s, add {t_add:.1f} s")
    del x
    for nprobe in args.nprobes:
        set_nprobe(ivf, nprobe)
        t_b, s_, l_ = batched(ivf._index, queries)
        qual = quality(fs, fl, s_, l_, n_re)
        m = args.single if nprobe == 32 else min(args.single, 50)
        single = single_latency(ivf, singles, m, args.single_budget)
        with faiss_threads(1):
            single1 = single_latency(ivf, singles, m, args.single_budget)
        rows.append((f"ivf nprobe={nprobe}" + (" (product)" if nprobe == 32 else ""),
                     f"{t_train:.1f}" if nprobe == args.nprobes[0] else "",
                     f"{t_add:.1f}" if nprobe == args.nprobes[0] else "",
                     f"{pct(single, 50):.2f}", f"{pct(single, 99):.2f}",
                     f"{pct(single1, 50):.2f}", f"{pct(single1, 99):.2f}", len(single),
                     f"{len(queries) / t_b:,.0f}", f"{qual['recall']:.3f}",
                     f"{qual['recall_re']:.3f}", f"{qual['recall_new']:.3f}",
                     f"{qual['missed']}/{qual['flagged']}"))
    set_nprobe(ivf, 32)
    del flat, ivf
    return SizeResult(n, rows, notes)


def print_size(r: SizeResult) -> None:
    print(f"\n== {r.n:,} identities ==")
    for note in r.notes:
        print(f"  {note}")
    head = ("index", "train s", "add s", "1q p50", "1q p99", "1thr p50", "1thr p99", "(n)",
            "batch q/s", "recall@1", "R@1 re-enr", "R@1 new", "missed dup")
    widths = (-22, 8, 7, 8, 8, 9, 9, 5, 11, 9, 11, 8, 11)
    for row in (head, *r.rows):
        print("  " + "".join(f"{str(c):<{-w}}" if w < 0 else f"{str(c):>{w}}"
                             for c, w in zip(row, widths, strict=True)))


# -- part 2: rebuild from the encrypted store ----------------------------------------------
def consent_fields(name: str) -> dict:
    return {"subject": f"Bench Person {name}", "given_by": "self", "guardian_name": None,
            "purposes": ["enroll", "generate"],
            "retain_until": dt.date.today() + dt.timedelta(days=365),
            "evidence_sha256": hashlib.sha256(name.encode()).hexdigest()}


def build_fixture(vault: Vault, n: int, vectors: np.ndarray, rng: np.random.Generator,
                  chunk: int = 5000) -> dict[str, float]:
    """n identities of OWNER, one face photo each, as the product would store them."""
    vault.add_owner(OWNER, "studio", actor=ACTOR)
    with vault.session() as s:
        owner_id = s.scalar(select(Owner.id).where(Owner.name == OWNER))
        first_id = (s.scalar(select(Identity.id).order_by(Identity.id.desc()).limit(1)) or 0) + 1
        head = s.get(AuditHead, 1)
        seq, prev = head.seq, head.hash
    version = vault.keys.active_version()
    model_id = "bench-arcface-synthetic"
    t_crypto = t_db = 0.0
    shapes = None
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        t0 = time.perf_counter()
        raw = vectors[start:stop] * rng.uniform(18, 24, size=(stop - start, 1)).astype(np.float32)
        normed = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        keys, idents, consents, arts, events = [], [], [], [], []
        for j, i in enumerate(range(start, stop)):
            iid, name, uid, now = first_id + i, f"p{i:07d}", str(uuid.uuid4()), utcnow()
            payload = codec.encode("face", {"embeddings": raw[j:j + 1], "normed": normed[j:j + 1],
                                            "mean": normed[j]}, {"model_id": model_id})
            if shapes is None:
                shapes = codec.decode(payload, kind="face").shapes
            key_id, dek = uuid.uuid4(), crypto.new_key()
            keys.append({"key_id": str(key_id), "identity_uid": uid, "kek_version": version,
                         "wrapped": vault.keys._wrap(dek, version, _dek_context(uid, key_id)),
                         "created_at": now})
            art_id = str(uuid.uuid4())
            ctx = vault._context(OWNER, uid, art_id, "face", model_id)
            sealed = crypto.seal(dek, payload, key_id=key_id, key_version=1, context=ctx)
            digest = hashlib.sha256(payload).hexdigest()
            idents.append({"id": iid, "uid": uid, "owner_id": owner_id, "name": name,
                           "status": "active", "created_at": now, "updated_at": now})
            consent_uid = str(uuid.uuid4())
            c = consent_fields(name)
            consents.append({"uid": consent_uid, "identity_id": iid, "given_at": now, **c})
            arts.append({"id": art_id, "identity_id": iid, "kind": "face", "schema_version": 1,
                         "model_id": model_id, "size": len(payload), "sha256": digest,
                         "shapes": shapes, "ciphertext": sealed, "created_at": now})
            handle = f"{OWNER}/{name}"
            for action, details in (
                ("identity.create", {"identity": uid, "consent": consent_uid, "given_by": "self",
                                     "purposes": c["purposes"],
                                     "retain_until": c["retain_until"].isoformat()}),
                ("artifact.write", {"artifact": art_id, "kind": "face", "model_id": model_id,
                                    "sha256": digest, "replaced": None}),
            ):
                details = json.loads(json.dumps(details, sort_keys=True))
                seq += 1
                digest_ev = audit.event_hash(seq, now, action, ACTOR, OWNER, handle, details, prev)
                events.append({"seq": seq, "at": now, "action": action, "actor": ACTOR,
                               "owner": OWNER, "subject": handle, "details": details,
                               "prev_hash": prev, "hash": digest_ev})
                prev = digest_ev
        t1 = time.perf_counter()
        # the product's order: the data key is committed before the sealed artifact
        with vault.keystore_engine.begin() as conn:
            conn.execute(insert(DataKey.__table__), keys)
        with vault.engine.begin() as conn:
            conn.execute(insert(Identity.__table__), idents)
            conn.execute(insert(Consent.__table__), consents)
            conn.execute(insert(Artifact.__table__), arts)
            conn.execute(insert(AuditEvent.__table__), events)
            conn.execute(update(AuditHead.__table__).where(AuditHead.id == 1)
                         .values(seq=seq, hash=prev))
        t_crypto += t1 - t0
        t_db += time.perf_counter() - t1
    return {"encode+seal": t_crypto, "insert": t_db}


class RssPeak:
    """Peak growth of this process's resident memory while the block runs (sampled)."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s, self.peak_growth = every_s, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_growth = max(self.peak_growth, self.rss() - self.base)

    def __enter__(self) -> RssPeak:
        self.base = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_growth = max(self.peak_growth, self.rss() - self.base)


def bench_rebuild(args: argparse.Namespace, root: Path) -> list[str]:
    n = args.rebuild_n
    lines = []
    settings = Settings(data_dir=root / "rebuild")
    people = People(args.seed + 7, args.clusters)
    x = people.draw(n)
    t0 = time.perf_counter()
    vault = Vault.init(settings, actor=ACTOR)
    parts = build_fixture(vault, n, x, people.rng)
    t_fix = time.perf_counter() - t0
    size = sum((settings.data_dir / f).stat().st_size for f in ("vault.db", "keystore.db"))
    lines.append(f"fixture: {n:,} identities x 1 face photo written in {t_fix:.1f} s "
                 f"(encode+wrap+seal {parts['encode+seal']:.1f} s, bulk insert "
                 f"{parts['insert']:.1f} s); vault.db + keystore.db {size / 1e6:.0f} MB")
    # the fixture is what the product reads: open a few through the product path
    pick = people.rng.choice(n, size=min(5, n), replace=False)
    for i in pick:
        got = vault.get_artifact(f"{OWNER}/p{i:07d}", "face", purpose="generate", actor=ACTOR)
        if not np.allclose(got.artifact.tensors["normed"][0], x[i], atol=1e-6):
            raise AssertionError(f"fixture identity {i} does not read back")
    lines.append(f"fixture check: {len(pick)} artifacts opened by Vault.get_artifact and match")
    if args.verify_audit:
        t0 = time.perf_counter()
        res = vault.verify_audit()
        lines.append(f"fixture check: audit chain of {res.events:,} events ok={res.ok} "
                     f"({time.perf_counter() - t0:.1f} s)")
        if not res.ok:
            raise AssertionError(res.reason)
    vault.dispose()

    # the measured operation: a fresh process-like Vault (empty caches) rebuilds its index
    src = people.rng.choice(n, size=min(20, n), replace=False)
    q, cos = people.reenroll(x[src], *args.reenroll_cos)
    for index_type in args.rebuild_index:
        vault = Vault.open(settings.with_(dedupe_index=index_type))
        with RssPeak() as rss:
            t0 = time.perf_counter()
            res = vault.rebuild_index()
            t_rebuild = time.perf_counter() - t0
        lines.append(f"Vault.rebuild_index() with dedupe_index={index_type}: {t_rebuild:.1f} s = "
                     f"{n / t_rebuild:,.0f} identities/s ({res['vectors']:,} vectors, "
                     f"{res['identities']:,} identities); process memory grew by up to "
                     f"{rss.peak_growth / 1e6:,.0f} MB during it (the vectors alone: "
                     f"{n * DIM * 4 / 1e6:,.0f} MB)")
        if res["identities"] != n or res["vectors"] != n:
            raise AssertionError(f"rebuilt index holds {res}, expected {n} identities")
        lat, hits = [], 0
        for i, qi in zip(src, q, strict=True):
            t1 = time.perf_counter_ns()
            top = vault.search_faces(OWNER, qi[None], k=1)
            lat.append((time.perf_counter_ns() - t1) / 1e6)
            hits += bool(top) and top[0]["handle"] == f"{OWNER}/p{i:07d}"
        lines.append(f"  then {hits}/{len(src)} noisy re-enrollments (cosine "
                     f"{cos.min():.2f}-{cos.max():.2f}) find their source first via "
                     f"Vault.search_faces (p50 {statistics.median(lat):.1f} ms per call)")
        vault.dispose()
        if hits != len(src):
            raise AssertionError("a query did not find its source after the rebuild")
    if args.profile_rebuild:
        vault = Vault.open(settings)
        prof = cProfile.Profile()
        prof.enable()
        vault.rebuild_index()
        prof.disable()
        for sort, restrict, title in (("tottime", (14,), "top by own time"),
                                      ("cumulative", (r"/vault/", 12),
                                       "vault/ functions by cumulative time")):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats(sort).print_stats(*restrict)
            out = buf.getvalue().splitlines()
            start = next(i for i, ln in enumerate(out) if "ncalls" in ln)
            lines.append(f"cProfile of a second rebuild, {title}:")
            lines += ["    " + ln.replace(str(Path.cwd()) + "/", "")[:150]
                      for ln in out[start:start + 15] if ln.strip()]
        vault.dispose()
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000",
                    help="roster sizes (comma-separated; 0 or empty skips part 1)")
    ap.add_argument("--queries", type=int, default=1000,
                    help="query set: half re-enrollments, half new people (default 1000)")
    ap.add_argument("--single", type=int, default=200,
                    help="single-query latency samples per index (default 200)")
    ap.add_argument("--single-budget", type=float, default=15.0,
                    help="stop single-query sampling after this many seconds (min 30 "
                         "samples; default 15)")
    ap.add_argument("--nprobes", default="8,16,32,64,128", help="IVF nprobe values to sweep")
    ap.add_argument("--clusters", type=int, default=1000,
                    help="cluster centres (1000; 0 = isotropic vectors, no structure)")
    ap.add_argument("--reenroll-cos", default="0.75,0.9",
                    help="cosine range of a re-enrollment to its source (0.75,0.9)")
    ap.add_argument("--train-per-list", type=int, default=32,
                    help="IVF training points per list (product: 32, at most 100k in all)")
    ap.add_argument("--niter", type=int, default=10, help="k-means iterations (product: 10)")
    ap.add_argument("--no-check-mirror", dest="check_mirror", action="store_false",
                    help="skip checking the bench's IVF build against OwnerIndex.optimise()")
    ap.add_argument("--rebuild-n", type=int, default=100_000,
                    help="identities in the rebuild fixture (0 skips part 2; default 100000)")
    ap.add_argument("--rebuild-index", default="flat",
                    help="index types to rebuild, comma-separated: flat (the product default) "
                         "and/or ivf (adds OwnerIndex.optimise(); ~1 min at 100k)")
    ap.add_argument("--verify-audit", action="store_true",
                    help="also verify the fixture's audit chain (slow at 100k)")
    ap.add_argument("--profile-rebuild", action="store_true",
                    help="profile a second rebuild and print where the time goes")
    ap.add_argument("--threads", type=int, default=0, help="faiss threads (default: all)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="parent folder for the temporary vault (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary vault folder")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip() and int(s) > 0]
    args.nprobes = [int(s) for s in args.nprobes.split(",") if s.strip()]
    if 32 not in args.nprobes:
        args.nprobes.append(32)
    args.rebuild_index = [s.strip() for s in args.rebuild_index.split(",") if s.strip()]
    if not set(args.rebuild_index) <= {"flat", "ivf"}:
        ap.error("--rebuild-index takes flat and/or ivf")
    args.reenroll_cos = tuple(float(s) for s in args.reenroll_cos.split(","))
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    print(f"bench_dedupe  {dt.datetime.now():%Y-%m-%d %H:%M}  python "
          f"{platform.python_version()}  faiss {faiss.__version__}  {os.cpu_count()} CPUs, "
          f"faiss threads {faiss.omp_get_max_threads()}, blas threshold "
          f"{faiss.cvar.distance_compute_blas_threshold}, load average "
          f"{os.getloadavg()[0]:.1f} (a shared machine: other work inflates latencies)")
    t_all = time.perf_counter()
    for n in args.sizes:
        t0 = time.perf_counter()
        r = bench_size(n, args)
        print_size(r)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\n  1q = ms per OwnerIndex.search(one query, k=5) with faiss's default threads "
          "(what the\n  product does); 1thr = the same with faiss.omp_set_num_threads(1); "
          "batch = faiss search\n  of all queries in one call (default threads); "
          "recall@1 = same best identity as exact search;\n  missed dup = re-enrollments "
          "exact search flags (score >= review) that IVF does not / all\n  that exact "
          "search flags.")
    if args.rebuild_n:
        if args.data_dir:
            args.data_dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="idvault-bench-dedupe-", dir=args.data_dir))
        print(f"\n== rebuild the index from the encrypted store ({args.rebuild_n:,} "
              f"identities, SQLite in {root}) ==", flush=True)
        try:
            for line in bench_rebuild(args, root):
                print(f"  {line}", flush=True)
        finally:
            if args.keep:
                print(f"  kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s, load average now "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    sys.exit(main())
