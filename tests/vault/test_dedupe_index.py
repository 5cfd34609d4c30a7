"""The in-memory dedupe index: exact scores, removal at once, exclusion, the switch from
exact scan to binary codes, storage growth and codes that every process derives alike.

Small thresholds (``flat_below``, ``rerank``) are injected so that the binary path runs
on a few thousand vectors; the figures at 1M are bench/bench_dedupe.py's.
"""

import subprocess
import sys

import numpy as np
import pytest

from vault.dedupe_index import (
    CODE_BITS,
    DIM,
    DedupeIndex,
    OwnerIndex,
    encode,
    normalise,
    projection,
)

# float32 inner products of 512-d unit vectors: faiss, BLAS and a float64 check sum the
# products in different orders; their differences stay near 1e-7, far inside this.
TOL = 1e-5


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def near(v, cos, rng):
    """Unit vectors at cosine ``cos`` to the unit rows of ``v``, in a random direction."""
    noise = rng.standard_normal(v.shape)
    noise -= (noise * v).sum(-1, keepdims=True) * v
    return unit(cos * v + np.sqrt(1 - cos**2) * unit(noise))


def people(n, rng, per=1, groups=50):
    """``n`` identities with cluster structure (lookalike groups at cosine ~0.35 to each
    other) and ``per`` photos each at cosine ~0.88 to the identity's centre: roughly the
    levels ArcFace shows (docs/dedupe.md). Returns (centres, ids per photo, photos)."""
    g = unit(rng.standard_normal((groups, DIM)))
    centres = near(g[rng.integers(groups, size=n)], np.sqrt(0.35), rng)
    ids = np.repeat(np.arange(1, n + 1), per)
    photos = near(np.repeat(centres, per, axis=0), 0.88, rng)
    return centres, ids, photos


def binary(**kw):
    """An index that takes the code path from its first vector."""
    return OwnerIndex(flat_below=0, **kw)


def exact_best(ids, photos, query):
    """Per identity, its best photo's score against any query photo, in float64."""
    s = (photos @ unit(query).reshape(-1, DIM).T).max(axis=1)
    best: dict[int, float] = {}
    for i, v in zip(ids.tolist(), s.tolist(), strict=True):
        best[i] = max(best.get(i, -2.0), v)
    return best


@pytest.fixture(scope="module")
def roster():
    rng = np.random.default_rng(1)
    centres, ids, photos = people(1500, rng, per=3)
    return rng, centres, ids, photos


@pytest.mark.parametrize("flat_below", [0, 10**9])  # binary path, exact scan
def test_scores_are_exact_inner_products_of_the_identities_returned(roster, flat_below):
    """Every score is the query's inner product with a stored photo of that identity. The
    top identity's is its best photo's; so is every identity's on the exact scan, while
    the code path ranks lower identities by their best photo among its candidates."""
    rng, centres, ids, photos = roster
    idx = OwnerIndex(flat_below=flat_below, rerank=64)
    idx.add_many(ids, photos)
    for q in near(centres[rng.choice(len(centres), 20)], 0.85, rng):
        best = exact_best(ids, photos, q)
        hits = idx.search(q, k=5)
        assert len(hits) == 5 and len({i for i, _ in hits}) == 5
        assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
        assert hits[0][1] == pytest.approx(best[hits[0][0]], abs=TOL)
        for identity, score in hits:
            own = photos[ids == identity] @ unit(q)
            assert np.min(np.abs(own - score)) < TOL
            if idx.exact:
                assert score == pytest.approx(best[identity], abs=TOL)


def test_top1_equals_the_exact_scan_on_clustered_people(roster):
    rng, centres, ids, photos = roster
    fast, exact = binary(rerank=100), OwnerIndex("flat")
    fast.add_many(ids, photos)
    exact.add_many(ids, photos)
    assert exact.exact and not fast.exact
    src = rng.choice(len(centres), 300, replace=False)
    queries = near(centres[src], 0.88, rng)  # a new photo of an enrolled person
    for q in queries:
        (top_fast, s_fast), (top_exact, s_exact) = fast.search(q, k=1)[0], exact.search(q, k=1)[0]
        assert top_fast == top_exact
        assert s_fast == pytest.approx(s_exact, abs=TOL)
    # the data are hard enough to mean something: lookalikes score far above strangers
    lookalike = max(exact.search(queries[0], k=2)[1][1], 0.0)
    assert lookalike > 0.2


