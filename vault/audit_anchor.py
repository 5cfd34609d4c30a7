"""Signed checkpoints of the audit chain's head, kept in the key store.

The chain (vault.audit) lives in the data database, so whoever can write that
database could cut its tail and copy the new last hash into ``audit_head``.
After every commit that appended events, the vault signs (vault id, seq, hash,
time) with its Ed25519 key and stores it in the key store (:func:`record`),
only ever forward: a writer whose head is older than the stored one leaves it.
``audit verify`` then requires the chain to reach the newest checkpoint and to
hold its hash there; a head past it is fine (a crash between the data commit
and the checkpoint write, reported as events not yet anchored).

Rows: slot 0 is the newest checkpoint; slot ``n`` keeps the first one written
at or past event ``n * HISTORY_EVERY``, so the key store grows by one row per
thousand events. A key store that never had a checkpoint carries the
``audit_anchor_pending`` marker (new vaults until their first checkpoint,
vaults from before k0002 until opened with their keys); with neither marker nor
checkpoint, the checkpoints were deleted and the chain counts as broken.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, select, text
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from vault.audit import Anchor, canonical_time
from vault.db import READ_ONLY
from vault.errors import VaultError
from vault.keystore import KeyStore
from vault.keystore_models import AuditCheckpoint, KeystoreMeta
from vault.models import utcnow

CHECKPOINT_TYPE = "idvault.audit-checkpoint/1"
HISTORY_EVERY = 1000
PENDING = "audit_anchor_pending"
log = logging.getLogger("idvault.vault")


@dataclass(frozen=True)
class Checkpoint:
    slot: int
    seq: int
    hash: str
    at: dt.datetime
    key_id: str
    signature: bytes

    @property
    def name(self) -> str:
        return f"the checkpoint signed {canonical_time(self.at)}"

    def anchor(self) -> Anchor:
        return Anchor(self.seq, self.hash, self.name)

    def describe(self) -> dict:
        return {"seq": self.seq, "hash": self.hash, "at": canonical_time(self.at),
                "key_id": self.key_id}


@dataclass
class State:
    """The key store's checkpoints as verified: what the chain must hold, or what is wrong."""

    latest: Checkpoint | None
    anchors: list[Anchor]
    pending: bool
    problem: str | None = None
    problem_seq: int | None = None


def message(vault_id: uuid.UUID, seq: int, head_hash: str, at: dt.datetime) -> bytes:
    """The bytes a checkpoint's signature covers."""
    return json.dumps({"type": CHECKPOINT_TYPE, "vault": str(vault_id), "seq": seq,
                       "hash": head_hash, "at": canonical_time(at)},
                      sort_keys=True, separators=(",", ":")).encode()


def _session(keys: KeyStore, *, read_only: bool = False) -> Session:
    bind = keys.engine.execution_options(**{READ_ONLY: True}) if read_only else keys.engine
    return Session(bind, expire_on_commit=False)


