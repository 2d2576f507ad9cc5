"""`dbloom service`: the launchd agent and systemd unit it writes, and how it drives them.

The files are pure functions of a spec, checked for both platforms here. Every launchctl or
systemctl call is a real subprocess to a script this test writes, which records its
arguments and answers with recorded output (data/README.md).
"""

from __future__ import annotations

import json
import os
import plistlib
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dbloom.cli.service import (
    LABEL,
    ServiceError,
    ServiceManager,
    launchd_plist,
    parse_launchctl_print,
    parse_systemctl_show,
    service_spec,
    systemd_unit,
)

DATA = Path(__file__).parent / "data"
DBLOOM = [sys.executable, "-m", "dbloom.cli"]
PYTHON = "/opt/py thon/bin/python3"
HOME = Path("/Users/owner/Library/Application Support/dbloom")

FAKE_CTL = """\
#!{python}
import json, pathlib, sys
here = pathlib.Path(sys.argv[0])
with here.with_suffix(".calls").open("a") as calls:
    calls.write(json.dumps(sys.argv[1:]) + "\\n")
args = [a for a in sys.argv[1:] if a != "--user"]
answers = json.loads(here.with_suffix(".answers").read_text())
answer = answers.get(args[0], {{}})
sys.stdout.write(answer.get("stdout", ""))
sys.stderr.write(answer.get("stderr", ""))
sys.exit(answer.get("exit", 0))
"""


