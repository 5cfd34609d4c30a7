"""What the ML libraries print, through their own switches: their progress bars and load
reports while idvault loads or writes models (idvault says what it is loading itself), and
one notice that is expected in idvault's install.

Nothing here touches Python's ``warnings`` filters or idvault's own loggers, so
idvault's warnings and progress bars are unaffected.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

__all__ = ["quiet_libraries", "without_expected_notices"]

# transformers (5.x) says once per image-processor class that, without torchvision, it uses
# the PIL processor. idvault installs no torchvision on purpose (no wheel matches its CPU torch:
# docs/install.md), and the PIL processors are what it uses: the notice tells a user nothing.
_TORCHVISION_FALLBACK = ("requires torchvision (not installed); falling back to", )
_IMPORT_LOGGER = "transformers.utils.import_utils"


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _TORCHVISION_FALLBACK)


_DROP_EXPECTED = _DropExpected()


def without_expected_notices() -> None:
    """Drop transformers' torchvision-fallback notice, and only that record, for the rest
    of the process (idempotent). Every other message of that logger still shows."""
    logger = logging.getLogger(_IMPORT_LOGGER)
    if _DROP_EXPECTED not in logger.filters:
        logger.addFilter(_DROP_EXPECTED)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers' and diffusers' load reports (below errors) and progress bars
    (``Loading weights``, ``Writing model shards``) off, restored afterwards."""
    from transformers.utils import logging as hf_logging

    without_expected_notices()
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with contextlib.ExitStack() as restore:
        restore.callback(hf_logging.set_verbosity, level)
        if bars:
            restore.callback(hf_logging.enable_progress_bar)
        try:
            from diffusers.utils import logging as d_logging
        except ImportError:  # the encoders work without diffusers
            d_logging = None
        if d_logging is not None:
            d_level, d_bars = d_logging.get_verbosity(), d_logging.is_progress_bar_enabled()
            d_logging.set_verbosity_error()
            d_logging.disable_progress_bar()
            restore.callback(d_logging.set_verbosity, d_level)
            if d_bars:
                restore.callback(d_logging.enable_progress_bar)
        yield
