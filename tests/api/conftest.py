"""Fixtures for the shim tests: one generated tiny model per session, a real engine and a
served shim per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from shim_helpers import MODEL_ID, Shim, start_shim

from dbloom.inference import MLXEngine, build_tiny_model


@pytest.fixture(scope="session")
def shim_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight llama built once per session (about a second)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture
async def engine(shim_model: Path) -> AsyncIterator[MLXEngine]:
    async with MLXEngine(shim_model, model_id=MODEL_ID, max_batch=8, max_queue=32) as e:
        yield e


@pytest.fixture
async def shim(engine: MLXEngine) -> AsyncIterator[Shim]:
    """The app over the real engine, served on 127.0.0.1, keys not required."""
    async with trio.open_nursery() as nursery:
        yield await start_shim(nursery, engine)
        nursery.cancel_scope.cancel()
