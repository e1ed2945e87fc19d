"""The Terraform example's encrypted volumes: the policy module rendered offline with a
volume's Transit key and loaded into the real OpenBao, where the agent formats, opens,
rewraps and decommissions a volume under exactly that policy (device-mapper and PID 1 stand
in, support.devmapper); the root variables' validation run by Terraform itself (the file
needs no provider); the root module's HCL read for its invariants (it needs providers,
which cannot be downloaded here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Captured
from support.openbao import OpenBao
from support.terraform import TERRAFORM_DIR, TerraformError, terraform
from support.transit import create_key, rotate
from support.volumes import Volumes, volume_world
from test_encdirs import transit_requests

POLICY_MODULE = TERRAFORM_DIR / "modules/droplet-policy"

ROOT = """\
variable "secret_paths" {
  type = list(string)
}
variable "transit_key" {
  type = string
}
variable "volume_transit_keys" {
  type = list(string)
}

module "policy" {
  source              = "@MODULE@"
  secret_paths        = var.secret_paths
  transit_key         = var.transit_key
  volume_transit_keys = var.volume_transit_keys
}

output "policy" {
  value = module.policy.policy
}
"""


def render_policy(secret_paths: list[str], transit_key: str, volume_keys: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="bootsecrets-tf-") as tmp:
        workdir = Path(tmp)
        (workdir / "main.tf").write_text(
            ROOT.replace("@MODULE@", os.path.relpath(POLICY_MODULE, workdir))
        )
        (workdir / "values.auto.tfvars.json").write_text(
            json.dumps(
                {
                    "secret_paths": secret_paths,
                    "transit_key": transit_key,
                    "volume_transit_keys": volume_keys,
                }
            )
        )
        terraform(workdir, "init", "-input=false", "-backend=false")
        terraform(workdir, "apply", "-auto-approve", "-input=false")
        value = json.loads(terraform(workdir, "output", "-json", "policy"))
    assert isinstance(value, str)
    return value


def update(path: str) -> str:
    return f'path "{path}" {{\n  capabilities = ["update"]\n}}\n'


def test_the_policy_grants_each_volume_key_the_same_three_paths() -> None:
    policy = render_policy(
        ["secret/data/app/*"], "bootsecrets-web-1", ["bootsecrets-volume-pg", "bootsecrets-web-1"]
    )
    assert policy == "\n".join(
        [
            'path "secret/data/app/*" {\n  capabilities = ["read"]\n}\n',
            *(
                update(f"transit/{op}/{key}")
                for key in ("bootsecrets-web-1", "bootsecrets-volume-pg")
                for op in ("datakey/plaintext", "decrypt", "rewrap")
            ),
        ]
    )


@pytest.fixture
def vols(
    openbao: OpenBao, sandbox_root: Path, captured: Captured, unique: str
) -> Iterator[Volumes]:
    with volume_world(openbao, sandbox_root, captured, unique) as volumes:
        yield volumes


def test_the_agent_runs_a_volume_under_the_rendered_policy(vols: Volumes, openbao: OpenBao) -> None:
    key = f"bootsecrets-volume-{vols.world.unique}"
    create_key(openbao, key)
    policy = render_policy(vols.world.policy_paths, vols.world.role, [key])
    openbao.client.sys.create_or_update_policy(name=f"{vols.world.role}-policy", policy=policy)
    vols.image("data")
    vols.provision(vols.config(volumes=vols.section(data={"transit_key": key})))
    code, _, err = vols.sandbox.run("bootstrap")
    assert code == 0, err
    vols.reboot()
    assert vols.sandbox.run("bootstrap")[0] == 0
    rotate(openbao, key)
    offset = openbao.audit_offset()
    code, _, err = vols.sandbox.run("refresh")
    assert code == 0, err
    assert transit_requests(openbao, offset) == [f"transit/rewrap/{key}"]
    code, _, err = vols.sandbox.run("decommission", "--yes")
    assert code == 0, err


def plan_variables(values: dict[str, Any]) -> str:
    """`terraform plan` of the root module's variables.tf alone (no provider needed)."""
    with tempfile.TemporaryDirectory(prefix="bootsecrets-tf-") as tmp:
        workdir = Path(tmp)
        shutil.copy(TERRAFORM_DIR / "variables.tf", workdir)
        (workdir / "values.auto.tfvars.json").write_text(
            json.dumps(
                {
                    "name": "web-1",
                    "snapshot_id": "1",
                    "region": "fra1",
                    "secret_paths": ["secret/data/app/*"],
                    **values,
                }
            )
        )
        terraform(workdir, "init", "-input=false", "-backend=false")
        return terraform(workdir, "plan", "-input=false")


def test_the_volumes_variable_takes_digitaloceans_names_and_whole_sizes() -> None:
    assert "No changes" in plan_variables({"volumes": {"web-1-pgdata": 100, "logs": 1}})
    for bad in ({"Web-1": 10}, {"1st": 10}, {"a_b": 10}, {"ok": 0}, {"ok": 1.5}, {"x" * 65: 10}):
        with pytest.raises(TerraformError, match="volumes: names are lower-case letters"):
            plan_variables({"volumes": bad})


def block(text: str, kind: str, name: str) -> str:
    found = re.search(rf'resource "{kind}" "{name}" \{{(.*?)\n\}}', text, re.S)
    assert found is not None, f"{kind}.{name}"
    return found.group(1)


def test_the_root_module_attaches_unformatted_volumes_with_a_key_each() -> None:
    main = (TERRAFORM_DIR / "main.tf").read_text()
    volume = block(main, "digitalocean_volume", "encrypted")
    assert re.search(r"for_each\s*=\s*var\.volumes\n", volume)
    assert re.search(r"size\s*=\s*each\.value\n", volume)
    # No DigitalOcean formatting: not in the resource, and nowhere else either.
    code = "\n".join(line for line in main.splitlines() if not line.lstrip().startswith("#"))
    assert "initial_filesystem" not in code
    key = block(main, "vault_transit_secret_backend_key", "volume")
    assert re.search(r"for_each\s*=\s*var\.volumes\n", key)
    assert re.search(r'name\s*=\s*"bootsecrets-volume-\$\{each\.key\}"', key)
    for setting in (
        "deletion_allowed\\s*=\\s*true",
        "exportable\\s*=\\s*false",
        "allow_plaintext_backup\\s*=\\s*false",
    ):
        assert re.search(setting, key), setting
    assert re.search(
        r"volume_transit_keys\s*=\s*\[for key in "
        r"vault_transit_secret_backend_key\.volume : key\.name\]",
        main,
    )
    droplet = block(main, "digitalocean_droplet", "app")
    assert re.search(
        r"volume_ids\s*=\s*\[for volume in digitalocean_volume\.encrypted : "
        r"volume\.id\]",
        droplet,
    )
    outputs = (TERRAFORM_DIR / "outputs.tf").read_text()
    assert 'output "volume_devices"' in outputs and "scsi-0DO_Volume_" in outputs
