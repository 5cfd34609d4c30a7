"""Every failure, one shape: the vault's errors and HTTP errors mapped in one place.

Each error response is JSON::

    {"error": {"code": "not_found", "message": "no identity smiths/ana", "details": {}}}

``code`` is stable and machine-readable (the vault error's ``code``, or the
HTTP reason for werkzeug's errors); ``message`` says what is wrong and what
to do; ``details`` holds structured extras (per-photo reasons, the matching
handle of a duplicate...). Browsers asking for a page (not ``/v1``) get the
same code and message as an HTML page. Server errors (5xx) never show a
stack trace, a path or an internal message: they are logged with a
reference the response repeats.
"""

from __future__ import annotations

import logging
import uuid

from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from vault import errors

log = logging.getLogger("idvault.web")


# -- errors of the web layer itself ------------------------------------------------------
class Unauthorized(errors.VaultError):
    """No credentials, or credentials that are not accepted."""

    code = "unauthorized"


class Forbidden(errors.VaultError):
    """Authenticated, but the key's scopes or the user's role do not allow this."""

    code = "forbidden"



class UnsupportedMediaType(errors.InvalidInput):
    code = "unsupported_media_type"


class Unprocessable(errors.InvalidInput):
    """Well formed and valid by the API's document, but refused for what it means given
    what is stored or installed (e.g. a 'method' for an identity the prompt does not
    mention, or no base model to fit against): 422, not 400."""

    code = "unprocessable"


class TooManyRequests(errors.VaultError):
    code = "too_many_requests"


class ServiceUnavailable(errors.VaultError):
    code = "service_unavailable"


# Most specific first: the first class an error is an instance of wins.
STATUS: list[tuple[type[errors.VaultError], int]] = [
    (Unauthorized, 401),
    (Forbidden, 403),
    (TooManyRequests, 429),
    (ServiceUnavailable, 503),
    (UnsupportedMediaType, 415),
    (errors.DuplicateIdentity, 409),
    (errors.PhotoRejected, 422),
    (errors.ArtifactRejected, 422),
    (errors.InvalidConsent, 422),
    (Unprocessable, 422),
    (errors.InvalidHandle, 400),
    (errors.InvalidInput, 400),
    (errors.NotFound, 404),
    (errors.AlreadyExists, 409),
    (errors.Conflict, 409),
    (errors.ConsentError, 403),
    (errors.KeyUnavailable, 503),
    (errors.ModelUnavailable, 503),
    # The stored record conflicts with its seal: the caller is told what changed (it is
    # their own identity's record), where other integrity failures stay a 500.
    (errors.RecordTampered, 409),
    (errors.IntegrityError, 500),
    (errors.VaultError, 500),
]

# What a client is told for server-side failures (the real message is logged).
PUBLIC_5XX = {
    "key_unavailable": "the vault's key-encryption key is not available to the server; "
                       "the operator should check the key provider (`idvault keys status`)",
    "model_unavailable": "the face models are not installed on this server; the operator "
                         "should run `idvault models check`",
}


def status_for(exc: errors.VaultError) -> int:
    return next(code for cls, code in STATUS if isinstance(exc, cls))


def _jsonable(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def error_body(code: str, message: str, details: dict | None = None) -> dict:
    return {"error": {"code": code, "message": message, "details": _jsonable(details or {})}}


def _wants_html() -> bool:
    if request.path.startswith("/v1") or request.path.startswith("/static"):
        return False
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "text/html"


def respond(status: int, code: str, message: str, details: dict | None = None,
            headers: dict | None = None) -> Response:
    if _wants_html():
        resp = Response(render_template("error.html", status=status, code=code,
                                        message=message), status=status,
                        mimetype="text/html")
    else:
        resp = jsonify(error_body(code, message, details))
        resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _reference() -> str:
    return uuid.uuid4().hex[:12]


def handle_vault_error(exc: errors.VaultError) -> Response:
    status = status_for(exc)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="idvault"'
    if status >= 500:
        ref = _reference()
        log.error("%s %s failed (ref %s): %s: %s", request.method, request.path, ref,
                  type(exc).__name__, exc)
        message = PUBLIC_5XX.get(exc.code, "the server could not complete this request")
        if exc.code in ("not_implemented", "service_unavailable"):
            message = exc.message  # our own, written for clients
        return respond(status, exc.code, message, {"reference": ref}, headers)
    return respond(status, exc.code, exc.message, exc.details, headers)


HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout",
    409: "conflict", 411: "length_required", 413: "payload_too_large",
    414: "uri_too_long", 415: "unsupported_media_type", 416: "range_not_satisfiable",
    422: "unprocessable", 429: "too_many_requests", 431: "headers_too_large",
    500: "internal_error", 501: "not_implemented", 503: "service_unavailable",
}
HTTP_MESSAGES = {
    404: "no such page or API route",
    405: "this method is not allowed here",
    413: "the request is larger than this server accepts",
    400: "the request could not be understood",
}


def handle_http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    code = HTTP_CODES.get(status, "http_error")
    message = HTTP_MESSAGES.get(status) or (exc.description or exc.name or "error")
    details: dict = {}
    headers: dict = {}
    if status == 405 and getattr(exc, "valid_methods", None):
        details["allowed"] = sorted(exc.valid_methods)  # type: ignore[attr-defined]
        headers["Allow"] = ", ".join(details["allowed"])
    if status == 413:
        limit = request.max_content_length
        if limit:
            details["limit_bytes"] = limit
            message = f"{message} ({limit} bytes)"
    if status >= 500:
        details["reference"] = _reference()
        log.error("%s %s: HTTP %s (ref %s)", request.method, request.path, status,
                  details["reference"])
        message = "the server could not complete this request"
    return respond(status, code, message, details, headers)


def handle_unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return handle_http_error(exc)
    if isinstance(exc, errors.VaultError):
        return handle_vault_error(exc)
    ref = _reference()
    log.exception("%s %s crashed (ref %s)", request.method, request.path, ref)
    return respond(500, "internal_error", "the server could not complete this request",
                   {"reference": ref})


def register(app: Flask) -> None:
    app.register_error_handler(errors.VaultError, handle_vault_error)
    app.register_error_handler(HTTPException, handle_http_error)
    app.register_error_handler(Exception, handle_unexpected)
