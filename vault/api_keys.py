"""API keys: the credentials services use to call the JSON API for one owner.

A key looks like ``idv_<prefix>_<secret>``: the 12-hex-digit prefix finds
the row (it is unique and shown in listings), the whole key is checked
against the stored SHA-256 with a constant-time comparison. The key itself
is shown once, when it is created, and never stored. Every key belongs to
exactly one owner and carries scopes:

``identities:read``   identities, consent, artifact metadata, reviews, jobs, audit events
``identities:write``  create, enroll, delete, decide reviews, not-same pairs, withdraw consent
``artifacts:read``    decrypted artifact downloads and exports (consent permitting; audited)
``generate``          generation and personalisation jobs
``admin``             members, API keys, audit verification, maintenance jobs

Keys may expire; revoked and expired keys are refused. ``last_used_at`` is
updated at most once a minute per key, so lookups do not become writes.
Session-level services: they never commit.

The web checks every request's key with :func:`verify`: one indexed Core
SELECT (the key joined to its owner; a :class:`~vault.compiled_read.CompiledRead`)
and a SHA-256, some 30 µs, and no cache, so a revocation is honoured by the
next request of every process.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.orm import Session

from vault import audit
from vault.compiled_read import CompiledRead
from vault.errors import Conflict, InvalidInput, NotFound
from vault.identities import get_owner
from vault.models import ApiKey, Owner, utcnow

SCOPES: tuple[str, ...] = ("identities:read", "identities:write", "artifacts:read",
                           "generate", "admin")
SCOPE_HELP = {
    "identities:read": "identities, consent, artifact metadata, reviews, jobs, audit events",
    "identities:write": "create, enroll, delete, decide reviews, not-same pairs, "
                        "withdraw consent",
    "artifacts:read": "decrypted artifact downloads and exports (consent permitting; audited)",
    "generate": "generation and personalisation jobs",
    "admin": "members, API keys, audit verification, maintenance jobs",
}
TOKEN_PREFIX = "idv_"
# The shape of a token, looser than the tokens we issue (43-character secrets): a token of
# this shape is looked up and, if no key matches, "unknown", not "malformed"; only text that
# cannot be a key at all is malformed. The bound keeps hashing cheap.
_TOKEN = re.compile(r"^idv_([0-9a-f]{12})_([A-Za-z0-9_-]{1,128})$")
MAX_EXPIRY_DAYS = 3650
TOUCH_EVERY = dt.timedelta(minutes=1)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def validate_scopes(scopes: object) -> list[str]:
    if not isinstance(scopes, list | tuple) or not scopes or not all(
            isinstance(s, str) for s in scopes):
        raise InvalidInput(f"'scopes' must be a non-empty list from: {', '.join(SCOPES)}")
    unknown = sorted({s for s in scopes if s not in SCOPES})
    if unknown:
        raise InvalidInput(f"unknown scope(s) {', '.join(unknown)}; scopes are: "
                           f"{', '.join(SCOPES)}")
    return [s for s in SCOPES if s in scopes]


def validate_key_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > 64 or any(
            ord(c) < 32 or c == "\x7f" for c in name):
        raise InvalidInput("a key name is 1 to 64 printable characters")
    return name.strip()


def create_key(session: Session, owner: str, name: str, scopes: list[str] | tuple[str, ...],
               *, expires_at: dt.datetime | None = None, actor: str) -> tuple[ApiKey, str]:
    """A new key of ``owner``; returns the row and the key (shown once, never stored)."""
    name = validate_key_name(name)
    scopes = validate_scopes(scopes)
    now = utcnow()
    if expires_at is not None:
        expires_at = _aware(expires_at)
        if expires_at <= now:
            raise InvalidInput("the expiry must be in the future")
        if expires_at > now + dt.timedelta(days=MAX_EXPIRY_DAYS):
            raise InvalidInput(f"the expiry must be within {MAX_EXPIRY_DAYS} days")
    owner_row = get_owner(session, owner)
    prefix = secrets.token_hex(6)
    while session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is not None:
        prefix = secrets.token_hex(6)  # pragma: no cover - 48 random bits
    token = f"{TOKEN_PREFIX}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(owner_id=owner_row.id, name=name, prefix=prefix, secret_sha256=_digest(token),
                 scopes=scopes, created_at=now, expires_at=expires_at)
    session.add(key)
    session.flush()
    audit.append(session, "apikey.create", actor=actor, owner=owner_row.name,
                 subject=f"key:{prefix}",
                 details={"key": key.id, "name": name, "scopes": scopes,
                          "expires_at": expires_at.isoformat() if expires_at else None})
    return key, token


class KeyRefused(Exception):
    """Why a presented key is not accepted (its text is safe to show the caller)."""


def _prefix(token: object) -> str:
    m = _TOKEN.match(token) if isinstance(token, str) else None
    if m is None:
        raise KeyRefused("malformed API key (expected idv_<prefix>_<secret>)")
    return m.group(1)


def _accept(key, token: str, now: dt.datetime) -> None:
    """Raise KeyRefused unless ``key`` (the row found by the token's prefix, or None) is
    the token's, not revoked and not expired."""
    # Compare against something even when the prefix is unknown.
    stored = key.secret_sha256 if key is not None else "0" * 64
    if not hmac.compare_digest(stored, _digest(token)) or key is None:
        raise KeyRefused("unknown API key")
    if key.revoked_at is not None:
        raise KeyRefused("this API key was revoked")
    if key.expires_at is not None and _aware(key.expires_at) <= now:
        raise KeyRefused("this API key has expired")


def authenticate(session: Session, token: str, *, now: dt.datetime | None = None,
                 touch: bool = True) -> tuple[ApiKey, Owner]:
    """The key and its owner for a presented token; raises KeyRefused.

    With ``touch`` (default) ``last_used_at`` is updated in this session when
    due. The web's read path uses :func:`verify` instead.
    """
    prefix = _prefix(token)
    row = session.execute(select(ApiKey, Owner).join(Owner, Owner.id == ApiKey.owner_id)
                          .where(ApiKey.prefix == prefix)).first()
    now = now or utcnow()
    _accept(row[0] if row else None, token, now)
    key, owner = row
    if touch and needs_touch(key, now):
        key.last_used_at = now
    return key, owner


@dataclass(frozen=True)
class KeyGrant:
    """An accepted key, as :func:`verify` reads it: the key's fields and its owner's."""

    id: int
    prefix: str
    name: str
    scopes: tuple[str, ...]
    last_used_at: dt.datetime | None
    owner_id: int
    owner: str
    owner_kind: str


KEY_BY_PREFIX = (
    select(ApiKey.id, ApiKey.prefix, ApiKey.name, ApiKey.scopes, ApiKey.secret_sha256,
           ApiKey.revoked_at, ApiKey.expires_at, ApiKey.last_used_at,
           Owner.id.label("owner_id"), Owner.name.label("owner"), Owner.kind.label("owner_kind"))
    .join(Owner, Owner.id == ApiKey.owner_id)
    .where(ApiKey.prefix == bindparam("prefix")))
_KEY_BY_PREFIX = CompiledRead(KEY_BY_PREFIX)


def verify(conn: Connection, token: str, *, now: dt.datetime | None = None) -> KeyGrant:
    """:func:`authenticate` for read paths: one Core SELECT, nothing written or cached (the
    caller touches ``last_used_at`` when :func:`needs_touch` says so); raises KeyRefused."""
    row = _KEY_BY_PREFIX.first(conn, {"prefix": _prefix(token)})
    _accept(row, token, now or utcnow())
    return KeyGrant(row.id, row.prefix, row.name, tuple(row.scopes), row.last_used_at,
                    row.owner_id, row.owner, row.owner_kind)


def needs_touch(key: ApiKey | KeyGrant, now: dt.datetime | None = None) -> bool:
    """Whether ``last_used_at`` is older than a minute (or unset)."""
    last = _aware(key.last_used_at)
    return last is None or (now or utcnow()) - last >= TOUCH_EVERY


def touch(session: Session, key_id: int, now: dt.datetime | None = None) -> None:
    key = session.get(ApiKey, key_id)
    if key is not None:
        key.last_used_at = now or utcnow()


def list_keys(session: Session, owner: str) -> list[ApiKey]:
    owner_row = get_owner(session, owner)
    return list(session.scalars(select(ApiKey).where(ApiKey.owner_id == owner_row.id)
                                .order_by(ApiKey.id)))


def get_key(session: Session, owner: str, key_id: int) -> ApiKey:
    owner_row = get_owner(session, owner)
    key = session.get(ApiKey, key_id) if isinstance(key_id, int) else None
    if key is None or key.owner_id != owner_row.id:
        raise NotFound(f"no API key {key_id}")
    return key


def find_key(session: Session, id_or_prefix: str) -> ApiKey:
    """A key by number or prefix, any owner (the CLI's ``apikey revoke``)."""
    text = id_or_prefix.removeprefix(TOKEN_PREFIX)
    key = None
    if re.fullmatch(r"[0-9a-f]{12}", text):  # a prefix (it may be all digits)
        key = session.scalar(select(ApiKey).where(ApiKey.prefix == text))
    if key is None and text.isdigit() and len(text) < 10:
        key = session.get(ApiKey, int(text))
    if key is None:
        raise NotFound(f"no API key {id_or_prefix!r}")
    return key


def revoke_key(session: Session, key: ApiKey, *, actor: str) -> ApiKey:
    if key.revoked_at is not None:
        raise Conflict(f"API key {key.id} ({key.prefix}) was already revoked")
    key.revoked_at = utcnow()
    owner = session.get(Owner, key.owner_id)
    audit.append(session, "apikey.revoke", actor=actor, owner=owner.name if owner else None,
                 subject=f"key:{key.prefix}", details={"key": key.id, "name": key.name})
    return key


def key_status(key: ApiKey, now: dt.datetime | None = None) -> str:
    now = now or utcnow()
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and _aware(key.expires_at) <= now:
        return "expired"
    return "active"


def describe_key(key: ApiKey, owner: str | None = None) -> dict:
    def iso(v: dt.datetime | None) -> str | None:
        return _aware(v).isoformat() if v else None

    doc = {"id": key.id, "name": key.name, "prefix": key.prefix, "scopes": list(key.scopes),
           "status": key_status(key), "created_at": iso(key.created_at),
           "expires_at": iso(key.expires_at), "revoked_at": iso(key.revoked_at),
           "last_used_at": iso(key.last_used_at)}
    if owner is not None:
        doc["owner"] = owner
    return doc
