"""`bootsecrets bootstrap` against a real OpenBao dev server, every outcome produced for real."""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import errors
from bootsecrets.config import load_config
from bootsecrets.context import Run
from bootsecrets.paths import DROPIN_NAME
from bootsecrets.store import Store
from conftest import Sandbox, mode_of, read_env_file
from support.openbao import CANARIES, OpenBao, dev_server
from support.world import World, policy


def assert_nothing_rendered(sandbox: Sandbox) -> None:
    assert sandbox.written_files() == []
    assert not (sandbox.store / "current").exists()
    assert not any(call[:1] == ("start",) for call in sandbox.runner.verbs())
    assert not (sandbox.root / "run/systemd/system").exists()


def test_happy_path_two_units_kv2_and_kv1(world: World, openbao: OpenBao) -> None:
    sandbox = world.sandbox
    world.provision()
    offset = openbao.audit_offset()

    code, _, err = sandbox.run("bootstrap")

    assert code == 0, err
    app = read_env_file(sandbox.env_file("app.service"))
    assert app == {
        "DATABASE_URL": f"postgresql://app:{world.password}@db/app",
        "DB_PASSWORD": world.password,
        "API_KEY": world.api_key,
    }
    worker = read_env_file(sandbox.env_file("worker.service"))
    assert worker == {
        "DB_PASSWORD": world.password,
        "LEGACY_TOKEN": world.legacy,
        "LEGACY_PORT": "5432",
    }
    # The shared path is read once; the whole run is lookup + unwrap + login + 3 reads.
    paths = [r["path"] for r in openbao.audited_requests(offset)]
    assert paths.count(f"secret/data/{world.unique}/db") == 1
    assert sorted(paths) == sorted(
        ["sys/wrapping/lookup", "sys/wrapping/unwrap", "auth/approle/login", *world.policy_paths]
    )
    # systemd: one daemon-reload, then the units started without blocking.
    assert sandbox.runner.verbs() == [
        ("daemon-reload",),
        ("start", "--no-block", "--", "app.service", "worker.service"),
    ]
    dropin = (sandbox.root / "run/systemd/system/app.service.d" / DROPIN_NAME).read_text()
    assert "EnvironmentFile=/run/bootsecrets/current/env/app.service.env" in dropin
    assert "Requires=bootsecrets.service" in dropin and "After=bootsecrets.service" in dropin
    # Memory-only store, private modes, the used bootstrap gone.
    assert mode_of(sandbox.store) == 0o700
    assert mode_of(sandbox.env_file("app.service")) == 0o600
    assert not (sandbox.store / "bootstrap.yaml").exists()
    assert mode_of(sandbox.store / "token") == 0o600


def test_status_after_bootstrap_names_versions_not_values(world: World) -> None:
    world.provision()
    assert world.sandbox.run("bootstrap")[0] == 0
    code, out, _ = world.sandbox.run("status", "--json")
    assert code == 0
    import json

    report = json.loads(out)
    app = next(u for u in report["units"] if u["unit"] == "app.service")
    db = next(s for s in app["secrets"] if s["name"] == "db")
    assert db["path"] == f"secret/{world.unique}/db" and db["version"] == world.db_version
    assert report["provisioned"] is True and report["reboot_policy"] == "reprovision"
    assert report["token"]["ttl_remaining"] > 3000


