"""Crash windows of erasure, rotation, withdrawal and enrollment (issue 17, item 7).

A child process runs the real CLI command and is SIGKILLed at a named step: the
child wraps one vault function so that reaching that point kills the process (no
hook in the product code). Then the command is run again and the vault must hold
exactly one audit event for the operation, a valid stored receipt for an erasure,
no orphan data key, and never list an erased identity as active.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.helpers import consent, face_payload
from vault import staged_photos
from vault.errors import Conflict, IntegrityError, NotFound
from vault.keystore_models import SigningKey
from vault.models import AuditEvent, utcnow
from vault.vault import Vault
from web.cli.main import main

ROOT = Path(__file__).resolve().parents[2]

# The child: argv = step, then the CLI arguments. It wraps the function named by the
# step so that the process SIGKILLs itself there, then runs the command.
CHILD = r"""
import os, signal, sys
from vault import keyprovider
from vault.keystore import KeyStore
from vault.vault import Vault
from web.cli.main import main

step, argv = sys.argv[1], sys.argv[2:]

def die(*_a, **_k):
    os.kill(os.getpid(), signal.SIGKILL)

def before(cls, name):
    setattr(cls, name, die)

def after(cls, name):
    orig = getattr(cls, name)
    def wrapped(*a, **k):
        orig(*a, **k)
        die()
    setattr(cls, name, wrapped)

def mid_rewrap():
    # the second key re-wrapped by the rotation (batch size 1: one batch committed)
    count_old, wrap, state = KeyStore._count_old, KeyStore._wrap, {"on": False, "n": 0}
    def counting(self, *a, **k):
        state["on"] = True
        return count_old(self, *a, **k)
    def wrapping(self, *a, **k):
        if state["on"]:
            state["n"] += 1
            if state["n"] == 2:
                die()
        return wrap(self, *a, **k)
    KeyStore._count_old, KeyStore._wrap = counting, wrapping

