"""Build the end-to-end test image with `packer build`, as a user builds the local image.

The pipeline, each step a function so the test (and a human debugging it) can run them
one by one:

1. `build_rootfs()`  mmdebstrap a Debian 12 (bookworm) minbase tree into a tarball cached
                     under /var/cache/bootsecrets-e2e/, keyed by a hash of the package list,
                     the mmdebstrap arguments and the apt sources used. The cached tarball is
                     the untouched distribution: nothing of ours, nothing secret, so reusing
                     it across runs is safe. Several runs at once share it (a lock file).
2. `base_disk()`     the stand-in for Debian's cloud image: the tree as a raw ext4 disk made
                     with `mkfs.ext4 -O encrypt -d` (fscrypt-capable root filesystem, no
                     partition table, no bootloader), plus its kernel and initrd for QEMU's
                     direct kernel boot.
3. `seed_dir()`      the build VM's NoCloud seed: only a one-off SSH key for the default user.
4. `packer_build()`  `packer build -only=qemu.local packer/bootsecrets.pkr.hcl` with Debian's
                     packer 1.6.6, offline: the same template, uploads and provisioning
                     scripts as the DigitalOcean build. Output: one qcow2.
5. `mounted_ro()`    the artifact converted to raw and loop-mounted read-only, for
                     `bootsecrets image-check --root` from outside (`image_check()`).

Run as a script for manual use:  python3 tests/e2e/e2e_image.py rootfs|image OUTDIR
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKER_DIR = REPO / "packer"
TEMPLATE = PACKER_DIR / "bootsecrets.pkr.hcl"
CACHE_DIR = Path(os.environ.get("BOOTSECRETS_E2E_CACHE", "/var/cache/bootsecrets-e2e"))
#: The guest's view of the host's loopback under QEMU's user-mode network.
HOST_FROM_GUEST = "10.0.2.2"

SUITE = "bookworm"
# Everything the guest needs. python3-venv/python3-systemd/e2fsprogs are what
# 10-packages.sh installs, cryptsetup-bin what 30-install-config.sh adds for a config with
# encrypted volumes: pre-installed here so the Packer build is offline (the scripts check
# and only reach for apt when something is missing).
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "systemd-resolved",
    "udev",
    "dbus",
    "cloud-init",
    "python3",
    "python3-venv",
    "python3-systemd",
    "linux-image-amd64",
    "initramfs-tools",
    "openssh-server",
    "sudo",
    "iproute2",
    "ifupdown",
    "isc-dhcp-client",
    "netbase",
    "ca-certificates",
    "e2fsprogs",
    "cryptsetup-bin",
    "locales",  # cloud-init's locale module runs update-locale, as on Debian's cloud images
)
MMDEBSTRAP_ARGS = (
    "--variant=minbase",
    "--mode=root",
    "--format=tar",
    # Keep the image small and the build quick: no docs/man pages/locales.
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-include=/usr/share/locale/locale.alias",
    # The locale cloud-init asks for, made once here rather than at every first boot.
    "--customize-hook=echo 'en_US.UTF-8 UTF-8' > \"$1/etc/locale.gen\"",
    '--customize-hook=chroot "$1" locale-gen',
    '--customize-hook=echo LANG=en_US.UTF-8 > "$1/etc/default/locale"',
)
#: Kernel command line of every boot of the image (build VM and test VMs).
KERNEL_APPEND = "root=/dev/vda rw console=ttyS0 panic=-1"


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


#: Wall time per step of the end-to-end run; test_e2e.py prints it at the end.
TIMINGS: dict[str, float] = {}


class timed:
    """Adds the wall time of its block to TIMINGS[name]."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        self.started = time.monotonic()

    def __exit__(self, *exc: object) -> None:
        TIMINGS[self.name] = TIMINGS.get(self.name, 0) + time.monotonic() - self.started


def kvm() -> bool:
    """BOOTSECRETS_E2E_KVM=1: KVM instead of TCG (KVM hangs on the reference machine)."""
    return os.environ.get("BOOTSECRETS_E2E_KVM") == "1"


