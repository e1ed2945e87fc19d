"""The bad-input matrix: every case through the real CLI, each with its exit code, one error
line naming the field (file:line: field: problem), no value printed, nothing written, no unit
started. Secret-value cases run against the real OpenBao."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootsecrets import errors
from support.world import World

MARK = "Zq9-MARK-value"  # planted in offending values; must never be echoed back

Config = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    exit_code: int
    message: str
    config: Callable[[Config], Config | str | bytes] | None = None
    bootstrap: Callable[[dict[str, str]], dict[str, Any] | str | None] | None = None
    secret: dict[str, Any] | None = None
    setup: Callable[[Path], object] | None = None


def edit(fn: Callable[[Config], object]) -> Callable[[Config], Config]:
    def apply(config: Config) -> Config:
        fn(config)
        return config

    return apply


def env_of(config: Config) -> dict[str, Any]:
    env: dict[str, Any] = config["services"]["app.service"]["environment"]
    return env


def app(config: Config) -> dict[str, Any]:
    service: dict[str, Any] = config["services"]["app.service"]
    return service


def yaml_text(config: Config) -> str:
    return yaml.safe_dump(config, sort_keys=False)


CONFIG = errors.ConfigError.exit_code
BOOT = errors.BootstrapError.exit_code

CASES = [
    # --- image config: YAML and structure ---
    Case("malformed-yaml", CONFIG, "invalid YAML", config=lambda c: "vault: [unclosed\n"),
    Case("empty-file", CONFIG, "empty file", config=lambda c: ""),
    Case("top-level-list", CONFIG, "expected a mapping, got a list", config=lambda c: "- a\n"),
    Case("unknown-key", CONFIG, "colour: unknown key", config=edit(lambda c: c.update(colour=1))),
    Case(
        "missing-approle",
        CONFIG,
        "approle: missing required field",
        config=edit(lambda c: c.pop("approle")),
    ),
    Case(
        "duplicate-key",
        CONFIG,
        "environment.A: duplicate key",
        config=lambda c: yaml_text(c).replace(
            "      DB_PASSWORD:", "      A: x\n      A: y\n      DB_PASSWORD:"
        ),
    ),
    Case(
        "non-string-key",
        CONFIG,
        "keys must be strings",
        config=lambda c: yaml_text(c).replace(
            "      DB_PASSWORD:", "      1: x\n      DB_PASSWORD:"
        ),
    ),
    Case(
        "invalid-utf8",
        CONFIG,
        "not valid UTF-8",
        config=lambda c: yaml_text(c).encode() + b"# \xff\xfe\n",
    ),
    Case("nul-byte", CONFIG, "contains NUL", config=lambda c: yaml_text(c) + "#\x00\n"),
    Case("config-is-a-directory", CONFIG, "is a directory", config=lambda c: "DIRECTORY"),
    Case("config-unreadable", CONFIG, "cannot read", config=lambda c: "LOOP"),
    Case("config-missing", CONFIG, "does not exist", config=lambda c: "MISSING"),
    # --- image config: vault ---
    Case(
        "address-without-scheme",
        CONFIG,
        "vault.address: must start with https://",
        config=edit(lambda c: c["vault"].update(address=f"{MARK}.example:8200")),
    ),
    Case(
        "address-with-path",
        CONFIG,
        "vault.address: must be scheme://host[:port] with no path",
        config=edit(lambda c: c["vault"].update(address=f"https://v.example/{MARK}")),
    ),
    Case(
        "address-with-credentials",
        CONFIG,
        "must not carry credentials",
        config=edit(lambda c: c["vault"].update(address=f"https://u:{MARK}@v.example")),
    ),
    Case(
        "address-and-addresses",
        CONFIG,
        "either `address` or `addresses`",
        config=edit(lambda c: c["vault"].update(addresses=["https://v.example"])),
    ),
    Case(
        "empty-addresses",
        CONFIG,
        "vault.addresses: must list at least one",
        config=edit(lambda c: (c["vault"].pop("address"), c["vault"].update(addresses=[]))),
    ),
    Case(
        "deadline-wrong-type",
        CONFIG,
        "vault.boot_deadline: expected a number of seconds, got a string",
        config=edit(lambda c: c["vault"].update(boot_deadline=MARK)),
    ),
    Case(
        "deadline-negative",
        CONFIG,
        "vault.boot_deadline: must be between 0 and 86400",
        config=edit(lambda c: c["vault"].update(boot_deadline=-1)),
    ),
    Case(
        "ca-cert-relative",
        CONFIG,
        "vault.ca_cert: must be an absolute path",
        config=edit(lambda c: c["vault"].update(ca_cert="ca.pem")),
    ),
    Case(
        "ca-cert-not-pem",
        CONFIG,
        "vault.ca_cert: is not a PEM certificate bundle",
        config=edit(lambda c: c["vault"].update(ca_cert="/etc/bootsecrets/ca.pem")),
        setup=lambda root: (root / "etc/bootsecrets/ca.pem").write_text(MARK),
    ),
    Case(
        "deadline-zero",
        CONFIG,
        "vault.boot_deadline: must be more than 0 seconds",
        config=edit(lambda c: c["vault"].update(boot_deadline=0)),
    ),
    Case(
        "request-timeout-zero",
        CONFIG,
        "vault.request_timeout: must be more than 0",
        config=edit(lambda c: c["vault"].update(request_timeout=0.0)),
    ),
    Case(
        "ca-cert-fifo",
        CONFIG,
        "vault.ca_cert: cannot read the CA bundle: is a FIFO",
        config=edit(lambda c: c["vault"].update(ca_cert="/etc/bootsecrets/ca.pem")),
        setup=lambda root: os.mkfifo(root / "etc/bootsecrets/ca.pem"),
    ),
    Case(
        "ca-cert-missing",
        CONFIG,
        "vault.ca_cert: cannot read the CA bundle",
        config=edit(lambda c: c["vault"].update(ca_cert="/etc/bootsecrets/none.pem")),
    ),
    # --- image config: approle, mounts, secrets ---
    Case(
        "role-with-slash",
        CONFIG,
        "approle.role: must be an AppRole role name",
        config=edit(lambda c: c["approle"].update(role="a/b")),
    ),
    Case(
        "reboot-policy-unknown",
        CONFIG,
        "reboot_policy: must be one of: reprovision, persist-token",
        config=edit(lambda c: c.update(reboot_policy=MARK)),
    ),
    Case(
        "mount-engine-unknown",
        CONFIG,
        "mounts.secret: must be one of",
        config=edit(lambda c: c["mounts"].update(secret="kv-v3")),
    ),
    Case(
        "secret-path-dotdot",
        CONFIG,
        "secrets.db: must be a path like",
        config=edit(lambda c: c["secrets"].update(db="secret/../sys/raw")),
    ),
    Case(
        "secret-path-empty-part",
        CONFIG,
        "secrets.db: must be a path like",
        config=edit(lambda c: c["secrets"].update(db="secret//db")),
    ),
    Case(
        "secret-on-undeclared-mount",
        CONFIG,
        "secrets.db: must start with a mount declared",
        config=edit(lambda c: c["secrets"].update(db="other/app/db")),
    ),
    Case(
        "kv2-path-with-data",
        CONFIG,
        "without `data/`",
        config=edit(lambda c: c["secrets"].update(db="secret/data/app/db")),
    ),
    Case(
        "secret-name-invalid",
        CONFIG,
        "secrets.my-db: secret names must be identifiers",
        config=edit(lambda c: c["secrets"].update({"my-db": "secret/x"})),
    ),
    Case(
        "store-outside-run",
        CONFIG,
        "store: must be a directory under /run",
        config=edit(lambda c: c.update(store="/var/tmp/secrets")),
    ),
    # --- image config: services ---
    Case(
        "unit-name-not-a-unit",
        CONFIG,
        "services.app: must be a systemd service unit name",
        config=edit(lambda c: c["services"].update(app={"environment": {"A": "x"}})),
    ),
    Case(
        "unit-name-socket",
        CONFIG,
        "services.app.socket: must be a systemd service unit",
        config=edit(lambda c: c["services"].update({"app.socket": {"environment": {"A": "x"}}})),
    ),
    Case(
        "env-name-dash",
        CONFIG,
        "environment.MY-KEY: must be a variable name",
        config=edit(lambda c: env_of(c).update({"MY-KEY": "x"})),
    ),
    Case(
        "env-name-export",
        CONFIG,
        "environment.export K: must be a variable name",
        config=edit(lambda c: env_of(c).update({"export K": "x"})),
    ),
    Case(
        "env-name-digit",
        CONFIG,
        "environment.1ABC: must be a variable name",
        config=edit(lambda c: env_of(c).update({"1ABC": "x"})),
    ),
    Case(
        "env-name-non-ascii",
        CONFIG,
        "must be a variable name",
        config=edit(lambda c: env_of(c).update({"ÉTÉ": "x"})),
    ),
    Case(
        "template-not-string",
        CONFIG,
        "expected a template string, got an integer",
        config=edit(lambda c: env_of(c).update(PORT=5432)),
    ),
    Case(
        "template-syntax-error",
        CONFIG,
        "template syntax error",
        config=edit(lambda c: env_of(c).update(BROKEN="{{ secrets.db.password ")),
    ),
    Case(
        "template-unknown-secret",
        CONFIG,
        "refers to secrets.nope, which is not declared",
        config=edit(lambda c: env_of(c).update(X="{{ secrets.nope.key }}")),
    ),
    Case(
        "template-other-variable",
        CONFIG,
        "template uses `env`",
        config=edit(lambda c: env_of(c).update(X="{{ env.HOME }}")),
    ),
    Case(
        "template-dynamic-lookup",
        CONFIG,
        "template uses `name`",
        config=edit(lambda c: env_of(c).update(X="{{ secrets[name] }}")),
    ),
    Case(
        "template-loop-over-secrets",
        CONFIG,
        "use `secrets` only as secrets.<name>.<key>",
        config=edit(lambda c: env_of(c).update(X="{% for k in secrets %}{{ k }}{% endfor %}")),
    ),
    Case(
        "on-change-unknown",
        CONFIG,
        "on_change: must be one of: restart, reload, none",
        config=edit(lambda c: app(c).update(on_change="bounce")),
    ),
    Case(
        "required-not-bool",
        CONFIG,
        "required: expected true or false, got a string",
        config=edit(lambda c: app(c).update(required="yes please")),
    ),
    Case(
        "mode-world-writable",
        CONFIG,
        "mode: must not give write or any access to others",
        config=edit(lambda c: app(c).update(mode="0666")),
    ),
    Case(
        "mode-not-octal",
        CONFIG,
        "mode: must be an octal file mode",
        config=edit(lambda c: app(c).update(mode="rw-------")),
    ),
    Case(
        "user-invalid",
        CONFIG,
        "user: must be a user name or uid",
        config=edit(lambda c: app(c).update(user="ro ot")),
    ),
    Case(
        "credential-name-invalid",
        CONFIG,
        "credentials.a/b: must be a credential name",
        config=edit(lambda c: app(c).update(credentials={"a/b": "x"})),
    ),
    Case(
        "service-without-secrets",
        CONFIG,
        "gets no secrets",
        config=edit(lambda c: c["services"].update({"empty.service": {}})),
    ),
    Case(
        "env-from-unknown-secret",
        CONFIG,
        "environment_from[0].secret: refers to a secret not declared",
        config=edit(lambda c: app(c).update(environment_from=[{"secret": "nope"}])),
    ),
    Case(
        "env-from-bad-prefix",
        CONFIG,
        "environment_from[0].prefix: must start a variable",
        config=edit(lambda c: app(c).update(environment_from=[{"secret": "db", "prefix": "1-"}])),
    ),
    Case(
        "unknown-user",
        CONFIG,
        "services.app.service.user: no such user on this host",
        config=edit(lambda c: app(c).update(user="no-such-user-x")),
    ),
    Case(
        "unknown-group",
        CONFIG,
        "services.app.service.group: no such group on this host",
        config=edit(lambda c: app(c).update(group="no-such-group-x")),
    ),
    Case(
        "unit-template-without-instance",
        CONFIG,
        "services.app@.service: is a template",
        config=edit(
            lambda c: c["services"].update(
                {"app@.service": {"environment": {"A": "{{ secrets.db.password }}"}}}
            )
        ),
    ),
    Case(
        "unit-is-the-agent",
        CONFIG,
        "services.bootsecrets.service: is one of bootsecrets' own units",
        config=edit(
            lambda c: c["services"].update(
                {"bootsecrets.service": {"environment": {"A": "{{ secrets.db.password }}"}}}
            )
        ),
    ),
    Case(
        "unit-name-with-space",
        CONFIG,
        "must be a systemd service unit name",
        config=edit(
            lambda c: c["services"].update(
                {"my app.service": {"environment": {"A": "{{ secrets.db.password }}"}}}
            )
        ),
    ),
    Case(
        "store-with-newline",
        CONFIG,
        "store: must not contain control characters",
        config=edit(lambda c: c.update(store="/run/bs\nExecStartPre=/bin/" + MARK)),
    ),
    Case(
        "store-with-specifier",
        CONFIG,
        "store: must not contain `%`",
        config=edit(lambda c: c.update(store="/run/bs%i")),
    ),
    Case(
        "store-not-normalized",
        CONFIG,
        "store: must be a normalized path",
        config=edit(lambda c: c.update(store="/run/./bs/")),
    ),
    # --- explicit YAML tags: the documents are data ---
    Case(
        "tag-int-on-a-string",
        CONFIG,
        "approle.role: explicit YAML tags",
        config=lambda c: yaml_text(c).replace(
            f"role: {c['approle']['role']}", f"role: !!int {MARK}"
        ),
    ),
    Case(
        "tag-python-name",
        CONFIG,
        "approle.role: explicit YAML tags",
        config=lambda c: yaml_text(c).replace(
            f"role: {c['approle']['role']}", f"role: !!python/name:os.system {MARK}"
        ),
    ),
    Case(
        "tag-custom-on-a-mapping",
        CONFIG,
        "vault: explicit YAML tags",
        config=lambda c: yaml_text(c).replace("vault:", "vault: !vault", 1),
    ),
    Case(
        "tag-str-on-a-key",
        CONFIG,
        "explicit YAML tags",
        config=lambda c: yaml_text(c).replace("reboot_policy:", "!!str reboot_policy:"),
    ),
    # --- bootstrap (user-data) ---
    Case(
        "bootstrap-missing",
        errors.NotProvisioned.exit_code,
        "no bootstrap and no kept",
        bootstrap=lambda b: None,
    ),
    Case(
        "bootstrap-malformed",
        BOOT,
        "bootstrap.yaml:2: (top level): invalid YAML",
        bootstrap=lambda b: "role_id: [\n",
    ),
    Case("bootstrap-empty", BOOT, "empty file", bootstrap=lambda b: ""),
    Case(
        "bootstrap-missing-role-id",
        BOOT,
        "role_id: missing required field",
        bootstrap=lambda b: {"wrapped_secret_id": b["wrapped_secret_id"]},
    ),
    Case(
        "bootstrap-unknown-key",
        BOOT,
        "secret_id: unknown key",
        bootstrap=lambda b: {**b, "secret_id": MARK},
    ),
    Case(
        "bootstrap-token-with-space",
        BOOT,
        "wrapped_secret_id: must be a token",
        bootstrap=lambda b: {**b, "wrapped_secret_id": f"{MARK} x"},
    ),
    Case(
        "bootstrap-token-wrong-type",
        BOOT,
        "wrapped_secret_id: expected a string, got a list",
        bootstrap=lambda b: {**b, "wrapped_secret_id": [MARK]},
    ),
    Case(
        "bootstrap-address-no-scheme",
        BOOT,
        "vault_addr: must start with https://",
        bootstrap=lambda b: {**b, "vault_addr": f"{MARK}:8200"},
    ),
    Case(
        "bootstrap-tag-int",
        BOOT,
        "wrapped_secret_id: explicit YAML tags",
        bootstrap=lambda b: (
            f"role_id: {b['role_id']}\nwrapped_secret_id: !!int {b['wrapped_secret_id']}\n"
        ),
    ),
    Case(
        "bootstrap-tag-float",
        BOOT,
        "wrapped_secret_id: explicit YAML tags",
        bootstrap=lambda b: (
            f"role_id: {b['role_id']}\nwrapped_secret_id: !!float {b['wrapped_secret_id']}\n"
        ),
    ),
    Case(
        "bootstrap-tag-binary",
        BOOT,
        "role_id: explicit YAML tags",
        bootstrap=lambda b: (
            f"role_id: !!binary {MARK}\nwrapped_secret_id: {b['wrapped_secret_id']}\n"
        ),
    ),
    # --- secret values from Vault ---
    Case(
        "value-with-nul",
        errors.EncodeError.exit_code,
        "value contains a NUL byte",
        secret={"username": "app", "password": f"{MARK}\x00tail"},
    ),
    Case(
        "value-200-kib",
        errors.EncodeError.exit_code,
        "must fit in 128 KiB",
        secret={"username": "app", "password": MARK * 15000},
    ),
    Case(
        "value-is-a-mapping",
        errors.EncodeError.exit_code,
        "value is a dict, not a string",
        secret={"username": {"nested": MARK}, "password": "x"},
    ),
    Case(
        "key-not-a-variable-name",
        errors.EncodeError.exit_code,
        "does not make a valid variable name",
        secret={"user-name": "app", "password": "x"},
    ),
    Case(
        "missing-key",
        errors.SecretMissing.exit_code,
        "key 'username' of secret",
        secret={"password": MARK},
    ),
    Case(
        "env-from-sets-ld-preload",
        errors.EncodeError.exit_code,
        "variable LD_PRELOAD: key of secret/",
        config=edit(
            lambda c: c["services"]["app.service"]["environment_from"][0].update(
                prefix="", uppercase=False
            )
        ),
        secret={"LD_PRELOAD": f"/tmp/{MARK}.so", "username": "app", "password": "x"},
    ),
    Case(
        "env-from-sets-path",
        errors.EncodeError.exit_code,
        "changes how programs are loaded or found",
        config=edit(
            lambda c: c["services"]["app.service"]["environment_from"][0].update(
                prefix="", uppercase=True
            )
        ),
        secret={"path": f"/tmp/{MARK}", "username": "app", "password": "x"},
    ),
    Case(
        "env-from-prefix-ld",
        CONFIG,
        "environment_from[0].prefix: would make variables",
        config=edit(
            lambda c: c["services"]["app.service"].update(
                environment_from=[{"secret": "db", "prefix": "LD_"}]
            )
        ),
    ),
    Case(
        "key-forging-a-line",
        errors.EncodeError.exit_code,
        "DB_USER\\nBOOTSECRETS: ERROR: FORGED LINE:",
        secret={"user\nbootsecrets: error: forged line:": "app", "password": MARK},
    ),
]


def test_matrix_has_at_least_forty_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, openbao: Any) -> None:
    sandbox = world.sandbox
    base = world.config()
    base["secrets"]["legacy_env"] = base["secrets"]["db"]
    base["services"]["app.service"]["environment_from"] = (
        [{"secret": "legacy_env", "prefix": "DB_", "uppercase": True}] if case.secret else []
    )
    if case.secret is not None:
        openbao.put("secret", f"{world.unique}/db", case.secret)
    config_path = sandbox.root / "etc/bootsecrets/config.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    if case.setup:
        case.setup(sandbox.root)
    produced = case.config(base) if case.config else base
    if produced == "DIRECTORY":
        config_path.mkdir()
    elif produced == "LOOP":
        config_path.symlink_to(config_path)
    elif produced == "MISSING":
        pass
    elif isinstance(produced, bytes):
        config_path.write_bytes(produced)
    else:
        sandbox.write_config(produced)
    wrapped = world.bao.wrapped_secret_id(world.role)
    boot: dict[str, Any] | str | None = {"role_id": world.role_id, "wrapped_secret_id": wrapped}
    if case.bootstrap:
        boot = case.bootstrap({"role_id": world.role_id, "wrapped_secret_id": wrapped})
    if boot is not None:
        path = sandbox.store / "bootstrap.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(boot if isinstance(boot, str) else yaml.safe_dump(boot))

    code, out, err = sandbox.run("bootstrap")

    assert code == case.exit_code, err
    error_lines = [line for line in err.splitlines() if line.startswith("bootsecrets: error:")]
    assert len(error_lines) == 1, err
    assert case.message in error_lines[0], err
    assert MARK not in err and MARK not in out
    assert sandbox.written_files() == []
    assert not (sandbox.store / "current").exists()
    assert sandbox.runner.calls == []
    assert not (sandbox.root / "run/systemd").exists()
    if (
        case.config
        and isinstance(produced, str | bytes)
        and produced not in ("DIRECTORY", "LOOP", "MISSING")
    ):
        assert str(config_path) in error_lines[0]
    leftovers = (
        [p for p in (sandbox.store / "generations").glob("*")]
        if (sandbox.store / "generations").exists()
        else []
    )
    assert leftovers == []
