"""Stand-ins for the two parts of encrypted volumes this host cannot run: device-mapper (the
host kernel has none) and PID 1 mounting a mount unit.

`DeviceMapper` is a `luks.Runner`: every command runs for real (cryptsetup on image files,
blkid, mkfs, mount, umount) except three that need device-mapper:

* `cryptsetup open` first runs the real `cryptsetup open --test-passphrase` with the same
  key on stdin (so a wrong key is refused by cryptsetup itself, exit 2), then stands in for
  the mapping with a loop device over a plain backing file per LUKS UUID (outside the
  sandbox root), linked as `<root>/dev/mapper/<name>`. The data written through it persists
  across simulated reboots and is gone with a new header (a new UUID), as a real volume's
  plaintext view would be. What it cannot show, that the bytes on the volume are
  ciphertext, is the e2e VM test's job (tests/e2e/test_e2e.py with tests/e2e/e2e_atrest.py).
* `cryptsetup status` and `cryptsetup close` answer from that table, with cryptsetup's
  exit codes (0 active, 4 inactive, 5 busy).

`Pid1` is the recording systemctl (systemd.RecordingRunner) that also does what PID 1 does
with `start`/`stop` of a `.mount` unit: reads the unit file the agent wrote under
`<root>/run/systemd/system`, refuses one whose Where= does not match its name (as systemd
does), and mounts What= at Where= (both under the root) with Type= and Options=.
"""

from __future__ import annotations

import configparser
import dataclasses
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bootsecrets import blockdev, luks
from bootsecrets.errors import CommandFailed
from bootsecrets.systemd import Completed, RecordingRunner

HEADER_BYTES = 16 << 20  # LUKS2's default data offset


@dataclasses.dataclass
class Mapping:
    device: str  # as `cryptsetup open` was given it
    loop: str
    link: Path


@dataclasses.dataclass
class DeviceMapper:
    root: Path
    workdir: Path
    calls: list[tuple[tuple[str, ...], int | None]] = dataclasses.field(default_factory=list)
    active: dict[str, Mapping] = dataclasses.field(default_factory=dict)
    #: Make the next `cryptsetup <verb>` fail with this (returncode, stderr).
    fail: dict[str, tuple[int, str]] = dataclasses.field(default_factory=dict)

    def __call__(
        self, argv: Sequence[str], *, stdin: luks.Stdin | None = None, check: bool = True
    ) -> luks.Completed:
        command = tuple(argv)
        self.calls.append((command, None if stdin is None else memoryview(stdin).nbytes))
        verb = command[1] if command[0] == luks.CRYPTSETUP and len(command) > 1 else ""
        if verb in self.fail:
            code, err = self.fail.pop(verb)
            return self._done(command, code, "", err, check)
        if verb == "open" and "--test-passphrase" not in command:
            return self._open(command, stdin, check)
        if verb == "status":
            return self._status(command, check)
        if verb == "close":
            return self._close(command, check)
        return luks.run(command, stdin=stdin, check=check)

    def argvs(self) -> list[tuple[str, ...]]:
        return [argv for argv, _ in self.calls]

    def _done(
        self, command: tuple[str, ...], code: int, out: str, err: str, check: bool
    ) -> luks.Completed:
        if check and code != 0:
            raise luks.CryptsetupFailed(command[-1], command, code, err)
        return luks.Completed(command, code, out, err)

    def _open(
        self, command: tuple[str, ...], stdin: luks.Stdin | None, check: bool
    ) -> luks.Completed:
        device, name = command[-2], command[-1]
        if name in self.active:
            return self._done(command, 5, "", f"Device {name} already exists.\n", check)
        test = luks.run(luks.check_key_argv(Path(device)), stdin=stdin, check=False)
        if test.returncode != 0:
            return self._done(command, test.returncode, "", test.stderr, check)
        uuid = luks.run((luks.CRYPTSETUP, "luksUUID", device)).stdout.strip()
        plain = self.workdir / f"plain-{uuid}.img"
        if not plain.exists():
            size = os.stat(device).st_size
            with plain.open("wb") as handle:
                handle.truncate(max(size - HEADER_BYTES, 16 << 20))
        loop = _sh("losetup", "--find", "--show", str(plain)).strip()
        link = self.root / "dev/mapper" / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(loop)
        self.active[name] = Mapping(device, loop, link)
        return self._done(command, 0, "", "", check)

    def _status(self, command: tuple[str, ...], check: bool) -> luks.Completed:
        name = command[-1]
        mapping = self.active.get(name)
        if mapping is None:
            return self._done(command, 4, f"/dev/mapper/{name} is inactive.\n", "", check)
        return self._done(
            command,
            0,
            f"/dev/mapper/{name} is active.\n  type:    LUKS2\n"
            f"  cipher:  aes-xts-plain64\n  device:  {mapping.device}\n",
            "",
            check,
        )

    def _close(self, command: tuple[str, ...], check: bool) -> luks.Completed:
        name = command[-1]
        mapping = self.active.get(name)
        if mapping is None:
            return self._done(command, 4, "", f"Device {name} is not active.\n", check)
        if any(m.device == os.stat(mapping.loop).st_rdev for m in blockdev.mounts()):
            return self._done(command, 5, "", f"Device {name} is still in use.\n", check)
        self._detach(name)
        return self._done(command, 0, "", "", check)

    def _detach(self, name: str) -> None:
        mapping = self.active.pop(name)
        mapping.link.unlink(missing_ok=True)
        _sh("losetup", "--detach", mapping.loop)

    def reboot(self) -> None:
        """What a reboot does to the mappings (unmount first: Pid1.reboot)."""
        for name in list(self.active):
            self._detach(name)

    def cleanup(self) -> None:
        for name, mapping in list(self.active.items()):
            rdev = os.stat(mapping.loop).st_rdev
            for entry in reversed(blockdev.mounts()):
                if entry.device == rdev:
                    subprocess.run(["umount", "--lazy", entry.mount_point], check=False)
            self._detach(name)


