"""Owners and identities: session-level services (they never commit).

Handles resolve only inside their owner; a missing owner and a missing
identity give the same NotFound so a caller cannot probe other owners' rosters.

:func:`describe_identity` describes a loaded ORM identity; the lookup by
handle (the API's hottest read) uses :func:`describe_handle`, one Core
statement (a :class:`~vault.compiled_read.CompiledRead`) giving the same
document without building ORM objects.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from sqlalchemy import Connection, and_, bindparam, func, or_, select
from sqlalchemy.orm import Session, selectinload

from vault import audit, consent
from vault.compiled_read import CompiledRead
from vault.consent import ConsentRequest
from vault.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from vault.handles import Handle, validate_name
from vault.models import (
    ERASE_POLICIES,
    OWNER_KINDS,
    Artifact,
    Consent,
    Identity,
    NotSamePair,
    Owner,
)


def add_owner(session: Session, name: str, kind: str, *, erase_policy: str = "immediate",
              actor: str) -> Owner:
    validate_name(name)
    if kind not in OWNER_KINDS:
        raise InvalidInput(f"owner kind must be one of {', '.join(OWNER_KINDS)}, not {kind!r}")
    if erase_policy not in ERASE_POLICIES:
        raise InvalidInput(f"erase policy must be one of {', '.join(ERASE_POLICIES)}")
    if session.scalar(select(Owner.id).where(Owner.name == name)) is not None:
        raise AlreadyExists(f"owner {name!r} already exists")
    owner = Owner(name=name, kind=kind, erase_policy=erase_policy)
    session.add(owner)
    session.flush()
    audit.append(session, "owner.create", actor=actor, owner=name, subject=name,
                 details={"kind": kind, "erase_policy": erase_policy})
    return owner


def get_owner(session: Session, name: str) -> Owner:
    owner = session.scalar(select(Owner).where(Owner.name == name))
    if owner is None:
        raise NotFound(f"no owner {name!r}")
    return owner


def list_owners(session: Session) -> list[Owner]:
    return list(session.scalars(select(Owner).order_by(Owner.name)))


def get_identity(session: Session, handle: Handle | str, *, lock: bool = False) -> Identity:
    h = handle if isinstance(handle, Handle) else Handle.parse(handle)
    q = (select(Identity).join(Owner).where(Owner.name == h.owner, Identity.name == h.name)
         .options(selectinload(Identity.consents), selectinload(Identity.owner)))
    if lock:
        q = q.with_for_update()
    identity = session.scalar(q)
    if identity is None:
        raise NotFound(f"no identity {h}")
    return identity


def find_identities(session: Session, handles: Sequence[Handle | str]
                    ) -> dict[Handle, Identity]:
    """The identities of ``handles`` that exist, in one query (and one per related table),
    with their consents, owner and artifact rows loaded."""
    hs = [h if isinstance(h, Handle) else Handle.parse(h) for h in handles]
    if not hs:
        return {}
    q = (select(Identity).join(Owner)
         .where(or_(*(and_(Owner.name == h.owner, Identity.name == h.name) for h in hs)))
         .options(selectinload(Identity.consents), selectinload(Identity.owner),
                  selectinload(Identity.artifacts)))
    return {Handle(i.owner.name, i.name): i for i in session.scalars(q)}


def get_identities(session: Session, handles: Sequence[Handle | str]) -> list[Identity]:
    """:func:`find_identities` in the given order; NotFound names the first missing one."""
    hs = [h if isinstance(h, Handle) else Handle.parse(h) for h in handles]
    found = find_identities(session, hs)
    missing = next((h for h in hs if h not in found), None)
    if missing is not None:
        raise NotFound(f"no identity {missing}")
    return [found[h] for h in hs]


def refuse_erasing(identity: Identity) -> None:
    """Conflict when ``identity`` is being erased (an erasure began and has not finished):
    it is never used again, whatever its consent says."""
    if identity.status == "erasing":
        raise Conflict(f"{identity.handle} is being erased and cannot be used; "
                       f"`idvault identity delete {identity.handle}` finishes the erasure")


def check_usable(identity: Identity, purpose: str) -> None:
    """Raise unless ``identity`` may be used for ``purpose`` now: not being erased nor held
    for review (Conflict), and consent granting it (the ConsentError subclasses). Reading
    ``identity.consent`` verifies the identity's record seal first (RecordTampered)."""
    refuse_erasing(identity)
    if identity.status == "held":
        raise Conflict(f"{identity.handle} is held for review and cannot be used until the "
                       "review is decided (`idvault review list`)")
    consent.check_use(identity.consent, purpose)


