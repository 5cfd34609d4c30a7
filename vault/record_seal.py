"""Identity record seals: the handle, status and consent records the gates trust,
authenticated under a key that lives outside the data database.

Consent rows (purposes, withdrawal, retention), an identity's status and its handle
(owner name + identity name) live in the data database, and the gates (consent checks
before a decrypting read, a generation, an export, an enrollment) decide on them. A
SQL edit there must not be able to widen consent, undo a withdrawal or swap two
people's names (an artifact's associated data binds the identity's UUID, not its
handle). So every identity row carries a **seal**: its *record* (below), as canonical
JSON, encrypted with AES-256-GCM (:func:`vault.crypto.seal`) under the vault's record
key (:meth:`vault.keystore.KeyStore.record_key`, derived from the signing key in the
key store), with the vault id and the identity's uid as associated data, so a seal
copied to another row fails to open.

The record: vault id, identity uid, owner name, owner kind and erase policy, identity
name, status, and every consent record in id order (uid, subject, given_by,
guardian_name, purposes, retain_until, evidence_sha256, given_at, withdrawn_at,
withdrawal_reason). The owner's erase policy is bound because it decides whether a
withdrawal erases; idvault has no operation that changes an owner's kind or policy, so
nothing needs to reseal an owner's identities (one that adds it must).

Because the seal holds the record itself, not only a MAC of it, a failed check names
what was changed ("consent <uid> purposes were changed from [enroll] to [enroll, share]
outside idvault"). Every failure is :class:`~vault.errors.RecordTampered` (an
IntegrityError) naming the identity's handle as stored and its uid.

Where it is checked: :attr:`vault.models.Identity.consent` verifies the record before
it returns the current consent record (every gate reads consent through it), using the
:class:`RecordSealer` a vault session carries in ``Session.info``; a session without
one cannot read consent at all. Erasure never needs a valid seal.

Limit: the seal authenticates a row state, not its freshness. Restoring an identity's
complete earlier rows (identity and consent rows, seal included, e.g. from an old
backup of the data database) is not detected by the seal itself; the audit chain
records every legitimate change.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy.orm import object_session

from vault import crypto
from vault.errors import DecryptionError, RecordTampered

#: ``Session.info`` key under which a vault session carries its :class:`RecordSealer`.
SESSION_KEY = "idvault.record_sealer"
KEY_VERSION = 1  # the record format (the key itself is never rotated: see KeyStore.record_key)
CONSENT_FIELDS = ("uid", "subject", "given_by", "guardian_name", "purposes", "retain_until",
                  "evidence_sha256", "given_at", "withdrawn_at", "withdrawal_reason")
# set on an ORM identity once its record was verified (or sealed) in its session
_VERIFIED = "_idvault_record_verified"


class Identity(Protocol):
    """What is read of an identity row (``vault.models.Identity``, which imports this
    module: a Protocol instead of an import keeps the two out of a circle)."""

    uid: str
    name: str
    status: str
    seal: bytes | None
    owner: Any
    consents: Sequence[Any]

    @property
    def handle(self) -> str: ...


class KeySource(Protocol):
    vault_id: uuid.UUID

    def record_key(self) -> bytes: ...


def _time(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    # naive values are UTC (every time idvault writes is): the same instant, one text
    aware = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    return aware.isoformat()


def consent_entry(*, uid: str, subject: str, given_by: str, guardian_name: str | None,
                  purposes: list[str], retain_until: dt.date | None, evidence_sha256: str,
                  given_at: dt.datetime | None, withdrawn_at: dt.datetime | None = None,
                  withdrawal_reason: str | None = None) -> dict:
    """One consent record's entry in a record (plain JSON)."""
    return {"uid": uid, "subject": subject, "given_by": given_by,
            "guardian_name": guardian_name, "purposes": list(purposes or []),
            "retain_until": retain_until.isoformat() if retain_until else None,
            "evidence_sha256": evidence_sha256, "given_at": _time(given_at),
            "withdrawn_at": _time(withdrawn_at), "withdrawal_reason": withdrawal_reason}


def make_record(vault_id: uuid.UUID | str, *, identity_uid: str, owner: str, owner_kind: str,
                erase_policy: str, name: str, status: str, consents: list[dict]) -> dict:
    """A record from its values (``consents``: :func:`consent_entry` dicts in id order);
    bulk writers (bench/bench_rebuild.py) seal rows they insert without the ORM."""
    return {"vault": str(vault_id), "identity": identity_uid, "owner": owner,
            "owner_kind": owner_kind, "erase_policy": erase_policy, "name": name,
            "status": status, "consents": consents}


def record_of(vault_id: uuid.UUID | str, identity: Identity) -> dict:
    """The record of ``identity`` as its rows say now."""
    owner = identity.owner
    return make_record(
        vault_id, identity_uid=identity.uid, owner=owner.name, owner_kind=owner.kind,
        erase_policy=owner.erase_policy, name=identity.name, status=identity.status,
        consents=[consent_entry(
            uid=c.uid, subject=c.subject, given_by=c.given_by, guardian_name=c.guardian_name,
            purposes=c.purposes, retain_until=c.retain_until,
            evidence_sha256=c.evidence_sha256, given_at=c.given_at,
            withdrawn_at=c.withdrawn_at, withdrawal_reason=c.withdrawal_reason)
            for c in sorted(identity.consents, key=lambda c: c.id)])


