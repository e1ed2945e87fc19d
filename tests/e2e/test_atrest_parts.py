"""What of the VM's data-at-rest proof (e2e_atrest.py) can be checked on this host: the image
config it builds is one the agent accepts and the build derives the right packages and
drop-ins from, the demo units verify with systemd next to the agent's drop-ins for them,
the Transit grant it edits lands in the real OpenBao, and its raw-image checks pass on a
real LUKS2 header and catch what they look for."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import e2e_atrest as atrest
import pytest

from bootsecrets import blockdev, imagesetup, luks
from bootsecrets.config import parse_config
from bootsecrets.volconfig import Format
from support.openbao import OpenBao
from support.transit import create_key

REPO = Path(__file__).resolve().parents[2]


def config_text() -> str:
    return atrest.image_config((REPO / "packer/demo/config.yaml").read_text())


def test_the_image_config_is_one_the_agent_accepts() -> None:
    text = config_text()
    config = parse_config(text.encode(), "config.yaml")
    assert str(config.vault.ca_cert) == "/etc/bootsecrets/vault-ca.pem"
    [directory] = config.directories
    assert (directory.name, str(directory.path), directory.units) == (
        "records",
        atrest.RECORDS_DIR,
        (atrest.RECORDS,),
    )
    [volume] = config.volumes
    assert (volume.name, str(volume.device), str(volume.mount), volume.format) == (
        atrest.VOLUME,
        f"/dev/disk/by-id/virtio-{atrest.VOLUME_SERIAL}",
        atrest.VOLUME_MOUNT,
        Format.IF_BLANK,
    )
    assert volume.attach_timeout == atrest.ATTACH_TIMEOUT
    assert len(atrest.VOLUME_SERIAL) <= 20  # virtio-blk's limit
    assert {s.unit for s in config.services} == {"demo-a.service", "demo-b.service", *atrest.PORTS}
    # The demo config's lines are all still there (the disk scan's positive control is one).
    demo = (REPO / "packer/demo/config.yaml").read_text()
    assert all(line in text.splitlines() for line in demo.splitlines())


def test_the_build_derives_cryptsetup_and_the_sandbox_drop_ins(tmp_path: Path) -> None:
    config = parse_config(config_text().encode(), "config.yaml")
    assert imagesetup.packages(config) == ["cryptsetup-bin"]
    written = imagesetup.install(config, REPO / "systemd", tmp_path)
    units = tmp_path / "etc/systemd/system"
    assert sorted(str(p.relative_to(tmp_path)) for p in written) == [
        "etc/systemd/system/bootsecrets-refresh.service.d/encrypted-directories.conf",
        "etc/systemd/system/bootsecrets-refresh.service.d/encrypted-volumes.conf",
        "etc/systemd/system/bootsecrets.service.d/encrypted-directories.conf",
        "etc/systemd/system/bootsecrets.service.d/encrypted-volumes.conf",
        "var/lib/bootsecrets-demo",
    ]
    shipped = (REPO / "systemd/encrypted-volumes.conf").read_text()
    for unit in imagesetup.AGENT_UNITS:
        assert (units / f"{unit}.d/encrypted-volumes.conf").read_text() == shipped
        rw = (units / f"{unit}.d/encrypted-directories.conf").read_text()
        assert "ReadWritePaths=/var/lib/bootsecrets-demo\n" in rw
    # systemd's own parser: the agent's units with these drop-ins verify without a warning.
    for unit in (*imagesetup.AGENT_UNITS, "bootsecrets-store.service"):
        (units / unit).write_text((REPO / "systemd" / unit).read_text())
    result = subprocess.run(
        [
            "systemd-analyze",
            "verify",
            "--man=no",
            *(str(units / u) for u in imagesetup.AGENT_UNITS),
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
    )
    shown = "\n".join(
        line for line in result.stderr.splitlines() if "/usr/local/sbin/bootsecrets" not in line
    )
    assert shown == "", result.stderr


def test_the_demo_units_verify_with_the_agents_drop_ins(tmp_path: Path) -> None:
    """As the agent writes them at run time: the volume unit bound to its mount."""
    units = tmp_path / "units"
    units.mkdir()
    for unit in atrest.PORTS:
        (units / unit).write_text((REPO / "packer/demo" / unit).read_text())
    mount = blockdev.unit_name_for(Path(atrest.VOLUME_MOUNT))
    assert mount == "srv-uploads.mount"  # what e2e_atrest stops and checks by name
    (units / f"{atrest.UPLOADS}.d").mkdir()
    (units / f"{atrest.UPLOADS}.d" / blockdev.VOLUME_DROPIN).write_text(
        blockdev.dependency_dropin([mount])
    )
    (units / mount).write_text(
        f"[Mount]\nWhat=/dev/mapper/{atrest.VOLUME}\nWhere={atrest.VOLUME_MOUNT}\nType=ext4\n"
    )
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(str(units / u) for u in atrest.PORTS)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{units}:"},
    )
    # The demo app and its user are in the image, not on this host.
    shown = [
        line
        for line in result.stderr.splitlines()
        if "demo-app.py" not in line and "bootsecrets-demo" not in line
    ]
    assert result.returncode in (0, 1) and shown == [], result.stderr


def test_the_transit_grant_is_replaced_not_added_to(openbao: OpenBao) -> None:
    reads = 'path "secret/data/demo/*" { capabilities = ["read"] }\n'
    openbao.approle(atrest.ROLE, atrest.policy(reads, atrest.ALL_TRANSIT))
    atrest.set_transit_grant(openbao, ("datakey/plaintext", "rewrap"))
    sys_api: Any = openbao.client.sys
    text = sys_api.read_policy(name=f"{atrest.ROLE}-policy")["data"]["rules"]
    assert text.count('path "secret/data/demo/*"') == 1
    assert text.count(f'path "pki/issue/{atrest.PKI_ROLE}"') == 1
    assert f'path "transit/rewrap/{atrest.ROLE}"' in text
    assert f"transit/decrypt/{atrest.ROLE}" not in text
    atrest.set_transit_grant(openbao, atrest.ALL_TRANSIT)
    text = sys_api.read_policy(name=f"{atrest.ROLE}-policy")["data"]["rules"]
    assert text.count(f"transit/decrypt/{atrest.ROLE}") == 1


def test_the_raw_volume_checks(tmp_path: Path, openbao: OpenBao, unique: str) -> None:
    """On a header formatted here with a real Transit ciphertext of its key: the checks
    pass; with the canary in clear in the image, or a keyslot left, they fail."""
    create_key(openbao, unique)
    image = atrest.blank_volume(tmp_path / "volume.img")
    key = bytearray(os.urandom(64))
    response: Any = openbao.client.adapter.post(  # hvac's JSON adapter: a dict
        f"/v1/transit/encrypt/{unique}", json={"plaintext": base64.b64encode(key).decode()}
    )
    ciphertext = str(response["data"]["ciphertext"])
    luks.format_volume(image, key, luks.TransitToken("transit", unique, 1, ciphertext))
    canary = "UPLOADS-" + unique
    assert atrest.volume_image_holds_no_plaintext(openbao, image, canary, unique) == ciphertext
    with pytest.raises(AssertionError):
        atrest.volume_image_erased(image, canary, ciphertext)  # keyslot and token still there
    with image.open("r+b") as handle:
        handle.seek(20 << 20)
        handle.write(atrest.file_name(canary).encode())
    with pytest.raises(AssertionError):
        atrest.volume_image_holds_no_plaintext(openbao, image, canary, unique)
    luks.erase(image)
    with pytest.raises(AssertionError):
        atrest.volume_image_erased(image, atrest.file_name(canary), ciphertext)
    with image.open("r+b") as handle:
        handle.seek(20 << 20)
        handle.write(b"\0" * 64)
    atrest.volume_image_erased(image, canary, ciphertext)


def test_a_tampered_token_differs_where_it_should() -> None:
    token = json.dumps(
        {
            "type": "bootsecrets-transit",
            "key_version": 1,
            "ciphertext": "vault:v1:" + base64.b64encode(bytes(40)).decode(),
        }
    )
    changed = json.loads(atrest.tampered(token, field=False))
    raw = base64.b64decode(changed["ciphertext"].rpartition(":")[2])
    assert changed["ciphertext"].startswith("vault:v1:") and raw[20] == 0x55 and raw.count(0) == 39
    assert json.loads(atrest.tampered(token, field=True))["key_version"] == 9


def test_the_data_file_name_is_what_the_demo_app_writes(tmp_path: Path) -> None:
    canary = "RECORDS-x"
    result = subprocess.run(
        [
            "python3",
            "-c",
            "import importlib.util, pathlib, sys; "
            "spec = importlib.util.spec_from_file_location('demo_app', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "print(m.write_data(pathlib.Path(sys.argv[2])))",
            str(REPO / "packer/demo/demo-app.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DEMO_CANARY": canary},
    )
    assert result.stdout.strip() == atrest.file_name(canary)
    assert (tmp_path / atrest.file_name(canary)).read_text() == canary + "\n"
