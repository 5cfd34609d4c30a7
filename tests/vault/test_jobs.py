"""Jobs: pluggable kinds, submit/status/progress, cancel, failures, resume after restart."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest
from sqlalchemy import update

from tests.helpers import consent
from vault.errors import Conflict, InvalidInput, NotFound
from vault.jobs import REGISTRY, JobContext, JobKind, JobQueue, describe_kinds
from vault.models import JobLease, utcnow


@pytest.fixture
def kinds():
    """A private registry with test kinds (the global one holds the built-ins)."""
    log: list = []

    def count(ctx: JobContext) -> dict:
        start = (ctx.checkpoint or {}).get("i", 0)
        for i in range(start, ctx.params["n"]):
            log.append((ctx.attempt, i))
            ctx.save_checkpoint({"i": i + 1})
            ctx.progress((i + 1) / ctx.params["n"], f"step {i + 1}")
            if ctx.params.get("die_at") == i and ctx.attempt == 1:
                raise SystemExit  # the worker "dies": no status is written
        return {"counted": ctx.params["n"], "resumed_from": start}

    def validate(params: dict) -> dict:
        if not isinstance(params.get("n"), int) or not 0 < params["n"] <= 100:
            raise InvalidInput("'n' must be an integer from 1 to 100")
        return params

    def wait(ctx: JobContext) -> dict:
        while True:
            ctx.progress(0.5, "waiting")
            time.sleep(0.01)

    def boom(ctx: JobContext) -> dict:
        raise RuntimeError("secret internals")

    reg = {k.name: k for k in (
        JobKind("count", count, scope="generate", validate=validate),
        JobKind("wait", wait),
        JobKind("boom", boom),
        JobKind("per_person", lambda ctx: {"who": ctx.identity}, needs_identity=True),
    )}
    reg.update(log=log)  # type: ignore[arg-type]
    return reg


def queue(vault, kinds, **kw) -> JobQueue:
    reg = {k: v for k, v in kinds.items() if isinstance(v, JobKind)}
    return JobQueue(vault, registry=reg, **kw)


def test_submit_run_and_read(family, kinds):
    q = queue(family, kinds)
    job = q.submit("smiths", "count", {"n": 3}, actor="test")
    assert job["status"] == "queued" and job["progress"] == 0
    assert q.run_pending() == 1
    done = q.get(job["id"], owner="smiths")
    assert done["status"] == "done" and done["progress"] == 1.0
    assert done["result"] == {"counted": 3, "resumed_from": 0} and done["attempts"] == 1
    assert done["message"] == "step 3" and done["finished_at"]
    assert [j["id"] for j in q.list("smiths")] == [job["id"]]
    assert q.list("smiths", status="queued") == []
    with pytest.raises(NotFound):
        q.get(job["id"], owner="northlight")  # another owner's job does not exist
    with pytest.raises(NotFound):
        q.get("nonsense")
    with pytest.raises(InvalidInput, match="unknown job kind"):
        q.submit("smiths", "paint", {})
    with pytest.raises(InvalidInput, match="'n'"):
        q.submit("smiths", "count", {"n": "3"})
    with pytest.raises(InvalidInput, match="JSON object"):
        q.submit("smiths", "count", [1])  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="limited"):
        q.submit("smiths", "wait", {"blob": "x" * 70_000})


def test_jobs_for_an_identity(family, kinds):
    q = queue(family, kinds)
    with pytest.raises(InvalidInput, match="needs an identity"):
        q.submit("smiths", "per_person", {})
    family.create_identity("smiths/ana", consent())
    with pytest.raises(NotFound):
        q.submit("northlight", "per_person", {}, identity="smiths/ana")
    job = q.submit("smiths", "per_person", {}, identity="smiths/ana")
    assert job["identity"] == "smiths/ana"
    q.run_pending()
    assert q.get(job["id"])["result"] == {"who": "smiths/ana"}
    family.delete_identity("smiths/ana")  # its jobs go with it
    with pytest.raises(NotFound):
        q.get(job["id"])


def test_cancel(family, kinds):
    q = queue(family, kinds)
    queued = q.submit("smiths", "count", {"n": 2})
    assert q.cancel(queued["id"], owner="smiths")["status"] == "cancelled"
    with pytest.raises(Conflict):
        q.cancel(queued["id"])
    with pytest.raises(NotFound):
        q.cancel(queued["id"], owner="northlight")
    running = q.submit("smiths", "wait", {})
    worker = threading.Thread(target=q.run_one)
    worker.start()
    for _ in range(200):
        if q.get(running["id"])["status"] == "running":
            break
        time.sleep(0.01)
    q.cancel(running["id"])
    worker.join(10)
    assert not worker.is_alive()
    final = q.get(running["id"])
    assert final["status"] == "cancelled" and final["cancel_requested"]


def test_a_failing_job_keeps_its_internals_to_the_log(family, kinds, caplog):
    q = queue(family, kinds)
    job = q.submit("smiths", "boom", {})
    q.run_pending()
    failed = q.get(job["id"])
    assert failed["status"] == "failed" and "RuntimeError" in failed["error"]
    assert "secret internals" not in failed["error"] and "secret internals" in caplog.text


def test_resume_after_a_restart(family, kinds):
    """A worker dies mid-job; a new process finds the stale lease, queues the job again,
    and the job resumes from its checkpoint."""
    first = queue(family, kinds)
    job = first.submit("smiths", "count", {"n": 5, "die_at": 2})
    with pytest.raises(SystemExit):
        first.run_one()
    assert first.get(job["id"])["status"] == "running"  # the row says so; nobody runs it
    # A new process (restart): the lease is stale once lease_seconds pass without a beat.
    second = queue(family, kinds, lease_seconds=30)
    assert second.recover() == 0  # still fresh: its worker may be alive
    with family.session() as s:
        s.execute(update(JobLease).values(heartbeat_at=utcnow() - dt.timedelta(seconds=31)))
    assert second.recover() == 1
    assert second.get(job["id"])["status"] == "queued"
    assert "resuming" in second.get(job["id"])["message"]
    second.run_pending()
    done = second.get(job["id"])
    assert done["status"] == "done" and done["attempts"] == 2
    assert done["result"] == {"counted": 5, "resumed_from": 3}
    assert kinds["log"] == [(1, 0), (1, 1), (1, 2), (2, 3), (2, 4)]


def test_gives_up_after_max_attempts(family, kinds):
    q = queue(family, kinds, lease_seconds=0.1, max_attempts=2)
    job = q.submit("smiths", "count", {"n": 3})
    claimed = q.claim()
    assert claimed is not None
    with family.session() as s:
        s.execute(update(JobLease).values(attempts=2,
                                          heartbeat_at=utcnow() - dt.timedelta(minutes=1)))
    assert q.recover() == 1
    failed = q.get(job["id"])
    assert failed["status"] == "failed" and "stopped 2 times" in failed["error"]


def test_workers_claim_only_their_kinds(family, kinds):
    gpu = queue(family, {"count": kinds["count"]})
    api = queue(family, {"wait": kinds["wait"]})
    job = gpu.submit("smiths", "count", {"n": 1})
    assert api.run_one() is None  # not a kind it runs
    assert gpu.run_one() == "done"
    assert gpu.get(job["id"])["status"] == "done"


def test_the_embedded_worker_thread(family, kinds):
    q = queue(family, kinds, poll_seconds=0.05)
    q.start()
    try:
        assert q.running
        job = q.submit("smiths", "count", {"n": 2})
        for _ in range(300):
            if q.get(job["id"])["status"] == "done":
                break
            time.sleep(0.02)
        assert q.get(job["id"])["status"] == "done"
    finally:
        q.stop()
    assert not q.running


def test_built_in_kinds_and_the_registry(family):
    assert "rebuild_index" in REGISTRY
    assert any(k["kind"] == "rebuild_index" and k["scope"] == "admin"
               for k in describe_kinds())
    q = JobQueue(family)
    job = q.submit("smiths", "rebuild_index")
    q.run_pending()
    assert q.get(job["id"])["result"] == {"identities": 0, "vectors": 0}
    from vault.jobs import register_kind, unregister_kind

    kind = JobKind("plugin_kind", lambda ctx: None)
    register_kind(kind)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_kind(JobKind("plugin_kind", lambda ctx: None))
        assert any(k["kind"] == "plugin_kind" for k in describe_kinds())
    finally:
        unregister_kind("plugin_kind")
    with pytest.raises(ValueError):
        register_kind(JobKind("x" * 40, lambda ctx: None))


def test_preflight_refuses_at_submission(family):
    seen: list = []

    def preflight(vault, owner: str, params: dict) -> None:
        seen.append((vault is family, owner, params))
        if params.get("who") != owner:
            raise NotFound(f"no identity {params.get('who')}")

    q = JobQueue(family, registry={"checked": JobKind(
        "checked", lambda ctx: {}, validate=lambda p: {**p, "checked": True},
        preflight=preflight)})
    with pytest.raises(NotFound, match="no identity northlight"):
        q.submit("smiths", "checked", {"who": "northlight"})
    assert q.list("smiths") == []  # nothing queued
    job = q.submit("smiths", "checked", {"who": "smiths"})
    assert job["status"] == "queued"
    # It sees the validated params and the submitting owner.
    assert seen[-1] == (True, "smiths", {"who": "smiths", "checked": True})


def test_a_job_the_broker_could_not_take_stays_queued_for_the_sweep(family) -> None:
    """Scale-out: the job row commits first; a dispatch that fails leaves it queued and
    unsent, and the workers' sweep (JobQueue.lost) finds it to send again."""
    from vault.jobs import JobQueue

    def broker_away(job_id: str, kind: str, queue: str) -> None:
        raise ConnectionError("redis: connection refused")

    sent: list[tuple] = []
    q = JobQueue(family, dispatch=broker_away)
    job = q.submit("smiths", "rebuild_index", {}, actor="test")
    assert q.get(job["id"])["status"] == "queued"
    assert [j[0] for j in q.lost(grace=0.0, resend_after=3600.0)] == [job["id"]]
    q.dispatch = lambda *j: sent.append(j)
    assert q.send(job["id"], "rebuild_index", {})
    assert sent == [(job["id"], "rebuild_index", "cpu")]
    assert q.lost(grace=0.0, resend_after=3600.0) == []  # sent now: not again within the hour
    assert [j[0] for j in q.lost(grace=0.0, resend_after=0.0)] == [job["id"]]


def test_a_job_past_its_time_limit_fails_at_its_next_progress_report(family) -> None:
    import time

    from vault.jobs import JobKind, JobQueue

    reports: list[int] = []

    def slow(ctx) -> dict:
        for step in range(100):
            time.sleep(0.02)
            ctx.progress(step / 100, f"step {step}")
            reports.append(step)
        return {"finished": True}

    q = JobQueue(family, registry={"slow": JobKind("slow", slow, time_limit=0.1)})
    job = q.submit("smiths", "slow")
    assert q.run_pending() == 1
    ended = q.get(job["id"])
    assert ended["status"] == "failed" and "time limit of 0 s" in ended["error"]
    assert ended["result"] is None and 0 < len(reports) < 100