def test_several_photos_an_identity_scores_its_best_photo():
    rng = np.random.default_rng(2)
    idx = binary(rerank=16)
    other = unit(rng.standard_normal((200, DIM)))
    idx.add_many(np.arange(100, 300), other)
    me = unit(rng.standard_normal(DIM))
    photos = np.stack([near(me, c, rng) for c in (0.95, 0.6, 0.3)])
    idx.add(7, photos)
    hits = idx.search(me, k=3)
    assert hits[0][0] == 7 and hits[0][1] == pytest.approx(float(photos[0] @ me), abs=TOL)
    assert 7 not in [i for i, _ in hits[1:]]  # one entry per identity
    assert idx.identities == 201 and len(idx) == 203


@pytest.mark.parametrize("flat_below", [0, 10**9])  # binary path, exact scan
def test_remove_takes_effect_at_once_and_leaves_no_copy(flat_below):
    rng = np.random.default_rng(3)
    idx = OwnerIndex(flat_below=flat_below, rerank=32)
    vectors = unit(rng.standard_normal((2000, DIM))).astype(np.float32)
    ids = np.arange(1, 2001)
    idx.add_many(ids, vectors)
    victim = 1234
    mine = np.stack([near(vectors[victim - 1], 0.9, rng) for _ in range(2)]).astype(np.float32)
    idx.add(victim, mine)  # a second enrollment: rows far apart in the index
    q = near(vectors[victim - 1], 0.95, rng)
    assert idx.search(q, k=1)[0][0] == victim
    second = idx.search(q, k=2)[1]

    assert idx.remove(victim) == 3
    hits = idx.search(q, k=5)
    assert victim not in [i for i, _ in hits]
    assert hits[0] == (second[0], pytest.approx(second[1], abs=TOL))
    assert len(idx) == 1999 and idx.identities == 1999
    # nothing of the removed identity remains in the buffers, capacity included
    assert victim not in idx._labels
    for v in (vectors[victim - 1], *mine):
        assert not np.any(np.all(idx._vectors == v, axis=1))
        assert not np.any(np.all(idx._codes == encode(v[None])[0], axis=1))
    # the rows that moved into the gaps are still found under their own identity
    for i in (1999, 2000):
        assert idx.search(vectors[i - 1], k=1)[0] == (i, pytest.approx(1.0, abs=TOL))
    assert idx.remove(victim) == 0 and idx.remove(10**9) == 0


def test_removing_everything_and_adding_again():
    rng = np.random.default_rng(4)
    idx = binary()
    v = unit(rng.standard_normal((3, DIM)))
    idx.add_many([1, 1, 2], v)
    assert idx.remove(1) == 2 and idx.remove(2) == 1
    assert len(idx) == 0 and idx.search(v[0]) == [] and idx.identities == 0
    idx.add(1, v[0])
    assert idx.search(v[0], k=5) == [(1, pytest.approx(1.0, abs=TOL))]


@pytest.mark.parametrize("flat_below", [0, 10**9])
def test_excluded_identities_are_never_returned_even_when_they_crowd_the_candidates(
        flat_below):
    rng = np.random.default_rng(5)
    idx = OwnerIndex(flat_below=flat_below, rerank=20)
    idx.add_many(np.arange(1000, 3000), unit(rng.standard_normal((2000, DIM))))
    me = unit(rng.standard_normal(DIM))
    # the excluded identity holds more photos near the query than the re-rank depth
    idx.add(1, near(np.repeat(me[None], 60, axis=0), 0.9, rng))
    twin = near(me, 0.7, rng)
    idx.add(2, twin)
    assert idx.search(me, k=1)[0][0] == 1
    hits = idx.search(me, k=3, exclude={1})
    assert [i for i, _ in hits][0] == 2 and 1 not in [i for i, _ in hits]
    assert hits[0][1] == pytest.approx(float(twin @ me), abs=TOL)
    assert len(hits) == 3
    assert [i for i, _ in idx.search(me, k=3, exclude={1, 2})][0] not in (1, 2)


