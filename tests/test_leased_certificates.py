"""PKI certificates from a real OpenBao PKI engine (a root CA made by the test), delivered as
LoadCredential= credentials and judged by independent code: `cryptography` verifies the
signature, the key and the names, OpenSSL does a real TLS handshake. Re-issued at 2/3 of the
certificate's validity and not before, not on a new token, and only the unit using it is
restarted."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import mode_of
from support.leaseworld import LeaseSandbox, LeaseWorld
from support.openbao import OpenBao
from support.pki import Issued, key_matches, load, names, tls_handshake, verifies_against
from support.postgres import Postgres, postgres_server
from support.sandbox import Captured

PEM = re.compile(r"-----BEGIN CERTIFICATE-----\n.*?-----END CERTIFICATE-----", re.S)


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres_server() as server:
        yield server


@pytest.fixture
def world(
    openbao: OpenBao, pg: Postgres, sandbox_root: Path, captured: Captured, unique: str
) -> LeaseWorld:
    sandbox = LeaseSandbox(sandbox_root, captured, openbao)
    return LeaseWorld(openbao, pg, sandbox, unique, cert_ttl="1h")


def cert_only(world: LeaseWorld) -> dict[str, Any]:
    """web.service (the certificate) and api.service (KV): no database lease to get in the
    way when the clock moves an hour on."""
    config = world.config()
    del config["secrets"]["db"]
    del config["services"]["app.service"]
    return config


def boot(world: LeaseWorld, config: dict[str, Any]) -> None:
    world.provision(config)
    code, _, err = world.sandbox.run("bootstrap")
    assert code == 0, err
    world.sandbox.runner.calls.clear()


def rendered(world: LeaseWorld) -> Issued:
    """What web.service gets, as the support module's Issued (for tls_handshake)."""
    chain = PEM.findall(world.web_file("tls.crt"))
    ca = world.web_file("ca.crt").strip()
    return Issued(
        certificate=chain[0],
        private_key=world.web_file("tls.key").strip(),
        private_key_type="ec",
        issuing_ca=ca,
        ca_chain=(ca,),
        serial_number="",
        not_before=0,
        expiration=0,
        lease_id="",
        renewable=False,
    )


def issue_calls(bao: OpenBao, offset: int, unique: str) -> list[str]:
    return [
        r["path"] for r in bao.audited_requests(offset) if r["path"].startswith(f"pki-{unique}/")
    ]


def restarted(world: LeaseWorld) -> list[str]:
    return [
        c[-1]
        for c in world.sandbox.runner.verbs()
        if c and c[0] in ("try-restart", "try-reload-or-restart", "restart")
    ]


def test_the_certificate_verifies_matches_its_key_and_carries_the_names(
    world: LeaseWorld,
) -> None:
    boot(world, cert_only(world))
    issued = rendered(world)
    chain = PEM.findall(world.web_file("tls.crt"))
    assert [c.strip() for c in chain[1:]] == [world.pki.ca_pem.strip()]
    assert verifies_against(issued.certificate, world.pki.ca_pem)
    assert key_matches(issued.certificate, issued.private_key)
    got = names(issued.certificate)
    assert got.common_name == "app.example.test"
    assert got.dns == {"app.example.test", "www.example.test"}
    assert got.ips == {"127.0.0.1"}
    for name in ("www.example.test", "127.0.0.1"):
        assert tls_handshake(issued, world.pki.ca_pem, name).startswith("TLSv1.")
    credentials = world.sandbox.store / "current/credentials/web.service"
    assert {mode_of(credentials / n) for n in ("tls.crt", "tls.key", "ca.crt")} == {0o400}
    dropin = world.sandbox.root / "run/systemd/system/web.service.d/50-bootsecrets.conf"
    assert (
        "LoadCredential=tls.key:/run/bootsecrets/current/credentials/web.service/tls.key"
        in dropin.read_text()
    )
    tls = world.lease_status("tls")
    assert tls["kind"] == "certificate" and tls["lease"] is False
    assert (
        tls["serial_number"]
        and int(tls["serial_number"].replace(":", ""), 16) == load(issued.certificate).serial_number
    )
    assert tls["expires_at"] == pytest.approx(
        load(issued.certificate).not_valid_after_utc.timestamp()
    )


def test_reissued_at_the_threshold_and_not_before(world: LeaseWorld, openbao: OpenBao) -> None:
    boot(world, cert_only(world))
    first = rendered(world)
    tls = world.lease_status("tls")
    issued_at = tls["issued_at"]
    due = tls["next_action_at"]
    # 2/3 of the validity, counted from when it was requested (a 1 h certificate: 40 min).
    assert due - issued_at == pytest.approx(2 / 3 * (tls["expires_at"] - issued_at), abs=1)
    assert 2390 <= due - issued_at <= 2410

    world.sandbox.offset = due - issued_at - 30
    offset = openbao.audit_offset()
    code, _, err = world.sandbox.run("refresh")
    assert code == 0, err
    assert issue_calls(openbao, offset, world.unique) == []
    assert restarted(world) == []

    world.sandbox.offset = due - issued_at + 1
    offset = openbao.audit_offset()
    code, _, err = world.sandbox.run("refresh")
    assert code == 0, err
    assert issue_calls(openbao, offset, world.unique) == [f"pki-{world.unique}/issue/web"]
    assert restarted(world) == ["web.service"]  # api.service (KV only) is left alone
    second = rendered(world)
    assert load(second.certificate).serial_number != load(first.certificate).serial_number
    assert verifies_against(second.certificate, world.pki.ca_pem)
    assert key_matches(second.certificate, second.private_key)
    assert not key_matches(second.certificate, first.private_key)
    assert world.lease_status("tls")["version"] == 2


def test_not_reissued_with_a_new_token(world: LeaseWorld, openbao: OpenBao) -> None:
    """Re-provisioning (a new AppRole login, a new token) keeps the certificate: vault#10676
    re-issued certificates on every token renewal."""
    boot(world, cert_only(world))
    serial = world.lease_status("tls")["serial_number"]
    offset = openbao.audit_offset()
    wrapped = openbao.wrapped_secret_id(world.role)
    code, _, err = world.sandbox.run("refresh", "--wrapped-secret-id", "-", stdin=wrapped)
    assert code == 0, err
    paths = [r["path"] for r in openbao.audited_requests(offset)]
    assert "auth/approle/login" in paths
    assert issue_calls(openbao, offset, world.unique) == []
    assert restarted(world) == []
    assert world.lease_status("tls")["serial_number"] == serial


def test_changed_names_in_the_config_issue_anew(world: LeaseWorld, openbao: OpenBao) -> None:
    boot(world, cert_only(world))
    config = cert_only(world)
    config["secrets"]["tls"]["alt_names"] = ["api.example.test"]
    world.sandbox.write_config(config)
    offset = openbao.audit_offset()
    code, _, err = world.sandbox.run("refresh")
    assert code == 0, err
    assert issue_calls(openbao, offset, world.unique) == [f"pki-{world.unique}/issue/web"]
    assert names(rendered(world).certificate).dns == {"app.example.test", "api.example.test"}
    assert restarted(world) == ["web.service"]
