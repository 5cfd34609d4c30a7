"""Export a Celeb Basis identity as a textual-inversion file that diffusers loads.

A Celeb Basis artifact is coefficients ``(2, 512)`` over a stored basis; its
two token embeddings per text encoder (``coef_k @ basis_k + mean_k``,
:func:`encoders.fitting.celeb_basis.token_embeddings`) are exactly a 2-vector
textual-inversion token, so any diffusers pipeline can use the identity
without idvault:

* **SD1.x**: a safetensors file ``{token: (2, 768)}``, diffusers' own
  single-token layout, loaded with ``pipe.load_textual_inversion(path)``;
  the token expands to ``token token_1`` (two vocabulary entries).
* **SDXL**: ``{"clip_l": (2, 768), "clip_g": (2, 1280)}``, the layout
  diffusers documents for SDXL embeddings; load each half into its encoder::

      sd = safetensors.torch.load_file(path)
      pipe.load_textual_inversion(sd["clip_l"], token=TOKEN,
                                  text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
      pipe.load_textual_inversion(sd["clip_g"], token=TOKEN,
                                  text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)

  (:func:`load_into` does that). The token is recorded in the metadata.

The token must not already be in the vocabulary (diffusers refuses it):
the default is ``<idvault-OWNER-NAME>``, which no CLIP vocabulary holds.
The exported file holds a likeness: treat it like the artifact.
"""

from __future__ import annotations

import re
from pathlib import Path

import safetensors.torch
import torch

from encoders.fitting.celeb_basis import ENCODER_KEYS, CelebBasisObject, token_embeddings

SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def default_token(handle: str) -> str:
    return "<idvault-" + re.sub(r"[^a-z0-9]+", "-", handle.lower()).strip("-") + ">"


def embeddings(coefficients: torch.Tensor, basis: CelebBasisObject) -> dict[str, torch.Tensor]:
    """``{"text_encoder": (2, dim), ...}``: the identity's two token embeddings per encoder."""
    coef = torch.as_tensor(coefficients, dtype=torch.float32).reshape(2, -1)
    return {key: token_embeddings(coef, basis, key) for key in ENCODER_KEYS
            if key in basis.tensors}


def state_dict(coefficients: torch.Tensor, basis: CelebBasisObject, token: str
               ) -> dict[str, torch.Tensor]:
    """The textual-inversion tensors: ``{token: emb}`` (SD1.x) or ``clip_l``/``clip_g`` (SDXL)."""
    emb = embeddings(coefficients, basis)
    if len(emb) == 1:
        return {token: emb["text_encoder"].contiguous()}
    return {SDXL_KEYS[k]: v.contiguous() for k, v in emb.items()}


def write(path: str | Path, coefficients: torch.Tensor, basis: CelebBasisObject, token: str
          ) -> Path:
    path = Path(path)
    safetensors.torch.save_file(state_dict(coefficients, basis, token), str(path),
                                metadata={"token": token, "basis_id": basis.id,
                                          "format": "textual-inversion"})
    return path


def load_into(pipe, path: str | Path, token: str | None = None) -> str:
    """Load an exported file into an SD1.x or SDXL diffusers pipeline; returns the token."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        token = token or (f.metadata() or {}).get("token")
    sd = safetensors.torch.load_file(str(path))
    if "clip_l" in sd:
        pipe.load_textual_inversion(sd["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(sd["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        return token
    pipe.load_textual_inversion(str(path))
    return next(iter(sd))


__all__ = ["SDXL_KEYS", "default_token", "embeddings", "load_into", "state_dict", "write"]
