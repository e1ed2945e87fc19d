"""The image config's `encrypted_volumes` section: block volumes (DigitalOcean Volumes) put
under LUKS2 by bootsecrets, each with the Transit key that wraps its data key, where it is
mounted and the units that need it.

```yaml
encrypted_volumes:
  pgdata:                                      # record: /var/lib/bootsecrets/volumes/<name>.json
    device: /dev/disk/by-id/scsi-0DO_Volume_pgdata
    mount: /var/lib/postgresql                 # the mount point (PID 1 mounts it)
    units: [postgresql.service]                # declared under `services`; need the mount
    format: if-blank                           # or `never` (the default): format at first use?
    filesystem: ext4                           # ext4 (default) or xfs, made at first use
    mount_options: [nodev, nosuid, noatime]    # default [nodev, nosuid]
    mapper: pgdata                             # /dev/mapper/<mapper>; default the name
    transit_mount: transit                     # default `transit`
    transit_key: web                           # default: the AppRole role name
    user: postgres                             # owner and mode of the filesystem's root,
    group: postgres                            # given when it is made
    mode: "0700"
    attach_timeout: 60                         # seconds to wait for a device not there yet
```

Only names and paths are validated here; what is on the device is looked at on the host
(volumes.check and the unlock).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Collection
from pathlib import Path, PurePosixPath

from bootsecrets.dirconfig import (
    NAME,
    VAULT_COMPONENT,
    EncryptedDirectory,
    _mode,
    _mount,
    _path,
)
from bootsecrets.serviceconfig import owner
from bootsecrets.yamldoc import Node

#: device-mapper names: what `cryptsetup open` and a unit file's What= take literally.
MAPPER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,126}\Z")
#: /dev/mapper/control is device-mapper's own control node, not a name a volume can take.
RESERVED_MAPPERS = frozenset({"control"})
#: Components of a device path: plain names (DigitalOcean: scsi-0DO_Volume_<name>).
DEVICE_COMPONENT = re.compile(r"[A-Za-z0-9_.:@=+-]+\Z")
#: One mount option: a flag or key=value, nothing a mount unit's Options= would split or
#: expand (no comma, space, quote, backslash or `%`).
MOUNT_OPTION = re.compile(r"[a-z][a-z0-9_.-]*(=[A-Za-z0-9_.:/+-]+)?\Z")
#: Options that would hand the mount's lifetime to systemd's fstab logic or change what is
#: mounted: not ours to set.
FORBIDDEN_OPTIONS = (
    "x-",
    "comment=",
    "bind",
    "rbind",
    "move",
    "remount",
    "loop",
    "offset=",
    "sizelimit=",
    "encryption=",
    "defaults",
)
DEFAULT_OPTIONS = ("nodev", "nosuid")
MAX_ATTACH_TIMEOUT = 3600.0


class Format(enum.Enum):
    IF_BLANK = "if-blank"  # first use: LUKS2 and mkfs on a provably blank device
    NEVER = "never"  # the device must already be a bootsecrets LUKS2 volume


class Filesystem(enum.Enum):
    EXT4 = "ext4"
    XFS = "xfs"


@dataclasses.dataclass(frozen=True)
class EncryptedVolume:
    name: str
    device: Path
    mount: Path
    transit_mount: str
    transit_key: str
    units: tuple[str, ...]
    format: Format = Format.NEVER
    filesystem: Filesystem = Filesystem.EXT4
    mount_options: tuple[str, ...] = DEFAULT_OPTIONS
    mapper: str = ""
    user: str = "root"
    group: str = "root"
    mode: int = 0o755
    attach_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.mapper:
            object.__setattr__(self, "mapper", self.name)

    @property
    def mapper_path(self) -> Path:
        return Path("/dev/mapper") / self.mapper


FIELDS = frozenset({"device", "mount", "units"})
OPTIONAL = frozenset(
    {
        "format",
        "filesystem",
        "mount_options",
        "mapper",
        "transit_mount",
        "transit_key",
        "user",
        "group",
        "mode",
        "attach_timeout",
    }
)


def parse_encrypted_volumes(
    at: Node,
    services: Collection[str],
    role: str,
    directories: tuple[EncryptedDirectory, ...] = (),
) -> tuple[EncryptedVolume, ...]:
    """The section, validated: names, devices, mappers and mount points distinct; a mount
    point neither inside nor above another volume's or an encrypted directory."""
    volumes: list[EncryptedVolume] = []
    nodes = at.mapping()
    for name, child in nodes.items():
        if not NAME.match(name):
            raise child.error(
                "names are letters, digits, `-` and `_` (the record's file name), at most 64"
            )
        volume = _volume(child, name, services, role)
        fields = child.mapping()
        if volume.mapper in RESERVED_MAPPERS:
            raise fields.get("mapper", child).error(
                f"{volume.mapper!r} is device-mapper's own control node (/dev/mapper/control): "
                "choose another mapper name"
            )
        for other in volumes:
            if other.device == volume.device:
                raise fields["device"].error(f"is encrypted_volumes.{other.name}'s device too")
            if other.mapper == volume.mapper:
                where = fields.get("mapper", child)
                raise where.error(f"is encrypted_volumes.{other.name}'s mapper name too")
            if _overlap(other.mount, volume.mount):
                raise fields["mount"].error(
                    f"overlaps encrypted_volumes.{other.name}: "
                    "volumes cannot be mounted inside each other"
                )
        for directory in directories:
            if _overlap(directory.path, volume.mount):
                raise fields["mount"].error(
                    f"overlaps encrypted_directories.{directory.name}: a volume and an "
                    "encrypted directory cannot be inside each other"
                )
        volumes.append(volume)
    return tuple(volumes)


