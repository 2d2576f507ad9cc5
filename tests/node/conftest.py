"""Fixtures for the node tests: one generated model per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbloom.inference import build_tiny_model


@pytest.fixture(scope="session")
def node_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight llama built once per session (about a second)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)
