"""Data at rest and a leased certificate in the end-to-end VM: the image config's additions,
what OpenBao needs for them, and one function per property of a guest (as e2e_checks).

The e2e image config is packer/demo/config.yaml plus (`image_config()`):
- `encrypted_directories.records`: an fscrypt directory on the root disk for
  demo-records.service, which writes a canary from Vault into it;
- `encrypted_volumes.uploads`: LUKS2 on a second virtio disk (serial `VOLUME_SERIAL`),
  formatted at first use, mounted at /srv/uploads for demo-uploads.service, which writes
  another canary there;
- `secrets.tls`: a certificate from OpenBao's PKI engine for demo-tls.service (HTTPS).
The build derives the rest (cryptsetup-bin, the agent's sandbox drop-ins) from it.

Nothing here passes a canary, a key or a file name derived from a canary to the guest in
argv (sudo logs command lines in the journal, on the disk): the guest is asked for digests,
and globs stand for names.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

from e2e_vm import VM

from bootsecrets import errors
from support.openbao import OpenBao
from support.transit import create_key, decrypt_as_root, delete_key

ROLE = "demo"  # packer/demo/config.yaml: approle.role; also the Transit key (the default)
TRANSIT_MOUNT = "transit"
PKI_ROLE = "demo"
TLS_NAME = "demo.bootsecrets.test"
DATA_SECRET = "demo/data"  # secret/demo/data: the two canaries
RECORDS_DIR = "/var/lib/bootsecrets-demo/records"
VOLUME = "uploads"
VOLUME_SERIAL = "bsvol-uploads"  # /dev/disk/by-id/virtio-<serial>; at most 20 characters
VOLUME_MOUNT = "/srv/uploads"
VOLUME_MIB = 64
ATTACH_TIMEOUT = 15
RECORDS, UPLOADS, TLS = "demo-records.service", "demo-uploads.service", "demo-tls.service"
PORTS = {RECORDS: 8083, UPLOADS: 8084, TLS: 8443}

#: Inserted into the demo config: (after this line, these lines).
_INSERTS = (
    ("  request_timeout: 10\n", "  ca_cert: /etc/bootsecrets/vault-ca.pem\n", True),
    ("  secret: kv-v2\n", "  pki: pki\n", False),
    (
        "secrets:\n",
        f"  data: secret/{DATA_SECRET}\n"
        f"  tls:\n    path: pki/issue/{PKI_ROLE}\n    common_name: {TLS_NAME}\n    ttl: 2h\n",
        False,
    ),
)
#: Appended: services is the demo config's last section.
_APPENDED = f"""\
  {RECORDS}:
    environment:
      DEMO_CANARY: "{{{{ secrets.data.records }}}}"
  {UPLOADS}:
    environment:
      DEMO_CANARY: "{{{{ secrets.data.uploads }}}}"
  {TLS}:
    credentials:
      tls.crt: "{{{{ secrets.tls.certificate }}}}\\n{{{{ secrets.tls.ca_chain }}}}\\n"
      tls.key: "{{{{ secrets.tls.private_key }}}}\\n"
    on_change: restart
encrypted_directories:
  records:
    path: {RECORDS_DIR}
    user: bootsecrets-demo
    group: bootsecrets-demo
    mode: "0700"
    units: [{RECORDS}]
encrypted_volumes:
  {VOLUME}:
    device: /dev/disk/by-id/virtio-{VOLUME_SERIAL}
    mount: {VOLUME_MOUNT}
    units: [{UPLOADS}]
    format: if-blank
    user: bootsecrets-demo
    group: bootsecrets-demo
    mode: "0700"
    attach_timeout: {ATTACH_TIMEOUT}
