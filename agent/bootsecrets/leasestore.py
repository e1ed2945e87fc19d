"""The leased secrets the agent holds, kept between runs: `leases.json` in the memory-only
store (tmpfs, root 0600, written temp+rename without following a symlink; gone at reboot).

A leased secret is never re-read to see whether it changed (a read of `database/creds/<role>`
issues new credentials), so its values are kept here and every run renders from them. Per
secret name:

* `current`: the lease or certificate the next render uses (values, lease ID, timing);
* `older`: issues a unit may still hold (its files were rendered from them), kept until no
  unit does, then moved to `revoke`;
* `revoke` (for all names): old leases to revoke, retried at every run until Vault confirms
  or they have expired anyway.

`version` counts the issues of a secret on this host; the units' records in state.json name
the version their files hold (state.SecretState.version), which is how the agent knows that
no unit uses a lease any more. This file is the only place with lease IDs and leased values;
state.json gets a copy of the timing (`to_state`) for `status`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any, TypeGuard

from bootsecrets import fsio
from bootsecrets.config import SecretRef
from bootsecrets.errors import LeaseIssueFailed
from bootsecrets.leases import Certificate, Kind, Lease, Record, issued_lease
from bootsecrets.leasespec import CertificateSpec, DatabaseSpec
from bootsecrets.model import MAX_LEASE_SECONDS, LeaseGrant, SecretData
from bootsecrets.paths import LEASES_FILE, Paths
from bootsecrets.state import LeasedState, time_value

log = logging.getLogger(__name__)

FILE = LEASES_FILE
MAX_FILE = 16 << 20


@dataclasses.dataclass(frozen=True)
class Held:
    """One issue of a leased secret: what it is rendered from (`data`), its lease's handle
    (`lease_id`, "" when none: a certificate), and its timing."""

    name: str
    path: str
    version: int
    record: Record
    data: Mapping[str, Any] = dataclasses.field(repr=False)
    lease_id: str = dataclasses.field(repr=False, default="")
    serial_number: str | None = None
    #: What was asked of Vault besides the path (a certificate's names), to notice a change.
    request: str = ""

    @property
    def kind(self) -> Kind:
        return Kind.LEASE if isinstance(self.record, Lease) else Kind.CERTIFICATE

    @property
    def expires_at(self) -> float:
        return self.record.expires_at if isinstance(self.record, Lease) else self.record.not_after

    def secret(self) -> SecretData:
        """What the templates see (`secrets.<name>.<key>`)."""
        duration = self.record.lease_duration if isinstance(self.record, Lease) else None
        return SecretData(
            self.name,
            self.path,
            self.data,
            version=self.version,
            lease_duration=int(duration) if duration else None,
        )

    def retired(self) -> Retired:
        return Retired(self.name, self.path, self.lease_id, self.expires_at)


@dataclasses.dataclass(frozen=True)
class Retired:
    """An old lease to revoke (no unit holds it any more)."""

    name: str
    path: str
    lease_id: str = dataclasses.field(repr=False)
    expires_at: float


@dataclasses.dataclass(frozen=True)
class Kept:
    current: Mapping[str, Held] = dataclasses.field(default_factory=dict)
    older: Mapping[str, tuple[Held, ...]] = dataclasses.field(default_factory=dict)
    revoke: tuple[Retired, ...] = ()

    def versions(self, name: str) -> dict[int, Held]:
        held = [*self.older.get(name, ()), *([self.current[name]] if name in self.current else [])]
        return {h.version: h for h in held}

    def next_version(self, name: str) -> int:
        return max(self.versions(name), default=0) + 1

    def lease_ids(self) -> list[tuple[str, str, str]]:
        """(name, path, lease ID) of every lease held or waiting for revocation."""
        held = [
            h
            for h in (*self.current.values(), *(h for hs in self.older.values() for h in hs))
            if h.lease_id
        ]
        return [(h.name, h.path, h.lease_id) for h in held] + [
            (r.name, r.path, r.lease_id) for r in self.revoke
        ]


def load(paths: Paths) -> Kept:
    """What the last run kept; nothing if there is no file. An unreadable file is dropped
    with a warning: its leases then end at their own expiry (or with the token)."""
    with fsio.open_dir(paths.root, paths.store) as store:
        raw = store.read_optional(FILE, MAX_FILE)
    if raw is None:
        return Kept()
    try:
        doc = json.loads(raw)
        return Kept(
            current={n: _held(n, h) for n, h in doc["current"].items()},
            older={n: tuple(_held(n, h) for h in hs) for n, hs in doc["older"].items()},
            revoke=tuple(
                Retired(str(r["name"]), str(r["path"]), str(r["lease_id"]), _time(r["expires_at"]))
                for r in doc["revoke"]
            ),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning(
            "ignoring the unreadable %s (%s): its leases are left to expire",
            FILE,
            type(err).__name__,
        )
        return Kept()


def save(paths: Paths, kept: Kept) -> None:
    doc = {
        "current": {n: _doc(h) for n, h in kept.current.items()},
        "older": {n: [_doc(h) for h in hs] for n, hs in kept.older.items() if hs},
        "revoke": [
            {"name": r.name, "path": r.path, "lease_id": r.lease_id, "expires_at": r.expires_at}
            for r in kept.revoke
        ],
    }
    with fsio.open_dir(paths.root, paths.store) as store:
        store.replace_file(FILE, json.dumps(doc, sort_keys=True).encode() + b"\n", mode=0o600)


def to_state(kept: Kept) -> dict[str, LeasedState]:
    """The copy in state.json: timing and counts, no value, no lease ID."""
    out = {}
    for name, held in kept.current.items():
        record = held.record
        common = LeasedState(
            kind="lease",
            path=held.path,
            version=held.version,
            issued_at=0.0,
            older=len(kept.older.get(name, ())),
            revoke_pending=sum(1 for r in kept.revoke if r.name == name),
        )
        if isinstance(record, Lease):
            out[name] = dataclasses.replace(
                common,
                issued_at=record.issued_at,
                ttl=record.ttl,
                lease_duration=record.lease_duration,
                renewable=record.renewable,
                has_lease_id=record.has_lease_id,
                renewed_at=record.renewed_at,
                max_expires_at=record.max_expires_at,
            )
        else:
            out[name] = dataclasses.replace(
                common,
                kind="certificate",
                issued_at=record.received_at or record.not_before,
                not_before=record.not_before,
                not_after=record.not_after,
                serial_number=held.serial_number,
            )
    return out


def from_state(name: str, state: LeasedState) -> Record:
    """The planner's record from its copy in state.json (what `status` plans with)."""
    if state.kind == "lease":
        return Lease(
            name,
            state.issued_at,
            state.ttl,
            state.lease_duration,
            state.renewable,
            state.has_lease_id,
            state.renewed_at,
            state.max_expires_at,
        )
    return Certificate(
        name,
        state.not_before if state.not_before is not None else state.issued_at,
        state.not_after or state.issued_at,
        state.issued_at,
    )


