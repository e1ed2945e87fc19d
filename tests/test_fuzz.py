"""Fuzzing the parsers: any input either parses or is rejected with the documented error
class (ConfigError/BootstrapError) — never another exception, never a value in the message."""

from __future__ import annotations

import copy
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootsecrets.bootstrapfile import parse_bootstrap
from bootsecrets.config import Config, parse_config
from bootsecrets.errors import BootstrapError, ConfigError

VALID: dict[str, Any] = {
    "vault": {"address": "https://vault.example:8200", "boot_deadline": 5},
    "approle": {"role": "web"},
    "reboot_policy": "reprovision",
    "mounts": {"secret": "kv-v2", "kv": "kv-v1"},
    "secrets": {"db": "secret/app/db", "api": "kv/app/api"},
    "services": {
        "app.service": {
            "environment": {"URL": "x://{{ secrets.db.user }}:{{ secrets.db.password }}@h"},
            "environment_from": [{"secret": "api", "prefix": "API_"}],
            "on_change": "reload",
            "mode": "0600",
        },
        "tls.service": {"credentials": {"key.pem": "{{ secrets.api.key }}"}},
    },
}

#: Values no message may repeat: anything the parsers echoed back would show up whole.
CANARY_VALUES = st.binary(min_size=8, max_size=8).map(lambda b: f"canary{b.hex()}")
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=40),
    st.sampled_from(["{{", "}}", "{% for %}", "../x", "secret/", "0777", "kv-v2"]),
    CANARY_VALUES,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=3)
    ),
    max_leaves=8,
)


SOURCE = "fuzz.yaml"
TAGS = st.sampled_from(
    [
        "!!int",
        "!!float",
        "!!str",
        "!!binary",
        "!!python/name:os.system",
        "!!python/object/apply:os.system",
        "!custom",
        "!",
        "!!map",
        "!!seq",
        "!!timestamp",
        "!<tag:yaml.org,2002:int>",
    ]
)


def parse(data: bytes) -> Config | ConfigError:
    try:
        return parse_config(data, SOURCE)
    except ConfigError as err:
        return err


def string_values(tree: Any) -> list[str]:
    """Every string value (not key) in a parsed document."""
    if isinstance(tree, dict):
        return [s for value in tree.values() for s in string_values(value)]
    if isinstance(tree, list):
        return [s for value in tree for s in string_values(value)]
    return [tree] if isinstance(tree, str) else []


def paths_in(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found.extend(paths_in(value, (*prefix, key)))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found.extend(paths_in(value, (*prefix, index)))
    return found


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    config = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths_in(config)[1:]))
        parent: Any = config
        for step in where[:-1]:
            parent = parent[step]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[where[-1]] = draw(CANARY_VALUES | VALUES)
        elif action == "delete" and isinstance(parent, dict):
            del parent[where[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = draw(VALUES)
    return config


def test_the_valid_config_parses() -> None:
    result = parse(yaml.safe_dump(VALID).encode())
    assert isinstance(result, Config)
    assert {s.unit for s in result.services} == {"app.service", "tls.service"}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_configs())
def test_mutated_configs_parse_or_fail_with_config_error(config: dict[str, Any]) -> None:
    result = parse(yaml.safe_dump(config).encode())
    if isinstance(result, ConfigError):
        message = str(result)
        assert message.startswith(SOURCE)
        echoed = [v for v in string_values(config) if v.startswith("canary") and v in message]
        assert not echoed, message


@settings(max_examples=300)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_parse_or_fail_with_config_error(data: bytes) -> None:
    parse(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_explicit_tag_anywhere_is_refused_naming_a_field(data: st.DataObject) -> None:
    """A tag on any line of the valid config (before a value, a key, a mapping or a list
    item) is refused as such — never reaches a constructor, never another exception."""
    lines = yaml.safe_dump(VALID).splitlines()
    index = data.draw(st.integers(0, len(lines) - 1))
    line, tag = lines[index], data.draw(TAGS)
    indent = len(line) - len(line.lstrip())
    body = line.strip()
    if body.startswith("- "):
        tagged = f"{' ' * indent}- {tag} {body[2:]}"
    elif ": " in body and data.draw(st.booleans()):
        key, value = body.split(": ", 1)
        tagged = f"{' ' * indent}{key}: {tag} {value}"
    else:
        tagged = f"{' ' * indent}{tag} {body}"
    lines[index] = tagged
    result = parse("\n".join(lines).encode())
    assert isinstance(result, ConfigError), tagged
    assert "explicit YAML tags" in str(result) or "invalid YAML" in str(result), str(result)


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["role_id", "wrapped_secret_id", "vault_addr", "x"]), VALUES, max_size=4
    )
    | st.text(max_size=200)
)
def test_bootstrap_parses_or_fails_with_bootstrap_error(doc: Any) -> None:
    text = doc if isinstance(doc, str) else yaml.safe_dump(doc)
    try:
        boot = parse_bootstrap(text.encode(), "bootstrap.yaml")
    except BootstrapError as err:
        # Never echo a value back: the message holds none of the document's strings
        # longer than a field name.
        for value in doc.values() if isinstance(doc, dict) else []:
            if isinstance(value, str) and len(value) > 24:
                assert value not in str(err)
        return
    assert boot.role_id and boot.wrapped_secret_id
