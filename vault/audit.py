"""Append-only, hash-chained audit log.

Each event's hash covers its sequence number, time, action, actor, owner,
subject, details and the previous event's hash, so altering, removing or
reordering any row breaks the chain from that row on. ``audit_head`` holds
the newest link; appends lock it (``SELECT ... FOR UPDATE`` on PostgreSQL,
``BEGIN IMMEDIATE`` on SQLite), so concurrent writers form one chain.
Details never hold biometric data or key material: ids, kinds, digests.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from vault.errors import AuditChainBroken
from vault.models import AuditEvent, AuditHead, utcnow

GENESIS = "0" * 64
ACTIONS = (
    "vault.init", "owner.create", "identity.create", "identity.delete", "identity.not_same",
    "artifact.write", "artifact.read", "artifact.delete", "consent.withdraw", "consent.expire",
    "keys.rotate", "index.rebuild", "apikey.create", "apikey.revoke", "generate", "personalize",
    "enroll", "review.accept", "review.reject", "photos.stage", "user.create",
    "user.password", "user.delete", "member.grant", "member.revoke",
)


def cli_actor(environ=None) -> str:
    """The audit actor of a command run on this machine: ``cli:<account>``.

    ``$USER`` when set (what the shell says), else the OS account of this process (cron,
    systemd and containers often leave ``$USER`` unset), else its numeric uid: an event
    always names who ran it, never ``cli:unknown``.
    """
    env = os.environ if environ is None else environ
    name = env.get("USER", "").strip()
    if not name:
        try:
            import pwd

            name = pwd.getpwuid(os.getuid()).pw_name
        except (ImportError, KeyError):  # no passwd entry (a bare container's uid)
            name = f"uid{os.getuid()}"
    return f"cli:{name}"


def canonical_time(value: dt.datetime) -> str:
    # SQLite drops tzinfo on the way back; all times are stored in UTC.
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


def event_hash(seq: int, at: dt.datetime, action: str, actor: str, owner: str | None,
               subject: str | None, details: dict, prev_hash: str) -> str:
    body = json.dumps(
        [seq, canonical_time(at), action, actor, owner, subject, details, prev_hash],
        sort_keys=True, separators=(",", ":"), ensure_ascii=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()


def ensure_head(session: Session) -> None:
    if session.get(AuditHead, 1) is None:
        session.add(AuditHead(id=1, seq=0, hash=GENESIS))
        session.flush()


def append(session: Session, action: str, *, actor: str, owner: str | None = None,
           subject: str | None = None, details: dict | None = None) -> AuditEvent:
    """Add one event to the chain inside the caller's transaction."""
    return append_many(session, [Event(action, actor, owner, subject, details)])[0]


@dataclass(frozen=True)
class Event:
    """An event to append (:func:`append_many`)."""

    action: str
    actor: str
    owner: str | None = None
    subject: str | None = None
    details: dict | None = None


def append_many(session: Session, events: Sequence[Event]) -> list[AuditEvent]:
    """Add events to the chain, in order, inside the caller's transaction: the head row is
    locked and written once however many there are (a generation reads several artifacts)."""
    for e in events:
        if e.action not in ACTIONS:
            raise ValueError(f"unknown audit action {e.action!r}")
    if not events:
        return []
    head = session.scalar(select(AuditHead).where(AuditHead.id == 1).with_for_update())
    if head is None:
        raise AuditChainBroken("the audit chain has no head row; the database was not "
                               "initialised with `idvault init` or the row was deleted")
    at = utcnow()
    rows = []
    for e in events:
        details = json.loads(json.dumps(e.details or {}, sort_keys=True))
        seq = head.seq + 1
        digest = event_hash(seq, at, e.action, e.actor, e.owner, e.subject, details, head.hash)
        rows.append(AuditEvent(seq=seq, at=at, action=e.action, actor=e.actor, owner=e.owner,
                               subject=e.subject, details=details, prev_hash=head.hash,
                               hash=digest))
        head.seq, head.hash = seq, digest
    session.add_all(rows)
    session.flush()
    return rows


@dataclass
class VerifyResult:
    ok: bool
    events: int
    first_bad_seq: int | None = None
    reason: str | None = None

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise AuditChainBroken(f"audit chain broken at event {self.first_bad_seq}: "
                                   f"{self.reason}", seq=self.first_bad_seq)


def verify(session: Session, *, batch: int = 5000) -> VerifyResult:
    """Walk the chain from the start; report the first event that does not fit."""
    prev_hash, expected_seq, count = GENESIS, 1, 0
    for ev in _stream(session, batch):
        if ev.seq != expected_seq:
            if ev.seq > expected_seq:
                return VerifyResult(False, count, expected_seq,
                                    f"event {expected_seq} is missing (next is {ev.seq})")
            return VerifyResult(False, count, ev.seq, "sequence out of order")
        if ev.prev_hash != prev_hash:
            return VerifyResult(False, count, ev.seq,
                                "previous-hash link does not match the event before it "
                                "(an event was removed, reordered or altered)")
        digest = event_hash(ev.seq, ev.at, ev.action, ev.actor, ev.owner, ev.subject,
                            ev.details, ev.prev_hash)
        if digest != ev.hash:
            return VerifyResult(False, count, ev.seq, "event contents do not match its hash "
                                                      "(the row was altered)")
        prev_hash, expected_seq, count = ev.hash, ev.seq + 1, count + 1
    head = session.get(AuditHead, 1)
    if head is None:
        return VerifyResult(False, count, expected_seq, "the chain head row is missing")
    if head.seq != count or head.hash != prev_hash:
        return VerifyResult(False, count, count + 1 if head.seq > count else head.seq,
                            f"the chain head says {head.seq} events but {count} remain "
                            "(events were removed from the end, or the head was altered)")
    return VerifyResult(True, count)


def _stream(session: Session, batch: int) -> Iterable[AuditEvent]:
    last = 0
    while True:
        rows = session.scalars(
            select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq).limit(batch)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].seq
        session.expunge_all()


def events(session: Session, *, owner: str | None = None, subject: str | None = None,
           limit: int = 100, before: int | None = None) -> list[AuditEvent]:
    q = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
    if owner is not None:
        q = q.where(AuditEvent.owner == owner)
    if subject is not None:
        q = q.where(AuditEvent.subject == subject)
    if before is not None:
        q = q.where(AuditEvent.seq < before)
    return list(session.scalars(q))
