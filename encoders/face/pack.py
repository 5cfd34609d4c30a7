"""Finding an insightface model pack on disk, and saying clearly when it is not there.

idvault ships no face models: insightface's pretrained packs are licensed for
non-commercial research only, so users point idvault at packs they are
licensed to use (``--models DIR`` or ``IDVAULT_MODELS``). This module knows
which files each pack needs, looks for them in the layouts people actually
have on disk, and produces an error that lists every folder it looked in, the
file it expected, where to get it and the licence terms. It also inventories a
pack (sizes and SHA-256) for ``idvault models check``.

Nothing here loads a model; see :mod:`encoders.face.analyzer`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from vault.errors import InvalidInput, ModelUnavailable

ENV_VAR = "IDVAULT_MODELS"
INSIGHTFACE_HOME = Path("~/.insightface")
RELEASES_URL = "https://github.com/deepinsight/insightface/releases/tag/v0.7"
LICENCE_NOTE = (
    "Licence: insightface's pretrained model packs are released for non-commercial "
    "research use only (the insightface code itself is MIT-licensed). Use only packs "
    "you are licensed to use; idvault does not download or bundle them."
)


@dataclass(frozen=True)
class PackSpec:
    """The files enrollment needs from one pack (other files in it are ignored)."""

    name: str
    detector: str  # SCRFD with 5 keypoints
    recognizer: str  # ArcFace-style, 112x112 in, 512-d out
    source: str = RELEASES_URL  # where insightface publishes ``<name>.zip``

    @property
    def files(self) -> tuple[str, str]:
        return (self.detector, self.recognizer)


PACKS: dict[str, PackSpec] = {
    spec.name: spec
    for spec in (
        # insightface's default pack (PhotoMaker v2, StoryMaker, IP-Adapter-FaceID).
        PackSpec("buffalo_l", "det_10g.onnx", "w600k_r50.onnx"),
        # InstantID's pack: R100 trained on Glint360K.
        PackSpec("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    )
}


@dataclass(frozen=True)
class FacePack:
    """A located pack: the folder holding both required files."""

    spec: PackSpec
    directory: Path

    @property
    def detector_path(self) -> Path:
        return self.directory / self.spec.detector

    @property
    def recognizer_path(self) -> Path:
        return self.directory / self.spec.recognizer


@dataclass(frozen=True)
class PackFile:
    """One required file as found (or not) in one folder."""

    name: str
    path: Path
    present: bool
    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class PackReport:
    """Inventory of a pack for ``idvault models check``."""

    pack: str
    searched: tuple[Path, ...]
    directory: Path | None  # the folder that holds every required file, if any
    files: tuple[PackFile, ...]  # the required files, in the chosen (or first) folder

    @property
    def complete(self) -> bool:
        return self.directory is not None


def pack_spec(pack: str) -> PackSpec:
    try:
        return PACKS[pack]
    except KeyError:
        known = ", ".join(sorted(PACKS))
        raise InvalidInput(f"unknown face model pack {pack!r}; known packs: {known}") from None


def resolve_models_dir(models_dir: Path | str | None, env: Mapping[str, str] | None = None) -> Path:
    """``--models DIR`` wins, then ``IDVAULT_MODELS``, then ``~/.insightface``."""
    env = os.environ if env is None else env
    if models_dir is not None and str(models_dir) != "":
        return Path(models_dir).expanduser()
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR]).expanduser()
    return INSIGHTFACE_HOME.expanduser()


def candidate_dirs(models_dir: Path | str | None, pack: str = "buffalo_l",
                   env: Mapping[str, str] | None = None) -> list[Path]:
    """Folders that may hold the pack's files, most specific first.

    insightface's own layout (``DIR/models/<pack>``), a folder per pack
    (``DIR/<pack>``), and the files dropped straight into ``DIR``.
    """
    root = resolve_models_dir(models_dir, env)
    return [root / "models" / pack, root / pack, root]


def find_face_pack(models_dir: Path | str | None, pack: str = "buffalo_l",
                   env: Mapping[str, str] | None = None) -> FacePack:
    """Locate ``pack`` or raise :class:`ModelUnavailable` saying what to do."""
    spec = pack_spec(pack)
    searched = candidate_dirs(models_dir, pack, env)
    problems: list[str] = []
    for directory in searched:
        issues = [_file_issue(directory / name) for name in spec.files]
        if not any(issues):
            return FacePack(spec=spec, directory=directory)
        # Only detail folders that hold something of the pack: "missing" for
        # every empty folder would bury the one real problem.
        if any(issue != "missing" for issue in issues):
            problems += [f"{directory / name}: {issue}"
                         for name, issue in zip(spec.files, issues) if issue]
    raise ModelUnavailable(
        _missing_message(spec, searched, problems),
        pack=spec.name,
        searched=[str(d) for d in searched],
        expected=list(spec.files),
    )


def inspect_face_pack(models_dir: Path | str | None, pack: str = "buffalo_l",
                      env: Mapping[str, str] | None = None) -> PackReport:
    """Which required files are present, with sizes and SHA-256 (never raises for absence)."""
    spec = pack_spec(pack)
    searched = tuple(candidate_dirs(models_dir, pack, env))
    chosen = next(
        (d for d in searched if not any(_file_issue(d / n) for n in spec.files)), None
    )
    # Without a complete folder, describe the most complete one so the user
    # sees which file is the missing one.
    shown = chosen or max(searched, key=lambda d: sum((d / n).is_file() for n in spec.files))
    files = tuple(_describe(shown / name) for name in spec.files)
    return PackReport(pack=spec.name, searched=searched, directory=chosen, files=files)


def recognizer_model_id(pack: FacePack) -> str:
    """``<pack>/<recogniser file>@<sha256 prefix>``: ties embeddings to the exact weights.

    Embeddings of different recognisers (buffalo_l's R50 and antelopev2's R100,
    say) live in different spaces; the pack name, file name and content hash keep
    them apart. Hashed once per file version (path, size, mtime).
    """
    path = pack.recognizer_path
    st = path.stat()
    digest = _file_digest(str(path), st.st_size, st.st_mtime_ns)
    return f"{pack.spec.name}/{path.name}@{digest[:16]}"


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# -- helpers -------------------------------------------------------------------

# Protobuf field 1 (ir_version, varint) opens every ONNX file in practice; a
# zip, an HTML error page or a Git LFS pointer saved under the model's name
# does not. Deeper validation happens when the analyzer loads the file.
_ONNX_FIRST_BYTE = 0x08


def _file_issue(path: Path) -> str | None:
    """None when ``path`` looks like a usable ONNX file, else what is wrong."""
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a regular file"
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the model (run `git lfs pull` or download the pack)"
    if head.startswith(b"PK"):
        return "a zip archive; unpack it instead of renaming it"
    if head[0] != _ONNX_FIRST_BYTE:
        return "not an ONNX model (unexpected file header)"
    return None


def _describe(path: Path) -> PackFile:
    if not path.is_file():
        return PackFile(name=path.name, path=path, present=False)
    return PackFile(
        name=path.name, path=path, present=True,
        size=path.stat().st_size, sha256=sha256_file(path),
    )


def _missing_message(spec: PackSpec, searched: list[Path], problems: list[str]) -> str:
    looked = "\n".join(f"  - {d}" for d in searched)
    lines = [
        f"face model pack {spec.name!r} not found or unusable: expected "
        f"{spec.detector} (detector) and {spec.recognizer} (recogniser) together in one of:",
        looked,
    ]
    if problems:
        lines.append("Problems found:")
        lines.extend(f"  - {p}" for p in problems)
    lines.append(obtain_instructions(spec))
    lines.append(TRY_OFFLINE)
    return "\n".join(lines)


# A new user without the weights can still try every command; say how, and say plainly
# that the stand-ins are not the real thing.
TRY_OFFLINE = ("To try idvault offline without them: `idvault models tiny DIR` writes tiny "
               "stand-in models (they give no likeness), then pass --models DIR.")


def obtain_instructions(spec: PackSpec) -> str:
    """How to get the pack, and on what terms (shared by every model error)."""
    return (
        f"To obtain it: download {spec.name}.zip from {spec.source} and unpack it into "
        f"DIR/models/{spec.name}, then pass --models DIR or set {ENV_VAR}=DIR.\n{LICENCE_NOTE}"
    )
