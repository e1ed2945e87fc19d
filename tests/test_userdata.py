"""The wrapped secret-id leaves cloud-init's copies of the user-data on disk; cloud-init goes on.

The files are cloud-init's own: Debian's cloud-init package runs its init-stage code on a
NoCloud seed holding the user-data Terraform renders (tests/support/cloudinit_stage.py, with
the system Python that has cloud-init), into a throwaway root. The same code reads them back
after the scrub, as the next boot would: from the pickled datasource, the test's own file
(the agent never unpickles anything).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import string
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import errors, userdata
from conftest import Sandbox
from support.openbao import CANARIES, OpenBao
from support.terraform import render_user_data
from support.world import World

SYSTEM_PYTHON = "/usr/bin/python3"
STAGE = Path(__file__).parent / "support" / "cloudinit_stage.py"
INSTANCE = "var/lib/cloud/instances"
# Where cloud-init 22.4 puts the user-data: raw, processed (MIME), merged cloud-config, and
# the pickled datasource (which holds it twice).
COPIES = {"user-data.txt": 1, "user-data.txt.i": 1, "cloud-config.txt": 1, "obj.pkl": 2}


def cloud_init(*args: str) -> str:
    if (
        subprocess.run(
            [SYSTEM_PYTHON, "-c", "import cloudinit"], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.fail("Debian's cloud-init is missing: run `apt-get install -y cloud-init`")
    result = subprocess.run(
        [SYSTEM_PYTHON, str(STAGE), *args], capture_output=True, text=True, check=False, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def token_shaped() -> str:
    """A wrapping token's shape (OpenBao's `s.` + 24 base62); a canary for the leak guard."""
    token = "s." + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(24))
    CANARIES.add(token)
    return token


def first_boot(root: Path, user_data: str, instance_id: str) -> Path:
    """cloud-init's first boot of an instance under ROOT; its instance directory."""
    seed = root / "seed"
    seed.mkdir(parents=True)
    (seed / "user-data").write_text(user_data, encoding="utf-8")
    (seed / "meta-data").write_text(f"instance-id: {instance_id}\n")
    cloud_init("first-boot", str(root), str(seed))
    shutil.rmtree(seed)  # a NoCloud seed is a CD, not part of the disk
    return root / INSTANCE / instance_id


