"""The console script's process (`bootsecrets.cli:run`, what bootsecrets.service runs).

`run()` ends the process with os._exit() after flushing, keeps the garbage collector off and
keeps requests from loading a character-set detector (docs/performance.md). These tests run
it as its own process, as systemd does, and check what that must not change: the exit code
of every kind of outcome, output that reaches a pipe, a whole bootstrap against OpenBao.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bootsecrets import __version__
from conftest import Sandbox, read_env_file
from support.world import World

STANDIN = """#!/bin/sh
echo "$@" >> "{log}"
"""


def console(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bootsecrets.cli", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
    )


def standin_systemctl(root: Path) -> tuple[Path, Path]:
    log = root / "systemctl.log"
    program = root / "systemctl"
    program.write_text(STANDIN.format(log=log))
    program.chmod(0o755)
    return program, log


def test_version_reaches_a_pipe_and_exits_zero() -> None:
    result = console("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"bootsecrets {__version__}\n"


def test_usage_error_exits_two_with_the_usage() -> None:
    result = console("no-such-command")
    assert result.returncode == 2
    assert "usage: bootsecrets" in result.stderr
    assert "invalid choice: 'no-such-command'" in result.stderr


def test_a_mapped_error_keeps_its_exit_code_and_message(tmp_path: Path) -> None:
    result = console("status", "--root", str(tmp_path))
    assert result.returncode == 10, result.stderr
    assert "config.yaml: (top level): does not exist" in result.stderr
    assert "what to do:" in result.stderr


def test_bootstrap_as_its_own_process(world: World) -> None:
    sandbox: Sandbox = world.sandbox
    world.provision()
    systemctl, calls = standin_systemctl(sandbox.root)

    # PYTHONPROFILEIMPORTTIME lists every module the process imports, on stderr.
    result = console(
        "bootstrap",
        "--root",
        str(sandbox.root),
        "--systemctl",
        str(systemctl),
        env={"PYTHONPROFILEIMPORTTIME": "1"},
    )
    sandbox.captured.add("console stderr", result.stderr)
    sandbox.captured.add("console stdout", result.stdout)

    assert result.returncode == 0, result.stderr[-2000:]
    assert read_env_file(sandbox.env_file("app.service"))["DB_PASSWORD"] == world.password
    assert "start --no-block -- app.service worker.service" in calls.read_text()
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"hvac", "requests", "urllib3"} <= imported
    # A blocked import still shows as a line of its own; a loaded detector brings its modules.
    assert not [m for m in imported if m.startswith(("charset_normalizer.", "chardet."))]
    # The run's log lines reached stderr before the process ended.
    assert "generation 1 live; new values for app.service, worker.service" in result.stderr
    assert "bootstrap: started app.service, worker.service" in result.stderr

    again = console("bootstrap", "--root", str(sandbox.root), "--systemctl", str(systemctl))
    sandbox.captured.add("console stderr", again.stderr)
    assert again.returncode == 0, again.stderr  # no bootstrap left: the kept token is used
