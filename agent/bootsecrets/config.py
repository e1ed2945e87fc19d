"""The image config: the schema, from a YAML document (yamldoc) into frozen dataclasses,
validated once. Its sections each have their module: `vault:` vaultconfig, `services:`
serviceconfig, and the optional ones dirconfig, volconfig and leasespec (the bootstrap
file is bootstrapfile's).

Errors name the file, the line and the field path, never a value: a value that fails
validation is described by its type or by what it should look like.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import yaml

from bootsecrets.errors import ConfigError
from bootsecrets.paths import DEFAULT_STORE
from bootsecrets.serviceconfig import Service, parse_service
from bootsecrets.vaultconfig import VaultSettings, absolute_path, parse_vault_settings
from bootsecrets.yamldoc import Node, parse_document, read_document

if TYPE_CHECKING:
    # The optional sections' modules (dirconfig, volconfig, leasespec and the lease planner)
    # are loaded only for a config that has such a section or a leased secret: every
    # bootstrap parses the config, and most configs use neither (docs/performance.md).
    from bootsecrets.dirconfig import EncryptedDirectory
    from bootsecrets.leases import Policy
    from bootsecrets.leasespec import LeasedSpec
    from bootsecrets.volconfig import EncryptedVolume

PATH_COMPONENT = re.compile(r"[A-Za-z0-9_.@=+-]+\Z")
SECRET_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Engine(enum.Enum):
    KV2 = "kv-v2"
    KV1 = "kv-v1"
    #: A plain read, at every run (a dynamic secret here is issued anew each time).
    GENERIC = "generic"
    #: Leased: `<mount>/creds/<role>`, renewed and re-issued on schedule (docs/leases.md).
    DATABASE = "database"
    #: `<mount>/issue/<role>`: certificates re-issued on schedule.
    PKI = "pki"


class RebootPolicy(enum.Enum):
    REPROVISION = "reprovision"
    PERSIST_TOKEN = "persist-token"  # noqa: S105 (a policy name, not a password)


@dataclasses.dataclass(frozen=True)
class SecretRef:
    """One named secret: `<mount>/<path>` on a mount whose engine the config declares."""

    name: str
    mount: str
    path: str
    engine: Engine
    #: The options of a leased secret (engine database or pki), else None.
    spec: LeasedSpec | None = None

    @property
    def leased(self) -> bool:
        """Issued, kept and renewed by the agent, never re-read (leasing.py)."""
        return self.spec is not None

    @property
    def full_path(self) -> str:
        """The path as the operator writes it (and as logs and status show it)."""
        return f"{self.mount}/{self.path}"

    @property
    def api_path(self) -> str:
        if self.engine is Engine.KV2:
            return f"{self.mount}/data/{self.path}"
        return self.full_path


@dataclasses.dataclass(frozen=True)
class Config:
    source: str
    vault: VaultSettings
    approle_mount: str
    role: str
    reboot_policy: RebootPolicy
    secrets: Mapping[str, SecretRef]
    services: tuple[Service, ...]
    store: Path = DEFAULT_STORE
    restart_timeout: float = 30.0
    #: fscrypt directories unlocked with a data key from Vault's Transit engine (dirconfig).
    directories: tuple[EncryptedDirectory, ...] = ()
    #: The `leases:` section as given; None when there is none (see `leases`).
    lease_settings: Policy | None = None
    #: LUKS2 block volumes opened with a data key from Vault's Transit engine (volconfig).
    volumes: tuple[EncryptedVolume, ...] = ()

    @property
    def leases(self) -> Policy:
        """The schedule of leased secrets (`leases:`, or the defaults)."""
        if self.lease_settings is not None:
            return self.lease_settings
        from bootsecrets.leases import Policy  # noqa: PLC0415 (only lease code asks)

        return Policy()

    @property
    def has_leased(self) -> bool:
        """Whether some secret is leased (database, pki): the lease modules are needed."""
        return any(ref.leased for ref in self.secrets.values())

    @property
    def wrapping_creation_path(self) -> str:
        return f"auth/{self.approle_mount}/role/{self.role}/secret-id"

    def service(self, unit: str) -> Service:
        for service in self.services:
            if service.unit == unit:
                return service
        raise KeyError(unit)

    def used_secrets(self) -> tuple[SecretRef, ...]:
        """Secrets some service uses, each once, in config order."""
        used = set().union(*(s.secrets for s in self.services))
        return tuple(ref for name, ref in self.secrets.items() if name in used)

    def requests_at_once(self) -> int:
        """How many requests a run sends at once after the login: a read per secret used, a
        Transit request per encrypted directory and volume (Vault.prepare_reads opens their
        connections during the login)."""
        return len(self.used_secrets()) + len(self.directories) + len(self.volumes)

    def users(self, secret: str) -> tuple[str, ...]:
        """The units whose files are rendered from `secret`."""
        return tuple(s.unit for s in self.services if secret in s.secrets)


# --- image config -------------------------------------------------------------------------

CONFIG_FIELDS = frozenset({"vault", "approle", "reboot_policy", "mounts", "secrets", "services"})
CONFIG_OPTIONAL = frozenset(
    {"store", "restart_timeout", "encrypted_directories", "encrypted_volumes", "leases"}
)


def load_config(path: Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Parse and validate the image config. `env` supplies VAULT_* overrides (os.environ)."""
    return _config(read_document(path, ConfigError), env or {})