def fake_ctl(folder: Path, **answers: dict[str, object]) -> Path:
    """A launchctl/systemctl stand-in: logs its arguments, answers per sub-command."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "ctl"
    script.write_text(FAKE_CTL.format(python=sys.executable))
    script.chmod(0o755)
    script.with_suffix(".answers").write_text(json.dumps(answers))
    return script


def calls(script: Path) -> list[list[str]]:
    path = script.with_suffix(".calls")
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_launchd_agent_runs_the_peer_at_login_and_restarts_it_after_a_crash() -> None:
    spec = service_spec(
        HOME, python=PYTHON, drain_timeout=30, environ={"HF_HOME": "/hf", "SECRET": "x"}
    )
    agent = plistlib.loads(launchd_plist(spec))
    assert agent["Label"] == "org.dbloom.peer"
    assert agent["ProgramArguments"] == [
        PYTHON,
        "-m",
        "dbloom.cli",
        "peer",
        "--log-file",
        f"{HOME}/logs/peer.log",
    ]
    assert agent["EnvironmentVariables"] == {
        "DBLOOM_HOME": str(HOME),
        "PYTHONUNBUFFERED": "1",
        "HF_HOME": "/hf",
    }
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] == {"SuccessfulExit": False}
    assert agent["ExitTimeOut"] == 45  # the drain timeout and a margin before SIGKILL
    assert agent["StandardOutPath"] == f"{HOME}/logs/service.out.log"
    assert agent["StandardErrorPath"] == f"{HOME}/logs/service.err.log"
    assert agent["SoftResourceLimits"] == agent["HardResourceLimits"] == {"Core": 0}
    assert agent["WorkingDirectory"] == str(HOME)


def test_systemd_unit_quotes_and_escapes_what_it_must() -> None:
    home = Path('/home/o\'wner/100%/da$h "q"')
    spec = service_spec(home, python=PYTHON, drain_timeout=10, environ={})
    unit = systemd_unit(spec)
    lines = unit.splitlines()
    assert "[Service]" in lines and "[Install]" in lines and "WantedBy=default.target" in lines
    assert (
        'ExecStart="/opt/py thon/bin/python3" "-m" "dbloom.cli" "peer" "--log-file" '
        '"/home/o\'wner/100%%/da$$h \\"q\\"/logs/peer.log"'
    ) in lines
    assert 'Environment="DBLOOM_HOME=/home/o\'wner/100%%/da$$h \\"q\\""' in lines
    assert 'Environment="PYTHONUNBUFFERED=1"' in lines
    assert "Restart=on-failure" in lines and "TimeoutStopSec=25" in lines
    assert "LimitCORE=0" in lines
    assert 'StandardError=append:/home/o\'wner/100%%/da$h "q"/logs/service.err.log' in lines
    with pytest.raises(ServiceError, match="line break"):
        systemd_unit(service_spec(Path("/home/a\nb"), python=PYTHON, environ={}))


def test_service_manager_output_parsers() -> None:
    running = (DATA / "launchctl_print_running.txt").read_text()
    stopped = (DATA / "launchctl_print_stopped.txt").read_text()
    assert parse_launchctl_print(running) == ("running", 4242)
    assert parse_launchctl_print(stopped) == ("not running", None)
    assert parse_systemctl_show((DATA / "systemctl_show_running.txt").read_text()) == {
        "ActiveState": "active",
        "SubState": "running",
        "MainPID": "31337",
    }


def test_launchd_install_status_uninstall(tmp_path: Path) -> None:
    running = (DATA / "launchctl_print_running.txt").read_text()
    ctl = fake_ctl(tmp_path / "bin", print={"stdout": running})
    manager = ServiceManager("launchd", str(ctl), tmp_path / "user", 501)
    spec = service_spec(tmp_path / "dbloom home", python=PYTHON, environ={})
    manager.install(spec)
    plist = tmp_path / "user" / "Library" / "LaunchAgents" / "org.dbloom.peer.plist"
    assert manager.file == plist and plistlib.loads(plist.read_bytes())["Label"] == LABEL
    assert (tmp_path / "dbloom home" / "logs").is_dir()
    assert calls(ctl) == [
        ["bootout", "gui/501/org.dbloom.peer"],
        ["enable", "gui/501/org.dbloom.peer"],
        ["bootstrap", "gui/501", str(plist)],
    ]
    state = manager.state()
    assert state.installed and state.running and state.pid == 4242
    assert manager.uninstall() and not plist.exists()
    assert calls(ctl)[-1] == ["bootout", "gui/501/org.dbloom.peer"]
    assert not manager.uninstall()


def test_systemd_install_status_uninstall(tmp_path: Path) -> None:
    show = (DATA / "systemctl_show_running.txt").read_text()
    ctl = fake_ctl(tmp_path / "bin", show={"stdout": show})
    manager = ServiceManager("systemd", str(ctl), tmp_path / "user", 1000)
    manager.install(service_spec(tmp_path / "home", python=PYTHON, environ={}))
    unit = tmp_path / "user" / ".config" / "systemd" / "user" / "dbloom-peer.service"
    assert manager.file == unit and "ExecStart=" in unit.read_text()
    assert calls(ctl) == [
        ["--user", "daemon-reload"],
        ["--user", "enable", "dbloom-peer.service"],
        ["--user", "restart", "dbloom-peer.service"],
    ]
    state = manager.state()
    assert state.running and state.pid == 31337 and state.detail == "active (running)"
    assert manager.uninstall() and not unit.exists()
    assert calls(ctl)[-2:] == [
        ["--user", "disable", "--now", "dbloom-peer.service"],
        ["--user", "daemon-reload"],
    ]


def test_a_refusing_service_manager_is_one_line(tmp_path: Path) -> None:
    ctl = fake_ctl(
        tmp_path / "bin",
        bootstrap={"exit": 5, "stderr": "Bootstrap failed: 5: Input/output error\n"},
    )
    manager = ServiceManager("launchd", str(ctl), tmp_path / "user", 501)
    with pytest.raises(ServiceError, match=r"^bootstrap gui/501 .* failed: Bootstrap failed: 5"):
        manager.install(service_spec(tmp_path / "home", python=PYTHON, environ={}))
    missing = ServiceManager("systemd", str(tmp_path / "nope"), tmp_path / "user", 1)
    with pytest.raises(ServiceError, match="cannot run"):
        missing.install(service_spec(tmp_path / "home", python=PYTHON, environ={}))


def dbloom(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DBLOOM, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **env}
    )


def test_service_commands_end_to_end(tmp_path: Path) -> None:
    show = (DATA / "systemctl_show_running.txt").read_text()
    printed = (DATA / "launchctl_print_running.txt").read_text()
    ctl = fake_ctl(tmp_path / "bin", show={"stdout": show}, print={"stdout": printed})
    config = tmp_path / "config.toml"
    config.write_text("")
    env = {
        "HOME": str(tmp_path / "user"),
        "DBLOOM_HOME": str(tmp_path / "home"),
        "DBLOOM_CONFIG": str(config),
        "DBLOOM_SERVICE_CTL": str(ctl),
    }
    done = dbloom("service", "install", env=env)
    assert done.returncode == 1 and "nothing to serve" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not calls(ctl)
    config.write_text('[peer]\nmodel = ["org/model"]\ndrain_timeout = 5\n')
    done = dbloom("service", "install", env=env)
    assert done.returncode == 0, done.stderr
    if sys.platform == "darwin":
        service_file = tmp_path / "user" / "Library" / "LaunchAgents" / "org.dbloom.peer.plist"
        written = plistlib.loads(service_file.read_bytes())
        assert written["ExitTimeOut"] == 20
        assert written["EnvironmentVariables"]["DBLOOM_CONFIG"] == str(config)
    else:
        service_file = tmp_path / "user" / ".config" / "systemd" / "user" / "dbloom-peer.service"
        assert "TimeoutStopSec=20" in service_file.read_text()
        assert f'Environment="DBLOOM_CONFIG={config}"' in service_file.read_text()
    assert f"installed {service_file}" in done.stdout
    done = dbloom("service", "status", env=env)
    assert done.returncode == 0 and "installed" in done.stdout and "running  yes" in done.stdout
    done = dbloom("service", "uninstall", env=env)
    assert done.returncode == 0 and not service_file.exists()
    assert "not installed" in dbloom("service", "uninstall", env=env).stdout


def test_service_logs_tail_and_follow_across_rotation(tmp_path: Path) -> None:
    env = {"DBLOOM_HOME": str(tmp_path), "DBLOOM_CONFIG": ""}
    done = dbloom("service", "logs", env=env)
    assert done.returncode == 1 and "no log at" in done.stderr
    log = tmp_path / "logs" / "peer.log"
    log.parent.mkdir()
    log.write_text("".join(f"line {i}\n" for i in range(10)))
    assert dbloom("service", "logs", "-n", "2", env=env).stdout == "line 8\nline 9\n"
    follower = subprocess.Popen(
        [*DBLOOM, "service", "logs", "-n", "1", "-f"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        assert read_line(follower) == "line 9\n"
        with log.open("a") as handle:
            handle.write("appended\n")
        assert read_line(follower) == "appended\n"
        log.rename(log.with_suffix(".log.1"))
        log.write_text("after rotation\n")
        assert read_line(follower) == "after rotation\n"
    finally:
        follower.send_signal(signal.SIGINT)
        follower.communicate(timeout=30)
    assert follower.returncode == 0


def read_line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """The next line `proc` prints, or a failure after `timeout` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        assert selector.select(timeout), "no output in time"
    return proc.stdout.readline()
