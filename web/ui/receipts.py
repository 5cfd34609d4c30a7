"""Signed erasure receipts in the UI: shown verified, downloaded as a file, checked later.

Every receipt page checks the signature with ``Vault.verify_receipt`` on the server, so
what it says ("signature verified", with the key id) is the vault's own check, not a
label. The download and the check take the receipt back from the browser (a receipt is
shown once: the identity it is about is gone), verify it again and refuse one that does
not verify.
"""

from __future__ import annotations

import json
import re

from flask import Blueprint, Response, request

from vault.errors import InvalidInput, SignatureInvalid
from web.auth import ui_login_required
from web.ui.common import page, state

bp = Blueprint("receipts", __name__)
MAX_RECEIPT_BYTES = 256 * 1024  # a receipt lists ids and digests: a few KiB


def verification(signed: dict) -> dict:
    """``{"verified": True, "key_id", "alg"}`` or ``{"verified": False, "reason"}``."""
    try:
        state().vault.verify_receipt(signed)
    except (SignatureInvalid, InvalidInput) as exc:
        return {"verified": False, "reason": str(exc)}
    sig = signed["signature"]
    return {"verified": True, "key_id": sig.get("key_id"), "alg": sig.get("alg", "Ed25519")}


def filename(signed: dict) -> str:
    """``erasure-receipt-OWNER-NAME-YYYYMMDD.json``, from the receipt's own fields."""
    receipt = signed.get("receipt") if isinstance(signed, dict) else None
    receipt = receipt if isinstance(receipt, dict) else {}
    handle = str(receipt.get("handle") or "identity").replace("/", "-")
    day = str(receipt.get("erased_at") or "")[:10].replace("-", "")
    stem = "-".join(x for x in ("erasure-receipt", handle, day) if x)
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)[:120] + ".json"


def show(signed: dict, *, handle: str, status: int = 200, **flags):
    """The receipt page of an erasure that just happened."""
    return page("receipt.html", status, handle=handle, signed=signed,
                receipt=json.dumps(signed, indent=2, sort_keys=True),
                check=verification(signed), filename=filename(signed), **flags)


def _submitted() -> tuple[dict | None, str | None]:
    """The receipt from the form (a file, else the text field), parsed; or why not."""
    upload = request.files.get("file")
    if upload is not None and upload.filename:
        raw = upload.read(MAX_RECEIPT_BYTES + 1)
    else:
        raw = request.form.get("receipt", "").encode()
    if not raw.strip():
        return None, "paste a receipt or choose its .json file"
    if len(raw) > MAX_RECEIPT_BYTES:
        return None, f"a receipt is at most {MAX_RECEIPT_BYTES // 1024} KiB"
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None, "not JSON: a receipt is the .json file idvault gave at the erasure"
    if not isinstance(doc, dict):
        return None, "not an idvault receipt (needs 'receipt' and 'signature')"
    return doc, None


@bp.route("/receipts/download", methods=["POST"])
@ui_login_required("identities:read")
def download():
    signed, error = _submitted()
    check = verification(signed) if signed is not None else None
    if signed is None or not check["verified"]:
        return page("receipt_check.html", 400, error=error, signed=signed, check=check,
                    receipt=request.form.get("receipt", ""))
    body = json.dumps(signed, indent=2, sort_keys=True) + "\n"
    return Response(body, mimetype="application/json", headers={
        "Content-Disposition": f'attachment; filename="{filename(signed)}"',
        "Cache-Control": "no-store"})


@bp.route("/receipts/verify", methods=["GET", "POST"])
@ui_login_required("identities:read")
def verify():
    if request.method == "GET":
        return page("receipt_check.html")
    signed, error = _submitted()
    check = verification(signed) if signed is not None else None
    status = 200 if check and check["verified"] else 400
    return page("receipt_check.html", status, error=error, signed=signed, check=check,
                receipt=json.dumps(signed, indent=2, sort_keys=True) if signed is not None
                else request.form.get("receipt", ""))
