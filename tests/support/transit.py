"""Data at rest in a test's world: the Transit engine and keys on the shared OpenBao dev
server, the droplet's policy (exactly `update` on datakey, decrypt and rewrap), and
loop-device filesystems mounted inside a sandbox root.

Plaintext data keys a test obtains (by decrypting a stored ciphertext with the root token)
are added to `CANARIES`, so the leak guard looks for them in everything the test captured.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from support.loopfs import LoopFs, sh
from support.openbao import CANARIES, OpenBao
from support.world import World, policy

MOUNT = "transit"


def enable_transit(openbao: OpenBao, mount: str = MOUNT) -> None:
    mounts = root_call(openbao, "GET", "sys/mounts")
    mounts.raise_for_status()
    if f"{mount}/" not in mounts.json()["data"]:
        root_call(openbao, "POST", f"sys/mounts/{mount}", {"type": "transit"}).raise_for_status()


def create_key(openbao: OpenBao, name: str, mount: str = MOUNT) -> None:
    enable_transit(openbao, mount)
    root_call(openbao, "POST", f"{mount}/keys/{name}", {}).raise_for_status()


def droplet_policy(key: str, mount: str = MOUNT) -> str:
    """Exactly what the Terraform module grants a droplet for its data at rest."""
    return "\n".join(
        f'path "{mount}/{operation}/{key}" {{ capabilities = ["update"] }}'
        for operation in ("datakey/plaintext", "decrypt", "rewrap")
    )


def grant(
    world: World,
    key: str,
    mount: str = MOUNT,
    *,
    operations: tuple[str, ...] = ("datakey/plaintext", "decrypt", "rewrap"),
) -> None:
    """The world's role policy: its secret reads plus `update` on the given Transit paths of
    `key` (all three by default)."""
    transit = "\n".join(
        f'path "{mount}/{op}/{key}" {{ capabilities = ["update"] }}' for op in operations
    )
    world.bao.client.sys.create_or_update_policy(
        name=f"{world.role}-policy", policy=policy(*world.policy_paths) + "\n" + transit
    )


def root_call(
    openbao: OpenBao, method: str, path: str, body: dict[str, Any] | None = None
) -> requests.Response:
    return requests.request(
        method,
        f"{openbao.addr}/v1/{path}",
        json=body,
        timeout=10,
        headers={"X-Vault-Token": openbao.root_token},
    )


def rotate(openbao: OpenBao, key: str, mount: str = MOUNT) -> None:
    root_call(openbao, "POST", f"{mount}/keys/{key}/rotate").raise_for_status()


def configure(openbao: OpenBao, key: str, mount: str = MOUNT, **settings: Any) -> None:
    root_call(openbao, "POST", f"{mount}/keys/{key}/config", settings).raise_for_status()


def delete_key(openbao: OpenBao, key: str, mount: str = MOUNT) -> None:
    """The operator's crypto-shred, with the CLI as the docs give it."""
    openbao.bao("write", f"{mount}/keys/{key}/config", "deletion_allowed=true")
    openbao.bao("delete", f"{mount}/keys/{key}")


def decrypt_as_root(
    openbao: OpenBao, key: str, ciphertext: str, mount: str = MOUNT
) -> requests.Response:
    """Decrypt with the root token; a plaintext it yields becomes a canary (base64, hex)."""
    response = root_call(openbao, "POST", f"{mount}/decrypt/{key}", {"ciphertext": ciphertext})
    if response.status_code == 200:
        plaintext = response.json()["data"]["plaintext"]
        raw = base64.b64decode(plaintext)
        CANARIES.update({plaintext, raw.hex(), raw.hex().upper()})
    return response


def record_of(root: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (root / "var/lib/bootsecrets/keys" / f"{name}.json").read_text()
    )
    return data


@contextlib.contextmanager
def mounted_in(fs: LoopFs, target: Path) -> Iterator[Path]:
    """`fs` also mounted (bound) at `target` inside a sandbox root; unbound on leaving.
    Keys added through either mount point are the same filesystem's keys."""
    target.mkdir(parents=True, exist_ok=True)
    sh(["mount", "--bind", str(fs.mountpoint), str(target)])
    try:
        yield target
    finally:
        os.sync()
        sh(["umount", str(target)])
