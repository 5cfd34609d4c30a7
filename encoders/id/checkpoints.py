"""Finding and reading the identity encoders' checkpoints, and checking their layouts.

idvault ships no PhotoMaker or StoryMaker weights. Users point it at the
official files in their models folder ``DIR`` (``--models DIR``,
``IDVAULT_MODELS`` or ``~/.insightface``, as for the face pack; see
:func:`encoders.face.pack.resolve_models_dir`), under their official names:

- PhotoMaker v1: ``photomaker-v1.safetensors`` or ``photomaker-v1.bin``
  (Hugging Face TencentARC/PhotoMaker);
- PhotoMaker v2: ``photomaker-v2.safetensors`` or ``photomaker-v2.bin``
  (TencentARC/PhotoMaker-V2);
- StoryMaker: ``mask.bin`` (RED-AIGC/StoryMaker);
- StoryMaker's CLIP ViT-H/14 tower: a ``from_pretrained`` folder named
  ``clip-vit-h-14``, ``CLIP-ViT-H-14-laion2B-s32B-b79K`` or ``image_encoder``
  (laion/CLIP-ViT-H-14-laion2B-s32B-b79K, or IP-Adapter's ``models/image_encoder``).
- IP-Adapter-FaceID Plus v2 for SDXL: ``ip-adapter-faceid-plusv2_sdxl.bin`` (or the same
  tensors as ``ip-adapter-faceid-plusv2_sdxl.safetensors``), h94/IP-Adapter-FaceID, also
  looked for in ``DIR/IP-Adapter-FaceID``;
- InstantID: ``ip-adapter.bin`` and the ``ControlNetModel`` folder (a diffusers
  ``ControlNetModel``: ``config.json``, ``diffusion_pytorch_model.safetensors``) of
  InstantX/InstantID; looked for in ``DIR/InstantID`` first, since other IP-Adapters'
  files share the name ``ip-adapter.bin`` (the loader then names what a wrong file is).

Each is looked for in ``DIR``, ``DIR/checkpoints`` and a folder named after
its Hugging Face repository (``DIR/PhotoMaker``, ``DIR/PhotoMaker-V2``,
``DIR/StoryMaker``), in that order. PhotoMaker's CLIP ViT-L/14 tower is part of
its own checkpoint.

Pickled checkpoints (``.bin``) are read only with ``torch.load(...,
weights_only=True)``, memory-mapped. Every failure is a
:class:`~vault.errors.ModelUnavailable` that names the file or the folders
searched. :func:`compare_layout` checks a state dict against the one a module
expects (every name and shape) and :func:`layout_error` words the refusal.

An artifact's ``model_id`` ties it to the exact weights: the SHA-256 of the
checkpoint file (first 16 hex digits), computed once per file version
(:func:`file_digest`).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from encoders.face.pack import resolve_models_dir, sha256_file
from encoders.id.clip_vision import folder_problem, weights_files
from vault.errors import ModelUnavailable

__all__ = [
    "CHECKPOINTS",
    "CheckpointSpec",
    "LayoutReport",
    "compare_layout",
    "file_digest",
    "find_checkpoint",
    "folder_digest",
    "inspect_id_checkpoints",
    "layout_error",
    "read_pickle_checkpoint",
    "search_dirs",
]

# Buffers some exporters keep in a state dict and others do not (transformers
# made CLIP's position_ids non-persistent): accepted present or absent.
TOLERATED_EXTRA = ("vision_model.embeddings.position_ids",)
LIST_LIMIT = 10  # names shown per category in an error; the rest are counted


@dataclass(frozen=True)
class CheckpointSpec:
    """One checkpoint idvault can use: its accepted file names and where it comes from."""

    key: str  # photomaker-v1 | photomaker-v2 | storymaker | clip-vit-h-14
    names: tuple[str, ...]  # accepted names, preferred first
    repo_dirs: tuple[str, ...]  # folders named after the source repository
    source: str
    description: str
    is_folder: bool = False
    # A diffusers model folder (config.json with this _class_name, diffusion_pytorch_model.*)
    # rather than a transformers CLIP folder.
    diffusers_class: str | None = None
    # Look in the repository folders before DIR and DIR/checkpoints: the file's name is
    # shared with other models' files (InstantID's ip-adapter.bin).
    repo_first: bool = False


CHECKPOINTS: dict[str, CheckpointSpec] = {
    s.key: s
    for s in (
        CheckpointSpec("photomaker-v1", ("photomaker-v1.safetensors", "photomaker-v1.bin"),
                       ("PhotoMaker",), "https://huggingface.co/TencentARC/PhotoMaker",
                       "PhotoMaker v1 (ID encoder with CLIP ViT-L/14, SDXL LoRA)"),
        CheckpointSpec("photomaker-v2", ("photomaker-v2.safetensors", "photomaker-v2.bin"),
                       ("PhotoMaker-V2", "PhotoMaker"),
                       "https://huggingface.co/TencentARC/PhotoMaker-V2",
                       "PhotoMaker v2 (ID encoder with CLIP ViT-L/14 + ArcFace, SDXL LoRA)"),
        CheckpointSpec("storymaker", ("mask.bin",), ("StoryMaker",),
                       "https://huggingface.co/RED-AIGC/StoryMaker",
                       "StoryMaker image_proj_model and ip_adapter"),
        CheckpointSpec("faceid-plusv2-sdxl",
                       ("ip-adapter-faceid-plusv2_sdxl.bin",
                        "ip-adapter-faceid-plusv2_sdxl.safetensors"),
                       ("IP-Adapter-FaceID",), "https://huggingface.co/h94/IP-Adapter-FaceID",
                       "IP-Adapter-FaceID Plus v2 for SDXL (image projection, IP attention "
                       "and its LoRA)"),
        CheckpointSpec("clip-vit-h-14",
                       ("clip-vit-h-14", "CLIP-ViT-H-14-laion2B-s32B-b79K", "image_encoder"),
                       ("StoryMaker",),
                       "https://huggingface.co/laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                       "OpenCLIP ViT-H/14 vision tower (StoryMaker), a from_pretrained folder",
                       is_folder=True),
        CheckpointSpec("instantid-ip-adapter", ("ip-adapter.bin",), ("InstantID",),
                       "https://huggingface.co/InstantX/InstantID",
                       "InstantID face adapter (image_proj Resampler and ip_adapter); its "
                       "name is shared with other IP-Adapters, so DIR/InstantID comes first",
                       repo_first=True),
        CheckpointSpec("instantid-controlnet", ("ControlNetModel",), ("InstantID",),
                       "https://huggingface.co/InstantX/InstantID",
                       "InstantID IdentityNet, a diffusers ControlNetModel folder "
                       "(config.json, diffusion_pytorch_model.safetensors)",
                       is_folder=True, diffusers_class="ControlNetModel", repo_first=True),
    )
}

LICENCE_NOTE = (
    "idvault does not download or bundle these weights; use only files you are licensed "
    "to use (see each model's page). PhotoMaker v2 and StoryMaker consume insightface "
    "embeddings, whose pretrained packs are for non-commercial research only."
)


def search_dirs(models_dir: Path | str | None, spec: CheckpointSpec,
                env: Mapping[str, str] | None = None) -> list[Path]:
    """Folders that may hold ``spec``'s file, most general first (see the module doc)."""
    root = resolve_models_dir(models_dir, env)
    dirs = [root, root / "checkpoints", *(root / d for d in spec.repo_dirs)]
    if spec.repo_first:
        dirs = [*(root / d for d in spec.repo_dirs), root, root / "checkpoints"]
    return list(dict.fromkeys(dirs))


