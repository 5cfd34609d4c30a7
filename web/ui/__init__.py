"""The HTML UI: server-rendered pages over the same services as the API.

One blueprint per area, nested in ``ui``: ``account`` (sign-in, password,
owner switch, new owners), ``roster`` (identities, enrollment wizard,
identity page, jobs), ``reviews``, ``admin`` (API keys, members), ``audit``
(the owner's audit log, for admins), ``receipts`` (download and verify
erasure receipts) and ``public`` (the retention policy, the generation
page). Forms carry a CSRF token; pages need a signed-in user with a role in
the current owner (see ``web.auth``). A little vanilla JavaScript
(``static/app.js``) adds per-photo feedback and the wizard's steps; every
form also works without it. Jinja filters: ``web.ui.filters``.
"""

from __future__ import annotations

from flask import Blueprint


def create_ui_blueprint() -> Blueprint:
    from web.ui import account, admin, audit, filters, public, receipts, reviews, roster

    ui = Blueprint("ui", __name__)
    for module in (account, roster, reviews, admin, audit, receipts, public):
        ui.register_blueprint(module.bp)
    for name, fn in filters.FILTERS.items():
        ui.add_app_template_filter(fn, name)
    return ui
