"""SQLAlchemy models of the key store, a database apart from the data.

Holds per-identity data keys (DEKs) wrapped under the key-encryption key
(KEK), the KEK versions' check values, the vault's wrapped Ed25519
signing key, and signed checkpoints of the audit chain's head. Deleting a DEK
row here is what crypto-shreds an identity: every copy of the data database,
backups included, becomes unreadable.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import CheckConstraint, Integer, LargeBinary, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from vault.models import NAMING, UTCDateTime, utcnow

KEK_STATES = ("active", "retiring", "retired")


class KeystoreBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class KeystoreMeta(KeystoreBase):
    __tablename__ = "keystore_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class KekVersion(KeystoreBase):
    """A KEK version: how to derive or find it, and a value that checks it."""

    __tablename__ = "kek_versions"
    __table_args__ = (
        CheckConstraint("state IN ('active', 'retiring', 'retired')", name="state"),
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    provider: Mapped[str] = mapped_column(String(16))
    salt: Mapped[bytes | None] = mapped_column(LargeBinary)  # passphrase provider only
    check_value: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class DataKey(KeystoreBase):
    """One identity's DEK, wrapped (sealed) under a KEK version."""

    __tablename__ = "data_keys"
    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    identity_uid: Mapped[str] = mapped_column(String(36), unique=True)
    kek_version: Mapped[int] = mapped_column(Integer, index=True)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class SigningKey(KeystoreBase):
    """The vault's Ed25519 key (receipts, provenance); private half wrapped."""

    __tablename__ = "signing_keys"
    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32), unique=True)
    public_key: Mapped[bytes] = mapped_column(LargeBinary)
    kek_version: Mapped[int] = mapped_column(Integer, index=True)
    wrapped_private: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditCheckpoint(KeystoreBase):
    """A signed (seq, hash) of the audit chain's head, kept apart from the chain.

    ``slot`` 0 is the newest checkpoint (overwritten, only ever forward); slot ``n`` > 0 keeps
    the first checkpoint written at or past event ``n * HISTORY_EVERY`` (vault.audit_anchor),
    so the key store grows by one row per thousand events, not one per event.
    """

    __tablename__ = "audit_checkpoints"
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    key_id: Mapped[str] = mapped_column(String(36))
    signature: Mapped[bytes] = mapped_column(LargeBinary)
