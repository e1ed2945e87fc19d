"""The `vault:` section of the image config, the environment's overrides (VAULT_ADDR or
BAO_ADDR, VAULT_CACERT, VAULT_NAMESPACE), and the address rules the bootstrap shares."""

from __future__ import annotations

import dataclasses
import urllib.parse
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import yaml

from bootsecrets.yamldoc import Node

#: Environment variables that override the image config, in order of precedence.
ADDRESS_VARIABLES = ("VAULT_ADDR", "BAO_ADDR")


@dataclasses.dataclass(frozen=True)
class VaultSettings:
    addresses: tuple[str, ...]
    ca_cert: Path | None = None
    namespace: str | None = None
    request_timeout: float = 10.0
    boot_deadline: float = 300.0
    #: VAULT_ADDR/BAO_ADDR replaced the configured addresses (and a user-data address).
    address_from_env: bool = False


def parse_address(at: Node) -> str:
    return address(at, at.string())


def address(at: Node, value: str) -> str:
    try:
        parsed = urllib.parse.urlsplit(value)
        port = parsed.port
    except ValueError:
        raise at.error("must be a URL like https://vault.example.com:8200") from None
    if parsed.scheme not in ("https", "http"):
        raise at.error("must start with https:// (or http:// for a loopback test server)")
    if not parsed.hostname or parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise at.error("must be scheme://host[:port] with no path")
    if parsed.username or parsed.password:
        raise at.error("must not carry credentials")
    if any(not 0x21 <= ord(c) <= 0x7E for c in value):
        raise at.error("must be printable ASCII without spaces")
    del port
    return value.rstrip("/")


def absolute_path(at: Node) -> Path:
    value = at.string()
    path = PurePosixPath(value)
    if not path.is_absolute() or ".." in path.parts:
        raise at.error("must be an absolute path without `..`")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise at.error("must not contain control characters")
    return Path(value)


def parse_vault_settings(at: Node, env: Mapping[str, str]) -> VaultSettings:
    fields = at.mapping(
        frozenset(),
        frozenset(
            {"address", "addresses", "ca_cert", "namespace", "request_timeout", "boot_deadline"}
        ),
    )
    addresses: tuple[str, ...]
    if "address" in fields and "addresses" in fields:
        raise fields["addresses"].error("give either `address` or `addresses`, not both")
    if "address" in fields:
        addresses = (parse_address(fields["address"]),)
    elif "addresses" in fields:
        addresses = tuple(parse_address(a) for a in fields["addresses"].sequence())
        if not addresses:
            raise fields["addresses"].error("must list at least one address")
    else:
        addresses = ()
    override = env_address(env)
    if override is not None:
        addresses = (override,)
    ca_cert = absolute_path(fields["ca_cert"]) if "ca_cert" in fields else None
    if env.get("VAULT_CACERT"):
        ca_cert = Path(env["VAULT_CACERT"])
    namespace = fields["namespace"].string() if "namespace" in fields else None
    if env.get("VAULT_NAMESPACE"):
        namespace = env["VAULT_NAMESPACE"]
    return VaultSettings(
        addresses=addresses,
        ca_cert=ca_cert,
        namespace=namespace,
        request_timeout=(
            fields["request_timeout"].seconds(positive=True)
            if "request_timeout" in fields
            else 10.0
        ),
        boot_deadline=(
            fields["boot_deadline"].seconds(positive=True) if "boot_deadline" in fields else 300.0
        ),
        address_from_env=override is not None,
    )


def env_address(env: Mapping[str, str]) -> str | None:
    """The Vault address the environment sets (VAULT_ADDR, else BAO_ADDR), validated."""
    for variable in ADDRESS_VARIABLES:
        value = env.get(variable)
        if value:
            node = Node("environment", yaml_scalar(variable), variable)
            return address(node, value)
    return None


def yaml_scalar(name: str) -> yaml.ScalarNode:
    """A string node standing for a value from outside a document (line 0 of `name`)."""
    node = yaml.ScalarNode("tag:yaml.org,2002:str", "")
    node.start_mark = yaml.Mark(name, 0, -1, 0, None, None)  # type: ignore[arg-type]
    return node
