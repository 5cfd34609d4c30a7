"""Enrollment over HTTP: photos (multipart) in, a deduplicated, sealed identity out.

``POST /identities/{owner}/{name}/enroll`` is ``idvault enroll``: every photo
must show one usable face or the whole request is refused (422) with a
result per photo; a face matching an existing identity of the owner is
refused (409) naming it; a face in the review band is stored ``held`` with a
pending review (201). ``POST /photos/check`` analyses photos without storing
anything, for per-photo feedback while a person picks them.

On a scale-out deployment (a broker is set) this node runs no models: it
checks what it can (handle, consent, kinds, that every photo decodes), stages
the photos sealed under the identity's data key and answers 202 with an
``enroll`` job (:mod:`encoders.enrollment_job`) that a worker runs; the job's
result is the report, its error the refusal. ``/photos/check`` needs the face
models, so there it answers 503.

``POST /identities/{owner}/{name}/kinds`` adds artifact kinds to an enrolled
identity (:mod:`encoders.enrollment_kinds`): without photos it needs no model
(kinds held are reported, the others refused with what they need); with photos
they are checked against the identity and used for the kinds only, in this
process or, on a scale-out deployment, as an ``enroll`` job in mode ``add_kinds``.
"""

from __future__ import annotations

import json
import re
import uuid

from flask import jsonify, request

from encoders import enrollment_kinds
from encoders.photo import load_photo
from encoders.preflight import check_enrollment
from vault import identities, staged_photos
from vault.artifact_kinds import ENROLL_KINDS
from vault.errors import Conflict, InvalidConsent, InvalidInput, NotFound, PhotoRejected
from web.api.blueprint import (
    END,
    HANDLE_PARAMS,
    ApiBlueprint,
    json_body,
    json_response,
    ref,
    state,
)
from web.api.identities import parse_consent
from web.auth import handle_in_owner, require
from web.errors import ServiceUnavailable, Unprocessable, UnsupportedMediaType

bp = ApiBlueprint("enrollment", __name__, tag="enrollment")

MAX_EVIDENCE_BYTES = 20 * 1024 * 1024
PHOTO_FIELDS = {"photos"}
ENROLL_FORM = {"consent", "pick", "kinds", "csrf_token"}
ENROLL_FILES = {"photos", "evidence"}
KINDS_FORM = {"kinds", "pick", "replace", "csrf_token"}

PHOTOS_SCHEMA = {"type": "array", "minItems": 1, "maxItems": 32,
                 "items": {"type": "string", "format": "binary"},
                 "description": "JPEG, PNG or WebP photos, one person each (at most 20 MB and "
                                "40 megapixels each)"}
PICK_RE = "largest|[0-9]|[1-5][0-9]|6[0-3]"
# A form field is text, so the index may be given as a number too (it arrives as "3").
PICK_SCHEMA = {"type": ["string", "integer"], "pattern": f"^(?:{PICK_RE})?{END}",
               "minimum": 0, "maximum": 63,
               "description": "when a photo shows several usable faces: 'largest' or an "
                              "index (0 = leftmost)"}


def safe_names(raw: list[str | None]) -> list[str]:
    """Display names for uploads: base name only, printable, short, unique."""
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(raw):
        base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
        base = "".join(c for c in base if c.isprintable()).strip()[:100] or f"photo {i + 1}"
        candidate, n = base, 2
        while candidate in seen:
            candidate, n = f"{base} ({n})", n + 1
        seen.add(candidate)
        out.append(candidate)
    return out


def multipart(allowed_form: set[str], allowed_files: set[str]) -> None:
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("send the photos as multipart/form-data, one file part "
                                   "per photo in the field 'photos'")
    unknown = sorted(str(k) for k in (set(request.form) - allowed_form)
                     | (set(request.files) - allowed_files))
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)} (fields: "
                           f"{', '.join(sorted(allowed_form | allowed_files))})")


