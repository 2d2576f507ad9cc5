"""Finding, fetching, measuring and loading models.

A model is a folder with `config.json`, safetensors weights and tokenizer files, either a
local path or a Hugging Face repository id fetched into the usual HF cache. The digest pins
exactly those files, so attestation can name the weights a node serves; the memory check
refuses a load that would not fit before MLX starts paging.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._engine import ModelInfo
from ._errors import InsufficientMemory, ModelNotFound

if TYPE_CHECKING:
    from rich.progress import Progress

DIGEST_DOMAIN = b"dbloom/model-digest/v1\0"
CONFIG_FILES = frozenset({"config.json", "generation_config.json"})
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
WEIGHT_SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 << 20
"""The safetensors format's own limit on a header."""
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "merges.txt", "*.md"]
DEFAULT_CONTEXT_LENGTH = 4096
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "max_sequence_length",
    "seq_length",
    "n_positions",
    "max_seq_len",
    "n_ctx",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_READ_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalModel:
    """A resolved model folder with what a node advertises and what loading it costs."""

    path: Path
    info: ModelInfo
    weights_bytes: int
    memory_estimate: int


def digest_files(path: Path) -> list[Path]:
    """The files the digest covers: weights, config and tokenizer, sorted by name."""
    names = [
        p
        for p in path.iterdir()
        if p.is_file()
        and (p.name in CONFIG_FILES or p.name in TOKENIZER_FILES or p.name.endswith(WEIGHT_SUFFIX))
    ]
    return sorted(names, key=lambda p: p.name.encode())


def model_digest(path: Path | str) -> str:
    """Hex SHA-256 over the model's files: each as length-prefixed name, then length-prefixed bytes.

    Names are sorted and every field carries an 8-byte big-endian length, so no two file
    sets hash alike by shifting bytes between names and contents.
    """
    folder = Path(path)
    h = hashlib.sha256(DIGEST_DOMAIN)
    for file in digest_files(folder):
        name = file.name.encode()
        h.update(struct.pack(">Q", len(name)) + name)
        h.update(struct.pack(">Q", file.stat().st_size))
        with file.open("rb") as f:
            while block := f.read(_READ_BLOCK):
                h.update(block)
    return h.hexdigest()


