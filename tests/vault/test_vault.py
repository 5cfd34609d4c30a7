"""The vault's operations on SQLite and PostgreSQL."""

import threading

import numpy as np
import pytest
from sqlalchemy import select, update

from tests.helpers import basis_payload, consent, face_payload
from vault.errors import (
    AlreadyExists,
    ArtifactRejected,
    ConsentWithdrawn,
    DecryptionError,
    IntegrityError,
    InvalidHandle,
    NotFound,
    PurposeNotGranted,
)
from vault.models import Artifact, Identity
from vault.vault import Vault


def test_identity_needs_owner_and_valid_handle(family):
    with pytest.raises(NotFound, match="no owner 'jones'"):
        family.create_identity("jones/ana", consent())
    with pytest.raises(InvalidHandle, match="lowercase"):
        family.create_identity("smiths/Ana", consent())
    doc = family.create_identity("smiths/ana", consent())
    assert doc["consent"]["guardian_name"] == "Maria Smith"
    with pytest.raises(AlreadyExists):
        family.create_identity("smiths/ana", consent())


def test_concurrent_creation_of_one_handle(family, settings):
    vaults = [Vault.open(settings) for _ in range(4)]
    barrier = threading.Barrier(len(vaults))
    outcomes: list[str] = []

    def create(v: Vault) -> None:
        barrier.wait()
        try:
            v.create_identity("smiths/twin", consent())
            outcomes.append("ok")
        except AlreadyExists:
            outcomes.append("exists")

    threads = [threading.Thread(target=create, args=(v,)) for v in vaults]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for v in vaults:
        v.dispose()
    assert sorted(outcomes) == ["exists"] * 3 + ["ok"]
    assert [i["handle"] for i in family.list_identities("smiths")] == ["smiths/twin"]
    assert family.verify_audit().ok


def test_put_get_round_trip_and_replace(family):
    family.create_identity("smiths/ana", consent())
    coef = np.random.default_rng(3).normal(size=(2, 512))
    first = family.put_artifact("smiths/ana", "celeb_basis", basis_payload(coef))
    opened = family.get_artifact("smiths/ana", "celeb_basis")
    np.testing.assert_allclose(opened.artifact.tensors["coefficients"], coef.astype(np.float32))
    second = family.put_artifact("smiths/ana", "celeb_basis", basis_payload(coef * 2))
    assert second.replaced == first.id
    again = family.get_artifact("smiths/ana", "celeb_basis")
    assert again.id == second.id
    np.testing.assert_allclose(again.artifact.tensors["coefficients"], 2 * coef, rtol=1e-6)
    shown = family.describe("smiths/ana")["artifacts"]
    assert [(a["kind"], a["shapes"]) for a in shown] == [("celeb_basis",
                                                         {"coefficients": [2, 512]})]


def test_put_rejects_bad_payload_and_stores_nothing(family):
    family.create_identity("smiths/ana", consent())
    with pytest.raises(ArtifactRejected, match="pickle"):
        family.put_artifact("smiths/ana", "face", b"\x80\x04K\x01.")
    with pytest.raises(ArtifactRejected, match="is a 'face' artifact"):
        family.put_artifact("smiths/ana", "lidb", face_payload())
    assert family.describe("smiths/ana")["artifacts"] == []


def test_several_models_per_kind_need_a_choice(family):
    family.create_identity("smiths/ana", consent())
    family.put_artifact("smiths/ana", "face", face_payload(model_id="buffalo_l"))
    family.put_artifact("smiths/ana", "face", face_payload(model_id="antelopev2"))
    with pytest.raises(Exception, match="choose one by model id: antelopev2, buffalo_l"):
        family.get_artifact("smiths/ana", "face")
    assert family.get_artifact("smiths/ana", "face", model_id="antelopev2").artifact.model_id \
        == "antelopev2"


