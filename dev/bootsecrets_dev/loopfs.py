"""Real filesystems for the data-at-rest tests and the unlock benchmark: ext4 on a loop
device backed by an image file (so the raw bytes can be searched afterwards) and a fresh
tmpfs.

Needs root (losetup, mount), as CI runs; `e2fsprogs` and `util-linux` come from
scripts/install-test-deps. Everything is torn down in `finally` blocks, step by step, so a
failing test or a failing set-up step leaves no mount and no loop device behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

IMAGE_DIR = Path("/var/tmp")  # noqa: S108 (disk-backed, unlike /tmp on some hosts)


def sh(argv: Sequence[str]) -> str:
    """Run a set-up command; fail with its stderr (these commands carry no secret)."""
    proc = subprocess.run(
        list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(argv)}` exited with {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout


def require_root() -> None:
    if os.geteuid() != 0:
        raise RuntimeError(
            "a loop-device filesystem needs root (losetup, mount), as CI "
            "runs: run the tests or benchmarks/run.py as root "
            "(sudo .venv/bin/python ...)"
        )
    for tool in ("mkfs.ext4", "losetup", "mount", "umount"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: run `bash scripts/install-test-deps`")


class LoopFs:
    """An ext4 filesystem in `image`, attached to `device`, mounted at `mountpoint`."""

    def __init__(self, image: Path, device: str, mountpoint: Path) -> None:
        self.image = image
        self.device = device
        self.mountpoint = mountpoint
        self.mounted = False

    def mount(self) -> None:
        sh(["mount", "-t", "ext4", self.device, str(self.mountpoint)])
        self.mounted = True

    def unmount(self) -> None:
        """sync, then unmount: every block the kernel had is in the image file after this."""
        if self.mounted:
            os.sync()
            sh(["umount", str(self.mountpoint)])
            self.mounted = False

    def remount(self) -> None:
        """As across a reboot: the kernel forgets every key added to the filesystem."""
        self.unmount()
        self.mount()

    def count_in_image(self, needle: bytes) -> int:
        """How often `needle` occurs in the raw image file (unmount first)."""
        if self.mounted:
            raise RuntimeError("unmount before reading the raw image")
        return self.image.read_bytes().count(needle)


@contextlib.contextmanager
def ext4_loop(*, encrypt: bool, size_mib: int = 32) -> Iterator[LoopFs]:
    """A fresh ext4 (with or without the `encrypt` feature) on a loop device, mounted."""
    require_root()
    workdir = Path(tempfile.mkdtemp(prefix="bootsecrets-loopfs-", dir=IMAGE_DIR))
    image = workdir / "fs.img"
    mountpoint = workdir / "mnt"
    mountpoint.mkdir()
    device = ""
    fs: LoopFs | None = None
    try:
        with image.open("wb") as handle:
            handle.truncate(size_mib << 20)
        features = ["-O", "encrypt"] if encrypt else ["-O", "^encrypt"]
        sh(["mkfs.ext4", "-q", "-F", "-b", "4096", *features, str(image)])
        device = sh(["losetup", "--find", "--show", str(image)]).strip()
        fs = LoopFs(image, device, mountpoint)
        fs.mount()
        yield fs
    finally:
        try:
            if fs is not None and fs.mounted:
                try:
                    fs.unmount()
                except RuntimeError:
                    sh(["umount", "--lazy", str(mountpoint)])
        finally:
            try:
                if device:
                    sh(["losetup", "--detach", device])
            finally:
                shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def tmpfs_mount() -> Iterator[Path]:
    """A fresh tmpfs, mounted on a directory under /var/tmp."""
    require_root()
    mountpoint = Path(tempfile.mkdtemp(prefix="bootsecrets-tmpfs-", dir=IMAGE_DIR))
    mounted = False
    try:
        sh(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mountpoint)])
        mounted = True
        yield mountpoint
    finally:
        try:
            if mounted:
                sh(["umount", str(mountpoint)])
        finally:
            shutil.rmtree(mountpoint, ignore_errors=True)


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[Path]:
    """`image` attached to a free loop device: a real block device, as a volume is."""
    require_root()
    device = Path(sh(["losetup", "--find", "--show", str(image)]).strip())
    try:
        yield device
    finally:
        sh(["losetup", "--detach", str(device)])
