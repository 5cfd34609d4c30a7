"""Scale-out, with real processes on loopback: two `idvault serve` API nodes (B without the
ML stack), Celery workers (`idvault worker`) over the local Redis, PostgreSQL.

These are the promises of docs/deployment.md: a job submitted anywhere runs on a worker
and gives what an in-process run gives; a killed worker's job is delivered again and
finishes once; one face enrolled through two servers at once lands once; an erasure or a
withdrawal through one server holds at once in the other; an API node never imports the
ML stack; a cpu-only worker never receives a GPU kind.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from tests.conftest import PgDatabases, require_pg
from tests.helpers import consent_doc
from tests.web.deployment import ML_STACK, Deployment
from tests.web.web_fixtures import photo_bytes
from vault import api_keys, audit
from vault.config import Settings
from vault.models import AuditEvent
from vault.vault import Vault

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

PROMPT = "@smiths/ana:girl reading by a window"
TERMINAL = ("done", "failed", "cancelled")


def require_redis() -> None:
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis at 127.0.0.1:6379 is not reachable: {exc} (.ci/run starts it)")
        pytest.skip(f"Redis at 127.0.0.1:6379 is not reachable: {exc}")


@pytest.fixture(scope="module")
def dep(tmp_path_factory, gen_models):
    """Servers A (with the ML stack installed) and B (without), workers W1 and W2."""
    import redis

    require_pg()
    require_redis()
    root = tmp_path_factory.mktemp("scale-out")
    dbs = PgDatabases()
    db = random.Random().randrange(1, 16)
    broker = f"redis://127.0.0.1:6379/{db}"
    redis.Redis.from_url(broker).flushdb()
    settings = Settings(data_dir=root / "data", database_url=dbs.create(),
                        keystore_url=dbs.create(), broker_url=broker, job_lease_seconds=2)
    with Vault.init(settings, actor="test") as v:
        v.add_owner("smiths", "family", actor="test")
        v.add_owner("northlight", "studio", erase_policy="retain", actor="test")
        with v.session() as s:
            _, key = api_keys.create_key(s, "smiths", "all", list(api_keys.SCOPES), actor="t")
            _, nl_key = api_keys.create_key(s, "northlight", "all", list(api_keys.SCOPES),
                                            actor="t")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "IDVAULT_DATA_DIR": str(settings.data_dir),
           "IDVAULT_DATABASE_URL": settings.database_url,
           "IDVAULT_KEYSTORE_URL": settings.keystore_url, "IDVAULT_BROKER_URL": broker,
           "IDVAULT_JOB_LEASE_SECONDS": "2", "IDVAULT_MODELS": str(gen_models)}
    d = Deployment(root, env)
    try:
        d.a, d.b = d.serve("server-a"), d.serve("server-b", ml=False)
        d.w1, d.w2 = d.worker("worker-1"), d.worker("worker-2")
        d.settings, d.models, d.key, d.nl_key = settings, gen_models, key, nl_key
        yield d
    finally:
        d.stop_all()
        redis.Redis.from_url(broker).flushdb()
        dbs.drop_all()


def _files(person: int, photos=(0, 1), name: str = "p"):
    return [("photos", (f"{name}{i}.jpg", photo_bytes(person, i))) for i in photos]


def enroll(server, key, handle: str, person: int, *, kinds: str = "face", photos=(0, 1)):
    owner, name = handle.split("/")
    r = server.post(f"/v1/identities/{owner}/{name}/enroll", key,
                    files=_files(person, photos, name),
                    data={"consent": json.dumps(consent_doc()), "kinds": kinds})
    assert r.status_code == 202, r.text  # an API node queues the enrollment for a worker
    assert r.json()["kind"] == "enroll" and r.json()["status"] == "queued"
    return r.json()


def wait(server, key, job_id: str, timeout: float = 120.0, until=TERMINAL) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = server.get(f"/v1/jobs/{job_id}", key).json()
        if job["status"] in until:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s: {job}")


def generate(server, key, **params) -> dict:
    r = server.post("/v1/jobs", key, json={"kind": "generate", "params": {
        "prompt": PROMPT, "seed": 3, "steps": 2, "size": [64, 64], **params}})
    assert r.status_code == 202, r.text
    return r.json()


@pytest.fixture(scope="module")
def ana(dep):
    job = wait(dep.b, dep.key, enroll(dep.b, dep.key, "smiths/ana", 1,
                                      kinds="face,photomaker")["id"])
    assert job["status"] == "done" and job["result"]["status"] == "active", job
    return job


def test_a_generation_from_a_server_runs_on_a_worker_as_it_would_in_process(dep, ana):
    from generators.compose import ComposePipeline
    from generators.provenance import verify_image

    job = wait(dep.b, dep.key, generate(dep.a, dep.key)["id"])
    assert job["status"] == "done", job
    assert _ran_on(dep, job["id"], "generate") in (dep.w1, dep.w2)
    png = dep.b.get(f"/v1/jobs/{job['id']}/image", dep.key)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    path = dep.root / "from-worker.png"
    path.write_bytes(png.content)
    with Vault.open(dep.settings) as v:
        theirs = verify_image(v, path)
        pipe = ComposePipeline.from_pretrained(None, vault=v, models_dir=dep.models)
        ours = pipe(PROMPT, owner="smiths", seed=3, steps=2, size=(64, 64))
    assert theirs.ok
    with Image.open(path) as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(ours.image))
    same = ("identities", "base_model", "adapters", "seed", "steps", "size", "prompt_sha256",
            "pixels", "vault", "type")
    assert {k: theirs.manifest[k] for k in same} == {k: ours.manifest[k] for k in same}


def _ran_on(dep, job_id: str, kind: str):
    """The worker whose log says it finished the job (it logs just after the commit)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for w in (dep.w1, dep.w2):
            if f"job {job_id} ({kind}): done" in w.text():
                return w
        time.sleep(0.05)
    return None


