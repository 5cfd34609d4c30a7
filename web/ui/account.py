"""Signing in and out, the account page (password), the owner switch, new owners."""

from __future__ import annotations

from flask import Blueprint, redirect, request, url_for

from vault import accounts, login_throttle
from vault.errors import VaultError
from web.auth import (
    check_csrf,
    current_principal,
    refused,
    sign_in,
    sign_out,
    switch_owner,
    ui_login_required,
)
from web.errors import Forbidden, TooManyRequests
from web.ui.common import me, notice, page, safe_next, state

bp = Blueprint("account", __name__)


@bp.route("/login", methods=["GET", "POST"])
def login():
    next_url = safe_next(request.values.get("next"), url_for("ui.roster.roster"))
    if request.method == "GET":
        p = current_principal()
        if p is not None and p.via == "session":
            return redirect(next_url)
        return page("login.html", next_url=next_url)
    check_csrf()
    username = request.form.get("username", "")[:200]
    password = request.form.get("password", "")
    try:
        user = sign_in(username, password)
    except TooManyRequests as exc:
        body, status = page("login.html", 429, next_url=next_url, username=username,
                            error=str(exc))
        return body, status, {"Retry-After": str(exc.details["retry_after"])}
    if user is None:
        return page("login.html", 401, next_url=next_url, username=username,
                    error="wrong username or password")
    if user.must_change_password:
        notice("Welcome! This password was generated for you: choose your own now.", "info")
        return redirect(url_for("ui.account.password"))
    return redirect(next_url)


@bp.route("/logout", methods=["POST"])
def logout():
    check_csrf()
    sign_out()
    notice("You are signed out.", "info")
    return redirect(url_for("ui.account.login"))


@bp.route("/account", methods=["GET", "POST"], endpoint="password")
@ui_login_required(owner=False)
def password():
    p = me()
    if request.method == "GET":
        return page("account.html")
    current = request.form.get("current", "")
    new = request.form.get("new", "")
    if new != request.form.get("confirm", ""):
        return page("account.html", 400, error="the new passwords do not match")
    st = state()
    # Guesses at the current password count like failed sign-ins: a borrowed session
    # must not become a way around the throttle.
    with st.vault.session() as s:
        lock = login_throttle.begin(s, p.username, request.remote_addr, policy=st.login_policy)
        if lock is not None:
            body, status = page("account.html", 429, error=str(refused(lock)))
            return body, status, {"Retry-After": str(lock.seconds)}
        user = accounts.get_user(s, p.username)
        if not accounts.check_password(user, current):
            login_throttle.record_failure(s, p.username, request.remote_addr,
                                          policy=st.login_policy)
            return page("account.html", 400, error="the current password is wrong")
        problems = accounts.password_problems(new, p.username)
        if problems:
            return page("account.html", 400,
                        error="the new password must be " + "; ".join(problems))
        if new == current:
            return page("account.html", 400,
                        error="the new password must differ from the current one")
        accounts.set_password(s, p.username, new, actor=p.actor)  # ends every session of the user
    sign_in(p.username, new)
    notice("Password changed. Other sessions of this account were signed out.")
    return redirect(url_for("ui.roster.roster"))


@bp.route("/owner/switch", methods=["POST"])
@ui_login_required(owner=False)
def switch():
    switch_owner(me(), request.form.get("owner", ""))
    return redirect(safe_next(request.form.get("next"), url_for("ui.roster.roster")))


@bp.route("/no-owner")
@ui_login_required(owner=False)
def no_owner():
    if me().owner is not None:
        return redirect(url_for("ui.roster.roster"))
    return page("no_owner.html")


@bp.route("/owners/new", methods=["GET", "POST"])
@ui_login_required(owner=False)
def new_owner():
    p = me()
    if not p.superuser:
        raise Forbidden("only superusers create owners (`idvault owner add` from the shell)")
    if request.method == "GET":
        return page("owner_new.html")
    form = {k: request.form.get(k, "") for k in ("name", "kind", "erase_policy")}
    try:
        state().vault.add_owner(form["name"].strip(), form["kind"],
                                erase_policy=form["erase_policy"] or "immediate",
                                actor=p.actor)
    except VaultError as exc:
        return page("owner_new.html", 400, error=str(exc), form=form)
    switch_owner(current_principal_refreshed(), form["name"].strip())
    notice(f"Created {form['kind']} {form['name'].strip()}; you are acting for it now.")
    return redirect(url_for("ui.roster.roster"))


def current_principal_refreshed():
    from flask import g

    g.pop("principal", None)
    return current_principal()
