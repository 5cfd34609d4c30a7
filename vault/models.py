"""SQLAlchemy models of the data database (everything but keys).

The key store has its own models in ``vault/keystore_models.py`` and lives in
another database, so that shredding a key is independent of any copy of this
one. Nothing biometric is stored here in plaintext: artifact payloads are
sealed tokens, and metadata columns hold only shapes, kinds and model ids.
The Alembic chain in ``migrations/`` creates exactly this schema (a test
compares the two).
"""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from vault import record_seal
from vault.errors import RecordTampered

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_uid() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator):
    """``DateTime(timezone=True)`` that always reads back aware, in UTC.

    PostgreSQL keeps the offset; SQLite stores text without one, so its values came back
    naive and the API printed them without ``Z`` on one backend only. Values are converted
    to UTC on the way in (SQLite would otherwise store a foreign offset's wall time; a
    naive value is taken as UTC) and marked UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        # naive values are taken as UTC, as every time idvault writes is (utcnow)
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


OWNER_KINDS = ("family", "studio")
ERASE_POLICIES = ("immediate", "retain")
IDENTITY_STATUSES = ("active", "held", "withdrawn", "erasing")
REVIEW_STATUSES = ("pending", "accepted", "rejected")
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
DEDUPE_OPS = ("add", "remove")


class VaultMeta(Base):
    """Facts about this vault, e.g. its id, which the key store must match."""

    __tablename__ = "vault_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class Owner(Base):
    __tablename__ = "owners"
    __table_args__ = (
        CheckConstraint("kind IN ('family', 'studio')", name="kind"),
        CheckConstraint("erase_policy IN ('immediate', 'retain')", name="erase_policy"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    erase_policy: Mapped[str] = mapped_column(String(16), default="immediate")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    identities: Mapped[list[Identity]] = relationship(back_populates="owner")


class Identity(Base):
    __tablename__ = "identities"
    __table_args__ = (
        UniqueConstraint("owner_id", "name", name="uq_identities_owner_name"),
        CheckConstraint("status IN ('active', 'held', 'withdrawn', 'erasing')", name="status"),
        # An owner's identities by id range: how an index rebuild reads them
        # (vault.dedupe_load). With only an index on owner_id, PostgreSQL without fresh
        # statistics (after a restore; autovacuum off) ANDed that index's 1M entries with
        # the range's for every range: 100 ms a range instead of 2 (migration 0008).
        Index("ix_identities_owner_id_id", "owner_id", "id"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uid)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(String(32))
    # indexed: opening the vault looks for erasures a crash left unfinished (``erasing``)
    status: Mapped[str] = mapped_column(String(16), default="active", index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(
        UTCDateTime(), default=utcnow, onupdate=utcnow
    )
    # The identity's record (handle, status, consent records) sealed under the key
    # store's record key (vault.record_seal); NULL only before a pre-0005 vault's first open.
    seal: Mapped[bytes | None] = mapped_column(LargeBinary)

    owner: Mapped[Owner] = relationship(back_populates="identities")
    consents: Mapped[list[Consent]] = relationship(
        back_populates="identity", cascade="all, delete-orphan", order_by="Consent.id"
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="identity", cascade="all, delete-orphan"
    )

    @property
    def handle(self) -> str:
        return f"{self.owner.name}/{self.name}"

    @property
    def consent(self) -> Consent:
        """The current consent record (the newest), for a gate: the identity's record seal
        is verified first (``vault.record_seal.check``), and an identity without a consent
        record is an integrity error, never an IndexError."""
        record_seal.check(self)
        return self.latest_consent()

    def latest_consent(self) -> Consent:
        """The newest consent record as stored, unverified: for display only (listings),
        never for a decision."""
        if not self.consents:
            raise RecordTampered(
                f"identity {self.handle} ({self.uid}) has no consent record: it was removed "
                "outside idvault", handle=self.handle, identity=self.uid)
        return self.consents[-1]


class Consent(Base):
    __tablename__ = "consents"
    __table_args__ = (
        CheckConstraint("given_by IN ('self', 'guardian')", name="given_by"),
        CheckConstraint(
            "given_by = 'self' OR guardian_name IS NOT NULL", name="guardian_named"
        ),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    uid: Mapped[str] = mapped_column(String(36), unique=True, default=new_uid)
    identity_id: Mapped[int] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), index=True
    )
    subject: Mapped[str] = mapped_column(String(200))
    given_by: Mapped[str] = mapped_column(String(16))
    guardian_name: Mapped[str | None] = mapped_column(String(200))
    purposes: Mapped[list[str]] = mapped_column(JSON)
    retain_until: Mapped[dt.date] = mapped_column(Date)
    evidence_sha256: Mapped[str] = mapped_column(String(64))
    given_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    withdrawn_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    withdrawal_reason: Mapped[str | None] = mapped_column(Text)

    identity: Mapped[Identity] = relationship(back_populates="consents")


class Artifact(Base):
    """One sealed artifact. ``id`` is chosen before sealing: it is part of the AAD."""

    __tablename__ = "artifacts"
    __table_args__ = (
        UniqueConstraint("identity_id", "kind", "model_id", name="uq_artifacts_identity_kind_model"),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uid)
    identity_id: Mapped[int] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    schema_version: Mapped[int] = mapped_column(Integer)
    model_id: Mapped[str] = mapped_column(String(128))
    size: Mapped[int] = mapped_column(Integer)  # plaintext payload bytes
    sha256: Mapped[str] = mapped_column(String(64))  # of the plaintext payload
    shapes: Mapped[dict] = mapped_column(JSON)  # tensor name -> shape; no values
    # Deferred: listings and describes never load it (one corrupt ciphertext must not
    # break a roster); decrypting reads fetch it (Vault._ciphertexts).
    ciphertext: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    identity: Mapped[Identity] = relationship(back_populates="artifacts")


class CelebBasis(Base):
    """A Celeb Basis (mean + PCA basis per token position), content-addressed.

    Built from public names and a public token table, so not secret: stored as
    a plain safetensors payload whose SHA-256 is its id.
    """

    __tablename__ = "celeb_bases"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of payload
    text_encoder: Mapped[str] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(200))  # names list digest or imported file
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class NotSamePair(Base):
    """Two identities of one owner recorded as different people (twins, siblings)."""

    __tablename__ = "not_same_pairs"
    __table_args__ = (
        UniqueConstraint("identity_a", "identity_b", name="uq_not_same_pairs_a_b"),
        CheckConstraint("identity_a < identity_b", name="ordered"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"), index=True)
    identity_a: Mapped[int] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"))
    identity_b: Mapped[int] = mapped_column(ForeignKey("identities.id", ondelete="CASCADE"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ErasureReceipt(Base):
    """One erasure: requested (the identity is ``erasing``), then completed with its signed
    receipt, written in the transaction that deletes the identity's rows (migration 0006).

    Outlives the identity so the receipt can be issued again. Holds no biometric data:
    ids, kinds, digests and the handle, as the receipt itself.
    """

    __tablename__ = "erasure_receipts"
    id: Mapped[int] = mapped_column(primary_key=True)
    identity_uid: Mapped[str] = mapped_column(String(36), unique=True)
    handle: Mapped[str] = mapped_column(String(80), index=True)
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    data_key_id: Mapped[str | None] = mapped_column(String(36))  # read when erasure began
    requested_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    receipt: Mapped[dict | None] = mapped_column(JSON)  # the signed receipt, once completed


class Review(Base):
    """An enrollment held because its face resembles an existing identity.

    The held identity exists (status ``held``, artifacts sealed as usual) but
    is not indexed nor usable until a person accepts it (they are different
    people: a not-same pair is recorded) or rejects it (it is erased).
    """

    __tablename__ = "reviews"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'accepted', 'rejected')", name="status"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"), index=True)
    identity_id: Mapped[int | None] = mapped_column(
        ForeignKey("identities.id", ondelete="SET NULL"), index=True)
    candidate_id: Mapped[int | None] = mapped_column(
        ForeignKey("identities.id", ondelete="SET NULL"))
    handle: Mapped[str] = mapped_column(String(80))  # kept after a rejection erases it
    candidate_handle: Mapped[str] = mapped_column(String(80))
    score: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    decided_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    decided_by: Mapped[str | None] = mapped_column(String(128))


class AuditEvent(Base):
    """One link of the append-only, hash-chained audit log."""

    __tablename__ = "audit_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    action: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(128))
    owner: Mapped[str | None] = mapped_column(String(32), index=True)
    subject: Mapped[str | None] = mapped_column(String(80))  # handle or other target
    details: Mapped[dict] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's newest link; locking this row serialises appends."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class ApiKey(Base):
    """An API key: only a hash of the secret is stored; the secret is shown once."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class Job(Base):
    """Long work (personalisation fits, generations) with progress and cancel."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN ('queued', 'running', 'done', 'failed', 'cancelled')", name="status"
        ),
    )
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uid)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"), index=True)
    identity_id: Mapped[int | None] = mapped_column(
        ForeignKey("identities.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Scale-out: when its id was last sent to the workers (None: not yet, or sent again).
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


# -- web accounts and job leases (migration 0003) ---------------------------------------
MEMBER_ROLES = ("admin", "editor", "viewer")


class User(Base):
    """A UI account. Only an argon2id hash of the password is stored."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    # A superuser acts as admin of every owner and may create owners.
    superuser: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set for generated (one-time) passwords: the UI asks for a new one.
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    password_changed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    memberships: Mapped[list[Membership]] = relationship(
        back_populates="user", cascade="all, delete-orphan", order_by="Membership.id"
    )


