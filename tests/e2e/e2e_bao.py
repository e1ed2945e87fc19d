"""OpenBao for the VM: HTTPS with a CA the test makes, and one listener with the wrong CA.

`make_tls(dir)` makes two CAs with openssl and, from each, a server certificate for the
addresses the server is reached at: 10.0.2.2 (the host's loopback as QEMU's user-mode
network shows it to the guest) and 127.0.0.1. The image carries the first CA (`good.ca`);
the second only signs the certificate of the `wrong` listener.

`tls_dev_server()` starts `bao server -dev` with three listeners on the host's loopback:
plain HTTP for the test's own set-up (never given to the guest), HTTPS with the good
certificate, HTTPS with the wrong one; and a file audit device (the disk scan compares audit
HMACs). The same server behind both HTTPS listeners: a guest that did not verify the
certificate would get through on the wrong one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from e2e_image import HOST_FROM_GUEST
from e2e_vm import free_port

from support.openbao import OpenBao, bao_binary, wait_healthy


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


@dataclasses.dataclass(frozen=True)
class Tls:
    good: Pki
    wrong: Pki


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(out: Path, name: str) -> Pki:
    out.mkdir(parents=True, exist_ok=True)
    ca, ca_key = out / f"{name}-ca.pem", out / f"{name}-ca.key"
    cert, key, csr = out / f"{name}-server.pem", out / f"{name}-server.key", out / f"{name}.csr"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        f"/CN=bootsecrets e2e {name} CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    _openssl("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=openbao")
    ext = out / f"{name}.ext"
    ext.write_text(
        f"subjectAltName=IP:{HOST_FROM_GUEST},IP:127.0.0.1\n"
        "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
        "keyUsage=digitalSignature\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "2",
        "-extfile",
        str(ext),
    )
    ca_key.unlink()  # nothing else is ever signed with it
    return Pki(ca, cert, key)


def make_tls(out: Path) -> Tls:
    return Tls(good=make_pki(out, "good"), wrong=make_pki(out, "wrong"))


@dataclasses.dataclass
class TlsBao:
    bao: OpenBao
    good_port: int
    wrong_port: int

    @property
    def guest_addr(self) -> str:
        """The address the guest uses: HTTPS, the certificate from the image's CA."""
        return f"https://{HOST_FROM_GUEST}:{self.good_port}"

    @property
    def wrong_guest_addr(self) -> str:
        """The same server, with a certificate from a CA the image does not have."""
        return f"https://{HOST_FROM_GUEST}:{self.wrong_port}"


def _listener(port: int, pki: Pki) -> str:
    return (
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n'
        f'  cluster_address = "127.0.0.1:{free_port()}"\n'
        f'  tls_cert_file = "{pki.cert}"\n  tls_key_file = "{pki.key}"\n}}\n'
    )


@contextlib.contextmanager
def tls_dev_server(workdir: Path, tls: Tls) -> Iterator[TlsBao]:
    workdir.mkdir(parents=True, exist_ok=True)
    admin, good, wrong = free_port(), free_port(), free_port()
    root_token = "root-" + secrets.token_hex(16)
    audit_path, log_path = workdir / "audit.log", workdir / "bao.log"
    config = workdir / "bao.hcl"
    config.write_text(
        f'audit "file" "file" {{\n  options {{\n    file_path = "{audit_path}"\n  }}\n}}\n'
        + _listener(good, tls.good)
        + _listener(wrong, tls.wrong)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(workdir)
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [
                bao_binary(),
                "server",
                "-dev",
                f"-dev-root-token-id={root_token}",
                f"-dev-listen-address=127.0.0.1:{admin}",
                "-dev-no-store-token",
                f"-config={config}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    server = OpenBao(f"http://127.0.0.1:{admin}", root_token, process, log_path)
    server.audit_path = audit_path
    try:
        wait_healthy(server.addr, process=process, log_path=log_path)
        wait_healthy(
            f"https://127.0.0.1:{good}", process=process, log_path=log_path, verify=str(tls.good.ca)
        )
        wait_healthy(
            f"https://127.0.0.1:{wrong}",
            process=process,
            log_path=log_path,
            verify=str(tls.wrong.ca),
        )
        yield TlsBao(server, good, wrong)
    finally:
        server.stop()
        shutil.rmtree(workdir / ".bao", ignore_errors=True)
