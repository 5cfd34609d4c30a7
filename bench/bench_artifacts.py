"""Artifact put/get with encryption against the same operations storing plaintext.

What it measures
    Latency (p50/p95/mean) and single-client throughput (ops/s) of
    ``Vault.put_artifact`` and ``Vault.get_artifact`` on ~4 KB artifacts
    (``celeb_basis``: coefficients (2, 512) float32) and ~64 KB artifacts
    (``photomaker`` v1: id_embeds (8, 1, 2048) float32), on SQLite (always) and
    on PostgreSQL (with ``--database-url``).

    The baseline is the same product code path minus crypto: ``PlaintextVault``
    subclasses ``vault.vault.Vault`` and overrides its only two crypto hooks,
    ``_seal_artifact`` / ``_open_artifact``, to store and return the payload
    unchanged. Everything else (codec validation, consent check, ORM, audit
    append, commit) is identical. Encrypted and plaintext operations run against
    the same database, alternating in blocks so that drift (page cache, WAL
    growth, other load on the machine) hits both alike.

    Phases, each with its own encrypted/plaintext ratio:

    * ``put new``     first artifact of a fresh identity (creates and wraps the
                      identity's data key: an extra key-store transaction);
    * ``put 2nd``     replace it right after: first use of that data key;
    * ``put warm``    replace again: data key in the in-process cache;
    * ``get warm``    decrypting read, data key cached;
    * ``get cold``    decrypting read with ``dek_cache_seconds=0``: the key is
                      read from the key store and unwrapped on every call (what a
                      read sees when the identity was not used in the last 30 s).

    Backends: SQLite as the product configures it (WAL data DB, rollback-journal
    key store, ``synchronous=FULL``: every commit waits for fsync); the same
    with ``synchronous=OFF`` set by the bench only (no fsync: shows the ratio
    where commits are cheap, i.e. the CPU cost of the crypto); PostgreSQL
    when asked.

    "unwraps/op" counts key-store DEK unwraps per operation (cache misses).
    Raw AES-256-GCM seal/open figures of ``vault.crypto`` are printed for
    context, as is the in-memory DEK unwrap.

How to run
    .venv/bin/python bench/bench_artifacts.py                 # SQLite, defaults
    .venv/bin/python bench/bench_artifacts.py --n 100         # quicker
    .venv/bin/python bench/bench_artifacts.py \\
        --database-url postgresql+psycopg://postgres@127.0.0.1/idvault   # + PostgreSQL
    .venv/bin/python bench/bench_artifacts.py --profile       # + where the time goes

    With ``--database-url`` the bench connects to the server's ``postgres``
    database, creates two throwaway databases (data and key store) named after
    the one in the URL plus a random suffix, and drops them at the end. SQLite
    files live in a temporary directory (or under ``--data-dir``) that is
    removed at the end unless ``--keep``. Nothing else is written. No figure is
    asserted: this prints numbers, it does not pass or fail.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import hashlib
import io
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import event, select

from vault import codec, crypto
from vault.config import Settings
from vault.consent import ConsentRequest
from vault.keystore import _dek_context
from vault.models import Artifact, Identity
from vault.vault import Vault

OWNER = "bench"
ACTOR = "bench"


class PlaintextVault(Vault):
    """The product's Vault with its two crypto hooks replaced by the identity function."""

    def _seal_artifact(self, identity: Identity, artifact_id: str, kind: str, model_id: str,
                       payload: bytes) -> bytes:
        return payload

    def _open_artifact(self, identity: Identity, row: Artifact,
                       token: bytes | None = None) -> bytes:
        # get_artifacts reads the stored tokens in one query for both vaults alike
        return token if token is not None else row.ciphertext


# -- payloads -------------------------------------------------------------------------
@dataclass(frozen=True)
class Profile:
    label: str
    kind: str
    make: Callable[[np.random.Generator], bytes]


def _celeb_basis(rng: np.random.Generator) -> bytes:
    coeffs = rng.normal(size=(2, 512)).astype(np.float32)
    return codec.encode("celeb_basis", {"coefficients": coeffs},
                        {"model_id": "bench-sd15-text-encoder",
                         "basis_id": hashlib.sha256(b"bench basis").hexdigest()})


def _photomaker(rng: np.random.Generator) -> bytes:
    embeds = rng.normal(size=(8, 1, 2048)).astype(np.float32)
    return codec.encode("photomaker", {"id_embeds": embeds},
                        {"model_id": "bench-photomaker-v1", "version": "v1"})


