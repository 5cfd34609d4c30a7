"""This process's dedupe index kept in step with the encrypted store.

:class:`IndexSync` fills a process's :class:`~vault.dedupe_index.DedupeIndex`
from the store -- a full load the first time the process needs an owner --
and then, before every search, applies the owner's changes from the change
log (:mod:`vault.dedupe_log`) that it has not applied yet. Vectors are
decrypted from the face artifacts; the log holds ids only. A long-lived
process (a worker, a server) loads an owner once and then pays only for the
changes: one decryption per identity added since, nothing per removal.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from vault import codec, crypto, dedupe_log
from vault.models import Artifact, Identity, Owner

INDEXED_STATUSES = ("active", "held")  # held identities are indexed: a third try is caught
BATCH_ROWS = 1000


class IndexSync:
    """Loads and catches up ``vault.index`` (see the module docstring)."""

    def __init__(self, vault) -> None:
        self.vault = vault
        self.index = vault.index
        self.applied: dict[int, int] = {}  # owner id -> newest change applied

    def loaded(self, owner_id: int) -> bool:
        return owner_id in self.applied

    def ensure(self, owner_id: int) -> None:
        """Load the owner's index if this process has not yet (outside any transaction
        that holds the owner's lock: a full load of a large roster takes seconds)."""
        if owner_id not in self.applied:
            self.load(owner_id)

    def load(self, owner_id: int, progress: Callable[[int, int], None] | None = None) -> int:
        """Decrypt the owner's face artifacts, in batches, into fresh indexes; returns the
        number of vectors. Changes committed while it runs are applied by the next
        :meth:`catch_up` (applying one twice changes nothing)."""
        vault = self.vault
        indexed = (Identity.owner_id == owner_id, Identity.status.in_(INDEXED_STATUSES),
                   Artifact.kind == "face")
        with vault.session(read_only=True) as s:
            start = dedupe_log.latest(s, owner_id)  # before the rows: nothing is missed
            owner_name = s.scalar(select(Owner.name).where(Owner.id == owner_id))
            uids = set(s.scalars(select(Identity.uid).join(Artifact).where(*indexed)))
        deks = vault.keys.all_deks(uids)
        by_model: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        query = (select(Identity.id, Identity.uid, Artifact.id, Artifact.model_id,
                        Artifact.ciphertext)
                 .join(Artifact, Artifact.identity_id == Identity.id).where(*indexed)
                 .execution_options(yield_per=BATCH_ROWS))
        with vault.session(read_only=True) as s:
            for n, row in enumerate(s.execute(query), 1):
                identity_id, uid, art_id, model_id, ciphertext = row
                if uid not in deks:
                    continue  # shredded mid-erasure; its rows are going
                normed = self._normed(owner_name, uid, art_id, model_id, ciphertext,
                                      deks[uid][1])
                ids, vectors = by_model.setdefault(model_id, ([], []))
                ids.extend([identity_id] * len(normed))
                vectors.append(normed)
                if progress and (n % BATCH_ROWS == 0 or n == len(uids)):
                    progress(n, len(uids))
        with self.index.lock:
            self.index.drop_owner(owner_id)
            count = 0
            for model_id, (ids, vectors) in by_model.items():
                idx = self.index.get(owner_id, model_id)
                idx.add_many(np.asarray(ids), np.concatenate(vectors))
                idx.optimise()
                count += len(ids)
            self.applied[owner_id] = start
        self.vault.caches.start()  # from now on this process holds vectors: keep them fresh
        return count

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
                 self._normed(owner_name, uid, art_id, model_id, ciphertext, deks[uid][1]))
                for identity_id, uid, owner_name, art_id, model_id, ciphertext in rows
                if uid in deks]

    def _normed(self, owner: str, uid: str, art_id: str, model_id: str, ciphertext: bytes,
                dek: bytes) -> np.ndarray:
        payload = crypto.open_token(dek, ciphertext, context=self.vault._context(
            owner, uid, art_id, "face", model_id))
        return codec.decode(payload, kind="face").tensors["normed"]