def _overlap(first: Path, second: Path) -> bool:
    return first.is_relative_to(second) or second.is_relative_to(first)


def _volume(at: Node, name: str, services: Collection[str], role: str) -> EncryptedVolume:
    fields = at.mapping(FIELDS, OPTIONAL)
    units = tuple(_unit(u, services) for u in fields["units"].sequence())
    if not units:
        raise fields["units"].error("name at least one unit that uses the volume")
    if len(set(units)) != len(units):
        raise fields["units"].error("lists a unit twice")
    return EncryptedVolume(
        name=name,
        device=_device(fields["device"]),
        mount=_path(fields["mount"]),
        transit_mount=_mount(fields["transit_mount"]) if "transit_mount" in fields else "transit",
        transit_key=fields["transit_key"].matching(VAULT_COMPONENT, "a Transit key name")
        if "transit_key" in fields
        else role,
        units=units,
        format=fields["format"].choice(Format) if "format" in fields else Format.NEVER,
        filesystem=fields["filesystem"].choice(Filesystem)
        if "filesystem" in fields
        else Filesystem.EXT4,
        mount_options=_options(fields["mount_options"])
        if "mount_options" in fields
        else DEFAULT_OPTIONS,
        mapper=fields["mapper"].matching(
            MAPPER,
            "a device-mapper name ([A-Za-z0-9_.-], at most 127, not starting with `.`, `_` or `-`)",
        )
        if "mapper" in fields
        else name,
        **owner(fields),
        mode=_mode(fields["mode"]) if "mode" in fields else 0o755,
        attach_timeout=fields["attach_timeout"].seconds(MAX_ATTACH_TIMEOUT)
        if "attach_timeout" in fields
        else 60.0,
    )


def _unit(at: Node, services: Collection[str]) -> str:
    unit = at.string()
    if unit not in services:
        raise at.error(
            "must be a unit declared under `services` (the agent starts it once "
            "the volume is mounted)"
        )
    return unit


def _device(at: Node) -> Path:
    value = at.string()
    path = PurePosixPath(value)
    if not path.is_absolute() or value != str(path) or ".." in path.parts:
        raise at.error(
            "must be an absolute, normalised path such as /dev/disk/by-id/scsi-0DO_Volume_<name>"
        )
    if not path.is_relative_to("/dev") or len(path.parts) < 3:
        raise at.error(
            "must be a block device under /dev, such as /dev/disk/by-id/scsi-0DO_Volume_<name>"
        )
    if path.is_relative_to("/dev/mapper") or path.name.startswith("dm-"):
        raise at.error("must be the volume itself, not a device-mapper device")
    if not all(DEVICE_COMPONENT.match(p) for p in path.parts[1:]):
        raise at.error("must be a path of plain names ([A-Za-z0-9_.:@=+-])")
    return Path(value)


def _options(at: Node) -> tuple[str, ...]:
    options = []
    for item in at.sequence():
        option = item.string()
        if not MOUNT_OPTION.match(option):
            raise item.error(
                "must be one mount option such as `noatime` or `commit=30` "
                "(no commas or spaces: one option per list item)"
            )
        if option.startswith(FORBIDDEN_OPTIONS):
            raise item.error(
                "is not an option bootsecrets passes on (x-*, bind, loop, "
                "remount and the like change what is mounted or who mounts it)"
            )
        options.append(option)
    if len(set(options)) != len(options):
        raise at.error("lists an option twice")
    return tuple(options)