def _generate_events(v: Vault, job_id: str) -> list[AuditEvent]:
    with v.session(read_only=True) as s:
        return [e for e in s.scalars(select(AuditEvent).where(
            AuditEvent.action == "generate", AuditEvent.actor == f"job:{job_id}"))]


def test_a_killed_worker_s_job_is_delivered_again_and_finishes_once(dep, ana):
    rng = random.Random()
    # A pool process killed (Celery delivers the job again at once), then the whole worker
    # node (the other node's sweep sends it again once its lease is stale), then either.
    for target in ("pool", "node", rng.choice(["pool", "node"])):
        job = generate(dep.a, dep.key, steps=40, size=[128, 128], seed=rng.randrange(10**6))
        at = rng.uniform(0.1, 0.8)
        running = wait(dep.b, dep.key, job["id"], 120, until=("running", *TERMINAL))
        while running["status"] == "running" and running["progress"] < at:
            time.sleep(0.05)
            running = dep.b.get(f"/v1/jobs/{job['id']}", dep.key).json()
        assert running["status"] == "running", running
        worker = next(w for w in (dep.w1, dep.w2) if f"job {job['id']} (generate): running"
                      in w.text())
        if target == "pool":
            for child in worker.children():
                os.kill(child, signal.SIGKILL)
        else:
            worker.stop(signal.SIGKILL)
            for child in worker.children():
                os.kill(child, signal.SIGKILL)
            replacement = dep.worker(f"{worker.name}-after-{job['id'][:6]}")
            if worker is dep.w1:
                dep.w1 = replacement
            else:
                dep.w2 = replacement
        done = wait(dep.b, dep.key, job["id"], 180)
        assert done["status"] == "done" and done["attempts"] == 2, (target, done)
        with Vault.open(dep.settings) as v:
            events = _generate_events(v, job["id"])
            assert [e.subject for e in events] == ["smiths/ana"], (target, events)
            assert events[0].details["generation"] == done["result"]["generation_id"]
            assert v.verify_audit().ok
        assert (dep.settings.data_dir / done["result"]["image"]).is_file()


