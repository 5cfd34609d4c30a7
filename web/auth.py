"""Who is calling, for which owner, allowed to do what.

Every request acts for exactly one owner, through one of:

* an **API key** (``Authorization: Bearer idv_...``): the key's owner and
  scopes;
* a **UI session** (the ``idvault_session`` cookie): the signed-in user, the
  owner the session currently acts for, and the scopes of the user's role
  there (``vault.accounts.ROLE_SCOPES``). Unsafe requests made with a
  session (forms, and the UI's own calls to ``/v1``) must carry the
  session's CSRF token (form field ``csrf_token`` or header
  ``X-CSRF-Token``).

A session signed in with a one-time password can do nothing but change it
(``password_change_gate``, a ``before_request`` of the whole app). Sign-ins
are throttled per (account, client address) through the database
(``vault.login_throttle``), so every server process shares the count.

Handles of other owners are answered exactly as handles that do not exist
(404 with the same message), so nothing of another owner can be seen or
guessed. A missing scope or role is a 403 that names what is missing.
"""

from __future__ import annotations

import functools
import hmac
import secrets
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from flask import current_app, g, redirect, request, session, url_for
from sqlalchemy import Connection, select

from vault import accounts, api_keys, login_throttle
from vault.errors import NotFound
from vault.handles import Handle
from vault.models import Owner, WebSession
from web.errors import Forbidden, TooManyRequests, Unauthorized

SESSION_KEY = "sid"
CSRF_KEY = "csrf"
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Principal:
    """The caller: how it authenticated, its owner, and what it may do."""

    via: str  # "api_key" | "session"
    owner_id: int | None
    owner: str | None
    owner_kind: str | None
    scopes: frozenset[str]
    role: str | None = None
    username: str | None = None
    user_id: int | None = None
    superuser: bool = False
    key_id: int | None = None
    key_prefix: str | None = None
    key_name: str | None = None
    must_change_password: bool = False
    owners: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (owner, role)

    @property
    def actor(self) -> str:
        if self.via == "api_key":
            return f"api:{self.key_prefix}"
        return f"user:{self.username}"

    def to_json(self) -> dict:
        doc = {"via": self.via, "owner": None, "scopes": sorted(self.scopes),
               "role": self.role, "username": self.username, "key": None}
        if self.owner is not None:
            doc["owner"] = {"name": self.owner, "kind": self.owner_kind}
        if self.key_id is not None:
            doc["key"] = {"id": self.key_id, "prefix": self.key_prefix, "name": self.key_name}
        return doc


def _state():
    return current_app.extensions["idvault"]


# -- CSRF -----------------------------------------------------------------------------------
def csrf_token() -> str:
    """This browser session's CSRF token (created on first use)."""
    token = session.get(CSRF_KEY)
    if not token:
        token = session[CSRF_KEY] = secrets.token_urlsafe(32)
    return token


def check_csrf() -> None:
    expected = session.get(CSRF_KEY)
    given = request.headers.get("X-CSRF-Token") or (
        request.form.get("csrf_token") if request.mimetype in (
            "application/x-www-form-urlencoded", "multipart/form-data") else None)
    if not expected or not given or not hmac.compare_digest(str(expected), str(given)):
        raise Forbidden("missing or wrong CSRF token: reload the page and try again",
                        reason="csrf")


# -- resolving the caller ---------------------------------------------------------------------
def _from_api_key(token: str, conn: Connection | None) -> Principal:
    st = _state()
    with nullcontext(conn) if conn is not None else st.read_connection() as read:
        try:
            key = api_keys.verify(read, token)
        except api_keys.KeyRefused as exc:
            raise Unauthorized(str(exc)) from None
    p = Principal("api_key", key.owner_id, key.owner, key.owner_kind, frozenset(key.scopes),
                  key_id=key.id, key_prefix=key.prefix, key_name=key.name)
    if api_keys.needs_touch(key):  # at most once a minute per key: lookups stay reads
        with st.vault.session() as s:
            api_keys.touch(s, p.key_id)
    return p


def _from_session() -> Principal | None:
    token = session.get(SESSION_KEY)
    if not token:
        return None
    st = _state()
    with st.vault.session() as s:
        found = accounts.resume_session(s, token)
        if found is None:
            return None
        row, user = found
        owners = accounts.owners_of(s, user)
        roles = {o.id: (o, r) for o, r in owners}
        if row.owner_id not in roles:
            row.owner_id = owners[0][0].id if owners else None
        owner, role = roles.get(row.owner_id, (None, None))
        scopes = frozenset(accounts.ROLE_SCOPES[role]) if role else frozenset()
        return Principal("session", owner.id if owner else None, owner.name if owner else None,
                         owner.kind if owner else None, scopes, role=role,
                         username=user.username, user_id=user.id, superuser=user.superuser,
                         must_change_password=user.must_change_password,
                         owners=tuple((o.name, r) for o, r in owners))


def current_principal(conn: Connection | None = None) -> Principal | None:
    """The caller of this request (cached on ``g``); raises Unauthorized for a bad key.
    ``conn``: a read connection of this request to check the key on (a lookup uses one
    connection for all its reads)."""
    if "principal" not in g:
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthorized("use 'Authorization: Bearer <API key>'")
            g.principal = _from_api_key(token.strip(), conn)
        else:
            g.principal = _from_session()
    return g.principal


