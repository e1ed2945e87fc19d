"""The block-device edge of encrypted volumes, besides cryptsetup itself (luks): the LUKS
UUID and the device behind an open mapping, mkfs, the mount table, and the runtime mount
unit through which PID 1 mounts a volume.

Why PID 1 mounts: bootsecrets.service runs in a mount namespace of its own
(`ProtectSystem=strict`), whose new mounts do not propagate back to the host; a volume it
mounted itself would be invisible to the units that need it. So the agent writes
`/run/systemd/system/<escaped mount point>.mount` (What=/dev/mapper/<mapper>) and starts it.
Mounts made by PID 1 do propagate *into* the agent's namespace, so `/proc/self/mountinfo`
tells the agent whether the volume is mounted, by device number.

Commands go through luks.Runner (argv, optional stdin): tests swap in a stand-in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from bootsecrets import luks
from bootsecrets.systemd import unit_file_path
from bootsecrets.volconfig import EncryptedVolume, Filesystem

MOUNTINFO = Path("/proc/self/mountinfo")
#: The runtime drop-in binding a unit to the mounts of the volumes it needs.
VOLUME_DROPIN = "52-bootsecrets-volume.conf"
UNIT_COMMENT = "# Written by bootsecrets at runtime; gone at reboot. Do not edit."

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_UNIT_VALID = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.")


# --- cryptsetup facts --------------------------------------------------------------------


def luks_uuid(device: Path, runner: luks.Runner = luks.run) -> str:
    """The UUID in the device's LUKS header (`cryptsetup luksUUID`)."""
    result = runner((luks.CRYPTSETUP, "luksUUID", str(device)), check=False)
    uuid = result.stdout.strip()
    if result.returncode != 0 or not _UUID.fullmatch(uuid):
        raise luks.CryptsetupFailed(device, result.argv, result.returncode, result.stderr)
    return uuid


def mapped_device(name: str, runner: luks.Runner = luks.run) -> Path | None:
    """The device behind the open mapping `name` (`cryptsetup status`: its `device:` line);
    None when the mapping is not active."""
    result = runner(luks.status_argv(name), check=False)
    if result.returncode == 4:  # cryptsetup: "wrong device specified": not active
        return None
    if result.returncode != 0:
        raise luks.CryptsetupFailed(name, result.argv, result.returncode, result.stderr)
    for line in result.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "device" and value.strip():
            return Path(value.strip())
    raise luks.CryptsetupFailed(
        name, result.argv, result.returncode, "`cryptsetup status` named no device"
    )


def same_device(first: Path, second: Path) -> bool:
    """Whether two paths are the same block device (or file), symlinks followed."""
    try:
        one, two = os.stat(first), os.stat(second)
    except OSError:
        return False
    if one.st_rdev or two.st_rdev:
        return one.st_rdev == two.st_rdev
    return (one.st_dev, one.st_ino) == (two.st_dev, two.st_ino)


# --- mkfs ----------------------------------------------------------------------------------


def mkfs_argv(filesystem: Filesystem, device: Path) -> tuple[str, ...]:
    """No force flag: mkfs refuses (stdin is closed, so it cannot be asked) a device on
    which it finds a filesystem. No discard: a new mapping has nothing to discard."""
    if filesystem is Filesystem.XFS:
        return ("mkfs.xfs", "-q", "-K", str(device))
    return ("mkfs.ext4", "-q", "-E", "nodiscard", str(device))


def make_filesystem(
    volume: EncryptedVolume, device: Path, owner: tuple[int, int], runner: luks.Runner = luks.run
) -> None:
    """mkfs on the open mapping, then the filesystem's root given the volume's owner and
    mode through a private mount (the agent's own namespace; gone when it is done)."""
    _checked(runner, mkfs_argv(volume.filesystem, device), device)
    workdir = Path(tempfile.mkdtemp(prefix="bootsecrets-mkfs-"))
    try:
        _checked(
            runner,
            (
                "mount",
                "-t",
                volume.filesystem.value,
                "-o",
                "nodev,nosuid,noexec",
                str(device),
                str(workdir),
            ),
            device,
        )
        try:
            fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchown(fd, *owner)
                os.fchmod(fd, volume.mode)
            finally:
                os.close(fd)
        finally:
            _checked(runner, ("umount", str(workdir)), device)
    finally:
        with contextlib.suppress(OSError):
            workdir.rmdir()


