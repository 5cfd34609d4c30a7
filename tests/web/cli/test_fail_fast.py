"""Errors that need no model arrive before torch is imported: generate, personalize, enroll.

Each case runs ``idvault ...`` in a fresh interpreter (the test process has imported
torch long ago) and reads that interpreter's ``sys.modules`` when the command returns:
a handle, consent, artifact, output-path, base-model-folder, kind or photo error must
leave the whole ML stack unimported, and say what is wrong with the right exit code.
A control case that gets past every check shows the probe does see torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from tests.helpers import consent_doc
from tests.web.test_imports import ML_STACK, ROOT

PROBE = textwrap.dedent(f"""
    import json, sys
    from web.cli.main import main

    rc = main(sys.argv[1:])
    ml = sorted({{m.split(".")[0] for m in sys.modules}} & set({ML_STACK!r}))
    print(json.dumps({{"rc": rc, "ml": ml}}))
""")


def idvault(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str], str]:
    """Run ``idvault ARGS`` in a fresh interpreter: (exit code, ML modules imported, stderr)."""
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "Traceback" not in out.stderr
    return result["rc"], result["ml"], out.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A vault with owners smiths and jones; smiths/ana (consent: enroll, generate) and
    jones/bo exist without artifacts; smiths/cy is held for review. A photo, a file that is
    not one, an empty models folder and a folder that is no diffusers pipeline."""
    from vault import identities
    from vault.config import Settings
    from vault.consent import ConsentRequest
    from vault.vault import Vault

    d = tmp_path_factory.mktemp("fail-fast")
    vault = Vault.init(Settings(data_dir=d / "vault"), actor="test")
    vault.add_owner("smiths", "family", actor="test")
    vault.add_owner("jones", "family", actor="test")
    for handle in ("smiths/ana", "smiths/cy", "jones/bo"):
        vault.create_identity(handle, ConsentRequest.from_dict(consent_doc()), actor="test")
    with vault.session() as s:  # held without a review: resealed, as idvault would
        cy = identities.get_identity(s, "smiths/cy")
        cy.status = "held"
        vault._reseal(s, cy)
    vault.dispose()
    (d / "consent.json").write_text(json.dumps(consent_doc()))
    Image.new("RGB", (64, 64), (120, 90, 70)).save(d / "photo.png")
    (d / "notes.jpg").write_text("not a photo")
    (d / "models").mkdir()
    (d / "not-a-pipeline").mkdir()
    (d / "out").mkdir()
    return {"dir": d, "data": ["--data-dir", str(d / "vault")],
            "env": {"IDVAULT_MODELS": str(d / "models")}}


def _fast(world, *args: str, code: int, says: tuple[str, ...]) -> None:
    rc, ml, err = idvault(*args, *world["data"], env=world["env"])
    assert rc == code, f"exit {rc} (wanted {code}): {err}"
    for text in says:
        assert text in err, f"{text!r} not in: {err}"
    assert ml == [], f"imported {ml} before reporting: {err}"


# -- generate ------------------------------------------------------------------------------
GENERATE = [
    # (extra args, prompt, exit code, what stderr says)
    ((), "@smiths/nobody reading", 6, ("no identity smiths/nobody",)),
    (("--owner", "smiths"), "@jones/bo reading", 6, ("no identity jones/bo",)),
    ((), "@smiths/cy reading", 7, ("smiths/cy is held for review",)),
    (("--commercial",), "@smiths/ana reading", 5, ("smiths/ana", "commercial")),
    ((), "@smiths/ana reading", 8, ("smiths/ana cannot be generated with any method",
                                    "add-kinds smiths/ana")),
    (("--method", "photomaker"), "@smiths/ana reading", 8,
     ("smiths/ana has no photomaker artifact (enroll with --kinds photomaker)",)),
    (("--method", "@smiths/ana=lidb"), "@smiths/ana reading", 8,
     ("smiths/ana has no lidb artifact (fit one with `idvault personalize smiths/ana",)),
    (("--method", "@smiths/ben=faceid"), "@smiths/ana reading", 8,
     ("methods given for identities the prompt does not mention: smiths/ben",)),
    ((), "@smiths/ reading", 8, ("smiths/",)),
    ((), "a lighthouse at dusk", 9, ("no SDXL base model given", "models folder")),
    (("--base-model", "/nonexistent/sdxl/folder"), "a lighthouse at dusk", 9,
     ("no such folder",)),
    (("--base-model", "NOT_A_PIPELINE"), "a lighthouse at dusk", 9,
     ("not a diffusers pipeline folder",)),
]


@pytest.mark.parametrize(("extra", "prompt", "code", "says"), GENERATE)
def test_generate_reports_before_importing_torch(world, extra, prompt, code, says) -> None:
    d = world["dir"]
    extra = tuple(str(d / "not-a-pipeline") if a == "NOT_A_PIPELINE" else a for a in extra)
    _fast(world, "generate", prompt, "-o", str(d / "out" / "x.png"), *extra, code=code,
          says=says)


def test_generate_refuses_an_output_it_cannot_write_before_importing_torch(world) -> None:
    d = world["dir"]
    _fast(world, "generate", "@smiths/nobody", "-o", str(d / "missing" / "x.png"), code=8,
          says=(f"{d / 'missing'} is not a folder",))
    # A path under a file: its parent is no folder either.
    _fast(world, "generate", "@smiths/ana", "-o", str(d / "photo.png" / "x.png"), code=8,
          says=("is not a folder",))


