"""A full index load: worker processes read exactly what the calling process reads, in the
same order; the rebuild they feed gives the serial rebuild's index; erasures, shredded keys
and changes made during a load are honoured; a failure stops the load and its workers."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select, update

from tests.helpers import consent, face_payload
from vault import dedupe_load, dedupe_sync
from vault.dedupe_index import CODE_BITS, normalise, projection
from vault.dedupe_load import FaceReader, Workers
from vault.errors import DecryptionError
from vault.models import Artifact, Identity, Owner
from vault.vault import Vault

# (name, [(model id, photos, seed)]): two face models, one to four photos, float16 too
ROSTER = [(f"p{i}", [("buffalo_l", 1 + i % 3, i)] + ([("antelopev2", 1 + i % 4, 100 + i)]
                                                    if i % 3 == 0 else []))
          for i in range(11)]
VECTORS = {m: sum(photos for _, faces in ROSTER for mm, photos, _ in faces if mm == m)
           for m in ("buffalo_l", "antelopev2")}


def _face(model_id: str, photos: int, seed: int, dtype=np.float32) -> bytes:
    payload = face_payload(photos=photos, seed=seed, model_id=model_id)
    if dtype is np.float32:
        return payload
    from vault import codec

    t = codec.decode(payload, kind="face").tensors
    return codec.encode("face", {k: v.astype(dtype) for k, v in t.items()},
                        {"model_id": model_id})


@pytest.fixture
def roster(family: Vault) -> Vault:
    """``smiths``: the roster above (p4 held, p7 float16); ``northlight``: one
    identity, and one withdrawn (kept, not indexed)."""
    for name, faces in ROSTER:
        family.create_identity(f"smiths/{name}", consent())
        for model_id, photos, seed in faces:
            dtype = np.float16 if name == "p7" else np.float32
            family.put_artifact(f"smiths/{name}", "face", _face(model_id, photos, seed, dtype),
                                actor="test")
    for name in ("sol", "wren"):
        family.create_identity(f"northlight/{name}", consent())
        family.put_artifact(f"northlight/{name}", "face", face_payload(seed=50), actor="test")
    family.withdraw_consent("northlight/wren", actor="test")
    with family.session() as s:  # held without a review: resealed, as idvault would
        s.execute(update(Identity).where(Identity.name == "p4").values(status="held"))
        family._reseal(s, s.scalar(select(Identity).where(Identity.name == "p4")))
    return family


@pytest.fixture
def started(monkeypatch) -> list[Workers]:
    """Ranges of 3 artifacts, workers at any size; the worker pools the loads start. The
    calling process reads the first range, the workers the rest (however fast they
    start), so both ways are in every load."""
    monkeypatch.setattr(dedupe_load, "BATCH_ROWS", 3)
    monkeypatch.setattr(dedupe_sync, "PARALLEL_MIN_IDENTITIES", 0)
    pools: list[Workers] = []

    class Recorded(Workers):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            pools.append(self)
            self.polls = 0

        def _started(self) -> bool:
            self.polls += 1
            return self.polls > 1

    monkeypatch.setattr(dedupe_sync, "Workers", Recorded)
    return pools


def _owner(vault: Vault, name: str) -> int:
    with vault.session(read_only=True) as s:
        return s.scalar(select(Owner.id).where(Owner.name == name))


def _expected(vault: Vault, owner: str) -> list[tuple[str, int, np.ndarray]]:
    """(model id, identity id, normed rows) per indexed face artifact, in load order, read
    through the product's ordinary decrypting path."""
    with vault.session(read_only=True) as s:
        rows = s.execute(select(Identity.id, Identity.name, Artifact.model_id)
                         .join(Artifact).join(Owner)
                         .where(Owner.name == owner, Identity.status.in_(("active", "held")),
                                Artifact.kind == "face")
                         .order_by(Identity.id, Artifact.id)).all()
    return [(m, i, vault.get_artifact(f"{owner}/{n}", "face", model_id=m, actor="test")
             .artifact.tensors["normed"].astype(np.float32)) for i, n, m in rows]


def _flatten(results) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Concatenate each model's ids and vectors over the ranges, in order."""
    ids: dict[str, list] = {}
    vecs: dict[str, list] = {}
    for _, parts in results:
        for model_id, i, v, _ in parts:
            ids.setdefault(model_id, []).append(i)
            vecs.setdefault(model_id, []).append(v)
    return {m: (np.concatenate(ids[m]), np.concatenate(vecs[m])) for m in ids}


def _ranges(vault: Vault, owner_id: int, batch: int) -> dedupe_load.Plan:
    with vault.engine.connect() as conn:
        return dedupe_load.plan(conn, owner_id, batch)


