"""The image config of leased secrets (docs/leases.md): the `leases:` schedule and the
options of a `database` or `pki` secret, from yamldoc nodes into frozen dataclasses.

A leased secret is a plain path (`database/creds/app`) or a mapping with `path` and its
options. Errors name the file, the line and the field, like the rest of the config.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

import yaml

from bootsecrets.leases import Policy
from bootsecrets.yamldoc import Node

#: 90 s, 15m, 72h, 30d; or a plain number of seconds.
_DURATION = re.compile(r"([0-9]{1,9})([smhd]?)\Z")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
#: At most ten years: more is a typo, and it keeps every sum finite and exact.
MAX_DURATION = 10 * 365 * 86400
_FRACTION = re.compile(r"([0-9]{1,6})/([0-9]{1,6})\Z")
_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\Z"
)


@dataclasses.dataclass(frozen=True)
class DatabaseSpec:
    """`GET <mount>/creds/<role>`: a lease, renewed and re-issued."""

    #: The role's max_ttl, when the operator knows it (else learned from a capped renewal).
    max_ttl: float | None = None
    fraction: float | None = None


@dataclasses.dataclass(frozen=True)
class CertificateSpec:
    """`POST <mount>/issue/<role>`: a certificate, re-issued at the fraction of its life."""

    common_name: str
    alt_names: tuple[str, ...] = ()
    ip_sans: tuple[str, ...] = ()
    ttl: float | None = None
    fraction: float | None = None

    def body(self) -> dict[str, str]:
        """What `pki/issue/<role>` is asked (names only: nothing secret)."""
        body = {"common_name": self.common_name}
        if self.alt_names:
            body["alt_names"] = ",".join(self.alt_names)
        if self.ip_sans:
            body["ip_sans"] = ",".join(self.ip_sans)
        if self.ttl is not None:
            body["ttl"] = f"{int(self.ttl)}s"
        return body


LeasedSpec = DatabaseSpec | CertificateSpec


def policy_for(settings: Policy, spec: LeasedSpec | None) -> Policy:
    """The schedule of one secret: the `leases:` settings with its own `fraction`."""
    if spec is None or spec.fraction is None:
        return settings
    return dataclasses.replace(settings, fraction=spec.fraction)


def parse_settings(at: Node) -> Policy:
    """`leases: {fraction, floor, margin}`, all optional."""
    fields = at.mapping(frozenset(), frozenset({"fraction", "floor", "margin"}))
    default = Policy()
    floor = duration(fields["floor"]) if "floor" in fields else default.floor
    if floor < 1:
        raise fields["floor"].error("must be at least 1 second")
    return Policy(
        fraction=fraction(fields["fraction"]) if "fraction" in fields else default.fraction,
        floor=floor,
        margin=duration(fields["margin"]) if "margin" in fields else default.margin,
    )


def duration(at: Node) -> float:
    """Seconds, as a plain number or with a unit: `90`, `90s`, `15m`, `72h`, `30d`."""
    node = at.node
    text = (
        str(node.value).strip()
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith((":int", ":str"))
        else None
    )
    match = _DURATION.match(text or "")
    if match is None:
        raise at.error("must be a duration: seconds, or a number with s, m, h or d (`72h`)")
    seconds = int(match.group(1)) * _UNIT[match.group(2)]
    if not 0 <= seconds <= MAX_DURATION:
        raise at.error(f"must be at most {MAX_DURATION // 86400} days")
    return float(seconds)


def fraction(at: Node) -> float:
    """A number strictly between 0 and 1, written `0.5` or `2/3`."""
    node = at.node
    value: float | None = None
    text = (
        str(node.value).strip()
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith((":float", ":str"))
        else ""
    )
    if re.fullmatch(r"0?\.[0-9]{1,15}", text):
        value = float(text)
    elif (match := _FRACTION.match(text)) and int(match.group(2)):
        value = int(match.group(1)) / int(match.group(2))
    if value is None or not 0 < value < 1:
        raise at.error("must be a fraction between 0 and 1 (exclusive), like 0.5 or 2/3")
    return value


def parse_leased(
    owner: Node, at: Node, kind: str, rest: str, fields: dict[str, Node]
) -> LeasedSpec:
    """The options of a secret (`owner`) on a `database` (kind) or `pki` mount; `at` is its
    path, `rest` the path under the mount, `fields` its mapping's entries other than `path`
    (empty for a plain path)."""
    if kind == "database":
        if not re.fullmatch(r"creds/[^/]+", rest):
            raise at.error("a database secret must be <mount>/creds/<role>")
        allowed = {"max_ttl", "fraction"}
        _known(fields, allowed)
        return DatabaseSpec(
            max_ttl=duration(fields["max_ttl"]) if "max_ttl" in fields else None,
            fraction=fraction(fields["fraction"]) if "fraction" in fields else None,
        )
    if not re.fullmatch(r"issue/[^/]+", rest):
        raise at.error("a pki secret must be <mount>/issue/<role> (not sign/)")
    _known(fields, {"common_name", "alt_names", "ip_sans", "ttl", "fraction"})
    if "common_name" not in fields:
        raise owner.child(owner.node, "common_name").error(
            "missing required field (a pki secret must name its certificate)"
        )
    return CertificateSpec(
        common_name=_dns(fields["common_name"], fields["common_name"].string()),
        alt_names=tuple(_dns(n, n.string()) for n in _list(fields, "alt_names")),
        ip_sans=tuple(_ip(n) for n in _list(fields, "ip_sans")),
        ttl=duration(fields["ttl"]) if "ttl" in fields else None,
        fraction=fraction(fields["fraction"]) if "fraction" in fields else None,
    )


def check_on_change(
    at: Node, on_change: str, leased_in_environment: list[str], leased_in_credentials: list[str]
) -> None:
    """A unit on leased credentials must pick new ones up before the old lease is revoked:
    `none` never would, and a reload cannot change a running process's environment."""
    leased = sorted({*leased_in_environment, *leased_in_credentials})
    if leased and on_change == "none":
        raise at.error(
            f"uses the leased secret {leased[0]}: on_change must be restart or "
            "reload (its old lease is revoked once the unit runs the new one)"
        )
    if leased_in_environment and on_change == "reload":
        raise at.error(
            "a reload cannot give a running process the new environment of the "
            f"leased secret {leased_in_environment[0]}: use restart, or deliver "
            "it as credentials"
        )


def _known(fields: dict[str, Node], allowed: set[str]) -> None:
    for key, child in fields.items():
        if key not in allowed:
            raise child.error(f"unknown key (allowed here: path, {', '.join(sorted(allowed))})")


def _list(fields: dict[str, Node], key: str) -> list[Node]:
    return fields[key].sequence() if key in fields else []


def _dns(at: Node, name: str) -> str:
    if not _DNS_NAME.match(name):
        raise at.error("must be a DNS name like app.example.com")
    return name


def _ip(at: Node) -> str:
    try:
        return str(ipaddress.ip_address(at.string()))
    except ValueError:
        raise at.error("must be an IP address") from None
