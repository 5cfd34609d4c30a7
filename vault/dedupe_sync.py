"""This process's dedupe index kept in step with the encrypted store.

:class:`IndexSync` fills a process's :class:`~vault.dedupe_index.DedupeIndex`
from the store -- a full load the first time the process needs an owner --
and then, before every search, applies the owner's changes from the change
log (:mod:`vault.dedupe_log`) that it has not applied yet. Vectors are
decrypted from the face artifacts; the log holds ids only. A long-lived
process (a worker, a server) loads an owner once and then pays only for the
changes: one decryption per identity added since, nothing per removal. A full
load of a large roster decrypts in worker processes (:mod:`vault.dedupe_load`)
and streams into a fresh index, which replaces the owner's old one at the end.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from vault import codec, crypto, dedupe_load, dedupe_log
from vault.dedupe_index import OwnerIndex
from vault.dedupe_load import INDEXED_STATUSES, FaceReader, Workers
from vault.models import Artifact, Identity, Owner

# A worker process takes ~1 s to start (imports; more on a busy machine) and this process
# reads ~25k identities a second alone: below this many, workers would not pay for
# themselves (bench/bench_rebuild.py).
PARALLEL_MIN_IDENTITIES = 50_000


class IndexSync:
    """Loads and catches up ``vault.index`` (see the module docstring)."""

    def __init__(self, vault, workers: int | None = None) -> None:
        """``workers``: processes that decrypt a full load (None: one per core; 1: none,
        the calling process does it all)."""
        self.vault = vault
        self.index = vault.index
        self.applied: dict[int, int] = {}  # owner id -> newest change applied
        self.workers = workers

    def loaded(self, owner_id: int) -> bool:
        return owner_id in self.applied

    def ensure(self, owner_id: int) -> None:
        """Load the owner's index if this process has not yet (outside any transaction
        that holds the owner's lock: a full load of a large roster takes seconds)."""
        if owner_id not in self.applied:
            self.load(owner_id)

    def load(self, owner_id: int, progress: Callable[[int, int], None] | None = None) -> int:
        """Decrypt the owner's face artifacts into fresh indexes, a range at a time, and
        put them in place of the owner's; returns the number of vectors. Changes committed
        while it runs are applied by the next :meth:`catch_up` (applying one twice changes
        nothing)."""
        vault = self.vault
        with vault.session(read_only=True) as s:
            start = dedupe_log.latest(s, owner_id)  # before the rows: nothing is missed
            owner_name = s.scalar(select(Owner.name).where(Owner.id == owner_id))
            plan = dedupe_load.plan(s.connection(), owner_id)
        built: dict[str, OwnerIndex] = {}
        done = 0
        with self._reader(owner_id, owner_name, plan.identities) as reader:
            for k, (rows, parts) in enumerate(reader.map(plan.ranges)):
                for model_id, ids, vectors, codes in parts:
                    if model_id not in built:
                        # Sized from the first range that has the model, a quarter to
                        # spare: room not yet written is address space, not memory.
                        left = len(plan.ranges) - k
                        built[model_id] = self._fresh(len(vectors) * left * 5 // 4)
                    if codes is None:  # read here
                        built[model_id].add_many(ids, vectors)
                    else:  # a worker normalised and encoded them
                        built[model_id].add_encoded(ids, vectors, codes)
                done += rows
                if progress:
                    progress(done, max(done, plan.identities))
        with self.index.lock:
            self.index.drop_owner(owner_id)
            for model_id, idx in built.items():
                # The new indexes replace the old in one step, under the lock: a search
                # sees the old ones, or the new ones.
                self.index._indexes[(owner_id, model_id)] = idx
            self.applied[owner_id] = start
        self.vault.caches.start()  # from now on this process holds vectors: keep them fresh
        return sum(len(idx) for idx in built.values())

    def _fresh(self, vectors: int) -> OwnerIndex:
        """An empty index as ``DedupeIndex.get`` makes one, with room for ``vectors``."""
        idx = OwnerIndex(self.index.index_type, flat_below=self.index.flat_below)
        idx.reserve(vectors)
        return idx

    def _reader(self, owner_id: int, owner: str, roster: int):
        """A context whose ``map(ranges)`` yields ``(rows, parts)`` per range, in order:
        worker processes for a large roster (``roster`` identities, any status), else a
        reader in this process alone."""
        vault = self.vault
        here = FaceReader(vault.engine, vault.keys, str(vault.vault_id), owner_id, owner)
        n = min(self.workers or os.cpu_count() or 1, math.ceil(roster / dedupe_load.BATCH_ROWS))
        if n > 1 and roster >= PARALLEL_MIN_IDENTITIES:
            return Workers(n, vault.settings, str(vault.vault_id), owner_id, owner, here)
        return nullcontext(here)

    def catch_up(self, s: Session, owner_id: int) -> int:
        """Apply the owner's changes that ``s`` sees and this process has not applied, in
        ``s``'s transaction; returns how many changes were read."""
        self.ensure(owner_id)
        with self.index.lock:
            changes = dedupe_log.since(s, owner_id, self.applied[owner_id])
            if not changes:
                return 0
            final = dedupe_log.last_ops(changes)
            for identity_id, op in final.items():
                if op == "remove":
                    self.index.remove(owner_id, identity_id)
            adds = [i for i, op in final.items() if op == "add"]
            for identity_id in adds:  # its faces now, under whichever models they are
                self.index.remove(owner_id, identity_id)
            for identity_id, model_id, normed in self._current(s, adds):
                self.index.get(owner_id, model_id).add(identity_id, normed)
            self.applied[owner_id] = changes[-1][0]
            return len(changes)

    def _current(self, s: Session, identity_ids: list[int]
                 ) -> list[tuple[int, str, np.ndarray]]:
        """``(identity_id, model_id, normed)`` per face artifact the identities have now; an
        identity no longer indexed (erased, withdrawn) has none."""
        if not identity_ids:
            return []
        rows = s.execute(select(Identity.id, Identity.uid, Owner.name, Artifact.id,
                                Artifact.model_id, Artifact.ciphertext)
                         .join(Artifact, Artifact.identity_id == Identity.id)
                         .join(Owner, Owner.id == Identity.owner_id)
                         .where(Identity.id.in_(identity_ids),
                                Identity.status.in_(INDEXED_STATUSES),
                                Artifact.kind == "face")).all()
        deks = self.vault.keys.all_deks({r[1] for r in rows})
        return [(identity_id, model_id,
                 self._normed(owner_name, uid, art_id, model_id, ciphertext, deks[uid]))
                for identity_id, uid, owner_name, art_id, model_id, ciphertext in rows
                if uid in deks]

    def _normed(self, owner: str, uid: str, art_id: str, model_id: str, ciphertext: bytes,
                dek: bytes) -> np.ndarray:
        payload = crypto.open_token(dek, ciphertext, context=self.vault._context(
            owner, uid, art_id, "face", model_id))
        return codec.decode(payload, kind="face").tensors["normed"]

