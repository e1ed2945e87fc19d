"""The leased-secrets job (issue 15) as both agents are given it: one database credential
(OpenBao's database engine on a real PostgreSQL) rendered into app.service's environment,
and one certificate (OpenBao's PKI engine, a root CA made here) with its key for
web.service; the same templates for both agents, and TTLs short enough that a simulated
hour holds several renewals and re-issues of each. Also: reading the audit log by agent and
time, and checking what each agent rendered (PostgreSQL judges the login, `cryptography`
the certificate)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
from pathlib import Path
from typing import Any

from bootsecrets_dev.envfile import parse
from bootsecrets_dev.pki import key_matches, names, verifies_against
from bootsecrets_dev.postgres import Postgres
from harness import BenchError
from scenarios import hcl

ROLES = {"ours": "lease-ours", "bao": "lease-bao"}
DB_MOUNT, DB_ROLE = "database", "app"
PKI_MOUNT, PKI_ROLE = "pki", "web"
COMMON_NAME = "app.bench.test"
#: The simulated lives, in simulated minutes: a database lease of 10 min renewable up to
#: 30 min (the role's default_ttl and max_ttl), and a 20 min certificate.
DB_TTL, DB_MAX_TTL, CERT_TTL = 10, 30, 20


@dataclasses.dataclass(frozen=True)
class Timescale:
    """`hour` real seconds stand for one simulated hour."""

    hour: float

    def seconds(self, minutes: float) -> int:
        return max(1, round(minutes * self.hour / 60))

    def ttls(self) -> dict[str, int]:
        return {
            "database default_ttl": self.seconds(DB_TTL),
            "database max_ttl": self.seconds(DB_MAX_TTL),
            "certificate ttl": self.seconds(CERT_TTL),
        }


def policy_hcl(agent: str) -> str:
    """The droplet's policy of docs/leases.md (URL forms, scoped to the role's leases); bao
    agent's lease renewer uses the body form, `sys/leases/renew`, so its role has that too."""
    lines = [
        f'path "{DB_MOUNT}/creds/{DB_ROLE}" {{ capabilities = ["read"] }}',
        f'path "{PKI_MOUNT}/issue/{PKI_ROLE}" {{ capabilities = ["update"] }}',
        f'path "sys/leases/renew/{DB_MOUNT}/creds/{DB_ROLE}/*" {{ capabilities = ["update"] }}',
        f'path "sys/leases/revoke/{DB_MOUNT}/creds/{DB_ROLE}/*" {{ capabilities = ["update"] }}',
    ]
    if agent == "bao":
        lines.append('path "sys/leases/renew" { capabilities = ["update"] }')
    return "\n".join(lines) + "\n"


def ours_config(addr: str, scale: Timescale) -> str:
    """The image config: the database secret with the role's max_ttl (docs/leases.md: "if
    known"), the certificate with its TTL; a 1 s floor and a 2 s margin for the short
    lives (the defaults, 60 s each, are for real ones); the default fraction, 2/3."""
    return f"""vault:
  address: {json.dumps(addr)}
  request_timeout: 30
  boot_deadline: 120
approle:
  role: {ROLES["ours"]}
reboot_policy: reprovision
mounts:
  {DB_MOUNT}: database
  {PKI_MOUNT}: pki
leases:
  floor: 1
  margin: 2
secrets:
  db:
    path: {DB_MOUNT}/creds/{DB_ROLE}
    max_ttl: {scale.seconds(DB_MAX_TTL)}
  tls:
    path: {PKI_MOUNT}/issue/{PKI_ROLE}
    common_name: {COMMON_NAME}
    ttl: {scale.seconds(CERT_TTL)}
services:
  app.service:
    environment:
      DB_USER: "{{{{ secrets.db.username }}}}"
      DB_PASSWORD: "{{{{ secrets.db.password }}}}"
  web.service:
    credentials:
      tls.crt: "{{{{ secrets.tls.certificate }}}}\\n{{{{ secrets.tls.issuing_ca }}}}\\n"
      tls.key: "{{{{ secrets.tls.private_key }}}}\\n"
"""


def bao_templates(scale: Timescale) -> dict[str, str]:
    """The same two outputs for `bao agent`: the env file through `secret` (a leased read,
    renewed by the agent), the certificate, CA and key in one file through `pkiCert` (which
    reads its destination back to decide when to re-issue)."""
    return {
        "app.service.env": (
            f'{{{{ with secret "{DB_MOUNT}/creds/{DB_ROLE}" }}}}'
            'DB_USER="{{ .Data.username }}"\n'
            'DB_PASSWORD="{{ .Data.password }}"\n'
            "{{ end }}"
        ),
        "web.pem": (
            f'{{{{ with pkiCert "{PKI_MOUNT}/issue/{PKI_ROLE}" "common_name={COMMON_NAME}" '
            f'"ttl={scale.seconds(CERT_TTL)}s" }}}}'
            "{{ .Cert }}{{ .CA }}{{ .Key }}{{ end }}"
        ),
    }


