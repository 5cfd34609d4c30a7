"""Consent: the record every identity is created with, and the gate on use.

A consent record says who the person is (``subject``), who consented
(``self``, or a ``guardian`` by name), for which purposes, until when
(``retain_until``) and the SHA-256 of the evidence (a signed form, a
recording). Purposes come from a documented set (docs/consent.md):

``enroll``       store the identity and its face artifacts (required)
``personalize``  fit optimisation-based artifacts (Celeb Basis, LiDB)
``generate``     use the identity in generated images
``commercial``   use those images commercially
``share``        export decrypted artifacts out of the vault

Every decrypting read names its purpose; :func:`check_use` refuses it when
consent was withdrawn, has expired or does not grant that purpose.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from vault.errors import (
    ConsentExpired,
    ConsentWithdrawn,
    InvalidConsent,
    PurposeNotGranted,
)
from vault.models import Consent

PURPOSES = {
    "enroll": "store the identity and its face artifacts (required)",
    "personalize": "fit optimisation-based artifacts (Celeb Basis, LiDB) from the photos",
    "generate": "use the identity in generated images",
    "commercial": "use generated images commercially",
    "share": "export decrypted artifacts out of the vault",
}
GIVEN_BY = ("self", "guardian")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
FIELDS = ("subject", "given_by", "guardian_name", "purposes", "retain_until",
          "evidence_sha256", "evidence_file")


@dataclass(frozen=True)
class ConsentRequest:
    """A validated consent record, before it is stored."""

    subject: str
    given_by: str
    purposes: tuple[str, ...]
    retain_until: dt.date
    evidence_sha256: str
    guardian_name: str | None = None

    @classmethod
    def from_dict(cls, doc: dict, *, base_dir: Path | None = None,
                  today: dt.date | None = None) -> ConsentRequest:
        if not isinstance(doc, dict):
            raise InvalidConsent("a consent record is a JSON object")
        problems: list[str] = []
        unknown = sorted(set(doc) - set(FIELDS))
        if unknown:
            problems.append(f"unknown field(s) {', '.join(unknown)} (fields: {', '.join(FIELDS)})")
        subject = doc.get("subject")
        if not isinstance(subject, str) or not subject.strip() or len(subject) > 200:
            problems.append("'subject' must be the person's name (1-200 characters)")
        given_by = doc.get("given_by")
        guardian = doc.get("guardian_name")
        if given_by not in GIVEN_BY:
            problems.append("'given_by' must be 'self' or 'guardian'")
        elif given_by == "guardian" and (not isinstance(guardian, str) or not guardian.strip()):
            problems.append("'guardian_name' is required when given_by is 'guardian'")
        elif given_by == "self" and guardian:
            problems.append("'guardian_name' is only for given_by 'guardian'")
        purposes = doc.get("purposes")
        if not isinstance(purposes, list) or not purposes:
            problems.append(f"'purposes' must be a non-empty list from: {', '.join(PURPOSES)}")
            purposes = []
        else:
            bad = [p for p in purposes if not isinstance(p, str) or p not in PURPOSES]
            if bad:
                problems.append(f"unknown purpose(s) {bad}; purposes are: {', '.join(PURPOSES)}")
            if "enroll" not in purposes:
                problems.append("'purposes' must include 'enroll' to create an identity")
            if "commercial" in purposes and "generate" not in purposes:
                problems.append("'commercial' needs 'generate' too")
        retain = doc.get("retain_until")
        retain_until = None
        try:
            retain_until = dt.date.fromisoformat(retain) if isinstance(retain, str) else None
        except ValueError:
            pass
        today = today or dt.date.today()
        if retain_until is None:
            problems.append("'retain_until' must be a date YYYY-MM-DD")
        elif retain_until <= today:
            problems.append(f"'retain_until' ({retain_until}) must be in the future")
        digest = doc.get("evidence_sha256")
        evidence_file = doc.get("evidence_file")
        if evidence_file is not None:
            path = Path(evidence_file)
            if base_dir is not None and not path.is_absolute():
                path = base_dir / path
            try:
                file_digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                problems.append(f"'evidence_file' {evidence_file!r} cannot be read: "
                                f"{exc.strerror}")
            else:
                if digest and digest != file_digest:
                    problems.append("'evidence_sha256' does not match 'evidence_file'")
                digest = file_digest
        if not isinstance(digest, str) or not _SHA256.match(digest):
            problems.append("evidence is required: 'evidence_sha256' (64 lowercase hex) or "
                            "'evidence_file' (a path; its SHA-256 is recorded)")
        if problems:
            raise InvalidConsent("consent record rejected: " + "; ".join(problems),
                                 problems=problems)
        return cls(subject.strip(), given_by, tuple(dict.fromkeys(purposes)), retain_until,
                   digest, guardian.strip() if given_by == "guardian" else None)

    def to_dict(self) -> dict:
        """The record as :meth:`from_dict` reads it (a job carries it to a worker)."""
        doc = {"subject": self.subject, "given_by": self.given_by,
               "purposes": list(self.purposes), "retain_until": self.retain_until.isoformat(),
               "evidence_sha256": self.evidence_sha256}
        if self.guardian_name is not None:
            doc["guardian_name"] = self.guardian_name
        return doc

    @classmethod
    def from_file(cls, path: Path) -> ConsentRequest:
        try:
            doc = json.loads(Path(path).read_text())
        except OSError as exc:
            raise InvalidConsent(f"cannot read consent file {path}: {exc.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidConsent(f"consent file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(doc, base_dir=Path(path).parent)

    def to_model(self) -> Consent:
        return Consent(subject=self.subject, given_by=self.given_by,
                       guardian_name=self.guardian_name, purposes=list(self.purposes),
                       retain_until=self.retain_until, evidence_sha256=self.evidence_sha256)


def check_use(consent: Consent, purpose: str, *, today: dt.date | None = None) -> None:
    """Raise unless ``consent`` allows a use for ``purpose`` now."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}")
    if consent.withdrawn_at is not None:
        raise ConsentWithdrawn(
            f"consent for this identity was withdrawn on {consent.withdrawn_at:%Y-%m-%d}; "
            "its artifacts can no longer be used"
        )
    today = today or dt.date.today()
    if consent.retain_until < today:
        raise ConsentExpired(
            f"consent for this identity expired on {consent.retain_until}; its artifacts can "
            "no longer be used (`idvault retention sweep` erases it)"
        )
    if purpose not in consent.purposes:
        raise PurposeNotGranted(
            f"consent does not grant {purpose!r} (granted: {', '.join(consent.purposes)})"
        )


def describe(consent: Consent) -> dict:
    return {
        "id": consent.uid,
        "subject": consent.subject,
        "given_by": consent.given_by,
        "guardian_name": consent.guardian_name,
        "purposes": list(consent.purposes),
        "retain_until": consent.retain_until.isoformat(),
        "evidence_sha256": consent.evidence_sha256,
        "given_at": consent.given_at.isoformat(),
        "withdrawn_at": consent.withdrawn_at.isoformat() if consent.withdrawn_at else None,
        "withdrawal_reason": consent.withdrawal_reason,
        "status": "withdrawn" if consent.withdrawn_at else (
            "expired" if consent.retain_until < dt.date.today() else "active"),
    }
