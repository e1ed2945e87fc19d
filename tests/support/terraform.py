"""Render the droplet user-data exactly as the project's Terraform module does, offline.

`render_user_data()` writes a throw-away root module that calls `terraform/modules/user-data`
(the module `terraform/main.tf` uses) with the values in a `*.tfvars.json` file (no shell, no
quoting: any string goes through byte for byte), runs `terraform init` and `terraform apply`
(the module needs no provider, so both work without network), and reads the output with
`terraform output -json`. The variable validations and the 64 KiB precondition run as they
would for a user; a failure raises `TerraformError` with Terraform's own message.

`render_template()` renders `cloud-init/user-data.yaml.tftpl` with `templatefile()` alone,
without the module's validations: for checking the template's quoting with values the module
would refuse.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO / "terraform"
MODULE = TERRAFORM_DIR / "modules" / "user-data"
TEMPLATE = REPO / "cloud-init" / "user-data.yaml.tftpl"

_ROOT_MODULE = """\
variable "vault_addr" {
  type = string
}
variable "role_id" {
  type = string
}
variable "wrapped_secret_id" {
  type      = string
  sensitive = true
}
variable "ssh_authorized_keys" {
  type = list(string)
}

module "user_data" {
  source              = "@MODULE@"
  vault_addr          = var.vault_addr
  role_id             = var.role_id
  wrapped_secret_id   = var.wrapped_secret_id
  ssh_authorized_keys = var.ssh_authorized_keys
}

output "user_data" {
  value     = module.user_data.user_data
  sensitive = true
}
"""

_TEMPLATE_ONLY = """\
variable "vars" {
  type = any
}

output "rendered" {
  value = templatefile(%(template)s, var.vars)
}
"""


class TerraformError(RuntimeError):
    """Terraform refused: `str(err)` is its diagnostic output (no color)."""


def terraform_binary() -> str:
    found = shutil.which("terraform")
    if not found:
        raise TerraformError(
            "terraform is missing: install the Terraform CLI "
            "(https://developer.hashicorp.com/terraform/install) and put it on PATH"
        )
    return found


def terraform_env() -> dict[str, str]:
    """The environment: no user CLI config, no version check-point call, no TF_VAR_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "CHECKPOINT_"))}
    env.update(
        TF_CLI_CONFIG_FILE=os.devnull,
        TF_IN_AUTOMATION="1",
        TF_INPUT="0",
        CHECKPOINT_DISABLE="1",
    )
    return env


def terraform(workdir: Path, *args: str) -> str:
    """Run `terraform ARGS` in WORKDIR; its stdout, or TerraformError with its output."""
    result = subprocess.run(
        [terraform_binary(), *args, "-no-color"],
        cwd=workdir,
        env=terraform_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode != 0:
        raise TerraformError(f"terraform {args[0]} failed:\n{result.stderr}{result.stdout}")
    return result.stdout


def _apply_and_read(root_module: str, variables: dict[str, Any], output: str) -> str:
    with tempfile.TemporaryDirectory(prefix="bootsecrets-tf-") as tmp:
        workdir = Path(tmp)
        source = os.path.relpath(MODULE, workdir)  # module sources must be "./" or "../"
        source = source if source.startswith("../") else "./" + source
        (workdir / "main.tf").write_text(root_module.replace("@MODULE@", source), encoding="utf-8")
        var_file = workdir / "values.auto.tfvars.json"
        var_file.write_text(json.dumps(variables, ensure_ascii=False), encoding="utf-8")
        var_file.chmod(0o600)
        terraform(workdir, "init", "-input=false", "-backend=false")
        terraform(workdir, "apply", "-auto-approve", "-input=false")
        value = json.loads(terraform(workdir, "output", "-json", output))
    if not isinstance(value, str):
        raise TerraformError(f"output {output} is not a string")
    return value


def render_user_data(
    vault_addr: str,
    role_id: str,
    wrapped_secret_id: str,
    ssh_authorized_keys: list[str] | None = None,
) -> str:
    """The user-data terraform/modules/user-data renders for these values (exact text)."""
    return _apply_and_read(
        _ROOT_MODULE,
        {
            "vault_addr": vault_addr,
            "role_id": role_id,
            "wrapped_secret_id": wrapped_secret_id,
            "ssh_authorized_keys": list(ssh_authorized_keys or []),
        },
        "user_data",
    )


def render_template(variables: dict[str, Any]) -> str:
    """`templatefile("cloud-init/user-data.yaml.tftpl", variables)`, without the module."""
    root = _TEMPLATE_ONLY % {"template": json.dumps(str(TEMPLATE))}
    return _apply_and_read(root, {"vars": variables}, "rendered")
