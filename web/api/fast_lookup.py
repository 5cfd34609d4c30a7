"""The lookup by handle on a short path: WSGI middleware in front of the Flask app.

``GET /v1/identities/{owner}/{name}`` with an API key is most of what a service sends
(issue 14). Through Flask it cost ~250 µs of CPU in process on the 2-core machine, of
which the lookup's own work -- the key check, tenancy, one SELECT, the JSON -- was
~100 µs; the rest was Flask's request context, routing, response object and hooks.
:class:`FastLookup` serves the *successful* lookup itself, with the functions the Flask
view calls (``api_keys.verify``, ``Handle.parse``, ``identities.describe_handle``, the
app's JSON provider) and the same bytes and headers. Anything else passes to the Flask
app untouched, which answers it exactly as before, doing every check again:

* another method or path, a query string, no ``Authorization: Bearer`` header;
* a key that is refused (unknown, revoked, expired), lacks ``identities:read``, or is
  due for its once-a-minute ``last_used_at`` write;
* a malformed handle, another owner's handle, no such identity;
* any error at all (it is raised again there, and answered and logged as usual);
* an app configured to check the Host header (``SERVER_NAME``, ``TRUSTED_HOSTS``).

It skips Flask's request hooks; the app's only one, ``password_change_gate``, passes
every request that carries an API key. A test fails when a hook is added, so that
whoever adds one decides here whether lookups need it.

Nothing is cached: the key and the identity are read on every request, so a
revocation, an erasure or a withdrawal holds on the next one in every process.
tests/web/api/test_fast_lookup.py compares the two paths byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from vault import api_keys, identities
from vault.handles import Handle

SCOPE = "identities:read"  # the scope web.api.identities.get_identity requires
# The only GET route with two segments under /v1/identities (a test checks the URL map).
PATH = re.compile(r"/v1/identities/([^/]+)/([^/]+)\Z")


class FastLookup:
    """WSGI middleware: successful lookups by handle here, every other request to ``app``."""

    def __init__(self, app: Callable, state, flask_app) -> None:
        """``app``: the Flask app's WSGI callable; ``state``: its ``AppState`` (the read
        connection); ``flask_app``: for its JSON provider and debug flag."""
        self.app = app
        self.state = state
        self.flask_app = flask_app

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        body = self._lookup(environ)
        if body is None:
            return self.app(environ, start_response)
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    def _lookup(self, environ: dict) -> bytes | None:
        """The response body, or None for Flask to answer."""
        if environ.get("REQUEST_METHOD") != "GET" or environ.get("QUERY_STRING"):
            return None
        config = self.flask_app.config
        if config.get("SERVER_NAME") is not None or config.get("TRUSTED_HOSTS") is not None:
            return None  # Flask checks the Host header against them
        path = environ.get("PATH_INFO", "")
        m = PATH.match(path)
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if m is None or not path.isascii() or scheme.lower() != "bearer" or not token:
            return None
        try:
            handle = Handle.parse(f"{m[1]}/{m[2]}")
            with self.state.read_connection() as conn:
                key = api_keys.verify(conn, token)
                if (SCOPE not in key.scopes or key.owner != handle.owner
                        or api_keys.needs_touch(key)):
                    return None
                doc = identities.describe_handle(conn, handle)
        except Exception:  # noqa: BLE001 -- Flask answers it (and raises it again if it must)
            return None
        return self._json(doc)

    def _json(self, doc: dict) -> bytes:
        """What ``flask.jsonify(doc)`` sends (DefaultJSONProvider.response)."""
        provider = self.flask_app.json
        compact = getattr(provider, "compact", None)
        if (compact is None and self.flask_app.debug) or compact is False:
            args: dict = {"indent": 2}
        else:
            args = {"separators": (",", ":")}
        return f"{provider.dumps(doc, **args)}\n".encode()
