"""Handle and name rules: every broken rule is named."""

import pytest

from vault.errors import InvalidHandle
from vault.handles import Handle, validate_name


@pytest.mark.parametrize("text", ["smiths/ana", "@smiths/ana", "north-light/a1", "a/b"])
def test_valid(text):
    h = Handle.parse(text)
    assert str(h) == text.lstrip("@")


@pytest.mark.parametrize("text, fragments", [
    ("Smiths/ana", ["owner part", "lowercase"]),
    ("smiths/ana/x", ["exactly one '/'"]),
    ("smiths", ["exactly one '/'"]),
    ("smiths/../etc", ["exactly one '/'"]),
    ("smiths/1ana", ["start with a letter"]),
    ("smiths/ana-", ["end with '-'"]),
    ("smiths/a--b", ["'--'"]),
    ("smiths/" + "a" * 33, ["1 to 32"]),
    ("smiths/admin", ["reserved"]),
    ("smiths/ana; drop table", ["only lowercase", "' '", "';'"]),
    ("smiths/", ["name part", "1 to 32"]),
])
def test_invalid_lists_rules(text, fragments):
    with pytest.raises(InvalidHandle) as exc:
        Handle.parse(text)
    for fragment in fragments:
        assert fragment in str(exc.value)


def test_all_rules_reported_at_once():
    with pytest.raises(InvalidHandle) as exc:
        validate_name("9Ab-")
    assert len(exc.value.failed_rules) == 3  # characters, first letter, trailing '-'