def require(scope: str | None = None, *, owner: bool = True,
            conn: Connection | None = None) -> Principal:
    """The caller, who must be authenticated, act for an owner and hold ``scope``."""
    p = current_principal(conn)
    if p is None:
        raise Unauthorized("authentication required: send 'Authorization: Bearer <API key>' "
                           "or sign in")
    if p.via == "session" and request.method in UNSAFE:
        check_csrf()
    if owner and p.owner is None:
        raise Forbidden("this account is not a member of any owner yet; ask an admin to add "
                        "you, or create an owner (superusers)")
    if scope is not None and scope not in p.scopes:
        if p.via == "api_key":
            raise Forbidden(f"this API key lacks the scope {scope!r} (it has: "
                            f"{', '.join(sorted(p.scopes))})", needed=scope)
        raise Forbidden(f"your role in {p.owner} ({p.role}) does not allow this (needs "
                        f"{scope!r})", needed=scope)
    return p


def handle_in_owner(p: Principal, owner: str, name: str) -> str:
    """``owner/name`` checked: valid, and of the caller's owner (else the same 404)."""
    h = Handle.parse(f"{owner}/{name}")
    if h.owner != p.owner:
        raise NotFound(f"no identity {h}")
    return str(h)


# -- UI sign-in -------------------------------------------------------------------------------
def refused(lock: login_throttle.Lock) -> TooManyRequests:
    """The 429 for a lock in force, saying whom it covers and for how long."""
    who = ("this account from your address" if lock.scope == "account"
           else "every account from your address")
    return TooManyRequests(f"too many failed sign-ins: {who} is locked; try again in "
                           f"{lock.seconds} s (other addresses are not affected)",
                           retry_after=lock.seconds, locked=lock.scope)


def sign_in(username: str, password: str) -> accounts.User | None:
    """Check the password, counted by the throttle (``vault.login_throttle``) per
    (account, client address); start a session when it is right. A lock in force
    refuses before the password is checked (TooManyRequests, 429)."""
    st = _state()
    # ProxyFix has already put the client's address here when IDVAULT_TRUST_PROXY is set;
    # otherwise X-Forwarded-For is never read.
    address = request.remote_addr
    with st.vault.session() as s:
        lock = login_throttle.begin(s, username, address, policy=st.login_policy)
        if lock is None:
            user = accounts.authenticate(s, username, password)
            if user is None:
                login_throttle.record_failure(s, username, address, policy=st.login_policy)
                return None
            login_throttle.record_success(s, username, address)
            owners = accounts.owners_of(s, user)
            token = accounts.create_session(s, user, owners[0][0].id if owners else None,
                                            ttl=st.config.session_ttl)
    if lock is not None:
        raise refused(lock)
    session.clear()
    session.permanent = True
    session[SESSION_KEY] = token
    csrf_token()
    return user


def sign_out() -> None:
    token = session.get(SESSION_KEY)
    if token:
        with _state().vault.session() as s:
            accounts.end_session(s, token)
    session.clear()


def switch_owner(p: Principal, owner: str) -> None:
    names = dict(p.owners)
    if owner not in names:
        raise NotFound(f"no owner {owner!r}")
    token = session.get(SESSION_KEY)
    with _state().vault.session() as s:
        owner_id = s.scalar(select(Owner.id).where(Owner.name == owner))
        row = s.get(WebSession, accounts._token_id(token))
        if row is not None:
            row.owner_id = owner_id


def ui_login_required(scope: str | None = None, *, owner: bool = True) -> Callable:
    """For UI pages: redirect to the sign-in page when nobody is signed in."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            p = current_principal()
            if p is None or p.via != "session":
                return redirect(url_for("ui.account.login", next=request.full_path.rstrip("?")))
            if owner and p.owner is None:
                return redirect(url_for("ui.account.no_owner"))
            require(scope, owner=owner)
            return fn(*args, **kwargs)

        return wrapper

    return deco


# -- one-time passwords ---------------------------------------------------------------------
# What a session holding a one-time password may still reach: the page that changes it,
# signing out (or in as someone else), the static files those pages use, and what
# anyone may read without signing in (the health check, the OpenAPI document).
PASSWORD_CHANGE_ENDPOINTS = frozenset({"ui.account.password", "ui.account.logout",
                                       "ui.account.login", "static", "api.meta.health",
                                       "api.meta.openapi_document"})
PASSWORD_CHANGE_PATH = "/account"


def password_change_gate():
    """``before_request`` of the whole app: a session signed in with a one-time password
    (``User.must_change_password``) can do nothing but change it. The API answers 403
    with the one error shape, naming the page; UI pages redirect to it. API keys are
    not sessions and pass; so do requests without a session cookie, unresolved."""
    if request.headers.get("Authorization") or not session.get(SESSION_KEY):
        return None
    if request.endpoint in PASSWORD_CHANGE_ENDPOINTS:
        return None
    p = current_principal()
    if p is None or not p.must_change_password:
        return None
    if request.path == "/v1" or request.path.startswith("/v1/"):
        raise Forbidden("this session signed in with a one-time password: change it first "
                        f"at {PASSWORD_CHANGE_PATH} (the account page), then sign in again "
                        "or retry", reason="password_change_required",
                        change_at=PASSWORD_CHANGE_PATH)
    return redirect(url_for("ui.account.password"))