def enrollment_target(session: Session, handle: Handle | str, *, consent_given: bool,
                      lock: bool = False) -> Identity | None:
    """The identity an enrollment of ``handle`` adds photos to (None: a new one), or the
    refusal: a new identity needs a consent record, an existing one takes none, must have
    consent granting ``enroll`` (its record seal verified, as ``Identity.consent`` does)
    and must not be held for review. The owner must exist."""
    h = Handle.parse(str(handle))
    get_owner(session, h.owner)
    try:
        existing = get_identity(session, h, lock=lock)
    except NotFound:
        existing = None
    if existing is None and not consent_given:
        raise InvalidInput(f"{h} is a new identity: enrolling it needs a consent "
                           "record (--consent FILE.json)")
    if existing is not None and consent_given:
        raise InvalidInput(f"{h} already exists with its consent record; adding photos "
                           "takes no new consent (omit --consent)")
    if existing is not None:
        refuse_erasing(existing)
        consent.check_use(existing.consent, "enroll")
        if existing.status == "held":
            raise Conflict(f"{h} is held for review; accept or reject it first "
                           "(`idvault review list`)")
    return existing


def create_identity(session: Session, handle: Handle | str, request: ConsentRequest, *,
                    actor: str, uid: str | None = None) -> Identity:
    """A new identity with its consent record, in the caller's transaction (``uid``: the
    one chosen for it beforehand, e.g. to stage its photos under its data key)."""
    h = handle if isinstance(handle, Handle) else Handle.parse(handle)
    owner = get_owner(session, h.owner)
    exists = session.scalar(select(Identity.id).where(Identity.owner_id == owner.id,
                                                      Identity.name == h.name))
    if exists is not None:
        raise AlreadyExists(f"identity {h} already exists")
    identity = Identity(owner=owner, name=h.name, **({"uid": uid} if uid else {}))
    record = request.to_model()
    identity.consents.append(record)
    session.add(identity)
    session.flush()  # the unique (owner, name) constraint decides concurrent creations
    audit.append(session, "identity.create", actor=actor, owner=owner.name, subject=str(h),
                 details={"identity": identity.uid, "consent": record.uid,
                          "given_by": record.given_by, "purposes": list(record.purposes),
                          "retain_until": record.retain_until.isoformat()})
    return identity


def list_identities(session: Session, owner: str | None = None, *, limit: int = 1000,
                    offset: int = 0) -> list[Identity]:
    q = (select(Identity).join(Owner).order_by(Owner.name, Identity.name)
         .options(selectinload(Identity.consents), selectinload(Identity.owner),
                  selectinload(Identity.artifacts))
         .limit(limit).offset(offset))
    if owner is not None:
        get_owner(session, owner)
        q = q.where(Owner.name == owner)
    return list(session.scalars(q))


def count_identities(session: Session, owner: str | None = None) -> int:
    q = select(func.count()).select_from(Identity).join(Owner)
    if owner is not None:
        q = q.where(Owner.name == owner)
    return session.scalar(q) or 0


def describe_identity(identity: Identity, *, today: dt.date | None = None) -> dict:
    return {
        "handle": identity.handle,
        "id": identity.uid,
        "owner": identity.owner.name,
        "owner_kind": identity.owner.kind,
        "status": identity.status,
        "created_at": identity.created_at.isoformat(),
        # display only (a listing is no use of the identity): as stored, unverified
        "consent": consent.describe(identity.latest_consent()),
        "artifacts": [describe_artifact(a) for a in sorted(identity.artifacts,
                                                           key=lambda a: (a.kind, a.model_id))],
    }


