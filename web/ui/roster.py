"""The roster, the enrollment wizard and the identity page."""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, redirect, request, url_for
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from vault import audit, identities
from vault.consent import PURPOSES
from vault.errors import (
    ConsentError,
    DuplicateIdentity,
    InvalidInput,
    ModelUnavailable,
    NotFound,
    PhotoRejected,
    VaultError,
)
from vault.models import Identity, Owner
from web.api.artifacts import download_artifact
from web.api.enrollment import (
    MAX_EVIDENCE_BYTES,
    enroll_photos,
    identity_exists,
    parse_kinds,
    parse_pick,
    queue_enrollment,
    safe_names,
    scale_out,
)
from web.api.identities import parse_consent
from web.api.personalization import base_models, parse_form, queue_fit
from web.auth import handle_in_owner, ui_login_required
from web.ui.common import me, notice, page, state
from web.ui.receipts import show as show_receipt

bp = Blueprint("roster", __name__)
PAGE = 50
EVENTS = 50  # the identity page's audit trail; the rest on the audit page


@bp.route("/")
@ui_login_required("identities:read")
def roster():
    p = me()
    cursor = request.args.get("after", "")[:64]
    status = request.args.get("status") or None
    with state().vault.session() as s:
        owner = identities.get_owner(s, p.owner)
        q = (select(Identity).where(Identity.owner_id == owner.id).order_by(Identity.name)
             .limit(PAGE + 1).options(selectinload(Identity.consents),
                                      selectinload(Identity.owner),
                                      selectinload(Identity.artifacts)))
        if cursor:
            q = q.where(Identity.name > cursor)
        if status in ("active", "held", "withdrawn"):
            q = q.where(Identity.status == status)
        rows = list(s.scalars(q))
        total = identities.count_identities(s, p.owner)
    more = len(rows) > PAGE
    people = [identities.describe_identity(i) for i in rows[:PAGE]]
    pending = len(state().vault.list_reviews(p.owner))
    return page("roster.html", people=people, total=total, pending=pending, status=status,
                next_cursor=people[-1]["handle"].split("/")[1] if more else None)


def _consent_doc(form) -> dict:
    doc = {"subject": form.get("subject", "").strip(),
           "given_by": form.get("given_by", ""),
           # 'enroll' is always granted: the wizard shows it ticked and disabled.
           "purposes": list(dict.fromkeys(["enroll", *form.getlist("purposes")])),
           "retain_until": form.get("retain_until", "")}
    if doc["given_by"] == "guardian":
        doc["guardian_name"] = form.get("guardian_name", "").strip()
    if form.get("evidence_sha256", "").strip():
        doc["evidence_sha256"] = form.get("evidence_sha256", "").strip().lower()
    return doc


def _wizard(status: int = 200, **ctx):
    default_retain = (dt.date.today() + dt.timedelta(days=3 * 365)).isoformat()
    return page("enroll.html", status, purposes=PURPOSES, default_retain=default_retain,
                min_retain=(dt.date.today() + dt.timedelta(days=1)).isoformat(), **ctx)


