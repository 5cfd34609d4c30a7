"""Scale-out on loopback: job throughput with 1 and 2 workers, queue-to-start latency,
lookups through one and two API processes on PostgreSQL, and erasure across processes.

What it measures
    A scale-out deployment of real processes (``tests/web/deployment.py``): API nodes
    (``idvault serve`` with a broker), Celery workers (``idvault worker``, one process
    each) over the local Redis, the data and key-store databases on the local
    PostgreSQL, the tiny models of ``idvault models tiny``.

    1. Jobs: ``generate`` jobs of the tiny SDXL stand-in (2 steps, 64x64, one
       PhotoMaker identity), first with one worker, then with two, in the same run:
       - queue-to-start latency, p50 and p99: ``started_at - created_at`` of
         ``--latency-jobs`` jobs submitted one at a time on an idle system (what
         dispatch costs: the commit, the broker, the worker's claim);
       - throughput: ``--burst`` jobs submitted at once, jobs per minute from the
         first submission to the last one done.
    2. Lookups by handle, ``GET /v1/identities/smiths/<name>`` with an API key over
       ``--identities`` identities: ``--clients`` client processes (each one keep-alive
       connection; ``bench_web.py``'s client) against one API process, then split
       over two, for ``--seconds`` each, in the same run: requests per second, p50,
       p99, errors.
    3. Erasure across processes, ``--erasures`` rounds: a person enrolled through
       server A (a worker searched and indexed them), erased through A; the moment
       A answers, the same photos are enrolled through server B as someone new. The
       worker's search must not match the erased person. Reported: matches (goal 0)
       and how soon after A's answer B's search ran.

    Each worker runs its jobs on one thread (``OMP_NUM_THREADS=1``: a worker per core,
    as one per GPU on a GPU machine) and has run a generation before it is timed
    (models and methods loaded). The clients, servers and workers share this
    machine's cores: read ratios against the baseline of the same run, not absolute
    figures.

How to run
    .venv/bin/python bench/bench_scale_out.py            # ~3 min on 2 cores
    .venv/bin/python bench/bench_scale_out.py --burst 40 --clients 8 --seconds 10

    Needs PostgreSQL (``IDVAULT_TEST_PG``, default the local server) and Redis on
    127.0.0.1:6379, as the test suite does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPT = "@smiths/ana:girl reading by a window"


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def setup(root: Path, identities: int):
    import redis

    from tests.conftest import PgDatabases
    from tests.helpers import consent
    from vault import api_keys
    from vault.config import Settings
    from vault.vault import Vault
    from web.cli.main import main

    dbs = PgDatabases()
    broker = f"redis://127.0.0.1:6379/{random.randrange(1, 16)}"
    redis.Redis.from_url(broker).flushdb()
    settings = Settings(data_dir=root / "data", database_url=dbs.create(),
                        keystore_url=dbs.create(), broker_url=broker)
    models = root / "models"
    assert main(["models", "tiny", str(models)]) == 0
    with Vault.init(settings, actor="bench") as v:
        v.add_owner("smiths", "family", actor="bench")
        for i in range(identities):
            v.create_identity(f"smiths/p{i:05d}", consent())
        with v.session() as s:
            _, key = api_keys.create_key(s, "smiths", "bench", list(api_keys.SCOPES),
                                         actor="bench")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT),
           "IDVAULT_DATA_DIR": str(settings.data_dir),
           "IDVAULT_DATABASE_URL": settings.database_url,
           "IDVAULT_KEYSTORE_URL": settings.keystore_url, "IDVAULT_BROKER_URL": broker,
           "IDVAULT_MODELS": str(models)}
    return dbs, broker, settings, key, env


def wait(server, key: str, job_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = server.get(f"/v1/jobs/{job_id}", key).json()
        if job["status"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    raise TimeoutError(job_id)


def submit(server, key: str, seed: int) -> dict:
    r = server.post("/v1/jobs", key, json={"kind": "generate", "params": {
        "prompt": PROMPT, "seed": seed, "steps": 2, "size": [64, 64]}})
    r.raise_for_status()
    return r.json()


def _seconds(a: str, b: str) -> float:
    import datetime as dt

    return (dt.datetime.fromisoformat(b) - dt.datetime.fromisoformat(a)).total_seconds()


def warm(server, key: str, worker) -> None:
    """Until ``worker`` has made a generation (its first loads the method's weights)."""
    for attempt in range(20):
        if "(generate): done" in worker.text():
            return
        ids = [submit(server, key, 100 + attempt * 2 + i)["id"] for i in range(2)]
        for i in ids:
            wait(server, key, i)
    raise RuntimeError(f"{worker.name} ran no generation")


def jobs_phase(server, key: str, latency_jobs: int, burst: int) -> dict:
    waits = []
    for i in range(latency_jobs):
        job = wait(server, key, submit(server, key, 1000 + i)["id"])
        assert job["status"] == "done", job
        waits.append(_seconds(job["created_at"], job["started_at"]))
    t0 = time.perf_counter()
    ids = [submit(server, key, 5000 + i)["id"] for i in range(burst)]
    ends = [wait(server, key, i) for i in ids]
    wall = time.perf_counter() - t0
    assert all(e["status"] == "done" for e in ends), [e for e in ends if e["status"] != "done"]
    return {"latency_p50_ms": 1000 * statistics.median(waits),
            "latency_p99_ms": 1000 * _pct(waits, 0.99),
            "jobs_per_minute": 60 * burst / wall, "burst_seconds": wall}


def lookups(urls: list[str], key: str, clients: int, seconds: float, identities: int) -> dict:
    import multiprocessing as mp

    from bench_web import _client

    tasks = [("lookup", urls[n % len(urls)], key, seconds, identities, n)
             for n in range(clients)]
    with mp.get_context("fork").Pool(clients) as pool:
        results = pool.map(_client, tasks)
    lat = sorted(x for r in results for x in r["latencies"])
    bad = sum(v for r in results for k, v in r["statuses"].items() if k != 200)
    return {"per_second": len(lat) / seconds, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * _pct(lat, 0.99),
            "errors": sum(r["errors"] for r in results) + bad}


def erasures(a, b, key: str, rounds: int) -> dict:
    from tests.helpers import consent_doc
    from tests.web.web_fixtures import photo_bytes

    def enroll(server, name: str, person: int) -> dict:
        files = [("photos", (f"{name}{i}.jpg", photo_bytes(person, i))) for i in (0, 1)]
        r = server.post(f"/v1/identities/smiths/{name}/enroll", key, files=files,
                        data={"consent": json.dumps(consent_doc())})
        r.raise_for_status()
        return r.json()

    matches, gaps = 0, []
    for i in range(rounds):
        person, name = 300 + i, f"gone{i}"
        first = wait(a, key, enroll(a, name, person)["id"])
        assert first["status"] == "done", first
        a.delete(f"/v1/identities/smiths/{name}", key).raise_for_status()
        answered = time.time()
        again = wait(b, key, enroll(b, f"back{i}", person)["id"])
        assert again["status"] == "done", again
        top = (again["result"] or {}).get("top_match") or {}
        matches += top.get("handle") == f"smiths/{name}"
        import datetime as dt

        started = dt.datetime.fromisoformat(again["started_at"]).timestamp()
        gaps.append(started - answered)
    return {"rounds": rounds, "matched_the_erased": matches,
            "search_after_erasure_ms_min": 1000 * min(gaps),
            "search_after_erasure_ms_p50": 1000 * statistics.median(gaps)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-jobs", type=int, default=20)
    ap.add_argument("--burst", type=int, default=30)
    ap.add_argument("--identities", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--erasures", type=int, default=10)
    args = ap.parse_args(argv)

    import redis

    from tests.web.deployment import Deployment

    root = Path(tempfile.mkdtemp(prefix="idvault-bench-scale-"))
    load0 = os.getloadavg()
    dbs, broker, settings, key, env = setup(root, args.identities)
    d = Deployment(root, env)
    out: dict = {"machine": f"{platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} cores", "load_at_start": load0}
    try:
        a, b = d.serve("server-a", ml=False), d.serve("server-b", ml=False)
        one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        w1 = d.worker("worker-1", env=one_thread)
        from tests.helpers import consent_doc
        from tests.web.web_fixtures import photo_bytes

        files = [("photos", (f"ana{i}.jpg", photo_bytes(1, i))) for i in (0, 1)]
        r = a.post("/v1/identities/smiths/ana/enroll", key, files=files,
                   data={"consent": json.dumps(consent_doc()), "kinds": "face,photomaker"})
        assert wait(a, key, r.json()["id"])["status"] == "done"
        warm(a, key, w1)
        print("jobs, 1 worker ...", file=sys.stderr)
        out["jobs_1_worker"] = jobs_phase(a, key, args.latency_jobs, args.burst)
        w2 = d.worker("worker-2", env=one_thread)
        warm(a, key, w2)
        print("jobs, 2 workers ...", file=sys.stderr)
        out["jobs_2_workers"] = jobs_phase(a, key, args.latency_jobs, args.burst)
        print("erasures ...", file=sys.stderr)
        out["erasure_across_processes"] = erasures(a, b, key, args.erasures)
        for w in (w1, w2):  # idle, but off the cores the lookups share
            w.stop()
        print("lookups ...", file=sys.stderr)
        a.get("/v1/identities/smiths/p00000", key)
        b.get("/v1/identities/smiths/p00000", key)
        out["lookups_1_server"] = lookups([a.url], key, args.clients, args.seconds,
                                          args.identities)
        out["lookups_2_servers"] = lookups([a.url, b.url], key, args.clients, args.seconds,
                                           args.identities)
        one, two = out["jobs_1_worker"], out["jobs_2_workers"]
        out["ratios"] = {
            "jobs_per_minute_2_over_1": two["jobs_per_minute"] / one["jobs_per_minute"],
            "lookups_2_over_1": (out["lookups_2_servers"]["per_second"]
                                 / out["lookups_1_server"]["per_second"])}
        out["load_at_end"] = os.getloadavg()
    finally:
        d.stop_all()
        redis.Redis.from_url(broker).flushdb()
        dbs.drop_all()
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
