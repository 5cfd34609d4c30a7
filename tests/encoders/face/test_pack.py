"""encoders.face.pack: finding an insightface pack and explaining its absence."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from encoders.face.pack import (
    ENV_VAR,
    PACKS,
    candidate_dirs,
    find_face_pack,
    inspect_face_pack,
    resolve_models_dir,
)
from vault.errors import InvalidInput, ModelUnavailable

FAKE_ONNX = b"\x08\x08" + b"\x00" * 30  # starts like an ONNX protobuf; enough for discovery


def _put_pack(directory: Path, pack: str = "buffalo_l") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in PACKS[pack].files:
        (directory / name).write_bytes(FAKE_ONNX + name.encode())


@pytest.mark.parametrize("layout", ["models/buffalo_l", "buffalo_l", "."])
def test_finds_pack_in_each_layout(tmp_path: Path, layout: str) -> None:
    _put_pack(tmp_path / layout)
    pack = find_face_pack(tmp_path, env={})
    assert pack.directory == (tmp_path / layout if layout != "." else tmp_path)
    assert pack.detector_path.name == "det_10g.onnx"
    assert pack.recognizer_path.name == "w600k_r50.onnx"
    assert pack.detector_path.is_file() and pack.recognizer_path.is_file()


def test_insightface_layout_wins_over_the_others(tmp_path: Path) -> None:
    _put_pack(tmp_path)
    _put_pack(tmp_path / "models" / "buffalo_l")
    assert find_face_pack(tmp_path, env={}).directory == tmp_path / "models" / "buffalo_l"


def test_flag_then_env_then_insightface_home(tmp_path: Path, monkeypatch) -> None:
    flag, env_dir, home = tmp_path / "flag", tmp_path / "env", tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    assert resolve_models_dir(flag, env={ENV_VAR: str(env_dir)}) == flag
    assert resolve_models_dir(None, env={ENV_VAR: str(env_dir)}) == env_dir
    assert resolve_models_dir(None, env={}) == home / ".insightface"
    _put_pack(home / ".insightface" / "models" / "buffalo_l")
    assert find_face_pack(None, env={}).directory == home / ".insightface" / "models" / "buffalo_l"
    # The real environment is read when no mapping is given.
    _put_pack(env_dir / "buffalo_l")
    monkeypatch.setenv(ENV_VAR, str(env_dir))
    assert find_face_pack(None).directory == env_dir / "buffalo_l"


def test_missing_pack_error_lists_folders_files_source_and_licence(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable) as err:
        find_face_pack(tmp_path, env={})
    message = str(err.value)
    for folder in candidate_dirs(tmp_path, "buffalo_l", env={}):
        assert str(folder) in message
    assert "det_10g.onnx" in message and "w600k_r50.onnx" in message
    assert "buffalo_l.zip" in message and "github.com/deepinsight/insightface/releases" in message
    assert "DIR/models/buffalo_l" in message and ENV_VAR in message
    assert "non-commercial research" in message and "MIT" in message
    assert "`idvault models tiny DIR`" in message and "no likeness" in message
    assert err.value.details["searched"] == [str(d) for d in candidate_dirs(tmp_path, env={})]


def test_half_a_pack_names_the_missing_file(tmp_path: Path) -> None:
    folder = tmp_path / "buffalo_l"
    folder.mkdir()
    (folder / "w600k_r50.onnx").write_bytes(FAKE_ONNX)
    with pytest.raises(ModelUnavailable) as err:
        find_face_pack(tmp_path, env={})
    assert f"{folder / 'det_10g.onnx'}: missing" in str(err.value)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
        (b"PK\x03\x04zipzipzip", "zip archive"),
        (b"<html>404 Not Found</html>", "not an ONNX model"),
    ],
)
def test_malformed_files_are_explained(tmp_path: Path, content: bytes, reason: str) -> None:
    _put_pack(tmp_path / "models" / "buffalo_l")
    (tmp_path / "models" / "buffalo_l" / "det_10g.onnx").write_bytes(content)
    with pytest.raises(ModelUnavailable) as err:
        find_face_pack(tmp_path, env={})
    assert reason in str(err.value) and "det_10g.onnx" in str(err.value)


def test_other_packs_are_declared_by_spec(tmp_path: Path) -> None:
    assert PACKS["antelopev2"].files == ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
    _put_pack(tmp_path / "models" / "antelopev2", "antelopev2")
    pack = find_face_pack(tmp_path, "antelopev2", env={})
    assert pack.detector_path.name == "scrfd_10g_bnkps.onnx"
    with pytest.raises(ModelUnavailable, match="antelopev2.zip"):
        find_face_pack(tmp_path / "empty", "antelopev2", env={})
    with pytest.raises(InvalidInput, match="unknown face model pack 'nope'"):
        find_face_pack(tmp_path, "nope", env={})


def test_inspect_reports_sizes_and_hashes(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "buffalo_l"
    report = inspect_face_pack(tmp_path, env={})
    assert not report.complete and not any(f.present for f in report.files)
    _put_pack(folder)
    report = inspect_face_pack(tmp_path, env={})
    assert report.complete and report.directory == folder
    for entry in report.files:
        data = (folder / entry.name).read_bytes()
        assert entry.present and entry.size == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
    (folder / "det_10g.onnx").unlink()
    report = inspect_face_pack(tmp_path, env={})
    assert not report.complete
    assert {f.name: f.present for f in report.files} == {"det_10g.onnx": False,
                                                         "w600k_r50.onnx": True}
