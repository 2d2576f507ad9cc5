"""What every command shares: the home folder, one-line errors, running trio."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import platformdirs
import trio
import typer
from rich.console import Console
from rich.markup import escape

from dbloom.attest import AttestationError
from dbloom.inference import EngineError, ModelError
from dbloom.p2p import DialError, KeyFileError, MultiaddrError, ProtocolError
from dbloom.p2p.kad import RecordRejected

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
T = TypeVar("T")

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    AttestationError,
    EngineError,
    ModelError,
    DialError,
    KeyFileError,
    MultiaddrError,
    ProtocolError,
    RecordRejected,
    OSError,
    trio.TooSlowError,
    ValueError,
    RecursionError,
)


class State:
    """Options given before the sub-command."""

    debug: bool = False
    home: Path | None = None


state = State()


def home_dir(override: Path | None = None) -> Path:
    """DBLOOM_HOME, else --home, else the platform's user data folder."""
    if override is not None:
        return override.expanduser()
    if state.home is not None:
        return state.home.expanduser()
    env = os.environ.get("DBLOOM_HOME")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("dbloom", appauthor=False))


def fail(message: str) -> NoReturn:
    """Print one clear line and exit 1."""
    err_console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)


def describe(exc: BaseException) -> str:
    """A one-line description of an expected failure."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
        return f"{' -> '.join(names)}: {exc.strerror}" if names else exc.strerror
    if isinstance(exc, RecursionError):
        return "input nested too deeply to read"
    if isinstance(exc, RecordRejected):
        return f"record refused: {exc}"
    return str(exc) or type(exc).__name__


def run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run an async command; expected failures become one line and exit code 1."""
    logging.basicConfig(
        level=logging.DEBUG if state.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return trio.run(fn, *args)
    except EXPECTED_ERRORS as exc:
        if state.debug:
            raise
        fail(describe(exc))
    except BaseExceptionGroup as group:
        leaf = _first_leaf(group)
        if isinstance(leaf, typer.Exit | KeyboardInterrupt):
            raise leaf from None
        if state.debug or not isinstance(leaf, EXPECTED_ERRORS):
            raise
        fail(describe(leaf))
    except KeyboardInterrupt:
        sys.exit(130)


def report_unexpected(exc: Exception) -> NoReturn:
    """Last resort for an error no command expected: one line naming it, exit 1."""
    leaf = _first_leaf(exc) if isinstance(exc, BaseExceptionGroup) else exc
    if isinstance(leaf, EXPECTED_ERRORS):
        fail(describe(leaf))
    fail(
        f"unexpected {type(leaf).__name__}: {leaf} "
        "(a bug in dbloom; `dbloom --debug …` shows where)"
    )


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
