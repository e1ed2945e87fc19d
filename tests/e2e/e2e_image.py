"""Build the end-to-end test image: a Debian 12 rootfs provisioned by the Packer scripts.

The pipeline, each step a function so the test (and a human debugging it) can run them
one by one:

1. `build_rootfs()`   mmdebstrap a Debian 12 (bookworm) minbase tree into a tarball cached
                      under /var/cache/bootsecrets-e2e/, keyed by a hash of the package
                      list, the mmdebstrap arguments and the apt sources used. The cached
                      tarball is the untouched distribution: nothing of ours, nothing secret,
                      so reusing it across runs is safe.
2. `provision()`      unpack it into a fresh tree and run the *same* packer/scripts/*.sh files
                      Packer runs, in a chroot, after uploading the wheelhouse, units, demo
                      payload and config to exactly the paths Packer's file provisioners use.
3. `image_check()`    `bootsecrets image-check --root TREE` must report nothing.
4. `make_disk()`      `mkfs.ext4 -d TREE` into a raw disk image; kernel and initrd copied out
                      of TREE/boot for QEMU's direct kernel boot.

Run as a script for manual use:  python3 tests/e2e/e2e_image.py rootfs|image OUTDIR
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKER_DIR = REPO / "packer"
CACHE_DIR = Path(os.environ.get("BOOTSECRETS_E2E_CACHE", "/var/cache/bootsecrets-e2e"))

SUITE = "bookworm"
# Everything the guest needs; python3-venv/python3-systemd are what 10-packages.sh installs,
# pre-installed here so provisioning in the chroot is offline and fast (the script checks
# and only reaches for apt when something is missing).
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
)


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
    """Return the cached rootfs tarball, building it first if needed (about 2-4 minutes)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    target = CACHE_DIR / f"rootfs-{SUITE}-{rootfs_key()}.tar"
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


@contextlib.contextmanager
def chroot_mounts(tree: Path) -> Iterator[None]:
    """/proc, /sys, /dev (bind) and a tmpfs /run inside TREE for the duration."""
    mounted: list[Path] = []
    try:
        for fstype, src, rel, opts in (
            ("proc", "proc", "proc", []),
            ("sysfs", "sysfs", "sys", ["-o", "ro"]),
            (None, "/dev", "dev", ["--bind"]),
            (None, "/dev/pts", "dev/pts", ["--bind"]),
            ("tmpfs", "tmpfs", "run", ["-o", "mode=0755,nosuid,nodev"]),
        ):
            point = tree / rel
            point.mkdir(parents=True, exist_ok=True)
            args = ["mount", *opts]
            if fstype:
                args += ["-t", fstype]
            subprocess.run([*args, src, str(point)], check=True)
            mounted.append(point)
        yield
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], check=False)


def upload(tree: Path, wheelhouse: Path, config_file: Path) -> None:
    """Copy what Packer's `file` provisioners upload, to the same in-guest paths.

    Keep in sync with the `provisioner "file"` blocks in packer/bootsecrets.pkr.hcl:
      wheelhouse/         -> /tmp/bootsecrets/wheelhouse/
      systemd/            -> /tmp/bootsecrets/systemd/
      packer/demo/        -> /tmp/bootsecrets/demo/
      var.config_file     -> /tmp/bootsecrets/config.yaml
    """
    dest = tree / "tmp/bootsecrets"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copytree(wheelhouse, dest / "wheelhouse")
    shutil.copytree(REPO / "systemd", dest / "systemd")
    shutil.copytree(PACKER_DIR / "demo", dest / "demo")
    shutil.copy2(config_file, dest / "config.yaml")


def run_scripts(tree: Path, env: dict[str, str]) -> None:
    """Run packer/scripts/*.sh in lexical order inside TREE, as Packer's shell provisioner does
    (`execute_command` there is `sudo -E sh -eu '{{ .Path }}'` with the same environment)."""
    scripts = sorted((PACKER_DIR / "scripts").glob("*.sh"))
    stage = tree / "tmp/packer-scripts"
    stage.mkdir(parents=True, exist_ok=True)
    base_env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LC_ALL": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        # Only the chroot run sets this: 10-packages.sh then does not wait for cloud-init.
        "BOOTSECRETS_BUILD_CHROOT": "1",
        **env,
    }
    for script in scripts:
        shutil.copy2(script, stage / script.name)
        log(f"provisioner: {script.name}")
        subprocess.run(
            ["chroot", str(tree), "/bin/sh", "-eu", f"/tmp/packer-scripts/{script.name}"],
            check=True,
            env=base_env,
        )
        # 90-clean.sh empties /tmp (including the staged scripts): stage again.
        stage.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(stage, ignore_errors=True)


def provision(
    rootfs_tar: Path, tree: Path, wheelhouse: Path, config_file: Path, *, demo: bool = True,
) -> None:
    tree.mkdir(parents=True, exist_ok=True)
    log(f"unpacking {rootfs_tar.name} into {tree}")
    subprocess.run(
        ["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "-xpf", str(rootfs_tar)],
        check=True,
    )
    upload(tree, wheelhouse, config_file)
    with chroot_mounts(tree):
        # BOOTSECRETS_INSTALL_DEMO mirrors the Packer variable `install_demo`.
        run_scripts(tree, {"BOOTSECRETS_INSTALL_DEMO": "1" if demo else "0"})


def build_wheelhouse(dest: Path) -> None:
    subprocess.run([str(REPO / "scripts/build-wheelhouse"), str(dest)], check=True)


def image_check(tree: Path) -> subprocess.CompletedProcess[str]:
    """Run the host's bootsecrets image-check over TREE (the same check 99-image-check.sh ran
    inside the chroot, repeated from outside so a tampered tree cannot lie about itself)."""
    exe = Path(sys.executable).with_name("bootsecrets")
    agent = str(exe) if exe.exists() else (shutil.which("bootsecrets") or "bootsecrets")
    return subprocess.run(
        [agent, "image-check", "--root", str(tree)],
        capture_output=True,
        text=True,
        check=False,
    )


def make_disk(tree: Path, out: Path, size: str = "3G") -> tuple[Path, Path, Path]:
    """Raw ext4 disk from TREE plus the kernel and initrd for direct boot."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    initrds = sorted((tree / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise RuntimeError(f"no kernel/initrd in {tree}/boot")
    out.mkdir(parents=True, exist_ok=True)
    kernel = out / "vmlinuz"
    initrd = out / "initrd.img"
    shutil.copy2(kernels[-1], kernel)
    shutil.copy2(initrds[-1], initrd)
    disk = out / "disk.raw"
    disk.unlink(missing_ok=True)
    subprocess.run(["truncate", "-s", size, str(disk)], check=True)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "rootfs", "-d", str(tree), str(disk)],
        check=True,
    )
    return disk, kernel, initrd


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "rootfs":
        print(build_rootfs())
        return 0
    if len(argv) == 2 and argv[0] == "image":
        out = Path(argv[1]).resolve()
        out.mkdir(parents=True, exist_ok=True)
        wheelhouse = out / "wheelhouse"
        build_wheelhouse(wheelhouse)
        tree = out / "tree"
        if tree.exists():
            shutil.rmtree(tree)
        provision(build_rootfs(), tree, wheelhouse, PACKER_DIR / "demo/config.yaml")
        result = image_check(tree)
        sys.stderr.write(result.stdout + result.stderr)
        print(make_disk(tree, out))
        return result.returncode
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
