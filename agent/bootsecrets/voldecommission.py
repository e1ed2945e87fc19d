"""The encrypted volumes' part of `bootsecrets decommission`: three steps after the units are
stopped, each idempotent, each run even if the one before failed, each reporting per volume:

1. `unmount-volumes`: `systemctl stop` of the volume's mount unit (PID 1 unmounts; units
   bound to it stop first), `umount` if it is still mounted, then its runtime mount unit
   file removed. A mount still busy names the processes holding files open in it.
2. `close-volumes`: `cryptsetup close`; the volume key leaves the kernel.
3. `erase-volumes`: every token removed and every keyslot destroyed (luks.erase), then the
   host's record of the volume. Only a bootsecrets volume is erased (its header has the
   token, or the LUKS UUID the record names); a device not attached any more is reported
   as failed when the host used it: its header still holds the keyslot, which the Transit
   key's deletion makes worthless (crypto-shred).

After the Transit key is deleted in Vault, even a copy of the header taken earlier (a
snapshot, `luksHeaderBackup`) is useless: its keyslot's passphrase is the data key, which
only that Transit key can decrypt from the token.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

from bootsecrets import blockdev, fsio, luks, volrecord
from bootsecrets.config import Config
from bootsecrets.paths import Paths
from bootsecrets.systemd import Systemctl

#: (outcome, detail) of one step: outcome is done | nothing-to-do | failed.
Result = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    device: Path  # host paths
    mapper: str
    mount: Path
    recorded: bool  # the host has a record of it


def targets(config: Config | None, paths: Paths) -> tuple[Target, ...]:
    """The config's volumes, and those only the records know (no config, or one that no
    longer lists them)."""
    found: dict[str, Target] = {}
    recorded = set(volrecord.names(paths))
    for volume in config.volumes if config else ():
        found[volume.name] = Target(
            volume.name, volume.device, volume.mapper, volume.mount, volume.name in recorded
        )
    for name in sorted(recorded - found.keys()):
        try:
            record = volrecord.load(paths, name)
        except volrecord.RecordInvalid:
            continue
        if record is not None:
            found[name] = Target(name, Path(record.device), record.mapper, Path(record.mount), True)
    return tuple(found[name] for name in sorted(found))


def _each(
    volumes: tuple[Target, ...], none: str, one: Callable[[Target], tuple[str, str]]
) -> Result:
    """Run `one` per volume ((outcome, note) each) and sum them up."""
    if not volumes:
        return "nothing-to-do", none
    outcomes, notes = [], []
    for target in volumes:
        try:
            outcome, note = one(target)
        except luks.LuksError as err:
            outcome, note = "failed", err.problem
        except OSError as err:
            outcome, note = "failed", f"{err.strerror} ({type(err).__name__})"
        outcomes.append(outcome)
        notes.append(f"{target.name} ({target.device}): {note}")
    total = "failed" if "failed" in outcomes else "done" if "done" in outcomes else "nothing-to-do"
    return total, "; ".join(notes)


def unmount(
    volumes: tuple[Target, ...], paths: Paths, systemctl: Systemctl, runner: luks.Runner
) -> Result:
    def one(target: Target) -> tuple[str, str]:
        where = paths.under_root(target.mount)
        mapper = paths.under_root(Path("/dev/mapper") / target.mapper)
        unit = blockdev.unit_name_for(target.mount)
        outcome, note = "nothing-to-do", "not mounted"
        if blockdev.mounted_from(where, mapper):
            systemctl("stop", "--", unit, check=False)
            if blockdev.mounted_from(where, mapper):
                runner(("umount", str(where)), check=False)
            if blockdev.mounted_from(where, mapper):
                users = ", ".join(f"{pid} ({name})" for pid, name in blockdev.users_of(where))
                return "failed", (
                    f"still mounted at {target.mount}: in use (processes: "
                    f"{users or 'unknown'}); stop them and run it again"
                )
            outcome, note = "done", f"unmounted from {target.mount}"
        unit_file = paths.dropin_root / unit
        if os.path.lexists(unit_file):
            fsio.unlink_nofollow(paths.root, unit_file)
            systemctl.daemon_reload()
            note += f"; {unit} removed"
        return outcome, note

    return _each(volumes, "no encrypted volume", one)


def close(volumes: tuple[Target, ...], runner: luks.Runner) -> Result:
    def one(target: Target) -> tuple[str, str]:
        if luks.close_volume(target.mapper, runner):
            return "done", f"/dev/mapper/{target.mapper} closed: its key left the kernel"
        return "nothing-to-do", f"/dev/mapper/{target.mapper} not open"

    return _each(volumes, "no encrypted volume", one)


def erase(volumes: tuple[Target, ...], paths: Paths, runner: luks.Runner) -> Result:
    def one(target: Target) -> tuple[str, str]:
        device = paths.under_root(target.device)
        if not os.path.lexists(device):
            if target.recorded:
                return "failed", (
                    "not attached: its LUKS2 header still holds the keyslot; "
                    "attach it and run again, or delete its Transit key"
                )
            return "nothing-to-do", "not attached, and this host never used it"
        try:
            header = luks.read_header(device, runner)
        except luks.NotLuks:
            _forget(paths, target)
            return "nothing-to-do", "no LUKS header (never formatted)"
        if not header.keyslots and not header.tokens:
            _forget(paths, target)
            return "nothing-to-do", "already erased"
        if not _ours(paths, target, device, header, runner):
            return "failed", (
                "its LUKS2 header is not a bootsecrets volume's (no token, "
                "another UUID than this host's record); left untouched"
            )
        erasure = luks.erase(device, runner)
        _forget(paths, target)
        note = (
            f"erased: keyslot(s) {', '.join(map(str, erasure.keyslots_erased)) or '-'} "
            f"destroyed, token(s) {', '.join(map(str, erasure.tokens_removed)) or '-'} "
            "removed"
        )
        if luks.is_open(target.mapper, runner):
            note += (
                f"; /dev/mapper/{target.mapper} is still open, so its data stays "
                "readable on this host until it is closed or the host is off"
            )
        return "done", note

    return _each(volumes, "no encrypted volume", one)


def _ours(
    paths: Paths, target: Target, device: Path, header: luks.LuksHeader, runner: luks.Runner
) -> bool:
    if header.token is not None:
        return True
    try:
        record = volrecord.load(paths, target.name)
    except volrecord.RecordInvalid:
        return False
    return record is not None and record.luks_uuid == blockdev.luks_uuid(device, runner)


def _forget(paths: Paths, target: Target) -> None:
    volrecord.remove(paths, target.name)
