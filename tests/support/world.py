"""One test's world on the shared OpenBao server: a role, secrets with awkward values, and a
sandbox host root whose image config uses them."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from support.openbao import OpenBao, policy

if TYPE_CHECKING:
    from support.sandbox import Sandbox

__all__ = ["AWKWARD", "World", "policy"]

AWKWARD = 'p@ss "w$rd" `x` \\ back;#\nline2 ☃ '


class World:
    """One test's role, secrets and sandbox on the shared server."""

    def __init__(self, openbao: OpenBao, sandbox: Sandbox, unique: str) -> None:
        self.bao = openbao
        self.sandbox = sandbox
        self.unique = unique
        self.role = f"role-{unique}"
        self.password = "canary-" + secrets.token_hex(12) + " " + AWKWARD
        self.api_key = "canary-" + secrets.token_hex(12)
        self.legacy = "canary-" + secrets.token_hex(12) + "$HOME"
        self.db_version = openbao.put(
            "secret", f"{unique}/db", {"username": "app", "password": self.password}
        )
        openbao.put("secret", f"{unique}/api", {"key": self.api_key})
        openbao.put("kv1", f"{unique}/legacy", {"token": self.legacy, "port": 5432}, version=1)
        self.policy_paths = [
            f"secret/data/{unique}/db",
            f"secret/data/{unique}/api",
            f"kv1/{unique}/legacy",
        ]
        self.role_id = openbao.approle(self.role, policy(*self.policy_paths))

    def config(self, **overrides: Any) -> dict[str, Any]:
        u = self.unique
        config: dict[str, Any] = {
            "vault": {"address": self.bao.addr, "boot_deadline": 5, "request_timeout": 5},
            "approle": {"role": self.role},
            "reboot_policy": "reprovision",
            "mounts": {"secret": "kv-v2", "kv1": "kv-v1"},
            "secrets": {
                "db": f"secret/{u}/db",
                "api": f"secret/{u}/api",
                "legacy": f"kv1/{u}/legacy",
            },
            "services": {
                "app.service": {
                    "environment": {
                        "DATABASE_URL": "postgresql://{{ secrets.db.username }}:"
                        "{{ secrets.db.password }}@db/app",
                        "DB_PASSWORD": "{{ secrets.db.password }}",
                        "API_KEY": "{{ secrets.api.key }}",
                    },
                },
                "worker.service": {
                    "environment": {"DB_PASSWORD": "{{ secrets.db.password }}"},
                    "environment_from": [
                        {"secret": "legacy", "prefix": "LEGACY_", "uppercase": True}
                    ],
                    "on_change": "reload",
                },
            },
        }
        config.update(overrides)
        return config

    def provision(self, **overrides: Any) -> str:
        self.sandbox.write_config(self.config(**overrides))
        wrapped = self.bao.wrapped_secret_id(self.role)
        self.sandbox.write_bootstrap(self.role_id, wrapped)
        return wrapped