def encode(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode()


def _context(vault_id: uuid.UUID | str, identity_uid: str) -> dict[str, str]:
    return {"purpose": "identity-record", "vault": str(vault_id), "identity": identity_uid}


def seal(key: bytes, vault_id: uuid.UUID, identity: Identity) -> bytes:
    """The seal of ``identity``'s current record (its rows must be flushed: uids and
    times are given at flush)."""
    return seal_record(key, vault_id, record_of(vault_id, identity))


def seal_record(key: bytes, vault_id: uuid.UUID, record: dict) -> bytes:
    """The seal of a record (:func:`make_record`)."""
    return crypto.seal(key, encode(record), key_id=vault_id, key_version=KEY_VERSION,
                       context=_context(vault_id, record["identity"]))


def _as_bytes(token: bytes | str) -> bytes:
    if isinstance(token, str):  # a TEXT value stored over the binary column (SQLite)
        return token.encode("utf-8", "surrogateescape")
    return bytes(token)


def _label(identity: Identity) -> str:
    return f"identity {identity.handle} ({identity.uid})"


def _purposes(value: list) -> str:
    return "[" + ", ".join(str(p) for p in value) + "]"


def _show(field: str, value: object) -> str:
    return _purposes(value) if field == "purposes" and isinstance(value, list) else repr(value)


def differences(sealed: dict, current: dict) -> list[str]:
    """What changed from the sealed record to the current one, in words."""
    out: list[str] = []
    uid = current.get("identity")
    if (sealed.get("owner"), sealed.get("name")) != (current["owner"], current["name"]):
        out.append(f"identity {uid} is stored as {current['owner']}/{current['name']} but was "
                   f"sealed as {sealed.get('owner')}/{sealed.get('name')}")
    for field, words in (("status", "status"), ("owner_kind", "owner kind"),
                         ("erase_policy", "owner erase policy"), ("vault", "vault id")):
        if sealed.get(field) != current[field]:
            out.append(f"{words} changed from {sealed.get(field)!r} to {current[field]!r} "
                       "outside idvault")
    before = {c["uid"]: c for c in sealed.get("consents", [])}
    after = {c["uid"]: c for c in current["consents"]}
    for cuid in before:
        if cuid not in after:
            out.append(f"consent record {cuid} was removed")
    for cuid, now in after.items():
        then = before.get(cuid)
        if then is None:
            out.append(f"a consent record {cuid} was added outside idvault")
            continue
        for field in CONSENT_FIELDS:
            if then.get(field) != now.get(field):
                out.append(f"consent {cuid} {field} {'were' if field == 'purposes' else 'was'} "
                           f"changed from {_show(field, then.get(field))} to "
                           f"{_show(field, now.get(field))} outside idvault")
    if not out and [c["uid"] for c in sealed.get("consents", [])] != list(after):
        out.append("the consent records were reordered")
    return out


def verify(key: bytes, vault_id: uuid.UUID, identity: Identity) -> None:
    """Raise RecordTampered unless ``identity``'s rows are those its seal holds."""
    token = identity.seal
    if token is None:
        raise RecordTampered(
            f"{_label(identity)} has no record seal (the seal was removed outside idvault, "
            "or the row was added outside it); it is refused until an operator checks it",
            handle=identity.handle, identity=identity.uid)
    try:
        sealed = json.loads(crypto.open_token(key, _as_bytes(token),
                                              context=_context(vault_id, identity.uid)))
    except (DecryptionError, ValueError):
        raise RecordTampered(
            f"the record seal of {_label(identity)} fails authentication: it was altered or "
            "copied from another identity's row", handle=identity.handle,
            identity=identity.uid) from None
    current = record_of(vault_id, identity)
    if sealed != current:
        changes = differences(sealed, current) or ["the record differs from its seal"]
        raise RecordTampered(
            f"{_label(identity)} fails its record check: " + "; ".join(changes),
            handle=identity.handle, identity=identity.uid, changes=changes)


class RecordSealer:
    """Seals and verifies identity records with one vault's record key; a vault session
    carries one in ``Session.info[SESSION_KEY]``."""

    def __init__(self, keys: KeySource) -> None:
        self._keys = keys

    def seal(self, identity: Identity) -> None:
        """Set ``identity.seal`` from its current rows (flushed by the caller)."""
        identity.seal = seal(self._keys.record_key(), self._keys.vault_id, identity)
        setattr(identity, _VERIFIED, True)

    def sealed_record(self, identity: Identity) -> dict | None:
        """The record ``identity``'s seal holds (authentic, whatever its rows say now), or
        None when it has no seal or the seal fails authentication."""
        token = identity.seal
        if token is None:
            return None
        try:
            return json.loads(crypto.open_token(
                self._keys.record_key(), _as_bytes(token),
                context=_context(self._keys.vault_id, identity.uid)))
        except (DecryptionError, ValueError):
            return None

    def verify(self, identity: Identity) -> None:
        """Raise RecordTampered unless the identity's rows match its seal. An identity
        verified (or sealed) once in its session is not checked again: changes made there
        since are idvault's own, and are resealed before the commit."""
        if getattr(identity, _VERIFIED, False):
            return
        verify(self._keys.record_key(), self._keys.vault_id, identity)
        setattr(identity, _VERIFIED, True)


def check(identity: Identity) -> None:
    """Verify ``identity``'s record with the sealer of the session it belongs to; without
    one (a session not opened by a vault, a detached object) its record cannot be
    trusted, so this refuses."""
    if getattr(identity, _VERIFIED, False):
        return
    session = object_session(identity)
    sealer = session.info.get(SESSION_KEY) if session is not None else None
    if sealer is None:
        raise RecordTampered(
            f"{_label(identity)}: its record cannot be verified here (read it through a vault "
            "session)", handle=identity.handle, identity=identity.uid)
    sealer.verify(identity)