PROFILES = {
    "4k": Profile("4 KB celeb_basis (2x512 f32)", "celeb_basis", _celeb_basis),
    "64k": Profile("64 KB photomaker v1 (8x1x2048 f32)", "photomaker", _photomaker),
}


def consent(subject: str) -> ConsentRequest:
    return ConsentRequest.from_dict({
        "subject": subject, "given_by": "self", "purposes": ["enroll", "generate"],
        "retain_until": (dt.date.today() + dt.timedelta(days=365)).isoformat(),
        "evidence_sha256": hashlib.sha256(subject.encode()).hexdigest(),
    })


# -- statistics -----------------------------------------------------------------------
@dataclass
class Series:
    ns: list[int] = field(default_factory=list)
    unwraps: int = 0

    def pct(self, q: float) -> float:
        """Percentile in ms (nearest rank)."""
        s = sorted(self.ns)
        return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s))) - 1))] / 1e6

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.ns) / 1e6

    @property
    def ops(self) -> float:
        return 1e3 / self.mean_ms


class UnwrapCounter:
    """Counts the key store's DEK unwraps (cache misses) of one Vault instance."""

    def __init__(self, vault: Vault) -> None:
        self.count = 0
        inner = vault.keys._unwrap

        def counted(token: bytes, context: dict[str, str]) -> bytes:
            self.count += 1
            return inner(token, context)

        vault.keys._unwrap = counted  # type: ignore[method-assign]


