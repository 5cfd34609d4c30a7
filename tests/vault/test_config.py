"""Settings from the environment, flags winning; bad values named."""

from pathlib import Path

import pytest

from vault.config import Settings
from vault.errors import InvalidInput


def test_env_then_overrides(tmp_path):
    env = {"IDVAULT_DATA_DIR": str(tmp_path), "IDVAULT_DEDUPE_BLOCK": "0.8",
           "IDVAULT_KEY_PROVIDER": "env"}
    s = Settings.from_env(env)
    assert s.data_dir == tmp_path and s.dedupe_block == 0.8 and s.key_provider == "env"
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'vault.db'}"
    assert s.resolved_key_file == tmp_path / "master.key"
    s2 = Settings.from_env(env, data_dir=Path("/elsewhere"), key_provider=None)
    assert s2.data_dir == Path("/elsewhere") and s2.key_provider == "env"


@pytest.mark.parametrize("env, fragment", [
    ({"IDVAULT_DEDUPE_BLOCK": "high"}, "IDVAULT_DEDUPE_BLOCK='high' is not a valid float"),
    ({"IDVAULT_DEDUPE_REVIEW": "0.9"}, "review <= block"),
    ({"IDVAULT_KEY_PROVIDER": "hsm"}, "unknown key provider"),
    ({"IDVAULT_DEDUPE_INDEX": "hnsw"}, "dedupe index must be 'auto' or 'flat'"),
])
def test_bad_values(env, fragment):
    with pytest.raises(InvalidInput, match=fragment):
        Settings.from_env(env)


def test_dedupe_index_default_and_former_ivf():
    assert Settings().dedupe_index == "auto"
    assert Settings.from_env({"IDVAULT_DEDUPE_INDEX": "flat"}).dedupe_index == "flat"
    # 'ivf' (removed) reads as its replacement, so an old setting keeps working
    assert Settings.from_env({"IDVAULT_DEDUPE_INDEX": "ivf"}).dedupe_index == "auto"