def _checked(runner: luks.Runner, argv: tuple[str, ...], device: Path) -> None:
    result = runner(argv, check=False)
    if result.returncode != 0:
        raise luks.CryptsetupFailed(device, argv, result.returncode, result.stderr)


# --- the mount table -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MountEntry:
    mount_point: str
    device: int  # st_rdev of the mounted device: os.makedev(major, minor)
    fstype: str
    source: str


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: Path = MOUNTINFO) -> list[MountEntry]:
    entries = []
    for line in mountinfo.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        major, _, minor = fields[2].partition(":")
        entries.append(
            MountEntry(
                _unescape(fields[4]),
                os.makedev(int(major), int(minor)),
                tail[0],
                _unescape(tail[1]),
            )
        )
    return entries


def mounted_at(path: Path, mountinfo: Path = MOUNTINFO) -> MountEntry | None:
    """The filesystem mounted last at `path` (what is visible there), if any."""
    where = os.path.realpath(path)
    found = [m for m in mounts(mountinfo) if m.mount_point == where]
    return found[-1] if found else None


def mounted_from(path: Path, device: Path, mountinfo: Path = MOUNTINFO) -> bool:
    """Whether what is visible at `path` is the filesystem on `device`."""
    entry = mounted_at(path, mountinfo)
    if entry is None:
        return False
    try:
        return os.stat(device).st_rdev == entry.device
    except OSError:
        return False


def users_of(path: Path) -> list[tuple[int, str]]:
    """Processes with a file, or their working directory, inside `path` (pid, name)."""
    prefix = os.path.realpath(path)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            links = [entry / "cwd", *(entry / "fd").iterdir()]
            if any(_inside(link, prefix) for link in links):
                found.append((int(entry.name), (entry / "comm").read_text().strip()))
        except OSError:  # the process ended meanwhile
            continue
    return found


def _inside(link: Path, prefix: str) -> bool:
    try:  # an fd may be closed between listing and reading it
        target = os.readlink(link)
    except OSError:
        return False
    return target == prefix or target.startswith(prefix + "/")


# --- waiting for a device ------------------------------------------------------------------


def wait_for(
    path: Path,
    timeout: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Poll until `path` exists (udev makes the by-id link when the volume is attached)."""
    give_up = clock() + timeout
    while not os.path.exists(path):
        if clock() >= give_up:
            return False
        sleep(min(0.5, max(0.0, give_up - clock())))
    return True


# --- the runtime mount unit ----------------------------------------------------------------


def unit_name_for(path: PurePosixPath | Path, suffix: str = ".mount") -> str:
    """systemd's unit name for a path (unit_name_from_path, `systemd-escape --path`)."""
    text = str(PurePosixPath(path)).strip("/")
    if not text:
        return "-" + suffix
    out = []
    for index, char in enumerate(text):
        if char == "/":
            out.append("-")
        elif char in _UNIT_VALID and not (char == "." and index == 0):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return "".join(out) + suffix


def mount_unit_text(volume: EncryptedVolume) -> str:
    """The mount unit PID 1 mounts the volume with. DefaultDependencies=no: it is started
    by the agent, long after local-fs.target; it still goes before umount.target at
    shutdown (units bound to it stop first, then it is unmounted)."""
    return "\n".join(
        [
            UNIT_COMMENT,
            "[Unit]",
            f"Description=bootsecrets encrypted volume {volume.name}",
            "DefaultDependencies=no",
            "Conflicts=umount.target",
            "Before=umount.target",
            "",
            "[Mount]",
            f"What={unit_file_path(volume.mapper_path)}",
            f"Where={unit_file_path(volume.mount)}",
            f"Type={volume.filesystem.value}",
            f"Options={','.join(volume.mount_options)}",
            "",
        ]
    )


def dependency_dropin(mount_units: list[str]) -> str:
    """The drop-in of a unit needing volumes: it starts only after their mounts and is
    stopped with them (BindsTo=), so it never writes into the bare mount point on the root
    disk. While a volume is locked its mount unit does not exist, and a start fails at once."""
    lines = [
        "# Written by bootsecrets at runtime: the unit runs only while the encrypted volumes",
        "# it needs are mounted. Gone at reboot. Do not edit.",
        "[Unit]",
    ]
    for unit in mount_units:
        lines += [f"BindsTo={unit}", f"After={unit}"]
    return "\n".join(lines) + "\n"
