"""The public retention-policy page and the generation page (prompt, layout, gallery)."""

from __future__ import annotations

from flask import Blueprint, redirect, request, url_for

from generators.provenance import verify_image
from vault.consent import PURPOSES
from vault.errors import InvalidInput, NotFound, VaultError
from web import generation
from web.auth import require, ui_login_required
from web.ui.common import me, notice, page, state

bp = Blueprint("public", __name__)


@bp.route("/retention-policy")
def retention_policy():
    s = state().vault.settings
    return page("retention.html", purposes=PURPOSES, block=s.dedupe_block,
                review=s.dedupe_review)


GALLERY = 12  # finished scenes shown on the generation page
METHOD_CHOICES = generation.METHOD_CHOICES


def _usable(owner: str) -> list[str]:
    return [i["handle"] for i in state().vault.list_identities(owner)
            if i["consent"]["status"] == "active" and "generate" in i["consent"]["purposes"]
            and i["status"] == "active"]


_verdicts: dict[tuple, object] = {}


def _verdict(path):
    """verify_image, remembered per file version (the gallery shows the same images often)."""
    st = path.stat()
    key = (id(state().vault), str(path), st.st_mtime_ns, st.st_size)
    v = _verdicts.get(key)
    if v is None:
        v = verify_image(state().vault, path)
        if len(_verdicts) >= 512:
            _verdicts.clear()
        _verdicts[key] = v
    return v


def _gallery(owner: str) -> tuple[list[dict], list[dict]]:
    """The owner's recent generate jobs: (finished with their verdicts, the others)."""
    jobs = [j for j in state().jobs.list(owner, limit=200) if j["kind"] == generation.KIND]
    done, other = [], []
    for j in jobs:
        if j["status"] == "done" and len(done) < GALLERY:
            try:
                path = generation.stored_image(state().vault, j)
            except NotFound:
                continue
            j["verification"] = _verdict(path)
            done.append(j)
        elif j["status"] != "done" and len(other) < GALLERY:
            other.append(j)
    return done, other


def _form_params(form) -> dict:
    params: dict = {"prompt": form.get("prompt", "")}
    for key in ("seed", "steps"):
        raw = form.get(key, "").strip()
        if raw:
            if not raw.isdigit():
                raise InvalidInput(f"'{key}' must be a whole number")
            params[key] = int(raw)
    raw = form.get("size", "").strip().lower()
    if raw:
        w, sep, h = raw.partition("x")
        if not sep or not w.isdigit() or not h.isdigit():
            raise InvalidInput("'size' is WIDTHxHEIGHT, e.g. 1024x768")
        params["size"] = [int(w), int(h)]
    if form.get("layout", "").strip():
        params["layout"] = form.get("layout", "").strip()
    params["method"] = form.get("method") or "auto"
    params["commercial"] = form.get("commercial") == "on"
    return generation.validate(params)


@bp.route("/generate", methods=["GET", "POST"])
@ui_login_required("identities:read")
def generate():
    p = me()
    error, form = None, {}
    if request.method == "POST":
        require("generate")
        form = request.form
        try:
            job = state().jobs.submit(p.owner, generation.KIND, _form_params(form),
                                      actor=p.actor)
        except VaultError as exc:
            error = str(exc)
        else:
            notice("Queued: the scene appears below when it is done.")
            return redirect(url_for("ui.public.generate", job=job["id"]))
    done, other = _gallery(p.owner)
    return page("generate.html", 400 if error else 200, usable=_usable(p.owner),
                done=done, other=other, error=error, form=form, methods=METHOD_CHOICES,
                can_generate="generate" in p.scopes)


@bp.route("/generate/<job_id>")
@ui_login_required("identities:read")
def result(job_id: str):
    p = me()
    job = state().jobs.get(job_id, owner=p.owner)
    path = generation.stored_image(state().vault, job)
    return page("generation.html", job=job, verification=verify_image(state().vault, path))
