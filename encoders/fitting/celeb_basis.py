"""Celeb Basis: the basis object, the coefficient mapper and its fit.

Celeb Basis (ygtxr1997/CelebBasis; ``METHODS.md`` s.4) writes a person as two
new token embeddings that are combinations of *celebrity name* embeddings:

**The basis** (:func:`build_basis`). A names list is stripped, de-duplicated
and sorted; each name is tokenized with the CLIP tokenizer and the **raw**
token-table rows (no position embedding, no transformer) at sequence
positions 1 and 2 (the first two BPE tokens after ``<|startoftext|>``) are
collected; special tokens there (ids >= 49406 in CLIP's vocabulary: a
one-token name has ``<|endoftext|>`` at position 2) are skipped. Per position
``k``: ``mean_k`` of the rows, then ``svd(rows - mean_k)`` and the top 512
right singular vectors (unit norm, not scaled by the singular values). The
tensor is ``(2, 513, dim)``: ``[:, 0]`` the mean, ``[:, 1:]`` the basis, as in
the official ``celeb_basis.pt``. SD1.x has one text encoder, so one tensor;
SDXL gets **one tensor per text encoder** (``text_encoder`` 768-d and
``text_encoder_2`` 1280-d, from the same names), and one set of coefficients
indexes both (the official repo has no SDXL port; this is our extension).

When the token table is narrower than 512 or a position has at most 512
names (only the tiny test models), the SVD has fewer than 512 vectors and
the basis is padded with zero rows, so the coefficients keep their (2, 512)
shape; the padded directions simply contribute nothing.

SVD signs differ between builds (LAPACK versions, CPU/GPU), so coefficients
mean something only with the exact tensor they were fitted against: a basis
is **content-addressed** (its id is the SHA-256 of its safetensors payload,
:class:`CelebBasisObject`) and stored once in the ``celeb_bases`` table
(:func:`store_basis`, :func:`load_basis`); artifacts name it by
``basis_id``. The project ships its own names list
(``encoders/fitting/celeb_basis_names.txt``): **changing that file changes the
default basis and its id**, and coefficients fitted against the old basis
must be refitted (they stay usable with the old basis, which stays stored).
An official ``celeb_basis.pt`` imports as is (:func:`import_official_basis`).

**The mapper** (:class:`CoefficientMapper`): a face recognition embedding
(512-d, L2-normalised) -> ``EqualLinear(512, 1024)`` -> ``LeakyReLU(0.2)`` ->
reshape ``(2, 512)`` -> L2-normalise each half -> ``embedding_k = coef_k @
basis_k + mean_k``. ``EqualLinear`` is StyleGAN2's equalised-lr linear
(rosinality's ``stylegan2-pytorch``, which the official code imports): the
stored weight is initialised N(0, 1) (divided by ``lr_mul``, 1 here), the
bias 0, and the weight is multiplied by ``lr_mul / sqrt(in_dim)`` at **run
time**, so the effective initial weight has std 1/sqrt(512) while Adam's
update size is relative to the N(0, 1) parameter. The official meta-net
uses a plain ``LeakyReLU(0.2)`` (no sqrt(2) gain); any constant gain would
vanish in the L2 normalisation anyway.

**The fit** (:func:`fit_coefficients`): eps-MSE on the frozen UNet, only the
mapper trains; AdamW, effective lr 1e-2, batch 2, 400 steps per identity;
augmentation and templates from :mod:`encoders.fitting.core`; the stored
coefficients are an EMA (0.99) of the mapper's output. Several identities
fit jointly share one mapper (``len(faces)`` x 400 steps in all).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from sqlalchemy.orm import Session
from torch import nn

from encoders.fitting.core import (
    PLACEHOLDER,
    SUBJECT,
    DiffusionModel,
    FitConfig,
    FitResult,
    Objective,
    run_fit,
    single_thread,
)

N_COEF = 512  # basis vectors per position
N_POS = 2  # token positions (two new tokens per identity)
FACE_DIM = 512
EMA_DECAY = 0.99
CLIP_FIRST_SPECIAL = 49406  # <|startoftext|>; <|endoftext|> is 49407
NAMES_FILE = Path(__file__).with_name("celeb_basis_names.txt")
FORMAT = "idvault.celeb_basis/1"
DEFAULT_FIT = FitConfig()  # the official recipe
ENCODER_KEYS = ("text_encoder", "text_encoder_2")  # tensor names, diffusers' component names


# -- names ----------------------------------------------------------------------------------
def read_names(path: Path | str = NAMES_FILE) -> list[str]:
    """The names of a list file: stripped, blank lines and ``#`` comments dropped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def canonical_names(names: Sequence[str]) -> list[str]:
    """De-duplicated, sorted names: the order the basis is built in."""
    return sorted({n.strip() for n in names if n.strip()})


