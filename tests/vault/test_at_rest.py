"""No plaintext at rest: a known byte pattern stored in artifacts appears in no file."""

import numpy as np
import pytest

from tests.helpers import consent
from vault import codec
from vault.config import Settings
from vault.vault import Vault

# 16 bytes that float32 round-trips unchanged and that no file would hold by chance.
PATTERN = np.frombuffer(b"IDVAULT-CANARY!!", dtype=np.float32)


def _files(root):
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("erase", [False, True])
def test_no_plaintext_in_any_file(tmp_path, erase):
    data_dir = tmp_path / "vault"
    v = Vault.init(Settings(data_dir=data_dir))
    v.add_owner("smiths", "family")
    v.create_identity("smiths/ana", consent())
    coef = np.tile(PATTERN, 256).reshape(2, 512)
    payload = codec.encode("celeb_basis", {"coefficients": coef},
                           {"model_id": "sd15", "basis_id": "b"})
    assert PATTERN.tobytes() in payload  # the pattern is really in the plaintext
    v.put_artifact("smiths/ana", "celeb_basis", payload)
    v.get_artifact("smiths/ana", "celeb_basis")
    wrapped = v.keys._session
    with wrapped() as s:
        from sqlalchemy import select

        from vault.keystore_models import DataKey

        wrapped_dek = s.scalar(select(DataKey.wrapped))
    if erase:
        v.delete_identity("smiths/ana")
    v.dispose()
    files = _files(data_dir)
    assert {p.name for p in files} >= {"vault.db", "keystore.db", "master.key"}
    for path in files:
        content = path.read_bytes()
        assert PATTERN.tobytes() not in content, path
        if erase and path.name.startswith("keystore"):
            # secure_delete: the shredded key's bytes are gone from the file itself
            assert wrapped_dek not in content