def read_photos() -> tuple[list[bytes], list[str]]:
    files = request.files.getlist("photos")
    if not files:
        raise InvalidInput("no photos: send one or more files in the multipart field 'photos'")
    limit = state().config.max_photos
    if len(files) > limit:
        raise InvalidInput(f"at most {limit} photos per request (got {len(files)})")
    names = safe_names([f.filename for f in files])
    # The photo decoder checks each photo's size before decoding it.
    return [f.read() for f in files], names


def parse_pick(raw: str | None):
    if raw is None or raw == "":
        return None
    if raw == "largest":
        return "largest"
    if re.fullmatch(PICK_RE, raw):
        return int(raw)
    raise InvalidInput("'pick' must be 'largest' or a face index 0-63 (0 = leftmost)")


def check_decodable(photos: list[bytes], names: list[str]) -> None:
    """Refuse the request unless every photo decodes, with one result per photo (what a
    node without face models can check before it stages the photos for a worker)."""
    reasons = {}
    for data, label in zip(photos, names, strict=True):
        try:
            load_photo(data, name=label)
        except PhotoRejected as exc:
            reasons[label] = str(exc)
    if reasons:
        results = [{"photo": n, "ok": n not in reasons, "reason": reasons.get(n)}
                   for n in names]
        raise PhotoRejected(f"{len(reasons)} of {len(names)} photos cannot be used: "
                            f"{next(iter(reasons.values()))}", photos=results)


def enroll_photos(p, handle: str, photos: list[bytes], names: list[str], *,
                  consent=None, pick=None, kinds: tuple[str, ...] = ("face",)):
    """``Enroller.enroll`` for the caller: the EnrollmentReport, or per-photo rejections.

    The vault serialises an owner's enrollment decisions across threads and
    processes (``vault.dedupe_log``); analysis runs unlocked.
    """
    try:
        return state().enroller().enroll(handle, photos, consent=consent, kinds=kinds,
                                         names=names, pick=pick, actor=p.actor)
    except PhotoRejected as exc:
        raise per_photo(names, exc) from None


def scale_out() -> bool:
    """Whether model work goes to the workers (a broker is set) rather than this node."""
    return state().jobs.dispatch is not None


def queue_enrollment(p, handle: str, photos: list[bytes], names: list[str], *,
                     consent=None, pick=None, kinds: tuple[str, ...] = ("face",),
                     add_kinds: bool = False, replace: bool = False) -> dict:
    """Stage the photos sealed and queue an ``enroll`` job for a worker; the job (a dict).

    A new identity (``consent`` given) gets its uid and data key now, so that its
    photos are sealed under its own key before it exists. On any failure nothing
    stays staged, no key is left and nothing is queued. ``add_kinds``: the job adds
    ``kinds`` to the enrolled ``handle`` from the photos (``replace`` as
    :func:`encoders.enrollment_kinds.add_kinds`).
    """
    from encoders.enrollment_job import KIND, forget_new_identity

    st = state()
    check_decodable(photos, names)
    uid = str(uuid.uuid4()) if consent is not None else None
    params: dict = {"handle": handle, "kinds": list(kinds), "pick": pick}
    if add_kinds:
        params |= {"mode": "add_kinds", "replace": replace}
    if uid is not None:
        params |= {"uid": uid, "consent": consent.to_dict()}
    staged = staged_photos.stage(st.vault, handle, photos, names=names, actor=p.actor,
                                 purpose="enroll", uid=uid)
    try:
        return st.jobs.submit(p.owner, KIND, {**params, "staged": staged.to_json()},
                              identity=None if uid else handle, actor=p.actor)
    except BaseException:
        if uid is not None:
            forget_new_identity(st.vault, uid)
        else:
            with st.vault.session(read_only=True) as s:
                staged_photos.discard(st.vault, identities.get_identity(s, handle).uid,
                                      staged.id)
        raise


def identity_exists(handle: str) -> bool:
    with state().vault.session() as s:
        try:
            identities.get_identity(s, handle)
        except NotFound:
            return False
    return True


def kinds_list_re(kinds: tuple[str, ...]) -> str:
    """A regular expression of a comma-separated list of ``kinds`` (as parsed here)."""
    one = r"\s*(?:" + "|".join(kinds) + r")\s*"
    return f"{one}(?:,{one})*"


