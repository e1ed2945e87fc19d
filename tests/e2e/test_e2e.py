"""The end-to-end proof (DESIGN.md): nothing faked but the cloud.

    scripts/install-e2e-deps && pytest -m e2e tests/e2e

1. Build the golden image: Debian 12 rootfs (mmdebstrap, cached), provisioned in a chroot by
   the same packer/scripts/*.sh Packer runs, `bootsecrets image-check` on the tree, raw ext4.
2. OpenBao dev server on the host's loopback: AppRole (single-use secret-id), policy, KV v2
   secrets with awkward values; a response-wrapped secret-id minted on the role's secret-id
   path, as Terraform's provider does.
3. user-data rendered by Terraform's own templatefile() from cloud-init/user-data.yaml.tftpl
   (tests/support/terraform.py), NoCloud seed, QEMU (TCG) with user-mode network only: the
   guest reaches OpenBao at 10.0.2.2, the test reaches the guest via hostfwd on 127.0.0.1.
4. From outside: both demo units report exactly the sha256 of their expected values.
5. Rotate the secret only demo-a uses, `bootsecrets refresh` over SSH: demo-a restarted with
   the new value, demo-b untouched. A second refresh through bootsecrets-refresh.service
   (the hardened unit the timer runs) changes nothing.
6. Power off; scan the raw disk for every value (old and new), the secret-id and the agent's
   Vault token: zero hits.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import e2e_disk
import pytest
from e2e_image import (
    PACKER_DIR,
    build_rootfs,
    build_wheelhouse,
    image_check,
    log,
    make_disk,
    provision,
)
from e2e_vm import VM, make_seed

pytestmark = pytest.mark.e2e

DEMO_A, DEMO_B = 8081, 8082
BOOT_TIMEOUT = float(os.environ.get("BOOTSECRETS_E2E_BOOT_TIMEOUT", "480"))
ROLE = "demo"  # packer/demo/config.yaml: approle.role
AGENT_FAILED = r"(?i)Failed to start .*bootsecrets|bootsecrets\.service: Main process exited"


def sha(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


@dataclass
class Image:
    disk: Path
    kernel: Path
    initrd: Path
    timings: dict[str, float]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # Big sparse files: keep them off tmpfs. Removed afterwards unless BOOTSECRETS_E2E_KEEP=1.
    base = Path(os.environ.get("BOOTSECRETS_E2E_WORKDIR", "/var/tmp"))
    base.mkdir(parents=True, exist_ok=True)
    path = Path(subprocess.run(["mktemp", "-d", f"{base}/bootsecrets-e2e.XXXXXX"],
                               capture_output=True, text=True, check=True).stdout.strip())
    yield path
    if os.environ.get("BOOTSECRETS_E2E_KEEP") == "1":
        log(f"kept {path}")
    else:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def image(workdir: Path) -> Image:
    if os.geteuid() != 0:
        pytest.fail("the e2e test needs root (mmdebstrap --mode=root, chroot, mounts)")
    subprocess.run([str(PACKER_DIR.parent / "scripts/install-e2e-deps")], check=True)
    timings: dict[str, float] = {}
    t = time.monotonic()
    rootfs = build_rootfs()
    timings["rootfs"] = time.monotonic() - t
    t = time.monotonic()
    wheelhouse = workdir / "wheelhouse"
    build_wheelhouse(wheelhouse)
    tree = workdir / "tree"
    provision(rootfs, tree, wheelhouse, PACKER_DIR / "demo/config.yaml", demo=True)
    timings["provision"] = time.monotonic() - t
    t = time.monotonic()
    check = image_check(tree)
    assert check.returncode == 0, (
        f"image-check found problems in the built image:\n{check.stdout}{check.stderr}")
    timings["image-check"] = time.monotonic() - t
    t = time.monotonic()
    disk, kernel, initrd = make_disk(tree, workdir / "image")
    shutil.rmtree(tree)
    timings["disk"] = time.monotonic() - t
    return Image(disk, kernel, initrd, timings)


def awkward(tag: str, label: str) -> str:
    """A value with everything an env file or a shell gets wrong. `tag` makes it findable."""
    return (f'{label}-{tag} "double" \'single\' $HOME ${{NOPE}} \\back\\slash `tick` '
            f"é ü ß 日本 €\nsecond line\ttab \\n not-a-newline %s %% ;|&")


def render_user_data(**kwargs: Any) -> str:
    try:
        from support.terraform import render_user_data as render
    except ImportError as exc:  # pragma: no cover - until the Terraform helper lands
        pytest.fail(f"tests/support/terraform.py (render_user_data) is missing: {exc}")
    return str(render(**kwargs))


def test_golden_image_end_to_end(image: Image, workdir: Path, openbao: Any,
                                 captured: Any, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    timings = dict(image.timings)
    tag = secrets.token_hex(8)

    # --- OpenBao: secrets, policy, AppRole, wrapped secret-id --------------------------
    a_v1 = {"password": awkward(tag, "pw1"), "api_key": f"ak-{tag}-$(id)`x`\\\"q\"\u00e9"}
    b = {"user": f"user-{tag}-ñ", "token": f'tok-{tag}"\'$\\`', "note": awkward(tag, "note")}
    a_v2 = {**a_v1, "password": awkward(tag, "pw2-rotated")}
    openbao.put("secret", "demo/a", a_v1)
    openbao.put("secret", "demo/b", b)
    role_id = openbao.approle(
        ROLE, 'path "secret/data/demo/*" { capabilities = ["read"] }\n',
        secret_id_num_uses=1, secret_id_ttl="30m", token_ttl="1h", token_max_ttl="4h")
    wrapped = openbao.wrapped_secret_id(ROLE, ttl="15m")
    port = openbao.addr.rsplit(":", 1)[1]

    # --- user-data exactly as Terraform renders it -----------------------------------
    key = workdir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "e2e",
                    "-f", str(key)], check=True)
    user_data = render_user_data(
        vault_addr=f"http://10.0.2.2:{port}", role_id=role_id, wrapped_secret_id=wrapped,
        ssh_authorized_keys=[key.with_suffix(".pub").read_text().strip()])
    seed = make_seed(workdir / "seed", user_data, f"i-e2e-{tag}")
    schema = subprocess.run(["cloud-init", "schema", "-c", str(workdir / "seed/user-data")],
                            capture_output=True, text=True, check=False)
    assert schema.returncode == 0, schema.stdout + schema.stderr

    vm = VM(disk=image.disk, kernel=image.kernel, initrd=image.initrd, seed=seed,
            workdir=workdir, guest_ports=[DEMO_A, DEMO_B])
    vm.ssh_key = key
    try:
        vm.start()
        t = time.monotonic()
        # --- first boot: both demo units up with exactly the expected values ---------
        doc_a = vm.wait_http(DEMO_A, BOOT_TIMEOUT, fail_pattern=AGENT_FAILED)
        doc_b = vm.wait_http(DEMO_B, 60, fail_pattern=AGENT_FAILED)
        timings["boot-to-demo"] = time.monotonic() - t
        url1 = f"postgresql://app:{a_v1['password']}@db/app"
        assert doc_a["unit"] == "demo-a.service"
        assert doc_a["sha256"] == {"DEMO_PASSWORD": sha(a_v1["password"]),
                                   "DEMO_URL": sha(url1)}
        assert doc_a["credentials"] == {"api_key": sha(a_v1["api_key"])}
        assert doc_b["sha256"] == {"DEMO_USER": sha(b["user"]), "DEMO_TOKEN": sha(b["token"]),
                                   "DEMO_NOTE": sha(b["note"])}
        assert doc_b["credentials"] == {}

        # --- rotate demo-a's secret, refresh in the guest ------------------------------
        t = time.monotonic()
        openbao.put("secret", "demo/a", a_v2)
        vm.wait_ssh(120)
        result = vm.ssh("sudo bootsecrets refresh", timeout=180, check=False)
        captured.add("guest refresh stdout", result.stdout)
        captured.add("guest refresh stderr", result.stderr)
        assert result.returncode == 0, f"refresh failed ({result.returncode}): {result.stderr}"
        url2 = f"postgresql://app:{a_v2['password']}@db/app"
        doc_a2 = vm.wait_http(
            DEMO_A, 60, until=lambda d: d["sha256"].get("DEMO_PASSWORD") == sha(a_v2["password"]))
        doc_b2 = vm.http_json(DEMO_B)
        timings["refresh"] = time.monotonic() - t
        assert doc_a2["pid"] != doc_a["pid"]
        assert doc_a2["invocation_id"] != doc_a["invocation_id"]
        assert doc_a2["sha256"] == {"DEMO_PASSWORD": sha(a_v2["password"]), "DEMO_URL": sha(url2)}
        assert doc_a2["credentials"] == {"api_key": sha(a_v2["api_key"])}
        assert (doc_b2["pid"], doc_b2["invocation_id"], doc_b2["sha256"]) == (
            doc_b["pid"], doc_b["invocation_id"], doc_b["sha256"]), "demo-b must not restart"

        # --- nothing changed: the timer's hardened unit refreshes without restarts ------
        result = vm.ssh("sudo systemctl start bootsecrets-refresh.service", timeout=180,
                        check=False)
        assert result.returncode == 0, (
            result.stderr + vm.ssh("sudo journalctl -b -u bootsecrets-refresh.service "
                                   "--no-pager -o cat", check=False).stdout)
        for port_, before in ((DEMO_A, doc_a2), (DEMO_B, doc_b2)):
            after = vm.http_json(port_)
            assert (after["pid"], after["invocation_id"]) == (
                before["pid"], before["invocation_id"]), f"no-op refresh restarted :{port_}"

        # --- the store: memory-only, root 0700; the demo units are not enabled ----------
        store = vm.ssh("sudo findmnt -n -o FSTYPE,TARGET /run/bootsecrets; "
                       "sudo stat -c '%a %U' /run/bootsecrets; "
                       "systemctl is-enabled demo-a.service demo-b.service; true",
                       check=False).stdout.split()
        assert store[:4] == ["tmpfs", "/run/bootsecrets", "700", "root"], store
        assert store[4:] == ["static", "static"], store

        # --- what the operator sees: status and the journal, never a value --------------
        status = vm.ssh("sudo bootsecrets status --json", check=False)
        captured.add("guest status", status.stdout + status.stderr)
        assert status.returncode == 0, status.stderr
        json.loads(status.stdout)
        journal = vm.ssh("sudo journalctl -b --no-pager -o verbose", timeout=120,
                         check=False).stdout
        assert "bootsecrets" in journal
        captured.add("guest journal", journal)  # the leak guard looks for every value
        show = vm.ssh("systemctl show demo-a.service demo-b.service bootsecrets.service",
                      check=False).stdout
        captured.add("guest systemctl show", show)
        t = time.monotonic()
        vm.poweroff()
        timings["poweroff"] = time.monotonic() - t
    except BaseException:
        log("serial console tail:\n" + vm.tail(120))
        raise
    finally:
        vm.kill()

    # --- the disk: no value, no secret-id, no token ----------------------------------
    t = time.monotonic()
    values = [*a_v1.values(), *b.values(), a_v2["password"], url1, url2]
    # The tag-bearing first lines catch values stored re-encoded (escaped, split at \n).
    fragments = {v.split("\n")[0].split(" ")[0] for v in values}
    # Positive control: a line of the image config (a file on the disk) must be found.
    control = 'DEMO_URL: "postgresql://app:{{ secrets.a.password }}@db/app"'
    hits = e2e_disk.find_values(image.disk, [*values, *fragments, control])
    assert hits.pop(control, 0), "the disk scan cannot see file contents"
    assert not hits, ("secret values on the VM's disk: "
                      f"{[v[:8] + '…' for v in hits]} — find them with debugfs/grep")

    hmacs = e2e_disk.audited_hmacs(openbao.audit_path)
    assert hmacs["secret_id"], "the audit log saw no secret-id (did the agent log in?)"
    assert hmacs["client_token"], "the audit log saw no AppRole login"
    # Positive control: the audit hash of the (known) role-id matches what the log holds,
    # so a secret-id or token on the disk could not escape the comparison below.
    assert e2e_disk.audit_hash(openbao.client, "file", role_id) in hmacs["role_id"]
    uuids = e2e_disk.shaped_strings(image.disk, e2e_disk.UUID)
    tokens = e2e_disk.shaped_strings(image.disk, e2e_disk.TOKEN)
    leaked_ids = {u for u in uuids
                  if e2e_disk.audit_hash(openbao.client, "file", u) in hmacs["secret_id"]}
    leaked_tokens = {tok for tok in tokens
                     if e2e_disk.audit_hash(openbao.client, "file", tok) in hmacs["client_token"]}
    assert not leaked_ids, "the AppRole secret-id is on the VM's disk"
    assert not leaked_tokens, "the agent's Vault token is on the VM's disk"
    timings["disk-scan"] = time.monotonic() - t
    log(f"disk scan: {len(values) + len(fragments)} values, {len(uuids)} UUID-shaped and "
        f"{len(tokens)} token-shaped strings checked against the audit HMACs: 0 hits")

    timings["test"] = time.monotonic() - started
    with capsys.disabled():  # shown even when pytest captures output; durations only
        log("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
