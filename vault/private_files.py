"""Files and folders idvault writes are its owner's alone: files 0600, folders 0700,
whatever the umask.

What idvault writes is about people (generated images of them, sealed fit checkpoints
and staged photos, exported artifacts, erasure receipts), so nothing it creates is
readable by other accounts of the machine. The mode is set when the file is created
(no window where it is 0644) and again with ``fchmod`` when an existing file is
overwritten, whose old mode ``open`` would keep.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

FILE_MODE = 0o600
DIR_MODE = 0o700


def open_private(path: str | os.PathLike, mode: str = "wb") -> IO:
    """``path`` opened for writing (truncated), mode 0600 even if it existed."""
    if mode not in ("wb", "w"):
        raise ValueError(f"open_private writes ('wb' or 'w'), not {mode!r}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, mode)


def write_private(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path``, mode 0600."""
    with open_private(path) as f:
        f.write(data)


def private_dir(path: str | os.PathLike) -> Path:
    """``path`` as a folder; each one created here (parents too) is 0700. Folders that
    exist already are left as they are: they may be the user's own."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made by another process meanwhile
            continue
        os.chmod(p, DIR_MODE)  # mkdir's mode passes through the umask
    return path
