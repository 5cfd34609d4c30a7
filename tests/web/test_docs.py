"""The docs say what the code does: these tests fail when the two drift apart.

Each check reads the code's own declarations (the click tree of ``web.cli.main``,
``vault.config.Settings``, ``vault.consent``, ``vault.artifact_kinds``...)
and looks for them in docs/*.md, and the other way round where the docs name
things (commands, options, variables) that must exist.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import types
import uuid
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vault import audit, crypto
from vault.artifact_kinds import KINDS
from vault.config import ENV_VARS, KEY_PROVIDERS, Settings
from vault.consent import FIELDS, GIVEN_BY, PURPOSES, ConsentRequest
from vault.keyprovider import EnvKeyProvider, PassphraseKeyProvider
from vault.models import ERASE_POLICIES
from web.cli.common import EXIT_CODES
from web.cli.faces import EXIT_DIFFERENT
from web.cli.main import cli, main

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
HELP_OPTIONS = {"-h", "--help"}


# -- helpers -------------------------------------------------------------------
def read(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def sections(text: str) -> list[tuple[int, str, str]]:
    """``(level, title, body)`` of each markdown heading, outside code fences.

    The body runs to the next heading of any level; backticks are dropped from
    titles.
    """
    out: list[tuple[int, str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m:
            out.append((len(m.group(1)), m.group(2).replace("`", "").strip(), []))
        elif out:
            out[-1][2].append(line)
    return [(level, title, "\n".join(body)) for level, title, body in out]


def section(text: str, title: str) -> str:
    found = [body for _, t, body in sections(text) if t == title]
    assert found, f"no heading {title!r}"
    assert len(found) == 1, f"heading {title!r} appears {len(found)} times"
    return found[0]


def mentions(text: str, token: str) -> bool:
    """``token`` appears as a whole word/option (not as a prefix of a longer one)."""
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text) is not None


def walk(cmd: click.Command, path: tuple[str, ...] = ("idvault",)):
    yield " ".join(path), cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from walk(sub, (*path, name))


COMMANDS = dict(walk(cli))


def option_names(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option)
            for o in (*p.opts, *p.secondary_opts)}


def long_options(cmd: click.Command) -> list[str]:
    return sorted(o for o in option_names(cmd) if o.startswith("--"))


def argument_names(cmd: click.Command) -> list[str]:
    return [(p.metavar or p.name).strip("[].").upper()
            for p in cmd.params if isinstance(p, click.Argument)]


VAULT_OPTIONS = set(long_options(COMMANDS["idvault init"]))


# -- docs/cli.md -----------------------------------------------------------------
def test_every_command_has_a_heading_in_cli_md():
    titles = {t for _, t, _ in sections(read("cli.md"))}
    missing = sorted(set(COMMANDS) - titles)
    assert not missing, f"docs/cli.md has no section for: {', '.join(missing)}"


def test_every_command_heading_in_cli_md_is_a_real_command():
    titles = [t for _, t, _ in sections(read("cli.md")) if t.split()[:1] == ["idvault"]]
    unknown = sorted(set(titles) - set(COMMANDS))
    assert not unknown, f"docs/cli.md documents commands that do not exist: {unknown}"
    dupes = sorted({t for t in titles if titles.count(t) > 1})
    assert not dupes, f"docs/cli.md has several sections for: {dupes}"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_cli_md_section_lists_every_option_and_argument(path):
    body = section(read("cli.md"), path)
    cmd = COMMANDS[path]
    missing = [o for o in long_options(cmd) if not mentions(body, o)]
    assert not missing, f"docs/cli.md section {path!r} does not mention {missing}"
    missing_args = [a for a in argument_names(cmd) if not mentions(body, a)]
    assert not missing_args, f"docs/cli.md section {path!r} does not name {missing_args}"


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_cli_md_section_names_only_real_options(path):
    body = section(read("cli.md"), path)
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", body))
    unknown = sorted(named - option_names(COMMANDS[path]) - HELP_OPTIONS)
    assert not unknown, f"docs/cli.md section {path!r} names options {path!r} lacks: {unknown}"


def test_cli_md_vault_options_table_matches_the_cli():
    body = section(read("cli.md"), "Vault options")
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", body))
    assert named == VAULT_OPTIONS


def test_exit_codes_are_documented():
    body = section(read("cli.md"), "Exit codes")
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = " ".join(cells[1:])
    for cls, code in EXIT_CODES:
        assert code in rows, f"exit code {code} ({cls.__name__}) is not in docs/cli.md"
        assert cls.__name__ in rows[code], f"exit code {code} row does not name {cls.__name__}"
    # 0, 2 (click usage errors) and 130 (Ctrl-C) come from web.cli.main.main itself;
    # 11 is verify-face's "a different person".
    assert set(rows) <= {code for _, code in EXIT_CODES} | {0, 2, EXIT_DIFFERENT, 130}


def test_usage_errors_exit_2_as_documented(capsys):
    assert main(["no-such-command"]) == 2
    assert main(["owner", "add"]) == 2


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_runs(path):
    result = CliRunner().invoke(cli, [*path.split()[1:], "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


# -- docs/configuration.md ----------------------------------------------------------
def known_variables() -> set[str]:
    names = set(ENV_VARS.values())
    names |= {EnvKeyProvider.VAR, PassphraseKeyProvider.VAR, PassphraseKeyProvider.NEW_VAR}
    # Variables the code reads by literal name (e.g. IDVAULT_DEBUG in web/cli/main.py).
    for package in ("vault", "encoders", "generators", "web"):
        for source in (ROOT / package).rglob("*.py"):
            names |= set(re.findall(r"environ(?:\.get\(|\[)\s*[\"'](IDVAULT_[A-Z_]+)[\"']",
                                    source.read_text()))
    return names


def test_env_vars_cover_every_setting():
    assert set(ENV_VARS) == {f.name for f in dataclasses.fields(Settings)}


def test_every_setting_env_var_is_in_configuration_md():
    text = read("configuration.md")
    missing = [v for v in ENV_VARS.values() if not mentions(text, v)]
    assert not missing, f"docs/configuration.md does not mention {missing}"


def test_provider_variables_are_in_configuration_md():
    text = read("configuration.md")
    for var in (EnvKeyProvider.VAR, PassphraseKeyProvider.VAR, PassphraseKeyProvider.NEW_VAR):
        assert mentions(text, var), var
    for provider in KEY_PROVIDERS:
        assert f"`{provider}`" in text, provider


def test_configuration_md_names_only_real_variables():
    named = set(re.findall(r"IDVAULT_[A-Z_]+", read("configuration.md")))
    unknown = sorted(named - known_variables())
    assert not unknown, f"docs/configuration.md names variables the code never reads: {unknown}"


def _default(f: dataclasses.Field) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    return None  # default_factory: described in words


@pytest.mark.parametrize("f", dataclasses.fields(Settings), ids=lambda f: f.name)
def test_configuration_md_section_per_setting(f):
    body = section(read("configuration.md"), f.name)
    assert mentions(body, ENV_VARS[f.name]), f"section {f.name} lacks {ENV_VARS[f.name]}"
    flag = "--" + f.name.replace("_", "-")
    if flag in VAULT_OPTIONS:
        assert mentions(body, flag), f"section {f.name} lacks its flag {flag}"
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", body))
    every_flag = {o for cmd in COMMANDS.values() for o in long_options(cmd)}
    assert named <= every_flag, f"section {f.name} names flags that do not exist: {named}"
    default_lines = [ln for ln in body.splitlines() if re.match(r"\s*-\s*Default:", ln)]
    assert default_lines, f"section {f.name} has no 'Default:' line"
    default, line = _default(f), default_lines[0]
    if isinstance(default, bool) or default is None:
        return
    if isinstance(default, int | float):
        number = re.search(r"\d[\d_]*(?:\.\d+)?", line.split("Default:", 1)[1])
        assert number and float(number.group().replace("_", "")) == float(default), (
            f"section {f.name} documents default {line!r}, the code has {default!r}")
    else:
        assert mentions(line, str(default)), (
            f"section {f.name}: default {default!r} not in {line!r}")


# -- docs/consent.md ------------------------------------------------------------------
def test_consent_md_lists_purposes_and_fields():
    text = read("consent.md")
    for name in (*PURPOSES, *FIELDS, *GIVEN_BY, *ERASE_POLICIES):
        assert f"`{name}`" in text or f'"{name}"' in text, f"docs/consent.md lacks {name!r}"


def test_consent_md_names_only_real_purposes():
    body = section(read("consent.md"), "Purposes")
    rows = [ln for ln in body.splitlines() if ln.startswith("| `")]
    documented = {re.match(r"\| `([a-z_]+)`", ln).group(1) for ln in rows}
    assert documented == set(PURPOSES)


def test_consent_md_examples_are_valid_records(tmp_path):
    blocks = re.findall(r"```json\n(.*?)```", read("consent.md"), flags=re.S)
    records = [json.loads(b) for b in blocks]
    records = [r for r in records if isinstance(r, dict) and "subject" in r]
    assert records, "docs/consent.md has no example consent record"
    for doc in records:
        if "evidence_file" in doc:
            (tmp_path / doc["evidence_file"]).write_bytes(b"signed form")
        # Fixed 'today': the examples' dates need only be after the docs were written.
        ConsentRequest.from_dict(doc, base_dir=tmp_path, today=dt.date(2026, 1, 1))


# -- docs/artifacts.md ------------------------------------------------------------------
def _shape(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def test_artifacts_md_documents_every_kind_and_tensor():
    text = read("artifacts.md")
    for kind, spec in KINDS.items():
        assert f"`{kind}`" in text, f"docs/artifacts.md lacks kind {kind!r}"
        body = section(text, kind)
        for t in spec.tensors:
            assert f"`{t.name}`" in body, f"docs/artifacts.md {kind}: lacks tensor {t.name!r}"
            assert _shape(t.shape) in body, f"{kind}.{t.name}: shape {_shape(t.shape)} missing"
        for m in spec.metadata:
            assert f"`{m.name}`" in body, f"docs/artifacts.md {kind}: lacks metadata {m.name!r}"
            for value in m.allowed or ():
                assert f"`{value}`" in body, f"{kind}: metadata {m.name} value {value!r} missing"


def test_artifacts_md_documents_no_other_kind():
    documented = {t for level, t, _ in sections(read("artifacts.md")) if level == 3}
    assert documented == set(KINDS)


def test_artifacts_md_describes_the_kinds_json():
    body = section(read("artifacts.md"), "idvault artifact kinds --json")
    keys = next(iter(KINDS.values())).to_json().keys()
    for key in keys:
        assert f'"{key}"' in body or f"`{key}`" in body, key


# -- docs/security.md -------------------------------------------------------------------
def test_security_md_aad_fields_match_vault_context():
    from vault.vault import Vault

    fake = types.SimpleNamespace(vault_id=uuid.uuid4())
    context = Vault._context(fake, "owner", "identity-uid", "artifact", "kind", "model")
    body = read("security.md")
    for key in context:
        assert f"| `{key}` |" in body, f"docs/security.md AAD table lacks {key!r}"


def test_security_md_token_layout_sizes():
    text = read("security.md")
    assert f"`{crypto.MAGIC.decode()}`" in text
    assert f"header is {crypto.HEADER_BYTES} bytes" in text
    assert f"{crypto.OVERHEAD} bytes longer than its plaintext" in text
    assert f"| {crypto.NONCE_BYTES} | nonce" in text


def test_security_md_lists_exactly_the_audit_actions():
    body = section(read("security.md"), "Audit chain")
    listing = body[body.index("appended to `audit_events`"):body.index("Each event")]
    named = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", listing)) - {"audit_events"}
    assert named == set(audit.ACTIONS), sorted(named ^ set(audit.ACTIONS))


def test_security_md_names_the_cache_setting():
    assert mentions(read("security.md"), "dek_cache_seconds")


# -- docs/dedupe.md -----------------------------------------------------------------------
def test_dedupe_md_thresholds_match_settings():
    text = read("dedupe.md")
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    for name in ("dedupe_block", "dedupe_review"):
        assert f"{defaults[name]:.2f}" in text, f"docs/dedupe.md lacks {name} {defaults[name]}"


def test_dedupe_md_index_types_and_blas_threshold():
    from vault.dedupe_index import INDEX_TYPES, _faiss

    text = read("dedupe.md")
    for kind in INDEX_TYPES:
        assert f"`{kind}`" in text, kind
    body = section(text, "The FAISS BLAS threshold")
    assert mentions(body, str(_faiss().cvar.distance_compute_blas_threshold))


# -- README.md (written separately; read at test time) ---------------------------------------
def _readme_command_cells() -> list[str]:
    if not README.exists():
        pytest.fail("README.md does not exist yet")
    cells = []
    for line in README.read_text(encoding="utf-8").splitlines():
        if not line.lstrip().startswith("|"):
            continue
        first = line.strip().strip("|").split("|")[0]
        spans = re.findall(r"`([^`]*)`", first) or [first]
        cells += [s.strip() for s in spans if s.strip().startswith("idvault")]
    return cells


def _resolve(text: str) -> str:
    """The command path a README cell names: 'idvault owner add NAME' -> 'idvault owner add'."""
    cmd: click.Command = cli
    path = ["idvault"]
    for token in text.split()[1:]:
        if not isinstance(cmd, click.Group):
            break
        if token in cmd.commands:
            cmd = cmd.commands[token]
            path.append(token)
        elif token.startswith("-") or not re.fullmatch(r"[a-z][a-z-]*", token):
            break  # an option or a placeholder (NAME, OWNER/NAME, [OWNER], <file>)
        else:
            raise AssertionError(f"README.md names a command that does not exist: {text!r}")
    return " ".join(path)


def test_readme_cli_table_covers_every_command_group():
    resolved = {_resolve(c) for c in _readme_command_cells()}
    assert resolved, "README.md has no table whose first column names idvault commands"
    groups = [name for name, cmd in cli.commands.items() if isinstance(cmd, click.Group)]
    missing = [g for g in groups if not any(p.split()[1:2] == [g] for p in resolved)]
    assert not missing, f"README.md's CLI table lacks the command group(s): {missing}"


def test_readme_cli_table_names_real_commands():
    for cell in _readme_command_cells():
        _resolve(cell)
