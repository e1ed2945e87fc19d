"""Encrypted volumes before anything is spent: what is on each volume's device, checked
against the config and the host's record (volrecord), without writing anything.

A device is one of: not there (yet: waited for later), blank (first use, if `format:
if-blank` and no record says a volume was formatted there), a bootsecrets LUKS2 volume
(its token read and checked: the Transit key the config names, the LUKS UUID the record
names), already open (the mapping on this very device) or open and mounted. Anything else is
refused, as that volume's failure (54-59): the units needing it stay down, the others start.
"""

from __future__ import annotations

import dataclasses
import enum
import grp
import os
import pwd
from pathlib import Path

from bootsecrets import blockdev, luks, transit, volrecord
from bootsecrets.config import Config
from bootsecrets.context import Run
from bootsecrets.errors import (
    BootsecretsError,
    ConfigError,
    DataKeyRejected,
    DataLocked,
    TransitKeyMissing,
    VolumeBlank,
    VolumeFailed,
    VolumeMismatch,
    VolumeMissing,
    VolumeNotBlank,
    VolumeTokenInvalid,
)
from bootsecrets.volconfig import EncryptedVolume, Format

#: Failures of one volume: the others, and the units not needing it, go on.
VOLUME_FAILURES = (
    DataLocked,
    TransitKeyMissing,
    DataKeyRejected,
    VolumeMissing,
    VolumeNotBlank,
    VolumeBlank,
    VolumeTokenInvalid,
    VolumeMismatch,
    VolumeFailed,
)


class VolState(enum.Enum):
    ABSENT = "absent"  # no device (yet): waited for in the unlock
    BLANK = "blank"  # first use: format it
    LOCKED = "locked"  # a bootsecrets LUKS2 volume, not open: decrypt its key and open it
    OPEN = "open"  # open, not mounted: mount it
    MOUNTED = "mounted"  # open and mounted (a second run in one boot)
    REFUSED = "refused"  # `failure` says why; nothing is done with it


@dataclasses.dataclass(frozen=True)
class Prepared:
    volume: EncryptedVolume
    device: Path  # these three under the run's root
    mapper: Path
    mount: Path
    owner: tuple[int, int]
    record: volrecord.VolumeRecord | None
    state: VolState
    token: luks.TransitToken | None = None
    uuid: str | None = None  # the LUKS header's, when there is one
    failure: BootsecretsError | None = None

    @property
    def what(self) -> str:
        return f"encrypted volume {self.volume.name} ({self.volume.device})"

    @property
    def transit_key(self) -> transit.TransitKey:
        if self.token is not None:
            return transit.TransitKey(self.token.mount, self.token.key_name)
        return transit.TransitKey(self.volume.transit_mount, self.volume.transit_key)


@dataclasses.dataclass
class Outcome:
    """Per volume name: its token once mounted, or why it is not."""

    mounted: dict[str, luks.TransitToken] = dataclasses.field(default_factory=dict)
    failed: dict[str, BootsecretsError] = dataclasses.field(default_factory=dict)
    later: dict[str, BootsecretsError] = dataclasses.field(default_factory=dict)


def runner_of(run: Run) -> luks.Runner:
    return run.ctx.block_runner


def check(run: Run) -> tuple[Prepared, ...]:
    return tuple(_check(run, v) for v in run.config.volumes)


def _check(run: Run, volume: EncryptedVolume) -> Prepared:
    owner = _owner(run.config, volume)
    base = Prepared(
        volume,
        run.paths.under_root(volume.device),
        run.paths.under_root(volume.mapper_path),
        run.paths.under_root(volume.mount),
        owner,
        None,
        VolState.ABSENT,
    )
    try:
        record = volrecord.load(run.paths, volume.name)
    except volrecord.RecordInvalid as err:
        return _refused(
            base,
            VolumeMismatch(f"{base.what}: its record {err}; delete it to adopt the volume again"),
        )
    return classify(run, dataclasses.replace(base, record=record))


