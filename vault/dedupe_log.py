"""One dedupe truth across processes: a per-owner lock and an ordered change log.

Every process keeps its own in-memory index of an owner's faces
(:mod:`vault.dedupe_index`). The database says what belongs in it: each write
that changes an owner's indexed faces (an enrollment, a new face artifact, a
withdrawal, an erasure) appends a row to ``dedupe_changes`` in the same
transaction -- the identity's id and ``add`` or ``remove``, never a vector.
Before a process searches an owner's index it reads the changes past the last
one it applied and applies them (an ``add`` decrypts the identity's current
face artifact; a ``remove`` drops its vectors), so every search sees every
committed change, whichever process made it.

Order. Every writer takes the owner's lock (:func:`lock_owner`) before it
writes anything of that owner and holds it to its commit: a PostgreSQL
advisory transaction lock per owner, or -- on SQLite -- the database write
lock every write transaction of the vault takes up front (``BEGIN
IMMEDIATE``). So one owner's changes commit one at a time, and their sequence
numbers, drawn while the lock is held, grow in commit order: a reader that has
seen change ``n`` has seen every earlier change of that owner. The same lock
serialises enrollment decisions for an owner across processes and machines:
the second of two enrollments of one face catches up with the first before it
searches, and is blocked or held for review.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from vault.models import DEDUPE_OPS, DedupeChange

# pg_advisory_xact_lock(key1, key2): key1 names this use, key2 is the owner id.
LOCK_NAMESPACE = 0x1D5A  # "idvault dedupe"


def lock_owner(s: Session, owner_id: int) -> None:
    """Hold the owner's dedupe lock until ``s`` commits or rolls back (see above)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:ns, :owner)"),
                  {"ns": LOCK_NAMESPACE, "owner": int(owner_id)})
    # SQLite: the transaction already holds the database write lock (BEGIN IMMEDIATE).


def record(s: Session, owner_id: int, identity_id: int, op: str) -> int:
    """Append one change in the caller's transaction (under the owner's lock); its seq."""
    if op not in DEDUPE_OPS:
        raise ValueError(f"dedupe change op must be one of {DEDUPE_OPS}")
    lock_owner(s, owner_id)  # taken already by careful callers; re-entrant
    change = DedupeChange(owner_id=owner_id, identity_id=identity_id, op=op)
    s.add(change)
    s.flush()
    return change.seq


def latest(s: Session, owner_id: int) -> int:
    """The newest change of the owner that ``s`` sees (0: none)."""
    return s.scalar(select(func.max(DedupeChange.seq))
                    .where(DedupeChange.owner_id == owner_id)) or 0


def since(s: Session, owner_id: int, seq: int) -> list[tuple[int, int, str]]:
    """``(seq, identity_id, op)`` of the owner's changes after ``seq``, in order."""
    rows = s.execute(select(DedupeChange.seq, DedupeChange.identity_id, DedupeChange.op)
                     .where(DedupeChange.owner_id == owner_id, DedupeChange.seq > seq)
                     .order_by(DedupeChange.seq))
    return [(int(a), int(b), c) for a, b, c in rows]


def last_ops(changes: list[tuple[int, int, str]]) -> dict[int, str]:
    """Per identity, the op of its newest change (what its index entry must end as)."""
    out: dict[int, str] = {}
    for _, identity_id, op in changes:
        out[identity_id] = op
    return out
