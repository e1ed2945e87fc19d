"""The state file (`state.json` in the memory-only store): what runs with what, per unit.

Written by every bootstrap and refresh, read by the next run and by `status`. It holds
names, paths, versions, generation numbers, times and systemd invocation IDs — never a value,
a token, a secret-id or a lease ID (leased values and lease IDs are in `leases.json` next to
it: leasestore.py). `STATE_VERSION` changes when a field changes meaning (CHANGELOG.md).

Restarts survive an interrupted run: before `current` moves to a new generation, `switching`
names the units whose values change; a unit whose live values are newer than the ones it was
started with (`running_generation` behind `values_generation`) is restarted by the next run,
unless systemd shows that it was started again since (`stale_invocation`, the InvocationID it
had after the switch, is no longer its InvocationID).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

STATE_VERSION = 2


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class SecretState:
    name: str
    path: str
    version: int | None = None
    lease_duration: int | None = None
    fetched_at: str | None = None


@dataclasses.dataclass(frozen=True)
class UnitState:
    """One unit: where its files are, which values they hold, which values it runs with."""

    #: The live generation holding the unit's files.
    generation: int
    #: The generation in which the unit's current bytes were written.
    values_generation: int
    #: The values_generation the unit was last (re)started with by the agent; None if unknown.
    running_generation: int | None = None
    #: The unit's InvocationID seen after its values changed, while a restart was due ("" if
    #: it was not running). None: not looked at (a run stopped in between).
    stale_invocation: str | None = None
    delivery: tuple[str, ...] = ()
    on_change: str = "restart"
    secrets: tuple[SecretState, ...] = ()

    @property
    def behind(self) -> bool:
        """Its live values are newer than the ones it was started with."""
        return self.running_generation != self.values_generation

    def restart_pending(self, invocation: str | None) -> bool:
        """Whether a restart is still due, given the unit's InvocationID now ("" when it is
        not running; None when systemd could not be asked)."""
        if not self.behind or self.on_change == "none":
            return False
        if invocation == "":
            return False  # not running: it reads the live values when it starts
        if self.stale_invocation is None or invocation is None:
            return True
        return invocation == self.stale_invocation


@dataclasses.dataclass(frozen=True)
class RunRecord:
    command: str
    at: str
    outcome: str  # ok | error | rolled-back
    exit_code: int
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class TokenState:
    accessor: str
    ttl: int
    renewable: bool
    checked_at: str
    expires_at: str | None


@dataclasses.dataclass(frozen=True)
class Switch:
    """Written before `current` moves to `to`: the units whose values change with it, and
    what their new values were rendered from."""

    to: int
    units: tuple[str, ...]
    secrets: Mapping[str, tuple[SecretState, ...]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LeasedState:
    """One leased secret's current lease or certificate, for `status` (a copy of what
    leasestore.py keeps, without the values and the lease ID). `version` counts the issues
    on this host; the units' `secrets` say which version their files hold. Epoch seconds."""

    kind: str  # "lease" | "certificate"
    path: str
    version: int
    #: lease: issued_at/ttl/lease_duration/renewable/has_lease_id/renewed_at/max_expires_at
    #: (leases.Lease); certificate: not_before/not_after/issued_at (= received_at).
    issued_at: float
    ttl: float = 0.0
    lease_duration: float = 0.0
    renewable: bool = False
    has_lease_id: bool = False
    renewed_at: float | None = None
    max_expires_at: float | None = None
    not_before: float | None = None
    not_after: float | None = None
    serial_number: str | None = None
    #: Older issues kept because a unit may still hold them, and old leases to revoke.
    older: int = 0
    revoke_pending: int = 0


