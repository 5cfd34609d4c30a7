"""constraints.txt is the lock: what is installed is exactly what it pins.

The lock is written by `.ci/lock` (pip-compile) from pyproject.toml; the GPU
locks (constraints-gpu-cuda12.txt, constraints-gpu-cuda13.txt) beside it.
These tests read the running interpreter's environment, so each venv built
from the README's commands (ML + test, or the vault alone plus pytest) checks
itself.
"""

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"
PYPROJECT = ROOT / "pyproject.toml"
# The extras the lock covers (the README's test install), and the GPU locks.
LOCKED_EXTRAS = ("ml", "test")
GPU_LOCKS = {"constraints-gpu-cuda12.txt": "gpu-cuda12", "constraints-gpu-cuda13.txt": "gpu-cuda13"}

# The project itself is installed editable from this tree; it is not locked.
PROJECT = "idvault"
# `python -m venv` seeds these installers (ensurepip) at the interpreter's
# bundled versions; `pip install -c constraints.txt` does not put them there.
# One of them is checked only where the lock pins it *and* an installed
# distribution requires it, i.e. where the locked install brought it to the
# locked version (torch requires setuptools, so the ML install upgrades the
# seeded setuptools to the lock's). Elsewhere (a vault-only venv, the seeded
# pip) the copy the venv came with is legitimate.
SEEDED_INSTALLERS = {"pip", "setuptools", "wheel"}
REFRESH = "refresh the lock with .ci/lock (docs/install.md)"


def _read_lock(path: Path) -> dict[str, Requirement]:
    pins: dict[str, Requirement] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and not req.extras, (
            f"{path.name}:{n}: not a plain `name==version` pin: {raw!r}"
        )
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}:{n}: {req.name} pinned twice"
        pins[name] = req
    return pins


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _extra(name: str) -> list[Requirement]:
    return [Requirement(r) for r in _pyproject()["optional-dependencies"][name]]


def _top_level() -> list[Requirement]:
    """The base dependencies and the locked extras' requirements."""
    reqs = [Requirement(r) for r in _pyproject()["dependencies"]]
    for extra in LOCKED_EXTRAS:
        reqs += _extra(extra)
    return reqs


def _installed() -> dict[str, md.Distribution]:
    found: dict[str, md.Distribution] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:  # the first one on sys.path wins, as for imports
            found.setdefault(canonicalize_name(name), dist)
    return found


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in extras | {""})


def _required_by_installed(installed: dict[str, md.Distribution]) -> set[str]:
    """Names that an installed distribution requires here (its base requirements
    whose environment markers hold)."""
    names = set()
    for dist in installed.values():
        for raw in dist.requires or []:
            req = Requirement(raw)
            if _applies(req, set()):
                names.add(canonicalize_name(req.name))
    return names


def _expected_pins(installed: dict[str, md.Distribution]) -> dict[str, Requirement]:
    """The lock, plus the GPU lock whose packages this venv runs (a GPU venv)."""
    pins = _read_lock(LOCK)
    for lock, extra in GPU_LOCKS.items():
        roots = {canonicalize_name(r.name) for r in _extra(extra)}
        if roots <= installed.keys():
            pins.update(_read_lock(ROOT / lock))
    return pins


def test_installed_distributions_are_the_locked_versions():
    installed = _installed()
    pins = _expected_pins(installed)
    required = _required_by_installed(installed)
    missing, different = [], []
    for name, dist in sorted(installed.items()):
        if name == PROJECT:
            continue
        if name in SEEDED_INSTALLERS and (name not in pins or name not in required):
            continue
        version = dist.version
        if name not in pins:
            missing.append(f"{dist.metadata['Name']}=={version}")
        elif not pins[name].specifier.contains(Version(version), prereleases=True):
            different.append(f"{dist.metadata['Name']} {version} (lock: {pins[name]})")
    problems = []
    if missing:
        problems.append("installed but not in constraints.txt: " + ", ".join(missing))
    if different:
        problems.append("installed at a version the lock does not pin: " + ", ".join(different))
    assert not problems, "; ".join(problems) + f". Install with `-c constraints.txt`, or {REFRESH}."


def test_pyproject_requirements_are_locked_transitively():
    """Every requirement of the base, ml and test sets is pinned, at a version
    it admits, and so is everything they need, as far as this venv has it
    installed (a vault-only venv checks the ML names but not their trees)."""
    pins = _read_lock(LOCK)
    installed = _installed()
    unpinned, unsatisfied = set(), set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(req, "pyproject.toml") for req in _top_level() if _applies(req, set())]
    while todo:
        req, via = todo.pop()
        name = canonicalize_name(req.name)
        if name not in pins:
            unpinned.add(f"{req} (via {via})")
            continue
        locked = Version(next(iter(pins[name].specifier)).version)
        if not req.specifier.contains(locked, prereleases=True):
            unsatisfied.add(f"{req} (via {via}; lock: {pins[name]})")
        key = (name, frozenset(req.extras))
        if key in seen or name not in installed:
            continue
        seen.add(key)
        for raw in installed[name].requires or []:
            sub = Requirement(raw)
            if _applies(sub, set(req.extras)):
                todo.append((sub, installed[name].metadata["Name"]))
    assert not unpinned and not unsatisfied, (
        f"not pinned in constraints.txt: {sorted(unpinned)}; "
        f"pinned at a version the requirement excludes: {sorted(unsatisfied)}. Fix: {REFRESH}."
    )


def test_lock_pins_the_same_torch_as_pyproject():
    (torch,) = [r for r in _extra("ml") if canonicalize_name(r.name) == "torch"]
    assert str(torch.specifier) == "==2.13.0"
    locked = _read_lock(LOCK)["torch"]
    assert str(locked.specifier) == str(torch.specifier), (
        f"constraints.txt pins {locked}, pyproject.toml asks for {torch}. Fix: {REFRESH}."
    )
    # No local label: `torch==2.13.0` admits the local CPU wheel (2.13.0+cpu).
    assert re.search(r"(?m)^torch==2\.13\.0$", LOCK.read_text())


def test_gpu_locks_pin_their_extra_and_agree_with_the_lock():
    extras = _pyproject()["optional-dependencies"]
    assert extras["gpu"] == extras["gpu-cuda12"], "`gpu` is the CUDA 12 pair under its old name"
    cpu = _read_lock(LOCK)
    for lock, extra in GPU_LOCKS.items():
        gpu = _read_lock(ROOT / lock)
        for req in _extra(extra):
            pin = gpu.get(canonicalize_name(req.name))
            assert pin is not None, f"{lock} does not pin {req}. Fix: {REFRESH}."
            locked = Version(next(iter(pin.specifier)).version)
            assert req.specifier.contains(locked), (
                f"{lock}: {pin} is outside {req}. Fix: {REFRESH}."
            )
        shared = sorted(gpu.keys() & cpu.keys())
        clashes = [f"{gpu[n]} vs {cpu[n]}" for n in shared if gpu[n].specifier != cpu[n].specifier]
        assert not clashes, f"{lock} disagrees with constraints.txt: {clashes}. Fix: {REFRESH}."
        # The GPU packages replace these; the CPU twins have no place in a GPU lock.
        assert not gpu.keys() & {"onnxruntime", "faiss-cpu"}, lock
