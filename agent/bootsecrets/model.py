"""The data the layers hand each other: secrets as read, files as rendered, problems found.

A leaf: it imports nothing from the package, so every other module can import it and data
flows one way (config -> vault -> render -> store -> systemd, see docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

#: What a unit has in a generation: its env file (None if none) and its credentials.
UnitBytes = tuple[bytes | None, Mapping[str, bytes]]


@dataclasses.dataclass(frozen=True)
class SecretData:
    """One secret as read from Vault. `data` holds values: never log or repr it."""

    name: str
    path: str
    data: Mapping[str, Any] = dataclasses.field(repr=False)
    version: int | None = None
    lease_id: str | None = None
    lease_duration: int | None = None


@dataclasses.dataclass(frozen=True)
class RenderedUnit:
    """What one unit gets: its env file bytes and credential files, plus provenance."""

    unit: str
    env_file: bytes | None = dataclasses.field(repr=False)
    credentials: Mapping[str, bytes] = dataclasses.field(repr=False, default_factory=dict)
    secret_paths: tuple[str, ...] = ()


#: How the reason of a unit held back by locked data at rest starts (`Rendered.skipped`, and
#: `skipped` in state.json): such a unit is not running, so the run that has its data
#: available again starts it, even when its values did not change.
HELD_BACK = "held back: "


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A full render: per unit files, what was read, and the optional units left out (or
    held back: a reason starting with HELD_BACK)."""

    units: dict[str, RenderedUnit]
    secrets: dict[str, SecretData]
    skipped: dict[str, str]


class TemplateProblem(Exception):
    """A template the config cannot use, found without any secret value (at config load).

    `line` is relative to the template's first line; the config turns it into a ConfigError
    naming file, line and field.
    """

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


#: The longest lease, and the latest certificate expiry from now, taken from Vault (100
#: years): no Vault answers more, and a schedule past it would overflow the clock's dates.
MAX_LEASE_SECONDS = 100 * 365 * 86400


@dataclasses.dataclass(frozen=True)
class LeaseGrant:
    """What Vault answered to an issue (`database/creds/<role>`, `pki/issue/<role>`):
    values and the lease's handle, both hidden from `repr`. `lease_id` is "" when there is
    no lease (a certificate)."""

    data: Mapping[str, Any] = dataclasses.field(repr=False)
    lease_id: str = dataclasses.field(repr=False)
    lease_duration: int
    renewable: bool