def describe_artifact(a: Artifact) -> dict:
    return {"id": a.id, "kind": a.kind, "schema_version": a.schema_version,
            "model_id": a.model_id, "size": a.size, "sha256": a.sha256, "shapes": a.shapes,
            "created_at": a.created_at.isoformat()}


# One row per artifact (one with NULL artifact columns when there is none), each with the
# identity, its owner and its current consent (the newest, as ``Identity.consent``).
# Consent and artifact columns keep the ORM attribute names, so a row is what
# consent.describe and describe_artifact read; the identity's are prefixed.
_CURRENT_CONSENT = (select(func.max(Consent.id)).where(Consent.identity_id == Identity.id)
                    .correlate(Identity).scalar_subquery())
DESCRIBE_BY_HANDLE = (
    select(Identity.uid.label("identity_uid"), Identity.name.label("identity_name"),
           Identity.status.label("identity_status"),
           Identity.created_at.label("identity_created_at"),
           Owner.name.label("owner_name"), Owner.kind.label("owner_kind"),
           Consent.uid, Consent.subject, Consent.given_by, Consent.guardian_name,
           Consent.purposes, Consent.retain_until, Consent.evidence_sha256, Consent.given_at,
           Consent.withdrawn_at, Consent.withdrawal_reason,
           Artifact.id, Artifact.kind, Artifact.schema_version, Artifact.model_id,
           Artifact.size, Artifact.sha256, Artifact.shapes, Artifact.created_at)
    .select_from(Identity)
    .join(Owner, Owner.id == Identity.owner_id)
    .join(Consent, Consent.id == _CURRENT_CONSENT)
    .outerjoin(Artifact, Artifact.identity_id == Identity.id)
    .where(Owner.name == bindparam("owner"), Identity.name == bindparam("name")))
_DESCRIBE_BY_HANDLE = CompiledRead(DESCRIBE_BY_HANDLE)


def describe_handle(conn: Connection, handle: Handle | str) -> dict:
    """:func:`describe_identity` of the identity at ``handle``, read with one Core statement
    on ``conn`` (nothing decrypted, nothing cached); NotFound as :func:`get_identity`."""
    h = handle if isinstance(handle, Handle) else Handle.parse(handle)
    rows = _DESCRIBE_BY_HANDLE.all(conn, {"owner": h.owner, "name": h.name})
    if not rows:
        raise NotFound(f"no identity {h}")
    first = rows[0]
    artifacts = sorted((r for r in rows if r.id is not None), key=lambda r: (r.kind, r.model_id))
    return {
        "handle": f"{first.owner_name}/{first.identity_name}",
        "id": first.identity_uid,
        "owner": first.owner_name,
        "owner_kind": first.owner_kind,
        "status": first.identity_status,
        "created_at": first.identity_created_at.isoformat(),
        "consent": consent.describe(first),
        "artifacts": [describe_artifact(a) for a in artifacts],
    }


def record_not_same(session: Session, a: Handle | str, b: Handle | str, *,
                    actor: str) -> NotSamePair:
    ia, ib = get_identity(session, a), get_identity(session, b)
    if ia.owner_id != ib.owner_id:
        raise InvalidInput("not-same pairs are recorded within one owner")
    if ia.id == ib.id:
        raise InvalidInput("an identity cannot be recorded as not the same as itself")
    lo, hi = sorted((ia.id, ib.id))
    pair = session.scalar(select(NotSamePair).where(NotSamePair.identity_a == lo,
                                                    NotSamePair.identity_b == hi))
    if pair is None:
        pair = NotSamePair(owner_id=ia.owner_id, identity_a=lo, identity_b=hi)
        session.add(pair)
        session.flush()
        audit.append(session, "identity.not_same", actor=actor, owner=ia.owner.name,
                     subject=ia.handle, details={"other": ib.handle})
    return pair


def not_same_partners(session: Session, identity_id: int) -> set[int]:
    rows = session.execute(select(NotSamePair.identity_a, NotSamePair.identity_b).where(
        (NotSamePair.identity_a == identity_id) | (NotSamePair.identity_b == identity_id)))
    return {b if a == identity_id else a for a, b in rows}
