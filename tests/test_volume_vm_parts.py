"""What of the VM proof (tests/volume_vm.py) can be checked on this host: the image config it
hands the harness is one the agent accepts, its units and their drop-ins verify with
systemd, the disks it makes are what it says, the Transit grant it edits lands in the real
OpenBao, and its raw-image checks pass on an erased header and catch a canary in clear."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

import volume_vm
from bootsecrets import blockdev, luks
from bootsecrets.config import parse_config
from bootsecrets.volconfig import Format
from support.openbao import OpenBao

REPO = Path(__file__).resolve().parent.parent


def demo_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((REPO / "packer/demo/config.yaml").read_text())
    return loaded


def test_the_image_config_is_one_the_agent_accepts() -> None:
    config = parse_config(
        yaml.safe_dump(volume_vm.image_config(demo_config())).encode(), "config.yaml"
    )
    assert config.reboot_policy.value == "persist-token"
    assert {v.name: (str(v.device), str(v.mount), v.units, v.format) for v in config.volumes} == {
        "data": (
            "/dev/disk/by-id/virtio-bsvol-data",
            "/srv/data",
            ("vol-writer.service",),
            Format.IF_BLANK,
        ),
        "preformatted": (
            "/dev/disk/by-id/virtio-bsvol-ext4",
            "/srv/preformatted",
            ("vol-refused.service",),
            Format.IF_BLANK,
        ),
        "missing": (
            "/dev/disk/by-id/virtio-bsvol-absent",
            "/srv/missing",
            ("vol-missing.service",),
            Format.IF_BLANK,
        ),
    }
    assert {v.name: v.attach_timeout for v in config.volumes} == {
        "data": 60.0,
        "preformatted": 60.0,
        "missing": 5.0,
    }
    assert demo_config()["reboot_policy"] == "reprovision"  # the base is not changed


def test_the_units_and_their_bindings_verify(tmp_path: Path) -> None:
    units = tmp_path / "units"
    units.mkdir()
    for name, text in volume_vm.UNITS.items():
        (units / name).write_text(text)
        volume = next(v for v, u in volume_vm.VOLUME_UNITS.items() if u == name)
        mount = blockdev.unit_name_for(Path(f"/srv/{volume}"))
        (units / f"{name}.d").mkdir()
        (units / f"{name}.d" / blockdev.VOLUME_DROPIN).write_text(
            blockdev.dependency_dropin([mount])
        )
        (units / mount).write_text(
            f"[Mount]\nWhat=/dev/mapper/{volume}\nWhere=/srv/{volume}\nType=ext4\n"
        )
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"}
    for name in volume_vm.UNITS:
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", str(units / name)],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        assert result.returncode == 0 and result.stderr == "", result.stderr
    writer = volume_vm.UNITS["vol-writer.service"]
    assert "$$VOLUME_CANARY" in writer and "${VOLUME_CANARY}" not in writer


def test_the_disks(tmp_path: Path) -> None:
    disks = volume_vm.make_disks(tmp_path)
    assert luks.probe(disks["data"]).blank
    assert luks.probe(disks["preformatted"]).signatures == ("ext4",)
    assert set(volume_vm.DISKS) == set(volume_vm.VOLUME_UNITS)
    assert all(len(serial) <= 20 for serial in volume_vm.DISKS.values())  # virtio-blk's limit


def test_the_transit_grant_is_replaced_not_added_to(openbao: OpenBao, unique: str) -> None:
    role = f"role-{unique}"
    openbao.approle(role, 'path "secret/data/demo/*" { capabilities = ["read"] }\n')
    volume_vm.set_transit_grant(openbao, role, ("datakey/plaintext", "decrypt", "rewrap"))
    volume_vm.set_transit_grant(openbao, role, ("datakey/plaintext", "rewrap"))
    sys_api: Any = openbao.client.sys
    text = sys_api.read_policy(name=f"{role}-policy")["data"]["rules"]
    assert text.count('path "secret/data/demo/*"') == 1
    assert f'path "transit/rewrap/{role}"' in text
    assert f"transit/decrypt/{role}" not in text


def test_the_raw_image_checks(tmp_path: Path, openbao: OpenBao) -> None:
    """On a header formatted and erased here: the checks pass; with the canary written in
    clear into the image they fail."""
    disks = volume_vm.make_disks(tmp_path)
    proof = volume_vm.Proof(
        openbao,
        "unused",
        disks,
        "VOLUME-CANARY-" + "ab" * 16,
        volume_vm.sha256_of(disks["preformatted"]),
        "vault:v1:" + "Q" * 40,
    )
    key = bytearray(os.urandom(64))
    token = luks.TransitToken("transit", "unused", 1, proof.ciphertext)
    luks.format_volume(disks["data"], key, token)
    assert volume_vm.raw_header(disks["data"])["tokens"]["0"]["ciphertext"] == proof.ciphertext
    with pytest.raises(AssertionError):
        volume_vm.after_second_poweroff(proof)  # keyslot and token still there
    luks.erase(disks["data"])
    volume_vm.after_second_poweroff(proof)
    with disks["data"].open("r+b") as handle:
        handle.seek(20 << 20)
        handle.write(proof.canary.encode())
    with pytest.raises(AssertionError):
        volume_vm.after_second_poweroff(proof)
