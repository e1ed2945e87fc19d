"""QEMU harness for the end-to-end test: boot the built image with a NoCloud seed and any
extra disks, watch the serial console, run commands over SSH, reboot, power off cleanly.

Only QEMU's user-mode network ("slirp") is used: the guest sees the host's loopback as
10.0.2.2, and host ports forwarded with hostfwd (bound to 127.0.0.1 on the host) reach the
guest's SSH and demo ports. Nothing else is reachable from the guest.

Each VM boots a copy-on-write overlay of the image (`overlay()`), so the built image stays
pristine for the next VM. Extra disks (`Drive`) appear in the guest as
/dev/disk/by-id/virtio-<serial>. A reboot is the guest's own (`systemctl reboot`); QEMU runs
with -no-reboot, exits, and `reboot()` starts it again on the same disks: every boot has its
own serial log. TCG by default (KVM hangs on the reference machine); BOOTSECRETS_E2E_KVM=1
allows KVM.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shlex
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from e2e_image import KERNEL_APPEND, kvm, log


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def overlay(base: Path, out: Path) -> Path:
    """A qcow2 overlay backed by BASE: the VM writes there, BASE is never touched.

    4 KiB clusters, the filesystem's block size: a discarded block (fstrim) reads back as
    zeros (qcow2 ignores a discard of part of a cluster)."""
    out.unlink(missing_ok=True)
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            str(base),
            "-F",
            "qcow2",
            str(out),
        ],
        check=True,
    )
    return out


def blank_disk(out: Path, size: str) -> Path:
    """An empty qcow2 disk (a block volume for the guest)."""
    out.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(out), size], check=True)
    return out


def make_seed(
    out: Path, user_data: str, instance_id: str, hostname: str = "bootsecrets-e2e"
) -> Path:
    """NoCloud seed ISO (label `cidata`) with user-data and meta-data, via cloud-localds."""
    out.mkdir(parents=True, exist_ok=True)
    ud = out / "user-data"
    md = out / "meta-data"
    # user-data holds a wrapped (single-use, short-TTL) secret-id: keep it 0600 on the host too.
    ud.touch(mode=0o600)
    ud.write_text(user_data)
    md.write_text(f"instance-id: {instance_id}\nlocal-hostname: {hostname}\n")
    seed = out / "seed.iso"
    seed.unlink(missing_ok=True)
    subprocess.run(["cloud-localds", str(seed), str(ud), str(md)], check=True)
    return seed


@dataclasses.dataclass(frozen=True)
class Drive:
    """A virtio disk. `serial` names it in the guest: /dev/disk/by-id/virtio-<serial>."""

    path: Path
    format: str = "qcow2"
    serial: str = ""
    readonly: bool = False

    def args(self, index: int) -> list[str]:
        """QEMU arguments for the `index`-th disk. Every disk is an explicit virtio-blk-pci
        device, in command-line order (so /dev/vda is the first): QEMU 7.2 takes a serial
        only on the device, and mixing `-drive if=virtio` with `-device` reorders them."""
        opts = [f"file={self.path}", f"format={self.format}", "cache=unsafe", "discard=unmap"]
        if self.readonly:
            opts.append("readonly=on")
        device = f"virtio-blk-pci,drive=disk{index}" + (
            f",serial={self.serial}" if self.serial else ""
        )
        return ["-drive", ",".join([*opts, "if=none", f"id=disk{index}"]), "-device", device]


class BootTimeout(AssertionError):
    pass


class VM:
    """One QEMU guest on `root` (its first disk, /dev/vda) with a NoCloud seed (/dev/vdb) and
    `drives` after them. Use `running(vm)` to make sure it is powered off afterwards."""

    ssh_user = "debian"

    def __init__(
        self,
        *,
        name: str,
        root: Drive,
        kernel: Path,
        initrd: Path,
        seed: Path,
        workdir: Path,
        ssh_key: Path,
        drives: Sequence[Drive] = (),
        guest_ports: Sequence[int] = (),
        memory_mb: int = 1024,
        cpus: int = 2,
    ) -> None:
        self.name = name
        self.root = root
        self.kernel = kernel
        self.initrd = initrd
        self.seed = seed
        self.drives = tuple(drives)
        self.workdir = workdir
        self.ssh_key = ssh_key
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.ssh_port = free_port()
        self.ports = {port: free_port() for port in guest_ports}
        self.monitor_sock = workdir / f"{name}.qmp"
        self.proc: subprocess.Popen[bytes] | None = None
        self.boots = 0
        self.started = 0.0

    @property
    def serial_log(self) -> Path:
        return self.workdir / f"{self.name}-boot{self.boots}.log"

    # --- lifecycle --------------------------------------------------------------------

    def command(self) -> list[str]:
        accel = ["-accel", "kvm", "-cpu", "host"] if kvm() else ["-accel", "tcg", "-cpu", "max"]
        fwd = [f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"]
        fwd += [f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in self.ports.items()]
        drives: list[str] = []
        for index, drive in enumerate(
            (self.root, Drive(self.seed, "raw", readonly=True), *self.drives)
        ):
            drives += drive.args(index)
        return [
            "qemu-system-x86_64",
            *accel,
            "-m",
            str(self.memory_mb),
            "-smp",
            str(self.cpus),
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            str(self.kernel),
            "-initrd",
            str(self.initrd),
            "-append",
            KERNEL_APPEND,
            *drives,
            "-netdev",
            "user,id=net0," + ",".join(fwd),
            "-device",
            "virtio-net-pci,netdev=net0",
            "-device",
            "virtio-rng-pci",
            "-serial",
            f"file:{self.serial_log}",
            "-qmp",
            f"unix:{self.monitor_sock},server=on,wait=off",
        ]

    def start(self) -> VM:
        assert not self.alive(), f"{self.name} is already running"
        self.boots += 1
        self.serial_log.unlink(missing_ok=True)
        self.serial_log.touch()
        cmd = self.command()
        log(f"qemu ({self.name}, boot {self.boots}): " + " ".join(cmd))
        self.started = time.monotonic()
        with (self.workdir / f"{self.name}.qemu.out").open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def qmp(self, command: str) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(self.monitor_sock))
            f = s.makefile("rwb")
            f.readline()  # greeting
            for cmd in ("qmp_capabilities", command):
                f.write(json.dumps({"execute": cmd}).encode() + b"\n")
                f.flush()
                f.readline()

    def _wait_exit(self, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        asked_acpi = False
        while time.monotonic() < deadline:
            if not self.alive():
                log(f"{self.name}: {what} at {self.elapsed():.0f}s")
                return
            if not asked_acpi and time.monotonic() > deadline - timeout / 2:
                with contextlib.suppress(OSError):
                    self.qmp("system_powerdown")
                asked_acpi = True
            time.sleep(1)
        self.kill()
        raise BootTimeout(f"{self.name}: no {what} within {timeout:.0f}s\n{self.tail()}")

    def poweroff(self, timeout: float = 180) -> None:
        """Clean shutdown: `systemctl poweroff` over SSH, else ACPI powerdown; wait for exit."""
        if not self.alive():
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.ssh("sudo systemctl poweroff", timeout=30, check=False)
        self._wait_exit(timeout, "powered off")

    def reboot(self, timeout: float = 180) -> None:
        """The guest reboots itself; QEMU (-no-reboot) exits and is started again."""
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.ssh("sudo systemctl reboot", timeout=30, check=False)
        self._wait_exit(timeout, "rebooted")
        (self.workdir / "known_hosts").unlink(missing_ok=True)
        self.start()

    # --- serial console ---------------------------------------------------------------

    def console(self) -> str:
        return self.serial_log.read_bytes().decode("utf-8", "replace")

    def tail(self, lines: int = 80) -> str:
        text = self.console().splitlines()[-lines:]
        body = "\n".join(text)
        return f"---- {self.serial_log.name} (last {len(text)} lines) ----\n{body}\n----"

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until this boot's serial log matches the regex `pattern`."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = rx.search(self.console())
            if match:
                log(f"{self.name}: console matched {pattern!r} at {self.elapsed():.0f}s")
                return match
            if not self.alive():
                raise BootTimeout(f"QEMU exited while waiting for {pattern!r}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BootTimeout(
                    f"no {pattern!r} on the console after {timeout:.0f}s\n{self.tail()}"
                )
            time.sleep(1)

    # --- commands over SSH ------------------------------------------------------------

    def ssh_command(self, remote: str) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.ssh_key),
            "-p",
            str(self.ssh_port),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={self.workdir / 'known_hosts'}",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            f"{self.ssh_user}@127.0.0.1",
            remote,
        ]

    def ssh(
        self, remote: str, *, timeout: float = 120, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command line in the guest. Secrets go in `input`, never in `remote`
        (the guest's journal records sudo command lines)."""
        return subprocess.run(
            self.ssh_command(remote),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            input=input,
        )

    def sudo(
        self, *argv: str, timeout: float = 120, input: str | None = None, check: bool = True
    ) -> str:
        """`sudo ARGV` in the guest; its stdout. Fails with stderr unless `check=False`."""
        result = self.ssh("sudo " + shlex.join(argv), timeout=timeout, check=False, input=input)
        if check and result.returncode != 0:
            raise AssertionError(
                f"`sudo {shlex.join(argv)}` exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result.stdout

    def sudo_json(self, *argv: str, timeout: float = 120) -> Any:
        return json.loads(self.sudo(*argv, timeout=timeout))

    def unit(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show UNIT -p PROPS` as a dict."""
        out = self.sudo("systemctl", "show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *match: str) -> list[dict[str, Any]]:
        """This boot's journal entries matching `FIELD=value` terms, as JSON objects."""
        out = self.sudo("journalctl", "-b", "--no-pager", "-o", "json", *match)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def wait_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise BootTimeout(f"QEMU exited while waiting for SSH\n{self.tail()}")
            try:
                r = self.ssh("true", timeout=30, check=False)
                if r.returncode == 0:
                    log(f"{self.name}: ssh up at {self.elapsed():.0f}s")
                    return
                last = r.stderr.strip()
            except subprocess.TimeoutExpired:
                last = "timeout"
            time.sleep(3)
        raise BootTimeout(f"no SSH after {timeout:.0f}s (last: {last})\n{self.tail()}")

    def wait_unit_done(self, unit: str, timeout: float) -> dict[str, str]:
        """Wait until a oneshot unit has run (active, failed, or inactive again without
        RemainAfterExit=); its state properties."""
        deadline = time.monotonic() + timeout
        props = ("ActiveState", "Result", "ExecMainStatus", "ExecMainExitTimestampMonotonic")
        state: dict[str, str] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                state = self.unit(unit, *props)
                if (
                    state.get("ActiveState") in ("active", "failed", "inactive")
                    and state.get("ExecMainExitTimestampMonotonic", "0") != "0"
                ):
                    log(f"{self.name}: {unit} {state['ActiveState']} at {self.elapsed():.0f}s")
                    return state
            time.sleep(3)
        raise BootTimeout(f"{unit} did not finish in {timeout:.0f}s ({state})\n{self.tail()}")

    # --- forwarded HTTP ----------------------------------------------------------------

    def http_json(self, guest_port: int, path: str = "/", timeout: float = 10) -> Any:
        url = f"http://127.0.0.1:{self.ports[guest_port]}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())

    def wait_http(
        self,
        guest_port: int,
        timeout: float,
        until: Callable[[Any], bool] | None = None,
        fail_pattern: str | None = None,
    ) -> Any:
        """Poll a forwarded guest port until it answers JSON (and `until(doc)` is true).
        Gives up early when the serial console matches `fail_pattern`."""
        deadline = time.monotonic() + timeout
        last: object = None
        fail_rx = re.compile(fail_pattern) if fail_pattern else None
        while time.monotonic() < deadline:
            if not self.alive():
                raise BootTimeout(f"QEMU exited while waiting for :{guest_port}\n{self.tail()}")
            if fail_rx and fail_rx.search(self.console()):
                time.sleep(3)  # let the rest of the failure reach the console
                raise BootTimeout(f"the console says the agent failed\n{self.tail()}")
            try:
                doc = self.http_json(guest_port)
                if until is None or until(doc):
                    log(f"{self.name}: :{guest_port} answered at {self.elapsed():.0f}s")
                    return doc
                last = doc
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(2)
        raise BootTimeout(
            f"guest :{guest_port} not ready after {timeout:.0f}s (last: {last!r})\n{self.tail()}"
        )


@contextlib.contextmanager
def running(vm: VM) -> Iterator[VM]:
    """Start; on the way out power off cleanly (kill as a last resort); the console's tail
    goes to the log when the body failed."""
    vm.start()
    try:
        yield vm
    except BaseException:
        log(vm.tail(120))
        raise
    finally:
        try:
            vm.poweroff()
        finally:
            vm.kill()
