"""Helpers shared by the UI areas."""

from __future__ import annotations

from urllib.parse import urlparse

from flask import current_app, flash, render_template

from web.auth import Principal, current_principal


def state():
    return current_app.extensions["idvault"]


def me() -> Principal:
    p = current_principal()
    assert p is not None
    return p


def page(template: str, http_status: int = 200, /, **ctx):
    return render_template(template, **ctx), http_status


def safe_next(target: str | None, default: str) -> str:
    """Only same-site relative paths (no scheme, no host, no '//')."""
    if not target:
        return default
    parts = urlparse(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") \
            or "\\" in target:
        return default
    return target


def notice(message: str, kind: str = "ok") -> None:
    flash(message, kind)
