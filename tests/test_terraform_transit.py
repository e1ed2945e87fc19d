"""The Terraform example's data-at-rest side: the droplet's policy comes from a provider-free
module, rendered here offline and loaded into the real OpenBao, where the agent bootstraps,
rewraps after a rotation and decommissions under exactly that policy; the Transit key it
creates can be deleted (crypto-shred). The root module needs providers, which cannot be
downloaded here: its HCL is formatted (tests/test_terraform.py) and read for its invariants."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Sandbox
from support.loopfs import LoopFs, ext4_loop
from support.openbao import OpenBao
from support.terraform import TERRAFORM_DIR, terraform
from support.transit import create_key, mounted_in, record_of, rotate
from support.world import World
from test_encdirs import directory_config, provision, transit_requests

POLICY_MODULE = TERRAFORM_DIR / "modules/droplet-policy"

ROOT = """\
variable "secret_paths" {
  type = list(string)
}
variable "transit_key" {
  type = string
}

module "policy" {
  source        = "@MODULE@"
  secret_paths  = var.secret_paths
  transit_key   = var.transit_key
}

output "policy" {
  value = module.policy.policy
}
"""


def render_policy(secret_paths: list[str], transit_key: str) -> str:
    with tempfile.TemporaryDirectory(prefix="bootsecrets-tf-") as tmp:
        workdir = Path(tmp)
        source = os.path.relpath(POLICY_MODULE, workdir)
        (workdir / "main.tf").write_text(ROOT.replace("@MODULE@", source))
        (workdir / "values.auto.tfvars.json").write_text(
            json.dumps({"secret_paths": secret_paths, "transit_key": transit_key})
        )
        terraform(workdir, "init", "-input=false", "-backend=false")
        assert "Success!" in terraform(workdir, "validate")
        terraform(workdir, "apply", "-auto-approve", "-input=false")
        value = json.loads(terraform(workdir, "output", "-json", "policy"))
    assert isinstance(value, str)
    return value


def test_the_policy_module_renders_exactly_update_on_three_transit_paths() -> None:
    policy = render_policy(["secret/data/app/*"], "bootsecrets-web-1")
    assert policy == (
        'path "secret/data/app/*" {\n  capabilities = ["read"]\n}\n\n'
        'path "transit/datakey/plaintext/bootsecrets-web-1" {\n'
        '  capabilities = ["update"]\n}\n\n'
        'path "transit/decrypt/bootsecrets-web-1" {\n  capabilities = ["update"]\n}\n\n'
        'path "transit/rewrap/bootsecrets-web-1" {\n  capabilities = ["update"]\n}\n'
    )


@pytest.fixture
def srv(sandbox: Sandbox) -> Iterator[Path]:
    fs: LoopFs
    with ext4_loop(encrypt=True) as fs, mounted_in(fs, sandbox.root / "srv") as target:
        yield target


def test_the_agent_runs_under_the_rendered_policy(
    world: World, openbao: OpenBao, srv: Path
) -> None:
    create_key(openbao, world.role)
    policy = render_policy(world.policy_paths, world.role)
    openbao.client.sys.create_or_update_policy(name=f"{world.role}-policy", policy=policy)
    provision(world, directory_config(world))
    assert world.sandbox.run("bootstrap")[0] == 0
    rotate(openbao, world.role)
    offset = openbao.audit_offset()
    code, _, err = world.sandbox.run("refresh")
    assert code == 0, err
    assert transit_requests(openbao, offset) == [f"transit/rewrap/{world.role}"]
    assert record_of(world.sandbox.root, "appdata")["key_version"] == 2
    code, _, err = world.sandbox.run("decommission", "--yes")
    assert code == 0, err


def test_the_root_module_creates_a_shreddable_key_and_uses_the_policy_module() -> None:
    main = (TERRAFORM_DIR / "main.tf").read_text()
    key = re.search(
        r'resource "vault_transit_secret_backend_key" "droplet" \{(.*?)\n\}', main, re.S
    )
    assert key is not None
    body = key.group(1)
    assert re.search(r"count\s*=\s*var\.shared_transit_key == null \? 1 : 0", body)
    assert re.search(r"deletion_allowed\s*=\s*true\n", body)
    assert re.search(r"exportable\s*=\s*false\n", body)
    assert re.search(r"allow_plaintext_backup\s*=\s*false\n", body)
    # Named like the AppRole role, which is the image config's default transit_key.
    role = re.search(r'role_name\s*=\s*"([^"]+)"', main)
    assert role is not None and re.search(rf'name\s*=\s*"{re.escape(role.group(1))}"', body)
    assert re.search(r'source\s*=\s*"\./modules/droplet-policy"', main)
    assert re.search(r"policy\s*=\s*module\.policy\.policy", main)
    assert re.search(r"transit_key\s*=\s*local\.transit_key", main)
    variables = (TERRAFORM_DIR / "variables.tf").read_text()
    assert re.search(r'variable "shared_transit_key" \{[^}]*default\s*=\s*null', variables)