def test_search_finds_k_identities_when_few_hold_many_photos():
    rng = np.random.default_rng(6)
    idx = binary(rerank=20)
    me = unit(rng.standard_normal(DIM))
    for i in range(1, 5):  # four identities with 30 photos each near the query
        idx.add(i, near(np.repeat(me[None], 30, axis=0), 0.8, rng))
    idx.add_many(np.arange(10, 510), unit(rng.standard_normal((500, DIM))))
    assert {i for i, _ in idx.search(me, k=5)[:4]} == {1, 2, 3, 4}
    assert len(idx.search(me, k=5)) == 5


def test_switch_from_exact_scan_to_codes_at_the_threshold():
    """Below ``flat_below`` the search scans exactly; from it on it re-ranks only the
    nearest codes (at least 4k of them). With few candidates the two can be told apart:
    the code path misses the best-scoring vector when its code is not among the nearest."""
    rng = np.random.default_rng(7)
    vectors = unit(rng.standard_normal((100, DIM))).astype(np.float32)
    codes = encode(vectors)
    for q in unit(rng.standard_normal((1000, DIM))).astype(np.float32):
        hamming = np.unpackbits(codes ^ encode(q[None]), axis=1).sum(axis=1)
        fourth = np.sort(hamming)[3]
        nearest = np.flatnonzero(hamming <= fourth)
        by_score = int(np.argmax(vectors @ q))
        if len(nearest) == 4 and by_score not in nearest:  # no tie at the 4th code
            by_code = int(nearest[np.argmax(vectors[nearest] @ q)])
            break
    else:
        pytest.fail("no query whose best vector lies outside its 4 nearest codes")
    last = next(i for i in range(100) if i not in nearest and i != by_score)
    order = [i for i in range(100) if i != last]
    idx = OwnerIndex(flat_below=100, rerank=1)
    idx.add_many(np.array(order), vectors[order])
    assert idx.exact and idx.search(q, k=1)[0][0] == by_score
    idx.add(last, vectors[last])
    assert not idx.exact and idx.search(q, k=1)[0][0] == by_code
    idx.remove(last)  # back below the threshold: exact again
    assert idx.exact and idx.search(q, k=1)[0][0] == by_score


def test_flat_index_type_always_scans():
    idx = OwnerIndex("flat", flat_below=0)
    idx.add(1, np.ones(DIM))
    assert idx.exact
    with pytest.raises(ValueError, match="index type"):
        OwnerIndex("ivf")