def test_the_probe_sees_torch_once_a_command_gets_to_model_work(world) -> None:
    # Past every check (no identity, a folder that claims to be a pipeline): loading fails,
    # but only after torch was imported -- so the empty lists above are not vacuous.
    d = world["dir"]
    fake = d / "fake-sdxl"
    fake.mkdir(exist_ok=True)
    (fake / "model_index.json").write_text("{}")
    rc, ml, err = idvault("generate", "a lighthouse", "-o", str(d / "out" / "y.png"),
                          "--base-model", str(fake), *world["data"], env=world["env"])
    assert rc == 9, err
    assert "torch" in ml
    assert not (d / "out" / "y.png").exists()


# -- personalize ---------------------------------------------------------------------------
def _personalize(world, handle: str, *, kind: str = "lidb", photo: str = "photo.png",
                 base: str = "not-a-pipeline") -> list[str]:
    d = world["dir"]
    return ["personalize", handle, "--kind", kind, "--photos", str(d / photo),
            "--base-model", str(d / base)]


def test_personalize_reports_before_importing_torch(world) -> None:
    d = world["dir"]
    pipeline = d / "pipeline-folder"
    pipeline.mkdir(exist_ok=True)
    (pipeline / "model_index.json").write_text("{}")
    _fast(world, *_personalize(world, "smiths/nobody"), code=6,
          says=("no identity smiths/nobody",))
    _fast(world, *_personalize(world, "smiths/cy"), code=7, says=("held for review",))
    # ana's consent grants enroll and generate, not personalize.
    _fast(world, *_personalize(world, "smiths/ana", base="pipeline-folder"), code=5,
          says=("smiths/ana", "personalize"))


def test_personalize_checks_photos_and_base_model_before_importing_torch(tmp_path) -> None:
    # An identity whose consent grants personalize, in a vault of its own.
    from vault.config import Settings
    from vault.consent import ConsentRequest
    from vault.vault import Vault

    vault = Vault.init(Settings(data_dir=tmp_path / "vault"), actor="test")
    vault.add_owner("smiths", "family", actor="test")
    doc = consent_doc(purposes=["enroll", "generate", "personalize"])
    vault.create_identity("smiths/ana", ConsentRequest.from_dict(doc), actor="test")
    vault.dispose()
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    (tmp_path / "notes.jpg").write_text("not a photo")
    (tmp_path / "not-a-pipeline").mkdir()
    (tmp_path / "pipeline-folder").mkdir()
    (tmp_path / "pipeline-folder" / "model_index.json").write_text("{}")
    world = {"dir": tmp_path, "data": ["--data-dir", str(tmp_path / "vault")], "env": {}}
    _fast(world, *_personalize(world, "smiths/ana", photo="notes.jpg", base="pipeline-folder"),
          code=8, says=("notes.jpg",))
    _fast(world, *_personalize(world, "smiths/ana"), code=9,
          says=("not a diffusers pipeline folder",))
    # Celeb Basis starts from the face artifact, which ana (created, never enrolled) lacks.
    _fast(world, *_personalize(world, "smiths/ana", kind="celeb_basis",
                               base="pipeline-folder"), code=6,
          says=("smiths/ana has no face artifact",))


# -- enroll --------------------------------------------------------------------------------
def test_enroll_reports_before_importing_torch(world) -> None:
    d = world["dir"]
    photo, consent = str(d / "photo.png"), str(d / "consent.json")
    _fast(world, "enroll", "smiths/dee", photo, code=8,
          says=("smiths/dee is a new identity: enrolling it needs a consent record",))
    _fast(world, "enroll", "smiths/ana", photo, "--consent", consent, code=8,
          says=("smiths/ana already exists", "omit --consent"))
    _fast(world, "enroll", "nobody/dee", photo, "--consent", consent, code=6,
          says=("no owner 'nobody'",))
    _fast(world, "enroll", "smiths/cy", photo, code=7, says=("smiths/cy is held for review",))
    _fast(world, "enroll", "smiths/dee", photo, "--consent", consent, "--kinds",
          "face,photomakr", code=8, says=("enrollment computes these kinds", "photomakr"))
    # Every unreadable photo in one error, as the face analysis lists its rejections.
    (d / "empty.png").write_bytes(b"")
    _fast(world, "enroll", "smiths/dee", str(d / "notes.jpg"), photo, str(d / "empty.png"),
          "--consent", consent, code=8,
          says=("2 of 3 photos rejected (nothing was stored)", "notes.jpg", "empty.png"))


def test_enroll_checks_an_existing_identitys_consent_before_importing_torch(tmp_path) -> None:
    from vault.config import Settings
    from vault.consent import ConsentRequest
    from vault.vault import Vault

    vault = Vault.init(Settings(data_dir=tmp_path / "vault"), actor="test")
    # "retain": the withdrawn identity stays (as a record) instead of being erased at once.
    vault.add_owner("smiths", "family", erase_policy="retain", actor="test")
    vault.create_identity("smiths/ana", ConsentRequest.from_dict(consent_doc()), actor="test")
    vault.withdraw_consent("smiths/ana", actor="test")
    vault.dispose()
    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    world = {"dir": tmp_path, "data": ["--data-dir", str(tmp_path / "vault")], "env": {}}
    _fast(world, "enroll", "smiths/ana", str(tmp_path / "photo.png"), code=5,
          says=("smiths/ana", "withdrawn"))


def test_method_kinds_match_the_registered_methods() -> None:
    # generators.preflight names each method's artifact kind without importing the methods.
    from generators.methods import METHODS
    from generators.preflight import METHOD_KINDS

    assert METHOD_KINDS == {name: cls.artifact_kind for name, cls in METHODS.items()}
