"""Shared fixtures: a real OpenBao dev server, sandboxed host roots on tmpfs, the leak guard."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootsecrets import cli
from bootsecrets.agent import Context
from bootsecrets.paths import Paths
from bootsecrets.systemd import RecordingRunner
from support.openbao import CANARIES, OpenBao, dev_server
from support.world import World

STORE_EXCLUDED = ("run/bootsecrets/", "var/lib/bootsecrets/")


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBao]:
    with dev_server() as server:
        yield server


class Captured:
    """Everything a test captured that must never hold a canary."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []
        self.runners: list[RecordingRunner] = []
        self.roots: list[Path] = []

    def add(self, where: str, text: str) -> None:
        self.texts.append((where, text))


@pytest.fixture
def captured() -> Captured:
    return Captured()


@pytest.fixture(autouse=True)
def leak_guard(
    captured: Captured, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> Iterator[None]:
    """After every test: no secret value, wrapped token or secret-id created through the
    OpenBao helpers appears in a log record (any field), stdout, stderr, a systemctl argv,
    or a file of a sandbox root outside the memory-only store and the token file."""
    caplog.set_level(logging.DEBUG, logger="bootsecrets")
    yield
    out, err = capsys.readouterr()
    places = [("stdout", out), ("stderr", err), *captured.texts]
    for record in caplog.records:
        places.append((f"log record {record.name}", record.getMessage()))
        places.append((f"log record fields {record.name}", repr(record.__dict__)))
        if record.exc_info:
            places.append(("log traceback", logging.Formatter().formatException(record.exc_info)))
    for runner in captured.runners:
        places.extend(("systemctl argv", " ".join(call)) for call in runner.calls)
    for root in captured.roots:
        for path in root.rglob("*"):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and not path.is_symlink() and not rel.startswith(STORE_EXCLUDED):
                places.append((f"file {rel}", path.read_bytes().decode("utf-8", "replace")))
    leaks = find_leaks(places, CANARIES)
    assert not leaks, f"secret material leaked into: {leaks}"


def find_leaks(places: list[tuple[str, str]], canaries: set[str]) -> list[tuple[str, str]]:
    """(where, first characters) for every canary found in a captured text."""
    return [(where, canary[:4] + "…") for canary in canaries if len(canary) >= 6
            for where, text in places if canary in text]


class Sandbox:
    """A host root on tmpfs (/dev/shm) with the image config, bootstrap and a recording
    systemctl; `run()` drives the real CLI entry point against it."""

    def __init__(self, root: Path, captured: Captured, openbao: OpenBao | None) -> None:
        self.root = root
        self.captured = captured
        self.openbao = openbao
        self.runner = RecordingRunner()
        captured.runners.append(self.runner)
        captured.roots.append(root)
        self.env: dict[str, str] = {}
        self.after_lookup: Any = None
        self.after_login: Any = None

    @property
    def paths(self) -> Paths:
        return Paths(self.root)

    @property
    def store(self) -> Path:
        return self.root / "run/bootsecrets"

    def write_config(self, config: dict[str, Any] | str) -> Path:
        path = self.root / "etc/bootsecrets/config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        path.write_text(text)
        return path

    def write_bootstrap(self, role_id: str, wrapped: str, addr: str | None = None) -> Path:
        """As cloud-init write_files would: /run/bootsecrets/bootstrap.yaml, 0600."""
        path = self.store / "bootstrap.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"role_id": role_id, "wrapped_secret_id": wrapped}
        if addr:
            doc["vault_addr"] = addr
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path

    def context(self) -> Context:
        return Context(paths=self.paths, runner=self.runner, env=dict(self.env),
                       after_lookup=self.after_lookup, after_login=self.after_login)

    def run(self, *args: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main([*args, "--root", str(self.root)], context=self.context(),
                            stdin=io.StringIO(stdin), stdout=out)
        self.captured.add("cli stdout", out.getvalue())
        self.captured.add("cli stderr", err.getvalue())
        return code, out.getvalue(), err.getvalue()

    def env_file(self, unit: str) -> Path:
        return self.store / "current/env" / f"{unit}.env"

    def written_files(self) -> list[str]:
        """Every file under the store's generations (what a render wrote)."""
        base = self.store / "generations"
        if not base.exists():
            return []
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())

    def started_units(self) -> list[str]:
        return [u for call in self.runner.verbs() if call[:1] == ("start",)
                for u in call if u.endswith(".service")]


@pytest.fixture
def sandbox_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bootsecrets-test-", dir="/dev/shm"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sandbox(sandbox_root: Path, captured: Captured) -> Sandbox:
    return Sandbox(sandbox_root, captured, None)


@pytest.fixture
def unique() -> str:
    """A name unique to this test, for roles and secret paths on the shared server."""
    return "t" + secrets.token_hex(4)


def read_env_file(path: Path) -> dict[str, str]:
    from systemd_envfile import parse  # the independent parser, in tests/

    return parse(path.read_bytes().decode("utf-8"))


def mode_of(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777


@pytest.fixture
def world(openbao: OpenBao, sandbox: Sandbox, unique: str) -> World:
    """A role and secrets on the shared server, and a sandbox configured to use them."""
    sandbox.openbao = openbao
    return World(openbao, sandbox, unique)
