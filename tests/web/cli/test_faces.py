"""idvault enroll, review, verify-face, search and models with the tiny models."""

import json

import pytest
from PIL import Image

from encoders.standins.synthetic_faces import synthetic_face
from tests.helpers import consent_doc
from web.cli.main import main


@pytest.fixture
def cli(tmp_path, capsys, tiny_models, monkeypatch):
    monkeypatch.setenv("IDVAULT_MODELS", str(tiny_models))
    data = str(tmp_path / "vault")

    def run(*args: str, code: int = 0):
        rc = main([*args, "--data-dir", data])
        out, err = capsys.readouterr()
        assert rc == code, f"exit {rc} (wanted {code}); stderr: {err}"
        assert "Traceback" not in err
        return out, err

    run("init")
    run("owner", "add", "smiths", "--kind", "family")
    (tmp_path / "c.json").write_text(json.dumps(consent_doc()))
    for person in (1, 2):
        for i in range(3):
            Image.fromarray(synthetic_face(person, i)).save(tmp_path / f"p{person}_{i}.jpg")
    run.dir = tmp_path  # type: ignore[attr-defined]
    return run


def test_enroll_duplicate_verify_search(cli):
    d = cli.dir
    out, _ = cli("enroll", "smiths/ana", str(d / "p1_0.jpg"), str(d / "p1_1.jpg"),
                 "--consent", str(d / "c.json"))
    assert out.startswith("enrolled smiths/ana (2 photo(s); face)") and "p1_1.jpg" in out
    _, err = cli("enroll", "smiths/anna", str(d / "p1_2.jpg"), "--consent", str(d / "c.json"),
                 code=10)
    assert "match smiths/ana" in err
    doc = json.loads(cli("enroll", "smiths/ben", str(d / "p2_0.jpg"), "--consent",
                         str(d / "c.json"), "--json")[0])
    assert doc["status"] == "active" and doc["top_match"]["decision"] == "new"
    out, _ = cli("verify-face", "smiths/ana", str(d / "p1_2.jpg"))
    assert out.startswith("same:")
    out, _ = cli("verify-face", "smiths/ana", str(d / "p2_1.jpg"), code=11)
    assert out.startswith("different:")
    found = json.loads(cli("search", str(d / "p2_2.jpg"), "--owner", "smiths", "--json")[0])
    assert found["matches"][0]["handle"] == "smiths/ben"
    assert "no pending reviews" in cli("review", "list")[0]


def test_enroll_errors(cli):
    d = cli.dir
    (d / "bad.jpg").write_bytes(b"\xff\xd8\xff not really")
    _, err = cli("enroll", "smiths/ana", str(d / "p1_0.jpg"), str(d / "bad.jpg"), "--consent",
                 str(d / "c.json"), code=8)
    assert "1 of 2 photos rejected" in err and "bad.jpg" in err
    _, err = cli("enroll", "smiths/ana", str(d / "p1_0.jpg"), code=8)
    assert "needs a consent record" in err
    _, err = cli("enroll", "smiths/ana", str(d / "p1_0.jpg"), "--consent", str(d / "c.json"),
                 "--models", str(d / "nowhere"), code=9)
    assert "w600k_r50.onnx" in err and "non-commercial" in err


def test_models_check_and_tiny(cli, tmp_path, tiny_models):
    out, _ = cli("models", "check", str(tiny_models))
    assert "face pack buffalo_l: ready" in out and "sha256" in out
    out, _ = cli("models", "tiny", str(tmp_path / "fresh"))
    assert "no real likeness" in out
    assert (tmp_path / "fresh" / "models" / "buffalo_l" / "det_10g.onnx").exists()
    _, err = cli("models", "check", str(tmp_path / "empty"), code=9)
    assert "no complete face pack" in err


def test_the_sample_photos_of_models_tiny_enroll_and_tell_people_apart(cli, tmp_path):
    """`idvault models tiny DIR --photos PHOTO_DIR` writes what its help names: photos the
    stand-ins detect, of two different people, and consent files the CLI accepts."""
    from web.cli.demo import write_sample_photos

    folder = tmp_path / "photos"
    written = write_sample_photos(folder)
    assert sorted(p.name for p in written) == sorted(
        [f"{n}{i}.png" for n in ("ana", "ben") for i in (1, 2, 3)]
        + ["ana-consent.json", "ben-consent.json"])
    out, _ = cli("enroll", "smiths/ana", str(folder / "ana1.png"), str(folder / "ana2.png"),
                 "--consent", str(folder / "ana-consent.json"))
    assert out.startswith("enrolled smiths/ana (2 photo(s); face)")
    consent = json.loads(cli("consent", "show", "smiths/ana")[0])
    assert consent["subject"] == "Ana Smith" and consent["purposes"] == ["enroll", "generate"]
    assert cli("verify-face", "smiths/ana", str(folder / "ana3.png"))[0].startswith("same:")
    cli("verify-face", "smiths/ana", str(folder / "ben1.png"), code=11)
    out, _ = cli("enroll", "smiths/ben", str(folder / "ben1.png"), "--consent",
                 str(folder / "ben-consent.json"))
    assert out.startswith("enrolled smiths/ben")
