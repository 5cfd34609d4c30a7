"""The HTML UI: server-rendered pages over the same services as the API.

One blueprint per area, nested in ``ui``: ``account`` (sign-in, password,
owner switch, new owners), ``roster`` (identities, enrollment wizard,
identity page), ``reviews``, ``admin`` (API keys, members) and ``public``
(the retention policy, the generation page). Forms carry a CSRF token;
pages need a signed-in user with a role in the current owner (see
``web.auth``). A little vanilla JavaScript (``static/app.js``) adds
per-photo feedback and the wizard's steps; every form also works without it.
"""

from __future__ import annotations

from flask import Blueprint


def create_ui_blueprint() -> Blueprint:
    from web.ui import account, admin, public, reviews, roster

    ui = Blueprint("ui", __name__)
    for module in (account, roster, reviews, admin, public):
        ui.register_blueprint(module.bp)
    return ui
