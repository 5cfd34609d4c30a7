"""Rebuilding the dedupe index from the encrypted store: one process against worker processes.

What it measures
    ``Vault.rebuild_index`` (the product path: plan the owner's ranges, read each range's
    rows and data keys, unwrap the keys, open every ``face`` artifact, validate them,
    add the ``normed`` rows to a fresh index, swap it in) for one owner holding
    ``--sizes`` identities, one face photo each, on SQLite and on PostgreSQL:

    * wall time and identities/s with ``workers=1`` (everything in the calling process,
      the baseline) and with ``--workers`` processes (default one per core), alternated
      ``--repeats`` times in the same run, and the CPU time (user + system) spent in the
      calling process and in its workers: on a shared machine the CPU time is the steadier
      figure;
    * peak memory: each rebuild runs in a fresh child process; its peak resident size
      during the rebuild (VmHWM, reset just before) less its size before, and the
      largest worker's peak (``getrusage(RUSAGE_CHILDREN)``). The vectors alone take
      n x 2 KiB;
    * that both give the same index: the same vector count, and the same top-5
      identities and scores for 50 stored vectors searched through the index;
    * with ``--stages``: the cost per identity of each step, the old way (the calls the
      rebuild made before: ``encode_context`` per row, ``codec.decode`` per artifact)
      and the new one, on ``--stage-n`` identities of the store, in this process.

    The store is written with bulk inserts, not timed, and is what the product stores,
    byte for byte in format: identities, consent records, data keys wrapped by
    ``KeyStore._wrap`` with the key store's own context, and face artifacts made by
    ``codec.encode`` and sealed by ``vault.crypto.seal`` under each identity's data key
    with ``Vault._context``; a few are read back through ``Vault.get_artifact``. (The
    audit events of those writes are left out: a rebuild does not read them.) Stores are
    kept under ``.bench/rebuild/`` (SQLite files; PostgreSQL databases named
    ``idvault_bench_rebuild_<n>_data`` and ``_keys``) and reused by later runs;
    ``--fresh`` writes them again, ``--drop`` removes them. 100k identities take ~0.7 GB
    per backend and ~1-2 min to write; 1M take ~7 GB and ~15 min.

How to run
    .venv/bin/python bench/bench_rebuild.py                          # 100k, SQLite + PG
    .venv/bin/python bench/bench_rebuild.py --sizes 100000,1000000   # the full figure
    .venv/bin/python bench/bench_rebuild.py --backends sqlite --stages
    .venv/bin/python bench/bench_rebuild.py --drop                   # free the disk

    Nothing is asserted about time: it prints figures. The machine's other work
    inflates them; compare the two columns of one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from sqlalchemy import func, insert, select  # noqa: E402

from vault import codec, crypto, record_seal  # noqa: E402
from vault.config import Settings  # noqa: E402
from vault.db import READ_ONLY  # noqa: E402
from vault.keystore import _dek_context  # noqa: E402
from vault.keystore_models import DataKey  # noqa: E402
from vault.models import Artifact, Consent, Identity, Owner, utcnow  # noqa: E402
from vault.vault import Vault  # noqa: E402

OWNER = "bench"
MODEL_ID = "bench-arcface-synthetic"
CACHE = ROOT / ".bench" / "rebuild"
PG_ADMIN = os.environ.get("IDVAULT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
FORMAT = 2  # of the cached stores; bump when the fixture changes (2: record seals)
CHUNK = 5000


# -- the store ------------------------------------------------------------------------------
def vectors(seed: int, chunk: int, n: int) -> np.ndarray:
    """The unit vectors of identities chunk*CHUNK ... (reproducible per chunk)."""
    v = np.random.default_rng([seed, chunk]).standard_normal((n, 512), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def populate(settings: Settings, n: int, seed: int) -> float:
    t0 = time.perf_counter()
    vault = Vault.init(settings, actor="bench")
    vault.add_owner(OWNER, "studio", actor="bench")
    with vault.session() as s:
        owner_id = s.scalar(select(Owner.id).where(Owner.name == OWNER))
    version = vault.keys.active_version()
    record_key = vault.keys.record_key()
    shapes = {"embeddings": [1, 512], "mean": [512], "normed": [1, 512]}
    retain = dt.date.today() + dt.timedelta(days=3650)
    for c, start in enumerate(range(0, n, CHUNK)):
        stop = min(n, start + CHUNK)
        normed = vectors(seed, c, stop - start)
        keys, idents, consents, arts = [], [], [], []
        now = utcnow()
        for j in range(stop - start):
            iid, uid, name = start + j + 1, str(uuid.uuid4()), f"p{start + j:07d}"
            payload = codec.encode("face", {"embeddings": normed[j:j + 1] * 20.0,
                                            "normed": normed[j:j + 1], "mean": normed[j]},
                                   {"model_id": MODEL_ID})
            key_id, dek = uuid.uuid4(), crypto.new_key()
            keys.append({"key_id": str(key_id), "identity_uid": uid, "kek_version": version,
                         "wrapped": vault.keys._wrap(dek, version, _dek_context(uid, key_id)),
                         "created_at": now})
            art_id = str(uuid.uuid4())
            sealed = crypto.seal(dek, payload, key_id=key_id, key_version=1,
                                 context=vault._context(OWNER, uid, art_id, "face", MODEL_ID))
            consent = {"uid": str(uuid.uuid4()), "given_at": now,
                       "subject": f"Bench Person {name}", "given_by": "self",
                       "guardian_name": None, "purposes": ["enroll", "generate"],
                       "retain_until": retain,
                       "evidence_sha256": hashlib.sha256(name.encode()).hexdigest()}
            record = record_seal.make_record(
                vault.vault_id, identity_uid=uid, owner=OWNER, owner_kind="studio",
                erase_policy="immediate", name=name, status="active",
                consents=[record_seal.consent_entry(**consent)])
            idents.append({"id": iid, "uid": uid, "owner_id": owner_id, "name": name,
                           "status": "active", "created_at": now, "updated_at": now,
                           "seal": record_seal.seal_record(record_key, vault.vault_id, record)})
            consents.append({**consent, "identity_id": iid})
            arts.append({"id": art_id, "identity_id": iid, "kind": "face", "schema_version": 1,
                         "model_id": MODEL_ID, "size": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest(), "shapes": shapes,
                         "ciphertext": sealed, "created_at": now})
        # the product's order: the data key is committed before the sealed artifact
        with vault.keystore_engine.begin() as conn:
            conn.execute(insert(DataKey.__table__), keys)
        with vault.engine.begin() as conn:
            conn.execute(insert(Identity.__table__), idents)
            conn.execute(insert(Consent.__table__), consents)
            conn.execute(insert(Artifact.__table__), arts)
        if c % 20 == 19:
            print(f"    {stop:,} / {n:,} written ({time.perf_counter() - t0:.0f} s)", flush=True)
    for i in np.random.default_rng(seed).choice(n, size=min(3, n), replace=False):
        got = vault.get_artifact(f"{OWNER}/p{i:07d}", "face", purpose="generate", actor="bench")
        want = vectors(seed, i // CHUNK, min(CHUNK, n - i // CHUNK * CHUNK))[i % CHUNK]
        if not np.array_equal(got.artifact.tensors["normed"][0], want):
            raise AssertionError(f"identity {i} does not read back")
    vault.dispose()
    return time.perf_counter() - t0


def store(backend: str, n: int, seed: int, fresh: bool) -> Settings:
    """The cached store of ``n`` identities on ``backend``, written first if needed."""
    folder = CACHE / f"{backend}-{n}"
    manifest = folder / "manifest.json"
    names = [f"idvault_bench_rebuild_{n}_{part}" for part in ("data", "keys")]
    if backend == "sqlite":
        settings = Settings(data_dir=folder)
    else:
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        settings = Settings(data_dir=folder, database_url=f"{base}/{names[0]}",
                            keystore_url=f"{base}/{names[1]}")
    want = {"format": FORMAT, "n": n, "seed": seed}
    if not fresh and manifest.exists() and json.loads(manifest.read_text()) == want:
        with Vault.open(settings) as v, v.session() as s:
            if s.scalar(select(func.count()).select_from(Identity)) == n:
                print(f"  {backend}: reusing the store of {n:,} identities in {folder}")
                return settings
    drop(backend, n)
    folder.mkdir(parents=True, exist_ok=True)
    if backend == "postgres":
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            for name in names:
                c.execute(f'CREATE DATABASE "{name}"')
    print(f"  {backend}: writing a store of {n:,} identities (once; kept in {folder})",
          flush=True)
    took = populate(settings, n, seed)
    manifest.write_text(json.dumps(want))
    print(f"  {backend}: written in {took:.0f} s", flush=True)
    return settings


def drop(backend: str, n: int) -> None:
    shutil.rmtree(CACHE / f"{backend}-{n}", ignore_errors=True)
    if backend == "postgres":
        import psycopg

        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            for part in ("data", "keys"):
                c.execute(f'DROP DATABASE IF EXISTS "idvault_bench_rebuild_{n}_{part}" '
                          "WITH (FORCE)")


# -- one measured rebuild, in a fresh process -------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(spec: dict) -> dict:
    settings = Settings(**spec["settings"])
    vault = Vault.open(settings)
    vault.dedupe.workers = spec["workers"]
    with vault.session() as s:
        owner_id = s.scalar(select(Owner.id).where(Owner.name == OWNER))
    before = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current size
    except OSError:
        pass
    cpu0 = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    t0 = time.perf_counter()
    res = vault.rebuild_index(OWNER)
    took = time.perf_counter() - t0
    peak = _status("VmHWM")
    cpu1 = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = [b.ru_utime + b.ru_stime - a.ru_utime - a.ru_stime for a, b in zip(cpu0, cpu1,
                                                                             strict=True)]
    workers_peak = cpu1[1].ru_maxrss * 1024
    # the same index? the top 5 of 50 stored vectors (identity i has row id i + 1)
    n, seed = spec["n"], spec["seed"]
    picks = np.random.default_rng(seed + 1).choice(n, size=min(50, n), replace=False)
    digest, found = hashlib.sha256(), 0
    for i in picks:
        q = vectors(seed, i // CHUNK, min(CHUNK, n - i // CHUNK * CHUNK))[i % CHUNK]
        top = vault.index.search(owner_id, MODEL_ID, q[None], k=5)
        digest.update(";".join(f"{m.identity_id}:{m.score:.6f}" for m in top).encode() + b"|")
        found += top[0].identity_id == i + 1
    vault.dispose()
    return {"seconds": took, "cpu": cpu[0], "workers_cpu": cpu[1],
            "vectors": res["vectors"], "identities": res["identities"],
            "grew": peak - before, "workers_peak": workers_peak,
            "top5": digest.hexdigest()[:16], "self_found": int(found), "picks": len(picks)}


def measure(settings: Settings, n: int, seed: int, workers: int, blas_threads: int) -> dict:
    spec = {"settings": {"data_dir": str(settings.data_dir),
                         "database_url": settings.database_url,
                         "keystore_url": settings.keystore_url},
            "workers": workers, "n": n, "seed": seed}
    env = dict(os.environ)
    if blas_threads:
        env["OPENBLAS_NUM_THREADS"] = str(blas_threads)
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                         capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode:
        raise RuntimeError(f"child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- per-stage costs ---------------------------------------------------------------------------
def stages(settings: Settings, n: int) -> list[str]:
    """Cost per identity of each step of a rebuild, old and new, in this process."""
    from vault import dedupe_load
    from vault.dedupe_index import OwnerIndex

    vault = Vault.open(settings)
    with vault.session() as s:
        owner_id = s.scalar(select(Owner.id).where(Owner.name == OWNER))
        ids = s.scalars(select(Identity.id).order_by(Identity.id).limit(n)).all()
    lo, hi = ids[0], ids[-1] + 1
    reader = dedupe_load.FaceReader(vault.engine, vault.keys, str(vault.vault_id), owner_id,
                                    OWNER)
    rows_q = (select(Identity.id, Identity.uid, Artifact.id, Artifact.model_id,
                     Artifact.ciphertext).join(Artifact, Artifact.identity_id == Identity.id)
              .where(Identity.id >= lo, Identity.id < hi).order_by(Identity.id))
    out = []

    def timed(label: str, fn, repeat: int = 3):
        best, value = float("inf"), None
        for _ in range(repeat):
            t0 = time.perf_counter()
            value = fn()
            best = min(best, time.perf_counter() - t0)
        out.append(f"{label:<58} {best / len(ids) * 1e6:7.1f} us")
        return value

    ro = vault.engine.execution_options(**{READ_ONLY: True})

    def fetch(statement):
        with ro.connect() as conn:
            return conn.execute(statement).all()

    rows = timed("SQL: rows with ciphertext (Core; text on PostgreSQL here)",
                 lambda: fetch(rows_q))
    uids = [r[1] for r in rows]
    with vault.keystore_engine.execution_options(**{READ_ONLY: True}).connect() as conn:
        wrapped = {u: (k, w) for u, k, w in conn.execute(
            select(DataKey.identity_uid, DataKey.key_id, DataKey.wrapped)
            .where(DataKey.identity_uid.in_(uids[:900])))}
    sample = list(wrapped.items())

    def old_unwrap():
        for uid, (key_id, w) in sample:
            vault.keys._unwrap(w, _dek_context(uid, uuid.UUID(key_id)))

    def new_unwrap():
        for uid, (key_id, w) in sample:
            vault.keys._unwrap_dek(uid, key_id, w)

    for label, fn in (("DEK unwrap, old (dict context, UUID parse)", old_unwrap),
                      ("DEK unwrap, new (ContextEncoder)", new_unwrap)):
        best = min(_t(fn) for _ in range(3))
        out.append(f"{label:<58} {best / len(sample) * 1e6:7.1f} us")
    deks = timed("SQL + unwrap: KeyStore.all_deks",
                 lambda: vault.keys.all_deks(uids))
    vid = str(vault.vault_id)

    def old_open():
        return [crypto.open_token(deks[u], c, context=vault._context(OWNER, u, a, "face", m))
                for _, u, a, m, c in rows]

    payloads = timed("AEAD open, old (context dict -> JSON per row)", old_open)
    enc = crypto.ContextEncoder({"vault": vid, "owner": OWNER, "kind": "face"},
                                ("identity", "artifact", "model_id"))
    timed("AEAD open, new (ContextEncoder)",
          lambda: [crypto.open_token(deks[u], c, context=enc(u, a, m)) for _, u, a, m, c in rows])
    timed("decode, old (codec.decode per artifact)",
          lambda: [codec.decode(p, kind="face").tensors["normed"] for p in payloads])
    vecs = timed("decode, new (codec.stack_rows per 1000)",
                 lambda: np.concatenate([codec.stack_rows(payloads[i:i + 1000], kind="face",
                                                          name="normed")[0]
                                         for i in range(0, len(payloads), 1000)]))
    ids_arr = np.asarray(ids, dtype=np.int64)
    timed("index add (OwnerIndex.add_many per 1000)",
          lambda: [OwnerIndex().add_many(ids_arr[i:i + 1000], vecs[i:i + 1000])
                   for i in range(0, len(ids), 1000)])
    timed("whole range, new (FaceReader.read per 1000)",
          lambda: [reader.read(ids[i], ids[min(i + 1000, len(ids) - 1)] + 1)
                   for i in range(0, len(ids), 1000)], repeat=2)
    def make_plan():
        with ro.connect() as conn:
            return dedupe_load.plan(conn, owner_id)

    t0 = time.perf_counter()
    plan = make_plan()
    out.append(f"{'plan of the whole owner (once per rebuild)':<58} "
               f"{time.perf_counter() - t0:7.2f} s  ({plan.identities:,} identities, "
               f"{len(plan.ranges)} ranges)")
    vault.dispose()
    return out


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000", help="identities per store (comma-separated)")
    ap.add_argument("--backends", default="sqlite,postgres", help="sqlite and/or postgres")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="worker processes of the parallel rebuild (default: one per core)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="rebuilds per variant (default 2; 0 only writes the stores)")
    ap.add_argument("--blas-threads", type=int, default=0,
                    help="OPENBLAS_NUM_THREADS of the measured processes (0: numpy's default, "
                         "one per core); the index's add multiplies by a matrix")
    ap.add_argument("--stages", action="store_true", help="also print per-stage costs")
    ap.add_argument("--stage-n", type=int, default=20_000, help="identities for --stages")
    ap.add_argument("--fresh", action="store_true", help="write the stores again")
    ap.add_argument("--drop", action="store_true", help="remove the stores and exit")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not set(backends) <= {"sqlite", "postgres"}:
        ap.error("--backends takes sqlite and/or postgres")
    if args.drop:
        for b in backends:
            for n in sizes:
                drop(b, n)
        print("dropped")
        return
    print(f"bench_rebuild  {dt.datetime.now():%Y-%m-%d %H:%M}  python "
          f"{platform.python_version()}  {os.cpu_count()} CPUs  load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}  OPENBLAS_NUM_THREADS="
          f"{args.blas_threads or os.environ.get('OPENBLAS_NUM_THREADS', 'default')}")
    for n in sizes:
        for backend in backends:
            print(f"\n== {n:,} identities x 1 face photo, one owner, {backend} ==", flush=True)
            settings = store(backend, n, args.seed, args.fresh)
            if args.stages:
                for line in stages(settings, min(n, args.stage_n)):
                    print(f"  {line}", flush=True)
            if not args.repeats:
                continue
            runs: dict[int, list[dict]] = {1: [], args.workers: []}
            for _ in range(args.repeats):
                for w in runs:
                    r = measure(settings, n, args.seed, w, args.blas_threads)
                    runs[w].append(r)
                    print(f"  workers={w}: {r['seconds']:.2f} s = {n / r['seconds']:,.0f} "
                          f"identities/s; CPU {r['cpu']:.1f} s here + {r['workers_cpu']:.1f} s "
                          f"in workers; memory +{r['grew'] / 2**20:,.0f} MiB (largest worker "
                          f"{r['workers_peak'] / 2**20:,.0f} MiB); {r['vectors']:,} vectors, "
                          f"{r['identities']:,} identities; top-5 digest {r['top5']}; "
                          f"{r['self_found']}/{r['picks']} find themselves first; load "
                          f"{os.getloadavg()[0]:.2f}", flush=True)
            base = statistics.median(r["seconds"] for r in runs[1])
            par = statistics.median(r["seconds"] for r in runs[args.workers])
            same = len({r["top5"] for rs in runs.values() for r in rs}) == 1 and all(
                r["vectors"] == n for rs in runs.values() for r in rs)
            print(f"  median: workers=1 {base:.2f} s ({n / base:,.0f}/s), workers="
                  f"{args.workers} {par:.2f} s ({n / par:,.0f}/s): x{base / par:.2f}; "
                  f"same index: {same}  (vectors alone: {n * 2048 / 2**20:,.0f} MiB)")
    print(f"\nload average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
