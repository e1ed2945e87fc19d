"""Paths the agent creates or writes are never followed (issue 10, item 6), and the files it
reads cannot block it or exhaust it (item 7): the real CLI against a real OpenBao, a tmpfs
sandbox root, and a directory on the root disk (/var/tmp) as where a symlink would lead.

Every refusal checks: the exit code, one error line naming the path and what it is, nothing
created or changed at the symlink's target, no secret (canary) anywhere outside the store
(the disk directory is handed to the leak guard), and, for the checks made before any
secret is touched, that Vault saw no wrapping lookup (the single-use secret-id is unspent)
and systemctl was never called."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootsecrets import errors
from bootsecrets.paths import DROPIN_NAME
from conftest import Captured, Sandbox, read_env_file
from support.openbao import OpenBao
from support.world import World

STORE = "run/bootsecrets"
DROPINS = "run/systemd/system"


@pytest.fixture
def disk(captured: Captured) -> Iterator[Path]:
    """A directory on the root disk; the leak guard scans it for canaries after the test."""
    path = Path(tempfile.mkdtemp(prefix="bootsecrets-disk-", dir="/var/tmp"))
    captured.roots.append(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def snapshot(path: Path) -> dict[str, bytes | None]:
    """Every entry under `path` (file bytes; None for directories and symlinks)."""
    return {
        p.relative_to(path).as_posix(): (
            p.read_bytes() if p.is_file() and not p.is_symlink() else None
        )
        for p in sorted(path.rglob("*"))
    }


def move_aside(sandbox: Sandbox, rel: str) -> Path:
    """Move `rel` out of the way, into the store (it may hold secrets), so that a symlink
    can take its place."""
    aside = sandbox.store / ".aside" / rel.replace("/", "_")
    aside.parent.mkdir(exist_ok=True)
    (sandbox.root / rel).rename(aside)
    return aside


def link(sandbox: Sandbox, rel: str, target: Path) -> None:
    path = sandbox.root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def vault_touched(openbao: OpenBao, offset: int) -> list[str]:
    return [
        r["path"]
        for r in openbao.audited_requests(offset)
        if r["path"].startswith(("sys/wrapping", "auth/approle"))
    ]


# --- before any secret: bootstrap refuses at once -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plant:
    id: str
    #: The path (relative to the sandbox root) the error must name.
    refused: str
    #: Plants the symlink (or odd entry); gets the sandbox and the disk directory.
    plant: Callable[[Sandbox, Path], None]
    reason: str = "is a symlink; refusing to follow it"
    config: dict[str, Any] = dataclasses.field(default_factory=dict)


def _store_to_disk(sandbox: Sandbox, disk: Path) -> None:
    shutil.rmtree(sandbox.store)  # with the bootstrap: it must not end up on disk
    link(sandbox, STORE, disk)


def _run_to_disk(sandbox: Sandbox, disk: Path) -> None:
    shutil.rmtree(sandbox.root / "run")
    link(sandbox, "run", disk)


def _store_to_tmpfs(sandbox: Sandbox, disk: Path) -> None:
    """A symlink to a memory-backed directory is not followed either."""
    (sandbox.store / "bootstrap.yaml").unlink()  # the token stays in the store proper
    aside = sandbox.root / "run/elsewhere"
    sandbox.store.rename(aside)
    link(sandbox, STORE, aside)


def _file_on_disk(rel: str) -> Callable[[Sandbox, Path], None]:
    def plant(sandbox: Sandbox, disk: Path) -> None:
        (disk / "file").write_text("on disk\n")
        link(sandbox, rel, disk / "file")

    return plant


def _dir_on_disk(rel: str) -> Callable[[Sandbox, Path], None]:
    def plant(sandbox: Sandbox, disk: Path) -> None:
        link(sandbox, rel, disk)

    return plant


def _current_to(target: str) -> Callable[[Sandbox, Path], None]:
    def plant(sandbox: Sandbox, disk: Path) -> None:
        (sandbox.store / "current").symlink_to(target.replace("DISK", str(disk)))

    return plant


def _fifo(rel: str) -> Callable[[Sandbox, Path], None]:
    def plant(sandbox: Sandbox, disk: Path) -> None:
        (sandbox.root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(sandbox.root / rel)

    return plant


PERSIST = {"reboot_policy": "persist-token"}

PLANTS = [
    Plant("store-to-disk", STORE, _store_to_disk),
    Plant("store-to-tmpfs", STORE, _store_to_tmpfs),
    Plant("run-to-disk", "run", _run_to_disk),
    Plant("generations-to-disk", f"{STORE}/generations", _dir_on_disk(f"{STORE}/generations")),
    Plant("current-absolute", f"{STORE}/current", _current_to("DISK"), reason="points at"),
    Plant(
        "current-escaping",
        f"{STORE}/current",
        _current_to("generations/../../../x"),
        reason="points at",
    ),
    Plant(
        "current-a-directory",
        f"{STORE}/current",
        lambda s, d: (s.store / "current").mkdir(),
        reason="is a directory, not the symlink the agent maintains",
    ),
    Plant("state-json-to-disk", f"{STORE}/state.json", _file_on_disk(f"{STORE}/state.json")),
    Plant("runtime-token-to-disk", f"{STORE}/token", _file_on_disk(f"{STORE}/token")),
    Plant("lock-to-disk", f"{STORE}/lock", _file_on_disk(f"{STORE}/lock")),
    Plant(
        "lock-a-fifo",
        f"{STORE}/lock",
        _fifo(f"{STORE}/lock"),
        reason="is a FIFO, not a regular file",
    ),
    Plant("run-systemd-to-disk", "run/systemd", _dir_on_disk("run/systemd")),
    Plant("dropin-root-to-disk", DROPINS, _dir_on_disk(DROPINS)),
    Plant(
        "unit-dropin-dir-to-disk",
        f"{DROPINS}/app.service.d",
        _dir_on_disk(f"{DROPINS}/app.service.d"),
    ),
    Plant(
        "dropin-file-to-disk",
        f"{DROPINS}/worker.service.d/{DROPIN_NAME}",
        _file_on_disk(f"{DROPINS}/worker.service.d/{DROPIN_NAME}"),
    ),
    Plant("var-to-disk", "var", _dir_on_disk("var"), config=PERSIST),
    Plant(
        "state-dir-to-disk",
        "var/lib/bootsecrets",
        _dir_on_disk("var/lib/bootsecrets"),
        config=PERSIST,
    ),
    Plant(
        "persistent-token-to-disk",
        "var/lib/bootsecrets/token",
        _file_on_disk("var/lib/bootsecrets/token"),
        config=PERSIST,
    ),
    Plant(
        "identity-to-disk",
        "var/lib/bootsecrets/identity.json",
        _file_on_disk("var/lib/bootsecrets/identity.json"),
    ),
]


@pytest.mark.parametrize("case", PLANTS, ids=[p.id for p in PLANTS])
def test_planted_path_is_refused_before_any_secret(
    case: Plant,
    world: World,
    openbao: OpenBao,
    disk: Path,
) -> None:
    sandbox = world.sandbox
    world.provision(**case.config)
    case.plant(sandbox, disk)
    before = snapshot(disk)
    offset = openbao.audit_offset()

    code, _, err = sandbox.run("bootstrap")

    assert code == errors.StoreError.exit_code == 12, err
    error_lines = [line for line in err.splitlines() if line.startswith("bootsecrets: error:")]
    assert len(error_lines) == 1, err
    assert f"{sandbox.root / case.refused} {case.reason}" in error_lines[0]
    assert snapshot(disk) == before  # nothing written, created or removed there
    assert vault_touched(openbao, offset) == []  # the wrapped secret-id was not spent
    assert sandbox.runner.calls == [] and sandbox.written_files() == []


def test_refused_store_then_fixed_store_works(world: World, openbao: OpenBao, disk: Path) -> None:
    """The refusal leaves the wrapped secret-id usable: remove the symlink and rerun."""
    sandbox = world.sandbox
    world.provision()
    link(sandbox, f"{DROPINS}/app.service.d", disk)
    assert sandbox.run("bootstrap")[0] == 12
    (sandbox.root / DROPINS / "app.service.d").unlink()
    code, _, err = sandbox.run("bootstrap")
    assert code == 0, err
    assert read_env_file(sandbox.env_file("app.service"))["DB_PASSWORD"] == world.password
    assert os.listdir(disk) == []


@pytest.fixture
def bind_mounted_disk(world: World, disk: Path) -> Iterator[Path]:
    """A disk directory bind-mounted at the store's generations/: not a symlink, so only
    fstatfs of the directory being written into can tell the bytes would reach the disk."""
    target = world.sandbox.store / "generations"
    target.mkdir(parents=True)
    subprocess.run(
        ["mount", "--bind", str(disk), str(target)], check=True, stdin=subprocess.DEVNULL
    )
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True, stdin=subprocess.DEVNULL)


def test_disk_mounted_inside_the_store_is_refused(
    world: World,
    openbao: OpenBao,
    disk: Path,
    bind_mounted_disk: Path,
) -> None:
    world.provision()
    offset = openbao.audit_offset()
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 12, err
    assert f"{bind_mounted_disk} is on a disk-backed filesystem" in err
    assert os.listdir(disk) == []
    assert vault_touched(openbao, offset) == []


# --- a live store: refresh never follows what it reads or links ------------------------------


def credentials_config(world: World) -> dict[str, Any]:
    services: dict[str, Any] = world.config()["services"]
    services["tls.service"] = {"credentials": {"db.password": "{{ secrets.db.password }}"}}
    return services


REFRESH_PLANTS = {
    "generation-to-disk": ("generations/1", "generations/1"),
    "generation-env-to-disk": ("generations/1/env", "generations/1/env"),
    "generation-credentials-to-disk": (
        "generations/1/credentials/tls.service",
        "generations/1/credentials/tls.service",
    ),
    "env-file-to-disk": ("generations/1/env/app.service.env", "generations/1/env/app.service.env"),
}


@pytest.mark.parametrize("rel", REFRESH_PLANTS.values(), ids=REFRESH_PLANTS.keys())
def test_refresh_refuses_a_symlink_in_the_live_generation(
    rel: tuple[str, str],
    world: World,
    openbao: OpenBao,
    disk: Path,
) -> None:
    sandbox = world.sandbox
    world.provision(services=credentials_config(world))
    assert sandbox.run("bootstrap")[0] == 0
    openbao.put("secret", f"{world.unique}/api", {"key": "canary-rotated-" + world.unique})
    move_aside(sandbox, f"{STORE}/{rel[0]}")
    if rel[0].endswith(".env"):
        (disk / "file").write_text("on disk\n")
        link(sandbox, f"{STORE}/{rel[0]}", disk / "file")
    else:
        link(sandbox, f"{STORE}/{rel[0]}", disk)
    before = snapshot(disk)
    sandbox.runner.calls.clear()

    code, _, err = sandbox.run("refresh")

    assert code == 12, err
    assert f"{sandbox.root / STORE / rel[1]} is a symlink" in err
    assert snapshot(disk) == before
    assert sandbox.runner.calls == []  # nothing restarted
    assert sorted(os.listdir(sandbox.store / "generations")) == ["1"]


def test_spent_bootstrap_is_deleted_without_following(world: World, disk: Path) -> None:
    """The spent bootstrap is removed as an entry of the store reached without a symlink:
    a store swapped for a symlink after the checks (between lookup and unwrap here) is
    refused, and the decoy bootstrap.yaml at its target stays."""
    sandbox = world.sandbox
    world.provision()
    (disk / "bootstrap.yaml").write_text("decoy\n")

    def swap() -> None:
        (sandbox.store / "bootstrap.yaml").unlink()  # the agent holds it in memory by now
        sandbox.store.rename(sandbox.root / "run/elsewhere")
        sandbox.store.symlink_to(disk)

    sandbox.after_lookup = swap
    code, _, err = sandbox.run("bootstrap")
    assert code == 12, err
    assert f"{sandbox.store} is a symlink; refusing to follow it" in err
    assert snapshot(disk) == {"bootstrap.yaml": b"decoy\n"}
    assert sandbox.runner.calls == []


# --- files that are not regular files: refused at once, never read ----------------------------


@dataclasses.dataclass(frozen=True)
class Odd:
    id: str
    which: str  # "config" or "bootstrap"
    make: Callable[[Path, Path], None]  # (path, disk)
    reason: str


def _zero(path: Path, disk: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def _fifo_at(path: Path, disk: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _symlink_to_disk_file(path: Path, disk: Path) -> None:
    (disk / "bootstrap.yaml").write_text("role_id: x\nwrapped_secret_id: y\n")
    path.unlink(missing_ok=True)
    path.symlink_to(disk / "bootstrap.yaml")


def _directory(path: Path, disk: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()


ODD = [
    Odd("config-fifo", "config", _fifo_at, "is a FIFO, not a regular file"),
    Odd("config-dev-zero", "config", _zero, "is a character device, not a regular file"),
    Odd("bootstrap-fifo", "bootstrap", _fifo_at, "is a FIFO, not a regular file"),
    Odd(
        "bootstrap-dev-zero",
        "bootstrap",
        _zero,
        "is a symlink to a character device; refusing to follow it",
    ),
    Odd(
        "bootstrap-symlink",
        "bootstrap",
        _symlink_to_disk_file,
        "is a symlink to a regular file; refusing to follow it",
    ),
    Odd("bootstrap-directory", "bootstrap", _directory, "is a directory, not a regular file"),
]


@pytest.mark.parametrize("case", ODD, ids=[c.id for c in ODD])
def test_config_and_bootstrap_must_be_regular_files(
    case: Odd,
    world: World,
    openbao: OpenBao,
    disk: Path,
) -> None:
    sandbox = world.sandbox
    world.provision()
    path = (
        sandbox.root / "etc/bootsecrets/config.yaml"
        if case.which == "config"
        else sandbox.store / "bootstrap.yaml"
    )
    case.make(path, disk)
    before = snapshot(disk)
    offset = openbao.audit_offset()
    # Without the fix the read blocks on the FIFO: a watchdog then opens its write end (and
    # closes it), so the test fails instead of hanging.
    watchdog = threading.Timer(
        30, lambda: os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK)) if path.is_fifo() else None
    )
    watchdog.start()
    try:
        code, _, err = sandbox.run("bootstrap")
    finally:
        watchdog.cancel()

    expected = errors.ConfigError if case.which == "config" else errors.BootstrapError
    assert code == expected.exit_code, err
    error_lines = [line for line in err.splitlines() if line.startswith("bootsecrets: error:")]
    assert len(error_lines) == 1, err
    assert f"{path}: (top level): {case.reason}" in error_lines[0]
    assert snapshot(disk) == before
    assert vault_touched(openbao, offset) == []
    assert sandbox.runner.calls == [] and sandbox.written_files() == []


def test_symlinked_config_to_a_regular_file_is_allowed(world: World, disk: Path) -> None:
    """Image builders may link /etc/bootsecrets/config.yaml elsewhere: allowed, as long as
    the target is a regular file (the config holds no secret)."""
    sandbox = world.sandbox
    world.provision()
    config = sandbox.root / "etc/bootsecrets/config.yaml"
    (disk / "config.yaml").write_text(yaml.safe_dump(world.config()))
    config.unlink()
    config.symlink_to(disk / "config.yaml")
    code, _, err = sandbox.run("bootstrap")
    assert code == 0, err
    assert read_env_file(sandbox.env_file("app.service"))["API_KEY"] == world.api_key
