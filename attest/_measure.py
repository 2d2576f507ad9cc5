"""The software measurement: one SHA-256 that changes when any installed dbloom file does.

It covers every file of every installed `dbloom.*` package (sorted paths, each path and
content length-prefixed so no two trees hash alike), the Python version, and the mlx and
mlx-lm versions. Two installs of the same release on the same Python hash alike, which is
what lets a transparency log list the allowed ones.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import platform
import struct
from dataclasses import dataclass
from pathlib import Path

DOMAIN = b"dbloom/measurement/v1\x00"
PACKAGES = ("p2p", "attest", "inference", "api", "ledger", "cli", "sims")
RUNTIME_DISTRIBUTIONS = ("mlx", "mlx-lm")


@dataclass(frozen=True, slots=True)
class Measurement:
    """The digest and what went into it, so an operator can see why two nodes differ."""

    digest: bytes
    files: int
    python: str
    runtime: dict[str, str]

    @property
    def hex(self) -> str:
        return self.digest.hex()


def _package_files() -> list[tuple[str, Path]]:
    files = []
    for name in PACKAGES:
        try:
            module = importlib.import_module(f"dbloom.{name}")
        except ImportError:
            continue
        for root in map(Path, module.__path__):
            for path in root.rglob("*"):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                    files.append((f"dbloom/{name}/{path.relative_to(root).as_posix()}", path))
    return sorted(files)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _field(h: hashlib._Hash, data: bytes) -> None:
    h.update(struct.pack(">Q", len(data)))
    h.update(data)


def measure_software() -> Measurement:
    """Measure the dbloom code this process would run."""
    h = hashlib.sha256(DOMAIN)
    files = _package_files()
    for name, path in files:
        _field(h, name.encode())
        _field(h, path.read_bytes())
    python = platform.python_version()
    _field(h, f"python={python}".encode())
    runtime = {dist: _version(dist) for dist in RUNTIME_DISTRIBUTIONS}
    for dist, version in runtime.items():
        _field(h, f"{dist}={version}".encode())
    return Measurement(digest=h.digest(), files=len(files), python=python, runtime=runtime)