"""


def image_config(demo_config: str) -> str:
    """The e2e image config: the demo's, verifying Vault with the test's CA, plus the
    directory, the volume and the certificate."""
    text = demo_config
    for anchor, lines, before in _INSERTS:
        assert text.count(anchor) == 1, anchor
        text = text.replace(anchor, lines + anchor if before else anchor + lines)
    assert text.rstrip("\n").splitlines()[-1].startswith("        "), "services is not last"
    return text.rstrip("\n") + "\n" + _APPENDED


def policy(secret_read: str, transit: tuple[str, ...]) -> str:
    """The role's policy: the demo's reads, the certificate, and `update` on these Transit
    operations of its key (below a marker, so that `set_transit_grant` can replace them)."""
    return f'{secret_read}path "pki/issue/{PKI_ROLE}" {{ capabilities = ["update"] }}\n' + (
        _transit_grants(transit)
    )


def _transit_grants(transit: tuple[str, ...]) -> str:
    return "# transit\n" + "".join(
        f'path "{TRANSIT_MOUNT}/{op}/{ROLE}" {{ capabilities = ["update"] }}\n' for op in transit
    )


ALL_TRANSIT = ("datakey/plaintext", "decrypt", "rewrap")


def set_transit_grant(bao: OpenBao, transit: tuple[str, ...]) -> None:
    """The role's policy with exactly these Transit operations (the rest unchanged)."""
    sys_api: Any = bao.client.sys  # hvac's sys API is untyped
    name = f"{ROLE}-policy"
    text = str(sys_api.read_policy(name=name)["data"]["rules"]).split("# transit\n")[0]
    sys_api.create_or_update_policy(name=name, policy=text + _transit_grants(transit))


def prepare_vault(bao: OpenBao, tag: str) -> dict[str, str]:
    """Transit key, the canaries; returns them (a leak-guard canary each, via bao.put)."""
    canaries = {"records": f"RECORDS-{tag}-{'r' * 8}", "uploads": f"UPLOADS-{tag}-{'u' * 8}"}
    bao.put("secret", DATA_SECRET, canaries)
    create_key(bao, ROLE, TRANSIT_MOUNT)
    return canaries


def file_name(canary: str) -> str:
    """What demo-app.py names the file it writes the canary into."""
    return f"notes-{hashlib.sha256(canary.encode()).hexdigest()[:16]}.txt"


def sha(data: str) -> str:
    return hashlib.sha256(data.encode()).hexdigest()


# --- in the guest ---------------------------------------------------------------------------


def writes_data(vm: VM, unit: str, canary: str, starts: int, timeout: float) -> dict[str, Any]:
    """The unit runs with the canary and reads it back from its data file, written at its
    first start; it was started at least `starts` times since (its report)."""
    doc: dict[str, Any] = vm.wait_http(
        PORTS[unit], timeout, until=lambda d: d.get("data", {}).get("starts", 0) >= starts
    )
    assert doc["unit"] == unit
    assert doc["sha256"] == {"DEMO_CANARY": sha(canary)}, unit
    expected = {"file": file_name(canary), "sha256": sha(canary + "\n")}
    assert {k: doc["data"][k] for k in expected} == expected, unit
    return doc


def status_of(vm: VM) -> dict[str, Any]:
    doc: dict[str, Any] = vm.sudo_json("bootsecrets", "status", "--json")
    return doc


def directory_unlocked(vm: VM) -> None:
    """fscrypt's flag on the directory (the kernel's view) and the agent's."""
    flags = vm.sudo("lsattr", "-d", RECORDS_DIR).split()[0]
    assert "E" in flags, flags
    [directory] = status_of(vm)["directories"]
    assert (directory["name"], directory["state"], directory["key_version"]) == (
        "records",
        "unlocked",
        1,
    ), directory