def file_problem(path: Path) -> str | None:
    """None when ``path`` may be a checkpoint file (deeper checks happen on load)."""
    if not path.exists():
        return "missing"
    if not path.is_file():
        return "not a regular file"
    if path.stat().st_size == 0:
        return "empty file"
    with path.open("rb") as handle:
        head = handle.read(64)
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the checkpoint (run `git lfs pull` or download it)"
    return None


def find_checkpoint(key: str, models_dir: Path | str | None = None,
                    env: Mapping[str, str] | None = None) -> Path:
    """The first usable file (or folder) for ``key``; ModelUnavailable says what was tried."""
    spec = CHECKPOINTS[key]
    searched = search_dirs(models_dir, spec, env)
    problems = []
    for directory in searched:
        for name in spec.names:
            path = directory / name
            issue = (diffusers_folder_problem(path, spec.diffusers_class)
                     if spec.diffusers_class else folder_problem(path) if spec.is_folder
                     else file_problem(path))
            if issue is None:
                return path
            if issue != "missing":
                problems.append(f"{path}: {issue}")
    raise ModelUnavailable(missing_message(spec, searched, problems), checkpoint=key,
                           searched=[str(d) for d in searched], expected=list(spec.names))


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def diffusers_weights_files(folder: Path) -> list[Path]:
    """The weights file of a diffusers model folder (safetensors first), or []."""
    return [folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()][:1]


