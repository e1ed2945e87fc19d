"""The example Terraform: formatted, its provider-free user-data module initialises and validates
offline, renders what cloud-init and the agent accept, and refuses what DigitalOcean would
(user-data over 64 KiB) or the agent would (malformed tokens) with a clear message."""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from bootsecrets.bootstrapfile import load_bootstrap
from support.terraform import (
    MODULE,
    REPO,
    TERRAFORM_DIR,
    TerraformError,
    render_user_data,
    terraform,
)
from test_cloudinit import cloud_init_schema, write_bootstrap

LIMIT = 65536


def test_fmt_check_recursive() -> None:
    terraform(TERRAFORM_DIR, "fmt", "-check", "-recursive", "-diff")


def test_user_data_module_needs_no_provider_and_validates_offline() -> None:
    with tempfile.TemporaryDirectory(prefix="bootsecrets-tf-") as tmp:
        # A copy of the layout the module relies on (it reads ../../../cloud-init/), so that
        # init writes its .terraform/ there and not into the repository.
        copy = Path(tmp)
        shutil.copytree(REPO / "cloud-init", copy / "cloud-init")
        shutil.copytree(
            MODULE,
            copy / "terraform/modules/user-data",
            ignore=shutil.ignore_patterns(".terraform*"),
        )
        workdir = copy / "terraform/modules/user-data"
        assert "required_providers" not in "".join(p.read_text() for p in workdir.glob("*.tf"))
        terraform(workdir, "init", "-input=false", "-backend=false")
        assert terraform(workdir, "providers").split() == [
            "Providers",
            "required",
            "by",
            "configuration:",
            ".",
        ]
        assert "Success!" in terraform(workdir, "validate")


def test_rendered_by_the_module_is_accepted_by_cloud_init_and_the_agent(tmp_path: Path) -> None:
    role_id = secrets.token_hex(16)
    wrapped = "hvs." + secrets.token_urlsafe(64)
    user_data = render_user_data(
        "https://vault.example.com:8200",
        role_id,
        wrapped,
        ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAItest ops@example"],
    )
    cloud_init_schema(user_data, tmp_path)
    bootstrap = load_bootstrap(write_bootstrap(user_data, tmp_path))
    assert (bootstrap.role_id, bootstrap.wrapped_secret_id, bootstrap.vault_addr) == (
        role_id,
        wrapped,
        "https://vault.example.com:8200",
    )


def user_data_with_key_bytes(n: int) -> str:
    """User-data whose one ssh key is `n` UTF-8 bytes (mostly 2-byte characters)."""
    key = "ssh-ed25519 " + "é" * ((n - 12) // 2) + "x" * ((n - 12) % 2)
    assert len(key.encode()) == n
    return render_user_data("https://vault.example.com", "role", "wrapped", [key])


def test_64_kib_limit_counts_bytes_not_characters(tmp_path: Path) -> None:
    base = len(user_data_with_key_bytes(100).encode()) - 100
    at_limit = user_data_with_key_bytes(LIMIT - base)
    assert len(at_limit.encode()) == LIMIT and len(at_limit) < LIMIT
    cloud_init_schema(at_limit, tmp_path)
    with pytest.raises(TerraformError) as info:
        user_data_with_key_bytes(LIMIT - base + 1)
    message = " ".join(str(info.value).split())
    assert f"is {LIMIT + 1} bytes, over DigitalOcean's limit of 65536 bytes (64 KiB)" in message
    assert "ssh_authorized_keys" in message and "ssh_keys" in message


def test_many_ssh_keys_over_the_limit_fail_with_what_to_do() -> None:
    keys = [
        f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{secrets.token_hex(40)} k{i}" for i in range(1000)
    ]
    with pytest.raises(TerraformError, match="over DigitalOcean's limit"):
        render_user_data("https://vault.example.com", "role", "wrapped", keys)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("role_id", "has space"),
        ("role_id", ""),
        ("wrapped_secret_id", "line\nbreak-SECRETPART"),
        ("wrapped_secret_id", "x" * 1025),
        ("vault_addr", "https://vault.example.com/v1/path"),
        ("vault_addr", "ftp://vault.example.com"),
        ("ssh_authorized_keys", "ssh-ed25519 AAAA\nssh-rsa BBBB"),
        ("ssh_authorized_keys", "ssh-ed25519 AAAA \x85nel"),
    ],
)
def test_module_refuses_malformed_values_by_name(field: str, value: str) -> None:
    args: dict[str, Any] = {
        "vault_addr": "https://vault.example.com",
        "role_id": "role",
        "wrapped_secret_id": "wrapped",
        "ssh_authorized_keys": [],
    }
    args[field] = [value] if field == "ssh_authorized_keys" else value
    with pytest.raises(TerraformError) as info:
        render_user_data(
            str(args["vault_addr"]),
            str(args["role_id"]),
            str(args["wrapped_secret_id"]),
            list(args["ssh_authorized_keys"]),
        )
    message = " ".join(str(info.value).split())
    assert "Invalid value for variable" in message
    assert re.search(rf"{field} must|Each entry of {field}", message), message
    assert "SECRETPART" not in message  # the wrapped secret-id variable is sensitive


def test_root_example_keeps_its_invariants() -> None:
    """What the README promises, checked in the HCL (the root module needs providers, which
    cannot be downloaded here, so it is formatted and read, not planned)."""
    main = (TERRAFORM_DIR / "main.tf").read_text()
    versions = (TERRAFORM_DIR / "versions.tf").read_text()
    assert re.search(r"secret_id_num_uses\s*=\s*1\n", main)
    assert re.search(r"wrapping_ttl\s*=\s*var\.wrapping_ttl", main)
    assert re.search(r"ignore_changes\s*=\s*\[user_data\]", main)
    assert re.search(r"user_data\s*=\s*module\.user_data\.user_data", main)
    assert re.search(r'source\s*=\s*"\./modules/user-data"', main)
    assert re.search(
        r"wrapped_secret_id\s*=\s*vault_approle_auth_backend_role_secret_id\."
        r"droplet\.wrapping_token",
        main,
    )
    assert re.search(r'source\s*=\s*"hashicorp/vault"\s*\n\s*version\s*=', versions)
    assert re.search(r'source\s*=\s*"digitalocean/digitalocean"\s*\n\s*version\s*=', versions)
    variables = (TERRAFORM_DIR / "variables.tf").read_text()
    assert re.search(r'variable "wrapping_ttl" \{[^}]*default\s*=\s*"30m"', variables)
    # No credentials in any file: the providers read them from the environment.
    for path in TERRAFORM_DIR.rglob("*.tf*"):
        text = path.read_text()
        assert not re.search(r"^\s*(token|auth_login|client_secret)\s*=", text, re.M), path
