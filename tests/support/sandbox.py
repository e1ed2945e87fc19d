"""A sandboxed host root on tmpfs that drives the real CLI entry point, what a test captured
for the leak guard, and the checks many tests share."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

import yaml

from bootsecrets import cli
from bootsecrets.agent import Context
from bootsecrets.paths import Paths
from bootsecrets.systemd import RecordingRunner
from bootsecrets_dev.envfile import parse
from support.openbao import OpenBao

#: Under a sandbox root, what the memory-only store and the kept token may hold.
STORE_EXCLUDED = ("run/bootsecrets/", "var/lib/bootsecrets/")


class Captured:
    """Everything a test captured that must never hold a canary."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []
        self.runners: list[RecordingRunner] = []
        self.roots: list[Path] = []

    def add(self, where: str, text: str) -> None:
        self.texts.append((where, text))


def find_leaks(places: list[tuple[str, str]], canaries: set[str]) -> list[tuple[str, str]]:
    """(where, first characters) for every canary found in a captured text."""
    return [
        (where, canary[:4] + "…")
        for canary in canaries
        if len(canary) >= 6
        for where, text in places
        if canary in text
    ]


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
        return Context(
            paths=self.paths,
            runner=self.runner,
            env=dict(self.env),
            after_lookup=self.after_lookup,
            after_login=self.after_login,
        )

    def run(self, *args: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(
                [*args, "--root", str(self.root)],
                context=self.context(),
                stdin=io.StringIO(stdin),
                stdout=out,
            )
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
        return [
            u
            for call in self.runner.verbs()
            if call[:1] == ("start",)
            for u in call
            if u.endswith(".service")
        ]


def assert_nothing_rendered(sandbox: Sandbox, *, systemctl_called: bool = True) -> None:
    """A run that failed left nothing behind: no file and no directory under the store's
    generations, no `current`, no runtime drop-in, no unit started. With
    `systemctl_called=False`, not a single systemctl call either (not even daemon-reload)."""
    assert sandbox.written_files() == []
    generations = sandbox.store / "generations"
    assert not generations.exists() or list(generations.iterdir()) == []
    assert not (sandbox.store / "current").exists()
    assert not (sandbox.root / "run/systemd/system").exists()
    assert not [call for call in sandbox.runner.verbs() if call[:1] == ("start",)]
    if not systemctl_called:
        assert sandbox.runner.calls == []


def read_env_file(path: Path) -> dict[str, str]:
    """A rendered env file, read back with the independent parser of systemd's rules."""
    return parse(path.read_bytes().decode("utf-8"))


def mode_of(path: Path) -> int:
    return os.stat(path).st_mode & 0o7777
