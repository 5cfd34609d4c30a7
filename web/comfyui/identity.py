"""The "idvault Identity" node: a handle in, the identity's stored embeddings out.

The node asks the server for the identity's metadata (scope ``identities:read``), picks
the artifact of the chosen kind (``faceid`` or ``instantid``), and downloads it decrypted
under the caller's consent purpose (scope ``artifacts:read``; the server checks consent
and audits the read). The output, an ``IDVAULT_IDENTITY``, is a dict::

    {"handle": "smiths/ana", "kind": "faceid", "artifact_id": ..., "sha256": ...,
     "model_id": ..., "purpose": "generate", "metadata": {...},
     "tensors": {name: torch.Tensor}}        # the artifact's tensors, as stored

Caching. The node keeps nothing. ComfyUI keeps a node's last outputs and reuses them
while the node's inputs and its ``IS_CHANGED`` value stay the same; ``IS_CHANGED`` asks
the server every time a prompt is queued and returns the artifact's id and SHA-256 with
the consent record's id and status. A re-enrolled or replaced artifact gets a new id, so
the node runs again; a withdrawn consent, an erased identity or a revoked key makes
``IS_CHANGED`` raise, which ComfyUI treats as "changed" (NaN), and the node's run then
raises the server's refusal: a stale output is never used.
"""

from __future__ import annotations

import json
import struct

from .client import DEFAULT_KEY_ENV, Client, ConsentRefused, NotFoundError, resolve_key

__all__ = ["IdvaultIdentity", "decode_payload", "pick_artifact"]

KINDS = ("faceid", "instantid")
PURPOSES = ("generate", "personalize", "share")
CATEGORY = "idvault"


def connection_inputs() -> dict:
    """The server and key widgets every idvault node has."""
    return {
        "server_url": ("STRING", {"default": "http://127.0.0.1:8080"}),
        "api_key_env": ("STRING", {"default": DEFAULT_KEY_ENV,
                                   "tooltip": "environment variable holding the API key"}),
        "api_key": ("STRING", {"default": "", "tooltip": "leave empty: a key typed here is "
                               "saved in the workflow and in every image's metadata"}),
    }


def pick_artifact(identity: dict, kind: str, model_id: str = "") -> dict:
    """The identity's artifact of ``kind`` (and ``model_id`` when given), or a clear error."""
    handle = identity["handle"]
    found = [a for a in identity["artifacts"]
             if a["kind"] == kind and (not model_id or a["model_id"] == model_id)]
    if not found:
        what = f"{kind} artifact" + (f" for model {model_id}" if model_id else "")
        kinds = sorted({a["kind"] for a in identity["artifacts"]}) or ["none"]
        raise NotFoundError(f"{handle} has no {what} (it has: {', '.join(kinds)}); add it with "
                            f"`idvault add-kinds {handle} PHOTO... --kinds {kind}`")
    if len(found) > 1:
        raise NotFoundError(f"{handle} has {len(found)} {kind} artifacts; choose one with "
                            f"model_id: {', '.join(sorted(a['model_id'] for a in found))}")
    return found[0]


def check_consent(identity: dict, purpose: str) -> None:
    consent = identity["consent"]
    if consent.get("status") != "active" or identity.get("status") == "withdrawn":
        raise ConsentRefused(f"consent for {identity['handle']} is {consent.get('status')}: "
                             "its artifacts may not be used")
    if purpose not in consent.get("purposes", ()):
        raise ConsentRefused(f"consent for {identity['handle']} does not grant {purpose!r} "
                             f"(it grants: {', '.join(consent.get('purposes', ()))})")


def decode_payload(payload: bytes) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a safetensors payload (torch tensors, string metadata)."""
    from safetensors.torch import load

    (length,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8:8 + length].decode("utf-8"))
    return load(payload), dict(header.get("__metadata__") or {})


class IdvaultIdentity:
    """A handle in; the identity's stored embeddings out (see the module docstring)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IDVAULT_IDENTITY",)
    RETURN_NAMES = ("identity",)
    FUNCTION = "load"
    DESCRIPTION = ("An identity's FaceID or InstantID embeddings from an idvault server, "
                   "decrypted under your consent purpose.")

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {"required": {
            **connection_inputs(),
            "handle": ("STRING", {"default": "owner/name"}),
            "kind": (list(KINDS), {"default": "faceid"}),
            "purpose": (list(PURPOSES), {"default": "generate"}),
        }, "optional": {
            "model_id": ("STRING", {"default": "", "tooltip": "which artifact, when the "
                                    "identity has several of the kind"}),
        }}

    @classmethod
    def IS_CHANGED(cls, server_url: str, api_key_env: str, api_key: str, handle: str,  # noqa: N802
                   kind: str, purpose: str, model_id: str = "") -> str:
        """The artifact's current id and SHA-256 and the consent's id and status; raises
        when the identity is gone, its consent refuses ``purpose`` or the key is refused."""
        client = Client(server_url, resolve_key(api_key, api_key_env))
        identity = client.identity(handle)
        check_consent(identity, purpose)
        art = pick_artifact(identity, kind, model_id)
        return (f"{art['id']}:{art['sha256']}:{identity['consent']['id']}:"
                f"{identity['consent']['status']}:{purpose}")

    def load(self, server_url: str, api_key_env: str, api_key: str, handle: str, kind: str,
             purpose: str, model_id: str = "") -> tuple[dict]:
        client = Client(server_url, resolve_key(api_key, api_key_env))
        identity = client.identity(handle)
        art = pick_artifact(identity, kind, model_id)
        payload = client.artifact_payload(identity["handle"], art["id"], purpose)
        tensors, metadata = decode_payload(payload)
        if metadata.get("idvault.kind", kind) != kind:
            raise NotFoundError(f"artifact {art['id']} of {handle} is a "
                                f"{metadata.get('idvault.kind')} artifact, not {kind}")
        return ({"handle": identity["handle"], "kind": kind, "artifact_id": art["id"],
                 "sha256": art["sha256"], "model_id": art["model_id"], "purpose": purpose,
                 "metadata": metadata, "tensors": tensors},)
