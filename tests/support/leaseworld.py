"""One test's world for leased secrets: a database mount on the real PostgreSQL, a PKI mount
with its own root CA, a KV secret, an AppRole with the policy docs/leases.md gives, and a
sandbox whose clock the test can move forward (the agent takes lease and certificate times
from `Context.clock`; Vault keeps its own, real time).

Units: `app.service` (the database credentials in its environment), `web.service` (the
certificate, key and CA as LoadCredential= credentials), `api.service` (KV only).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from pathlib import Path
from typing import Any

from bootsecrets.context import Context
from support.openbao import CANARIES, OpenBao
from support.pki import PkiEngine
from support.postgres import DatabaseEngine, Postgres
from support.sandbox import Captured, Sandbox, read_env_file


class LeaseSandbox(Sandbox):
    """A sandbox whose agent sees the wall clock moved by `offset` seconds."""

    def __init__(self, root: Path, captured: Captured, openbao: OpenBao | None) -> None:
        super().__init__(root, captured, openbao)
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def context(self) -> Context:
        return dataclasses.replace(super().context(), clock=self.now)


def policy_hcl(unique: str, *, revoke: bool = True, renew: bool = True) -> str:
    db, pki = f"db-{unique}", f"pki-{unique}"
    lines = [
        f'path "secret/data/{unique}/api" {{ capabilities = ["read"] }}',
        f'path "{db}/creds/app" {{ capabilities = ["read"] }}',
        f'path "{pki}/issue/web" {{ capabilities = ["update"] }}',
    ]
    if renew:
        lines.append(f'path "sys/leases/renew/{db}/creds/app/*" {{ capabilities = ["update"] }}')
    if revoke:
        lines.append(f'path "sys/leases/revoke/{db}/creds/app/*" {{ capabilities = ["update"] }}')
    return "\n".join(lines)


class LeaseWorld:
    def __init__(
        self,
        bao: OpenBao,
        pg: Postgres,
        sandbox: LeaseSandbox,
        unique: str,
        *,
        default_ttl: str = "2m",
        max_ttl: str = "10m",
        cert_ttl: str = "1h",
    ) -> None:
        self.bao = bao
        self.pg = pg
        self.sandbox = sandbox
        self.unique = unique
        self.role = f"role-{unique}"
        self.db = DatabaseEngine(bao, pg, mount=f"db-{unique}")
        self.db.role("app", default_ttl=default_ttl, max_ttl=max_ttl)
        self.pki = PkiEngine(bao, mount=f"pki-{unique}")
        self.pki.role("web", allowed_domains=["example.test"], max_ttl="72h")
        self.cert_ttl = cert_ttl
        self.api_key = "canary-" + secrets.token_hex(12)
        bao.put("secret", f"{unique}/api", {"key": self.api_key})
        self.role_id = bao.approle(self.role, policy_hcl(unique))

    def set_policy(self, **kwargs: bool) -> None:
        self.bao.client.sys.create_or_update_policy(
            name=f"{self.role}-policy", policy=policy_hcl(self.unique, **kwargs)
        )

    def config(self, **overrides: Any) -> dict[str, Any]:
        u = self.unique
        config: dict[str, Any] = {
            "vault": {"address": self.bao.addr, "boot_deadline": 5, "request_timeout": 5},
            "approle": {"role": self.role},
            "reboot_policy": "reprovision",
            "mounts": {"secret": "kv-v2", f"db-{u}": "database", f"pki-{u}": "pki"},
            "secrets": {
                "api": f"secret/{u}/api",
                "db": {"path": f"db-{u}/creds/app"},
                "tls": {
                    "path": f"pki-{u}/issue/web",
                    "common_name": "app.example.test",
                    "alt_names": ["www.example.test"],
                    "ip_sans": ["127.0.0.1"],
                    "ttl": self.cert_ttl,
                },
            },
            "services": {
                "app.service": {
                    "environment": {
                        "DB_USER": "{{ secrets.db.username }}",
                        "DB_PASSWORD": "{{ secrets.db.password }}",
                    }
                },
                "web.service": {
                    "credentials": {
                        "tls.crt": "{{ secrets.tls.certificate }}\n{{ secrets.tls.issuing_ca }}\n",
                        "tls.key": "{{ secrets.tls.private_key }}\n",
                        "ca.crt": "{{ secrets.tls.issuing_ca }}\n",
                    }
                },
                "api.service": {"environment": {"API_KEY": "{{ secrets.api.key }}"}},
            },
        }
        config.update(overrides)
        return config

    def provision(self, config: dict[str, Any] | None = None) -> None:
        self.sandbox.write_config(config or self.config())
        wrapped = self.bao.wrapped_secret_id(self.role)
        self.sandbox.write_bootstrap(self.role_id, wrapped)

    # --- what the units hold ----------------------------------------------------------------

    def app_creds(self) -> tuple[str, str]:
        """(user, password) in app.service's live env file; the password becomes a canary."""
        env = read_env_file(self.sandbox.env_file("app.service"))
        CANARIES.add(env["DB_PASSWORD"])
        return env["DB_USER"], env["DB_PASSWORD"]

    def web_file(self, name: str) -> str:
        text = (self.sandbox.store / "current/credentials/web.service" / name).read_text()
        if name == "tls.key":
            CANARIES.add(text.strip())
        return text

    def kept(self) -> dict[str, Any]:
        """The memory-only leases.json (lease IDs inside: for the test's checks only)."""
        data: dict[str, Any] = json.loads((self.sandbox.store / "leases.json").read_text())
        held = [*data["current"].values(), *(h for hs in data["older"].values() for h in hs)]
        for one in held:
            for key in ("password", "private_key"):
                if key in one["data"]:
                    CANARIES.add(str(one["data"][key]))
        # Lease IDs are handles, not credentials, but must not leave the store either.
        CANARIES.update(str(h["lease_id"]) for h in [*held, *data["revoke"]] if h["lease_id"])
        return data

    def lease_id(self) -> str:
        return str(self.kept()["current"]["db"]["lease_id"])

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.sandbox.store / "state.json").read_text())
        return data

    def status(self) -> dict[str, Any]:
        code, out, err = self.sandbox.run("status", "--json")
        assert code == 0, err
        report: dict[str, Any] = json.loads(out)
        return report

    def lease_status(self, name: str) -> dict[str, Any]:
        found: dict[str, Any] = next(e for e in self.status()["leases"] if e["name"] == name)
        return found


