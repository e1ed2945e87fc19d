"""The end-to-end proof of encrypted volumes, for a VM with a real kernel (dm-crypt) and a real
systemd: what this host cannot run (it has no device-mapper). Not collected by pytest on its
own (no `test_` prefix): the e2e harness calls it. `tests/test_volume_vm_parts.py` checks on
this host everything here that can be checked without the VM (the image config parses, the
units verify, the raw-image checks find what they look for).

What the harness provides
-------------------------

1. **The image** (built as for the main e2e test, with):
   - `image_config(base)` as `/etc/bootsecrets/config.yaml` (`base` is the demo config,
     packer/demo/config.yaml, as a dict): persist-token, a `volume` secret, three units and
     three `encrypted_volumes`;
   - `UNITS` installed in /etc/systemd/system (not enabled: the agent starts them);
   - `systemd/encrypted-volumes.conf` installed as
     `/etc/systemd/system/bootsecrets.service.d/encrypted-volumes.conf` and
     `/etc/systemd/system/bootsecrets-refresh.service.d/encrypted-volumes.conf`;
   - the Debian packages `cryptsetup-bin` (and e2fsprogs, already there), and the kernel's
     modules (dm_mod, dm_crypt, xts) in the rootfs: the VM boots the image's own kernel.
2. **The disks**: besides the root disk, the raw images `make_disks(workdir)` creates (a
   blank 64 MiB volume and a 64 MiB one holding ext4), attached as virtio drives with the
   serials in `DISKS`, so that udev links them as /dev/disk/by-id/virtio-<serial> (what the
   config names), e.g. for QEMU:
   `-drive file=<image>,format=raw,if=none,id=<serial>,cache=writeback
    -device virtio-blk-pci,drive=<serial>,serial=<serial>`.
   The third volume's serial is attached to nothing (a wrong device path).
3. **OpenBao** on the host (the `openbao` fixture) with the AppRole `role` created by the
   harness (policy `<role>-policy`, token_ttl long enough for both boots); `prepare()` adds
   the volume secret, the Transit key and the three Transit grants to that policy.
4. **Boots**: `Machine.boot()`: power on from the same root disk (with the same NoCloud seed:
   cloud-init sees the same instance and does not rerun), wait for SSH, and on leaving
   power off cleanly (`systemctl poweroff`) so the disk images are complete. Called twice:
   the second boot is the reboot under persist-token.
5. **Commands over SSH** as a user with passwordless sudo: `Guest.ssh(cmd, timeout=,
   check=, input=)` returning a CompletedProcess[str] (tests/e2e/e2e_vm.VM.ssh has that
   shape).

Then `prove(machine, openbao, role, disks)` does the rest (two boots; each run of the agent
also waits 5 s for the volume that is never attached). Nothing it prints or asserts with
holds the canary or a key: the guest compares sha256 sums; the data key (decrypted as root
on the host) becomes a leak-guard canary.

Run it as an e2e test of its own, with its own image config: under persist-token the
agent's Vault token is kept on the root disk (root 0600, by design), which the main e2e
test's disk scan rightly counts as a leak. Wiring, for example:

    @pytest.mark.e2e
    def test_encrypted_volumes_end_to_end(image_with_volumes, workdir, openbao):
        disks = volume_vm.make_disks(workdir)
        role_id = openbao.approle("demo", 'path "secret/data/demo/*" { capabilities = ["read"] }',
                                  token_ttl="2h", token_max_ttl="4h")
        ...  # user-data and seed as in test_e2e.py
        machine = ...  # boot(): VM(..., extra drives: for each (volume, serial) in DISKS
                       #  with an image in `disks`: -drive file=<image>,format=raw,if=none,
                       #  id=<serial> -device virtio-blk-pci,drive=<serial>,serial=<serial>),
                       #  wait_ssh, yield the VM, poweroff
        volume_vm.prove(machine, openbao, "demo", disks)
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import hashlib
import json
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

from support.openbao import CANARIES, OpenBao
from support.transit import create_key, decrypt_as_root, delete_key

#: Serial (/dev/disk/by-id/virtio-<serial>) and what is on each disk before the first boot.
DISKS = {"data": "bsvol-data", "preformatted": "bsvol-ext4", "missing": "bsvol-absent"}
DISK_MIB = 64
TRANSIT_MOUNT = "transit"
SECRET_PATH = "demo/volume"  # under the demo role's `secret/data/demo/*` read grant

MESSAGE_IDS = {  # the alerts each bad input must raise (errors.py)
    "not-blank": "64bb98387183496d8a0288723f815bdf",  # 55
    "missing": "828e10e321f54f25888badc6c71be618",  # 54
    "locked": "1a52b0e751ae42bda35d65f7fd42bce5",  # 51
    "rejected": "e0ad47d1f8574517bb24b305fe590e35",  # 53
    "token": "cf97d789113d4e329395dd46c687d9de",  # 57
}

# The writer puts the canary (a secret from Vault, in its environment) on the volume once,
# and logs each start: the second boot shows the data survived. `$$` keeps systemd from
# expanding the variable into argv; `printf` is the shell's builtin, so the value is in no
# process's argv either.
WRITER = (
    'set -e; f=/srv/data/canary.txt; [ -e "$$f" ] || { umask 077; '
    'printf "%%s\\n" "$$VOLUME_CANARY" > "$$f"; }; '
    "echo start >> /srv/data/starts.log; sync; exec sleep infinity"
)
UNITS = {
    "vol-writer.service": f"""\