def _doc(held: Held) -> dict[str, Any]:
    record = dataclasses.asdict(held.record)
    record.pop("name")
    return {
        "path": held.path,
        "version": held.version,
        "lease_id": held.lease_id,
        "serial_number": held.serial_number,
        "data": dict(held.data),
        "request": held.request,
        "kind": held.kind.value,
        "record": record,
    }


def _held(name: str, doc: Mapping[str, Any]) -> Held:
    """One kept secret, every field checked: ValueError (or KeyError, TypeError) for one
    that is missing, unknown or of the wrong type, so that the file is dropped as unreadable
    instead of failing the run in the schedule's arithmetic or a date."""
    kind = Kind(doc["kind"])
    version, data, serial = doc["version"], doc["data"], doc.get("serial_number")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError("version")
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ValueError("data")
    if serial is not None and not isinstance(serial, str):
        raise ValueError("serial_number")
    return Held(
        name,
        str(doc["path"]),
        version,
        _record(name, Lease if kind is Kind.LEASE else Certificate, doc["record"]),
        data,
        str(doc["lease_id"]),
        serial,
        str(doc.get("request", "")),
    )


def _record(name: str, kind: type[Record], fields: Mapping[str, Any]) -> Record:
    """A Lease or Certificate from its kept fields: booleans where the type says so, else
    times and durations (None where the type allows it)."""
    declared = {f.name: f for f in dataclasses.fields(kind) if f.name != "name"}
    if not isinstance(fields, dict) or set(fields) - set(declared):
        raise ValueError("record")
    values: dict[str, Any] = {}
    for field_name, field in declared.items():
        if field_name not in fields:
            continue  # the constructor says whether it may be left out (TypeError)
        value = fields[field_name]
        if field.type == "bool":
            if not isinstance(value, bool):
                raise ValueError(field_name)
            values[field_name] = value
        elif value is None and "None" in str(field.type):
            values[field_name] = None
        else:
            values[field_name] = _time(value)
    return kind(name=name, **values)


def _time(value: object) -> float:
    """A kept time or duration (state.time_value); ValueError for anything else."""
    seconds = time_value(value)
    if seconds is None:
        raise ValueError("not a time")
    return seconds


def from_grant(ref: SecretRef, grant: LeaseGrant, at: float, version: int) -> Held:
    """What a grant becomes: database credentials as answered; a certificate's PEMs with
    `ca_chain` joined, and its own validity (`not_before`, `expiration`)."""
    data = dict(grant.data)
    if isinstance(ref.spec, DatabaseSpec):
        if grant.lease_duration <= 0:
            raise LeaseIssueFailed(ref.name, ref.full_path, "Vault's answer has no lease")
        record = issued_lease(
            ref.name,
            at=at,
            lease_duration=grant.lease_duration,
            renewable=grant.renewable,
            has_lease_id=bool(grant.lease_id),
            max_ttl=ref.spec.max_ttl,
        )
        return Held(ref.name, ref.full_path, version, record, data, grant.lease_id)
    expiration, not_before = data.get("expiration"), data.get("not_before", int(at))
    if not all(isinstance(data.get(k), str) for k in ("certificate", "private_key")) or not (
        _epoch(expiration, at) and _epoch(not_before, at)
    ):
        raise LeaseIssueFailed(
            ref.name, ref.full_path, "Vault's answer has no certificate, key or validity"
        )
    chain = data.get("ca_chain")
    data["ca_chain"] = (
        "\n".join(str(c) for c in chain)
        if isinstance(chain, list)
        else str(data.get("issuing_ca", ""))
    )
    cert = Certificate(ref.name, float(not_before), float(expiration), at)
    return Held(
        ref.name,
        ref.full_path,
        version,
        cert,
        data,
        "",
        str(data.get("serial_number", "")),
        request_of(ref),
    )


def _epoch(value: object, now: float) -> TypeGuard[int]:
    """A validity bound as Vault answers it: whole seconds since 1970, at most
    MAX_LEASE_SECONDS from now."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 0 <= value <= now + MAX_LEASE_SECONDS
    )


def request_of(ref: SecretRef) -> str:
    """What was asked of Vault (names only), so that a changed config issues anew."""
    spec = ref.spec
    return json.dumps(spec.body(), sort_keys=True) if isinstance(spec, CertificateSpec) else ""
