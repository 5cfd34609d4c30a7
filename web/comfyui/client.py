"""The node pack's HTTP client of an idvault server: the JSON API with a scoped API key.

Standard library only (``urllib``), so it runs in ComfyUI's Python without idvault's
dependencies. Every failure is an :class:`IdvaultError` whose message names the problem
and what to do, which ComfyUI shows on the node: a rejected key (401), a missing scope
(403), a refusal by consent (403 with a consent code), an unknown handle (404), an
unreachable server. Nothing is cached here: every call goes to the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

__all__ = [
    "AuthError",
    "Client",
    "ConsentRefused",
    "IdvaultError",
    "NotFoundError",
    "ScopeError",
    "ServerError",
    "Unreachable",
    "resolve_key",
]

DEFAULT_KEY_ENV = "IDVAULT_API_KEY"
CONSENT_CODES = ("consent_denied", "consent_withdrawn", "consent_expired",
                 "purpose_not_granted")
MAX_PAYLOAD = 64 << 20  # artifacts are at most a few MiB; images at most 2048 px PNGs


class IdvaultError(RuntimeError):
    """A failure talking to idvault; the message is meant for the ComfyUI user."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class AuthError(IdvaultError):
    """The server does not accept the API key (401)."""


class ScopeError(IdvaultError):
    """The key is accepted but lacks the scope this needs (403)."""


class ConsentRefused(IdvaultError):
    """The identity's consent refuses this use (withdrawn, expired, purpose not granted)."""


class NotFoundError(IdvaultError):
    """Unknown (or another owner's) handle, artifact or job (404)."""


class Unreachable(IdvaultError):
    """No answer from the server (down, wrong URL, network)."""


class ServerError(IdvaultError):
    """Any other error status."""


def resolve_key(api_key: str, api_key_env: str) -> str:
    """The key typed in the node, else the one in the environment variable it names."""
    key = (api_key or "").strip()
    if key:
        return key
    name = (api_key_env or "").strip() or DEFAULT_KEY_ENV
    key = os.environ.get(name, "").strip()
    if not key:
        raise AuthError(f"no idvault API key: set the environment variable {name} for "
                        "ComfyUI's process (preferred: a key typed into the node is saved in "
                        "the workflow and in every image's metadata), or type one")
    return key


def split_handle(handle: str) -> tuple[str, str]:
    owner, sep, name = (handle or "").strip().removeprefix("@").partition("/")
    if not sep or not owner or not name or "/" in name:
        raise NotFoundError(f"{handle!r} is not a handle: write it as owner/name "
                            "(e.g. smiths/ana)")
    return owner, name


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body.decode("utf-8"))


class Client:
    """One idvault server (``base_url``, e.g. ``http://127.0.0.1:8080``) and one API key."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 60.0) -> None:
        url = (base_url or "").strip().rstrip("/")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise Unreachable(f"{base_url!r} is not an idvault server URL: write it as "
                              "http://host:port (e.g. http://127.0.0.1:8080)")
        self.base_url = url.removesuffix("/v1")
        self._key = api_key
        self.timeout = timeout

    # -- the calls the nodes make ---------------------------------------------------------
    def identity(self, handle: str) -> dict:
        """``GET /v1/identities/{owner}/{name}``: consent and artifact metadata (no payloads)."""
        owner, name = split_handle(handle)
        return self.get(f"/v1/identities/{_q(owner)}/{_q(name)}").json()

    def artifact_payload(self, handle: str, artifact_id: str, purpose: str) -> bytes:
        """The decrypted safetensors payload; the server checks consent for ``purpose`` and
        audits the read. Its SHA-256 must be the one the server states."""
        owner, name = split_handle(handle)
        resp = self.get(f"/v1/identities/{_q(owner)}/{_q(name)}/artifacts/{_q(artifact_id)}"
                        f"/payload", purpose=purpose)
        stated = resp.headers.get("x-content-sha256")
        if stated and hashlib.sha256(resp.body).hexdigest() != stated:
            raise ServerError(f"the payload of {handle}'s artifact {artifact_id} does not match "
                              "the SHA-256 the server stated (corrupted in transit?)")
        return resp.body

    def generate(self, body: dict) -> dict:
        return self.request("POST", "/v1/generate", json_body=body).json()

    def job(self, job_id: str) -> dict:
        return self.get(f"/v1/jobs/{_q(job_id)}").json()

    def job_image(self, job_id: str) -> bytes:
        return self.get(f"/v1/jobs/{_q(job_id)}/image").body

    def verify_job(self, job_id: str) -> dict:
        return self.get(f"/v1/jobs/{_q(job_id)}/verify").json()

    # -- transport ----------------------------------------------------------------------
    def get(self, path: str, **params: str) -> Response:
        return self.request("GET", path, params=params)

    def request(self, method: str, path: str, *, params: dict | None = None,
                json_body: dict | None = None) -> Response:
        url = self.base_url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = None
        headers = {"Authorization": f"Bearer {self._key}", "Accept": "application/json"}
        if json_body is not None:
            data = json.dumps(json_body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                body = resp.read(MAX_PAYLOAD + 1)
                if len(body) > MAX_PAYLOAD:
                    raise ServerError(f"{method} {path}: the answer is larger than "
                                      f"{MAX_PAYLOAD} bytes")
                return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()},
                                body)
        except urllib.error.HTTPError as exc:
            raise self._error(exc, method, path) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach the idvault server at {self.base_url} "
                              f"({reason}): is it running, and is the URL right?") from None

    def _error(self, exc: urllib.error.HTTPError, method: str, path: str) -> IdvaultError:
        status = exc.code
        try:
            doc = json.loads(exc.read(1 << 16).decode("utf-8")).get("error", {})
        except (ValueError, UnicodeDecodeError, AttributeError):
            doc = {}
        code = doc.get("code") or ""
        message = doc.get("message") or exc.reason or "no details"
        if status == 401:
            return AuthError(f"idvault rejected the API key (401): {message}. Check the key "
                             "(revoked or expired keys stop working at once)",
                             status=status, code=code)
        if status == 403 and code in CONSENT_CODES:
            return ConsentRefused(f"consent refuses this use ({code}): {message}",
                                  status=status, code=code)
        if status == 403:
            return ScopeError(f"the API key may not do this (403): {message}",
                              status=status, code=code)
        if status == 404:
            return NotFoundError(f"not found (404): {message}", status=status, code=code)
        return ServerError(f"idvault answered {status} to {method} {path}: {message}",
                           status=status, code=code)


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")