STEPS = {
    # identity delete
    "marked": lambda: before(KeyStore, "shred"),          # 'erasing' committed, key kept
    "shredded": lambda: after(KeyStore, "shred"),         # key gone, rows kept
    "signed": lambda: after(Vault, "sign_receipt"),       # rows deleted, not committed
    "committed": lambda: before(Vault, "_checkpoint"),    # committed, nothing printed
    # keys rotate
    "created": lambda: before(KeyStore, "_count_old"),    # new version active, none re-wrapped
    "rewrap": mid_rewrap,
    "provider_retired": lambda: after(keyprovider.FileKeyProvider, "retire"),
    "retired": lambda: after(KeyStore, "rotate"),         # key store done, not audited
    # consent withdraw
    "withdrawn": lambda: before(Vault, "delete_identity"),
}
STEPS[step]()
sys.exit(main(argv))
"""

DELETE_STEPS = ["marked", "shredded", "signed", "committed"]
ROTATE_STEPS = ["created", "rewrap", "provider_retired", "retired"]


def _vault_args(settings) -> list[str]:
    args = ["--data-dir", str(settings.data_dir)]
    if settings.database_url:
        args += ["--database-url", settings.database_url, "--keystore-url",
                 settings.keystore_url]
    return args


def _killed_at(step: str, settings, *argv: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CHILD, step, *argv, *_vault_args(settings)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])


def _cli(capsys, settings, *argv: str, code: int = 0) -> str:
    rc = main([*argv, *_vault_args(settings)])
    out, err = capsys.readouterr()
    assert rc == code, f"exit {rc} (wanted {code}): {err}"
    return out


def _events(vault: Vault, action: str) -> list[AuditEvent]:
    with vault.session(read_only=True) as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action)
                              .order_by(AuditEvent.seq)))


def _orphan_keys(vault: Vault) -> set[str]:
    with vault.session(read_only=True) as s:
        from vault.models import Identity

        uids = set(s.scalars(select(Identity.uid)))
    return vault.keys.dek_uids() - uids - staged_photos.staged_uids(vault)


@pytest.fixture
def people(family):
    """ana (to erase), ben (kept), and photos staged for an identity not created yet
    (its data key has no identity row and is not an orphan)."""
    for i, name in enumerate(("ana", "ben")):
        family.create_identity(f"smiths/{name}", consent())
        family.put_artifact(f"smiths/{name}", "face", face_payload(seed=i))
    pending = "0b5e4a52-6d0f-4c1e-9a53-3d1f0c1e2a77"
    staged_photos.stage(family, "smiths/cleo", [b"photo bytes"], names=["a.jpg"],
                        actor="test", uid=pending)
    return family


@pytest.mark.parametrize("step", DELETE_STEPS)
def test_delete_killed_at_each_step_then_rerun(people, settings, capsys, step):
    ana = people.describe("smiths/ana")
    key_id = people.keys.key_id_of(ana["id"])
    people.dispose()
    _killed_at(step, settings, "identity", "delete", "smiths/ana", "--yes")

    with Vault.open(settings, check_keys=False) as v:  # no recovery without the keys
        listed = {d["handle"]: d["status"] for d in v.list_identities()}
        if step == "committed":
            assert "smiths/ana" not in listed
            assert v.erasure_receipt("smiths/ana")["receipt"]["identity"] == ana["id"]
        else:
            assert listed["smiths/ana"] == "erasing"  # never 'active' again
            with pytest.raises(Conflict, match="has not finished"):
                v.erasure_receipt("smiths/ana")
            with pytest.raises(Conflict, match="being erased"):
                v.get_artifact("smiths/ana", "face")

    listing = _cli(capsys, settings, "identity", "list").splitlines()
    ana_line = [line.split() for line in listing if line.startswith("smiths/ana ")]
    assert ana_line == ([] if step == "committed" else [["smiths/ana", "erasing", "face"]])

    signed = json.loads(_cli(capsys, settings, "identity", "delete", "smiths/ana", "--yes"))
    again = json.loads(_cli(capsys, settings, "identity", "receipt", ana["id"]))
    with Vault.open(settings) as v:
        receipt = v.verify_receipt(signed)
        assert again == signed
        assert receipt["identity"] == ana["id"] and receipt["reason"] == "requested"
        assert receipt["data_key"] == {"key_id": key_id, "shredded": True}
        assert [a["id"] for a in receipt["artifacts"]] == [a["id"] for a in ana["artifacts"]]
        deletes = [e for e in _events(v, "identity.delete") if e.subject == "smiths/ana"]
        assert len(deletes) == 1 and deletes[0].seq == receipt["audit_seq"]
        assert [d["handle"] for d in v.list_identities()] == ["smiths/ben"]
        assert _orphan_keys(v) == set()
        assert v.get_artifact("smiths/ben", "face").artifact.shapes["normed"] == [2, 512]
        assert v.verify_audit().ok


def test_a_crashed_erasure_finishes_when_the_vault_next_opens(people, settings):
    people.dispose()
    _killed_at("shredded", settings, "identity", "delete", "smiths/ana", "--yes")
    with Vault.open(settings) as v:  # with its keys: recovery runs
        assert [d["handle"] for d in v.list_identities()] == ["smiths/ben"]
        signed = v.erasure_receipt("smiths/ana")
        assert v.verify_receipt(signed)["data_key"]["shredded"] is True
        assert len(_events(v, "identity.delete")) == 1
    with Vault.open(settings) as v:  # nothing left to finish: no second event
        assert len(_events(v, "identity.delete")) == 1


@pytest.mark.parametrize("step", ROTATE_STEPS)
def test_rotate_killed_at_each_step_then_rerun(people, settings, capsys, step):
    people.dispose()
    _killed_at(step, settings, "keys", "rotate", "--batch-size", "1")
    out = _cli(capsys, settings, "keys", "rotate")
    assert "KEK version 2 active" in out
    with Vault.open(settings) as v:
        assert v.keys.kek_versions() == [(1, "retired"), (2, "active")]
        events = _events(v, "keys.rotate")
        assert len(events) == 1 and events[0].details["to"] == 2
        assert events[0].details.get("recorded_late", False) == (step == "retired")
        assert json.loads(settings.resolved_key_file.read_text())["keys"].keys() == {"2"}
        v.keys._deks.clear()
        for name in ("ana", "ben"):
            assert v.get_artifact(f"smiths/{name}", "face").artifact.shapes["normed"] == [2, 512]
        assert v.verify_audit().ok
    # The late record does not stand in for the next rotation: that one rotates.
    assert "rotated: KEK version 3 active" in _cli(capsys, settings, "keys", "rotate")
    with Vault.open(settings) as v:
        assert [e.details["to"] for e in _events(v, "keys.rotate")] == [2, 3]


@pytest.mark.parametrize("corrupt", ["wrapped_private", "public_key"])
def test_a_corrupt_signing_key_refuses_erasure_and_erases_nothing(people, settings, capsys,
                                                                   corrupt):
    uid = people.describe("smiths/ana")["id"]
    with people.keystore_engine.begin() as conn:
        value = conn.execute(select(getattr(SigningKey, corrupt))).scalar()
        flipped = value[:-1] + bytes([value[-1] ^ 1])
        conn.execute(update(SigningKey).values({corrupt: flipped}))
    with pytest.raises(IntegrityError, match="signing key"):
        people.delete_identity("smiths/ana")
    people.dispose()
    out = _cli(capsys, settings, "identity", "delete", "smiths/ana", "--yes", code=3)
    assert out == ""
    with Vault.open(settings, check_keys=False) as v:
        assert v.identity_status("smiths/ana") == "active"
        assert uid in v.keys.dek_uids()
        assert _events(v, "identity.delete") == []
        with pytest.raises(NotFound):
            v.erasure_receipt("smiths/ana")


def test_an_identity_being_erased_is_refused_for_every_use_and_receipts_reissue(people):
    from vault.handles import Handle

    erasure = people._begin_erasure(Handle.parse("smiths/ana"), actor="test", reason="asked")
    for use in (lambda: people.get_artifact("smiths/ana", "face"),
                lambda: people.put_artifact("smiths/ana", "face", face_payload(seed=5)),
                lambda: people.withdraw_consent("smiths/ana")):
        with pytest.raises(Conflict, match="smiths/ana is being erased"):
            use()
    assert people.describe("smiths/ana")["status"] == "erasing"
    signed = people.delete_identity("smiths/ana", reason="ignored: the first run's counts")
    assert signed["receipt"]["reason"] == "asked"
    assert people.verify_receipt(signed)["data_key"]["key_id"] == erasure.key_id
    # Re-running after completion, or asking by handle or uid, gives the stored receipt.
    assert people.delete_identity("smiths/ana") == signed
    assert people.erasure_receipt("smiths/ana") == signed
    assert people.erasure_receipt(erasure.uid) == signed
    assert len(_events(people, "identity.delete")) == 1
    with pytest.raises(NotFound, match="no identity smiths/zed"):
        people.erasure_receipt("smiths/zed")


@pytest.mark.parametrize("resume", ["rerun", "open"])
def test_withdrawal_killed_before_its_erasure_is_erased_on_rerun_or_open(people, settings,
                                                                        resume):
    people.dispose()
    _killed_at("withdrawn", settings, "consent", "withdraw", "smiths/ana", "--reason", "moved")
    if resume == "rerun":  # opened without its keys, nothing was recovered: withdraw again
        with Vault.open(settings, check_keys=False) as v:
            assert v.identity_status("smiths/ana") == "withdrawn"
            signed = v.withdraw_consent("smiths/ana")["receipt"]
    with Vault.open(settings) as v:
        if resume == "open":
            signed = v.erasure_receipt("smiths/ana")
        assert v.verify_receipt(signed)["reason"] == "consent withdrawn"
        assert v.identity_status("smiths/ana") is None
        assert len(_events(v, "consent.withdraw")) == 1
        assert len(_events(v, "identity.delete")) == 1


def test_withdrawal_rerun_with_retain_policy_still_refused(family):
    from vault.errors import AlreadyExists

    family.create_identity("northlight/kim", consent())
    family.withdraw_consent("northlight/kim")
    with pytest.raises(AlreadyExists, match="already withdrawn"):
        family.withdraw_consent("northlight/kim")
    assert family.identity_status("northlight/kim") == "withdrawn"


def test_enrollment_killed_after_its_key_leaves_an_orphan_the_sweep_shreds(people, settings,
                                                                            capsys):
    people.dispose()
    child = r"""