@bp.route("/enroll", methods=["GET", "POST"])
@ui_login_required("identities:write")
def enroll():
    p = me()
    if request.method == "GET":
        return _wizard(form={})
    form = request.form
    kept = {k: form.get(k, "") for k in ("name", "subject", "given_by", "guardian_name",
                                         "retain_until", "evidence_sha256", "pick")}
    kept["purposes"] = form.getlist("purposes")
    kept["kinds"] = form.getlist("kinds")
    name = form.get("name", "").strip()
    try:
        handle = handle_in_owner(p, p.owner, name)
        if identity_exists(handle):
            raise InvalidInput(f"{handle} already exists: add photos on its page instead")
        files = [f for f in request.files.getlist("photos") if f.filename]
        if not files:
            raise InvalidInput("choose one or more photos of the person")
        if len(files) > state().config.max_photos:
            raise InvalidInput(f"at most {state().config.max_photos} photos at a time")
        evidence = request.files.get("evidence")
        evidence_bytes = None
        if evidence is not None and evidence.filename:
            evidence_bytes = evidence.read(MAX_EVIDENCE_BYTES + 1)
            if len(evidence_bytes) > MAX_EVIDENCE_BYTES:
                raise InvalidInput("the evidence file is limited to 20 MB")
        consent = parse_consent(_consent_doc(form), evidence_bytes)
        names = safe_names([f.filename for f in files])
        photos, pick = [f.read() for f in files], parse_pick(form.get("pick"))
        kinds = parse_kinds(",".join(form.getlist("kinds")))
        if scale_out():  # the workers analyse the faces: follow the job's progress
            job = queue_enrollment(p, handle, photos, names, consent=consent, pick=pick,
                                   kinds=kinds)
            notice(f"Enrolling {handle} (job {job['id'][:8]}): the photos are sealed and "
                   "queued for a worker; its progress and result are below.")
            return redirect(url_for("ui.roster.jobs"))
        report = enroll_photos(p, handle, photos, names, consent=consent, pick=pick,
                               kinds=kinds)
    except DuplicateIdentity as exc:
        return _wizard(409, form=kept, duplicate={"handle": exc.handle, "score": exc.score,
                                                  "decision": exc.decision,
                                                  "message": str(exc)})
    except PhotoRejected as exc:
        return _wizard(422, form=kept, error="Some photos cannot be used; nothing was "
                                             "stored.",
                       photos=exc.details.get("photos") or [])
    except ModelUnavailable as exc:
        return _wizard(503, form=kept, error=f"Cannot compute the generator artifacts here: "
                                             f"{exc}. Nothing was stored.")
    except (InvalidInput, ConsentError, NotFound) as exc:
        problems = exc.details.get("problems") or []
        return _wizard(400, form=kept, error=str(exc) if not problems else
                       "The consent record is incomplete:", problems=problems)
    o, n = report.handle.split("/")
    if report.status == "held":
        m = report.top_match or {}
        notice(f"{report.handle} is held for review: the face resembles {m.get('handle')} "
               f"(similarity {m.get('score', 0):.2f}). Decide in the review queue.", "warn")
    else:
        notice(f"Enrolled {report.handle} from {len(report.photos)} photo(s).")
    return redirect(url_for("ui.roster.identity", owner=o, name=n))


@bp.route("/identities/<owner>/<name>")
@ui_login_required("identities:read")
def identity(owner: str, name: str):
    p = me()
    handle = handle_in_owner(p, owner, name)
    doc = state().vault.describe(handle)
    with state().vault.session() as s:
        rows = audit.events(s, owner=p.owner, subject=handle, limit=EVENTS + 1)
        events = [{"seq": e.seq, "at": audit.canonical_time(e.at), "action": e.action,
                   "actor": e.actor, "details": e.details} for e in rows[:EVENTS]]
        erase_policy = identities.get_owner(s, p.owner).erase_policy
    reviews = [r for r in state().vault.list_reviews(p.owner) if r["handle"] == handle]
    return page("identity.html", person=doc, events=events, more_events=len(rows) > EVENTS,
                reviews=reviews, erase_policy=erase_policy,
                base_models=base_models(state().config.models_dir))


def _chosen_photos(what: str) -> tuple[list[bytes], list[str]]:
    """The photos chosen in the form's file field, with display names."""
    files = [f for f in request.files.getlist("photos") if f.filename]
    limit = state().config.max_photos
    if not files or len(files) > limit:
        raise InvalidInput(f"choose 1 to {limit} {what}")
    return [f.read() for f in files], safe_names([f.filename for f in files])


def _refused(prefix: str, exc: VaultError) -> None:
    """A refusal as a notice; a photo rejection lists each photo's reason."""
    reasons = [ph["reason"] for ph in exc.details.get("photos", []) if ph.get("reason")] \
        if isinstance(exc, PhotoRejected) else []
    notice(f"{prefix}: " + ("; ".join(reasons) or str(exc)), "error")


@bp.route("/identities/<owner>/<name>/personalize", methods=["POST"])
@ui_login_required("generate")
def personalize(owner: str, name: str):
    p = me()
    handle = handle_in_owner(p, owner, name)
    state().vault.describe(handle)
    try:
        photos, names = _chosen_photos("face photos")
        kind, params = parse_form()
        job = queue_fit(p, handle, kind, params, photos, names)
    except VaultError as exc:
        _refused("Not queued", exc)
    else:
        notice(f"Queued a {kind} fit for {handle} (job {job['id'][:8]}); its progress is on "
               "the Jobs page. The photos are kept sealed until the job ends.")
    return redirect(url_for("ui.roster.identity", owner=owner, name=name))


