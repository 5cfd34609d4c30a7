"""Fixtures of the node pack's tests: the idvault app on waitress on loopback (a real
server the nodes reach over HTTP), as ``idvault serve`` runs it."""

from __future__ import annotations

import threading

import pytest

from web.serve import make_server, server_url


@pytest.fixture
def backend() -> str:
    return "sqlite"


def _serve(app):
    server = make_server(app, "127.0.0.1", 0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    return server


@pytest.fixture
def live(web):
    """``web``'s app served on a free loopback port; yields its base URL."""
    server = _serve(web.app)
    yield server_url(server).rstrip("/")
    server.close()


@pytest.fixture
def live_gen(gen_web):
    """``gen_web``'s app (the tiny SDXL) served with its embedded job worker running."""
    gen_web.state.jobs.start()
    server = _serve(gen_web.app)
    yield server_url(server).rstrip("/")
    server.close()