def query(root: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(cloud_init("query", str(root)))
    return doc


def files_under(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def holding(root: Path, needle: str) -> dict[str, int]:
    return {
        rel: data.count(needle.encode())
        for rel, data in files_under(root).items()
        if needle.encode() in data
    }


@pytest.fixture
def ssh_key() -> str:
    return "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI" + secrets.token_hex(16) + " ops@example.com"


@pytest.fixture
def instance(tmp_path: Path, ssh_key: str) -> Iterator[tuple[Path, str, str]]:
    """(root, token, user-data): cloud-init's files after a first boot with our user-data."""
    token = token_shaped()
    text = render_user_data(
        vault_addr="https://vault.example.com:8200",
        role_id="role-" + secrets.token_hex(8),
        wrapped_secret_id=token,
        ssh_authorized_keys=[ssh_key],
    )
    root = tmp_path / "root"
    first_boot(root, text, "i-" + secrets.token_hex(4))
    yield root, token, text


def test_every_copy_is_replaced_in_place_and_nothing_else_changes(
    instance: tuple[Path, str, str],
) -> None:
    root, token, _ = instance
    where = holding(root, token)
    assert {rel.rsplit("/", 1)[1]: n for rel, n in where.items()} == COPIES  # positive control
    before = files_under(root)
    stats = {rel: os.stat(root / rel) for rel in before}

    done = userdata.scrub(token, root)

    marker = userdata.marker(len(token))
    assert marker.startswith(b"scrubbed-by-bootsecrets-") and len(marker) == len(token)
    assert sorted(done.files) == sorted("/" + rel for rel in where)
    assert done.copies == sum(COPIES.values()) and done.failed == ()
    after = files_under(root)
    assert set(after) == set(before)
    for rel, data in before.items():
        assert after[rel] == data.replace(token.encode(), marker), rel  # byte for byte
        st = os.stat(root / rel)
        # The same inode, overwritten: a new file would leave the old blocks on the disk.
        assert (st.st_ino, st.st_mode, st.st_size) == (
            stats[rel].st_ino,
            stats[rel].st_mode,
            stats[rel].st_size,
        ), rel
    assert holding(root, token) == {}


def test_cloud_init_reads_the_scrubbed_files_on_the_next_boot(
    instance: tuple[Path, str, str], ssh_key: str, tmp_path: Path
) -> None:
    root, token, text = instance
    userdata.scrub(token, root)
    marker = userdata.marker(len(token)).decode()
    scrubbed = text.replace(token, marker)

    doc = query(root)  # cloud-init's own reading of its cache and files
    assert doc["userdata_raw"] == scrubbed
    assert doc["parts"] == [scrubbed]
    config = doc["cloud_config"]
    assert config["ssh_authorized_keys"] == [ssh_key]
    assert f'wrapped_secret_id: "{marker}"' in config["write_files"][0]["content"]

    cloud_init("next-boot", str(root))  # rewrites the user-data files from obj.pkl
    assert holding(root, token) == {}
    assert query(root)["userdata_raw"] == scrubbed
    user_data = next((root / INSTANCE).glob("*/user-data.txt"))
    schema = subprocess.run(
        ["cloud-init", "schema", "--config-file", str(user_data)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr


def test_only_cloud_inits_files_and_never_through_a_symlink(
    instance: tuple[Path, str, str], tmp_path: Path
) -> None:
    root, token, _ = instance
    elsewhere = root / "etc/app.conf"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text(f"token={token}\n")
    outside = tmp_path / "outside.txt"
    outside.write_text(token)
    (root / INSTANCE / "link.txt").symlink_to(outside)
    log = root / "var/log/cloud-init-output.log"
    log.parent.mkdir(parents=True)
    log.write_text(f"runcmd printed {token}\n")

    done = userdata.scrub(token, root)

    assert "/var/log/cloud-init-output.log" in done.files
    assert elsewhere.read_text() == f"token={token}\n"
    assert outside.read_text() == token
    assert holding(root, token) == {"etc/app.conf": 1}


def test_a_file_that_cannot_be_written_is_reported_and_the_rest_scrubbed(
    instance: tuple[Path, str, str],
) -> None:
    root, token, _ = instance
    pickle = next((root / INSTANCE).glob("*/obj.pkl"))
    subprocess.run(["mount", "--bind", str(pickle), str(pickle)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(pickle)], check=True)
        done = userdata.scrub(token, root)
    finally:
        subprocess.run(["umount", str(pickle)], check=True)
    assert done.failed == ("/" + pickle.relative_to(root).as_posix(),)
    assert done.copies == sum(COPIES.values()) - COPIES["obj.pkl"]
    assert list(holding(root, token)) == [pickle.relative_to(root).as_posix()]


@pytest.mark.parametrize(
    "token", ["", "short-token", "has space in it long enough", 'quote"inside-a-long-token']
)
def test_what_is_not_a_token_is_never_replaced(instance: tuple[Path, str, str], token: str) -> None:
    root, _, _ = instance
    before = files_under(root)
    with pytest.raises(ValueError, match="not a token"):
        userdata.scrub(token, root)
    assert files_under(root) == before


# --- in the agent's flow, against a real OpenBao ----------------------------------------------


def boot_with_user_data(world: World, sandbox: Sandbox, wrapped: str) -> Path:
    """cloud-init's first boot in the sandbox, with the user-data holding `wrapped`, and the
    bootstrap its write_files puts in the memory-only store."""
    text = render_user_data(
        vault_addr=world.bao.addr, role_id=world.role_id, wrapped_secret_id=wrapped
    )
    instance_dir = first_boot(sandbox.root, text, "i-" + world.unique)
    sandbox.write_bootstrap(world.role_id, wrapped, world.bao.addr)
    assert holding(instance_dir, wrapped)  # positive control
    return instance_dir


def scrub_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "bootsecrets.userdata"]


def test_bootstrap_scrubs_cloud_inits_copies_once_the_unwrap_is_sent(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.sandbox.write_config(world.config())
    wrapped = world.bao.wrapped_secret_id(world.role)
    instance_dir = boot_with_user_data(world, world.sandbox, wrapped)

    code, _, err = world.sandbox.run("bootstrap")

    assert code == 0, err
    assert holding(world.sandbox.root, wrapped) == {}  # the store's copy is gone too
    assert not world.sandbox.paths.bootstrap.exists()
    (record,) = scrub_records(caplog)
    assert record.levelno == logging.INFO
    assert "sent for unwrapping" in record.getMessage()
    files = record.SCRUBBED_FILES.split(",")  # type: ignore[attr-defined]
    assert {Path(f).name for f in files} == set(COPIES)
    assert all(f.startswith(f"/{INSTANCE}/{instance_dir.name}/") for f in files)
    # cloud-init still has everything else.
    assert query(world.sandbox.root)["cloud_config"]["write_files"][0]["path"] == (
        "/run/bootsecrets/bootstrap.yaml"
    )


def test_bootstrap_failing_before_the_unwrap_scrubs_the_disk_and_keeps_the_store_copy(
    world: World, openbao: OpenBao, caplog: pytest.LogCaptureFixture
) -> None:
    world.sandbox.write_config(world.config())
    forged = openbao.wrap({"secret_id": "forged-" + secrets.token_hex(8)})
    boot_with_user_data(world, world.sandbox, forged)

    code, _, _ = world.sandbox.run("bootstrap")

    assert code == errors.WrappingPathMismatch.exit_code
    # Live (never unwrapped): on disk only in the memory-only store, for a retry.
    assert holding(world.sandbox.root, forged) == {"run/bootsecrets/bootstrap.yaml": 1}
    (record,) = scrub_records(caplog)
    assert "failed before the unwrap" in record.getMessage()
    assert "stays in the memory-only store for a retry" in record.getMessage()


def test_a_reboot_without_bootstrap_touches_nothing(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.sandbox.write_config(world.config())
    code, _, _ = world.sandbox.run("bootstrap")
    assert code == errors.NotProvisioned.exit_code
    assert scrub_records(caplog) == []


def test_a_later_boot_scrubs_what_cloud_init_wrote_again(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """cloud-init fetches the user-data again at the next boot (a NoCloud seed stays
    attached; DigitalOcean's metadata service serves it for the droplet's life) and writes
    its files again, spent token included: that boot's bootstrap, with nothing to bootstrap,
    scrubs it. (Found by the end-to-end VM test's disk scan after the last boot.)"""
    world.sandbox.write_config(world.config())
    wrapped = world.bao.wrapped_secret_id(world.role)
    text = render_user_data(
        vault_addr=world.bao.addr, role_id=world.role_id, wrapped_secret_id=wrapped
    )
    instance_id = "i-" + world.unique
    instance_dir = first_boot(world.sandbox.root, text, instance_id)
    world.sandbox.write_bootstrap(world.role_id, wrapped, world.bao.addr)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    assert holding(world.sandbox.root, wrapped) == {}

    # The next boot: the store is gone (tmpfs), cloud-init reads the same user-data again.
    shutil.rmtree(world.sandbox.store)
    first_boot(world.sandbox.root, text, instance_id)
    assert holding(instance_dir, wrapped) == COPIES  # positive control: as the VM showed
    caplog.clear()
    code, _, _ = world.sandbox.run("bootstrap")
    assert code == errors.NotProvisioned.exit_code  # reprovision: nothing to log in with
    assert holding(world.sandbox.root, wrapped) == {}
    (record,) = scrub_records(caplog)
    assert "user-data of an earlier boot again" in record.getMessage()
    assert {Path(f).name for f in record.SCRUBBED_FILES.split(",")} == set(COPIES)  # type: ignore[attr-defined]
    # cloud-init goes on with what it has.
    assert query(world.sandbox.root)["cloud_config"]["write_files"][0]["path"] == (
        "/run/bootsecrets/bootstrap.yaml"
    )
    # And once scrubbed, later bootstraps find nothing more to do.
    caplog.clear()
    world.sandbox.run("bootstrap")
    assert scrub_records(caplog) == []


def test_only_the_wrapped_secret_id_field_is_taken_for_an_earlier_token(
    instance: tuple[Path, str, str],
) -> None:
    root, token, _ = instance
    assert userdata.earlier_tokens(root) == [token]
    assert userdata.earlier_tokens(root, current=token) == []
    userdata.scrub(token, root)
    assert userdata.earlier_tokens(root) == []  # the marker is not a token