class Membership(Base):
    """A user's role (admin, editor, viewer) in one owner."""

    __tablename__ = "memberships"
    __table_args__ = (
        UniqueConstraint("user_id", "owner_id", name="uq_memberships_user_owner"),
        CheckConstraint("role IN ('admin', 'editor', 'viewer')", name="role"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)

    user: Mapped[User] = relationship(back_populates="memberships")
    owner: Mapped[Owner] = relationship()


class WebSession(Base):
    """A signed-in UI session; the cookie holds a random token, this row its SHA-256."""

    __tablename__ = "web_sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the token
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # The owner this session currently acts for (one at a time).
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("owners.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class JobLease(Base):
    """Which worker runs a job, and when it last said so (stale leases are re-queued)."""

    __tablename__ = "job_leases"
    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    worker: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    checkpoint: Mapped[dict | None] = mapped_column(JSON)


class DedupeChange(Base):
    """One change of an owner's indexed faces, in order (``vault.dedupe_log``).

    Ids only, never vectors: a process's in-memory index reads the changes past
    the last one it applied and decrypts what an ``add`` names.
    """

    __tablename__ = "dedupe_changes"
    __table_args__ = (
        CheckConstraint("op IN ('add', 'remove')", name="op"),
        Index("ix_dedupe_changes_owner_seq", "owner_id", "seq"),
    )
    # A rowid alias on SQLite (only ever grows: rows are never deleted one by one).
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                     primary_key=True, autoincrement=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"))
    identity_id: Mapped[int] = mapped_column(Integer)  # no foreign key: a removal outlives it
    op: Mapped[str] = mapped_column(String(8))
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


# -- login throttle (migration 0007) ------------------------------------------------------
class LoginAttempt(Base):
    """Recent failed sign-ins of one account from one client address (``vault.login_throttle``).

    ``account`` is the lower-cased username as typed (unknown names too), or
    ``*ADDRESS`` for the address's failures across every account (upper case: no typed
    name is counted as it).
    """

    __tablename__ = "login_attempts"
    account: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # since window_start
    lockouts: Mapped[int] = mapped_column(Integer, default=0)  # each lock doubles the next
    window_start: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    locked_until: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # Forgotten (deleted) after this: the index keeps the pruning a range delete.
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), index=True)
