"""The image config of leased secrets (`database` and `pki` mounts, `leases:`), and
`leasing.reconcile`, the rule that decides which old issue may be revoked, as tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bootsecrets.config import Engine, parse_config
from bootsecrets.errors import ConfigError
from bootsecrets.leases import Certificate, Lease, Policy
from bootsecrets.leasespec import CertificateSpec, DatabaseSpec
from bootsecrets.leasestore import Held, Kept
from bootsecrets.leasing import reconcile
from bootsecrets.state import SecretState, State, UnitState


def document(
    secrets: dict[str, Any] | None = None, services: dict[str, Any] | None = None, **top: Any
) -> bytes:
    doc: dict[str, Any] = {
        "vault": {"address": "https://vault.example.test:8200"},
        "approle": {"role": "web"},
        "reboot_policy": "reprovision",
        "mounts": {"secret": "kv-v2", "database": "database", "pki": "pki"},
        "secrets": secrets or {"db": "database/creds/app"},
        "services": services
        or {"app.service": {"environment": {"DB_PASSWORD": "{{ secrets.db.password }}"}}},
        **top,
    }
    return yaml.safe_dump(doc, sort_keys=False).encode()


def test_leased_secrets_parse_with_their_options() -> None:
    config = parse_config(
        document(
            secrets={
                "db": "database/creds/app",
                "db_ro": {"path": "database/creds/ro", "max_ttl": "24h", "fraction": 0.5},
                "tls": {
                    "path": "pki/issue/web",
                    "common_name": "app.example.test",
                    "alt_names": ["www.example.test", "*.api.example.test"],
                    "ip_sans": ["10.0.0.5", "::1"],
                    "ttl": "72h",
                    "fraction": "3/4",
                },
                "api": "secret/app/api",
            },
            services={
                "app.service": {
                    "environment": {
                        "U": "{{ secrets.db.username }}",
                        "R": "{{ secrets.db_ro.password }}",
                        "K": "{{ secrets.api.key }}",
                    },
                },
                "web.service": {
                    "credentials": {"tls.key": "{{ secrets.tls.private_key }}"},
                    "on_change": "reload",
                },
            },
            leases={"fraction": "1/2", "floor": "2m", "margin": 30},
        )
    )
    db, ro, tls, api = (config.secrets[n] for n in ("db", "db_ro", "tls", "api"))
    assert (db.engine, db.spec) == (Engine.DATABASE, DatabaseSpec())
    assert ro.spec == DatabaseSpec(max_ttl=86400.0, fraction=0.5)
    assert tls.engine is Engine.PKI and tls.full_path == "pki/issue/web"
    assert tls.spec == CertificateSpec(
        "app.example.test",
        ("www.example.test", "*.api.example.test"),
        ("10.0.0.5", "::1"),
        259200.0,
        0.75,
    )
    assert tls.spec.body() == {
        "common_name": "app.example.test",
        "alt_names": "www.example.test,*.api.example.test",
        "ip_sans": "10.0.0.5,::1",
        "ttl": "259200s",
    }
    assert api.spec is None and not api.leased and db.leased
    assert config.leases == Policy(fraction=0.5, floor=120.0, margin=30.0)
    assert config.users("db") == ("app.service",)
    assert parse_config(document()).leases == Policy()


BAD = [
    (
        "database-not-creds",
        {"db": "database/static-creds/app"},
        None,
        "secrets.db: a database secret must be <mount>/creds/<role>",
    ),
    (
        "pki-sign",
        {"db": {"path": "pki/sign/web", "common_name": "a.example.test"}},
        None,
        "secrets.db.path: a pki secret must be <mount>/issue/<role> (not sign/)",
    ),
    (
        "pki-without-name",
        {"db": {"path": "pki/issue/web"}},
        None,
        "secrets.db.common_name: missing required field",
    ),
    (
        "pki-bad-name",
        {"db": {"path": "pki/issue/web", "common_name": "not a name"}},
        None,
        "secrets.db.common_name: must be a DNS name",
    ),
    (
        "pki-bad-ip",
        {
            "db": {
                "path": "pki/issue/web",
                "common_name": "a.example.test",
                "ip_sans": ["10.0.0.300"],
            }
        },
        None,
        "secrets.db.ip_sans[0]: must be an IP address",
    ),
    (
        "fraction-one",
        {"db": {"path": "database/creds/app", "fraction": 1}},
        None,
        "secrets.db.fraction: must be a fraction between 0 and 1",
    ),
    (
        "fraction-zero-denominator",
        {"db": {"path": "database/creds/app", "fraction": "1/0"}},
        None,
        "secrets.db.fraction: must be a fraction",
    ),
    (
        "duration-unit",
        {"db": {"path": "database/creds/app", "max_ttl": "3 weeks"}},
        None,
        "secrets.db.max_ttl: must be a duration",
    ),
    (
        "option-on-kv",
        {"db": {"path": "secret/app/db", "max_ttl": "1h"}},
        None,
        "secrets.db.max_ttl: unknown key (options are for database and pki secrets only)",
    ),
    (
        "unknown-option",
        {"db": {"path": "database/creds/app", "ttl": "1h"}},
        None,
        "secrets.db.ttl: unknown key (allowed here: path, fraction, max_ttl)",
    ),
    (
        "mapping-without-path",
        {"db": {"max_ttl": "1h"}},
        None,
        "secrets.db.path: missing required field",
    ),
    (
        "on-change-none",
        None,
        {"app.service": {"environment": {"P": "{{ secrets.db.password }}"}, "on_change": "none"}},
        "services.app.service.on_change: uses the leased secret db: on_change must be restart",
    ),
    (
        "reload-with-environment",
        None,
        {"app.service": {"environment": {"P": "{{ secrets.db.password }}"}, "on_change": "reload"}},
        "services.app.service.on_change: a reload cannot give a running process the new "
        "environment of the leased secret db",
    ),
]


@pytest.mark.parametrize(
    ("secrets", "services", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_leased_config_names_the_field(
    secrets: dict[str, Any] | None, services: dict[str, Any] | None, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document(secrets, services))
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("leases", "message"),
    [
        ({"floor": 0}, "leases.floor: must be at least 1 second"),
        ({"fraction": 0.0}, "leases.fraction: must be a fraction"),
        ({"margin": "-5"}, "leases.margin: must be a duration"),
        ({"every": 5}, "leases.every: unknown key"),
    ],
)
def test_bad_schedule(leases: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document(leases=leases))
    assert message in str(caught.value)


# --- reconcile: which issue is current, which may be revoked -----------------------------------

T = 1_000_000.0


def held(version: int, lease_id: str = "") -> Held:
    record = Lease("db", T + version, 300, 300, True)
    return Held("db", "database/creds/app", version, record, {}, lease_id or f"id-{version}")


def unit(version: int | None, *, behind: bool = False) -> UnitState:
    secrets = () if version is None else (SecretState("db", "database/creds/app", version),)
    return UnitState(
        generation=2, values_generation=2, running_generation=1 if behind else 2, secrets=secrets
    )


def users(name: str) -> tuple[str, ...]:
    return ("a.service", "b.service") if name == "db" else ()


KEPT = Kept(current={"db": held(2)}, older={"db": (held(1),)})


@pytest.mark.parametrize(
    ("units", "rolled_back", "at_boot", "current", "older", "revoked"),
    [
        # Both units run the new issue: the old one is revoked.
        ({"a.service": unit(2), "b.service": unit(2)}, False, False, 2, [], ["id-1"]),
        # Stopped before the switch: the units still hold the old issue, which stays.
        ({"a.service": unit(1), "b.service": unit(1)}, False, False, 2, [1], []),
        # One unit switched, the other not yet: both issues stay.
        ({"a.service": unit(2), "b.service": unit(1)}, False, False, 2, [1], []),
        # Its files are new, but it was not restarted yet: it may run the old one.
        ({"a.service": unit(2), "b.service": unit(2, behind=True)}, False, False, 2, [1], []),
        # Rolled back: the old issue is current again, the new one revoked.
        ({"a.service": unit(1), "b.service": unit(1)}, True, False, 1, [], ["id-2"]),
        # At boot nothing is revoked (a unit already running was not restarted).
        ({"a.service": unit(2), "b.service": unit(2)}, False, True, 2, [], []),
        # A unit never rendered holds nothing.
        ({"a.service": unit(2)}, False, False, 2, [], ["id-1"]),
    ],
    ids=[
        "all-new",
        "before-switch",
        "half-switched",
        "behind",
        "rolled-back",
        "at-boot",
        "one-unit",
    ],
)
def test_reconcile(
    units: dict[str, UnitState],
    rolled_back: bool,
    at_boot: bool,
    current: int,
    older: list[int],
    revoked: list[str],
) -> None:
    got = reconcile(KEPT, State(units=units), users, rolled_back=rolled_back, at_boot=at_boot)
    assert got.current["db"].version == current
    assert [h.version for h in got.older.get("db", ())] == older
    assert [r.lease_id for r in got.revoke] == revoked


def test_a_secret_no_unit_uses_any_more_is_retired_whole() -> None:
    cert = Held("tls", "pki/issue/web", 1, Certificate("tls", T, T + 3600, T), {})
    kept = Kept(current={"db": held(2), "tls": cert}, older={"db": (held(1),)})
    got = reconcile(
        kept,
        State(units={"a.service": unit(2)}),
        lambda name: ("a.service",) if name == "db" else (),
        rolled_back=False,
        at_boot=False,
    )
    assert set(got.current) == {"db"}
    assert [r.lease_id for r in got.revoke] == ["id-1"]  # the certificate has no lease


def test_the_readme_config_reference_parses() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Image config reference", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = parse_config(block.encode(), "README.md")
    assert config.secrets["tls"].spec == CertificateSpec(
        "app.example.com", ("www.example.com",), ("10.0.0.5",), 259200.0, None
    )
    assert config.secrets["pg_ro"].spec == DatabaseSpec(max_ttl=86400.0, fraction=0.5)
    assert config.leases == Policy()