def bao_agent_hcl(work: Path, addr: str, scale: Timescale, *, exit_after_auth: bool) -> str:
    stanzas = "".join(
        "template {\n"
        f"  source = {hcl(str(work / 'templates' / name))}\n"
        f"  destination = {hcl(str(work / 'out' / name))}\n"
        '  perms = "0600"\n'
        "}\n"
        for name in bao_templates(scale)
    )
    creation = f"auth/approle/role/{ROLES['bao']}/secret-id"
    return (
        f"vault {{\n  address = {hcl(addr)}\n}}\n"
        "auto_auth {\n"
        '  method "approle" {\n'
        '    mount_path = "auth/approle"\n'
        "    config = {\n"
        f"      role_id_file_path = {hcl(str(work / 'role_id'))}\n"
        f"      secret_id_file_path = {hcl(str(work / 'secret_id'))}\n"
        f"      secret_id_response_wrapping_path = {hcl(creation)}\n"
        "    }\n"
        "  }\n"
        '  sink "file" {\n'
        f"    config = {{\n      path = {hcl(str(work / 'token'))}\n      mode = 0600\n    }}\n"
        "  }\n"
        "}\n"
        f"exit_after_auth = {'true' if exit_after_auth else 'false'}\n"
        "template_config {\n  exit_on_retry_failure = true\n}\n" + stanzas
    )


# --- what the agents rendered -----------------------------------------------------------------

_PEM = re.compile(r"-----BEGIN ([A-Z ]+)-----.*?-----END \1-----\n?", re.S)


def pem_blocks(text: str) -> list[tuple[str, str]]:
    """(type, block) of every PEM block in `text`, in order."""
    return [(m.group(1), m.group(0)) for m in _PEM.finditer(text)]


def check_rendered(pg: Postgres, ca_pem: str, env_text: str, cert_text: str, key_text: str) -> None:
    """The database credentials log in to PostgreSQL; the certificate (the first one of
    `cert_text`) verifies against the CA, is valid now, names the common name and matches
    the key (the private-key block of `key_text`)."""
    env = parse(env_text)
    if set(env) != {"DB_USER", "DB_PASSWORD"}:
        raise BenchError(f"database env file holds {sorted(env)}")
    try:
        pg.whoami(env["DB_USER"], env["DB_PASSWORD"])
    except Exception as err:  # PostgresError: psql's stderr, never the password
        raise BenchError(f"the rendered database credentials do not log in: {err}") from None
    certs = [b for kind, b in pem_blocks(cert_text) if kind == "CERTIFICATE"]
    keys = [b for kind, b in pem_blocks(key_text) if kind.endswith("PRIVATE KEY")]
    if not certs or len(keys) != 1:
        raise BenchError(f"{len(certs)} certificates and {len(keys)} keys rendered")
    if not verifies_against(certs[0], ca_pem):
        raise BenchError("the rendered certificate does not verify against the CA (or expired)")
    if names(certs[0]).common_name != COMMON_NAME or not key_matches(certs[0], keys[0]):
        raise BenchError("the rendered certificate has another name or another key")


def check_ours(root: Path, pg: Postgres, ca_pem: str) -> None:
    current = root / "run/bootsecrets/current"
    creds = current / "credentials/web.service"
    check_rendered(
        pg,
        ca_pem,
        (current / "env/app.service.env").read_text(),
        (creds / "tls.crt").read_text(),
        (creds / "tls.key").read_text(),
    )


def check_bao(work: Path, pg: Postgres, ca_pem: str) -> None:
    pem = (work / "out/web.pem").read_text()
    check_rendered(pg, ca_pem, (work / "out/app.service.env").read_text(), pem, pem)


# --- the audit log, by agent and time ---------------------------------------------------------

_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z\Z")


def audit_time(entry: dict[str, Any]) -> float:
    """When the server logged the entry (epoch seconds; RFC 3339 with nanoseconds in UTC)."""
    match = _TIME.match(str(entry.get("time", "")))
    if match is None:
        raise BenchError(f"unexpected audit time {entry.get('time')!r}")
    base = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
    return base.replace(tzinfo=datetime.UTC).timestamp() + float("0" + (match.group(2) or ""))


def role_of(entry: dict[str, Any]) -> str | None:
    """The AppRole role whose token made the request (token metadata `role_name`)."""
    auth = entry.get("auth") or {}
    role = (auth.get("metadata") or {}).get("role_name")
    return str(role) if role else None


LEASE_KINDS = ("renew", "issue (database)", "issue (certificate)", "revoke")
