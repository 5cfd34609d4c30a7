"""The vault's error hierarchy.

Every failure a user can cause or meet is one of these. Each class carries a
stable machine-readable ``code``; the web layer maps classes to HTTP statuses
in one place and the CLI prints ``str(error)`` without a traceback. Messages
name what is wrong and, where there is one, what to do about it. They never
contain key material or decrypted data.
"""

from __future__ import annotations


class VaultError(Exception):
    """Base of every error the vault raises on purpose."""

    code = "vault_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def __str__(self) -> str:
        return self.message


# -- input ------------------------------------------------------------------
class InvalidInput(VaultError):
    """A request, file or value is malformed."""

    code = "invalid_input"


class InvalidHandle(InvalidInput):
    """A handle or name breaks one or more naming rules (all are listed)."""

    code = "invalid_handle"

    def __init__(self, value: str, failed_rules: list[str]) -> None:
        rules = "; ".join(failed_rules)
        shown = value if len(value) <= 80 else value[:77] + "..."
        super().__init__(f"invalid name {shown!r}: {rules}", value=shown, rules=failed_rules)
        self.failed_rules = failed_rules


class ArtifactRejected(InvalidInput):
    """An artifact payload does not match its kind's declared schema."""

    code = "artifact_rejected"


class InvalidConsent(InvalidInput):
    """A consent record is incomplete or inconsistent."""

    code = "invalid_consent"


# -- lookup and state ---------------------------------------------------------
class NotFound(VaultError):
    """No such owner, identity, artifact or key, as far as the caller may know."""

    code = "not_found"


class AlreadyExists(VaultError):
    """The name or handle is already taken."""

    code = "already_exists"


class Conflict(VaultError):
    """The request is valid but the current state does not allow it."""

    code = "conflict"


class DuplicateIdentity(Conflict):
    """An enrollment's face matches an existing identity of the owner."""

    code = "duplicate_identity"

    def __init__(self, message: str, *, handle: str, score: float, decision: str) -> None:
        super().__init__(message, handle=handle, score=score, decision=decision)
        self.handle, self.score, self.decision = handle, score, decision


# -- consent ----------------------------------------------------------------
class ConsentError(VaultError):
    """Consent does not allow this use."""

    code = "consent_denied"


class ConsentWithdrawn(ConsentError):
    code = "consent_withdrawn"


class ConsentExpired(ConsentError):
    code = "consent_expired"


class PurposeNotGranted(ConsentError):
    code = "purpose_not_granted"


# -- keys and integrity -------------------------------------------------------
class KeyUnavailable(VaultError):
    """The key-encryption key cannot be obtained (missing, wrong or retired)."""

    code = "key_unavailable"


class IntegrityError(VaultError):
    """Stored data failed an integrity check: tampered, corrupt or misplaced."""

    code = "integrity_error"


class DecryptionError(IntegrityError):
    """A ciphertext did not authenticate under its key and context.

    Deliberately one error for every cause (wrong key, altered bytes, a blob
    moved to another row, truncation), as AES-GCM cannot tell them apart and
    saying more would help an attacker more than a user.
    """

    code = "decryption_failed"


class RecordTampered(IntegrityError):
    """An identity's rows (handle, status, consent records) differ from its record seal
    (``vault.record_seal``): they were changed outside idvault. The message names the
    identity and what changed; the HTTP layer shows it (409), unlike other 500s."""

    code = "record_tampered"


class AuditChainBroken(IntegrityError):
    code = "audit_chain_broken"


class SignatureInvalid(IntegrityError):
    code = "signature_invalid"


# -- photos and models (raised by encoders/, defined here so the web layer
#    maps every error in one place) --------------------------------------------
class PhotoRejected(InvalidInput):
    """A photo cannot be used: unreadable, too large, or without one usable face."""

    code = "photo_rejected"


class ModelUnavailable(VaultError):
    """A model file the operation needs is absent or malformed."""

    code = "model_unavailable"