def directory_unreadable(vm: VM, canary: str) -> None:
    """Encrypted, without its key: the names are ciphertext and no entry can be read."""
    flags = vm.sudo("lsattr", "-d", RECORDS_DIR).split()[0]
    assert "E" in flags, flags
    names = vm.sudo("ls", "-A", RECORDS_DIR).split()
    assert len(names) == 2 and file_name(canary) not in names and "starts.log" not in names, names
    read = vm.ssh(f"sudo sh -c 'cat {RECORDS_DIR}/*'", check=False)
    assert read.returncode != 0 and "Required key not available" in read.stderr, read.stderr


def directory_locked(vm: VM, canary: str) -> None:
    directory_unreadable(vm, canary)
    [directory] = status_of(vm)["directories"]
    assert directory["state"] == "locked", directory


def volume_mounted(vm: VM) -> None:
    """Through dm-crypt, mounted by PID 1; the agent says so; the token is in the header."""
    mount = vm.sudo("findmnt", "-n", "-o", "SOURCE,FSTYPE", VOLUME_MOUNT).split()
    assert mount == [f"/dev/mapper/{VOLUME}", "ext4"], mount
    assert vm.sudo("lsblk", "-n", "-o", "TYPE", f"/dev/mapper/{VOLUME}").split() == ["crypt"]
    [volume] = status_of(vm)["volumes"]
    assert (volume["state"], volume["open"], volume["mounted"]) == ("mounted", True, True), volume
    shown = vm.unit(UPLOADS, "BindsTo", "After")
    assert "srv-uploads.mount" in shown["BindsTo"].split(), shown
    assert "srv-uploads.mount" in shown["After"].split(), shown
    header = guest_header(vm)
    assert [t["type"] for t in header["tokens"].values()] == ["bootsecrets-transit"]


def volume_closed(vm: VM) -> None:
    assert vm.ssh(f"test -e /dev/mapper/{VOLUME}", check=False).returncode == 1
    [volume] = status_of(vm)["volumes"]
    assert (volume["open"], volume["mounted"]) == (False, False), volume


def guest_header(vm: VM) -> dict[str, Any]:
    out = vm.sudo(
        "cryptsetup", "luksDump", "--dump-json-metadata", f"/dev/disk/by-id/virtio-{VOLUME_SERIAL}"
    )
    header: dict[str, Any] = json.loads(out)
    return header


def certificate_served(vm: VM, ca_pem: str, timeout: float) -> tuple[dict[str, Any], bytes]:
    """A TLS handshake with demo-tls through the forwarded port: the certificate verifies
    against the PKI's CA and names TLS_NAME (the client checks both); the report and the
    certificate (DER)."""
    context = ssl.create_default_context(cadata=ca_pem)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with (
                socket.create_connection(("127.0.0.1", vm.ports[PORTS[TLS]]), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=TLS_NAME) as tls,
            ):
                peer = tls.getpeercert(binary_form=True)
                tls.sendall(f"GET / HTTP/1.0\r\nHost: {TLS_NAME}\r\n\r\n".encode())
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
            break
        except (ConnectionError, TimeoutError, ssl.SSLEOFError):
            if time.monotonic() > deadline:
                raise
            time.sleep(3)
    assert peer is not None
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head[:80]
    doc: dict[str, Any] = json.loads(body)
    assert doc["unit"] == TLS and set(doc["credentials"]) == {"tls.crt", "tls.key"}, doc
    return doc, peer


def certificate_scheduled(vm: VM, certificate_ttl: float) -> None:
    """`status --json` has the certificate with its next re-issue at 2/3 of its life, and
    the agent's own wake-up timer is armed no later than that."""
    doc = status_of(vm)
    [cert] = [lease for lease in doc["leases"] if lease["name"] == "tls"]
    assert cert["kind"] == "certificate" and cert["serial_number"], cert
    life = cert["expires_at"] - cert["issued_at"]
    assert abs(life - certificate_ttl) < 120, cert  # not_before is backdated 30 s
    assert cert["next_action"] == "reissue", cert
    assert abs(cert["next_action_at"] - (cert["issued_at"] + life * 2 / 3)) < 120, cert
    assert doc["wakeup_at"] is not None and doc["wakeup_at"] <= cert["next_action_at"] + 1, doc
    timer = vm.unit("bootsecrets-wakeup.timer", "ActiveState")
    assert timer["ActiveState"] == "active", timer


