"""QEMU harness for the end-to-end test: boot a raw disk with a NoCloud seed, watch the serial
console, reach the guest through user-mode networking, power it off cleanly.

Only QEMU's user-mode network ("slirp") is used: the guest sees the host's loopback as
10.0.2.2, and host ports forwarded with hostfwd (bound to 127.0.0.1 on the host) reach the
guest's SSH and demo ports. Nothing else is reachable from the guest.

TCG by default (KVM hangs on the reference machine); BOOTSECRETS_E2E_KVM=1 allows KVM.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from e2e_image import log


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_seed(out: Path, user_data: str, instance_id: str,
              hostname: str = "bootsecrets-e2e") -> Path:
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


class BootTimeout(AssertionError):
    pass


class VM:
    """One QEMU guest. Use as a context manager: `with VM(...) as vm: vm.wait_for(...)`."""

    def __init__(
        self,
        *,
        disk: Path,
        kernel: Path,
        initrd: Path,
        seed: Path,
        workdir: Path,
        guest_ports: Sequence[int] = (),
        memory_mb: int = 1024,
        cpus: int = 2,
    ) -> None:
        self.disk = disk
        self.kernel = kernel
        self.initrd = initrd
        self.seed = seed
        self.workdir = workdir
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.serial_log = workdir / "serial.log"
        self.monitor_sock = workdir / "qmp.sock"
        self.ssh_port = free_port()
        self.ports = {port: free_port() for port in guest_ports}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    # --- lifecycle --------------------------------------------------------------------

    def command(self) -> list[str]:
        if os.environ.get("BOOTSECRETS_E2E_KVM") == "1":
            accel = ["-accel", "kvm", "-cpu", "host"]
        else:
            accel = ["-accel", "tcg", "-cpu", "max"]
        fwd = [f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"]
        fwd += [f"hostfwd=tcp:127.0.0.1:{host}-:{guest}" for guest, host in self.ports.items()]
        return [
            "qemu-system-x86_64",
            *accel,
            "-m", str(self.memory_mb),
            "-smp", str(self.cpus),
            "-nodefaults",
            "-display", "none",
            "-no-reboot",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append", "root=/dev/vda rw console=ttyS0 panic=-1",
            "-drive", f"file={self.disk},format=raw,if=virtio,cache=unsafe",
            "-drive", f"file={self.seed},format=raw,if=virtio,readonly=on",
            "-netdev", "user,id=net0," + ",".join(fwd),
            "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{self.serial_log}",
            "-qmp", f"unix:{self.monitor_sock},server=on,wait=off",
        ]

    def start(self) -> VM:
        self.serial_log.unlink(missing_ok=True)
        self.serial_log.touch()
        cmd = self.command()
        log("qemu: " + " ".join(cmd))
        self.started = time.monotonic()
        with (self.workdir / "qemu.out").open("wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        return self

    def __enter__(self) -> VM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

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

    def poweroff(self, timeout: float = 180) -> None:
        """Clean shutdown: `systemctl poweroff` over SSH, else ACPI powerdown; wait for exit."""
        if not self.alive():
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            self.ssh("sudo systemctl poweroff", timeout=30, check=False)
        deadline = time.monotonic() + timeout
        asked_acpi = False
        while time.monotonic() < deadline:
            if not self.alive():
                log(f"guest powered off at {self.elapsed():.0f}s")
                return
            if not asked_acpi and time.monotonic() > deadline - timeout / 2:
                with contextlib.suppress(OSError):
                    self.qmp("system_powerdown")
                asked_acpi = True
            time.sleep(1)
        self.kill()
        raise BootTimeout(f"guest did not power off within {timeout:.0f}s\n{self.tail()}")

    # --- serial console ---------------------------------------------------------------

    def console(self) -> str:
        return self.serial_log.read_bytes().decode("utf-8", "replace")

    def tail(self, lines: int = 80) -> str:
        text = self.console().splitlines()[-lines:]
        body = "\n".join(text)
        return f"---- serial console (last {len(text)} lines) ----\n{body}\n----"

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the serial log matches the regex `pattern`."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = rx.search(self.console())
            if match:
                log(f"console matched {pattern!r} at {self.elapsed():.0f}s")
                return match
            if not self.alive():
                raise BootTimeout(f"QEMU exited while waiting for {pattern!r}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise BootTimeout(
                    f"no {pattern!r} on the console after {timeout:.0f}s\n{self.tail()}")
            time.sleep(1)

    # --- guest access -----------------------------------------------------------------

    ssh_user = "debian"
    ssh_key: Path | None = None

    def ssh_command(self, remote: str) -> list[str]:
        assert self.ssh_key is not None, "set vm.ssh_key first"
        return [
            "ssh",
            "-i", str(self.ssh_key),
            "-p", str(self.ssh_port),
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "StrictHostKeyChecking=no",
            "-o", f"UserKnownHostsFile={self.workdir / 'known_hosts'}",
            "-o", "ConnectTimeout=10",
            "-o", "LogLevel=ERROR",
            f"{self.ssh_user}@127.0.0.1",
            remote,
        ]

    def ssh(self, remote: str, *, timeout: float = 120, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ssh_command(remote), capture_output=True, text=True, timeout=timeout,
            check=check, input=input,
        )

    def wait_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.alive():
                raise BootTimeout(f"QEMU exited while waiting for SSH\n{self.tail()}")
            try:
                r = self.ssh("true", timeout=30, check=False)
                if r.returncode == 0:
                    log(f"ssh up at {self.elapsed():.0f}s")
                    return
                last = r.stderr.strip()
            except subprocess.TimeoutExpired:
                last = "timeout"
            time.sleep(3)
        raise BootTimeout(f"no SSH after {timeout:.0f}s (last: {last})\n{self.tail()}")

    def http_json(self, guest_port: int, path: str = "/", timeout: float = 10) -> Any:
        url = f"http://127.0.0.1:{self.ports[guest_port]}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())

    def wait_http(self, guest_port: int, timeout: float, until: Callable[[Any], bool] | None = None,
                  fail_pattern: str | None = None) -> Any:
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
                    log(f"guest :{guest_port} answered at {self.elapsed():.0f}s")
                    return doc
                last = doc
            except (OSError, ValueError) as exc:
                last = exc
            time.sleep(2)
        raise BootTimeout(f"guest :{guest_port} not ready after {timeout:.0f}s (last: {last!r})\n"
                          f"{self.tail()}")


@contextlib.contextmanager
def running(vm: VM) -> Iterator[VM]:
    """Start, and on the way out power off cleanly (kill as a last resort)."""
    vm.start()
    try:
        yield vm
    finally:
        try:
            vm.poweroff()
        finally:
            vm.kill()
