"""What the end-to-end test asserts about a running guest, one function per property.

Each check takes the `VM` (and what it needs to know) and asserts from outside, over SSH or
the forwarded demo ports; none prints or passes a secret (the guest's journal records sudo
command lines: a secret needed in the guest goes on standard input). test_e2e.py lists which
checks run after which boot: add a property here and name it there.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import e2e_atrest
from e2e_vm import VM

from bootsecrets import errors

#: Every demo unit the image config names, and the guest port it reports on.
DEMO_PORTS = {"demo-a.service": 8081, "demo-b.service": 8082, **e2e_atrest.PORTS}
#: Exit codes bootsecrets.service counts as a successful start (the others' units start).
SUCCESS_CODES = frozenset(
    int(code)
    for line in (Path(__file__).resolve().parents[2] / "systemd/bootsecrets.service")
    .read_text()
    .splitlines()
    if (match := re.fullmatch(r"SuccessExitStatus=([0-9 ]+)", line))
    for code in match[1].split()
)
NOT_PROVISIONED = errors.NotProvisioned
TLS_FAILED = errors.TLSVerifyFailed


def sha(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


# --- the application units -------------------------------------------------------------------


def demo_runs_with(
    vm: VM, unit: str, env: Mapping[str, str], credentials: Mapping[str, str]
) -> dict[str, Any]:
    """The demo unit answers with exactly the digests of these values; its report."""
    doc: dict[str, Any] = vm.http_json(DEMO_PORTS[unit])
    assert doc["unit"] == unit
    assert doc["sha256"] == {name: sha(value) for name, value in env.items()}, unit
    assert doc["credentials"] == {name: sha(value) for name, value in credentials.items()}, unit
    return doc


def units_down(vm: VM, *units: str) -> None:
    """The application units did not start (no secrets, no start)."""
    for unit in units or tuple(DEMO_PORTS):
        state = vm.unit(unit, "ActiveState", "ExecMainStartTimestampMonotonic")
        assert state == {"ActiveState": "inactive", "ExecMainStartTimestampMonotonic": "0"}, (
            unit,
            state,
        )


# --- the agent ------------------------------------------------------------------------------


def agent_exited(vm: VM, code: int) -> None:
    """bootsecrets.service ran once at this boot and exited with `code` (a failure, unless
    the unit counts it as a success)."""
    state = vm.wait_unit_done("bootsecrets.service", 300)
    assert state["ExecMainStatus"] == str(code), state
    active = code == 0 or code in SUCCESS_CODES
    assert state["ActiveState"] == ("active" if active else "failed"), state


def alerted(vm: VM, kind: type[errors.BootsecretsError]) -> dict[str, Any]:
    """Exactly one journal alert (priority 1) with this outcome's MESSAGE_ID at this boot."""
    assert kind.message_id
    entries = vm.journal(f"MESSAGE_ID={kind.message_id}")
    assert len(entries) == 1, [e.get("MESSAGE") for e in entries]
    assert entries[0]["PRIORITY"] == "1"
    assert entries[0]["SYSLOG_IDENTIFIER"] == "bootsecrets"
    return entries[0]


def free_blocks_trimmed(vm: VM) -> None:
    """bootsecrets-trim.service ran after the agent and the disk took the discards."""
    state = vm.wait_unit_done("bootsecrets-trim.service", 300)
    assert (state["Result"], state["ExecMainStatus"]) == ("success", "0"), state
    trimmed = vm.sudo("journalctl", "-b", "-u", "bootsecrets-trim.service", "-o", "cat")
    assert "trimmed" in trimmed, trimmed  # "/: N GiB (M bytes) trimmed": the disk takes it


def bootstrap_consumed(vm: VM) -> None:
    """The bootstrap (with the wrapped secret-id) is gone from the store after the unwrap."""
    assert vm.ssh("sudo test -e /run/bootsecrets/bootstrap.yaml", check=False).returncode == 1


def bootstrap_kept(vm: VM) -> None:
    """A bootstrap that failed before the unwrap keeps its file in the store, for a retry."""
    assert vm.ssh("sudo test -s /run/bootsecrets/bootstrap.yaml", check=False).returncode == 0


def store_is_memory_only(vm: VM) -> None:
    fstype, mode, owner = vm.sudo(
        "sh", "-c", "findmnt -n -o FSTYPE /run/bootsecrets; stat -c '%a %U' /run/bootsecrets"
    ).split()
    assert (fstype, mode, owner) == ("tmpfs", "700", "root")
    enabled = vm.ssh("systemctl is-enabled demo-a.service demo-b.service", check=False)
    assert enabled.stdout.split() == ["static", "static"]  # started by the agent only


