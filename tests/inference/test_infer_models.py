"""Model folders: the tiny builder, digests, resolution (offline), memory checks, the CLI."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress
from typer.testing import CliRunner

from dbloom.inference import (
    InsufficientMemory,
    ModelNotFound,
    build_tiny_model,
    cached_models,
    check_memory,
    inspect_model,
    load_model,
    model_digest,
    models_app,
    resolve_model,
)
from dbloom.inference._models import rich_tqdm
from dbloom.inference._tiny import SPECS


def test_tiny_model_is_deterministic_and_loads(tiny_model: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", size="tiny", seed=0)
    assert model_digest(again) == model_digest(tiny_model)
    other = build_tiny_model(tmp_path / "other", size="tiny", seed=1)
    assert model_digest(other) != model_digest(tiny_model)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model / name).is_file()
    assert "meaningless" in (tiny_model / "README.md").read_text()
    assert "chat_template" in json.loads((tiny_model / "tokenizer_config.json").read_text())
    local = inspect_model(tiny_model, model_id="tiny")
    assert 1_000_000 < local.info.parameters < 10_000_000
    assert local.info.context_length == SPECS["tiny"].max_position_embeddings
    model, tokenizer = load_model(local)
    assert tokenizer.has_chat_template and model is not None
    with pytest.raises(ValueError, match="size"):
        build_tiny_model(tmp_path / "x", size="huge")  # type: ignore[arg-type]


def test_small_spec_is_about_25m_parameters() -> None:
    s = SPECS["small"]
    per_layer = 4 * s.hidden_size**2 + 3 * s.hidden_size * s.intermediate_size
    total = s.num_hidden_layers * per_layer + 2 * s.vocab_target * s.hidden_size
    assert s.hidden_size == 512 and s.num_hidden_layers == 8
    assert 20_000_000 < total < 30_000_000


def test_digest_covers_weights_config_and_tokenizer_only(tiny_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    base = model_digest(copy)
    (copy / "README.md").write_text("changed")
    (copy / "notes.txt").write_text("ignored")
    assert model_digest(copy) == base
    for name in ("config.json", "tokenizer_config.json", "model.safetensors"):
        target = copy / name
        original = target.read_bytes()
        target.write_bytes(original + b" ")
        assert model_digest(copy) != base
        target.write_bytes(original)
    assert model_digest(copy) == base
    (copy / "tokenizer.json").rename(copy / "tokenizer.model")
    assert model_digest(copy) != base


def test_resolve_local_and_offline_missing(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_model(str(tiny_model)) == tiny_model.resolve()
    with pytest.raises(ModelNotFound, match=r"config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFound, match="neither"):
        resolve_model("not a repo id!")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE"):
        resolve_model("dbloom-test/does-not-exist", cache_dir=tmp_path / "hf")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(ModelNotFound, match="does not download"):
        resolve_model("dbloom-test/does-not-exist", cache_dir=tmp_path / "hf", download=False)
    assert list(cached_models(tmp_path / "nowhere")) == []


def test_cached_models_finds_snapshots(tiny_model: Path, tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    found = list(cached_models(tmp_path / "hub"))
    assert [(repo, path) for repo, path, _ in found] == [("acme/tiny", snapshot)]


def test_memory_check(tiny_model: Path) -> None:
    local = inspect_model(tiny_model)
    check_memory(local, available=local.memory_estimate)
    with pytest.raises(InsufficientMemory, match="GiB"):
        check_memory(local, available=local.memory_estimate - 1)
    with pytest.raises(InsufficientMemory):
        load_model(local, available=1024)


def test_rich_progress_adapter() -> None:
    out = io.StringIO()
    with Progress(console=Console(file=out, force_terminal=False)) as progress:
        bar = rich_tqdm(progress)(total=10, desc="Fetching", unit="B", name="ignored")
        bar.update(4)
        bar.total = 20
        bar.update(16)
        bar.close()
        (task,) = progress.tasks
    assert task.completed == 20 and task.total == 20 and task.description == "Fetching"


def test_cli(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    made = runner.invoke(models_app, ["make-tiny", str(tmp_path / "m"), "--seed", "0"])
    assert made.exit_code == 0, made.output
    assert model_digest(tiny_model) in made.output
    shown = runner.invoke(models_app, ["info", str(tiny_model)])
    assert shown.exit_code == 0 and "digest" in shown.output
    listed = runner.invoke(models_app, ["list", "--cache-dir", str(tmp_path / "none")])
    assert listed.exit_code == 0 and "no models" in listed.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pulled = runner.invoke(models_app, ["pull", "dbloom-test/absent", "--cache-dir", str(tmp_path)])
    assert pulled.exit_code == 1 and "HF_HUB_OFFLINE" in pulled.output