def refresh_alerts(vm: VM, kind: type[errors.BootsecretsError]) -> None:
    """The refresh timer's hardened unit exits with this outcome's code (which it counts as
    a success) and journals one alert naming the volume; the volume's unit stays down (the
    volume is closed), every other unit runs. (From a shell, `bootsecrets refresh` prints
    the alert on stderr instead: the journal is for runs under systemd.)"""
    assert kind.message_id
    match = f"MESSAGE_ID={kind.message_id}"
    before = len(vm.journal(match))
    vm.sudo("systemctl", "start", "bootsecrets-refresh.service", timeout=300)
    state = vm.unit("bootsecrets-refresh.service", "Result", "ExecMainStatus")
    assert state == {"Result": "success", "ExecMainStatus": str(kind.exit_code)}, state
    deadline = time.monotonic() + 30
    while len(entries := vm.journal(match)) == before and time.monotonic() < deadline:
        time.sleep(2)  # journald may not have written it yet
    assert len(entries) == before + 1, entries[before:]
    assert (entries[-1]["PRIORITY"], entries[-1].get("VOLUME")) == ("1", VOLUME), entries[-1]
    assert vm.unit(UPLOADS, "ActiveState")["ActiveState"] != "active"
    volume_closed(vm)
    for unit in others_than(UPLOADS):
        assert vm.unit(unit, "ActiveState")["ActiveState"] == "active", unit


def others_than(unit: str) -> list[str]:
    return [u for u in ("demo-a.service", "demo-b.service", *PORTS) if u != unit]


def volume_faults(vm: VM, bao: OpenBao) -> None:
    """On a running guest whose volume is in use: decrypt denied (51), the token's
    ciphertext altered (53) or one of its fields (57), the device path wrong (54); each
    fails closed for the volume's unit only. Then the hardened refresh unit (with the
    sandbox drop-in the build installed) opens and mounts it again."""
    device = f"/dev/disk/by-id/virtio-{VOLUME_SERIAL}"
    exported = vm.sudo("cryptsetup", "token", "export", "--token-id", "0", device)
    lock_volume(vm)
    set_transit_grant(bao, ("datakey/plaintext", "rewrap"))
    refresh_alerts(vm, errors.DataLocked)
    set_transit_grant(bao, ALL_TRANSIT)
    import_token(vm, tampered(exported, field=False))
    refresh_alerts(vm, errors.DataKeyRejected)
    import_token(vm, tampered(exported, field=True))
    refresh_alerts(vm, errors.VolumeTokenInvalid)
    import_token(vm, exported)
    config = "/etc/bootsecrets/config.yaml"
    vm.sudo("sed", "-i", f"s|virtio-{VOLUME_SERIAL}$|virtio-bsvol-absent|", config)
    refresh_alerts(vm, errors.VolumeMissing)
    vm.sudo("sed", "-i", f"s|virtio-bsvol-absent$|virtio-{VOLUME_SERIAL}|", config)
    vm.sudo("systemctl", "start", "bootsecrets-refresh.service", timeout=300)
    state = vm.unit("bootsecrets-refresh.service", "Result", "ExecMainStatus")
    assert state == {"Result": "success", "ExecMainStatus": "0"}, state
    volume_mounted(vm)


