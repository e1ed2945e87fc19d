"""More of the bad-input matrix (docs/reliability.md): values systemd would refuse, more
than a unit can be given, hostile templates, and template problems that must be found
before the wrapped secret-id is spent. Every case runs the real CLI against a tmpfs sandbox
and the real OpenBao and checks the exit code, exactly one `error:` line with the text
below, no value printed, nothing written, no unit touched."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import errors
from support.world import World

MARK = "Zq9-MARK-value"  # planted in offending values; must never be echoed back

Config = dict[str, Any]
ENCODE = errors.EncodeError.exit_code
RENDER = errors.RenderError.exit_code
CONFIG = errors.ConfigError.exit_code


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    exit_code: int
    message: str
    secret: dict[str, Any] | None = None
    config: Callable[[Config], None] | None = None


def app(config: Config) -> dict[str, Any]:
    service: dict[str, Any] = config["services"]["app.service"]
    return service


def env_template(source: str) -> Callable[[Config], None]:
    def apply(config: Config) -> None:
        app(config)["environment"]["HOSTILE"] = source

    return apply


def credentials(**templates: str) -> Callable[[Config], None]:
    """app.service gets these credentials and no other use of the db secret."""

    def apply(config: Config) -> None:
        config["services"].pop("worker.service")
        app(config)["environment"] = {"API_KEY": "{{ secrets.api.key }}"}
        app(config)["credentials"] = templates

    return apply


def environment_from_db(config: Config) -> None:
    config["secrets"]["all"] = config["secrets"]["db"]
    app(config)["environment_from"] = [{"secret": "all", "prefix": "BIG_", "uppercase": True}]


HOSTILE = {
    "power-tower": "{{ 9**(9**9) }}",
    "string-repeat": "{{ 'x'*3000000000 }}",
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 1000 }}"
    "{% endfor %}{% endfor %}",
    "format-width": "{{ '%999999999s' | format(secrets.db.password) }}",
    "join-huge-range": "{{ range(100000) | join(secrets.db.password * 1000) }}",
    "list-repeat": "{{ [secrets.db.password] * 1000000000 }}",
    "concat-in-a-loop": "{% set ns = namespace(s=secrets.db.password) %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "silent-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
    "{% endfor %}",
}

CASES = [
    # --- values systemd's EnvironmentFile= parser refuses (it would log them) ---
    Case(
        "value-noncharacter-fffe",
        ENCODE,
        "Unicode noncharacter",
        secret={"username": "app", "password": f"{MARK}\ufffe"},
    ),
    Case(
        "value-noncharacter-fdd0",
        ENCODE,
        "Unicode noncharacter",
        secret={"username": "app", "password": f"{MARK}\ufdd0"},
    ),
    Case(
        "value-noncharacter-plane-16",
        ENCODE,
        "Unicode noncharacter",
        secret={"username": "app", "password": f"{MARK}\U0010ffff"},
    ),
    # --- more than execve() or systemd's credential loader takes ---
    Case(
        "environment-over-1-mib",
        ENCODE,
        "over the 1 MiB",
        secret={f"v{i}": MARK + "v" * 120_000 for i in range(20)}
        | {"username": "app", "password": "x"},
        config=environment_from_db,
    ),
    Case(
        "credential-over-1-mib",
        ENCODE,
        "larger than 1 MiB",
        secret={"username": "app", "password": MARK * 80_000},
        config=credentials(**{"tls.key": "{{ secrets.db.password }}"}),
    ),
    Case(
        "credentials-over-1-mib-in-all",
        ENCODE,
        "credentials total more than 1 MiB",
        secret={"username": MARK * 40_000, "password": MARK * 40_000},
        config=credentials(a="{{ secrets.db.username }}", b="{{ secrets.db.password }}"),
    ),
    # --- hostile templates: bounded evaluation ---
    *(
        Case(
            f"template-{name}",
            RENDER,
            "unit app.service, variable HOSTILE: template stopped",
            secret={"username": "app", "password": MARK},
            config=env_template(source),
        )
        for name, source in HOSTILE.items()
    ),
]

#: Found at config load, before the wrapping lookup: the wrapped secret-id is not spent.
AT_LOAD = [
    Case(
        "template-unknown-filter",
        CONFIG,
        "HOSTILE: no filter named `nosuch`",
        config=env_template("{{ secrets.db.password | nosuch }}"),
    ),
    Case(
        "template-unknown-filter-in-if",
        CONFIG,
        "HOSTILE: no filter named `nosuch`",
        config=env_template("{% if secrets.db.password %}{{ 1 | nosuch }}{% endif %}"),
    ),
    Case(
        "template-unknown-test",
        CONFIG,
        "HOSTILE: no test named `nosuch`",
        config=env_template("{% if secrets.db.password is nosuch %}x{% endif %}"),
    ),
    Case(
        "template-include",
        CONFIG,
        "HOSTILE: include, extends and import are not available",
        config=env_template("{% include 'x' %}"),
    ),
]


def prepare(case: Case, world: World) -> None:
    config = world.config()
    if case.config:
        case.config(config)
    if case.secret is not None:
        world.bao.put("secret", f"{world.unique}/db", case.secret)
    world.sandbox.write_config(config)
    world.sandbox.write_bootstrap(world.role_id, world.bao.wrapped_secret_id(world.role))


def assert_refused(case: Case, world: World, code: int, out: str, err: str) -> None:
    sandbox = world.sandbox
    assert code == case.exit_code, err
    error_lines = [line for line in err.splitlines() if line.startswith("bootsecrets: error:")]
    assert len(error_lines) == 1, err
    assert case.message in error_lines[0], err
    assert MARK not in err and MARK not in out
    assert sandbox.written_files() == []
    assert not (sandbox.store / "current").exists()
    assert sandbox.runner.calls == []
    assert not (sandbox.root / "run/systemd").exists()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_value(case: Case, world: World) -> None:
    prepare(case, world)
    code, out, err = world.sandbox.run("bootstrap")
    assert_refused(case, world, code, out, err)


@pytest.mark.parametrize("case", AT_LOAD, ids=[c.id for c in AT_LOAD])
def test_template_problem_found_before_anything_is_spent(case: Case, world: World) -> None:
    prepare(case, world)
    since = world.bao.audit_offset()
    code, out, err = world.sandbox.run("bootstrap")
    assert_refused(case, world, code, out, err)
    assert "config.yaml:" in err
    assert world.bao.audited_requests(since) == []  # not even the wrapping lookup
    assert (world.sandbox.store / "bootstrap.yaml").exists()  # the wrapped secret-id is kept


def test_every_case_is_in_the_reliability_matrix() -> None:
    matrix = (Path(__file__).resolve().parents[1] / "docs/reliability.md").read_text()
    for case in (*CASES, *AT_LOAD):
        assert f"| `{case.id}` |" in matrix, case.id
