"""The block-device edge besides cryptsetup's own (blockdev): the LUKS UUID chosen at format
time and read back from a real header, the device behind an open mapping as `cryptsetup
status` prints it (a recorder: no device-mapper here), mkfs command lines, the mount table
(a crafted mountinfo with the kernel's escapes, and the real one), waiting for a device."""

from __future__ import annotations

import os
import secrets
import uuid as uuid_module
from collections.abc import Sequence
from pathlib import Path

import pytest

from bootsecrets import blockdev, luks
from bootsecrets.volconfig import Filesystem
from support.loopfs import ext4_loop

CIPHERTEXT = "vault:v1:" + "A" * 120
TOKEN = luks.TransitToken("transit", "web", 1, CIPHERTEXT)


class Scripted:
    """A runner answering one (returncode, stdout, stderr) to everything; records argv."""

    def __init__(self, code: int, out: str = "", err: str = "") -> None:
        self.answer = (code, out, err)
        self.calls: list[tuple[str, ...]] = []

    def __call__(
        self, argv: Sequence[str], *, stdin: luks.Stdin | None = None, check: bool = True
    ) -> luks.Completed:
        self.calls.append(tuple(argv))
        return luks.Completed(tuple(argv), *self.answer)


def test_the_uuid_given_to_luksformat_is_the_headers(tmp_path: Path) -> None:
    image = tmp_path / "volume.img"
    with image.open("wb") as handle:
        handle.truncate(32 << 20)
    chosen = str(uuid_module.uuid4())
    luks.format_volume(image, bytearray(secrets.token_bytes(64)), TOKEN, uuid=chosen)
    assert blockdev.luks_uuid(image) == chosen
    assert luks.format_argv(image, chosen)[-6:] == (
        "--uuid",
        chosen,
        "--key-slot",
        "0",
        "--key-file=-",
        str(image),
    )
    with pytest.raises(ValueError, match="LUKS UUID"):
        luks.format_argv(image, "not-a-uuid")
    with pytest.raises(luks.CryptsetupFailed, match="luksUUID"):
        blockdev.luks_uuid(tmp_path / "absent.img")


def test_the_device_behind_a_mapping() -> None:
    active = Scripted(
        0,
        "/dev/mapper/data is active and is in use.\n  type:    LUKS2\n"
        "  cipher:  aes-xts-plain64\n  keysize: 512 bits\n"
        "  device:  /dev/sda\n  sector size:  512\n",
    )
    assert blockdev.mapped_device("data", active) == Path("/dev/sda")
    assert active.calls == [("cryptsetup", "status", "data")]
    assert blockdev.mapped_device("data", Scripted(4, "/dev/mapper/data is inactive.\n")) is None
    with pytest.raises(luks.CryptsetupFailed, match="Cannot initialize device-mapper"):
        blockdev.mapped_device("data", Scripted(1, "", "Cannot initialize device-mapper.\n"))
    with pytest.raises(luks.CryptsetupFailed, match="named no device"):
        blockdev.mapped_device("data", Scripted(0, "/dev/mapper/data is active.\n"))


def test_mkfs_command_lines() -> None:
    mapper = Path("/dev/mapper/data")
    assert blockdev.mkfs_argv(Filesystem.EXT4, mapper) == (
        "mkfs.ext4",
        "-q",
        "-E",
        "nodiscard",
        "/dev/mapper/data",
    )
    assert blockdev.mkfs_argv(Filesystem.XFS, mapper) == (
        "mkfs.xfs",
        "-q",
        "-K",
        "/dev/mapper/data",
    )


def test_mountinfo_with_the_kernels_escapes(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "90 22 253:3 / /srv/my\\040data rw,nodev,nosuid shared:50 - ext4 /dev/mapper/data rw\n"
        "91 90 0:55 / /srv/my\\040data rw shared:51 - tmpfs tmpfs rw\n"
        "92 22 253:4 / /srv/tab\\011x rw master:3 - xfs /dev/mapper/x rw\n"
    )
    entries = blockdev.mounts(mountinfo)
    assert [(e.mount_point, e.fstype, e.source) for e in entries] == [
        ("/", "ext4", "/dev/sda1"),
        ("/srv/my data", "ext4", "/dev/mapper/data"),
        ("/srv/my data", "tmpfs", "tmpfs"),
        ("/srv/tab\tx", "xfs", "/dev/mapper/x"),
    ]
    assert entries[1].device == os.makedev(253, 3)
    # What is visible at a mount point is what was mounted there last.
    top = blockdev.mounted_at(Path("/srv/my data"), mountinfo)
    assert top is not None and top.fstype == "tmpfs"
    assert blockdev.mounted_at(Path("/srv/other"), mountinfo) is None


def test_the_real_mount_table_by_device_number() -> None:
    with ext4_loop(encrypt=False) as fs:
        assert blockdev.mounted_from(fs.mountpoint, Path(fs.device))
        assert not blockdev.mounted_from(fs.mountpoint, Path("/dev/null"))
        assert not blockdev.mounted_from(fs.mountpoint / "lost+found", Path(fs.device))
        handle = (fs.mountpoint / "open.log").open("w")
        try:
            assert (
                os.getpid(),
                Path(f"/proc/{os.getpid()}/comm").read_text().strip(),
            ) in blockdev.users_of(fs.mountpoint)
        finally:
            handle.close()
        assert os.getpid() not in [pid for pid, _ in blockdev.users_of(fs.mountpoint)]


def test_same_device(tmp_path: Path) -> None:
    target = tmp_path / "image"
    target.write_bytes(b"x")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert blockdev.same_device(link, target)
    assert not blockdev.same_device(target, tmp_path)
    assert not blockdev.same_device(target, tmp_path / "absent")
    assert blockdev.same_device(Path("/dev/null"), Path("/dev/null"))
    assert not blockdev.same_device(Path("/dev/null"), Path("/dev/zero"))


def test_waiting_for_a_device(tmp_path: Path) -> None:
    clock = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds
        if clock[0] >= 2.0:
            (tmp_path / "late").touch()

    assert blockdev.wait_for(tmp_path / "late", 10, sleep=sleep, clock=lambda: clock[0])
    assert slept == [0.5] * 4
    slept.clear()
    clock[0] = 0.0

    def just_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    assert not blockdev.wait_for(tmp_path / "never", 1.2, sleep=just_sleep, clock=lambda: clock[0])
    assert sum(slept) == pytest.approx(1.2)