def test_reads_are_gated_by_consent_and_audited(family):
    family.create_identity("smiths/ana", consent())
    family.put_artifact("smiths/ana", "face", face_payload())
    with pytest.raises(PurposeNotGranted, match="'commercial'"):
        family.get_artifact("smiths/ana", "face", purpose="commercial")
    family.get_artifact("smiths/ana", "face", purpose="generate", actor="gen")
    with family.session() as s:
        from vault import audit

        reads = [e for e in audit.events(s) if e.action == "artifact.read"]
    assert len(reads) == 1 and reads[0].actor == "gen"
    assert reads[0].details["purpose"] == "generate"


def test_withdrawal_with_retain_policy_blocks_reads_at_once(family):
    family.create_identity("northlight/lead", consent())
    family.put_artifact("northlight/lead", "face", face_payload())
    result = family.withdraw_consent("northlight/lead", reason="contract ended")
    assert result["erase_policy"] == "retain" and "receipt" not in result
    with pytest.raises(ConsentWithdrawn):
        family.get_artifact("northlight/lead", "face")
    assert family.search_faces("northlight", np.ones((1, 512), np.float32)) == []
    assert family.describe("northlight/lead")["status"] == "withdrawn"


def test_withdrawal_with_immediate_policy_erases(family):
    family.create_identity("smiths/ana", consent())
    family.put_artifact("smiths/ana", "face", face_payload())
    result = family.withdraw_consent("smiths/ana")
    assert result["receipt"]["receipt"]["reason"] == "consent withdrawn"
    with pytest.raises(NotFound):
        family.describe("smiths/ana")


def test_retention_sweep_erases_expired(family):
    import datetime as dt

    family.create_identity("smiths/ana", consent())
    family.create_identity("smiths/ben", consent(retain_until="2099-01-01"))
    later = dt.date.today() + dt.timedelta(days=400)
    receipts = family.sweep_retention(today=later)
    assert [r["receipt"]["handle"] for r in receipts] == ["smiths/ana"]
    assert [i["handle"] for i in family.list_identities()] == ["smiths/ben"]


def _swap_ciphertexts(vault, id_a, id_b):
    with vault.session() as s:
        a = s.get(Artifact, id_a).ciphertext
        b = s.get(Artifact, id_b).ciphertext
        s.execute(update(Artifact).where(Artifact.id == id_a).values(ciphertext=b))
        s.execute(update(Artifact).where(Artifact.id == id_b).values(ciphertext=a))


def test_swapped_ciphertexts_between_rows_fail(family):
    family.create_identity("smiths/ana", consent())
    a = family.put_artifact("smiths/ana", "face", face_payload(seed=1))
    b = family.put_artifact("smiths/ana", "celeb_basis", basis_payload(np.ones((2, 512))))
    _swap_ciphertexts(family, a.id, b.id)
    for kind in ("face", "celeb_basis"):
        with pytest.raises(DecryptionError, match="failed authentication"):
            family.get_artifact("smiths/ana", kind)


def test_swapped_ciphertexts_between_identities_fail(family):
    for name in ("ana", "ben"):
        family.create_identity(f"smiths/{name}", consent())
    a = family.put_artifact("smiths/ana", "face", face_payload(seed=1))
    b = family.put_artifact("smiths/ben", "face", face_payload(seed=2))
    _swap_ciphertexts(family, a.id, b.id)
    for name in ("ana", "ben"):
        with pytest.raises(DecryptionError, match="sealed under another key"):
            family.get_artifact(f"smiths/{name}", "face")