def diffusers_folder_problem(folder: Path, class_name: str) -> str | None:
    """None when ``folder`` looks like a diffusers ``class_name`` folder, else what is wrong."""
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        return "not a folder"
    try:
        doc = json.loads((folder / "config.json").read_text())
    except OSError:
        return "no config.json (a diffusers model folder needs config.json and weights)"
    except ValueError as exc:
        return f"config.json is not readable JSON ({exc})"
    kind = doc.get("_class_name") if isinstance(doc, dict) else None
    if kind != class_name:
        return f"config.json describes a {kind!r}, not a {class_name}"
    files = diffusers_weights_files(folder)
    if not files:
        return f"no weights ({' or '.join(DIFFUSERS_WEIGHTS)})"
    return file_problem(files[0])


def missing_message(spec: CheckpointSpec, searched: Sequence[Path],
                    problems: Sequence[str]) -> str:
    what = "folder" if spec.is_folder else "file"
    lines = [f"{spec.description}: no usable {what} named {' or '.join(spec.names)} in:"]
    lines += [f"  - {d}" for d in searched]
    if problems:
        lines.append("Problems found:")
        lines += [f"  - {p}" for p in problems]
    lines.append(f"To obtain it: download from {spec.source} into one of those folders, then "
                 f"pass --models DIR or set IDVAULT_MODELS=DIR.\n{LICENCE_NOTE}")
    return "\n".join(lines)


# -- content hashes -------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def file_digest(path: Path | str) -> str:
    """SHA-256 of a file, cached per (path, size, mtime): hashing 3 GB takes seconds."""
    st = os.stat(path)
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def folder_digest(folder: Path | str) -> str:
    """SHA-256 over the weights files ``from_pretrained`` reads from ``folder``.

    A single file gives that file's own SHA-256 (so ``sha256sum`` can check it);
    shards give the hash of their names and hashes, in order.
    """
    files = weights_files(Path(folder))
    if len(files) == 1:
        return file_digest(files[0])
    import hashlib

    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{file_digest(f)}\n".encode())
    return digest.hexdigest()


# -- reading pickles -----------------------------------------------------------------------


def read_pickle_checkpoint(path: Path, what: str) -> dict:
    """``torch.load(path, weights_only=True)``, memory-mapped when the format allows."""
    problem = file_problem(path)
    if problem:
        raise ModelUnavailable(f"{what} {path}: {problem}", path=str(path))
    with path.open("rb") as handle:
        head = handle.read(4)
    if not head.startswith((b"PK", b"\x80")):
        # torch.save writes a zip archive (legacy files: a pickle, which opens with 0x80).
        raise ModelUnavailable(f"{what} {path}: not a PyTorch checkpoint (neither a torch.save "
                               "zip archive nor a pickle)", path=str(path))
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (non-zip) pickles cannot be memory-mapped.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelUnavailable(f"{what} {path}: {_load_failure(exc)}", path=str(path)) from None
    if not isinstance(obj, dict):
        raise ModelUnavailable(f"{what} {path}: holds a {type(obj).__name__}, not a dict of "
                               "state dicts", path=str(path))
    return obj


