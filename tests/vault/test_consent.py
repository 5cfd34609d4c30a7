"""Consent records: validation names every problem; the gate refuses misuse."""

import datetime as dt
import hashlib

import pytest

from tests.helpers import consent, consent_doc
from vault.consent import ConsentRequest, check_use
from vault.errors import ConsentExpired, ConsentWithdrawn, InvalidConsent, PurposeNotGranted


def test_valid_guardian_record():
    r = consent()
    assert r.given_by == "guardian" and r.guardian_name == "Maria Smith"
    assert r.purposes == ("enroll", "generate")


@pytest.mark.parametrize("overrides, fragment", [
    ({"given_by": "parent"}, "'given_by' must be 'self' or 'guardian'"),
    ({"guardian_name": None}, "'guardian_name' is required"),
    ({"given_by": "self"}, "only for given_by 'guardian'"),
    ({"purposes": ["generate"]}, "must include 'enroll'"),
    ({"purposes": ["enroll", "resell"]}, "unknown purpose"),
    ({"purposes": ["enroll", "commercial"]}, "'commercial' needs 'generate'"),
    ({"retain_until": "2001-01-01"}, "must be in the future"),
    ({"retain_until": "next year"}, "YYYY-MM-DD"),
    ({"evidence_sha256": "abc"}, "evidence is required"),
    ({"subject": ""}, "'subject'"),
    ({"colour": "blue"}, "unknown field"),
])
def test_problems_named(overrides, fragment):
    with pytest.raises(InvalidConsent) as exc:
        ConsentRequest.from_dict(consent_doc(**overrides))
    assert fragment in str(exc.value)


def test_evidence_file_digest(tmp_path):
    (tmp_path / "form.pdf").write_bytes(b"%PDF signed")
    doc = consent_doc(evidence_sha256=None, evidence_file="form.pdf")
    r = ConsentRequest.from_dict(doc, base_dir=tmp_path)
    assert r.evidence_sha256 == hashlib.sha256(b"%PDF signed").hexdigest()
    with pytest.raises(InvalidConsent, match="does not match"):
        ConsentRequest.from_dict({**doc, "evidence_sha256": "0" * 64}, base_dir=tmp_path)
    with pytest.raises(InvalidConsent, match="cannot be read"):
        ConsentRequest.from_dict({**doc, "evidence_file": "missing.pdf"}, base_dir=tmp_path)


def test_from_file_errors(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidConsent, match="not valid JSON"):
        ConsentRequest.from_file(bad)
    with pytest.raises(InvalidConsent, match="cannot read"):
        ConsentRequest.from_file(tmp_path / "absent.json")


def test_check_use():
    record = consent().to_model()
    check_use(record, "generate")
    with pytest.raises(PurposeNotGranted, match="'commercial'"):
        check_use(record, "commercial")
    with pytest.raises(ConsentExpired):
        check_use(record, "generate", today=record.retain_until + dt.timedelta(days=1))
    record.withdrawn_at = dt.datetime.now(dt.UTC)
    with pytest.raises(ConsentWithdrawn):
        check_use(record, "generate")
