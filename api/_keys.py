"""API keys of `dbloom shim`: a file of SHA-256 hashes in the dbloom home.

Only hashes are stored, so the file never holds a usable secret; a key is shown once,
when it is created. The file is still written 0600 and refused when other users can
read or write it, because whoever can write it can let anyone in. The running shim
re-reads it when it changes, so `dbloom shim keys remove` takes effect at once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._errors import KeyStoreError

KEYS_FILE_NAME = "shim_keys.json"
KEY_PREFIX = "dbk-"
MAX_KEYS_FILE_BYTES = 1 << 20
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """What is kept about a key besides its hash: a name to revoke it by, and its age."""

    name: str
    created: int


@dataclass(frozen=True, slots=True)
class _Entry:
    info: ApiKeyInfo
    digest: bytes


def _stamp(info: os.stat_result) -> tuple[int, ...]:
    """What changes when the file is replaced, edited or its mode changed."""
    return (info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size, info.st_mode)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """The key store at `path`; see `in_home` for the usual location."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: tuple[_Entry, ...] = ()
        self._stamp: tuple[int, ...] | None = None

    @classmethod
    def in_home(cls, home: Path) -> ApiKeys:
        """The store of a dbloom home folder."""
        return cls(home / KEYS_FILE_NAME)

    def _current(self) -> tuple[_Entry, ...]:
        """The entries, re-read when the file changed since last time (one `stat` a call)."""
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self._entries, self._stamp = (), None
            return ()
        except OSError as exc:
            raise KeyStoreError(f"cannot read API keys {self.path}: {exc.strerror}") from None
        stamp = _stamp(info)
        if stamp != self._stamp:
            self._entries = self._load(info)
            self._stamp = stamp
        return self._entries

    def _load(self, info: os.stat_result) -> tuple[_Entry, ...]:
        path = self.path
        if not stat.S_ISREG(info.st_mode):
            raise KeyStoreError(f"API keys {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyStoreError(
                f"API keys {path} is accessible by other users "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`"
            )
        if info.st_size > MAX_KEYS_FILE_BYTES:
            raise KeyStoreError(f"API keys {path} is too large")
        try:
            data = json.loads(path.read_bytes())
            return tuple(
                _Entry(
                    ApiKeyInfo(name=_checked_name(e["name"]), created=int(e["created"])),
                    bytes.fromhex(e["sha256"]),
                )
                for e in data["keys"]
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(f"API keys {path} is malformed ({type(exc).__name__})") from None

    def _write(self, entries: tuple[_Entry, ...]) -> None:
        """Replace the file atomically; it is never visible half-written or mode 0644."""
        data: dict[str, Any] = {
            "keys": [
                {"name": e.info.name, "created": e.info.created, "sha256": e.digest.hex()}
                for e in entries
            ]
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(json.dumps(data, indent=2).encode())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._entries, self._stamp = entries, _stamp(self.path.stat())

    def add(self, name: str) -> str:
        """Create a key named `name` and return it; only its hash is kept."""
        entries = self._current()
        _checked_name(name)
        if any(e.info.name == name for e in entries):
            raise KeyStoreError(f"an API key named {name!r} already exists")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        entry = _Entry(ApiKeyInfo(name=name, created=int(time.time())), _digest(key))
        self._write((*entries, entry))
        return key

    def list(self) -> tuple[ApiKeyInfo, ...]:
        """The keys' names and creation times, oldest first."""
        return tuple(e.info for e in self._current())

    def remove(self, name: str) -> None:
        """Revoke the key named `name`."""
        entries = self._current()
        kept = tuple(e for e in entries if e.info.name != name)
        if len(kept) == len(entries):
            raise KeyStoreError(f"no API key named {name!r}")
        self._write(kept)

    def verify(self, key: str) -> bool:
        """Whether `key` is one of the stored keys, in time independent of which one."""
        digest = _digest(key)
        found = False
        for entry in self._current():
            found |= hmac.compare_digest(digest, entry.digest)
        return found

    def __len__(self) -> int:
        return len(self._current())


def _checked_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise KeyStoreError(
            "a key name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit"
        )
    return name


keys_app = typer.Typer(
    name="keys", help="API keys that clients of `dbloom shim` must present.", no_args_is_help=True
)
_console = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

HomeOption = Annotated[
    Path | None, typer.Option("--home", help="Home folder (default: DBLOOM_HOME).")
]
NameArgument = Annotated[str, typer.Argument(help="A name to know the key by.")]


def _fail(message: str) -> NoReturn:
    _err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)


def _store(home: Path | None) -> ApiKeys:
    # Imported on use: `dbloom.cli` imports this package, so importing it at module level
    # would be circular. `home_dir` honours `dbloom --home` and DBLOOM_HOME.
    from dbloom.cli._common import home_dir

    return ApiKeys.in_home(home_dir(home))


@keys_app.command("add")
def add_key(name: NameArgument, home: HomeOption = None) -> None:
    """Create a key; it is printed once and cannot be shown again."""
    try:
        key = _store(home).add(name)
    except KeyStoreError as exc:
        _fail(str(exc))
    _err.print(f"created API key {escape(repr(name))}; it is shown only once:")
    _console.print(key, markup=False)


@keys_app.command("list")
def list_keys(home: HomeOption = None) -> None:
    """The names and creation times of the keys."""
    try:
        infos = _store(home).list()
    except KeyStoreError as exc:
        _fail(str(exc))
    if not infos:
        _console.print("no API keys; create one with `dbloom shim keys add NAME`")
        return
    table = Table("name", "created")
    for info in infos:
        created = datetime.fromtimestamp(info.created, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        table.add_row(info.name, created)
    _console.print(table)


@keys_app.command("remove")
def remove_key(name: NameArgument, home: HomeOption = None) -> None:
    """Revoke a key; a running shim refuses it from the next request on."""
    try:
        _store(home).remove(name)
    except KeyStoreError as exc:
        _fail(str(exc))
    _console.print(f"removed API key {escape(repr(name))}")