def test_codes_are_derived_alike_by_every_process():
    p = projection()
    assert p.shape == (DIM, CODE_BITS) and p.dtype == np.float32
    # orthonormal directions, to float32 rounding of each entry (~3e-8 x 512 terms)
    assert np.allclose(p.astype(np.float64).T @ p, np.eye(CODE_BITS), atol=1e-5)
    rng = np.random.default_rng(8)
    v = unit(rng.standard_normal((64, DIM))).astype(np.float32)
    a, b = OwnerIndex(flat_below=0), OwnerIndex(flat_below=0)
    a.add_many(np.arange(64), v)
    b.add_many(np.arange(64), v)
    assert np.array_equal(a._codes[:64], b._codes[:64])
    # another process derives the same directions (a seeded draw and elementwise
    # float64 arithmetic in a fixed order, no threads) ...
    code = ("import sys; from vault.dedupe_index import projection; "
            "sys.stdout.buffer.write(projection().tobytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    assert np.array_equal(np.frombuffer(out, dtype=np.float32).reshape(DIM, CODE_BITS), p)
    # ... and each bit is the side of its hyperplane (the projection's sign)
    bits = np.unpackbits(a._codes[:64], axis=1).astype(bool)
    projected = v.astype(np.float64) @ p.astype(np.float64)
    clear = np.abs(projected) > 1e-4  # away from rounding of zero
    assert np.array_equal(bits[clear], (projected > 0)[clear])


def test_vectors_encoded_elsewhere_are_stored_as_given():
    """``add_encoded`` (a rebuild's workers normalise and encode) stores exactly what
    ``add_many`` computes from the same rows, and searches alike."""
    rng = np.random.default_rng(12)
    raw = rng.standard_normal((3000, DIM)).astype(np.float32)
    unit = normalise(raw)
    a, b = OwnerIndex(), OwnerIndex()
    a.add_many(np.arange(3000), raw)
    b.add_encoded(np.arange(3000), unit, encode(unit))
    for x, y in ((a._vectors, b._vectors), (a._codes, b._codes), (a._labels, b._labels)):
        assert np.array_equal(x[:3000], y[:3000])
    assert not b.exact and b.search(raw[17], k=3) == a.search(raw[17], k=3)
    assert b.search(raw[17], k=1) == [(17, pytest.approx(1.0, abs=TOL))]
    with pytest.raises(ValueError, match="codes of shape"):
        b.add_encoded([1, 2], unit[:2], encode(unit[:3]))
    with pytest.raises(ValueError, match="codes of shape"):
        b.add_encoded([1, 2], unit[:2], encode(unit[:2])[:, :16])
    assert len(b) == 3000


def test_reserve_then_batches_never_reallocate_and_growth_is_modest():
    rng = np.random.default_rng(9)
    idx = OwnerIndex()
    idx.reserve(5000)  # room for 5000 and an eighth more for the enrollments that follow
    buffers = idx._vectors, idx._codes, idx._labels
    for s in range(0, 5000, 1000):
        idx.add_many(np.arange(s, s + 1000), rng.standard_normal((1000, DIM)))
    idx.add_many(np.arange(10**5, 10**5 + 625), rng.standard_normal((625, DIM)))
    assert idx.capacity == 5625 and len(idx) == 5625
    assert all(a is b for a, b in zip(buffers, (idx._vectors, idx._codes, idx._labels),
                                      strict=True))
    idx.add(99_999, rng.standard_normal(DIM))  # past the reservation: a quarter more
    assert idx.capacity == 7031 and idx._vectors is not buffers[0]
    assert idx.search(idx._vectors[5625], k=1) == [(99_999, pytest.approx(1.0, abs=TOL))]
    idx.reserve(10)  # never shrinks
    assert idx.capacity == 7031
    grown = OwnerIndex()
    for s in range(0, 20_000, 700):
        grown.add_many(np.arange(s, s + 700), rng.standard_normal((700, DIM)))
    assert len(grown) == 20_300 and grown.capacity <= 1.25 * len(grown)
    with pytest.raises(ValueError, match="identity ids"):
        idx.add_many([1, 2], rng.standard_normal((3, DIM)))
    with pytest.raises(ValueError, match="zero vector"):
        idx.add(1, np.zeros(DIM))


def test_dedupe_index_counts_identities_across_models_and_removes_from_all():
    d = DedupeIndex(block=0.7, review=0.5, flat_below=0)
    rng = np.random.default_rng(10)
    d.get(1, "buffalo_l").add_many([1, 2, 3], rng.standard_normal((3, DIM)))
    d.get(1, "antelopev2").add_many([3, 4], rng.standard_normal((2, DIM)))
    d.get(2, "buffalo_l").add(9, rng.standard_normal(DIM))
    assert d.identities(1) == 4 and d.identities(2) == 1 and d.identities(3) == 0
    assert d.remove(1, 3) == 2
    assert d.identities(1) == 3 and d.models(1) == ["antelopev2", "buffalo_l"]
    q = d.get(1, "buffalo_l")._vectors[0]
    assert d.search(1, "buffalo_l", q, k=1)[0].decision == "block"
