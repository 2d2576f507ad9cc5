"""`dbloom models …`: list, fetch, inspect and generate models.

The lead mounts `models_app` on the main CLI; it only calls into `_models` and `_tiny`.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ._errors import ModelError
from ._models import available_memory, cached_models, inspect_model, resolve_model
from ._tiny import build_tiny_model

models_app = typer.Typer(
    name="models", help="List, fetch, inspect and generate models.", no_args_is_help=True
)
_console = Console(highlight=False)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

CacheDir = Annotated[
    Path | None, typer.Option(help="Hugging Face cache folder (default: HF_HUB_CACHE).")
]


class TinySizeChoice(StrEnum):
    """Sizes `make-tiny` can build."""

    tiny = "tiny"
    small = "small"


def _fail(message: str) -> NoReturn:
    _err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)


def _size(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


@models_app.command("list")
def list_models(
    cache_dir: CacheDir = None,
) -> None:
    """Models already in the Hugging Face cache."""
    table = Table("model", "size", "path")
    for repo_id, path, size in cached_models(cache_dir):
        table.add_row(repo_id, _size(size), str(path))
    if table.row_count:
        _console.print(table)
    else:
        _console.print("no models in the Hugging Face cache")


@models_app.command("pull")
def pull(
    ref: Annotated[str, typer.Argument(help="Hugging Face repo id, e.g. mlx-community/…")],
    cache_dir: CacheDir = None,
) -> None:
    """Download a model into the Hugging Face cache (honours HF_HUB_OFFLINE)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    try:
        with Progress(*columns, console=_err) as progress:
            path = resolve_model(ref, cache_dir=cache_dir, progress=progress)
        model = inspect_model(path, model_id=ref)
    except ModelError as exc:
        _fail(str(exc))
    _console.print(f"{ref} at {path}")
    _console.print(f"digest {model.info.digest}")


@models_app.command("info")
def info(
    ref: Annotated[str, typer.Argument(help="Model folder or cached Hugging Face repo id.")],
    cache_dir: CacheDir = None,
) -> None:
    """Digest, size, context and memory needs of a local or cached model (no download)."""
    try:
        path = resolve_model(ref, cache_dir=cache_dir, download=False)
        model = inspect_model(path, model_id=ref if not Path(ref).is_dir() else None)
    except ModelError as exc:
        _fail(str(exc))
    free = available_memory()
    table = Table(show_header=False)
    for key, value in (
        ("model", model.info.id),
        ("path", str(model.path)),
        ("digest", model.info.digest),
        ("parameters", f"{model.info.parameters:,}"),
        ("context", f"{model.info.context_length:,} tokens"),
        ("vocabulary", f"{model.info.vocab_size:,} tokens"),
        ("weights", _size(model.weights_bytes)),
        ("memory needed", _size(model.memory_estimate)),
        ("memory available", _size(free)),
        ("fits", "yes" if model.memory_estimate <= free else "[red]no[/red]"),
    ):
        table.add_row(key, value)
    _console.print(table)


@models_app.command("make-tiny")
def make_tiny(
    directory: Annotated[Path, typer.Argument(help="Folder to write the model into.")],
    size: Annotated[
        TinySizeChoice, typer.Option(help="tiny: for tests; small: ~25M, for benchmarks.")
    ] = TinySizeChoice.tiny,
    seed: Annotated[int, typer.Option(help="Seed for the random weights.")] = 0,
) -> None:
    """Write a random-weight llama model and tokenizer (its text is meaningless)."""
    path = build_tiny_model(directory, size=size.value, seed=seed)
    model = inspect_model(path)
    _console.print(f"wrote {size.value} model ({model.info.parameters:,} parameters) to {path}")
    _console.print(f"digest {model.info.digest}")
