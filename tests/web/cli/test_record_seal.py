"""The CLI on a tampered identity record: exit 3 (integrity), a message naming the
identity and what changed, never a traceback (the attacks themselves are in
tests/vault/test_record_seal.py)."""

import json

from sqlalchemy import create_engine, text

from tests.helpers import consent_doc, face_payload
from web.cli.main import main


def test_deleted_consent_row_exits_3_naming_it(tmp_path, capsys):
    data = str(tmp_path / "vault")

    def run(*args: str, code: int = 0) -> str:
        rc = main([*args, "--data-dir", data])
        out, err = capsys.readouterr()
        assert rc == code, f"exit {rc} (wanted {code}); stderr: {err}"
        assert "Traceback" not in err
        return out + err

    run("init")
    run("owner", "add", "smiths", "--kind", "family")
    (tmp_path / "consent.json").write_text(json.dumps(consent_doc()))
    run("identity", "add", "smiths/ana", "--consent", str(tmp_path / "consent.json"))
    (tmp_path / "face.safetensors").write_bytes(face_payload())
    run("artifact", "put", "smiths/ana", "face", str(tmp_path / "face.safetensors"))
    got = tmp_path / "got.safetensors"
    run("artifact", "get", "smiths/ana", "face", "-o", str(got), "--purpose", "generate")
    engine = create_engine(f"sqlite:///{tmp_path / 'vault' / 'vault.db'}")
    with engine.begin() as c:
        c.execute(text("delete from consents"))
    engine.dispose()
    got.unlink()
    said = run("artifact", "get", "smiths/ana", "face", "-o", str(got), "--purpose",
               "generate", code=3)
    assert "smiths/ana" in said and "was removed" in said and "IndexError" not in said
    assert not got.exists()
    # a record without its consent cannot even be described: the listing names it too
    assert "smiths/ana" in run("identity", "list", code=3)
    # erasure never needs a valid record
    run("identity", "delete", "smiths/ana", "--yes", "-o", str(tmp_path / "receipt.json"))
    assert json.loads((tmp_path / "receipt.json").read_text())["receipt"]["handle"] == \
        "smiths/ana"