def classify(run: Run, item: Prepared) -> Prepared:
    """What is on the device, checked against the config and the record; writes nothing."""
    runner = runner_of(run)
    volume, record = item.volume, item.record
    if not os.path.lexists(item.device):
        return dataclasses.replace(item, state=VolState.ABSENT)
    try:
        backing = blockdev.mapped_device(volume.mapper, runner)
        if backing is not None and not blockdev.same_device(backing, item.device):
            return _refused(
                item,
                VolumeMismatch(
                    f"{item.what}: /dev/mapper/{volume.mapper} is open on another device "
                    f"({backing})"
                ),
            )
        found = luks.probe(item.device, runner)
        if "crypto_LUKS" not in found.signatures:
            if backing is not None:
                return _refused(
                    item,
                    VolumeMismatch(
                        f"{item.what}: open as /dev/mapper/{volume.mapper}, but its header is gone"
                    ),
                )
            return _blank(item, found)
        token = luks.read_token(item.device, runner)
        uuid = blockdev.luks_uuid(item.device, runner)
    except luks.TokenMissing:
        return _refused(
            item,
            VolumeTokenInvalid(
                f"{item.what}: its LUKS2 header has no {luks.TOKEN_TYPE} token (not a "
                "bootsecrets volume, a first use cut short, or the token was removed); nothing "
                "can open it, and it is not formatted over"
            ),
        )
    except luks.TokenInvalid as err:
        return _refused(item, VolumeTokenInvalid(f"{item.what}: {err.problem}"))
    except luks.DeviceMissing as err:
        if not os.path.lexists(item.device):
            return dataclasses.replace(item, state=VolState.ABSENT)
        return _refused(item, VolumeFailed(f"{item.what}: {err.problem}"))
    except luks.LuksError as err:
        return _refused(item, VolumeFailed(f"{item.what}: {err.problem}"))
    if record is not None and record.luks_uuid != uuid:
        return _refused(
            item,
            VolumeMismatch(
                f"{item.what}: holds LUKS volume {uuid}, but this host's volume there is "
                f"{record.luks_uuid} ({volrecord.record_path(run.paths, volume.name)})"
            ),
        )
    if (token.mount, token.key_name) != (volume.transit_mount, volume.transit_key):
        return _refused(
            item,
            VolumeMismatch(
                f"{item.what}: its token names Transit key {token.mount}/keys/{token.key_name}, "
                f"the config {volume.transit_mount}/keys/{volume.transit_key}"
            ),
        )
    state = VolState.LOCKED
    if backing is not None:
        mounted = blockdev.mounted_from(item.mount, item.mapper)
        state = VolState.MOUNTED if mounted else VolState.OPEN
    return dataclasses.replace(item, state=state, token=token, uuid=uuid)


def _blank(item: Prepared, found: luks.Blankness) -> Prepared:
    volume, record = item.volume, item.record
    if not found.blank:
        refusal = luks.NotBlank(volume.device, found.signatures, found.first_mib_zero)
        return _refused(item, VolumeNotBlank(f"{item.what}: {refusal.problem}"))
    if record is not None and record.ready:
        return _refused(
            item,
            VolumeMismatch(
                f"{item.what}: is blank, but this host formatted LUKS volume {record.luks_uuid} "
                "there: another volume is attached; refusing to format it"
            ),
        )
    if volume.format is Format.NEVER:
        return _refused(
            item,
            VolumeBlank(f"{item.what}: is blank and `format: never`; nothing was written to it"),
        )
    return dataclasses.replace(item, state=VolState.BLANK)


def _refused(item: Prepared, failure: BootsecretsError) -> Prepared:
    return dataclasses.replace(item, state=VolState.REFUSED, failure=failure)


def _owner(config: Config, volume: EncryptedVolume) -> tuple[int, int]:
    field = f"encrypted_volumes.{volume.name}"
    try:
        uid = int(volume.user) if volume.user.isdigit() else pwd.getpwnam(volume.user).pw_uid
    except KeyError:
        raise ConfigError(
            config.source, None, f"{field}.user", "no such user on this host"
        ) from None
    try:
        gid = int(volume.group) if volume.group.isdigit() else grp.getgrnam(volume.group).gr_gid
    except KeyError:
        raise ConfigError(
            config.source, None, f"{field}.group", "no such group on this host"
        ) from None
    return uid, gid
