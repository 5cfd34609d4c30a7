"""Jinja filters of the UI: human sizes and long ids that wrap only at their separators."""

from __future__ import annotations

import re

from markupsafe import Markup, escape

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
# Model ids and digests are long runs without spaces ("clip-vit-h-14@0123…+buffalo_l");
# a line may break after these characters and nowhere else.
_SEPARATORS = re.compile(r"([/@+:_.\-])")


def human_size(n: int | None) -> str:
    """Bytes in binary units: 512 B, 160 KiB, 1.4 MiB (one decimal below 10, none above)."""
    if n is None:
        return ""
    size, unit = float(n), 0
    while size >= 1024 and unit < len(_UNITS) - 1:
        size, unit = size / 1024, unit + 1
    if unit == 0:
        return f"{int(size)} B"
    return f"{size:.1f} {_UNITS[unit]}" if size < 10 else f"{size:.0f} {_UNITS[unit]}"


def breakable(text: str | None) -> Markup:
    """``text`` escaped, with a ``<wbr>`` after each separator so a narrow column wraps
    between the parts of an id instead of a few characters per line."""
    if not text:
        return Markup("")
    parts = _SEPARATORS.split(str(text))  # odd indexes are the separators
    return Markup("").join(escape(part) + Markup("<wbr>") if i % 2 else escape(part)
                           for i, part in enumerate(parts))

FILTERS = {"human_size": human_size, "breakable": breakable}
