"""The wrapped secret-id leaves cloud-init's copies of the user-data on disk; cloud-init goes on.

The files are cloud-init's own: Debian's cloud-init package runs its init-stage code on a
NoCloud seed holding the user-data Terraform renders (tests/support/cloudinit_stage.py, with
the system Python that has cloud-init), into a throwaway root. The same code reads them back
after the scrub, as the next boot would: from the pickled datasource, the test's own file
(the agent never unpickles anything).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import secrets
import shutil
import string
import subprocess
import zlib
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


def first_boot(root: Path, user_data: str | bytes, instance_id: str) -> Path:
    """cloud-init's first boot of an instance under ROOT (user-data as text, or as the
    bytes of the seed file, gzip-compressed for one); its instance directory."""
    seed = root / "seed"
    seed.mkdir(parents=True)
    if isinstance(user_data, str):
        user_data = user_data.encode("utf-8")
    (seed / "user-data").write_bytes(user_data)
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


def booted(tmp_path: Path, ssh_key: str, *, compressed: bool) -> tuple[Path, str, str]:
    """(root, token, user-data): cloud-init's files after a first boot with our user-data,
    given as text or gzip-compressed."""
    token = token_shaped()
    text = render_user_data(
        vault_addr="https://vault.example.com:8200",
        role_id="role-" + secrets.token_hex(8),
        wrapped_secret_id=token,
        ssh_authorized_keys=[ssh_key],
    )
    root = tmp_path / "root"
    given = gzip.compress(text.encode(), compresslevel=6) if compressed else text
    first_boot(root, given, "i-" + secrets.token_hex(4))
    return root, token, text


@pytest.fixture
def instance(tmp_path: Path, ssh_key: str) -> tuple[Path, str, str]:
    """cloud-init's files after a first boot with our user-data (`booted`)."""
    return booted(tmp_path, ssh_key, compressed=False)


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


# --- user-data given gzip-compressed -----------------------------------------------------------

#: Where cloud-init 22.4 keeps gzip-compressed user-data: compressed as received, and
#: decompressed in the processed MIME, the merged cloud-config and the pickled datasource
#: (which holds the compressed raw bytes as well).
GZIP_COPIES = {"user-data.txt.i": 1, "cloud-config.txt": 1, "obj.pkl": 1}
GZIP_MEMBERS = {"user-data.txt", "obj.pkl"}


def inflated(data: bytes) -> list[bytes]:
    """The content of every complete gzip member in `data`, found by the standard library's
    inflater (not by the code under test)."""
    members = []
    for start in range(len(data)):
        if data[start : start + 3] != b"\x1f\x8b\x08":
            continue
        inflater = zlib.decompressobj(wbits=31)
        try:
            content = inflater.decompress(data[start:])
        except zlib.error:
            continue
        if inflater.eof:
            members.append(content)
    return members


def holding_compressed(root: Path, needle: str) -> dict[str, int]:
    return {
        rel: sum(m.count(needle.encode()) for m in inflated(data))
        for rel, data in files_under(root).items()
        if any(needle.encode() in m for m in inflated(data))
    }


@pytest.fixture
def gzip_instance(tmp_path: Path, ssh_key: str) -> tuple[Path, str, str]:
    """The same with our user-data gzip-compressed, as Terraform's `cloudinit_config` gives
    it by default."""
    return booted(tmp_path, ssh_key, compressed=True)


def test_gzip_compressed_user_data_is_scrubbed_inside_its_members_in_place(
    gzip_instance: tuple[Path, str, str], ssh_key: str
) -> None:
    root, token, text = gzip_instance
    plain = {rel.rsplit("/", 1)[1]: n for rel, n in holding(root, token).items()}
    compressed = {rel.rsplit("/", 1)[1] for rel in holding_compressed(root, token)}
    assert (plain, compressed) == (GZIP_COPIES, GZIP_MEMBERS)  # positive control
    assert query(root)["userdata_raw_gzip"]
    stats = {rel: os.stat(root / rel) for rel in files_under(root)}

    done = userdata.scrub(token, root)

    assert done.failed == ()
    assert {Path(f).name for f in done.files} == set(GZIP_COPIES) | GZIP_MEMBERS
    assert done.copies == sum(GZIP_COPIES.values()) + len(GZIP_MEMBERS)
    assert holding(root, token) == {} and holding_compressed(root, token) == {}
    for rel, st in stats.items():  # the same inodes, the same sizes: overwritten in place
        now = os.stat(root / rel)
        assert (now.st_ino, now.st_size) == (st.st_ino, st.st_size), rel
    # The standard library reads the rewritten file (zero padding after the member).
    raw = next((root / INSTANCE).glob("*/user-data.txt")).read_bytes()
    marker = userdata.marker(len(token)).decode()
    assert gzip.decompress(raw).decode() == text.replace(token, marker)
    # And so does cloud-init, from its pickled datasource, now and at the next boot.
    doc = query(root)
    assert doc["userdata_raw"] == text.replace(token, marker)
    assert doc["cloud_config"]["ssh_authorized_keys"] == [ssh_key]
    cloud_init("next-boot", str(root))
    assert holding(root, token) == {} and holding_compressed(root, token) == {}
    assert query(root)["userdata_raw"] == text.replace(token, marker)


