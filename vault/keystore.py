"""The key store: per-identity data keys (DEKs) wrapped under the KEK.

Lives in its own database (``keystore.db`` by default) so that deleting a
DEK crypto-shreds every copy of that identity's ciphertext, backups of the
data database included. Also holds the vault's Ed25519 signing key (erasure
receipts, provenance) wrapped the same way.

The key that seals identity records (:mod:`vault.record_seal`) is derived from
the signing key (:meth:`KeyStore.record_key`), so it too lives only here.

Wrapped keys are tokens of :mod:`vault.crypto` whose header carries the vault
id and the KEK version, so unwrapping looks the KEK up directly. Each KEK
version has a check value (an HMAC of a constant) so a wrong key file is
reported as such. Rotation (:meth:`KeyStore.rotate`) adds a KEK version and
re-wraps every key in small committed batches; it can be killed at any point
and a re-run finishes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from sqlalchemy import Engine, String, any_, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import Session

from vault import crypto
from vault.db import READ_ONLY
from vault.errors import DecryptionError, IntegrityError, KeyUnavailable, NotFound
from vault.keyprovider import KeyProvider
from vault.keystore_models import DataKey, KekVersion, KeystoreMeta, SigningKey

_CHECK_LABEL = b"idvault kek check v1"
RECORD_KEY_INFO = b"idvault identity record seal v1"
SIGNING_PURPOSE = "vault"
# str(uuid.UUID(x)) == x exactly for these, so a row's key id text can go in the context.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SQL_VARIABLES = 900  # keys per IN (...) query: under SQLite's old variable limit


def kek_check_value(kek: bytes) -> bytes:
    return hmac.new(kek, _CHECK_LABEL, hashlib.sha256).digest()


@dataclass
class RotationReport:
    from_versions: list[int]
    to_version: int
    rewrapped: int
    resumed: bool
    note: str | None


class KeyStore:
    def __init__(self, engine: Engine, provider: KeyProvider, *, dek_cache_seconds: float = 30.0,
                 on_cache: Callable[[], None] | None = None):
        """``on_cache`` is called whenever a data key is cached (the vault starts its cache
        sweeper, which drops keys shredded by other processes: :meth:`drop_shredded`)."""
        self.engine = engine
        self.provider = provider
        self._read_engine = engine.execution_options(**{READ_ONLY: True})
        self._keks: dict[int, bytes] = {}
        # identity uid -> (cached at, key id, DEK); insertion order = age order
        self._deks: OrderedDict[str, tuple[float, uuid.UUID, bytes]] = OrderedDict()
        self._cache_seconds = dek_cache_seconds
        self._on_cache = on_cache
        self._lock = threading.Lock()
        self._vault_id: uuid.UUID | None = None
        self._record_key: bytes | None = None

    @contextmanager
    def _session(self, *, read_only: bool = False) -> Iterator[Session]:
        bind = self._read_engine if read_only else self.engine
        with Session(bind, expire_on_commit=False) as s, s.begin():
            yield s

    # -- setup ---------------------------------------------------------------
    def initialise(self, vault_id: uuid.UUID) -> None:
        """First KEK version and signing key of a new vault."""
        key, salt = self.provider.create(1)
        with self._session() as s:
            s.add(KeystoreMeta(key="vault_id", value=str(vault_id)))
            s.add(KekVersion(version=1, provider=self.provider.name, salt=salt,
                             check_value=kek_check_value(key), state="active"))
        self._vault_id = vault_id
        self._keks[1] = key
        private = Ed25519PrivateKey.generate()
        key_id = uuid.uuid4()
        with self._session() as s:
            s.add(SigningKey(
                key_id=str(key_id), purpose=SIGNING_PURPOSE,
                public_key=private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
                kek_version=1, wrapped_private=self._wrap(private.private_bytes_raw(), 1,
                                                          _signing_context(key_id)),
            ))

    @property
    def vault_id(self) -> uuid.UUID:
        if self._vault_id is None:
            with self._session(read_only=True) as s:
                row = s.get(KeystoreMeta, "vault_id")
            if row is None:
                raise KeyUnavailable("the key store is empty: run `idvault init`")
            self._vault_id = uuid.UUID(row.value)
        return self._vault_id

    def get_meta(self, key: str) -> str | None:
        """A fact recorded in the key store's meta table (None: not recorded)."""
        with self._session(read_only=True) as s:
            row = s.get(KeystoreMeta, key)
            return None if row is None else row.value

    def set_meta(self, key: str, value: str) -> None:
        with self._session() as s:
            row = s.get(KeystoreMeta, key)
            if row is None:
                s.add(KeystoreMeta(key=key, value=value))
            else:
                row.value = value

    def check(self) -> int:
        """Verify that the active KEK is available and right; its version."""
        version = self.active_version()
        self.kek(version)
        return version

    # -- KEKs ----------------------------------------------------------------
    def active_version(self) -> int:
        with self._session(read_only=True) as s:
            v = s.scalar(select(func.max(KekVersion.version)).where(KekVersion.state == "active"))
        if v is None:
            raise KeyUnavailable("the key store has no active KEK version: run `idvault init`")
        return v

    def kek(self, version: int) -> bytes:
        if version in self._keks:
            return self._keks[version]
        with self._session(read_only=True) as s:
            row = s.get(KekVersion, version)
            if row is None:
                raise KeyUnavailable(f"KEK version {version} is unknown to this key store")
            salt, check, state = row.salt, row.check_value, row.state
        if state == "retired":
            raise KeyUnavailable(f"KEK version {version} was retired by a key rotation")
        for candidate in self.provider.candidates(version, salt):
            if hmac.compare_digest(kek_check_value(candidate), check):
                self._keks[version] = candidate
                return candidate
        raise KeyUnavailable(
            f"{self.provider.describe()} does not match this vault: KEK version {version} "
            "failed its check value (wrong key file, variable or passphrase?)"
        )

    def _wrap(self, secret: bytes, version: int, context: dict[str, str]) -> bytes:
        return crypto.seal(self.kek(version), secret, key_id=self.vault_id,
                           key_version=version, context=context)

    def _unwrap(self, token: bytes, context: dict[str, str] | bytes) -> bytes:
        key_id, version = crypto.read_key(token)
        if key_id != self.vault_id.bytes:
            raise DecryptionError("wrapped key belongs to another vault")
        return crypto.open_token(self.kek(version), token, context=context)

    # -- DEKs ----------------------------------------------------------------
    def get_or_create_dek(self, identity_uid: str) -> tuple[uuid.UUID, bytes]:
        try:
            return self.dek(identity_uid)
        except NotFound:
            pass
        key_id, dek = uuid.uuid4(), crypto.new_key()
        for _ in range(3):
            self.kek(self.active_version())  # fetched outside the write transaction
            try:
                # The active version is read again in the writing transaction, so
                # a rotation that committed meanwhile is honoured (and a running
                # rotation's re-wrap loop sees this row).
                with self._session() as s:
                    version = s.scalar(select(func.max(KekVersion.version))
                                       .where(KekVersion.state == "active"))
                    if version in self._keks:
                        s.add(DataKey(key_id=str(key_id), identity_uid=identity_uid,
                                      kek_version=version,
                                      wrapped=self._wrap(dek, version,
                                                         _dek_context(identity_uid, key_id))))
            except SAIntegrityError:
                return self.dek(identity_uid)  # created concurrently
            if version in self._keks:
                self._remember(identity_uid, key_id, dek)
                return key_id, dek
        raise KeyUnavailable("the key-encryption key changed three times while writing a data "
                             "key; is a rotation running? try again")

    def _remember(self, identity_uid: str, key_id: uuid.UUID, dek: bytes) -> None:
        if self._cache_seconds > 0:
            with self._lock:
                self._deks[identity_uid] = (time.monotonic(), key_id, dek)
                self._deks.move_to_end(identity_uid)
            if self._on_cache is not None:
                self._on_cache()

    def drop_shredded(self) -> int:
        """Drop the cached data keys whose key is no longer in the key store (another
        process shredded it); how many. One query for all the cached keys."""
        with self._lock:
            cached = list(self._deks)
        if not cached:
            return 0
        with self._session(read_only=True) as s:
            kept = set(s.scalars(select(DataKey.identity_uid)
                                 .where(DataKey.identity_uid.in_(cached))))
        gone = [uid for uid in cached if uid not in kept]
        with self._lock:
            for uid in gone:
                self._deks.pop(uid, None)
        return len(gone)

    def dek(self, identity_uid: str) -> tuple[uuid.UUID, bytes]:
        now = time.monotonic()
        with self._lock:
            # Drop expired keys (the oldest come first) so unwrapped DEKs do
            # not outlive the cache window; amortised O(1) per call.
            while self._deks:
                uid, (cached_at, _, _) = next(iter(self._deks.items()))
                if now - cached_at < self._cache_seconds:
                    break
                del self._deks[uid]
            hit = self._deks.get(identity_uid)
            if hit:
                return hit[1], hit[2]
        with self._session(read_only=True) as s:
            row = s.scalar(select(DataKey).where(DataKey.identity_uid == identity_uid))
            if row is None:
                raise NotFound(
                    "no data key for this identity: it was erased (crypto-shredded) or never "
                    "stored an artifact"
                )
            key_id, wrapped = row.key_id, row.wrapped
        dek = self._unwrap_dek(identity_uid, key_id, wrapped)
        kid = uuid.UUID(key_id)
        self._remember(identity_uid, kid, dek)
        return kid, dek

    def _unwrap_dek(self, identity_uid: str, key_id: str, wrapped: bytes) -> bytes:
        """A data key row's DEK; IntegrityError if it fails authentication."""
        context = (_DEK_CONTEXT(identity_uid, key_id) if _CANONICAL_UUID.fullmatch(key_id)
                   else _dek_context(identity_uid, uuid.UUID(key_id)))
        try:
            return self._unwrap(wrapped, context)
        except DecryptionError:
            raise IntegrityError(
                f"the wrapped data key of identity {identity_uid} failed authentication: "
                "the key store row is corrupt or was altered"
            ) from None

    def shred(self, identity_uid: str) -> str | None:
        """Delete an identity's DEK for good; its key id, or None if it had none."""
        with self._lock:
            self._deks.pop(identity_uid, None)
        with self._session() as s:
            row = s.scalar(select(DataKey).where(DataKey.identity_uid == identity_uid))
            if row is None:
                return None
            key_id = row.key_id
            s.delete(row)
        return key_id

    def key_id_of(self, identity_uid: str) -> str | None:
        """The key id of an identity's data key, or None when it has none (nothing is
        unwrapped: an erasure records which key it is about to shred)."""
        with self._session(read_only=True) as s:
            return s.scalar(select(DataKey.key_id).where(DataKey.identity_uid == identity_uid))

    def dek_created(self, since: dt.datetime | None = None) -> dict[str, dt.datetime]:
        """``identity uid -> when its data key was made``, for every data key, or those made
        at ``since`` or later (the orphan sweep: an enrollment makes its key before its
        identity row)."""
        q = select(DataKey.identity_uid, DataKey.created_at)
        if since is not None:
            q = q.where(DataKey.created_at >= since)
        with self._session(read_only=True) as s:
            return dict(s.execute(q).all())

    def count_deks(self) -> int:
        with self._session(read_only=True) as s:
            return s.scalar(select(func.count()).select_from(DataKey)) or 0

    def dek_uids(self) -> set[str]:
        with self._session(read_only=True) as s:
            return set(s.scalars(select(DataKey.identity_uid)))

    def all_deks(self, uids: set[str] | Sequence[str]) -> dict[str, bytes]:
        """``uid -> DEK`` for those of ``uids`` that have a data key (one that has none was
        erased), with few queries and the checks of :meth:`dek`. For bulk readers
        (index rebuilds and catch-ups), which use each key once: nothing is cached."""
        wanted = sorted(uids)
        # PostgreSQL takes them as one array: a 900-item IN list costs it 4x the time
        # (bench/bench_rebuild.py); SQLite has no arrays and a limit on variables.
        pg = self.engine.dialect.name == "postgresql"
        step = max(len(wanted), 1) if pg else _SQL_VARIABLES
        rows = []
        with self._session(read_only=True) as s:
            for start in range(0, len(wanted), step):
                chunk = wanted[start:start + step]
                match = (DataKey.identity_uid == any_(bindparam("uids", chunk,
                                                                type_=ARRAY(String)))
                         if pg else DataKey.identity_uid.in_(chunk))
                rows += s.execute(select(DataKey.identity_uid, DataKey.key_id, DataKey.wrapped)
                                  .where(match))
        # unwrapped after the read: the key store's writers do not wait for it
        return {uid: self._unwrap_dek(uid, key_id, wrapped) for uid, key_id, wrapped in rows}

    # -- signing -------------------------------------------------------------
    def _signing_row(self) -> tuple[uuid.UUID, bytes, bytes]:
        with self._session(read_only=True) as s:
            row = s.scalar(select(SigningKey).where(SigningKey.purpose == SIGNING_PURPOSE))
            if row is None:
                raise KeyUnavailable("the key store has no signing key: run `idvault init`")
            return uuid.UUID(row.key_id), row.public_key, row.wrapped_private

    def sign(self, message: bytes) -> tuple[uuid.UUID, bytes, bytes]:
        """Sign ``message``: ``(key_id, public_key, signature)``."""
        key_id, public, wrapped = self._signing_row()
        private = Ed25519PrivateKey.from_private_bytes(
            self._unwrap(wrapped, _signing_context(key_id))
        )
        return key_id, public, private.sign(message)

    def check_signing(self) -> uuid.UUID:
        """Sign and verify a probe with the vault's signing key; its key id. An erasure
        calls this before erasing anything, so a broken key refuses the erasure instead
        of leaving it without its receipt. IntegrityError (or KeyUnavailable) if not."""
        probe = b"idvault signing-key check " + uuid.uuid4().bytes
        try:
            key_id, public, signature = self.sign(probe)
        except DecryptionError:
            raise IntegrityError("the vault's signing key failed authentication: its key "
                                 "store row is corrupt or was altered; nothing was erased"
                                 ) from None
        except ValueError:
            raise IntegrityError("the vault's signing key is malformed in the key store; "
                                 "nothing was erased") from None
        if not self.verify_signature(public, probe, signature):
            raise IntegrityError("the vault's signing key does not match its public key in "
                                 "the key store (a row was altered); nothing was erased")
        return key_id

    def public_key(self) -> tuple[uuid.UUID, bytes]:
        key_id, public, _ = self._signing_row()
        return key_id, public

    def record_key(self) -> bytes:
        """The key that seals identity records (``vault.record_seal``), cached.

        Derived with HKDF-SHA256 from the vault's Ed25519 signing private key (salt: the
        vault id, info: ``RECORD_KEY_INFO``), so it lives only where that key does: in
        this key store, wrapped under the KEK, never in the data database. HKDF with its
        own label separates it from the signing use: the derived key reveals nothing of
        the private key, and no signature is ever an AES key. A KEK rotation re-wraps
        the signing key but does not change it, so the record key (and every seal) stays
        valid; nothing revokes it, so caching it for the life of this object is safe.
        """
        if self._record_key is None:
            key_id, _, wrapped = self._signing_row()
            secret = self._unwrap(wrapped, _signing_context(key_id))
            self._record_key = HKDF(algorithm=hashes.SHA256(), length=crypto.KEY_BYTES,
                                    salt=self.vault_id.bytes,
                                    info=RECORD_KEY_INFO).derive(secret)
        return self._record_key

    @staticmethod
    def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    # -- rotation ----------------------------------------------------------------
    def rotate(self, *, batch_size: int = 50,
               progress: Callable[[int, int], None] | None = None) -> RotationReport:
        """Re-wrap every key under a new KEK version; resumable and idempotent.

        1. Unless a rotation is already under way (a version in state
           ``retiring``), create version N+1 with the provider (idempotent for
           a version the provider already made) and, in one transaction, make
           it active and the old ones ``retiring``.
        2. Re-wrap DEKs and the signing key still under older versions, in
           committed batches: each row is readable at every moment.
        3. When none is left, ask the provider to forget the old versions,
           then mark them ``retired``.
        """
        with self._session() as s:
            versions = {v.version: v.state for v in s.scalars(select(KekVersion))}
        retiring = sorted(v for v, st in versions.items() if st == "retiring")
        resumed = bool(retiring)
        if not resumed:
            for v, st in versions.items():
                if st == "active":
                    self.kek(v)  # the current key must be right before we begin
            target = max(versions) + 1
            key, salt = self.provider.create(target)
            with self._session() as s:
                for row in s.scalars(select(KekVersion).where(KekVersion.state == "active")):
                    row.state = "retiring"
                    retiring.append(row.version)
                s.add(KekVersion(version=target, provider=self.provider.name, salt=salt,
                                 check_value=kek_check_value(key), state="active"))
            self._keks[target] = key
        target = self.active_version()
        self.kek(target)

        total = self._count_old(target)
        done = 0
        while True:
            # Unwrapping needs the old KEKs; fetch them before the batch's write
            # transaction, as kek() reads the key store itself.
            with self._session() as s:
                old_versions = set(s.scalars(select(DataKey.kek_version).distinct()))
                old_versions |= set(s.scalars(select(SigningKey.kek_version).distinct()))
            for v in old_versions - {target}:
                self.kek(v)
            with self._session() as s:
                rows = s.scalars(select(DataKey).where(DataKey.kek_version != target)
                                 .limit(batch_size)).all()
                for row in rows:
                    ctx = _dek_context(row.identity_uid, uuid.UUID(row.key_id))
                    row.wrapped = self._wrap(self._unwrap(row.wrapped, ctx), target, ctx)
                    row.kek_version = target
                signing = s.scalars(select(SigningKey).where(SigningKey.kek_version != target)).all()
                for row in signing:
                    ctx = _signing_context(uuid.UUID(row.key_id))
                    row.wrapped_private = self._wrap(self._unwrap(row.wrapped_private, ctx),
                                                     target, ctx)
                    row.kek_version = target
            done += len(rows) + len(signing)
            if progress:
                progress(done, max(total, done))
            if not rows and not signing:
                break
        note = self.provider.retire(retiring) if retiring else None
        with self._session() as s:
            for row in s.scalars(select(KekVersion).where(KekVersion.state == "retiring")):
                row.state = "retired"
        for v in retiring:
            self._keks.pop(v, None)
        return RotationReport(retiring, target, done, resumed, note)

    def _count_old(self, target: int) -> int:
        with self._session(read_only=True) as s:
            n = s.scalar(select(func.count()).select_from(DataKey)
                         .where(DataKey.kek_version != target)) or 0
            n += s.scalar(select(func.count()).select_from(SigningKey)
                          .where(SigningKey.kek_version != target)) or 0
        return n

    def kek_versions(self) -> list[tuple[int, str]]:
        with self._session(read_only=True) as s:
            return [(v.version, v.state) for v in s.scalars(select(KekVersion)
                                                              .order_by(KekVersion.version))]


def _dek_context(identity_uid: str, key_id: uuid.UUID) -> dict[str, str]:
    return {"purpose": "dek", "identity": identity_uid, "key_id": str(key_id)}


_DEK_CONTEXT = crypto.ContextEncoder({"purpose": "dek"}, ("identity", "key_id"))


def _signing_context(key_id: uuid.UUID) -> dict[str, str]:
    return {"purpose": "signing-key", "key_id": str(key_id)}
