"""Everything that can be checked without a secret is checked before the single-use wrapped
secret-id is touched: a bad user or group, a bad unit name, an unusable store, a held lock,
an explicitly tagged bootstrap. Each case fails with its exit code, OpenBao's audit log
shows no request at all from the run, and the wrapped secret-id still unwraps afterwards.

Also: with `--debug`, a tagged token in the bootstrap appears in no traceback."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import errors
from bootsecrets.store import Store
from support.openbao import OpenBao
from support.world import World


def user(name: str) -> Callable[[World, dict[str, Any]], None]:
    def apply(world: World, config: dict[str, Any]) -> None:
        config["services"]["app.service"]["user"] = name

    return apply


def group(name: str) -> Callable[[World, dict[str, Any]], None]:
    def apply(world: World, config: dict[str, Any]) -> None:
        config["services"]["app.service"]["group"] = name

    return apply


def unit(name: str) -> Callable[[World, dict[str, Any]], None]:
    def apply(world: World, config: dict[str, Any]) -> None:
        config["services"][name] = {"environment": {"A": "{{ secrets.api.key }}"}}

    return apply


def disk_store(world: World, config: dict[str, Any]) -> None:
    disk = Path("/var/tmp") / f"bootsecrets-disk-{world.unique}"
    disk.mkdir(exist_ok=True)
    (world.sandbox.root / "run").mkdir(parents=True, exist_ok=True)
    (world.sandbox.root / "run/elsewhere").symlink_to(disk)
    config["store"] = "/run/elsewhere"


CASES: dict[str, tuple[Callable[[World, dict[str, Any]], None], int]] = {
    "unknown-user": (user("no-such-user-x"), errors.ConfigError.exit_code),
    "unknown-group": (group("no-such-group-x"), errors.ConfigError.exit_code),
    "template-unit": (unit("app@.service"), errors.ConfigError.exit_code),
    "agent-unit": (unit("bootsecrets-refresh.service"), errors.ConfigError.exit_code),
    "store-on-disk": (disk_store, errors.StoreError.exit_code),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_checks_come_before_the_wrapped_secret_id_is_used(
    world: World, openbao: OpenBao, case: str
) -> None:
    change, exit_code = CASES[case]
    config = world.config()
    change(world, config)
    world.sandbox.write_config(config)
    wrapped = openbao.wrapped_secret_id(world.role)
    world.sandbox.write_bootstrap(world.role_id, wrapped)
    offset = openbao.audit_offset()

    try:
        code, _, err = world.sandbox.run("bootstrap")
    finally:
        shutil.rmtree(Path("/var/tmp") / f"bootsecrets-disk-{world.unique}", ignore_errors=True)

    assert code == exit_code, err
    assert openbao.audited_requests(offset) == []
    assert (world.sandbox.store / "bootstrap.yaml").exists() or case == "store-on-disk"
    assert "secret_id" in openbao.unwrap(wrapped)  # still unused


def test_a_held_lock_is_waited_for_before_vault(world: World, openbao: OpenBao) -> None:
    world.provision()
    offset = openbao.audit_offset()
    store = Store(world.sandbox.paths)
    world.sandbox.store.mkdir(parents=True, exist_ok=True)
    with store.lock():
        code, _, err = world.sandbox.run("bootstrap", "--wait", "0.2")
    assert code == errors.LockBusy.exit_code, err
    assert openbao.audited_requests(offset) == []


@pytest.mark.parametrize("tag", ["!!int", "!!float", "!!str", "!!binary", "!custom"])
def test_a_tagged_token_is_refused_and_never_printed_even_with_debug(
    world: World, openbao: OpenBao, tag: str
) -> None:
    world.sandbox.write_config(world.config())
    wrapped = openbao.wrapped_secret_id(world.role)
    path = world.sandbox.store / "bootstrap.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"role_id: {world.role_id}\nwrapped_secret_id: {tag} {wrapped}\n")
    offset = openbao.audit_offset()

    code, out, err = world.sandbox.run("bootstrap", "--debug")

    assert code == errors.BootstrapError.exit_code, err
    assert "wrapped_secret_id: explicit YAML tags" in err
    assert wrapped not in err and wrapped.lower() not in err and wrapped not in out
    assert openbao.audited_requests(offset) == []


def test_an_internal_error_with_debug_shows_where_but_not_what(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug whose exception text quotes a value: --debug shows the frames and the type."""
    world.provision()
    marker = "canary-in-an-exception-" + "x" * 8

    def boom(*args: object, **kwargs: object) -> None:
        raise ValueError(f"invalid literal: {marker!r}")

    monkeypatch.setattr("bootsecrets.agent.read_and_render", boom)
    code, out, err = world.sandbox.run("bootstrap", "--debug")
    assert code == 1
    assert "internal error (ValueError)" in err
    assert "Traceback (most recent call last)" in err and "in bootstrap" in err
    assert marker not in err and marker not in out


UNIT_NAMES = [
    "app.service",
    "app@blue.service",
    "a@b@c.service",
    "a:b.service",
    "a\\x2db.service",
    "app-1_2.3.service",
    "app@.service",
    "x y.service",
    "a%i.service",
    "é.service",
    "@x.service",
    ".service",
    "app.socket",
    "app",
    "a" * 247 + ".service",
    "app\n.service",
    "app@x y.service",
    "app@ü.service",
]


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_names_are_judged_as_systemd_judges_them(tmp_path: Path, name: str) -> None:
    """systemd's own parser (systemd-analyze verify) judges each name: we accept exactly the
    service names it can load, except a bare template (`app@.service`), which cannot be
    started without an instance."""
    from bootsecrets.serviceconfig import UNIT_NAME, UNIT_NAME_MAX

    ours = bool(UNIT_NAME.match(name)) and len(name) <= UNIT_NAME_MAX
    unit_file = tmp_path / name
    unit_file.write_text("[Service]\nExecStart=/bin/true\n")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit_file)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    systemd_loads = "Failed to prepare filename" not in result.stderr
    expected = systemd_loads and name.endswith(".service") and not name.endswith("@.service")
    assert ours == expected, result.stderr


def test_the_unit_name_cases_cover_both_outcomes() -> None:
    from bootsecrets.serviceconfig import UNIT_NAME

    accepted = [n for n in UNIT_NAMES if UNIT_NAME.match(n)]
    assert len(accepted) >= 6 and len(UNIT_NAMES) - len(accepted) >= 8