def parse_config(
    data: bytes, source: str = "<config>", *, env: Mapping[str, str] | None = None
) -> Config:
    """The same from bytes (what load_config reads)."""
    return _config(parse_document(data, source, ConfigError), env or {})


def _config(doc: Node, env: Mapping[str, str]) -> Config:
    top = doc.mapping(CONFIG_FIELDS, CONFIG_OPTIONAL)
    vault = parse_vault_settings(top["vault"], env)
    approle = top["approle"].mapping(frozenset({"role"}), frozenset({"mount"}))
    approle_mount = (
        _mount_name(approle["mount"], approle["mount"].string())
        if "mount" in approle
        else "approle"
    )
    role = approle["role"].matching(PATH_COMPONENT, "an AppRole role name")
    mounts = {
        _mount_name(at, name): at.choice(Engine) for name, at in top["mounts"].mapping().items()
    }
    if not mounts:
        raise top["mounts"].error("declare at least one mount, e.g. `secret: kv-v2`")
    declared = top["secrets"].mapping()
    for name, at in declared.items():
        if not SECRET_NAME.match(name):
            raise at.error("secret names must be identifiers ([A-Za-z_][A-Za-z0-9_]*)")
    secrets = {name: _secret_ref(at, name, mounts) for name, at in declared.items()}
    services = tuple(
        parse_service(at, unit, secrets) for unit, at in top["services"].mapping().items()
    )
    if not services:
        raise top["services"].error("declare at least one service")
    directories: tuple[EncryptedDirectory, ...] = ()
    if "encrypted_directories" in top:
        from bootsecrets.dirconfig import parse_encrypted_directories  # noqa: PLC0415 (see imports)

        directories = parse_encrypted_directories(
            top["encrypted_directories"], [s.unit for s in services], role
        )
    volumes: tuple[EncryptedVolume, ...] = ()
    if "encrypted_volumes" in top:
        from bootsecrets.volconfig import parse_encrypted_volumes  # noqa: PLC0415 (see imports)

        volumes = parse_encrypted_volumes(
            top["encrypted_volumes"], [s.unit for s in services], role, directories
        )
    lease_settings = None
    if "leases" in top:
        from bootsecrets.leasespec import parse_settings  # noqa: PLC0415 (see imports)

        lease_settings = parse_settings(top["leases"])
    return Config(
        source=doc.source,
        vault=vault,
        approle_mount=approle_mount,
        role=role,
        reboot_policy=top["reboot_policy"].choice(RebootPolicy),
        secrets=secrets,
        services=services,
        store=_store_path(top["store"]) if "store" in top else DEFAULT_STORE,
        restart_timeout=top["restart_timeout"].seconds() if "restart_timeout" in top else 30.0,
        directories=directories,
        lease_settings=lease_settings,
        volumes=volumes,
    )


def _mount_name(at: Node, value: str) -> str:
    parts = value.split("/")
    if not all(PATH_COMPONENT.match(p) and p not in (".", "..") for p in parts):
        raise at.error("must be a mount path like `secret` or `kv/team`")
    return value


def _store_path(at: Node) -> Path:
    """The store goes into every unit's drop-in (EnvironmentFile=, LoadCredential=): no
    control character (it would start a new directive) and no `%` (a specifier); the
    drop-in writer escapes the rest as systemd reads it back."""
    path, raw = absolute_path(at), at.string()
    if "%" in raw:
        raise at.error("must not contain `%` (a systemd specifier)")
    if raw != str(PurePosixPath(raw)) or raw.endswith(" "):
        raise at.error("must be a normalized path (no `//`, `.`, trailing `/` or space)")
    if not path.is_relative_to("/run") or path == Path("/run"):
        raise at.error("must be a directory under /run (memory-only)")
    return path


def _secret_ref(at: Node, name: str, mounts: Mapping[str, Engine]) -> SecretRef:
    """A path, or (leased secrets) a mapping with `path` and options."""
    options: dict[str, Node] = {}
    owner = at
    if isinstance(at.node, yaml.MappingNode):
        options = at.mapping(frozenset({"path"}), None)
        at = options.pop("path")
    value = at.string()
    parts = value.split("/")
    if not all(PATH_COMPONENT.match(p) for p in parts) or {".", ".."} & set(parts):
        raise at.error("must be a path like `secret/app/db` (no empty parts, `.` or `..`)")
    # Longest declared mount that prefixes the path.
    for cut in range(len(parts) - 1, 0, -1):
        mount = "/".join(parts[:cut])
        if mount in mounts:
            engine = mounts[mount]
            rest = "/".join(parts[cut:])
            if engine is Engine.KV2 and rest.split("/", 1)[0] in ("data", "metadata"):
                raise at.error("give the KV v2 path without `data/` (it is added for you)")
            if engine in (Engine.DATABASE, Engine.PKI):
                from bootsecrets.leasespec import parse_leased  # noqa: PLC0415 (see imports)

                return SecretRef(
                    name, mount, rest, engine, parse_leased(owner, at, engine.value, rest, options)
                )
            if options:
                raise next(iter(options.values())).error(
                    "unknown key (options are for database and pki secrets only)"
                )
            return SecretRef(name, mount, rest, engine)
    raise at.error("must start with a mount declared under `mounts`")
