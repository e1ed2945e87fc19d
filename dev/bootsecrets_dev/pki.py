"""OpenBao's PKI engine with a root CA made by the test, and checks of what it issues by an
independent implementation (the `cryptography` package, and OpenSSL through `ssl` for a
real TLS handshake).

What `pki/issue/<role>` answers (OpenBao 2.x), as the agent will read it:
`data.certificate`, `data.private_key` (secret), `data.private_key_type`, `data.issuing_ca`,
`data.ca_chain`, `data.serial_number` ("xx:xx:..."), `data.not_before` and
`data.expiration` (Unix seconds; not_before is backdated 30 s by default), and no lease
(`lease_id` "", `renewable` false) unless the role sets `generate_lease`. Revocation is
`pki/revoke` with `serial_number` (then the CRL at `pki/crl/pem` lists it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from bootsecrets_dev import vaultapi
from bootsecrets_dev.openbao import CANARIES, OpenBao


@dataclass(frozen=True)
class Issued:
    """One answer of `pki/issue/<role>`; the private key is a canary."""

    certificate: str
    private_key: str
    private_key_type: str
    issuing_ca: str
    ca_chain: tuple[str, ...]
    serial_number: str
    not_before: int
    expiration: int
    lease_id: str
    renewable: bool


class PkiEngine:
    """A PKI mount with a fresh root CA (EC P-256: fast to make) and roles on it."""

    def __init__(
        self,
        bao: OpenBao,
        *,
        mount: str = "pki",
        ca_name: str = "bootsecrets test CA",
        ca_ttl: str = "8760h",
    ) -> None:
        self.bao = bao
        self.mount = mount
        vaultapi.enable_engine(bao, "pki", mount, max_lease_ttl=ca_ttl)
        root = vaultapi.write(
            bao,
            f"{mount}/root/generate/internal",
            {"common_name": ca_name, "ttl": ca_ttl, "key_type": "ec", "key_bits": 256},
        )
        self.ca_pem = str(root["data"]["certificate"])

    def role(
        self, name: str, *, allowed_domains: Sequence[str], max_ttl: str = "72h", **options: Any
    ) -> None:
        data: dict[str, Any] = {
            "allowed_domains": ",".join(allowed_domains),
            "allow_subdomains": True,
            "allow_bare_domains": True,
            "allow_ip_sans": True,
            "max_ttl": max_ttl,
            "key_type": "ec",
            "key_bits": 256,
            **options,
        }
        vaultapi.write(self.bao, f"{self.mount}/roles/{name}", data)

    def issue(
        self,
        role: str,
        common_name: str,
        *,
        alt_names: Sequence[str] = (),
        ip_sans: Sequence[str] = (),
        ttl: str | None = None,
    ) -> Issued:
        data: dict[str, Any] = {"common_name": common_name}
        if alt_names:
            data["alt_names"] = ",".join(alt_names)
        if ip_sans:
            data["ip_sans"] = ",".join(ip_sans)
        if ttl:
            data["ttl"] = ttl
        response = vaultapi.write(self.bao, f"{self.mount}/issue/{role}", data)
        d = response["data"]
        CANARIES.add(str(d["private_key"]))
        return Issued(
            certificate=str(d["certificate"]),
            private_key=str(d["private_key"]),
            private_key_type=str(d["private_key_type"]),
            issuing_ca=str(d["issuing_ca"]),
            ca_chain=tuple(str(c) for c in d.get("ca_chain") or ()),
            serial_number=str(d["serial_number"]),
            not_before=int(d["not_before"]),
            expiration=int(d["expiration"]),
            lease_id=str(response.get("lease_id") or ""),
            renewable=bool(response.get("renewable")),
        )

    def revoke(self, serial_number: str) -> int:
        """`pki/revoke`; returns the revocation time (Unix seconds)."""
        response = vaultapi.write(
            self.bao, f"{self.mount}/revoke", {"serial_number": serial_number}
        )
        return int(response["data"]["revocation_time"])

    def crl(self) -> x509.CertificateRevocationList:
        """The CRL as any relying party fetches it (unauthenticated)."""
        response = requests.get(f"{self.bao.addr}/v1/{self.mount}/crl/pem", timeout=10)
        response.raise_for_status()
        return x509.load_pem_x509_crl(response.content)


# --- independent checks ------------------------------------------------------------------------


def load(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode("ascii"))


def serial_int(serial_number: str) -> int:
    """Vault's "2b:0c:..." serial as the integer in the certificate."""
    return int(serial_number.replace(":", ""), 16)


def verifies_against(cert_pem: str, ca_pem: str, at: datetime | None = None) -> bool:
    """True when the CA signed `cert_pem` (signature and issuer name) and `at` (default now)
    is inside its validity window."""
    cert, ca = load(cert_pem), load(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):
        return False
    at = at or datetime.now(UTC)
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def key_matches(cert_pem: str, key_pem: str) -> bool:
    """The certificate's public key is the private key's."""
    key = serialization.load_pem_private_key(key_pem.encode("ascii"), password=None)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return load(cert_pem).public_key().public_bytes(*raw) == key.public_key().public_bytes(*raw)


@dataclass(frozen=True)
class Names:
    common_name: str
    dns: frozenset[str]
    ips: frozenset[str]


def names(cert_pem: str) -> Names:
    cert = load(cert_pem)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Names(str(cn[0].value) if cn else "", frozenset(), frozenset())
    return Names(
        common_name=str(cn[0].value) if cn else "",
        dns=frozenset(san.get_values_for_type(x509.DNSName)),
        ips=frozenset(str(ip) for ip in san.get_values_for_type(x509.IPAddress)),
    )


@contextlib.contextmanager
def _pem_files(issued: Issued) -> Iterator[tuple[Path, Path]]:
    """cert+chain and key as files (ssl.load_cert_chain takes paths only) in a 0700 tmpfs
    directory, removed after."""
    shm = Path("/dev/shm")  # noqa: S108 (tmpfs: key material never on disk)
    base = shm if shm.is_dir() else None
    with tempfile.TemporaryDirectory(prefix="pki-", dir=base) as tmp:
        chain, key = Path(tmp) / "chain.pem", Path(tmp) / "key.pem"
        for path, text in (
            (chain, issued.certificate + "\n" + issued.issuing_ca + "\n"),
            (key, issued.private_key + "\n"),
        ):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
        yield chain, key


def tls_handshake(issued: Issued, ca_pem: str, server_name: str) -> str:
    """A real TLS handshake (OpenSSL on both ends, over a socketpair): a server presenting
    `issued`, a client trusting only `ca_pem` and checking `server_name` (a DNS name or an
    IP). Returns the negotiated TLS version; raises ssl.SSLError when verification fails."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with _pem_files(issued) as (chain, key):
        server_ctx.load_cert_chain(chain, key)
    client_ctx = ssl.create_default_context(cadata=ca_pem)  # also checks the host name
    left, right = socket.socketpair()
    left.settimeout(10)
    right.settimeout(10)
    server_error: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(right, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as err:
            server_error.append(err)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client_ctx.wrap_socket(left, server_hostname=server_name) as tls:
            if tls.recv(2) != b"ok":
                raise RuntimeError("TLS handshake done, but the server's bytes did not arrive")
            version = tls.version() or ""
    finally:
        left.close()
        thread.join(10)
        right.close()
    if server_error:
        raise server_error[0]
    return version