def parse_kinds(raw: str | None) -> tuple[str, ...]:
    if raw is None or not raw.strip():
        return ("face",)
    kinds = tuple(dict.fromkeys(k.strip() for k in raw.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in ENROLL_KINDS]
    if unknown or len(raw) > 64:
        raise InvalidInput(f"'kinds' is a comma-separated list of {', '.join(ENROLL_KINDS)} "
                           f"(unknown: {', '.join(unknown) or raw[:64]})")
    return ("face", *[k for k in kinds if k != "face"])


def per_photo(names: list[str], exc: PhotoRejected) -> PhotoRejected:
    """The rejection with a result for every photo, accepted ones included."""
    reasons = exc.details.get("photos") or {names[0]: str(exc)}
    photos = [{"photo": n, "ok": n not in reasons, "reason": reasons.get(n)} for n in names]
    return PhotoRejected(str(exc), photos=photos)


@bp.op("/identities/<owner>/<name>/enroll", "POST",
       summary="Enroll photos: create the identity (with consent) or add photos to it",
       scope="identities:write", path_params=HANDLE_PARAMS,
       body={"required": True, "content": {"multipart/form-data": {"schema": {
           "type": "object", "required": ["photos"],
           "properties": {
               "photos": PHOTOS_SCHEMA,
               "consent": {**ref("ConsentForm"), "description": "the consent record as "
                           "JSON (docs/consent.md; not 'evidence_file'); required for a new "
                           "identity (422 without), refused for an existing one (409); "
                           "instead of 'evidence_sha256' the form may carry 'evidence'"},
               "evidence": {"type": "string", "format": "binary", "description":
                            "the consent evidence (a signed form); only its SHA-256 is kept"},
               "pick": PICK_SCHEMA,
               "kinds": {"type": "string", "maxLength": 64,
                         "pattern": f"^(?:{kinds_list_re(ENROLL_KINDS)})?$", "description":
                         "artifacts to compute, comma-separated (default 'face'; "
                         "'photomaker', 'storymaker', 'faceid' and 'instantid' need their "
                         "models on the server)"}}},
           "encoding": {"consent": {"contentType": "application/json"}}}}},
       responses={
           "201": json_response("a new identity: active, or held for review",
                                ref("EnrollmentReport")),
           "200": json_response("photos added to an existing identity",
                                ref("EnrollmentReport")),
           "202": json_response("a scale-out deployment: queued as an 'enroll' job for a "
                                "worker; its result is the report", ref("Job")),
           "409": json_response("the face matches an existing identity (details: handle, "
                                "score, decision), or the identity is held", ref("Error")),
           "422": json_response("photos rejected (details.photos: one result per photo) or "
                                "the consent record is invalid", ref("Error"))})
def enroll(owner: str, name: str):
    p = require("identities:write")
    handle = handle_in_owner(p, owner, name)
    multipart(ENROLL_FORM, ENROLL_FILES)
    photos, names = read_photos()
    consent_raw = request.form.get("consent")
    evidence = request.files.get("evidence")
    evidence_bytes = None
    if evidence is not None:
        evidence_bytes = evidence.read(MAX_EVIDENCE_BYTES + 1)
        if len(evidence_bytes) > MAX_EVIDENCE_BYTES:
            raise InvalidInput(f"the evidence file is limited to {MAX_EVIDENCE_BYTES} bytes")
    pick = parse_pick(request.form.get("pick"))
    exists = identity_exists(handle)
    consent = None
    if consent_raw is not None and consent_raw.strip():
        if exists:
            raise Conflict(f"{handle} already exists with its consent record; adding "
                           "photos takes no consent (leave 'consent' out)")
        try:
            doc = json.loads(consent_raw)
        except ValueError as exc:
            raise InvalidInput(f"'consent' is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidInput("'consent' is not valid JSON: nested too deeply") from None
        consent = parse_consent(doc, evidence_bytes)
    elif not exists:
        # 422 like any other consent refusal: whether it is needed depends on what is stored.
        raise InvalidConsent(f"{handle} is a new identity: enrolling it needs a consent "
                             "record (the 'consent' field)")
    kinds = parse_kinds(request.form.get("kinds"))
    # What the vault would refuse when it stores (consent not granting enroll, held for
    # review, being erased), before any photo is analysed or staged and a job queued:
    # `idvault enroll`'s model-free checks.
    check_enrollment(state().vault, handle, consent=consent, photos=(), kinds=kinds)
    if scale_out():
        job = queue_enrollment(p, handle, photos, names, consent=consent, pick=pick,
                               kinds=kinds)
        return jsonify(job), 202
    report = enroll_photos(p, handle, photos, names, consent=consent, pick=pick, kinds=kinds)
    return jsonify(report.to_json()), (200 if report.status == "updated" else 201)


KINDS_DESCRIPTION = ("kinds to add, comma-separated: "
                     + ", ".join(enrollment_kinds.ADDABLE_KINDS))
REPLACE_DESCRIPTION = ("recompute a kind the identity already holds for the same model from "
                       "these photos (default: refuse with 409)")


def parse_flag(raw: str | None, name: str) -> bool:
    if raw is None or raw in ("", "false", "0"):
        return False
    if raw in ("true", "1"):
        return True
    raise InvalidInput(f"'{name}' must be 'true' or 'false'")


def kinds_request() -> tuple[list[str], bool, object, list[bytes], list[str]]:
    """``(kinds, replace, pick, photos, names)`` of an add-kinds request (multipart with
    optional photos, or JSON without)."""
    if request.is_json:
        doc = json_body(required=("kinds",), optional=("replace",))
        raw, replace = doc["kinds"], doc.get("replace", False)
        if isinstance(raw, str):
            raw = raw.split(",")
        if (not isinstance(raw, list) or len(raw) > 8
                or not all(isinstance(k, str) and len(k) <= 32 for k in raw)):
            raise InvalidInput(f"'kinds' is a list (or a comma-separated string) of "
                               f"{', '.join(enrollment_kinds.ADDABLE_KINDS)}")
        if not isinstance(replace, bool):
            raise InvalidInput("'replace' must be true or false")
        return enrollment_kinds.parse_kinds(raw), replace, None, [], []
    multipart(KINDS_FORM, PHOTO_FIELDS)
    raw = request.form.get("kinds")
    if raw is None or len(raw) > 64:
        raise InvalidInput(f"'kinds' (at most 64 characters) is required: {KINDS_DESCRIPTION}")
    kinds = enrollment_kinds.parse_kinds(raw.split(","))
    replace = parse_flag(request.form.get("replace"), "replace")
    pick = parse_pick(request.form.get("pick"))
    photos, names = read_photos() if request.files.getlist("photos") else ([], [])
    return kinds, replace, pick, photos, names


@bp.op("/identities/<owner>/<name>/kinds", "POST",
       summary="Add artifact kinds to an enrolled identity, from photos where the stored "
               "data does not suffice", scope="identities:write", path_params=HANDLE_PARAMS,
       description="Without photos no model runs: kinds the identity holds are reported "
                   "(status 'unchanged'), any other is refused with 422 saying what it "
                   "needs (the vault keeps no photos). With photos, each must show the "
                   "identity (its best similarity to the enrolled face reaching the review "
                   "threshold) or nothing is stored; they are used for the new kinds only. "
                   "docs/enrollment.md.",
       body={"required": True, "content": {
           "multipart/form-data": {"schema": {
               "type": "object", "required": ["kinds"],
               "properties": {
                   "kinds": {"type": "string", "maxLength": 64,
                             "pattern": f"^{kinds_list_re(enrollment_kinds.ADDABLE_KINDS)}$",
                             "description": KINDS_DESCRIPTION},
                   "photos": {**PHOTOS_SCHEMA, "minItems": 0,
                              "description": "photos of the identity (optional; "
                                             + PHOTOS_SCHEMA["description"] + ")"},
                   "pick": PICK_SCHEMA,
                   # A form field is text: 1 and true arrive as "1" and "true".
                   "replace": {"enum": ["true", "false", "1", "0", "", True, False, 1, 0],
                               "description": REPLACE_DESCRIPTION
                               + "; it needs photos (422 without)"}}}},
           "application/json": {"schema": {
               "type": "object", "required": ["kinds"], "additionalProperties": False,
               "properties": {
                   "kinds": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
                       "type": "string", "enum": list(enrollment_kinds.ADDABLE_KINDS)}},
                   # Replacing recomputes from photos, which JSON cannot carry.
                   "replace": {"type": "boolean", "const": False,
                               "description": "false: replacing needs photos (multipart)"}}}}}},
       responses={
           "200": json_response("kinds added (status 'added'), or all already held "
                                "(status 'unchanged')", ref("KindsReport")),
           "202": json_response("a scale-out deployment: queued as an 'enroll' job (mode "
                                "add_kinds) for a worker; its result is the report",
                                ref("Job")),
           "404": json_response("no such identity", ref("Error")),
           "409": json_response("held for review, or the kind is already held for that "
                                "model and 'replace' is not set", ref("Error")),
           "400": json_response("a kind needs photos the vault does not keep "
                                "(details.needs_photos: what each needs), or invalid "
                                "fields", ref("Error")),
           "422": json_response("photos rejected, or not of this identity "
                                "(details.photos: one result per photo)", ref("Error")),
           "503": json_response("a model the kinds need is not on this server",
                                ref("Error"))})
