"""UI accounts: users, their roles per owner, and signed-in sessions.

Session-level services (they never commit; the caller's ``Vault.session()``
owns the transaction), like ``vault.identities``.

* A new password (set by anyone, or generated) must be 10 to 1024 characters,
  not only spaces, not the username, and hard to guess: zxcvbn's score of at
  least 3 (``strength_problem``), which refuses common passwords, repeats
  ("aaaaaaaaaa", "abcabcabca"), sequences and keyboard walks, saying why.
* Passwords are hashed with **argon2id** (argon2-cffi's RFC 9106 low-memory
  profile by default: 3 passes over 64 MiB, 4 lanes); only the encoded hash
  is stored. A login for an unknown user still runs one verification, so the
  time taken does not tell whether the name exists.
* A **membership** gives a user one role in one owner: ``admin`` (everything,
  members, API keys), ``editor`` (enroll, delete, decide reviews, generate)
  or ``viewer`` (read metadata). A **superuser** acts as admin of every owner
  and may create owners; ``idvault serve`` creates the first one.
* A **session** is a random token in the browser's cookie; the database holds
  only its SHA-256, the user and the owner the session acts for. Signing out
  deletes the row; changing a password deletes all of that user's rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload

from vault import audit
from vault.api_keys import SCOPES
from vault.errors import AlreadyExists, InvalidInput, NotFound
from vault.identities import get_owner
from vault.models import MEMBER_ROLES, Membership, Owner, User, WebSession, utcnow

ROLES = MEMBER_ROLES
# What each role may do, in API-key scopes (docs/web.md#roles-and-scopes).
ROLE_SCOPES: dict[str, tuple[str, ...]] = {
    "viewer": ("identities:read",),
    "editor": ("identities:read", "identities:write", "generate"),
    "admin": SCOPES,
}
MIN_PASSWORD = 10
MIN_STRENGTH = 3  # zxcvbn's score (0-4); 3 needs an estimated 10^8 guesses or more
STRENGTH_PREFIX = 72  # zxcvbn's own length limit (its matching is quadratic in length)
MAX_PASSWORD = 1024  # argon2 takes any length; this bounds the work per login
SESSION_TTL = dt.timedelta(hours=12)
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._@+-]{2,63}$")

hasher = PasswordHasher()  # argon2id; tests swap in a cheaper one
# Verified against when the user does not exist, so timing does not tell.
_DUMMY_HASH: str | None = None


def validate_username(username: str) -> str:
    if not isinstance(username, str) or not _USERNAME.match(username):
        raise InvalidInput(
            "a username is 3 to 64 characters: lowercase letters, digits and . _ @ + -, "
            "starting with a letter or digit")
    return username


def password_problems(password: object, username: str | None = None) -> list[str]:
    """What is wrong with a new password, each as what it must be; [] when it is fine."""
    if not isinstance(password, str):
        return ["a string"]
    problems = []
    if len(password) < MIN_PASSWORD:
        problems.append(f"at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        problems.append(f"at most {MAX_PASSWORD} characters")
    if not password.strip():
        problems.append("more than spaces")
    elif username and password.strip().lower() == username.lower():
        problems.append("not the username")
    if not problems:
        weak = strength_problem(password, username)
        if weak:
            problems.append(weak)
    return problems


def strength_problem(password: str, username: str | None = None) -> str | None:
    """Why zxcvbn finds ``password`` easy to guess (score below ``MIN_STRENGTH``), else None.

    zxcvbn matches dictionary words and common passwords (the frequency lists it
    ships), repeats, sequences, keyboard patterns and dates, and estimates the
    guesses an attacker needs; the username and "idvault" count as known words.
    It reads at most ``STRENGTH_PREFIX`` characters: a longer password is judged
    by its start, which can only make it look weaker than it is.
    """
    # imported here: its frequency lists take 13 MiB in every process that imports it,
    # and only setting a password needs them (not a server answering lookups)
    from zxcvbn import zxcvbn

    inputs = [w for w in (username, "idvault") if w]
    result = zxcvbn(password[:STRENGTH_PREFIX], user_inputs=inputs,
                    max_length=STRENGTH_PREFIX)
    if result["score"] >= MIN_STRENGTH:
        return None
    feedback = result.get("feedback") or {}
    why = (feedback.get("warning") or "it follows a pattern that is easy to guess").rstrip(".")
    advice = " ".join(feedback.get("suggestions") or [])
    return (f"harder to guess: {why[:1].lower() + why[1:]}. {advice + ' ' if advice else ''}"
            "A few unrelated words, or a password manager's random password, work well")


def validate_password(password: object, username: str | None = None) -> str:
    problems = password_problems(password, username)
    if problems:
        raise InvalidInput("password rejected: it must be " + "; ".join(problems),
                           problems=problems)
    return password  # type: ignore[return-value]


def generate_password(username: str | None = None) -> str:
    """A random password of 20 URL-safe characters (~120 bits) that passes the policy.

    Random characters pass it at once; the loop only rules out a freak draw
    (one that happens to spell the username, say)."""
    while True:
        password = secrets.token_urlsafe(15)
        if not password_problems(password, username):
            return password


def hash_password(password: str) -> str:
    return hasher.hash(password)


def check_password(user: User | None, password: str) -> bool:
    """Constant work whether or not ``user`` exists."""
    global _DUMMY_HASH
    if user is None or user.disabled:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = hasher.hash(secrets.token_hex(16))
        try:
            hasher.verify(_DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            pass
        return False
    try:
        return hasher.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# -- users ------------------------------------------------------------------------------
def create_user(session: Session, username: str, password: str | None = None, *,
                actor: str, superuser: bool = False) -> tuple[User, str | None]:
    """A new user; returns it and the generated password when none was given.

    A generated password is a one-time password: the UI asks for a new one
    at the first sign-in.
    """
    validate_username(username)
    generated = None
    if password is None:
        password = generated = generate_password(username)
    else:
        validate_password(password, username)
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise AlreadyExists(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), superuser=superuser,
                must_change_password=generated is not None, password_changed_at=utcnow())
    session.add(user)
    session.flush()
    audit.append(session, "user.create", actor=actor, subject=username,
                 details={"superuser": superuser, "one_time_password": generated is not None})
    return user, generated


def get_user(session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username)
                          .options(selectinload(User.memberships)
                                   .selectinload(Membership.owner)))
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username).options(
        selectinload(User.memberships).selectinload(Membership.owner))))


def count_users(session: Session) -> int:
    return len(session.scalars(select(User.id)).all())


def set_password(session: Session, username: str, password: str | None = None, *,
                 actor: str) -> str | None:
    """Set (or generate, returned) a new password; ends every session of the user."""
    user = get_user(session, username)
    generated = None
    if password is None:
        password = generated = generate_password(username)
    else:
        validate_password(password, username)
    user.password_hash = hash_password(password)
    user.must_change_password = generated is not None
    user.password_changed_at = utcnow()
    end_all_sessions(session, user.id)
    audit.append(session, "user.password", actor=actor, subject=username,
                 details={"one_time_password": generated is not None})
    return generated


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The user when the password is right (and the account enabled), else None."""
    if not isinstance(username, str) or not isinstance(password, str):
        return None
    if len(password) > MAX_PASSWORD or len(username) > 64:
        return None
    user = session.scalar(select(User).where(User.username == username.strip().lower()))
    if not check_password(user, password):
        return None
    assert user is not None
    if hasher.check_needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    user.last_login_at = utcnow()
    return user


