"""Every command's ``--help`` ends with an example of running it.

The check walks the click tree of ``web.cli.main``, so a command added later
without an example fails here. The example is the closing ``\\b`` paragraph of
the command's docstring ("Example..."; "Start here" for ``idvault`` itself),
which ``web.cli.common.Group`` prints after the options.
"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from tests.web.test_docs import COMMANDS  # every command of the click tree, by name
from web.cli.common import EXAMPLE_HEADINGS, example_last
from web.cli.main import cli


def closing_paragraph(text: str) -> list[str]:
    """The lines of the last paragraph of a help page (after its last blank line)."""
    lines = text.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if not line.strip()) + 1
    return [line.strip() for line in lines[start:]]


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_help_ends_with_an_example_of_the_command(path):
    result = CliRunner().invoke(cli, [*path.split()[1:], "--help"], prog_name="idvault")
    assert result.exit_code == 0, result.output
    example = closing_paragraph(result.output)
    assert example[0].startswith(EXAMPLE_HEADINGS), (
        f"`{path} --help` does not end with an example: its docstring needs a closing "
        f"\\b paragraph starting 'Example'; it ends with:\n" + "\n".join(example))
    runs = [line for line in example[1:] if line.startswith("idvault ")]
    assert runs, f"the example of `{path}` shows no `idvault ...` line: {example}"
    # The example runs this command (a group's runs one of its subcommands).
    assert any(f"{line} ".startswith(f"{path} ") for line in runs), (path, runs)


def test_the_example_is_printed_after_the_options_not_before():
    text = CliRunner().invoke(cli, ["models", "tiny", "--help"]).output
    assert text.index("Options:") < text.index("Example") < text.index("idvault models tiny ")


def test_example_last_moves_only_a_closing_example_paragraph():
    help_text = "Do a thing.\n\n    More words.\n\n    \b\n    Example:\n      idvault x\n"
    assert example_last(help_text, None) == ("Do a thing.\n\nMore words.",
                                             "\b\nExample:\n  idvault x")
    assert example_last("No example here.", None) == ("No example here.", None)
    assert example_last(help_text, "given") == (help_text, "given")  # an epilog wins


def test_start_here_leads_with_enroll():
    """What a new user does first after `init` and `owner add`: enroll people."""
    text = CliRunner().invoke(cli, ["--help"]).output
    start = closing_paragraph(text)
    assert start[0].startswith("Start here")
    assert start[1].startswith("idvault enroll ") and "--consent" in start[1]