def decommission(vm: VM, canary: str) -> str:
    """`bootsecrets decommission` in the guest: every step done; the directory unreadable,
    the volume's header without keyslot or token. Returns the directory's Transit
    ciphertext, saved before (the key record is removed)."""
    record = vm.sudo_json("cat", "/var/lib/bootsecrets/keys/records.json")
    result = vm.ssh("sudo bootsecrets decommission --yes --json", timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    steps = {s["step"]: s["outcome"] for s in json.loads(result.stdout)["steps"]}
    for step in (
        "stop-units",
        "unmount-volumes",
        "close-volumes",
        "erase-volumes",
        "lock-keys",
        "remove-key-records",
        "remove-store",
        "revoke-token",
    ):
        assert steps.get(step) == "done", (step, steps)
    directory_unreadable(vm, canary)
    header = guest_header(vm)
    assert header["keyslots"] == {} and header["tokens"] == {}, header
    assert vm.ssh(f"test -e /dev/mapper/{VOLUME}", check=False).returncode == 1
    return str(record["ciphertext"])


def shredded(bao: OpenBao, ciphertexts: list[str]) -> None:
    """The Transit key deleted (the operator's last step): what was saved before the
    decommission no longer decrypts."""
    delete_key(bao, ROLE, TRANSIT_MOUNT)
    for ciphertext in ciphertexts:
        refused = decrypt_as_root(bao, ROLE, ciphertext, TRANSIT_MOUNT)
        assert refused.status_code == 400 and "encryption key not found" in refused.text


def lock_volume(vm: VM) -> None:
    """As after a reboot, without one: unmounted (BindsTo= stops its unit) and closed."""
    vm.sudo("systemctl", "stop", "srv-uploads.mount")
    assert vm.unit(UPLOADS, "ActiveState")["ActiveState"] != "active"
    vm.sudo("cryptsetup", "close", VOLUME)


def import_token(vm: VM, text: str) -> None:
    vm.ssh(
        "sudo cryptsetup token import --json-file=- --token-id 0 --token-replace "
        f"/dev/disk/by-id/virtio-{VOLUME_SERIAL}",
        input=text,
    )


def tampered(token: str, *, field: bool) -> str:
    """The exported token with a byte of its ciphertext flipped, or with a field changed."""
    data = json.loads(token)
    if field:
        return json.dumps({**data, "key_version": 9})
    prefix, _, body = data["ciphertext"].rpartition(":")
    raw = bytearray(base64.b64decode(body))
    raw[20] ^= 0x55
    return json.dumps({**data, "ciphertext": f"{prefix}:{base64.b64encode(raw).decode()}"})


# --- on the host ---------------------------------------------------------------------------


def blank_volume(path: Path) -> Path:
    with path.open("wb") as handle:
        handle.truncate(VOLUME_MIB << 20)
    return path


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


def volume_image_holds_no_plaintext(
    bao: OpenBao, image: Path, canary: str, key_name: str = ROLE
) -> str:
    """After a poweroff with the volume in use: one PBKDF2 keyslot and our token; neither
    the canary, its file's name, nor the data key (decrypted here as root) in the raw bytes.
    Returns the token's ciphertext."""
    header = raw_header(image)
    assert list(header["keyslots"]) == ["0"], header["keyslots"]
    assert header["keyslots"]["0"]["kdf"]["type"] == "pbkdf2"
    [token] = header["tokens"].values()
    assert token["type"] == "bootsecrets-transit" and token["key_name"] == key_name, token
    raw = image.read_bytes()
    for needle in (canary, file_name(canary)):
        assert raw.count(needle.encode()) == 0, "the volume holds a canary or its file name"
    answer = decrypt_as_root(bao, key_name, token["ciphertext"], TRANSIT_MOUNT)
    assert answer.status_code == 200, answer.text
    key = base64.b64decode(answer.json()["data"]["plaintext"])
    assert raw.count(key) == 0 and raw.count(key.hex().encode()) == 0
    return str(token["ciphertext"])


def volume_image_erased(image: Path, canary: str, ciphertext: str) -> None:
    header = raw_header(image)
    assert header["keyslots"] == {} and header["tokens"] == {}, header
    raw = image.read_bytes()
    assert raw.count(canary.encode()) == 0 and raw.count(ciphertext.encode()) == 0
