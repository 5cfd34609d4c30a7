"""Key providers, wrong and missing keys, and rotation (also killed half-way)."""

import base64
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
from sqlalchemy import select, update

from tests.helpers import consent, face_payload
from vault.config import Settings
from vault.crypto import new_key
from vault.errors import IntegrityError, KeyUnavailable
from vault.keystore_models import DataKey
from vault.vault import Vault


def _populate(vault, n):
    vault.add_owner("smiths", "family", actor="test")
    for i in range(n):
        vault.create_identity(f"smiths/p{i}", consent())
        vault.put_artifact(f"smiths/p{i}", "face", face_payload(seed=i))


def _all_decrypt(vault, n):
    for i in range(n):
        got = vault.get_artifact(f"smiths/p{i}", "face").artifact.tensors["normed"]
        ref = np.frombuffer(face_payload(seed=i), dtype=np.uint8)  # same bytes as stored
        assert got.shape == (2, 512) and len(ref) > 0


def test_key_file_is_0600_and_versioned(vault, settings):
    path = settings.resolved_key_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert list(doc["keys"]) == ["1"]


def test_missing_key_file(vault, settings):
    vault.dispose()
    settings.resolved_key_file.rename(settings.data_dir / "elsewhere.key")
    with pytest.raises(KeyUnavailable, match="no key file at .*run `idvault init`"):
        Vault.open(settings)


def test_wrong_key_file_is_named_and_nothing_changes(vault, settings):
    _populate(vault, 1)
    vault.dispose()
    real = settings.resolved_key_file.read_bytes()
    doc = json.loads(real)
    doc["keys"]["1"] = base64.b64encode(new_key()).decode()
    settings.resolved_key_file.write_text(json.dumps(doc))
    with pytest.raises(KeyUnavailable, match="does not match this vault: KEK version 1"):
        Vault.open(settings)
    settings.resolved_key_file.write_bytes(real)  # the right key still opens everything
    with Vault.open(settings) as v:
        _all_decrypt(v, 1)


def test_key_file_readable_by_others_refused(vault, settings):
    vault.dispose()
    os.chmod(settings.resolved_key_file, 0o644)
    with pytest.raises(KeyUnavailable, match="chmod 600"):
        Vault.open(settings)


@pytest.mark.parametrize("garbage", [b"{]", b"\x89PNG\r\n\x1a\n\xff\xfe", b"[1, 2]",
                                     b'{"format": "idvault-kek-file/1", "keys": {"1": "**"}}',
                                     b'{"keys": {}}'])
def test_malformed_key_file(vault, settings, garbage):
    vault.dispose()
    settings.resolved_key_file.write_bytes(garbage)
    with pytest.raises(KeyUnavailable) as caught:
        Vault.open(settings)
    message = str(caught.value)
    assert f"key file {settings.resolved_key_file} is not an idvault key file" in message
    assert "corrupt" in message and "backup" in message
    for internals in ("Expecting", "line 1", "codec", "decode", "Incorrect padding", "char"):
        assert internals not in message  # the parser's words, not ours


def test_key_file_of_another_format_names_it(vault, settings):
    vault.dispose()
    settings.resolved_key_file.write_text('{"format": "other-v9", "keys": {}}')
    with pytest.raises(KeyUnavailable, match="is not an idvault key file .*'other-v9'"):
        Vault.open(settings)


def test_init_refuses_existing_vault(vault, settings):
    from vault.errors import AlreadyExists

    with pytest.raises((AlreadyExists, KeyUnavailable), match="already exists"):
        Vault.init(settings)


def test_env_provider_and_its_rotation(tmp_path, monkeypatch):
    old, new = new_key(), new_key()
    monkeypatch.setenv("IDVAULT_KEK", base64.b64encode(old).decode())
    settings = Settings(data_dir=tmp_path, key_provider="env")
    with Vault.init(settings) as v:
        _populate(v, 2)
        with pytest.raises(KeyUnavailable, match="add the new key as version 2"):
            v.rotate_keys()
    monkeypatch.setenv("IDVAULT_KEK", f"2:{base64.b64encode(new).decode()},"
                                      f"1:{base64.b64encode(old).decode()}")
    with Vault.open(settings) as v:
        report = v.rotate_keys()
        assert report.to_version == 2 and "remove them from IDVAULT_KEK" in report.note
    monkeypatch.setenv("IDVAULT_KEK", f"2:{base64.b64encode(new).decode()}")
    with Vault.open(settings) as v:
        _all_decrypt(v, 2)
    monkeypatch.setenv("IDVAULT_KEK", "not base64!")
    with pytest.raises(KeyUnavailable, match="malformed"):
        Vault.open(settings)


