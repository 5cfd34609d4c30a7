"""Jobs: long work with status, progress and cancel (``vault.jobs``).

Which kinds can be submitted depends on what this server has registered
(``GET /job-kinds``). Each kind names the scope needed to submit or cancel
it. Kinds registered with ``trusted_params`` (personalisation, whose CLI
form takes file paths) are refused here; they have their own endpoint.
"""

from __future__ import annotations

from flask import jsonify, request

from encoders.fitting.jobs import JOB_KINDS
from vault.errors import InvalidInput
from vault.jobs import describe_kinds
from vault.models import JOB_STATUSES
from web.api.blueprint import (
    HANDLE_SCHEMA,
    ApiBlueprint,
    choice_arg,
    int_arg,
    items_of,
    json_body,
    json_request,
    json_response,
    query_param,
    ref,
    state,
    string_field,
)
from web.auth import handle_in_owner, require
from web.errors import Unprocessable

bp = ApiBlueprint("jobs", __name__, tag="jobs")

JOB_ID = {"job_id": {"type": "string", "maxLength": 64}}


@bp.op("/job-kinds", "GET", summary="The job kinds this server runs, with the scope each needs",
       scope="identities:read",
       responses={"200": json_response("the kinds", items_of("JobKind"))})
def list_job_kinds():
    require("identities:read")
    return jsonify({"items": describe_kinds(state().jobs.registry)})


@bp.op("/jobs", "GET", summary="The owner's jobs, newest first", scope="identities:read",
       query=[query_param("status", {"type": "string", "enum": list(JOB_STATUSES)},
                          "only jobs in this status"),
              query_param("limit", {"type": "integer", "minimum": 1, "maximum": 200},
                          "page size (default 50)"),
              query_param("before", {"type": "string", "maxLength": 64},
                          "the id of the last job of the previous page")],
       responses={"200": json_response("the jobs", items_of("Job"))})
def list_jobs():
    p = require("identities:read")
    status = choice_arg("status", JOB_STATUSES, None)
    limit = int_arg("limit", 50, lo=1, hi=200)
    before = request.args.get("before")
    return jsonify({"items": state().jobs.list(p.owner, status=status, limit=limit,
                                                before=before)})


@bp.op("/jobs", "POST", summary="Submit a job of a registered kind", scope=None,
       description="The scope needed is the kind's (`GET /job-kinds`).",
       body=json_request({"type": "object", "required": ["kind"],
                          "additionalProperties": False,
                          "properties": {"kind": {"type": "string", "maxLength": 32,
                                                  "description": "a kind of GET /job-kinds "
                                                  "without trusted_params"},
                                         "params": {"type": "object"},
                                         "identity": HANDLE_SCHEMA}}),
       responses={"202": json_response("queued", ref("Job")),
                  "422": json_response("the params (or identity) do not suit the kind",
                                       ref("Error"))})
def submit_job():
    require(None)
    doc = json_body(required=("kind",), optional=("params", "identity"))
    jobs = state().jobs
    kind = jobs.kind(string_field(doc, "kind", max_len=32))
    p = require(kind.scope)
    if kind.trusted_params:
        raise InvalidInput(f"{kind.name} jobs are not submitted here: their params may name "
                           "files on the server. Use POST /v1/identities/{owner}/{name}/"
                           "personalize (photos as multipart)" if kind.name in JOB_KINDS
                           else f"{kind.name} jobs cannot be submitted over the API")
    params = doc.get("params", {})
    if not isinstance(params, dict):
        raise InvalidInput("'params' must be a JSON object")
    identity = string_field(doc, "identity", max_len=80, required=False)
    if identity is not None:
        owner, _, name = identity.removeprefix("@").partition("/")
        identity = handle_in_owner(p, owner, name)
    try:
        job = jobs.submit(p.owner, kind.name, params, identity=identity, actor=p.actor)
    except InvalidInput as exc:
        if type(exc) is not InvalidInput:
            raise
        # The document says 'params' is an object; what each kind takes is the kind's.
        raise Unprocessable(exc.message, **exc.details) from None
    return jsonify(job), 202


@bp.op("/jobs/<job_id>", "GET", summary="A job's status, progress and result",
       scope="identities:read", path_params=JOB_ID,
       responses={"200": json_response("the job", ref("Job"))})
def get_job(job_id: str):
    p = require("identities:read")
    return jsonify(state().jobs.get(job_id, owner=p.owner))


@bp.op("/jobs/<job_id>/cancel", "POST", summary="Cancel a job: at once when queued, at its "
       "next progress report when running", scope=None, path_params=JOB_ID,
       description="Needs the scope of the job's kind.",
       responses={"200": json_response("the job", ref("Job"))})
def cancel_job(job_id: str):
    p = require(None)
    jobs = state().jobs
    job = jobs.get(job_id, owner=p.owner)
    spec = jobs.registry.get(job["kind"])
    require(spec.scope if spec else "admin")
    return jsonify(jobs.cancel(job_id, owner=p.owner))
