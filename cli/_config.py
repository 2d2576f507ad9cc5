"""`config.toml`: defaults for every command's options, below flags and DBLOOM_* variables.

The file (default `~/.config/dbloom/config.toml`, or `DBLOOM_CONFIG`) has one table per
command, keyed by option name with underscores: `[peer] model = ["..."]`, `price_in = "0.2"`;
a group's commands have tables of their own: `[sim.run] seed = 2`.
Click's `default_map` gives the precedence flags > environment > file > built-in default.
Unknown tables or keys are errors, so a typo never silently changes nothing.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer


def config_path() -> Path | None:
    """`DBLOOM_CONFIG` if set (empty: no file at all), else the per-user default."""
    env = os.environ.get("DBLOOM_CONFIG")
    if env is None:
        return default_config_path()
    return Path(env).expanduser() if env else None


def default_config_path() -> Path:
    return Path.home() / ".config" / "dbloom" / "config.toml"


MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """The config file cannot be read or names an option that does not exist."""


def load_config(commands: Mapping[str, Any]) -> dict[str, Any]:
    """The `default_map` for a group with `commands`, validated against their options.

    No file at the default place means no defaults; a file named by `DBLOOM_CONFIG`
    must exist, so a typo in it is an error, not a silently ignored file. An empty
    `DBLOOM_CONFIG` ignores every file (tests and scripts use it).
    """
    path = config_path()
    if path is None:
        return {}
    try:
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path} is not a regular file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path} is over {MAX_CONFIG_BYTES} bytes: not a config file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if path == default_config_path():
            return {}
        raise ConfigError(
            f"DBLOOM_CONFIG names {path}, which does not exist (set it empty to use no config file)"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for section, values in data.items():
        command = commands.get(section)
        if command is None or not isinstance(values, dict):
            raise ConfigError(f"{path}: [{section}] is not a dbloom command with options")
        _check(path, section, command, values)
    return data


def _check(path: Path, label: str, command: Any, values: dict[str, Any]) -> None:
    """Every key an option of `command` with a valid value, or a table for a subcommand
    (`[sim.run]`: click looks up a subcommand's defaults under its name)."""
    params = {p.name: p for p in command.params}
    subcommands = getattr(command, "commands", {})
    for key, value in values.items():
        if key in subcommands and isinstance(value, dict):
            _check(path, f"{label}.{key}", subcommands[key], value)
    options = {k: v for k, v in values.items() if not (k in subcommands and isinstance(v, dict))}
    if unknown := set(options) - set(params):
        known = sorted(n for n in params if n) + sorted(f"[{label}.{c}]" for c in subcommands)
        raise ConfigError(
            f"{path}: [{label}] has no option {', '.join(sorted(unknown))} "
            f"(known: {', '.join(known)})"
        )
    # Checked here, so that click does not blame a bad value on the option's variable.
    context = command.context_class(command)
    for name, value in options.items():
        try:
            params[name].process_value(context, value)
        except typer.BadParameter as e:
            raise ConfigError(f"{path}: [{label}] {name} = {value!r}: {e.message}") from None
