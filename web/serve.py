"""Serving the app on waitress, a production WSGI server (never Flask's dev server).

``idvault serve`` calls :func:`serve`; benchmarks and tests use
:func:`make_server` to run the same server on a free loopback port.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable

from flask import Flask

from vault import accounts

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_THREADS = 8


def make_server(app: Flask, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                threads: int = DEFAULT_THREADS):
    """A waitress server for ``app`` bound to ``host:port`` (port 0: any free port)."""
    from waitress import create_server

    limit = app.config.get("MAX_CONTENT_LENGTH") or 0
    return create_server(
        app, host=host, port=port, threads=threads, ident="idvault",
        # waitress refuses larger bodies before Flask sees them; Flask's limit
        # gives the JSON error for bodies that declare their length.
        max_request_body_size=max(limit * 2, 1024 * 1024),
        max_request_header_size=64 * 1024, connection_limit=200, channel_timeout=120,
        expose_tracebacks=False, clear_untrusted_proxy_headers=True)


def server_url(server) -> str:
    host = str(server.effective_host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{server.effective_port}/"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def first_start(app: Flask, echo: Callable[[str], None]) -> None:
    """Tell how to sign in; on the very first start, create the first superuser."""
    vault = app.extensions["idvault"].vault
    with vault.session() as s:
        if accounts.count_users(s) == 0:
            _, password = accounts.create_user(s, "admin", superuser=True,
                                                 actor="serve:first-start")
            echo("first start: created the superuser 'admin' (admin of every owner) with "
                 "this one-time password:")
            echo(f"    {password}")
            echo("sign in as admin with it; you will be asked to choose your own. It is not "
                 "stored and not shown again (`idvault user passwd admin` makes a new one).")
        else:
            echo("sign in with your account; `idvault user add NAME --owner OWNER --role "
                 "admin` creates one, `idvault user passwd NAME` resets a password")


def _stop_on_sigterm() -> None:
    """Stop cleanly on SIGTERM (service managers, `timeout`), as on Ctrl-C."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def serve(app: Flask, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
          threads: int = DEFAULT_THREADS, echo: Callable[[str], None] = print) -> None:
    """Run until interrupted; prints the URL and how to sign in."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                                                   "%(message)s")
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = make_server(app, host, port, threads=threads)
    url = server_url(server)
    echo(f"idvault serving on {url} (waitress, {threads} threads)")
    echo(f"  UI: {url}   API: {url}v1/   OpenAPI: {url}v1/openapi.json")
    if not is_loopback(host):
        echo("  warning: listening beyond this machine; put it behind a TLS-terminating "
             "proxy and set IDVAULT_TRUST_PROXY=1 so cookies are marked Secure")
    first_start(app, echo)
    _stop_on_sigterm()
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        app.extensions["idvault"].close()
        echo("stopped")
