"""``idvault`` commands that look at faces: enroll, add-kinds, review, verify-face, search,
models.

They need the ML extra (insightface, onnxruntime, opencv); imports happen
inside the commands so the rest of the CLI works without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from vault import errors
from vault.config import Settings
from web.cli.common import Group, emit, open_vault, vault_options
from web.cli.progress import Phase, Progress, progress_option

MODELS_HELP = ("Folder of model files [env IDVAULT_MODELS; default: ~/.insightface, "
               "insightface's own]. A face pack may sit directly in it, in DIR/PACK/ or in "
               "DIR/models/PACK/.")
EXIT_DIFFERENT = 11


def _models_options(fn):
    fn = click.option("--pack", default="buffalo_l", show_default=True,
                      help="Face model pack name (buffalo_l, antelopev2).")(fn)
    fn = click.option("--models", "models_dir", type=click.Path(path_type=Path),
                      default=None, help=MODELS_HELP)(fn)
    return fn


def _pick(value: str | None):
    if value is None or value == "largest":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter("use 'largest' or a face index (0 = leftmost)") from None


PICK_HELP = ("When a photo shows several usable faces, which one: 'largest' or an index "
             "(0 = leftmost). Default: refuse such photos.")


def _enroller(vault, models_dir: Path | None, pack: str):
    from encoders.enrollment import Enroller
    from encoders.face.analyzer import FaceAnalyzer

    return Enroller(vault, FaceAnalyzer.from_models_dir(models_dir, pack=pack), models_dir)


def _masks(pairs: tuple[str, ...]) -> dict:
    """``PHOTO=MASK`` options -> {photo name: (H, W) uint8 mask}."""
    from encoders.photo import load_photo

    masks = {}
    for pair in pairs:
        photo, sep, mask = pair.partition("=")
        if not sep or not photo or not mask:
            raise click.BadParameter(f"{pair!r}: use PHOTO=MASK_FILE", param_hint="--mask")
        rgb = load_photo(Path(mask), name=Path(mask).name)
        masks[Path(photo).name] = rgb.max(axis=2)  # (H, W): white = person
    return masks


def _progress(report: Progress):
    """The enroller's ``progress(stage, done, total)`` as one reported phase per stage."""
    phases: dict[str, Phase] = {}

    def update(stage: str, done: int, total: int) -> None:
        phase = phases.get(stage)
        if phase is None:
            for earlier in phases.values():
                earlier.close()  # a new stage: the one before it is over
            phase = phases[stage] = report.phase(
                stage, start=stage, done=f"{stage}: done",
                unit="photo" if "photo" in stage else "step")
        phase(done, total)

    def close(completed: bool = True) -> None:
        for phase in phases.values():
            phase.close(completed=completed)

    update.close = close  # type: ignore[attr-defined]
    return update


def _load_enroller(report: Progress, vault, models_dir: Path | None, pack: str):
    report.say(f"loading face models ({pack})...")
    return _enroller(vault, models_dir, pack)


MASK_HELP = ("Person mask (white = person) for a photo, for StoryMaker's character crop; "
             "that photo becomes the reference. Repeatable.")
CLOTH_HELP = "A clothing image to use instead of the character crop (StoryMaker)."


def _kinds(value: str) -> list[str]:
    return [k.strip() for k in value.split(",") if k.strip()]


def _enroll_kinds(value: str) -> list[str]:
    """``--kinds`` of ``enroll``: face always comes first, named or not (as over the API)."""
    return ["face", *dict.fromkeys(k for k in _kinds(value) if k != "face")]


@click.command()
@click.argument("handle")
@click.argument("photos", nargs=-1, required=True,
                type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--consent", "consent_file", type=click.Path(path_type=Path, dir_okay=False),
              help="Consent record JSON; required for a new identity (docs/consent.md).")
@click.option("--kinds", default="face", show_default=True,
              help="Artifacts to compute, comma-separated: face (always), photomaker, "
                   "storymaker, faceid, instantid. The others need their models in --models "
                   "(faceid: clip-vit-h-14; instantid: the antelopev2 pack).")
