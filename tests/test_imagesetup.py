"""What the image build derives from the config (bootsecrets.imagesetup): packages and the
agent's sandbox drop-ins, nothing for a config without data at rest, the config's errors
by their exit code. The e2e build runs it for real (packer/scripts/30-install-config.sh);
tests/e2e/test_atrest_parts.py verifies its drop-ins with systemd."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bootsecrets import imagesetup
from bootsecrets.config import Config, parse_config
from bootsecrets.errors import ConfigError
from support.configs import MINIMAL

REPO = Path(__file__).resolve().parent.parent
BASE = MINIMAL
DIRECTORIES = """\
encrypted_directories:
  one: {path: /var/lib/app/one, units: [app.service]}
  two: {path: /var/lib/app/two, units: [app.service]}
  three: {path: /srv/three, units: [app.service]}
"""
VOLUMES = """\
encrypted_volumes:
  pg:
    device: /dev/disk/by-id/scsi-0DO_Volume_pg
    mount: /var/lib/postgresql
    units: [db.service]
    filesystem: {filesystem}
"""


def config(text: str) -> Config:
    return parse_config(text.encode(), "config.yaml")


def test_a_config_without_data_at_rest_needs_nothing(tmp_path: Path) -> None:
    plain = config(BASE)
    assert imagesetup.packages(plain) == []
    assert imagesetup.drop_ins(plain, "unused") == {}
    assert imagesetup.install(plain, REPO / "systemd", tmp_path) == []
    assert list(tmp_path.iterdir()) == []


def test_directories_give_each_parent_once_to_both_agent_units() -> None:
    files = imagesetup.drop_ins(config(BASE + DIRECTORIES), "unused")
    assert set(files) == {
        "bootsecrets.service.d/encrypted-directories.conf",
        "bootsecrets-refresh.service.d/encrypted-directories.conf",
    }
    for text in files.values():
        assert [line for line in text.splitlines() if not line.startswith("#")] == [
            "[Service]",
            "ReadWritePaths=/srv",
            "ReadWritePaths=/var/lib/app",
        ]
    assert imagesetup.packages(config(BASE + DIRECTORIES)) == []


def test_volumes_need_cryptsetup_and_xfs_its_tools() -> None:
    ext4 = config(BASE + VOLUMES.format(filesystem="ext4"))
    xfs = config(BASE + VOLUMES.format(filesystem="xfs"))
    assert imagesetup.packages(ext4) == ["cryptsetup-bin"]
    assert imagesetup.packages(xfs) == ["cryptsetup-bin", "xfsprogs"]
    assert imagesetup.drop_ins(ext4, "SHIPPED") == {
        "bootsecrets.service.d/encrypted-volumes.conf": "SHIPPED",
        "bootsecrets-refresh.service.d/encrypted-volumes.conf": "SHIPPED",
    }


def test_install_replaces_files_and_leaves_no_temporary(tmp_path: Path) -> None:
    both = config(BASE + DIRECTORIES + VOLUMES.format(filesystem="ext4"))
    first = imagesetup.install(both, REPO / "systemd", tmp_path)
    second = imagesetup.install(both, REPO / "systemd", tmp_path)
    assert first == second
    drop_in_dir = tmp_path / "etc/systemd/system/bootsecrets.service.d"
    assert sorted(p.name for p in drop_in_dir.iterdir()) == [
        "encrypted-directories.conf",
        "encrypted-volumes.conf",
    ]
    assert (drop_in_dir / "encrypted-volumes.conf").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "var/lib/app").is_dir() and not (tmp_path / "var/lib/app/one").exists()


def run_module(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bootsecrets.imagesetup", *argv],
        capture_output=True,
        text=True,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_the_command_prints_packages_and_names_a_config_error(tmp_path: Path) -> None:
    good = tmp_path / "config.yaml"
    good.write_text(BASE + VOLUMES.format(filesystem="xfs"))
    result = run_module("packages", str(good))
    assert (result.returncode, result.stdout) == (0, "cryptsetup-bin\nxfsprogs\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "encrypted_volumes: {pg: {device: relative, units: []}}\n")
    result = run_module("install", str(bad), str(REPO / "systemd"), str(tmp_path / "root"))
    assert result.returncode == ConfigError.exit_code, result.stderr
    assert "encrypted_volumes" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "root").exists()
    assert run_module("nonsense").returncode == 2
