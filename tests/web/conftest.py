"""Fixtures for the web-layer tests."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding the tiny face pack in insightface's root layout."""
    from encoders.tiny_models import write_tiny_face_pack

    root = tmp_path_factory.mktemp("models")
    write_tiny_face_pack(root / "models" / "buffalo_l")
    return root
