"""``idvault demo``: the main job end to end on a throwaway vault, offline.

Writes the tiny stand-in models (no real likeness: the detector finds only
drawn synthetic faces), draws a few synthetic people, and narrates: init,
owners, enrollment with consent, a duplicate caught, a twin pair held for
review and accepted, lookups by handle, 1:1 verification and 1:N search, key
rotation, consent withdrawal and erasure with signed receipts, an audit check,
and a two-person scene generated from handles with the tiny SDXL stand-in
(noise, no likeness), signed and verified. A temporary folder (a few hundred MB
of stand-ins) is removed at the end unless ``--keep``; one the user named is kept.

:func:`write_sample_photos` draws the same synthetic people for ``idvault models tiny
DIR --photos PHOTOS``, the README's stand-in run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
import tempfile
from pathlib import Path

import click

from vault.config import Settings
from vault.consent import ConsentRequest
from vault.errors import DuplicateIdentity
from vault.private_files import open_private, private_dir, write_private
from vault.vault import Vault

PEOPLE = {"ana": 1, "ben": 2, "cleo": 3}
TWIN = ("dan", 4, (3, 0.4))  # Dan shares 40% of Cleo's look: a twin, not a duplicate
SCENE = (("eve", 5), ("finn", 6))  # the two people of the generated scene


def _consent_doc(subject: str, guardian: str | None = None) -> dict:
    """A consent record of a synthetic person (docs/consent.md), valid for three years."""
    return {
        "subject": subject, "given_by": "guardian" if guardian else "self",
        **({"guardian_name": guardian} if guardian else {}),
        "purposes": ["enroll", "generate"],
        "retain_until": (dt.date.today() + dt.timedelta(days=3 * 365)).isoformat(),
        "evidence_sha256": hashlib.sha256(f"signed form of {subject}".encode()).hexdigest(),
    }


def _consent(subject: str, guardian: str | None = None) -> ConsentRequest:
    return ConsentRequest.from_dict(_consent_doc(subject, guardian))


def step(n: int, text: str) -> None:
    click.secho(f"\n[{n}] {text}", bold=True)


def _photos(folder: Path, name: str, person: int, n: int, start: int = 0,
            kin: tuple[int, float] | None = None) -> list[Path]:
    from PIL import Image

    from encoders.standins.synthetic_faces import synthetic_face

    paths = []
    for i in range(start, start + n):
        path = folder / f"{name}_{i}.png"
        with open_private(path) as f:
            Image.fromarray(synthetic_face(person, i, kin=kin)).save(f, format="PNG")
        paths.append(path)
    return paths


# The people of `idvault models tiny DIR --photos PHOTOS` (README "Then try it for real").
SAMPLE_PEOPLE = {"ana": PEOPLE["ana"], "ben": PEOPLE["ben"]}
SAMPLE_PHOTOS = 3


def write_sample_photos(folder: Path) -> list[Path]:
    """Synthetic photos of :data:`SAMPLE_PEOPLE` (NAME1.png ...) and each one's consent file
    (NAME-consent.json) in ``folder``; the paths written. Only the tiny stand-in face models
    find these faces; they carry no real likeness."""
    import json

    from PIL import Image

    from encoders.standins.synthetic_faces import synthetic_face

    private_dir(folder)
    written = []
    for name, person in SAMPLE_PEOPLE.items():
        for i in range(1, SAMPLE_PHOTOS + 1):
            path = folder / f"{name}{i}.png"
            with open_private(path) as f:
                Image.fromarray(synthetic_face(person, i)).save(f, format="PNG")
            written.append(path)
        path = folder / f"{name}-consent.json"
        write_private(path, (json.dumps(_consent_doc(f"{name.title()} Smith"), indent=2)
                             + "\n").encode())
        written.append(path)
    return written


def run_demo(data_dir: Path | None = None, keep: bool = False) -> None:
    """Narrate the demo in ``data_dir``, or in a new temporary folder that is removed at the
    end (also on an error or Ctrl-C) unless ``keep``. A folder the user named is theirs: it
    is always kept."""
    temporary = data_dir is None
    data_dir = data_dir or Path(tempfile.mkdtemp(prefix="idvault-demo-"))
    remove = temporary and not keep
    try:
        _narrate(data_dir)
    except BaseException:
        if remove:
            _remove(data_dir)
        raise
    if remove:
        click.secho("\ndone.", fg="green")
        _remove(data_dir)
        return
    models, photos = data_dir / "models", data_dir / "photos"
    click.secho(f"\ndone. Try the CLI on it:\n  export IDVAULT_DATA_DIR={data_dir / 'vault'} "
                f"IDVAULT_MODELS={models}\n  idvault identity list\n  idvault verify-face "
                f"smiths/cleo {photos / 'cleo_0.png'}\n  idvault verify "
                f"{data_dir / 'scene.png'}", fg="green")
    if temporary:
        click.echo(f"kept {data_dir}; delete it when done (`rm -r {data_dir}`)")


def _remove(folder: Path) -> None:
    """Delete the temporary demo folder (a few hundred MB of stand-in models) and say so."""
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
    shutil.rmtree(folder, ignore_errors=True)
    if folder.exists():
        click.echo(f"could not remove all of the demo folder {folder}; delete it by hand")
    else:
        click.echo(f"removed the demo folder {folder} ({size / 1e6:.0f} MB); "
                   "`idvault demo --keep` keeps it to try the CLI on")


def _narrate(data_dir: Path) -> None:
    from encoders.enrollment import Enroller
    from encoders.face.analyzer import FaceAnalyzer
    from encoders.standins.face_pack import write_tiny_face_pack

    models, photos = data_dir / "models", data_dir / "photos"
    private_dir(photos)

    step(1, f"offline models and synthetic people in {data_dir}")
    write_tiny_face_pack(models / "models" / "buffalo_l")
    click.echo("    tiny buffalo_l-layout face pack: stand-ins with NO real likeness; they "
               "detect only drawn synthetic faces")

    step(2, "init a vault (SQLite + separate key store + key file 0600), two owners")
    vault = Vault.init(Settings(data_dir=data_dir / "vault"), actor="demo")
    vault.add_owner("smiths", "family", actor="demo")
    vault.add_owner("northlight", "studio", erase_policy="retain", actor="demo")
    enroller = Enroller(vault, FaceAnalyzer.from_models_dir(models))
    click.echo(f"    vault {vault.vault_id}; face model {enroller.model_id}")

    step(3, "enroll the Smiths from photos, with consent (Ana's given by her guardian)")
    for name, person in PEOPLE.items():
        guardian = "Maria Smith" if name == "ana" else None
        report = enroller.enroll(f"smiths/{name}", _photos(photos, name, person, 3),
                                 consent=_consent(f"{name.title()} Smith", guardian),
                                 actor="demo")
        scores = ", ".join(f"{p.det_score:.2f}" for p in report.photos)
        click.echo(f"    {report.handle:<12} {len(report.photos)} photos (detector {scores}), "
                   f"face artifact sealed under its own key")

    step(4, "someone enrolls Ana again as 'annie': caught as a duplicate")
    try:
        enroller.enroll("smiths/annie", _photos(photos, "annie", PEOPLE["ana"], 2, start=10),
                        consent=_consent("Annie"), actor="demo")
    except DuplicateIdentity as exc:
        click.echo(f"    refused: {exc}")

    step(5, "Dan is Cleo's twin: held for review, then accepted as a different person")
    name, person, kin = TWIN
    held = enroller.enroll(f"smiths/{name}", _photos(photos, name, person, 3, kin=kin),
                           consent=_consent("Dan Smith"), actor="demo")
    m = held.top_match
    click.echo(f"    {held.status}: resembles {m['handle']} (similarity {m['score']:.3f}, "
               f"review band) -> review #{held.review_id}")
    vault.decide_review(held.review_id, accept=True, actor="demo")
    click.echo("    accepted: smiths/dan is active; the pair is never flagged again")

    step(6, "look identities up by handle; decrypt for generation (consent-checked, audited)")
    for handle in ("smiths/ana", "smiths/dan"):
        doc = vault.describe(handle)
        click.echo(f"    @{handle}: {doc['status']}, consent {doc['consent']['status']} "
                   f"({', '.join(doc['consent']['purposes'])})")
    opened = vault.get_artifact("smiths/ana", "face", purpose="generate", actor="demo")
    click.echo(f"    @smiths/ana face artifact -> {opened.artifact.shapes}")

    step(7, "1:1 verification and 1:N search with new photos")
    [new_ana] = _photos(photos, "ana_new", PEOPLE["ana"], 1, start=20)
    [new_ben] = _photos(photos, "ben_new", PEOPLE["ben"], 1, start=20)
    for photo in (new_ana, new_ben):
        v = enroller.verify("smiths/ana", photo, actor="demo")
        click.echo(f"    {photo.name} vs smiths/ana: {v['decision']} (best {v['best']:.3f})")
    hits = enroller.search("smiths", new_ben, k=2)["matches"]
    click.echo("    search " + new_ben.name + ": " + ", ".join(
        f"{h['handle']} {h['score']:.3f} {h['decision']}" for h in hits))

    step(8, "rotate the key-encryption key: data keys re-wrapped, artifacts untouched")
    report = vault.rotate_keys(actor="demo")
    click.echo(f"    KEK v{report.to_version} active, {report.rewrapped} keys re-wrapped")

    step(9, "Ben withdraws consent: blocked at once and erased (family policy: immediate)")
    result = vault.withdraw_consent("smiths/ben", reason="changed his mind", actor="demo")
    click.echo(f"    erased; receipt signed {result['receipt']['signature']['alg']}, data key "
               f"shredded: {result['receipt']['receipt']['data_key']['shredded']}")

    step(10, "erase Ana on request; verify the signed receipt; search no longer finds her")
    receipt = vault.delete_identity("smiths/ana", actor="demo")
    checked = vault.verify_receipt(receipt)
    click.echo(f"    receipt verified: {checked['handle']} erased at {checked['erased_at']}")
    hits = enroller.search("smiths", new_ana, k=1)["matches"]
    click.echo(f"    search {new_ana.name}: closest is now "
               f"{hits[0]['handle']} ({hits[0]['decision']})")

    step(11, "verify the audit chain")
    res = vault.verify_audit()
    click.echo(f"    {res.events} events, chain intact: {res.ok}")

    step(12, "a two-person scene from handles, signed (tiny SDXL stand-in: noise, no likeness)")
    _two_person_scene(vault, enroller, models, photos, data_dir)
    vault.dispose()


def _two_person_scene(vault: Vault, enroller, models: Path, photos: Path, data_dir: Path) -> None:
    """Enroll two people with their PhotoMaker and StoryMaker artifacts, compose them into one
    image by handle (regional attention keeps each in their half), sign and verify it."""
    from encoders.enrollment import Enroller
    from generators.compose import ComposePipeline
    from generators.provenance import verify_image
    from generators.standins.generation import write_tiny_generation_models

    write_tiny_generation_models(models)
    click.echo("    tiny sdxl-tiny base model and PhotoMaker/StoryMaker stand-ins written")
    generating = Enroller(vault, enroller.analyzer, models)
    for name, person in SCENE:
        report = generating.enroll(f"smiths/{name}", _photos(photos, name, person, 2),
                                   consent=_consent(f"{name.title()} Smith"),
                                   kinds=("face", "photomaker", "storymaker"), actor="demo")
        click.echo(f"    {report.handle:<12} enrolled with "
                   + ", ".join(a.kind for a in report.artifacts))
    pipe = ComposePipeline.from_pretrained(None, vault=vault, models_dir=models)
    prompt = "@smiths/eve:girl and @smiths/finn:boy on a beach, watercolor"
    result = pipe(prompt, owner="smiths", seed=7, steps=4, size=(128, 64), actor="demo")
    path = data_dir / "scene.png"
    result.save(path)
    used = ", ".join(f"@{h} via {m}" for h, m in result.methods.items())
    click.echo(f"    {prompt!r}\n    -> {path.name} ({used}; auto layout: left and right "
               f"halves) in {result.timings['total']:.1f} s")
    check = verify_image(vault, path)
    click.echo(f"    idvault verify: {check.status}; manifest names "
               + ", ".join(i["handle"] for i in check.manifest["identities"])
               + f", base model {check.manifest['base_model']}")
    res = vault.verify_audit()
    click.echo(f"    one 'generate' audit event per identity; {res.events} events, chain intact: "
               f"{res.ok}")