def status(vm: VM) -> dict[str, Any]:
    doc: dict[str, Any] = vm.sudo_json("bootsecrets", "status", "--json")
    return doc


def status_shows(
    doc: Mapping[str, Any],
    *,
    policy: str,
    generation: int | None,
    units: Mapping[str, Mapping[str, int | None]],
    token_ttl: int,
) -> None:
    """`status --json`: the policy, the live generation (None: any), per unit the version of
    each secret path it runs with, the token's TTL; never a value."""
    assert doc["version"] == 1
    assert doc["reboot_policy"] == policy
    assert doc["provisioned"] is True and doc["action"] is None
    assert doc["generation"] == generation if generation is not None else doc["generation"] >= 1
    assert doc["last_run"]["outcome"] == "ok" and doc["last_run"]["exit_code"] == 0
    by_unit = {u["unit"]: u for u in doc["units"]}
    assert set(by_unit) == set(units)
    for unit, versions in units.items():
        report = by_unit[unit]
        assert report["active"] == "active", report
        assert report["rendered"] is True and report["left_out"] is None
        shown = {s["path"]: s["version"] for s in report["secrets"]}
        assert set(shown) == set(versions), report
        for path, version in versions.items():  # None: any issue of a leased secret
            assert shown[path] == version if version is not None else shown[path] >= 1, report
        assert all(s["fetched_at"] for s in report["secrets"])
    token = doc["token"]
    assert token["accessor"] and token["renewable"] is True
    # The login's TTL, or what was left of it when a kept token was checked at a reboot.
    assert 0 < token["ttl"] <= token_ttl, token
    assert 0 < token["ttl_remaining"] <= token["ttl"], token


def unit_generation(doc: Mapping[str, Any], unit: str) -> int:
    return int(next(u for u in doc["units"] if u["unit"] == unit)["generation"])


def not_provisioned(doc: Mapping[str, Any]) -> None:
    assert doc["provisioned"] is False and doc["generation"] is None
    assert "re-provision" in doc["action"]
    assert doc["last_run"]["exit_code"] == NOT_PROVISIONED.exit_code


# --- the system around it -----------------------------------------------------------------------


def cloud_init_done(vm: VM) -> None:
    """cloud-init finished this boot without an error (`status --long`, result.json)."""
    result = vm.ssh("cloud-init status --long --wait", timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status: done" in result.stdout, result.stdout
    outcome = vm.sudo_json("cat", "/run/cloud-init/result.json")["v1"]
    assert outcome["errors"] == [], outcome


def refresh_timer_scheduled(vm: VM) -> None:
    state = vm.unit(
        "bootsecrets-refresh.timer", "ActiveState", "UnitFileState", "NextElapseUSecMonotonic"
    )
    assert state["ActiveState"] == "active" and state["UnitFileState"] == "enabled", state
    assert state["NextElapseUSecMonotonic"] not in ("", "0", "infinity"), state


def root_fs_has_encrypt(vm: VM) -> None:
    """The image's root filesystem supports fscrypt (ext4 `encrypt`), as the kernel sees it."""
    features = vm.sudo("dumpe2fs", "-h", "/dev/vda")
    line = next(x for x in features.splitlines() if x.startswith("Filesystem features:"))
    assert "encrypt" in line.split(":", 1)[1].split(), line
    assert "/sys/fs/ext4/features/encryption" in vm.sudo(
        "sh", "-c", "ls /sys/fs/ext4/features/encryption"
    )


def user_data_scrubbed(vm: VM, wrapped: str, *, unwrapped: bool) -> None:
    """No copy of the wrapped secret-id in cloud-init's files; the marker took its place;
    the agent said why it scrubbed. (The token goes to grep on stdin, never in argv.)"""
    found = vm.ssh("sudo grep -rlF -f - /var/lib/cloud /var/log", input=wrapped + "\n", check=False)
    assert found.returncode == 1, f"the wrapped secret-id is still in: {found.stdout}"
    marked = vm.sudo("grep", "-rlF", "scrubbed-by-bootsecrets-", "/var/lib/cloud/instances")
    names = sorted(path.rsplit("/", 1)[1] for path in marked.split())
    assert names == ["cloud-config.txt", "obj.pkl", "user-data.txt", "user-data.txt.i"], names
    why = "sent for unwrapping" if unwrapped else "failed before the unwrap"
    messages = [e["MESSAGE"] for e in vm.journal("SYSLOG_IDENTIFIER=bootsecrets")]
    assert any(why in m and "replaced it in cloud-init's files" in m for m in messages), messages


def journal_text(vm: VM) -> str:
    """This boot's whole journal, verbose (every field), for the leak guard."""
    return vm.sudo("journalctl", "-b", "--no-pager", "-o", "verbose", timeout=180)