import os, signal, sys
from tests.helpers import consent, face_payload
from vault.config import Settings
from vault.keystore import KeyStore
from vault.vault import Vault
made = KeyStore.get_or_create_dek
def die_after(self, uid):
    made(self, uid)
    os.kill(os.getpid(), signal.SIGKILL)
KeyStore.get_or_create_dek = die_after
s = Settings(data_dir=sys.argv[1], database_url=sys.argv[2] or None,
             keystore_url=sys.argv[3] or None)
with Vault.open(s) as v:
    v.store_enrollment("smiths/dan", face_payload(seed=9), consent_request=consent())
"""
    proc = subprocess.run([sys.executable, "-c", child, str(settings.data_dir),
                           settings.database_url or "", settings.keystore_url or ""],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    with Vault.open(settings) as v:
        orphans = _orphan_keys(v)
        assert len(orphans) == 1 and v.identity_status("smiths/dan") is None
        # an enrollment in flight makes its key first: a young one is left alone
        assert v.sweep_orphan_keys() == {"data_keys": 4, "orphans_shredded": 0,
                                         "kept_staged": 1, "kept_recent": 1}
        later = utcnow() + dt.timedelta(hours=2)
        # the periodic sweep judges only the keys made in its window (all four, here)
        assert v.sweep_orphan_keys(now=later, made_since=later)["data_keys"] == 0
        assert v.sweep_recent_orphan_keys()["data_keys"] == 4
        assert v.sweep_orphan_keys(now=later) == {"data_keys": 4, "orphans_shredded": 1,
                                                  "kept_staged": 1, "kept_recent": 0}
        assert _orphan_keys(v) == set() and len(v.keys.dek_uids()) == 3
        sweeps = _events(v, "keys.sweep")
        assert len(sweeps) == 1 and sweeps[0].details["identities"] == sorted(orphans)
        # the staged photos' key survived: they still open
        assert v.sweep_orphan_keys(now=later)["orphans_shredded"] == 0
    out = _cli(capsys, settings, "keys", "sweep", "--grace-hours", "0")
    assert json.loads(out) == {"data_keys": 3, "orphans_shredded": 0, "kept_staged": 1,
                               "kept_recent": 0}
    assert os.listdir(settings.data_dir / "staged")  # the stage is untouched