def _load_failure(exc: BaseException) -> str:
    """torch.load's long messages, cut to what tells the user what is wrong."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found or "Weights only load failed" in text:
        what = f" ({found.group(1)})" if found else ""
        return ("refused: it holds Python objects other than tensors" + what
                + "; idvault reads checkpoints only with torch.load(weights_only=True)")
    first = text.strip().split(". ")[0].strip().rstrip(".") or type(exc).__name__
    return f"cannot be read as a PyTorch checkpoint (truncated or corrupt?): {first}"


# -- layouts -------------------------------------------------------------------------------

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayoutReport:
    """How a state dict differs from the one a module expects."""

    expected: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, Shape, Shape]] = field(default_factory=list)  # name, found, want

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def lines(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"missing keys ({len(self.missing)}): {_cap(self.missing)}")
        if self.unexpected:
            out.append(f"unexpected keys ({len(self.unexpected)}): {_cap(self.unexpected)}")
        if self.mismatched:
            shown = [f"{n} is {_fmt(found)} in the file, expected {_fmt(want)}"
                     for n, found, want in self.mismatched]
            out.append(f"shape mismatches ({len(self.mismatched)}): {_cap(shown)}")
        return out


def shapes_of(state: Mapping[str, object]) -> dict[str, Shape]:
    """Names -> shapes of a state dict (tensors, or shapes already)."""
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v)  # type: ignore[arg-type]
            for k, v in state.items()}


def compare_layout(expected: Mapping[str, Shape], found: Mapping[str, Shape],
                   tolerated: Sequence[str] = TOLERATED_EXTRA) -> LayoutReport:
    """Every expected name present with its shape, nothing else (``tolerated`` aside)."""
    expected = {k: tuple(v) for k, v in expected.items() if k not in tolerated}
    found = {k: tuple(v) for k, v in found.items() if k not in tolerated}
    return LayoutReport(
        expected=len(expected),
        missing=sorted(set(expected) - set(found)),
        unexpected=sorted(set(found) - set(expected)),
        mismatched=sorted((k, found[k], expected[k]) for k in set(expected) & set(found)
                          if found[k] != expected[k]),
    )


def layout_error(what: str, path: Path | str, report: LayoutReport) -> ModelUnavailable:
    """``ModelUnavailable`` naming the file and listing every difference."""
    lines = [f"{path}: does not match the {what} layout ({report.expected} tensors expected):"]
    lines += [f"  - {line}" for line in report.lines()]
    return ModelUnavailable("\n".join(lines), path=str(path), missing=report.missing,
                            unexpected=report.unexpected,
                            mismatched=[n for n, _, _ in report.mismatched])


def _fmt(shape: Shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _cap(items: Sequence[str], limit: int = LIST_LIMIT) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


# -- inventory (idvault models check) ----------------------------------------------------------


@dataclass(frozen=True)
class CheckpointStatus:
    key: str
    description: str
    path: Path | None  # the file/folder that would be used
    problem: str | None  # why none is usable
    size: int | None = None
    sha256: str | None = None


def inspect_id_checkpoints(models_dir: Path | str | None = None, *, hashes: bool = False,
                           env: Mapping[str, str] | None = None) -> list[CheckpointStatus]:
    """One row per identity checkpoint: which file would be used, or why none.

    ``hashes=True`` adds SHA-256 (seconds per GB); sizes are always given. Never
    loads a model and never raises for absence.
    """
    rows = []
    for key, spec in CHECKPOINTS.items():
        try:
            path = find_checkpoint(key, models_dir, env)
        except ModelUnavailable as exc:
            rows.append(CheckpointStatus(key, spec.description, None, str(exc)))
            continue
        files = (diffusers_weights_files(path) if spec.diffusers_class
                 else weights_files(path) if spec.is_folder else [path])
        size = sum(f.stat().st_size for f in files)
        digest = None
        if hashes:
            digest = (file_digest(files[0]) if spec.diffusers_class
                      else folder_digest(path) if spec.is_folder else file_digest(path))
        rows.append(CheckpointStatus(key, spec.description, path, None, size, digest))
    return rows


STAND_INS_FILE = "idvault-stand-ins.json"


def is_stand_in(path: Path | str) -> bool:
    """Whether ``path`` is one of idvault's tiny stand-ins (``idvault models tiny``).

    The stand-ins are listed in a sidecar file beside them, so the loaders can
    use the tiny configuration for exactly those files and the official,
    strict layout for everything else.
    """
    path = Path(path)
    sidecar = path.parent / STAND_INS_FILE
    try:
        listed = json.loads(sidecar.read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return False
    return path.name in listed
