"""Fixtures for the web-layer tests."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder holding the tiny face pack in insightface's root layout."""
    from encoders.standins.face_pack import write_tiny_face_pack

    root = tmp_path_factory.mktemp("models")
    write_tiny_face_pack(root / "models" / "buffalo_l")
    return root


# The app fixtures (``web``, and cheap argon2 costs for every test here).
from tests.web.web_fixtures import cheap_passwords, gen_web, web  # noqa: F401


@pytest.fixture(scope="session")
def gen_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder from `idvault models tiny`: the face pack, the identity checkpoints
    and the tiny SDXL pipeline `sdxl-tiny` (generation takes about a second)."""
    from web.cli.main import main

    root = tmp_path_factory.mktemp("gen-models")
    assert main(["models", "tiny", str(root)]) == 0
    return root