@dataclasses.dataclass(frozen=True)
class State:
    reboot_policy: str | None = None
    generation: int | None = None
    last_run: RunRecord | None = None
    last_success: RunRecord | None = None
    units: Mapping[str, UnitState] = dataclasses.field(default_factory=dict)
    skipped: Mapping[str, str] = dataclasses.field(default_factory=dict)
    token: TokenState | None = None
    vault_addr: str | None = None
    switching: Switch | None = None
    leases: Mapping[str, LeasedState] = dataclasses.field(default_factory=dict)
    #: When bootsecrets-wakeup.timer fires (epoch seconds), if armed.
    wakeup_at: float | None = None

    def settled(self, current: int | None) -> State:
        """The state once an interrupted switch is accounted for: if `current` (the live
        generation) is the one `switching` announced, its units have those values now."""
        if self.switching is None:
            return self
        units = dict(self.units)
        switch = self.switching
        if current == switch.to:
            for unit in switch.units:
                old = units.get(unit)
                if old is None:
                    units[unit] = UnitState(generation=switch.to, values_generation=switch.to)
                elif old.values_generation != switch.to:
                    units[unit] = dataclasses.replace(
                        old,
                        generation=switch.to,
                        values_generation=switch.to,
                        stale_invocation=None,
                        secrets=switch.secrets.get(unit, old.secrets),
                    )
        return dataclasses.replace(self, switching=None, units=units)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["version"] = STATE_VERSION
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> State:
        """Whatever a previous run wrote, tolerantly: a field of the wrong shape is dropped
        (the state is advisory; the store and systemd are the truth)."""
        units = {}
        for name, raw in _mapping(data.get("units")).items():
            unit = _unit(raw)
            if isinstance(name, str) and unit is not None:
                units[name] = unit
        skipped = {
            k: v
            for k, v in _mapping(data.get("skipped")).items()
            if isinstance(k, str) and isinstance(v, str)
        }
        switching = _mapping(data.get("switching"))
        return cls(
            reboot_policy=_str(data.get("reboot_policy")),
            generation=_int(data.get("generation")),
            last_run=_run(data.get("last_run")),
            last_success=_run(data.get("last_success")),
            units=units,
            skipped=skipped,
            token=_token(data.get("token")),
            vault_addr=_str(data.get("vault_addr")),
            switching=Switch(
                _int(switching.get("to")) or 0,
                tuple(u for u in switching.get("units") or () if isinstance(u, str)),
                {
                    u: _secrets(v)
                    for u, v in _mapping(switching.get("secrets")).items()
                    if isinstance(u, str)
                },
            )
            if _int(switching.get("to"))
            else None,
            leases={
                n: leased
                for n, v in _mapping(data.get("leases")).items()
                if isinstance(n, str) and (leased := _leased(v)) is not None
            },
            wakeup_at=time_value(data.get("wakeup_at")),
        )


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _run(value: object) -> RunRecord | None:
    raw = _mapping(value)
    if not raw:
        return None
    return RunRecord(
        str(raw.get("command", "")),
        str(raw.get("at", "")),
        str(raw.get("outcome", "")),
        _int(raw.get("exit_code")) or 0,
        _str(raw.get("error")),
    )


def _token(value: object) -> TokenState | None:
    raw = _mapping(value)
    if not raw:
        return None
    return TokenState(
        str(raw.get("accessor", "")),
        _int(raw.get("ttl")) or 0,
        bool(raw.get("renewable")),
        str(raw.get("checked_at", "")),
        _date(raw.get("expires_at")),
    )


def _date(value: object) -> str | None:
    """An ISO 8601 date with its UTC offset, as `now()` writes them; else None."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return value if parsed.tzinfo is not None else None


def _unit(value: object) -> UnitState | None:
    raw = _mapping(value)
    generation = _int(raw.get("generation"))
    if generation is None:
        return None
    values = _int(raw.get("values_generation")) or generation
    # STATE_VERSION 1 called it restarted_generation.
    running = _int(raw.get("running_generation", raw.get("restarted_generation")))
    secrets = _secrets(raw.get("secrets"))
    return UnitState(
        generation=generation,
        values_generation=values,
        running_generation=running,
        stale_invocation=_str(raw.get("stale_invocation")),
        delivery=tuple(d for d in raw.get("delivery") or () if isinstance(d, str)),
        on_change=str(raw.get("on_change", "restart")),
        secrets=secrets,
    )


def _secrets(value: object) -> tuple[SecretState, ...]:
    return tuple(
        SecretState(
            str(s.get("name", "")),
            str(s.get("path", "")),
            _int(s.get("version")),
            _int(s.get("lease_duration")),
            _str(s.get("fetched_at")),
        )
        for s in (value if isinstance(value, list) else ())
        if isinstance(s, dict)
    )


#: 9999-12-31T23:59:59Z, the latest time a date can hold.
_LATEST = 253402300799.0


def time_value(value: object) -> float | None:
    """A time or a duration: seconds a date can hold, else None (NaN and infinities too)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 <= value <= _LATEST else None


def _leased(value: object) -> LeasedState | None:
    raw = _mapping(value)
    issued_at, version = time_value(raw.get("issued_at")), _int(raw.get("version"))
    if issued_at is None or version is None or raw.get("kind") not in ("lease", "certificate"):
        return None
    return LeasedState(
        kind=str(raw["kind"]),
        path=str(raw.get("path", "")),
        version=version,
        issued_at=issued_at,
        ttl=time_value(raw.get("ttl")) or 0.0,
        lease_duration=time_value(raw.get("lease_duration")) or 0.0,
        renewable=raw.get("renewable") is True,
        has_lease_id=raw.get("has_lease_id") is True,
        renewed_at=time_value(raw.get("renewed_at")),
        max_expires_at=time_value(raw.get("max_expires_at")),
        not_before=time_value(raw.get("not_before")),
        not_after=time_value(raw.get("not_after")),
        serial_number=_str(raw.get("serial_number")),
        older=_int(raw.get("older")) or 0,
        revoke_pending=_int(raw.get("revoke_pending")) or 0,
    )
