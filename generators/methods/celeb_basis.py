"""Celeb Basis as an identity method: two token embeddings per text encoder, regional.

A ``celeb_basis`` artifact holds coefficients ``(2, 512)`` and names its basis
(``basis_id``, a row of the vault's ``celeb_bases`` table) and the base model
it was fitted against (``model_id``). Per identity (METHODS.md section 4):

* The mention becomes its class word and the class token is repeated twice
  (``class_tokens`` = 2) in both SDXL tokenizers; those two positions' *input*
  embeddings are replaced, before each text encoder's transformer, by the
  identity's two token embeddings ``coef_k @ basis_k + mean_k`` of that
  encoder (:func:`encoders.fitting.celeb_basis.token_embeddings`). No token is added
  to a tokenizer and no embedding table is touched: the pipeline injects the
  vectors with a forward hook on the token-embedding module for the call.
* The two positions are the identity's text-fused tokens: the regional
  attention shows them only inside its box, like PhotoMaker's fused tokens.
  CLIP's causal attention would let the new embeddings change every later
  token of the prompt (the scene text, other identities) and the pooled
  embedding, which act everywhere; so with several identities each
  identity's positions are taken from an encoder pass with only its own
  vectors injected, and everything else from the plain pass. With one
  identity in a full-frame box the whole prompt (and the pooled embedding)
  comes from the injected pass: exactly what ``load_textual_inversion`` of
  the exported file gives (tested).

Refusals, all before any UNet work: no artifact fitted against this base
model (``model_id``, :func:`encoders.base_model_id.base_model_id`), and, after
decryption, a ``basis_id`` the vault does not hold or a basis without a tensor
for each text encoder (an SD1.x basis for SDXL).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from generators.methods.base import IdentityRequest
from generators.methods.fitted import FittedMethod
from vault.errors import InvalidInput, NotFound

__all__ = ["CelebBasisMethod"]


class CelebBasisMethod(FittedMethod):
    """See the module docstring."""

    name = "celeb_basis"
    artifact_kind = "celeb_basis"

    def __init__(self, models_dir, *, device, dtype, settings=None) -> None:
        super().__init__(models_dir, device=device, dtype=dtype, settings=settings)
        self.base_model_id = ""
        self._embeddings: dict[int, dict[str, torch.Tensor]] = {}  # request index -> vectors

    def load(self, unet) -> None:
        pass  # nothing beyond the base model

    def prepare(self, requests: Sequence[IdentityRequest]) -> None:
        """Resolve each artifact's basis and compute its token embeddings."""
        from encoders.fitting.celeb_basis import ENCODER_KEYS, load_basis, token_embeddings

        encoders = dict(zip(ENCODER_KEYS, (self.pipe.text_encoder, self.pipe.text_encoder_2),
                            strict=True))
        for r in requests:
            basis_id = r.opened.artifact.metadata.get("basis_id", "")
            try:
                with self.vault.session(read_only=True) as s:
                    basis = load_basis(s, basis_id)
            except NotFound:
                raise InvalidInput(f"{r.handle}'s celeb_basis artifact uses basis {basis_id}, "
                                   "which this vault does not hold", handle=r.handle) from None
            coef = torch.as_tensor(r.tensors["coefficients"], dtype=torch.float32)
            if coef.shape != (2, 512):
                raise InvalidInput(f"{r.handle}: Celeb Basis coefficients are (2, 512), got "
                                   f"{tuple(coef.shape)}", handle=r.handle)
            out = {}
            for key, encoder in encoders.items():
                if key not in basis.tensors:
                    raise InvalidInput(f"{r.handle}: basis {basis_id} has no {key} tensor (an "
                                       "SD1.x basis? SDXL needs one per text encoder)",
                                       handle=r.handle)
                table = encoder.get_input_embeddings().weight
                emb = token_embeddings(coef, basis, key)  # (2, dim)
                if emb.shape[-1] != table.shape[-1]:
                    raise InvalidInput(f"{r.handle}: basis {basis_id} is {emb.shape[-1]} wide "
                                       f"but {key} embeds {table.shape[-1]}", handle=r.handle)
                out[key] = emb.to(table.device, table.dtype)
            self._embeddings[r.index] = out

    def class_tokens(self, request: IdentityRequest) -> int:
        return 2

    def fuses_text(self) -> bool:
        return True  # the two positions are its regional tokens; fuse_text keeps them as is

    def input_embeddings(self, request: IdentityRequest) -> dict[str, torch.Tensor] | None:
        if request.index not in self._embeddings:
            raise InvalidInput(f"{request.handle}: Celeb Basis prepare() comes first")
        return self._embeddings[request.index]