def test_corrupt_row_is_a_clear_error_and_others_survive(family):
    for name in ("ana", "ben"):
        family.create_identity(f"smiths/{name}", consent())
        family.put_artifact(f"smiths/{name}", "face", face_payload(seed=len(name)))
    with family.session() as s:
        row = s.scalar(select(Artifact).join(Identity).where(Identity.name == "ana"))
        blob = bytearray(row.ciphertext)
        blob[len(blob) // 2] ^= 0xFF
        row.ciphertext = bytes(blob)
    with pytest.raises(DecryptionError):
        family.get_artifact("smiths/ana", "face")
    with family.session() as s:
        row = s.scalar(select(Artifact).join(Identity).where(Identity.name == "ana"))
        row.ciphertext = row.ciphertext[:30]
    with pytest.raises(DecryptionError, match="truncated"):
        family.get_artifact("smiths/ana", "face")
    assert family.get_artifact("smiths/ben", "face").artifact.kind == "face"
    assert family.verify_audit().ok


def test_corrupt_wrapped_key_is_named(family):
    from vault.keystore_models import DataKey

    family.create_identity("smiths/ana", consent())
    family.put_artifact("smiths/ana", "face", face_payload())
    family.keys._deks.clear()
    with family.keys._session() as s:
        row = s.scalar(select(DataKey))
        row.wrapped = row.wrapped[:-1] + bytes([row.wrapped[-1] ^ 1])
    with pytest.raises(IntegrityError, match="wrapped data key .* failed authentication"):
        family.get_artifact("smiths/ana", "face")


def test_erasure_receipt_and_crypto_shredding(family):
    family.create_identity("smiths/ana", consent())
    stored = family.put_artifact("smiths/ana", "face", face_payload())
    with family.session() as s:  # a "backup" of the rows, taken before erasure
        backup = s.get(Artifact, stored.id).ciphertext
        uid = s.scalar(select(Identity.uid).where(Identity.name == "ana"))
    signed = family.delete_identity("smiths/ana")
    receipt = family.verify_receipt(signed)
    assert receipt["handle"] == "smiths/ana" and receipt["data_key"]["shredded"]
    assert [a["id"] for a in receipt["artifacts"]] == [stored.id]
    assert receipt["index_vectors_removed"] in (0, 2)
    with pytest.raises(NotFound, match="erased"):
        family.keys.dek(uid)
    assert family.keys.dek_uids() == set()
    assert backup  # the ciphertext copy exists, but nothing can open it any more
    tampered = {**signed, "receipt": {**signed["receipt"], "handle": "smiths/ben"}}
    from vault.errors import SignatureInvalid

    with pytest.raises(SignatureInvalid, match="altered"):
        family.verify_receipt(tampered)
    assert family.verify_audit().ok


def test_erasure_resumes_after_shredding(family):
    """A crash between shredding the key and deleting the rows: re-running finishes."""
    family.create_identity("smiths/ana", consent())
    family.put_artifact("smiths/ana", "face", face_payload())
    uid = family.describe("smiths/ana")["id"]
    family.keys.shred(uid)  # the first half of delete_identity, then "crash"
    with pytest.raises(IntegrityError, match="data key is gone"):
        family.get_artifact("smiths/ana", "face")
    receipt = family.delete_identity("smiths/ana")["receipt"]
    # the key is gone at the end, whichever run deleted it (this one never saw its id)
    assert receipt["data_key"] == {"key_id": None, "shredded": True}
    assert family.list_identities() == []


def test_dedupe_search_not_same_and_delete(family):
    rng = np.random.default_rng(5)
    ana, ben = rng.normal(size=512), rng.normal(size=512)
    for name, center in (("ana", ana), ("ben", ben)):
        family.create_identity(f"smiths/{name}", consent())
        family.put_artifact(f"smiths/{name}", "face", face_payload(center, seed=len(name)))
    probe = face_payload(ana, seed=99)
    from vault import codec

    vec = codec.decode(probe).tensors["normed"]
    hits = family.search_faces("smiths", vec)
    assert hits[0]["handle"] == "smiths/ana" and hits[0]["decision"] == "block"
    assert hits[1]["decision"] == "new"
    family.record_not_same("smiths/ana", "smiths/ben")
    ben_vec = codec.decode(face_payload(ben, seed=7)).tensors["normed"]
    assert [h["handle"] for h in family.search_faces("smiths", ben_vec,
                                                     exclude_identity="smiths/ben")] == []
    family.delete_identity("smiths/ana")
    assert [h["handle"] for h in family.search_faces("smiths", vec)] == ["smiths/ben"]


def test_index_rebuild_from_encrypted_store(family, settings):
    rng = np.random.default_rng(6)
    centers = {f"p{i}": rng.normal(size=512) for i in range(5)}
    for name, c in centers.items():
        family.create_identity(f"smiths/{name}", consent())
        family.put_artifact(f"smiths/{name}", "face", face_payload(c, photos=3, seed=hash(name) % 99))
    with Vault.open(settings) as fresh:  # a new process knows nothing until it rebuilds
        stats = fresh.rebuild_index("smiths")
        assert (stats["identities"], stats["vectors"]) == (5, 15)
        from vault import codec

        for name, c in centers.items():
            vec = codec.decode(face_payload(c, seed=1000)).tensors["normed"]
            assert fresh.search_faces("smiths", vec, k=1)[0]["handle"] == f"smiths/{name}"
    # Owners are separate: nothing of smiths is visible to northlight.
    assert family.search_faces("northlight", rng.normal(size=(1, 512))) == []


def test_face_models_are_indexed_apart(family):
    from vault import codec
    from vault.errors import InvalidInput

    rng = np.random.default_rng(8)
    center = rng.normal(size=512)
    family.create_identity("smiths/ana", consent())
    family.put_artifact("smiths/ana", "face", face_payload(center, model_id="buffalo_l"))
    family.put_artifact("smiths/ana", "face", face_payload(-center, model_id="antelopev2"))
    probe = codec.decode(face_payload(center, seed=3)).tensors["normed"]
    with pytest.raises(InvalidInput, match="several models"):
        family.search_faces("smiths", probe)
    assert family.search_faces("smiths", probe, model_id="buffalo_l")[0]["decision"] == "block"
    assert family.search_faces("smiths", probe, model_id="antelopev2")[0]["decision"] == "new"
    # Storing a new buffalo_l face in a loaded index leaves the antelopev2 vectors alone.
    family.put_artifact("smiths/ana", "face", face_payload(center, seed=4, model_id="buffalo_l"))
    assert family.search_faces("smiths", -probe, model_id="antelopev2")[0]["decision"] == "block"


def test_init_refuses_shared_database(tmp_path):
    from vault.config import Settings
    from vault.errors import InvalidInput

    url = f"sqlite:///{tmp_path / 'one.db'}"
    with pytest.raises(InvalidInput, match="different database"):
        Vault.init(Settings(data_dir=tmp_path, database_url=url, keystore_url=url))
    assert not (tmp_path / "master.key").exists()


def test_init_with_unreachable_database_writes_no_key(tmp_path):
    from vault.config import Settings
    from vault.errors import InvalidInput

    bad = Settings(data_dir=tmp_path / "v",
                   database_url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    with pytest.raises(InvalidInput, match="cannot create the vault databases"):
        Vault.init(bad)
    assert not (tmp_path / "v" / "master.key").exists()


def test_several_reads_in_one_transaction_all_or_nothing(family):
    from vault import audit

    family.create_identity("smiths/ana", consent())
    family.create_identity("smiths/ben", consent(purposes=["enroll"]))
    family.put_artifact("smiths/ana", "face", face_payload(seed=1))
    family.put_artifact("smiths/ben", "face", face_payload(seed=2))
    with family.session() as s:
        before = len(audit.events(s, limit=1000))
    with pytest.raises(PurposeNotGranted, match="'generate'"):
        family.get_artifacts([("smiths/ana", "face", None), ("smiths/ben", "face", None)])
    with family.session() as s:
        assert len(audit.events(s, limit=1000)) == before  # nothing read, nothing audited
    [a] = family.get_artifacts([("smiths/ana", "face", None)], actor="gen")
    assert a.handle == "smiths/ana" and a.artifact.shapes["normed"] == [2, 512]
    assert family.get_artifacts([]) == []


def test_get_identities_loads_several_in_order(family):
    from vault import identities
    from vault.errors import NotFound

    for name in ("ana", "ben", "cy"):
        family.create_identity(f"smiths/{name}", consent(), actor="test")
    with family.session() as s:
        got = identities.get_identities(s, ["smiths/cy", "smiths/ana", "@smiths/ben"])
        assert [i.handle for i in got] == ["smiths/cy", "smiths/ana", "smiths/ben"]
        assert identities.get_identities(s, []) == []
        with pytest.raises(NotFound, match="no identity smiths/zed"):
            identities.get_identities(s, ["smiths/ana", "smiths/zed", "northlight/ana"])
        assert set(map(str, identities.find_identities(s, ["smiths/ana", "northlight/ana"]))
                   ) == {"smiths/ana"}
