"""idvault generate and idvault verify, end to end with the tiny stand-in models.

The real workflow: `models tiny` writes the face pack, the identity
checkpoints and `sdxl-tiny`; two synthetic people are enrolled with their
PhotoMaker and StoryMaker artifacts; a two-person scene is generated and its
provenance verified, then tampered with; consent withdrawal stops the next
generation. The stand-ins make noise, not pictures.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image, PngImagePlugin

from encoders.standins.synthetic_faces import synthetic_face
from tests.helpers import consent_doc
from web.cli.main import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-models")
    assert main(["models", "tiny", str(root)]) == 0
    return root


@pytest.fixture
def cli(tmp_path, capsys, models, monkeypatch):
    monkeypatch.setenv("IDVAULT_MODELS", str(models))
    data = str(tmp_path / "vault")

    def run(*args: str, code: int = 0):
        rc = main([*args, "--data-dir", data])
        out, err = capsys.readouterr()
        assert rc == code, f"exit {rc} (wanted {code}); stdout: {out}; stderr: {err}"
        assert "Traceback" not in err
        return out, err

    capsys.readouterr()
    run("init")
    run("owner", "add", "northlight", "--kind", "studio", "--erase-policy", "retain")
    (tmp_path / "c.json").write_text(json.dumps(consent_doc()))
    run.dir = tmp_path  # type: ignore[attr-defined]
    return run


def _enroll(cli, handle: str, person: int) -> None:
    d = cli.dir
    photos = []
    for i in range(2):
        path = d / f"{handle.replace('/', '_')}_{i}.png"
        Image.fromarray(synthetic_face(person, i)).save(path)
        photos.append(str(path))
    out, _ = cli("enroll", handle, *photos, "--consent", str(d / "c.json"),
                 "--kinds", "face,photomaker,storymaker")
    assert "photomaker, storymaker" in out


def test_generate_verify_tamper_withdraw(cli) -> None:
    d = cli.dir
    _enroll(cli, "northlight/ana", 1)
    _enroll(cli, "northlight/ben", 2)
    out, err = cli("generate", "@northlight/ana:girl and @northlight/ben on a beach, watercolor",
                   "--seed", "7", "--steps", "2", "--size", "128x64",
                   "--layout", "ana=0,0,0.5,1;ben=0.5,0,1,1", "-o", str(d / "beach.png"))
    assert out.startswith(f"wrote {d / 'beach.png'} (128x64, seed 7, 2 steps")
    assert "@northlight/ana via photomaker, @northlight/ben via photomaker" in out
    with Image.open(d / "beach.png") as img:
        assert img.size == (128, 64)

    out, _ = cli("verify", str(d / "beach.png"))
    assert "valid, signed by this vault" in out
    assert "northlight/ana via photomaker" in out and "northlight/ben via photomaker" in out
    assert "seed 7, 2 steps, 128x64" in out and "sdxl-tiny@" in out

    doc = json.loads(cli("generate", "@northlight/ben by the sea", "--seed", "8", "--steps", "1",
                         "--method", "storymaker", "-o", str(d / "ben.png"), "--json")[0])
    assert doc["methods"] == {"northlight/ben": "storymaker"}
    assert doc["manifest"]["adapters"][0].startswith("storymaker/mask.bin@")
    assert set(doc["timings"]) >= {"resolve", "denoise", "total"}

    # One changed pixel: altered, exit 3, the claim still shown as unverified.
    with Image.open(d / "beach.png") as png:
        img, text = png.copy(), dict(png.text)
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    img.putpixel((0, 0), tuple((c + 9) % 256 for c in img.getpixel((0, 0))))
    img.save(d / "edited.png", pnginfo=info)
    out, err = cli("verify", str(d / "edited.png"), code=3)
    assert "pixels were changed" in err and "unverified claim: northlight/ana" in out
    doc = json.loads(cli("verify", str(d / "edited.png"), "--json", code=3)[0])
    assert doc["status"] == "altered" and doc["reason"] == "pixels_changed"
    Image.new("RGB", (8, 8)).save(d / "plain.png")
    _, err = cli("verify", str(d / "plain.png"), code=3)
    assert "no idvault provenance manifest" in err

    # Withdrawn consent: refused at once (exit 5), nothing written.
    cli("consent", "withdraw", "northlight/ben")
    _, err = cli("generate", "@northlight/ben at night", "--steps", "1",
                 "-o", str(d / "late.png"), code=5)
    assert "northlight/ben" in err and not (d / "late.png").exists()
    # Scoped to another owner: the handle does not exist for it.
    _, err = cli("generate", "@northlight/ana at night", "--owner", "smiths", "--steps", "1",
                 "-o", str(d / "late.png"), code=6)
    assert "no identity northlight/ana" in err


def test_generate_usage_and_model_errors(cli, tmp_path) -> None:
    d = cli.dir
    _, err = cli("generate", "a beach", "--size", "big", "-o", str(d / "x.png"), code=2)
    assert "WIDTHxHEIGHT" in err
    _, err = cli("generate", "a beach", "--size", "100x64", "-o", str(d / "x.png"), code=8)
    assert "multiples of 8" in err
    _, err = cli("generate", "a beach", "--models", str(tmp_path / "empty"),
                 "-o", str(d / "x.png"), code=9)
    assert "no SDXL base model" in err and "idvault models tiny" in err
    _, err = cli("generate", "a beach", "--base-model", str(tmp_path), "-o", str(d / "x.png"),
                 code=9)
    assert "model_index.json" in err


def test_four_identities_with_mixed_methods(cli) -> None:
    """Issue 15: four people in one image from the command line, the two adapters among
    them, each named in the signed provenance; bad --method values fail before any work."""
    d = cli.dir
    methods = {"northlight/ana": "photomaker", "northlight/ben": "storymaker",
               "northlight/cai": "faceid", "northlight/dee": "instantid"}
    for person, (handle, method) in enumerate(methods.items(), 1):
        photos = []
        for i in range(2):
            path = d / f"{handle.replace('/', '_')}_{i}.png"
            Image.fromarray(synthetic_face(person, i)).save(path)
            photos.append(str(path))
        out, _ = cli("enroll", handle, *photos, "--consent", str(d / "c.json"),
                     "--kinds", f"face,{method}")
        assert method in out
    prompt = ("@northlight/ana:girl, @northlight/ben:man, @northlight/cai:woman and "
              "@northlight/dee:boy at a picnic")
    flags = [f"--method=@{h}={m}" for h, m in methods.items()]
    for bad, needle in ((["--method", "@northlight/ana=dreambooth"], "expected @owner/name="),
                        (["--method", "faceid", "--method", "@northlight/ana=faceid"],
                         "not both"),
                        (["--method", "@northlight/zed=faceid"], "does not mention")):
        _, err = cli("generate", prompt, *bad, "--steps", "1", "-o", str(d / "x.png"), code=8)
        assert needle in err, err
    assert not (d / "x.png").exists()
    doc = json.loads(cli("generate", prompt, *flags, "--seed", "3", "--steps", "2",
                         "--size", "128x64", "-o", str(d / "picnic.png"), "--json")[0])
    assert doc["methods"] == methods
    out, _ = cli("verify", str(d / "picnic.png"))
    assert "valid, signed by this vault" in out
    for handle, method in methods.items():
        assert f"{handle} via {method}" in out
    adapters = " ".join(doc["manifest"]["adapters"])
    for needle in ("photomaker-v2", "storymaker/mask.bin@", "ip-adapter-faceid-plusv2_sdxl.bin",
                   "ControlNetModel"):
        assert needle in adapters, adapters