def test_unknown_wrapping_token(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.sandbox.write_config(world.config())
    fake = "hvs." + secrets.token_urlsafe(24)
    CANARIES.add(fake)
    world.sandbox.write_bootstrap(world.role_id, fake)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.WrappingTokenInvalid.exit_code == 22
    assert "unknown to Vault" in err and "mint a new one" in err
    assert_nothing_rendered(world.sandbox)
    assert_alert(caplog, errors.WrappingTokenInvalid)


def test_expired_wrapping_token(world: World, openbao: OpenBao) -> None:
    world.sandbox.write_config(world.config())
    wrapped = openbao.wrapped_secret_id(world.role, ttl="1s")
    world.sandbox.write_bootstrap(world.role_id, wrapped)
    time.sleep(2.5)
    code, _, _ = world.sandbox.run("bootstrap")
    assert code == errors.WrappingTokenInvalid.exit_code
    assert_nothing_rendered(world.sandbox)


def test_token_used_twice(world: World, openbao: OpenBao) -> None:
    wrapped = world.provision()
    openbao.unwrap(wrapped)  # someone else got there first
    code, _, _ = world.sandbox.run("bootstrap")
    assert code == errors.WrappingTokenInvalid.exit_code
    assert_nothing_rendered(world.sandbox)


def test_wrong_creation_path_is_tampering(
    world: World, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    world.sandbox.write_config(world.config())
    forged = openbao.wrap({"secret_id": "forged-" + secrets.token_hex(8)})
    world.sandbox.write_bootstrap(world.role_id, forged)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.WrappingPathMismatch.exit_code == 23
    assert "sys/wrapping/wrap" in err and f"auth/approle/role/{world.role}/secret-id" in err
    assert_nothing_rendered(world.sandbox)
    record = assert_alert(caplog, errors.WrappingPathMismatch)
    assert record.CREATION_PATH == "sys/wrapping/wrap"


def test_unwrapped_between_lookup_and_unwrap_is_interception(
    world: World, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    wrapped = world.provision()
    world.sandbox.after_lookup = lambda: openbao.unwrap(wrapped)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.WrappingTokenAlreadyUsed.exit_code == 24
    assert "interception" in err
    assert_nothing_rendered(world.sandbox)
    assert_alert(caplog, errors.WrappingTokenAlreadyUsed)


def test_login_denied(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.sandbox.write_config(world.config())
    wrapped = world.bao.wrapped_secret_id(world.role)
    world.sandbox.write_bootstrap("not-the-role-id-" + secrets.token_hex(4), wrapped)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.LoginDenied.exit_code == 25
    assert "auth/approle" in err
    assert_nothing_rendered(world.sandbox)
    assert_alert(caplog, errors.LoginDenied)


def test_permission_denied_names_the_path(world: World, openbao: OpenBao) -> None:
    openbao.approle(world.role, policy(*world.policy_paths[1:]))  # db no longer readable
    world.provision()
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.PermissionDenied.exit_code == 26
    assert f"permission denied reading secret/{world.unique}/db" in err
    assert_nothing_rendered(world.sandbox)


def test_missing_secret(world: World, openbao: OpenBao) -> None:
    config = world.config()
    config["secrets"]["db"] = f"secret/{world.unique}/nothing-here"
    openbao.approle(
        world.role, policy(*world.policy_paths, f"secret/data/{world.unique}/nothing-here")
    )
    world.provision(secrets=config["secrets"])
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.SecretMissing.exit_code == 27
    assert f"secret secret/{world.unique}/nothing-here does not exist" in err
    assert_nothing_rendered(world.sandbox)


def test_missing_key_names_path_and_key_not_values(world: World) -> None:
    config = world.config()
    config["services"]["app.service"]["environment"]["X"] = "{{ secrets.db.pasword }}"
    world.provision(services=config["services"])
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.SecretMissing.exit_code
    assert f"key 'pasword' of secret secret/{world.unique}/db does not exist" in err
    assert "app.service X" in err
    assert_nothing_rendered(world.sandbox)


def test_vault_unreachable(world: World) -> None:
    from support.openbao import free_port

    config = world.config()
    config["vault"] = {
        "address": f"http://127.0.0.1:{free_port()}",
        "boot_deadline": 1,
        "request_timeout": 1,
    }
    world.provision(vault=config["vault"])
    started = time.monotonic()
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.VaultUnreachable.exit_code == 21
    assert time.monotonic() - started < 10
    assert "did not answer sys/wrapping/lookup" in err
    assert_nothing_rendered(world.sandbox)
    # The wrapped secret-id was never sent, so it is kept for the next try.
    assert (world.sandbox.store / "bootstrap.yaml").exists()


def test_optional_unit_is_left_out_when_its_secret_is_denied(
    world: World, openbao: OpenBao
) -> None:
    openbao.approle(
        world.role, policy(f"secret/data/{world.unique}/db", f"secret/data/{world.unique}/api")
    )
    config = world.config()
    config["services"]["worker.service"]["required"] = False
    config["services"]["worker.service"]["environment"] = {}
    world.provision(services=config["services"])
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    assert world.sandbox.started_units() == ["app.service"]
    assert not world.sandbox.env_file("worker.service").exists()
    assert (
        f"optional unit worker.service left out: permission denied reading "
        f"kv1/{world.unique}/legacy" in err
    )


def test_unencodable_value_fails_before_anything_is_written(world: World, openbao: OpenBao) -> None:
    openbao.put("secret", f"{world.unique}/api", {"key": "x" * (200 * 1024)})
    world.provision()
    code, _, err = world.sandbox.run("bootstrap")
    assert code == errors.EncodeError.exit_code == 14
    assert "app.service, variable API_KEY" in err and "128 KiB" in err
    assert_nothing_rendered(world.sandbox)


def test_disk_backed_store_is_refused(world: World, tmp_path: Path) -> None:
    from conftest import Sandbox

    disk = Sandbox(tmp_path, world.sandbox.captured, world.bao)  # /tmp is ext4 here
    disk.write_config(world.config())
    disk.write_bootstrap(world.role_id, world.bao.wrapped_secret_id(world.role))
    code, _, err = disk.run("bootstrap")
    assert code == errors.StoreError.exit_code == 12
    assert "disk-backed" in err
    assert disk.written_files() == [] and disk.runner.calls == []


def test_debug_failure_output_holds_no_secret(world: World, openbao: OpenBao) -> None:
    openbao.approle(world.role, policy(*world.policy_paths[1:]))
    world.provision()
    code, _, err = world.sandbox.run("bootstrap", "--debug")
    assert code == errors.PermissionDenied.exit_code
    assert "Traceback" in err  # the leak guard checks it holds no canary


def assert_alert(caplog: pytest.LogCaptureFixture, kind: type[errors.BootsecretsError]) -> Any:
    alerts = [r for r in caplog.records if getattr(r, "MESSAGE_ID", None) == kind.message_id]
    assert len(alerts) == 1, [r.getMessage() for r in caplog.records]
    assert alerts[0].PRIORITY == "1"  # type: ignore[attr-defined]
    return alerts[0]


@pytest.fixture(scope="module")
def tls_openbao() -> Iterator[OpenBao]:
    with dev_server(tls=True) as server:
        yield server


def provision_tls(
    server: OpenBao, sandbox: Sandbox, unique: str, ca_source: Path, deadline: int
) -> World:
    ca = sandbox.root / "etc/bootsecrets/vault-ca.pem"
    ca.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca_source, ca)
    world = World(server, sandbox, unique)
    world.provision(
        vault={
            "address": server.addr,
            "ca_cert": "/etc/bootsecrets/vault-ca.pem",
            "boot_deadline": deadline,
        }
    )
    return world


def test_tls_is_verified_against_the_configured_ca(
    tls_openbao: OpenBao, sandbox: Sandbox, unique: str
) -> None:
    assert tls_openbao.ca_cert is not None
    world = provision_tls(tls_openbao, sandbox, unique, tls_openbao.ca_cert, 5)
    code, _, err = sandbox.run("bootstrap")
    assert code == 0, err
    assert read_env_file(sandbox.env_file("app.service"))["API_KEY"] == world.api_key


def test_tls_with_the_wrong_ca_fails_at_once(
    tls_openbao: OpenBao, sandbox: Sandbox, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert tls_openbao.ca_cert is not None
    # A well-formed PEM that is not the server's CA: the server's own leaf certificate.
    provision_tls(tls_openbao, sandbox, unique, tls_openbao.ca_cert.with_name("vault-cert.pem"), 30)
    started = time.monotonic()
    code, _, err = sandbox.run("bootstrap")
    assert code == errors.TLSVerifyFailed.exit_code
    assert "TLS verification" in err and "vault.ca_cert" in err
    record = assert_alert(caplog, errors.TLSVerifyFailed)
    assert getattr(record, "VAULT_ADDR", None) == tls_openbao.addr
    assert time.monotonic() - started < 10  # not retried until the 30 s deadline
    assert_nothing_rendered(sandbox)


@pytest.mark.parametrize("variable", ["VAULT_ADDR", "BAO_ADDR"])
def test_environment_address_overrides_the_config(world: World, variable: str) -> None:
    config = world.config()
    config["vault"]["address"] = "https://vault.invalid:8200"
    world.provision(vault=config["vault"])
    world.sandbox.env[variable] = world.bao.addr
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err


def test_user_data_address_goes_first_and_config_addresses_stay_as_fallbacks(
    world: World,
) -> None:
    from support.openbao import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    world.sandbox.write_config(
        world.config(vault={"addresses": [world.bao.addr], "boot_deadline": 10})
    )
    world.sandbox.write_bootstrap(world.role_id, world.bao.wrapped_secret_id(world.role), dead)
    config = load_config(world.sandbox.root / "etc/bootsecrets/config.yaml")
    ctx = world.sandbox.context()
    paths = ctx.paths.with_store(config.store)
    run = Run(ctx, "bootstrap", config, paths, Store(paths), ctx.systemctl(), {})
    with run.connect(dead) as vault:
        assert vault.addresses == (dead, world.bao.addr)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err


def test_the_address_that_answered_is_kept_not_the_one_asked_for(world: World) -> None:
    """User-data names an address where nothing answers; VAULT_ADDR overrides it for the
    bootstrap. The next run, without the override, goes where Vault was found."""
    from support.openbao import free_port

    dead, also_dead = (f"http://127.0.0.1:{free_port()}" for _ in range(2))
    world.sandbox.write_config(
        world.config(vault={"address": also_dead, "boot_deadline": 3, "request_timeout": 2})
    )
    world.sandbox.write_bootstrap(world.role_id, world.bao.wrapped_secret_id(world.role), dead)
    world.sandbox.env["VAULT_ADDR"] = world.bao.addr
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    world.sandbox.env.clear()
    code, _, err = world.sandbox.run("refresh")
    assert code == 0, err
    code, out, _ = world.sandbox.run("status", "--json")
    assert json.loads(out)["last_run"]["outcome"] == "ok"
