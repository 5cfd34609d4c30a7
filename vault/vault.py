"""The Vault: one object that owns the two databases, the keys and the index.

Operations that span the data database and the key store live here, because
they need an order that survives a crash at any point:

* storing an artifact creates the identity's DEK (key store, committed) before
  the sealed artifact (data DB); a crash in between leaves a harmless key;
* erasing an identity deletes its DEK first (crypto-shredding every copy of
  its ciphertext at once), then its rows; a crash in between leaves rows that
  can no longer be decrypted and a re-run removes them.

Session-level services (``vault.identities``, ``vault.audit``...) never
commit; the methods here and ``Vault.session()`` own the transactions.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from sqlalchemy import LargeBinary, cast, delete, select
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, object_session, selectinload

from vault import (
    audit,
    audit_anchor,
    codec,
    crypto,
    db,
    dedupe_log,
    generated_images,
    identities,
    record_seal,
    staged_photos,
)
from vault.cache_sweeper import CacheSweeper
from vault.config import Settings
from vault.consent import ConsentRequest, check_use
from vault.dedupe_index import DedupeIndex, Match
from vault.dedupe_sync import IndexSync
from vault.errors import (
    AlreadyExists,
    Conflict,
    DecryptionError,
    DuplicateIdentity,
    IntegrityError,
    InvalidInput,
    KeyUnavailable,
    NotFound,
    PhotoRejected,
    RecordTampered,
    SignatureInvalid,
    VaultError,
)
from vault.handles import Handle, parse_uid
from vault.keyprovider import FileKeyProvider, provider_for
from vault.keystore import KeyStore, RotationReport
from vault.models import (
    Artifact,
    AuditEvent,
    AuditHead,
    ErasureReceipt,
    Identity,
    Job,
    NotSamePair,
    Owner,
    Review,
    VaultMeta,
    utcnow,
)

RECEIPT_TYPE = "idvault.erasure-receipt/1"
# Key-store meta: when this vault's identity rows were first sealed (vault.record_seal).
RECORDS_SEALED_MARKER = "records_sealed_at"
PER_PHOTO_KINDS = ("photomaker",)  # artifacts that grow when photos are added
# A data key younger than this without an identity row may be an enrollment in flight
# (it makes its key before its identity row): the orphan sweep leaves it.
ORPHAN_KEY_GRACE_SECONDS = 3600.0
# The periodic sweep judges keys made in this window (it runs every few minutes, so a
# crash's orphan is judged many times within it); `idvault keys sweep` judges them all.
PERIODIC_ORPHAN_WINDOW = dt.timedelta(days=1)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredArtifact:
    id: str
    kind: str
    model_id: str
    size: int
    sha256: str
    replaced: str | None


@dataclass(frozen=True)
class EnrollmentResult:
    handle: str
    status: str  # active (new identity) | held (pending review) | updated (photos added)
    artifacts: list[StoredArtifact]
    top_match: dict | None  # closest other identity: handle, score, decision
    review_id: int | None
    photos_added: int


@dataclass(frozen=True)
class _Erasure:
    """An erasure under way: what its first transaction recorded."""

    uid: str
    identity_id: int
    owner_id: int
    handle: Handle
    reason: str
    actor: str
    key_id: str | None


@dataclass(frozen=True)
class OpenedArtifact:
    artifact: codec.DecodedArtifact
    payload: bytes
    id: str
    handle: str


def _actor() -> str:
    return audit.cli_actor()


class Vault:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = db.make_engine(settings.resolved_database_url, schema="data")
        self.keystore_engine = db.make_engine(settings.resolved_keystore_url, schema="keystore")
        self.provider = provider_for(settings.key_provider, settings.resolved_key_file)
        self.caches = CacheSweeper(self)
        self.keys = KeyStore(self.keystore_engine, self.provider,
                             dek_cache_seconds=settings.dek_cache_seconds,
                             on_cache=self.caches.start)
        self.index = DedupeIndex(block=settings.dedupe_block, review=settings.dedupe_review,
                                 index_type=settings.dedupe_index)
        self.dedupe = IndexSync(self)
        self.records = record_seal.RecordSealer(self.keys)
        self._vault_id: uuid.UUID | None = None

    # -- lifecycle -------------------------------------------------------------
    @classmethod
    def init(cls, settings: Settings, *, actor: str | None = None) -> Vault:
        """Create a new vault: data dir, both schemas, key material, audit genesis.

        The databases are created and checked before any key material is
        written, so a failed init (unreachable server, wrong URL) can simply be
        re-run.
        """
        if settings.resolved_database_url == settings.resolved_keystore_url:
            raise InvalidInput("the key store must be a different database from the data "
                               "(that separation is what makes erasure crypto-shred backups)")
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        vault = cls(settings)
        try:
            if vault._has_schema():
                with vault.session() as s:
                    if s.get(VaultMeta, "vault_id") is not None:
                        raise AlreadyExists(
                            f"a vault already exists at {vault.describe_location()}; refusing "
                            "to initialise over it")
            db.upgrade(vault.engine, "data")
            db.upgrade(vault.keystore_engine, "keystore")
        except OperationalError as exc:
            vault.dispose()
            raise InvalidInput(f"cannot create the vault databases: {exc.orig}") from None
        except VaultError:
            vault.dispose()
            raise
        for url in (settings.resolved_database_url, settings.resolved_keystore_url):
            path = db.sqlite_path(url)
            if path is not None and path.exists():
                path.chmod(0o600)
        if isinstance(vault.provider, FileKeyProvider):
            vault.provider.initialise()
        vault_id = uuid.uuid4()
        vault.keys.initialise(vault_id)
        # until the genesis event's checkpoint is written: a crash before then is not a
        # deletion of checkpoints, and the next open anchors the head
        audit_anchor.mark_pending(vault.keys)
        # a new vault has no unsealed rows: from now on a NULL seal is an integrity error
        vault.keys.set_meta(RECORDS_SEALED_MARKER, audit.canonical_time(utcnow()))
        with vault.session() as s:
            s.add(VaultMeta(key="vault_id", value=str(vault_id)))
            audit.ensure_head(s)
            audit.append(s, "vault.init", actor=actor or _actor(),
                         details={"vault": str(vault_id), "key_provider": vault.provider.name})
        vault._vault_id = vault_id
        vault._anchor_audit_head()
        return vault

    @classmethod
    def open(cls, settings: Settings, *, check_keys: bool = True) -> Vault:
        """Open an existing vault; upgrades its schemas to this version if older."""
        for url in (settings.resolved_database_url, settings.resolved_keystore_url):
            path = db.sqlite_path(url)
            if path is not None and not path.exists():
                raise NotFound(f"no vault at {settings.data_dir} ({path.name} is missing): "
                               "run `idvault init` or pass --data-dir")
        vault = cls(settings)
        try:
            db.upgrade(vault.engine, "data")
            db.upgrade(vault.keystore_engine, "keystore")
            with vault.session() as s:
                row = s.get(VaultMeta, "vault_id")
        except OperationalError as exc:
            vault.dispose()
            raise InvalidInput(f"cannot open the vault database: {exc.orig}") from None
        if row is None:
            vault.dispose()
            raise NotFound(f"no vault in {vault.describe_location()}: run `idvault init`")
        vault._vault_id = uuid.UUID(row.value)
        if vault.keys.vault_id != vault._vault_id:
            vault.dispose()
            raise KeyUnavailable("the key store belongs to another vault (its vault id "
                                 "differs); point IDVAULT_KEYSTORE_URL at this vault's")
        if check_keys:
            vault.keys.check()
            vault._anchor_audit_head()
            vault._seal_unsealed_records()
            vault.finish_interrupted_erasures()
        return vault

    def _seal_unsealed_records(self) -> None:
        """Seal, once, the identity rows of a vault made before record seals (migration
        0005 adds the column empty): authenticated as they are now, with the operator's
        key. The key store then records that it was done, so that afterwards a NULL seal
        is an integrity error (nulling a tampered row's seal must not get it resealed)."""
        if self.keys.get_meta(RECORDS_SEALED_MARKER) is not None:
            return
        with self.session() as s:
            rows = list(s.scalars(select(Identity).where(Identity.seal.is_(None))
                                  .order_by(Identity.id)
                                  .options(selectinload(Identity.consents),
                                           selectinload(Identity.owner))))
            for identity in rows:
                self._reseal(s, identity)
            audit.append(s, "records.seal", actor=_actor(),
                         details={"count": len(rows)})
        self.keys.set_meta(RECORDS_SEALED_MARKER, audit.canonical_time(utcnow()))

    def dispose(self) -> None:
        self.caches.stop()
        self.engine.dispose()
        self.keystore_engine.dispose()

    def __enter__(self) -> Vault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.dispose()

    def _has_schema(self) -> bool:
        from sqlalchemy import inspect

        try:
            return inspect(self.engine).has_table("vault_meta")
        except OperationalError:
            return False

    def describe_location(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @property
    def vault_id(self) -> uuid.UUID:
        assert self._vault_id is not None
        return self._vault_id

    @contextmanager
    def session(self, *, read_only: bool = False) -> Iterator[Session]:
        """A transaction on the data database: committed on success.

        ``read_only`` transactions do not take SQLite's write lock up front. After a
        commit that appended audit events, the new head is signed into the key store
        (vault.audit_anchor); every writer of audit events goes through here.
        """
        bind = self.engine.execution_options(**{db.READ_ONLY: True}) if read_only else self.engine
        with Session(bind, expire_on_commit=False,
                     info={record_seal.SESSION_KEY: self.records}) as s:
            with s.begin():
                yield s
            head = s.info.get(audit.HEAD_INFO)
        if head is not None:  # committed events: sign the new head into the key store
            audit_anchor.record_quietly(self.keys, *head)

    def _reseal(self, session: Session, identity: Identity) -> None:
        """Seal ``identity``'s record as it is now (``vault.record_seal``), before the
        commit of every legitimate change of its handle, status or consent records.
        Flushes first: uids and times are given at flush. It does not verify the old
        record (a path that changes a record reads ``identity.consent`` first, which
        does; erasure must work on a tampered identity)."""
        session.flush()
        self.records.seal(identity)

    # -- owners and identities ------------------------------------------------------
    def add_owner(self, name: str, kind: str, *, erase_policy: str = "immediate",
                  actor: str | None = None) -> dict:
        try:
            with self.session() as s:
                owner = identities.add_owner(s, name, kind, erase_policy=erase_policy,
                                             actor=actor or _actor())
                return {"name": owner.name, "kind": owner.kind,
                        "erase_policy": owner.erase_policy}
        except SAIntegrityError:
            raise AlreadyExists(f"owner {name!r} already exists") from None

    def create_identity(self, handle: str, request: ConsentRequest, *,
                        actor: str | None = None) -> dict:
        h = Handle.parse(handle)
        try:
            with self.session() as s:
                identity = identities.create_identity(s, h, request, actor=actor or _actor())
                self._reseal(s, identity)
                return identities.describe_identity(identity)
        except SAIntegrityError:
            raise AlreadyExists(f"identity {h} already exists") from None

    def describe(self, handle: str) -> dict:
        with self.session() as s:
            return identities.describe_identity(identities.get_identity(s, handle))

    def list_identities(self, owner: str | None = None) -> list[dict]:
        with self.session() as s:
            return [identities.describe_identity(i) for i in identities.list_identities(s, owner)]

    # -- artifacts --------------------------------------------------------------------
    def _context(self, owner: str, identity_uid: str, artifact_id: str, kind: str,
                 model_id: str) -> dict[str, str]:
        """The AAD that binds an artifact's ciphertext to its place."""
        return {"vault": str(self.vault_id), "owner": owner, "identity": identity_uid,
                "artifact": artifact_id, "kind": kind, "model_id": model_id}

    def _seal_artifact(self, identity: Identity, artifact_id: str, kind: str, model_id: str,
                       payload: bytes) -> bytes:
        key_id, dek = self.keys.get_or_create_dek(identity.uid)
        return crypto.seal(dek, payload, key_id=key_id, key_version=1,
                           context=self._context(identity.owner.name, identity.uid, artifact_id,
                                                 kind, model_id))

    @staticmethod
    def _ciphertexts(session: Session, artifact_ids: Sequence[str]) -> dict[str, bytes]:
        """The stored tokens of these artifacts, in one query. Read as BLOB: a value
        written over the column as TEXT (not even valid UTF-8) comes back as bytes and
        then fails authentication, instead of failing to decode."""
        return dict(session.execute(
            select(Artifact.id, cast(Artifact.ciphertext, LargeBinary))
            .where(Artifact.id.in_(list(artifact_ids)))).all())

    def _open_artifact(self, identity: Identity, row: Artifact,
                       token: bytes | None = None) -> bytes:
        if token is None:
            session = object_session(row)
            token = (self._ciphertexts(session, [row.id]).get(row.id, b"")
                     if session is not None else row.ciphertext)
        try:
            key_id, dek = self.keys.dek(identity.uid)
        except NotFound:
            raise IntegrityError(
                f"artifact {row.id} of {identity.handle} cannot be decrypted: the identity's "
                "data key is gone (it was erased, or this key store belongs to another copy)"
            ) from None
        try:
            header = crypto.read_header(token)
        except DecryptionError as exc:
            raise DecryptionError(f"artifact {row.id} of {identity.handle}: {exc}") from None
        if header.key_id != key_id:
            raise DecryptionError(
                f"artifact {row.id} of {identity.handle} was sealed under another key "
                "(the ciphertext was moved from another identity)")
        try:
            return crypto.open_token(dek, token,
                                     context=self._context(identity.owner.name, identity.uid,
                                                           row.id, row.kind, row.model_id))
        except DecryptionError as exc:
            raise DecryptionError(f"artifact {row.id} of {identity.handle}: {exc}") from None

    def put_artifact(self, handle: str, kind: str, payload: bytes, *,
                     actor: str | None = None,
                     finish: Callable[[Session, StoredArtifact], None] | None = None
                     ) -> StoredArtifact:
        """Validate, seal and store an artifact; replaces the one of the same kind and model.
        ``finish`` runs in the same transaction, before it commits (a job marks itself
        done there)."""
        decoded = codec.decode(payload, kind=kind, max_bytes=self.settings.max_artifact_bytes)
        h = Handle.parse(handle)
        with self.session() as s:
            if kind == "face":  # the owner's lock first, as every dedupe writer
                dedupe_log.lock_owner(s, identities.get_owner(s, h.owner).id)
            identity = identities.get_identity(s, h, lock=True)
            identities.refuse_erasing(identity)
            check_use(identity.consent, "enroll")
            stored = self._store(s, identity, decoded, payload, actor=actor or _actor())
            if kind == "face":
                dedupe_log.record(s, identity.owner_id, identity.id, "add")
            if finish is not None:
                finish(s, stored)
        return stored

    def put_artifacts(self, handle: str, payloads: Sequence[bytes], *, replace: bool = True,
                      actor: str | None = None, enroll_details: dict | None = None,
                      finish: Callable[[Session, list[StoredArtifact]], None] | None = None
                      ) -> list[StoredArtifact]:
        """Several artifacts of one identity (not ``face``) in one transaction, as
        :meth:`put_artifact` stores one: consent must grant ``enroll``; each write is
        audited. ``replace=False`` refuses (Conflict, nothing stored) when the identity
        already holds an artifact of one of these kinds and model ids.
        ``enroll_details``: an ``enroll`` event with these details is appended too
        (kinds added to an enrolled identity). ``finish`` runs before the commit."""
        decoded = [codec.decode(p, max_bytes=self.settings.max_artifact_bytes)
                   for p in payloads]
        if not decoded or any(d.kind == "face" for d in decoded):
            raise InvalidInput("put_artifacts stores one or more artifacts other than 'face'")
        actor = actor or _actor()
        with self.session() as s:
            identity = identities.get_identity(s, Handle.parse(handle), lock=True)
            identities.refuse_erasing(identity)
            check_use(identity.consent, "enroll")
            if not replace:
                held = {(a.kind, a.model_id): a.id for a in identity.artifacts}
                clash = [(d.kind, d.model_id) for d in decoded if (d.kind, d.model_id) in held]
                if clash:
                    raise Conflict(
                        f"{identity.handle} already holds " + "; ".join(
                            f"a {k} artifact for model {m} ({held[(k, m)]})" for k, m in clash)
                        + "; replace it explicitly, or leave that kind out",
                        artifacts=[held[c] for c in clash])
            stored = [self._store(s, identity, d, p, actor=actor)
                      for d, p in zip(decoded, payloads, strict=True)]
            if enroll_details is not None:
                audit.append(s, "enroll", actor=actor, owner=identity.owner.name,
                             subject=identity.handle,
                             details={**enroll_details, "kinds": [a.kind for a in stored]})
            if finish is not None:
                finish(s, stored)
        return stored

    def _store(self, s: Session, identity: Identity, decoded: codec.DecodedArtifact,
               payload: bytes, *, actor: str) -> StoredArtifact:
        """Seal and add one artifact inside the caller's transaction."""
        kind = decoded.kind
        artifact_id = str(uuid.uuid4())
        sealed = self._seal_artifact(identity, artifact_id, kind, decoded.model_id, payload)
        old = s.scalar(select(Artifact).where(Artifact.identity_id == identity.id,
                                              Artifact.kind == kind,
                                              Artifact.model_id == decoded.model_id))
        replaced = old.id if old else None
        if old is not None:
            s.delete(old)
            s.flush()
        digest = hashlib.sha256(payload).hexdigest()
        s.add(Artifact(id=artifact_id, identity_id=identity.id, kind=kind,
                       schema_version=decoded.schema_version, model_id=decoded.model_id,
                       size=len(payload), sha256=digest, shapes=decoded.shapes,
                       ciphertext=sealed))
        audit.append(s, "artifact.write", actor=actor, owner=identity.owner.name,
                     subject=identity.handle,
                     details={"artifact": artifact_id, "kind": kind,
                              "model_id": decoded.model_id, "sha256": digest,
                              "replaced": replaced})
        return StoredArtifact(artifact_id, kind, decoded.model_id, len(payload), digest, replaced)

    def get_artifact(self, handle: str, kind: str, *, model_id: str | None = None,
                     purpose: str = "generate", actor: str | None = None) -> OpenedArtifact:
        """Decrypt an artifact for ``purpose`` (checked against consent); audited."""
        return self.get_artifacts([(handle, kind, model_id)], purpose=purpose, actor=actor)[0]

    def get_artifacts(self, wanted: Sequence[tuple[str, str, str | None]], *,
                      purpose: str = "generate", actor: str | None = None
                      ) -> list[OpenedArtifact]:
        """Decrypt several ``(handle, kind, model_id or None)`` artifacts in one transaction.

        Every consent is checked before anything is decrypted, and all the reads
        are audited in the same commit (a generation with four identities pays
        one durable commit, not four).
        """
        if not wanted:
            return []
        with self.session() as s:
            chosen = []
            people = identities.get_identities(s, [handle for handle, _, _ in wanted])
            for identity, (_, kind, model_id) in zip(people, wanted, strict=True):
                identities.refuse_erasing(identity)
                check_use(identity.consent, purpose)
                rows = [a for a in identity.artifacts if a.kind == kind
                        and (model_id is None or a.model_id == model_id)]
                if not rows:
                    what = f"{kind} artifact" + (f" for model {model_id}" if model_id else "")
                    raise NotFound(f"{identity.handle} has no {what}")
                if len(rows) > 1:
                    raise InvalidInput(
                        f"{identity.handle} has {len(rows)} {kind} artifacts; choose one by "
                        f"model id: {', '.join(sorted(a.model_id for a in rows))}")
                chosen.append((identity, rows[0]))
            opened, events = [], []
            tokens = self._ciphertexts(s, [row.id for _, row in chosen])
            for identity, row in chosen:
                payload = self._open_artifact(identity, row, tokens.get(row.id, b""))
                decoded = codec.decode(payload, kind=row.kind)
                events.append(audit.Event(
                    "artifact.read", actor or _actor(), identity.owner.name, identity.handle,
                    {"artifact": row.id, "kind": row.kind, "model_id": row.model_id,
                     "purpose": purpose}))
                opened.append(OpenedArtifact(decoded, payload, row.id, identity.handle))
            audit.append_many(s, events)
            return opened

    # -- dedupe index ---------------------------------------------------------------
    def rebuild_index(self, owner: str | None = None,
                      progress: Callable[[int, int], None] | None = None) -> dict:
        """Rebuild this process's in-memory index of one owner (or all) from the encrypted
        store. (Other processes catch up from the change log on their own.)"""
        with self.session() as s:
            owners = ([identities.get_owner(s, owner)] if owner
                      else identities.list_owners(s))
            owner_ids = {o.id: o.name for o in owners}
        total = 0
        for owner_id in owner_ids:
            total += self.dedupe.load(owner_id, progress)
        return {"owners": len(owner_ids), "vectors": total,
                "identities": sum(self.index.identities(o) for o in owner_ids)}

    def search_faces(self, owner: str, vectors: np.ndarray, *, model_id: str | None = None,
                     k: int = 5, exclude_identity: str | None = None) -> list[dict]:
        """Closest identities of ``owner`` to the query embeddings, with decisions.

        ``model_id`` names the face model the query embeddings come from; it may
        be left out while the owner's faces all come from one model. The index
        first catches up with every change committed by any process.
        """
        with self.session(read_only=True) as s:
            owner_row = identities.get_owner(s, owner)
            exclude: set[int] = set()
            if exclude_identity is not None:
                me = identities.get_identity(s, exclude_identity)
                exclude = {me.id} | identities.not_same_partners(s, me.id)
            self.dedupe.catch_up(s, owner_row.id)
            models = self.index.models(owner_row.id)
            if model_id is None:
                if len(models) > 1:
                    raise InvalidInput(f"{owner} has faces from several models "
                                       f"({', '.join(models)}); say which one the query is "
                                       "from")
                if not models:
                    return []
                model_id = models[0]
            matches = self.index.search(owner_row.id, model_id, vectors, k=k, exclude=exclude)
            return self._with_handles(matches, s)

    def _with_handles(self, matches: list[Match], session: Session | None = None) -> list[dict]:
        if not matches:
            return []
        if session is None:
            with self.session() as s:
                return self._with_handles(matches, s)
        ids = [m.identity_id for m in matches]
        handles = dict(session.execute(
            select(Identity.id, Owner.name + "/" + Identity.name).join(Owner)
            .where(Identity.id.in_(ids))).all())
        return [{"handle": handles[m.identity_id], "score": round(m.score, 4),
                 "decision": m.decision} for m in matches if m.identity_id in handles]

    def record_not_same(self, a: str, b: str, *, actor: str | None = None) -> None:
        with self.session() as s:
            identities.record_not_same(s, a, b, actor=actor or _actor())

    # -- enrollment -----------------------------------------------------------------
    def store_enrollment(self, handle: str, face: bytes, *,
                         consent_request: ConsentRequest | None = None,
                         extra: dict[str, bytes] | None = None,
                         actor: str | None = None, uid: str | None = None,
                         finish: Callable[[Session, EnrollmentResult], None] | None = None
                         ) -> EnrollmentResult:
        """Dedupe a face artifact and store it (and ``extra`` artifacts) atomically.

        A new identity needs ``consent_request``. Its faces are searched in the
        owner's index (minus itself and its not-same partners): a score at or
        above the block threshold raises DuplicateIdentity naming the match;
        in the review band a new identity is stored ``held`` with a pending
        review, and an existing one is refused. Photos added to an existing
        identity must resemble its enrolled photos; they are merged into its
        face artifact.

        ``uid`` gives a new identity its uid (photos staged for an enrollment job are
        sealed under that identity's data key before the identity exists). ``finish``
        runs in the enrollment's transaction, before it commits (a job marks itself
        done there, so a crash cannot leave a stored enrollment whose job would run
        again).
        """
        actor = actor or _actor()
        h = Handle.parse(handle)
        uid = None if uid is None else parse_uid(uid)
        decoded = codec.decode(face, kind="face", max_bytes=self.settings.max_artifact_bytes)
        extras = {kind: (codec.decode(p, kind=kind, max_bytes=self.settings.max_artifact_bytes),
                         p) for kind, p in (extra or {}).items()}
        model_id = decoded.model_id
        with self.session(read_only=True) as s:
            owner_id = identities.get_owner(s, h.owner).id
        self.dedupe.ensure(owner_id)  # a first full load, before the owner's lock
        with self.session() as s:
            owner = identities.get_owner(s, h.owner)
            # One enrollment decision per owner at a time, in every process: caught up
            # with every change committed before the lock, this search sees them all.
            dedupe_log.lock_owner(s, owner.id)
            self.dedupe.catch_up(s, owner.id)
            existing: Identity | None = identities.enrollment_target(
                s, h, consent_given=consent_request is not None, lock=True)
            exclude = set()
            if existing is not None:
                exclude = {existing.id} | identities.not_same_partners(s, existing.id)
            matches = self.index.search(owner.id, model_id, decoded.tensors["normed"], k=3,
                                        exclude=exclude)
            top = self._with_handles(matches[:1], s)
            top_match = top[0] if top else None
            if top_match and (top_match["decision"] == "block"
                              or (existing is not None and top_match["decision"] == "review")):
                hint = ("" if top_match["decision"] == "block" else
                        f"; if they are different people, run `idvault identity not-same "
                        f"{h} {top_match['handle']}`")
                raise DuplicateIdentity(
                    f"these photos match {top_match['handle']} (similarity "
                    f"{top_match['score']:.3f}, {top_match['decision']} threshold "
                    f"{self.settings.dedupe_block if top_match['decision'] == 'block' else self.settings.dedupe_review:.2f})"
                    f"{hint}", handle=top_match["handle"], score=top_match["score"],
                    decision=top_match["decision"])
            if existing is None:
                identity = identities.create_identity(s, h, consent_request, actor=actor,
                                                      uid=uid)
                status = "held" if top_match and top_match["decision"] == "review" else "active"
                identity.status = status
                self._reseal(s, identity)
                payload, added = face, len(decoded.tensors["normed"])
            else:
                identity, status = existing, "updated"
                payload, added = self._merge_faces(identity, decoded, face)
            stored = [self._store(s, identity, codec.decode(payload, kind="face"), payload,
                                  actor=actor)]
            for d, p in extras.values():
                if existing is not None and d.kind in PER_PHOTO_KINDS:
                    p = self._append_photos(identity, d)
                    d = codec.decode(p, kind=d.kind)
                stored.append(self._store(s, identity, d, p, actor=actor))
            review_id = None
            if status == "held":
                candidate = identities.get_identity(s, top_match["handle"])
                review = Review(owner_id=owner.id, identity_id=identity.id,
                                candidate_id=candidate.id, handle=str(h),
                                candidate_handle=top_match["handle"], score=top_match["score"])
                s.add(review)
                s.flush()
                review_id = review.id
            audit.append(s, "enroll", actor=actor, owner=owner.name, subject=str(h),
                         details={"status": status, "photos": added, "model_id": model_id,
                                  "kinds": [a.kind for a in stored], "review": review_id,
                                  "top_match": top_match})
            dedupe_log.record(s, owner.id, identity.id, "add")
            result = EnrollmentResult(str(h), status, stored, top_match, review_id, added)
            if finish is not None:
                finish(s, result)
        return result

    def _merge_faces(self, identity: Identity, new: codec.DecodedArtifact,
                     new_payload: bytes) -> tuple[bytes, int]:
        """The identity's face artifact with ``new``'s photos appended."""
        faces = [a for a in identity.artifacts if a.kind == "face"]
        current = [a for a in faces if a.model_id == new.model_id]
        if not current and faces:
            # Embeddings of different models cannot be compared, so nothing
            # could vouch that these photos show the same person.
            raise PhotoRejected(
                f"cannot check these photos against {identity.handle}: its faces were "
                f"enrolled with another face model ({', '.join(sorted(a.model_id for a in faces))})"
                "; enroll with that model's pack")
        if not current:
            return new_payload, len(new.tensors["normed"])
        old = codec.decode(self._open_artifact(identity, current[0]), kind="face")
        best = float((new.tensors["normed"] @ old.tensors["normed"].T).max())
        if best < self.settings.dedupe_review:
            raise PhotoRejected(
                f"these photos do not look like {identity.handle}: best similarity to its "
                f"enrolled photos is {best:.3f} (below {self.settings.dedupe_review:.2f})")
        raw = np.concatenate([old.tensors["embeddings"], new.tensors["embeddings"]])
        normed = np.concatenate([old.tensors["normed"], new.tensors["normed"]])
        mean = normed.mean(0)
        payload = codec.encode("face", {"embeddings": raw, "normed": normed,
                                        "mean": mean / np.linalg.norm(mean)},
                               {**new.metadata}, max_bytes=self.settings.max_artifact_bytes)
        return payload, len(new.tensors["normed"])

    def _append_photos(self, identity: Identity, new: codec.DecodedArtifact) -> bytes:
        """A per-photo artifact (PhotoMaker) with ``new``'s photos after the stored ones."""
        current = [a for a in identity.artifacts
                   if a.kind == new.kind and a.model_id == new.model_id]
        tensors = dict(new.tensors)
        if current:
            old = codec.decode(self._open_artifact(identity, current[0]), kind=new.kind)
            tensors = {k: np.concatenate([old.tensors[k], v]) for k, v in tensors.items()}
        meta = {k: v for k, v in new.metadata.items() if not k.startswith("idvault.")}
        meta["photos"] = str(len(next(iter(tensors.values()))))
        return codec.encode(new.kind, tensors, meta, max_bytes=self.settings.max_artifact_bytes)

    def list_reviews(self, owner: str | None = None, *, status: str = "pending") -> list[dict]:
        with self.session() as s:
            q = select(Review).where(Review.status == status).order_by(Review.id)
            if owner is not None:
                q = q.where(Review.owner_id == identities.get_owner(s, owner).id)
            return [_describe_review(r) for r in s.scalars(q)]

    def decide_review(self, review_id: int, accept: bool, *,
                      actor: str | None = None) -> dict:
        """Accept (different people: activate, record a not-same pair) or reject (erase)."""
        actor = actor or _actor()
        with self.session() as s:
            review = s.get(Review, review_id, with_for_update=True)
            if review is None:
                raise NotFound(f"no review {review_id}")
            if review.status != "pending":
                raise Conflict(f"review {review_id} was already {review.status}")
            review.status = "accepted" if accept else "rejected"
            review.decided_at, review.decided_by = utcnow(), actor
            doc = _describe_review(review)
            identity = s.get(Identity, review.identity_id) if review.identity_id else None
            if identity is None:
                raise NotFound(f"the identity of review {review_id} no longer exists")
            audit.append(s, "review.accept" if accept else "review.reject", actor=actor,
                         owner=identity.owner.name, subject=review.handle,
                         details={"review": review_id, "candidate": review.candidate_handle,
                                  "score": review.score})
            if accept:
                self.records.verify(identity)  # before the change: never reseal a tampered row
                identity.status = "active"
                self._reseal(s, identity)
                if review.candidate_id is not None:
                    identities.record_not_same(s, review.handle, review.candidate_handle,
                                               actor=actor)
        if not accept:  # (accepted: a held identity is indexed already)
            doc["receipt"] = self.delete_identity(doc["handle"], actor=actor,
                                                  reason="enrollment rejected in review")
        return doc

    # -- consent ------------------------------------------------------------------------
    def withdraw_consent(self, handle: str, *, reason: str | None = None,
                         actor: str | None = None) -> dict:
        """Withdraw consent now; erase at once when the owner's policy says so."""
        h = Handle.parse(handle)
        with self.session() as s:
            dedupe_log.lock_owner(s, identities.get_owner(s, h.owner).id)
            identity = identities.get_identity(s, h, lock=True)
            record = identity.consent
            policy = identity.owner.erase_policy
            # Withdrawn already: a re-run after a crash between the withdrawal's commit and
            # its erasure goes on to erase (immediate policy); otherwise nothing to do.
            rerun = record.withdrawn_at is not None
            if rerun and policy != "immediate":
                raise AlreadyExists(f"consent for {identity.handle} was already withdrawn")
            if not rerun:
                identities.refuse_erasing(identity)
                record.withdrawn_at, record.withdrawal_reason = utcnow(), reason
                identity.status = "withdrawn"
                self._reseal(s, identity)
                audit.append(s, "consent.withdraw", actor=actor or _actor(),
                             owner=identity.owner.name, subject=identity.handle,
                             details={"consent": record.uid, "erase_policy": policy})
                dedupe_log.record(s, identity.owner_id, identity.id, "remove")
            owner_id, identity_id = identity.owner_id, identity.id
        self.index.remove(owner_id, identity_id)  # this process at once; others at catch-up
        result: dict = {"handle": str(Handle.parse(handle)), "withdrawn": True,
                        "erase_policy": policy}
        if policy == "immediate":
            result["receipt"] = self.delete_identity(handle, actor=actor,
                                                     reason="consent withdrawn")
        return result

    def sweep_retention(self, *, today: dt.date | None = None, actor: str | None = None,
                        owner: str | None = None) -> list[dict]:
        """Erase identities (of ``owner``, or every owner's) whose consent's retention date
        has passed. The date is the sealed one: a record edited outside idvault is still
        erased when its sealed consent has expired (an SQL edit cannot extend retention),
        and kept otherwise (its next use is refused); one whose seal cannot be opened is
        left for an operator."""
        today = today or dt.date.today()
        with self.session() as s:
            due = []
            for i in identities.list_identities(s, owner, limit=10**9):
                try:
                    until = i.consent.retain_until
                except RecordTampered:
                    sealed = self.records.sealed_record(i)
                    if sealed is None or not sealed.get("consents"):
                        continue
                    until = dt.date.fromisoformat(sealed["consents"][-1]["retain_until"])
                if until < today:
                    due.append(i.handle)
        return [self.delete_identity(h, actor=actor, reason="retention period ended")
                for h in due]

    # -- erasure ------------------------------------------------------------------------
    def delete_identity(self, handle: str, *, actor: str | None = None,
                        reason: str = "requested") -> dict:
        """Crypto-shred, then delete every row and the stored generated images that show
        the identity (:mod:`vault.generated_images`); returns a signed receipt.

        Crash-safe in this order: the signing key is checked (nothing is erased unless a
        receipt can be signed); one transaction marks the identity ``erasing`` (refused
        for every use from then on) and records the request in ``erasure_receipts``; the
        data key is shredded; one transaction deletes the rows, appends the audit event
        and stores the receipt, signed before the commit. A re-run (or the next
        :meth:`open`) finishes an identity left ``erasing``; a re-run after completion
        returns the stored receipt (:meth:`erasure_receipt`).
        """
        h = Handle.parse(handle)
        if self.identity_status(h) is None:
            stored = self._completed_receipt(handle=str(h))
            if stored is None:
                raise NotFound(f"no identity {h}")
            return stored
        self.keys.check_signing()  # before anything is erased
        return self._finish_erasure(self._begin_erasure(h, actor=actor or _actor(),
                                                        reason=reason))

    def identity_status(self, handle: str | Handle) -> str | None:
        """The status of the identity at ``handle``, None when there is none. Reads no
        consent and checks no seal: erasure must work on any identity."""
        h = Handle.parse(str(handle))
        with self.session(read_only=True) as s:
            return s.scalar(select(Identity.status).join(Owner).where(
                Owner.name == h.owner, Identity.name == h.name))

    def _begin_erasure(self, h: Handle, *, actor: str, reason: str) -> _Erasure:
        """Mark the identity ``erasing`` and record the request (its reason, actor and data
        key id, which a run that finishes it after a crash uses); committed."""
        with self.session() as s:
            identity = identities.get_identity(s, h, lock=True)
            row = s.scalar(select(ErasureReceipt)
                           .where(ErasureReceipt.identity_uid == identity.uid))
            if row is None:
                row = ErasureReceipt(identity_uid=identity.uid, handle=str(h), reason=reason,
                                     actor=actor, data_key_id=self.keys.key_id_of(identity.uid))
                s.add(row)
            if identity.status != "erasing":
                identity.status = "erasing"
                self._reseal(s, identity)
            return _Erasure(identity.uid, identity.id, identity.owner_id, h, row.reason,
                            row.actor, row.data_key_id)

    def _finish_erasure(self, e: _Erasure) -> dict:
        key_id = self.keys.shred(e.uid) or e.key_id  # from here on, every copy is unreadable
        staged_photos.discard_identity(self, e.uid)  # unreadable already; now gone too
        removed = self.index.remove(e.owner_id, e.identity_id)
        signed = None
        with self.session() as s:
            dedupe_log.lock_owner(s, e.owner_id)
            identity = s.scalar(select(Identity)
                                .where(Identity.id == e.identity_id, Identity.uid == e.uid)
                                .with_for_update()
                                .options(selectinload(Identity.consents),
                                         selectinload(Identity.artifacts)))
            if identity is not None:
                signed = self._erase_rows(s, identity, e, key_id, removed)
        if signed is None:  # another process finished it meanwhile
            stored = self._completed_receipt(uid=e.uid)
            if stored is None:
                raise NotFound(f"no identity {e.handle}")
            return stored
        self._checkpoint()
        return signed

    def _erase_rows(self, s: Session, identity: Identity, e: _Erasure, key_id: str | None,
                    removed: int) -> dict:
        """Delete the identity's rows, audit, and store the signed receipt, all in ``s``."""
        artifacts = [{"id": a.id, "kind": a.kind, "model_id": a.model_id, "sha256": a.sha256}
                     for a in sorted(identity.artifacts, key=lambda a: a.id)]
        consents = [c.uid for c in identity.consents]
        s.execute(delete(NotSamePair).where((NotSamePair.identity_a == e.identity_id)
                                            | (NotSamePair.identity_b == e.identity_id)))
        s.execute(delete(Job).where(Job.identity_id == e.identity_id))
        s.delete(identity)
        s.flush()
        dedupe_log.record(s, e.owner_id, e.identity_id, "remove")
        erased_at = utcnow()
        images = generated_images.remove_showing(s, self.settings.data_dir, e.owner_id,
                                                 str(e.handle), reason=e.reason, now=erased_at)
        # A key made since the first shred (nothing should make one) goes too; the
        # receipt says whether any key of this identity is left, whichever run shredded it.
        key_id = self.keys.shred(e.uid) or key_id
        shredded = self.keys.key_id_of(e.uid) is None
        event = audit.append(s, "identity.delete", actor=e.actor, owner=e.handle.owner,
                             subject=str(e.handle),
                             details={"identity": e.uid, "artifacts": len(artifacts),
                                      "data_key": key_id, "reason": e.reason,
                                      "generated_images": len(images)})
        receipt = {
            "type": RECEIPT_TYPE, "vault": str(self.vault_id), "handle": str(e.handle),
            "identity": e.uid, "erased_at": audit.canonical_time(erased_at),
            "reason": e.reason, "artifacts": artifacts, "consent_records": consents,
            "data_key": {"key_id": key_id, "shredded": shredded},
            "index_vectors_removed": removed, "generated_images_removed": len(images),
            "audit_seq": event.seq,
        }
        # Signed before the commit and stored with it: a completed erasure has its receipt.
        signed = self.sign_receipt(receipt)
        row = s.scalar(select(ErasureReceipt).where(ErasureReceipt.identity_uid == e.uid))
        if row is None:  # marked erasing by an older version, or by hand
            row = ErasureReceipt(identity_uid=e.uid, handle=str(e.handle), reason=e.reason,
                                 actor=e.actor, data_key_id=key_id)
            s.add(row)
        row.receipt, row.completed_at = signed, erased_at
        return signed

    def _completed_receipt(self, *, handle: str | None = None,
                           uid: str | None = None) -> dict | None:
        """The stored signed receipt of the newest completed erasure of ``handle`` (a
        handle may be reused after an erasure) or of identity ``uid``."""
        q = select(ErasureReceipt.receipt).where(ErasureReceipt.completed_at.is_not(None))
        q = (q.where(ErasureReceipt.identity_uid == uid) if uid is not None
             else q.where(ErasureReceipt.handle == handle))
        with self.session(read_only=True) as s:
            return s.scalar(q.order_by(ErasureReceipt.completed_at.desc(),
                                       ErasureReceipt.id.desc()).limit(1))

    def erasure_receipt(self, ref: str) -> dict:
        """The signed receipt of a completed erasure, by handle (the newest erasure of that
        handle) or identity uid, as stored when it completed. Conflict while the erasure
        is unfinished; NotFound when nothing by that name was erased."""
        try:
            uid: str | None = parse_uid(ref)
        except InvalidInput:
            uid = None
        h = None if uid is not None else Handle.parse(ref)
        stored = (self._completed_receipt(uid=uid) if uid is not None
                  else self._completed_receipt(handle=str(h)))
        if stored is not None:
            return stored
        with self.session(read_only=True) as s:
            q = select(Owner.name, Identity.name).join(Owner).where(Identity.status == "erasing")
            q = (q.where(Identity.uid == uid) if uid is not None
                 else q.where(Owner.name == h.owner, Identity.name == h.name))
            pending = s.execute(q).first()
        if pending is not None:
            handle = f"{pending[0]}/{pending[1]}"
            raise Conflict(f"the erasure of {handle} began and has not finished; "
                           f"`idvault identity delete {handle}` finishes it and prints the "
                           "receipt")
        raise NotFound(f"no identity {ref}, and no erasure receipt for it")

    def finish_interrupted_erasures(self, *, actor: str | None = None) -> list[dict]:
        """Finish the erasures a crash interrupted: identities left ``erasing``, and
        withdrawn ones whose owner erases at once (killed between the withdrawal and its
        erasure). One indexed query when there are none (:meth:`open` calls this). Returns
        the signed receipts; an erasure that cannot finish now (a broken signing key) is
        logged and left for the next try."""
        with self.session(read_only=True) as s:
            due = s.execute(
                select(Owner.name, Identity.name, Identity.status).join(Owner)
                .where(Identity.status.in_(("erasing", "withdrawn")))
                .where((Identity.status == "erasing") | (Owner.erase_policy == "immediate"))
                .order_by(Identity.id)).all()
        receipts = []
        for owner, name, status in due:
            handle = f"{owner}/{name}"
            try:
                receipts.append(self.delete_identity(
                    handle, actor=actor,
                    reason="consent withdrawn" if status == "withdrawn" else "requested"))
            except VaultError as exc:
                log.warning("could not finish the erasure of %s: %s", handle, exc)
        return receipts

    def _checkpoint(self) -> None:
        # WAL pages may still hold deleted rows until a checkpoint rewrites them.
        if self.engine.dialect.name == "sqlite":
            raw = self.engine.raw_connection()  # outside any transaction, as SQLite requires
            try:
                raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()

    def sign_receipt(self, receipt: dict) -> dict:
        key_id, public, signature = self.keys.sign(_canonical(receipt))
        return {"receipt": receipt,
                "signature": {"alg": "Ed25519", "key_id": str(key_id),
                              "public_key": base64.b64encode(public).decode(),
                              "value": base64.b64encode(signature).decode()}}

    def verify_receipt(self, signed: dict) -> dict:
        """Check a receipt's signature against this vault's signing key."""
        try:
            receipt, sig = signed["receipt"], signed["signature"]
            signature = base64.b64decode(sig["value"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise InvalidInput("not an idvault receipt (needs 'receipt' and 'signature')") from None
        key_id, public = self.keys.public_key()
        if sig.get("key_id") != str(key_id):
            raise SignatureInvalid("the receipt was signed by a key this vault does not know")
        if not KeyStore.verify_signature(public, _canonical(receipt), signature):
            raise SignatureInvalid("the receipt's signature does not match its contents "
                                   "(it was altered)")
        return receipt

    # -- keys and audit -----------------------------------------------------------------
    def rotate_keys(self, *, batch_size: int = 50, actor: str | None = None,
                    progress: Callable[[int, int], None] | None = None) -> RotationReport:
        """Rotate the KEK (:meth:`KeyStore.rotate`) and audit it, once per rotation: a
        rotation killed mid-way resumes; one that finished in the key store but was
        killed before its ``keys.rotate`` event gets that event now, marked
        ``recorded_late``, instead of a new rotation."""
        actor = actor or _actor()
        late = self._unaudited_rotation()
        if late is not None:
            with self.session() as s:
                audit.append(s, "keys.rotate", actor=actor,
                             details={"from": late.from_versions, "to": late.to_version,
                                      "rewrapped": None, "resumed": True,
                                      "recorded_late": True})
            return late
        report = self.keys.rotate(batch_size=batch_size, progress=progress)
        with self.session() as s:
            audit.append(s, "keys.rotate", actor=actor,
                         details={"from": report.from_versions, "to": report.to_version,
                                  "rewrapped": report.rewrapped, "resumed": report.resumed})
        return report

    def _unaudited_rotation(self) -> RotationReport | None:
        """The rotation the key store completed whose ``keys.rotate`` event is missing (its
        process ended in between), as a report; None when there is none."""
        versions = self.keys.kek_versions()
        if not versions or any(st == "retiring" for _, st in versions):
            return None  # none yet, or one under way: the run that resumes it audits it
        active = max((v for v, st in versions if st == "active"), default=None)
        if active is None or active == min(v for v, _ in versions):
            return None  # never rotated
        with self.session(read_only=True) as s:
            last = s.scalar(select(AuditEvent.details).where(AuditEvent.action == "keys.rotate")
                            .order_by(AuditEvent.seq.desc()).limit(1))
        audited = last.get("to") if isinstance(last, dict) else None
        if isinstance(audited, int) and audited >= active:
            return None
        floor = audited if isinstance(audited, int) else 0
        return RotationReport(
            [v for v, st in versions if st == "retired" and floor <= v < active], active, 0,
            True, f"KEK version {active} was already active: its rotation completed but its "
                  "process ended before the audit event, which is recorded now (late); run "
                  "`idvault keys rotate` again to rotate anew")

    def sweep_orphan_keys(self, *, grace_seconds: float = ORPHAN_KEY_GRACE_SECONDS,
                          now: dt.datetime | None = None, made_since: dt.datetime | None = None,
                          actor: str | None = None) -> dict:
        """Shred the data keys no identity will ever use: no identity row has their uid,
        no staged photos nor queued or running job name it, and they are older than
        ``grace_seconds`` (an enrollment makes its key before its identity row, so a crash
        in between leaves such a key). ``made_since``: judge only keys made then or later
        (the periodic sweep, which runs every few minutes, need not read every key of a
        large vault). Audited (``keys.sweep``) when any is shredded; returns the counts."""
        now = now or utcnow()
        made = self.keys.dek_created(made_since)  # read first: a later key is not judged
        with self.session(read_only=True) as s:
            candidates = sorted(made)
            known = set()
            for start in range(0, len(candidates), 900):  # under SQLite's variable limit
                known.update(s.scalars(select(Identity.uid).where(
                    Identity.uid.in_(candidates[start:start + 900]))))
            job_uids = {staged_photos.staged_uid(p) for p in s.scalars(
                select(Job.params).where(Job.status.in_(("queued", "running"))))}
        staged = staged_photos.staged_uids(self) | (job_uids - {None})
        kept_staged = kept_recent = 0
        orphans = []
        for uid, created in sorted(made.items()):
            if uid in known:
                continue
            if uid in staged:
                kept_staged += 1
            elif (now - created).total_seconds() < grace_seconds:
                kept_recent += 1
            else:
                orphans.append(uid)
        shredded = [uid for uid in orphans if self.keys.shred(uid) is not None]
        if shredded:
            with self.session() as s:
                audit.append(s, "keys.sweep", actor=actor or _actor(),
                             details={"shredded": len(shredded), "identities": shredded,
                                      "grace_seconds": grace_seconds})
        return {"data_keys": len(made), "orphans_shredded": len(shredded),
                "kept_staged": kept_staged, "kept_recent": kept_recent}

    def sweep_recent_orphan_keys(self) -> dict:
        """:meth:`sweep_orphan_keys` over the keys made in the last
        ``PERIODIC_ORPHAN_WINDOW``: what the job runners call every few minutes."""
        return self.sweep_orphan_keys(made_since=utcnow() - PERIODIC_ORPHAN_WINDOW)

    def _anchor_audit_head(self) -> None:
        """Sign the audit head into the key store once where it is marked pending: a vault
        from before checkpoints (key-store migration k0002), or an init that crashed before
        its first. Events before that point were never anchored; from it on they are."""
        def read_head() -> tuple[int, str] | None:
            with self.session(read_only=True) as s:
                head = s.get(AuditHead, 1)
                return (head.seq, head.hash) if head is not None else None

        audit_anchor.anchor_pending(self.keys, read_head)

    def reanchor_audit(self, *, actor: str | None = None) -> audit.VerifyResult:
        """Accept the chain as it now is (a data database restored from a backup): when it
        is intact in itself, replace the checkpoints with one of a new ``audit.reanchor``
        event naming the dropped newest checkpoint. Needs the KEK; checked first, so a
        failure leaves the old checkpoints in place."""
        self.keys.check()
        with self.session(read_only=True) as s:
            chain = audit.verify(s)
        chain.raise_if_bad()
        dropped = audit_anchor.load(self.keys).latest
        audit_anchor.reset(self.keys)
        with self.session() as s:
            audit.append(s, "audit.reanchor", actor=actor or _actor(),
                         details={"dropped": {"seq": dropped.seq, "hash": dropped.hash}
                                  if dropped is not None else None,
                                  "head": {"seq": chain.head_seq, "hash": chain.head_hash}})
        self._anchor_audit_head()  # clears the mark, or anchors if the hook could not
        return self.verify_audit()

    def verify_audit(self, *, since: tuple[int, str] | None = None) -> audit.VerifyResult:
        """Check the chain against the key store's signed checkpoints: whole, or from
        ``since`` = ``(seq, hash)`` (an anchored head) on. The result carries the head and
        the newest checkpoint; it is not ok when either disagrees with the chain."""
        anchors = audit_anchor.load(self.keys, since=since[0] if since else None)
        if anchors.problem is not None:
            return audit.VerifyResult(False, 0, anchors.problem_seq, anchors.problem,
                                      checkpoint=anchors.latest)
        # The checkpoints are read first: one written during the walk could be past the
        # chain it sees. PostgreSQL reads the whole walk from one snapshot.
        bind = self.engine.execution_options(**{db.READ_ONLY: True})
        if self.engine.dialect.name == "postgresql":
            bind = bind.execution_options(isolation_level="REPEATABLE READ")
        with Session(bind, expire_on_commit=False) as s, s.begin():
            result = audit.verify(s, anchors=anchors.anchors, since=since)
        result.checkpoint = anchors.latest
        return result


def _describe_review(r: Review) -> dict:
    return {"id": r.id, "handle": r.handle, "candidate": r.candidate_handle,
            "score": round(r.score, 4), "status": r.status,
            "created_at": audit.canonical_time(r.created_at),
            "decided_at": audit.canonical_time(r.decided_at) if r.decided_at else None,
            "decided_by": r.decided_by}


def _canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()



