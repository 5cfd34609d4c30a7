"""In-memory FAISS index per owner for catching duplicate enrollments.

Vectors are L2-normalised ArcFace embeddings (one per enrolled photo),
labelled with their identity's row id; inner product is then cosine
similarity. An identity's score against a query is its best photo's score.
The index is never written to disk: it is rebuilt from the encrypted store
(``Vault.rebuild_index``) when a process first needs it.

Two index types:

``flat`` (default)  exact search, supports removal; fine to ~1M photos.
``ivf``             IVF with ``nlist`` ~ 4 sqrt(n) lists and ``nprobe`` 32;
                    faster on large rosters at a small recall cost
                    (bench/bench_dedupe.py measures both).

Decision thresholds on cosine similarity (defaults; ``IDVAULT_DEDUPE_BLOCK``
and ``IDVAULT_DEDUPE_REVIEW``): score >= block -> ``block`` (refused as the
same person), review <= score < block -> ``review`` (held for a human),
else ``new``. See docs/dedupe.md for how they were chosen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np

# faiss uses BLAS only for batches of at least this many queries; its default
# (128000) keeps even large enrollment batches off BLAS, ~4.5x slower on these
# machines (ENVIRONMENT.md). Single queries still take the direct path.
faiss.cvar.distance_compute_blas_threshold = 20

DIM = 512
INDEX_TYPES = ("flat", "ivf")
# Below this many vectors a search runs on one OpenMP thread: waking a team
# costs more than it saves, and next to onnxruntime's spinning threads a
# 2-thread search of 150 vectors took 19 ms instead of 0.01 ms (bench_face).
SINGLE_THREAD_BELOW = 50_000


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run faiss with ``n`` OpenMP threads in this thread (None: unchanged)."""
    if n is None:
        yield
        return
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


class OwnerIndex:
    """The vectors of one owner."""

    def __init__(self, index_type: str = "flat") -> None:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {INDEX_TYPES}")
        self.index_type = index_type
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
        self._ids: dict[int, int] = {}  # identity id -> vectors held

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def identities(self) -> int:
        return len(self._ids)

    def add(self, identity_id: int, vectors: np.ndarray) -> None:
        v = normalise(vectors)
        self._index.add_with_ids(v, np.full(len(v), identity_id, dtype=np.int64))
        self._ids[identity_id] = self._ids.get(identity_id, 0) + len(v)

    def add_many(self, identity_ids: np.ndarray, vectors: np.ndarray) -> None:
        v = normalise(vectors)
        ids = np.asarray(identity_ids, dtype=np.int64)
        self._index.add_with_ids(v, ids)
        for i, n in zip(*np.unique(ids, return_counts=True), strict=True):
            self._ids[int(i)] = self._ids.get(int(i), 0) + int(n)

    def remove(self, identity_id: int) -> int:
        if identity_id not in self._ids:
            return 0
        removed = int(self._index.remove_ids(np.array([identity_id], dtype=np.int64)))
        del self._ids[identity_id]
        return removed

    def optimise(self) -> None:
        """Switch to IVF when asked and large enough to benefit (>= 10k vectors)."""
        if self.index_type != "ivf" or len(self) < 10_000 or isinstance(
                faiss.downcast_index(self._index.index), faiss.IndexIVFFlat):
            return
        flat = faiss.downcast_index(self._index.index)
        vectors = flat.reconstruct_n(0, flat.ntotal)
        ids = faiss.vector_to_array(self._index.id_map).astype(np.int64)
        nlist = int(4 * np.sqrt(len(vectors)))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.METRIC_INNER_PRODUCT)
        # A bounded sample and few k-means iterations: full training takes ~10
        # minutes at 1M vectors and the bench saw no recall gain from it.
        ivf.cp.niter = 10
        rng = np.random.default_rng(0)
        size = min(len(vectors), 32 * nlist, 100_000)
        ivf.train(vectors[rng.choice(len(vectors), size, replace=False)])
        ivf.nprobe = 32
        index = faiss.IndexIDMap2(ivf)
        index.add_with_ids(vectors, ids)
        self._index = index

    def search(self, vectors: np.ndarray, k: int = 5,
               exclude: set[int] | frozenset[int] = frozenset()) -> list[tuple[int, float]]:
        """Best identities for the query photos: ``[(identity_id, score)]``, best first."""
        if len(self) == 0:
            return []
        q = normalise(vectors)
        # Ask for more neighbours than k: an identity holds several photos.
        depth = min(len(self), max(4 * k, k + len(exclude)) * 4)
        with _threads(1 if len(self) < SINGLE_THREAD_BELOW else None):
            scores, labels = self._index.search(q, depth)
        best: dict[int, float] = {}
        for row_scores, row_labels in zip(scores, labels, strict=True):
            for s, label in zip(row_scores, row_labels, strict=True):
                label = int(label)
                if label < 0 or label in exclude:
                    continue
                if s > best.get(label, -2.0):
                    best[label] = float(s)
        return sorted(best.items(), key=lambda kv: -kv[1])[:k]


class DedupeIndex:
    """Indexes per (owner, face model) and the block/review decision.

    Embeddings of different recognisers live in different spaces, so each
    face model of an owner has its own index.
    """

    def __init__(self, *, block: float, review: float, index_type: str = "flat") -> None:
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {INDEX_TYPES}")
        self.block, self.review = block, review
        self.index_type = index_type
        self._indexes: dict[tuple[int, str], OwnerIndex] = {}
        # Held by vault.dedupe_sync across a catch-up, so a search sees all of it.
        self.lock = threading.RLock()

    def get(self, owner_id: int, model_id: str) -> OwnerIndex:
        with self.lock:
            key = (owner_id, model_id)
            if key not in self._indexes:
                self._indexes[key] = OwnerIndex(self.index_type)
            return self._indexes[key]

    def models(self, owner_id: int) -> list[str]:
        with self.lock:
            return sorted(m for o, m in self._indexes if o == owner_id)

    def identities(self, owner_id: int) -> int:
        with self.lock:
            return len({i for (o, _), idx in self._indexes.items() if o == owner_id
                        for i in idx._ids})

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
