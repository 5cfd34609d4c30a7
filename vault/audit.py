"""Append-only, hash-chained audit log.

Each event's hash covers its sequence number, time, action, actor, owner,
subject, details and the previous event's hash, so altering, removing or
reordering any row breaks the chain from that row on. ``audit_head`` holds
the newest link; appends lock it (``SELECT ... FOR UPDATE`` on PostgreSQL,
``BEGIN IMMEDIATE`` on SQLite), so concurrent writers form one chain.
Details never hold biometric data or key material: ids, kinds, digests.

Whoever can write the data database could still cut the tail and copy the new
last hash into ``audit_head``; so appends leave the new head in
``session.info[HEAD_INFO]`` and the vault signs it into the key store after the
commit (vault.audit_anchor). :func:`verify` takes those checkpoints as
:class:`Anchor` s the chain must reach and hold.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from vault.errors import AuditChainBroken, InvalidInput
from vault.models import AuditEvent, AuditHead, utcnow

GENESIS = "0" * 64
HEAD_INFO = "idvault.audit_head"  # session.info key: (seq, hash) this transaction appended
_SEQ_HASH = re.compile(r"([1-9][0-9]{0,17}):([0-9a-fA-F]{64})")
ACTIONS = (
    "vault.init", "owner.create", "identity.create", "identity.delete", "identity.not_same",
    "artifact.write", "artifact.read", "artifact.delete", "consent.withdraw", "consent.expire",
    "keys.rotate", "keys.sweep", "index.rebuild", "apikey.create", "apikey.revoke", "generate", "personalize",
    "enroll", "review.accept", "review.reject", "photos.stage", "user.create",
    "user.password", "user.delete", "member.grant", "member.revoke",
    "records.seal", "audit.reanchor",
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
    # Vault.session() signs this into the key store once the transaction commits. (No
    # caller appends inside a savepoint; one rolled back would have to drop this key.)
    session.info[HEAD_INFO] = (head.seq, head.hash)
    return rows


def parse_seq_hash(text: str) -> tuple[int, str]:
    """``SEQ:HASH`` (what ``audit verify`` prints as the head) as ``(seq, hash)``."""
    m = _SEQ_HASH.fullmatch(text.strip())
    if m is None:
        raise InvalidInput(f"{text!r} is not SEQ:HASH: an event number (1 or more), a colon "
                           "and its 64 hex digit hash, as `idvault audit verify` prints the head")
    return int(m[1]), m[2].lower()


@dataclass(frozen=True)
class Anchor:
    """A (seq, hash) the chain must hold, and what vouches for it (``name``, for messages)."""

    seq: int
    hash: str
    name: str


@dataclass
class VerifyResult:
    ok: bool
    events: int  # events checked: all, or those from ``since`` on
    first_bad_seq: int | None = None
    reason: str | None = None
    head_seq: int = 0
    head_hash: str = GENESIS
    start_seq: int = 1
    anchored_seq: int | None = None  # the newest anchor's seq
    checkpoint: object | None = None  # vault.audit_anchor.Checkpoint, set by the vault

    @property
    def unanchored(self) -> int:
        """Events past the newest checkpoint (appended since, or a crash lost its write)."""
        return self.head_seq - (self.anchored_seq or 0)

    def raise_if_bad(self) -> None:
        if not self.ok:
            where = f" at event {self.first_bad_seq}" if self.first_bad_seq is not None else ""
            raise AuditChainBroken(f"audit chain broken{where}: {self.reason}",
                                   seq=self.first_bad_seq)


@dataclass(frozen=True)
class _Unreadable:
    seq: int
    error: str


def verify(session: Session, *, batch: int = 5000, anchors: Sequence[Anchor] = (),
           since: tuple[int, str] | None = None) -> VerifyResult:
    """Walk the chain; report the first event that does not fit.

    From the start, or from ``since`` = ``(seq, hash)``: that event must exist with that
    hash, and only the chain after it is walked. Every anchor must hold its hash at its seq
    (one below the walk is looked up directly), and the chain must reach the newest one.
    """
    expect = {a.seq: a for a in anchors}
    newest = max(anchors, key=lambda a: a.seq, default=None)
    anchored = newest.seq if newest else None

    def bad(seq: int | None, reason: str, events: int) -> VerifyResult:
        return VerifyResult(False, events, seq, reason, anchored_seq=anchored,
                            start_seq=since[0] if since else 1)

    prev_hash, expected_seq, count = GENESIS, 1, 0
    if since is not None:
        seq0, hash0 = since
        ev = _load(session, seq0)
        if ev is None:
            return bad(seq0, f"event {seq0} (given as the starting point) does not exist: the "
                             "chain is shorter, or the event was removed", 0)
        if isinstance(ev, _Unreadable):
            return bad(seq0, _unreadable(ev), 0)
        if ev.hash != hash0:
            return bad(seq0, f"event {seq0} has hash {ev.hash}, not the {hash0} given: the "
                             "chain was rewritten at or before it, or SEQ:HASH is wrong", 0)
        expected_seq = seq0
        if seq0 > 1:
            prev_hash = ev.prev_hash  # vouched for by the given hash, which covers it
    for a in sorted(anchors, key=lambda a: a.seq):
        if a.seq >= expected_seq:
            break
        ev = _load(session, a.seq)  # below the walk: only a point check
        if ev is None:
            return bad(a.seq, f"event {a.seq}, which {a.name} records, does not exist", 0)
        if isinstance(ev, _Unreadable):
            return bad(a.seq, _unreadable(ev), 0)
        if ev.hash != a.hash:
            return bad(a.seq, f"event {a.seq} does not have the hash {a.name} records "
                              f"({a.hash}): the chain was rewritten", 0)
    for ev in _stream(session, batch, after=expected_seq - 1):
        if isinstance(ev, _Unreadable):
            return bad(ev.seq, _unreadable(ev), count)
        if ev.seq != expected_seq:
            if ev.seq > expected_seq:
                return bad(expected_seq, f"event {expected_seq} is missing (next is {ev.seq})",
                           count)
            return bad(ev.seq, "sequence out of order", count)
        if ev.prev_hash != prev_hash:
            return bad(ev.seq, "previous-hash link does not match the event before it "
                               "(an event was removed, reordered or altered)", count)
        digest = event_hash(ev.seq, ev.at, ev.action, ev.actor, ev.owner, ev.subject,
                            ev.details, ev.prev_hash)
        if digest != ev.hash:
            return bad(ev.seq, "event contents do not match its hash (the row was altered)",
                       count)
        a = expect.get(ev.seq)
        if a is not None and a.hash != ev.hash:
            return bad(ev.seq, f"event {ev.seq} does not have the hash {a.name} records "
                               f"({a.hash}): the chain was rewritten from there on", count)
        prev_hash, expected_seq, count = ev.hash, ev.seq + 1, count + 1
    last = expected_seq - 1
    if since is not None and count == 0:
        return bad(since[0], f"event {since[0]} vanished while it was being verified", 0)
    head = session.get(AuditHead, 1)
    if head is None:
        return bad(expected_seq, "the chain head row is missing", count)
    if head.seq != last or head.hash != prev_hash:
        return bad(last + 1 if head.seq > last else head.seq,
                   f"the chain head says {head.seq} events but {last} remain "
                   "(events were removed from the end, or the head was altered)", count)
    if newest is not None and newest.seq > last:
        gone = (f"event {newest.seq} is" if newest.seq == last + 1 else
                f"events {last + 1}..{newest.seq} are")
        return bad(last + 1, f"{gone} missing: the chain ends at event {last} but "
                             f"{newest.name} records {newest.seq} (events were removed from "
                             "the end and the head rewritten)", count)
    return VerifyResult(True, count, head_seq=last, head_hash=prev_hash,
                        start_seq=since[0] if since else 1, anchored_seq=anchored)


def _unreadable(ev: _Unreadable) -> str:
    return (f"event {ev.seq} cannot be read ({ev.error}): the row was altered outside "
            "idvault")


_ROW_ERRORS = (ValueError, TypeError)  # what a garbled timestamp or JSON raises on load


def _load(session: Session, seq: int) -> AuditEvent | _Unreadable | None:
    try:
        return session.scalars(select(AuditEvent).where(AuditEvent.seq == seq)).one_or_none()
    except _ROW_ERRORS as exc:
        return _Unreadable(seq, str(exc))


def _stream(session: Session, batch: int, *, after: int = 0
            ) -> Iterable[AuditEvent | _Unreadable]:
    """Events past ``after`` in order; a row that cannot be loaded ends the stream with an
    :class:`_Unreadable` naming it (a failed batch is read again one row at a time)."""
    last = after
    while True:
        try:
            rows = session.scalars(
                select(AuditEvent).where(AuditEvent.seq > last).order_by(AuditEvent.seq)
                .limit(batch)
            ).all()
        except _ROW_ERRORS:
            seqs = session.scalars(select(AuditEvent.seq).where(AuditEvent.seq > last)
                                   .order_by(AuditEvent.seq).limit(batch)).all()
            rows = []
            for seq in seqs:
                ev = _load(session, seq)
                if isinstance(ev, _Unreadable):
                    yield from rows
                    yield ev
                    return
                if ev is not None:
                    rows.append(ev)
        if not rows:
            return
        yield from rows
        last = rows[-1].seq
        session.expunge_all()


def events(session: Session, *, owner: str | None = None, subject: str | None = None,
           limit: int = 100, before: int | None = None, action: str | None = None,
           actor: str | None = None, since: dt.datetime | None = None,
           until: dt.datetime | None = None) -> list[AuditEvent]:
    """Events newest first; each filter given narrows them (``since`` inclusive, ``until``
    exclusive). Page with ``before``: the last seq of the previous page."""
    q = select(AuditEvent).order_by(AuditEvent.seq.desc()).limit(limit)
    if owner is not None:
        q = q.where(AuditEvent.owner == owner)
    if subject is not None:
        q = q.where(AuditEvent.subject == subject)
    if before is not None:
        q = q.where(AuditEvent.seq < before)
    if action is not None:
        q = q.where(AuditEvent.action == action)
    if actor is not None:
        q = q.where(AuditEvent.actor == actor)
    if since is not None:
        q = q.where(AuditEvent.at >= since)
    if until is not None:
        q = q.where(AuditEvent.at < until)
    return list(session.scalars(q))
