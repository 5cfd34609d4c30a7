"""A fit's sealed checkpoint files are 0600 in a 0700 folder, whatever the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

from encoders.fitting.jobs import _SealedCheckpoints
from tests.helpers import consent


def test_checkpoints_are_0600_in_a_0700_folder(family):
    family.create_identity("smiths/ana", consent(), actor="test")
    recorded = []
    ctx = SimpleNamespace(vault=family, identity="smiths/ana", job_id="job-1", checkpoint=None,
                          save_checkpoint=recorded.append)
    old = os.umask(0o022)
    try:
        checkpoints = _SealedCheckpoints(ctx)
        checkpoints.save(1, b"fit state one")
        checkpoints.save(2, b"fit state two")  # the second replaces the first
    finally:
        os.umask(old)
    folder = Path(family.settings.data_dir) / "jobs"
    [path] = list(folder.iterdir())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    ctx.checkpoint = recorded[-1]
    assert checkpoints.load() == b"fit state two"
