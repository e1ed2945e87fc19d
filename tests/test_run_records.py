"""The agent's own records in the memory-only store, read back by a later run or `status`.

`leases.json` (the leases and certificates it holds): what it saves it reads back as it was;
a file with a field missing, unknown or of the wrong type (a string for a time, a time no
date can hold, NaN, a boolean for a number) is dropped as unreadable with a warning, never a
crash later in the schedule or a date. `state.json` is advisory and read tolerantly: such a
time is dropped on its own. The kept token and identity: a token or an address of a shape
the agent never writes is ignored with a warning (as no token, as no kept address)."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bootsecrets import identity, leasestore
from bootsecrets.config import RebootPolicy
from bootsecrets.leases import Certificate, Lease
from bootsecrets.leasestore import Held, Kept, Retired
from bootsecrets.paths import Paths
from bootsecrets.state import State

NOW = 1_800_000_000.0


@pytest.fixture
def paths(sandbox_root: Path) -> Paths:
    """Under /dev/shm: the store must be memory-only."""
    paths = Paths(sandbox_root)
    paths.store.mkdir(parents=True)
    return paths


def kept() -> Kept:
    lease = Lease("db", NOW, 300.0, 300.0, True, renewed_at=NOW + 100, max_expires_at=None)
    cert = Certificate("tls", NOW - 60, NOW + 7200, received_at=NOW)
    db = Held("db", "database/creds/app", 2, lease, {"username": "u", "password": "p"}, "lid-2")
    old = Held("db", "database/creds/app", 1, lease, {"username": "u1", "password": "p1"}, "lid-1")
    tls = Held("tls", "pki/issue/web", 1, cert, {"certificate": "C"}, "", "0a:0b", "req")
    return Kept(
        current={"db": db, "tls": tls},
        older={"db": (old,)},
        revoke=(Retired("db", "database/creds/app", "lid-0", NOW + 300),),
    )


def test_what_is_saved_is_read_back(paths: Paths) -> None:
    leasestore.save(paths, kept())
    assert leasestore.load(paths) == kept()


def set_at(*keys: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


def drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]

    return change


CORRUPT: dict[str, Callable[[dict[str, Any]], None]] = {
    "time as a string": set_at("current", "db", "record", "issued_at", value="1800000000"),
    "time past year 9999": set_at("current", "db", "record", "issued_at", value=1e300),
    "negative duration": set_at("current", "db", "record", "lease_duration", value=-1),
    "boolean for a time": set_at("current", "tls", "record", "not_after", value=True),
    "number for a boolean": set_at("current", "db", "record", "renewable", value=1),
    "null where a time is needed": set_at("current", "db", "record", "ttl", value=None),
    "unknown record field": set_at("current", "db", "record", "extra", value=1),
    "missing record field": drop("current", "db", "record", "issued_at"),
    "unknown kind": set_at("current", "db", "kind", value="token"),
    "version as a string": set_at("current", "db", "version", value="2"),
    "version zero": set_at("current", "db", "version", value=0),
    "data not a mapping": set_at("current", "db", "data", value=["p"]),
    "serial not a string": set_at("current", "tls", "serial_number", value=10),
    "record not a mapping": set_at("current", "db", "record", value=[1, 2]),
    "revocation time as a string": set_at("revoke", 0, "expires_at", value="soon"),
    "revocation time past year 9999": set_at("revoke", 0, "expires_at", value=1e20),
    "not an object": lambda doc: doc.clear(),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_a_corrupt_file_is_dropped_with_a_warning(
    paths: Paths, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    leasestore.save(paths, kept())
    file = paths.store / leasestore.FILE
    doc = json.loads(file.read_text())
    changed = copy.deepcopy(doc)
    CORRUPT[case](changed)
    assert json.dumps(changed) != json.dumps(doc)  # the premise (1 == True in Python)
    file.write_text(json.dumps(changed))

    with caplog.at_level(logging.WARNING):
        assert leasestore.load(paths) == Kept()
    assert "ignoring the unreadable leases.json" in caplog.text
    assert "p1" not in caplog.text and "lid-1" not in caplog.text


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
def test_json_extensions_for_numbers_are_not_times(paths: Paths, text: str) -> None:
    leasestore.save(paths, kept())
    file = paths.store / leasestore.FILE
    doc = file.read_text()
    assert f'"not_after": {NOW + 7200}' in doc  # the premise
    file.write_text(doc.replace(f'"not_after": {NOW + 7200}', f'"not_after": {text}'))
    assert leasestore.load(paths) == Kept()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300, -1.0, True, "1800000000"])
def test_state_json_drops_times_no_date_can_hold(value: object) -> None:
    """state.json is read tolerantly (advisory): such a time is dropped, and status can
    still print a date for what is left."""
    leased = {"kind": "certificate", "version": 1, "issued_at": NOW, "not_after": value}
    state = State.from_json(
        {
            "wakeup_at": value,
            "leases": {"tls": leased, "db": {"kind": "lease", "version": 1, "issued_at": value}},
        }
    )
    assert state.wakeup_at is None
    assert list(state.leases) == ["tls"] and state.leases["tls"].not_after is None
    good = State.from_json({"wakeup_at": NOW, "leases": {"tls": {**leased, "not_after": NOW}}})
    assert (good.wakeup_at, good.leases["tls"].not_after) == (NOW, NOW)


@pytest.mark.parametrize(
    ("expires_at", "kept"),
    [
        ("2027-01-01T00:00:00+00:00", True),
        ("2027-01-01T00:00:00", False),  # no offset: not comparable with the clock
        ("soon", False),
        (1800000000, False),
        (None, False),
    ],
)
def test_state_json_keeps_a_token_expiry_only_as_a_dated_time(
    expires_at: object, kept: bool
) -> None:
    token = {"accessor": "a", "ttl": 60, "renewable": True, "expires_at": expires_at}
    state = State.from_json({"token": token})
    assert state.token is not None
    assert state.token.expires_at == (expires_at if kept else None)


# --- the kept token and identity (identity.py) ---------------------------------------------


@pytest.mark.parametrize("policy", list(RebootPolicy))
def test_a_kept_token_is_read_back(paths: Paths, policy: RebootPolicy) -> None:
    identity.save_token(policy, paths, "s.kept-1234567890", "acc", "https://vault.test:8200")
    assert identity.load_token(policy, paths) == identity.KeptToken(
        "s.kept-1234567890", "acc", "https://vault.test:8200"
    )


@pytest.mark.parametrize(
    ("token", "address", "expected"),
    [
        ("s.a b-1234567890", "https://vault.test:8200", None),  # a space: no token has one
        ("s.x\r\nX-Injected: 1", "https://vault.test:8200", None),  # a header's end
        ("s.kept-1234567890", "file:///etc/passwd", ("s.kept-1234567890", None)),
        ("s.kept-1234567890", "https://vault.test:8200/v1/x", ("s.kept-1234567890", None)),
        ("s.kept-1234567890", "https://u:p@vault.test", ("s.kept-1234567890", None)),
        ("s.kept-1234567890", 8200, ("s.kept-1234567890", None)),
    ],
)
def test_a_kept_token_or_address_of_the_wrong_shape_is_ignored(
    paths: Paths,
    token: str,
    address: object,
    expected: tuple[str, None] | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = RebootPolicy.REPROVISION
    identity.save_token(policy, paths, "s.kept-1234567890", "acc", None)
    file = paths.runtime_token
    file.write_text(json.dumps({"token": token, "accessor": "acc", "vault_addr": address}))

    with caplog.at_level(logging.WARNING):
        kept = identity.load_token(policy, paths)

    found = None if kept is None else (kept.token, kept.vault_addr)
    assert found == expected
    assert "ignoring the" in caplog.text and str(file) in caplog.text
    assert token not in caplog.text


def test_a_kept_identity_address_of_the_wrong_shape_is_ignored(paths: Paths) -> None:
    identity.save_identity(paths, identity.Identity("role-1", "https://vault.test:8200"))
    assert identity.load_identity(paths) == identity.Identity("role-1", "https://vault.test:8200")
    paths.identity.write_text(json.dumps({"role_id": "role-1", "vault_addr": "ftp://x"}))
    assert identity.load_identity(paths) == identity.Identity("role-1", None)
