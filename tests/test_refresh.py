"""Rotation and lifecycle against a real OpenBao with a recording systemctl: refresh,
rollback, the lock, both reboot policies, credentials mode, status."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from typing import Any

import pytest

from bootsecrets import errors
from bootsecrets.paths import DROPIN_NAME
from bootsecrets.store import Store
from conftest import Sandbox, mode_of, read_env_file
from support.openbao import OpenBao
from support.world import World, policy


def three_units(world: World) -> dict[str, Any]:
    config = world.config()
    config["services"]["api.service"] = {"environment": {"API_KEY": "{{ secrets.api.key }}"}}
    config["services"]["app.service"]["environment"] = {"DB_PASSWORD": "{{ secrets.db.password }}"}
    return config


def file_identity(sandbox: Sandbox) -> dict[str, tuple[int, int]]:
    env_dir = sandbox.store / "current/env"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in env_dir.iterdir()}


def restarts(sandbox: Sandbox) -> list[tuple[str, ...]]:
    return [
        c
        for c in sandbox.runner.verbs()
        if c[0] in ("restart", "try-restart", "try-reload-or-restart", "start")
    ]


def status(sandbox: Sandbox) -> dict[str, Any]:
    code, out, err = sandbox.run("status", "--json")
    assert code == 0, err
    report: dict[str, Any] = json.loads(out)
    return report


def unit(report: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(u for u in report["units"] if u["unit"] == name)
    return found


@pytest.fixture
def booted(world: World) -> World:
    world.provision(services=three_units(world)["services"])
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    world.sandbox.runner.calls.clear()
    return world


def test_rotation_restarts_only_the_unit_that_uses_it(booted: World, openbao: OpenBao) -> None:
    sandbox = booted.sandbox
    before = file_identity(sandbox)
    time.sleep(0.01)
    new_key = "canary-rotated-" + os.urandom(6).hex()
    openbao.put("secret", f"{booted.unique}/api", {"key": new_key})

    code, _, err = sandbox.run("refresh")

    assert code == 0, err
    assert restarts(sandbox) == [("try-restart", "--", "api.service")]
    after = file_identity(sandbox)
    assert after["app.service.env"] == before["app.service.env"]
    assert after["worker.service.env"] == before["worker.service.env"]
    assert after["api.service.env"] != before["api.service.env"]
    assert read_env_file(sandbox.env_file("api.service")) == {"API_KEY": new_key}
    # The previous generation is gone once the restarted unit is active again.
    assert sorted(os.listdir(sandbox.store / "generations")) == ["2"]
    report = status(sandbox)
    api = unit(report, "api.service")
    assert api["generation"] == 2 and api["changed_since_restart"] is False
    assert api["secrets"][0]["version"] == 2
    assert report["last_run"]["outcome"] == "ok"


def test_noop_refresh_restarts_nothing_and_rewrites_nothing(booted: World) -> None:
    sandbox = booted.sandbox
    before = file_identity(sandbox)
    code, _, err = sandbox.run("refresh")
    assert code == 0, err
    assert restarts(sandbox) == []
    assert sandbox.runner.calls == []  # not even a daemon-reload
    assert file_identity(sandbox) == before
    assert os.readlink(sandbox.store / "current") == "generations/1"


def test_on_change_none_switches_without_restarting(booted: World, openbao: OpenBao) -> None:
    sandbox = booted.sandbox
    config = three_units(booted)
    config["services"]["api.service"]["on_change"] = "none"
    sandbox.write_config(config)
    openbao.put("secret", f"{booted.unique}/api", {"key": "canary-quiet-" + os.urandom(4).hex()})
    assert sandbox.run("refresh")[0] == 0
    assert restarts(sandbox) == []
    assert unit(status(sandbox), "api.service")["changed_since_restart"] is True


def test_reload_units_get_try_reload_or_restart(booted: World, openbao: OpenBao) -> None:
    openbao.put(
        "kv1",
        f"{booted.unique}/legacy",
        {"token": "canary-legacy-" + os.urandom(4).hex(), "port": 5432},
        version=1,
    )
    assert booted.sandbox.run("refresh")[0] == 0
    assert restarts(booted.sandbox) == [("try-reload-or-restart", "--", "worker.service")]


def test_permission_revoked_switches_and_restarts_nothing(booted: World, openbao: OpenBao) -> None:
    sandbox = booted.sandbox
    openbao.put("secret", f"{booted.unique}/api", {"key": "canary-new-" + os.urandom(4).hex()})
    openbao.approle(booted.role, policy(*booted.policy_paths[:1], booted.policy_paths[2]))
    before = file_identity(sandbox)
    code, _, err = sandbox.run("refresh")
    assert code == errors.PermissionDenied.exit_code
    assert f"permission denied reading secret/{booted.unique}/api" in err
    assert restarts(sandbox) == []
    assert file_identity(sandbox) == before
    assert sorted(os.listdir(sandbox.store / "generations")) == ["1"]
    report = status(sandbox)
    assert report["last_run"]["outcome"] == "error"
    assert report["last_run"]["exit_code"] == errors.PermissionDenied.exit_code


def test_unit_failing_with_new_values_is_rolled_back(
    booted: World, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox = booted.sandbox
    old = sandbox.env_file("api.service").read_bytes()
    openbao.put("secret", f"{booted.unique}/api", {"key": "canary-bad-" + os.urandom(4).hex()})
    sandbox.runner.unit_states["api.service"] = "failed"

    code, _, err = sandbox.run("refresh")

    assert code == errors.UnitFailed.exit_code == 31
    assert "api.service did not become active" in err
    assert f"secret/{booted.unique}/api" in err
    assert sandbox.env_file("api.service").read_bytes() == old
    assert restarts(sandbox) == [
        ("try-restart", "--", "api.service"),
        ("try-restart", "--", "api.service"),
    ]
    alerts = [
        r for r in caplog.records if getattr(r, "MESSAGE_ID", None) == errors.UnitFailed.message_id
    ]
    assert len(alerts) == 1 and alerts[0].UNIT == "api.service"  # type: ignore[attr-defined]
    report = status(sandbox)
    assert report["last_run"]["outcome"] == "rolled-back"
    # Only the rolled-back generation is left.
    assert len(os.listdir(sandbox.store / "generations")) == 1


def test_second_refresh_waits_for_the_lock(booted: World) -> None:
    sandbox = booted.sandbox
    store = Store(sandbox.paths)
    holding = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with store.lock():
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(5)
    try:
        code, _, err = sandbox.run("refresh", "--wait", "0.3")
        assert code == errors.LockBusy.exit_code == 15
        assert "another bootsecrets run holds" in err
        threading.Timer(0.5, release.set).start()
        started = time.monotonic()
        code, _, err = sandbox.run("refresh")
        assert code == 0, err
        assert time.monotonic() - started >= 0.4  # it waited for the holder, then ran
    finally:
        release.set()
        holder.join()


def simulate_reboot(sandbox: Sandbox) -> None:
    """/run is gone at reboot: the store and the runtime drop-ins; /var/lib stays."""
    shutil.rmtree(sandbox.store)
    shutil.rmtree(sandbox.root / "run/systemd", ignore_errors=True)
    sandbox.runner.calls.clear()


def test_persist_token_survives_reboot_until_revoked(
    world: World, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    sandbox = world.sandbox
    world.provision(reboot_policy="persist-token")
    assert sandbox.run("bootstrap")[0] == 0
    token_file = sandbox.root / "var/lib/bootsecrets/token"
    assert mode_of(token_file) == 0o600 and not (sandbox.store / "token").exists()

    simulate_reboot(sandbox)
    offset = openbao.audit_offset()
    code, _, err = sandbox.run("bootstrap")
    assert code == 0, err
    paths = [r["path"] for r in openbao.audited_requests(offset)]
    assert "sys/wrapping/unwrap" not in paths and "auth/approle/login" not in paths
    assert sandbox.started_units() == ["app.service", "worker.service"]

    accessor = json.loads(token_file.read_text())["accessor"]
    openbao.client.auth.token.revoke_accessor(accessor)
    simulate_reboot(sandbox)
    code, _, err = sandbox.run("bootstrap")
    assert code == errors.TokenInvalid.exit_code == 28
    assert "refresh --wrapped-secret-id -" in err
    assert sandbox.started_units() == []
    assert any(
        getattr(r, "MESSAGE_ID", None) == errors.TokenInvalid.message_id for r in caplog.records
    )
    report = status(sandbox)
    assert report["provisioned"] is False and "re-provision" in report["action"]


def test_reprovision_after_reboot_with_a_new_wrapped_secret_id(
    world: World, openbao: OpenBao
) -> None:
    sandbox = world.sandbox
    world.provision()
    assert sandbox.run("bootstrap")[0] == 0
    assert not (sandbox.root / "var/lib/bootsecrets/token").exists()

    simulate_reboot(sandbox)
    code, _, err = sandbox.run("bootstrap")
    assert code == errors.NotProvisioned.exit_code == 29
    assert "refresh --wrapped-secret-id -" in err
    report = status(sandbox)
    assert report["provisioned"] is False
    assert "reprovision keeps no token" in report["action"]

    wrapped = openbao.wrapped_secret_id(world.role)
    code, _, err = sandbox.run("refresh", "--wrapped-secret-id", "-", stdin=wrapped + "\n")
    assert code == 0, err
    assert read_env_file(sandbox.env_file("app.service"))["DB_PASSWORD"] == world.password
    assert sandbox.started_units() == ["app.service", "worker.service"]
    assert status(sandbox)["provisioned"] is True


def test_wrapped_secret_id_is_never_taken_from_argv(world: World) -> None:
    world.provision()
    code, _, err = world.sandbox.run("refresh", "--wrapped-secret-id", "hvs.SOMETHING")
    assert code == errors.UsageError.exit_code
    assert "never on the command line" in err


def test_token_is_renewed_past_half_its_ttl(world: World, openbao: OpenBao) -> None:
    openbao.approle(world.role, policy(*world.policy_paths), token_ttl="6s", token_max_ttl="1h")
    world.provision()
    assert world.sandbox.run("bootstrap")[0] == 0
    time.sleep(3.5)
    offset = openbao.audit_offset()
    assert world.sandbox.run("refresh")[0] == 0
    assert "auth/token/renew-self" in [r["path"] for r in openbao.audited_requests(offset)]


def test_credentials_mode(world: World) -> None:
    sandbox = world.sandbox
    config = world.config()
    config["services"]["tls.service"] = {
        "credentials": {
            "db.password": "{{ secrets.db.password }}",
            "api-key": "{{ secrets.api.key }}",
        },
        "user": "nobody",
        "group": "nogroup",
    }
    world.provision(services=config["services"])
    code, _, err = sandbox.run("bootstrap")
    assert code == 0, err
    dropin = (sandbox.root / "run/systemd/system/tls.service.d" / DROPIN_NAME).read_text()
    assert "EnvironmentFile=" not in dropin
    assert (
        "LoadCredential=db.password:/run/bootsecrets/current/credentials/tls.service/db.password"
    ) in dropin
    cred = sandbox.store / "current/credentials/tls.service/db.password"
    assert cred.read_text() == world.password
    assert mode_of(cred) == 0o400
    assert (cred.stat().st_uid, cred.stat().st_gid) == (65534, 65534)
    assert mode_of(sandbox.store) == 0o751  # a non-root owner must be able to traverse
    assert sandbox.env_file("app.service").exists()  # both modes in one image
    report = status(sandbox)
    assert unit(report, "tls.service")["delivery"] == ["credentials"]


def test_status_before_anything_ran(sandbox: Sandbox, world: World) -> None:
    sandbox.write_config(world.config())
    report = status(sandbox)
    assert report["provisioned"] is False and report["generation"] is None
    assert all(u["rendered"] is False for u in report["units"])


def test_status_text_names_versions(booted: World) -> None:
    code, out, _ = booted.sandbox.run("status")
    assert code == 0
    assert f"secret/{booted.unique}/db@v{booted.db_version}" in out
    assert "reboot policy: reprovision" in out


def test_optional_unit_keeps_its_values_when_its_secret_becomes_unreadable(
    world: World, openbao: OpenBao
) -> None:
    sandbox = world.sandbox
    config = three_units(world)
    config["services"]["worker.service"]["required"] = False
    world.provision(services=config["services"])
    assert sandbox.run("bootstrap")[0] == 0
    before = file_identity(sandbox)
    sandbox.runner.calls.clear()
    openbao.approle(world.role, policy(*world.policy_paths[:2]))  # legacy path revoked
    openbao.put("secret", f"{world.unique}/api", {"key": "canary-next-" + os.urandom(4).hex()})

    code, _, err = sandbox.run("refresh")

    assert code == 0, err
    assert "optional unit worker.service left out" in err
    assert restarts(sandbox) == [("try-restart", "--", "api.service")]
    assert file_identity(sandbox)["worker.service.env"] == before["worker.service.env"]
    worker = unit(status(sandbox), "worker.service")
    assert worker["left_out"] and worker["secrets"]  # still described by its last render


def test_reprovision_with_a_whole_bootstrap_document_on_stdin(
    world: World, openbao: OpenBao
) -> None:
    sandbox = world.sandbox
    world.provision()
    assert sandbox.run("bootstrap")[0] == 0
    simulate_reboot(sandbox)
    shutil.rmtree(sandbox.root / "var/lib/bootsecrets")  # no identity kept either
    wrapped = openbao.wrapped_secret_id(world.role)
    document = f"role_id: {world.role_id}\nwrapped_secret_id: {wrapped}\n"
    code, _, err = sandbox.run("refresh", "--wrapped-secret-id", "-", stdin=document)
    assert code == 0, err
    assert sandbox.started_units() == ["app.service", "worker.service"]
    assert not list(sandbox.store.glob(".stdin*"))