def names_digest(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(canonical_names(names)).encode()).hexdigest()


# -- construction ---------------------------------------------------------------------------
def position_rows(names: Sequence[str], tokenizer, table: torch.Tensor
                  ) -> list[torch.Tensor]:
    """Raw token-table rows at positions 1 and 2 of each canonical name: ``[(n_k, dim)] x 2``."""
    special = set(tokenizer.all_special_ids)
    # The real CLIP vocabulary puts its specials at >= 49406; the tiny test
    # vocabularies put them elsewhere, so skip by both rules.
    rows: list[list[int]] = [[] for _ in range(N_POS)]
    for name in canonical_names(names):
        ids = tokenizer(name).input_ids  # [bos, t1, t2, ..., eos]
        for k in range(N_POS):
            pos = k + 1
            if pos < len(ids) and ids[pos] < CLIP_FIRST_SPECIAL and ids[pos] not in special:
                rows[k].append(ids[pos])
    return [table[torch.tensor(r, dtype=torch.long)] for r in rows]


def basis_from_rows(rows: torch.Tensor, n: int = N_COEF) -> torch.Tensor:
    """``(m, dim)`` rows -> ``(1 + n, dim)``: mean, then the top-``n`` right singular vectors.

    float64 SVD on one thread, so the bits do not depend on float32 accumulation order or
    the core count.
    Zero rows pad the basis when fewer than ``n`` vectors exist.
    """
    x = rows.double()
    mean = x.mean(0)
    with single_thread():
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)  # vh: (min(m, dim), dim)
    vecs = vh[:n]
    if vecs.shape[0] < n:
        vecs = torch.cat([vecs, vecs.new_zeros(n - vecs.shape[0], x.shape[1])])
    return torch.cat([mean[None], vecs]).float()


def build_basis_tensor(names: Sequence[str], tokenizer, table: torch.Tensor) -> torch.Tensor:
    """One text encoder's ``(2, 513, dim)`` basis tensor."""
    return torch.stack([basis_from_rows(r) for r in position_rows(names, tokenizer, table)])


