"""idvault's ComfyUI node pack: identities from a running idvault server, by handle.

Copy or symlink this folder into ``ComfyUI/custom_nodes`` (docs/comfyui.md). The nodes
are clients of the server's JSON API with a scoped API key; they never open the vault's
database or key file. The Identity and Scene nodes need only ComfyUI's own Python
packages (standard library, torch, safetensors; PIL to read the PNG); the apply and
loader nodes also need idvault importable for its model code.

Nodes use ComfyUI's classic schema (``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION``,
``NODE_CLASS_MAPPINGS``): ComfyUI documents its V3 schema (``comfy_api.latest``) as still
changing without notice, and every ComfyUI release loads the classic one.
"""

from .apply import (
    IdvaultApplyFaceID,
    IdvaultApplyInstantID,
    IdvaultLoadFaceID,
    IdvaultLoadInstantID,
)
from .identity import IdvaultIdentity
from .scene import IdvaultScene

NODE_CLASS_MAPPINGS = {
    "IdvaultIdentity": IdvaultIdentity,
    "IdvaultScene": IdvaultScene,
    "IdvaultLoadFaceID": IdvaultLoadFaceID,
    "IdvaultApplyFaceID": IdvaultApplyFaceID,
    "IdvaultLoadInstantID": IdvaultLoadInstantID,
    "IdvaultApplyInstantID": IdvaultApplyInstantID,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "IdvaultIdentity": "idvault Identity",
    "IdvaultScene": "idvault Scene",
    "IdvaultLoadFaceID": "idvault Load FaceID Adapter",
    "IdvaultApplyFaceID": "idvault Apply FaceID",
    "IdvaultLoadInstantID": "idvault Load InstantID Adapter",
    "IdvaultApplyInstantID": "idvault Apply InstantID",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
