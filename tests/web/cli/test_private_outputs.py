"""What the CLI writes for the user (a decrypted artifact, an erasure receipt) is 0600
whatever the umask, also when it overwrites a file that was readable by others."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tests.helpers import consent_doc, face_payload
from web.cli.main import main


@pytest.fixture(autouse=True)
def usual_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_artifact_and_receipts_are_written_0600(tmp_path, capsys):
    data = str(tmp_path / "vault")

    def run(*args: str) -> str:
        rc = main([*args, "--data-dir", data])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return out

    run("init")
    run("owner", "add", "smiths", "--kind", "family")
    (tmp_path / "consent.json").write_text(json.dumps(consent_doc()))
    run("identity", "add", "smiths/ana", "--consent", str(tmp_path / "consent.json"))
    (tmp_path / "face.safetensors").write_bytes(face_payload())
    run("artifact", "put", "smiths/ana", "face", str(tmp_path / "face.safetensors"))
    outputs = [tmp_path / name for name in ("got.safetensors", "receipt.json", "again.json")]
    for path in outputs:  # stale files other accounts could read
        path.write_bytes(b"old")
        path.chmod(0o644)
    run("artifact", "get", "smiths/ana", "face", "-o", str(outputs[0]), "--purpose", "generate")
    run("identity", "delete", "smiths/ana", "--yes", "-o", str(outputs[1]))
    run("identity", "receipt", "smiths/ana", "-o", str(outputs[2]))
    for path in outputs:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert path.read_bytes() != b"old"
    assert json.loads(outputs[1].read_text()) == json.loads(outputs[2].read_text())


def test_demo_photos_and_consent_files_are_0600_in_a_0700_folder(tmp_path):
    from PIL import Image

    from web.cli.demo import _photos, write_sample_photos

    written = write_sample_photos(tmp_path / "photos" / "sample")
    written += _photos(tmp_path / "photos" / "sample", "eve", 1, 2)
    assert len(written) >= 8
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "photos").stat().st_mode) == 0o700
    with Image.open(written[0]) as img:
        assert img.format == "PNG"
