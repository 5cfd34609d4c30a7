"""idvault enroll --kinds faceid,instantid and idvault add-kinds, with the tiny models."""

import json

import pytest
from PIL import Image

from encoders.standins.synthetic_faces import synthetic_face
from tests.helpers import consent_doc
from web.cli.main import main


@pytest.fixture(scope="module")
def kinds_models(tmp_path_factory):
    """The tiny buffalo_l and antelopev2 packs and CLIP ViT-H/14 tower in one models folder."""
    from encoders.standins.face_pack import write_tiny_face_pack
    from encoders.standins.id_models import write_tiny_clip_vision

    root = tmp_path_factory.mktemp("cli_kinds_models")
    write_tiny_face_pack(root / "models" / "buffalo_l")
    write_tiny_face_pack(root / "models" / "antelopev2", pack="antelopev2")
    write_tiny_clip_vision(root / "clip-vit-h-14", seed=5)
    return root


@pytest.fixture
def cli(tmp_path, capsys, kinds_models, monkeypatch):
    monkeypatch.setenv("IDVAULT_MODELS", str(kinds_models))
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
        for i in range(4):
            Image.fromarray(synthetic_face(person, i)).save(tmp_path / f"p{person}_{i}.png")
    run.dir = tmp_path  # type: ignore[attr-defined]
    return run


def test_enroll_computes_faceid_and_instantid(cli):
    d = cli.dir
    doc = json.loads(cli("enroll", "smiths/ana", str(d / "p1_0.png"), str(d / "p1_1.png"),
                         "--consent", str(d / "c.json"), "--kinds", "face,faceid,instantid",
                         "--json")[0])
    kinds = {a["kind"]: a["model_id"] for a in doc["artifacts"]}
    assert list(kinds) == ["face", "faceid", "instantid"]
    assert kinds["faceid"].startswith("clip-vit-h-14@") and kinds["faceid"].endswith(
        "+" + kinds["face"])
    assert kinds["instantid"].startswith("antelopev2/glintr100.onnx@")
    shown = json.loads(cli("identity", "show", "smiths/ana", "--json")[0])
    shapes = {a["kind"]: a["shapes"] for a in shown["artifacts"]}
    assert shapes["instantid"]["embeddings"] == [2, 512]
    assert shapes["faceid"]["normed"] == [2, 512]


def test_add_kinds_later_without_and_with_photos(cli):
    d = cli.dir
    cli("enroll", "smiths/ana", str(d / "p1_0.png"), str(d / "p1_1.png"), "--consent",
        str(d / "c.json"))
    _, err = cli("add-kinds", "smiths/ana", "--kinds", "faceid", code=8)
    assert "vault keeps no photos" in err and "idvault add-kinds smiths/ana PHOTO..." in err
    _, err = cli("add-kinds", "smiths/ana", str(d / "p2_0.png"), "--kinds", "faceid", code=8)
    assert "p2_0.png: does not look like smiths/ana" in err
    out, _ = cli("add-kinds", "smiths/ana", str(d / "p1_2.png"), str(d / "p1_3.png"),
                 "--kinds", "faceid,instantid")
    assert out.startswith("added to smiths/ana: faceid, instantid (from 2 photo(s))")
    assert "p1_3.png" in out and "similarity" in out
    out, _ = cli("add-kinds", "smiths/ana", "--kinds", "faceid")
    assert out.startswith("unchanged: smiths/ana already holds faceid")
    _, err = cli("add-kinds", "smiths/ana", str(d / "p1_2.png"), "--kinds", "faceid", code=7)
    assert "already holds faceid" in err and "--replace" in err
    doc = json.loads(cli("add-kinds", "smiths/ana", str(d / "p1_2.png"), "--kinds", "faceid",
                         "--replace", "--json")[0])
    assert doc["status"] == "added" and doc["artifacts"][0]["replaced"]
    log = cli("audit", "log", "--json")[0]
    assert "kinds_added" in log


def test_add_kinds_with_a_missing_model_names_it(cli, tmp_path):
    d = cli.dir
    cli("enroll", "smiths/ana", str(d / "p1_0.png"), "--consent", str(d / "c.json"))
    only_face = tmp_path / "only-face"
    from encoders.standins.face_pack import write_tiny_face_pack

    write_tiny_face_pack(only_face / "models" / "buffalo_l")
    _, err = cli("add-kinds", "smiths/ana", str(d / "p1_1.png"), "--kinds", "instantid",
                 "--models", str(only_face), code=9)
    assert "glintr100.onnx" in err and str(only_face / "models" / "antelopev2") in err
