"""Every user-data the project produces passes `cloud-init schema`, and the bootstrap it writes
parses back, with the agent's own parser, to exactly the values Terraform was given."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from bootsecrets.bootstrapfile import load_bootstrap
from bootsecrets.errors import BootstrapError
from support.terraform import REPO, render_template, render_user_data

EXAMPLES = sorted((REPO / "cloud-init" / "examples").glob("*.yaml"))
BOOTSTRAP_PATH = "/run/bootsecrets/bootstrap.yaml"

# Printable ASCII without spaces is all a token may hold; within that, everything YAML or
# Terraform's template language could trip on.
TOKEN_AWKWARD = [
    "hvs.CAESIJ" + "x" * 80,
    '"quoted\'"',
    "$HOME${x}%{y}$${z}",
    "back\\slash\\n\\",
    "#hash:colon:{}[]&*!|>%@`,?",
    "-leading-dash",
    "null",
    "true",
    "0600",
    "~",
]
# Anything at all, for the template on its own (the module refuses most of these).
TEMPLATE_AWKWARD = [
    "",
    "two\nlines\n",
    "key: value # not a comment",
    "ünïcödé ☃ 😀 \u2028 \u2029 \ufeff",
    "  padded  ",
    "tab\there",
    "\"' $ \\ # : `",
    "${var.role_id} %{ if true }x%{ endif }",
    "- list\n- item",
    "|\n  block",
    "*alias &anchor !tag",
    "nul\x00byte",
]


def cloud_init_schema(text: str, tmp_path: Path, name: str = "user-data.yaml") -> None:
    binary = shutil.which("cloud-init")
    if not binary:
        pytest.fail("cloud-init is missing: run `apt-get install -y cloud-init`")
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    result = subprocess.run(
        [binary, "schema", "--config-file", str(path)], capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Valid cloud-config" in output, output
    assert "deprecat" not in output.lower(), output


def bootstrap_entry(user_data: str) -> dict[str, Any]:
    assert user_data.startswith("#cloud-config\n")
    doc = yaml.safe_load(user_data)
    entries = [e for e in doc["write_files"] if e["path"] == BOOTSTRAP_PATH]
    assert len(entries) == 1
    entry: dict[str, Any] = entries[0]
    assert entry["owner"] == "root:root"
    assert entry["permissions"] == "0600"
    assert set(entry) == {"path", "owner", "permissions", "content"}
    return entry


def write_bootstrap(user_data: str, tmp_path: Path) -> Path:
    """What cloud-init's write_files would write: the content, verbatim."""
    path = tmp_path / "bootstrap.yaml"
    path.write_text(bootstrap_entry(user_data)["content"], encoding="utf-8")
    return path


def test_cloud_init_schema_is_not_vacuous(tmp_path: Path) -> None:
    """`cloud-init schema` on this version does reject a bad write_files entry."""
    bad = "#cloud-config\nwrite_files:\n  - path: /x\n    permissions: 384\n"
    with pytest.raises(AssertionError, match="permissions"):
        cloud_init_schema(bad, tmp_path)


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_schema_and_parses(example: Path, tmp_path: Path) -> None:
    text = example.read_text(encoding="utf-8")
    cloud_init_schema(text, tmp_path)
    bootstrap = load_bootstrap(write_bootstrap(text, tmp_path))
    assert "EXAMPLE" in bootstrap.role_id and "EXAMPLE" in bootstrap.wrapped_secret_id


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_is_what_terraform_renders(example: Path, tmp_path: Path) -> None:
    """The examples are renderings of the current template (regenerate them if it changes)."""
    text = example.read_text(encoding="utf-8")
    bootstrap = load_bootstrap(write_bootstrap(text, tmp_path))
    keys = yaml.safe_load(text).get("ssh_authorized_keys", [])
    assert bootstrap.vault_addr is not None
    assert (
        render_user_data(bootstrap.vault_addr, bootstrap.role_id, bootstrap.wrapped_secret_id, keys)
        == text
    )


@pytest.mark.parametrize("value", TOKEN_AWKWARD)
def test_token_values_round_trip_through_the_agent_parser(value: str, tmp_path: Path) -> None:
    role_id = "role-" + value
    wrapped = value + "-wrapped"
    addr = "https://[2001:db8::1]:8200"
    keys = [f'ssh-ed25519 AAAAC3Nza{value} user: {value} # "c"']
    user_data = render_user_data(addr, role_id, wrapped, keys)
    cloud_init_schema(user_data, tmp_path)
    bootstrap = load_bootstrap(write_bootstrap(user_data, tmp_path))
    assert (bootstrap.role_id, bootstrap.wrapped_secret_id, bootstrap.vault_addr) == (
        role_id,
        wrapped,
        addr,
    )
    assert yaml.safe_load(user_data)["ssh_authorized_keys"] == keys


def test_without_ssh_keys_there_is_no_ssh_key_section(tmp_path: Path) -> None:
    user_data = render_user_data("https://vault.example.com", "r", "w", [])
    cloud_init_schema(user_data, tmp_path)
    assert "ssh_authorized_keys" not in yaml.safe_load(user_data)
    assert render_user_data("https://vault.example.com", "r", "w") == user_data


@pytest.mark.parametrize("value", TEMPLATE_AWKWARD)
def test_template_quotes_any_value(value: str, tmp_path: Path) -> None:
    """The template alone (templatefile(), no module validation) keeps any value exact."""
    variables = {
        "vault_addr": value + "addr",
        "role_id": value,
        "wrapped_secret_id": value + "w",
        "ssh_authorized_keys": [value, "k2: " + value],
    }
    user_data = render_template(variables)
    cloud_init_schema(user_data, tmp_path)
    content = yaml.safe_load(bootstrap_entry(user_data)["content"])
    assert content == {
        "role_id": value,
        "wrapped_secret_id": value + "w",
        "vault_addr": value + "addr",
    }
    assert yaml.safe_load(user_data)["ssh_authorized_keys"] == [value, "k2: " + value]


def test_template_without_vault_addr(tmp_path: Path) -> None:
    user_data = render_template(
        {"vault_addr": None, "role_id": "r", "wrapped_secret_id": "w", "ssh_authorized_keys": []}
    )
    cloud_init_schema(user_data, tmp_path)
    bootstrap = load_bootstrap(write_bootstrap(user_data, tmp_path))
    assert (bootstrap.role_id, bootstrap.wrapped_secret_id, bootstrap.vault_addr) == (
        "r",
        "w",
        None,
    )


def test_the_agent_refuses_what_the_template_carried(tmp_path: Path) -> None:
    """A value no token can be (here: a line break) reaches the droplet only if the module's
    validation is bypassed; the agent then refuses it by name, without echoing it."""
    user_data = render_template(
        {
            "vault_addr": None,
            "role_id": "r",
            "wrapped_secret_id": "not\na-token",
            "ssh_authorized_keys": [],
        }
    )
    with pytest.raises(BootstrapError, match="wrapped_secret_id") as info:
        load_bootstrap(write_bootstrap(user_data, tmp_path))
    assert "a-token" not in str(info.value)
