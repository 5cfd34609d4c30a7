"""One dedupe truth across processes: two Vault objects on one database each keep their
own in-memory index, as two server processes or workers do. Every search catches up with
the change log first, so what one of them commits the other's next search sees."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from sqlalchemy import inspect, select

from tests.helpers import consent, face_payload
from vault import dedupe_log
from vault.errors import DuplicateIdentity
from vault.models import DedupeChange, Identity
from vault.vault import Vault


@pytest.fixture
def pair(family, settings):
    """Process A (``family``) and process B, a second Vault on the same databases."""
    other = Vault.open(settings)
    yield family, other
    other.dispose()


def _center(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=512)


def _query(center: np.ndarray, seed: int = 99) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = center + 0.2 * rng.normal(size=512)
    return (v / np.linalg.norm(v)).astype(np.float32)[None]


def test_an_enrollment_through_one_process_is_caught_through_the_other(pair) -> None:
    a, b = pair
    ana = _center(1)
    b.store_enrollment("smiths/ben", face_payload(_center(2), seed=2),
                       consent_request=consent())  # B has loaded the owner's index
    assert b.dedupe.loaded(_owner_id(b, "smiths"))
    a.store_enrollment("smiths/ana", face_payload(ana, seed=1), consent_request=consent())
    with pytest.raises(DuplicateIdentity, match="smiths/ana"):
        b.store_enrollment("smiths/annie", face_payload(ana, seed=3),
                           consent_request=consent())
    assert [m["handle"] for m in b.search_faces("smiths", _query(ana))][:1] == ["smiths/ana"]


def test_erasure_and_withdrawal_through_one_process_are_seen_by_the_next_search(pair) -> None:
    a, b = pair
    ana, sol = _center(1), _center(4)
    a.store_enrollment("smiths/ana", face_payload(ana, seed=1), consent_request=consent())
    a.store_enrollment("northlight/sol", face_payload(sol, seed=4), consent_request=consent())
    assert b.search_faces("smiths", _query(ana))[0]["decision"] == "block"
    assert b.search_faces("northlight", _query(sol))[0]["decision"] == "block"
    a.delete_identity("smiths/ana", actor="test")
    a.withdraw_consent("northlight/sol", actor="test")  # retained: the row stays, withdrawn
    assert b.search_faces("smiths", _query(ana)) == []
    assert b.search_faces("northlight", _query(sol)) == []
    with a.session() as s:
        assert s.scalar(select(Identity.status).where(Identity.name == "sol")) == "withdrawn"


def test_a_replaced_face_artifact_is_searched_with_its_new_vectors(pair) -> None:
    a, b = pair
    old, new = _center(5), _center(6)
    a.store_enrollment("smiths/cleo", face_payload(old, seed=5), consent_request=consent())
    assert b.search_faces("smiths", _query(old))[0]["handle"] == "smiths/cleo"
    a.put_artifact("smiths/cleo", "face", face_payload(new, seed=6), actor="test")
    hits = b.search_faces("smiths", _query(new))
    assert hits[0]["handle"] == "smiths/cleo" and hits[0]["decision"] == "block"
    assert b.search_faces("smiths", _query(old)) == [] or \
        b.search_faces("smiths", _query(old))[0]["decision"] == "new"


def test_catch_up_reads_each_change_once_and_applying_twice_changes_nothing(pair) -> None:
    a, b = pair
    for i in range(3):
        a.store_enrollment(f"smiths/p{i}", face_payload(_center(10 + i), seed=10 + i),
                           consent_request=consent())
    owner = _owner_id(a, "smiths")
    b.dedupe.ensure(owner)
    with b.session(read_only=True) as s:
        assert b.dedupe.catch_up(s, owner) == 0  # the full load saw all three
    a.delete_identity("smiths/p1", actor="test")
    with b.session(read_only=True) as s:
        assert b.dedupe.catch_up(s, owner) == 1
        assert b.dedupe.catch_up(s, owner) == 0
    before = len(b.index.get(owner, "buffalo_l"))
    b.dedupe.applied[owner] = 0  # as if every change were new again
    with b.session(read_only=True) as s:
        assert b.dedupe.catch_up(s, owner) == 4
    assert len(b.index.get(owner, "buffalo_l")) == before == 4  # two photos x two people


def test_the_change_log_holds_ids_never_vectors(pair) -> None:
    a, _ = pair
    a.store_enrollment("smiths/ana", face_payload(_center(1), seed=1), consent_request=consent())
    columns = {c["name"]: str(c["type"]) for c in inspect(a.engine).get_columns(
        "dedupe_changes")}
    assert set(columns) == {"seq", "owner_id", "identity_id", "op", "at"}
    with a.session(read_only=True) as s:
        assert [(c.op, c.identity_id) for c in s.scalars(select(DedupeChange))] == [
            ("add", s.scalar(select(Identity.id).where(Identity.name == "ana")))]


def test_the_same_face_enrolled_through_both_at_once_lands_once(pair) -> None:
    a, b = pair
    for v in (a, b):  # both have the (empty) roster loaded: neither knows of the other
        v.search_faces("smiths", _query(_center(0)))
    face = _center(7)
    outcomes: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def enroll(vault: Vault, name: str, seed: int) -> None:
        barrier.wait()
        try:
            outcomes[name] = vault.store_enrollment(f"smiths/{name}", face_payload(
                face, seed=seed), consent_request=consent()).status
        except DuplicateIdentity as exc:
            outcomes[name] = exc

    threads = [threading.Thread(target=enroll, args=(a, "eve", 7)),
               threading.Thread(target=enroll, args=(b, "evie", 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(o).__name__ for o in outcomes.values()) == ["DuplicateIdentity", "str"]
    with a.session(read_only=True) as s:
        names = set(s.scalars(select(Identity.name).where(Identity.name.in_(["eve", "evie"]))))
    assert len(names) == 1


@pytest.mark.postgres
def test_the_owner_lock_is_a_postgresql_advisory_lock(pg_databases, tmp_path) -> None:
    from sqlalchemy import text

    from vault.config import Settings

    settings = Settings(data_dir=tmp_path / "pg", database_url=pg_databases.create(),
                        keystore_url=pg_databases.create())
    with Vault.init(settings, actor="test") as a, Vault.open(settings) as b:
        a.add_owner("smiths", "family", actor="test")
        owner = _owner_id(a, "smiths")
        probe = text("SELECT pg_try_advisory_xact_lock(:ns, :o)")
        args = {"ns": dedupe_log.LOCK_NAMESPACE, "o": owner}
        with a.session() as s:
            dedupe_log.lock_owner(s, owner)
            with b.engine.connect() as other:  # held until A's transaction ends
                assert other.execute(probe, args).scalar() is False
        with b.engine.connect() as other:
            assert other.execute(probe, args).scalar() is True


def _owner_id(vault: Vault, name: str) -> int:
    from vault import identities

    with vault.session(read_only=True) as s:
        return identities.get_owner(s, name).id
