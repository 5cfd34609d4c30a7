"""Helpers shared by the ``idvault`` command modules: vault options, exit codes,
output and progress bars."""

from __future__ import annotations

import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from vault import errors
from vault.config import KEY_PROVIDERS, Settings


class Interrupted(errors.VaultError):
    """The user stopped a command (Ctrl-C) and it wound down cleanly: a fit job cancelled at
    its next step. Exit 130, the shell's code for an interrupted command."""

    code = "interrupted"


# Most specific first: the first class an error is an instance of wins.
EXIT_CODES: list[tuple[type[errors.VaultError], int]] = [
    (Interrupted, 130),
    (errors.DuplicateIdentity, 10),
    (errors.AuditChainBroken, 3),
    (errors.IntegrityError, 3),
    (errors.KeyUnavailable, 4),
    (errors.ConsentError, 5),
    (errors.NotFound, 6),
    (errors.AlreadyExists, 7),
    (errors.Conflict, 7),
    (errors.InvalidInput, 8),
    (errors.ModelUnavailable, 9),
    (errors.VaultError, 1),
]


def exit_code(error: errors.VaultError) -> int:
    return next(code for cls, code in EXIT_CODES if isinstance(error, cls))


def vault_options(fn: Callable) -> Callable:
    """Add the options that locate a vault and build ``Settings`` from them."""

    @click.option("--data-dir", type=click.Path(path_type=Path), default=None,
                  help="Vault folder [env IDVAULT_DATA_DIR; default: per-user data dir].")
    @click.option("--database-url", default=None,
                  help="SQLAlchemy URL of the data DB [env IDVAULT_DATABASE_URL; "
                       "default: sqlite in the data dir].")
    @click.option("--keystore-url", default=None,
                  help="SQLAlchemy URL of the key store [env IDVAULT_KEYSTORE_URL; default: "
                       "keystore.db in the data dir]. Keep it apart from the data DB.")
    @click.option("--key-provider", type=click.Choice(KEY_PROVIDERS), default=None,
                  help="Where the key-encryption key comes from [env IDVAULT_KEY_PROVIDER; "
                       "default: file].")
    @click.option("--key-file", type=click.Path(path_type=Path), default=None,
                  help="Key file for the file provider [env IDVAULT_KEY_FILE; default: "
                       "DATA_DIR/master.key].")
    @functools.wraps(fn)
    def wrapper(*args, data_dir, database_url, keystore_url, key_provider, key_file, **kwargs):
        settings = Settings.from_env(data_dir=data_dir, database_url=database_url,
                                     keystore_url=keystore_url, key_provider=key_provider,
                                     key_file=key_file)
        return fn(*args, settings=settings, **kwargs)

    return wrapper


def open_vault(settings: Settings, *, check_keys: bool = True):
    from vault.vault import Vault

    return Vault.open(settings, check_keys=check_keys)


def emit(doc: object, as_json: bool, text: Callable[[], str] | None = None) -> None:
    if as_json or text is None:
        click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
    else:
        click.echo(text())


def progress_bar(desc: str, unit: str = "it"):
    """A tqdm bar on stderr as a ``progress(done, total)`` callback."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    update.close = bar.close  # type: ignore[attr-defined]
    return update


# A help text's closing paragraph that shows how to run the command: a \b block whose first
# line starts with one of these words (see example_last).
EXAMPLE_HEADINGS = ("Example", "Start here")


def example_last(help_text: str | None, epilog: str | None) -> tuple[str | None, str | None]:
    """``(help, epilog)`` with the help's closing example block moved into the epilog.

    Click prints the help text before the options and the epilog after them; an
    example belongs at the end, where a reader of ``--help`` looks first, but in
    the docstring, next to what it illustrates."""
    if not help_text or epilog:
        return help_text, epilog
    text = inspect.cleandoc(help_text)
    for heading in EXAMPLE_HEADINGS:
        head, sep, tail = text.partition(f"\n\b\n{heading}")
        if sep:
            return head.rstrip(), f"\b\n{heading}{tail}"
    return help_text, epilog


class Group(click.Group):
    """A click group that lists commands in the order they were added, and prints each
    command's closing example (a ``\b`` paragraph starting "Example") after its options."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help, self.epilog = example_last(self.help, self.epilog)

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        cmd.help, cmd.epilog = example_last(cmd.help, cmd.epilog)
        super().add_command(cmd, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)
