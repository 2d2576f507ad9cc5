"""`dbloom attest` as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dbloom.attest import measure_software
from dbloom.inference import build_tiny_model, model_digest

DBLOOM = [sys.executable, "-m", "dbloom.cli"]


def run(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DBLOOM_HOME": str(home), "DBLOOM_CONFIG": ""}
    return subprocess.run([*DBLOOM, *args], capture_output=True, text=True, timeout=60, env=env)


def test_measure_prints_software_and_model_digests(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "tiny", size="tiny", seed=0)
    result = run("attest", "measure", "--model", str(model), "--json", home=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["software"] == measure_software().hex
    assert report["models"] == {str(model): model_digest(model)}
    assert set(report["posture"]) == {"sip", "secure_boot", "debugger_denied", "core_dumps_off"}
    text = run("attest", "measure", home=tmp_path)
    assert "software measurement" in text.stdout and "posture sip" in text.stdout


def test_check_of_an_unreachable_node_is_one_line(tmp_path: Path) -> None:
    result = run(
        "attest",
        "check",
        "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA",
        home=tmp_path,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error:")