def apt_sources() -> tuple[str, str]:
    """The host's configured Debian sources (deb822 file or one-line list), as mmdebstrap input.

    Returns (mirror argument, text hashed into the cache key). BOOTSECRETS_E2E_MIRROR overrides.
    """
    override = os.environ.get("BOOTSECRETS_E2E_MIRROR")
    if override:
        return override, override
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.is_file() and "bookworm" in deb822.read_text():
        return str(deb822), deb822.read_text()
    classic = Path("/etc/apt/sources.list")
    if classic.is_file() and "bookworm" in classic.read_text():
        return str(classic), classic.read_text()
    default = "http://deb.debian.org/debian"
    return default, default


def rootfs_key() -> str:
    _mirror, mirror_text = apt_sources()
    blob = json.dumps(
        {"suite": SUITE, "packages": PACKAGES, "args": MMDEBSTRAP_ARGS, "sources": mirror_text},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_rootfs() -> Path:
    """Return the cached rootfs tarball, building it first if needed (1-4 minutes)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / f"rootfs-{SUITE}-{rootfs_key()}.tar"
    with (CACHE_DIR / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run may be building the same tarball
        if target.is_file():
            log(f"rootfs cached: {target}")
            return target
        mirror, _ = apt_sources()
        partial = target.with_suffix(".tar.partial")
        partial.unlink(missing_ok=True)
        cmd = [
            "mmdebstrap",
            *MMDEBSTRAP_ARGS,
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(partial),
            mirror,
        ]
        log("building rootfs: " + " ".join(cmd))
        started = time.monotonic()
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
        partial.rename(target)
        log(f"rootfs built in {time.monotonic() - started:.0f}s: {target}")
        # Old keys are dead weight: keep only the current rootfs.
        for old in CACHE_DIR.glob(f"rootfs-{SUITE}-*.tar"):
            if old != target:
                old.unlink()
        return target


@dataclasses.dataclass(frozen=True)
class BaseDisk:
    """A bootable raw ext4 disk without bootloader, and what boots it."""

    disk: Path
    kernel: Path
    initrd: Path


def base_disk(rootfs_tar: Path, out: Path, size: str = "3G") -> BaseDisk:
    """The rootfs as a raw ext4 disk with the `encrypt` feature, kernel and initrd beside it."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix="tree.") as tmp:
        tree = Path(tmp)
        subprocess.run(
            ["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "-xpf", str(rootfs_tar)],
            check=True,
        )
        kernels = sorted((tree / "boot").glob("vmlinuz-*"))
        initrds = sorted((tree / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise RuntimeError(f"no kernel/initrd in {rootfs_tar}:/boot")
        # mmdebstrap copies the build host's name; a cloud image has none of its own.
        (tree / "etc/hostname").write_text("localhost\n")
        kernel, initrd = out / "vmlinuz", out / "initrd.img"
        shutil.copy2(kernels[-1], kernel)
        shutil.copy2(initrds[-1], initrd)
        disk = out / "base.raw"
        disk.unlink(missing_ok=True)
        subprocess.run(["truncate", "-s", size, str(disk)], check=True)
        # -O encrypt: fscrypt on the root filesystem (15-root-fs.sh checks it in the build).
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-O", "encrypt", "-L", "rootfs", "-d", str(tree), str(disk)],
            check=True,
        )
    return BaseDisk(disk, kernel, initrd)


def ssh_key(path: Path) -> Path:
    """A fresh ed25519 key pair at PATH (private) and PATH.pub."""
    path.unlink(missing_ok=True)
    path.with_suffix(".pub").unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bootsecrets-e2e", "-f", str(path)],
        check=True,
    )
    return path


def seed_dir(out: Path, public_key: str, instance_id: str = "packer-build") -> Path:
    """The build VM's NoCloud seed (Packer's `cd_files`, label cidata): the SSH key only."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "user-data").write_text(
        f"#cloud-config\nssh_authorized_keys:\n  - {json.dumps(public_key)}\n"
    )
    # No local-hostname: the image keeps the hostname it has.
    (out / "meta-data").write_text(f"instance-id: {instance_id}\n")
    return out


def build_wheelhouse(dest: Path) -> None:
    subprocess.run([str(REPO / "scripts/build-wheelhouse"), str(dest)], check=True)


def packer_env(workdir: Path) -> dict[str, str]:
    """Packer with no user config, no plugin directory and no call home."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PACKER_", "PKR_VAR_", "CHECKPOINT_", "DIGITALOCEAN_"))
    }
    env.update(
        CHECKPOINT_DISABLE="1",
        PACKER_CACHE_DIR=str(workdir / "packer_cache"),
        PACKER_CONFIG_DIR=str(workdir),
        PACKER_NO_COLOR="1",
        TMPDIR=str(workdir),
    )
    return env