def test_one_face_enrolled_through_both_servers_at_once_lands_once(dep):
    jobs: dict[str, dict] = {}
    barrier = threading.Barrier(2)

    def submit(server, name: str) -> None:
        barrier.wait()
        jobs[name] = enroll(server, dep.key, f"smiths/{name}", 5)

    threads = [threading.Thread(target=submit, args=(dep.a, "eve")),
               threading.Thread(target=submit, args=(dep.b, "evie"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ends = {n: wait(dep.a, dep.key, j["id"]) for n, j in jobs.items()}
    stored = {n: e for n, e in ends.items() if e["status"] == "done"}
    refused = {n: e for n, e in ends.items() if e["status"] == "failed"}
    assert len(stored) == 1 and len(refused) == 1, ends
    (winner,), (loser,) = stored, refused
    assert stored[winner]["result"]["status"] == "active"
    assert f"match smiths/{winner}" in refused[loser]["error"], refused[loser]
    assert dep.b.get(f"/v1/identities/smiths/{loser}", dep.key).status_code == 404
    assert dep.b.get(f"/v1/identities/smiths/{winner}", dep.key).status_code == 200


def test_erasure_and_withdrawal_through_one_server_hold_at_once_in_the_other(dep, ana):
    cleo = wait(dep.a, dep.key, enroll(dep.a, dep.key, "smiths/cleo", 3)["id"])
    assert cleo["status"] == "done", cleo
    gone = dep.a.delete("/v1/identities/smiths/cleo", dep.key)
    assert gone.status_code == 200, gone.text
    assert dep.b.get("/v1/identities/smiths/cleo", dep.key).status_code == 404
    # The workers searched their indexes with cleo in them: the next search must not match.
    again = wait(dep.b, dep.key, enroll(dep.b, dep.key, "smiths/cleo-again", 3)["id"])
    assert again["status"] == "done", again
    assert again["result"]["status"] == "active" and not (
        again["result"]["top_match"] or {}).get("handle", "").endswith("/cleo")

    sol = wait(dep.a, dep.nl_key, enroll(dep.a, dep.nl_key, "northlight/sol", 6)["id"])
    assert sol["status"] == "done", sol
    assert dep.a.post("/v1/identities/northlight/sol/consent/withdraw", dep.nl_key,
                      json={}).status_code == 200
    refused = dep.b.post("/v1/jobs", dep.nl_key, json={"kind": "generate", "params": {
        "prompt": "@northlight/sol reading", "steps": 2, "size": [64, 64]}})
    assert refused.status_code in (403, 409) and "withdrawn" in refused.text, refused.text
    again = wait(dep.b, dep.nl_key, enroll(dep.b, dep.nl_key, "northlight/sol-2", 6)["id"])
    assert again["status"] == "done" and again["result"]["status"] == "active", again


def test_an_api_node_without_the_ml_stack_serves_the_api_and_queues_model_work(dep, ana):
    b, key = dep.b, dep.key
    assert b.get("/v1/identities/smiths/ana", key).json()["status"] == "active"
    assert b.get("/v1/identities", key).status_code == 200
    assert b.get("/v1/identities/smiths/ana/artifacts", key).status_code == 200
    assert b.get("/v1/openapi.json", key).status_code == 200
    assert b.get("/v1/audit/verify", key).json()["ok"] is True
    check = b.post("/v1/photos/check", key, files=_files(1))
    assert check.status_code == 503 and "no face models" in check.text
    queued = enroll(b, key, "smiths/dan", 4)
    assert wait(b, key, queued["id"])["status"] == "done"
    assert wait(b, key, generate(b, key)["id"])["status"] == "done"
    assert requests_ok(b.url + "/login")
    assert dep.imports_refused(b) == [], "the API node tried to import the ML stack"
    # The control: in B's environment the ML stack is refused, and the attempt recorded.
    control = dep.root / "control-imports.log"
    for module in ("torch", "onnxruntime", "insightface", "diffusers"):
        assert module in ML_STACK
        ran = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True,
                             text=True, env={**b.env, "IDVAULT_TEST_IMPORT_LOG": str(control)})
        assert ran.returncode != 0 and "not installed on this API node" in ran.stderr
    assert control.read_text().split() == ["torch", "onnxruntime", "insightface", "diffusers"]


def requests_ok(url: str) -> bool:
    import requests

    return requests.get(url, timeout=10).status_code == 200


def test_a_cpu_only_worker_never_receives_a_gpu_kind(dep, ana):
    from web.workers.celery_app import TASK, app_for

    cpu = dep.worker("worker-cpu", queues="cpu", warm=False)
    for w in (dep.w1, dep.w2):  # only the cpu worker is left
        w.stop()
    try:
        gen = generate(dep.a, dep.key)
        face = enroll(dep.a, dep.key, "smiths/finn", 7)
        assert wait(dep.a, dep.key, face["id"])["status"] == "done"
        cpu.wait_for(rf"job {face['id']} \(enroll\): done", 30)
        # A GPU kind's id sent straight to the cpu queue is sent on, not run.
        app_for(dep.settings.broker_url).send_task(TASK, args=[gen["id"]], queue="cpu")
        cpu.wait_for(rf"job {gen['id']} \(generate\) was delivered to queues cpu", 60)
        assert dep.a.get(f"/v1/jobs/{gen['id']}", dep.key).json()["status"] == "queued"
        assert f"job {gen['id']} (generate): running" not in cpu.text()
        dep.w1 = dep.worker("worker-gpu", queues="gpu")
        assert wait(dep.a, dep.key, gen["id"])["status"] == "done"
        dep.w1.wait_for(rf"job {gen['id']} \(generate\): done", 30)
        assert "(generate): running" not in cpu.text()
    finally:
        cpu.stop()


def test_the_audit_chain_holds_after_everything(dep):
    with Vault.open(dep.settings) as v:
        assert v.verify_audit().ok
        with v.session(read_only=True) as s:
            assert audit.events(s, limit=1)
