"""The image config's `encrypted_directories` section: fscrypt directories on the root disk,
each with the Transit key that wraps its data key and the units that need it.

```yaml
encrypted_directories:
  appdata:                        # a name: the key record is /var/lib/bootsecrets/keys/appdata.json
    path: /var/lib/app            # absolute; created at first use (absent or empty only)
    transit_mount: transit        # default `transit`
    transit_key: web              # default: the AppRole role name (one key per role)
    user: app                     # owner and mode given to the directory when it is created
    group: app
    mode: "0700"
    units: [app.service]          # declared under `services`; held back while it is locked
```

Only names and paths are validated here; whether the filesystem can encrypt, whether the
directory is empty and whether its key record matches are checked on the host before
anything is spent (encdirs.check).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection
from pathlib import Path, PurePosixPath

import yaml

from bootsecrets.serviceconfig import owner
from bootsecrets.yamldoc import Node

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
#: One component of a Vault path (a mount part or a Transit key name).
VAULT_COMPONENT = re.compile(r"[A-Za-z0-9_.@=+-]+\Z")
#: Directory path components: plain names, so that a path is safe in a log line and a unit.
PATH_COMPONENT = re.compile(r"[A-Za-z0-9_.@=+-]+\Z")

#: Never encrypted, and nothing under them: memory-backed or kernel trees, the boot files,
#: and the agent's own config and key records (an encrypted directory holding the keys that
#: unlock it could never be opened again).
FORBIDDEN_TREES = tuple(
    PurePosixPath(p)
    for p in (
        "/run",
        "/tmp",  # noqa: S108 (refused, not used)
        "/var/tmp",  # noqa: S108
        "/proc",
        "/sys",
        "/dev",
        "/boot",
        "/etc/bootsecrets",
        "/var/lib/bootsecrets",
    )
)
#: System directories that must stay plain themselves (their subdirectories are fine).
SYSTEM_DIRECTORIES = frozenset(
    PurePosixPath(p)
    for p in (
        "/",
        "/etc",
        "/usr",
        "/var",
        "/var/lib",
        "/var/log",
        "/var/cache",
        "/bin",
        "/sbin",
        "/lib",
        "/lib32",
        "/lib64",
        "/opt",
        "/srv",
        "/home",
        "/root",
        "/mnt",
        "/media",
    )
)


@dataclasses.dataclass(frozen=True)
class EncryptedDirectory:
    name: str
    path: Path
    transit_mount: str
    transit_key: str
    units: tuple[str, ...]
    user: str = "root"
    group: str = "root"
    mode: int = 0o700


FIELDS = frozenset({"path", "units"})
OPTIONAL = frozenset({"transit_mount", "transit_key", "user", "group", "mode"})


def parse_encrypted_directories(
    at: Node, services: Collection[str], role: str
) -> tuple[EncryptedDirectory, ...]:
    """The section, validated: names, paths (absolute, plain, outside memory-backed and
    system trees, not nested in each other), Transit names, owners, modes, units (each
    declared under `services`)."""
    directories = []
    for name, child in at.mapping().items():
        if not NAME.match(name):
            raise child.error(
                "names are letters, digits, `-` and `_` (the key record's file name), at most 64"
            )
        directories.append(_directory(child, name, services, role))
    for i, first in enumerate(directories):
        for second in directories[i + 1 :]:
            if first.path.is_relative_to(second.path) or second.path.is_relative_to(first.path):
                where = at.mapping()[second.name].mapping()["path"]
                raise where.error(
                    f"overlaps encrypted_directories.{first.name}: encrypted "
                    "directories cannot be nested"
                )
    return tuple(directories)


def _directory(at: Node, name: str, services: Collection[str], role: str) -> EncryptedDirectory:
    fields = at.mapping(FIELDS, OPTIONAL)
    units = tuple(_unit(u, services) for u in fields["units"].sequence())
    if not units:
        raise fields["units"].error("name at least one unit that uses the directory")
    if len(set(units)) != len(units):
        raise fields["units"].error("lists a unit twice")
    return EncryptedDirectory(
        name=name,
        path=_path(fields["path"]),
        transit_mount=_mount(fields["transit_mount"]) if "transit_mount" in fields else "transit",
        transit_key=fields["transit_key"].matching(VAULT_COMPONENT, "a Transit key name")
        if "transit_key" in fields
        else role,
        units=units,
        **owner(fields),
        mode=_mode(fields["mode"]) if "mode" in fields else 0o700,
    )


def _unit(at: Node, services: Collection[str]) -> str:
    unit = at.string()
    if unit not in services:
        raise at.error(
            "must be a unit declared under `services` (the agent starts it once "
            "the directory is unlocked)"
        )
    return unit


def _mount(at: Node) -> str:
    value = at.string()
    if not all(VAULT_COMPONENT.match(p) and p not in (".", "..") for p in value.split("/")):
        raise at.error("must be a mount path like `transit` or `transit/team`")
    return value


def _path(at: Node) -> Path:
    value = at.string()
    path = PurePosixPath(value)
    if not path.is_absolute() or value != str(path) or ".." in path.parts:
        raise at.error("must be an absolute, normalised path without `..` or trailing `/`")
    if not all(PATH_COMPONENT.match(p) for p in path.parts[1:]):
        raise at.error("must be a path of plain names ([A-Za-z0-9_.@=+-]) such as /var/lib/app")
    for tree in FORBIDDEN_TREES:
        if path.is_relative_to(tree) or tree.is_relative_to(path):
            raise at.error(
                f"must not be {tree}, inside it or above it (memory-backed, a "
                "kernel tree, boot files, or bootsecrets' own files)"
            )
    if path in SYSTEM_DIRECTORIES:
        raise at.error(
            "must not be a system directory itself; use a directory inside it, such as /var/lib/app"
        )
    return Path(value)


def _mode(at: Node) -> int:
    node = at.node
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith((":str", ":int")):
        text = str(node.value)
        if re.fullmatch(r"0?[0-7]{3}", text):
            mode = int(text, 8)
            if mode & 0o700 != 0o700:
                raise at.error("must give the owner rwx (0700, 0750 or 0755)")
            if mode & 0o002:
                raise at.error("must not let others write (at most 0755)")
            return mode
    raise at.error('must be an octal directory mode such as "0700" or "0750"')