STARTING = ("start", "restart", "try-restart", "try-reload-or-restart")


class Holders:
    """What app.service runs with, judged by PostgreSQL: the credentials its env file held
    each time systemd (the recording stand-in) started it. At every systemctl call after
    that, and on `check()`, those credentials must still log in: a unit never holds revoked
    credentials. Also notes the audit log's size at every call, to order Vault requests
    against restarts."""

    def __init__(self, world: LeaseWorld, unit: str = "app.service") -> None:
        self.world = world
        self.unit = unit
        self.held: tuple[str, str] | None = None
        #: Every set of credentials the unit was (re)started with, in order.
        self.history: list[tuple[str, str]] = []
        self.violations: list[str] = []
        self.calls: list[tuple[tuple[str, ...], int]] = []
        world.sandbox.runner.on_call = self

    def __call__(self, argv: tuple[str, ...]) -> None:
        self.calls.append((argv, self.world.bao.audit_offset()))
        units = argv[argv.index("--") + 1 :] if "--" in argv else ()
        if len(argv) > 1 and argv[1] in STARTING and self.unit in units:
            self.held = self.world.app_creds()
            self.history.append(self.held)
        self.check(f"at `{' '.join(argv[1:3])}`")

    def check(self, when: str = "at the end") -> None:
        if self.held is None:
            return
        user, password = self.held
        try:
            self.world.pg.whoami(user, password)
        except Exception as err:  # recorded, asserted by the test
            self.violations.append(
                f"{self.unit} held credentials that no longer log in {when}: {type(err).__name__}"
            )

    def offset_at(self, verb: str, unit: str) -> int:
        """The audit log's size at the last `verb` call naming `unit`."""
        return max(
            off for argv, off in self.calls if len(argv) > 1 and argv[1] == verb and unit in argv
        )
