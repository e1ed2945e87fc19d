"""`packer validate` on the golden-image template (fast; no build, no network).

Debian 12's packer is 1.6.6: its builders are built in and it knows neither `required_plugins`
(kept in packer/plugins.pkr.hcl, which 1.6.6 never reads because we name the template file)
nor the two newer attributes marked `# packer>=1.7` in the template (`droplet_agent`,
`cd_content`). With 1.6.6 the test validates the template minus exactly those marked lines,
in a directory laid out like the repository (so `path.root` resolves the same). With
Packer >= 1.7 it validates the real directory (after `packer init`, which needs network).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKER = REPO / "packer"
TEMPLATE = PACKER / "bootsecrets.pkr.hcl"
MARK = "# packer>=1.7"
# The only attributes allowed to be stripped for packer 1.6.6.
NEWER_ONLY = {"droplet_agent", "cd_content"}

pytestmark = pytest.mark.skipif(shutil.which("packer") is None,
                                reason="packer not installed (scripts/install-e2e-deps)")


def packer_version() -> tuple[int, ...]:
    out = subprocess.run(["packer", "version"], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    assert match, out
    return tuple(int(x) for x in match.groups())


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree shaped like the repo: <tmp>/packer/{template,scripts,demo}, <tmp>/systemd."""
    root = tmp_path_factory.mktemp("packer-layout")
    (root / "packer").mkdir()
    (root / "systemd").symlink_to(REPO / "systemd")
    (root / "packer/scripts").symlink_to(PACKER / "scripts")
    (root / "packer/demo").symlink_to(PACKER / "demo")
    (root / "wheelhouse").mkdir()
    if packer_version() >= (1, 7, 0):
        shutil.copy(TEMPLATE, root / "packer" / TEMPLATE.name)
        shutil.copy(PACKER / "plugins.pkr.hcl", root / "packer/plugins.pkr.hcl")
        subprocess.run(["packer", "init", str(root / "packer")], check=True)
        return root / "packer"
    kept: list[str] = []
    stripped: list[str] = []
    for line in TEMPLATE.read_text().splitlines(keepends=True):
        (stripped if line.rstrip().endswith(MARK) else kept).append(line)
    names = {line.split("=")[0].strip() for line in stripped}
    assert names == NEWER_ONLY, f"only {NEWER_ONLY} may be marked {MARK!r}, found {names}"
    (root / "packer" / TEMPLATE.name).write_text("".join(kept))
    return root / "packer" / TEMPLATE.name


def validate(target: Path, *args: str, token: str | None = "dummy-not-a-token") -> (
        subprocess.CompletedProcess[str]):
    env = {k: v for k, v in os.environ.items() if k != "DIGITALOCEAN_TOKEN"}
    if token is not None:
        env["DIGITALOCEAN_TOKEN"] = token
    return subprocess.run(
        ["packer", "validate",
         # validate would fetch the checksum list from cloud.debian.org otherwise
         "-var", "qemu_image_checksum=none",
         "-var", f"wheelhouse_dir={target.parent.parent / 'wheelhouse'}"
         if target.is_file() else f"wheelhouse_dir={target.parent / 'wheelhouse'}",
         *args, str(target)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120, check=False,
    )


def test_template_is_formatted() -> None:
    for name in ("bootsecrets.pkr.hcl", "plugins.pkr.hcl"):
        result = subprocess.run(["packer", "fmt", "-check", "-diff", str(PACKER / name)],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_validate_passes(layout: Path) -> None:
    result = validate(layout, "-var", "config_file=packer/demo/config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_missing_config_file_variable_is_named(layout: Path) -> None:
    result = validate(layout)
    assert result.returncode != 0
    assert 'Unset variable "config_file"' in result.stdout + result.stderr


def test_config_file_that_does_not_exist_is_named(layout: Path) -> None:
    result = validate(layout, "-var", "config_file=packer/demo/no-such-config.yaml")
    assert result.returncode != 0
    assert "no-such-config.yaml" in result.stdout + result.stderr


def test_digitalocean_token_only_from_environment(layout: Path) -> None:
    result = validate(layout, "-var", "config_file=packer/demo/config.yaml", token=None)
    assert result.returncode != 0
    assert "api_token" in result.stdout + result.stderr
    # and the template never takes it from anywhere but env(): no literal token, no var-file
    text = TEMPLATE.read_text()
    assert 'default     = env("DIGITALOCEAN_TOKEN")' in text
    assert re.search(r"sensitive\s*=\s*true", text)


def test_template_requirements() -> None:
    text = TEMPLATE.read_text()
    assert re.search(r"droplet_agent\s*=\s*false", text)
    assert re.search(r'image\s*=\s*"debian-12-x64"', text)
    assert 'source "qemu" "local"' in text
    assert "required_plugins" not in text
    assert "required_plugins" in (PACKER / "plugins.pkr.hcl").read_text()
    # Both sources share one provisioner list: every script, in order, image-check last.
    scripts = re.findall(r'"\$\{path\.root\}/scripts/([^"]+)"', text)
    assert scripts == sorted(p.name for p in (PACKER / "scripts").glob("*.sh"))
    assert scripts[-1] == "99-image-check.sh"
