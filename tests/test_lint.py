"""The linters, as tests: ruff and mypy --strict (config in pyproject.toml: the package, dev/,
tests/, benchmarks/ and demo/) and shellcheck on every shell script in the repository.
The tools run in the versions pinned by packaging/requirements-dev.lock (scripts/dev-setup)
and Debian's shellcheck (scripts/install-test-deps)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHELL_SHEBANG = re.compile(rb"#!\s*(/usr)?/bin/(env\s+)?(ba|da)?sh\b")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def repository_files() -> list[Path]:
    """Every file git tracks, or would track (untracked but not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    return sorted({REPO / name for name in listed.decode().split("\0") if name})


def shell_scripts() -> list[Path]:
    """Files named *.sh, and files whose first line is an sh/bash/dash shebang."""
    scripts = []
    for path in repository_files():
        if not path.is_file() or path.is_symlink():
            continue
        if path.suffix == ".sh":
            scripts.append(path)
            continue
        with path.open("rb") as f:
            first = f.readline(128)
        if SHELL_SHEBANG.match(first):
            scripts.append(path)
    return scripts


def test_ruff_is_clean() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    """Every Python file as `ruff format` writes it (pyproject.toml: line length 100)."""
    result = run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found" in result.stdout


def test_mypy_is_configured_for_every_python_file() -> None:
    with (REPO / "pyproject.toml").open("rb") as f:
        configured = [REPO / p for p in tomllib.load(f)["tool"]["mypy"]["files"]]
    left_out = [
        path.relative_to(REPO).as_posix()
        for path in repository_files()
        if path.suffix == ".py" and not any(path.is_relative_to(p) for p in configured)
    ]
    assert left_out == []


def test_every_shell_script_is_found() -> None:
    found = {path.relative_to(REPO).as_posix() for path in shell_scripts()}
    assert {
        ".ci/run",
        "demo/run.sh",
        "dev/bin/bootsecrets-dev-systemctl",
        "packer/scripts/20-install-agent.sh",
        "scripts/dev-setup",
        "scripts/install-test-deps",
    } <= found
    assert not [name for name in found if name.endswith(".py")]


def test_shellcheck_is_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is missing: run `bash scripts/install-test-deps`")
    scripts = [str(path.relative_to(REPO)) for path in shell_scripts()]
    result = subprocess.run(
        ["shellcheck", "--external-sources", *scripts],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
