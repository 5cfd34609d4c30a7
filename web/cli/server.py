"""``idvault`` commands of the web app: serve, UI accounts, API keys.

``idvault serve`` runs the Flask app (JSON API and UI) on waitress, in one or
more worker processes (``web/serve.py``). ``user``
manages UI accounts (argon2id password hashes) and their roles per owner;
``apikey`` creates (shown once), lists and revokes API keys.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

import click

from vault.config import Settings
from web.cli.common import Group, emit, open_vault, vault_options

ROLES = ("admin", "editor", "viewer")


def _actor() -> str:
    from vault.audit import cli_actor

    return cli_actor()


def _read_password(from_stdin: bool) -> str | None:
    if not from_stdin:
        return None
    line = sys.stdin.readline()
    password = line.rstrip("\r\n")
    if not password:
        raise click.UsageError("--password-stdin: no password on standard input")
    return password


# -- serve ------------------------------------------------------------------------------------
@click.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; keep the loopback default unless a TLS proxy "
                   "fronts the server.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="Server processes, each with --threads threads [env IDVAULT_WEB_WORKERS; "
                   "default: one per CPU, at most 4].")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Threads of each server process.")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=None,
              help="Face models folder for enrollment [env IDVAULT_MODELS; default: "
                   "~/.insightface].")
@click.option("--pack", default="buffalo_l", show_default=True,
              help="Face model pack name (buffalo_l, antelopev2).")
@click.option("--broker-url", default=None,
              help="Scale-out: send jobs to the workers over this Redis broker instead of "
                   "running them here [env IDVAULT_BROKER_URL].")
@vault_options
def serve(host: str, port: int, workers: int | None, threads: int, models_dir: Path | None,
          pack: str, broker_url: str | None, settings: Settings) -> None:
    """Serve the web UI and the JSON API (/v1) on a production WSGI server.

    Prints the URL and how to sign in. On the first start (no accounts yet) it
    creates the superuser 'admin' and prints its one-time password. With a
    broker it is an API node: jobs (enrollment from photos, generation, fits)
    go to `idvault worker` processes; without one it runs them itself.
    Ctrl-C or SIGTERM stops every server process.

    \b
    Example (on all interfaces behind a TLS proxy, with the models):
      idvault serve --host 0.0.0.0 --port 8080 --models ~/models
    """
    from web.app import WebConfig, create_app
    from web.serve import default_workers, first_start
    from web.serve import serve as run

    if broker_url:
        settings = settings.with_(broker_url=broker_url)
    workers = workers or default_workers()
    WebConfig.from_env(models_dir=models_dir, pack=pack)  # bad settings fail here, once
    vault = open_vault(settings)  # so do a missing database or a wrong key

    def make_app():  # in each server process: engines and threads do not survive a fork
        own = open_vault(settings)
        try:
            app = create_app(WebConfig.from_env(vault=own, models_dir=models_dir, pack=pack))
        except BaseException:
            own.dispose()
            raise
        app.extensions["idvault"].owns_vault = True
        return app

    def greet():
        try:
            first_start(vault, click.echo)
        finally:
            vault.dispose()

    try:
        run(make_app, host, port, threads=threads, workers=workers, echo=click.echo,
            greet=greet)
    finally:
        vault.dispose()


# -- users --------------------------------------------------------------------------------------
@click.group(cls=Group)
def user() -> None:
    """UI accounts: passwords (argon2id) and roles per owner.

    \b
    Example:
      idvault user add maria --owner smiths --role editor
    """


@user.command("add")
@click.argument("username")
@click.option("--owner", "owner_name", help="Make the user a member of this owner.")
@click.option("--role", type=click.Choice(ROLES), default="viewer", show_default=True,
              help="The role in --owner.")
@click.option("--superuser", is_flag=True,
              help="Admin of every owner; may create owners in the UI.")
@click.option("--password-stdin", is_flag=True,
              help="Read the password from standard input instead of generating one.")
@vault_options
def user_add(username: str, owner_name: str | None, role: str, superuser: bool,
             password_stdin: bool, settings: Settings) -> None:
    """Create a UI account USERNAME; prints a generated one-time password.

    \b
    Example:
      idvault user add maria --owner smiths --role editor
    """
    from vault import accounts

    password = _read_password(password_stdin)
    with open_vault(settings, check_keys=False) as vault, vault.session() as s:
        _, generated = accounts.create_user(s, username, password, superuser=superuser,
                                                  actor=_actor())
        if owner_name:
            accounts.grant(s, username, owner_name, role, actor=_actor())
    what = "superuser" if superuser else "user"
    where = f", {role} of {owner_name}" if owner_name else ""
    click.echo(f"created {what} {username}{where}")
    if generated:
        click.echo(f"one-time password (asked to change it at first sign-in): {generated}")


@user.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@vault_options
def user_list(as_json: bool, settings: Settings) -> None:
    """List UI accounts and their roles.

    \b
    Example:
      idvault user list --json
    """
    from vault import accounts

    with open_vault(settings, check_keys=False) as vault, vault.session() as s:
        rows = [accounts.describe_user(u) for u in accounts.list_users(s)]
    emit(rows, as_json, lambda: "\n".join(
        f"{r['username']:<24} {'superuser' if r['superuser'] else '':<9} "
        + (", ".join(f"{m['owner']}:{m['role']}" for m in r["memberships"]) or "-")
        for r in rows) or "no users")


@user.command("passwd")
@click.argument("username")
@click.option("--password-stdin", is_flag=True,
              help="Read the new password from standard input instead of generating one.")
@vault_options
def user_passwd(username: str, password_stdin: bool, settings: Settings) -> None:
    """Set USERNAME's password (a generated one-time one by default); signs it out.

    \b
    Example:
      idvault user passwd maria
    """
    from vault import accounts

    password = _read_password(password_stdin)
    with open_vault(settings, check_keys=False) as vault, vault.session() as s:
        generated = accounts.set_password(s, username, password, actor=_actor())
    click.echo(f"password of {username} changed; its sessions are signed out")
    if generated:
        click.echo(f"one-time password (asked to change it at first sign-in): {generated}")


@user.command("grant")
@click.argument("username")
@click.argument("owner_name", metavar="OWNER")
@click.option("--role", type=click.Choice(ROLES), required=True, help="The role in OWNER.")
@vault_options
def user_grant(username: str, owner_name: str, role: str, settings: Settings) -> None:
    """Give USERNAME a role in OWNER (replacing its role there).

    \b
    Example:
      idvault user grant maria smiths --role viewer
    """
    from vault import accounts

    with open_vault(settings, check_keys=False) as vault, vault.session() as s:
        accounts.grant(s, username, owner_name, role, actor=_actor())
    click.echo(f"{username} is {role} of {owner_name}")


@user.command("revoke")
@click.argument("username")
@click.argument("owner_name", metavar="OWNER")
@vault_options
def user_revoke(username: str, owner_name: str, settings: Settings) -> None:
    """Remove USERNAME from OWNER.

    \b
    Example:
      idvault user revoke maria smiths
    """
    from vault import accounts

    with open_vault(settings, check_keys=False) as vault, vault.session() as s:
        accounts.revoke(s, username, owner_name, actor=_actor())
    click.echo(f"{username} is no longer a member of {owner_name}")


@user.command("delete")
@click.argument("username")
@vault_options
def user_delete(username: str, settings: Settings) -> None:
    """Delete the account USERNAME (its memberships and sessions go with it).

    \b
    Example:
      idvault user delete maria
    """
    from vault import accounts

    with open_vault(settings, check_keys=False) as vault, vault.session() as s:
        accounts.delete_user(s, username, actor=_actor())
    click.echo(f"deleted user {username}")


# -- API keys -----------------------------------------------------------------------------------
@click.group(cls=Group)
def apikey() -> None:
    """API keys: scoped, shown once, stored hashed.

    \b
    Example:
      idvault apikey create smiths --name gallery --scope identities:read
    """


@apikey.command("create")
@click.argument("owner_name", metavar="OWNER")
@click.option("--name", required=True, help="What the key is for (shown in listings).")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(["identities:read", "identities:write", "artifacts:read",
                                 "generate", "admin"]),
              help="A scope to grant; repeat for several.")
@click.option("--expires-days", type=click.IntRange(1, 3650), default=None,
              help="Expire after this many days (default: never).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the key).")
@vault_options
def apikey_create(owner_name: str, name: str, scopes: tuple[str, ...], expires_days: int | None,
                  as_json: bool, settings: Settings) -> None:
    """Create an API key for OWNER; prints the key once (it is stored only hashed).

    \b
    Example (a key a gallery app uses to make pictures):
      idvault apikey create smiths --name gallery --scope identities:read --scope generate \\
          --expires-days 90
    """
    from vault import api_keys
    from vault.models import utcnow

    expires = utcnow() + dt.timedelta(days=expires_days) if expires_days else None
    with open_vault(settings) as vault, vault.session() as s:
        key, token = api_keys.create_key(s, owner_name, name, list(scopes), expires_at=expires,
                                         actor=_actor())
        doc = {"key": api_keys.describe_key(key, owner_name), "token": token}
    emit(doc, as_json, lambda: (
        f"created API key {doc['key']['id']} ({doc['key']['prefix']}) for {owner_name}: "
        f"{', '.join(doc['key']['scopes'])}"
        + (f"; expires {doc['key']['expires_at'][:10]}" if doc["key"]["expires_at"] else "")
        + f"\n{token}\nshown once: store it now (use it as 'Authorization: Bearer <key>')"))


@apikey.command("list")
@click.argument("owner_name", metavar="[OWNER]", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@vault_options
def apikey_list(owner_name: str | None, as_json: bool, settings: Settings) -> None:
    """List API keys (of OWNER, or of every owner); never the keys themselves.

    \b
    Example:
      idvault apikey list smiths
    """
    from vault import api_keys, identities

    with open_vault(settings, check_keys=False) as vault, vault.session() as s:
        owners = [owner_name] if owner_name else [o.name for o in identities.list_owners(s)]
        rows = [api_keys.describe_key(k, o) for o in owners for k in api_keys.list_keys(s, o)]
    emit(rows, as_json, lambda: "\n".join(
        f"{r['id']:>4} {r['prefix']}  {r['owner']:<16} {r['name']:<20} {r['status']:<8} "
        f"{','.join(r['scopes'])}" for r in rows) or "no API keys")


@apikey.command("revoke")
@click.argument("key")
@vault_options
def apikey_revoke(key: str, settings: Settings) -> None:
    """Revoke KEY (its number or prefix) at once.

    \b
    Example (key number 3, from `idvault apikey list`):
      idvault apikey revoke 3
    """
    from vault import api_keys

    with open_vault(settings) as vault, vault.session() as s:
        row = api_keys.find_key(s, key)
        api_keys.revoke_key(s, row, actor=_actor())
        prefix = row.prefix
    click.echo(f"revoked API key {prefix}")


def register(cli: click.Group) -> None:
    for command in (serve, user, apikey):
        cli.add_command(command)
