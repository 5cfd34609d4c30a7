"""In-memory index per owner for catching duplicate enrollments.

Vectors are L2-normalised ArcFace embeddings (one per enrolled photo),
labelled with their identity's row id; inner product is then cosine
similarity. An identity's score against a query is its best photo's score.
The index is never written to disk: it is rebuilt from the encrypted store
(``Vault.rebuild_index``) when a process first needs it.

Every score it returns is exact: the inner product of the query with the
stored float32 vector. What differs with size is how candidates are found:

* below ``FLAT_BELOW`` vectors, an exact scan of every vector (faster there);
* from ``FLAT_BELOW`` on (index type ``auto``, the default), by binary codes:
  each vector also carries ``CODE_BITS`` bits, the signs of its projections on
  fixed random orthonormal directions. A query photo's code is compared with
  every code by Hamming distance (faiss), and the vectors of its ``RERANK``
  nearest codes are scored exactly. A stored photo whose code is not among
  them is missed, so the top identity is right with a measured probability
  (docs/dedupe.md, bench/bench_dedupe.py), not always; a miss can only lower
  the top score, never raise it.

Index type ``flat`` scans exactly at every size. Removal takes effect at once
and overwrites the removed rows.

Decision thresholds on cosine similarity (defaults; ``IDVAULT_DEDUPE_BLOCK``
and ``IDVAULT_DEDUPE_REVIEW``): score >= block -> ``block`` (refused as the
same person), review <= score < block -> ``review`` (held for a human),
else ``new``. See docs/dedupe.md for how they were chosen.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import numpy as np

# faiss uses BLAS only for batches of at least this many queries; its default
# (128000) keeps even large enrollment batches off BLAS, ~4.5x slower on these
# machines (ENVIRONMENT.md). Single queries still take the direct path.
BLAS_THRESHOLD = 20


@cache
def _faiss():
    """FAISS, imported when an index is first searched: a process that never searches
    (an API node, a lookup-only server, most CLI commands) does not load it (~15 MB)."""
    import faiss

    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
    return faiss

DIM = 512
INDEX_TYPES = ("auto", "flat")
# Below this many vectors a search runs on one OpenMP thread: waking a team
# costs more than it saves, and next to onnxruntime's spinning threads a
# 2-thread search of 150 vectors took 19 ms instead of 0.01 ms (bench_face).
SINGLE_THREAD_BELOW = 50_000
# Where the code path overtakes the exact scan (bench_dedupe.py --crossover, 2 cores:
# exact 0.34 / codes 0.36 ms at 1,000 vectors, 0.52 / 0.38 ms at 2,000).
FLAT_BELOW = 2_000
# Code length and re-rank depth, chosen by measured recall on clustered data
# (docs/dedupe.md): 256 bits keep the scan at 32 B a vector (1.7-5.7 ms at 1M on one
# core of the shared machine); 192 missed 3-7x more hard re-enrollments, and 384
# doubled the scan's time.
CODE_BITS = 256
RERANK = 2000  # 1,000 found 0.9987 of hard re-enrollments at 1M; 2,000 found 0.9993
CODE_SEED = 20_260_301  # fixed: every process derives the same directions, hence codes
# Growth by a quarter, not doubling. Growing copies the rows held (so briefly holds
# them twice); a rebuild avoids it by reserving first.
GROWTH = 1.25


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run faiss with ``n`` OpenMP threads in this thread (None: unchanged)."""
    if n is None:
        yield
        return
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)  # OpenMP's setting is per calling thread
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass(frozen=True)
class Match:
    identity_id: int
    score: float
    decision: str  # block | review | new


def normalise(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32).reshape(-1, DIM)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError("cannot index a zero vector")
    return np.ascontiguousarray(v / norms)


@cache
def projection(bits: int = CODE_BITS) -> np.ndarray:
    """``bits`` orthonormal random directions, from ``CODE_SEED`` (a ``DIM x bits`` matrix).

    Bit i of a code is the sign of the projection on direction i: two unit vectors
    at angle t differ in each bit with probability t / pi. Orthogonal directions
    (Gram-Schmidt on Gaussian draws) missed a third as many hard re-enrollments as
    plain Gaussian ones at equal depth (docs/dedupe.md). Elementwise numpy only, no
    BLAS or LAPACK call: the same arithmetic in every process, and LAPACK's QR took
    9 s instead of 0.1 s on a busy 2-core machine (its threads wait for cores).
    """
    g = np.random.default_rng(CODE_SEED).standard_normal((bits, DIM))
    for i in range(bits):
        for _ in range(2):  # twice, so the rows are orthogonal to float64 rounding
            g[i] -= np.einsum("j,jk->k", np.einsum("jk,k->j", g[:i], g[i]), g[:i])
        g[i] /= np.sqrt(np.einsum("k,k->", g[i], g[i]))
    return np.ascontiguousarray(g.T, dtype=np.float32)


