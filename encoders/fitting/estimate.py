"""How long a fit will take, before anything loads: the default number of steps of each
kind, and a rough per-step cost on the CPU from the base model folder's files.

``idvault personalize`` says the expected time before it starts and, on a machine
without CUDA, refuses a default-length fit unless ``--steps`` or ``--yes`` is given
(``docs/personalization.md``). Once the fit runs, the time is measured from its first
steps instead (:mod:`web.cli.progress`).

Torch-free on purpose: it reads ``unet/config.json``, the VAE's config and the UNet
weights' safetensors header (tensor shapes only), never a weight.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

__all__ = ["CPU_SECONDS_PER_STEP", "cpu_seconds_per_step", "default_steps", "resolution",
           "unet_parameters"]

# Measured: Celeb Basis on SD1.5 (a 859.5 M-parameter UNet) at 512 px, batch 2, ran 59 steps
# in 14 min on 2 CPU cores (issue 16). A step's cost grows with the UNet's size and the pixel
# count; other CPUs differ, so this only says minutes or hours.
CPU_SECONDS_PER_STEP = 14.2
REFERENCE_PARAMETERS = 859_520_964
REFERENCE_SIDE = 512

# The steps of a fit when --steps is not given (encoders.fitting.core.FitConfig,
# encoders.fitting.lidb.FAST_FIT / SCRATCH_FIT; a test keeps them equal).
DEFAULT_STEPS = {("celeb_basis", None): 400, ("lidb", "fast"): 40, ("lidb", "scratch"): 400}


def default_steps(kind: str, mode: str | None = None) -> int:
    return DEFAULT_STEPS[(kind, mode if kind == "lidb" else None)]


def resolution(folder: str | Path) -> int | None:
    """The side a fit trains at by default: ``unet.sample_size`` x the VAE's scale."""
    folder = Path(folder)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def unet_parameters(folder: str | Path) -> int | None:
    """The UNet's parameter count from its safetensors headers (None: no such files)."""
    files = sorted((Path(folder) / "unet").glob("*.safetensors"))
    # One copy of the weights: a folder may hold both the fp32 file and an fp16 variant.
    plain = [f for f in files if ".fp16." not in f.name] or files
    total = 0
    try:
        for path in plain:
            with path.open("rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
            total += sum(math.prod(t["shape"]) for name, t in header.items()
                         if name != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return total or None


def cpu_seconds_per_step(folder: str | Path, side: int | None = None) -> float:
    """Rough seconds a fit step takes on the CPU with the base model in ``folder``."""
    params = unet_parameters(folder) or REFERENCE_PARAMETERS
    side = side or resolution(folder) or REFERENCE_SIDE
    return CPU_SECONDS_PER_STEP * params / REFERENCE_PARAMETERS * (side / REFERENCE_SIDE) ** 2
