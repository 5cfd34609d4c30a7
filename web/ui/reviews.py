"""The dedupe review queue: held enrollments, accept (different people) or reject."""

from __future__ import annotations

from flask import Blueprint, redirect, request, url_for

from vault.models import REVIEW_STATUSES
from web.api.reviews import own_review
from web.auth import ui_login_required
from web.ui.common import me, notice, page, state
from web.ui.receipts import show as show_receipt

bp = Blueprint("reviews", __name__)


@bp.route("/reviews")
@ui_login_required("identities:read")
def queue():
    p = me()
    status = request.args.get("status", "pending")
    if status not in REVIEW_STATUSES:
        status = "pending"
    return page("reviews.html", reviews=state().vault.list_reviews(p.owner, status=status),
                status=status, statuses=REVIEW_STATUSES)


@bp.route("/reviews/<int:review_id>/<any(accept, reject):decision>", methods=["POST"])
@ui_login_required("identities:write")
def decide(review_id: int, decision: str):
    p = me()
    own_review(review_id, p.owner)
    st = state()
    doc = st.vault.decide_review(review_id, decision == "accept", actor=p.actor)
    if decision == "accept":
        notice(f"{doc['handle']} is active; recorded as not the same person as "
               f"{doc['candidate']}.")
        return redirect(url_for("ui.reviews.queue"))
    return show_receipt(doc["receipt"], handle=doc["handle"], rejected=True)