def packer_build(
    base: BaseDisk,
    *,
    wheelhouse: Path,
    config_file: Path,
    vault_ca_file: Path | None,
    seed: Path,
    private_key: Path,
    workdir: Path,
    extra_vars: Sequence[str] = (),
) -> Path:
    """`packer build -only=qemu.local`; returns the qcow2 it made. Output in WORKDIR/packer.log."""
    output = workdir / "packer-output"
    shutil.rmtree(output, ignore_errors=True)
    variables = {
        "config_file": str(config_file),
        "wheelhouse_dir": str(wheelhouse),
        "install_demo": "true",
        "qemu_image_url": f"file://{base.disk}",
        "qemu_image_checksum": "none",
        "qemu_seed_dir": str(seed),
        "qemu_ssh_private_key_file": str(private_key),
        "qemu_kernel": str(base.kernel),
        "qemu_initrd": str(base.initrd),
        "qemu_append": KERNEL_APPEND,
        "qemu_serial_log": str(workdir / "packer-serial.log"),
        "qemu_output_dir": str(output),
        "qemu_accelerator": "kvm" if kvm() else "tcg",
        "qemu_cpu": "host" if kvm() else "max",
    }
    if vault_ca_file is not None:
        variables["vault_ca_file"] = str(vault_ca_file)
    args = [f"-var={name}={value}" for name, value in variables.items()]
    cmd = [
        "packer",
        "build",
        "-only=qemu.local",
        "-color=false",
        "-timestamp-ui",
        *args,
        *extra_vars,
        str(TEMPLATE),
    ]
    log("packer: " + " ".join(cmd))
    packer_log = workdir / "packer.log"
    with packer_log.open("wb") as out:
        result = subprocess.run(
            cmd,
            cwd=REPO,
            env=packer_env(workdir),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    if result.returncode != 0:
        tail = "\n".join(packer_log.read_text(errors="replace").splitlines()[-60:])
        raise RuntimeError(f"packer build failed ({result.returncode}); {packer_log}:\n{tail}")
    image = output / "bootsecrets-debian-12.qcow2"
    if not image.is_file():
        raise RuntimeError(f"packer build made no {image}")
    return image


def to_raw(image: Path, raw: Path) -> Path:
    """A sparse raw copy of a (qcow2) disk, for loop mounts and raw byte scans."""
    raw.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    return raw


@contextlib.contextmanager
def mounted_ro(raw: Path, point: Path) -> Iterator[Path]:
    """Loop-mount a raw ext4 disk read-only, without replaying its journal."""
    point.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "ext4", "-o", "ro,loop,noload,nodev,nosuid,noexec", str(raw), str(point)],
        check=True,
    )
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def bootsecrets_exe() -> str:
    exe = Path(sys.executable).with_name("bootsecrets")
    return str(exe) if exe.exists() else (shutil.which("bootsecrets") or "bootsecrets")


def image_check(tree: Path) -> subprocess.CompletedProcess[str]:
    """The host's `bootsecrets image-check --root TREE --json` (the check 99-image-check.sh
    ran inside the build, repeated from outside on what Packer left after its shutdown)."""
    return subprocess.run(
        [bootsecrets_exe(), "image-check", "--root", str(tree), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )


def ext4_features(raw: Path) -> set[str]:
    out = subprocess.run(
        ["dumpe2fs", "-h", str(raw)], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        if line.startswith("Filesystem features:"):
            return set(line.split(":", 1)[1].split())
    raise RuntimeError(f"dumpe2fs printed no features for {raw}")


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "rootfs":
        print(build_rootfs())
        return 0
    if len(argv) == 2 and argv[0] == "image":
        out = Path(argv[1]).resolve()
        out.mkdir(parents=True, exist_ok=True)
        wheelhouse = out / "wheelhouse"
        build_wheelhouse(wheelhouse)
        base = base_disk(build_rootfs(), out / "base")
        key = ssh_key(out / "build_key")
        seed = seed_dir(out / "seed", key.with_suffix(".pub").read_text().strip())
        print(
            packer_build(
                base,
                wheelhouse=wheelhouse,
                config_file=PACKER_DIR / "demo/config.yaml",
                vault_ca_file=None,
                seed=seed,
                private_key=key,
                workdir=out,
            )
        )
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
