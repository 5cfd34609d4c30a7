"""The sign-in throttle: failed sign-ins counted per (account, client address), in the data database.

Kept in the database, not in a process's memory, so every server process (and every
API node of a scale-out, which all share the one database) sees the same counts, and a
restart forgets nothing.

* **Per account and address.** ``Policy.limit`` failures of one account from one
  address within ``Policy.window`` lock that account *for that address only*: another
  address still signs in, so nobody can lock a user out everywhere by guessing badly.
  The first lock lasts ``Policy.lock``; each further lock of the same pair (while its
  row is remembered) doubles, up to ``Policy.max_lock``.
* **Per address, across accounts** (password spraying: one guess at many names):
  ``Policy.address_limit`` failures from one address lock that address for every
  account, with the same doubling. That row has the account ``*ADDRESS``.
* A success clears its pair's row, not the address's: one valid account must not
  reset a spray's count.
* Rows expire: a pair without a lock is forgotten ``window`` after its last failure,
  a locked one ``memory`` after its lock ends. Each sign-in deletes up to 500 expired
  rows found through the ``expires_at`` index, skipping rows another sign-in holds.

Session-level services (they never commit), like ``vault.accounts``. A sign-in runs
``begin`` (refused when locked), the password check, then ``record_failure`` or
``record_success``, in one transaction holding the pair's row lock (``SELECT ... FOR
UPDATE`` on PostgreSQL; SQLite's write transactions are serial anyway), so parallel
guesses cannot slip past the limit and no failure is lost.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from sqlalchemy import delete, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from vault.errors import Conflict, InvalidInput
from vault.models import LoginAttempt, utcnow

# The account of an address's row across accounts: upper case, so no typed name (they
# are counted lower-cased) can ever be taken for it.
ANY_ACCOUNT = "*ADDRESS"
MAX_KEY = 64  # column width of account and address


@dataclass(frozen=True)
class Policy:
    limit: int = 5  # failures of one account from one address before it locks there
    address_limit: int = 50  # failures from one address, all accounts together
    window: dt.timedelta = dt.timedelta(minutes=15)  # failures older than this are forgotten
    lock: dt.timedelta = dt.timedelta(minutes=5)  # the first lock; each next one doubles
    max_lock: dt.timedelta = dt.timedelta(hours=1)
    memory: dt.timedelta = dt.timedelta(hours=24)  # how long a past lock still doubles the next

    def __post_init__(self) -> None:
        if self.limit < 1 or self.address_limit < self.limit:
            raise InvalidInput("the login throttle needs 1 <= login_attempts <= "
                               f"login_address_attempts (got {self.limit} and "
                               f"{self.address_limit})")


@dataclass(frozen=True)
class Lock:
    """A lock in force: who it covers ("account" from this address, or the "address")."""

    scope: str
    until: dt.datetime
    seconds: int  # to wait, rounded up


def account_key(username: str) -> str:
    """How a typed username is counted: as ``authenticate`` looks it up."""
    return username.strip().lower()[:MAX_KEY] if isinstance(username, str) else ""


def address_key(address: str | None) -> str:
    return (address or "unknown")[:MAX_KEY]


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def locked(session: Session, username: str, address: str | None, *,
           now: dt.datetime | None = None) -> Lock | None:
    """The lock that refuses ``username`` from ``address`` now (the longer one), else None."""
    now = now or utcnow()
    addr = address_key(address)
    rows = session.scalars(select(LoginAttempt).where(
        tuple_(LoginAttempt.account, LoginAttempt.address).in_(
            [(account_key(username), addr), (ANY_ACCOUNT, addr)]),
        LoginAttempt.locked_until > now)).all()
    if not rows:
        return None
    row = max(rows, key=lambda r: _aware(r.locked_until))
    until = _aware(row.locked_until)
    return Lock("address" if row.account == ANY_ACCOUNT else "account", until,
                max(1, math.ceil((until - now).total_seconds())))


def begin(session: Session, username: str, address: str | None, *,
          policy: Policy = Policy(), now: dt.datetime | None = None) -> Lock | None:
    """Start a sign-in: take the pair's row lock for the rest of the transaction, so
    parallel attempts at one account from one address are judged one after another,
    and return the lock in force (then refuse without checking the password)."""
    now = now or utcnow()
    prune(session, now=now)
    _row(session, account_key(username), address_key(address), policy, now)
    return locked(session, username, address, now=now)


def record_failure(session: Session, username: str, address: str | None, *,
                   policy: Policy = Policy(), now: dt.datetime | None = None) -> Lock | None:
    """Count one failed sign-in; returns the lock it set off, if any."""
    now = now or utcnow()
    addr = address_key(address)
    pair = _bump(session, account_key(username), addr, policy.limit, policy, now)
    spray = _bump(session, ANY_ACCOUNT, addr, policy.address_limit, policy, now)
    for scope, until in (("account", pair), ("address", spray)):
        if until is not None:
            return Lock(scope, until, max(1, math.ceil((until - now).total_seconds())))
    return None


def record_success(session: Session, username: str, address: str | None) -> None:
    """A right password from this address: its pair starts afresh (the address row stays)."""
    session.execute(delete(LoginAttempt).where(LoginAttempt.account == account_key(username),
                                               LoginAttempt.address == address_key(address)))


def prune(session: Session, *, now: dt.datetime | None = None, batch: int = 500) -> int:
    """Delete up to ``batch`` rows past their expiry; returns how many.

    Rows another sign-in holds are skipped (``SKIP LOCKED`` on PostgreSQL), so pruning
    never waits for, or deadlocks with, a sign-in in progress; the next one gets them.
    """
    expired = (select(LoginAttempt.account, LoginAttempt.address)
               .where(LoginAttempt.expires_at < (now or utcnow()))
               .limit(batch).with_for_update(skip_locked=True))
    result = session.execute(delete(LoginAttempt).where(
        tuple_(LoginAttempt.account, LoginAttempt.address).in_(expired)))
    return result.rowcount or 0


def _row(session: Session, account: str, address: str, policy: Policy,
         now: dt.datetime) -> LoginAttempt:
    """The row of (account, address), created if absent, locked until the transaction ends."""
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    for _ in range(3):
        # ON CONFLICT DO NOTHING: a parallel request creating the same row is no error.
        session.execute(insert(LoginAttempt).values(
            account=account, address=address, failures=0, lockouts=0, window_start=now,
            expires_at=now + policy.window).on_conflict_do_nothing(
            index_elements=["account", "address"]))
        row = session.scalars(select(LoginAttempt).where(
            LoginAttempt.account == account, LoginAttempt.address == address)
            .with_for_update().execution_options(populate_existing=True)).one_or_none()
        if row is not None:
            return row
        # Another process's prune deleted the (expired) row between the two statements.
    raise Conflict(f"the sign-in count of {account!r} changed under this request; try again")


def _bump(session: Session, account: str, address: str, limit: int, policy: Policy,
          now: dt.datetime) -> dt.datetime | None:
    """One more failure on a row (created if need be); the new lock's end if it locks."""
    row = _row(session, account, address, policy, now)
    if _aware(row.window_start) + policy.window <= now:
        row.failures, row.window_start = 0, now
    row.failures += 1
    new_lock = None
    if row.failures >= limit:
        length = min(policy.lock * 2 ** min(row.lockouts, 16), policy.max_lock)
        row.lockouts += 1
        row.locked_until = new_lock = now + length
        row.failures, row.window_start = 0, now
    if row.lockouts:
        row.expires_at = max(_aware(row.locked_until), now) + policy.memory
    else:
        row.expires_at = now + policy.window
    session.flush()
    return new_lock
