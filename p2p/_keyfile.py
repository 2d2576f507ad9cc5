"""The identity key on disk: private to its owner, written atomically.

A key another user can read is no longer a secret, so we refuse to use it rather
than warn; the message tells the operator the one command that fixes it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ._errors import DecodeError
from ._identity import KeyPair

KEY_FILE_NAME = "identity.key"
MAX_KEY_FILE_BYTES = 4096


class KeyFileError(Exception):
    """The key file is missing, unreadable, malformed or too open."""


def load_identity(path: Path) -> KeyPair:
    """Load a key file, refusing one that group or others can read or write."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise KeyFileError(
                f"identity key {path} is a link to {os.readlink(path)}, which does not exist"
            ) from None
        raise KeyFileError(f"no identity key at {path}; run `dbloom keys init`") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read identity key {path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"identity key {path} is not a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"identity key {path} is accessible by other users "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`"
        )
    if info.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"identity key {path} is too large to be a key")
    try:
        return KeyPair.from_private_bytes(path.read_bytes())
    except DecodeError as exc:
        raise KeyFileError(f"identity key {path} is malformed: {exc}") from None


def create_identity(path: Path) -> KeyPair:
    """Write a new key with mode 0600; never overwrites an existing file (or link)."""
    if os.path.lexists(path):
        raise KeyFileError(f"an identity key already exists at {path}")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pair = KeyPair.generate()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pair.private_bytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)
    except FileExistsError:
        raise KeyFileError(f"an identity key already exists at {path}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return pair


def load_or_create_identity(path: Path) -> KeyPair:
    """The key at `path`, created on first use."""
    if not os.path.lexists(path):
        try:
            return create_identity(path)
        except KeyFileError:
            if not os.path.lexists(path):
                raise
    return load_identity(path)