@dataclass(frozen=True)
class CelebBasisObject:
    """A Celeb Basis: ``(2, 513, dim)`` per text encoder, content-addressed.

    ``tensors`` maps ``"text_encoder"`` (and, for SDXL, ``"text_encoder_2"``)
    to the tensor. ``text_encoder`` says which token table(s) it was built
    from; ``source`` where the names came from (a names digest or a file).
    """

    tensors: dict[str, torch.Tensor]
    text_encoder: str
    source: str
    _payload: bytes = field(default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        for key, t in self.tensors.items():
            if key not in ENCODER_KEYS:
                raise ValueError(f"unknown text encoder key {key!r}")
            if t.dim() != 3 or t.shape[0] != N_POS or t.shape[1] != N_COEF + 1:
                raise ValueError(f"a basis tensor is (2, 513, dim), got {tuple(t.shape)}")
        if "text_encoder" not in self.tensors:
            raise ValueError("a basis needs at least the 'text_encoder' tensor")
        if not self._payload:
            meta = {"format": FORMAT, "text_encoder": self.text_encoder, "source": self.source}
            object.__setattr__(self, "_payload", _canonical_safetensors(self.tensors, meta))

    @property
    def payload(self) -> bytes:
        return self._payload

    @property
    def id(self) -> str:
        return hashlib.sha256(self._payload).hexdigest()

    @property
    def encoders(self) -> list[str]:
        return [k for k in ENCODER_KEYS if k in self.tensors]

    def mean(self, encoder: str = "text_encoder") -> torch.Tensor:
        return self.tensors[encoder][:, 0]  # (2, dim)

    def basis(self, encoder: str = "text_encoder") -> torch.Tensor:
        return self.tensors[encoder][:, 1:]  # (2, 512, dim)

    @classmethod
    def from_payload(cls, payload: bytes) -> CelebBasisObject:
        tensors = safetensors.torch.load(payload)
        header_len = int.from_bytes(payload[:8], "little")
        meta = json.loads(payload[8:8 + header_len]).get("__metadata__", {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a Celeb Basis payload (format {meta.get('format')!r})")
        return cls(tensors, meta.get("text_encoder", ""), meta.get("source", ""), payload)


def _canonical_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> bytes:
    """A safetensors file with a byte-stable header (sorted keys, no spaces).

    The id is a hash of these bytes, so they must not depend on the library:
    safetensors' own writer orders the metadata map differently from one
    process to the next.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(meta.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        data = tensors[name].detach().float().contiguous().cpu().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def _table_id(table: torch.Tensor) -> str:
    return hashlib.sha256(table.detach().float().contiguous().cpu().numpy().tobytes()
                          ).hexdigest()[:16]


def build_basis(names: Sequence[str], encoders: Sequence[tuple[object, nn.Module]],
                *, source: str | None = None) -> CelebBasisObject:
    """Build the basis of ``(tokenizer, text_encoder)`` pairs: one for SD1.x, two for SDXL."""
    if not 1 <= len(encoders) <= 2:
        raise ValueError("a basis has one or two text encoders")
    tensors, ids = {}, []
    for key, (tokenizer, encoder) in zip(ENCODER_KEYS, encoders, strict=False):
        table = encoder.get_input_embeddings().weight.detach().cpu()
        tensors[key] = build_basis_tensor(names, tokenizer, table)
        ids.append(f"{key}:tokens@{_table_id(table)}")
    return CelebBasisObject(tensors, "+".join(ids),
                            source or f"names:sha256:{names_digest(names)}")


def default_basis(model: DiffusionModel, names_file: Path | str = NAMES_FILE
                  ) -> CelebBasisObject:
    """The project's basis for ``model``: its names list over the model's token table(s)."""
    names = read_names(names_file)
    return build_basis(names, model.encoders,
                       source=f"{Path(names_file).name}:sha256:{names_digest(names)}")


def import_official_basis(path: Path | str) -> CelebBasisObject:
    """An official ``celeb_basis.pt`` (a ``(2, 513, 768)`` tensor, SD1.x CLIP-L)."""
    t = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(t, dict):  # some copies wrap the tensor in a one-key dict
        if len(t) != 1:
            raise ValueError(f"{path}: expected one tensor, got keys {sorted(t)}")
        t = next(iter(t.values()))
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (N_POS, N_COEF + 1, 768):
        raise ValueError(f"{path}: expected a (2, 513, 768) tensor")
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return CelebBasisObject({"text_encoder": t.float()}, "clip-vit-large-patch14 (official)",
                            f"official:{Path(path).name}:sha256:{digest}")


# -- storage (session-level service: the caller owns the transaction) -------------------------
def store_basis(session: Session, basis: CelebBasisObject) -> str:
    """Add ``basis`` to the ``celeb_bases`` table unless present; returns its id."""
    from vault.models import CelebBasis

    if session.get(CelebBasis, basis.id) is None:
        session.add(CelebBasis(id=basis.id, text_encoder=basis.text_encoder[:128],
                               source=basis.source[:200], payload=basis.payload))
        session.flush()
    return basis.id


def load_basis(session: Session, basis_id: str) -> CelebBasisObject:
    """The stored basis ``basis_id``, its payload checked against its id."""
    from vault.errors import IntegrityError, NotFound
    from vault.models import CelebBasis

    row = session.get(CelebBasis, basis_id)
    if row is None:
        raise NotFound(f"no Celeb Basis {basis_id}")
    if hashlib.sha256(row.payload).hexdigest() != basis_id:
        raise IntegrityError(f"Celeb Basis {basis_id}: payload does not match its id")
    return CelebBasisObject.from_payload(row.payload)


def ensure_default_basis(session: Session, model: DiffusionModel) -> CelebBasisObject:
    basis = default_basis(model)
    store_basis(session, basis)
    return basis


# -- the mapper -----------------------------------------------------------------------------
class EqualLinear(nn.Module):
    """StyleGAN2's equalised-learning-rate linear (rosinality's semantics).

    ``weight ~ N(0, 1) / lr_mul``, ``bias = bias_init``; forward uses
    ``weight * lr_mul / sqrt(in_dim)`` and ``bias * lr_mul``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, bias_init: float = 0.0,
                 lr_mul: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim, generator=generator) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class CoefficientMapper(nn.Module):
    """Face embedding ``(B, 512)`` -> coefficients ``(B, 2, 512)``, each half unit-norm."""

    def __init__(self, face_dim: int = FACE_DIM, *, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.linear = EqualLinear(face_dim, N_POS * N_COEF, generator=g)

    def forward(self, face: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.linear(face), 0.2)  # (B, 1024)
        return F.normalize(x.view(-1, N_POS, N_COEF), dim=-1)  # (B, 2, 512)


def token_embeddings(coefficients: torch.Tensor, basis: CelebBasisObject,
                     encoder: str = "text_encoder") -> torch.Tensor:
    """``(..., 2, 512)`` coefficients -> ``(..., 2, dim)``: ``coef_k @ basis_k + mean_k``."""
    b = basis.basis(encoder).to(coefficients)  # (2, 512, dim)
    return torch.einsum("...kc,kcd->...kd", coefficients, b) + basis.mean(encoder).to(coefficients)


# -- the fit --------------------------------------------------------------------------------
class _CoefficientObjective(Objective):
    def __init__(self, mapper: CoefficientMapper, faces: torch.Tensor, basis: CelebBasisObject,
                 ema_decay: float) -> None:
        self.mapper, self.faces, self.basis = mapper, faces, basis  # faces: (S, 512)
        self.decay = ema_decay
        with torch.no_grad():
            self.ema = mapper(faces).clone()  # (S, 2, 512)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.mapper.parameters())

    def conditioning(self, model, subjects, prompts, resolution):
        coef = self.mapper(self.faces[subjects])  # (B, 2, 512)
        overrides = [token_embeddings(coef, self.basis, key)
                     for key, _ in zip(ENCODER_KEYS, model.encoders, strict=False)]
        return model.encode(prompts, overrides=overrides, resolution=resolution)

    def after_step(self) -> None:
        with torch.no_grad():
            self.ema.mul_(self.decay).add_(self.mapper(self.faces), alpha=1 - self.decay)

    def state_dict(self) -> dict:
        return {"mapper": self.mapper.state_dict(), "ema": self.ema.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.mapper.load_state_dict(state["mapper"])
        self.ema.copy_(state["ema"])


@dataclass
class CoefficientFit:
    coefficients: torch.Tensor  # (S, 2, 512): the EMA, one row per identity
    mapper: CoefficientMapper
    fit: FitResult


def fit_coefficients(model: DiffusionModel, basis: CelebBasisObject,
                     faces: Sequence[torch.Tensor], images: Sequence[Sequence[torch.Tensor]],
                     cfg: FitConfig = DEFAULT_FIT, *, resume: bytes | None = None,
                     save: Callable[[int, bytes], None] | None = None,
                     progress: Callable[[int, int, float], None] | None = None
                     ) -> CoefficientFit:
    """Fit one shared mapper for identities ``s`` (face embedding ``faces[s]`` ``(1, 512)``,
    photos ``images[s]``); returns each identity's EMA coefficients ``(2, 512)``.

    Runs ``cfg.steps`` x number of identities steps (400 per identity).
    """
    if len(faces) != len(images) or not faces:
        raise ValueError("one face embedding per identity's photo list")
    dims = model.text_dims
    for key, dim in zip(ENCODER_KEYS, dims, strict=False):
        if key not in basis.tensors or basis.tensors[key].shape[-1] != dim:
            raise ValueError(f"basis {basis.id[:12]} does not fit this model's {key} ({dim}-d)")
    face = F.normalize(torch.cat([f.reshape(1, -1).float() for f in faces]), dim=-1)
    mapper = CoefficientMapper(face.shape[1], seed=cfg.seed)
    objective = _CoefficientObjective(mapper, face, basis, EMA_DECAY)
    subject = SUBJECT.format(PLACEHOLDER)
    result = run_fit(model, objective, images, cfg,
                     prompt=lambda s, template: template.format(subject),
                     total_steps=cfg.steps * len(faces), resume=resume, save=save,
                     progress=progress)
    return CoefficientFit(objective.ema.detach().clone(), mapper, result)


def coefficients_payload(coefficients: torch.Tensor, *, basis_id: str, model_id: str) -> bytes:
    """A ``celeb_basis`` artifact payload (coefficients ``(2, 512)`` float32)."""
    from vault import codec

    arr = coefficients.detach().float().cpu().numpy().reshape(N_POS, N_COEF)
    return codec.encode("celeb_basis", {"coefficients": np.ascontiguousarray(arr)},
                        {"model_id": model_id, "basis_id": basis_id})


__all__ = [
    "NAMES_FILE", "CelebBasisObject", "CoefficientFit", "CoefficientMapper", "EqualLinear",
    "basis_from_rows", "build_basis", "build_basis_tensor", "canonical_names",
    "coefficients_payload", "default_basis", "ensure_default_basis", "fit_coefficients",
    "import_official_basis", "load_basis", "names_digest", "position_rows", "read_names",
    "store_basis", "token_embeddings",
]
