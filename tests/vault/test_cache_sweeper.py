"""No copy outlives an erasure in a process that does not search: its cache sweeper drops
the erased identity's vectors and cached data key within its interval."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.helpers import consent, face_payload
from vault import identities
from vault.vault import Vault


@pytest.fixture
def pair(family, settings):
    other = Vault.open(settings)
    other.caches.every = 0.05  # the default is 2 s; the behaviour is the same
    yield family, other
    other.dispose()


def _eventually(check, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def test_an_idle_process_drops_the_vectors_and_the_key_of_an_erasure_elsewhere(pair) -> None:
    a, b = pair
    rng = np.random.default_rng(3)
    a.store_enrollment("smiths/ana", face_payload(rng.normal(size=512)),
                       consent_request=consent())
    b.search_faces("smiths", np.ones((1, 512), np.float32))  # B loads the index
    opened = b.get_artifact("smiths/ana", "face", purpose="enroll", actor="test")
    with b.session(read_only=True) as s:
        owner = identities.get_owner(s, "smiths").id
        uid = identities.get_identity(s, "smiths/ana").uid
    assert len(b.index.get(owner, opened.artifact.metadata["model_id"])) == 2
    assert uid in b.keys._deks  # cached by the read
    a.delete_identity("smiths/ana", actor="test")
    # B searches nothing and reads nothing: its sweeper alone drops both copies.
    assert _eventually(lambda: len(b.index.get(owner, "buffalo_l")) == 0)
    assert _eventually(lambda: uid not in b.keys._deks)


def test_the_sweeper_starts_with_the_first_copy_and_stops_with_the_vault(settings, family):
    v = Vault.open(settings)
    try:
        assert v.caches._thread is None  # nothing kept yet: no thread
        v.search_faces("smiths", np.ones((1, 512), np.float32))
        assert v.caches._thread is not None and v.caches._thread.is_alive()
    finally:
        v.dispose()
    assert not v.caches._thread.is_alive()