def timed(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


# -- raw crypto -----------------------------------------------------------------------
def crypto_figures(n: int, sizes: list[int]) -> list[tuple[str, float]]:
    key, key_id = crypto.new_key(), uuid.uuid4()
    ctx = {"vault": str(uuid.uuid4()), "owner": OWNER, "identity": str(uuid.uuid4()),
           "artifact": str(uuid.uuid4()), "kind": "celeb_basis", "model_id": "bench-model"}
    out = []
    for size in sizes:
        data = os.urandom(size)
        token = crypto.seal(key, data, key_id=key_id, key_version=1, context=ctx)
        nonce, aad = os.urandom(12), b"x" * 200
        ct = AESGCM(key).encrypt(nonce, data, aad)
        for label, fn in (
            (f"vault.crypto.seal        {size // 1024:>3} KB",
             lambda: crypto.seal(key, data, key_id=key_id, key_version=1, context=ctx)),
            (f"vault.crypto.open_token  {size // 1024:>3} KB",
             lambda: crypto.open_token(key, token, context=ctx)),
            (f"bare AESGCM encrypt      {size // 1024:>3} KB",
             lambda: AESGCM(key).encrypt(nonce, data, aad)),
            (f"bare AESGCM decrypt      {size // 1024:>3} KB",
             lambda: AESGCM(key).decrypt(nonce, ct, aad)),
        ):
            for _ in range(min(n, 200)):
                fn()
            t0 = time.perf_counter_ns()
            for _ in range(n):
                fn()
            out.append((label, (time.perf_counter_ns() - t0) / n / 1e3))
    return out


# -- backends ---------------------------------------------------------------------------
@dataclass
class Backend:
    name: str
    settings: Settings
    cleanup: Callable[[], None]
    relax_sync: bool = False


def sqlite_backend(root: Path, *, nosync: bool = False) -> Backend:
    if nosync:
        return Backend("SQLite synchronous=OFF (bench-only: no fsync)",
                       Settings(data_dir=root / "sqlite-nosync"), lambda: None, True)
    return Backend("SQLite", Settings(data_dir=root / "sqlite"), lambda: None)


def relax_sync(vault: Vault) -> None:
    """Bench-only: PRAGMA synchronous=OFF on both engines (after the product's own setup).

    Takes the fsync cost out of every commit, so the ratio shows what the crypto
    costs where commits are cheap (a disk with a fast fsync, or batching).
    """
    for engine in (vault.engine, vault.keystore_engine):
        def _off(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA synchronous=OFF")
            cur.close()
        event.listen(engine, "connect", _off)
        engine.dispose()  # pooled connections were set up without it


def postgres_backend(url: str, root: Path) -> Backend:
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    if not u.drivername.startswith("postgresql"):
        raise SystemExit(f"--database-url must be a postgresql URL, not {u.drivername}")
    base = (u.database or "idvault").replace("-", "_")[:30]
    suffix = uuid.uuid4().hex[:8]
    names = {"data": f"{base}_bench_{suffix}", "keys": f"{base}_bench_{suffix}_keys"}
    admin = u.set(drivername="postgresql", database="postgres").render_as_string(
        hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        for db_name in names.values():
            conn.execute(f'CREATE DATABASE "{db_name}"')

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            for db_name in names.values():
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')

    settings = Settings(
        data_dir=root / "pg",  # key file only
        database_url=u.set(database=names["data"]).render_as_string(hide_password=False),
        keystore_url=u.set(database=names["keys"]).render_as_string(hide_password=False))
    return Backend(f"PostgreSQL ({u.host}, db {names['data']})", settings, drop)


# -- the measured loop ----------------------------------------------------------------
PHASES = ("put new", "put 2nd", "put warm", "get warm", "get cold")


@dataclass
class Run:
    backend: str
    profile: str
    payload_bytes: int
    results: dict[str, dict[str, Series]]  # phase -> {"enc": Series, "plain": Series}


def interleaved(n: int, block: int, ops: dict[str, Callable[[int], None]],
                counters: dict[str, UnwrapCounter | None]) -> dict[str, Series]:
    """Run ops[v](i) for i in range(n) for each variant, alternating blocks."""
    out = {v: Series() for v in ops}
    variants = list(ops)
    before = {v: (c.count if c else 0) for v, c in counters.items()}
    for r, start in enumerate(range(0, n, block)):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            fn = ops[v]
            for i in range(start, min(n, start + block)):
                out[v].ns.append(timed(lambda fn=fn, i=i: fn(i)))
    for v, c in counters.items():
        out[v].unwraps = (c.count - before[v]) if c else 0
    return out


def run_profile(enc: Vault, cold: Vault, plain: Vault, prof: Profile, n: int, warmup: int,
                block: int, rng: np.random.Generator, tag: str,
                profiler: cProfile.Profile | None) -> dict[str, dict[str, Series]]:
    names = {"enc": [f"{OWNER}/e{tag}{i}" for i in range(n + warmup)],
             "plain": [f"{OWNER}/p{tag}{i}" for i in range(n + warmup)]}
    vaults = {"enc": enc, "plain": plain}
    for v, handles in names.items():
        for h in handles:
            vaults[v].create_identity(h, consent(h), actor=ACTOR)
    payloads = {v: [prof.make(rng) for _ in range(n + warmup)] for v in names}
    counters = {"enc": UnwrapCounter(enc), "plain": None}
    cold_counters = {"enc": UnwrapCounter(cold), "plain": None}

    def put(v: str, vault: Vault, offset: int) -> Callable[[int], None]:
        def op(i: int) -> None:
            vault.put_artifact(names[v][offset + i], prof.kind, payloads[v][offset + i],
                               actor=ACTOR)
        return op

    def get(v: str, vault: Vault, offset: int) -> Callable[[int], None]:
        def op(i: int) -> None:
            got = vault.get_artifact(names[v][offset + i], prof.kind, actor=ACTOR)
            if got.payload != payloads[v][offset + i]:
                raise AssertionError(f"{v}: payload read back differs")
        return op

    # warm-up: the same sequence on identities that are not measured
    for v, vault in vaults.items():
        for _ in range(2):
            for i in range(warmup):
                put(v, vault, 0)(i)
        for i in range(warmup):
            get(v, vault, 0)(i)
            get(v, cold if v == "enc" else vault, 0)(i)

    o = warmup
    results: dict[str, dict[str, Series]] = {}
    if profiler:
        profiler.enable()
    results["put new"] = interleaved(n, block, {"enc": put("enc", enc, o),
                                                "plain": put("plain", plain, o)}, counters)
    results["put 2nd"] = interleaved(n, block, {"enc": put("enc", enc, o),
                                                "plain": put("plain", plain, o)}, counters)
    results["put warm"] = interleaved(n, block, {"enc": put("enc", enc, o),
                                                 "plain": put("plain", plain, o)}, counters)
    results["get warm"] = interleaved(n, block, {"enc": get("enc", enc, o),
                                                 "plain": get("plain", plain, o)}, counters)
    results["get cold"] = interleaved(n, block, {"enc": get("enc", cold, o),
                                                 "plain": get("plain", plain, o)},
                                      cold_counters)
    if profiler:
        profiler.disable()
    # the baseline really stored plaintext, the product really sealed
    with enc.session() as s:
        def stored(handle: str) -> bytes:
            name = handle.split("/")[1]
            return s.scalar(select(Artifact.ciphertext).join(Identity).where(
                Identity.name == name, Artifact.kind == prof.kind))

        e, p = stored(names["enc"][o]), stored(names["plain"][o])
        assert e[:3] == crypto.MAGIC and e != payloads["enc"][o], "encrypted row is not sealed"
        assert p == payloads["plain"][o], "plaintext baseline row is not the payload"
    return results


def measure_backend(backend: Backend, args: argparse.Namespace) -> list[Run]:
    Vault.init(backend.settings, actor=ACTOR).dispose()
    enc = Vault.open(backend.settings)
    cold = Vault.open(backend.settings.with_(dek_cache_seconds=0))
    plain = PlaintextVault.open(backend.settings)
    if backend.relax_sync:
        for v in (enc, cold, plain):
            relax_sync(v)
    enc.add_owner(OWNER, "studio")
    rng = np.random.default_rng(args.seed)
    runs = []
    try:
        for j, key in enumerate(args.sizes):
            prof = PROFILES[key]
            profiler = cProfile.Profile() if args.profile else None
            t0 = time.perf_counter()
            results = run_profile(enc, cold, plain, prof, args.n, args.warmup, args.block,
                                  rng, f"{j}x", profiler)
            size = len(prof.make(rng))
            runs.append(Run(backend.name, prof.label, size, results))
            print(f"  [{backend.name}] {prof.label}: {len(PHASES)} phases x 2 variants x "
                  f"{args.n} ops in {time.perf_counter() - t0:.1f} s", flush=True)
            if profiler:
                print_profile(profiler, f"{backend.name}, {prof.label}")
        if args.dek_n:
            # the key-store calls behind "put new", "put 2nd" and "get cold", alone
            with enc.session() as s:
                uid = s.scalar(select(Identity.uid).where(Identity.name == "e0x0"))
            fresh = [str(uuid.uuid4()) for _ in range(args.dek_n)]
            it = iter(fresh)
            for label, fn in (
                ("KeyStore.get_or_create_dek(new identity)", lambda: enc.keys.get_or_create_dek(
                    next(it))),
                ("KeyStore.dek() uncached (DB read + unwrap)", lambda: cold.keys.dek(uid)),
                ("KeyStore.active_version()", lambda: enc.keys.active_version()),
            ):
                s_ = Series([timed(fn) for _ in range(args.dek_n)])
                runs.append(Run(backend.name, f"{label:<43} p50 {s_.pct(50) * 1e3:6.0f} us, "
                                f"p95 {s_.pct(95) * 1e3:6.0f} us", 0, {}))
            # a cache hit, as the cache fills: other identities used in the last 30 s
            enc.keys.dek(uid)
            real = dict(enc.keys._deks)
            for extra in (0, 1_000, 10_000):
                fake = {str(uuid.uuid4()): (time.monotonic(), uuid.uuid4(), b"\0" * 32)
                        for _ in range(extra)}
                enc.keys._deks.update(fake)
                s_ = Series([timed(lambda: enc.keys.dek(uid)) for _ in range(args.dek_n)])
                label = f"KeyStore.dek() cache hit, {len(enc.keys._deks):>6} keys cached"
                runs.append(Run(backend.name, f"{label:<43} p50 {s_.pct(50) * 1e3:6.0f} us, "
                                f"p95 {s_.pct(95) * 1e3:6.0f} us", 0, {}))
                with enc.keys._lock:
                    enc.keys._deks.clear()
                    enc.keys._deks.update(real)
    finally:
        for v in (enc, cold, plain):
            v.dispose()
    return runs


def print_profile(profiler: cProfile.Profile, title: str) -> None:
    def section(heading: str, sort: str, restrict: tuple) -> None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats(sort).print_stats(*restrict)
        lines = buf.getvalue().splitlines()
        start = next(i for i, ln in enumerate(lines) if "ncalls" in ln)
        print(f"\n  cProfile ({title}), all phases, both variants; {heading}:")
        for ln in lines[start:start + 16]:
            if ln.strip():
                print("   ", ln.replace(str(Path.cwd()) + "/", "")[:160])

    section("top by own time", "tottime", (15,))
    section("vault/ functions by cumulative time", "cumulative", (r"/vault/", 15))
    print()


# -- report -------------------------------------------------------------------------------
def report(runs: list[Run]) -> None:
    for run in runs:
        if not run.results:
            print(f"  {run.backend}: {run.profile}")
            continue
        print(f"\n{run.backend}, {run.profile}, payload {run.payload_bytes} B")
        print(f"  {'phase':<9} {'variant':<9} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8} "
              f"{'ops/s':>8} {'unwraps/op':>10}   enc/plain: p50   p95  mean(=1/ops)")
        for phase in PHASES:
            r = run.results[phase]
            e, p = r["enc"], r["plain"]
            for v, s in (("encrypt", e), ("plain", p)):
                line = (f"  {phase:<9} {v:<9} {s.pct(50):8.3f} {s.pct(95):8.3f} "
                        f"{s.mean_ms:8.3f} {s.ops:8.0f} {s.unwraps / len(s.ns):10.2f}")
                if v == "plain":
                    line += (f"   {e.pct(50) / p.pct(50):13.2f} {e.pct(95) / p.pct(95):5.2f} "
                             f"{e.mean_ms / p.mean_ms:5.2f}")
                print(line)
        print()


def summary(runs: list[Run]) -> None:
    print("summary: encryption overhead = mean latency encrypted / plaintext - 1 "
          "(p50 ratio - 1 in brackets);\n         the goal is under 20% on 4 KB artifacts")
    print(f"  {'backend':<48} {'size':>6}" + "".join(f"{p:>16}" for p in PHASES))
    for run in runs:
        if not run.results:
            continue
        cells = []
        for phase in PHASES:
            e, p = run.results[phase]["enc"], run.results[phase]["plain"]
            cells.append(f"{e.mean_ms / p.mean_ms - 1:+6.0%} ({e.pct(50) / p.pct(50) - 1:+4.0%})")
        print(f"  {run.backend[:48]:<48} {run.payload_bytes // 1024:>4}KB" +
              "".join(f"{c:>16}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500,
                    help="measured operations per phase and variant (default 500)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up ops per variant (20)")
    ap.add_argument("--block", type=int, default=10,
                    help="ops per block when alternating encrypted/plaintext (10)")
    ap.add_argument("--sizes", default="4k,64k",
                    help=f"artifact sizes to run, from {','.join(PROFILES)} (default 4k,64k)")
    ap.add_argument("--database-url", default=None,
                    help="also run on this PostgreSQL server (throwaway databases are created "
                         "and dropped), e.g. postgresql+psycopg://postgres@127.0.0.1/idvault")
    ap.add_argument("--no-sqlite", action="store_true", help="skip the SQLite runs")
    ap.add_argument("--no-nosync", action="store_true",
                    help="skip the extra SQLite run with synchronous=OFF (bench-only setting "
                         "that removes fsync from commits, to show the CPU-bound ratio)")
    ap.add_argument("--crypto-n", type=int, default=20000,
                    help="iterations of the raw AES-GCM figures (0 skips; default 20000)")
    ap.add_argument("--dek-n", type=int, default=500,
                    help="uncached KeyStore.dek() calls timed alone (0 skips; default 500)")
    ap.add_argument("--profile", action="store_true", help="print a cProfile summary per size")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="parent folder for the temporary vault (default: system temp)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary vault folder")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in PROFILES]
    if unknown:
        ap.error(f"unknown size(s) {unknown}; choose from {', '.join(PROFILES)}")

    print(f"bench_artifacts  {dt.datetime.now():%Y-%m-%d %H:%M}  python {platform.python_version()}"
          f"  {os.cpu_count()} CPUs  n={args.n}/phase/variant, warmup {args.warmup}, "
          f"block {args.block}")
    if args.data_dir:
        args.data_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="idvault-bench-art-", dir=args.data_dir))
    print(f"temporary vaults in {root}")
    runs: list[Run] = []
    try:
        if args.crypto_n:
            print("\nraw crypto, per call (vault context of 6 fields):")
            sizes = sorted({len(PROFILES[s].make(np.random.default_rng(0))) for s in args.sizes})
            for label, us in crypto_figures(args.crypto_n, sizes):
                print(f"  {label}: {us:7.2f} us")
            key = crypto.new_key()
            wrapped = crypto.seal(key, os.urandom(32), key_id=uuid.uuid4(), key_version=1,
                                  context=_dek_context("u", uuid.UUID(int=1)))
            t0 = time.perf_counter_ns()
            for _ in range(args.crypto_n):
                crypto.open_token(key, wrapped, context=_dek_context("u", uuid.UUID(int=1)))
            print(f"  DEK unwrap (open_token of 32 B, in memory): "
                  f"{(time.perf_counter_ns() - t0) / args.crypto_n / 1e3:7.2f} us")
        backends = []
        if not args.no_sqlite:
            backends.append(sqlite_backend(root))
            if not args.no_nosync:
                backends.append(sqlite_backend(root, nosync=True))
        if args.database_url:
            backends.append(postgres_backend(args.database_url, root))
        for b in backends:
            print(f"\nrunning on {b.name} ...", flush=True)
            try:
                runs += measure_backend(b, args)
            finally:
                b.cleanup()
        report(runs)
        summary(runs)
    finally:
        if args.keep:
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