def read_config(path: Path) -> dict[str, Any]:
    """The model's `config.json`; `ModelNotFound` if it is missing or unreadable."""
    file = path / "config.json"
    if file.exists() and not file.is_file():
        raise ModelNotFound(f"{file} is not a regular file")
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelNotFound(f"{path} has no readable config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelNotFound(f"{path}/config.json is not a JSON object")
    return config


def context_length(config: dict[str, Any]) -> int:
    """The longest sequence the model supports, from whichever key its config uses."""
    for source in (config, _table(config, "text_config")):
        for key in _CONTEXT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and value > 0:
                return value
    return DEFAULT_CONTEXT_LENGTH


def _table(config: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested table of the config, or {} when absent; a wrong type is a clear error."""
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ModelNotFound(f"config.json: {key!r} should be an object, not {value!r:.40}")
    return value


def _safetensors_elements(file: Path) -> int:
    """Tensor elements a weights file declares, from its header alone.

    The header is untrusted: its length is checked against the file before it is read,
    and every tensor must have a list of non-negative integer dimensions.
    """
    if not file.is_file():
        raise ValueError(f"{file.name} is not a regular file")
    with file.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{file.name} is shorter than a safetensors header")
        (size,) = struct.unpack("<Q", raw)
        if size > min(MAX_HEADER_BYTES, file.stat().st_size - 8):
            raise ValueError(f"{file.name} declares a {size}-byte header it cannot hold")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{file.name}: the header is not a JSON object")
    total = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
            raise ValueError(f"{file.name}: tensor {name!r:.40} has no valid shape")
        total += math.prod(shape)
    return total


def inspect_model(path: Path | str, *, model_id: str | None = None) -> LocalModel:
    """Describe a local model folder without loading its weights (the digest reads them)."""
    folder = Path(path).expanduser().resolve()
    config = read_config(folder)
    weights = sorted(folder.glob(f"*{WEIGHT_SUFFIX}"))
    if not weights:
        raise ModelNotFound(f"{folder} has no *.safetensors weights")
    weights_bytes = sum(w.stat().st_size for w in weights)
    try:
        elements = sum(_safetensors_elements(w) for w in weights)
    except (OSError, ValueError, struct.error, RecursionError) as exc:
        raise ModelNotFound(f"{folder} has unreadable weights: {exc}") from exc
    bits = _table(config, "quantization").get("bits")
    parameters = elements * 32 // bits if isinstance(bits, int) and bits > 0 else elements
    vocab = config.get("vocab_size") or _table(config, "text_config").get("vocab_size") or 0
    if type(vocab) is not int or vocab < 0:
        raise ModelNotFound(f"{folder}/config.json: vocab_size {vocab!r:.40} is not a count")
    info = ModelInfo(
        id=model_id or folder.name,
        digest=model_digest(folder),
        context_length=context_length(config),
        vocab_size=vocab,
        parameters=parameters,
    )
    return LocalModel(
        path=folder,
        info=info,
        weights_bytes=weights_bytes,
        memory_estimate=estimate_memory(weights_bytes),
    )


def estimate_memory(weights_bytes: int) -> int:
    """Weights plus a fifth for KV caches and activations, plus a fixed 64 MiB."""
    return weights_bytes + weights_bytes // 5 + (64 << 20)


def available_memory() -> int:
    """Bytes a new model could use now: MemAvailable on Linux, the GPU working set on Macs."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    import mlx.core as mx

    working_set = mx.device_info().get("max_recommended_working_set_size")
    if isinstance(working_set, int) and working_set > 0:
        return working_set
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_memory(model: LocalModel, *, available: int | None = None) -> None:
    """Raise `InsufficientMemory` if the model's estimate exceeds what is available."""
    free = available_memory() if available is None else available
    if model.memory_estimate > free:
        raise InsufficientMemory(
            f"{model.info.id} needs about {model.memory_estimate / 2**30:.2f} GiB "
            f"but only {free / 2**30:.2f} GiB is available"
        )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_model(
    ref: str,
    *,
    cache_dir: Path | str | None = None,
    progress: Progress | None = None,
    download: bool = True,
) -> Path:
    """A local folder for `ref`: the folder itself, or the HF snapshot (fetched if needed).

    Honours `HF_HUB_OFFLINE` at call time: offline (or with `download=False`), only the
    cache is consulted. Raises `ModelNotFound` with the reason when the model is neither
    local, cached nor reachable.
    """
    local = Path(ref).expanduser()
    if local.is_dir():
        read_config(local)
        return local.resolve()
    if not _REPO_ID.match(ref):
        raise ModelNotFound(f"{ref!r} is neither a model folder nor a Hugging Face repo id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    offline = _offline()
    try:
        folder = snapshot_download(
            ref,
            cache_dir=cache_dir,
            allow_patterns=DOWNLOAD_PATTERNS,
            local_files_only=offline or not download,
            tqdm_class=rich_tqdm(progress) if progress is not None else None,
        )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if offline:
            where = "HF_HUB_OFFLINE is set"
        elif download:
            where = "the Hub is unreachable"
        else:
            where = "this command does not download (use `dbloom models pull`)"
        raise ModelNotFound(f"{ref} is not in the local cache and {where}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelNotFound(f"cannot fetch {ref}: {exc}") from exc
    path = Path(folder)
    read_config(path)
    return path


def cached_models(cache_dir: Path | str | None = None) -> Iterator[tuple[str, Path, int]]:
    """`(repo id, snapshot folder, bytes on disk)` for each model in the HF cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            names = {f.file_name for f in revision.files}
            if "config.json" in names and any(n.endswith(WEIGHT_SUFFIX) for n in names):
                yield repo.repo_id, revision.snapshot_path, revision.size_on_disk
                break


def load_model(model: LocalModel, *, available: int | None = None) -> tuple[Any, Any]:
    """Check memory, then load with `mlx_lm.load`; returns `(model, TokenizerWrapper)`."""
    check_memory(model, available=available)
    from mlx_lm import load

    loaded = load(str(model.path))
    return loaded[0], loaded[1]


def rich_tqdm(progress: Progress) -> type:
    """A tqdm class drawing into one shared rich `Progress`, for `snapshot_download`.

    huggingface_hub opens several bars at once (files, bytes), and rich allows only one
    live display, so every bar becomes a task of the caller's `Progress`.
    """
    from tqdm.std import tqdm as std_tqdm

    class RichTqdm(std_tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["gui"] = True
            kwargs["disable"] = False
            kwargs.setdefault("file", sys.stderr)
            super().__init__(*args, **kwargs)
            self._task = progress.add_task(self.desc or "", total=self.total)

        def display(self, *args: Any, **kwargs: Any) -> None:
            task = getattr(self, "_task", None)
            if task is not None:
                progress.update(task, completed=self.n, total=self.total, description=self.desc)

        def clear(self, *args: Any, **kwargs: Any) -> None:
            """Nothing to clear: rich owns the terminal."""

        def close(self) -> None:
            if not self.disable:
                self.display()
            super().close()

    return RichTqdm
