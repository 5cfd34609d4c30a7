"""Lookups by handle over HTTP against a bare endpoint doing the same SQL read, on SQLite and
PostgreSQL; then enrollment.

What it measures
    For each backend (SQLite, the embedded default; PostgreSQL, two fresh
    throwaway databases on ``--pg``, dropped at the end), a vault holding
    ``--identities`` identities of one owner (every fourth with two sealed
    artifacts) and an API key, then two servers in turn, each started as a
    separate process on 127.0.0.1 with the same server setup (``web.serve``:
    waitress, ``--workers`` pre-forked processes x ``--threads`` threads):

    1. bare: a minimal Flask app with no idvault layers (no auth, tenancy,
       error or header layers, no ORM or SQLAlchemy) that runs, on the database
       driver itself (sqlite3, psycopg), the same SQL as a lookup for the same
       identities: the key's row by prefix and the identity's row(s), each in
       autocommit as idvault reads them, on one connection per thread kept open
       (no pool), and returns the rows as JSON;
    2. idvault: ``idvault serve``: ``GET /v1/health`` (no auth, no database),
       ``GET /v1/me`` (API-key authentication), and the lookup
       ``GET /v1/identities/smiths/<random name>`` (authentication, tenancy,
       the identity with its consent and artifact metadata; nothing decrypted).

    Then, on SQLite, ``--enrollments`` enrollments (``POST .../enroll``,
    multipart, ``--photos`` synthetic photos each, tiny face models).

    Load: ``--clients`` client processes, each one keep-alive connection
    (``http.client``), sending the next request when the previous answer is
    in, for ``--seconds`` per phase after a 1 s warm-up (closed loop: what a
    server sustains). Reported: requests per second, p50 and p99 latency,
    errors (a connection failure or any status but the expected one), and
    lookup / bare. Then the same rounds open loop at ``--rate`` requests per
    second in all (default 1,000, the goal's rate): each client sends on a
    fixed schedule and a request's latency counts from when it was due, so a
    stall is charged to every request it delays (no coordinated omission). The clients run on the
    same cores as the server (and PostgreSQL), so on a small machine they
    take a share of the CPU from what is measured. Nothing is asserted.

How to run
    .venv/bin/python bench/bench_web.py                   # ~2 min on 2 cores
    .venv/bin/python bench/bench_web.py --backends sqlite --enrollments 0
    .venv/bin/python bench/bench_web.py --workers 1 --clients 4 --seconds 10
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing as mp
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PG_ADMIN = os.environ.get("IDVAULT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _consent() -> dict:
    import datetime as dt
    import hashlib

    return {"subject": "Bench Person", "given_by": "self", "purposes": ["enroll", "generate"],
            "retain_until": (dt.date.today() + dt.timedelta(days=365)).isoformat(),
            "evidence_sha256": hashlib.sha256(b"bench consent").hexdigest()}


# -- the vault --------------------------------------------------------------------------------
def setup(settings, identities: int) -> str:
    """One owner with ``identities`` identities (every fourth with two artifacts); the key."""
    import numpy as np

    from vault import api_keys, codec
    from vault.consent import ConsentRequest
    from vault.vault import Vault

    vault = Vault.init(settings, actor="bench")
    vault.add_owner("smiths", "family", actor="bench")
    request = ConsentRequest.from_dict(_consent())
    rng = np.random.default_rng(0)
    for i in range(identities):
        handle = f"smiths/p{i:05d}"
        vault.create_identity(handle, request, actor="bench")
        if i % 4 == 0:
            v = rng.normal(size=(2, 512)).astype(np.float32)
            n = v / np.linalg.norm(v, axis=1, keepdims=True)
            mean = n.mean(0) / np.linalg.norm(n.mean(0))
            vault.put_artifact(handle, "face", codec.encode(
                "face", {"embeddings": v, "normed": n, "mean": mean.astype(np.float32)},
                {"model_id": "buffalo_l"}), actor="bench")
            vault.put_artifact(handle, "celeb_basis", codec.encode(
                "celeb_basis", {"coefficients": rng.normal(size=(2, 512)).astype(np.float32)},
                {"model_id": "sd15", "basis_id": "b" * 64}), actor="bench")
    with vault.session() as s:
        _, token = api_keys.create_key(s, "smiths", "bench", list(api_keys.SCOPES),
                                       actor="bench")
    vault.dispose()
    return token


class PgDatabases:
    """Two throwaway PostgreSQL databases (data, key store), dropped by :meth:`drop`."""

    def __init__(self, admin: str) -> None:
        import psycopg

        self.admin, self.names = admin, []
        with psycopg.connect(admin, connect_timeout=3, autocommit=True) as c:
            for _ in range(2):
                self.names.append(f"idvault_bench_{uuid.uuid4().hex[:12]}")
                c.execute(f'CREATE DATABASE "{self.names[-1]}"')
        base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        self.urls = [f"{base}/{n}" for n in self.names]

    def drop(self) -> None:
        import psycopg

        with psycopg.connect(self.admin, autocommit=True) as c:
            for name in self.names:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the bare endpoint (runs in its own server process: --bare-server) ------------------------
def bare_app(database_url: str):
    """A minimal Flask app: the lookup's SQL on the raw driver, the rows as JSON."""
    from flask import Flask, jsonify, request
    from sqlalchemy.dialects import postgresql, sqlite

    from vault.api_keys import KEY_BY_PREFIX
    from vault.identities import DESCRIBE_BY_HANDLE

    is_sqlite = database_url.startswith("sqlite")
    dialect = sqlite.dialect() if is_sqlite else postgresql.psycopg.dialect()
    key_sql = KEY_BY_PREFIX.compile(dialect=dialect)
    describe_sql = DESCRIBE_BY_HANDLE.compile(dialect=dialect)
    local = threading.local()

    def connect():
        if is_sqlite:
            import sqlite3

            conn = sqlite3.connect(database_url.removeprefix("sqlite:///"),
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA query_only=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        import psycopg

        return psycopg.connect(database_url.replace("postgresql+psycopg://", "postgresql://"),
                               autocommit=True)

    def run(conn, compiled, params: dict) -> list:
        if is_sqlite:
            return conn.execute(compiled.string,
                                [params[k] for k in compiled.positiontup]).fetchall()
        return conn.execute(compiled.string, params).fetchall()

    app = Flask("bare")

    @app.get("/v1/identities/<owner>/<name>")
    def lookup(owner: str, name: str):
        conn = getattr(local, "conn", None) or connect()
        local.conn = conn
        prefix = request.headers.get("Authorization", "")[len("Bearer idv_"):][:12]
        key = run(conn, key_sql, {"prefix": prefix})
        rows = run(conn, describe_sql, {"owner": owner, "name": name})
        return jsonify({"key": [str(v) for v in key[0]],
                        "rows": [[str(v) for v in r] for r in rows]})

    return app


def bare_server(database_url: str, workers: int, threads: int) -> None:
    from web.serve import serve

    serve(lambda: bare_app(database_url), "127.0.0.1", 0, threads=threads, workers=workers)


# -- servers ----------------------------------------------------------------------------------
def start(cmd: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env}, cwd=ROOT,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            # Keep reading its output, so a chatty server never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"server did not start: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cpu_seconds(proc: subprocess.Popen) -> float | None:
    """CPU time used so far by the server's processes (its session: parent and workers), from
    /proc; None where there is none. Per request it does not depend on what else runs."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == proc.pid:  # its session id (start_new_session)
                total += int(fields[11]) + int(fields[12])  # utime, stime
    except OSError:
        return None
    return total / ticks


# -- client processes -------------------------------------------------------------------------
def _multipart(photos: list[bytes], consent: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for i, data in enumerate(photos):
        out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"photos\"; "
                  f"filename=\"p{i}.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}\r\nContent-Disposition: form-data; name=\"consent\"\r\n\r\n"
              f"{json.dumps(consent)}\r\n--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _client(args: tuple) -> dict:
    kind, url, token, seconds, payload, seed, rate = args
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    latencies, statuses, errors, lags = [], {}, 0, []
    jobs = payload if kind == "enroll" else None
    cpu0 = time.process_time()
    start = time.perf_counter()
    end = start + seconds
    # Open loop (``rate``: this client's requests per second): request i is due at
    # start + i / rate, and its latency counts from then, so a slow answer that delays
    # the requests behind it is charged to them too (no coordinated omission).
    interval = 1.0 / rate if rate else 0.0
    i = 0
    while (jobs is not None and i < len(jobs)) or (jobs is None and time.perf_counter() < end):
        if kind == "health":
            method, path, body, h = "GET", "/v1/health", None, {}
        elif kind == "me":
            method, path, body, h = "GET", "/v1/me", None, headers
        elif kind == "lookup":
            method, path, body, h = ("GET", f"/v1/identities/smiths/p{rng.randrange(payload):05d}",
                                     None, headers)
        else:
            name, body, ctype = jobs[i]
            method, path, h = "POST", f"/v1/identities/smiths/{name}/enroll", {
                **headers, "Content-Type": ctype}
        if interval:
            t0 = start + i * interval
            wait = t0 - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            if t0 >= end:
                break
            # How late this client sent it (its own wait for a core, or the answer
            # before it): if this is as long as the latency, the tail is the client's.
            lags.append(time.perf_counter() - t0)
        else:
            t0 = time.perf_counter()
        i += 1
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            errors += 1
            conn.close()
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
            continue
        latencies.append(time.perf_counter() - t0)
        statuses[status] = statuses.get(status, 0) + 1
    conn.close()
    return {"latencies": latencies, "statuses": statuses, "errors": errors, "lags": lags,
            "cpu": time.process_time() - cpu0}


def run_phase(kind: str, url: str, token: str, clients: int, seconds: float, payload,
              expected: tuple[int, ...], server: subprocess.Popen | None = None,
              rate: float = 0.0) -> dict:
    """One timed phase; its figures (:func:`summary`) and what merging phases needs.
    ``rate``: requests per second offered by all clients together (open loop); 0: each
    client sends its next request when the last answer is in (closed loop)."""
    if kind == "enroll":
        shares = [payload[i::clients] for i in range(clients)]
        tasks = [(kind, url, token, seconds, share, n, 0.0) for n, share in enumerate(shares)]
    else:
        tasks = [(kind, url, token, seconds, payload, n + int(1e6 * random.random()),
                  rate / clients) for n in range(clients)]
    cpu0 = cpu_seconds(server) if server else None
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(clients) as pool:
        results = pool.map(_client, tasks)
    wall = time.perf_counter() - t0 if kind == "enroll" else seconds
    cpu1 = cpu_seconds(server) if cpu0 is not None else None
    statuses: dict[int, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    unexpected = sum(v for k, v in statuses.items() if k not in expected)
    return summary({"latencies": sorted(x for r in results for x in r["latencies"]),
                    "lags": sorted(x for r in results for x in r["lags"]),
                    "statuses": statuses, "seconds": wall,
                    "errors": sum(r["errors"] for r in results) + unexpected,
                    "client_cpu": sum(r["cpu"] for r in results),
                    "server_cpu": cpu1 - cpu0 if cpu1 is not None else None})


def merge(phases: list[dict]) -> dict:
    """Phases of one kind, as one."""
    server = [p["server_cpu"] for p in phases]
    return summary({"latencies": sorted(x for p in phases for x in p["latencies"]),
                    "lags": sorted(x for p in phases for x in p["lags"]),
                    "statuses": {k: sum(p["statuses"].get(k, 0) for p in phases)
                                 for p in phases for k in p["statuses"]},
                    "seconds": sum(p["seconds"] for p in phases),
                    "errors": sum(p["errors"] for p in phases),
                    "client_cpu": sum(p["client_cpu"] for p in phases),
                    "server_cpu": None if None in server else sum(server)})


def summary(raw: dict) -> dict:
    lat, n, lags = raw["latencies"], len(raw["latencies"]), raw["lags"]
    return {**raw, "requests": n, "per_second": n / raw["seconds"] if raw["seconds"] else 0.0,
            "send_lag_p99_ms": 1000 * lags[min(len(lags) - 1, int(0.99 * len(lags)))]
            if lags else None,
            "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p99_ms": 1000 * lat[min(n - 1, int(0.99 * n))] if lat else None,
            "server_cpu_ms": 1000 * raw["server_cpu"] / n
            if raw["server_cpu"] is not None and n else None,
            "client_cpu_ms": 1000 * raw["client_cpu"] / n if n else None}


def enrollment_payloads(n: int, photos: int, start: int = 10_000,
                        prefix: str = "e") -> list[tuple[str, bytes, str]]:
    from PIL import Image

    from encoders.standins.synthetic_faces import synthetic_face

    out = []
    for i in range(n):
        person = start + i * 7
        jpegs = []
        for j in range(photos):
            buf = io.BytesIO()
            Image.fromarray(synthetic_face(person, j)).save(buf, "JPEG", quality=90)
            jpegs.append(buf.getvalue())
        body, ctype = _multipart(jpegs, _consent())
        out.append((f"{prefix}{i:05d}", body, ctype))
    return out


# -- one backend --------------------------------------------------------------------------------
def measure(backend: str, root: Path, args, models: Path | None,
            dbs: PgDatabases | None = None) -> dict:
    from vault.config import Settings

    try:
        kw = {"database_url": dbs.urls[0], "keystore_url": dbs.urls[1]} if dbs else {}
        settings = Settings(data_dir=root / backend, **kw)
        t0 = time.perf_counter()
        token = setup(settings, args.identities)
        print(f"{backend}: {args.identities} identities in {time.perf_counter() - t0:.1f} s",
              flush=True)
        load = (args.clients, args.seconds)
        figures: dict[str, dict] = {}
        env = {"IDVAULT_DATA_DIR": str(settings.data_dir), "IDVAULT_DEBUG": "",
               **({"IDVAULT_DATABASE_URL": dbs.urls[0], "IDVAULT_KEYSTORE_URL": dbs.urls[1]}
                  if dbs else {})}
        size = ["--workers", str(args.workers), "--threads", str(args.threads)]
        servers = {
            "bare": [sys.executable, str(Path(__file__).resolve()), "--bare-server",
                     settings.resolved_database_url, *size],
            "lookup": [sys.executable, "-m", "web.cli.main", "serve", "--host", "127.0.0.1",
                       "--port", "0", *size] + (["--models", str(models)] if models else []),
        }
        procs: dict[str, tuple[subprocess.Popen, str]] = {}
        try:
            for name, cmd in servers.items():
                procs[name] = start(cmd, env)
                run_phase("lookup", procs[name][1], token, args.clients, 1.0,
                          args.identities, (200,))  # warm-up
            # Alternate the two, so a change in the machine's other load falls on both.
            rounds: dict[str, list[dict]] = {"bare": [], "lookup": []}
            for r in range(args.rounds):
                for name in (("bare", "lookup") if r % 2 == 0 else ("lookup", "bare")):
                    proc, url = procs[name]
                    rounds[name].append(run_phase("lookup", url, token, *load,
                                                  args.identities, (200,), proc))
            figures = {name: merge(phases) for name, phases in rounds.items()}
            figures["ratios"] = [look["per_second"] / bare["per_second"]
                                 for bare, look in zip(rounds["bare"], rounds["lookup"])]
            if args.rate:
                # The latency goal is stated at a rate: offer exactly that, alternating again.
                paced: dict[str, list[dict]] = {"bare": [], "lookup": []}
                for r in range(args.rounds):
                    for name in (("lookup", "bare") if r % 2 == 0 else ("bare", "lookup")):
                        proc, url = procs[name]
                        paced[name].append(run_phase("lookup", url, token, *load,
                                                     args.identities, (200,), proc,
                                                     rate=args.rate))
                for name, phases in paced.items():
                    figures[f"{name}@rate"] = merge(phases)
            proc, url = procs["lookup"]
            figures["health"] = run_phase("health", url, token, *load, None, (200,), proc)
            figures["me"] = run_phase("me", url, token, *load, None, (200,), proc)
            if models is not None and args.enrollments:
                run_phase("enroll", url, token, 1, 0,
                          enrollment_payloads(1, 1, start=5, prefix="w"), (201,))
                figures["enroll"] = run_phase("enroll", url, token, args.clients, 0,
                                              enrollment_payloads(args.enrollments,
                                                                  args.photos), (201, 409),
                                              proc)
        finally:
            for proc, _ in procs.values():
                stop(proc)
        return figures
    finally:
        if dbs is not None:
            dbs.drop()


def report(backend: str, figures: dict, args) -> None:
    labels = {"bare": "bare Flask, same SQL (baseline)",
              "lookup": "GET /v1/identities/{handle}",
              "health": "GET /v1/health", "me": "GET /v1/me (API key)",
              "enroll": f"POST .../enroll ({args.photos} photos)"}
    print(f"\n{backend}:")
    print(f"  {'phase':<34} {'requests':>9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'errors':>6} {'CPU ms/req: server':>19} {'clients':>7}")
    for key in ("bare", "lookup", "health", "me", "enroll"):
        f = figures.get(key)
        if f:
            cpu = f"{f['server_cpu_ms']:.2f}" if f.get("server_cpu_ms") is not None else "-"
            print(f"  {labels[key]:<34} {f['requests']:>9} {f['per_second']:>8.1f} "
                  f"{f['p50_ms']:>7.1f} {f['p99_ms']:>7.1f} {f['errors']:>6} {cpu:>19} "
                  f"{f['client_cpu_ms']:>7.2f}")
    bare, look = figures["bare"], figures["lookup"]
    ratios = ", ".join(f"{r:.2f}" for r in figures["ratios"])
    print(f"  lookups: {look['per_second']:.0f}/s = {look['per_second'] / bare['per_second']:.2f}"
          f" x the bare endpoint's {bare['per_second']:.0f}/s (per round: {ratios}); p99 "
          f"{look['p99_ms']:.1f} ms (bare {bare['p99_ms']:.1f} ms); errors {look['errors']}")
    if "lookup@rate" in figures:
        print(f"  open loop, {args.rate:g} requests/s offered (latency from each request's "
              f"due time):")
        for key in ("bare", "lookup"):
            f = figures[f"{key}@rate"]
            print(f"    {labels[key]:<32} {f['per_second']:>8.1f} req/s  p50 "
                  f"{f['p50_ms']:.1f} ms  p99 {f['p99_ms']:.1f} ms  errors {f['errors']}  "
                  f"(sent late by the client, p99: {f['send_lag_p99_ms']:.1f} ms)")
    if "enroll" in figures:
        enr = figures["enroll"]
        print(f"  enrollment: {enr['per_second']:.2f} enrollments/s "
              f"({enr['per_second'] * args.photos:.1f} photos/s); statuses {enr['statuses']}")


def main(argv: list[str] | None = None) -> int:
    from web.serve import default_workers

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="sqlite,postgres",
                    help="comma-separated: sqlite, postgres")
    ap.add_argument("--pg", default=PG_ADMIN, help="PostgreSQL admin URL (creates and drops "
                                                   "two databases) [env IDVAULT_TEST_PG]")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="server processes (default: idvault serve's, IDVAULT_WEB_WORKERS)")
    ap.add_argument("--threads", type=int, default=8, help="threads per server process")
    ap.add_argument("--clients", type=int, default=4,
                    help="client processes, one keep-alive connection each")
    ap.add_argument("--seconds", type=float, default=3.0, help="length of each timed phase")
    ap.add_argument("--rounds", type=int, default=3,
                    help="bare and lookup phases, alternating, per backend")
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="after the closed-loop rounds, the same rounds with this many "
                         "requests per second offered in all (open loop; 0: skip)")
    ap.add_argument("--identities", type=int, default=1000, help="identities in the roster")
    ap.add_argument("--enrollments", type=int, default=40,
                    help="enrollments on SQLite after the lookups (0: none)")
    ap.add_argument("--photos", type=int, default=3, help="photos per enrollment")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    ap.add_argument("--bare-server", metavar="DATABASE_URL", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.bare_server:
        bare_server(args.bare_server, args.workers, args.threads)
        return 0

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    load_before = os.getloadavg()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="idvault-bench-web-") as tmp:
        root = Path(tmp)
        models = None
        if args.enrollments:
            from encoders.standins.face_pack import write_tiny_face_pack

            models = root / "models"
            write_tiny_face_pack(models / "models" / "buffalo_l")
        for backend in backends:
            if backend == "postgres":
                import psycopg

                try:
                    dbs = PgDatabases(args.pg)
                except psycopg.Error as exc:  # no server: say so, measure the rest
                    print(f"postgres: skipped, no server at {args.pg} ({exc})")
                    continue
                results[backend] = measure(backend, root, args, None, dbs)
            else:
                results[backend] = measure(backend, root, args, models)

    print(f"\nweb.serve (waitress) with {args.workers} worker process(es) x {args.threads} "
          f"threads, for idvault and the bare endpoint alike; {args.clients} client processes "
          f"(one keep-alive connection each) on the same {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}); Python "
          f"{platform.python_version()}; {args.seconds:g} s per phase; load average "
          f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    for backend, figures in results.items():
        report(backend, figures, args)
    if args.json:
        for figures in results.values():
            for f in figures.values():
                if isinstance(f, dict):
                    f.pop("latencies", None)
                f.pop("lags", None)
        print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
