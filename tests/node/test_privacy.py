"""No prompt and no output ever lands in a log, a file or a crash report.

Real requests go through real peers and a real shim with a canary in the prompt, and a
logit bias forces a known, repeated token as the output (a second canary). Everything is
logged at DEBUG to a file. Then a `dbloom peer` process (hardened as operators run it,
logging to a file at DEBUG, faulthandler on) serves one more such request and is killed
with SIGSEGV after raising its core-size limit as far as it may go: its crash output must
exist and hold no canary, and no core file may appear. Finally every file the test
produced (logs, ledgers, status files, keys, the child's stdout and stderr) is searched
for both canaries.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from node_helpers import MODEL, Net, loopback
from tokenizers import Tokenizer

PROMPT_CANARY = "canary-prompt-5f0c2e9a7d41"
CLIENT_LOGGERS = ("openai", "httpx", "httpcore")
"""The test's own HTTP client logs request bodies at DEBUG; it is not the product."""
CRASHY = "crashy"
DBLOOM = [sys.executable, "-m", "dbloom.cli"]


def forced_token(model: Path) -> tuple[int, str]:
    """The longest alphabetic token of the model, and the text of 8 of it in a row."""
    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    token = max(
        (i for i in tokenizer.get_vocab().values() if tokenizer.decode([i]).strip().isalpha()),
        key=lambda i: len(tokenizer.decode([i]).strip()),
    )
    return token, tokenizer.decode([token] * 8).strip()


class _NotTheClient(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith(CLIENT_LOGGERS)


@contextmanager
def debug_log(path: Path) -> Iterator[None]:
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.addFilter(_NotTheClient())
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


async def ask(net: Net, model: str, token: int) -> list[str]:
    """The same canary through completions, streaming completions and chat."""
    client = net.client()
    bias = {str(token): 100}
    texts = []
    reply = await client.completions.create(
        model=model, prompt=f"repeat {PROMPT_CANARY}", max_tokens=8, temperature=0, logit_bias=bias
    )
    texts.append(reply.choices[0].text)
    stream = await client.completions.create(
        model=model,
        prompt=f"stream {PROMPT_CANARY}",
        max_tokens=8,
        temperature=0,
        logit_bias=bias,
        stream=True,
    )
    texts.append("".join([chunk.choices[0].text async for chunk in stream]))
    chat = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": f"say {PROMPT_CANARY}"}],
        max_tokens=8,
        temperature=0,
        logit_bias=bias,
    )
    texts.append(chat.choices[0].message.content or "")
    await client.close()
    return texts


def _allow_core_files() -> None:
    """In the child before exec: core files as large as allowed, so only the peer's own
    hardening can keep them off."""
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


async def wait_for_line(path: Path, marker: str, proc: trio.Process, timeout: float = 90) -> str:
    with trio.fail_after(timeout):
        while marker not in (text := await trio.Path(path).read_text()):
            if proc.returncode is not None:
                raise AssertionError(f"peer exited before {marker!r}: {text}")
            await trio.sleep(0.1)
    return text


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in sorted(root.rglob("*")) if p.is_file()]


@pytest.mark.slow
async def test_prompts_and_outputs_stay_out_of_logs_files_and_crash_reports(
    node_model: Path, tmp_path: Path
) -> None:
    token, output_canary = forced_token(node_model)
    homes, child_home, child_cwd = tmp_path / "homes", tmp_path / "child", tmp_path / "cwd"
    child_cwd.mkdir()
    crashy_model = shutil.copytree(node_model, tmp_path / "models" / CRASHY)
    log_file = tmp_path / "debug.log"
    with debug_log(log_file):
        async with loopback(home=homes) as net:
            for i in range(2):
                await net.start_peer(node_model, home=homes / f"peer-{i}")
            for text in await ask(net, MODEL, token):
                assert output_canary in text  # the canary really is the output

            out, err = tmp_path / "child.out", tmp_path / "child.err"
            with out.open("wb") as stdout, err.open("wb") as stderr:
                run = partial(
                    trio.run_process,
                    [
                        *DBLOOM,
                        "--debug",
                        "peer",
                        "-m",
                        str(crashy_model),
                        "-l",
                        "/ip4/127.0.0.1/tcp/0",
                        "-b",
                        str(net.bootstrap.listen_addrs[0]),
                        "--no-benchmark",
                        "--always-on",
                        "--log-file",
                        str(child_home / "logs" / "peer.log"),
                    ],
                    stdout=stdout,
                    stderr=stderr,
                    cwd=child_cwd,
                    env={
                        **os.environ,
                        "DBLOOM_HOME": str(child_home),
                        "DBLOOM_CONFIG": "",
                        "PYTHONFAULTHANDLER": "1",
                    },
                    preexec_fn=_allow_core_files,
                    check=False,
                )
                child = await net.nursery.start(run)
                await wait_for_line(out, "attestation dev", child)
                for text in await ask(net, CRASHY, token):
                    assert output_canary in text
                if sys.platform.startswith("linux"):
                    limits = await trio.Path(f"/proc/{child.pid}/limits").read_text()
                    core = next(line for line in limits.splitlines() if "core file" in line)
                    assert core.split()[4:6] == ["0", "0"], core
                child.send_signal(signal.SIGSEGV)
                with trio.fail_after(30):
                    await child.wait()
            assert child.returncode == -signal.SIGSEGV
            crash = err.read_text()
            assert "Fatal Python error: Segmentation fault" in crash  # a crash report exists

    log = log_file.read_text()
    assert " DEBUG " in log and "prompt and" in log  # the logs did record requests
    assert "prompt and" in (child_home / "logs" / "peer.log").read_text()
    searched = [*files_under(tmp_path / "homes", child_home, child_cwd), log_file, out, err]
    names = {p.name for p in searched}
    assert {"ledger.sqlite3", "peer-status.json", "peer.log", "identity.key"} <= names
    assert not [p for p in searched if p.name.startswith("core")]
    for path in searched:
        data = path.read_bytes()
        assert PROMPT_CANARY.encode() not in data, f"the prompt leaked into {path}"
        assert output_canary.encode() not in data, f"the output leaked into {path}"