@dataclasses.dataclass
class Pid1(RecordingRunner):
    root: Path = Path("/")
    #: Units whose `start` fails (as a mount that systemd gives up on).
    failing: set[str] = dataclasses.field(default_factory=set)
    #: Units whose `start` succeeds without mounting anything where the agent looks (as
    #: when PID 1's mount did not propagate into the agent's namespace).
    unseen: set[str] = dataclasses.field(default_factory=set)

    def __call__(self, argv: Sequence[str], *, check: bool = True) -> Completed:
        command = tuple(argv)
        units = command[command.index("--") + 1 :] if "--" in command else ()
        if (
            len(command) > 1
            and command[1] in ("start", "stop")
            and units
            and all(u.endswith(".mount") for u in units)
        ):
            self.calls.append(command)
            code = 0
            for unit in units:
                code = code or (self._start(unit) if command[1] == "start" else self._stop(unit))
            if check and code != 0:
                raise CommandFailed(command, code, "")
            return Completed(command, code, "", "")
        return super().__call__(argv, check=check)

    def unit(self, name: str) -> dict[str, str] | None:
        path = self.root / "run/systemd/system" / name
        if not path.exists():
            return None
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read_string(path.read_text())
        return {k: v.replace("%%", "%") for k, v in parser["Mount"].items()}

    def _start(self, name: str) -> int:
        unit = self.unit(name)
        if unit is None or name in self.failing:
            return 5  # "Unit ... not found." / a failed job
        if name in self.unseen:
            return 0
        where, what = unit["Where"], unit["What"]
        if blockdev.unit_name_for(Path(where)) != name:
            return 1  # systemd: "Where= setting doesn't match unit name. Refusing."
        target = self.root / where.lstrip("/")
        source = self.root / what.lstrip("/")
        if blockdev.mounted_from(target, source):
            return 0
        target.mkdir(parents=True, exist_ok=True)
        return subprocess.run(
            ["mount", "-t", unit["Type"], "-o", unit["Options"], str(source), str(target)],
            capture_output=True,
            check=False,
        ).returncode

    def _stop(self, name: str) -> int:
        unit = self.unit(name)
        if unit is None:
            return 5
        target = self.root / unit["Where"].lstrip("/")
        if blockdev.mounted_at(target) is None:
            return 0
        os.sync()
        return subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode

    def reboot(self) -> None:
        """Unmount every mount under the root (a reboot; the units go with /run)."""
        root = os.path.realpath(self.root)
        os.sync()
        for entry in reversed(blockdev.mounts()):
            if entry.mount_point.startswith(root + "/"):
                subprocess.run(["umount", entry.mount_point], check=True)
        shutil.rmtree(self.root / "run/systemd", ignore_errors=True)


def _sh(*argv: str) -> str:
    proc = subprocess.run(
        list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(argv)}` exited with {proc.returncode}: {proc.stderr.strip()}"
        )
    return proc.stdout