def add_kinds(owner: str, name: str):
    p = require("identities:write")
    handle = handle_in_owner(p, owner, name)
    kinds, replace, pick, photos, names = kinds_request()
    st = state()
    if not photos:  # no model needed: held kinds, or what the others need
        try:
            held = enrollment_kinds.stored_kinds(st.vault, handle, kinds, replace=replace)
        except InvalidInput as exc:
            if type(exc) is not InvalidInput or not (replace or "needs_photos" in exc.details):
                raise
            # Valid by the document; what it needs depends on what the identity holds (and
            # 'replace' needs photos: a rule the multipart schema leaves to the text, since
            # schemathesis 4.32 cannot check 'if' against file parts).
            raise Unprocessable(exc.message, **exc.details) from None
        return jsonify(held.to_json()), 200
    enrollment_kinds.held_kinds(st.vault, handle)  # 404, 409 or consent before staging
    if scale_out():
        job = queue_enrollment(p, handle, photos, names, pick=pick, kinds=tuple(kinds),
                               add_kinds=True, replace=replace)
        return jsonify(job), 202
    try:
        report = enrollment_kinds.add_kinds(st.enroller(), handle, kinds, photos,
                                            names=names, pick=pick, replace=replace,
                                            actor=p.actor)
    except PhotoRejected as exc:
        raise per_photo(names, exc) from None
    return jsonify(report.to_json()), 200


