"""Keeps a process's in-memory copies from outliving erasures made by other processes.

Two things a process keeps in memory derive from an identity: the vectors of
its dedupe index (:mod:`vault.dedupe_sync`) and the data keys its key store
caches (``dek_cache_seconds``). An erasure or a withdrawal in one process
removes them from that process at once, and every other process's next
search catches up with the change log first. A process that holds them but
does not search (an idle worker, a server between requests) is what this
sweeper is for: from the first copy it keeps, every :data:`EVERY_SECONDS` it
brings the indexes it holds up to the change log and drops the cached data
keys whose key was shredded.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("idvault.vault")

EVERY_SECONDS = 2.0


class CacheSweeper:
    def __init__(self, vault, every: float = EVERY_SECONDS) -> None:
        self.vault = vault
        self.every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start sweeping (once; called when the process first keeps a copy)."""
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="idvault-cache-sweeper")
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def sweep(self) -> None:
        """One round: catch up every index held, drop the data keys of erased identities."""
        for owner_id in list(self.vault.dedupe.applied):
            with self.vault.session(read_only=True) as s:
                self.vault.dedupe.catch_up(s, owner_id)
        self.vault.keys.drop_shredded()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.sweep()
            except Exception:  # a database away for a moment: the next round tries again
                log.warning("cache sweep failed", exc_info=True)