def _empty(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """An array in its own anonymous mapping, unmapped when the array goes. numpy's
    own large arrays ask for transparent huge pages, and writing fresh ones cost
    190 instead of 55 ms per 10,000 vectors on the shared machine (the kernel
    compacts memory to find them); a rebuild writes every page once."""
    count = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(1, count * np.dtype(dtype).itemsize))
    return np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)


def encode(unit_vectors: np.ndarray) -> np.ndarray:
    """Binary codes, ``CODE_BITS // 8`` bytes a row."""
    return np.packbits(unit_vectors @ projection() > 0, axis=1)


class OwnerIndex:
    """The vectors of one owner (of one face model), with their identities."""

    def __init__(self, index_type: str = "auto", *, flat_below: int = FLAT_BELOW,
                 rerank: int = RERANK) -> None:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {INDEX_TYPES}")
        self.index_type = index_type
        self.flat_below, self.rerank = flat_below, rerank
        self._n = 0
        self._vectors = np.empty((0, DIM), dtype=np.float32)
        self._codes = np.empty((0, CODE_BITS // 8), dtype=np.uint8)
        self._labels = np.empty(0, dtype=np.int64)
        # Every id ever added is <= this; new enrollments have new, larger row ids,
        # so removing one before adding it (vault.dedupe_sync) skips the scan.
        self._max_id = -1

    def __len__(self) -> int:
        return self._n

    @property
    def capacity(self) -> int:
        return len(self._labels)

    @property
    def identities(self) -> int:
        return len(self.identity_ids())

    def identity_ids(self) -> np.ndarray:
        return np.unique(self._labels[:self._n])

    @property
    def exact(self) -> bool:
        """Whether a search now scans every vector (no binary candidate step)."""
        return self.index_type == "flat" or self._n < self.flat_below

    # -- storage ------------------------------------------------------------------------
    def reserve(self, n: int) -> None:
        """Make room for ``n`` vectors in all (a rebuild that knows its count calls it
        first), so adding that many copies nothing, plus an eighth for the enrollments
        that follow: else the first of them would copy the whole index to grow it. Room
        not yet written is address space only; it takes no resident memory."""
        if n > self.capacity:
            self._resize(n + n // 8)

    def _resize(self, capacity: int) -> None:
        n = self._n
        vectors = _empty((capacity, DIM), np.float32)
        codes = _empty((capacity, CODE_BITS // 8), np.uint8)
        labels = _empty((capacity,), np.int64)
        vectors[:n], codes[:n], labels[:n] = self._vectors[:n], self._codes[:n], self._labels[:n]
        self._vectors, self._codes, self._labels = vectors, codes, labels

    def _append(self, ids: np.ndarray, v: np.ndarray, codes: np.ndarray | None = None) -> None:
        if len(ids) != len(v):
            raise ValueError(f"{len(ids)} identity ids for {len(v)} vectors")
        if codes is not None and codes.shape != (len(v), CODE_BITS // 8):
            raise ValueError(f"codes of shape {codes.shape} for {len(v)} vectors")
        if not len(v):
            return
        n, end = self._n, self._n + len(v)
        if end > self.capacity:
            self._resize(max(end, int(self.capacity * GROWTH), 1024))
        self._vectors[n:end] = v
        self._codes[n:end] = encode(v) if codes is None else codes
        self._labels[n:end] = ids
        self._n = end
        self._max_id = max(self._max_id, int(ids.max()))

    def add(self, identity_id: int, vectors: np.ndarray) -> None:
        v = normalise(vectors)
        self._append(np.full(len(v), identity_id, dtype=np.int64), v)

    def add_many(self, identity_ids: np.ndarray, vectors: np.ndarray) -> None:
        """Append rows (one identity id per vector); costs O(rows added), never a full copy
        except on growth (by a quarter; none after a sufficient :meth:`reserve`)."""
        self._append(np.asarray(identity_ids, dtype=np.int64).reshape(-1), normalise(vectors))

    def add_encoded(self, identity_ids: np.ndarray, unit_vectors: np.ndarray,
                    codes: np.ndarray) -> None:
        """:meth:`add_many` of vectors already normalised and encoded (:func:`normalise`,
        :func:`encode`) elsewhere: a rebuild's worker processes do both."""
        v = np.asarray(unit_vectors, dtype=np.float32).reshape(-1, DIM)
        self._append(np.asarray(identity_ids, dtype=np.int64).reshape(-1), v,
                     np.asarray(codes, dtype=np.uint8))

    def remove(self, identity_id: int) -> int:
        """Drop the identity's vectors now; returns how many. Scans the ids (~1 ms at 1M);
        the last rows move into the gaps and the freed rows are zeroed, so no copy of a
        removed vector stays in the index's memory."""
        if identity_id > self._max_id:
            return 0
        n = self._n
        gone = np.flatnonzero(self._labels[:n] == identity_id)
        if not len(gone):
            return 0
        end = n - len(gone)
        holes = gone[gone < end]
        movers = np.setdiff1d(np.arange(end, n), gone, assume_unique=True)
        for a in (self._vectors, self._codes, self._labels):
            a[holes] = a[movers]
            a[end:n] = 0
        self._n = end
        return len(gone)

    # -- search -------------------------------------------------------------------------
    def search(self, vectors: np.ndarray, k: int = 5,
               exclude: set[int] | frozenset[int] = frozenset()) -> list[tuple[int, float]]:
        """Best identities for the query photos: ``[(identity_id, score)]``, best first.

        Each query photo takes its candidate rows -- the nearest by exact score (exact
        scan) or by code (``rerank`` of them, scored exactly) -- and an identity scores
        its best (query photo, row) pair among them. Rows of excluded identities do not
        count towards the depth, which grows until ``k`` identities are found or every
        row was looked at.
        """
        n = self._n
        if n == 0 or k < 1:
            return []
        q = normalise(vectors)
        banned = np.fromiter(exclude, dtype=np.int64, count=len(exclude))
        exact = self.exact
        want = 4 * k if exact else max(self.rerank, 4 * k)
        depth = min(n, want)
        while True:
            scores, rows = self._exact(q, depth) if exact else self._by_code(q, depth)
            labels = self._labels[rows]
            crowded = False
            if len(banned):
                keep = ~np.isin(labels, banned)
                crowded = depth - (~keep).sum(axis=1).max() < want
                scores, labels = scores[keep], labels[keep]
            scores, labels = scores.ravel(), labels.ravel()
            order = np.argsort(-scores, kind="stable")
            labels = labels[order]
            _, first = np.unique(labels, return_index=True)  # each identity's best pair
            if depth == n or (len(first) >= k and not crowded):
                break
            depth = min(n, 4 * depth)
        best = np.sort(first)[:k]
        return [(int(labels[i]), float(scores[order[i]])) for i in best]

    def _exact(self, q: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        with _threads(1 if self._n < SINGLE_THREAD_BELOW else None):
            faiss = _faiss()
            return faiss.knn(q, self._vectors[:self._n], depth, faiss.METRIC_INNER_PRODUCT)

    def _by_code(self, q: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        scores = np.empty((len(q), depth), dtype=np.float32)
        # One thread: faiss does not split one query's scan, and waking a team for the
        # re-rank cost 20 ms instead of 0.1 ms on a busy machine.
        with _threads(1):
            # counting ("mc") beats a heap ("hc") here, but holds (bits + 1) x depth ids
            # per query photo: 2 MB at depth 1000, too much for a depth widened to 1M
            variant = "mc" if depth <= 4096 else "hc"
            _, rows = faiss.knn_hamming(encode(q), self._codes[:self._n], depth, variant=variant)
            # exact scores of the candidates, read in place (no gather, no BLAS call)
            faiss.fvec_inner_products_by_idx(
                faiss.swig_ptr(scores), faiss.swig_ptr(q), faiss.swig_ptr(self._vectors),
                faiss.swig_ptr(rows), DIM, len(q), depth)
        return scores, rows


class DedupeIndex:
    """Indexes per (owner, face model) and the block/review decision.

    Embeddings of different recognisers live in different spaces, so each
    face model of an owner has its own index.
    """

    def __init__(self, *, block: float, review: float, index_type: str = "auto",
                 flat_below: int = FLAT_BELOW) -> None:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {INDEX_TYPES}")
        self.block, self.review = block, review
        self.index_type, self.flat_below = index_type, flat_below
        self._indexes: dict[tuple[int, str], OwnerIndex] = {}
        # Held by vault.dedupe_sync across a catch-up, so a search sees all of it.
        self.lock = threading.RLock()

    def get(self, owner_id: int, model_id: str) -> OwnerIndex:
        with self.lock:
            key = (owner_id, model_id)
            if key not in self._indexes:
                self._indexes[key] = OwnerIndex(self.index_type, flat_below=self.flat_below)
            return self._indexes[key]

    def models(self, owner_id: int) -> list[str]:
        with self.lock:
            return sorted(m for o, m in self._indexes if o == owner_id)

    def identities(self, owner_id: int) -> int:
        with self.lock:
            ids = [idx.identity_ids() for (o, _), idx in self._indexes.items() if o == owner_id]
            return len(np.unique(np.concatenate(ids))) if ids else 0

    def drop_owner(self, owner_id: int) -> None:
        with self.lock:
            for key in [k for k in self._indexes if k[0] == owner_id]:
                del self._indexes[key]

    def decide(self, score: float) -> str:
        if score >= self.block:
            return "block"
        if score >= self.review:
            return "review"
        return "new"

    def search(self, owner_id: int, model_id: str, vectors: np.ndarray, *, k: int = 5,
               exclude: set[int] | frozenset[int] = frozenset()) -> list[Match]:
        with self.lock:
            hits = self.get(owner_id, model_id).search(vectors, k, exclude)
        return [Match(i, s, self.decide(s)) for i, s in hits]

    def remove(self, owner_id: int, identity_id: int) -> int:
        """Remove an identity from every model index of its owner; vectors removed."""
        with self.lock:
            return sum(idx.remove(identity_id) for (o, _), idx in self._indexes.items()
                       if o == owner_id)
