"""OpenBao's PKI engine with a root CA made by the test: what `pki/issue/<role>` hands out,
checked by independent implementations (`cryptography`, and OpenSSL in a TLS handshake)."""

from __future__ import annotations

import ssl
import time
from datetime import UTC, datetime, timedelta

import hvac.exceptions
import pytest

from support import vaultapi
from support.openbao import OpenBao
from support.pki import (
    Issued,
    PkiEngine,
    key_matches,
    load,
    names,
    serial_int,
    tls_handshake,
    verifies_against,
)


@pytest.fixture
def pki(openbao: OpenBao, unique: str) -> PkiEngine:
    engine = PkiEngine(openbao, mount=f"pki-{unique}")
    engine.role("web", allowed_domains=["example.test"], max_ttl="72h")
    return engine


def issue_web(pki: PkiEngine, ttl: str = "1h") -> Issued:
    return pki.issue(
        "web",
        "app.example.test",
        alt_names=["www.example.test", "api.example.test"],
        ip_sans=["127.0.0.1"],
        ttl=ttl,
    )


def test_issued_certificate_verifies_matches_its_key_and_carries_the_names(
    pki: PkiEngine,
) -> None:
    issued = issue_web(pki)
    assert verifies_against(issued.certificate, pki.ca_pem)
    assert issued.issuing_ca.strip() == pki.ca_pem.strip()
    assert [c.strip() for c in issued.ca_chain] == [pki.ca_pem.strip()]
    assert key_matches(issued.certificate, issued.private_key)
    assert issued.private_key_type == "ec"
    got = names(issued.certificate)
    assert got.common_name == "app.example.test"
    assert got.dns == {"app.example.test", "www.example.test", "api.example.test"}
    assert got.ips == {"127.0.0.1"}


def test_response_times_are_the_certificates(pki: PkiEngine) -> None:
    """`not_before` and `expiration` in the answer are the certificate's own validity (so
    the agent needs no X.509 parser), not_before backdated by 30 s, the TTL as asked."""
    before = int(time.time())
    issued = issue_web(pki, ttl="2h")
    cert = load(issued.certificate)
    assert issued.not_before == int(cert.not_valid_before_utc.timestamp())
    assert issued.expiration == int(cert.not_valid_after_utc.timestamp())
    assert serial_int(issued.serial_number) == cert.serial_number
    assert before - 40 <= issued.not_before <= before - 20
    assert 7200 - 5 <= issued.expiration - before <= 7200 + 5
    # No lease for a PKI certificate unless the role asks for one (generate_lease).
    assert issued.lease_id == ""
    assert issued.renewable is False


def test_a_wrong_key_or_a_foreign_ca_is_told_apart(
    pki: PkiEngine, openbao: OpenBao, unique: str
) -> None:
    """The checks can fail: a second CA and a second key are rejected."""
    first, second = issue_web(pki), issue_web(pki)
    assert not key_matches(first.certificate, second.private_key)
    other = PkiEngine(openbao, mount=f"pki2-{unique}", ca_name="bootsecrets test CA")
    assert not verifies_against(first.certificate, other.ca_pem)
    assert not verifies_against(
        first.certificate, pki.ca_pem, at=datetime.now(UTC) + timedelta(hours=2)
    )


def test_tls_handshake_with_the_ca(pki: PkiEngine, openbao: OpenBao, unique: str) -> None:
    issued = issue_web(pki)
    assert tls_handshake(issued, pki.ca_pem, "www.example.test").startswith("TLS")
    assert tls_handshake(issued, pki.ca_pem, "127.0.0.1").startswith("TLS")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        tls_handshake(issued, pki.ca_pem, "other.example.test")
    other = PkiEngine(openbao, mount=f"pki2-{unique}")
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        tls_handshake(issued, other.ca_pem, "www.example.test")


def test_role_refuses_a_name_it_does_not_allow(pki: PkiEngine) -> None:
    """A fault for the agent: the answer names the common name (not secret), HTTP 400."""
    with pytest.raises(hvac.exceptions.InvalidRequest, match="not allowed by this role"):
        pki.issue("web", "app.elsewhere.test")
    with pytest.raises(hvac.exceptions.InvalidRequest, match="not allowed by this role"):
        pki.issue("web", "app.example.test", alt_names=["evil.elsewhere.test"])


def test_ttl_above_the_roles_max_is_capped(pki: PkiEngine, openbao: OpenBao, unique: str) -> None:
    """A TTL past the role's max_ttl is cut to it (with a warning), not refused: the agent
    must take the certificate's own expiration, never the TTL it asked for."""
    pki.role("short", allowed_domains=["example.test"], max_ttl="1h")
    before = int(time.time())
    issued = pki.issue("short", "app.example.test", ttl="24h")
    assert issued.expiration - before <= 3600 + 5


def test_revoke_puts_the_serial_on_the_crl(pki: PkiEngine) -> None:
    kept, revoked = issue_web(pki), issue_web(pki)
    revoked_at = pki.revoke(revoked.serial_number)
    assert abs(revoked_at - time.time()) < 60
    crl = pki.crl()
    assert crl.is_signature_valid(load(pki.ca_pem).public_key())  # type: ignore[arg-type]
    assert (
        crl.get_revoked_certificate_by_serial_number(serial_int(revoked.serial_number)) is not None
    )
    assert crl.get_revoked_certificate_by_serial_number(serial_int(kept.serial_number)) is None


def test_generate_lease_gives_a_lease_that_cannot_be_renewed(
    pki: PkiEngine, openbao: OpenBao
) -> None:
    """With `generate_lease` the certificate gets a lease, not renewable (a certificate's
    validity cannot be extended): renewing is refused, revoking the lease revokes the
    certificate. Without it (the default), the serial is the handle."""
    pki.role("leased", allowed_domains=["example.test"], generate_lease=True)
    issued = pki.issue("leased", "app.example.test", ttl="1h")
    assert issued.lease_id.startswith(f"{pki.mount}/issue/leased/")
    assert issued.renewable is False
    with pytest.raises(hvac.exceptions.InvalidRequest, match="not renewable"):
        vaultapi.renew(openbao, issued.lease_id)
    vaultapi.revoke(openbao, issued.lease_id)
    assert (
        pki.crl().get_revoked_certificate_by_serial_number(serial_int(issued.serial_number))
        is not None
    )


def test_revoke_with_key_needs_the_matching_private_key(pki: PkiEngine, openbao: OpenBao) -> None:
    """`pki/revoke-with-key` revokes a certificate only for whoever holds its key: a policy
    can grant it to every agent without letting one revoke another's certificates."""
    mine, theirs = issue_web(pki), issue_web(pki)
    # (an HTTP 500, naming no key material)
    with pytest.raises(hvac.exceptions.VaultError, match="does not match"):
        vaultapi.write(
            openbao,
            f"{pki.mount}/revoke-with-key",
            {"serial_number": theirs.serial_number, "private_key": mine.private_key},
        )
    vaultapi.write(
        openbao,
        f"{pki.mount}/revoke-with-key",
        {"serial_number": mine.serial_number, "private_key": mine.private_key},
    )
    crl = pki.crl()
    assert crl.get_revoked_certificate_by_serial_number(serial_int(mine.serial_number)) is not None
    assert crl.get_revoked_certificate_by_serial_number(serial_int(theirs.serial_number)) is None