@bp.op("/photos/check", "POST", summary="Check photos for enrollment without storing "
       "anything: one result per photo", scope="identities:write",
       body={"required": True, "content": {"multipart/form-data": {"schema": {
           "type": "object", "required": ["photos"],
           "properties": {"photos": PHOTOS_SCHEMA, "pick": PICK_SCHEMA}}}}},
       responses={"200": json_response("one result per photo", ref("PhotoChecks")),
                  "503": json_response("no face models on this node (a scale-out "
                                       "deployment)", ref("Error"))})
def check_photos():
    require("identities:write")
    multipart({"pick", "csrf_token"}, PHOTO_FIELDS)
    if scale_out():
        raise ServiceUnavailable("this API node runs no face models (a scale-out deployment: "
                                 "the workers do); enroll the photos, and the enrollment job "
                                 "reports each photo that cannot be used")
    photos, names = read_photos()
    pick = parse_pick(request.form.get("pick"))
    analyzer = state().enroller().analyzer
    out = []
    for data, label in zip(photos, names, strict=True):
        try:
            r = analyzer.analyze(data, pick=pick, name=label)
        except PhotoRejected as exc:
            out.append({"photo": label, "ok": False, "reason": str(exc)})
        else:
            out.append({"photo": label, "ok": True, "reason": None,
                        "faces_found": r.faces_found, "face": r.face_index,
                        "det_score": round(r.det_score, 3), "face_px": round(r.face_px, 1),
                        "blur": round(r.blur, 1)})
    return jsonify({"photos": out})
