"""Owner names and identity handles (``owner/name``): the naming rules.

A handle is how people, prompts (``@smiths/ana``) and the API refer to an
identity, so names are restricted to a small, URL- and path-safe alphabet.
Validation reports every rule a value breaks, not just the first.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from vault.errors import InvalidHandle, InvalidInput

MAX_NAME = 32
RESERVED = frozenset(
    {"admin", "api", "v1", "new", "static", "login", "logout", "settings", "me", "all", "none"}
)
NAME_RULES = (
    f"1 to {MAX_NAME} characters",
    "only lowercase letters a-z, digits 0-9 and '-'",
    "starts with a letter",
    "does not end with '-'",
    "no '--'",
    f"not a reserved word ({', '.join(sorted(RESERVED))})",
)


def name_problems(name: str) -> list[str]:
    """The naming rules ``name`` breaks (empty when it is valid)."""
    failed = []
    if not 1 <= len(name) <= MAX_NAME:
        failed.append(f"must be 1 to {MAX_NAME} characters (is {len(name)})")
    bad = sorted({c for c in name if not ("a" <= c <= "z" or "0" <= c <= "9" or c == "-")})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:10]) + (", ..." if len(bad) > 10 else "")
        hint = " (use lowercase)" if any(c.isupper() for c in bad) else ""
        failed.append(f"may use only lowercase letters a-z, digits 0-9 and '-', not {shown}{hint}")
    if name and not ("a" <= name[0] <= "z"):
        failed.append("must start with a letter")
    if name.endswith("-"):
        failed.append("must not end with '-'")
    if "--" in name:
        failed.append("must not contain '--'")
    if name in RESERVED:
        failed.append("is a reserved word")
    return failed


def validate_name(name: str) -> str:
    failed = name_problems(name)
    if failed:
        raise InvalidHandle(name, failed)
    return name


def parse_uid(value: object) -> str:
    """An identity's uid (a UUID) in its canonical form; InvalidInput otherwise."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise InvalidInput(f"not an identity uid: {str(value)[:64]!r}") from None


@dataclass(frozen=True, order=True)
class Handle:
    owner: str
    name: str

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> Handle:
        """Parse ``owner/name`` (a leading ``@`` is allowed, as in prompts)."""
        raw = text[1:] if text.startswith("@") else text
        parts = raw.split("/")
        if len(parts) != 2:
            raise InvalidHandle(text, ["a handle is OWNER/NAME with exactly one '/'"])
        owner, name = parts
        failed = [f"owner part {p}" for p in name_problems(owner)]
        failed += [f"name part {p}" for p in name_problems(name)]
        if failed:
            raise InvalidHandle(text, failed)
        return cls(owner, name)


HANDLE_PATTERN = re.compile(r"@([a-z][a-z0-9-]{0,31})/([a-z][a-z0-9-]{0,31})")