def test_passphrase_provider_and_its_rotation(tmp_path, monkeypatch):
    monkeypatch.setenv("IDVAULT_PASSPHRASE", "correct horse battery staple")
    settings = Settings(data_dir=tmp_path, key_provider="passphrase")
    with Vault.init(settings) as v:
        _populate(v, 1)
    monkeypatch.setenv("IDVAULT_PASSPHRASE", "wrong horse battery staple")
    with pytest.raises(KeyUnavailable, match="failed its check value"):
        Vault.open(settings)
    monkeypatch.setenv("IDVAULT_PASSPHRASE", "correct horse battery staple")
    monkeypatch.setenv("IDVAULT_NEW_PASSPHRASE", "a brand new long passphrase")
    with Vault.open(settings) as v:
        v.rotate_keys()
    monkeypatch.delenv("IDVAULT_NEW_PASSPHRASE")
    monkeypatch.setenv("IDVAULT_PASSPHRASE", "a brand new long passphrase")
    with Vault.open(settings) as v:
        _all_decrypt(v, 1)


def test_rotation_rewraps_keys_not_artifacts(vault, settings):
    _populate(vault, 3)
    with vault.session() as s:
        from sqlalchemy import select

        from vault.models import Artifact

        before = sorted(s.scalars(select(Artifact.ciphertext)))
    report = vault.rotate_keys(batch_size=2)
    assert (report.from_versions, report.to_version, report.rewrapped) == ([1], 2, 4)
    with vault.session() as s:
        assert sorted(s.scalars(select(Artifact.ciphertext))) == before
    doc = json.loads(settings.resolved_key_file.read_text())
    assert list(doc["keys"]) == ["2"]  # version 1 is gone from the key file
    vault.keys._keks.clear()
    vault.keys._deks.clear()
    _all_decrypt(vault, 3)
    assert vault.keys.kek_versions() == [(1, "retired"), (2, "active")]


ROTATE = """
import sys
from vault.config import Settings
from vault.vault import Vault
s = Settings(data_dir=sys.argv[1], database_url=sys.argv[2] or None,
             keystore_url=sys.argv[3] or None)
with Vault.open(s) as v:
    print("ready", flush=True)
    v.rotate_keys(batch_size=1)
print("done", flush=True)
"""


@pytest.mark.slow
def test_rotation_killed_at_random_points_then_rerun(vault, settings):
    n = 60
    _populate(vault, n)
    vault.dispose()
    rng = random.Random(1234)
    args = [sys.executable, "-c", ROTATE, str(settings.data_dir),
            settings.database_url or "", settings.keystore_url or ""]
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += proc.returncode == -signal.SIGKILL
        with Vault.open(settings, check_keys=False) as v:  # readable at every moment
            v.keys._keks.clear()
            _all_decrypt(v, 3)
    assert kills >= 3  # most runs really were killed mid-way
    final = subprocess.run(args, capture_output=True, text=True)
    assert final.returncode == 0 and "done" in final.stdout, final.stderr
    with Vault.open(settings) as v:
        versions = v.keys.kek_versions()
        active = [ver for ver, st in versions if st == "active"]
        assert len(active) == 1 and all(st == "retired" for ver, st in versions
                                        if ver != active[0])
        doc = json.loads(settings.resolved_key_file.read_text())
        assert list(doc["keys"]) == [str(active[0])]  # old versions no longer needed
        _all_decrypt(v, n)
        assert v.verify_audit().ok



def test_all_deks_unwraps_with_the_checks_of_dek_and_caches_nothing(vault):
    uids = [f"uid-{i}" for i in range(4)]
    made = {u: vault.keys.get_or_create_dek(u) for u in uids}
    vault.keys._deks.clear()
    vault.keys.shred(uids[0])
    with vault.keystore_engine.begin() as conn:  # a key id in another spelling, same key
        conn.execute(update(DataKey).where(DataKey.identity_uid == uids[1])
                     .values(key_id=str(made[uids[1]][0]).upper()))
    got = vault.keys.all_deks(uids + ["never-had-one"])
    assert got == {u: made[u][1] for u in uids[1:]} and not vault.keys._deks
    with vault.keystore_engine.begin() as conn:  # a wrapped key moved to another identity
        wrapped = conn.execute(select(DataKey.wrapped)
                               .where(DataKey.identity_uid == uids[2])).scalar()
        conn.execute(update(DataKey).where(DataKey.identity_uid == uids[3])
                     .values(wrapped=wrapped))
    with pytest.raises(IntegrityError, match=f"identity {uids[3]} failed authentication"):
        vault.keys.all_deks(uids)
