"""The web server under concurrent clients on loopback: lookups, enrollment, a baseline.

What it measures
    ``idvault serve`` (waitress, the product's WSGI server) is started as a
    separate process on a fresh embedded-default vault (SQLite, key file) on
    127.0.0.1 with the tiny face models, holding ``--identities`` identities
    of one owner. Client processes (``--clients``, each one keep-alive HTTP
    connection, so the clients' interpreter does not share the server's GIL)
    then run, each for ``--seconds``:

    1. baseline: ``GET /v1/health``: the minimal endpoint (routing, error and
       security-header layers, no auth, no database);
    2. auth: ``GET /v1/me``: the baseline plus API-key authentication (one
       indexed lookup and a hash);
    3. lookups by handle: ``GET /v1/identities/smiths/<random name>`` with an
       API key: authentication, a tenancy check and the identity's consent
       and artifact metadata (nothing decrypted);

    and then ``--enrollments`` enrollments (``POST .../enroll``, multipart,
    ``--photos`` synthetic photos each, a new synthetic person each, consent
    JSON) spread over the clients. Reported: requests per second, p50 and p99
    latency, the lookup/baseline ratio, and errors (any 5xx, connection
    failure, or a status other than the expected one). Nothing is asserted.

    Clients and server share this machine's cores, so the figures are what
    one small box serves to itself; on 2 cores the clients take a good part.

How to run
    .venv/bin/python bench/bench_web.py                    # ~1 min on 2 cores
    .venv/bin/python bench/bench_web.py --clients 16 --seconds 10 --threads 8
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
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]


def _consent() -> dict:
    import datetime as dt
    import hashlib

    return {"subject": "Bench Person", "given_by": "self", "purposes": ["enroll", "generate"],
            "retain_until": (dt.date.today() + dt.timedelta(days=365)).isoformat(),
            "evidence_sha256": hashlib.sha256(b"bench consent").hexdigest()}


def setup(root: Path, identities: int) -> tuple[str, Path]:
    """A vault with one owner, ``identities`` identities and an API key; the models dir."""
    sys.path.insert(0, str(ROOT))
    from encoders.standins.face_pack import write_tiny_face_pack
    from vault import api_keys
    from vault.config import Settings
    from vault.consent import ConsentRequest
    from vault.vault import Vault

    models = root / "models"
    write_tiny_face_pack(models / "models" / "buffalo_l")
    vault = Vault.init(Settings(data_dir=root / "vault"), actor="bench")
    vault.add_owner("smiths", "family", actor="bench")
    request = ConsentRequest.from_dict(_consent())
    for i in range(identities):
        vault.create_identity(f"smiths/p{i:05d}", request, actor="bench")
    with vault.session() as s:
        _, token = api_keys.create_key(s, "smiths", "bench", list(api_keys.SCOPES),
                                       actor="bench")
    vault.dispose()
    return token, models


def start_server(root: Path, models: Path, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "web.cli.main", "serve", "--data-dir", str(root / "vault"),
         "--host", "127.0.0.1", "--port", "0", "--threads", str(threads), "--models",
         str(models)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"serving on (http://\S+)", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("idvault serve did not start")


# -- client processes ---------------------------------------------------------------------
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
    kind, url, token, seconds, payload, seed = args
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    latencies, statuses, errors = [], {}, 0
    jobs = payload if kind == "enroll" else None
    end = time.perf_counter() + seconds
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
        i += 1
        t0 = time.perf_counter()
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
    return {"latencies": latencies, "statuses": statuses, "errors": errors}


def run_phase(kind: str, url: str, token: str, clients: int, seconds: float, payload,
              expected: tuple[int, ...]) -> dict:
    if kind == "enroll":
        shares = [payload[i::clients] for i in range(clients)]
        tasks = [(kind, url, token, seconds, share, n) for n, share in enumerate(shares)]
    else:
        tasks = [(kind, url, token, seconds, payload, n) for n in range(clients)]
    t0 = time.perf_counter()
    with mp.get_context("fork").Pool(clients) as pool:
        results = pool.map(_client, tasks)
    wall = time.perf_counter() - t0 if kind == "enroll" else seconds
    lat = sorted(x for r in results for x in r["latencies"])
    statuses: dict[int, int] = {}
    for r in results:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    unexpected = sum(v for k, v in statuses.items() if k not in expected)
    errors = sum(r["errors"] for r in results) + unexpected
    return {"requests": len(lat), "per_second": len(lat) / wall if wall else 0.0,
            "p50_ms": 1000 * statistics.median(lat) if lat else None,
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "statuses": statuses, "errors": errors, "seconds": wall}


def enrollment_payloads(n: int, photos: int, start: int = 10_000,
                        prefix: str = "e") -> list[tuple[str, bytes, str]]:
    sys.path.insert(0, str(ROOT))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent client processes")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each timed phase")
    ap.add_argument("--identities", type=int, default=1000, help="identities in the roster")
    ap.add_argument("--enrollments", type=int, default=40, help="enrollments to run")
    ap.add_argument("--photos", type=int, default=3, help="photos per enrollment")
    ap.add_argument("--threads", type=int, default=8, help="server worker threads")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="idvault-bench-web-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        token, models = setup(root, args.identities)
        payloads = enrollment_payloads(args.enrollments, args.photos)
        print(f"setup: {args.identities} identities, {args.enrollments} enrollment bodies "
              f"in {time.perf_counter() - t0:.1f} s")
        proc, url = start_server(root, models, args.threads)
        try:
            # Warm-up: load the face models, fill connection pools.
            run_phase("enroll", url, token, 1, 0, enrollment_payloads(1, 1, start=5, prefix="w"), (201,))
            run_phase("lookup", url, token, 2, 1.0, args.identities, (200,))
            figures = {
                "baseline": run_phase("health", url, token, args.clients, args.seconds, None,
                                      (200,)),
                "auth": run_phase("me", url, token, args.clients, args.seconds, None, (200,)),
                "lookup": run_phase("lookup", url, token, args.clients, args.seconds,
                                    args.identities, (200,)),
                "enroll": run_phase("enroll", url, token, args.clients, 0, payloads,
                                    (201, 409)),
            }
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"\nidvault serve (waitress, {args.threads} threads) on loopback; {args.clients} "
          f"client processes; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}"
          f"); Python {platform.python_version()}; SQLite; tiny face models\n")
    print(f"{'phase':<34} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>7}")
    labels = {"baseline": "GET /v1/health (baseline)", "auth": "GET /v1/me (API key)",
              "lookup": "GET /v1/identities/{handle}", "enroll": "POST .../enroll "
                                                          f"({args.photos} photos)"}
    for key, f in figures.items():
        print(f"{labels[key]:<34} {f['requests']:>9} {f['per_second']:>9.1f} "
              f"{f['p50_ms']:>8.1f} {f['p99_ms']:>8.1f} {f['errors']:>7}")
    base, look, enr = figures["baseline"], figures["lookup"], figures["enroll"]
    print(f"\nlookups by handle: {look['per_second']:.0f}/s = "
          f"{look['per_second'] / base['per_second']:.2f} x the baseline's "
          f"{base['per_second']:.0f}/s; p50 {look['p50_ms']:.1f} ms vs {base['p50_ms']:.1f} ms")
    print(f"enrollment: {enr['per_second']:.2f} enrollments/s "
          f"({enr['per_second'] * args.photos:.1f} photos/s); statuses {enr['statuses']}")
    total_errors = sum(f["errors"] for f in figures.values())
    print(f"errors under load: {total_errors}")
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