def delete_user(session: Session, username: str, *, actor: str) -> None:
    session.delete(get_user(session, username))
    session.flush()
    audit.append(session, "user.delete", actor=actor, subject=username)


# -- memberships ------------------------------------------------------------------------
def grant(session: Session, username: str, owner: str, role: str, *,
          actor: str) -> Membership:
    """Give ``username`` ``role`` in ``owner`` (replacing the role it had there)."""
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    user = get_user(session, username)
    owner_row = get_owner(session, owner)
    member = session.scalar(select(Membership).where(Membership.user_id == user.id,
                                                     Membership.owner_id == owner_row.id))
    previous = None if member is None else member.role
    if member is None:
        member = Membership(user_id=user.id, owner_id=owner_row.id, role=role)
        session.add(member)
    else:
        member.role = role
    session.flush()
    audit.append(session, "member.grant", actor=actor, owner=owner_row.name, subject=username,
                 details={"role": role, "previous": previous})
    return member


def revoke(session: Session, username: str, owner: str, *, actor: str) -> None:
    user = get_user(session, username)
    owner_row = get_owner(session, owner)
    member = session.scalar(select(Membership).where(Membership.user_id == user.id,
                                                     Membership.owner_id == owner_row.id))
    if member is None:
        raise NotFound(f"{username} is not a member of {owner}")
    role = member.role
    session.delete(member)
    session.flush()
    session.expire(user, ["memberships"])  # its loaded list still holds the deleted row
    audit.append(session, "member.revoke", actor=actor, owner=owner_row.name, subject=username,
                 details={"role": role})