[Unit]
Description=bootsecrets e2e: writes to the encrypted volume

[Service]
Type=simple
ExecStart=/bin/sh -c '{WRITER}'
""",
    "vol-refused.service": """\
[Unit]
Description=bootsecrets e2e: needs the volume that is not blank

[Service]
Type=simple
ExecStart=/bin/sleep infinity
""",
    "vol-missing.service": """\
[Unit]
Description=bootsecrets e2e: needs the volume that is not attached

[Service]
Type=simple
ExecStart=/bin/sleep infinity
""",
}
VOLUME_UNITS = {
    "data": "vol-writer.service",
    "preformatted": "vol-refused.service",
    "missing": "vol-missing.service",
}


class Guest(Protocol):
    def ssh(
        self, remote: str, *, timeout: float = ..., check: bool = ..., input: str | None = ...
    ) -> subprocess.CompletedProcess[str]: ...


class Machine(Protocol):
    def boot(self) -> contextlib.AbstractContextManager[Guest]: ...


def image_config(base: dict[str, Any]) -> dict[str, Any]:
    """The demo config with the volumes: persist-token (the second boot opens the volume
    unattended), the canary secret, the three units and their volumes."""
    config = copy.deepcopy(base)
    config["reboot_policy"] = "persist-token"
    config["secrets"]["volume"] = f"secret/{SECRET_PATH}"
    for volume, unit in VOLUME_UNITS.items():
        config["services"][unit] = {"environment": {"VOLUME_CANARY": "{{ secrets.volume.canary }}"}}
        config.setdefault("encrypted_volumes", {})[volume] = {
            "device": f"/dev/disk/by-id/virtio-{DISKS[volume]}",
            "mount": f"/srv/{volume}",
            "units": [unit],
            "format": "if-blank",
            **({"attach_timeout": 5} if volume == "missing" else {}),
        }
    return config


def make_disks(workdir: Path) -> dict[str, Path]:
    """The raw images to attach: `data` blank, `preformatted` holding ext4 (`missing` has
    none: its serial is attached to nothing)."""
    disks = {}
    for volume in ("data", "preformatted"):
        image = workdir / f"volume-{volume}.img"
        with image.open("wb") as handle:
            handle.truncate(DISK_MIB << 20)
        disks[volume] = image
    subprocess.run(["mkfs.ext4", "-q", "-F", str(disks["preformatted"])], check=True)
    return disks


@dataclasses.dataclass
class Proof:
    bao: OpenBao
    role: str
    disks: dict[str, Path]
    canary: str
    preformatted_sha: str
    ciphertext: str = ""  # the data volume's token, once read from its header

    @property
    def canary_sha(self) -> str:
        return hashlib.sha256(self.canary.encode() + b"\n").hexdigest()


def prepare(bao: OpenBao, role: str, disks: dict[str, Path]) -> Proof:
    """Before the first boot: the canary secret, the Transit key (named like the role: the
    config's default), and exactly `update` on its three paths added to the role's policy."""
    canary = "VOLUME-CANARY-" + secrets.token_hex(16)
    bao.put("secret", SECRET_PATH, {"canary": canary})  # a leak-guard canary from now on
    create_key(bao, role, TRANSIT_MOUNT)
    set_transit_grant(bao, role, ("datakey/plaintext", "decrypt", "rewrap"))
    return Proof(bao, role, disks, canary, sha256_of(disks["preformatted"]))


def set_transit_grant(bao: OpenBao, role: str, operations: tuple[str, ...]) -> None:
    name = f"{role}-policy"
    sys_api: Any = bao.client.sys  # hvac's sys API is untyped
    text = str(sys_api.read_policy(name=name)["data"]["rules"]).split("\n# transit\n")[0]
    grants = "".join(
        f'path "{TRANSIT_MOUNT}/{op}/{role}" {{ capabilities = ["update"] }}\n' for op in operations
    )
    sys_api.create_or_update_policy(name=name, policy=f"{text}\n# transit\n{grants}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- in the guest ----------------------------------------------------------------------------


def sudo(
    guest: Guest,
    command: str,
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    result = guest.ssh(f"sudo {command}", timeout=timeout, check=False, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"`{command}` exited with {result.returncode}: {result.stderr}")
    return result


def wait_active(guest: Guest, unit: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = guest.ssh(f"systemctl is-active {unit}", check=False).stdout.strip()
        if state == "active":
            return
        time.sleep(2)
    journal = sudo(guest, "journalctl -b -u bootsecrets --no-pager -o cat", check=False)
    raise AssertionError(f"{unit} is {state!r}, not active\n{journal.stdout[-4000:]}")


def is_active(guest: Guest, unit: str) -> str:
    return guest.ssh(f"systemctl is-active {unit}", check=False).stdout.strip()


def status(guest: Guest) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(sudo(guest, "bootsecrets status --json").stdout)
    return doc


def volume_status(guest: Guest) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in status(guest)["volumes"]}


def alerts(guest: Guest, message_id: str) -> list[dict[str, Any]]:
    out = sudo(guest, f"journalctl -b --no-pager -o json MESSAGE_ID={message_id}").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def guest_header(guest: Guest, volume: str) -> dict[str, Any]:
    out = sudo(
        guest, f"cryptsetup luksDump --dump-json-metadata /dev/disk/by-id/virtio-{DISKS[volume]}"
    ).stdout
    header: dict[str, Any] = json.loads(out)
    return header


def refresh(guest: Guest) -> int:
    return sudo(guest, "bootsecrets refresh", check=False).returncode


def first_boot(proof: Proof, guest: Guest) -> None:
    """Formatted, mounted, written; the bad volumes refused; the others up."""
    wait_active(guest, "vol-writer.service")
    volumes = volume_status(guest)
    assert (volumes["data"]["state"], volumes["data"]["key_version"]) == ("mounted", 1), volumes
    assert volumes["preformatted"]["state"] == "not-bootsecrets", volumes
    assert volumes["missing"]["state"] == "absent", volumes
    for unit in ("vol-refused.service", "vol-missing.service"):
        assert is_active(guest, unit) != "active", unit
    others = [u["unit"] for u in status(guest)["units"] if u["unit"] not in UNITS]
    assert others and all(is_active(guest, u) == "active" for u in others), others
    for kind, volume in (("not-blank", "preformatted"), ("missing", "missing")):
        assert [a.get("VOLUME") for a in alerts(guest, MESSAGE_IDS[kind])] == [volume], kind
    # The canary is on the volume, through dm-crypt, mounted by PID 1 from /dev/mapper/data.
    assert sudo(guest, "sha256sum /srv/data/canary.txt").stdout.split()[0] == proof.canary_sha
    mount = sudo(guest, "findmnt -n -o SOURCE,FSTYPE /srv/data").stdout.split()
    assert mount == ["/dev/mapper/data", "ext4"], mount
    types = sudo(guest, "lsblk -n -o TYPE /dev/mapper/data").stdout.split()
    assert types == ["crypt"], types
    shown = guest.ssh("systemctl show -p BindsTo -p After vol-writer.service", check=False)
    bound = dict(line.partition("=")[::2] for line in shown.stdout.splitlines())
    assert "srv-data.mount" in bound["BindsTo"].split(), shown.stdout
    assert "srv-data.mount" in bound["After"].split(), shown.stdout
    header = guest_header(guest, "data")
    assert [t["type"] for t in header["tokens"].values()] == ["bootsecrets-transit"]
    # Fail closed by hand too: the refused volume's unit cannot be started.
    manual = sudo(guest, "systemctl start vol-refused.service", check=False)
    assert manual.returncode != 0 and "srv-preformatted.mount" in manual.stderr, manual.stderr


def after_first_poweroff(proof: Proof) -> None:
    """On the host: the raw volume holds the token and no plaintext; the refused disk is
    byte for byte what it was; the data key is nowhere on the image."""
    image = proof.disks["data"]
    header = raw_header(image)
    assert list(header["keyslots"]) == ["0"]
    assert header["keyslots"]["0"]["kdf"]["type"] == "pbkdf2"
    [token] = header["tokens"].values()
    assert token["type"] == "bootsecrets-transit" and token["key_name"] == proof.role
    proof.ciphertext = token["ciphertext"]
    raw = image.read_bytes()
    assert raw.count(proof.canary.encode()) == 0, "the canary is on the raw volume in clear"
    answer = decrypt_as_root(proof.bao, proof.role, proof.ciphertext, TRANSIT_MOUNT)
    assert answer.status_code == 200, answer.text
    key = base64.b64decode(answer.json()["data"]["plaintext"])  # a canary (decrypt_as_root)
    assert raw.count(key) == 0 and raw.count(key.hex().encode()) == 0
    assert sha256_of(proof.disks["preformatted"]) == proof.preformatted_sha


def second_boot(proof: Proof, guest: Guest) -> None:
    """persist-token: opened again unattended, data intact; then decrypt denied, a tampered
    token (ciphertext, then a field), repaired; then decommission."""
    wait_active(guest, "vol-writer.service")
    assert sudo(guest, "sha256sum /srv/data/canary.txt").stdout.split()[0] == proof.canary_sha
    assert sudo(guest, "cat /srv/data/starts.log").stdout.split() == ["start", "start"]
    device = f"/dev/disk/by-id/virtio-{DISKS['data']}"
    original = sudo(guest, f"cryptsetup token export --token-id 0 {device}").stdout

    def lock() -> None:  # as after a reboot, without one
        sudo(guest, "systemctl stop srv-data.mount")
        assert is_active(guest, "vol-writer.service") != "active"  # BindsTo= stopped it
        sudo(guest, "cryptsetup close data")

    def import_token(text: str) -> None:
        sudo(
            guest,
            f"cryptsetup token import --json-file=- --token-id 0 --token-replace {device}",
            input=text,
        )

    # Decrypt denied: 51, the writer down, the others up.
    lock()
    set_transit_grant(proof.bao, proof.role, ("datakey/plaintext", "rewrap"))
    assert refresh(guest) == 51
    assert is_active(guest, "vol-writer.service") != "active"
    assert volume_status(guest)["data"]["state"] == "closed"
    assert alerts(guest, MESSAGE_IDS["locked"])[-1].get("VOLUME") == "data"
    set_transit_grant(proof.bao, proof.role, ("datakey/plaintext", "decrypt", "rewrap"))

    # The ciphertext altered: Transit rejects it, 53. A field altered: 57.
    data = json.loads(original)
    raw = bytearray(base64.b64decode(data["ciphertext"].split(":")[2]))
    raw[20] ^= 0x55
    prefix = data["ciphertext"].rsplit(":", 1)[0]
    import_token(json.dumps({**data, "ciphertext": f"{prefix}:{base64.b64encode(raw).decode()}"}))
    assert refresh(guest) == 53
    assert alerts(guest, MESSAGE_IDS["rejected"])[-1].get("VOLUME") == "data"
    import_token(json.dumps({**data, "key_version": 9}))
    assert refresh(guest) == 57
    assert alerts(guest, MESSAGE_IDS["token"])[-1].get("VOLUME") == "data"
    assert is_active(guest, "vol-writer.service") != "active"

    # Repaired: the hardened refresh unit (with the sandbox drop-in) opens and mounts it and
    # starts the writer; it exits 55 (the refused volume, first in the config), which the
    # unit counts as success.
    import_token(original)
    sudo(guest, "systemctl start bootsecrets-refresh.service")
    wait_active(guest, "vol-writer.service", 60)
    assert sudo(guest, "cat /srv/data/starts.log").stdout.split() == ["start"] * 3

    # Decommission: unmounted, closed, erased; no keyslot, no token.
    result = sudo(guest, "bootsecrets decommission --yes --json", check=False)
    steps = {s["step"]: s for s in json.loads(result.stdout)["steps"]}
    for step in ("unmount-volumes", "close-volumes", "erase-volumes"):
        assert steps[step]["outcome"] == "done", steps[step]
    header = guest_header(guest, "data")
    assert header["keyslots"] == {} and header["tokens"] == {}
    assert sudo(guest, "cryptsetup status data", check=False).returncode == 4

    # Crypto-shred: the Transit key deleted, the token saved before the erase is worthless.
    delete_key(proof.bao, proof.role, TRANSIT_MOUNT)
    refused = decrypt_as_root(proof.bao, proof.role, proof.ciphertext, TRANSIT_MOUNT)
    assert refused.status_code == 400 and "encryption key not found" in refused.text


def after_second_poweroff(proof: Proof) -> None:
    header = raw_header(proof.disks["data"])
    assert header["keyslots"] == {} and header["tokens"] == {}
    raw = proof.disks["data"].read_bytes()
    assert raw.count(proof.canary.encode()) == 0
    assert raw.count(proof.ciphertext.encode()) == 0
    assert sha256_of(proof.disks["preformatted"]) == proof.preformatted_sha


def raw_header(image: Path) -> dict[str, Any]:
    """The LUKS2 metadata of a raw volume image, read on the host (no device-mapper)."""
    out = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", str(image)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    header: dict[str, Any] = json.loads(out)
    return header


def prove(machine: Machine, bao: OpenBao, role: str, disks: dict[str, Path]) -> Proof:
    """The whole proof: call after the role exists and before the first boot."""
    proof = prepare(bao, role, disks)
    with machine.boot() as guest:
        first_boot(proof, guest)
    after_first_poweroff(proof)
    with machine.boot() as guest:
        second_boot(proof, guest)
    after_second_poweroff(proof)
    assert proof.canary in CANARIES
    return proof
