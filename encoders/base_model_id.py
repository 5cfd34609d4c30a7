"""The id of a diffusers base-model folder, shared by fitting and generation.

Fitted artifacts (Celeb Basis, LiDB) record the base model they were
optimised against as ``model_id``; the generator records the same id and
refuses artifacts fitted against another model. Both call this module, so the
two ids agree.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def base_model_fingerprint(folder: Path) -> str:
    """A fast fingerprint of a diffusers folder: every config file whole, every weights file
    by name, size and its first and last MiB. (Hashing 7 GB per run would cost a minute; this
    tells releases and fine-tunes apart, but is not a full content hash.)"""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = f.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(f"{rel}:{f.stat().st_size}\n".encode())
        if f.suffix in (".json", ".txt"):
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            with f.open("rb") as handle:
                h.update(handle.read(1 << 20))
                handle.seek(max(0, f.stat().st_size - (1 << 20)))
                h.update(handle.read(1 << 20))
    return h.hexdigest()


def base_model_id(folder: str | Path) -> str:
    """``<folder name>@<first 16 hex of the fingerprint>``."""
    folder = Path(folder)
    return f"{folder.name}@{base_model_fingerprint(folder)[:16]}"