@bp.route("/identities/<owner>/<name>/photos", methods=["POST"])
@ui_login_required("identities:write")
def add_photos(owner: str, name: str):
    p = me()
    handle = handle_in_owner(p, owner, name)
    state().vault.describe(handle)
    try:
        photos, names = _chosen_photos("photos")
        if scale_out():
            job = queue_enrollment(p, handle, photos, names)
            notice(f"Adding {len(photos)} photo(s) to {handle} (job {job['id'][:8]}); its "
                   "progress is on the Jobs page.")
            return redirect(url_for("ui.roster.identity", owner=owner, name=name))
        report = enroll_photos(p, handle, photos, names)
    except VaultError as exc:
        _refused("Photos not added", exc)
    else:
        notice(f"Added {len(report.photos)} photo(s) to {handle}.")
    return redirect(url_for("ui.roster.identity", owner=owner, name=name))


@bp.route("/identities/<owner>/<name>/delete", methods=["POST"])
@ui_login_required("identities:write")
def delete(owner: str, name: str):
    p = me()
    handle = handle_in_owner(p, owner, name)
    state().vault.describe(handle)
    if request.form.get("confirm", "").strip().removeprefix("@") != handle:
        notice(f"Not erased: type {handle} to confirm.", "error")
        return redirect(url_for("ui.roster.identity", owner=owner, name=name))
    st = state()
    receipt = st.vault.delete_identity(handle, actor=p.actor,
                                       reason=f"requested by {p.actor}")
    return show_receipt(receipt, handle=handle)


@bp.route("/identities/<owner>/<name>/withdraw", methods=["POST"])
@ui_login_required("identities:write")
def withdraw(owner: str, name: str):
    p = me()
    handle = handle_in_owner(p, owner, name)
    if request.form.get("confirm") != "yes":
        notice("Consent not withdrawn: tick the box to confirm.", "error")
        return redirect(url_for("ui.roster.identity", owner=owner, name=name))
    reason = request.form.get("reason", "").strip()[:500] or None
    st = state()
    result = st.vault.withdraw_consent(handle, reason=reason, actor=p.actor)
    if "receipt" in result:
        return show_receipt(result["receipt"], handle=handle, withdrawn=True)
    retain_until = st.vault.describe(handle)["consent"]["retain_until"]
    notice(f"Consent for {handle} withdrawn: blocked from every use now; under "
           f"the erase policy of {p.owner} (retain) it is kept until its retention date, "
           f"{retain_until}, then erased with a signed receipt.", "warn")
    return redirect(url_for("ui.roster.identity", owner=owner, name=name))


@bp.route("/identities/<owner>/<name>/artifacts/<artifact_id>/download")
@ui_login_required("artifacts:read")
def download(owner: str, name: str, artifact_id: str):
    return download_artifact(owner, name, artifact_id)


def _identity_link(handle: str | None, anchor: str | None = None) -> dict | None:
    if not handle or handle.count("/") != 1:
        return None
    o, n = handle.split("/")
    return {"label": f"@{handle}", "url": url_for("ui.roster.identity", owner=o, name=n,
                                                  _anchor=anchor)}


def _job_handles(job: dict) -> list[str]:
    result = (job.get("result") or {}) if job["status"] == "done" else {}
    handles = [job.get("identity"), result.get("handle")]
    if job["kind"] == "generate":
        handles += result.get("identities") or []
    return [h for h in dict.fromkeys(handles) if isinstance(h, str) and h.count("/") == 1]


def job_links(job: dict, live: set[str]) -> list[dict]:
    """Where a job's result is: its image, the identity it enrolled or personalised (at
    the artifact it stored), the identities a scene shows. ``live``: the handles that
    still exist (no link to an erased identity)."""
    result = (job.get("result") or {}) if job["status"] == "done" else {}
    links: list[dict] = []
    if job["kind"] == "generate" and result.get("image") and not result.get("image_removed"):
        links.append({"label": "Open the image", "url": url_for("ui.public.result",
                                                                job_id=job["id"])})
    artifact = result.get("artifact")
    for h in _job_handles(job):
        if h in live:
            links.append(_identity_link(h, f"artifact-{artifact}" if artifact else None))
    return links


def _live_handles(owner: str, handles: set[str]) -> set[str]:
    names = {h.split("/")[1] for h in handles if h.split("/")[0] == owner}
    if not names:
        return set()
    with state().vault.session() as s:
        found = s.scalars(select(Identity.name).join(Identity.owner)
                          .where(Owner.name == owner, Identity.name.in_(names)))
        return {f"{owner}/{n}" for n in found}


@bp.route("/jobs")
@ui_login_required("identities:read")
def jobs():
    p = me()
    rows = state().jobs.list(p.owner, limit=100)
    live = _live_handles(p.owner, {h for j in rows for h in _job_handles(j)})
    for j in rows:
        j["links"] = job_links(j, live)
    return page("jobs.html", jobs=rows)
