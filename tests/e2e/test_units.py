"""`systemd-analyze verify` on every unit the project ships (fast; systemd need not be PID 1).

verify checks that Exec*= binaries exist, so it runs against a throwaway root (`--root`)
holding the distribution's own units (for sysinit.target, network-online.target, ...), the
binaries our units execute, a stub /usr/local/sbin/bootsecrets, and our units installed in
/etc/systemd/system, as 30-install-config.sh installs them. Warnings fail the test too:
verify exits 0 on "Unknown key" or an unparsable value, it only prints them.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").glob("*.service")) + sorted((REPO / "systemd").glob("*.timer"))
DEMO_UNITS = sorted((REPO / "packer/demo").glob("*.service"))
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze missing (apt-get install systemd)",
)


def exec_paths(unit: Path) -> set[str]:
    paths = set()
    for line in unit.read_text().splitlines():
        match = re.match(r"(Exec\w+)=[-@:+!]*(/\S+)", line)
        if match:
            paths.add(match.group(2))
    return paths


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("verify-root")
    for src in SYSTEM_UNIT_DIRS:
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, root / src.relative_to("/"), symlinks=True, dirs_exist_ok=True)
            break
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in (*UNITS, *DEMO_UNITS):
        shutil.copy(unit, etc / unit.name)
        for path in exec_paths(unit):
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            host = Path(path)
            if host.exists():
                shutil.copy(host, target)
            else:  # /usr/local/sbin/bootsecrets and the demo app are not on this host
                target.write_text("#!/bin/sh\nexit 0\n")
                target.chmod(0o755)
    return root


def verify(root: Path, *names: str) -> subprocess.CompletedProcess[str]:
    units = [str(root / "etc/systemd/system" / name) for name in names]
    return subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.mark.parametrize("unit", [u.name for u in (*UNITS, *DEMO_UNITS)])
def test_unit_verifies_cleanly(root: Path, unit: str) -> None:
    result = verify(root, unit)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", (
        result.stdout + result.stderr
    )


def test_verify_catches_mistakes(root: Path) -> None:
    """The check above is not vacuous: a typo is reported."""
    bad = root / "etc/systemd/system/bootsecrets-broken.service"
    bad.write_text(
        (REPO / "systemd/bootsecrets.service")
        .read_text()
        .replace("ProtectSystem=strict", "ProtectSytem=strict")
    )
    try:
        result = verify(root, bad.name)
        assert "ProtectSytem" in result.stderr
    finally:
        bad.unlink()


def parse(unit: Path) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(
        strict=False, interpolation=None, dict_type=dict, empty_lines_in_values=False
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit.read_text())
    return parser


def test_agent_unit_contract() -> None:
    unit = parse(REPO / "systemd/bootsecrets.service")
    service, head = unit["Service"], unit["Unit"]
    assert service["Type"] == "oneshot"
    assert service["RemainAfterExit"] == "yes"
    assert service["ExecStart"] == "/usr/local/sbin/bootsecrets bootstrap"
    for dep in (
        "network-online.target",
        "cloud-init.service",
        "time-sync.target",
        "bootsecrets-store.service",
    ):
        assert dep in head["After"].split()
    assert "network-online.target" in head["Wants"].split()
    assert "bootsecrets-store.service" in head["Requires"].split()
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "LimitCORE": "0",
        "MemorySwapMax": "0",
        "UMask": "0077",
    }.items():
        assert service[key] == value, key
    assert writable(REPO / "systemd/bootsecrets.service") == [
        "/run/bootsecrets",
        "/run/systemd/system",
        "-/var/lib/bootsecrets",
        "-/var/lib/cloud",
        "-/var/log/cloud-init.log",
        "-/var/log/cloud-init-output.log",
    ]
    assert "Restart" not in service  # fail closed, no retry loop
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def writable(unit: Path) -> list[str]:
    """Every ReadWritePaths= entry of a unit, in order (the key may be repeated)."""
    return [
        path
        for line in unit.read_text().splitlines()
        if line.startswith("ReadWritePaths=")
        for path in line.split("=", 1)[1].split()
    ]


def test_refresh_unit_is_as_hardened_as_the_agent() -> None:
    agent = parse(REPO / "systemd/bootsecrets.service")["Service"]
    refresh = parse(REPO / "systemd/bootsecrets-refresh.service")["Service"]
    assert refresh["ExecStart"] == "/usr/local/sbin/bootsecrets refresh"
    skip = {"ExecStart", "RemainAfterExit", "TimeoutStartSec", "ReadWritePaths"}
    assert {k: v for k, v in agent.items() if k not in skip} == {
        k: v for k, v in refresh.items() if k not in skip
    }
    # refresh never sees user-data: no write access to cloud-init's files.
    assert writable(REPO / "systemd/bootsecrets-refresh.service") == [
        "/run/bootsecrets",
        "/run/systemd/system",
        "-/var/lib/bootsecrets",
    ]


def test_store_is_mounted_before_cloud_init_writes_the_bootstrap() -> None:
    store = parse(REPO / "systemd/bootsecrets-store.service")
    assert "cloud-init-local.service" in store["Unit"]["Before"].split()
    assert store["Unit"]["DefaultDependencies"] == "no"
    # Not sandboxed: the mount must land in PID 1's namespace.
    assert "ProtectSystem" not in store["Service"] and "PrivateMounts" not in store["Service"]
    assert "noswap" in store["Service"]["ExecStart"]
    assert "mode=0700" in store["Service"]["ExecStart"]


def test_trim_runs_after_the_agent_with_nothing_but_fitrim() -> None:
    unit = parse(REPO / "systemd/bootsecrets-trim.service")
    assert "bootsecrets.service" in unit["Unit"]["After"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    service = unit["Service"]
    assert service["ExecStart"].split()[0] == "/sbin/fstrim"
    assert service["ExecStart"].split()[-1] == "/"
    assert service["CapabilityBoundingSet"] == "CAP_SYS_ADMIN"
    assert service["PrivateNetwork"] == "yes" and service["ProtectSystem"] == "strict"


def test_timer_defaults() -> None:
    timer = parse(REPO / "systemd/bootsecrets-refresh.timer")["Timer"]
    assert timer["OnUnitActiveSec"] == "1h"
    assert timer["RandomizedDelaySec"] == "10min"
    assert "OnBootSec" in timer  # OnUnitActiveSec= alone never fires


def test_demo_units_are_never_enabled_on_their_own() -> None:
    for unit in DEMO_UNITS:
        assert "Install" not in parse(unit).sections(), unit.name
