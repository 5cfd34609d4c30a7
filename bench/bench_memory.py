"""The server's resident memory: after start, after lookups, with the face pack loaded.

What it measures
    ``idvault serve`` is started as its own process tree (the command a user
    runs, on the embedded default: SQLite and a key file) on a fresh vault
    with one owner and ``--identities`` identities, and a models directory
    holding buffalo_l's layout with the **full-size** ArcFace R50 recogniser
    (IResNet-50, random weights, as ``bench_face.py`` builds it) and the tiny
    stand-in detector. Read from ``/proc`` for every process of the tree:

    1. after start: RSS and PSS (proportional set size: pages shared between
       forked workers are counted once in the sum), and which heavy native
       libraries are mapped (torch, onnxruntime, faiss, OpenCV, numpy);
    2. after ``--lookups`` lookups by handle over HTTP with an API key;
    3. after one enrollment of a synthetic person (the face pack loaded, the
       owner's dedupe index built): what serving an enrollment costs.

    A library counts as loaded when its shared object is mapped into a
    process: this reads the server from outside, with no instrumentation.
    Nothing is asserted (tests/web/test_imports.py asserts which modules a
    server imports); it prints.

How to run
    .venv/bin/python bench/bench_memory.py                  # ~30 s on 2 cores
    .venv/bin/python bench/bench_memory.py -- --workers 2   # extra serve options
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import http.client
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[1]

# Shared objects that mark a heavy library as loaded into a process.
LIBRARIES = {
    "torch": re.compile(r"/torch/lib/libtorch"),
    "onnxruntime": re.compile(r"/onnxruntime/capi/.*\.so"),
    "faiss": re.compile(r"/faiss/_swigfaiss.*\.so"),
    "opencv": re.compile(r"/cv2/.*\.so"),
    "numpy": re.compile(r"/numpy/(_core|core)/_multiarray_umath.*\.so"),
}


def _consent() -> dict:
    return {"subject": "Bench Person", "given_by": "self", "purposes": ["enroll", "generate"],
            "retain_until": (dt.date.today() + dt.timedelta(days=365)).isoformat(),
            "evidence_sha256": hashlib.sha256(b"bench consent").hexdigest()}


def setup(root: Path, identities: int) -> tuple[str, Path]:
    """A vault with one owner, ``identities`` identities, an API key; the R50 models dir."""
    sys.path.insert(0, str(ROOT))
    from encoders.standins.arcface_r50 import export_random_arcface_r50
    from encoders.standins.face_pack import write_tiny_face_pack
    from vault import api_keys
    from vault.config import Settings
    from vault.consent import ConsentRequest
    from vault.vault import Vault

    models = root / "models"
    pack = write_tiny_face_pack(models / "models" / "buffalo_l")
    export_random_arcface_r50(pack / "w600k_r50.onnx")  # the full-size recogniser
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


def start_server(root: Path, models: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "web.cli.main", "serve", "--data-dir", str(root / "vault"),
         "--host", "127.0.0.1", "--port", "0", "--models", str(models), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
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


# -- reading /proc ---------------------------------------------------------------------------
def tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            continue
    return out


def _kib(text: str, field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def snapshot(pid: int) -> dict:
    """RSS and PSS (MiB) summed over the tree, per process, and the libraries mapped."""
    procs, libs = [], set()
    for p in tree(pid):
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
            maps = Path(f"/proc/{p}/maps").read_text()
        except OSError:
            continue
        procs.append({"pid": p, "rss_mib": _kib(rollup, "Rss") / 1024,
                      "pss_mib": _kib(rollup, "Pss") / 1024})
        libs |= {name for name, pat in LIBRARIES.items() if pat.search(maps)}
    return {"processes": procs, "rss_mib": sum(p["rss_mib"] for p in procs),
            "pss_mib": sum(p["pss_mib"] for p in procs), "libraries": sorted(libs)}


# -- requests ------------------------------------------------------------------------------
def lookups(url: str, token: str, n: int, identities: int) -> int:
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    ok = 0
    for i in range(n):
        conn.request("GET", f"/v1/identities/smiths/p{i % identities:05d}",
                     headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        resp.read()
        ok += resp.status == 200
    conn.close()
    return ok


def enroll(url: str, token: str) -> int:
    from PIL import Image

    from bench.bench_web import _multipart
    from encoders.standins.synthetic_faces import synthetic_face

    buf = io.BytesIO()
    Image.fromarray(synthetic_face(90_001, 0)).save(buf, "JPEG", quality=90)
    body, ctype = _multipart([buf.getvalue()], _consent())
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    conn.request("POST", "/v1/identities/smiths/newcomer/enroll", body=body,
                 headers={"Authorization": f"Bearer {token}", "Content-Type": ctype})
    resp = conn.getresponse()
    text = resp.read()
    conn.close()
    if resp.status >= 300:
        print(f"  enrollment answered {resp.status}: {text[:300]!r}")
    return resp.status


def show(label: str, snap: dict) -> None:
    per = ", ".join(f"{p['rss_mib']:.0f}" for p in snap["processes"])
    print(f"{label:<28} RSS {snap['rss_mib']:7.1f} MiB  PSS {snap['pss_mib']:7.1f} MiB  "
          f"({len(snap['processes'])} process(es): {per} MiB)  "
          f"loaded: {', '.join(snap['libraries']) or 'none of the heavy libraries'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Arguments after '--' are passed to idvault serve.")
    parser.add_argument("--identities", type=int, default=1000)
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("serve_args", nargs="*", help="extra `idvault serve` options")
    args = parser.parse_args(argv)
    print(f"# bench_memory: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="idvault-mem-") as tmp:
        root = Path(tmp)
        token, models = setup(root, args.identities)
        proc, url = start_server(root, models, args.serve_args)
        try:
            time.sleep(1.0)  # let workers finish starting
            figures = {"start": snapshot(proc.pid)}
            show("after start", figures["start"])
            ok = lookups(url, token, args.lookups, args.identities)
            figures["lookups"] = snapshot(proc.pid)
            show(f"after {ok} lookups", figures["lookups"])
            t0 = time.perf_counter()
            status = enroll(url, token)
            figures["enrolled"] = snapshot(proc.pid)
            figures["enroll_status"] = status
            show(f"after 1 enrollment ({time.perf_counter() - t0:.1f} s)", figures["enrolled"])
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
