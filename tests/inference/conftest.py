"""Fixtures for the inference tests: one generated tiny model per session, engines per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from infer_helpers import MODEL_ID, start_server

from dbloom.inference import MLXEngine, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight llama built once per session (about a second)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def reference(tiny_model: Path) -> tuple[Any, Any]:
    """The same model loaded directly with mlx-lm, to compare against."""
    from mlx_lm import load

    return load(str(tiny_model))


@pytest.fixture
async def engine(tiny_model: Path) -> AsyncIterator[MLXEngine]:
    async with MLXEngine(tiny_model, model_id=MODEL_ID, max_batch=8, max_queue=8) as e:
        yield e


@pytest.fixture
async def server_port(engine: MLXEngine) -> AsyncIterator[int]:
    """A loopback TCP port whose connections are answered by `serve_infer(stream, engine)`."""
    async with trio.open_nursery() as nursery:
        yield await start_server(nursery, engine)
        nursery.cancel_scope.cancel()
