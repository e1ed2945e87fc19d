"""The golden-image template as shipped: `packer validate`/`fmt` on the real file, and the
upload list checked against what the provisioning scripts read (fast; no build, no network).

Debian 12's packer is 1.6.6 (builders built in): it validates packer/bootsecrets.pkr.hcl
itself, unmodified, because the template uses nothing newer (plugins.pkr.hcl, which holds
Packer >= 1.7's `required_plugins`, is only read when the directory is given). With
Packer >= 1.7 the test validates the directory after `packer init` (which needs network).
The build itself is proven by tests/e2e/test_e2e.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKER = REPO / "packer"
TEMPLATE = PACKER / "bootsecrets.pkr.hcl"
UPLOAD_ROOT = "/tmp/bootsecrets"


def packer() -> str:
    found = shutil.which("packer")
    if not found:
        pytest.fail("packer is missing: run `apt-get install -y packer` (scripts/install-e2e-deps)")
    return found


def packer_version() -> tuple[int, ...]:
    out = subprocess.run([packer(), "version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    assert match, out
    return tuple(int(x) for x in match.groups())


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What to validate: the template file itself (1.6.6), or the directory (>= 1.7)."""
    if packer_version() >= (1, 7, 0):
        subprocess.run([packer(), "init", str(PACKER)], check=True)
        return PACKER
    return TEMPLATE


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wheelhouse directory and a build seed, as a user would have them."""
    root = tmp_path_factory.mktemp("packer-inputs")
    (root / "wheelhouse").mkdir()
    seed = root / "seed"
    seed.mkdir()
    (seed / "user-data").write_text("#cloud-config\n")
    (seed / "meta-data").write_text("instance-id: packer-build\n")
    (root / "key").write_text("")
    return {"wheelhouse": root / "wheelhouse", "seed": seed}


def validate(
    target: Path, inputs: Mapping[str, Path], *args: str, token: str | None = "dummy-not-a-token"
) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DIGITALOCEAN_", "PKR_VAR_", "PACKER_"))
    }
    env["CHECKPOINT_DISABLE"] = "1"
    if token is not None:
        env["DIGITALOCEAN_TOKEN"] = token
    return subprocess.run(
        [
            packer(),
            "validate",
            # validate would fetch the checksum list from cloud.debian.org otherwise
            "-var",
            "qemu_image_checksum=none",
            "-var",
            f"wheelhouse_dir={inputs['wheelhouse']}",
            "-var",
            f"qemu_seed_dir={inputs['seed']}",
            *args,
            str(target),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def test_template_is_formatted() -> None:
    for name in ("bootsecrets.pkr.hcl", "plugins.pkr.hcl"):
        result = subprocess.run(
            [packer(), "fmt", "-check", "-diff", str(PACKER / name)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_real_template_validates(target: Path, inputs: dict[str, Path]) -> None:
    result = validate(target, inputs, "-var", "config_file=packer/demo/config.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_digitalocean_build_needs_nothing_of_the_local_one(
    target: Path, inputs: dict[str, Path]
) -> None:
    env_inputs = {**inputs, "seed": Path("/nonexistent-seed")}
    result = validate(
        target,
        env_inputs,
        "-only=digitalocean.golden",
        "-var",
        "config_file=packer/demo/config.yaml",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    result = validate(
        target, env_inputs, "-only=qemu.local", "-var", "config_file=packer/demo/config.yaml"
    )
    assert result.returncode != 0
    assert "/nonexistent-seed/user-data" in result.stdout + result.stderr


def test_missing_config_file_variable_is_named(target: Path, inputs: dict[str, Path]) -> None:
    result = validate(target, inputs)
    assert result.returncode != 0
    assert 'Unset variable "config_file"' in result.stdout + result.stderr


@pytest.mark.parametrize("variable", ["config_file", "vault_ca_file"])
def test_an_upload_that_does_not_exist_is_named(
    target: Path, inputs: dict[str, Path], variable: str
) -> None:
    result = validate(
        target,
        inputs,
        "-var",
        "config_file=packer/demo/config.yaml",
        "-var",
        f"{variable}=packer/demo/no-such-file.pem",
    )
    assert result.returncode != 0
    assert "no-such-file.pem" in result.stdout + result.stderr


def test_digitalocean_token_only_from_environment(target: Path, inputs: dict[str, Path]) -> None:
    result = validate(target, inputs, "-var", "config_file=packer/demo/config.yaml", token=None)
    assert result.returncode != 0
    assert "api_token" in result.stdout + result.stderr
    # and the template never takes it from anywhere but env(): no literal token, no var-file
    text = TEMPLATE.read_text()
    assert 'default     = env("DIGITALOCEAN_TOKEN")' in text
    assert re.search(r"sensitive\s*=\s*true", text)


def test_template_requirements() -> None:
    text = TEMPLATE.read_text()
    assert re.search(r'image\s*=\s*"debian-12-x64"', text)
    assert 'source "qemu" "local"' in text and 'source "digitalocean" "golden"' in text
    assert 'sources = ["source.digitalocean.golden", "source.qemu.local"]' in text
    assert text.count("build {") == 1  # one build: both sources, one provisioner list
    assert "required_plugins" not in text
    assert "required_plugins" in (PACKER / "plugins.pkr.hcl").read_text()
    # Every script, in order, image-check last.
    scripts = re.findall(r'"\$\{path\.root\}/scripts/([^"]+)"', text)
    assert scripts == sorted(p.name for p in (PACKER / "scripts").glob("*.sh"))
    assert scripts[-1] == "99-image-check.sh"


# --- the upload list against what the scripts read ---------------------------------------------

_FILE_PROVISIONER = re.compile(
    r'provisioner "file" \{\s*source\s*=\s*(?P<source>\S+)\s*destination\s*=\s*"(?P<dest>[^"]+)"',
    re.S,
)
_ASSIGNMENT = re.compile(r'^\s*(\w+)=["\']?(/tmp/bootsecrets[^"\'\s]*)["\']?\s*$', re.M)
_READ = re.compile(r"/tmp/bootsecrets(?:/[A-Za-z0-9._*$/-]*)?")


def uploads(template: str) -> dict[str, str]:
    """Destination (relative to /tmp/bootsecrets) -> source expression, per file provisioner."""
    found = {m["dest"]: m["source"] for m in _FILE_PROVISIONER.finditer(template)}
    assert all(d.startswith(UPLOAD_ROOT + "/") for d in found), found
    return {d[len(UPLOAD_ROOT) + 1 :]: s for d, s in found.items()}


def reads(script: str) -> set[str]:
    """Every /tmp/bootsecrets path a script names, its variables expanded (`src=...`)."""
    for name, value in _ASSIGNMENT.findall(script):
        script = re.sub(rf'"?\$\{{?{name}\}}?"?', value, script)
    paths = {m.group().rstrip("/") for m in _READ.finditer(script)}
    return {p[len(UPLOAD_ROOT) + 1 :] for p in paths if p != UPLOAD_ROOT}


def upload_mismatches(template: str, scripts: Mapping[str, str]) -> list[str]:
    """Where the template's uploads and the scripts' reads disagree (empty: they agree)."""
    uploaded = uploads(template)
    problems = []
    used: set[str] = set()
    for name, script in sorted(scripts.items()):
        for path in sorted(reads(script)):
            top = path.split("/", 1)[0]
            if top not in uploaded:
                problems.append(f"{name} reads {UPLOAD_ROOT}/{path}, which nothing uploads")
                continue
            used.add(top)
            rest = path.split("/", 1)[1] if "/" in path else ""
            source = uploaded[top]
            # A literal file inside a directory upload from the repository must exist there.
            local = re.fullmatch(r'"\$\{(path\.root|local\.repo_root)\}/([^"]+)/"', source)
            if local and rest and "$" not in rest and "*" not in rest:
                base = PACKER if local.group(1) == "path.root" else REPO
                if not (base / local.group(2) / rest).exists():
                    problems.append(
                        f"{name} reads {UPLOAD_ROOT}/{path}, which {source} does not hold"
                    )
    problems += [
        f"{UPLOAD_ROOT}/{top} is uploaded but no script reads it"
        for top in sorted(set(uploaded) - used)
    ]
    return problems


def shipped_scripts() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((PACKER / "scripts").glob("*.sh"))}


def test_uploads_are_exactly_what_the_scripts_read() -> None:
    template = TEMPLATE.read_text()
    assert set(uploads(template)) == {
        "wheelhouse",
        "systemd",
        "demo",
        "config.yaml",
        "vault-ca.pem",
    }
    assert upload_mismatches(template, shipped_scripts()) == []


def test_a_divergence_between_uploads_and_scripts_is_caught() -> None:
    """The check above can fail: each kind of divergence, made on a copy."""
    template, scripts = TEMPLATE.read_text(), shipped_scripts()
    renamed = template.replace(
        'destination = "/tmp/bootsecrets/config.yaml"',
        'destination = "/tmp/bootsecrets/image-config.yaml"',
    )
    assert upload_mismatches(renamed, scripts) == [
        "30-install-config.sh reads /tmp/bootsecrets/config.yaml, which nothing uploads",
        "/tmp/bootsecrets/image-config.yaml is uploaded but no script reads it",
    ]
    extra = {**scripts, "40-extra.sh": 'src=/tmp/bootsecrets\ncat "$src/extra.conf"\n'}
    assert upload_mismatches(template, extra) == [
        "40-extra.sh reads /tmp/bootsecrets/extra.conf, which nothing uploads"
    ]
    missing = {**scripts, "40-extra.sh": "cat /tmp/bootsecrets/demo/no-such-unit.service\n"}
    assert upload_mismatches(template, missing) == [
        "40-extra.sh reads /tmp/bootsecrets/demo/no-such-unit.service, which "
        '"${path.root}/demo/" does not hold'
    ]
