"""The public retention-policy page and the generation page (a placeholder for now)."""

from __future__ import annotations

from flask import Blueprint

from vault.consent import PURPOSES
from web.auth import ui_login_required
from web.ui.common import me, page, state

bp = Blueprint("public", __name__)


@bp.route("/retention-policy")
def retention_policy():
    s = state().vault.settings
    return page("retention.html", purposes=PURPOSES, block=s.dedupe_block,
                review=s.dedupe_review)


@bp.route("/generate")
@ui_login_required("identities:read")
def generate():
    p = me()
    usable = [i["handle"] for i in state().vault.list_identities(p.owner)
              if i["consent"]["status"] == "active" and "generate" in i["consent"]["purposes"]
              and i["status"] == "active"]
    return page("generate.html", usable=usable)
