"""The README's two commands are the ones CI and newcomers run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks[:2]]


def test_ci_runs_exactly_the_readme_test_command():
    run, test = _readme_commands()
    assert "idvault demo" in run and "pytest" in test
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines


def test_install_commands_keep_torch_pinned():
    for command in _readme_commands():
        assert "-c constraints.txt" in command
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    assert '"torch==2.13.0"' in (ROOT / "pyproject.toml").read_text()


def _settings_table() -> dict[str, tuple[str, str]]:
    """The README's configuration table: variable -> (flag cell, default cell)."""
    text = (ROOT / "README.md").read_text().split("## Configuration", 1)[1]
    rows = {}
    for line in text.split("\n\n| flag |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]:
        flag, env, default = (cell.strip() for cell in line.strip("|").split("|", 2))
        for var in re.findall(r"IDVAULT_[A-Z_]+", env):
            rows[var] = (flag, default)
    return rows


def test_readme_settings_table_agrees_with_the_code():
    from encoders.face.pack import ENV_VAR, INSIGHTFACE_HOME
    from vault.config import ENV_VARS
    from web.cli.common import vault_options

    rows = _settings_table()
    assert set(rows) <= set(ENV_VARS.values()) | {ENV_VAR}, "a variable the code never reads"
    # Every vault option of every command (--data-dir, --key-file, ...) has its row.
    import click

    options = {p.opts[0] for p in vault_options(lambda **kw: None).__click_params__
               if isinstance(p, click.Option)}
    for opt in options:
        var = ENV_VARS[opt.removeprefix("--").replace("-", "_")]
        assert rows[var][0] == f"`{opt}`", (var, rows.get(var))
    # The models folder: every ML command and the server need it.
    flag, default = rows[ENV_VAR]
    assert flag.startswith("`--models`") and default.startswith(f"`{INSIGHTFACE_HOME}`")
    assert "idvault models tiny" in default