def test_an_earlier_token_is_found_inside_gzip_compressed_user_data(
    gzip_instance: tuple[Path, str, str],
) -> None:
    root, token, _ = gzip_instance
    for name in GZIP_COPIES:  # leave the token only where it is compressed
        next((root / INSTANCE).glob(f"*/{name}")).unlink()
    assert holding(root, token) == {}  # positive control: not in any file as bytes
    assert userdata.earlier_tokens(root) == [token]
    userdata.scrub(token, root)
    assert userdata.earlier_tokens(root) == []


def test_a_gzip_member_that_would_grow_is_left_whole_and_reported(tmp_path: Path) -> None:
    """A token that compresses better than the marker (24 times the same letter): the
    scrubbed member would not fit where the old one is, so it stays as it was and the
    journal is told; the plain copy in the same file is scrubbed all the same."""
    token = "s." + "a" * 24
    CANARIES.add(token)
    text = f"#cloud-config\nbootsecrets:\n  wrapped_secret_id: {token}\n".encode()
    member = gzip.compress(text, compresslevel=9, mtime=0)
    marker = userdata.marker(len(token))
    grown = gzip.compress(text.replace(token.encode(), marker), compresslevel=9, mtime=0)
    assert len(grown) > len(member)  # the premise
    target = tmp_path / "var/lib/cloud/instances/i-1/obj.pkl"
    target.parent.mkdir(parents=True)
    original = b"plain " + text + b" packed " + member + b" end"
    target.write_bytes(original)

    done = userdata.scrub(token, tmp_path)

    image_path = "/var/lib/cloud/instances/i-1/obj.pkl"
    assert (done.files, done.copies, done.failed) == ((image_path,), 1, (image_path,))
    assert target.read_bytes() == original.replace(text, text.replace(token.encode(), marker), 1)
    assert inflated(target.read_bytes()) == [text]


def test_members_larger_than_a_read_and_one_after_another_are_each_scrubbed(
    tmp_path: Path,
) -> None:
    token = token_shaped()
    noise = secrets.token_hex(64 * 1024).encode()  # compressed, several times 16 KiB
    first = noise[:60000] + f"\nwrapped_secret_id: {token}\n".encode() + noise[60000:]
    second = f"again {token} and {token}".encode()
    members = gzip.compress(first, compresslevel=1) + gzip.compress(second, compresslevel=1)
    target = tmp_path / "var/lib/cloud/instances/i-1/user-data.txt"
    target.parent.mkdir(parents=True)
    target.write_bytes(members)
    assert userdata.earlier_tokens(tmp_path) == [token]

    done = userdata.scrub(token, tmp_path)

    marker = userdata.marker(len(token))
    assert (done.copies, done.failed) == (3, ())
    assert len(target.read_bytes()) == len(members)
    assert inflated(target.read_bytes()) == [
        first.replace(token.encode(), marker),
        second.replace(token.encode(), marker),
    ]
    # Both members, each zero-padded, read as one stream by the standard library.
    assert gzip.decompress(target.read_bytes()) == (first + second).replace(token.encode(), marker)


def test_what_gzip_members_inflate_to_is_bounded_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of gzip bombs cannot hold up the boot: once its members have inflated to
    MAX_BYTES in all, the rest of the file is not inflated (cloud-init's own files hold a
    few KiB). Here MAX_BYTES is 1 MiB and each bomb 600 KiB of zeros."""
    monkeypatch.setattr(userdata, "MAX_BYTES", 1 << 20)
    first, last = token_shaped(), token_shaped()
    bomb = b"\0" * (600 << 10)
    members = [
        gzip.compress(f"wrapped_secret_id: {first}\n".encode()),
        gzip.compress(bomb),  # 600 KiB: within the budget
        gzip.compress(bomb),  # would pass 1 MiB in all: not taken, and the budget is spent
        gzip.compress(f"wrapped_secret_id: {last}\n".encode()),
    ]
    target = tmp_path / "var/lib/cloud/instances/i-1/obj.pkl"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"".join(members))

    assert userdata.earlier_tokens(tmp_path) == [first]
    monkeypatch.setattr(userdata, "MAX_BYTES", 64 << 20)
    assert userdata.earlier_tokens(tmp_path) == [first, last]  # the control


def test_what_only_looks_like_gzip_is_passed_over(tmp_path: Path) -> None:
    token = token_shaped()
    log = tmp_path / "var/log/cloud-init.log"
    log.parent.mkdir(parents=True)
    # A chance gzip magic, a member cut short, and then the token as bytes.
    cut = gzip.compress(f"wrapped_secret_id: {token}".encode())[:-9]
    log.write_bytes(b"\x1f\x8b\x08 not gzip " + cut + f" token={token}\n".encode())
    before = log.read_bytes()

    done = userdata.scrub(token, tmp_path)

    marker = userdata.marker(len(token))
    assert (done.files, done.copies, done.failed) == (("/var/log/cloud-init.log",), 1, ())
    assert log.read_bytes() == before.replace(token.encode(), marker)
    assert userdata.earlier_tokens(tmp_path) == []  # the cut member is not read


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