def role_in(session: Session, user: User, owner_id: int) -> str | None:
    """The user's role in an owner (superusers: admin everywhere), or None."""
    if user.superuser:
        return "admin"
    return session.scalar(select(Membership.role).where(Membership.user_id == user.id,
                                                        Membership.owner_id == owner_id))


def owners_of(session: Session, user: User) -> list[tuple[Owner, str]]:
    """The owners a user may act for, with the role, by owner name."""
    if user.superuser:
        return [(o, "admin") for o in session.scalars(select(Owner).order_by(Owner.name))]
    rows = session.execute(select(Owner, Membership.role).join(
        Membership, Membership.owner_id == Owner.id).where(Membership.user_id == user.id)
        .order_by(Owner.name)).all()
    return [(o, r) for o, r in rows]


def members_of(session: Session, owner: str) -> list[dict]:
    owner_row = get_owner(session, owner)
    rows = session.execute(select(User, Membership).join(Membership).where(
        Membership.owner_id == owner_row.id).order_by(User.username)).all()
    return [{"username": u.username, "role": m.role,
             "since": m.created_at.isoformat(),
             "last_login_at": u.last_login_at.isoformat() if u.last_login_at else None}
            for u, m in rows]


def describe_user(user: User) -> dict:
    return {"username": user.username, "superuser": user.superuser,
            "disabled": user.disabled, "must_change_password": user.must_change_password,
            "created_at": user.created_at.isoformat(),
            "last_login_at": user.last_login_at.isoformat() if user.last_login_at else None,
            "memberships": [{"owner": m.owner.name, "role": m.role} for m in user.memberships]}


# -- sessions ---------------------------------------------------------------------------
def _token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_session(session: Session, user: User, owner_id: int | None, *,
                   ttl: dt.timedelta = SESSION_TTL) -> str:
    """A new session for ``user``; returns the token for the cookie (never stored)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    session.add(WebSession(id=_token_id(token), user_id=user.id, owner_id=owner_id,
                           created_at=now, last_seen_at=now, expires_at=now + ttl))
    # Expired rows of anyone are removed as sessions are created.
    session.execute(delete(WebSession).where(WebSession.expires_at < now))
    session.flush()
    return token


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def resume_session(session: Session, token: str) -> tuple[WebSession, User] | None:
    """The live session and its user for a cookie token, else None."""
    if not isinstance(token, str) or not 16 <= len(token) <= 128:
        return None
    row = session.get(WebSession, _token_id(token))
    if row is None:
        return None
    now = utcnow()
    if _aware(row.expires_at) < now:
        session.delete(row)
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    if now - _aware(row.last_seen_at) > dt.timedelta(minutes=5):
        row.last_seen_at = now
    return row, user


def end_session(session: Session, token: str) -> None:
    session.execute(delete(WebSession).where(WebSession.id == _token_id(token)))


def end_all_sessions(session: Session, user_id: int) -> None:
    session.execute(delete(WebSession).where(WebSession.user_id == user_id))
