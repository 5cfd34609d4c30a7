"""Exports of stored artifacts for other tools, as safetensors bytes.

One function per format, shared by ``idvault artifact export`` and the API's
``/exports/<format>``:

``photomaker``         the PhotoMaker ID embeddings as stored (pre-fusion)
``textual_inversion``  a Celeb Basis identity as two new token embeddings per
                       text encoder, for diffusers' ``load_textual_inversion``
``diffusers_lora``     a LiDB identity as a PEFT-keyed LoRA for
                       ``load_lora_weights``; the frozen aux matrices are
                       regenerated at the base model's layer shapes, so the
                       base model's folder is needed
``reactor``            a ReActor face model from the ``face`` artifact
                       (:mod:`encoders.adapter_exports`)
``ip_adapter_embeds``  IP-Adapter-FaceID Plus v2 inputs in diffusers'
                       ``ip_adapter_image_embeds`` layout, from the ``faceid``
                       artifact (:mod:`encoders.adapter_exports`)

Every export decrypts through ``Vault.get_artifact`` with purpose ``share``:
consent must grant it, and the read is audited.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vault.errors import InvalidInput
from vault.vault import Vault

FORMATS = ("photomaker", "textual_inversion", "diffusers_lora", "reactor", "ip_adapter_embeds")


@dataclass(frozen=True)
class Export:
    data: bytes  # a safetensors file
    filename_suffix: str


def export(vault: Vault, handle: str, fmt: str, *, model_id: str | None = None,
           token: str | None = None, base_model: Path | None = None,
           actor: str | None = None) -> Export:
    """The ``fmt`` export of ``handle``'s artifact (see the module docstring)."""
    if fmt == "photomaker":
        return _photomaker(vault, handle, model_id, actor)
    if fmt == "textual_inversion":
        return _textual_inversion(vault, handle, model_id, token, actor)
    if fmt == "diffusers_lora":
        if base_model is None:
            raise InvalidInput("a diffusers LoRA export needs the base model's folder (the LiDB "
                               "aux matrices are regenerated at its layer shapes)")
        return _diffusers_lora(vault, handle, model_id, base_model, actor)
    if fmt == "reactor":
        from encoders.adapter_exports import reactor_face_model

        return Export(reactor_face_model(vault, handle, model_id=model_id, actor=actor),
                      "reactor-face-model")
    if fmt == "ip_adapter_embeds":
        from encoders.adapter_exports import ip_adapter_embeds

        return Export(ip_adapter_embeds(vault, handle, model_id=model_id, actor=actor),
                      "ip-adapter-faceid-embeds")
    raise InvalidInput(f"no export format {fmt!r} (formats: {', '.join(FORMATS)})")


def _photomaker(vault: Vault, handle: str, model_id: str | None, actor: str | None) -> Export:
    import numpy as np
    from safetensors.numpy import save

    art = vault.get_artifact(handle, "photomaker", model_id=model_id, purpose="share",
                             actor=actor).artifact
    embeds = np.ascontiguousarray(art.tensors["id_embeds"])  # (photos, tokens, 2048)
    data = save({"id_embeds": embeds}, metadata={
        "format": "idvault.photomaker-id-embeds/1", "model_id": art.model_id,
        "version": art.metadata.get("version", ""), "photos": str(embeds.shape[0]),
        "tokens_per_photo": str(embeds.shape[1])})
    return Export(data, "photomaker-id-embeds")


def _textual_inversion(vault: Vault, handle: str, model_id: str | None, token: str | None,
                       actor: str | None) -> Export:
    import safetensors.torch
    import torch

    from encoders.fitting import celeb_basis as cb
    from encoders.fitting import textual_inversion as ti

    opened = vault.get_artifact(handle, "celeb_basis", model_id=model_id, purpose="share",
                                actor=actor)
    with vault.session(read_only=True) as s:
        basis = cb.load_basis(s, opened.artifact.metadata["basis_id"])
    coef = torch.from_numpy(opened.artifact.tensors["coefficients"].astype("float32"))
    token = token or ti.default_token(handle)
    tensors = ti.state_dict(coef, basis, token)
    data = safetensors.torch.save(tensors, metadata={"token": token, "basis_id": basis.id,
                                                     "format": "textual-inversion"})
    return Export(data, "textual-inversion")


def _diffusers_lora(vault: Vault, handle: str, model_id: str | None, base_model: Path,
                    actor: str | None) -> Export:
    import safetensors.torch

    from encoders.fitting import lidb

    opened = vault.get_artifact(handle, "lidb", model_id=model_id, purpose="share",
                                actor=actor)
    weights = lidb.LidbWeights.from_artifact(opened.artifact)
    tensors = weights.to_diffusers(lidb.layers_from_folder(base_model))
    data = safetensors.torch.save(tensors, metadata={"format": "diffusers-lora",
                                                     "source": "idvault lidb",
                                                     "rank": str(weights.rank)})
    return Export(data, "lora")