@click.option("--mask", "mask_pairs", multiple=True, metavar="PHOTO=MASK", help=MASK_HELP)
@click.option("--cloth", "cloth_file", type=click.Path(path_type=Path, dir_okay=False,
                                                        exists=True), help=CLOTH_HELP)
@click.option("--pick", "pick", default=None, help=PICK_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_models_options
@progress_option("enroll")
@vault_options
def enroll(handle: str, photos: tuple[Path, ...], consent_file: Path | None, kinds: str,
           mask_pairs: tuple[str, ...], cloth_file: Path | None, pick: str | None,
           as_json: bool, models_dir: Path | None, pack: str, progress: Progress,
           settings: Settings) -> None:
    """Enroll HANDLE from PHOTOS: check, embed, dedupe, seal and store.

    The owner, the consent (a record for a new identity; `enroll` granted for
    an existing one), the kinds and that every photo is a readable image are
    checked before any model loads. Each photo must show exactly one usable
    face (or use --pick); if any photo is rejected nothing is stored and every
    rejected photo is listed. A face
    matching an existing identity above the block threshold is refused with
    exit code 10, naming the match; one in the review band is stored on hold
    (see `idvault review`). Enrolling an existing HANDLE adds the photos.

    \b
    Example (a new identity, with the artifacts PhotoMaker reads):
      idvault enroll smiths/ana ana1.jpg ana2.jpg ana3.jpg --consent ana-consent.json \\
          --kinds photomaker
    """
    from encoders.photo import load_photo
    from encoders.preflight import check_enrollment
    from vault.consent import ConsentRequest

    request = ConsentRequest.from_file(consent_file) if consent_file else None
    masks = _masks(mask_pairs)
    cloth = load_photo(cloth_file, name=cloth_file.name) if cloth_file else None
    with open_vault(settings) as vault:
        # What the vault would refuse when it stores, before any face model loads.
        check_enrollment(vault, handle, consent=request, photos=photos,
                         kinds=_enroll_kinds(kinds))
        enroller = _load_enroller(progress, vault, models_dir, pack)
        bar = _progress(progress)
        completed = False
        try:
            report = enroller.enroll(handle, list(photos), consent=request,
                                     kinds=_enroll_kinds(kinds),
                                     names=[p.name for p in photos], pick=_pick(pick),
                                     masks=masks, cloth=cloth, progress=bar)
            completed = True
        finally:
            bar.close(completed)
    doc = report.to_json()

    def text() -> str:
        verb = {"active": "enrolled", "updated": "added photos to",
                "held": "held for review:"}[report.status]
        kinds_done = ", ".join(a.kind for a in report.artifacts)
        lines = [f"{verb} {report.handle} ({len(report.photos)} photo(s); {kinds_done})"]
        for p in report.photos:
            lines.append(f"  {p.name:<28} face {p.face_index} of {p.faces_found}  "
                         f"score {p.det_score:.2f}  {p.face_px:.0f} px  sharpness {p.blur:.0f}")
        m = report.top_match
        if m:
            lines.append(f"  closest other identity: {m['handle']} (similarity "
                         f"{m['score']:.3f}: {m['decision']})")
        if report.status == "held":
            lines.append(f"  review #{report.review_id}: `idvault review accept "
                         f"{report.review_id}` if they are different people, else "
                         f"`idvault review reject {report.review_id}`")
        return "\n".join(lines)

    emit(doc, as_json, text)


@click.command("add-kinds")
@click.argument("handle")
@click.argument("photos", nargs=-1,
                type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--kinds", required=True,
              help="Artifacts to add, comma-separated: photomaker, storymaker, faceid, "
                   "instantid.")
@click.option("--replace", is_flag=True,
              help="Recompute a kind the identity already holds for the same model from "
                   "PHOTOS (default: refuse, exit 7).")
@click.option("--mask", "mask_pairs", multiple=True, metavar="PHOTO=MASK", help=MASK_HELP)
@click.option("--cloth", "cloth_file", type=click.Path(path_type=Path, dir_okay=False,
                                                        exists=True), help=CLOTH_HELP)
@click.option("--pick", "pick", default=None, help=PICK_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_models_options
@progress_option("add-kinds")
@vault_options
def add_kinds(handle: str, photos: tuple[Path, ...], kinds: str, replace: bool,
              mask_pairs: tuple[str, ...], cloth_file: Path | None, pick: str | None,
              as_json: bool, models_dir: Path | None, pack: str, progress: Progress,
              settings: Settings) -> None:
    """Add artifact kinds to the enrolled HANDLE, from PHOTOS where they are needed.

    Without PHOTOS, kinds HANDLE already holds are reported unchanged, and any
    other is refused (exit 8) with what it needs: the vault keeps no photos.
    PHOTOS must each show HANDLE (best similarity to its enrolled photos at
    least the review threshold; exit 8 otherwise, nothing stored); they are
    used for the new kinds only, not added to its face artifact and not kept.

    \b
    Example:
      idvault add-kinds smiths/ana ana1.jpg ana2.jpg --kinds faceid,instantid
    """
    from encoders.enrollment_kinds import add_kinds as add
    from encoders.enrollment_kinds import stored_kinds
    from encoders.photo import load_photo

    wanted = _kinds(kinds)
    with open_vault(settings) as vault:
        if not photos:
            if mask_pairs or cloth_file:
                raise errors.InvalidInput("--mask and --cloth go with PHOTOS")
            report = stored_kinds(vault, handle, wanted, replace=replace)
        else:
            masks = _masks(mask_pairs)
            cloth = load_photo(cloth_file, name=cloth_file.name) if cloth_file else None
            enroller = _load_enroller(progress, vault, models_dir, pack)
            bar = _progress(progress)
            completed = False
            try:
                report = add(enroller, handle, wanted, list(photos),
                             names=[p.name for p in photos], pick=_pick(pick), masks=masks,
                             cloth=cloth, replace=replace, progress=bar)
                completed = True
            finally:
                bar.close(completed)
    doc = report.to_json()

    def text() -> str:
        if report.status == "unchanged":
            return "\n".join([f"unchanged: {report.handle} already holds "
                               f"{', '.join(report.kinds)}"]
                              + [f"  {k:<12} {', '.join(m)}" for k, m in report.present.items()])
        lines = [f"added to {report.handle}: " + ", ".join(a.kind for a in report.artifacts)
                 + f" (from {len(report.photos)} photo(s))"]
        for p in report.photos:
            lines.append(f"  {p['photo']:<28} face {p['face']} of {p['faces_found']}  "
                         f"similarity {p['similarity']:.3f}")
        for a in report.artifacts:
            lines.append(f"  {a.kind:<12} {a.model_id}"
                         + (f"  (replaced {a.replaced})" if a.replaced else ""))
        return "\n".join(lines)

    emit(doc, as_json, text)


@click.group(cls=Group)
def review() -> None:
    """Enrollments held because they resemble an existing identity.

    \b
    Example:
      idvault review list smiths
    """


@review.command("list")
@click.argument("owner_name", metavar="[OWNER]", required=False)
@click.option("--status", type=click.Choice(["pending", "accepted", "rejected"]),
              default="pending", show_default=True, help="Which reviews to list.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@vault_options
def review_list(owner_name: str | None, status: str, as_json: bool, settings: Settings) -> None:
    """List reviews (pending by default).

    \b
    Example:
      idvault review list smiths --status accepted
    """
    with open_vault(settings, check_keys=False) as vault:
        rows = vault.list_reviews(owner_name, status=status)
    emit(rows, as_json, lambda: "\n".join(
        f"#{r['id']:<5} {r['handle']:<28} resembles {r['candidate']:<28} "
        f"score {r['score']:.3f}  {r['status']}" for r in rows) or f"no {status} reviews")


@review.command("accept")
@click.argument("review_id", type=int)
@vault_options
def review_accept(review_id: int, settings: Settings) -> None:
    """They are different people: activate the held identity, never flag the pair again.

    \b
    Example (review #3 shows twins):
      idvault review accept 3
    """
    with open_vault(settings) as vault:
        doc = vault.decide_review(review_id, accept=True)
    click.echo(f"accepted: {doc['handle']} is active; recorded as not the same person as "
               f"{doc['candidate']}")


@review.command("reject")
@click.argument("review_id", type=int)
@vault_options
def review_reject(review_id: int, settings: Settings) -> None:
    """Same person (a duplicate): erase the held identity; prints the signed receipt.

    \b
    Example (review #3 is the same person again):
      idvault review reject 3 > receipt.json
    """
    with open_vault(settings) as vault:
        doc = vault.decide_review(review_id, accept=False)
    click.echo(json.dumps(doc["receipt"], indent=2, sort_keys=True))


@click.command("verify-face")
@click.argument("handle")
@click.argument("photo", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--pick", "pick", default=None, help=PICK_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_models_options
@vault_options
def verify_face(handle: str, photo: Path, pick: str | None, as_json: bool,
                models_dir: Path | None, pack: str, settings: Settings) -> None:
    """1:1: is the person in PHOTO the identity HANDLE? Exit 0 if so, 11 if not.

    Compares with every enrolled photo; the decision uses the best score and
    the review threshold (IDVAULT_DEDUPE_REVIEW). Audited as a read.

    \b
    Example:
      idvault verify-face smiths/ana new-photo.jpg
    """
    with open_vault(settings) as vault:
        doc = _enroller(vault, models_dir, pack).verify(handle, photo, pick=_pick(pick))
    emit(doc, as_json, lambda: (
        f"{doc['decision']}: {photo.name} vs {doc['handle']} best {doc['best']:.3f} "
        f"(mean {doc['mean']:.3f} over {len(doc['scores'])} photos; threshold "
        f"{doc['threshold']:.2f})"))
    if doc["decision"] != "same":
        raise click.exceptions.Exit(EXIT_DIFFERENT)


@click.command()
@click.argument("photo", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--owner", "owner_name", required=True, help="Whose roster to search.")
@click.option("-k", "k", default=5, show_default=True, help="How many identities to show.")
@click.option("--pick", "pick", default=None, help=PICK_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_models_options
@vault_options
def search(photo: Path, owner_name: str, k: int, pick: str | None, as_json: bool,
           models_dir: Path | None, pack: str, settings: Settings) -> None:
    """1:N: the identities of OWNER closest to the person in PHOTO, with decisions.

    \b
    Example:
      idvault search photo.jpg --owner smiths -k 3
    """
    with open_vault(settings) as vault:
        doc = _enroller(vault, models_dir, pack).search(owner_name, photo, k=k,
                                                        pick=_pick(pick))
    emit(doc, as_json, lambda: "\n".join(
        f"{m['handle']:<32} {m['score']:.3f}  {m['decision']}" for m in doc["matches"])
        or f"no identities of {owner_name} to compare with")


@click.group(cls=Group)
def models() -> None:
    """Model files: check what is installed, or write offline stand-ins.

    \b
    Example:
      idvault models check
    """


@models.command("tiny")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--photos", "photos_dir", type=click.Path(path_type=Path, file_okay=False),
              default=None, metavar="PHOTO_DIR",
              help="Also write synthetic photos these stand-ins detect into PHOTO_DIR: "
                   "ana1.png-ana3.png, ben1.png-ben3.png, and ana-consent.json, "
                   "ben-consent.json (consent to enroll and generate).")
@vault_options
def models_tiny(directory: Path, photos_dir: Path | None, settings: Settings) -> None:
    """Write tiny stand-in models in the real layouts into DIRECTORY.

    They make the whole product run offline (tests, demo) but produce NO real
    likeness: the detector finds only idvault's drawn synthetic faces (--photos
    writes some, of two synthetic people), and the SDXL stand-in
    (DIRECTORY/sdxl-tiny, the default base model of `generate`) makes noise,
    not pictures.

    \b
    Example (the stand-in run of the README, photos in the current folder):
      idvault models tiny ~/idvault-tiny --photos .
    """
    from encoders.standins.face_pack import write_tiny_face_pack
    from generators.standins.generation import write_tiny_generation_models

    target = write_tiny_face_pack(directory / "models" / "buffalo_l")
    click.echo(f"wrote a tiny buffalo_l-layout face pack to {target}")
    target = write_tiny_face_pack(directory / "models" / "antelopev2", pack="antelopev2")
    click.echo(f"wrote a tiny antelopev2-layout face pack (InstantID's) to {target}")
    written = write_tiny_generation_models(directory)
    sdxl = written.pop("sdxl")
    click.echo("wrote tiny PhotoMaker v1/v2, StoryMaker and CLIP ViT-H/14 stand-ins: "
               + ", ".join(p.name for p in written.values()))
    click.echo(f"wrote a tiny SDXL pipeline to {sdxl} (the default base model of "
               "`idvault generate --models DIRECTORY`)")
    if photos_dir is not None:
        from web.cli.demo import SAMPLE_PEOPLE, write_sample_photos

        written = write_sample_photos(photos_dir)
        click.echo(f"wrote {len(written) - len(SAMPLE_PEOPLE)} synthetic photos of "
                   f"{', '.join(SAMPLE_PEOPLE)} and their consent files to {photos_dir}: "
                   + ", ".join(p.name for p in written))
    click.echo("these stand-ins produce no real likeness; use them with --models "
               f"{directory}")


@models.command("check")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False),
                required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@vault_options
def models_check(directory: Path | None, as_json: bool, settings: Settings) -> None:
    """Report which model files are present (size, SHA-256) and what they enable.

    \b
    Example:
      idvault models check ~/.insightface
    """
    from encoders.face.pack import PACKS, inspect_face_pack

    reports = []
    for name in PACKS:
        r = inspect_face_pack(directory, name)
        reports.append({
            "pack": name, "complete": r.complete,
            "directory": str(r.directory) if r.directory else None,
            "searched": [str(p) for p in r.searched],
            "files": [{"name": f.name, "present": f.present, "size": f.size,
                       "sha256": f.sha256} for f in r.files],
            "enables": (PACK_ENABLES.get(name, "enroll --pack " + name) if r.complete
                        else None),
        })

    def text() -> str:
        lines = []
        for r in reports:
            state = f"ready in {r['directory']}" if r["complete"] else "not found"
            lines.append(f"face pack {r['pack']}: {state}")
            for f in r["files"]:
                lines.append(f"  {f['name']:<24} " + (
                    f"{f['size']:>11,} B  sha256 {f['sha256'][:16]}..." if f["present"]
                    else "missing"))
            if r["complete"]:
                lines.append(f"  enables: {r['enables']}")
        return "\n".join(lines)

    from encoders.id.checkpoints import inspect_id_checkpoints

    enables = {"photomaker-v1": "enroll --kinds photomaker (v1)",
               "photomaker-v2": "enroll --kinds photomaker (v2)",
               "storymaker": "enroll --kinds storymaker (with clip-vit-h-14)",
               "clip-vit-h-14": "enroll --kinds faceid, and storymaker (with storymaker)",
               "faceid-plusv2-sdxl": "generation with the faceid method (artifacts: enroll "
                                     "--kinds faceid)",
               "instantid-ip-adapter": "generation with the instantid method (with "
                                       "instantid-controlnet; artifacts: enroll --kinds "
                                       "instantid)",
               "instantid-controlnet": "generation with the instantid method (with "
                                       "instantid-ip-adapter)"}
    checkpoints = [{"checkpoint": c.key, "description": c.description,
                    "path": str(c.path) if c.path else None, "size": c.size,
                    "sha256": c.sha256, "problem": c.problem,
                    "enables": enables.get(c.key) if c.path else None}
                   for c in inspect_id_checkpoints(directory, hashes=True)]

    def text_all() -> str:
        lines = [text()]
        for c in checkpoints:
            if c["path"]:
                lines.append(f"{c['checkpoint']}: {c['path']} ({c['size']:,} B, sha256 "
                             f"{c['sha256'][:16]}...)"
                             + (f" enables {c['enables']}" if c["enables"] else ""))
            else:
                lines.append(f"{c['checkpoint']}: not found")
        return "\n".join(lines)

    emit({"face_packs": reports, "checkpoints": checkpoints}, as_json, text_all)
    if not any(r["complete"] for r in reports):
        raise errors.ModelUnavailable(
            "no complete face pack found; see docs/models.md (or `idvault models tiny DIR` "
            "for offline stand-ins)")


PACK_ENABLES = {"buffalo_l": "enroll, verify-face, search",
                "antelopev2": "the instantid kind; enroll, verify-face, search with this "
                              "pack"}


def register(cli: click.Group) -> None:
    for command in (enroll, add_kinds, review, verify_face, search, models):
        cli.add_command(command)
