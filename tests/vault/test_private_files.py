"""Files idvault writes are 0600 and the folders it creates 0700, whatever the umask
(vault.private_files), and the vault's own writers use them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.helpers import consent
from vault import staged_photos
from vault.private_files import open_private, private_dir, write_private


@pytest.fixture(autouse=True)
def usual_umask():
    """The common default: without care, files would be 0644 and folders 0755."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_private_creates_and_overwrites_0600(tmp_path):
    fresh = tmp_path / "fresh.bin"
    write_private(fresh, b"secret")
    assert fresh.read_bytes() == b"secret" and mode(fresh) == 0o600
    # An existing, world-readable file is tightened, not just truncated.
    old = tmp_path / "old.bin"
    old.write_bytes(b"x" * 100)
    old.chmod(0o644)
    write_private(old, b"new")
    assert old.read_bytes() == b"new" and mode(old) == 0o600


def test_open_private_text_and_refuses_reading(tmp_path):
    with open_private(tmp_path / "r.json", "w") as f:
        f.write("{}\n")
    assert mode(tmp_path / "r.json") == 0o600
    with pytest.raises(ValueError, match="writes"):
        open_private(tmp_path / "r.json", "rb")


def test_private_dir_makes_every_missing_level_0700_and_leaves_existing_ones(tmp_path):
    mine = tmp_path / "users"
    mine.mkdir(mode=0o755)
    mine.chmod(0o755)
    made = private_dir(mine / "a" / "b")
    assert made.is_dir()
    assert mode(mine / "a") == 0o700 and mode(mine / "a" / "b") == 0o700
    assert mode(mine) == 0o755  # not ours to change
    assert private_dir(made) == made  # exists: nothing to do


def test_staged_photos_are_0600(family):
    family.create_identity("smiths/ana", consent(), actor="test")
    ref = staged_photos.stage(family, "smiths/ana", [b"one" * 50, b"two" * 50],
                              names=["a.jpg", "b.jpg"], actor="test")
    [folder] = list((Path(family.settings.data_dir) / "staged").glob(f"*/{ref.id}"))
    files = sorted(folder.iterdir())
    assert len(files) == 2
    assert {mode(f) for f in files} == {0o600}
    assert mode(folder) == mode(folder.parent) == mode(folder.parent.parent) == 0o700
