"""The ML libraries' output switches: only the expected notice is dropped, and the
libraries' verbosity and progress bars are as before after a quiet block."""

from __future__ import annotations

import logging

from encoders.library_output import quiet_libraries, without_expected_notices

FALLBACK = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility.")


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("transformers.utils.import_utils", logging.WARNING, __file__, 1,
                             message, None, None)


def test_only_the_torchvision_fallback_notice_is_dropped() -> None:
    without_expected_notices()
    without_expected_notices()  # idempotent: one filter
    logger = logging.getLogger("transformers.utils.import_utils")
    assert len(logger.filters) == 1
    assert logger.filter(_record(FALLBACK)) is False
    assert logger.filter(_record("Disabling PyTorch because PyTorch >= 2.4 is required")) \
        is True


def test_a_quiet_block_restores_the_libraries_settings() -> None:
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    d_logging.set_verbosity_info()
    d_logging.enable_progress_bar()
    with quiet_libraries():
        assert hf_logging.get_verbosity() == logging.ERROR
        assert not hf_logging.is_progress_bar_enabled()
        assert d_logging.get_verbosity() == logging.ERROR
        assert not d_logging.is_progress_bar_enabled()
    assert hf_logging.get_verbosity() == logging.WARNING and hf_logging.is_progress_bar_enabled()
    assert d_logging.get_verbosity() == logging.INFO and d_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_warning()
    d_logging.set_verbosity_warning()