def record(keys: KeyStore, seq: int, head_hash: str) -> bool:
    """Store a signed checkpoint of ``(seq, head_hash)`` unless the stored one is as new or
    newer; whether it was written. The newest row is locked while compared, so of two
    racing writers the newer always stays."""
    at = utcnow()
    key_id, _, signature = keys.sign(message(keys.vault_id, seq, head_hash, at))
    for attempt in range(2):
        try:
            with _session(keys) as s, s.begin():
                if s.get_bind().dialect.name == "postgresql":
                    # A server crash may lose this write, never corrupt anything: that is
                    # the commit-then-crash window verify accepts (not yet anchored), and
                    # the commit then costs no WAL flush wait.
                    s.execute(text("SET LOCAL synchronous_commit = off"))
                latest = s.scalar(select(AuditCheckpoint).where(AuditCheckpoint.slot == 0)
                                  .with_for_update())
                if latest is not None and latest.seq >= seq:
                    return False
                before = latest.seq if latest is not None else 0
                values = {"seq": seq, "hash": head_hash, "at": at, "key_id": str(key_id),
                          "signature": signature}
                if latest is None:
                    s.add(AuditCheckpoint(slot=0, **values))
                else:
                    for name, value in values.items():
                        setattr(latest, name, value)
                if seq // HISTORY_EVERY > before // HISTORY_EVERY:
                    # under the lock and only forward, so this slot was never written
                    s.merge(AuditCheckpoint(slot=seq // HISTORY_EVERY, **values))
            return True
        except SAIntegrityError:
            if attempt:  # a concurrent first checkpoint; the second pass sees it
                raise
    return False


def record_quietly(keys: KeyStore, seq: int, head_hash: str) -> None:
    """:func:`record` after a data commit: a failure must not report the committed work as
    failed; ``audit verify`` shows the events as not yet anchored, and the next commit that
    appends anchors them."""
    try:
        record(keys, seq, head_hash)
    except (VaultError, SQLAlchemyError) as exc:
        log.warning("audit checkpoint of event %s not written (%s); the next append "
                    "anchors it", seq, exc)


def mark_pending(keys: KeyStore) -> None:
    with _session(keys) as s, s.begin():
        if s.get(KeystoreMeta, PENDING) is None:
            s.add(KeystoreMeta(key=PENDING, value="init"))


def anchor_pending(keys: KeyStore, read_head: Callable[[], tuple[int, str] | None]) -> bool:
    """Anchor the head ``read_head()`` returns (the data database's ``audit_head``) once,
    where the key store is marked pending; whether it was. Needs the keys; without them it
    stays pending."""
    with _session(keys, read_only=True) as s, s.begin():
        if s.get(KeystoreMeta, PENDING) is None:
            return False
    head = read_head()
    if head is None or head[0] == 0:
        return False
    try:
        record(keys, *head)
    except (VaultError, SQLAlchemyError) as exc:
        log.warning("the audit head could not be anchored yet (%s)", exc)
        return False
    with _session(keys) as s, s.begin():
        s.execute(delete(KeystoreMeta).where(KeystoreMeta.key == PENDING))
    return True


def reset(keys: KeyStore) -> None:
    """Drop every checkpoint and mark the key store pending, in one transaction (an
    accepted restore, before its ``audit.reanchor`` event is anchored)."""
    with _session(keys) as s, s.begin():
        s.execute(delete(AuditCheckpoint))
        if s.get(KeystoreMeta, PENDING) is None:
            s.add(KeystoreMeta(key=PENDING, value="reanchor"))


def load(keys: KeyStore, *, since: int | None = None) -> State:
    """The checkpoints, their signatures checked: the newest, and the history ones at or
    past ``since`` (all without it)."""
    with _session(keys, read_only=True) as s, s.begin():
        rows = list(s.scalars(select(AuditCheckpoint).order_by(AuditCheckpoint.slot)))
        pending = s.get(KeystoreMeta, PENDING) is not None
    cps = [Checkpoint(r.slot, r.seq, r.hash, r.at, r.key_id, r.signature) for r in rows]
    latest = next((c for c in cps if c.slot == 0), None)
    history = [c for c in cps if c.slot > 0]
    if latest is None:
        if history:
            newest = max(history, key=lambda c: c.seq)
            return State(None, [], pending, "the newest audit checkpoint is missing from the "
                         f"key store, though older ones (up to event {newest.seq}) remain: it "
                         "was deleted", newest.seq)
        if not pending:
            return State(None, [], pending, "the key store holds no audit checkpoint, though "
                         "this vault has had one since `idvault init` (or its upgrade): they "
                         "were deleted")
        return State(None, [], pending)
    key_id, public = keys.public_key()
    checked = [latest] + [c for c in history if since is None or c.seq >= since]
    for c in checked:
        what = "the newest audit checkpoint" if c.slot == 0 else \
            f"the audit checkpoint of slot {c.slot}"
        if c.key_id != str(key_id):
            return State(latest, [], pending, f"{what} (event {c.seq}) was signed by a key "
                         "this vault does not know", c.seq)
        if not KeyStore.verify_signature(public, message(keys.vault_id, c.seq, c.hash, c.at),
                                         c.signature):
            return State(latest, [], pending, f"{what} (event {c.seq}, signed "
                         f"{canonical_time(c.at)}) has a signature that does not verify: the "
                         "key store row was forged or altered", c.seq)
    rollback = [c for c in history if c.seq > latest.seq]
    if rollback:
        return State(latest, [], pending, f"the newest audit checkpoint (event {latest.seq}) "
                     f"is older than a kept one (event {rollback[0].seq}): it was rolled back",
                     rollback[0].seq)
    return State(latest, [c.anchor() for c in checked], pending)