def test_workers_read_exactly_what_this_process_reads(roster, settings) -> None:
    owner = _owner(roster, "smiths")
    plan = _ranges(roster, owner, batch=3)
    assert plan.identities == 11 and len(plan.ranges) == 4  # ids 1-11 in threes
    assert plan.ranges[0][0] is None and plan.ranges[-1][1] is None  # open at both ends
    here = list(FaceReader(roster.engine, roster.keys, str(roster.vault_id), owner, "smiths")
                .map(plan.ranges))
    with Workers(2, settings, str(roster.vault_id), owner, "smiths") as workers:
        there = list(workers.map(plan.ranges))
        procs = workers.procs
    assert [rows for rows, _ in here] == [rows for rows, _ in there]
    assert sum(rows for rows, _ in here) == 15  # 11 + 4 face artifacts
    for a, b in zip(here, there, strict=True):
        assert [m for m, *_ in a[1]] == [m for m, *_ in b[1]]
        for (_, ids_a, v_a, none), (_, ids_b, unit, codes) in zip(a[1], b[1], strict=True):
            # here: the vectors as stored, for the index to normalise and encode; from a
            # worker: normalised (the same numpy operations: equal bits) and encoded
            assert none is None
            assert np.array_equal(ids_a, ids_b) and np.array_equal(normalise(v_a), unit)
            assert codes.shape == (len(unit), CODE_BITS // 8) and codes.dtype == np.uint8
            # Each bit is a projection's sign, computed on the worker's BLAS (one thread);
            # in float64 here, only a projection within rounding of 0 may come out other.
            p64 = unit.astype(np.float64) @ projection().astype(np.float64)
            differ = np.unpackbits(codes, axis=1).astype(bool) != (p64 > 0)
            assert np.all(np.abs(p64[differ]) < 1e-5)
    assert all(p.returncode == 0 for p in procs)  # they exit with the load
    flat = _flatten(here)
    for model_id in ("buffalo_l", "antelopev2"):
        want = [(i, v) for m, i, v in _expected(roster, "smiths") if m == model_id]
        ids, vectors = flat[model_id]
        assert np.array_equal(ids, np.concatenate([np.full(len(v), i) for i, v in want]))
        assert np.array_equal(vectors, np.concatenate([v for _, v in want]))


def test_a_plan_cuts_the_span_of_the_owners_ids_by_their_count(roster) -> None:
    smiths, northlight = _owner(roster, "smiths"), _owner(roster, "northlight")
    assert _ranges(roster, smiths, batch=4).ranges == [(None, 5), (5, 9), (9, None)]
    assert _ranges(roster, northlight, batch=4).ranges == [(None, None)]  # 2, ids 12-13
    roster.add_owner("empty", "family", actor="test")
    empty = _ranges(roster, _owner(roster, "empty"), batch=4)
    assert empty.identities == 0 and empty.ranges == [(None, None)]


def _index_answers(vault: Vault, owner: str, queries: list | None = None) -> list:
    """Every vector of the owner (``queries``: from :func:`_expected`) searched in this
    process's index: the models' sizes, then each search's top 5 with scores."""
    owner_id = _owner(vault, owner)
    out: list = [(m, len(vault.index.get(owner_id, m))) for m in vault.index.models(owner_id)]
    for model_id, identity_id, normed in queries or _expected(vault, owner):
        for row in normed:
            out.append([(x.identity_id, round(x.score, 6)) for x in
                        vault.index.search(owner_id, model_id, row[None], k=5)])
            assert out[-1][0][0] == identity_id and out[-1][0][1] == pytest.approx(1, abs=1e-3)
    return out


def test_a_parallel_rebuild_gives_the_serial_index(roster, started) -> None:
    total = sum(VECTORS.values())
    roster.dedupe.workers = 1
    assert roster.rebuild_index("smiths")["vectors"] == total
    serial = _index_answers(roster, "smiths")
    assert not started
    roster.dedupe.workers = 2
    assert roster.rebuild_index() == {"owners": 2, "vectors": total + 2, "identities": 12}
    assert len(started) == 1  # northlight's 2 identities are read here
    assert all(p.returncode == 0 for p in started[0].procs)  # the workers exited
    assert _index_answers(roster, "smiths") == serial
    assert _index_answers(roster, "northlight")[:1] == [("buffalo_l", 2)]  # not wren's


@pytest.mark.parametrize("workers", [1, 2])
def test_a_rebuild_keeps_no_data_key(roster, started, workers) -> None:
    roster.keys._deks.clear()  # the fixture's writes cached theirs
    roster.dedupe.workers = workers
    assert roster.rebuild_index()["identities"] == 12
    assert len(started) == workers - 1
    assert not roster.keys._deks  # each key was unwrapped for the load, then dropped


@pytest.mark.parametrize("workers", [1, 2])
def test_an_identity_whose_key_was_shredded_is_left_out(roster, started, workers) -> None:
    with roster.session(read_only=True) as s:
        uid = s.scalar(select(Identity.uid).where(Identity.name == "p3"))
    roster.keys.shred(uid)  # an erasure's first step; its rows are still there
    roster.dedupe.workers = workers
    res = roster.rebuild_index("smiths")
    assert res["identities"] == 10 and res["vectors"] == sum(VECTORS.values()) - 1 - 4
    assert len(started) == workers - 1


@pytest.mark.parametrize("workers", [1, 2])
def test_changes_committed_during_a_load_are_applied_by_the_next_catch_up(
        roster, settings, started, workers) -> None:
    roster.dedupe.workers = workers
    other = Vault.open(settings)  # another process, writing while this one loads
    newcomer = np.random.default_rng(77).normal(size=512)
    calls: list[int] = []

    def meanwhile(done: int, total: int) -> None:
        if not calls:  # after the first range
            calls.append(done)
            other.delete_identity("smiths/p9", actor="test")  # not read yet (in-process)
            other.delete_identity("smiths/p0", actor="test")  # read already
            other.create_identity("smiths/nova", consent())
            other.put_artifact("smiths/nova", "face", face_payload(newcomer, seed=77),
                               actor="test")

    owner = _owner(roster, "smiths")
    p0 = _expected(roster, "smiths")[0]
    try:
        roster.rebuild_index("smiths", progress=meanwhile)
    finally:
        other.dispose()
    assert len(started) == workers - 1
    with roster.session(read_only=True) as s:
        assert roster.dedupe.catch_up(s, owner) == 3  # two erasures, one new face
    assert roster.index.identities(owner) == 11 - 2 + 1
    hits = roster.search_faces("smiths", _unit(newcomer), model_id="buffalo_l")
    assert hits[0]["handle"] == "smiths/nova" and hits[0]["decision"] == "block"
    assert all(m.identity_id != p0[1] for m in roster.index.search(owner, p0[0], p0[2], k=20))


@pytest.mark.parametrize("via", ["this process", "another process"])
def test_an_erasure_right_after_a_parallel_rebuild_removes_at_once(
        roster, settings, started, via) -> None:
    roster.dedupe.workers = 2
    roster.rebuild_index("smiths")
    assert len(started) == 1
    owner = _owner(roster, "smiths")
    model_id, identity_id, normed = _expected(roster, "smiths")[5]
    assert roster.index.search(owner, model_id, normed, k=1)[0].identity_id == identity_id
    with roster.session(read_only=True) as s:
        name = s.scalar(select(Identity.name).where(Identity.id == identity_id))
    if via == "this process":
        roster.delete_identity(f"smiths/{name}", actor="test")
        found = roster.index.search(owner, model_id, normed, k=20)  # no catch-up at all
    else:
        with Vault.open(settings) as other:
            other.delete_identity(f"smiths/{name}", actor="test")
        with roster.session(read_only=True) as s:
            roster.dedupe.catch_up(s, owner)  # what every search does first
        found = roster.index.search(owner, model_id, normed, k=20)
    assert found and all(m.identity_id != identity_id for m in found)


def test_a_tampered_artifact_stops_a_parallel_rebuild_and_its_workers(roster, started) -> None:
    roster.dedupe.workers = 2
    roster.rebuild_index("smiths")
    queries = _expected(roster, "smiths")
    before = _index_answers(roster, "smiths", queries)
    with roster.session() as s:
        art = s.scalars(select(Artifact).join(Identity).where(Identity.name == "p8")).one()
        art.ciphertext = art.ciphertext[:-1] + bytes([art.ciphertext[-1] ^ 1])
    with pytest.raises(DecryptionError, match=f"artifact {art.id} .* failed authentication"):
        roster.rebuild_index("smiths")
    assert len(started) == 2
    assert all(p.returncode is not None for p in started[-1].procs)  # none left running
    assert _index_answers(roster, "smiths", queries) == before  # the old index stays


def _unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)[None]



def test_workers_left_without_work_are_stopped(roster, settings) -> None:
    owner = _owner(roster, "smiths")
    here = FaceReader(roster.engine, roster.keys, str(roster.vault_id), owner, "smiths")
    first = _ranges(roster, owner, batch=3).ranges[:1]
    with Workers(2, settings, str(roster.vault_id), owner, "smiths", here) as workers:
        (rows, parts), = workers.map(first)  # read here, long before they start
    assert rows == 4 and sorted(m for m, *_ in parts) == ["antelopev2", "buffalo_l"]
    assert all(p.returncode is not None for p in workers.procs)  # none left running
